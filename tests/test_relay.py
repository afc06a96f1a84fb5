"""End to end through the outbound side: Odoo-shaped mail → submission port → smarthost, then tracking and
webhooks (issue 6). Everything binds 127.0.0.1 on free ports."""

from __future__ import annotations

import asyncio
import re
from email import message_from_bytes, policy
from urllib.parse import urlsplit

import aiohttp
import aiosmtplib
import pytest
from sqlalchemy import func, select

from gateway.config import parse_config
from gateway.relay import RelayPlan, Submission, read_submission, record_submissions, resolve_verp
from gateway.relay_service import start_outbound_services
from gateway.schema import events, outbound_recipients, thread_index
from gateway.store import open_store
from routing.tokens import read_verp
from tests.smtp_wire import WireClient
from tests.test_relay_support import (
    HOOK_SECRET, SECRET, Smarthost, WebhookReceiver, base_config, free_port, odoo_mail,
)

pytestmark = pytest.mark.events


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("MAILGATE_SECRET", SECRET)
    monkeypatch.setenv("MG_TEST_HOOK_SECRET", HOOK_SECRET)
    monkeypatch.setenv("MAILGATE_EVENTS_TOKEN", "pull-token-123")
    monkeypatch.setenv("MG_TEST_SUBMIT_PW", "odoo-pw")


@pytest.fixture
def engine(tmp_path):
    eng = open_store(f"sqlite:///{tmp_path / 'gw.db'}", synchronous="NORMAL")
    yield eng
    eng.dispose()


class Gateway:
    def __init__(self, engine, cfg):
        self.engine = engine
        self.config = parse_config(cfg, base_dir=".")
        self.stop = asyncio.Event()
        self.services = None

    async def __aenter__(self):
        self.services = await start_outbound_services(self.config, self.engine, self.stop)
        return self

    async def __aexit__(self, *exc):
        self.stop.set()
        await self.services.close()

    @property
    def port(self) -> int:
        return self.services.submission_ports[0]

    async def send(self, raw: bytes, rcpts: list[str], *, sender: str = "bounce@example.test", **kw) -> None:
        await aiosmtplib.send(raw, sender=sender, recipients=rcpts, hostname="127.0.0.1", port=self.port, **kw)


def html_of(raw: bytes) -> str:
    msg = message_from_bytes(raw, policy=policy.default)
    return next(p.get_content() for p in msg.walk() if p.get_content_type() == "text/html")


async def test_two_recipients_get_verp_pixel_links_and_events(env, engine):
    smarthost = await Smarthost().start()
    hooks = await WebhookReceiver().start()
    cfg = base_config(smarthost_port=smarthost.port, tracking_port=free_port(), hook_url=hooks.url)
    try:
        async with Gateway(engine, cfg) as gw:
            raw = odoo_mail()
            await gw.send(raw, ["alice@customer.test", "bob@other.test"])
            relayed = await smarthost.wait_for(2)

            # Distinct VERP envelope senders, each naming its own recipient row.
            senders = {r.rcpt_tos[0]: r.mail_from for r in relayed}
            assert set(senders) == {"alice@customer.test", "bob@other.test"}
            assert all(re.fullmatch(r"bounce\+[a-z2-7]+@example\.test", s) for s in senders.values())
            assert len(set(senders.values())) == 2
            rows = {read_verp(SECRET.encode(), s) for s in senders.values()}
            assert None not in rows and len(rows) == 2

            # Pixel and rewritten links; mailto and Odoo-tracked links and pixel untouched.
            by_rcpt = {r.rcpt_tos[0]: r.content for r in relayed}
            alice_html = html_of(by_rcpt["alice@customer.test"])
            base = gw.config.tracking.base_url
            assert f'src="{base}/t/o/' in alice_html
            links = re.findall(r'href="([^"]+)"', alice_html)
            assert any(u.startswith(f"{base}/t/c/") for u in links)
            assert "mailto:sales@example.test" in links
            assert "https://odoo.example.test/r/Xy12/m/9" in links
            assert "https://odoo.example.test/mail/track/9/blank.gif" in alice_html
            assert "https://shop.example.com/quote/1?x=1" not in links  # wrapped
            assert html_of(by_rcpt["bob@other.test"]) != alice_html    # per-recipient tokens
            # The copy keeps Odoo's Message-ID and gets the VERP Return-Path.
            copy = message_from_bytes(by_rcpt["alice@customer.test"], policy=policy.default)
            assert str(copy["Message-Id"]).strip() == message_from_bytes(raw)["Message-Id"].strip()
            assert copy["Return-Path"] == f"<{senders['alice@customer.test']}>"

            # The original Message-ID → Odoo record in the thread index.
            mid = message_from_bytes(raw)["Message-Id"].strip()
            with engine.connect() as conn:
                ti = conn.execute(select(thread_index).where(thread_index.c.message_id == mid)).all()
            assert len(ti) == 1 and ti[0].model == "crm.lead" and ti[0].res_id == 7 and ti[0].outbound

            # The router's helper resolves a VERP address to (recipient, original Message-ID).
            hit = resolve_verp(engine, SECRET, senders["bob@other.test"])
            assert hit is not None and hit.recipient == "bob@other.test" and hit.original_message_id == mid
            assert resolve_verp(engine, SECRET, "bounce+aaaaaaaaaaaaaaaaaaaaaaaaaa@example.test") is None

            await hooks.wait_for(lambda evs: len([e for e in evs if e["type"] == "delivered"]) == 2)

            pixel = re.search(r'src="([^"]+/t/o/[^"]+)"', alice_html).group(1)
            click = next(u for u in links if u.startswith(f"{base}/t/c/")).replace("&amp;", "&")
            async with aiohttp.ClientSession() as http:
                async with http.get(pixel, headers={"User-Agent": "Thunderbird/115"}) as resp:
                    assert resp.status == 200 and resp.content_type == "image/gif"
                    assert "no-store" in resp.headers["Cache-Control"]
                    assert len(await resp.read()) == 43
                async with http.get(pixel) as resp:  # a second open is only counted
                    assert resp.status == 200
                async with http.get(click, allow_redirects=False) as resp:
                    assert resp.status == 302
                    assert resp.headers["Location"] == "https://shop.example.com/quote/1?x=1&y=2"

                # Tampering: another URL under the same token, or an altered token → refused, no event.
                evil = click.split("?u=")[0] + "?u=https%3A%2F%2Fevil.example%2F"
                async with http.get(evil, allow_redirects=False) as resp:
                    assert resp.status == 404
                path = urlsplit(click).path
                token = path.rsplit("/", 1)[1]
                flipped = token[:-1] + ("a" if token[-1] != "a" else "b")
                async with http.get(click.replace(token, flipped), allow_redirects=False) as resp:
                    assert resp.status == 404
                async with http.get(pixel.replace("/t/o/", "/t/o/x"), allow_redirects=False) as resp:
                    assert resp.status == 200  # still an image, but nothing recorded

            await hooks.wait_for(lambda evs: {"opened", "clicked"} <= {e["type"] for e in evs})
            await asyncio.sleep(0.3)
            opened, clicked = hooks.of_type("opened"), hooks.of_type("clicked")
            assert len(opened) == 1 and len(clicked) == 1
            assert opened[0]["mail"]["recipient"] == "alice@customer.test"
            assert opened[0]["mail"]["record"] == {"model": "crm.lead", "id": 7}
            assert opened[0]["mail"]["message_id"] == mid
            assert opened[0]["data"]["machine"] is False
            assert clicked[0]["data"]["url"] == "https://shop.example.com/quote/1?x=1&y=2"
            assert hooks.bad_signatures == 0

            def counts() -> tuple[int, int]:  # repeat hits are flushed from memory every 0.1 s: wait for it
                with engine.connect() as conn:
                    return tuple(conn.execute(select(outbound_recipients.c.opens, outbound_recipients.c.clicks)
                                              .where(outbound_recipients.c.recipient == "alice@customer.test")).one())

            for _ in range(100):
                if counts() == (2, 1):
                    break
                await asyncio.sleep(0.05)
            assert counts() == (2, 1)
            with engine.connect() as conn:
                assert conn.execute(select(func.count()).select_from(events)).scalar() == 4

            # Pull API: bearer token, types filter, cursor.
            async with aiohttp.ClientSession() as http:
                url = f"http://127.0.0.1:{gw.services.tracking_port}/events"
                async with http.get(url) as resp:
                    assert resp.status == 401
                hdr = {"Authorization": "Bearer pull-token-123"}
                async with http.get(url, params={"types": "opened,clicked"}, headers=hdr) as resp:
                    body = await resp.json()
                    assert [e["type"] for e in body["events"]] == ["opened", "clicked"]
                async with http.get(url, params={"after": str(body["next"])}, headers=hdr) as resp:
                    assert (await resp.json())["events"] == []
    finally:
        await hooks.stop()
        await smarthost.stop()


async def test_auth_required_outside_allowed_networks(env, engine):
    smarthost = await Smarthost().start()
    cfg = base_config(smarthost_port=smarthost.port, tracking_port=free_port(),
                      submission_networks=("10.0.0.0/8",), auth=True)
    try:
        async with Gateway(engine, cfg) as gw:
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
                await gw.send(odoo_mail(), ["alice@customer.test"])
            assert refused.value.code == 530
            with pytest.raises(aiosmtplib.SMTPAuthenticationError):
                await gw.send(odoo_mail(), ["alice@customer.test"], username="odoo", password="wrong")
            await gw.send(odoo_mail(), ["alice@customer.test"], username="odoo", password="odoo-pw")
            assert len(await smarthost.wait_for(1)) == 1
    finally:
        await smarthost.stop()


async def test_failed_auth_across_connections_locks_the_address_out(env, engine):
    """3 failures per session close it; an attacker reconnecting gets no more tries once its address has
    `max_auth_failures_per_client` failures in the window — even with the right password."""
    import base64

    smarthost = await Smarthost().start()
    cfg = base_config(smarthost_port=smarthost.port, tracking_port=free_port(),
                      submission_networks=("10.0.0.0/8",), auth=True)
    cfg["listeners"][0]["max_auth_failures_per_client"] = 4

    def plain(password: str) -> str:
        return "AUTH PLAIN " + base64.b64encode(f"\0odoo\0{password}".encode()).decode()

    try:
        async with Gateway(engine, cfg) as gw:
            answers = []
            for _ in range(2):  # 2 failures per connection, 4 in all
                c = await WireClient.connect("127.0.0.1", gw.port)
                await c.reply()
                await c.cmd("EHLO attacker.test")
                answers += [(await c.cmd(plain("guess")))[0] for _ in range(2)]
                c.writer.close()
            assert answers == [535, 535, 535, 535]
            c = await WireClient.connect("127.0.0.1", gw.port)
            await c.reply()
            await c.cmd("EHLO attacker.test")
            code, text = await c.cmd(plain("odoo-pw"))
            assert code == 421 and "too many failed AUTH" in text
            assert await c.reader.read() == b""  # and disconnected
    finally:
        await smarthost.stop()


async def test_submission_sessions_past_the_limit_get_421(env, engine):
    smarthost = await Smarthost().start()
    cfg = base_config(smarthost_port=smarthost.port, tracking_port=free_port())
    cfg["listeners"][0]["max_connections"] = 1
    try:
        async with Gateway(engine, cfg) as gw:
            first = await asyncio.open_connection("127.0.0.1", gw.port)
            assert (await first[0].readline()).startswith(b"220")
            second = await asyncio.open_connection("127.0.0.1", gw.port)
            assert (await second[0].readline()).startswith(b"421 4.7.0")
            assert await asyncio.wait_for(second[0].read(), 2) == b""
            first[1].close()
            for _ in range(50):  # once the server has seen the first one go, Odoo's next mail gets through
                try:
                    await gw.send(odoo_mail(), ["alice@customer.test"])
                    break
                except aiosmtplib.SMTPConnectResponseError:
                    await asyncio.sleep(0.05)
            assert len(await smarthost.wait_for(1)) == 1
    finally:
        await smarthost.stop()


async def test_submission_is_refused_at_mail_from_when_the_spool_disk_is_full(env, engine, tmp_path):
    smarthost = await Smarthost().start()
    cfg = base_config(smarthost_port=smarthost.port, tracking_port=free_port())
    cfg["storage"].update(url=f"sqlite:///{tmp_path}/spool.db", min_free_mb=1 << 40)  # 1 EiB of headroom
    try:
        async with Gateway(engine, cfg) as gw:
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
                await gw.send(odoo_mail(), ["alice@customer.test"])
            assert refused.value.code == 452 and "4.3.1" in refused.value.message
    finally:
        await smarthost.stop()


async def test_smarthost_4xx_defers_and_retries_5xx_bounces(env, engine):
    smarthost = await Smarthost().start()
    smarthost.rcpt_replies["slow@customer.test"] = ["451 4.7.1 Greylisted, try again later"]
    smarthost.rcpt_replies["gone@customer.test"] = ["550 5.1.1 <gone@customer.test>: user unknown"]
    hooks = await WebhookReceiver().start()
    cfg = base_config(smarthost_port=smarthost.port, tracking_port=free_port(), hook_url=hooks.url)
    try:
        async with Gateway(engine, cfg) as gw:
            await gw.send(odoo_mail(to="slow@customer.test, gone@customer.test"),
                          ["slow@customer.test", "gone@customer.test"])
            await hooks.wait_for(lambda evs: {"deferred", "bounced", "delivered"} <= {e["type"] for e in evs})
            deferred = hooks.of_type("deferred")
            assert [e["mail"]["recipient"] for e in deferred] == ["slow@customer.test"]
            assert deferred[0]["data"]["status"] == "4.7.1"
            delivered = hooks.of_type("delivered")
            assert [e["mail"]["recipient"] for e in delivered] == ["slow@customer.test"]
            assert delivered[0]["data"]["attempts"] == 2
            bounced = hooks.of_type("bounced")
            assert len(bounced) == 1 and bounced[0]["mail"]["recipient"] == "gone@customer.test"
            assert bounced[0]["data"]["kind"] == "hard"
            assert bounced[0]["data"]["reason"] == "userunknown"
            assert bounced[0]["data"]["status"] == "5.1.1"
            # Per mail, the receiver saw the events in the order they happened.
            seqs = [e["seq"] for e in hooks.events]
            assert seqs == sorted(seqs)
            with engine.connect() as conn:
                states = dict(conn.execute(select(outbound_recipients.c.recipient, outbound_recipients.c.state)).all())
            assert states == {"slow@customer.test": "delivered", "gone@customer.test": "bounced"}
            assert [r.rcpt_tos for r in smarthost.received] == [["slow@customer.test"]]
    finally:
        await hooks.stop()
        await smarthost.stop()


async def test_webhook_receiver_down_gets_everything_in_order_per_mail(env, engine):
    smarthost = await Smarthost().start()
    hooks = await WebhookReceiver(down=True).start()
    cfg = base_config(smarthost_port=smarthost.port, tracking_port=free_port(), hook_url=hooks.url)
    try:
        async with Gateway(engine, cfg) as gw:
            for res_id in (1, 2, 3):
                await gw.send(odoo_mail(res_id=res_id), ["alice@customer.test", "bob@other.test"])
            relayed = await smarthost.wait_for(6)
            async with aiohttp.ClientSession() as http:
                for r in relayed:
                    pixel = re.search(r'src="([^"]+/t/o/[^"]+)"', html_of(r.content)).group(1)
                    async with http.get(pixel) as resp:
                        assert resp.status == 200
            await asyncio.sleep(1.0)  # receiver down: refusals pile up, retries back off
            assert hooks.refused > 0 and hooks.events == []
            hooks.down = False
            await hooks.wait_for(lambda evs: len(evs) >= 12, timeout=15)
            await asyncio.sleep(0.3)
        with engine.connect() as conn:
            stored = conn.execute(select(events.c.id, events.c.seq, events.c.message_id)).all()
        got = [e["id"] for e in hooks.events]
        assert sorted(set(got)) == sorted(r.id for r in stored)  # every event, none invented
        by_mail: dict[str, list[int]] = {}
        for e in hooks.events:
            by_mail.setdefault(e["mail"]["message_id"], []).append(e["seq"])
        assert len(by_mail) == 3
        for seqs in by_mail.values():
            assert seqs == sorted(seqs)
    finally:
        await hooks.stop()
        await smarthost.stop()


async def test_a_recipient_named_twice_gets_one_copy(env, engine):
    """RCPT TO the same address twice (in any case) queued two copies, and the recipient got the mail twice."""
    smarthost = await Smarthost().start()
    cfg = base_config(smarthost_port=smarthost.port, tracking_port=free_port())
    try:
        async with Gateway(engine, cfg) as gw:
            await gw.send(odoo_mail(to="uma@customer.test"), ["uma@customer.test", "Uma@Customer.test",
                                                              "vic@customer.test"])
            await smarthost.wait_for(2)
            await asyncio.sleep(0.3)  # room for a duplicate to arrive
        assert sorted(r.rcpt_tos[0] for r in smarthost.received) == ["uma@customer.test", "vic@customer.test"]
        with engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(outbound_recipients)).scalar() == 2
    finally:
        await smarthost.stop()


async def test_submission_refuses_a_null_rcpt_and_utf8_addresses_without_smtputf8(env, engine):
    """As the inbound listeners do: a non-ASCII address without SMTPUTF8 on MAIL is 553 5.6.7 (RFC 6531 §3.4),
    and RCPT TO:<> is 501 5.1.3. The submission listener took both: the non-ASCII recipient went out over a
    connection that never said SMTPUTF8, and <> was refused with the code for a malformed address."""
    smarthost = await Smarthost().start()
    cfg = base_config(smarthost_port=smarthost.port, tracking_port=free_port())
    try:
        async with Gateway(engine, cfg) as gw:
            c = await WireClient.connect("127.0.0.1", gw.port)
            assert (await c.reply())[0] == 220
            assert (await c.cmd("EHLO odoo.test"))[0] == 250
            code, text = await c.cmd("MAIL FROM:<bounce@exämple.test>")
            assert code == 553 and text.startswith("5.6.7")
            assert (await c.cmd("MAIL FROM:<bounce@example.test>"))[0] == 250
            code, text = await c.cmd("RCPT TO:<jösé@customer.test>")
            assert code == 553 and text.startswith("5.6.7")
            code, text = await c.cmd("RCPT TO:<>")
            assert code == 501 and text.startswith("5.1.3")
            assert (await c.cmd("RCPT TO:<xavi@customer.test>"))[0] == 250
            assert (await c.send_data(odoo_mail(to="xavi@customer.test")))[0] == 250
            # With SMTPUTF8 on MAIL, the same non-ASCII addresses are taken.
            assert (await c.cmd("MAIL FROM:<bounce@exämple.test> SMTPUTF8"))[0] == 250
            assert (await c.cmd("RCPT TO:<jösé@customer.test>"))[0] == 250
            assert (await c.cmd("RSET"))[0] == 250
            await c.close()
            await smarthost.wait_for(1)
        assert [r.rcpt_tos for r in smarthost.received] == [["xavi@customer.test"]]
        with engine.connect() as conn:
            assert conn.execute(select(outbound_recipients.c.recipient)).scalars().all() == ["xavi@customer.test"]
    finally:
        await smarthost.stop()


def test_recording_a_submission_keeps_one_copy_per_address(engine):
    raw = odoo_mail(to="wes@customer.test")
    plan = RelayPlan(secret=SECRET.encode(), verp_domain="example.test", track=False, tracking_base="http://t")
    with engine.begin() as conn:
        copies = record_submissions(conn, [Submission(raw, "bounce@example.test", (
            "wes@customer.test", "WES@customer.test", "wes@customer.test"), read_submission(raw), plan)])[0]
    assert [c.recipient for c in copies] == ["wes@customer.test"]

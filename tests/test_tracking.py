"""Tracking HTTP: tokens bound to their URL, no open redirect, first-only events, machine-open flags."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json

import pytest
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import insert, select

from gateway.schema import events, outbound_mails, outbound_recipients
from gateway.store import open_store, utcnow
from gateway.tracking import (
    PIXEL_GIF, click_url, is_machine_open, make_tracking_app, pixel_url, read_click_token, read_pixel_token,
)

pytestmark = pytest.mark.events

KEY = b"tracking-test-secret-0123456789"
BASE = "http://t.example.test"


@pytest.fixture
def engine(tmp_path):
    eng = open_store(f"sqlite:///{tmp_path / 't.db'}", synchronous="NORMAL")
    now = utcnow()
    with eng.begin() as conn:
        mail = conn.execute(insert(outbound_mails).values(
            message_id="<m1@odoo>", model="crm.lead", res_id=3, mail_from="bounce@example.test",
            created_at=now)).inserted_primary_key[0]
        conn.execute(insert(outbound_recipients).values(
            id=11, mail=mail, recipient="carol@customer.test", state="delivered",
            delivered_at=now - dt.timedelta(hours=1)))
        conn.execute(insert(outbound_recipients).values(
            id=12, mail=mail, recipient="dave@customer.test", state="delivered", delivered_at=now))
    yield eng
    eng.dispose()


def test_tokens_are_bound_to_row_and_url():
    url = "https://shop.example.com/a?b=1"
    link = click_url(BASE, KEY, 11, url)
    token = link.split("/t/c/")[1].split("?")[0]
    assert read_click_token(KEY, token, url) == 11
    assert read_click_token(KEY, token, url + "&c=2") is None
    assert read_click_token(b"other-secret-xxxxxxxxxxxxxxx", token, url) is None
    assert read_click_token(KEY, token, "javascript:alert(1)") is None
    name = pixel_url(BASE, KEY, 11).rsplit("/", 1)[1]
    assert read_pixel_token(KEY, name) == 11
    assert read_pixel_token(KEY, name.replace(name[2], "z" if name[2] != "z" else "y", 1)) is None
    # An open token is not a click token.
    assert read_click_token(KEY, name.removesuffix(".gif"), url) is None


@pytest.mark.parametrize("ua,ip,age,machine", [
    ("Mozilla/5.0 (Windows NT 10.0) Thunderbird/115.0", "198.51.100.7", 3600, False),
    ("Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)", "66.249.1.1",
     3600, True),
    ("YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html", "98.136.1.1", 3600, True),
    ("Mozilla/5.0", "17.58.1.1", 3600, True),                                   # Apple MPP
    ("Mozilla/5.0 (Macintosh) AppleWebKit/605.1.15", "17.58.1.1", 3600, True),  # Apple's range
    # Outlook for Windows, a person reading an hour later: these were machine opens.
    ("Mozilla/4.0 (compatible; ms-office; MSOffice 16)", "203.0.113.9", 3600, False),
    ("Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17126; Pro)", "203.0.113.9", 3600, False),
    ("Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17126; Pro)", "40.93.5.5", 3600, True),
    ("Mozilla/5.0 (iPhone) Mobile", "40.93.5.5", 3600, True),                   # Exchange Online range
    ("Mozilla/5.0 (iPhone) Mobile", "203.0.113.9", 2, True),                    # within prefetch window
])
def test_machine_open_detection(ua, ip, age, machine):
    now = utcnow()
    assert is_machine_open(ua, ip, now - dt.timedelta(seconds=age), now, 10.0) is machine


@pytest.mark.parametrize("peer, forwarded, expect", [
    ("127.0.0.1", "17.58.1.1", "17.58.1.1"),                        # our nginx in front: the opener
    ("127.0.0.1", "6.6.6.6, 17.58.1.1", "17.58.1.1"),               # what the client wrote itself is not believed
    ("127.0.0.1", "17.58.1.1, 10.0.0.2", "17.58.1.1"),              # through two trusted proxies
    ("203.0.113.9", "17.58.1.1", "203.0.113.9"),                    # not a proxy of ours: its header is ignored
    ("127.0.0.1", None, "127.0.0.1"),
    ("127.0.0.1", "garbage", "garbage"),
])
def test_client_address_believes_only_trusted_proxies(peer, forwarded, expect):
    from gateway.tracking import client_address

    trusted = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("10.0.0.0/8")]
    assert client_address(peer, forwarded, trusted) == expect


async def test_an_apple_proxy_open_behind_our_reverse_proxy_is_a_machine_open(engine):
    app = make_tracking_app(engine, KEY, prefetch_seconds=0)
    async with TestClient(TestServer(app)) as client:  # the test client connects from 127.0.0.1
        human_ua = {"User-Agent": "Mozilla/5.0 (Macintosh) AppleWebKit/605.1.15"}
        await client.get(pixel_url("", KEY, 11), headers={**human_ua, "X-Forwarded-For": "17.58.1.1"})
        await client.get(pixel_url("", KEY, 12), headers={**human_ua, "X-Forwarded-For": "198.51.100.7"})
    with engine.connect() as conn:
        machine = {e.recipient: json.loads(e.data)["machine"] for e in conn.execute(select(events))}
    assert machine == {"carol@customer.test": True, "dave@customer.test": False}


async def test_pixel_click_and_counts(engine):
    app = make_tracking_app(engine, KEY, prefetch_seconds=10.0)
    async with TestClient(TestServer(app)) as client:
        human = {"User-Agent": "Mozilla/5.0 (X11; Linux) Thunderbird/115"}
        path = pixel_url("", KEY, 11)
        for _ in range(3):
            resp = await client.get(path, headers=human)
            assert resp.status == 200 and await resp.read() == PIXEL_GIF
            assert resp.headers["Content-Type"] == "image/gif"
            assert "no-cache" in resp.headers["Cache-Control"] and resp.headers["Pragma"] == "no-cache"
        # dave's copy was delivered a moment ago: his open is a prefetch (machine), then a human open.
        await client.get(pixel_url("", KEY, 12), headers={"User-Agent": "GoogleImageProxy"})
        url = "https://shop.example.com/x?y=1&z=%C3%A9"
        link = click_url("", KEY, 11, url)
        resp = await client.get(link, allow_redirects=False)
        assert resp.status == 302 and resp.headers["Location"] == url
        resp = await client.get(link, allow_redirects=False)
        assert resp.status == 302
        # Open redirect attempts.
        token = link.split("/t/c/")[1].split("?")[0]
        for bad in (f"/t/c/{token}?u=https%3A%2F%2Fevil.test%2F", f"/t/c/{token}", "/t/c/AAAA?u=https%3A%2F%2Fx.test",
                    f"/t/c/{token}?u=javascript%3Aalert(1)"):
            resp = await client.get(bad, allow_redirects=False)
            assert resp.status == 404, bad
            assert "Location" not in resp.headers
        resp = await client.get("/t/o/notatoken.gif")
        assert resp.status == 200 and await resp.read() == PIXEL_GIF

    with engine.connect() as conn:
        counts = dict((r.id, (r.opens, r.clicks)) for r in conn.execute(select(outbound_recipients)))
        evs = conn.execute(select(events).order_by(events.c.seq)).all()
    assert counts == {11: (3, 2), 12: (1, 0)}
    kinds = [(e.type, e.recipient) for e in evs]
    assert kinds == [("opened", "carol@customer.test"), ("opened", "dave@customer.test"),
                     ("clicked", "carol@customer.test")]
    import json
    assert json.loads(evs[0].data)["machine"] is False
    assert json.loads(evs[1].data)["machine"] is True
    assert json.loads(evs[2].data)["url"] == url
    assert evs[0].message_id == "<m1@odoo>" and evs[0].model == "crm.lead" and evs[0].res_id == 3


async def test_a_head_request_is_a_machine_click(engine):
    """Link scanners (Safe Links, Proofpoint) check a URL with HEAD, often with a browser's user agent and
    long after delivery: that was a human `clicked`. A person's later GET still gets its own event."""
    app = make_tracking_app(engine, KEY, prefetch_seconds=0)
    browser = {"User-Agent": "Mozilla/5.0 (Windows NT 10.0) Chrome/120"}
    link = click_url("", KEY, 11, "https://shop.example.com/x")
    async with TestClient(TestServer(app)) as client:
        resp = await client.head(link, headers=browser, allow_redirects=False)
        assert resp.status == 302
        await client.get(link, headers=browser, allow_redirects=False)
    with engine.connect() as conn:
        machine = [json.loads(e.data)["machine"] for e in conn.execute(select(events).order_by(events.c.seq))]
    assert machine == [True, False]


async def test_repeated_hits_are_counted_in_memory_and_wake_the_dispatcher_once(engine):
    """A bot replaying one pixel URL made a write transaction per request (UPDATE and INSERT … ON CONFLICT) and
    woke the webhook dispatcher each time. Now only the first hit writes its event; the others are counted and
    flushed together, and the dispatcher is woken only when an event was inserted."""
    from sqlalchemy import event

    woken: list[int] = []
    writes: list[str] = []

    def seen(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if statement.lstrip().upper().startswith(("INSERT", "UPDATE")):
            writes.append(statement.split()[0])

    app = make_tracking_app(engine, KEY, prefetch_seconds=0, on_event=lambda: woken.append(1))
    event.listen(engine, "before_cursor_execute", seen)
    try:
        async with TestClient(TestServer(app)) as client:
            for _ in range(40):
                resp = await client.get(pixel_url("", KEY, 11), headers={"User-Agent": "Thunderbird/115"})
                assert resp.status == 200 and await resp.read() == PIXEL_GIF
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    with engine.connect() as conn:
        assert conn.execute(select(outbound_recipients.c.opens).where(outbound_recipients.c.id == 11)).scalar() == 40
        assert len(conn.execute(select(events)).all()) == 1
    assert woken == [1]
    assert writes.count("UPDATE") < 10  # counter flushes (the event's INSERT goes through the sqlite3 driver)


async def test_the_pixel_is_answered_while_the_store_is_busy(engine):
    """The image goes out before anything is written: a store that holds its write lock (a long commit
    elsewhere) delayed every mail client's image until busy_timeout. The event is still recorded once the
    lock is released, before the app finishes shutting down."""
    import asyncio

    app = make_tracking_app(engine, KEY, prefetch_seconds=0)
    blocker = engine.connect()
    held = blocker.begin()  # BEGIN IMMEDIATE: the write lock
    try:
        async with TestClient(TestServer(app)) as client:
            resp = await asyncio.wait_for(client.get(pixel_url("", KEY, 11)), timeout=3)
            assert resp.status == 200 and await resp.read() == PIXEL_GIF
            held.rollback()
    finally:
        if held.is_active:
            held.rollback()
        blocker.close()
    with engine.connect() as conn:
        assert [e.type for e in conn.execute(select(events))] == ["opened"]
        assert conn.execute(select(outbound_recipients.c.opens).where(outbound_recipients.c.id == 11)).scalar() == 1


@pytest.mark.parametrize("url", [
    "https://shop.example.com/quote/1?x=1&y=2",
    "https://e.test/%zz?x=%",                       # not valid escapes: yarl re-quoted them as %25zz, %25
    "https://e.test/\u00e9t\u00e9?q=\u00fc",        # yarl percent-encoded them
    "https://e.test/?u=https%3A%2F%2Fother.test",   # yarl decoded the escaped URL inside the query
    "HTTPS://E.TEST/Up",                            # yarl lower-cased scheme and host
    "https://e.test/a+b?q=a+b&r=%2B%20#frag",
])
async def test_the_redirect_goes_to_the_signed_url_byte_for_byte(engine, url):
    """A server that compares its URLs as given (a signed download link) must get exactly the link the mail
    had; `HTTPFound` passed it through yarl, which rewrote it."""
    from yarl import URL

    app = make_tracking_app(engine, KEY, prefetch_seconds=0)
    async with TestClient(TestServer(app)) as client:
        resp = await client.get(URL(click_url("", KEY, 11, url), encoded=True), allow_redirects=False)
        assert resp.status == 302
        assert resp.headers["Location"] == url


async def test_head_probes_are_not_counted_as_opens_or_clicks(engine):
    """Link scanners check every URL of a mail with HEAD, several times: each check raised `opens`/`clicks`.
    A HEAD still records its machine event; only GETs are counted."""
    app = make_tracking_app(engine, KEY, prefetch_seconds=0)
    link = click_url("", KEY, 11, "https://shop.example.com/x")
    async with TestClient(TestServer(app)) as client:
        for _ in range(3):
            assert (await client.head(link, allow_redirects=False)).status == 302
            assert (await client.head(pixel_url("", KEY, 11))).status == 200
        await client.get(link, allow_redirects=False)
    with engine.connect() as conn:
        counts = conn.execute(select(outbound_recipients.c.opens, outbound_recipients.c.clicks)
                              .where(outbound_recipients.c.id == 11)).one()
        kinds = [(e.type, json.loads(e.data)["machine"]) for e in conn.execute(select(events).order_by(events.c.seq))]
    assert tuple(counts) == (0, 1)
    assert kinds == [("clicked", True), ("opened", True), ("clicked", False)]


async def test_tracking_hits_are_counted_by_kind_and_who(engine):
    """`mailgate_tracking_hits_total{kind,who}`: human, machine, and HEAD probes apart."""
    from prometheus_client import REGISTRY

    def count(kind: str, who: str) -> float:
        return REGISTRY.get_sample_value("mailgate_tracking_hits_total", {"kind": kind, "who": who}) or 0.0

    keys = [("open", "human"), ("open", "machine"), ("click", "probe")]
    before = {key: count(*key) for key in keys}
    app = make_tracking_app(engine, KEY, prefetch_seconds=0)
    link = click_url("", KEY, 11, "https://shop.example.com/x")
    async with TestClient(TestServer(app)) as client:
        await client.get(pixel_url("", KEY, 11), headers={"User-Agent": "Thunderbird/115"})
        await client.get(pixel_url("", KEY, 11), headers={"User-Agent": "Thunderbird/115"})
        await client.get(pixel_url("", KEY, 12), headers={"User-Agent": "GoogleImageProxy"})
        await client.head(link, allow_redirects=False)
        await client.get("/t/o/notatoken.gif")  # no valid token: not a hit
    assert {key: count(*key) - before[key] for key in keys} == {
        ("open", "human"): 2, ("open", "machine"): 1, ("click", "probe"): 1}


async def test_a_hit_counts_when_the_handler_is_cancelled_as_it_answers(engine, monkeypatch):
    """A client that closes its connection as soon as it has its image gets its handler cancelled by aiohttp
    (`handler_cancellation`) at the handler's next await: while the answer was still being finished, that lost
    the hit, which was recorded only after. Here the cancellation arrives right as the answer completes."""
    import asyncio

    import gateway.tracking

    real_answer = gateway.tracking.answer

    async def answer_then_cancelled(request, response):  # type: ignore[no-untyped-def]
        await real_answer(request, response)
        raise asyncio.CancelledError

    monkeypatch.setattr(gateway.tracking, "answer", answer_then_cancelled)
    app = make_tracking_app(engine, KEY, prefetch_seconds=0)
    async with TestClient(TestServer(app)) as client:
        resp = await client.get(pixel_url("", KEY, 11), headers={"User-Agent": "Thunderbird/115"})
        assert resp.status == 200 and await resp.read() == PIXEL_GIF
    with engine.connect() as conn:
        assert conn.execute(select(outbound_recipients.c.opens).where(outbound_recipients.c.id == 11)).scalar() == 1
        assert [e.type for e in conn.execute(select(events))] == ["opened"]

"""Delivery details: MX routing with fallback hosts, null MX, give-up horizon, byte-exact DATA with dot-stuffing,
AUTH over STARTTLS, and restart recovery from the store."""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
import ssl
import subprocess
from collections import Counter

import aiosmtplib
import pytest
from aiosmtpd.smtp import SMTP
from sqlalchemy import select, update

from gateway.config import parse_config
from gateway.outbound import DestinationError, OutboundWorker, SmtpResult, SmtpTransport
from gateway.relay import RelayPlan, Submission, read_submission, record_submissions
from gateway.relay_batch import TransactionBatcher
from gateway.relay_service import start_outbound_services
from gateway.schema import events, outbound_queue, outbound_recipients
from gateway.store import open_store
from tests.test_relay_support import SECRET, RawSmtpServer, Smarthost, base_config, free_port, odoo_mail

pytestmark = pytest.mark.events


@pytest.fixture
def engine(tmp_path):
    eng = open_store(f"sqlite:///{tmp_path / 'd.db'}", synchronous="NORMAL")
    yield eng
    eng.dispose()


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("MAILGATE_SECRET", SECRET)
    monkeypatch.setenv("MG_TEST_SUBMIT_PW", "odoo-pw")


def queue_one(engine, config, rcpt: str, raw: bytes | None = None):
    raw = raw or odoo_mail(to=rcpt)
    plan = RelayPlan(secret=SECRET.encode(), verp_domain="example.test", track=False, tracking_base="http://t")
    with engine.begin() as conn:
        return record_submissions(conn, [Submission(raw, "bounce@example.test", (rcpt,), read_submission(raw),
                                                    plan)])[0][0]


def event_types(engine) -> list[tuple[str, str]]:
    with engine.connect() as conn:
        return [(r.type, r.recipient) for r in conn.execute(select(events).order_by(events.c.seq))]


async def test_mx_delivery_tries_hosts_by_preference(engine, env):
    good = await Smarthost().start()
    dead_port = free_port()  # nothing listens here: the first MX is down
    seen: list[str] = []

    async def resolver(domain: str):
        seen.append(domain)
        if domain == "nomail.test":
            raise DestinationError("nomail.test has a null MX", permanent=True, status="5.1.10")
        return [("127.0.0.1", dead_port), ("127.0.0.1", good.port)]

    cfg = parse_config(base_config(smarthost_port=1, tracking_port=free_port(), smarthost=None), base_dir=".")
    batcher = TransactionBatcher(engine)
    worker = OutboundWorker(engine, cfg, SECRET.encode(), batcher, transport=SmtpTransport(cfg, resolver=resolver))
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        worker.submit([queue_one(engine, cfg, "erin@Customer.test"), queue_one(engine, cfg, "x@nomail.test")])
        await good.wait_for(1)
        for _ in range(100):
            if len(event_types(engine)) == 2:
                break
            await asyncio.sleep(0.05)
        assert sorted(event_types(engine)) == [("bounced", "x@nomail.test"), ("delivered", "erin@Customer.test")]
        assert sorted(seen) == ["customer.test", "nomail.test"]
        assert good.received[0].mail_from.startswith("bounce+")
    finally:
        stop.set()
        await task
        await batcher.close()
        await good.stop()


async def test_give_up_after_horizon_is_a_soft_expired_bounce(engine, env):
    host = await Smarthost().start()
    host.rcpt_replies["late@customer.test"] = ["451 4.4.1 try later"] * 5
    cfg = parse_config(base_config(smarthost_port=host.port, tracking_port=free_port(), max_attempts_hours=1),
                       base_dir=".")
    batcher = TransactionBatcher(engine)
    worker = OutboundWorker(engine, cfg, SECRET.encode(), batcher)
    try:
        copy = queue_one(engine, cfg, "late@customer.test")
        assert await worker.deliver(copy) == "deferred"
        # Pretend the mail has been waiting for almost the whole horizon.
        old = copy.__class__(**{**copy.__dict__, "created_at": copy.created_at - dt.timedelta(minutes=60),
                                "attempts": 1})
        assert await worker.deliver(old) == "bounced"
        with engine.connect() as conn:
            rows = conn.execute(select(events.c.type, events.c.data).order_by(events.c.seq)).all()
            assert conn.execute(select(outbound_queue)).first() is None
        assert [r.type for r in rows] == ["deferred", "bounced"]
        assert '"reason": "expired"' in rows[1].data and '"kind": "soft"' in rows[1].data
    finally:
        await batcher.close()
        await host.stop()


async def test_queued_copies_survive_a_restart(engine, env):
    """A copy committed but never sent (crash before delivery) is found by the store poller."""
    host = await Smarthost().start()
    cfg = parse_config(base_config(smarthost_port=host.port, tracking_port=free_port()), base_dir=".")
    queue_one(engine, cfg, "frank@customer.test")
    with engine.begin() as conn:  # the crashed process's lease has run out
        conn.execute(update(outbound_queue).values(lease_until=None))
    stop = asyncio.Event()
    services = await start_outbound_services(cfg, engine, stop)
    try:
        got = await host.wait_for(1)
        assert got[0].rcpt_tos == ["frank@customer.test"]
        for _ in range(100):
            with engine.connect() as conn:
                state = conn.execute(select(outbound_recipients.c.state)).scalar()
            if state == "delivered":
                break
            await asyncio.sleep(0.05)
        assert state == "delivered"
    finally:
        stop.set()
        await services.close()
        await host.stop()


async def test_dot_stuffed_lines_and_8bit_bytes_arrive_unchanged(engine, env):
    host = await Smarthost().start()
    cfg = parse_config(base_config(smarthost_port=host.port, tracking_port=free_port()), base_dir=".")
    raw = (b"From: n@example.test\r\nTo: g@customer.test\r\nSubject: dots\r\nMessage-ID: <dots@odoo>\r\n"
           b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
           b".leading dot\r\n..two dots\r\n.\r\nnot the end\r\n\xc3\xa9t\xc3\xa9\r\n")
    stop = asyncio.Event()
    services = await start_outbound_services(cfg, engine, stop)
    try:
        port = services.submission_ports[0]
        # Two mails on one connection: the DATA reader must not eat the next command.
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port)
        await smtp.connect()
        await smtp.sendmail("bounce@example.test", ["g@customer.test"], raw)
        await smtp.sendmail("bounce@example.test", ["h@customer.test"], raw)
        await smtp.quit()
        got = await host.wait_for(2)
        assert all(r.content == raw for r in got)
    finally:
        stop.set()
        await services.close()
        await host.stop()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
async def test_auth_over_starttls(engine, env, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=localhost", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    host = await Smarthost().start()
    data = base_config(smarthost_port=host.port, tracking_port=free_port(), submission_networks=("10.0.0.0/8",),
                       auth=True)
    data["listeners"][0].update(tls_cert=str(cert), tls_key=str(key))
    cfg = parse_config(data, base_dir=".")
    stop = asyncio.Event()
    services = await start_outbound_services(cfg, engine, stop)
    try:
        port = services.submission_ports[0]
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        # Without TLS, AUTH is refused (credentials never cross in clear).
        plain = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
        await plain.connect()
        with pytest.raises(aiosmtplib.SMTPException):
            await plain.login("odoo", "odoo-pw")
        plain.close()
        await aiosmtplib.send(odoo_mail(to="ivy@customer.test"), sender="bounce@example.test",
                              recipients=["ivy@customer.test"], hostname="127.0.0.1", port=port,
                              start_tls=True, tls_context=ctx, username="odoo", password="odoo-pw")
        assert (await host.wait_for(1))[0].rcpt_tos == ["ivy@customer.test"]
    finally:
        stop.set()
        await services.close()
        await host.stop()


async def test_stale_pooled_connection_is_replaced_not_deferred(engine, env):
    host = await Smarthost(idle_timeout=0.3).start()
    cfg = parse_config(base_config(smarthost_port=host.port, tracking_port=free_port()), base_dir=".")
    batcher = TransactionBatcher(engine)
    worker = OutboundWorker(engine, cfg, SECRET.encode(), batcher)
    try:
        assert await worker.deliver(queue_one(engine, cfg, "jo@customer.test")) == "delivered"
        await asyncio.sleep(0.8)  # the smarthost drops the idle pooled connection
        assert await worker.deliver(queue_one(engine, cfg, "kim@customer.test")) == "delivered"
        assert [r.rcpt_tos for r in host.received] == [["jo@customer.test"], ["kim@customer.test"]]
    finally:
        await worker.transport.close()
        await batcher.close()
        await host.stop()


class SlowTransport:
    """Takes `seconds` per send and always delivers; counts the sends per recipient."""

    def __init__(self, seconds: float, sends: Counter[str]):
        self.seconds = seconds
        self.sends = sends

    async def send(self, mail_from: str, recipient: str, raw: bytes) -> SmtpResult:
        self.sends[recipient] += 1
        await asyncio.sleep(self.seconds)
        return SmtpResult("delivered", 250, "2.0.0", "ok", "mx.test")

    async def close(self) -> None:
        pass


def queue_leased(engine, rcpts: list[str], lease: dt.timedelta):
    """Queue one copy per recipient as the submission listener does, with a fast-path lease of `lease`."""
    plan = RelayPlan(secret=SECRET.encode(), verp_domain="example.test", track=False, tracking_base="http://t")
    subs = [Submission(odoo_mail(to=r), "bounce@example.test", (r,), read_submission(odoo_mail(to=r)), plan)
            for r in rcpts]
    with engine.begin() as conn:
        return [c for copies in record_submissions(conn, subs, lease=lease) for c in copies]


async def wait_for_events(engine, n: int, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if len(event_types(engine)) >= n:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"expected {n} events, got {event_types(engine)}")


def _slow_worker(engine, seconds: float):  # type: ignore[no-untyped-def]
    """A running one-slot worker whose transport takes `seconds` per send and counts sends per recipient."""
    cfg = parse_config(base_config(smarthost_port=1, tracking_port=free_port(), concurrency=1), base_dir=".")
    sends: Counter[str] = Counter()
    worker = OutboundWorker(engine, cfg, SECRET.encode(), TransactionBatcher(engine),
                            transport=SlowTransport(seconds, sends))
    stop = asyncio.Event()
    return cfg, sends, worker, stop, asyncio.create_task(worker.run(stop))


async def test_a_backlog_outlasting_its_lease_is_sent_once(engine, env):
    """The poller must not claim copies this worker still holds (in memory or being sent) when their lease
    runs out during a long backlog: it did, and sent 3 of 4 recipients two copies."""
    cfg, sends, worker, stop, task = _slow_worker(engine, 0.6)
    rcpts = [f"u{i}@customer.test" for i in range(4)]
    try:
        worker.submit(queue_leased(engine, rcpts, dt.timedelta(seconds=1)))
        await wait_for_events(engine, 4)
        await asyncio.sleep(0.5)  # room for a duplicate to show up
        assert sends == {r: 1 for r in rcpts}
        assert sorted(event_types(engine)) == [("delivered", r) for r in rcpts]
    finally:
        stop.set()
        await task
        await worker.batcher.close()


async def test_the_fast_path_holds_a_bounded_backlog_and_hands_the_rest_to_the_store(engine, env, monkeypatch):
    """Odoo submits a mass mailing faster than destinations take it: every copy went into memory (5,000 copies
    of 100 KB held 479 MB). Past the bound the copies go back to the store, unleased, and the poller brings
    them in as slots free up: each recipient still gets exactly one copy."""
    import gateway.outbound as outbound
    from gateway.schema import outbound_queue

    monkeypatch.setattr(outbound, "FASTPATH_PER_SLOT", 5)
    cfg, sends, worker, stop, task = _slow_worker(engine, 0.01)
    rcpts = [f"m{i}@customer.test" for i in range(20)]
    try:
        worker.submit(queue_leased(engine, rcpts, dt.timedelta(minutes=15)))
        assert worker._queue.waiting <= 5 and len(worker._held) <= 6
        await asyncio.sleep(0)  # the release task runs
        await asyncio.gather(*worker._releases)
        with engine.connect() as conn:
            unleased = conn.execute(select(outbound_queue.c.recipient)
                                    .where(outbound_queue.c.lease_until.is_(None))).all()
        assert len(unleased) >= 14  # handed back at once, not after the 15-minute lease
        await wait_for_events(engine, 20)
        assert sends == {r: 1 for r in rcpts}
    finally:
        stop.set()
        await task
        await worker.batcher.close()


async def test_held_copies_keep_their_lease_against_another_node(engine, env):
    """Two nodes share the store: the one holding a backlog renews its leases, so the other never claims
    (and re-sends) those copies however long the backlog takes."""
    cfg = parse_config(base_config(smarthost_port=1, tracking_port=free_port(), concurrency=1), base_dir=".")
    sends: Counter[str] = Counter()
    batcher = TransactionBatcher(engine)
    holder = OutboundWorker(engine, cfg, SECRET.encode(), batcher, transport=SlowTransport(0.6, sends))
    holder.lease_renewal = 0.2
    other = OutboundWorker(engine, cfg, SECRET.encode(), batcher, transport=SlowTransport(0.6, sends))
    stop = asyncio.Event()
    tasks = [asyncio.create_task(holder.run(stop)), asyncio.create_task(other.run(stop))]
    rcpts = [f"v{i}@customer.test" for i in range(4)]
    try:
        holder.submit(queue_leased(engine, rcpts, dt.timedelta(seconds=1)))
        await wait_for_events(engine, 4)
        await asyncio.sleep(0.5)
        assert sends == {r: 1 for r in rcpts}
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        await batcher.close()


async def test_a_refused_smarthost_login_defers_instead_of_bouncing(engine, env, monkeypatch):
    """An expired smarthost password answered 535 to AUTH, which bounced every mail in the queue for good."""
    monkeypatch.setenv("MG_TEST_SMARTHOST_PW", "expired")
    host = await RawSmtpServer(ehlo=("250-raw.test", "250 AUTH PLAIN"),
                               auth="535 5.7.8 Authentication credentials invalid").start()
    cfg = parse_config(base_config(smarthost_port=host.port, tracking_port=free_port(), smarthost_login="odoo",
                                   smarthost_password_env="MG_TEST_SMARTHOST_PW"), base_dir=".")
    transport = SmtpTransport(cfg)
    try:
        result = await transport.send("bounce@example.test", "lee@customer.test", b"Subject: t\r\n\r\nhi\r\n")
        assert (result.outcome, result.status) == ("deferred", "4.7.0")
        assert "535" in result.text and "MAIL" not in host.log
        await asyncio.sleep(0.1)
        assert host.log[-2:] == ["AUTH", "EOF"]  # and the connection was closed, not kept for the next copy
        assert not transport._host_pools[("127.0.0.1", host.port)]
    finally:
        await transport.close()
        await host.stop()


async def test_a_slow_answer_to_the_final_dot_is_waited_for(engine, env):
    """The reply to the final dot got the general timeout: a server that took longer and then accepted the
    mail had it deferred, and every retry delivered it again (RFC 5321 §4.5.3.2.6 gives it 10 minutes)."""
    host = await RawSmtpServer(data_end_delay=1.5).start()
    cfg = parse_config(base_config(smarthost_port=host.port, tracking_port=free_port(), timeout=1.0), base_dir=".")
    transport = SmtpTransport(cfg)
    try:
        result = await transport.send("bounce@example.test", "max@customer.test", b"Subject: t\r\n\r\nhi\r\n")
        assert (result.outcome, result.code) == ("delivered", 250)
        assert host.accepted == 1 and host.log.count("DATA") == 1
    finally:
        await transport.close()
        await host.stop()


async def run_worker_until_events(engine, cfg, copies, n: int, transport=None) -> list[tuple[str, str]]:
    """Start a worker, hand it `copies` by the fast path, and return the events once there are `n`."""
    batcher = TransactionBatcher(engine)
    worker = OutboundWorker(engine, cfg, SECRET.encode(), batcher, transport=transport)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        worker.submit(copies)
        await wait_for_events(engine, n)
        return event_types(engine)
    finally:
        stop.set()
        await task
        await batcher.close()


@pytest.mark.parametrize("rcpt", ["x@foo..bar", "x@" + "l" * 64 + ".test"])
async def test_a_malformed_destination_domain_bounces(engine, env, rcpt):
    """dnspython refused `foo..bar` (or a label over 63 characters) with an exception the transport did not
    catch: the copy stayed leased and came back every 15 minutes forever, never expiring."""
    cfg = parse_config(base_config(smarthost_port=1, tracking_port=free_port(), smarthost=None), base_dir=".")
    assert await run_worker_until_events(engine, cfg, [queue_one(engine, cfg, rcpt)], 1) == [("bounced", rcpt)]
    with engine.connect() as conn:
        data = conn.execute(select(events.c.data)).scalar()
        assert conn.execute(select(outbound_queue)).first() is None
    assert '"status": "5.1.3"' in data and '"kind": "hard"' in data


class BrokenTransport:
    """A transport with a bug: every send raises."""

    async def send(self, mail_from: str, recipient: str, raw: bytes) -> SmtpResult:
        raise RuntimeError("bug in the transport")

    async def close(self) -> None:
        pass


async def test_an_unexpected_error_while_sending_is_a_deferral(engine, env):
    """A copy whose attempt raised kept its lease and was never counted as an attempt, so it could never
    expire; now it is deferred like any temporary failure, with the usual retry schedule."""
    cfg = parse_config(base_config(smarthost_port=1, tracking_port=free_port(), retry_min_seconds=60,
                                   retry_max_seconds=60),
                       base_dir=".")
    copy = queue_one(engine, cfg, "nia@customer.test")
    events_ = await run_worker_until_events(engine, cfg, [copy], 1, transport=BrokenTransport())
    assert events_ == [("deferred", "nia@customer.test")]
    with engine.connect() as conn:
        rcpt = conn.execute(select(outbound_recipients)).one()
        lease = conn.execute(select(outbound_queue.c.lease_until)).scalar()
    assert (rcpt.state, rcpt.attempts, lease) == ("deferred", 1, None)
    assert "bug in the transport" in rcpt.last_result


def mx_config(**outbound):
    return parse_config(base_config(smarthost_port=1, tracking_port=free_port(), smarthost=None, **outbound),
                        base_dir=".")


@pytest.mark.parametrize("starttls", ["220 2.0.0 Ready to start TLS", "454 4.7.0 TLS not available",
                                      "502 5.5.1 Not implemented"])
async def test_an_mx_whose_starttls_fails_gets_the_mail_in_plaintext(env, starttls):
    """Opportunistic TLS had no plaintext fallback: a broken handshake or a 454 deferred the mail on every
    retry until it expired, and a 502 bounced it. Now the MX gets it in plaintext (Postfix's "may" level),
    and the next connection to that host does not try STARTTLS again for a while."""
    mx = await RawSmtpServer(ehlo=("250-raw.test", "250 STARTTLS"), starttls=starttls).start()

    async def resolver(domain: str):
        return [("127.0.0.1", mx.port)]

    transport = SmtpTransport(mx_config(), resolver=resolver)
    try:
        result = await transport.send("bounce@example.test", "ola@customer.test", b"Subject: t\r\n\r\nhi\r\n")
        assert result.outcome == "delivered" and mx.accepted == 1
        assert mx.log[:3] == ["CONNECT", "EHLO", "STARTTLS"] and mx.log.count("CONNECT") == 2
        assert mx.log.index("MAIL") > mx.log.index("CONNECT", 1)  # the mail went on the plaintext connection
        await transport.close()  # no pooled connection: the next copy connects afresh
        assert (await transport.send("bounce@example.test", "pia@customer.test", b"x\r\n")).outcome == "delivered"
        assert mx.log.count("STARTTLS") == 1 and mx.accepted == 2
    finally:
        await transport.close()
        await mx.stop()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
async def test_an_mx_with_working_starttls_gets_the_mail_encrypted(env, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=mx.test", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert), str(key))
    encrypted: list[bool] = []

    class Handler:
        async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
            encrypted.append(session.ssl is not None)
            return "250 2.0.0 Ok: queued"

    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(Handler(), tls_context=ctx, decode_data=False), "127.0.0.1", 0)

    async def resolver(domain: str):
        return [("127.0.0.1", server.sockets[0].getsockname()[1])]

    transport = SmtpTransport(mx_config(), resolver=resolver)
    try:
        result = await transport.send("bounce@example.test", "quinn@customer.test", b"Subject: t\r\n\r\nhi\r\n")
        assert result.outcome == "delivered" and encrypted == [True]
    finally:
        await transport.close()
        server.close()


@pytest.mark.parametrize("refusal", [{"greeting": "421 4.3.2 Busy, try later"},
                                     {"greeting": "554 5.7.1 No SMTP service here"},
                                     {"mail": "451 4.3.0 Local error"}, {"rcpt": "450 4.2.0 Greylisted"},
                                     {"data_end": "451 4.3.0 Queue write failed"}])
async def test_a_temporary_refusal_or_5xx_greeting_falls_over_to_the_next_mx(env, refusal):
    """A 4xx at any stage, or a 5xx greeting (Postfix's smtp_skip_5xx_greeting), ended the attempt at the
    first MX: the backup MX was never tried, and a 554 greeting bounced the mail for good."""
    primary = await RawSmtpServer(**refusal).start()
    backup = await RawSmtpServer().start()

    async def resolver(domain: str):
        return [("127.0.0.1", primary.port), ("127.0.0.1", backup.port)]

    transport = SmtpTransport(mx_config(), resolver=resolver)
    try:
        result = await transport.send("bounce@example.test", "rae@customer.test", b"Subject: t\r\n\r\nhi\r\n")
        assert result.outcome == "delivered" and backup.accepted == 1 and primary.accepted == 0
    finally:
        await transport.close()
        await primary.stop()
        await backup.stop()


async def test_when_every_mx_refuses_for_now_the_last_answer_is_the_deferral(env):
    first = await RawSmtpServer(greeting="554 5.7.1 No SMTP service here").start()
    second = await RawSmtpServer(rcpt="450 4.2.0 Greylisted").start()
    bouncer = await RawSmtpServer(rcpt="550 5.1.1 No such user").start()

    async def resolver(domain: str):
        if domain == "gone.test":
            return [("127.0.0.1", bouncer.port), ("127.0.0.1", second.port)]
        return [("127.0.0.1", first.port), ("127.0.0.1", second.port)]

    transport = SmtpTransport(mx_config(), resolver=resolver)
    try:
        result = await transport.send("bounce@example.test", "sam@customer.test", b"Subject: t\r\n\r\nhi\r\n")
        assert (result.outcome, result.code, result.status) == ("deferred", 450, "4.2.0")
        second.log.clear()
        # A permanent answer to the mail is final: no other MX is asked.
        result = await transport.send("bounce@example.test", "sam@gone.test", b"Subject: t\r\n\r\nhi\r\n")
        assert (result.outcome, result.status) == ("bounced", "5.1.1") and "CONNECT" not in second.log
    finally:
        await transport.close()
        for host in (first, second, bouncer):
            await host.stop()


async def test_no_fall_over_once_the_whole_mail_was_sent(env):
    """No answer to the final dot: the first MX may have taken the mail, so it is deferred, not sent to the
    backup MX as well."""
    primary = await RawSmtpServer(data_end_delay=1.0).start()
    backup = await RawSmtpServer().start()

    async def resolver(domain: str):
        return [("127.0.0.1", primary.port), ("127.0.0.1", backup.port)]

    transport = SmtpTransport(mx_config(), resolver=resolver)
    transport.data_end_timeout = 0.3
    try:
        result = await transport.send("bounce@example.test", "tom@customer.test", b"Subject: t\r\n\r\nhi\r\n")
        assert (result.outcome, result.uncertain) == ("deferred", True) and "CONNECT" not in backup.log
    finally:
        await transport.close()
        await primary.stop()
        await backup.stop()


class SendThenStop:
    """Delivers, after setting `stop`: shutdown begins while the remote MTA answers 250 to the final dot."""

    def __init__(self, stop: asyncio.Event):
        self.stop = stop
        self.closed = False

    async def send(self, mail_from: str, recipient: str, raw: bytes) -> SmtpResult:
        self.stop.set()
        return SmtpResult("delivered", 250, "2.0.0", "queued as X", "mx.test")

    async def close(self) -> None:
        self.closed = True


async def test_shutdown_commits_the_result_of_a_mail_just_sent(engine, env):
    """services.close() cancelled the worker while it was still committing results: with the thread writer,
    a delivered mail stayed `queued` and went out again after the restart."""
    data = base_config(smarthost_port=1, tracking_port=free_port())
    data["tracking"]["enabled"] = False
    data["storage"]["writer"] = "thread"
    cfg = parse_config(data, base_dir=".")
    stop = asyncio.Event()
    transport = SendThenStop(stop)
    services = await start_outbound_services(cfg, engine, stop, transport=transport)
    services.worker.submit([queue_one(engine, cfg, "una@customer.test")])
    await stop.wait()
    await services.close()
    with engine.connect() as conn:
        assert conn.execute(select(outbound_recipients.c.state)).scalar() == "delivered"
        assert conn.execute(select(outbound_queue)).first() is None
    assert transport.closed


async def test_shutdown_lets_a_send_finish_and_releases_copies_never_started(engine, env):
    cfg, sends, worker, stop, task = _slow_worker(engine, 0.5)
    try:
        worker.submit([queue_one(engine, cfg, f"w{i}@customer.test") for i in range(3)])
        while not sends:
            await asyncio.sleep(0.01)
        stop.set()  # the first copy is being sent, two wait in memory
        await task
        with engine.connect() as conn:
            rows = conn.execute(select(outbound_recipients.c.recipient, outbound_recipients.c.state,
                                       outbound_queue.c.lease_until)
                                .outerjoin(outbound_queue, outbound_queue.c.recipient == outbound_recipients.c.id)
                                .order_by(outbound_recipients.c.id)).all()
        assert [tuple(r) for r in rows] == [("w0@customer.test", "delivered", None),
                                            ("w1@customer.test", "queued", None),
                                            ("w2@customer.test", "queued", None)]
        assert sends == {"w0@customer.test": 1}
    finally:
        stop.set()
        await task
        await worker.batcher.close()


class TimedMx:
    """An MX that answers the final dot after `delay` seconds; records when each recipient's mail arrived
    and the most transactions it ever had at once."""

    def __init__(self, delay: float):
        self.delay = delay
        self.arrived: list[tuple[str, float]] = []
        self.active = 0
        self.most_active = 0
        self.server = None
        self.port = 0

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.active -= 1
        self.arrived.append((envelope.rcpt_tos[0], asyncio.get_running_loop().time()))
        return "250 2.0.0 Ok: queued"

    async def start(self) -> "TimedMx":
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: SMTP(self, decode_data=False), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()


async def test_a_slow_destination_does_not_hold_up_the_others(engine, env):
    """A delivery slot took the next copy and then waited on that copy's destination's cap while holding the
    slot: with 2 slots and a cap of 1, six 1-second copies to a slow domain queued ahead of one to a fast domain
    kept both slots waiting on the slow domain, and the fast copy went out after 5 s. Destinations now take
    turns (as with Postfix's qmgr): the slow domain keeps its copies waiting, in order, not the slots."""
    slow, fast = await TimedMx(1.0).start(), await TimedMx(0.0).start()

    async def resolver(domain: str):
        return [("127.0.0.1", slow.port if domain == "slow.test" else fast.port)]

    cfg = mx_config(concurrency=2, per_destination_concurrency=1)
    batcher = TransactionBatcher(engine)
    worker = OutboundWorker(engine, cfg, SECRET.encode(), batcher, transport=SmtpTransport(cfg, resolver=resolver))
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    slow_rcpts = [f"s{i}@slow.test" for i in range(6)]
    try:
        copies = queue_leased(engine, [*slow_rcpts, "f@fast.test"], dt.timedelta(minutes=15))
        started = asyncio.get_running_loop().time()
        worker.submit(copies)
        await wait_for_events(engine, 7, timeout=15)
        [(_, fast_at)] = fast.arrived
        assert fast_at - started < 0.5
        assert [rcpt for rcpt, _ in slow.arrived] == slow_rcpts  # each once, in the order queued
        assert slow.arrived[-1][1] - started > 5.0 and slow.most_active == 1  # the cap still holds
        assert sorted(event_types(engine)) == sorted([("delivered", r) for r in [*slow_rcpts, "f@fast.test"]])
    finally:
        stop.set()
        await task
        await batcher.close()
        await slow.stop()
        await fast.stop()


class DomainDelayTransport:
    """Delivers everything, taking `delays[domain]` seconds (0 when not named); records when each send began."""

    def __init__(self, delays: dict[str, float]):
        self.delays = delays
        self.started: dict[str, float] = {}

    async def send(self, mail_from: str, recipient: str, raw: bytes) -> SmtpResult:
        self.started[recipient] = asyncio.get_running_loop().time()
        await asyncio.sleep(self.delays.get(recipient.rsplit("@", 1)[1], 0.0))
        return SmtpResult("delivered", 250, "2.0.0", "ok", "mx.test")

    async def close(self) -> None:
        pass



async def _seconds_until_started(transport, rcpt: str, since: float) -> float:  # type: ignore[no-untyped-def]
    """How long after `since` the transport started sending to `rcpt` (waits up to 3 s; inf if never)."""
    for _ in range(60):
        if rcpt in transport.started:
            break
        await asyncio.sleep(0.05)
    return transport.started.get(rcpt, float("inf")) - since


def _due_in_order(engine, rcpts: list[str], **values) -> None:  # type: ignore[no-untyped-def]
    """Make every queued copy due (long ago, in the order of `rcpts`) and unleased, with `values` set."""
    with engine.begin() as conn:
        for rid, rcpt in conn.execute(select(outbound_recipients.c.id, outbound_recipients.c.recipient)).all():
            conn.execute(update(outbound_recipients).where(outbound_recipients.c.id == rid).values(
                next_attempt_at=dt.datetime(2020, 1, 1) + dt.timedelta(seconds=rcpts.index(rcpt)), **values))
        conn.execute(update(outbound_queue).values(lease_until=None))

async def test_a_slow_destination_backlog_does_not_keep_other_retries_in_the_store(engine, env):
    """The poller stopped claiming once 4 copies per slot waited in memory, counting those held back by their
    destination's cap: after a restart, 20 due copies to a slow domain kept a fast domain's due copy in the
    store until the slow backlog was nearly through."""
    cfg = mx_config(concurrency=2, per_destination_concurrency=1)
    rcpts = [f"s{i}@slow.test" for i in range(20)] + ["f@fast.test"]
    queue_leased(engine, rcpts, dt.timedelta(0))
    _due_in_order(engine, rcpts)  # a crashed node's copies, due in the order queued
    transport = DomainDelayTransport({"slow.test": 0.5})
    batcher = TransactionBatcher(engine)
    worker = OutboundWorker(engine, cfg, SECRET.encode(), batcher, transport=transport)
    stop = asyncio.Event()
    started = asyncio.get_running_loop().time()
    task = asyncio.create_task(worker.run(stop))
    try:
        assert await _seconds_until_started(transport, "f@fast.test", started) < 1.0
        assert len([r for r in transport.started if r.endswith("@slow.test")]) <= 3  # the cap still holds
    finally:
        stop.set()
        await task
        await batcher.close()


async def test_a_dead_destination_backlog_larger_than_memory_does_not_keep_other_retries_in_the_store(engine, env):
    """Copies of a destination at its cap wait in memory, up to 16 per slot; the poller kept claiming a dead
    domain's due copies (they came first in the store) until that allowance was full and then claimed nothing,
    so with 100 due copies to a dead domain a fast domain's due retry stayed in the store for as long as the
    dead domain took. A destination at its cap with copies waiting is now left out of the claim."""
    cfg = mx_config(concurrency=2, per_destination_concurrency=1)
    rcpts = [f"d{i}@dead.test" for i in range(100)] + ["f@fast.test"]
    queue_leased(engine, rcpts, dt.timedelta(0))
    _due_in_order(engine, rcpts, state="deferred", attempts=1)  # due retries, the dead domain's first
    transport = DomainDelayTransport({"dead.test": 60.0})  # a connect timeout per copy, as a dead MX gives
    batcher = TransactionBatcher(engine)
    worker = OutboundWorker(engine, cfg, SECRET.encode(), batcher, transport=transport)
    worker.drain_seconds = 0.1
    stop = asyncio.Event()
    started = asyncio.get_running_loop().time()
    task = asyncio.create_task(worker.run(stop))
    try:
        assert await _seconds_until_started(transport, "f@fast.test", started) < 1.0
        assert [r for r in transport.started if r.endswith("@dead.test")] == ["d0@dead.test"]  # the cap holds
        await wait_for_events(engine, 1)
        assert event_types(engine) == [("delivered", "f@fast.test")]
    finally:
        stop.set()
        await task
        await batcher.close()


async def test_a_destination_no_host_of_which_answers_is_not_tried_again_for_a_while(env, monkeypatch):
    """Every copy for a dead MX (or smarthost) waited out its own connect timeout, holding a delivery slot.
    Once none of a destination's hosts could be reached, its next copies are deferred at once for
    DEAD_DESTINATION_SECONDS; another destination is not affected, and a host that answers again clears it."""
    import gateway.outbound as outbound

    dead_port = free_port()  # nothing listens here
    good = await RawSmtpServer(ehlo=("250-raw.test", "250 8BITMIME")).start()
    ports = {"down.test": dead_port, "up.test": good.port}
    asked: list[str] = []

    async def resolver(domain: str):
        asked.append(domain)
        return [("127.0.0.1", ports[domain])]

    transport = SmtpTransport(mx_config(), resolver=resolver)
    try:
        first = await transport.send("bounce@example.test", "a@down.test", b"x\r\n")
        assert first.outcome == "deferred" and "cannot connect" in first.text
        second = await transport.send("bounce@example.test", "b@down.test", b"x\r\n")
        assert second.outcome == "deferred" and "destination down" in second.text
        assert asked == ["down.test"]                       # not looked up, not connected to, again
        assert (await transport.send("bounce@example.test", "c@up.test", b"x\r\n")).outcome == "delivered"
        monkeypatch.setattr(outbound, "DEAD_DESTINATION_SECONDS", 0.0)
        transport._down["down.test"] = (0.0, first)        # its time is up: tried again, and now it answers
        ports["down.test"] = good.port
        assert (await transport.send("bounce@example.test", "d@down.test", b"x\r\n")).outcome == "delivered"
        assert "down.test" not in transport._down
    finally:
        await transport.close()
        await good.stop()


async def test_an_mx_address_that_never_answers_does_not_use_up_the_others_time(env, monkeypatch):
    """Connected by name, all of an MX host's addresses shared one timeout: a first address that never greets
    (or a black-holed IPv6 route) used it all up, the working address was never tried, and every retry ended
    the same way. Each address now gets MX_CONNECT_SECONDS, and the next one is tried."""
    import socket as socket_mod

    import gateway.outbound as outbound

    good = await RawSmtpServer(ehlo=("250-raw.test", "250 8BITMIME")).start()
    silent = await asyncio.start_server(lambda r, w: asyncio.sleep(30), "127.0.0.2", good.port)  # no greeting
    real_getaddrinfo = asyncio.get_running_loop().getaddrinfo

    async def getaddrinfo(host, port, *args, **kwargs):  # type: ignore[no-untyped-def]
        if host == "mx.dual.test":
            return [(socket_mod.AF_INET, socket_mod.SOCK_STREAM, 6, "", (ip, port)) for ip in ("127.0.0.2", "127.0.0.1")]
        return await real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(outbound, "MX_CONNECT_SECONDS", 1.5)

    async def resolver(domain: str):
        return [("mx.dual.test", good.port)]

    transport = SmtpTransport(mx_config(timeout=5), resolver=resolver)
    try:
        result = await transport.send("bounce@example.test", "ana@dual.test", b"Subject: t\r\n\r\nhi\r\n")
        assert result.outcome == "delivered", result
        assert good.accepted == 1
    finally:
        await transport.close()
        silent.close()
        await good.stop()

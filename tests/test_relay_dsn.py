"""A copy that fails for good after the relay answered Odoo 250 (5xx, expired retries, null MX) is reported back:
an RFC 3464 DSN to the copy's VERP address goes into the inbound spool, with the failure, in one transaction.
The router maps the VERP address to the recipient and delivery registers a hard bounce in Odoo, as for a bounce
that came back by mail; the relay's `bounced` event and the inbound route's are one event (docs/design.md §16)."""

from __future__ import annotations

import asyncio
import datetime as dt
import email
import json

import aiosmtplib
import pytest
from sqlalchemy import select

from gateway.config import parse_config
from gateway.outbound import Attempt, SmtpResult, failure_dsn, record_results, returns_to_us
from gateway.relay import QueuedCopy, RelayPlan, Submission, read_submission, record_submissions
from gateway.schema import events
from gateway.serve import start_gateway
from gateway.spool import get_raw, list_messages
from gateway.store import open_store
from routing.bounce import VerpHit, classify_bounce
from tests.odoo_double import OdooDouble
from tests.test_relay_support import SECRET, Smarthost, base_config, free_port, odoo_mail

pytestmark = pytest.mark.events

VERP = "bounce+aeaygeanp326ryrya3fa@example.test"
ORIGINAL_MID = "<1.2-openerp-7-crm.lead@odoo-host>"


def failed_copy(mail_from: str = VERP, rcpt_id: int = 1) -> QueuedCopy:
    raw = (f"Message-ID: {ORIGINAL_MID}\r\nFrom: notifications@example.test\r\nTo: gone@customer.test\r\n"
           f"Subject: Your quotation\r\nReturn-Path: <{mail_from}>\r\n\r\nbody\r\n").encode()
    return QueuedCopy(rcpt_id=rcpt_id, recipient="gone@customer.test", mail_id=1, message_id=ORIGINAL_MID,
                      model="crm.lead", res_id=7, mail_from=mail_from, raw=raw,
                      created_at=dt.datetime(2026, 1, 5, tzinfo=dt.timezone.utc))


REFUSED = SmtpResult("bounced", 550, "5.1.1", "5.1.1 <gone@customer.test>: Recipient address rejected: User unknown",
                     "mx.customer.test")


def test_the_dsn_reads_back_as_the_bounce_of_its_verp_recipient() -> None:
    dsn = failure_dsn(failed_copy(), REFUSED, expired=False, reporting_mta="relay.example.test")
    msg = email.message_from_bytes(dsn)
    assert msg.get_content_type() == "multipart/report" and msg["To"] == VERP
    assert msg["X-Mailgate-Loop"] is None  # our loop marker would make the router drop it as our own mail
    report = classify_bounce(msg, verp=VerpHit("gone@customer.test", ORIGINAL_MID))
    assert report is not None
    [bounce] = report.results
    assert (bounce.recipient, bounce.kind, bounce.reason, bounce.status) == \
        ("gone@customer.test", "hard", "userunknown", "5.1.1")
    assert bounce.remote_mta == "mx.customer.test" and "550 5.1.1" in (bounce.diagnostic or "")
    assert ORIGINAL_MID in dsn.decode() and b"Subject: Your quotation" in dsn  # the headers come back


def test_an_expired_copy_gets_a_soft_expired_dsn() -> None:
    last = SmtpResult("deferred", 451, "4.4.1", "cannot connect to mx.customer.test:25")
    dsn = failure_dsn(failed_copy(), last, expired=True, reporting_mta="relay.example.test")
    report = classify_bounce(email.message_from_bytes(dsn), verp=VerpHit("gone@customer.test", ORIGINAL_MID))
    assert report is not None
    [bounce] = report.results
    assert (bounce.kind, bounce.reason, bounce.status) == ("soft", "expired", "4.4.7")


def test_only_a_return_path_of_ours_gets_a_dsn() -> None:
    table = parse_config(base_config(smarthost_port=25, tracking_port=free_port()), base_dir=".").alias_table()
    assert returns_to_us(VERP, table)
    assert returns_to_us("bounce@example.test", table)  # VERP off, Odoo's bounce address in our domain
    assert not returns_to_us("", table) and not returns_to_us("<>", table)  # the null sender
    assert not returns_to_us("bounce@elsewhere.test", table)  # VERP off, a return path that is not ours


def queued(engine) -> QueuedCopy:  # type: ignore[no-untyped-def]
    """A copy recorded as the submission listener records it (its recipient row exists)."""
    raw = odoo_mail(to="gone@customer.test")
    plan = RelayPlan(secret=SECRET.encode(), verp_domain="example.test", track=False, tracking_base="http://t")
    with engine.begin() as conn:
        return record_submissions(conn, [Submission(raw, "bounce@example.test", ("gone@customer.test",),
                                                    read_submission(raw), plan)])[0][0]


def test_recording_a_failure_with_its_dsn_spools_it_once_with_a_null_sender(tmp_path) -> None:
    engine = open_store(f"sqlite:///{tmp_path / 'gw.db'}", synchronous="NORMAL")
    try:
        copy = queued(engine)
        dsn = failure_dsn(copy, REFUSED, expired=False, reporting_mta="relay.example.test")
        attempt = Attempt(copy, REFUSED, 1, None, False, dsn)
        with engine.begin() as conn:
            assert record_results(conn, [attempt]) == ["bounced"]
        with engine.begin() as conn:  # the same result recorded again (a duplicate attempt): no second DSN
            record_results(conn, [attempt])
        [spooled] = list_messages(engine)
        assert (spooled.mail_from, spooled.rcpt_tos, spooled.state) == ("", (copy.mail_from,), "received")
        assert get_raw(engine, spooled.id) == dsn
        with engine.connect() as conn:
            rows = conn.execute(select(events.c.type, events.c.data)).all()
        assert [r.type for r in rows] == ["bounced"]
        assert json.loads(rows[0].data)["via"] == "smtp"
    finally:
        engine.dispose()


def test_no_dsn_is_spooled_without_one(tmp_path) -> None:
    engine = open_store(f"sqlite:///{tmp_path / 'gw.db'}", synchronous="NORMAL")
    try:
        with engine.begin() as conn:
            record_results(conn, [Attempt(failed_copy(mail_from=""), REFUSED, 1, None, False, None)])
        assert list_messages(engine) == []
    finally:
        engine.dispose()


async def test_a_smarthost_refusal_is_registered_as_a_bounce_in_odoo_with_one_event(tmp_path, monkeypatch):
    """Only a `bounced` event was written: no DSN went anywhere, and Odoo (which learns of bounces from bounce
    mail alone) never counted the bounce nor marked the notification."""
    monkeypatch.setenv("MAILGATE_SECRET", SECRET)
    monkeypatch.setenv("MAILGATE_ODOO_PASSWORD", "admin")
    odoo = OdooDouble().start()
    lead = odoo.store.create("crm.lead", {"name": "Chairs", "email_from": "alice@customer.test"})
    partner = odoo.store.create("res.partner", {"name": "Bob", "email": "bob@other.test"})
    raw = odoo_mail(res_id=lead, to="bob@other.test")
    original_mid = f"<368396033905967.1673346177.695352554321289-openerp-{lead}-crm.lead@odoo-host>"
    message = odoo.store.create("mail.message", {"model": "crm.lead", "res_id": lead, "message_id": original_mid,
                                                 "message_type": "comment", "body": "Your quotation"})
    odoo.store.create("mail.notification", {"mail_message_id": message, "res_partner_id": partner,
                                            "notification_status": "sent"})
    smarthost = await Smarthost().start()
    smarthost.rcpt_replies["bob@other.test"] = ["550 5.1.1 <bob@other.test>: Recipient address rejected: User unknown"]
    submission_port, tracking_port = free_port(), free_port()
    config = parse_config({
        "listeners": [{"name": "submission", "kind": "submission", "host": "127.0.0.1", "port": submission_port}],
        "storage": {"url": f"sqlite:///{tmp_path}/gw.db"},
        "admin": {"enabled": False},
        "domains": [{"name": "example.test", "strict": True}],
        "aliases": [{"address": "sales@example.test", "model": "crm.lead"}],
        "odoo": {"url": odoo.url, "db": "mailgate", "login": "admin", "protocol": "jsonrpc", "timeout": 5},
        "outbound": {"smarthost": f"127.0.0.1:{smarthost.port}", "poll_interval": 0.1},
        "tracking": {"base_url": f"http://127.0.0.1:{tracking_port}", "port": tracking_port},
        "events": {"poll_interval": 0.1},
        "worker": {"concurrency": 2, "poll_interval": 0.1, "processes": 0},
    }, base_dir=str(tmp_path))
    gw = await start_gateway(config)
    try:
        await aiosmtplib.send(raw, sender="bounce@example.test", recipients=["bob@other.test"],
                              hostname="127.0.0.1", port=submission_port)
        for _ in range(200):
            spooled = list_messages(gw.engine)
            if spooled and spooled[0].state not in ("received", "routed", "retrying"):
                break
            await asyncio.sleep(0.1)
        [dsn] = list_messages(gw.engine)
        assert dsn.state == "delivered", dsn.last_error
        assert odoo.records("res.partner", [("id", "=", partner)])[0]["message_bounce"] == 1
        [notification] = odoo.records("mail.notification", [("mail_message_id", "=", message)])
        assert notification["notification_status"] == "bounce"
        await asyncio.sleep(0.3)
        with gw.engine.connect() as conn:
            rows = conn.execute(select(events.c.type, events.c.recipient, events.c.data)
                                .where(events.c.type == "bounced")).all()
        assert [(r.recipient, json.loads(r.data)["via"]) for r in rows] == [("bob@other.test", "smtp")]
    finally:
        await gw.stop(drain_seconds=1)
        await smarthost.stop()
        odoo.stop()

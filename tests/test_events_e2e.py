"""Issue 6 end to end, inbound half: what comes back for a mail we relayed becomes the right event.

Odoo (the double) sends a mail to two recipients through the submission port; the relayed copies go to a
smarthost with VERP return paths. Then, through the gateway's SMTP listener: a DSN to one VERP address →
`bounced` for exactly that recipient; a human reply → `replied`; an out-of-office → `auto_replied` only. Every
event reaches a webhook receiver that checks the signature.
"""

from __future__ import annotations

import asyncio
import smtplib

import aiosmtplib
import pytest

from gateway.config import parse_config
from gateway.serve import start_gateway
from tests.odoo_double import OdooDouble
from tests.test_relay_support import HOOK_SECRET, SECRET, Smarthost, WebhookReceiver, free_port, odoo_mail

pytestmark = pytest.mark.events


def dsn_for(verp: str, rcpt: str, original_mid: str) -> bytes:
    b = "rep0rt"
    return (f"From: Mail Delivery System <MAILER-DAEMON@mx.other.test>\r\nTo: {verp}\r\n"
            f"Subject: Undelivered Mail Returned to Sender\r\nMessage-ID: <dsn-{rcpt}@mx.other.test>\r\n"
            "Auto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n"
            f"Content-Type: multipart/report; report-type=delivery-status; boundary=\"{b}\"\r\n\r\n"
            f"--{b}\r\nContent-Type: text/plain\r\n\r\nI'm sorry to have to inform you...\r\n"
            f"--{b}\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.other.test\r\n\r\n"
            f"Final-Recipient: rfc822; {rcpt}\r\nOriginal-Recipient: rfc822;{rcpt}\r\nAction: failed\r\n"
            f"Status: 5.1.1\r\nRemote-MTA: dns; mx.other.test\r\n"
            f"Diagnostic-Code: smtp; 550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown\r\n\r\n"
            f"--{b}\r\nContent-Type: text/rfc822-headers\r\n\r\nMessage-Id: {original_mid}\r\n"
            f"From: notifications@example.test\r\nSubject: Your quotation\r\n\r\n--{b}--\r\n").encode()


def reply_from(sender: str, original_mid: str, *, ooo: bool = False) -> bytes:
    extra = "Auto-Submitted: auto-replied\r\nX-Autoreply: yes\r\n" if ooo else ""
    subject = "Automatic reply: Your quotation" if ooo else "Re: Your quotation"
    tag = "ooo" if ooo else "re"
    return (f"From: {sender}\r\nTo: \"YourCompany Sales\" <catchall@example.test>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{tag}-{sender}>\r\nIn-Reply-To: {original_mid}\r\nReferences: {original_mid}\r\n"
            f"{extra}Date: Sun, 22 Nov 2026 12:00:00 +0000\r\n\r\nThanks!\r\n").encode()


async def test_bounce_reply_and_autoreply_events_for_a_relayed_mail(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MAILGATE_SECRET", SECRET)
    monkeypatch.setenv("MG_TEST_HOOK_SECRET", HOOK_SECRET)
    monkeypatch.setenv("MAILGATE_ODOO_PASSWORD", "admin")
    odoo = OdooDouble().start()
    lead = odoo.store.create("crm.lead", {"name": "Chairs", "email_from": "alice@customer.test"})
    raw = odoo_mail(res_id=lead)
    original_mid = f"<368396033905967.1673346177.695352554321289-openerp-{lead}-crm.lead@odoo-host>"
    assert original_mid.encode() in raw
    odoo.store.create("mail.message", {"model": "crm.lead", "res_id": lead, "message_id": original_mid,
                                       "message_type": "comment", "body": "Your quotation"})
    smarthost = await Smarthost().start()
    hooks = await WebhookReceiver().start()
    smtp_port, submission_port, tracking_port = free_port(), free_port(), free_port()
    config = parse_config({
        "listeners": [
            {"name": "smtp", "kind": "smtp", "host": "127.0.0.1", "port": smtp_port},
            {"name": "submission", "kind": "submission", "host": "127.0.0.1", "port": submission_port},
        ],
        "storage": {"url": f"sqlite:///{tmp_path}/gw.db"},
        "admin": {"enabled": False},
        "domains": [{"name": "example.test", "strict": True}],
        "aliases": [{"address": "sales@example.test", "model": "crm.lead"}],
        "odoo": {"url": odoo.url, "db": "mailgate", "login": "admin", "protocol": "jsonrpc", "timeout": 5},
        "outbound": {"smarthost": f"127.0.0.1:{smarthost.port}", "poll_interval": 0.1},
        "tracking": {"base_url": f"http://127.0.0.1:{tracking_port}", "port": tracking_port},
        "events": {"poll_interval": 0.1, "webhooks": [
            {"name": "seq", "url": hooks.url, "secret_env": "MG_TEST_HOOK_SECRET", "retry_min_seconds": 0.1,
             "retry_max_seconds": 0.3}]},
        "worker": {"concurrency": 2, "poll_interval": 0.1, "processes": 0},
    }, base_dir=str(tmp_path))
    gw = await start_gateway(config)
    try:
        await aiosmtplib.send(raw, sender="bounce@example.test", recipients=["alice@customer.test", "bob@other.test"],
                              hostname="127.0.0.1", port=submission_port)
        relayed = await smarthost.wait_for(2)
        verp = {r.rcpt_tos[0]: r.mail_from for r in relayed}
        await hooks.wait_for(lambda evs: len([e for e in evs if e["type"] == "delivered"]) == 2)

        def _send(data: bytes, sender: str, rcpt: str) -> None:
            with smtplib.SMTP("127.0.0.1", smtp_port) as s:  # smtplib sends MAIL FROM:<> for ""
                s.sendmail(sender, [rcpt], data)

        async def inbound(data: bytes, sender: str, rcpt: str) -> None:
            await asyncio.to_thread(_send, data, sender, rcpt)

        await inbound(dsn_for(verp["bob@other.test"], "bob@other.test", original_mid), "", verp["bob@other.test"])
        await hooks.wait_for(lambda evs: any(e["type"] == "bounced" for e in evs), timeout=20)
        [bounced] = hooks.of_type("bounced")
        assert bounced["mail"]["recipient"] == "bob@other.test"
        assert bounced["mail"]["message_id"] == original_mid
        assert bounced["data"]["kind"] == "hard" and bounced["data"]["reason"] == "userunknown"
        assert bounced["data"]["status"] == "5.1.1"
        assert bounced["data"]["via"] in ("verp", "dsn")  # docs/events.md

        await inbound(reply_from("alice@customer.test", original_mid), "alice@customer.test", "catchall@example.test")
        await hooks.wait_for(lambda evs: any(e["type"] == "replied" for e in evs), timeout=20)
        [replied] = hooks.of_type("replied")
        assert replied["mail"]["message_id"] == original_mid
        assert replied["mail"]["record"] == {"model": "crm.lead", "id": lead}

        await inbound(reply_from("alice@customer.test", original_mid, ooo=True), "", "catchall@example.test")
        await hooks.wait_for(lambda evs: any(e["type"] == "auto_replied" for e in evs), timeout=20)
        await asyncio.sleep(1)
        assert len(hooks.of_type("replied")) == 1          # the out-of-office is not a human reply
        assert len(hooks.of_type("bounced")) == 1          # and nothing bounced twice
        assert hooks.bad_signatures == 0
        # Odoo got the reply on the lead, and no record from the out-of-office.
        assert odoo.records("mail.message", [("message_id", "=", "<re-alice@customer.test>")])[0]["res_id"] == lead
        assert not odoo.records("mail.message", [("message_id", "=", "<ooo-alice@customer.test>")])
        assert len(odoo.records("crm.lead")) == 1
    finally:
        await gw.stop(drain_seconds=1)
        await smarthost.stop()
        await hooks.stop()
        odoo.stop()

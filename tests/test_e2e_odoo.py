"""End to end: a real Postfix → the gateway (`mailgate serve`, a child process) → the Odoo double.

Issue 4's scenarios: a new mail to sales@ creates one lead with its author, attachment and the mail in its
chatter; a reply joins that lead; an auto-reply creates nothing; a hard bounce raises the partner's bounce
count; Odoo down for a while then back → everything delivered once; the gateway SIGKILLed between create and
post → one lead, one post.
"""

from __future__ import annotations

import smtplib
import time
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from tests.gateway_proc import GatewayProcess, base_config, free_port
from tests.odoo_double import OdooDouble
from tests.waiting import wait_until
from tests.postfix import PrivatePostfix, require_postfix

pytestmark = [pytest.mark.postfix, pytest.mark.slow]


def new_lead_mail(n: int = 1) -> bytes:
    msg = EmailMessage()
    msg["From"] = "Carol Customer <carol@client.test>"
    msg["To"] = "sales@example.test"
    msg["Subject"] = f"Quote request {n}"
    msg["Message-ID"] = f"<lead{n}@client.test>"
    msg["Date"] = "Sun, 22 Nov 2026 10:00:00 +0000"
    msg.set_content("Hello, please send a quote for 10 chairs.\n")
    msg.add_attachment(b"%PDF-1.4 fake pdf \x00\xff bytes", maintype="application", subtype="pdf",
                       filename="specs.pdf")
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


def reply_mail(parent_mid: str, n: int = 1) -> bytes:
    return (f"From: Carol Customer <carol@client.test>\r\nTo: catchall@example.test\r\nSubject: Re: Quote\r\n"
            f"Message-ID: <reply{n}@client.test>\r\nIn-Reply-To: {parent_mid}\r\nReferences: {parent_mid}\r\n"
            "Date: Sun, 22 Nov 2026 11:00:00 +0000\r\n\r\nThanks, 12 chairs then.\r\n").encode()


def ooo_mail() -> bytes:
    return ("From: Dave <dave@client.test>\r\nTo: sales@example.test\r\nSubject: Out of office: Quote\r\n"
            "Auto-Submitted: auto-replied\r\nX-Autoreply: yes\r\nMessage-ID: <ooo1@client.test>\r\n"
            "Date: Sun, 22 Nov 2026 11:00:00 +0000\r\n\r\nI am away until Monday.\r\n").encode()


def dsn_mail(original_mid: str, rcpt: str) -> bytes:
    boundary = "dsnboundary"
    return (f"From: MAILER-DAEMON@mx.client.test\r\nTo: bounce@example.test\r\nSubject: Undelivered Mail\r\n"
            f"Message-ID: <dsn1@mx.client.test>\r\nDate: Sun, 22 Nov 2026 12:00:00 +0000\r\nMIME-Version: 1.0\r\n"
            f"Content-Type: multipart/report; report-type=delivery-status; boundary=\"{boundary}\"\r\n\r\n"
            f"--{boundary}\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n"
            f"--{boundary}\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.client.test\r\n\r\n"
            f"Final-Recipient: rfc822; {rcpt}\r\nAction: failed\r\nStatus: 5.1.1\r\n"
            f"Diagnostic-Code: smtp; 550 5.1.1 <{rcpt}>: user unknown\r\n\r\n"
            f"--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\nMessage-ID: {original_mid}\r\n"
            f"From: sales@example.test\r\nTo: {rcpt}\r\nSubject: Your quote\r\n\r\n--{boundary}--\r\n").encode()


class Stack:
    def __init__(self, tmp: Path, mode: str = "passthrough"):
        require_postfix()
        self.odoo = OdooDouble().start()
        self.gw = GatewayProcess(tmp, base_config(tmp, smtp_port=free_port(), admin_port=free_port(),
                                                  odoo_url=self.odoo.url, mode=mode))
        self.gw.start()
        self.pf = PrivatePostfix(domain="example.test", relay_port=self.gw.smtp_port).start()

    def send(self, raw: bytes, to: list[str], sender: str = "carol@client.test") -> None:
        with smtplib.SMTP("127.0.0.1", self.pf.port) as s:
            s.sendmail(sender, to, raw)

    def close(self) -> None:
        self.pf.stop()
        self.gw.stop()
        self.odoo.stop()


@pytest.fixture(params=["passthrough", "explicit"])
def stack(tmp_path: Path, request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    s = Stack(tmp_path, request.param)
    yield s
    s.close()


def test_lead_reply_autoreply_bounce(stack: Stack) -> None:
    odoo = stack.odoo
    carol = odoo.add_partner("Carol Customer", "carol@client.test")
    stack.send(new_lead_mail(), ["sales@example.test"])
    [lead] = wait_until(lambda: odoo.records("crm.lead"), what="a lead")
    posts = wait_until(lambda: [m for m in odoo.messages_on("crm.lead", lead["id"])
                                if m.get("message_id") == "<lead1@client.test>"], what="the mail in the chatter")
    assert len(posts) == 1 and posts[0]["author_id"] == carol
    atts = odoo.records("ir.attachment", [("res_model", "in", ["mail.message", "crm.lead"])])
    assert any(a.get("name") == "specs.pdf" for a in atts)

    stack.send(reply_mail("<lead1@client.test>"), ["catchall@example.test"])
    wait_until(lambda: [m for m in odoo.messages_on("crm.lead", lead["id"])
                        if m.get("message_id") == "<reply1@client.test>"], what="the reply on the lead")
    assert len(odoo.records("crm.lead")) == 1

    stack.send(ooo_mail(), ["sales@example.test"], sender="dave@client.test")
    time.sleep(2)
    assert len(odoo.records("crm.lead")) == 1
    assert not odoo.records("mail.message", [("message_id", "=", "<ooo1@client.test>")])

    bob = odoo.add_partner("Bob", "bob@client.test")
    stack.send(dsn_mail("<lead1@client.test>", "bob@client.test"), ["bounce@example.test"], sender="")
    wait_until(lambda: (odoo.records("res.partner", [("id", "=", bob)])[0].get("message_bounce") or 0) >= 1,
               what="bob's bounce count")
    time.sleep(1)
    assert odoo.records("res.partner", [("id", "=", bob)])[0]["message_bounce"] == 1
    assert len(odoo.records("crm.lead")) == 1


def test_odoo_down_then_back_delivers_everything_once(tmp_path: Path) -> None:
    s = Stack(tmp_path, "passthrough")
    try:
        s.odoo.go_down()
        for i in range(10):
            s.send(new_lead_mail(i), ["sales@example.test"])
        time.sleep(8)  # workers retry with backoff while Odoo refuses connections
        assert s.odoo.records("crm.lead") == []
        s.odoo.come_up()
        wait_until(lambda: len(s.odoo.records("crm.lead")) >= 10, timeout=60, what="10 leads")
        time.sleep(2)
        leads = s.odoo.records("crm.lead")
        assert sorted(lead["name"] for lead in leads) == sorted(f"Quote request {i}" for i in range(10))
        mids = [m["message_id"] for m in s.odoo.records("mail.message") if m.get("message_id", "").startswith("<lead")]
        assert sorted(mids) == sorted(f"<lead{i}@client.test>" for i in range(10))
    finally:
        s.close()


def test_killed_between_create_and_post_makes_one_lead_one_post(tmp_path: Path) -> None:
    s = Stack(tmp_path, "explicit")
    try:
        killed: list[bool] = []
        original = s.odoo.m_message_post

        def post_after_kill(*args: Any, **kwargs: Any) -> Any:
            if not killed:
                killed.append(True)
                s.gw.kill()  # the gateway dies after message_new, before message_post reached Odoo
                raise ConnectionError("gateway gone")
            return original(*args, **kwargs)

        s.odoo.m_message_post = post_after_kill  # type: ignore[method-assign]
        s.send(new_lead_mail(7), ["sales@example.test"])
        wait_until(lambda: killed, what="the kill")
        assert len(s.odoo.records("crm.lead")) == 1
        s.gw.start()  # the lease expires and the restarted gateway resumes at the post
        wait_until(lambda: s.odoo.records("mail.message", [("message_id", "=", "<lead7@client.test>")]),
                   timeout=60, what="the post after restart")
        time.sleep(2)
        assert len(s.odoo.records("crm.lead")) == 1
        assert len(s.odoo.records("mail.message", [("message_id", "=", "<lead7@client.test>")])) == 1
    finally:
        s.close()

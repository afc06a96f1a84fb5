"""One outbound SMTP transaction as the delivery worker runs it (MAIL/RCPT/DATA through aiosmtplib's command
API): what each refusal becomes, the SIZE and SMTPUTF8 parameters, and the DATA payload on the wire."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP

from gateway.config import parse_config
from gateway.outbound import SmtpTransport, bounce_kind, bounce_reason, classify_reply, order_mx, wire_payload
from routing.bounce_status import classify_status
from tests.test_relay_support import base_config, free_port

pytestmark = pytest.mark.events


@dataclass
class ScriptedHost:
    """An aiosmtpd server whose MAIL/RCPT/DATA answers the test sets; it records what it was sent."""

    mail_reply: str = "250 OK"
    rcpt_reply: str = "250 OK"
    data_reply: str = "250 2.0.0 Ok: queued"
    utf8: bool = False
    commands: list[str] = field(default_factory=list)
    received: list[tuple[str, list[str], list[str], bytes]] = field(default_factory=list)
    server: Any = None
    port: int = 0

    async def handle_MAIL(self, server, session, envelope, address, mail_options):  # type: ignore[no-untyped-def]
        self.commands.append("MAIL")
        if self.mail_reply.startswith("250"):
            envelope.mail_from = address
            envelope.mail_options.extend(mail_options)
        return self.mail_reply

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # type: ignore[no-untyped-def]
        self.commands.append("RCPT")
        if self.rcpt_reply.startswith("25"):
            envelope.rcpt_tos.append(address)
        return self.rcpt_reply

    async def handle_RSET(self, server, session, envelope):  # type: ignore[no-untyped-def]
        self.commands.append("RSET")
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        self.commands.append("DATA")
        self.received.append((envelope.mail_from, list(envelope.mail_options), list(envelope.rcpt_tos),
                              envelope.original_content))
        return self.data_reply

    async def start(self) -> "ScriptedHost":
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: SMTP(self, decode_data=False, enable_SMTPUTF8=self.utf8, hostname="host.test"), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()


async def send(host: ScriptedHost, mail_from: str, rcpt: str, raw: bytes, *,  # type: ignore[no-untyped-def]
               mx: bool = False):
    """Through `host` as the smarthost, or (`mx`) as the recipient domain's MX."""
    async def resolver(domain: str) -> list[tuple[str, int]]:
        return [("127.0.0.1", host.port)]

    outbound = {"smarthost": None} if mx else {}
    transport = SmtpTransport(parse_config(base_config(smarthost_port=host.port, tracking_port=free_port(),
                                                       **outbound), base_dir="."), resolver=resolver)
    try:
        return await transport.send(mail_from, rcpt, raw)
    finally:
        await transport.close()


MAIL = b"Subject: t\r\nMessage-ID: <t@x>\r\n\r\n.leading dot\r\nbody\r\n"


async def test_delivered_with_size_and_the_payload_unstuffed_on_arrival() -> None:
    host = await ScriptedHost().start()
    try:
        result = await send(host, "bounce+abc@example.test", "jo@customer.test", MAIL)
        assert (result.outcome, result.code, result.status) == ("delivered", 250, "2.0.0")
        mail_from, options, rcpts, content = host.received[0]
        assert (mail_from, rcpts, content) == ("bounce+abc@example.test", ["jo@customer.test"], MAIL)
        assert f"SIZE={len(MAIL)}" in options  # RFC 1870: the message size before dot-stuffing
    finally:
        await host.stop()


@pytest.mark.parametrize("stage,reply,outcome,status", [
    ("mail_reply", "553 5.1.8 Sender domain rejected", "bounced", "5.1.8"),
    ("rcpt_reply", "550 5.1.1 No such user", "bounced", "5.1.1"),
    ("rcpt_reply", "450 4.2.0 Greylisted, come back later", "deferred", "4.2.0"),
    ("data_reply", "552 5.3.4 Message too big", "bounced", "5.3.4"),
    ("data_reply", "451 4.3.0 Try again", "deferred", "4.3.0"),
])
async def test_each_refusal_becomes_its_outcome(stage: str, reply: str, outcome: str, status: str) -> None:
    host = await ScriptedHost(**{stage: reply}).start()
    try:
        # To an MX: a smarthost's refusal of MAIL FROM is about our setup and deferred (test_relay_smarthost_setup).
        result = await send(host, "bounce@example.test", "jo@customer.test", MAIL, mx=True)
        assert (result.outcome, result.code, result.status) == (outcome, int(reply[:3]), status)
        assert reply[4:] in result.text
        if stage != "data_reply":  # a refused envelope is reset; nothing was handed over
            assert host.commands[-1] == "RSET" and not host.received
    finally:
        await host.stop()


async def test_non_ascii_address_needs_smtputf8() -> None:
    plain = await ScriptedHost(utf8=False).start()
    utf8 = await ScriptedHost(utf8=True).start()
    try:
        refused = await send(plain, "bounce@example.test", "jörg@customer.test", MAIL)
        assert (refused.outcome, refused.code, refused.status) == ("bounced", 553, "5.6.7")
        assert plain.commands == []  # refused before MAIL: the server could not have taken it
        result = await send(utf8, "bounce@example.test", "jörg@customer.test", MAIL)
        assert result.outcome == "delivered"
        _, options, rcpts, _ = utf8.received[0]
        assert "SMTPUTF8" in options and rcpts == ["jörg@customer.test"]
    finally:
        await plain.stop()
        await utf8.stop()


async def test_an_idn_domain_with_an_ascii_local_part_goes_as_its_a_label_without_smtputf8() -> None:
    """`info@bücher.example` bounced 5.6.7 at a server without SMTPUTF8; its A-label form needs none."""
    plain = await ScriptedHost(utf8=False).start()
    try:
        result = await send(plain, "bounce@bücher.example", "info@bücher.example", MAIL)
        assert result.outcome == "delivered"
        mail_from, options, rcpts, _ = plain.received[0]
        assert (mail_from, rcpts) == ("bounce@xn--bcher-kva.example", ["info@xn--bcher-kva.example"])
        assert "SMTPUTF8" not in options
        refused = await send(plain, "bounce@example.test", "jörg@bücher.example", MAIL)
        assert (refused.outcome, refused.status) == ("bounced", "5.6.7")  # a non-ASCII local part still needs it
    finally:
        await plain.stop()


def test_wire_payload_normalises_only_what_needs_it_and_dot_stuffs() -> None:
    assert wire_payload(b"a\r\nb\r\n") == (b"a\r\nb\r\n.\r\n", 6)
    assert wire_payload(b"a\nb") == (b"a\r\nb\r\n.\r\n", 6)          # bare LF, no final line break
    assert wire_payload(b"a\rb\r\n") == (b"a\r\nb\r\n.\r\n", 6)      # bare CR
    assert wire_payload(b".x\r\n..y\r\n.\r\n") == (b"..x\r\n...y\r\n..\r\n.\r\n", 12)  # size before stuffing
    assert wire_payload(b"") == (b"\r\n.\r\n", 2)


def test_mx_hosts_of_equal_preference_come_in_random_order() -> None:
    """RFC 5321 §5.1: equal-preference MX hosts are tried in random order, so load spreads across them; we
    always tried them in the order DNS gave, hammering the first."""
    records = [(20, "c.mx.test."), (10, "a.mx.test."), (10, "b.mx.test."), (10, "d.mx.test."), (5, "z.mx.test.")]
    orders = [order_mx(records) for _ in range(200)]
    assert all(o is not None and o[0] == "z.mx.test" and o[-1] == "c.mx.test" for o in orders)
    assert {o[1] for o in orders if o} == {"a.mx.test", "b.mx.test", "d.mx.test"}


@pytest.mark.parametrize("code,text,status,reason", [
    (550, "Your IP 5.9.1.10 is listed at a DNSBL", "5.0.0", None),  # an address, not a status code
    (450, "5.1.1 <jo@customer.test>: user unknown", "4.0.0", None),  # class disagrees: the 450 counts
    (550, "5.1.10 Recipient address has null MX", "5.1.10", "notaccept"),
    (550, "5.1.1: no such user", "5.1.1", "userunknown"),
    (451, " 4.7.1 greylisted\nsecond line 5.7.1", "4.7.1", None),
])
def test_the_enhanced_status_code_is_read_only_where_it_belongs(code: int, text: str, status: str,
                                                                 reason: str | None) -> None:
    """RFC 3463: the enhanced code opens the reply text and its class is the reply code's; a number later in
    the text (an IP address) or a contradicting class was taken as the status, and a null MX's 5.1.10 was
    reported as an unknown user."""
    result = classify_reply(code, text)
    assert result.status == status
    if reason is not None:  # None: only the status code is the point of the case
        assert bounce_reason(result) == reason


@pytest.mark.parametrize("code,text,reason,kind", [
    (550, "5.7.1 Service unavailable; client host [192.0.2.9] blocked using zen.spamhaus.org", "blocked", "soft"),
    (554, "5.7.1 Message rejected as spam", "spamdetected", "soft"),
    (550, "5.7.26 Unauthenticated email from example.test is not accepted due to DMARC policy",
     "securityerror", "soft"),
    (552, "5.3.4 Message size exceeds fixed limit", "mesgtoolarge", "soft"),
    (554, "Transaction failed", "undefined", "soft"),
    (530, "5.7.0 Authentication required", "securityerror", "soft"),
    (552, "5.2.2 Mailbox full", "mailboxfull", "soft"),
    (550, "5.1.1 <gone@customer.test>: Recipient address rejected: User unknown", "userunknown", "hard"),
    (550, "5.1.10 Recipient address has null MX", "notaccept", "hard"),
])
def test_an_smtp_refusal_gets_the_reason_and_kind_the_dsn_classifier_gives(code: int, text: str, reason: str,
                                                                           kind: str) -> None:
    """Every 5xx but a full mailbox was a hard bounce here, while the same refusal coming back as a DSN was
    soft (blocklists, spam, DMARC, size, a bare 554): one policy refusal got a good address blacklisted."""
    result = classify_reply(code, text)
    assert (bounce_reason(result), bounce_kind(result, bounce_reason(result))) == (reason, kind)
    assert (reason, kind) == classify_status(result.status, text)

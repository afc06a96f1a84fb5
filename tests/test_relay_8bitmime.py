"""8-bit mail on the wire (RFC 6152): declared with BODY=8BITMIME where the server offers 8BITMIME, converted to
7 bits where it does not (routing.rewrite.downgrade_8bit), deferred when it cannot be converted faithfully."""

from __future__ import annotations

from email import message_from_bytes, policy
from email.message import EmailMessage

import pytest

from gateway.config import parse_config
from gateway.outbound import SmtpTransport
from routing.rewrite import downgrade_8bit
from tests.test_relay_support import RawSmtpServer, Smarthost, base_config, free_port

pytestmark = pytest.mark.events

EIGHT_BIT_HTML = ("From: a@example.test\r\nTo: b@dest.test\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
                  "Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
                  "<p>Grüße aus Köln</p>\r\n.a dot\r\n").encode()


def odoo_8bit() -> bytes:
    m = EmailMessage(policy=policy.SMTP)
    m["From"], m["To"], m["Subject"] = "a@example.test", "b@dest.test", "Grüße"  # the header is RFC 2047 encoded
    m.set_content("Grüße\nline two\n", cte="8bit")
    m.add_alternative("<p>Grüße</p>\n", subtype="html", cte="8bit")
    m.add_attachment(b"\x00\xff binary \x80", maintype="application", subtype="octet-stream", cte="8bit",
                     filename="x.bin")
    return m.as_bytes()


async def send(port: int, raw: bytes):  # type: ignore[no-untyped-def]
    transport = SmtpTransport(parse_config(base_config(smarthost_port=port, tracking_port=free_port()),
                                           base_dir="."))
    try:
        return await transport.send("bounce@example.test", "b@dest.test", raw)
    finally:
        await transport.close()


def leaves(raw: bytes) -> list[tuple[str, object]]:
    msg = message_from_bytes(raw, policy=policy.default)
    return [(p.get_content_type(), p.get_content()) for p in msg.walk() if not p.is_multipart()]


async def test_8bit_mail_is_declared_to_a_server_offering_8bitmime() -> None:
    """The transport never sent BODY=8BITMIME, though it sent 8-bit data."""
    host = await RawSmtpServer(ehlo=("250-raw.test", "250-8BITMIME", "250 SIZE 100000")).start()
    try:
        assert (await send(host.port, EIGHT_BIT_HTML)).outcome == "delivered"
        assert (await send(host.port, b"Subject: plain\r\n\r\nascii\r\n")).outcome == "delivered"
        mails = [line for line in host.lines if line.startswith("MAIL")]
        assert "BODY=8BITMIME" in mails[0] and "BODY" not in mails[1]
        assert host.data[0] == EIGHT_BIT_HTML.replace(b"\r\n.a", b"\r\n..a")  # unchanged (dot-stuffed)
    finally:
        await host.stop()


@pytest.mark.parametrize("raw", [EIGHT_BIT_HTML, odoo_8bit()])
async def test_8bit_mail_is_converted_for_a_server_without_8bitmime(raw: bytes) -> None:
    """It was sent as it was: 8-bit bytes to a server that had not offered 8BITMIME (RFC 6152 §3)."""
    host = await RawSmtpServer().start()  # EHLO: SIZE only
    try:
        assert (await send(host.port, raw)).outcome == "delivered"
        [wire] = host.data
        assert wire.isascii() and "BODY" not in next(line for line in host.lines if line.startswith("MAIL"))
        received = wire.replace(b"\r\n..", b"\r\n.")
        assert leaves(received) == leaves(raw)  # every part decodes to what was sent
    finally:
        await host.stop()


async def test_8bit_headers_to_a_server_without_8bitmime_are_deferred() -> None:
    host = await RawSmtpServer().start()
    try:
        result = await send(host.port, "Subject: Grüße\r\n\r\nGrüße\r\n".encode())
        assert (result.outcome, result.status) == ("deferred", "4.6.3")
        assert "8BITMIME" in result.text and not host.data
    finally:
        await host.stop()


async def test_8bit_mail_reaches_an_aiosmtpd_smarthost_unchanged() -> None:
    host = await Smarthost().start()
    try:
        assert (await send(host.port, EIGHT_BIT_HTML)).outcome == "delivered"
        assert host.received[0].content == EIGHT_BIT_HTML
    finally:
        await host.stop()


@pytest.mark.parametrize("raw", [
    b"DKIM-Signature: v=1; d=example.test; b=x\r\n" + EIGHT_BIT_HTML,                       # re-encoding breaks it
    b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; boundary="S"\r\n\r\n'
    b"--S\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n\xc3\xa4\r\n"
    b"--S--\r\n",                                                                          # signed entity
    b"Content-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\n\xc3\xa4\r\n",                # message/* stays 8-bit
    b"Content-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n\xc3\xa4\r\n",  # broken QP
])
def test_what_cannot_be_converted_faithfully_is_left_to_the_caller(raw: bytes) -> None:
    assert downgrade_8bit(raw) is None


def test_only_8bit_parts_change_and_7bit_mail_is_returned_as_is() -> None:
    seven = b"Subject: s\r\n\r\nascii\r\n"
    assert downgrade_8bit(seven) is seven
    raw = (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"B\"\r\nContent-Transfer-Encoding: 8bit"
           b"\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\nplain ascii\r\n--B\r\nContent-Type: text/plain; "
           b"charset=utf-8\r\n\r\n\xc3\xa4\r\n--B--\r\n")
    out = downgrade_8bit(raw)
    assert out is not None and out.isascii()
    assert out.split(b"\r\n\r\n", 1)[0].endswith(b"\r\nContent-Transfer-Encoding: 7bit")
    assert b"--B\r\nContent-Type: text/plain\r\n\r\nplain ascii\r\n--B" in out
    assert leaves(out) == leaves(raw)

"""routing/parse.py: tolerant header parsing, charsets, limits, and content extraction."""

from __future__ import annotations

import datetime as dt

import pytest

from routing.parse import (decode_bytes, decode_header_value, extract_content, header_text, parse_mail,
                           sanitize_filename)


def _mail(headers: str, body: str = "body\r\n") -> bytes:
    return (headers.strip().replace("\n", "\r\n") + "\r\n\r\n" + body).encode("utf-8")


def test_addresses_lower_cased_in_header_order_without_duplicates():
    p = parse_mail(_mail("""
From: "Alice Doe" <Alice@Client.NET>
To: Sales <SALES@Example.com>, b@example.com
Cc: b@example.com, =?utf-8?q?A=2C_B?= <ab@example.com>
Delivered-To: catchall@example.com
Resent-To: r@example.com
Message-ID: <m1@client.net>
Subject: hi
"""))
    assert p.from_addr == "alice@client.net" and p.from_name == "Alice Doe"
    assert p.to == ("sales@example.com", "b@example.com")
    assert p.cc == ("b@example.com", "ab@example.com")
    assert p.delivered_to == ("catchall@example.com",)
    assert p.resent_to == ("r@example.com",)
    assert p.message_id == "<m1@client.net>"


def test_rfc2047_subject_and_raw_8bit_header_decoded():
    raw = (b"From: a@b.c\r\nSubject: =?iso-8859-1?q?caf=E9?= and =?utf-8?b?8J+Ygw==?=\r\n"
           b"X-Raw: caf\xc3\xa9\r\n\r\nx")
    p = parse_mail(raw)
    assert p.subject == "café and 😃"
    assert p.header("X-Raw") == "café"


def test_unknown_charset_never_raises():
    # Odoo fails the whole mail with LookupError here (spec §1.1).
    p = parse_mail(b"From: a@b.c\r\nSubject: =?x-nonsense?q?caf=C3=A9?=\r\n\r\nx")
    assert p.subject == "café"
    assert decode_header_value("=?iso-8859-8-i?q?=F9=EC=E5=ED?=") == "שלום"


@pytest.mark.parametrize("header, field, text", [
    # codecs that are no charset: bytes-to-bytes (bz2, hex, zlib) and rot13 raise LookupError on bytes.decode
    (b"Subject: =?bz2?B?/w==?=", "subject", "\xff"),
    (b"Subject: =?hex?q?=FF?=", "subject", "\xff"),
    (b"Subject: =?rot13?q?uryyb?=", "subject", "uryyb"),
    # text codecs that raise UnicodeError (not UnicodeDecodeError) and refuse the "replace" handler
    (b"Subject: =?punycode?q?=FF=FE?=", "subject", "\xff\xfe"),
    (b"From: =?idna?q?=FF?= <a@b.c>", "from_name", "\xff"),
    # a NUL in the name: codecs.lookup raises ValueError
    (b"Subject: =?x\x00y?q?hi?=", "subject", "hi"),
])
def test_charset_naming_no_text_encoding_never_raises(header: bytes, field: str, text: str):
    p = parse_mail(b"To: sales@example.com\r\n" + header + b"\r\n\r\nhi\r\n")
    assert getattr(p, field) == text


@pytest.mark.parametrize("charset", ["idna", "punycode", "bz2", "uu", "rot13", "x\x00y"])
def test_decode_bytes_with_odd_charset_falls_back_to_text(charset: str):
    assert decode_bytes(b"caf\xe9", charset) == "caf\xe9"
    assert decode_bytes(b"\xff", charset) == "\xff"


def test_mislabelled_charset_falls_back_to_a_guess():
    assert decode_bytes("héllo wörld, ça va très bien".encode("utf-8"), "us-ascii") == "héllo wörld, ça va très bien"
    assert decode_bytes(b"caf\xe9", None) == "café"


def test_folded_message_id_normalised():
    p = parse_mail(b"Message-ID:\r\n <abc\r\n def@x>\r\nFrom: a@b.c\r\n\r\n")
    assert p.message_id == "<abcdef@x>"


def test_missing_headers_recorded_as_defects_not_raised():
    p = parse_mail(b"no headers at all, just text")
    assert p.message_id is None and "no Message-ID" in p.defects
    assert p.from_addr is None and p.to == ()


def test_date_parsed_to_utc_and_naive_taken_as_utc():
    p = parse_mail(_mail("From: a@b.c\nDate: Mon, 2 Mar 2026 10:00:00 +0200"))
    assert p.date == dt.datetime(2026, 3, 2, 8, 0, tzinfo=dt.timezone.utc)
    assert parse_mail(_mail("From: a@b.c\nDate: garbage")).date is None


def test_header_limit_recorded():
    headers = "".join(f"X-H{i}: v\r\n" for i in range(30))
    p = parse_mail(("From: a@b.c\r\n" + headers + "\r\nx").encode(), max_headers=10)
    assert p.limit_exceeded == "too many headers"
    assert any(d.startswith("too many headers") for d in p.defects)


def _nested(depth: int) -> bytes:
    out = "From: a@b.c\r\n"
    for i in range(depth):
        out += f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n'
    out += "Content-Type: text/plain\r\n\r\nleaf\r\n"
    for i in reversed(range(depth)):
        out += f"--b{i}--\r\n"
    return out.encode()


def test_depth_and_part_limits_recorded():
    assert parse_mail(_nested(5), max_mime_depth=3).limit_exceeded == "too deep"
    assert parse_mail(_nested(5), max_mime_depth=10).limit_exceeded is None
    assert parse_mail(_nested(5), max_parts=3).limit_exceeded == "too many parts"


def test_sanitize_filename():
    assert sanitize_filename("../../etc/passwd") == "etc_passwd"
    assert sanitize_filename("a\x00b\r\nc.pdf") == "a_b_c.pdf"
    assert sanitize_filename("C:\\Users\\x.doc") == "C:_Users_x.doc"
    assert sanitize_filename("") == "attachment"
    assert sanitize_filename("...") == "attachment"


MIXED = b"""From: a@b.c\r
Message-ID: <mixed@x>\r
Content-Type: multipart/mixed; boundary="M"\r
\r
--M\r
Content-Type: multipart/alternative; boundary="A"\r
\r
--A\r
Content-Type: text/plain; charset=utf-8\r
\r
plain caf\xc3\xa9\r
--A\r
Content-Type: text/html; charset=utf-8\r
\r
<p>html</p>\r
--A--\r
--M\r
Content-Type: image/png\r
Content-ID: <img1@x>\r
Content-Disposition: inline; filename="logo.png"\r
Content-Transfer-Encoding: base64\r
\r
iVBORw0KGgo=\r
--M\r
Content-Type: binary/octet-stream\r
Content-Disposition: attachment; filename*=utf-8''..%2Fhello%20world.dat\r
\r
data\r
--M\r
Content-Type: pdf\r
Content-Disposition: attachment; filename="doc.pdf"\r
\r
%PDF\r
--M--\r
"""


def test_extract_content_bodies_attachments_and_cid():
    c = extract_content(parse_mail(MIXED))
    assert "café" in c.text and c.html == "<p>html</p>"
    by_name = {a.filename: a for a in c.attachments}
    assert set(by_name) == {"logo.png", "hello world.dat", "doc.pdf"}
    assert by_name["logo.png"].content_id == "img1@x" and by_name["logo.png"].inline
    assert by_name["logo.png"].payload.startswith(b"\x89PNG")
    assert by_name["hello world.dat"].content_type == "application/octet-stream"
    assert by_name["doc.pdf"].content_type == "application/pdf"


def test_extract_content_utf16_attachment_keeps_original_bytes():
    payload = "hé".encode("utf-16-le")
    import base64

    raw = (b'From: a@b.c\r\nContent-Type: multipart/mixed; boundary="M"\r\n\r\n--M\r\n'
           b"Content-Type: text/plain\r\n\r\nhi\r\n--M\r\n"
           b'Content-Type: text/plain; charset=UTF-16LE\r\nContent-Disposition: attachment; filename="u.txt"\r\n'
           b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.b64encode(payload) + b"\r\n--M--\r\n")
    c = extract_content(parse_mail(raw))
    assert c.attachments[0].payload == payload


def test_size_and_counts():
    raw = _mail("From: a@b.c\nTo: x@y.z", "hello\r\n")
    p = parse_mail(raw)
    assert p.size == len(raw) and p.header_count == 2 and p.part_count == 1
    assert p.has_header("TO") and not p.has_header("Cc")


def test_embedded_message_is_one_attachment_not_walked():
    raw = (b'From: a@b.c\r\nContent-Type: multipart/mixed; boundary="M"\r\n\r\n--M\r\n'
           b"Content-Type: text/plain\r\n\r\nouter\r\n--M\r\nContent-Type: message/rfc822\r\n\r\n"
           b"From: x@y.z\r\nSubject: inner\r\n\r\ninner body\r\n--M--\r\n")
    c = extract_content(parse_mail(raw))
    assert c.text.strip() == "outer"
    assert [(a.filename, a.content_type) for a in c.attachments] == [("message.eml", "message/rfc822")]
    assert b"inner body" in c.attachments[0].payload


def test_routing_reads_a_bounded_prefix_of_huge_messages() -> None:
    from routing.parse import parse_mail as _parse

    raw = b"From: a@client.test\r\nMessage-ID: <big@x>\r\nSubject: big\r\n\r\n" + (b"z" * 998 + b"\r\n") * 6000
    parsed = _parse(raw, max_bytes=1 << 20)
    assert parsed.message_id == "<big@x>" and parsed.subject == "big"
    assert any(d.startswith("routed on the first ") for d in parsed.defects)
    assert len(parsed.msg.get_payload()) <= 1 << 20
    small = _parse(b"Subject: s\r\n\r\nbody\r\n", max_bytes=1 << 20)
    assert not any(d.startswith("routed on") for d in small.defects)


def test_header_text_unfolds_keeping_the_whitespace_and_decodes_8bit():
    assert header_text("see transcript\r\n\tfor details") == "see transcript\tfor details"
    assert header_text("Gr\udcc3\udcbc\udcc3\udc9fe") == "Grüße"  # compat32's surrogate-escaped raw UTF-8
    assert header_text(None) == ""

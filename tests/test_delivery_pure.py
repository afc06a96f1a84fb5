"""The pure builders delivery uses: msg_dict / message_post kwargs, passthrough raw, normalised DSN."""

from __future__ import annotations

import datetime as dt
import email
import email.policy

import pytest

from routing.model import LOOP_HEADER, BounceResult
from routing.msgdict import (
    msg_dict, needs_references_fixup, normalize_message_id, parse_headers, parse_mail, passthrough_raw, post_kwargs,
    references_fixup, referenced_cids, rewrite_cids, to_7bit,
)
from routing.normalized_dsn import build_normalized_dsn
from tests.corpus import all_corpus_files


def test_normalize_message_id() -> None:
    assert normalize_message_id("  <a@b>  ") == "<a@b>"
    assert normalize_message_id("a@b") == "<a@b>"
    assert normalize_message_id("<a\r\n @b>") == "<a@b>"
    assert normalize_message_id("") is None and normalize_message_id(None) is None


MIXED = (b"From: \"Ann Buyer\" <Ann@Customer.Example>\r\nTo: sales@example.test\r\nCc: bob@x.example\r\n"
         b"Subject: =?utf-8?q?Caf=C3=A9?=\r\nMessage-ID:  <m1@customer.example> \r\n"
         b"Date: Sun, 22 Nov 2026 10:00:00 +0100\r\nMIME-Version: 1.0\r\n"
         b"Content-Type: multipart/related; boundary=R\r\n\r\n"
         b"--R\r\nContent-Type: multipart/alternative; boundary=A\r\n\r\n"
         b"--A\r\nContent-Type: text/plain\r\n\r\nplain\r\n"
         b"--A\r\nContent-Type: text/html\r\n\r\n<p>html <img src=\"cid:img1@x\"></p>\r\n--A--\r\n"
         b"--R\r\nContent-Type: image/gif\r\nContent-ID: <img1@x>\r\nContent-Transfer-Encoding: base64\r\n\r\n"
         b"R0lGODlhAQABAAAAACw=\r\n--R--\r\n")


def test_parse_mail_and_msg_dict() -> None:
    mail = parse_mail(MIXED)
    assert mail.message_id == "<m1@customer.example>"
    assert mail.subject == "Café" and mail.from_address == "ann@customer.example"
    assert "Ann Buyer" in mail.email_from
    assert mail.recipients == ("sales@example.test", "bob@x.example")
    assert mail.date == "2026-11-22 09:00:00"
    assert mail.body_html.startswith("<p>html")   # HTML wins in the alternative
    [att] = mail.attachments
    assert att.cid == "img1@x" and att.mimetype == "image/gif" and att.content.startswith(b"GIF89a")
    d = msg_dict(mail, author_id=7)
    assert d["author_id"] == 7 and d["message_id"] == "<m1@customer.example>" and d["subject"] == "Café"
    assert all(isinstance(v, (str, int, bool, list)) for v in d.values())
    kw = post_kwargs(mail, subtype_xmlid="mail.mt_comment", author_id=7, parent_id=3, attachment_ids=(9,))
    assert kw["body_is_html"] is True and kw["message_type"] == "email" and kw["parent_id"] == 3
    assert kw["attachment_ids"] == [9] and kw["message_id"] == "<m1@customer.example>"
    assert rewrite_cids(mail.body_html, {"img1@x": 9}) == '<p>html <img src="/web/image/9"></p>'
    # with the attachment's access token, as Odoo 17 writes it (portal and external readers need it)
    assert rewrite_cids(mail.body_html, {"img1@x": 9}, {9: "tok-1"}) == \
        '<p>html <img src="/web/image/9?access_token=tok-1"></p>'
    assert referenced_cids(mail.body_html) == {"img1@x"}


def test_parse_headers_agrees_with_parse_mail_on_headers() -> None:
    full, head = parse_mail(MIXED), parse_headers(MIXED)
    for f in ("message_id", "subject", "from_address", "to", "cc", "recipients", "date", "references",
              "in_reply_to"):
        assert getattr(head, f) == getattr(full, f), f
    assert head.body_html == "" and head.attachments == ()


@pytest.mark.parametrize("header, email_from", [
    ("=?utf-8?q?Ren=C3=A9_M=C3=BCller?= <rene@customer.example>", '"René Müller" <rene@customer.example>'),
    ("=?utf-8?b?UmVuw6kgTcO8bGxlcg==?= <rene@customer.example>", '"René Müller" <rene@customer.example>'),
    ("=?utf-8?Q?M=C3=BCller=2C_Hans?= <hans@x.example>", '"Müller, Hans" <hans@x.example>'),
    ("=?utf-8?q?Ren=C3=A9_=22Ren=22?= <rene@customer.example>", '"René \\"Ren\\"" <rene@customer.example>'),
    # Odoo's tools.formataddr quotes every display name, ASCII too, and escapes \\ and "
    ("Alice Buyer <alice@customer.example>", '"Alice Buyer" <alice@customer.example>'),
    ("=?utf-8?q?Alice?= <alice@customer.example>", '"Alice" <alice@customer.example>'),
    ('"Jo \\"JJ\\" Doe" <jo@customer.example>', '"Jo \\"JJ\\" Doe" <jo@customer.example>'),
    ('"back\\\\slash" <bs@customer.example>', '"back\\\\slash" <bs@customer.example>'),
    # a comment is no display name (Odoo: the bare address)
    ("bbb@customer.example (John X. Doe)", "bbb@customer.example"),
    ("alice@customer.example", "alice@customer.example"),
])
def test_email_from_keeps_the_display_name_readable(header: str, email_from: str) -> None:
    """Odoo stores and shows email_from as written by people; an RFC 2047 word there is what the salesperson
    would read as the sender's name. Explicit (parse_mail) and passthrough (parse_headers) say the same."""
    raw = f"From: {header}\r\nTo: sales@example.test\r\nSubject: hi\r\n\r\nbody\r\n".encode()
    mail = parse_mail(raw)
    assert mail.email_from == email_from and "=?" not in msg_dict(mail)["email_from"]
    assert parse_headers(raw).email_from == email_from


def test_parse_headers_unfolds_and_decodes_like_parse_mail() -> None:
    # folded (plain and encoded-word) values and raw UTF-8 (RFC 6532) headers: compat32's own get() kept
    # the line breaks and turned raw 8-bit into replacement characters
    raw = ("From: Zoë Ünal <zoe@exämple.net>\r\nTo: Jürgen <jürgen@exämple.net>,\r\n ann@example.test\r\n"
           "Cc: =?utf-8?q?Bj=C3=B6rn?= <bjorn@example.test>\r\n"
           "Subject: Returned mail: see transcript\r\n\tfor details\r\nX-Note: Grüße\r\n"
           "References: <a@x>\r\n <b@x>\r\nMessage-ID: <m@x>\r\n\r\nbody\r\n").encode("utf-8")
    head, full = parse_headers(raw), parse_mail(raw)
    assert head.subject == full.subject == "Returned mail: see transcript\tfor details"
    assert head.to == full.to == "jürgen@exämple.net, ann@example.test"
    assert head.recipients == full.recipients
    assert head.email_from == full.email_from == '"Zoë Ünal" <zoe@exämple.net>'
    assert head.references == full.references == "<a@x> <b@x>"
    encoded = b"From: a@b.c\r\nSubject: =?utf-8?q?Caf=C3=A9?=\r\n =?utf-8?q?_au_lait?=\r\n\r\nx\r\n"
    assert parse_headers(encoded).subject == parse_mail(encoded).subject == "Café au lait"


def test_msg_dict_carries_to_cc_and_recipients_with_their_names_as_odoo_does() -> None:
    # Odoo's message_parse: each address as its formataddr writes it, joined by ','; the gateway's own
    # look-ups (Delivered-To choice, Cc-only aliases) keep reading the bare lower-case lists
    raw = ("Delivered-To: catchall@example.test\r\nFrom: a@b.c\r\n"
           'To: "Sales Team" <Sales@Example.test>, "Jo \\"JJ\\" Doe" <jo@x.example>\r\n'
           "Cc: bob@x.example, =?utf-8?q?Bj=C3=B6rn?= <bjorn@x.example>, bob@x.example\r\n"
           "Resent-To: Rita <rita@x.example>\r\nSubject: hi\r\n\r\nbody\r\n").encode()
    for mail in (parse_mail(raw), parse_headers(raw)):
        d = msg_dict(mail)
        assert d["to"] == 'catchall@example.test,"Sales Team" <Sales@Example.test>,"Jo \\"JJ\\" Doe" <jo@x.example>'
        assert d["cc"] == 'bob@x.example,"Björn" <bjorn@x.example>'
        assert d["recipients"] == (d["to"] + "," + d["cc"] + ',"Rita" <rita@x.example>')
        assert mail.to == "catchall@example.test, sales@example.test, jo@x.example"
        assert mail.cc == "bob@x.example, bjorn@x.example, bob@x.example"
        assert mail.recipients == ("catchall@example.test", "sales@example.test", "jo@x.example", "bob@x.example",
                                   "bjorn@x.example", "rita@x.example")


def test_plain_text_is_escaped_and_wrapped() -> None:
    mail = parse_mail(b"From: a@b\r\nSubject: x\r\n\r\n<script>alert(1)</script> & co\r\n")
    assert mail.body_html.startswith("<pre>") and "&lt;script&gt;" in mail.body_html and "&amp; co" in mail.body_html


def _multipart(subtype: str, boundary: str, *parts: bytes) -> bytes:
    out = f"Content-Type: multipart/{subtype}; boundary={boundary}\r\n\r\n".encode()
    for part in parts:
        out += f"--{boundary}\r\n".encode() + part + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def _leaf(ctype: str, text: str) -> bytes:
    return f"Content-Type: {ctype}; charset=utf-8\r\n\r\n{text}".encode()


def test_mixed_mail_keeps_its_text_parts_beside_html_in_document_order() -> None:
    # Odoo 17 appends every body part of a multipart/mixed: text as <pre>, HTML without its document tags
    raw = b"From: a@b.c\r\nSubject: x\r\nMIME-Version: 1.0\r\n" + _multipart(
        "mixed", "M", _leaf("text/plain", "intro & more"),
        _leaf("text/html", "<HTML><Body><p>middle</p></Body></HTML>"), _leaf("text/plain", "outro"))
    body = parse_mail(raw).body_html
    assert body == "<pre>intro &amp; more</pre>\n\n<p>middle</p>\n\n<pre>outro</pre>"
    assert parse_mail(raw).attachments == ()


def test_alternative_html_replaces_its_text_twin_and_later_html_is_appended() -> None:
    alt = _multipart("alternative", "A", _leaf("text/plain", "plain twin"),
                     _leaf("text/html", "<html><body><p>rich</p></body></html>"))
    raw = b"From: a@b.c\r\nSubject: x\r\nMIME-Version: 1.0\r\n" + _multipart(
        "mixed", "M", alt, _leaf("text/html", "<p>appended</p>"), _leaf("text/plain", "footer"))
    mail = parse_mail(raw)
    # the second HTML goes inside the first one's <body>; a text part after an alternative is no body part
    # for Odoo: it keeps it as an attachment named `attachment`
    assert mail.body_html == "<html><body><p>rich</p>\n<p>appended</p>\n</body></html>"
    assert [(a.name, a.mimetype, a.content) for a in mail.attachments] == [("attachment", "text/plain", b"footer")]


def test_unknown_charset_degrades_instead_of_failing() -> None:
    mail = parse_mail(b"From: a@b\r\nContent-Type: text/plain; charset=x-no-such\r\n\r\nhello\r\n")
    assert "hello" in mail.body_html


@pytest.mark.parametrize("charset", ["idna", "punycode", "bz2", "rot13"])
def test_charset_naming_no_text_encoding_degrades_on_both_delivery_paths(charset: str) -> None:
    # idna/punycode raise UnicodeError (refusing even errors="replace"), bz2/rot13 LookupError: explicit
    # delivery (parse_mail) and passthrough (to_7bit) must both still carry the mail
    raw = (b"From: a@b.c\r\nTo: sales@example.test\r\nSubject: x\r\n"
           b"Content-Type: text/plain; charset=" + charset.encode() + b"\r\n\r\ncaf\xe9\r\n")
    assert parse_mail(raw).body_html == "<pre>caf\xe9\r\n</pre>"
    out = passthrough_raw(raw, ["sales@example.test"])
    assert out.isascii()
    body = email.message_from_string(out).get_payload(decode=True)
    assert body.strip() == b"caf\xe9"


@pytest.mark.parametrize("date", ["Mon, 1 Jan 99999999999 00:00:00 +0000", "Mon, 1 Jan 10000 00:00:00 +0000"])
def test_date_beyond_year_9999_falls_back_to_now(date: str) -> None:
    # the stdlib raises OverflowError (not ValueError) for such a year; Odoo takes now for an unreadable Date
    raw = f"From: a@b.c\r\nTo: sales@example.test\r\nDate: {date}\r\nSubject: x\r\n\r\nhi\r\n".encode()
    before = dt.datetime.now(dt.timezone.utc).replace(microsecond=0, tzinfo=None)
    for mail in (parse_headers(raw), parse_mail(raw)):
        assert dt.datetime.strptime(mail.date, "%Y-%m-%d %H:%M:%S") >= before


FORWARDED_AS_ATTACHMENT = (
    b"From: a@x.example\r\nTo: sales@example.test\r\nSubject: Fwd: quote\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: multipart/mixed; boundary=B\r\n\r\n"
    b"--B\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
    b"--B\r\nContent-Type: message/rfc822\r\nContent-Disposition: attachment; filename=\"orig.eml\"\r\n\r\n"
    b"From: c@y.example\r\nSubject: inner\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: multipart/mixed; boundary=C\r\n\r\n"
    b"--C\r\nContent-Type: text/html\r\n\r\n<p>inner html</p>\r\n"
    b"--C\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; filename=\"inner.pdf\"\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0=\r\n--C--\r\n--B--\r\n")


@pytest.mark.parametrize("disposition, name", [(b'attachment; filename="orig.eml"', "orig.eml"),
                                                (b"inline", "message.eml")])
def test_forwarded_as_attachment_keeps_outer_body_and_attaches_the_eml(disposition: bytes, name: str) -> None:
    # The forwarder's text is the body; the embedded mail is one .eml attachment (its parts are its own)
    raw = FORWARDED_AS_ATTACHMENT.replace(b'attachment; filename="orig.eml"', disposition)
    mail = parse_mail(raw)
    assert mail.body_html == "<pre>see attached</pre>"
    [att] = mail.attachments
    assert (att.name, att.mimetype) == (name, "message/rfc822")
    inner = email.message_from_bytes(att.content, policy=email.policy.default)
    assert inner["Subject"] == "inner" and b"<p>inner html</p>" in att.content and b"JVBERi0=" in att.content


def test_passthrough_adds_delivered_to_and_keeps_7bit_mail_byte_exact() -> None:
    raw = b"From: a@b\r\nTo: x@example.test\r\nSubject: hi\r\n\r\nbody\r\n"
    out = passthrough_raw(raw, ["sales@example.test", "sales@example.test", "vip@example.test"])
    assert out.encode() == b"Delivered-To: sales@example.test\r\nDelivered-To: vip@example.test\r\n" + raw


def test_to_7bit_reencodes_8bit_bodies_and_headers() -> None:
    raw = ("From: a@b\r\nSubject: Crème\r\nContent-Type: text/plain; charset=utf-8\r\n"
           "Content-Transfer-Encoding: 8bit\r\n\r\nbrûlée\r\n").encode("utf-8")
    out = to_7bit(raw)
    assert out.isascii()
    msg = email.message_from_bytes(out, policy=email.policy.default)
    assert str(msg["Subject"]) == "Crème" and msg.get_content().strip() == "brûlée"
    latin = ("Subject: x\r\nContent-Type: text/plain; charset=iso-8859-1\r\n\r\nCr\xe8me\r\n").encode("latin-1")
    msg = email.message_from_bytes(to_7bit(latin), policy=email.policy.default)
    assert msg.get_content().strip() == "Crème"


@pytest.mark.parametrize("refs, irt, parent, expected", [
    ("<unknown@x>", "<p@x>", "<p@x>", "<p@x>"),       # Outlook: References misses the parent
    ("<p@x>", "<p@x>", "<p@x>", None),                # already there
    ("", "<p@x>", "<p@x>", None),                     # no References: Odoo reads In-Reply-To itself
    ("<unknown@x>", "p@x", "<p@x>", "<p@x>"),         # In-Reply-To without brackets
    ("<unknown@x>", "<other@x>", "<p@x>", None),      # router matched via something else
])
def test_needs_references_fixup(refs: str, irt: str, parent: str, expected: str | None) -> None:
    assert needs_references_fixup(refs, irt, parent) == expected


def test_references_fixup_appends_to_folded_header() -> None:
    raw = b"Subject: x\r\nReferences: <a@x>\r\n <b@x>\r\nIn-Reply-To: <p@x>\r\n\r\nbody <p@x>\r\n"
    out = references_fixup(raw, "<p@x>")
    assert out == b"Subject: x\r\nReferences: <a@x>\r\n <b@x> <p@x>\r\nIn-Reply-To: <p@x>\r\n\r\nbody <p@x>\r\n"
    assert references_fixup(out, "<p@x>") == out
    assert references_fixup(b"Subject: x\n\nbody\n", "<p@x>") == b"Subject: x\n\nbody\n"


def test_normalized_dsn_is_what_odoo_needs() -> None:
    b = BounceResult(recipient="bob@customer.example", kind="hard", reason="userunknown", status="5.1.1",
                     diagnostic="550 5.1.1 <bob>: no such user\r\nX-Injected: yes",
                     original_message_id="<orig@odoo>", remote_mta="mx.customer.example")
    when = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.timezone.utc)
    raw = build_normalized_dsn(b, bounce_address="bounce@example.test", seed="spool:7", date=when)
    assert raw.isascii()
    assert raw == build_normalized_dsn(b, bounce_address="bounce@example.test", seed="spool:7", date=when)
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["Delivered-To"] == "bounce@example.test" and msg["To"] == "bounce@example.test"
    assert msg[LOOP_HEADER] and msg["Auto-Submitted"] == "auto-replied"
    assert msg.get_content_type() == "multipart/report" and msg.get_param("report-type") == "delivery-status"
    assert "X-Injected" not in msg  # the diagnostic cannot inject headers
    status = [p for p in msg.walk() if p.get_content_type() == "message/delivery-status"][0]
    blocks = status.get_payload()
    assert len(blocks) == 2 and str(blocks[1]["Final-Recipient"]) == "rfc822; bob@customer.example"
    assert str(blocks[1]["Status"]) == "5.1.1" and str(blocks[1]["Action"]) == "failed"
    headers = [p for p in msg.walk() if p.get_content_type() == "text/rfc822-headers"][0]
    assert "Message-ID: <orig@odoo>" in headers.get_content()
    other = build_normalized_dsn(b, bounce_address="bounce@example.test", seed="spool:8")
    mid = email.message_from_bytes(other)["Message-ID"]
    assert mid != msg["Message-ID"]


def test_every_corpus_mail_becomes_clean_7bit() -> None:
    """Bad input contained: whatever arrives, message_process gets ASCII text that still parses."""
    files = all_corpus_files()
    if not files:
        pytest.skip("shared corpus not present")
    for path in files:
        raw = path.read_bytes()[:2_000_000]
        out = passthrough_raw(raw, ["sales@example.test"])
        assert out.isascii(), path
        assert out.startswith("Delivered-To: sales@example.test"), path
        parse_mail(raw)  # never raises


@pytest.mark.parametrize("header", [
    "=?utf-8?Q?M=C3=BCller=2C_Hans?= <hans@x.example>",   # "Last, First": the comma is inside the encoded word
    '"Müller, Hans" <hans@x.example>',
    "Hans <hans@x.example>",
])
def test_parse_headers_reads_a_sender_whose_name_holds_a_comma(header: str) -> None:
    """Decoded before it was split, an encoded "Müller, Hans" made two addresses: the author became
    "Müller" with the address "müller" (no partner found, a refusal sent nowhere). parse_headers feeds
    passthrough delivery and events, so it must agree with parse_mail."""
    raw = f"From: {header}\r\nTo: sales@example.test\r\nSubject: hi\r\n\r\nbody\r\n".encode()
    head, full = parse_headers(raw), parse_mail(raw)
    assert head.from_address == full.from_address == "hans@x.example"
    assert head.email_from.endswith("<hans@x.example>") and "Hans" in head.email_from

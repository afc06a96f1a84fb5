"""The pure parts of the outbound relay: per-recipient rewrite, Odoo record extraction, tracking switches,
SMTP result classification, retry schedule and MX ordering."""

from __future__ import annotations

import base64
import quopri
from email import message_from_bytes, policy

import pytest

from aliases.model import Alias, AliasTable, Domain
from gateway.outbound import bounce_kind, bounce_reason, classify_reply, order_mx, retry_delay
from gateway.relay import SubmissionFacts, odoo_record, read_submission, tracking_allowed, verp_domain
from routing.rewrite import (
    RewriteOptions, is_trackable_link, list_unsubscribe_targets, rewrite_html, rewrite_message,
)
from tests.test_relay_support import odoo_mail

pytestmark = pytest.mark.events

BASE = "https://t.example.test"


def opts(**kw) -> RewriteOptions:
    defaults = dict(return_path="bounce+tok@example.test", pixel_url=f"{BASE}/t/o/PIX.gif",
                    click_url=lambda u: f"{BASE}/t/c/TOK?u={u}", own_prefix=BASE)
    defaults.update(kw)
    return RewriteOptions(**defaults)


@pytest.mark.parametrize("url,trackable", [
    ("https://shop.example.com/p/1", True),
    ("http://shop.example.com/", True),
    ("mailto:sales@example.test", False),
    ("tel:+3212345678", False),
    ("#top", False),
    ("ftp://files.example.com/x", False),
    ("https://odoo.example.test/r/AbC12/m/44", False),                 # mass mailing
    ("https://odoo.example.test/r/AbC12/s/7", False),                  # automation_oca /r/<code>/...
    ("https://odoo.example.test/automation_oca/track/5/open.png", False),
    ("https://odoo.example.test/mail/track/5/blank.gif", False),
    ("https://news.example.com/Unsubscribe?id=3", False),
    ("https://odoo.example.test/mailing/3/unsubscribe_oneclick", False),
    (f"{BASE}/t/c/XYZ?u=https%3A%2F%2Fa", False),                      # already ours
    ("https://odoo.example.test/rest/api", True),                      # /r/ must be a path segment
])
def test_which_links_are_tracked(url, trackable):
    assert is_trackable_link(url, own_prefix=BASE) is trackable


def test_a_short_link_is_odoos_only_on_the_mails_odoo_host():
    """`/r/<code>` is link_tracker's shape, and reddit's (/r/Odoo/, /r/Odoo/s/<share>): any host's was left
    untracked. It is Odoo's on the host of the mail's Odoo links; mass mailing's /r/<code>/m/<id> anywhere."""
    from routing.rewrite import RewriteOptions, rewrite_html

    mail = ('<p><a href="https://erp.example.test/mail/view?model=crm.lead&amp;res_id=7">View Lead</a> '
            '<a href="https://erp.example.test/r/Xy1">short</a> <a href="https://www.reddit.com/r/Odoo/">r</a> '
            '<a href="https://www.reddit.com/r/Odoo/s/AbC">share</a> '
            '<a href="https://other.example/r/Q9/m/12">mailing</a></p>')
    out = rewrite_html(mail, RewriteOptions(click_url=lambda u: f"{BASE}/t/c/T?u={u}", own_prefix=BASE))
    assert 'href="https://erp.example.test/r/Xy1"' in out                 # link_tracker on the mail's Odoo
    assert 'href="https://other.example/r/Q9/m/12"' in out                # mass mailing's shape: Odoo's anywhere
    assert out.count(f"{BASE}/t/c/T?u=https://www.reddit.com/r/Odoo/") == 2  # both reddit links tracked now
    # A mail naming no Odoo host: a bare /r/ link is left alone, as before (it may be link_tracker's).
    alone = rewrite_html('<a href="https://erp.example.test/r/Xy1">x</a>',
                         RewriteOptions(click_url=lambda u: f"{BASE}/t/c/T?u={u}", own_prefix=BASE))
    assert 'href="https://erp.example.test/r/Xy1"' in alone


def test_list_unsubscribe_targets_are_never_wrapped():
    targets = list_unsubscribe_targets("<https://odoo.example.test/mail/optout/9?t=x>, <mailto:u@example.test>")
    assert targets == {"https://odoo.example.test/mail/optout/9?t=x", "mailto:u@example.test"}
    assert not is_trackable_link("https://odoo.example.test/mail/optout/9?t=x", never_track=targets)


def test_rewrite_html_links_entities_and_pixel_before_body_close():
    html = ('<html><body><A HREF="https://a.example/x?p=1&amp;q=2">x</A> <a class="b" href=\'https://b.example/\'>'
            'b</a> <a href=https://c.example/u>c</a></body></html>')
    seen: list[str] = []

    def click(u: str) -> str:
        seen.append(u)
        return f"{BASE}/t/c/T?u={u}&z=1"

    out = rewrite_html(html, opts(click_url=click))
    assert seen == ["https://a.example/x?p=1&q=2", "https://b.example/", "https://c.example/u"]
    assert f'HREF="{BASE}/t/c/T?u=https://a.example/x?p=1&amp;q=2&amp;z=1"' in out
    assert out.index("/t/o/PIX.gif") < out.index("</body>")
    assert out.count("<img") == 1


def test_rewrite_keeps_everything_but_tracked_html_byte_exact():
    raw = odoo_mail()
    out = rewrite_message(raw, opts())
    head_in, body_in = raw.split(b"\r\n\r\n", 1)
    head_out, body_out = out.split(b"\r\n\r\n", 1)
    # Only Return-Path changed in the head.
    lines_in = [line for line in head_in.split(b"\r\n") if not line.startswith(b"Return-Path")]
    lines_out = [line for line in head_out.split(b"\r\n") if not line.startswith(b"Return-Path")]
    assert lines_in == lines_out
    assert b"Return-Path: <bounce+tok@example.test>" in head_out
    # The text/plain part is identical; the HTML part changed.
    msg_in, msg_out = message_from_bytes(raw, policy=policy.default), message_from_bytes(out, policy=policy.default)
    parts_in = {p.get_content_type(): p for p in msg_in.walk()}
    parts_out = {p.get_content_type(): p for p in msg_out.walk()}
    assert parts_in["text/plain"].as_bytes() == parts_out["text/plain"].as_bytes()
    assert parts_out["text/html"].get_content() != parts_in["text/html"].get_content()
    assert "/t/o/PIX.gif" in parts_out["text/html"].get_content()
    assert parts_out["text/html"]["Content-Transfer-Encoding"] == parts_in["text/html"]["Content-Transfer-Encoding"]
    assert out.endswith(raw[raw.rindex(b"--"):])  # close delimiter and epilogue untouched


def _single_part(cte: str, html: str, newline: bytes = b"\r\n") -> bytes:
    data = html.encode("utf-8")
    if cte == "base64":
        body = base64.encodebytes(data).replace(b"\n", newline)
    elif cte == "quoted-printable":
        body = quopri.encodestring(data).replace(b"\n", newline)
    else:
        body = data
    nl = newline.decode()
    head = (f"From: a@example.test{nl}To: b@customer.test{nl}Subject: x{nl}MIME-Version: 1.0{nl}"
            f"Content-Type: text/html; charset=utf-8{nl}Content-Transfer-Encoding: {cte}{nl}{nl}")
    return head.encode() + body


@pytest.mark.parametrize("cte", ["base64", "quoted-printable", "8bit"])
@pytest.mark.parametrize("newline", [b"\r\n", b"\n"])
def test_each_transfer_encoding_roundtrips(cte, newline):
    html = "<html><body><p>Grüße <a href=\"https://shop.example.com/é\">shop</a></p></body></html>"
    out = rewrite_message(_single_part(cte, html, newline), opts())
    part = message_from_bytes(out, policy=policy.default)
    content = part.get_content()
    assert "Grüße" in content
    assert f'href="{BASE}/t/c/TOK?u=https://shop.example.com/é"' in content
    assert "/t/o/PIX.gif" in content
    if newline == b"\n":
        assert b"\r\n" not in out


def test_long_7bit_line_switches_part_to_quoted_printable():
    html = "<p>" + " ".join(f'<a href="https://s.example/{i}">{i}</a>' for i in range(40)) + "</p>"
    out = rewrite_message(_single_part("7bit", html), opts(click_url=lambda u: f"{BASE}/t/c/{'T' * 60}?u={u}"))
    assert all(len(line) <= 998 for line in out.split(b"\r\n"))
    part = message_from_bytes(out, policy=policy.default)
    assert part["Content-Transfer-Encoding"] == "quoted-printable"
    assert part.get_content().count(f"{BASE}/t/c/") == 40


def test_dkim_signed_mail_keeps_its_body():
    raw = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.test; b=abc\r\n" + odoo_mail()
    out = rewrite_message(raw, opts())
    assert out.split(b"\r\n\r\n", 1)[1] == raw.split(b"\r\n\r\n", 1)[1]


_SIGNED_HTML = (b"--SIG\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
                b"<html><body><a href=\"https://e.example.com/x\">x</a></body></html>\r\n--SIG\r\n"
                b"Content-Type: application/pkcs7-signature; name=smime.p7s\r\nContent-Transfer-Encoding: base64\r\n"
                b"\r\nMIIB\r\n--SIG--\r\n")
_SIGNED_TYPE = b'multipart/signed; protocol="application/pkcs7-signature"; micalg=sha-256; boundary="SIG"'


@pytest.mark.parametrize("raw", [
    b"Subject: s\r\nMIME-Version: 1.0\r\nContent-Type: " + _SIGNED_TYPE + b"\r\n\r\n" + _SIGNED_HTML,
    b"Subject: s\r\nMIME-Version: 1.0\r\nContent-Type: multipart/encrypted; protocol=\"application/pgp-encrypted\";"
    b" boundary=\"SIG\"\r\n\r\n" + _SIGNED_HTML,
    b"Subject: s\r\nMIME-Version: 1.0\r\nContent-Type: application/pkcs7-mime; smime-type=signed-data\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n\r\n<html><body><a href=\"https://e.example.com/x\">x</a></body></html>\r\n",
    # a signed entity inside a multipart/mixed: its own bytes stay as they are
    b"Subject: s\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"OUT\"\r\n\r\n--OUT\r\n"
    b"Content-Type: " + _SIGNED_TYPE + b"\r\n\r\n" + _SIGNED_HTML + b"--OUT--\r\n",
])
def test_smime_and_pgp_signed_or_encrypted_bodies_are_not_rewritten(raw: bytes):
    """The HTML inside a multipart/signed was rewritten (link wrapped, pixel added): the signature no longer
    verified and the recipient's client showed the mail as tampered with."""
    out = rewrite_message(raw, opts())
    assert out.split(b"\r\n\r\n", 1)[1] == raw.split(b"\r\n\r\n", 1)[1]


def test_pixel_goes_into_first_html_part_only_and_attachments_are_untouched():
    raw = (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"B1\"\r\n\r\npreamble\r\n"
           b"--B1\r\nContent-Type: text/html\r\n\r\n<p><a href=\"https://a.example/\">a</a></p>\r\n"
           b"--B1\r\nContent-Type: text/html\r\n\r\n<p>second</p>\r\n"
           b"--B1\r\nContent-Type: text/html\r\nContent-Disposition: attachment; filename=x.html\r\n\r\n"
           b"<a href=\"https://b.example/\">b</a>\r\n--B1--\r\nepilogue\r\n")
    out = rewrite_message(raw, opts())
    assert out.count(b"/t/o/PIX.gif") == 1
    assert b"<a href=\"https://b.example/\">b</a>" in out  # attachment untouched
    assert out.startswith(raw[:raw.index(b"--B1")])
    assert out.endswith(b"--B1--\r\nepilogue\r\n")
    assert b"https://a.example/" not in out.replace(b"u=https://a.example/", b"")


def test_no_tracking_options_only_change_return_path():
    raw = odoo_mail()
    out = rewrite_message(raw, RewriteOptions(return_path="bounce+x@example.test"))
    assert out.split(b"\r\n\r\n", 1)[1] == raw.split(b"\r\n\r\n", 1)[1]


def test_odoo_record_from_objects_header_and_message_id():
    assert odoo_record("crm.lead-7", None) == ("crm.lead", 7)
    assert odoo_record("project.project-3, ,project.task-9", None) == ("project.task", 9)
    assert odoo_record(None, "<368396033905967.1673346177.69-openerp-11-sale.order@eupp00>") == ("sale.order", 11)
    assert odoo_record(None, "<123.456-openerp-private@host>") is None
    assert odoo_record("garbage", "<abc@host>") is None


def test_read_submission_facts():
    facts = read_submission(odoo_mail(res_id=42, model="sale.order"))
    assert facts.message_id.endswith("-openerp-42-sale.order@odoo-host>")
    assert (facts.model, facts.res_id) == ("sale.order", 42)
    assert facts.from_addr == "notifications@example.test"
    assert facts.reply_to == "sales@example.test"


def test_tracking_switches_per_domain_and_alias():
    table = AliasTable(
        domains=(Domain("example.test"), Domain("quiet.test", tracking=False)),
        aliases=(Alias("sales@example.test", "crm.lead"), Alias("support@example.test", "helpdesk.ticket",
                                                                  tracking=False)),
    )
    def facts(from_addr, reply_to):
        return SubmissionFacts(None, None, None, from_addr, reply_to, frozenset())
    assert tracking_allowed(facts("n@example.test", "sales@example.test"), table, enabled=True)
    assert not tracking_allowed(facts("n@example.test", "sales@example.test"), table, enabled=False)
    assert not tracking_allowed(facts("n@example.test", "support@example.test"), table, enabled=True)
    assert not tracking_allowed(facts("n@quiet.test", None), table, enabled=True)
    assert verp_domain("bounce@quiet.test", table) == "quiet.test"
    assert verp_domain("bounce@elsewhere.test", table) == "example.test"


def test_smtp_reply_classification():
    assert classify_reply(250, "2.0.0 Ok").outcome == "delivered"
    r = classify_reply(451, "4.7.1 greylisted")
    assert (r.outcome, r.status) == ("deferred", "4.7.1")
    r = classify_reply(550, "5.1.1 <x@y>: Recipient address rejected: User unknown")
    assert (r.outcome, r.status, bounce_reason(r), bounce_kind(r, bounce_reason(r))) == \
        ("bounced", "5.1.1", "userunknown", "hard")
    r = classify_reply(552, "5.2.2 mailbox full")
    assert (bounce_reason(r), bounce_kind(r, bounce_reason(r))) == ("mailboxfull", "soft")
    assert bounce_reason(classify_reply(554, "rejected as spam")) == "spamdetected"


def test_retry_schedule_and_mx_order():
    assert [retry_delay(n, 300, 4000) for n in (1, 2, 3, 4, 5)] == [300, 600, 1200, 2400, 4000]
    assert order_mx([(20, "b.mx.test."), (10, "a.mx.test."), (20, "b.mx.test.")]) == ["a.mx.test", "b.mx.test"]
    assert order_mx([(0, ".")]) is None


def test_quoted_printable_part_keeps_the_encoding_of_lines_it_did_not_change():
    """Only lines holding a tracked link or the pixel are encoded again; every other line of the HTML part is
    byte-for-byte what Odoo sent (here: the email package's own quoted-printable, soft breaks included)."""
    from email.message import EmailMessage

    filler = "".join(f"<p>Line {i}: {'lorem ipsum dolor sit amet ' * 5}= é</p>\n" for i in range(12))
    html = (f"<html><body>\n{filler}<p><a href=\"https://shop.example.com/q?a=1&amp;b=2\">shop</a></p>\n"
            f"{filler}<p>Bye</p>\n</body></html>\n")
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "a@example.test", "b@customer.test", "x"
    msg.set_content(html, subtype="html", cte="quoted-printable")
    raw = msg.as_bytes(policy=policy.SMTP)
    out = rewrite_message(raw, opts())
    part = message_from_bytes(out, policy=policy.default)
    assert part.get_content().replace("\r\n", "\n") == rewrite_html(html, opts())  # exactly the rewritten HTML
    body_in = raw.split(b"\r\n\r\n", 1)[1].split(b"\r\n")
    body_out = out.split(b"\r\n\r\n", 1)[1].split(b"\r\n")
    untouched = [line for line in body_in if b"href" not in line and b"</body>" not in line]
    assert len(untouched) > 50 and sum(line.endswith(b"=") for line in untouched) > 20  # soft breaks in play
    assert [line for line in body_out if line in set(untouched)] == untouched


@pytest.mark.parametrize("newline", [b"\r\n", b"\n"])
def test_quoted_printable_reencode_matches_a_full_encode_when_every_line_changed(newline):
    import random

    from routing.rewrite import _qp_encode, _qp_reencode

    rng = random.Random(5)
    alphabet = [b"a", b" ", b"\t", b"=", b"\xc3\xa9", b".", b"x" * 90]
    for _ in range(300):
        lines = [b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(rng.randint(1, 6))]
        old = newline.join(lines) + newline
        new = newline.join(b"<" + line + b">" for line in lines) + newline
        body = _qp_encode(old, newline)
        assert _qp_reencode(body, old, new, newline) == _qp_encode(new, newline)
        assert quopri.decodestring(_qp_reencode(body, old, new, newline)) == quopri.decodestring(_qp_encode(new, newline))
        half = newline.join(b"<" + line + b">" if i % 2 else line for i, line in enumerate(lines)) + newline
        assert quopri.decodestring(_qp_reencode(body, old, half, newline)) == half


def test_a_link_with_a_raw_ampersand_is_signed_and_redirected_exactly_as_written():
    """html.unescape decodes legacy references without ';' ("&sect", "&para", "&curren", "&times"), which a
    browser leaves alone before a letter or "=": every such link redirected the recipient to a broken URL."""
    seen: list[str] = []
    href = "https://shop.test/list?page=2&section=tools&param=1&currency=EUR&timestamp=5"
    rewrite_html(f'<a href="{href}">list</a>', opts(click_url=lambda u: seen.append(u) or "X"))
    assert seen == [href]
    rewrite_html('<a href="https://shop.test/?a=1&amp;b=2&#38;c=3">x</a>', opts(click_url=lambda u: seen.append(u) or "X"))
    assert seen[-1] == "https://shop.test/?a=1&b=2&c=3"


def test_data_href_is_not_taken_for_the_link_and_a_second_relay_adds_no_second_pixel():
    out = rewrite_html('<a data-href="https://a.test/" href="https://b.test/">x</a></body>', opts())
    assert 'data-href="https://a.test/"' in out and "u=https://b.test/" in out
    again = rewrite_html(out, opts())
    assert again.count("/t/o/") == 1


@pytest.mark.parametrize("tail", [b"", b"\r\n"])
def test_quoted_printable_reencode_adds_no_lone_cr(tail: bytes):
    """The last line of a quoted-printable part has no line break of its own: re-encoding it appended a CR
    anyway, so the part ended in a lone CR before the boundary (illegal MIME) and its HTML in a stray CR."""
    raw = (b"MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=\"B\"\r\n\r\n--B\r\n"
           b"Content-Type: text/plain; charset=utf-8\r\n\r\nhi\r\n--B\r\n"
           b"Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
           b"<div>Hello</div>\r\n<div><a href=3D\"https://shop.test/q\">quote</a></div>" + tail + b"\r\n--B--\r\n")
    out = rewrite_message(raw, opts())
    assert b"\r\r" not in out and b"\r\n--B--" in out
    html_part = message_from_bytes(out, policy=policy.default).get_payload()[1].get_content()
    assert not html_part.endswith("\r") and "/t/c/TOK?u=https://shop.test/q" in html_part

"""What Odoo gets from one parsed mail (pure: bytes in, dicts and bytes out; no network, no DB).

Two shapes, one per delivery mode:

* **explicit** — `parse_mail()` → `ParsedMail`, then `msg_dict()` (the serialisable subset
  `<model>.message_new` accepts over RPC, spec §3.3) and `post_kwargs()` (`message_post` as Odoo's own
  gateway calls it, spec §1.11/§3.4: `body_is_html`, `message_type='email'`, subtype, `message_id` normalised,
  `email_from`, author, date, parent).
* **passthrough** — `passthrough_raw()`: the raw mail for `mail.thread.message_process`, with one
  `Delivered-To` per accepted recipient (Odoo never sees the envelope, spec §5.5), the In-Reply-To id appended
  to References when Odoo would otherwise miss the thread (it ignores In-Reply-To whenever References is
  non-empty, spec §1.4/§6), and 8-bit content re-encoded to 7-bit (a JSON string carries only text: 8-bit
  non-UTF-8 mail would be garbled, spec §3.1/§7).
"""

from __future__ import annotations

import base64
import datetime as dt
import email
import email.header
import email.parser
import email.policy
import email.utils
import html
import re
from dataclasses import dataclass, field
from email.message import Message
from collections.abc import Callable
from typing import Any

from routing.parse import decode_bytes, decode_header_value, embedded_bytes, header_text
from routing.threads import normalize_message_id

_ANGLE = re.compile(r"<[^<>]+>")


def reference_ids(value: str | None) -> list[str]:
    """Every <id> token of a References/In-Reply-To value, folding whitespace removed (as Odoo does)."""
    return [re.sub(r"\s+", "", t) for t in _ANGLE.findall(str(value or ""))]


@dataclass(frozen=True)
class MailAttachment:
    name: str
    content: bytes
    mimetype: str
    cid: str | None = None        # Content-ID without brackets, for inline images referenced as cid:...


@dataclass(frozen=True)
class ParsedMail:
    """The fields of one inbound mail that Odoo's message_parse would compute (spec §1.1)."""

    message_id: str | None
    subject: str
    email_from: str               # '"Name" <addr>' as Odoo's formataddr writes it
    from_address: str             # normalised (lower-case) address, for author lookups
    to: str                       # Delivered-To + To, bare lower-case addresses joined by ", "
    cc: str                       # Cc, the same
    recipients: tuple[str, ...]   # Delivered-To + To + Cc + Resent-To + Resent-Cc, lower-case
    date: str                     # UTC "YYYY-MM-DD HH:MM:SS" (what message_post's `date` takes)
    references: str
    in_reply_to: str
    body_html: str
    attachments: tuple[MailAttachment, ...] = field(default=())
    # What Odoo's message_parse puts in msg_dict: `"Name" <addr>` as its formataddr writes them, joined by ','
    # (the bare lists above are for the gateway's own look-ups)
    to_formatted: str = ""          # Delivered-To + To
    cc_formatted: str = ""
    recipients_formatted: str = ""  # Delivered-To + To + Cc + Resent-To + Resent-Cc


def _header(msg: Message, name: str) -> str:
    try:
        value = msg.get(name)
    except Exception:  # noqa: BLE001 - a malformed header must not fail the whole mail
        return ""
    return str(value or "").strip()


def _values(msg: Message, name: str) -> list[str]:
    try:
        return [str(v) for v in msg.get_all(name, [])]
    except Exception:  # noqa: BLE001 - a malformed header must not fail the whole mail
        return []


_TO_HEADERS = ("Delivered-To", "To")
_RECIPIENT_HEADERS = ("Delivered-To", "To", "Cc", "Resent-To", "Resent-Cc")


def _recipient_fields(values_of: Callable[[str], list[str]]) -> dict[str, Any]:
    """To, Cc and recipients from rendered header values (names decoded, as the email package's policy
    writes them): bare lower-case addresses for the gateway, and Odoo's msg_dict form (each address through
    `format_address`, a repeat dropped, joined by ',') for Odoo. Only addresses with an @ count, as in Odoo."""

    def pairs(*names: str) -> list[tuple[str, str]]:
        values = [v for name in names for v in values_of(name)]
        try:
            found = email.utils.getaddresses(values)
        except Exception:  # noqa: BLE001 - unparseable address lists: none
            return []
        return [(n, a) for n, a in found if a and "@" in a]

    def formatted(found: list[tuple[str, str]]) -> str:
        return ",".join(dict.fromkeys(format_address(n, a) for n, a in found))

    to, cc, everyone = pairs(*_TO_HEADERS), pairs("Cc"), pairs(*_RECIPIENT_HEADERS)
    return {
        "to": ", ".join(a.lower() for _n, a in to), "cc": ", ".join(a.lower() for _n, a in cc),
        "recipients": tuple(dict.fromkeys(a.lower() for _n, a in everyone)),
        "to_formatted": formatted(to), "cc_formatted": formatted(cc), "recipients_formatted": formatted(everyone),
    }


def _utc_date(value: str) -> str:
    """The Date header in UTC, or now when it cannot be read (as Odoo does). A year past 9999 raises
    OverflowError from the stdlib, not ValueError: caught too, or one odd Date would fail the delivery."""
    try:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
    except (TypeError, ValueError, IndexError, OverflowError):
        parsed = None
    if parsed is None:
        parsed = dt.datetime.now(dt.timezone.utc)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.timezone.utc)
    return parsed.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _text(part: Message) -> str:
    """A body part as text. Odoo fails the whole mail on a charset it cannot decode with (spec §1.1); routing's
    decoder never does: a mislabelled or non-text charset (idna, bz2, ...) falls back to a guess or latin-1."""
    payload = part.get_payload(decode=True) or b""
    try:
        charset = part.get_content_charset()
    except Exception:  # noqa: BLE001 - a malformed parameter: guess
        charset = None
    return decode_bytes(payload, charset)


def _filename_or(part: Message, fallback: str) -> str:
    try:
        return part.get_filename() or fallback
    except Exception:  # noqa: BLE001 - malformed parameters
        return fallback


def _first_address(rendered: str) -> tuple[str, str]:
    """(display name, address) of the first address in a rendered From value ("", "" without one)."""
    pairs = email.utils.getaddresses([rendered])
    return pairs[0] if pairs else ("", "")


_ADDRESS_ESCAPES = re.compile(r'[\\"]')


def format_address(name: str, addr: str) -> str:
    """`"Name" <addr>` exactly as Odoo's `tools.formataddr` writes email_from: any display name quoted, with
    backslash and double quote escaped; the bare address without one. Odoo stores and shows it as written,
    so the name stays readable text, never an RFC 2047 word (the stdlib's formataddr encodes non-ASCII names,
    and quotes ASCII ones only when it must: `Barry Warsaw <barry@python.org>` where Odoo writes
    `"Barry Warsaw" <barry@python.org>`). explicit (`parse_mail`) and passthrough (`parse_headers`) use this
    one helper so the two modes report one sender."""
    if not name:
        return addr
    # Odoo falls back to an RFC 2047 word for a name it cannot encode as UTF-8; ours is decoded text, so at
    # most a lone surrogate could be left: it becomes a replacement character instead
    name = _SURROGATES.sub("\ufffd", name)
    escaped = _ADDRESS_ESCAPES.sub(r"\\\g<0>", name)
    return f'"{escaped}" <{addr}>'


_SURROGATES = re.compile(r"[\ud800-\udfff]")


def _document_order(root: Message) -> list[Message]:
    """Every part in document order, containers included (as `Message.walk()` gives them, without recursion),
    except that a message/rfc822 part is one leaf: a forwarded-as-attachment mail keeps the forwarder's body
    and becomes one .eml attachment (Odoo walks into it and mixes its parts with the outer mail's)."""
    out: list[Message] = []
    stack = [root]
    while stack:
        part = stack.pop()
        out.append(part)
        if part is not root and part.get_content_type() == "message/rfc822":
            continue
        payload = part.get_payload() if part.is_multipart() else None
        if isinstance(payload, list):
            stack.extend(reversed([p for p in payload if isinstance(p, Message)]))
    return out


_DOCUMENT_TAGS = re.compile(r"(?i)(</?(?:html|body|head|!\s*DOCTYPE)[^>]*>)")
_TAG_NAME = re.compile(r"(</?)(\w+)([ >])")


def _append_to_html(body: str, content: str, *, plaintext: bool) -> str:
    """Odoo's `tools.append_content_to_html`: plain text as an escaped <pre>, HTML without its document tags,
    put before the body's </body> (or </html>) when it has one, else at the end."""
    if plaintext:
        content = "\n<pre>" + html.escape(content, quote=False) + "</pre>\n"
    else:
        content = "\n" + _DOCUMENT_TAGS.sub("", content) + "\n"
    body = _TAG_NAME.sub(lambda m: m.group(1) + m.group(2).lower() + m.group(3), body)
    at = body.find("</body>")
    if at == -1:
        at = body.find("</html>")
    return body + content if at == -1 else body[:at] + content + body[at:]


def parse_mail(raw: bytes) -> ParsedMail:
    """Headers, HTML body and attachments, as Odoo 17's `_message_parse_extract_payload` builds them.

    Its walk, in document order: text/plain is appended as <pre>, text/html is appended too (several HTML
    parts of a multipart/mixed are concatenated), except that once a multipart/alternative has been seen an
    HTML part *replaces* the body (the plain-text twin it stands for) and a plain part arriving when there is
    a body already becomes an attachment named `attachment`. Building "HTML if any, else text" instead lost
    every text part of a mixed mail that also held HTML."""
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    name, addr = _first_address(_header(msg, "From"))
    email_from = format_address(name, addr) if addr else _header(msg, "From")
    body = ""
    alternative = mixed = seen_html = False  # Odoo's flags: once set, they hold for the rest of the walk
    attachments: list[MailAttachment] = []
    for part in _document_order(msg):
        ctype = part.get_content_type()
        if ctype == "multipart/alternative":
            alternative = True
        elif ctype == "multipart/mixed":
            mixed = True
        if part.get_content_maintype() == "multipart" and part.is_multipart():
            continue
        if ctype == "message/rfc822" and part is not msg:
            # a forwarded-as-attachment mail: one .eml attachment, its body never replaces the forwarder's
            attachments.append(MailAttachment(name=_filename_or(part, "message.eml"),
                                              content=embedded_bytes(part), mimetype=ctype))
            continue
        try:
            filename = part.get_filename()
            disposition = part.get_content_disposition()
        except Exception:  # noqa: BLE001 - malformed parameters: treat as an unnamed attachment
            filename, disposition = None, "attachment"
        cid = (_header(part, "Content-ID").strip("<> ") or None)
        is_body = not filename and disposition != "attachment"
        if is_body and ctype == "text/plain" and not (alternative and body):
            body = _append_to_html(body, _text(part), plaintext=True)
        elif is_body and ctype == "text/html":
            content = _text(part)
            if alternative and not (seen_html and mixed):
                body = content
            else:
                body = _append_to_html(body, content, plaintext=False)
            seen_html = seen_html or bool(content)
        else:
            if ctype == "binary/octet-stream":
                ctype = "application/octet-stream"
            attachments.append(MailAttachment(name=filename or "attachment",
                                              content=part.get_payload(decode=True) or b"",
                                              mimetype=ctype, cid=cid))
    body = body.strip()  # the line ends the appends add around each piece; HTML ignores them
    return ParsedMail(
        message_id=normalize_message_id(_header(msg, "Message-ID")),
        subject=_header(msg, "Subject"),
        email_from=email_from,
        from_address=(addr or "").lower(),
        **_recipient_fields(lambda name: _values(msg, name)),
        date=_utc_date(_header(msg, "Date")),
        references=_header(msg, "References"),
        in_reply_to=_header(msg, "In-Reply-To"),
        body_html=body,
        attachments=tuple(attachments),
    )


def _rendered(name: str, value: str) -> str:
    """An unfolded header value as `parse_mail`'s policy renders it. For address headers the email package's
    structured parser splits addresses first and decodes names after (an encoded `Müller, Hans` stays one
    name), and a comment (`bbb@ddd.com (John X. Doe)`) is no display name, as for Odoo."""
    try:
        return str(email.policy.default.header_factory(name, value))
    except Exception:  # noqa: BLE001 - a value the parser cannot render: read it as written
        return decode_header_value(value)


def _raw_headers(msg: Message) -> dict[str, list[str]]:
    """Lower-case name → values as text (8-bit decoded, unfolded). compat32's own `get` hands back raw
    8-bit as `Header` objects whose text is replacement characters, and keeps the folding's line breaks."""
    out: dict[str, list[str]] = {}
    for name, value in msg.raw_items():
        out.setdefault(name.lower(), []).append(header_text(value))
    return out


def parse_headers(raw: bytes) -> ParsedMail:
    """Headers only, with the fast compat32 parser (≈10x cheaper than `parse_mail`): no body, no attachments.

    Enough for Message-ID, References/In-Reply-To, From and Subject (passthrough, events). Values are
    unfolded and decoded with routing.parse's helpers, so they read as `parse_mail` reads them."""
    msg = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(raw[:256 * 1024])
    headers = _raw_headers(msg)

    def first(name: str) -> str:
        values = headers.get(name.lower())
        return values[0] if values else ""

    sender = _rendered("From", first("From")) if first("From") else ""
    name, addr = _first_address(sender)
    email_from = format_address(name, addr) if addr else sender
    return ParsedMail(
        message_id=normalize_message_id(first("Message-ID")),
        subject=decode_header_value(first("Subject")), email_from=email_from, from_address=(addr or "").lower(),
        **_recipient_fields(lambda name: [_rendered(name, v) for v in headers.get(name.lower(), [])]),
        date=_utc_date(first("Date")), references=first("References"),
        in_reply_to=first("In-Reply-To"), body_html="",
    )


def msg_dict(mail: ParsedMail, *, author_id: int | None = None,
             partner_ids: tuple[int, ...] = ()) -> dict[str, Any]:
    """The serialisable msg_dict `message_new` accepts over RPC (spec §3.3); no recordsets, no bytes."""
    out: dict[str, Any] = {
        "subject": mail.subject, "email_from": mail.email_from, "from": mail.email_from,
        "to": mail.to_formatted, "cc": mail.cc_formatted, "recipients": mail.recipients_formatted,
        "body": mail.body_html, "date": mail.date,
        "message_id": mail.message_id or False, "references": mail.references,
        "in_reply_to": mail.in_reply_to, "partner_ids": list(partner_ids),
    }
    if author_id:
        out["author_id"] = author_id
    return out


_CID_SRC = re.compile(r"""(src\s*=\s*["']?)cid:([^"'\s>]+)""", re.IGNORECASE)


def referenced_cids(body_html: str) -> set[str]:
    """The Content-IDs the body shows inline (`<img src="cid:...">`)."""
    return {m.group(2) for m in _CID_SRC.finditer(body_html)}


def rewrite_cids(body_html: str, cid_to_attachment: dict[str, int], access_tokens: dict[int, str] | None = None
                 ) -> str:
    """`cid:` references → `/web/image/<attachment id>?access_token=<token>`, as Odoo 17's
    `_message_post_process_attachments` writes them: without the token the image is refused to anyone who
    reaches it through a portal link or a notification mail (external followers, customers)."""
    tokens = access_tokens or {}

    def repl(m: re.Match[str]) -> str:
        aid = cid_to_attachment.get(m.group(2))
        if not aid:
            return m.group(0)
        token = tokens.get(aid)
        return f"{m.group(1)}/web/image/{aid}" + (f"?access_token={token}" if token else "")

    return _CID_SRC.sub(repl, body_html)


def post_kwargs(mail: ParsedMail, *, subtype_xmlid: str, author_id: int | None, body_html: str | None = None,
                parent_id: int | None = None, attachment_ids: tuple[int, ...] = (),
                message_id: str | None = None) -> dict[str, Any]:
    """`message_post` keyword arguments as Odoo's gateway posts an incoming mail (spec §1.11, §3.4)."""
    out: dict[str, Any] = {
        "body": mail.body_html if body_html is None else body_html, "body_is_html": True,
        "subject": mail.subject, "message_type": "email", "subtype_xmlid": subtype_xmlid,
        "email_from": mail.email_from, "message_id": message_id or mail.message_id, "date": mail.date,
    }
    if author_id:
        out["author_id"] = author_id
    if parent_id:
        out["parent_id"] = parent_id
    if attachment_ids:
        out["attachment_ids"] = list(attachment_ids)
    return out


# ---------------------------------------------------------------------------------------- passthrough
_HEADER_END = re.compile(rb"\r?\n\r?\n")


def _split(raw: bytes) -> tuple[bytes, bytes, bytes]:
    """(header block, separator, body); a mail without a body gets an empty one."""
    m = _HEADER_END.search(raw)
    if not m:
        return raw, b"\r\n\r\n" if b"\r\n" in raw else b"\n\n", b""
    return raw[: m.start()], raw[m.start(): m.end()], raw[m.end():]


def _header_value(block: bytes, name: bytes) -> tuple[int, int] | None:
    """(start, end) of the first `name:` field (with its folded continuation lines) in a header block."""
    m = re.search(rb"(?im)^" + re.escape(name) + rb":[^\n]*(?:\n[ \t][^\n]*)*", block)
    return (m.start(), m.end()) if m else None


def references_fixup(raw: bytes, known_id: str | None) -> bytes:
    """Append `known_id` to References when References is present but lacks it (Odoo reads References only)."""
    if not known_id:
        return raw
    head, sep, body = _split(raw)
    span = _header_value(head, b"References")
    if span is None:
        return raw  # Odoo falls back to In-Reply-To itself
    field_bytes = head[span[0]:span[1]]
    if known_id.encode("ascii", "replace") in re.sub(rb"\s+", b"", field_bytes):
        return raw
    end = span[1]
    if head[end - 1:end] == b"\r":
        end -= 1
    return head[:end] + b" " + known_id.encode("ascii", "replace") + head[end:] + sep + body


def _encode_header_value(value: str) -> str:
    raw = value.encode("ascii", "surrogateescape")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return email.header.Header(text.strip(), "utf-8").encode()


def to_7bit(raw: bytes) -> bytes:
    """Re-encode 8-bit bodies as base64 and 8-bit headers as RFC 2047; 7-bit mail is returned untouched."""
    if raw.isascii():
        return raw
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    for part in msg.walk():
        for i, (name, value) in enumerate(list(part._headers)):  # noqa: SLF001 - header order must be kept
            if isinstance(value, str) and not value.isascii():
                if name.lower().startswith("content-"):
                    # structural: RFC 2047 would break its syntax; an 8-bit parameter loses its letters instead
                    fixed = value.encode("ascii", "surrogateescape").decode("ascii", "replace").replace("\ufffd", "?")
                else:
                    fixed = _encode_header_value(value)
                part._headers[i] = (name, fixed)  # noqa: SLF001
        if part.is_multipart():
            continue
        cte = str(part.get("Content-Transfer-Encoding", "")).lower().strip()
        try:
            payload = part.get_payload()
        except (UnicodeError, LookupError, ValueError):
            # compat32 decodes 8-bit text with the part's charset to return a str: a label like idna raises.
            # Such a payload is 8-bit, so it is re-encoded below like any other.
            payload = None
        if isinstance(payload, str) and payload.isascii():
            continue
        if cte in ("base64", "quoted-printable") and isinstance(payload, str):
            try:
                if payload.encode("ascii", "surrogateescape").isascii():
                    continue
            except UnicodeEncodeError:
                pass
        try:
            data = part.get_payload(decode=True) or b""
        except Exception:  # noqa: BLE001 - a broken part: carry its text as UTF-8 rather than fail the mail
            data = str(payload or "").encode("utf-8", "surrogateescape")
        del part["Content-Transfer-Encoding"]
        part.set_payload(base64.encodebytes(data).decode("ascii"))
        part["Content-Transfer-Encoding"] = "base64"
    try:
        out = msg.as_bytes(policy=email.policy.compat32.clone(linesep="\r\n"))
    except Exception:  # noqa: BLE001 - a structure the generator cannot write: degrade, never fail delivery
        out = raw.decode("ascii", "replace").replace("\ufffd", "?").encode("ascii")
    if not out.isascii():  # a preamble or epilogue with 8-bit text: last resort, never send garbage
        out = out.decode("ascii", "replace").encode("ascii", "replace")
    return out


def passthrough_raw(raw: bytes, recipients: tuple[str, ...] | list[str], *, known_parent_id: str | None = None,
                    extra_headers: tuple[tuple[str, str], ...] = ()) -> str:
    """The mail as `message_process` should get it: Delivered-To per recipient, References fix-up, 7-bit."""
    body = references_fixup(raw, known_parent_id)
    eol = b"\r\n" if b"\r\n" in body[:4096] else b"\n"
    lines = [f"Delivered-To: {r}".encode("ascii", "replace") for r in dict.fromkeys(recipients) if r]
    lines += [f"{k}: {v}".encode("ascii", "replace") for k, v in extra_headers]
    if lines:
        body = eol.join(lines) + eol + body
    return to_7bit(body).decode("ascii")


def needs_references_fixup(references: str, in_reply_to: str, known_parent_id: str | None) -> str | None:
    """The id to append: the thread's known id when References is non-empty and does not hold it."""
    if not known_parent_id or not references.strip():
        return None
    if known_parent_id in reference_ids(references):
        return None
    irt = reference_ids(in_reply_to) or ([normalize_message_id(in_reply_to)] if in_reply_to.strip() else [])
    if known_parent_id in [i for i in irt if i]:
        return known_parent_id
    return None

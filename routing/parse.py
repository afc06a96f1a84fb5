"""Parsing inbound mail for routing: tolerant, bounded, headers first.

Routing only needs headers (and, for bounce detectors, the MIME tree), so `parse_mail` runs the stdlib
compat32 parser — the fastest tolerant parser we measured (PERF-NOTES: 0.23 ms at 4 KB) — and decodes just
the headers routing reads. Nothing here raises on malformed input: problems become `defects` strings and
the message still gets a decision (limits exceeded → the router quarantines with that reason).

Odoo fails a whole mail on an unknown charset name (spec §1.1, §5.10); we map unknown or mislabelled
charsets through charset-normalizer and fall back to latin-1, so decoding always produces text.

`extract_content` (bodies, attachments, inline cid images) is separate: delivery calls it only when it
needs the content, not on the routing path.
"""

from __future__ import annotations

import codecs
import datetime as dt
import email
import email.header
import email.message
import email.utils
import re
from dataclasses import dataclass, field

from routing.threads import extract_ids, normalize_message_id

#: Charset names seen in the wild that Python's codec registry does not know (Odoo aliases the first two).
_CHARSET_ALIASES = {
    "iso-8859-8-i": "iso-8859-8", "iso-8859-8-e": "iso-8859-8", "x-unknown": "latin-1",
    "unknown-8bit": "", "x-user-defined": "latin-1", "ansi_x3.110-1983": "latin-1", "ks_c_5601-1987": "cp949",
    "x-mac-roman": "mac-roman", "windows-874": "cp874", "utf8": "utf-8", "unicode-1-1-utf-7": "utf-7",
    "_iso-2022-jp$esc": "iso-2022-jp", "gb2312": "gb18030", "gbk": "gb18030",
}


# ------------------------------------------------------------------------------------------ charsets
def _codec(charset: str | None) -> str | None:
    """The codec a charset label names, or None when it names no text encoding.

    The label comes from the sender, and Python's codec registry also holds codecs that are not charsets:
    bytes-to-bytes ones (bz2, zlib, hex, uu, base64) and rot13 raise LookupError on `bytes.decode`, and a
    NUL in the name makes `codecs.lookup` raise ValueError. Such a label says nothing about the text."""
    if not charset:
        return None
    name = charset.strip().strip("\"'").lower()
    name = _CHARSET_ALIASES.get(name, name)
    if not name:
        return None
    try:
        info = codecs.lookup(name)
    except (LookupError, ValueError):
        return None
    return info.name if getattr(info, "_is_text_encoding", True) else None


#: What decoding with a sender-named codec can raise: UnicodeError (idna, punycode: not only
#: UnicodeDecodeError, and they refuse the "replace" handler), LookupError, ValueError.
_DECODE_ERRORS = (UnicodeError, LookupError, ValueError)


def decode_bytes(data: bytes, charset: str | None = None) -> str:
    """Text from bytes whatever the label says: declared charset, UTF-8, charset-normalizer, latin-1."""
    codec = _codec(charset)
    if codec:
        try:
            return data.decode(codec)
        except _DECODE_ERRORS:
            pass  # mislabelled: guess below
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    if len(data) >= 8:
        try:
            from charset_normalizer import from_bytes

            best = from_bytes(data).best()
            if best is not None:
                return str(best)
        except Exception:  # noqa: BLE001 - a guesser failing must not fail the mail
            pass
    if codec:
        try:
            return data.decode(codec, "replace")
        except _DECODE_ERRORS:
            pass
    return data.decode("latin-1")  # every byte is a latin-1 character: this cannot fail


def _unescape(value: str) -> str:
    """compat32 keeps raw 8-bit header bytes as surrogate escapes; turn them into real text."""
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return decode_bytes(value.encode("utf-8", "surrogateescape"))


def decode_header_value(value: object) -> str:
    """RFC 2047 decoded text of one header value; unknown charsets and raw 8-bit never raise."""
    if value is None:
        return ""
    text = _unescape(str(value))
    if "=?" not in text:
        return _WS_FOLD.sub(" ", text).strip()
    try:
        parts = email.header.decode_header(text)
    except Exception:  # noqa: BLE001 - malformed encoded words: keep the raw text
        return _WS_FOLD.sub(" ", text).strip()
    out: list[str] = []
    for chunk, charset in parts:
        out.append(chunk if isinstance(chunk, str) else decode_bytes(chunk, charset))
    return _WS_FOLD.sub(" ", "".join(out)).strip()


_WS_FOLD = re.compile(r"\r?\n[ \t]*")
_LINE_BREAKS = re.compile(r"[\r\n]+")


def header_text(value: object) -> str:
    """A raw header value as text, unfolded: 8-bit bytes decoded (compat32 keeps them as surrogate escapes)
    and each line break of the folding removed with the whitespace after it kept (RFC 5322 §2.2.3), which is
    how Odoo's parser reads a folded Subject. Encoded words are left for `decode_header_value`."""
    if value is None:
        return ""
    return _LINE_BREAKS.sub("", _unescape(str(value))).strip()


# ----------------------------------------------------------------------------------------- ParsedMail
@dataclass(frozen=True)
class ParsedMail:
    """The routing view of one message. `msg` is the stdlib tree (bounce detectors read it).

    Address lists hold bare addresses, lower-cased (Odoo compares lower-cased addresses; so do we), in
    header order, without duplicates.
    """

    msg: email.message.Message
    size: int
    message_id: str | None
    subject: str
    from_addr: str | None
    from_name: str
    to: tuple[str, ...] = ()
    cc: tuple[str, ...] = ()
    delivered_to: tuple[str, ...] = ()
    x_original_to: tuple[str, ...] = ()
    resent_to: tuple[str, ...] = ()
    resent_cc: tuple[str, ...] = ()
    return_path: str | None = None
    references: str = ""            # raw (unfolded) header values: routing.threads normalises them
    in_reply_to: str = ""
    date: dt.datetime | None = None
    content_type: str = "text/plain"
    header_count: int = 0
    part_count: int = 1
    mime_depth: int = 0
    defects: tuple[str, ...] = ()
    limit_exceeded: str | None = None  # "too many headers" / "too many parts" / "too deep"
    raw_headers: dict[str, tuple[str, ...]] = field(default_factory=dict)  # lower-case name → raw values

    def header(self, name: str) -> str:
        """First value of a header, decoded ("" when absent)."""
        values = self.raw_headers.get(name.lower())
        return decode_header_value(values[0]) if values else ""

    def header_all(self, name: str) -> tuple[str, ...]:
        """Every value of a header, decoded."""
        return tuple(decode_header_value(v) for v in self.raw_headers.get(name.lower(), ()))

    def has_header(self, name: str) -> bool:
        return name.lower() in self.raw_headers

    @property
    def reference_ids(self) -> list[str]:
        return extract_ids(self.references)


def parse_addresses(values: list[object] | None) -> tuple[str, ...]:
    """Bare, lower-cased addresses from header values; junk without '@' is skipped, never raised on."""
    if not values:
        return ()
    texts = [_unescape(str(v)) for v in values]
    try:
        pairs = email.utils.getaddresses(texts)
    except Exception:  # noqa: BLE001
        pairs = [("", t) for t in texts]
    out: list[str] = []
    seen: set[str] = set()
    for _name, addr in pairs:
        addr = addr.strip().strip("<>").strip().lower()
        if "@" not in addr or " " in addr:
            continue
        if addr not in seen:
            seen.add(addr)
            out.append(addr)
    return tuple(out)


def _first_address(value: object) -> tuple[str | None, str]:
    if value is None:
        return None, ""
    text = _unescape(str(value))
    try:
        pairs = email.utils.getaddresses([text])
    except Exception:  # noqa: BLE001
        pairs = []
    for name, addr in pairs:
        addr = addr.strip().lower()
        if "@" in addr:
            return addr, decode_header_value(name)
    return None, decode_header_value(text)


def _parse_date(value: object) -> dt.datetime | None:
    if value is None:
        return None
    try:
        when = email.utils.parsedate_to_datetime(_unescape(str(value)).strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:  # naive dates are taken as UTC, as Odoo does
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.astimezone(dt.timezone.utc)


def _walk_limits(msg: email.message.Message, max_depth: int, max_parts: int) -> tuple[int, int, str | None]:
    """(parts, depth, limit hit) without recursion, so a MIME bomb cannot blow the stack."""
    parts = 0
    depth_seen = 0
    stack: list[tuple[email.message.Message, int]] = [(msg, 0)]
    while stack:
        part, depth = stack.pop()
        parts += 1
        depth_seen = max(depth_seen, depth)
        if depth > max_depth:
            return parts, depth_seen, "too deep"
        if parts > max_parts:
            return parts, depth_seen, "too many parts"
        payload = part.get_payload() if part.is_multipart() else None
        if isinstance(payload, list):
            stack.extend((p, depth + 1) for p in payload if isinstance(p, email.message.Message))
    return parts, depth_seen, None


#: Routing reads at most this much of a message. Headers and the parts that decide a route (DSN and ARF
#: reports, NDR text, auto-reply markers) come first; the stdlib parser costs ~10x a message's size in memory
#: (a 50 MB line peaked at 540 MB), so a 35 MB attachment must not be parsed just to route its mail.
MAX_ROUTING_BYTES = 4 * 1024 * 1024


def routing_view(raw: bytes, limit: int = MAX_ROUTING_BYTES) -> tuple[bytes, str | None]:
    """The prefix of `raw` that routing parses, cut at a line end, and a defect note when it was cut."""
    if len(raw) <= limit:
        return raw, None
    cut = raw.rfind(b"\n", 0, limit)
    view = raw[: cut + 1] if cut > 0 else raw[:limit]
    return view, f"routed on the first {len(view)} of {len(raw)} bytes"


def parse_mail(raw: bytes, *, max_headers: int = 1000, max_mime_depth: int = 20,
               max_parts: int = 500, max_bytes: int = MAX_ROUTING_BYTES) -> ParsedMail:
    """Parse raw bytes into the routing view; never raises on malformed mail (see `defects`)."""
    defects: list[str] = []
    raw, cut_note = routing_view(raw, max_bytes)
    if cut_note:
        defects.append(cut_note)
    try:
        msg = email.message_from_bytes(raw)
    except Exception as exc:  # noqa: BLE001 - the stdlib parser is tolerant, but be sure
        defects.append(f"unparseable: {exc.__class__.__name__}: {exc}")
        msg = email.message.Message()
        msg.set_payload(raw.decode("latin-1"))
    for d in msg.defects:
        defects.append(d.__class__.__name__)

    limit: str | None = None
    # raw_items: values as received (8-bit bytes kept as surrogate escapes), not compat32's lossy Header.
    collected: dict[str, list[str]] = {}
    header_count = 0
    for key, value in msg.raw_items():
        header_count += 1
        collected.setdefault(key.lower(), []).append(value if isinstance(value, str) else str(value))
    header_map = {k: tuple(v) for k, v in collected.items()}
    if header_count > max_headers:
        limit = "too many headers"
        defects.append(f"too many headers: {header_count} > {max_headers}")

    def first(name: str) -> str | None:
        values = header_map.get(name)
        return values[0] if values else None

    def all_of(name: str) -> list[object]:
        return list(header_map.get(name, ()))

    parts, depth, walk_limit = _walk_limits(msg, max_mime_depth, max_parts)
    if walk_limit:
        limit = limit or walk_limit
        if walk_limit == "too deep":
            defects.append(f"too deep: MIME nesting deeper than {max_mime_depth}")
        else:
            defects.append(f"too many parts: more than {max_parts}")

    from_addr, from_name = _first_address(first("from"))
    if first("from") is not None and from_addr is None:
        defects.append("From has no address")
    mid_raw = first("message-id")
    message_id = normalize_message_id(_unescape(str(mid_raw))) if mid_raw is not None else None
    if message_id is None:
        defects.append("no Message-ID")
    rp = first("return-path")
    return_path = None
    if rp is not None:
        rp_text = _unescape(str(rp)).strip()
        return_path = rp_text.strip("<>").strip().lower()  # "" for the null sender <>

    try:
        content_type = msg.get_content_type()
    except Exception:  # noqa: BLE001
        content_type = "text/plain"
        defects.append("bad Content-Type")

    return ParsedMail(
        msg=msg, size=len(raw), message_id=message_id,
        subject=decode_header_value(first("subject")),
        from_addr=from_addr, from_name=from_name,
        to=parse_addresses(all_of("to")),
        cc=parse_addresses(all_of("cc")),
        delivered_to=parse_addresses(all_of("delivered-to")),
        x_original_to=parse_addresses(all_of("x-original-to")),
        resent_to=parse_addresses(all_of("resent-to")),
        resent_cc=parse_addresses(all_of("resent-cc")),
        return_path=return_path,
        references=" ".join(_unescape(str(v)) for v in all_of("references")),
        in_reply_to=" ".join(_unescape(str(v)) for v in all_of("in-reply-to")),
        date=_parse_date(first("date")),
        content_type=content_type,
        header_count=header_count, part_count=parts, mime_depth=depth,
        defects=tuple(defects), limit_exceeded=limit, raw_headers=header_map,
    )


# -------------------------------------------------------------------------------------- full content
@dataclass(frozen=True)
class Attachment:
    filename: str
    content_type: str
    payload: bytes
    content_id: str | None = None  # without brackets; set for inline cid images
    inline: bool = False


@dataclass(frozen=True)
class Content:
    """Bodies and attachments, the way Odoo's `_message_parse_extract_payload` sees them (spec §1.1)."""

    text: str
    html: str
    attachments: tuple[Attachment, ...]
    defects: tuple[str, ...] = ()


_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def sanitize_filename(name: str | None, fallback: str = "attachment") -> str:
    """A filename safe to write anywhere: no path separators, no control characters, no leading dots."""
    if not name:
        return fallback
    parts = [p for p in re.split(r"[/\\]+", name) if p.strip() not in ("", ".", "..")]
    name = _CONTROL.sub("_", "_".join(parts)).strip().lstrip(".").strip()
    if len(name) > 200:
        stem, dot, ext = name.rpartition(".")
        name = (stem[:190] + dot + ext[:9]) if dot and len(ext) < 10 else name[:200]
    return name or fallback


def _h(part: email.message.Message, name: str) -> str:
    """A part header as text (compat32 hands back `Header` objects for raw 8-bit values)."""
    value = part.get(name)
    return _unescape(str(value)) if value is not None else ""


def _content_type_of(part: email.message.Message) -> str:
    raw = _h(part, "Content-Type").split(";", 1)[0].strip().lower()
    if raw == "binary/octet-stream":
        return "application/octet-stream"
    if raw == "pdf" or raw.startswith("pdf"):
        return "application/pdf"
    try:
        return part.get_content_type()
    except Exception:  # noqa: BLE001
        return "application/octet-stream"


def _part_text(part: email.message.Message, defects: list[str]) -> str:
    try:
        payload = part.get_payload(decode=True)
    except Exception as exc:  # noqa: BLE001
        defects.append(f"undecodable part: {exc}")
        payload = None
    if payload is None:
        raw = part.get_payload()
        return raw if isinstance(raw, str) else ""
    charset = part.get_content_charset()
    if charset is None and part.get_content_type() == "text/xml":
        charset = "utf-8"
    return decode_bytes(payload, charset)


def _filename(part: email.message.Message) -> str | None:
    try:
        name = part.get_filename()
    except Exception:  # noqa: BLE001 - broken RFC 2231 continuations
        name = None
    if name is None:
        return None
    name = str(name)
    return decode_header_value(name) if "=?" in name else _unescape(name)


def leaf_parts(root: email.message.Message) -> list[email.message.Message]:
    """Leaf parts in document order; an embedded message/rfc822 is one leaf (an attachment), not walked.

    A forwarded-as-attachment mail keeps the forwarder's body: the embedded message's parts are its own,
    not the outer mail's (Odoo stores such a part as one attachment, its bytes from `as_bytes()`)."""
    out: list[email.message.Message] = []
    stack = [root]
    while stack:
        part = stack.pop()
        if part is not root and part.get_content_type() == "message/rfc822":
            out.append(part)
            continue
        payload = part.get_payload() if part.is_multipart() else None
        if isinstance(payload, list):
            stack.extend(reversed([p for p in payload if isinstance(p, email.message.Message)]))
            continue
        out.append(part)
    return out


def embedded_bytes(part: email.message.Message) -> bytes:
    """The bytes of the message a message/rfc822 part carries (b"" when it is empty)."""
    inner = part.get_payload()
    if isinstance(inner, list) and inner:
        return inner[0].as_bytes()
    return b""


def extract_content(parsed: ParsedMail) -> Content:
    """Text/HTML bodies and attachments (filenames sanitised; cid images inline). Never raises.

    Rules follow Odoo: in multipart/alternative the HTML wins, several HTML parts are concatenated; parts
    with a filename or `attachment` disposition are attachments; other non-text parts become attachments
    named `attachment`; `binary/octet-stream` → application/octet-stream, `pdf` → application/pdf.
    """
    defects: list[str] = []
    texts: list[str] = []
    htmls: list[str] = []
    atts: list[Attachment] = []
    for part in leaf_parts(parsed.msg):
        ctype = _content_type_of(part)
        disposition = _h(part, "Content-Disposition").split(";", 1)[0].strip().lower()
        name = _filename(part)
        cid = _h(part, "Content-ID")
        norm_cid = normalize_message_id(cid) if cid else None
        cid_clean = norm_cid.strip("<>") if norm_cid else None
        is_body_text = ctype in ("text/plain", "text/html") and not name and disposition != "attachment"
        if is_body_text:
            (htmls if ctype == "text/html" else texts).append(_part_text(part, defects))
            continue
        try:
            payload = embedded_bytes(part) if part.is_multipart() else part.get_payload(decode=True)
        except Exception as exc:  # noqa: BLE001
            defects.append(f"undecodable attachment: {exc}")
            payload = None
        if payload is None:
            raw = part.get_payload()
            payload = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else b""
        if ctype == "message/rfc822" and not name:
            name = "message.eml"
        atts.append(Attachment(
            filename=sanitize_filename(name), content_type=ctype, payload=payload,
            content_id=cid_clean if (cid_clean and name) or (cid_clean and disposition == "inline") else None,
            inline=bool(cid_clean) and disposition != "attachment",
        ))
    html = "\n".join(h for h in htmls if h)
    return Content(text="\n".join(t for t in texts if t), html=html, attachments=tuple(atts),
                   defects=tuple(defects))


def parse_with_mailparser(raw: bytes) -> object | None:
    """mail-parser's view (used by the benchmark and as a second opinion); None when it cannot parse."""
    try:
        import mailparser

        return mailparser.parse_from_bytes(raw)
    except Exception:  # noqa: BLE001
        return None

"""What every NDR detector shares: the `Hit` it returns, the `Detector` protocol, and the text helpers.

A non-standard NDR is prose written for a human. Detectors read only the *notice* (the part the bouncing
server wrote), never the returned copy of our own message, whose headers are full of addresses that did not
bounce. `notice_text` finds that prose and `cut_returned` stops at the usual "original message follows"
markers, so each detector's patterns can stay small.
"""

from __future__ import annotations

import email.message
import html
import re
import weakref
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Hit:
    """One recipient a detector recognised as failed (or delayed), with the words that explain why."""

    recipient: str
    diagnostic: str | None = None
    status: str | None = None          # enhanced status code when the text carries one
    delayed: bool = False              # a warning: delivery is still being retried


class Detector(Protocol):
    """One NDR family. `detect` returns the failed recipients it recognises, or () when it does not apply."""

    name: str

    def detect(self, msg: email.message.Message) -> tuple[Hit, ...]: ...


# An address as it appears in NDR prose: no quotes, no spaces, a dotted domain (or a bracketed literal).
_ADDR_CORE = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,}"
ADDRESS_RE = re.compile(_ADDR_CORE + r"|[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@\[[0-9.]+\]")

#: Lines after which the notice is over and the returned copy (or its headers) begins.
_RETURNED_MARKERS = re.compile(
    r"""^[\s>|*=_-]*(?:
        -{2,}\s*below\s+(?:this|the\s+next)\s+line
      | -{2,}\s*original\s+message\s+follows
      | -{2,}\s*original\s+message\s*-{2,}
      | original\s+message\s+follows
      | original\s+message\s+as\s+received
      | -+\s*this\s+is\s+a\s+copy\s+of
      | -+\s*the\s+header\s+of\s+the\s+original\s+message
      | -+\s*message\s+header\s+follows
      | -+\s*message\s+body\s+suppressed
      | -+\s*returned\s+mail\s+follows
      | -+\s*returned\s+mail\s*-+
      | -+\s*start\s+of\s+returned\s+message
      | -+\s*header\s+of\s+the\s+source\s+mail
      | -+\s*attachment\s+is\s+a\s+copy
      | -+\s*mensaje\s+original
      | -+\s*forwarded\s+message
      | -+\s*the\s+header\s+and\s+top
      | -+\s*unsent\s+message\s+below
      | -+\s*original\s+message\s*-*
      | \|-+\s*message\s+text\s+follows
      | included\s+is\s+a\s+copy\s+of\s+the\s+message
      | your\s+message\s+reads\s+\(in\s+part\)
      | a\s+summary\s+of\s+the\s+undelivered\s+message
      | the\s+first\s+\d+\s+lines\s+of\s+your\s+original\s+message
      | a\s+copy\s+of\s+the\s+original\s+message\s+below
      | message\s+headers\s+follow
      | original\s+message\s+headers
      | original\s+message\s+details
      | here\s+is\s+a\s+copy\s+of\s+the\s+first\s+part
      | old\s+message:
    )""",
    re.IGNORECASE | re.VERBOSE | re.MULTILINE,
)

_TAG_RE = re.compile(r"<[^>]*>")
_BR_RE = re.compile(r"<\s*(?:br|/p|p|/div|div|/tr|tr|li)\b[^>]*>", re.IGNORECASE)
_MAX_TEXT = 64 * 1024


def decode_text(part: email.message.Message) -> str:
    """A text part's body as str, whatever its charset claims (unknown charsets fall back to latin-1)."""
    try:
        raw = part.get_payload(decode=True)
    except Exception:  # noqa: BLE001 - malformed transfer encodings must not stop classification
        raw = None
    if raw is None:
        payload = part.get_payload()
        return payload if isinstance(payload, str) else ""
    if not isinstance(raw, bytes):
        return str(raw)
    charset = part.get_content_charset() or "utf-8"
    try:
        return raw[:_MAX_TEXT].decode(charset, errors="replace")
    except (LookupError, ValueError):
        return raw[:_MAX_TEXT].decode("latin-1")


def html_to_text(markup: str) -> str:
    """Just enough HTML → text for NDR prose: line breaks kept, tags dropped, entities decoded."""
    text = _BR_RE.sub("\n", markup)
    text = _TAG_RE.sub("", text)
    return html.unescape(text).replace("\xa0", " ")


# Every detector reads the same notice; decoding it once per message keeps the detector list cheap.
_NOTICE_CACHE: "weakref.WeakKeyDictionary[email.message.Message, str]" = weakref.WeakKeyDictionary()


def notice_text(msg: email.message.Message) -> str:
    """The human-readable notice the bouncing server wrote: text parts outside any returned message.

    Parts inside message/rfc822 (the copy of our mail) and the machine-readable DSN parts are skipped;
    HTML-only notices are flattened. Returns at most 64 KiB. Cached per message object (weakly).
    """
    try:
        return _NOTICE_CACHE[msg]
    except (KeyError, TypeError):
        pass
    text = _notice_text(msg)
    try:
        _NOTICE_CACHE[msg] = text
    except TypeError:
        pass
    return text


def _notice_text(msg: email.message.Message) -> str:
    chunks: list[str] = []
    size = 0

    def visit(part: email.message.Message) -> None:
        nonlocal size
        if size >= _MAX_TEXT:
            return
        ctype = part.get_content_type()
        if ctype in ("message/rfc822", "text/rfc822-headers", "message/rfc822-headers",
                     "message/delivery-status", "message/global-delivery-status",
                     "message/feedback-report", "message/disposition-notification"):
            return
        payload = part.get_payload()
        if isinstance(payload, list):
            for sub in payload:
                if isinstance(sub, email.message.Message):
                    visit(sub)
            return
        # A multipart whose boundary is missing or truncated is left as one string: read it as text.
        if part.get_content_maintype() not in ("text", "multipart"):
            return
        if part.get("Content-Disposition", "").lower().startswith("attachment") and chunks:
            return
        body = decode_text(part)
        if ctype == "text/html" or (ctype == "text/plain" and "<br>" in body[:4000].lower()):
            body = html_to_text(body)
        chunks.append(body)
        size += len(body)

    try:
        visit(msg)
    except Exception:  # noqa: BLE001 - a broken MIME tree yields whatever text was reached
        pass
    return "\n".join(chunks)[:_MAX_TEXT]


def cut_returned(text: str) -> str:
    """The notice without the returned message that usually follows it."""
    m = _RETURNED_MARKERS.search(text)
    return text[: m.start()] if m else text


def clean_address(raw: str) -> str | None:
    """A bare, plausible address from NDR text (brackets, quotes, mailto:, trailing dots removed)."""
    raw = raw.strip().strip("<>\"'()[],;:.").strip()
    if raw.lower().startswith("mailto:"):
        raw = raw[7:]
    if raw.lower().startswith(("smtp:", "rfc822;")):
        raw = raw.split(":", 1)[1] if ":" in raw else raw.split(";", 1)[1]
    m = ADDRESS_RE.search(raw)
    if not m:
        return None
    addr = m.group(0).strip(".")
    local, _, domain = addr.rpartition("@")
    if not local or not domain or ".." in addr:
        return None
    return f"{local}@{domain.lower()}"


def addresses_in(text: str) -> list[str]:
    """Every plausible address in `text`, in order, without duplicates (case-insensitive)."""
    out: list[str] = []
    seen: set[str] = set()
    for m in ADDRESS_RE.finditer(text):
        addr = clean_address(m.group(0))
        if addr and addr.lower() not in seen:
            seen.add(addr.lower())
            out.append(addr)
    return out


_STATUS_RE = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.]*\d)")


def status_in(text: str | None) -> str | None:
    """The first enhanced status code (RFC 3463, e.g. "5.1.1") in a piece of NDR text."""
    if not text:
        return None
    m = _STATUS_RE.search(text)
    return ".".join(m.groups()) if m else None


def squash(text: str, limit: int = 500) -> str:
    """Whitespace-collapsed text, bounded, for the `diagnostic` field."""
    return " ".join(text.split())[:limit]


#: Local parts that name the reporting system, never a failed recipient.
SYSTEM_LOCALS = frozenset({"postmaster", "mailer-daemon", "mailerdaemon", "mdaemon", "hostmaster", "abuse",
                           "root", "noreply", "no-reply", "mail.delivery.system"})

# A line that *starts* with an address, after optional bullets, brackets, quotes or an "SMTP:" prefix.
_LEADING_RE = re.compile(
    r"^[ \t]*(?:[*>\-•]+[ \t]*)?(?:recipient:[ \t]*)?[<\[\"']?(?:smtp:)?"
    r"(?P<addr>" + _ADDR_CORE + r")[>\]\"']?(?P<rest>.*)$",
    re.IGNORECASE,
)


def is_system_address(addr: str) -> bool:
    return addr.rpartition("@")[0].lower() in SYSTEM_LOCALS


def recipient_blocks(text: str, *, max_diag_lines: int = 6, delayed: bool = False,
                     exclude: frozenset[str] = frozenset()) -> tuple[Hit, ...]:
    """Hits from NDR prose laid out as "address line, then explanation lines", the common shape of
    qmail, old Postfix, Exim, Exchange, Sendmail and many home-grown NDRs.

    Each line that starts with an address opens a hit; the rest of that line and the next lines (up to
    the next address line) are its diagnostic. A repeated address (Exim repeats it in the SMTP
    transcript) extends its first hit.
    """
    found: dict[str, list[str]] = {}
    order: list[str] = []
    current: str | None = None
    for line in text.splitlines():
        m = _LEADING_RE.match(line)
        addr = clean_address(m.group("addr")) if m else None
        if addr and not is_system_address(addr) and addr.lower() not in exclude:
            key = addr.lower()
            if key not in found:
                found[key] = []
                order.append(addr)
            current = key
            rest = m.group("rest").strip(" :;-\t") if m else ""
            if rest:
                found[key].append(rest)
            continue
        if current is not None and line.strip() and len(found[current]) < max_diag_lines:
            found[current].append(line.strip())
    hits = []
    for addr in order:
        diag = squash(" ".join(found[addr.lower()])) or None
        hits.append(Hit(recipient=addr, diagnostic=diag, status=status_in(diag), delayed=delayed))
    return tuple(hits)


def section_after(text: str, intro: re.Pattern[str]) -> str | None:
    """The text after the first match of `intro`, or None when the intro phrase is absent."""
    m = intro.search(text)
    return text[m.end():] if m else None


def sender_addresses(msg: email.message.Message) -> frozenset[str]:
    """Addresses an NDR is sent *to* or *from* (its own headers): never the failed recipient."""
    out: set[str] = set()
    for name in ("From", "To", "Return-Path", "Sender", "Reply-To"):
        try:
            value = str(msg.get(name) or "")
        except Exception:  # noqa: BLE001
            continue
        out.update(a.lower() for a in addresses_in(value))
    return frozenset(out)

"""Per-recipient rewrite of an outgoing mail: VERP Return-Path, open pixel, click-tracked links (pure).

Why a byte-level MIME walk instead of `email` parse + re-serialise: the generator rewraps headers, changes
line endings and re-encodes parts, which breaks signatures and makes every relayed copy differ from what Odoo
sent in ways nobody asked for. Here only the HTML leaf parts we track are decoded, edited and re-encoded
with their own transfer encoding (in a quoted-printable part, only the lines that changed); every other byte
(headers, boundaries, preambles, attachments, text parts) is copied as it was.

What is never rewritten (the recipient must reach it untouched):
- mailto:, tel:, anchors and any non-http(s) scheme;
- unsubscribe links: targets of List-Unsubscribe, and any URL containing "unsubscribe";
- links and pixels Odoo already tracks: automation_oca's ``/r/<code>/...`` links and
  ``/automation_oca/track/...`` pixel, mass mailing's ``/r/<code>/m/<id>`` and ``/mail/track/<id>/blank.gif``;
- our own tracking URLs (a mail relayed twice is not double-wrapped).
A mail carrying a DKIM-Signature is left alone entirely except for the envelope (rewriting would break the
signature; sign at the smarthost instead). So is an S/MIME or PGP signed or encrypted entity
(multipart/signed, multipart/encrypted, application/pkcs7-mime), wherever it sits in the MIME tree.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import html
import quopri
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message
from email.policy import compat32
from urllib.parse import urlsplit

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_HREF = re.compile(  # `\shref`: not the end of another attribute's name (data-href, xlink:href is fine either way)
    r"""(<(?:a|area)\b[^>]*?\shref\s*=\s*)(?:"([^"]*)"|'([^']*)'|([^\s"'>]+))""",
    re.IGNORECASE | re.DOTALL,
)
#: A character reference that ends with ";". html.unescape also decodes the legacy ones without it
#: ("&sect", "&para", "&curren", "&times"), which browsers leave alone inside an attribute when a letter, digit or
#: "=" follows: "?page=2&section=x" would have become "?page=2§ion=x" in the URL we sign and redirect to.
_CHAR_REF = re.compile(r"&(?:#[0-9]+|#[xX][0-9a-fA-F]+|[A-Za-z][A-Za-z0-9]*);")


def attribute_value(raw: str) -> str:
    """An HTML attribute's value as a browser reads it (for a URL: only references ending with ";")."""
    return _CHAR_REF.sub(lambda m: html.unescape(m.group(0)), raw) if "&" in raw else raw
_BODY_CLOSE = re.compile(r"</body\s*>", re.IGNORECASE)
_ODOO_TRACKED_PATHS = (
    re.compile(r"^/r/[A-Za-z0-9_-]+/(m|au)/\d"),       # mass mailing /r/<code>/m/<id>, automation_oca /r/<code>/au/<id>
    re.compile(r"^/automation_oca/track/"),             # automation_oca open pixel
    re.compile(r"^/mail/track/\d+/[^/]*blank\.gif$"),   # mass mailing open pixel (≤ 14)
    re.compile(r"^/mail/track/\d+/[^/]+/blank\.gif$"),   # mass mailing open pixel (≥ 15: /<id>/<token>/blank.gif)
)
#: link_tracker's other links, /r/<code> and /r/<code>/s/<sms>: Odoo counts their clicks, but the same shapes
#: are common elsewhere (reddit.com/r/<subreddit>/s/<share>), so they count as Odoo's only on the host of the
#: mail's Odoo links.
_ODOO_SHORT_LINK = re.compile(r"^/r/[A-Za-z0-9_-]+(/|$)")
#: Paths only an Odoo server serves: the hosts of such links in a mail are its Odoo's (`odoo_hosts`).
_ODOO_PATHS = re.compile(r"^/(mail/(view|track|unfollow|mailing|unsubscribe)|web([/#?]|$)|odoo(/|$)|mailing/|"
                         r"unsubscribe_from_list|r/[A-Za-z0-9_-]+/(m|au)/\d|automation_oca/)")
_ANGLE = re.compile(r"<([^>]*)>")
#: Entities whose bytes a signature covers or that are ciphertext (RFC 1847, RFC 3156, RFC 8551): a tracked
#: link or a pixel inside made the recipient's client report the signature as broken.
_SEALED_TYPES = frozenset({"multipart/signed", "multipart/encrypted", "application/pkcs7-mime",
                           "application/x-pkcs7-mime"})


@dataclass(frozen=True)
class RewriteOptions:
    """What to change in one recipient's copy.

    `click_url(url)` returns the signed tracking URL for a link; None disables click tracking.
    `pixel_url` None disables the open pixel. `return_path` replaces an existing Return-Path header.
    `own_prefix` is the tracking base URL, so links already pointing at us are never wrapped again.
    """

    return_path: str | None = None
    pixel_url: str | None = None
    click_url: Callable[[str], str] | None = None
    own_prefix: str | None = None
    never_track: frozenset[str] = field(default_factory=frozenset)  # exact URLs (List-Unsubscribe targets)


def list_unsubscribe_targets(header_value: str | None) -> frozenset[str]:
    """The URLs of a List-Unsubscribe header (RFC 2369: comma-separated, each in angle brackets)."""
    if not header_value:
        return frozenset()
    return frozenset(u.strip() for u in _ANGLE.findall(header_value) if u.strip())


def is_trackable_link(url: str, *, never_track: frozenset[str] = frozenset(),
                      own_prefix: str | None = None, odoo_hosts: frozenset[str] | None = None) -> bool:
    """True when a link may be wrapped in a click-tracking redirect (see the module docstring)."""
    url = url.strip()
    if not url or url in never_track:
        return False
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        return False
    if "unsubscribe" in url.lower():
        return False
    if own_prefix and url.startswith(own_prefix.rstrip("/") + "/"):
        return False
    return not is_odoo_tracked(url, odoo_hosts)


def is_odoo_tracked(url: str, odoo_hosts: frozenset[str] | None = None) -> bool:
    """Links and pixels Odoo (mass_mailing, automation_oca, link_tracker) already tracks: they must pass
    untouched. Another `/r/<code>…` is link_tracker's only on one of `odoo_hosts` (the mail's Odoo links' hosts,
    `odoo_hosts_of`); when the mail names no Odoo host (None or empty) it is left alone, as before."""
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return False
    if any(p.search(parts.path) for p in _ODOO_TRACKED_PATHS):
        return True
    if _ODOO_SHORT_LINK.search(parts.path):
        return not odoo_hosts or (parts.hostname or "") in odoo_hosts
    return False


def _href_value(m: re.Match[str]) -> str:
    """The URL an `_HREF` match holds (double-quoted, single-quoted or bare), entities undone."""
    raw = m.group(2) if m.group(2) is not None else m.group(3) if m.group(3) is not None else m.group(4)
    return attribute_value(raw).strip()


def odoo_hosts_of(text: str) -> frozenset[str]:
    """The hosts of the links in an HTML document whose paths only Odoo serves (/mail/view, /web, /odoo/,
    mass mailing's /r/<code>/m/…, /mailing/…): the mail's Odoo. reddit.com/r/Odoo/ in an Odoo notification
    was taken for a link_tracker link and never tracked."""
    hosts = set()
    for m in _HREF.finditer(text):
        try:
            parts = urlsplit(_href_value(m))
        except ValueError:
            continue
        if parts.hostname and _ODOO_PATHS.search(parts.path or "/"):
            hosts.add(parts.hostname)
    return frozenset(hosts)


def rewrite_html(text: str, opts: RewriteOptions) -> str:
    """Wrap trackable links and append the open pixel in one HTML document (str in, str out)."""
    if opts.click_url is not None:
        click_url = opts.click_url
        odoo_hosts = odoo_hosts_of(text)

        def _sub(m: re.Match[str]) -> str:
            url = _href_value(m)
            if not is_trackable_link(url, never_track=opts.never_track, own_prefix=opts.own_prefix,
                                     odoo_hosts=odoo_hosts):
                return m.group(0)
            return f'{m.group(1)}"{html.escape(click_url(url), quote=True)}"'

        text = _HREF.sub(_sub, text)
    if opts.pixel_url and not _has_our_pixel(text, opts):
        pixel = (f'<img src="{html.escape(opts.pixel_url, quote=True)}" width="1" height="1" alt="" '
                 f'style="border:0;width:1px;height:1px" />')
        closes = list(_BODY_CLOSE.finditer(text))
        if closes:
            at = closes[-1].start()
            text = text[:at] + pixel + text[at:]
        else:
            text = text + pixel
    return text


def _has_our_pixel(text: str, opts: RewriteOptions) -> bool:
    """A mail relayed through us twice (an Odoo server chained behind another, a resubmitted copy) already
    carries our open pixel: a second one counted every open twice."""
    return bool(opts.own_prefix) and f"{opts.own_prefix.rstrip('/')}/t/o/" in text


def rewrite_message(raw: bytes, opts: RewriteOptions) -> bytes:
    """One recipient's copy of `raw` with `opts` applied; bytes outside tracked HTML parts are kept."""
    head, sep, body = _split_head(raw)
    headers = _parse_headers(head)
    if opts.return_path is not None:
        head = _replace_header(head, b"Return-Path", f"<{opts.return_path}>".encode())
    if headers.get("DKIM-Signature") is not None:
        return head + sep + body
    if opts.click_url is None and not opts.pixel_url:
        return head + sep + body
    if not opts.never_track:
        opts = RewriteOptions(
            return_path=opts.return_path, pixel_url=opts.pixel_url, click_url=opts.click_url,
            own_prefix=opts.own_prefix, never_track=list_unsubscribe_targets(headers.get("List-Unsubscribe")),
        )
    state = _PixelState(pending=bool(opts.pixel_url))
    new_head, new_body = _rewrite_entity(head, headers, body, opts, state, depth=0)
    return new_head + sep + new_body


@dataclass
class _PixelState:
    pending: bool  # the pixel goes into the first HTML part only (an alternative's other HTML copies stay)


_MAX_DEPTH = 20


def _split_head(raw: bytes) -> tuple[bytes, bytes, bytes]:
    m = _HEADER_END.search(raw)
    if not m:
        return raw, b"", b""
    # Keep the head's final line break with the head: sep is the blank line itself.
    nl = raw[m.start():m.end()]
    first_nl = b"\r\n" if nl.startswith(b"\r\n") else b"\n"
    return raw[:m.start() + len(first_nl)], nl[len(first_nl):], raw[m.end():]


#: The headers the rewrite looks at; everything else is only copied.
_WANTED = frozenset({"content-type", "content-transfer-encoding", "content-disposition", "dkim-signature",
                     "list-unsubscribe"})


def scan_headers(head: bytes, wanted: frozenset[str]) -> dict[str, str]:
    """The first occurrence of each wanted header, unfolded (lower-case names). A line scan: the full
    `email` header parser costs more than the rest of the rewrite for a typical notification."""
    found: dict[str, str] = {}
    current: str | None = None
    for line in head.decode("latin-1").splitlines():
        if line[:1] in (" ", "\t"):
            if current is not None:
                found[current] += " " + line.strip()
            continue
        current = None
        name, sep, value = line.partition(":")
        key = name.strip().lower()
        if sep and key in wanted and key not in found:
            found[key] = value.strip()
            current = key
    return found


def _parse_headers(head: bytes) -> Message:
    msg = Message(policy=compat32)
    for name, value in scan_headers(head, _WANTED).items():
        msg[name] = value
    return msg


def _replace_header(head: bytes, name: bytes, value: bytes) -> bytes:
    pattern = re.compile(rb"(?im)^" + re.escape(name) + rb"[ \t]*:[^\r\n]*(?:\r?\n[ \t][^\r\n]*)*(\r?\n)")
    m = pattern.search(head)
    if not m:
        return head
    return head[:m.start()] + name + b": " + value + m.group(1) + head[m.end():]


def _rewrite_entity(head: bytes, headers: Message, body: bytes, opts: RewriteOptions, state: _PixelState,
                    depth: int) -> tuple[bytes, bytes]:
    if depth > _MAX_DEPTH:
        return head, body
    ctype = headers.get_content_type()
    if ctype in _SEALED_TYPES:
        return head, body
    if headers.get_content_maintype() == "multipart":
        boundary = headers.get_param("boundary")
        if not isinstance(boundary, str) or not boundary:
            return head, body
        return head, _rewrite_multipart(body, boundary.encode("latin-1", "replace"), opts, state, depth)
    if ctype != "text/html":
        return head, body
    disposition = (headers.get("Content-Disposition") or "").split(";", 1)[0].strip().lower()
    if disposition == "attachment":
        return head, body
    return _rewrite_html_part(head, headers, body, opts, state)


def _rewrite_multipart(body: bytes, boundary: bytes, opts: RewriteOptions, state: _PixelState,
                       depth: int) -> bytes:
    delim = re.compile(rb"(?m)(\r?\n)?^--" + re.escape(boundary) + rb"(--)?[ \t]*(\r?\n|$)")
    matches = list(delim.finditer(body))
    if not matches:
        return body
    out = [body[:matches[0].end()]]  # preamble and the first delimiter, as they were
    last_end = matches[0].end()
    for cur, nxt in zip(matches, matches[1:]):
        if cur.group(2):  # close delimiter: what follows is the epilogue
            break
        part = body[cur.end():nxt.start()]
        phead, psep, pbody = _split_head(part)
        if not psep and not pbody:
            out.append(part)
        else:
            new_head, new_body = _rewrite_entity(phead, _parse_headers(phead), pbody, opts, state, depth + 1)
            out.append(new_head + psep + new_body)
        out.append(body[nxt.start():nxt.end()])
        last_end = nxt.end()
    out.append(body[last_end:])
    return b"".join(out)


def _charset_of(headers: Message) -> str | None:
    charset = headers.get_content_charset() or "us-ascii"
    try:
        name = codecs.lookup(charset).name
    except LookupError:
        return None
    if name.startswith(("utf-16", "utf-32")):
        return None  # not ASCII-compatible: leave the part alone rather than risk corrupting it
    return "utf-8" if name == "ascii" else name


def _rewrite_html_part(head: bytes, headers: Message, body: bytes, opts: RewriteOptions,
                       state: _PixelState) -> tuple[bytes, bytes]:
    charset = _charset_of(headers)
    if charset is None:
        return head, body
    cte = (headers.get("Content-Transfer-Encoding") or "7bit").strip().lower()
    newline = b"\r\n" if b"\r\n" in body or b"\r\n" in head else b"\n"
    try:
        if cte == "base64":
            decoded = base64.b64decode(body, validate=False)
        elif cte == "quoted-printable":
            decoded = quopri.decodestring(body)
        elif cte in ("7bit", "8bit", "binary"):
            decoded = body
        else:
            return head, body
    except (binascii.Error, ValueError):
        return head, body
    text = decoded.decode(charset, "surrogateescape")
    part_opts = opts if state.pending else RewriteOptions(
        return_path=None, pixel_url=None, click_url=opts.click_url, own_prefix=opts.own_prefix,
        never_track=opts.never_track)
    new_text = rewrite_html(text, part_opts)
    if new_text == text:
        return head, body
    if part_opts.pixel_url:
        state.pending = False
    data = new_text.encode(charset, "surrogateescape")
    if cte == "base64":
        encoded = base64.encodebytes(data).replace(b"\n", newline)
        trailing = body[len(body.rstrip(b"\r\n")):]
        return head, encoded.rstrip(b"\r\n") + (trailing or b"")
    if cte == "quoted-printable":
        return head, _qp_reencode(body, decoded, data, newline)
    # 7bit/8bit: our URLs can make a line longer than SMTP allows (998); switch the part to
    # quoted-printable rather than emit an illegal line.
    if any(len(line) > 998 for line in data.split(b"\n")):
        new_head = _replace_header(head, b"Content-Transfer-Encoding", b"quoted-printable")
        if new_head == head:
            new_head = head + b"Content-Transfer-Encoding: quoted-printable" + newline
        return new_head, _qp_encode(data, newline)
    return head, data


def _qp_encode(data: bytes, newline: bytes) -> bytes:
    encoded = binascii.b2a_qp(data.replace(b"\r\n", b"\n"), istext=True)
    return encoded.replace(b"\n", newline) if newline != b"\n" else encoded


#: A hard line break in quoted-printable: an LF that does not end a soft break ("=" LF or "=" CR LF).
_QP_HARD_BREAK = re.compile(rb"\n(?<!=\n)(?<!=\r\n)")  # LF first: the engine jumps from LF to LF


def _qp_reencode(body: bytes, old: bytes, new: bytes, newline: bytes) -> bytes:
    """`new` (the rewritten decoding of the quoted-printable `body`, whose decoding was `old`) encoded again,
    keeping `body`'s own bytes for every line the rewrite did not touch.

    Quoted-printable encodes each hard line on its own, so a line that decodes the same can keep its encoding:
    the copy differs from what Odoo sent only in the lines holding a tracked link or the pixel, and only those
    pass through the encoder (encoding the whole part again was a quarter of a copy's rewrite). When the
    rewrite changed the number of lines (a link with a line break inside its href), the part is encoded whole.
    """
    old_lines = old.split(b"\n")
    new_lines = new.split(b"\n")
    encoded = _QP_HARD_BREAK.split(body)
    if not len(old_lines) == len(new_lines) == len(encoded):
        return _qp_encode(new, newline)
    # A changed line keeps its own line ending: CR only where it had one (the last line of a part has none; a
    # CR there was a lone CR before the boundary, which MIME does not allow).
    return b"\n".join([
        kept if was == now else
        (_qp_encode(now[:-1], b"\r\n") + b"\r" if now.endswith(b"\r") else _qp_encode(now, newline))
        for kept, was, now in zip(encoded, old_lines, new_lines)
    ])


# ------------------------------------------------------------------------------------------ 8-bit downgrade
def downgrade_8bit(raw: bytes) -> bytes | None:
    """`raw` with every 8-bit body part re-encoded in 7 bits (text quoted-printable, anything else base64), for
    a server that does not offer 8BITMIME (RFC 6152 §3: the client converts or does not send); None when that
    cannot be done faithfully: 8-bit bytes in a header section (that needs SMTPUTF8), a DKIM signature or an
    S/MIME/PGP entity over the bytes that would change, or 8-bit bytes where MIME allows no re-encoding
    (a message/* part, a preamble, an already encoded part).

    Only the parts holding 8-bit bytes change, as the rewrite changes only what it tracks."""
    if raw.isascii():
        return raw
    head, sep, body = _split_head(raw)
    if not head.isascii() or scan_headers(head, frozenset({"dkim-signature"})):
        return None
    entity = _downgrade_entity(head, _parse_headers(head), body, depth=0)
    return None if entity is None else entity[0] + sep + entity[1]


def _downgrade_entity(head: bytes, headers: Message, body: bytes, depth: int) -> tuple[bytes, bytes] | None:
    if body.isascii():
        return head, body
    ctype = headers.get_content_type()
    if depth > _MAX_DEPTH or ctype in _SEALED_TYPES or headers.get_content_maintype() == "message":
        return None
    newline = b"\r\n" if b"\r\n" in head else b"\n"
    if headers.get_content_maintype() == "multipart":
        boundary = headers.get_param("boundary")
        if not isinstance(boundary, str) or not boundary:
            return None
        new_body = _downgrade_multipart(body, boundary.encode("latin-1", "replace"), depth)
        return None if new_body is None else (_set_cte(head, b"7bit", newline, add=False), new_body)
    cte = (headers.get("Content-Transfer-Encoding") or "7bit").strip().lower()
    if cte not in ("7bit", "8bit", "binary"):
        return None  # quoted-printable or base64 with 8-bit bytes in it is broken already: not ours to guess
    if headers.get_content_maintype() == "text":
        return _set_cte(head, b"quoted-printable", newline), _qp_encode(body, newline)
    encoded = base64.encodebytes(body).replace(b"\n", newline)
    return _set_cte(head, b"base64", newline), encoded


def _downgrade_multipart(body: bytes, boundary: bytes, depth: int) -> bytes | None:
    delim = re.compile(rb"(?m)(\r?\n)?^--" + re.escape(boundary) + rb"(--)?[ \t]*(\r?\n|$)")
    matches = list(delim.finditer(body))
    if not matches or not body[:matches[0].start()].isascii():
        return None
    out = [body[:matches[0].end()]]
    last_end = matches[0].end()
    for cur, nxt in zip(matches, matches[1:]):
        if cur.group(2):
            break
        phead, psep, pbody = _split_head(body[cur.end():nxt.start()])
        if not phead.isascii():
            return None
        part = _downgrade_entity(phead, _parse_headers(phead), pbody, depth + 1)
        if part is None:
            return None
        out.append(part[0] + psep + part[1])
        out.append(body[nxt.start():nxt.end()])
        last_end = nxt.end()
    rest = body[last_end:]
    if not rest.isascii():
        return None
    out.append(rest)
    return b"".join(out)


def _set_cte(head: bytes, cte: bytes, newline: bytes, *, add: bool = True) -> bytes:
    """`head` with its Content-Transfer-Encoding set to `cte` (added when missing, if `add`)."""
    new_head = _replace_header(head, b"Content-Transfer-Encoding", cte)
    if new_head == head and add and not re.search(rb"(?im)^Content-Transfer-Encoding[ \t]*:", head):
        return head + b"Content-Transfer-Encoding: " + cte + newline
    return new_head

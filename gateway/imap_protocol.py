"""IMAP wire details the puller needs, as pure functions over aioimaplib's response lines.

aioimaplib hands back a command's untagged lines as a flat list (`bytes` lines, with each literal as its own
`bytearray` item); these helpers turn that into UIDs, message bytes and UID sets, so the puller reads as
"search, fetch, spool, act" and the parsing can be tested without a server.
"""

from __future__ import annotations

import base64
import datetime as dt
import imaplib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

_UIDVALIDITY = re.compile(rb"\[UIDVALIDITY (\d+)\]", re.IGNORECASE)
_UIDNEXT = re.compile(rb"\[UIDNEXT (\d+)\]", re.IGNORECASE)
_EXISTS = re.compile(rb"^(\d+) EXISTS", re.IGNORECASE)
_FETCH_START = re.compile(rb"^(\d+) FETCH \(", re.IGNORECASE)
_UID = re.compile(rb"\bUID (\d+)", re.IGNORECASE)
_INTERNALDATE = re.compile(rb'INTERNALDATE "[^"]+"', re.IGNORECASE)
_LITERAL = re.compile(rb"\{(\d+)\}$")
_SIZE = re.compile(rb"\bRFC822\.SIZE (\d+)", re.IGNORECASE)


@dataclass(frozen=True)
class MailboxStatus:
    """What SELECT told us: UIDVALIDITY decides whether our checkpoint still means anything."""

    uidvalidity: int
    uidnext: int | None
    exists: int | None


@dataclass(frozen=True)
class FetchedMessage:
    """One message from `UID FETCH (UID INTERNALDATE BODY.PEEK[])`: byte-exact as the server stores it."""

    uid: int
    raw: bytes
    internaldate: dt.datetime | None


def parse_select(lines: Iterable[bytes | bytearray]) -> MailboxStatus:
    """UIDVALIDITY (required by RFC 3501), UIDNEXT and EXISTS from a SELECT response."""
    validity = uidnext = exists = None
    for line in lines:
        if not isinstance(line, (bytes, bytearray)):
            continue
        if (m := _UIDVALIDITY.search(line)) is not None:
            validity = int(m.group(1))
        elif (m := _UIDNEXT.search(line)) is not None:
            uidnext = int(m.group(1))
        elif (m := _EXISTS.match(line)) is not None:
            exists = int(m.group(1))
    if validity is None:
        raise ValueError("SELECT response carries no UIDVALIDITY")
    return MailboxStatus(validity, uidnext, exists)


def parse_search(lines: Iterable[bytes | bytearray]) -> list[int]:
    """UIDs from a `UID SEARCH` response, ascending.

    aioimaplib strips the `SEARCH` keyword from the untagged line (`* SEARCH 1 2 3` arrives as `1 2 3`);
    a line that still carries it is accepted too. The tagged status text is not a list of numbers.
    """
    uids: list[int] = []
    for line in lines:
        if not isinstance(line, (bytes, bytearray)):
            continue
        tokens = bytes(line).split()
        if tokens and tokens[0].upper() == b"SEARCH":
            tokens = tokens[1:]
        if tokens and all(tok.isdigit() for tok in tokens):
            uids.extend(int(tok) for tok in tokens)
    return sorted(set(uids))


def has_exists(lines: Iterable[bytes | bytearray]) -> bool:
    """Whether pushed lines announce new mail (`n EXISTS`); EXPUNGE and flag changes do not."""
    return any(isinstance(line, (bytes, bytearray)) and _EXISTS.match(line.lstrip(b"* ")) for line in lines)


def parse_fetch(lines: Sequence[bytes | bytearray]) -> list[FetchedMessage]:
    """Messages from a `UID FETCH ... (UID INTERNALDATE BODY.PEEK[])` response.

    A literal follows the line that announced it (`... BODY[] {123}`); the UID may come before the literal or
    in the closing line after it (servers choose the order). Unsolicited FETCH lines (a flag changed in
    another session) carry no body and are skipped.

    The literal is whatever item follows its announcing line: aioimaplib stores it as a `bytearray`,
    `PullClient.uid_fetch` as `bytes` already (so it is taken as is, not copied: a copy of every literal here
    held each batch twice in memory).
    """
    out: list[FetchedMessage] = []
    i = 0
    n = len(lines)
    while i < n:
        line = lines[i]
        if not isinstance(line, (bytes, bytearray)) or not _FETCH_START.match(line):
            i += 1
            continue
        head = bytes(line)
        raw: bytes | None = None
        tail = b""
        if _LITERAL.search(head) and i + 1 < n and isinstance(lines[i + 1], (bytes, bytearray)):
            literal = lines[i + 1]
            raw = literal if type(literal) is bytes else bytes(literal)
            if i + 2 < n and isinstance(lines[i + 2], bytes) and not _FETCH_START.match(lines[i + 2]):
                tail = lines[i + 2]
                i += 3
            else:
                i += 2
        else:
            i += 1
        if raw is None:
            continue
        m = _UID.search(head) or _UID.search(tail)
        if m is None:
            continue
        out.append(FetchedMessage(int(m.group(1)), raw, _internaldate(head + b" " + tail)))
    return out


def parse_sizes(lines: Iterable[bytes | bytearray]) -> dict[int, int]:
    """UID → size in bytes from a `UID FETCH ... (UID RFC822.SIZE)` response.

    Unsolicited FETCH lines (flag changes) carry no RFC822.SIZE and are skipped; so is any literal (the item
    after a line ending in `{n}`), whatever it contains.
    """
    sizes: dict[int, int] = {}
    literal_next = False
    for line in lines:
        if literal_next or not isinstance(line, (bytes, bytearray)):
            literal_next = False
            continue
        literal_next = _LITERAL.search(line) is not None
        if not _FETCH_START.match(line):
            continue
        uid, size = _UID.search(line), _SIZE.search(line)
        if uid is not None and size is not None:
            sizes[int(uid.group(1))] = int(size.group(1))
    return sizes


def _internaldate(text: bytes) -> dt.datetime | None:
    m = _INTERNALDATE.search(text)
    if m is None:
        return None
    tup = imaplib.Internaldate2tuple(m.group(0))
    if tup is None:
        return None
    return dt.datetime(*tup[:6]).astimezone(dt.timezone.utc)


def uid_set(uids: Iterable[int]) -> str:
    """A compact IMAP sequence set: `1:4,7,9:12`. Short commands matter when a batch spans 500 UIDs."""
    ordered = sorted(set(uids))
    if not ordered:
        raise ValueError("empty UID set")
    parts: list[str] = []
    start = prev = ordered[0]
    for uid in ordered[1:]:
        if uid == prev + 1:
            prev = uid
            continue
        parts.append(f"{start}:{prev}" if start != prev else str(start))
        start = prev = uid
    parts.append(f"{start}:{prev}" if start != prev else str(start))
    return ",".join(parts)


def quote_mailbox(name: str) -> str:
    """A mailbox name as an IMAP quoted string (spaces, quotes and backslashes are legal in names), in modified
    UTF-7: IMAP4rev1 names are 7-bit, and Dovecot answers NO to raw UTF-8 unless UTF8=ACCEPT was enabled."""
    encoded = mutf7(name)
    return '"' + encoded.replace("\\", "\\\\").replace('"', '\\"') + '"'


def mutf7(name: str) -> str:
    """A mailbox name in RFC 3501 §5.1.3 modified UTF-7: printable ASCII as itself (`&` as `&-`), every run
    of other characters as `&` + base64 of its UTF-16BE with `,` for `/` and no padding + `-`."""
    out: list[str] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            b64 = base64.b64encode("".join(run).encode("utf-16-be")).decode("ascii")
            out.append("&" + b64.rstrip("=").replace("/", ",") + "-")
            run.clear()

    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            run.append(ch)
    flush()
    return "".join(out)


def chunks(items: Sequence[int], size: int) -> Iterable[Sequence[int]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def cut_batches(uids: Sequence[int], sizes: dict[int, int], max_count: int,
                max_bytes: int) -> list[tuple[list[int], int]]:
    """Consecutive batches of at most `max_count` UIDs and `max_bytes` bytes, each with its size in bytes.

    A batch's bodies are all in memory at once (the FETCH response, then the spool transaction), so a count
    alone let 100 attachments of 35 MB make one 3.5 GB batch. A message larger than `max_bytes` goes alone.
    A UID without a size (the server left it out of the SIZE fetch: expunged, or unreadable) counts 0 bytes:
    its body FETCH decides.
    """
    batches: list[tuple[list[int], int]] = []
    batch: list[int] = []
    total = 0
    for uid in uids:
        size = sizes.get(uid, 0)
        if batch and (len(batch) >= max_count or total + size > max_bytes):
            batches.append((batch, total))
            batch, total = [], 0
        batch.append(uid)
        total += size
    if batch:
        batches.append((batch, total))
    return batches

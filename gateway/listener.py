"""SMTP and LMTP listeners: aiosmtpd speaks the protocol, `SpoolHandler` gives the verdicts.

The handler answers RCPT from the alias table (550 5.7.1 foreign domain, 550 5.1.1 unknown user in a strict
domain, 451 4.3.0 while the aliases synced from Odoo have never been read) and DATA only once the message is durable in the spool (250), or 451 4.3.0 when the store failed.

Why a subclass of aiosmtpd's server at all: stock aiosmtpd reads DATA one line at a time in Python and parses
every address through the email header registry (PERF-NOTES.md: ≈3.4 µs a line, ≈350 µs a message). Here DATA
is read with one `readuntil(b"\\r\\n.\\r\\n")` (the stream buffer is searched in C), the checks RFC 5321/5322
ask for (line length, bare LF, NUL, 8-bit without 8BITMIME) are searches done in C over the whole message,
and plain `<local@domain>` addresses take a fast path. aiosmtpd keeps the conversation, EHLO, STARTTLS, AUTH.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope as SmtpEnvelope, Session, syntax

from gateway.config import ListenerConfig
from gateway.disk_space import FreeSpace, storage_refusal
from gateway.metrics import ACCEPTED, REFUSED
from gateway.session_limits import SessionLimits
from gateway.spool import Envelope, SpoolError, Spooler

log = logging.getLogger(__name__)

_FAST_ADDR = re.compile(r"\s*<([^<>\s\"\\()\[\],;:@]+@[^<>\s\"\\()\[\],;:@]+|)>(.*)\Z", re.S)
# RFC 5321 §4.1.2 Path, strictly: no RFC 5322 comments or folding (aiosmtpd's header-registry parser would
# read "$(touch x)@d" as "$@d" — a different address). Non-ASCII is allowed for SMTPUTF8 (RFC 6531).
_ATEXT = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~\u0080-\U0010ffff]"
_DOT_STRING = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"'
_LABEL = r"[A-Za-z0-9\u0080-\U0010ffff](?:[A-Za-z0-9\-\u0080-\U0010ffff]*[A-Za-z0-9\u0080-\U0010ffff])?"
_DOMAIN = rf"(?:{_LABEL}(?:\.{_LABEL})*\.?|\[[\x21-\x5a\x5e-\x7e]+\])"
_MAILBOX = rf"(?:{_DOT_STRING}|{_QUOTED})@{_DOMAIN}"
_PATH = re.compile(rf"\s*<(?:@{_DOMAIN}(?:,@{_DOMAIN})*:)?({_MAILBOX}|postmaster|)>(.*)\Z", re.S | re.I)
_BARE = re.compile(rf"\s*({_MAILBOX})(\s.*|)\Z", re.S)

_BARE_LF = re.compile(rb"\n(?<!\r\n)")
_DOT_LINE = re.compile(rb"\r\n\.")  # a line starting with a dot: the terminator, or one to un-stuff
_TERMINATOR = b"\r\n.\r\n"


def line_fault(data: bytes, limit: int) -> str | None:
    """"bare_lf" if a line ends in LF without CR, "long" if a line has more than `limit` characters before its
    CRLF (a bare CR counts as part of its line), else None.

    Neither check builds a list of lines (memory stays flat for a 25 MB message). Bare LF: one regex pass whose
    literal `\n` prefix lets the engine jump from newline to newline (54 µs per 100 KB). Long line: a walk
    that looks, from each line start, for the last LF within `limit + 2` bytes — found, every line up to it is
    short enough; not found, this line is too long — so it visits one point per ~1,000 bytes instead of every
    line (16 µs per 100 KB). Together 70 µs, where counting CRs and LFs and splitting took 185 µs on the
    listening loop's one core.
    """
    if _BARE_LF.search(data):
        return "bare_lf"
    return "long" if _has_long_line(data, limit) else None


def _has_long_line(data: bytes, limit: int) -> bool:
    """A line of more than `limit` characters before its CRLF (or before the end of `data`), given that every
    LF in `data` follows a CR."""
    window = limit + 2  # a line of exactly `limit` characters plus its CR, then its LF
    size = len(data)
    rfind = data.rfind
    start = 0
    while start + window <= size:
        last_lf = rfind(b"\n", start, start + window)
        if last_lf < 0:
            return True  # no LF within limit + 1 characters of this line's start (its CR included)
        start = last_lf + 1
    last_lf = rfind(b"\n", start)  # the tail is shorter than a window: only its last line can be long
    if last_lf >= 0:
        start = last_lf + 1
    return size - start > limit


def valid_utf8(arg: str) -> bool:
    """aiosmtpd decodes command arguments as UTF-8 with surrogateescape: a byte that is not UTF-8 becomes a
    lone surrogate, which no store can encode. Kept, it failed the whole group commit it landed in — one
    client's `EHLO \\xff` answered 451 to every message committed with it. Refused at the command instead
    (501 for HELO/EHLO, 553 for an address), as Postfix refuses bad UTF-8."""
    if arg.isascii():
        return True
    try:
        arg.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _ip(peer: Any) -> str | None:
    if isinstance(peer, (tuple, list)) and peer:
        return str(peer[0])
    return None


def peer_allowed(peer: Any, networks: list[Any]) -> bool:
    """True when the client address is inside one of the allowed networks (unix sockets always are)."""
    host = _ip(peer)
    if host is None:
        return True
    return _host_allowed(host, tuple(networks))


@functools.lru_cache(maxsize=4096)
def _host_allowed(host: str, networks: tuple[Any, ...]) -> bool:
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return any(addr in net for net in networks)


RcptVerdict = Callable[[str], tuple[str, str]]


@dataclass
class ListenerPolicy:
    """What the handler needs besides the spool: the RCPT check and the per-listener limits."""

    config: ListenerConfig
    rcpt_verdict: RcptVerdict
    accept_8bit_without_8bitmime: bool = True
    free_space: FreeSpace | None = None  # SQLite file stores: refuse at MAIL FROM when the disk is nearly full
    primary_domain: str = "localhost"  # where a domain-less RCPT TO:<postmaster> goes


NEEDS_SMTPUTF8 = "553 5.6.7 Non-ASCII address requires the SMTPUTF8 parameter (RFC 6531 §3.4)"


def mail_path_refusal(address: str, mail_options: list[str]) -> str | None:
    """The refusal of a MAIL FROM path itself (every listener, submission included), or None."""
    if not address.isascii() and not any(o.upper() == "SMTPUTF8" for o in mail_options):
        return NEEDS_SMTPUTF8
    return None


def rcpt_path_refusal(address: str, envelope: SmtpEnvelope) -> str | None:
    """The refusal of a RCPT TO path itself (every listener, submission included), or None."""
    if address == "<>":
        return "501 5.1.3 Bad recipient address syntax: the null path is for MAIL FROM only"
    if not address.isascii() and not envelope.smtp_utf8:
        return NEEDS_SMTPUTF8
    return None


class SpoolHandler:
    """aiosmtpd handler: every hook returns the reply line; nothing here blocks the event loop."""

    def __init__(self, writer: Spooler, policy: ListenerPolicy):
        self.writer = writer
        self.policy = policy
        self.name = policy.config.name or f"{policy.config.kind}:{policy.config.port}"
        self._accepted = ACCEPTED.labels(self.name)  # once: `labels()` takes a lock and a dict lookup

    def set_rcpt_verdict(self, verdict: RcptVerdict, primary_domain: str | None = None) -> None:
        """SIGHUP: swap the alias table without restarting the listener; with `primary_domain`, also where a
        bare RCPT TO:<postmaster> goes (the new file's first domain: the old one may no longer be served)."""
        self.policy.rcpt_verdict = verdict
        if primary_domain is not None:
            self.policy.primary_domain = primary_domain

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: SmtpEnvelope, address: str,
                          mail_options: list[str]) -> str:
        refusal = storage_refusal(self.policy.free_space, mail_options)
        if refusal is not None:
            REFUSED.labels(self.name, "452").inc()
            return refusal
        refusal = mail_path_refusal(address, mail_options)
        if refusal is not None:
            REFUSED.labels(self.name, refusal[:3]).inc()
            return refusal
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: SmtpEnvelope, address: str,
                          rcpt_options: list[str]) -> str:
        if len(envelope.rcpt_tos) >= self.policy.config.max_recipients:
            REFUSED.labels(self.name, "452").inc()
            return "452 4.5.3 Too many recipients"
        refusal = rcpt_path_refusal(address, envelope)
        if refusal is not None:
            REFUSED.labels(self.name, refusal[:3]).inc()
            return refusal
        if address.lower() == "postmaster":  # RFC 5321 §4.5.1: the domain-less form MUST be accepted
            address = f"postmaster@{self.policy.primary_domain}"
        verdict, why = self.policy.rcpt_verdict(address)
        if verdict == "no_relay":
            REFUSED.labels(self.name, "550").inc()
            return f"550 5.7.1 <{address}>: Relay access denied ({why})"
        if verdict == "unknown_user":
            REFUSED.labels(self.name, "550").inc()
            return f"550 5.1.1 <{address}>: Recipient address rejected: {why}"
        if verdict == "try_later":  # the gateway cannot tell yet (aliases not loaded): the sender retries
            REFUSED.labels(self.name, "451").inc()
            return f"451 4.3.0 <{address}>: Recipient address rejected: {why}; try again later"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: SmtpEnvelope) -> str:
        raw = envelope.original_content
        assert isinstance(raw, bytes)
        mail_from = envelope.mail_from or ""
        env = Envelope(
            mail_from="" if mail_from == "<>" else mail_from,
            rcpt_tos=tuple(envelope.rcpt_tos),
            client_addr=_ip(session.peer),
            helo=session.host_name,
            listener=self.name,
            source=self.policy.config.kind,
        )
        try:
            spool_id = await self.writer.store(raw, env)
        except Exception as exc:  # SpoolError, or the writer itself broken (a child that cannot start)
            if not isinstance(exc, SpoolError):  # aiosmtpd would answer 500 (permanent) with our error text
                log.exception("spool writer failed")
            REFUSED.labels(self.name, "451").inc()
            return self._per_rcpt(server, envelope, f"451 4.3.0 Temporary failure storing message "
                                                    f"({exc.__class__.__name__}); try again later")
        self._accepted.inc()
        return self._per_rcpt(server, envelope, f"250 2.0.0 Ok: queued as {spool_id}")

    @staticmethod
    def _per_rcpt(server: SMTP, envelope: SmtpEnvelope, line: str) -> str:
        """LMTP answers once per accepted recipient (RFC 2033 §4.2); SMTP once."""
        if isinstance(server, LMTP):
            return "\r\n".join(line for _ in envelope.rcpt_tos)
        return line


class LeanSMTPMixin:
    """DATA reading and address parsing that do their work in C, one idle timer per connection, replies
    without a drain each (see module docstring), and the listener's session limits. Used by the inbound
    listeners and the submission listener; `_check_content` is the hook for content rules (none by default)."""

    limits: SessionLimits | None = None  # set by the listener's protocol factory

    async def _handle_client(self) -> None:
        limits = self.limits
        if limits is None:
            await super()._handle_client()  # type: ignore[misc]
            return
        if limits.closing:  # accepted just before the listening socket closed, or a submission listener
            self._shut_down()
            return
        client = _ip(self.session.peer)  # type: ignore[attr-defined]
        refusal = limits.admit(client, self)
        if refusal is not None:
            self._disconnect(f"421 4.7.0 {self.hostname} Error: {refusal}; try again later")  # type: ignore[attr-defined]
            return
        try:
            await super()._handle_client()  # type: ignore[misc]
        finally:
            limits.leave(client, self)

    def _in_transaction(self) -> bool:
        """From an accepted MAIL FROM to the final reply to its DATA (the spool commit included) or RSET:
        aiosmtpd resets the envelope just before that reply is written."""
        envelope = self.envelope  # type: ignore[attr-defined]
        return envelope is not None and envelope.mail_from is not None

    def close_when_idle(self) -> None:
        """Shutdown (`SessionLimits.drain`): 421 and close now, unless inside a mail transaction — then right
        after its final reply (`push`)."""
        if not self._in_transaction():
            self._shut_down()

    def close_now(self) -> bool:
        """The drain's time is up: 421 and close even inside a transaction (`push` says nothing after a 421,
        so its DATA gets no 250). True when a transaction was cut off."""
        transport = self.transport  # type: ignore[attr-defined]
        cut = self._in_transaction() and transport is not None and not transport.is_closing()
        self._shut_down()
        return cut

    def _shut_down(self) -> None:
        transport = self.transport  # type: ignore[attr-defined]
        if transport is None or transport.is_closing():
            return
        host = self.hostname  # type: ignore[attr-defined]
        transport.write(f"421 4.3.2 {host} Service shutting down; try again later\r\n".encode())
        transport.close()

    def _listener_name(self) -> str:
        return str(getattr(self.event_handler, "name", "smtp"))  # type: ignore[attr-defined]

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        if not valid_utf8(arg):  # 553 5.1.3 (see `valid_utf8`)
            return None, None
        m = _FAST_ADDR.match(arg) or _PATH.match(arg) or _BARE.match(arg)
        if m:
            addr = m.group(1)
            return (addr or "<>"), m.group(2)
        return (None, None) if arg else ("", "")  # aiosmtpd answers 553 5.1.3 malformed address

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd cancels and re-arms a timer on every command; move a deadline instead and let one timer
        check it when it fires (same idle timeout, one allocation per connection instead of per command)."""
        loop = self.loop  # type: ignore[attr-defined]
        self._idle_deadline = loop.time() + (duration or self._timeout_duration)  # type: ignore[attr-defined]
        handle = self._timeout_handle  # type: ignore[attr-defined]
        if handle is None or handle.cancelled() or getattr(self, "_timer_at", 0.0) > self._idle_deadline:
            if handle is not None:
                handle.cancel()
            self._timer_at = self._idle_deadline
            self._timeout_handle = loop.call_at(self._idle_deadline, self._idle_check)

    def _idle_check(self) -> None:
        now = self.loop.time()  # type: ignore[attr-defined]
        if now < self._idle_deadline:
            self._timer_at = self._idle_deadline
            self._timeout_handle = self.loop.call_at(self._idle_deadline, self._idle_check)  # type: ignore[attr-defined]
        else:
            self._timeout_cb()

    def _timeout_cb(self) -> None:
        """Say why before closing, as Postfix does (aiosmtpd just drops the connection)."""
        transport = self.transport  # type: ignore[attr-defined]
        if transport is not None and not transport.is_closing():
            transport.write(f"421 4.4.2 {self.hostname} Error: timeout exceeded\r\n".encode())  # type: ignore[attr-defined]
            transport.close()

    async def smtp_HELO(self, hostname: str) -> None:
        if await self._bad_utf8(hostname):
            return
        await super().smtp_HELO(hostname)  # type: ignore[misc]

    async def smtp_EHLO(self, hostname: str) -> None:
        if await self._bad_utf8(hostname):
            return
        await super().smtp_EHLO(hostname)  # type: ignore[misc]

    async def _bad_utf8(self, arg: str | None) -> bool:
        if arg is None or valid_utf8(arg):
            return False
        await self.push("501 5.5.2 Syntax error: invalid UTF-8 in the command")  # type: ignore[attr-defined]
        return True

    async def push(self, status: str | bytes) -> None:
        """Write the reply; wait for the socket only when its buffer is actually filling up (replies are a
        few bytes: a drain per reply is a coroutine switch per command for nothing).

        Past `hard_error_limit` refusals in one session, or `auth_failure_limit` failed AUTHs, the client gets
        421 and is disconnected, as with Postfix's smtpd_hard_error_limit: otherwise one connection could
        probe thousands of recipient addresses, or passwords, a second."""
        transport = self.transport  # type: ignore[attr-defined]
        if transport is not None and transport.is_closing():
            return  # after our 421 nothing more is said: not a late 250, not a pipelined command's reply
        response = status if isinstance(status, bytes) else status.encode("utf-8" if self.enable_SMTPUTF8 else "ascii")  # type: ignore[attr-defined]
        self._writer.write(response + b"\r\n")  # type: ignore[attr-defined]
        if response[:1] in (b"4", b"5") and response[:3] != b"421":
            self._count_error(response[:3])
        limits = self.limits
        if limits is not None and limits.closing and response[3:4] != b"-" and not self._in_transaction():
            self._shut_down()  # shutdown: this was the final reply of the session's transaction, or no part of one
            return
        if transport is None or transport.get_write_buffer_size() > 65536:
            await self._writer.drain()  # type: ignore[attr-defined]

    hard_error_limit = 20
    auth_failure_limit = 3
    _errors = 0
    _auth_failures = 0

    def _count_error(self, code: bytes) -> None:
        self._errors += 1
        if code == b"535":
            self._auth_failures += 1
            if self.limits is not None:
                self.limits.auth.failed(_ip(self.session.peer))  # type: ignore[attr-defined]
        if self._errors < self.hard_error_limit and self._auth_failures < self.auth_failure_limit:
            return
        log.warning("%s: too many errors from %s; disconnecting", self._listener_name(),
                    _ip(self.session.peer))  # type: ignore[attr-defined]
        self._disconnect("421 4.7.0 Error: too many errors")

    def _disconnect(self, reply: str) -> None:
        """Answer `reply` (a 421), count it, and close the connection: the session limits' refusals."""
        REFUSED.labels(self._listener_name(), "421").inc()
        self._writer.write(reply.encode() + b"\r\n")  # type: ignore[attr-defined]
        transport = self.transport  # type: ignore[attr-defined]
        if transport is not None:
            transport.close()

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        """Refused outright while this client address has too many recent failures (`AuthFailures`)."""
        client = _ip(self.session.peer)  # type: ignore[attr-defined]
        wait = self.limits.auth.blocked_for(client) if self.limits is not None else 0.0
        if wait > 0:
            self._disconnect(f"421 4.7.0 Error: too many failed AUTH attempts from {client}; try again in "
                             f"{int(wait) + 1} s")
            return
        await super().smtp_AUTH(arg)  # type: ignore[misc]

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        """No new mail transaction once shutdown began, nor on a connection being closed: a MAIL FROM
        pipelined behind the DATA that got the last 250 would otherwise be stored without any reply."""
        transport = self.transport  # type: ignore[attr-defined]
        if transport is None or transport.is_closing() or (self.limits is not None and self.limits.closing):
            self._shut_down()
            return
        await super().smtp_MAIL(arg)  # type: ignore[misc]

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():  # type: ignore[attr-defined]
            return
        if await self.check_auth_needed("DATA"):  # type: ignore[attr-defined]
            return
        envelope = self.envelope  # type: ignore[attr-defined]
        if not envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")  # type: ignore[attr-defined]
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")  # type: ignore[attr-defined]
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")  # type: ignore[attr-defined]
        reader: asyncio.StreamReader = self._reader  # type: ignore[attr-defined]
        limit: int = self.data_size_limit or (1 << 40)  # type: ignore[attr-defined]
        reply = None
        saved_limit = reader._limit  # type: ignore[attr-defined]
        reader._limit = limit + 2 * len(_TERMINATOR)  # type: ignore[attr-defined]
        try:
            try:
                data, dot_lines = await self._read_data(reader, limit, self._reset_timeout)
            except asyncio.LimitOverrunError:
                await self._drain_data(reader)
                reply = f"552 5.3.4 Message size exceeds fixed maximum message size ({limit} bytes)"
                data, dot_lines = b"", False
        finally:
            reader._limit = saved_limit  # type: ignore[attr-defined]
        if reply is None:
            reply = self._check_content(data, envelope)
        if reply is not None:
            REFUSED.labels(self._listener_name(), reply[:3]).inc()
            if isinstance(self, LMTP):  # RFC 2033 §4.2: one reply per accepted recipient, refusals too
                reply = "\r\n".join(reply for _ in envelope.rcpt_tos)
            self._set_post_data_state()  # type: ignore[attr-defined]
            await self.push(reply)  # type: ignore[attr-defined]
            return
        if dot_lines:  # RFC 5321 §4.5.2 transparency; `_read_data` saw the lines starting with a dot
            data = (data[1:] if data.startswith(b"..") else data).replace(b"\r\n..", b"\r\n.")
        envelope.content = envelope.original_content = data
        try:
            status = await self._call_handler_hook("DATA")  # type: ignore[attr-defined]
        finally:
            self._set_post_data_state()  # type: ignore[attr-defined]
        await self.push(status)  # type: ignore[attr-defined]

    async def _read_data(self, reader: asyncio.StreamReader, limit: int,
                         progress: Callable[[], None] | None = None) -> tuple[bytes, bool]:
        """Everything up to CRLF.CRLF, copied out of the stream buffer exactly once, and whether any other line
        starts with a dot (dot-stuffing to undo).

        One regex pass over lines that start with a dot finds both: the terminator is such a line with
        nothing after the dot. `bytes.find` of the terminator alone took 42 µs per 100 KB (CRLF every 72
        bytes keeps its skip short) and a separate search for stuffed dots 30 µs more; this pass takes 30 µs.
        `readuntil()` would copy the message out and a slice would copy it again; then the emptied buffer keeps
        its allocation for the life of the connection. Here the message is copied once and the big buffer is
        dropped at once, so a 25 MB message costs ~2x its size at the peak, not 4x.

        `progress` is called whenever more bytes arrived (the session's idle timer: RFC 5321 §4.5.3.2 times
        out a DATA transfer per receive, not as a whole).
        """
        buf: bytearray = reader._buffer  # type: ignore[attr-defined]
        buf[:0] = b"\r\n"  # the first line is a line like the others (and an empty message is just ".\r\n")
        start = 0
        dot_lines = False
        search = _DOT_LINE.search
        while True:
            m = search(buf, start)
            while m is not None and len(buf) - m.end() >= 2:  # what follows the dot is here: decide
                if buf[m.end()] == 13 and buf[m.end() + 1] == 10:
                    break
                dot_lines = True
                m = search(buf, m.end())
            if m is not None and len(buf) - m.end() >= 2:
                idx = m.start()
                if idx > limit:  # the whole oversize message was already buffered when we first looked
                    raise asyncio.LimitOverrunError("message exceeds the size limit", idx)
                break
            # The 2 bytes put in front, and up to ".\r" of a terminator still arriving, are not the message's.
            if len(buf) - 4 > limit:
                raise asyncio.LimitOverrunError("message exceeds the size limit", len(buf))
            if reader.at_eof():
                raise asyncio.IncompleteReadError(bytes(buf), None)
            # next time, look again at an undecided dot line, or at a CRLF split across reads
            start = m.start() if m is not None else max(0, len(buf) - 2)
            await reader._wait_for_data("readuntil")  # type: ignore[attr-defined]
            if progress is not None:
                progress()
        data = bytes(memoryview(buf)[2:idx + 2])
        reader._buffer = bytearray(memoryview(buf)[idx + len(_TERMINATOR):])  # type: ignore[attr-defined]
        del buf
        reader._maybe_resume_transport()  # type: ignore[attr-defined]
        return data, dot_lines

    async def _drain_data(self, reader: asyncio.StreamReader) -> None:
        """Swallow an oversize DATA up to its terminator without keeping it (bounded memory)."""
        tail = b""
        while True:
            buf = reader._buffer  # type: ignore[attr-defined]
            if buf:
                chunk = bytes(buf)
                buf.clear()
            else:
                chunk = await reader.read(65536)
                if not chunk:
                    raise asyncio.IncompleteReadError(b"", None)
                self._reset_timeout()  # still arriving: inactivity, not the transfer's length, times out
            window = tail + chunk
            idx = window.find(_TERMINATOR)
            if idx >= 0:
                leftover = window[idx + len(_TERMINATOR):]
                if leftover:
                    reader._buffer[:0] = leftover  # type: ignore[attr-defined]
                return
            tail = window[-(len(_TERMINATOR) - 1):]

    def _check_content(self, data: bytes, envelope: SmtpEnvelope) -> str | None:
        """The refusal line for content this listener does not take, or None (default: takes anything)."""
        return None


class _InboundRules:
    """What the catchall listeners refuse, beyond size: checks at C speed, connection gate by network."""

    policy: ListenerPolicy

    async def _handle_client(self) -> None:
        if not peer_allowed(self.session.peer, self._networks):  # type: ignore[attr-defined]
            REFUSED.labels(self.event_handler.name, "554").inc()  # type: ignore[attr-defined]
            log.warning("refused connection from %s: not in allowed_networks", _ip(self.session.peer))  # type: ignore[attr-defined]
            await self.push("554 5.7.1 Client host rejected: not in allowed networks")  # type: ignore[attr-defined]
            self.transport.close()  # type: ignore[attr-defined]
            return
        await super()._handle_client()  # type: ignore[misc]

    def _check_content(self, data: bytes, envelope: SmtpEnvelope) -> str | None:
        """RFC 5321/5322 checks in single C-speed passes; returns the refusal line or None."""
        cfg = self.policy.config
        if b"\0" in data:
            return "554 5.6.0 Message contains NUL characters (RFC 5322 §2.3); not accepted"
        fault = line_fault(data, cfg.max_line_length)
        if fault == "bare_lf":
            return "554 5.6.0 Message contains bare <LF> line endings (RFC 5321 §2.3.8); not accepted"
        if fault == "long":
            return f"554 5.6.0 Message has a line longer than {cfg.max_line_length} characters (RFC 5322 §2.1.1)"
        eight_bit_declared = any(o.upper() == "BODY=8BITMIME" for o in envelope.mail_options) or envelope.smtp_utf8
        # isascii() tests eight bytes at a time: 4 µs per 100 KB, where a `[\x80-\xff]` regex took 413 µs.
        if not eight_bit_declared and not self.policy.accept_8bit_without_8bitmime and not data.isascii():
            return "554 5.6.1 8-bit data without BODY=8BITMIME (RFC 6152); not accepted"
        return None


class _MemberCache:
    """Stand-in for the `inspect` module inside aiosmtpd.smtp.

    aiosmtpd's `SMTP.__init__` runs `inspect.getmembers()` over the server and the handler for every new
    connection (≈0.3 ms each, measured: a quarter of the per-connection CPU with one message per connection).
    The names it looks for (`auth_*`) depend only on the class, so cache the names per class and bind them
    to each instance; everything else is delegated to the real module.
    """

    def __init__(self, real: Any):
        self._real = real
        self._names: dict[type, list[str]] = {}

    def getmembers(self, obj: Any, predicate: Any = None) -> list[tuple[str, Any]]:
        if predicate is not None:
            return self._real.getmembers(obj, predicate)
        names = self._names.get(type(obj))
        if names is None:
            names = self._names[type(obj)] = [n for n, _ in self._real.getmembers(obj) if n.startswith("auth_")]
        return [(n, getattr(obj, n)) for n in names]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


_DIR_CACHE: dict[type, list[str]] = {}


def _class_dir(obj: Any) -> list[str]:
    """`dir()` for aiosmtpd.smtp, cached per class. `SMTP.__init__` scans `dir(self)` for `smtp_*` and
    `dir(handler)` for `handle_*` on every connection: both are class attributes, so the names are the same
    for every instance of a class (values are still looked up on the instance)."""
    names = _DIR_CACHE.get(type(obj))
    if names is None:
        names = _DIR_CACHE[type(obj)] = [n for n in dir(obj) if n.startswith(("smtp_", "handle_"))]
    return names


_LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}


def _install_member_cache() -> None:
    import aiosmtpd.smtp as smtp_module

    original_sanitized_log = smtp_module.sanitized_log

    def sanitized_log(func: Any, msg: Any, *args: Any, **kwargs: Any) -> None:
        # aiosmtpd sanitises every command line twice (debug and info) before the logger checks its level.
        logger = getattr(func, "__self__", None)
        if logger is not None and not logger.isEnabledFor(_LOG_LEVELS.get(func.__name__, logging.INFO)):
            return
        original_sanitized_log(func, msg, *args, **kwargs)

    if not getattr(original_sanitized_log, "_mailgate_lazy", False):
        sanitized_log._mailgate_lazy = True  # type: ignore[attr-defined]
        smtp_module.sanitized_log = sanitized_log  # type: ignore[assignment]

    if not isinstance(smtp_module.inspect, _MemberCache):
        smtp_module.inspect = _MemberCache(smtp_module.inspect)  # type: ignore[assignment]
    smtp_module.dir = _class_dir  # type: ignore[attr-defined]  # module global shadows the builtin there


_install_member_cache()


class GatewaySMTP(_InboundRules, LeanSMTPMixin, SMTP):
    def __init__(self, handler: SpoolHandler, *, networks: list[Any], **kwargs: Any):
        self.policy = handler.policy
        self._networks = networks
        super().__init__(handler, **kwargs)


class GatewayLMTP(_InboundRules, LeanSMTPMixin, LMTP):
    def __init__(self, handler: SpoolHandler, *, networks: list[Any], **kwargs: Any):
        self.policy = handler.policy
        self._networks = networks
        super().__init__(handler, **kwargs)

    async def smtp_LHLO(self, arg: str) -> None:
        if await self._bad_utf8(arg):
            return
        await super().smtp_LHLO(arg)


def tls_context(cfg: ListenerConfig) -> ssl.SSLContext | None:
    if not cfg.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    return ctx


async def start_listener(cfg: ListenerConfig, handler: SpoolHandler, *, hostname: str | None = None,
                         limits: SessionLimits | None = None) -> asyncio.base_events.Server:
    """Bind one SMTP or LMTP listener; returns the asyncio server (close() it to stop accepting). `limits`:
    its session caps, when the caller keeps them to change on reload."""
    loop = asyncio.get_running_loop()
    networks = tuple(cfg.networks())
    ctx = tls_context(cfg)
    cls = GatewayLMTP if cfg.kind == "lmtp" else GatewaySMTP
    limits = limits or SessionLimits.of(cfg)

    def factory() -> SMTP:
        protocol = cls(handler, networks=networks, data_size_limit=cfg.max_message_size, enable_SMTPUTF8=True,
                       decode_data=False, hostname=hostname, tls_context=ctx, require_starttls=cfg.require_tls,
                       timeout=cfg.idle_timeout, loop=loop)
        protocol.limits = limits
        return protocol

    server = await loop.create_server(factory, host=cfg.host, port=cfg.port, reuse_address=True)
    return server


def bound_port(server: asyncio.base_events.Server) -> int:
    return int(server.sockets[0].getsockname()[1])

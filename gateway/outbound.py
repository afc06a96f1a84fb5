"""The outbound delivery worker: relayed copies → smarthost or MX, SMTP result → delivered/deferred/bounced.

Copies come from two places: straight from the submission listener in this process (fast path, already
leased), and from the store (`outbound_queue` rows whose lease expired or whose retry is due), which is how
a restart, another node, or a deferred retry picks them up. Each copy is one SMTP transaction to one
recipient, because each carries its own VERP envelope sender and tracking tokens.

Destinations: a configured smarthost, or the recipient domain's MX hosts (dnspython; by preference, the
domain's A/AAAA as implicit MX when it has none, RFC 5321 §5.1; a null MX (RFC 7505) is a hard bounce).
To an MX, STARTTLS when offered and plaintext when it fails (opportunistic, RFC 7435); to the smarthost, as
`smarthost_tls` says. 8-bit mail goes with BODY=8BITMIME where the server offers it, else converted to 7 bits
(quoted-printable / base64 per part, `routing.rewrite.downgrade_8bit`), else deferred (RFC 6152).
Connections are kept open and reused per host. The worker caps concurrent transactions per destination and
serves destinations in turn, as Postfix's qmgr does, so a slow or dead destination holds back only its own
mail. Retries follow RFC 5321 §4.5.4.1: growing intervals (from `retry_min_seconds` up to
`retry_max_seconds`) until the give-up horizon (`max_attempts_hours`), after which the copy bounces with
reason `expired`. A copy that fails for good gets a DSN to its return path, put into the inbound spool with
the failure (`failure_dsn`; docs/design.md §16), so Odoo hears of the bounce.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import email.utils
import functools
import hashlib
import ipaddress
import logging
import random
import re
import socket
import ssl
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiosmtplib
from aiosmtplib.protocol import normalize_message_line_endings
from sqlalchemy import Connection, ColumnElement, Engine, and_, bindparam, delete, func, not_, or_, select, update

from aliases.model import AliasTable
from aliases.names import normalize_domain
from gateway.config import Config, secret as env_secret
from gateway.fastsql import execute_many
from gateway.outbox import EventDraft, record_events, spool_event_seed
from gateway.relay import QueuedCopy, reverse_path, verp_domain
from gateway.relay_batch import Committer
from gateway.schema import outbound_mails, outbound_queue, outbound_recipients
from gateway.spool import Envelope, header_block, insert_messages
from gateway.store import as_utc, utcnow
from routing.bounce_status import classify_status
from routing.rewrite import downgrade_8bit
from routing.tokens import verp_address

log = logging.getLogger(__name__)

DB_LEASE = dt.timedelta(minutes=15)
#: How long, at shutdown, copies being sent may take to finish before they are cut off.
DRAIN_SECONDS = 10.0
#: How often the worker extends the leases of the copies it holds: well inside DB_LEASE (and the relay's
#: FAST_PATH_LEASE), so a backlog that outlasts a lease is not claimed by another node and sent twice.
LEASE_RENEWAL = DB_LEASE / 3
#: Copies waiting in memory per delivery slot, at most, before the poller stops claiming: copies of a destination
#: at its cap wait in memory. The poller also leaves a capped destination's copies in the store while it has some
#: waiting, so this bound is reached only when many destinations are slow at once.
WAITING_PER_SLOT = 16
#: How many copies, per delivery slot, the submission fast path may keep waiting in memory. Past it a copy is
#: released in the store (its lease cleared) for the poller to claim when slots free up: Odoo submits a mass
#: mailing far faster than destinations take it, and every copy held meant its bytes in memory (measured
#: before: 5,000 copies of 100 KB held, +479 MB).
FASTPATH_PER_SLOT = 4 * WAITING_PER_SLOT


# ------------------------------------------------------------------------------------------ pure decisions
@dataclass(frozen=True)
class SmtpResult:
    """What one delivery attempt to one recipient came to."""

    outcome: str                 # "delivered" | "deferred" | "bounced"
    code: int | None = None
    status: str | None = None    # enhanced status code, e.g. "5.1.1"
    text: str = ""
    remote_mta: str | None = None
    # The connection broke after the whole message was sent: the host may have taken it, so this attempt
    # must not hand it to another MX as well (retrying later risks a duplicate too, but not two at once).
    uncertain: bool = False


# RFC 3463 / RFC 2034: the enhanced code opens the reply text (anything later, e.g. an IP address, is not one).
_ENHANCED = re.compile(r"\s*([245])\.(\d{1,3})\.(\d{1,3})(?![.\d])")

def enhanced_status(code: int, text: str) -> str | None:
    """The enhanced status code at the start of a reply's text, when its class agrees with the reply code
    (RFC 3463 §2: a `450 5.1.1` is contradictory, and the basic code is the one that counts)."""
    m = _ENHANCED.match(text or "")
    if m is None or int(m.group(1)) != code // 100:
        return None
    return ".".join(m.groups())


def classify_reply(code: int, text: str, remote_mta: str | None = None) -> SmtpResult:
    """2xx delivered, 4xx deferred, 5xx bounced — with the enhanced status code when the reply has one."""
    status = enhanced_status(code, text)
    if 200 <= code < 300:
        return SmtpResult("delivered", code, status, text, remote_mta)
    if 400 <= code < 500:
        return SmtpResult("deferred", code, status or "4.0.0", text, remote_mta)
    return SmtpResult("bounced", code, status or "5.0.0", text, remote_mta)


def bounce_reason(result: SmtpResult) -> str:
    """A reason from the fixed vocabulary (routing.model.BOUNCE_REASONS) for an SMTP failure.

    The inbound DSN classifier's (`routing.bounce_status.classify_status`): a refusal answered here and the
    same refusal coming back later as a DSN must get one reason, or the events contradict each other."""
    return classify_status(result.status, result.text)[0]


def bounce_kind(result: SmtpResult, reason: str) -> str:
    """Hard only where the inbound classifier says the address or account failed for good (unknown user or
    host, moved, no mail accepted, a disabled account, a failure the server declares permanent without a
    reason); soft for everything else: blocklists, spam filters, DMARC, size limits, a full mailbox, and
    expired retries. Calling those hard made Odoo blacklist good addresses after one policy refusal."""
    if reason == "expired" or result.outcome != "bounced":
        return "soft"
    return classify_status(result.status, result.text)[1]


def retry_delay(attempts: int, minimum: float, maximum: float) -> float:
    """Seconds until the next attempt after `attempts` failed ones: doubling from `minimum`, capped."""
    return min(maximum, minimum * (2 ** max(0, attempts - 1)))


def destination(recipient: str, *, smarthost: str | None) -> str:
    """The destination a copy counts against for the per-destination cap: the smarthost when there is one
    (it takes all our mail), else the recipient's domain."""
    return "smarthost" if smarthost else recipient.rsplit("@", 1)[-1].lower()


def order_mx(records: list[tuple[int, str]]) -> list[str] | None:
    """MX hosts by preference, hosts of equal preference in random order (RFC 5321 §5.1: so that load
    spreads across them); None for a null MX (RFC 7505: the domain takes no mail)."""
    if len(records) == 1 and records[0][1].strip(".") == "":
        return None
    hosts: list[str] = []
    for _, host in sorted(records, key=lambda r: (r[0], random.random())):
        host = host.rstrip(".")
        if host and host not in hosts:
            hosts.append(host)
    return hosts


# ------------------------------------------------------------------------------------------ destinations
#: Seconds to wait for the reply to the final dot, at least (RFC 5321 §4.5.3.2.6).
DATA_END_TIMEOUT = 600.0
#: How long a destination none of whose hosts could be reached counts as down: its copies are deferred
#: without connecting (Postfix's dead-destination memory). Without it each copy waited out its own connect
#: timeout (60 s) against a dead smarthost or MX, holding a delivery slot each time.
DEAD_DESTINATION_SECONDS = 60.0
#: How long one address of an MX host gets to connect and greet before the next is tried (Postfix's
#: smtp_connect_timeout is 30 s per address too).
MX_CONNECT_SECONDS = 30.0
#: How long an MX whose STARTTLS failed gets plaintext without trying TLS first (its fix may take a while;
#: trying on every connection would cost a failed handshake each time).
TLS_FALLBACK_SECONDS = 3600.0


class DestinationError(Exception):
    """No host could be reached for a destination; `permanent` when DNS says the domain takes no mail."""

    def __init__(self, message: str, *, permanent: bool = False, status: str = "4.4.1"):
        super().__init__(message)
        self.permanent = permanent
        self.status = status


class SmarthostLoginError(Exception):
    """The smarthost refused our credentials (or offers no AUTH): our configuration, not the mail, is wrong."""


def smarthost_password(config: Config) -> str | None:
    """The smarthost password when `smarthost_login` is set; a ConfigError naming the variable when it is unset
    or empty. Read as optional, a password lost in a deploy silently skipped AUTH: the smarthost answered 530
    and every copy in the queue bounced for good."""
    ob = config.outbound
    if not ob.smarthost_login:
        return None
    return env_secret(ob.smarthost_password_env, required=True,
                      what=f"outbound.smarthost_password_env (the password of smarthost login {ob.smarthost_login!r})")


def helo_problem(config: Config) -> str | None:
    """Why the EHLO name will not do for delivery by MX, or None (a smarthost takes any name we give it).

    Left unset it is `socket.getfqdn()`, which is "localhost" on many containers and VMs: MX hosts that ask for a
    fully qualified name (Postfix's reject_non_fqdn_helo_hostname, most large providers) refused every copy,
    and each refusal ended as a bounce."""
    ob = config.outbound
    if ob.smarthost:
        return None
    name = (ob.helo_name or socket.getfqdn()).strip().rstrip(".")
    literal = name.startswith("[") or name.replace(".", "").isdigit() or ":" in name
    if literal or "." not in name or name.lower().startswith("localhost"):
        return (f"outbound.helo_name: delivering by MX, the EHLO name must be this host's fully qualified domain "
                f"name (it would be {name!r}); MX hosts refuse others, and each refusal bounces the copy")
    return None


#: Enhanced codes by which a smarthost refuses the sender for who we are, not for the mail: authentication
#: required (5.7.0, RFC 4954 §6), relaying denied / not authorised (5.7.1).
_SETUP_STATUSES = frozenset({"5.7.0", "5.7.1"})
#: How often, at most, the same refusal of our own setup is logged as an error (one line per copy would
#: bury the log under a queue's worth of identical lines).
SETUP_ALARM_SECONDS = 60.0


def smarthost_setup_refusal(stage: str, result: SmtpResult) -> bool:
    """Whether the smarthost's refusal at `stage` ("MAIL" or "RCPT") is about our setup rather than the mail.

    Any 5xx to MAIL FROM is: the smarthost takes all our mail, and refusing our sender there means a missing
    login, a sender it does not let us use, an IP not allowed to relay. At RCPT, a 530, 5.7.0 or a relaying
    refusal says the same (Postfix refuses relaying at RCPT). Bouncing those bounced the whole queue for an
    operator's mistake; like Postfix's smtp_sasl_auth_soft_bounce, they are deferred until it is fixed."""
    if result.outcome != "bounced":
        return False
    if stage == "MAIL":
        return True
    relaying = classify_status(result.status, result.text)[0] == "norelaying"
    return result.code == 530 or result.status == "5.7.0" or relaying or (
        result.status in _SETUP_STATUSES and "relay" in result.text.lower())


Resolver = Callable[[str], Awaitable[list[tuple[str, int]]]]


def domain_syntax_error(domain: str) -> str | None:
    """Why `domain` cannot be a DNS name (an empty or over-long label, an over-long name, bad IDNA), or None.

    Such a domain never resolves, now or later: its mail is a permanent bounce, not a lookup to retry."""
    import dns.exception
    import dns.name

    try:
        dns.name.from_text(domain)
    except (dns.exception.SyntaxError, dns.name.NameTooLong, dns.name.IDNAException) as exc:
        return str(exc) or type(exc).__name__
    return None


async def _addresses(host: str, port: int) -> list[str]:
    """`host`'s addresses in the order to try them: getaddrinfo's (the system's preference first), the two
    families taking turns (RFC 8305 §4), each address once."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    by_family: dict[int, list[str]] = {}
    for family, _type, _proto, _name, sockaddr in infos:
        found = by_family.setdefault(family, [])
        if sockaddr[0] not in found:
            found.append(str(sockaddr[0]))
    queues = list(by_family.values())
    ordered: list[str] = []
    while any(queues):
        for queue in queues:
            if queue:
                ordered.append(queue.pop(0))
    return ordered


def address_literal_host(domain: str) -> str:
    """The IP address of an address literal (`[192.0.2.7]`, `[IPv6:2001:db8::7]`, RFC 5321 §4.1.3): mail to
    it goes to that host, with no DNS (the listener accepts such recipients; looked up as a name, each got
    NXDOMAIN and bounced). Only a globally routable address: one on loopback, a private or link-local
    network would let a recipient address aim the relay at hosts beside it — ourselves included."""
    text = domain[1:-1] if domain.endswith("]") else domain[1:]
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise DestinationError(f"{domain!r} is not an address literal (RFC 5321 §4.1.3)", permanent=True,
                               status="5.1.3") from None
    if not ip.is_global:
        raise DestinationError(f"{domain}: mail to an address literal outside the public internet is not "
                               "relayed", permanent=True, status="5.1.2")
    return str(ip)


def make_mx_resolver(port: int = 25, timeout: float = 10.0) -> Resolver:
    """Resolve a recipient domain to (host, port) candidates: MX by preference, else A/AAAA."""
    import dns.asyncresolver
    import dns.exception
    import dns.resolver

    resolver = dns.asyncresolver.Resolver()
    resolver.lifetime = timeout

    async def resolve(domain: str) -> list[tuple[str, int]]:
        if domain.startswith("["):
            return [(address_literal_host(domain), port)]
        bad = domain_syntax_error(domain)
        if bad is not None:
            raise DestinationError(f"{domain!r} is not a valid domain name: {bad}", permanent=True, status="5.1.3")
        try:
            answer = await resolver.resolve(domain, "MX")
            hosts = order_mx([(r.preference, r.exchange.to_text()) for r in answer])
            if hosts is None:
                raise DestinationError(f"{domain} has a null MX: it accepts no mail", permanent=True,
                                       status="5.1.10")
            return [(h, port) for h in hosts]
        except dns.resolver.NXDOMAIN:
            raise DestinationError(f"{domain} does not exist", permanent=True, status="5.1.2") from None
        except dns.resolver.NoAnswer:
            pass  # no MX: the domain itself is the implicit MX
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
            raise DestinationError(f"DNS lookup for {domain} failed: {exc}") from None
        # The domain itself: an address of either family will do. A failed AAAA lookup threw away a good A
        # answer (the mail waited for a retry); only when no address came back does a failure count.
        addrs: list[tuple[str, int]] = []
        failure: Exception | None = None
        for rdtype in ("A", "AAAA"):
            try:
                answer = await resolver.resolve(domain, rdtype)
                addrs.extend((r.to_text(), port) for r in answer)
            except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
                continue
            except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
                failure = exc
        if addrs:
            return addrs
        if failure is not None:
            raise DestinationError(f"DNS lookup for {domain} failed: {failure}")
        raise DestinationError(f"{domain} has no MX and no address", permanent=True, status="5.1.2")

    return resolve


class SmtpTransport:
    """Sends one copy to one recipient, reusing connections per host (the per-destination cap is the
    worker's: a send here never waits for a destination's turn)."""

    def __init__(self, config: Config, *, resolver: Resolver | None = None):
        ob = config.outbound
        self.ob = ob
        self.smarthost: tuple[str, int] | None = None
        if ob.smarthost:
            host, _, port = ob.smarthost.rpartition(":")
            self.smarthost = (host or ob.smarthost, int(port) if host and port.isdigit() else 25)
        self.resolver = resolver or make_mx_resolver(ob.mx_port)
        self.password = smarthost_password(config)
        self.helo = ob.helo_name
        # RFC 5321 §4.5.3.2.6: 10 minutes for the reply to the final dot. The server may still be scanning the
        # mail; giving up sooner defers a mail it then accepts, and every retry delivers it again.
        self.data_end_timeout = max(DATA_END_TIMEOUT, ob.timeout)
        self._plaintext_until: dict[tuple[str, int], float] = {}  # MX hosts whose STARTTLS failed
        self._host_pools: dict[tuple[str, int], list[aiosmtplib.SMTP]] = defaultdict(list)
        self._alarms: dict[str, float] = {}  # setup refusals logged, by text: when
        #: destinations none of whose hosts could be reached: until when they count as down, and the result
        self._down: dict[str, tuple[float, SmtpResult]] = {}

    async def close(self) -> None:
        for conns in self._host_pools.values():
            for smtp in conns:
                try:
                    smtp.close()
                except Exception:  # closing a dead connection
                    pass
        self._host_pools.clear()

    async def _connect(self, host: str, port: int) -> aiosmtplib.SMTP:
        if self.smarthost is None:
            return await self._connect_mx(host, port)
        tls_mode = self.ob.smarthost_tls  # explicit for the smarthost: no fallback to plaintext
        smtp = aiosmtplib.SMTP(hostname=host, port=port, local_hostname=self.helo, timeout=self.ob.timeout,
                               use_tls=tls_mode == "ssl", start_tls=tls_mode == "starttls", validate_certs=True)
        await smtp.connect()
        await _greet(smtp)
        if self.ob.smarthost_login:
            await self._login(smtp, host)
        return smtp

    async def _connect_mx(self, host: str, port: int) -> aiosmtplib.SMTP:
        """A connection to an MX at Postfix's "may" TLS level: STARTTLS when offered, and when that fails
        (a refusal or a broken handshake), plaintext, for this host for the next TLS_FALLBACK_SECONDS.

        Opportunistic TLS protects against passive snooping only (RFC 7435); refusing to deliver without it
        deferred or bounced the mail of every domain whose MX has a broken TLS setup."""
        now = asyncio.get_running_loop().time()
        if self._plaintext_until.get((host, port), 0.0) <= now:
            smtp = await self._open_mx(host, port)
            if not smtp.supports_extension("starttls"):
                return smtp
            try:
                await smtp.starttls(server_hostname=host, tls_context=_opportunistic_tls(), validate_certs=False)
                await _greet(smtp)
                return smtp
            except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError) as exc:
                smtp.close()
                log.info("outbound: STARTTLS with %s:%s failed (%s); delivering in plaintext", host, port,
                         exc or type(exc).__name__)
                self._remember_plaintext(host, port, now)
        return await self._open_mx(host, port)

    def _remember_plaintext(self, host: str, port: int, now: float) -> None:
        self._plaintext_until = {k: t for k, t in self._plaintext_until.items() if t > now}
        self._plaintext_until[(host, port)] = now + TLS_FALLBACK_SECONDS

    async def _open_mx(self, host: str, port: int) -> aiosmtplib.SMTP:
        """A connection to one of `host`'s addresses, each tried for at most MX_CONNECT_SECONDS (connect and
        greeting), the families taking turns (RFC 8305). Connecting by name gave all addresses one timeout:
        a black-holed IPv6 address (a host with an IPv6 route that goes nowhere) or a silent first address used
        it all up, and the IPv4 one that worked was never tried — every dual-stack MX deferred, for good."""
        last: BaseException = OSError(f"{host} has no address")
        for address in await _addresses(host, port):
            smtp = aiosmtplib.SMTP(hostname=address, port=port, local_hostname=self.helo, timeout=self.ob.timeout,
                                   start_tls=False, validate_certs=False)
            try:
                await asyncio.wait_for(smtp.connect(), min(self.ob.timeout, MX_CONNECT_SECONDS))
            except aiosmtplib.SMTPConnectResponseError:
                raise  # it answered, with a refusal: that is its answer, not an address to skip
            except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError) as exc:
                smtp.close()
                log.info("outbound: %s (%s) port %s: %s; trying its next address", host, address, port,
                         exc or type(exc).__name__)
                last = exc
                continue
            await _greet(smtp)
            return smtp
        raise last

    async def _login(self, smtp: aiosmtplib.SMTP, host: str) -> None:
        """AUTH at the smarthost. A refusal says nothing about the mail (an expired password, a locked
        account), so it must not bounce it: `_send_to` defers it, like Postfix's smtp_sasl_auth_soft_bounce."""
        assert self.ob.smarthost_login is not None and self.password is not None
        try:
            await smtp.login(self.ob.smarthost_login, self.password)
        except aiosmtplib.SMTPException as exc:
            smtp.close()
            detail = f"{exc.code} {exc.message}" if isinstance(exc, aiosmtplib.SMTPResponseException) else str(exc)
            raise SmarthostLoginError(f"smarthost {host} refused the login as {self.ob.smarthost_login!r}: "
                                      f"{detail}") from exc

    async def _hosts(self, recipient: str) -> list[tuple[str, int]]:
        if self.smarthost:
            return [self.smarthost]
        return await self.resolver(recipient.rsplit("@", 1)[-1].lower())

    async def send(self, mail_from: str, recipient: str, raw: bytes) -> SmtpResult:
        """One SMTP transaction; never raises for SMTP or network trouble (that is a result)."""
        dest = destination(recipient, smarthost=self.ob.smarthost)
        down = self._down.get(dest)
        if down is not None and time.monotonic() < down[0]:
            return dataclasses.replace(down[1], text=f"{down[1].text} (destination down: not tried again for "
                                                        f"{DEAD_DESTINATION_SECONDS:.0f} s)")
        try:
            hosts = await self._hosts(recipient)
        except DestinationError as exc:
            code = 550 if exc.permanent else 451
            return SmtpResult("bounced" if exc.permanent else "deferred", code, exc.status, str(exc))
        last = SmtpResult("deferred", 451, "4.4.1", "no host tried")
        reached = False
        for host, port in hosts:
            result = await self._send_to(host, port, mail_from, recipient, raw)
            reached = reached or result is not None
            if result is None:
                last = SmtpResult("deferred", 451, "4.4.1", f"cannot connect to {host}:{port}", f"{host}")
            elif result.outcome == "deferred" and not result.uncertain:
                last = result  # a 4xx (busy, greylisting, a local error there): the next MX may take it
            else:
                self._down.pop(dest, None)
                return result
        if reached or not hosts:
            self._down.pop(dest, None)
        else:  # no host of it answered at all: spare the copies behind this one their own connect timeouts
            self._down[dest] = (time.monotonic() + DEAD_DESTINATION_SECONDS, last)
        return last

    async def _send_to(self, host: str, port: int, mail_from: str, recipient: str,
                       raw: bytes) -> SmtpResult | None:
        """Result of the transaction at one host, or None when the host could not be reached at all."""
        idle = self._host_pools[(host, port)]
        while idle:
            smtp = idle.pop()
            if not smtp.is_connected:
                continue
            result = await self._transaction(smtp, host, mail_from, recipient, raw, reused=True)
            if result is not None:
                return result
            # The pooled connection had gone stale (server timeout): fall through to a fresh one.
        try:
            smtp = await self._connect(host, port)
        except SmarthostLoginError as exc:
            self._alarm(str(exc))
            return SmtpResult("deferred", 454, "4.7.0", str(exc), host)
        except aiosmtplib.SMTPConnectResponseError as exc:
            return _refused_greeting(classify_reply(exc.code, exc.message, host))
        except aiosmtplib.SMTPResponseException as exc:
            result = classify_reply(exc.code, exc.message, host)
            return result if result.outcome != "delivered" else None
        except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError) as exc:
            log.info("outbound: cannot connect to %s:%s: %s", host, port, exc)
            return None
        return await self._transaction(smtp, host, mail_from, recipient, raw, reused=False)

    async def _transaction(self, smtp: aiosmtplib.SMTP, host: str, mail_from: str, recipient: str, raw: bytes,
                           *, reused: bool) -> SmtpResult | None:
        """One MAIL/RCPT/DATA; None only when a reused connection turned out dead before MAIL was answered.

        Commands go through aiosmtplib's `execute_command` rather than `sendmail`: sendmail re-parses both
        addresses with the email package's parser (four parses per mail) and normalises the line endings of
        the whole message twice, which was a fifth of the relay's event-loop time (py-spy, bench/relay.py).
        Our addresses were parsed when the mail was accepted, and `wire_payload` normalises only when needed.
        """
        keep = False
        answered = False
        sent = False
        mail_from = wire_address(reverse_path(mail_from))  # a null sender stored as "<>" goes out as <>
        recipient = wire_address(recipient)
        try:
            utf8 = not (mail_from.isascii() and recipient.isascii())
            if utf8 and not smtp.supports_extension("smtputf8"):
                return SmtpResult("bounced", 553, "5.6.7", f"{host} does not support SMTPUTF8, needed for a "
                                  "non-ASCII address", host)
            body = _body_for(smtp, raw)
            if body is None:
                return SmtpResult("deferred", 451, "4.6.3", f"{host} does not offer 8BITMIME and this mail's "
                                  "8-bit content cannot be converted to 7 bits (8-bit headers, a DKIM or S/MIME "
                                  "signature over it, or 8-bit bytes in a message/* part)", host)
            payload, size = wire_payload(body)
            options = [b"SMTPUTF8"] if utf8 else []
            if not body.isascii():  # RFC 6152: 8-bit data is declared, and sent only where 8BITMIME is offered
                options.append(b"BODY=8BITMIME")
            if smtp.supports_extension("size"):
                options.append(b"SIZE=%d" % size)
            encoding = "utf-8" if utf8 else "ascii"
            reply = await smtp.execute_command(b"MAIL", b"FROM:<" + mail_from.encode(encoding) + b">", *options)
            answered = True
            if reply.code != 250:
                return await self._refused(smtp, reply, host, reused=reused, stage="MAIL")
            reply = await smtp.execute_command(b"RCPT", b"TO:<" + recipient.encode(encoding) + b">")
            if reply.code not in (250, 251):
                return await self._refused(smtp, reply, host, stage="RCPT")
            reply = await smtp.execute_command(b"DATA")
            if reply.code != 354:
                return await self._refused(smtp, reply, host)
            assert smtp.protocol is not None
            smtp.protocol.write(payload)
            sent = True
            reply = await smtp.protocol.read_response(timeout=self.data_end_timeout)
            keep = reply.code == 250
            return classify_reply(reply.code, reply.message, host)
        except aiosmtplib.SMTPServerDisconnected as exc:
            if reused and not answered:
                return None
            return SmtpResult("deferred", 451, "4.4.2", f"{host} closed the connection: {exc}", host,
                              uncertain=sent)
        except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError) as exc:
            # Lost the connection mid-transaction: the message may or may not have been taken; retrying
            # risks a duplicate, not a loss, which is SMTP's usual trade (RFC 5321 §6.1).
            return SmtpResult("deferred", 451, "4.4.2", f"connection to {host} failed: {exc}", host,
                              uncertain=sent)
        finally:
            idle = self._host_pools[(smtp.hostname or host, smtp.port or 0)]
            if keep and smtp.is_connected and len(idle) < self.ob.per_destination_concurrency:
                idle.append(smtp)
            else:
                try:
                    smtp.close()
                except Exception:  # closing a dead connection
                    pass

    async def _refused(self, smtp: aiosmtplib.SMTP, reply: aiosmtplib.SMTPResponse, host: str, *,
                       reused: bool = False, stage: str = "DATA") -> SmtpResult | None:
        """A refused MAIL, RCPT or DATA: reset the envelope (the connection is closed after anyway)."""
        if stage == "MAIL" and reused and reply.code == 421:  # a pooled connection the server had given up on
            return None
        if smtp.is_connected and reply.code != 421:
            try:
                await smtp.execute_command(b"RSET")
            except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError):
                pass
        result = classify_reply(reply.code, reply.message, host)
        if self.smarthost is not None and smarthost_setup_refusal(stage, result):
            self._alarm(f"smarthost {host} refused our {stage} with {reply.code} {reply.message} — a problem "
                        "with our login or relay permission there, not with the mail; copies are deferred "
                        "until it is fixed")
            return _as_deferral(result)
        return result

    def _alarm(self, message: str) -> None:
        """Log a problem of our own setup as an error, once per SETUP_ALARM_SECONDS for the same message."""
        now = asyncio.get_running_loop().time()
        if now - self._alarms.get(message, float("-inf")) >= SETUP_ALARM_SECONDS:
            self._alarms = {m: t for m, t in self._alarms.items() if now - t < SETUP_ALARM_SECONDS}
            self._alarms[message] = now
            log.error("outbound: %s", message)


_END_OF_DATA = b".\r\n"


def wire_address(address: str) -> str:
    """`address` with its domain in ASCII (IDNA A-label, `xn--…`) form. Only a non-ASCII local part needs
    SMTPUTF8 (RFC 6531 §3.2): `info@bücher.example` sent as `info@xn--bcher-kva.example` reaches any server,
    where as written it bounced 5.6.7 at every server without SMTPUTF8. A domain the IDNA codec refuses
    is kept as written (only SMTPUTF8 can carry it)."""
    local, at, domain = address.rpartition("@")
    if not at or domain.isascii():
        return address
    a_label = normalize_domain(domain)
    return f"{local}@{a_label}" if a_label.isascii() else address


def _body_for(smtp: aiosmtplib.SMTP, raw: bytes) -> bytes | None:
    """The message as this server may take it: as is when it is 7-bit or the server offers 8BITMIME, else
    downgraded to 7 bits (`routing.rewrite.downgrade_8bit`); None when it cannot be.

    8-bit data to a server that did not offer 8BITMIME breaks RFC 6152 §3; some servers mangle or refuse it.
    A mail that cannot be converted is deferred, not bounced: another MX of the domain may offer 8BITMIME."""
    if raw.isascii() or smtp.supports_extension("8bitmime"):
        return raw
    return downgrade_8bit(raw)


def wire_payload(raw: bytes) -> tuple[bytes, int]:
    """The DATA payload for `raw` — CRLF line endings, a final CRLF, dot-stuffed (RFC 5321 §4.5.2), ".\r\n" —
    and the message size for SIZE= (RFC 1870: with CRLFs, without the stuffed dots and the final dot).

    Three C-speed counts decide whether the line endings need aiosmtplib's normaliser at all; for mail we
    received over SMTP they never do."""
    n_lf = raw.count(b"\n")
    if n_lf != raw.count(b"\r") or n_lf != raw.count(b"\r\n"):
        raw = normalize_message_line_endings(raw)
    elif not raw.endswith(b"\r\n"):
        raw += b"\r\n"
    size = len(raw)
    if raw.startswith(b"."):
        raw = b"." + raw
    return raw.replace(b"\r\n.", b"\r\n..") + _END_OF_DATA, size


def _refused_greeting(result: SmtpResult) -> SmtpResult | None:
    """A host that refuses us at the greeting says nothing about the mail: even a 5xx there is temporary and
    the next MX is tried (Postfix's smtp_skip_5xx_greeting=yes). None for a 2xx that was not a 220."""
    if result.outcome == "delivered":
        return None
    return _as_deferral(result)


def _as_deferral(result: SmtpResult) -> SmtpResult:
    """A refusal kept as a temporary failure (its reply code and text unchanged, its status made 4.x.x)."""
    status = "4" + (result.status or "5.0.0")[1:]
    return dataclasses.replace(result, outcome="deferred", status=status)


async def _greet(smtp: aiosmtplib.SMTP) -> None:
    """EHLO (HELO if refused): the transaction reads the server's extensions (SIZE, SMTPUTF8, STARTTLS)."""
    if smtp.is_ehlo_or_helo_needed:
        try:
            await smtp.ehlo()
        except aiosmtplib.SMTPHeloError:
            await smtp.helo()


@functools.lru_cache(maxsize=1)
def _opportunistic_tls() -> ssl.SSLContext:
    # MX delivery: STARTTLS when offered, without certificate checks (RFC 7435 opportunistic security).
    # One context for every connection: create_default_context loads the system's CA bundle each time.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


# ------------------------------------------------------------------------------------------ DSN
#: The enhanced status of a DSN for a copy whose retries ran out (RFC 3463: delivery time expired).
EXPIRED_STATUS = "4.4.7"
#: How much of a failed copy's header section its DSN returns (text/rfc822-headers, RFC 6522), at most.
DSN_HEADERS_MAX = 64 * 1024


def returns_to_us(mail_from: str, table: AliasTable) -> bool:
    """Whether a copy's return path is in one of our domains (its VERP address, or with VERP off Odoo's own
    bounce address there): a DSN to it comes back through our inbound spool to Odoo. Never for the null
    sender: a bounce is not answered with a bounce (RFC 5321 §4.5.5)."""
    address = reverse_path(mail_from)
    return "@" in address and table.domain(address.rsplit("@", 1)[1]) is not None


def _dsn_line(value: str, limit: int = 900) -> str:
    """One header-safe DSN field value: no CR/LF (a multi-line SMTP reply becomes one line), bounded."""
    return " ".join(value.split())[:limit]


def _returned_headers(raw: bytes) -> bytes:
    """The copy's header section with CRLF line ends, cut at a line end within DSN_HEADERS_MAX."""
    lines = header_block(raw, DSN_HEADERS_MAX).replace(b"\r\n", b"\n").split(b"\n")
    return b"\r\n".join(line for line in lines if line)


def failure_dsn(copy: QueuedCopy, result: SmtpResult, *, expired: bool, reporting_mta: str,
                now: dt.datetime | None = None) -> bytes:
    """The RFC 3464 report (multipart/report, CRLF line ends) telling the copy's return path that it failed for
    good, with the copy's headers returned (text/rfc822-headers: how Odoo finds the mail and its notification).

    No loop marker (`routing.model.LOOP_HEADER`): the router must take it as a bounce for the VERP recipient,
    exactly as it takes one that came back from a remote MTA, not drop it as our own mail."""
    now = now or utcnow()
    domain = copy.mail_from.rsplit("@", 1)[1]
    recipient = _dsn_line(copy.recipient, 320)
    status = EXPIRED_STATUS if expired else (result.status or "5.0.0")
    answer = _dsn_line(f"{result.code or ''} {result.text}".strip()) or "no answer"
    seed = hashlib.sha256(f"{copy.rcpt_id}\0{copy.mail_from}\0{copy.message_id}".encode()).hexdigest()
    boundary = f"mailgate-dsn-{seed[:24]}"
    why = (f"it was not delivered within the retry period; the last answer was: {answer}" if expired
           else f"the receiving server answered: {answer}")
    dsn_fields = [f"Reporting-MTA: dns; {_dsn_line(reporting_mta, 255)}",
                  f"Arrival-Date: {email.utils.format_datetime(copy.created_at)}", "",
                  f"Final-Recipient: {'rfc822' if recipient.isascii() else 'utf-8'}; {recipient}",
                  "Action: failed", f"Status: {status}"]
    if result.remote_mta:
        dsn_fields.append(f"Remote-MTA: dns; {_dsn_line(result.remote_mta, 255)}")
    dsn_fields += [f"Diagnostic-Code: smtp; {answer}", f"Last-Attempt-Date: {email.utils.format_datetime(now)}"]
    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{domain}>",
        f"To: {copy.mail_from}",
        f"Subject: Undelivered Mail Returned to Sender: {recipient}",
        f"Date: {email.utils.format_datetime(now)}",
        f"Message-ID: <dsn.{seed[:32]}@{domain}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "", "This is a delivery status notification (RFC 3464).", "",
        f"--{boundary}", "Content-Type: text/plain; charset=utf-8", "",
        f"Your message {copy.message_id} could not be delivered to {recipient}: {why}", "",
        f"--{boundary}", "Content-Type: message/delivery-status", "",
        *dsn_fields, "",
        f"--{boundary}", "Content-Type: text/rfc822-headers", "", "",
    ]
    return ("\r\n".join(head).encode() + _returned_headers(copy.raw)
            + f"\r\n\r\n--{boundary}--\r\n".encode())


# ------------------------------------------------------------------------------------------ bookkeeping
_RCPT = outbound_recipients.c
_SET_STATE = (update(outbound_recipients).where(_RCPT.id == bindparam("rid"))
              .values(state=bindparam("state"), attempts=bindparam("attempts"), last_result=bindparam("last"),
                      next_attempt_at=bindparam("next_at"), delivered_at=bindparam("delivered_at")))
_SET_DEFERRED = (update(outbound_recipients).where(_RCPT.id == bindparam("rid"))
                 .values(state="deferred", attempts=bindparam("attempts"), last_result=bindparam("last"),
                         next_attempt_at=bindparam("next_at")))
_DROP_COPY = delete(outbound_queue).where(outbound_queue.c.recipient == bindparam("rid"))
_RELEASE_COPY = update(outbound_queue).where(outbound_queue.c.recipient == bindparam("rid")).values(lease_until=None)


@dataclass(frozen=True)
class Attempt:
    """One finished delivery attempt waiting to be recorded."""

    copy: QueuedCopy
    result: SmtpResult
    attempts: int
    next_attempt_at: dt.datetime | None
    expired: bool
    #: the DSN for the copy's return path when it failed for good (`OutboundWorker.failure_report`)
    dsn: bytes | None = None


def record_results(conn: Connection, batch: list[Attempt]) -> list[str]:
    """Store attempts' outcomes and their events in one transaction; returns each recipient's new state.

    Batched (executemany, one `record_events` call) because per-statement overhead, not SQLite, bounds the
    relay's throughput (bench/relay.py)."""
    now = utcnow()
    states: list[str] = []
    finals: list[dict[str, object]] = []
    deferred: list[dict[str, object]] = []
    drafts: list[EventDraft] = []
    settled = _settled_failures(conn, batch)
    dsn_ids = _spool_dsns(conn, [a for a in batch if a.copy.rcpt_id not in settled])
    for a in batch:
        copy, result, attempts = a.copy, a.result, a.attempts
        outcome = "bounced" if result.outcome == "deferred" and a.expired else result.outcome
        states.append(outcome)
        base = dict(message_id=copy.message_id, model=copy.model, res_id=copy.res_id, recipient=copy.recipient,
                    occurred_at=now)
        last = f"{result.code or ''} {result.text}".strip()[:2000]
        if outcome == "delivered":
            finals.append({"rid": copy.rcpt_id, "state": "delivered", "attempts": attempts, "last": last,
                           "next_at": None, "delivered_at": now})
            drafts.append(EventDraft(type="delivered", seed=f"out:{copy.rcpt_id}:delivered", **base, data={
                "remote_mta": result.remote_mta, "status": result.status or "2.0.0", "response": result.text,
                "attempts": attempts}))
        elif outcome == "deferred":
            deferred.append({"rid": copy.rcpt_id, "attempts": attempts, "last": last,
                             "next_at": a.next_attempt_at})
            drafts.append(EventDraft(type="deferred", seed=f"out:{copy.rcpt_id}:deferred:{attempts}", **base, data={
                "status": result.status, "diagnostic": result.text, "remote_mta": result.remote_mta,
                "attempts": attempts,
                "next_attempt_at": a.next_attempt_at.isoformat() if a.next_attempt_at else None}))
        else:
            reason = "expired" if result.outcome == "deferred" else bounce_reason(result)
            finals.append({"rid": copy.rcpt_id, "state": "bounced", "attempts": attempts, "last": last,
                           "next_at": None, "delivered_at": None})
            if settled.get(copy.rcpt_id) == "bounced":
                continue  # recorded by an earlier attempt, with its event (and DSN)
            drafts.append(EventDraft(type="bounced", seed=_bounced_seed(copy, dsn_ids.get(copy.rcpt_id)), **base, data={
                "kind": bounce_kind(result, reason), "reason": reason, "status": result.status,
                "diagnostic": result.text, "remote_mta": result.remote_mta, "via": "smtp", "attempts": attempts}))
    execute_many(conn, _SET_STATE, finals)
    execute_many(conn, _DROP_COPY, [{"rid": f["rid"]} for f in finals])
    execute_many(conn, _SET_DEFERRED, deferred)
    execute_many(conn, _RELEASE_COPY, [{"rid": d["rid"]} for d in deferred])
    record_events(conn, drafts)
    return states


def _settled_failures(conn: Connection, batch: list[Attempt]) -> dict[int, str]:
    """The recipients of copies failing for good here that an earlier attempt already settled (a copy sent
    twice, its lease having run out on a slow node): their state, delivered or bounced. They get no DSN (a
    delivered one did arrive; a bounced one has its DSN) and a bounced one no second event."""
    failing = [a.copy.rcpt_id for a in batch if a.result.outcome == "bounced" or a.expired]
    if not failing:
        return {}
    rows = conn.execute(select(_RCPT.id, _RCPT.state).where(_RCPT.id.in_(failing),
                                                            _RCPT.state.in_(("bounced", "delivered"))))
    return {r.id: r.state for r in rows}


def _spool_dsns(conn: Connection, batch: list[Attempt]) -> dict[int, int]:
    """Put the DSNs of copies that failed for good into the inbound spool, in the transaction that records the
    failures; returns the spool id of each, by recipient row.

    Addressed to the copy's VERP address with the null sender, each comes back through the router and
    delivery like a bounce a remote MTA sent: the VERP token names the recipient, and a hard bounce is
    registered in Odoo (message_bounce, the notification marked)."""
    reported = list({a.copy.rcpt_id: a for a in batch if a.dsn is not None}.values())  # once per copy
    ids = insert_messages(conn, [(a.dsn or b"", Envelope(mail_from="", rcpt_tos=(a.copy.mail_from,),
                                                         listener="dsn", source="relay")) for a in reported])
    return {a.copy.rcpt_id: spool_id for a, spool_id in zip(reported, ids)}


def _bounced_seed(copy: QueuedCopy, dsn_id: int | None) -> str:
    """The fact a relay `bounced` event names. With a DSN spooled it is the fact the inbound route records
    when it reads that DSN (`spool_event_seed`, as gateway.delivery `_bounce_events` does), so the two are one
    event id and the outbox keeps the first, the relay's (docs/design.md §16)."""
    if dsn_id is None:
        return f"out:{copy.rcpt_id}:bounced"
    return spool_event_seed(dsn_id, "bounced", copy.recipient)


def record_result(conn: Connection, copy: QueuedCopy, result: SmtpResult, *, attempts: int,
                  next_attempt_at: dt.datetime | None, expired: bool) -> str:
    """`record_results` for one attempt."""
    return record_results(conn, [Attempt(copy, result, attempts, next_attempt_at, expired)])[0]


def claim_due(conn: Connection, *, limit: int, secret: bytes, table: AliasTable, verp: bool,
              lease: dt.timedelta = DB_LEASE, exclude: frozenset[int] = frozenset(),
              skip_domains: frozenset[str] = frozenset()) -> list[QueuedCopy]:
    """Lease queued copies whose retry is due and whose lease (if any) expired.

    `exclude`: recipient ids this process already holds (queued in memory or being sent); an expired lease
    on one of those means a slow backlog, not a crashed node, and claiming it again would send it twice.
    `skip_domains`: recipient domains (lower case) whose copies stay in the store, because their destination
    is at its cap with copies already waiting in memory: claimed, a dead domain's due backlog filled each claim
    and the memory bound while other domains' due retries stayed behind it."""
    now = utcnow()
    q = (select(outbound_queue.c.recipient, outbound_queue.c.raw, outbound_recipients.c.recipient.label("rcpt"),
                outbound_recipients.c.attempts, outbound_recipients.c.mail, outbound_mails.c.message_id,
                outbound_mails.c.model, outbound_mails.c.res_id, outbound_mails.c.mail_from,
                outbound_mails.c.created_at)
         .join(outbound_recipients, outbound_recipients.c.id == outbound_queue.c.recipient)
         .join(outbound_mails, outbound_mails.c.id == outbound_recipients.c.mail)
         .where(or_(outbound_queue.c.lease_until.is_(None), outbound_queue.c.lease_until < now))
         .where(or_(outbound_recipients.c.next_attempt_at.is_(None), outbound_recipients.c.next_attempt_at <= now))
         .where(outbound_recipients.c.state.in_(("queued", "deferred")))
         .where(outbound_queue.c.recipient.not_in(exclude))
         .where(*_not_to_domains(skip_domains))
         .order_by(outbound_recipients.c.next_attempt_at)
         .limit(limit))
    if conn.dialect.name == "postgresql":
        q = q.with_for_update(skip_locked=True, of=outbound_queue)
    rows = conn.execute(q).all()
    if not rows:
        return []
    ids = [r.recipient for r in rows]
    conn.execute(update(outbound_queue).where(and_(outbound_queue.c.recipient.in_(ids)))
                 .values(lease_until=now + lease))
    copies = []
    for r in rows:
        dom = verp_domain(r.mail_from or "", table) if verp else None
        sender = verp_address(secret, r.recipient, dom) if dom else reverse_path(r.mail_from)
        copies.append(QueuedCopy(
            rcpt_id=r.recipient, recipient=r.rcpt, mail_id=r.mail, message_id=r.message_id, model=r.model,
            res_id=r.res_id, mail_from=sender, raw=r.raw, created_at=as_utc(r.created_at) or now,
            attempts=r.attempts,
        ))
    return copies


def _not_to_domains(domains: frozenset[str]) -> list[ColumnElement[bool]]:
    """Conditions leaving out recipients at `domains`: the address ends in '@domain' exactly when its domain
    (what follows the last '@', as `destination` reads it) is that domain."""
    addr = func.lower(outbound_recipients.c.recipient)
    escaped = (d.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") for d in sorted(domains))
    return [not_(addr.like(f"%@{d}", escape="\\")) for d in escaped]


def renew_leases(conn: Connection, rcpt_ids: list[int], *, lease: dt.timedelta = DB_LEASE) -> None:
    """Extend the leases of copies this process holds, so no poller (here or on another node) claims them.

    A copy whose lease was released (a deferral just recorded: NULL) is left alone: renewing it would
    postpone its retry by a whole lease."""
    until = utcnow() + lease
    for i in range(0, len(rcpt_ids), 500):
        conn.execute(update(outbound_queue)
                     .where(outbound_queue.c.recipient.in_(rcpt_ids[i:i + 500]),
                            outbound_queue.c.lease_until.is_not(None))
                     .values(lease_until=until))


# ------------------------------------------------------------------------------------------ worker
class _DestinationQueues:
    """Copies waiting for a delivery slot: one FIFO per destination, and the destinations below their cap
    taking turns, one copy per turn (Postfix's qmgr round-robin).

    A slot only ever gets a copy it can send at once: a slot that waited for its copy's destination to have
    room let a slow or dead destination with a backlog tie up every slot and hold back everyone's mail."""

    def __init__(self, limit: int, smarthost: str | None):
        self.limit = limit
        self.smarthost = smarthost
        self.waiting = 0  # copies not started yet, all destinations
        self._waiting: dict[str, deque[QueuedCopy]] = {}
        self._sending: dict[str, int] = {}
        # Destinations with a copy waiting and room under the cap, each at most once, in turn order.
        # None: a delivery slot's cue to end.
        self._turns: asyncio.Queue[str | None] = asyncio.Queue()
        self._queued_turns: set[str] = set()

    def put(self, copy: QueuedCopy) -> None:
        dest = destination(copy.recipient, smarthost=self.smarthost)
        self._waiting.setdefault(dest, deque()).append(copy)
        self.waiting += 1
        self._offer_turn(dest)

    async def get(self) -> tuple[str, QueuedCopy] | None:
        """The next copy of the destination whose turn it is, counted as sending (waits for one); None when
        the slot is to end."""
        dest = await self._turns.get()
        if dest is None:
            return None
        self._queued_turns.discard(dest)
        copies = self._waiting[dest]
        copy = copies.popleft()
        if not copies:
            del self._waiting[dest]
        self.waiting -= 1
        self._sending[dest] = self._sending.get(dest, 0) + 1
        self._offer_turn(dest)  # its next copy, after the other destinations' turns
        return dest, copy

    def done(self, dest: str) -> None:
        """A copy of `dest` is no longer being sent: the destination's next copy may start."""
        if self._sending[dest] > 1:
            self._sending[dest] -= 1
        else:
            del self._sending[dest]
        self._offer_turn(dest)

    def _offer_turn(self, dest: str) -> None:
        if (dest in self._waiting and dest not in self._queued_turns
                and self._sending.get(dest, 0) < self.limit):
            self._queued_turns.add(dest)
            self._turns.put_nowait(dest)

    def saturated(self) -> frozenset[str]:
        """Destinations at their cap with copies waiting: more of their copies could not start either."""
        return frozenset(dest for dest in self._waiting if self._sending.get(dest, 0) >= self.limit)

    def startable(self) -> int:
        """Copies that could start now if slots were free (those of destinations below their cap)."""
        return sum(min(len(copies), self.limit - self._sending.get(dest, 0))
                   for dest, copies in self._waiting.items())

    def take_all(self) -> list[QueuedCopy]:
        """Remove and return every copy not started yet."""
        copies = [copy for waiting in self._waiting.values() for copy in waiting]
        self._waiting.clear()
        self.waiting = 0
        self._queued_turns.clear()
        while not self._turns.empty():
            self._turns.get_nowait()
        return copies

    def end_slots(self, slots: int) -> None:
        """Tell `slots` delivery slots to end once their current copy is done."""
        for _ in range(slots):
            self._turns.put_nowait(None)


class OutboundWorker:
    """Delivers queued copies with `concurrency` tasks; records each result (group-committed)."""

    def __init__(self, engine: Engine, config: Config, secret: bytes, batcher: Committer, *,
                 transport: SmtpTransport | None = None, on_event: Callable[[], None] | None = None):
        self.engine = engine
        self.config = config
        self.ob = config.outbound
        self.secret = secret
        self.batcher = batcher
        self.transport = transport or SmtpTransport(config)
        self.on_event = on_event
        self.table = config.alias_table()
        self._queue = _DestinationQueues(self.ob.per_destination_concurrency, self.ob.smarthost)
        self._records: set[asyncio.Task[str]] = set()
        self._recording = asyncio.Semaphore(1024)  # results sent but not yet committed, at most
        # Recipient ids of the copies this worker holds: queued in memory, being sent, or being recorded.
        # The poller never claims these, and their leases are renewed every `lease_renewal`.
        self._held: set[int] = set()
        self._releases: set[asyncio.Task[None]] = set()  # fast-path overflow being handed back to the store
        self.lease_renewal = LEASE_RENEWAL.total_seconds()
        self.drain_seconds = DRAIN_SECONDS
        self.sent = 0
        self.reporting_mta = self.ob.helo_name or socket.getfqdn()  # once: it may ask DNS

    def submit(self, copies: list[QueuedCopy]) -> None:
        """Fast path from the submission listener (copies are already committed and leased); a copy this
        worker already holds is not queued twice. Past `FASTPATH_PER_SLOT` waiting copies per slot the rest
        go back to the store (lease cleared): the poller claims them as slots free up."""
        overflow: list[QueuedCopy] = []
        bound = self.ob.concurrency * FASTPATH_PER_SLOT
        for copy in copies:
            if copy.rcpt_id in self._held:
                continue
            if self._queue.waiting >= bound:
                overflow.append(copy)
                continue
            self._held.add(copy.rcpt_id)
            self._queue.put(copy)
        if overflow:
            task = asyncio.get_running_loop().create_task(self._release_unstarted(overflow))
            self._releases.add(task)
            task.add_done_callback(self._releases.discard)

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until `stop` is set, then drain: copies being sent finish (up to `drain_seconds`) and
        their results are committed; copies never started are released for the next run or another node."""
        deliverers = [asyncio.create_task(self._deliver_loop(), name=f"outbound-{i}")
                      for i in range(self.ob.concurrency)]
        poller = asyncio.create_task(self._poll_loop(stop), name="outbound-poll")
        try:
            await stop.wait()
        finally:
            poller.cancel()
            await self._release_unstarted(self._queue.take_all())
            self._queue.end_slots(len(deliverers))
            # A send cut off after the final dot may have been taken: the mail would go out again.
            _, late = await asyncio.wait(deliverers, timeout=self.drain_seconds)
            for t in late:
                t.cancel()
            await asyncio.gather(poller, *deliverers, return_exceptions=True)
            if self._records:  # results of mail already sent: commit them rather than send the mail again
                await asyncio.wait(set(self._records), timeout=10)
            await self.transport.close()

    async def _release_unstarted(self, copies: list[QueuedCopy]) -> None:
        """Clear the leases of copies this worker took but never started: without it they waited out the
        whole lease (15 minutes) before a restarted gateway or another node would send them."""
        if not copies:
            return
        ids = [copy.rcpt_id for copy in copies]
        self._held.difference_update(ids)
        try:
            await asyncio.to_thread(self._release, ids)
        except Exception as exc:
            log.error("outbound: releasing %d unsent copies failed (they wait out their lease): %s", len(ids), exc)

    def _release(self, rcpt_ids: list[int]) -> None:
        with self.engine.begin() as conn:
            execute_many(conn, _RELEASE_COPY, [{"rid": rid} for rid in rcpt_ids])

    async def _poll_loop(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        renewed_at = float("-inf")
        while not stop.is_set():
            try:
                if self._wants_copies():
                    # With a smarthost every copy has the one destination: its backlog is simply the queue.
                    skip = frozenset() if self.ob.smarthost else self._queue.saturated()
                    copies = await asyncio.to_thread(self._claim, frozenset(self._held), skip)
                    self.submit(copies)
            except Exception as exc:
                log.error("outbound: claiming queued copies failed (will retry): %s", exc)
            if self._held and loop.time() - renewed_at >= self.lease_renewal:
                renewed_at = loop.time()
                try:
                    await asyncio.to_thread(self._renew, sorted(self._held))
                except Exception as exc:
                    log.error("outbound: renewing the leases of %d copies failed (will retry): %s",
                              len(self._held), exc)
                    renewed_at = float("-inf")
            try:
                await asyncio.wait_for(stop.wait(), self.ob.poll_interval)
            except asyncio.TimeoutError:
                pass

    def _wants_copies(self) -> bool:
        """Whether the poller should claim more: fewer copies are ready than the slots could start soon.

        Delivering by MX, copies held back by their destination's cap are not counted as ready (up to a bound
        on what waits in memory): counted, a dead destination's due backlog kept every other destination's
        retries in the store. With a smarthost there is one destination, and they are simply the queue."""
        ready = self._queue.waiting if self.ob.smarthost else self._queue.startable()
        return (ready < self.ob.concurrency * 4
                and self._queue.waiting < self.ob.concurrency * WAITING_PER_SLOT)

    def _claim(self, held: frozenset[int], skip_domains: frozenset[str] = frozenset()) -> list[QueuedCopy]:
        with self.engine.begin() as conn:
            return claim_due(conn, limit=self.ob.concurrency * 8, secret=self.secret, table=self.table,
                             verp=self.ob.verp, exclude=held, skip_domains=skip_domains)

    def _renew(self, rcpt_ids: list[int]) -> None:
        with self.engine.begin() as conn:
            renew_leases(conn, rcpt_ids)

    async def _deliver_loop(self) -> None:
        while True:
            turn = await self._queue.get()
            if turn is None:  # shutting down
                return
            dest, copy = turn
            try:
                attempt = await self.attempt(copy)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # A bug, not an SMTP answer. Left leased, the copy came back every lease forever and never
                # expired; as a deferral it is retried on the usual schedule and bounces at the horizon.
                log.exception("outbound: delivering recipient row %s failed: %s", copy.rcpt_id, exc)
                attempt = self.scheduled(copy, SmtpResult("deferred", 451, "4.3.0", f"internal error: {exc!r}"))
            finally:
                self._queue.done(dest)
            # The slot moves on to the next copy while the result is recorded: a delivery task that waited for
            # that commit sat idle through it (and the commits stayed small). The copy stays held and leased
            # until its result is committed; if recording fails, the lease runs out and the poller retries it.
            await self._recording.acquire()
            task = asyncio.create_task(self.record(attempt))
            self._records.add(task)
            task.add_done_callback(lambda t, rid=copy.rcpt_id: self._record_done(t, rid))

    def _record_done(self, task: asyncio.Task[str], rcpt_id: int) -> None:
        self._records.discard(task)
        self._recording.release()
        self._held.discard(rcpt_id)
        if not task.cancelled() and task.exception() is not None:
            log.error("outbound: recording a delivery result failed (the copy will be retried): %s",
                      task.exception())

    async def deliver(self, copy: QueuedCopy) -> str:
        """One attempt for one copy, recorded; returns the recipient's new state."""
        return await self.record(await self.attempt(copy))

    async def attempt(self, copy: QueuedCopy) -> Attempt:
        """Send one copy; the outcome with its retry schedule (not recorded yet)."""
        return self.scheduled(copy, await self.transport.send(copy.mail_from, copy.recipient, copy.raw))

    def scheduled(self, copy: QueuedCopy, result: SmtpResult) -> Attempt:
        """`result` as this copy's next attempt: when to retry, and whether the give-up horizon has passed."""
        attempts = copy.attempts + 1
        now = utcnow()
        horizon = copy.created_at + dt.timedelta(hours=self.ob.max_attempts_hours)
        next_at = now + dt.timedelta(seconds=retry_delay(attempts, self.ob.retry_min_seconds,
                                                          self.ob.retry_max_seconds))
        expired = result.outcome == "deferred" and next_at > horizon
        dsn = self.failure_report(copy, result, expired) if result.outcome == "bounced" or expired else None
        # The copy's bytes stay here: the bookkeeping does not need them (its DSN carries its headers).
        return Attempt(dataclasses.replace(copy, raw=b""), result, attempts, next_at, expired, dsn)

    def failure_report(self, copy: QueuedCopy, result: SmtpResult, expired: bool) -> bytes | None:
        """The DSN for a copy that failed for good, or None when its return path is not ours (the null sender;
        VERP off and Odoo's envelope sender elsewhere): then the `bounced` event is all there is.

        Without it a failure after our 250 reached nobody: the event only, and Odoo, which learns of bounces
        from bounce mail alone, never marked the notification or counted the bounce."""
        if not returns_to_us(copy.mail_from, self.table):
            return None
        return failure_dsn(copy, result, expired=expired, reporting_mta=self.reporting_mta)

    async def record(self, attempt: Attempt) -> str:
        """Commit an attempt's outcome and events (grouped with whatever other results are waiting)."""
        state = await self.batcher.run_grouped(record_results, attempt)
        self.sent += 1
        copy, result = attempt.copy, attempt.result
        if state != "delivered" or result.outcome != "delivered":
            log.info("outbound %s → %s: %s (%s %s)", copy.message_id, copy.recipient, state, result.code,
                     result.text[:200])
        if self.on_event:
            self.on_event()
        return state


__all__ = [
    "DestinationError", "OutboundWorker", "SmtpResult", "SmtpTransport", "bounce_kind", "bounce_reason",
    "claim_due", "classify_reply", "destination", "enhanced_status", "make_mx_resolver", "order_mx", "record_result",
    "record_results", "retry_delay", "wire_address", "smarthost_password", "smarthost_setup_refusal", "Attempt", "failure_dsn",
    "returns_to_us",
]

"""The submission listener: Odoo's outgoing mail server points here.

For each mail it records the Message-ID → Odoo record in the thread index (so replies and bounces find their
thread), one `outbound_recipients` row per envelope recipient, and one rewritten copy per recipient in
`outbound_queue` (VERP Return-Path, open pixel, click-tracked links: `routing.rewrite`). It answers 250 only
after that transaction committed; the delivery worker (`gateway.outbound`) takes it from there.

Who may relay: clients in the listener's `allowed_networks`, or clients that authenticated (AUTH PLAIN/LOGIN;
over STARTTLS when the listener has a certificate; without one, from loopback only unless
`allow_plaintext_auth`). Anyone else gets 530 at MAIL FROM.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hmac
import ipaddress
import logging
import re
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import getaddresses, make_msgid
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from sqlalchemy import Connection, Engine, bindparam, select

from aliases.model import AliasTable
from gateway.config import Config, ListenerConfig, secret as env_secret
from gateway.fastsql import insert_rows
from gateway.disk_space import spool_free_space, storage_refusal
from gateway.listener import LeanSMTPMixin, mail_path_refusal, rcpt_path_refusal
from gateway.session_limits import SessionLimits
from gateway.relay_batch import Committer
from gateway.schema import outbound_mails, outbound_queue, outbound_recipients, thread_index
from gateway.store import reading, utcnow
from gateway.tracking import click_url, pixel_url
from routing.bounce import VerpHit
from routing.rewrite import RewriteOptions, list_unsubscribe_targets, rewrite_message, scan_headers
from routing.threads import normalize_message_id
from routing.tokens import read_verp, verp_address

log = logging.getLogger(__name__)

#: How long a copy handed straight to the in-process worker stays invisible to the DB poller (crash recovery).
FAST_PATH_LEASE = dt.timedelta(minutes=15)

_ODOO_MSGID = re.compile(r"-openerp-(\d+)-([A-Za-z0-9_.]+)@")
_ODOO_OBJECT = re.compile(r"^\s*([A-Za-z0-9_.]+)-(\d+)\s*$")


# ------------------------------------------------------------------------------------------ pure facts
@dataclass(frozen=True)
class SubmissionFacts:
    """What the relay needs from a submitted mail's headers."""

    message_id: str | None          # "<id>" normalised as the inbound side looks it up, None when absent
    model: str | None
    res_id: int | None
    from_addr: str | None
    reply_to: str | None
    list_unsubscribe: frozenset[str]


def odoo_record(x_odoo_objects: str | None, message_id: str | None) -> tuple[str, int] | None:
    """The Odoo record a mail is about: X-Odoo-Objects first (its last object: `project.project-3, ,
    project.task-9` is about the task), else the `-openerp-<res_id>-<model>@` shape of Odoo's Message-ID."""
    if x_odoo_objects:
        for item in reversed(x_odoo_objects.split(",")):
            m = _ODOO_OBJECT.match(item)
            if m:
                return m.group(1), int(m.group(2))
    if message_id:
        m = _ODOO_MSGID.search(message_id)
        if m and m.group(2) not in ("mail.group",):
            return m.group(2), int(m.group(1))
    return None


_SUBMISSION_HEADERS = frozenset({"message-id", "x-odoo-objects", "from", "reply-to", "list-unsubscribe"})


def read_submission(raw: bytes) -> SubmissionFacts:
    """Header facts of a submitted mail (headers only: parsing bodies belongs to nobody here)."""
    end = raw.find(b"\r\n\r\n")
    head = raw[:end] if end >= 0 else raw.split(b"\n\n", 1)[0]
    headers = scan_headers(head, _SUBMISSION_HEADERS)
    # Normalised as routing.threads does for every lookup (References, In-Reply-To, a DSN's original id): a
    # bare id, a comment after it, or folding whitespace inside made the indexed id one no reply could find.
    mid = normalize_message_id(headers.get("message-id"))
    rec = odoo_record(headers.get("x-odoo-objects"), mid)
    return SubmissionFacts(
        message_id=mid, model=rec[0] if rec else None, res_id=rec[1] if rec else None,
        from_addr=_first_address(headers.get("from")), reply_to=_first_address(headers.get("reply-to")),
        list_unsubscribe=list_unsubscribe_targets(headers.get("list-unsubscribe")),
    )


_ANGLE_ADDR = re.compile(r"<([^<>@\s]+@[^<>@\s]+)>\s*$")


def _first_address(value: str | None) -> str | None:
    if not value:
        return None
    m = _ANGLE_ADDR.search(value)  # the usual `"Name" <addr>` shape, without the full address parser
    if m and "," not in value:
        return m.group(1).lower()
    pairs = getaddresses([value])
    return pairs[0][1].lower() if pairs and pairs[0][1] else None


def _domain(address: str | None) -> str | None:
    return address.rsplit("@", 1)[1].lower() if address and "@" in address else None


def tracking_allowed(facts: SubmissionFacts, table: AliasTable, *, enabled: bool) -> bool:
    """Tracking is on unless switched off globally, for the sender's domain, or for the alias the mail
    answers to (Reply-To, else From) — e.g. a support alias whose customers must not be tracked."""
    if not enabled:
        return False
    for addr in (facts.reply_to, facts.from_addr):
        alias = table.alias(addr) if addr else None
        if alias is not None and not alias.tracking:
            return False
    for addr in (facts.from_addr, facts.reply_to):
        dom = table.domain(_domain(addr) or "") if addr else None
        if dom is not None and not dom.tracking:
            return False
    return True


def reverse_path(mail_from: str | None) -> str:
    """The envelope sender as the relay records and sends it: "" for the null sender, which the listener
    keeps as the literal "<>" (sent as is, that was `MAIL FROM:<<>>`)."""
    address = (mail_from or "").strip()
    return "" if address in ("", "<>") else address


def verp_domain(mail_from: str, table: AliasTable) -> str | None:
    """Where VERP bounces go: the envelope sender's domain when we serve it, else our first domain; None for
    the null sender. Mail sent with `MAIL FROM:<>` (a DSN, an auto-reply) must not be answered by a bounce
    (RFC 5321 §4.5.5, RFC 3834): given a VERP return path, it would be, and two systems could bounce each
    other's bounces for ever."""
    if not reverse_path(mail_from):
        return None
    dom = _domain(mail_from)
    if dom and table.domain(dom) is not None:
        return dom
    if table.domains:
        return table.domains[0].name
    return dom


# ------------------------------------------------------------------------------------------ recording
@dataclass(frozen=True)
class RelayPlan:
    """How copies of one submitted mail are rewritten (decided once per mail, applied per recipient)."""

    secret: bytes
    verp_domain: str | None
    track: bool
    tracking_base: str


@dataclass(frozen=True)
class QueuedCopy:
    """One recipient's rewritten copy, committed to outbound_queue and ready for delivery."""

    rcpt_id: int
    recipient: str
    mail_id: int
    message_id: str
    model: str | None
    res_id: int | None
    mail_from: str          # the envelope sender to use (VERP address, or Odoo's own)
    raw: bytes
    created_at: dt.datetime
    attempts: int = 0


def copy_options(plan: RelayPlan, rcpt_id: int, facts: SubmissionFacts) -> RewriteOptions:
    verp = verp_address(plan.secret, rcpt_id, plan.verp_domain) if plan.verp_domain else None
    if not plan.track:
        return RewriteOptions(return_path=verp)
    return RewriteOptions(
        return_path=verp,
        pixel_url=pixel_url(plan.tracking_base, plan.secret, rcpt_id),
        click_url=lambda url: click_url(plan.tracking_base, plan.secret, rcpt_id, url),
        own_prefix=plan.tracking_base,
        never_track=facts.list_unsubscribe,
    )


@dataclass(frozen=True)
class Submission:
    """One accepted DATA: what the transaction that queues it needs."""

    raw: bytes
    mail_from: str
    rcpt_tos: tuple[str, ...]
    facts: SubmissionFacts
    plan: RelayPlan


#: Message-IDs among `mids` already in the thread index as mail we sent (built once: constructing it per batch
#: was a visible share of the store process's time).
_KNOWN_OUTBOUND = select(thread_index.c.message_id).where(
    thread_index.c.message_id.in_(bindparam("mids", expanding=True)), thread_index.c.outbound.is_(True))


def record_submission(conn: Connection, *, raw: bytes, mail_from: str, rcpt_tos: tuple[str, ...],
                      facts: SubmissionFacts, plan: RelayPlan, lease: dt.timedelta = FAST_PATH_LEASE,
                      ) -> list[QueuedCopy]:
    """Write the mail, its recipients, its thread-index row and one rewritten copy per recipient."""
    return record_submissions(conn, [Submission(raw, mail_from, rcpt_tos, facts, plan)], lease=lease)[0]


def unique_recipients(rcpt_tos: tuple[str, ...]) -> tuple[str, ...]:
    """Envelope recipients without repeats (compared case-insensitively; the first spelling is kept): a
    client that names one address twice means one mail, and two copies would reach that mailbox twice."""
    seen: set[str] = set()
    unique = []
    for rcpt in rcpt_tos:
        key = rcpt.lower()
        if key not in seen:
            seen.add(key)
            unique.append(rcpt)
    return tuple(unique)


def _without_repeats(sub: Submission) -> Submission:
    rcpts = unique_recipients(sub.rcpt_tos)
    return sub if len(rcpts) == len(sub.rcpt_tos) else dataclasses.replace(sub, rcpt_tos=rcpts)


def record_submissions(conn: Connection, subs: list[Submission], *, lease: dt.timedelta = FAST_PATH_LEASE,
                       ) -> list[list[QueuedCopy]]:
    """`record_submission` for many mails with a handful of statements (executemany / multi-row RETURNING):
    per-statement overhead, not SQLite, bounds the relay's throughput (bench/relay.py)."""
    now = utcnow()
    subs = [_without_repeats(sub) for sub in subs]
    mids: list[str] = []
    raws: list[bytes] = []
    for sub in subs:
        mid = sub.facts.message_id or make_msgid(domain=sub.plan.verp_domain or "mailgate.invalid")
        # Without a Message-ID nothing can thread back to this mail; give it one (the copies carry it).
        raws.append(sub.raw if sub.facts.message_id else f"Message-ID: {mid}\r\n".encode() + sub.raw)
        mids.append(mid)
    mail_ids = insert_rows(conn, outbound_mails, ids=True, rows=[
        {"message_id": mid, "model": sub.facts.model, "res_id": sub.facts.res_id, "mail_from": sub.mail_from,
         "created_at": now} for mid, sub in zip(mids, subs)])
    known = set(conn.execute(_KNOWN_OUTBOUND, {"mids": list(set(mids))}).scalars())
    new_threads = []
    for mid, sub, mail_id in zip(mids, subs, mail_ids):
        if mid not in known:
            known.add(mid)
            new_threads.append({"message_id": mid, "model": sub.facts.model, "res_id": sub.facts.res_id,
                                "outbound": True, "is_internal": False, "outbound_mail": mail_id, "created_at": now})
    insert_rows(conn, thread_index, new_threads)
    rcpt_rows = [{"mail": mail_id, "recipient": rcpt, "state": "queued", "attempts": 0, "next_attempt_at": now,
                  "opens": 0, "clicks": 0}
                 for sub, mail_id in zip(subs, mail_ids) for rcpt in sub.rcpt_tos]
    rcpt_ids = iter(insert_rows(conn, outbound_recipients, rcpt_rows, ids=True))
    out: list[list[QueuedCopy]] = []
    queue_rows = []
    for sub, mail_id, mid, raw in zip(subs, mail_ids, mids, raws):
        copies = []
        for rcpt in sub.rcpt_tos:
            rid = next(rcpt_ids)
            opts = copy_options(sub.plan, rid, sub.facts)
            try:
                copy = rewrite_message(raw, opts)
            except Exception:  # a mail the rewriter cannot handle still goes out, untracked
                log.exception("rewrite failed for %s → %s; relaying it untracked", mid, rcpt)
                opts = RewriteOptions(return_path=opts.return_path)
                copy = raw
            queue_rows.append({"recipient": rid, "raw": copy, "lease_until": now + lease})
            copies.append(QueuedCopy(
                rcpt_id=rid, recipient=rcpt, mail_id=mail_id, message_id=mid, model=sub.facts.model,
                res_id=sub.facts.res_id, mail_from=opts.return_path or sub.mail_from, raw=copy, created_at=now,
            ))
        out.append(copies)
    insert_rows(conn, outbound_queue, queue_rows)
    return out


# ------------------------------------------------------------------------------------------ SMTP
class SubmissionHandler:
    """aiosmtpd handler: who may relay (MAIL), how many recipients (RCPT), durable queueing (DATA)."""

    def __init__(self, listener: ListenerConfig, config: Config, batcher: Committer, secret: bytes,
                 on_queued: Callable[[list[QueuedCopy]], None] | None = None):
        self.listener = listener
        self.config = config
        self.batcher = batcher
        self.secret = secret
        self.on_queued = on_queued
        self.networks = listener.networks()
        self.table = config.alias_table()
        self.free_space = spool_free_space(config.storage_url(), config.storage.min_free_mb)

    def client_allowed(self, session: Session) -> bool:
        peer = session.peer[0] if isinstance(session.peer, tuple) else None
        if not peer:
            return False
        try:
            ip = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(ip in net for net in self.networks)

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          mail_options: list[str]) -> str:
        if not session.authenticated and not self.client_allowed(session):
            return "530 5.7.0 Authentication required (relaying only for allowed networks or after AUTH)"
        refusal = storage_refusal(self.free_space, mail_options) or mail_path_refusal(address, mail_options)
        if refusal is not None:
            return refusal
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        refusal = rcpt_path_refusal(address, envelope)
        if refusal is not None:
            return refusal
        if any(address.lower() == rcpt.lower() for rcpt in envelope.rcpt_tos):
            return "250 2.1.5 OK (duplicate recipient: one copy)"
        if len(envelope.rcpt_tos) >= self.listener.max_recipients:
            return "452 4.5.3 Too many recipients"
        if "@" not in address:
            return "553 5.1.3 Recipient must be a full address"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or envelope.content or b""
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogateescape")
        facts = read_submission(raw)
        mail_from = reverse_path(envelope.mail_from)
        plan = RelayPlan(
            secret=self.secret,
            verp_domain=verp_domain(mail_from, self.table) if self.config.outbound.verp else None,
            track=tracking_allowed(facts, self.table, enabled=self.config.tracking.enabled),
            tracking_base=self.config.tracking.base_url.rstrip("/"),
        )
        rcpts = tuple(envelope.rcpt_tos)
        try:
            copies = await self.batcher.run_grouped(
                record_submissions, Submission(raw, mail_from, rcpts, facts, plan))
        except Exception as exc:
            log.error("submission from %s not queued (store error: %s); the client will retry",
                      session.peer, exc)
            return "451 4.3.0 Could not queue the message; try again later"
        if self.on_queued is not None:
            self.on_queued(copies)
        return f"250 2.0.0 Queued as {copies[0].mail_id if copies else 0}"


def make_authenticator(listener: ListenerConfig) -> Callable[..., AuthResult]:
    """AUTH PLAIN/LOGIN against `auth_users_env` (login → env var holding the password)."""
    users = {login: env for login, env in listener.auth_users_env.items()}

    def authenticate(server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                     auth_data: Any) -> AuthResult:
        if mechanism not in ("PLAIN", "LOGIN") or not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login = auth_data.login.decode("utf-8", "replace")
        env = users.get(login)
        expected = env_secret(env) if env else None
        if not expected or not hmac.compare_digest(auth_data.password, expected.encode()):
            log.warning("submission AUTH failed for %r from %s", login, session.peer)
            return AuthResult(success=False, handled=False)
        return AuthResult(success=True, auth_data=login)

    return authenticate


def tls_context(listener: ListenerConfig) -> ssl.SSLContext | None:
    if not listener.tls_cert or not listener.tls_key:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(listener.tls_cert, listener.tls_key)
    return ctx


class _SubmissionSMTP(LeanSMTPMixin, SMTP):
    """aiosmtpd with the listeners' lean DATA path and address parsing (gateway.listener.LeanSMTPMixin).

    No content rules beyond the size limit: Odoo's mail is taken as it comes and the rewrite re-encodes what
    needs it (e.g. over-long 7-bit lines become quoted-printable)."""

    #: AUTH without TLS from clients beyond loopback (`allow_plaintext_auth`); set by the listener's factory
    plaintext_auth = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """On a listener without a certificate, AUTH (advertised and accepted) only where the password cannot
        be read on the way: a loopback client, or everyone when the operator opted in. Offered to all, every
        login crossed the network in clear (RFC 4954 §4: 538 5.7.11 instead)."""
        super().connection_made(transport)
        if self.tls_context is None and self.session is not None:
            self._auth_require_tls = not (self.plaintext_auth or is_loopback_peer(self.session.peer))


def is_loopback_peer(peer: Any) -> bool:
    """Whether a session's peer (`(host, port, ...)`) is a loopback address (an IPv4-mapped one included)."""
    host = peer[0] if isinstance(peer, tuple) and peer else None
    try:
        ip = ipaddress.ip_address(host) if isinstance(host, str) else None
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip is not None and (ip.is_loopback or bool(mapped and mapped.is_loopback))


async def start_submission_listener(listener: ListenerConfig, config: Config, batcher: Committer,
                                    secret: bytes,
                                    on_queued: Callable[[list[QueuedCopy]], None] | None = None, *,
                                    limits: SessionLimits | None = None) -> asyncio.base_events.Server:
    """Start one submission listener on the running loop; returns the asyncio server (port 0 → see sockets)."""
    handler = SubmissionHandler(listener, config, batcher, secret, on_queued)
    ctx = tls_context(listener)
    note = listener.plaintext_auth_note()
    if note is not None:
        log.warning("submission listener %s:%s: %s", listener.host, listener.port, note)
    authenticator = make_authenticator(listener) if listener.auth_users_env else None
    hostname = socket.getfqdn()  # once: aiosmtpd would look it up for every connection
    limits = limits or SessionLimits.of(listener)

    def factory() -> SMTP:
        protocol = _SubmissionSMTP(
            handler, hostname=hostname, data_size_limit=listener.max_message_size, enable_SMTPUTF8=True,
            decode_data=False,
            tls_context=ctx, require_starttls=bool(ctx) and listener.require_tls,
            auth_require_tls=ctx is not None, authenticator=authenticator, timeout=listener.idle_timeout,
            ident="mailgate submission",
        )
        protocol.limits = limits
        protocol.plaintext_auth = listener.allow_plaintext_auth
        return protocol

    loop = asyncio.get_running_loop()
    return await loop.create_server(factory, host=listener.host, port=listener.port)


# ------------------------------------------------------------------------------------------ VERP lookup
def resolve_verp(engine: Engine, secret: bytes | str | None, address: str) -> VerpHit | None:
    """The recipient and original Message-ID a VERP address (`bounce+TOKEN@domain`) names, or None.

    For the router: a DSN sent to a VERP address is about exactly that recipient of that mail, whatever the
    DSN's body says (or fails to say)."""
    key = secret.encode() if isinstance(secret, str) else secret
    rid = read_verp(key, address)
    if rid is None:
        return None
    with reading(engine) as conn:
        row = conn.execute(
            select(outbound_recipients.c.recipient, outbound_mails.c.message_id)
            .join(outbound_mails, outbound_mails.c.id == outbound_recipients.c.mail)
            .where(outbound_recipients.c.id == rid)
        ).first()
    if row is None:
        return None
    return VerpHit(recipient=row.recipient, original_message_id=row.message_id)

"""Configuration: TOML file → validated, frozen pydantic models.

Why pydantic: every sysadmin mistake must come back as "file, key, what is wrong", and pydantic's error
locations give us the key path for free. Secrets are never in the file: only the *name* of the environment
variable that holds them (``*_env`` keys), so a config can be committed and shared.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from aliases.model import Alias, AliasTable, ContactPolicy, Domain
from aliases.names import normalize_address, normalize_domain


#: one cross-check problem: the key path it is about (as pydantic's `loc`) and what is wrong
Problem = tuple[tuple[str | int, ...], str]


class ConfigError(Exception):
    """A configuration problem an operator can fix: carries the file and one line per problem."""

    def __init__(self, path: str | os.PathLike[str] | None, problems: list[str]):
        self.path = str(path) if path else "<config>"
        self.problems = problems
        super().__init__("\n".join(f"{self.path}: {p}" for p in problems))


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_networks(value: tuple[str, ...]) -> tuple[str, ...]:
    """Every entry parses as an IP network ("10.0.0.0/8", "::1/128"); the error names the bad one."""
    for net in value:
        ipaddress.ip_network(net, strict=False)
    return value


Networks = Annotated[tuple[str, ...], AfterValidator(_check_networks)]


class ListenerConfig(_Model):
    """One SMTP/LMTP/submission listener. Submission is Odoo's outgoing server (see gateway.relay)."""

    name: str = ""
    kind: Literal["smtp", "lmtp", "submission"] = "smtp"
    host: str = "127.0.0.1"
    port: int = Field(2525, ge=0, le=65535)
    allowed_networks: Networks = ("127.0.0.0/8", "::1/128")
    max_message_size: int = Field(35 * 1024 * 1024, gt=0)
    max_recipients: int = Field(100, gt=0)
    max_line_length: int = Field(998, gt=0)
    tls_cert: str | None = None
    tls_key: str | None = None
    require_tls: bool = False
    # AUTH PLAIN/LOGIN for submission: login → name of the env var holding its password.
    auth_users_env: dict[str, str] = Field(default_factory=dict)
    # Submission without tls_cert/tls_key: AUTH from clients beyond loopback too (passwords in clear). Off: they
    # get 538 5.7.11 (gateway.relay), as RFC 4954 §4 asks of a server without encryption.
    allow_plaintext_auth: bool = False
    idle_timeout: float = Field(300.0, gt=0)
    # Open sessions: past either limit a new connection is answered 421 4.7.0 and closed (the sending MTA
    # retries later), so a flood or a runaway client cannot use up the file descriptors the spool needs too.
    max_connections: int = Field(500, gt=0)
    max_connections_per_client: int = Field(100, gt=0)
    # Failed AUTH attempts from one address (across its connections) within `auth_failure_window` seconds;
    # at this many its AUTH is answered 421 until the oldest leaves the window (gateway/auth_throttle.py).
    max_auth_failures_per_client: int = Field(10, gt=0)
    auth_failure_window: float = Field(600.0, gt=0)

    @model_validator(mode="after")
    def _tls_pair(self) -> "ListenerConfig":
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key must be given together")
        return self

    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(n, strict=False) for n in self.allowed_networks]

    def plaintext_auth_note(self) -> str | None:
        """What a submission listener with logins but no certificate does about AUTH, for the operator
        (start-up log, check-config); None when it has a certificate or no logins."""
        if self.kind != "submission" or not self.auth_users_env or self.tls_cert:
            return None
        if self.allow_plaintext_auth:
            return "AUTH is offered without TLS (allow_plaintext_auth): passwords cross the network in clear"
        return ("AUTH is unavailable without a certificate (tls_cert/tls_key) except to loopback clients: the "
                "others get 538 5.7.11 (set allow_plaintext_auth = true to accept it in clear)")


class StorageConfig(_Model):
    """Where the spool lives. A relative sqlite path is relative to the config file's folder."""

    url: str = "sqlite:///var/mailgate.db"
    # Group commit: a batch is what queued up while the previous commit ran (up to `group_commit_max`);
    # `group_commit_ms` > 0 also waits that long for more. Measured (bench/ingest.py, 16 sessions, 4 KB):
    # 0 ms → 2,080 msgs/s, 0.5 ms → 1,855, 2 ms → 1,707, 5 ms → 1,055: waiting only adds latency.
    group_commit_max: int = Field(64, gt=0)
    group_commit_ms: float = Field(0.0, ge=0)
    sqlite_synchronous: Literal["FULL", "NORMAL"] = "FULL"
    # Page size of a *new* SQLite store (an existing one keeps its own). 4 KiB suits mail of a few KB (the
    # usual catchall and Odoo notification); 8–16 KiB costs less per message for stores of mostly 100 KB+
    # mail: see gateway/store.py for the figures.
    sqlite_page_size: Literal[4096, 8192, 16384, 32768, 65536] = 4096
    # SQLite file stores: bodies of at least this many bytes go to append-only segment files in
    # `<database>-bodies/` (gateway/body_log.py) instead of the database; 0 keeps every body in SQLite.
    # Smaller bodies share pages with their row, where a second fsync per commit would cost more than it saves.
    body_log_min: int = Field(64 * 1024, ge=0)
    # Who commits the listeners' spool writes and the relay's outbound bookkeeping: child processes (default;
    # the listening loop and the commits do not share a GIL: bench/ingest.py, bench/relay.py) or threads of the
    # serve process.
    writer: Literal["process", "thread"] = "process"
    # SQLite file stores: below this much free space on their filesystem (plus 1.5x a declared SIZE), MAIL FROM
    # gets 452 4.3.1 and /healthz says 503 (gateway/disk_space.py); 0 turns the check off.
    min_free_mb: int = Field(256, ge=0)


class OdooConfig(_Model):
    url: str | None = None
    db: str | None = None
    login: str | None = None
    password_env: str = "MAILGATE_ODOO_PASSWORD"
    protocol: Literal["auto", "jsonrpc", "json2"] = "auto"
    mode: Literal["passthrough", "explicit"] = "passthrough"
    timeout: float = Field(30.0, gt=0)
    max_request_bytes: int = Field(64 * 1024 * 1024, gt=0)
    pool_size: int = Field(4, gt=0)
    sync_aliases: bool = False
    sync_interval: float = Field(300.0, gt=0)
    notify_force_send: bool = False


#: an Odoo model's technical name (`crm.lead`, `x_custom`), as `ir.model.model` holds it
_MODEL_NAME = re.compile(r"[a-z0-9_]+(?:\.[a-z0-9_]+)*")


class AliasConfig(_Model):
    address: str
    model: str
    defaults: dict[str, Any] = Field(default_factory=dict)
    contact: ContactPolicy = "everyone"
    force_thread_id: int | None = None
    create_partner: bool = False
    tracking: bool = True
    bounced_content: str | None = None
    incoming_local: bool = False  # also match the local part on other domains (Odoo's alias_incoming_local)
    # Odoo's alias parent: whose followers `contact = "followers"` checks when the alias creates records
    parent_model: str | None = None
    parent_thread_id: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _followers_need_a_record(self) -> "AliasConfig":
        """Odoo calls `followers` without a record to follow a configuration error (spec §1.8): every mail
        to the alias would be refused. A forced thread, or a parent record, gives it one."""
        if (self.parent_model is None) != (self.parent_thread_id is None):
            raise ValueError("parent_model and parent_thread_id must be given together")
        if self.contact == "followers" and not self.force_thread_id and not self.parent_thread_id:
            raise ValueError("contact = 'followers' needs a record whose followers may write: set "
                             "force_thread_id, or parent_model and parent_thread_id")
        return self

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        """The technical name, not the label ("CRM Lead") or nothing: Odoo refuses every mail for a model it
        does not have, so a typo would only show as failed deliveries. (Whether this Odoo has the model is
        for `check-config --odoo`.)"""
        if not _MODEL_NAME.fullmatch(value):
            raise ValueError(f"{value!r} is not an Odoo model's technical name (like 'crm.lead': lower-case "
                             "letters, digits and _, in parts joined by dots)")
        return value

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        """One spelling (aliases.names): `info@bücher.example` is `info@xn--bcher-kva.example`, as mail has it."""
        return normalize_address(value, strict=True)


class DomainConfig(_Model):
    name: str
    catchall: str | None = "catchall"
    bounce: str | None = "bounce"
    strict: bool = False
    default_alias: str | None = None
    tracking: bool = True

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        """One spelling (aliases.names): `Shop.Example.` and `shop.example` are one domain, and so are
        `bücher.example` and `xn--bcher-kva.example`; as written, only mail spelt the same way matched."""
        return normalize_domain(value, strict=True)


class ImapSourceConfig(_Model):
    name: str
    host: str = "127.0.0.1"
    port: int = Field(993, ge=0, le=65535)
    security: Literal["ssl", "starttls", "none"] = "ssl"
    login: str
    password_env: str
    mailbox: str = "INBOX"
    after: Literal["seen", "move", "delete"] = "seen"
    move_to: str | None = None
    rcpt_headers: tuple[str, ...] = ("Delivered-To", "X-Original-To", "To")
    batch_size: int = Field(100, gt=0)
    # bytes of mail fetched in one batch (by the sizes the server gives first); a larger message goes alone
    batch_bytes: int = Field(64 * 1024 * 1024, gt=0)
    idle: bool = True
    poll_interval: float = Field(30.0, gt=0)
    idle_renew: float = Field(25 * 60.0, gt=0)
    verify_tls: bool = True
    tls_ca_file: str | None = None  # a private CA (self-signed server); None → the system's trust store
    timeout: float = Field(30.0, gt=0)  # per IMAP command (a FETCH's timer restarts with every chunk read)
    backoff_max: float = Field(300.0, gt=0)  # reconnect delay doubles from 1 s up to this

    @model_validator(mode="after")
    def _move(self) -> "ImapSourceConfig":
        if self.after == "move" and not self.move_to:
            raise ValueError("after = 'move' needs move_to")
        return self


class OutboundConfig(_Model):
    smarthost: str | None = None  # host:port; None → deliver by MX lookup
    smarthost_tls: Literal["none", "starttls", "ssl"] = "none"
    smarthost_login: str | None = None
    smarthost_password_env: str | None = None
    verp: bool = True
    helo_name: str | None = None
    max_attempts_hours: float = Field(120.0, gt=0)  # RFC 5321 §4.5.4.1: give up after 4-5 days
    concurrency: int = Field(16, gt=0)
    secret_env: str = "MAILGATE_SECRET"
    # Delivery details (gateway.outbound): MX port, per-destination cap, SMTP timeout, RFC 5321 §4.5.4.1
    # retry intervals (doubling from min to max until max_attempts_hours), store poll interval.
    mx_port: int = Field(25, ge=1, le=65535)
    per_destination_concurrency: int = Field(8, gt=0)
    timeout: float = Field(60.0, gt=0)
    # 300 s first, not RFC 5321's "at least 30 minutes": Postfix's minimal_backoff_time, so greylisting (which
    # mostly clears after 5 minutes) costs minutes, not half an hour; the doubling passes 30 min by the 4th retry.
    retry_min_seconds: float = Field(300.0, gt=0)
    retry_max_seconds: float = Field(4000.0, gt=0)
    poll_interval: float = Field(1.0, gt=0)
    # Where delivery sends polite refusal mails (host:port); None → `smarthost`; neither → not sent (logged).
    refusal_smarthost: str | None = None

    @model_validator(mode="after")
    def _smarthost_password(self) -> "OutboundConfig":
        """A login needs the variable holding its password: without one the transport skipped AUTH, the
        smarthost answered 530 and every copy bounced. (The variable's value is checked when the relay
        starts: `gateway.outbound.smarthost_password`.)"""
        if self.smarthost_login and not self.smarthost_password_env:
            raise ValueError("smarthost_login needs smarthost_password_env (the environment variable holding "
                             "the smarthost password)")
        return self

    @model_validator(mode="after")
    def _retry_bounds(self) -> "OutboundConfig":
        """The retry interval doubles from min and is capped at max: min above max made every interval max,
        silently, whatever the operator meant."""
        if self.retry_min_seconds > self.retry_max_seconds:
            raise ValueError(f"retry_min_seconds ({self.retry_min_seconds:g}) is above retry_max_seconds "
                             f"({self.retry_max_seconds:g})")
        return self


class TrackingConfig(_Model):
    enabled: bool = True
    base_url: str = "http://127.0.0.1:8026"
    host: str = "127.0.0.1"
    port: int = Field(8026, ge=0, le=65535)
    secret_env: str = "MAILGATE_SECRET"
    prefetch_seconds: float = Field(10.0, ge=0)
    # Reverse proxies (TLS in front of the tracking server) whose X-Forwarded-For is believed: the opener's
    # address decides machine opens (Apple's and Microsoft's proxy ranges). Others' headers are ignored.
    trusted_proxies: Networks = ("127.0.0.0/8", "::1/128")


class WebhookConfig(_Model):
    name: str
    url: str
    secret_env: str
    types: tuple[str, ...] = ()  # empty → every type
    horizon_hours: float = Field(72.0, gt=0)
    timeout: float = Field(10.0, gt=0)
    # Retry backoff (gateway.events): doubling from retry_min_seconds, capped at retry_max_seconds.
    retry_min_seconds: float = Field(10.0, gt=0)
    retry_max_seconds: float = Field(1800.0, gt=0)


class EventsConfig(_Model):
    webhooks: tuple[WebhookConfig, ...] = ()
    api_token_env: str | None = "MAILGATE_EVENTS_TOKEN"
    poll_interval: float = Field(1.0, gt=0)  # how often the dispatcher looks for events from other processes


class WorkerConfig(_Model):
    concurrency: int = Field(4, gt=0)
    # Worker processes `mailgate serve` starts (each with `concurrency` threads). Parsing and routing are CPU:
    # in the listener's process they would share its GIL and add latency to every SMTP reply (bench/soak.py).
    # 0 → threads inside the serve process (tests, tiny installs).
    processes: int = Field(1, ge=0)
    lease_seconds: float = Field(120.0, gt=0)
    backoff_base: float = Field(5.0, gt=0)
    backoff_max: float = Field(3600.0, gt=0)
    retry_horizon_hours: float = Field(72.0, gt=0)
    poll_interval: float = Field(0.5, gt=0)


class AdminConfig(_Model):
    host: str = "127.0.0.1"
    port: int = Field(8025, ge=0, le=65535)
    enabled: bool = True


class RetentionConfig(_Model):
    raw_days: int = Field(30, ge=1)


class RoutingConfig(_Model):
    auto_reply: Literal["drop", "note"] = "drop"
    # Domains whose mail may match `incoming_local` aliases by local part (Odoo's mail.catchall.domain.allowed);
    # empty → any domain. Our own domains always may.
    incoming_local_domains: tuple[str, ...] = ()
    refusal_window_hours: float = Field(24.0, gt=0)
    max_headers: int = Field(1000, gt=0)
    max_mime_depth: int = Field(20, gt=0)
    max_parts: int = Field(500, gt=0)

    @field_validator("incoming_local_domains")
    @classmethod
    def _domains(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(normalize_domain(d, strict=True) for d in value)


class AuthConfig(_Model):
    """Sender authentication (SPF/DKIM/DMARC, gateway.sender_auth) feeding alias contact policies.

    Off by default: a gateway behind another MTA does not see the client IP, so SPF would be checked against
    the wrong host; there, name that MTA's authserv-id in `trust_authentication_results_from` instead.
    """

    enabled: bool = False
    nameservers: tuple[str, ...] = ()  # empty → the system's resolvers (/etc/resolv.conf)
    port: int = Field(53, ge=1, le=65535)
    timeout: float = Field(2.0, gt=0)  # per DNS lookup; SPF gets at most 5x this in all
    trust_authentication_results_from: str | None = None  # authserv-id of a trusted upstream MTA

    @field_validator("nameservers")
    @classmethod
    def _nameservers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for ns in value:
            ipaddress.ip_address(ns)
        return value


class Config(_Model):
    """The whole configuration, with paths already resolved against the config file's folder."""

    listeners: tuple[ListenerConfig, ...] = ()
    storage: StorageConfig = StorageConfig()
    odoo: OdooConfig = OdooConfig()
    domains: tuple[DomainConfig, ...] = ()
    aliases: tuple[AliasConfig, ...] = ()
    imap: tuple[ImapSourceConfig, ...] = ()
    outbound: OutboundConfig = OutboundConfig()
    tracking: TrackingConfig = TrackingConfig()
    events: EventsConfig = EventsConfig()
    worker: WorkerConfig = WorkerConfig()
    admin: AdminConfig = AdminConfig()
    retention: RetentionConfig = RetentionConfig()
    routing: RoutingConfig = RoutingConfig()
    auth: AuthConfig = AuthConfig()
    base_dir: str = "."

    @model_validator(mode="after")
    def _cross_checks(self) -> "Config":
        """Checks across entries and sections, all reported at once, each under the key it is about
        (`aliases[1].address`): an operator fixes every problem in one round, not one per `check-config` run.

        Raising a ValidationError (not a ValueError) keeps each problem's location: pydantic passes its
        line errors through as they are, so `_format_error` names the entry like any field error."""
        problems = [*self._domain_problems(), *self._alias_problems(), *self._bind_problems(),
                    *self._imap_problems(), *self._webhook_problems()]
        if problems:
            raise ValidationError.from_exception_data(type(self).__name__, [
                InitErrorDetails(type=PydanticCustomError("cross_check", "{problem}", {"problem": what}),
                                 loc=loc, input=None)
                for loc, what in problems])
        return self

    def _domain_problems(self) -> list[Problem]:
        """Domains listed twice (the table keeps one entry per name: the other's settings would be lost)."""
        return _listed_twice("domains", [d.name for d in self.domains], "name",
                             lambda first: f"the same domain as domains[{first}]")

    def _imap_problems(self) -> list[Problem]:
        """IMAP sources sharing a name: a source's checkpoint, seen-list and spool source (`imap:NAME`) are
        keyed by its name, so the second account's mail was taken for already seen, neither spooled nor
        flagged."""
        return _listed_twice("imap", [src.name for src in self.imap], "name",
                             lambda first: f"the same name as imap[{first}]; each source needs its own (it keys "
                                           "the source's checkpoint)")

    def _webhook_problems(self) -> list[Problem]:
        """Webhook types no event has, and webhooks sharing a name. A misspelt type ("bounce") filtered out
        every event for that subscriber, each recorded as skipped; two hooks of one name shared a cursor and
        delivery rows, and the first signed with the second's secret."""
        from gateway.outbox import EVENT_TYPES  # here: gateway.outbox imports the store, which imports us

        problems: list[Problem] = []
        first: dict[str, int] = {}
        for i, hook in enumerate(self.events.webhooks):
            unknown = [t for t in hook.types if t not in EVENT_TYPES]
            if unknown:
                problems.append((("events", "webhooks", i, "types"),
                                 f"unknown event type(s) {', '.join(map(repr, unknown))}; known: "
                                 f"{', '.join(EVENT_TYPES)}"))
            if hook.name in first:
                problems.append((("events", "webhooks", i, "name"),
                                 f"the same name as events.webhooks[{first[hook.name]}]; each subscriber needs "
                                 "its own (it keys the subscriber's cursor, deliveries and secret)"))
            first.setdefault(hook.name, i)
        return problems

    def _alias_problems(self) -> list[Problem]:
        """Aliases outside our domains or listed twice, and default aliases that name no alias."""
        names = {d.name for d in self.domains}
        first: dict[str, int] = {}
        problems: list[Problem] = []
        for i, alias in enumerate(self.aliases):
            addr, where = alias.address, ("aliases", i, "address")
            if addr.count("@") != 1:
                problems.append((where, "not a full address (local@domain)"))
            elif addr.split("@", 1)[1] not in names:
                problems.append((where, "not in a configured domain"))
            elif addr in first:
                problems.append((where, f"the same address as aliases[{first[addr]}]"))
            first.setdefault(addr, i)
        for i, dom in enumerate(self.domains):
            full = _full(dom.default_alias, dom.name) if dom.default_alias else None
            if full and full not in first:
                problems.append((("domains", i, "default_alias"),
                                 f"{dom.default_alias!r} is not an alias (no [[aliases]] address {full!r})"))
        return problems

    def _bind_problems(self) -> list[Problem]:
        """Listeners and HTTP servers whose addresses overlap on one port: the second bind would fail with
        'address already in use' at `serve` start, after check-config passed. Each is named once, against
        the first one it clashes with."""
        binds = self._binds()
        problems: list[Problem] = []
        for j, (where, _what, host, port) in enumerate(binds):
            other = next((b for b in binds[:j] if b[3] == port and _hosts_clash(b[2], host)), None)
            if other is not None:
                problems.append((where, f"{host or '*'}:{port} overlaps {other[1]} ({other[2] or '*'}:{port}): "
                                        "serve would fail to bind it (address already in use)"))
        return problems

    def _binds(self) -> list[tuple[tuple[str | int, ...], str, str, int]]:
        """What `serve` binds: (key, what it is, host, port). Port 0 (any free port) never clashes. The
        tracking HTTP server runs beside the outbound relay only (gateway/serve.py, relay_service.py)."""
        binds: list[tuple[tuple[str | int, ...], str, str, int]] = []
        if self.admin.enabled:
            binds.append((("admin", "port"), "the admin HTTP server [admin]", self.admin.host, self.admin.port))
        relay = any(lst.kind == "submission" for lst in self.listeners) or bool(self.events.webhooks)
        if relay and (self.tracking.enabled or self.events.api_token_env):
            binds.append((("tracking", "port"), "the tracking HTTP server [tracking]", self.tracking.host,
                          self.tracking.port))
        binds += [(("listeners", i, "port"), f"listeners[{i}]", lst.host, lst.port)
                  for i, lst in enumerate(self.listeners)]
        return [b for b in binds if b[3]]

    def alias_table(self) -> AliasTable:
        """The pure alias model that `aliases/` resolves against."""
        domains = tuple(
            Domain(name=d.name, catchall=d.catchall, bounce=d.bounce, strict=d.strict,
                   default_alias=_full(d.default_alias, d.name) if d.default_alias else None,
                   tracking=d.tracking)
            for d in self.domains
        )
        aliases = tuple(
            Alias(address=a.address, model=a.model, defaults=tuple(sorted(a.defaults.items())),
                  contact=a.contact, force_thread_id=a.force_thread_id, create_partner=a.create_partner,
                  tracking=a.tracking, bounced_content=a.bounced_content, incoming_local=a.incoming_local,
                  parent_model=a.parent_model, parent_thread_id=a.parent_thread_id)
            for a in self.aliases
        )
        return AliasTable(domains=domains, aliases=aliases,
                          incoming_local_domains=self.routing.incoming_local_domains)

    def storage_url(self) -> str:
        return resolve_storage_url(self.storage.url, self.base_dir)


def _listed_twice(section: str, names: list[str], key: str, same_as: Callable[[int], str]) -> list[Problem]:
    """The entries of `section` whose `key` (their `names[i]`) an earlier entry already has, each named
    against the first one (`same_as(its index)` says so)."""
    first: dict[str, int] = {}
    problems: list[Problem] = []
    for i, name in enumerate(names):
        if name in first:
            problems.append(((section, i, key), same_as(first[name])))
        first.setdefault(name, i)
    return problems


def _bind_points(host: str) -> tuple[tuple[str, str], ...]:
    """The addresses binding `host` takes, as (family, address); address "*" is all of the family's.

    asyncio and aiohttp set IPV6_V6ONLY, so 0.0.0.0 and :: are each one family's wildcard and do not clash
    with each other; "" binds every address of both. localhost is 127.0.0.1 and ::1. Another name may
    resolve to either family: it clashes with either wildcard and with itself."""
    host = host.strip().lower().removeprefix("[").removesuffix("]")
    if not host:
        return (("any", "*"),)
    if host == "localhost":
        return (("4", "127.0.0.1"), ("6", "::1"))
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return (("any", host.removesuffix(".")),)
    return ((str(ip.version), "*" if ip.is_unspecified else str(ip)),)


def _hosts_clash(a: str, b: str) -> bool:
    """Whether binding hosts `a` and `b` on one port would take a common address."""
    return any((fa == fb or "any" in (fa, fb)) and (xa == xb or "*" in (xa, xb))
               for fa, xa in _bind_points(a) for fb, xb in _bind_points(b))


def _full(alias: str, domain: str) -> str:
    """A default alias as a normalised full address: a bare local part is in `domain`."""
    return normalize_address(alias if "@" in alias else f"{alias}@{domain}")


def resolve_storage_url(url: str, base_dir: str) -> str:
    """Make ``sqlite:///relative.db`` relative to the config folder (not the process's cwd)."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith("sqlite:////") and url != "sqlite:///:memory:":
        rel = url[len(prefix):]
        return prefix + str((Path(base_dir) / rel).resolve())
    return url


def _format_error(err: dict[str, Any], raw: dict[str, Any]) -> str:
    loc = err.get("loc", ())
    parts: list[str] = []
    node: Any = raw
    for item in loc:
        if isinstance(item, int) and isinstance(node, list) and item < len(node):
            entry = node[item]
            label = entry.get("name") or entry.get("address") if isinstance(entry, dict) else None
            parts[-1:] = [f"{parts[-1] if parts else ''}[{item}{' ' + repr(label) if label else ''}]"]
            node = entry
        else:
            parts.append(str(item))
            node = node.get(item) if isinstance(node, dict) else None
    key = ".".join(parts) or "(top level)"
    msg = err.get("msg", "invalid").removeprefix("Value error, ")
    if err.get("type") == "extra_forbidden":
        msg = "unknown key (misspelt, or in the wrong section?)"
    return f"{key}: {msg}"


def parse_config(data: dict[str, Any], *, path: str | os.PathLike[str] | None = None,
                 base_dir: str | None = None) -> Config:
    """Validate a config mapping; raise `ConfigError` with one line per problem."""
    data = dict(data)
    data["base_dir"] = str(base_dir or (Path(path).resolve().parent if path else Path.cwd()))
    # TOML spells lists of tables as [[domains]], [[aliases]], [[imap]], [[listeners]].
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(path, [_format_error(e, data) for e in exc.errors()]) from None


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a TOML config file."""
    p = Path(path)
    try:
        text = p.read_bytes()
    except OSError as exc:
        raise ConfigError(path, [f"cannot read: {exc.strerror}"]) from None
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(path, [f"not valid TOML: {exc}"]) from None
    return parse_config(data, path=p)


def secret(env_name: str | None, *, required: bool = False, what: str = "secret") -> str | None:
    """Read a secret from the environment; a missing required one is a ConfigError naming the variable."""
    if not env_name:
        if required:
            raise ConfigError(None, [f"{what}: no environment variable configured"])
        return None
    value = os.environ.get(env_name)
    if required and not value:
        raise ConfigError(None, [f"{what}: environment variable {env_name} is not set"])
    return value

"""Wiring the worker's two steps from the config: route (pure router + store lookups) and deliver (Odoo).

Kept apart from the worker so the worker stays a state machine and tests can hand it any step.
"""

from __future__ import annotations

import logging
import threading
import weakref
from functools import partial
from typing import Any

from sqlalchemy import Engine

from aliases.load import build_table
from aliases.model import AliasTable
from gateway.config import Config, secret
from gateway.errors import TransientError
from gateway.explain import route_raw
from gateway.spool import SpooledMessage
from gateway.thread_lookup import IndexThreadLookup, SpoolDuplicateLookup
from routing.model import Action, Decision, RoutingEnvelope

log = logging.getLogger(__name__)


class LazyOdooClient:
    """Connects on first use, and again after a failed connect: Odoo being down at start-up must not stop the
    gateway from accepting and routing mail. Every connect failure is a TransientError, the mail waits: a
    missing password variable or an [odoo] `protocol = "auto"` probe answered by a proxy page is the gateway's
    problem, not the mail's, and as a crash or a permanent error it parked every message in the spool dead."""

    def __init__(self, config: Config):
        self._config = config
        self._client: Any = None
        self._lock = threading.Lock()

    def _get(self) -> Any:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._connect()
        return self._client

    def _connect(self) -> Any:
        from gateway.config import ConfigError
        from gateway.errors import TransientError
        from gateway.odoo.client import connect

        try:
            return connect(self._config.odoo)
        except TransientError:
            raise
        except ConfigError as exc:
            raise TransientError(f"cannot connect to Odoo: {'; '.join(exc.problems)}",
                                 hint="fix [odoo] or the gateway's environment and restart it; mail stays "
                                      "spooled and is retried") from None
        except Exception as exc:  # noqa: BLE001 - a PermanentError from the version probe, or a bug
            raise TransientError(f"cannot connect to Odoo at {self._config.odoo.url}: {exc}",
                                 hint="mail stays spooled and is retried; check [odoo] url and protocol") from None

    def reload(self, config: Config) -> None:
        """SIGHUP: a changed `[odoo]` (URL, database, login, secret variable, protocol, timeout, pool) is used
        from the next call on; the workers kept the old connection until a restart. Calls in flight finish on
        the old one."""
        if config.odoo == self._config.odoo:
            self._config = config
            return
        with self._lock:
            self._config, self._client = config, None
        log.info("[odoo] changed: the next Odoo call connects to %s", config.odoo.url)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._get(), name)


def odoo_client(config: Config) -> LazyOdooClient | None:
    """The Odoo client (connected on first use), followed by SIGHUP; None without an `[odoo] url` (adding
    one later needs a restart: the workers were built without delivery)."""
    if not config.odoo.url:
        return None
    client = LazyOdooClient(config)
    _reloadable.add(client)
    return client


def alias_sync(config: Config, client: Any):  # type: ignore[no-untyped-def]
    """An `AliasSync` when `[odoo] sync_aliases` is on (None otherwise)."""
    if client is None or not config.odoo.sync_aliases:
        return None
    from gateway.odoo.alias_sync import AliasSync

    return AliasSync(client, config.odoo.sync_interval)


class RouteStep:
    """`(raw, spooled message) → Decision` with the thread index, duplicate and VERP lookups of this store."""

    def __init__(self, config: Config, engine: Engine, client: Any = None):
        self.config = config
        self.engine = engine
        self.table: AliasTable = build_table(config)
        self.client = client
        self.sync = alias_sync(config, client)
        self._synced_rows: list[dict[str, Any]] = []
        self.threads = IndexThreadLookup(engine, client)
        key = secret(config.outbound.secret_env)
        self.verp = partial(_resolve_verp, engine, key.encode()) if key else None
        self._resolver: Any = None  # sender authentication's DNS resolver, made on first use

    def reload(self, config: Config) -> None:
        """SIGHUP: the new file's aliases, and the sync as `[odoo] sync_aliases` now says. The sync built at
        start was kept before: turned off, routing still took Odoo's aliases that RCPT refused; turned on,
        nothing ever synced. A sync that stays on keeps its rows (no extra read of Odoo)."""
        self.config = config
        if not config.odoo.sync_aliases or self.client is None:
            self.sync, self._synced_rows = None, []
        elif self.sync is None:
            self.sync = alias_sync(config, self.client)
        else:
            self.sync.interval = config.odoo.sync_interval
        self.table = build_table(config, self._synced_rows)
        self._resolver = None  # made again on first use, with the new [auth] nameservers

    def current_table(self) -> AliasTable:
        """Config aliases merged with Odoo's `mail.alias` (config wins), refreshed every `sync_interval`."""
        if self.sync is None:
            return self.table
        rows = self.sync.rows()
        if rows != self._synced_rows:
            self._synced_rows = rows
            self.table = build_table(self.config, rows)
        return self.table

    def _authenticate(self, raw: bytes, message: SpooledMessage) -> tuple[str, tuple[str, ...]]:
        """DMARC verdict and its reasons for the envelope ([auth] enabled). Fails open: errors → temperror."""
        from gateway.sender_auth import check_from_config, describe, make_resolver

        auth = self.config.auth
        if self._resolver is None:
            try:
                self._resolver = make_resolver(auth.nameservers, port=auth.port, timeout=auth.timeout)
            except Exception as exc:  # noqa: BLE001 - no resolv.conf: say so, route on
                log.warning("[auth] no DNS resolver (%s); set [auth] nameservers. Mail routed unauthenticated", exc)
                return "temperror", (f"sender authentication: no DNS resolver ({exc})",)
        results = check_from_config(raw, auth, self._resolver, mail_from=message.mail_from,
                                    client_ip=message.client_addr, helo=message.helo)
        if results.dmarc == "temperror":
            log.warning("message %s: DMARC temperror for %s; contact policies not gated (fail open): %s",
                        message.id, results.from_domain, "; ".join(results.explanation))
        return results.verdict, describe(results)

    def _released_from_quarantine(self, message: SpooledMessage) -> bool:
        """An operator put this quarantined mail back (`quarantine release`): the DMARC gate must not catch it
        again, or the release could never deliver it. Asked only for a failing verdict (rare)."""
        from gateway.spool import history

        quarantined = False
        for entry in history(self.engine, message.id):
            if entry["state"] == "quarantined":
                quarantined = True
            elif quarantined and entry["state"] == "received" and "released" in (entry["note"] or ""):
                return True
        return False

    def __call__(self, raw: bytes, message: SpooledMessage) -> Decision:
        dmarc, notes = self._authenticate(raw, message) if self.config.auth.enabled else (None, ())
        released = bool(dmarc and dmarc.startswith("fail:") and self._released_from_quarantine(message))
        envelope = RoutingEnvelope(mail_from=message.mail_from, rcpt_tos=message.rcpt_tos, source=message.source,
                                   client_addr=message.client_addr, dmarc=dmarc, auth_notes=notes,
                                   released=released)
        _, decision = route_raw(raw, envelope, table=self.current_table(), config=self.config, threads=self.threads,
                                duplicates=SpoolDuplicateLookup(self.engine, exclude_id=message.id),
                                verp=self.verp, sha256=message.sha256)
        if decision.action == Action.QUARANTINE and self.sync is not None and not self.sync.loaded:
            # Routed without Odoo's aliases (never read: Odoo down since start), mail to an alias that exists
            # only in Odoo has no route and was quarantined; it waits for the alias list instead, as RCPT does.
            raise TransientError("Odoo's aliases were never loaded (sync_aliases): the mail waits for them "
                                 f"rather than be quarantined ({decision.reason or 'no route'})",
                                 hint="mail stays spooled; check that Odoo answers")
        return decision


def _resolve_verp(engine: Engine, key: bytes, address: str):  # type: ignore[no-untyped-def]
    from gateway.relay import resolve_verp

    return resolve_verp(engine, key, address)


#: What SIGHUP reloads in this process: every route step and delivery built here. Weakly held: one that is no
#: longer used (tests build many) is not kept alive, nor reloaded.
_reloadable: weakref.WeakSet[Any] = weakref.WeakSet()


def make_route_step(config: Config, engine: Engine, client: Any = None) -> RouteStep:
    step = RouteStep(config, engine, client)
    _reloadable.add(step)
    return step


def reload_aliases(config: Config) -> None:
    """SIGHUP: routing and delivery use the new aliases (model, defaults, contact policy) for the next
    message. Delivery must follow too: it looks up the alias a decision names to create the record."""
    for part in list(_reloadable):
        part.reload(config)


def make_delivery(config: Config, engine: Engine, client: Any = None,  # type: ignore[no-untyped-def]
                  route: RouteStep | None = None):
    """A delivery; given the route step, it reads that step's alias table (Odoo's synced aliases included)."""
    from gateway.delivery import Delivery

    delivery = Delivery(config, engine, client, route.current_table if route is not None else None)
    _reloadable.add(delivery)
    return delivery

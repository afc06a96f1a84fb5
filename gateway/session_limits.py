"""Which SMTP/LMTP sessions one listener has open, how many in all and per client address.

`max_connections` and `max_connections_per_client` (config): past either, a new connection gets 421 4.7.0
and is closed, so the sending MTA retries later and a flood cannot use up the file descriptors the spool
needs too. The refusals are logged at most once per `warn_every` seconds, with how many there were: a flood
is exactly when one line per refusal would bury everything else in the log.

On SIGTERM `drain` closes the listener's sessions: each is told 421 4.3.2 once it is outside a mail transaction,
so a message whose DATA was in flight is still stored and acknowledged (Python 3.11's
`Server.wait_closed()` returns without waiting for any connection: it cannot be what shutdown waits on).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any, Protocol

from gateway.auth_throttle import AuthFailures

log = logging.getLogger(__name__)


class DrainedSession(Protocol):
    """What `SessionLimits.drain` asks of a session (`gateway.listener.LeanSMTPMixin`)."""

    def close_when_idle(self) -> None:
        """421 and close now, or after the final reply of the mail transaction it is inside."""

    def close_now(self) -> bool:
        """421 and close whatever it is doing; True when that cut off a mail transaction."""


class SessionLimits:
    """Shared by one listener's connections; the event loop is their only thread."""

    def __init__(self, total: int, per_client: int, *, name: str = "", warn_every: float = 10.0):
        self.total = total
        self.per_client = per_client
        self.name = name
        self.warn_every = warn_every
        self.open = 0
        self.by_client: dict[str | None, int] = {}
        self._refused = 0
        self._warned_at = -math.inf
        self.auth = AuthFailures(10, 600.0)  # failed AUTHs per client address, across its sessions
        self.sessions: set[DrainedSession] = set()
        #: set by `drain`: new sessions get 421 4.3.2, and a session is closed once outside its mail transaction
        self.closing = False
        self._emptied: asyncio.Event | None = None

    @classmethod
    def of(cls, listener: Any) -> "SessionLimits":
        """The caps a `ListenerConfig` sets."""
        limits = cls(0, 0, name=listener.name or listener.kind)
        limits.apply(listener)
        return limits

    def apply(self, listener: Any) -> None:
        """Take a `ListenerConfig`'s caps (at start, and on reload: sessions already open stay open)."""
        self.total, self.per_client = listener.max_connections, listener.max_connections_per_client
        self.auth.configure(listener.max_auth_failures_per_client, listener.auth_failure_window)

    def admit(self, client: str | None, session: DrainedSession | None = None) -> str | None:
        """Count a new session in, or say why not (it is not counted then). `session`: what `drain` closes."""
        if self.open >= self.total:
            return self._refuse(client, f"too many connections ({self.total})")
        if self.by_client.get(client, 0) >= self.per_client:
            return self._refuse(client, f"too many connections from {client} ({self.per_client})")
        self.open += 1
        self.by_client[client] = self.by_client.get(client, 0) + 1
        if session is not None:
            self.sessions.add(session)
        return None

    def leave(self, client: str | None, session: DrainedSession | None = None) -> None:
        self.open -= 1
        left = self.by_client[client] - 1
        if left:
            self.by_client[client] = left
        else:
            del self.by_client[client]
        self.sessions.discard(session)  # type: ignore[arg-type]
        if self._emptied is not None and not self.sessions:
            self._emptied.set()

    async def drain(self, seconds: float) -> int:
        """Shutdown, once the listening socket is closed: new sessions are refused, idle ones closed at once,
        and one inside a mail transaction is closed after the final reply to its DATA (250 once stored,
        451 if the store is gone) — for at most `seconds`. Then every session left is closed; one still
        inside a transaction gets no 250 for it. Returns how many transactions were cut off that way."""
        self.closing = True
        self._emptied = asyncio.Event()
        for session in list(self.sessions):
            session.close_when_idle()
        if self.sessions:
            try:
                await asyncio.wait_for(self._emptied.wait(), seconds)
            except asyncio.TimeoutError:
                pass
        cut = sum(session.close_now() for session in list(self.sessions))
        if cut:
            log.warning("%s: %d session(s) still inside a mail transaction after %.0f s of shutdown; closed "
                        "without accepting their message (the sender retries)", self.name or "listener", cut,
                        seconds)
        return cut

    def _refuse(self, client: str | None, reason: str) -> str:
        self._refused += 1
        now = time.monotonic()
        if now - self._warned_at >= self.warn_every:
            log.warning("%s: refused %d connection(s) since the last warning, the latest from %s: %s",
                        self.name or "listener", self._refused, client, reason)
            self._refused, self._warned_at = 0, now
        return reason


def listener_key(listener: Any) -> str:
    """Which listener a reloaded config's entry is: its name, else where it listens (names are optional)."""
    return listener.name or f"{listener.kind}:{listener.host}:{listener.port}"

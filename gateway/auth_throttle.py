"""Failed AUTH attempts per client address, across connections.

The per-session limit (`LeanSMTPMixin.auth_failure_limit`) disconnects a client after 3 failed AUTHs, but a
client that reconnects gets 3 more each time: hundreds of passwords a minute against Odoo's submission
login. Here failures are counted per address over a sliding window; at `max_failures` within `window`
seconds the address's AUTH is refused (421 4.7.0, as Postfix's anvil rate limits answer) until its oldest
counted failure leaves the window. A successful AUTH does not clear the count: an attacker who also holds
one valid login must not reset the window with it.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class AuthFailures:
    """Shared by one listener's connections (the event loop is their only thread)."""

    max_clients = 10_000  # addresses remembered at most: a scan from many addresses cannot grow this forever

    def __init__(self, max_failures: int, window: float, *, clock: Callable[[], float] = time.monotonic):
        self.max_failures = max_failures
        self.window = window
        self._clock = clock
        self._failures: dict[str | None, collections.deque[float]] = {}

    def configure(self, max_failures: int, window: float) -> None:
        """New limits (reload); the failures counted so far stay counted."""
        self.max_failures, self.window = max_failures, window
        for client, times in list(self._failures.items()):
            self._failures[client] = collections.deque(times, maxlen=max_failures)

    def blocked_for(self, client: str | None) -> float:
        """Seconds until `client` may try AUTH again; 0 when it may now."""
        times = self._failures.get(client)
        if times is None or len(times) < self.max_failures:
            return 0.0
        left = times[0] + self.window - self._clock()
        return left if left > 0 else 0.0

    def failed(self, client: str | None) -> None:
        times = self._failures.get(client)
        if times is None:
            if len(self._failures) >= self.max_clients:
                self._forget_old()
            times = self._failures[client] = collections.deque(maxlen=self.max_failures)
        times.append(self._clock())
        if len(times) == self.max_failures:
            log.warning("%d failed AUTH attempts from %s within %.0f s: its AUTH is refused for now",
                        self.max_failures, client, self.window)

    def _forget_old(self) -> None:
        """Drop addresses whose last failure left the window; if that frees nothing, the oldest half."""
        now = self._clock()
        stale = [c for c, t in self._failures.items() if not t or t[-1] + self.window <= now]
        for client in stale:
            del self._failures[client]
        if len(self._failures) >= self.max_clients:
            for client in list(self._failures)[: self.max_clients // 2]:
                del self._failures[client]

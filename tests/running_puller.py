"""An IMAP puller running as a task, and waiting on what it does, for the IMAP tests (real Dovecot and the
fake server alike)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from gateway.imap import ImapPuller


class Running:
    """A puller task with a stop event; `await stop()` ends it the way `serve` does."""

    def __init__(self, puller: ImapPuller):
        self.puller = puller
        self.stop_event = asyncio.Event()
        self.task = asyncio.create_task(puller.run(self.stop_event))

    async def stop(self) -> None:
        self.stop_event.set()
        await asyncio.wait_for(self.task, 20)
        self.puller.close()


async def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> float:
    """Seconds until `predicate()` was true, polling every 20 ms; fails the test after `timeout`."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - start

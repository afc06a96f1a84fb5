"""An IMAP puller running as a task, for the IMAP tests (real Dovecot and the fake server alike)."""

from __future__ import annotations

import asyncio

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

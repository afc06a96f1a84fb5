"""Group commit's batching step, shared by the spool writer and the outbound relay's store batcher."""

from __future__ import annotations

import asyncio
from typing import TypeVar

T = TypeVar("T")


async def next_batch(queue: asyncio.Queue[T], *, max_batch: int, max_wait: float) -> list[T]:
    """Wait for one item, then take what is already queued; wait up to `max_wait` seconds for more only
    while the batch is still small. Many sessions' writes then share one commit (one fsync)."""
    loop = asyncio.get_running_loop()
    batch = [await queue.get()]
    deadline = loop.time() + max_wait
    while len(batch) < max_batch:
        try:
            batch.append(queue.get_nowait())
            continue
        except asyncio.QueueEmpty:
            pass
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        try:
            batch.append(await asyncio.wait_for(queue.get(), remaining))
        except asyncio.TimeoutError:
            break
    return batch

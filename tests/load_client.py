"""A load client that behaves like an MTA: it remembers which messages got a 250, and resends the ones whose
session failed (connection refused or reset while the gateway is down) until each one got a 250."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field


@dataclass
class LoadResult:
    acked: dict[str, int] = field(default_factory=dict)     # Message-ID → how many 250s it got
    temp_failures: int = 0                                   # 4xx answers (retried)
    perm_failures: dict[str, str] = field(default_factory=dict)
    connection_errors: int = 0
    latencies: list[float] = field(default_factory=list)


def load_mail(i: int, *, size: int = 2048, thread_of: int | None = None) -> tuple[str, bytes]:
    mid = f"<load{i}@client.test>"
    refs = f"References: <load{thread_of}@client.test>\r\nIn-Reply-To: <load{thread_of}@client.test>\r\n" \
        if thread_of is not None else ""
    head = (f"From: Load {i % 50} <sender{i % 50}@client.test>\r\nTo: sales@example.test\r\n"
            f"Subject: load {i}\r\nMessage-ID: {mid}\r\n{refs}Date: Sun, 22 Nov 2026 10:00:00 +0000\r\n\r\n")
    body = (f"message {i}\r\n" + ("x" * 70 + "\r\n") * (size // 72))
    return mid, (head + body).encode()


async def _session(port: int, mail_from: str, rcpt: str, raw: bytes, timeout: float = 30) -> tuple[int, str]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    try:
        async def reply() -> tuple[int, str]:
            line = b""
            while True:
                line = await asyncio.wait_for(reader.readline(), timeout)
                if not line:
                    raise ConnectionResetError("closed")
                if line[3:4] != b"-":
                    return int(line[:3]), line.decode(errors="replace").strip()

        code, text = await reply()
        if code != 220:
            return code, text
        for cmd in (b"EHLO load.test", f"MAIL FROM:<{mail_from}>".encode(), f"RCPT TO:<{rcpt}>".encode(), b"DATA"):
            writer.write(cmd + b"\r\n")
            await writer.drain()
            code, text = await reply()
            if code >= 400:
                return code, text
        stuffed = raw.replace(b"\r\n.", b"\r\n..")
        writer.write(stuffed + (b"" if stuffed.endswith(b"\r\n") else b"\r\n") + b".\r\n")
        await writer.drain()
        code, text = await reply()
        writer.write(b"QUIT\r\n")
        return code, text
    finally:
        writer.close()


async def run_load(port: int, mails: list[tuple[str, bytes]], *, sessions: int = 8, deadline: float = 600,
                   rcpt: str = "sales@example.test") -> LoadResult:
    """Send every mail until it got a 250 (or a 5xx); `sessions` at a time."""
    result = LoadResult()
    queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
    for m in mails:
        queue.put_nowait(m)
    end = time.monotonic() + deadline

    async def worker() -> None:
        while time.monotonic() < end:
            try:
                mid, raw = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            try:
                t0 = time.perf_counter()
                code, text = await _session(port, "alice@client.test", rcpt, raw)
            except (OSError, asyncio.TimeoutError, ConnectionError):
                result.connection_errors += 1
                queue.put_nowait((mid, raw))
                await asyncio.sleep(0.05 + random.random() * 0.1)
                continue
            if code == 250:
                result.acked[mid] = result.acked.get(mid, 0) + 1
                result.latencies.append(time.perf_counter() - t0)
            elif 400 <= code < 500:
                result.temp_failures += 1
                queue.put_nowait((mid, raw))
                await asyncio.sleep(0.1)
            else:
                result.perm_failures[mid] = text

    await asyncio.gather(*[worker() for _ in range(sessions)])
    return result

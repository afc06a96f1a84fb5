"""Benchmark: pull N messages from a private Dovecot with the gateway's puller vs a plain stdlib imaplib loop.

    .venv/bin/python bench/imap.py [--messages 2000] [--size 14000] [--batch 100] [--sync FULL]

Both pull the same mailbox in the same run. The baseline is what a simple script (or Odoo's fetchmail, minus
its Odoo work) does: one sequential `UID FETCH uid (BODY.PEEK[])` per message, nothing stored. The gateway
does more per message: fetches in UID batches, spools each batch durably (SQLite, fsync per batch), records
the seen-list and checkpoint, and flags every message \\Seen. A batched imaplib fetch is printed for scale.
Figures are msgs/s and ratios against the baseline (machines here are noisy; compare within one run).
"""

from __future__ import annotations

import argparse
import asyncio
import imaplib
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.config import ImapSourceConfig  # noqa: E402
from gateway.imap import ImapPuller  # noqa: E402
from gateway.imap_protocol import uid_set  # noqa: E402
from gateway.store import open_store  # noqa: E402
from tests.dovecot import Dovecot, dovecot_available  # noqa: E402

USER, PASSWORD = "catchall", "bench-pw"


def make_mail(i: int, size: int) -> bytes:
    head = (f"Return-Path: <s{i}@client.test>\r\nDelivered-To: catchall@example.test\r\n"
            f"From: s{i}@client.test\r\nTo: sales@example.test\r\nSubject: bench {i}\r\n"
            f"Message-ID: <bench-{i}@client.test>\r\n\r\n").encode()
    line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def fill(server: Dovecot, n: int, size: int) -> None:
    client = server.client(USER)
    try:
        for i in range(n):
            typ, data = client.append("INBOX", None, None, make_mail(i, size))
            assert typ == "OK", data
    finally:
        client.logout()


def stdlib_sequential(server: Dovecot) -> tuple[int, float]:
    start = time.perf_counter()
    c = imaplib.IMAP4(server.host, server.port)
    c.login(USER, PASSWORD)
    c.select("INBOX")
    uids = c.uid("SEARCH", "ALL")[1][0].split()
    got = 0
    for uid in uids:
        typ, data = c.uid("FETCH", uid, "(BODY.PEEK[])")
        assert typ == "OK"
        got += isinstance(data[0], tuple)
    c.logout()
    return got, time.perf_counter() - start


def stdlib_batched(server: Dovecot, batch: int) -> tuple[int, float]:
    start = time.perf_counter()
    c = imaplib.IMAP4(server.host, server.port)
    c.login(USER, PASSWORD)
    c.select("INBOX")
    uids = [int(u) for u in c.uid("SEARCH", "ALL")[1][0].split()]
    got = 0
    for i in range(0, len(uids), batch):
        typ, data = c.uid("FETCH", uid_set(uids[i:i + batch]), "(BODY.PEEK[])")
        assert typ == "OK"
        got += sum(isinstance(d, tuple) for d in data)
    c.logout()
    return got, time.perf_counter() - start


async def gateway_pull(server: Dovecot, n: int, batch: int, sync: str, db: Path) -> tuple[int, float]:
    engine = open_store(f"sqlite:///{db}", synchronous=sync)
    src = ImapSourceConfig(name="bench", host=server.host, port=server.port, security="none", login=USER,
                           password_env="UNUSED", batch_size=batch, after="seen")
    done = asyncio.Event()
    total = [0]

    def on_spooled(k: int) -> None:
        total[0] += k
        if total[0] >= n:
            done.set()

    puller = ImapPuller(src, engine, password=PASSWORD, on_spooled=on_spooled)
    stop = asyncio.Event()
    start = time.perf_counter()
    task = asyncio.create_task(puller.run(stop))
    await asyncio.wait_for(done.wait(), 600)
    elapsed = time.perf_counter() - start
    stop.set()
    await task
    puller.close()
    engine.dispose()
    return total[0], elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--size", type=int, default=14_000, help="bytes per message (29 MB / 2,000 in PERF-NOTES)")
    ap.add_argument("--batch", type=int, default=100, help="UIDs per FETCH for the gateway")
    ap.add_argument("--sync", choices=["FULL", "NORMAL"], default="FULL", help="SQLite synchronous for the spool")
    args = ap.parse_args()
    reason = dovecot_available()
    if reason:
        print(f"skipped: {reason}")
        return 0
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="mailgate-bench-") as tmp, Dovecot({USER: PASSWORD}) as server:
        t0 = time.perf_counter()
        fill(server, args.messages, args.size)
        print(f"mailbox: {args.messages} messages of ~{args.size} B appended in {time.perf_counter() - t0:.1f} s")
        base_n, base_t = stdlib_sequential(server)
        batch_n, batch_t = stdlib_batched(server, args.batch)
        gw_n, gw_t = asyncio.run(gateway_pull(server, args.messages, args.batch, args.sync, Path(tmp) / "s.db"))
        assert base_n == batch_n == gw_n == args.messages, (base_n, batch_n, gw_n)
        base = base_n / base_t
        rows = [
            ("stdlib imaplib, one UID FETCH per message (baseline)", base_n / base_t),
            (f"stdlib imaplib, {args.batch} UIDs per FETCH, nothing stored", batch_n / batch_t),
            (f"gateway: {args.batch}-UID batches + durable spool ({args.sync}) + \\Seen", gw_n / gw_t),
        ]
        for label, rate in rows:
            print(f"{label:<68} {rate:8.0f} msgs/s  x{rate / base:.2f}")
        print(f"ratio gateway / sequential imaplib: {gw_n / gw_t / base:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Ingest benchmark (issue 2): SMTP msgs/s and latency into (a) Postfix's smtp-sink, (b) stock aiosmtpd that
discards, (c) the gateway on SQLite, (d) the gateway on PostgreSQL — all in one run, as ratios.

Load: Postfix's `smtp-source` (C) with 16 sessions; each session sends its messages over one connection
(`-d`, as Postfix does with connection caching under load). At 4 KB the run is repeated with one message per
connection, where connection setup dominates. Latency: a Python probe beside the load sends one message at a time on its own connection and
times DATA-end → reply. Memory: peak RSS growth of the gateway while it receives one 25 MB message.

    python bench/ingest.py [--messages 10000] [--big-messages 2000] [--rounds 3] [--sessions 16]
                           [--pg-url postgresql+psycopg2://...]

Machines here are noisy (±30 %): read the ratios, not the absolute numbers. Every target runs once per round
and each ratio line is the median of its per-round ratios: with one run per target, the same build measured
1.26–2.08 at 4 KB depending on which minute each target happened to run in. The counts were 3,000 and 600:
smtp-sink took 0.2 s for them, and a 0.2 s run measures start-up and scheduling luck more than throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


class Target:
    def __init__(self, name: str, argv: list[str], port: int | None = None):
        self.name, self.argv, self.port = name, argv, port
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> "Target":
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        if self.port is None:
            assert self.proc.stdout is not None
            self.port = int(self.proc.stdout.readline())
        wait_port(self.port)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def vm(self, key: str) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        return 0


PROBE_EVERY = 0.01  # seconds between probe messages


async def probe(port: int, size: int, stop: asyncio.Event, out: list[float]) -> None:
    """Latency beside the load: one message at a time on a connection of its own, at most one per
    `PROBE_EVERY`. Unpaced, the probe was a 17th session that reconnected for every message — hundreds of
    uncounted messages a second, connection set-up included, taken from the target's capacity (from the
    gateway's more than from smtp-sink's)."""
    body = b"Subject: probe\r\nMessage-ID: <probe@bench>\r\n\r\n" + (b"p" * 70 + b"\r\n") * (size // 72)
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), PROBE_EVERY)
        except asyncio.TimeoutError:
            pass
        else:
            break
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            await r.readline()
            for line in (b"EHLO probe\r\n", b"MAIL FROM:<probe@bench.test>\r\n", b"RCPT TO:<sales@example.test>\r\n",
                         b"DATA\r\n"):
                w.write(line)
                await w.drain()
                while True:
                    reply = await r.readline()
                    if reply[3:4] != b"-":
                        break
            t0 = time.perf_counter()
            w.write(body + b".\r\n")
            await w.drain()
            reply = await r.readline()
            if reply.startswith(b"250"):
                out.append(time.perf_counter() - t0)
            w.write(b"QUIT\r\n")
            w.close()
        except OSError:
            await asyncio.sleep(0.05)


def run_load(port: int, *, sessions: int, size: int, messages: int, reuse: bool = True) -> tuple[float, list[float]]:
    """(msgs/s, probe latencies) for one smtp-source run."""
    lat: list[float] = []

    async def main() -> float:
        stop = asyncio.Event()
        task = asyncio.create_task(probe(port, size, stop, lat))
        t0 = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            "smtp-source", *(["-d"] if reuse else []), "-s", str(sessions), "-l", str(size), "-m", str(messages), "-f", "alice@client.test",
            "-t", "sales@example.test", f"127.0.0.1:{port}",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        _, err = await proc.communicate()
        elapsed = time.perf_counter() - t0
        stop.set()
        await task
        if proc.returncode != 0:
            raise RuntimeError(f"smtp-source failed: {err.decode()[-500:]}")
        return messages / elapsed

    rate = asyncio.run(main())
    return rate, lat


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(p * len(s)))] * 1000


def send_big(port: int, size: int) -> None:
    import smtplib

    body = b"Subject: big\r\nMessage-ID: <big@bench>\r\n\r\n" + (b"B" * 76 + b"\r\n") * (size // 78)
    with smtplib.SMTP("127.0.0.1", port, timeout=120) as s:
        s.sendmail("alice@client.test", ["sales@example.test"], body)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=10000, help="messages at 4 KB")
    ap.add_argument("--big-messages", type=int, default=2000, help="messages at 100 KB")
    ap.add_argument("--sessions", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="every target once per round; ratios are medians")
    ap.add_argument("--pg-url", default=os.environ.get("MAILGATE_TEST_PG_URL"))
    ap.add_argument("--rss-mb", type=int, default=25, help="size of the one-message RSS test")
    args = ap.parse_args()
    if not shutil.which("smtp-source"):
        print("needs Postfix's smtp-source and smtp-sink (apt-get install postfix)")
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="mailgate-bench-"))
    targets: list[tuple[str, list[str], int | None]] = []
    sink_port = free_port()
    targets.append(("a smtp-sink", ["smtp-sink"] + (["-u", "nobody"] if os.geteuid() == 0 else []) + [f"127.0.0.1:{sink_port}", "256"], sink_port))
    targets.append(("b stock aiosmtpd (discard)", [PY, "-m", "bench._stock_aiosmtpd"], None))
    targets.append(("c gateway SQLite", [PY, "-m", "bench._gateway_ingest", f"sqlite:///{tmp}/bench.db"], None))
    if args.pg_url:
        targets.append(("d gateway PostgreSQL", [PY, "-m", "bench._gateway_ingest", args.pg_url], None))
    rounds: list[dict[tuple[str, int], float]] = []
    print(f"{'round':<6} {'target':<28} {'size':>6} {'msgs/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for r in range(1, args.rounds + 1):
        results: dict[tuple[str, int], float] = {}
        rounds.append(results)
        for name, argv, port in targets:
            for size, count in ((4096, args.messages), (100 * 1024, args.big_messages)):
                if name.startswith("c") or name.startswith("d"):
                    for f in tmp.glob("bench.db*"):  # the database, its WAL and its body log folder
                        shutil.rmtree(f) if f.is_dir() else f.unlink()
                with Target(name, argv, port) as t:
                    assert t.port is not None
                    run_load(t.port, sessions=args.sessions, size=size, messages=min(200, count))  # warm-up
                    rate, lat = run_load(t.port, sessions=args.sessions, size=size, messages=count)
                    results[(name[0], size)] = rate
                    print(f"{r:<6} {name:<28} {size // 1024:>4}KB {rate:>9.0f} {pct(lat, .5):>8.1f} "
                          f"{pct(lat, .99):>8.1f}", flush=True)
                    if size == 4096:  # one message per connection: connection setup dominates
                        rate1, lat1 = run_load(t.port, sessions=args.sessions, size=size, messages=count,
                                               reuse=False)
                        results[(name[0], -size)] = rate1
                        print(f"{r:<6} {name + ' (1 msg/conn)':<28} {size // 1024:>4}KB {rate1:>9.0f} "
                              f"{pct(lat1, .5):>8.1f} {pct(lat1, .99):>8.1f}", flush=True)

    def ratio(label: str, num: tuple[str, int], den: tuple[str, int]) -> None:
        """The median over rounds of the within-round ratio (each round's targets ran minutes apart at most)."""
        if num not in rounds[0]:
            return
        values = sorted(res[num] / res[den] for res in rounds)
        print(f"{label}: {statistics.median(values):.2f} (rounds: {', '.join(f'{v:.2f}' for v in values)})")

    n = args.sessions
    ratio(f"ingest ratio vs aiosmtpd (4 KB, {n} sessions)", ("c", 4096), ("b", 4096))
    ratio(f"ingest ratio vs aiosmtpd (100 KB, {n} sessions)", ("c", 102400), ("b", 102400))
    ratio(f"ingest ratio vs smtp-sink (4 KB, {n} sessions)", ("c", 4096), ("a", 4096))
    ratio(f"ingest ratio vs aiosmtpd (4 KB, {n} sessions, 1 message per connection)", ("c", -4096), ("b", -4096))
    ratio(f"ingest ratio PostgreSQL vs aiosmtpd (4 KB, {n} sessions)", ("d", 4096), ("b", 4096))

    size = args.rss_mb * 1024 * 1024
    with Target("c", [PY, "-m", "bench._gateway_ingest", f"sqlite:///{tmp}/rss.db"]) as t:
        assert t.port is not None
        base = t.vm("VmRSS")
        send_big(t.port, size)
        peak = t.vm("VmHWM")
    growth = peak - base
    print(f"peak RSS growth receiving one {args.rss_mb} MB message: {growth / 1e6:.0f} MB = "
          f"{growth / size:.2f}x its size (target <= 3x)")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

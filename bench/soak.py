"""Soak (issue 7): the whole gateway (`mailgate serve` + the Odoo double) at a fixed SMTP rate for a while;
every minute, RSS and the SMTP accept latency (p50/p99), and the delivery backlog — as ratios to minute 1.

    python bench/soak.py [--minutes 10] [--rate 40] [--interval 60]

A leak shows as RSS growing minute after minute; a slow drain as a growing backlog or latency.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.gateway_proc import GatewayProcess, base_config, free_port  # noqa: E402
from tests.load_client import _session, load_mail  # noqa: E402
from tests.odoo_double import OdooDouble  # noqa: E402


def rss(pid: int) -> int:
    """RSS of the serve process and its worker processes."""
    total = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            total += int(line.split()[1]) * 1024
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split() if (task / "children").exists() else []
        total += sum(rss(int(child)) for child in children)
    return total


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(p * len(s)))] * 1000


async def soak(port: int, pid: int, odoo: OdooDouble, *, minutes: float, rate: float, interval: float) -> None:
    sent = 0
    start = time.monotonic()
    window: list[float] = []
    errors = 0
    rows = []
    next_report = start + interval
    inflight: set[asyncio.Task[None]] = set()

    async def one(i: int) -> None:
        nonlocal errors
        _, raw = load_mail(i, size=4096)
        t0 = time.perf_counter()
        try:
            code, _ = await _session(port, "soak@client.test", "sales@example.test", raw)
        except OSError:
            errors += 1
            return
        if code == 250:
            window.append(time.perf_counter() - t0)
        else:
            errors += 1

    print(f"{'report':>6} {'sent':>7} {'rss MB':>8} {'rss x':>6} {'p50 ms':>7} {'p99 ms':>7} {'p99 x':>6} "
          f"{'in Odoo':>8} {'backlog':>8} {'errors':>6}", flush=True)
    while time.monotonic() - start < minutes * 60:
        due = int((time.monotonic() - start) * rate)
        while sent < due:
            task = asyncio.create_task(one(sent))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
            sent += 1
        if time.monotonic() >= next_report:
            delivered = len(odoo.records("crm.lead"))
            row = (rss(pid), pct(window, .5), pct(window, .99))
            rows.append(row)
            base_rss, base_p99 = rows[0][0], rows[0][2]
            print(f"{len(rows):>6} {sent:>7} {row[0] / 1e6:>8.1f} {row[0] / base_rss:>6.2f} {row[1]:>7.1f} "
                  f"{row[2]:>7.1f} {row[2] / base_p99:>6.2f} {delivered:>8} {sent - delivered:>8} {errors:>6}",
                  flush=True)
            window = []
            next_report += interval
        await asyncio.sleep(0.005)
    await asyncio.gather(*inflight)
    if len(rows) >= 2:
        growth = (rows[-1][0] - rows[0][0]) / 1e6
        print(f"RSS growth first→last report: {growth:+.1f} MB ({rows[-1][0] / rows[0][0]:.2f}x); "
              f"p99 last/first: {rows[-1][2] / rows[0][2]:.2f}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--rate", type=float, default=40, help="messages per second")
    ap.add_argument("--interval", type=float, default=60, help="seconds between reports")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mailgate-soak-"))
    odoo = OdooDouble().start()
    gw = GatewayProcess(tmp, base_config(tmp, smtp_port=free_port(), admin_port=free_port(), odoo_url=odoo.url))
    gw.start()
    try:
        assert gw.proc is not None
        asyncio.run(soak(gw.smtp_port, gw.proc.pid, odoo, minutes=args.minutes, rate=args.rate,
                         interval=args.interval))
    finally:
        gw.stop()
        odoo.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

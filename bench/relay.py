"""Relay throughput: Odoo-shaped 4 KB HTML mails through the gateway vs straight to the smarthost.

Both runs use the same discarding aiosmtpd smarthost (in its own process, so it is not competing with the
side being measured for the event loop) and the same aiosmtplib client with N concurrent sessions, each
sending many messages per connection. Baseline: client → smarthost. Gateway: client → submission
listener → store (group commit; VERP + pixel + link rewrite per recipient) → delivery worker → smarthost;
the clock stops when the smarthost has received every copy. Prints msgs/s for both and the ratio
(target ≥ 0.5). Figures are ratios within one run: the machine is noisy. The two sides alternate for
`--rounds` rounds (fresh mails each round) and the median ratio is the result: with one baseline run and one
gateway run, a burst of noise during either decided the figure (single runs of the same code gave 0.32–0.67).

    .venv/bin/python bench/relay.py [--messages 5000] [--rounds 3] [--sessions 16] [--size 4096]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiosmtplib  # noqa: E402


def make_mail(i: int, size: int) -> bytes:
    msg = EmailMessage()
    msg["Message-Id"] = f"<{100000000000000 + i}.1673346177.6953525-openerp-{i}-crm.lead@odoo-host>"
    msg["From"] = '"Mitchell Admin" <notifications@example.test>'
    msg["Reply-To"] = '"Sales" <sales@example.test>'
    msg["To"] = f"customer{i}@customer.test"
    msg["Subject"] = f"Quotation S{i:05d}"
    msg["Return-Path"] = "bounce@example.test"
    msg["X-Odoo-Objects"] = f"crm.lead-{i}"
    # A notification-sized HTML body: a few links (a realistic Odoo mail has 2-6), filler text to the size.
    html = ("<html><body>\n<p>Dear customer, please find <a href=\"https://shop.example.com/quote/{i}\">your "
            "quotation</a>, our <a href=\"https://example.com/terms\">terms</a> and "
            "<a href=\"https://example.com/contact?ref={i}\">how to reach us</a>.</p>\n").format(i=i)
    filler = "<p>Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.</p>\n"
    while len(html) < size - 120:
        html += filler
    html += '<p><a href="https://example.com/shop">Visit the shop</a></p>\n'
    html += "</body></html>\n"
    msg.set_content(html, subtype="html")
    return msg.as_bytes(policy=SMTP_POLICY)


# ------------------------------------------------------------------------------------------ smarthost process
def smarthost_main(port_q: "mp.Queue[int]", count: "mp.Value") -> None:  # type: ignore[type-arg]
    from aiosmtpd.smtp import SMTP

    class Discard:
        async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
            with count.get_lock():
                count.value += 1
            return "250 2.0.0 Ok: discarded"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: SMTP(Discard(), decode_data=False), "127.0.0.1", 0)
        port_q.put(server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    asyncio.run(main())


# ------------------------------------------------------------------------------------------ client
async def blast(port: int, mails: list[tuple[str, bytes]], sessions: int) -> None:
    queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
    for item in mails:
        queue.put_nowait(item)

    async def session() -> None:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=60)
        await smtp.connect()
        try:
            while True:
                try:
                    rcpt, raw = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                await smtp.sendmail("bounce@example.test", [rcpt], raw)
        finally:
            await smtp.quit()

    await asyncio.gather(*(session() for _ in range(sessions)))


async def wait_count(count: "mp.Value", target: int, timeout: float = 120.0) -> None:  # type: ignore[type-arg]
    end = time.perf_counter() + timeout
    while count.value < target:
        if time.perf_counter() > end:
            raise SystemExit(f"timed out: smarthost got {count.value}/{target}")
        await asyncio.sleep(0.002)


async def run_baseline(port: int, mails: list[tuple[str, bytes]], sessions: int, count) -> float:  # type: ignore[no-untyped-def]
    start_count = count.value
    t0 = time.perf_counter()
    await blast(port, mails, sessions)
    await wait_count(count, start_count + len(mails))
    return len(mails) / (time.perf_counter() - t0)


def gateway_main(smarthost_port: int, sessions: int, db_dir: str, port_q: "mp.Queue[int]",
                 profile: str | None) -> None:
    """The gateway under test, alone in its process like a real deployment."""
    os.environ.setdefault("MAILGATE_SECRET", "bench-secret-0123456789abcdef")
    from gateway.config import parse_config
    from gateway.relay_service import start_outbound_services
    from gateway.store import open_configured_store

    cfg = parse_config({
        "listeners": [{"name": "submission", "kind": "submission", "host": "127.0.0.1", "port": 0}],
        "domains": [{"name": "example.test"}],
        "outbound": {"smarthost": f"127.0.0.1:{smarthost_port}", "concurrency": sessions,
                     "per_destination_concurrency": sessions},
        "tracking": {"base_url": "https://t.example.test", "port": 0},
        "events": {"api_token_env": None},
        "storage": {"url": f"sqlite:///{db_dir}/bench.db"},
    }, base_dir=db_dir)
    engine = open_configured_store(cfg)

    async def run() -> None:
        stop = asyncio.Event()
        services = await start_outbound_services(cfg, engine, stop)
        port_q.put(services.submission_ports[0])
        asyncio.get_running_loop().add_signal_handler(15, stop.set)
        await stop.wait()
        b = services.batcher
        import resource
        ru = resource.getrusage(resource.RUSAGE_SELF)
        where = (f"writer thread busy {b.busy_seconds:.2f} s, {b.units} units in {b.batches} commits"
                 if hasattr(b, "busy_seconds") else f"{b.units} units to the batch process")
        print(f"gateway process: cpu {ru.ru_utime + ru.ru_stime:.2f} s (user {ru.ru_utime:.2f}, "
              f"sys {ru.ru_stime:.2f}); {where}", file=sys.stderr)
        await services.close()

    if profile:
        import cProfile
        cProfile.runctx("asyncio.run(run())", globals(), {"run": run, "asyncio": asyncio}, profile)
    else:
        try:
            import uvloop  # as `mailgate serve` runs

            uvloop.run(run())
        except ImportError:
            asyncio.run(run())


async def run_gateway(gw_port: int, mails: list[tuple[str, bytes]], sessions: int, count) -> float:  # type: ignore[no-untyped-def]
    start_count = count.value
    t0 = time.perf_counter()
    await blast(gw_port, mails, sessions)
    t_accepted = time.perf_counter() - t0
    await wait_count(count, start_count + len(mails))
    elapsed = time.perf_counter() - t0
    print(f"gateway: all accepted after {t_accepted:.2f} s, all relayed after {elapsed:.2f} s", file=sys.stderr)
    return len(mails) / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=5000, help="mails per round and side (1,500 let the direct side finish in 0.8 s)")
    ap.add_argument("--rounds", type=int, default=3, help="baseline/gateway rounds; the median ratio counts")
    ap.add_argument("--sessions", type=int, default=16)
    ap.add_argument("--size", type=int, default=4096, help="HTML body size in bytes")
    ap.add_argument("--profile", default=None, help="write a cProfile of the gateway process to this file")
    args = ap.parse_args()

    ctx = mp.get_context("spawn")
    port_q: mp.Queue[int] = ctx.Queue()
    count = ctx.Value("l", 0)
    procs = [ctx.Process(target=smarthost_main, args=(port_q, count), daemon=True)]
    procs[0].start()
    try:
        port = port_q.get(timeout=30)
        with tempfile.TemporaryDirectory() as tmp:
            procs.append(ctx.Process(target=gateway_main, args=(port, args.sessions, tmp, port_q, args.profile)))
            procs[1].start()
            gw_port = port_q.get(timeout=60)
            n = args.messages
            rounds = [[(f"customer{i}@customer.test", make_mail(i, args.size)) for i in range(r * n, (r + 1) * n)]
                      for r in range(args.rounds)]
            warm = [(f"warm{i}@customer.test", make_mail(10**9 + i, args.size)) for i in range(args.sessions)]
            print(f"{args.rounds} rounds of {n} mails of {len(rounds[0][0][1])} bytes, {args.sessions} sessions")

            async def alternate() -> list[tuple[float, float]]:
                await blast(port, warm, args.sessions)  # warm-up: connections, caches
                start = count.value
                await blast(gw_port, warm, args.sessions)
                await wait_count(count, start + len(warm))
                results = []
                for r, mails in enumerate(rounds):
                    base = await run_baseline(port, mails, args.sessions, count)
                    gw = await run_gateway(gw_port, mails, args.sessions, count)
                    print(f"round {r + 1}: direct {base:6.0f} msgs/s, through the gateway {gw:6.0f} msgs/s, "
                          f"ratio {gw / base:.2f}")
                    results.append((base, gw))
                return results

            results = asyncio.run(alternate())
            procs[1].terminate()
            procs[1].join(30)
        ratios = sorted(gw / base for base, gw in results)
        base = statistics.median(b for b, _ in results)
        gw = statistics.median(g for _, g in results)
        print(f"direct to smarthost : {base:8.0f} msgs/s (median)")
        print(f"through the gateway : {gw:8.0f} msgs/s (median)")
        print(f"ratio               : {statistics.median(ratios):8.2f}   (median of {', '.join(f'{x:.2f}' for x in ratios)}; "
              f"target >= 0.5)")
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
            proc.join(5)


if __name__ == "__main__":
    main()

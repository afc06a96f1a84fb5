"""Delivery throughput against the Odoo double: the ceiling (raw message_new + message_post pairs) next to
`Delivery.deliver` in passthrough and explicit mode, with 1, 4 and 8 worker threads.

    .venv/bin/python bench/delivery.py [--messages 100] [--threads 1,4,8] [--protocol jsonrpc|json2]
                                      [--latency-ms 0]

Figures are ratios against the raw rate measured in the same run (machines here are noisy, ±30 %).
`--latency-ms` makes the double sleep per call, closer to a real Odoo (≈12 ms floor, ≈40 ms per mail call).
The integrator extends this to SMTP accept → Odoo post end to end.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.config import parse_config  # noqa: E402
from gateway.delivery import Delivery  # noqa: E402
from gateway.odoo.json2 import Json2Client  # noqa: E402
from gateway.odoo.jsonrpc import JsonRpcClient  # noqa: E402
from gateway.spool import Envelope, get_message, spool_many  # noqa: E402
from gateway.store import open_store  # noqa: E402
from routing.model import Action, Decision, Target  # noqa: E402

DOMAIN = "example.test"


def mail(n: int, run: str) -> bytes:
    return (f"From: Customer {n} <c{n}@customer.example>\r\nTo: sales@{DOMAIN}\r\nSubject: Request {n}\r\n"
            f"Message-ID: <{run}-{n}@customer.example>\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            + "Hello, please send a quote.\r\n" * 40).encode()


class RemoteDouble:
    """The double in its own process, so its CPU does not share this process's GIL (closer to a real Odoo)."""

    def __init__(self, version: str, latency: float):
        ctx = mp.get_context("spawn")
        self._parent, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve_double, args=(version, latency, child), daemon=True)
        self._proc.start()
        info = self._parent.recv()
        self.url, self.db, self.login = info["url"], info["db"], info["login"]
        self.password, self.api_key = info["password"], info["api_key"]

    def calls(self) -> int:
        self._parent.send("calls")
        return int(self._parent.recv())

    def close(self) -> None:
        self._parent.send("stop")
        self._proc.join(10)


def _serve_double(version: str, latency: float, conn) -> None:  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(ROOT))
    from tests.odoo_double import OdooDouble as Double

    d = Double(version=version).start()
    d.slow(latency)
    conn.send({"url": d.url, "db": d.db, "login": d.login, "password": d.password, "api_key": d.api_key})
    while (cmd := conn.recv()) != "stop":
        conn.send(d.call_count if cmd == "calls" else None)
    d.stop()


def client_for(d, protocol: str, pool: int):  # type: ignore[no-untyped-def]
    if protocol == "json2":
        return Json2Client(url=d.url, db=d.db, login=d.login, secret=d.api_key, pool_size=pool)
    return JsonRpcClient(url=d.url, db=d.db, login=d.login, secret=d.password, pool_size=pool)


def run_pool(threads: int, jobs: list, fn) -> tuple[float, list[float]]:  # type: ignore[no-untyped-def]
    lat: list[float] = []

    def timed(job):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        fn(job)
        lat.append(time.perf_counter() - t)

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(timed, jobs))
    return len(jobs) / (time.perf_counter() - start), lat


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000 if values else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=100)
    ap.add_argument("--threads", default="1,4,8")
    ap.add_argument("--protocol", choices=["jsonrpc", "json2"], default="jsonrpc")
    ap.add_argument("--latency-ms", type=float, default=0.0)
    args = ap.parse_args()
    version = "19.0" if args.protocol == "json2" else "17.0"
    rows = []
    d = RemoteDouble(version, args.latency_ms / 1000.0)
    with tempfile.TemporaryDirectory() as tmp:
        for threads in [int(t) for t in args.threads.split(",")]:
            client = client_for(d, args.protocol, threads)

            def raw_pair(n: int) -> None:
                lead = client.message_new("crm.lead", {"subject": f"raw {n}", "email_from": f"c{n}@x"}, {},
                                          context={"mail_create_nolog": True, "mail_create_nosubscribe": True})
                client.message_post("crm.lead", lead, body=f"<p>{n}</p>", body_is_html=True,
                                    message_type="email", message_id=f"<raw-{threads}-{n}@x>")

            raw_rate, raw_lat = run_pool(threads, list(range(args.messages)), raw_pair)
            rows.append((threads, "raw message_new+message_post", raw_rate, 1.0, raw_lat))
            mp_raws = [mail(n, f"raw-mp-{threads}").decode() for n in range(args.messages)]
            mp_rate, mp_lat = run_pool(threads, mp_raws, lambda r: client.message_process(r))
            rows.append((threads, "raw message_process", mp_rate, mp_rate / raw_rate, mp_lat))
            for mode in ("passthrough", "explicit"):
                cfg = parse_config({
                    "storage": {"url": f"sqlite:///{tmp}/{mode}-{threads}.db", "sqlite_synchronous": "NORMAL"},
                    "odoo": {"url": d.url, "db": d.db, "login": d.login, "mode": mode, "pool_size": threads},
                    "domains": [{"name": DOMAIN}],
                    "aliases": [{"address": f"sales@{DOMAIN}", "model": "crm.lead"}],
                }, base_dir=tmp)
                engine = open_store(cfg.storage_url(), synchronous="NORMAL")
                delivery = Delivery(cfg, engine, client)
                run = f"{mode}-{threads}"
                raws = [mail(n, run) for n in range(args.messages)]
                ids = spool_many(engine, [(r, Envelope("c@customer.example", (f"sales@{DOMAIN}",))) for r in raws])
                target = Target(model="crm.lead", alias=f"sales@{DOMAIN}")
                jobs = []
                for ident, raw in zip(ids, raws):
                    msg = get_message(engine, ident)
                    assert msg is not None
                    jobs.append((msg, raw, Decision(action=Action.CREATE, explanation=(), targets=(target,),
                                                    message_id=msg.message_id, recipients=(f"sales@{DOMAIN}",))))

                def deliver(job) -> None:  # type: ignore[no-untyped-def]
                    out = delivery.deliver(*job)
                    assert out.state == "delivered", out.note

                rate, lat = run_pool(threads, jobs, deliver)
                rows.append((threads, f"Delivery.deliver {mode}", rate, rate / raw_rate, lat))
                engine.dispose()
            client.close()
    calls = d.calls()
    d.close()
    print(f"protocol {args.protocol}, {args.messages} messages per row, double latency {args.latency_ms} ms/call, "
          f"{calls} RPC calls in total")
    print(f"{'threads':>7}  {'what':<34} {'msgs/s':>8} {'vs raw':>7} {'p50 ms':>8} {'p99 ms':>8}")
    for threads, what, rate, ratio, lat in rows:
        print(f"{threads:>7}  {what:<34} {rate:>8.1f} {ratio:>7.2f} {statistics.median(lat) * 1000:>8.1f} "
              f"{pct(lat, 0.99):>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

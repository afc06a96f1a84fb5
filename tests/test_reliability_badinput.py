"""Issue 7, bad input: every corpus message mutated (truncated, random bytes, header garbage, invalid charsets,
NULs) plus pathological shapes (10,000 headers, MIME nested 100 deep, 1,000 parts, a 50 MB line) goes through
the real worker (spool → route): no crash, bounded time and memory per message, and each message ends routed
or quarantined with a reason."""

from __future__ import annotations

import gc
import random
import resource
import time
import tracemalloc
from pathlib import Path

import pytest

from gateway.config import parse_config
from gateway.pipeline import make_route_step
from gateway.spool import Envelope, get_message, spool_many
from gateway.store import open_store
from gateway.worker import Worker
from tests.corpus import all_corpus_files

pytestmark = pytest.mark.reliability

CONFIG = {
    "domains": [{"name": "example.test", "strict": True}],
    "aliases": [{"address": "sales@example.test", "model": "crm.lead"}],
}
HANG_GUARD_SECONDS = 20.0  # not a speed target: a message that takes this long is stuck


def mutations(raw: bytes, rng: random.Random) -> dict[str, bytes]:
    head, sep, body = raw.partition(b"\n\n") if b"\r\n\r\n" not in raw else raw.partition(b"\r\n\r\n")
    flipped = bytearray(raw)
    for _ in range(max(1, len(raw) // 200) if raw else 0):
        flipped[rng.randrange(len(flipped))] = rng.randrange(256)
    return {
        "truncated": raw[: max(1, len(raw) // 2)],
        "random_bytes": bytes(flipped),
        "header_garbage": b"\x00\xff:::\r\n: no name\r\nX-\x80\x81: \xfe\xfd\r\n=?utf-8?B?####?=: x\r\n" + raw,
        "invalid_charset": raw.replace(b"charset=", b"charset=x-no-such-charset-").replace(
            b"Subject: ", b"Subject: =?x-bogus?Q?caf=E9?= "),
        "nuls": raw.replace(b"\n", b"\x00\n", 20),
        "no_header_end": head + b"\r\n" + body[:100],
    }


def pathological() -> dict[str, bytes]:
    base = b"From: a@client.test\r\nTo: sales@example.test\r\nSubject: shape\r\nMessage-ID: <shape@x>\r\n"
    many_headers = base + b"".join(b"X-H%d: v\r\n" % i for i in range(10_000)) + b"\r\nbody\r\n"
    nested = base + b"MIME-Version: 1.0\r\n"
    for d in range(100):
        nested += b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (d, d)
    nested += b"Content-Type: text/plain\r\n\r\ndeep\r\n" + b"".join(b"--b%d--\r\n" % d for d in reversed(range(100)))
    parts = base + b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="p"\r\n\r\n' + b"".join(
        b"--p\r\nContent-Type: text/plain\r\nContent-Disposition: attachment; filename=\"../../etc/f%d\"\r\n\r\n"
        b"part %d\r\n" % (i, i) for i in range(1000)) + b"--p--\r\n"
    long_line = base + b"\r\n" + b"L" * (50 * 1024 * 1024) + b"\r\n"
    return {"10k_headers": many_headers, "nested_100": nested, "1000_parts": parts, "50MB_line": long_line}


def _run_all(tmp_path: Path, samples: list[tuple[str, bytes]], *, trace_memory: bool = False
             ) -> list[tuple[str, object, float, int]]:
    config = parse_config(CONFIG, base_dir=str(tmp_path))
    engine = open_store(f"sqlite:///{tmp_path}/bad.db")
    ids = spool_many(engine, [(raw, Envelope("x@client.test", ("sales@example.test",))) for _, raw in samples])
    worker = Worker(config, engine, route=make_route_step(config, engine), deliver=None, owner="badinput")
    out = []
    for (label, raw), ident in zip(samples, ids):
        if trace_memory:
            gc.collect()
            tracemalloc.start()
        t0 = time.perf_counter()
        assert worker.run_once() == 1
        elapsed = time.perf_counter() - t0
        peak = 0
        if trace_memory:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        out.append((label, get_message(engine, ident), elapsed, peak))
    return out


def _check(results, size_of) -> None:  # type: ignore[no-untyped-def]
    for label, msg, elapsed, peak in results:
        assert msg.state in ("routed", "quarantined", "dropped"), (label, msg.state, msg.last_error)
        assert msg.decision and msg.decision["action"] and msg.decision["explanation"], label
        if msg.state == "quarantined":
            assert msg.decision.get("reason"), label
        assert elapsed < HANG_GUARD_SECONDS, (label, elapsed)
        # memory bound: a few copies of the message, never unbounded growth
        assert peak < 8 * size_of(label) + 64 * 1024 * 1024, (label, peak)


def test_every_corpus_message_mutated_is_routed_or_quarantined(tmp_path: Path) -> None:
    files = all_corpus_files()
    if not files:
        pytest.skip("shared corpus not present (../shared/corpus)")
    rng = random.Random(2026)
    samples: list[tuple[str, bytes]] = []
    for path in files:
        raw = path.read_bytes()
        for kind, mutated in mutations(raw, rng).items():
            samples.append((f"{path.name}:{kind}", mutated))
    sizes = {label: len(raw) for label, raw in samples}
    results = _run_all(tmp_path, samples)
    assert len(results) == len(samples) >= 6 * 300
    _check(results, lambda label: sizes[label])


def test_pathological_shapes(tmp_path: Path) -> None:
    samples = list(pathological().items())
    sizes = {label: len(raw) for label, raw in samples}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    results = _run_all(tmp_path, samples, trace_memory=True)
    _check(results, lambda label: sizes[label])
    by_label = {label: msg for label, msg, _, _ in results}
    # Limits are enforced as decisions with a reason, not as crashes.
    assert by_label["10k_headers"].state == "quarantined" and "limit" in by_label["10k_headers"].decision["reason"]
    assert by_label["nested_100"].state == "quarantined"
    assert by_label["1000_parts"].state == "quarantined"
    growth_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert growth_kb < 600 * 1024, f"RSS grew {growth_kb // 1024} MB for a 50 MB message"

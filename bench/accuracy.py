"""Bounce / auto-reply accuracy against the shared labelled corpus, and classification time per message.

    .venv/bin/python bench/accuracy.py [--corpus DIR] [--misses] [--repeat N]

Prints, per corpus folder: messages, labelled messages, agreement on addresses, agreement on
addresses + kind, and each miss. Kind follows the labels' own meaning: flufl.bounce's "permanent" is a
final failure (our action "failed"), "temporary" a delay warning (our "delayed", or a soft result).
A stricter column reads "permanent" as our "hard": where it disagrees, our spec deliberately calls a
permanent failure soft (mailbox full, timeouts, policy blocks); those are listed as policy, not misses.
Timing is reported as a ratio against the stdlib parse of the same messages (measured in the same run).
"""

from __future__ import annotations

import argparse
import email
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from routing.arf import parse_arf  # noqa: E402
from routing.autoreply import detect_auto_reply  # noqa: E402
from routing.bounce import classify_bounce  # noqa: E402
from tests.corpus import message_files  # noqa: E402


def _labels(folder: Path) -> list[dict]:
    path = folder / "labels.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def flufl(folder: Path) -> tuple[list[str], dict]:
    misses, policy = [], []
    n = addr_ok = kind_ok = strict_ok = 0
    for label in _labels(folder):
        if label.get("recipients") is None and not label.get("detectors") and "all_failures" not in label:
            continue  # not referenced upstream (bounce_01)
        n += 1
        perm = {a.lower() for a in label.get("permanent", [])}
        temp = {a.lower() for a in label.get("temporary", [])}
        msg = email.message_from_bytes((folder / label["file"]).read_bytes())
        report = classify_bounce(msg)
        got = {r.recipient.lower(): r for r in (report.results if report else ())}
        if set(got) != perm | temp:
            misses.append(f"{label['file']}: expected {sorted(perm | temp)}, got {sorted(got)}"
                          f" via {report.via if report else None}")
            continue
        addr_ok += 1
        kinds = all(got[a].action == "failed" for a in perm) and \
            all(got[a].action == "delayed" or got[a].kind == "soft" for a in temp)
        if kinds:
            kind_ok += 1
        else:
            misses.append(f"{label['file']}: kind: " + ", ".join(f"{a} {r.action}/{r.kind}" for a, r in got.items()))
        if kinds and all(got[a].kind == "hard" for a in perm):
            strict_ok += 1
        elif kinds:
            policy.append(f"{label['file']}: " + ", ".join(f"{a} soft:{got[a].reason}" for a in perm
                                                            if got[a].kind != "hard"))
    return misses, {"labelled": n, "addr": addr_ok, "kind": kind_ok, "strict": strict_ok, "policy": policy}


def mikel(folder: Path) -> tuple[list[str], dict]:
    misses = []
    n = ok = 0
    for label in _labels(folder):
        dsn = label.get("dsn")
        if not dsn:
            continue
        n += 1
        report = classify_bounce(email.message_from_bytes((folder / label["file"]).read_bytes()))
        results = report.results if report else ()
        problems = []
        if dsn.get("bounced") and not any(r.action == "failed" for r in results):
            problems.append("no failed recipient")
        if dsn.get("bounced") is False and any(r.action == "failed" for r in results):
            problems.append("failed result on a non-bounce")
        if "final_recipient" in dsn:
            match = [r for r in results if r.recipient.lower() == dsn["final_recipient"].lower()]
            if not match:
                problems.append(f"missing {dsn['final_recipient']}")
            else:
                r = match[0]
                want = {"action": dsn["action"], "status": dsn["status"], "diagnostic": dsn["diagnostic_code"],
                        "remote_mta": dsn["remote_mta"].split(";", 1)[-1].strip(), "kind": dsn["hard_or_soft"]}
                have = {"action": r.action, "status": r.status, "diagnostic": r.diagnostic,
                        "remote_mta": r.remote_mta, "kind": r.kind}
                problems += [f"{k}: {have[k]!r} != {v!r}" for k, v in want.items() if have[k] != v]
        if problems:
            misses.append(f"{label['file']}: " + "; ".join(problems))
        else:
            ok += 1
    return misses, {"labelled": n, "addr": ok, "kind": ok}


def autoreply(folder: Path) -> tuple[list[str], dict]:
    misses = []
    n = ok = 0
    for label in _labels(folder):
        n += 1
        msg = email.message_from_bytes((folder / label["file"]).read_bytes())
        report = classify_bounce(msg)
        is_bounce = bool(report and report.results)
        is_auto = (not is_bounce) and detect_auto_reply(msg) is not None
        if is_bounce == label["is_bounce"] and is_auto == label["is_auto_reply"]:
            ok += 1
        else:
            misses.append(f"{label['file']}: bounce={is_bounce} auto_reply={is_auto}")
    return misses, {"labelled": n, "addr": ok, "kind": ok}


def timing(paths: list[Path], repeat: int) -> tuple[float, float, int]:
    """Seconds per message: stdlib compat32 parse, then bounce + auto-reply + ARF on freshly parsed messages
    (each pass parses anew, so no per-message cache carries over between passes)."""
    raws = [p.read_bytes() for p in paths]
    parse = classify = 0.0
    errors = 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        msgs = [email.message_from_bytes(r) for r in raws]
        parse += time.perf_counter() - t0
        t0 = time.perf_counter()
        for m in msgs:
            try:
                classify_bounce(m)
                detect_auto_reply(m)
                parse_arf(m)
            except Exception:  # noqa: BLE001 - counted and reported
                errors += 1
        classify += time.perf_counter() - t0
    count = len(raws) * repeat
    return parse / count, classify / count, errors


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "corpus")
    ap.add_argument("--misses", action="store_true", help="print every miss (default: at most 10 per folder)")
    ap.add_argument("--repeat", type=int, default=3, help="timing passes over the whole corpus")
    args = ap.parse_args(argv)
    if not args.corpus.is_dir():
        print(f"corpus not found at {args.corpus}", file=sys.stderr)
        return 2
    print(f"{'folder':<16} {'msgs':>5} {'labelled':>8} {'addresses':>10} {'addr+kind':>10} {'perm=hard':>10}")
    for name, fn in (("flufl.bounce", flufl), ("mikel-mail", mikel), ("autoreply-dev", autoreply)):
        folder = args.corpus / name
        if not folder.is_dir():
            continue
        msgs = sum(1 for _ in (folder / "emails").rglob("*") if _.is_file())
        misses, stats = fn(folder)
        n = stats["labelled"] or 1
        strict = f"{100 * stats['strict'] / n:9.1f}%" if "strict" in stats else f"{'-':>10}"
        print(f"{name:<16} {msgs:>5} {stats['labelled']:>8} {100 * stats['addr'] / n:9.1f}% "
              f"{100 * stats['kind'] / n:9.1f}% {strict}")
        for line in misses if args.misses else misses[:10]:
            print(f"    miss   {line}")
        for line in stats.get("policy", []) if args.misses else stats.get("policy", [])[:10]:
            print(f"    policy {line}")
    paths = message_files(args.corpus)
    print(f"\ntiming, {args.repeat} pass(es); ratio = classification (bounce + auto-reply + ARF) / stdlib parse")
    for label, subset in (("all corpus", paths),
                          ("NDRs (flufl.bounce)", [p for p in paths if "flufl.bounce" in p.parts]),
                          ("other mail", [p for p in paths if "flufl.bounce" not in p.parts])):
        parse, classify, errors = timing(subset, args.repeat)
        print(f"  {label:<20} {len(subset):>4} msgs: parse {parse * 1e3:.3f} ms/msg, classify "
              f"{classify * 1e3:.3f} ms/msg = {classify / parse:.2f}x parse; exceptions: {errors}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

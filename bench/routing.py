"""Routing speed: decisions per second over the corpus, and time per decision at 4 KB / 100 KB / 1 MB.

    .venv/bin/python bench/routing.py [--sizes 4K,100K,1M] [--repeat 200] [--corpus-rounds 2]

One process, one core. Every figure is printed next to a baseline measured in the same run (machines here
are noisy, ±30 %): the bare stdlib compat32 parse of the same bytes (`email.message_from_bytes`). Columns:
- `decision`  parse_mail + route (real detectors) — what a worker pays per message;
- `parse`     parse_mail alone (headers decoded, limits walked);
- `mailparser` mail-parser's `parse_from_bytes` (for the choice of parser);
- `content`   extract_content (bodies and attachments; only delivery pays it).
Defaults finish in well under a minute; raise --repeat for steadier tails.
"""

from __future__ import annotations

import argparse
import base64
import email
import hashlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aliases.model import Alias, AliasTable, Domain  # noqa: E402
from routing.model import NoDuplicates, RoutingEnvelope, StaticThreads, ThreadHit  # noqa: E402
from routing.parse import extract_content, parse_mail, parse_with_mailparser  # noqa: E402
from routing.router import route  # noqa: E402

TABLE = AliasTable(
    domains=(Domain("example.com"), Domain("example.org", strict=True)),
    aliases=tuple(Alias(f"alias{i}@example.com", "crm.lead") for i in range(50)) + (
        Alias("sales@example.com", "crm.lead"), Alias("support@example.org", "helpdesk.ticket")),
)
THREADS = StaticThreads({f"<thread{i}@odoo.example.com>": ThreadHit(f"<thread{i}@odoo.example.com>",
                                                                    "crm.lead", i) for i in range(1000)})
ENVELOPE = RoutingEnvelope(mail_from="alice@client.net", rcpt_tos=("sales@example.com",))


def make_message(size: int, seq: int = 0) -> bytes:
    """A realistic reply: Received chain, References, multipart/alternative, and an attachment past 8 KB."""
    refs = " ".join(f"<thread{seq % 1000 + k}@odoo.example.com>" for k in range(5))
    head = (
        "Received: from mx.client.net (mx.client.net [192.0.2.1]) by mx.example.com with ESMTPS id abc\r\n"
        "\tfor <sales@example.com>; Mon, 2 Mar 2026 10:00:00 +0000\r\n"
        "Received: from [10.0.0.5] by mx.client.net with ESMTPSA; Mon, 2 Mar 2026 09:59:58 +0000\r\n"
        "From: =?utf-8?q?Alice_D=C3=BCrer?= <alice@client.net>\r\n"
        "To: Sales <sales@example.com>\r\nCc: bob@client.net, carol@client.net\r\n"
        f"Subject: =?utf-8?q?Re:_Angebot_f=C3=BCr_Q{seq}?=\r\n"
        f"Message-ID: <bench-{seq}-{size}@client.net>\r\nIn-Reply-To: <thread{seq % 1000}@odoo.example.com>\r\n"
        f"References: {refs}\r\nDate: Mon, 2 Mar 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n"
        "DKIM-Signature: v=1; a=rsa-sha256; d=client.net; s=s1; bh=" + "A" * 44 + "; b=" + "B" * 340 + "\r\n"
        'Content-Type: multipart/mixed; boundary="MIX"\r\n\r\n'
    )
    para = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt. "
    text_budget = min(max(size - len(head) - 600, 200), 6000) // 2
    text = (para * (text_budget // len(para) + 1))[:text_budget]
    body = (
        '--MIX\r\nContent-Type: multipart/alternative; boundary="ALT"\r\n\r\n'
        f"--ALT\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{text}\r\n"
        f"--ALT\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>{text}</p>\r\n--ALT--\r\n"
    )
    raw = head + body
    remaining = size - len(raw) - 200
    if remaining > 0:
        blob = base64.encodebytes(bytes((i * 7) % 256 for i in range(remaining * 3 // 4))).decode()
        raw += ('--MIX\r\nContent-Type: application/pdf; name="offer.pdf"\r\n'
                'Content-Disposition: attachment; filename="offer.pdf"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
                + blob.replace("\n", "\r\n"))
    raw += "--MIX--\r\n"
    return raw.encode()


def decide(raw: bytes) -> object:
    parsed = parse_mail(raw)
    return route(parsed, ENVELOPE, aliases=TABLE, threads=THREADS, duplicates=NoDuplicates(),
                 sha256=hashlib.sha256(raw).hexdigest())


def timings(fn: Callable[[bytes], object], messages: list[bytes]) -> list[float]:
    out = []
    for raw in messages:
        t0 = time.perf_counter()
        fn(raw)
        out.append(time.perf_counter() - t0)
    return out


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def parse_size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1024, "M": 1024 * 1024}.get(text[-1:], 1)
    return int(float(text.rstrip("KM")) * mult)


def corpus_messages() -> list[bytes]:
    from tests.corpus import all_corpus_files
    from tests.test_threads import split_mbox

    out: list[bytes] = []
    for path in all_corpus_files():
        data = path.read_bytes()
        out.extend(split_mbox(data) if path.suffix == ".mbox" else [data])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="4K,100K,1M")
    ap.add_argument("--repeat", type=int, default=200, help="messages per size (1 MB uses repeat/10)")
    ap.add_argument("--corpus-rounds", type=int, default=2)
    args = ap.parse_args(argv)

    stdlib = email.message_from_bytes
    corpus = corpus_messages()
    if corpus:
        for raw in corpus[:20]:  # warm-up (imports, codec caches)
            decide(raw)
        base = sum(timings(stdlib, corpus * args.corpus_rounds))
        took = sum(timings(decide, corpus * args.corpus_rounds))
        n = len(corpus) * args.corpus_rounds
        print(f"corpus: {len(corpus)} messages x {args.corpus_rounds}: {n / took:,.0f} decisions/s on one core "
              f"({took / n * 1e3:.2f} ms each); bare stdlib parse {n / base:,.0f}/s → decision costs "
              f"{took / base:.2f}x the bare parse")
    else:
        print("corpus: not present (../shared/corpus); skipped")

    print()
    print(f"{'size':>6} {'n':>5}  {'baseline ms':>11}  {'decision med/p99 ms':>20} {'x base':>7}  "
          f"{'parse_mail':>10} {'x base':>7}  {'mailparser':>10} {'x base':>7}  {'content':>8} {'x base':>7}")
    for size_text in args.sizes.split(","):
        size = parse_size(size_text)
        n = max(5, args.repeat // 10) if size >= 512 * 1024 else args.repeat
        msgs = [make_message(size, i) for i in range(n)]
        decide(msgs[0])
        base = statistics.median(timings(stdlib, msgs))
        dec = timings(decide, msgs)
        par = statistics.median(timings(parse_mail, msgs))
        mp = statistics.median(timings(parse_with_mailparser, msgs))
        parsed = [parse_mail(m) for m in msgs]
        con = statistics.median(timings(lambda i: extract_content(parsed[i]), list(range(n))))  # type: ignore[arg-type]
        med = statistics.median(dec)
        print(f"{size_text:>6} {n:>5}  {base * 1e3:>11.3f}  {med * 1e3:>9.3f} / {p99(dec) * 1e3:>8.3f} "
              f"{med / base:>7.2f}  {par * 1e3:>10.3f} {par / base:>7.2f}  {mp * 1e3:>10.3f} {mp / base:>7.2f}  "
              f"{con * 1e3:>8.3f} {con / base:>7.2f}")
    print("\n(target: median decision < 2 ms at 4 KB; 'x base' = ratio to the bare compat32 parse of the same bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

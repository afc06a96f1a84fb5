"""`mailgate events tail [--json] [--follow]` and `mailgate events replay --subscriber NAME [--since SEQ]`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from gateway.cli import add_config_arg, bounded_int, load_or_exit, open_engine


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("events", help="inspect and replay the event stream")
    sub = p.add_subparsers(dest="events_command", metavar="ACTION")

    tail = sub.add_parser("tail", help="print the newest events (and, with --follow, new ones as they come)")
    add_config_arg(tail)
    tail.add_argument("--json", action="store_true", help="one JSON event per line (docs/events.md)")
    tail.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    tail.add_argument("-n", "--lines", type=bounded_int(0, what="a count"), default=20,
                      help="how many recent events first (default 20; 0: none, only --follow's new ones)")
    tail.add_argument("--types", default="", help="comma-separated event types to show")
    tail.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    tail.set_defaults(func=cmd_tail)

    rep = sub.add_parser("replay", help="send a webhook subscriber's events again (sent and dead-lettered)")
    add_config_arg(rep)
    rep.add_argument("--subscriber", required=True, help="webhook name from config [[events.webhooks]]")
    rep.add_argument("--since", type=bounded_int(0, what="a sequence number"), default=None, help="only events with this sequence number or later")
    rep.set_defaults(func=cmd_replay)

    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def format_line(event: dict[str, Any]) -> str:
    """One human-readable line per event."""
    mail = event["mail"]
    record = mail.get("record") or {}
    where = f"{record.get('model')}#{record.get('id')}" if record else "-"
    data = event.get("data") or {}
    detail = ""
    if event["type"] == "bounced":
        detail = f"{data.get('kind')} {data.get('reason')} {data.get('status') or ''}".strip()
    elif event["type"] == "clicked":
        detail = str(data.get("url"))
    elif event["type"] == "opened":
        detail = "machine" if data.get("machine") else "human"
    elif event["type"] in ("deferred", "delivered"):
        detail = f"{data.get('status') or ''} {(data.get('diagnostic') or data.get('response') or '')[:80]}".strip()
    return (f"{event['seq']:>8} {event['occurred_at'][:19]} {event['type']:<12} {mail.get('recipient') or '-':<32} "
            f"{where:<20} {detail}").rstrip()


def cmd_tail(args: argparse.Namespace) -> int:
    """The newest -n events of --types (read newest first and reversed, up to the top sequence number), then
    with --follow what commits from then on, including a lower number that was still in flight at the start
    (`follow_start`): nothing is skipped or printed twice."""
    from gateway.events import GapWatch, follow_start, newest_events, read_settled

    config = load_or_exit(args.config)
    engine = open_engine(config)
    types = [t for t in args.types.split(",") if t]
    cursor, top, there = follow_start(engine)
    newest = newest_events(engine, args.lines, types=types, upto=top)
    _print(newest, args.json)
    there.update(e["seq"] for e in newest)  # one that committed in between may be in the listing too
    gaps = GapWatch()
    while args.follow:
        time.sleep(args.interval)
        rows, cursor = read_settled(engine, gaps, after=cursor, types=types, limit=1000)
        _print([e for e in rows if e["seq"] not in there], args.json)
        if cursor >= top:
            there.clear()  # the cursor is past everything that was there
    return 0


def _print(rows: list[dict[str, Any]], as_json: bool) -> None:
    for e in rows:
        print(json.dumps(e, sort_keys=True) if as_json else format_line(e))
    sys.stdout.flush()


def cmd_replay(args: argparse.Namespace) -> int:
    from gateway.events import fan_out, replay

    config = load_or_exit(args.config)
    hooks = {h.name: h for h in config.events.webhooks}
    if args.subscriber not in hooks:
        names = ", ".join(sorted(hooks)) or "none configured"
        print(f"unknown subscriber {args.subscriber!r} (configured: {names})", file=sys.stderr)
        return 1
    engine = open_engine(config)
    while True:  # a transaction per batch: between them the spool writer gets the write lock (SMTP intake)
        with engine.begin() as conn:
            if not fan_out(conn, hooks[args.subscriber]):
                break
    n = replay(engine, hooks[args.subscriber], args.since)
    print(f"{n} event(s) queued again for {args.subscriber}; a running gateway sends them within seconds")
    return 0

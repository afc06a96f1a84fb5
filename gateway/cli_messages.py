"""`mailgate messages list|show|verify|purge`: what is in the spool, where each message is, and why."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from gateway.cli import add_config_arg, after_id, bounded_int, count, load_or_exit, message_id, open_engine


def register(sub: Any) -> None:
    p = sub.add_parser("messages", help="inspect spooled messages")
    msub = p.add_subparsers(dest="messages_command", metavar="ACTION")
    lp = msub.add_parser("list", help="list the newest messages (newest last), or page through from an id")
    add_config_arg(lp)
    lp.add_argument("--state", action="append", help="filter by state (repeatable)")
    lp.add_argument("--limit", type=count, default=100,
                    help="how many (default 100): the newest ones, or with --after the first ones above that id")
    lp.add_argument("--after", type=after_id, default=None, metavar="ID",
                    help="page forward instead: ids above this one, oldest first (--after 0: from the start)")
    lp.add_argument("--json", action="store_true", help="one JSON object per line")
    lp.set_defaults(func=cmd_list)
    sp = msub.add_parser("show", help="one message: envelope, state, decision, history")
    add_config_arg(sp)
    sp.add_argument("id", type=message_id)
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--raw", action="store_true", help="print the raw message bytes")
    sp.set_defaults(func=cmd_show)
    vp = msub.add_parser("verify", help="read back every body kept in body log segment files and check it "
                                        "(after restoring a backup); exit 1 if any is missing or damaged")
    add_config_arg(vp)
    vp.add_argument("--json", action="store_true", help="one JSON object per problem, then a summary")
    vp.set_defaults(func=cmd_verify)
    pp = msub.add_parser("purge", help="retention: drop raw bodies of finished mail older than N days")
    add_config_arg(pp)
    # Not below 0: a negative age is a cutoff in the future, and every finished message's body went, the
    # quarantined mail received a minute ago included.
    pp.add_argument("--older-than-days", type=bounded_int(0, 100_000, what="days"), default=None,
                    help="default: [retention] raw_days")
    pp.set_defaults(func=cmd_purge)


def cmd_verify(args: argparse.Namespace) -> int:
    from gateway.spool import verify_logged_bodies

    checked, problems = verify_logged_bodies(open_engine(load_or_exit(args.config)))
    for ident, problem in problems:
        print(json.dumps({"id": ident, "problem": problem}) if args.json else f"message {ident}: {problem}")
    if args.json:
        print(json.dumps({"checked": checked, "problems": len(problems)}))
    else:
        print(f"{checked} bodies in the body log checked, {len(problems)} missing or damaged")
    return 1 if problems else 0


def cmd_list(args: argparse.Namespace) -> int:
    """The newest `--limit` messages, oldest of them first (the oldest 100 of a busy spool are days old), or,
    with `--after`, the next `--limit` above that id. Read and printed 500 at a time, so a long listing
    neither builds up in memory nor holds one read transaction open."""
    from gateway.spool import iter_messages, newest_after_id

    engine = open_engine(load_or_exit(args.config))
    after = args.after if args.after is not None else newest_after_id(engine, args.limit, states=args.state)
    for m in iter_messages(engine, states=args.state, limit=args.limit, after_id=after):
        if args.json:
            d = m.to_json()
            d.pop("decision", None)
            print(json.dumps(d))
        else:
            print(f"{m.id:>8} {m.state:<11} {m.received_at:%Y-%m-%d %H:%M:%S} {m.size:>9} "
                  f"{m.action or '-':<10} {m.message_id or '-'} from=<{m.mail_from}> to={','.join(m.rcpt_tos)}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from gateway.body_log import BodyLogError
    from gateway.spool import get_message, get_raw, history

    engine = open_engine(load_or_exit(args.config))
    m = get_message(engine, args.id)
    if m is None:
        print(f"no message {args.id}", file=sys.stderr)
        return 1
    if args.raw:
        try:
            raw = get_raw(engine, args.id)
        except BodyLogError as exc:
            print(f"message {args.id}: {exc}", file=sys.stderr)
            return 1
        if raw is None:
            print(f"message {args.id}: raw body purged", file=sys.stderr)
            return 1
        sys.stdout.buffer.write(raw)
        return 0
    data = m.to_json()
    data["history"] = history(engine, args.id)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for key in ("id", "state", "message_id", "mail_from", "rcpt_tos", "source", "listener", "client_addr", "helo",
                "received_at", "size", "sha256", "attempts", "next_attempt_at", "last_error"):
        print(f"{key:>16}: {data[key]}")
    if m.decision:
        print(f"{'action':>16}: {m.decision.get('action')}")
        for line in m.decision.get("explanation", []):
            print(f"{'':>16}  - {line}")
        for t in m.decision.get("targets", []):
            print(f"{'target':>16}: {json.dumps(t)}")
        for b in m.decision.get("bounces", []):
            print(f"{'bounce':>16}: {b['recipient']} {b['kind']} {b['reason']} {b.get('status') or ''}")
    print(f"{'history':>16}:")
    for h in data["history"]:
        print(f"{'':>16}  {h['at']} {h['state']}: {h['note'] or ''}")
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    """Bodies go (personal data); rows, decisions, history and events stay."""
    import datetime as dt

    from gateway.spool import purge_raw
    from gateway.store import utcnow

    config = load_or_exit(args.config)
    days = args.older_than_days if args.older_than_days is not None else config.retention.raw_days
    n = purge_raw(open_engine(config), utcnow() - dt.timedelta(days=days))
    print(f"purged the raw bodies of {n} message(s) finished more than {days} day(s) ago")
    return 0

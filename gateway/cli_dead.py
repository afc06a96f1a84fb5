"""`mailgate dead list|retry`: mail that delivery gave up on, and sending it again once the cause is fixed.

A message is `dead` after a permanent Odoo error (access rights, missing model or field, validation, no
route in Odoo) or after its retry horizon. `retry` puts it back to `received`: it is routed again with
today's configuration and delivered; the `odoo_writes` ledger makes sure nothing Odoo already has is
created or posted twice.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from gateway.cli import add_config_arg, after_id, count, load_or_exit, message_id, open_engine


def register(sub: Any) -> None:
    p = sub.add_parser("dead", help="messages delivery gave up on (permanent Odoo errors)")
    dsub = p.add_subparsers(dest="dead_command", metavar="ACTION")
    lp = dsub.add_parser("list", help="list dead messages with the reason")
    add_config_arg(lp)
    lp.add_argument("--limit", type=count, default=100)
    lp.add_argument("--after", type=after_id, default=0, help="only ids above this one")
    lp.add_argument("--json", action="store_true", help="one JSON object per line")
    lp.set_defaults(func=cmd_list)
    rp = dsub.add_parser("retry", help="route and deliver dead messages again")
    add_config_arg(rp)
    rp.add_argument("ids", type=message_id, nargs="*", metavar="ID")
    rp.add_argument("--all", action="store_true", help="every dead message")
    rp.set_defaults(func=cmd_retry)


def cmd_list(args: argparse.Namespace) -> int:
    from gateway.spool import list_messages

    engine = open_engine(load_or_exit(args.config))
    for m in list_messages(engine, states=["dead"], limit=args.limit, after_id=args.after):
        if args.json:
            print(json.dumps({"id": m.id, "message_id": m.message_id, "action": m.action,
                              "attempts": m.attempts, "updated_at": m.updated_at.isoformat(),
                              "mail_from": m.mail_from, "rcpt_tos": list(m.rcpt_tos), "error": m.last_error}))
        else:
            print(f"{m.id:>8} {m.updated_at:%Y-%m-%d %H:%M:%S} attempts={m.attempts} {m.action or '-':<10} "
                  f"{m.message_id or '-'}\n         {m.last_error or '(no reason recorded)'}")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    from gateway.spool import get_message, list_messages, release

    if not args.ids and not args.all:
        print("name one or more IDs, or --all", file=sys.stderr)
        return 2
    engine = open_engine(load_or_exit(args.config))
    ids = list(args.ids)
    if args.all:
        after = 0
        while batch := list_messages(engine, states=["dead"], limit=500, after_id=after):
            ids += [m.id for m in batch]
            after = batch[-1].id
    status = 0
    for ident in dict.fromkeys(ids):
        m = get_message(engine, ident)
        if m is None:
            print(f"{ident}: no such message", file=sys.stderr)
            status = 1
        elif m.state != "dead":
            print(f"{ident}: is {m.state}, not dead; left alone", file=sys.stderr)
            status = 1
        elif m.raw_purged:
            print(f"{ident}: raw body purged by retention; cannot be delivered again", file=sys.stderr)
            status = 1
        elif release(engine, ident, note="dead retry by operator", states=("dead",)):
            print(f"{ident}: queued for delivery again")
        else:  # the check above is a transaction of its own: the message may have changed since
            now = get_message(engine, ident)
            why = f"is {now.state} now, not dead; left alone" if now is not None and now.state != "dead" \
                else "could not be released"
            print(f"{ident}: {why}", file=sys.stderr)
            status = 1
    return status

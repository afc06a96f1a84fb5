"""`mailgate explain` and `mailgate quarantine list|show|release|delete`.

Thin: parse arguments, call `gateway.explain` or `gateway.spool`, print. Exit 1 for what the operator must
fix (unreadable file, unknown id), 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from gateway.cli import add_config_arg, after_id, count, load_or_exit, message_id, open_engine


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("explain", help="print the routing decision for mail files, and why")
    add_config_arg(p)
    p.add_argument("--rcpt", action="append", default=[], metavar="ADDR",
                   help="envelope recipient (repeatable); default: Delivered-To / X-Original-To / To")
    p.add_argument("--thread", action="append", default=[], metavar="MSGID=MODEL:ID",
                   help="pretend this Message-ID is known on this record (repeatable)")
    p.add_argument("--json", action="store_true", help="one JSON object per file and line")
    p.add_argument("files", nargs="+", metavar="MSG.eml")
    p.set_defaults(func=cmd_explain)

    q = subparsers.add_parser("quarantine", help="list, show, release or delete quarantined mail")
    qs = q.add_subparsers(dest="quarantine_command", metavar="ACTION")
    ql = qs.add_parser("list", help="quarantined messages, oldest first")
    add_config_arg(ql)
    ql.add_argument("--limit", type=count, default=100)
    ql.add_argument("--after", type=after_id, default=0, help="only ids greater than this (paging)")
    ql.add_argument("--json", action="store_true")
    ql.set_defaults(func=cmd_quarantine_list)
    for name, func, helptext in (("show", cmd_quarantine_show, "one message: envelope, decision, history"),
                                 ("release", cmd_quarantine_release, "route it again with the current config"),
                                 ("delete", cmd_quarantine_delete, "delete it and its raw bytes")):
        sp = qs.add_parser(name, help=helptext)
        add_config_arg(sp)
        sp.add_argument("id", type=message_id)
        sp.add_argument("--json", action="store_true")
        sp.set_defaults(func=func)
    q.set_defaults(func=lambda args: (q.print_help(), 2)[1])


def _threads(specs: list[str]) -> Any:
    from routing.model import NoThreads, StaticThreads, ThreadHit
    from routing.threads import normalize_message_id

    if not specs:
        return NoThreads()
    hits: dict[str, ThreadHit] = {}
    for spec in specs:
        mid, _, where = spec.partition("=")
        model, _, res_id = where.partition(":")
        norm = normalize_message_id(mid)
        if not norm or not model or not res_id.isdigit():
            raise SystemExit(f"--thread {spec!r}: expected <msgid@host>=model:id")
        hits[norm] = ThreadHit(message_id=norm, model=model, res_id=int(res_id))
    return StaticThreads(hits)


def cmd_explain(args: argparse.Namespace) -> int:
    from aliases.load import build_table
    from gateway.explain import explain_bytes

    config = load_or_exit(args.config)
    table = build_table(config)
    threads = _threads(args.thread)
    status = 0
    for path in args.files:
        try:
            with open(path, "rb") as fh:
                raw = fh.read()
        except OSError as exc:
            print(f"{path}: cannot read: {exc.strerror}", file=sys.stderr)
            status = 1
            continue
        result = explain_bytes(raw, table=table, config=config, rcpt=tuple(args.rcpt), file=path,
                               threads=threads)
        if args.json:
            print(json.dumps(result.to_json(), ensure_ascii=False))
        else:
            print(result.to_text())
    return status


def _reason(msg: Any) -> str:
    d = msg.decision or {}
    return d.get("reason") or msg.last_error or ""


def cmd_quarantine_list(args: argparse.Namespace) -> int:
    from gateway.spool import list_messages

    config = load_or_exit(args.config)
    engine = open_engine(config)
    rows = list_messages(engine, states=["quarantined"], limit=args.limit, after_id=args.after)
    if args.json:
        for m in rows:
            print(json.dumps({"id": m.id, "received_at": m.received_at.isoformat(), "message_id": m.message_id,
                              "mail_from": m.mail_from, "rcpt_tos": list(m.rcpt_tos), "size": m.size,
                              "reason": _reason(m)}, ensure_ascii=False))
        return 0
    if not rows:
        print("no quarantined mail")
        return 0
    print(f"{'ID':>7}  {'RECEIVED (UTC)':19}  {'FROM':30}  {'TO':30}  REASON")
    for m in rows:
        print(f"{m.id:>7}  {m.received_at:%Y-%m-%d %H:%M:%S}  {(m.mail_from or '<>')[:30]:30}  "
              f"{', '.join(m.rcpt_tos)[:30]:30}  {_reason(m)}")
    return 0


def _get_quarantined(engine: Any, ident: int) -> Any:
    from gateway.spool import get_message

    msg = get_message(engine, ident)
    if msg is None:
        print(f"no message {ident}", file=sys.stderr)
        return None
    if msg.state != "quarantined":
        print(f"message {ident} is {msg.state}, not quarantined", file=sys.stderr)
        return None
    return msg


def _headers_of(raw: bytes | None) -> str:
    if raw is None:
        return "(raw bytes purged by retention)"
    from gateway.spool import header_block

    return header_block(raw).decode("utf-8", "replace")


def cmd_quarantine_show(args: argparse.Namespace) -> int:
    from gateway.body_log import BodyLogError
    from gateway.spool import get_raw, history

    config = load_or_exit(args.config)
    engine = open_engine(config)
    msg = _get_quarantined(engine, args.id)
    if msg is None:
        return 1
    try:
        raw = None if msg.raw_purged else get_raw(engine, msg.id)
    except BodyLogError as exc:  # show what the row knows, and why the bytes are not there
        print(f"message {msg.id}: {exc}", file=sys.stderr)
        raw = None
    if args.json:
        out = msg.to_json()
        out["history"] = history(engine, msg.id)
        out["headers"] = _headers_of(raw)
        print(json.dumps(out, ensure_ascii=False))
        return 0
    print(f"message {msg.id}: {msg.state} — {_reason(msg)}")
    print(f"  Message-ID: {msg.message_id or '(none)'}  size {msg.size}  sha256 {msg.sha256[:16]}…")
    print(f"  received {msg.received_at:%Y-%m-%d %H:%M:%S} UTC via {msg.source} {msg.listener} "
          f"from {msg.client_addr or '?'}")
    print(f"  MAIL FROM: {msg.mail_from or '<>'}   RCPT TO: {', '.join(msg.rcpt_tos)}")
    for line in (msg.decision or {}).get("explanation", []):
        print(f"  - {line}")
    print("  history:")
    for h in history(engine, msg.id):
        print(f"    {h['at']}  {h['state']:12} {h['note'] or ''}")
    print("  headers:")
    for line in _headers_of(raw).splitlines():
        print(f"    {line}")
    return 0


def cmd_quarantine_release(args: argparse.Namespace) -> int:
    from gateway.spool import release

    config = load_or_exit(args.config)
    engine = open_engine(config)
    if _get_quarantined(engine, args.id) is None:
        return 1
    ok = release(engine, args.id, note="released from quarantine by operator; routed again with current config",
                 states=("quarantined",))
    if args.json:
        print(json.dumps({"id": args.id, "released": ok}))
    elif ok:
        print(f"message {args.id} released: it will be routed again")
    elif _get_quarantined(engine, args.id) is not None:  # else it says what the message is now
        print(f"message {args.id} could not be released (raw bytes purged?)", file=sys.stderr)
    return 0 if ok else 1


def cmd_quarantine_delete(args: argparse.Namespace) -> int:
    from gateway.spool import delete_message

    config = load_or_exit(args.config)
    engine = open_engine(config)
    if _get_quarantined(engine, args.id) is None:
        return 1
    ok = delete_message(engine, args.id, states=("quarantined",))
    if args.json:
        print(json.dumps({"id": args.id, "deleted": ok}))
    elif ok:
        print(f"message {args.id} deleted")
    elif _get_quarantined(engine, args.id) is not None:  # else it says what the message is now
        print(f"message {args.id} was not deleted", file=sys.stderr)
    return 0 if ok else 1

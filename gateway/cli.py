"""The `mailgate` command line.

Each group of subcommands lives in its own module (`gateway.cli_<group>`) with a
`register(subparsers)` function that adds its parsers and sets `func` on each; this file only assembles
them. Exit codes: 0 ok, 1 a problem the operator must fix (bad config, unknown id), 2 usage.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import Any

from sqlalchemy.exc import DBAPIError

#: Modules that contribute subcommands, in help order. A missing module is skipped (partial installs).
COMMAND_MODULES = (
    "gateway.cli_serve",      # serve, check-config
    "gateway.cli_messages",   # messages list|show
    "gateway.cli_routing",    # explain, quarantine list|show|release|delete
    "gateway.cli_dead",       # dead list|retry
    "gateway.cli_events",     # events tail|replay
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailgate", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
    mp = sub.add_parser("migrate", help="bring the store's schema to this version (serve does it at start; "
                                        "the other commands only check it)")
    add_config_arg(mp)
    mp.set_defaults(func=cmd_migrate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if "serve" in args_in[:3]:  # before the subcommand modules import prometheus_client (see gateway.metrics_dir)
        from gateway.metrics_dir import prepare

        prepare()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from gateway.logs import setup_logging

    setup_logging(args.log_level)
    from gateway.migrate import SchemaMismatch

    try:
        return int(args.func(args) or 0)
    except SchemaMismatch as exc:  # serve/worker/migrate on a database a newer mailgate migrated
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        return 130


def add_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", required=True, help="path to mailgate.toml")


def masked_url(url: str) -> str:
    """The store URL as an operator command prints it: the password shown as ***, never in clear (check-config
    output and error messages end up in tickets and chat)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(unparsable storage url)"


#: the largest id and count the stores take (a signed 64-bit integer): a larger one is an OverflowError in the
#: database driver, not an answer
MAX_INT = 2**63 - 1


def bounded_int(lo: int, hi: int = MAX_INT, what: str = "") -> Any:
    """An argparse type: an integer in lo..hi, else a usage error (exit 2) that says the range. A negative
    --limit meant "no limit" to SQLite; an id past 2**63-1 was a traceback."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{text} is out of range: {what or 'expected'} {lo}..{hi}")
        return value

    parse.__name__ = what or "integer"  # argparse names the type in its messages
    return parse


#: a message id; a count (at least one); an id to page after (0: from the start)
message_id = bounded_int(1, what="an id")
count = bounded_int(1, what="a count")
after_id = bounded_int(0, what="an id")


def load_or_exit(path: str):  # type: ignore[no-untyped-def]
    """Load the config or print its problems (file, key, what is wrong) and exit 1."""
    from gateway.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        raise SystemExit(1) from None


def open_engine(config):  # type: ignore[no-untyped-def]
    """The store for an operator command, without migrating it: a newer `mailgate` run by hand must not change
    the schema under a running older gateway. A store that is missing, older or newer than this code: say
    which command fixes it and exit 1."""
    from pathlib import Path

    from gateway.migrate import SchemaMismatch, check
    from gateway.store import open_configured_store, sqlite_file

    url = config.storage_url()
    path = sqlite_file(url)
    if path is not None and not Path(path).exists():  # opening it would create an empty file
        print(f"{path}: no mailgate store here; run `mailgate migrate -c <config>` (or start `mailgate serve`)",
              file=sys.stderr)
        raise SystemExit(1)
    engine = open_configured_store(config, migrate=False)
    try:
        check(engine)
    except SchemaMismatch as exc:
        engine.dispose()
        print(str(exc), file=sys.stderr)
        raise SystemExit(1) from None
    except DBAPIError as exc:
        engine.dispose()
        raise cannot_open(url, exc) from None
    return engine


def cannot_open(url: str, exc: DBAPIError) -> SystemExit:
    """`<url>: cannot open store: <reason>` on stderr, and the exit 1 to raise: a file that is not a database,
    a directory where the database should be, a read-only store or an unreachable server is a problem for the
    operator to fix, not a traceback (the password masked: this ends up in tickets)."""
    reason = str(exc.orig if exc.orig is not None else exc).strip().splitlines()
    print(f"{masked_url(url)}: cannot open store: {reason[0] if reason else type(exc).__name__}", file=sys.stderr)
    return SystemExit(1)


def cmd_migrate(args: argparse.Namespace) -> int:
    """`mailgate migrate`: create the store or bring its schema to head."""
    from gateway.migrate import SchemaMismatch, check, current, head, upgrade
    from gateway.store import open_configured_store

    config = load_or_exit(args.config)
    engine = open_configured_store(config, migrate=False)
    try:
        try:
            before = current(engine)
        except DBAPIError as exc:
            raise cannot_open(config.storage_url(), exc) from None
        try:
            check(engine)
            print(f"schema already at {before}")
            return 0
        except SchemaMismatch as exc:
            if exc.database_newer:
                print(str(exc), file=sys.stderr)
                return 1
        upgrade(engine)
        print(f"schema migrated from {before or 'nothing (new store)'} to {head()}")
        return 0
    finally:
        engine.dispose()


if __name__ == "__main__":  # pragma: no cover
    logging.basicConfig()
    sys.exit(main())

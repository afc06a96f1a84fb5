"""`mailgate serve`, `mailgate worker` and `mailgate check-config`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from gateway.cli import add_config_arg, load_or_exit, masked_url
from gateway.disk_space import FreeSpace, spool_free_space


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="run listeners, IMAP pullers, workers, relay and admin HTTP")
    add_config_arg(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="run only routing/delivery workers (extra processes or other nodes)")
    add_config_arg(p)
    p.add_argument("--threads", type=int, default=None, help="worker threads (default: [worker] concurrency)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("check-config", help="validate the config; show domains, aliases (and, with --odoo, "
                                            "Odoo access)")
    add_config_arg(p)
    p.add_argument("--json", action="store_true", help="print the effective alias table as JSON")
    p.add_argument("--odoo", action="store_true", help="also log in to Odoo and check the user's rights")
    p.set_defaults(func=cmd_check_config)


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.serve import run

    config = load_or_exit(args.config)
    return run(config, args.config)


def cmd_worker(args: argparse.Namespace) -> int:
    import signal
    import threading

    from gateway.serve import build_worker_factory
    from gateway.store import open_configured_store
    from gateway.worker import run_workers

    config = load_or_exit(args.config)
    engine = open_configured_store(config)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    threads = run_workers(build_worker_factory(config, engine), args.threads or config.worker.concurrency, stop,
                          poll=config.worker.poll_interval)
    while any(t.is_alive() for t in threads):
        for t in threads:
            t.join(0.5)
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from gateway.body_log import body_log_dir

    config = load_or_exit(args.config)
    table = config.alias_table()
    problems: list[str] = []
    odoo_report: dict[str, Any] | None = None
    if args.odoo and config.odoo.url:  # only when asked: a config check must not log in to production Odoo
        from gateway.odoo.check import check_odoo_access

        odoo_report = check_odoo_access(config)
        problems.extend(odoo_report.get("problems", []))
    elif args.odoo:
        problems.append("odoo: no [odoo] url configured")
    space = spool_free_space(config.storage_url(), config.storage.min_free_mb)
    problems.extend(_host_problems(config, space))
    problems.extend(_relay_start_problems(config))
    if args.json:
        print(json.dumps({
            "domains": [d.__dict__ for d in table.domains],
            "aliases": [{**a.__dict__, "defaults": dict(a.defaults)} for a in table.aliases],
            "odoo": odoo_report, "problems": problems,
        }, indent=2, default=str))
    else:
        print(f"{args.config}: OK" if not problems else f"{args.config}: {len(problems)} problem(s)")
        print(f"storage: {masked_url(config.storage_url())}")
        bodies = body_log_dir(config.storage_url()) if config.storage.body_log_min else None
        if bodies is not None:
            print(f"body log: bodies of {config.storage.body_log_min} bytes and more in {bodies}/ "
                  "(back it up with the database)")
        if space is not None:
            print(f"disk: {space.free() >> 20} MiB free in {space.path} (new mail is refused below "
                  f"{config.storage.min_free_mb} MiB)")
        for lc in config.listeners:
            print(f"listener {lc.name or lc.kind}: {lc.kind} on {lc.host}:{lc.port} "
                  f"(max {lc.max_message_size} bytes, {lc.max_recipients} rcpts, {lc.max_connections} sessions)")
            note = lc.plaintext_auth_note()
            if note:
                print(f"listener {lc.name or lc.kind}: {note}")
        for d in table.domains:
            print(f"domain {d.name}: catchall={d.catchall_address} bounce={d.bounce_address} "
                  f"strict={d.strict} default_alias={d.default_alias}")
        for a in table.aliases:
            extra = f" force_thread_id={a.force_thread_id}" if a.force_thread_id else ""
            print(f"alias {a.address} -> {a.model} contact={a.contact} ({a.source}){extra}")
        if odoo_report:
            for line in odoo_report.get("lines", []):
                print(f"odoo: {line}")
        for p in problems:
            print(f"{args.config}: {p}", file=sys.stderr)
    return 1 if problems else 0


def _host_problems(config: Any, space: FreeSpace | None) -> list[str]:
    """What this host would make `serve` refuse: too little disk where the spool lives (every MAIL FROM would
    get 452), or an open-files hard limit below the listeners' `max_connections` (serve can raise only the soft
    limit, up to the hard one)."""
    import resource

    from gateway.serve import fd_shortfall

    problems = []
    if space is not None and space.free() < space.min_free:
        problems.append(f"storage: min_free_mb: only {space.free() >> 20} MiB free in {space.path}; every "
                        "listener would answer 452 4.3.1 to new mail")
    shortfall = fd_shortfall(config, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    if shortfall:
        problems.append(f"listeners: max_connections: {shortfall}")
    return problems


def _relay_start_problems(config: Any) -> list[str]:
    """What `serve` checks only when it starts its relay, checked here: the EHLO name for delivery by MX, and
    the secrets it reads from its environment: the VERP/tracking key
    (whenever the outbound side runs: a submission listener or webhooks), the smarthost password (when a login
    is set), each webhook's signing secret, and the password of each submission login (read at AUTH time:
one lost in a deploy fails Odoo's every login). Run as `ExecStartPre=` (same environment as serve), this
    says which variable a deploy lost before the service fails to start."""
    from gateway.config import ConfigError, secret
    from gateway.outbound import helo_problem, smarthost_password
    from gateway.relay_service import site_secret

    relays = any(lc.kind == "submission" for lc in config.listeners)
    checks: list[Any] = []
    if relays or config.events.webhooks:
        checks.append(lambda: site_secret(config))
    if relays:
        checks.append(lambda: smarthost_password(config))
        checks.append(lambda: _raise_if(helo_problem(config)))
    for lc in config.listeners:
        for login, env in (lc.auth_users_env.items() if lc.kind == "submission" else ()):
            checks.append(lambda login=login, env=env, lc=lc: secret(
                env, required=True, what=f"listener {lc.name or lc.kind}: the password of login {login!r}"))
    for hook in config.events.webhooks:
        checks.append(lambda hook=hook: secret(hook.secret_env, required=True, what=f"webhook {hook.name} secret"))
    problems = []
    for check in checks:
        try:
            check()
        except ConfigError as exc:
            problems.extend(exc.problems)
    return problems


def _raise_if(problem: str | None) -> None:
    from gateway.config import ConfigError

    if problem:
        raise ConfigError(None, [problem])

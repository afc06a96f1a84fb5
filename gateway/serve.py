"""`mailgate serve`: one event loop that accepts (listeners, IMAP, admin, outbound services), worker
threads or processes that route and deliver.

Signals: SIGTERM/SIGINT stop accepting (close listening sockets), let sessions inside a mail transaction
finish its DATA and get its reply (bounded by `drain_seconds`), answer every session 421 4.3.2 and close it,
flush the spool writer, stop workers at a message boundary. SIGHUP re-reads the config file
and swaps the alias table used at RCPT time, by routing and by delivery — in this process and in the worker
processes — and the listeners' session limits; listeners keep running. A worker process that dies is started
again (its claimed messages come back when their lease expires).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import signal
import socket
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine

from gateway.admin import make_admin_app, start_admin
from gateway.disk_space import spool_free_space
from gateway.childproc import die_with_parent, helper_store_url, signals_held
from gateway.config import Config, ConfigError, load_config
from gateway.listener import ListenerPolicy, SpoolHandler, bound_port, start_listener
from gateway.metrics import HELPER_STARTS
from gateway.session_limits import SessionLimits, listener_key
from gateway.spool import Spooler, SpoolWriter, make_body_log
from gateway.spool_process import ProcessSpoolWriter
from gateway.store import open_configured_store
from gateway.worker import run_workers

log = logging.getLogger(__name__)


def make_rcpt_verdict(config: Config, synced: list[dict[str, Any]] | None = None):  # type: ignore[no-untyped-def]
    """The RCPT-time check: the config's aliases, merged with rows synced from Odoo's `mail.alias` (config
    wins) when `[odoo] sync_aliases` is on.

    `synced` None means no sync has succeeded yet. Then the table lacks every Odoo-only alias, so an address
    it calls unknown in a strict domain gets "try_later" (451 4.3.0), not "unknown_user" (550 5.1.1): while
    Odoo was down at start, senders were told, permanently, that Odoo's aliases did not exist."""
    from aliases.load import build_table
    from aliases.resolve import rcpt_verdict

    table = build_table(config, synced if synced and config.odoo.sync_aliases else ())
    if synced is not None or not (config.odoo.url and config.odoo.sync_aliases):
        return lambda address: rcpt_verdict(table, address)

    def until_synced(address: str) -> tuple[str, str]:
        verdict, why = rcpt_verdict(table, address)
        if verdict == "unknown_user":
            return "try_later", f"{address.strip('<>').lower()}: alias list not loaded from Odoo yet"
        return verdict, why

    return until_synced


def primary_domain(config: Config, hostname: str) -> str:
    """Where a domain-less RCPT TO:<postmaster> goes: the first configured domain, else this host."""
    return config.domains[0].name if config.domains else hostname


@dataclass
class Gateway:
    """A running gateway: what `stop()` has to close, and the bound ports (tests bind port 0)."""

    config: Config
    config_path: str | None
    engine: Engine
    writer: Spooler
    handlers: list[SpoolHandler] = field(default_factory=list)
    servers: list[asyncio.base_events.Server] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)
    admin_runner: Any = None
    admin_port: int | None = None
    stop_event: asyncio.Event = field(default_factory=asyncio.Event)
    #: set by `reload` (and `stop`): the alias sync looks at the new `[odoo]` now, not after `sync_interval`
    alias_sync_wake: asyncio.Event = field(default_factory=asyncio.Event)
    worker_stop: threading.Event = field(default_factory=threading.Event)
    worker_wake: threading.Event = field(default_factory=threading.Event)
    worker_threads: list[threading.Thread] = field(default_factory=list)
    worker_processes: list[multiprocessing.process.BaseProcess] = field(default_factory=list)
    background: list[asyncio.Task[Any]] = field(default_factory=list)
    #: the outbound relay, webhook dispatcher and tracking HTTP, when the config asks for any of them
    outbound: Any = None
    #: set when `stop` begins (before the drain): a worker process ending now is not started again
    stopping: bool = False
    #: the background tasks that end by themselves once `stop_event` is set (closing their child processes
    #: and connections on the way out); `stop` lets them finish before it cancels the rest
    graceful: list[asyncio.Task[Any]] = field(default_factory=list)
    reloaded: int = 0
    #: the last `mail.alias` rows synced from Odoo: a reload merges them into the new file's table, so an
    #: Odoo-only alias is not refused (550 5.1.1, permanent) until the next sync succeeds. None until a sync
    #: succeeded (or while the sync is off): unknown addresses in strict domains are then answered 451
    synced_alias_rows: list[dict[str, Any]] | None = None
    #: bumped at each reload; worker processes poll it and re-read the config file (no signal to race their
    #: start-up: a SIGHUP before a child installed its handler would kill it)
    reload_generation: Any = None
    #: starts worker process i (set when the config asks for worker processes)
    spawn_worker: Any = None
    session_limits: dict[str, SessionLimits] = field(default_factory=dict)
    #: this host's name, the bare postmaster's domain when the config has no [[domains]]
    hostname: str = "localhost"

    def reload(self) -> None:
        """SIGHUP: re-read the config file; swap aliases (here and in the worker processes) and the listeners'
        session limits. A broken file keeps the old config (logged)."""
        if not self.config_path:
            return
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("reload refused, keeping the running config: %s", exc)
            return
        verdict = make_rcpt_verdict(new, self.synced_alias_rows)
        postmaster_domain = primary_domain(new, self.hostname)
        for h in self.handlers:
            h.set_rcpt_verdict(verdict, postmaster_domain)
        self.config = new
        self.reloaded += 1
        from gateway.pipeline import reload_aliases

        reload_aliases(new)
        self.alias_sync_wake.set()
        if self.reload_generation is not None:
            with self.reload_generation.get_lock():
                self.reload_generation.value += 1
        for lc in new.listeners:
            limits = self.session_limits.get(listener_key(lc))
            if limits is not None:
                limits.apply(lc)
        log.info("configuration reloaded: %d domain(s), %d alias(es)", len(new.domains), len(new.aliases))

    async def stop(self, drain_seconds: float = 30.0) -> None:
        """SIGTERM: stop accepting; sessions inside a mail transaction finish it and get its reply (at most
        `drain_seconds`), every session gets 421 4.3.2; then flush the writer and stop everything else."""
        self.stopping = True
        for s in self.servers + (self.outbound.smtp_servers if self.outbound is not None else []):
            s.close()
        # Not `Server.wait_closed()`: in Python 3.11 it returns at once, without waiting for any connection.
        # Before `stop_event`: a submission session's DATA needs the relay's committer and worker still up.
        await asyncio.gather(*(limits.drain(drain_seconds) for limits in self.session_limits.values()))
        self.stop_event.set()
        self.alias_sync_wake.set()
        await self.writer.close()
        if self.graceful:
            await asyncio.wait(self.graceful, timeout=max(drain_seconds, 5.0))
        for t in self.background:
            t.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
        self.worker_stop.set()
        self.worker_wake.set()
        loop = asyncio.get_running_loop()
        for t in self.worker_threads:
            await loop.run_in_executor(None, t.join, 60)
        for p in self.worker_processes:
            p.terminate()  # SIGTERM: the child finishes its current message and exits
            await loop.run_in_executor(None, p.join, 60)
        if self.admin_runner is not None:
            await self.admin_runner.cleanup()


def build_worker_factory(config: Config, engine: Engine):  # type: ignore[no-untyped-def]
    """Workers sharing one route step, one Odoo client (a pool) and one delivery."""
    from gateway.pipeline import make_delivery, make_route_step, odoo_client
    from gateway.worker import Worker

    client = odoo_client(config)
    route = make_route_step(config, engine, client)
    delivery = make_delivery(config, engine, client, route) if client is not None else None
    return lambda i: Worker(config, engine, route=route, deliver=delivery)


def _worker_process_main(config_path: str, reload_generation: Any) -> None:  # pragma: no cover - child
    from gateway.logs import setup_logging
    from gateway.pipeline import reload_aliases

    die_with_parent()
    setup_logging()
    config = load_config(config_path)
    engine = open_configured_store(config, migrate=False)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    seen = reload_generation.value
    threads = run_workers(build_worker_factory(config, engine), config.worker.concurrency, stop,
                          poll=config.worker.poll_interval)
    while not stop.wait(0.5):
        if reload_generation.value != seen:  # serve got SIGHUP and accepted the new file
            seen = reload_generation.value
            try:
                reload_aliases(load_config(config_path))
            except ConfigError as exc:  # changed again since serve read it: keep ours until the next reload
                log.error("worker: reload refused, keeping the running config: %s", exc)
    for t in threads:
        t.join()


async def _supervise_workers(gw: Gateway, every: float = 1.0, backoff_max: float = 60.0) -> None:
    """Start again a worker process that died (the OOM killer, a crash in a C extension): without it the
    listeners went on accepting mail that nothing routed. Its claimed messages come back when their lease
    expires. A worker that keeps dying is restarted at most every `backoff_max` seconds."""
    import time

    delay = [every] * len(gw.worker_processes)
    not_before = [0.0] * len(gw.worker_processes)
    while not gw.stop_event.is_set():
        now = time.monotonic()
        for i, p in enumerate(gw.worker_processes):
            # `stopping`: systemd's SIGTERM reaches the whole group, and a worker that finished its message and
            # exited while serve drained its sessions was started again, only to be stopped a moment later.
            if p.exitcode is None or gw.stopping or gw.stop_event.is_set() or now < not_before[i]:
                continue
            log.error("worker process %s exited (code %s); starting it again", p.name, p.exitcode)
            p.close()
            gw.worker_processes[i] = gw.spawn_worker(i)
            not_before[i], delay[i] = now + delay[i], min(delay[i] * 2, backoff_max)
        try:
            await asyncio.wait_for(gw.stop_event.wait(), every)
        except asyncio.TimeoutError:
            pass


async def start_gateway(config: Config, *, config_path: str | None = None, workers: bool = True,
                        engine: Engine | None = None, hostname: str | None = None) -> Gateway:
    """Start everything the config asks for; returns a handle whose `stop()` shuts it down cleanly."""
    engine = engine or open_configured_store(config)
    from gateway.relay_service import tune_interpreter

    # Store writer threads (`writer = "thread"`, the in-process writer of ≥ 1 MiB messages, the workers' and
    # IMAP pullers' commits) must get the GIL promptly when their fsync returns: callers wait for that commit.
    tune_interpreter()
    hostname = hostname or socket.getfqdn()  # once: aiosmtpd would resolve it again for every connection
    gw_ref: dict[str, Gateway] = {}

    def on_commit(_n: int) -> None:
        if "gw" in gw_ref:
            gw_ref["gw"].worker_wake.set()

    writer = make_spool_writer(config, engine, on_commit)
    await writer.start()
    gw = Gateway(config=config, config_path=config_path, engine=engine, writer=writer, hostname=hostname)
    gw_ref["gw"] = gw
    if any(lc.kind == "submission" for lc in config.listeners) or config.events.webhooks:
        # Started here, awaited, before any listener: its ConfigErrors (the VERP/tracking secret or the
        # smarthost password unset) stop `serve` with the message, instead of ending a background task
        # nobody looked at while the gateway ran on without its relay.
        from gateway.relay_service import start_outbound_services

        try:
            gw.outbound = await start_outbound_services(config, engine, gw.stop_event,
                                                        session_limits=gw.session_limits)
        except BaseException:
            await writer.close()
            raise
        gw.background.append(asyncio.create_task(gw.outbound.run_until_stopped(), name="outbound"))
        gw.graceful.append(gw.background[-1])
    verdict = make_rcpt_verdict(config)
    free_space = spool_free_space(config.storage_url(), config.storage.min_free_mb)
    for lc in config.listeners:
        if lc.kind == "submission":
            continue  # Odoo's outgoing mail: the outbound relay owns it
        handler = SpoolHandler(writer, ListenerPolicy(lc, verdict, free_space=free_space,
                                                      primary_domain=primary_domain(config, hostname)))
        limits = gw.session_limits[listener_key(lc)] = SessionLimits.of(lc)
        server = await start_listener(lc, handler, hostname=hostname, limits=limits)
        gw.handlers.append(handler)
        gw.servers.append(server)
        gw.ports[handler.name] = bound_port(server)
        log.info("%s listener on %s:%d", lc.kind.upper(), lc.host, gw.ports[handler.name])

    if config.admin.enabled:
        from gateway.events import add_event_routes

        app = make_admin_app(engine, free_space=free_space, subscribers=[h.name for h in config.events.webhooks],
                             extra_routes=lambda a: add_event_routes(a, config, engine))
        gw.admin_runner = await start_admin(app, config.admin.host, config.admin.port)
        sites = list(gw.admin_runner.sites)
        server = getattr(sites[0], "_server", None) if sites else None
        gw.admin_port = server.sockets[0].getsockname()[1] if server and server.sockets else config.admin.port
        log.info("admin HTTP on %s:%s (/healthz, /metrics)", config.admin.host, gw.admin_port)

    gw.background.append(asyncio.create_task(_retention(gw), name="retention"))
    gw.background.append(asyncio.create_task(_sync_rcpt_aliases(gw), name="alias-sync"))  # idle while off
    if config.imap:
        from gateway.imap import run_imap_sources

        gw.background.append(asyncio.create_task(run_imap_sources(config, engine, writer, gw.stop_event),
                                                 name="imap"))
    if workers:
        if config.worker.processes and config_path:
            ctx = multiprocessing.get_context("spawn")
            with signals_held():  # its lock starts multiprocessing's resource tracker: spare it a group SIGHUP too
                gw.reload_generation = ctx.Value("i", 0)

            def spawn_worker(i: int) -> multiprocessing.process.BaseProcess:
                p = ctx.Process(target=_worker_process_main, args=(config_path, gw.reload_generation),
                                name=f"mailgate-worker-{i}")
                with signals_held():  # a group SIGHUP while it starts must not kill it (it ignores them)
                    p.start()
                HELPER_STARTS.labels("worker").inc()
                return p

            gw.spawn_worker = spawn_worker
            gw.worker_processes = [spawn_worker(i) for i in range(config.worker.processes)]
            gw.background.append(asyncio.create_task(_supervise_workers(gw), name="worker-supervisor"))
        else:
            gw.worker_threads = run_workers(build_worker_factory(config, engine), config.worker.concurrency,
                                            gw.worker_stop, gw.worker_wake, poll=config.worker.poll_interval)
    return gw


def make_spool_writer(config: Config, engine: Engine, on_commit: Any) -> Spooler:
    """The listeners' writer: a child process unless the config says thread (or the store is in memory)."""
    storage = config.storage
    body_log = make_body_log(engine, storage.body_log_min)
    if body_log is not None:
        body_log.check_writable()
    thread = SpoolWriter(engine, max_batch=storage.group_commit_max, max_wait_ms=storage.group_commit_ms,
                         on_commit=on_commit, body_log=body_log)
    url = helper_store_url(engine, storage.writer)
    if url is None:
        return thread
    return ProcessSpoolWriter(url, synchronous=storage.sqlite_synchronous, max_batch=storage.group_commit_max,
                              max_wait_ms=storage.group_commit_ms, body_log_min=storage.body_log_min,
                              inline=thread, on_commit=on_commit)


async def _retention(gw: Gateway, every: float = 3600.0) -> None:
    """Drop raw bodies of finished mail after `[retention] raw_days` (GDPR); decisions and events stay."""
    import datetime as dt

    from gateway.spool import collect_segments, purge_raw
    from gateway.store import utcnow

    while not gw.stop_event.is_set():
        try:
            cutoff = utcnow() - dt.timedelta(days=gw.config.retention.raw_days)
            n = await asyncio.to_thread(purge_raw, gw.engine, cutoff)
            if n:
                log.info("retention: purged the raw bodies of %d message(s)", n)
            # segments whose collection a crash interrupted, or holding only a failed batch's bodies
            await asyncio.to_thread(collect_segments, gw.engine)
        except Exception as exc:  # the store is briefly unavailable: try again next round
            log.warning("retention purge failed: %s", exc)
        try:
            await asyncio.wait_for(gw.stop_event.wait(), every)
        except asyncio.TimeoutError:
            pass


async def _sync_rcpt_aliases(gw: Gateway) -> None:
    """Keep the RCPT-time alias table merged with Odoo's `mail.alias` (config wins), every `sync_interval`.

    Runs for the whole life of the gateway and follows reloads (`Gateway.reload` wakes it): the sync is built
    again whenever `[odoo]` changed, and dropped while `sync_aliases` is off. Built once from the start
    config, a SIGHUP that turned the sync on never synced, and one that turned it off went on reading Odoo."""
    from gateway.pipeline import alias_sync, odoo_client

    sync: Any = None
    built_for: Any = None
    while not gw.stop_event.is_set():
        gw.alias_sync_wake.clear()  # before the round: a reload during it wakes the next one at once
        if gw.config.odoo != built_for:
            built_for = gw.config.odoo
            sync = alias_sync(gw.config, odoo_client(gw.config))
            if sync is None:
                gw.synced_alias_rows = None  # turned on again, it answers 451 until its first sync
        if sync is not None:
            try:
                rows = await asyncio.to_thread(sync.rows, force=True)
                if sync.loaded:  # else Odoo has not answered once (logged): the table stays "not loaded yet"
                    verdict = make_rcpt_verdict(gw.config, rows)
                    gw.synced_alias_rows = rows
                    for h in gw.handlers:
                        h.set_rcpt_verdict(verdict)
            except Exception as exc:  # Odoo down or misconfigured: keep the table we have
                log.warning("alias sync failed; RCPT checks keep the current table: %s", exc)
        try:
            await asyncio.wait_for(gw.alias_sync_wake.wait(), gw.config.odoo.sync_interval)
        except asyncio.TimeoutError:
            pass


async def serve_forever(config: Config, config_path: str | None) -> int:
    gw = await start_gateway(config, config_path=config_path)
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, done.set)
    loop.add_signal_handler(signal.SIGINT, done.set)
    loop.add_signal_handler(signal.SIGHUP, gw.reload)
    failed: list[str] = []

    def watch(task: asyncio.Task[Any]) -> None:
        """A background part (outbound relay, IMAP, retention, alias sync, worker supervisor) that ends with an
        error while the gateway runs: stop the whole gateway and exit 1, so the service manager restarts it
        and the operator sees why. Running on without it would look healthy while, say, no mail went out."""
        if task.cancelled() or task.exception() is None or gw.stop_event.is_set():
            return
        exc = task.exception()
        log.error("%s failed; stopping the gateway", task.get_name(), exc_info=exc)
        failed.append(f"{task.get_name()}: {exc}")
        done.set()

    for task in gw.background:
        task.add_done_callback(watch)
    log.info("mailgate is running (store %s)", engine_label(gw.engine))
    await done.wait()
    log.info("stopping: no new connections; finishing sessions in flight")
    await gw.stop()
    log.info("stopped%s", f" after a failure ({'; '.join(failed)})" if failed else "")
    return 1 if failed else 0


def engine_label(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)


def fd_shortfall(config: Config, limit: int, *, reserve: int = 256) -> str | None:
    """Why `limit` open files are too few for the listeners' `max_connections` plus `reserve` for the spool
    (database, WAL, body log segments, helper pipes), or None."""
    import resource

    needed = sum(listener.max_connections for listener in config.listeners) + reserve
    if limit == resource.RLIM_INFINITY or limit >= needed:
        return None
    return (f"open files limit is {limit}, below the listeners' max_connections plus {reserve} for the spool "
            f"({needed}): raise it (ulimit -n, LimitNOFILE=) or lower max_connections")


def raise_fd_limit(config: Config) -> str | None:
    """Raise the soft limit on open files to the hard one, as MTAs do: every session is a descriptor, and the
    spool needs its own beside them. The default soft limit (often 1,024) is below the listeners' default
    `max_connections` (500 each). Returns a warning when the limits still do not fit, for the log."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return fd_shortfall(config, soft)


def run(config: Config, config_path: str | None) -> int:
    """Serve until SIGTERM. A ConfigError found while starting (a secret or password variable unset) is
    printed like `check-config` prints one, and exits 1 — not a traceback."""
    warning = raise_fd_limit(config)
    if warning:
        log.warning("%s", warning)
    try:
        try:
            import uvloop  # optional: ≈2× the SMTP rate on the same CPU (PERF-NOTES.md)
        except ImportError:
            return asyncio.run(serve_forever(config, config_path))
        return uvloop.run(serve_forever(config, config_path))
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 1

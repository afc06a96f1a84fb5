"""Starts the outbound side of the gateway: submission listener(s), delivery worker, tracking HTTP, webhooks.

`mailgate serve` awaits `start_outbound_services(config, engine, stop)` before its listeners open (a missing
secret or password stops it there, with the message), then runs `OutboundServices.run_until_stopped`, which
returns once `stop` is set and everything it started has shut down. Each part is skipped when not configured (no submission listener,
tracking disabled, no webhooks), so the same call fits every node of a multi-node deployment.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from dataclasses import dataclass, field

from aiohttp import web
from sqlalchemy import Engine

from gateway.batch_process import ProcessTransactionBatcher
from gateway.childproc import helper_store_url
from gateway.config import Config, ConfigError, secret as env_secret
from gateway.events import WebhookDispatcher, add_events_routes
from gateway.outbound import OutboundWorker, SmtpTransport, helo_problem
from gateway.relay import start_submission_listener
from gateway.session_limits import SessionLimits, listener_key
from gateway.relay_batch import Committer, TransactionBatcher
from gateway.tracking import make_tracking_app

log = logging.getLogger(__name__)

#: How long `OutboundServices.close` waits for the worker to drain (in-flight sends, then their commits)
#: before it cancels what is left; within `mailgate serve`'s 30 s shutdown budget.
SHUTDOWN_SECONDS = 25.0


@dataclass
class OutboundServices:
    """Handles on what `start_outbound_services` started (tests read the bound ports from here)."""

    worker: OutboundWorker
    dispatcher: WebhookDispatcher
    batcher: Committer
    smtp_servers: list[asyncio.base_events.Server] = field(default_factory=list)
    http_runner: web.AppRunner | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    stop: asyncio.Event | None = None  # what the worker and dispatcher run until

    @property
    def submission_ports(self) -> list[int]:
        return [s.sockets[0].getsockname()[1] for s in self.smtp_servers if s.sockets]

    @property
    def tracking_port(self) -> int | None:
        if self.http_runner is None:
            return None
        for site in self.http_runner.sites:
            server = getattr(site, "_server", None)
            if server is not None and server.sockets:
                return int(server.sockets[0].getsockname()[1])
        return None

    async def run_until_stopped(self) -> None:
        """What `mailgate serve` awaits once the services started: until `stop` is set, then close."""
        assert self.stop is not None, "started by start_outbound_services"
        try:
            await self.stop.wait()
        finally:
            await self.close()

    async def close(self) -> None:
        """Stop accepting, let the worker drain (bounded), then stop the rest. Cancelling the worker at once
        cut off its drain: a result not yet committed was lost and the mail went out again after restart."""
        for server in self.smtp_servers:
            server.close()
        for server in self.smtp_servers:
            await server.wait_closed()
        if self.stop is not None:
            self.stop.set()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=SHUTDOWN_SECONDS)
        for t in self.tasks:
            if not t.done():
                t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.http_runner is not None:
            await self.http_runner.cleanup()
        await self.batcher.close()


#: GIL switch interval for a process running the relay. The writer thread releases the GIL around every
#: SQLite call and must win it back from the busy event loop; at CPython's default 5 ms each reacquisition
#: can cost up to 5 ms (a convoy), which halved relay throughput in bench/relay.py. 0.5 ms fixed it.
SWITCH_INTERVAL = 0.0005


def tune_interpreter() -> None:
    """Shorten the GIL switch interval if nobody has changed CPython's default (process-wide, logged)."""
    if abs(sys.getswitchinterval() - 0.005) < 1e-9:
        sys.setswitchinterval(SWITCH_INTERVAL)
        log.info("GIL switch interval set to %.1f ms for the store writer threads", SWITCH_INTERVAL * 1000)


def site_secret(config: Config) -> bytes:
    """The HMAC key for VERP and tracking tokens (config.outbound.secret_env names the variable)."""
    value = env_secret(config.outbound.secret_env, required=True, what="outbound.secret_env (VERP/tracking key)")
    assert value is not None
    if len(value) < 16:
        raise ConfigError(None, [f"{config.outbound.secret_env}: the VERP/tracking secret must be at least "
                                 "16 characters (tokens are only as strong as it is)"])
    return value.encode()


def make_committer(config: Config, engine: Engine) -> Committer:
    """The outbound store's group committer: a child process (`gateway.batch_process`) unless the config
    says thread, or the store is in memory (a child could not see it)."""
    storage = config.storage
    url = helper_store_url(engine, storage.writer)
    if url is None:
        tune_interpreter()
        return TransactionBatcher(engine, max_batch=storage.group_commit_max, max_wait_ms=storage.group_commit_ms)
    return ProcessTransactionBatcher(url, synchronous=storage.sqlite_synchronous, max_batch=storage.group_commit_max,
                                     max_wait_ms=storage.group_commit_ms)


async def start_outbound_services(config: Config, engine: Engine, stop: asyncio.Event, *,
                                  transport: SmtpTransport | None = None,
                                  session_limits: dict[str, SessionLimits] | None = None) -> OutboundServices:
    """Start everything; the worker and dispatcher run as tasks until `stop` is set. `session_limits`: where
    to keep each submission listener's caps (by `listener_key`), for `serve` to change them on reload."""
    secret = site_secret(config)
    if any(listener.kind == "submission" for listener in config.listeners):
        problem = helo_problem(config)
        if problem:
            raise ConfigError(None, [problem])
    # Before anything starts: a smarthost login whose password variable is unset is a ConfigError here.
    transport = transport or SmtpTransport(config)
    batcher = make_committer(config, engine)
    if isinstance(batcher, ProcessTransactionBatcher):
        await batcher.start()
    dispatcher = WebhookDispatcher(engine, config.events)
    worker = OutboundWorker(engine, config, secret, batcher, transport=transport, on_event=dispatcher.wake)
    services = OutboundServices(worker=worker, dispatcher=dispatcher, batcher=batcher, stop=stop)
    services.tasks.append(asyncio.create_task(worker.run(stop), name="outbound-worker"))
    services.tasks.append(asyncio.create_task(dispatcher.run(stop), name="webhook-dispatcher"))
    try:
        for listener in config.listeners:
            if listener.kind != "submission":
                continue
            limits = SessionLimits.of(listener)
            if session_limits is not None:
                session_limits[listener_key(listener)] = limits
            server = await start_submission_listener(listener, config, batcher, secret, worker.submit,
                                                     limits=limits)
            services.smtp_servers.append(server)
            log.info("submission listener %s on %s:%s", listener.name or "-", listener.host,
                     services.submission_ports[-1])
        if config.tracking.enabled or config.events.api_token_env:
            app = make_tracking_app(engine, secret, prefetch_seconds=config.tracking.prefetch_seconds,
                                    on_event=dispatcher.wake, trusted_proxies=config.tracking.trusted_proxies)
            add_events_routes(app, engine, env_secret(config.events.api_token_env))
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, config.tracking.host, config.tracking.port).start()
            services.http_runner = runner
            log.info("tracking HTTP (and GET /events) on %s:%s", config.tracking.host, services.tracking_port)
    except BaseException:
        stop.set()
        await services.close()
        raise
    return services



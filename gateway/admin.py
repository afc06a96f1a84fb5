"""Admin HTTP: `/healthz` (the store answers) and `/metrics` (Prometheus text format).

Other parts may add routes (e.g. the events pull API) through `extra_routes`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from sqlalchemy import Engine, text

from gateway import metrics_dir
from gateway.disk_space import FreeSpace
from gateway.metrics import SERVE_ONLY, FreeSpaceCollector, SpoolDepthCollector, WebhookBacklogCollector
from gateway.store import reading


def exposition(engine: Engine, free_space: FreeSpace | None, subscribers: Sequence[str] = ()) -> Callable[[], bytes]:
    """The `/metrics` text: the counters and histograms of every process of this gateway — summed from the
    multiprocess directory when `mailgate serve` set one up (worker processes count there), else this
    process's registry — then the serve process's own (`SERVE_ONLY`), then what is read at scrape time
    (spool depth, free disk, the webhook `subscribers`' backlog)."""
    if metrics_dir.active():
        from prometheus_client import multiprocess

        counted = CollectorRegistry()
        multiprocess.MultiProcessCollector(counted)
    else:
        counted = REGISTRY
    scraped = CollectorRegistry()
    scraped.register(SpoolDepthCollector(engine))
    if free_space is not None:
        scraped.register(FreeSpaceCollector(free_space.free))
    if subscribers:
        scraped.register(WebhookBacklogCollector(engine, subscribers))
    return lambda: generate_latest(counted) + generate_latest(SERVE_ONLY) + generate_latest(scraped)


def make_admin_app(engine: Engine, *, free_space: FreeSpace | None = None, subscribers: Sequence[str] = (),
                   extra_routes: Callable[[web.Application], None] | None = None) -> web.Application:
    """`free_space`: a store that answers reads but has no room to write is refusing mail (452 4.3.1 at MAIL
    FROM), so it is unhealthy too."""
    render = exposition(engine, free_space, subscribers)

    async def healthz(_request: web.Request) -> web.Response:
        def probe() -> None:
            with reading(engine) as conn:
                conn.execute(text("SELECT 1"))

        try:
            await asyncio.get_running_loop().run_in_executor(None, probe)
        except Exception as exc:
            return web.json_response({"status": "unhealthy", "store": str(exc.__class__.__name__)}, status=503)
        if free_space is None:
            return web.json_response({"status": "ok"})
        disk = {"path": str(free_space.path), "free_bytes": free_space.free(), "min_free_bytes": free_space.min_free}
        if free_space.refusal() is not None:
            return web.json_response({"status": "unhealthy", "disk": disk}, status=503)
        return web.json_response({"status": "ok", "disk": disk})

    async def metrics(_request: web.Request) -> web.Response:
        body = await asyncio.get_running_loop().run_in_executor(None, render)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    if extra_routes:
        extra_routes(app)
    return app


async def start_admin(app: web.Application, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner

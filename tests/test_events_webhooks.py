"""The webhook dispatcher against real local subscribers: redirects are not followed, a slow subscriber does
not hold up the others, and `replay` re-checks skipped events against the current type filter."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from aiohttp import web
from sqlalchemy import select

from gateway.config import EventsConfig, WebhookConfig
from gateway.events import WebhookDispatcher
from gateway.outbox import EventDraft, record_events
from gateway.schema import webhook_deliveries
from gateway.store import open_store

pytestmark = pytest.mark.events


@pytest.fixture
def engine(tmp_path):
    eng = open_store(f"sqlite:///{tmp_path / 'w.db'}", synchronous="NORMAL")
    yield eng
    eng.dispose()


@pytest.fixture(autouse=True)
def _secret(monkeypatch):
    monkeypatch.setenv("HOOK_SECRET", "hook-secret-0123456789")


def add(engine, *drafts: EventDraft) -> None:
    with engine.begin() as conn:
        record_events(conn, list(drafts))


def ev(type_: str, mid: str, seed: str) -> EventDraft:
    return EventDraft(type=type_, seed=seed, message_id=mid, recipient="a@customer.test")


def hook(name: str, url: str, **kw) -> WebhookConfig:
    return WebhookConfig(name=name, url=url, secret_env="HOOK_SECRET", **kw)


async def serve(routes: Callable[[web.Application], None]) -> tuple[web.AppRunner, str]:
    app = web.Application()
    routes(app)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]


def states(engine, subscriber: str) -> dict[int, tuple[str, str | None]]:
    with engine.connect() as conn:
        rows = conn.execute(select(webhook_deliveries.c.event_seq, webhook_deliveries.c.state,
                                   webhook_deliveries.c.last_error)
                            .where(webhook_deliveries.c.subscriber == subscriber)).all()
    return {r.event_seq: (r.state, r.last_error) for r in rows}


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_a_redirect_is_a_failure_not_a_delivery(engine, caplog):
    """aiohttp followed a 302 as a GET without body; the landing page's 200 marked the event sent though the
    subscriber never received it."""
    landed: list[str] = []

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound("/landing")

    async def landing(request: web.Request) -> web.Response:
        landed.append(request.method)
        return web.Response(text="hello")

    runner, base = await serve(lambda app: (app.router.add_route("*", "/moved", moved),
                                            app.router.add_route("*", "/landing", landing)))
    add(engine, ev("bounced", "<N>", "b"))
    dispatcher = WebhookDispatcher(engine, EventsConfig(poll_interval=0.05, webhooks=(
        hook("moved", f"{base}/moved", retry_min_seconds=60),)))
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher.run(stop))
    try:
        await until(lambda: states(engine, "moved").get(1, ("pending", None)) != ("pending", None))
    finally:
        stop.set()
        await task
        await runner.cleanup()
    state, error = states(engine, "moved")[1]
    assert state == "pending" and "302" in error and "/landing" in error
    assert landed == []
    assert "/landing" in caplog.text


async def test_a_hanging_subscriber_does_not_hold_up_the_others(engine):
    """Subscribers took turns in one loop and a round waited for all its POSTs: one that hung until its timeout
    delayed every other subscriber's events by a timeout per batch of its heads."""
    release = asyncio.Event()
    fast_got: list[float] = []

    async def hangs(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(status=204)

    async def answers(request: web.Request) -> web.Response:
        fast_got.append(time.monotonic())
        return web.Response(status=204)

    runner, base = await serve(lambda app: (app.router.add_post("/slow", hangs),
                                            app.router.add_post("/fast", answers)))
    add(engine, *(ev("delivered", f"<m{i}>", f"s{i}") for i in range(8)))
    dispatcher = WebhookDispatcher(engine, EventsConfig(poll_interval=0.05, webhooks=(
        hook("slow", f"{base}/slow", timeout=4), hook("fast", f"{base}/fast"))))
    stop = asyncio.Event()
    started = time.monotonic()
    task = asyncio.create_task(dispatcher.run(stop))
    try:
        await until(lambda: len(fast_got) == 8, timeout=6)
    finally:
        stop.set()
        release.set()
        await task
        await runner.cleanup()
    assert max(fast_got) - started < 3.5  # one shared loop: not before the slow one's 4 s timeout


async def test_webhook_results_are_counted_per_subscriber(engine):
    """`mailgate_webhook_deliveries_total{subscriber,result}`: sent, failed (retried later) and dead."""
    from prometheus_client import REGISTRY

    def count(subscriber: str, result: str) -> float:
        return REGISTRY.get_sample_value("mailgate_webhook_deliveries_total",
                                         {"subscriber": subscriber, "result": result}) or 0.0

    async def picky(request: web.Request) -> web.Response:
        return web.Response(status=204 if (await request.json())["type"] == "delivered" else 500)

    runner, base = await serve(lambda app: app.router.add_post("/h", picky))
    add(engine, ev("delivered", "<m1>", "d"), ev("bounced", "<m2>", "b"))
    before = {key: count(*key) for key in (("counted", "sent"), ("counted", "dead"), ("retrying", "failed"))}
    dispatcher = WebhookDispatcher(engine, EventsConfig(poll_interval=0.05, webhooks=(
        hook("counted", f"{base}/h", horizon_hours=0.0001, retry_min_seconds=1),  # first failure is past it
        hook("retrying", f"{base}/h", types=("bounced",), retry_min_seconds=60))))
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher.run(stop))
    try:
        await until(lambda: all(count(*key) > before[key] for key in before))
    finally:
        stop.set()
        await task
        await runner.cleanup()
    assert {key: count(*key) - before[key] for key in before} == {
        ("counted", "sent"): 1, ("counted", "dead"): 1, ("retrying", "failed"): 1}

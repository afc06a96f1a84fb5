"""The pull API over HTTP: what it refuses with 400 instead of failing with 500."""

from __future__ import annotations

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.events import add_events_routes
from gateway.outbox import EventDraft, record_events
from gateway.store import open_store

pytestmark = pytest.mark.events

TOKEN = {"Authorization": "Bearer pull-token-123"}


@pytest.fixture
def any_engine(store_url):
    eng = open_store(store_url)
    with eng.begin() as conn:
        record_events(conn, [EventDraft(type="delivered", seed="d1", message_id="<m1>")])
    yield eng
    eng.dispose()


@pytest.mark.parametrize("after, status", [
    ("0", 200), (str(2**63 - 1), 200), (str(2**63), 400), ("99999999999999999999", 400), ("-1", 400),
    ("x", 400),
])
async def test_after_must_fit_a_sequence_number(any_engine, after, status):
    """`after` beyond a 64-bit integer could not be bound (SQLite OverflowError, PostgreSQL out of range):
    a 500 for a client's typo."""
    app = web.Application()
    add_events_routes(app, any_engine, "pull-token-123")
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/events", params={"after": after}, headers=TOKEN)
        assert resp.status == status
        body = await resp.json()
    if status == 200:
        assert body["next"] >= int(after)
    else:
        assert "after" in body["error"]

"""Event delivery from the outbox: signed webhooks (at-least-once, ordered per mail) and the pull API.

Webhooks. For every subscriber in `config.events.webhooks` the dispatcher fans each new event out into a
`webhook_deliveries` row (`skipped` when the subscriber's type filter excludes it), then POSTs pending rows:
one event per request, JSON body as in docs/events.md, header
`X-Mailgate-Signature: t=<unix time>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`. A 2xx answer marks the
row `sent`; anything else retries with doubling backoff until the subscriber's horizon, then `dead`
(`mailgate events replay` sends dead or sent rows again). Events of one mail (same Message-ID) go out in
sequence order: event N+1 is not sent before N was answered 2xx or dead-lettered.

Fan-out reads events after a per-subscriber cursor (kv `webhook:<name>:cursor`) and, like the pull API, stops
before a missing sequence number that may still commit (PostgreSQL), so a late commit keeps its place in its
mail's order; a look-back window with an anti-join still picks up one that commits after it was given up.

Pull API. `GET /events?after=SEQ&types=a,b&limit=N` with `Authorization: Bearer <token>` answers
`{"events": [...], "next": SEQ}`; `add_events_routes(app, engine, token)` mounts it on any aiohttp app.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import json
import logging
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from sqlalchemy import Connection, Engine, Row, String, Update, and_, cast, exists, func, insert, select, update

from gateway.config import Config, EventsConfig, WebhookConfig, secret as env_secret
from gateway.metrics import WEBHOOK_DELIVERIES
from gateway.outbox import EVENT_TYPES, event_to_json
from gateway.schema import events, kv, webhook_deliveries
from gateway.store import as_utc, reading, utcnow

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Mailgate-Signature"
FANOUT_LOOKBACK = 1000   # sequence numbers behind the cursor re-examined for commits later than a gap's settling
FANOUT_BATCH = 1000
PENDING_SCAN = 2000
MAX_SEQ = 2**63 - 1      # events.seq is a BIGINT on PostgreSQL and a 64-bit rowid on SQLite


# ------------------------------------------------------------------------------------------ signing (pure)
def sign(secret: bytes, body: bytes, timestamp: int | None = None) -> str:
    """The signature header value for one request body."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret, f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify(secret: bytes, body: bytes, header: str, *, tolerance: float = 300.0,
           now: float | None = None) -> bool:
    """What a subscriber runs: the signature matches and the timestamp is recent (replay protection)."""
    try:
        fields = dict(item.split("=", 1) for item in header.split(","))
        t = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - t) > tolerance:
        return False
    expected = hmac.new(secret, f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    try:  # a forged header may carry non-ASCII, which compare_digest refuses on str: a mismatch, not a crash
        return hmac.compare_digest(expected.encode(), fields.get("v1", "").encode())
    except UnicodeEncodeError:
        return False


def backoff(attempts: int, minimum: float, maximum: float) -> float:
    # The exponent is capped: 2 ** 1024 and more does not fit a float (a small retry_max_seconds and a long
    # horizon mean thousands of attempts).
    return min(maximum, minimum * (2.0 ** min(60, max(0, attempts - 1))))


def wants(hook: WebhookConfig, event_type: str) -> bool:
    return not hook.types or event_type in hook.types


# ------------------------------------------------------------------------------------------ store side
def _cursor_key(name: str) -> str:
    return f"webhook:{name}:cursor"


def fan_out(conn: Connection, hook: WebhookConfig, gaps: GapWatch | None = None) -> int:
    """Create delivery rows (pending or skipped) for up to FANOUT_BATCH events this subscriber has not seen;
    returns how many. A caller that loops until 0 commits each batch on its own (`mailgate events replay`):
    one transaction over them all held the write lock, and so the SMTP listeners, for the whole fan-out.

    The cursor stops before a missing sequence number that may still commit, as the pull API's does (`gaps`:
    the caller's watch, kept across rounds; without one no gap counts as settled yet): fanning out every
    committed event sent a late commit after a later event of its mail, and lost it once the cursor was more
    than the look-back past it. Events behind the cursor that still have no row (committed after their number
    was given up) go out late rather than never."""
    with _fan_out_view(conn) as view:
        row = view.execute(select(kv.c.value).where(kv.c.key == _cursor_key(hook.name))).first()
        cursor = int(row.value) if row and row.value else 0
        already = exists().where(and_(webhook_deliveries.c.event_seq == events.c.seq,
                                      webhook_deliveries.c.subscriber == hook.name))
        page = view.execute(select(events.c.seq, events.c.type).where(events.c.seq > cursor).where(~already)
                            .order_by(events.c.seq).limit(FANOUT_BATCH)).all()
        page, top = _settled_rows(view, gaps or GapWatch(), page, cursor)
        stragglers = view.execute(select(events.c.seq, events.c.type).where(
            events.c.seq > max(0, cursor - FANOUT_LOOKBACK), events.c.seq <= cursor).where(~already)
            .order_by(events.c.seq).limit(FANOUT_BATCH)).all()
    if stragglers:
        log.warning("webhook %s: events %s committed after their sequence numbers were given up as rolled back; "
                    "sent now, after later events of their mails", hook.name, [r.seq for r in stragglers])
    rows = [*stragglers, *page]
    if rows:
        # One executemany, not a statement per event: a replay fans out every event the store has, and this
        # runs while its transaction holds SQLite's write lock.
        conn.execute(insert(webhook_deliveries), [
            {"event_seq": r.seq, "subscriber": hook.name, "state": "pending" if wants(hook, r.type) else "skipped",
             "attempts": 0, "next_attempt_at": utcnow()} for r in rows])
    if top > cursor:
        _save_cursor(conn, hook.name, top, exists=row is not None)
    return len(rows)


@contextmanager
def _fan_out_view(conn: Connection) -> Iterator[Connection]:
    """Where fan-out reads: SQLite's write transaction already sees one state (nobody else commits while it
    holds the lock); on PostgreSQL a `one_snapshot` of its own, since the caller's transaction may be READ
    COMMITTED (the page and its gap check must agree)."""
    if conn.dialect.name == "sqlite":
        yield conn
        return
    with one_snapshot(conn.engine) as view:
        yield view


def _save_cursor(conn: Connection, name: str, value: int, *, exists: bool) -> None:
    now = utcnow()
    if exists:
        conn.execute(update(kv).where(kv.c.key == _cursor_key(name)).values(value=str(value), updated_at=now))
    else:
        conn.execute(insert(kv).values(key=_cursor_key(name), value=str(value), updated_at=now))


@dataclass(frozen=True)
class Delivery:
    """One event due to one subscriber."""

    id: int
    seq: int
    attempts: int
    occurred_at: dt.datetime
    body: bytes


def due_heads(conn: Connection, subscriber: str, *, limit: int = PENDING_SCAN) -> list[Delivery]:
    """The earliest pending event of each mail, when it is due (per-mail ordering lives here); at most `limit`.

    The heads are found first (the lowest pending sequence number per mail), and only then filtered by due
    time. Scanning the oldest pending rows instead let mails whose heads were backing off (a receiver failing
    some events, for up to the horizon) fill the scan, and every other mail's events waited behind them."""
    now = utcnow()
    mail = func.coalesce(events.c.message_id, cast(events.c.seq, String))  # no Message-ID: a mail of its own
    heads = (select(func.min(webhook_deliveries.c.event_seq))
             .join(events, events.c.seq == webhook_deliveries.c.event_seq)
             .where(webhook_deliveries.c.subscriber == subscriber, webhook_deliveries.c.state == "pending")
             .group_by(mail))
    rows = conn.execute(
        select(webhook_deliveries.c.id.label("delivery_id"), webhook_deliveries.c.attempts.label("delivery_attempts"),
               events)
        .join(events, events.c.seq == webhook_deliveries.c.event_seq)
        .where(webhook_deliveries.c.subscriber == subscriber, webhook_deliveries.c.state == "pending",
               webhook_deliveries.c.next_attempt_at <= now, webhook_deliveries.c.event_seq.in_(heads))
        .order_by(webhook_deliveries.c.event_seq).limit(limit)
    ).all()
    return [Delivery(r.delivery_id, r.seq, r.delivery_attempts, as_utc(r.occurred_at),
                     json.dumps(event_to_json(r), sort_keys=True, separators=(",", ":")).encode())
            for r in rows]


def mark_sent(conn: Connection, delivery_id: int) -> None:
    conn.execute(update(webhook_deliveries).where(webhook_deliveries.c.id == delivery_id)
                 .values(state="sent", last_error=None))


def retry_span(attempts: int, minimum: float, maximum: float) -> float:
    """Seconds from a delivery's first failure to its next try after `attempts` failures (the backoffs)."""
    return sum(backoff(n, minimum, maximum) for n in range(1, attempts + 1))


def mark_failed(conn: Connection, delivery: Delivery, hook: WebhookConfig, error: str) -> str:
    """Back off, or dead-letter once the retries would span more than `horizon_hours`.

    The horizon counts the retrying itself, not the event's age: measured from `occurred_at`, an event that
    waited behind its mail's earlier one (or was replayed days later, after a receiver outage) was dead on its
    first failure and never retried at all. A replay starts the count again."""
    attempts = delivery.attempts + 1
    now = utcnow()
    next_at = now + dt.timedelta(seconds=backoff(attempts, hook.retry_min_seconds, hook.retry_max_seconds))
    dead = retry_span(attempts, hook.retry_min_seconds, hook.retry_max_seconds) > hook.horizon_hours * 3600
    state = "dead" if dead else "pending"
    conn.execute(update(webhook_deliveries).where(webhook_deliveries.c.id == delivery.id).values(
        state=state, attempts=attempts, next_attempt_at=next_at, last_error=error[:2000]))
    return state


def replay(engine: Engine, hook: WebhookConfig, since: int | None = None) -> int:
    """Send a subscriber's sent and dead events again (from sequence `since`), and retry its pending ones at
    once (a receiver that is back should not wait out their backoff); returns how many.

    Rows are checked against the subscriber's type filter as it is now: `skipped` ones it wants are sent (a
    filter fixed after a typo had left them skipped for good), and pending ones it no longer wants are
    skipped."""
    wanted = (webhook_deliveries.c.event_seq.in_(select(events.c.seq).where(events.c.type.in_(hook.types)))
              if hook.types else None)
    with engine.begin() as conn:
        if wanted is not None:
            conn.execute(_replayed(hook.name, ("pending",), since).where(~wanted).values(state="skipped"))
        q = _replayed(hook.name, ("sent", "dead", "pending", "skipped"), since)
        if wanted is not None:
            q = q.where(wanted)
        return conn.execute(q.values(state="pending", attempts=0, next_attempt_at=utcnow(),
                                     last_error=None)).rowcount or 0


def _replayed(subscriber: str, states: tuple[str, ...], since: int | None) -> Update:
    q = update(webhook_deliveries).where(webhook_deliveries.c.subscriber == subscriber,
                                         webhook_deliveries.c.state.in_(states))
    return q if since is None else q.where(webhook_deliveries.c.event_seq >= since)


# ------------------------------------------------------------------------------------------ dispatcher
class WebhookDispatcher:
    """Fans out and POSTs events for every configured subscriber until `stop` is set."""

    def __init__(self, engine: Engine, config: EventsConfig, *, concurrency: int = 8):
        self.engine = engine
        self.config = config
        self.hooks = list(config.webhooks)
        self.secrets = {h.name: (env_secret(h.secret_env, required=True, what=f"webhook {h.name} secret")
                                 or "").encode() for h in self.hooks}
        self.concurrency = concurrency
        self._wakes = {h.name: asyncio.Event() for h in self.hooks}

    def wake(self) -> None:
        """Producers in this process call this after committing events (others are found by polling)."""
        for wake in self._wakes.values():
            wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        if not self.hooks:
            return
        async with aiohttp.ClientSession() as http:
            await asyncio.gather(*(self._serve(http, hook, stop) for hook in self.hooks))

    async def _serve(self, http: aiohttp.ClientSession, hook: WebhookConfig, stop: asyncio.Event) -> None:
        """One subscriber's loop, independent of the others': when subscribers took turns in one loop, one that
        hung until its timeout held up every other one's events for a timeout per batch of its heads."""
        wake = self._wakes[hook.name]
        gaps = GapWatch()  # kept across rounds: a missing sequence number settles after GapWatch.settle
        while not stop.is_set():
            wake.clear()
            try:
                progressed = await self._round(http, hook, gaps)
            except Exception as exc:
                log.error("webhook %s: dispatch round failed (will retry): %s", hook.name, exc)
                progressed = False
            if progressed:
                continue
            try:
                await asyncio.wait_for(self._wait(wake, stop), self.config.poll_interval)
            except asyncio.TimeoutError:
                pass

    async def _wait(self, wake: asyncio.Event, stop: asyncio.Event) -> None:
        waiters = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    async def _round(self, http: aiohttp.ClientSession, hook: WebhookConfig, gaps: GapWatch) -> bool:
        """Fan out, then send every due head once; True when some event was sent (go again at once)."""
        await asyncio.to_thread(self._tx, fan_out, hook, gaps)
        heads = await asyncio.to_thread(self._tx, due_heads, hook.name)
        if not heads:
            return False
        sem = asyncio.Semaphore(self.concurrency)
        results = await asyncio.gather(*(self._post(http, hook, d, sem) for d in heads))
        return any(results)

    def _tx(self, fn, *args):  # type: ignore[no-untyped-def]
        with self.engine.begin() as conn:
            return fn(conn, *args)

    async def _post(self, http: aiohttp.ClientSession, hook: WebhookConfig, d: Delivery,
                    sem: asyncio.Semaphore) -> bool:
        async with sem:
            headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(self.secrets[hook.name], d.body),
                       "X-Mailgate-Event-Seq": str(d.seq), "User-Agent": "mailgate-webhooks/1"}
            error: str | None = None
            try:
                # Not following redirects: a 301/302 would come back as a body-less GET, and a 2xx to that
                # marked an event sent that the subscriber never received.
                async with http.post(hook.url, data=d.body, headers=headers, allow_redirects=False,
                                     timeout=aiohttp.ClientTimeout(total=hook.timeout)) as resp:
                    if 200 <= resp.status < 300:
                        await asyncio.to_thread(self._tx, mark_sent, d.id)
                        WEBHOOK_DELIVERIES.labels(hook.name, "sent").inc()
                        return True
                    error = _refusal(hook, resp)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                error = f"{type(exc).__name__}: {exc}"
            state = await asyncio.to_thread(self._tx, mark_failed, d, hook, error or "failed")
            WEBHOOK_DELIVERIES.labels(hook.name, "dead" if state == "dead" else "failed").inc()
            if state == "dead":
                log.warning("webhook %s: event seq %s dead-lettered after %d attempts (%s); "
                            "`mailgate events replay --subscriber %s` sends it again",
                            hook.name, d.seq, d.attempts + 1, error, hook.name)
            return state == "dead"  # a dead head unblocks the next event of its mail


def _refusal(hook: WebhookConfig, resp: aiohttp.ClientResponse) -> str:
    """What a non-2xx answer records; a redirect is logged with its target, since only fixing the configured
    url helps (every retry meets the same redirect)."""
    if not 300 <= resp.status < 400:
        return f"HTTP {resp.status}"
    location = resp.headers.get("Location", "")
    log.warning("webhook %s: %s answered HTTP %d redirecting to %r; redirects are not followed (the event "
                "would arrive as a GET without body): set the subscriber's url to the final address",
                hook.name, hook.url, resp.status, location)
    return f"HTTP {resp.status} redirect to {location!r} (not followed)"


# ------------------------------------------------------------------------------------------ pull API
def read_events(engine: Engine, *, after: int = 0, types: Sequence[str] = (), limit: int = 100,
                ) -> list[dict]:  # type: ignore[type-arg]
    """Events after a cursor, oldest first, in their wire form."""
    q = select(events).where(events.c.seq > after).order_by(events.c.seq).limit(limit)
    if types:
        q = q.where(events.c.type.in_(list(types)))
    with reading(engine) as conn:
        return [event_to_json(r) for r in conn.execute(q)]


def newest_events(engine: Engine, n: int, *, types: Sequence[str] = (), upto: int | None = None,
                  ) -> list[dict]:  # type: ignore[type-arg]
    """The newest `n` events (of `types`; at or below sequence `upto`), oldest first, in their wire form:
    ORDER BY seq DESC LIMIT n, then reversed, so the store reads n rows however many older ones match."""
    if n < 1:
        return []
    q = select(events).order_by(events.c.seq.desc()).limit(n)
    if types:
        q = q.where(events.c.type.in_(list(types)))
    if upto is not None:
        q = q.where(events.c.seq <= upto)
    with reading(engine) as conn:
        rows = conn.execute(q).all()
    return [event_to_json(r) for r in reversed(rows)]


class GapWatch:
    """When a missing sequence number counts as gone for good (this process's view).

    On PostgreSQL a transaction can commit a lower `seq` after a higher one was read (the spool's workers and
    the relay's store process record events concurrently), and a number can be gone for good (a batch rolled
    back). Numbers are handed out in increasing order, so every number below the highest committed `seq` seen
    at some moment was handed out before that moment: once the moment is `settle` seconds old, the numbers
    below that are still missing have been in flight that long and count as gone. All gaps of a page settle
    together that way; timing each gap from when it came to the front of a reader's page made the reader
    wait `settle` seconds at each, one after the other."""

    def __init__(self, settle: float = 30.0):
        self.settle = settle
        self._marks: deque[tuple[float, int]] = deque()  # (monotonic time, highest committed seq seen), rising

    def observe(self, top: int) -> None:
        """`top` is a committed sequence number, seen in a snapshot taken before now."""
        now = time.monotonic()
        self._prune(now)
        if self._marks and (top <= self._marks[-1][1] or now - self._marks[-1][0] < self.settle / 100):
            return  # nothing new, or too soon after the last mark: it only makes the horizon come a bit later
        self._marks.append((now, top))

    def horizon(self) -> int:
        """Every sequence number at or below this one that no committed event has counts as gone."""
        now = time.monotonic()
        self._prune(now)
        return self._marks[0][1] if self._marks and now - self._marks[0][0] >= self.settle else 0

    def _prune(self, now: float) -> None:
        """Keep one mark older than `settle` (the newest such: it gives the horizon), drop the rest."""
        while len(self._marks) > 1 and now - self._marks[1][0] >= self.settle:
            self._marks.popleft()


@contextmanager
def one_snapshot(engine: Engine) -> Iterator[Connection]:
    """A read transaction whose statements all see the same committed events.

    A page and the gap check that bounds it must agree on what is committed. Under PostgreSQL's READ COMMITTED
    every statement takes a fresh snapshot: an event with a lower seq committing between the page query and
    the gap query was missing from the page yet present for the gap check, so the cursor moved past it and the
    reader never got it. REPEATABLE READ takes one snapshot for the transaction; SQLite's deferred read
    transaction (`reading`) already reads one WAL snapshot."""
    with reading(engine) as conn:
        if conn.dialect.name == "postgresql":
            conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            yield conn


def _first_gap(conn: Connection, after: int, last: int) -> int | None:
    """The lowest sequence number in (after, last] that no committed event has (`last` is one that has).

    Run on a `one_snapshot` connection: the statements here must see the same events as the page."""
    if conn.execute(select(func.count()).where(events.c.seq > after, events.c.seq <= last)).scalar() == last - after:
        return None  # the usual case, and SQLite's always: one writer, and a rolled-back rowid is reused
    if conn.execute(select(events.c.seq).where(events.c.seq == after + 1)).first() is None:
        return after + 1
    following = events.alias("following")
    gap = conn.execute(select(func.min(events.c.seq) + 1).where(
        events.c.seq > after, events.c.seq < last,
        ~exists().where(following.c.seq == events.c.seq + 1))).scalar()
    return None if gap is None else int(gap)  # None cannot happen in one snapshot; if it does, there is no gap


def follow_start(engine: Engine, *, lookback: int = FANOUT_LOOKBACK) -> tuple[int, int, set[int]]:
    """Where a reader that wants only what comes from now on starts: the cursor, the highest committed sequence
    number now, and the committed numbers above the cursor (already there: leave them out).

    Following from the highest number lost an event whose lower number was still in flight at that moment
    (PostgreSQL): it committed below the cursor. The cursor starts before the first missing number among the
    last `lookback` ones instead (older gaps count as settled), and what commits there later is new."""
    with one_snapshot(engine) as conn:
        top = conn.execute(select(func.max(events.c.seq))).scalar() or 0
        gap = _first_gap(conn, max(0, top - lookback), top) if top else None
        start = top if gap is None else gap - 1
        there = set(conn.execute(select(events.c.seq).where(events.c.seq > start, events.c.seq <= top)).scalars())
    return start, top, there


def _settled_rows(conn: Connection, gaps: GapWatch, rows: Sequence[Row], after: int, read_to: int = 0,
                  ) -> tuple[list[Row], int]:
    """The rows of a page (seq > `after`, in order, read on `conn`, a `one_snapshot`) before the first missing
    sequence number that may still commit, and the cursor to come back with. `read_to`: a committed number the
    page's query is known to have read up to, beyond its last row (a type-filtered page that was not full)."""
    last = max(rows[-1].seq if rows else after, read_to)
    if last <= after:
        return [], after
    gap = _first_gap(conn, after, last)
    if gap is not None:
        gaps.observe(conn.execute(select(func.max(events.c.seq))).scalar() or 0)
        gone = gaps.horizon()
        if gap <= gone:
            gap = _first_gap(conn, gone, last) if gone < last else None
    if gap is None:
        return list(rows), last
    return [r for r in rows if r.seq < gap], gap - 1


def read_settled(engine: Engine, gaps: GapWatch, *, after: int = 0, types: Sequence[str] = (), limit: int = 100,
                 ) -> tuple[list[dict], int]:  # type: ignore[type-arg]
    """`read_events` for a reader that comes back with a cursor: the events before the first missing sequence
    number that may still commit, and the cursor to come back with. A reader that passes the cursor back never
    skips an event, and still gets each mail's events in order."""
    q = select(events).where(events.c.seq > after).order_by(events.c.seq).limit(limit)
    if types:
        q = q.where(events.c.type.in_(list(types)))
    with one_snapshot(engine) as conn:
        page = conn.execute(q).all()
        # A filtered page that is not full read every event up to the top: the cursor may pass the others.
        # Kept at its last row, a reader of a rare type got `next` = `after` back and rescanned all of them
        # at every call, for ever.
        read_to = (conn.execute(select(func.max(events.c.seq))).scalar() or 0) if types and len(page) < limit else 0
        rows, cursor = _settled_rows(conn, gaps, page, after, read_to)
    return [event_to_json(r) for r in rows], cursor


def add_events_routes(app: web.Application, engine: Engine, token: str | None, *, path: str = "/events") -> None:
    """Mount `GET /events` (bearer token) on an aiohttp app; without a token the route answers 503."""
    gaps = GapWatch()

    async def handler(request: web.Request) -> web.Response:
        if not token:
            return web.json_response({"error": "pull API disabled: set events.api_token_env"}, status=503)
        auth = request.headers.get("Authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not given or not hmac.compare_digest(given.encode(), token.encode()):
            return web.json_response({"error": "missing or wrong bearer token"}, status=401,
                                     headers={"WWW-Authenticate": "Bearer"})
        try:
            after = int(request.query.get("after", "0") or 0)
            limit = max(1, min(1000, int(request.query.get("limit", "100") or 100)))
        except ValueError:
            return web.json_response({"error": "after and limit must be integers"}, status=400)
        if not 0 <= after <= MAX_SEQ:  # a sequence number is a signed 64-bit integer: larger ones cannot be bound
            return web.json_response({"error": f"after must be between 0 and {MAX_SEQ}"}, status=400)
        types = [t for t in request.query.get("types", "").split(",") if t]
        unknown = [t for t in types if t not in EVENT_TYPES]
        if unknown:
            return web.json_response({"error": f"unknown event types: {', '.join(unknown)}"}, status=400)
        rows, nxt = await asyncio.to_thread(read_settled, engine, gaps, after=after, types=types, limit=limit)
        return web.json_response({"events": rows, "next": nxt})

    app.router.add_get(path, handler)


def add_event_routes(app: web.Application, config: Config, engine: Engine) -> None:
    """`GET /events` on the admin app (`gateway.serve` calls this), token from `events.api_token_env`."""
    add_events_routes(app, engine, env_secret(config.events.api_token_env))

"""Tracking HTTP: the open pixel and the click redirect (aiohttp), and the URLs that point at them.

URLs carry a token from `routing.tokens` naming the outbound recipient row; a click token also binds the
target URL into its MAC, so a redirect happens only to the URL we signed — never an open redirect. Forged or
altered tokens record nothing: the pixel still answers a GIF (a broken image helps nobody), the click 404s.

First open and first click per mail and recipient become `opened` / `clicked` events; later ones only
increment the counters on `outbound_recipients` (counted in memory, written in batches: `HitRecorder`). The
mail client gets its image or redirect before anything is written. An open that looks like a proxy prefetch
(known proxy user agents and networks, or within `prefetch_seconds` of delivery) is flagged `machine: true`;
the first human open after a machine one still produces its own event, because "was it opened by a person?"
is the question follow-up sequences ask.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from aiohttp import web
from sqlalchemy import Connection, Engine, bindparam, select, update

from gateway.metrics import TRACKING_HITS
from gateway.outbox import EventDraft, record_events
from gateway.schema import outbound_mails, outbound_recipients
from gateway.store import as_utc, reading, utcnow
from routing.tokens import make_token, read_token

log = logging.getLogger(__name__)

PIXEL_PATH = "/t/o/"
CLICK_PATH = "/t/c/"
#: The smallest transparent GIF (43 bytes).
PIXEL_GIF = (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00,"
             b"\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")
NO_CACHE = {
    "Cache-Control": "no-store, no-cache, must-revalidate, max-age=0, private",
    "Pragma": "no-cache",
    "Expires": "Thu, 01 Jan 1970 00:00:00 GMT",
}


# ------------------------------------------------------------------------------------------ URLs (pure)
def pixel_url(base: str, secret: bytes, rcpt_id: int) -> str:
    return f"{base.rstrip('/')}{PIXEL_PATH}{make_token(secret, 'open', rcpt_id)}.gif"


def click_url(base: str, secret: bytes, rcpt_id: int, url: str) -> str:
    token = make_token(secret, "click", rcpt_id, url.encode("utf-8", "surrogatepass"))
    return f"{base.rstrip('/')}{CLICK_PATH}{token}?u={quote(url, safe='')}"


def read_pixel_token(secret: bytes, name: str) -> int | None:
    return read_token(secret, "open", name.removesuffix(".gif"))


def read_click_token(secret: bytes, token: str, url: str) -> int | None:
    """The recipient row a click token names, only if the token was made for exactly this URL."""
    if urlsplit(url).scheme.lower() not in ("http", "https"):
        return None
    return read_token(secret, "click", token, url.encode("utf-8", "surrogatepass"))


# ------------------------------------------------------------------------------------------ machine opens
#: User-agent fragments of mail providers' image proxies and link scanners (they fetch, people don't). Not
#: "ms-office", "msoffice" or "microsoft office": Outlook for Windows sends those when a person opens the
#: mail (`Microsoft Office/16.0 (…; Microsoft Outlook 16.0…)`, `Mozilla/4.0 (compatible; ms-office; MSOffice
#: 16)`), so every desktop Outlook reader was a machine open; Microsoft's own scanners are caught by their
#: networks below.
PROXY_USER_AGENTS = (
    "googleimageproxy", "ggpht.com", "yahoomailproxy", "outlook-prefetch", "office365", "microsoft exchange",
    "mimecast", "barracuda", "proofpoint",
)
#: Apple Mail Privacy Protection fetches through Apple's 17.0.0.0/8 with a bare "Mozilla/5.0";
#: Exchange Online Protection scans from these Microsoft ranges.
PROXY_NETWORKS = tuple(ipaddress.ip_network(n) for n in (
    "17.0.0.0/8", "40.92.0.0/15", "40.107.0.0/16", "52.100.0.0/14", "104.47.0.0/17",
))


def is_machine_open(user_agent: str | None, client_ip: str | None, delivered_at: dt.datetime | None,
                    now: dt.datetime, prefetch_seconds: float) -> bool:
    """True when an open (or click) looks like a proxy or scanner fetch rather than a person."""
    ua = (user_agent or "").strip()
    low = ua.lower()
    if any(frag in low for frag in PROXY_USER_AGENTS):
        return True
    if ua == "Mozilla/5.0":  # Apple MPP's bare UA
        return True
    if client_ip:
        try:
            ip = ipaddress.ip_address(client_ip)
        except ValueError:
            ip = None
        if ip is not None and any(ip in net for net in PROXY_NETWORKS):
            return True
    if delivered_at is not None and prefetch_seconds > 0:
        if (now - delivered_at).total_seconds() < prefetch_seconds:
            return True
    return False


def client_address(peer: str | None, forwarded_for: str | None,
                   trusted: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> str | None:
    """The opener's address: the peer, or, when the peer is a trusted reverse proxy, the last address in
    X-Forwarded-For that is not itself a trusted proxy (proxies append; what a client wrote comes first and
    cannot be believed)."""
    if not peer or not forwarded_for or not _in(peer, trusted):
        return peer
    hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
    for hop in reversed(hops):
        if not _in(hop, trusted):
            return hop
    return hops[0] if hops else peer


def _in(address: str, networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


# ------------------------------------------------------------------------------------------ recording
@dataclass(frozen=True)
class Hit:
    kind: str               # "open" | "click"
    rcpt_id: int
    user_agent: str | None
    client_ip: str | None
    url: str | None = None
    probe: bool = False     # a HEAD request: link scanners check URLs that way, people's browsers GET them


@dataclass(frozen=True)
class RecipientFacts:
    """What an event about one recipient row says of its mail (fixed once the copy was delivered)."""

    recipient: str
    delivered_at: dt.datetime | None
    message_id: str
    model: str | None
    res_id: int | None


def recipient_facts(conn: Connection, rcpt_id: int) -> RecipientFacts | None:
    row = conn.execute(
        select(outbound_recipients.c.recipient, outbound_recipients.c.delivered_at,
               outbound_mails.c.message_id, outbound_mails.c.model, outbound_mails.c.res_id)
        .join(outbound_mails, outbound_mails.c.id == outbound_recipients.c.mail)
        .where(outbound_recipients.c.id == rcpt_id)
    ).first()
    if row is None:
        return None
    return RecipientFacts(row.recipient, as_utc(row.delivered_at), row.message_id, row.model, row.res_id)


def hit_event(hit: Hit, facts: RecipientFacts, machine: bool, now: dt.datetime) -> EventDraft:
    """The `opened`/`clicked` event a hit makes when it is the first of its kind and of its human/machine side
    (the seed says which, so recording it again is a no-op)."""
    who = "machine" if machine else "human"
    common = dict(message_id=facts.message_id, model=facts.model, res_id=facts.res_id, recipient=facts.recipient,
                  occurred_at=now)
    if hit.kind == "open":
        return EventDraft(type="opened", seed=f"out:{hit.rcpt_id}:opened:{who}",
                          data={"machine": machine, "user_agent": hit.user_agent}, **common)
    return EventDraft(type="clicked", seed=f"out:{hit.rcpt_id}:clicked:{who}",
                      data={"url": hit.url, "machine": machine, "user_agent": hit.user_agent}, **common)


def add_counts(engine: Engine, counts: Mapping[tuple[int, str], int]) -> None:
    """Add counted opens and clicks to their rows, one executemany per kind."""
    with engine.begin() as conn:
        for kind, column in (("open", outbound_recipients.c.opens), ("click", outbound_recipients.c.clicks)):
            params = [{"rid": rid, "n": n} for (rid, k), n in counts.items() if k == kind]
            if params:
                conn.execute(update(outbound_recipients).where(outbound_recipients.c.id == bindparam("rid"))
                             .values({column: column + bindparam("n")}), params)


class _Bounded(OrderedDict):  # type: ignore[type-arg]
    """A dict that forgets its least recently used entries beyond `size`."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def recall(self, key: Any, default: Any) -> Any:
        if key not in self:
            return default
        self.move_to_end(key)
        return self[key]

    def remember(self, key: Any, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


class HitRecorder:
    """Records tracking hits off the request path, with bounded store work.

    A pixel URL replayed by a bot (or a mail client that reloads images) cost one write transaction per request
    on the loop's default executor, which the outbound worker's claims and lease renewals also wait on. Now a
    repeat hit — its (row, kind, human/machine) event known recorded — is only counted in memory, and the
    counts are added to the rows at most once per `flush_seconds` and at shutdown (a crash loses at most that
    much of the counters, never an event). The store is written at once only for a hit whose event may be
    new, on an executor of this recorder's own, and the dispatcher is woken only when an event was inserted.
    Both caches are bounded (least recently used go first): a forgotten entry costs one look-up again."""

    def __init__(self, engine: Engine, prefetch_seconds: float, on_event: Callable[[], None] | None = None, *,
                 flush_seconds: float = 0.1, cache_size: int = 10_000, threads: int = 2):
        self.engine = engine
        self.prefetch_seconds = prefetch_seconds
        self.on_event = on_event
        self.flush_seconds = flush_seconds
        self._facts = _Bounded(cache_size)   # rcpt_id -> RecipientFacts | None (no such row)
        self._known = _Bounded(cache_size)   # (rcpt_id, kind, machine) whose event is stored
        self._counts: Counter[tuple[int, str]] = Counter()
        self._pending: set[asyncio.Future[None]] = set()
        self._writes: set[asyncio.Future[None]] = set()  # counter writes under way (`flush`)
        self._counted = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tracking")

    def record(self, hit: Hit) -> asyncio.Future[None]:
        """Start counting one hit (and storing its event if it may be the first) as a task of its own, before
        the answer goes out: a client that hangs up as soon as it has its answer (aiohttp may then cancel the
        handler at its next await) does not lose the hit, and `close` waits for the task."""
        task = asyncio.ensure_future(self._record_logged(hit))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return task

    async def _record_logged(self, hit: Hit) -> None:
        try:
            await self._record(hit)
        except Exception as exc:  # a tracking write must never break anything
            log.error("tracking %s for recipient row %s not recorded: %s", hit.kind, hit.rcpt_id, exc)

    async def _record(self, hit: Hit) -> None:
        facts = self._facts.recall(hit.rcpt_id, ...)
        if facts is ...:
            facts = await self._run(self._read_facts, hit.rcpt_id)
            if facts is None or facts.delivered_at is not None:  # not delivered yet: its prefetch window is to come
                self._facts.remember(hit.rcpt_id, facts)
        if facts is None:
            return
        now = utcnow()
        machine = hit.probe or is_machine_open(hit.user_agent, hit.client_ip, facts.delivered_at, now,
                                               self.prefetch_seconds)
        TRACKING_HITS.labels(hit.kind, "probe" if hit.probe else "machine" if machine else "human").inc()
        if not hit.probe:  # a HEAD is a scanner checking the URL: its machine event says so, the counts are reads
            self._counts[(hit.rcpt_id, hit.kind)] += 1
            self._counted.set()
        key = (hit.rcpt_id, hit.kind, machine)
        if self._known.recall(key, False):
            return
        inserted = await self._run(self._store_event, hit_event(hit, facts, machine, now))
        self._known.remember(key, True)
        if inserted and self.on_event:
            self.on_event()

    def _read_facts(self, rcpt_id: int) -> RecipientFacts | None:
        with reading(self.engine) as conn:
            return recipient_facts(conn, rcpt_id)

    def _store_event(self, draft: EventDraft) -> int:
        with self.engine.begin() as conn:
            return record_events(conn, [draft])

    async def flush(self) -> None:
        """Add the counted hits to their rows; on failure they stay counted for the next flush.

        The write is a task of its own that the caller's cancellation does not reach: `close` cancels the
        flusher, and a cancelled `run_in_executor` call whose job had not started yet was dropped from the
        executor's queue — with the counts already taken out of memory, so the last hits were lost."""
        counts, self._counts = self._counts, Counter()
        if not counts:
            return
        write = asyncio.ensure_future(self._write(counts))
        self._writes.add(write)
        write.add_done_callback(self._writes.discard)
        await asyncio.shield(write)

    async def _write(self, counts: Counter[tuple[int, str]]) -> None:
        try:
            await self._run(add_counts, self.engine, counts)
        except Exception as exc:
            self._counts.update(counts)
            log.error("tracking counters not written (kept for the next try): %s", exc)

    async def run_flusher(self) -> None:
        """Flush as soon as something was counted, then at most once per `flush_seconds`, until cancelled: a lone
        open shows in its row at once, a flood costs one write per interval."""
        while True:
            await self._counted.wait()
            self._counted.clear()
            await self.flush()
            await asyncio.sleep(self.flush_seconds)

    async def close(self) -> None:
        """Finish the hits under way, flush the counts, then the executor goes."""
        await asyncio.gather(*self._pending, return_exceptions=True)
        await asyncio.gather(*self._writes, return_exceptions=True)  # one a cancelled flusher left running
        await self.flush()
        self._executor.shutdown(wait=True)

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)


# ------------------------------------------------------------------------------------------ HTTP
def location(url: str) -> str:
    """The redirect target: the URL we signed, byte for byte. Passed through yarl (as `HTTPFound` does) it came
    out rewritten — `%zz` re-quoted as `%25zz`, `%3A` in a query value decoded, non-ASCII percent-encoded, the
    scheme and host lower-cased — which breaks links whose server compares its URLs as given (signed download
    links, for one). Only ASCII tabs and line breaks go: they cannot stand in a header, and a browser drops them
    from an href anyway (WHATWG URL parsing)."""
    return url.translate(_TAB_OR_NEWLINE)


_TAB_OR_NEWLINE = {ord("\t"): None, ord("\n"): None, ord("\r"): None}


async def answer(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    """Send the whole response now, so what the handler does next (recording) never delays the mail client."""
    await response.prepare(request)
    await response.write_eof()
    return response


def make_tracking_app(engine: Engine, secret: bytes, *, prefetch_seconds: float = 10.0,
                      on_event: Callable[[], None] | None = None,
                      trusted_proxies: Sequence[str] = ("127.0.0.0/8", "::1/128"),
                      flush_seconds: float = 0.1) -> web.Application:
    """The tracking aiohttp app: `GET /t/o/<token>.gif` and `GET /t/c/<token>?u=<url>`. Hits are counted in
    memory and written at most once per `flush_seconds` and when the app is cleaned up (`AppRunner.cleanup`)."""
    app = web.Application()
    trusted = [ipaddress.ip_network(n, strict=False) for n in trusted_proxies]
    recorder = HitRecorder(engine, prefetch_seconds, on_event, flush_seconds=flush_seconds)

    async def lifetime(_app: web.Application) -> AsyncIterator[None]:
        flusher = asyncio.create_task(recorder.run_flusher(), name="tracking-counters")
        yield
        flusher.cancel()
        await asyncio.gather(flusher, return_exceptions=True)
        await recorder.close()

    app.cleanup_ctx.append(lifetime)

    def opener(request: web.Request) -> str | None:
        return client_address(request.remote, request.headers.get("X-Forwarded-For"), trusted)

    async def pixel(request: web.Request) -> web.StreamResponse:
        rid = read_pixel_token(secret, request.match_info["name"])
        resp = web.Response(body=PIXEL_GIF, content_type="image/gif", headers=NO_CACHE)
        if rid is None:
            return resp
        recorded = recorder.record(Hit("open", rid, request.headers.get("User-Agent"), opener(request),
                                       probe=request.method == "HEAD"))
        await answer(request, resp)
        await asyncio.shield(recorded)  # the connection's next request waits: one hit at a time per client
        return resp

    async def click(request: web.Request) -> web.StreamResponse:
        url = request.query.get("u", "")
        rid = read_click_token(secret, request.match_info["token"], url) if url else None
        if rid is None:
            return web.Response(status=404, text="Unknown or altered link.\n", headers=NO_CACHE)
        recorded = recorder.record(Hit("click", rid, request.headers.get("User-Agent"), opener(request), url,
                                       probe=request.method == "HEAD"))
        resp = await answer(request, web.Response(status=302, text="302: Found",
                                                  headers={**NO_CACHE, "Location": location(url)}))
        await asyncio.shield(recorded)
        return resp

    app.router.add_get(PIXEL_PATH + "{name}", pixel)
    app.router.add_get(CLICK_PATH + "{token}", click)
    return app

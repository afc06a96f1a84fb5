"""Tracking HTTP: the open pixel and the click redirect (aiohttp), and the URLs that point at them.

URLs carry a token from `routing.tokens` naming the outbound recipient row; a click token also binds the
target URL into its MAC, so a redirect happens only to the URL we signed — never an open redirect. Forged or
altered tokens record nothing: the pixel still answers a GIF (a broken image helps nobody), the click 404s.

First open and first click per mail and recipient become `opened` / `clicked` events; later ones only
increment the counters on `outbound_recipients`. An open that looks like a proxy prefetch (known proxy user
agents and networks, or within `prefetch_seconds` of delivery) is flagged `machine: true`; the first human
open after a machine one still produces its own event, because "was it opened by a person?" is the
question follow-up sequences ask.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from aiohttp import web
from sqlalchemy import Engine, select, update

from gateway.outbox import EventDraft, record_events
from gateway.schema import outbound_mails, outbound_recipients
from gateway.store import as_utc, utcnow
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
#: User-agent fragments of mail providers' image proxies and link scanners (they fetch, people don't).
PROXY_USER_AGENTS = (
    "googleimageproxy", "ggpht.com", "yahoomailproxy", "outlook-prefetch", "ms-office", "microsoft office",
    "msoffice", "office365", "microsoft exchange", "mimecast", "barracuda", "proofpoint",
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


def record_hit(engine: Engine, hit: Hit, prefetch_seconds: float) -> bool:
    """Count one open/click and record its event when it is the first (of its kind); False if unknown row."""
    now = utcnow()
    counter = outbound_recipients.c.opens if hit.kind == "open" else outbound_recipients.c.clicks
    with engine.begin() as conn:
        row = conn.execute(
            select(outbound_recipients.c.recipient, outbound_recipients.c.delivered_at,
                   outbound_mails.c.message_id, outbound_mails.c.model, outbound_mails.c.res_id)
            .join(outbound_mails, outbound_mails.c.id == outbound_recipients.c.mail)
            .where(outbound_recipients.c.id == hit.rcpt_id)
        ).first()
        if row is None:
            return False
        conn.execute(update(outbound_recipients).where(outbound_recipients.c.id == hit.rcpt_id)
                     .values({counter: counter + 1}))
        machine = hit.probe or is_machine_open(hit.user_agent, hit.client_ip, as_utc(row.delivered_at), now,
                                               prefetch_seconds)
        who = "machine" if machine else "human"
        if hit.kind == "open":
            draft = EventDraft(type="opened", seed=f"out:{hit.rcpt_id}:opened:{who}", message_id=row.message_id,
                               model=row.model, res_id=row.res_id, recipient=row.recipient, occurred_at=now,
                               data={"machine": machine, "user_agent": hit.user_agent})
        else:
            draft = EventDraft(type="clicked", seed=f"out:{hit.rcpt_id}:clicked:{who}", message_id=row.message_id,
                               model=row.model, res_id=row.res_id, recipient=row.recipient, occurred_at=now,
                               data={"url": hit.url, "machine": machine, "user_agent": hit.user_agent})
        record_events(conn, [draft])
    return True


# ------------------------------------------------------------------------------------------ HTTP
def make_tracking_app(engine: Engine, secret: bytes, *, prefetch_seconds: float = 10.0,
                      on_event: Callable[[], None] | None = None,
                      trusted_proxies: Sequence[str] = ("127.0.0.0/8", "::1/128")) -> web.Application:
    """The tracking aiohttp app: `GET /t/o/<token>.gif` and `GET /t/c/<token>?u=<url>`."""
    app = web.Application()
    trusted = [ipaddress.ip_network(n, strict=False) for n in trusted_proxies]

    def opener(request: web.Request) -> str | None:
        return client_address(request.remote, request.headers.get("X-Forwarded-For"), trusted)

    async def _record(hit: Hit) -> None:
        try:
            if await asyncio.to_thread(record_hit, engine, hit, prefetch_seconds) and on_event:
                on_event()
        except Exception as exc:  # a tracking write must never break the recipient's mail client
            log.error("tracking %s for recipient row %s not recorded: %s", hit.kind, hit.rcpt_id, exc)

    async def pixel(request: web.Request) -> web.Response:
        rid = read_pixel_token(secret, request.match_info["name"])
        if rid is not None:
            await _record(Hit("open", rid, request.headers.get("User-Agent"), opener(request),
                              probe=request.method == "HEAD"))
        return web.Response(body=PIXEL_GIF, content_type="image/gif", headers=NO_CACHE)

    async def click(request: web.Request) -> web.Response:
        url = request.query.get("u", "")
        rid = read_click_token(secret, request.match_info["token"], url) if url else None
        if rid is None:
            return web.Response(status=404, text="Unknown or altered link.\n", headers=NO_CACHE)
        await _record(Hit("click", rid, request.headers.get("User-Agent"), opener(request), url,
                          probe=request.method == "HEAD"))
        raise web.HTTPFound(location=url, headers=NO_CACHE)

    app.router.add_get(PIXEL_PATH + "{name}", pixel)
    app.router.add_get(CLICK_PATH + "{token}", click)
    return app

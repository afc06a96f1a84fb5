"""Shared helpers for the router tests (no tests here): a test alias table, pinned fake detectors, one-call routing."""

from __future__ import annotations

import email.message
import hashlib
from typing import Any

import pytest

from aliases.model import Alias, AliasTable, Domain
from routing.bounce import BounceReport, VerpHit
from routing.model import (
    BounceResult, Complaint, Decision, NoDuplicates, NoThreads, RoutingEnvelope, StaticThreads, ThreadHit,
)
from routing.parse import parse_mail
from routing.router import Detectors, route

TABLE = AliasTable(
    domains=(
        Domain("test.mycompany.com", catchall="catchall.test", bounce="bounce.test"),
        Domain("strict.example.org", strict=True, default_alias="help@strict.example.org"),
    ),
    aliases=(
        Alias("groups@test.mycompany.com", "mail.test.gateway"),
        Alias("test@test.mycompany.com", "mail.test.container"),
        Alias("forced@test.mycompany.com", "mail.test.container", force_thread_id=42),
        Alias("partners@test.mycompany.com", "mail.test.gateway", contact="partners"),
        Alias("help@strict.example.org", "helpdesk.ticket"),
    ),
)


def _fake_bounce(msg: email.message.Message, *, verp: VerpHit | None = None,
                 to_bounce_address: bool = False) -> BounceReport | None:
    """Pinned bounce detector: `X-Fake-Bounce: <hard|soft|delayed> <recipient>`; VERP hits always bounce."""
    if verp is not None:
        return BounceReport((BounceResult(verp.recipient, "hard", "userunknown", "5.1.1",
                                          original_message_id=verp.original_message_id, detector="verp"),),
                            via="verp")
    spec = msg.get("X-Fake-Bounce")
    if not spec:
        return None
    kinds = []
    for item in str(spec).split(","):
        kind, rcpt = item.split()
        kinds.append(BounceResult(rcpt, "soft" if kind in ("soft", "delayed") else "hard",
                                  "expired" if kind == "delayed" else "userunknown",
                                  "4.4.7" if kind == "delayed" else "5.1.1",
                                  action="delayed" if kind == "delayed" else "failed", detector="fake"))
    return BounceReport(tuple(kinds), via="dsn", explanation=("fake DSN",))


def _fake_arf(msg: email.message.Message) -> Complaint | None:
    kind = msg.get("X-Fake-Arf")
    return Complaint(str(kind), original_recipient="victim@client.net", original_message_id="<out@test>") \
        if kind else None


def _fake_auto(msg: email.message.Message) -> str | None:
    return "X-Fake-Auto: yes" if msg.get("X-Fake-Auto") else None


FAKE = Detectors(bounce=_fake_bounce, arf=_fake_arf, auto_reply=_fake_auto)


def mail(headers: str, body: str = "Hello\n") -> bytes:
    head = headers.strip()
    if "from:" not in head.lower():
        head = "From: Sylvie Lelitre <test.sylvie.lelitre@agrolait.com>\n" + head
    if "message-id:" not in head.lower():
        head += "\nMessage-ID: <" + hashlib.sha1(head.encode()).hexdigest()[:12] + "@agrolait.com>"
    return (head.replace("\n", "\r\n") + "\r\n\r\n" + body.replace("\n", "\r\n")).encode()


class SeenOnce:
    """A DuplicateLookup that knows one (message_id, sha256)."""

    def __init__(self, message_id: str | None, sha256: str):
        self.key = (message_id, sha256)

    def seen(self, message_id: str | None, sha256: str) -> bool:
        return (message_id, sha256) == self.key


def decide(raw: bytes, *, rcpt: tuple[str, ...] = (), threads: dict[str, ThreadHit] | None = None,
           duplicates: Any = None, verp: Any = None, table: AliasTable = TABLE,
           detectors: Detectors = FAKE, mail_from: str | None = None, **limits: int) -> Decision:
    """Route `raw`; `mail_from` is the SMTP envelope sender ("" for <>; None: not known)."""
    parsed = parse_mail(raw, **limits)
    return route(parsed, RoutingEnvelope(mail_from=mail_from, rcpt_tos=rcpt), aliases=table,
                 threads=StaticThreads(threads) if threads else NoThreads(),
                 duplicates=duplicates or NoDuplicates(), verp=verp, sha256=hashlib.sha256(raw).hexdigest(),
                 detectors=detectors)


def hit(mid: str, model: str | None = "mail.test.gateway", res_id: int | None = 7, **kw: Any) -> dict[str, ThreadHit]:
    return {mid: ThreadHit(message_id=mid, model=model, res_id=res_id, **kw)}


def real_or_skip(fn: Any, *args: Any, **kw: Any) -> Any:
    """Call a real detector; skip the test while its implementation has not landed."""
    try:
        return fn(*args, **kw)
    except NotImplementedError:
        pytest.skip(f"{fn.__module__}.{fn.__name__} not implemented yet")

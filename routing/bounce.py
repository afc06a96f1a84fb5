"""Bounce classification — API CONTRACT (implementation owned by the bounce work; see docstrings).

`classify_bounce` turns one parsed message into per-recipient `BounceResult`s (routing/model.py), or None
when the message is not a bounce.
"""

from __future__ import annotations

import email.message
from dataclasses import dataclass

from routing.model import BounceResult


@dataclass(frozen=True)
class VerpHit:
    """A VERP token in the envelope recipient resolved (by the gateway) to the outbound row it names."""

    recipient: str
    original_message_id: str | None = None


@dataclass(frozen=True)
class BounceReport:
    results: tuple[BounceResult, ...]
    via: str                      # "dsn", "verp", a detector's name, "bounce-address"
    explanation: tuple[str, ...] = ()

    @property
    def deferred_only(self) -> bool:
        return bool(self.results) and all(r.action == "delayed" for r in self.results)


def classify_bounce(msg: email.message.Message, *, verp: VerpHit | None = None,
                    to_bounce_address: bool = False) -> BounceReport | None:
    raise NotImplementedError("routing.bounce.classify_bounce is being written")

"""Lotus Notes / Domino: "Your message … was not delivered to: ADDR because: REASON"."""

from __future__ import annotations

import email.message
import re

from routing.detectors.base import Hit, clean_address, cut_returned, notice_text, squash, status_in

_BODY = re.compile(r"was\s+not\s+delivered\s+to\s*:\s*(\S+@\S+)\s+because\s*:\s*(.{0,400})", re.IGNORECASE | re.DOTALL)
_SUBJECT = re.compile(r"DELIVERY\s+FAILURE:.*?\(?(\S+@[^\s)]+)\)?\s+not\s+listed", re.IGNORECASE | re.DOTALL)


class DominoDetector:
    name = "domino"

    def detect(self, msg: email.message.Message) -> tuple[Hit, ...]:
        text = cut_returned(notice_text(msg))
        hits: dict[str, Hit] = {}
        for m in _BODY.finditer(text):
            addr = clean_address(m.group(1))
            if addr and addr.lower() not in hits:
                reason = squash(m.group(2).split("\n\n")[0], 300) or None
                hits[addr.lower()] = Hit(recipient=addr, diagnostic=reason, status=status_in(reason))
        if not hits:
            m = _SUBJECT.search(" ".join(str(msg.get("Subject") or "").split()))
            addr = clean_address(m.group(1)) if m else None
            if addr:
                hits[addr.lower()] = Hit(recipient=addr, diagnostic="not listed in Domino Directory")
        return tuple(hits.values())

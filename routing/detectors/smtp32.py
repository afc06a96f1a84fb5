"""SMTP32 (IMail and friends): one line per address, "Delivery failed N attempts: X",
"undeliverable to X", "Unknown user: X", "Invalid final delivery userid: X"."""

from __future__ import annotations

import email.message
import re

from routing.detectors.base import Hit, clean_address, cut_returned, notice_text, squash, status_in

_LINE = re.compile(r"^\s*(delivery\s+failed\s+\d+\s+attempts|undeliverable\s+to|unknown\s+user|invalid\s+final\s+delivery\s+userid)"
                   r"\s*:?\s*<?([^\s<>]+@[^\s<>]+?)>?\s*$", re.IGNORECASE | re.MULTILINE)


class Smtp32Detector:
    name = "smtp32"

    def detect(self, msg: email.message.Message) -> tuple[Hit, ...]:
        text = cut_returned(notice_text(msg))
        entries = list(_LINE.finditer(text))
        hits: dict[str, Hit] = {}
        for i, m in enumerate(entries):
            addr = clean_address(m.group(2))
            if not addr or addr.lower() in hits:
                continue
            end = entries[i + 1].start() if i + 1 < len(entries) else min(len(text), m.end() + 300)
            diag = squash(m.group(1) + ". " + text[m.end():end]) or None
            hits[addr.lower()] = Hit(recipient=addr, diagnostic=diag, status=status_in(diag))
        return tuple(hits.values())

"""qmail and its many descendants (Yahoo, Sina, vpopmail, Outblaze, GoDaddy…): "<address>:" lines.

qmail writes each failed address alone in angle brackets followed by a colon, then the reason, and ends
the notice with "--- Below this line is a copy of the message." The shape is distinctive enough to be
recognised without the exact (often translated or rebranded) introduction.
"""

from __future__ import annotations

import email.message
import re

from routing.detectors.base import (Hit, clean_address, cut_returned, is_system_address, notice_text, sender_addresses,
                                    squash, status_in)

_ENTRY = re.compile(r"^[ \t]*<([^<>\s]+@[^<>\s]+)>:[ \t]*(.*)$", re.MULTILINE)


class QmailDetector:
    name = "qmail"

    def detect(self, msg: email.message.Message) -> tuple[Hit, ...]:
        text = cut_returned(notice_text(msg))
        entries = list(_ENTRY.finditer(text))
        if not entries:
            return ()
        exclude = sender_addresses(msg)
        hits: dict[str, Hit] = {}
        for i, m in enumerate(entries):
            addr = clean_address(m.group(1))
            if not addr or is_system_address(addr) or addr.lower() in exclude or addr.lower() in hits:
                continue
            end = entries[i + 1].start() if i + 1 < len(entries) else len(text)
            diag = squash(m.group(2) + " " + text[m.end():end]) or None
            hits[addr.lower()] = Hit(recipient=addr, diagnostic=diag, status=status_in(diag))
        return tuple(hits.values())

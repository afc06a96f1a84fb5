"""Exim: "The following address(es) failed:" followed by indented addresses and the SMTP transcript.

Also Exim's delay warning ("has not yet been delivered to the following addresses") and the
"(generated from X)" line Exim writes when an alias expanded to an address it will not show.
"""

from __future__ import annotations

import email.message
import re

from routing.detectors.base import Hit, clean_address, cut_returned, notice_text, recipient_blocks, sender_addresses

_FAILED = re.compile(r"following\s+address(?:\(es\)|es)?\s+failed\s*:", re.IGNORECASE)
_DELAYED = re.compile(r"(?:has\s+not\s+yet\s+been\s+delivered\s+to\s+the\s+following\s+address(?:\(es\)|es)?"
                      r"|address\s+to\s+which\s+the\s+message\s+has\s+not\s+yet\s+been\s+delivered\s+is)\s*:",
                      re.IGNORECASE)
_GENERATED = re.compile(r"\(generated\s+from\s+([^)\s]+)\)", re.IGNORECASE)


class EximDetector:
    name = "exim"

    def detect(self, msg: email.message.Message) -> tuple[Hit, ...]:
        text = cut_returned(notice_text(msg))
        delayed = False
        m = _FAILED.search(text)
        if m is None:
            m = _DELAYED.search(text)
            delayed = m is not None
        if m is None:
            return ()
        section = text[m.end():]
        hits = list(recipient_blocks(section, delayed=delayed, exclude=sender_addresses(msg)))
        seen = {h.recipient.lower() for h in hits}
        for g in _GENERATED.finditer(section):
            addr = clean_address(g.group(1))
            if addr and addr.lower() not in seen:
                seen.add(addr.lower())
                tail = section[g.end():g.end() + 400]
                hits.append(Hit(recipient=addr, diagnostic=" ".join(tail.split())[:300] or None, delayed=delayed))
        return tuple(hits)

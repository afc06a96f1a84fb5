"""AOL: "Your mail to the following recipients could not be delivered because they are not accepting mail
from X:" then bare screen names, which live at the reporting AOL domain."""

from __future__ import annotations

import email.message
import re

from routing.detectors.base import Hit, addresses_in, clean_address, cut_returned, notice_text

_INTRO = re.compile(r"your\s+mail\s+to\s+the\s+following\s+recipients\s+could\s+not\s+be\s+delivered(?P<why>[^:]*):",
                    re.IGNORECASE)
_NAME = re.compile(r"^\s+([A-Za-z0-9._-]+)\s*$")


class AolDetector:
    name = "aol"

    def detect(self, msg: email.message.Message) -> tuple[Hit, ...]:
        text = cut_returned(notice_text(msg))
        m = _INTRO.search(text)
        if m is None:
            return ()
        froms = addresses_in(str(msg.get("From") or ""))
        domain = froms[0].rpartition("@")[2] if froms else None
        why = " ".join(m.group("why").split()) or None
        hits: list[Hit] = []
        for line in text[m.end():].splitlines():
            if not line.strip():
                if hits:
                    break
                continue
            addr = clean_address(line) if "@" in line else None
            if addr is None and domain:
                name = _NAME.match(line)
                addr = f"{name.group(1)}@{domain}" if name else None
            if addr is None:
                break
            hits.append(Hit(recipient=addr, diagnostic=why))
        return tuple(hits)

"""Yahoo's HTML-era notice: "I'm afraid I wasn't able to deliver the following message." followed by the
returned message's own Subject/To lines, which name the failed recipient. (Yahoo's qmail-shaped notices
are read by the qmail detector.)"""

from __future__ import annotations

import email.message
import re

from routing.detectors.base import Hit, clean_address, notice_text, squash

_INTRO = re.compile(r"wasn't\s+able\s+to\s+deliver\s+the\s+following\s+message\.?(?P<why>.{0,200}?)(?=\n\s*\n|subject:|to:)",
                    re.IGNORECASE | re.DOTALL)
_TO = re.compile(r"^\s*To:\s*(.+)$", re.IGNORECASE | re.MULTILINE)
_END = re.compile(r"-+\s*below\s+this\s+line", re.IGNORECASE)


class YahooDetector:
    name = "yahoo"

    def detect(self, msg: email.message.Message) -> tuple[Hit, ...]:
        text = notice_text(msg)
        m = _INTRO.search(text)
        if m is None:
            return ()
        rest = text[m.end():]
        end = _END.search(rest)
        rest = rest[:end.start()] if end else rest[:2000]
        to = _TO.search(rest)
        addr = clean_address(to.group(1)) if to else None
        if not addr:
            return ()
        return (Hit(recipient=addr, diagnostic=squash(m.group("why")) or None),)

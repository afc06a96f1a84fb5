"""Sendmail without a DSN part: "----- The following addresses had permanent fatal errors -----".

"(expanded from: X)" names the address we actually sent to, so both are reported. The "transient
non-fatal errors" variant is a delay warning.
"""

from __future__ import annotations

import email.message
import re

from routing.detectors.base import Hit, cut_returned, notice_text, recipient_blocks, sender_addresses

_INTRO = re.compile(r"-+\s*the\s+following\s+address(?:es)?\s+(?:had|has|have)\s+(permanent\s+fatal\s+errors?|transient\s+non-fatal\s+errors?|delivery\s+notifications?)\s*-+",
                    re.IGNORECASE)
_EXPANDED = re.compile(r"\(expanded\s+from:\s*([^)\s]+)\)", re.IGNORECASE)
_END = re.compile(r"-+\s*transcript\s+of\s+session\s+follows\s*-+", re.IGNORECASE)


class SendmailDetector:
    name = "sendmail"

    def detect(self, msg: email.message.Message) -> tuple[Hit, ...]:
        text = cut_returned(notice_text(msg))
        m = _INTRO.search(text)
        if m is None:
            return ()
        delayed = m.group(1).lower().startswith("transient")
        section = text[m.end():]
        end = _END.search(section)
        transcript = section[end.end():] if end else ""
        listing = section[:end.start()] if end else section
        listing = _EXPANDED.sub(lambda x: "\n" + x.group(1) + "\n", listing)
        hits = recipient_blocks(listing, delayed=delayed, exclude=sender_addresses(msg))
        diag = " ".join(transcript.split())[:300] or None
        return tuple(Hit(h.recipient, " ".join(x for x in (h.diagnostic, diag) if x) or None, h.status,
                         h.delayed or "transient" in (h.diagnostic or "").lower()) for h in hits)

"""Novell GroupWise: "The message that you sent was not delivered to the following recipients" /
"Delivery failed" with "addr (reason)" lines, in text or in an HTML-only notice."""

from __future__ import annotations

import email.message
import re

from routing.detectors.base import Hit, cut_returned, notice_text, recipient_blocks, sender_addresses, section_after

_INTRO = re.compile(r"(?:message\s+that\s+you\s+sent\s+)?was\s+not\s+delivered\s+to\s+the\s+following\s+recipients?\s*[:.]?"
                    r"|the\s+following\s+recipients?\s+(?:was|were)\s+(?:undeliverable|not\s+delivered)\s*[:.]?",
                    re.IGNORECASE)


class GroupwiseDetector:
    name = "groupwise"

    def detect(self, msg: email.message.Message) -> tuple[Hit, ...]:
        text = cut_returned(notice_text(msg))
        section = section_after(text, _INTRO)
        if section is None:
            return ()
        return recipient_blocks(section, exclude=sender_addresses(msg))

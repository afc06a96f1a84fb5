"""Old Postfix (before it sent DSNs): "This is the Postfix program at host …" then "<addr>: reason".

Rebranded builds ("This is the Keftamail program") keep the same layout, so the anchor is the
"I'm sorry to have to inform you that the message returned below could not be delivered" sentence.
"""

from __future__ import annotations

import email.message
import re

from routing.detectors.base import Hit, cut_returned, notice_text, recipient_blocks, sender_addresses, section_after

_INTRO = re.compile(r"could\s+not\s+be\s+delivered\s+to\s+one\s+or\s+more\s+destinations", re.IGNORECASE)
_SIGNATURE = re.compile(r"^\s*the\s+.{1,60}\s+program\s*$", re.IGNORECASE | re.MULTILINE)


class PostfixDetector:
    name = "postfix"

    def detect(self, msg: email.message.Message) -> tuple[Hit, ...]:
        text = cut_returned(notice_text(msg))
        section = section_after(text, _INTRO)
        if section is None:
            return ()
        sig = _SIGNATURE.search(section)
        if sig:
            section = section[sig.end():]
        delayed = "delayed" in str(msg.get("Subject") or "").lower()
        return recipient_blocks(section, delayed=delayed, exclude=sender_addresses(msg))

"""Microsoft Exchange / Outlook NDRs, old and new, plus the clones that copy their wording.

Exchange 5.5–2003: "did not reach the following recipient(s):" then "addr on DATE" (or an X.400
"…;dda:SMTP=addr;" line) and an indented reason. Exchange 2007+ and clones: "Delivery has failed to these
recipients or distribution lists:" / "The following recipient(s) could not be reached:".
"""

from __future__ import annotations

import email.message
import re

from routing.detectors.base import Hit, cut_returned, notice_text, recipient_blocks, sender_addresses, section_after

_INTRO = re.compile(r"did\s+not\s+reach\s+the\s+following\s+recipient(?:\(s\)|s)?\s*:?"
                    r"|delivery\s+has\s+failed\s+to\s+these\s+recipients(?:\s+or\s+(?:groups|distribution\s+lists))?\s*:"
                    r"|the\s+following\s+recipient(?:\(s\)|s)?\s+could\s+not\s+be\s+reached\s*:"
                    r"|could\s+not\s+be\s+delivered\s+to\s+the\s+following\s+user\s*:",
                    re.IGNORECASE)
_X400 = re.compile(r"dda:SMTP=([^;\s]+@[^;\s]+);", re.IGNORECASE)
_SENT_ON = re.compile(r"^on\s+(?:\w{3},?\s+)?\d{1,2}\s+\w{3}\s+\d{4}(?:\s+[\d:]+)?(?:\s+[-+]\d{4})?\s*", re.IGNORECASE)
_BRACKETED = re.compile(r"^\s*\*?\s*\[(?:SMTP:)?([^\]\s]+@[^\]\s]+)\]", re.IGNORECASE | re.MULTILINE)


class ExchangeDetector:
    name = "exchange"

    def detect(self, msg: email.message.Message) -> tuple[Hit, ...]:
        text = cut_returned(notice_text(msg))
        section = section_after(text, _INTRO)
        if section is None:
            return ()
        # X.400 originator lines hide the SMTP address inside; bring it to the front of its line.
        section = _X400.sub(lambda x: "\n" + x.group(1) + " ", section)
        section = _BRACKETED.sub(lambda x: x.group(1) + " ", section)
        # Stop at the transcript Exchange sometimes appends; it repeats addresses with no new facts.
        section = re.split(r"-{3,}\s*transcript of session", section, maxsplit=1, flags=re.IGNORECASE)[0]
        hits = recipient_blocks(section, exclude=sender_addresses(msg))
        # "addr on Fri, 4 Oct 2002 17:12:28 -0400": the date is not part of the reason
        return tuple(Hit(h.recipient, _SENT_ON.sub("", h.diagnostic or "") or None, h.status, h.delayed) for h in hits)

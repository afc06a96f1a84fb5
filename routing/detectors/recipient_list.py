"""Notices that just list who did not get the mail: Netscape Messaging Server, CAI Wireless, MDaemon,
and the many "Delivery to the following recipients failed" clones (Google's old text NDR, Mail.ru…).

The reason, when any, is the prose before the list ("destination computer was not reachable").
"""

from __future__ import annotations

import email.message
import re

from routing.detectors.base import Hit, cut_returned, notice_text, recipient_blocks, sender_addresses, squash, status_in

_INTRO = re.compile(
    r"following\s+recipients?\s+did\s+not\s+receive\s+(?:your|this)\s+message\s*:"
    r"|following\s+addresses\s+did\s+not\s+receive\s+a\s+copy\s+of\s+your\s+message\s*:"
    r"|del[ei]very\s+to\s+the\s+following\s+recipients?\s+(?:failed(?:\s+permanently)?|was\s+aborted\s+after\s+[\d.]+\s+\w+(?:\(s\))?|has\s+been\s+delayed)\s*[:.]?"
    r"|(?:could\s+not|cannot)\s+be\s+delivered\s+to\s+the\s+following\s+(?:recipients?|address(?:\(es\)|es)?)\s*:"
    r"|(?:wasn't|was\s+not)\s+able\s+to\s+deliver\s+your\s+message\s+to\s+the\s+following\s+address(?:es)?\s*[.:]"
    r"|(?:unable|not\s+able)\s+to\s+deliver\s+(?:your\s+)?(?:message|mail)\s+to\s+the\s+following\s+(?:recipients?|address(?:\(es\)|es)?)\s*[.:]"
    r"|could\s+not\s+deliver\s+message\s+to\s+the\s+following\s+recipient(?:\(s\)|s)?\s*:"
    r"|message\s+not\s+delivered\s+to\s+the\s+following\s+address(?:es)?\s*:"
    r"|following\s+recipients?\s+failed\s*:"
    r"|following\s+recipients?\s+(?:is|are)\s+unknown\s*:"
    r"|mail\s+to\s+the\s+following\s+recipients?\s+could\s+not\s+be\s+delivered\s*:"
    r"|a\s+message\s+could\s+not\s+be\s+delivered\s+to\s*:",
    re.IGNORECASE)
_DELAY = re.compile(r"has\s+been\s+delayed|will\s+(?:continue\s+to\s+be\s+made|be\s+retried)|will\s+continue\s+to\s+(?:try|attempt)"
                    r"|warning\s+message\s+only|delivery\s+attempts\s+will\s+continue", re.IGNORECASE)


class RecipientListDetector:
    name = "recipient-list"

    def detect(self, msg: email.message.Message) -> tuple[Hit, ...]:
        text = cut_returned(notice_text(msg))
        m = _INTRO.search(text)
        if m is None:
            return ()
        before = squash(text[:m.start()], 400)
        delayed = bool(_DELAY.search(text))
        hits = recipient_blocks(text[m.end():], delayed=delayed, exclude=sender_addresses(msg))
        out = []
        for h in hits:
            diag = h.diagnostic or before or None
            out.append(Hit(h.recipient, diag, h.status or status_in(diag), delayed))
        return tuple(out)

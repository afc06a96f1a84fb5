"""Home-grown NDRs that name the failed address inside one sentence ("Your message to X could not be
delivered", "Failed Recipient: X", "Error-for: X", "(Originally addressed to X)")…

One pattern per sentence shape; the address is the `addr` group. The sentence and what follows it, up to
the next blank line, become the diagnostic. This is the last resort before the warning detector, so its
patterns name a failure explicitly: an address merely *mentioned* in a notice is never taken.
"""

from __future__ import annotations

import email.message
import re

from routing.detectors.base import (Hit, clean_address, cut_returned, is_system_address, notice_text, sender_addresses,
                                    squash, status_in)

_A = r"[\"'<\[]?(?P<addr>[^\s\"'<>\[\](),;]+@[^\s\"'<>\[\](),;]*[A-Za-z0-9])[\"'>\]]?"

PATTERNS: tuple[re.Pattern[str], ...] = tuple(re.compile(p, re.IGNORECASE | re.MULTILINE) for p in (
    r"addressed\s+to\s+" + _A + r",?\s+(?:failed|could\s+not|was\s+not)",
    r"\(originally\s+addressed\s+to\s+" + _A + r"\)",
    r"intended\s+recipient\s*:\s*" + _A + r"\s*$",
    r"undeliverable\s+address\s*:\s*" + _A + r"\s*$",
    r"mailbox\s+is\s+full\s*:\s*" + _A,
    r"unable\s+to\s+deliver\s+(?:your\s+)?message\s+to\s+" + _A + r"(?:\s+\(and\s+other|\s+for\s|[.:]|\s*$)",
    r"quota\s+violation\s+for\s+" + _A,
    r"^\s*error-for\s*:\s*" + _A,
    r"(?:n'a\s+pas\s+pu\s+etre\s+d[ée]livr[ée]\s+a|could\s+not\s+be\s+delivered\s+to)\s*:?\s+" + _A + r"\s*$",
    r"did\s+not\s+reach\s+the\s+following\s+recipient\s*:\s*" + _A,
    r"your\s+message\s+to\s+" + _A + r"\s+(?:has\s+reached|was\s+automatically\s+rejected|could\s+not\s+be\s+delivered|was\s+rejected)",
    r"^\s*" + _A + r"\s+-\s+no\s+such\s+user",
    r"failed\s+recipient\s*:\s*" + _A,
    r"local\s+mailbox\s+" + _A + r"\s+is\s+unavailable",
    r"addressed\s+to\s+email\s+address\s*:?\s*(?:--\s*)?" + _A,
    r"the\s+address\s+to\s+which\s+your\s+message\s+was\s+addressed,\s+" + _A + r",\s+did\s+not",
    r"delivery\s+of\s+email\s+to\s+this\s+address\s+" + _A + r"\s+has\s+been\s+postponed",
    r"your\s+message\s+to\s*:\s+" + _A + r"\s+has\s+not\s+yet\s+been\s+delivered",
    r"^\s*" + _A + r"\s+\.\.\.\s+(?:unknown|user|no\s+such|mailbox)",
    r"message\s+could\s+not\s+be\s+delivered\s+to\s*:?\s*" + _A,
))

#: Notices that are only a warning: the server keeps trying.
DELAY_RE = re.compile(
    r"has\s+not\s+yet\s+been\s+delivered|will\s+continue\s+to\s+(?:try|attempt)|delivery\s+attempts\s+will\s+continue"
    r"|attempts\s+will\s+continue\s+to\s+be\s+made|will\s+be\s+retried|warning\s+message\s+only|has\s+been\s+postponed"
    r"|this\s+is\s+just\s+a\s+warning|still\s+being\s+retried|has\s+been\s+delayed|no\s+action\s+is\s+required\s+on\s+your\s+part",
    re.IGNORECASE)
_FINAL_RE = re.compile(r"permanent\s+(?:fatal\s+)?error|given\s+up|not\s+going\s+to\s+try\s+again|failed\s+permanently"
                       r"|was\s+aborted|has\s+been\s+returned|could\s+not\s+be\s+delivered\s+to\s+all", re.IGNORECASE)
_DELAY_SUBJECT = re.compile(r"delay|postponed|not\s+yet\s+been\s+delivered|still\s+being\s+retried", re.IGNORECASE)


def is_warning(text: str, subject: str = "") -> bool:
    """True when a notice says delivery is still being attempted (and does not also say it gave up).

    A "Warning:" subject alone is not enough: some servers title hard failures "Warning: x - User unknown".
    """
    if _FINAL_RE.search(text) or "fail" in subject.lower():
        return bool(DELAY_RE.search(text)) and not _FINAL_RE.search(text)
    return bool(_DELAY_SUBJECT.search(subject)) or bool(DELAY_RE.search(text))


class SimpleDetector:
    name = "simple"

    def detect(self, msg: email.message.Message) -> tuple[Hit, ...]:
        text = cut_returned(notice_text(msg))
        exclude = sender_addresses(msg)
        delayed = is_warning(text, str(msg.get("Subject") or ""))
        hits: dict[str, Hit] = {}
        for rx in PATTERNS:
            for m in rx.finditer(text):
                addr = clean_address(m.group("addr"))
                if not addr or is_system_address(addr) or addr.lower() in exclude or addr.lower() in hits:
                    continue
                para = text[m.start():].split("\n\n", 1)[0]
                if len(para) < 40:
                    para = text[m.start():m.start() + 300]
                diag = squash(para, 400) or None
                hits[addr.lower()] = Hit(recipient=addr, diagnostic=diag, status=status_in(diag), delayed=delayed)
        return tuple(hits.values())

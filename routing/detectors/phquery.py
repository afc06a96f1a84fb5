"""University "phquery" directory mailers (Yale, and others running the same software): a failed
*name* rather than an address, "NAME   No matches to nameserver query".

A bare name is completed with the mail domains the notice itself suggests ("emailing NAME@cs.example.edu"),
or, when it suggests none, with the reporting host's parent domain: the sender used one of those.
"""

from __future__ import annotations

import email.message
import re

from routing.detectors.base import Hit, addresses_in, clean_address, cut_returned, notice_text, squash

_INTRO = re.compile(r"-+\s*message\s+not\s+delivered\s+to\s+the\s+following(?:\s+addresses)?\s*:", re.IGNORECASE)
_DETAIL = re.compile(r"-+\s*error\s+detail", re.IGNORECASE)
# "emailing NAME@cs.example.edu": a mail domain the notice suggests (not "finger NAME@directory…").
_TEMPLATE = re.compile(r"\b(?:e-?mail(?:ing)?|mail(?:ing)?|send(?:ing)?)\s+(?:to\s+)?NAME@([A-Za-z0-9.-]+\.[A-Za-z]{2,})",
                       re.IGNORECASE)
_ENTRY = re.compile(r"^\s*(\S+)(?:\s{2,}(.*))?$")


def _parent_domain(host: str) -> str:
    labels = host.lower().split(".")
    return ".".join(labels[-2:]) if len(labels) >= 2 else host.lower()


class PhqueryDetector:
    name = "phquery"

    def detect(self, msg: email.message.Message) -> tuple[Hit, ...]:
        full = notice_text(msg)
        text = cut_returned(full)
        m = _INTRO.search(text)
        if m is None:
            return ()
        listing = text[m.end():]
        d = _DETAIL.search(listing)
        detail = listing[d.end():] if d else ""
        listing = listing[:d.start()] if d else listing
        froms = addresses_in(str(msg.get("From") or ""))
        domains: list[str] = []
        for dom in _TEMPLATE.findall(full):
            if dom.lower() not in domains:
                domains.append(dom.lower())
        if froms and not domains:
            parent = _parent_domain(froms[0].rpartition("@")[2])
            if parent not in domains:
                domains.append(parent)
        hits: list[Hit] = []
        for line in listing.splitlines():
            e = _ENTRY.match(line)
            if not e:
                continue
            token, reason = e.group(1), e.group(2)
            diag = squash(reason or detail, 300) or None
            if "@" in token:
                addr = clean_address(token)
                if addr:
                    hits.append(Hit(recipient=addr, diagnostic=diag))
            elif re.fullmatch(r"[A-Za-z0-9._-]+", token):
                hits.extend(Hit(recipient=f"{token}@{dom}", diagnostic=diag) for dom in domains)
        return tuple(hits)

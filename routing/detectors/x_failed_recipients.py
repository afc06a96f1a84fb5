"""The `X-Failed-Recipients` header (Exim, Gmail and others add it to their NDRs): addresses only."""

from __future__ import annotations

import email.message

from routing.detectors.base import Hit, addresses_in


class XFailedRecipientsDetector:
    name = "x-failed-recipients"

    def detect(self, msg: email.message.Message) -> tuple[Hit, ...]:
        values = msg.get_all("X-Failed-Recipients") or []
        out: dict[str, Hit] = {}
        for value in values:
            for addr in addresses_in(str(value)):
                out.setdefault(addr.lower(), Hit(recipient=addr))
        return tuple(out.values())

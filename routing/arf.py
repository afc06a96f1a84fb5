"""ARF (RFC 5965) feedback reports — API CONTRACT (implementation owned by the bounce work)."""

from __future__ import annotations

import email.message

from routing.model import Complaint


def parse_arf(msg: email.message.Message) -> Complaint | None:
    """The complaint when the message is a multipart/report; report-type=feedback-report, else None."""
    raise NotImplementedError("routing.arf.parse_arf is being written")

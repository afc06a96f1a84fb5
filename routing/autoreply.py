"""Auto-reply detection — API CONTRACT (implementation owned by the bounce work)."""

from __future__ import annotations

import email.message


def detect_auto_reply(msg: email.message.Message) -> str | None:
    """The indicator (e.g. "Auto-Submitted: auto-replied") when the message is an auto-reply, else None."""
    raise NotImplementedError("routing.autoreply.detect_auto_reply is being written")

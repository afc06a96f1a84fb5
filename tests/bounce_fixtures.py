"""Loading the hand-written NDR fixtures in tests/fixtures/bounce/ (our own mails, not corpus copies)."""

from __future__ import annotations

import email
import email.message
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "bounce"


def fixture(name: str) -> email.message.Message:
    return email.message_from_bytes((FIXTURES / name).read_bytes())

"""docs/events.md's examples say what the code writes (a consumer builds its parser from them)."""

from __future__ import annotations

import json
import re
from email.utils import parseaddr
from pathlib import Path

import pytest

from routing.msgdict import parse_headers

EVENTS_MD = Path(__file__).resolve().parents[1] / "docs" / "events.md"


def example(event_type: str) -> dict:  # type: ignore[type-arg]
    """The JSON example under the `### \\`type\\`` heading."""
    text = EVENTS_MD.read_text()
    section = text[text.index(f"### `{event_type}`"):]
    return json.loads(re.search(r"```json\n(.*?)```", section, re.S).group(1))  # type: ignore[union-attr]


@pytest.mark.parametrize("event_type", ["replied", "auto_replied"])
def test_a_reply_events_from_is_documented_as_delivery_writes_it(event_type):
    """`data.from` is the reply's From as Odoo's email_from (`"Name" <addr>`, what delivery puts there); the
    examples showed a bare address, and a consumer taking `from` for an address broke on the first named one."""
    documented = example(event_type)["data"]["from"]
    name, addr = parseaddr(documented)
    assert name, "the example should show a sender with a display name, as most replies have"
    assert parse_headers(f"From: {name} <{addr}>\r\n\r\n".encode()).email_from == documented

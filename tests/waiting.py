"""Polling helper for tests that wait on another process (the gateway, Postfix, the Odoo double)."""

from __future__ import annotations

import time
from typing import Any, Callable


def wait_until(pred: Callable[[], Any], timeout: float = 30, what: str = "condition", every: float = 0.1) -> Any:
    """Return the first truthy value of `pred()`, or fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")

"""Typed failures the worker acts on: transient ones are retried with backoff, permanent ones go to `dead`."""

from __future__ import annotations


class DeliveryError(Exception):
    """Base: carries what an operator needs (which message, which target, what to do)."""

    def __init__(self, message: str, *, hint: str | None = None):
        self.hint = hint
        super().__init__(message if not hint else f"{message} ({hint})")


class TransientError(DeliveryError):
    """Odoo down, timeout, HTTP 5xx, serialisation conflict, expired API key: keep the mail and retry."""


class PermanentError(DeliveryError):
    """Access error, missing model or field, validation error: retrying cannot help; park as `dead`."""

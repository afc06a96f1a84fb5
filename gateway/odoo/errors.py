"""Mapping Odoo's failures onto the gateway's two kinds: retry later (transient) or park as dead (permanent).

Odoo reports an exception by its dotted class name (JSON-RPC `error.data.name`, JSON-2 `name`). Whatever
the server's own machinery can cure by itself later — a serialisation conflict its retry loop gave up on, a
lock, a restarting worker, a 5xx without a JSON body, an expired API key an operator will replace — is
transient: the mail stays spooled. What the same call will hit again — access rights, a missing model or
field, a validation error, "No possible route" — is permanent, with Odoo's message (never its `debug`
traceback, which may quote mail content and server paths).
"""

from __future__ import annotations

import http.client
import json
import socket
import urllib.error
from typing import Any

from gateway.errors import DeliveryError, PermanentError, TransientError

#: substrings of Odoo exception names that a later retry can get past
_TRANSIENT_NAMES = (
    "SerializationFailure", "TransactionRollbackError", "DeadlockDetected", "LockNotAvailable",
    "OperationalError", "InterfaceError", "ConcurrencyError", "SessionExpired", "AccessDenied",
    "Unauthorized", "MemoryError", "ServiceUnavailable", "TooManyRequests", "RetryableJobError",
)


def is_transient_name(name: str) -> bool:
    return any(part in name for part in _TRANSIENT_NAMES)


def from_odoo_error(name: str, message: str, *, where: str, status: int | None = None) -> DeliveryError:
    """An Odoo error payload (name, message) → TransientError or PermanentError for `where` (model.method)."""
    lines = (message or "").strip().splitlines()  # a blank message has no first line
    short = lines[0][:500] if lines else "(no message)"
    text = f"Odoo {where}: {name}: {short}"
    if is_transient_name(name) or (status is not None and status in (401, 408, 429, 502, 503, 504)):
        if "AccessDenied" in name or "Unauthorized" in name or status == 401:
            return TransientError(text, hint="the login, password or API key was refused (expired key?): "
                                             "replace it; mail stays spooled and is retried")
        return TransientError(text, hint="Odoo will likely accept it on a later attempt; retried with backoff")
    if "AccessError" in name:
        hint = "give the gateway's Odoo user admin-level rights (base.group_system); then `mailgate dead retry`"
    elif "ValueError" in name and "No possible route" in (message or ""):
        hint = "Odoo found no alias for it: add a mail.alias or a gateway alias; then `mailgate dead retry`"
    elif "ValidationError" in name or "UserError" in name:
        hint = "Odoo refused the values: fix the alias defaults or the model; then `mailgate dead retry`"
    else:
        hint = "retrying cannot help until the cause is fixed; then `mailgate dead retry`"
    return PermanentError(text, hint=hint)


def from_http_status(status: int, body: bytes, *, where: str) -> DeliveryError:
    """A non-JSON HTTP answer (proxy page, db-filter 404, 415, crashed error handler, maintenance page)."""
    snippet = body[:200].decode("utf-8", "replace").strip().replace("\n", " ")
    text = f"Odoo {where}: HTTP {status}: {snippet}"
    if 200 <= status < 400:
        # Odoo answers its RPC in JSON, errors included: a success or redirect with a page instead is something
        # in front of it (a proxy's error page, a login portal, a maintenance page) and says nothing about
        # this mail. Parking mail dead for it would park every message in the spool.
        return TransientError(text, hint="something other than Odoo answered (proxy, login portal or "
                                         "maintenance page?); retried with backoff. If it lasts, check [odoo] url")
    if status >= 500 or status in (401, 408, 429):
        return TransientError(text, hint="Odoo (or a proxy in front of it) failed; retried with backoff")
    return PermanentError(text, hint="check the Odoo URL, database name and protocol in [odoo]")


def from_exception(exc: BaseException, *, where: str, url: str = "") -> DeliveryError:
    """A network-level failure: connection refused, reset, timeout, lost answer → transient."""
    if isinstance(exc, DeliveryError):
        return exc
    if isinstance(exc, urllib.error.HTTPError):
        try:
            body = exc.read()
        except Exception:  # noqa: BLE001 - the body is only for the message
            body = b""
        return from_http_status(exc.code, body, where=where)
    if isinstance(exc, json.JSONDecodeError):  # odoorpc and version_info read a 200 whose body is not JSON
        return from_http_status(200, (exc.doc or "").encode("utf-8", "replace"), where=where)
    reason: Any = getattr(exc, "reason", None) or exc
    if isinstance(exc, (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError,
                        http.client.HTTPException, OSError)):
        return TransientError(f"Odoo {where}: cannot reach {url or 'Odoo'}: {type(exc).__name__}: {reason}",
                              hint="check that Odoo is running and reachable; mail stays spooled and is retried")
    return PermanentError(f"Odoo {where}: unexpected {type(exc).__name__}: {exc}",
                          hint="report this; then `mailgate dead retry`")

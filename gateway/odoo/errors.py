"""Mapping Odoo's failures onto the gateway's two kinds: retry later (transient) or park as dead (permanent).

Odoo reports an exception by its dotted class name (JSON-RPC `error.data.name`, JSON-2 `name`). Whatever
the server's own machinery can cure by itself later — a serialisation conflict its retry loop gave up on, a
lock, a restarting worker, a 5xx without a JSON body, an expired API key an operator will replace — is
transient: the mail stays spooled. What the same call will hit again — access rights, a missing model or
field, a validation error, "No possible route" — is permanent, with Odoo's message (never its `debug`
traceback, which may quote mail content and server paths).

A 404 or 415 for the URL itself (a database the db-filter does not serve, a route the reverse proxy lacks, a
transport the server does not speak) fails every call alike: it is the gateway's configuration, not the mail,
so it is transient and logged with the URL and what to check. Only a 404 in which Odoo names the call (JSON-2's
"the model 'x' does not exist", "The method 'x.y' does not exist", a MissingError) is about this call.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import time
import urllib.error
from typing import Any

from gateway.errors import DeliveryError, PermanentError, TransientError

log = logging.getLogger(__name__)

#: substrings of Odoo exception names that a later retry can get past
_TRANSIENT_NAMES = (
    "SerializationFailure", "TransactionRollbackError", "DeadlockDetected", "LockNotAvailable",
    "OperationalError", "InterfaceError", "ConcurrencyError", "SessionExpired", "AccessDenied",
    "Unauthorized", "MemoryError", "ServiceUnavailable", "TooManyRequests", "RetryableJobError",
    "LockError",  # Odoo 19: a row another transaction holds (JSON-2 answers it 409)
)


def is_transient_name(name: str) -> bool:
    return any(part in name for part in _TRANSIENT_NAMES)


#: What to check when the URL itself answers 404 or 415: every call fails the same way until it is fixed.
_ENDPOINT_HINTS = {
    404: "nothing at this URL takes Odoo calls, so every call fails alike; mail stays spooled and is retried. "
         "Check [odoo] url (scheme, host, port, any path prefix, and that the reverse proxy routes /json/2/ and "
         "/jsonrpc to Odoo), [odoo] db against Odoo's db-filter (dbfilter / db_name: a database it does not "
         "serve answers 404), and [odoo] protocol (json2 needs Odoo 19 or later; /jsonrpc is gone in Odoo 22)",
    415: "this URL does not take the JSON request sent, so every call fails alike; mail stays spooled and is "
         "retried. Check [odoo] protocol against the Odoo version (json2 on 19 or later, jsonrpc before) and that "
         "no proxy in front of Odoo rewrites Content-Type: application/json",
}
#: Seconds between two warnings about the same URL answering the same status (every call hits it).
ENDPOINT_WARN_EVERY = 60.0
_endpoint_warned: dict[tuple[str, int], float] = {}


def endpoint_error(status: int, snippet: str, *, where: str, url: str) -> TransientError:
    """A 404 or 415 for the URL itself → TransientError naming the URL and what to check, also logged as a
    warning (at most once a minute per URL and status), since it is the gateway's setup and not the mail."""
    hint = _ENDPOINT_HINTS[status]
    text = f"Odoo {where}: HTTP {status} from {url or 'the [odoo] url'}: {snippet or '(no body)'}"
    now = time.monotonic()
    if now - _endpoint_warned.get((url, status), float("-inf")) >= ENDPOINT_WARN_EVERY:
        _endpoint_warned[(url, status)] = now
        log.warning("%s: %s", text, hint)
    return TransientError(text, hint=hint)


def names_the_call(name: str, message: str, *, where: str) -> bool:
    """Whether Odoo's 404 is about this call (`where` = model.method): a record gone (MissingError), or the
    model or method named in the message, as Odoo 19's JSON-2 controller and Odoo 17 word it. Any other 404
    (werkzeug's generic "The requested URL was not found") is about the URL."""
    if "MissingError" in name:
        return True
    model, _, method = where.rpartition(".")
    return bool(model and model in message) or bool(method and f"{method}'" in message)


def from_odoo_error(name: str, message: str, *, where: str, status: int | None = None,
                    url: str = "") -> DeliveryError:
    """An Odoo error payload (name, message) → TransientError or PermanentError for `where` (model.method);
    `status` and `url` are the HTTP answer's, when the transport has them (JSON-2)."""
    lines = (message or "").strip().splitlines()  # a blank message has no first line
    short = lines[0][:500] if lines else "(no message)"
    text = f"Odoo {where}: {name}: {short}"
    if status == 415 or (status == 404 and not names_the_call(name, message or "", where=where)):
        return endpoint_error(status, f"{name}: {short}", where=where, url=url)
    if is_transient_name(name) or (status is not None and status in (401, 408, 409, 429, 502, 503, 504)):
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


def from_http_status(status: int, body: bytes, *, where: str, url: str = "") -> DeliveryError:
    """A non-JSON HTTP answer (proxy page, db-filter 404, 415, crashed error handler, maintenance page);
    `url` is the one requested."""
    snippet = body[:200].decode("utf-8", "replace").strip().replace("\n", " ")
    if status in _ENDPOINT_HINTS:
        return endpoint_error(status, snippet, where=where, url=url)
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
        return from_http_status(exc.code, body, where=where, url=exc.filename or url)
    if isinstance(exc, json.JSONDecodeError):  # odoorpc and version_info read a 200 whose body is not JSON
        return from_http_status(200, (exc.doc or "").encode("utf-8", "replace"), where=where)
    reason: Any = getattr(exc, "reason", None) or exc
    if isinstance(exc, (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError,
                        http.client.HTTPException, OSError)):
        return TransientError(f"Odoo {where}: cannot reach {url or 'Odoo'}: {type(exc).__name__}: {reason}",
                              hint="check that Odoo is running and reachable; mail stays spooled and is retried")
    return PermanentError(f"Odoo {where}: unexpected {type(exc).__name__}: {exc}",
                          hint="report this; then `mailgate dead retry`")

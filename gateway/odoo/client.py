"""One interface to Odoo, whatever the transport: `OdooClient`.

A transport implements only `_execute(model, method, ids, params)` — call `method` on `model` (on the
records `ids`, or on the model when None) with *named* parameters — and raises
`gateway.errors.TransientError` / `PermanentError`. Everything else here is shared: the ORM and mail.thread
helpers delivery uses, and the flattening of Odoo's return shapes, which differ by version (spec §6/§7):
`message_new` answers ``"crm.lead(5,)"`` on 17 and ``[5]`` on 19, `message_post` ``5`` vs ``[5]``,
`create` ``5`` vs ``[5]``; `message_process` a thread id, ``False`` (duplicate, bounce, refusal) or
``None`` (loop drop).

Named parameters work on both transports: `/jsonrpc` execute_kw accepts them as kwargs, JSON-2 requires them.
"""

from __future__ import annotations

import json
import logging
import re
import urllib.request
from typing import Any

from gateway.errors import PermanentError, TransientError
from gateway.odoo.errors import from_exception, from_odoo_error

log = logging.getLogger(__name__)

_REPR_IDS = re.compile(r"^[\w.]+\(([\d,\s]*)\)$")


def one_id(value: Any) -> int | None:
    """The single record id in any of Odoo's return shapes: 5, [5], "crm.lead(5,)"; None for False/None/[]."""
    if value is None or value is False:
        return None
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, (list, tuple)):
        return one_id(value[0]) if value else None
    if isinstance(value, str):
        m = _REPR_IDS.match(value.strip())
        if m:
            ids = [int(x) for x in m.group(1).replace(" ", "").split(",") if x]
            return ids[0] if ids else None
        if value.strip().isdigit():
            return int(value.strip())
    raise PermanentError(f"Odoo answered {value!r} where a record id was expected")


def m2o_id(value: Any) -> int | None:
    """A many2one as read() answers it ([id, name] or False) → id."""
    if isinstance(value, (list, tuple)):
        return int(value[0]) if value else None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def payload_size(obj: Any) -> int:
    """A cheap upper-bound estimate of an object's JSON size (without serialising it twice)."""
    if isinstance(obj, str):
        return len(obj) + 2 + obj.count('"') + obj.count("\\")
    if isinstance(obj, (bytes, bytearray)):
        return len(obj) * 2
    if isinstance(obj, dict):
        return 2 + sum(payload_size(k) + payload_size(v) + 2 for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return 2 + sum(payload_size(v) + 1 for v in obj)
    return 8


class OdooClient:
    """The gateway's view of Odoo. Thread-safe: workers share one client (the transport pools connections)."""

    protocol = "abstract"

    def __init__(self, *, url: str, db: str, login: str, secret: str, timeout: float = 30.0,
                 max_request_bytes: int = 64 * 1024 * 1024, pool_size: int = 4):
        self.url = url.rstrip("/")
        self.db = db
        self.login = login
        self._secret = secret
        self.timeout = timeout
        self.max_request_bytes = max_request_bytes
        self.pool_size = pool_size
        self.server_version: str | None = None

    # ---------------------------------------------------------------------- transport contract
    def _execute(self, model: str, method: str, ids: list[int] | None, params: dict[str, Any]) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        """Drop pooled connections."""

    def execute(self, model: str, method: str, ids: list[int] | None = None,
                params: dict[str, Any] | None = None) -> Any:
        """Call `model.method` (on `ids`) with named parameters; size-capped (Odoo enforces no limit)."""
        params = dict(params or {})
        size = payload_size(params)
        if size > self.max_request_bytes:
            raise PermanentError(
                f"Odoo {model}.{method}: request of about {size} bytes exceeds max_request_bytes "
                f"({self.max_request_bytes})", hint="raise [odoo] max_request_bytes if Odoo can take it")
        return self._execute(model, method, ids, params)

    # --------------------------------------------------------------------------------- ORM
    def search(self, model: str, domain: list[Any], *, limit: int | None = None,
               order: str | None = None) -> list[int]:
        params: dict[str, Any] = {"domain": domain}
        if limit:
            params["limit"] = limit
        if order:
            params["order"] = order
        return list(self.execute(model, "search", None, params) or [])

    def search_read(self, model: str, domain: list[Any], fields: list[str], *, limit: int | None = None,
                    order: str | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"domain": domain, "fields": fields}
        if limit:
            params["limit"] = limit
        if order:
            params["order"] = order
        return list(self.execute(model, "search_read", None, params) or [])

    def search_count(self, model: str, domain: list[Any]) -> int:
        return int(self.execute(model, "search_count", None, {"domain": domain}) or 0)

    def read(self, model: str, ids: list[int], fields: list[str]) -> list[dict[str, Any]]:
        return list(self.execute(model, "read", ids, {"fields": fields}) or [])

    def create(self, model: str, vals: dict[str, Any], *, context: dict[str, Any] | None = None) -> int:
        params: dict[str, Any] = {"vals_list": [vals]}
        if context:
            params["context"] = context
        rid = one_id(self.execute(model, "create", None, params))
        if rid is None:
            raise PermanentError(f"Odoo {model}.create returned no id")
        return rid

    def write(self, model: str, ids: list[int], vals: dict[str, Any]) -> bool:
        return bool(self.execute(model, "write", ids, {"vals": vals}))

    # --------------------------------------------------------------------------- mail.thread
    def message_process(self, raw: str, *, model: str | None = None, custom_values: dict[str, Any] | None = None,
                        thread_id: int | None = None,
                        context: dict[str, Any] | None = None) -> int | bool | None:
        """Hand a (7-bit) raw mail to Odoo's gateway. Returns thread id, False (duplicate/bounce/refusal) or
        None (dropped by a loop check) — the three answers mean different things to delivery.

        `model`/`custom_values`/`thread_id` are only Odoo's *fallback* when none of its aliases matched
        (spec §1.9); they must come from configuration, never from mail content (spec §5.9)."""
        params: dict[str, Any] = {"model": model or False, "message": raw}
        if model and custom_values:
            params["custom_values"] = custom_values
        if model and thread_id:
            params["thread_id"] = thread_id
        if context:
            params["context"] = context
        result = self.execute("mail.thread", "message_process", None, params)
        if result is None or result is False:
            return result
        return one_id(result)

    def message_new(self, model: str, msg_dict: dict[str, Any], custom_values: dict[str, Any] | None = None, *,
                    context: dict[str, Any] | None = None) -> int:
        params: dict[str, Any] = {"msg_dict": msg_dict, "custom_values": custom_values or {}}
        if context:
            params["context"] = context
        rid = one_id(self.execute(model, "message_new", None, params))
        if rid is None:
            raise PermanentError(f"Odoo {model}.message_new created no record")
        return rid

    def message_post(self, model: str, res_id: int, *, context: dict[str, Any] | None = None,
                     **kwargs: Any) -> int:
        if context:
            kwargs["context"] = context
        mid = one_id(self.execute(model, "message_post", [res_id], kwargs))
        if mid is None:
            raise PermanentError(f"Odoo {model}.message_post on {res_id} returned no message id")
        return mid

    def message_update(self, model: str, res_id: int, msg_dict: dict[str, Any]) -> bool:
        return bool(self.execute(model, "message_update", [res_id], {"msg_dict": msg_dict}))

    def message_subscribe(self, model: str, res_id: int, partner_ids: list[int]) -> bool:
        return bool(self.execute(model, "message_subscribe", [res_id], {"partner_ids": partner_ids}))

    # ------------------------------------------------------------------------------ lookups
    def find_messages(self, message_ids: list[str], fields: list[str] | None = None,
                      limit: int | None = None) -> list[dict[str, Any]]:
        """mail.message rows with one of these exact Message-IDs, newest (highest id) first."""
        if not message_ids:
            return []
        return self.search_read("mail.message", [("message_id", "in", list(message_ids))],
                                fields or ["model", "res_id", "message_id", "is_internal", "subtype_id"],
                                order="id desc", limit=limit)


def server_version_info(url: str, timeout: float) -> list[Any]:
    """`/web/webclient/version_info` (every Odoo since 8, no login): e.g. [17, 0, 0, 'final', 0, '']."""
    body = json.dumps({"jsonrpc": "2.0", "method": "call", "params": {}, "id": 1}).encode()
    req = urllib.request.Request(url.rstrip("/") + "/web/webclient/version_info", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            data = json.loads(resp.read())
    except Exception as exc:  # noqa: BLE001 - mapped to transient/permanent
        raise from_exception(exc, where="version_info", url=url) from None
    if data.get("error"):
        err = data["error"].get("data") or {}
        raise from_odoo_error(err.get("name", "error"), err.get("message", ""), where="version_info")
    return list((data.get("result") or {}).get("server_version_info") or [0])


def connect(odoo_config: Any, *, secret: str | None = None) -> OdooClient:
    """Build the client [odoo] asks for; `protocol = "auto"` picks JSON-2 on Odoo ≥ 19, /jsonrpc before."""
    from gateway.config import ConfigError, secret as read_secret

    cfg = odoo_config
    missing = [k for k in ("url", "db", "login") if not getattr(cfg, k)]
    if missing:
        raise ConfigError(None, [f"odoo.{k}: required to deliver to Odoo" for k in missing])
    key = secret if secret is not None else read_secret(cfg.password_env, required=True,
                                                       what="odoo password or API key")
    protocol = cfg.protocol
    if protocol == "auto":
        try:
            major = int(server_version_info(cfg.url, cfg.timeout)[0])
        except TransientError:
            raise
        protocol = "json2" if major >= 19 else "jsonrpc"
    common = dict(url=cfg.url, db=cfg.db, login=cfg.login, secret=key or "", timeout=cfg.timeout,
                  max_request_bytes=cfg.max_request_bytes, pool_size=cfg.pool_size)
    if protocol == "json2":
        from gateway.odoo.json2 import Json2Client

        return Json2Client(**common)
    from gateway.odoo.jsonrpc import JsonRpcClient

    return JsonRpcClient(**common)

"""The `/jsonrpc` transport through odoorpc (Odoo 14–21; deprecated in 19, removed in 22).

odoorpc calls `/web/webclient/version_info` once, logs in with `common.login`, reads `res.users.context_get`
and then sends every call as `object.execute_kw` with the password or API key (spec §6). One `odoorpc.ODOO`
per pooled slot: logins happen once per slot, never per mail, and workers never share a slot at the same time.
"""

from __future__ import annotations

import queue
import threading
import urllib.parse
from typing import Any

import odoorpc

from gateway.errors import DeliveryError, TransientError
from gateway.odoo.client import OdooClient
from gateway.odoo.errors import from_exception, from_odoo_error


class JsonRpcClient(OdooClient):
    protocol = "jsonrpc"

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        parts = urllib.parse.urlsplit(self.url)
        self._host = parts.hostname or "127.0.0.1"
        self._ssl = parts.scheme == "https"
        self._port = parts.port or (443 if self._ssl else 8069)
        self._idle: queue.LifoQueue[odoorpc.ODOO] = queue.LifoQueue()
        self._made = 0
        self._lock = threading.Lock()

    def _new_session(self) -> odoorpc.ODOO:
        where = "login"
        try:
            odoo = odoorpc.ODOO(self._host, protocol="jsonrpc+ssl" if self._ssl else "jsonrpc",
                                port=self._port, timeout=self.timeout)
            self.server_version = odoo.version
            odoo.login(self.db, self.login, self._secret)
        except odoorpc.error.RPCError as exc:
            info = exc.info if isinstance(getattr(exc, "info", None), dict) else {}
            data = info.get("data") or {}
            if not data:  # odoorpc's own "Wrong login ID or password"
                raise TransientError(f"Odoo login as {self.login!r} on database {self.db!r} refused: {exc}",
                                     hint="check [odoo] login/db and the password or API key in "
                                          "the environment; mail stays spooled") from None
            raise from_odoo_error(data.get("name", "error"), data.get("message", str(exc)), where=where) from None
        except DeliveryError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise from_exception(exc, where=where, url=self.url) from None
        return odoo

    def _borrow(self) -> odoorpc.ODOO:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            can_make = self._made < self.pool_size
            if can_make:
                self._made += 1
        if can_make:
            try:
                return self._new_session()
            except BaseException:
                with self._lock:
                    self._made -= 1
                raise
        try:
            return self._idle.get(timeout=self.timeout)
        except queue.Empty:
            raise TransientError(f"no free Odoo connection within {self.timeout}s (pool of {self.pool_size})",
                                 hint="raise [odoo] pool_size to the worker count") from None

    def _execute(self, model: str, method: str, ids: list[int] | None, params: dict[str, Any]) -> Any:
        odoo = self._borrow()
        where = f"{model}.{method}"
        try:
            return odoo.execute_kw(model, method, [ids] if ids is not None else [], params)
        except odoorpc.error.RPCError as exc:
            info = exc.info if isinstance(getattr(exc, "info", None), dict) else {}
            data = info.get("data") or {}
            raise from_odoo_error(data.get("name", "error"), data.get("message", str(exc)), where=where) from None
        except Exception as exc:  # noqa: BLE001 - network, HTTP, JSON decoding
            raise from_exception(exc, where=where, url=self.url) from None
        finally:
            self._idle.put(odoo)

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait()
            except queue.Empty:
                break
        with self._lock:
            self._made = 0

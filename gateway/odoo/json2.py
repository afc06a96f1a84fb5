"""Odoo 19's JSON-2 transport: `POST /json/2/<model>/<method>`, bearer API key, named arguments.

Why our own small client and not odoorpc: odoorpc only speaks `/jsonrpc`, deprecated in 19 and removed in 22.
Answers are the bare result; errors are an HTTP status plus ``{name, message, arguments, context, debug}``,
but some failures answer HTML (db-filter 404, 415, a crash in the error handler), so the body is parsed
defensively (spec §7). Keep-alive `http.client` connections are pooled, one per worker at a time.
"""

from __future__ import annotations

import http.client
import json
import queue
import time
import urllib.parse
from typing import Any

from gateway.errors import DeliveryError
from gateway.odoo.client import OdooClient
from gateway.odoo.errors import from_exception, from_http_status, from_odoo_error


#: seconds a kept-alive connection may sit idle in the pool before it is dropped instead of reused
IDLE_MAX = 15.0
#: methods that change nothing in Odoo: safe to resend when a reused connection turns out dead
READ_METHODS = frozenset({"search", "search_read", "search_count", "read", "fields_get", "has_group",
                          "context_get"})


class Json2Client(OdooClient):
    protocol = "json2"

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        parts = urllib.parse.urlsplit(self.url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")
        self._idle: queue.LifoQueue[tuple[float, http.client.HTTPConnection]] = queue.LifoQueue(
            maxsize=self.pool_size)

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        """(connection, reused?): idle connections older than IDLE_MAX are dropped — the server (or a proxy)
        has likely closed them, and a write sent on a dead connection would fail for nothing."""
        while True:
            try:
                since, conn = self._idle.get_nowait()
            except queue.Empty:
                break
            if time.monotonic() - since < IDLE_MAX:
                return conn, True
            conn.close()
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        return cls(self._host, self._port, timeout=self.timeout), False

    def _release(self, conn: http.client.HTTPConnection) -> None:
        try:
            self._idle.put_nowait((time.monotonic(), conn))
        except queue.Full:
            conn.close()

    def _execute(self, model: str, method: str, ids: list[int] | None, params: dict[str, Any]) -> Any:
        where = f"{model}.{method}"
        body = dict(params)
        if ids is not None:
            body["ids"] = list(ids)
        data = json.dumps(body).encode()
        headers = {"Authorization": f"bearer {self._secret}", "X-Odoo-Database": self.db,
                   "Content-Type": "application/json; charset=utf-8", "Content-Length": str(len(data))}
        path = f"{self._prefix}/json/2/{model}/{method}"
        conn, reused = self._connection()
        try:
            try:
                conn.request("POST", path, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                conn.close()
                if reused and method in READ_METHODS:
                    # A kept-alive connection closed by the server: a read is safe to send again at once.
                    # Writes are not: delivery's own checks on the next attempt decide whether it happened.
                    return self._execute(model, method, ids, params)
                raise from_exception(exc, where=where, url=self.url) from None
        except DeliveryError:
            raise
        except Exception as exc:  # noqa: BLE001
            conn.close()
            raise from_exception(exc, where=where, url=self.url) from None
        if resp.will_close:
            conn.close()
        else:
            self._release(conn)
        ctype = resp.getheader("Content-Type") or ""
        payload: Any = None
        parsed = False
        if "json" in ctype:
            try:
                payload, parsed = json.loads(raw), True
            except ValueError:  # an empty or cut-off body is no answer: from_http_status below
                pass
        if resp.status == 200 and parsed:
            return payload
        url = f"{self.url}/json/2/{model}/{method}"
        if isinstance(payload, dict) and payload.get("name"):
            raise from_odoo_error(str(payload["name"]), str(payload.get("message") or ""), where=where,
                                  status=resp.status, url=url)
        raise from_http_status(resp.status, raw, where=where, url=url)

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait()[1].close()
            except queue.Empty:
                break

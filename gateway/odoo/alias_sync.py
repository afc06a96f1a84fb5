"""Alias sync (optional, `[odoo] sync_aliases`): Odoo's `mail.alias` rows in the shape `aliases.load` merges.

`fetch_alias_rows(client)` reads `mail.alias` and resolves `alias_model_id` to technical model names through
`ir.model` (spec §3.2), and the alias domain names through `mail.alias.domain`; config wins on conflict in
`aliases.load.merge_aliases`. `AliasSync` caches the rows for `sync_interval` seconds so the router and the
RCPT check never wait for Odoo; when Odoo is down the last good rows are kept.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from gateway.errors import DeliveryError
from gateway.odoo.client import OdooClient, m2o_id

log = logging.getLogger(__name__)

ALIAS_FIELDS = ["alias_name", "alias_full_name", "alias_domain_id", "alias_model_id", "alias_defaults",
                "alias_force_thread_id", "alias_contact", "alias_incoming_local", "alias_bounced_content",
                "alias_parent_model_id", "alias_parent_thread_id"]


def fetch_alias_rows(client: OdooClient) -> list[dict[str, Any]]:
    """Odoo's aliases that name an address. Rows without `alias_name` are left out: Odoo 17 keeps one for
    every sales team and project whose alias is unset (`alias_name` False), and Odoo matches no mail to them;
    kept, each became the address `False@domain`, accepted at RCPT and routed to that team's model."""
    rows = [r for r in client.search_read("mail.alias", [("alias_model_id", "!=", False)], ALIAS_FIELDS)
            if r.get("alias_name")]
    model_ids = sorted({m for r in rows for m in (m2o_id(r.get("alias_model_id")), m2o_id(r.get("alias_parent_model_id")))
                        if m})
    models = {r["id"]: r["model"] for r in client.read("ir.model", model_ids, ["model"])} if model_ids else {}
    domain_ids = sorted({d for d in (m2o_id(r.get("alias_domain_id")) for r in rows) if d})
    domains = {r["id"]: r["name"] for r in client.read("mail.alias.domain", domain_ids, ["name"])} if domain_ids else {}
    out = []
    for r in rows:
        row = dict(r)
        row["model"] = models.get(m2o_id(r.get("alias_model_id")) or 0)
        row["parent_model"] = models.get(m2o_id(r.get("alias_parent_model_id")) or 0)
        dom = domains.get(m2o_id(r.get("alias_domain_id")) or 0)
        if dom:
            row["alias_domain"] = str(dom).lower()
            row["alias_full_name"] = f"{r.get('alias_name')}@{str(dom).lower()}"
        out.append(row)
    return out


class AliasSync:
    """Odoo alias rows, refreshed at most every `interval` seconds; stale rows are kept while Odoo is down."""

    def __init__(self, client: OdooClient, interval: float = 300.0):
        self.client = client
        self.interval = interval
        self._rows: list[dict[str, Any]] = []
        self._at = 0.0
        self._lock = threading.Lock()
        self.last_error: str | None = None
        #: a read of Odoo succeeded once: until then the (empty) rows say nothing about which aliases exist
        self.loaded = False

    def rows(self, *, force: bool = False) -> list[dict[str, Any]]:
        with self._lock:
            if force or time.monotonic() - self._at >= self.interval:
                try:
                    self._rows = fetch_alias_rows(self.client)
                    self.last_error = None
                    self.loaded = True
                except DeliveryError as exc:
                    self.last_error = str(exc)
                    log.warning("alias sync from Odoo failed; keeping %d known aliases: %s", len(self._rows), exc)
                self._at = time.monotonic()
            return list(self._rows)

"""Building the alias table: config aliases merged with aliases synced from Odoo's `mail.alias`.

Config wins on the same address: the sysadmin's file is the source of truth, Odoo's aliases fill the gaps
(a user who adds an alias in Odoo's UI should not need a gateway config change). Odoo rows that the gateway
cannot serve (no domain, a domain not configured here, an unknown contact policy, no model) are skipped
with a warning line the sync can log, never a crash. Pure: rows in, table and warnings out.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aliases.model import Alias, AliasTable
from aliases.policy import RULES


@dataclass(frozen=True)
class MergeResult:
    table: AliasTable
    added: tuple[str, ...]       # addresses taken from Odoo
    overridden: tuple[str, ...]  # Odoo addresses shadowed by config
    warnings: tuple[str, ...]


def _name_of(value: Any) -> str | None:
    """Odoo many2one over RPC is `[id, display_name]` or False; plain strings pass through."""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return str(value[1])
    if isinstance(value, str) and value:
        return value
    return None


def _defaults(value: Any) -> tuple[tuple[str, Any], ...]:
    if not value:
        return ()
    if isinstance(value, Mapping):
        return tuple(sorted(value.items()))
    try:
        parsed = ast.literal_eval(str(value))  # Odoo stores alias_defaults as a Python literal
    except (ValueError, SyntaxError):
        raise ValueError(f"alias_defaults is not a literal dict: {value!r}") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"alias_defaults is not a dict: {value!r}")
    return tuple(sorted(parsed.items()))


def alias_from_odoo_row(row: Mapping[str, Any]) -> Alias:
    """One `mail.alias` row (search_read dict) → Alias; raises ValueError with what is wrong.

    Expected keys: `alias_full_name` (or `alias_name` + `alias_domain`), `model` (the technical model name;
    the syncer resolves `alias_model_id`), optional `alias_defaults`, `alias_contact`,
    `alias_force_thread_id`, `alias_bounced_content`.
    """
    full = row.get("alias_full_name") or ""
    if not full or "@" not in str(full):
        name, domain = row.get("alias_name"), _name_of(row.get("alias_domain") or row.get("alias_domain_id"))
        if not name or not domain:
            raise ValueError(f"alias {row.get('alias_name') or full!r} has no domain (Odoo never matches it either)")
        full = f"{name}@{domain}"
    model = row.get("model") or row.get("alias_model_name")
    if not model or not isinstance(model, str):
        raise ValueError(f"alias {full!r} has no model")
    contact = row.get("alias_contact") or "everyone"
    if contact not in RULES:
        raise ValueError(f"alias {full!r}: unknown alias_contact {contact!r}")
    force = row.get("alias_force_thread_id") or None
    bounced = row.get("alias_bounced_content") or None
    parent_model = row.get("parent_model") or None
    parent_thread = row.get("alias_parent_thread_id") or None
    return Alias(address=str(full).lower(), model=model, defaults=_defaults(row.get("alias_defaults")),
                 contact=contact, force_thread_id=int(force) if force else None,
                 bounced_content=bounced if isinstance(bounced, str) else None, source="odoo",
                 incoming_local=bool(row.get("alias_incoming_local")),
                 parent_model=parent_model if isinstance(parent_model, str) else None,
                 parent_thread_id=int(parent_thread) if parent_model and parent_thread else None)


def merge_aliases(config_table: AliasTable, odoo_rows: Iterable[Mapping[str, Any]]) -> MergeResult:
    """Config aliases plus Odoo's; config wins on the same address; foreign-domain rows are skipped."""
    by_address = {a.address.lower(): a for a in config_table.aliases}
    added: list[str] = []
    overridden: list[str] = []
    warnings: list[str] = []
    extra: list[Alias] = []
    for row in odoo_rows:
        try:
            alias = alias_from_odoo_row(row)
        except ValueError as exc:
            warnings.append(f"skipped Odoo alias: {exc}")
            continue
        if config_table.domain(alias.domain) is None and not alias.incoming_local:
            # (an incoming_local alias still matches by local part in our domains, as in Odoo)
            warnings.append(f"skipped Odoo alias {alias.address}: domain {alias.domain} is not configured here")
            continue
        if alias.address in by_address:
            overridden.append(alias.address)
            continue
        if alias.address in added:
            warnings.append(f"Odoo alias {alias.address} appears twice; first one kept")
            continue
        added.append(alias.address)
        extra.append(alias)
    table = AliasTable(domains=config_table.domains, aliases=config_table.aliases + tuple(extra),
                       incoming_local_domains=config_table.incoming_local_domains)
    return MergeResult(table, tuple(added), tuple(overridden), tuple(warnings))


def build_table(config: Any, odoo_rows: Iterable[Mapping[str, Any]] = ()) -> AliasTable:
    """The table routing uses: `config.alias_table()` merged with synced Odoo rows."""
    return merge_aliases(config.alias_table(), odoo_rows).table

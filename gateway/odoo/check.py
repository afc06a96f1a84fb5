"""`mailgate check-config --odoo`: can the configured Odoo user do what delivery needs?

Why admin-level: with OCA automation_oca installed `message_process` rolls back for lesser users; a restricted
user's record rules hide duplicates, parents, bounced messages and partners from the gateway (spec §3.1); and
`ir.model` (for alias sync and the aliases' models) needs group_erp_manager, which group_system includes. Each
missing right comes back as one line saying what to grant, each config alias whose model this Odoo lacks as one
line naming the alias.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gateway.errors import DeliveryError
from gateway.odoo.client import OdooClient, connect, server_version_info

#: what delivery reads, and the group that grants it
READS = (
    ("mail.alias", "group_user", "alias sync and routing"),
    ("mail.alias.domain", "group_user", "bounce and catchall addresses"),
    ("mail.message", "group_user", "duplicate and thread look-ups"),
    ("mail.followers", "group_user", "author resolution and the followers contact policy"),
    ("res.partner", "group_user", "author resolution and bounce counters"),
    ("ir.model", "group_erp_manager (in group_system)", "alias sync: technical model names"),
)


def _is_admin(client: OdooClient, uid: int) -> bool | None:
    try:
        return bool(client.execute("res.users", "has_group", [uid], {"group_ext_id": "base.group_system"}))
    except DeliveryError:
        pass
    for field in ("groups_id", "group_ids"):  # renamed in Odoo 19
        try:
            gid = client.search_read("ir.model.data", [("module", "=", "base"), ("name", "=", "group_system")],
                                     ["res_id"], limit=1)
            if not gid:
                return None
            return client.search_count("res.users", [("id", "=", uid), (field, "in", [gid[0]["res_id"]])]) > 0
        except DeliveryError:
            continue
    return None


def check_client(client: OdooClient, *, url: str, login: str, aliases: Sequence[Any] = ()) -> dict[str, Any]:
    """Run the checks on a connected client: {"lines": [...], "problems": [...]}. `aliases` are the config's
    (`AliasConfig`): their models are looked up in `ir.model`."""
    lines: list[str] = []
    problems: list[str] = []
    try:
        major = int(server_version_info(url, client.timeout)[0])
        lines.append(f"Odoo {major} at {url}, protocol {client.protocol}")
        if major >= 19 and client.protocol == "jsonrpc":
            lines.append("note: /jsonrpc is deprecated on Odoo 19 and removed in 22; set [odoo] protocol = "
                         "\"json2\" with an API key")
    except DeliveryError as exc:
        return {"lines": lines, "problems": [f"odoo: {exc}"]}
    try:
        users = client.search_read("res.users", [("login", "=", login)], ["id", "name"], limit=1)
    except DeliveryError as exc:
        return {"lines": lines, "problems": [f"odoo: cannot log in or read res.users as {login!r}: {exc}"]}
    if not users:
        return {"lines": lines, "problems": [f"odoo: user {login!r} not found"]}
    uid = int(users[0]["id"])
    lines.append(f"logged in as {login!r} (uid {uid})")
    admin = _is_admin(client, uid)
    if admin is False:
        problems.append(f"odoo: user {login!r} is not in Settings / Administration (base.group_system): grant it "
                        "(message_process rolls back for lesser users with automation_oca; record rules hide "
                        "duplicates and partners)")
    elif admin is None:
        lines.append("could not tell whether the user is an administrator")
    else:
        lines.append("user has base.group_system")
    for model, group, why in READS:
        try:
            client.search_count(model, [])
            lines.append(f"can read {model}")
        except DeliveryError as exc:
            problems.append(f"odoo: cannot read {model} ({why}): needs {group}: {exc}")
    try:
        problems += missing_models(client, aliases)
    except DeliveryError as exc:  # ir.model unreadable: already a problem above
        lines.append(f"could not look up the aliases' models in ir.model: {exc}")
    return {"lines": lines, "problems": problems}


def missing_models(client: OdooClient, aliases: Sequence[Any]) -> list[str]:
    """One problem per config alias whose model is not in Odoo's `ir.model` (its module is not installed, or
    the name is misspelt): the config check can only see that the name is well-formed, and Odoo refuses
    every mail for a model it lacks, so without this the mistake shows only as failed deliveries."""
    wanted = sorted({a.model for a in aliases})
    if not wanted:
        return []
    found = {r["model"] for r in client.search_read("ir.model", [("model", "in", wanted)], ["model"])}
    return [f"odoo: aliases[{i}].model: {a.model!r} (alias {a.address}) is not a model in this Odoo (ir.model): "
            "install its module or fix the name"
            for i, a in enumerate(aliases) if a.model not in found]


def alias_lines(client: OdooClient, config: Any) -> list[str]:
    """The alias table merged with Odoo's `mail.alias` (config wins), one line per alias, for check-config."""
    from aliases.load import merge_aliases
    from gateway.odoo.alias_sync import fetch_alias_rows

    merged = merge_aliases(config.alias_table(), fetch_alias_rows(client))
    lines = [f"alias {a.address} -> {a.model} contact={a.contact} (odoo)"
             for a in merged.table.aliases if a.source == "odoo"]
    lines += [f"alias {addr} is also in Odoo; the config's definition wins" for addr in merged.overridden]
    lines += [f"alias sync: {w}" for w in merged.warnings]
    return lines


def check_odoo_access(config: Any) -> dict[str, Any]:
    """Connect with [odoo] and check the rights (and, with `sync_aliases`, show Odoo's aliases merged with the
    config's); never raises: problems are reported as lines."""
    try:
        client = connect(config.odoo)
    except Exception as exc:  # noqa: BLE001 - ConfigError (missing secret), TransientError (down)
        return {"lines": [], "problems": [f"odoo: cannot connect: {exc}"]}
    try:
        report = check_client(client, url=config.odoo.url, login=config.odoo.login, aliases=config.aliases)
        if config.odoo.sync_aliases and not report["problems"]:
            try:
                report["lines"] += alias_lines(client, config)
            except DeliveryError as exc:
                report["problems"].append(f"odoo: alias sync failed: {exc}")
        return report
    finally:
        client.close()

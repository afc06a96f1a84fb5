"""Alias sync (issue 4, optional): aliases defined only in Odoo's `mail.alias` are accepted at RCPT time and
routed, config wins on conflict, and Odoo being down keeps the last known table."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.config import load_config, parse_config
from gateway.pipeline import make_route_step, odoo_client
from gateway.serve import start_gateway
from gateway.spool import Envelope, get_message, spool_one
from gateway.store import open_store
from routing.model import Action
from tests.gateway_proc import to_toml
from tests.odoo_double import OdooDouble
from tests.smtp_wire import make_mail, rcpt_reply


def _config(tmp_path, odoo: OdooDouble, port: int = 0):  # type: ignore[no-untyped-def]
    return parse_config(_config_dict(tmp_path, odoo, port), base_dir=str(tmp_path))


def _config_dict(tmp_path, odoo: OdooDouble, port: int = 0) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    return {
        "listeners": [{"name": "smtp", "kind": "smtp", "host": "127.0.0.1", "port": port}],
        "storage": {"url": f"sqlite:///{tmp_path}/sync.db"},
        "admin": {"enabled": False},
        "domains": [{"name": "example.test", "strict": True}],
        "aliases": [{"address": "sales@example.test", "model": "crm.lead", "defaults": {"type": "opportunity"}}],
        "odoo": {"url": odoo.url, "db": "mailgate", "login": "admin", "protocol": "jsonrpc", "sync_aliases": True,
                 "sync_interval": 0.2},
        "worker": {"processes": 0},
    }


def test_route_step_uses_odoo_aliases_and_config_wins(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MAILGATE_ODOO_PASSWORD", "admin")
    odoo = OdooDouble().start()
    try:
        odoo.add_alias("billing", "helpdesk.ticket")
        config = _config(tmp_path, odoo)
        engine = open_store(config.storage_url())
        step = make_route_step(config, engine, odoo_client(config))
        raw = make_mail(message_id="<b1@client.test>").replace(b"To: sales@", b"To: billing@")
        ident = spool_one(engine, raw, Envelope("alice@client.test", ("billing@example.test",)))
        decision = step(raw, get_message(engine, ident))  # type: ignore[arg-type]
        assert decision.action == Action.CREATE
        assert [(t.model, t.alias) for t in decision.targets] == [("helpdesk.ticket", "billing@example.test")]
        # sales@ exists in both: the config's defaults win over Odoo's ({"type": "lead"} in the double)
        sales = step.current_table().alias("sales@example.test")
        assert sales is not None and dict(sales.defaults) == {"type": "opportunity"} and sales.source == "config"
        odoo.go_down()
        assert step.current_table().alias("billing@example.test") is not None  # last known rows are kept
    finally:
        odoo.stop()


class _Odoo17Aliases:
    """`mail.alias` as Odoo 17 answers it: beside a named alias, the nameless ones every sales team and
    project keeps (`alias_name` and `alias_full_name` False, the company's alias domain set)."""

    def search_read(self, model: str, domain: list[Any], fields: list[str], **_: Any) -> list[dict[str, Any]]:
        row = {"alias_domain_id": [1, "example.test"], "alias_defaults": "{}", "alias_force_thread_id": 0,
               "alias_contact": "everyone", "alias_incoming_local": False, "alias_bounced_content": False}
        return [{**row, "id": 1, "alias_name": "billing", "alias_full_name": "billing@example.test",
                 "alias_model_id": [11, "Ticket"]},
                {**row, "id": 2, "alias_name": False, "alias_full_name": False, "alias_model_id": [10, "Task"],
                 "alias_defaults": "{'project_id': 4}"},
                {**row, "id": 3, "alias_name": False, "alias_full_name": False, "alias_model_id": [12, "Lead"]}]

    def read(self, model: str, ids: list[int], fields: list[str]) -> list[dict[str, Any]]:
        if model == "ir.model":
            return [{"id": 10, "model": "project.task"}, {"id": 11, "model": "helpdesk.ticket"},
                    {"id": 12, "model": "crm.lead"}]
        return [{"id": 1, "name": "example.test"}]


def test_nameless_odoo_aliases_are_not_addresses() -> None:
    """A nameless alias was synced as `False@example.test`: RCPT accepted false@ and routed it to a task."""
    from aliases.load import build_table
    from aliases.resolve import rcpt_verdict
    from gateway.odoo.alias_sync import fetch_alias_rows

    rows = fetch_alias_rows(_Odoo17Aliases())  # type: ignore[arg-type]
    assert [r["alias_full_name"] for r in rows] == ["billing@example.test"]
    config = parse_config({"domains": [{"name": "example.test", "strict": True}]}, base_dir="/tmp")
    table = build_table(config, rows)
    assert rcpt_verdict(table, "false@example.test")[0] == "unknown_user"
    assert rcpt_verdict(table, "billing@example.test")[0] == "accept"


async def _rcpt(port: int, address: str) -> int:
    return (await rcpt_reply(port, address))[0]


async def _until_accepted(port: int, address: str) -> int:
    """The first sync runs in the background: RCPT until it is taken (or 5 s passed)."""
    for _ in range(50):
        code = await _rcpt(port, address)
        if code == 250:
            break
        await asyncio.sleep(0.1)
    return code


async def test_rcpt_time_table_includes_synced_aliases(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MAILGATE_ODOO_PASSWORD", "admin")
    odoo = OdooDouble().start()
    odoo.add_alias("billing", "helpdesk.ticket")
    gw = await start_gateway(_config(tmp_path, odoo), workers=False)
    try:
        port = gw.ports["smtp"]
        assert await _until_accepted(port, "billing@example.test") == 250
        assert await _rcpt(port, "nobody@example.test") == 550  # still strict
    finally:
        await gw.stop(drain_seconds=1)
        odoo.stop()


async def test_sighup_keeps_the_synced_aliases(tmp_path, monkeypatch) -> None:
    """A reload rebuilds the RCPT table from the new file *and* the last rows synced from Odoo. Rebuilding it
    from the file alone answered 550 5.1.1 (permanent: senders give up) to every Odoo-only alias until the
    next successful sync — for as long as Odoo stayed down."""
    monkeypatch.setenv("MAILGATE_ODOO_PASSWORD", "admin")
    odoo = OdooDouble().start()
    odoo.add_alias("billing", "helpdesk.ticket")
    cfg = _config_dict(tmp_path, odoo)
    path = tmp_path / "mailgate.toml"
    path.write_text(to_toml(cfg))
    gw = await start_gateway(load_config(str(path)), config_path=str(path), workers=False)
    try:
        port = gw.ports["smtp"]
        assert await _until_accepted(port, "billing@example.test") == 250
        odoo.go_down()  # no sync can refresh the table after the reload
        cfg["aliases"].append({"address": "orders@example.test", "model": "sale.order"})
        path.write_text(to_toml(cfg))
        reloads = gw.reloaded
        gw.reload()
        assert gw.reloaded == reloads + 1
        assert await _rcpt(port, "orders@example.test") == 250   # the file's new alias
        assert await _rcpt(port, "billing@example.test") == 250  # Odoo's, from the last sync
        assert await _rcpt(port, "nobody@example.test") == 550
    finally:
        await gw.stop(drain_seconds=1)
        odoo.stop()


def test_reload_turns_the_route_steps_sync_on_and_off(tmp_path) -> None:
    """SIGHUP kept the sync built at start: turned off, routing still found Odoo's aliases (that RCPT now
    refused); turned on, the step had no sync and never read Odoo."""
    from gateway.pipeline import RouteStep

    def config(sync: bool):  # type: ignore[no-untyped-def]
        return parse_config({"domains": [{"name": "example.test", "strict": True}],
                             "odoo": {"url": "http://odoo.invalid", "sync_aliases": sync}}, base_dir=str(tmp_path))

    step = RouteStep(config(False), open_store(f"sqlite:///{tmp_path}/r.db"), _Odoo17Aliases())
    assert step.current_table().alias("billing@example.test") is None
    step.reload(config(True))
    assert step.current_table().alias("billing@example.test") is not None
    step.reload(config(False))
    assert step.current_table().alias("billing@example.test") is None


async def test_sighup_turns_the_rcpt_sync_on_and_off(tmp_path, monkeypatch) -> None:
    """The RCPT-time sync follows a reload: it was started only when the start config had it on."""
    monkeypatch.setenv("MAILGATE_ODOO_PASSWORD", "admin")
    odoo = OdooDouble().start()
    odoo.add_alias("billing", "helpdesk.ticket")
    cfg = _config_dict(tmp_path, odoo)
    cfg["odoo"]["sync_aliases"] = False
    path = tmp_path / "mailgate.toml"
    path.write_text(to_toml(cfg))
    gw = await start_gateway(load_config(str(path)), config_path=str(path), workers=False)
    try:
        port = gw.ports["smtp"]
        assert await _rcpt(port, "billing@example.test") == 550
        cfg["odoo"]["sync_aliases"] = True
        path.write_text(to_toml(cfg))
        gw.reload()
        assert await _until_accepted(port, "billing@example.test") == 250
        cfg["odoo"]["sync_aliases"] = False
        path.write_text(to_toml(cfg))
        gw.reload()
        assert await _rcpt(port, "billing@example.test") == 550
    finally:
        await gw.stop(drain_seconds=1)
        odoo.stop()


async def test_unknown_address_is_refused_temporarily_until_the_first_sync(tmp_path, monkeypatch) -> None:
    """Odoo down at start: the table held the config's aliases only, and Odoo's were answered 550 5.1.1 —
    senders bounced the mail — until Odoo came back. Until one sync succeeded, what a strict domain does not
    know is now 451 (the sender retries); afterwards, strict again."""
    monkeypatch.setenv("MAILGATE_ODOO_PASSWORD", "admin")
    odoo = OdooDouble().start()
    odoo.add_alias("billing", "helpdesk.ticket")
    odoo.go_down()
    gw = await start_gateway(_config(tmp_path, odoo), workers=False)
    try:
        port = gw.ports["smtp"]
        await asyncio.sleep(0.5)  # a few failed syncs (sync_interval 0.2)
        code, text = await rcpt_reply(port, "billing@example.test")
        assert code == 451 and "not loaded from Odoo yet" in text, text
        assert (await rcpt_reply(port, "nobody@example.test"))[0] == 451
        assert await _rcpt(port, "sales@example.test") == 250  # the config's aliases are known
        assert await _rcpt(port, "x@elsewhere.test") == 550     # and foreign domains refused as ever
        odoo.come_up()
        assert await _until_accepted(port, "billing@example.test") == 250
        assert await _rcpt(port, "nobody@example.test") == 550
        odoo.go_down()  # later failures keep the last rows: strict, not "not loaded"
        await asyncio.sleep(0.5)
        assert await _rcpt(port, "nobody@example.test") == 550
        assert await _rcpt(port, "billing@example.test") == 250
    finally:
        await gw.stop(drain_seconds=1)
        odoo.stop()


def test_synced_alias_carries_its_parent_record_to_the_route() -> None:
    """A project's task alias (`followers`, parent: the project) reaches the router with the record whose
    followers may write; without it, explicit delivery refused every sender."""
    from aliases.load import build_table
    from routing.router import _alias_target

    class WithParent(_Odoo17Aliases):
        def search_read(self, model: str, domain: list[Any], fields: list[str], **kw: Any) -> list[dict[str, Any]]:
            assert "alias_parent_model_id" in fields and "alias_parent_thread_id" in fields
            row = super().search_read(model, domain, fields, **kw)[0]
            return [{**row, "alias_name": "apollo", "alias_full_name": "apollo@example.test",
                     "alias_model_id": [10, "Task"], "alias_contact": "followers",
                     "alias_parent_model_id": [13, "Project"], "alias_parent_thread_id": 4}]

        def read(self, model: str, ids: list[int], fields: list[str]) -> list[dict[str, Any]]:
            if model == "ir.model":
                return [r for r in [{"id": 10, "model": "project.task"}, {"id": 13, "model": "project.project"}]
                        if r["id"] in ids]
            return super().read(model, ids, fields)

    from gateway.odoo.alias_sync import fetch_alias_rows

    config = parse_config({"domains": [{"name": "example.test", "strict": True}]}, base_dir="/tmp")
    table = build_table(config, fetch_alias_rows(WithParent()))  # type: ignore[arg-type]
    [alias] = [a for a in table.aliases if a.address == "apollo@example.test"]
    target = _alias_target(alias)
    assert (target.model, target.contact) == ("project.task", "followers")
    assert target.follow_record() == ("project.project", 4)


def test_mail_routed_before_odoos_aliases_were_ever_read_waits_instead_of_quarantine(tmp_path) -> None:
    """Odoo down since start: routing had the config's aliases only, so mail to an alias that exists only
    in Odoo (in a domain that is not strict: RCPT took it) found no route and was quarantined. It now waits
    (a transient error, retried) until the alias list was read once; then it routes to Odoo's alias."""
    from gateway.errors import DeliveryError, TransientError
    from gateway.pipeline import RouteStep

    class Down(_Odoo17Aliases):
        up = False

        def search_read(self, *args: Any, **kw: Any) -> list[dict[str, Any]]:
            if not self.up:
                raise DeliveryError("Odoo unreachable (simulated)")
            return super().search_read(*args, **kw)

    config = parse_config({"domains": [{"name": "example.test"}],
                           "odoo": {"url": "http://odoo.invalid", "sync_aliases": True}}, base_dir=str(tmp_path))
    engine = open_store(f"sqlite:///{tmp_path}/w.db")
    raw = make_mail(message_id="<bill-1@client.test>").replace(b"To: sales@example.test", b"To: billing@example.test")
    message = get_message(engine, spool_one(engine, raw, Envelope("a@client.test", ("billing@example.test",))))
    odoo = Down()
    step = RouteStep(config, engine, odoo)
    with pytest.raises(TransientError, match="never loaded"):
        step(raw, message)
    odoo.up = True
    step.sync._at = 0.0  # type: ignore[union-attr]  # (the next read is due)
    decision = step(raw, message)
    assert [t.model for t in decision.targets] == ["helpdesk.ticket"]

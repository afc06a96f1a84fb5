"""Alias sync (issue 4, optional): aliases defined only in Odoo's `mail.alias` are accepted at RCPT time and
routed, config wins on conflict, and Odoo being down keeps the last known table."""

from __future__ import annotations

import asyncio

from gateway.config import parse_config
from gateway.pipeline import make_route_step, odoo_client
from gateway.serve import start_gateway
from gateway.spool import Envelope, get_message, spool_one
from gateway.store import open_store
from routing.model import Action
from tests.odoo_double import OdooDouble
from tests.smtp_wire import WireClient, make_mail


def _config(tmp_path, odoo: OdooDouble, port: int = 0):  # type: ignore[no-untyped-def]
    return parse_config({
        "listeners": [{"name": "smtp", "kind": "smtp", "host": "127.0.0.1", "port": port}],
        "storage": {"url": f"sqlite:///{tmp_path}/sync.db"},
        "admin": {"enabled": False},
        "domains": [{"name": "example.test", "strict": True}],
        "aliases": [{"address": "sales@example.test", "model": "crm.lead", "defaults": {"type": "opportunity"}}],
        "odoo": {"url": odoo.url, "db": "mailgate", "login": "admin", "protocol": "jsonrpc", "sync_aliases": True,
                 "sync_interval": 0.2},
        "worker": {"processes": 0},
    }, base_dir=str(tmp_path))


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


async def test_rcpt_time_table_includes_synced_aliases(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MAILGATE_ODOO_PASSWORD", "admin")
    odoo = OdooDouble().start()
    odoo.add_alias("billing", "helpdesk.ticket")
    gw = await start_gateway(_config(tmp_path, odoo), workers=False)
    try:
        port = gw.ports["smtp"]
        for _ in range(50):  # the first sync runs in the background
            c = await WireClient.connect("127.0.0.1", port)
            await c.reply()
            await c.cmd("EHLO t.test")
            await c.cmd("MAIL FROM:<a@client.test>")
            code, _ = await c.cmd("RCPT TO:<billing@example.test>")
            await c.close()
            if code == 250:
                break
            await asyncio.sleep(0.1)
        assert code == 250
        c = await WireClient.connect("127.0.0.1", port)
        await c.reply()
        await c.cmd("EHLO t.test")
        await c.cmd("MAIL FROM:<a@client.test>")
        assert (await c.cmd("RCPT TO:<nobody@example.test>"))[0] == 550  # still strict
        await c.close()
    finally:
        await gw.stop(drain_seconds=1)
        odoo.stop()

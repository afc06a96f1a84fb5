"""`mailgate dead list|retry`."""

from __future__ import annotations

from pathlib import Path

from gateway.cli import main
from gateway.spool import Envelope, get_message, spool_one, transition
from gateway.store import open_store


def test_dead_list_and_retry(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    cfg = tmp_path / "mailgate.toml"
    cfg.write_text('[storage]\nurl = "sqlite:///mg.db"\n\n[[domains]]\nname = "example.test"\n')
    engine = open_store(f"sqlite:///{tmp_path}/mg.db")
    dead = spool_one(engine, b"Subject: x\r\nMessage-ID: <d@x>\r\n\r\nx\r\n", Envelope("a@x", ("s@example.test",)))
    live = spool_one(engine, b"Subject: y\r\n\r\ny\r\n", Envelope("a@x", ("s@example.test",)))
    transition(engine, dead, "dead", error="Odoo crm.lead.message_new: odoo.exceptions.AccessError: no")
    assert main(["dead", "list", "-c", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert f"{dead:>8}" in out and "AccessError" in out and f"{live:>8}" not in out
    assert main(["dead", "retry", "-c", str(cfg), str(live)]) == 1   # not dead: left alone
    assert get_message(engine, live).state == "received"              # type: ignore[union-attr]
    assert main(["dead", "retry", "-c", str(cfg), str(dead)]) == 0
    assert get_message(engine, dead).state == "received"              # type: ignore[union-attr]
    assert main(["dead", "retry", "-c", str(cfg)]) == 2

"""`mailgate explain` and `mailgate quarantine` end to end through gateway.cli.main."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "routing"
CONFIG = str(FIXTURES / "mailgate.toml")


def _write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_bytes(text.strip().replace("\n", "\r\n").encode() + b"\r\n\r\nbody\r\n")
    return str(path)


def test_explain_json_contract_one_line_per_file(tmp_path, capsys):
    a = _write(tmp_path, "a.eml", "From: x@client.net\nTo: catchall@example.com\nCc: Sales+VIP@Example.COM\n"
                                  "Message-ID: <a@client.net>\nSubject: quote")
    b = _write(tmp_path, "b.eml", "From: x@client.net\nTo: nobody@example.com\nMessage-ID: <b@client.net>")
    assert main(["explain", "--config", CONFIG, "--json", a, b]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert {"file", "action", "explanation", "targets", "bounces"} <= set(first)
    assert first["file"] == a and first["action"] == "create" and first["tag"] == "vip"
    assert first["targets"] == [{"model": "crm.lead", "alias": "sales@example.com", "defaults": {"team_id": 3}}]
    assert first["bounces"] == [] and "complaint" not in first
    assert second["action"] == "quarantine" and "tag" not in second
    assert any("no route" in line for line in second["explanation"])


def test_explain_rcpt_overrides_headers(tmp_path, capsys):
    f = _write(tmp_path, "c.eml", "From: x@client.net\nTo: nobody@example.com\nMessage-ID: <c@client.net>")
    main(["explain", "-c", CONFIG, "--json", "--rcpt", "jobs@example.com", f])
    out = json.loads(capsys.readouterr().out)
    assert out["action"] == "create" and out["targets"][0]["model"] == "hr.applicant"
    assert out["targets"][0]["contact"] == "partners"


def test_explain_delivered_to_is_the_envelope_when_no_rcpt(tmp_path, capsys):
    f = _write(tmp_path, "d.eml", "From: x@client.net\nDelivered-To: groups@example.com\nTo: list@lists.org\n"
                                  "Message-ID: <d@client.net>")
    main(["explain", "-c", CONFIG, "--json", f])
    out = json.loads(capsys.readouterr().out)
    assert out["recipients"] == ["groups@example.com"] and out["action"] == "create"


def test_explain_thread_option_and_text_output(tmp_path, capsys):
    f = _write(tmp_path, "e.eml", "From: x@client.net\nTo: catchall@example.com\nIn-Reply-To: <p@odoo>\n"
                                  "Message-ID: <e@client.net>")
    main(["explain", "-c", CONFIG, "--thread", "<p@odoo>=crm.lead:7", f])
    out = capsys.readouterr().out
    assert "reply" in out and "→ crm.lead 7" in out and "<p@odoo> matches crm.lead 7" in out


def test_explain_unreadable_file_exit_1(tmp_path, capsys):
    assert main(["explain", "-c", CONFIG, str(tmp_path / "missing.eml")]) == 1
    assert "cannot read" in capsys.readouterr().err


@pytest.fixture
def store_config(tmp_path):
    cfg = tmp_path / "mailgate.toml"
    cfg.write_text((FIXTURES / "mailgate.toml").read_text().replace("mailgate-test.db", "q.db"))
    return str(cfg)


def _quarantined(config_path: str) -> int:
    from gateway.config import load_config
    from gateway.spool import Envelope, spool_one, transition
    from gateway.store import open_configured_store

    engine = open_configured_store(load_config(config_path))  # what serve does: create and migrate the store
    raw = b"From: x@client.net\r\nTo: nobody@example.com\r\nMessage-ID: <q@client.net>\r\n\r\nhi\r\n"
    ident = spool_one(engine, raw, Envelope(mail_from="x@client.net", rcpt_tos=("nobody@example.com",)))
    transition(engine, ident, "quarantined", decision={"action": "quarantine", "reason": "no alias matched",
                                                       "explanation": ["no route: no alias matched"]})
    return ident


def test_quarantine_list_show_release_delete(store_config, capsys):
    ident = _quarantined(store_config)
    assert main(["quarantine", "list", "-c", store_config, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["id"], r["reason"], r["rcpt_tos"]) for r in rows] == [(ident, "no alias matched", ["nobody@example.com"])]

    assert main(["quarantine", "show", str(ident), "-c", store_config]) == 0
    out = capsys.readouterr().out
    assert "no alias matched" in out and "Message-ID: <q@client.net>" in out and "history:" in out

    assert main(["quarantine", "release", str(ident), "-c", store_config]) == 0
    assert "released" in capsys.readouterr().out
    from gateway.cli import open_engine
    from gateway.config import load_config
    from gateway.spool import get_message

    assert get_message(open_engine(load_config(store_config)), ident).state == "received"
    # no longer quarantined: show/delete refuse with exit 1
    assert main(["quarantine", "delete", str(ident), "-c", store_config]) == 1
    assert "not quarantined" in capsys.readouterr().err


def test_quarantine_delete_and_unknown_id(store_config, capsys):
    ident = _quarantined(store_config)
    assert main(["quarantine", "delete", str(ident), "-c", store_config, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"id": ident, "deleted": True}
    assert main(["quarantine", "show", str(ident), "-c", store_config]) == 1
    assert main(["quarantine", "list", "-c", store_config]) == 0
    assert "no quarantined mail" in capsys.readouterr().out


def test_route_raw_is_the_worker_entry_with_config_limits():
    from aliases.load import build_table
    from gateway.config import load_config
    from gateway.explain import route_raw
    from routing.model import RoutingEnvelope

    config = load_config(CONFIG)
    raw = b"From: x@client.net\r\nTo: nobody@example.com\r\nMessage-ID: <w@client.net>\r\n\r\nhi\r\n"
    parsed, d = route_raw(raw, RoutingEnvelope(rcpt_tos=("groups@example.com",)), table=build_table(config),
                          config=config)
    assert parsed.message_id == "<w@client.net>"
    assert d.action.value == "create" and d.targets[0].alias == "groups@example.com"
    tight = config.model_copy(update={"routing": config.routing.model_copy(update={"max_headers": 1})})
    _parsed, d = route_raw(raw, RoutingEnvelope(rcpt_tos=("groups@example.com",)), table=build_table(config),
                           config=tight)
    assert d.action.value == "quarantine" and d.reason == "limits: too many headers"


def _exit_code(argv: list[str]) -> int:
    """main()'s exit status, whether returned or raised (load_or_exit and open_engine exit directly)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def test_operator_commands_check_the_schema_and_never_migrate(store_config, tmp_path, capsys):
    """A newer `mailgate` run by hand (messages list, dead list, quarantine ...) must not change the schema
    under a running older gateway: it says what to do and exits 1. `mailgate migrate` migrates."""
    from sqlalchemy import text

    from gateway.config import load_config
    from gateway.migrate import current, head, upgrade
    from gateway.store import make_engine

    url = load_config(store_config).storage_url()
    assert _exit_code(["messages", "list", "-c", store_config]) == 1
    assert "run `mailgate migrate" in capsys.readouterr().err
    assert not (tmp_path / "q.db").exists()  # not even an empty file was created

    engine = make_engine(url)
    upgrade(engine, "0002")
    for argv in (["messages", "list"], ["dead", "list"], ["quarantine", "list"], ["messages", "show", "1"]):
        assert _exit_code([*argv, "-c", store_config]) == 1
        err = capsys.readouterr().err
        assert "revision 0002" in err and "run `mailgate migrate" in err
    assert current(engine) == "0002"

    assert main(["migrate", "-c", store_config]) == 0
    assert f"from 0002 to {head()}" in capsys.readouterr().out
    assert current(engine) == head()
    assert main(["quarantine", "list", "-c", store_config]) == 0

    with engine.begin() as conn:  # a newer mailgate migrated the database
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    for argv in (["messages", "list"], ["migrate"], ["worker"], ["serve"]):  # serve/worker: before any listener
        assert _exit_code([*argv, "-c", store_config]) == 1
        assert "this mailgate is older than the database" in capsys.readouterr().err
    assert current(engine) == "9999"
    engine.dispose()

"""Operator commands against a store: listings that page and stream, argument bounds, stores that cannot be
opened, and what `check-config` prints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import Engine

from gateway.cli import main
from gateway.spool import Envelope, spool_one, transition
from gateway.store import open_store


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    """(config path, engine) of a SQLite store with nothing in it."""
    cfg = tmp_path / "mailgate.toml"
    cfg.write_text('[storage]\nurl = "sqlite:///mg.db"\n\n[[domains]]\nname = "example.test"\n')
    engine = open_store(f"sqlite:///{tmp_path}/mg.db")
    yield str(cfg), engine
    engine.dispose()


def _spool(engine: Engine, n: int) -> list[int]:
    return [spool_one(engine, f"Message-ID: <m{i}@x>\r\nSubject: {i}\r\n\r\nbody\r\n".encode(),
                      Envelope("a@client.test", ("s@example.test",))) for i in range(n)]


def _exit_code(argv: list[str]) -> int:
    """What `mailgate ARGV` exits with (main returns it, or raises SystemExit)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def _listed(capsys) -> list[int]:  # type: ignore[no-untyped-def]
    return [json.loads(line)["id"] for line in capsys.readouterr().out.splitlines()]


def test_messages_list_shows_the_newest_oldest_first_and_pages_forward(store, capsys) -> None:  # type: ignore[no-untyped-def]
    cfg, engine = store
    ids = _spool(engine, 7)
    transition(engine, ids[6], "delivered")
    assert main(["messages", "list", "-c", cfg, "--json", "--limit", "3"]) == 0
    assert _listed(capsys) == ids[4:]
    assert main(["messages", "list", "-c", cfg, "--json", "--limit", "2", "--state", "received"]) == 0
    assert _listed(capsys) == ids[4:6]
    assert main(["messages", "list", "-c", cfg, "--json", "--after", str(ids[1]), "--limit", "3"]) == 0
    assert _listed(capsys) == ids[2:5]
    assert main(["messages", "list", "-c", cfg, "--json", "--after", "0", "--limit", "100"]) == 0
    assert _listed(capsys) == ids
    assert main(["messages", "list", "-c", cfg, "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    first = json.loads(lines[0])
    assert len(lines) == 7 and first["id"] == ids[0]  # fewer than the default 100: all of them
    assert {"id", "state", "message_id", "mail_from", "rcpt_tos", "sha256", "size"} <= set(first)
    assert first["message_id"] == "<m0@x>" and first["rcpt_tos"] == ["s@example.test"] and "decision" not in first


@pytest.mark.parametrize("argv", [["messages", "list", "--limit", "-1"], ["messages", "list", "--limit", "0"],
                                  ["messages", "list", "--after", "-5"], ["quarantine", "list", "--limit", "-1"],
                                  ["dead", "list", "--limit", "0"]])
def test_list_limits_below_one_are_usage_errors(store, argv, capsys) -> None:  # type: ignore[no-untyped-def]
    """SQLite reads LIMIT -1 as "no limit": `--limit -1` printed the whole spool."""
    cfg, engine = store
    _spool(engine, 3)
    with pytest.raises(SystemExit) as exc:
        main([*argv, "-c", cfg])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "out of range" in captured.err


def test_iter_messages_reads_in_chunks_up_to_the_limit(store, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A long listing is read a chunk at a time (each in its own short read), not as one list."""
    import gateway.spool
    from gateway.spool import iter_messages, list_messages, newest_after_id

    _, engine = store
    ids = _spool(engine, 5)
    asked: list[int] = []

    def recording(engine, **kw):  # type: ignore[no-untyped-def]
        asked.append(kw["limit"])
        return list_messages(engine, **kw)

    monkeypatch.setattr(gateway.spool, "list_messages", recording)
    assert [m.id for m in iter_messages(engine, chunk=2)] == ids and asked == [2, 2, 2]
    asked.clear()
    assert [m.id for m in iter_messages(engine, chunk=2, limit=3)] == ids[:3] and asked == [2, 1]
    assert [m.id for m in iter_messages(engine, after_id=newest_after_id(engine, 2), limit=2)] == ids[3:]
    assert newest_after_id(engine, 9) == 0
    with pytest.raises(ValueError):
        list_messages(engine, limit=-1)


def test_check_config_masks_the_store_password(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    cfg = tmp_path / "pg.toml"
    cfg.write_text('[storage]\nurl = "postgresql+psycopg2://mailgate:s3cr%40t@db.internal:5432/mailgate"\n\n'
                   '[[domains]]\nname = "example.test"\n')
    main(["check-config", "-c", str(cfg)])
    captured = capsys.readouterr()
    assert "storage: postgresql+psycopg2://mailgate:***@db.internal:5432/mailgate" in captured.out
    assert "s3cr" not in captured.out + captured.err


@pytest.mark.parametrize("kind", ["not a database", "a directory", "unreachable server"])
@pytest.mark.parametrize("command", [["messages", "list"], ["migrate"], ["events", "tail"]])
def test_a_store_that_cannot_be_opened_is_one_line_and_exit_1(tmp_path: Path, capsys, kind, command) -> None:  # type: ignore[no-untyped-def]
    db = tmp_path / "var" / "mg.db"
    db.parent.mkdir()
    url = f"sqlite:///{db}"
    if kind == "not a database":
        db.write_bytes(b"this is not sqlite at all\n" * 10)
    elif kind == "a directory":
        db.mkdir()
    else:
        url = "postgresql+psycopg2://mailgate:s3cret@127.0.0.1:1/mailgate"  # nothing listens on port 1
    cfg = tmp_path / "mailgate.toml"
    cfg.write_text(f'[storage]\nurl = "{url}"\n\n[[domains]]\nname = "example.test"\n')
    assert _exit_code([*command, "-c", str(cfg)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    masked = url.replace("s3cret", "***")
    assert err and all(line.startswith(f"{masked}: cannot open store: ") for line in err), err
    assert "Traceback" not in "\n".join(err) and "s3cret" not in "\n".join(err)


def test_check_config_contacts_odoo_only_with_the_odoo_flag(tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    """--odoo did nothing: Odoo was logged in to whenever [odoo] url was set, and never without it."""
    import gateway.odoo.check

    calls: list[str] = []

    def fake(config):  # type: ignore[no-untyped-def]
        calls.append(config.odoo.url)
        return {"problems": [], "lines": ["logged in as mailgate"]}

    monkeypatch.setattr(gateway.odoo.check, "check_odoo_access", fake)
    cfg = tmp_path / "mailgate.toml"
    cfg.write_text(f'[storage]\nurl = "sqlite:///{tmp_path}/mg.db"\n\n[[domains]]\nname = "example.test"\n\n'
                   '[odoo]\nurl = "http://127.0.0.1:9"\ndb = "odoo"\n')
    main(["check-config", "-c", str(cfg)])
    assert calls == [] and "odoo:" not in capsys.readouterr().out
    main(["check-config", "-c", str(cfg), "--odoo"])
    assert calls == ["http://127.0.0.1:9"] and "odoo: logged in as mailgate" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    ["messages", "show", "99999999999999999999999"], ["messages", "show", "0"],
    ["messages", "list", "--after", "99999999999999999999999"], ["quarantine", "show", "99999999999999999999999"],
    ["quarantine", "release", "9223372036854775808"], ["quarantine", "delete", "-1"],
    ["quarantine", "list", "--after", "99999999999999999999999"], ["dead", "retry", "99999999999999999999999"],
    ["dead", "list", "--after", "99999999999999999999999"], ["events", "replay", "--subscriber", "x", "--since",
                                                             "99999999999999999999999"],
])
def test_ids_past_the_stores_range_are_usage_errors(store, argv, capsys) -> None:  # type: ignore[no-untyped-def]
    """An id the database cannot hold was an OverflowError traceback from the driver."""
    cfg, _ = store
    assert _exit_code([*argv, "-c", cfg]) == 2
    assert "out of range" in capsys.readouterr().err


def test_the_largest_id_is_just_not_found(store, capsys) -> None:  # type: ignore[no-untyped-def]
    cfg, _ = store
    assert _exit_code(["messages", "show", str(2**63 - 1), "-c", cfg]) == 1
    assert "no message 9223372036854775807" in capsys.readouterr().err


@pytest.mark.parametrize("days", ["-1", "99999999999"])
def test_purge_refuses_a_negative_or_absurd_age(store, days, capsys) -> None:  # type: ignore[no-untyped-def]
    """`--older-than-days -1` put the cutoff in the future and purged every finished body, fresh quarantined
    mail included."""
    from gateway.spool import get_raw

    cfg, engine = store
    [ident] = _spool(engine, 1)
    transition(engine, ident, "quarantined")
    assert _exit_code(["messages", "purge", "-c", cfg, "--older-than-days", days]) == 2
    assert "out of range" in capsys.readouterr().err
    assert get_raw(engine, ident) is not None
    assert _exit_code(["messages", "purge", "-c", cfg, "--older-than-days", "0"]) == 0
    assert get_raw(engine, ident) is None


@pytest.mark.parametrize("argv", [["quarantine", "release"], ["quarantine", "delete"], ["dead", "retry"]])
def test_a_stale_state_check_cannot_touch_delivered_mail(store, monkeypatch, argv, capsys) -> None:  # type: ignore[no-untyped-def]
    """The commands checked the state in a transaction of their own, then released (delivered included) or
    deleted by id alone: mail delivered in between was routed again, or deleted. The state is now part of the
    UPDATE/DELETE. Here the check is made to see a stale state."""
    import dataclasses

    import gateway.spool
    from gateway.spool import get_message, get_raw

    cfg, engine = store
    [ident] = _spool(engine, 1)
    transition(engine, ident, "delivered")
    real = gateway.spool.get_message
    stale = "dead" if argv[0] == "dead" else "quarantined"
    monkeypatch.setattr(gateway.spool, "get_message",
                        lambda e, i: dataclasses.replace(real(e, i), state=stale))  # type: ignore[arg-type]
    assert _exit_code([*argv, "-c", cfg, str(ident)]) == 1
    monkeypatch.undo()
    assert get_message(engine, ident).state == "delivered"  # type: ignore[union-attr]
    assert get_raw(engine, ident) is not None


def test_check_config_names_each_secret_variable_serve_would_miss(tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    """check-config said OK while `serve` could not start its relay: the VERP/tracking secret, the smarthost
    password and a webhook's signing secret are read from the environment only at start. Run as
    ExecStartPre (same environment), it must name each missing variable; and say what a submission listener
    without a certificate does with AUTH."""
    for name in ("MG_TEST_SECRET", "MG_TEST_SMARTHOST_PW", "MG_TEST_HOOK", "MG_TEST_ODOO_PW"):
        monkeypatch.delenv(name, raising=False)
    cfg = tmp_path / "mailgate.toml"
    cfg.write_text(
        f'[storage]\nurl = "sqlite:///{tmp_path}/mg.db"\n\n[[domains]]\nname = "example.test"\n\n'
        '[outbound]\nsecret_env = "MG_TEST_SECRET"\nsmarthost = "relay.example.net:587"\n'
        'smarthost_login = "gw"\nsmarthost_password_env = "MG_TEST_SMARTHOST_PW"\n\n'
        '[[listeners]]\nname = "submission"\nkind = "submission"\nhost = "127.0.0.1"\nport = 2587\n'
        'auth_users_env = { odoo = "MG_TEST_ODOO_PW" }\n\n'
        '[[events.webhooks]]\nname = "crm"\nurl = "https://crm.example.net/hook"\nsecret_env = "MG_TEST_HOOK"\n')
    assert _exit_code(["check-config", "-c", str(cfg)]) == 1
    out = capsys.readouterr()
    for variable in ("MG_TEST_SECRET", "MG_TEST_SMARTHOST_PW", "MG_TEST_HOOK", "MG_TEST_ODOO_PW"):
        assert f"environment variable {variable} is not set" in out.err, out.err
    assert "listener submission: AUTH is unavailable without a certificate" in out.out
    monkeypatch.setenv("MG_TEST_SECRET", "a-long-enough-site-secret")
    monkeypatch.setenv("MG_TEST_SMARTHOST_PW", "pw")
    monkeypatch.setenv("MG_TEST_HOOK", "hook-secret")
    monkeypatch.setenv("MG_TEST_ODOO_PW", "odoo-login-password")
    assert _exit_code(["check-config", "-c", str(cfg)]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("helo, fqdn, ok", [
    (None, "localhost", False),             # left unset on a host whose name is not qualified
    ("localhost.localdomain", "x", False),
    ("192.0.2.7", "x", False),
    (None, "mx1.example.net", True),
    ("mx1.example.net", "localhost", True),
])
def test_check_config_wants_a_qualified_ehlo_name_for_delivery_by_mx(tmp_path: Path, monkeypatch, capsys,  # type: ignore[no-untyped-def]
                                                                  helo, fqdn, ok) -> None:
    """Delivering by MX (no smarthost) with the EHLO name left to socket.getfqdn(), "localhost" here: MX hosts
    that want a fully qualified name refused every copy, and each refusal became a bounce. serve refuses to
    start the relay, and check-config says so first."""
    import socket

    monkeypatch.setattr(socket, "getfqdn", lambda *a: fqdn)
    monkeypatch.setenv("MG_TEST_SECRET", "a-long-enough-site-secret")
    cfg = tmp_path / "mailgate.toml"
    helo_line = f'helo_name = "{helo}"\n' if helo else ""
    cfg.write_text(
        f'[storage]\nurl = "sqlite:///{tmp_path}/mg.db"\n\n[[domains]]\nname = "example.test"\n\n'
        f'[outbound]\nsecret_env = "MG_TEST_SECRET"\n{helo_line}\n'
        '[[listeners]]\nname = "submission"\nkind = "submission"\nhost = "127.0.0.1"\nport = 2587\n')
    assert _exit_code(["check-config", "-c", str(cfg)]) == (0 if ok else 1)
    err = capsys.readouterr().err
    assert ("outbound.helo_name: delivering by MX, the EHLO name must be" in err) is not ok, err

"""`mailgate serve` as a sysadmin runs it: admin HTTP, SIGHUP reload, graceful SIGTERM, the CLI contracts."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import smtplib
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from sqlalchemy import create_engine

from gateway.logs import setup_logging
from tests.gateway_proc import ROOT, GatewayProcess, base_config, children_of, free_port, to_toml
from tests.smtp_wire import WireClient, make_mail, rcpt_reply
from tests.waiting import wait_until


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def _rcpt_code(port: int, rcpt: str) -> int:
    with smtplib.SMTP("127.0.0.1", port) as s:
        s.ehlo("t.test")
        s.mail("a@client.test")
        return s.rcpt(rcpt)[0]


def test_admin_endpoints_reload_and_graceful_stop(tmp_path: Path) -> None:
    cfg = base_config(tmp_path, smtp_port=free_port(), admin_port=free_port())
    gw = GatewayProcess(tmp_path, cfg).start()
    try:
        with urllib.request.urlopen(gw.admin_url + "/healthz", timeout=5) as r:
            health = json.loads(r.read())
            assert r.status == 200 and health["status"] == "ok" and health["disk"]["min_free_bytes"] == 256 << 20
        with smtplib.SMTP("127.0.0.1", gw.smtp_port) as s:
            s.sendmail("alice@client.test", ["sales@example.test"], make_mail(message_id="<m1@client.test>"))
        assert _rcpt_code(gw.smtp_port, "billing@example.test") == 550
        metrics = gw.metrics()
        assert 'mailgate_accepted_total{listener="smtp"} 1.0' in metrics
        assert 'mailgate_refused_total{code="550",listener="smtp"} 1.0' in metrics
        assert "mailgate_spool_messages{state=" in metrics

        # SIGHUP: a new alias is accepted at RCPT time without a restart; a broken file keeps the old config.
        cfg["aliases"].append({"address": "billing@example.test", "model": "account.move"})
        gw.path.write_text(to_toml(cfg))
        os.kill(gw.proc.pid, signal.SIGHUP)  # type: ignore[union-attr]
        wait_until(lambda: _rcpt_code(gw.smtp_port, "billing@example.test") == 250, timeout=10, what="reload")
        gw.path.write_text("[[aliases]]\naddress = 'broken'\n")
        os.kill(gw.proc.pid, signal.SIGHUP)  # type: ignore[union-attr]
        assert _rcpt_code(gw.smtp_port, "billing@example.test") == 250
        assert wait_until(lambda: "reload refused" in gw.log.read_text(), timeout=10, what="refusal logged")
        gw.path.write_text(to_toml(cfg))
    finally:
        assert gw.stop() == 0  # SIGTERM: drains and exits cleanly
    assert "stopped" in gw.log.read_text()


def test_messages_cli_contract_and_check_config_errors(tmp_path: Path) -> None:
    cfg = base_config(tmp_path, smtp_port=free_port(), admin_port=free_port())
    gw = GatewayProcess(tmp_path, cfg).start()
    try:
        with smtplib.SMTP("127.0.0.1", gw.smtp_port) as s:
            s.sendmail("alice@client.test", ["sales@example.test"], make_mail(message_id="<cli1@client.test>"))
    finally:
        gw.stop()
    out = _cli("messages", "list", "--config", str(gw.path), "--json")
    assert out.returncode == 0, out.stderr
    [row] = [json.loads(line) for line in out.stdout.splitlines()]
    assert {"id", "state", "message_id", "mail_from", "rcpt_tos", "sha256", "size"} <= set(row)
    assert row["message_id"] == "<cli1@client.test>" and row["rcpt_tos"] == ["sales@example.test"]
    shown = _cli("messages", "show", str(row["id"]), "--config", str(gw.path), "--json")
    assert json.loads(shown.stdout)["history"][0]["state"] == "received"
    raw = subprocess.run([sys.executable, "-m", "gateway.cli", "messages", "show", str(row["id"]), "--raw",
                          "--config", str(gw.path)], cwd=ROOT, capture_output=True, timeout=60)
    assert raw.stdout == make_mail(message_id="<cli1@client.test>")
    assert _cli("messages", "show", "999", "--config", str(gw.path)).returncode == 1

    res = _cli("check-config", "--config", str(ROOT / "config" / "mailgate.toml"))
    assert res.returncode == 0
    assert f"body log: bodies of 65536 bytes and more in {ROOT / 'config' / 'var' / 'mailgate.db-bodies'}/" in res.stdout

    bad = tmp_path / "bad.toml"
    bad.write_text("[[listeners]]\nkind = 'smtpx'\n[storage]\nurll = 'x'\n")
    res = _cli("check-config", "--config", str(bad))
    assert res.returncode == 1
    assert f"{bad}: listeners[0].kind:" in res.stderr and f"{bad}: storage.urll: unknown key" in res.stderr


def test_check_config_names_a_host_that_would_refuse_mail(tmp_path: Path) -> None:
    """Too little disk where the spool lives (every MAIL FROM would get 452) and an open-files hard limit
    below the listeners' caps are problems check-config reports, with the key to change."""
    import resource

    cfg = tmp_path / "host.toml"
    cfg.write_text("[[listeners]]\nkind = 'smtp'\nmax_connections = 1000000000\n"
                   f"[storage]\nurl = 'sqlite:///{tmp_path}/var/s.db'\nmin_free_mb = {1 << 40}\n")
    res = _cli("check-config", "--config", str(cfg))
    assert res.returncode == 1
    assert f"{cfg}: storage: min_free_mb: only " in res.stderr and "452 4.3.1" in res.stderr
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert f"{cfg}: listeners: max_connections: open files limit is {hard}" in res.stderr
    assert f"MiB free in {tmp_path / 'var'}" in res.stdout


def test_log_lines_carry_spool_id_and_message_id(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("INFO")
    logging.getLogger("gateway.test").info("delivered", extra={"spool_id": 42, "message_id": "<x@y>"})
    assert "delivered spool_id=42 message_id=<x@y>" in capsys.readouterr().err


def test_example_config_serves_from_a_fresh_copy(tmp_path: Path) -> None:
    """README's run command: the example config works as it is (ports 2525/2424/8025 must be free)."""
    import shutil
    import socket

    for port in (2525, 2424, 8025):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                pytest.skip(f"port {port} is in use on this machine")
    shutil.copy(ROOT / "config" / "mailgate.toml", tmp_path / "mailgate.toml")
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", str(tmp_path / "mailgate.toml")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        def up() -> bool:
            try:
                with urllib.request.urlopen("http://127.0.0.1:8025/healthz", timeout=1) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_until(up, timeout=30, what="the example gateway")
        with smtplib.SMTP("127.0.0.1", 2525) as s:
            s.sendmail("a@client.test", ["sales@example.test"], make_mail(message_id="<ex1@client.test>"))
        assert (tmp_path / "var" / "mailgate.db").exists()
        out = _cli("messages", "list", "--config", str(tmp_path / "mailgate.toml"), "--json")
        assert json.loads(out.stdout.splitlines()[0])["message_id"] == "<ex1@client.test>"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)




def test_retention_purge_cli(tmp_path: Path) -> None:
    import datetime as dt

    from sqlalchemy import update

    from gateway.schema import messages
    from gateway.spool import Envelope, get_message, get_raw, spool_one
    from gateway.store import open_store, utcnow

    cfg = base_config(tmp_path, smtp_port=free_port(), admin_port=free_port())
    path = tmp_path / "mailgate.toml"
    path.write_text(to_toml(cfg))
    engine = open_store(cfg["storage"]["url"])
    old = spool_one(engine, make_mail(message_id="<old@x>"), Envelope("a@x", ("sales@example.test",)))
    fresh = spool_one(engine, make_mail(message_id="<fresh@x>"), Envelope("a@x", ("sales@example.test",)))
    with engine.begin() as conn:
        conn.execute(update(messages).values(state="delivered"))
        conn.execute(update(messages).where(messages.c.id == old)  # finished 31 days ago
                     .values(received_at=utcnow() - dt.timedelta(days=32), updated_at=utcnow() - dt.timedelta(days=31)))
    res = _cli("messages", "purge", "--config", str(path))
    assert res.returncode == 0 and "raw bodies of 1 message" in res.stdout
    assert get_raw(engine, old) is None and get_message(engine, old).state == "delivered"  # type: ignore[union-attr]
    assert get_raw(engine, fresh) is not None


def test_serve_raises_the_open_files_limit_and_says_when_the_listeners_still_do_not_fit(tmp_path) -> None:
    import resource

    from gateway.config import parse_config
    from gateway.serve import raise_fd_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fits = parse_config({"listeners": [{"name": "smtp", "kind": "smtp", "port": 0, "max_connections": 10}]},
                        base_dir=str(tmp_path))
    too_many = parse_config({"listeners": [{"name": "smtp", "kind": "smtp", "port": 0,
                                            "max_connections": 10**9}]}, base_dir=str(tmp_path))
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(64, hard), hard))
        assert raise_fd_limit(fits) is None
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard
        warning = raise_fd_limit(too_many)
        assert warning is not None and "max_connections" in warning and str(hard) in warning
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_sighup_reaches_worker_processes_and_a_dead_worker_is_started_again(tmp_path: Path) -> None:
    """With worker processes (the default), SIGHUP must reach the routing and delivery there too: a new alias
    was accepted at RCPT but routed with the old table. And a worker process that dies (OOM killer) is started
    again: the listeners kept accepting mail that nothing routed."""
    from tests.odoo_double import OdooDouble

    odoo = OdooDouble().start()
    cfg = base_config(tmp_path, smtp_port=free_port(), admin_port=free_port(), odoo_url=odoo.url)
    cfg["worker"]["processes"] = 1
    gw = GatewayProcess(tmp_path, cfg).start()
    try:
        [worker] = wait_until(lambda: children_of(gw.proc.pid, b"spawn_main"), what="the worker process")  # type: ignore[union-attr]
        with smtplib.SMTP("127.0.0.1", gw.smtp_port) as s:  # the worker is up, with the file as it was
            s.sendmail("carol@client.test", ["sales@example.test"], make_mail(message_id="<lead1@client.test>"))
        wait_until(lambda: odoo.records("crm.lead"), timeout=30, what="a lead")
        cfg["aliases"].append({"address": "help@example.test", "model": "helpdesk.ticket"})
        cfg["listeners"][0]["max_connections_per_client"] = 1
        gw.path.write_text(to_toml(cfg))
        os.kill(gw.proc.pid, signal.SIGHUP)  # type: ignore[union-attr]
        wait_until(lambda: "configuration reloaded" in gw.log.read_text(), timeout=10, what="reload")
        time.sleep(1.5)  # the worker process looks for a reload twice a second
        with smtplib.SMTP("127.0.0.1", gw.smtp_port) as s:
            s.sendmail("carol@client.test", ["help@example.test"],
                       make_mail(message_id="<help1@client.test>").replace(b"To: sales@", b"To: help@"))
            # the reloaded per-client cap (1): a second session from here is turned away while this one is open
            with pytest.raises(smtplib.SMTPConnectError) as refused:
                smtplib.SMTP("127.0.0.1", gw.smtp_port, timeout=5)
            assert refused.value.smtp_code == 421
        wait_until(lambda: odoo.records("helpdesk.ticket"), timeout=20, what="a ticket for the new alias")

        os.kill(worker, signal.SIGKILL)
        wait_until(lambda: 'mailgate_helper_process_starts_total{helper="worker"} 2.0' in gw.metrics(),
                   timeout=15, what="the worker started again")
        with smtplib.SMTP("127.0.0.1", gw.smtp_port) as s:
            s.sendmail("carol@client.test", ["sales@example.test"], make_mail(message_id="<lead9@client.test>"))
        wait_until(lambda: len(odoo.records("crm.lead")) == 2, timeout=30, what="a lead routed by the new worker")
        assert "worker process mailgate-worker-0 exited (code -9); starting it again" in gw.log.read_text()
    finally:
        assert gw.stop() == 0
        odoo.stop()


async def test_sighup_moves_the_bare_postmaster_to_the_new_first_domain(tmp_path: Path) -> None:
    """A bare RCPT TO:<postmaster> goes to the first domain. It was fixed at start: after a reload that
    dropped that domain, the RFC 5321 §4.5.1 address every server must take was refused 550 5.7.1."""
    from gateway.config import load_config
    from gateway.serve import start_gateway

    cfg = base_config(tmp_path, smtp_port=0, admin_port=0, admin={"enabled": False}, worker={"processes": 0})
    cfg["domains"] = [{"name": "old.test", "strict": True}]
    cfg["aliases"] = []
    path = tmp_path / "mailgate.toml"
    path.write_text(to_toml(cfg))

    async def rcpt(port: int, address: str) -> int:
        return (await rcpt_reply(port, address))[0]

    gw = await start_gateway(load_config(str(path)), config_path=str(path), workers=False)
    try:
        port = gw.ports["smtp"]
        assert await rcpt(port, "postmaster") == 250
        cfg["domains"] = [{"name": "new.test", "strict": True}]
        path.write_text(to_toml(cfg))
        gw.reload()
        assert await rcpt(port, "postmaster@old.test") == 550  # no longer ours
        assert await rcpt(port, "postmaster") == 250
        assert gw.handlers[0].policy.primary_domain == "new.test"
    finally:
        await gw.stop(drain_seconds=1)


async def _session_in_data(port: int, hello: str, rcpt: str, head: bytes) -> WireClient:
    """A session that sent MAIL, RCPT, DATA and the first part of its message (`head`)."""
    c = await WireClient.connect("127.0.0.1", port)
    assert (await c.reply())[0] == 220
    assert (await c.cmd(f"{hello} client.test"))[0] == 250
    assert (await c.cmd("MAIL FROM:<alice@client.test>"))[0] == 250
    assert (await c.cmd(f"RCPT TO:<{rcpt}>"))[0] == 250
    assert (await c.cmd("DATA"))[0] == 354
    c.writer.write(head)
    await c.writer.drain()
    return c


async def _finish_data(c: WireClient, rest: bytes) -> tuple[int, str]:
    """The rest of a message (no line of it starts with a dot) and its terminator; the reply to DATA."""
    c.writer.write(rest + b".\r\n")
    await c.writer.drain()
    return await c.reply(timeout=30)


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


async def _closed_by_server(c: WireClient) -> bool:
    """The server closed the connection (a reset, when our last command reached it after its close)."""
    try:
        return await asyncio.wait_for(c.reader.read(), 5) == b""
    except ConnectionResetError:
        return True


async def _connect_while_draining(port: int) -> str:
    """What a new connection to `port` meets during the drain: "refused", or the greeting's code."""
    try:
        c = await WireClient.connect("127.0.0.1", port)
    except OSError:
        return "refused"
    try:
        return str((await c.reply())[0])
    finally:
        c.writer.close()


async def test_sigterm_finishes_the_data_in_flight_and_tells_the_other_sessions_421(tmp_path: Path) -> None:
    """"Graceful SIGTERM: stop accepting, finish DATA in flight, drain." `stop` relied on
    `Server.wait_closed()`, which in Python 3.11 returns at once: a client that finished its DATA a second
    after SIGTERM lost its connection (or got 451 from a writer already closed), and nothing was spooled."""
    smtp_port, lmtp_port, submission_port = free_port(), free_port(), free_port()
    cfg = base_config(tmp_path, smtp_port=smtp_port, admin_port=free_port(),
                      outbound={"smarthost": f"127.0.0.1:{free_port()}"},
                      tracking={"enabled": False, "port": free_port()})
    cfg["listeners"] += [{"name": "lmtp", "kind": "lmtp", "host": "127.0.0.1", "port": lmtp_port},
                         {"name": "submission", "kind": "submission", "host": "127.0.0.1", "port": submission_port}]
    gw = GatewayProcess(tmp_path, cfg, env={"MAILGATE_SECRET": "s3cret-for-the-drain-test"}).start()
    try:
        await asyncio.to_thread(wait_until, lambda: _port_open(submission_port), 15, "the submission listener")
        before = make_mail(message_id="<before@client.test>")
        between = await _session_in_data(smtp_port, "EHLO", "sales@example.test", before)
        assert (await _finish_data(between, b""))[0] == 250
        idle = await WireClient.connect("127.0.0.1", smtp_port)
        assert (await idle.reply())[0] == 220 and (await idle.cmd("EHLO idle.test"))[0] == 250
        mail = make_mail(message_id="<inflight@client.test>")
        lmtp_mail = make_mail(message_id="<inflight-lmtp@client.test>")
        relayed = make_mail(message_id="<inflight-relay@client.test>").replace(b"To: sales@example.test",
                                                                               b"To: bob@other.test")
        smtp = await _session_in_data(smtp_port, "EHLO", "sales@example.test", mail[:60])
        lmtp = await _session_in_data(lmtp_port, "LHLO", "support@example.test", lmtp_mail[:60])
        submission = await _session_in_data(submission_port, "EHLO", "bob@other.test", relayed[:60])

        os.kill(gw.proc.pid, signal.SIGTERM)  # type: ignore[union-attr]
        # Sessions outside a mail transaction are told at once: idle, or between two transactions.
        for c in (idle, between):
            code, text = await c.reply(timeout=10)
            assert (code, text.split()[0]) == (421, "4.3.2") and "shutting down" in text
        assert await _connect_while_draining(smtp_port) == "refused"
        assert await _connect_while_draining(lmtp_port) == "refused"
        # The relay's socket is closed by its own service once the drain is over; until then: 421.
        assert await _connect_while_draining(submission_port) == "refused"

        await asyncio.sleep(1.0)  # the clients take their time to finish the messages
        for c, raw in ((smtp, mail), (lmtp, lmtp_mail), (submission, relayed)):
            code, text = await _finish_data(c, raw[60:])
            assert code == 250, text
            # a new transaction after it: 421 (sent right after the 250), then the connection is closed
            code, text = await c.cmd("MAIL FROM:<alice@client.test>")
            assert (code, text.split()[0]) == (421, "4.3.2")
            assert await _closed_by_server(c)
        assert await asyncio.to_thread(gw.proc.wait, 60) == 0  # type: ignore[union-attr]
    finally:
        gw.stop()
    out = _cli("messages", "list", "--config", str(gw.path), "--json")
    assert out.returncode == 0, out.stderr
    assert sorted(json.loads(line)["message_id"] for line in out.stdout.splitlines()) == [
        "<before@client.test>", "<inflight-lmtp@client.test>", "<inflight@client.test>"]
    with sqlite3.connect(tmp_path / "spool.db") as db:
        assert db.execute("SELECT message_id FROM outbound_mails").fetchall() == [("<inflight-relay@client.test>",)]
    assert "stopped" in gw.log.read_text()


def test_serve_stops_with_the_message_when_the_relay_secret_is_unset(tmp_path: Path) -> None:
    """The outbound side started as a background task nobody awaited: with MAILGATE_SECRET unset its
    ConfigError ended that task, and `serve` ran on — accepting Odoo's outgoing mail on no port at all and
    relaying nothing — until someone noticed. Now it stops before any listener opens, exit 1, saying which
    variable is missing."""
    cfg = base_config(tmp_path, smtp_port=free_port(), admin_port=free_port(),
                      outbound={"smarthost": f"127.0.0.1:{free_port()}"},
                      tracking={"enabled": False, "port": free_port()})
    cfg["listeners"].append({"name": "submission", "kind": "submission", "host": "127.0.0.1", "port": free_port()})
    gw = GatewayProcess(tmp_path, cfg)
    gw.env.pop("MAILGATE_SECRET", None)
    with pytest.raises(RuntimeError, match="gateway exited 1") as raised:
        gw.start(timeout=30)
    assert "MAILGATE_SECRET" in str(raised.value)
    assert "Traceback" not in str(raised.value)
    assert not _port_open(gw.smtp_port)


async def test_a_background_part_that_fails_stops_serve_with_exit_1(monkeypatch: pytest.MonkeyPatch) -> None:
    """A part of the gateway that dies while it runs (here a stand-in for the outbound relay) must not leave
    the rest running as if healthy: serve stops, logs why and exits 1 for the service manager to restart."""
    import gateway.serve as serve

    stops: list[bool] = []

    class Stub:
        stop_event = asyncio.Event()
        engine = create_engine("sqlite://")

        def __init__(self) -> None:
            async def dies() -> None:
                await asyncio.sleep(0.05)
                raise RuntimeError("relay crashed")

            self.background = [asyncio.create_task(dies(), name="outbound")]

        def reload(self) -> None:
            pass

        async def stop(self) -> None:
            stops.append(True)
            self.stop_event.set()

    async def fake_start(config: Any, config_path: str | None = None) -> Stub:
        return Stub()

    monkeypatch.setattr(serve, "start_gateway", fake_start)
    code = await asyncio.wait_for(serve.serve_forever(None, None), 10)  # type: ignore[arg-type]
    assert code == 1 and stops == [True]


async def test_a_group_sigterm_does_not_start_the_worker_again_during_the_drain(tmp_path: Path) -> None:
    """systemd sends SIGTERM to the whole group: the worker process finished its message and exited at
    once, and while serve drained a session the supervisor logged "exited (code 0); starting it again" and
    started a new worker, only for it to be stopped a moment later."""
    cfg = base_config(tmp_path, smtp_port=free_port(), admin_port=free_port())
    cfg["worker"]["processes"] = 1
    gw = GatewayProcess(tmp_path, cfg).start()
    try:
        await asyncio.to_thread(wait_until, lambda: 'mailgate_helper_process_starts_total{helper="worker"} 1.0'
                                in gw.metrics(), 15, "the worker process")
        session = await _session_in_data(gw.smtp_port, "EHLO", "sales@example.test",
                                         make_mail(message_id="<drain@client.test>")[:40])
        os.killpg(gw.proc.pid, signal.SIGTERM)  # type: ignore[union-attr]
        await asyncio.sleep(3.0)  # the supervisor looks every second; the worker is gone well before this
        rest = make_mail(message_id="<drain@client.test>")[40:]
        assert (await _finish_data(session, rest))[0] == 250
        assert await asyncio.to_thread(gw.proc.wait, 30) == 0  # type: ignore[union-attr]
        assert "starting it again" not in gw.log.read_text()
    finally:
        gw.stop()

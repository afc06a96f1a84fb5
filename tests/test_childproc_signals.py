"""Signals meant for `mailgate serve` that reach its children too: systemd's KillMode=control-group sends
SIGTERM to every process of the service, a terminal's Ctrl-C and hang-up go to the whole process group.
`serve` answers them for its children, which must live on until it stops them its own way."""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import sqlite3
import time
from pathlib import Path

from tests.gateway_proc import GatewayProcess, base_config, children_of, free_port
from tests.smtp_wire import make_mail
from tests.waiting import wait_until


def _threads(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


class _Session:
    """An SMTP session driven line by line, so it can be held inside DATA."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.lines = self.sock.makefile("rb")
        assert self.reply()[0] == 220

    def reply(self) -> tuple[int, str]:
        text = []
        while True:
            line = self.lines.readline().decode()
            text.append(line[4:].strip())
            if line[3:4] != "-":
                return int(line[:3]), " ".join(text)

    def cmd(self, line: str) -> tuple[int, str]:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()


def test_group_signals_leave_the_children_to_serve(tmp_path: Path) -> None:
    """SIGHUP to the group killed the worker process (serve started another) and the spool writer process;
    SIGINT interrupted them; SIGTERM to the group killed the spool writer while serve drained the sessions in
    DATA, so their commits needed a new writer process, or failed with 451 when one was under way."""
    cfg = base_config(tmp_path, smtp_port=free_port(), admin_port=free_port())
    gw = GatewayProcess(tmp_path, cfg).start()
    try:
        assert gw.proc is not None
        [worker] = wait_until(lambda: children_of(gw.proc.pid, b"spawn_main"), what="the worker process")  # type: ignore[union-attr]
        [writer] = children_of(gw.proc.pid, b"gateway.spool_process")
        # Started with SIGHUP and SIGINT blocked: one sent to the group in its first second stays pending (and
        # is then ignored) instead of killing it before it installs its handlers. SIGTERM is not blocked.
        blocked = _signal_set(worker, "SigBlk")
        assert {signal.SIGHUP, signal.SIGINT} <= blocked and signal.SIGTERM not in blocked
        [tracker] = children_of(gw.proc.pid, b"resource_tracker")  # multiprocessing's, for the shared counter
        assert signal.SIGHUP in _signal_set(tracker, "SigBlk") | _signal_set(tracker, "SigIgn")
        # Both past their start-up: the writer committed a mail, the worker runs its threads.
        with smtplib.SMTP("127.0.0.1", gw.smtp_port) as s:
            s.sendmail("carol@client.test", ["sales@example.test"], make_mail(message_id="<first@client.test>"))
        wait_until(lambda: _threads(worker) > cfg["worker"]["concurrency"], what="the worker threads")

        os.killpg(gw.proc.pid, signal.SIGHUP)  # serve reloads; its children follow it, not the signal
        wait_until(lambda: "configuration reloaded" in gw.log.read_text(), timeout=10, what="reload")
        for pid in (worker, writer):
            os.kill(pid, signal.SIGINT)
        time.sleep(1.0)
        assert (_alive(worker), _alive(writer), _alive(tracker)) == (True, True, True)

        session = _Session(gw.smtp_port)
        assert session.cmd("EHLO client.test")[0] == 250
        assert session.cmd("MAIL FROM:<carol@client.test>")[0] == 250
        assert session.cmd("RCPT TO:<sales@example.test>")[0] == 250
        assert session.cmd("DATA")[0] == 354
        os.killpg(gw.proc.pid, signal.SIGTERM)  # systemd stops the service: every process gets it at once
        time.sleep(1.0)
        assert _alive(writer)
        body = make_mail(message_id="<drained@client.test>").replace(b"\r\n.", b"\r\n..")
        session.sock.sendall(body + b"\r\n.\r\n")
        assert session.reply()[0] == 250
        assert gw.proc.wait(60) == 0
    finally:
        gw.stop()
    log = gw.log.read_text()
    # (A worker process ends by itself on SIGTERM, at a message boundary: that stays, and is code 0.)
    assert log.count("spool writer process") == 1 and "exited (code -" not in log, log[-3000:]
    with sqlite3.connect(tmp_path / "spool.db") as db:
        assert sorted(db.execute("SELECT message_id FROM messages").fetchall()) == [
            ("<drained@client.test>",), ("<first@client.test>",)]


def _signal_set(pid: int, field: str) -> set[int]:
    """The signals in a /proc/PID/status mask line (SigBlk, SigIgn, ...)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            mask = int(line.split()[1], 16)
            return {n for n in range(1, 65) if mask >> (n - 1) & 1}
    return set()

"""Run the real `mailgate serve` in a subprocess (so tests can SIGKILL it) with a config written for the test."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def to_toml(config: dict[str, Any]) -> str:
    """Enough TOML for our configs: tables and arrays of tables of scalars/inline tables."""
    out: list[str] = []
    for key, value in config.items():
        if isinstance(value, dict):
            out.append(f"[{key}]")
            out.extend(f"{k} = {_toml_value(v)}" for k, v in value.items())
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for item in value:
                out.append(f"[[{key}]]")
                out.extend(f"{k} = {_toml_value(v)}" for k, v in item.items())
        else:
            out.insert(0, f"{key} = {_toml_value(value)}")
        out.append("")
    return "\n".join(out)


def base_config(tmp: Path, *, smtp_port: int, admin_port: int, storage_url: str | None = None,
                odoo_url: str | None = None, mode: str = "passthrough", **sections: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "listeners": [{"name": "smtp", "kind": "smtp", "host": "127.0.0.1", "port": smtp_port}],
        "storage": {"url": storage_url or f"sqlite:///{tmp}/spool.db"},
        "admin": {"host": "127.0.0.1", "port": admin_port},
        "domains": [{"name": "example.test", "strict": True}],
        "aliases": [{"address": "sales@example.test", "model": "crm.lead", "defaults": {"type": "lead"}},
                    {"address": "support@example.test", "model": "helpdesk.ticket"}],
        "worker": {"concurrency": 4, "backoff_base": 0.2, "backoff_max": 2.0, "poll_interval": 0.1,
                   "lease_seconds": 5},
    }
    if odoo_url:
        cfg["odoo"] = {"url": odoo_url, "db": "mailgate", "login": "admin", "protocol": "jsonrpc", "mode": mode,
                       "timeout": 5}
    cfg.update(sections)
    return cfg


class GatewayProcess:
    """`mailgate serve` as a child process group; `kill()` is SIGKILL to all of it, `stop()` is SIGTERM."""

    def __init__(self, tmp: Path, config: dict[str, Any], *, env: dict[str, str] | None = None):
        self.tmp = tmp
        self.config = config
        self.path = tmp / "mailgate.toml"
        self.path.write_text(to_toml(config))
        self.env = {**os.environ, "MAILGATE_ODOO_PASSWORD": "admin", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tmp / "gateway.log"

    @property
    def smtp_port(self) -> int:
        return int(self.config["listeners"][0]["port"])

    @property
    def admin_url(self) -> str:
        a = self.config["admin"]
        return f"http://{a['host']}:{a['port']}"

    def start(self, timeout: float = 30) -> "GatewayProcess":
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", str(self.path)],
                                         cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.admin_url + "/healthz", timeout=1) as r:
                    if r.status == 200:
                        with socket.create_connection(("127.0.0.1", self.smtp_port), timeout=1):
                            return self
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"gateway did not come up:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the serve process and its worker processes at once (a crash, an OOM kill of the cgroup)."""
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()

    def stop(self, timeout: float = 30) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def metrics(self) -> str:
        with urllib.request.urlopen(self.admin_url + "/metrics", timeout=5) as r:
            return r.read().decode()


def children_of(serve_pid: int, marker: bytes) -> list[int]:
    """Live children of `serve` whose command line holds `marker` (b"spawn_main": the worker processes
    multiprocessing's spawn start method runs)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == serve_pid and fields[0] not in ("Z", "X") and marker in cmdline:
            pids.append(int(stat.parent.name))
    return pids

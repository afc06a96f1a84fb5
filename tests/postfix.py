"""A private, real Postfix instance for integration tests (Debian's `postfix` package, run as root).

It gets its own config directory, queue and log in a temp folder, listens on 127.0.0.1 only, on a free port,
and relays one domain to the gateway under test over SMTP or LMTP — the way a sysadmin wires the catchall
domain (see README "Wiring Postfix"). The system's default Postfix instance is not touched.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def postfix_available() -> bool:
    return os.path.exists(POSTFIX) and os.geteuid() == 0 and os.path.exists("/etc/postfix/master.cf")


def require_postfix() -> None:
    if not postfix_available():
        pytest.skip("needs Debian's postfix package and root (installed by .ci/run)")


class PrivatePostfix:
    def __init__(self, *, domain: str, relay_port: int, protocol: str = "smtp"):
        # Not under pytest's tmp_path: its parents are 0700 and Postfix's daemons run as `postfix`.
        self.base = Path(tempfile.mkdtemp(prefix="mailgate-postfix-"))
        self.conf = self.base / "etc"
        self.queue = self.base / "queue"
        self.data = self.base / "data"
        self.log = self.base / "maillog"
        self.port = free_port()
        self.domain = domain
        self.relay_port = relay_port
        self.protocol = protocol

    def _write_config(self) -> None:
        self.conf.mkdir(parents=True)
        self.queue.mkdir()
        self.data.mkdir()
        os.chmod(self.base, 0o755)
        shutil.chown(self.data, "postfix")
        transport = (f"lmtp:inet:127.0.0.1:{self.relay_port}" if self.protocol == "lmtp"
                     else f"smtp:[127.0.0.1]:{self.relay_port}")
        main = f"""
compatibility_level = 3.6
queue_directory = {self.queue}
data_directory = {self.data}
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = mta.test
mydomain = mta.test
myorigin = mta.test
mydestination =
relay_domains = {self.domain}
transport_maps = inline:{{ {self.domain}={transport} }}
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
alias_maps =
alias_database =
maillog_file_prefixes = {self.base}
maillog_file = {self.log}
smtp_dns_support_level = disabled
lmtp_dns_support_level = disabled
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
smtpd_banner = $myhostname ESMTP
message_size_limit = 52428800
smtp_tls_security_level = none
smtpd_tls_security_level = none
"""
        (self.conf / "main.cf").write_text(main)
        lines = []
        for line in Path("/etc/postfix/master.cf").read_text().splitlines():
            if not line or line[0] in "# \t":
                lines.append(line)
                continue
            fields = line.split()
            if fields[0] == "smtp" and fields[1] == "inet":
                fields[0] = f"127.0.0.1:{self.port}"
            if len(fields) >= 8:
                fields[4] = "n"  # no chroot: the queue lives in a temp folder
            lines.append("  ".join(fields))
        (self.conf / "master.cf").write_text("\n".join(lines) + "\n")

    def start(self) -> "PrivatePostfix":
        self._write_config()
        env = {**os.environ, "MAIL_CONFIG": str(self.conf)}
        subprocess.run([POSTFIX, "-c", str(self.conf), "check"], check=False, capture_output=True, env=env)
        res = subprocess.run([POSTFIX, "-c", str(self.conf), "start"], capture_output=True, text=True, env=env)
        if res.returncode != 0:
            raise RuntimeError(f"postfix start failed: {res.stdout}\n{res.stderr}\n{self.maillog()}")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"postfix did not listen on {self.port}:\n{self.maillog()}")

    def stop(self) -> None:
        env = {**os.environ, "MAIL_CONFIG": str(self.conf)}
        subprocess.run([POSTFIX, "-c", str(self.conf), "stop"], capture_output=True, env=env)
        shutil.rmtree(self.base, ignore_errors=True)

    def flush(self) -> None:
        subprocess.run([POSTFIX, "-c", str(self.conf), "flush"], capture_output=True)

    def maillog(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def queue_ids_sent(self) -> list[str]:
        return re.findall(r"status=sent", self.maillog())

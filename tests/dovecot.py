"""A private Dovecot for tests: its own config, sockets, logs and maildirs in a temp folder, on a free port.

Nothing of the machine's Dovecot setup is used or touched (`/etc/dovecot` is ignored: `-c` names our file).
Needs the Debian package `dovecot-imapd` (binary /usr/sbin/dovecot); tests skip cleanly without it.

Running as root, Dovecot refuses to run its login and mail processes as root, so they run as the package's
`dovenull` / `dovecot` users and the temp folder is made reachable for them. As an ordinary user, every
process runs as that user.
"""

from __future__ import annotations

import grp
import imaplib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

DOVECOT = os.environ.get("MAILGATE_TEST_DOVECOT", "/usr/sbin/dovecot")


def dovecot_available() -> str | None:
    """None when usable, else the reason to skip."""
    if not Path(DOVECOT).exists():
        return f"{DOVECOT} not installed (Debian package dovecot-imapd)"
    if os.geteuid() == 0:
        for user in ("dovecot", "dovenull"):
            try:
                pwd.getpwnam(user)
            except KeyError:
                return f"user {user!r} missing (created by the dovecot-core package)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Dovecot:
    """One private Dovecot instance. `start()`, `stop()`, `restart()`; users are `{login: password}`."""

    def __init__(self, users: dict[str, str], *, tls: bool = False, root: Path | None = None):
        self.users = dict(users)
        self.tls = tls
        self.root = root or Path(tempfile.mkdtemp(prefix="mailgate-dovecot-"))
        self.root.chmod(0o755)  # mail processes run as `dovecot` when we are root: they must get in
        self.port = free_port()
        self.tls_port = free_port() if tls else 0
        self.host = "127.0.0.1"
        self.proc: subprocess.Popen[bytes] | None = None
        self.cert: Path | None = None
        self._write_config()

    # -------------------------------------------------------------------------------------- config
    def _write_config(self) -> None:
        r = self.root
        for sub in ("run", "state", "mail"):
            (r / sub).mkdir(exist_ok=True)
        if os.geteuid() == 0:
            mail_user = pwd.getpwnam("dovecot")
            internal, login = "dovecot", "dovenull"
            uid, gid = mail_user.pw_uid, mail_user.pw_gid
            group = grp.getgrgid(gid).gr_name
        else:
            me = pwd.getpwuid(os.geteuid())
            internal = login = me.pw_name
            uid, gid = me.pw_uid, me.pw_gid
            group = grp.getgrgid(gid).gr_name
        os.chown(r / "mail", uid, gid)
        (r / "passwd").write_text("".join(f"{u}:{{PLAIN}}{p}::::::\n" for u, p in self.users.items()))
        ssl_conf = "ssl = no\n"
        if self.tls:
            self.cert, key = _self_signed(r)
            ssl_conf = f"ssl = yes\nssl_cert = <{self.cert}\nssl_key = <{key}\n"
        (r / "dovecot.conf").write_text(f"""\
base_dir = {r}/run
state_dir = {r}/state
log_path = {r}/dovecot.log
info_log_path = {r}/dovecot.log
protocols = imap
listen = 127.0.0.1
{ssl_conf}disable_plaintext_auth = no
auth_mechanisms = plain login
default_internal_user = {internal}
default_internal_group = {group}
default_login_user = {login}
first_valid_uid = {min(uid, 1)}
first_valid_gid = 0
mail_location = maildir:{r}/mail/%u
# mail sent while a client idles is announced at once (the default waits up to 2 s between checks)
imap_idle_notify_interval = 2 mins
mailbox_idle_check_interval = 1 secs
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {r}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={r}/mail/%u
}}
namespace inbox {{
  inbox = yes
  mailbox Archive {{
    auto = create
  }}
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {self.tls_port}
  }}
  chroot =
}}
service anvil {{
  chroot =
}}
""")

    @property
    def config_path(self) -> Path:
        return self.root / "dovecot.conf"

    # ----------------------------------------------------------------------------------- lifecycle
    def start(self, timeout: float = 15.0) -> "Dovecot":
        assert self.proc is None or self.proc.poll() is not None, "already running"
        out = open(self.root / "dovecot.stdout", "ab")
        self.proc = subprocess.Popen([DOVECOT, "-F", "-c", str(self.config_path)], stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dovecot exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as s:
                    if s.recv(64).startswith(b"* OK"):
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"dovecot did not answer on {self.port}:\n{self.log()}")
            time.sleep(0.05)

    def stop(self, *, kill: bool = False) -> None:
        """Stop the master and every imap process it started, and wait until they are gone.

        A stopping Dovecot master leaves logged-in imap processes serving their clients (that is how it
        upgrades without cutting sessions), so a bare master restart would not drop a connection. We end the
        whole process group, like `systemctl restart dovecot` (control-group kill) does.
        """
        if self.proc is None or self.proc.poll() is not None:
            return
        sig = signal.SIGKILL if kill else signal.SIGTERM
        self.proc.send_signal(sig)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            sig = signal.SIGKILL
            self.proc.kill()
            self.proc.wait(5)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def crash(self) -> None:
        """SIGKILL the master and all its processes at once (a host crash, an OOM kill)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        (self.root / "run" / "master.pid").unlink(missing_ok=True)

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def log(self) -> str:
        parts = []
        for name in ("dovecot.log", "dovecot.stdout"):
            p = self.root / name
            if p.exists():
                parts.append(p.read_text(errors="replace")[-4000:])
        return "\n".join(parts)

    def __enter__(self) -> "Dovecot":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # ------------------------------------------------------------------------------- mail handling
    def client(self, user: str) -> imaplib.IMAP4:
        """A logged-in stdlib client (the tests' "other person" or delivering MTA)."""
        c = imaplib.IMAP4(self.host, self.port, timeout=30)
        c.login(user, self.users[user])
        return c

    def append(self, user: str, messages: Iterable[bytes], *, mailbox: str = "INBOX",
               flags: str | None = None) -> list[int]:
        """APPEND each message over one connection; returns the UIDs the server gave them (APPENDUID)."""
        uids: list[int] = []
        c = self.client(user)
        try:
            for raw in messages:
                typ, data = c.append(_quote(mailbox), flags, None, raw)
                assert typ == "OK", data
                text = data[0].decode() if data and data[0] else ""
                if "APPENDUID" in text:
                    uids.append(int(text.split("APPENDUID", 1)[1].split()[1].rstrip("]")))
        finally:
            c.logout()
        return uids

    def uids(self, user: str, mailbox: str = "INBOX", criteria: str = "ALL") -> list[int]:
        c = self.client(user)
        try:
            c.select(_quote(mailbox))
            typ, data = c.uid("SEARCH", criteria)
            assert typ == "OK", data
            return [int(x) for x in data[0].split()]
        finally:
            c.logout()

    def uidvalidity(self, user: str, mailbox: str = "INBOX") -> int:
        c = self.client(user)
        try:
            typ, data = c.status(_quote(mailbox), "(UIDVALIDITY)")
            assert typ == "OK", data
            return int(data[0].decode().split("UIDVALIDITY")[1].strip(" )"))
        finally:
            c.logout()

    def recreate_mailbox(self, user: str, mailbox: str) -> None:
        """Delete and create a mailbox again: the server must give it a new UIDVALIDITY."""
        c = self.client(user)
        try:
            c.delete(_quote(mailbox))
            typ, data = c.create(_quote(mailbox))
            assert typ == "OK", data
        finally:
            c.logout()


def _quote(mailbox: str) -> str:
    return '"' + mailbox.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _self_signed(root: Path) -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1 (openssl CLI); the tests trust it as their CA file."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("openssl not installed: cannot make a test certificate")
    cert, key = root / "cert.pem", root / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


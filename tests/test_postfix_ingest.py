"""Integration: mail submitted to a real Postfix is relayed (SMTP or LMTP) to the gateway and lands
byte-exact in the spool. Needs Debian's postfix and root (`.ci/run` installs it); skipped otherwise."""

from __future__ import annotations

import asyncio
import smtplib
import time
from pathlib import Path

import pytest

from gateway.config import parse_config
from gateway.serve import start_gateway
from gateway.spool import get_raw, list_messages
from tests.postfix import PrivatePostfix, free_port, require_postfix

pytestmark = pytest.mark.postfix


def gateway_config(tmp_path: Path, smtp_port: int, lmtp_port: int) -> dict:
    return {
        "listeners": [
            {"name": "smtp", "kind": "smtp", "host": "127.0.0.1", "port": smtp_port},
            {"name": "lmtp", "kind": "lmtp", "host": "127.0.0.1", "port": lmtp_port},
        ],
        "storage": {"url": f"sqlite:///{tmp_path}/spool.db"},
        "admin": {"enabled": False},
        "domains": [{"name": "example.test", "strict": True}],
        "aliases": [{"address": "sales@example.test", "model": "crm.lead"},
                    {"address": "support@example.test", "model": "helpdesk.ticket"}],
    }


def sample(i: int, size: int = 0) -> bytes:
    body = "Grüße aus Köln, message %d.\r\n.leading dot line\r\n" % i
    raw = (f"From: Alice <alice@client.test>\r\nTo: sales@example.test\r\nSubject: postfix {i}\r\n"
           f"Date: Sun, 22 Nov 2026 10:00:00 +0000\r\nMessage-ID: <pf{i}@client.test>\r\nMIME-Version: 1.0\r\n"
           "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + body).encode()
    if size:
        raw += (b"y" * 70 + b"\r\n") * (size // 72)
    return raw


async def _wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.2)
    raise AssertionError("timed out")


@pytest.mark.parametrize("protocol", ["smtp", "lmtp"])
async def test_postfix_relays_to_gateway_byte_exact(tmp_path: Path, protocol: str) -> None:
    require_postfix()
    smtp_port, lmtp_port = free_port(), free_port()
    config = parse_config(gateway_config(tmp_path, smtp_port, lmtp_port), base_dir=str(tmp_path))
    gw = await start_gateway(config, workers=False)
    pf = PrivatePostfix(domain="example.test",
                        relay_port=smtp_port if protocol == "smtp" else lmtp_port, protocol=protocol)
    await asyncio.to_thread(pf.start)
    try:
        sent = {f"<pf{i}@client.test>": sample(i, size=300_000 if i == 0 else 0) for i in range(5)}

        def submit() -> None:
            with smtplib.SMTP("127.0.0.1", pf.port) as s:
                for raw in sent.values():
                    s.sendmail("alice@client.test", ["sales@example.test", "support@example.test"], raw,
                               mail_options=["BODY=8BITMIME"])

        await asyncio.to_thread(submit)
        await _wait_for(lambda: len(list_messages(gw.engine)) >= len(sent))
        stored = {m.message_id: m for m in list_messages(gw.engine)}
        assert set(stored) == set(sent)
        for mid, raw in sent.items():
            m = stored[mid]
            got = get_raw(gw.engine, m.id)
            # Postfix prepends exactly one Received: header and changes nothing else.
            assert got.startswith(b"Received: ") and got.endswith(raw), mid
            head, _, rest = got.partition(b"\r\nSubject: ")
            assert got[got.index(b"From: Alice"):] == raw
            assert sorted(m.rcpt_tos) == ["sales@example.test", "support@example.test"]
            assert m.mail_from == "alice@client.test" and m.source == protocol
        assert "status=sent" in pf.maillog()
    finally:
        await asyncio.to_thread(pf.stop)
        await gw.stop(drain_seconds=2)


async def test_postfix_unknown_user_is_refused_by_gateway(tmp_path: Path) -> None:
    """A strict domain's unknown local part is refused at RCPT: Postfix bounces it, the spool stays empty."""
    require_postfix()
    smtp_port, lmtp_port = free_port(), free_port()
    config = parse_config(gateway_config(tmp_path, smtp_port, lmtp_port), base_dir=str(tmp_path))
    gw = await start_gateway(config, workers=False)
    pf = PrivatePostfix(domain="example.test", relay_port=smtp_port)
    await asyncio.to_thread(pf.start)
    try:
        def submit() -> None:
            with smtplib.SMTP("127.0.0.1", pf.port) as s:
                s.sendmail("alice@client.test", ["nobody@example.test"], sample(99))

        await asyncio.to_thread(submit)
        await _wait_for(lambda: "550 5.1.1" in pf.maillog())
        assert list_messages(gw.engine) == []
        assert "status=bounced" in pf.maillog()
    finally:
        await asyncio.to_thread(pf.stop)
        await gw.stop(drain_seconds=2)

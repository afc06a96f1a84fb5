"""Mail Odoo submits with the null reverse-path (`MAIL FROM:<>`: a DSN, an auto-reply) is relayed with the null
reverse-path: never `MAIL FROM:<<>>`, and never a VERP address that would make a bounce of it come back."""

from __future__ import annotations

import asyncio

import aiosmtplib
import pytest

from gateway.config import parse_config
from gateway.relay import reverse_path, verp_domain
from gateway.relay_service import start_outbound_services
from gateway.store import open_store
from tests.test_relay_support import SECRET, RawSmtpServer, base_config, free_port

pytestmark = pytest.mark.events

AUTO_REPLY = (b"From: Odoo <notifications@example.test>\r\nTo: x@dest.test\r\nSubject: Auto-reply\r\n"
              b"Auto-Submitted: auto-replied\r\nMessage-ID: <ar1@example.test>\r\n\r\nhello\r\n")


def test_the_null_sender_gets_no_verp_domain() -> None:
    table = parse_config(base_config(smarthost_port=25, tracking_port=free_port()), base_dir=".").alias_table()
    assert verp_domain("<>", table) is None and verp_domain("", table) is None
    assert verp_domain("bounce@example.test", table) == "example.test"
    assert (reverse_path("<>"), reverse_path(""), reverse_path(None)) == ("", "", "")
    assert reverse_path("bounce@example.test") == "bounce@example.test"


@pytest.mark.parametrize("verp", [True, False])
async def test_a_null_sender_submission_goes_out_with_the_null_reverse_path(monkeypatch, tmp_path, verp) -> None:
    """The listener keeps the null reverse-path as "<>": with VERP it got a `bounce+…` return path (a bounce of
    an auto-reply would come back: RFC 5321 §4.5.5, RFC 3834), without VERP it went out as `MAIL FROM:<<>>`."""
    monkeypatch.setenv("MAILGATE_SECRET", SECRET)
    host = await RawSmtpServer().start()
    engine = open_store(f"sqlite:///{tmp_path / 'gw.db'}", synchronous="NORMAL")
    cfg = parse_config(base_config(smarthost_port=host.port, tracking_port=free_port(), verp=verp), base_dir=".")
    stop = asyncio.Event()
    services = await start_outbound_services(cfg, engine, stop)
    try:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=services.submission_ports[0], start_tls=False)
        await client.connect()
        await client.sendmail("", ["x@dest.test"], AUTO_REPLY)
        await client.quit()
        for _ in range(200):
            if host.accepted:
                break
            await asyncio.sleep(0.05)
        assert [line.split(" SIZE=")[0] for line in host.lines if line.startswith("MAIL")] == ["MAIL FROM:<>"]
    finally:
        stop.set()
        await services.close()
        await host.stop()
        engine.dispose()

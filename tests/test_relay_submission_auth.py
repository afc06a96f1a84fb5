"""AUTH on a submission listener without a certificate: refused (538 5.7.11, not advertised) to clients beyond
loopback unless `allow_plaintext_auth` says otherwise; a loopback client may still log in."""

from __future__ import annotations

import asyncio
import base64

import pytest

import gateway.relay
from gateway.config import parse_config
from gateway.relay import is_loopback_peer
from gateway.relay_service import start_outbound_services
from gateway.store import open_store
from tests.smtp_wire import WireClient
from tests.test_relay_support import SECRET, base_config, free_port

pytestmark = pytest.mark.events

LOGIN = "AUTH PLAIN " + base64.b64encode(b"\0odoo\0odoo-pw").decode()


@pytest.fixture
def engine(tmp_path):
    eng = open_store(f"sqlite:///{tmp_path / 'gw.db'}", synchronous="NORMAL")
    yield eng
    eng.dispose()


def config(**listener):  # type: ignore[no-untyped-def]
    cfg = base_config(smarthost_port=25, tracking_port=free_port(), submission_networks=("10.0.0.0/8",), auth=True)
    cfg["listeners"][0].update(listener)
    return parse_config(cfg, base_dir=".")


async def ehlo_and_login(cfg, engine) -> tuple[str, int]:  # type: ignore[no-untyped-def]
    stop = asyncio.Event()
    services = await start_outbound_services(cfg, engine, stop)
    try:
        client = await WireClient.connect("127.0.0.1", services.submission_ports[0])
        await client.reply()
        _, extensions = await client.cmd("EHLO odoo.test")
        code, _ = await client.cmd(LOGIN)
        await client.close()
        return extensions, code
    finally:
        stop.set()
        await services.close()


@pytest.fixture
def remote_client(monkeypatch):
    """Every peer counts as beyond loopback (the test client can only come from 127.0.0.1)."""
    monkeypatch.setattr(gateway.relay, "is_loopback_peer", lambda peer: False, raising=False)


async def test_auth_without_tls_is_refused_to_a_client_beyond_loopback(monkeypatch, engine, remote_client):
    """The listener only warned, then offered and accepted AUTH in clear: the password crossed the network."""
    monkeypatch.setenv("MAILGATE_SECRET", SECRET)
    monkeypatch.setenv("MG_TEST_SUBMIT_PW", "odoo-pw")
    extensions, code = await ehlo_and_login(config(), engine)
    assert "AUTH" not in extensions and code == 538


async def test_auth_without_tls_is_accepted_when_the_operator_opted_in(monkeypatch, engine, remote_client):
    monkeypatch.setenv("MAILGATE_SECRET", SECRET)
    monkeypatch.setenv("MG_TEST_SUBMIT_PW", "odoo-pw")
    extensions, code = await ehlo_and_login(config(allow_plaintext_auth=True), engine)
    assert "AUTH" in extensions and code == 235


async def test_auth_without_tls_is_accepted_from_loopback(monkeypatch, engine):
    monkeypatch.setenv("MAILGATE_SECRET", SECRET)
    monkeypatch.setenv("MG_TEST_SUBMIT_PW", "odoo-pw")
    extensions, code = await ehlo_and_login(config(), engine)
    assert "AUTH" in extensions and code == 235


def test_loopback_peers() -> None:
    assert is_loopback_peer(("127.0.0.1", 4000)) and is_loopback_peer(("::1", 4000, 0, 0))
    assert is_loopback_peer(("::ffff:127.0.0.1", 4000, 0, 0))
    assert not is_loopback_peer(("192.0.2.7", 4000)) and not is_loopback_peer(None)


def test_the_operator_is_told_auth_is_unavailable_without_a_certificate() -> None:
    assert "AUTH is unavailable without a certificate" in (config().listeners[0].plaintext_auth_note() or "")
    assert "in clear" in (config(allow_plaintext_auth=True).listeners[0].plaintext_auth_note() or "")
    assert config(tls_cert="c.pem", tls_key="k.pem").listeners[0].plaintext_auth_note() is None

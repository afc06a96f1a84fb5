"""The smarthost's refusals of our own setup (a login without its password, AUTH or MAIL FROM refused, relaying
denied) are the operator's to fix: a startup error or a deferral logged as an error, never a bounce of the mail."""

from __future__ import annotations

import asyncio
import logging

import pytest

from gateway.config import ConfigError, parse_config
from gateway.outbound import SmtpTransport
from gateway.relay_service import start_outbound_services
from gateway.store import open_store
from tests.test_relay_support import SECRET, RawSmtpServer, base_config, free_port

pytestmark = pytest.mark.events

MAIL = b"Subject: t\r\n\r\nhi\r\n"


def smarthost_config(port: int, **outbound):  # type: ignore[no-untyped-def]
    return parse_config(base_config(smarthost_port=port, tracking_port=free_port(), **outbound), base_dir=".")


def test_a_smarthost_login_needs_a_password_variable() -> None:
    with pytest.raises(ConfigError, match="smarthost_login needs smarthost_password_env"):
        smarthost_config(25, smarthost_login="odoo")


async def test_a_smarthost_login_whose_password_variable_is_unset_stops_the_relay_at_start(monkeypatch, tmp_path):
    """The password was read as optional: a variable lost in a deploy skipped AUTH, the smarthost answered 530
    and every copy in the queue was hard-bounced."""
    monkeypatch.setenv("MAILGATE_SECRET", SECRET)
    monkeypatch.delenv("MG_TEST_SMARTHOST_PW", raising=False)
    cfg = smarthost_config(25, smarthost_login="odoo", smarthost_password_env="MG_TEST_SMARTHOST_PW")
    with pytest.raises(ConfigError, match="MG_TEST_SMARTHOST_PW is not set"):
        SmtpTransport(cfg)
    engine = open_store(f"sqlite:///{tmp_path / 'd.db'}")
    try:
        with pytest.raises(ConfigError, match="MG_TEST_SMARTHOST_PW"):
            await start_outbound_services(cfg, engine, asyncio.Event())
    finally:
        engine.dispose()


@pytest.mark.parametrize("server", [
    {"mail": "530 5.7.0 Authentication required"},
    {"mail": "553 5.7.1 <bounce@example.test>: Sender address rejected: not owned by user odoo"},
    {"mail": "550 5.1.8 Sender domain not allowed"},
    {"rcpt": "554 5.7.1 <lee@customer.test>: Relay access denied"},
    {"rcpt": "530 5.7.0 Authentication required"},
    {"ehlo": ("250-raw.test", "250 AUTH PLAIN"), "auth": "535 5.7.8 Authentication credentials invalid"},
    {"ehlo": ("250-raw.test", "250 AUTH PLAIN"), "auth": "554 5.7.0 Too many failed logins"},
])
async def test_a_smarthost_refusing_our_setup_defers_and_logs_an_error(monkeypatch, caplog, server) -> None:
    monkeypatch.setenv("MG_TEST_SMARTHOST_PW", "pw")
    host = await RawSmtpServer(**server).start()
    login = {"smarthost_login": "odoo", "smarthost_password_env": "MG_TEST_SMARTHOST_PW"} if "auth" in server else {}
    transport = SmtpTransport(smarthost_config(host.port, **login))
    try:
        with caplog.at_level(logging.ERROR, logger="gateway.outbound"):
            result = await transport.send("bounce@example.test", "lee@customer.test", MAIL)
            await transport.send("bounce@example.test", "lee@customer.test", MAIL)
        assert result.outcome == "deferred" and result.status and result.status.startswith("4.")
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1  # the same refusal again is not logged again at once
        assert "smarthost" in errors[0].getMessage()
    finally:
        await transport.close()
        await host.stop()


@pytest.mark.parametrize("rcpt", ["550 5.1.1 <lee@customer.test>: Recipient address rejected: User unknown",
                                  "554 5.7.1 <lee@customer.test>: Recipient address rejected: Access denied"])
async def test_a_smarthost_refusing_the_recipient_still_bounces(rcpt: str) -> None:
    host = await RawSmtpServer(rcpt=rcpt).start()
    transport = SmtpTransport(smarthost_config(host.port))
    try:
        result = await transport.send("bounce@example.test", "lee@customer.test", MAIL)
        assert (result.outcome, result.code) == ("bounced", int(rcpt[:3]))
    finally:
        await transport.close()
        await host.stop()

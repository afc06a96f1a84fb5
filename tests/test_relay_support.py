"""Test doubles for the outbound tests (no tests here): an aiosmtpd smarthost, a webhook receiver, an Odoo-shaped mail."""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from typing import Any

from aiohttp import web
from aiosmtpd.smtp import SMTP

from gateway.events import SIGNATURE_HEADER, verify

SECRET = "test-site-secret-0123456789"
HOOK_SECRET = "test-hook-secret-abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Relayed:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes


@dataclass
class Smarthost:
    """Accepts mail and keeps it; `replies` maps a recipient to a DATA-time answer list (popped in order)."""

    received: list[Relayed] = field(default_factory=list)
    rcpt_replies: dict[str, list[str]] = field(default_factory=dict)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    server: Any = None
    port: int = 0
    keep: bool = True
    idle_timeout: float = 300.0

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # type: ignore[no-untyped-def]
        answers = self.rcpt_replies.get(address)
        if answers:
            return answers.pop(0)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        if self.keep:
            self.received.append(Relayed(envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        else:
            self.received.append(Relayed(envelope.mail_from, list(envelope.rcpt_tos), b""))
        self.arrived.set()
        return "250 2.0.0 Ok: queued"

    async def start(self) -> "Smarthost":
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: SMTP(self, decode_data=False, timeout=self.idle_timeout),
                                              "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def wait_for(self, n: int, timeout: float = 10.0) -> list[Relayed]:
        async def _wait() -> None:
            while len(self.received) < n:
                self.arrived.clear()
                await self.arrived.wait()
        await asyncio.wait_for(_wait(), timeout)
        return self.received

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()


@dataclass
class WebhookReceiver:
    """Verifies the signature of every POST; answers 503 while `down`."""

    secret: bytes = HOOK_SECRET.encode()
    down: bool = False
    events: list[dict[str, Any]] = field(default_factory=list)
    bad_signatures: int = 0
    refused: int = 0
    runner: web.AppRunner | None = None
    port: int = 0

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if not verify(self.secret, body, request.headers.get(SIGNATURE_HEADER, "")):
            self.bad_signatures += 1
            return web.Response(status=400)
        if self.down:
            self.refused += 1
            return web.Response(status=503)
        self.events.append(json.loads(body))
        return web.Response(status=204)

    async def start(self) -> "WebhookReceiver":
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def of_type(self, type_: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == type_]

    async def wait_for(self, predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while not predicate(self.events):
            if loop.time() > end:
                raise AssertionError(f"webhook receiver: condition not met; got {[e['type'] for e in self.events]}")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self.runner:
            await self.runner.cleanup()


def odoo_mail(*, res_id: int = 7, model: str = "crm.lead", to: str = "alice@customer.test, bob@other.test",
              html: str | None = None) -> bytes:
    """A mail shaped like Odoo 17's outgoing notifications (spec §6)."""
    msg = EmailMessage()
    msg["Message-Id"] = f"<368396033905967.1673346177.695352554321289-openerp-{res_id}-{model}@odoo-host>"
    msg["references"] = msg["Message-Id"]
    msg["From"] = '"Mitchell Admin" <notifications@example.test>'
    msg["Reply-To"] = '"YourCompany Sales" <sales@example.test>'
    msg["To"] = to
    msg["Subject"] = "Your quotation"
    msg["Return-Path"] = "bounce@example.test"
    msg["X-Odoo-Objects"] = f"{model}-{res_id}"
    msg.set_content("Hello, see https://shop.example.com/quote/1")
    msg.add_alternative(html or (
        '<html><body><p>Hello, see <a href="https://shop.example.com/quote/1?x=1&amp;y=2">your quote</a>, '
        '<a href="mailto:sales@example.test">write us</a>, '
        '<a href="https://odoo.example.test/r/Xy12/m/9">tracked by Odoo</a>'
        '<img src="https://odoo.example.test/mail/track/9/blank.gif"/></p></body></html>'), subtype="html")
    return msg.as_bytes(policy=SMTP_POLICY)


def base_config(*, submission_networks: tuple[str, ...] = ("127.0.0.0/8",), smarthost_port: int,
                tracking_port: int, hook_url: str | None = None, auth: bool = False,
                **outbound: Any) -> dict[str, Any]:
    listener: dict[str, Any] = {"name": "submission", "kind": "submission", "host": "127.0.0.1", "port": 0,
                                "allowed_networks": list(submission_networks)}
    if auth:
        listener["auth_users_env"] = {"odoo": "MG_TEST_SUBMIT_PW"}
    out = {"smarthost": f"127.0.0.1:{smarthost_port}", "retry_min_seconds": 0.2, "retry_max_seconds": 1.0,
           "poll_interval": 0.1}
    out.update(outbound)
    cfg: dict[str, Any] = {
        "listeners": [listener],
        "domains": [{"name": "example.test"}],
        "aliases": [{"address": "sales@example.test", "model": "crm.lead"}],
        "outbound": out,
        "tracking": {"base_url": f"http://127.0.0.1:{tracking_port}", "host": "127.0.0.1", "port": tracking_port,
                     "prefetch_seconds": 0},
        "events": {"poll_interval": 0.1, "webhooks": [] if not hook_url else [
            {"name": "seq", "url": hook_url, "secret_env": "MG_TEST_HOOK_SECRET", "retry_min_seconds": 0.1,
             "retry_max_seconds": 0.3}]},
        "storage": {"group_commit_ms": 1.0, "sqlite_synchronous": "NORMAL"},
    }
    return cfg


@dataclass
class RawSmtpServer:
    """A line-level SMTP server whose every answer the test sets, for what aiosmtpd will not do: refuse at the
    greeting, fail AUTH in clear, break the TLS handshake after 220 to STARTTLS, answer slowly after the final
    dot. `log` holds the verbs it was sent ("CONNECT" per connection, "EOF" when the client hung up without
    QUIT); `lines` the command lines as sent; `data` each DATA payload as sent (dot-stuffed, without the final
    dot); `accepted` counts mails it answered `data_end` to."""

    greeting: str = "220 raw.test ESMTP"
    ehlo: tuple[str, ...] = ("250-raw.test", "250 SIZE 100000")
    starttls: str = "220 2.0.0 Ready to start TLS"   # a 220 is followed by bytes that are not TLS
    auth: str = "235 2.7.0 Authentication successful"
    mail: str = "250 2.1.0 OK"
    rcpt: str = "250 2.1.5 OK"
    data_end: str = "250 2.0.0 Ok: queued"
    data_end_delay: float = 0.0
    log: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    data: list[bytes] = field(default_factory=list)
    accepted: int = 0
    server: Any = None
    port: int = 0

    async def start(self) -> "RawSmtpServer":
        self.server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.log.append("CONNECT")
        try:
            await self._converse(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(self.greeting.encode() + b"\r\n")
        if not self.greeting.startswith("2"):
            await writer.drain()
            return
        while line := await reader.readline():
            self.lines.append(line.decode(errors="replace").rstrip("\r\n"))
            verb = self.lines[-1].strip().split(" ")[0].split(":")[0].upper()
            self.log.append(verb)
            answer = await self._answer(verb, reader, writer)
            if answer is None:
                return
            writer.write(answer.encode() + b"\r\n")
            await writer.drain()
            if answer.startswith("421") or verb == "QUIT":
                return
        self.log.append("EOF")  # the client closed the connection

    async def _answer(self, verb: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str | None:
        if verb == "EHLO":
            return "\r\n".join(self.ehlo)
        if verb == "HELO":
            return "250 raw.test"
        if verb == "STARTTLS":
            if not self.starttls.startswith("220"):
                return self.starttls
            writer.write(self.starttls.encode() + b"\r\n")
            await writer.drain()
            await reader.read(10)  # the client's ClientHello
            writer.write(b"this is not TLS\r\n" * 5)
            await writer.drain()
            return None
        if verb == "DATA":
            writer.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            await writer.drain()
            payload = []
            while (line := await reader.readline()) not in (b".\r\n", b""):
                payload.append(line)
            self.data.append(b"".join(payload))
            await asyncio.sleep(self.data_end_delay)
            self.accepted += self.data_end.startswith("250")
            return self.data_end
        return {"AUTH": self.auth, "MAIL": self.mail, "RCPT": self.rcpt, "RSET": "250 2.0.0 OK",
                "NOOP": "250 2.0.0 OK", "QUIT": "221 2.0.0 Bye"}.get(verb, "502 5.5.2 Command not recognised")

"""A raw SMTP/LMTP client for tests: sends exact bytes, reads exact replies (no library smoothing)."""

from __future__ import annotations

import asyncio


class WireClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, host: str, port: int) -> "WireClient":
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        return cls(reader, writer)

    async def reply(self, timeout: float = 10.0) -> tuple[int, str]:
        """One (possibly multi-line) reply: code and the joined text."""
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            if not line:
                raise ConnectionError("server closed the connection")
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(text[4:])
            if len(text) < 4 or text[3] != "-":
                return int(text[:3]), "\n".join(lines)

    async def cmd(self, line: str | bytes) -> tuple[int, str]:
        data = line if isinstance(line, bytes) else line.encode()
        self.writer.write(data + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def send_data(self, body: bytes) -> tuple[int, str]:
        """DATA with dot-stuffing; `body` must use CRLF line endings (or be deliberately broken)."""
        code, text = await self.cmd("DATA")
        assert code == 354, (code, text)
        stuffed = body.replace(b"\r\n.", b"\r\n..")
        if stuffed.startswith(b"."):
            stuffed = b"." + stuffed
        if stuffed and not stuffed.endswith(b"\r\n"):
            stuffed += b"\r\n"
        self.writer.write(stuffed + b".\r\n")
        await self.writer.drain()
        return await self.reply(timeout=60)

    async def close(self) -> None:
        try:
            self.writer.write(b"QUIT\r\n")
            await self.writer.drain()
        except ConnectionError:
            pass
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


async def rcpt_reply(port: int, address: str, host: str = "127.0.0.1") -> tuple[int, str]:
    """The reply to `RCPT TO:<address>` in a fresh session (EHLO, MAIL FROM) on a listener."""
    c = await WireClient.connect(host, port)
    try:
        await c.reply()
        await c.cmd("EHLO t.test")
        await c.cmd("MAIL FROM:<a@client.test>")
        return await c.cmd(f"RCPT TO:<{address}>")
    finally:
        await c.close()


def make_mail(subject: str = "hello", *, size: int = 0, message_id: str | None = "<m1@client.test>",
              extra_headers: str = "", body: str | None = None) -> bytes:
    """A small valid CRLF message; `size` pads the body with 76-char lines."""
    head = (f"From: Alice <alice@client.test>\r\nTo: sales@example.test\r\nSubject: {subject}\r\n"
            + (f"Message-ID: {message_id}\r\n" if message_id else "") + extra_headers
            + "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n")
    text = body if body is not None else "Hello,\r\nthis is a test.\r\n"
    raw = (head + text).encode()
    if size > len(raw):
        line = b"x" * 76 + b"\r\n"
        raw += line * ((size - len(raw)) // len(line) + 1)
    return raw

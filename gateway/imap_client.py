"""aioimaplib, adapted for pulling whole mailboxes: an iterative response reader, a linear FETCH, STARTTLS.

Why not the stock client as is:
* its response reader recurses once per line, so one FETCH response of a few hundred small messages (one
  256 KiB read holds ~1,000 lines) raises RecursionError; it also copies the rest of the read buffer at every
  line. `PullProtocol._handle_responses` does the same work in a loop, with offsets.
* its FETCH completion check rescans every line received so far at each new line (quadratic in the batch).
* it has no STARTTLS.
* it hands a command only the untagged lines it expects (FETCH and EXPUNGE, or the command's own name), so
  `* n EXISTS` sent during a SEARCH or STORE is dropped; `PullProtocol` counts them (`exists_announced`).
The protocol semantics (commands, states, IDLE) are aioimaplib's own; only these paths are replaced.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from typing import Any, Callable, Optional

import aioimaplib
from aioimaplib.aioimaplib import CRLF, Command, IncompleteRead, literal_data_re

_EXISTS_LINE = re.compile(rb"^\* (\d+) EXISTS\b", re.IGNORECASE)


class PullProtocol(aioimaplib.IMAP4ClientProtocol):
    """aioimaplib's protocol with a loop instead of recursion in the response reader, noting `* n EXISTS`."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        #: how many `* n EXISTS` lines arrived on this connection, whatever command they came with
        self.exists_announced = 0
        #: the message count the latest of them gave
        self.exists: int | None = None

    def _handle_line(self, line: bytes, current_cmd: Command | None) -> Command | None:
        """Count `* n EXISTS` before aioimaplib routes the line.

        Servers announce new mail in the response of whatever command is running, and Dovecot does not
        announce it again once IDLE starts; aioimaplib gives a SEARCH only `SEARCH` lines and logs the rest
        as ignored. The puller compares the count around its last search to know whether to search again.
        """
        if (m := _EXISTS_LINE.match(line)) is not None:
            self.exists_announced += 1
            self.exists = int(m.group(1))
        return super()._handle_line(line, current_cmd)

    def _handle_responses(self, data: bytes, line_handler: Callable[[bytes, Command], Optional[Command]],
                          current_cmd: Command | None = None) -> None:
        # Step for step the upstream recursion (same calls, same order, same IncompleteRead cases).
        pos, end = 0, len(data)
        while True:
            if pos >= end:
                if self.pending_sync_command is not None:
                    self.pending_sync_command.flush()
                if current_cmd is not None and current_cmd.wait_data():
                    raise IncompleteRead(current_cmd)
                return
            if current_cmd is not None and current_cmd.wait_literal_data():
                missing = current_cmd._expected_size - len(current_cmd._resp_literal_data)
                take = min(missing, end - pos)
                current_cmd.append_literal_data(data[pos:pos + take])
                pos += take
                if current_cmd.wait_literal_data():
                    raise IncompleteRead(current_cmd)
            eol = data.find(CRLF, pos)
            if eol < 0:
                raise IncompleteRead(current_cmd, data[pos:])
            line = data[pos:eol]
            pos = eol + len(CRLF)
            cmd = line_handler(line, current_cmd)
            begin_literal = literal_data_re.match(line)
            if begin_literal:
                if cmd is None:
                    cmd = Command("NIL", "unused")
                cmd.begin_literal_data(int(begin_literal.group("size")))
                current_cmd = cmd
            elif cmd is not None and cmd.wait_data():
                current_cmd = cmd
            else:
                current_cmd = None


class PullClient(aioimaplib.IMAP4):
    """An aioimaplib client on `PullProtocol`; `ssl_context` given → implicit TLS."""

    def create_client(self, host: str, port: int, loop: asyncio.AbstractEventLoop | None,
                      conn_lost_cb: Callable[[Optional[Exception]], None] | None = None,
                      ssl_context: ssl.SSLContext | None = None) -> None:
        local_loop = loop if loop is not None else asyncio.get_running_loop()
        self.protocol = PullProtocol(local_loop, conn_lost_cb)
        self._client_task = local_loop.create_task(
            local_loop.create_connection(lambda: self.protocol, host, port, ssl=ssl_context))

    async def uid_fetch(self, uids: str, items: str) -> aioimaplib.Response:
        """`UID FETCH` with a linear completion check (the command timer restarts with every chunk read)."""
        proto = self.protocol
        return await proto.execute(BatchFetchCommand(proto.new_tag(), uids, items, prefix="UID", loop=proto.loop,
                                                     timeout=self.timeout))

    async def starttls(self, context: ssl.SSLContext, server_hostname: str) -> aioimaplib.Response:
        """STARTTLS, then the TLS handshake under the same protocol object, then fresh capabilities.

        Raises `aioimaplib.Abort` when the server does not offer it: falling back to plaintext would send
        the password in the clear.
        """
        proto = self.protocol
        if "STARTTLS" not in proto.capabilities:
            raise aioimaplib.Abort("server does not offer STARTTLS")
        resp = await asyncio.wait_for(proto.execute(Command("STARTTLS", proto.new_tag(), loop=proto.loop)),
                                      self.timeout)
        if resp.result != "OK":
            return resp
        loop = asyncio.get_running_loop()
        proto.transport = await loop.start_tls(proto.transport, proto, context, server_hostname=server_hostname)
        await asyncio.wait_for(proto.capability(), self.timeout)  # RFC 3501: forget pre-TLS capabilities
        return resp


class BatchFetchCommand(aioimaplib.FetchCommand):
    """aioimaplib's FETCH, with the parenthesis balance of the current message kept as lines arrive instead
    of recomputed over the whole response at every line; the verdict is the same. Each literal is stored as
    `bytes` once complete (`append_literal_data`)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._scanned = 0
        self._balance = 0
        self._literals: set[int] = set()  # indexes in the response lines that are literals

    def append_literal_data(self, data: bytes) -> bytes:
        """Upstream's, then a complete literal is turned into `bytes` at once and its bytearray dropped.

        `FetchedMessage.raw` is `bytes`: converted after the response, every message of the batch was in
        memory twice (the response's bytearrays and their copies) until the response was dropped; here only
        the message being converted is.
        """
        before = len(self._resp_lines)
        rest = super().append_literal_data(data)
        if len(self._resp_lines) > before:
            self._resp_lines[-1] = bytes(self._resp_lines[-1])
            self._literals.add(before)
        return rest

    def wait_data(self) -> bool:
        lines = self._resp_lines
        for idx in range(self._scanned, len(lines)):
            line = lines[idx]
            if type(line) is bytes and idx not in self._literals:  # literals are not counted, as upstream
                if self.FETCH_MESSAGE_DATA_RE.match(line):
                    self._balance = 0
                self._balance += line.count(b"(") - line.count(b")")
        self._scanned = len(lines)
        return self._balance != 0

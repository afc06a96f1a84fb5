"""SMTP/LMTP listener behaviour on the wire: durable 250, the right refusal codes, nothing half-stored."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from gateway.config import ListenerConfig
from gateway.listener import ListenerPolicy, SpoolHandler, bound_port, start_listener
from gateway.session_limits import SessionLimits
from gateway.spool import SpoolWriter, get_raw, list_messages
from gateway.store import open_store
from tests.smtp_wire import WireClient, make_mail


def simple_verdict(address: str) -> tuple[str, str]:
    """A test-local RCPT policy: example.test is strict with two users; everything else is foreign."""
    local, _, domain = address.lower().partition("@")
    if domain != "example.test":
        return "no_relay", "not a local domain"
    if local.split("+", 1)[0] in {"sales", "support", "bounce", "catchall", "postmaster"}:
        return "accept", "alias"
    return "unknown_user", "no such alias"


@dataclass
class Gateway:
    engine: object
    writer: SpoolWriter
    port: int
    handler: SpoolHandler

    async def client(self) -> WireClient:
        c = await WireClient.connect("127.0.0.1", self.port)
        code, _ = await c.reply()
        assert code == 220
        return c

    def stored(self) -> list:
        return list_messages(self.engine)


async def _gateway(tmp_path, **overrides) -> tuple[Gateway, asyncio.base_events.Server]:
    engine = open_store(f"sqlite:///{tmp_path}/spool.db")
    writer = SpoolWriter(engine)
    await writer.start()
    params = dict(name="test", kind="smtp", host="127.0.0.1", port=0, max_message_size=200_000, max_recipients=3)
    params.update(overrides)
    accept_8bit = params.pop("accept_8bit", True)
    free_space = params.pop("free_space", None)
    limits = params.pop("limits", None)
    cfg = ListenerConfig(**params)
    handler = SpoolHandler(writer, ListenerPolicy(cfg, simple_verdict, accept_8bit_without_8bitmime=accept_8bit,
                                                  free_space=free_space, primary_domain="example.test"))
    server = await start_listener(cfg, handler, hostname="mx.example.test", limits=limits)
    return Gateway(engine, writer, bound_port(server), handler), server


@pytest.fixture
async def gw(tmp_path) -> AsyncIterator[Gateway]:
    g, server = await _gateway(tmp_path)
    yield g
    server.close()
    await g.writer.close()


async def _envelope(c: WireClient, *rcpts: str, mail_from: str = "<alice@client.test>", ehlo: str = "EHLO client.test") -> None:
    assert (await c.cmd(ehlo))[0] == 250
    assert (await c.cmd(f"MAIL FROM:{mail_from}"))[0] == 250
    for r in rcpts:
        assert (await c.cmd(f"RCPT TO:<{r}>"))[0] == 250


async def test_accepts_and_stores_byte_exact(gw: Gateway) -> None:
    raw = make_mail(body="line one\r\n.a line starting with a dot\r\n..two dots\r\n\r\nend\r\n")
    raw = raw.replace(b"Subject: hello", "Subject: caf\u00e9 8-bit".encode())
    c = await gw.client()
    await _envelope(c, "sales@example.test", "Support@Example.TEST", mail_from="<alice@client.test> BODY=8BITMIME")
    code, text = await c.send_data(raw)
    assert code == 250 and "queued as" in text
    await c.close()
    [msg] = gw.stored()
    assert get_raw(gw.engine, msg.id) == raw
    assert msg.rcpt_tos == ("sales@example.test", "Support@Example.TEST")
    assert msg.mail_from == "alice@client.test"
    assert msg.helo == "client.test" and msg.client_addr == "127.0.0.1"
    assert msg.message_id == "<m1@client.test>" and msg.size == len(raw)
    assert msg.state == "received"


async def test_null_sender_and_empty_message(gw: Gateway) -> None:
    c = await gw.client()
    await _envelope(c, "bounce@example.test", mail_from="<>")
    assert (await c.send_data(b""))[0] == 250
    await c.close()
    [msg] = gw.stored()
    assert msg.mail_from == "" and get_raw(gw.engine, msg.id) == b""


async def test_rcpt_verdicts(gw: Gateway) -> None:
    c = await gw.client()
    assert (await c.cmd("EHLO client.test"))[0] == 250
    assert (await c.cmd("MAIL FROM:<alice@client.test>"))[0] == 250
    code, text = await c.cmd("RCPT TO:<someone@elsewhere.test>")
    assert code == 550 and text.startswith("5.7.1")
    code, text = await c.cmd("RCPT TO:<nobody@example.test>")
    assert code == 550 and text.startswith("5.1.1")
    assert (await c.cmd("RCPT TO:<sales+vip@example.test>"))[0] == 250
    await c.close()


async def test_too_many_recipients(gw: Gateway) -> None:
    c = await gw.client()
    await _envelope(c, "sales@example.test", "support@example.test", "catchall@example.test")
    code, text = await c.cmd("RCPT TO:<bounce@example.test>")
    assert code == 452 and text.startswith("4.5.3")
    # the three accepted recipients are still delivered
    assert (await c.send_data(make_mail()))[0] == 250
    await c.close()
    assert len(gw.stored()[0].rcpt_tos) == 3


async def test_oversize_declared_and_actual(gw: Gateway) -> None:
    c = await gw.client()
    ehlo = await c.cmd("EHLO client.test")
    assert "SIZE 200000" in ehlo[1] and "8BITMIME" in ehlo[1] and "SMTPUTF8" in ehlo[1]
    code, _ = await c.cmd("MAIL FROM:<alice@client.test> SIZE=999999")
    assert code == 552
    assert (await c.cmd("MAIL FROM:<alice@client.test>"))[0] == 250
    assert (await c.cmd("RCPT TO:<sales@example.test>"))[0] == 250
    code, text = await c.send_data(make_mail(size=400_000))
    assert code == 552 and text.startswith("5.3.4")
    # the session survives and the next message is accepted
    assert (await c.cmd("MAIL FROM:<alice@client.test>"))[0] == 250
    assert (await c.cmd("RCPT TO:<sales@example.test>"))[0] == 250
    assert (await c.send_data(make_mail(message_id="<m2@client.test>")))[0] == 250
    await c.close()
    assert [m.message_id for m in gw.stored()] == ["<m2@client.test>"]


@pytest.mark.parametrize("body, expect", [
    (b"x" * 1200 + b"\r\n", "longer than 998"),
    (b"line one\nline two\r\n", "bare <LF>"),
    (b"nul \x00 byte\r\n", "NUL"),
])
async def test_bad_content_refused_and_session_continues(gw: Gateway, body: bytes, expect: str) -> None:
    c = await gw.client()
    await _envelope(c, "sales@example.test")
    code, text = await c.send_data(make_mail(body="") + body)
    assert code == 554 and expect in text
    assert (await c.cmd("MAIL FROM:<alice@client.test>"))[0] == 250
    assert (await c.cmd("RCPT TO:<sales@example.test>"))[0] == 250
    assert (await c.send_data(make_mail()))[0] == 250
    await c.close()
    assert len(gw.stored()) == 1


async def test_8bit_without_8bitmime_policy(tmp_path) -> None:
    g, server = await _gateway(tmp_path, accept_8bit=False)
    try:
        c = await g.client()
        await _envelope(c, "sales@example.test")
        code, text = await c.send_data(make_mail(body="") + "caf\u00e9\r\n".encode())
        assert code == 554 and text.startswith("5.6.1")
        await _envelope(c, "sales@example.test", mail_from="<alice@client.test> BODY=8BITMIME", ehlo="RSET")
        assert (await c.send_data(make_mail(body="") + "caf\u00e9\r\n".encode()))[0] == 250
        await c.close()
    finally:
        server.close()
        await g.writer.close()


async def test_commands_out_of_order(gw: Gateway) -> None:
    c = await gw.client()
    assert (await c.cmd("MAIL FROM:<alice@client.test>"))[0] == 503  # before EHLO
    assert (await c.cmd("EHLO client.test"))[0] == 250
    assert (await c.cmd("RCPT TO:<sales@example.test>"))[0] == 503   # before MAIL
    assert (await c.cmd("DATA"))[0] == 503                            # before RCPT
    assert (await c.cmd("MAIL FROM:<alice@client.test>"))[0] == 250
    assert (await c.cmd("MAIL FROM:<alice@client.test>"))[0] == 503  # nested
    await c.close()
    assert gw.stored() == []


async def test_disconnect_mid_data_stores_nothing(gw: Gateway) -> None:
    c = await gw.client()
    await _envelope(c, "sales@example.test")
    assert (await c.cmd("DATA"))[0] == 354
    c.writer.write(make_mail()[:50])
    await c.writer.drain()
    c.writer.close()
    await asyncio.sleep(0.3)
    assert gw.stored() == []
    # and the server still serves others
    c2 = await gw.client()
    await _envelope(c2, "sales@example.test")
    assert (await c2.send_data(make_mail()))[0] == 250
    await c2.close()


async def test_store_failure_answers_451_never_250(gw: Gateway) -> None:
    gw.writer.fail_writes = OSError(28, "No space left on device")
    c = await gw.client()
    await _envelope(c, "sales@example.test")
    code, text = await c.send_data(make_mail())
    assert code == 451 and text.startswith("4.3.0")
    gw.writer.fail_writes = None
    await _envelope(c, "sales@example.test", ehlo="RSET")
    assert (await c.send_data(make_mail()))[0] == 250
    await c.close()
    assert len(gw.stored()) == 1


async def test_pipelined_session(gw: Gateway) -> None:
    c = await gw.client()
    raw = make_mail()
    c.writer.write(b"EHLO client.test\r\nMAIL FROM:<a@client.test>\r\nRCPT TO:<sales@example.test>\r\nDATA\r\n")
    await c.writer.drain()
    assert (await c.reply())[0] == 250
    assert (await c.reply())[0] == 250
    assert (await c.reply())[0] == 250
    assert (await c.reply())[0] == 354
    c.writer.write(raw + b".\r\nQUIT\r\n")
    await c.writer.drain()
    assert (await c.reply())[0] == 250
    assert (await c.reply())[0] == 221
    assert get_raw(gw.engine, gw.stored()[0].id) == raw


async def _lmtp_transaction(g: Gateway, *rcpts: str) -> WireClient:
    """An LMTP session up to the 354 after DATA; each RCPT gets 250 unless it is not a local alias (550)."""
    c = await WireClient.connect("127.0.0.1", g.port)
    assert (await c.reply())[0] == 220
    assert (await c.cmd("LHLO mta.test"))[0] == 250
    assert (await c.cmd("MAIL FROM:<a@client.test>"))[0] == 250
    for rcpt in rcpts:
        assert (await c.cmd(f"RCPT TO:<{rcpt}>"))[0] == (550 if rcpt.startswith("nobody@") else 250)
    assert (await c.cmd("DATA"))[0] == 354
    return c


async def test_lmtp_answers_per_recipient(tmp_path) -> None:
    g, server = await _gateway(tmp_path, kind="lmtp", name="lmtp")
    try:
        c = await _lmtp_transaction(g, "sales@example.test", "nobody@example.test", "support@example.test")
        c.writer.write(make_mail() + b".\r\n")
        await c.writer.drain()
        first = await c.reply()
        second = await c.reply()
        assert first[0] == second[0] == 250
        await c.close()
        [msg] = g.stored()
        assert msg.rcpt_tos == ("sales@example.test", "support@example.test") and msg.source == "lmtp"
    finally:
        server.close()
        await g.writer.close()


async def test_client_outside_allowed_networks_refused_at_connect(tmp_path) -> None:
    g, server = await _gateway(tmp_path, allowed_networks=("10.0.0.0/8",))
    try:
        c = await WireClient.connect("127.0.0.1", g.port)
        code, text = await c.reply()
        assert code == 554 and "not in allowed networks" in text
        assert await c.reader.read() == b""  # closed
    finally:
        server.close()
        await g.writer.close()


async def _greeting(port: int, local: str = "127.0.0.1") -> tuple[WireClient, int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(local, 0))
    c = WireClient(reader, writer)
    code, text = await c.reply()
    return c, code, text


async def test_sessions_past_the_listeners_limits_get_421_and_a_freed_slot_is_reused(tmp_path) -> None:
    g, server = await _gateway(tmp_path, max_connections=3, max_connections_per_client=2)
    try:
        a, code_a, _ = await _greeting(g.port)
        b, code_b, _ = await _greeting(g.port)
        c, code_c, text_c = await _greeting(g.port)  # a third from 127.0.0.1
        assert (code_a, code_b, code_c) == (220, 220, 421) and "from 127.0.0.1 (2)" in text_c
        assert await asyncio.wait_for(c.reader.read(), 2) == b""  # closed
        d, code_d, _ = await _greeting(g.port, "127.0.0.2")  # another client still gets in ...
        e, code_e, text_e = await _greeting(g.port, "127.0.0.3")  # ... up to the listener's total
        assert (code_d, code_e) == (220, 421) and "too many connections (3)" in text_e
        await _envelope(a, "sales@example.test")  # the admitted sessions are served as usual
        assert (await a.send_data(make_mail(message_id="<limits@client.test>")))[0] == 250
        await b.close()
        for _ in range(50):  # the server sees the QUIT and frees b's slot
            f, code_f, _ = await _greeting(g.port)
            if code_f == 220:
                break
            await asyncio.sleep(0.05)
        assert code_f == 220
        for client in (a, d, f):
            await client.close()
    finally:
        server.close()
        await g.writer.close()


def test_session_limits_count_per_client_and_a_flood_of_refusals_is_one_warning(caplog) -> None:
    from gateway.session_limits import SessionLimits

    limits = SessionLimits(3, 2, name="smtp", warn_every=60)
    assert [limits.admit(c) for c in ("a", "a", "b")] == [None, None, None]
    with caplog.at_level(logging.WARNING, logger="gateway.session_limits"):
        refusals = [limits.admit("c") for _ in range(1000)]
    assert set(refusals) == {"too many connections (3)"} and len(caplog.records) == 1
    limits.leave("b")
    assert limits.admit("a") == "too many connections from a (2)" and limits.admit("c") is None
    limits.leave("a")
    limits.leave("a")
    assert limits.by_client == {"c": 1} and limits.open == 1


async def test_concurrent_sessions_group_commit(gw: Gateway) -> None:
    async def one(i: int) -> int:
        c = await gw.client()
        await _envelope(c, "sales@example.test")
        code, _ = await c.send_data(make_mail(message_id=f"<c{i}@client.test>"))
        await c.close()
        return code

    codes = await asyncio.gather(*[one(i) for i in range(40)])
    assert codes == [250] * 40
    assert sorted(m.message_id for m in gw.stored()) == sorted(f"<c{i}@client.test>" for i in range(40))


async def test_idle_session_times_out_but_active_one_does_not(tmp_path) -> None:
    g, server = await _gateway(tmp_path, idle_timeout=0.6)
    try:
        active = await g.client()
        idle = await g.client()
        for _ in range(6):  # commands keep moving the deadline
            assert (await active.cmd("NOOP"))[0] == 250
            await asyncio.sleep(0.25)
        assert await asyncio.wait_for(idle.reader.read(), 2) == b"421 4.4.2 mx.example.test Error: timeout exceeded\r\n"
        assert (await active.cmd("NOOP"))[0] == 250
        await active.close()
    finally:
        server.close()
        await g.writer.close()


async def test_a_slow_but_steady_data_transfer_is_not_cut_off_by_the_idle_timeout(tmp_path) -> None:
    """The idle timeout is inactivity (RFC 5321 §4.5.3.2: per receive during DATA), not the length of a
    transfer: a large message over a slow link keeps arriving and must not be answered 421 half-way."""
    g, server = await _gateway(tmp_path, idle_timeout=0.6)
    try:
        c = await g.client()
        await _envelope(c, "sales@example.test")
        assert (await c.cmd("DATA"))[0] == 354
        body = make_mail(message_id="<slow@client.test>")
        pieces = [body[i:i + len(body) // 6 + 1] for i in range(0, len(body), len(body) // 6 + 1)]
        for piece in pieces:  # about 2 s in all, never 0.6 s without a byte
            c.writer.write(piece)
            await c.writer.drain()
            await asyncio.sleep(0.3)
        c.writer.write(b".\r\n")
        assert (await c.reply())[0] == 250
        await c.close()
        assert [m.message_id for m in g.stored()] == ["<slow@client.test>"]
    finally:
        server.close()
        await g.writer.close()


@pytest.mark.parametrize("line_len, accepted", [(998, True), (999, False), (5000, False)])
@pytest.mark.parametrize("position", ["first", "middle", "last"])
async def test_line_length_limit_is_exact(gw: Gateway, line_len: int, accepted: bool, position: str) -> None:
    line = b"y" * line_len + b"\r\n"
    body = {"first": line + b"ok\r\n", "middle": b"ok\r\n" + line + b"ok\r\n", "last": b"ok\r\n" + line}[position]
    raw = body if position == "first" else make_mail(body="") + body
    c = await gw.client()
    await _envelope(c, "sales@example.test")
    code, _ = await c.send_data(raw)
    await c.close()
    assert (code == 250) is accepted


@pytest.mark.parametrize("chunked", [False, True])
async def test_oversize_refused_whether_it_arrives_at_once_or_in_pieces(gw: Gateway, chunked: bool) -> None:
    c = await gw.client()
    await _envelope(c, "sales@example.test")
    assert (await c.cmd("DATA"))[0] == 354
    body = make_mail(size=400_000) + b".\r\n"
    if chunked:
        for i in range(0, len(body), 50_000):
            c.writer.write(body[i:i + 50_000])
            await c.writer.drain()
            await asyncio.sleep(0.02)
    else:
        c.writer.write(body)
        await c.writer.drain()
        await asyncio.sleep(0.2)  # let it all land in the server's buffer before the server looks
    code, text = await c.reply()
    assert code == 552 and text.startswith("5.3.4")
    assert (await c.cmd("NOOP"))[0] == 250  # the session goes on after the oversize message
    await c.close()
    assert gw.stored() == []


async def test_read_data_refuses_an_oversize_message_already_in_the_buffer() -> None:
    """The race CI hit: the whole message and its terminator were buffered before DATA looked at them."""
    from gateway.listener import LeanSMTPMixin

    reader = asyncio.StreamReader(limit=1 << 20)
    reader.feed_data(b"x" * 5000 + b"\r\n.\r\nQUIT\r\n")
    with pytest.raises(asyncio.LimitOverrunError):
        await LeanSMTPMixin._read_data(None, reader, 1000)  # type: ignore[arg-type]
    reader2 = asyncio.StreamReader(limit=1 << 20)
    reader2.feed_data(b"small\r\n..dot\r\n.\r\nQUIT\r\n")
    assert await LeanSMTPMixin._read_data(None, reader2, 1000) == (b"small\r\n..dot\r\n", True)  # type: ignore[arg-type]
    assert await reader2.readline() == b"QUIT\r\n"  # pipelined commands stay for the command loop


async def test_read_data_finds_the_terminator_and_dot_lines_however_the_bytes_arrive() -> None:
    """Against the plain definition (the first CRLF.CRLF after a leading CRLF; any other line starting with a
    dot), with messages made of dot-heavy pieces, cut into random reads — a cut may fall inside the
    terminator, inside a CRLF, or right after a dot."""
    import random

    from gateway.listener import LeanSMTPMixin

    rng = random.Random(11)
    pieces = [b"\r\n", b".", b"..", b"x", b"\r", b"\n", b"\r\n.", b".\r\n", b"ab"]
    for _ in range(3000):
        body = b"".join(rng.choice(pieces) for _ in range(rng.randrange(0, 14)))
        wire = body + rng.choice([b"\r\n.\r\n", b".\r\n"]) + rng.choice([b"", b"QUIT\r\n", b".\r\n"])
        framed = b"\r\n" + wire
        idx = framed.find(b"\r\n.\r\n")
        if idx < 0:
            continue
        want = framed[2:idx + 2]
        want_dots = any(line.startswith(b".") for line in (b"\r\n" + want).split(b"\r\n")[1:])
        reader = asyncio.StreamReader(limit=1 << 20)
        cuts = sorted(rng.sample(range(1, len(wire)), min(len(wire) - 1, rng.randrange(0, 4)))) if len(wire) > 1 else []

        async def feed() -> None:
            last = 0
            for cut in [*cuts, len(wire)]:
                reader.feed_data(wire[last:cut])
                last = cut
                await asyncio.sleep(0)
            reader.feed_eof()  # a missed terminator fails the read instead of waiting for ever

        feeder = asyncio.ensure_future(feed())
        got = await LeanSMTPMixin._read_data(None, reader, 1 << 20)  # type: ignore[arg-type]
        await feeder
        assert got == (want, want_dots), (wire, cuts)
        assert bytes(reader._buffer) == framed[idx + 5:]  # type: ignore[attr-defined]


def _line_fault_reference(data: bytes, limit: int) -> str | None:
    """The plain definition: split on CRLF; a LF left inside a piece is bare; a piece longer than `limit`
    (bare CRs included) is a long line."""
    pieces = data.split(b"\r\n")
    if any(b"\n" in p for p in pieces):
        return "bare_lf"
    return "long" if any(len(p) > limit for p in pieces) else None


def test_line_fault_agrees_with_the_plain_definition() -> None:
    """line_fault searches and jumps instead of splitting on CRLF; on random messages (mixes of CRLF, bare CR, bare
    LF, line lengths around the limit and the size of its look-ahead window, with and without a final CRLF) it
    must give the same answer as the plain definition."""
    import random

    from gateway.listener import line_fault

    rng = random.Random(20261122)
    limit = 40
    seen = {"bare_lf": 0, "long": 0, None: 0}
    for _ in range(6000):
        parts = []
        for _ in range(rng.randint(0, 12)):
            parts.append(b"x" * rng.choice([0, 1, 20, limit - 1, limit, limit + 1, limit + 2, limit + 3, 90]))
            parts.append(rng.choice([b"\r\n"] * 12 + [b"\r", b"\n", b"\r\r\n", b"\n\r"]))
        if parts and rng.random() < 0.8:  # as DATA hands it over: ending in the CRLF before the final "."
            parts.append(b"\r\n")
        data = b"".join(parts)
        got = line_fault(data, limit)
        assert got == _line_fault_reference(data, limit), data
        seen[got] += 1
    assert all(n > 100 for n in seen.values()), seen  # every outcome was exercised
    big = (b"y" * 70 + b"\r\n") * 16000  # over 1 MiB
    assert line_fault(big, 998) is None
    assert line_fault(big + b"z" * 999 + b"\r\n", 998) == "long"
    assert line_fault(b"z" * 999 + b"\r\n" + big, 998) == "long"
    assert line_fault(big + b"a\nb\r\n", 998) == "bare_lf"


# ------------------------------------------------------------------------------- hostile and broken clients
async def test_a_client_sending_bytes_that_are_not_utf8_cannot_fail_other_sessions(gw: Gateway) -> None:
    """aiosmtpd keeps a non-UTF-8 byte as a lone surrogate that SQLite cannot encode. In a group commit it
    failed every message of the batch; now it is refused at the command, and the others all get 250."""
    bad = await gw.client()
    bad.writer.write(b"EHLO \xff.client.test\r\n")
    await bad.writer.drain()
    code, text = await bad.reply()
    assert code == 501 and text.startswith("5.5.2")
    assert (await bad.cmd("EHLO client.test"))[0] == 250
    bad.writer.write(b"MAIL FROM:<\xe9@client.test>\r\n")
    await bad.writer.drain()
    assert (await bad.reply())[0] == 553
    assert (await bad.cmd("MAIL FROM:<a@client.test>"))[0] == 250
    bad.writer.write(b"RCPT TO:<sales\xff@example.test>\r\n")
    await bad.writer.drain()
    assert (await bad.reply())[0] == 553
    await bad.close()

    async def one(i: int) -> int:
        c = await gw.client()
        await _envelope(c, "sales@example.test")
        code, _ = await c.send_data(make_mail(message_id=f"<ok{i}@client.test>"))
        await c.close()
        return code

    assert await asyncio.gather(*(one(i) for i in range(20))) == [250] * 20
    assert len(gw.stored()) == 20


async def test_one_message_the_store_refuses_does_not_fail_its_batch(gw: Gateway) -> None:
    """Defence in depth behind the command checks: when a group commit fails, each message is committed
    alone, so only the one the store cannot take answers 451."""
    real = gw.writer._commit

    def commit(batch):  # type: ignore[no-untyped-def]
        if any(b"poison" in p.raw for p in batch):
            raise ValueError("cannot store this one")
        return real(batch)

    gw.writer._commit = commit  # type: ignore[method-assign]
    gw.writer.max_wait = 0.05  # gather the sessions below into one batch

    async def one(i: int) -> int:
        c = await gw.client()
        await _envelope(c, "sales@example.test")
        code, _ = await c.send_data(make_mail(subject="poison" if i == 3 else "fine", message_id=f"<b{i}@c.test>"))
        await c.close()
        return code

    codes = await asyncio.gather(*(one(i) for i in range(8)))
    assert codes == [250, 250, 250, 451, 250, 250, 250, 250]
    assert len(gw.stored()) == 7


async def test_a_broken_writer_answers_451_and_resets_the_envelope(gw: Gateway) -> None:
    """Not only SpoolError: anything the writer raises (a child that cannot start: EMFILE) is 451, never
    aiosmtpd's permanent 500 with our error text, and the next MAIL starts a new transaction."""
    async def broken(raw, env):  # type: ignore[no-untyped-def]
        raise OSError(24, "Too many open files")

    gw.writer.store = broken  # type: ignore[method-assign]
    c = await gw.client()
    await _envelope(c, "sales@example.test")
    code, text = await c.send_data(make_mail())
    assert code == 451 and text.startswith("4.3.0")
    assert (await c.cmd("MAIL FROM:<b@client.test>"))[0] == 250
    await c.close()


async def test_lmtp_refuses_content_once_per_recipient(tmp_path) -> None:
    """RFC 2033 §4.2: after DATA, one reply per accepted RCPT — refusals included. One 554 for two
    recipients left Postfix's lmtp client waiting for the second reply until its timeout, then retrying."""
    g, server = await _gateway(tmp_path, kind="lmtp", name="lmtp")
    try:
        c = await _lmtp_transaction(g, "sales@example.test", "support@example.test")
        c.writer.write(b"Subject: x\r\n\r\nbare\nLF\r\n.\r\n")
        await c.writer.drain()
        assert [(await c.reply())[0], (await c.reply())[0]] == [554, 554]
        assert (await c.cmd("NOOP"))[0] == 250
        bad = await WireClient.connect("127.0.0.1", g.port)
        assert (await bad.reply())[0] == 220
        bad.writer.write(b"LHLO \xff\r\n")
        await bad.writer.drain()
        assert (await bad.reply())[0] == 501
        await bad.close()
        await c.close()
        assert g.stored() == []
    finally:
        server.close()
        await g.writer.close()


async def test_probing_clients_are_disconnected_after_20_errors(gw: Gateway) -> None:
    """As Postfix's smtpd_hard_error_limit: a client harvesting addresses gets 421 and is closed."""
    c = await gw.client()
    await _envelope(c)
    codes = [(await c.cmd(f"RCPT TO:<user{i}@example.test>"))[0] for i in range(19)]
    assert codes == [550] * 19
    c.writer.write(b"RCPT TO:<user19@example.test>\r\n")
    await c.writer.drain()
    assert (await c.reply())[0] == 550
    assert (await c.reply())[0] == 421
    assert await asyncio.wait_for(c.reader.read(), 5) == b""  # closed


async def test_addresses_and_smtputf8(gw: Gateway) -> None:
    c = await gw.client()
    assert (await c.cmd("EHLO client.test"))[0] == 250
    code, text = await c.cmd("MAIL FROM:<jöe@client.test>")
    assert code == 553 and text.startswith("5.6.7")
    assert (await c.cmd("MAIL FROM:<jöe@client.test> SMTPUTF8"))[0] == 250
    assert (await c.cmd("RSET"))[0] == 250
    assert (await c.cmd("MAIL FROM:<a@client.test>"))[0] == 250
    code, text = await c.cmd("RCPT TO:<sälès@example.test>")
    assert code == 553 and text.startswith("5.6.7")
    assert (await c.cmd("RCPT TO:<>"))[0] == 501
    assert (await c.cmd("RCPT TO:<sales+x@evil.test@example.test>"))[0] == 553
    assert (await c.cmd("RCPT TO:<@example.test>"))[0] == 553
    assert (await c.cmd("RCPT TO:<Postmaster>"))[0] == 250  # RFC 5321 §4.5.1
    assert (await c.send_data(make_mail()))[0] == 250
    await c.close()
    [msg] = gw.stored()
    assert msg.rcpt_tos == ("postmaster@example.test",)


@pytest.mark.parametrize("split", [False, True])
async def test_a_message_just_under_the_limit_is_taken_however_the_terminator_arrives(tmp_path, split) -> None:
    g, server = await _gateway(tmp_path, max_message_size=1000)
    try:
        c = await g.client()
        await _envelope(c, "sales@example.test")
        assert (await c.cmd("DATA"))[0] == 354
        body = b"Subject: x\r\n\r\n" + b"y" * (999 - 14 - 2) + b"\r\n"
        assert len(body) == 999
        if split:
            c.writer.write(body)
            await c.writer.drain()
            await asyncio.sleep(0.2)
        c.writer.write((b"" if split else body) + b".\r\n")
        await c.writer.drain()
        assert (await c.reply())[0] == 250
        await c.close()
    finally:
        server.close()
        await g.writer.close()


async def _drained_listener(tmp_path) -> tuple[Gateway, asyncio.base_events.Server, SessionLimits]:
    limits = SessionLimits(500, 100, name="test")
    g, server = await _gateway(tmp_path, limits=limits)
    return g, server, limits


async def _closed_by_server(c: WireClient) -> bool:
    try:
        return await asyncio.wait_for(c.reader.read(), 5) == b""
    except ConnectionResetError:  # our last bytes reached the server after its close
        return True


async def test_drain_answers_the_data_in_flight_then_421_and_nothing_to_a_transaction_pipelined_behind_it(
        tmp_path) -> None:
    """Shutdown: the session's message is stored and acknowledged, then the session is told 421 and closed. A
    MAIL FROM pipelined behind that DATA must not start a transaction: it would be stored and never answered
    (the sender would send it again)."""
    g, server, limits = await _drained_listener(tmp_path)
    try:
        c = await g.client()
        await _envelope(c, "sales@example.test")
        assert (await c.cmd("DATA"))[0] == 354
        first, second = make_mail(message_id="<first@client.test>"), make_mail(message_id="<second@client.test>")
        c.writer.write(first[:40])
        await c.writer.drain()
        await asyncio.sleep(0.1)
        server.close()
        drain = asyncio.create_task(limits.drain(10))
        await asyncio.sleep(0.2)
        assert not drain.done()  # waiting for this session's DATA
        c.writer.write(first[40:] + b".\r\nMAIL FROM:<alice@client.test>\r\nRCPT TO:<sales@example.test>\r\n"
                       b"DATA\r\n" + second + b".\r\n")
        await c.writer.drain()
        code, text = await c.reply()
        assert code == 250, text
        code, text = await c.reply()
        assert code == 421 and text.startswith("4.3.2 mx.example.test Service shutting down")
        assert await _closed_by_server(c)
        assert await asyncio.wait_for(drain, 5) == 0
        assert [m.message_id for m in g.stored()] == ["<first@client.test>"]
    finally:
        server.close()
        await g.writer.close()


async def test_drain_closes_idle_sessions_and_refuses_new_ones_at_once(tmp_path) -> None:
    g, server, limits = await _drained_listener(tmp_path)
    try:
        idle = await g.client()
        assert (await idle.cmd("EHLO client.test"))[0] == 250
        inside = await g.client()  # inside a transaction (MAIL, RCPT) until it resets it
        await _envelope(inside, "sales@example.test")
        drain = asyncio.create_task(limits.drain(10))
        code, text = await idle.reply()
        assert code == 421 and text.startswith("4.3.2")
        assert await _closed_by_server(idle)
        late = await WireClient.connect("127.0.0.1", g.port)  # as on a listening socket not closed yet
        assert (await late.reply())[0] == 421
        assert not drain.done()
        assert (await inside.cmd("RSET"))[0] == 250  # its transaction is over: 421 right behind the 250
        code, _ = await inside.reply()
        assert code == 421 and await _closed_by_server(inside)
        assert await asyncio.wait_for(drain, 5) == 0
        assert limits.open == 0 and not limits.sessions
    finally:
        server.close()
        await g.writer.close()


async def test_drain_cuts_off_a_transaction_still_open_when_its_time_is_up(tmp_path, caplog) -> None:
    """Past the bound the session is closed with 421 and its message gets no 250: nothing is acknowledged
    that was not stored."""
    g, server, limits = await _drained_listener(tmp_path)
    try:
        c = await g.client()
        await _envelope(c, "sales@example.test")
        assert (await c.cmd("DATA"))[0] == 354
        c.writer.write(make_mail()[:40])
        await c.writer.drain()
        server.close()
        with caplog.at_level(logging.WARNING, logger="gateway.session_limits"):
            assert await limits.drain(0.3) == 1
        assert "1 session(s) still inside a mail transaction" in caplog.text
        code, text = await c.reply()
        assert code == 421 and text.startswith("4.3.2")
        assert await _closed_by_server(c)
        await asyncio.sleep(0.2)
        assert g.stored() == []
    finally:
        server.close()
        await g.writer.close()

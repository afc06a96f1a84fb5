"""The spool writer process: same guarantees as the thread writer (a store returns only after commit, a failed
commit raises SpoolError for each message in it), plus what a child process adds: it can die, and the
parent must then fail what was unanswered (451) and start a new one. Run on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal

import pytest
from sqlalchemy import Engine, text

from gateway.spool import Envelope, SpoolError, SpoolWriter, get_message, get_raw, list_messages
from gateway.spool_process import ProcessSpoolWriter, encode_request, take_frames


def env(*rcpts: str) -> Envelope:
    return Envelope(mail_from="alice@client.test", rcpt_tos=rcpts or ("sales@example.test",), client_addr="127.0.0.1",
                    helo="client.test", listener="smtp", source="smtp",
                    received_at=dt.datetime(2026, 11, 22, 12, 0, 1, 250000, tzinfo=dt.timezone.utc))


def mail(mid: str, body: bytes = b"hello\r\n") -> bytes:
    return f"Message-ID: {mid}\r\nSubject: t\r\n\r\n".encode() + body


def writer_for(engine: Engine, **kw) -> ProcessSpoolWriter:  # type: ignore[no-untyped-def]
    url = engine.url.render_as_string(hide_password=False)
    return ProcessSpoolWriter(url, inline=SpoolWriter(engine), **kw)


def test_frames_survive_any_split() -> None:
    reqs = [(mail(f"<f{i}@x>", bytes(range(256)) * i), env("a@example.test", f"b{i}@example.test")) for i in range(4)]
    wire = b"".join(encode_request(raw, e) for raw, e in reqs)
    for cut in (0, 1, 7, 9, 300, len(wire) - 1):
        buf = bytearray(wire[:cut])
        got, used = take_frames(buf, 64)
        del buf[:used]
        buf += wire[cut:]
        rest, used2 = take_frames(buf, 64)
        assert got + rest == reqs and used2 == len(buf)
    assert take_frames(bytearray(wire), 2)[0] == reqs[:2]  # the batch limit


async def test_stores_byte_exact_with_envelope(engine: Engine) -> None:
    w = writer_for(engine)
    await w.start()
    raws = [mail(f"<p{i}@x>", bytes(range(256)) * (i + 1) + b"\r\n") for i in range(40)]
    ids = await asyncio.gather(*[w.store(raw, env("sales@example.test", "Support@Example.test")) for raw in raws])
    await w.close()
    assert len(set(ids)) == 40
    for ident, raw in zip(ids, raws):
        assert get_raw(engine, ident) == raw
    m = get_message(engine, ids[0])
    assert m is not None
    assert (m.rcpt_tos, m.client_addr, m.helo, m.listener, m.message_id) == (
        ("sales@example.test", "Support@Example.test"), "127.0.0.1", "client.test", "smtp", "<p0@x>")
    assert m.received_at.replace(tzinfo=dt.timezone.utc) == env().received_at


async def test_large_messages_stay_in_process(engine: Engine) -> None:
    w = writer_for(engine, inline_max=10_000)
    await w.start()
    os.kill(w.child_pid or 0, signal.SIGSTOP)  # a stopped child cannot be the one that stores it
    try:
        raw = mail("<big@x>", b"B" * 20_000)
        ident = await asyncio.wait_for(w.store(raw, env()), 10)
        assert get_raw(engine, ident) == raw
    finally:
        os.kill(w.child_pid or 0, signal.SIGCONT)
    await w.close()


async def test_child_killed_unanswered_get_errors_and_next_store_restarts(engine: Engine) -> None:
    w = writer_for(engine)
    await w.start()
    assert await w.store(mail("<before@x>"), env()) > 0
    pid = w.child_pid
    assert pid
    os.kill(pid, signal.SIGSTOP)  # hold the child so these stay unanswered
    pending = [asyncio.ensure_future(w.store(mail(f"<lost{i}@x>"), env())) for i in range(5)]
    await asyncio.sleep(0.2)
    assert not any(p.done() for p in pending)
    os.kill(pid, signal.SIGKILL)
    results = await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 10)
    assert all(isinstance(r, SpoolError) for r in results)
    ident = await asyncio.wait_for(w.store(mail("<after@x>"), env()), 20)
    assert w.children_started == 2 and w.child_pid != pid
    await w.close()
    assert {m.message_id for m in list_messages(engine)} == {"<before@x>", "<after@x>"}
    assert get_raw(engine, ident) == mail("<after@x>")


async def test_commit_failure_fails_each_message_of_the_batch(engine: Engine) -> None:
    w = writer_for(engine)
    await w.start()
    assert await w.store(mail("<ok@x>"), env()) > 0
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE message_bodies"))  # every insert of the next batch fails
    results = await asyncio.gather(*[w.store(mail(f"<x{i}@x>"), env()) for i in range(3)], return_exceptions=True)
    assert all(isinstance(r, SpoolError) and "message_bodies" in str(r) for r in results)
    assert {m.message_id for m in list_messages(engine)} == {"<ok@x>"}  # nothing half-written
    await w.close()


async def test_close_answers_everything_in_flight(engine: Engine) -> None:
    w = writer_for(engine)
    await w.start()
    pending = [asyncio.ensure_future(w.store(mail(f"<c{i}@x>"), env())) for i in range(50)]
    await asyncio.sleep(0)
    await w.close()
    assert all(p.done() and not p.cancelled() and p.exception() is None for p in pending)
    assert len(list_messages(engine, limit=100)) == 50


async def test_fault_injection_answers_without_writing(engine: Engine) -> None:
    w = writer_for(engine)
    w.fail_writes = OSError(28, "No space left on device")
    with pytest.raises(SpoolError, match="No space"):
        await w.store(mail("<nospace@x>"), env())
    await w.close()
    assert list_messages(engine) == []


@pytest.mark.parametrize("module", ["gateway.spool_process", "gateway.batch_process"])
async def test_store_url_is_not_on_the_command_line(engine: Engine, module: str) -> None:
    """A PostgreSQL URL carries the password: `ps` shows every user a process's arguments. Both commit
    helpers (the spool writer, the outbound store) get it through their environment."""
    from gateway.batch_process import ProcessTransactionBatcher

    url = engine.url.render_as_string(hide_password=False)
    helper = writer_for(engine) if module == "gateway.spool_process" else ProcessTransactionBatcher(url)
    await helper.start()
    with open(f"/proc/{helper.child_pid}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    await helper.close()
    assert argv[2:4] == [module.encode(), b"FULL"]
    assert not any(str(engine.url.database).encode() in a for a in argv if a)


def _children(pid: int) -> set[int]:
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.add(int(entry))
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_serve_killed_leaves_no_spool_writer_behind(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL of `mailgate serve` alone (not its process group): its spool writer and workers exit too."""
    import time

    from tests.gateway_proc import GatewayProcess, base_config, free_port
    from tests.smtp_wire import WireClient

    async def send_one(port: int) -> int:
        c = await WireClient.connect("127.0.0.1", port)
        await c.reply()
        for line in ("EHLO client.test", "MAIL FROM:<alice@client.test>", "RCPT TO:<sales@example.test>"):
            await c.cmd(line)
        code, _ = await c.send_data(mail("<before-kill@x>"))
        await c.close()
        return code

    gw = GatewayProcess(tmp_path, base_config(tmp_path, smtp_port=free_port(), admin_port=free_port())).start()
    assert gw.proc is not None
    try:
        assert asyncio.run(send_one(gw.smtp_port)) == 250
        children = _children(gw.proc.pid)
        cmdlines = [open(f"/proc/{c}/cmdline", "rb").read() for c in children]
        assert any(b"gateway.spool_process" in c for c in cmdlines), cmdlines
        os.kill(gw.proc.pid, signal.SIGKILL)
        gw.proc.wait()
        deadline = time.monotonic() + 15
        while any(_alive(c) for c in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [c for c in children if _alive(c)]
    finally:
        gw.kill()


async def test_group_commit_wait_gathers_company(engine: Engine) -> None:
    """`group_commit_ms` in the child: stores arriving within the wait share one commit (one transaction)."""
    w = writer_for(engine, max_wait_ms=300)
    await w.start()
    assert await w.store(mail("<warm@x>"), env()) > 0  # the child is up

    async def late(i: int) -> int:
        await asyncio.sleep(0.05 * i)
        return await w.store(mail(f"<w{i}@x>"), env())

    ids = await asyncio.gather(*[late(i) for i in range(4)])
    await w.close()
    with engine.connect() as conn:
        # One transaction: ids are consecutive and the rows carry one commit timestamp.
        stamps = {row[0] for row in conn.execute(text(
            f"SELECT updated_at FROM messages WHERE id IN ({', '.join(map(str, ids))})"))}
    assert sorted(ids) == list(range(min(ids), min(ids) + 4)) and len(stamps) == 1


def test_a_failed_group_commit_is_retried_one_message_at_a_time() -> None:
    """The child's answer for a batch whose transaction failed: each message committed alone, so only the
    one the store cannot take gets an error reply (its sender 451), the others their spool ids."""
    import struct

    from gateway.spool_process import _answer

    calls: list[list[int]] = []

    def commit(idx: list[int]) -> list[int]:
        calls.append(list(idx))
        if 1 in idx:
            raise ValueError("cannot encode this envelope")
        return [100 + k for k in idx]

    e = env()
    reply = _answer([(b"a", e), (b"b", e), (b"c", e)], commit)
    assert calls == [[0, 1, 2], [0], [1], [2]]
    rep = struct.Struct("!qI")
    first, _ = rep.unpack_from(reply, 0)
    second, errlen = rep.unpack_from(reply, rep.size)
    third, _ = rep.unpack_from(reply, 2 * rep.size + errlen)
    assert (first, second, third) == (100, -1, 102)
    assert reply[2 * rep.size:2 * rep.size + errlen] == b"cannot encode this envelope"

"""IMAP puller against a private Dovecot: once each, fast after delivery, through restarts, kills and renumbering.

The Dovecot tests skip when /usr/sbin/dovecot is absent (see tests/dovecot.py); the parsing tests run anyway.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import aioimaplib
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import func, select

from gateway.config import ImapSourceConfig
from gateway.disk_space import FreeSpace
from gateway.imap import ImapPuller
from gateway.imap_client import BatchFetchCommand, PullClient, PullProtocol
from gateway.imap_envelope import envelope_from_headers
from gateway.metrics import SERVE_ONLY
from gateway.imap_protocol import (
    cut_batches, has_exists, mutf7, parse_fetch, parse_search, parse_select, parse_sizes, quote_mailbox, uid_set,
)
from gateway.schema import imap_checkpoints, imap_seen, messages
from gateway.spool import get_raw, list_messages
from gateway.store import open_store
from tests.dovecot import Dovecot, dovecot_available
from tests.running_puller import Running, wait_for

pytestmark = pytest.mark.imap

ROOT = Path(__file__).resolve().parent.parent
USER, PASSWORD = "catchall", "s3cret-pw"


# ------------------------------------------------------------------------------------------- helpers
def mail(i: int, *, tag: str = "", size: int = 0) -> bytes:
    """A distinct message per i (own Message-ID, own body), shaped like a catchall delivery."""
    body = f"Hello {i} {tag}\r\n" + ("x" * 76 + "\r\n") * (size // 78)
    return (f"Return-Path: <sender{i}@client.test>\r\n"
            f"Delivered-To: catchall@example.test\r\n"
            f"X-Original-To: sales+{i}@example.test\r\n"
            f"From: Sender {i} <sender{i}@client.test>\r\n"
            f"To: sales@example.test\r\n"
            f"Subject: request {i} {tag}\r\n"
            f"Message-ID: <req-{i}-{tag}@client.test>\r\n"
            f"\r\n{body}").encode()


@pytest.fixture
def dovecot() -> Iterator[Dovecot]:
    reason = dovecot_available()
    if reason:
        pytest.skip(reason)
    with Dovecot({USER: PASSWORD, "person": "other-pw"}) as server:
        yield server


@pytest.fixture
def engine(tmp_path):  # type: ignore[no-untyped-def]
    eng = open_store(f"sqlite:///{tmp_path}/spool.db", synchronous="NORMAL")
    yield eng
    eng.dispose()


@pytest.fixture
def any_engine(store_url):  # type: ignore[no-untyped-def]
    """SQLite, and PostgreSQL when MAILGATE_TEST_PG_URL is set (conftest's `store_url`)."""
    eng = open_store(store_url)
    yield eng
    eng.dispose()


def source(server: Dovecot, **kw) -> ImapSourceConfig:  # type: ignore[no-untyped-def]
    values = dict(name=f"t{uuid.uuid4().hex[:8]}", host=server.host, port=server.port, security="none",
                  login=USER, password_env="MAILGATE_TEST_IMAP_PW", batch_size=50, timeout=10.0)
    values.update(kw)
    return ImapSourceConfig(**values)


def spooled(engine, src: ImapSourceConfig) -> list:  # type: ignore[no-untyped-def]
    return [m for m in list_messages(engine, limit=100_000) if m.source == f"imap:{src.name}"]


def count(engine, src: ImapSourceConfig) -> int:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(messages)
                                .where(messages.c.source == f"imap:{src.name}")).scalar_one())


def puller(src: ImapSourceConfig, engine) -> ImapPuller:  # type: ignore[no-untyped-def]
    p = ImapPuller(src, engine, password=PASSWORD)
    p.backoff_initial = 0.1
    return p


def assert_exactly_once(engine, src, expected: list[bytes]) -> None:  # type: ignore[no-untyped-def]
    rows = spooled(engine, src)
    ids = [m.message_id for m in rows]
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} message(s) spooled twice"
    want = {f"<req-{raw.split(b'<req-')[1].split(b'>')[0].decode()}>" for raw in expected}
    assert set(ids) == want, f"missing {sorted(want - set(ids))[:5]}, unexpected {sorted(set(ids) - want)[:5]}"


def all_after_done(engine, src) -> bool:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        return not conn.execute(select(imap_seen.c.uid).where(imap_seen.c.source == f"imap:{src.name}",
                                                              imap_seen.c.after_done.is_(False))).first()


# ------------------------------------------------------------------------------------- pure parsing
def test_parse_fetch_uid_before_or_after_literal_and_unsolicited_lines_skipped():
    lines = [
        b'1 FETCH (UID 7 INTERNALDATE "22-Nov-2026 15:00:00 +0000" BODY[] {5}', bytearray(b"hello"), b")",
        b"2 FETCH (FLAGS (\\Seen))",  # another session flagged a message: no body
        b"3 FETCH (BODY[] {3}", bytearray(b"abc"), b" UID 9)",
        b"Fetch completed (0.001 + 0.000 secs).",
    ]
    got = parse_fetch(lines)
    assert [(m.uid, m.raw) for m in got] == [(7, b"hello"), (9, b"abc")]
    assert got[0].internaldate is not None and got[0].internaldate.hour == 15
    assert got[1].internaldate is None


def test_parse_search_select_and_push_lines():
    assert parse_search([b"4 2 9", b"Search completed (0.001 + 0.000 secs)."]) == [2, 4, 9]
    assert parse_search([b"SEARCH 3", b"OK"]) == [3]
    assert parse_search([b"", b"Search completed."]) == []
    status = parse_select([b"FLAGS (\\Seen)", b"12 EXISTS", b"OK [UIDVALIDITY 1795] UIDs valid",
                           b"OK [UIDNEXT 44] Predicted next UID", b"[READ-WRITE] Select completed"])
    assert (status.uidvalidity, status.uidnext, status.exists) == (1795, 44, 12)
    with pytest.raises(ValueError):
        parse_select([b"3 EXISTS"])
    assert has_exists([b"51 EXISTS", b"51 RECENT"])
    assert not has_exists([b"3 EXPUNGE", b"4 FETCH (FLAGS (\\Seen))"])


def test_uid_set_is_compact():
    assert uid_set([5, 1, 2, 3, 9, 10, 12]) == "1:3,5,9:10,12"
    assert uid_set([4]) == "4"
    with pytest.raises(ValueError):
        uid_set([])


def test_batches_cut_by_count_and_bytes_a_large_message_alone():
    sizes = parse_sizes([b"1 FETCH (UID 1 RFC822.SIZE 10)", b"2 FETCH (RFC822.SIZE 50 UID 2)",
                         b"3 FETCH (FLAGS (\\Seen))", b"3 FETCH (UID 3 RFC822.SIZE 20)",
                         b"4 FETCH (BODY[] {30}", b"5 FETCH (UID 5 RFC822.SIZE 1)\r\n......", b")"])
    assert sizes == {1: 10, 2: 50, 3: 20}  # a literal is not a line, whatever it holds
    assert cut_batches([1, 2, 3, 4], sizes, 100, 40) == [([1], 10), ([2], 50), ([3, 4], 20)]  # 4: no size
    assert cut_batches([1, 3, 4], sizes, 2, 1000) == [([1, 3], 30), ([4], 0)]
    assert cut_batches([], sizes, 2, 1000) == []


def test_mailbox_names_are_sent_in_modified_utf7():
    assert quote_mailbox("Entwürfe") == '"Entw&APw-rfe"'
    assert mutf7("~peter/mail/台北/日本語") == "~peter/mail/&U,BTFw-/&ZeVnLIqe-"  # RFC 3501 §5.1.3
    assert mutf7("Tom & Jerry") == "Tom &- Jerry"
    assert mutf7("😀 ü") == "&2D3eAA- &APw-"  # astral: a surrogate pair; each run its own shift
    assert quote_mailbox('a"b\\c') == '"a\\"b\\\\c"'
    assert mutf7("INBOX") == "INBOX"


def test_envelope_from_configured_headers_first_present_wins():
    raw = (b"Return-Path: <>\r\nDelivered-To: catchall@example.test\r\n"
           b"X-Original-To: Sales@Example.test, support@example.test\r\nTo: x@example.test\r\n\r\nbody")
    assert envelope_from_headers(raw, ("X-Original-To", "Delivered-To")) == \
        ("", ("Sales@Example.test", "support@example.test"))
    assert envelope_from_headers(raw, ("Delivered-To", "X-Original-To")) == ("", ("catchall@example.test",))
    assert envelope_from_headers(b"Return-Path: <a@b.test>\r\nTo: A <t@x.test>, t@X.test\r\n\r\n",
                                 ("Delivered-To", "To")) == ("a@b.test", ("t@x.test",))
    assert envelope_from_headers(b"Subject: none\r\n\r\n", ("To",)) == ("", ())


def _feed(protocol_cls, stream: bytes, chunk: int):  # type: ignore[no-untyped-def]
    """Push a FETCH response through a client protocol in `chunk`-byte reads; return the command's lines."""
    loop = asyncio.new_event_loop()
    try:
        proto = protocol_cls(loop, None)
        proto.state = "SELECTED"
        cmd = BatchFetchCommand("A1", "1:*", "(UID BODY.PEEK[])", prefix="UID", loop=loop)
        proto.pending_async_commands["FETCH"] = cmd
        for start in range(0, len(stream), chunk):
            proto.data_received(stream[start:start + chunk])
        return cmd.response
    finally:
        loop.close()


def test_pull_protocol_reads_responses_like_aioimaplib_at_any_read_boundary():
    bodies = [b"Subject: a\r\n\r\n(unbalanced ( paren\r\n", b"", b"x" * 3000, b"Subject: {5}\r\n\r\nlit\r\n"]
    stream = b"".join(
        b"* %d FETCH (UID %d BODY[] {%d}\r\n%s)\r\n" % (i + 1, 10 + i, len(body), body) for i, body in enumerate(bodies)
    ) + b"* 9 FETCH (FLAGS (\\Seen))\r\n* 5 FETCH (BODY[] {3}\r\nabc UID 99)\r\nA1 OK Fetch completed.\r\n"
    expected = _feed(aioimaplib.IMAP4ClientProtocol, stream, len(stream))
    assert expected.result == "OK"
    assert [(m.uid, m.raw) for m in parse_fetch(expected.lines)] == \
        [(10 + i, body) for i, body in enumerate(bodies)] + [(99, b"abc")]
    for chunk in (1, 2, 3, 7, 64, 1000, len(stream)):
        assert _feed(PullProtocol, stream, chunk) == expected, f"differs with {chunk}-byte reads"
    # Literals are stored as bytes once complete, and taken as they are: no second copy of the batch.
    lines = _feed(PullProtocol, stream, 7).lines
    assert all(type(lines[i]) is bytes for i in (1, 4, 7, 10))
    assert parse_fetch(lines)[2].raw is lines[7]


def test_pull_protocol_survives_a_response_of_thousands_of_lines():
    # aioimaplib recurses once per line: ~1,000 lines in one read raised RecursionError.
    stream = b"".join(b"* %d FETCH (UID %d BODY[] {3}\r\nabc)\r\n" % (i, i) for i in range(1, 3001))
    response = _feed(PullProtocol, stream + b"A1 OK done\r\n", 256 * 1024)
    assert len(parse_fetch(response.lines)) == 3000


# ---------------------------------------------------------------------------------- against Dovecot
async def test_500_messages_pulled_once_each(dovecot, any_engine):
    engine = any_engine
    sent = [mail(i, size=2000) for i in range(500)]
    await asyncio.to_thread(dovecot.append, USER, sent)
    src = source(dovecot, batch_size=100)
    run = Running(puller(src, engine))
    await wait_for(lambda: count(engine, src) >= 500, 60, "500 spooled")
    await wait_for(lambda: all_after_done(engine, src), 10, "after-actions")
    await run.stop()
    assert_exactly_once(engine, src, sent)
    # Byte-exact; the envelope comes from the default header order (Delivered-To first)
    row = spooled(engine, src)[0]
    assert get_raw(engine, row.id) in sent
    assert row.mail_from.startswith("sender") and row.rcpt_tos == ("catchall@example.test",)
    assert dovecot.uids(USER, criteria="UNSEEN") == []  # after = seen
    assert REGISTRY.get_sample_value("mailgate_imap_pulled_total", {"source": f"imap:{src.name}"}) == 500
    assert REGISTRY.get_sample_value("mailgate_imap_lag_seconds", {"source": f"imap:{src.name}"}) == 0  # caught up
    # A second pass (a restart) finds nothing new.
    run = Running(puller(src, engine))
    await asyncio.sleep(1.0)
    await run.stop()
    assert count(engine, src) == 500
    with engine.connect() as conn:
        cp = conn.execute(select(imap_checkpoints).where(imap_checkpoints.c.source == f"imap:{src.name}")).one()
    assert cp.last_uid == max(dovecot.uids(USER))


async def test_message_delivered_while_idling_reaches_spool_within_2s(dovecot, engine):
    src = source(dovecot, rcpt_headers=("X-Original-To", "Delivered-To", "To"))
    run = Running(puller(src, engine))
    await wait_for(lambda: SERVE_ONLY.get_sample_value(
        "mailgate_imap_connection", {"source": f"imap:{src.name}", "mailgate_imap_connection": "idle"}) == 1,
        10, "the puller to idle")
    await asyncio.sleep(0.3)
    for i in range(3):  # more than once: the second and third arrive on a renewed IDLE
        await asyncio.to_thread(dovecot.append, "catchall", [mail(i, tag="idle")])
        elapsed = await wait_for(lambda: count(engine, src) == i + 1, 10, f"idle message {i}")
        assert elapsed < 2.0, f"message {i} took {elapsed:.2f} s to reach the spool"
    await run.stop()
    assert spooled(engine, src)[0].rcpt_tos == ("sales+0@example.test",)


async def test_polling_when_idle_is_off(dovecot, engine):
    src = source(dovecot, idle=False, poll_interval=0.2)
    run = Running(puller(src, engine))
    await asyncio.sleep(0.5)
    await asyncio.to_thread(dovecot.append, USER, [mail(1, tag="poll")])
    await wait_for(lambda: count(engine, src) == 1, 5, "polled message")
    await run.stop()


async def test_messages_read_by_a_person_are_still_pulled(dovecot, engine):
    sent = [mail(i, tag="read") for i in range(10)]
    await asyncio.to_thread(dovecot.append, USER, sent[:5], flags=r"(\Seen)")
    await asyncio.to_thread(dovecot.append, USER, sent[5:])
    src = source(dovecot)
    run = Running(puller(src, engine))
    await wait_for(lambda: count(engine, src) == 10, 10, "10 spooled")
    await run.stop()
    assert_exactly_once(engine, src, sent)


async def test_server_restarted_between_spool_and_after_action(dovecot, engine):
    sent = [mail(i, tag="restart", size=1000) for i in range(300)]
    await asyncio.to_thread(dovecot.append, USER, sent)
    src = source(dovecot, batch_size=25)
    p = puller(src, engine)
    restarts = []

    async def restart_after_third_batch(uids):  # type: ignore[no-untyped-def]
        if not restarts and count(engine, src) >= 75:
            restarts.append(uids)
            # Spooled, not yet flagged: the connection dies before the after-action.
            await asyncio.to_thread(dovecot.restart)

    p.after_commit_hook = restart_after_third_batch
    run = Running(p)
    await wait_for(lambda: count(engine, src) >= 300, 60, "300 spooled")
    await wait_for(lambda: all_after_done(engine, src), 20, "after-actions redone")
    await run.stop()
    assert restarts, "the server was never restarted"
    assert_exactly_once(engine, src, sent)
    assert dovecot.uids(USER, criteria="UNSEEN") == []


async def test_server_crashes_in_the_middle_of_a_fetch(dovecot, engine, monkeypatch):
    sent = [mail(i, tag="crash", size=100_000) for i in range(60)]
    await asyncio.to_thread(dovecot.append, USER, sent)
    src = source(dovecot, batch_size=10)
    crashed: list[asyncio.Future] = []
    received = [0]
    original = aioimaplib.IMAP4ClientProtocol.data_received

    def data_received(self, data):  # type: ignore[no-untyped-def]
        received[0] += len(data)
        # Half-way through the run, with a FETCH response half-read: kill every Dovecot process.
        if not crashed and received[0] > 3_000_000:
            dovecot.crash()
            crashed.append(asyncio.get_running_loop().run_in_executor(None, dovecot.start))
        return original(self, data)

    monkeypatch.setattr(aioimaplib.IMAP4ClientProtocol, "data_received", data_received)
    run = Running(puller(src, engine))
    await wait_for(lambda: bool(crashed), 30, "the crash")
    partial = count(engine, src)
    await crashed[0]
    await wait_for(lambda: count(engine, src) >= 60 and all_after_done(engine, src), 60, "60 spooled")
    await run.stop()
    assert 0 < partial < 60, f"{partial} spooled at the crash: not mid-run"
    assert_exactly_once(engine, src, sent)
    assert dovecot.uids(USER, criteria="UNSEEN") == []


async def test_puller_cancelled_between_spool_and_after_action_then_restarted(dovecot, any_engine):
    engine = any_engine
    sent = [mail(i, tag="cancel") for i in range(120)]
    await asyncio.to_thread(dovecot.append, USER, sent)
    src = source(dovecot, batch_size=20, after="move", move_to="Archive")
    first = puller(src, engine)
    crashed = asyncio.Event()

    def crash(_uids):  # type: ignore[no-untyped-def]
        if count(engine, src) >= 40:
            crashed.set()
            raise asyncio.CancelledError  # the task dies here, like a killed process

    first.after_commit_hook = crash
    task = asyncio.create_task(first.run(asyncio.Event()))
    await asyncio.wait_for(crashed.wait(), 20)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)
    first.close()
    assert not all_after_done(engine, src)  # the crash left a batch spooled but not moved
    assert len(dovecot.uids(USER)) > 120 - count(engine, src)
    run = Running(puller(src, engine))
    await wait_for(lambda: count(engine, src) >= 120, 30, "120 spooled")
    await wait_for(lambda: all_after_done(engine, src), 10, "after-actions")
    await run.stop()
    assert_exactly_once(engine, src, sent)
    assert dovecot.uids(USER) == []
    assert len(dovecot.uids(USER, mailbox="Archive")) == 120


async def test_puller_process_killed_mid_batch_then_restarted(dovecot, any_engine, tmp_path):
    engine = any_engine
    sent = [mail(i, tag="kill", size=4000) for i in range(400)]
    await asyncio.to_thread(dovecot.append, USER, sent)
    src = source(dovecot, batch_size=10)
    script = textwrap.dedent(f"""
        import asyncio, sys
        sys.path.insert(0, {str(ROOT)!r})
        from gateway.config import ImapSourceConfig
        from gateway.imap import ImapPuller
        from gateway.store import open_store
        src = ImapSourceConfig.model_validate_json({src.model_dump_json()!r})
        engine = open_store({engine.url.render_as_string(hide_password=False)!r})
        asyncio.run(ImapPuller(src, engine, password={PASSWORD!r}).run(asyncio.Event()))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        await wait_for(lambda: count(engine, src) >= 60 or proc.poll() is not None, 60, "the child to pull")
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    partial = count(engine, src)
    assert 60 <= partial < 400, f"child pulled {partial}: not killed mid-run"
    run = Running(puller(src, engine))
    await wait_for(lambda: count(engine, src) >= 400, 60, "400 spooled")
    await wait_for(lambda: all_after_done(engine, src), 10, "after-actions")
    await run.stop()
    assert_exactly_once(engine, src, sent)
    assert dovecot.uids(USER, criteria="UNSEEN") == []


async def test_uidvalidity_change_does_not_duplicate(dovecot, any_engine):
    engine = any_engine
    box = "Catchall"
    c = dovecot.client(USER)
    c.create(box)
    c.logout()
    old = [mail(i, tag="uv") for i in range(30)]
    await asyncio.to_thread(dovecot.append, USER, old, mailbox=box)
    src = source(dovecot, mailbox=box)
    run = Running(puller(src, engine))
    await wait_for(lambda: count(engine, src) == 30, 10, "30 spooled")
    await run.stop()
    before = dovecot.uidvalidity(USER, box)
    # The mailbox is rebuilt (restored from backup, migrated): same mail, new UIDVALIDITY, plus new mail.
    dovecot.recreate_mailbox(USER, box)
    new = [mail(i, tag="uv-new") for i in range(5)]
    await asyncio.to_thread(dovecot.append, USER, old + new, mailbox=box)
    assert dovecot.uidvalidity(USER, box) != before
    run = Running(puller(src, engine))
    await wait_for(lambda: count(engine, src) == 35 and all_after_done(engine, src), 10, "the 5 new spooled")
    await asyncio.sleep(0.5)
    await run.stop()
    assert_exactly_once(engine, src, old + new)
    assert REGISTRY.get_sample_value("mailgate_imap_duplicates_total", {"source": f"imap:{src.name}"}) == 30
    assert dovecot.uids(USER, mailbox=box, criteria="UNSEEN") == []  # the recognised ones were acted on too


async def test_after_delete_empties_the_mailbox(dovecot, engine):
    sent = [mail(i, tag="del") for i in range(20)]
    await asyncio.to_thread(dovecot.append, USER, sent)
    src = source(dovecot, after="delete", batch_size=7)
    run = Running(puller(src, engine))
    await wait_for(lambda: count(engine, src) == 20 and all_after_done(engine, src), 10, "20 spooled")
    await run.stop()
    assert dovecot.uids(USER) == []
    assert_exactly_once(engine, src, sent)


async def test_wrong_password_backs_off_and_spools_nothing(dovecot, engine, caplog):
    src = source(dovecot)
    p = ImapPuller(src, engine, password="wrong")
    p.backoff_initial = 0.1
    run = Running(p)
    await asyncio.sleep(1.5)
    await run.stop()
    assert count(engine, src) == 0
    assert "LOGIN as 'catchall' refused" in caplog.text


async def test_low_disk_fetches_nothing_until_space_is_back(dovecot, engine, caplog, tmp_path):
    """Below [storage] min_free_mb the puller leaves the mail on the server (nothing fetched, flagged or
    moved) and backs off; once there is room again it pulls everything, once."""
    sent = [mail(i, tag="disk") for i in range(5)]
    await asyncio.to_thread(dovecot.append, USER, sent)
    free = {"bytes": 10 * 2**20}
    space = FreeSpace(tmp_path, min_free=100 * 2**20, ttl=0.0, available=lambda _path: free["bytes"])
    src = source(dovecot, after="delete")
    p = ImapPuller(src, engine, password=PASSWORD, free_space=space)
    p.backoff_initial = 0.1
    run = Running(p)
    await asyncio.sleep(1.0)
    assert count(engine, src) == 0
    assert len(dovecot.uids(USER)) == 5, "mail was acted on while it could not be spooled"
    assert "StorageLow" in caplog.text and "nothing fetched" in caplog.text
    free["bytes"] = 500 * 2**20
    await wait_for(lambda: count(engine, src) == 5 and all_after_done(engine, src), 10, "5 spooled")
    await run.stop()
    assert dovecot.uids(USER) == []
    assert_exactly_once(engine, src, sent)


async def test_run_imap_sources_applies_the_storage_headroom(dovecot, engine, monkeypatch, caplog, tmp_path):
    """`[storage] min_free_mb` reaches the pullers `serve` starts (here 1 EiB: no disk has that much)."""
    from gateway.config import parse_config
    from gateway.imap import run_imap_sources

    monkeypatch.setenv("MAILGATE_TEST_IMAP_PW", PASSWORD)
    config = parse_config({
        "storage": {"url": f"sqlite:///{tmp_path}/s.db", "min_free_mb": 1 << 40},
        "imap": [{"name": "full", "host": dovecot.host, "port": dovecot.port, "security": "none",
                  "login": USER, "password_env": "MAILGATE_TEST_IMAP_PW"}]}, base_dir=".")
    await asyncio.to_thread(dovecot.append, USER, [mail(1, tag="full")])
    stop = asyncio.Event()
    task = asyncio.create_task(run_imap_sources(config, engine, None, stop))
    await wait_for(lambda: "StorageLow" in caplog.text, 10, "the storage warning")
    stop.set()
    await asyncio.wait_for(task, 10)
    assert count(engine, config.imap[0]) == 0
    assert len(dovecot.uids(USER)) == 1


@pytest.mark.parametrize("security", ["ssl", "starttls"])
async def test_tls_implicit_and_starttls(security, engine):
    reason = dovecot_available()
    if reason:
        pytest.skip(reason)
    try:
        server = Dovecot({USER: PASSWORD}, tls=True)
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot make a test certificate: {exc}")
    with server:
        sent = [mail(i, tag=security) for i in range(5)]
        await asyncio.to_thread(server.append, USER, sent)
        port = server.tls_port if security == "ssl" else server.port
        src = source(server, port=port, security=security, tls_ca_file=str(server.cert))
        run = Running(puller(src, engine))
        await wait_for(lambda: count(engine, src) == 5, 15, f"5 spooled over {security}")
        await run.stop()
        assert_exactly_once(engine, src, sent)
        logins = [line for line in server.log().splitlines() if f"Login: user=<{USER}>" in line]
        assert any(", TLS," in line for line in logins), logins  # the puller's own login was encrypted


async def test_move_without_the_move_extension_copies_then_expunges(dovecot, engine, monkeypatch):
    original = aioimaplib.IMAP4.has_capability
    asked: list[str] = []

    def has_capability(self, cap):  # type: ignore[no-untyped-def]
        asked.append(cap)
        return cap != "MOVE" and original(self, cap)

    monkeypatch.setattr(aioimaplib.IMAP4, "has_capability", has_capability)
    sent = [mail(i, tag="copy") for i in range(12)]
    await asyncio.to_thread(dovecot.append, USER, sent)
    src = source(dovecot, after="move", move_to="Archive", batch_size=5)
    run = Running(puller(src, engine))
    await wait_for(lambda: count(engine, src) == 12 and all_after_done(engine, src), 10, "12 spooled")
    await run.stop()
    assert dovecot.uids(USER) == []
    assert len(dovecot.uids(USER, mailbox="Archive")) == 12
    assert "MOVE" in asked and "UIDPLUS" in asked  # the COPY + UID EXPUNGE path was taken
    assert_exactly_once(engine, src, sent)


async def test_non_ascii_mailbox_and_move_to(dovecot, engine):
    """IMAP4rev1 mailbox names are modified UTF-7 on the wire; raw UTF-8 got NO from Dovecot at SELECT."""
    box, archive = "Anfragen für Verkauf", "Erledigt ✓"
    c = dovecot.client(USER)
    for name in (box, archive):
        assert c.create(f'"{mutf7(name)}"')[0] == "OK"
    c.logout()
    sent = [mail(i, tag="utf7") for i in range(3)]
    await asyncio.to_thread(dovecot.append, USER, sent, mailbox=mutf7(box))
    src = source(dovecot, mailbox=box, after="move", move_to=archive)
    run = Running(puller(src, engine))
    await wait_for(lambda: count(engine, src) == 3 and all_after_done(engine, src), 10, "3 spooled and moved")
    await run.stop()
    assert_exactly_once(engine, src, sent)
    assert dovecot.uids(USER, mailbox=mutf7(box)) == []
    assert len(dovecot.uids(USER, mailbox=mutf7(archive))) == 3


async def test_run_imap_sources_reads_the_password_from_the_environment(dovecot, engine, monkeypatch, caplog):
    from gateway.config import parse_config
    from gateway.imap import run_imap_sources

    monkeypatch.setenv("MAILGATE_TEST_IMAP_PW", PASSWORD)
    config = parse_config({"imap": [
        {"name": "envpw", "host": dovecot.host, "port": dovecot.port, "security": "none", "login": USER,
         "password_env": "MAILGATE_TEST_IMAP_PW"},
        {"name": "nopw", "host": dovecot.host, "port": dovecot.port, "security": "none", "login": USER,
         "password_env": "MAILGATE_TEST_IMAP_UNSET"},
    ]}, base_dir=".")
    sent = [mail(i, tag="env") for i in range(3)]
    await asyncio.to_thread(dovecot.append, USER, sent)
    stop = asyncio.Event()
    task = asyncio.create_task(run_imap_sources(config, engine, None, stop))
    src = config.imap[0]
    await wait_for(lambda: count(engine, src) == 3, 10, "3 spooled")
    stop.set()
    await asyncio.wait_for(task, 10)
    assert "MAILGATE_TEST_IMAP_UNSET is not set" in caplog.text
    assert_exactly_once(engine, src, sent)


async def test_idle_is_renewed_before_the_server_limit_without_reconnecting(dovecot, engine, caplog,
                                                                           monkeypatch):
    caplog.set_level("INFO", logger="gateway.imap")
    starts = []
    original = PullClient.idle_start

    async def idle_start(self, timeout):  # type: ignore[no-untyped-def]
        starts.append(timeout)
        return await original(self, timeout)

    monkeypatch.setattr(PullClient, "idle_start", idle_start)
    src = source(dovecot, idle_renew=0.3)
    run = Running(puller(src, engine))
    await asyncio.sleep(1.5)  # several IDLE / DONE rounds on one connection
    await asyncio.to_thread(dovecot.append, USER, [mail(1, tag="renew")])
    await wait_for(lambda: count(engine, src) == 1, 5, "message after renewals")
    await run.stop()
    assert caplog.text.count("connected to") == 1
    assert len(starts) >= 4 and set(starts) == {0.3}, starts  # IDLE re-issued every idle_renew seconds


async def test_starttls_required_but_not_offered_spools_nothing(dovecot, engine, caplog):
    sent = [mail(1, tag="plain")]
    await asyncio.to_thread(dovecot.append, USER, sent)
    src = source(dovecot, security="starttls")
    run = Running(puller(src, engine))
    await asyncio.sleep(1.0)
    await run.stop()
    assert count(engine, src) == 0
    assert "does not offer STARTTLS" in caplog.text


async def test_server_restarted_while_idling_reconnects_at_once(dovecot, engine):
    src = source(dovecot, timeout=20.0)
    run = Running(puller(src, engine))
    idle = {"source": f"imap:{src.name}", "mailgate_imap_connection": "idle"}
    await wait_for(lambda: SERVE_ONLY.get_sample_value("mailgate_imap_connection", idle) == 1, 10, "idle")
    await asyncio.to_thread(dovecot.restart)
    await asyncio.to_thread(dovecot.append, USER, [mail(1, tag="after-restart")])
    # Reconnecting must not wait for the dead IDLE's command timeout (20 s here).
    elapsed = await wait_for(lambda: count(engine, src) == 1, 20, "the message after the restart")
    await run.stop()
    assert elapsed < 5, f"took {elapsed:.1f} s after the restart"


async def test_lag_reports_the_age_of_the_oldest_unspooled_message(dovecot, engine):
    c = dovecot.client(USER)
    for i in range(3):
        c.append("INBOX", None, time.time() - 3600, mail(i, tag="old"))
    c.logout()
    src = source(dovecot)
    p = puller(src, engine)
    seen_lag: list[float] = []
    p.after_commit_hook = lambda _uids: seen_lag.append(
        REGISTRY.get_sample_value("mailgate_imap_lag_seconds", {"source": f"imap:{src.name}"}))
    run = Running(p)
    await wait_for(lambda: count(engine, src) == 3, 10, "3 spooled")
    await wait_for(lambda: REGISTRY.get_sample_value(
        "mailgate_imap_lag_seconds", {"source": f"imap:{src.name}"}) == 0, 5, "lag back to 0")
    await run.stop()
    assert seen_lag and 3500 < seen_lag[0] < 3700, seen_lag


async def test_mail_announced_during_the_last_search_is_pulled_without_waiting_for_idle(dovecot, engine,
                                                                                         monkeypatch):
    """A message delivered as the puller sends its final UID SEARCH: Dovecot answers `* SEARCH 1` (nothing
    new: the search ran on its old view) and then `* 2 EXISTS`, and does not announce it again once IDLE
    starts. aioimaplib drops that EXISTS line, so the puller went to IDLE and the message waited for the IDLE
    renewal (25 min by default)."""
    await asyncio.to_thread(dovecot.append, USER, [mail(1, tag="wakeup")])
    src = source(dovecot, idle_renew=600)
    searches = [0]
    original = PullClient.uid_search

    async def uid_search(self, *args, **kw):  # type: ignore[no-untyped-def]
        searches[0] += 1
        if searches[0] == 2:  # the search after the first batch: a second message lands right now
            await asyncio.to_thread(dovecot.append, USER, [mail(2, tag="wakeup")])
        return await original(self, *args, **kw)

    monkeypatch.setattr(PullClient, "uid_search", uid_search)
    run = Running(puller(src, engine))
    await wait_for(lambda: count(engine, src) == 2, 5, "the message announced during the search")
    await run.stop()

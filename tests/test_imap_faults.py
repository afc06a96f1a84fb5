"""IMAP puller against a scripted fake server: the faults a real Dovecot will not produce on demand.

A half-open connection, a message the server cannot read, a body the server leaves out, a connection that
drops between COPY and STORE: each is a hook on one command of `FakeImap`, a few lines of IMAP on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator

import pytest
from sqlalchemy import select

from gateway.config import ImapSourceConfig
from gateway.imap import BATCH_BYTES, ImapPuller
from gateway.schema import imap_checkpoints, imap_seen
from gateway.store import open_store
from tests.running_puller import Running, wait_for

Hook = Callable[["FakeImap", str, str, asyncio.StreamWriter], Awaitable[bool]]


def msg(n: int) -> bytes:
    return (f"From: a@example.test\r\nTo: catchall@example.test\r\nMessage-ID: <m{n}@fake.test>\r\n"
            f"Subject: s{n}\r\n\r\nbody {n}\r\n").encode()


class FakeImap:
    """A tiny IMAP server: enough of RFC 3501 for the puller; `hooks[command]` overrides one command and
    returns True when it answered (or chose not to). `UID FETCH` is a body fetch; the puller's size fetch,
    `UID FETCH <set> (UID RFC822.SIZE)`, is the command `UID FETCH SIZE`."""

    def __init__(self, msgs: dict[int, bytes] | None = None, caps: str = "IMAP4rev1 IDLE UIDPLUS MOVE"):
        self.msgs = dict(msgs or {})
        self.caps = caps
        self.log: list[str] = []
        self.hooks: dict[str, Hook] = {}
        self.flags: dict[int, set[str]] = {}
        self.copies: list[int] = []  # UIDs copied (to any mailbox), once per COPY
        self.idle_tag: str | None = None
        self.port = 0

    async def start(self) -> "FakeImap":
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        self.server.close()

    def count(self, command: str) -> int:
        return sum(1 for line in self.log if line.split(" ", 1)[-1].upper().startswith(command))

    async def _conn(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"* OK [CAPABILITY " + self.caps.encode() + b"] fake ready\r\n")
        try:
            while line := await r.readline():
                text = line.rstrip(b"\r\n").decode()
                self.log.append(text)
                if text == "DONE":
                    if self.idle_tag:
                        w.write(f"{self.idle_tag} OK idle done\r\n".encode())
                        self.idle_tag = None
                    continue
                tag, _, rest = text.partition(" ")
                cmd, _, args = rest.partition(" ")
                cmd = cmd.upper()
                if cmd == "UID":
                    sub, _, args = args.partition(" ")
                    cmd = f"UID {sub.upper()}"
                    if cmd == "UID FETCH" and "RFC822.SIZE" in args and "BODY" not in args.upper():
                        cmd = "UID FETCH SIZE"
                hook = self.hooks.get(cmd)
                if not (hook and await hook(self, tag, args, w)):
                    self.default(tag, cmd, args, w)
                await w.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            w.close()

    def uids_in(self, spec: str) -> list[int]:
        top = max(self.msgs, default=0)
        out: set[int] = set()
        for part in spec.split(","):
            lo, _, hi = part.partition(":")
            a = int(lo)
            b = a if not hi else (top if hi == "*" else int(hi))
            out |= {u for u in self.msgs if min(a, b) <= u <= max(a, b)}
        return sorted(out)

    def fetch_line(self, seq: int, uid: int) -> bytes:
        body = self.msgs[uid]
        return (f'* {seq} FETCH (UID {uid} INTERNALDATE "01-Jan-2024 00:00:00 +0000" BODY[] {{{len(body)}}}\r\n'
                .encode() + body + b")\r\n")

    def default(self, tag: str, cmd: str, args: str, w: asyncio.StreamWriter) -> None:
        ok = f"{tag} OK done\r\n".encode()
        if cmd == "CAPABILITY":
            w.write(f"* CAPABILITY {self.caps}\r\n".encode() + ok)
        elif cmd == "SELECT":
            w.write(f"* {len(self.msgs)} EXISTS\r\n* OK [UIDVALIDITY 7] ok\r\n{tag} OK [READ-WRITE] selected\r\n"
                    .encode())
        elif cmd == "UID SEARCH":  # UID <set> [UNDELETED]
            words = args.split()
            found = [u for u in self.uids_in(words[1])
                     if "UNDELETED" not in words or "\\Deleted" not in self.flags.get(u, ())]
            w.write(("* SEARCH " + " ".join(map(str, found))).encode().rstrip() + b"\r\n" + ok)
        elif cmd == "UID FETCH SIZE":
            for seq, uid in enumerate(self.uids_in(args.split()[0]), 1):
                w.write(f"* {seq} FETCH (UID {uid} RFC822.SIZE {len(self.msgs[uid])})\r\n".encode())
            w.write(ok)
        elif cmd == "UID FETCH":
            for seq, uid in enumerate(self.uids_in(args.split()[0]), 1):
                w.write(self.fetch_line(seq, uid))
            w.write(ok)
        elif cmd == "UID STORE":
            spec, _, flags = args.partition(" ")
            for uid in self.uids_in(spec):
                self.flags.setdefault(uid, set()).update(flags.split("(", 1)[-1].rstrip(")").split())
            w.write(ok)
        elif cmd in ("UID EXPUNGE", "UID MOVE"):
            for uid in self.uids_in(args.split()[0]):
                self.msgs.pop(uid, None)
            w.write(ok)
        elif cmd == "IDLE":
            self.idle_tag = tag
            w.write(b"+ idling\r\n")
        elif cmd == "LOGOUT":
            w.write(b"* BYE\r\n" + ok)
        elif cmd == "UID COPY":
            self.copies.extend(self.uids_in(args.split()[0]))
            w.write(ok)
        elif cmd in ("LOGIN", "NOOP", "EXPUNGE"):
            w.write(ok)
        else:
            w.write(f"{tag} BAD unknown {cmd}\r\n".encode())


@pytest.fixture
async def fake() -> "Iterator[FakeImap]":  # type: ignore[misc]
    server = await FakeImap().start()
    yield server
    await server.close()


@pytest.fixture
def engine(tmp_path):  # type: ignore[no-untyped-def]
    eng = open_store(f"sqlite:///{tmp_path}/spool.db", synchronous="NORMAL")
    yield eng
    eng.dispose()


def puller(server: FakeImap, engine, **kw) -> ImapPuller:  # type: ignore[no-untyped-def]
    values = dict(name="fake", host="127.0.0.1", port=server.port, security="none", login="u",
                  password_env="MAILGATE_TEST_IMAP_PW", timeout=5.0, backoff_max=0.5)
    values.update(kw)
    p = ImapPuller(ImapSourceConfig(**values), engine, password="pw")
    p.backoff_initial = 0.1
    return p


def seen(engine, *, done: bool | None = None) -> list[int]:  # type: ignore[no-untyped-def]
    q = select(imap_seen.c.uid).order_by(imap_seen.c.uid)
    if done is not None:
        q = q.where(imap_seen.c.after_done.is_(done))
    with engine.connect() as conn:
        return list(conn.execute(q).scalars())


def last_uid(engine) -> int:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        return int(conn.execute(select(imap_checkpoints.c.last_uid)).scalar_one())


# ------------------------------------------------------------------------------------------ the tests
async def test_an_unanswered_after_action_counts_as_a_lost_connection(fake, engine):
    """A half-open connection during UID STORE: the puller gives up after `timeout` and reconnects, instead
    of waiting forever (the after-actions had no timeout at all)."""
    fake.msgs = {1: msg(1)}
    swallowed: list[str] = []

    async def store(server, tag, args, w):  # type: ignore[no-untyped-def]
        if not swallowed:
            swallowed.append(args)
            return True  # never answered
        return False

    fake.hooks["UID STORE"] = store
    run = Running(puller(fake, engine, timeout=1.0))
    await wait_for(lambda: seen(engine, done=True) == [1], 8, "the after-action redone on a new connection")
    await run.stop()
    assert fake.count("LOGIN") >= 2
    assert "\\Seen" in fake.flags[1]


async def test_exists_sent_with_an_empty_search_answer_means_search_again(fake, engine):
    """`* SEARCH` (nothing) then `* 2 EXISTS`: the mail arrived as the server answered. aioimaplib hands the
    SEARCH command only its SEARCH line, so the puller must notice the EXISTS on the protocol, not in the
    response, and search again before it goes to IDLE (which will not announce that mail again)."""
    fake.msgs = {1: msg(1)}
    searches: list[str] = []

    async def search(server, tag, args, w):  # type: ignore[no-untyped-def]
        searches.append(args)
        if len(searches) == 2:
            server.msgs[2] = msg(2)
            w.write(f"* SEARCH\r\n* 2 EXISTS\r\n{tag} OK search done\r\n".encode())
            return True
        return False

    fake.hooks["UID SEARCH"] = search
    run = Running(puller(fake, engine, idle_renew=600))
    await wait_for(lambda: seen(engine) == [1, 2], 5, "the message announced with the empty search")
    await run.stop()
    assert len(searches) >= 3


async def test_a_message_fetched_without_its_body_holds_the_checkpoint_until_it_is_read(fake, engine, caplog):
    """UID FETCH answered OK, UID 3 as `BODY[] NIL` (the server could not render it just then). The others are
    spooled, but the checkpoint must not pass UID 3 (it was passed for good: never fetched again)."""
    fake.msgs = {u: msg(u) for u in range(1, 5)}
    flaky = {"on": True}

    async def fetch(server, tag, args, w):  # type: ignore[no-untyped-def]
        for seq, uid in enumerate(server.uids_in(args.split()[0]), 1):
            if uid == 3 and flaky["on"]:
                w.write(f"* {seq} FETCH (UID 3 BODY[] NIL)\r\n".encode())
            else:
                w.write(server.fetch_line(seq, uid))
        w.write(f"{tag} OK fetch done\r\n".encode())
        return True

    fake.hooks["UID FETCH"] = fetch
    run = Running(puller(fake, engine, idle=False, poll_interval=0.1))
    await wait_for(lambda: seen(engine) == [1, 2, 4], 5, "the readable messages")
    assert last_uid(engine) == 2
    assert "UID 3 is on the server but its FETCH returned no body" in caplog.text
    flaky["on"] = False  # the server can serve it now
    await wait_for(lambda: seen(engine) == [1, 2, 3, 4] and last_uid(engine) == 4, 5, "UID 3 on a later pass")
    await wait_for(lambda: seen(engine, done=False) == [], 5, "the after-actions")
    await run.stop()


async def test_a_message_expunged_between_search_and_fetch_is_passed(fake, engine):
    fake.msgs = {u: msg(u) for u in range(1, 5)}

    async def search(server, tag, args, w):  # type: ignore[no-untyped-def]
        if args.split()[-1] == "1:*":
            w.write(f"* SEARCH 1 2 3 4\r\n{tag} OK\r\n".encode())
            server.msgs.pop(3)  # a person deletes it right after the search
            return True
        return False

    fake.hooks["UID SEARCH"] = search
    run = Running(puller(fake, engine))
    await wait_for(lambda: seen(engine, done=True) == [1, 2, 4] and last_uid(engine) == 4, 5, "1, 2, 4")
    await run.stop()


async def test_one_unreadable_message_does_not_stop_the_source(fake, engine, caplog):
    """The batch FETCH answers with the other messages and a tagged NO; UID 3 alone answers NO too. The others
    are spooled at once (the whole batch was thrown away and retried forever), UID 3 holds the checkpoint
    for `unreadable_tries` attempts, then is skipped with an error and a metric, left on the server."""
    from prometheus_client import REGISTRY

    fake.msgs = {u: msg(u) for u in range(1, 6)}

    async def fetch(server, tag, args, w):  # type: ignore[no-untyped-def]
        for seq, uid in enumerate(server.uids_in(args.split()[0]), 1):
            if uid != 3:
                w.write(server.fetch_line(seq, uid))
        w.write(f"{tag} NO Some messages could not be FETCHed (Failure)\r\n".encode())
        return True

    fake.hooks["UID FETCH"] = fetch
    p = puller(fake, engine, name="poison", idle=False, poll_interval=0.1)
    run = Running(p)
    await wait_for(lambda: seen(engine) == [1, 2, 4, 5], 5, "the readable messages")
    await wait_for(lambda: last_uid(engine) == 5, 10, "UID 3 skipped")
    await wait_for(lambda: seen(engine, done=False) == [], 5, "the after-actions")
    await run.stop()
    assert seen(engine) == [1, 2, 4, 5]
    assert fake.count("UID FETCH 3 ") == p.unreadable_tries  # each attempt fetched it alone
    assert REGISTRY.get_sample_value("mailgate_imap_unreadable_total", {"source": "imap:poison"}) == 1
    assert "UID 3 could not be fetched in 5 attempts: skipped" in caplog.text
    assert 3 in fake.msgs and 3 not in fake.flags  # left on the server as it was


@pytest.mark.parametrize("restart", [False, True], ids=["store-lost-reconnect", "store-done-restart"])
async def test_move_without_move_redone_after_a_fault_copies_once(fake, engine, restart):
    """COPY, STORE \\Deleted, EXPUNGE, and the connection drops at the STORE: the redo must not COPY again
    (two copies in move_to). Either the STORE never reached the server and the puller reconnects (it
    remembers its copy), or the STORE was done and the puller restarts (the \\Deleted flag says: copied)."""
    fake.caps = "IMAP4rev1 IDLE UIDPLUS"
    fake.msgs = {1: msg(1)}
    first = puller(fake, engine, after="move", move_to="Archive", idle=False, poll_interval=0.1)
    run = Running(first)
    dropped = asyncio.Event()

    async def store(server, tag, args, w):  # type: ignore[no-untyped-def]
        if dropped.is_set():
            return False
        dropped.set()
        if restart:
            server.flags.setdefault(1, set()).add("\\Deleted")
            run.stop_event.set()  # the process dies with the STORE done, its answer unsent
        w.close()  # a server restart or a network drop, before the answer
        return True

    fake.hooks["UID STORE"] = store
    await asyncio.wait_for(dropped.wait(), 5)
    if restart:
        await run.stop()
        assert seen(engine, done=False) == [1]
        run = Running(puller(fake, engine, after="move", move_to="Archive", idle=False, poll_interval=0.1))
    await wait_for(lambda: seen(engine, done=True) == [1], 8, "the move redone")
    await run.stop()
    assert fake.copies == [1]
    assert fake.msgs == {}



def body_fetches_and_stores(server: FakeImap) -> list[str]:
    """The body FETCHes and STOREs the server saw, in order, as `FETCH 1:2` / `STORE 1:2`."""
    return [f"{cmd.split()[2]} {cmd.split()[3]}" for cmd in server.log
            if " UID STORE " in cmd or (" UID FETCH " in cmd and "BODY.PEEK[]" in cmd)]


async def test_batches_are_cut_by_bytes_and_large_ones_not_fetched_ahead(fake, engine):
    """8 messages of 4 MiB with a budget of 8 MiB: every body FETCH carries at most 2 UIDs, and no two batches
    are in memory at once (each is over half the budget, so the next is fetched only after this one is
    spooled and flagged). Cut by count only (100), all 8 came in one FETCH and were held twice (the
    response's literals and their copies): 67 MiB traced for 32 MiB of mail, 13 MiB now."""
    mib = 1024 * 1024
    text = b"x" * 998 + b"\r\n"
    fake.msgs = {u: msg(u) + text * (4 * mib // len(text)) for u in range(1, 9)}

    async def fetch(server, tag, args, w):  # type: ignore[no-untyped-def]
        """The default FETCH, drained after each message: the server's own buffers stay one message."""
        for seq, uid in enumerate(server.uids_in(args.split()[0]), 1):
            w.write(server.fetch_line(seq, uid))
            await w.drain()
        w.write(f"{tag} OK done\r\n".encode())
        return True

    fake.hooks["UID FETCH"] = fetch
    p = puller(fake, engine, batch_size=100, idle=False, poll_interval=0.1)
    assert p.batch_bytes == BATCH_BYTES
    p.batch_bytes = 8 * mib
    tracemalloc.start()
    try:
        run = Running(p)
        await wait_for(lambda: seen(engine, done=True) == list(range(1, 9)), 30, "all 8 spooled and flagged")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    await run.stop()
    assert body_fetches_and_stores(fake) == [f"{cmd} {u}:{u + 1}" for u in (1, 3, 5, 7) for cmd in ("FETCH", "STORE")]
    assert last_uid(engine) == 8
    assert peak < 24 * mib, f"peak {peak / mib:.0f} MiB traced while pulling 4 batches of 8 MiB"


async def test_small_batches_are_still_fetched_ahead(fake, engine):
    """Small mail keeps its round trips: one size FETCH per search, and batch k+1 fetched while k commits."""
    fake.msgs = {u: msg(u) for u in range(1, 7)}
    run = Running(puller(fake, engine, batch_size=2, idle=False, poll_interval=0.1))
    await wait_for(lambda: seen(engine, done=True) == list(range(1, 7)), 5, "all 6 spooled and flagged")
    await run.stop()
    assert sum(1 for cmd in fake.log if "RFC822.SIZE" in cmd) == 1
    assert body_fetches_and_stores(fake) == ["FETCH 1:2", "FETCH 3:4", "STORE 1:2", "FETCH 5:6", "STORE 3:4",
                                             "STORE 5:6"]

"""Large bodies in body log segment files (SQLite file stores): byte-exact round trips through every writer,
damage is reported rather than routed, and segments go away only when nothing refers to them and no writer
holds them. On PostgreSQL every body stays in the database."""

from __future__ import annotations

import asyncio
import datetime as dt
import fcntl
import os
import textwrap
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select

from gateway.body_log import BodyLog, BodyLogError, BodyRef, body_log_dir, read_body, segment_names
from gateway.schema import message_bodies, message_body_refs
from gateway.spool import (
    Envelope, SpoolWriter, claim, collect_segments, delete_message, get_raw, make_body_log, purge_raw, spool_many,
)
from gateway.spool_process import ProcessSpoolWriter
from gateway.store import open_store

BIG = 4096  # the tests' body_log_min


def env() -> Envelope:
    return Envelope(mail_from="alice@client.test", rcpt_tos=("sales@example.test",), client_addr="127.0.0.1",
                    helo="client.test", listener="smtp", source="smtp")


def mail(mid: str, size: int) -> bytes:
    head = f"Message-ID: {mid}\r\nSubject: t\r\n\r\n".encode()
    body = bytes(range(256)) * (size // 256 + 1)  # every byte value: nothing may be normalised on the way
    return head + body[:max(0, size - len(head))]


def where_bodies(engine: Engine) -> tuple[int, int]:
    """(rows in message_bodies, rows in message_body_refs)"""
    with engine.connect() as conn:
        return (conn.execute(select(func.count()).select_from(message_bodies)).scalar_one(),
                conn.execute(select(func.count()).select_from(message_body_refs)).scalar_one())


def finish_all(engine: Engine, ids: list[int]) -> None:
    """Retention only purges finished mail."""
    from sqlalchemy import update

    from gateway.schema import messages
    with engine.begin() as conn:
        conn.execute(update(messages).where(messages.c.id.in_(ids)).values(state="delivered"))


# ------------------------------------------------------------------------------------------------ the log
def test_append_read_back_and_damage_is_named(tmp_path: Path) -> None:
    log = BodyLog(tmp_path / "b", min_size=1)
    a, b = os.urandom(70_000), os.urandom(5)
    ra, rb = log.append_all([a, b])
    assert (ra.segment, ra.offset, ra.length, rb.offset) == (rb.segment, 0, 70_000, 70_000)
    assert read_body(tmp_path / "b", ra) == a and read_body(tmp_path / "b", rb) == b
    log.close()

    import hashlib
    sha = hashlib.sha256(a).hexdigest()
    assert read_body(tmp_path / "b", ra, sha) == a
    path = tmp_path / "b" / ra.segment
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BodyLogError, match="sha256"):
        read_body(tmp_path / "b", ra, sha)
    with pytest.raises(BodyLogError, match="truncated"):
        read_body(tmp_path / "b", BodyRef(ra.segment, 70_000, 10))
    path.unlink()
    with pytest.raises(BodyLogError, match="missing"):
        read_body(tmp_path / "b", ra)


def test_new_segment_only_between_batches_and_the_full_one_stays_locked_one_segment_longer(tmp_path: Path) -> None:
    """The spool process commits a batch's rows while it appends the next batch: a full segment keeps its
    lock until the next one fills too, so a collector cannot delete it before its last rows are committed."""
    log = BodyLog(tmp_path, min_size=1, segment_bytes=100)
    first = log.append_all([b"x" * 80, b"y" * 80])  # past the limit within a batch: same segment
    assert first[0].segment == first[1].segment
    second = log.append_all([b"z" * 120])
    third = log.append_all([b"w"])
    names = [first[0].segment, second[0].segment, third[0].segment]
    assert len(set(names)) == 3 and segment_names(tmp_path) == sorted(names)
    assert not list(tmp_path.glob("*.new"))
    held = [_locked(tmp_path / name) for name in names]
    assert held == [False, True, True]  # current and previous held, the one before free
    log.close()
    assert [_locked(tmp_path / name) for name in names] == [False, False, False]


def test_a_failed_new_segment_keeps_the_lock_of_the_segment_the_previous_batch_went_to(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The previous batch filled segment A and its rows may still be committing when the next batch's new
    segment B fails (disk full): A must stay locked, or a collector could delete it under those rows."""
    import gateway.body_log as body_log

    log = BodyLog(tmp_path, min_size=1, segment_bytes=100)
    seg_a = log.append_all([b"x" * 120])[0].segment

    def disk_full(fd: int, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(body_log, "_write_all", disk_full)
    with pytest.raises(OSError):
        log.append_all([b"y"])
    seg_b = next(n for n in segment_names(tmp_path) if n != seg_a)
    assert _locked(tmp_path / seg_a) and _locked(tmp_path / seg_b)
    monkeypatch.undo()
    seg_c = log.append_all([b"z"])[0].segment  # by now the batch in A was answered
    assert seg_c not in (seg_a, seg_b)
    assert [_locked(tmp_path / n) for n in (seg_a, seg_b, seg_c)] == [True, False, True]
    log.append_all([b"w"])
    assert [_locked(tmp_path / n) for n in (seg_a, seg_b, seg_c)] == [False, False, True]
    log.close()


def _locked(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def test_only_sqlite_file_stores_have_a_body_log(tmp_path: Path) -> None:
    assert body_log_dir(f"sqlite:///{tmp_path}/s.db") == Path(f"{tmp_path}/s.db-bodies")
    assert body_log_dir("sqlite://") is None and body_log_dir("sqlite:///:memory:") is None
    assert body_log_dir("postgresql+psycopg2://u:p@127.0.0.1/db") is None


# ------------------------------------------------------------------------------------------------ the spool
def test_large_bodies_go_to_the_log_small_ones_stay_and_both_read_back(engine: Engine) -> None:
    log = make_body_log(engine, BIG)
    raws = [mail("<s@x>", 500), mail("<l1@x>", 70_000), mail("<l2@x>", BIG), mail("<l3@x>", 2_000_000)]
    ids = spool_many(engine, [(r, env()) for r in raws], body_log=log)
    for ident, raw in zip(ids, raws):
        assert get_raw(engine, ident) == raw
    if engine.dialect.name == "sqlite":
        assert log is not None and where_bodies(engine) == (1, 3)
        assert sum((p.stat().st_size for p in log.directory.iterdir())) == sum(len(r) for r in raws[1:])
    else:  # the database may be shared by nodes: no files beside it
        assert log is None and where_bodies(engine) == (4, 0)
    claimed = {c.message.id: c for c in claim(engine, "w1", limit=10)}
    assert [claimed[i].raw for i in ids] == raws and all(c.raw_error is None for c in claimed.values())
    if log is not None:
        log.close()


def test_missing_or_altered_segment_is_a_reason_not_a_crash(sqlite_engine: Engine) -> None:
    log = make_body_log(sqlite_engine, BIG)
    assert log is not None
    a, b = spool_many(sqlite_engine, [(mail("<a@x>", 9_000), env()), (mail("<b@x>", 100), env())], body_log=log)
    log.close()
    (segment,) = segment_names(log.directory)
    (log.directory / segment).rename(log.directory / "elsewhere")
    claimed = {c.message.id: c for c in claim(sqlite_engine, "w1", limit=10)}
    assert claimed[a].raw is None and "missing" in (claimed[a].raw_error or "")
    assert claimed[b].raw == mail("<b@x>", 100)  # the rest of the batch is not held up
    with pytest.raises(BodyLogError):
        get_raw(sqlite_engine, a)
    (log.directory / "elsewhere").rename(log.directory / segment)  # restored: readable again
    assert get_raw(sqlite_engine, a) == mail("<a@x>", 9_000)


def test_worker_parks_a_message_whose_body_cannot_be_read_with_the_reason(sqlite_engine: Engine) -> None:
    from gateway.spool import get_message
    from gateway.worker import Worker

    log = make_body_log(sqlite_engine, BIG)
    assert log is not None
    (ident,) = spool_many(sqlite_engine, [(mail("<w@x>", 9_000), env())], body_log=log)
    log.close()
    for p in log.directory.iterdir():
        p.unlink()
    from gateway.config import parse_config

    config = parse_config({}, base_dir=str(log.directory.parent))
    worker = Worker(config, sqlite_engine, route=lambda raw, msg: pytest.fail("routed without a body"),  # type: ignore[arg-type]
                    deliver=None, owner="w1")
    assert worker.run_once() == 1
    m = get_message(sqlite_engine, ident)
    assert m is not None and m.state == "dead" and "segment" in (m.last_error or "") and "missing" in m.last_error


def test_the_sweep_deletes_what_a_crash_left_but_not_a_segment_being_created(sqlite_engine: Engine) -> None:
    """A crash between creating a segment and renaming it leaves `<name>.seg.new`; one at start-up leaves a
    `.probe-<pid>`. The sweep deletes them once they are an hour old, never a fresh one (a writer is between
    its create and its rename) and never a segment."""
    log = make_body_log(sqlite_engine, BIG)
    assert log is not None
    kept = log.append_all([mail("<k@x>", BIG)])[0].segment
    old_new, fresh_new, old_probe = (log.directory / n for n in ("a.seg.new", "b.seg.new", ".probe-1"))
    for path in (old_new, fresh_new, old_probe):
        path.write_bytes(b"")
    two_hours_ago = time.time() - 7200
    for path in (old_new, old_probe):
        os.utime(path, (two_hours_ago, two_hours_ago))
    log.close()  # the segment is unreferenced and unlocked: the sweep deletes it too
    collect_segments(sqlite_engine)
    assert sorted(p.name for p in log.directory.iterdir()) == ["b.seg.new"]
    assert kept not in segment_names(log.directory)


def test_retention_and_delete_remove_a_segment_once_nothing_refers_to_it(sqlite_engine: Engine) -> None:
    log = make_body_log(sqlite_engine, BIG)
    assert log is not None
    ids = spool_many(sqlite_engine, [(mail(f"<r{i}@x>", 8_000), env()) for i in range(3)], body_log=log)
    (segment,) = segment_names(log.directory)
    finish_all(sqlite_engine, ids[:2])
    assert delete_message(sqlite_engine, ids[2])
    log.close()  # the writer moved on (rotation, restart): the segment may go once unreferenced
    assert segment_names(log.directory) == [segment]  # two messages still point into it
    assert purge_raw(sqlite_engine, dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1)) == 2
    assert segment_names(log.directory) == [] and where_bodies(sqlite_engine) == (0, 0)


def test_a_writers_current_segment_survives_collection_even_unreferenced(sqlite_engine: Engine) -> None:
    """A writer appends and syncs before it commits the refs: in between, the segment has bytes nobody
    references yet. Its lock keeps the collector away; once closed, a sweep deletes what stayed unreferenced
    (a batch whose commit failed)."""
    log = make_body_log(sqlite_engine, BIG)
    assert log is not None
    log.append_all([b"orphan" * 1000])  # as if the commit that follows had failed
    (segment,) = segment_names(log.directory)
    assert collect_segments(sqlite_engine) == [] and segment_names(log.directory) == [segment]
    log.close()
    assert collect_segments(sqlite_engine) == [segment] and segment_names(log.directory) == []


async def test_thread_and_process_writers_use_the_log(sqlite_engine: Engine) -> None:
    url = sqlite_engine.url.render_as_string(hide_password=False)
    inline = SpoolWriter(sqlite_engine, body_log=make_body_log(sqlite_engine, BIG))
    writer = ProcessSpoolWriter(url, body_log_min=BIG, inline=inline, inline_max=1 << 20)
    await writer.start()
    raws = [mail(f"<p{i}@x>", size) for i, size in enumerate([100, 6_000, 90_000, 1_500_000] * 5)]
    ids = await asyncio.gather(*[writer.store(r, env()) for r in raws])
    await writer.close()
    assert [get_raw(sqlite_engine, i) for i in ids] == raws
    assert where_bodies(sqlite_engine) == (5, 15)
    # the child and the in-process thread (messages >= inline_max) each wrote segments of their own
    directory = body_log_dir(url)
    assert directory is not None and len({name.split("-")[1] for name in segment_names(directory)}) == 2


def test_the_serve_config_turns_it_on_by_default_and_off_with_zero(tmp_path: Path) -> None:
    from gateway.config import parse_config
    from gateway.serve import make_spool_writer

    for minimum, expect in ((None, 64 * 1024), (0, None)):
        storage = {"url": f"sqlite:///{tmp_path}/c{minimum}.db", "writer": "thread"}
        if minimum is not None:
            storage["body_log_min"] = minimum
        config = parse_config({"storage": storage}, base_dir=str(tmp_path))
        engine = open_store(config.storage_url())
        writer = make_spool_writer(config, engine, None)
        assert isinstance(writer, SpoolWriter)
        assert (writer.body_log.min_size if writer.body_log else None) == expect
        engine.dispose()


def test_retention_erases_a_purged_body_even_while_its_segment_lives_on(sqlite_engine: Engine) -> None:
    """One unfinished message keeps its segment; the purged neighbour's bytes must still be gone."""
    log = make_body_log(sqlite_engine, BIG)
    assert log is not None
    secret = b"Subject: payslip\r\n\r\n" + b"CONFIDENTIAL " * 1000
    done, pending = spool_many(sqlite_engine, [(secret, env()), (mail("<open@x>", 8_000), env())], body_log=log)
    log.close()
    finish_all(sqlite_engine, [done])
    assert purge_raw(sqlite_engine, dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1)) == 1
    (segment,) = segment_names(log.directory)
    data = (log.directory / segment).read_bytes()
    assert b"CONFIDENTIAL" not in data and data[:len(secret)] == bytes(len(secret))
    assert get_raw(sqlite_engine, pending) == mail("<open@x>", 8_000)
    assert get_raw(sqlite_engine, done) is None


def test_messages_show_raw_names_a_missing_segment(tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    from gateway.cli import main

    cfg = tmp_path / "mailgate.toml"
    cfg.write_text('[storage]\nurl = "sqlite:///spool.db"\nbody_log_min = 4096\n')
    engine = open_store(f"sqlite:///{tmp_path}/spool.db")
    log = make_body_log(engine, BIG)
    assert log is not None
    (ident,) = spool_many(engine, [(mail("<cli@x>", 9_000), env())], body_log=log)
    log.close()
    assert main(["messages", "show", str(ident), "--raw", "--config", str(cfg)]) == 0
    assert capsysbinary.readouterr().out == mail("<cli@x>", 9_000)
    for p in log.directory.iterdir():
        p.unlink()
    assert main(["messages", "show", str(ident), "--raw", "--config", str(cfg)]) == 1
    assert b"is missing" in capsysbinary.readouterr().err


async def test_a_failed_segment_sync_fails_the_batch_and_the_next_starts_a_new_segment(
        sqlite_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Disk trouble while appending: the senders get an error (451 at the listener), no row points at the
    unsynced bytes, and the next batch does not trust the damaged segment's end."""
    from gateway import body_log as body_log_module
    from gateway.spool import SpoolError, list_messages

    log = make_body_log(sqlite_engine, BIG)
    assert log is not None
    writer = SpoolWriter(sqlite_engine, body_log=log)
    real = os.fdatasync

    def failing(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(body_log_module.os, "fdatasync", failing)
    with pytest.raises(SpoolError, match="No space left"):
        await writer.store(mail("<full@x>", 9_000), env())
    assert list_messages(sqlite_engine) == [] and where_bodies(sqlite_engine) == (0, 0)
    (broken,) = segment_names(log.directory)
    monkeypatch.setattr(body_log_module.os, "fdatasync", real)
    ident = await writer.store(mail("<next@x>", 9_000), env())
    await writer.close()
    assert get_raw(sqlite_engine, ident) == mail("<next@x>", 9_000)
    assert [n for n in segment_names(log.directory) if n != broken]  # written to a fresh segment
    assert collect_segments(sqlite_engine) == [broken]  # nothing refers to the broken one


def test_two_stage_batches_answer_in_order_and_a_failed_prepare_fails_only_its_batch(tmp_path: Path) -> None:
    """`serve_batches` with a prepare stage (the spool process: body log sync in a thread, rows committed
    here) in a real child: every request answered once, in order, each batch's answer seeing its own
    prepare's result, and a prepare that raises failing its own batch only."""
    import subprocess
    import sys

    child = textwrap.dedent("""
        import itertools, sys, time
        from gateway.childproc import serve_batches
        batches = itertools.count()
        def take(buf, limit):
            text = bytes(buf)
            end = text.rfind(b"\\n") + 1
            items = text[:end].split()[:limit]
            used = sum(len(i) + 1 for i in items)
            return [i.decode() for i in items], used
        def prepare(items):
            time.sleep(0.002)
            if "boom" in items:
                raise OSError("disk trouble")
            return [i.upper() for i in items]
        def answer(items, prepared):
            n = next(batches)
            try:
                done = prepared.result()
            except OSError as exc:
                return "".join(f"{i} err {n} {exc}\\n" for i in items).encode()
            return "".join(f"{i} ok {n} {d}\\n" for i, d in zip(items, done)).encode()
        sys.exit(serve_batches(take, answer, max_batch=8, prepare=prepare))
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            cwd=str(Path(__file__).resolve().parents[1]))
    assert proc.stdin is not None and proc.stdout is not None
    sent = [f"m{i}" if i != 57 else "boom" for i in range(120)]
    for k in range(0, len(sent), 7):  # bursts: batches of varying size form
        proc.stdin.write("".join(f"{m}\n" for m in sent[k:k + 7]).encode())
        proc.stdin.flush()
        time.sleep(0.001)
    proc.stdin.close()
    lines = proc.stdout.read().decode().splitlines()
    assert proc.wait(timeout=10) == 0
    got = [line.split(" ", 3) for line in lines]
    assert [g[0] for g in got] == sent  # once each, in order
    boom_batch = next(g[2] for g in got if g[0] == "boom")
    for item, verdict, batch, rest in got:
        if batch == boom_batch:
            assert verdict == "err" and rest == "disk trouble"
        else:
            assert verdict == "ok" and rest == item.upper()


def test_serve_refuses_to_start_with_a_body_log_folder_it_cannot_write(tmp_path: Path) -> None:
    """At start-up, with what to change — not a 451 for every large mail later."""
    from gateway.config import parse_config
    from gateway.serve import make_spool_writer

    (tmp_path / "s.db-bodies").write_text("a file where the folder should be")
    config = parse_config({"storage": {"url": f"sqlite:///{tmp_path}/s.db", "writer": "thread"}},
                          base_dir=str(tmp_path))
    engine = open_store(config.storage_url())
    with pytest.raises(BodyLogError, match=r"s\.db-bodies is not writable .*body_log_min = 0"):
        make_spool_writer(config, engine, None)
    engine.dispose()


def test_messages_verify_reads_back_every_logged_body(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """After a restore: every body in the body log read back and checked; missing or damaged ones named,
    exit 1."""
    import json

    from gateway.cli import main

    cfg = tmp_path / "mailgate.toml"
    cfg.write_text('[storage]\nurl = "sqlite:///spool.db"\nbody_log_min = 4096\n')
    engine = open_store(f"sqlite:///{tmp_path}/spool.db")
    log = make_body_log(engine, BIG)
    assert log is not None
    first = spool_many(engine, [(mail(f"<v{i}@x>", 9_000), env()) for i in range(3)], body_log=log)
    log.close()
    second = spool_many(engine, [(mail("<w@x>", 9_000), env()), (mail("<small@x>", 100), env())], body_log=log)
    log.close()
    assert main(["messages", "verify", "--config", str(cfg)]) == 0
    assert "4 bodies in the body log checked, 0 missing or damaged" in capsys.readouterr().out
    old, new = sorted(segment_names(log.directory), key=lambda n: -(log.directory / n).stat().st_size)  # 3 bodies, 1
    path = log.directory / old
    data = bytearray(path.read_bytes())
    data[9_000 + 50] ^= 1  # inside the second message's body
    path.write_bytes(bytes(data))
    (log.directory / new).unlink()
    assert main(["messages", "verify", "--json", "--config", str(cfg)]) == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(d["id"], "sha256" in d["problem"] or "missing" in d["problem"]) for d in lines[:-1]] == [
        (first[1], True), (second[0], True)]
    assert lines[-1] == {"checked": 4, "problems": 2}


def test_a_segment_name_made_twice_never_replaces_the_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two gateways on one volume, each pid 1 in its container, opening a segment in the same second made
    the same name; the second `rename` replaced the first segment, bodies already acknowledged included.
    Names are now published with `link` (no replace) and carry random bits."""
    import itertools

    import gateway.body_log as body_log

    monkeypatch.setattr(body_log.os, "getpid", lambda: 1)
    real_urandom = os.urandom
    draws = itertools.chain([b"\0" * 6, b"\0" * 4, b"\0" * 6, b"\0" * 4], iter(lambda: real_urandom(6), None))
    monkeypatch.setattr(body_log.os, "urandom", lambda n: next(draws)[:n])
    monkeypatch.setattr(body_log, "_counter", itertools.count())
    first = BodyLog(tmp_path, min_size=1)
    [ref_a] = first.append_all([b"acknowledged body A"])
    monkeypatch.setattr(body_log, "_counter", itertools.count())  # the other container's counter
    second = BodyLog(tmp_path, min_size=1)
    [ref_b] = second.append_all([b"body B"])
    assert ref_a.segment != ref_b.segment
    assert read_body(tmp_path, ref_a) == b"acknowledged body A"
    assert read_body(tmp_path, ref_b) == b"body B"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".new")]  # the temporary names are gone
    first.close()
    second.close()


def test_a_body_purged_while_it_is_read_is_gone_not_damaged(sqlite_engine: Engine,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Retention drops a body between a reader's look-up of its reference and its read of the segment:
    `messages show --raw` answered "damaged" and `messages verify` exited 1 for mail that was simply purged."""
    import gateway.spool as spool
    from gateway.spool import verify_logged_bodies

    log = make_body_log(sqlite_engine, BIG)
    assert log is not None
    ids = spool_many(sqlite_engine, [(mail(f"<p{i}@x>", 8_000), env()) for i in range(2)], body_log=log)
    log.close()
    finish_all(sqlite_engine, ids[:1])
    real_read = spool.read_body

    def purge_first(*args, **kw):  # type: ignore[no-untyped-def]
        purge_raw(sqlite_engine, dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1))
        return real_read(*args, **kw)

    monkeypatch.setattr(spool, "read_body", purge_first)
    assert get_raw(sqlite_engine, ids[0]) is None
    monkeypatch.setattr(spool, "read_body", real_read)
    assert get_raw(sqlite_engine, ids[1]) == mail("<p1@x>", 8_000)  # the other one is still whole
    assert verify_logged_bodies(sqlite_engine) == (1, [])

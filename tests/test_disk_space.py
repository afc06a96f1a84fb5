"""Refusing new mail before the spool's disk is full (gateway/disk_space.py): at MAIL FROM, in /healthz."""

from __future__ import annotations

import logging
from pathlib import Path

import aiohttp
import pytest

from gateway.admin import make_admin_app, start_admin
from gateway.disk_space import REFUSAL, FreeSpace, declared_size, spool_free_space
from gateway.store import open_store
from tests.gateway_proc import free_port
from tests.smtp_wire import make_mail
from tests.test_listener import _envelope, _gateway

MB = 1024 * 1024


class Disk:
    """A filesystem whose free space the test sets, counting how often it is looked at."""

    def __init__(self, free: int):
        self.free = free
        self.looks = 0

    def __call__(self, _path: Path) -> int:
        self.looks += 1
        return self.free


def test_refuses_below_the_headroom_and_a_declared_size_must_fit_one_and_a_half_times(tmp_path: Path) -> None:
    disk = Disk(300 * MB)
    space = FreeSpace(tmp_path, 256 * MB, ttl=0, available=disk)
    assert space.refusal() is None
    assert space.refusal(declared_size(["BODY=8BITMIME", "SIZE=29360128"])) is None   # 256 + 42 MB <= 300
    assert space.refusal(declared_size(["SIZE=31457280"])) == REFUSAL                 # 256 + 45 MB > 300
    disk.free = 255 * MB
    assert space.refusal() == REFUSAL


def test_the_disk_is_looked_at_at_most_once_per_ttl(tmp_path: Path) -> None:
    disk = Disk(1 << 40)
    space = FreeSpace(tmp_path, 1, ttl=60, available=disk)
    for _ in range(100):
        space.refusal()
    assert disk.looks == 1


def test_declared_size_reads_only_a_numeric_size() -> None:
    assert declared_size(["size=1000"]) == 1000
    assert declared_size(["SIZE=", "SIZE=12x", "BODY=7BIT"]) == 0 and declared_size([]) == 0


def test_only_sqlite_file_stores_are_checked(tmp_path: Path) -> None:
    space = spool_free_space(f"sqlite:///{tmp_path}/var/s.db", 256)
    assert space is not None and space.path == tmp_path / "var" and space.min_free == 256 * MB
    assert spool_free_space(f"sqlite:///{tmp_path}/s.db", 0) is None
    assert spool_free_space("sqlite://", 256) is None
    assert spool_free_space("postgresql+psycopg2://u:p@127.0.0.1/db", 256) is None


async def test_mail_from_gets_452_while_the_disk_is_low_and_250_once_there_is_room(tmp_path: Path) -> None:
    disk = Disk(10 * MB)
    g, server = await _gateway(tmp_path, free_space=FreeSpace(tmp_path, 256 * MB, ttl=0, available=disk))
    try:
        c = await g.client()
        assert (await c.cmd("EHLO client.test"))[0] == 250
        code, text = await c.cmd("MAIL FROM:<alice@client.test>")
        assert code == 452 and text.startswith("4.3.1")
        disk.free = 1 << 40
        assert (await c.cmd("MAIL FROM:<alice@client.test> SIZE=4096"))[0] == 250
        assert (await c.cmd("RSET"))[0] == 250
        await _envelope(c, "sales@example.test")
        assert (await c.send_data(make_mail(message_id="<room@client.test>")))[0] == 250
        await c.close()
        assert [m.message_id for m in g.stored()] == ["<room@client.test>"]
    finally:
        server.close()
        await g.writer.close()


async def test_healthz_is_503_while_mail_is_refused_for_space(tmp_path: Path) -> None:
    engine = open_store(f"sqlite:///{tmp_path}/s.db")
    disk = Disk(1 << 40)
    port = free_port()
    runner = await start_admin(make_admin_app(engine, free_space=FreeSpace(tmp_path, 256 * MB, ttl=0,
                                                                           available=disk)), "127.0.0.1", port)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                body = await resp.json()
                assert resp.status == 200 and body["disk"]["free_bytes"] == 1 << 40
            disk.free = MB
            async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                body = await resp.json()
                assert resp.status == 503 and body["status"] == "unhealthy" and body["disk"]["free_bytes"] == MB
            async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                line = next(x for x in (await resp.text()).splitlines() if x.startswith("mailgate_spool_free_bytes "))
                assert float(line.split()[1]) == MB
    finally:
        await runner.cleanup()
        engine.dispose()


def test_a_folder_not_created_yet_is_judged_by_the_filesystem_that_will_hold_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    asked: list[object] = []
    real = os.statvfs

    def statvfs(path: object) -> os.statvfs_result:
        asked.append(path)
        return real(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "statvfs", statvfs)
    assert FreeSpace(tmp_path / "var" / "spool", 256 * MB).free() > 0 and asked == [tmp_path]
    assert FreeSpace(tmp_path / "var", 1 << 62).refusal() == REFUSAL  # the real filesystem, asked for 4 EiB


def test_a_folder_that_cannot_be_looked_at_refuses_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    def unreadable(path: object) -> os.statvfs_result:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "statvfs", unreadable)
    assert FreeSpace(tmp_path, 256 * MB).refusal() is None


async def test_serve_wires_the_check_to_its_listeners(tmp_path: Path) -> None:
    """`[storage] min_free_mb` reaches the SMTP and LMTP listeners that `serve` starts (here: 1 EiB)."""
    from gateway.config import parse_config
    from gateway.serve import start_gateway
    from tests.smtp_wire import WireClient

    config = parse_config({
        "listeners": [{"name": "smtp", "kind": "smtp", "port": 0}, {"name": "lmtp", "kind": "lmtp", "port": 0}],
        "storage": {"url": f"sqlite:///{tmp_path}/s.db", "min_free_mb": 1 << 40}, "admin": {"enabled": False},
        "domains": [{"name": "example.test"}], "worker": {"processes": 0},
    }, base_dir=str(tmp_path))
    gw = await start_gateway(config, workers=False)
    try:
        for name, hello in (("smtp", "EHLO client.test"), ("lmtp", "LHLO client.test")):
            c = await WireClient.connect("127.0.0.1", gw.ports[name])
            assert (await c.reply())[0] == 220 and (await c.cmd(hello))[0] == 250
            assert (await c.cmd("MAIL FROM:<alice@client.test>"))[0] == 452
            await c.close()
    finally:
        await gw.stop(drain_seconds=1)


def test_while_the_disk_is_full_the_log_says_so_once_a_minute(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    space = FreeSpace(tmp_path, 256 * MB, ttl=0, available=Disk(MB))
    with caplog.at_level(logging.WARNING, logger="gateway.disk_space"):
        assert {space.refusal() for _ in range(500)} == {REFUSAL}
    assert len(caplog.records) == 1 and "1048576 bytes free" in caplog.records[0].getMessage()

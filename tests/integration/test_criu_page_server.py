"""CRIU's page-server protocol into pagehaul (``receiver.pageserver``), against a raw client and the real criu.

Without criu: the 32-byte header is laid out like CRIU's C struct, flags sit in the upper 16 bits
of ``cmd``, a well-formed session writes the pagemaps and pages files CRIU would, has_parent and
PS_IOV_PARENT answer from a hand-made parent directory, and every kind of hostile input closes the
connection with one log line, leaves nothing on disk, and leaves the server serving.

With criu (``@pytest.mark.criu``): ``criu dump --page-server`` sends a live process's memory to our
server, whose images directory is the dump's ``-D`` directory, and ``criu restore`` brings the
process back with its memory intact. A proxy between criu and the server records what criu sent,
and in the second test turns the unchanged pages into PE_PARENT holes against a first dump, as a
dump with dirty tracking would (this kernel has no soft-dirty, so ``criu pre-dump`` cannot run).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import errno
import logging
import mmap
import os
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from pagehaul import codec, store
from pagehaul.codec import PE_LAZY, PE_PARENT, PE_PRESENT, PagemapEntry
from pagehaul.criu_pageserver import (
    ADDRESS_LIMIT,
    PAGE_IDS_BASE,
    PAGE_SERVER_IOV,
    PID_MAX_LIMIT,
    PS_IOV_ADD,
    PS_IOV_ADD_F,
    PS_IOV_CLOSE,
    PS_IOV_FORCE_CLOSE,
    PS_IOV_GET,
    PS_IOV_HOLE,
    PS_IOV_OPEN,
    PS_IOV_OPEN2,
    PS_IOV_PARENT,
)
from pagehaul.criu_tools import CriuTools
from pagehaul.errors import ProtocolError
from pagehaul.security import TlsFiles, make_test_pki
from receiver.pageserver import (
    TMP_PREFIX,
    PageServer,
    PageServerIov,
    PageServerLimits,
    decode_cmd,
    decode_dst_id,
    decode_flags,
    encode_cmd,
    encode_dst_id,
    serve_page_server,
)

PS = mmap.PAGESIZE
IO_TIMEOUT_S = 30.0
CRIU_TIMEOUT_S = 120.0
PID42 = encode_dst_id("pid", 42)
PID43 = encode_dst_id("pid", 43)
SHM7 = encode_dst_id("shmem", 7)


def page_data(nr_pages: int, seed: int) -> bytes:
    """Distinct, non-zero pages: each 8-byte word holds (seed, page index)."""
    return b"".join(struct.pack("<Q", seed << 32 | i | 1 << 62) * (PS // 8) for i in range(nr_pages))


# === Header layout (no criu needed) ====================================================================


class _CPageServerIov(ctypes.Structure):
    """criu/page-xfer.c ``struct page_server_iov`` with the C compiler's natural alignment."""

    _fields_ = (("cmd", ctypes.c_uint32), ("nr_pages", ctypes.c_uint64), ("vaddr", ctypes.c_uint64),
                ("dst_id", ctypes.c_uint64))


def test_header_is_criu_struct_layout() -> None:
    assert PAGE_SERVER_IOV.size == ctypes.sizeof(_CPageServerIov) == 32
    cmd = encode_cmd(PS_IOV_ADD_F, PE_PRESENT | PE_LAZY)
    assert cmd == 0x0006_0006
    iov = PageServerIov(cmd, 3, 0x7F12_3456_7000, encode_dst_id("pid", 1234))
    raw = iov.pack()
    assert raw == bytes(_CPageServerIov(cmd, 3, 0x7F12_3456_7000, 1234 << 8 | 1))
    assert raw[:4] == struct.pack("<I", 0x0006_0006)
    assert raw[4:8] == bytes(4)
    assert raw[8:16] == struct.pack("<Q", 3)
    assert raw[16:24] == struct.pack("<Q", 0x7F12_3456_7000)
    # The pad bytes of a header built on CRIU's stack are whatever was there: ignored.
    assert PageServerIov.unpack(raw[:4] + b"\xff" * 4 + raw[8:]) == iov
    assert (iov.op, iov.flags) == (PS_IOV_ADD_F, PE_PRESENT | PE_LAZY)
    assert (decode_cmd(PS_IOV_CLOSE), decode_flags(PS_IOV_CLOSE)) == (0x1023, 0)
    assert (decode_cmd(PS_IOV_FORCE_CLOSE), decode_flags(encode_cmd(PS_IOV_ADD_F, PE_PARENT))) == (0x1024, PE_PARENT)


def test_dst_id_encoding_and_legacy_types() -> None:
    assert encode_dst_id("pid", 1234) == 1234 << 8 | 1
    assert encode_dst_id("shmem", 99) == 99 << 8 | 2
    assert decode_dst_id(1234 << 8 | 1) == ("pid", 1234)
    assert decode_dst_id(99 << 8 | 2) == ("shmem", 99)
    for legacy in (10, 11, 16, 17):
        assert decode_dst_id(5 << 8 | legacy) == ("pid", 5)
    for legacy in (27, 28, 29, 32, 33, 34):
        assert decode_dst_id(5 << 8 | legacy) == ("shmem", 5)
    for bad in (0, 3, 9, 12, 26, 35, 255):
        with pytest.raises(ProtocolError, match="unknown pagemap type"):
            decode_dst_id(5 << 8 | bad)


# === A raw protocol client =============================================================================


class Client:
    """Speaks the dumper's side of the protocol (criu/page-xfer.c) byte by byte."""

    live: ClassVar[list[Client]] = []  # closed after each test by ``close_clients``, pass or fail

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer)
        cls.live.append(client)
        return client

    def send(self, cmd: int, nr_pages: int = 0, vaddr: int = 0, dst_id: int = 0, data: bytes = b"") -> None:
        self.writer.write(PageServerIov(cmd, nr_pages, vaddr, dst_id).pack() + data)

    def add(self, dst_id: int, vaddr: int, flags: int, *, nr_pages: int = 0, data: bytes = b"") -> None:
        self.send(encode_cmd(PS_IOV_ADD_F, flags), nr_pages or len(data) // PS, vaddr, dst_id, data)

    async def _reply(self, size: int) -> bytes:
        await self.writer.drain()
        async with asyncio.timeout(IO_TIMEOUT_S):
            return await self.reader.readexactly(size)

    async def open2(self, dst_id: int) -> int:
        self.send(PS_IOV_OPEN2, dst_id=dst_id)
        return (await self._reply(1))[0]

    async def parent(self, dst_id: int) -> int:
        self.send(PS_IOV_PARENT, dst_id=dst_id)
        value: int = struct.unpack("<i", await self._reply(4))[0]
        return value

    async def close(self, cmd: int = PS_IOV_CLOSE) -> int:
        """CLOSE, the int32 status, then hang up our side and wait for the server to close too."""
        self.send(cmd)
        status: int = struct.unpack("<i", await self._reply(4))[0]
        self.writer.write_eof()
        await self.closed_by_server()
        return status

    async def closed_by_server(self) -> bytes:
        """Everything the server still sent, once it has closed the connection (reset counts as closed)."""
        got = b""
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()
        async with asyncio.timeout(IO_TIMEOUT_S):
            with contextlib.suppress(ConnectionError):
                got = await self.reader.read()
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()
        return got


@pytest.fixture(autouse=True)
async def close_clients() -> AsyncIterator[None]:
    try:
        yield
    finally:
        while Client.live:
            writer = Client.live.pop().writer
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[PageServer]:
    s = PageServer(tmp_path / "images", "127.0.0.1:0",
                   limits=PageServerLimits(max_run_pages=16, max_session_bytes=32 * PS, max_pagemaps=3))
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


def listing(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


async def good_session(server: PageServer) -> None:
    """A minimal valid session: proof that the server still serves."""
    c = await Client.connect(server.port)
    assert await c.open2(PID43) == 0
    c.add(PID43, 0x40_0000, PE_PRESENT, data=page_data(1, 9))
    assert await c.close() == 0
    await server.idle()


# === Well-formed sessions ==============================================================================


async def test_session_writes_criu_pagemaps_and_pages(server: PageServer) -> None:
    images_dir = server.images_dir
    c = await Client.connect(server.port)
    assert await c.open2(PID42) == 0
    c.add(PID42, 0x10000, PE_PRESENT, data=page_data(2, 1))
    c.add(PID42, 0x12000, PE_LAZY, nr_pages=3)  # lazy, not transferred: no bytes follow
    c.add(PID42, 0x20000, PE_PRESENT | PE_LAZY, data=page_data(1, 2))
    assert await c.parent(PID42) == 0  # a reply: everything before it has been handled
    # Nothing is visible before PS_IOV_CLOSE, only the session's hidden directory.
    (hidden,) = listing(images_dir)
    assert hidden.startswith(TMP_PREFIX)
    assert await c.open2(SHM7) == 0
    c.add(SHM7, 0, PE_PRESENT, data=page_data(1, 3))
    assert await c.close() == 0
    await server.idle()

    assert listing(images_dir) == {"pagemap-42.img", "pages-65537.img", "pagemap-shmem-7.img", "pages-65538.img"}
    pm = codec.read_pagemap(images_dir / "pagemap-42.img")
    assert pm.pages_id == PAGE_IDS_BASE == 0x10001
    assert pm.entries == (PagemapEntry(0x10000, 2, PE_PRESENT), PagemapEntry(0x12000, 3, PE_LAZY),
                          PagemapEntry(0x20000, 1, PE_PRESENT | PE_LAZY))
    assert (images_dir / "pages-65537.img").read_bytes() == page_data(2, 1) + page_data(1, 2)
    # Byte for byte what CRIU's write_pagemap_loc writes, through pagehaul's own encoder.
    assert (images_dir / "pagemap-42.img").read_bytes() == codec.encode_pagemap(pm.pages_id, pm.entries)
    shm = codec.read_pagemap(images_dir / "pagemap-shmem-7.img")
    assert (shm.pages_id, shm.entries) == (0x10002, (PagemapEntry(0, 1, PE_PRESENT),))
    assert (images_dir / "pages-65538.img").read_bytes() == page_data(1, 3)

    result = server.last_result
    assert result is not None
    assert (server.sessions_committed, server.sessions_failed) == (1, 0)
    assert [(p.name, p.pages_id, p.entries, p.pages_written, p.pages_lazy, p.has_parent) for p in result.pagemaps] == [
        ("pagemap-42.img", 0x10001, 3, 3, 4, False), ("pagemap-shmem-7.img", 0x10002, 1, 1, 0, False)]
    assert result.bytes_received == 4 * PS


async def test_legacy_commands_and_force_close(server: PageServer) -> None:
    """PS_IOV_OPEN (no reply), PS_IOV_ADD, legacy type codes, runs without an open, FORCE_CLOSE."""
    c = await Client.connect(server.port)
    c.send(PS_IOV_OPEN, dst_id=42 << 8 | 11)  # CRIU 1.3-3.0's CR_FD_PAGEMAP
    c.send(PS_IOV_ADD, 1, 0x10000, 42 << 8 | 11, page_data(1, 1))
    c.send(PS_IOV_ADD, 1, 0x30000, 44 << 8 | 1, page_data(1, 2))  # "Deprecated IO w/o open" (prep_loc_xfer)
    assert await c.close(PS_IOV_FORCE_CLOSE) == 0
    await server.idle()
    assert codec.read_pagemap(server.images_dir / "pagemap-42.img").entries == (PagemapEntry(0x10000, 1, PE_PRESENT),)
    assert codec.read_pagemap(server.images_dir / "pagemap-44.img").entries == (PagemapEntry(0x30000, 1, PE_PRESENT),)


async def test_pages_ids_skip_files_already_in_the_directory(server: PageServer) -> None:
    (server.images_dir / "pages-65537.img").write_bytes(b"the dumper's")
    c = await Client.connect(server.port)
    assert await c.open2(PID42) == 0
    c.add(PID42, 0x10000, PE_PRESENT, data=page_data(1, 1))
    assert await c.close() == 0
    assert codec.read_pagemap(server.images_dir / "pagemap-42.img").pages_id == 65538
    assert (server.images_dir / "pages-65537.img").read_bytes() == b"the dumper's"


def make_parent(directory: Path, pid: int, entries: Sequence[PagemapEntry], seed: int) -> bytes:
    """A parent images directory with pagemap-PID.img and pages-1.img; returns the pages' bytes."""
    directory.mkdir()
    present = sum(e.nr_pages for e in entries if e.flags & PE_PRESENT)
    data = page_data(present, seed)
    (directory / codec.pagemap_name(pid)).write_bytes(codec.encode_pagemap(1, entries))
    (directory / codec.pages_name(1)).write_bytes(data)
    return data


async def test_parent_answers_and_holes(tmp_path: Path) -> None:
    parent_data = make_parent(tmp_path / "round-0", 42,
                              [PagemapEntry(0x10000, 4, PE_PRESENT), PagemapEntry(0x20000, 2, PE_PRESENT)], seed=7)
    server = PageServer(tmp_path / "round-1", "127.0.0.1:0", parent=tmp_path / "round-0")
    await server.start()
    try:
        assert os.readlink(tmp_path / "round-1" / "parent") == "../round-0"  # relative, like P.Haul's
        c = await Client.connect(server.port)
        assert await c.parent(PID42) == 1  # check_parent_local_xfer
        assert await c.parent(PID43) == 0
        assert await c.parent(encode_dst_id("shmem", 42)) == 0
        assert await c.open2(PID42) == 1  # has_parent
        c.add(PID42, 0x10000, PE_PARENT, nr_pages=2)
        c.add(PID42, 0x12000, PE_PRESENT, data=page_data(1, 8))
        c.add(PID42, 0x13000, PE_PARENT, nr_pages=1)
        c.add(PID42, 0x20000, PE_PARENT, nr_pages=2)
        assert await c.open2(PID43) == 0
        c.add(PID43, 0x10000, PE_PRESENT, data=page_data(1, 9))
        assert await c.close() == 0
        await server.idle()
    finally:
        await server.stop()
    pm = codec.read_pagemap(tmp_path / "round-1" / "pagemap-42.img")
    assert [(e.vaddr, e.nr_pages, e.flags) for e in pm.entries] == [
        (0x10000, 2, PE_PARENT), (0x12000, 1, PE_PRESENT), (0x13000, 1, PE_PARENT), (0x20000, 2, PE_PARENT)]
    assert server.last_result is not None
    assert [(p.pages_written, p.pages_skipped_parent, p.has_parent) for p in server.last_result.pagemaps] == [
        (1, 5, True), (1, 0, False)]
    # pagehaul's reader follows the holes into the parent, as CRIU's read_parent_page does.
    with store.open_round(tmp_path / "round-1", 42) as image_set:
        assert image_set.read_range(0x10000, 4) == parent_data[:2 * PS] + page_data(1, 8) + parent_data[3 * PS:4 * PS]
        assert image_set.read_range(0x20000, 2) == parent_data[4 * PS:]


async def test_hole_outside_parent_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="receiver.pageserver")
    make_parent(tmp_path / "round-0", 42, [PagemapEntry(0x10000, 2, PE_PRESENT)], seed=7)
    server = PageServer(tmp_path / "round-1", "127.0.0.1:0", parent=Path("../round-0"))
    await server.start()
    try:
        c = await Client.connect(server.port)
        assert await c.open2(PID42) == 1
        c.add(PID42, 0x11000, PE_PARENT, nr_pages=2)  # one page in the parent, one not
        assert await c.closed_by_server() == b""
        await server.idle()
    finally:
        await server.stop()
    assert server.sessions_failed == 1
    assert listing(tmp_path / "round-1") == {"parent"}
    assert "hole not found in the parent pagemap" in caplog.text


# === Hostile input =====================================================================================


def _open_then(*steps: Callable[[Client], None]) -> Callable[[Client], Awaitable[None]]:
    async def run(c: Client) -> None:
        assert await c.open2(PID42) == 0
        for step in steps:
            step(c)
    return run


def _raw(*steps: Callable[[Client], None]) -> Callable[[Client], Awaitable[None]]:
    async def run(c: Client) -> None:
        for step in steps:
            step(c)
    return run


def _present(vaddr: int, nr_pages: int, *, data_pages: int | None = None) -> Callable[[Client], None]:
    n = nr_pages if data_pages is None else data_pages
    return lambda c: c.add(PID42, vaddr, PE_PRESENT, nr_pages=nr_pages, data=page_data(n, 1))


def _eof(c: Client) -> None:
    c.writer.write_eof()


HOSTILE: dict[str, tuple[Callable[[Client], Awaitable[None]], str]] = {
    "garbage header": (_raw(lambda c: c.writer.write(bytes(range(32)))), "carries flags"),
    "unknown command": (_raw(lambda c: c.send(8, 1, 0x1000, PID42)), "unknown command 0x8"),
    "lazy-pages GET": (_raw(lambda c: c.send(PS_IOV_GET, 1, 0x1000, PID42)), "PS_IOV_GET"),
    "flags on OPEN2": (_raw(lambda c: c.send(encode_cmd(PS_IOV_OPEN2, PE_PRESENT), dst_id=PID42)), "carries flags"),
    "flags on CLOSE": (_open_then(lambda c: c.send(encode_cmd(PS_IOV_CLOSE, 1))), "carries flags"),
    "unknown pagemap type": (_raw(lambda c: c.send(PS_IOV_OPEN2, dst_id=42 << 8 | 3)), "unknown pagemap type 3"),
    "pid 0": (_raw(lambda c: c.send(PS_IOV_OPEN2, dst_id=encode_dst_id("pid", 0))), "no such pid"),
    "pid above PID_MAX_LIMIT": (_raw(lambda c: c.send(PS_IOV_OPEN2, dst_id=encode_dst_id("pid", PID_MAX_LIMIT + 1))),
                                "no such pid"),
    "run above the page cap": (_open_then(lambda c: c.add(PID42, 0x10000, PE_PRESENT, nr_pages=17)),
                               "more than 16 pages of data in one run"),
    "session byte limit": (_open_then(_present(0x10000, 16), _present(0x20000, 16), _present(0x30000, 1)),
                           "would exceed"),
    "descending runs": (_open_then(_present(0x20000, 1), _present(0x10000, 1)), "must ascend"),
    "overlapping runs": (_open_then(_present(0x10000, 2), _present(0x11000, 1)), "must ascend"),
    "unaligned run": (_open_then(lambda c: c.add(PID42, 0x10001, PE_LAZY, nr_pages=1)), "page-aligned"),
    "empty run": (_open_then(lambda c: c.add(PID42, 0x10000, PE_LAZY, nr_pages=0)), "non-empty"),
    "run wraps 2**64": (_open_then(lambda c: c.add(PID42, 2**64 - PS, PE_LAZY, nr_pages=2)), "reaches past"),
    "run past the address limit": (_open_then(lambda c: c.add(PID42, ADDRESS_LIMIT - PS, PE_LAZY, nr_pages=2)),
                                   "reaches past"),
    "PE_PRESENT|PE_PARENT": (_open_then(lambda c: c.add(PID42, 0x10000, PE_PRESENT | PE_PARENT, nr_pages=1)),
                             "not a combination"),
    "no flags": (_open_then(lambda c: c.add(PID42, 0x10000, 0, nr_pages=1)), "not a combination"),
    "unknown flag bit": (_open_then(lambda c: c.add(PID42, 0x10000, 1 << 5, nr_pages=1)), "not a combination"),
    "hole without parent": (_open_then(lambda c: c.add(PID42, 0x10000, PE_PARENT, nr_pages=1)), "no parent"),
    "legacy HOLE without parent": (_open_then(lambda c: c.send(PS_IOV_HOLE, 1, 0x10000, PID42)), "no parent"),
    "pagemap opened twice": (_open_then(lambda c: c.send(PS_IOV_OPEN, dst_id=PID43),
                                        lambda c: c.send(PS_IOV_OPEN, dst_id=PID42)), "opened twice"),
    "too many pagemaps": (_open_then(*(lambda c, i=i: c.send(PS_IOV_OPEN, dst_id=encode_dst_id("pid", 100 + i))
                                       for i in range(3))), "more than 3 pagemaps"),
    "EOF inside a header": (_raw(lambda c: c.writer.write(bytes(10)), _eof), "inside a header"),
    "EOF inside page data": (_open_then(_present(0x10000, 2, data_pages=1), _eof), "inside the page data"),
    "EOF without CLOSE": (_open_then(_present(0x10000, 2), _eof), "not flushed"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
async def test_hostile_input_closes_connection_and_server_keeps_serving(
        server: PageServer, case: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="receiver.pageserver")
    action, reason = HOSTILE[case]
    c = await Client.connect(server.port)
    await action(c)
    await c.closed_by_server()
    await server.idle()
    assert (server.sessions_failed, server.sessions_committed) == (1, 0)
    assert listing(server.images_dir) == set(), "a refused session must leave nothing behind"
    refusals = [r.getMessage() for r in caplog.records if "session refused" in r.getMessage()]
    assert len(refusals) == 1, refusals
    assert reason in refusals[0]
    await good_session(server)
    assert server.sessions_committed == 1
    assert listing(server.images_dir) == {"pagemap-43.img", "pages-65537.img"}


async def test_second_connection_is_refused_while_a_session_is_open(server: PageServer) -> None:
    first = await Client.connect(server.port)
    assert await first.open2(PID42) == 0
    second = await Client.connect(server.port)
    assert await second.closed_by_server() == b""
    assert server.sessions_refused == 1
    first.add(PID42, 0x10000, PE_PRESENT, data=page_data(1, 1))
    assert await first.close() == 0
    await good_session(server)
    assert server.sessions_committed == 2


async def test_existing_pagemap_is_never_replaced(server: PageServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="receiver.pageserver")
    (server.images_dir / "pagemap-42.img").write_bytes(b"stale")
    c = await Client.connect(server.port)
    assert await c.open2(PID42) == 0
    c.add(PID42, 0x10000, PE_PRESENT, data=page_data(1, 1))
    assert await c.close() == -errno.EEXIST  # non-zero: criu's disconnect_from_page_server fails the dump
    await server.idle()
    assert (server.images_dir / "pagemap-42.img").read_bytes() == b"stale"
    assert listing(server.images_dir) == {"pagemap-42.img"}  # the pages file was linked, then removed again
    assert server.sessions_failed == 1
    assert "already exists" in caplog.text


async def test_idle_connection_is_closed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="receiver.pageserver")
    server = PageServer(tmp_path / "images", "127.0.0.1:0", limits=PageServerLimits(idle_timeout_s=0.2))
    await server.start()
    try:
        c = await Client.connect(server.port)
        assert await c.closed_by_server() == b""
        await server.idle()
        assert server.sessions_failed == 1
        assert "idle for 0.2 s" in caplog.text
    finally:
        await server.stop()


async def test_stop_discards_an_open_session(tmp_path: Path) -> None:
    server = PageServer(tmp_path / "images", "127.0.0.1:0")
    await server.start()
    try:
        c = await Client.connect(server.port)
        assert await c.open2(PID42) == 0
        c.add(PID42, 0x10000, PE_PRESENT, data=page_data(1, 1))
        assert await c.parent(PID42) == 0
    finally:
        await server.stop()
    assert await c.closed_by_server() == b""
    assert (server.sessions_failed, server.sessions_committed) == (1, 0)
    assert listing(tmp_path / "images") == set()
    with pytest.raises(ConnectionRefusedError):
        await Client.connect(server.port)


async def test_serve_page_server_runs_until_cancelled(tmp_path: Path) -> None:
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve_page_server(tmp_path / "images", "127.0.0.1:0", ready=ready,
                                                 handle_signals=False))
    try:
        async with asyncio.timeout(IO_TIMEOUT_S):
            address = await ready
        port = int(address.rsplit(":", 1)[1])
        c = await Client.connect(port)
        assert await c.open2(PID42) == 0
        c.add(PID42, 0x10000, PE_PRESENT, data=page_data(1, 1))
        assert await c.close() == 0
        assert listing(tmp_path / "images") == {"pagemap-42.img", "pages-65537.img"}
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    with pytest.raises(ConnectionRefusedError):
        await Client.connect(port)


SERVE = """
import asyncio, sys
from pathlib import Path
from receiver.pageserver import serve_page_server
asyncio.run(serve_page_server(Path(sys.argv[1]), "127.0.0.1:0"))
"""


async def test_serve_page_server_stops_on_sigterm(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", SERVE, str(tmp_path / "images"),
                                                stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(IO_TIMEOUT_S):
            line = (await proc.stdout.readline()).decode()
        assert line.startswith("pagehaul CRIU page server listening on 127.0.0.1:"), line
        c = await Client.connect(int(line.rsplit(":", 1)[1]))
        assert await c.open2(PID42) == 0
        c.add(PID42, 0x10000, PE_PRESENT, data=page_data(1, 1))
        assert await c.close() == 0
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(IO_TIMEOUT_S):
            assert await proc.wait() == 0
        assert listing(tmp_path / "images") == {"pagemap-42.img", "pages-65537.img"}
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# === The real criu =====================================================================================

# The dumpee: a private anonymous mapping full of a per-page pattern. It reports its address
# through one FIFO and closes that FIFO before it is dumped (so criu sees no pipe); after restore,
# SIGUSR1 makes it check its own memory and write the verdict into a second FIFO. The signal is
# blocked and taken with sigwaitinfo: a handler around pause() would lose a signal that arrives
# just before pause() starts again, as it can right after criu restore returns.
WORKLOAD = r'''
import ctypes, mmap, os, signal, struct, sys
ready_path, check_path, pages = sys.argv[1], sys.argv[2], int(sys.argv[3])
P = mmap.PAGESIZE
def pattern():
    return b"".join(struct.pack("<Q", 0x5A5A << 48 | i) * (P // 8) for i in range(pages))
m = mmap.mmap(-1, pages * P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m[:] = pattern()
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})  # kept pending until sigwaitinfo: no race
fd = os.open(ready_path, os.O_WRONLY)
os.write(fd, b"READY %d %d\n" % (addr, pages * P))
os.close(fd)
while True:
    signal.sigwaitinfo({signal.SIGUSR1})
    fd = os.open(check_path, os.O_WRONLY)
    os.write(fd, b"OK\n" if m[:] == pattern() else b"BAD\n")
    os.close(fd)
'''
WORKLOAD_PAGES = 1024


def workload_pattern(pages: int = WORKLOAD_PAGES) -> bytes:
    return b"".join(struct.pack("<Q", 0x5A5A << 48 | i) * (PS // 8) for i in range(pages))


def read_fifo_to_eof(fd: int, timeout_s: float = IO_TIMEOUT_S) -> bytes:
    """All a FIFO's writer wrote, once it has closed its end (Linux reports no hang-up before a writer came)."""
    deadline = time.monotonic() + timeout_s
    data = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise TimeoutError(f"FIFO writer did not finish in {timeout_s} s (got {data!r})")
        chunk = os.read(fd, 4096)
        if not chunk:
            return data
        data += chunk


@dataclass
class PatternWorkload:
    proc: subprocess.Popen[bytes]
    addr: int
    size: int
    check_fifo: Path

    @property
    def pid(self) -> int:
        return self.proc.pid


def start_pattern_workload(tmp_path: Path) -> PatternWorkload:
    ready, check = tmp_path / "ready.fifo", tmp_path / "check.fifo"
    os.mkfifo(ready)
    os.mkfifo(check)
    rfd = os.open(ready, os.O_RDONLY | os.O_NONBLOCK)
    try:
        # Its own session, no pipes to us: what criu dump --shell-job can take whole.
        proc = subprocess.Popen([sys.executable, "-c", WORKLOAD, str(ready), str(check), str(WORKLOAD_PAGES)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            line = read_fifo_to_eof(rfd).decode()
        except BaseException:
            reap(proc)
            raise
    finally:
        os.close(rfd)
    word, addr, size = line.split()
    assert word == "READY", line
    return PatternWorkload(proc, int(addr), int(size), check)


def reap(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=IO_TIMEOUT_S)


PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37


@pytest.fixture
def subreaper() -> Iterator[None]:
    """Make this process the restored task's parent once ``criu restore -d`` exits, so the test reaps it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
    before = ctypes.c_int(0)
    if libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.addressof(before), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_GET_CHILD_SUBREAPER)")
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, before.value, 0, 0, 0)


def kill_restored(pid: int) -> None:
    """SIGKILL the restored task and reap it (it is our child: see ``subreaper``)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as err:
        return f"({path}: {err.strerror})"


async def run_criu(tools: CriuTools, *args: str | Path) -> tuple[int, str]:
    """criu ARGS without blocking the loop the page server runs on; its exit status and what it printed."""
    proc = await asyncio.create_subprocess_exec(str(tools.criu), *map(str, args), stdout=subprocess.PIPE,
                                                stderr=subprocess.STDOUT)
    try:
        async with asyncio.timeout(CRIU_TIMEOUT_S):
            out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


async def criu_dump(tools: CriuTools, pid: int, images_dir: Path, port: int, *extra: str) -> tuple[int, str]:
    return await run_criu(tools, "dump", "-t", str(pid), "-D", images_dir, "--page-server", "--address",
                          "127.0.0.1", "--port", str(port), "--shell-job", "-o", "dump.log", "-v4", *extra)


async def criu_restore(tools: CriuTools, images_dir: Path, pidfile: Path) -> int:
    """``criu restore -d``; returns the restored task's pid."""
    rc, out = await run_criu(tools, "restore", "-D", images_dir, "--shell-job", "-d", "-o", "restore.log", "-v4",
                             "--pidfile", pidfile)
    assert rc == 0, f"criu restore failed ({rc}): {out}\n{log_tail(images_dir / 'restore.log')}"
    return read_pidfile(pidfile)


def read_pidfile(path: Path) -> int:
    return int(path.read_text())


def read_memory(pid: int, addr: int, size: int) -> bytes:
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        mem.seek(addr)
        return mem.read(size)


async def check_restored_memory(pid: int, workload: PatternWorkload) -> None:
    """The restored task runs (answers SIGUSR1 with its own check) and its mapping holds the pattern."""
    rfd = os.open(workload.check_fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        os.kill(pid, signal.SIGUSR1)
        verdict = await asyncio.to_thread(read_fifo_to_eof, rfd)
    finally:
        os.close(rfd)
    assert verdict == b"OK\n"
    assert read_memory(pid, workload.addr, workload.size) == workload_pattern()


class CriuProxy:
    """Between criu and the page server: records what it forwards; with ``holes``, once the server has
    answered has_parent=1, sends the present pages inside them as PE_PARENT holes instead."""

    def __init__(self, upstream_port: int, holes: Sequence[tuple[int, int]] = ()) -> None:
        self.upstream_port = upstream_port
        self.holes = sorted(holes)
        self.forwarded: list[PageServerIov] = []
        self.open_replies: dict[int, int] = {}
        self.errors: list[BaseException] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def entries(self, dst_id: int) -> list[tuple[int, int, int]]:
        """``(vaddr, nr_pages, flags)`` of every ADD_F forwarded for ``dst_id``."""
        return [(i.vaddr, i.nr_pages, i.flags) for i in self.forwarded if i.op == PS_IOV_ADD_F and i.dst_id == dst_id]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            try:
                await self._pump(reader, writer, up_reader, up_writer)
            finally:
                up_writer.close()
                with contextlib.suppress(ConnectionError):
                    await up_writer.wait_closed()
        except Exception as err:  # the test reports it
            self.errors.append(err)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    up_reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter) -> None:
        has_parent = False
        while True:
            try:
                raw = await reader.readexactly(PAGE_SERVER_IOV.size)
            except asyncio.IncompleteReadError as err:
                if err.partial:
                    raise
                return
            iov = PageServerIov.unpack(raw)
            if iov.op == PS_IOV_ADD_F and iov.flags & PE_PRESENT:
                data = await reader.readexactly(iov.nr_pages * PS)
                for out, payload in self._split(iov, data) if has_parent else [(iov, data)]:
                    self.forwarded.append(out)
                    up_writer.write(out.pack() + payload)
            else:
                self.forwarded.append(iov)
                up_writer.write(raw)
            await up_writer.drain()
            reply = {PS_IOV_OPEN2: 1, PS_IOV_PARENT: 4, PS_IOV_CLOSE: 4, PS_IOV_FORCE_CLOSE: 4}.get(iov.cmd, 0)
            if reply:
                answer = await up_reader.readexactly(reply)
                if iov.cmd == PS_IOV_OPEN2:
                    self.open_replies[iov.dst_id] = answer[0]
                    has_parent = answer != b"\0"
                writer.write(answer)
                await writer.drain()
                if iov.cmd in (PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE):
                    return

    def _split(self, iov: PageServerIov, data: bytes) -> list[tuple[PageServerIov, bytes]]:
        start, end = iov.vaddr, iov.vaddr + iov.nr_pages * PS
        pieces: list[tuple[int, int, bool]] = []
        pos = start
        for hole_start, hole_end in self.holes:
            a, b = max(pos, hole_start), min(end, hole_end)
            if a >= b:
                continue
            if pos < a:
                pieces.append((pos, a, False))
            pieces.append((a, b, True))
            pos = b
        if pos < end:
            pieces.append((pos, end, False))
        hole_cmd = encode_cmd(PS_IOV_ADD_F, PE_PARENT)
        return [(PageServerIov(hole_cmd, (b - a) // PS, a, iov.dst_id), b"") if hole
                else (PageServerIov(iov.cmd, (b - a) // PS, a, iov.dst_id), data[a - start:b - start])
                for a, b, hole in pieces]


def add_dump_uptime(inventory: Path) -> None:
    """Set inventory.img's dump_uptime to now, in µs of /proc/uptime, as ``criu dump --track-mem`` does."""
    uptime_s = float(Path("/proc/uptime").read_text().split()[0])
    entry = codec.decode_inventory(inventory.read_bytes(), path=inventory)
    assert entry.dump_uptime is None
    inventory.write_bytes(codec.encode_inventory(dataclasses.replace(entry, dump_uptime=int(uptime_s * 1e6))))


def crit_entries(tools: CriuTools, path: Path) -> tuple[int, list[tuple[int, int, int]]]:
    decoded = tools.crit_decode(path)
    assert decoded["magic"] == "PAGEMAP"
    head, *entries = decoded["entries"]
    assert all(e["compat_nr_pages"] == 0 and "in_parent" not in e for e in entries)
    return head["pages_id"], [(e["vaddr"], e["nr_pages"], e["flags"]) for e in entries]


@pytest.mark.criu
async def test_criu_dump_into_page_server_restores(tmp_path: Path, criu_tools: CriuTools, subreaper: None) -> None:
    images_dir = tmp_path / "images"  # criu's -D and the page server's directory: one host, one directory
    server = PageServer(images_dir, "127.0.0.1:0")
    await server.start()
    proxy = CriuProxy(server.port)
    await proxy.start()
    workload = start_pattern_workload(tmp_path)
    restored: int | None = None
    try:
        pid = workload.pid
        rc, out = await criu_dump(criu_tools, pid, images_dir, proxy.port)
        assert rc == 0, f"criu dump failed ({rc}): {out}\n{log_tail(images_dir / 'dump.log')}"
        assert workload.proc.wait(timeout=IO_TIMEOUT_S) == -signal.SIGKILL  # criu dump's default: kill
        await server.idle()
        assert not proxy.errors
        dst_id = encode_dst_id("pid", pid)
        assert proxy.open_replies == {dst_id: 0}
        assert (server.sessions_committed, server.sessions_failed) == (1, 0)

        # crit reads back exactly the runs criu put on the wire, in a pages file the server numbered.
        pm_path = images_dir / f"pagemap-{pid}.img"
        pages_id, entries = crit_entries(criu_tools, pm_path)
        assert pages_id == PAGE_IDS_BASE
        assert entries == proxy.entries(dst_id)
        present = sum(n for _, n, flags in entries if flags & PE_PRESENT)
        assert (images_dir / codec.pages_name(pages_id)).stat().st_size == present * PS
        assert server.last_result is not None
        (result,) = server.last_result.pagemaps
        assert (result.name, result.entries, result.pages_written) == (pm_path.name, len(entries), present)
        with store.open_round(images_dir, pid) as image_set:
            assert image_set.read_range(workload.addr, workload.size // PS) == workload_pattern()

        restored = await criu_restore(criu_tools, images_dir, tmp_path / "restored.pid")
        assert restored == pid  # criu restores the same pid
        await check_restored_memory(restored, workload)
        assert "Restore finished successfully" in log_tail(images_dir / "restore.log")
    finally:
        if restored is not None:
            kill_restored(restored)
        reap(workload.proc)
        await proxy.stop()
        await server.stop()


@pytest.mark.criu
async def test_criu_dump_with_parent_holes_restores(tmp_path: Path, criu_tools: CriuTools, subreaper: None) -> None:
    """Dump 1 (task left running) is the parent; dump 2 sends the unchanged pattern as PE_PARENT holes."""
    first_dir, second_dir = tmp_path / "dump-1", tmp_path / "dump-2"
    workload = start_pattern_workload(tmp_path)
    restored: int | None = None
    first = PageServer(first_dir, "127.0.0.1:0")
    second = PageServer(second_dir, "127.0.0.1:0", parent=first_dir)
    proxy: CriuProxy | None = None
    try:
        pid = workload.pid
        dst_id = encode_dst_id("pid", pid)
        await first.start()
        rc, out = await criu_dump(criu_tools, pid, first_dir, first.port, "--leave-running")
        assert rc == 0, f"criu dump 1 failed ({rc}): {out}\n{log_tail(first_dir / 'dump.log')}"
        await first.idle()
        assert first.sessions_committed == 1
        assert workload.proc.poll() is None
        # Told has_parent=1, criu checks the parent's inventory for pid reuse (criu/mem.c
        # detect_pid_reuse) and fails the dump if it has no dump_uptime, which a dump records
        # only with --track-mem, which needs soft-dirty. Record it as such a dump would have.
        add_dump_uptime(first_dir / codec.INVENTORY_NAME)

        await second.start()
        assert os.readlink(second_dir / "parent") == "../dump-1"
        proxy = CriuProxy(second.port, holes=[(workload.addr, workload.addr + workload.size)])
        await proxy.start()
        # No --prev-images-dir: criu finds the parent through the link the server made.
        rc, out = await criu_dump(criu_tools, pid, second_dir, proxy.port)
        assert rc == 0, f"criu dump 2 failed ({rc}): {out}\n{log_tail(second_dir / 'dump.log')}"
        workload.proc.wait(timeout=IO_TIMEOUT_S)
        await second.idle()
        assert not proxy.errors
        assert proxy.open_replies == {dst_id: 1}  # has_parent: the parent holds pagemap-PID.img

        pages_id, entries = crit_entries(criu_tools, second_dir / f"pagemap-{pid}.img")
        assert entries == proxy.entries(dst_id)
        holes = [(v, n) for v, n, flags in entries if flags == PE_PARENT]
        assert sum(n for _, n in holes) == workload.size // PS
        assert min(v for v, _ in holes) == workload.addr
        assert max(v + n * PS for v, n in holes) == workload.addr + workload.size
        assert not any(flags & PE_PRESENT and v < workload.addr + workload.size and workload.addr < v + n * PS
                       for v, n, flags in entries)
        present = sum(n for _, n, flags in entries if flags & PE_PRESENT)
        assert (second_dir / codec.pages_name(pages_id)).stat().st_size == present * PS
        assert second.last_result is not None
        (result,) = second.last_result.pagemaps
        assert (result.pages_skipped_parent, result.has_parent) == (workload.size // PS, True)
        with store.open_round(second_dir, pid) as image_set:
            assert image_set.read_range(workload.addr, workload.size // PS) == workload_pattern()

        restored = await criu_restore(criu_tools, second_dir, tmp_path / "restored.pid")
        await check_restored_memory(restored, workload)
    finally:
        if restored is not None:
            kill_restored(restored)
        reap(workload.proc)
        if proxy is not None:
            await proxy.stop()
        await second.stop()
        await first.stop()


@pytest.mark.criu
async def test_criu_dump_fails_when_the_server_cannot_commit(tmp_path: Path, criu_tools: CriuTools) -> None:
    """A pagemap already in the directory: the server answers CLOSE with a non-zero status, criu's dump
    fails, the task keeps running, and the directory is left as it was."""
    images_dir = tmp_path / "images"
    server = PageServer(images_dir, "127.0.0.1:0")
    await server.start()
    workload = start_pattern_workload(tmp_path)
    try:
        stale = images_dir / f"pagemap-{workload.pid}.img"
        stale.write_bytes(b"stale")
        rc, out = await criu_dump(criu_tools, workload.pid, images_dir, server.port)
        await server.idle()
        assert rc != 0, f"criu dump should have failed: {out}\n{log_tail(images_dir / 'dump.log')}"
        assert "Dumping FAILED" in log_tail(images_dir / "dump.log", 200)
        assert workload.proc.poll() is None  # a failed dump resumes the task
        assert stale.read_bytes() == b"stale"
        assert not any(n.startswith(("pages-", TMP_PREFIX)) for n in listing(images_dir))
        assert (server.sessions_committed, server.sessions_failed) == (0, 1)
    finally:
        reap(workload.proc)
        await server.stop()


def criu_tls_args(pki: Path, role: str = "sender") -> list[str]:
    """criu's --tls options with pagehaul's test PKI (absolute paths: criu reads them after its chdir)."""
    return ["--tls", "--tls-cacert", str(pki.resolve() / "ca.crt"), "--tls-cert", str(pki.resolve() / f"{role}.crt"),
            "--tls-key", str(pki.resolve() / f"{role}.key")]


@pytest.mark.criu
async def test_criu_dump_over_tls_into_page_server_restores(tmp_path: Path, criu_tools: CriuTools,
                                                            subreaper: None) -> None:
    """``criu dump --page-server --tls`` (CRIU's GnuTLS client, X.509) into a page server with pagehaul's
    mutual TLS: criu checks the receiver's certificate against 127.0.0.1, the server requires criu's
    client certificate; the dump restores."""
    pki = tmp_path / "pki"
    make_test_pki(pki)
    images_dir = tmp_path / "images"
    server = PageServer(images_dir, "127.0.0.1:0",
                        tls=TlsFiles(pki / "receiver.crt", pki / "receiver.key", pki / "ca.crt"))
    await server.start()
    workload = start_pattern_workload(tmp_path)
    restored: int | None = None
    try:
        rc, out = await criu_dump(criu_tools, workload.pid, images_dir, server.port, *criu_tls_args(pki))
        assert rc == 0, f"criu dump failed ({rc}): {out}\n{log_tail(images_dir / 'dump.log')}"
        assert "TLS handshake completed" in (images_dir / "dump.log").read_text()
        await server.idle()
        assert (server.sessions_committed, server.sessions_failed) == (1, 0)
        with store.open_round(images_dir, workload.pid) as image_set:
            assert image_set.read_range(workload.addr, workload.size // PS) == workload_pattern()
        workload.proc.wait(timeout=IO_TIMEOUT_S)
        restored = await criu_restore(criu_tools, images_dir, tmp_path / "restored.pid")
        await check_restored_memory(restored, workload)
    finally:
        if restored is not None:
            kill_restored(restored)
        reap(workload.proc)
        await server.stop()


@pytest.mark.criu
@pytest.mark.parametrize("client", ["plain", "other-ca", "server-cert"])
async def test_tls_page_server_refuses_unauthenticated_writers(tmp_path: Path, criu_tools: CriuTools,
                                                               client: str) -> None:
    """Plain TCP, a certificate from another CA, and one not meant for clients (the receiver's own):
    criu's dump fails, the task keeps running, nothing is written."""
    pki, other = tmp_path / "pki", tmp_path / "other"
    make_test_pki(pki)
    make_test_pki(other)
    images_dir = tmp_path / "images"
    server = PageServer(images_dir, "127.0.0.1:0",
                        tls=TlsFiles(pki / "receiver.crt", pki / "receiver.key", pki / "ca.crt"))
    await server.start()
    workload = start_pattern_workload(tmp_path)
    try:
        extra = {"plain": [], "other-ca": criu_tls_args(other),
                 "server-cert": criu_tls_args(pki, "receiver")}[client]
        if client == "other-ca":  # criu trusts our receiver (its CA) but shows a certificate of another CA
            extra[extra.index("--tls-cacert") + 1] = str(pki.resolve() / "ca.crt")
        rc, out = await criu_dump(criu_tools, workload.pid, images_dir, server.port, *extra)
        await server.idle()
        assert rc != 0, f"criu dump should have failed: {out}"
        assert workload.proc.poll() is None, "a failed dump resumes the task"
        assert (server.sessions_committed, server.sessions_failed) == (0, 1)
        assert not any(n.startswith(("pages-", "pagemap-", TMP_PREFIX)) for n in listing(images_dir))
    finally:
        reap(workload.proc)
        await server.stop()


def _receiver_stderr(tmp_path: Path, *args: str) -> str:
    """Start ``pagehaul receive`` with a CRIU page server, wait until it listens, stop it: its stderr."""
    err_path = tmp_path / "receiver.err"
    with err_path.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "cli", "receive", "--listen", "127.0.0.1:0",
                                 "--images-dir", str(tmp_path / "images"), "--criu-images-dir", str(tmp_path / "criu"),
                                 *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline(), proc.stdout.readline()]  # the page server, then the receiver
        assert lines[1].startswith("pagehaul receiver listening on "), (lines, err_path.read_text())
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
    return err_path.read_text()


def test_page_server_on_a_network_address_is_flagged_as_unauthenticated(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    make_test_pki(pki)
    tls = ["--tls-cert", str(pki / "receiver.crt"), "--tls-key", str(pki / "receiver.key"),
           "--tls-ca", str(pki / "ca.crt")]
    err = _receiver_stderr(tmp_path, *tls, "--criu-page-server", "0.0.0.0:0", "--criu-page-server-idle-timeout", "30")
    assert "the CRIU page server on 0.0.0.0:0 takes any writer: CRIU's protocol has no authentication " \
           "(unlike this receiver's mutual TLS)" in err
    assert "takes any writer" not in _receiver_stderr(tmp_path, *tls, "--criu-page-server", "127.0.0.1:0")
    assert "takes any writer" not in _receiver_stderr(tmp_path, *tls, "--criu-page-server", "0.0.0.0:0",
                                                      "--criu-page-server-tls")

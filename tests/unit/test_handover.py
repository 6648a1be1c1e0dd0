"""sender.reduce and receiver.assemble on synthetic CRIU images: what the source ships, how the destination stacks it.

The real thing (criu dump of a live tree, criu restore on another namespace) is in
tests/integration/test_full_migration.py; here every case is small enough to check byte by byte.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

from pagehaul.codec import (
    PE_LAZY,
    PE_PARENT,
    PE_PRESENT,
    PagemapEntry,
    encode_pagemap,
    pages_name,
    read_pagemap,
)
from pagehaul.digest import page_digests
from pagehaul.errors import ImageError
from pagehaul.flatten import FlattenStopped, flatten_round
from pagehaul.runs import Runs
from pagehaul.store import open_round
from receiver.assemble import assemble
from sender.reduce import Holding, iter_chunks, reduce_dump

PS = 4096


def page(tag: int) -> bytes:
    return bytes([tag]) * PS


def write_pagemap(path: Path, pages_id: int, entries: list[tuple[int, int, int]]) -> None:
    path.write_bytes(encode_pagemap(pages_id, [PagemapEntry(v, n, f) for v, n, f in entries]))


@pytest.fixture
def dump(tmp_path: Path) -> Path:
    """A criu dump of task 1 (6 pages in two entries) and one shared-memory object (2 pages)."""
    d = tmp_path / "dump"
    d.mkdir()
    write_pagemap(d / "pagemap-1.img", 1, [(0x1000, 4, PE_PRESENT | PE_LAZY), (0x10000, 2, PE_PRESENT)])
    (d / "pages-1.img").write_bytes(b"".join(page(i) for i in range(1, 7)))
    write_pagemap(d / "pagemap-shmem-77.img", 2, [(0, 2, PE_PRESENT)])
    (d / "pages-2.img").write_bytes(page(0xA) + page(0xB))
    for name in ("core-1.img", "mm-1.img", "inventory.img", "stats-dump", "dump.log"):
        (d / name).write_bytes(name.encode())
    return d


def holding(cover: dict[int, bytes], zero: tuple[int, ...] = (),
            zero_ranges: tuple[tuple[int, int], ...] = ((0, 1 << 40),)) -> Holding:
    """What the destination holds: ``cover`` maps page addresses to their bytes."""
    addrs = np.array(sorted(cover), np.uint64)
    digests = np.array([int(page_digests(cover[a], PS)[0]) for a in sorted(cover)], np.uint64)
    return Holding(addrs, digests, np.array(sorted(zero), np.uint64), zero_ranges)


def test_reduce_ships_only_what_the_destination_does_not_hold(dump: Path, tmp_path: Path) -> None:
    out = tmp_path / "ship"
    # Held: 0x1000 and 0x2000 identical, 0x3000 with other bytes (written after pagehaul read it).
    held = holding({0x1000: page(1), 0x2000: page(2), 0x3000: page(0xEE)})
    reduced = reduce_dump(dump, {"pagemap-1.img": held}, out, PS)
    names = sorted(p.name for p in reduced.files)
    # Not shipped: criu's stats and log, task 1's original pages file.
    assert names == ["core-1.img", "inventory.img", "mm-1.img", "pagemap-1.img", "pagemap-shmem-77.img",
                     "pages-2.img", "pages-3.img"]
    assert (reduced.extra_pages, reduced.dropped_pages, reduced.changed_pages) == (4, 2, 1)
    pm = read_pagemap(out / "pagemap-1.img")
    assert pm.pages_id == 3  # above every id criu used, so nothing clashes on the destination
    assert [(e.vaddr, e.nr_pages, e.flags) for e in pm.entries] == [
        (0x1000, 2, PE_PARENT), (0x3000, 2, PE_PRESENT), (0x10000, 2, PE_PRESENT)]
    assert (out / "pages-3.img").read_bytes() == page(3) + page(4) + page(5) + page(6)
    assert (out / "pages-2.img").read_bytes() == page(0xA) + page(0xB)  # shared memory ships whole
    assert reduced.total_bytes == sum(p.stat().st_size for p in reduced.files)


def test_reduce_leaves_out_known_zero_pages_only_where_absent_reads_zero(tmp_path: Path) -> None:
    d = tmp_path / "dump"
    d.mkdir()
    write_pagemap(d / "pagemap-1.img", 1, [(0x1000, 2, PE_PRESENT), (0x8000, 1, PE_PRESENT)])
    (d / "pages-1.img").write_bytes(bytes(PS) * 3)
    # All three zero pages are known zero; only 0x1000-0x3000 is anonymous (0x8000: a private
    # file mapping, where an absent page would restore the file's bytes).
    held = holding({}, zero=(0x1000, 0x2000, 0x8000), zero_ranges=((0x1000, 0x3000),))
    reduced = reduce_dump(d, {"pagemap-1.img": held}, tmp_path / "ship", PS)
    assert (reduced.extra_pages, reduced.dropped_pages, reduced.changed_pages) == (1, 2, 0)
    pm = read_pagemap(tmp_path / "ship" / "pagemap-1.img")
    assert [(e.vaddr, e.nr_pages, e.flags) for e in pm.entries] == [(0x8000, 1, PE_PRESENT)]


def test_reduce_proves_shared_memory_pagehaul_dumped(dump: Path, tmp_path: Path) -> None:
    held = {"pagemap-1.img": holding({0x1000 + i * PS: page(1 + i) for i in range(4)}
                                     | {0x10000: page(5), 0x11000: page(6)}),
            "pagemap-shmem-77.img": holding({0: page(0xA), PS: page(0xB)})}
    reduced = reduce_dump(dump, held, tmp_path / "ship", PS)
    assert (reduced.extra_pages, reduced.dropped_pages) == (0, 8)
    for name in held:
        pm = read_pagemap(tmp_path / "ship" / name)
        assert {e.flags for e in pm.entries} == {PE_PARENT}
        assert (tmp_path / "ship" / f"pages-{pm.pages_id}.img").read_bytes() == b""


def test_reduce_refuses_what_it_cannot_reduce(dump: Path, tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"criu dumped no pagemap-2.img"):
        reduce_dump(dump, {"pagemap-2.img": holding({})}, tmp_path / "a", PS)
    write_pagemap(dump / "pagemap-1.img", 1, [(0x1000, 4, PE_PARENT)])
    with pytest.raises(ImageError, match="unexpected pagemap entry"):
        reduce_dump(dump, {"pagemap-1.img": holding({})}, tmp_path / "b", PS)


@pytest.fixture
def session(tmp_path: Path) -> Path:
    """Two committed rounds of task 1 and shared object 77, as the receiver writes them."""
    s = tmp_path / "session"
    r0, r1 = s / "round-0", s / "round-1"
    r0.mkdir(parents=True)
    r1.mkdir()
    write_pagemap(r0 / "pagemap-1.img", 1, [(0x1000, 4, PE_PRESENT)])
    (r0 / "pages-1.img").write_bytes(b"".join(page(i) for i in range(4)))
    write_pagemap(r1 / "pagemap-1.img", 1, [(0x1000, 1, PE_PRESENT), (0x2000, 3, PE_PARENT)])
    (r1 / "pages-1.img").write_bytes(page(9))
    write_pagemap(r1 / "pagemap-shmem-77.img", 2, [(0, 2, PE_PRESENT)])
    (r1 / "pages-2.img").write_bytes(page(0xA) * 2)
    (r1 / "parent").symlink_to("../round-0")
    (r1 / "pages-1.xxh3").write_bytes(b"not an image")
    return s


def test_assemble_stacks_criu_images_on_the_rounds(session: Path, tmp_path: Path) -> None:
    shipped = tmp_path / "restore" / "shipped"
    shipped.mkdir(parents=True)
    # Final: pagehaul's pages from the chain, the vDSO (say) from CRIU's dump.
    write_pagemap(shipped / "pagemap-1.img", 5, [(0x1000, 4, PE_PARENT), (0x7000, 2, PE_PRESENT)])
    (shipped / "pages-5.img").write_bytes(page(0xD) * 2)
    (shipped / "core-1.img").write_bytes(b"core")
    before = {p: p.read_bytes() for p in session.rglob("*") if p.is_file()}
    layout = assemble(session, tmp_path / "restore", shipped, PS)
    images = layout.images
    assert (layout.rounds, layout.extra_pages) == (2, 2)
    assert os.readlink(images / "parent") == "../r1"
    assert os.readlink(tmp_path / "restore" / "r1" / "parent") == "../r0"
    assert not (tmp_path / "restore" / "r0" / "parent").exists()
    assert not (tmp_path / "restore" / "r1" / "pages-1.xxh3").exists()  # only CRIU's files in the chain
    pm = read_pagemap(images / "pagemap-1.img")
    assert pm.pages_id == 5
    assert [(e.vaddr, e.nr_pages, e.flags) for e in pm.entries] == [(0x1000, 4, PE_PARENT), (0x7000, 2, PE_PRESENT)]
    shm = read_pagemap(images / "pagemap-shmem-77.img")  # only pagehaul has it: all from the chain
    assert [(e.vaddr, e.nr_pages, e.flags) for e in shm.entries] == [(0, 2, PE_PARENT)]
    assert shm.pages_id == 6
    assert (images / "pages-6.img").read_bytes() == b""
    assert (images / "core-1.img").read_bytes() == b"core"
    assert (images / "pages-5.img").read_bytes() == page(0xD) * 2
    assert {p: p.read_bytes() for p in session.rglob("*") if p.is_file()} == before  # rounds untouched


@pytest.mark.parametrize(("name", "entries", "error"), [
    ("pagemap-1.img", [(0x5000, 1, PE_PARENT)], "PE_PARENT page 0x5000 is not in the session's last round"),
    # Runs that start inside the held ones (two entries, coalesced) and end past them, or start before.
    ("pagemap-1.img", [(0x1000, 1, PE_PARENT), (0x2000, 4, PE_PARENT)], "PE_PARENT page 0x5000 is not"),
    ("pagemap-1.img", [(0x0, 2, PE_PARENT)], "PE_PARENT page 0x0 is not"),
    ("pagemap-2.img", [(0x1000, 1, PE_PARENT)], "pagehaul holds no such image"),
    ("pagemap-1.img", [(0x1000, 1, PE_PRESENT | PE_LAZY)], "has flags 0x6"),
])
def test_assemble_refuses_parent_pages_the_chain_lacks(session: Path, tmp_path: Path, name: str,
                                                       entries: list[tuple[int, int, int]], error: str) -> None:
    shipped = tmp_path / "restore" / "shipped"
    shipped.mkdir(parents=True)
    write_pagemap(shipped / name, 5, entries)
    (shipped / "pages-5.img").write_bytes(page(1) * sum(n for _, n, f in entries if f & PE_PRESENT))
    with pytest.raises(ImageError, match=error):
        assemble(session, tmp_path / "restore", shipped, PS)


def test_assemble_needs_a_committed_round(tmp_path: Path) -> None:
    (tmp_path / "session").mkdir()
    (tmp_path / "shipped").mkdir()
    with pytest.raises(ImageError, match="no committed round"):
        assemble(tmp_path / "session", tmp_path / "restore", tmp_path / "shipped", PS)


@pytest.mark.parametrize(("size", "chunks"), [(0, [(0, True)]), (3, [(3, True)]), (8, [(4, False), (4, True)]),
                                              (9, [(4, False), (4, False), (1, True)])])
def test_iter_chunks(tmp_path: Path, size: int, chunks: list[tuple[int, bool]]) -> None:
    path = tmp_path / "f"
    path.write_bytes(bytes(range(size)))
    got = list(iter_chunks(path, chunk=4))
    assert [(len(d), last) for d, last in got] == chunks
    assert b"".join(d for d, _ in got) == path.read_bytes()


def test_reduce_lazy_dump_takes_unwritten_pages_from_the_destination_and_reads_the_rest(tmp_path: Path) -> None:
    """A lazy dump has no data for its PE_LAZY pages: held and not written since the final round
    -> PE_PARENT; written since, or never held -> read from the (stopped) source and shipped, in
    address order with the data pages CRIU wrote."""
    d = tmp_path / "dump"
    d.mkdir()
    write_pagemap(d / "pagemap-1.img", 1, [(0x1000, 4, PE_LAZY), (0x5000, 1, PE_PRESENT), (0x6000, 2, PE_LAZY)])
    (d / "pages-1.img").write_bytes(page(0x55))  # the stack page, say
    # Anonymous memory up to 0x7000 (0x7000 lies in, say, a private file mapping).
    held = holding({0x1000: page(1), 0x2000: page(2), 0x3000: page(3), 0x5000: page(0x50), 0x6000: page(6)},
                   zero=(0x4000,), zero_ranges=((0x1000, 0x7000),))
    held = Holding(held.cover, held.digests, held.zero, held.zero_ranges, written=np.array([0x2000], np.uint64))
    asked: list[tuple[str, list[tuple[int, int]]]] = []

    def read_source(name: str, runs: Runs) -> bytes:
        asked.append((name, list(runs)))
        return b"".join(page(0xA0 + (v >> 12) + i) for v, n in runs for i in range(n))

    reduced = reduce_dump(d, {"pagemap-1.img": held}, tmp_path / "ship", PS, read_source)
    pm = read_pagemap(tmp_path / "ship" / "pagemap-1.img")
    assert [(e.vaddr, e.nr_pages, e.flags) for e in pm.entries] == [
        (0x1000, 1, PE_PARENT), (0x2000, 1, PE_PRESENT), (0x3000, 1, PE_PARENT), (0x5000, 1, PE_PRESENT),
        (0x6000, 1, PE_PARENT), (0x7000, 1, PE_PRESENT)]
    # 0x2000 written since; 0x5000 differs from what is held; 0x7000 never held and not anonymous;
    # 0x4000 known zero.
    assert asked == [("pagemap-1.img", [(0x2000, 1)]), ("pagemap-1.img", [(0x7000, 1)])]
    assert (tmp_path / "ship" / f"pages-{pm.pages_id}.img").read_bytes() == page(0xA2) + page(0x55) + page(0xA7)
    assert (reduced.extra_pages, reduced.dropped_pages, reduced.changed_pages) == (3, 4, 2)
    assert reduced.changed_at == ("pagemap-1.img 0x2000", "pagemap-1.img 0x5000")
    with pytest.raises(ImageError, match="nothing to read them from"):
        reduce_dump(d, {"pagemap-1.img": held}, tmp_path / "ship2", PS)


def test_flatten_folds_the_chain_and_restore_stacks_the_last_round_on_it(session: Path, tmp_path: Path) -> None:
    flat = flatten_round(session, 1, PS)
    assert flat == session / "flat-1"
    pm = read_pagemap(flat / "pagemap-1.img")
    assert [(e.vaddr, e.nr_pages, e.flags) for e in pm.entries] == [(0x1000, 4, PE_PRESENT)]
    # Round 1's own page at 0x1000, round 0's for the rest, in address order.
    assert (flat / pages_name(pm.pages_id)).read_bytes() == page(9) + page(1) + page(2) + page(3)
    shm = read_pagemap(flat / "pagemap-shmem-77.img")
    assert (flat / pages_name(shm.pages_id)).read_bytes() == page(0xA) * 2
    # A later round on top: the restore chain is rflat <- r2, not r0 <- r1 <- r2.
    r2 = session / "round-2"
    r2.mkdir()
    write_pagemap(r2 / "pagemap-1.img", 1, [(0x1000, 3, PE_PARENT), (0x4000, 1, PE_PRESENT)])
    (r2 / "pages-1.img").write_bytes(page(0x44))
    (r2 / "parent").symlink_to("../round-1")
    shipped = tmp_path / "restore" / "shipped"
    shipped.mkdir(parents=True)
    layout = assemble(session, tmp_path / "restore", shipped, PS)
    assert layout.rounds == 2
    assert os.readlink(layout.images / "parent") == "../r2"
    assert os.readlink(tmp_path / "restore" / "r2" / "parent") == "../rflat"
    with open_round(layout.images, 1, PS) as restored:
        assert restored.read_range(0x1000, 4) == page(9) + page(1) + page(2) + page(0x44)
    assert flatten_round(session, 2, PS) == session / "flat-2"
    assert not (session / "flat-1").exists(), "an older flat directory goes"


def test_flattening_stops_when_asked_and_leaves_nothing(session: Path) -> None:
    stop = threading.Event()
    stop.set()
    with pytest.raises(FlattenStopped):
        flatten_round(session, 1, PS, stop=stop)
    assert sorted(p.name for p in session.iterdir()) == ["round-0", "round-1"]

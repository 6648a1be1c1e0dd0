"""pagehaul.handover on synthetic CRIU images: what the source ships, how the destination stacks it.

The real thing (criu dump of a live tree, criu restore on another namespace) is in
tests/integration/test_full_migration.py; here every case is small enough to check byte by byte.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pagehaul.errors import ImageError
from pagehaul.handover import assemble, iter_chunks, reduce_dump
from pagehaul.images import PE_LAZY, PE_PARENT, PE_PRESENT, PagemapEntry, encode_pagemap, read_pagemap

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


def test_reduce_keeps_only_pages_outside_what_pagehaul_moved(dump: Path, tmp_path: Path) -> None:
    out = tmp_path / "ship"
    reduced = reduce_dump(dump, {1: [(0x1000, 0x3000)]}, out, PS)
    names = sorted(p.name for p in reduced.files)
    # Not shipped: criu's stats and log, task 1's original pages file.
    assert names == ["core-1.img", "inventory.img", "mm-1.img", "pagemap-1.img", "pagemap-shmem-77.img",
                     "pages-2.img", "pages-3.img"]
    assert (reduced.extra_pages, reduced.dropped_pages) == (4, 2)
    pm = read_pagemap(out / "pagemap-1.img")
    assert pm.pages_id == 3  # above every id criu used, so nothing clashes on the destination
    assert [(e.vaddr, e.nr_pages, e.flags) for e in pm.entries] == [(0x3000, 2, PE_PRESENT), (0x10000, 2, PE_PRESENT)]
    assert (out / "pages-3.img").read_bytes() == page(3) + page(4) + page(5) + page(6)
    assert (out / "pages-2.img").read_bytes() == page(0xA) + page(0xB)  # shared memory ships whole
    assert reduced.total_bytes == sum(p.stat().st_size for p in reduced.files)


def test_reduce_drops_shared_memory_pagehaul_dumped(dump: Path, tmp_path: Path) -> None:
    reduced = reduce_dump(dump, {1: [(0x1000, 0x5000), (0x10000, 0x12000)]}, tmp_path / "ship", PS,
                          covered_shmem=frozenset({77}))
    names = sorted(p.name for p in reduced.files)
    assert "pagemap-shmem-77.img" not in names
    assert (reduced.extra_pages, reduced.dropped_pages) == (0, 6)
    pm = read_pagemap(tmp_path / "ship" / "pagemap-1.img")
    assert pm.entries == ()
    # The object's pages file is gone; its id is free again for task 1's (empty) one.
    assert names == ["core-1.img", "inventory.img", "mm-1.img", "pagemap-1.img", f"pages-{pm.pages_id}.img"]
    assert (tmp_path / "ship" / f"pages-{pm.pages_id}.img").read_bytes() == b""


def test_reduce_refuses_what_it_cannot_reduce(dump: Path, tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"no pagemap for task\(s\) \[2\]"):
        reduce_dump(dump, {2: [(0, 0x1000)]}, tmp_path / "a", PS)
    write_pagemap(dump / "pagemap-1.img", 1, [(0x1000, 4, PE_PARENT)])
    with pytest.raises(ImageError, match="unexpected pagemap entry"):
        reduce_dump(dump, {1: [(0, 0x1000)]}, tmp_path / "b", PS)


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
    write_pagemap(shipped / "pagemap-1.img", 5, [(0x7000, 2, PE_PRESENT)])  # the vDSO, say
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
    assert [(e.vaddr, e.nr_pages, e.flags) for e in pm.entries] == [
        (0x1000, 1, PE_PARENT), (0x2000, 3, PE_PARENT), (0x7000, 2, PE_PRESENT)]
    shm = read_pagemap(images / "pagemap-shmem-77.img")  # only pagehaul has it: all from the chain
    assert [(e.vaddr, e.nr_pages, e.flags) for e in shm.entries] == [(0, 2, PE_PARENT)]
    assert shm.pages_id == 6
    assert (images / "pages-6.img").read_bytes() == b""
    assert (images / "core-1.img").read_bytes() == b"core"
    assert (images / "pages-5.img").read_bytes() == page(0xD) * 2
    assert {p: p.read_bytes() for p in session.rglob("*") if p.is_file()} == before  # rounds untouched


def test_assemble_refuses_overlapping_extra_pages(session: Path, tmp_path: Path) -> None:
    shipped = tmp_path / "restore" / "shipped"
    shipped.mkdir(parents=True)
    write_pagemap(shipped / "pagemap-1.img", 5, [(0x3000, 1, PE_PRESENT)])
    (shipped / "pages-5.img").write_bytes(page(1))
    with pytest.raises(ImageError, match="overlap memory pagehaul moved"):
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

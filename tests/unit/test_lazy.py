"""receiver/lazy.py without CRIU: which entries become lazy, where each lazy page's bytes are found
through a chain, the daemon's bookkeeping of missing pages, and the uapi mirrors it uses."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest

from pagehaul import kernel
from pagehaul.codec import PE_LAZY, PE_PARENT, PE_PRESENT, PagemapEntry, encode_pagemap, pages_name
from pagehaul.errors import ImageError
from receiver.lazy import (
    PAGE,
    Segment,
    Vma,
    _chain,
    _Runs,
    _split_at,
    lazy_ranges,
    mark_entries,
    resolve,
)

P = PAGE
ANON = 0x20 | 0x02  # MAP_ANONYMOUS | MAP_PRIVATE


def test_uapi_mirrors_match_the_kernel_headers() -> None:
    # include/uapi/linux/userfaultfd.h (Linux 6.18): uffd_msg is __packed, 32 bytes.
    assert ctypes.sizeof(kernel.uffd_msg) == 32
    assert ctypes.sizeof(kernel.uffdio_copy) == 40
    assert ctypes.sizeof(kernel.uffdio_zeropage) == 32
    assert kernel.UFFDIO_COPY == 0xC028AA03
    assert kernel.UFFDIO_ZEROPAGE == 0xC020AA04
    assert kernel.UFFDIO_WAKE == 0x8010AA02
    msg = kernel.uffd_msg(event=kernel.UFFD_EVENT_REMAP)
    msg.arg[0], msg.arg[1], msg.arg[2] = 0x1000, 0x9000, 0x2000
    assert kernel.decode_uffd_msgs(bytes(msg) * 2) == [(kernel.UFFD_EVENT_REMAP, 0x1000, 0x9000, 0x2000)] * 2


def test_only_vmas_the_restorer_registers_can_be_lazy() -> None:
    vmas = [Vma(0x1000, 0x3000, ANON, 1), Vma(0x3000, 0x4000, 0x02, 1 << 6),  # private file
            Vma(0x5000, 0x6000, ANON | 0x2000, 1), Vma(0x7000, 0x8000, ANON, 1 << 3)]  # locked, vdso
    assert lazy_ranges(vmas) == [(0x1000, 0x3000)]


def test_entries_are_split_at_lazy_vmas_and_keep_their_bits() -> None:
    entries = (PagemapEntry(0x0, 4, PE_PRESENT), PagemapEntry(0x4000, 4, PE_PARENT))
    ranges = [(0x2000, 0x5000), (0x6000, 0x7000)]
    got = mark_entries(entries, ranges)
    assert got == [PagemapEntry(0x0, 2, PE_PRESENT), PagemapEntry(0x2000, 2, PE_PRESENT | PE_LAZY),
                   PagemapEntry(0x4000, 1, PE_PARENT | PE_LAZY), PagemapEntry(0x5000, 1, PE_PARENT),
                   PagemapEntry(0x6000, 1, PE_PARENT | PE_LAZY), PagemapEntry(0x7000, 1, PE_PARENT)]
    assert sum(e.nr_pages for e in got if e.flags & PE_PRESENT) == 4, "the pages file is read the same way"


def _image(path: Path, pages_id: int, entries: list[PagemapEntry], data: bytes, parent: str | None = None) -> None:
    path.mkdir()
    (path / "pagemap-1.img").write_bytes(encode_pagemap(pages_id, entries))
    (path / pages_name(pages_id)).write_bytes(data)
    if parent:
        os.symlink(parent, path / "parent")


def test_lazy_pages_are_resolved_through_the_chain(tmp_path: Path) -> None:
    _image(tmp_path / "r0", 1, [PagemapEntry(0x10000, 4, PE_PRESENT)], b"a" * P + b"b" * P + b"c" * P + b"d" * P)
    _image(tmp_path / "r1", 2, [PagemapEntry(0x10000, 2, PE_PARENT), PagemapEntry(0x12000, 1, PE_PRESENT),
                                PagemapEntry(0x13000, 1, PE_PARENT)], b"X" * P, parent="../r0")
    _image(tmp_path / "images", 3, [PagemapEntry(0x10000, 4, PE_PARENT)], b"", parent="../r1")
    levels = _chain(tmp_path / "images", "pagemap-1.img")
    assert [lv.pages.resolve().parent.name for lv in levels] == ["images", "r1", "r0"]
    segs = resolve(levels, [(0x10000, 0x14000)])
    # (start, end, level << 48 | offset in that level's pages file)
    assert segs == [Segment(0x10000, 0x12000, (2 << 48) | 0), Segment(0x12000, 0x13000, (1 << 48) | 0),
                    Segment(0x13000, 0x14000, (2 << 48) | 3 * P)]
    assert _split_at(segs, [(0x10000, 0x11000), (0x11000, 0x14000)])[:2] == [
        Segment(0x10000, 0x11000, 2 << 48), Segment(0x11000, 0x12000, (2 << 48) | P)]
    with pytest.raises(ImageError, match="not in the pagemap"):
        resolve(levels, [(0x14000, 0x15000)])


def test_a_parent_page_no_level_holds_is_refused(tmp_path: Path) -> None:
    _image(tmp_path / "r0", 1, [PagemapEntry(0x10000, 1, PE_PRESENT)], b"a" * P)
    _image(tmp_path / "images", 2, [PagemapEntry(0x10000, 2, PE_PARENT)], b"", parent="../r0")
    with pytest.raises(ImageError, match="0x11000"):
        resolve(_chain(tmp_path / "images", "pagemap-1.img"), [(0x10000, 0x12000)])


def test_missing_page_runs_follow_faults_remaps_and_forks() -> None:
    runs = _Runs([Segment(0x1000, 0x5000, 100), Segment(0x8000, 0x9000, 900)])
    assert runs.find(0x2000) == 0
    assert runs.find(0x6000) == -1
    assert runs.drop(0x2000, 0x3000) == [(0x2000, 0x3000, 100 + 0x1000)]
    assert list(zip(runs.starts, runs.ends, runs.srcs, strict=True)) == [
        (0x1000, 0x2000, 100), (0x3000, 0x5000, 100 + 0x2000), (0x8000, 0x9000, 900)]
    child = runs.copy()
    # mremap(0x4000, 0x5000 + 0x3000 -> 0x20000): the moved part keeps its source
    for s, e, src in runs.drop(0x4000, 0x9000):
        runs.add(s - 0x4000 + 0x20000, e - 0x4000 + 0x20000, src)
    assert list(zip(runs.starts, runs.ends, runs.srcs, strict=True)) == [
        (0x1000, 0x2000, 100), (0x3000, 0x4000, 100 + 0x2000), (0x20000, 0x21000, 100 + 0x3000),
        (0x24000, 0x25000, 900)]
    assert child.pages() == 4, "a forked child keeps what its parent lacked at the fork"

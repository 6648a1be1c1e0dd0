"""Both scanners against real children with known layouts, and against each other."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pagehaul import kernel, procfs
from pagehaul.errors import ProcessGone
from pagehaul.procfs import Vma, VmaKind
from pagehaul.runs import Runs
from sender.scanner import (
    PagemapFileScanner,
    PagemapScanScanner,
    clip_regions,
    dump_mask,
    find_zero_pfn,
    make_scanner,
    probe_pagemap_scan,
    runs_from_regions,
    vma_spans,
    walk_ranges,
)
from tests.helpers.children import PAGE_SIZE, Child, layout_child, page_indices, stop_child

P = PAGE_SIZE

requires_pagemap_scan = pytest.mark.skipif(not probe_pagemap_scan(), reason="kernel lacks PAGEMAP_SCAN (6.7)")


@pytest.fixture(scope="module")
def child(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Child]:
    # Scanning does not change the child, so one child serves every read-only test.
    with layout_child(tmp_path_factory.mktemp("layout")) as c:
        yield c


@pytest.fixture(scope="module")
def zero_pfn() -> int:
    return find_zero_pfn()


def scan_both(pid: int, vmas: list[Vma], zero_pfn: int) -> tuple[Runs, Runs]:
    with PagemapScanScanner(pid) as a, PagemapFileScanner(pid, zero_pfn) as b:
        return a.scan(vmas), b.scan(vmas)


def assert_same(a: Runs, b: Runs) -> None:
    assert a.pairs() == b.pairs()


def assert_canonical(runs: Runs) -> None:
    assert runs.is_sorted_disjoint(P)
    assert len(runs.merged(P)) == len(runs)
    assert np.all(runs.nr_pages > 0)


# --- the layout, page by page -----------------------------------------------------------------

EXPECTED_ANON = [*range(8), 10, 12, *range(20, 30), *range(60, 68)]  # 64-67 are the PROT_NONE VMA


@requires_pagemap_scan
def test_scanners_agree_on_whole_process(child: Child, zero_pfn: int) -> None:
    vmas = procfs.select_dumpable(procfs.read_maps(child.pid))
    by_scan, by_file = scan_both(child.pid, vmas, zero_pfn)
    assert_same(by_scan, by_file)
    assert_canonical(by_scan)
    assert by_scan.total_pages > 100  # the interpreter's own heap and stack are in there


@requires_pagemap_scan
def test_scanners_report_exactly_the_written_pages(child: Child, zero_pfn: int) -> None:
    info = child.info
    vmas = procfs.select_dumpable(procfs.read_maps(child.pid))
    for runs in scan_both(child.pid, vmas, zero_pfn):
        assert page_indices(runs, info["anon"], 68) == EXPECTED_ANON
        assert page_indices(runs, info["file"], 8) == [2, 5]  # COW copies only, not file pages
        assert page_indices(runs, info["shared"], 4) == []  # shared VMA not selected
        assert page_indices(runs, info["hugezero"], 512) == []  # huge zero page (THP) or zero pages
        if info["guard_ok"]:
            assert page_indices(runs, info["guard"], 8) == [0, 1, 4, 5, 6, 7]


def test_layout_vmas_are_selected_as_expected(child: Child) -> None:
    vmas = {v.start: v for v in procfs.select_dumpable(procfs.read_maps(child.pid))}
    info = child.info
    assert vmas[info["anon"]].kind == VmaKind.ANON
    assert vmas[info["protnone"]].prot == 0
    assert vmas[info["anon"]].end == info["protnone"]  # touching: one span, one scan
    assert vmas[info["file"]].kind == VmaKind.FILE_PRIVATE
    assert vmas[info["file"]].path.endswith("mapped.bin")
    assert info["shared"] not in vmas


@requires_pagemap_scan
def test_guard_pages_are_reported_as_swapped_without_the_guard_filter(child: Child) -> None:
    # Why the scanner adds PAGE_IS_GUARD to its inverted mask: guard markers are swap-like PTEs.
    if not child.info["guard_ok"]:
        pytest.skip("MADV_GUARD_INSTALL unsupported (Linux < 6.13)")
    start = child.info["guard"]
    vec = np.zeros(16, kernel.PAGE_REGION_DTYPE)
    populated = kernel.PAGE_IS_PRESENT | kernel.PAGE_IS_SWAPPED
    arg = kernel.pm_scan_arg(start=start, end=start + 8 * P, vec=vec.ctypes.data, vec_len=vec.size,
                             category_anyof_mask=populated, return_mask=populated | kernel.PAGE_IS_GUARD)
    with open(f"/proc/{child.pid}/pagemap", "rb") as f:
        n = kernel.pagemap_scan(f.fileno(), arg)
    regions = [(int(r["start"] - start) // P, int(r["end"] - start) // P, int(r["categories"]))
               for r in vec[:n]]
    assert regions[1] == (2, 4, kernel.PAGE_IS_SWAPPED | kernel.PAGE_IS_GUARD)


@requires_pagemap_scan
@pytest.mark.parametrize("vec_len", [1, 2, 3, 7])
def test_tiny_scan_vector_resumes_without_duplicates(child: Child, vec_len: int) -> None:
    # A full vector forces the walk_end resume path (the quirk in sender.scanner's module doc).
    vmas = procfs.select_dumpable(procfs.read_maps(child.pid))
    with PagemapScanScanner(child.pid) as ref:
        expected = ref.scan(vmas)
    with PagemapScanScanner(child.pid, vec_len=vec_len) as small:
        got = small.scan(vmas)
        assert small.ioctls > small.walks
    assert_same(got, expected)
    assert_canonical(got)


@requires_pagemap_scan
def test_walk_end_quirk_does_not_duplicate_regions() -> None:
    # 1024 one-page regions filling a 1024-entry vector exactly: on 6.18 walk_end comes back
    # pointing at page 1024 although regions up to page 2046 were returned. Resuming at walk_end
    # would report pages 1024-2047 twice.
    region = mmap.mmap(-1, 2048 * P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view = np.frombuffer(region, np.uint8)
    try:
        view[:: 2 * P] = 1
        start = int(view.ctypes.data)
        vma = Vma(start, start + 2048 * P, 3, VmaKind.ANON, 0, "")
        with PagemapScanScanner(os.getpid(), vec_len=1024) as scanner:
            runs = scanner.scan([vma])
    finally:
        del view  # release the buffer export before closing the mapping
        region.close()
    assert runs.pairs() == [(start + 2 * i * P, 1) for i in range(1024)]


@requires_pagemap_scan
def test_scan_across_a_gap_and_a_non_selected_vma_is_not_merged(child: Child, zero_pfn: int) -> None:
    # Selecting anon and guard but not the shared VMA between/around them must not report it.
    info = child.info
    vmas = [v for v in procfs.select_dumpable(procfs.read_maps(child.pid))
            if v.start in (info["anon"], info["protnone"], info["file"])]
    assert len(vmas) == 3
    for runs in scan_both(child.pid, vmas, zero_pfn):
        pages = runs.page_addrs(P)
        inside = np.zeros(pages.size, bool)
        for v in vmas:
            inside |= (pages >= v.start) & (pages < v.end)
        assert inside.all()
        assert page_indices(runs, info["anon"], 68) == EXPECTED_ANON


@pytest.mark.parametrize("chunk_pages", [7, 64, 1 << 20])
def test_file_scanner_chunking_does_not_change_the_answer(child: Child, zero_pfn: int,
                                                          chunk_pages: int) -> None:
    vmas = procfs.select_dumpable(procfs.read_maps(child.pid))
    with PagemapFileScanner(child.pid, zero_pfn) as ref:
        expected = ref.scan(vmas)
    with PagemapFileScanner(child.pid, zero_pfn, chunk_pages=chunk_pages) as scanner:
        got = scanner.scan(vmas)
    assert_same(got, expected)
    assert page_indices(got, child.info["anon"], 68) == EXPECTED_ANON


def test_empty_selection_scans_nothing(child: Child, zero_pfn: int) -> None:
    with PagemapFileScanner(child.pid, zero_pfn) as scanner:
        assert len(scanner.scan([])) == 0
    if probe_pagemap_scan():
        with PagemapScanScanner(child.pid) as scan:
            assert len(scan.scan([])) == 0


@pytest.mark.parametrize("kind", ["scan", "file"])
def test_scanning_an_exited_process_raises_process_gone(tmp_path: Path, zero_pfn: int, kind: str) -> None:
    if kind == "scan" and not probe_pagemap_scan():
        pytest.skip("kernel lacks PAGEMAP_SCAN")
    with layout_child(tmp_path) as c:
        vmas = procfs.select_dumpable(procfs.read_maps(c.pid))
        scanner = PagemapScanScanner(c.pid) if kind == "scan" else PagemapFileScanner(c.pid, zero_pfn)
        with scanner:
            stop_child(c.proc)  # the fd stays open; the mm behind it is gone
            with pytest.raises(ProcessGone) as info:
                scanner.scan(vmas)
    assert info.value.pid == c.pid


def test_opening_a_missing_process_raises_process_gone(tmp_path: Path, zero_pfn: int) -> None:
    with layout_child(tmp_path) as c:
        pid = c.pid
    with pytest.raises(ProcessGone):
        PagemapFileScanner(pid, zero_pfn)


def test_make_scanner_honours_the_probe_and_the_switch(child: Child) -> None:
    forced = make_scanner(child.pid, force_pagemap_file=True)
    chosen = make_scanner(child.pid)
    try:
        assert isinstance(forced, PagemapFileScanner)
        expected = PagemapScanScanner if probe_pagemap_scan() else PagemapFileScanner
        assert isinstance(chosen, expected)
    finally:
        forced.close()
        chosen.close()


def test_find_zero_pfn_is_the_pfn_of_a_read_only_page(zero_pfn: int) -> None:
    assert zero_pfn > 0
    assert find_zero_pfn() == zero_pfn


# --- pure pieces ------------------------------------------------------------------------------


def test_dump_mask_follows_criu_rules() -> None:
    zero = 0x3B34
    words = np.array([
        kernel.PM_PRESENT | kernel.PM_MMAP_EXCLUSIVE | 0x1234,  # anonymous page: dump
        kernel.PM_PRESENT | zero,  # zero page: skip
        kernel.PM_PRESENT | kernel.PM_FILE | 0x99,  # file page (not COW-ed): skip
        kernel.PM_SWAP | 0x5,  # swapped anonymous page: dump
        kernel.PM_SWAP | kernel.PM_GUARD_REGION,  # guard marker: skip
        0,  # never touched: skip
        kernel.PM_SWAP | zero,  # swap offset that happens to equal the zero PFN: dump
        kernel.PM_PRESENT | kernel.PM_SOFT_DIRTY | 0x77,  # dump
    ], dtype=np.uint64)
    assert dump_mask(words, zero).tolist() == [True, False, False, True, False, False, True, True]


def test_runs_from_regions_merges_touching_regions() -> None:
    regions = np.array([(0x1000, 0x3000, 8), (0x3000, 0x4000, 16), (0x8000, 0x9000, 8)],
                       dtype=kernel.PAGE_REGION_DTYPE)
    assert runs_from_regions(regions, 0x1000).pairs() == [(0x1000, 3), (0x8000, 1)]
    assert len(runs_from_regions(regions[:0], 0x1000)) == 0


def test_vma_spans_join_only_touching_vmas() -> None:
    def vma(start: int, end: int) -> Vma:
        return Vma(start, end, 3, VmaKind.ANON, 0, "")

    starts, ends = vma_spans([vma(0x5000, 0x6000), vma(0x1000, 0x2000), vma(0x2000, 0x3000)])
    assert list(zip(starts.tolist(), ends.tolist(), strict=True)) == [(0x1000, 0x3000), (0x5000, 0x6000)]
    # A torn read of a running process's maps can list a moved VMA twice: the union is scanned.
    starts, ends = vma_spans([vma(0x1000, 0x3000), vma(0x2000, 0x4000), vma(0x1800, 0x2000), vma(0x5000, 0x6000)])
    assert list(zip(starts.tolist(), ends.tolist(), strict=True)) == [(0x1000, 0x4000), (0x5000, 0x6000)]


@requires_pagemap_scan
def test_many_small_vmas_take_one_walk(zero_pfn: int) -> None:
    # 256 separate 2-page mappings with a written first page, 2 pages apart: one walk (a few
    # ioctls) covers them, and the unselected gaps and neighbours are cut away.
    n = 256
    region = mmap.mmap(-1, 4 * n * P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view = np.frombuffer(region, np.uint8)
    base = int(view.ctypes.data)
    try:
        for i in range(n):  # alternate protections so the kernel cannot merge the VMAs
            view[4 * i * P] = 1
            view[(4 * i + 2) * P] = 1  # written but not selected: must not be reported
            kernel_prot = mmap.PROT_READ if i % 2 else mmap.PROT_READ | mmap.PROT_WRITE
            assert _mprotect(base + 4 * i * P, 2 * P, kernel_prot) == 0
        vmas = [Vma(base + 4 * i * P, base + (4 * i + 2) * P, 3, VmaKind.ANON, 0, "") for i in range(n)]
        with PagemapScanScanner(os.getpid()) as scanner:
            runs = scanner.scan(vmas)
            assert scanner.walks == 1
            assert scanner.ioctls == 1
        with PagemapFileScanner(os.getpid(), zero_pfn) as file_scanner:
            assert_same(file_scanner.scan(vmas), runs)
    finally:
        del view
        region.close()
    assert runs.pairs() == [(base + 4 * i * P, 1) for i in range(n)]


def _mprotect(addr: int, length: int, prot: int) -> int:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return int(libc.mprotect(addr, length, prot))


def _regions(pairs: list[tuple[int, int, int]]) -> np.ndarray:
    out = np.zeros(len(pairs), dtype=kernel.PAGE_REGION_DTYPE)
    for i, (start, end, cat) in enumerate(pairs):
        out[i] = (start * P, end * P, cat)
    return out


def _spans(pairs: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    return (np.array([a * P for a, _ in pairs], np.uint64), np.array([b * P for _, b in pairs], np.uint64))


def test_clip_regions_cuts_to_the_spans_and_keeps_categories() -> None:
    starts, ends = _spans([(10, 20), (30, 40), (50, 60)])
    regions = _regions([(0, 5, 1), (8, 12, 2), (15, 55, 3), (58, 70, 4), (80, 90, 5)])
    got = [(int(r["start"]) // P, int(r["end"]) // P, int(r["categories"]))
           for r in clip_regions(regions, starts, ends)]
    assert got == [(10, 12, 2), (15, 20, 3), (30, 40, 3), (50, 55, 3), (58, 60, 4)]


def test_clip_regions_leaves_regions_inside_spans_alone() -> None:
    starts, ends = _spans([(10, 20), (30, 40)])
    regions = _regions([(10, 12, 1), (12, 20, 2), (31, 33, 1)])
    assert clip_regions(regions, starts, ends).tolist() == regions.tolist()
    assert clip_regions(regions[:0], starts, ends).size == 0
    assert clip_regions(regions, starts[:0], ends[:0]).size == 0


def test_walk_ranges_join_spans_with_small_gaps_only() -> None:
    starts, ends = _spans([(0, 1), (3, 4), (100, 101), (102, 110)])
    ws, we = walk_ranges(starts, ends, max_gap_bytes=10 * P)
    assert list(zip((ws // P).tolist(), (we // P).tolist(), strict=True)) == [(0, 4), (100, 110)]
    ws, we = walk_ranges(starts[:0], ends[:0])
    assert ws.size == we.size == 0

"""sender.pagemap_cache on a fake procfs root, plus two checks against real processes.

The fake root holds ``PID/pagemap`` as a regular file of chosen u64 words at offset
``vaddr / PAGE_SIZE * 8``: the words returned must equal the file's words exactly, and the
read plan is checked against a literal transliteration of CRIU's ``pmc_get_map`` /
``pmc_fill_cache`` (criu/pagemap-cache.c).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from pagehaul import kernel
from pagehaul.errors import ProcessError, ProcessGone
from pagehaul.procfs import Vma, VmaKind
from pagehaul.runs import U64
from sender.pagemap_cache import PMC_SIZE, PMC_SIZE_GAP, PagemapCache
from tests.helpers.children import spawn_python
from tests.helpers.writer_child import FAKE_BASE, FAKE_PID, dumpable_vmas, read_pagemap, write_pagemap

P = kernel.PAGE_SIZE
PMC_MASK = ~(PMC_SIZE - 1)


def vma(start: int, pages: int) -> Vma:
    return Vma(start, start + pages * P, 3, VmaKind.ANON, 0, "")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / str(FAKE_PID)).mkdir()
    return tmp_path


def fill_random(root: Path, start: int, pages: int, seed: int = 7) -> U64:
    """Random words (every bit pattern, gaps included) for ``pages`` pages from ``start``."""
    words = np.random.default_rng(seed).integers(0, 1 << 64, pages, dtype=np.uint64, endpoint=False)
    write_pagemap(root / str(FAKE_PID), start, words)
    return words


def criu_plan(vmas: Sequence[Vma]) -> tuple[int, int, list[tuple[int, int]]]:
    """(fills, hits, served VMA index ranges) of CRIU's cache walked VMA by VMA."""
    fills = hits = 0
    served: list[tuple[int, int]] = []
    cache_start = cache_end = -1
    for i, v in enumerate(vmas):
        if cache_start <= v.start and cache_end >= v.end:
            hits += 1
            served[-1] = (served[-1][0], i)
            continue
        low = v.start & PMC_MASK
        high = low + PMC_SIZE
        cache_start, cache_end = v.start, v.end
        if v.size_bytes < PMC_SIZE and v.start - low < PMC_SIZE_GAP:
            nr_vmas = 1
            for w in vmas[i + 1:]:
                if w.start > high or w.end > high:
                    break
                nr_vmas += 1
            if nr_vmas > 1:
                cache_end = high
        fills += 1
        served.append((i, i))
    return fills, hits, served


# --- many small VMAs: CRIU's case --------------------------------------------------------------


def small_vmas(count: int = 1024, pages: int = 10, stride: int = 12) -> list[Vma]:
    # 40 KiB VMAs every 48 KiB, like the thousand small mappings of CRIU's pagemap-cache seed
    # case: about 43 per 2 MiB window, and every window boundary cuts one of them.
    return [vma(FAKE_BASE + i * stride * P, pages) for i in range(count)]


def test_many_small_vmas_take_few_fills_and_words_are_exact(root: Path) -> None:
    vmas = small_vmas()
    span_pages = (vmas[-1].end - FAKE_BASE) // P
    expected = fill_random(root, FAKE_BASE, span_pages)
    with PagemapCache(FAKE_PID, root) as cache:
        got = list(cache.words(vmas))
        fills, hits, served = criu_plan(vmas)
        assert (cache.fills, cache.hits) == (fills, hits)
        assert cache.fills + cache.hits == len(vmas)
        assert cache.fills <= len(vmas) // 16  # 48 MiB in 2 MiB windows: about two reads per window
        assert cache.reads == cache.fills
        # A cache-mode read spans its first VMA's start to its last VMA's end (CRIU reads on to
        # the window end; the same VMAs are served with fewer bytes).
        assert cache.bytes_read == sum(vmas[b].end - vmas[a].start for a, b in served) // P * 8
    assert [item.vma for item in got] == vmas
    for item in got:
        assert item.start == item.vma.start
        first = (item.vma.start - FAKE_BASE) // P
        assert np.array_equal(item.words, expected[first:first + item.vma.size_bytes // P])


def test_windows_serve_sorted_vmas_whatever_the_input_order(root: Path) -> None:
    vmas = small_vmas(count=100)
    fill_random(root, FAKE_BASE, (vmas[-1].end - FAKE_BASE) // P)
    with PagemapCache(FAKE_PID, root) as cache:
        shuffled = [vmas[i] for i in np.random.default_rng(3).permutation(len(vmas))]
        windows = list(cache.windows(shuffled))
    assert [v for w in windows for v in w.vmas] == vmas
    assert any(w.cached for w in windows)
    for w in windows:
        assert all(w.start <= v.start and v.end <= w.end for v in w.vmas)


def test_batching_off_reads_vma_by_vma(root: Path) -> None:
    vmas = small_vmas(count=64)
    expected = fill_random(root, FAKE_BASE, (vmas[-1].end - FAKE_BASE) // P)
    with PagemapCache(FAKE_PID, root, batching=False) as cache:
        got = list(cache.words(vmas))
        assert (cache.fills, cache.hits) == (64, 0)
        assert cache.bytes_read == 64 * 10 * 8
    for item in got:
        first = (item.vma.start - FAKE_BASE) // P
        assert np.array_equal(item.words, expected[first:first + 10])


# --- simple mode ---------------------------------------------------------------------------------


def test_big_vma_is_read_whole_in_simple_mode(root: Path) -> None:
    big = vma(FAKE_BASE, 16384)  # 64 MiB
    expected = fill_random(root, FAKE_BASE, 16384)
    with PagemapCache(FAKE_PID, root) as cache:
        (window,) = cache.windows([big])
        assert not window.cached
        assert (cache.fills, cache.hits, cache.reads) == (1, 0, 1)
        assert cache.bytes_read == 16384 * 8
    assert window.start == big.start
    assert np.array_equal(window.words, expected)


def test_lone_small_vma_reads_only_its_own_pages(root: Path) -> None:
    # Eligible for a window (small, at a window start), but the next VMA is 4 MiB away: CRIU's
    # simple mode reads the VMA alone, not the 2 MiB window.
    a, b = vma(FAKE_BASE, 3), vma(FAKE_BASE + (4 << 20), 3)
    fill_random(root, FAKE_BASE, (b.end - FAKE_BASE) // P)
    with PagemapCache(FAKE_PID, root) as cache:
        windows = list(cache.windows([a, b]))
        assert cache.bytes_read == 6 * 8
    assert [(w.start, w.words.size, w.cached) for w in windows] == [(a.start, 3, False), (b.start, 3, False)]


def test_small_vma_starting_late_in_its_window_is_not_batched(root: Path) -> None:
    # Starts 1 MiB into its window, past PMC_SIZE_GAP: read alone even though the next VMA fits.
    late = vma(FAKE_BASE + (1 << 20), 4)
    after = vma(late.end + P, 4)
    fill_random(root, FAKE_BASE, (after.end - FAKE_BASE) // P)
    with PagemapCache(FAKE_PID, root) as cache:
        windows = list(cache.windows([late, after]))
    assert [w.cached for w in windows] == [False, False]
    assert (cache.fills, cache.hits) == (2, 0)


def test_vma_beyond_max_read_is_read_in_pieces(root: Path) -> None:
    big = vma(FAKE_BASE, 1000)
    expected = fill_random(root, FAKE_BASE, 1000)
    with PagemapCache(FAKE_PID, root, max_read_pages=256) as cache:
        pieces = list(cache.words([big]))
        assert cache.fills == 4
    assert [p.start for p in pieces] == [big.start + i * 256 * P for i in range(4)]
    assert np.array_equal(np.concatenate([p.words for p in pieces]), expected)


# --- find ----------------------------------------------------------------------------------------


def test_find_reports_flagged_pages_inside_vmas_only(root: Path) -> None:
    # Two small VMAs in one window with a gap between them; the gap's words carry the bit too
    # (a mapping the caller left out, e.g. shared memory) and must not be reported.
    a, b = vma(FAKE_BASE, 8), vma(FAKE_BASE + 12 * P, 8)
    words = np.zeros(20, dtype=np.uint64)
    flagged = [0, 3, 7, 8, 9, 10, 11, 12, 19]
    words[flagged] = np.uint64(kernel.PM_SOFT_DIRTY | kernel.PM_PRESENT)
    words[[1, 13]] = np.uint64(kernel.PM_PRESENT)  # present but not soft-dirty
    write_pagemap(root / str(FAKE_PID), FAKE_BASE, words)
    with PagemapCache(FAKE_PID, root) as cache:
        runs = cache.find([a, b], kernel.PM_SOFT_DIRTY)
        assert (cache.fills, cache.hits) == (1, 1)
    got = sorted(int(x - FAKE_BASE) // P for x in runs.page_addrs(P))
    assert got == [0, 3, 7, 12, 19]
    assert runs.is_sorted_disjoint(P)
    assert len(runs.merged(P)) == len(runs)


def test_find_on_random_words_matches_a_direct_read(root: Path) -> None:
    vmas = small_vmas(count=300, pages=7, stride=9)
    span = (vmas[-1].end - FAKE_BASE) // P
    fill_random(root, FAKE_BASE, span, seed=11)
    with PagemapCache(FAKE_PID, root) as cache:
        runs = cache.find(vmas, kernel.PM_SOFT_DIRTY | kernel.PM_SWAP)
    expected: list[int] = []
    for v in vmas:
        words = read_pagemap(root / str(FAKE_PID), v.start, v.size_bytes // P)
        hit = np.flatnonzero(words & np.uint64(kernel.PM_SOFT_DIRTY | kernel.PM_SWAP))
        expected.extend(v.start + int(i) * P for i in hit)
    assert runs.page_addrs(P).tolist() == expected


# --- errors and short reads --------------------------------------------------------------------


def test_bad_vma_lists_are_refused(root: Path) -> None:
    write_pagemap(root / str(FAKE_PID), FAKE_BASE, np.zeros(16, np.uint64))
    with PagemapCache(FAKE_PID, root) as cache:
        with pytest.raises(ValueError, match="overlap"):
            list(cache.windows([vma(FAKE_BASE, 4), vma(FAKE_BASE + 2 * P, 4)]))
        with pytest.raises(ValueError, match="aligned"):
            list(cache.windows([Vma(FAKE_BASE + 8, FAKE_BASE + P, 3, VmaKind.ANON, 0, "")]))
        assert list(cache.windows([])) == []


def test_short_reads_are_resumed(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Neither a regular file nor pagemap returns a short read before EOF / TASK_SIZE, so this
    # one test caps preadv at 1000 bytes (not a multiple of 8) to drive the resume loop.
    expected = fill_random(root, FAKE_BASE, 2048)
    real_preadv = os.preadv

    def short_preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        return real_preadv(fd, [buffers[0][:1000]], offset)

    with PagemapCache(FAKE_PID, root) as cache:
        monkeypatch.setattr(os, "preadv", short_preadv)
        (window,) = cache.windows([vma(FAKE_BASE, 2048)])
        monkeypatch.undo()
        assert cache.reads == -(-2048 * 8 // 1000)
        assert cache.bytes_read == 2048 * 8
    assert np.array_equal(window.words, expected)


def test_pagemap_ending_early_is_not_mistaken_for_an_exit(root: Path) -> None:
    write_pagemap(root / str(FAKE_PID), FAKE_BASE, np.ones(4, np.uint64))  # file ends after 4 pages
    with PagemapCache(FAKE_PID, root) as cache, pytest.raises(ProcessError, match="ends before") as info:
        list(cache.windows([vma(FAKE_BASE, 8)]))
    assert not isinstance(info.value, ProcessGone)
    assert info.value.pid == FAKE_PID


def test_missing_process_is_process_gone(root: Path) -> None:
    shutil.rmtree(root / str(FAKE_PID))
    with pytest.raises(ProcessGone) as info:
        PagemapCache(FAKE_PID, root)
    assert info.value.pid == FAKE_PID


# --- real processes ----------------------------------------------------------------------------

QUIET_CHILD = r'''
import sys
print("READY {}", flush=True)
sys.stdin.readline()
'''


def test_real_process_words_equal_a_direct_pread() -> None:
    with spawn_python(QUIET_CHILD) as child:  # blocked reading stdin: its pagemap holds still
        vmas = dumpable_vmas(child.pid)
        with PagemapCache(child.pid) as cache:
            got = list(cache.words(vmas))
            assert cache.fills < len(vmas)  # the interpreter's small mappings share windows
        fd = os.open(f"/proc/{child.pid}/pagemap", os.O_RDONLY)
        try:
            for item in got:
                direct = np.frombuffer(os.pread(fd, item.words.size * 8, item.start // P * 8), dtype="<u8")
                assert np.array_equal(item.words, direct), f"VMA {item.vma}"
        finally:
            os.close(fd)
    assert sum(int(np.count_nonzero(item.words & np.uint64(kernel.PM_PRESENT))) for item in got) > 100


def test_exited_process_raises_process_gone() -> None:
    with spawn_python(QUIET_CHILD) as child:
        vmas = dumpable_vmas(child.pid)
        cache = PagemapCache(child.pid)
        try:
            child.proc.kill()
            child.proc.wait(timeout=30)  # reaped: the mm is gone, the open fd reads EOF
            with pytest.raises(ProcessGone) as info:
                list(cache.windows(vmas))
            assert info.value.pid == child.pid
        finally:
            cache.close()

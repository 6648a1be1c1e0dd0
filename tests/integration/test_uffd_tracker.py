"""UffdWpTracker on real children that write exactly the pages a test tells them to."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from pagehaul import kernel, procfs
from pagehaul.errors import KernelUnsupported, ProcessGone
from pagehaul.procfs import Vma
from pagehaul.runs import Runs
from sender.freezer import PtraceFreezer
from sender.scanner import PagemapFileScanner, PagemapScanScanner, dump_mask, find_zero_pfn, pte_marker_mask
from sender.trackers import uffd
from sender.trackers.uffd import UffdWpTracker
from tests.helpers.children import (
    MEMORY_CHILD,
    PAGE_SIZE,
    Child,
    child_env,
    page_indices,
    read_mem,
    spawn_python,
    stop_child,
    wait_until,
)

P = PAGE_SIZE
REGION_PAGES = 16384  # 64 MiB; every even page written before tracking starts, odd ones never touched

availability = uffd.probe()
pytestmark = pytest.mark.skipif(not availability.available, reason=availability.reason)

MADV_DONTNEED = 4
MREMAP_MAYMOVE = 1


@pytest.fixture
def child() -> Iterator[Child]:
    with spawn_python(MEMORY_CHILD, str(REGION_PAGES), "even") as c:
        yield c


@contextmanager
def spawn_python_running(code: str) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, int]]]:
    """A child that prints ``READY {json}`` and then keeps running (not waiting on stdin)."""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=child_env())
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith(b"READY "), line
        yield proc, json.loads(line[len(b"READY "):])
    finally:
        stop_child(proc)


def dumpable(child: Child) -> list[Vma]:
    return procfs.select_dumpable(procfs.read_maps(child.pid))


@contextmanager
def tracking(child: Child, full_protect_max_bytes: int = uffd.FULL_PROTECT_MAX_BYTES) -> Iterator[UffdWpTracker]:
    tracker = UffdWpTracker(child.pid, full_protect_max_bytes=full_protect_max_bytes)
    try:
        with PtraceFreezer(child.pid) as freezer:
            tracker.start(dumpable(child), freezer)
        yield tracker
    finally:
        tracker.close()


def collect(tracker: UffdWpTracker, child: Child) -> Runs:
    runs = tracker.collect(dumpable(child), Runs.empty())
    assert runs.is_sorted_disjoint(P)
    assert len(runs.merged(P)) == len(runs)
    return runs


def pagemap_words(pid: int, addr: int, pages: int) -> np.ndarray:
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    try:
        return np.frombuffer(os.pread(fd, pages * 8, (addr // P) * 8), "<u8")
    finally:
        os.close(fd)


def uffd_fds(pid: int) -> list[str]:
    links = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{name}"))
        except FileNotFoundError:
            continue
    return [link for link in links if "userfaultfd" in link]


def scattered(count: int, pages: int, seed: int) -> list[int]:
    return sorted(int(i) for i in np.random.default_rng(seed).choice(pages, count, replace=False))


# --- the core promise -------------------------------------------------------------------------


def test_collect_returns_exactly_the_pages_written_each_round(child: Child) -> None:
    region = child.info["region"]
    with tracking(child) as tracker:
        assert tracker.armed_bytes >= REGION_PAGES * P
        assert page_indices(collect(tracker, child), region, REGION_PAGES) == []
        a = scattered(700, REGION_PAGES, seed=1)  # populated (even) and never-touched (odd) pages
        child.command("write", addr=region, pages=a, size=REGION_PAGES)
        assert page_indices(collect(tracker, child), region, REGION_PAGES) == a
        b = sorted(set(scattered(500, REGION_PAGES, seed=2)) | set(a[:50]))  # rewrites some of a
        child.command("write", addr=region, pages=b, size=REGION_PAGES)
        assert page_indices(collect(tracker, child), region, REGION_PAGES) == b
        assert page_indices(collect(tracker, child), region, REGION_PAGES) == []


def test_private_file_mapping_reports_copied_pages_only(child: Child, tmp_path: Path) -> None:
    path = tmp_path / "mapped.bin"
    path.write_bytes(b"F" * (16 * P))
    with tracking(child) as tracker:
        mapped = child.command("mmap_file", path=str(path), pages=16)
        addr = mapped["addr"]
        assert mapped["sum"] == 16 * ord("F")
        assert page_indices(collect(tracker, child), addr, 16) == list(range(16))  # new VMA
        child.command("write", addr=addr, pages=[2, 11])  # copy on write
        assert page_indices(collect(tracker, child), addr, 16) == [2, 11]
        assert child.command("read", addr=addr, pages=[5])["sum"] == ord("F")  # reads are not writes
        assert page_indices(collect(tracker, child), addr, 16) == []
        vmas = [v for v in dumpable(child) if v.start == addr]
        with PagemapScanScanner(child.pid) as scanner:
            assert page_indices(scanner.scan(vmas), addr, 16) == [2, 11]
    assert path.read_bytes() == b"F" * (16 * P)


def test_kernel_mode_writes_are_reported(child: Child) -> None:
    # read() copying into a protected page faults in the kernel, not in user mode.
    region = child.info["region"]
    with tracking(child) as tracker:
        collect(tracker, child)
        child.command("kernel_write", addr=region, pages=[3, 4, 100])
        assert page_indices(collect(tracker, child), region, REGION_PAGES) == [3, 4, 100]


def test_target_keeps_no_userfaultfd_and_close_removes_every_protection(child: Child) -> None:
    region = child.info["region"]
    fds_before = child.command("fds")["fds"]
    tracker = UffdWpTracker(child.pid)
    try:
        with PtraceFreezer(child.pid) as freezer:
            tracker.start(dumpable(child), freezer)
        assert uffd_fds(child.pid) == []
        assert child.command("fds")["fds"] == fds_before
        words = pagemap_words(child.pid, region, REGION_PAGES)
        assert np.all(words & np.uint64(kernel.PM_UFFD_WP))  # populated pages and markers alike
        assert pte_marker_mask(words[1::2]).all()  # never-touched odd pages hold markers
    finally:
        tracker.close()
    tracker.close()  # idempotent
    words = pagemap_words(child.pid, region, REGION_PAGES)
    assert not np.any(words & np.uint64(kernel.PM_UFFD_WP))
    assert not np.any(words[1::2])  # markers gone: never-touched pages read as empty again
    assert np.all(words[::2] & np.uint64(kernel.PM_PRESENT))
    child.command("write", addr=region, pages=[1, 2])  # and the child runs normally
    assert child.command("read", addr=region, pages=[1, 2])["sum"] > 0


# --- scanners and markers ---------------------------------------------------------------------


def test_scanners_do_not_report_markers_as_swapped_pages(child: Child) -> None:
    region = child.info["region"]
    with tracking(child):
        vmas = [v for v in dumpable(child) if v.start <= region < v.end]
        with PagemapScanScanner(child.pid) as by_scan, PagemapFileScanner(child.pid, find_zero_pfn()) as by_file:
            from_scan, from_file = by_scan.scan(vmas), by_file.scan(vmas)
            assert by_scan.markers_dropped >= REGION_PAGES // 2
        evens = list(range(0, REGION_PAGES, 2))
        assert page_indices(from_scan, region, REGION_PAGES) == evens
        assert page_indices(from_file, region, REGION_PAGES) == evens


def test_marker_words_are_not_dumped() -> None:
    zero = 0x3B34
    words = np.array([
        kernel.PM_SWAP | kernel.PM_UFFD_WP | 0x3F,  # uffd-wp marker (type 31, offset 1): skip
        kernel.PM_SWAP | kernel.PM_UFFD_WP | (7 << 5) | 3,  # write-protected page in swap file 3: dump
        kernel.PM_SWAP | kernel.PM_GUARD_REGION | 0x9F,  # guard marker: skip
        kernel.PM_SWAP | kernel.PM_UFFD_WP,  # PFNs hidden: cannot tell, dump (never lossy)
    ], dtype=np.uint64)
    assert pte_marker_mask(words).tolist() == [True, False, True, False]
    assert dump_mask(words, zero).tolist() == [False, True, False, True]


# --- VMAs that come, go, grow and move --------------------------------------------------------


def test_new_vma_is_wholly_dirty_once_then_precise(child: Child) -> None:
    with tracking(child) as tracker:
        collect(tracker, child)
        new = child.command("mmap", pages=64)["addr"]
        child.command("write", addr=new, pages=[1, 2, 3])
        assert page_indices(collect(tracker, child), new, 64) == list(range(64))
        child.command("write", addr=new, pages=[10, 63])
        assert page_indices(collect(tracker, child), new, 64) == [10, 63]


def test_munmapped_vma_is_forgotten(child: Child) -> None:
    region = child.info["region"]
    with tracking(child) as tracker:
        armed = tracker.armed_bytes
        child.command("munmap", addr=region, pages=1024)
        child.command("write", addr=region, pages=[1500, 1501], size=REGION_PAGES)
        assert page_indices(collect(tracker, child), region, REGION_PAGES) == [1500, 1501]
        assert tracker.armed_bytes <= armed - 1024 * P


def test_vma_grown_in_place_reports_the_new_part(child: Child) -> None:
    with tracking(child) as tracker:
        base = child.command("mmap", pages=32)["addr"]
        child.command("munmap", addr=base + 16 * P, pages=16)  # room to grow into
        child.command("write", addr=base, pages=list(range(16)))
        assert page_indices(collect(tracker, child), base, 32) == list(range(16))  # new VMA
        grown = child.command("mremap", addr=base, old=16, new=32)["addr"]
        assert grown == base
        child.command("write", addr=base, pages=[2])
        assert page_indices(collect(tracker, child), base, 32) == [2, *range(16, 32)]
        child.command("write", addr=base, pages=[5, 20])
        assert page_indices(collect(tracker, child), base, 32) == [5, 20]


def test_moved_vma_is_wholly_dirty_at_its_new_place(child: Child) -> None:
    with tracking(child) as tracker:
        old = child.command("mmap", pages=16)["addr"]
        child.command("write", addr=old, pages=list(range(16)))
        collect(tracker, child)
        child.command("mmap", pages=1)  # likely right below: forces mremap to move
        new = child.command("mremap", addr=old, old=16, new=4096, flags=MREMAP_MAYMOVE)["addr"]
        assert new != old
        # The move dropped the registration (no UFFD_FEATURE_EVENT_REMAP): all of it is dirty.
        assert page_indices(collect(tracker, child), new, 4096) == list(range(4096))
        child.command("write", addr=new, pages=[7, 4000])
        assert page_indices(collect(tracker, child), new, 4096) == [7, 4000]
        assert page_indices(collect(tracker, child), old, 16) == []


def test_vma_replaced_in_place_is_wholly_dirty(child: Child) -> None:
    # Same address, same size, new (unregistered) VMA: the ranges the tracker armed look
    # unchanged in /proc/PID/maps, only the kernel knows the registration is gone.
    with tracking(child) as tracker:
        addr = child.command("mmap", pages=16)["addr"]
        child.command("write", addr=addr, pages=list(range(16)))
        collect(tracker, child)
        assert page_indices(collect(tracker, child), addr, 16) == []
        assert child.command("mmap", pages=16, fixed=addr)["addr"] == addr
        child.command("write", addr=addr, pages=[3])
        assert page_indices(collect(tracker, child), addr, 16) == list(range(16))
        child.command("write", addr=addr, pages=[9])
        assert page_indices(collect(tracker, child), addr, 16) == [9]


def test_zapped_pages_are_reported_again_once_repopulated(child: Child) -> None:
    # Zapped pages hold nothing to send (not present: the round leaves them out, they restore as
    # zero), so collect leaves empty ptes alone. Populated again, by a read (the zero page) or a
    # write, they carry no uffd-wp bit and are reported: a page sent with old contents can never
    # be kept from the parent round after it was zapped.
    region = child.info["region"]
    with tracking(child) as tracker:
        collect(tracker, child)
        child.command("madvise", addr=region + 64 * P, pages=4, advice=MADV_DONTNEED)
        assert page_indices(collect(tracker, child), region, REGION_PAGES) == []
        child.command("read", addr=region + 64 * P, pages=[0, 1])
        child.command("write", addr=region + 64 * P, pages=[3])
        assert page_indices(collect(tracker, child), region, REGION_PAGES) == [64, 65, 67]
        assert page_indices(collect(tracker, child), region, REGION_PAGES) == []


def test_transparent_huge_page_write_reports_only_the_written_pages(child: Child) -> None:
    # A write into a write-protected THP splits it (async WP) and only 4 KiB pages are reported.
    with tracking(child) as tracker:
        huge = child.command("mmap", pages=1024, hugepage=True, align=2 << 20)["addr"]
        child.command("write", addr=huge, pages=list(range(1024)))
        collect(tracker, child)
        child.command("write", addr=huge, pages=[5, 600])
        assert page_indices(collect(tracker, child), huge, 1024) == [5, 600]


def test_vma_registered_by_the_target_itself_is_always_dirty(child: Child) -> None:
    own = child.command("own_uffd", pages=8)["addr"]  # the child's own uffd holds this VMA
    with tracking(child) as tracker:
        assert tracker.refused_bytes == 8 * P
        assert page_indices(collect(tracker, child), own, 8) == list(range(8))
        assert page_indices(collect(tracker, child), own, 8) == list(range(8))


def test_large_vmas_are_protected_where_populated_only(child: Child) -> None:
    region = child.info["region"]
    with tracking(child, full_protect_max_bytes=REGION_PAGES * P // 2) as tracker:
        words = pagemap_words(child.pid, region, REGION_PAGES)
        assert np.all(words[::2] & np.uint64(kernel.PM_UFFD_WP))
        assert not np.any(words[1::2])  # no markers, no page tables spent on them
        a = [0, 1, 2, 9, 4097]
        child.command("write", addr=region, pages=a, size=REGION_PAGES)
        got = page_indices(collect(tracker, child), region, REGION_PAGES)
        # Empty ptes in page tables that exist are reported once ("written"); they are not
        # present, so the caller's intersection with the scanner's pages drops them.
        assert set(a) <= set(got)
        assert set(got) - set(a) <= set(range(1, REGION_PAGES, 2))
        child.command("write", addr=region, pages=[3, 8], size=REGION_PAGES)
        assert page_indices(collect(tracker, child), region, REGION_PAGES) == [3, 8]


# Maps, resizes (mremap, moving or in place) and unmaps small mappings as fast as it can; a
# failing mremap (EFAULT after a VMA was split under it) kills it with a traceback.
CHURN_CHILD = r"""
import ctypes, json, mmap, sys
P = mmap.PAGESIZE
live, i = [], 0
count = ctypes.c_uint64(0)
print("READY " + json.dumps({"count": ctypes.addressof(count)}), flush=True)
while True:
    i += 1
    count.value = i
    m = mmap.mmap(-1, P * (1 + i % 5), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m[:8] = i.to_bytes(8, "little")
    live.append(m)
    if len(live) > 10:
        live.pop(i % 4).close()
    victim = live[i % len(live)]
    victim.resize(len(victim) + P if i % 2 else max(P, len(victim) - P))
    victim[-8:] = i.to_bytes(8, "little")
"""


def advanced(pid: int, counter: int, by: int) -> Callable[[], bool]:
    """A predicate: has the u64 at ``counter`` in ``pid`` grown by more than ``by`` since now?"""
    def value() -> int:
        return int.from_bytes(read_mem(pid, counter, 8), "little")

    base = value()
    return lambda: value() > base + by


def test_collect_while_the_target_remaps_never_splits_its_mappings() -> None:
    # Registration with bounds read a moment earlier would split a mapping the target is
    # resizing, and its next mremap() would fail: registration happens only while it is stopped.
    with spawn_python_running(CHURN_CHILD) as (proc, info):
        tracker = UffdWpTracker(proc.pid)
        try:
            with PtraceFreezer(proc.pid) as freezer:
                tracker.start(procfs.select_dumpable(procfs.read_maps(proc.pid)), freezer)
            for _ in range(20):
                vmas = procfs.select_dumpable(procfs.read_maps(proc.pid))
                # Let the maps go stale, as they do while a round is being sent.
                wait_until(advanced(proc.pid, info["count"], 20), "the child to remap some more")
                tracker.collect(vmas, Runs.empty())
                assert proc.poll() is None, proc.communicate(timeout=30)[1].decode()
        finally:
            tracker.close()
        assert proc.poll() is None


# --- failures ---------------------------------------------------------------------------------


def test_killed_target_makes_collect_raise_process_gone(child: Child) -> None:
    with tracking(child) as tracker:
        collect(tracker, child)
        vmas = dumpable(child)
        os.kill(child.pid, signal.SIGKILL)
        child.proc.wait(timeout=30)
        with pytest.raises(ProcessGone):
            tracker.collect(vmas, Runs.empty())
    tracker.close()


@pytest.mark.parametrize("failing", ["pidfd_getfd", "uffdio_api_ioctl"])
def test_failed_start_leaves_the_target_as_it_was(child: Child, failing: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    region = child.info["region"]
    fds_before = child.command("fds")["fds"]

    def refuse(*args: object) -> None:
        raise OSError(22, "refused by the test")

    monkeypatch.setattr(kernel, failing, refuse)
    tracker = UffdWpTracker(child.pid)
    with PtraceFreezer(child.pid) as freezer:
        with pytest.raises((OSError, KernelUnsupported)):
            tracker.start(dumpable(child), freezer)
        assert uffd_fds(child.pid) == []
    tracker.close()
    assert child.command("fds")["fds"] == fds_before
    assert not np.any(pagemap_words(child.pid, region, REGION_PAGES) & np.uint64(kernel.PM_UFFD_WP))


def test_collect_before_start_is_refused(child: Child) -> None:
    with pytest.raises(RuntimeError, match="not started"):
        UffdWpTracker(child.pid).collect(dumpable(child), Runs.empty())


def test_probe_reports_availability() -> None:
    assert availability.name == "uffd-wp"
    assert availability.available, availability.reason
    assert UffdWpTracker.probe() == availability


# --- interval helpers -------------------------------------------------------------------------


def iv(*pairs: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    return np.array([a for a, _ in pairs], np.uint64), np.array([b for _, b in pairs], np.uint64)


def pairs(intervals: tuple[np.ndarray, np.ndarray]) -> list[tuple[int, int]]:
    return list(zip(intervals[0].tolist(), intervals[1].tolist(), strict=True))


def test_interval_set_operations() -> None:
    a = iv((0, 10), (20, 30), (40, 50))
    b = iv((5, 25), (30, 40), (60, 70))
    assert pairs(uffd._union(a, b)) == [(0, 50), (60, 70)]  # touching stretches join
    assert pairs(uffd._intersect(a, b)) == [(5, 10), (20, 25)]
    assert pairs(uffd._subtract(a, b)) == [(0, 5), (25, 30), (40, 50)]
    assert pairs(uffd._subtract(b, a)) == [(10, 20), (30, 40), (60, 70)]
    assert pairs(uffd._union(a, uffd._empty())) == pairs(a)
    assert pairs(uffd._intersect(a, uffd._empty())) == []
    assert pairs(uffd._merge(*iv((0, 5), (3, 8), (8, 9), (10, 11)))) == [(0, 9), (10, 11)]


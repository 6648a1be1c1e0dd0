"""Find the pages of a process that belong in its memory image.

A page is dumped when it is present or swapped out, and it is not the shared zero page (a
never-written page that was only read), not a page of the underlying file (a private file
mapping's page that was never copied on write; it comes back from the file), and not a guard
region marker. These are CRIU's ``should_dump_page`` rules (criu/mem.c).

Some facts about the two kernel interfaces (Documentation/admin-guide/mm/pagemap.rst,
fs/proc/task_mmu.c):

* ``/proc/PID/pagemap`` holds one u64 per virtual page at offset ``vaddr / PAGE_SIZE * 8``;
  reads must be 8-byte aligned. PFNs (bits 0-54) read as zero without CAP_SYS_ADMIN, and then
  the zero page cannot be told apart from a real one. Guard markers (MADV_GUARD_INSTALL) read
  as ``PM_SWAP | PM_GUARD_REGION`` and must be filtered explicitly. The PMD-mapped huge zero
  page reads as ``PM_PRESENT | PM_FILE`` (observed on 6.18), so the PM_FILE rule drops it.
* ``PAGEMAP_SCAN`` (6.7) walks a range in the kernel and returns ``page_region`` runs of pages
  whose categories pass a filter: categories are XORed with ``category_inverted``, then all of
  ``category_mask`` and one of ``category_anyof_mask`` must be set. It computes PAGE_IS_PFNZERO
  itself, so it needs no PFN access, and it is about five times cheaper than reading pagemap.
  A guard marker is reported as ``PAGE_IS_SWAPPED | PAGE_IS_GUARD`` (observed on 6.18), so on
  kernels that know PAGE_IS_GUARD (6.15) it is excluded through the inverted mask; on 6.13 and
  6.14 guard regions exist but cannot be filtered and are reported as swapped pages.
* The range must be page aligned (EINVAL) and inside the user address space (EFAULT beyond
  TASK_SIZE); unmapped holes inside the range are fine. Adjacent pages with equal reported
  categories are merged, also across VMA boundaries.
* ``walk_end`` quirk (seen on 6.18; ``tests/integration/test_scanner.py`` forces it): when the
  vector fills exactly at the end of an internal pass, ``walk_end`` can be left pointing before
  regions already returned. The robust loop stops when fewer than ``vec_len`` regions come back and otherwise resumes at
  ``max(walk_end, vec[n - 1].end)``.
* Once the target's mm is gone (the process exited, or exec'd), both interfaces read as
  empty on an fd opened before: PAGEMAP_SCAN returns 0 regions, pread returns 0 bytes. An
  8-byte pread after a scan tells an empty answer from a gone process.
* PTE markers are swap-like entries without data. Under uffd-wp dirty tracking
  (sender/trackers/uffd.py) every never-populated pte of a write-protected range holds one,
  and both interfaces report it as swapped (observed on 6.18: ``PAGE_IS_SWAPPED`` with
  ``PAGE_IS_WPALLOWED``, pagemap word ``PM_SWAP | PM_UFFD_WP | 0x3f``), so never-touched pages
  would be dumped (as zeros, and kept alive in every later image through the parent chain).
  PAGEMAP_SCAN cannot tell a marker from a write-protected page that was really swapped out
  (both are SWAPPED and not WRITTEN), but the pagemap word can: a marker has swap type
  SWP_PTE_MARKER (31). So the regions PAGEMAP_SCAN reports as swapped and not present have
  their pagemap words read and markers dropped; the file scanner drops them by the same rule.
  Without CAP_SYS_ADMIN swap types read as 0 and markers are kept (dumped as zero pages):
  wasteful, never lossy.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Final, Protocol, Self

import numpy as np
import numpy.typing as npt

from pagehaul import kernel
from pagehaul.errors import KernelUnsupported, ProcessGone
from pagehaul.kernel import PAGE_SIZE
from pagehaul.procfs import PROC_ROOT, ProcFd, Vma, open_proc, translate_errors
from pagehaul.runs import U64, Runs, in_ranges

log = logging.getLogger(__name__)

_PAGE_SHIFT: Final = PAGE_SIZE.bit_length() - 1

# CRIU's scan filter (criu/pagemap-cache.c): not PFNZERO and not FILE, and PRESENT or SWAPPED.
_SCAN_EXCLUDE: Final = kernel.PAGE_IS_PFNZERO | kernel.PAGE_IS_FILE
_SCAN_ANYOF: Final = kernel.PAGE_IS_PRESENT | kernel.PAGE_IS_SWAPPED
_SCAN_RETURN: Final = kernel.PAGE_IS_PRESENT | kernel.PAGE_IS_SWAPPED

SCAN_VEC_LEN: Final = 4096  # 96 KiB of page_region: a few ioctls per GiB of fragmented memory
# Spans of VMAs closer than this are walked by one PAGEMAP_SCAN walk (see walk_ranges).
WALK_JOIN_GAP_BYTES: Final = 1 << 30


class PageScanner(Protocol):
    """Holds an fd on ``/proc/PID/pagemap``: close it, or use the scanner as a context manager."""

    def scan(self, vmas: Sequence[Vma]) -> Runs:
        """Runs of pages to dump inside ``vmas``: sorted, disjoint and merged."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...


def vma_spans(vmas: Sequence[Vma]) -> tuple[U64, U64]:
    """Start and end addresses of the VMAs with touching neighbours coalesced, sorted.

    Only touching VMAs are joined: a gap between two selected VMAs may hold an unselected
    mapping (shared memory, [vdso]) whose pages must not be reported. Overlapping VMAs are joined
    too: /proc/PID/maps of a running process is not one snapshot (it is read in chunks while the
    process maps and remaps), so a live round can see a moved VMA twice; the union is scanned.
    """
    if not vmas:
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64)
    starts = np.fromiter((v.start for v in vmas), np.uint64, len(vmas))
    ends = np.fromiter((v.end for v in vmas), np.uint64, len(vmas))
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], ends[order]
    reach = np.maximum.accumulate(ends)  # the furthest end so far
    new_span = np.concatenate(([True], starts[1:] > reach[:-1]))
    first = np.flatnonzero(new_span)
    last = np.concatenate((first[1:] - 1, [len(starts) - 1]))
    return starts[first], reach[last]


def runs_from_regions(regions: npt.NDArray[np.void], page_size: int = PAGE_SIZE) -> Runs:
    """``page_region`` records (sorted, disjoint) to merged runs."""
    if regions.size == 0:
        return Runs.empty()
    starts = np.ascontiguousarray(regions["start"], dtype=np.uint64)
    nr_pages = (regions["end"] - regions["start"]) // np.uint64(page_size)
    return Runs(starts, np.ascontiguousarray(nr_pages, dtype=np.uint64)).merged(page_size)


def pte_marker_mask(words: U64) -> npt.NDArray[np.bool_]:
    """Which pagemap entries are PTE markers (uffd-wp, guard, poison): swapped, type 31."""
    swapped = (words & np.uint64(kernel.PM_PRESENT | kernel.PM_SWAP)) == np.uint64(kernel.PM_SWAP)
    result: npt.NDArray[np.bool_] = swapped & ((words & np.uint64(kernel.PM_SWAP_TYPE_MASK))
                                               == np.uint64(kernel.SWP_PTE_MARKER))
    return result


def dump_mask(words: U64, zero_pfn: int) -> npt.NDArray[np.bool_]:
    """Which pagemap entries are pages to dump (CRIU's ``should_dump_page``, vectorised)."""
    present = (words & np.uint64(kernel.PM_PRESENT)) != 0
    populated = (words & np.uint64(kernel.PM_PRESENT | kernel.PM_SWAP)) != 0
    excluded = (words & np.uint64(kernel.PM_FILE | kernel.PM_GUARD_REGION)) != 0
    zero = present & ((words & np.uint64(kernel.PM_PFRAME_MASK)) == np.uint64(zero_pfn))
    result: npt.NDArray[np.bool_] = populated & ~excluded & ~zero & ~pte_marker_mask(words)
    return result


def _check_alive(pid: int, fd: int, vaddr: int, proc_root: Path) -> None:
    """Raise ProcessGone if the mm behind a pagemap fd has been torn down (reads return EOF)."""
    with translate_errors(pid, proc_root):
        if len(os.pread(fd, 8, (vaddr >> _PAGE_SHIFT) * 8)) == 0:
            raise ProcessGone(pid, f"process {pid} exited while its pages were scanned")


class _ScannerBase(ProcFd):
    def __init__(self, pid: int, proc_root: Path) -> None:
        self.pid = pid
        self._proc_root = proc_root
        self._fd = open_proc(pid, "pagemap", proc_root)


# === PAGEMAP_SCAN ============================================================================


class PagemapScanScanner(_ScannerBase):
    """Scanner on the PAGEMAP_SCAN ioctl: few walks over the VMAs, results clipped to them.

    One ioctl costs ~5 us however little it walks: a walk per span of touching VMAs made 1040
    ioctls (4.8 ms) for a process with 1024 small VMAs, where one walk over all of them takes a
    few. So spans are walked together (:func:`walk_ranges`) and the regions, which the kernel
    also reports for the unselected mappings in between and merges across VMA boundaries, are
    cut back to the spans in numpy (:func:`clip_regions`).
    """

    def __init__(self, pid: int, proc_root: Path = PROC_ROOT, vec_len: int = SCAN_VEC_LEN) -> None:
        super().__init__(pid, proc_root)
        self._vec = np.zeros(vec_len, dtype=kernel.PAGE_REGION_DTYPE)
        exclude = _SCAN_EXCLUDE | (kernel.PAGE_IS_GUARD if _probe_guard_category() else 0)
        self._arg = kernel.pm_scan_arg(
            size=0, flags=0, vec=self._vec.ctypes.data, vec_len=vec_len, max_pages=0,
            category_inverted=exclude, category_mask=exclude,
            category_anyof_mask=_SCAN_ANYOF, return_mask=_SCAN_RETURN,
        )
        self.ioctls = 0  # ioctl calls made, for stats and tests
        self.walks = 0  # address ranges walked (each one or more ioctls), for stats and tests
        self.markers_dropped = 0  # PTE-marker pages reported as swapped and dropped, for stats and tests

    def scan(self, vmas: Sequence[Vma]) -> Runs:
        starts, ends = vma_spans(vmas)
        parts: list[npt.NDArray[np.void]] = []
        walk_starts, walk_ends = walk_ranges(starts, ends)
        for walk_start, walk_end in zip(walk_starts.tolist(), walk_ends.tolist(), strict=True):
            self.ioctls += scan_span(self._fd, self._arg, self._vec, walk_start, walk_end, parts=parts,
                                     pid=self.pid, proc_root=self._proc_root)
        self.walks += len(walk_starts)
        if len(starts):
            _check_alive(self.pid, self._fd, int(starts[0]), self._proc_root)
        if not parts:
            return Runs.empty()
        regions = clip_regions(np.concatenate(parts), starts, ends)
        swapped = (regions["categories"] & np.uint64(kernel.PAGE_IS_PRESENT)) == 0
        if not swapped.any():
            return runs_from_regions(regions)
        real = self._without_markers(runs_from_regions(regions[swapped]))
        return Runs.concat([runs_from_regions(regions[~swapped]), real]).sorted().merged(PAGE_SIZE)

    def _without_markers(self, swapped: Runs) -> Runs:
        """``swapped`` minus the pages whose pagemap word is a PTE marker (module comment)."""
        kept: list[Runs] = []
        for chunk in swapped.split(_CHUNK_PAGES, PAGE_SIZE):
            pages = chunk.page_addrs(PAGE_SIZE) >> np.uint64(_PAGE_SHIFT)
            words = np.empty(pages.size, dtype="<u8")
            for first, count in _coalesced_reads(chunk):
                lo, hi = np.searchsorted(pages, [first, first + count])
                buf = _pread_words(self.pid, self._fd, first, count, self._proc_root)
                words[lo:hi] = buf[(pages[lo:hi] - np.uint64(first)).astype(np.int64)]
            markers = pte_marker_mask(words)
            self.markers_dropped += int(markers.sum())
            kept.append(Runs.from_page_addrs(pages[~markers] << np.uint64(_PAGE_SHIFT), PAGE_SIZE))
        return Runs.concat(kept)


def scan_span(fd: int, arg: kernel.pm_scan_arg, vec: npt.NDArray[np.void], start: int, end: int, *,
              parts: list[npt.NDArray[np.void]], pid: int, proc_root: Path = PROC_ROOT) -> int:
    """One robust PAGEMAP_SCAN walk of ``[start, end)`` with the filter and flags in ``arg``.

    ``arg.vec``/``arg.vec_len`` must describe ``vec``, which is reused between calls: the regions
    found are appended to ``parts`` as copies. Resumes past a full vector at
    ``max(walk_end, last region end)`` (module comment, walk_end quirk). Errors about ``pid``
    are translated. Returns the number of ioctls made.
    """
    vec_len, ioctls = vec.size, 0
    while start < end:
        arg.start, arg.end, arg.walk_end = start, end, 0
        with translate_errors(pid, proc_root):
            n = kernel.pagemap_scan(fd, arg)
        ioctls += 1
        if n:
            parts.append(vec[:n].copy())
        if n < vec_len:
            break
        start = max(int(arg.walk_end), int(vec[n - 1]["end"]))
    return ioctls


def walk_ranges(starts: U64, ends: U64, max_gap_bytes: int = WALK_JOIN_GAP_BYTES) -> tuple[U64, U64]:
    """Address ranges to walk for the spans ``[starts, ends)`` (sorted, disjoint): spans whose gap
    is at most ``max_gap_bytes`` share one walk.

    An unmapped gap costs the kernel's walk nothing (``walk_page_range`` jumps to the next VMA);
    a gap holding unselected mappings (shared memory, other files) costs a page table walk of
    their populated part, which the cap bounds (a walk over a large gap of present pages costs
    far more than one more ioctl would). The gaps that matter in practice
    (heap to mmap area, mmap area to stack) are terabytes and start a new walk.
    """
    if starts.size == 0:
        return starts, ends
    new_walk = np.concatenate(([True], starts[1:] - ends[:-1] > np.uint64(max_gap_bytes)))
    first = np.flatnonzero(new_walk)
    last = np.concatenate((first[1:] - 1, [len(starts) - 1]))
    return starts[first], ends[last]


def clip_regions(regions: npt.NDArray[np.void], starts: U64, ends: U64) -> npt.NDArray[np.void]:
    """``page_region`` records (sorted, disjoint) cut to the spans ``[starts, ends)`` (sorted, disjoint).

    A region may cover several spans and the gaps between them (the kernel merges equal
    neighbours across VMA boundaries); it becomes one record per span it overlaps, with the
    same categories. Regions outside every span disappear.
    """
    if regions.size == 0 or starts.size == 0:
        return regions[:0]
    r_start = regions["start"].astype(np.uint64)
    r_end = regions["end"].astype(np.uint64)
    first = np.searchsorted(ends, r_start, side="right")  # first span ending after the region starts
    stop = np.searchsorted(starts, r_end, side="left")  # spans from here on start at or after its end
    count = np.maximum(stop.astype(np.int64) - first.astype(np.int64), 0)
    if np.all(count == 1) and np.all(r_start >= starts[first]) and np.all(r_end <= ends[first]):
        return regions  # every region inside one span: nothing to cut (the common case)
    owner = np.repeat(np.arange(regions.size), count)
    nth = np.arange(owner.size) - np.repeat(np.cumsum(count) - count, count)  # 0, 1, .. within each region
    span = np.repeat(first.astype(np.int64), count) + nth
    out = regions[owner].copy()
    out["start"] = np.maximum(r_start[owner], starts[span])
    out["end"] = np.minimum(r_end[owner], ends[span])
    return out


def _coalesced_reads(runs: Runs) -> list[tuple[int, int]]:
    """(first page, page count) pagemap reads covering ``runs`` (sorted), joining small gaps."""
    first = runs.vaddr >> np.uint64(_PAGE_SHIFT)
    last = first + runs.nr_pages
    new_read = np.concatenate(([True], first[1:] - last[:-1] > np.uint64(_COALESCE_GAP_PAGES)))
    idx = np.flatnonzero(new_read)
    ends = np.concatenate((idx[1:] - 1, [len(runs) - 1]))
    return list(zip(first[idx].tolist(), (last[ends] - first[idx]).tolist(), strict=True))


def _pread_words(pid: int, fd: int, page: int, count: int, proc_root: Path) -> U64:
    words = np.empty(count, dtype="<u8")
    view = words.data.cast("B")
    done = 0
    while done < len(view):
        with translate_errors(pid, proc_root):
            n = os.preadv(fd, [view[done:]], page * 8 + done)
        if n == 0:
            raise ProcessGone(pid, f"process {pid} exited while its pages were scanned")
        done += n
    return words


def _scan_self(arg: kernel.pm_scan_arg) -> int:
    fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return kernel.pagemap_scan(fd, arg)
    finally:
        os.close(fd)


def _probe_arg(extra_mask: int) -> kernel.pm_scan_arg:
    # A zero-length walk exercises argument validation only: vec=NULL is a valid "no get".
    here = PAGE_SIZE
    return kernel.pm_scan_arg(start=here, end=here, category_inverted=extra_mask, category_mask=extra_mask,
                              category_anyof_mask=_SCAN_ANYOF, return_mask=_SCAN_RETURN | extra_mask)


def probe_pagemap_scan(pid: int | None = None) -> bool:
    """Whether PAGEMAP_SCAN works with the filter the scanner uses (probed on /proc/self).

    ENOTTY (no such ioctl, before 6.7) and EINVAL (an unknown category) mean unsupported; any
    other error is raised. ``pid`` only names the process in log lines.
    """
    try:
        _scan_self(_probe_arg(0))
    except OSError as err:
        if err.errno in (errno.ENOTTY, errno.EINVAL):
            log.info("PAGEMAP_SCAN unsupported, falling back to reading pagemap pid=%s errno=%s",
                     pid, errno.errorcode.get(err.errno or 0, err.errno))
            return False
        raise
    return True


def _probe_guard_category() -> bool:
    """Whether the kernel knows PAGE_IS_GUARD (6.15); older kernels reject it with EINVAL."""
    try:
        _scan_self(_probe_arg(kernel.PAGE_IS_GUARD))
    except OSError as err:
        if err.errno == errno.EINVAL:
            return False
        raise
    return True


# === /proc/PID/pagemap =======================================================================

# CRIU's pagemap cache reads small VMAs that share a 2 MiB window in one go (PMC_SIZE); here
# spans are coalesced into one read when the gap between them is at most this many pages (the
# gap's entries are read and masked out), and every read is cut to the chunk buffer.
_COALESCE_GAP_PAGES: Final = 128  # 512 KiB of address space = 1 KiB of pagemap, CRIU's PMC_SIZE_GAP
_CHUNK_PAGES: Final = 1 << 20  # 8 MiB of pagemap per batch = 4 GiB of address space


class PagemapFileScanner(_ScannerBase):
    """Fallback scanner reading ``/proc/PID/pagemap`` words and classifying them in numpy."""

    def __init__(self, pid: int, zero_pfn: int, proc_root: Path = PROC_ROOT,
                 chunk_pages: int = _CHUNK_PAGES) -> None:
        super().__init__(pid, proc_root)
        if zero_pfn <= 0:
            raise ValueError("zero_pfn must be the real PFN of the zero page (see find_zero_pfn)")
        self.zero_pfn = zero_pfn
        self._chunk_pages = chunk_pages
        self._words = np.zeros(chunk_pages, dtype="<u8")
        self.reads = 0  # pread calls made, for stats and tests

    def scan(self, vmas: Sequence[Vma]) -> Runs:
        span_starts, span_ends = vma_spans(vmas)
        if span_starts.size == 0:
            return Runs.empty()
        first = span_starts >> np.uint64(_PAGE_SHIFT)
        last = span_ends >> np.uint64(_PAGE_SHIFT)
        reads = self._plan_reads(first.tolist(), last.tolist())
        found: list[Runs] = []
        batch: list[tuple[int, int]] = []
        filled = 0
        for page, count in reads:
            if filled + count > self._chunk_pages:
                found.append(self._classify(batch, filled, span_starts, span_ends))
                batch, filled = [], 0
            self._pread_words(page, count, filled)
            batch.append((page, count))
            filled += count
        found.append(self._classify(batch, filled, span_starts, span_ends))
        return Runs.concat(found).merged(PAGE_SIZE)

    def _plan_reads(self, first: list[int], last: list[int]) -> list[tuple[int, int]]:
        """(first page, page count) reads covering every span, at most one chunk each."""
        reads: list[tuple[int, int]] = []
        cur_start, cur_end = first[0], last[0]
        for start, end in zip(first[1:], last[1:], strict=True):
            if start - cur_end <= _COALESCE_GAP_PAGES and end - cur_start <= self._chunk_pages:
                cur_end = end
                continue
            reads.extend(self._cut(cur_start, cur_end))
            cur_start, cur_end = start, end
        reads.extend(self._cut(cur_start, cur_end))
        return reads

    def _cut(self, start: int, end: int) -> list[tuple[int, int]]:
        step = self._chunk_pages
        return [(p, min(step, end - p)) for p in range(start, end, step)]

    def _pread_words(self, page: int, count: int, at: int) -> None:
        view = self._words[at:at + count].data.cast("B")
        offset, done = page * 8, 0
        while done < len(view):
            with translate_errors(self.pid, self._proc_root):
                n = os.preadv(self._fd, [view[done:]], offset + done)
            self.reads += 1
            if n == 0:
                raise ProcessGone(self.pid, f"process {self.pid} exited while its pages were scanned")
            done += n

    def _classify(self, batch: list[tuple[int, int]], filled: int, span_starts: U64, span_ends: U64) -> Runs:
        if filled == 0:
            return Runs.empty()
        words = self._words[:filled]
        addrs = Runs.from_pairs([(page * PAGE_SIZE, count) for page, count in batch]).page_addrs(PAGE_SIZE)
        mask = dump_mask(words, self.zero_pfn)
        # Coalesced reads include the gaps between spans: keep only pages inside a span.
        return Runs.from_page_addrs(addrs[mask & in_ranges(addrs, span_starts, span_ends)], PAGE_SIZE)


# === zero page, selection ====================================================================


def find_zero_pfn() -> int:
    """The PFN of the shared zero page, learned as CRIU's kerndat does.

    A read fault on a never-written private anonymous page maps the zero page; its PFN is then
    visible in /proc/self/pagemap, but only with CAP_SYS_ADMIN (otherwise PFNs read as 0).
    """
    region = mmap.mmap(-1, PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=mmap.PROT_READ)
    try:
        view = np.frombuffer(region, dtype=np.uint8)
        addr = int(view.ctypes.data)
        if int(view[0]) != 0:
            raise AssertionError("a fresh anonymous page is not zero")
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        try:
            word = int.from_bytes(os.pread(fd, 8, (addr >> _PAGE_SHIFT) * 8), "little")
        finally:
            os.close(fd)
        del view
    finally:
        region.close()
    pfn = word & kernel.PM_PFRAME_MASK
    if not word & kernel.PM_PRESENT:
        raise KernelUnsupported("reading a fresh anonymous page did not map the zero page")
    if pfn == 0:
        raise KernelUnsupported("PFNs are hidden in /proc/self/pagemap (needs CAP_SYS_ADMIN); "
                                "the pagemap fallback cannot recognise the zero page")
    return pfn


def make_scanner(pid: int, force_pagemap_file: bool = False, proc_root: Path = PROC_ROOT) -> PageScanner:
    """PAGEMAP_SCAN when the kernel has it, else the pagemap file reader (or when forced)."""
    if not force_pagemap_file and probe_pagemap_scan(pid):
        return PagemapScanScanner(pid, proc_root)
    return PagemapFileScanner(pid, find_zero_pfn(), proc_root)

"""CRIU's pagemap cache: ``/proc/PID/pagemap`` words for many VMAs in few reads.

Some facts behind it (criu/pagemap-cache.c ``pmc_fill_cache``/``pmc_get_map``,
Documentation/admin-guide/mm/pagemap.rst, CRIU criu/pagemap-cache.c):

* pagemap holds one u64 per virtual page at offset ``vaddr / PAGE_SIZE * 8``. Each ``read``
  walks the page tables of the range, so its cost is one syscall plus the walk: a process with
  a thousand small VMAs (a JVM, a Python interpreter's arenas) pays a thousand syscalls when
  read VMA by VMA.
* CRIU batches them in 2 MiB windows (``PMC_SHIFT = 21``): a VMA shorter than 2 MiB whose start
  lies less than ``PMC_SIZE_GAP`` (512 KiB) past its 2 MiB-aligned window start is read
  together with the following VMAs that end inside that window ("cache mode"); a VMA that
  shares its window with no other, or is too large or starts too late in its window, is read
  alone ("simple mode"), so a lone small VMA costs its own pages only, never the whole window.
  The source comment speaks of a window "at least 75% full", but the test is the 25% start
  offset; this module does what the code does.
* Two deliberate differences from CRIU: a cache-mode read stops at the end of the last VMA in
  the window instead of at the window end (``high``), which serves exactly the same VMAs (they
  are sorted and disjoint, so no later VMA can fit) with fewer bytes and a shorter kernel walk,
  and so ``kdat.task_size`` never caps it; and a VMA larger than ``max_read_pages`` is read in
  pieces, where CRIU sizes one buffer for the largest VMA (8 bytes per page: 32 GiB for an
  ASan 16 TiB shadow reservation).
* Words in a cache-mode read between two VMAs belong to no requested VMA (an unmapped gap, or a
  mapping the caller left out such as shared memory or ``[vdso]``); :meth:`PagemapCache.find`
  masks them out.
* ``read`` on pagemap returns the full count except at the end of the user address space
  (TASK_SIZE); once the target's mm is gone every read on an fd opened before returns 0 bytes.
  Short reads are resumed; an empty read is told apart by an 8-byte read at offset 0, which a
  live mm always answers.
* ``CRIU_PMC_OFF`` disabled batching in CRIU as a workaround for a Linux 3.19 bug with reads
  spanning several VMAs (criu issue #207); ``batching=False`` does the same here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from pagehaul.errors import ProcessError, ProcessGone
from pagehaul.kernel import PAGE_SIZE
from pagehaul.procfs import PROC_ROOT, ProcFd, Vma, open_proc, translate_errors
from pagehaul.runs import U64, Runs, in_ranges

_PAGE_SHIFT: Final = PAGE_SIZE.bit_length() - 1

PMC_SHIFT: Final = 21
PMC_SIZE: Final = 1 << PMC_SHIFT
PMC_SIZE_GAP: Final = PMC_SIZE // 4

# A VMA longer than this is read in pieces: 8 MiB of pagemap, 4 GiB of address space.
MAX_READ_PAGES: Final = 1 << 20

_WORD: Final = 8  # bytes per pagemap entry


@dataclass(frozen=True, slots=True, eq=False)
class PagemapWindow:
    """One read: pagemap words for ``words.size`` pages from ``start``.

    ``vmas`` are the VMAs this read serves, sorted; every one lies wholly inside the window,
    except that a VMA cut into pieces (longer than ``max_read_pages``) is the only VMA of each
    of its windows. ``cached`` is True for CRIU's cache mode (several VMAs in one read).
    """

    start: int
    words: U64
    vmas: tuple[Vma, ...]
    cached: bool

    @property
    def end(self) -> int:
        return self.start + self.words.size * PAGE_SIZE

    def words_of(self, vma: Vma) -> U64:
        """The words of the part of ``vma`` inside this window (a view, no copy)."""
        first = max(vma.start, self.start)
        last = min(vma.end, self.end)
        if first >= last:
            return self.words[:0]
        return self.words[(first - self.start) >> _PAGE_SHIFT:(last - self.start) >> _PAGE_SHIFT]


@dataclass(frozen=True, slots=True)
class VmaWords:
    """Pagemap words of (a piece of) one VMA: ``words[i]`` describes page ``start + i * PAGE_SIZE``."""

    vma: Vma
    start: int
    words: U64


@dataclass(frozen=True, slots=True)
class _Fill:
    first: int  # index into the sorted VMAs
    last: int  # inclusive
    start_page: int
    nr_pages: int
    cached: bool


def _sorted_bounds(vmas: Sequence[Vma]) -> tuple[list[Vma], U64, U64]:
    ordered = sorted(vmas, key=lambda v: v.start)
    starts = np.fromiter((v.start for v in ordered), np.uint64, len(ordered))
    ends = np.fromiter((v.end for v in ordered), np.uint64, len(ordered))
    if np.any(ends <= starts):
        raise ValueError("empty or inverted VMA")
    if np.any(ends[:-1] > starts[1:]):
        raise ValueError("VMAs overlap")
    if np.any((starts | ends) & np.uint64(PAGE_SIZE - 1)):
        raise ValueError("VMA bounds are not page aligned")
    return ordered, starts, ends


def _plan_fills(starts: U64, ends: U64, *, batching: bool = True, max_read_pages: int = MAX_READ_PAGES) -> list[_Fill]:
    """The reads covering sorted, disjoint VMAs, following ``pmc_fill_cache``.

    Vectorised per VMA (window bounds, which VMAs a window holds); the Python loop runs once
    per read, jumping over the VMAs a cache-mode read serves.
    """
    n = int(starts.size)
    if n == 0:
        return []
    low = starts & ~np.uint64(PMC_SIZE - 1)
    high = low + np.uint64(PMC_SIZE)
    eligible = ((ends - starts) < np.uint64(PMC_SIZE)) & ((starts - low) < np.uint64(PMC_SIZE_GAP))
    # The last VMA that ends inside each VMA's window; VMAs are sorted and disjoint, so every
    # VMA between the two fits too, and none after it can.
    last_fit = np.searchsorted(ends, high, side="right").astype(np.int64) - 1
    eligible_l = (eligible & batching).tolist()
    last_fit_l = last_fit.tolist()
    first_page = (starts >> np.uint64(_PAGE_SHIFT)).tolist()
    end_page = (ends >> np.uint64(_PAGE_SHIFT)).tolist()
    fills: list[_Fill] = []
    i = 0
    while i < n:
        j = last_fit_l[i]
        if eligible_l[i] and j > i:
            fills.append(_Fill(i, j, first_page[i], end_page[j] - first_page[i], cached=True))
            i = j + 1
            continue
        for page in range(first_page[i], end_page[i], max_read_pages):
            fills.append(_Fill(i, i, page, min(max_read_pages, end_page[i] - page), cached=False))
        i += 1
    return fills


class PagemapCache(ProcFd):
    """Reads pagemap words of ``pid``'s VMAs in CRIU's 2 MiB windows.

    Holds an fd on ``/proc/PID/pagemap`` (close it, or use as a context manager). Nothing is
    kept between calls: every call reads the words afresh. The counters add up over calls:
    ``fills`` reads planned (one per window or piece), ``hits`` VMAs served by a read made for
    an earlier VMA (CRIU's cache hits), ``reads`` pread calls (more than ``fills`` only on short
    reads) and ``bytes_read``.
    """

    def __init__(self, pid: int, proc_root: Path = PROC_ROOT, *, batching: bool = True,
                 max_read_pages: int = MAX_READ_PAGES) -> None:
        if max_read_pages <= 0:
            raise ValueError("max_read_pages must be positive")
        self.pid = pid
        self._proc_root = proc_root
        self._batching = batching
        self._max_read_pages = max_read_pages
        self._fd = open_proc(pid, "pagemap", proc_root)
        self.fills = 0
        self.hits = 0
        self.reads = 0
        self.bytes_read = 0


    # --- reading ----------------------------------------------------------------------------

    def windows(self, vmas: Sequence[Vma]) -> Iterator[PagemapWindow]:
        """One :class:`PagemapWindow` per read, in address order. Each window's words are a
        fresh array; they stay valid after the iteration moves on."""
        ordered, starts, ends = _sorted_bounds(vmas)
        for fill in _plan_fills(starts, ends, batching=self._batching, max_read_pages=self._max_read_pages):
            words = self._pread_words(fill.start_page, fill.nr_pages)
            self.fills += 1
            self.hits += fill.last - fill.first
            yield PagemapWindow(fill.start_page << _PAGE_SHIFT, words, tuple(ordered[fill.first:fill.last + 1]),
                                fill.cached)

    def words(self, vmas: Sequence[Vma]) -> Iterator[VmaWords]:
        """Words per VMA in address order (a VMA read in pieces comes as several items)."""
        for window in self.windows(vmas):
            for vma in window.vmas:
                yield VmaWords(vma, max(vma.start, window.start), window.words_of(vma))

    def find(self, vmas: Sequence[Vma], bits: int) -> Runs:
        """Pages inside ``vmas`` whose pagemap entry has any of ``bits`` set (e.g. PM_SOFT_DIRTY)."""
        mask = np.uint64(bits)
        found: list[U64] = []
        for window in self.windows(vmas):
            idx = np.flatnonzero(window.words & mask).astype(np.uint64)
            if idx.size == 0:
                continue
            addrs = np.uint64(window.start) + (idx << np.uint64(_PAGE_SHIFT))
            if window.cached:
                addrs = addrs[_inside(addrs, window.vmas)]
            found.append(addrs)
        if not found:
            return Runs.empty()
        return Runs.from_page_addrs(np.concatenate(found), PAGE_SIZE)

    def _pread_words(self, page: int, count: int) -> U64:
        words = np.empty(count, dtype=np.uint64)
        view = words.data.cast("B")
        offset, done = page * _WORD, 0
        while done < len(view):
            with translate_errors(self.pid, self._proc_root):
                n = os.preadv(self._fd, [view[done:]], offset + done)
            self.reads += 1
            if n == 0:
                self._raise_eof((offset + done) // _WORD << _PAGE_SHIFT)
            done += n
            self.bytes_read += n
        return words

    def _raise_eof(self, vaddr: int) -> None:
        with translate_errors(self.pid, self._proc_root):
            alive = len(os.pread(self._fd, _WORD, 0)) == _WORD
        if not alive:
            raise ProcessGone(self.pid, f"process {self.pid} exited while its pagemap was read")
        raise ProcessError(self.pid, f"pagemap of process {self.pid} ends before 0x{vaddr:x} "
                                     "(address beyond the user address space?)")


def _inside(addrs: U64, vmas: tuple[Vma, ...]) -> npt.NDArray[np.bool_]:
    """Which sorted addresses fall inside one of the sorted, disjoint ``vmas``."""
    starts = np.fromiter((v.start for v in vmas), np.uint64, len(vmas))
    ends = np.fromiter((v.end for v in vmas), np.uint64, len(vmas))
    return in_ranges(addrs, starts, ends)

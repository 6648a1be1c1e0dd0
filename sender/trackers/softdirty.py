"""Dirty tracking with the kernel's soft-dirty bits, read through pagemap or PAGEMAP_SCAN.

Some facts about soft-dirty (Documentation/admin-guide/mm/soft-dirty.rst,
fs/proc/task_mmu.c):

* Writing ``4`` to ``/proc/PID/clear_refs`` clears the soft-dirty bit of every pte of the whole
  mm and write-protects the ptes; the next write to a page faults and sets the bit again. The
  bit shows as bit 55 (``PM_SOFT_DIRTY``) of the page's pagemap entry, and as
  ``PAGE_IS_SOFT_DIRTY`` in PAGEMAP_SCAN results (6.8; 6.7 has the ioctl but answers EINVAL
  for that category, criu issue #2334). A swapped-out page keeps its bit in the swap pte.
* New and expanded VMAs carry ``VM_SOFTDIRTY``: every page of them, even an unpopulated one,
  reads as soft-dirty until the next clear, because an unmapped-then-remapped range would
  otherwise look clean. Merges and mremap therefore over-report, never under-report.
* There is no atomic read-and-clear. A page written after its bit was read and before the
  clear would lose its bit, so both happen with the target frozen: ``needs_freeze`` is True,
  and the agent calls :meth:`collect` between freeze and thaw. The page contents are read
  later, while the target runs again; a write after the clear sets the bit again and the page
  is reported next round, so a page torn by a concurrent write is always sent again. This is
  the order of CRIU's pre-dump (criu/mem.c: pagemap read, ``task_reset_dirty_track``, unfreeze,
  then the pages are read).
* Soft-dirty needs ``CONFIG_MEM_SOFT_DIRTY``, which needs ``HAVE_ARCH_SOFT_DIRTY``: x86-64,
  ppc64 and s390 have it, arm64 does not (it uses uffd-wp instead). Most x86-64 distribution
  kernels enable it; some cloud and VM kernels do not. Without it clear_refs still accepts
  ``4`` and PAGEMAP_SCAN still accepts the category, but no bit is ever set, so the probes
  below write, clear and write a page of their own and look for the bit (CRIU's
  ``kerndat_get_dirty_track`` in criu/kerndat.c), and :meth:`start` refuses to run without it:
  a tracker that never reports a page would silently lose every write.

Which tracker for which kernel:

| tracker                | needs                                  | cost per collect                   |
|------------------------|----------------------------------------|------------------------------------|
| ``soft-dirty-scan``    | Linux >= 6.8, CONFIG_MEM_SOFT_DIRTY    | the kernel walks and filters; only |
|                        |                                        | dirty runs come back               |
| ``soft-dirty-pagemap`` | Linux >= 3.11, CONFIG_MEM_SOFT_DIRTY   | 8 bytes of pagemap per page of     |
|                        |                                        | every VMA, in 2 MiB-window reads   |

On arm64, and on kernels built without soft-dirty, use ``uffd-wp`` (6.7) or ``hash``.

Both treat a VMA they did not see at the previous collect (or at start) as wholly dirty, on
top of the kernel's ``VM_SOFTDIRTY``, so a kernel quirk there cannot hide a new mapping. A VMA
is identified by its bounds; one that grew or was split is "unseen" too, which matches the
kernel marking expanded VMAs soft-dirty.

Writing to clear_refs resets soft-dirty for the whole mm, also for any other soft-dirty user
of the same process (another CRIU pre-dump): two such users cannot share a process.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from pagehaul import kernel
from pagehaul.errors import KernelUnsupported, ProcessGone
from pagehaul.kernel import PAGE_SIZE
from pagehaul.procfs import PROC_ROOT, Vma, translate_errors
from pagehaul.runs import Runs
from sender.freezer import PtraceFreezer
from sender.pagemap_cache import PagemapCache
from sender.scanner import SCAN_VEC_LEN, runs_from_regions, vma_spans
from sender.trackers.base import Availability

log = logging.getLogger(__name__)

_PAGE_SHIFT: Final = PAGE_SIZE.bit_length() - 1

# fs/proc/task_mmu.c enum clear_refs_types: CLEAR_REFS_SOFT_DIRTY = 4.
CLEAR_REFS_SOFT_DIRTY: Final = b"4"

CONFIG_OFF_REASON: Final = "CONFIG_MEM_SOFT_DIRTY is off: bit 55 never sets (typical of arm64 and some VMs)"

#: ``scan_fn(fd, arg, vec)`` runs PAGEMAP_SCAN with ``arg`` on the pagemap ``fd``; ``vec`` is
#: the numpy ``PAGE_REGION_DTYPE`` array ``arg.vec`` points at. Returns the regions written.
ScanFn = Callable[[int, kernel.pm_scan_arg, npt.NDArray[np.void]], int]


def ioctl_scan(fd: int, arg: kernel.pm_scan_arg, vec: npt.NDArray[np.void]) -> int:
    """The real :data:`ScanFn`: the ioctl fills ``vec`` through the address in ``arg.vec``."""
    return kernel.pagemap_scan(fd, arg)


# === trackers ================================================================================


class _SoftDirtyTracker:
    """Shared frame: clear at start, then read-then-clear at every collect, new VMAs dirty."""

    name: str
    wire: int
    needs_freeze: bool = True

    def __init__(self, pid: int, proc_root: Path, verify_kernel: bool) -> None:
        self.pid = pid
        self._proc_root = proc_root
        self._verify_kernel = verify_kernel
        self._seen: frozenset[tuple[int, int]] | None = None
        self.clears = 0  # clear_refs writes, for stats and tests

    def start(self, vmas: Sequence[Vma], freezer: PtraceFreezer) -> None:
        """Clear every soft-dirty bit (target frozen by the caller). Round 0 sends every present
        page anyway; from here on a write sets its page's bit."""
        if self._verify_kernel:
            availability = self._availability()
            if not availability.available:
                raise KernelUnsupported(f"{self.name} tracker unavailable: {availability.reason}")
        self._clear_refs()
        self._seen = _vma_keys(vmas)

    def collect(self, vmas: Sequence[Vma], present: Runs) -> Runs:
        """Soft-dirty pages of ``vmas`` plus every VMA unseen last time, then clear.

        Must run with the target frozen (see the module docstring). ``present`` is not needed:
        the result may include pages that are not present, which the caller drops.
        """
        if self._seen is None:
            raise RuntimeError(f"{self.name} tracker: collect() before start()")
        dirty = self._read_soft_dirty(vmas)
        self._clear_refs()
        unseen = [v for v in vmas if (v.start, v.end) not in self._seen]
        self._seen = _vma_keys(vmas)
        log.debug("soft-dirty collect tracker=%s pid=%d dirty_pages=%d unseen_vmas=%d",
                  self.name, self.pid, dirty.total_pages, len(unseen))
        if not unseen:
            return dirty
        new = Runs.of([v.start for v in unseen], [v.size_bytes >> _PAGE_SHIFT for v in unseen]).sorted()
        return union(dirty, new)

    def close(self) -> None:
        """Nothing to disarm: soft-dirty bits cost the target nothing but a fault per page."""

    def _read_soft_dirty(self, vmas: Sequence[Vma]) -> Runs:
        raise NotImplementedError

    def _availability(self) -> Availability:
        raise NotImplementedError

    def _clear_refs(self) -> None:
        path = self._proc_root / str(self.pid) / "clear_refs"
        try:
            with translate_errors(self.pid, self._proc_root):
                fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.write(fd, CLEAR_REFS_SOFT_DIRTY)
                finally:
                    os.close(fd)
        except OSError as err:
            if err.errno in (errno.EINVAL, errno.ENOENT):
                raise KernelUnsupported(f"cannot reset soft-dirty bits of process {self.pid} "
                                        f"({err.strerror}: {path})") from err
            raise
        self.clears += 1


class SoftDirtyPagemapTracker(_SoftDirtyTracker):
    """Soft-dirty bit 55 of ``/proc/PID/pagemap``, read through :class:`PagemapCache`.

    ``verify_kernel`` probes the running kernel in :meth:`start` and refuses to track without
    working soft-dirty bits; a fake procfs root (tests) is not backed by this kernel, so tests
    on one pass False.
    """

    name: str = "soft-dirty-pagemap"

    def __init__(self, pid: int, proc_root: Path = PROC_ROOT, *, verify_kernel: bool = True) -> None:
        super().__init__(pid, proc_root, verify_kernel)
        self.cache = PagemapCache(pid, proc_root)

    @staticmethod
    def probe() -> Availability:
        return probe_pagemap()

    def close(self) -> None:
        self.cache.close()

    def _read_soft_dirty(self, vmas: Sequence[Vma]) -> Runs:
        return self.cache.find(vmas, kernel.PM_SOFT_DIRTY)

    def _availability(self) -> Availability:
        return probe_pagemap()


class SoftDirtyScanTracker(_SoftDirtyTracker):
    """Soft-dirty runs from PAGEMAP_SCAN (``category_mask = return_mask = PAGE_IS_SOFT_DIRTY``).

    ``scan_fn`` replaces the ioctl: a regular file in a fake procfs cannot take it, so tests
    pass a function that derives ``page_region`` results from synthetic pagemap words.
    ``verify_kernel`` as for :class:`SoftDirtyPagemapTracker`.
    """

    name: str = "soft-dirty-scan"

    def __init__(self, pid: int, proc_root: Path = PROC_ROOT, *, scan_fn: ScanFn = ioctl_scan,
                 vec_len: int = SCAN_VEC_LEN, verify_kernel: bool = True) -> None:
        super().__init__(pid, proc_root, verify_kernel)
        self._scan_fn = scan_fn
        self._vec = np.zeros(vec_len, dtype=kernel.PAGE_REGION_DTYPE)
        self._arg = kernel.pm_scan_arg(
            size=0, flags=0, vec=self._vec.ctypes.data, vec_len=vec_len, max_pages=0,
            category_inverted=0, category_mask=kernel.PAGE_IS_SOFT_DIRTY, category_anyof_mask=0,
            return_mask=kernel.PAGE_IS_SOFT_DIRTY,
        )
        with translate_errors(pid, proc_root):
            self._fd = os.open(proc_root / str(pid) / "pagemap", os.O_RDONLY | os.O_CLOEXEC)
        self.ioctls = 0  # scan calls made, for stats and tests

    @staticmethod
    def probe() -> Availability:
        return probe_scan()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _availability(self) -> Availability:
        return probe_scan()

    def _read_soft_dirty(self, vmas: Sequence[Vma]) -> Runs:
        starts, ends = vma_spans(vmas)
        parts: list[npt.NDArray[np.void]] = []
        arg, vec, vec_len = self._arg, self._vec, self._vec.size
        for span_start, end in zip(starts.tolist(), ends.tolist(), strict=True):
            # The same robust walk as sender.scanner.PagemapScanScanner: a full vector may leave
            # walk_end before regions already returned (the quirk in sender.scanner's module doc), so
            # resume at the later of walk_end and the last region's end.
            start = span_start
            while start < end:
                arg.start, arg.end, arg.walk_end = start, end, 0
                with translate_errors(self.pid, self._proc_root):
                    n = self._scan_fn(self._fd, arg, vec)
                self.ioctls += 1
                if n:
                    parts.append(vec[:n].copy())  # the vector is reused by the next call
                if n < vec_len:
                    break
                start = max(int(arg.walk_end), int(vec[n - 1]["end"]))
        if starts.size:
            self._check_alive(int(starts[0]))
        if not parts:
            return Runs.empty()
        return runs_from_regions(np.concatenate(parts))

    def _check_alive(self, vaddr: int) -> None:
        # A gone mm scans as empty, like a clean one; only a read tells them apart.
        with translate_errors(self.pid, self._proc_root):
            if len(os.pread(self._fd, 8, (vaddr >> _PAGE_SHIFT) * 8)) == 0:
                raise ProcessGone(self.pid, f"process {self.pid} exited while its soft-dirty bits were read")


# === helpers =================================================================================


def _vma_keys(vmas: Sequence[Vma]) -> frozenset[tuple[int, int]]:
    return frozenset((v.start, v.end) for v in vmas)


def union(a: Runs, b: Runs, page_size: int = PAGE_SIZE) -> Runs:
    """Pages in ``a`` or ``b`` (each sorted and disjoint; they may overlap each other), merged."""
    both = Runs.concat([a, b])
    if len(both) == 0:
        return Runs.empty()
    order = np.argsort(both.vaddr, kind="stable")
    starts = both.vaddr[order]
    ends = np.maximum.accumulate(starts + both.nr_pages[order] * np.uint64(page_size))
    new_run = np.concatenate(([True], starts[1:] > ends[:-1]))
    first = np.flatnonzero(new_run)
    last = np.concatenate((first[1:] - 1, [len(starts) - 1]))
    return Runs(starts[first], ((ends[last] - starts[first]) // np.uint64(page_size)).astype(np.uint64))


# === probes ==================================================================================


def probe_pagemap() -> Availability:
    """Whether bit 55 of /proc/PID/pagemap tracks writes on this kernel (probed on ourselves)."""
    name = SoftDirtyPagemapTracker.name
    try:
        reason = _probe_bit(via_scan=False)
    except OSError as err:
        return Availability(name, False, f"soft-dirty probe failed: {err}")
    if reason is not None:
        return Availability(name, False, reason)
    return Availability(name, True, "pagemap bit 55 is set by a write after clear_refs 4")


def probe_scan() -> Availability:
    """Whether PAGEMAP_SCAN reports PAGE_IS_SOFT_DIRTY that tracks writes (probed on ourselves)."""
    name = SoftDirtyScanTracker.name
    try:
        reason = _probe_bit(via_scan=False)
        if reason is None:
            reason = _probe_scan_category()
        if reason is None and _probe_bit(via_scan=True) is not None:
            reason = "PAGEMAP_SCAN does not report PAGE_IS_SOFT_DIRTY although pagemap bit 55 works"
    except OSError as err:
        return Availability(name, False, f"soft-dirty probe failed: {err}")
    if reason is not None:
        return Availability(name, False, reason)
    return Availability(name, True, "PAGEMAP_SCAN reports PAGE_IS_SOFT_DIRTY for a write after clear_refs 4")


def _clear_self() -> str | None:
    try:
        fd = os.open("/proc/self/clear_refs", os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return "no /proc/self/clear_refs (CONFIG_PROC_PAGE_MONITOR is off)"
    try:
        os.write(fd, CLEAR_REFS_SOFT_DIRTY)
    except OSError as err:
        if err.errno == errno.EINVAL:
            return "clear_refs rejects 4: the kernel predates soft-dirty (3.11)"
        raise
    finally:
        os.close(fd)
    return None


def _probe_bit(via_scan: bool) -> str | None:
    """Write a fresh page, clear, check it is clean, write again, check it is dirty.

    Returns None when soft-dirty works, else why not. Clearing our own soft-dirty bits is
    harmless: nothing tracks the agent itself.
    """
    if (reason := _clear_self()) is not None:
        return reason
    region = mmap.mmap(-1, PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        view = np.frombuffer(region, dtype=np.uint8)
        try:
            addr = int(view.ctypes.data)
            view[0] = 1  # populate the page
            if (reason := _clear_self()) is not None:
                return reason
            after_clear = _self_soft_dirty(fd, addr, via_scan)
            view[0] = 2  # a write fault on the now write-protected pte sets the bit
            after_write = _self_soft_dirty(fd, addr, via_scan)
        finally:
            del view  # the mmap cannot close while a buffer export is alive
    finally:
        os.close(fd)
        region.close()
    if not after_write:
        return CONFIG_OFF_REASON
    if after_clear:
        return "writing 4 to clear_refs did not clear the soft-dirty bit"
    return None


def _self_soft_dirty(fd: int, addr: int, via_scan: bool) -> bool:
    if not via_scan:
        word = int.from_bytes(os.pread(fd, 8, (addr >> _PAGE_SHIFT) * 8), "little")
        return bool(word & kernel.PM_SOFT_DIRTY)
    vec = np.zeros(1, dtype=kernel.PAGE_REGION_DTYPE)
    arg = kernel.pm_scan_arg(start=addr, end=addr + PAGE_SIZE, vec=vec.ctypes.data, vec_len=1,
                             category_mask=kernel.PAGE_IS_SOFT_DIRTY, return_mask=kernel.PAGE_IS_SOFT_DIRTY)
    return kernel.pagemap_scan(fd, arg) == 1


def _probe_scan_category() -> str | None:
    """Whether PAGEMAP_SCAN exists and knows PAGE_IS_SOFT_DIRTY (a zero-length walk)."""
    here = PAGE_SIZE
    arg = kernel.pm_scan_arg(start=here, end=here, category_mask=kernel.PAGE_IS_SOFT_DIRTY,
                             return_mask=kernel.PAGE_IS_SOFT_DIRTY)
    fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        kernel.pagemap_scan(fd, arg)
    except OSError as err:
        if err.errno == errno.ENOTTY:
            return "kernel < 6.7: no PAGEMAP_SCAN ioctl"
        if err.errno == errno.EINVAL:
            return "kernel < 6.8: PAGEMAP_SCAN does not know PAGE_IS_SOFT_DIRTY (6.7 answers EINVAL)"
        raise
    finally:
        os.close(fd)
    return None

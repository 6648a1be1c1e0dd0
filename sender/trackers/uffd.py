"""Dirty tracking with userfaultfd asynchronous write-protection and PAGEMAP_SCAN (Linux >= 6.7).

The sender creates a userfaultfd inside the target (one injected system call), takes a copy of
it with pidfd_getfd(), closes the target's copy (a second injected call), and from then on
drives everything from its own process: it registers the target's VMAs for write-protect
tracking, write-protects them once, and each round asks PAGEMAP_SCAN for the pages written
since, re-protecting them in the same ioctl. The target never sees a fault message: in async
mode the kernel resolves the write fault itself: one minor fault per page on its first write in
a round.

Some facts about uffd-wp async (Documentation/admin-guide/mm/userfaultfd.rst, pagemap.rst,
fs/userfaultfd.c, fs/proc/task_mmu.c, mm/memory.c;
observed on 6.18):

* A userfaultfd is bound to the mm of the process that calls ``userfaultfd()``, so that call
  runs inside the target (``sender.inject``). ``UFFDIO_API``, ``UFFDIO_REGISTER`` and
  PAGEMAP_SCAN work on the copy from here. ``UFFD_USER_MODE_ONLY`` (5.11) lets an unprivileged
  target create it despite ``vm.unprivileged_userfaultfd = 0``; async write-protect faults are
  resolved in the kernel without a handler, so kernel-mode writes (read() into a protected
  page) work too (checked: they succeed and are reported).
* ``UFFD_FEATURE_WP_ASYNC`` (6.7) implies ``UFFD_FEATURE_WP_UNPOPULATED``; without it UFFDIO_API
  fails with EINVAL. With async WP as the only mode every VMA type may be registered, except
  VM_DROPPABLE (EINVAL); a VMA already registered with another userfaultfd (the target's own)
  gives EBUSY. Such VMAs are reported wholly dirty every round. UFFDIO_UNREGISTER refuses
  (EINVAL) ranges of another userfaultfd, and accepts ranges with holes.
* Registration lives in the VMA. A new mmap is not registered; an mremap that moves a VMA
  drops it (no UFFD_FEATURE_EVENT_REMAP); a mapping replaced in place (MAP_FIXED) is a new,
  unregistered VMA with the old bounds; growing in place keeps the registration, but the grown
  part was never protected. Each round finds them: grown parts by comparing the VMAs with the
  ranges armed so far, the rest by asking the kernel which ranges are not registered (a
  PAGEMAP_SCAN of ``category_inverted = category_mask = PAGE_IS_WPALLOWED``, which skips
  registered VMAs without walking them). Such parts are armed and reported wholly dirty.
* UFFDIO_REGISTER and UFFDIO_UNREGISTER split a VMA whose bounds the range cuts, and the
  target notices: mremap() of its whole mapping then fails with EFAULT (seen with a target
  that resizes mappings in a loop while bounds read a moment earlier were registered).
  Registration therefore happens only with the target stopped, whole VMAs read from /proc at
  that moment: in :meth:`start`, and in :meth:`collect` by a brief freeze of its own when the
  kernel reports unregistered ranges (or under the agent's freeze in the final round).
  Nothing is ever unregistered explicitly (see :meth:`close`).
* Write-protecting: PAGEMAP_SCAN with ``PM_SCAN_WP_MATCHING`` and no output vector takes the
  kernel's "exclusive WP" path: every pte of the range is protected, never-populated ones get
  a uffd-wp PTE marker, and missing page tables are allocated for them (2 MiB of page tables
  per GiB protected). Measured for 1 GiB: 1.8 ms populated, 0.8 ms never touched;
  UFFDIO_WRITEPROTECT takes 5.9 ms and 0.8 ms. With an output vector and
  ``category_anyof_mask = PRESENT | SWAPPED`` only populated ptes are protected, no table is
  allocated (0.04 ms for 1 GiB never touched). Markers make the answers exact, so VMAs are
  protected fully, except PROT_NONE VMAs and VMAs above ``full_protect_max_bytes``
  (reservations of many GiB, where the page tables would cost more than the precision is
  worth): there only populated pages are protected.
* Collecting: PAGEMAP_SCAN with ``PM_SCAN_WP_MATCHING``, ``category_mask = return_mask =
  PAGE_IS_WRITTEN`` and ``category_anyof_mask = PRESENT | SWAPPED`` reports every populated pte
  without uffd-wp (a written page, a zero-page mapping) and protects it in the same step, so
  nothing written between two collects is lost. Empty ptes (zapped by MADV_DONTNEED, never
  populated) are left alone: they hold no data to send, and a write that populates one leaves
  it without uffd-wp, so the next collect reports it. Without the anyof mask the scan would mark
  every empty pte of the range each round, which made collects of big sparse mappings 7x slower
  (4 GiB mapping, 1 % written: scan 20.4 -> 1.4 ms). Missing page tables are neither reported nor
  allocated.
* ``PM_SCAN_CHECK_WPASYNC`` is not used for collecting: one unregistered VMA in the range fails
  the whole call with EPERM after earlier pages were already re-protected, which would lose
  their WRITTEN bits. Without it a WP_MATCHING scan silently skips unregistered VMAs
  (``pagemap_scan_test_walk()``), and the not-registered scan above covers them.
* A write into a write-protected transparent huge page splits it and only the 4 KiB page is
  reported (async mode: ``do_huge_pmd_wp_page()`` splits; observed AnonHugePages dropping to 0
  for the written THPs). Exact, but the target loses those huge pages while tracked.
* uffd-wp markers of never-touched pages look like swap entries to the page scanners; see
  ``sender.scanner``, which drops them.
* When the last reference to the userfaultfd is closed the kernel unregisters every VMA whole
  and clears all uffd-wp bits and markers (``userfaultfd_release()`` ->
  ``userfaultfd_clear_vma()`` -> ``uffd_wp_range(..., false)``). The target's copy is closed
  right after pidfd_getfd(), so ours is the last reference and :meth:`close` only closes it.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from pagehaul import kernel
from pagehaul.errors import AccessDenied, AlreadyTraced, KernelUnsupported, ProcessGone
from pagehaul.kernel import PAGE_SIZE
from pagehaul.killpoints import killpoint
from pagehaul.procfs import PROC_ROOT, Vma, read_maps, read_status, select_dumpable, translate_errors
from pagehaul.runs import U64, Runs
from sender import arch_x86_64 as arch
from sender.freezer import PtraceFreezer
from sender.inject import Injector
from sender.inject_guard import InjectGuard, guarded_stop, linked_fds
from sender.scanner import SCAN_VEC_LEN, probe_pagemap_scan, scan_span, vma_spans
from sender.trackers.base import Availability

log = logging.getLogger(__name__)


# VMAs larger than this are write-protected only where populated (module comment): protecting
# never-touched pages costs 2 MiB of page tables per GiB in the target.
FULL_PROTECT_MAX_BYTES: Final = 4 << 30

_UFFD_FLAGS: Final = os.O_CLOEXEC | os.O_NONBLOCK
_UFFD_LINK: Final = "anon_inode:[userfaultfd]"  # what /proc/PID/fd/N reads for one
_FEATURES: Final = kernel.UFFD_FEATURE_WP_ASYNC | kernel.UFFD_FEATURE_WP_UNPOPULATED
_POPULATED: Final = kernel.PAGE_IS_PRESENT | kernel.PAGE_IS_SWAPPED
# Registration errors after which a VMA is reported wholly dirty instead of tracked.
_REFUSED_ERRNOS: Final = frozenset({errno.EINVAL, errno.EBUSY, errno.EPERM})

# Byte intervals [start, end) as two sorted uint64 arrays, disjoint and not touching.
Intervals = tuple[U64, U64]


class UffdWpTracker:
    """Pages written since the last collect, from uffd async write-protection.

    :meth:`start` needs the target frozen by a :class:`PtraceFreezer` (one system call is
    injected into a stopped thread); :meth:`collect` runs while the target runs. Every method
    must be called from one thread at a time; only :meth:`start` has to be on the freezer's.
    """

    name: str = "uffd-wp"
    needs_freeze: bool = False

    def __init__(self, pid: int, proc_root: Path = PROC_ROOT, *, vec_len: int = SCAN_VEC_LEN,
                 full_protect_max_bytes: int = FULL_PROTECT_MAX_BYTES) -> None:
        self.pid = pid
        self._proc_root = proc_root
        self._full_protect_max_bytes = full_protect_max_bytes
        self._uffd = -1
        self._pagemap_fd = -1
        self._vec = np.zeros(vec_len, dtype=kernel.PAGE_REGION_DTYPE)
        self._armed: Intervals = _empty()  # registered with our uffd and write-protected
        self._refused: Intervals = _empty()  # registration refused: always dirty
        self._started = False
        self.ioctls = 0  # PAGEMAP_SCAN and UFFDIO_* calls, for stats and tests
        # Started now (once per sender process), so its start-up overlaps whatever comes before
        # start(): the agent opens its session in between.
        InjectGuard.shared()

    @staticmethod
    def probe() -> Availability:
        return probe()

    @property
    def armed_bytes(self) -> int:
        return _size(self._armed)

    @property
    def refused_bytes(self) -> int:
        return _size(self._refused)

    # --- DirtyTracker ---------------------------------------------------------------------

    def start(self, vmas: Sequence[Vma], freezer: PtraceFreezer) -> None:
        """Create the userfaultfd inside the frozen target, register and write-protect ``vmas``."""
        if self._started:
            raise RuntimeError(f"uffd-wp tracker for process {self.pid} already started")
        if freezer.pid != self.pid:
            raise ValueError(f"freezer holds process {freezer.pid}, the tracker is for {self.pid}")
        self._started = True
        started_ns = time.monotonic_ns()
        try:
            with translate_errors(self.pid, self._proc_root):
                self._pagemap_fd = os.open(self._proc_root / str(self.pid) / "pagemap", os.O_RDONLY | os.O_CLOEXEC)
            self._uffd = self._take_uffd(freezer)
            self._handshake()
            self._register_current(_spans(vmas))  # frozen by ``freezer``
        except BaseException:
            self.close()
            raise
        log.info("uffd-wp tracking started pid=%d vmas=%d armed_bytes=%d refused_bytes=%d took_us=%d",
                 self.pid, len(vmas), self.armed_bytes, self.refused_bytes,
                 (time.monotonic_ns() - started_ns) // 1000)

    def collect(self, vmas: Sequence[Vma], present: Runs) -> Runs:
        """Written pages since the last collect, re-protected atomically; unarmed parts wholly.

        Runs while the target runs. Only when a VMA is found that is not registered (new,
        moved, replaced) is the target frozen for a moment to register it: see
        :meth:`_register_frozen`.
        """
        if self._uffd < 0:
            raise RuntimeError(f"uffd-wp tracker for process {self.pid} is not started (or closed)")
        spans = _spans(vmas)
        self._refused = _intersect(self._refused, spans)
        armed = _intersect(self._armed, spans)  # munmapped parts are forgotten
        written = self._scan(_subtract(armed, self._refused), flags=kernel.PM_SCAN_WP_MATCHING,
                             mask=kernel.PAGE_IS_WRITTEN, returned=kernel.PAGE_IS_WRITTEN, anyof=_POPULATED)
        self._check_alive()
        # The kernel's view: ranges no userfaultfd async-WP registration covers (new, moved or
        # replaced mappings; refused ones too, which are accounted for separately).
        unregistered = _subtract(self._scan(spans, flags=0, mask=kernel.PAGE_IS_WPALLOWED, returned=0,
                                            inverted=kernel.PAGE_IS_WPALLOWED), self._refused)
        # Registered but never write-protected: a VMA that grew in place keeps its registration.
        grown = _subtract(_subtract(spans, _union(armed, unregistered)), self._refused)
        self._armed = _subtract(armed, unregistered)
        for start, end, vma in _clip_to_vmas(grown, vmas):
            self._protect(start, end, self._full(vma))
        self._armed = _union(self._armed, grown)
        registered = self._register_frozen(spans) if unregistered[0].size else _empty()
        dirty = _union(_union(_union(written, grown), _union(unregistered, registered)), self._refused)
        log.debug("uffd-wp collect pid=%d written_pages=%d grown_pages=%d unregistered_pages=%d "
                  "registered_pages=%d refused_pages=%d", self.pid, _size(written) // PAGE_SIZE,
                  _size(grown) // PAGE_SIZE, _size(unregistered) // PAGE_SIZE, _size(registered) // PAGE_SIZE,
                  _size(self._refused) // PAGE_SIZE)
        return _to_runs(dirty)

    def release(self, vmas: Sequence[Vma]) -> None:
        """Stop tracking ``vmas``, each a whole VMA of the stopped target as it is now
        (UFFDIO_UNREGISTER of exactly its range splits nothing).

        Unregistering clears the write protection and the uffd-wp markers on the VMA's
        unpopulated pages, which another reader of the page tables takes for swapped pages
        (PAGE_IS_SWAPPED, PM_SWAP): ``criu dump`` would read and dump every untouched page of a
        file mapping from the file.
        """
        if self._uffd < 0:
            return
        for vma in vmas:
            arg = kernel.uffdio_range(start=vma.start, len=vma.size_bytes)
            try:
                kernel.uffdio_unregister_ioctl(self._uffd, arg)
            except OSError as err:
                if err.errno != errno.EINVAL:  # EINVAL: not a registered VMA (any more)
                    raise
            self.ioctls += 1
        self._armed = _subtract(self._armed, _spans(vmas))

    def close(self) -> None:
        """Close our userfaultfd copy (the last reference) and the pagemap fd; idempotent.

        No UFFDIO_UNREGISTER: ranges recorded earlier may no longer match the target's VMAs,
        and unregistering part of a VMA splits it (a later mremap of the whole mapping then fails
        with EFAULT in the target). Releasing the last reference clears every registered VMA
        whole, with its uffd-wp bits and markers, and lets the kernel merge it with its
        neighbours again (``userfaultfd_release()``).
        """
        if self._uffd >= 0:
            os.close(self._uffd)
            self._uffd = -1
        if self._pagemap_fd >= 0:
            os.close(self._pagemap_fd)
            self._pagemap_fd = -1
        self._armed = self._refused = _empty()

    # --- start ----------------------------------------------------------------------------

    def _take_uffd(self, freezer: PtraceFreezer) -> int:
        """userfaultfd() inside the target, a copy here, the target's copy closed again.

        Both calls are injected with the target in group-stop and told to the injection guard,
        and so is the fd while the target holds it: if we die anywhere in between, the guard
        puts the target back as it was (sender.inject_guard).
        """
        guard = InjectGuard.shared()
        with guarded_stop(freezer, guard):
            guard.own(self.pid, _UFFD_LINK, linked_fds(self.pid, _UFFD_LINK, self._proc_root))
            try:
                return self._take_uffd_stopped(Injector.for_freezer(freezer, guard=guard))
            finally:
                guard.disown(self.pid)

    def _take_uffd_stopped(self, injector: Injector) -> int:
        remote = self._inject_userfaultfd(injector)
        killpoint("uffd.created")
        local = -1
        try:
            with translate_errors(self.pid, self._proc_root):
                pidfd = kernel.pidfd_open(self.pid)
                try:
                    local = kernel.pidfd_getfd(pidfd, remote)
                finally:
                    os.close(pidfd)
            killpoint("uffd.taken")
        finally:
            # The target must not keep the fd: its copy would keep the registration alive
            # after we close ours, and the target would own an fd it never asked for.
            try:
                injector.syscall(arch.NR_close, remote)
            except BaseException:
                if local >= 0:
                    os.close(local)
                raise
        killpoint("uffd.closed")
        return local

    def _inject_userfaultfd(self, injector: Injector) -> int:
        for extra in (kernel.UFFD_USER_MODE_ONLY, 0):
            try:
                return injector.syscall(arch.NR_userfaultfd, _UFFD_FLAGS | extra)
            except OSError as err:
                if err.errno == errno.EINVAL and extra:
                    continue  # before 5.11 UFFD_USER_MODE_ONLY is unknown
                if err.errno == errno.ENOSYS:
                    raise KernelUnsupported("userfaultfd is not available in this kernel "
                                            "(built without CONFIG_USERFAULTFD)") from err
                if err.errno == errno.EPERM:
                    raise AccessDenied(self.pid, f"userfaultfd() refused inside process {self.pid} "
                                                 "(vm.unprivileged_userfaultfd, seccomp or an LSM)") from err
                raise
        raise AssertionError("unreachable")

    def _handshake(self) -> None:
        api = kernel.uffdio_api(api=kernel.UFFD_API, features=_FEATURES)
        try:
            kernel.uffdio_api_ioctl(self._uffd, api)
        except OSError as err:
            if err.errno == errno.EINVAL:
                raise KernelUnsupported(_NO_WP_ASYNC) from err
            raise
        self.ioctls += 1
        if not api.features & kernel.UFFD_FEATURE_WP_ASYNC:
            raise KernelUnsupported(_NO_WP_ASYNC)

    # --- arming ---------------------------------------------------------------------------

    def _register_frozen(self, spans: Intervals) -> Intervals:
        """Register the unregistered VMAs in ``spans`` with the target stopped; returns them.

        UFFDIO_REGISTER splits a VMA when the range ends inside it, and a split is visible to
        the target: mremap() of its whole mapping fails with EFAULT afterwards. VMA bounds read
        while the target runs can be stale by the time the ioctl runs, so registration only
        happens while the target is stopped, with bounds read then, whole VMAs at a time. If
        the agent already holds the target (the final round) that is used; if another tracer
        holds it, nothing is registered and the VMAs stay wholly dirty until a later round.
        """
        tracer = read_status(self.pid, self._proc_root).tracer_pid
        if tracer == os.getpid():
            return self._register_current(spans)
        try:
            with PtraceFreezer(self.pid, self._proc_root) as freezer:
                log.debug("uffd-wp froze pid=%d threads=%d to register new VMAs", self.pid, len(freezer.threads))
                return self._register_current(spans)
        except AlreadyTraced as err:
            log.warning("uffd-wp cannot stop pid=%d to register new VMAs (traced by %d); they stay "
                        "reported as wholly dirty", self.pid, err.tracer_pid)
            return _empty()

    def _register_current(self, spans: Intervals) -> Intervals:
        """Register and write-protect every whole VMA in ``spans`` that is not registered yet.

        The target must be stopped: VMAs are read from /proc now and registered whole.
        """
        current = [v for v in select_dumpable(read_maps(self.pid, self._proc_root))
                   if _overlaps(spans, v.start, v.end)]
        if not current:
            return _empty()
        unregistered = self._scan(_spans(current), flags=0, mask=kernel.PAGE_IS_WPALLOWED, returned=0,
                                  inverted=kernel.PAGE_IS_WPALLOWED)
        armed: list[tuple[int, int]] = []
        refused: list[tuple[int, int]] = []
        for vma in current:
            if not _covers(unregistered, vma.start, vma.end) or _overlaps(self._refused, vma.start, vma.end):
                continue
            if not self._register(vma):
                refused.append((vma.start, vma.end))
                continue
            self._protect(vma.start, vma.end, self._full(vma))
            armed.append((vma.start, vma.end))
        new = _intervals(armed)
        self._armed = _union(self._armed, new)
        self._refused = _union(self._refused, _intervals(refused))
        return new

    def _full(self, vma: Vma) -> bool:
        """Protect every pte (markers included), or only populated ones (module comment)?"""
        return bool(vma.prot) and vma.size_bytes <= self._full_protect_max_bytes

    def _register(self, vma: Vma) -> bool:
        arg = kernel.uffdio_register(range=kernel.uffdio_range(start=vma.start, len=vma.size_bytes),
                                     mode=kernel.UFFDIO_REGISTER_MODE_WP)
        try:
            kernel.uffdio_register_ioctl(self._uffd, arg)
        except OSError as err:
            if err.errno == errno.ESRCH:  # the uffd's mm is gone
                raise ProcessGone(self.pid, f"process {self.pid} exited while its VMAs were registered") from err
            if err.errno not in _REFUSED_ERRNOS:
                raise
            # Not trackable: reported dirty every round while it exists, so it can never leave
            # a hole that the parent image would fill with stale pages.
            log.info("uffd-wp cannot track VMA, treating it as always dirty pid=%d start=0x%x end=0x%x "
                     "path=%s errno=%s", self.pid, vma.start, vma.end, vma.path or "[anon]",
                     errno.errorcode.get(err.errno or 0, err.errno))
            return False
        finally:
            self.ioctls += 1
        return True

    def _protect(self, start: int, end: int, full: bool) -> None:
        if full:
            # No vector: the kernel's exclusive-WP path, markers on never-populated ptes.
            arg = kernel.pm_scan_arg(flags=kernel.PM_SCAN_WP_MATCHING, start=start, end=end,
                                     category_mask=kernel.PAGE_IS_WPALLOWED)
            with translate_errors(self.pid, self._proc_root):
                kernel.pagemap_scan(self._pagemap_fd, arg)
            self.ioctls += 1
            return
        arg = kernel.pm_scan_arg(flags=kernel.PM_SCAN_WP_MATCHING, vec=self._vec.ctypes.data,
                                 vec_len=self._vec.size, category_mask=kernel.PAGE_IS_WPALLOWED,
                                 category_anyof_mask=_POPULATED, return_mask=0)
        self.ioctls += scan_span(self._pagemap_fd, arg, self._vec, start, end, parts=[],
                                 pid=self.pid, proc_root=self._proc_root)

    # --- scanning -------------------------------------------------------------------------

    def _scan(self, ranges: Intervals, *, flags: int, mask: int, returned: int, inverted: int = 0,
              anyof: int = 0) -> Intervals:
        arg = kernel.pm_scan_arg(flags=flags, vec=self._vec.ctypes.data, vec_len=self._vec.size,
                                 category_inverted=inverted, category_mask=mask, category_anyof_mask=anyof,
                                 return_mask=returned)
        parts: list[npt.NDArray[np.void]] = []
        for start, end in zip(ranges[0].tolist(), ranges[1].tolist(), strict=True):
            self.ioctls += scan_span(self._pagemap_fd, arg, self._vec, start, end, parts=parts,
                                     pid=self.pid, proc_root=self._proc_root)
        if not parts:
            return _empty()
        regions = np.concatenate(parts)
        return _merge(np.ascontiguousarray(regions["start"]), np.ascontiguousarray(regions["end"]))

    def _check_alive(self) -> None:
        """Raise ProcessGone once the target's mm is gone: its pagemap then reads as empty."""
        with translate_errors(self.pid, self._proc_root):
            if len(os.pread(self._pagemap_fd, 8, 0)) == 0:
                raise ProcessGone(self.pid, f"process {self.pid} exited while its dirty pages were collected")


_NO_WP_ASYNC: Final = "userfaultfd WP_ASYNC not supported by this kernel (needs >= 6.7)"


def probe() -> Availability:
    """Whether uffd-wp tracking can work here, tried on our own process (no injection)."""
    name = UffdWpTracker.name
    if not probe_pagemap_scan():
        return Availability(name, False, "PAGEMAP_SCAN not supported by this kernel (needs >= 6.7)")
    fd = -1
    for extra in (kernel.UFFD_USER_MODE_ONLY, 0):
        try:
            fd = kernel.userfaultfd(_UFFD_FLAGS | extra)
            break
        except OSError as err:
            if err.errno == errno.EINVAL and extra:
                continue
            if err.errno == errno.ENOSYS:
                return Availability(name, False, "userfaultfd not available (kernel built without CONFIG_USERFAULTFD)")
            if err.errno == errno.EPERM:
                return Availability(name, False, "userfaultfd not permitted here "
                                                 "(vm.unprivileged_userfaultfd, seccomp or an LSM)")
            raise
    try:
        api = kernel.uffdio_api(api=kernel.UFFD_API, features=_FEATURES)
        try:
            kernel.uffdio_api_ioctl(fd, api)
        except OSError as err:
            if err.errno == errno.EINVAL:
                return Availability(name, False, _NO_WP_ASYNC)
            raise
        if not api.features & kernel.UFFD_FEATURE_WP_ASYNC:
            return Availability(name, False, _NO_WP_ASYNC)
    finally:
        os.close(fd)
    return Availability(name, True, "userfaultfd async write-protect and PAGEMAP_SCAN work")


# === byte intervals ==========================================================================


def _empty() -> Intervals:
    return np.zeros(0, np.uint64), np.zeros(0, np.uint64)


def _intervals(pairs: Sequence[tuple[int, int]]) -> Intervals:
    if not pairs:
        return _empty()
    arr = np.asarray(sorted(pairs), dtype=np.uint64)
    return _merge(np.ascontiguousarray(arr[:, 0]), np.ascontiguousarray(arr[:, 1]))


def _overlaps(iv: Intervals, start: int, end: int) -> bool:
    idx = int(np.searchsorted(iv[1], np.uint64(start), side="right"))
    return idx < iv[0].size and int(iv[0][idx]) < end


def _covers(iv: Intervals, start: int, end: int) -> bool:
    idx = int(np.searchsorted(iv[0], np.uint64(start), side="right")) - 1
    return idx >= 0 and int(iv[1][idx]) >= end


def _size(iv: Intervals) -> int:
    return int((iv[1] - iv[0]).sum(dtype=np.uint64))


def _spans(vmas: Sequence[Vma]) -> Intervals:
    return vma_spans(vmas)


def _merge(starts: U64, ends: U64) -> Intervals:
    """Sorted (by start) intervals, possibly overlapping or touching, to canonical form."""
    if starts.size == 0:
        return _empty()
    reach = np.maximum.accumulate(ends)
    new = np.concatenate(([True], starts[1:] > reach[:-1]))
    first = np.flatnonzero(new)
    last = np.concatenate((first[1:] - 1, [starts.size - 1]))
    return np.ascontiguousarray(starts[first]), np.ascontiguousarray(reach[last])


def _combine(a: Intervals, b: Intervals, keep: Callable[[npt.NDArray[np.bool_], npt.NDArray[np.bool_]],
                                                        npt.NDArray[np.bool_]]) -> Intervals:
    """Sweep over the boundaries of ``a`` and ``b``; keep the stretches where ``keep(in_a, in_b)``."""
    na, nb = a[0].size, b[0].size
    if na + nb == 0:
        return _empty()
    pos = np.concatenate((a[0], a[1], b[0], b[1]))
    one = np.ones(na, np.int64), np.ones(nb, np.int64)
    da = np.concatenate((one[0], -one[0], np.zeros(2 * nb, np.int64)))
    db = np.concatenate((np.zeros(2 * na, np.int64), one[1], -one[1]))
    order = np.argsort(pos, kind="stable")
    pos, in_a, in_b = pos[order], np.cumsum(da[order]), np.cumsum(db[order])
    last = np.concatenate((pos[1:] != pos[:-1], [True]))  # state after every boundary at a position
    pos, in_a, in_b = pos[last], in_a[last], in_b[last]
    inside = keep(in_a[:-1] > 0, in_b[:-1] > 0)
    return _merge(pos[:-1][inside], pos[1:][inside])


def _union(a: Intervals, b: Intervals) -> Intervals:
    return _combine(a, b, np.logical_or)


def _intersect(a: Intervals, b: Intervals) -> Intervals:
    return _combine(a, b, np.logical_and)


def _subtract(a: Intervals, b: Intervals) -> Intervals:
    return _combine(a, b, lambda in_a, in_b: in_a & ~in_b)


def _to_runs(iv: Intervals) -> Runs:
    return Runs(iv[0].copy(), (iv[1] - iv[0]) // np.uint64(PAGE_SIZE))


def _clip_to_vmas(pieces: Intervals, vmas: Sequence[Vma]) -> Iterator[tuple[int, int, Vma]]:
    """``pieces`` cut at VMA boundaries, each with its VMA (parts outside every VMA dropped)."""
    if pieces[0].size == 0:
        return
    p_start, p_end = pieces
    for vma in sorted(vmas, key=lambda v: v.start):
        lo = int(np.searchsorted(p_end, np.uint64(vma.start), side="right"))
        hi = int(np.searchsorted(p_start, np.uint64(vma.end), side="left"))
        for start, end in zip(p_start[lo:hi].tolist(), p_end[lo:hi].tolist(), strict=True):
            s, e = max(start, vma.start), min(end, vma.end)
            if s < e:
                yield s, e, vma


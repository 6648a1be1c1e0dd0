"""Shared anonymous memory, dumped once per object however many processes map it.

Some facts about shared memory (mm/shmem.c, ipc/shm.c, fs/proc/base.c ``map_files``;
Documentation/admin-guide/mm/pagemap.rst; CRIU criu/shmem.c):

* MAP_SHARED|MAP_ANONYMOUS, SysV segments and memfds are files on the kernel's internal shmem
  mount (``procfs.is_shared_anon`` recognises them in /proc/PID/maps). The maps line's inode is
  that file's inode, the same in every process that maps the object: CRIU's ``shmid``, which
  names ``pagemap-shmem-<shmid>.img``. Entries of that image are addressed by byte offset in the
  object (the mapping's ``pgoff`` plus the offset inside the mapping).
* ``/proc/PID/map_files/<start>-<end>`` opens the mapping's file itself (CAP_SYS_ADMIN). The fd
  keeps the object alive, so it stays readable after every process that mapped it has exited
  or unmapped it. shmem files support ``pread`` and ``lseek(SEEK_DATA/SEEK_HOLE)`` at page
  granularity, which finds every page with data, swapped-out ones included (pagemap loses those:
  a shared page's pte is cleared when it is swapped). A SysV segment's file has neither (its
  ``llseek`` is ``noop_llseek``, it has no ``read_iter``): it is mapped here and read through the
  mapping, every page of it counting as present.
* Dirty state: uffd-wp async on a shared mapping tracks the registering process's ptes only.
  Observed on 6.18 (``test_uffd_wp_misses_other_mappers``): after PM_SCAN_WP_MATCHING, a write
  through the same mapping is reported WRITTEN, but a write through a forked child's mapping of
  the same page, or a ``pwrite()`` to the object's file, is not, though the content changed.
  Soft-dirty has the same per-pte scope and loses the bit when a shared pte is zapped. A page
  can be written through any mapping, including one made and dropped between two rounds by a
  process that forked and exited meanwhile. So shared memory is tracked by content, with the
  ``hash`` tracker over the object's pages: a page is dirty when its xxh3 differs from what was
  last sent, whoever wrote it and however, which is always correct (at the price of reading the
  object's pages every round).
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from collections.abc import Sequence
from dataclasses import dataclass

from pagehaul import procfs
from pagehaul.errors import ProcessError, ProcessGone
from pagehaul.kernel import PAGE_SIZE
from pagehaul.runs import Runs
from sender.memreader import Buffer

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ShmMapping:
    """One process's mapping of a shared-memory object."""

    pid: int
    start: int
    end: int
    pgoff: int  # byte offset of ``start`` in the object
    shmid: int
    prot: int
    path: str


def shared_mappings(pid: int, entries: Sequence[procfs.MapsEntry]) -> list[ShmMapping]:
    return [ShmMapping(pid, e.start, e.end, e.pgoff, e.inode, e.prot, e.path)
            for e in entries if procfs.is_shared_anon(e)]


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


class ShmObject(procfs.ProcFd):
    """One object: an fd on its file, the byte ranges the target maps, a scanner and a reader of its
    pages by offset (the ``PageScanner`` and reader interfaces the agent and trackers use)."""

    def __init__(self, shmid: int, mapping: ShmMapping, page_size: int = PAGE_SIZE) -> None:
        self.shmid = shmid
        self.page_size = page_size
        self.path = mapping.path
        self.mapper = mapping.pid
        self._fd = procfs.open_proc(mapping.pid, f"map_files/{mapping.start:x}-{mapping.end:x}")
        self._map: mmap.mmap | None = None
        self.size_bytes = os.fstat(self._fd).st_size
        self.ranges: list[tuple[int, int]] = []
        self._seekable = self._probe_seek()

    def _probe_seek(self) -> bool:
        try:
            got = os.lseek(self._fd, 0, os.SEEK_DATA)
        except OSError as err:
            return err.errno == errno.ENXIO  # seekable, and no data at all
        return got >= 0 and self._probe_read()

    def _probe_read(self) -> bool:
        try:
            os.pread(self._fd, 1, 0)
        except OSError:
            return False
        return True

    def set_mappings(self, mappings: Sequence[ShmMapping]) -> None:
        """The ranges to dump this round: every mapped part of the object, within its size."""
        self.size_bytes = os.fstat(self._fd).st_size
        limit = -(-self.size_bytes // self.page_size) * self.page_size
        spans = [(m.pgoff, min(m.pgoff + m.end - m.start, limit)) for m in mappings]
        self.ranges = _merge([(s, e) for s, e in spans if e > s])

    def vmas(self) -> list[procfs.Vma]:
        return [procfs.Vma(s, e, procfs.PROT_READ | procfs.PROT_WRITE, procfs.VmaKind.ANON, 0, self.path)
                for s, e in self.ranges]

    # --- PageScanner ----------------------------------------------------------------------

    def scan(self, vmas: Sequence[procfs.Vma]) -> Runs:
        """Pages with data (SEEK_DATA/SEEK_HOLE) inside ``vmas``, as offsets in the object."""
        ps = self.page_size
        starts: list[int] = []
        counts: list[int] = []
        for vma in vmas:
            if not self._seekable:
                starts.append(vma.start)
                counts.append((vma.end - vma.start) // ps)
                continue
            off = vma.start
            while off < vma.end:
                try:
                    data = os.lseek(self._fd, off, os.SEEK_DATA)
                except OSError as err:
                    if err.errno == errno.ENXIO:
                        break  # no data after off
                    raise
                if data >= vma.end:
                    break
                hole = min(os.lseek(self._fd, data, os.SEEK_HOLE), vma.end)
                first = data // ps * ps
                last = -(-hole // ps) * ps
                starts.append(first)
                counts.append((last - first) // ps)
                off = last
        if not starts:
            return Runs.empty()
        return Runs.of(starts, counts).merged(ps)

    # --- reader ---------------------------------------------------------------------------

    def read(self, runs: Runs, out: Buffer, page_size: int = PAGE_SIZE) -> None:
        """The pages of ``runs`` (offsets) packed into ``out``; past the end of the file, zeros."""
        view = memoryview(out).cast("B")  # type: ignore[arg-type]  # numpy arrays export the buffer protocol
        at = 0
        for vaddr, nr_pages in runs:
            n = nr_pages * page_size
            dst = view[at:at + n]
            got = self._pread(dst, vaddr) if self._seekable else self._read_mapped(dst, vaddr)
            if got < n:
                dst[got:] = bytes(n - got)
            at += n

    def _pread(self, dst: memoryview, offset: int) -> int:
        done = 0
        while done < len(dst):
            try:
                n = os.preadv(self._fd, [dst[done:]], offset + done)
            except OSError as err:
                raise ProcessError(self.mapper, f"shared memory {self.shmid}: read at {offset + done:#x} "
                                                f"failed: {err.strerror}") from err
            if n == 0:
                break
            done += n
        return done

    def _read_mapped(self, dst: memoryview, offset: int) -> int:
        if self._map is None or len(self._map) < self.size_bytes:
            if self._map is not None:
                self._map.close()
            self._map = mmap.mmap(self._fd, self.size_bytes, mmap.MAP_SHARED, mmap.PROT_READ)
        end = min(offset + len(dst), len(self._map))
        if end <= offset:
            return 0
        dst[:end - offset] = self._map[offset:end]
        return end - offset

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        super().close()


def group_by_object(mappings: Sequence[ShmMapping]) -> dict[int, list[ShmMapping]]:
    out: dict[int, list[ShmMapping]] = {}
    for m in mappings:
        out.setdefault(m.shmid, []).append(m)
    return out


def open_object(shmid: int, mappings: Sequence[ShmMapping], page_size: int = PAGE_SIZE) -> ShmObject:
    """Open the object through the first of its mappings whose process still exists."""
    last: ProcessGone | None = None
    for m in mappings:
        try:
            return ShmObject(shmid, m, page_size)
        except ProcessGone as err:
            last = err
    assert last is not None
    raise last




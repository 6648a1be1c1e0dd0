"""Lazy restore: ``criu restore --lazy-pages`` with the receiver as CRIU's lazy-pages daemon.

A plain ``criu restore`` reads every page before the tree runs, so the downtime of a migration grows
with memory. With ``--lazy-pages`` CRIU leaves private anonymous memory missing and hands each
restored task's userfaultfd to a daemon, which fills pages on fault and pushes the rest in the
background; the tree runs at once. The destination already holds every page (the session's round
chain and the shipped images), so no fault waits for the network: the daemon reads them locally.

What CRIU 4.2.1 does (sources read at checkpoint-restore/criu v4.2-22-g2cf8f13ca; criu/uffd.c,
criu/mem.c, criu/pagemap.c, criu/pie/restorer.c, criu/cr-restore.c have no lazy-pages change since
v4.2):

* What the restorer leaves to the daemon. ``restore_priv_vma_content`` (criu/mem.c) skips every
  pagemap entry with PE_LAZY when ``--lazy-pages`` is given (``pr->skip_pages``, which advances the
  pages-file offset only for PE_PRESENT), whatever else is set: so PE_PARENT|PE_LAZY is skipped
  like PE_PRESENT|PE_LAZY, and an entry without PE_LAZY is restored eagerly. No reader checks the
  flag combination (criu/pagemap.c ``init_pagemaps``, ``open_page_read_at``). The restorer then
  registers *every* VMA that ``vma_entry_can_be_lazy`` (criu/include/vma.h: MAP_PRIVATE |
  MAP_ANONYMOUS, not MAP_LOCKED or MAP_HUGETLB, not vDSO/vvar/vsyscall) with
  UFFDIO_REGISTER_MODE_MISSING (criu/pie/restorer.c ``vma_remap`` -> ``enable_uffd``), also its
  pages that were restored eagerly (they are present, so they never fault) and the pages absent from
  the pagemap (they fault, and must read as zero). So an entry may carry PE_LAZY only where its VMA
  can be lazy: elsewhere nothing is registered and a skipped page would stay file content or zero.
  CRIU's own dump marks PE_LAZY only there (criu/mem.c ``generate_iovs``); its exception for each
  thread's current stack page (``is_stack``) compares ``(sp ^ vaddr) & ~PAGE_MASK``, the offset
  inside the page, since commit 1bc68dd87, so it holds only for a page-aligned sp.
* The socket protocol. The daemon listens on ``lazy-pages.socket`` in criu's working directory
  (``-W``, default ``-D``; criu/crtools.c chdir, criu/uffd.c ``prepare_sock_addr`` uses the bare
  name) before ``criu restore`` starts: ``prepare_lazy_pages_socket`` connects once, at the start of
  the restore, and fails the restore if nobody listens. Over that one stream connection, for each
  task (serialised by a mutex, criu/uffd.c ``send_uffd``): a native ``int`` pid (the task's pid in
  its namespace, the one its images are named by), then, for a live task, one ``sendmsg`` of a
  single dummy byte carrying the uffd as SCM_RIGHTS (include/common/scm-code.c ``send_fds`` with no
  data); a zombie sends ``-pid`` and no fd (``lazy_pages_setup_zombie``). The uffd is opened
  O_NONBLOCK|O_CLOEXEC in the task and UFFDIO_API is already done with EVENT_FORK, EVENT_REMAP,
  EVENT_UNMAP and EVENT_REMOVE as the kernel has them (``setup_uffd``). When every task is restored,
  before the tasks are released, criu sends the u32 0x52535446 ("ReSTore Finished",
  ``lazy_pages_finish_restore``) on the same connection; nothing is ever sent back. CRIU's daemon
  reads ``nr_tasks`` messages from the pstree and starts its background pushing only after that
  message (``handle_requests``); pages pushed earlier would fail, since the restorer registers the
  VMAs after it got the uffd. The uffd is closed in the task when the restorer is done; from then
  on the daemon holds the only reference, and closing it unregisters every range (faults there
  become ordinary zero-fill).
* CRIU's own daemon (``criu lazy-pages -D DIR``, no page server) cannot serve pagehaul's layout. It
  reads with CRIU's page_read and sets ``io_complete`` (which does the UFFDIO_COPY) only on the
  task's own page_read (``ud_open``: ``lpi->pr.io_complete = uffd_io_complete``); a PE_PARENT entry
  is read through ``read_parent_page`` into the *parent* page_read, whose ``io_complete`` is NULL
  (criu/pagemap.c ``open_page_read_at``) and whose ``maybe_read_page_local`` then reads the bytes
  and copies nothing. The request stays queued, the faulting thread sleeps, ``is_page_queued``
  ignores every repeat of the fault (a thread interrupted by a signal, e.g. a 1 ms timer, faults
  again after its handler: the loop on a thread's stack page that was seen), and background
  pushing, which waits for an empty queue, never starts. Its ``collect_iovs`` also counts only
  PE_LAZY entries and answers every other fault with UFFDIO_ZEROPAGE. So it works only for a
  single image with PE_PRESENT|PE_LAZY entries (CRIU's own lazy dump written to disk), which
  pagehaul could only make by copying all memory into one pages file during the downtime.
  Checked here: a stopped 32 MiB process restored lazily from a two-level chain (the
  integration test's layout) with ``criu lazy-pages -D lazy -W images`` beside ``criu restore
  --lazy-pages``: after SIGCONT its log shows ``Read from parent`` then ``Read page from self`` in
  the parent page_read and no ``uffd_copy`` for that fault, the process sleeps in the fault and
  makes no progress, and the daemon never exits.

So the receiver is the daemon (``LazyDaemon``): ``prepare`` writes ``lazy/`` beside ``images/``
(the same files, hard links, with each task pagemap split at lazy-capable VMAs and PE_LAZY added
there), resolves every lazy page through the round chain to its bytes in a pages file (mmapped
read-only) and ``criu restore -D lazy -W images --lazy-pages`` runs (logs stay in ``images``,
which the caller reports and keeps unchanged: what is restored is exactly what ``images``
describes). The daemon thread answers faults with UFFDIO_COPY from those mappings (a missing page
that is not lazy is zero: UFFDIO_ZEROPAGE), follows FORK (the child gets what its parent still
lacked at the fork), REMAP (moves what is left), UNMAP and REMOVE (drops it; REMOVE also
unregisters, as CRIU does, so the range refills with zeros), and after criu's "finished" pushes
the rest in ranges of up to 4 MiB. It is done when no task lacks a page; it then closes the uffds.
Every uffd it gets (from criu or a FORK event) is also handed to a guard process
(``receiver.lazy_guard``), so that the receiver's death with pages missing leaves the faults
blocked, not reading zeros, until the guard has killed the tree.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import errno
import logging
import mmap
import os
import select
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, NamedTuple

import numpy as np
import numpy.typing as npt

from pagehaul import kernel
from pagehaul.codec import (
    PARENT_LINK,
    PE_LAZY,
    PE_PARENT,
    PE_PRESENT,
    ImageKey,
    PagemapEntry,
    decode_fields,
    decode_image,
    encode_pagemap,
    pages_name,
    read_pagemap,
)
from pagehaul.criu_tools import run_criu
from pagehaul.errors import ImageError, PagehaulError, ProcessGone
from pagehaul.kernel import PAGE_SIZE
from pagehaul.killpoints import killpoint
from pagehaul.procfs import process_tree
from pagehaul.store import link_or_copy
from receiver.lazy_guard import LazyGuard

log = logging.getLogger(__name__)

LAZY_SUBDIR: Final = "lazy"
SOCKET_NAME: Final = "lazy-pages.socket"
RESTORE_FINISHED: Final = 0x52535446  # criu/uffd.c LAZY_PAGES_RESTORE_FINISHED
RESTORE_LOG: Final = "restore.log"
CRIU_OUT: Final = "criu.out"
PID_FILE: Final = "restore.pid"

PAGE: Final = PAGE_SIZE
# Background pushes: up to 4 MiB per UFFDIO_COPY (the kernel copies and maps page by page; larger
# ranges only delay a fault that arrives meanwhile). After a fault, 64 KiB again (CRIU's heuristic,
# criu/uffd.c update_xfer_len): the task is running and touching memory.
PUSH_MAX: Final = 4 << 20
PUSH_MIN: Final = 64 << 10
# A fault fills its page and up to this many bytes after it from the same run: restored programs
# mostly touch memory in order.
FAULT_WINDOW: Final = 64 << 10
_READ_MSGS: Final = 64

# criu/include/image.h, mm/mmap flags in VmaEntry.flags.
_MAP_PRIVATE: Final = 0x02
_MAP_ANONYMOUS: Final = 0x20
_MAP_LOCKED: Final = 0x2000
_MAP_HUGETLB: Final = 0x40000
_VMA_AREA_VSYSCALL: Final = 1 << 2
_VMA_AREA_VDSO: Final = 1 << 3
_VMA_AREA_VVAR: Final = 1 << 12


class LazyError(PagehaulError):
    """The lazy restore failed; the restored tree (if any) has been killed."""


# --- images ------------------------------------------------------------------------------------


class Vma(NamedTuple):
    start: int
    end: int
    flags: int
    status: int

    def can_be_lazy(self) -> bool:
        """criu/include/vma.h ``vma_entry_can_be_lazy``: what the restorer registers with the uffd."""
        return (bool(self.flags & _MAP_ANONYMOUS) and bool(self.flags & _MAP_PRIVATE)
                and not self.flags & (_MAP_LOCKED | _MAP_HUGETLB)
                and not self.status & (_VMA_AREA_VDSO | _VMA_AREA_VVAR | _VMA_AREA_VSYSCALL))


def read_vmas(path: Path) -> list[Vma]:
    """The VMAs of ``mm-ID.img`` (images/mm.proto ``mm_entry.vmas`` = 14; images/vma.proto
    ``vma_entry`` start 1, end 2, flags 6, status 7), in address order."""
    raw = decode_image(path.read_bytes(), path=path)
    if raw.magic_name != "MM" or len(raw.entries) != 1:
        raise ImageError(f"{path}: not an mm image ({raw.magic_name}, {len(raw.entries)} entries)")
    vmas = []
    for number, value in decode_fields(raw.entries[0], str(path)):
        if number != 14 or not isinstance(value, bytes):
            continue
        got = {n: v for n, v in decode_fields(value, str(path)) if isinstance(v, int)}
        vmas.append(Vma(got.get(1, 0), got.get(2, 0), got.get(6, 0), got.get(7, 0)))
    vmas.sort()
    return vmas


def lazy_ranges(vmas: list[Vma]) -> list[tuple[int, int]]:
    """The ranges of VMAs the restorer registers, one per VMA (a UFFDIO_COPY cannot cross VMAs)."""
    return [(v.start, v.end) for v in vmas if v.can_be_lazy() and v.end > v.start]


def mark_entries(entries: tuple[PagemapEntry, ...], ranges: list[tuple[int, int]]) -> list[PagemapEntry]:
    """``entries`` split at the edges of ``ranges`` (sorted, disjoint), with PE_LAZY added to the
    pieces inside. The pages file is untouched: pieces keep their order and PE_PRESENT."""
    out: list[PagemapEntry] = []
    starts = [r[0] for r in ranges]
    for e in entries:
        if e.flags & PE_LAZY or not e.flags & (PE_PRESENT | PE_PARENT):
            out.append(e)
            continue
        pos, end = e.vaddr, e.vaddr + e.nr_pages * PAGE
        i = max(bisect.bisect_right(starts, pos) - 1, 0)
        while pos < end:
            while i < len(ranges) and ranges[i][1] <= pos:
                i += 1
            if i < len(ranges) and ranges[i][0] <= pos:
                cut, flags = min(end, ranges[i][1]), e.flags | PE_LAZY
            else:
                cut, flags = min(end, ranges[i][0]) if i < len(ranges) else end, e.flags
            out.append(PagemapEntry(pos, (cut - pos) // PAGE, flags))
            pos = cut
    return out


@dataclass(slots=True)
class _Level:
    """One image of a task's chain: entry starts/ends/flags and each entry's offset in its pages file."""

    path: Path
    starts: list[int]
    ends: list[int]
    flags: list[int]
    offsets: list[int]
    pages: Path


def _level(images: Path, pagemap: str) -> _Level:
    pm = read_pagemap(images / pagemap)
    starts, ends, flags, offsets = [], [], [], []
    off = 0
    for e in pm.entries:
        starts.append(e.vaddr)
        ends.append(e.vaddr + e.nr_pages * PAGE)
        flags.append(e.flags)
        offsets.append(off)
        if e.flags & PE_PRESENT:
            off += e.nr_pages * PAGE
    pages = images / pages_name(pm.pages_id)
    if pages.stat().st_size != off:
        raise ImageError(f"{pages}: {pages.stat().st_size} bytes, its pagemap {images / pagemap} says {off}")
    return _Level(images / pagemap, starts, ends, flags, offsets, pages)


def _chain(images: Path, pagemap: str) -> list[_Level]:
    """The task's image and its ancestors through ``parent`` links, as far as they have the pagemap."""
    levels: list[_Level] = []
    seen: set[str] = set()
    current = images
    while True:
        real = os.path.realpath(current)
        if real in seen:
            raise ImageError(f"{current}: parent links form a loop")
        seen.add(real)
        levels.append(_level(current, pagemap))
        parent = current / PARENT_LINK
        if not (parent.is_dir() and (parent / pagemap).exists()):
            return levels
        current = parent


class Segment(NamedTuple):
    start: int  # where the pages go in the task
    end: int
    src: int  # (level index << 48) | offset in that level's pages file, until mapped


def resolve(levels: list[_Level], want: list[tuple[int, int]]) -> list[Segment]:
    """Where the bytes of ``want`` (sorted, disjoint ranges of the top level) are: runs of
    (task range, level and file offset), following PE_PARENT down the chain as criu/pagemap.c
    ``read_parent_page`` does. A page that no level holds is an ImageError."""
    out: list[Segment] = []
    todo = want
    for depth, lv in enumerate(levels):
        nxt: list[tuple[int, int]] = []
        for start, end in todo:
            i = max(bisect.bisect_right(lv.starts, start) - 1, 0)
            pos = start
            while pos < end:
                if i >= len(lv.starts) or lv.starts[i] > pos or lv.ends[i] <= pos:
                    if i < len(lv.starts) and lv.ends[i] <= pos:
                        i += 1
                        continue
                    raise ImageError(f"{lv.path}: page {pos:#x} is not in the pagemap (needed by a lazy page)")
                cut = min(end, lv.ends[i])
                if lv.flags[i] & PE_PRESENT:
                    out.append(Segment(pos, cut, (depth << 48) | (lv.offsets[i] + pos - lv.starts[i])))
                elif lv.flags[i] & PE_PARENT:
                    if nxt and nxt[-1][1] == pos:
                        nxt[-1] = (nxt[-1][0], cut)
                    else:
                        nxt.append((pos, cut))
                else:
                    raise ImageError(f"{lv.path}: page {pos:#x} has flags {lv.flags[i]:#x}, not in any image")
                pos = cut
                i += 1
        if not nxt:
            break
        if depth + 1 == len(levels):
            raise ImageError(f"{lv.path}: PE_PARENT page {nxt[0][0]:#x} but no parent image has it")
        todo = nxt
    out.sort()
    return out


def _split_at(segments: list[Segment], ranges: list[tuple[int, int]]) -> list[Segment]:
    """Segments cut at the edges of ``ranges`` (one VMA each): a UFFDIO_COPY stays in one VMA."""
    edges = sorted({x for r in ranges for x in r})
    out = []
    for s in segments:
        pos = s.start
        i = bisect.bisect_right(edges, pos)
        while i < len(edges) and edges[i] < s.end:
            out.append(Segment(pos, edges[i], s.src + (pos - s.start)))
            pos = edges[i]
            i += 1
        out.append(Segment(pos, s.end, s.src + (pos - s.start)))
    return out


class _Mapped:
    """A pages file mapped read-only; ``addr`` is what UFFDIO_COPY reads from."""

    def __init__(self, path: Path) -> None:
        size = path.stat().st_size
        self.path = path
        self.map: mmap.mmap | None = None
        self.addr = 0
        if size:
            with open(path, "rb") as f:
                self.map = mmap.mmap(f.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ)
            self._view: npt.NDArray[np.uint8] = np.frombuffer(self.map, np.uint8)
            self.addr = int(self._view.ctypes.data)

    def close(self) -> None:
        if self.map is not None:
            del self._view
            self.map.close()
            self.map = None


@dataclass(slots=True)
class Plan:
    """What the daemon serves: for each task (by the pid its images are named by), the runs of its
    lazy pages with the address of their bytes in ``maps``."""

    lazy_dir: Path
    tasks: dict[int, list[Segment]]
    maps: list[_Mapped]
    lazy_pages: int

    def close(self) -> None:
        for m in self.maps:
            m.close()
        self.maps = []


def prepare(images: Path, lazy_dir: Path) -> Plan:
    """Lay out ``lazy_dir`` (``criu restore -D``) from the assembled ``images`` and resolve what the
    daemon will serve (module doc). ``images`` is not changed."""
    lazy_dir.mkdir()
    parent = images / PARENT_LINK
    tasks: dict[int, list[Segment]] = {}
    maps: dict[str, _Mapped] = {}
    lazy_pages = 0
    try:
        for name in sorted(os.listdir(images)):
            src = images / name
            key = ImageKey.of_pagemap_name(name)
            if name == PARENT_LINK:
                os.symlink(os.readlink(parent), lazy_dir / name)
            elif key is None or key.kind != "pid":
                if src.is_file():
                    link_or_copy(src, lazy_dir / name)
            else:
                vpid = key.id
                mm = images / f"mm-{vpid}.img"
                ranges = lazy_ranges(read_vmas(mm)) if mm.exists() else []
                pm = read_pagemap(src)
                marked = mark_entries(pm.entries, ranges)
                (lazy_dir / name).write_bytes(encode_pagemap(pm.pages_id, marked))
                want = [(e.vaddr, e.vaddr + e.nr_pages * PAGE) for e in marked if e.flags & PE_LAZY]
                if not want:
                    continue
                levels = _chain(images, name)
                segs = _split_at(resolve(levels, want), ranges)
                mapped = []
                for s in segs:
                    lv = levels[s.src >> 48]
                    where = str(lv.pages)
                    if where not in maps:
                        maps[where] = _Mapped(lv.pages)
                    mapped.append(Segment(s.start, s.end, maps[where].addr + (s.src & ((1 << 48) - 1))))
                tasks[vpid] = mapped
                lazy_pages += sum(s.end - s.start for s in segs) // PAGE
    except BaseException:
        for m in maps.values():
            m.close()
        raise
    return Plan(lazy_dir, tasks, list(maps.values()), lazy_pages)


# --- the daemon ----------------------------------------------------------------------------------


class _Runs:
    """A task's missing lazy pages: sorted disjoint ``[start, end)`` with the address of their bytes."""

    def __init__(self, segs: list[Segment]) -> None:
        self.starts = [s.start for s in segs]
        self.ends = [s.end for s in segs]
        self.srcs = [s.src for s in segs]

    def copy(self) -> _Runs:
        new = _Runs([])
        new.starts, new.ends, new.srcs = list(self.starts), list(self.ends), list(self.srcs)
        return new

    def __bool__(self) -> bool:
        return bool(self.starts)

    def pages(self) -> int:
        return sum(e - s for s, e in zip(self.starts, self.ends, strict=True)) // PAGE

    def find(self, addr: int) -> int:
        """Index of the run holding ``addr``, or -1."""
        i = bisect.bisect_right(self.starts, addr) - 1
        return i if i >= 0 and addr < self.ends[i] else -1

    def drop(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """Remove ``[start, end)``; returns the removed pieces as ``(start, end, src)``."""
        i = max(bisect.bisect_right(self.starts, start) - 1, 0)
        removed = []
        while i < len(self.starts) and self.starts[i] < end:
            s, e, src = self.starts[i], self.ends[i], self.srcs[i]
            if e <= start:
                i += 1
                continue
            lo, hi = max(s, start), min(e, end)
            removed.append((lo, hi, src + lo - s))
            pieces = []
            if s < lo:
                pieces.append((s, lo, src))
            if hi < e:
                pieces.append((hi, e, src + hi - s))
            self.starts[i:i + 1] = [p[0] for p in pieces]
            self.ends[i:i + 1] = [p[1] for p in pieces]
            self.srcs[i:i + 1] = [p[2] for p in pieces]
            i += len(pieces)
        return removed

    def add(self, start: int, end: int, src: int) -> None:
        i = bisect.bisect_left(self.starts, start)
        self.starts.insert(i, start)
        self.ends.insert(i, end)
        self.srcs.insert(i, src)


@dataclass(slots=True)
class _Task:
    vpid: int
    fd: int
    runs: _Runs
    forked: bool = False
    # Faults read but not yet served (the mm was changing: EAGAIN); retried before pushing.
    pending: list[int] = field(default_factory=list)
    push_len: int = PUSH_MIN


@dataclass(slots=True)
class LazyStats:
    """What the daemon did, for the Restore reply and the log."""

    lazy_pages: int = 0  # pages to serve, over the tasks criu restored
    copied_pages: int = 0  # pages put in with UFFDIO_COPY (forked children included)
    after_resume_pages: int = 0  # of them, after the tree was continued
    faults: int = 0  # page faults answered
    zero_faults: int = 0  # of them, on a page that is not lazy (UFFDIO_ZEROPAGE)
    forks: int = 0
    tasks: int = 0
    last_page_ns: int = 0  # time.monotonic_ns() when no task lacked a page any more


class LazyDaemon:
    """CRIU's lazy-pages daemon for one restore, in a thread of the receiver (module doc)."""

    def __init__(self, plan: Plan, workdir: Path, guard: LazyGuard | None = None) -> None:
        self.plan = plan
        # Holds a duplicate of every uffd, so that the receiver's death never unregisters a range
        # with pages missing (receiver/lazy_guard.py).
        self._guard = guard
        self.stats = LazyStats(lazy_pages=plan.lazy_pages)
        self._listen = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        # CRIU connects to the bare name in its working directory; a path through our own fd of
        # that directory keeps sun_path short whatever its length.
        self._dirfd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(workdir / SOCKET_NAME)
        self._listen.bind(f"/proc/self/fd/{self._dirfd}/{SOCKET_NAME}")
        self._listen.listen(1)
        self._sock_path = workdir / SOCKET_NAME
        self._conn: socket.socket | None = None
        self._inbuf = b""
        self._fds: list[int] = []
        self._finished = False  # criu's RESTORE_FINISHED arrived
        self._tasks: dict[int, _Task] = {}  # by uffd
        self._resumed = threading.Event()
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._poller = select.poll()
        self._thread = threading.Thread(target=self._run, name="lazy-pages", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def resumed(self) -> None:
        """The tree runs from now on: push the rest (pages copied from now on count as after the resume)."""
        self._resumed.set()
        self._wake()

    def stop(self) -> None:
        """End the thread now (pages may be missing: the caller kills the tree)."""
        self._stop.set()
        self._wake()
        self._thread.join()

    def _wake(self) -> None:
        # Under the lock: once the thread closed the pipe its fd number may be anybody's.
        with self._lock:
            if self._wake_w >= 0:
                with contextlib.suppress(OSError):
                    os.write(self._wake_w, b"x")

    async def wait(self, timeout_s: float) -> LazyStats:
        """Until every lazy page is in; LazyError if the daemon failed or took longer."""
        ok = await asyncio.to_thread(self._done.wait, timeout_s)
        if not ok:
            self.stop()
            raise LazyError(f"lazy pages not all in after {timeout_s:g} s "
                            f"({self.stats.copied_pages} of {self.stats.lazy_pages} copied)")
        self._thread.join()
        if self._error is not None:
            raise LazyError(f"lazy-pages daemon failed: {self._error}") from self._error
        return self.stats

    # -- the thread --

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as err:  # reported through wait()
            log.warning("lazy-pages daemon failed: %s", err)
            self._error = err
        finally:
            self._close()
            self._done.set()

    def _close(self) -> None:
        for fd in [*self._tasks, *self._fds]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._tasks.clear()
        self._fds.clear()
        for s in (self._conn, self._listen):
            if s is not None:
                s.close()
        with self._lock:
            for fd in (self._dirfd, self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._wake_w = -1
        with contextlib.suppress(OSError):
            os.unlink(self._sock_path)
        self.plan.close()

    def _loop(self) -> None:
        poller = self._poller
        poller.register(self._listen.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._stop.is_set():
            pushing = self._finished and self._resumed.is_set()
            if pushing and not any(t.runs or t.pending for t in self._tasks.values()):
                self.stats.last_page_ns = time.monotonic_ns()
                return
            busy = any(t.pending or (pushing and t.runs) for t in self._tasks.values())
            for fd, _ev in poller.poll(0 if busy else None):
                if fd == self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 64)
                    continue
                if fd == self._listen.fileno():
                    self._conn, _ = self._listen.accept()
                    poller.unregister(fd)
                    poller.register(self._conn.fileno(), select.POLLIN)
                elif self._conn is not None and fd == self._conn.fileno():
                    if not self._read_socket(poller):
                        poller.unregister(fd)
                elif fd in self._tasks:
                    self._read_events(self._tasks[fd], poller)
            if self._stop.is_set():
                return
            for task in list(self._tasks.values()):
                if task.pending:
                    self._serve_pending(task)
            # Pushing waits for criu's "finished" (before it the restorers may not have registered
            # the VMAs yet: the uffd is sent first) and for the tree to be continued (until then
            # only faults are served, and criu's last steps, which are downtime, keep the CPU).
            if not pushing:
                continue
            killpoint("lazy.push")  # tests: the receiver dies with pages missing, the tree running
            self._push_one()

    def _read_socket(self, poller: select.poll) -> bool:
        """Take what criu sent: pid + uffd per task, then RESTORE_FINISHED. False at EOF."""
        assert self._conn is not None
        data, anc, _flags, _addr = self._conn.recvmsg(4096, socket.CMSG_SPACE(4 * 16), socket.MSG_CMSG_CLOEXEC)
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % 4
                self._fds.extend(struct.unpack(f"{usable // 4}i", payload[:usable]))
        if not data:
            if not self._finished:
                raise LazyError("criu closed the lazy-pages socket before the restore finished")
            return False
        self._inbuf += data
        while len(self._inbuf) >= 4:
            (word,) = struct.unpack_from("=I", self._inbuf)
            if word == RESTORE_FINISHED:
                self._inbuf = self._inbuf[4:]
                self._finished = True
                continue
            (pid,) = struct.unpack_from("=i", self._inbuf)
            if pid < 0:  # a zombie: no memory, no uffd
                self._inbuf = self._inbuf[4:]
                continue
            if len(self._inbuf) < 5 or not self._fds:
                break  # the uffd's byte has not arrived yet
            self._inbuf = self._inbuf[5:]
            fd = self._fds.pop(0)
            segs = self.plan.tasks.get(pid, [])
            self._tasks[fd] = _Task(pid, fd, _Runs(segs))
            if self._guard is not None:
                self._guard.hold(fd, pid)
            self.stats.tasks += 1
            poller.register(fd, select.POLLIN)
            log.debug("lazy-pages: task %d uffd %d, %d lazy pages", pid, fd, self._tasks[fd].runs.pages())
        return True

    def _read_events(self, task: _Task, poller: select.poll) -> None:
        try:
            data = os.read(task.fd, kernel.UFFD_MSG_SIZE * _READ_MSGS)
        except BlockingIOError:
            return
        for event, a0, a1, a2 in kernel.decode_uffd_msgs(data):
            if task.fd not in self._tasks:
                return  # gone while its messages were handled
            if event == kernel.UFFD_EVENT_PAGEFAULT:
                self.stats.faults += 1
                task.push_len = PUSH_MIN
                self._fault(task, a1 & ~(PAGE - 1))
            elif event == kernel.UFFD_EVENT_FORK:
                child_fd = a0 & 0xFFFFFFFF
                self._tasks[child_fd] = _Task(task.vpid, child_fd, task.runs.copy(), forked=True)
                if self._guard is not None:
                    self._guard.hold(child_fd, task.vpid)
                self.stats.forks += 1
                poller.register(child_fd, select.POLLIN)
            elif event == kernel.UFFD_EVENT_REMAP:
                for s, e, src in task.runs.drop(a0, a0 + a2):
                    task.runs.add(s - a0 + a1, e - a0 + a1, src)
            elif event in (kernel.UFFD_EVENT_REMOVE, kernel.UFFD_EVENT_UNMAP):
                if event == kernel.UFFD_EVENT_REMOVE:
                    # The range stays mapped but its pages are gone: the process reads zeros there
                    # now, so no fault there may be answered from the image (criu/uffd.c handle_remove).
                    try:
                        kernel.uffdio_unregister_ioctl(task.fd, kernel.uffdio_range(start=a0, len=a1 - a0))
                    except OSError as err:
                        if err.errno != errno.ENOMEM:  # the mm is gone
                            raise
                task.runs.drop(a0, a1)
            else:
                raise LazyError(f"unexpected userfaultfd event {event:#x} from task {task.vpid}")

    def _fault(self, task: _Task, addr: int) -> None:
        i = task.runs.find(addr)
        if i < 0:
            # Not a lazy page (absent from the pagemap: zero), or already copied by a push that
            # raced with the fault (EEXIST; the copy woke the thread).
            got, err = kernel.uffdio_zeropage_ioctl(task.fd, addr, PAGE)
            if err == errno.EAGAIN and not got:
                task.pending.append(addr)
            elif err in (errno.ESRCH, errno.ENOSPC):
                self._gone(task)
            elif err not in (0, errno.EEXIST, errno.ENOENT):
                raise OSError(err, f"UFFDIO_ZEROPAGE at {addr:#x} of task {task.vpid}: {os.strerror(err)}")
            else:
                self.stats.zero_faults += 1
            return
        end = min(task.runs.ends[i], addr + FAULT_WINDOW)
        if not self._copy(task, addr, end) and task.fd in self._tasks:
            task.pending.append(addr)

    def _serve_pending(self, task: _Task) -> None:
        pending, task.pending = task.pending, []
        for addr in pending:
            if task.fd in self._tasks:
                self._fault(task, addr)

    def _copy(self, task: _Task, start: int, end: int) -> bool:
        """Copy ``[start, end)`` (inside one run) into the task, drop it from its runs. False if
        the mm is changing (EAGAIN: read its events, then retry) or the task is gone."""
        i = task.runs.find(start)
        if i < 0:
            return True  # nothing missing there any more
        src = task.runs.srcs[i] + start - task.runs.starts[i]
        pos = start
        while pos < end:
            got, err = kernel.uffdio_copy_ioctl(task.fd, pos, src + pos - start, end - pos)
            if got:
                self._count(got)
                task.runs.drop(pos, pos + got)
                pos += got
            if err == 0:
                continue
            if err == errno.EEXIST:
                task.runs.drop(pos, pos + PAGE)  # present already: a racing fault was served
                pos += PAGE
            elif err == errno.EAGAIN:
                if got:
                    continue
                return False
            elif err == errno.ENOENT:
                # Not one registered VMA any more (mprotect split it: no event says so), or gone.
                if end - pos > PAGE:
                    half = max(PAGE, (end - pos) // 2 // PAGE * PAGE)
                    if not self._copy(task, pos, pos + half):
                        return False
                    pos += half
                else:
                    task.runs.drop(pos, pos + PAGE)
                    pos += PAGE
            elif err in (errno.ESRCH, errno.ENOSPC):
                self._gone(task)
                return False
            else:
                raise OSError(err, f"UFFDIO_COPY at {pos:#x} of task {task.vpid}: {os.strerror(err)}")
        return True

    def _count(self, nbytes: int) -> None:
        pages = nbytes // PAGE
        self.stats.copied_pages += pages
        if self._resumed.is_set():
            self.stats.after_resume_pages += pages

    def _gone(self, task: _Task) -> None:
        """The task's mm is gone (exited): nothing left to serve it."""
        task.runs = _Runs([])
        task.pending = []
        if self._tasks.pop(task.fd, None) is not None:
            self._poller.unregister(task.fd)
            os.close(task.fd)

    def _push_one(self) -> bool:
        """Push one range of one task (the tasks criu restored first, then forked children);
        False when nothing is left to push."""
        order = sorted(self._tasks.values(), key=lambda t: t.forked)
        for task in order:
            if not task.runs:
                continue
            i = len(task.runs.starts) - 1  # from the end: O(1) removal
            start = max(task.runs.starts[i], task.runs.ends[i] - task.push_len)
            self._copy(task, start, task.runs.ends[i])
            task.push_len = min(PUSH_MAX, task.push_len * 2)
            return True
        return False


# --- criu restore --lazy-pages -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LazyRestore:
    root: int
    daemon: LazyDaemon
    guard: LazyGuard


async def start_lazy_restore(criu: Path, images: Path, *, timeout_s: float, options: list[str],
                             continue_tree: Callable[[int], None]) -> LazyRestore:
    """Run ``criu restore --lazy-pages`` (plus ``options``) from ``images`` with a LazyDaemon serving
    it, continue the restored tree and return while pages are still being pushed
    (``finish_lazy_restore`` waits). On failure nothing restored is left running."""
    lazy_dir = images.parent / LAZY_SUBDIR
    guard = LazyGuard()  # first: its start overlaps prepare
    try:
        plan = await asyncio.to_thread(prepare, images, lazy_dir)
    except BaseException:
        await asyncio.to_thread(guard.fire)
        raise
    daemon = LazyDaemon(plan, images, guard)
    daemon.start()
    pidfile = images / PID_FILE
    argv = [str(criu), "restore", "-D", str(lazy_dir), "-W", str(images), "--lazy-pages", "-d",
            "--pidfile", str(pidfile), "-o", RESTORE_LOG, "-v4", *options]
    root = 0
    try:
        with open(images / CRIU_OUT, "wb") as out:  # noqa: ASYNC230 -- creating an empty local file
            await run_criu(argv, log=images / RESTORE_LOG, timeout_s=timeout_s, out=out, started=guard.criu)
        try:
            root = int(pidfile.read_text().strip())
        except (OSError, ValueError) as err:
            raise PagehaulError(f"criu restore wrote no pid to {pidfile}") from err
        guard.root(root)
        await asyncio.to_thread(continue_tree, root)
        daemon.resumed()
    except BaseException:
        await asyncio.shield(asyncio.to_thread(guard.fire))  # kills what criu restored, if anything
        await asyncio.to_thread(daemon.stop)
        if root:
            kill_tree(root)
        raise
    return LazyRestore(root, daemon, guard)


async def finish_lazy_restore(lazy: LazyRestore, timeout_s: float) -> LazyStats:
    """Wait until every lazy page is in. If the daemon fails first, the restored tree is killed
    (it would read zeros where pages are missing) and LazyError says why: the source, still
    stopped, is then continued by the sender."""
    try:
        stats = await lazy.daemon.wait(timeout_s)
    except BaseException:
        kill_tree(lazy.root)
        lazy.guard.fire()  # every task stopped, killed and gone before the uffds close
        lazy.daemon.stop()  # at once: its tasks are gone (also when the RPC was cancelled)
        raise
    await asyncio.to_thread(lazy.guard.done)
    log.info("lazy restore done root=%d pages=%d copied=%d after_resume=%d faults=%d zero_faults=%d forks=%d",
             lazy.root, stats.lazy_pages, stats.copied_pages, stats.after_resume_pages, stats.faults,
             stats.zero_faults, stats.forks)
    return stats


def kill_tree(root: int) -> None:
    """SIGKILL the restored tree (its root first: in its own PID namespace that ends all of it)."""
    try:
        pids = process_tree(root)
    except ProcessGone:
        return
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

"""The correctness oracle: compare an image set with a (frozen or stopped) process's memory.

For every page of the given address ranges, the page as CRIU would restore it from the image
(data from the pagemap chain; for anonymous memory a page missing from the pagemap is zero) must
equal the process's page, byte for byte. That one rule covers both directions: every page the
receiver holds is right, and no non-zero page of anonymous memory was left out. For private file
mappings a page missing from the image comes from the file, so only pages the image holds are
compared there.

The process side is read through /proc/PID/mem (FOLL_FORCE: PROT_NONE pages too), independently
of the sender's scanner and reader, so the check does not share their mistakes.

For a process tree every process is checked against its own ``pagemap-VPID.img``, and every shared
anonymous mapping against its object's ``pagemap-shmem-SHMID.img`` (entries addressed by byte
offset in the object; an absent page is zero): the mapping's page at ``start + offset - pgoff``
must equal the image's page at ``offset``, in every process that maps it.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from pagehaul import procfs
from pagehaul.errors import ProcessGone
from pagehaul.runs import Runs, in_ranges
from pagehaul.store import ImageSet, open_round

CHUNK_PAGES = 1024


@dataclass(frozen=True, slots=True)
class Range:
    start: int
    end: int
    # True for anonymous memory (absent page = zero); False for private file mappings.
    absent_is_zero: bool


@dataclass(frozen=True, slots=True)
class VerifyReport:
    pages_compared: int
    pages_in_image: int
    mismatches: int
    first_mismatch: int | None

    @property
    def ok(self) -> bool:
        return self.mismatches == 0 and self.pages_compared > 0


def _spans(ranges: Sequence[Range], held: Runs, page_size: int) -> list[tuple[int, int]]:
    """Address spans to compare: anonymous ranges whole; file ranges only where the image holds
    pages (elsewhere the file supplies them, and pages past its end cannot even be read)."""
    spans: list[tuple[int, int]] = []
    ends = held.ends(page_size)
    for rng in ranges:
        if rng.absent_is_zero:
            spans.append((rng.start, rng.end))
            continue
        lo = int(np.searchsorted(ends, np.uint64(rng.start), side="right"))
        hi = int(np.searchsorted(held.vaddr, np.uint64(rng.end), side="left"))
        spans.extend((max(int(held.vaddr[i]), rng.start), min(int(ends[i]), rng.end)) for i in range(lo, hi))
    return spans


def _read_live(fd: int, pid: int, vaddr: int, n: int, page_size: int) -> tuple[npt.NDArray[np.uint8],
                                                                              npt.NDArray[np.bool_]]:
    """``n`` pages at ``vaddr`` and which of them could be read; unreadable ones (guard regions,
    MADV_GUARD_INSTALL) read as zero. One pread normally; page by page only around a fault."""
    try:
        data = os.pread(fd, n * page_size, vaddr)
    except OSError:
        data = b""
    if len(data) == n * page_size:
        return np.frombuffer(data, np.uint8), np.ones(n, bool)
    out = np.zeros(n * page_size, np.uint8)
    readable = np.zeros(n, bool)
    for i in range(n):
        try:
            page = os.pread(fd, page_size, vaddr + i * page_size)
        except OSError as err:
            if err.errno == errno.ESRCH:
                raise ProcessGone(pid, f"process {pid} is gone") from err
            continue
        if len(page) == page_size:
            out[i * page_size:(i + 1) * page_size] = np.frombuffer(page, np.uint8)
            readable[i] = True
    if not readable.any() and not os.path.exists(f"/proc/{pid}"):
        raise ProcessGone(pid, f"process {pid} is gone")
    return out, readable


def _bad_pages(fd: int, pid: int, image: ImageSet, held: Runs, *, vaddr: int, image_addr: int, n: int,
               page_size: int) -> npt.NDArray[np.intp]:
    """Indexes of the ``n`` pages at ``vaddr`` in the process that differ from the image's pages at
    ``image_addr`` (absent ones count as zero). A page nothing can read (a guard region) must not
    be in the image either."""
    live, readable = _read_live(fd, pid, vaddr, n, page_size)
    img = np.frombuffer(image.read_range(image_addr, n, absent_as_zero=True), np.uint8)
    differs = (live.reshape(n, -1) != img.reshape(n, -1)).any(axis=1)
    keys = np.uint64(image_addr) + np.arange(n, dtype=np.uint64) * np.uint64(page_size)
    return np.flatnonzero(np.where(readable, differs, in_ranges(keys, held.vaddr, held.ends(page_size))))


def _compare(pid: int, image: ImageSet, held: Runs, spans: list[tuple[int, int, int]],
             page_size: int) -> tuple[int, int, int | None]:
    """Compare the process's pages in each span ``(start, end, delta)`` with the image's pages at
    ``address + delta``: (pages compared, mismatches, first bad address in the process)."""
    compared = mismatches = 0
    first: int | None = None
    try:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    except FileNotFoundError as err:
        raise ProcessGone(pid, f"process {pid} is gone; cannot verify") from err
    try:
        for start, end, delta in spans:
            for chunk in range(start, end, CHUNK_PAGES * page_size):
                n = min(CHUNK_PAGES, (end - chunk) // page_size)
                bad = _bad_pages(fd, pid, image, held, vaddr=chunk, image_addr=chunk + delta, n=n,
                                 page_size=page_size)
                compared += n
                if bad.size:
                    mismatches += int(bad.size)
                    if first is None:
                        first = chunk + int(bad[0]) * page_size
    finally:
        os.close(fd)
    return compared, mismatches, first


def verify_against_process(round_dir: Path, pid: int, ranges: Sequence[Range], page_size: int, *,
                           image_id: int | None = None) -> VerifyReport:
    """``pid``'s memory in ``ranges`` against the image of process ``image_id`` (default: ``pid``;
    the vpid for a process in a pid namespace)."""
    with open_round(round_dir, pid if image_id is None else image_id, page_size) as image:
        held = Runs.concat([image.present_runs(), image.zero_runs()]).sorted()
        spans = [(start, end, 0) for start, end in _spans(ranges, held, page_size)]
        compared, mismatches, first = _compare(pid, image, held, spans, page_size)
    return VerifyReport(compared, held.total_pages, mismatches, first)


def verify_shmem_mapping(round_dir: Path, shmid: int, pid: int, *, start: int, end: int, pgoff: int,
                         page_size: int) -> VerifyReport:
    """One process's mapping ``[start, end)`` of shared-memory object ``shmid`` (mapped at byte
    offset ``pgoff``) against ``pagemap-shmem-SHMID.img``; every page compared, absent ones as zero.
    ``first_mismatch`` is the address in the process."""
    with open_round(round_dir, shmid, page_size, shmem=True) as image:
        held = Runs.concat([image.present_runs(), image.zero_runs()]).sorted()
        compared, mismatches, first = _compare(pid, image, held, [(start, end, pgoff - start)], page_size)
        return VerifyReport(compared, held.total_pages, mismatches, first)


@dataclass(frozen=True, slots=True)
class TreeReport:
    """Per process (by pid) and per shared mapping (by ``(shmid, pid, start)``)."""

    processes: dict[int, VerifyReport]
    shmem: dict[tuple[int, int, int], VerifyReport]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.processes.values()) and all(r.mismatches == 0 for r in self.shmem.values())

    def problems(self) -> list[str]:
        out = [f"pid {pid}: {r.mismatches} of {r.pages_compared} pages differ, first at {r.first_mismatch:#x}"
               for pid, r in self.processes.items() if not r.ok and r.first_mismatch is not None]
        out += [f"pid {pid}: nothing compared" for pid, r in self.processes.items() if r.pages_compared == 0]
        out += [f"shmem {shmid} in pid {pid} at {start:#x}: {r.mismatches} pages differ, first at "
                f"{r.first_mismatch:#x}" for (shmid, pid, start), r in self.shmem.items() if r.mismatches
                and r.first_mismatch is not None]
        return out


def verify_tree(round_dir: Path, pids: Sequence[int], page_size: int) -> TreeReport:
    """Every process of ``pids`` (stopped) against its image, and every shared anonymous mapping of
    each against its object's image."""
    processes: dict[int, VerifyReport] = {}
    shmem: dict[tuple[int, int, int], VerifyReport] = {}
    for pid in pids:
        entries = procfs.read_maps(pid)
        ranges = [Range(v.start, v.end, v.kind != procfs.VmaKind.FILE_PRIVATE) for v in procfs.select_dumpable(entries)]
        processes[pid] = verify_against_process(round_dir, pid, ranges, page_size, image_id=procfs.read_vpid(pid))
        for e in entries:
            if procfs.is_shared_anon(e):
                shmem[(e.inode, pid, e.start)] = verify_shmem_mapping(round_dir, e.inode, pid, start=e.start, end=e.end,
                                                                      pgoff=e.pgoff, page_size=page_size)
    return TreeReport(processes, shmem)

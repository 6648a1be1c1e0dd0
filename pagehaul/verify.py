"""The correctness oracle: compare an image set with a (frozen or stopped) process's memory.

For every page of the given address ranges, the page as CRIU would restore it from the image
(data from the pagemap chain; for anonymous memory a page missing from the pagemap is zero) must
equal the process's page, byte for byte. That one rule covers both directions: every page the
receiver holds is right, and no non-zero page of anonymous memory was left out. For private file
mappings a page missing from the image comes from the file, so only pages the image holds are
compared there.

The process side is read through /proc/PID/mem (FOLL_FORCE: PROT_NONE pages too), independently
of the sender's scanner and reader, so the check does not share their mistakes.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from pagehaul.errors import ProcessGone
from pagehaul.images import open_round
from pagehaul.runs import Runs

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


def _held_mask(held: Runs, addrs: npt.NDArray[np.uint64], page_size: int) -> npt.NDArray[np.bool_]:
    if len(held) == 0:
        return np.zeros(addrs.size, bool)
    idx = np.searchsorted(held.vaddr, addrs, side="right").astype(np.int64) - 1
    inside = idx >= 0
    inside[inside] = addrs[inside] < held.ends(page_size)[idx[inside]]
    return inside


def verify_against_process(round_dir: Path, pid: int, ranges: Sequence[Range], page_size: int) -> VerifyReport:
    compared = mismatches = 0
    first: int | None = None
    with open_round(round_dir, pid, page_size) as image:
        held = Runs.concat([image.present_runs(), image.zero_runs()]).sorted()
        in_image = held.total_pages
        try:
            fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
        except FileNotFoundError as err:
            raise ProcessGone(pid, f"process {pid} is gone; cannot verify") from err
        try:
            for start, end in _spans(ranges, held, page_size):
                for chunk in range(start, end, CHUNK_PAGES * page_size):
                    n = min(CHUNK_PAGES, (end - chunk) // page_size)
                    live, readable = _read_live(fd, pid, chunk, n, page_size)
                    img = np.frombuffer(image.read_range(chunk, n, absent_as_zero=True), np.uint8)
                    differs = (live.reshape(n, -1) != img.reshape(n, -1)).any(axis=1)
                    # A page nothing can read (a guard region) must not be in the image either.
                    addrs = np.uint64(chunk) + np.arange(n, dtype=np.uint64) * np.uint64(page_size)
                    differs = np.where(readable, differs, _held_mask(held, addrs, page_size))
                    bad = np.flatnonzero(differs)
                    compared += n
                    if bad.size:
                        mismatches += int(bad.size)
                        if first is None:
                            first = chunk + int(bad[0]) * page_size
        finally:
            os.close(fd)
    return VerifyReport(compared, in_image, mismatches, first)

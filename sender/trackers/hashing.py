"""Dirty tracking by content: an xxh3_64 digest of every present page, compared round to round.

Works on any kernel and any mapping the reader can read (``process_vm_readv``, with
``/proc/PID/mem`` for PROT_NONE pages), so it is the fallback when neither uffd-wp nor
soft-dirty is available. It costs a full read and hash of every present page per round (the
read dominates: see ``pagehaul.digest`` for why the hash is xxh3_64) and 16 bytes of state per
page (sorted page addresses + digests), about twice that while a collect runs.

Some facts behind the choices:

* Collision odds: xxh3_64 behaves as a random 64-bit function on non-adversarial data, so a
  changed page keeps its digest with probability ~2**-64; over 2**30 page changes in one
  migration that is ~2**-34. A target could craft a collision on purpose, but only to corrupt
  its own migrated copy, which it could do anyway; so no secret seed (it would slow every digest).
* What a digest must describe: the content the receiver holds. Comparing against the content
  seen at the previous collect is not enough, because the sender reads a dirty page later
  than the collect hashed it: a page hashed as A, written to B, read and sent as B, then
  written back to A before the next collect (a lock word, a flag) looks unchanged, and the
  destination keeps B. :meth:`HashTracker.record_sent` closes that hole: called with the
  bytes the sender actually sent, it stores their digests. Without it the tracker falls back
  to digests taken at collect time and has that window.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from pagehaul.digest import page_digests
from pagehaul.errors import AccessDenied, ProcessError, ProcessGone
from pagehaul.kernel import PAGE_SIZE
from pagehaul.procfs import PROC_ROOT, Vma
from pagehaul.runs import U64, Runs, lookup
from sender.freezer import PtraceFreezer
from sender.memreader import Buffer, MemoryReader
from sender.scanner import PageScanner, make_scanner
from sender.trackers.base import Availability, PageReader

log = logging.getLogger(__name__)


HASH_BATCH_BYTES: Final = 4 << 20  # one process_vm_readv call of 1024 x 4 KiB iovecs


def probe() -> Availability:
    return Availability(HashTracker.name, True, "content hashing needs only process_vm_readv (any kernel)")


class HashTracker:
    """Dirty pages = present pages whose xxh3_64 digest differs from the recorded one, or new.

    ``scanner`` finds the present pages at :meth:`start` (default: ``make_scanner(pid)``);
    ``reader`` reads them (default: a new :class:`MemoryReader`). The tracker closes what it
    created, not what it was given.
    """

    name: str = "hash"
    needs_freeze: bool = False

    def __init__(self, pid: int, scanner: PageScanner | None = None, reader: PageReader | None = None, *,
                 proc_root: Path = PROC_ROOT, batch_bytes: int = HASH_BATCH_BYTES) -> None:
        if batch_bytes < PAGE_SIZE or batch_bytes % PAGE_SIZE:
            raise ValueError("batch_bytes must be a positive multiple of the page size")
        self.pid = pid
        self._own_scanner = scanner is None
        self._own_reader = reader is None
        self._scanner = scanner if scanner is not None else make_scanner(pid, proc_root=proc_root)
        try:
            self._reader: PageReader = reader if reader is not None else MemoryReader(pid, proc_root)
        except BaseException:
            if self._own_scanner:
                self._scanner.close()
            raise
        self._batch_pages = batch_bytes // PAGE_SIZE
        self._buf = np.empty(batch_bytes, dtype=np.uint8)
        self._lock = threading.Lock()  # record_sent may come from the sender's worker threads
        self._addrs: U64 = np.zeros(0, np.uint64)  # sorted page addresses with a digest
        self._digests: U64 = np.zeros(0, np.uint64)
        self._started = False
        self.pages_hashed = 0  # over the tracker's life, for stats and tests
        self.unreadable_pages = 0

    @staticmethod
    def probe() -> Availability:
        return probe()

    @property
    def tracked_pages(self) -> int:
        return int(self._addrs.size)

    def digest_of(self, vaddr: int) -> int | None:
        """The recorded digest of the page at ``vaddr``, None if the tracker holds none."""
        with self._lock:
            pos = int(np.searchsorted(self._addrs, np.uint64(vaddr)))
            if pos < self._addrs.size and int(self._addrs[pos]) == vaddr:
                return int(self._digests[pos])
        return None

    def start(self, vmas: Sequence[Vma], freezer: PtraceFreezer) -> None:
        """Hash every present page of ``vmas`` (the target is frozen, so nothing is torn)."""
        addrs, digests, readable = self._hash(self._scanner.scan(vmas))
        with self._lock:
            self._addrs, self._digests = addrs[readable], digests[readable]
        self._started = True

    def collect(self, vmas: Sequence[Vma], present: Runs) -> Runs:
        """Pages of ``present`` whose digest changed or that have none; the state becomes the
        present pages' digests (pages no longer present are forgotten)."""
        if not self._started:
            raise RuntimeError("hash tracker: collect() before start()")
        addrs, digests, readable = self._hash(present)
        with self._lock:
            old_addrs, old_digests = self._addrs, self._digests
            known, pos = lookup(old_addrs, addrs)
            same = known.copy()
            same[known] = old_digests[pos[known]] == digests[known]
            # An unreadable page (unmapped between the scan and the read) is reported: the
            # sender finds out what it is; with no digest it counts as new next time.
            changed = ~same | ~readable
            self._addrs, self._digests = addrs[readable], digests[readable]
        return Runs.from_page_addrs(addrs[changed], PAGE_SIZE)

    def record_sent(self, runs: Runs, data: Buffer) -> None:
        """Record the digests of pages as sent: ``data`` holds the pages of ``runs`` packed in
        run order (what ``MemoryReader.read`` produced for the batch). Pages the tracker does
        not hold are ignored (they are new, hence dirty, next collect). Thread-safe."""
        total = runs.total_pages
        if total == 0:
            return
        view = memoryview(data).cast("B")  # type: ignore[arg-type]  # numpy arrays export the buffer protocol
        if len(view) < total * PAGE_SIZE:
            raise ValueError(f"data holds {len(view)} bytes, the runs need {total * PAGE_SIZE}")
        digests = page_digests(view[:total * PAGE_SIZE])
        addrs = runs.page_addrs(PAGE_SIZE)
        with self._lock:
            if self._addrs.size == 0:
                return
            pos = np.minimum(np.searchsorted(self._addrs, addrs), self._addrs.size - 1)
            hit = self._addrs[pos] == addrs
            self._digests[pos[hit]] = digests[hit]

    def close(self) -> None:
        """Drop the state and close what the tracker opened; the target was never touched."""
        with self._lock:
            self._addrs, self._digests = np.zeros(0, np.uint64), np.zeros(0, np.uint64)
        if self._own_scanner:
            self._scanner.close()
        if self._own_reader:
            self._reader.close()

    def _hash(self, present: Runs) -> tuple[U64, U64, npt.NDArray[np.bool_]]:
        """Sorted page addresses of ``present``, their digests, and which ones could be read."""
        if not present.is_sorted_disjoint(PAGE_SIZE):
            present = present.sorted()
        addrs = present.page_addrs(PAGE_SIZE)
        digests = np.zeros(addrs.size, dtype=np.uint64)
        readable = np.ones(addrs.size, dtype=np.bool_)
        at = 0
        for batch in present.split(self._batch_pages, PAGE_SIZE):
            count = batch.total_pages
            if self._read(batch):
                digests[at:at + count] = page_digests(self._buf[:count * PAGE_SIZE])
            else:
                self._salvage(batch, digests[at:at + count], readable[at:at + count])
            at += count
        self.pages_hashed += addrs.size
        return addrs, digests, readable

    def _read(self, runs: Runs) -> bool:
        """Read ``runs`` into the buffer; False if a page could not be read (unmapped meanwhile)."""
        try:
            self._reader.read(runs, self._buf[:runs.total_pages * PAGE_SIZE])
        except (ProcessGone, AccessDenied):
            raise
        except ProcessError as err:
            log.debug("unreadable page while hashing pid=%d reason=%s", self.pid, err)
            return False
        return True

    def _salvage(self, batch: Runs, digests: U64, readable: npt.NDArray[np.bool_]) -> None:
        """Re-read a failed batch run by run; a run that still fails is given up as a whole.

        Only a race with munmap gets here (rare), so a call per run is fine; a page-by-page
        retry could cost a syscall pair per page of a large freed region.
        """
        at = 0
        for vaddr, nr_pages in batch:
            run = Runs.of([vaddr], [nr_pages])
            if self._read(run):
                digests[at:at + nr_pages] = page_digests(self._buf[:nr_pages * PAGE_SIZE])
            else:
                readable[at:at + nr_pages] = False
                self.unreadable_pages += nr_pages
                log.info("pages unreadable while hashing, reported dirty pid=%d vaddr=0x%x pages=%d",
                         self.pid, vaddr, nr_pages)
            at += nr_pages

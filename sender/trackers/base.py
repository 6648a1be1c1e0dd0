"""The dirty-tracker interface: which pages of a running process changed since last time.

Every tracker answers the same question for pre-copy rounds -- "which pages were written since
the previous :meth:`DirtyTracker.collect` (or since :meth:`DirtyTracker.start`)?" -- with a
different kernel mechanism:

| name                 | mechanism                                          | kernels                          |
|----------------------|----------------------------------------------------|----------------------------------|
| ``uffd-wp``          | userfaultfd async write-protect + PAGEMAP_SCAN     | >= 6.7 (WP_ASYNC); x86-64, arm64 |
|                      | ``PAGE_IS_WRITTEN`` with ``PM_SCAN_WP_MATCHING``   |                                  |
| ``soft-dirty-scan``  | soft-dirty bits through PAGEMAP_SCAN               | >= 6.8, CONFIG_MEM_SOFT_DIRTY    |
|                      | ``PAGE_IS_SOFT_DIRTY``, cleared with clear_refs 4  | (x86-64, ppc64, s390; not arm64) |
| ``soft-dirty-pagemap``| soft-dirty bit 55 of /proc/PID/pagemap through a  | >= 3.11, CONFIG_MEM_SOFT_DIRTY   |
|                      | 2 MiB-window pagemap cache, cleared with clear_refs |                                  |
| ``hash``             | xxh3 digest of every present page vs last round    | any                              |

Ordering rules that keep each one correct (a write must never fall between "looked" and
"re-armed" without being seen):

* ``uffd-wp`` reads and re-arms atomically in one ioctl (``PM_SCAN_WP_MATCHING``), so it can
  collect while the process runs.
* soft-dirty has no atomic read-and-clear: a page written after its bit was read and before
  ``clear_refs`` would lose its bit. The soft-dirty trackers therefore collect with the process
  frozen (``needs_freeze`` is True): read bits, write ``4`` to clear_refs, thaw; page contents
  are read afterwards, while it runs, and anything written after the clear is dirty again next
  round (CRIU's pre-dump does the same: criu/mem.c, ``task_reset_dirty_track``).
* ``hash`` compares contents read while the process runs; a page written after it was hashed
  differs next round, and the final round is hashed frozen.

Pages the tracker cannot vouch for (new VMAs, pages it never armed) count as dirty.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from pagehaul.procfs import Vma
from pagehaul.runs import Runs
from sender.freezer import PtraceFreezer
from sender.memreader import Buffer


@dataclass(frozen=True, slots=True)
class Availability:
    """Can this tracker run on this kernel, and if not, why not."""

    name: str
    available: bool
    reason: str


class DirtyTracker(Protocol):
    #: the name used by ``--tracker`` and in logs
    name: str
    #: True if :meth:`collect` must run with the target frozen (see module docstring)
    needs_freeze: bool

    def start(self, vmas: Sequence[Vma], freezer: PtraceFreezer) -> None:
        """Arm tracking for ``vmas``. Called with the target frozen by ``freezer`` (every thread
        ptrace-stopped; ptrace calls only from the caller's thread), before round 0 reads any
        page. A tracker that needs to run code in the target (uffd-wp) does it through the
        freezer's stopped threads and leaves them stopped exactly as they were."""

    def collect(self, vmas: Sequence[Vma], present: Runs) -> Runs:
        """Pages written since the previous collect (or start), re-armed for the next round.

        ``vmas`` are the current dumpable VMAs (new ones are armed now and reported wholly
        dirty); ``present`` are the pages the scanner found with data now. The result is sorted,
        disjoint, and may include pages that are not present (the caller intersects).
        """

    def close(self) -> None:
        """Disarm; leave the target as it was. Idempotent; called on success and on failure."""


class PageReader(Protocol):
    """Reads pages by address into a buffer: ``MemoryReader`` (a process), ``ShmObject`` (a shared
    memory object, by offset)."""

    def read(self, runs: Runs, out: Buffer, page_size: int = ...) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class SentRecorder(Protocol):
    """A tracker that must see the bytes actually sent (``hash``): a page read for sending can
    change and change back before the next collect; comparing against what was sent, not what
    was hashed at collect, catches that."""

    def record_sent(self, runs: Runs, data: Buffer) -> None:
        """``data`` holds the pages of ``runs`` in run order, as read for sending. Thread-safe."""

"""Which pages each round sends, given what is present now, what the tracker says changed, and
what the receiver already holds from the previous round.

Per present page, in a round after the first:

* dirty (written since the previous collect)        -> data
* clean and in the previous round's pagemap         -> parent hole (PE_PARENT)
* clean and known zero in the previous round        -> zero hole (zero pages are not in the pagemap)
* clean but never sent (skipped, or the tracker could not vouch for it) -> data

Pages no longer present are left out: an anonymous page missing from the pagemap restores as
zero, which is what an unmapped-then-refaulted or MADV_DONTNEED'ed page reads as. Work is on
sorted page-address arrays with numpy set operations: 8 bytes per present page.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pagehaul.codec import ImageKey
from pagehaul.procfs import Vma
from pagehaul.runs import U64, Runs, lookup
from sender.trackers.base import PageReader, SentRecorder

if TYPE_CHECKING:
    from sender.target import DirtySets, ImageScan


def _empty() -> U64:
    return np.zeros(0, np.uint64)


@dataclass(frozen=True, slots=True)
class Held:
    """What the receiver's latest round holds: pagemap pages (data or parent) and zero pages.

    ``digests``, when kept, is the xxh3 of each ``cover`` page as the receiver holds it (same
    order): what lets a full migration prove a page CRIU dumped is one the receiver already has.
    """

    cover: U64
    zero: U64
    digests: U64 | None = None

    @classmethod
    def nothing(cls) -> Held:
        return cls(_empty(), _empty())


@dataclass(frozen=True, slots=True)
class RoundPlan:
    data: Runs
    parent: Runs
    zero: Runs
    dirty_pages: int  # present pages the tracker reported dirty

    @property
    def pages_to_read(self) -> int:
        return self.data.total_pages


def plan_round(present: Runs, dirty: Runs | None, held: Held | None, page_size: int) -> RoundPlan:
    """``dirty`` None (or ``held`` None) means send every present page."""
    if dirty is None or held is None:
        return RoundPlan(present, Runs.empty(), Runs.empty(), present.total_pages)
    pages = present.page_addrs(page_size)
    is_dirty = np.isin(pages, dirty.page_addrs(page_size), assume_unique=True)
    clean = pages[~is_dirty]
    in_cover = np.isin(clean, held.cover, assume_unique=True)
    in_zero = ~in_cover & np.isin(clean, held.zero, assume_unique=True)
    unknown = ~in_cover & ~in_zero
    data = np.union1d(pages[is_dirty], clean[unknown]) if unknown.any() else pages[is_dirty]
    return RoundPlan(
        data=Runs.from_page_addrs(data, page_size),
        parent=Runs.from_page_addrs(clean[in_cover], page_size),
        zero=Runs.from_page_addrs(clean[in_zero], page_size),
        dirty_pages=int(is_dirty.sum()),
    )


def held_after(sent: Runs, parent: Runs, zero: Runs, page_size: int, *, sent_digests: U64 | None = None,
               before: Held | None = None) -> Held:
    """The receiver's holdings once a round with these runs is committed.

    With ``sent_digests`` (one per page of ``sent``, in run order) and the holdings ``before``
    the round (with digests), the result carries the digest of every page it covers: sent
    pages take their new digest, parent pages keep the one they had.
    """
    sent_addrs = sent.page_addrs(page_size)
    cover = np.union1d(sent_addrs, parent.page_addrs(page_size))
    zero_addrs = np.sort(zero.page_addrs(page_size))
    if sent_digests is None:
        return Held(cover=cover, zero=zero_addrs)
    if sent_digests.size != sent_addrs.size:
        raise ValueError(f"{sent_digests.size} digests for {sent_addrs.size} sent pages")
    digests = np.zeros(cover.size, np.uint64)
    order = np.argsort(sent_addrs, kind="stable")
    from_sent = np.isin(cover, sent_addrs, assume_unique=True)
    digests[from_sent] = sent_digests[order]
    inherited = cover[~from_sent]
    if inherited.size:
        if before is None or before.digests is None:
            raise ValueError("parent pages without the digests of the round before")
        found, pos = lookup(before.cover, inherited)
        if not found.all():
            raise ValueError(f"parent page 0x{int(inherited[~found][0]):x} not held by the round before")
        digests[~from_sent] = before.digests[pos]
    return Held(cover=cover, zero=zero_addrs, digests=digests)


@dataclass(frozen=True, slots=True)
class RoundPart:
    """One memory image of one round, planned: a process, or a shared-memory object."""

    key: ImageKey
    pid: int  # host pid of the process (the object's first mapper for shared memory)
    vmas: list[Vma]
    plan: RoundPlan
    source: PageReader
    recorder: SentRecorder | None
    # Its loss fails the migration (the root of a tree); other processes may exit meanwhile.
    essential: bool = False


def plan_parts(scans: list[ImageScan], dirty: DirtySets, held: dict[ImageKey, Held],
               page_size: int) -> list[RoundPart]:
    """The round's plan for every image scanned: an image never sent before goes whole."""
    return [RoundPart(s.key, s.pid, s.vmas,
                      plan_round(s.present, dirty.get(s.key), None if s.fresh else held.get(s.key), page_size),
                      s.source, s.recorder, s.essential) for s in scans]

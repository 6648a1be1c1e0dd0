"""Runs of pages as parallel numpy arrays: the unit every stage works on.

A run is ``(vaddr, nr_pages)``: ``nr_pages`` pages starting at the page-aligned address
``vaddr``. Scanners produce runs, batches carry runs, holes are runs, pagemap entries are runs.
Keeping them as two ``uint64`` arrays lets every transformation (merge, split into batches,
expand to pages, collapse back) run as a handful of vectorised numpy calls instead of a Python
loop per page.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

U64 = npt.NDArray[np.uint64]


def _u64(values: Iterable[int] | npt.ArrayLike) -> U64:
    return np.ascontiguousarray(np.asarray(values, dtype=np.uint64).reshape(-1))


def in_ranges(addrs: U64, starts: U64, ends: U64) -> npt.NDArray[np.bool_]:
    """Which addresses lie inside one of the half-open ranges ``[starts[i], ends[i])``, given
    sorted and disjoint (the addresses need no order)."""
    if starts.size == 0:
        return np.zeros(addrs.size, np.bool_)
    idx = np.searchsorted(starts, addrs, side="right").astype(np.int64) - 1
    inside: npt.NDArray[np.bool_] = (idx >= 0) & (addrs < ends[np.maximum(idx, 0)])
    return inside


def lookup(sorted_addrs: U64, addrs: U64) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.intp]]:
    """For each of ``addrs``: is it in ``sorted_addrs`` (sorted, distinct), and at which index
    (0 where it is not, so the index is always valid for a non-empty array)."""
    pos = np.searchsorted(sorted_addrs, addrs)
    found = pos < sorted_addrs.size
    found[found] = sorted_addrs[pos[found]] == addrs[found]
    return found, np.where(found, pos, 0)


@dataclass(frozen=True, slots=True, eq=False)
class Runs:
    """Page runs: ``vaddr[i]`` is the start address, ``nr_pages[i]`` the length in pages."""

    vaddr: U64
    nr_pages: U64

    def __post_init__(self) -> None:
        if self.vaddr.shape != self.nr_pages.shape:
            raise ValueError(f"vaddr and nr_pages differ in length: {self.vaddr.shape} vs {self.nr_pages.shape}")

    @classmethod
    def empty(cls) -> Runs:
        return cls(np.zeros(0, np.uint64), np.zeros(0, np.uint64))

    @classmethod
    def of(cls, vaddr: Iterable[int] | npt.ArrayLike, nr_pages: Iterable[int] | npt.ArrayLike) -> Runs:
        return cls(_u64(vaddr), _u64(nr_pages))

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[int, int]]) -> Runs:
        items = list(pairs)
        if not items:
            return cls.empty()
        arr = np.asarray(items, dtype=np.uint64)
        return cls(np.ascontiguousarray(arr[:, 0]), np.ascontiguousarray(arr[:, 1]))

    @classmethod
    def concat(cls, parts: Iterable[Runs]) -> Runs:
        items = [p for p in parts if len(p)]
        if not items:
            return cls.empty()
        return cls(np.concatenate([p.vaddr for p in items]), np.concatenate([p.nr_pages for p in items]))

    @classmethod
    def from_page_addrs(cls, addrs: U64, page_size: int) -> Runs:
        """Collapse sorted, distinct page addresses into maximal runs."""
        addrs = _u64(addrs)
        if addrs.size == 0:
            return cls.empty()
        breaks = np.flatnonzero(np.diff(addrs) != page_size) + 1
        starts = np.concatenate(([0], breaks))
        ends = np.concatenate((breaks, [addrs.size]))
        return cls(addrs[starts], (ends - starts).astype(np.uint64))

    def __len__(self) -> int:
        return int(self.vaddr.size)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return zip(self.vaddr.tolist(), self.nr_pages.tolist(), strict=True)

    @property
    def total_pages(self) -> int:
        return int(self.nr_pages.sum(dtype=np.uint64))

    def ends(self, page_size: int) -> U64:
        """Exclusive end address of each run."""
        return self.vaddr + self.nr_pages * np.uint64(page_size)

    def pairs(self) -> list[tuple[int, int]]:
        return list(self)

    def sorted(self) -> Runs:
        order = np.argsort(self.vaddr, kind="stable")
        return Runs(self.vaddr[order], self.nr_pages[order])

    def is_sorted_disjoint(self, page_size: int) -> bool:
        """True if runs ascend and none overlaps the next (touching is allowed)."""
        if len(self) < 2:
            return True
        return bool(np.all(self.ends(page_size)[:-1] <= self.vaddr[1:]))

    def merged(self, page_size: int) -> Runs:
        """Coalesce runs that touch; input must be sorted and disjoint."""
        if len(self) < 2:
            return self
        ends = self.ends(page_size)
        new_start = np.concatenate(([True], self.vaddr[1:] != ends[:-1]))
        idx = np.flatnonzero(new_start)
        last = np.concatenate((idx[1:] - 1, [len(self) - 1]))
        starts = self.vaddr[idx]
        return Runs(starts, ((ends[last] - starts) // np.uint64(page_size)).astype(np.uint64))

    def page_addrs(self, page_size: int) -> U64:
        """Every page address covered, in run order."""
        total = self.total_pages
        if total == 0:
            return np.zeros(0, np.uint64)
        offsets = np.arange(total, dtype=np.uint64)
        firsts = np.concatenate(([0], np.cumsum(self.nr_pages)[:-1])).astype(np.uint64)
        run_of_page = np.repeat(np.arange(len(self)), self.nr_pages.astype(np.int64))
        return self.vaddr[run_of_page] + (offsets - firsts[run_of_page]) * np.uint64(page_size)

    def select_pages(self, mask: npt.NDArray[np.bool_], page_size: int) -> Runs:
        """Runs covering the pages (in run order) where ``mask`` is true."""
        if mask.size != self.total_pages:
            raise ValueError(f"mask has {mask.size} entries for {self.total_pages} pages")
        if mask.all():
            return self.merged(page_size)
        return Runs.from_page_addrs(self.page_addrs(page_size)[mask], page_size)

    def split(self, max_pages: int, page_size: int) -> Iterator[Runs]:
        """Consecutive chunks of at most ``max_pages`` pages each, cutting runs where needed.

        The chunks, in order, cover exactly the input.
        """
        if max_pages <= 0:
            raise ValueError("max_pages must be positive")
        if len(self) == 0:
            return
        cum = np.cumsum(self.nr_pages)
        total = int(cum[-1])
        start_page = 0
        while start_page < total:
            end_page = min(start_page + max_pages, total)
            first = int(np.searchsorted(cum, start_page, side="right"))
            last = int(np.searchsorted(cum, end_page, side="left"))
            sel_v = self.vaddr[first:last + 1].copy()
            sel_n = self.nr_pages[first:last + 1].copy()
            skip = start_page - int(cum[first] - self.nr_pages[first])
            sel_n[-1] -= np.uint64(int(cum[last]) - end_page)
            if skip:
                sel_n[0] -= np.uint64(skip)
                sel_v[0] += np.uint64(skip * page_size)
            yield Runs(sel_v, sel_n)
            start_page = end_page

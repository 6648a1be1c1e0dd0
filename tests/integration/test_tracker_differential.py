"""Every dirty tracker against one page-write history: the same dirty set, round by round.

The trackers that work on this machine's kernel (hash, and uffd-wp once sender.trackers.uffd
exists) run against a real writer child. The two soft-dirty trackers cannot: this kernel lacks
CONFIG_MEM_SOFT_DIRTY, so they run on a fake procfs where the test plays the kernel, applying
the same history as synthetic pagemap words (tests.helpers.writer_child.FakeSoftDirtyProcess;
the PAGEMAP_SCAN variant through an injected scan function derived from those words).

Dirty sets are compared as page indices relative to each region's start, intersected with the
present pages (the tracker interface lets a tracker report non-present pages; the agent drops
them).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sender.freezer import PtraceFreezer
from sender.scanner import PageScanner, make_scanner
from sender.trackers.base import DirtyTracker
from sender.trackers.hashing import HashTracker
from sender.trackers.softdirty import SoftDirtyPagemapTracker, SoftDirtyScanTracker
from tests.helpers.writer_child import (
    FakeSoftDirtyProcess,
    dumpable_vmas,
    fake_scan_fn,
    relative_pages,
    writer_child,
)

Dirty = dict[str, set[int]]


@dataclass(frozen=True)
class Round:
    writes: Dirty = field(default_factory=dict)
    maps: dict[str, int] = field(default_factory=dict)  # regions appearing this round, all pages written


INITIAL = {"A": 40, "B": 24}
HISTORY = [
    Round(writes={"A": {0, 1, 2, 17, 39}, "B": {5}}),
    Round(maps={"C": 12}, writes={"A": {17}}),
    Round(writes={"B": {0, 23}, "C": {11}}),
    Round(),
    Round(writes={"A": set(range(8, 24)), "C": set(range(12)), "B": {7, 8, 9}}),
]


def expected() -> list[Dirty]:
    regions = dict(INITIAL)
    rounds = []
    for rnd in HISTORY:
        regions.update(rnd.maps)
        dirty: Dirty = {name: set() for name in regions}
        for name, written in rnd.writes.items():
            dirty[name] |= written
        for name, size in rnd.maps.items():
            dirty[name] = set(range(size))  # a new region is dirty as a whole
        rounds.append(dirty)
    return rounds


# --- running the history ---------------------------------------------------------------------

RealFactory = Callable[[int, PageScanner], DirtyTracker]
FakeFactory = Callable[[FakeSoftDirtyProcess], DirtyTracker]


def run_real(make: RealFactory) -> list[Dirty]:
    with writer_child(INITIAL) as child, make_scanner(child.pid) as scanner:
        freezer = PtraceFreezer(child.pid)
        tracker = make(child.pid, scanner)
        try:
            with freezer:
                tracker.start(dumpable_vmas(child.pid), freezer)
            results = []
            for rnd in HISTORY:
                for name, size in rnd.maps.items():
                    child.map(name, size)
                for name, written in rnd.writes.items():
                    child.write(name, written)
                if tracker.needs_freeze:
                    freezer.freeze()
                try:
                    vmas = dumpable_vmas(child.pid)
                    present = scanner.scan(vmas)
                    dirty = tracker.collect(vmas, present)
                finally:
                    freezer.thaw()
                results.append(relative_pages(dirty, child.regions, present))
            return results
        finally:
            tracker.close()
            freezer.thaw()


def run_fake(make: FakeFactory, root: Path) -> list[Dirty]:
    fake = FakeSoftDirtyProcess(root)
    for name, pages in INITIAL.items():
        fake.map(name, pages)
    tracker = make(fake)
    try:
        tracker.start(fake.vmas(), PtraceFreezer(fake.pid, fake.root))  # no process: never frozen
        fake.kernel_clear_refs()
        results = []
        for rnd in HISTORY:
            for name, size in rnd.maps.items():
                fake.map(name, size)
            for name, written in rnd.writes.items():
                fake.write(name, written)
            present = fake.present()
            dirty = tracker.collect(fake.vmas(), present)
            fake.kernel_clear_refs()
            results.append(relative_pages(dirty, fake.regions, present))
        return results
    finally:
        tracker.close()


def uffd_factory() -> RealFactory | None:
    if importlib.util.find_spec("sender.trackers.uffd") is None:
        return None
    uffd = importlib.import_module("sender.trackers.uffd")
    tracker_cls: Callable[[int], DirtyTracker] = uffd.UffdWpTracker
    return lambda pid, _scanner: tracker_cls(pid)


def real_trackers() -> list[object]:
    uffd = uffd_factory()
    return [
        pytest.param(HashTracker, id="hash"),
        pytest.param(uffd, id="uffd-wp",
                     marks=pytest.mark.skipif(uffd is None, reason="uffd tracker not built yet")),
    ]


def fake_trackers() -> list[object]:
    return [
        pytest.param(lambda f: SoftDirtyPagemapTracker(f.pid, f.root, verify_kernel=False), id="soft-dirty-pagemap"),
        pytest.param(lambda f: SoftDirtyScanTracker(f.pid, f.root, scan_fn=fake_scan_fn(f), verify_kernel=False),
                     id="soft-dirty-scan"),
    ]


# --- tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("make", real_trackers())
def test_real_tracker_follows_the_history(make: RealFactory) -> None:
    assert run_real(make) == expected()


@pytest.mark.parametrize("make", fake_trackers())
def test_soft_dirty_tracker_follows_the_synthetic_history(make: FakeFactory, tmp_path: Path) -> None:
    assert run_fake(make, tmp_path / "proc") == expected()


def test_all_trackers_agree_round_by_round(tmp_path: Path) -> None:
    # The direct differential: no expected answer, only the trackers against each other.
    answers: dict[str, list[Dirty]] = {
        "hash": run_real(HashTracker),
        "soft-dirty-pagemap": run_fake(
            lambda f: SoftDirtyPagemapTracker(f.pid, f.root, verify_kernel=False), tmp_path / "p"),
        "soft-dirty-scan": run_fake(
            lambda f: SoftDirtyScanTracker(f.pid, f.root, scan_fn=fake_scan_fn(f), verify_kernel=False),
            tmp_path / "s"),
    }
    uffd = uffd_factory()
    if uffd is not None:
        answers["uffd-wp"] = run_real(uffd)
    reference = answers["hash"]
    assert len(reference) == len(HISTORY)
    assert any(any(pages for pages in dirty.values()) for dirty in reference)
    for name, got in answers.items():
        for i, (mine, theirs) in enumerate(zip(got, reference, strict=True)):
            assert mine == theirs, f"round {i + 1}: {name} disagrees with hash"

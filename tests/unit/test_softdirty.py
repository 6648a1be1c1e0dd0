"""The soft-dirty trackers on a fake procfs, and their probes against the real kernel.

This project's machine runs a kernel without CONFIG_MEM_SOFT_DIRTY: bit 55 never sets, so the
trackers cannot be exercised on a real process here. The tracker tests therefore run on a fake
``/proc/PID`` (tests.helpers.writer_child.FakeSoftDirtyProcess) where the test plays the kernel:
it sets bit 55 on the pages "written" in a round, checks that the tracker wrote ``4`` to
clear_refs, and clears bit 55 as the kernel would. The PAGEMAP_SCAN tracker gets an injected
scan function deriving ``page_region`` answers from the same words, because a regular file
cannot take the ioctl. The probe tests run against the real kernel and are checked against
the kernel's own config.
"""

from __future__ import annotations

import gzip
import os
import platform
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from pagehaul import kernel
from pagehaul.errors import KernelUnsupported, ProcessGone
from pagehaul.runs import Runs
from pagehaul.v1 import migration_pb2 as pb
from pagehaul.wire import TRACKER_NAMES, tracker_wire
from sender.freezer import PtraceFreezer
from sender.trackers.base import DirtyTracker
from sender.trackers.softdirty import (
    CONFIG_OFF_REASON,
    SoftDirtyPagemapTracker,
    SoftDirtyScanTracker,
    probe_pagemap,
    probe_scan,
    union,
)
from tests.helpers.writer_child import FAKE_BASE, FakeSoftDirtyProcess, fake_scan_fn, relative_pages

P = kernel.PAGE_SIZE

Factory = Callable[[FakeSoftDirtyProcess], SoftDirtyPagemapTracker | SoftDirtyScanTracker]


def pagemap_tracker(fake: FakeSoftDirtyProcess) -> SoftDirtyPagemapTracker:
    return SoftDirtyPagemapTracker(fake.pid, fake.root, verify_kernel=False)


def scan_tracker(fake: FakeSoftDirtyProcess) -> SoftDirtyScanTracker:
    return SoftDirtyScanTracker(fake.pid, fake.root, scan_fn=fake_scan_fn(fake), verify_kernel=False)


def tiny_vec_scan_tracker(fake: FakeSoftDirtyProcess) -> SoftDirtyScanTracker:
    # Two regions per call, and walk_end left at the walk's start whenever the vector fills.
    return SoftDirtyScanTracker(fake.pid, fake.root, scan_fn=fake_scan_fn(fake, quirky_walk_end=True),
                                vec_len=2, verify_kernel=False)


FACTORIES = pytest.mark.parametrize("make", [pagemap_tracker, scan_tracker, tiny_vec_scan_tracker],
                                    ids=["pagemap", "scan", "scan-vec2-quirk"])


@pytest.fixture
def fake(tmp_path: Path) -> FakeSoftDirtyProcess:
    proc = FakeSoftDirtyProcess(tmp_path / "proc")
    proc.map("A", 64)
    proc.map("B", 8)
    proc.map("C", 300)
    return proc


def unused_freezer(fake: FakeSoftDirtyProcess) -> PtraceFreezer:
    # The soft-dirty trackers never touch the freezer; there is no real process to freeze.
    return PtraceFreezer(fake.pid, fake.root)


def start(tracker: DirtyTracker, fake: FakeSoftDirtyProcess) -> None:
    tracker.start(fake.vmas(), unused_freezer(fake))
    fake.kernel_clear_refs()


def collect(tracker: DirtyTracker, fake: FakeSoftDirtyProcess) -> dict[str, set[int]]:
    dirty = tracker.collect(fake.vmas(), fake.present())
    assert dirty.is_sorted_disjoint(P)
    assert len(dirty.merged(P)) == len(dirty)
    fake.kernel_clear_refs()  # fails unless the tracker wrote "4"
    return relative_pages(dirty, fake.regions)


def empty(fake: FakeSoftDirtyProcess) -> dict[str, set[int]]:
    return {name: set() for name in fake.regions}


# --- rounds --------------------------------------------------------------------------------------

ROUNDS: list[dict[str, set[int]]] = [
    {"A": {0, 1, 2, 63}, "B": {4}},
    {"C": set(range(100, 260)) | {0, 299}},
    {},
    {"A": {5}, "B": set(range(8)), "C": {150}},
]


@FACTORIES
def test_collect_returns_exactly_the_pages_written_each_round(fake: FakeSoftDirtyProcess, make: Factory) -> None:
    tracker = make(fake)
    try:
        assert tracker.needs_freeze
        start(tracker, fake)
        for written in ROUNDS:
            for name, pages in written.items():
                fake.write(name, pages)
            assert collect(tracker, fake) == {**empty(fake), **written}
        assert tracker.clears == 1 + len(ROUNDS)
    finally:
        tracker.close()


@FACTORIES
def test_new_vma_is_wholly_dirty_then_tracked(fake: FakeSoftDirtyProcess, make: Factory) -> None:
    tracker = make(fake)
    try:
        start(tracker, fake)
        fake.map("D", 20)  # the kernel marks it VM_SOFTDIRTY: every page reads soft-dirty
        fake.write("A", {9})
        assert collect(tracker, fake) == {**empty(fake), "A": {9}, "D": set(range(20))}
        fake.write("D", {3})
        assert collect(tracker, fake) == {**empty(fake), "D": {3}}
    finally:
        tracker.close()


@FACTORIES
def test_unseen_vma_is_dirty_even_without_the_kernel_marking_it(fake: FakeSoftDirtyProcess, make: Factory) -> None:
    tracker = make(fake)
    try:
        start(tracker, fake)
        fake.map("D", 20, vm_softdirty=False)  # a kernel that failed to set VM_SOFTDIRTY
        assert collect(tracker, fake) == {**empty(fake), "D": set(range(20))}
        assert collect(tracker, fake) == empty(fake)
        fake.grow("D", 4, vm_softdirty=False)  # a grown VMA counts as a new one, old pages too
        assert collect(tracker, fake) == {**empty(fake), "D": set(range(24))}
        assert collect(tracker, fake) == empty(fake)
    finally:
        tracker.close()


@FACTORIES
def test_swapped_pages_keep_their_bit_and_dropped_pages_lose_it(fake: FakeSoftDirtyProcess, make: Factory) -> None:
    tracker = make(fake)
    try:
        start(tracker, fake)
        a = fake.regions["A"][0]
        # Page 10 written, then swapped out: the swap pte keeps bit 55 (pte_swp_soft_dirty).
        fake.set_words(a + 10 * P, [kernel.PM_SWAP | kernel.PM_SOFT_DIRTY | (7 << 5)])
        fake.write("A", {11, 12})
        fake.dontneed("A", {12})  # written, then MADV_DONTNEED: pte gone, nothing to report
        assert collect(tracker, fake) == {**empty(fake), "A": {10, 11}}
    finally:
        tracker.close()


@FACTORIES
def test_soft_dirty_pages_outside_the_vmas_are_ignored(fake: FakeSoftDirtyProcess, make: Factory) -> None:
    tracker = make(fake)
    try:
        start(tracker, fake)
        # The hole page after region A (a mapping the caller did not select, say shared memory)
        # reads soft-dirty; it lies inside the cache's 2 MiB window but outside every VMA.
        a, pages = fake.regions["A"]
        fake.set_words(a + pages * P, [kernel.PM_PRESENT | kernel.PM_SOFT_DIRTY | 0x999])
        dirty = tracker.collect(fake.vmas(), fake.present())
        assert dirty.total_pages == 0
        fake.kernel_clear_refs()
    finally:
        tracker.close()


def test_pagemap_tracker_reads_many_small_vmas_through_the_cache(tmp_path: Path) -> None:
    fake = FakeSoftDirtyProcess(tmp_path / "proc")
    for i in range(256):
        fake.map(f"v{i}", 10)  # 40 KiB each, one-page holes between them
    tracker = pagemap_tracker(fake)
    try:
        start(tracker, fake)
        fake.write("v0", {0})
        fake.write("v255", {9})
        fake.write("v100", {3, 4})
        got = collect(tracker, fake)
        assert {k: v for k, v in got.items() if v} == {"v0": {0}, "v100": {3, 4}, "v255": {9}}
        assert tracker.cache.fills <= 256 // 16
        assert tracker.cache.fills + tracker.cache.hits == 256
    finally:
        tracker.close()


def test_scan_variant_gives_the_pagemap_variant_answers_on_random_histories(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    fakes = [FakeSoftDirtyProcess(tmp_path / name) for name in ("a", "b", "c")]
    for fake in fakes:
        for i in range(12):
            fake.map(f"r{i}", 50)
    by_pagemap, by_scan, by_tiny_scan = (pagemap_tracker(fakes[0]), scan_tracker(fakes[1]),
                                         tiny_vec_scan_tracker(fakes[2]))
    trackers: list[DirtyTracker] = [by_pagemap, by_scan, by_tiny_scan]
    try:
        for tracker, fake in zip(trackers, fakes, strict=True):
            start(tracker, fake)
        for _ in range(6):
            written = {f"r{i}": set(rng.choice(50, int(rng.integers(0, 20)), replace=False).tolist())
                       for i in range(12)}
            answers = []
            for tracker, fake in zip(trackers, fakes, strict=True):
                for name, pages in written.items():
                    fake.write(name, pages)
                answers.append(collect(tracker, fake))
            assert answers[0] == written
            assert answers[1] == answers[0]
            assert answers[2] == answers[0]
        assert by_tiny_scan.ioctls > by_scan.ioctls  # the tiny vector needed resumed walks
    finally:
        for tracker in trackers:
            tracker.close()


# --- protocol, errors ------------------------------------------------------------------------------


def test_names_and_wire_values(fake: FakeSoftDirtyProcess) -> None:
    trackers: list[DirtyTracker] = [pagemap_tracker(fake), scan_tracker(fake)]
    try:
        assert [(t.name, tracker_wire(t.name), t.needs_freeze) for t in trackers] == [
            ("soft-dirty-pagemap", pb.TRACKER_SOFT_DIRTY_PAGEMAP, True),
            ("soft-dirty-scan", pb.TRACKER_SOFT_DIRTY_SCAN, True),
        ]
    finally:
        for t in trackers:
            t.close()
            t.close()  # idempotent


@FACTORIES
def test_collect_before_start_is_refused(fake: FakeSoftDirtyProcess, make: Factory) -> None:
    tracker = make(fake)
    try:
        with pytest.raises(RuntimeError, match="before start"):
            tracker.collect(fake.vmas(), fake.present())
    finally:
        tracker.close()


@FACTORIES
def test_vanished_process_is_process_gone(fake: FakeSoftDirtyProcess, make: Factory) -> None:
    tracker = make(fake)
    try:
        vmas = fake.vmas()
        start(tracker, fake)
        shutil.rmtree(fake.dir)
        with pytest.raises(ProcessGone) as info:
            tracker.collect(vmas, Runs.empty())
        assert info.value.pid == fake.pid
    finally:
        tracker.close()


def test_missing_clear_refs_is_kernel_unsupported(fake: FakeSoftDirtyProcess) -> None:
    (fake.dir / "clear_refs").unlink()  # CONFIG_PROC_PAGE_MONITOR off: no such file
    tracker = pagemap_tracker(fake)
    try:
        with pytest.raises(KernelUnsupported, match="clear_refs"):
            tracker.start(fake.vmas(), unused_freezer(fake))
    finally:
        tracker.close()


def test_union_merges_overlapping_and_touching_runs() -> None:
    a = Runs.from_pairs([(FAKE_BASE, 4), (FAKE_BASE + 10 * P, 2)])
    b = Runs.from_pairs([(FAKE_BASE + 2 * P, 5), (FAKE_BASE + 12 * P, 1), (FAKE_BASE + 20 * P, 1)])
    assert union(a, b).pairs() == [(FAKE_BASE, 7), (FAKE_BASE + 10 * P, 3), (FAKE_BASE + 20 * P, 1)]
    assert union(Runs.empty(), Runs.empty()).pairs() == []


# --- probes, against the real kernel -----------------------------------------------------------------


def kernel_config_soft_dirty() -> bool | None:
    """CONFIG_MEM_SOFT_DIRTY from the running kernel's config, or None if it is not readable."""
    for path in (Path("/proc/config.gz"), Path(f"/boot/config-{platform.release()}")):
        try:
            raw = path.read_bytes()
        except OSError:
            continue
        text = gzip.decompress(raw).decode() if path.suffix == ".gz" else raw.decode()
        return "CONFIG_MEM_SOFT_DIRTY=y" in text.splitlines()
    return None


def kernel_version() -> tuple[int, int]:
    major, minor = platform.release().split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()))


CONFIG = kernel_config_soft_dirty()
needs_config = pytest.mark.skipif(CONFIG is None, reason="kernel config not readable (/proc/config.gz, /boot)")


@needs_config
def test_pagemap_probe_agrees_with_the_kernel_config() -> None:
    availability = probe_pagemap()
    assert availability.name == "soft-dirty-pagemap"
    assert availability.available is CONFIG
    if not CONFIG:  # this project's machine
        assert availability.reason == CONFIG_OFF_REASON


@needs_config
def test_scan_probe_agrees_with_the_kernel_config_and_version() -> None:
    availability = probe_scan()
    assert availability.name == "soft-dirty-scan"
    assert availability.available is (bool(CONFIG) and kernel_version() >= (6, 8))
    if not CONFIG:
        assert availability.reason == CONFIG_OFF_REASON
    elif kernel_version() < (6, 8):
        assert "6.8" in availability.reason or "6.7" in availability.reason


@pytest.mark.skipif(CONFIG is not False, reason="only a kernel without CONFIG_MEM_SOFT_DIRTY refuses")
@pytest.mark.parametrize("cls", [SoftDirtyPagemapTracker, SoftDirtyScanTracker])
def test_start_refuses_on_a_kernel_without_soft_dirty(
        cls: type[SoftDirtyPagemapTracker | SoftDirtyScanTracker]) -> None:
    # Tracking on such a kernel would report nothing and silently lose every write.
    tracker = cls(os.getpid())
    try:
        with pytest.raises(KernelUnsupported, match="CONFIG_MEM_SOFT_DIRTY is off"):
            tracker.start([], PtraceFreezer(os.getpid()))
        assert tracker.clears == 0
    finally:
        tracker.close()


def test_every_tracker_name_has_one_wire_identity() -> None:
    from sender.trackers import AUTO_ORDER

    assert {tracker_wire(name) for name in (*AUTO_ORDER, "none")} == set(TRACKER_NAMES)

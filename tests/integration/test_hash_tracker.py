"""HashTracker against a real child that writes chosen pages on command (tests.helpers.writer_child)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import xxhash

from pagehaul import kernel
from pagehaul.digest import page_digests
from pagehaul.errors import ProcessGone
from pagehaul.runs import Runs
from sender.freezer import PtraceFreezer
from sender.memreader import MemoryReader
from sender.scanner import make_scanner
from sender.trackers.base import DirtyTracker
from sender.trackers.hashing import HashTracker, probe
from tests.helpers.children import read_mem
from tests.helpers.writer_child import WriterChild, dumpable_vmas, relative_pages, writer_child

P = kernel.PAGE_SIZE


@pytest.fixture
def child() -> Iterator[WriterChild]:
    with writer_child({"A": 64, "B": 16}) as w:
        yield w


@contextmanager
def started_tracker(child: WriterChild) -> Iterator[HashTracker]:
    t = HashTracker(child.pid, batch_bytes=64 * P)  # small batches: many reads per round
    try:
        freezer = PtraceFreezer(child.pid)
        with freezer:
            t.start(dumpable_vmas(child.pid), freezer)
        yield t
    finally:
        t.close()


@pytest.fixture
def tracker(child: WriterChild) -> Iterator[HashTracker]:
    with started_tracker(child) as t:
        yield t


def collect(tracker: DirtyTracker, child: WriterChild) -> dict[str, set[int]]:
    vmas = dumpable_vmas(child.pid)
    with make_scanner(child.pid) as scanner:
        present = scanner.scan(vmas)
    dirty = tracker.collect(vmas, present)
    assert dirty.is_sorted_disjoint(P)
    assert len(dirty.merged(P)) == len(dirty)
    return relative_pages(dirty, child.regions)


def nothing(child: WriterChild) -> dict[str, set[int]]:
    return {name: set() for name in child.regions}


def test_reports_exactly_the_written_pages_round_after_round(child: WriterChild, tracker: HashTracker) -> None:
    rounds = [{"A": {0, 1, 2, 40}, "B": {15}}, {}, {"A": set(range(10, 50))}, {"B": set(range(16))}]
    for written in rounds:
        for name, pages in written.items():
            child.write(name, pages)
        assert collect(tracker, child) == {**nothing(child), **written}


def test_identical_rewrites_are_not_reported(child: WriterChild, tracker: HashTracker) -> None:
    # Stores of the bytes already there: soft-dirty and uffd-wp would report them, content
    # hashing (correctly) does not; the pages hold what the receiver already has.
    child.rewrite("A", range(64))
    child.write("B", {3})
    assert collect(tracker, child) == {**nothing(child), "B": {3}}


def test_new_vma_is_reported_whole_then_tracked(child: WriterChild, tracker: HashTracker) -> None:
    child.map("C", 24)
    assert collect(tracker, child) == {**nothing(child), "C": set(range(24))}
    child.write("C", {7})
    assert collect(tracker, child) == {**nothing(child), "C": {7}}


def test_pages_freed_with_dontneed_drop_out(child: WriterChild, tracker: HashTracker) -> None:
    def tracked_in_a() -> int:  # the interpreter's own pages come and go: count region A only
        return sum(tracker.digest_of(child.addr("A", page)) is not None for page in range(64))

    assert tracked_in_a() == 64
    child.dontneed("A", {4, 5, 6})
    assert collect(tracker, child) == nothing(child)  # gone, not dirty: nothing to send
    assert tracked_in_a() == 61
    assert all(tracker.digest_of(child.addr("A", page)) is None for page in (4, 5, 6))
    child.write("A", {5})  # faulted in again: a page with no digest is new, hence dirty
    assert collect(tracker, child) == {**nothing(child), "A": {5}}


def test_written_back_page_is_caught_only_through_record_sent(child: WriterChild) -> None:
    # Hashed as X at a collect that reports it, written to Y before the sender reads it (so Y
    # is sent), written back to X before the next collect: the receiver holds Y, so the page is
    # dirty although its content equals the digest taken at the collect.
    a = child.addr("B", 2)
    with started_tracker(child) as with_record, started_tracker(child) as without_record, \
            MemoryReader(child.pid) as reader:
        x = int.from_bytes(read_mem(child.pid, a, 8), "little") + 1000
        child.set_word("B", 2, x)
        for t in (with_record, without_record):
            assert collect(t, child)["B"] == {2}
        child.set_word("B", 2, x + 1)
        sent = Runs.of([a], [1])
        page = np.empty(P, dtype=np.uint8)
        reader.read(sent, page)  # the sender's read of the dirty page: content Y
        with_record.record_sent(sent, page)
        assert with_record.digest_of(a) == xxhash.xxh3_64_intdigest(page.tobytes())
        assert without_record.digest_of(a) != with_record.digest_of(a)
        child.set_word("B", 2, x)
        assert collect(with_record, child)["B"] == {2}
        assert collect(without_record, child)["B"] == set()  # the documented hole without record_sent


def test_unreadable_pages_are_reported_and_not_remembered(child: WriterChild, tracker: HashTracker) -> None:
    # The race a running target allows: a page scanned as present is unmapped before the
    # tracker reads it. It is reported (the sender finds out what it is) and forgotten.
    vmas = dumpable_vmas(child.pid)
    with make_scanner(child.pid) as scanner:
        present = scanner.scan(vmas)
    gone = child.addr("A", 30)
    child.munmap("A", {30})
    dirty = tracker.collect(vmas, present)
    assert gone in dirty.page_addrs(P)
    assert tracker.unreadable_pages >= 1
    assert tracker.digest_of(gone) is None
    # Only the page's run within its read batch (64 pages here) is given up, not the batch.
    assert all(tracker.digest_of(child.addr("B", page)) is not None for page in range(16))
    assert tracker.unreadable_pages <= 64


def test_exited_process_raises_process_gone(child: WriterChild, tracker: HashTracker) -> None:
    vmas = dumpable_vmas(child.pid)
    with make_scanner(child.pid) as scanner:
        present = scanner.scan(vmas)
    child.child.proc.kill()
    child.child.proc.wait(timeout=30)
    with pytest.raises(ProcessGone) as info:
        tracker.collect(vmas, present)
    assert info.value.pid == child.pid


def test_identity_and_probe(child: WriterChild) -> None:
    with make_scanner(child.pid) as scanner:
        t: DirtyTracker = HashTracker(child.pid, scanner)
        try:
            assert (t.name, t.needs_freeze) == ("hash", False)
            with pytest.raises(RuntimeError, match="before start"):
                t.collect([], Runs.empty())
        finally:
            t.close()
            t.close()
        assert scanner.scan(dumpable_vmas(child.pid)).total_pages > 0  # a given scanner stays open
    assert probe().available
    assert probe().name == "hash"


def test_page_digests_are_xxh3_of_each_page() -> None:
    data = np.random.default_rng(2).integers(0, 256, 37 * P, dtype=np.uint8)
    data[5 * P:6 * P] = data[9 * P:10 * P]  # equal pages, equal digests
    expected = [xxhash.xxh3_64_intdigest(data[i * P:(i + 1) * P].tobytes()) for i in range(37)]
    got = page_digests(data)
    assert got.dtype == np.uint64
    assert got.tolist() == expected
    assert got[5] == got[9]
    with pytest.raises(ValueError, match="whole number"):
        page_digests(data[:P + 1])

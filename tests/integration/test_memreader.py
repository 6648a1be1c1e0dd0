"""MemoryReader against children with known page contents, and against /proc/PID/mem."""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from pagehaul import procfs
from pagehaul.errors import ProcessError, ProcessGone
from pagehaul.runs import Runs
from sender.memreader import MemoryReader
from sender.scanner import make_scanner
from tests.helpers.children import PAGE_SIZE, Child, layout_child, page_pattern, read_mem, stop_child

P = PAGE_SIZE
BIG_PAGES = 16384  # 64 MiB, two pages in three written: about 5,500 runs


@pytest.fixture(scope="module")
def child(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Child]:
    with layout_child(tmp_path_factory.mktemp("layout"), big_pages=BIG_PAGES) as c:
        yield c


@pytest.fixture(scope="module")
def all_runs(child: Child) -> Runs:
    scanner = make_scanner(child.pid)
    try:
        return scanner.scan(procfs.select_dumpable(procfs.read_maps(child.pid)))
    finally:
        scanner.close()


def expected_anon(anon: int, runs: Runs) -> bytes:
    parts = []
    for vaddr, nr_pages in runs:
        for i in range(nr_pages):
            page = vaddr + i * P
            parts.append(bytes(P) if page == anon + 12 * P else page_pattern(page))
    return b"".join(parts)


def test_reads_known_patterns_including_prot_none(child: Child) -> None:
    anon = child.info["anon"]
    # Pages 60-63 (rw) and 64-67 (PROT_NONE) form one run crossing the VMA boundary.
    runs = Runs.from_pairs([(anon, 8), (anon + 10 * P, 1), (anon + 12 * P, 1), (anon + 20 * P, 10),
                            (anon + 60 * P, 8)])
    out = bytearray(runs.total_pages * P)
    with MemoryReader(child.pid) as reader:
        reader.read(runs, out, P)
        assert reader.mem_reads >= 1  # the PROT_NONE pages came through /proc/PID/mem
        assert reader.mem_read_bytes >= 4 * P
    assert bytes(out) == expected_anon(anon, runs)


def test_prot_none_only(child: Child) -> None:
    start = child.info["protnone"]
    out = np.zeros(4 * P, np.uint8)
    with MemoryReader(child.pid) as reader:
        reader.read(Runs.of([start], [4]), out, P)
        assert reader.mem_read_bytes == 4 * P
    assert out.tobytes() == page_pattern(start, 4)


def test_cow_pages_of_private_file_mapping(child: Child) -> None:
    fmap = child.info["file"]
    out = bytearray(3 * P)
    with MemoryReader(child.pid) as reader:
        reader.read(Runs.of([fmap + 2 * P, fmap + 4 * P], [1, 2]), memoryview(out), P)
    assert bytes(out) == page_pattern(fmap + 2 * P) + b"F" * P + page_pattern(fmap + 5 * P)


def _mem_reference(pid: int, runs: Runs) -> bytes:
    return b"".join(read_mem(pid, vaddr, nr_pages * P) for vaddr, nr_pages in runs)


@pytest.mark.parametrize("max_call_bytes", [3 * P, 256 << 20])
def test_whole_process_matches_proc_pid_mem(child: Child, all_runs: Runs, max_call_bytes: int) -> None:
    # Includes the 64 MiB region (~5,500 runs, so several 1024-iovec calls) and the PROT_NONE run.
    assert all_runs.total_pages > BIG_PAGES * 2 // 3
    assert len(all_runs) > 1024
    out = np.zeros(all_runs.total_pages * P, np.uint8)
    with MemoryReader(child.pid, max_call_bytes=max_call_bytes) as reader:
        reader.read(all_runs, out, P)
        assert reader.vm_readv_calls >= len(all_runs) // 1024
    assert out.tobytes() == _mem_reference(child.pid, all_runs)


def test_big_region_content_is_exact(child: Child) -> None:
    big = child.info["big"]
    written = np.flatnonzero(np.arange(BIG_PAGES) % 3 != 2)
    runs = Runs.from_page_addrs(np.uint64(big) + written.astype(np.uint64) * np.uint64(P), P)
    out = np.empty(runs.total_pages * P, np.uint8)
    with MemoryReader(child.pid) as reader:
        reader.read(runs, out, P)
        assert reader.mem_reads == 0
    offsets = np.tile(np.arange(0, P, 8, dtype=np.uint64), runs.total_pages)
    assert np.array_equal(out.view("<u8"), runs.page_addrs(P).repeat(P // 8) + offsets)


def test_concurrent_reads_share_one_reader(child: Child, all_runs: Runs) -> None:
    chunks = list(all_runs.split(512, P))
    with MemoryReader(child.pid) as reader, ThreadPoolExecutor(4) as pool:
        def work(runs: Runs) -> bytes:
            out = np.empty(runs.total_pages * P, np.uint8)
            reader.read(runs, out, P)
            return out.tobytes()

        got = b"".join(pool.map(work, chunks))
    assert got == _mem_reference(child.pid, all_runs)


def test_unreadable_page_names_its_address(child: Child) -> None:
    anon = child.info["anon"]
    unmapped = anon + 68 * P  # the hole the child leaves after its PROT_NONE VMA
    assert not any(v.start <= unmapped < v.end for v in procfs.read_maps(child.pid))
    out = bytearray(3 * P)
    with MemoryReader(child.pid) as reader, pytest.raises(ProcessError, match=f"0x{unmapped:x}") as info:
        reader.read(Runs.of([anon + 66 * P], [3]), out, P)
    assert not isinstance(info.value, ProcessGone)
    assert bytes(out[:2 * P]) == page_pattern(anon + 66 * P, 2)  # what could be read was read


def test_output_buffer_checks(child: Child) -> None:
    runs = Runs.of([child.info["anon"]], [2])
    with MemoryReader(child.pid) as reader:
        with pytest.raises(ValueError, match="holds"):
            reader.read(runs, bytearray(P), P)
        with pytest.raises(ValueError, match="read-only"):
            reader.read(runs, memoryview(bytes(2 * P)), P)
        with pytest.raises(ValueError, match="contiguous"):
            reader.read(runs, np.zeros(4 * P, np.uint8)[::2], P)
        reader.read(Runs.empty(), bytearray(), P)
        wide = np.zeros(2 * P // 8, np.uint64)  # any C-contiguous dtype is read as bytes
        reader.read(runs, wide, P)
    assert wide.tobytes() == page_pattern(child.info["anon"], 2)


def test_exited_process_raises_process_gone(tmp_path: Path) -> None:
    with layout_child(tmp_path) as c:
        reader = MemoryReader(c.pid)
        with reader:
            stop_child(c.proc)
            for runs in (Runs.of([c.info["anon"]], [1]), Runs.of([c.info["protnone"]], [1])):
                with pytest.raises(ProcessGone) as info:
                    reader.read(runs, bytearray(P), P)
                assert info.value.pid == c.pid
    with pytest.raises(ProcessGone):
        MemoryReader(c.pid)
    assert os.path.exists("/proc/self/mem")

"""(d) Scan cost: plain pagemap read vs pagemap cache vs PAGEMAP_SCAN, and how a round's cost grows.

Methods, each finding the pages to dump (CRIU's ``should_dump_page`` rules) in the same VMAs:

* plain pagemap read: ``/proc/PID/pagemap`` read VMA by VMA (sender.pagemap_cache with batching
  off, like CRIU with ``CRIU_PMC_OFF``), words classified with numpy;
* pagemap cache: the same reads batched in CRIU's 2 MiB windows (sender.pagemap_cache);
* ``--pagemap-file`` scanner: pagehaul's fallback scanner (spans coalesced, 8 MiB chunks);
* PAGEMAP_SCAN: pagehaul's default scanner (the ioctl, CRIU's filter).

Cases: the seeds' case (a Python process with 1024 extra VMAs of 40 KiB, each written), an
ordinary process (the 256 MiB demo workload) and a 4 GiB mapping with 1% of its pages written.
Each method runs ``--inner`` times per repetition, the methods interleaved; times are medians.

Then a round's cost in pagehaul's pieces, measured in this process against a workload:
collecting the dirty pages with the uffd-wp tracker (PAGEMAP_SCAN with WP_MATCHING, atomic
read and re-arm), scanning the present pages, and reading + encoding the dirty pages
(process_vm_readv, zero detection, xxh3, zstd 1, two threads as in the sender); once against the
number of dirty pages (a fully written mapping, a share of its pages written again through
/proc/PID/mem, spread evenly) and once against the size of the mapping (1% written and dirtied).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
from rich.console import Console

from bench.common import (
    BenchError,
    ForeignLoad,
    QuietPolicy,
    Report,
    Workload,
    WorkloadSpec,
    base_parser,
    fmt_stat,
    machine_line,
    require_root,
    run,
    running_workload,
    scratch_dir,
    wait_quiet,
)
from pagehaul import procfs
from pagehaul.errors import PagehaulError
from pagehaul.kernel import PAGE_SIZE
from pagehaul.runs import Runs
from sender.scanner import PagemapFileScanner, PagemapScanScanner, dump_mask, find_zero_pfn

PLAIN: Final = "plain pagemap read"
CACHE: Final = "pagemap cache (2 MiB windows)"
FILE: Final = "pagehaul --pagemap-file"
SCAN: Final = "PAGEMAP_SCAN"
BATCH_PAGES: Final = 1024


@dataclass(frozen=True, slots=True)
class Case:
    label: str
    spec: WorkloadSpec
    only: str | None = None  # restrict the scan to one region of the READY info


@dataclass(slots=True)
class Timing:
    times_ms: list[float]
    pages: int
    syscalls: int


ScanFn = Callable[[Sequence[procfs.Vma]], tuple[Runs, int]]


def _vmas(w: Workload, only: str | None) -> list[procfs.Vma]:
    vmas = procfs.select_dumpable(procfs.read_maps(w.pid))
    if only is None:
        return vmas
    start, size = w.info["regions"][only][:2]
    # The region's mapping may have merged with a neighbour: clip to the region.
    return [dataclasses.replace(v, start=max(v.start, start), end=min(v.end, start + size))
            for v in vmas if v.start < start + size and v.end > start]


def scanners(pid: int, zero_pfn: int, stack: contextlib.ExitStack) -> dict[str, ScanFn]:
    """Every available method as ``vmas -> (runs, syscalls)``; each keeps its fd open in ``stack``."""
    methods: dict[str, ScanFn] = {}
    try:  # being written alongside the soft-dirty trackers; the table says so if it is missing
        cache_module: Any = importlib.import_module("sender.pagemap_cache")
    except ImportError:
        cache_module = None
    if cache_module is not None:
        for name, batching in ((PLAIN, False), (CACHE, True)):
            cache = stack.enter_context(cache_module.PagemapCache(pid, batching=batching))
            methods[name] = _cache_method(cache, zero_pfn)
    file_scanner = stack.enter_context(PagemapFileScanner(pid, zero_pfn))
    scan_scanner = stack.enter_context(PagemapScanScanner(pid))

    def file_scan(vmas: Sequence[procfs.Vma]) -> tuple[Runs, int]:
        before = file_scanner.reads
        return file_scanner.scan(vmas), file_scanner.reads - before

    def ioctl_scan(vmas: Sequence[procfs.Vma]) -> tuple[Runs, int]:
        before = scan_scanner.ioctls
        return scan_scanner.scan(vmas), scan_scanner.ioctls - before

    methods[FILE] = file_scan
    methods[SCAN] = ioctl_scan
    return methods


def _cache_method(cache: Any, zero_pfn: int) -> ScanFn:
    def scan(vmas: Sequence[procfs.Vma]) -> tuple[Runs, int]:
        before = cache.reads
        found: list[Runs] = []
        for window in cache.windows(vmas):
            addrs = np.uint64(window.start) + np.arange(window.words.size, dtype=np.uint64) * np.uint64(PAGE_SIZE)
            keep = dump_mask(window.words, zero_pfn)
            if window.cached:  # the words between the window's VMAs belong to none of them
                inside = np.zeros(addrs.size, bool)
                for v in window.vmas:
                    inside[(v.start - window.start) // PAGE_SIZE:(v.end - window.start) // PAGE_SIZE] = True
                keep &= inside
            found.append(Runs.from_page_addrs(addrs[keep], PAGE_SIZE))
        return Runs.concat(found).merged(PAGE_SIZE), cache.reads - before

    return scan


def time_methods(methods: dict[str, ScanFn], vmas: Sequence[procfs.Vma], rounds: int) -> dict[str, Timing]:
    out = {name: Timing([], -1, 0) for name in methods}
    names = list(methods)
    for r in range(rounds):
        k = r % len(names)
        for name in [*names[k:], *names[:k]]:
            t0 = time.perf_counter_ns()
            runs, syscalls = methods[name](vmas)
            out[name].times_ms.append((time.perf_counter_ns() - t0) / 1e6)
            out[name].pages, out[name].syscalls = runs.total_pages, syscalls
    return out


# === rounds =====================================================================================


class RoundParts:
    """uffd-wp collect, PAGEMAP_SCAN scan and read + encode of the dirty pages, for one workload."""

    def __init__(self, w: Workload, vmas: list[procfs.Vma], stack: contextlib.ExitStack) -> None:
        try:
            from sender.batcher import BatchEncoder
            from sender.freezer import PtraceFreezer
            from sender.memreader import MemoryReader
            from sender.trackers import select_tracker
        except ImportError as err:
            raise BenchError(f"the sender's trackers do not import: {err}") from err

        self.w = w
        self.vmas = vmas
        self.scanner = stack.enter_context(PagemapScanScanner(w.pid))
        try:
            tracker = select_tracker("uffd-wp", w.pid, self.scanner)
        except PagehaulError as err:
            raise BenchError(f"the uffd-wp tracker is not available: {err}") from err
        assert tracker is not None
        self.tracker = tracker
        stack.callback(self.tracker.close)
        freezer = PtraceFreezer(w.pid)
        freezer.freeze()
        try:
            self.tracker.start(vmas, freezer)
        finally:
            freezer.thaw()
        self.reader = stack.enter_context(MemoryReader(w.pid))
        self.encoder = BatchEncoder(PAGE_SIZE, 1)
        self.pool = stack.enter_context(ThreadPoolExecutor(2))
        self.mem_fd = os.open(f"/proc/{w.pid}/mem", os.O_RDWR | os.O_CLOEXEC)
        stack.callback(os.close, self.mem_fd)
        self.buffers: dict[int, np.ndarray[Any, np.dtype[np.uint8]]] = {}

    def dirty(self, addrs: np.ndarray[Any, np.dtype[np.uint64]]) -> None:
        """Write one word (incremented) in each page at ``addrs`` of the target, as the target would."""
        for a in addrs.tolist():
            word = int.from_bytes(os.pread(self.mem_fd, 8, a), "little")
            os.pwrite(self.mem_fd, ((word + 1) & (2**64 - 1)).to_bytes(8, "little"), a)

    def collect(self) -> tuple[float, Runs]:
        present = self.scanner.scan(self.vmas)
        t0 = time.perf_counter_ns()
        dirty = self.tracker.collect(self.vmas, present)
        return (time.perf_counter_ns() - t0) / 1e6, dirty

    def scan(self) -> float:
        t0 = time.perf_counter_ns()
        self.scanner.scan(self.vmas)
        return (time.perf_counter_ns() - t0) / 1e6

    def read_encode(self, runs: Runs) -> float:
        import threading

        local = threading.local()

        def work(chunk: Runs) -> int:
            buf = getattr(local, "buf", None)
            if buf is None:
                buf = local.buf = np.empty(BATCH_PAGES * PAGE_SIZE, np.uint8)
            raw = buf[: chunk.total_pages * PAGE_SIZE]
            self.reader.read(chunk, raw, PAGE_SIZE)
            return self.encoder.encode(chunk, raw).payload_bytes

        t0 = time.perf_counter_ns()
        list(self.pool.map(work, runs.split(BATCH_PAGES, PAGE_SIZE)))
        return (time.perf_counter_ns() - t0) / 1e6


def spread(start: int, n_pages: int, count: int) -> np.ndarray[Any, np.dtype[np.uint64]]:
    if count <= 0:
        return np.zeros(0, np.uint64)
    idx = np.linspace(0, n_pages - 1, min(count, n_pages)).astype(np.uint64)
    return np.uint64(start) + idx * np.uint64(PAGE_SIZE)


def round_rows_dirty(parts: RoundParts, region: tuple[int, int], shares: Sequence[float], inner: int,
                     console: Console) -> list[list[str]]:
    start, size = region
    n_pages = size // PAGE_SIZE
    rows = []
    parts.collect()  # a clean start: nothing dirty
    for share in shares:
        count = round(n_pages * share / 100)
        collect_ms, scan_ms, enc_ms, found = [], [], [], 0
        load = ForeignLoad()
        for _ in range(inner):
            parts.dirty(spread(start, n_pages, count))
            ms, dirty = parts.collect()
            collect_ms.append(ms)
            found = dirty.total_pages
            scan_ms.append(parts.scan())
            enc_ms.append(parts.read_encode(dirty))
        total = [a + b + c for a, b, c in zip(collect_ms, scan_ms, enc_ms, strict=True)]
        rows.append([f"{share:g}%", f"{count:,}", f"{found:,}", fmt_stat(collect_ms, ".2f"), fmt_stat(scan_ms, ".2f"),
                     fmt_stat(enc_ms, ".1f"), fmt_stat(total, ".1f"), f"{load.cores():.2f}"])
        console.print(f"  dirty {share:g}%: collect {np.median(collect_ms):.2f} ms, read+encode "
                      f"{np.median(enc_ms):.1f} ms")
    return rows


# === main =======================================================================================


def main(args: argparse.Namespace, console: Console) -> None:
    require_root()
    policy = QuietPolicy.from_args(args)
    quick = args.quick
    big = 512 if quick else 4096
    cases = [
        Case("seeds: 1024 VMAs x 40 KiB + a Python process", WorkloadSpec(size_mib=16, small_vmas=1024)),
        Case("ordinary process (256 MiB demo workload)", WorkloadSpec(size_mib=64 if quick else 256)),
        Case(f"{big // 1024 if big >= 1024 else big} {'GiB' if big >= 1024 else 'MiB'} mapping, 1% written "
             "(whole process)", WorkloadSpec(size_mib=16, sparse_mib=big, sparse_written_pct=1.0)),
    ]
    inner = args.inner
    rounds = args.reps * inner
    report = Report("(d) scan cost: plain pagemap read vs pagemap cache vs PAGEMAP_SCAN; round cost", args)
    console.print(f"{machine_line()}; {args.reps} reps x {inner} scans per method and case")
    zero_pfn = find_zero_pfn()
    with scratch_dir(args, "scan") as scratch:
        rows: list[list[str]] = []
        for case in cases:
            with running_workload(case.spec, scratch) as w, contextlib.ExitStack() as stack:
                vmas = _vmas(w, case.only)
                methods = scanners(w.pid, zero_pfn, stack)
                time_methods(methods, vmas, 2)  # warm up (page tables of pagemap reads, numpy)
                wait_quiet(policy, console)
                load = ForeignLoad()
                timings = time_methods(methods, vmas, rounds)
                foreign = load.cores()
            ref = timings[SCAN].pages
            for name, t in timings.items():
                agree = "" if t.pages == ref else f" (differs from {SCAN}: {t.pages - ref:+,})"
                rows.append([case.label, name, f"{len(vmas):,}", f"{t.pages:,}{agree}", fmt_stat(t.times_ms, ".2f"),
                             f"{t.syscalls:,}", f"{foreign:.2f}"])
            console.print(f"  {case.label}: " + ", ".join(f"{n} {np.median(t.times_ms):.2f} ms"
                                                           for n, t in timings.items()))
        report.table(f"scan cost per method (median (min-max) of {rounds} scans)",
                     ["case", "method", "VMAs", "pages found", "ms", "reads / ioctls", "foreign cores"], rows)

        round_tables(args, console, report, scratch, zero_pfn)
    report.note("Scans are of the dumpable VMAs (whole process in the first table, the one mapping in the others). "
                "'plain pagemap read' and 'pagemap cache' classify the words with pagehaul's numpy dump_mask; "
                "'read+encode' is the sender's per-round work without the network (process_vm_readv, zero pages, "
                "xxh3, zstd 1). The collect column is the uffd-wp tracker's collect() (PAGEMAP_SCAN "
                "WRITTEN|WP_MATCHING over the armed ranges, plus a scan for unregistered ranges).")
    report.finish(console)


def round_tables(args: argparse.Namespace, console: Console, report: Report, scratch: Path, zero_pfn: int) -> None:
    """Round cost against the mapped size and against the number of dirty pages."""
    policy = QuietPolicy.from_args(args)
    inner = args.inner
    sizes = [256, 1024] if args.quick else [256, 1024, 4096, 16384]
    rows: list[list[str]] = []
    skipped = ""
    for size in sizes:
        spec = WorkloadSpec(size_mib=16, sparse_mib=size, sparse_written_pct=1.0)
        with running_workload(spec, scratch) as w, contextlib.ExitStack() as stack:
            vmas = _vmas(w, "sparse")
            methods = scanners(w.pid, zero_pfn, stack)
            time_methods(methods, vmas, 1)
            wait_quiet(policy, console)
            load = ForeignLoad()
            timings = time_methods(methods, vmas, args.reps * inner)
            armed_scan: list[float] = []
            collect_ms: list[float] = []
            enc_ms: list[float] = []
            try:
                parts = RoundParts(w, vmas, stack)
            except BenchError as err:
                skipped = str(err)
            else:
                start, region_size, _ = w.info["regions"]["sparse"]
                n_pages = region_size // PAGE_SIZE
                parts.collect()
                for _ in range(inner):
                    parts.dirty(spread(start, n_pages, round(n_pages / 100)))
                    ms, dirty = parts.collect()
                    collect_ms.append(ms)
                    armed_scan.append(parts.scan())
                    enc_ms.append(parts.read_encode(dirty))
            foreign = load.cores()
        rows.append([_size_label(size), f"{timings[SCAN].pages:,}",
                     *[fmt_stat(timings[m].times_ms, ".2f") if m in timings else "-"
                       for m in (PLAIN, CACHE, FILE, SCAN)],
                     fmt_stat(armed_scan, ".2f"), fmt_stat(collect_ms, ".2f"), fmt_stat(enc_ms, ".1f"),
                     f"{foreign:.2f}"])
        console.print(f"  mapping {_size_label(size)}: " + ", ".join(
            f"{n} {np.median(t.times_ms):.2f} ms" for n, t in timings.items()))
    report.table("round cost vs mapped size: one mapping, 1% of its pages written, then the same 1% dirtied "
                 "again before each round (ms, median (min-max))",
                 ["mapping", "present pages", PLAIN, CACHE, FILE, SCAN, "PAGEMAP_SCAN while uffd-wp armed",
                  "uffd-wp collect (1% dirty)", "read+encode dirty", "foreign cores"], rows)
    if skipped:
        report.note(f"uffd-wp columns empty: {skipped}")
        return
    full = 512 if args.quick else 4096
    spec = WorkloadSpec(size_mib=16, sparse_mib=full, sparse_written_pct=100.0)
    shares = [0.0, 0.1, 1.0, 10.0] if args.quick else [0.0, 0.1, 1.0, 10.0, 25.0]
    with running_workload(spec, scratch) as w, contextlib.ExitStack() as stack:
        vmas = _vmas(w, "sparse")
        parts = RoundParts(w, vmas, stack)
        wait_quiet(policy, console)
        start, region_size, _ = w.info["regions"]["sparse"]
        drows = round_rows_dirty(parts, (start, region_size), shares, max(3, inner // 2), console)
    report.table(f"round cost vs dirty pages: {_size_label(full)} mapping, all pages present, a share dirtied "
                 "(spread evenly) before each round (ms, median (min-max))",
                 ["dirty share", "pages dirtied", "pages collected", "uffd-wp collect", "PAGEMAP_SCAN scan",
                  "read+encode (2 threads)", "round (sum)", "foreign cores"], drows)


def _size_label(mib_: int) -> str:
    return f"{mib_ // 1024} GiB" if mib_ >= 1024 and mib_ % 1024 == 0 else f"{mib_} MiB"


def parser() -> argparse.ArgumentParser:
    p = base_parser("bench_scan", __doc__.splitlines()[0])
    p.add_argument("--inner", type=int, default=7, help="scans per method per repetition (default: 7)")
    return p


if __name__ == "__main__":
    run(main, parser())

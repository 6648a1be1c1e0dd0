"""(e) Each stage's own ceiling here, and pagehaul's end-to-end as a fraction of the lowest.

On one 1 GiB mixed workload (1/4 zero, 1/4 random, 1/4 text, 1/4 structs), every stage of the
sender-to-disk path runs alone, with pagehaul's own code and settings (4 MiB batches, the
sender's two worker threads where the sender uses them, malloc tuned as ``pagehaul`` does):

* read: ``MemoryReader.read`` (process_vm_readv) of every batch, 2 threads;
* zero detection: ``sender.batcher.nonzero_pages`` on every read batch, 2 threads;
* compress: zstd level 1 of every batch's non-zero pages, one compressor per thread, 2 threads;
* gRPC: the encoded messages (as the sender builds them) over one grpc.aio bidirectional stream
  on loopback to a sink process that deserializes them and acks each one, as the receiver does;
* disk write: the receiver's ``store.RoundWriter`` (one image) appending every batch's pages and committing
  the round (pagemap, fsync, rename);

and, for reference, scan (PAGEMAP_SCAN), the whole sender encode (zero detection, packing,
xxh3, zstd, message; 2 threads) and the receiver's decode (zstd decompress + xxh3, one thread).
Each is given in MiB of process memory per second: the workload's dumped memory divided by the
time the stage needs for all of it. The end-to-end row is ``pagehaul send --tracker none`` to
``pagehaul receive`` on the same workload (memory / SendResult.total_time_us).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final, TypeVar

import grpc
import numpy as np
import numpy.typing as npt
import xxhash
import zstandard
from rich.console import Console

from bench.common import (
    MIB,
    BenchError,
    Child,
    QuietPolicy,
    RunFailed,
    Sample,
    Window,
    base_parser,
    begin,
    fmt_foreign,
    fmt_stat,
    interleave,
    median,
    require_root,
    rss_method,
    run,
    run_directory,
    run_pagehaul,
    running_workload,
    scratch_dir,
    send_values,
    values,
)
from pagehaul import codec, procfs, store
from pagehaul.kernel import PAGE_SIZE
from pagehaul.runs import Runs
from pagehaul.tune import tune_process
from pagehaul.v1 import migration_pb2 as pb
from pagehaul.wire import CHANNEL_OPTIONS, MAX_BATCH_BYTES, METHOD, METHOD_PATH, SERVICE
from sender.batcher import BatchEncoder, nonzero_pages
from sender.memreader import MemoryReader
from sender.messages import holes, numbered
from sender.scanner import PagemapScanScanner

READ: Final = "read (process_vm_readv)"
ZERO: Final = "zero detection"
COMPRESS: Final = "compress (zstd 1)"
GRPC: Final = "gRPC (loopback, sink)"
GRPC2: Final = "gRPC, 2 streams (multifd-like)"
DISK: Final = "disk write (RoundWriter + fsync)"
SCAN: Final = "scan (PAGEMAP_SCAN)"
ENCODE: Final = "sender encode (zero+pack+xxh3+zstd+msg)"
DECODE: Final = "receiver decode (unzstd + xxh3)"
E2E: Final = "pagehaul end-to-end"
STAGES: Final = (READ, ZERO, COMPRESS, GRPC, DISK)
EXTRAS: Final = (SCAN, ENCODE, DECODE, GRPC2)
TARGET_FRACTION: Final = 0.7
SINK_READY: Final = "sink listening on "
BATCH_PAGES: Final = MAX_BATCH_BYTES // PAGE_SIZE
WORKERS: Final = 2

T = TypeVar("T")
U = TypeVar("U")
Bytes = npt.NDArray[np.uint8]


# === the gRPC sink (a child process: python -m bench.bench_stages --serve-sink HOST:PORT) ========


async def _serve_sink(listen: str) -> None:
    tune_process()
    server = grpc.aio.server(options=CHANNEL_OPTIONS)

    async def migrate(requests: Any, context: Any) -> Any:
        async for msg in requests:
            kind = msg.WhichOneof("msg")
            if kind == "batch":
                yield pb.ReceiverMessage(ack=pb.Ack(received_seq=msg.batch.seq))
            elif kind == "holes":
                yield pb.ReceiverMessage(ack=pb.Ack(received_seq=msg.holes.seq))

    handler = grpc.stream_stream_rpc_method_handler(migrate, request_deserializer=pb.SenderMessage.FromString,
                                                    response_serializer=pb.ReceiverMessage.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler}),))
    port = server.add_insecure_port(listen)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print(f"{SINK_READY}{listen.rsplit(':', 1)[0]}:{port}", flush=True)
    await stop.wait()
    await server.stop(0)


async def _grpc_send_parallel(address: str, messages: Sequence[pb.SenderMessage], streams: int) -> tuple[float, int]:
    """``messages`` dealt round-robin over ``streams`` streams, each on its own TCP connection
    (QEMU multifd's layout); seconds until every stream's acks are in, and the acks."""
    t0 = time.perf_counter()
    parts = await asyncio.gather(*(_grpc_send(address, messages[i::streams], own_connection=True)
                                   for i in range(streams)))
    return time.perf_counter() - t0, sum(acks for _, acks in parts)


async def _grpc_send(address: str, messages: Sequence[pb.SenderMessage], *,
                     own_connection: bool = False) -> tuple[float, int]:
    """Seconds to stream ``messages`` and get every ack, the way sender.grpc_channel's session call does it."""
    # A local subchannel pool keeps grpc from sharing one TCP connection between channels.
    options = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)] if own_connection else CHANNEL_OPTIONS
    channel = grpc.aio.insecure_channel(address, options=options)
    try:
        await asyncio.wait_for(channel.channel_ready(), 10)
        # grpc-stubs predate aio's writer-style call (no request iterator), as in sender.grpc_channel
        call: Any = channel.stream_stream(METHOD_PATH, request_serializer=pb.SenderMessage.SerializeToString,
                                          response_deserializer=pb.ReceiverMessage.FromString)()  # type: ignore[call-arg]

        async def read_acks() -> int:
            n = 0
            while isinstance(await call.read(), pb.ReceiverMessage):
                n += 1
            return n

        t0 = time.perf_counter()
        reader = asyncio.create_task(read_acks())
        for msg in messages:
            await call.write(msg)
        await call.done_writing()
        acks = await reader
        return time.perf_counter() - t0, acks
    finally:
        await channel.close(None)


# === the data =====================================================================================


class Prepared:
    """The workload's memory read once, in 4 MiB batches, with everything the stages consume."""

    def __init__(self, pid: int, pool: ThreadPoolExecutor) -> None:
        self.pid = pid
        self.pool = pool
        self.vmas = procfs.select_dumpable(procfs.read_maps(pid))
        with PagemapScanScanner(pid) as scanner:
            present = scanner.scan(self.vmas)
        self.batches: list[Runs] = list(present.split(BATCH_PAGES, PAGE_SIZE))
        self.total_bytes = present.total_pages * PAGE_SIZE
        self.raw: list[Bytes] = []
        with MemoryReader(pid) as reader:
            for runs in self.batches:
                buf = np.empty(runs.total_pages * PAGE_SIZE, np.uint8)
                reader.read(runs, buf, PAGE_SIZE)
                self.raw.append(buf)
        self.masks = [nonzero_pages(r, PAGE_SIZE) for r in self.raw]
        self.packed: list[Bytes] = [r.reshape(-1, PAGE_SIZE)[m].reshape(-1) for r, m in zip(self.raw, self.masks,
                                                                                              strict=True)]
        self.data_runs = [runs.select_pages(m, PAGE_SIZE) for runs, m in zip(self.batches, self.masks, strict=True)]
        self.zero_runs = [runs.select_pages(~m, PAGE_SIZE) for runs, m in zip(self.batches, self.masks, strict=True)]
        encoder = BatchEncoder(PAGE_SIZE, 1)
        encoded = list(pool.map(lambda pair: encoder.encode(*pair), zip(self.batches, self.raw, strict=True)))
        self.messages: list[pb.SenderMessage] = []
        self.batch_msgs: list[pb.PageBatch] = []
        seq = 0
        for enc in encoded:
            if enc.message is not None:
                seq += 1
                self.messages.append(numbered(enc.message, seq, 0))
                self.batch_msgs.append(enc.message.batch)
            if len(enc.zero_runs):
                seq += 1
                self.messages.append(holes(seq, "zero", enc.zero_runs, 0))
        self.wire_bytes = sum(m.ByteSize() for m in self.messages)
        self.data_bytes = sum(p.size for p in self.packed)


def _map(pool: ThreadPoolExecutor, fn: Callable[[T], U], items: Sequence[T]) -> list[U]:
    return list(pool.map(fn, items))


class StageBench:
    def __init__(self, prep: Prepared, scratch: Path, sink_address: str, receiver_log: Path) -> None:
        self.prep = prep
        self.scratch = scratch
        self.sink = sink_address
        self.receiver_log = receiver_log
        self.local = threading.local()
        self.reader = MemoryReader(prep.pid)
        self.encoder = BatchEncoder(PAGE_SIZE, 1)

    def close(self) -> None:
        self.reader.close()

    def _buf(self) -> Bytes:
        buf: Bytes | None = getattr(self.local, "buf", None)
        if buf is None:
            buf = np.empty(BATCH_PAGES * PAGE_SIZE, np.uint8)
            self.local.buf = buf
        return buf

    def _zstd(self) -> zstandard.ZstdCompressor:
        comp: zstandard.ZstdCompressor | None = getattr(self.local, "zstd", None)
        if comp is None:
            comp = zstandard.ZstdCompressor(level=1)
            self.local.zstd = comp
        return comp

    def run_one(self, name: str, rep: int, window: Window) -> dict[str, float]:
        prep, pool = self.prep, self.prep.pool
        if name == E2E:
            return self._e2e(rep, window)
        if name == DISK:
            return self._disk(rep, window)
        with window.timed():
            t0 = time.perf_counter()
            if name == READ:
                def read(runs: Runs) -> None:
                    self.reader.read(runs, self._buf()[: runs.total_pages * PAGE_SIZE], PAGE_SIZE)
                _map(pool, read, prep.batches)
            elif name == ZERO:
                _map(pool, lambda raw: nonzero_pages(raw, PAGE_SIZE), prep.raw)
            elif name == COMPRESS:
                _map(pool, lambda data: self._zstd().compress(data.data), [p for p in prep.packed if p.size])
            elif name == ENCODE:
                _map(pool, lambda pair: self.encoder.encode(*pair), list(zip(prep.batches, prep.raw, strict=True)))
            elif name == SCAN:
                with PagemapScanScanner(prep.pid) as scanner:
                    scanner.scan(procfs.select_dumpable(procfs.read_maps(prep.pid)))
            elif name == DECODE:
                self._decode()
            elif name in (GRPC, GRPC2):
                streams = 2 if name == GRPC2 else 1
                seconds, acks = asyncio.run(_grpc_send_parallel(self.sink, prep.messages, streams))
                if acks != len(prep.messages):
                    raise RunFailed(f"gRPC sink acked {acks} of {len(prep.messages)} messages")
                return {"seconds": seconds}
            else:
                raise BenchError(f"unknown stage {name}")
            return {"seconds": time.perf_counter() - t0}

    def _decode(self) -> None:
        dctx = zstandard.ZstdDecompressor()
        for m in self.prep.batch_msgs:
            raw_len = sum(m.nr_pages) * PAGE_SIZE
            data = (dctx.decompress(m.payload, max_output_size=raw_len) if m.compression == pb.COMPRESSION_ZSTD
                    else m.payload)
            if xxhash.xxh3_64_intdigest(data) != m.xxh3_64:
                raise RunFailed("decode: checksum mismatch")

    def _disk(self, rep: int, window: Window) -> dict[str, float]:
        prep = self.prep
        with run_directory(self.scratch, f"disk-{rep}") as session, window.timed():
            t0 = time.perf_counter()
            writer = store.RoundWriter(session, 0, PAGE_SIZE, None)
            image = writer.image(codec.ImageKey("pid", prep.pid))
            for runs, data, zeros in zip(prep.data_runs, prep.packed, prep.zero_runs, strict=True):
                if len(runs):
                    image.append_pages(runs, data.data)
                if len(zeros):
                    image.add_zero_runs(zeros)
            writer.commit(codec.InventoryEntry.for_pre_dump(procfs.read_uptime_us()))
            seconds = time.perf_counter() - t0
        return {"seconds": seconds}

    def _e2e(self, rep: int, window: Window) -> dict[str, float]:
        with run_directory(self.scratch, f"e2e-{rep}") as d:
            run = run_pagehaul(self.prep.pid, d, window, tracker="none")
        out = run.send
        return {**send_values(out), "seconds": out.total_s, "bytes": out.pages_dumped * PAGE_SIZE,
                "receiver_cpu_s": run.receiver_cpu_s}


ZSTD_LEVELS: Final = (-5, -1, 1, 3, 5, 7)


def level_rows(prep: Prepared) -> list[list[str]]:
    """Ratio and 2-thread speed of every zstd level on the workload's non-zero pages (one pass each)."""
    rows = []
    data = [p for p in prep.packed if p.size]
    for level in ZSTD_LEVELS:
        local = threading.local()

        def size(d: Bytes, level: int = level, local: threading.local = local) -> int:
            comp: zstandard.ZstdCompressor | None = getattr(local, "zstd", None)
            if comp is None:
                comp = local.zstd = zstandard.ZstdCompressor(level=level)
            return min(len(comp.compress(d.data)), d.size)  # incompressible batches travel raw

        t0 = time.perf_counter()
        wire = sum(_map(prep.pool, size, data))
        seconds = time.perf_counter() - t0
        rows.append([f"{level}", f"{wire / MIB:.0f}", f"{prep.total_bytes / wire:.2f}",
                     f"{prep.data_bytes / MIB / seconds:.0f}"])
    return rows


def start_sink(log_dir: Path) -> tuple[Child, str]:
    with (log_dir / "sink.err").open("wb") as err:
        child = Child([sys.executable, "-m", "bench.bench_stages", "--serve-sink", "127.0.0.1:0"],
                      stdout=subprocess.PIPE, stderr=err)
    assert child.proc.stdout is not None
    line = child.proc.stdout.readline().decode().strip()
    if not line.startswith(SINK_READY):
        child.stop()
        raise BenchError(f"gRPC sink did not start: {line!r}")
    return child, line.removeprefix(SINK_READY)


def mib_per_s(samples: Sequence[Sample], nbytes: float, key: str = "seconds") -> list[float]:
    return [nbytes / MIB / s.values[key] for s in samples if not s.error and s.values.get(key)]


def main(args: argparse.Namespace, console: Console) -> None:
    if args.serve_sink:
        asyncio.run(_serve_sink(args.serve_sink))
        return
    require_root()
    tune_process()  # as the pagehaul sender and receiver do
    names = [*STAGES, *EXTRAS, E2E]
    spec, report = begin(args, console, "(e) stage ceilings and pagehaul end-to-end", f"{len(names)} stages")
    with scratch_dir(args, "stages") as scratch, ThreadPoolExecutor(WORKERS, thread_name_prefix="stage") as pool, \
            contextlib.ExitStack() as stack:
        w = stack.enter_context(running_workload(spec, scratch))
        sink: Child | None = None
        bench: StageBench | None = None
        try:
            prep = Prepared(w.pid, pool)
            console.print(f"dumped memory {prep.total_bytes / MIB:.0f} MiB in {len(prep.batches)} batches; non-zero "
                          f"{prep.data_bytes / MIB:.0f} MiB; on the wire {prep.wire_bytes / MIB:.0f} MiB")
            sink, address = start_sink(scratch)
            bench = StageBench(prep, scratch, address, scratch)

            def summary(name: str, v: dict[str, float]) -> str:
                return f"{prep.total_bytes / MIB / v['seconds']:.0f} MiB/s"

            results = interleave(names, args.reps, bench.run_one, QuietPolicy.from_args(args), console,
                                 summary=summary)
            levels = level_rows(prep)
        finally:
            if bench is not None:
                bench.close()
            if sink is not None:
                sink.stop()
    rows = []
    ceilings: dict[str, float] = {}
    # What each stage itself consumes: memory, the non-zero pages, or the encoded messages.
    own_input = {READ: prep.total_bytes, ZERO: prep.total_bytes, COMPRESS: prep.data_bytes, GRPC: prep.wire_bytes,
                 GRPC2: prep.wire_bytes,
                 DISK: prep.data_bytes, SCAN: prep.total_bytes, ENCODE: prep.total_bytes, DECODE: prep.data_bytes,
                 E2E: prep.total_bytes}
    for name in names:
        samples = results[name]
        rates = mib_per_s(samples, prep.total_bytes)
        med = median(rates)
        if med is not None and name != E2E:
            ceilings[name] = med
        secs = values(samples, "seconds")
        kind = "stage" if name in STAGES else ("end-to-end" if name == E2E else "extra")
        rows.append([name, kind, fmt_stat(rates), fmt_stat(mib_per_s(samples, own_input[name])),
                     fmt_stat(secs, ".3f"), fmt_foreign(samples), str(len([s for s in samples if not s.error]))])
    report.table(f"stage ceilings, {spec.describe()}: {prep.total_bytes / MIB:.0f} MiB dumped, "
                 f"{prep.data_bytes / MIB:.0f} MiB non-zero, {prep.wire_bytes / MIB:.0f} MiB on the wire "
                 f"(median (min-max) of {args.reps})",
                 ["stage", "kind", "MiB/s of memory", "MiB/s of own input", "seconds", "foreign cores", "n"], rows)
    report.table("zstd levels on the same pages: payload MiB, dumped memory / payload, compression MiB/s of "
                 "non-zero pages (2 threads, one pass each)", ["zstd level", "payload MiB", "memory / payload",
                                                               "MiB/s"], levels)
    report.note("The random quarter of the workload does not compress at any level, so the ratio barely moves "
                "past zstd 1: over a link, pagehaul's throughput is at most the link's times this ratio.")
    e2e = results[E2E]
    ok = [s for s in e2e if not s.error]
    report.table("pagehaul end-to-end (pagehaul send --tracker none -> pagehaul receive, loopback)",
                 ["MiB/s (tool time)", "MiB/s (wall)", "memdump s", "sender CPU s", "sender peak RSS MiB",
                  "receiver CPU s"],
                 [[fmt_stat(mib_per_s(ok, prep.total_bytes)), fmt_stat(mib_per_s(ok, prep.total_bytes, "wall_s")),
                   fmt_stat(values(ok, "memdump_s"), ".2f"), fmt_stat(values(ok, "sender_cpu_s"), ".2f"),
                   fmt_stat(values(ok, "sender_rss_mib")), fmt_stat(values(ok, "receiver_cpu_s"), ".2f")]])
    report.note(f"Stages use {WORKERS} threads where the sender does (read, zero detection, compress, encode); gRPC, "
                "decode and disk write are single streams as in the receiver. The sink acks every message like the "
                "receiver but does nothing else. 2 cores are shared by everything in the end-to-end run, while "
                "each stage had them alone.")
    stage_ceilings = {n: ceilings[n] for n in STAGES if n in ceilings}
    e2e_rate = median(mib_per_s(ok, prep.total_bytes))
    if stage_ceilings and e2e_rate is not None:
        lowest = min(stage_ceilings, key=lambda n: stage_ceilings[n])
        frac = e2e_rate / stage_ceilings[lowest]
        report.ratio("end-to-end / lowest stage ceiling", frac, f">= {TARGET_FRACTION:g}", frac >= TARGET_FRACTION,
                     f"{e2e_rate:.0f} MiB/s vs {lowest} {stage_ceilings[lowest]:.0f} MiB/s")
        every = min(ceilings, key=lambda n: ceilings[n])
        report.ratio("end-to-end / lowest ceiling incl. extras", e2e_rate / ceilings[every], "(no target)", None,
                     f"{every} {ceilings[every]:.0f} MiB/s")
        path = [n for n in (*STAGES, DECODE) if n in ceilings]
        serial = 1 / sum(1 / ceilings[n] for n in path)
        report.ratio("end-to-end / serial model", e2e_rate / serial, "(no target)", None,
                     f"{serial:.0f} MiB/s if the path's stages ({', '.join(path)}) ran one after another, "
                     "each with the whole machine")
    else:
        report.ratio("end-to-end / lowest stage ceiling", None, f">= {TARGET_FRACTION:g}", None, "no measurement")
    if GRPC in ceilings and GRPC2 in ceilings:
        report.ratio("gRPC 2 streams / 1 stream (multifd-like)", ceilings[GRPC2] / ceilings[GRPC], "(no target)", None,
                     "same messages, same sink process, dealt over two connections")
    cpu = [(s.values["sender_cpu_s"] + s.values["receiver_cpu_s"]) / s.values["wall_s"] for s in ok]
    if cpu:
        report.ratio("cores busy during end-to-end (sender + receiver CPU / sender wall time)", median(cpu),
                     "(no target)", None, "of the 2 this machine has: what parallel streams could add at most")
    rss = values(ok, "sender_rss_mib")
    report.ratio("sender peak RSS (MiB, worst run)", max(rss) if rss else None, "<= 128 MiB",
                 (max(rss) <= 128) if rss else None, f"`pagehaul send`: {rss_method()}")
    report.finish(console)


def parser() -> argparse.ArgumentParser:
    p = base_parser("bench_stages", __doc__.splitlines()[0], size_mib=True)
    p.add_argument("--serve-sink", metavar="HOST:PORT", help=argparse.SUPPRESS)
    return p


if __name__ == "__main__":
    run(main, parser())

"""The sender: freeze a process, find its pages, stream them to a receiver, thaw it.

Pipeline (one round, target frozen)::

    scan (PAGEMAP_SCAN or pagemap) -> split runs into batches of <= 4 MiB
      -> [worker threads] process_vm_readv -> zero detection -> xxh3 -> zstd
      -> [event loop] gRPC stream, in address order -> receiver acks, commits

Workers read and compress ahead of the network by a bounded number of batches, so memory
stays bounded whatever the size of the target. ptrace requests must come from the thread that
attached, so freezing and thawing happen on the event loop's thread, never in a worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import cast

import grpc
import numpy as np
import numpy.typing as npt

from pagehaul.errors import AlreadyTraced, ConfigError, PagehaulError, ProtocolError, TransportError
from pagehaul.runs import Runs
from pagehaul.v1 import migration_pb2 as pb
from pagehaul.wire import CHANNEL_OPTIONS, MAX_BATCH_BYTES, METHOD_PATH, PROTOCOL_VERSION
from sender import procfs
from sender.batcher import BatchEncoder, EncodedBatch
from sender.freezer import PtraceFreezer
from sender.memreader import MemoryReader
from sender.scanner import PageScanner, make_scanner

log = logging.getLogger(__name__)

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# How long to wait for the receiver's in-band reason once the call has failed.
REFUSAL_WAIT_S = 5.0


@dataclass(frozen=True, slots=True)
class SendConfig:
    pid: int
    target: str
    force_pagemap_file: bool = False
    # None turns compression off (zero pages are still sent as holes).
    zstd_level: int | None = 1
    batch_pages: int = MAX_BATCH_BYTES // PAGE_SIZE
    workers: int = 2
    # Batches read and compressed ahead of the network, per worker.
    depth_per_worker: int = 2
    leave_stopped: bool = False
    connect_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.pid <= 0:
            raise ConfigError(f"invalid pid {self.pid}")
        if not 1 <= self.batch_pages <= MAX_BATCH_BYTES // PAGE_SIZE:
            raise ConfigError(f"batch size must be 1..{MAX_BATCH_BYTES // PAGE_SIZE} pages")
        if self.workers < 1:
            raise ConfigError("need at least one worker")
        if self.zstd_level is not None and not -7 <= self.zstd_level <= 22:
            raise ConfigError(f"zstd level {self.zstd_level} out of range -7..22")
        if ":" not in self.target:
            raise ConfigError(f"receiver address {self.target!r} must be HOST:PORT")


@dataclass(slots=True)
class RoundStats:
    """Per-round counters, named like CRIU's stats.proto dump_stats_entry where they mirror it."""

    round: int
    pages_scanned: int = 0
    pages_written: int = 0
    pages_zero: int = 0
    pages_skipped_parent: int = 0
    raw_bytes: int = 0
    wire_bytes: int = 0
    memdump_time_us: int = 0
    directory: str = ""

    @property
    def compression_ratio(self) -> float:
        return self.raw_bytes / self.wire_bytes if self.wire_bytes else 0.0


@dataclass(slots=True)
class SendResult:
    pid: int
    session_id: str = ""
    scanner: str = ""
    vmas: int = 0
    rounds: list[RoundStats] = field(default_factory=list)
    freezing_time_us: int = 0
    frozen_time_us: int = 0
    total_time_us: int = 0
    left_stopped: bool = False


@dataclass(frozen=True, slots=True)
class Progress:
    round: int
    pages_done: int
    pages_total: int
    wire_bytes: int


ProgressFn = Callable[[Progress], None]


@asynccontextmanager
async def _connect(target: str, timeout_s: float) -> AsyncIterator[grpc.aio.Channel]:
    channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
    try:
        try:
            await asyncio.wait_for(channel.channel_ready(), timeout_s)
        except TimeoutError as err:
            raise TransportError(f"cannot reach receiver at {target} within {timeout_s:g} s") from err
        yield channel
    finally:
        await channel.close(None)


@asynccontextmanager
async def _closing(scanner: PageScanner) -> AsyncIterator[PageScanner]:
    try:
        yield scanner
    finally:
        scanner.close()


def _status_code(value: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN


def _vma_msg(v: procfs.Vma) -> pb.Vma:
    return pb.Vma(start=v.start, end=v.end, prot=v.prot, kind=cast("pb.VmaKind", int(v.kind)),
                  pgoff=v.pgoff, path=v.path)


class _Stream:
    """The bidirectional call: writes in order, reads replies in a background task."""

    def __init__(self, channel: grpc.aio.Channel, target: str) -> None:
        self._target = target
        self._call = channel.stream_stream(
            METHOD_PATH,
            request_serializer=pb.SenderMessage.SerializeToString,
            response_deserializer=pb.ReceiverMessage.FromString,
        )()  # type: ignore[call-arg]  # grpc-stubs 1.53 predates aio's writer-style call
        self._reader: asyncio.Task[None] | None = None
        self.committed: asyncio.Queue[pb.RoundCommitted] = asyncio.Queue()
        self.received_seq = 0
        # Set when the receiver explains in-band why it is ending the session.
        self.refused: PagehaulError | None = None

    async def open(self, msg: pb.SessionOpen) -> pb.SessionAccepted:
        await self.write(pb.SenderMessage(open=msg))
        try:
            reply = await self._call.read()
        except grpc.aio.AioRpcError as err:
            raise self._translate(err) from err
        if not isinstance(reply, pb.ReceiverMessage) or reply.WhichOneof("msg") != "accepted":
            raise ProtocolError("receiver did not accept the session")
        self._reader = asyncio.create_task(self._read_replies())
        return reply.accepted

    async def _read_replies(self) -> None:
        # read() only: grpc.aio refuses to mix it with `async for` on one call.
        while isinstance(reply := await self._call.read(), pb.ReceiverMessage):  # else grpc.aio.EOF
            kind = reply.WhichOneof("msg")
            if kind == "ack":
                self.received_seq = reply.ack.received_seq
            elif kind == "committed":
                await self.committed.put(reply.committed)
            elif kind == "error":
                self.refused = self._error(_status_code(reply.error.code), reply.error.reason)

    async def write(self, msg: pb.SenderMessage) -> None:
        if self.refused is not None:
            raise self.refused
        try:
            await self._call.write(msg)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as err:
            raise await self._failure() from err

    async def wait_committed(self) -> pb.RoundCommitted:
        assert self._reader is not None
        get = asyncio.ensure_future(self.committed.get())
        done, _ = await asyncio.wait({get, self._reader}, return_when=asyncio.FIRST_COMPLETED)
        if get in done:
            return get.result()
        get.cancel()
        raise await self._failure()

    async def finish(self) -> None:
        await self._call.done_writing()
        if self._reader is not None:
            try:
                await self._reader
            except grpc.aio.AioRpcError as err:
                raise self._translate(err) from err
        code = await self._call.code()
        if code != grpc.StatusCode.OK:
            raise await self._failure()

    def cancel(self) -> None:
        self._call.cancel()
        if self._reader is not None:
            self._reader.cancel()

    async def _failure(self) -> PagehaulError:
        """The reason the call ended: the receiver's in-band SessionError if it sent one."""
        if self._reader is not None and self.refused is None:
            await self._call.done_writing()
            with contextlib.suppress(grpc.aio.AioRpcError, TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._reader), REFUSAL_WAIT_S)
        if self.refused is not None:
            return self.refused
        code = await self._call.code()
        details = await self._call.details()
        return self._error(code, details or "")

    def _translate(self, err: grpc.aio.AioRpcError) -> PagehaulError:
        return self._error(err.code(), err.details() or "")

    def _error(self, code: grpc.StatusCode, details: str) -> PagehaulError:
        if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DATA_LOSS):
            return ProtocolError(f"receiver refused the data: {details}")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return TransportError(f"receiver out of resources: {details}")
        return TransportError(f"receiver at {self._target} failed ({code.name}): {details}")


class _Worker:
    """Per-thread read buffer, reused batch after batch."""

    def __init__(self, reader: MemoryReader, encoder: BatchEncoder, batch_pages: int) -> None:
        self._reader = reader
        self._encoder = encoder
        self._nbytes = batch_pages * PAGE_SIZE
        self._local = threading.local()

    def __call__(self, runs: Runs) -> EncodedBatch:
        buf: npt.NDArray[np.uint8] | None = getattr(self._local, "buf", None)
        if buf is None:
            buf = np.empty(self._nbytes, np.uint8)
            self._local.buf = buf
        raw = buf[: runs.total_pages * PAGE_SIZE]
        self._reader.read(runs, raw, PAGE_SIZE)
        return self._encoder.encode(runs, raw)


async def _send_round(
    stream: _Stream, *, round_no: int, runs: Runs, work: _Worker, cfg: SendConfig,
    pool: ThreadPoolExecutor, stats: RoundStats, seq: int, progress: ProgressFn | None,
) -> int:
    """Stream every page of ``runs``; returns the last sequence number used."""
    loop = asyncio.get_running_loop()
    pending: deque[asyncio.Future[EncodedBatch]] = deque()
    depth = cfg.workers * cfg.depth_per_worker
    total, done = runs.total_pages, 0

    async def emit(fut: asyncio.Future[EncodedBatch]) -> None:
        nonlocal seq, done
        enc = await fut
        if enc.data is not None:
            seq += 1
            enc.data.seq = seq
            msg = pb.SenderMessage(batch=enc.data)
            stats.wire_bytes += msg.ByteSize()
            await stream.write(msg)
        if len(enc.zero_runs):
            seq += 1
            holes = pb.SenderMessage(holes=pb.Holes(
                seq=seq, kind=pb.HOLE_KIND_ZERO,
                vaddr=enc.zero_runs.vaddr.tolist(), nr_pages=enc.zero_runs.nr_pages.tolist()))
            stats.wire_bytes += holes.ByteSize()
            await stream.write(holes)
        stats.pages_written += enc.pages_data
        stats.pages_zero += enc.pages_zero
        stats.raw_bytes += enc.raw_bytes
        done += enc.pages_data + enc.pages_zero
        if progress is not None:
            progress(Progress(round_no, done, total, stats.wire_bytes))

    try:
        for chunk in runs.split(cfg.batch_pages, PAGE_SIZE):
            pending.append(loop.run_in_executor(pool, work, chunk))
            if len(pending) >= depth:
                await emit(pending.popleft())
        while pending:
            await emit(pending.popleft())
    finally:
        for fut in pending:
            fut.cancel()
    return seq


async def send_frozen(cfg: SendConfig, progress: ProgressFn | None = None) -> SendResult:
    """Migrate the memory of ``cfg.pid`` in one round with the process frozen."""
    t_start = time.monotonic_ns()
    result = SendResult(pid=cfg.pid)
    status = procfs.read_status(cfg.pid)  # ProcessGone / AccessDenied with the pid in the message
    if status.tracer_pid:  # fail before connecting: nothing can be done while another tracer holds it
        raise AlreadyTraced(cfg.pid, status.tracer_pid)
    comm = procfs.read_comm(cfg.pid)
    scanner = make_scanner(cfg.pid, force_pagemap_file=cfg.force_pagemap_file)
    result.scanner = type(scanner).__name__
    log.info("attaching pid=%d comm=%s threads=%d scanner=%s", cfg.pid, comm, status.threads, result.scanner)

    async with _connect(cfg.target, cfg.connect_timeout_s) as channel, _closing(scanner):
        stream = _Stream(channel, cfg.target)
        freezer = PtraceFreezer(cfg.pid)
        thawed = False
        try:
            freezer.freeze()
            result.freezing_time_us = freezer.freezing_time_us
            accepted = await stream.open(pb.SessionOpen(
                protocol_version=PROTOCOL_VERSION, pid=cfg.pid, page_size=PAGE_SIZE,
                tracker=pb.TRACKER_NONE, comm=comm, source_host=socket.gethostname()))
            result.session_id = accepted.session_id
            if accepted.max_batch_bytes and accepted.max_batch_bytes < cfg.batch_pages * PAGE_SIZE:
                raise ProtocolError(f"receiver accepts batches of at most {accepted.max_batch_bytes} bytes")

            t_dump = time.monotonic_ns()
            vmas = procfs.select_dumpable(procfs.read_maps(cfg.pid))
            result.vmas = len(vmas)
            runs = scanner.scan(vmas)
            stats = RoundStats(round=0, pages_scanned=runs.total_pages)
            await stream.write(pb.SenderMessage(round_begin=pb.RoundBegin(
                round=0, frozen=True, vmas=[_vma_msg(v) for v in vmas],
                dump_uptime_us=procfs.read_uptime_us())))
            encoder = BatchEncoder(PAGE_SIZE, cfg.zstd_level)
            with MemoryReader(cfg.pid) as reader, ThreadPoolExecutor(
                cfg.workers, thread_name_prefix="pagehaul-batch"
            ) as pool:
                work = _Worker(reader, encoder, cfg.batch_pages)
                seq = await _send_round(stream, round_no=0, runs=runs, work=work, cfg=cfg, pool=pool,
                                        stats=stats, seq=0, progress=progress)
            await stream.write(pb.SenderMessage(round_end=pb.RoundEnd(round=0, last_seq=seq, final=True)))
            committed = await stream.wait_committed()
            stats.memdump_time_us = (time.monotonic_ns() - t_dump) // 1000
            stats.directory = committed.directory
            if committed.pages_written != stats.pages_written:
                raise ProtocolError(f"receiver committed {committed.pages_written} pages, "
                                    f"{stats.pages_written} were sent")
            result.rounds.append(stats)
            await stream.finish()
            freezer.thaw(leave_stopped=cfg.leave_stopped)
            thawed = True
            result.left_stopped = cfg.leave_stopped
        finally:
            if not thawed:
                stream.cancel()
                freezer.thaw()  # never leave the source frozen because of an error
            result.frozen_time_us = freezer.frozen_time_us
    result.total_time_us = (time.monotonic_ns() - t_start) // 1000
    return result

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
import dataclasses
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal, cast

import grpc
import numpy as np
import numpy.typing as npt

from pagehaul.errors import (
    AlreadyTraced,
    ConfigError,
    PagehaulError,
    ProcessError,
    ProcessGone,
    ProtocolError,
    TransportError,
)
from pagehaul.metrics import SenderMetrics
from pagehaul.runs import Runs
from pagehaul.security import Security
from pagehaul.v1 import migration_pb2 as pb
from pagehaul.wire import CHANNEL_OPTIONS, MAX_BATCH_BYTES, MAX_RUNS_PER_MESSAGE, PROTOCOL_VERSION
from sender import procfs
from sender.adaptive import AdaptiveLevel
from sender.batcher import BatchEncoder, EncodedBatch
from sender.freezer import PtraceFreezer
from sender.memreader import MemoryReader
from sender.policy import ConvergenceLimits, ConvergencePolicy, RoundObservation
from sender.rounds import Held, RoundPlan, held_after, plan_round
from sender.scanner import PageScanner, make_scanner
from sender.stream import RoundRestart, SessionStream
from sender.throttle import SignalThrottle, Throttle, make_throttle
from sender.trackers import select_tracker
from sender.trackers.base import DirtyTracker, SentRecorder

log = logging.getLogger(__name__)

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True, slots=True)
class SendConfig:
    pid: int
    target: str
    force_pagemap_file: bool = False
    # None turns compression off (zero pages are still sent as holes).
    zstd_level: int | None = 1
    # Move the zstd level with whichever of compression and the link is the bottleneck.
    adaptive_compression: bool = False
    # Cap on bytes per second put on the wire (None: no cap).
    bandwidth_limit_bps: float | None = None
    batch_pages: int = MAX_BATCH_BYTES // PAGE_SIZE
    workers: int = 2
    # Batches read and compressed ahead of the network, per worker.
    depth_per_worker: int = 2
    # "auto" (probe), "none" (one frozen round, no pre-copy) or a tracker name.
    tracker: str = "auto"
    # After the final dump: leave the source stopped (so a destination can take over) or resume it.
    leave_stopped: bool = True
    limits: ConvergenceLimits = field(default_factory=ConvergenceLimits)
    auto_converge: bool = False
    # The final frozen round must be committed by the receiver within this time, else the source
    # is thawed and the migration fails.
    freeze_timeout_s: float = 60.0
    connect_timeout_s: float = 10.0
    # After a lost connection, keep trying to resume the session for this long.
    resume_deadline_s: float = 30.0
    # The CLI makes users choose; the Python API defaults to plain TCP for in-process use.
    security: Security = field(default_factory=lambda: Security(insecure=True))
    metrics: SenderMetrics | None = None

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
        if self.freeze_timeout_s <= 0:
            raise ConfigError("freeze timeout must be positive")
        if self.bandwidth_limit_bps is not None and self.bandwidth_limit_bps <= 0:
            raise ConfigError("bandwidth limit must be positive")


@dataclass(slots=True)
class RoundStats:
    """Per-round counters, named like CRIU's stats.proto dump_stats_entry where they mirror it."""

    round: int
    frozen: bool = False
    pages_scanned: int = 0
    dirty_pages: int = 0
    pages_written: int = 0
    pages_zero: int = 0
    pages_skipped_parent: int = 0
    pages_unreadable: int = 0
    raw_bytes: int = 0
    wire_bytes: int = 0
    memdump_time_us: int = 0
    tracker_time_us: int = 0
    freezing_time_us: int = 0
    estimated_downtime_ms: float = 0.0
    throttle_percent: int = 0
    directory: str = ""

    @property
    def compression_ratio(self) -> float:
        return self.raw_bytes / self.wire_bytes if self.wire_bytes else 0.0

    def to_wire(self) -> pb.RoundStats:
        return pb.RoundStats(
            pages_scanned=self.pages_scanned, pages_skipped_parent=self.pages_skipped_parent,
            pages_written=self.pages_written, pages_zero=self.pages_zero, dirty_pages=self.dirty_pages,
            wire_bytes=self.wire_bytes, memdump_time_us=self.memdump_time_us,
            tracker_time_us=self.tracker_time_us, freezing_time_us=self.freezing_time_us)


@dataclass(slots=True)
class SendResult:
    pid: int
    session_id: str = ""
    scanner: str = ""
    tracker: str = "none"
    vmas: int = 0
    rounds: list[RoundStats] = field(default_factory=list)
    converged: bool = False
    stop_reason: str = ""
    freezing_time_us: int = 0
    frozen_time_us: int = 0
    # time.monotonic_ns() when the final freeze completed (0: never frozen); downtime starts here.
    frozen_at_ns: int = 0
    total_time_us: int = 0
    left_stopped: bool = False
    # Times the connection was lost and the session resumed.
    resumes: int = 0


@dataclass(frozen=True, slots=True)
class Progress:
    round: int
    pages_done: int
    pages_total: int
    wire_bytes: int
    frozen: bool = False
    # Pages the tracker found dirty for this round, and the policy's downtime estimate made then.
    dirty_pages: int = 0
    estimated_downtime_ms: float = 0.0


ProgressFn = Callable[[Progress], None]


@asynccontextmanager
async def _connect(target: str, timeout_s: float, security: Security) -> AsyncIterator[grpc.aio.Channel]:
    if security.tls is not None:
        channel = grpc.aio.secure_channel(target, security.tls.channel_credentials(), options=CHANNEL_OPTIONS)
    else:
        channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
    try:
        try:
            await asyncio.wait_for(channel.channel_ready(), timeout_s)
        except TimeoutError as err:
            how = "with TLS (is the receiver using TLS, and does its certificate match the CA?)" if security.tls \
                else "over plain TCP"
            raise TransportError(f"cannot reach receiver at {target} within {timeout_s:g} s {how}") from err
        yield channel
    finally:
        await channel.close(None)


@asynccontextmanager
async def _closing(scanner: PageScanner) -> AsyncIterator[PageScanner]:
    try:
        yield scanner
    finally:
        scanner.close()


def _vma_msg(v: procfs.Vma) -> pb.Vma:
    return pb.Vma(start=v.start, end=v.end, prot=v.prot, kind=cast("pb.VmaKind", int(v.kind)),
                  pgoff=v.pgoff, path=v.path)


@dataclass(frozen=True, slots=True)
class _Work:
    runs: Runs
    enc: EncodedBatch | None  # None: the pages could not be read (live round only)


class _Worker:
    """Per-thread read buffer, reused batch after batch."""

    def __init__(self, reader: MemoryReader, encoder: BatchEncoder, batch_pages: int,
                 recorder: SentRecorder | None = None) -> None:
        self._reader = reader
        self._encoder = encoder
        self._recorder = recorder
        self._nbytes = batch_pages * PAGE_SIZE
        self._local = threading.local()

    def __call__(self, runs: Runs, live: bool, level: int | Literal["default"] | None) -> _Work:
        buf: npt.NDArray[np.uint8] | None = getattr(self._local, "buf", None)
        if buf is None:
            buf = np.empty(self._nbytes, np.uint8)
            self._local.buf = buf
        raw = buf[: runs.total_pages * PAGE_SIZE]
        try:
            self._reader.read(runs, raw, PAGE_SIZE)
        except ProcessGone:
            raise
        except ProcessError as err:
            if not live:
                raise
            # Unmapped while the process ran: leave these pages out of this round. They are not
            # in the round's pagemap, so the next round sends them if they are still there.
            log.debug("pages unreadable in a live round, skipped: %s", err)
            return _Work(runs, None)
        if self._recorder is not None:
            self._recorder.record_sent(runs, raw)
        return _Work(runs, self._encoder.encode(runs, raw, level=level))


@dataclass(frozen=True, slots=True)
class _SentRound:
    """What is needed to send the latest round again: its plan and the state before it."""

    stats: RoundStats
    vmas: list[procfs.Vma]
    plan: RoundPlan
    final: bool
    held_before: Held | None


@dataclass(slots=True)
class _RoundOutcome:
    sent: list[Runs] = field(default_factory=list)
    zero: list[Runs] = field(default_factory=list)


class _Session:
    """One migration: the stream, the worker pool, the running totals."""

    def __init__(self, cfg: SendConfig, stream: SessionStream, work: _Worker, pool: ThreadPoolExecutor,
                 progress: ProgressFn | None) -> None:
        self.cfg = cfg
        self.stream = stream
        self.work = work
        self.pool = pool
        self.progress = progress
        self.seq = 0
        self.held: Held | None = None
        self.rounds: list[RoundStats] = []
        self._committed = 0
        self._last: _SentRound | None = None
        self.adaptive = AdaptiveLevel(start=cfg.zstd_level) if cfg.adaptive_compression else None
        self.bucket = _TokenBucket(cfg.bandwidth_limit_bps) if cfg.bandwidth_limit_bps else None

    async def write(self, msg: pb.SenderMessage, stats: RoundStats) -> None:
        """Put one message on the wire, within the bandwidth cap."""
        size = msg.ByteSize()
        stats.wire_bytes += size
        if self.cfg.metrics is not None:
            self.cfg.metrics.bytes.inc(size)
        if self.bucket is not None:
            await self.bucket.take(size)
        await self.stream.write(msg)

    async def await_commits(self) -> None:
        """Wait until the receiver has committed every round sent so far, in order."""
        while self._committed < len(self.rounds):
            try:
                committed = await self.stream.wait_committed()
            except RoundRestart as rr:
                await self._resend(rr)
                continue
            mine = self.rounds[committed.round]
            mine.directory = committed.directory
            if committed.round != self._committed or committed.pages_written != mine.pages_written:
                raise ProtocolError(f"receiver committed round {committed.round} with {committed.pages_written} "
                                    f"pages; expected round {self._committed} with {mine.pages_written}")
            self._committed += 1

    async def _resend(self, rr: RoundRestart) -> None:
        """The receiver restarted and lost round ``rr.next_round``: send it again, as planned."""
        while True:
            if self._last is None or rr.next_round != self._last.stats.round or rr.next_round != self._committed:
                raise TransportError(f"the receiver restarted and wants round {rr.next_round}, which cannot be "
                                     "sent again")
            last = self._last
            self.held, self.seq = last.held_before, rr.last_seq
            del self.rounds[rr.next_round:]
            stats = dataclasses.replace(last.stats, pages_written=0, pages_zero=0, pages_skipped_parent=0,
                                        pages_unreadable=0, raw_bytes=0, wire_bytes=0, memdump_time_us=0)
            try:
                await self._send_round_once(stats, last.vmas, last.plan, final=last.final)
            except RoundRestart as again:
                rr = again
            else:
                return

    async def _write_holes(self, kind: int, runs: Runs, stats: RoundStats) -> None:
        for part in _chunks(runs, MAX_RUNS_PER_MESSAGE):
            self.seq += 1
            msg = pb.SenderMessage(holes=pb.Holes(seq=self.seq, kind=cast("pb.HoleKind", kind),
                                                  vaddr=part.vaddr.tolist(), nr_pages=part.nr_pages.tolist()))
            await self.write(msg, stats)

    async def send_round(self, stats: RoundStats, vmas: list[procfs.Vma], plan: RoundPlan, *, final: bool) -> None:
        """Stream one round; sent again from the start if the receiver restarts meanwhile."""
        self._last = _SentRound(stats, vmas, plan, final, self.held)
        try:
            await self._send_round_once(stats, vmas, plan, final=final)
        except RoundRestart as rr:
            await self._resend(rr)

    async def _send_round_once(self, stats: RoundStats, vmas: list[procfs.Vma], plan: RoundPlan, *,
                               final: bool) -> None:
        """Stream one round: begin, parent/zero holes, data batches in address order, end."""
        t0 = time.monotonic_ns()
        await self.write(pb.SenderMessage(round_begin=pb.RoundBegin(
            round=stats.round, frozen=stats.frozen, vmas=[_vma_msg(v) for v in vmas],
            dump_uptime_us=procfs.read_uptime_us())), stats)
        await self._write_holes(pb.HOLE_KIND_PARENT, plan.parent, stats)
        await self._write_holes(pb.HOLE_KIND_ZERO, plan.zero, stats)
        stats.pages_skipped_parent = plan.parent.total_pages
        stats.pages_zero = plan.zero.total_pages
        m = self.cfg.metrics
        if m is not None:
            m.rounds.inc()
            m.dirty.set(plan.dirty_pages)
            m.pages.labels("parent").inc(plan.parent.total_pages)
            m.pages.labels("zero").inc(plan.zero.total_pages)
        outcome = await self._send_data(stats, plan.data, live=not stats.frozen)
        await self.write(pb.SenderMessage(round_end=pb.RoundEnd(
            round=stats.round, last_seq=self.seq, final=final, stats=stats.to_wire())), stats)
        stats.memdump_time_us = (time.monotonic_ns() - t0) // 1000
        self.held = held_after(Runs.concat(outcome.sent).sorted(), plan.parent,
                               Runs.concat([plan.zero, *outcome.zero]).sorted(), PAGE_SIZE)
        self.rounds.append(stats)

    async def _send_data(self, stats: RoundStats, runs: Runs, *, live: bool) -> _RoundOutcome:
        loop = asyncio.get_running_loop()
        pending: deque[asyncio.Future[_Work]] = deque()
        depth = self.cfg.workers * self.cfg.depth_per_worker
        total, done = runs.total_pages, 0
        outcome = _RoundOutcome()

        async def emit(fut: asyncio.Future[_Work]) -> None:
            nonlocal done
            t0 = time.monotonic()
            work = await fut
            t1 = time.monotonic()
            enc = work.enc
            done += work.runs.total_pages
            if enc is None:
                stats.pages_unreadable += work.runs.total_pages
                return
            if enc.data is not None:
                self.seq += 1
                enc.data.seq = self.seq
                await self.write(pb.SenderMessage(batch=enc.data), stats)
                outcome.sent.append(Runs.of(enc.data.vaddr, enc.data.nr_pages))
            if len(enc.zero_runs):
                await self._write_holes(pb.HOLE_KIND_ZERO, enc.zero_runs, stats)
                outcome.zero.append(enc.zero_runs)
            stats.pages_written += enc.pages_data
            stats.pages_zero += enc.pages_zero
            if self.cfg.metrics is not None:
                self.cfg.metrics.pages.labels("data").inc(enc.pages_data)
                self.cfg.metrics.pages.labels("zero").inc(enc.pages_zero)
            stats.raw_bytes += enc.raw_bytes
            if self.adaptive is not None:
                self.adaptive.observe(t1 - t0, time.monotonic() - t1)
            if self.progress is not None:
                self.progress(Progress(stats.round, done, total, stats.wire_bytes, stats.frozen, stats.dirty_pages,
                                       stats.estimated_downtime_ms))

        try:
            for chunk in runs.split(self.cfg.batch_pages, PAGE_SIZE):
                level: int | Literal["default"] | None = (
                    self.adaptive.level if self.adaptive is not None else "default")
                pending.append(loop.run_in_executor(self.pool, self.work, chunk, live, level))
                if len(pending) >= depth:
                    await emit(pending.popleft())
            while pending:
                await emit(pending.popleft())
        finally:
            for fut in pending:
                fut.cancel()
        return outcome


class _TokenBucket:
    """Bytes-per-second cap with a burst of a quarter second."""

    def __init__(self, rate_bps: float) -> None:
        self.rate = rate_bps
        self.burst = rate_bps / 4
        self.tokens = self.burst
        self.t = time.monotonic()

    async def take(self, n: int) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate) - n
        self.t = now
        if self.tokens < 0:
            await asyncio.sleep(-self.tokens / self.rate)


def _chunks(runs: Runs, n: int) -> Iterator[Runs]:
    for i in range(0, len(runs), n):
        yield Runs(runs.vaddr[i:i + n], runs.nr_pages[i:i + n])


class _Target:
    """The process being migrated: its VMAs and present pages, scanned on demand."""

    def __init__(self, pid: int, scanner: PageScanner) -> None:
        self.pid = pid
        self.scanner = scanner

    def scan(self) -> tuple[list[procfs.Vma], Runs]:
        vmas = procfs.select_dumpable(procfs.read_maps(self.pid))
        return vmas, self.scanner.scan(vmas)


async def migrate(cfg: SendConfig, progress: ProgressFn | None = None) -> SendResult:
    """Migrate the memory of ``cfg.pid``: pre-copy rounds while it runs, then a final frozen dump.

    With ``cfg.tracker == "none"`` there is only the frozen round. Whatever fails, the process is
    never left frozen: it is thawed (a failure before the final round is committed leaves it
    running, never stopped).
    """
    t_start = time.monotonic_ns()
    result = SendResult(pid=cfg.pid)
    status = procfs.read_status(cfg.pid)  # ProcessGone / AccessDenied with the pid in the message
    if status.tracer_pid:  # fail before connecting: nothing can be done while another tracer holds it
        raise AlreadyTraced(cfg.pid, status.tracer_pid)
    comm = procfs.read_comm(cfg.pid)
    scanner = make_scanner(cfg.pid, force_pagemap_file=cfg.force_pagemap_file)
    result.scanner = type(scanner).__name__
    tracker = select_tracker(cfg.tracker, cfg.pid, scanner)
    result.tracker = tracker.name if tracker else "none"
    log.info("attaching pid=%d comm=%s threads=%d scanner=%s tracker=%s",
             cfg.pid, comm, status.threads, result.scanner, result.tracker)
    target = _Target(cfg.pid, scanner)
    policy = ConvergencePolicy(limits=cfg.limits, page_size=PAGE_SIZE, auto_converge=cfg.auto_converge)
    freezer = PtraceFreezer(cfg.pid)
    throttle = make_throttle(cfg.pid) if cfg.auto_converge else SignalThrottle(cfg.pid)
    done = False

    stream = SessionStream(lambda: _connect(cfg.target, cfg.connect_timeout_s, cfg.security), cfg.target,
                           cfg.security.token_metadata(), resume_deadline_s=cfg.resume_deadline_s)
    async with _closing(scanner):
        encoder = BatchEncoder(PAGE_SIZE, cfg.zstd_level)
        try:
            accepted = await stream.open(pb.SessionOpen(
                protocol_version=PROTOCOL_VERSION, pid=cfg.pid, page_size=PAGE_SIZE,
                tracker=cast("pb.Tracker", tracker.wire if tracker else pb.TRACKER_NONE),
                comm=comm, source_host=socket.gethostname()))
            result.session_id = accepted.session_id
            if accepted.max_batch_bytes and accepted.max_batch_bytes < cfg.batch_pages * PAGE_SIZE:
                raise ProtocolError(f"receiver accepts batches of at most {accepted.max_batch_bytes} bytes")
            with MemoryReader(cfg.pid) as reader, ThreadPoolExecutor(
                cfg.workers, thread_name_prefix="pagehaul-batch"
            ) as pool:
                recorder = tracker if isinstance(tracker, SentRecorder) else None
                session = _Session(cfg, stream, _Worker(reader, encoder, cfg.batch_pages, recorder), pool, progress)
                carried = await _live_rounds(session, target=target, tracker=tracker, freezer=freezer,
                                             policy=policy, throttle=throttle, result=result)
                throttle.stop()
                await asyncio.wait_for(
                    _final_round(session, target=target, tracker=tracker, freezer=freezer, carried=carried,
                                 result=result),
                    cfg.freeze_timeout_s)
                result.rounds = session.rounds
                freezer.thaw(leave_stopped=cfg.leave_stopped)
                result.left_stopped = cfg.leave_stopped
                result.frozen_time_us = freezer.frozen_time_us
                result.total_time_us = (time.monotonic_ns() - t_start) // 1000
                await stream.write(pb.SenderMessage(stats=pb.SessionStats(
                    frozen_time_us=result.frozen_time_us, total_time_us=result.total_time_us,
                    converged=result.converged, stop_reason=result.stop_reason,
                    left_stopped=result.left_stopped)))
                await stream.finish()
                done = True
        except TimeoutError as err:
            await stream.abandon("final dump timed out")
            raise TransportError(f"the final dump was not committed within {cfg.freeze_timeout_s:g} s; "
                                 "source thawed") from err
        except (PagehaulError, OSError) as err:
            await stream.abandon(str(err))
            if cfg.metrics is not None:
                cfg.metrics.errors.labels(type(err).__name__).inc()
            raise
        finally:
            throttle.stop()
            if tracker is not None:
                tracker.close()
            if not done:
                stream.cancel()
                freezer.thaw()  # never leave the source frozen because of an error
                result.frozen_time_us = freezer.frozen_time_us
            result.resumes = stream.resumes
            if cfg.metrics is not None:
                cfg.metrics.resumes.inc(stream.resumes)
                cfg.metrics.frozen.set(result.frozen_time_us / 1e6)
            await stream.close()
    return result


async def _live_rounds(session: _Session, *, target: _Target, tracker: DirtyTracker | None,
                       freezer: PtraceFreezer, policy: ConvergencePolicy, throttle: Throttle,
                       result: SendResult) -> Runs | None:
    """Pre-copy rounds while the process runs; returns the dirty set the final round must add."""
    if tracker is None:
        result.stop_reason = "no dirty tracker: single frozen round"
        return None
    freezer.freeze()
    try:
        vmas, _ = target.scan()
        tracker.start(vmas, freezer)
    finally:
        freezer.thaw()
    vmas, present = target.scan()
    result.vmas = len(vmas)
    stats = RoundStats(round=0, pages_scanned=present.total_pages, dirty_pages=present.total_pages)
    plan = plan_round(present, None, None, PAGE_SIZE)
    while True:
        t0 = time.monotonic()
        await session.send_round(stats, vmas, plan, final=False)
        seconds = time.monotonic() - t0
        t_collect = time.monotonic_ns()
        vmas, present, dirty = _collect(target, tracker, freezer)
        tracker_us = (time.monotonic_ns() - t_collect) // 1000
        plan = plan_round(present, dirty, session.held, PAGE_SIZE)
        decision = policy.decide(RoundObservation(
            round=stats.round, pages_sent=stats.pages_written + stats.pages_zero + stats.pages_unreadable,
            seconds=seconds, next_dirty_pages=plan.pages_to_read))
        if decision.stop:
            result.converged, result.stop_reason = decision.converged, decision.reason
            return dirty
        throttle.set(decision.throttle_percent)
        stats = RoundStats(round=stats.round + 1, pages_scanned=present.total_pages, dirty_pages=plan.dirty_pages,
                           tracker_time_us=tracker_us, throttle_percent=decision.throttle_percent,
                           estimated_downtime_ms=decision.estimated_downtime_s * 1e3)


def _collect(target: _Target, tracker: DirtyTracker, freezer: PtraceFreezer) -> tuple[list[procfs.Vma], Runs, Runs]:
    """Scan and collect the dirty set, frozen if the tracker needs it (soft-dirty: read + clear)."""
    if not tracker.needs_freeze:
        vmas, present = target.scan()
        return vmas, present, tracker.collect(vmas, present)
    freezer.freeze()
    try:
        vmas, present = target.scan()
        return vmas, present, tracker.collect(vmas, present)
    finally:
        freezer.thaw()


async def _final_round(session: _Session, *, target: _Target, tracker: DirtyTracker | None,
                       freezer: PtraceFreezer, carried: Runs | None, result: SendResult) -> None:
    """Freeze, send what changed since the last live round, wait until the receiver committed."""
    # Live rounds are committed (fsynced) by the receiver while the next one streams; the last of
    # them must be in before freezing, or its fsync would count as downtime.
    await session.await_commits()
    freezer.freeze()
    result.freezing_time_us = freezer.freezing_time_us
    result.frozen_at_ns = time.monotonic_ns()
    t_collect = time.monotonic_ns()
    vmas, present = target.scan()
    dirty = None
    if tracker is not None:
        collected = tracker.collect(vmas, present)
        dirty = Runs.concat([collected, carried]).sorted() if carried is not None else collected
        dirty = Runs.from_page_addrs(np.unique(dirty.page_addrs(PAGE_SIZE)), PAGE_SIZE)
    t_plan = time.monotonic_ns()
    plan = plan_round(present, dirty, session.held, PAGE_SIZE)
    log.debug("final round: scan+collect %d us, plan %d us", (t_plan - t_collect) // 1000,
              (time.monotonic_ns() - t_plan) // 1000)
    result.vmas = len(vmas)
    stats = RoundStats(round=len(session.rounds), frozen=True, pages_scanned=present.total_pages,
                       dirty_pages=plan.dirty_pages, freezing_time_us=freezer.freezing_time_us,
                       tracker_time_us=(time.monotonic_ns() - t_collect) // 1000)
    t_send = time.monotonic_ns()
    await session.send_round(stats, vmas, plan, final=True)
    t_commit = time.monotonic_ns()
    await session.await_commits()
    log.debug("final round: send %d us, commit %d us", (t_commit - t_send) // 1000,
              (time.monotonic_ns() - t_commit) // 1000)


async def send_frozen(cfg: SendConfig, progress: ProgressFn | None = None) -> SendResult:
    """One round with the process frozen (no pre-copy)."""
    return await migrate(dataclasses.replace(cfg, tracker="none"), progress)

"""The sender: freeze a process tree, find its pages, stream them to a receiver, thaw it.

The target is a process and its descendants (``SendConfig.children``), or every process of a
cgroup v2 (``SendConfig.cgroup``). Each round sends one memory image per process (CRIU's
``pagemap-<vpid>.img``) and one per shared-memory object mapped by any of them
(``pagemap-shmem-<shmid>.img``, read once through the object's file, see ``sender.shmem``).
Processes found between rounds start with a full round; processes gone are dropped.

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
import functools
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
from pathlib import Path
from typing import Literal, cast

import grpc
import numpy as np
import numpy.typing as npt

from pagehaul import procfs
from pagehaul.codec import ImageKey
from pagehaul.errors import (
    AccessDenied,
    AlreadyTraced,
    ConfigError,
    NotConverged,
    PagehaulError,
    ProcessError,
    ProcessGone,
    ProtocolError,
    TransportError,
)
from pagehaul.metrics import SenderMetrics
from pagehaul.runs import U64, Runs
from pagehaul.security import Security
from pagehaul.store import round_dir_name
from pagehaul.v1 import migration_pb2 as pb
from pagehaul.wire import CHANNEL_OPTIONS, MAX_BATCH_BYTES, MAX_RUNS_PER_MESSAGE, PROTOCOL_VERSION
from sender.adaptive import AdaptiveLevel
from sender.batcher import BatchEncoder, EncodedBatch
from sender.freezer import StopGuard
from sender.memreader import MemoryReader
from sender.policy import NO_CONVERGENCE_ACTIONS, ConvergenceLimits, ConvergencePolicy, RoundObservation
from sender.rounds import Held, RoundPlan, held_after, plan_round
from sender.scanner import PageScanner, make_scanner
from sender.shmem import ShmMapping, ShmObject, group_by_object, open_object, shared_mappings
from sender.stream import RoundRestart, SessionStream
from sender.throttle import SignalThrottle, Throttle, make_throttle
from sender.trackers import select_tracker
from sender.trackers.base import DirtyTracker, PageReader, SentRecorder
from sender.trackers.hashing import HashTracker
from sender.trackers.uffd import UffdWpTracker
from sender.tree import TargetSpec, TreeFreezer, check_target, discover, make_tree_freezer

log = logging.getLogger(__name__)

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True, slots=True)
class SendConfig:
    # The process to migrate, with its descendants unless ``children`` is False; 0 with ``cgroup``.
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
    # Every process of this cgroup v2 directory instead of ``pid``'s tree.
    cgroup: Path | None = None
    # Migrate ``pid``'s descendants too (the whole tree).
    children: bool = True
    # Dump shared anonymous memory (MAP_SHARED|MAP_ANONYMOUS, SysV shm, memfd) once per object.
    shmem: bool = True
    # Freeze with the cgroup v2 freezer when the target is exactly a cgroup (else ptrace).
    cgroup_freezer: bool = True
    # Hand the guard that continues a tree left stopped if this process dies (SendResult.stop_guard)
    # to the caller instead of disarming it: for callers with more to do before the stop is final.
    keep_stop_guard: bool = False
    # Keep the target's trackers open after the final round (SendResult.after_final) to ask what
    # was written since, e.g. while CRIU dumped the stopped tree.
    keep_target: bool = False
    # When pre-copy stops converging: "freeze" anyway, "throttle" the target harder and go on, or
    # "abort" with the source running (sender.policy).
    on_no_convergence: str = "freeze"
    # Keep the xxh3 of every page the receiver holds (SendResult.holdings), final round included:
    # a full migration compares CRIU's dump against them.
    keep_digests: bool = False

    def __post_init__(self) -> None:
        if self.on_no_convergence not in NO_CONVERGENCE_ACTIONS:
            raise ConfigError(f"on_no_convergence must be one of {', '.join(NO_CONVERGENCE_ACTIONS)}")
        if self.cgroup is None and self.pid <= 0:
            raise ConfigError(f"invalid pid {self.pid}")
        if self.cgroup is not None and self.pid:
            raise ConfigError("give either a pid or a cgroup, not both")
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
    # Processes and shared-memory objects in the final round.
    processes: int = 0
    shmem_objects: int = 0
    # How the target was frozen: PtraceTreeFreezer or CgroupFreezer.
    freezer: str = ""
    # What the receiver holds after the final round, per image, with page digests
    # (SendConfig.keep_digests); not part of the printed result.
    holdings: dict[ImageKey, Held] = field(default_factory=dict, repr=False)
    # With SendConfig.keep_stop_guard: continues the stopped tree unless disarmed.
    stop_guard: StopGuard | None = field(default=None, repr=False)
    # With SendConfig.keep_target: the stopped target's trackers, still open (close it when done).
    after_final: AfterFinal | None = field(default=None, repr=False)


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


def _vma_msg(v: procfs.Vma) -> pb.Vma:
    return pb.Vma(start=v.start, end=v.end, prot=v.prot, kind=cast("pb.VmaKind", int(v.kind)),
                  pgoff=v.pgoff, path=v.path)


@dataclass(frozen=True, slots=True)
class _Work:
    index: int  # the image's index in the round
    runs: Runs
    enc: EncodedBatch | None  # None: the pages could not be read (live round only)


class _Worker:
    """Per-thread read buffer, reused batch after batch."""

    def __init__(self, encoder: BatchEncoder, batch_pages: int) -> None:
        self._encoder = encoder
        self._nbytes = batch_pages * PAGE_SIZE
        self._local = threading.local()

    def __call__(self, part: _Part, index: int, runs: Runs, live: bool,
                 level: int | Literal["default"] | None) -> _Work:
        buf: npt.NDArray[np.uint8] | None = getattr(self._local, "buf", None)
        if buf is None:
            buf = np.empty(self._nbytes, np.uint8)
            self._local.buf = buf
        raw = buf[: runs.total_pages * PAGE_SIZE]
        try:
            part.source.read(runs, raw, PAGE_SIZE)
        except ProcessGone:
            if part.essential or not live:
                raise
            # One process of the tree exited during a live round: it is dropped next round.
            log.debug("process gone during a live round, its pages skipped pid=%d", part.pid)
            return _Work(index, runs, None)
        except ProcessError as err:
            if not live:
                raise
            # Unmapped while the process ran: leave these pages out of this round. They are not
            # in the round's pagemap, so the next round sends them if they are still there.
            log.debug("pages unreadable in a live round, skipped: %s", err)
            return _Work(index, runs, None)
        if part.recorder is not None:
            part.recorder.record_sent(runs, raw)
        return _Work(index, runs, self._encoder.encode(runs, raw, level=level))


@dataclass(frozen=True, slots=True)
class _Part:
    """One memory image of one round: a process, or a shared-memory object."""

    key: ImageKey
    pid: int  # host pid of the process (the object's first mapper for shared memory)
    vmas: list[procfs.Vma]
    plan: RoundPlan
    source: PageReader
    recorder: SentRecorder | None
    # Its loss fails the migration (the root of a tree); other processes may exit meanwhile.
    essential: bool = False

    def image_msg(self) -> pb.Image:
        kind = pb.IMAGE_KIND_SHMEM if self.key.kind == "shmem" else pb.IMAGE_KIND_PROCESS
        return pb.Image(kind=kind, id=self.key.id, vmas=[_vma_msg(v) for v in self.vmas],
                        pid=self.pid if self.key.kind == "pid" else 0)


@dataclass(frozen=True, slots=True)
class _SentRound:
    """What is needed to send the latest round again: its plan and the state before it."""

    stats: RoundStats
    parts: list[_Part]
    final: bool
    held_before: dict[ImageKey, Held]


class _Session:
    """One migration: the stream, the worker pool, the running totals."""

    def __init__(self, cfg: SendConfig, stream: SessionStream, work: _Worker, pool: ThreadPoolExecutor,
                 progress: ProgressFn | None, *, session_pid: int) -> None:
        self.cfg = cfg
        self.stream = stream
        self.work = work
        self.pool = pool
        self.progress = progress
        self.session_pid = session_pid
        self.seq = 0
        self.held: dict[ImageKey, Held] = {}
        self.rounds: list[RoundStats] = []
        self._committed = 0
        # Rounds sent and not yet committed, oldest first: what a restarted receiver may want again.
        self._unacked: list[_SentRound] = []
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
            self._unacked = [r for r in self._unacked if r.stats.round >= self._committed]

    async def _resend(self, rr: RoundRestart) -> None:
        """The receiver restarted and lost every round from ``rr.next_round`` on: send them again,
        as planned, in order (pages are read again: a round's plan still names every page that
        changed since the round before it, and later changes are in the later rounds' plans)."""
        while True:
            # Rounds the receiver committed before it could say so are committed.
            for r in self._unacked:
                if self._committed <= r.stats.round < rr.next_round:
                    r.stats.directory = round_dir_name(r.stats.round)
                    self._committed = r.stats.round + 1
            lost = [r for r in self._unacked if r.stats.round >= rr.next_round]
            if not lost or lost[0].stats.round != rr.next_round or rr.next_round != self._committed:
                raise TransportError(f"the receiver restarted and wants round {rr.next_round}, which cannot be "
                                     "sent again")
            self._unacked = []
            self.held, self.seq = dict(lost[0].held_before), rr.last_seq
            del self.rounds[rr.next_round:]
            try:
                for r in lost:
                    stats = dataclasses.replace(r.stats, pages_written=0, pages_zero=0, pages_skipped_parent=0,
                                                pages_unreadable=0, raw_bytes=0, wire_bytes=0, memdump_time_us=0,
                                                directory="")
                    self._unacked.append(_SentRound(stats, r.parts, r.final, dict(self.held)))
                    await self._send_round_once(stats, r.parts, final=r.final)
            except RoundRestart as again:
                rr = again
            else:
                return

    async def _write_holes(self, kind: int, runs: Runs, stats: RoundStats, image: int) -> None:
        for part in _chunks(runs, MAX_RUNS_PER_MESSAGE):
            self.seq += 1
            msg = pb.SenderMessage(holes=pb.Holes(seq=self.seq, kind=cast("pb.HoleKind", kind),
                                                  vaddr=part.vaddr.tolist(), nr_pages=part.nr_pages.tolist(),
                                                  image=image))
            await self.write(msg, stats)

    async def send_round(self, stats: RoundStats, parts: list[_Part], *, final: bool) -> None:
        """Stream one round; sent again from the start if the receiver restarts meanwhile."""
        self._unacked.append(_SentRound(stats, parts, final, dict(self.held)))
        try:
            await self._send_round_once(stats, parts, final=final)
        except RoundRestart as rr:
            await self._resend(rr)

    def _round_begin(self, stats: RoundStats, parts: list[_Part]) -> pb.RoundBegin:
        begin = pb.RoundBegin(round=stats.round, frozen=stats.frozen, dump_uptime_us=procfs.read_uptime_us())
        only = parts[0]
        if len(parts) == 1 and only.key == ImageKey("pid", self.session_pid):
            begin.vmas.extend(_vma_msg(v) for v in only.vmas)  # one process: the original encoding
        else:
            begin.images.extend(p.image_msg() for p in parts)
        return begin

    async def _send_round_once(self, stats: RoundStats, parts: list[_Part], *, final: bool) -> None:
        """Stream one round: begin, parent/zero holes, data batches in address order per image, end."""
        t0 = time.monotonic_ns()
        await self.write(pb.SenderMessage(round_begin=self._round_begin(stats, parts)), stats)
        for index, part in enumerate(parts):
            await self._write_holes(pb.HOLE_KIND_PARENT, part.plan.parent, stats, index)
            await self._write_holes(pb.HOLE_KIND_ZERO, part.plan.zero, stats, index)
        stats.pages_skipped_parent = sum(p.plan.parent.total_pages for p in parts)
        stats.pages_zero = sum(p.plan.zero.total_pages for p in parts)
        m = self.cfg.metrics
        if m is not None:
            m.rounds.inc()
            m.dirty.set(sum(p.plan.dirty_pages for p in parts))
            m.pages.labels("parent").inc(stats.pages_skipped_parent)
            m.pages.labels("zero").inc(stats.pages_zero)
        outcomes = await self._send_data(stats, parts, live=not stats.frozen)
        await self.write(pb.SenderMessage(round_end=pb.RoundEnd(
            round=stats.round, last_seq=self.seq, final=final, stats=stats.to_wire())), stats)
        stats.memdump_time_us = (time.monotonic_ns() - t0) // 1000
        # Nothing is planned after the final round; only a full migration needs its holdings.
        if not final or self.cfg.keep_digests:
            self.held = {part.key: self._held_after(part, out) for part, out in zip(parts, outcomes, strict=True)}
        self.rounds.append(stats)

    def _held_after(self, part: _Part, out: _RoundOutcome) -> Held:
        zero = Runs.concat([part.plan.zero, *out.zero]).sorted()
        if not self.cfg.keep_digests:
            return held_after(Runs.concat(out.sent).sorted(), part.plan.parent, zero, PAGE_SIZE)
        digests = np.concatenate(out.digests) if out.digests else np.zeros(0, np.uint64)
        return held_after(Runs.concat(out.sent), part.plan.parent, zero, PAGE_SIZE, sent_digests=digests,
                          before=self.held.get(part.key))

    async def _send_data(self, stats: RoundStats, parts: list[_Part], *, live: bool) -> list[_RoundOutcome]:
        loop = asyncio.get_running_loop()
        pending: deque[asyncio.Future[_Work]] = deque()
        # Without compression a worker is done long before the network is: one batch ahead each
        # keeps the pace and ~12 MiB of RSS off (bench_round0: 131 -> 119 MiB at the same speed).
        per_worker = 1 if self.cfg.zstd_level is None and not self.cfg.adaptive_compression else \
            self.cfg.depth_per_worker
        depth = self.cfg.workers * per_worker
        total, done = sum(p.plan.data.total_pages for p in parts), 0
        outcomes = [_RoundOutcome() for _ in parts]

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
            outcome = outcomes[work.index]
            if enc.data is not None:
                self.seq += 1
                enc.data.seq = self.seq
                enc.data.image = work.index
                # The batch was built inside its message: sent as is, without a copy of the payload.
                await self.write(enc.wire if enc.wire is not None else pb.SenderMessage(batch=enc.data), stats)
                outcome.sent.append(Runs.of(enc.data.vaddr, enc.data.nr_pages))
                if enc.page_digests is not None:
                    outcome.digests.append(enc.page_digests)
            if len(enc.zero_runs):
                await self._write_holes(pb.HOLE_KIND_ZERO, enc.zero_runs, stats, work.index)
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
            for index, part in enumerate(parts):
                for chunk in part.plan.data.split(self.cfg.batch_pages, PAGE_SIZE):
                    level: int | Literal["default"] | None = (
                        self.adaptive.level if self.adaptive is not None else "default")
                    pending.append(loop.run_in_executor(self.pool, self.work, part, index, chunk, live, level))
                    if len(pending) >= depth:
                        await emit(pending.popleft())
            while pending:
                await emit(pending.popleft())
        finally:
            for fut in pending:
                fut.cancel()
        return outcomes


@dataclass(slots=True)
class _RoundOutcome:
    sent: list[Runs] = field(default_factory=list)
    zero: list[Runs] = field(default_factory=list)
    digests: list[U64] = field(default_factory=list)  # per page of ``sent``, when digests are kept


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


# === the target: processes and shared-memory objects =========================================


class _Proc:
    """One process of the target: its scanner, reader and dirty tracker."""

    def __init__(self, pid: int, cfg: SendConfig, *, essential: bool, with_tracker: bool) -> None:
        self.pid = pid
        self.essential = essential
        self.start_time = procfs.read_start_time(pid)
        # Not in a round yet: its first image is whole, whatever an earlier process with the same
        # vpid left in the previous round.
        self.sent = False
        self.vpid = procfs.read_vpid(pid)
        self.key = ImageKey("pid", self.vpid)
        self.scanner: PageScanner = make_scanner(pid, force_pagemap_file=cfg.force_pagemap_file)
        self.reader: MemoryReader | None = None
        self.tracker: DirtyTracker | None = None
        self.armed = False
        try:
            self.reader = MemoryReader(pid)
            if with_tracker:
                self.tracker = select_tracker(cfg.tracker, pid, self.scanner)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
        if self.reader is not None:
            self.reader.close()
        self.scanner.close()


class _Shm:
    def __init__(self, obj: ShmObject, tracked: bool) -> None:
        self.obj = obj
        self.key = ImageKey("shmem", obj.shmid)
        self.tracker = HashTracker(obj.shmid, scanner=obj, reader=obj) if tracked else None
        self.armed = False
        self.sent = False

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
        self.obj.close()


@dataclass(slots=True)
class _Scan:
    """One image as scanned now: its VMAs (byte ranges for shared memory) and present pages."""

    key: ImageKey
    pid: int
    vmas: list[procfs.Vma]
    present: Runs
    source: PageReader
    tracker: DirtyTracker | None
    recorder: SentRecorder | None
    essential: bool
    armed: bool
    # Never sent before: no parent image of its own (the previous round's image with this key, if
    # any, belonged to another process or object).
    fresh: bool


class _Target:
    """The processes being migrated and the shared memory they map, found again each round."""

    def __init__(self, cfg: SendConfig, spec: TargetSpec) -> None:
        self.cfg = cfg
        self.spec = spec
        self.precopy = cfg.tracker != "none"
        self.procs: dict[int, _Proc] = {}
        self.shms: dict[int, _Shm] = {}
        self.tracker_name = "none"
        self.scanner_name = ""

    def close(self) -> None:
        for proc in self.procs.values():
            proc.close()
        for shm in self.shms.values():
            shm.close()
        self.procs.clear()
        self.shms.clear()

    def refresh(self, pids: list[int] | None = None, *, with_tracker: bool = True) -> list[int]:
        """Take the target's processes now (or ``pids``): new ones are opened, gone ones dropped.
        Returns the new pids."""
        current = discover(self.spec) if pids is None else pids
        for pid in [p for p in self.procs if p not in current or self._reused(p)]:
            log.info("process left the target pid=%d", pid)
            self.procs.pop(pid).close()
        new = []
        for pid in current:
            if pid in self.procs:
                continue
            try:
                proc = _Proc(pid, self.cfg, essential=pid == self.spec.pid,
                             with_tracker=with_tracker and self.precopy)
            except ProcessGone:
                if pid == self.spec.pid:
                    raise
                continue
            self.procs[pid] = proc
            new.append(pid)
            self.scanner_name = self.scanner_name or type(proc.scanner).__name__
            if proc.tracker is not None:
                self.tracker_name = proc.tracker.name
        if not self.procs:
            raise ProcessGone(self.spec.pid, "no process of the target is left")
        return new

    def _reused(self, pid: int) -> bool:
        """The pid now names another process (the one we had exited, and the pid was reused)."""
        try:
            return procfs.read_start_time(pid) != self.procs[pid].start_time
        except ProcessGone:
            return True

    def mark_sent(self) -> None:
        """Every process and object now has an image in the latest round."""
        for proc in self.procs.values():
            proc.sent = True
        for shm in self.shms.values():
            shm.sent = True

    def arm(self, freezer: TreeFreezer) -> None:
        """Start the tracker of every process not tracked yet, before its pages are read; the target
        must not be frozen by the cgroup freezer (see ``_live_rounds``)."""
        for pid, proc in list(self.procs.items()):
            if proc.tracker is None or proc.armed:
                continue
            try:
                vmas = procfs.select_dumpable(procfs.read_maps(pid))
                with freezer.holding(pid) as held:
                    proc.tracker.start(vmas, held)
            except ProcessGone:
                if proc.essential:
                    raise
                self.procs.pop(pid).close()
                continue
            proc.armed = True

    def scan(self) -> list[_Scan]:
        """Every image now: processes ascending by pid, then shared-memory objects by shmid."""
        out: list[_Scan] = []
        mappings: list[ShmMapping] = []
        for pid, proc in list(self.procs.items()):
            try:
                entries = procfs.read_maps(pid)
                vmas = procfs.select_dumpable(entries)
                present = proc.scanner.scan(vmas)
            except ProcessGone:
                if proc.essential:
                    raise
                log.info("process left the target pid=%d", pid)
                self.procs.pop(pid).close()
                continue
            if not vmas:  # a zombie, or a process that is exiting: nothing to dump
                continue
            assert proc.reader is not None
            recorder = proc.tracker if isinstance(proc.tracker, SentRecorder) else None
            out.append(_Scan(proc.key, pid, vmas, present, proc.reader, proc.tracker, recorder, proc.essential,
                             proc.armed, not proc.sent))
            if self.cfg.shmem:
                mappings.extend(shared_mappings(pid, entries))
        if not out:
            raise ProcessGone(self.spec.pid, "no process of the target is left")
        keys = [s.key for s in out]
        if len(set(keys)) != len(keys):
            raise ConfigError("two processes of the target have the same pid in their namespaces; "
                              "CRIU image names would clash")
        groups = group_by_object(mappings)
        for shmid in [i for i in self.shms if i not in groups]:
            self.shms.pop(shmid).close()
        for shmid in sorted(groups):
            shm = self.shms.get(shmid)
            if shm is None:
                try:
                    shm = _Shm(open_object(shmid, groups[shmid], PAGE_SIZE), tracked=self.precopy)
                except (ProcessGone, AccessDenied) as err:
                    log.warning("shared memory %d not readable, skipped: %s", shmid, err)
                    continue
                self.shms[shmid] = shm
            shm.obj.set_mappings(groups[shmid])
            vmas = shm.obj.vmas()
            if not vmas:
                continue
            out.append(_Scan(shm.key, shm.obj.mapper, vmas, shm.obj.scan(vmas), shm.obj, shm.tracker, shm.tracker,
                             False, shm.armed, not shm.sent))
        return out

    def arm_shmem(self, scans: list[_Scan]) -> list[_Scan]:
        """Hash new shared-memory objects once (their first round is full anyway)."""
        for s in scans:
            if s.key.kind != "shmem" or s.tracker is None or s.armed:
                continue
            shm = self.shms[s.key.id]
            shm.tracker.start(s.vmas, None)  # type: ignore[union-attr, arg-type]  # the hash tracker needs no freezer
            shm.armed = s.armed = True
        return scans

    @property
    def needs_freeze(self) -> bool:
        return any(p.tracker is not None and p.tracker.needs_freeze for p in self.procs.values())


class AfterFinal:
    """The stopped target after the final round, trackers still armed (SendConfig.keep_target)."""

    def __init__(self, target: _Target) -> None:
        self._target = target

    @property
    def vouches(self) -> bool:
        """Every process has a kernel tracker (uffd-wp, soft-dirty) that can say, without reading
        memory, which pages were written since the final round."""
        return all(p.tracker is not None and p.armed and not isinstance(p.tracker, HashTracker)
                   for p in self._target.procs.values())

    def before_dump(self) -> None:
        """Keep tracking only what a lazy dump leaves in the source (private anonymous memory):
        uffd-wp markers on the rest would read as swapped pages to CRIU (UffdWpTracker.release)."""
        for s in self._target.scan():
            if s.key.kind == "pid" and isinstance(s.tracker, UffdWpTracker):
                s.tracker.release([v for v in s.vmas if v.kind == procfs.VmaKind.FILE_PRIVATE])

    def written(self) -> dict[ImageKey, U64]:
        """Per process image, the page addresses written since the final round's collect
        (``vouches`` must be true; shared memory is not asked)."""
        out: dict[ImageKey, U64] = {}
        for s in self._target.scan():
            if s.key.kind != "pid":
                continue
            if s.tracker is None or not s.armed:
                raise RuntimeError(f"{s.key.pagemap_name}: no tracker to say what was written")
            out[s.key] = np.unique(s.tracker.collect(s.vmas, s.present).page_addrs(PAGE_SIZE))
        return out

    def close(self) -> None:
        self._target.close()


def _collect(scans: list[_Scan], target: _Target) -> tuple[list[_Scan], dict[ImageKey, Runs | None]]:
    """The images still there and the dirty set of each (None: not tracked yet, send it whole)."""
    kept: list[_Scan] = []
    dirty: dict[ImageKey, Runs | None] = {}
    for s in scans:
        if s.tracker is None or not s.armed:
            dirty[s.key] = None
            kept.append(s)
            continue
        try:
            dirty[s.key] = s.tracker.collect(s.vmas, s.present)
        except ProcessGone:
            if s.essential:
                raise
            log.info("process left the target pid=%d", s.pid)  # dropped from this round on
            gone = target.procs.pop(s.pid, None)
            if gone is not None:
                gone.close()
            continue
        kept.append(s)
    return kept, dirty


def _parts(scans: list[_Scan], dirty: dict[ImageKey, Runs | None], held: dict[ImageKey, Held]) -> list[_Part]:
    return [_Part(s.key, s.pid, s.vmas,
                  plan_round(s.present, dirty.get(s.key), None if s.fresh else held.get(s.key), PAGE_SIZE),
                  s.source, s.recorder, s.essential) for s in scans]


def target_spec(cfg: SendConfig) -> TargetSpec:
    return TargetSpec(pid=cfg.pid, cgroup=cfg.cgroup, children=cfg.children)


async def send(cfg: SendConfig, progress: ProgressFn | None = None) -> SendResult:
    """Migrate the memory of the target: pre-copy rounds while it runs, then a final frozen dump.

    With ``cfg.tracker == "none"`` there is only the frozen round. Whatever fails, the target is
    never left frozen: it is thawed (a failure before the final round is committed leaves it
    running, never stopped).
    """
    t_start = time.monotonic_ns()
    spec = target_spec(cfg)
    pids = discover(spec)  # ProcessGone / ConfigError with the pid or cgroup in the message
    check_target(pids)
    lead = cfg.pid or pids[0]
    result = SendResult(pid=lead)
    for pid in pids:
        try:
            status = procfs.read_status(pid)
        except ProcessGone:
            if pid == cfg.pid:
                raise
            continue
        if status.tracer_pid and status.tracer_pid != os.getpid():
            # fail before connecting: nothing can be done while another tracer holds it
            raise AlreadyTraced(pid, status.tracer_pid)
    comm = procfs.read_comm(lead)
    target = _Target(cfg, spec)
    freezer = make_tree_freezer(spec, pids, use_cgroup=cfg.cgroup_freezer)
    result.freezer = type(freezer).__name__
    policy = ConvergencePolicy(limits=cfg.limits, page_size=PAGE_SIZE, auto_converge=cfg.auto_converge,
                               on_no_convergence=cfg.on_no_convergence)
    members = functools.partial(discover, spec)  # the whole target, walked again when throttling
    throttle = make_throttle(lead, members=members) if cfg.auto_converge else SignalThrottle(lead, members=members)
    done = False

    stream = SessionStream(lambda: _connect(cfg.target, cfg.connect_timeout_s, cfg.security), cfg.target,
                           cfg.security.token_metadata(), resume_deadline_s=cfg.resume_deadline_s)
    try:
        target.refresh(pids)
        result.scanner = target.scanner_name
        result.tracker = target.tracker_name
        log.info("attaching pid=%d comm=%s processes=%d scanner=%s tracker=%s freezer=%s",
                 lead, comm, len(target.procs), result.scanner, result.tracker, type(freezer).__name__)
        encoder = BatchEncoder(PAGE_SIZE, cfg.zstd_level, page_digests=cfg.keep_digests)
        try:
            accepted = await stream.open(pb.SessionOpen(
                protocol_version=PROTOCOL_VERSION, pid=lead, page_size=PAGE_SIZE,
                tracker=cast("pb.Tracker", _tracker_wire(target.tracker_name)),
                comm=comm, source_host=socket.gethostname()))
            result.session_id = accepted.session_id
            if accepted.max_batch_bytes and accepted.max_batch_bytes < cfg.batch_pages * PAGE_SIZE:
                raise ProtocolError(f"receiver accepts batches of at most {accepted.max_batch_bytes} bytes")
            with ThreadPoolExecutor(cfg.workers, thread_name_prefix="pagehaul-batch") as pool:
                session = _Session(cfg, stream, _Worker(encoder, cfg.batch_pages), pool, progress, session_pid=lead)
                carried = await _live_rounds(session, target=target, freezer=freezer, policy=policy,
                                             throttle=throttle, result=result)
                throttle.stop()
                await asyncio.wait_for(
                    _final_round(session, target=target, freezer=freezer, carried=carried, result=result),
                    cfg.freeze_timeout_s)
                result.rounds = session.rounds
                if cfg.keep_digests:
                    result.holdings = session.held
                freezer.thaw(leave_stopped=cfg.leave_stopped)
                guard = freezer.take_stop_guard()
                if cfg.keep_stop_guard:
                    result.stop_guard = guard
                elif guard is not None:
                    guard.disarm()  # left stopped for the destination, on purpose
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
        try:
            if not done:
                stream.cancel()
                freezer.thaw()  # never leave the source frozen because of an error
                result.frozen_time_us = freezer.frozen_time_us
        finally:
            if done and cfg.keep_target:
                result.after_final = AfterFinal(target)
            else:
                target.close()  # trackers closed after the thaw: uffd-wp needs no stopped target
            result.resumes = stream.resumes
            if cfg.metrics is not None:
                cfg.metrics.resumes.inc(stream.resumes)
                cfg.metrics.frozen.set(result.frozen_time_us / 1e6)
            await stream.close()
    return result


def _tracker_wire(name: str) -> int:
    return {"none": pb.TRACKER_NONE, "uffd-wp": pb.TRACKER_UFFD_WP, "soft-dirty-pagemap": pb.TRACKER_SOFT_DIRTY_PAGEMAP,
            "soft-dirty-scan": pb.TRACKER_SOFT_DIRTY_SCAN, "hash": pb.TRACKER_HASH}[name]


async def _live_rounds(session: _Session, *, target: _Target, freezer: TreeFreezer, policy: ConvergencePolicy,
                       throttle: Throttle, result: SendResult) -> dict[ImageKey, Runs | None] | None:
    """Pre-copy rounds while the target runs; returns the dirty sets the final round must add."""
    if not target.precopy:
        result.stop_reason = "no dirty tracker: single frozen round"
        return None
    # Each process is stopped on its own while its tracker starts (uffd-wp injects a system call,
    # which a cgroup-frozen process would never run); one that forks meanwhile is found by the
    # next refresh and sent whole then.
    target.refresh()
    target.arm(freezer)
    scans = target.arm_shmem(target.scan())
    result.vmas = sum(len(s.vmas) for s in scans)
    parts = _parts(scans, {}, {})
    total = sum(p.plan.pages_to_read for p in parts)
    stats = RoundStats(round=0, pages_scanned=sum(s.present.total_pages for s in scans), dirty_pages=total)
    while True:
        t0 = time.monotonic()
        await session.send_round(stats, parts, final=False)
        target.mark_sent()
        seconds = time.monotonic() - t0
        t_collect = time.monotonic_ns()
        scans, dirty = _collect_round(target, freezer)
        tracker_us = (time.monotonic_ns() - t_collect) // 1000
        parts = _parts(scans, dirty, session.held)
        decision = policy.decide(RoundObservation(
            round=stats.round, pages_sent=stats.pages_written + stats.pages_zero + stats.pages_unreadable,
            seconds=seconds, next_dirty_pages=sum(p.plan.pages_to_read for p in parts)))
        if decision.abort:
            result.stop_reason = decision.reason
            raise NotConverged(f"pre-copy did not converge: {decision.reason}")
        if decision.stop:
            result.converged, result.stop_reason = decision.converged, decision.reason
            return dirty
        throttle.set(decision.throttle_percent)
        stats = RoundStats(round=stats.round + 1, pages_scanned=sum(s.present.total_pages for s in scans),
                           dirty_pages=sum(p.plan.dirty_pages for p in parts), tracker_time_us=tracker_us,
                           throttle_percent=decision.throttle_percent,
                           estimated_downtime_ms=decision.estimated_downtime_s * 1e3)


def _collect_round(target: _Target, freezer: TreeFreezer) -> tuple[list[_Scan], dict[ImageKey, Runs | None]]:
    """Between live rounds: new processes are armed (they go whole), gone ones dropped; then every
    image is scanned and its dirty set collected, frozen if a tracker needs it (soft-dirty)."""
    new = target.refresh()
    if new:
        log.info("processes joined the target pids=%s", new)
        target.arm(freezer)
    if not target.needs_freeze:
        return _collect(target.arm_shmem(target.scan()), target)
    freezer.freeze()
    try:
        return _collect(target.arm_shmem(target.scan()), target)
    finally:
        freezer.thaw()


async def _final_round(session: _Session, *, target: _Target, freezer: TreeFreezer,
                       carried: dict[ImageKey, Runs | None] | None, result: SendResult) -> None:
    """Freeze, send what changed since the last live round, wait until the receiver committed."""
    # Live rounds are committed (fsynced) by the receiver while the next one streams; the last of
    # them must be in before freezing, or its fsync would count as downtime.
    await session.await_commits()
    freezer.freeze()
    if session.cfg.leave_stopped:
        # Whoever takes over (CRIU) must find the memory exactly as this round reads it: no
        # signal may be delivered between the read and the dump (sender.freezer module doc).
        freezer.stop_group()
    result.freezing_time_us = freezer.freezing_time_us
    result.frozen_at_ns = time.monotonic_ns()
    t_collect = time.monotonic_ns()
    target.refresh(freezer.pids, with_tracker=False)  # processes born since: sent whole
    scans, dirty = _collect(target.scan(), target)
    for key, runs in dirty.items():
        before = carried.get(key) if carried is not None else None
        if runs is None or before is None:
            # Not tracked through the last live round (no pre-copy, or new since): sent whole.
            dirty[key] = None
            continue
        both = Runs.concat([runs, before]).sorted()
        dirty[key] = Runs.from_page_addrs(np.unique(both.page_addrs(PAGE_SIZE)), PAGE_SIZE)
    t_plan = time.monotonic_ns()
    parts = _parts(scans, dirty, session.held)
    log.debug("final round: scan+collect %d us, plan %d us", (t_plan - t_collect) // 1000,
              (time.monotonic_ns() - t_plan) // 1000)
    result.vmas = sum(len(s.vmas) for s in scans)
    result.processes = sum(1 for s in scans if s.key.kind == "pid")
    result.shmem_objects = len(scans) - result.processes
    stats = RoundStats(round=len(session.rounds), frozen=True, pages_scanned=sum(s.present.total_pages for s in scans),
                       dirty_pages=sum(p.plan.dirty_pages for p in parts), freezing_time_us=freezer.freezing_time_us,
                       tracker_time_us=(time.monotonic_ns() - t_collect) // 1000)
    t_send = time.monotonic_ns()
    await session.send_round(stats, parts, final=True)
    t_commit = time.monotonic_ns()
    await session.await_commits()
    log.debug("final round: send %d us, commit %d us", (t_commit - t_send) // 1000,
              (time.monotonic_ns() - t_commit) // 1000)


async def send_frozen(cfg: SendConfig, progress: ProgressFn | None = None) -> SendResult:
    """One round with the target frozen (no pre-copy)."""
    return await send(dataclasses.replace(cfg, tracker="none"), progress)

"""Pre-copy: freeze nothing while rounds of memory move, then freeze the target, send what
changed, and hand it on stopped (or resume it).

    open the session -> PRECOPY: live rounds until the policy stops them
      -> FROZEN: freeze, final round -> COMMITTED: the receiver has every page
      -> thaw (or leave stopped), session stats, end of the stream

This module holds only the order of things and the migration's phases (``sender.phases``):
what the target is and what changed in it is ``sender.target``, what a round sends is
``sender.rounds``, the session on the wire is ``sender.session`` over a channel from
``pagehaul.transport`` (gRPC: ``sender.grpc_channel``). Whatever fails, the target is never
left frozen: it is thawed (a failure before the final round is committed leaves it running,
never stopped). ptrace requests must come from the thread that attached, so freezing and
thawing happen on the event loop's thread, never in a worker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from pagehaul import procfs
from pagehaul.errors import AlreadyTraced, NotConverged, PagehaulError, ProcessGone, TransportError
from pagehaul.kernel import PAGE_SIZE
from pagehaul.runs import Runs
from pagehaul.transport import SessionConnector
from sender import grpc_channel
from sender.config import ProgressFn, RoundStats, SendConfig, SendResult
from sender.phases import Phase, Phases
from sender.pipeline import ReadAhead
from sender.policy import ConvergencePolicy, RoundObservation
from sender.rounds import plan_parts
from sender.session import SenderSession, open_session
from sender.stream import ResumableStream
from sender.target import AfterFinal, DirtySets, ImageScan, Target, target_spec
from sender.throttle import SignalThrottle, Throttle, make_throttle
from sender.tree import TreeFreezer, check_target, discover, make_tree_freezer

log = logging.getLogger(__name__)


class PrecopyTarget(Protocol):
    """What the pre-copy asks of a target (``sender.target.Target``; fakes in unit tests)."""

    precopy: bool
    tracker_name: str
    scanner_name: str

    def refresh(self, pids: list[int] | None = None, *, with_tracker: bool = True) -> list[int]: ...

    def start_tracking(self, freezer: TreeFreezer) -> list[ImageScan]: ...

    def collect_live(self, freezer: TreeFreezer) -> tuple[list[ImageScan], DirtySets]: ...

    def collect_frozen(self, pids: list[int]) -> tuple[list[ImageScan], DirtySets]: ...

    def mark_sent(self) -> None: ...

    def after_final(self) -> AfterFinal: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Source:
    """The processes to migrate, found and checked, not yet touched."""

    pid: int  # the session's process: the root of the tree, or the cgroup's first
    comm: str
    pids: list[int]
    target: PrecopyTarget
    freezer: TreeFreezer
    throttle: Throttle


def open_source(cfg: SendConfig) -> Source:
    """Find the target's processes and check that nothing stops us from freezing them."""
    spec = target_spec(cfg)
    pids = discover(spec)  # ProcessGone / ConfigError with the pid or cgroup in the message
    check_target(pids)
    lead = cfg.pid or pids[0]
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
    freezer = make_tree_freezer(spec, pids, use_cgroup=cfg.cgroup_freezer)
    members = functools.partial(discover, spec)  # the whole target, walked again when throttling
    throttle = make_throttle(lead, members=members) if cfg.auto_converge else SignalThrottle(lead, members=members)
    return Source(lead, comm, pids, Target(cfg, spec), freezer, throttle)


async def send(cfg: SendConfig, progress: ProgressFn | None = None, *, phases: Phases | None = None) -> SendResult:
    """Migrate the memory of the target over gRPC: pre-copy rounds while it runs, then a final
    frozen round. ``phases``: go on from (and leave) these phases, e.g. for ``sender.migrate``.

    With ``cfg.tracker == "none"`` there is only the frozen round.
    """
    connect = grpc_channel.session_connector(cfg.target, cfg.connect_timeout_s, cfg.security)
    return await precopy(cfg, open_source(cfg), connect, progress, phases=phases)


async def send_frozen(cfg: SendConfig, progress: ProgressFn | None = None) -> SendResult:
    """One round with the target frozen (no pre-copy)."""
    return await send(dataclasses.replace(cfg, tracker="none"), progress)


async def precopy(cfg: SendConfig, source: Source, connect: SessionConnector, progress: ProgressFn | None = None,
                  *, phases: Phases | None = None) -> SendResult:
    """``send`` with its source and channel given: pre-copy, final round, commit, thaw."""
    t_start = time.monotonic_ns()
    phases = phases if phases is not None else Phases(cfg.metrics)
    target, freezer, throttle = source.target, source.freezer, source.throttle
    result = SendResult(pid=source.pid, freezer=type(freezer).__name__)
    policy = ConvergencePolicy(limits=cfg.limits, page_size=PAGE_SIZE, auto_converge=cfg.auto_converge,
                               on_no_convergence=cfg.on_no_convergence)
    stream = ResumableStream(connect, cfg.target, resume_deadline_s=cfg.resume_deadline_s)
    try:
        with phases.failing():
            target.refresh(source.pids)
            result.scanner = target.scanner_name
            result.tracker = target.tracker_name
            log.info("attaching pid=%d comm=%s processes=%d scanner=%s tracker=%s freezer=%s", source.pid, source.comm,
                     len(source.pids), result.scanner, result.tracker, result.freezer)
            try:
                accepted = await open_session(stream, cfg, pid=source.pid, comm=source.comm,
                                              tracker=target.tracker_name)
                result.session_id = accepted.session_id
                with ThreadPoolExecutor(cfg.workers, thread_name_prefix="pagehaul-batch") as pool:
                    session = SenderSession(cfg, stream, ReadAhead(cfg, pool), progress, session_pid=source.pid)
                    carried = await _live_rounds(session, source, policy, result, phases)
                    throttle.stop()
                    await asyncio.wait_for(_final_round(session, source, carried, result, phases),
                                           cfg.freeze_timeout_s)
                    phases.enter(Phase.COMMITTED)
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
                    await session.finish(result)
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
        committed = phases.current is Phase.COMMITTED
        throttle.stop()
        try:
            if not committed:
                stream.cancel()
                freezer.thaw()  # never leave the source frozen because of an error
                result.frozen_time_us = freezer.frozen_time_us
        finally:
            if committed and cfg.keep_target:
                result.after_final = target.after_final()
            else:
                target.close()  # trackers closed after the thaw: uffd-wp needs no stopped target
            result.resumes = stream.resumes
            if cfg.metrics is not None:
                cfg.metrics.resumes.inc(stream.resumes)
                cfg.metrics.frozen.set(result.frozen_time_us / 1e6)
            await stream.close()
    result.phases = phases.history()
    return result


async def _live_rounds(session: SenderSession, source: Source, policy: ConvergencePolicy, result: SendResult,
                       phases: Phases) -> DirtySets | None:
    """Pre-copy rounds while the target runs; returns the dirty sets the final round must add."""
    target = source.target
    if not target.precopy:
        result.stop_reason = "no dirty tracker: single frozen round"
        return None
    phases.enter(Phase.PRECOPY)
    scans = target.start_tracking(source.freezer)
    result.vmas = sum(len(s.vmas) for s in scans)
    parts = plan_parts(scans, {}, {}, PAGE_SIZE)
    total = sum(p.plan.pages_to_read for p in parts)
    stats = RoundStats(round=0, pages_scanned=sum(s.present.total_pages for s in scans), dirty_pages=total)
    while True:
        t0 = time.monotonic()
        await session.send_round(stats, parts, final=False)
        target.mark_sent()
        seconds = time.monotonic() - t0
        t_collect = time.monotonic_ns()
        scans, dirty = target.collect_live(source.freezer)
        tracker_us = (time.monotonic_ns() - t_collect) // 1000
        parts = plan_parts(scans, dirty, session.held, PAGE_SIZE)
        decision = policy.decide(RoundObservation(
            round=stats.round, pages_sent=stats.pages_written + stats.pages_zero + stats.pages_unreadable,
            seconds=seconds, next_dirty_pages=sum(p.plan.pages_to_read for p in parts)))
        if decision.abort:
            result.stop_reason = decision.reason
            raise NotConverged(f"pre-copy did not converge: {decision.reason}")
        if decision.stop:
            result.converged, result.stop_reason = decision.converged, decision.reason
            return dirty
        source.throttle.set(decision.throttle_percent)
        stats = RoundStats(round=stats.round + 1, pages_scanned=sum(s.present.total_pages for s in scans),
                           dirty_pages=sum(p.plan.dirty_pages for p in parts), tracker_time_us=tracker_us,
                           throttle_percent=decision.throttle_percent,
                           estimated_downtime_ms=decision.estimated_downtime_s * 1e3)


async def _final_round(session: SenderSession, source: Source, carried: DirtySets | None, result: SendResult,
                       phases: Phases) -> None:
    """Freeze, send what changed since the last live round, wait until the receiver committed."""
    freezer = source.freezer
    # Live rounds are committed (fsynced) by the receiver while the next one streams; the last of
    # them must be in before freezing, or its fsync would count as downtime.
    await session.await_commits()
    freezer.freeze()
    if session.cfg.leave_stopped:
        # Whoever takes over (CRIU) must find the memory exactly as this round reads it: no
        # signal may be delivered between the read and the dump (sender.freezer module doc).
        freezer.stop_group()
    result.freezing_time_us = freezer.freezing_time_us
    phases.enter(Phase.FROZEN)  # downtime starts here
    t_collect = time.monotonic_ns()
    scans, dirty = source.target.collect_frozen(freezer.pids)  # processes born since: sent whole
    for key, runs in dirty.items():
        before = carried.get(key) if carried is not None else None
        if runs is None or before is None:
            # Not tracked through the last live round (no pre-copy, or new since): sent whole.
            dirty[key] = None
            continue
        both = Runs.concat([runs, before]).sorted()
        dirty[key] = Runs.from_page_addrs(np.unique(both.page_addrs(PAGE_SIZE)), PAGE_SIZE)
    t_plan = time.monotonic_ns()
    parts = plan_parts(scans, dirty, session.held, PAGE_SIZE)
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

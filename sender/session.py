"""The sender's half of a session on the wire: opening it, streaming rounds (begin, parent and
zero holes, data batches in address order per image, end), waiting for the receiver's commits,
sending rounds again after a receiver restart, and closing it with the session's stats.

Also what the wire is charged with: the bandwidth cap, the sender's page and byte metrics and
the progress callback. What a round contains is decided before (``sender.rounds``); how pages
are read and encoded is ``sender.pipeline``; how messages travel is ``sender.stream``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from contextlib import aclosing
from dataclasses import dataclass, field

import numpy as np

from pagehaul.codec import ImageKey
from pagehaul.errors import ProtocolError, TransportError
from pagehaul.kernel import PAGE_SIZE
from pagehaul.runs import U64, Runs
from pagehaul.store import round_dir_name
from pagehaul.transport import RoundRestart
from pagehaul.v1 import migration_pb2 as pb
from pagehaul.wire import Outgoing
from sender import messages
from sender.config import Progress, ProgressFn, RoundStats, SendConfig, SendResult
from sender.pipeline import ReadAhead
from sender.rounds import Held, RoundPart, held_after
from sender.stream import ResumableStream


async def open_session(stream: ResumableStream, cfg: SendConfig, *, pid: int, comm: str,
                       tracker: str) -> pb.SessionAccepted:
    """Open the session for the process ``pid`` and check the receiver takes our batches."""
    accepted = await stream.open(messages.session_open(pid, comm, tracker, PAGE_SIZE))
    if accepted.max_batch_bytes and accepted.max_batch_bytes < cfg.batch_pages * PAGE_SIZE:
        raise ProtocolError(f"receiver accepts batches of at most {accepted.max_batch_bytes} bytes")
    return accepted


@dataclass(frozen=True, slots=True)
class _SentRound:
    """What is needed to send the latest round again: its plan and the state before it."""

    stats: RoundStats
    parts: list[RoundPart]
    final: bool
    held_before: dict[ImageKey, Held]


@dataclass(slots=True)
class _RoundOutcome:
    sent: list[Runs] = field(default_factory=list)
    zero: list[Runs] = field(default_factory=list)
    digests: list[U64] = field(default_factory=list)  # per page of ``sent``, when digests are kept


class SenderSession:
    """One migration on the wire: the stream, the read-ahead, the running totals."""

    def __init__(self, cfg: SendConfig, stream: ResumableStream, read_ahead: ReadAhead, progress: ProgressFn | None,
                 *, session_pid: int) -> None:
        self.cfg = cfg
        self.stream = stream
        self.read_ahead = read_ahead
        self.progress = progress
        self.session_pid = session_pid
        self.seq = 0
        self.held: dict[ImageKey, Held] = {}
        self.rounds: list[RoundStats] = []
        self._committed = 0
        # Rounds sent and not yet committed, oldest first: what a restarted receiver may want again.
        self._unacked: list[_SentRound] = []
        self.bucket = _TokenBucket(cfg.bandwidth_limit_bps) if cfg.bandwidth_limit_bps else None

    async def write(self, msg: Outgoing, stats: RoundStats) -> None:
        """Put one message on the wire, within the bandwidth cap."""
        size = msg.ByteSize()
        stats.wire_bytes += size
        if self.cfg.metrics is not None:
            self.cfg.metrics.bytes.inc(size)
        if self.bucket is not None:
            await self.bucket.take(size)
        await self.stream.write(msg)

    async def finish(self, result: SendResult) -> None:
        """After the final round: the session's stats, then the end of the stream."""
        await self.stream.write(messages.session_stats(result))
        await self.stream.finish()

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

    async def _write_holes(self, kind: messages.HoleKind, runs: Runs, stats: RoundStats, image: int) -> None:
        for chunk in messages.hole_chunks(runs):
            self.seq += 1
            await self.write(messages.holes(self.seq, kind, chunk, image), stats)

    async def send_round(self, stats: RoundStats, parts: list[RoundPart], *, final: bool) -> None:
        """Stream one round; sent again from the start if the receiver restarts meanwhile."""
        self._unacked.append(_SentRound(stats, parts, final, dict(self.held)))
        try:
            await self._send_round_once(stats, parts, final=final)
        except RoundRestart as rr:
            await self._resend(rr)

    async def _send_round_once(self, stats: RoundStats, parts: list[RoundPart], *, final: bool) -> None:
        """Stream one round: begin, parent/zero holes, data batches in address order per image, end."""
        t0 = time.monotonic_ns()
        await self.write(messages.round_begin(stats, parts, self.session_pid), stats)
        for index, part in enumerate(parts):
            await self._write_holes("parent", part.plan.parent, stats, index)
            await self._write_holes("zero", part.plan.zero, stats, index)
        stats.pages_skipped_parent = sum(p.plan.parent.total_pages for p in parts)
        stats.pages_zero = sum(p.plan.zero.total_pages for p in parts)
        m = self.cfg.metrics
        if m is not None:
            m.rounds.inc()
            m.dirty.set(sum(p.plan.dirty_pages for p in parts))
            m.pages.labels("parent").inc(stats.pages_skipped_parent)
            m.pages.labels("zero").inc(stats.pages_zero)
        outcomes = await self._send_data(stats, parts, live=not stats.frozen)
        await self.write(messages.round_end(stats, self.seq, final), stats)
        stats.memdump_time_us = (time.monotonic_ns() - t0) // 1000
        # Nothing is planned after the final round; only a full migration needs its holdings.
        if not final or self.cfg.keep_digests:
            self.held = {part.key: self._held_after(part, out) for part, out in zip(parts, outcomes, strict=True)}
        self.rounds.append(stats)

    def _held_after(self, part: RoundPart, out: _RoundOutcome) -> Held:
        zero = Runs.concat([part.plan.zero, *out.zero]).sorted()
        if not self.cfg.keep_digests:
            return held_after(Runs.concat(out.sent).sorted(), part.plan.parent, zero, PAGE_SIZE)
        digests = np.concatenate(out.digests) if out.digests else np.zeros(0, np.uint64)
        return held_after(Runs.concat(out.sent), part.plan.parent, zero, PAGE_SIZE, sent_digests=digests,
                          before=self.held.get(part.key))

    async def _send_data(self, stats: RoundStats, parts: list[RoundPart], *, live: bool) -> list[_RoundOutcome]:
        total, done = sum(p.plan.data.total_pages for p in parts), 0
        outcomes = [_RoundOutcome() for _ in parts]
        async with aclosing(self.read_ahead.batches(parts, live=live)) as batches:
            async for batch in batches:
                enc = batch.enc
                done += batch.runs.total_pages
                if enc is None:
                    stats.pages_unreadable += batch.runs.total_pages
                    continue
                outcome = outcomes[batch.index]
                if enc.message is not None:
                    self.seq += 1
                    await self.write(messages.numbered(enc.message, self.seq, batch.index), stats)
                    outcome.sent.append(messages.batch_runs(enc.message))
                    if enc.page_digests is not None:
                        outcome.digests.append(enc.page_digests)
                if len(enc.zero_runs):
                    await self._write_holes("zero", enc.zero_runs, stats, batch.index)
                    outcome.zero.append(enc.zero_runs)
                stats.pages_written += enc.pages_data
                stats.pages_zero += enc.pages_zero
                if self.cfg.metrics is not None:
                    self.cfg.metrics.pages.labels("data").inc(enc.pages_data)
                    self.cfg.metrics.pages.labels("zero").inc(enc.pages_zero)
                stats.raw_bytes += enc.raw_bytes
                if self.progress is not None:
                    self.progress(Progress(stats.round, done, total, stats.wire_bytes, stats.frozen,
                                           stats.dirty_pages, stats.estimated_downtime_ms))
        return outcomes


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

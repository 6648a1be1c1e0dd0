"""sender.precopy driven with fakes: a target whose memory a fake workload writes between rounds,
a freezer that records what it is asked, and a receiver behind a fake SessionChannel that can
cut the connection or refuse. No process, no gRPC: the orchestration, the session, the stream
and its replay buffer run as they do in a migration."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import numpy as np
import pytest
import zstandard

from pagehaul.codec import ImageKey
from pagehaul.errors import NotConverged, PagehaulError, ProtocolError, TransportError
from pagehaul.kernel import PAGE_SIZE
from pagehaul.procfs import Vma, VmaKind
from pagehaul.runs import Runs
from pagehaul.transport import ChannelBroken, LinkLost, SessionChannel, SessionConnector
from pagehaul.v1 import migration_pb2 as pb
from pagehaul.wire import BatchFrame, Outgoing
from sender.config import SendConfig
from sender.freezer import PtraceFreezer, StopGuard
from sender.memreader import Buffer
from sender.phases import Phase, Phases
from sender.policy import ConvergenceLimits
from sender.precopy import Source, precopy
from sender.target import AfterFinal, DirtySets, ImageScan
from sender.tree import TreeFreezer

P = PAGE_SIZE
BASE = 0x7F0000000000
NPAGES = 48
KEY = ImageKey("pid", 1)


class Memory:
    """The target's one mapping; ``write`` is the workload, ``read`` the sender's reader."""

    def __init__(self) -> None:
        self.rng = np.random.default_rng(3)
        self.data = np.zeros(NPAGES * P, np.uint8)
        for i in range(0, NPAGES, 3):  # a third of the pages stay zero
            self.write_page(i)
        self.data[P * 1:P * 2] = 0

    def write_page(self, i: int) -> None:
        self.data[i * P:(i + 1) * P] = self.rng.integers(1, 256, P, dtype=np.uint8)

    def write(self, pages: list[int]) -> Runs:
        for i in pages:
            self.write_page(i)
        return Runs.from_page_addrs(np.array(sorted(BASE + i * P for i in pages), np.uint64), P)

    def page(self, addr: int) -> bytes:
        i = (addr - BASE) // P
        return self.data[i * P:(i + 1) * P].tobytes()

    def read(self, runs: Runs, out: Buffer, page_size: int = P) -> None:
        dst = out if isinstance(out, np.ndarray) else np.frombuffer(out, np.uint8)
        for n, addr in enumerate(runs.page_addrs(P).tolist()):
            dst[n * P:(n + 1) * P] = np.frombuffer(self.page(addr), np.uint8)

    def close(self) -> None:
        pass


class FakeTarget:
    """One process, one mapping, always present; the workload writes ``live_writes[r]`` pages
    after live round r and ``frozen_writes`` before the freeze."""

    precopy = True
    tracker_name = "uffd-wp"
    scanner_name = "FakeScanner"

    def __init__(self, memory: Memory, live_writes: list[list[int]], frozen_writes: list[int]) -> None:
        self.memory = memory
        self.live_writes = list(live_writes)
        self.frozen_writes = frozen_writes
        self.sent = False
        self.closed = False

    def _scan(self) -> ImageScan:
        vma = Vma(BASE, BASE + NPAGES * P, 3, VmaKind.ANON, 0, "")
        return ImageScan(KEY, 1, [vma], Runs.of([BASE], [NPAGES]), self.memory, None, None, True, True,
                         not self.sent)

    def refresh(self, pids: list[int] | None = None, *, with_tracker: bool = True) -> list[int]:
        return []

    def start_tracking(self, freezer: TreeFreezer) -> list[ImageScan]:
        return [self._scan()]

    def collect_live(self, freezer: TreeFreezer) -> tuple[list[ImageScan], DirtySets]:
        pages = self.live_writes.pop(0) if self.live_writes else [5, 6]
        return [self._scan()], {KEY: self.memory.write(pages)}

    def collect_frozen(self, pids: list[int]) -> tuple[list[ImageScan], DirtySets]:
        return [self._scan()], {KEY: self.memory.write(self.frozen_writes)}

    def mark_sent(self) -> None:
        self.sent = True

    def after_final(self) -> AfterFinal:
        raise AssertionError("keep_target is not asked for")

    def close(self) -> None:
        self.closed = True


class FakeFreezer:
    def __init__(self) -> None:
        self.events: list[str] = []
        self._frozen = False

    @property
    def frozen(self) -> bool:
        return self._frozen

    @property
    def pids(self) -> list[int]:
        return [1]

    @property
    def freezing_time_us(self) -> int:
        return 5

    @property
    def frozen_time_us(self) -> int:
        return 7

    def freeze(self) -> None:
        self.events.append("freeze")
        self._frozen = True

    def stop_group(self) -> None:
        self.events.append("stop_group")

    def take_stop_guard(self) -> StopGuard | None:
        return None

    def thaw(self, leave_stopped: bool = False) -> None:
        self.events.append("thaw, left stopped" if leave_stopped else "thaw")
        self._frozen = False

    def holding(self, pid: int) -> contextlib.AbstractContextManager[PtraceFreezer]:
        raise AssertionError("the fake target arms no tracker")


class FakeThrottle:
    def __init__(self) -> None:
        self.percent = 0
        self.stopped = False

    def set(self, percent: int) -> None:
        self.percent = percent

    def stop(self) -> None:
        self.stopped = True


# What the receiver does with the n-th message (1-based) it is about to handle: None handles it,
# "cut" resets the connection (once), "refuse" ends the session with an in-band error.
Fault = Callable[[pb.SenderMessage, int], str | None]


@dataclass
class FakeReceiver:
    fault: Fault = lambda msg, n: None
    handled: int = 0
    connections: int = 0
    seqs: list[int] = field(default_factory=list)
    committed: list[int] = field(default_factory=list)
    pages: dict[int, bytes] = field(default_factory=dict)  # every page as the latest round holds it
    finished: bool = False
    cut_done: bool = False

    def connector(self) -> SessionConnector:
        @asynccontextmanager
        async def connect() -> AsyncIterator[SessionChannel]:
            self.connections += 1
            channel = FakeChannel(self)
            yield channel
            channel.cancel()

        return connect

    def handle(self, msg: pb.SenderMessage) -> list[pb.ReceiverMessage]:
        self.handled += 1
        kind = msg.WhichOneof("msg")
        replies = [pb.ReceiverMessage(ack=pb.Ack(handled=self.handled))]
        if kind == "batch":
            self.seqs.append(msg.batch.seq)
            payload = msg.batch.payload
            if msg.batch.compression == pb.COMPRESSION_ZSTD:
                payload = zstandard.ZstdDecompressor().decompress(payload)
            for n, addr in enumerate(Runs.of(msg.batch.vaddr, msg.batch.nr_pages).page_addrs(P).tolist()):
                self.pages[addr] = payload[n * P:(n + 1) * P]
        elif kind == "holes":
            self.seqs.append(msg.holes.seq)
            if msg.holes.kind == pb.HOLE_KIND_ZERO:
                for addr in Runs.of(msg.holes.vaddr, msg.holes.nr_pages).page_addrs(P).tolist():
                    self.pages[addr] = bytes(P)
        elif kind == "round_end":
            end = msg.round_end
            assert end.last_seq == (self.seqs[-1] if self.seqs else 0)
            self.committed.append(end.round)
            replies.append(pb.ReceiverMessage(committed=pb.RoundCommitted(
                round=end.round, pages_written=end.stats.pages_written, directory=f"round-{end.round}")))
        return replies


class FakeChannel:
    def __init__(self, receiver: FakeReceiver) -> None:
        self._rx = receiver
        self._replies: asyncio.Queue[pb.ReceiverMessage | str | None] = asyncio.Queue()
        self._end: PagehaulError | None = None
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    def _close(self, end: PagehaulError | None, last: str | None = None) -> None:
        self._end, self._done = end, True
        self._replies.put_nowait(last)

    async def write(self, msg: Outgoing) -> None:
        if self._done:
            raise ChannelBroken("call ended")
        if isinstance(msg, BatchFrame):
            msg = msg.message()
        kind = msg.WhichOneof("msg")
        if kind == "open":
            self._replies.put_nowait(pb.ReceiverMessage(accepted=pb.SessionAccepted(
                session_id="s-1", resume_token="t-1")))  # noqa: S106 -- a test's token, no secret
            return
        if kind == "resume":
            self._replies.put_nowait(pb.ReceiverMessage(accepted=pb.SessionAccepted(
                session_id="s-1", resume_token="t-2", handled=self._rx.handled)))  # noqa: S106 -- as above
            return
        if kind == "abandon":
            self._close(None)
            return
        what = self._rx.fault(msg, self._rx.handled + 1)
        if what == "cut" and not self._rx.cut_done:
            self._rx.cut_done = True
            self._close(LinkLost(TransportError("connection reset by the test")), "broken")
            raise ChannelBroken("connection reset by the test")
        if what == "refuse":
            self._replies.put_nowait(pb.ReceiverMessage(error=pb.SessionError(code=3, reason="refused by the test")))
            self._close(ProtocolError("receiver refused the data: refused by the test"))
            return
        for reply in self._rx.handle(msg):
            self._replies.put_nowait(reply)
        if kind == "stats":
            self._rx.finished = True

    async def read(self) -> pb.ReceiverMessage | None:
        reply = await self._replies.get()
        if reply == "broken":
            raise ChannelBroken("connection reset by the test")
        assert not isinstance(reply, str)
        return reply

    async def done_writing(self) -> None:
        if self._done:
            raise ChannelBroken("call ended")
        self._close(None)

    async def ended(self) -> PagehaulError | None:
        return self._end

    def refusal(self, error: pb.SessionError) -> PagehaulError:
        return ProtocolError(f"receiver refused the data: {error.reason}")

    def cancel(self) -> None:
        if not self._done:
            self._close(LinkLost(TransportError("cancelled")))


@dataclass
class Run:
    memory: Memory
    target: FakeTarget
    freezer: FakeFreezer
    throttle: FakeThrottle
    receiver: FakeReceiver
    phases: Phases
    cfg: SendConfig

    @property
    def source(self) -> Source:
        return Source(1, "fake", [1], self.target, self.freezer, self.throttle)


@pytest.fixture
def run() -> Run:
    memory = Memory()
    cfg = SendConfig(pid=1, target="receiver.test:1", batch_pages=4, workers=2,
                     limits=ConvergenceLimits(downtime_target_s=0, min_iter_pages=0, max_grow_percent=1000,
                                              max_rounds=3))
    return Run(memory, FakeTarget(memory, [[0, 3, 4, 9, 30], [3, 9]], [9, 12, 1]), FakeFreezer(), FakeThrottle(),
               FakeReceiver(), Phases(), cfg)


def holds_the_frozen_memory(run: Run) -> bool:
    return all(run.receiver.pages.get(BASE + i * P) == run.memory.page(BASE + i * P) for i in range(NPAGES))


async def test_precopy_final_round_and_commit(run: Run) -> None:
    result = await precopy(run.cfg, run.source, run.receiver.connector(), phases=run.phases)
    assert [t.phase for t in result.phases] == [Phase.PRECOPY, Phase.FROZEN, Phase.COMMITTED]
    assert [(r.round, r.frozen) for r in result.rounds] == [(0, False), (1, False), (2, False), (3, True)]
    assert all(r.directory == f"round-{r.round}" for r in result.rounds)
    assert run.receiver.committed == [0, 1, 2, 3]
    assert run.receiver.seqs == list(range(1, len(run.receiver.seqs) + 1))
    assert run.receiver.finished
    assert holds_the_frozen_memory(run)
    # round 1 sends what the workload wrote after round 0, the rest are parent holes
    assert result.rounds[1].pages_written == 5
    assert result.rounds[1].pages_skipped_parent + result.rounds[1].pages_written + result.rounds[1].pages_zero \
        == NPAGES
    assert run.freezer.events == ["freeze", "stop_group", "thaw, left stopped"]
    assert result.left_stopped
    assert not run.freezer.frozen
    assert run.throttle.stopped
    assert run.target.closed
    assert result.session_id == "s-1"
    assert result.resumes == 0


async def test_without_tracker_one_frozen_round(run: Run) -> None:
    run.target.precopy = False
    result = await precopy(run.cfg, run.source, run.receiver.connector(), phases=run.phases)
    assert [t.phase for t in result.phases] == [Phase.FROZEN, Phase.COMMITTED]
    assert [(r.round, r.frozen) for r in result.rounds] == [(0, True)]
    assert holds_the_frozen_memory(run)


async def test_connection_cut_mid_round_is_resumed(run: Run) -> None:
    run.receiver.fault = lambda msg, n: "cut" if n == 6 else None
    result = await precopy(run.cfg, run.source, run.receiver.connector(), phases=run.phases)
    assert result.resumes == 1
    assert run.receiver.connections == 2
    assert run.receiver.seqs == list(range(1, len(run.receiver.seqs) + 1))  # nothing lost or doubled
    assert run.receiver.committed == [0, 1, 2, 3]
    assert holds_the_frozen_memory(run)
    assert run.phases.current is Phase.COMMITTED


async def test_refused_mid_round_fails_and_the_source_runs(run: Run) -> None:
    run.receiver.fault = lambda msg, n: "refuse" if n == 6 else None
    with pytest.raises(ProtocolError, match="refused by the test"):
        await precopy(run.cfg, run.source, run.receiver.connector(), phases=run.phases)
    assert [t.phase for t in run.phases.history()] == [Phase.PRECOPY, Phase.FAILED]
    assert run.freezer.events == ["thaw"]
    assert not run.freezer.frozen
    assert run.throttle.stopped
    assert run.target.closed


async def test_refused_in_the_final_round_thaws_the_source(run: Run) -> None:
    def frozen_begin(msg: pb.SenderMessage, n: int) -> str | None:
        return "refuse" if msg.WhichOneof("msg") == "round_begin" and msg.round_begin.frozen else None

    run.receiver.fault = frozen_begin
    with pytest.raises(ProtocolError):
        await precopy(run.cfg, run.source, run.receiver.connector(), phases=run.phases)
    assert [t.phase for t in run.phases.history()] == [Phase.PRECOPY, Phase.FROZEN, Phase.FAILED]
    assert run.freezer.events == ["freeze", "stop_group", "thaw"]  # continued, not left stopped
    assert not run.freezer.frozen


async def test_abort_when_not_converging_leaves_the_source_running(run: Run) -> None:
    cfg = SendConfig(pid=1, target="receiver.test:1", batch_pages=4, on_no_convergence="abort",
                     limits=ConvergenceLimits(downtime_target_s=0, min_iter_pages=0, max_rounds=2))
    with pytest.raises(NotConverged):
        await precopy(cfg, run.source, run.receiver.connector(), phases=run.phases)
    assert run.phases.current is Phase.FAILED
    assert "freeze" not in run.freezer.events
    assert run.receiver.committed == [0, 1]

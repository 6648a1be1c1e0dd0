"""Lost connections: the sender resumes the session and nothing is lost or doubled.

The cut is real: the sender talks to the receiver through a TCP relay on 127.0.0.1 that the
test tears down (every connection closed) in the middle of round 0, or the receiver itself is
stopped and a new one started on the same port and images directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path

import pytest

from cli.demo import dump_ranges
from pagehaul import procfs
from pagehaul.codec import InventoryEntry
from pagehaul.errors import TransportError
from pagehaul.kernel import PAGE_SIZE
from pagehaul.oracle import verify_against_process
from pagehaul.store import RoundWriter
from receiver.config import ReceiverConfig
from receiver.grpc_server import Receiver
from receiver.session import ReceiverSession
from sender.config import Progress, RoundStats, SendConfig
from sender.policy import ConvergenceLimits
from sender.precopy import send
from sender.rounds import RoundPart
from sender.session import SenderSession
from tests.conftest import start_workload, stop_process


class Relay:
    """A TCP relay to ``upstream``; :meth:`cut` closes every connection it carries."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.server: asyncio.Server | None = None
        self.port = 0
        self.accepting = True
        self.connections = 0
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.accepting:
            writer.close()
            return
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    def cut(self) -> None:
        for w in self._writers:
            w.transport.abort()  # RST, like a link that went away
        self._writers.clear()

    async def stop(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def cut_after(batches: int, action: object) -> object:
    """A progress callback that runs ``action`` once, after ``batches`` batches of round 0."""
    state = {"n": 0}

    def progress(p: Progress) -> None:
        state["n"] += 1
        if state["n"] == batches and p.round == 0:
            asyncio.get_running_loop().call_soon(action)  # type: ignore[arg-type]

    return progress


async def test_network_cut_mid_round_resumes(receiver: Receiver) -> None:
    relay = Relay(receiver.port)
    await relay.start()
    workload = start_workload(size_mib=48, mutate=True)
    try:
        cfg = SendConfig(pid=workload.pid, target=f"127.0.0.1:{relay.port}", batch_pages=64)
        result = await send(cfg, cut_after(20, relay.cut))  # type: ignore[arg-type]
        assert result.resumes >= 1
        assert relay.connections >= 2
        round_dir = receiver.config.images_dir / result.session_id / result.rounds[-1].directory
        report = verify_against_process(round_dir, workload.pid, dump_ranges(workload.pid), PAGE_SIZE)
        assert report.mismatches == 0
        assert report.ok
    finally:
        stop_process(workload.proc)
        await relay.stop()


async def test_receiver_restart_mid_round_resends_the_round(tmp_path: Path) -> None:
    images = tmp_path / "images"
    first = Receiver(ReceiverConfig(images_dir=images, listen="127.0.0.1:0"))
    port = await first.start()
    second: list[Receiver] = []

    async def restart() -> None:
        await first.stop(0)
        r = Receiver(ReceiverConfig(images_dir=images, listen=f"127.0.0.1:{port}"))
        await r.start()
        second.append(r)

    workload = start_workload(size_mib=48, mutate=True)
    try:
        cfg = SendConfig(pid=workload.pid, target=f"127.0.0.1:{port}", batch_pages=64)
        result = await send(cfg, cut_after(20, lambda: asyncio.ensure_future(restart())))  # type: ignore[arg-type]
        assert second, "the receiver was never restarted"
        assert result.resumes >= 1
        session = images / result.session_id
        assert not any(p.name.startswith(".round") for p in session.iterdir())
        report = verify_against_process(session / result.rounds[-1].directory, workload.pid,
                                        dump_ranges(workload.pid), PAGE_SIZE)
        assert report.ok
        assert report.mismatches == 0
    finally:
        stop_process(workload.proc)
        await first.stop(0)
        for r in second:
            await r.stop(0)


async def test_no_resume_within_deadline_aborts_cleanly(receiver: Receiver) -> None:
    relay = Relay(receiver.port)
    await relay.start()

    def cut_for_good() -> None:
        relay.accepting = False
        relay.cut()

    workload = start_workload(size_mib=32, mutate=True)
    try:
        cfg = SendConfig(pid=workload.pid, target=f"127.0.0.1:{relay.port}", batch_pages=64,
                         resume_deadline_s=1.0, connect_timeout_s=0.5)
        with pytest.raises(TransportError, match="not resumed within 1 s"):
            await send(cfg, cut_after(10, cut_for_good))  # type: ignore[arg-type]
        for tid in procfs.list_threads(workload.pid):
            status = procfs.read_status(tid)
            assert status.tracer_pid == 0
            assert status.state[0] in "RS"
    finally:
        stop_process(workload.proc)
        await relay.stop()


async def test_receiver_restart_before_it_committed_the_previous_round(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The receiver commits round 0 (fsync) while round 1 streams; restarted then, it wants round 0
    again although round 1 is under way. The sender keeps every round not yet committed and sends
    them all again, in order.

    The first receiver's disk is made slow by holding its commit (in the receiver's own process:
    here a test double of a disk whose fsync takes long, the one thing this machine's tmpfs cannot
    do); it never completes, as if that receiver died before its fsync returned.
    """
    images = tmp_path / "images"
    slow = threading.Event()
    held = threading.Event()
    real_commit = RoundWriter.commit

    def slow_commit(self: RoundWriter, inventory: InventoryEntry) -> Path:
        held.set()
        slow.wait(60)
        raise OSError("the disk stopped answering")

    monkeypatch.setattr(RoundWriter, "commit", slow_commit)
    round_one = asyncio.Event()
    real_send_round = SenderSession.send_round

    async def send_round(self: SenderSession, stats: RoundStats, parts: list[RoundPart], *, final: bool) -> None:
        if stats.round == 1:
            round_one.set()
        await real_send_round(self, stats, parts, final=final)

    monkeypatch.setattr(SenderSession, "send_round", send_round)
    real_idle = ReceiverSession.idle

    async def idle(self: ReceiverSession) -> None:
        slow.set()  # the receiver is stopping: its streams are cut, the held commit may now fail
        await real_idle(self)

    monkeypatch.setattr(ReceiverSession, "idle", idle)
    first = Receiver(ReceiverConfig(images_dir=images, listen="127.0.0.1:0"))
    port = await first.start()
    second: list[Receiver] = []

    async def restart() -> None:
        await round_one.wait()  # the sender is on round 1 ...
        await asyncio.to_thread(held.wait, 60)  # ... and the receiver still commits round 0
        await first.stop(0)  # its disk answers (with an error) only once its streams are cut: see idle()
        monkeypatch.setattr(RoundWriter, "commit", real_commit)
        r = Receiver(ReceiverConfig(images_dir=images, listen=f"127.0.0.1:{port}"))
        await r.start()
        second.append(r)

    restarter = asyncio.ensure_future(restart())
    workload = start_workload(size_mib=48, mutate=True)
    try:
        cfg = SendConfig(pid=workload.pid, target=f"127.0.0.1:{port}", batch_pages=64,
                         limits=ConvergenceLimits(downtime_target_s=1e-9, min_iter_pages=0, max_rounds=3))
        result = await send(cfg)
        await restarter
        assert second, "the receiver was never restarted"
        assert result.resumes >= 1
        session = images / result.session_id
        assert [r.round for r in result.rounds] == list(range(len(result.rounds)))
        assert all(r.directory for r in result.rounds)
        report = verify_against_process(session / result.rounds[-1].directory, workload.pid,
                                        dump_ranges(workload.pid), PAGE_SIZE)
        assert report.ok
        assert report.mismatches == 0
    finally:
        slow.set()
        restarter.cancel()
        stop_process(workload.proc)
        await first.stop(0)
        for r in second:
            await r.stop(0)

"""Pre-copy migration of live processes: rounds converge, the final frozen dump completes the
image, and the result equals the frozen process byte for byte, whatever the process did to its
memory and mappings while the rounds ran."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from cli.demo import dump_ranges
from pagehaul import procfs, store
from pagehaul.errors import NotConverged, TransportError
from pagehaul.kernel import PAGE_SIZE
from pagehaul.oracle import verify_against_process
from pagehaul.v1 import migration_pb2 as pb
from pagehaul.wire import CHANNEL_OPTIONS, METHOD, SERVICE
from receiver.grpc_server import Receiver
from sender.config import SendConfig, SendResult
from sender.policy import ConvergenceLimits
from sender.precopy import send
from sender.trackers import probe_all
from tests.conftest import Workload, start_workload, stop_process

AVAILABLE = {a.name for a in probe_all() if a.available}
TRACKERS = [pytest.param(name, marks=pytest.mark.skipif(name not in AVAILABLE, reason=f"{name} unavailable here"))
            for name in ("uffd-wp", "hash")]

# Maps, writes, unmaps, grows and moves anonymous mappings non-stop, so that rounds see VMAs
# appear, vanish, grow, shrink and move between them.
VMA_CHURN_CHILD = r'''
import json, mmap, os, sys
PAGE = mmap.PAGESIZE
live = []
i = 0
print("READY " + json.dumps({"pid": os.getpid()}), flush=True)
while True:
    i += 1
    m = mmap.mmap(-1, PAGE * (1 + i % 7), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m[: 8] = i.to_bytes(8, "little")
    m[-8:] = (i * 3).to_bytes(8, "little")
    live.append(m)
    if len(live) > 12:
        live.pop(i % 5).close()          # vanish
    victim = live[i % len(live)]
    if i % 3 == 0:
        victim.resize(len(victim) + PAGE)  # grow (mremap, may move)
        victim[-8:] = i.to_bytes(8, "little")
    elif i % 3 == 1 and len(victim) > PAGE:
        victim.resize(len(victim) - PAGE)  # shrink
    victim[0:8] = (i * 7).to_bytes(8, "little")
'''


@pytest.fixture
def churner() -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([sys.executable, "-c", VMA_CHURN_CHILD], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("READY ")
        yield proc
    finally:
        stop_process(proc)


def final_dir(receiver: Receiver, result: SendResult) -> Path:
    return receiver.config.images_dir / result.session_id / result.rounds[-1].directory


def assert_identical(receiver: Receiver, result: SendResult, pid: int) -> None:
    report = verify_against_process(final_dir(receiver, result), pid, dump_ranges(pid), PAGE_SIZE)
    assert report.mismatches == 0, f"{report.mismatches} pages differ, first at {report.first_mismatch:#x}"
    assert report.pages_compared > 0


@pytest.mark.parametrize("tracker", TRACKERS)
async def test_precopy_converges_and_matches(receiver: Receiver, workload: Workload, tracker: str) -> None:
    cfg = SendConfig(pid=workload.pid, target=receiver.address, tracker=tracker)
    result = await send(cfg)
    assert result.tracker == tracker
    assert len(result.rounds) >= 2
    assert [r.frozen for r in result.rounds] == [False] * (len(result.rounds) - 1) + [True]
    assert result.left_stopped
    states = {procfs.read_status(t).state[0] for t in procfs.list_threads(workload.pid)}
    assert states == {"T"}
    assert_identical(receiver, result, workload.pid)
    # Later rounds send only what changed: most of the 16 MiB stays in the parent.
    final = result.rounds[-1]
    assert final.pages_skipped_parent > final.pages_written
    assert final.pages_written < result.rounds[0].pages_written
    session = receiver.config.images_dir / result.session_id
    stats = json.loads((session / "stats.json").read_text())
    assert [r["round"] for r in stats["rounds"]] == [r.round for r in result.rounds]
    assert stats["session"]["frozen_time_us"] == result.frozen_time_us
    assert stats["session"]["stop_reason"] == result.stop_reason
    # Every round directory chains to its predecessor and CRIU-style holes are covered.
    for r in result.rounds[1:]:
        assert (session / r.directory / "parent").readlink() == Path(f"../round-{r.round - 1}")
    with store.open_round(final_dir(receiver, result), workload.pid, PAGE_SIZE) as image:
        image.check_digest()


@pytest.mark.parametrize("tracker", TRACKERS)
async def test_precopy_with_vma_churn(receiver: Receiver, churner: subprocess.Popen[str], tracker: str) -> None:
    cfg = SendConfig(pid=churner.pid, target=receiver.address, tracker=tracker,
                     limits=ConvergenceLimits(downtime_target_s=1e-6, min_iter_pages=0, max_grow_percent=1e9,
                                              max_rounds=4))
    result = await send(cfg)
    # Four live rounds, forced, then the frozen one; fewer only if a round found nothing dirty
    # (the churner did not get the CPU in between), which the policy then calls converged.
    assert 2 <= len(result.rounds) <= 5
    assert len(result.rounds) == 5 or result.converged, result.stop_reason
    assert_identical(receiver, result, churner.pid)


async def test_round_limit_is_reported(receiver: Receiver, workload: Workload) -> None:
    cfg = SendConfig(pid=workload.pid, target=receiver.address,
                     limits=ConvergenceLimits(downtime_target_s=1e-9, min_iter_pages=0, max_rounds=1))
    result = await send(cfg)
    assert len(result.rounds) == 2
    assert not result.converged
    assert "reached 1 live rounds" in result.stop_reason
    assert_identical(receiver, result, workload.pid)


async def test_no_convergence_abort_leaves_the_source_running(receiver: Receiver, workload: Workload) -> None:
    cfg = SendConfig(pid=workload.pid, target=receiver.address, on_no_convergence="abort",
                     limits=ConvergenceLimits(downtime_target_s=1e-9, min_iter_pages=0, max_rounds=1))
    with pytest.raises(NotConverged, match=r"did not converge: reached 1 live rounds .* source left running"):
        await send(cfg)
    for tid in procfs.list_threads(workload.pid):
        status = procfs.read_status(tid)
        assert status.tracer_pid == 0
        assert status.state[0] in "RS", "never frozen, never stopped"


async def test_no_convergence_throttle_goes_on_throttled(receiver: Receiver, workload: Workload) -> None:
    # Negative limits: no round converges, not even one with 0 dirty pages (a workload throttled to 99%
    # may write nothing in a round), so the throttle path is taken every time.
    limits = ConvergenceLimits(downtime_target_s=-1.0, min_iter_pages=-1, max_rounds=1, throttle_initial_percent=50,
                               throttle_increment_percent=49)
    result = await send(SendConfig(pid=workload.pid, target=receiver.address, on_no_convergence="throttle",
                                      limits=limits))
    assert [r.throttle_percent for r in result.rounds[1:-1]] == [50, 99]
    assert "throttled to 99% already: freezing" in result.stop_reason
    assert_identical(receiver, result, workload.pid)


async def test_resume_after_precopy(receiver: Receiver, workload: Workload) -> None:
    result = await send(SendConfig(pid=workload.pid, target=receiver.address, leave_stopped=False))
    assert not result.left_stopped
    for tid in procfs.list_threads(workload.pid):
        status = procfs.read_status(tid)
        assert status.tracer_pid == 0
        assert status.state[0] in "RS"


async def test_receiver_gone_mid_migration_thaws_source(receiver: Receiver) -> None:
    """The receiver stops while rounds run: the sender fails cleanly and the source runs on."""
    workload = start_workload(size_mib=64, mutate=True)
    try:
        stopped = False

        def progress(_: object) -> None:
            nonlocal stopped
            if not stopped:  # first batch of round 0 sent: pull the receiver out from under it
                stopped = True
                import asyncio
                asyncio.get_running_loop().create_task(receiver.stop(0))

        with pytest.raises(TransportError):
            await send(SendConfig(pid=workload.pid, target=receiver.address, resume_deadline_s=0.5), progress)
        for tid in procfs.list_threads(workload.pid):
            status = procfs.read_status(tid)
            assert status.tracer_pid == 0
            assert status.state[0] in "RS", f"thread {tid} left {status.state}"
        # The receiver kept nothing partial.
        for session in receiver.config.images_dir.iterdir():
            assert not any(p.name.startswith(".round") for p in session.iterdir())
    finally:
        stop_process(workload.proc)


def test_list_trackers_cli() -> None:
    out = subprocess.run([sys.executable, "-m", "cli", "send", "--list-trackers"], capture_output=True,
                         text=True, check=True, timeout=60).stdout
    for name in ("uffd-wp", "soft-dirty-scan", "soft-dirty-pagemap", "hash"):
        assert name in out
    assert "CONFIG_MEM_SOFT_DIRTY" in out or "soft-dirty" in AVAILABLE


class _SilentReceiver:
    """Accepts a session and every message, but never commits anything: the sender's freeze
    watchdog must thaw the source when the final dump is not committed in time."""

    async def migrate(
        self, requests: AsyncIterator[pb.SenderMessage],
        context: grpc.aio.ServicerContext[pb.SenderMessage, pb.ReceiverMessage],
    ) -> AsyncIterator[pb.ReceiverMessage]:
        async for msg in requests:
            if msg.WhichOneof("msg") == "open":
                yield pb.ReceiverMessage(accepted=pb.SessionAccepted(session_id="s", protocol_version=1))


async def test_freeze_watchdog_thaws_source(workload: Workload) -> None:
    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    handler = grpc.stream_stream_rpc_method_handler(
        _SilentReceiver().migrate, request_deserializer=pb.SenderMessage.FromString,
        response_serializer=pb.ReceiverMessage.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        cfg = SendConfig(pid=workload.pid, target=f"127.0.0.1:{port}", freeze_timeout_s=1.0)
        with pytest.raises(TransportError, match="not committed within 1 s; source thawed"):
            await send(cfg)
    finally:
        await server.stop(0)
    for tid in procfs.list_threads(workload.pid):
        status = procfs.read_status(tid)
        assert status.tracer_pid == 0
        assert status.state[0] in "RS", f"thread {tid} left {status.state}"


async def test_adaptive_compression_and_bandwidth_cap(receiver: Receiver, workload: Workload) -> None:
    """The options change how bytes travel, never which bytes arrive."""
    cfg = SendConfig(pid=workload.pid, target=receiver.address, adaptive_compression=True,
                     bandwidth_limit_bps=200e6, batch_pages=64)
    result = await send(cfg)
    assert result.rounds[0].pages_written > 0
    assert_identical(receiver, result, workload.pid)

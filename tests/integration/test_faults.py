"""Real faults during a migration: a full disk on the receiver, the target killed mid-round, the
sender killed while the target is frozen. Each must end in one clear error and a source process
that runs on untraced (or is gone, if it was the one killed), with nothing half-written visible on
the receiver.

The disk is a real tmpfs of 8 MiB mounted for the test; kills are real SIGKILLs, made at points the
test knows the migration has reached (a progress callback, a receiver double's handler), and the
process states are read from /proc with bounded polls.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from pagehaul import procfs
from pagehaul.errors import ProcessGone, TransportError
from pagehaul.v1 import migration_pb2 as pb
from pagehaul.wire import CHANNEL_OPTIONS, METHOD, SERVICE
from receiver.config import ReceiverConfig
from receiver.grpc_server import Receiver
from sender.config import Progress, SendConfig
from sender.precopy import send
from sender.trackers import probe_all
from tests.conftest import Workload, start_workload, stop_process

PAGEHAUL = [sys.executable, "-m", "cli"]
POLL_S = 0.01  # between looks at /proc or a directory; never a synchronisation by itself
SETTLE_TIMEOUT_S = 30.0
AVAILABLE = {a.name for a in probe_all() if a.available}


# --- helpers -----------------------------------------------------------------------------------


async def poll_until(what: str, condition: Callable[[], bool], timeout_s: float = SETTLE_TIMEOUT_S) -> None:
    """Look at ``condition`` until it holds; fail after ``timeout_s``. Yields to the event loop
    between looks, so an in-process receiver keeps running."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout_s:g} s: {what}")
        await asyncio.sleep(POLL_S)


def thread_states(pid: int) -> dict[int, tuple[str, int]]:
    """(state letter, TracerPid) of every thread; empty if the process is gone."""
    out: dict[int, tuple[str, int]] = {}
    try:
        for tid in procfs.list_threads(pid):
            status = procfs.read_status(tid)
            out[tid] = (status.state, status.tracer_pid)
    except (ProcessGone, FileNotFoundError):
        return {}
    return out


def running_untraced(pid: int) -> bool:
    states = thread_states(pid)
    return bool(states) and all(state in "RS" and tracer == 0 for state, tracer in states.values())


def assert_running_untraced(pid: int) -> None:
    states = thread_states(pid)
    assert states, f"process {pid} is gone"
    for tid, (state, tracer) in states.items():
        assert tracer == 0, f"thread {tid} is still traced by {tracer}"
        assert state in "RS", f"thread {tid} left in state {state}"


def partial_state(images_dir: Path) -> list[str]:
    """What a reader could see of an unfinished migration: round directories being written, and
    session directories holding no committed round. Empty when nothing half-written is visible."""
    found: list[str] = []
    for session in sorted(images_dir.iterdir()):
        if session.name.startswith(".round-"):
            found.append(session.name)
            continue
        if not session.is_dir():
            continue
        names = sorted(os.listdir(session))
        found.extend(f"{session.name}/{name}" for name in names if name.startswith(".round-"))
        if not any(name.startswith("round-") for name in names):
            found.append(f"{session.name}/ (no committed round: {names})")
    return found


async def run_cli(*args: str) -> tuple[int, str]:
    """``pagehaul ARGS`` as a subprocess, without blocking the loop an in-process receiver runs on."""
    proc = await asyncio.create_subprocess_exec(*PAGEHAUL, *args, stdout=subprocess.DEVNULL,
                                                stderr=subprocess.PIPE)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 300)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, err.decode()


def error_line(stderr: str) -> str:
    """The CLI's one error line (the --insecure warning may precede it)."""
    lines = [line for line in stderr.strip().splitlines() if line.startswith("pagehaul: error: ")]
    assert len(lines) == 1, f"expected one error line, got: {stderr!r}"
    assert "Traceback" not in stderr
    return lines[0]


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of ``size`` at ``path`` (needs CAP_SYS_ADMIN), unmounted afterwards."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=True,
                   capture_output=True, timeout=60)
    try:
        yield path
    finally:
        done = subprocess.run(["umount", str(path)], check=False, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:  # still busy: detach it anyway, and say so
            subprocess.run(["umount", "--lazy", str(path)], check=False, timeout=60)
            pytest.fail(f"umount {path}: {done.stderr.strip()}")


async def serve_double(handler: Callable[..., AsyncIterator[pb.ReceiverMessage]]) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    method = grpc.stream_stream_rpc_method_handler(handler, request_deserializer=pb.SenderMessage.FromString,
                                                   response_serializer=pb.ReceiverMessage.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {METHOD: method}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def accepted() -> pb.ReceiverMessage:
    return pb.ReceiverMessage(accepted=pb.SessionAccepted(session_id="double", protocol_version=1))


# --- disk full on the receiver -----------------------------------------------------------------


@pytest.fixture
async def full_receiver(tmp_path: Path) -> AsyncIterator[Receiver]:
    """A real receiver whose images directory is an 8 MiB tmpfs: far less than a 32 MiB workload."""
    with tmpfs(tmp_path / "small", "8m") as disk:
        receiver = Receiver(ReceiverConfig(images_dir=disk / "images", listen="127.0.0.1:0"))
        await receiver.start()
        try:
            yield receiver
        finally:
            await receiver.stop(0)


@pytest.fixture
def big_workload() -> Iterator[Workload]:
    w = start_workload(size_mib=32, mutate=True)
    try:
        yield w
    finally:
        stop_process(w.proc)


async def test_disk_full_fails_cleanly(full_receiver: Receiver, big_workload: Workload) -> None:
    """The receiver's disk fills up in round 0: the sender fails with "receiver out of resources"
    and the receiver's reason, the source runs on untraced, and the receiver removed the round and
    the session it could not write."""
    images_dir = full_receiver.config.images_dir
    with pytest.raises(TransportError, match=r"^receiver out of resources: .*No space left on device"):
        await send(SendConfig(pid=big_workload.pid, target=full_receiver.address))
    assert_running_untraced(big_workload.pid)
    await poll_until(f"nothing half-written in {images_dir}: {partial_state(images_dir)}",
                     lambda: not partial_state(images_dir))
    assert list(images_dir.iterdir()) == []


async def test_disk_full_cli_exit_5(full_receiver: Receiver, big_workload: Workload) -> None:
    images_dir = full_receiver.config.images_dir
    code, err = await run_cli("send", "--pid", str(big_workload.pid), "--to", full_receiver.address, "--insecure",
                              "--quiet")
    assert code == 5, err
    line = error_line(err)
    assert "receiver out of resources" in line
    assert "No space left on device" in line
    assert_running_untraced(big_workload.pid)
    await poll_until(f"nothing half-written in {images_dir}: {partial_state(images_dir)}",
                     lambda: not partial_state(images_dir))


# --- the target killed mid-round ---------------------------------------------------------------


async def test_target_killed_mid_round(receiver: Receiver) -> None:
    """SIGKILL the target from the progress callback on the first batch of round 0: the sender
    fails with ProcessGone (exit 3 through the CLI), and the receiver keeps nothing of the round."""
    workload = start_workload(size_mib=64, mutate=True)
    at_kill: list[Progress] = []

    def progress(p: Progress) -> None:
        if not at_kill:
            at_kill.append(p)
            os.kill(workload.pid, signal.SIGKILL)  # left a zombie until the test reaps it

    try:
        with pytest.raises(ProcessGone) as info:
            await send(SendConfig(pid=workload.pid, target=receiver.address), progress)
    finally:
        stop_process(workload.proc)
    assert workload.proc.returncode == -signal.SIGKILL
    assert at_kill, "the migration failed before its first batch"
    assert (at_kill[0].round, at_kill[0].pages_done < at_kill[0].pages_total) == (0, True)  # mid round 0
    assert info.value.exit_code == 3
    assert str(workload.pid) in str(info.value)
    images_dir = receiver.config.images_dir
    await poll_until(f"nothing half-written in {images_dir}: {partial_state(images_dir)}",
                     lambda: not partial_state(images_dir))


class _KillingReceiver:
    """Accepts a session and kills the target when the first page batch arrives; never commits.
    Any sender failure other than the target's death would show up as a different exit code."""

    def __init__(self, victim: Workload) -> None:
        self.victim = victim
        self.killed = False

    async def migrate(self, requests: AsyncIterator[pb.SenderMessage],
                      context: grpc.aio.ServicerContext[pb.SenderMessage, pb.ReceiverMessage],
                      ) -> AsyncIterator[pb.ReceiverMessage]:
        async for msg in requests:
            kind = msg.WhichOneof("msg")
            if kind == "open":
                yield accepted()
            elif kind == "batch" and not self.killed:
                self.killed = True
                os.kill(self.victim.pid, signal.SIGKILL)


async def test_target_killed_mid_round_cli_exit_3() -> None:
    workload = start_workload(size_mib=32, mutate=True)
    double = _KillingReceiver(workload)
    server, address = await serve_double(double.migrate)
    try:
        code, err = await run_cli("send", "--pid", str(workload.pid), "--to", address, "--insecure", "--quiet")
    finally:
        await server.stop(0)
        stop_process(workload.proc)
    assert double.killed
    assert code == 3, err
    assert str(workload.pid) in error_line(err)


# --- the sender killed while the target is frozen ----------------------------------------------


class _NeverCommitsFinal:
    """Commits every live round (so the sender goes on to freeze the target), accepts the final
    round, and never commits it: the sender sits in its final wait with every thread of the target
    stopped, as long as --freeze-timeout allows."""

    def __init__(self) -> None:
        self.final_round_sent = asyncio.Event()

    async def migrate(self, requests: AsyncIterator[pb.SenderMessage],
                      context: grpc.aio.ServicerContext[pb.SenderMessage, pb.ReceiverMessage],
                      ) -> AsyncIterator[pb.ReceiverMessage]:
        try:
            async for msg in requests:
                kind = msg.WhichOneof("msg")
                if kind == "open":
                    yield accepted()
                elif kind == "round_end" and msg.round_end.final:
                    self.final_round_sent.set()
                elif kind == "round_end":
                    end = msg.round_end
                    yield pb.ReceiverMessage(committed=pb.RoundCommitted(
                        round=end.round, directory=f"round-{end.round}", pages_written=end.stats.pages_written))
        except (grpc.RpcError, asyncio.CancelledError):
            return  # the sender was killed


@pytest.mark.parametrize("tracker", [
    "none",
    pytest.param("uffd-wp", marks=pytest.mark.skipif("uffd-wp" not in AVAILABLE, reason="uffd-wp unavailable")),
])
async def test_sender_killed_while_target_frozen(workload: Workload, tmp_path: Path, tracker: str) -> None:
    """SIGKILL the sender while it holds every thread of the target in a ptrace stop: the target
    runs on, untraced.

    Why this holds: the freezer seizes the threads with PTRACE_SEIZE and stops them with
    PTRACE_INTERRUPT, with PTRACE_O_TRACESYSGOOD only (sender/freezer.py SEIZE_OPTIONS) and never
    PTRACE_O_EXITKILL, which would SIGKILL the tracees when the tracer exits. When a tracer dies,
    the kernel's exit_ptrace() calls __ptrace_detach() on every tracee; __ptrace_unlink() clears
    the tracer (TracerPid 0) and wakes a tracee parked in a ptrace stop (state 't') unless a group
    stop is in effect. The final round of a send that leaves the target stopped reads memory in
    one (``stop_group``): then the sender's StopGuard, a detached shell that sees the sender's end
    of a pipe close, sends SIGCONT (sender/freezer.py). With the uffd-wp tracker the
    userfaultfd lives only in the sender (the target's copy was closed after pidfd_getfd), so its
    release on exit removes the write protection too, and the target's writes never block.
    """
    double = _NeverCommitsFinal()
    server, address = await serve_double(double.migrate)
    log = tmp_path / "sender.log"
    with log.open("wb") as stderr:
        sender = await asyncio.create_subprocess_exec(
            *PAGEHAUL, "send", "--pid", str(workload.pid), "--to", address, "--insecure", "--quiet",
            "--tracker", tracker, "--freeze-timeout", "600", stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        final = asyncio.ensure_future(double.final_round_sent.wait())
        exited = asyncio.ensure_future(sender.wait())
        done, _ = await asyncio.wait({final, exited}, timeout=120, return_when=asyncio.FIRST_COMPLETED)
        final.cancel()
        exited.cancel()
        assert final in done, f"the sender never sent its final round: {log.read_text()!r}"
        def frozen_by_sender() -> bool:
            states = thread_states(workload.pid).values()
            tracers = set(procfs.list_threads(sender.pid))  # TracerPid is the tracing thread's id
            return bool(states) and all(state == "t" and tracer in tracers for state, tracer in states)

        await poll_until(f"every thread of {workload.pid} ptrace-stopped by {sender.pid}: "
                         f"{thread_states(workload.pid)}", frozen_by_sender)
        sender.kill()
        assert await sender.wait() == -signal.SIGKILL
        await poll_until(f"{workload.pid} running untraced: {thread_states(workload.pid)}",
                         lambda: running_untraced(workload.pid))
        # And it keeps running: its hot loop still gets CPU (utime advances) and nothing stops it.
        ticks = utime(workload.pid)
        await poll_until(f"{workload.pid} makes progress", lambda: utime(workload.pid) > ticks)
        assert_running_untraced(workload.pid)
    finally:
        if sender.returncode is None:
            sender.kill()
            await sender.wait()
        await server.stop(0)


def utime(pid: int) -> int:
    """User CPU ticks of the process so far (/proc/PID/stat field 14)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[11])

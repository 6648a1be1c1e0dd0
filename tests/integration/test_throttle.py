"""Auto-converge throttles: the signal duty cycle on a real process; cpu.max on a fake cgroup
(this machine's cpu controller is on the cgroup v1 hierarchy, so a cgroup v2 cpu.max cannot
exist here: the fake directory stands in for it, and the test says so)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pagehaul import procfs
from sender.throttle import CgroupCpuThrottle, SignalThrottle, make_throttle, own_cgroup
from tests.helpers.children import CHURN_CHILD, spawn_python


def seen_state(pid: int, want: str, attempts: int = 200_000) -> bool:
    """Poll /proc until the process shows ``want`` (bounded by attempts, not by time)."""
    return any(procfs.read_status(pid).state[0] == want for _ in range(attempts))


def test_signal_throttle_stops_and_resumes_a_real_process() -> None:
    with spawn_python(CHURN_CHILD) as child:
        throttle = SignalThrottle(child.pid, period_s=0.02)
        throttle.set(50)
        try:
            assert seen_state(child.pid, "T"), "never saw the throttled process stopped"
            assert seen_state(child.pid, "R") or seen_state(child.pid, "S")
        finally:
            throttle.stop()
        # Left running: it leaves the stopped state and keeps making progress.
        deadline = time.monotonic() + 10
        while procfs.read_status(child.pid).state[0] == "T":
            assert time.monotonic() < deadline, "process left stopped"
            os.sched_yield()
        assert throttle.percent == 50


def test_signal_throttle_never_continues_a_process_stopped_by_someone_else() -> None:
    with spawn_python(CHURN_CHILD) as child:
        os.kill(child.pid, signal.SIGSTOP)
        assert seen_state(child.pid, "T")
        throttle = SignalThrottle(child.pid)
        throttle.stop()  # never set: must not send SIGCONT
        assert procfs.read_status(child.pid).state[0] == "T"
        os.kill(child.pid, signal.SIGCONT)


def test_signal_throttle_sender_killed_while_stopped_continues_the_process() -> None:
    """The sender dies in the stopped part of a duty cycle: the process is continued, not left
    stopped for good (the throttle's StopGuard outlives the sender)."""
    with spawn_python(CHURN_CHILD) as child:
        # A 30 s period at 99 %: the kill below lands in the stopped part.
        sender = subprocess.Popen([sys.executable, "-c", (
            "import threading; from sender.throttle import SignalThrottle; "
            f"t = SignalThrottle({child.pid}, period_s=30.0); t.set(99); threading.Event().wait()")])
        try:
            assert seen_state(child.pid, "T"), "never saw the throttled process stopped"
        finally:
            sender.kill()
            sender.wait()
        deadline = time.monotonic() + 10
        while procfs.read_status(child.pid).state[0] == "T":
            assert time.monotonic() < deadline, "process left stopped after the sender died"
            os.sched_yield()


def fake_cgroup(tmp_path: Path, pid: int, procs: list[int]) -> tuple[Path, Path]:
    mount = tmp_path / "cgroup2"
    cg = mount / "app.slice" / "job"
    cg.mkdir(parents=True)
    (cg / "cgroup.procs").write_text("".join(f"{p}\n" for p in procs))
    (cg / "cpu.max").write_text("max 100000\n")
    proc = tmp_path / "proc"
    (proc / str(pid)).mkdir(parents=True)
    (proc / str(pid) / "cgroup").write_text("0::/app.slice/job\n")
    (proc / "self").mkdir()
    (proc / "self" / "mountinfo").write_text(
        f"30 23 0:26 / {mount} rw,nosuid shared:4 - cgroup2 cgroup2 rw\n")
    return proc, cg


def test_cgroup_throttle_sets_and_restores_cpu_max(tmp_path: Path) -> None:
    proc, cg = fake_cgroup(tmp_path, 4242, [4242])
    assert own_cgroup(4242, proc) == cg
    throttle = make_throttle(4242, proc)
    assert isinstance(throttle, CgroupCpuThrottle)
    throttle.set(30)
    assert (cg / "cpu.max").read_text() == "70000 100000"
    throttle.set(99)
    assert (cg / "cpu.max").read_text() == "1000 100000"
    throttle.stop()
    assert (cg / "cpu.max").read_text() == "max 100000"


def test_shared_cgroup_falls_back_to_signals(tmp_path: Path) -> None:
    proc, _ = fake_cgroup(tmp_path, 4242, [4242, 4343])
    assert own_cgroup(4242, proc) is None
    assert isinstance(make_throttle(4242, proc), SignalThrottle)


FORKING_CHILD = r"""
import os, sys, time
child = os.fork()
if child == 0:
    while True:
        time.sleep(0.001)
print("READY " + str(child), flush=True)
sys.stdin.readline()
"""


def test_signal_throttle_stops_every_process_of_a_tree() -> None:
    with spawn_python(FORKING_CHILD) as parent:
        kid = int(str(parent.info))
        assert procfs.process_tree(parent.pid) == sorted([parent.pid, kid])
        throttle = SignalThrottle(parent.pid, period_s=0.02, members=lambda: procfs.process_tree(parent.pid))
        throttle.set(90)
        try:
            assert seen_state(parent.pid, "T"), "never saw the parent stopped"
            assert seen_state(kid, "T"), "never saw the child stopped"
        finally:
            throttle.stop()
        for pid in (parent.pid, kid):
            deadline = time.monotonic() + 10
            while procfs.read_status(pid).state[0] == "T":
                assert time.monotonic() < deadline, f"process {pid} left stopped"
                os.sched_yield()
        os.kill(kid, signal.SIGKILL)

"""The sender SIGKILLed inside the uffd tracker's injection window: the target runs on, as it was.

The uffd-wp tracker injects ``userfaultfd()`` and, after taking the fd, ``close()`` into a
thread of the target (sender/inject.py). While a call is injected the thread holds registers,
a signal mask (and with the ``rip`` site a patched text word) that are not its own, and between
the two calls the target holds a userfaultfd it never asked for. A sender killed then must not
leave the target dead, stopped, traced, with a changed signal mask or with that fd.

The sender is a separate process (``DRIVER``: a freeze and ``UffdWpTracker.start``, as the sender
arms a process), killed deterministically at each named step of the window by the test-only
kill points (``pagehaul.killpoints``: it SIGKILLs itself there). The target checks its own memory
all the time and exits on a mismatch; one kind keeps its main thread (the injected one) busy in
user code, the other keeps it blocked in read(), so both register states are restored: one
interrupted in user mode and one inside a system call that must be restarted. What puts the
target back is the injection guard (sender/inject_guard.py); the later tests cover a target
that was stopped to begin with, a text word patched at rip, ``pagehaul send`` as a whole, and
the guard's own protocol.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from pagehaul.errors import PagehaulError
from pagehaul.killpoints import ENV as KILL_AT
from receiver.grpc_server import Receiver
from sender import arch_x86_64 as arch
from sender.freezer import PtraceFreezer
from sender.inject import Injector
from sender.inject_guard import InjectGuard, guarded_stop
from sender.trackers import probe_all
from tests.helpers.children import Child, blocked_reading_stdin, child_env, read_mem, stop_child, wait_until

pytestmark = pytest.mark.skipif("uffd-wp" not in {a.name for a in probe_all() if a.available},
                                reason="uffd-wp unavailable")

SETTLE_S = 30.0
PAGEHAUL = [sys.executable, "-m", "cli"]

# argv: MODE. "busy": the main thread writes a round number into every page of a 64-page mapping
# and reads it back, forever, while a second thread echoes stdin; "blocked": the roles swap, so
# the main thread sleeps in read(0). rounds[0] counts verified rounds; a mismatch prints
# MISMATCH and exits 3.
TARGET = r'''
import ctypes, json, mmap, os, sys, threading
P = mmap.PAGESIZE
PAGES = 64
mem = mmap.mmap(-1, PAGES * P)
rounds = (ctypes.c_uint64 * 1)()
lock = threading.Lock()

def say(line):
    with lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

def verify_forever():
    n = 0
    while True:
        n += 1
        word = n.to_bytes(8, "little")
        for off in range(0, PAGES * P, P):
            mem[off:off + 8] = word
        for off in range(0, PAGES * P, P):
            if mem[off:off + 8] != word:
                say("MISMATCH %d %d" % (n, off))
                os._exit(3)
        rounds[0] = n

def echo_forever():
    for line in sys.stdin:
        say("ECHO " + line.strip())
    os._exit(0)

busy = sys.argv[1] == "busy"
threading.Thread(target=echo_forever if busy else verify_forever, daemon=True).start()
say("READY " + json.dumps({"rounds": ctypes.addressof(rounds)}))
(verify_forever if busy else echo_forever)()
'''

# argv: PID. Arms the uffd-wp tracker on PID the way the sender does (sender/target.py Target._arm)
# and prints ARMED; a kill point (PAGEHAUL_TEST_KILL_AT) ends it before that.
DRIVER = r'''
import sys
from sender.freezer import PtraceFreezer
from pagehaul.procfs import read_maps, select_dumpable
from sender.trackers.uffd import UffdWpTracker
pid = int(sys.argv[1])
tracker = UffdWpTracker(pid)
with PtraceFreezer(pid) as freezer:
    tracker.start(select_dumpable(read_maps(pid)), freezer)
tracker.close()
print("ARMED", flush=True)
'''

# Every step of the window, in order; ":2" is the second injected call (close()).
_CALL_STEPS = ("inject.start", "inject.masked", "inject.regs-set", "inject.resumed", "inject.entry-stop",
               "inject.in-call", "inject.exit-stop", "inject.interrupted", "inject.parked",
               "inject.regs-restored", "inject.restored")
KILL_POINTS = (
    "stop.told", "stop.stopped",
    *(f"{step}:1" for step in _CALL_STEPS),
    "uffd.created", "uffd.taken",
    *(f"{step}:2" for step in _CALL_STEPS),
    "uffd.closed", "stop.ended",
)


@contextmanager
def target(mode: str) -> Iterator[Child]:
    proc = subprocess.Popen([sys.executable, "-c", TARGET, mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=child_env())
    try:
        child = Child(proc)
        line = child.readline()
        assert line.startswith("READY "), line
        child.info = json.loads(line[len("READY "):])
        if mode == "blocked":
            wait_until(lambda: blocked_reading_stdin(proc.pid), "the target's main thread to block in read()")
        yield child
    finally:
        stop_child(proc)


def thread_status(pid: int) -> dict[int, dict[str, str]]:
    """State, TracerPid and SigBlk of every thread; empty once the process is gone (or a zombie)."""
    out: dict[int, dict[str, str]] = {}
    try:
        for name in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{name}/status") as f:
                fields = dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)
            out[int(name)] = {key: fields[key].strip() for key in ("State", "TracerPid", "SigBlk")}
    except (FileNotFoundError, ProcessLookupError):
        return {}
    if any(s["State"].startswith(("Z", "X")) for s in out.values()):
        return {}
    return out


def running_untraced(pid: int) -> bool:
    states = thread_status(pid)
    return bool(states) and all(s["State"][0] in "RS" and s["TracerPid"] == "0" for s in states.values())


def uffd_fds(pid: int) -> list[int]:
    found = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") == "anon_inode:[userfaultfd]":
                found.append(int(name))
        except FileNotFoundError:
            continue
    return found


def rounds(child: Child) -> int:
    """Rounds the target has verified so far; fails, saying what happened, once it is gone."""
    try:
        return int.from_bytes(read_mem(child.pid, child.info["rounds"], 8), "little")
    except (ProcessLookupError, FileNotFoundError, OSError):
        child.proc.wait(timeout=SETTLE_S)
        raise AssertionError(describe(child)) from None


def echo(child: Child, word: str) -> None:
    assert child.proc.stdin is not None
    child.proc.stdin.write(f"{word}\n".encode())
    child.proc.stdin.flush()
    assert child.readline(timeout_s=SETTLE_S) == f"ECHO {word}"


def describe(child: Child) -> str:
    """What became of the target, for a failure message."""
    code = child.proc.poll()
    if code is not None:
        err = child.proc.stderr.read().decode(errors="replace") if child.proc.stderr else ""
        return f"target exited with {code} ({signal.Signals(-code).name if code < 0 else 'status'}); {err[-500:]}"
    return f"target threads: {thread_status(child.pid)}"


def run_driver(pid: int, kill_at: str, driver: str = DRIVER) -> tuple[int, str]:
    """Run ``driver`` on ``pid`` with the kill point armed. Returns once the driver *and* its guard
    have exited: the guard inherits the driver's stderr, and run() reads it to the end."""
    env = child_env()
    env[KILL_AT] = kill_at
    done = subprocess.run([sys.executable, "-c", driver, str(pid)], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    return done.returncode, done.stdout + done.stderr


def await_running_untraced(child: Child) -> None:
    deadline = time.monotonic() + SETTLE_S
    while not running_untraced(child.pid):
        assert child.proc.poll() is None, describe(child)
        assert time.monotonic() < deadline, describe(child)
        time.sleep(0.002)


def assert_runs_on_as_it_was(child: Child, masks: dict[int, str]) -> None:
    """Running, untraced, checking its memory and answering, with its signal masks and no userfaultfd."""
    await_running_untraced(child)
    before = rounds(child)
    wait_until(lambda: rounds(child) > before, "the target to verify its memory again")
    echo(child, "after")  # the thread that was (or served) the blocked read() works on
    assert running_untraced(child.pid), describe(child)
    assert {tid: s["SigBlk"] for tid, s in thread_status(child.pid).items()} == masks
    assert uffd_fds(child.pid) == []


def signal_masks(pid: int) -> dict[int, str]:
    return {tid: s["SigBlk"] for tid, s in thread_status(pid).items()}


@pytest.mark.parametrize("mode", ["busy", "blocked"])
@pytest.mark.parametrize("kill_at", KILL_POINTS)
def test_sender_killed_inside_the_injection_window(mode: str, kill_at: str) -> None:
    with target(mode) as child:
        masks = signal_masks(child.pid)
        code, output = run_driver(child.pid, kill_at)
        assert code == -signal.SIGKILL, f"the kill point {kill_at} was not reached: {code} {output!r}"
        assert_runs_on_as_it_was(child, masks)


def test_sender_finishing_leaves_the_target_as_it_was() -> None:
    with target("busy") as child:
        masks = signal_masks(child.pid)
        code, output = run_driver(child.pid, "")
        assert (code, output) == (0, "ARMED\n")  # and the guard said nothing
        assert_runs_on_as_it_was(child, masks)


@pytest.mark.parametrize("kill_at", ["inject.regs-set:1", "inject.in-call:1", "uffd.taken", "inject.parked:2"])
def test_a_target_found_stopped_is_restored_and_left_stopped(kill_at: str) -> None:
    with target("blocked") as child:
        masks = signal_masks(child.pid)
        os.kill(child.pid, signal.SIGSTOP)
        wait_until(lambda: {s["State"][0] for s in thread_status(child.pid).values()} == {"T"}, "the stop")
        code, output = run_driver(child.pid, kill_at)
        assert code == -signal.SIGKILL, output
        states = thread_status(child.pid)
        assert {(s["State"][0], s["TracerPid"]) for s in states.values()} == {("T", "0")}, describe(child)
        assert uffd_fds(child.pid) == []
        os.kill(child.pid, signal.SIGCONT)
        assert_runs_on_as_it_was(child, masks)


# The compel way: a syscall instruction written over the text at the thread's rip, and the
# original word written back (sender/inject.py, site="rip").
RIP_DRIVER = r"""
import sys
from sender import arch_x86_64 as arch
from sender.freezer import PtraceFreezer
from sender.inject import Injector
from sender.inject_guard import InjectGuard, guarded_stop
pid = int(sys.argv[1])
guard = InjectGuard.shared()
with PtraceFreezer(pid) as freezer, guarded_stop(freezer, guard):
    assert Injector.for_freezer(freezer, site="rip", guard=guard).syscall(arch.NR_getpid) == pid
print("ARMED", flush=True)
"""


@pytest.mark.parametrize("mode", ["busy", "blocked"])
@pytest.mark.parametrize("kill_at", ["inject.poked:1", "inject.regs-set:1", "inject.in-call:1", "inject.parked:1",
                                     "inject.unpoked:1"])
def test_text_patched_at_rip_is_put_back(mode: str, kill_at: str) -> None:
    with target(mode) as child:
        masks = signal_masks(child.pid)
        code, output = run_driver(child.pid, kill_at, RIP_DRIVER)
        assert code == -signal.SIGKILL, f"the kill point {kill_at} was not reached: {code} {output!r}"
        assert_runs_on_as_it_was(child, masks)  # a syscall left in its text would run and fail


async def test_pagehaul_send_killed_while_arming_uffd(receiver: Receiver) -> None:
    """The whole sender (``pagehaul send``) killed inside its first injected call."""
    with target("blocked") as child:
        masks = signal_masks(child.pid)
        env = child_env()
        env[KILL_AT] = "inject.in-call:1"
        sender = await asyncio.create_subprocess_exec(
            *PAGEHAUL, "send", "--pid", str(child.pid), "--to", receiver.address, "--insecure", "--quiet",
            "--tracker", "uffd-wp", env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, err = await asyncio.wait_for(sender.communicate(), 120)  # to the guard's end too
        assert sender.returncode == -signal.SIGKILL, err.decode()
        assert f"process {child.pid} held injected state; restored" in err.decode()
        assert_runs_on_as_it_was(child, masks)


# --- the guard itself ---------------------------------------------------------------------------


def test_a_guard_told_done_touches_nothing() -> None:
    with target("blocked") as child:
        guard = InjectGuard()
        guard.stopping(child.pid)
        guard.arm(child.pid, child.pid, arch.Regs(), 0)
        guard.close()
        assert not guard.alive
        assert running_untraced(child.pid)
        echo(child, "untouched")


def test_a_guard_that_has_gone_is_reported_and_replaced() -> None:
    guard = InjectGuard()
    guard.disown(1)  # started
    os.kill(guard.pid, signal.SIGKILL)
    wait_until(lambda: not guard.alive, "the guard to die")
    with pytest.raises(PagehaulError, match=r"injection guard .* is gone"):
        guard.arm(1, 1, arch.Regs(), 0)
    shared = InjectGuard.shared()
    assert shared.alive
    assert InjectGuard.shared() is shared


def test_injection_under_a_stop_a_stop_guard_would_end_is_refused() -> None:
    with target("blocked") as child, PtraceFreezer(child.pid) as freezer:
        freezer.stop_group()  # as the tree freezers do, with a StopGuard continuing it on our death
        with pytest.raises(RuntimeError, match="StopGuard"), guarded_stop(freezer, InjectGuard.shared()):
            pass


def test_a_guarded_injection_needs_a_group_stop() -> None:
    with target("blocked") as child, PtraceFreezer(child.pid) as freezer:
        injector = Injector.for_freezer(freezer, guard=InjectGuard.shared())
        with pytest.raises(RuntimeError, match="group-stop"):
            injector.syscall(arch.NR_getpid)

"""PtraceFreezer on real children: busy multi-threaded ones, traced ones, vanished ones."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from pagehaul import procfs
from pagehaul.errors import AlreadyTraced, ProcessGone
from sender.freezer import PtraceFreezer
from tests.helpers.children import (
    CHURN_CHILD,
    SEIZER_CHILD,
    THREADS_CHILD,
    Child,
    frozen_in_signal_delivery_stop,
    read_mem,
    spawn_python,
    stop_child,
    thread_states,
    wait_until,
)

N_THREADS = 3


@pytest.fixture
def busy() -> Iterator[Child]:
    with spawn_python(THREADS_CHILD, str(N_THREADS)) as child:
        yield child


def counters(child: Child) -> list[int]:
    return [int(n) for n in np.frombuffer(read_mem(child.pid, child.info["counters"], 8 * N_THREADS), "<u8")]


def all_advance(child: Child, before: list[int]) -> bool:
    now = counters(child)
    return all(n > b for n, b in zip(now, before, strict=True))


def grows(read: Callable[[], int], by: int = 8) -> Callable[[], bool]:
    """A predicate: has ``read()`` grown by more than ``by`` since now?"""
    base = read()
    return lambda: read() > base + by


def utime_stime(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5), counted after the comm


def test_freeze_stops_every_thread_and_thaw_resumes_them(busy: Child) -> None:
    tids = set(procfs.list_threads(busy.pid))
    assert set(busy.info["tids"]) < tids
    before = counters(busy)
    wait_until(lambda: all_advance(busy, before), "the busy threads to count")

    with PtraceFreezer(busy.pid) as freezer:
        assert freezer.frozen
        assert set(freezer.threads) == tids
        assert set(thread_states(busy.pid).values()) == {"t"}  # tracing stop, every thread
        assert procfs.read_status(busy.pid).tracer_pid == os.getpid()
        frozen_counts, frozen_cpu = counters(busy), utime_stime(busy.pid)
        assert set(thread_states(busy.pid).values()) == {"t"}
        assert counters(busy) == frozen_counts
        assert utime_stime(busy.pid) == frozen_cpu
        assert freezer.freezing_time_us > 0
        assert freezer.pending_signals == {}

    assert not freezer.frozen
    assert freezer.frozen_time_us > 0
    assert procfs.read_status(busy.pid).tracer_pid == 0
    wait_until(lambda: all_advance(busy, frozen_counts), "the threads to run again after thaw")
    assert "t" not in thread_states(busy.pid).values()


def test_threads_born_during_the_freeze_are_caught() -> None:
    # Threads appear and exit while the freezer seizes: every round must end with the whole
    # (stable) thread set stopped, none left running.
    with spawn_python(CHURN_CHILD) as child:
        address = child.info["counters"]
        def started() -> int:
            return int.from_bytes(read_mem(child.pid, address, 8), "little")

        for _ in range(20):
            wait_until(grows(started), "new threads to be started")
            with PtraceFreezer(child.pid) as freezer:
                states = thread_states(child.pid)
                assert set(states.values()) == {"t"}, states
                assert freezer.threads == sorted(states)


def test_thaw_is_idempotent_and_freeze_can_repeat(busy: Child) -> None:
    freezer = PtraceFreezer(busy.pid)
    freezer.thaw()  # never frozen: nothing to do
    for _ in range(2):
        freezer.freeze()
        assert set(thread_states(busy.pid).values()) == {"t"}
        with pytest.raises(RuntimeError, match="already frozen"):
            freezer.freeze()
        freezer.thaw()
        freezer.thaw()
        assert "t" not in thread_states(busy.pid).values()
    frozen_time_us = freezer.frozen_time_us
    assert frozen_time_us == freezer.frozen_time_us  # stops counting once thawed


def test_leave_stopped_puts_the_process_in_group_stop(busy: Child) -> None:
    with PtraceFreezer(busy.pid) as freezer:
        held = counters(busy)
        freezer.thaw(leave_stopped=True)
        # Group-stop reached without running user code: counters did not move.
        wait_until(lambda: set(thread_states(busy.pid).values()) == {"T"}, "every thread in group-stop")
        assert counters(busy) == held
        assert procfs.read_status(busy.pid).tracer_pid == 0
    assert set(thread_states(busy.pid).values()) == {"T"}  # __exit__ after thaw is a no-op
    os.kill(busy.pid, signal.SIGCONT)
    wait_until(lambda: all_advance(busy, held), "the threads to run after SIGCONT")


def test_a_stopped_process_stays_stopped(busy: Child) -> None:
    os.kill(busy.pid, signal.SIGSTOP)
    wait_until(lambda: set(thread_states(busy.pid).values()) == {"T"}, "the group-stop")
    with PtraceFreezer(busy.pid) as freezer:
        assert set(thread_states(busy.pid).values()) == {"t"}
        assert freezer.pending_signals == {}
    wait_until(lambda: set(thread_states(busy.pid).values()) == {"T"}, "the group-stop to resume")
    held = counters(busy)
    os.kill(busy.pid, signal.SIGCONT)
    wait_until(lambda: all_advance(busy, held), "the threads to run after SIGCONT")


def test_signal_dequeued_during_freeze_is_delivered_after_thaw() -> None:
    with spawn_python(THREADS_CHILD, "0") as child:
        with frozen_in_signal_delivery_stop(child, signal.SIGUSR1) as freezer:
            assert freezer.pending_signals == {child.pid: signal.SIGUSR1}
        assert child.readline(timeout_s=30) == "USR1"  # the handler ran: the signal was not lost


def test_already_traced_process(busy: Child) -> None:
    victim = busy.info["tids"][-1]  # not the leader: the leader is seized first and released again
    with spawn_python(SEIZER_CHILD, str(victim)) as seizer:
        assert procfs.read_status(victim).tracer_pid == seizer.pid
        freezer = PtraceFreezer(busy.pid)
        with pytest.raises(AlreadyTraced) as info:
            freezer.freeze()
        assert info.value.pid == busy.pid
        assert info.value.tracer_pid == seizer.pid
        assert not freezer.frozen
        assert freezer.threads == []
        for tid in procfs.list_threads(busy.pid):
            assert procfs.read_status(tid).tracer_pid in (0, seizer.pid)
        freezer.thaw()
    before = counters(busy)
    wait_until(lambda: all_advance(busy, before), "the threads to keep running")


def test_nonexistent_process() -> None:
    with spawn_python(THREADS_CHILD, "0") as child:
        pid = child.pid
        stop_child(child.proc)
    with pytest.raises(ProcessGone) as info:
        PtraceFreezer(pid).freeze()
    assert info.value.pid == pid


def test_process_killed_while_frozen_thaws_cleanly(busy: Child) -> None:
    freezer = PtraceFreezer(busy.pid)
    freezer.freeze()
    os.kill(busy.pid, signal.SIGKILL)
    freezer.thaw()  # detach fails with ESRCH for every thread; no exception
    assert not freezer.frozen
    busy.proc.wait(timeout=30)
    assert busy.proc.returncode == -signal.SIGKILL


def test_use_from_another_thread_is_refused(busy: Child) -> None:
    freezer = PtraceFreezer(busy.pid)
    errors: list[BaseException] = []

    def other() -> None:
        try:
            freezer.freeze()
        except RuntimeError as err:
            errors.append(err)

    worker = threading.Thread(target=other)
    worker.start()
    worker.join()
    assert len(errors) == 1
    assert "OS thread" in str(errors[0])
    assert procfs.read_status(busy.pid).tracer_pid == 0


TICKING_CHILD = """
import signal, sys
ticks = 0
def tick(sig, frame):
    global ticks
    ticks += 1
signal.signal(signal.SIGALRM, tick)
signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
print("ready", flush=True)
while True:
    sum(range(1000))
"""


def _writable_memory(pid: int) -> dict[int, bytes]:
    """Every readable, writable private mapping of ``pid``, by start address."""
    out: dict[int, bytes] = {}
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if fields[1].startswith("rw") and fields[1][3] == "p" and not line.rstrip().endswith("[vvar]"):
                mem.seek(start)
                out[start] = mem.read(end - start)
    return out


def _pending(pid: int, sig: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        status = f.read()
    masks = [int(line.split()[1], 16) for line in status.splitlines() if line.startswith(("SigPnd:", "ShdPnd:"))]
    return any(m & (1 << (sig - 1)) for m in masks)


def test_stop_group_delivers_pending_signals_before_the_memory_is_read() -> None:
    """A 1 ms SIGALRM keeps arriving while the process is frozen. After ``stop_group()`` the
    memory read while frozen is what the stopped process keeps after the detach, although a
    SIGALRM is pending then: the group-stop is entered before any signal is dequeued. Without
    it the pending SIGALRM is delivered first on the way out, and its handler frame lands on
    the stack after the read."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", TICKING_CHILD], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        for _ in range(5):
            with PtraceFreezer(proc.pid) as freezer:
                freezer.stop_group()
                assert freezer.group_stopped
                held = _writable_memory(proc.pid)
                wait_until(lambda: _pending(proc.pid, signal.SIGALRM), "a SIGALRM pending while frozen")
                freezer.thaw(leave_stopped=True)
            assert set(thread_states(proc.pid).values()) == {"T"}
            assert _pending(proc.pid, signal.SIGALRM), "the signal waits for SIGCONT"
            now = _writable_memory(proc.pid)
            changed = [hex(a) for a in held if held[a] != now.get(a)]
            assert not changed, f"memory changed after the read: {changed}"
            os.kill(proc.pid, signal.SIGCONT)
            wait_until(lambda: "T" not in thread_states(proc.pid).values(), "the process to run again")
    finally:
        stop_child(proc)


def test_thaw_after_stop_group_continues_the_process(busy: Child) -> None:
    with PtraceFreezer(busy.pid) as freezer:
        freezer.stop_group()
        held = counters(busy)
    assert procfs.read_status(busy.pid).tracer_pid == 0
    wait_until(lambda: all_advance(busy, held), "the threads to run again (our SIGSTOP undone)")

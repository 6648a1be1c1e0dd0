"""The syscall injector on real children: results, exact restoration, interrupted calls, signals."""

from __future__ import annotations

import ctypes
import os
import signal
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from pagehaul import kernel
from pagehaul.errors import ProcessError, ProcessGone
from sender import arch_x86_64 as arch
from sender.freezer import PtraceFreezer
from sender.inject import Injector, SyscallSite
from tests.helpers.children import (
    BLOCKING_CHILD,
    THREADS_CHILD,
    Child,
    frozen_in_signal_delivery_stop,
    in_syscall,
    read_mem,
    spawn_python,
    stop_child,
    thread_states,
    wait_until,
)

SITES: tuple[SyscallSite, ...] = ("vdso", "rip")
_SIGNAL_FIELDS = (b"SigPnd", b"ShdPnd", b"SigBlk", b"SigIgn", b"SigCgt")
_NR_TGKILL = 234  # arch/x86/entry/syscalls/syscall_64.tbl
_libc = ctypes.CDLL(None, use_errno=True)


@pytest.fixture
def blocking() -> Iterator[Child]:
    with spawn_python(BLOCKING_CHILD) as child:
        yield child


def request(child: Child, line: str) -> int:
    """Send a BLOCKING_CHILD command, return the number in its "OK N" reply."""
    assert child.proc.stdin is not None
    child.proc.stdin.write(line.encode() + b"\n")
    child.proc.stdin.flush()
    reply = child.readline()
    assert reply.startswith("OK "), reply
    return int(reply.split()[1])


def signal_state(pid: int) -> dict[int, dict[bytes, bytes]]:
    """The signal lines of /proc/PID/task/TID/status, for every thread."""
    state = {}
    for name in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{name}/status", "rb") as f:
            lines = dict(line.split(b":", 1) for line in f.read().splitlines() if b":" in line)
        state[int(name)] = {key: lines[key].strip() for key in _SIGNAL_FIELDS}
    return state


def tgkill(pid: int, tid: int, sig: int) -> None:
    if _libc.syscall(_NR_TGKILL, pid, tid, sig) != 0:
        raise OSError(ctypes.get_errno(), "tgkill")


def sig_bit(sig: int) -> int:
    return 1 << (sig - 1)


def user_fds(pid: int) -> set[int]:
    return {int(name) for name in os.listdir(f"/proc/{pid}/fd")}


# --- results and exact restoration ------------------------------------------------------------


@pytest.mark.parametrize("site", SITES)
def test_getpid_runs_in_the_target_and_leaves_no_trace(blocking: Child, site: SyscallSite) -> None:
    pid = blocking.pid
    os.kill(pid, signal.SIGUSR2)  # blocked in every thread: stays in the shared queue
    tgkill(pid, pid, signal.SIGRTMIN)  # blocked: stays in the leader's own queue
    wait_until(lambda: signal_state(pid)[pid][b"SigPnd"] != b"0000000000000000", "SIGRTMIN to be pending")
    with PtraceFreezer(pid) as freezer:
        os.kill(pid, signal.SIGUSR1)  # arrives while frozen: pending, must survive the injection
        regs_before = bytes(arch.get_regs(pid))
        mask_before = kernel.ptrace_getsigmask(pid)
        signals_before = signal_state(pid)
        code_before = kernel.ptrace_peekdata(pid, arch.instruction_pointer(arch.get_regs(pid)))

        injector = Injector.for_freezer(freezer, site=site)
        assert injector.syscall(arch.NR_getpid) == pid
        assert injector.syscall(arch.NR_gettid) == pid
        assert injector.syscall(arch.NR_getppid) == os.getpid()
        assert injector.calls == 3

        assert bytes(arch.get_regs(pid)) == regs_before
        assert kernel.ptrace_getsigmask(pid) == mask_before
        assert signal_state(pid) == signals_before
        assert kernel.ptrace_peekdata(pid, arch.instruction_pointer(arch.get_regs(pid))) == code_before
        shared = int(signals_before[pid][b"ShdPnd"], 16)
        assert shared & sig_bit(signal.SIGUSR2)
        assert shared & sig_bit(signal.SIGUSR1)
        assert int(signals_before[pid][b"SigPnd"], 16) & sig_bit(signal.SIGRTMIN)
        assert set(thread_states(pid).values()) == {"t"}
    assert blocking.readline() == "USR1"  # the signal that arrived while frozen was delivered once
    assert request(blocking, "fd") > 2  # and the child still serves commands


def test_the_vdso_site_is_inside_the_vdso_and_needs_no_write(blocking: Child) -> None:
    with open(f"/proc/{blocking.pid}/maps") as f:
        vdso = next(line.split()[0] for line in f if line.rstrip().endswith("[vdso]"))
    start, end = (int(x, 16) for x in vdso.split("-"))
    with PtraceFreezer(blocking.pid) as freezer:
        injector = Injector.for_freezer(freezer, site="vdso")
        assert start <= injector.site < end
        assert read_mem(blocking.pid, injector.site, 2) == arch.SYSCALL_INSN
        rip = arch.instruction_pointer(arch.get_regs(blocking.pid))
        assert Injector.for_freezer(freezer, site="rip").site == rip


def text_page_is_file_backed(pid: int, addr: int) -> bool:
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    try:
        word = int.from_bytes(os.pread(fd, 8, (addr // 4096) * 8), "little")
    finally:
        os.close(fd)
    assert word & kernel.PM_PRESENT
    return bool(word & kernel.PM_FILE)


@pytest.mark.parametrize(("site", "copied"), [("vdso", False), ("rip", True)])
def test_poking_text_leaves_a_private_copy_the_vdso_site_does_not(site: SyscallSite, copied: bool) -> None:
    # Why the vDSO: a ptrace write into libc's text copies that page on write, and the copy
    # stays (anonymous, dumped from then on) even though the bytes are restored.
    with spawn_python(BLOCKING_CHILD) as child, PtraceFreezer(child.pid) as freezer:
        rip = arch.instruction_pointer(arch.get_regs(child.pid))
        assert text_page_is_file_backed(child.pid, rip)
        assert Injector.for_freezer(freezer, site=site).syscall(arch.NR_getpid) == child.pid
        assert text_page_is_file_backed(child.pid, rip) is not copied


def test_injected_close_really_closes_the_fd(blocking: Child) -> None:
    fd = request(blocking, "fd")
    assert os.readlink(f"/proc/{blocking.pid}/fd/{fd}") == "/dev/null"
    with PtraceFreezer(blocking.pid) as freezer:
        assert Injector.for_freezer(freezer).syscall(arch.NR_close, fd) == 0
        assert fd not in user_fds(blocking.pid)


def test_failing_call_raises_oserror_naming_the_target(blocking: Child) -> None:
    with PtraceFreezer(blocking.pid) as freezer:
        injector = Injector.for_freezer(freezer)
        regs = bytes(arch.get_regs(blocking.pid))
        with pytest.raises(OSError, match=f"process {blocking.pid} \\(thread {blocking.pid}\\)") as info:
            injector.syscall(arch.NR_close, 123456)
        assert info.value.errno == 9  # EBADF
        assert bytes(arch.get_regs(blocking.pid)) == regs
    assert request(blocking, "fd") > 2


# --- interrupted blocking calls ---------------------------------------------------------------


@pytest.mark.parametrize("site", SITES)
def test_thread_blocked_in_read_still_gets_its_data(blocking: Child, site: SyscallSite) -> None:
    tid = request(blocking, "read")
    wait_until(lambda: in_syscall(blocking.pid, tid, (0,)), "the reader to block in read()")
    with PtraceFreezer(blocking.pid) as freezer:
        saved = arch.get_regs(tid)
        assert arch.syscall_in_progress(saved) == 0  # stopped inside read(), to be restarted
        assert arch.syscall_result(saved) == -512  # -ERESTARTSYS
        injector = Injector.for_freezer(freezer, tid=tid, site=site)
        assert injector.syscall(arch.NR_gettid) == tid
        assert injector.syscall(arch.NR_getpid) == blocking.pid
        assert bytes(arch.get_regs(tid)) == bytes(saved)
    wait_until(lambda: in_syscall(blocking.pid, tid, (0,)), "the reader to block in read() again")
    assert blocking.proc.stdin is not None
    blocking.proc.stdin.write(b"feed hello\n")
    blocking.proc.stdin.flush()
    # The reader's line and the reply to "feed" come from two threads, in either order.
    lines = sorted(blocking.readline() for _ in range(2))
    assert lines == ["OK 0", "READ 5 0 hello"]  # not -1/EINTR, not 512


@pytest.mark.parametrize("kind", ["raw", "py"])
def test_sleeping_thread_keeps_sleeping_and_wakes_normally(blocking: Child, kind: str) -> None:
    seconds = 0.6
    tid = request(blocking, f"sleep {seconds} {kind}")
    # raw nanosleep() is clock_nanosleep(CLOCK_REALTIME, 0) = -ERESTART_RESTARTBLOCK when
    # interrupted; time.sleep() is an absolute CLOCK_MONOTONIC clock_nanosleep = -ERESTARTNOHAND.
    wait_until(lambda: in_syscall(blocking.pid, tid, (arch.NR_clock_nanosleep, arch.NR_nanosleep)),
               "the thread to sleep")
    with PtraceFreezer(blocking.pid) as freezer:
        saved = arch.get_regs(tid)
        assert arch.syscall_result(saved) in (-516, -514)
        assert Injector.for_freezer(freezer, tid=tid).syscall(arch.NR_gettid) == tid
        assert bytes(arch.get_regs(tid)) == bytes(saved)
    words = blocking.readline(timeout_s=30).split()
    assert words[:3] == ["SLEPT", "0", "0"]  # no EINTR, no leaked -ERESTART*
    assert float(words[3]) >= seconds - 0.005  # and not cut short


# --- threads and signals ----------------------------------------------------------------------


def test_every_thread_of_a_busy_multithreaded_target() -> None:
    with spawn_python(THREADS_CHILD, "3") as child:
        counters = child.info["counters"]
        with PtraceFreezer(child.pid) as freezer:
            assert len(freezer.threads) >= 4
            regs = {tid: bytes(arch.get_regs(tid)) for tid in freezer.threads}
            for tid in freezer.threads:
                injector = Injector.for_freezer(freezer, tid=tid)
                assert injector.syscall(arch.NR_gettid) == tid
                assert injector.syscall(arch.NR_getpid) == child.pid
            assert {tid: bytes(arch.get_regs(tid)) for tid in freezer.threads} == regs
            frozen = np.frombuffer(read_mem(child.pid, counters, 24), "<u8").copy()
        wait_until(lambda: bool(np.all(np.frombuffer(read_mem(child.pid, counters, 24), "<u8") > frozen)),
                   "every busy thread to count again")


def test_signal_held_by_the_freezer_is_requeued_and_delivered() -> None:
    with spawn_python(THREADS_CHILD, "0") as child:
        with frozen_in_signal_delivery_stop(child, signal.SIGUSR1) as freezer:
            assert freezer.pending_signals == {child.pid: signal.SIGUSR1}
            regs = bytes(arch.get_regs(child.pid))
            assert Injector.for_freezer(freezer).syscall(arch.NR_getpid) == child.pid
            assert freezer.pending_signals == {}  # taken over: re-queued in the kernel instead
            # Re-queued where it came from: kill() sent it to the process, so the shared queue.
            pending = int(signal_state(child.pid)[child.pid][b"ShdPnd"], 16)
            assert pending & sig_bit(signal.SIGUSR1)
            assert bytes(arch.get_regs(child.pid)) == regs
        assert child.readline(timeout_s=30) == "USR1"  # delivered exactly once, after the thaw
        assert child.proc.poll() is None


def test_sigstop_pending_during_injection_still_stops_the_process(blocking: Child) -> None:
    with PtraceFreezer(blocking.pid) as freezer:
        os.kill(blocking.pid, signal.SIGSTOP)  # cannot be blocked: dequeued by the injected run
        assert Injector.for_freezer(freezer).syscall(arch.NR_getpid) == blocking.pid
    wait_until(lambda: set(thread_states(blocking.pid).values()) == {"T"}, "the group stop")
    os.kill(blocking.pid, signal.SIGCONT)
    assert request(blocking, "fd") > 2


def test_stopped_process_stays_stopped(blocking: Child) -> None:
    os.kill(blocking.pid, signal.SIGSTOP)
    wait_until(lambda: set(thread_states(blocking.pid).values()) == {"T"}, "the group stop")
    with PtraceFreezer(blocking.pid) as freezer:
        regs = bytes(arch.get_regs(blocking.pid))
        assert Injector.for_freezer(freezer).syscall(arch.NR_getpid) == blocking.pid
        assert bytes(arch.get_regs(blocking.pid)) == regs
    wait_until(lambda: set(thread_states(blocking.pid).values()) == {"T"}, "the group stop after thaw")
    os.kill(blocking.pid, signal.SIGCONT)
    assert request(blocking, "fd") > 2


@pytest.mark.skipif(os.geteuid() != 0, reason="PTRACE_O_SUSPEND_SECCOMP needs CAP_SYS_ADMIN")
def test_seccomp_filter_is_suspended_for_the_injected_call_only() -> None:
    # The child's filter makes getppid() fail with EPERM; the injected getppid() must not.
    with spawn_python(SECCOMP_CHILD) as child:
        assert child.info["own_getppid"] == -1
        with PtraceFreezer(child.pid) as freezer:
            injector = Injector.for_freezer(freezer)
            assert injector.syscall(arch.NR_getppid) == os.getpid()
        with open(f"/proc/{child.pid}/status") as f:
            assert "Seccomp:\t2" in f.read()
        assert child.proc.stdin is not None
        child.proc.stdin.write(b"again\n")
        child.proc.stdin.flush()
        assert child.readline() == "-1"  # the filter is in force again


SECCOMP_CHILD = r'''
import ctypes, json, sys
libc = ctypes.CDLL(None, use_errno=True)
class sock_filter(ctypes.Structure):
    _fields_ = (("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint))
class sock_fprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.POINTER(sock_filter)))
prog = (sock_filter * 4)(
    sock_filter(0x20, 0, 0, 0),  # ld [nr]
    sock_filter(0x15, 0, 1, 110),  # jeq getppid
    sock_filter(0x06, 0, 0, 0x00050000 | 1),  # ret ERRNO(EPERM)
    sock_filter(0x06, 0, 0, 0x7FFF0000),  # ret ALLOW
)
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
fprog = sock_fprog(4, prog)
assert libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) == 0  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
libc.syscall.restype = ctypes.c_long
print("READY " + json.dumps({"own_getppid": libc.syscall(110)}), flush=True)
sys.stdin.readline()
print(libc.syscall(110), flush=True)
sys.stdin.readline()
'''


# --- failures ---------------------------------------------------------------------------------


def test_killed_target_raises_process_gone() -> None:
    with spawn_python(BLOCKING_CHILD) as child:
        freezer = PtraceFreezer(child.pid)
        freezer.freeze()
        try:
            injector = Injector.for_freezer(freezer)
            os.kill(child.pid, signal.SIGKILL)
            with pytest.raises(ProcessGone):
                injector.syscall(arch.NR_getpid)
        finally:
            freezer.thaw()
            stop_child(child.proc)


def test_use_from_another_thread_is_refused(blocking: Child) -> None:
    with PtraceFreezer(blocking.pid) as freezer:
        injector = Injector.for_freezer(freezer)
        errors: list[BaseException] = []

        def call() -> None:
            try:
                injector.syscall(arch.NR_getpid)
            except BaseException as err:
                errors.append(err)

        worker = threading.Thread(target=call)
        worker.start()
        worker.join()
        assert len(errors) == 1
        assert isinstance(errors[0], RuntimeError)
        assert injector.syscall(arch.NR_getpid) == blocking.pid


def test_faulting_site_is_reported_and_the_thread_restored(blocking: Child) -> None:
    # A "syscall instruction" at an address that is not mapped executable: the thread faults
    # (SIGSEGV), which is suppressed; the thread must come back exactly as it was.
    with PtraceFreezer(blocking.pid) as freezer:
        injector = Injector.for_freezer(freezer, site="vdso")
        regs = bytes(arch.get_regs(blocking.pid))
        injector._vdso_site = 0x1000  # never mapped (below mmap_min_addr)
        with pytest.raises(ProcessError, match="SIGSEGV"):
            injector.syscall(arch.NR_getpid)
        assert bytes(arch.get_regs(blocking.pid)) == regs
    assert request(blocking, "fd") > 2

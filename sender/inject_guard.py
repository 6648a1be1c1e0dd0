"""A helper process that puts the target back as it was if the sender dies during an injection.

An injected system call (``sender.inject``) gives a thread of the target registers, a signal
mask and, with the ``rip`` site, a text word that are not its own, and the uffd tracker's call
leaves an fd in the target until a second call closes it. If the sender died with a thread like
that and the thread ran on, it would run the vDSO's code after the ``syscall`` instruction with
made-up registers (SIGSEGV), or keep every signal blocked, or keep the fd.

Some facts this rests on (kernel/ptrace.c, kernel/signal.c, kernel/exit.c, kernel/entry/common.c,
fs/pidfs.c; read in 6.12 and checked on 6.18 by killing a sender at every step of an injection,
tests/integration/test_inject_guard.py):

* Whatever kills the tracer, ``exit_ptrace()`` detaches every tracee with ``__ptrace_unlink()``,
  wherever it is: in a ptrace stop, or running the injected call in the kernel. Without
  PTRACE_O_EXITKILL (``sender.freezer.SEIZE_OPTIONS``) it is not killed.
* ``__ptrace_unlink()`` clears the syscall-trace flag, and if the thread group is in group-stop
  (SIGNAL_STOP_STOPPED, or ``group_stop_count`` while it is being stopped) sets
  JOBCTL_STOP_PENDING again and wakes the thread with TIF_SIGPENDING set
  (``ptrace_signal_wake_up()`` -> ``signal_wake_up_state()``). ``recalc_sigpending()`` keeps
  TIF_SIGPENDING while JOBCTL_STOP_PENDING is set.
* So the thread finishes at most the injected call itself (a thread detached in its
  syscall-entry stop runs it; one not there yet does not), and on its way back to user mode
  (``exit_to_user_mode_loop()`` -> ``arch_do_signal_or_restart()`` -> ``get_signal()``) takes
  the pending stop (``do_signal_stop()``) before anything else: it parks in TASK_STOPPED with the
  injected registers, no user instruction run. A syscall-entry or -exit stop the tracer had not
  waited for resumes with its exit code ``SIGTRAP | 0x80`` (PTRACE_O_TRACESYSGOOD), not a valid
  signal, so ``ptrace_report_syscall()`` sends nothing.
* The pipe to the guard reaches end of file when the sender's files are closed
  (``do_exit()`` -> ``exit_files()``), before its tracees are detached (``exit_notify()`` ->
  ``exit_ptrace()``). The guard therefore waits until a pidfd of the sender polls readable
  before it attaches: ``pidfd_poll()`` (fs/pidfs.c) says so once the leader has its exit_state
  and no other thread is left, and every thread sets exit_state in ``exit_notify()`` after its
  ``exit_ptrace()``.

Hence the design: calls are injected only while the target's thread group is in group-stop
(:func:`guarded_stop`; ``PtraceFreezer.stop_group()``), and before the first change the sender
tells the guard what to put back. The guard is ``python -m sender.inject_guard``, one per sender
process, started before the first injection (:meth:`InjectGuard.shared`) in a session of its
own, so a signal to the sender's process group spares it; it ignores SIGINT, SIGTERM and SIGHUP
and ends by itself when the sender has gone. It reads lines from a pipe whose write end only
the sender holds (close-on-exec); each is one write of at most PIPE_BUF bytes, so it is in the
pipe whole before the sender changes anything, even if the sender dies right after:

* ``stop PID``: PID is in a group-stop the sender made; ``cont PID``: the sender ended it;
* ``arm PID TID REGS MASK [ADDR WORD]``: thread TID holds injected state; REGS (the saved
  ``user_regs_struct`` in hex), MASK, and the original text WORD at ADDR are what to put back;
  ``disarm PID TID``: the sender put it back itself;
* ``own PID LINK FD,...``: an fd of PID whose /proc link is LINK and that is not listed is the
  sender's (created by an injected call); ``disown PID``;
* ``done``: the sender ends cleanly; the guard exits touching nothing.

At end of file without ``done`` the guard waits for the sender's exit, then for each process
with injected state: attaches (``PtraceFreezer``), finds it still in group-stop, writes back
the saved registers, signal mask and text word, closes the sender's fds with an injected
``close()`` of its own, detaches (the process stays stopped), and only then sends SIGCONT to
the processes the sender had stopped. A process found stopped by someone else stays stopped.

What it cannot cover: the sender and the guard killed together (a cgroup or session-wide
SIGKILL, the OOM killer taking both); a SIGCONT from elsewhere during the injection (it ends the
group-stop, and a detached thread then runs on with the injected registers); another tracer
attaching before the guard does. A StopGuard (``sender.freezer``) sends SIGCONT as soon as the
sender's pipe closes, while the sender may still be attached, so a process covered by one is
never injected into (:func:`guarded_stop` refuses).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Final

from pagehaul import kernel
from pagehaul.errors import PagehaulError, ProcessGone
from pagehaul.killpoints import ENV as KILL_AT_ENV
from pagehaul.killpoints import killpoint
from pagehaul.procfs import PROC_ROOT
from sender import arch_x86_64 as arch
from sender.freezer import PtraceFreezer
from sender.inject import Injector

_PACKAGE_ROOT: Final = Path(__file__).resolve().parents[1]
_READY: Final = b"READY\n"
_DONE: Final = "done"


def linked_fds(pid: int, link: str, proc_root: Path = PROC_ROOT) -> list[int]:
    """The fds of ``pid`` whose /proc link reads ``link`` (e.g. ``anon_inode:[userfaultfd]``)."""
    directory = proc_root / str(pid) / "fd"
    found = []
    for name in os.listdir(directory):
        with contextlib.suppress(FileNotFoundError):  # closed meanwhile
            if os.readlink(directory / name) == link:
                found.append(int(name))
    return sorted(found)


class InjectGuard:
    """The sender's end of the guard process (module comment).

    Every method may be called from any thread; each message is one atomic pipe write. The
    first message waits until the guard has started (it says READY once it has imported what it
    needs), so starting it early hides its start-up. A guard that has gone (killed, or failed to
    start) makes the next message raise PagehaulError, before the target is touched.
    """

    _shared: ClassVar[InjectGuard | None] = None
    _shared_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self) -> None:
        env = {key: value for key, value in os.environ.items() if key != KILL_AT_ENV}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(_PACKAGE_ROOT), env.get("PYTHONPATH"))))
        pidfd = os.pidfd_open(os.getpid())
        try:
            # The pipes Popen makes are close-on-exec in this process: no other child inherits
            # the write end, so its end of file means this process has closed it or died.
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "sender.inject_guard", str(pidfd)], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, pass_fds=(pidfd,), start_new_session=True, cwd="/", env=env)
        finally:
            os.close(pidfd)
        assert self._proc.stdin is not None
        self._stdin = self._proc.stdin
        self._lock = threading.Lock()
        self._ready = False

    @classmethod
    def shared(cls) -> InjectGuard:
        """This process's guard, started on first use (and again if it has gone)."""
        with cls._shared_lock:
            guard = cls._shared
            if guard is None or not guard.alive:
                if guard is not None:
                    guard._end(b"")
                guard = cls._shared = cls()
            return guard

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    @property
    def pid(self) -> int:
        return self._proc.pid

    def stopping(self, pid: int) -> None:
        self._send("stop", pid)

    def continued(self, pid: int) -> None:
        self._send("cont", pid)

    def arm(self, pid: int, tid: int, regs: arch.Regs, mask: int, poke: tuple[int, int] | None = None) -> None:
        """``tid`` is about to be changed; ``regs``, ``mask`` and ``poke`` (address, original
        word) are what to put back."""
        extra = (poke[0], poke[1]) if poke is not None else ()
        self._send("arm", pid, tid, bytes(regs).hex(), mask, *extra)

    def disarm(self, pid: int, tid: int) -> None:
        self._send("disarm", pid, tid)

    def own(self, pid: int, link: str, existing: list[int]) -> None:
        """fds of ``pid`` linked to ``link`` other than ``existing`` are about to be the sender's."""
        if not link or any(c.isspace() for c in link):
            raise ValueError(f"an fd link without white space is needed, not {link!r}")
        self._send("own", pid, link, ",".join(map(str, existing)) or "-")

    def disown(self, pid: int) -> None:
        self._send("disown", pid)

    def close(self) -> None:
        """End the guard, leaving every process as it is."""
        self._end(f"{_DONE}\n".encode())

    def _send(self, *words: object) -> None:
        line = (" ".join(map(str, words)) + "\n").encode()
        assert len(line) <= select.PIPE_BUF, line  # written whole, in one piece
        with self._lock:
            if not self._ready:
                self._await_ready()
            try:
                written = os.write(self._stdin.fileno(), line)  # ValueError once closed
            except (BrokenPipeError, ValueError) as err:
                self._end(b"")
                raise PagehaulError(f"the injection guard (pid {self._proc.pid}) is gone "
                                    f"(exit status {self._proc.poll()})") from err
        assert written == len(line)

    def _await_ready(self) -> None:
        stdout = self._proc.stdout
        assert stdout is not None
        ready = b"" if stdout.closed else stdout.readline()  # closed: it failed to start before
        stdout.close()
        if ready != _READY:
            self._end(b"")
            raise PagehaulError(f"the injection guard (python -m sender.inject_guard) did not start: "
                                f"exit status {self._proc.returncode}")
        self._ready = True

    def _end(self, word: bytes) -> None:
        if not self._stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                os.write(self._stdin.fileno(), word)
            with contextlib.suppress(BrokenPipeError):
                self._stdin.close()
        self._proc.wait()


@contextlib.contextmanager
def guarded_stop(freezer: PtraceFreezer, guard: InjectGuard) -> Iterator[None]:
    """Hold the frozen process in group-stop, told to ``guard``, while calls are injected.

    A stop made here ends (``PtraceFreezer.end_group_stop()``) when the block ends; the threads
    stay held by ``freezer``. A process found stopped stays so, and the guard leaves it stopped.
    """
    if freezer.group_stopped:
        if freezer.made_group_stop:
            raise RuntimeError(f"process {freezer.pid} is in a group-stop a StopGuard continues at once "
                               "when the sender dies; injecting into it is not covered (module comment)")
        yield
        return
    guard.stopping(freezer.pid)
    try:
        killpoint("stop.told")
        freezer.stop_group()
        killpoint("stop.stopped")
        yield
    finally:
        freezer.end_group_stop()
        killpoint("stop.ended")
        guard.continued(freezer.pid)


# --- the guard process ------------------------------------------------------------------------


@dataclass(slots=True)
class _Armed:
    regs: bytes
    mask: int
    poke: tuple[int, int] | None


@dataclass(slots=True)
class _Book:
    """What the sender has said so far."""

    stopped: set[int] = field(default_factory=set)
    armed: dict[tuple[int, int], _Armed] = field(default_factory=dict)
    owned: dict[int, tuple[str, frozenset[int]]] = field(default_factory=dict)

    def apply(self, words: list[str]) -> None:
        op, pid = words[0], int(words[1])
        if op == "stop":
            self.stopped.add(pid)
        elif op == "cont":
            self.stopped.discard(pid)
        elif op == "arm":
            poke = (int(words[5]), int(words[6])) if len(words) > 5 else None
            self.armed[(pid, int(words[2]))] = _Armed(bytes.fromhex(words[3]), int(words[4]), poke)
        elif op == "disarm":
            self.armed.pop((pid, int(words[2])), None)
        elif op == "own":
            existing = frozenset() if words[3] == "-" else frozenset(map(int, words[3].split(",")))
            self.owned[pid] = (words[2], existing)
        elif op == "disown":
            self.owned.pop(pid, None)
        else:
            raise ValueError(f"unknown message {words!r}")

    def processes(self) -> list[int]:
        """Processes holding something of the sender's, ascending."""
        return sorted({pid for pid, _ in self.armed} | set(self.owned))


def _say(message: str) -> None:
    sys.stderr.write(f"pagehaul inject guard: {message}\n")
    sys.stderr.flush()


def _restore(book: _Book, pid: int) -> None:
    freezer = PtraceFreezer(pid)
    freezer.freeze()
    try:
        if not freezer.group_stopped:
            # Someone continued it meanwhile: its threads ran on, and writing back registers
            # of an earlier instant would make things worse.
            raise PagehaulError(f"process {pid} was not in group-stop when the sender died; left as it is")
        done = []
        for (owner, tid), armed in sorted(book.armed.items()):
            if owner != pid:
                continue
            try:
                if armed.poke is not None:
                    kernel.ptrace_pokedata(tid, *armed.poke)
                arch.set_regs(tid, arch.Regs.from_buffer_copy(armed.regs))
                kernel.ptrace_setsigmask(tid, armed.mask)
            except ProcessLookupError:
                continue  # the thread has exited
            done.append(f"thread {tid}: registers, signal mask{', text word' if armed.poke else ''}")
        if pid in book.owned:
            link, existing = book.owned[pid]
            injector = Injector.for_freezer(freezer)
            for fd in linked_fds(pid, link):
                if fd not in existing:
                    injector.syscall(arch.NR_close, fd)
                    done.append(f"fd {fd} ({link}) closed")
        if done:
            _say(f"the sender died while process {pid} held injected state; restored: {'; '.join(done)}")
    finally:
        freezer.thaw(leave_stopped=True)


def _wait_exited(pidfd: int) -> None:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    while not poller.poll():
        pass


def main(argv: list[str]) -> int:
    """The guard process: ``python -m sender.inject_guard SENDER_PIDFD`` (module comment)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    sender = int(argv[0])
    book = _Book()
    os.write(1, _READY)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # the sender reads only READY
    os.close(devnull)
    for raw in sys.stdin.buffer:
        words = raw.decode().split()
        if words == [_DONE]:
            return 0
        if words:
            book.apply(words)
    _wait_exited(sender)
    failed = set()
    for pid in book.processes():
        try:
            _restore(book, pid)
        except ProcessGone:
            continue
        except (PagehaulError, OSError) as err:
            # Not continued: a thread still holding injected registers would crash, while a
            # stopped process can still be looked at and continued by hand.
            _say(f"could not restore process {pid}; not continued: {err}")
            failed.add(pid)
    for pid in sorted(book.stopped - failed):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Stop every thread of a process with ptrace, and let it go again.

Some facts about ptrace as a freezer (man 2 ptrace, kernel/ptrace.c, kernel/signal.c;
CRIU compel/src/lib/infect.c does the same dance):

* ``PTRACE_SEIZE`` attaches without stopping and without the SIGSTOP of PTRACE_ATTACH;
  ``PTRACE_INTERRUPT`` then traps the thread, and ``waitpid(tid, __WALL)`` reports
  ``status >> 16 == PTRACE_EVENT_STOP``. A thread already in group-stop (state T) reports
  the same event with its stop signal; detaching puts it back into group-stop, so a stopped
  process stays stopped.
* Tracing is per thread. Threads created between listing ``/proc/PID/task`` and stopping
  their creator are not traced; the freezer lists again after every thread is stopped, and
  a listing with no new thread while all known threads are stopped is final (a stopped
  thread cannot clone, and a finished clone is already in the list).
* If a signal arrives while a thread is being stopped, ``waitpid`` may report a
  signal-delivery-stop (event 0, the signal in WSTOPSIG) instead of the interrupt. The signal
  has been dequeued: it is lost unless the tracer injects it again, and only a restart from
  that very stop injects it (a signal passed when leaving an event stop is ignored). So the
  thread is kept in that stop and ``PTRACE_DETACH`` passes the signal back.
* The kernel records the tracer per *thread* of the tracing process: every ptrace request and
  every ``waitpid`` for the tracees must come from the OS thread that seized them. A freezer
  object is therefore bound to the thread that created it and checks this in each method.
* ``EPERM`` from SEIZE means another tracer holds the thread (``TracerPid`` in its status),
  the thread is exiting (a zombie group leader cannot be traced), or the caller lacks
  privileges (LSM, Yama ptrace_scope, another user).
* Seized tracees that exit become zombies until their tracer reaps them with waitpid; threads
  found dead are reaped here.
* Leaving a process stopped for someone else (CRIU) with its memory exactly as read: SIGSTOP
  queued at detach is not enough. ``get_signal()`` dequeues the lowest pending signal first
  (kernel/signal.c ``next_signal``), so a SIGALRM, SIGCHLD or SIGUSR1 that arrived while the
  thread was frozen, or one dequeued during the freeze and passed back at detach, is delivered
  before SIGSTOP: its handler frame is written onto the stack (no user instruction runs), and
  the registers CRIU then saves point at the handler while the memory read before lacks the
  frame. ``stop_group()`` therefore brings every thread into group-stop *under ptrace*, before
  the memory is read: SIGSTOP is queued, every thread is restarted from its stop and each
  signal-delivery-stop is passed on (handlers set up now, before the read) until every thread
  reports the group-stop (PTRACE_EVENT_STOP with a stop signal). The group then has
  SIGNAL_STOP_STOPPED, and ``__ptrace_unlink()`` sets JOBCTL_STOP_PENDING again at detach,
  which ``get_signal()`` checks before it dequeues anything: the thread parks in TASK_STOPPED
  without taking any signal. A later tracer (compel) finds it stopped and leaves it so.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from pagehaul import kernel
from pagehaul.errors import AccessDenied, AlreadyTraced, ProcessGone
from pagehaul.procfs import PROC_ROOT, list_threads, read_status

log = logging.getLogger(__name__)

SEIZE_OPTIONS: Final = kernel.PTRACE_O_TRACESYSGOOD  # not EXITKILL: our death must not kill the target


STOP_SIGNALS: Final = frozenset({signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})


@dataclass(slots=True)
class _Tracee:
    interrupted: bool = False
    stopped: bool = False
    pending_signal: int = 0  # dequeued during the freeze, re-injected at detach
    group_stopped: bool = False  # sits in group-stop (PTRACE_EVENT_STOP with a stop signal)


class PtraceFreezer:
    """Freezes all threads of ``pid`` (context manager; leaving the block always thaws).

    Use one freezer from one OS thread only (see the module comment); ``asyncio.to_thread``
    workers do not qualify unless the same worker does every call.
    """

    def __init__(self, pid: int, proc_root: Path = PROC_ROOT, options: int = SEIZE_OPTIONS) -> None:
        self.pid = pid
        self._proc_root = proc_root
        self._options = options
        self._owner = threading.get_ident()
        self._tracees: dict[int, _Tracee] = {}
        # Threads found exiting (zombies) during the current freeze: not seized, not retried.
        self._skipped: set[int] = set()
        self._frozen = False
        self._sent_stop = False  # stop_group() queued SIGSTOP: a thaw that resumes sends SIGCONT
        self._freeze_start_ns = 0
        self._frozen_ns = 0
        self._thawed_ns = 0

    # --- public ---------------------------------------------------------------------------

    @property
    def frozen(self) -> bool:
        return self._frozen

    @property
    def threads(self) -> list[int]:
        """Thread ids held stopped, ascending."""
        return sorted(tid for tid, t in self._tracees.items() if t.stopped)

    @property
    def pending_signals(self) -> dict[int, int]:
        """Signals dequeued during the freeze, by thread id; re-injected at thaw."""
        return {tid: t.pending_signal for tid, t in self._tracees.items() if t.pending_signal}

    @property
    def options(self) -> int:
        """The PTRACE_O_* options every thread was seized with (PTRACE_SETOPTIONS replaces them
        all, so whoever changes them for a while needs these to put them back)."""
        return self._options

    def take_pending_signal(self, tid: int) -> int:
        """Hand the signal held for re-injection at ``tid`` to the caller, who now owns it.

        Returns 0 if there is none. The injector (``sender.inject``) calls this when it has
        re-queued the signal in the kernel and the thread no longer sits in that
        signal-delivery-stop, so detaching must not pass it again.
        """
        self._check_thread()
        tracee = self._tracees.get(tid)
        if tracee is None:
            return 0
        sig, tracee.pending_signal = tracee.pending_signal, 0
        return sig

    @property
    def freezing_time_us(self) -> int:
        """How long the last ``freeze()`` took to stop every thread (CRIU's freezing_time)."""
        return (self._frozen_ns - self._freeze_start_ns) // 1000 if self._frozen_ns else 0

    @property
    def frozen_time_us(self) -> int:
        """Time from the end of ``freeze()`` to ``thaw()``, or to now while frozen (CRIU's frozen_time)."""
        if not self._frozen_ns:
            return 0
        end = time.monotonic_ns() if self._frozen else self._thawed_ns
        return (end - self._frozen_ns) // 1000

    def freeze(self) -> None:
        """Stop every thread of the process. On error, threads stopped so far are released."""
        self._check_thread()
        if self._frozen:
            raise RuntimeError(f"process {self.pid} is already frozen by this freezer")
        self._freeze_start_ns, self._frozen_ns, self._thawed_ns = time.monotonic_ns(), 0, 0
        self._sent_stop = False
        try:
            self._stop_all()
        except BaseException:
            self._release_all()
            raise
        self._frozen = True
        self._frozen_ns = time.monotonic_ns()
        log.debug("frozen pid=%d threads=%d freezing_time_us=%d pending_signals=%s",
                  self.pid, len(self._tracees), self.freezing_time_us, self.pending_signals)

    @property
    def group_stopped(self) -> bool:
        """Every thread held sits in group-stop: detaching leaves the process stopped, and no
        signal is delivered before a SIGCONT (module comment)."""
        return bool(self._tracees) and all(t.group_stopped for t in self._tracees.values())

    def stop_group(self) -> None:
        """Bring the frozen process into group-stop without letting go of it (module comment).

        Signals pending now, or dequeued during the freeze, are delivered first: their handler
        frames are set up (the kernel writes them; no user instruction runs), so memory read
        after this returns is the memory the process has when it is next looked at, by us or
        by CRIU. Threads stay ptrace-stopped; ``thaw(leave_stopped=True)`` then leaves the
        process in state T with nothing delivered in between.
        """
        self._check_thread()
        if not self._frozen:
            raise RuntimeError(f"process {self.pid} must be frozen before it is stopped")
        if self.group_stopped:
            return
        try:
            os.kill(self.pid, signal.SIGSTOP)
        except ProcessLookupError as err:
            raise ProcessGone(self.pid, f"process {self.pid} exited while being stopped") from err
        self._sent_stop = True
        # One thread at a time, the first until it has started the group-stop: a second thread
        # restarted while the first holds the dequeued SIGSTOP (in its signal-delivery-stop)
        # would find nothing pending and return to user mode. Once the group-stop has begun,
        # every other thread has JOBCTL_STOP_PENDING and parks as soon as it is restarted.
        for tid in sorted(self._tracees):
            tracee = self._tracees.get(tid)
            if tracee is None or tracee.group_stopped:
                continue
            # From an event stop the data argument is ignored; from a signal-delivery-stop it
            # delivers that signal now (0 would discard it).
            sig, tracee.pending_signal = tracee.pending_signal, 0
            self._restart(tid, sig)
            self._wait_group_stop(tid)
        if self.pid not in self._tracees:
            raise ProcessGone(self.pid, f"process {self.pid} exited while being stopped")
        log.debug("group-stopped pid=%d threads=%d", self.pid, len(self._tracees))

    @property
    def made_group_stop(self) -> bool:
        """The group-stop in effect is one ``stop_group()`` made (not one the process was found in)."""
        return self._sent_stop

    def end_group_stop(self) -> None:
        """End the group-stop ``stop_group()`` made, keeping every thread ptrace-stopped.

        SIGCONT ends the job-control stop at once, but threads attached with PTRACE_SEIZE stay in
        their trace stops: ``prepare_signal()`` only marks them JOBCTL_TRAP_NOTIFY
        (``ptrace_trap_notify()``), which does not wake a TASK_TRACED thread, and detaching clears
        it. The process is still frozen and runs again at ``thaw()``. SIGCONT is queued like any
        signal to a traced thread and delivered after the thaw (ignored unless it has a handler,
        as the SIGCONT of a thaw is). A stop the process was found in is left alone.
        """
        self._check_thread()
        if not self._sent_stop:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGCONT)
        self._sent_stop = False
        for tracee in self._tracees.values():
            tracee.group_stopped = False

    def _restart(self, tid: int, sig: int) -> None:
        try:
            kernel.ptrace(kernel.PTRACE_CONT, tid, 0, sig)
        except OSError as err:
            if err.errno != errno.ESRCH:
                raise
            # Killed while stopped: the wait collects it.

    def _wait_group_stop(self, tid: int) -> None:
        """Restart ``tid`` from every stop but the group-stop, delivering the signals it dequeues."""
        tracee = self._tracees[tid]
        while True:
            stop = self._next_stop(tid)
            if stop is None:
                self._forget_thread(tid)
                return
            event, sig = stop
            if event == kernel.PTRACE_EVENT_STOP and sig in STOP_SIGNALS:
                tracee.group_stopped = True
                return
            # A signal-delivery-stop: deliver it (SIGSTOP itself starts the group-stop). Any other
            # trap (an interrupt, a listen notification): go on, with nothing to deliver.
            self._restart(tid, sig if event == 0 else 0)

    def _forget_thread(self, tid: int) -> None:
        """A thread that exited while being stopped (the leader's exit is checked by the caller)."""
        self._tracees.pop(tid, None)

    def thaw(self, leave_stopped: bool = False) -> None:
        """Let the process run again; a no-op if not frozen.

        ``leave_stopped=True`` leaves it in group-stop (state T, resumed by SIGCONT). Unless
        ``stop_group()`` was called while frozen, this delivers pending signals first, after
        whatever was read while frozen (module comment): call ``stop_group()`` before reading
        when the memory must stay exactly as read. A group-stopped process that is thawed
        without ``leave_stopped`` gets SIGCONT if the stop was ours (a process found stopped
        stays stopped).
        """
        self._check_thread()
        if not self._tracees:
            return
        try:
            if leave_stopped:
                try:
                    self.stop_group()
                except ProcessGone:
                    log.debug("process gone before it could be left stopped pid=%d", self.pid)
        finally:
            self._release_all()
            self._frozen = False
            self._thawed_ns = time.monotonic_ns()
        if self._sent_stop and not leave_stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)
        if leave_stopped:
            self._await_group_stop()
        log.debug("thawed pid=%d leave_stopped=%s frozen_time_us=%d",
                  self.pid, leave_stopped, self.frozen_time_us)

    def _await_group_stop(self, timeout_s: float = 5.0) -> None:
        await_group_stop(self.pid, self._proc_root, timeout_s)

    def __enter__(self) -> Self:
        self.freeze()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.thaw()

    # --- steps ----------------------------------------------------------------------------

    def _stop_all(self) -> None:
        self._skipped.clear()
        while True:
            # A zombie stays listed until reaped (and its parent may be stopped by now): skipped
            # ones are not "new" again, or the listing would never settle.
            new = [tid for tid in list_threads(self.pid, self._proc_root)
                   if tid not in self._tracees and tid not in self._skipped]
            for tid in new:
                self._seize(tid)
            for tid in list(self._tracees):
                if not self._tracees[tid].interrupted:
                    self._interrupt(tid)
            for tid in list(self._tracees):
                if not self._tracees[tid].stopped:
                    self._wait_stopped(tid)
            if not new:
                break
        if not self._tracees:
            raise ProcessGone(self.pid, f"process {self.pid} has no threads left to freeze")

    def _check_thread(self) -> None:
        if threading.get_ident() != self._owner:
            raise RuntimeError("a PtraceFreezer must be used from the OS thread that created it: "
                               "the kernel accepts ptrace requests only from the tracing thread")

    def _seize(self, tid: int) -> None:
        try:
            kernel.ptrace(kernel.PTRACE_SEIZE, tid, 0, self._options)
        except OSError as err:
            if err.errno == errno.ESRCH:
                if tid == self.pid:
                    raise ProcessGone(self.pid, f"process {self.pid} does not exist") from err
                self._skipped.add(tid)
                return  # the thread exited after the listing
            if err.errno == errno.EPERM:
                self._explain_eperm(tid, err)
                self._skipped.add(tid)
                return
            raise
        self._tracees[tid] = _Tracee()

    def _explain_eperm(self, tid: int, err: OSError) -> None:
        """Raise the right error for EPERM from SEIZE, or return if the thread is just exiting."""
        try:
            status = read_status(tid, self._proc_root)
        except ProcessGone:
            if tid == self.pid:
                raise
            return
        if status.tracer_pid:
            raise AlreadyTraced(self.pid, status.tracer_pid) from err
        if status.state in ("Z", "X"):
            # Exiting, or a zombie group leader whose other threads live on (the main thread
            # called pthread_exit): it runs no code and cannot be traced. If nothing else is
            # left, freeze() reports the process gone.
            return
        raise AccessDenied(self.pid, f"ptrace of process {self.pid} (thread {tid}) not permitted") from err

    def _interrupt(self, tid: int) -> None:
        self._tracees[tid].interrupted = True
        try:
            kernel.ptrace(kernel.PTRACE_INTERRUPT, tid, 0, 0)
        except OSError as err:
            if err.errno != errno.ESRCH:
                raise
            # Exited after the seize: the wait below collects (reaps) it.

    @staticmethod
    def _next_stop(tid: int) -> tuple[int, int] | None:
        """The next stop of ``tid`` as (ptrace event, signal); None once it has exited (reaped here,
        or already by someone else, e.g. an exec in another thread)."""
        while True:
            try:
                _, status = os.waitpid(tid, kernel.WALL)
            except ChildProcessError:
                return None
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                return None
            if os.WIFSTOPPED(status):
                return status >> 16, os.WSTOPSIG(status)

    def _wait_stopped(self, tid: int) -> None:
        tracee = self._tracees[tid]
        stop = self._next_stop(tid)
        if stop is None:
            self._forget(tid)
            return
        event, sig = stop
        if event == 0:
            # Signal-delivery-stop: the signal is dequeued and must go back at detach.
            tracee.pending_signal = sig
            log.debug("signal dequeued during freeze pid=%d tid=%d sig=%d", self.pid, tid, sig)
        elif event == kernel.PTRACE_EVENT_STOP and sig in STOP_SIGNALS:
            tracee.group_stopped = True  # it was stopped (state T) already
        elif event != kernel.PTRACE_EVENT_STOP:
            log.debug("unexpected ptrace event during freeze pid=%d tid=%d event=%d", self.pid, tid, event)
        tracee.stopped = True

    def _forget(self, tid: int) -> None:
        del self._tracees[tid]
        if tid == self.pid:
            raise ProcessGone(self.pid, f"process {self.pid} exited while being frozen")

    def _release_all(self) -> None:
        """Detach every tracee, stopping stragglers first; raises the first unexpected error."""
        first_error: BaseException | None = None
        dead = []
        for tid in sorted(self._tracees, key=lambda t: t == self.pid):  # the leader last
            tracee = self._tracees[tid]
            try:
                if not tracee.stopped:
                    # PTRACE_DETACH works only on a stopped tracee (ESRCH otherwise).
                    if not tracee.interrupted:
                        self._interrupt(tid)
                    self._wait_stopped(tid)
                    if tid not in self._tracees:
                        continue
                kernel.ptrace(kernel.PTRACE_DETACH, tid, 0, tracee.pending_signal)
            except ProcessGone:
                pass
            except OSError as err:
                if err.errno == errno.ESRCH:
                    dead.append(tid)  # SIGKILLed while stopped: it left the stop to die
                elif first_error is None:
                    first_error = err
            self._tracees.pop(tid, None)
        for tid in dead:
            self._reap_dead(tid)
        if first_error is not None:
            raise first_error

    def _reap_dead(self, tid: int) -> None:
        """Collect a dying tracee, which stays a zombie until its tracer waits for it.

        Other threads are reaped outright. The leader's exit is reported only once the
        other threads are gone (so it comes last); for a tracer that is not the real parent,
        waiting hands the zombie on to the real parent. When we *are* the real parent, its
        exit status is left for whoever started the process.
        """
        if tid == self.pid:
            try:
                if read_status(tid, self._proc_root).ppid == os.getpid():
                    return
            except ProcessGone:
                return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(tid, kernel.WALL)


class StopGuard:
    """Continues ``pids`` (SIGCONT) if the sender dies while it keeps them stopped.

    A ptrace stop ends with its tracer, whatever kills it; a group-stop does not, and a sender
    killed while the tree sits in one would leave the source stopped for good. The guard is a
    detached ``sh`` (its own session, so a signal to the sender's process group spares it) that
    reads one line from a pipe whose write end only the sender holds (close-on-exec: no child of
    the sender inherits it). ``done`` disarms it; end of file without it, the sender's death in
    any way included, continues the tree. Its SIGCONT comes at once, possibly before the dying
    sender is detached, which is right for a tree that holds nothing of ours; a process with a
    system call injected into it needs its registers back first, and is covered by
    ``sender.inject_guard`` instead.
    """

    # Each line names the pids to continue from then on (``update``); ``done`` ends it quietly.
    _SCRIPT: Final = ('pids="$*"; while read -r line; do [ "$line" = done ] && exit 0; pids=$line; done; '
                      '[ -n "$pids" ] && kill -CONT $pids 2>/dev/null; exit 0')

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = tuple(pids)
        self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            ["sh", "-c", self._SCRIPT, "pagehaul-stop-guard", *map(str, self.pids)], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def update(self, pids: Sequence[int]) -> None:
        """From now on the sender's death continues ``pids`` (none: nothing), for a stop whose
        members change (the signal throttle's duty cycle). Said before the stop is made."""
        self.pids = tuple(pids)
        proc = self._proc
        if proc is not None and proc.stdin is not None:
            try:
                proc.stdin.write(" ".join(map(str, self.pids)).encode() + b"\n")
                proc.stdin.flush()
            except BrokenPipeError:
                log.warning("stop guard %d is gone: a sender killed now would leave %s stopped", proc.pid, self.pids)

    def disarm(self) -> None:
        """The stop is intended (or already undone): the guard leaves the tree as it is."""
        self._end(b"done\n")

    def fire(self) -> None:
        """Continue the tree now, as the sender's death would."""
        self._end(b"")

    def _end(self, word: bytes) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.stdin is None:
            return
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(word)
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
        proc.wait()


def await_group_stop(pid: int, proc_root: Path = PROC_ROOT, timeout_s: float = 5.0) -> None:
    """Return once every thread of ``pid`` shows state T, so "left stopped" means stopped.

    Detached threads enter the group stop on their way back to user mode, without running
    user code, but /proc shows them as R for that moment. A bounded poll of /proc: there
    is no wait primitive for a process we are neither tracing nor parent of.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            tids = list_threads(pid, proc_root)
            states = {read_status(tid, proc_root).state[:1] for tid in tids}
        except ProcessGone:
            return
        if states <= {"T", "Z", "X"}:
            return
        if time.monotonic() > deadline:
            log.warning("process not in group stop after %.1f s pid=%d states=%s", timeout_s, pid, states)
            return
        time.sleep(0.0002)

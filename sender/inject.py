"""Run one system call inside a ptrace-stopped thread of another process, then put it back exactly.

Some kernel objects can only be created from inside the process that will own them: a
userfaultfd is bound to the mm of the caller. CRIU's compel executes such calls in a seized
task (``compel_syscall()``, compel/src/lib/infect.c); this is the same idea, one call at a time.
The CPU-specific part (instruction bytes, register conventions) is in ``sender.arch_x86_64``.

Some facts about injecting a system call (kernel/ptrace.c, kernel/signal.c,
arch/x86/kernel/signal.c, kernel/entry/common.c; verified on 6.18):

* Where the ``syscall`` instruction comes from. compel pokes it over the code at the current
  rip and pokes the old word back afterwards. Here an existing ``0f 05`` in the target's
  ``[vdso]`` is used instead (every x86-64 vDSO has some: the fallback paths of
  clock_gettime and friends). rip only has to point at the two bytes; it does not matter
  which instruction they belong to, because only that one instruction runs. Not writing the
  target's text matters for a migration sender: a ptrace write into a private file mapping
  copies the page on write, so the target would keep an anonymous copy of one text page
  (dumped from then on, no longer shared); a thread we do not hold could execute the patched
  bytes; and a sender that dies between poke and restore leaves one more thing for the guard
  to put back (below). The compel way (``site="rip"``) stays as the fallback for a process
  without a vDSO.
* How the thread runs to and from the instruction. ``PTRACE_SYSCALL`` twice gives a
  syscall-entry and a syscall-exit stop (reported as ``SIGTRAP | 0x80`` with
  PTRACE_O_TRACESYSGOOD) and raises no signal. ``PTRACE_SINGLESTEP`` would end in a SIGTRAP
  sent with ``force_sig_fault()``, which resets the target's SIGTRAP action to SIG_DFL and
  unblocks it if it was blocked or ignored (``force_sig_info_to_task()``), so it is not used.
* How the thread gets back into the stop it was in. The freezer leaves threads in a
  PTRACE_EVENT_STOP, inside ``get_signal()``. A thread stopped in the middle of a blocking call
  (read, nanosleep, futex) has ``rax = -ERESTART*`` and ``orig_rax = nr`` in its saved
  registers, and the kernel restarts that call only when the thread leaves ``get_signal()``
  and finds those values (see the arch module). So after the syscall-exit stop the injector
  issues ``PTRACE_INTERRUPT`` and ``PTRACE_CONT``: "if the tracee is already trapped ...
  another trap will happen after the current trap is ended with PTRACE_CONT" (ptrace.c), and
  that trap is a PTRACE_EVENT_STOP inside ``get_signal()`` again, before any user instruction
  runs. The saved registers are restored there. The interrupted read() then receives data
  written later; an interrupted ``clock_nanosleep`` resumes through ``restart_syscall``.
* Signals. While the call runs every blockable signal is blocked with PTRACE_SETSIGMASK
  (compel's ``parasite_run`` does the same), so nothing is dequeued and pending signals stay
  pending. SIGKILL kills (ProcessGone). SIGSTOP cannot be blocked: its signal-delivery-stop is
  resumed with SIGSTOP, which starts the group stop it would have started anyway; the
  thread reports that as a PTRACE_EVENT_STOP and is resumed, and re-enters the stop when the
  freezer detaches (``__ptrace_unlink()`` re-arms JOBCTL_STOP_PENDING); a process that was
  already stopped stays stopped the same way. A synchronous fault of the injected instruction
  (SIGSEGV, SIGBUS, SIGILL, SIGTRAP, SIGSYS from a seccomp trap) is suppressed and reported as
  an error; being blocked, ``force_sig_fault()`` resets that signal's action to SIG_DFL, as it
  does under compel. It only happens when the call site is wrong, never for the vDSO site.
* A thread held in a signal-delivery-stop (the freezer dequeued a signal while stopping it)
  would lose that signal when resumed with 0. It is resumed with the signal while the mask
  blocks it: ``ptrace_signal()`` then re-queues it on the thread with its siginfo intact, and
  it is delivered after the thaw (the freezer's record of it is taken over).
* PTRACE_GETSIGMASK/SETSIGMASK (3.11) see the mask that user code will see again even while
  pselect/ppoll/sigsuspend has a temporary one installed (5.1, commit fcfc2aa0185f); setting
  it clears TIF_RESTORE_SIGMASK, so such a call, when restarted, installs its mask again.
* If the sender dies in the middle. Its tracees are detached, not killed (no
  PTRACE_O_EXITKILL): ``do_exit()`` -> ``exit_notify()`` -> ``exit_ptrace()`` ->
  ``__ptrace_unlink()``, which also drops the syscall tracing. A thread of a process that is
  not in group-stop then runs on from where it is: into the vDSO code after the ``syscall``
  with the injected registers (SIGSEGV), or into its own code with every signal blocked, and
  the process keeps an fd an injected call created. In group-stop (SIGNAL_STOP_STOPPED)
  ``__ptrace_unlink()`` sets JOBCTL_STOP_PENDING again and wakes the thread with
  TIF_SIGPENDING (``ptrace_signal_wake_up()``), so it completes at most the injected call and
  parks in TASK_STOPPED in ``get_signal()`` -> ``do_signal_stop()`` on its way back to user
  mode, before any user instruction, still holding the injected state. With a ``guard``
  every call is therefore made in group-stop and told to the guard first, which after our
  death writes the saved state back before anything continues the process
  (``sender.inject_guard``; tests/integration/test_inject_guard.py kills a sender at every
  step).
* Seccomp filters run on injected calls too and may refuse (EPERM) or kill. A thread with a
  filter is run with PTRACE_O_SUSPEND_SECCOMP (needs CAP_SYS_ADMIN; compel does the same);
  PTRACE_SETOPTIONS replaces all options, so the freezer's options are restored afterwards.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

from pagehaul import kernel
from pagehaul.errors import AccessDenied, ProcessError, ProcessGone
from pagehaul.killpoints import killpoint
from pagehaul.procfs import PROC_ROOT, read_maps, read_status, translate_errors
from sender import arch_x86_64 as arch
from sender.freezer import SEIZE_OPTIONS, PtraceFreezer

if TYPE_CHECKING:
    from sender.inject_guard import InjectGuard

log = logging.getLogger(__name__)

SyscallSite = Literal["auto", "vdso", "rip"]

_SYSCALL_STOP_SIG: Final = signal.SIGTRAP | 0x80  # syscall-stop with PTRACE_O_TRACESYSGOOD
_ALL_SIGNALS: Final = (1 << 64) - 1  # the kernel drops SIGKILL and SIGSTOP from it
# Synchronous signals our own instruction can raise; force_sig() delivers them even when blocked.
_FAULT_SIGNALS: Final = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE,
                                   signal.SIGTRAP, signal.SIGSYS})
_SECCOMP_DISABLED: Final = 0

# "original": not resumed yet, still in the stop the freezer left it in (event or signal stop).
_StopKind = Literal["original", "running", "event", "syscall", "signal", "gone"]


class Injector:
    """Executes system calls in thread ``tid`` of process ``pid``, which we hold ptrace-stopped.

    Use it from the OS thread that seized the target (the kernel accepts ptrace requests only
    from there), only while the thread is stopped, and with the freezer's ``options`` (needed
    to restore them when seccomp has to be suspended). ``freezer``, when given, is told when a
    signal it holds for re-injection has been re-queued in the kernel instead. With ``guard``
    every call is told to it first, so the thread is put back even if we die in the middle;
    that needs ``freezer`` holding the process in group-stop (``sender.inject_guard``).
    """

    def __init__(self, tid: int, *, pid: int | None = None, freezer: PtraceFreezer | None = None,
                 options: int | None = None, site: SyscallSite = "auto", proc_root: Path = PROC_ROOT,
                 guard: InjectGuard | None = None) -> None:
        self.tid = tid
        self._proc_root = proc_root
        if pid is None:
            pid = freezer.pid if freezer is not None else read_status(tid, proc_root).tgid
        if options is None:
            options = freezer.options if freezer is not None else SEIZE_OPTIONS
        self.pid = pid
        self._freezer = freezer
        self._options = options
        self._guard = guard
        self._site_mode: SyscallSite = site
        self._vdso_site: int | None = None
        self._owner = threading.get_ident()
        self._stop: _StopKind = "original"
        self.calls = 0  # injected calls, for stats and tests

    @classmethod
    def for_freezer(cls, freezer: PtraceFreezer, tid: int | None = None, site: SyscallSite = "auto",
                    guard: InjectGuard | None = None) -> Injector:
        """An injector for a thread ``freezer`` holds: ``tid``, else the leader, else the lowest tid."""
        threads = freezer.threads
        if not freezer.frozen or not threads:
            raise RuntimeError(f"process {freezer.pid} is not frozen: nothing to inject into")
        if tid is None:
            tid = freezer.pid if freezer.pid in threads else threads[0]
        elif tid not in threads:
            raise ValueError(f"thread {tid} is not held stopped by the freezer of process {freezer.pid}")
        return cls(tid, pid=freezer.pid, freezer=freezer, site=site, guard=guard)

    # --- public ---------------------------------------------------------------------------

    def syscall(self, nr: int, *args: int) -> int:
        """Run system call ``nr(*args)`` in the thread and return its non-negative result.

        A -errno result raises ``OSError(errno, ...)`` naming the process and thread, after the
        thread has been put back. ProcessGone if the thread dies meanwhile; ProcessError if the
        instruction faults; AccessDenied if a seccomp filter would have to be suspended and we
        lack CAP_SYS_ADMIN.
        """
        if threading.get_ident() != self._owner:
            raise RuntimeError("an Injector must be used from the OS thread that seized the target")
        if self._guard is not None and (self._freezer is None or not self._freezer.group_stopped):
            # Only a group-stop keeps a thread we no longer trace from running the injected
            # registers until the guard has put them back (sender.inject_guard).
            raise RuntimeError(f"a guarded injection into process {self.pid} needs it held in group-stop")
        started_ns = time.monotonic_ns()
        tid = self.tid
        with self._translate():
            saved = arch.get_regs(tid)
            held_signal = self._held_signal()
            mask = kernel.ptrace_getsigmask(tid)
            options = self._injection_options()
            site, old_word = self._prepare_site(saved)
        self._stop = "original"
        if self._guard is not None:
            self._guard.arm(self.pid, tid, saved, mask, (site, old_word) if old_word is not None else None)
        result: int | None = None
        try:
            with self._translate():
                killpoint("inject.start")
                kernel.ptrace_setsigmask(tid, _ALL_SIGNALS)
                killpoint("inject.masked")
                if options != self._options:
                    self._set_options(options)
                if old_word is not None:
                    kernel.ptrace_pokedata(tid, site, _patched(old_word))
                    killpoint("inject.poked")
                arch.set_regs(tid, arch.syscall_regs(saved, site, nr, args))
                killpoint("inject.regs-set")
                # Resuming with the held signal while it is blocked re-queues it (module comment).
                self._resume(kernel.PTRACE_SYSCALL, held_signal)
                killpoint("inject.resumed")
                if held_signal and self._freezer is not None:
                    self._freezer.take_pending_signal(tid)
                self._wait(kernel.PTRACE_SYSCALL, "syscall", faults="raise")  # entry
                killpoint("inject.entry-stop")
                self._resume(kernel.PTRACE_SYSCALL, 0)
                killpoint("inject.in-call")
                self._wait(kernel.PTRACE_SYSCALL, "syscall", faults="raise")  # exit
                killpoint("inject.exit-stop")
                result = arch.syscall_result(arch.get_regs(tid))
        finally:
            if self._alive():
                with self._translate():
                    self._park()
                    killpoint("inject.parked")
                    if old_word is not None:
                        kernel.ptrace_pokedata(tid, site, old_word)
                        killpoint("inject.unpoked")
                    arch.set_regs(tid, saved)
                    killpoint("inject.regs-restored")
                    kernel.ptrace_setsigmask(tid, mask)
                    if options != self._options:
                        self._set_options(self._options)
                    killpoint("inject.restored")
            if self._guard is not None:
                self._guard.disarm(self.pid, tid)
        assert result is not None  # set unless the block above raised
        self.calls += 1
        log.debug("injected syscall pid=%d tid=%d nr=%d result=%d site=0x%x interrupted_nr=%d took_us=%d",
                  self.pid, tid, nr, result, site, arch.syscall_in_progress(saved),
                  (time.monotonic_ns() - started_ns) // 1000)
        if -4095 <= result < 0:
            err = -result
            raise OSError(err, f"syscall {nr} inside process {self.pid} (thread {tid}) failed: {os.strerror(err)}")
        return result

    @property
    def site(self) -> int:
        """Address of the ``syscall`` instruction used next (the vDSO one unless site="rip")."""
        with self._translate():
            return self._prepare_site(arch.get_regs(self.tid))[0]

    # --- steps ----------------------------------------------------------------------------

    def _held_signal(self) -> int:
        """The signal a signal-delivery-stop holds (0 for an event, group or syscall stop)."""
        try:
            info = kernel.ptrace_getsiginfo(self.tid)
        except OSError as err:
            if err.errno == errno.EINVAL:  # group-stop of a tracee attached without SEIZE
                return 0
            raise
        code = info.si_code
        if code > 0 and code >> 8:  # SIGTRAP | event << 8, or the stop signal | PTRACE_EVENT_STOP << 8
            return 0
        if info.si_signo == signal.SIGTRAP and code == _SYSCALL_STOP_SIG:
            return 0
        return int(info.si_signo)

    def _injection_options(self) -> int:
        options = self._options | kernel.PTRACE_O_TRACESYSGOOD
        if self._seccomp_mode() != _SECCOMP_DISABLED:
            options |= kernel.PTRACE_O_SUSPEND_SECCOMP
        return options

    def _seccomp_mode(self) -> int:
        path = self._proc_root / str(self.pid) / "task" / str(self.tid) / "status"
        for line in path.read_bytes().splitlines():
            if line.startswith(b"Seccomp:"):
                return int(line.split()[1])
        return _SECCOMP_DISABLED  # kernel without CONFIG_SECCOMP

    def _set_options(self, options: int) -> None:
        try:
            kernel.ptrace(kernel.PTRACE_SETOPTIONS, self.tid, 0, options)
        except OSError as err:
            if err.errno == errno.EPERM and options & kernel.PTRACE_O_SUSPEND_SECCOMP:
                raise AccessDenied(self.pid, f"thread {self.tid} of process {self.pid} runs under a seccomp "
                                             "filter; suspending it for the injected call needs "
                                             "CAP_SYS_ADMIN") from err
            raise

    def _prepare_site(self, saved: arch.Regs) -> tuple[int, int | None]:
        """(address of a syscall instruction, original word to restore there or None)."""
        if self._site_mode != "rip":
            if self._vdso_site is None:
                self._vdso_site = self._find_vdso_site()
            if self._vdso_site:
                return self._vdso_site, None
            if self._site_mode == "vdso":
                raise ProcessError(self.pid, f"process {self.pid} has no executable [vdso] with a "
                                             "syscall instruction")
        ip = arch.instruction_pointer(saved)
        return ip, kernel.ptrace_peekdata(self.tid, ip)

    def _find_vdso_site(self) -> int:
        """Address of the first syscall instruction in the target's [vdso], 0 if there is none."""
        for entry in read_maps(self.pid, self._proc_root):
            if entry.path == "[vdso]" and entry.perms[2] == "x":
                fd = os.open(self._proc_root / str(self.pid) / "mem", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    text = os.pread(fd, entry.size_bytes, entry.start)
                finally:
                    os.close(fd)
                offset = text.find(arch.SYSCALL_INSN)
                return entry.start + offset if offset >= 0 else 0
        return 0

    def _wait(self, request: int, want: Literal["event", "syscall"], faults: Literal["raise", "suppress"]) -> None:
        """Wait until the thread reaches a stop of kind ``want``, resuming it past other stops."""
        tid = self.tid
        while True:
            try:
                _, status = os.waitpid(tid, kernel.WALL)
            except ChildProcessError as err:
                self._stop = "gone"
                raise ProcessGone(self.pid, f"thread {tid} of process {self.pid} vanished during an "
                                            "injected syscall") from err
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                self._stop = "gone"
                raise ProcessGone(self.pid, f"thread {tid} of process {self.pid} exited during an injected syscall")
            if not os.WIFSTOPPED(status):
                continue
            event, sig = status >> 16, os.WSTOPSIG(status)
            if event == 0 and sig == _SYSCALL_STOP_SIG:
                self._stop = "syscall"
                if want == "syscall":
                    return
                data = 0
            elif event == kernel.PTRACE_EVENT_STOP:
                # Our interrupt, or a group stop (SIGSTOP) that started meanwhile; the job-control
                # stop stays in effect and the thread re-enters it when the freezer detaches.
                self._stop = "event"
                if want == "event":
                    return
                data = 0
            elif event == 0:
                self._stop = "signal"
                if sig in _FAULT_SIGNALS:
                    if faults == "raise":
                        raise ProcessError(self.pid, f"thread {tid} of process {self.pid} got "
                                                     f"{signal.Signals(sig).name} running an injected syscall")
                    data = 0  # suppressed: it was raised by our instruction, which will not run again
                else:
                    data = sig  # blocked: re-queued; SIGSTOP: starts the group stop
                    log.debug("signal during injection pid=%d tid=%d sig=%d", self.pid, tid, sig)
            else:
                log.debug("unexpected ptrace event during injection pid=%d tid=%d event=%d", self.pid, tid, event)
                data = 0
            self._resume(request, data)

    def _resume(self, request: int, data: int) -> None:
        kernel.ptrace(request, self.tid, 0, data)
        self._stop = "running"

    def _alive(self) -> bool:
        return self._stop != "gone"

    def _park(self) -> None:
        """Bring the thread back into a PTRACE_EVENT_STOP inside get_signal().

        Not needed if it never left its original stop (a failure before the first resume):
        resuming a signal-delivery-stop with 0 here would drop the signal it holds.
        """
        if self._stop in ("original", "event"):
            return
        kernel.ptrace(kernel.PTRACE_INTERRUPT, self.tid, 0, 0)
        if self._stop != "running":  # interrupted while we were waiting for it: it stops by itself
            # From a fault's signal-delivery-stop, data 0 suppresses the fault.
            self._resume(kernel.PTRACE_CONT, 0)
        killpoint("inject.interrupted")
        self._wait(kernel.PTRACE_CONT, "event", faults="suppress")

    @contextlib.contextmanager
    def _translate(self) -> Iterator[None]:
        try:
            with translate_errors(self.pid, self._proc_root):
                yield
        except ProcessGone:
            self._stop = "gone"
            raise


def _patched(word: int) -> int:
    """``word`` with its first bytes (lowest addresses, little-endian) replaced by the instruction."""
    insn = int.from_bytes(arch.SYSCALL_INSN, "little")
    mask = (1 << (8 * len(arch.SYSCALL_INSN))) - 1
    return (word & ~mask) | insn

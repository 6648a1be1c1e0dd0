"""Targets made of several processes: a process tree or a cgroup, and freezing all of it at once.

Some facts behind the choices (Documentation/admin-guide/cgroup-v2.rst "Freezer", man 2 ptrace,
kernel/cgroup/freezer.c, fs/proc/array.c; CRIU criu/seize.c does both):

* ``/proc/PID/task/TID/children`` lists the children a thread forked (CONFIG_PROC_CHILDREN). A
  child is linked to its parent inside ``fork()``, before the parent returns to user mode, so once
  every known process is ptrace-stopped the lists are complete: walking the tree again until it
  shows no new process gives a stable, wholly stopped tree. A process that exits while we walk
  drops out; its children are re-parented to a subreaper or init and leave the tree with it.
* cgroup v2 ``cgroup.freeze``: writing ``1`` freezes every process of the cgroup and of its
  descendants, including ones forked meanwhile (they are born in the frozen cgroup);
  ``cgroup.events`` shows ``frozen 1`` once all of them are stopped, and a change of that file
  wakes ``poll()`` with POLLPRI (kernfs notification). Frozen tasks wait in a trap inside the
  signal path: ptrace may still seize and interrupt them (as CRIU does after freezing), and a
  signal queued while frozen is handled right after thawing, before any user code runs.
* Leaving a cgroup-frozen tree stopped: SIGSTOP is queued to every process while frozen, then the
  cgroup is thawed; each process dequeues SIGSTOP on its way out of the freezer trap and enters
  group-stop (state T) without running user code.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from pagehaul import procfs
from pagehaul.errors import ConfigError, PagehaulError, ProcessGone
from sender.freezer import PtraceFreezer, StopGuard, await_group_stop

log = logging.getLogger(__name__)

CGROUP_FREEZE_TIMEOUT_S: Final = 10.0


@dataclass(frozen=True, slots=True)
class TargetSpec:
    """What to migrate: ``pid`` (with its descendants unless ``children`` is False) or every process
    of the cgroup v2 directory ``cgroup``."""

    pid: int = 0
    cgroup: Path | None = None
    children: bool = True

    def __post_init__(self) -> None:
        if (self.pid > 0) == (self.cgroup is not None):
            raise ConfigError("give either a pid or a cgroup")

    @property
    def single(self) -> bool:
        return self.cgroup is None and not self.children


def discover(spec: TargetSpec) -> list[int]:
    """The processes of the target now, ascending; ProcessGone / ConfigError if there are none."""
    if spec.cgroup is None:
        if not spec.children:
            procfs.read_status(spec.pid)  # ProcessGone with the pid in the message
            return [spec.pid]
        return procfs.process_tree(spec.pid)
    try:
        pids = procfs.cgroup_procs(spec.cgroup)
    except OSError as err:
        raise ConfigError(f"cgroup {spec.cgroup} is not a cgroup v2 directory ({err.strerror})") from err
    if not pids:
        raise ProcessGone(0, f"cgroup {spec.cgroup} has no processes")
    return pids


def check_target(pids: list[int]) -> None:
    """Refuse, with the reason, targets whose freeze would hang pagehaul itself or that have no user
    memory: pagehaul's own process, its ancestors (the shell or tool running it), kernel threads."""
    me = os.getpid()
    mine = set(procfs.ancestors(me))
    # Ancestors first: a tree holding pagehaul itself is rooted at one of them (or at pagehaul).
    for pid in pids:
        if pid in mine:
            raise ConfigError(f"process {pid} is an ancestor of pagehaul (the shell or tool running it): freezing it "
                              "would stop pagehaul's own parent; run pagehaul from outside that tree")
    if me in pids:
        raise ConfigError(f"process {me} is pagehaul itself: give the pid of the process to migrate")
    for pid in pids:
        try:
            kernel_thread = procfs.is_kernel_thread(pid)
        except ProcessGone:
            continue  # exited meanwhile: the freeze says so if it matters
        if kernel_thread:
            raise ConfigError(f"process {pid} ({procfs.read_comm(pid)}) is a kernel thread: it has no user memory "
                              "to migrate")


def resolve_cgroup(path: str) -> Path:
    """A cgroup given as a directory, or as a path inside the cgroup v2 hierarchy (``/a/b``)."""
    candidate = Path(path)
    if (candidate / "cgroup.procs").exists():
        return candidate
    mount = procfs.cgroup2_mount()
    if mount is not None:
        inside = mount / path.lstrip("/")
        if (inside / "cgroup.procs").exists():
            return inside
    raise ConfigError(f"cgroup {path} does not exist (no cgroup.procs there"
                      f"{f' or under {mount}' if mount is not None else ''})")


def own_cgroup(spec: TargetSpec, pids: list[int]) -> Path | None:
    """The cgroup whose processes are exactly ``pids`` (so its freezer freezes exactly the target),
    or None: for a cgroup target its directory; for a tree, its root's cgroup if that holds the
    tree and nothing else. The root cgroup has no ``cgroup.freeze``."""
    if spec.cgroup is not None:
        return spec.cgroup if (spec.cgroup / "cgroup.freeze").exists() else None
    mount = procfs.cgroup2_mount()
    rel = procfs.read_cgroup2(spec.pid)
    if mount is None or not rel or rel == "/":
        return None
    directory = mount / rel.lstrip("/")
    if not (directory / "cgroup.freeze").exists():
        return None
    try:
        members = procfs.cgroup_procs(directory)
    except OSError:
        return None
    return directory if members == pids else None


class TreeFreezer(Protocol):
    @property
    def frozen(self) -> bool: ...

    @property
    def pids(self) -> list[int]:
        """The processes stopped by the last ``freeze()``, ascending."""

    @property
    def freezing_time_us(self) -> int: ...

    @property
    def frozen_time_us(self) -> int: ...

    def freeze(self) -> None: ...

    def stop_group(self) -> None:
        """While frozen: bring every process into group-stop, pending signals delivered first,
        so that the memory read next is what a later dump sees (``sender.freezer`` module doc).
        ``thaw(leave_stopped=True)`` then changes nothing; ``thaw()`` sends SIGCONT. A StopGuard
        continues the tree if the sender dies before the stop is disarmed or undone."""

    def take_stop_guard(self) -> StopGuard | None:
        """After ``thaw(leave_stopped=True)``: the guard of the stop, now the caller's to disarm
        (once the stop is intended for good) or fire (to continue the tree)."""

    def thaw(self, leave_stopped: bool = False) -> None: ...

    def holding(self, pid: int) -> contextlib.AbstractContextManager[PtraceFreezer]:
        """``pid`` stopped by a :class:`PtraceFreezer` (for code injection) for the block."""


class _Timing:
    def __init__(self) -> None:
        self.start_ns = self.frozen_ns = self.thawed_ns = 0
        self.is_frozen = False

    def begin(self) -> None:
        self.start_ns, self.frozen_ns, self.thawed_ns = time.monotonic_ns(), 0, 0

    def done(self) -> None:
        self.frozen_ns = time.monotonic_ns()
        self.is_frozen = True

    def released(self) -> None:
        self.thawed_ns = time.monotonic_ns()
        self.is_frozen = False

    @property
    def freezing_time_us(self) -> int:
        return (self.frozen_ns - self.start_ns) // 1000 if self.frozen_ns else 0

    @property
    def frozen_time_us(self) -> int:
        if not self.frozen_ns:
            return 0
        end = time.monotonic_ns() if self.is_frozen else self.thawed_ns
        return (end - self.frozen_ns) // 1000


class _TimedFreezer:
    """What both tree freezers report about their last freeze (CRIU's freezing_time, frozen_time),
    and the guard of a group-stop they made."""

    _t: _Timing
    _guard: StopGuard | None

    def take_stop_guard(self) -> StopGuard | None:
        guard, self._guard = self._guard, None
        return guard

    @property
    def frozen(self) -> bool:
        return self._t.is_frozen

    @property
    def freezing_time_us(self) -> int:
        return self._t.freezing_time_us

    @property
    def frozen_time_us(self) -> int:
        return self._t.frozen_time_us


class PtraceTreeFreezer(_TimedFreezer):
    """Every thread of every process of the target, stopped with ptrace (one PtraceFreezer per
    process, keeping its signal guarantees); the tree is walked again after each pass until a
    walk finds nothing new (module comment). Use from one OS thread, like PtraceFreezer."""

    def __init__(self, spec: TargetSpec) -> None:
        self.spec = spec
        self._held: dict[int, PtraceFreezer] = {}
        self._t = _Timing()
        self._guard: StopGuard | None = None

    @property
    def pids(self) -> list[int]:
        return sorted(self._held)

    def freeze(self) -> None:
        if self._t.is_frozen:
            raise RuntimeError("the target is already frozen by this freezer")
        self._t.begin()
        try:
            gone: set[int] = set()
            while True:
                new = [pid for pid in discover(self.spec) if pid not in self._held and pid not in gone]
                for pid in new:
                    freezer = PtraceFreezer(pid)
                    try:
                        freezer.freeze()
                    except ProcessGone:
                        if pid == self.spec.pid:
                            raise
                        # Exited meanwhile (a zombie stays listed until its parent, stopped by
                        # now, reaps it): not part of the target any more.
                        gone.add(pid)
                        continue
                    self._held[pid] = freezer
                if not new:
                    break
        except BaseException:
            self._release(leave_stopped=False)
            raise
        if not self._held:
            raise ProcessGone(self.spec.pid, "no process of the target is left to freeze")
        self._t.done()
        log.debug("tree frozen processes=%d freezing_time_us=%d", len(self._held), self.freezing_time_us)

    def stop_group(self) -> None:
        if self._guard is None:
            self._guard = StopGuard(self.pids)
        for pid in sorted(self._held, reverse=True):
            self._held[pid].stop_group()

    def thaw(self, leave_stopped: bool = False) -> None:
        if not self._held:
            return
        try:
            self._release(leave_stopped)
        finally:
            if not leave_stopped:
                _disarm(self.take_stop_guard())
        self._t.released()

    def _release(self, leave_stopped: bool) -> None:
        first: BaseException | None = None
        for pid in sorted(self._held, reverse=True):  # children first, the root last
            try:
                self._held[pid].thaw(leave_stopped=leave_stopped)
            except (OSError, PagehaulError) as err:
                log.warning("thawing pid=%d failed: %s", pid, err)
                if first is None:
                    first = err
        self._held.clear()
        if first is not None:
            raise first

    @contextlib.contextmanager
    def holding(self, pid: int) -> Iterator[PtraceFreezer]:
        held = self._held.get(pid)
        if held is not None and held.frozen:
            yield held
            return
        with PtraceFreezer(pid) as freezer:
            yield freezer


class CgroupFreezer(_TimedFreezer):
    """The cgroup v2 freezer: one write stops the whole cgroup atomically (module comment)."""

    def __init__(self, spec: TargetSpec, directory: Path, timeout_s: float = CGROUP_FREEZE_TIMEOUT_S) -> None:
        self.spec = spec
        self.directory = directory
        self.timeout_s = timeout_s
        self._pids: list[int] = []
        self._t = _Timing()
        self._written = False
        self._group_stopped = False
        self._guard: StopGuard | None = None

    @property
    def pids(self) -> list[int]:
        return list(self._pids)

    def freeze(self) -> None:
        if self._t.is_frozen:
            raise RuntimeError(f"cgroup {self.directory} is already frozen by this freezer")
        self._t.begin()
        self._write_freeze("1")
        try:
            self._await_frozen()
            self._pids = discover(self.spec)
        except BaseException:
            self._write_freeze("0")
            raise
        self._t.done()
        log.debug("cgroup frozen dir=%s processes=%d freezing_time_us=%d", self.directory, len(self._pids),
                  self.freezing_time_us)

    def stop_group(self) -> None:
        """SIGSTOP every process, then lift the cgroup freeze: each thread takes its pending
        signals (handlers set up, no user code run: SIGSTOP is pending too and cannot be
        blocked) and parks in group-stop, where it stays. Memory read afterwards is final."""
        if self._group_stopped:
            return
        self._guard = StopGuard(self._pids)
        for pid in self._pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        self._group_stopped = True
        self._write_freeze("0")
        for pid in self._pids:
            await_group_stop(pid)

    def thaw(self, leave_stopped: bool = False) -> None:
        if not self._written and not self._group_stopped:
            return
        try:
            if leave_stopped:
                self.stop_group()
        finally:
            if self._written:
                self._write_freeze("0")
            if self._group_stopped and not leave_stopped:
                for pid in self._pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGCONT)
                _disarm(self.take_stop_guard())
            self._group_stopped = False
            self._t.released()

    @contextlib.contextmanager
    def holding(self, pid: int) -> Iterator[PtraceFreezer]:
        with PtraceFreezer(pid) as freezer:
            yield freezer

    def _write_freeze(self, value: str) -> None:
        path = self.directory / "cgroup.freeze"
        try:
            path.write_text(value)
        except OSError as err:
            if err.errno == errno.ENOENT:
                raise ProcessGone(0, f"cgroup {self.directory} is gone") from err
            raise
        self._written = value == "1"

    def _await_frozen(self) -> None:
        """Until ``cgroup.events`` says ``frozen 1``: poll() wakes on each change of the file."""
        deadline = time.monotonic() + self.timeout_s
        fd = os.open(self.directory / "cgroup.events", os.O_RDONLY | os.O_CLOEXEC)
        try:
            poller = select.poll()
            poller.register(fd, select.POLLPRI | select.POLLERR)
            while True:
                if b"frozen 1" in os.pread(fd, 4096, 0).splitlines():
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PagehaulError(f"cgroup {self.directory} not frozen within {self.timeout_s:g} s")
                poller.poll(min(left, 0.05) * 1000)
        finally:
            os.close(fd)


def _disarm(guard: StopGuard | None) -> None:
    if guard is not None:
        guard.disarm()


def make_tree_freezer(spec: TargetSpec, pids: list[int], *, use_cgroup: bool = True) -> TreeFreezer:
    """The cgroup freezer when the target is exactly a cgroup (atomic, one write), else ptrace (a
    cgroup target too when ``use_cgroup`` is off or it is the root cgroup)."""
    if use_cgroup and not spec.single:
        directory = own_cgroup(spec, pids)
        if directory is not None:
            log.info("freezing with the cgroup v2 freezer dir=%s", directory)
            return CgroupFreezer(spec, directory)
    if spec.cgroup is not None:
        # The root cgroup has no cgroup.freeze: its processes are seized one by one instead.
        log.info("freezing the processes of cgroup %s with ptrace", spec.cgroup)
    return PtraceTreeFreezer(spec)

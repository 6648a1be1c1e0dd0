"""Auto-converge throttling: slow a process that dirties memory faster than we can send it.

Two ways, picked by :func:`make_throttle`:

* :class:`CgroupCpuThrottle`: the target has a cgroup v2 of its own (only its processes in it)
  with the cpu controller: ``cpu.max`` is set to ``(100 - percent)`` % of one CPU per 100 ms
  period, and restored afterwards. The kernel does the pacing; nothing is visible to the process.
* :class:`SignalThrottle`: otherwise, a SIGSTOP/SIGCONT duty cycle, stopped for ``percent`` of
  every 100 ms period, sent to every process of the target (the tree is walked again each
  period, so children forked meanwhile are throttled too). Side effects a user should know: the
  process's parent sees the stops (``waitpid(WUNTRACED)``), and timers keep running while it is
  stopped. It always leaves the processes continued, and sends SIGCONT only to processes its
  last SIGSTOP reached; if the sender dies during a stopped part, a ``StopGuard`` (told each
  period which processes it is about to stop) continues them.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

from pagehaul.errors import PagehaulError
from sender.freezer import StopGuard

log = logging.getLogger(__name__)

PERIOD_S = 0.100
CPU_MAX_PERIOD_US = 100_000


class Throttle(Protocol):
    @property
    def percent(self) -> int: ...

    def set(self, percent: int) -> None: ...

    def stop(self) -> None: ...


class SignalThrottle:
    def __init__(self, pid: int, period_s: float = PERIOD_S,
                 members: Callable[[], Sequence[int]] | None = None) -> None:
        """Throttle ``pid``, or every process ``members()`` lists (the target's tree or cgroup)."""
        self.pid = pid
        self._members = members
        self._stopped: list[int] = []  # what the last SIGSTOP reached: exactly what SIGCONT continues
        self._period_s = period_s
        self._percent = 0
        self._wake = threading.Event()
        self._quit = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._guard: StopGuard | None = None

    @property
    def percent(self) -> int:
        return self._percent

    def set(self, percent: int) -> None:
        """Throttle to ``percent`` (0 = off). Starts the duty-cycle thread on first use."""
        self._percent = max(0, min(percent, 99))
        if self._percent and self._thread is None:
            self._guard = StopGuard(())
            self._thread = threading.Thread(target=self._run, name=f"throttle-{self.pid}", daemon=True)
            self._thread.start()
        self._wake.set()

    def stop(self) -> None:
        """End throttling; the process is left running (SIGCONT). Idempotent."""
        self._quit = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            self._signal(signal.SIGCONT)  # only if we ever stopped it: never undo someone else's stop
        if self._guard is not None:
            self._guard.disarm()
            self._guard = None

    def _signal(self, sig: signal.Signals) -> bool:
        """SIGSTOP every member (recorded), or SIGCONT those stopped; False once the target is gone."""
        if sig == signal.SIGCONT:
            pids, self._stopped = self._stopped, []
        else:
            try:
                pids = list(self._members()) if self._members is not None else [self.pid]
            except (PagehaulError, OSError):  # ProcessGone: the target is gone
                return False
            if self._guard is not None:
                self._guard.update(pids)
        reached = []
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                continue
            reached.append(pid)
        if sig == signal.SIGSTOP:
            self._stopped = reached
        elif self._guard is not None:
            self._guard.update(())
        return bool(reached)

    def _run(self) -> None:
        while not self._quit:
            pct = self._percent
            if pct == 0:
                self._wake.wait()
                self._wake.clear()
                continue
            stopped_s = self._period_s * pct / 100
            if not self._signal(signal.SIGSTOP):
                return
            # Wait out the stopped part; an update or stop() cuts it short.
            self._wake.wait(stopped_s)
            self._wake.clear()
            if not self._signal(signal.SIGCONT):
                return
            if self._quit:
                return
            self._wake.wait(self._period_s - stopped_s)
            self._wake.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _cgroup2_mount(proc_root: Path) -> Path | None:
    try:
        lines = (proc_root / "self" / "mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        left, _, right = line.partition(" - ")
        if right.split(" ", 1)[0] == "cgroup2":
            return Path(left.split()[4])
    return None


def own_cgroup(pid: int, proc_root: Path = Path("/proc"), mount: Path | None = None,
               members: Sequence[int] | None = None) -> Path | None:
    """The process's cgroup v2 directory if it holds exactly the target (``members``, default
    the process alone) and has the cpu controller; else None."""
    try:
        lines = (proc_root / str(pid) / "cgroup").read_text().splitlines()
    except OSError:
        return None
    rel = next((line[3:] for line in lines if line.startswith("0::")), None)
    mount = mount or _cgroup2_mount(proc_root)
    if rel is None or mount is None or rel in ("", "/"):
        return None
    path = mount / rel.lstrip("/")
    try:
        procs = {int(p) for p in (path / "cgroup.procs").read_text().split()}
        has_cpu = (path / "cpu.max").exists()
    except (OSError, ValueError):
        return None
    return path if has_cpu and procs == set(members if members is not None else [pid]) else None


class CgroupCpuThrottle:
    """Throttle through ``cpu.max`` of the process's own cgroup; restores the old limit."""

    def __init__(self, cgroup: Path) -> None:
        self.cgroup = cgroup
        self._file = cgroup / "cpu.max"
        self._saved = self._file.read_text().strip()
        self._percent = 0

    @property
    def percent(self) -> int:
        return self._percent

    def set(self, percent: int) -> None:
        self._percent = max(0, min(percent, 99))
        if self._percent == 0:
            self._file.write_text(self._saved)
            return
        quota = CPU_MAX_PERIOD_US * (100 - self._percent) // 100
        self._file.write_text(f"{quota} {CPU_MAX_PERIOD_US}")
        log.info("throttle: %s cpu.max = %d %d", self.cgroup, quota, CPU_MAX_PERIOD_US)

    def stop(self) -> None:
        if self._percent:
            self._percent = 0
            try:
                self._file.write_text(self._saved)
            except OSError as err:  # the cgroup went away with the process
                log.debug("could not restore %s: %s", self._file, err)


def make_throttle(pid: int, proc_root: Path = Path("/proc"),
                  members: Callable[[], Sequence[int]] | None = None) -> Throttle:
    """cpu.max of the target's own cgroup where it has one, else signals to every member."""
    cgroup = own_cgroup(pid, proc_root, members=members() if members is not None else None)
    if cgroup is not None:
        return CgroupCpuThrottle(cgroup)
    return SignalThrottle(pid, members=members)

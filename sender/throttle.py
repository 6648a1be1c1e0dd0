"""Auto-converge throttling: slow a process that dirties memory faster than we can send it.

With no cgroup of its own to cap (cgroup v2 ``cpu.max``), the process is throttled with a
SIGSTOP/SIGCONT duty cycle: stopped for ``percent`` of every 100 ms period. Side effects a user
should know: the process's parent sees the stops (``waitpid(WUNTRACED)``), and timers keep
running while it is stopped. The throttle always leaves the process continued when it stops.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import TracebackType
from typing import Self

log = logging.getLogger(__name__)

PERIOD_S = 0.100


class SignalThrottle:
    def __init__(self, pid: int, period_s: float = PERIOD_S) -> None:
        self.pid = pid
        self._period_s = period_s
        self._percent = 0
        self._wake = threading.Event()
        self._quit = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def percent(self) -> int:
        return self._percent

    def set(self, percent: int) -> None:
        """Throttle to ``percent`` (0 = off). Starts the duty-cycle thread on first use."""
        self._percent = max(0, min(percent, 99))
        if self._percent and self._thread is None:
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

    def _signal(self, sig: signal.Signals) -> bool:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            return False
        return True

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

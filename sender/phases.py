"""The phases of a migration, the transitions allowed between them, and when each began.

    PRECOPY -> FROZEN -> COMMITTED                                    pagehaul send
                         COMMITTED -> CRIU_DUMP -> SHIPPING -> RESTORING -> RUNNING
                                                                  RESTORING -> POSTCOPY -> RUNNING

* ``PRECOPY``: live rounds while the target runs (skipped without a dirty tracker);
* ``FROZEN``: the target is frozen, the final round sends what changed;
* ``COMMITTED``: the receiver made the final round durable: every page is there. The end of
  ``pagehaul send`` (the source is left stopped or resumed);
* ``CRIU_DUMP``: CRIU dumps the stopped tree locally, and its dump is reduced to what the
  receiver does not hold (``sender.reduce``);
* ``SHIPPING``: those images travel to the receiver;
* ``RESTORING``: the receiver assembles the images and runs ``criu restore``;
* ``RUNNING``: the tree runs on the destination; the source is killed;
* ``POSTCOPY``: reserved for a tree that runs on the destination while the source still
  answers its page requests; nothing enters it yet;
* ``FAILED``: from any phase but the last; the source keeps running where it was.

``Phases`` is owned by whoever runs the migration (``sender.precopy.send``, continued by
``sender.migrate.migrate``); it refuses a transition the table does not allow, and sets the
sender's phase metric.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum

from pagehaul.metrics import SenderMetrics

log = logging.getLogger(__name__)


class Phase(StrEnum):
    PRECOPY = "precopy"
    FROZEN = "frozen"
    COMMITTED = "committed"
    CRIU_DUMP = "criu-dump"
    SHIPPING = "shipping"
    RESTORING = "restoring"
    POSTCOPY = "postcopy"
    RUNNING = "running"
    FAILED = "failed"


# Where each phase may go next (None: before the first phase); FAILED may follow any phase
# that is not FINAL.
NEXT: dict[Phase | None, frozenset[Phase]] = {
    None: frozenset({Phase.PRECOPY, Phase.FROZEN}),
    Phase.PRECOPY: frozenset({Phase.FROZEN}),
    Phase.FROZEN: frozenset({Phase.COMMITTED}),
    Phase.COMMITTED: frozenset({Phase.CRIU_DUMP}),
    Phase.CRIU_DUMP: frozenset({Phase.SHIPPING}),
    Phase.SHIPPING: frozenset({Phase.RESTORING}),
    Phase.RESTORING: frozenset({Phase.RUNNING, Phase.POSTCOPY}),
    Phase.POSTCOPY: frozenset({Phase.RUNNING}),
    Phase.RUNNING: frozenset(),
    Phase.FAILED: frozenset(),
}
FINAL = frozenset({Phase.RUNNING, Phase.FAILED})


class PhaseError(RuntimeError):
    """A transition the table does not allow: a bug in the orchestration, not in the input."""


@dataclass(frozen=True, slots=True)
class PhaseTime:
    """One phase of the migration: when it began and how long it lasted (µs, from the start of
    the first phase; the current phase lasts until now, a final one has no duration)."""

    phase: Phase
    start_us: int
    duration_us: int


class Phases:
    """The phase a migration is in, and the history of the phases it went through."""

    def __init__(self, metrics: SenderMetrics | None = None, clock_ns: Callable[[], int] = time.monotonic_ns) -> None:
        self._metrics = metrics
        self._clock_ns = clock_ns
        self._entered: list[tuple[Phase, int]] = []

    @property
    def current(self) -> Phase | None:
        return self._entered[-1][0] if self._entered else None

    def enter(self, phase: Phase) -> int:
        """Go to ``phase``; returns when (``clock_ns``)."""
        if phase not in NEXT[self.current] and not (phase is Phase.FAILED and self.current not in FINAL):
            raise PhaseError(f"no transition from {self.current} to {phase}")
        now = self._clock_ns()
        previous = self.current
        self._entered.append((phase, now))
        log.debug("phase %s -> %s", previous, phase)
        if self._metrics is not None:
            if previous is not None:
                self._metrics.phase.labels(previous.value).set(0)
            self._metrics.phase.labels(phase.value).set(1)
        return now

    def fail(self) -> None:
        """The migration failed in the current phase (nothing to do once it is in a final phase)."""
        if self.current not in FINAL:
            self.enter(Phase.FAILED)

    @contextlib.contextmanager
    def failing(self) -> Iterator[None]:
        """Any exception out of the block fails the migration."""
        try:
            yield
        except BaseException:
            self.fail()
            raise

    def entered_ns(self, phase: Phase) -> int:
        """When ``phase`` began (``clock_ns``); KeyError if it never did."""
        for p, at in self._entered:
            if p is phase:
                return at
        raise KeyError(phase)

    def history(self) -> list[PhaseTime]:
        """Every phase entered, in order."""
        if not self._entered:
            return []
        t0 = self._entered[0][1]
        ends = [at for _, at in self._entered[1:]] + [self._clock_ns()]
        return [PhaseTime(p, (at - t0) // 1000, 0 if p in FINAL else (end - at) // 1000)
                for (p, at), end in zip(self._entered, ends, strict=True)]


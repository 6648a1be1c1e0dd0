"""sender.phases: the transitions allowed, FAILED from any phase but the last, the history."""

from __future__ import annotations

import pytest

from pagehaul.metrics import SenderMetrics
from sender.phases import NEXT, Phase, PhaseError, Phases, PhaseTime


class Clock:
    def __init__(self) -> None:
        self.ns = 0

    def __call__(self) -> int:
        return self.ns


def test_full_migration_goes_through_every_phase_in_order() -> None:
    clock = Clock()
    phases = Phases(clock_ns=clock)
    order = [Phase.PRECOPY, Phase.FROZEN, Phase.COMMITTED, Phase.CRIU_DUMP, Phase.SHIPPING, Phase.RESTORING,
             Phase.RUNNING]
    for i, phase in enumerate(order):
        clock.ns = i * 1_000_000
        assert phases.enter(phase) == clock.ns
    clock.ns = 99_000_000
    assert phases.current is Phase.RUNNING
    assert phases.entered_ns(Phase.FROZEN) == 1_000_000
    # each phase lasted 1 ms; the final one has no duration
    assert phases.history() == [PhaseTime(p, i * 1000, 0 if p is Phase.RUNNING else 1000)
                                for i, p in enumerate(order)]


def test_without_precopy_the_first_phase_is_frozen() -> None:
    phases = Phases()
    phases.enter(Phase.FROZEN)
    phases.enter(Phase.COMMITTED)
    assert [t.phase for t in phases.history()] == [Phase.FROZEN, Phase.COMMITTED]


@pytest.mark.parametrize(("before", "after"), [
    ([], Phase.COMMITTED),
    ([Phase.PRECOPY], Phase.COMMITTED),  # never committed without the final round
    ([Phase.PRECOPY, Phase.FROZEN], Phase.PRECOPY),
    ([Phase.FROZEN, Phase.COMMITTED], Phase.RUNNING),  # not running before CRIU's part
    ([Phase.FROZEN, Phase.FAILED], Phase.COMMITTED),
])
def test_transitions_outside_the_table_are_refused(before: list[Phase], after: Phase) -> None:
    phases = Phases()
    for p in before:
        phases.enter(p)
    with pytest.raises(PhaseError):
        phases.enter(after)
    assert phases.current is (before[-1] if before else None)


@pytest.mark.parametrize("phase", [p for p in Phase if p not in (Phase.RUNNING, Phase.FAILED)])
def test_every_phase_but_the_final_ones_can_fail(phase: Phase) -> None:
    phases = Phases()
    path: list[Phase] = []
    while phase not in path:  # a path to ``phase`` through the table
        here = path[-1] if path else None
        options = NEXT[here]
        path.append(phase if phase in options else sorted(options - {Phase.POSTCOPY})[0])
    for p in path:
        phases.enter(p)
    with pytest.raises(RuntimeError, match="boom"), phases.failing():
        raise RuntimeError("boom")
    assert phases.current is Phase.FAILED


def test_failing_after_running_or_failed_changes_nothing() -> None:
    phases = Phases()
    phases.fail()  # before the first phase
    phases.fail()
    assert [t.phase for t in phases.history()] == [Phase.FAILED]
    done = Phases()
    for p in (Phase.FROZEN, Phase.COMMITTED, Phase.CRIU_DUMP, Phase.SHIPPING, Phase.RESTORING, Phase.RUNNING):
        done.enter(p)
    done.fail()
    assert done.current is Phase.RUNNING


def test_metric_marks_the_current_phase() -> None:
    metrics = SenderMetrics()
    phases = Phases(metrics)
    phases.enter(Phase.PRECOPY)
    phases.enter(Phase.FROZEN)

    def value(phase: Phase) -> float | None:
        return metrics.registry.get_sample_value("pagehaul_sender_phase", {"phase": phase.value})

    assert value(Phase.PRECOPY) == 0
    assert value(Phase.FROZEN) == 1

"""Convergence decisions: each rule fires on its own inputs, in the documented order."""

from __future__ import annotations

import pytest

from sender.policy import ConvergenceLimits, ConvergencePolicy, RoundObservation

PAGE = 4096
# 100 MB/s: 1000 pages of 4 KiB in 40.96 ms
SENT, SECONDS = 25_000, 1.024


def obs(round_no: int, next_dirty: int, sent: int = SENT, seconds: float = SECONDS) -> RoundObservation:
    return RoundObservation(round=round_no, pages_sent=sent, seconds=seconds, next_dirty_pages=next_dirty)


def test_downtime_target_reached_converges() -> None:
    policy = ConvergencePolicy(ConvergenceLimits(downtime_target_s=0.3), PAGE)
    d = policy.decide(obs(0, next_dirty=7000))  # 7000 pages at 100 MB/s = 287 ms
    assert d.stop
    assert d.converged
    assert "estimated downtime 287 ms <= target 300 ms" in d.reason
    assert d.estimated_downtime_s == pytest.approx(7000 * PAGE / (SENT * PAGE / SECONDS))


def test_small_dirty_set_converges_even_when_slow() -> None:
    policy = ConvergencePolicy(ConvergenceLimits(downtime_target_s=0.0001), PAGE)
    d = policy.decide(obs(0, next_dirty=64))
    assert d.stop
    assert d.converged
    assert "small dirty set" in d.reason


def test_another_round_while_shrinking() -> None:
    policy = ConvergencePolicy(ConvergenceLimits(downtime_target_s=0.01), PAGE)
    assert not policy.decide(obs(0, next_dirty=20_000)).stop
    d = policy.decide(obs(1, next_dirty=10_000))
    assert not d.stop
    assert "another round" in d.reason


def test_growth_over_ten_percent_stops_unconverged() -> None:
    policy = ConvergencePolicy(ConvergenceLimits(downtime_target_s=0.01), PAGE)
    policy.decide(obs(0, next_dirty=10_000))
    assert not policy.decide(obs(1, next_dirty=11_000)).stop  # exactly 10 %: allowed
    d = policy.decide(obs(2, next_dirty=12_200))  # 10.9 %
    assert d.stop
    assert not d.converged
    assert "grows 11% > 10%" in d.reason


def test_round_limit_stops_unconverged() -> None:
    policy = ConvergencePolicy(ConvergenceLimits(downtime_target_s=0.01, max_rounds=3), PAGE)
    assert not policy.decide(obs(0, 9000)).stop
    assert not policy.decide(obs(1, 8000)).stop
    d = policy.decide(obs(2, 7000))
    assert d.stop
    assert not d.converged
    assert "reached 3 live rounds" in d.reason


def test_auto_converge_throttles_after_two_hot_rounds() -> None:
    policy = ConvergencePolicy(ConvergenceLimits(downtime_target_s=0.001, max_grow_percent=1000), PAGE,
                               auto_converge=True)
    policy.decide(obs(0, 20_000))  # round 0 sends everything: never a throttle signal
    assert policy.throttle_percent == 0
    policy.decide(obs(1, 15_000, sent=20_000))  # dirtied 75 % of what was sent: hot once
    assert policy.throttle_percent == 0
    d = policy.decide(obs(2, 14_000, sent=15_000))  # hot twice: start at 20 %
    assert policy.throttle_percent == 20
    assert d.throttle_percent == 20
    policy.decide(obs(3, 13_000, sent=14_000))
    assert policy.throttle_percent == 30
    policy.decide(obs(4, 100, sent=13_000))  # cooled down: stays
    assert policy.throttle_percent == 30


def test_throttle_off_without_auto_converge() -> None:
    policy = ConvergencePolicy(ConvergenceLimits(downtime_target_s=0.001, max_grow_percent=1000), PAGE)
    for i in range(4):
        policy.decide(obs(i, 20_000, sent=20_000))
    assert policy.throttle_percent == 0


def _never_converging(policy: ConvergencePolicy, rounds: int) -> list[tuple[bool, bool, int]]:
    """(stop, abort, throttle %) after each of ``rounds`` rounds whose dirty set stays flat and large."""
    out = []
    for r in range(rounds):
        d = policy.decide(obs(r, next_dirty=20_000))
        out.append((d.stop, d.abort, d.throttle_percent))
        if d.stop:
            break
    return out


def test_no_convergence_freezes_anyway_by_default() -> None:
    policy = ConvergencePolicy(ConvergenceLimits(downtime_target_s=0.01, max_rounds=3), PAGE)
    assert _never_converging(policy, 10) == [(False, False, 0), (False, False, 0), (True, False, 0)]
    assert "freezing anyway" in policy.history[-1].reason
    assert not policy.history[-1].converged


def test_no_convergence_abort_stops_without_freezing() -> None:
    policy = ConvergencePolicy(ConvergenceLimits(downtime_target_s=0.01, max_rounds=2), PAGE,
                               on_no_convergence="abort")
    assert _never_converging(policy, 10) == [(False, False, 0), (True, True, 0)]
    assert "source left running" in policy.history[-1].reason


def test_no_convergence_throttle_raises_the_throttle_until_its_maximum_then_freezes() -> None:
    lim = ConvergenceLimits(downtime_target_s=0.01, max_rounds=2, throttle_initial_percent=20,
                            throttle_increment_percent=30, throttle_max_percent=90)
    policy = ConvergencePolicy(lim, PAGE, on_no_convergence="throttle")
    steps = _never_converging(policy, 20)
    assert steps == [(False, False, 0), (False, False, 20), (False, False, 50), (False, False, 80),
                     (False, False, 90), (True, False, 90)]
    assert "throttled to 90% already: freezing" in policy.history[-1].reason


def test_no_convergence_throttle_stops_as_soon_as_it_converges() -> None:
    policy = ConvergencePolicy(ConvergenceLimits(downtime_target_s=0.01, max_rounds=2), PAGE,
                               on_no_convergence="throttle")
    policy.decide(obs(0, next_dirty=20_000))
    assert policy.decide(obs(1, next_dirty=20_000)).throttle_percent == 20
    d = policy.decide(obs(2, next_dirty=50))
    assert (d.stop, d.converged) == (True, True)

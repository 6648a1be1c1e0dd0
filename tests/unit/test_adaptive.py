"""Adaptive compression follows the bottleneck; the CLI parses rates like tc."""

from __future__ import annotations

import argparse
from collections import Counter

import pytest

from cli.main import _rate
from sender.adaptive import LADDER, AdaptiveLevel


class Pipeline:
    """A sender whose pace (seconds per batch) depends only on the level, fed to the controller."""

    def __init__(self, ctrl: AdaptiveLevel, pace_ms: dict[int | None, float]) -> None:
        self.ctrl, self.pace_ms, self.now = ctrl, pace_ms, 0.0
        self.batches: Counter[int | None] = Counter()

    def run(self, batches: int, *, worker_s: float = 0.0, send_s: float = 0.0) -> None:
        for _ in range(batches):
            level = self.ctrl.level
            self.batches[level] += 1
            self.now += self.pace_ms[level] / 1e3
            self.ctrl.observe(worker_s, send_s, now=self.now)


# Measured shapes (bench_round0 / bench_shaped): on loopback every step towards no compression is
# faster; on a 1 Gbit/s link the wire decides and zstd 1 is as good as it gets.
LOOPBACK = {None: 4.0, -5: 5.0, -1: 5.3, 1: 6.0, 3: 8.5}
SLOW_LINK = {None: 27.0, -5: 18.0, -1: 16.5, 1: 14.0, 3: 13.9}


def mostly(pipe: Pipeline, batches: int, **waits: float) -> int | None:
    """Run ``batches`` more and return the level most of them went at."""
    before = Counter(pipe.batches)
    pipe.run(batches, **waits)
    (level, _), = (pipe.batches - before).most_common(1)
    return level


def test_loopback_ends_without_compression_even_when_the_loop_waits_for_the_link() -> None:
    # Receiver backpressure looks like a slow link; the pace says otherwise.
    pipe = Pipeline(AdaptiveLevel(start=1), LOOPBACK)
    pipe.run(128, worker_s=0.001, send_s=0.010)
    assert mostly(pipe, 128, worker_s=0.001, send_s=0.010) is None
    assert pipe.batches[None] > 256 // 2


# Measured on loopback (bench_round0, --zstd-level auto with -v -v): the levels next to zstd 1 are
# slower than it (more bytes for the same receiver), yet no compression is faster than all of them:
# a climb one step at a time stays at 1.
LOOPBACK_HUMP = {None: 4.4, -5: 7.0, -1: 6.9, 1: 6.1, 3: 9.0}


@pytest.mark.parametrize("start", [1, 3, -1])
def test_link_faster_than_compression_ends_without_it(start: int) -> None:
    pipe = Pipeline(AdaptiveLevel(start=start), LOOPBACK_HUMP)
    pipe.run(64, worker_s=0.001, send_s=0.010)  # the loop waits for the link, as on loopback
    assert mostly(pipe, 192, worker_s=0.001, send_s=0.010) is None
    assert pipe.ctrl.level is None


def test_compression_must_clearly_beat_none_to_be_taken_up() -> None:
    pipe = Pipeline(AdaptiveLevel(start=None), {None: 5.0, -5: 4.5, -1: 4.4, 1: 4.3, 3: 4.6})
    assert mostly(pipe, 256, send_s=0.010) is None


def test_no_compression_is_probed_first_and_once_until_a_recheck() -> None:
    pipe = Pipeline(AdaptiveLevel(start=1), SLOW_LINK)
    pipe.run(24)
    assert pipe.batches[None] > 0  # the first probe
    assert mostly(pipe, 232) == 1
    assert pipe.batches[None] <= 4 * (pipe.ctrl.window + pipe.ctrl.settle)  # a probe now and then, ever rarer


def test_slow_link_keeps_compressing() -> None:
    pipe = Pipeline(AdaptiveLevel(start=1), SLOW_LINK)
    assert mostly(pipe, 256, worker_s=0.001, send_s=0.010) == 1
    assert pipe.batches[1] + pipe.batches[3] > 256 * 3 // 4


def test_starting_without_compression_on_a_slow_link_climbs() -> None:
    pipe = Pipeline(AdaptiveLevel(start=None), SLOW_LINK)
    pipe.run(128, send_s=0.010)
    assert mostly(pipe, 128, send_s=0.010) == 1


def test_follows_a_change_of_link() -> None:
    pipe = Pipeline(AdaptiveLevel(start=1), LOOPBACK)
    assert mostly(pipe, 256) is None
    pipe.pace_ms = SLOW_LINK
    pipe.run(400)
    assert mostly(pipe, 200) == 1


def test_equal_levels_stay_put() -> None:
    pipe = Pipeline(AdaptiveLevel(start=1), dict.fromkeys(LADDER, 5.0))
    assert mostly(pipe, 400) == 1


def test_a_pause_between_rounds_does_not_count() -> None:
    ctrl = AdaptiveLevel(start=1, window=4)
    t = 0.0
    for i in range(12):
        t += 0.005 + (1.0 if i == 6 else 0.0)  # one long gap: a scan between rounds
        ctrl.observe(0.0, 0.0, now=t)
    assert ctrl.changes == 1  # the first window made a probe, the long gap did not end it early


@pytest.mark.parametrize(("text", "bps"), [("125M", 125e6), ("1gbit", 125e6), ("800mbit", 1e8), ("50k", 5e4),
                                           ("1000", 1000.0), ("2.5G", 2.5e9)])
def test_rates(text: str, bps: float) -> None:
    assert _rate(text) == pytest.approx(bps)


@pytest.mark.parametrize("text", ["fast", "10q", "-5M", "0"])
def test_bad_rates(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        _rate(text)

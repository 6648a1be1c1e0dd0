"""Adaptive compression follows the bottleneck; the CLI parses rates like tc."""

from __future__ import annotations

import argparse

import pytest

from pagehaul.cli import _rate
from sender.adaptive import LADDER, AdaptiveLevel


def feed(ctrl: AdaptiveLevel, worker_s: float, send_s: float, batches: int) -> None:
    for _ in range(batches):
        ctrl.observe(worker_s, send_s)


def test_compression_bound_steps_down_to_off() -> None:
    ctrl = AdaptiveLevel(start=1, window=4)
    feed(ctrl, worker_s=0.010, send_s=0.001, batches=4)
    assert ctrl.level == -1
    feed(ctrl, 0.010, 0.001, 8)
    assert ctrl.level is None
    feed(ctrl, 0.010, 0.001, 8)  # stays at the bottom
    assert ctrl.level is None
    assert ctrl.changes == 3


def test_link_bound_steps_up_to_the_top() -> None:
    ctrl = AdaptiveLevel(start=-1, window=4)
    feed(ctrl, worker_s=0.001, send_s=0.010, batches=16)
    assert ctrl.level == LADDER[-1] == 3


def test_balanced_stays() -> None:
    ctrl = AdaptiveLevel(start=1, window=4)
    feed(ctrl, 0.005, 0.006, 40)
    assert ctrl.level == 1
    assert ctrl.changes == 0


@pytest.mark.parametrize(("text", "bps"), [("125M", 125e6), ("1gbit", 125e6), ("800mbit", 1e8), ("50k", 5e4),
                                           ("1000", 1000.0), ("2.5G", 2.5e9)])
def test_rates(text: str, bps: float) -> None:
    assert _rate(text) == pytest.approx(bps)


@pytest.mark.parametrize("text", ["fast", "10q", "-5M", "0"])
def test_bad_rates(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        _rate(text)

"""Round planning: which present pages are data, parent holes or zero holes."""

from __future__ import annotations

import numpy as np

from pagehaul.runs import Runs
from sender.rounds import Held, held_after, plan_round

PS = 4096


def pages(*idx: int) -> Runs:
    return Runs.from_page_addrs(np.array([0x10000 + i * PS for i in idx], np.uint64), PS)


def test_round_zero_sends_everything() -> None:
    present = pages(0, 1, 2, 9)
    plan = plan_round(present, None, None, PS)
    assert plan.data.pairs() == present.pairs()
    assert len(plan.parent) == 0
    assert len(plan.zero) == 0


def test_clean_pages_become_parent_or_zero_holes() -> None:
    # Previous round: 0-3 data, 4 zero; 5 was never sent (unreadable then).
    held = held_after(pages(0, 1, 2, 3), Runs.empty(), pages(4), PS)
    present = pages(0, 1, 2, 3, 4, 5, 6)  # 6 is new and dirty
    dirty = pages(1, 6, 20)  # 20 is dirty but no longer present
    plan = plan_round(present, dirty, held, PS)
    assert plan.data.pairs() == pages(1, 5, 6).pairs()
    assert plan.parent.pairs() == pages(0, 2, 3).pairs()
    assert plan.zero.pairs() == pages(4).pairs()
    assert plan.dirty_pages == 2


def test_held_after_chains_parent_cover() -> None:
    held = held_after(pages(1), pages(0, 2), pages(7), PS)
    assert np.array_equal(held.cover, pages(0, 1, 2).page_addrs(PS))
    assert np.array_equal(held.zero, pages(7).page_addrs(PS))
    assert len(Held.nothing().cover) == 0


def test_pages_gone_are_left_out() -> None:
    held = held_after(pages(0, 1, 2), Runs.empty(), Runs.empty(), PS)
    plan = plan_round(pages(0), Runs.empty(), held, PS)
    assert plan.parent.pairs() == pages(0).pairs()
    assert plan.data.total_pages == 0

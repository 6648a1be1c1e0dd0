"""Adaptive compression: pick the zstd level that moves memory fastest, by trying its neighbours.

Which side the sender's event loop waits for does not say whether compression pays. On loopback
on a 2-core machine the loop mostly waits for the network, but the network is the receiver,
which decompresses: compressing harder makes it slower still, so a rule such as "the link waits,
compress more" keeps compressing where turning compression off is faster. So the controller
measures what it optimises: the pace of the pipeline, seconds per batch (batches are a fixed
number of pages of memory, whatever compresses to what), and hill-climbs the ladder:

* settled at a compressing level, it first probes no compression, once until the next recheck:
  that is a regime of its own (no compressing here, no decompressing on the receiver), and the
  neighbours of a level say nothing about it: on loopback the levels next to zstd 1 can both be
  slower than 1 while no compression is faster than all; a link faster than compression ends
  there. Compression is taken up again from there only when it is ``climb_gain`` faster;
* settled at a level, it measures ``window`` batches, then probes one neighbour (towards the
  side the loop waited for less: cheaper compression when it waited for the workers, more
  compression when it waited for the link) for ``window`` batches;
* a probe that beats the settled pace by ``gain`` is kept and the climb goes on in that
  direction; otherwise it returns, tries the other neighbour, and after both failed waits
  ``recheck`` windows before probing again (links and contents change), twice as long after
  every further failure at the same level (at most 8x): a probe costs a window at a worse level.

After every change the next ``settle`` batches are not measured: they were encoded at the old
level (``sender.pipeline`` keeps workers x depth batches in flight). A window's pace is its mean gap
between batches without the longest one, so a pause between rounds (scan, plan) does not count;
not the median: batches finish in pairs (two workers), so the median of such gaps swings from
window to window at one level. ``bench_round0`` and ``bench_shaped`` (``--zstd-level auto``)
show where it settles on loopback and on a shaped link.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# None = no compression. Level 3 is the top: on mixed memory the levels above it cost much
# throughput for a ratio barely better (bench_stages compares them).
LADDER: tuple[int | None, ...] = (None, -5, -1, 1, 3)


@dataclass(slots=True)
class AdaptiveLevel:
    start: int | None = 1
    window: int = 8
    # Wait ratio for the direction hint (which neighbour to probe first).
    margin: float = 2.0
    # Batches after a change that were encoded at the old level (workers x depth in sender.pipeline).
    settle: int = 4
    # A probed level must be this much faster (seconds per batch) to be kept.
    gain: float = 1.03
    # Compression must beat no compression by this much to be taken up from it: it costs CPU on
    # both ends, and on a shared machine paces drift by more than 3 % between two windows.
    climb_gain: float = 1.25
    # Windows to stay at a level whose two neighbours both lost, before probing again.
    recheck: int = 4
    _index: int = field(init=False, default=0)
    _worker_wait_s: float = field(init=False, default=0.0)
    _send_wait_s: float = field(init=False, default=0.0)
    _gaps: list[float] = field(init=False, default_factory=list)
    _last_t: float | None = field(init=False, default=None)
    _skip: int = field(init=False, default=0)
    _windows_here: int = field(init=False, default=0)
    _wait_windows: int = field(init=False, default=1)
    _probe_from: int | None = field(init=False, default=None)
    _probe_dir: int = field(init=False, default=0)
    _base_pace_s: float = field(init=False, default=0.0)
    _rejected: set[int] = field(init=False, default_factory=set)
    _backoff: int = field(init=False, default=0)
    # No compression was probed from this level since the last recheck.
    _off_tried: bool = field(init=False, default=False)
    _probe_jump: bool = field(init=False, default=False)
    changes: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self._index = LADDER.index(self.start) if self.start in LADDER else LADDER.index(1)
        self._backoff = self.recheck

    @property
    def level(self) -> int | None:
        return LADDER[self._index]

    def observe(self, worker_wait_s: float, send_wait_s: float, *, now: float | None = None) -> None:
        """One batch emitted: how long the loop waited for its encoding, and for the network to take it.

        ``now`` (monotonic seconds) is for tests; by default the clock is read here.
        """
        t = time.monotonic() if now is None else now
        last, self._last_t = self._last_t, t
        if last is None:
            return
        if self._skip:
            self._skip -= 1
            return
        self._gaps.append(t - last)
        self._worker_wait_s += worker_wait_s
        self._send_wait_s += send_wait_s
        if len(self._gaps) < self.window:
            return
        pace = (sum(self._gaps) - max(self._gaps)) / (len(self._gaps) - 1)
        w, n = self._worker_wait_s, self._send_wait_s
        self._gaps.clear()
        self._worker_wait_s = self._send_wait_s = 0.0
        hint = -1 if w > self.margin * n else (1 if n > self.margin * w else 0)
        self._decide(pace, hint, w, n)

    def _decide(self, pace: float, hint: int, worker_wait_s: float, send_wait_s: float) -> None:
        if self._probe_from is not None:
            self._end_probe(pace, hint)
            return
        self._windows_here += 1
        if self._windows_here < self._wait_windows:
            return
        if self._direction(hint) == 0:  # waited long enough: contents or the link may have changed
            self._rejected.clear()
            self._off_tried = False
        if self._index > 0 and not self._off_tried:
            # No compression first, from any level: it is a regime of its own (nothing to compress
            # on this side, nothing to decompress on the receiver), which the neighbours of a level
            # say nothing about. On a link faster than compression it wins outright.
            self._off_tried = self._probe_jump = True
            self._probe_from, self._probe_dir, self._base_pace_s = self._index, -1, pace
            self._move(0, f"probing no compression; {pace * 1e3:.2f} ms per batch here, waited "
                          f"{worker_wait_s * 1e3:.1f} ms for workers, {send_wait_s * 1e3:.1f} ms for the link")
            return
        direction = self._direction(hint)
        if direction == 0:
            return
        self._probe_from, self._probe_dir, self._base_pace_s = self._index, direction, pace
        self._move(self._index + direction, f"probing; {pace * 1e3:.2f} ms per batch here, waited "
                                            f"{worker_wait_s * 1e3:.1f} ms for workers, {send_wait_s * 1e3:.1f} ms "
                                            "for the link")

    def _end_probe(self, pace: float, hint: int) -> None:
        assert self._probe_from is not None
        origin, direction, jump = self._probe_from, self._probe_dir, self._probe_jump
        self._probe_from, self._probe_jump = None, False
        self._windows_here = 0
        gain = self.climb_gain if LADDER[origin] is None else self.gain
        if pace * gain < self._base_pace_s:  # faster: keep it, and try further that way
            self._rejected = {-direction}
            self._backoff = self.recheck
            self._wait_windows = 1 if self._direction(direction) == direction else self._backoff
            if LADDER[origin] is None:  # climbed from no compression: known to be slower
                self._off_tried = True
            log.info("adaptive compression: keeping level %s (%.2f ms per batch, %.2f at %s)",
                     self.level, pace * 1e3, self._base_pace_s * 1e3, LADDER[origin])
            return
        self._move(origin, f"{pace * 1e3:.2f} ms per batch at {LADDER[self._index]}, "
                           f"{self._base_pace_s * 1e3:.2f} here")
        if jump:  # only the far end lost: the neighbours are still to be tried
            self._wait_windows = 1
            return
        self._rejected.add(direction)
        if self._direction(hint) == 0:  # nothing left to try here: stay, and look again later
            self._wait_windows = self._backoff
            self._backoff = min(self._backoff * 2, self.recheck * 8)
        else:
            self._wait_windows = 1

    def _direction(self, hint: int) -> int:
        """The neighbour to probe: the hinted side first, never a side rejected here or off the ladder."""
        first = hint or -1
        for d in (first, -first):
            if d not in self._rejected and 0 <= self._index + d < len(LADDER):
                return d
        return 0

    def _move(self, index: int, why: str) -> None:
        old, self._index = self._index, index
        self._skip = self.settle
        self._last_t = None
        self.changes += 1
        log.info("adaptive compression: level %s -> %s (%s)", LADDER[old], LADDER[index], why)

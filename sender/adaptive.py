"""Adaptive compression: pick the zstd level by which side of the pipeline is waiting.

The sender's event loop waits either for workers (read + compress: compression is the
bottleneck) or for the network (``write`` blocks on gRPC flow control: the link is). Every
``window`` batches the level moves one step down the ladder when workers were the wait by a
clear margin, and one step up when the network was. On loopback that ends at low levels or no
compression (perf-limits: zstd 1 costs ~2.6 core-s/GB, the wire is not the limit); on a slow link
it climbs, trading CPU for bytes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# None = no compression. Level 3 costs ~40 % throughput for ~5 % ratio (perf-limits §4): the top.
LADDER: tuple[int | None, ...] = (None, -5, -1, 1, 3)


@dataclass(slots=True)
class AdaptiveLevel:
    start: int | None = 1
    window: int = 8
    margin: float = 2.0
    _index: int = field(init=False, default=0)
    _worker_wait_s: float = field(init=False, default=0.0)
    _send_wait_s: float = field(init=False, default=0.0)
    _count: int = field(init=False, default=0)
    changes: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self._index = LADDER.index(self.start) if self.start in LADDER else LADDER.index(1)

    @property
    def level(self) -> int | None:
        return LADDER[self._index]

    def observe(self, worker_wait_s: float, send_wait_s: float) -> None:
        """One batch: how long the loop waited for its encoding, and for the network to take it."""
        self._worker_wait_s += worker_wait_s
        self._send_wait_s += send_wait_s
        self._count += 1
        if self._count < self.window:
            return
        w, n = self._worker_wait_s, self._send_wait_s
        self._worker_wait_s = self._send_wait_s = 0.0
        self._count = 0
        old = self._index
        if w > self.margin * n and self._index > 0:
            self._index -= 1
        elif n > self.margin * w and self._index < len(LADDER) - 1:
            self._index += 1
        if self._index != old:
            self.changes += 1
            log.info("adaptive compression: level %s -> %s (waited %.1f ms for workers, %.1f ms for the link)",
                     LADDER[old], LADDER[self._index], w * 1e3, n * 1e3)

"""Pre-copy convergence: when to stop the live rounds and freeze for the final dump.

One place decides, and says why. The rules, checked in this order after each live round, with
``dirty`` = the pages that would have to be sent next:

1. **Downtime target** (QEMU's rule, ``migration_iteration_run``): freezing now would cost about
   ``dirty bytes / measured throughput``; stop when that is within the target. Converged.
   Default 50 ms, not QEMU's 300 (``DEFAULT_MIGRATE_SET_DOWNTIME``): the estimate covers the
   transfer only, and the frozen round also pays the scan, the plan and the receiver's commit,
   which grow with the process; the lower target leaves them room (bench_frozen measures the
   frozen time).
2. **Small dirty set** (P.Haul ``MIN_ITER_PAGES_COUNT`` = 64 pages): converged.
3. **Growth** (P.Haul ``MAX_ITER_GROW_RATE`` = 10 %): the dirty set grew by more than that since the
   previous round: more rounds will not help. Not converged.
4. **Round limit** (P.Haul ``MAX_ITERS_COUNT`` = 8 live rounds): not converged.

What happens when rounds 3 or 4 stop pre-copy without convergence is the user's choice
(``on_no_convergence``, P.Haul and QEMU leave it to the operator too):

* ``freeze`` (default): the final dump happens anyway; the report says the frozen time was bounded
  by the limits rather than by convergence.
* ``throttle``: slow the target down instead (auto-converge's throttle, started or raised by one
  step per round) and go on with live rounds; freeze only once the throttle is at its maximum and
  the dirty set still does not converge.
* ``abort``: stop before freezing anything; the source keeps running (``NotConverged``).

Auto-converge (QEMU's ``cpu-throttle-*``): when the process dirtied more than half of what we
sent in two consecutive rounds (``throttle-trigger-threshold`` 50 %), throttle it, starting at 20 %
and adding 10 % per round up to 99 %.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pagehaul.kernel import PAGE_SIZE

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ConvergenceLimits:
    downtime_target_s: float = 0.050
    min_iter_pages: int = 64
    max_grow_percent: float = 10.0
    max_rounds: int = 8
    # auto-converge (QEMU names and defaults)
    throttle_trigger_percent: float = 50.0
    throttle_initial_percent: int = 20
    throttle_increment_percent: int = 10
    throttle_max_percent: int = 99


@dataclass(frozen=True, slots=True)
class RoundObservation:
    """What a finished live round measured."""

    round: int
    pages_sent: int  # pages read and sent (data or zero) this round
    seconds: float  # wall time spent reading and sending them
    next_dirty_pages: int  # pages dirtied during the round (to send next)


NO_CONVERGENCE_ACTIONS = ("freeze", "throttle", "abort")


@dataclass(frozen=True, slots=True)
class Decision:
    stop: bool
    converged: bool
    reason: str
    estimated_downtime_s: float
    throttle_percent: int = 0
    abort: bool = False  # stop without freezing: not converged and the user chose to abort


@dataclass(slots=True)
class ConvergencePolicy:
    limits: ConvergenceLimits = field(default_factory=ConvergenceLimits)
    page_size: int = PAGE_SIZE
    auto_converge: bool = False
    on_no_convergence: str = "freeze"
    _prev_dirty: int | None = None
    _throughput_bps: float = 0.0
    _hot_rounds: int = 0
    throttle_percent: int = 0
    history: list[Decision] = field(default_factory=list)

    @property
    def throughput_bps(self) -> float:
        return self._throughput_bps

    def estimate_downtime_s(self, pages: int) -> float:
        if self._throughput_bps <= 0:
            return float("inf") if pages else 0.0
        return pages * self.page_size / self._throughput_bps

    def decide(self, obs: RoundObservation) -> Decision:
        lim = self.limits
        if obs.pages_sent and obs.seconds > 0:
            self._throughput_bps = obs.pages_sent * self.page_size / obs.seconds
        dirty = obs.next_dirty_pages
        est = self.estimate_downtime_s(dirty)
        self._update_throttle(obs)
        if est <= lim.downtime_target_s:
            d = Decision(True, True, f"estimated downtime {est * 1e3:.0f} ms <= target "
                         f"{lim.downtime_target_s * 1e3:.0f} ms ({dirty} dirty pages)", est)
        elif dirty <= lim.min_iter_pages:
            d = Decision(True, True, f"small dirty set: {dirty} <= {lim.min_iter_pages} pages", est)
        elif self._prev_dirty and (dirty - self._prev_dirty) * 100 > lim.max_grow_percent * self._prev_dirty:
            grow = (dirty - self._prev_dirty) * 100 / self._prev_dirty
            d = Decision(True, False, f"dirty set grows {grow:.0f}% > {lim.max_grow_percent:g}% "
                         f"({self._prev_dirty} -> {dirty} pages): not converging", est)
        elif obs.round + 1 >= lim.max_rounds:
            d = Decision(True, False, f"reached {lim.max_rounds} live rounds with {dirty} dirty pages "
                         f"(estimated downtime {est * 1e3:.0f} ms): not converged", est)
        else:
            d = Decision(False, False, f"{dirty} dirty pages, estimated downtime {est * 1e3:.0f} ms: "
                         "another round", est, self.throttle_percent)
        if d.stop and not d.converged:
            d = self._not_converging(d)
        if d.stop:
            d = Decision(d.stop, d.converged, d.reason, d.estimated_downtime_s, self.throttle_percent, d.abort)
        self._prev_dirty = dirty
        self.history.append(d)
        log.info("round %d: %s", obs.round, d.reason)
        return d

    def _not_converging(self, d: Decision) -> Decision:
        """Apply ``on_no_convergence`` to a decision to stop without convergence."""
        lim = self.limits
        if self.on_no_convergence == "abort":
            return Decision(True, False, f"{d.reason}; aborting (--on-no-convergence abort): source left running",
                            d.estimated_downtime_s, self.throttle_percent, abort=True)
        if self.on_no_convergence == "throttle":
            if self.throttle_percent < lim.throttle_max_percent:
                self.throttle_percent = min(lim.throttle_max_percent, self.throttle_percent + (
                    lim.throttle_increment_percent if self.throttle_percent else lim.throttle_initial_percent))
                return Decision(False, False, f"{d.reason}; throttling to {self.throttle_percent}% instead",
                                d.estimated_downtime_s, self.throttle_percent)
            return Decision(True, False, f"{d.reason}; throttled to {self.throttle_percent}% already: freezing",
                            d.estimated_downtime_s, self.throttle_percent)
        return Decision(True, False, f"{d.reason}; freezing anyway", d.estimated_downtime_s, self.throttle_percent)

    def _update_throttle(self, obs: RoundObservation) -> None:
        if not self.auto_converge or obs.round == 0:  # round 0 sends everything: no signal yet
            return
        lim = self.limits
        if obs.next_dirty_pages * 100 > lim.throttle_trigger_percent * max(obs.pages_sent, 1):
            self._hot_rounds += 1
        else:
            self._hot_rounds = 0
        if self._hot_rounds >= 2 or (self.throttle_percent and self._hot_rounds):
            if self.throttle_percent == 0:
                self.throttle_percent = lim.throttle_initial_percent
            else:
                self.throttle_percent = min(self.throttle_percent + lim.throttle_increment_percent,
                                            lim.throttle_max_percent)
            log.info("auto-converge: dirtying faster than %g%% of the send rate; throttling to %d%%",
                     lim.throttle_trigger_percent, self.throttle_percent)

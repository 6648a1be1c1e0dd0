"""What a caller gives the sender (``SendConfig``) and what it gets back (``SendResult``, one
``RoundStats`` per round, ``Progress`` while pages move)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pagehaul.errors import ConfigError
from pagehaul.kernel import PAGE_SIZE
from pagehaul.metrics import SenderMetrics
from pagehaul.security import Security
from pagehaul.wire import MAX_BATCH_BYTES
from sender.policy import NO_CONVERGENCE_ACTIONS, ConvergenceLimits

if TYPE_CHECKING:
    from pagehaul.codec import ImageKey
    from sender.freezer import StopGuard
    from sender.phases import PhaseTime
    from sender.rounds import Held
    from sender.target import AfterFinal



@dataclass(frozen=True, slots=True)
class SendConfig:
    # The process to migrate, with its descendants unless ``children`` is False; 0 with ``cgroup``.
    pid: int
    target: str
    force_pagemap_file: bool = False
    # None turns compression off (zero pages are still sent as holes).
    zstd_level: int | None = 1
    # Move the zstd level with whichever of compression and the link is the bottleneck.
    adaptive_compression: bool = False
    # Cap on bytes per second put on the wire (None: no cap).
    bandwidth_limit_bps: float | None = None
    batch_pages: int = MAX_BATCH_BYTES // PAGE_SIZE
    workers: int = 2
    # Batches read and compressed ahead of the network, per worker.
    depth_per_worker: int = 2
    # "auto" (probe), "none" (one frozen round, no pre-copy) or a tracker name.
    tracker: str = "auto"
    # After the final dump: leave the source stopped (so a destination can take over) or resume it.
    leave_stopped: bool = True
    limits: ConvergenceLimits = field(default_factory=ConvergenceLimits)
    auto_converge: bool = False
    # The final frozen round must be committed by the receiver within this time, else the source
    # is thawed and the migration fails.
    freeze_timeout_s: float = 60.0
    connect_timeout_s: float = 10.0
    # After a lost connection, keep trying to resume the session for this long.
    resume_deadline_s: float = 30.0
    # The CLI makes users choose; the Python API defaults to plain TCP for in-process use.
    security: Security = field(default_factory=lambda: Security(insecure=True))
    metrics: SenderMetrics | None = None
    # Every process of this cgroup v2 directory instead of ``pid``'s tree.
    cgroup: Path | None = None
    # Migrate ``pid``'s descendants too (the whole tree).
    children: bool = True
    # Dump shared anonymous memory (MAP_SHARED|MAP_ANONYMOUS, SysV shm, memfd) once per object.
    shmem: bool = True
    # Freeze with the cgroup v2 freezer when the target is exactly a cgroup (else ptrace).
    cgroup_freezer: bool = True
    # Hand the guard that continues a tree left stopped if this process dies (SendResult.stop_guard)
    # to the caller instead of disarming it: for callers with more to do before the stop is final.
    keep_stop_guard: bool = False
    # Keep the target's trackers open after the final round (SendResult.after_final) to ask what
    # was written since, e.g. while CRIU dumped the stopped tree.
    keep_target: bool = False
    # When pre-copy stops converging: "freeze" anyway, "throttle" the target harder and go on, or
    # "abort" with the source running (sender.policy).
    on_no_convergence: str = "freeze"
    # Keep the xxh3 of every page the receiver holds (SendResult.holdings), final round included:
    # a full migration compares CRIU's dump against them.
    keep_digests: bool = False

    def __post_init__(self) -> None:
        if self.on_no_convergence not in NO_CONVERGENCE_ACTIONS:
            raise ConfigError(f"on_no_convergence must be one of {', '.join(NO_CONVERGENCE_ACTIONS)}")
        if self.cgroup is None and self.pid <= 0:
            raise ConfigError(f"invalid pid {self.pid}")
        if self.cgroup is not None and self.pid:
            raise ConfigError("give either a pid or a cgroup, not both")
        if not 1 <= self.batch_pages <= MAX_BATCH_BYTES // PAGE_SIZE:
            raise ConfigError(f"batch size must be 1..{MAX_BATCH_BYTES // PAGE_SIZE} pages")
        if self.workers < 1:
            raise ConfigError("need at least one worker")
        if self.zstd_level is not None and not -7 <= self.zstd_level <= 22:
            raise ConfigError(f"zstd level {self.zstd_level} out of range -7..22")
        if ":" not in self.target:
            raise ConfigError(f"receiver address {self.target!r} must be HOST:PORT")
        if self.freeze_timeout_s <= 0:
            raise ConfigError("freeze timeout must be positive")
        if self.bandwidth_limit_bps is not None and self.bandwidth_limit_bps <= 0:
            raise ConfigError("bandwidth limit must be positive")


@dataclass(slots=True)
class RoundStats:
    """Per-round counters, named like CRIU's stats.proto dump_stats_entry where they mirror it."""

    round: int
    frozen: bool = False
    pages_scanned: int = 0
    dirty_pages: int = 0
    pages_written: int = 0
    pages_zero: int = 0
    pages_skipped_parent: int = 0
    pages_unreadable: int = 0
    raw_bytes: int = 0
    wire_bytes: int = 0
    memdump_time_us: int = 0
    tracker_time_us: int = 0
    freezing_time_us: int = 0
    estimated_downtime_ms: float = 0.0
    throttle_percent: int = 0
    directory: str = ""

    @property
    def compression_ratio(self) -> float:
        return self.raw_bytes / self.wire_bytes if self.wire_bytes else 0.0


@dataclass(slots=True)
class SendResult:
    pid: int
    session_id: str = ""
    scanner: str = ""
    tracker: str = "none"
    vmas: int = 0
    rounds: list[RoundStats] = field(default_factory=list)
    converged: bool = False
    stop_reason: str = ""
    freezing_time_us: int = 0
    frozen_time_us: int = 0
    total_time_us: int = 0
    left_stopped: bool = False
    # Times the connection was lost and the session resumed.
    resumes: int = 0
    # Processes and shared-memory objects in the final round.
    processes: int = 0
    shmem_objects: int = 0
    # How the target was frozen: PtraceTreeFreezer or CgroupFreezer.
    freezer: str = ""
    # The phases the migration went through (sender.phases), the final freeze's start included.
    phases: list[PhaseTime] = field(default_factory=list)
    # What the receiver holds after the final round, per image, with page digests
    # (SendConfig.keep_digests); not part of the printed result.
    holdings: dict[ImageKey, Held] = field(default_factory=dict, repr=False)
    # With SendConfig.keep_stop_guard: continues the stopped tree unless disarmed.
    stop_guard: StopGuard | None = field(default=None, repr=False)
    # With SendConfig.keep_target: the stopped target's trackers, still open (close it when done).
    after_final: AfterFinal | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Progress:
    round: int
    pages_done: int
    pages_total: int
    wire_bytes: int
    frozen: bool = False
    # Pages the tracker found dirty for this round, and the policy's downtime estimate made then.
    dirty_pages: int = 0
    estimated_downtime_ms: float = 0.0


ProgressFn = Callable[[Progress], None]

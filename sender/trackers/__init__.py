"""Dirty trackers for pre-copy rounds (interface and kernel notes: ``sender.trackers.base``).

``select_tracker("auto", ...)`` probes the kernel once and takes the first that works, in this
order: ``uffd-wp`` (atomic read-and-rearm, no freeze per round; the one that works on kernels
without soft-dirty, like arm64 and this CI machine), ``soft-dirty-scan``, ``soft-dirty-pagemap``
(both need a short freeze per round to read and clear), ``hash`` (no kernel feature; reads every
present page each round). ``--tracker NAME`` forces one; ``--list-trackers`` prints the probes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pagehaul.errors import ConfigError, KernelUnsupported
from sender.scanner import PageScanner
from sender.trackers.base import Availability, DirtyTracker


@dataclass(frozen=True, slots=True)
class _Entry:
    probe: Callable[[], Availability]
    make: Callable[[int, PageScanner], DirtyTracker]


def _registry() -> dict[str, _Entry]:
    # Imported here: each module pulls in what only its tracker needs.
    from sender.trackers import hashing, softdirty, uffd

    return {
        "uffd-wp": _Entry(uffd.probe, lambda pid, _scanner: uffd.UffdWpTracker(pid)),
        "soft-dirty-scan": _Entry(softdirty.probe_scan,
                                  lambda pid, scanner: softdirty.SoftDirtyScanTracker(pid)),
        "soft-dirty-pagemap": _Entry(softdirty.probe_pagemap,
                                     lambda pid, scanner: softdirty.SoftDirtyPagemapTracker(pid)),
        "hash": _Entry(hashing.probe, hashing.HashTracker),
    }


AUTO_ORDER = ("uffd-wp", "soft-dirty-scan", "soft-dirty-pagemap", "hash")


def probe_all() -> list[Availability]:
    """Every tracker, in preference order, with whether this kernel supports it and why not."""
    reg = _registry()
    return [reg[name].probe() for name in AUTO_ORDER]


def select_tracker(name: str, pid: int, scanner: PageScanner) -> DirtyTracker | None:
    """``"none"``: no pre-copy. ``"auto"``: the first available. Else that one, if available."""
    if name == "none":
        return None
    reg = _registry()
    if name == "auto":
        for candidate in AUTO_ORDER:
            if reg[candidate].probe().available:
                return reg[candidate].make(pid, scanner)
        raise KernelUnsupported("no dirty tracker works on this kernel")  # hash always does
    if name not in reg:
        raise ConfigError(f"unknown tracker {name!r}; choose from auto, none, {', '.join(AUTO_ORDER)}")
    avail = reg[name].probe()
    if not avail.available:
        raise KernelUnsupported(f"tracker {name} is not available: {avail.reason}")
    return reg[name].make(pid, scanner)

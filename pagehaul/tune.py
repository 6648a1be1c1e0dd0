"""Process-wide settings applied once at start by the sender and receiver entry points."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def tune_process() -> None:
    """Keep glibc from returning and re-faulting multi-MiB buffers (see kernel.tune_malloc)."""
    from pagehaul import kernel

    if not kernel.tune_malloc():
        log.debug("mallopt not available; keeping default malloc settings")

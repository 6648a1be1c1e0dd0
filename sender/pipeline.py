"""Reading and encoding a round's data pages in worker threads, ahead of the network.

Pipeline (one round)::

    a round's planned data pages, split into batches of <= 4 MiB
      -> [worker threads] process_vm_readv -> zero detection -> xxh3 -> zstd
      -> back on the event loop, in address order per image (``ReadAhead.batches``)

Workers read and compress ahead of the network by a bounded number of batches, so memory
stays bounded whatever the size of the target. The zstd level of each batch is chosen here
(fixed, or ``sender.adaptive`` from how long each batch waited for the workers and the link).
ptrace requests must come from the thread that attached, so nothing here freezes or thaws.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from pagehaul.errors import ProcessError, ProcessGone
from pagehaul.kernel import PAGE_SIZE
from pagehaul.runs import Runs
from sender.adaptive import AdaptiveLevel
from sender.batcher import BatchEncoder, EncodedBatch
from sender.config import SendConfig
from sender.rounds import RoundPart

log = logging.getLogger(__name__)

Level = int | Literal["default"] | None


@dataclass(frozen=True, slots=True)
class ReadBatch:
    """One batch of a round's data pages, read and encoded."""

    index: int  # the image's index in the round
    runs: Runs
    enc: EncodedBatch | None  # None: the pages could not be read (live round only)


class _Worker:
    """Per-thread read buffer, reused batch after batch."""

    def __init__(self, encoder: BatchEncoder, batch_pages: int) -> None:
        self._encoder = encoder
        self._nbytes = batch_pages * PAGE_SIZE
        self._local = threading.local()

    def __call__(self, part: RoundPart, index: int, runs: Runs, live: bool, level: Level) -> ReadBatch:
        buf: npt.NDArray[np.uint8] | None = getattr(self._local, "buf", None)
        if buf is None:
            buf = np.empty(self._nbytes, np.uint8)
            self._local.buf = buf
        raw = buf[: runs.total_pages * PAGE_SIZE]
        try:
            part.source.read(runs, raw, PAGE_SIZE)
        except ProcessGone:
            if part.essential or not live:
                raise
            # One process of the tree exited during a live round: it is dropped next round.
            log.debug("process gone during a live round, its pages skipped pid=%d", part.pid)
            return ReadBatch(index, runs, None)
        except ProcessError as err:
            if not live:
                raise
            # Unmapped while the process ran: leave these pages out of this round. They are not
            # in the round's pagemap, so the next round sends them if they are still there.
            log.debug("pages unreadable in a live round, skipped: %s", err)
            return ReadBatch(index, runs, None)
        if part.recorder is not None:
            part.recorder.record_sent(runs, raw)
        return ReadBatch(index, runs, self._encoder.encode(runs, raw, level=level))


class ReadAhead:
    """The worker threads of one migration and how far they may run ahead of the network."""

    def __init__(self, cfg: SendConfig, pool: ThreadPoolExecutor) -> None:
        self._pool = pool
        self._batch_pages = cfg.batch_pages
        self._work = _Worker(BatchEncoder(PAGE_SIZE, cfg.zstd_level, page_digests=cfg.keep_digests),
                             cfg.batch_pages)
        # Adaptive: from no compression, the cheapest; compression has to earn its CPU (sender.adaptive).
        self._adaptive = AdaptiveLevel(start=None) if cfg.adaptive_compression else None
        # Without compression a worker is done long before the network is: one batch ahead each
        # keeps the pace, and batches that would only wait stay out of memory.
        per_worker = 1 if cfg.zstd_level is None and not cfg.adaptive_compression else cfg.depth_per_worker
        self._depth = cfg.workers * per_worker

    async def batches(self, parts: list[RoundPart], *, live: bool) -> AsyncGenerator[ReadBatch, None]:
        """Every data page the parts' plans name, read and encoded, in plan order; the time the
        caller takes with each batch (sending it) is what the adaptive level weighs against the
        time spent waiting for it."""
        loop = asyncio.get_running_loop()
        pending: deque[asyncio.Future[ReadBatch]] = deque()
        chunks = ((index, part, chunk) for index, part in enumerate(parts)
                  for chunk in part.plan.data.split(self._batch_pages, PAGE_SIZE))
        try:
            while True:
                while len(pending) < self._depth and (nxt := next(chunks, None)) is not None:
                    index, part, chunk = nxt
                    level: Level = self._adaptive.level if self._adaptive is not None else "default"
                    pending.append(loop.run_in_executor(self._pool, self._work, part, index, chunk, live, level))
                if not pending:
                    return
                t0 = time.monotonic()
                batch = await pending.popleft()
                t1 = time.monotonic()
                yield batch
                if self._adaptive is not None and batch.enc is not None:
                    self._adaptive.observe(t1 - t0, time.monotonic() - t1)
        finally:
            for fut in pending:
                fut.cancel()

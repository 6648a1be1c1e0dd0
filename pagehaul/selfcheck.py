"""A workload that checks its own memory, for full migrations (``pagehaul migrate``).

    python -m pagehaul.selfcheck --log FILE [--size-mib 64] [--regions 64] [--rate-mib-s 32]
                                 [--children N] [--shared-mib M] [--signals]

It maps ``--size-mib`` of private anonymous memory cut into ``--regions`` regions and, for ever,
fills one region after the other with fresh pseudo-random data, keeping each region's xxh3 in a
table (ordinary heap memory, migrated with everything else); the first pass runs at full speed,
the others are paced to ``--rate-mib-s``. After every pass over all regions it
verifies every region against the table and appends one line to the log::

    pass 12 ok regions=64 pid=1 written_mib=768

With ``--children N`` it forks N children that do the same with memory of their own (every
process logs its own lines); with ``--shared-mib M`` all of them also verify, every pass, an M MiB
shared anonymous region filled before the fork. If a region's contents no longer match (a page
lost or stale after a migration), it appends
``BAD pass=… region=…`` and exits with status 3. The log is opened with O_APPEND, so a restored
copy of the process keeps appending to the same file. The pacing lets pre-copy converge; it is
the workload's own, not a synchronisation.

With ``--signals`` every process also takes signals all the time, the way real servers do: a
1 ms ``ITIMER_REAL`` (SIGALRM), real-time signals queued with ``sigqueue`` by a second thread,
and SIGCHLD from a short-lived child forked every few milliseconds; each has a handler that
counts. A signal delivered between the memory pagehaul saved and the registers CRIU saved
leaves a handler frame that one of them lacks; the restored process then crashes, or its
counters (checked every pass) no longer add up.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType

import numpy as np
import xxhash

from pagehaul.kernel import PAGE_SIZE


class _Sigval(ctypes.Union):
    _fields_ = (("sival_int", ctypes.c_int), ("sival_ptr", ctypes.c_void_p))


class SignalStorm:
    """Handlers that count, and the sources that keep them busy (module doc, ``--signals``)."""

    RT_SIGNAL = signal.SIGRTMIN + 2
    ITIMER_S = 0.001
    CHILD_EVERY_S = 0.005
    RT_EVERY_S = 0.0005

    def __init__(self) -> None:
        self.counts = {signal.SIGALRM: 0, signal.SIGCHLD: 0, self.RT_SIGNAL: 0}
        self.reaped = 0
        self.forked = 0
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.sigqueue.argtypes = (ctypes.c_int, ctypes.c_int, _Sigval)

    def start(self) -> None:
        for sig in self.counts:
            signal.signal(sig, self._count)
        signal.setitimer(signal.ITIMER_REAL, self.ITIMER_S, self.ITIMER_S)
        threading.Thread(target=self._queue_rt, name="sigqueue", daemon=True).start()

    def _count(self, sig: int, _frame: FrameType | None) -> None:
        self.counts[sig] += 1
        if sig == signal.SIGCHLD:
            while True:
                try:
                    pid, _ = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    return
                if pid == 0:
                    return
                self.reaped += 1

    def _queue_rt(self) -> None:
        me, value = os.getpid(), _Sigval(sival_int=1)
        while True:
            self._libc.sigqueue(me, self.RT_SIGNAL, value)
            time.sleep(self.RT_EVERY_S)  # the signal rate, not a synchronisation

    def tick(self, now: float, due: list[float]) -> None:
        """Fork a child that exits at once (SIGCHLD) when one is due."""
        if now >= due[0]:
            due[0] = now + self.CHILD_EVERY_S
            if os.fork() == 0:
                os._exit(0)
            self.forked += 1

    def check(self) -> str | None:
        """What does not add up, if anything: every signal source must have been heard from, and
        no more children reaped than forked."""
        quiet = [signal.Signals(s).name for s, n in self.counts.items() if n == 0]
        if quiet:
            return f"no {','.join(quiet)} handled"
        if self.reaped > self.forked:
            return f"reaped {self.reaped} children of {self.forked} forked"
        return None


def run(log_path: str, size_mib: int, regions: int, rate_mib_s: float, *, shared: mmap.mmap | None = None,
        shared_sum: int = 0, storm: SignalStorm | None = None) -> int:
    size = size_mib << 20
    region = size // regions // PAGE_SIZE * PAGE_SIZE
    if region == 0:
        print("selfcheck: regions too small", file=sys.stderr)
        return 2
    mem = mmap.mmap(-1, region * regions, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    words = np.frombuffer(mem, dtype=np.uint64)
    per_region = region // 8
    sums = [0] * regions
    rng = np.random.default_rng()
    log = open(log_path, "a", buffering=1)  # noqa: SIM115 -- open for the life of the process
    passes = 0
    written = 0
    t_next = time.monotonic()
    child_due = [t_next]
    if storm is not None:
        storm.start()
    while True:
        for i in range(regions):
            if storm is not None:
                storm.tick(time.monotonic(), child_due)
            view = words[i * per_region:(i + 1) * per_region]
            view[:] = rng.integers(0, 2**63, per_region, dtype=np.uint64)
            sums[i] = xxhash.xxh3_64_intdigest(memoryview(mem)[i * region:(i + 1) * region])
            written += region
            if passes == 0:  # the first pass fills everything at full speed
                t_next = time.monotonic()
                continue
            t_next += region / (rate_mib_s * (1 << 20))
            pause = t_next - time.monotonic()
            if pause > 0:
                time.sleep(pause)  # pacing, not synchronisation
        passes += 1
        if shared is not None and xxhash.xxh3_64_intdigest(memoryview(shared)) != shared_sum:
            log.write(f"BAD pass={passes} shared region pid={os.getpid()}\n")
            return 3
        for i in range(regions):
            if xxhash.xxh3_64_intdigest(memoryview(mem)[i * region:(i + 1) * region]) != sums[i]:
                log.write(f"BAD pass={passes} region={i} pid={os.getpid()}\n")
                return 3
        if storm is not None:
            wrong = storm.check()
            if wrong is not None:
                log.write(f"BAD pass={passes} signals: {wrong} pid={os.getpid()}\n")
                return 3
            storm.counts = dict.fromkeys(storm.counts, 0)  # each pass must hear from every source again
        log.write(f"pass {passes} ok regions={regions} pid={os.getpid()} written_mib={written >> 20}\n")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pagehaul.selfcheck", description=__doc__.splitlines()[0])
    p.add_argument("--log", required=True, help="append progress lines here")
    p.add_argument("--size-mib", type=int, default=64)
    p.add_argument("--regions", type=int, default=64)
    p.add_argument("--rate-mib-s", type=float, default=32.0)
    p.add_argument("--children", type=int, default=0, help="fork this many children, each checking its own memory")
    p.add_argument("--shared-mib", type=int, default=0,
                   help="a MAP_SHARED|MAP_ANONYMOUS region filled once before forking, verified by every process")
    p.add_argument("--signals", action="store_true",
                   help="take signals all the time: 1 ms ITIMER_REAL, queued real-time signals, SIGCHLD storms")
    args = p.parse_args(argv)
    if args.size_mib < 1 or args.regions < 1 or args.rate_mib_s <= 0 or args.children < 0 or args.shared_mib < 0:
        p.error("sizes and rate must be positive")
    shared, shared_sum = None, 0
    if args.shared_mib:
        shared = mmap.mmap(-1, args.shared_mib << 20, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        shared[:] = np.random.default_rng().integers(0, 256, args.shared_mib << 20, dtype=np.uint8).tobytes()
        shared_sum = xxhash.xxh3_64_intdigest(memoryview(shared))
    for _ in range(args.children):
        if os.fork() == 0:
            os._exit(run(args.log, args.size_mib, args.regions, args.rate_mib_s, shared=shared, shared_sum=shared_sum,
                         storm=SignalStorm() if args.signals else None))
    return run(args.log, args.size_mib, args.regions, args.rate_mib_s, shared=shared, shared_sum=shared_sum,
               storm=SignalStorm() if args.signals else None)


if __name__ == "__main__":
    sys.exit(main())

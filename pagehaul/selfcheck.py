"""A workload that checks its own memory, for full migrations (``pagehaul migrate``).

    python -m pagehaul.selfcheck --log FILE [--size-mib 64] [--regions 64] [--rate-mib-s 32]
                                 [--children N] [--shared-mib M]

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
"""

from __future__ import annotations

import argparse
import mmap
import os
import sys
import time
from collections.abc import Sequence

import numpy as np
import xxhash


def run(log_path: str, size_mib: int, regions: int, rate_mib_s: float, *, shared: mmap.mmap | None = None,
        shared_sum: int = 0) -> int:
    size = size_mib << 20
    region = size // regions // mmap.PAGESIZE * mmap.PAGESIZE
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
    while True:
        for i in range(regions):
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
            os._exit(run(args.log, args.size_mib, args.regions, args.rate_mib_s, shared=shared, shared_sum=shared_sum))
    return run(args.log, args.size_mib, args.regions, args.rate_mib_s, shared=shared, shared_sum=shared_sum)


if __name__ == "__main__":
    sys.exit(main())

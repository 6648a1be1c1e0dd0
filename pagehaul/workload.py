"""A live workload for the demo and the tests: a process whose memory looks like a real one's.

``python -m pagehaul.workload --size-mib 256 [--mutate]`` maps a private anonymous region and
fills it in 64-page chunks of four kinds, interleaved the way a heap interleaves them:

* zero: written, then all zero (present private pages, not the shared zero page);
* random: incompressible bytes;
* text: log lines and JSON records with varying ids and numbers;
* structs: 48-byte records of ids, doubles, flags, pointer-like values and timestamps.

It also maps a region it never touches (no pages present) and one it only reads (mapped to the
shared zero page): neither may be sent. It prints one line, ``READY {json}``, with its pid and
the regions' addresses, then either waits for stdin to close or, with ``--mutate``, keeps
rewriting a small hot region until it is killed, so that a frozen copy and a running one
differ.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import sys

import numpy as np

CHUNK_PAGES = 64
KINDS = ("zero", "random", "text", "structs")
# Share of chunks of each kind, in KINDS order.
MIX = (0.25, 0.25, 0.25, 0.25)
HOT_BYTES = 1 << 20
UNTOUCHED_BYTES = 16 << 20
READ_ONLY_BYTES = 4 << 20


def _text_block(nbytes: int, rng: np.random.Generator) -> np.ndarray:
    levels = ("INFO", "WARN", "DEBUG", "ERROR")
    lines: list[str] = []
    size = 0
    i = 0
    ids = rng.integers(0, 1 << 40, size=nbytes // 40 + 1)
    vals = rng.random(size=nbytes // 40 + 1)
    while size < nbytes:
        if i % 3:
            line = (f"2026-11-22T10:{i % 60:02d}:{(i * 7) % 60:02d}.{i % 1000:03d}Z {levels[i % 4]} "
                    f"worker-{i % 17} request id={int(ids[i]):x} latency_ms={vals[i] * 250:.3f}\n")
        else:
            line = (f'{{"id":{int(ids[i])},"user":"user{i % 977}","score":{vals[i]:.6f},'
                    f'"tags":["a{i % 13}","b{i % 7}"],"ok":{str(i % 5 != 0).lower()}}}\n')
        lines.append(line)
        size += len(line)
        i += 1
    return np.frombuffer("".join(lines).encode()[:nbytes], np.uint8)


def _structs(nbytes: int, rng: np.random.Generator) -> np.ndarray:
    rec = np.dtype([("id", "<u8"), ("value", "<f8"), ("flags", "<u4"), ("kind", "<u4"),
                    ("ptr", "<u8"), ("ts", "<u8"), ("pad", "<u8")])
    n = nbytes // rec.itemsize + 1
    arr = np.zeros(n, rec)
    arr["id"] = np.arange(n, dtype=np.uint64) + 1000
    arr["value"] = np.round(rng.random(n) * 1000, 2)
    arr["flags"] = rng.integers(0, 4, n)
    arr["kind"] = np.arange(n) % 7
    arr["ptr"] = 0x7F0000000000 + (rng.integers(0, 1 << 20, n).astype(np.uint64) << np.uint64(4))
    arr["ts"] = 1_790_000_000_000 + np.arange(n, dtype=np.uint64) * 13
    return arr.view(np.uint8)[:nbytes]


def fill(buf: np.ndarray, seed: int = 1) -> dict[str, int]:
    """Fill ``buf`` (uint8, a multiple of the chunk size) with the mix; returns pages per kind."""
    page = mmap.PAGESIZE
    chunk = CHUNK_PAGES * page
    n_chunks = buf.size // chunk
    rng = np.random.default_rng(seed)
    kinds = rng.choice(len(KINDS), size=n_chunks, p=MIX)
    view = buf[: n_chunks * chunk].reshape(n_chunks, chunk)
    counts: dict[str, int] = {}
    for k, name in enumerate(KINDS):
        idx = np.flatnonzero(kinds == k)
        counts[name] = int(idx.size) * CHUNK_PAGES
        if not idx.size:
            continue
        nbytes = int(idx.size) * chunk
        if name == "zero":
            view[idx] = 1  # fault the pages in with data, then clear them: present, all zero
            view[idx] = 0
        elif name == "random":
            view[idx] = rng.integers(0, 256, size=nbytes, dtype=np.uint8).reshape(-1, chunk)
        elif name == "text":
            view[idx] = _text_block(nbytes, rng).reshape(-1, chunk)
        else:
            view[idx] = _structs(nbytes, rng).reshape(-1, chunk)
    return counts


def _map(nbytes: int) -> tuple[mmap.mmap, np.ndarray]:
    # Python's mmap(-1, n) defaults to MAP_SHARED; a heap is private.
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return m, np.frombuffer(m, np.uint8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pagehaul.workload", description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--mutate", action="store_true", help="keep rewriting a hot region until killed")
    args = parser.parse_args(argv)
    chunk = CHUNK_PAGES * mmap.PAGESIZE
    size = max(chunk, (args.size_mib << 20) // chunk * chunk)
    main_map, main_buf = _map(size)
    counts = fill(main_buf, args.seed)
    untouched_map, _ = _map(UNTOUCHED_BYTES)
    ro_map, ro_buf = _map(READ_ONLY_BYTES)
    checksum = int(ro_buf[:: mmap.PAGESIZE].sum())  # read faults map the shared zero page
    hot_map, hot_buf = _map(HOT_BYTES)
    hot = hot_buf.view(np.uint64)

    def addr(m: mmap.mmap) -> int:
        return int(np.frombuffer(m, np.uint8).ctypes.data)

    info = {
        "pid": os.getpid(),
        "page_size": mmap.PAGESIZE,
        "regions": {
            "main": [addr(main_map), size],
            "untouched": [addr(untouched_map), UNTOUCHED_BYTES],
            "read_only": [addr(ro_map), READ_ONLY_BYTES],
            "hot": [addr(hot_map), HOT_BYTES],
        },
        "pages": counts,
        "read_checksum": checksum,
    }
    print("READY " + json.dumps(info), flush=True)
    if args.mutate:
        stride = mmap.PAGESIZE // 8
        i = 0
        while True:  # until killed: one word per page of the hot region, round after round
            hot[(i % (hot.size // stride)) * stride] += np.uint64(1)
            i += 1
    sys.stdin.read()
    return 0


if __name__ == "__main__":
    sys.exit(main())

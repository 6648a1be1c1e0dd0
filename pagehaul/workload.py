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
rewriting a small hot region until it is killed (or, when stdin is a pipe, until that pipe is
closed, so that a workload whose parent died does not spin on as an orphan), so that a frozen
copy and a running one differ.

Options for the benchmarks (``bench/``), none of which changes the default behaviour:

* ``--mix zero=0.25,random=0.25,text=0.25,structs=0.25`` sets the share of each kind (the
  default is that mix); ``--exact-mix`` gives every kind exactly its share of the chunks
  instead of drawing each chunk's kind at random.
* ``--dirty-mib-per-s N`` writes one word of N MiB worth of pages of the main region per
  second, scattered over the whole region, paced on ``time.monotonic`` in 10 ms ticks.
* ``--small-vmas N [--small-vma-kib K]`` adds N separate written mappings of K KiB (40 by
  default) with a one-page hole after each, so that the kernel cannot merge them (the
  many-small-VMAs case of CRIU's pagemap cache).
* ``--sparse-mib M --sparse-written-pct P`` adds an M MiB mapping of which P percent of the
  pages, spread evenly, are written (the rest never touched).
* ``--ready-file PATH`` also writes the READY line to PATH (atomically) and then waits to be
  killed instead of reading stdin; ``--detach`` starts a new session and points stdin and
  stdout (and stderr, unless it is a regular file) at /dev/null, so that CRIU, which refuses
  external pipes, can dump the process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import select
import signal
import stat
import sys
import time

import numpy as np

from pagehaul.kernel import PAGE_SIZE

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


def parse_mix(text: str) -> tuple[float, ...]:
    """``"zero=0.25,random=0.25,text=0.5"`` -> shares in KINDS order (missing kinds: 0); must sum to 1."""
    shares = dict.fromkeys(KINDS, 0.0)
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or name not in shares:
            raise ValueError(f"{item!r}: expected KIND=SHARE with KIND one of {', '.join(KINDS)}")
        share = float(value)
        if not 0 <= share <= 1:
            raise ValueError(f"{item!r}: share must be between 0 and 1")
        shares[name] = share
    total = sum(shares.values())
    if abs(total - 1) > 1e-6:
        raise ValueError(f"shares add up to {total:g}, not 1")
    return tuple(shares[k] for k in KINDS)


def _chunk_kinds(n_chunks: int, rng: np.random.Generator, mix: tuple[float, ...], exact: bool) -> np.ndarray:
    if not exact:
        return rng.choice(len(KINDS), size=n_chunks, p=mix)
    counts = np.floor(np.asarray(mix) * n_chunks).astype(np.int64)
    counts[int(np.argmax(mix))] += n_chunks - int(counts.sum())  # rounding leftovers to the largest share
    return rng.permutation(np.repeat(np.arange(len(KINDS)), counts))


def fill(buf: np.ndarray, seed: int = 1, mix: tuple[float, ...] = MIX, exact: bool = False) -> dict[str, int]:
    """Fill ``buf`` (uint8, a multiple of the chunk size) with the mix; returns pages per kind.

    With ``exact`` every kind gets exactly its share of the chunks (rounded), in random order;
    otherwise each chunk's kind is drawn at random with the shares as probabilities.
    """
    page = PAGE_SIZE
    chunk = CHUNK_PAGES * page
    n_chunks = buf.size // chunk
    rng = np.random.default_rng(seed)
    kinds = _chunk_kinds(n_chunks, rng, mix, exact)
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


def _small_vmas(count: int, kib: int, rng: np.random.Generator) -> tuple[mmap.mmap, list[int]]:
    """``count`` written mappings of ``kib`` KiB, each followed by an unmapped page; their addresses."""
    page = PAGE_SIZE
    each = max(page, kib * 1024 // page * page)
    stride = each + page
    big = mmap.mmap(-1, count * stride, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view = np.frombuffer(big, np.uint8)
    base = int(view.ctypes.data)
    view.reshape(count, stride)[:, :each] = _structs(count * each, rng).reshape(count, each)
    del view
    for i in range(count):  # punch the holes (the mmap object is kept, never read there again)
        _munmap(base + i * stride + each, page)
    return big, [base + i * stride for i in range(count)]


def _munmap(addr: int, length: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    if libc.munmap(addr, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _sparse(size_mib: int, written_pct: float) -> tuple[mmap.mmap, int, int]:
    """A mapping of ``size_mib`` MiB with ``written_pct`` percent of its pages written, spread evenly."""
    page = PAGE_SIZE
    size = max(page, (size_mib << 20) // page * page)
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    words = np.frombuffer(m, np.uint64)
    n_pages = size // page
    n_written = min(n_pages, round(n_pages * written_pct / 100))
    if n_written:
        pages = np.linspace(0, n_pages - 1, n_written).astype(np.int64)
        words[pages * (page // 8)] = pages.astype(np.uint64) + 1
    del words
    return m, size, n_written


class _Dirtier:
    """Writes one word of ``rate`` bytes' worth of pages per second, scattered over ``words``."""

    TICK_S = 0.01

    def __init__(self, words: np.ndarray, mib_per_s: float) -> None:
        page_words = PAGE_SIZE // 8
        self._words = words
        self._page_words = page_words
        self._n_pages = words.size // page_words
        self._pages_per_s = mib_per_s * (1 << 20) / PAGE_SIZE
        # An odd step coprime with the page count visits every page once per sweep, scattered.
        step = int(self._n_pages * 0.618_033_988_75) | 1
        while np.gcd(step, self._n_pages) != 1:
            step += 2
        self._step = step
        self._done = 0
        self._t0 = time.monotonic()

    def due_in(self) -> float:
        """Seconds until the next tick."""
        elapsed = time.monotonic() - self._t0
        return self.TICK_S - elapsed % self.TICK_S

    def step(self) -> None:
        due = int((time.monotonic() - self._t0) * self._pages_per_s)
        if due <= self._done:
            return
        k = np.arange(self._done, due, dtype=np.int64)
        pages = (k * self._step) % self._n_pages
        sweep = (k // self._n_pages) % self._page_words  # a different word each sweep
        self._words[pages * self._page_words + sweep] += np.uint64(1)
        self._done = due


def _stdin_is_pipe() -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(0).st_mode)
    except OSError:
        return False


def _stdin_closed() -> bool:
    """True once stdin (a pipe) is at end of file: its writer closed it, or exited."""
    readable, _, _ = select.select([0], [], [], 0)
    return bool(readable) and not os.read(0, 65536)


def _write_ready_file(path: str, line: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(line + "\n")
    os.replace(tmp, path)


def _detach() -> None:
    """New session; stdin/stdout (and stderr unless it is a regular file) on /dev/null."""
    with contextlib.suppress(PermissionError):  # already a process group leader (e.g. started with setsid)
        os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    targets = [0, 1]
    try:
        if not stat.S_ISREG(os.fstat(2).st_mode):
            targets.append(2)
    except OSError:
        targets.append(2)
    for fd in targets:
        os.dup2(null, fd)
    os.close(null)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pagehaul.workload", description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--mutate", action="store_true", help="keep rewriting a hot region until killed")
    parser.add_argument("--mix", type=parse_mix, default=MIX, metavar="KIND=SHARE,...",
                        help="shares of zero, random, text, structs chunks (default: a quarter each)")
    parser.add_argument("--exact-mix", action="store_true", help="exact shares instead of random draws per chunk")
    parser.add_argument("--dirty-mib-per-s", type=float, default=0.0, metavar="N",
                        help="dirty N MiB of the main region per second, scattered, until killed")
    parser.add_argument("--small-vmas", type=int, default=0, metavar="N", help="add N small written mappings")
    parser.add_argument("--small-vma-kib", type=int, default=40, metavar="K", help="size of each (default: 40)")
    parser.add_argument("--sparse-mib", type=int, default=0, metavar="M", help="add a sparsely written mapping")
    parser.add_argument("--sparse-written-pct", type=float, default=1.0, metavar="P",
                        help="percent of the sparse mapping's pages written (default: 1)")
    parser.add_argument("--ready-file", metavar="PATH",
                        help="also write the READY line to PATH, then wait to be killed (stdin is not read)")
    parser.add_argument("--detach", action="store_true",
                        help="new session, stdin/stdout on /dev/null (so CRIU can dump the process)")
    args = parser.parse_args(argv)
    if args.dirty_mib_per_s < 0 or args.small_vmas < 0 or args.sparse_mib < 0:
        parser.error("sizes and rates must not be negative")
    if args.detach:
        _detach()
    chunk = CHUNK_PAGES * PAGE_SIZE
    size = max(chunk, (args.size_mib << 20) // chunk * chunk)
    main_map, main_buf = _map(size)
    counts = fill(main_buf, args.seed, args.mix, args.exact_mix)
    untouched_map, _ = _map(UNTOUCHED_BYTES)
    ro_map, ro_buf = _map(READ_ONLY_BYTES)
    checksum = int(ro_buf[:: PAGE_SIZE].sum())  # read faults map the shared zero page
    hot_map, hot_buf = _map(HOT_BYTES)
    hot = hot_buf.view(np.uint64)

    def addr(m: mmap.mmap) -> int:
        return int(np.frombuffer(m, np.uint8).ctypes.data)

    regions: dict[str, object] = {
        "main": [addr(main_map), size],
        "untouched": [addr(untouched_map), UNTOUCHED_BYTES],
        "read_only": [addr(ro_map), READ_ONLY_BYTES],
        "hot": [addr(hot_map), HOT_BYTES],
    }
    keep: list[mmap.mmap] = []
    if args.small_vmas:
        small_map, small_addrs = _small_vmas(args.small_vmas, args.small_vma_kib, np.random.default_rng(args.seed))
        keep.append(small_map)
        regions["small_vmas"] = [small_addrs[0], len(small_addrs), max(1, args.small_vma_kib * 1024 // PAGE_SIZE)]
    if args.sparse_mib:
        sparse_map, sparse_size, sparse_written = _sparse(args.sparse_mib, args.sparse_written_pct)
        keep.append(sparse_map)
        regions["sparse"] = [addr(sparse_map), sparse_size, sparse_written]
    info = {
        "pid": os.getpid(),
        "page_size": PAGE_SIZE,
        "regions": regions,
        "pages": counts,
        "read_checksum": checksum,
        "dirty_mib_per_s": args.dirty_mib_per_s,
    }
    line = "READY " + json.dumps(info)
    print(line, flush=True)
    if args.ready_file:
        _write_ready_file(args.ready_file, line)
    dirtier = _Dirtier(main_buf.view(np.uint64), args.dirty_mib_per_s) if args.dirty_mib_per_s else None
    if args.mutate:
        stride = PAGE_SIZE // 8
        orphan_check = _stdin_closed if _stdin_is_pipe() and not args.ready_file else None
        i = 0
        while True:  # until killed: one word per page of the hot region, round after round
            hot[(i % (hot.size // stride)) * stride] += np.uint64(1)
            i += 1
            if not i % 4096:
                if dirtier is not None:
                    dirtier.step()
                if orphan_check is not None and orphan_check():
                    return 0  # the parent closed our stdin or died: do not spin on as an orphan
    if dirtier is not None:
        while True:  # until killed
            dirtier.step()
            time.sleep(dirtier.due_in())
    if args.ready_file:
        while True:  # until killed
            signal.pause()
    sys.stdin.read()
    return 0


if __name__ == "__main__":
    sys.exit(main())

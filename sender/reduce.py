"""The source's half of a full migration: CRIU's dump of the frozen tree, less what the destination holds.

pagehaul moves memory in pre-copy rounds; CRIU knows everything else about a process (registers,
files, sockets, namespaces, the vDSO). At the frozen point the sender has ``criu dump`` write its
images into a local (tmpfs) directory; only what the destination does not already hold crosses
the network.

The rule that keeps a restored process correct: **CRIU's dump is the truth**. It saved the
registers; its memory images are the memory at that same instant. pagehaul's rounds stand in for
CRIU's pages only where they are proven identical, page by page: ``reduce_dump`` computes the
xxh3 of every page CRIU dumped and compares it with the digest of what the destination holds for
that address after pagehaul's final round (``Holding``, kept by the sender). Each page of CRIU's
pagemap then becomes

* PE_PARENT: the destination holds exactly these bytes in its round chain;
* left out: the destination knows it is zero, and an absent page restores as zero there
  (anonymous memory, shared memory objects);
* PE_PRESENT, shipped: anything else (a page written after pagehaul read it, a page only CRIU
  dumps, like the vDSO or a text page CRIU's parasite touched).

Pages pagehaul holds that CRIU did not dump are left out too, as CRIU would restore them. Memory
pagehaul does not move at all (processes it did not migrate, shared memory it did not dump)
stays in CRIU's images and ships whole. The tree is left stopped between pagehaul's final round
and CRIU's dump with no signal delivered (``sender.freezer``), so nothing normally differs; the
comparison makes correctness independent of that. The destination's half is ``receiver.assemble``.

    files = reduce_dump(dump_dir, {"pagemap-1.img": holding}, out_dir=ship_dir, page_size=4096)
"""

from __future__ import annotations

import functools
import mmap
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from pagehaul.codec import (
    IMAGE_NAME_RE,
    PAGES_RE,
    PE_LAZY,
    PE_PARENT,
    PE_PRESENT,
    Pagemap,
    PagemapEntry,
    encode_pagemap,
    is_pagemap,
    pages_name,
    read_pagemap,
)
from pagehaul.digest import page_digests
from pagehaul.errors import ImageError
from pagehaul.runs import U64, Runs, in_ranges, lookup
from pagehaul.store import link_or_copy, write_all

# What criu dump writes beside the images and nobody restores from.
_NOT_SHIPPED: Final = frozenset({"stats-dump"})
_CHANGED_LISTED: Final = 16
_CHUNK: Final = 1 << 20


@dataclass(frozen=True, slots=True)
class Holding:
    """What the destination holds for one of CRIU's pagemaps after pagehaul's final round.

    ``cover``: sorted page addresses in pagehaul's final pagemap, ``digests`` their xxh3 (same
    order); ``zero``: sorted addresses the destination knows are zero (not in its pagemap);
    ``zero_ranges``: sorted, disjoint byte ranges ``[start, end)`` where a page absent from a
    pagemap restores as zero (anonymous memory; not a private file mapping, which restores the
    file's bytes).
    """

    cover: U64
    digests: U64
    zero: U64
    zero_ranges: tuple[tuple[int, int], ...]
    # Page addresses written since the final round (sorted; asked of the tracker after a lazy dump,
    # whose lazy pages have no data to compare: they are still in the stopped source).
    written: U64 = field(default_factory=lambda: np.zeros(0, np.uint64))


@dataclass(frozen=True, slots=True)
class Reduced:
    """What ``reduce_dump`` left to ship: file paths (names are the CRIU names), and its counts.

    ``extra_pages``: pages of held pagemaps shipped from CRIU's dump; ``dropped_pages``: pages the
    destination is proven to hold; ``changed_pages``: of the shipped ones, pages the destination
    held with other bytes (written after pagehaul read them: normally none).
    """

    files: tuple[Path, ...]
    extra_pages: int
    dropped_pages: int
    changed_pages: int = 0
    # The first few changed pages, as "PAGEMAP-NAME 0xADDR", to say where.
    changed_at: tuple[str, ...] = ()

    @property
    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)


def _pages_ids(dump_dir: Path, names: Sequence[str]) -> set[int]:
    return {read_pagemap(dump_dir / n).pages_id for n in names}


def _dumped_page_addrs(pm: Pagemap, page_size: int, where: Path) -> tuple[U64, U64]:
    """Every page address CRIU wrote data for, in pages-file order (ascending, as CRIU writes), and
    every page a lazy dump (``criu dump --lazy-pages``) left in the source (PE_LAZY alone)."""
    vaddr, nr_pages, flags = pm.arrays()
    data = np.isin(flags, (PE_PRESENT, PE_PRESENT | PE_LAZY))
    lazy = flags == PE_LAZY
    bad = np.flatnonzero(~(data | lazy))
    if bad.size:
        i = int(bad[0])
        raise ImageError(f"{where}: unexpected pagemap entry at 0x{int(vaddr[i]):x} flags {int(flags[i]):#x} in a "
                         "full criu dump (a dump with a parent cannot be reduced)")
    return (Runs(vaddr[data], nr_pages[data]).page_addrs(page_size),
            Runs(vaddr[lazy], nr_pages[lazy]).page_addrs(page_size))


def _covered_mask(addrs: U64, ranges: Sequence[tuple[int, int]]) -> npt.NDArray[np.bool_]:
    """True where a page address lies inside one of the (disjoint) half-open byte ranges."""
    bounds = np.array(sorted(ranges), np.uint64).reshape(-1, 2)
    return in_ranges(addrs, np.ascontiguousarray(bounds[:, 0]), np.ascontiguousarray(bounds[:, 1]))


def _file_digests(path: Path, pages: int, page_size: int) -> U64:
    """xxh3 of each page of a pages file (which must hold exactly ``pages`` pages)."""
    size = path.stat().st_size
    if size != pages * page_size:
        raise ImageError(f"{path}: {size} bytes for {pages} pages in its pagemap")
    if pages == 0:
        return np.zeros(0, np.uint64)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as mem:
        view = memoryview(mem)
        try:
            return page_digests(view, page_size)
        finally:
            view.release()


def _entries(addrs: U64, parent: npt.NDArray[np.bool_], ship: npt.NDArray[np.bool_],
             page_size: int) -> list[PagemapEntry]:
    """PE_PARENT runs of ``addrs[parent]`` and PE_PRESENT runs of ``addrs[ship]``, in address order."""
    out = [PagemapEntry(v, n, PE_PARENT) for v, n in Runs.from_page_addrs(addrs[parent], page_size)]
    out += [PagemapEntry(v, n, PE_PRESENT) for v, n in Runs.from_page_addrs(addrs[ship], page_size)]
    return sorted(out, key=lambda e: e.vaddr)


# Reads the pages of ``runs`` of the image named by a CRIU pagemap name from the stopped source.
SourceReader = Callable[[str, Runs], bytes]


def reduce_dump(dump_dir: Path, holdings: Mapping[str, Holding], out_dir: Path, page_size: int,
                read_source: SourceReader | None = None) -> Reduced:
    """The files of ``criu dump -D dump_dir`` worth shipping, gathered in ``out_dir`` (linked where
    unchanged), with every page the destination is proven to hold left out (module doc).

    ``holdings`` maps CRIU pagemap names (``pagemap-VPID.img``, ``pagemap-shmem-SHMID.img``) to
    what the destination holds for them; each must be in the dump. Their pagemaps are rewritten
    (PE_PARENT where held, PE_PRESENT for the pages shipped, in a pages file of their own).
    Everything else (other pagemaps, all non-memory images) ships as CRIU wrote it.

    A lazy dump's PE_LAZY pages have no data in the dump: they stand in the stopped source. They
    are held when the destination holds the address and the tracker says it was not written
    since (``Holding.written``); any other is read with ``read_source`` and shipped.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    names = sorted(os.listdir(dump_dir))
    missing = sorted(set(holdings) - set(names))
    if missing:
        raise ImageError(f"{dump_dir}: criu dumped no {', '.join(missing)}")
    maps = [n for n in names if is_pagemap(n)]
    kept_ids = _pages_ids(dump_dir, [n for n in maps if n not in holdings])
    next_id = max(kept_ids | _pages_ids(dump_dir, list(holdings)) | {0}) + 1
    files: list[Path] = []
    extra = dropped = changed = 0
    changed_at: list[str] = []
    zero_digest = page_digests(bytes(page_size), page_size)[0]
    for name in sorted(holdings):
        held = holdings[name]
        pm = read_pagemap(dump_dir / name)
        data, lazy = _dumped_page_addrs(pm, page_size, dump_dir / name)
        digests = _file_digests(dump_dir / pages_name(pm.pages_id), data.size, page_size)
        addrs = np.concatenate([data, lazy])
        in_cover, pos = lookup(held.cover, addrs)
        known_zero = lookup(held.zero, addrs)[0]
        anon = _covered_mask(addrs, held.zero_ranges) if held.zero_ranges else np.zeros(addrs.size, np.bool_)
        # Data pages are compared by digest. Lazy pages are as the stopped source has them: what
        # the destination holds unless the tracker saw a write since the final round. An absent
        # page restores as zero in anonymous memory: zero pages there need not travel, and there
        # a page pagehaul did not hold (not present at its final scan) and nobody wrote since is
        # zero (unpopulated, or the shared zero page).
        is_lazy = np.arange(addrs.size) >= data.size
        is_zero = np.zeros(addrs.size, np.bool_)
        is_zero[:data.size] = digests == zero_digest
        unwritten = ~lookup(held.written, addrs)[0]
        same = in_cover.copy()
        compare = np.flatnonzero(in_cover[:data.size])
        same[compare] = held.digests[pos[compare]] == digests[compare]
        same[is_lazy] &= unwritten[is_lazy]
        omit = ~same & anon & np.where(is_lazy, ~in_cover & unwritten, is_zero)
        ship = ~(same | omit)
        extra += int(ship.sum())
        dropped += addrs.size - int(ship.sum())
        differ = np.where(is_lazy, ~unwritten & (in_cover | known_zero),
                          (in_cover & ~same) | (known_zero & ~is_zero))
        changed += int(differ.sum())
        changed_at += [f"{name} 0x{a:x}" for a in np.sort(addrs[differ])[:_CHANGED_LISTED].tolist()]
        order = np.argsort(addrs, kind="stable")
        (out_dir / name).write_bytes(encode_pagemap(next_id, _entries(addrs[order], same[order], ship[order],
                                                                      page_size)))
        shipped = order[ship[order]]  # indexes into addrs of the shipped pages, in address order
        _write_shipped(out_dir / pages_name(next_id), dump_dir / pages_name(pm.pages_id), addrs, shipped,
                       n_data=data.size, page_size=page_size,
                       read_lazy=functools.partial(_read_lazy, read_source, name))
        files += [out_dir / name, out_dir / pages_name(next_id)]
        next_id += 1
    for name in names:
        path = dump_dir / name
        if name in holdings or name in _NOT_SHIPPED or not IMAGE_NAME_RE.fullmatch(name):
            continue
        m = PAGES_RE.fullmatch(name)
        if m is not None and int(m.group(1)) not in kept_ids:
            continue  # the pages of a rewritten pagemap: copied above, as far as needed
        link_or_copy(path, out_dir / name)
        files.append(out_dir / name)
    return Reduced(tuple(files), extra, dropped, changed, tuple(changed_at[:_CHANGED_LISTED]))


def fill_lazy(dump_dir: Path, read_source: SourceReader, page_size: int) -> int:
    """Turn a lazy dump into a full one: every PE_LAZY page read from the (still stopped) source
    into its pagemap's pages file, in address order with the pages CRIU wrote. For a dump kept
    to be looked at, or compared with what was restored; returns the pages filled in."""
    filled = 0
    for name in sorted(os.listdir(dump_dir)):
        if not is_pagemap(name):
            continue
        pm = read_pagemap(dump_dir / name)
        data, lazy = _dumped_page_addrs(pm, page_size, dump_dir / name)
        if not lazy.size:
            continue
        addrs = np.concatenate([data, lazy])
        order = np.argsort(addrs, kind="stable")
        pages = dump_dir / pages_name(pm.pages_id)
        tmp = dump_dir / f".{pages.name}.full"
        _write_shipped(tmp, pages, addrs, order, n_data=data.size, page_size=page_size,
                       read_lazy=functools.partial(_read_lazy, read_source, name))
        entries = [PagemapEntry(v, n, PE_PRESENT) for v, n in Runs.from_page_addrs(addrs[order], page_size)]
        tmp.rename(pages)
        (dump_dir / name).write_bytes(encode_pagemap(pm.pages_id, entries))
        filled += int(lazy.size)
    return filled


def _read_lazy(read_source: SourceReader | None, name: str, runs: Runs) -> bytes:
    if read_source is None:
        raise ImageError(f"{name}: lazy pages to ship at 0x{int(runs.vaddr[0]):x}, but nothing to read them from")
    return read_source(name, runs)


def _write_shipped(dst: Path, src: Path, addrs: U64, shipped: npt.NDArray[np.intp], *, n_data: int, page_size: int,
                   read_lazy: Callable[[Runs], bytes]) -> None:
    """Write the pages ``addrs[shipped]`` (in that order) to a new pages file: those with an index
    below ``n_data`` are copied from CRIU's pages file ``src`` (their index is their place in it),
    the others read with ``read_lazy``. One copy or read per stretch of consecutive pages."""
    from_file = shipped < n_data
    # A new stretch where the origin changes, or the file index or address is not the next one.
    breaks = np.flatnonzero((np.diff(from_file.astype(np.int8)) != 0)
                            | (np.diff(shipped) != 1) | (np.diff(addrs[shipped]) != page_size)) + 1
    with open(src, "rb", buffering=0) as fin, open(dst, "xb", buffering=0) as fout:
        out = 0
        for seg in np.split(np.arange(shipped.size), breaks):
            if seg.size == 0:
                continue
            first = int(shipped[seg[0]])
            if from_file[seg[0]]:
                offset, left = first * page_size, seg.size * page_size
                while left:
                    n = os.copy_file_range(fin.fileno(), fout.fileno(), min(left, 1 << 30), offset)
                    if n <= 0:
                        raise ImageError(f"{src}: short read at offset {offset}: the pages file is truncated")
                    offset += n
                    left -= n
                out += seg.size * page_size
            else:
                data = read_lazy(Runs.of([int(addrs[first])], [seg.size]))
                write_all(fout.fileno(), memoryview(data), dst, out)
                out += len(data)


def iter_chunks(path: Path, chunk: int = _CHUNK) -> Iterator[tuple[bytes, bool]]:
    """A file's contents in chunks of at most ``chunk`` bytes, each with "is the last" (one empty
    chunk for an empty file)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        done = 0
        while True:
            data = f.read(chunk)
            done += len(data)
            if len(data) < chunk or done >= size:
                yield data, True
                return
            yield data, False

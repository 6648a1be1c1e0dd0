"""Full migration: CRIU's images of a frozen tree, joined with the memory pagehaul moved.

pagehaul moves memory in pre-copy rounds; CRIU knows everything else about a process (registers,
files, sockets, namespaces, the vDSO). At the frozen point the sender has ``criu dump`` write its
images into a local (tmpfs) directory. That dump copies all memory again, locally, but none of it
crosses the network: ``reduce_dump`` keeps, of each process pagehaul migrated, only the pages
*outside* the VMAs pagehaul dumps (in practice the vDSO, which CRIU restores from its image), and
drops the rest of CRIU's memory. Memory pagehaul does not move at all (processes it did not
migrate, shared memory) stays in CRIU's images and ships whole.

On the destination, ``assemble`` lays the session's committed rounds out as CRIU's parent chain
(``r0 <- r1 <- ... <- rN``, hard links; task pagemaps are named by vpid, as CRIU expects)
and puts the shipped images on top in ``images/``, whose ``parent`` is the last round. There each
migrated task's ``pagemap-VPID.img`` becomes: every entry of pagehaul's final round as PE_PARENT
(found in the chain), merged in address order with CRIU's extra entries as PE_PRESENT (their pages
in a pages file of their own). ``criu restore -D images`` then reads pagehaul's pages for every
page pagehaul moved, and CRIU's for the rest.

    files = reduce_dump(dump_dir, covered={1: vma_ranges}, out_dir=ship_dir, page_size=4096)
    ...                                          # ship `files` to the receiver
    layout = assemble(session_dir, restore_dir, shipped_dir, page_size=4096)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

import numpy as np
import numpy.typing as npt

from pagehaul.errors import ImageError, PagehaulError
from pagehaul.images import (
    PE_LAZY,
    PE_PARENT,
    PE_PRESENT,
    Pagemap,
    PagemapEntry,
    committed_rounds,
    encode_pagemap,
    pages_name,
    read_pagemap,
    round_dir_name,
)
from pagehaul.runs import U64, Runs, in_ranges

TASK_PAGEMAP_RE: Final = re.compile(r"pagemap-(\d+)\.img")
SHMEM_PAGEMAP_RE: Final = re.compile(r"pagemap-shmem-(\d+)\.img")
PAGES_RE: Final = re.compile(r"pages-(\d+)\.img")
# A file the receiver accepts from a sender: a plain CRIU image name, never a path.
IMAGE_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\.img")
# What criu dump writes beside the images and nobody restores from.
_NOT_SHIPPED: Final = frozenset({"stats-dump"})

IMAGES_SUBDIR: Final = "images"
_CHUNK: Final = 1 << 20


@dataclass(frozen=True, slots=True)
class Reduced:
    """What ``reduce_dump`` left to ship: file paths (names are the CRIU names), and its counts."""

    files: tuple[Path, ...]
    extra_pages: int
    dropped_pages: int

    @property
    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)


@dataclass(frozen=True, slots=True)
class Layout:
    """The assembled restore directory: ``images`` (criu restore's -D) and the round chain it sits on."""

    images: Path
    rounds: int
    extra_pages: int


def _pages_ids(dump_dir: Path, names: Sequence[str]) -> set[int]:
    return {read_pagemap(dump_dir / n).pages_id for n in names}


def _present_page_addrs(pm: Pagemap, page_size: int, where: Path) -> U64:
    """Every page address CRIU wrote data for, in pages-file order (ascending, as CRIU writes)."""
    vaddr, nr_pages, flags = pm.arrays()
    bad = np.flatnonzero(~np.isin(flags, (PE_PRESENT, PE_PRESENT | PE_LAZY)))
    if bad.size:
        i = int(bad[0])
        raise ImageError(f"{where}: unexpected pagemap entry at 0x{int(vaddr[i]):x} flags {int(flags[i]):#x} in a "
                         "full criu dump (a dump with a parent cannot be reduced)")
    return Runs(vaddr, nr_pages).page_addrs(page_size)


def _covered_mask(addrs: U64, ranges: Sequence[tuple[int, int]]) -> npt.NDArray[np.bool_]:
    """True where a page address lies inside one of the (disjoint) half-open byte ranges."""
    bounds = np.array(sorted(ranges), np.uint64).reshape(-1, 2)
    return in_ranges(addrs, np.ascontiguousarray(bounds[:, 0]), np.ascontiguousarray(bounds[:, 1]))


def _copy_pages(src: Path, dst: Path, page_index: npt.NDArray[np.intp], page_size: int) -> None:
    """Write the pages at ``page_index`` (ascending) of ``src`` into a new file ``dst``, in order."""
    runs = Runs.from_page_addrs(page_index.astype(np.uint64), 1)  # runs of consecutive indexes
    with open(src, "rb", buffering=0) as fin, open(dst, "xb", buffering=0) as fout:
        for first, count in runs:
            offset, left = first * page_size, count * page_size
            while left:
                n = os.copy_file_range(fin.fileno(), fout.fileno(), min(left, 1 << 30), offset)
                if n <= 0:
                    raise ImageError(f"{src}: short read at offset {offset}: the pages file is truncated")
                offset += n
                left -= n


def reduce_dump(dump_dir: Path, covered: Mapping[int, Sequence[tuple[int, int]]], out_dir: Path,
                page_size: int, covered_shmem: frozenset[int] = frozenset()) -> Reduced:
    """The files of ``criu dump -D dump_dir`` worth shipping, with memory pagehaul moved left out,
    gathered in ``out_dir`` (linked where unchanged).

    ``covered`` maps each vpid whose memory pagehaul migrated to the byte ranges (its dumpable
    VMAs) pagehaul's rounds account for. Pages of those tasks inside the ranges are dropped; the
    rest of their pages get a new pagemap and pages file in ``out_dir``. Everything else (other
    tasks, shared memory, all non-memory images) ships as CRIU wrote it, except the shared-memory
    objects in ``covered_shmem`` (shmids pagehaul dumped itself), which are dropped whole.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    names = sorted(os.listdir(dump_dir))
    tasks = {n: int(m.group(1)) for n in names if (m := TASK_PAGEMAP_RE.fullmatch(n))}
    shmems = {n: int(m.group(1)) for n in names if (m := SHMEM_PAGEMAP_RE.fullmatch(n))}
    missing = set(covered) - set(tasks.values())
    if missing:
        raise ImageError(f"{dump_dir}: criu dumped no pagemap for task(s) {sorted(missing)}")
    reduced_maps = [n for n, vpid in tasks.items() if vpid in covered]
    dropped_shmem = [n for n, shmid in shmems.items() if shmid in covered_shmem]
    kept_maps = [n for n in [*tasks, *shmems] if n not in reduced_maps and n not in dropped_shmem]
    kept_ids = _pages_ids(dump_dir, kept_maps)
    next_id = max(kept_ids | _pages_ids(dump_dir, reduced_maps) | {0}) + 1
    files: list[Path] = []
    extra = dropped = 0
    for name in reduced_maps:
        pm = read_pagemap(dump_dir / name)
        addrs = _present_page_addrs(pm, page_size, dump_dir / name)
        keep = ~_covered_mask(addrs, covered[tasks[name]])
        kept = np.flatnonzero(keep)
        extra += len(kept)
        dropped += len(addrs) - len(kept)
        runs = Runs.from_page_addrs(addrs[keep], page_size)
        entries = [PagemapEntry(v, n, PE_PRESENT) for v, n in runs]
        (out_dir / name).write_bytes(encode_pagemap(next_id, entries))
        _copy_pages(dump_dir / pages_name(pm.pages_id), out_dir / pages_name(next_id), kept, page_size)
        files += [out_dir / name, out_dir / pages_name(next_id)]
        next_id += 1
    for name in names:
        path = dump_dir / name
        if (name in reduced_maps or name in dropped_shmem or name in _NOT_SHIPPED
                or not IMAGE_NAME_RE.fullmatch(name)):
            continue
        m = PAGES_RE.fullmatch(name)
        if m is not None and int(m.group(1)) not in kept_ids:
            continue  # the pages of a reduced pagemap: dropped, or copied above
        _link(path, out_dir / name)
        files.append(out_dir / name)
    return Reduced(tuple(files), extra, dropped)


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)  # another filesystem: copy (the chain is read-only to criu)


def _chain(session_dir: Path, restore_dir: Path) -> tuple[Path, int]:
    """``restore_dir/rK`` for every committed round K, linked to its parent; returns the last and
    how many there are."""
    rounds = committed_rounds(session_dir)
    if not rounds:
        raise ImageError(f"{session_dir}: no committed round to restore from")
    last = restore_dir
    for k in rounds:
        src = session_dir / round_dir_name(k)
        dst = restore_dir / f"r{k}"
        dst.mkdir()
        for name in os.listdir(src):
            if name.endswith(".img"):
                _link(src / name, dst / name)
        if k != rounds[0]:
            os.symlink(f"../r{k - 1}", dst / "parent")
        last = dst
    return last, len(rounds)


def _merge(ours: Sequence[PagemapEntry], extra: Sequence[PagemapEntry], where: Path,
           page_size: int) -> list[PagemapEntry]:
    """pagehaul's final entries as PE_PARENT, CRIU's extra pages as PE_PRESENT, in address order."""
    merged = sorted([PagemapEntry(e.vaddr, e.nr_pages, PE_PARENT) for e in ours] + list(extra),
                    key=lambda e: e.vaddr)
    for a, b in itertools.pairwise(merged):
        if a.vaddr + a.nr_pages * page_size > b.vaddr:
            raise ImageError(f"{where}: criu's extra pages at 0x{b.vaddr:x} overlap memory pagehaul moved")
    return merged


def _is_pagemap(name: str) -> bool:
    return bool(TASK_PAGEMAP_RE.fullmatch(name) or SHMEM_PAGEMAP_RE.fullmatch(name))


def assemble(session_dir: Path, restore_dir: Path, shipped_dir: Path, page_size: int) -> Layout:
    """Lay out ``restore_dir`` for ``criu restore -D restore_dir/images`` (see the module doc).

    ``restore_dir`` may exist (the shipped files may live in it) but not its ``rK`` and ``images``;
    the session's own rounds are only linked, never changed. Every pagemap of pagehaul's last
    round is mirrored into ``images`` as PE_PARENT entries, merged with the shipped pagemap of the
    same name if there is one; shipped files without a pagehaul counterpart are linked as they are.
    """
    restore_dir.mkdir(exist_ok=True)
    last, rounds = _chain(session_dir, restore_dir)
    images = restore_dir / IMAGES_SUBDIR
    images.mkdir()
    os.symlink(f"../{last.name}", images / "parent")
    shipped_names = sorted(os.listdir(shipped_dir))
    ids = [read_pagemap(shipped_dir / n).pages_id for n in shipped_names if _is_pagemap(n)]
    next_id = max([0, *ids]) + 1
    extra_pages = 0
    for name in shipped_names:
        if not (_is_pagemap(name) and (last / name).exists()):
            _link(shipped_dir / name, images / name)
    for name in sorted(os.listdir(last)):
        if not _is_pagemap(name):
            continue
        mine = read_pagemap(last / name)
        if name in shipped_names:
            shipped = read_pagemap(shipped_dir / name)
            extra_pages += sum(e.nr_pages for e in shipped.entries)
            entries, pages_id = _merge(mine.entries, shipped.entries, shipped_dir / name, page_size), shipped.pages_id
        else:  # only pagehaul has it: every page is in the chain
            entries, pages_id = _merge(mine.entries, (), last / name, page_size), next_id
            (images / pages_name(pages_id)).touch(exist_ok=False)
            next_id += 1
        (images / name).write_bytes(encode_pagemap(pages_id, entries))
    return Layout(images, rounds, extra_pages)


def tree_pids(root: int) -> list[int]:
    """``root`` and its descendants (through /proc/PID/task/TID/children), parents first.

    Stable only while the tree cannot fork or exit: frozen, stopped, or just restored stopped.
    """
    out, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        out.append(pid)
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as f:
                todo.extend(int(c) for c in f.read().split())
    return out


# criu's complaints that stop nothing (it cannot raise its own RLIMIT_NOFILE in a container).
_HARMLESS: Final = ("rlimit: Can't setup RLIMIT_NOFILE",)


def criu_first_error(log_path: Path) -> str:
    """The first line of a criu log that says Error (and matters), else its last line."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return f"no log at {log_path}"
    for line in lines:
        if "Error" in line and not any(h in line for h in _HARMLESS):
            return line.strip()
    return lines[-1].strip() if lines else "empty log"


async def run_criu(argv: list[str], *, log: Path, timeout_s: float, out: int | IO[bytes] = subprocess.DEVNULL,
                   hint: Callable[[str], str] = lambda _reason: "") -> None:
    """Run ``criu`` (``argv[0]``, command ``argv[1]``) without blocking the event loop.

    Raises PagehaulError when it cannot start, outlives ``timeout_s`` (killed) or fails: the
    message names the first error of its ``log`` (plus ``hint(reason)``) and where the log is.
    """
    what = f"criu {argv[1]}"
    try:
        proc = await asyncio.create_subprocess_exec(*argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    except OSError as err:
        raise PagehaulError(f"cannot run {argv[0]}: {err.strerror}") from err
    try:
        rc = await asyncio.wait_for(proc.wait(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise PagehaulError(f"{what} took longer than {timeout_s:g} s; log: {log}") from None
    if rc != 0:
        reason = criu_first_error(log)
        raise PagehaulError(f"{what} failed (exit {rc}): {reason}{hint(reason)}; log: {log}")


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

"""The destination's half of a full migration: CRIU's shipped images on top of the session's rounds.

``assemble`` lays the session's committed rounds out as CRIU's parent chain (``r0 <- r1 <- ... <-
rN``, hard links; task pagemaps are named by vpid, as CRIU expects) and puts the images the
sender shipped (``sender.reduce``) on top in ``images/``, whose ``parent`` is the last round. A
shipped pagemap is final there (its PE_PARENT entries are checked against the last round); a
pagemap only pagehaul has (nothing shipped for it) is mirrored as PE_PARENT entries.

    layout = assemble(session_dir, restore_dir, shipped_dir, page_size=4096)
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np

from pagehaul.codec import (
    PE_PARENT,
    PE_PRESENT,
    Pagemap,
    PagemapEntry,
    encode_pagemap,
    is_pagemap,
    pages_name,
    read_pagemap,
)
from pagehaul.errors import ImageError
from pagehaul.flatten import flat_dir_name, latest_flat
from pagehaul.runs import Runs
from pagehaul.store import committed_rounds, link_or_copy, round_dir_name

IMAGES_SUBDIR: Final = "images"


@dataclass(frozen=True, slots=True)
class Layout:
    """The assembled restore directory: ``images`` (criu restore's -D) and the round chain it sits on."""

    images: Path
    rounds: int
    extra_pages: int


def _chain(session_dir: Path, restore_dir: Path) -> tuple[Path, int]:
    """``restore_dir/rK`` for the session's committed rounds, each linked to its parent; returns the
    last and how many there are. Rounds a flat directory holds (pagehaul.flatten) are one ``rflat``
    at the bottom; if it is replaced by a newer one meanwhile, the whole chain is used."""
    rounds = committed_rounds(session_dir)
    if not rounds:
        raise ImageError(f"{session_dir}: no committed round to restore from")
    flat = latest_flat(session_dir, below=rounds[-1])
    if flat is not None and flat in rounds:
        try:
            return _link_chain(session_dir, restore_dir, [k for k in rounds if k > flat],
                               base=(session_dir / flat_dir_name(flat), "rflat"))
        except FileNotFoundError:
            for made in restore_dir.glob("r*"):
                shutil.rmtree(made, ignore_errors=True)
    return _link_chain(session_dir, restore_dir, list(rounds))


def _link_chain(session_dir: Path, restore_dir: Path, rounds: list[int],
                base: tuple[Path, str] | None = None) -> tuple[Path, int]:
    layers = ([base] if base is not None else []) + [(session_dir / round_dir_name(k), f"r{k}") for k in rounds]
    last = restore_dir
    for i, (src, name) in enumerate(layers):
        dst = restore_dir / name
        dst.mkdir()
        for entry in os.listdir(src):
            if entry.endswith(".img"):
                link_or_copy(src / entry, dst / entry)
        if i:
            os.symlink(f"../{layers[i - 1][1]}", dst / "parent")
        last = dst
    return last, len(layers)


def _check_final(shipped: Pagemap, held: Pagemap | None, where: Path, page_size: int) -> None:
    """A shipped pagemap is restored as it is: its PE_PARENT pages must be in the last round's
    pagemap (``held``), and it may have no other flags than PE_PRESENT and PE_PARENT."""
    vaddr, nr_pages, flags = shipped.arrays()
    bad = np.flatnonzero(~np.isin(flags, (PE_PRESENT, PE_PARENT)))
    if bad.size:
        raise ImageError(f"{where}: entry 0x{int(vaddr[bad[0]]):x} has flags {int(flags[bad[0]]):#x}")
    parent = flags == PE_PARENT
    if not parent.any():
        return
    if held is None:
        raise ImageError(f"{where}: PE_PARENT entries but pagehaul holds no such image")
    hv, hn, hf = held.arrays()
    usable = (hf & np.uint32(PE_PRESENT | PE_PARENT)) != 0
    have = Runs(hv[usable], hn[usable]).sorted()
    want = Runs(vaddr[parent], nr_pages[parent])
    if have.is_sorted_disjoint(page_size):
        # Run against run, not page against page (the page list grows with memory, the runs do not): a
        # PE_PARENT run that lies inside one run of the held entries, coalesced, is held.
        merged = have.merged(page_size)
        i = np.searchsorted(merged.vaddr, want.vaddr, side="right") - 1
        inside = (i >= 0) & (want.ends(page_size) <= merged.ends(page_size)[np.maximum(i, 0)])
        if inside.all():
            return
        want = Runs(want.vaddr[~inside], want.nr_pages[~inside])
    wanted = want.page_addrs(page_size)
    lacking = ~np.isin(wanted, have.page_addrs(page_size))
    if lacking.any():
        raise ImageError(f"{where}: PE_PARENT page 0x{int(wanted[lacking][0]):x} is not in the session's last round")



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
    ids = [read_pagemap(shipped_dir / n).pages_id for n in shipped_names if is_pagemap(n)]
    next_id = max([0, *ids]) + 1
    extra_pages = 0
    for name in shipped_names:
        if is_pagemap(name):
            shipped = read_pagemap(shipped_dir / name)
            _check_final(shipped, read_pagemap(last / name) if (last / name).exists() else None,
                         shipped_dir / name, page_size)
            extra_pages += sum(e.nr_pages for e in shipped.entries if e.flags & PE_PRESENT)
        link_or_copy(shipped_dir / name, images / name)
    for name in sorted(os.listdir(last)):
        if not is_pagemap(name) or name in shipped_names:
            continue
        # Only pagehaul has it (shared memory CRIU did not dump): every page is in the chain.
        mine = read_pagemap(last / name)
        entries = [PagemapEntry(e.vaddr, e.nr_pages, PE_PARENT) for e in mine.entries]
        (images / pages_name(next_id)).touch(exist_ok=False)
        (images / name).write_bytes(encode_pagemap(next_id, entries))
        next_id += 1
    return Layout(images, rounds, extra_pages)

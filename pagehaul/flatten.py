"""A session's round chain, flattened: one pagemap and one pages file per image, in address order.

CRIU restores a page held in an older round by walking the ``parent`` links one entry at a time
(criu/pagemap.c ``read_parent_page``): after many pre-copy rounds that is many small reads per
run, and restoring from the chain takes several times as long as from a plain dump. So while
pre-copy goes on, the receiver folds each committed live round with everything before it into
``flat-K`` (every page as round K restores it, PE_PRESENT only), off the frozen window; at
restore the chain is ``flat-K <- round K+1 <- ... <- round N``, two or three levels instead of
all of them. The per-round directories stay as they are for ``inspect`` and ``verify``.

A flat directory is derived data: it is written under a temporary name and renamed when
complete (no fsync: after a crash it is made again, or the chain is used whole).
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from pathlib import Path
from typing import Final

from pagehaul.codec import PE_PRESENT, ImageKey, PagemapEntry, encode_pagemap, is_pagemap, pages_name
from pagehaul.store import open_round, round_dir_name, write_all

FLAT_PREFIX: Final = "flat-"
_FLAT_RE: Final = re.compile(r"flat-(\d+)")
_CHUNK_PAGES: Final = 1 << 14  # read and written 64 MiB at a time (4 KiB pages)


def flat_dir_name(round_no: int) -> str:
    return f"{FLAT_PREFIX}{round_no}"


def latest_flat(session_dir: Path, below: int) -> int | None:
    """The newest complete ``flat-K`` with K < ``below``, if any."""
    found = [int(m.group(1)) for name in os.listdir(session_dir) if (m := _FLAT_RE.fullmatch(name))]
    usable = [k for k in found if k < below]
    return max(usable) if usable else None


class FlattenStopped(Exception):
    """``stop`` was set while flattening: nothing was left behind."""


def flatten_round(session_dir: Path, round_no: int, page_size: int, *, stop: threading.Event | None = None) -> Path:
    """Write ``flat-ROUND`` for a committed round (module doc), drop older flat directories, and
    return its path. Setting ``stop`` ends it early (FlattenStopped), between two chunks."""
    src = session_dir / round_dir_name(round_no)
    out = session_dir / flat_dir_name(round_no)
    tmp = session_dir / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for pages_id, name in enumerate(sorted(n for n in os.listdir(src) if is_pagemap(n)), 1):
            key = ImageKey.of_pagemap_name(name)
            assert key is not None
            _flatten_image(src, tmp, name, key.id, shmem=key.kind == "shmem", pages_id=pages_id,
                           page_size=page_size, stop=stop)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for name in os.listdir(session_dir):
        m = _FLAT_RE.fullmatch(name)
        if m is not None and int(m.group(1)) < round_no:
            shutil.rmtree(session_dir / name, ignore_errors=True)
    return out


def _flatten_image(src: Path, dst: Path, name: str, image_id: int, *, shmem: bool, pages_id: int,
                   page_size: int, stop: threading.Event | None) -> None:
    with open_round(src, image_id, page_size, shmem=shmem) as chain, \
            open(dst / pages_name(pages_id), "xb", buffering=0) as pages:
        runs = chain.present_runs()
        offset = 0
        for vaddr, nr in runs:
            for first in range(0, nr, _CHUNK_PAGES):
                if stop is not None and stop.is_set():
                    raise FlattenStopped(f"{src}: flattening stopped")
                n = min(_CHUNK_PAGES, nr - first)
                data = chain.read_range(vaddr + first * page_size, n)
                write_all(pages.fileno(), memoryview(data), dst / pages_name(pages_id), offset)
                offset += len(data)
    entries = [PagemapEntry(v, n, PE_PRESENT) for v, n in runs]
    (dst / name).write_bytes(encode_pagemap(pages_id, entries))

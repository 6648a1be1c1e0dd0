"""``pagehaul inspect DIR``: what an image set holds, the way ``crit show`` would tell it for memory.

DIR is a session directory (``round-N`` subdirectories) or one round directory. For each round:
the pagemap files, entries, pages present in the round, pages left to the parent, known-zero pages
(from pagehaul's sidecar), file sizes, and the parent chain. ``--json`` for scripts.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.table import Table

from cli.report import human_bytes, make_console
from pagehaul import codec, store
from pagehaul.errors import ImageError


@dataclass(slots=True)
class PagemapSummary:
    pid: int  # the vpid, or the shmid of a shared-memory object (``kind`` "shmem")
    pages_id: int
    entries: int
    pages_present: int
    pages_parent: int
    pages_lazy: int
    pages_file_bytes: int
    kind: str = "pid"
    pages_zero: int = 0


@dataclass(slots=True)
class RoundSummary:
    directory: str
    parent: str | None
    inventory: dict[str, object]
    pagemaps: list[PagemapSummary] = field(default_factory=list)
    pages_zero: int = 0
    bytes_total: int = 0


def _round_dirs(path: Path) -> list[Path]:
    if (path / "inventory.img").exists():
        return [path]
    rounds = store.committed_rounds(path)
    if not rounds:
        raise ImageError(f"{path}: neither a round directory (no inventory.img) nor a session (no round-N)")
    return [path / store.round_dir_name(n) for n in rounds]


def summarize_round(round_dir: Path) -> RoundSummary:
    parent = os.readlink(round_dir / "parent") if (round_dir / "parent").is_symlink() else None
    inv = codec.decode_inventory((round_dir / "inventory.img").read_bytes())
    summary = RoundSummary(
        round_dir.name, parent,
        {k: v for k, v in asdict(inv).items() if k != "other_fields" and v is not None},
    )
    for name in sorted(os.listdir(round_dir)):
        key = codec.ImageKey.of_pagemap_name(name)
        if key is None:
            continue
        pm = codec.read_pagemap(round_dir / name)
        present = sum(e.nr_pages for e in pm.entries if e.flags & codec.PE_PRESENT)
        parent_pages = sum(e.nr_pages for e in pm.entries if e.flags & codec.PE_PARENT)
        lazy = sum(e.nr_pages for e in pm.entries if e.flags & codec.PE_LAZY)
        pages_file = round_dir / codec.pages_name(pm.pages_id)
        size = pages_file.stat().st_size if pages_file.exists() else 0
        summary.pagemaps.append(PagemapSummary(key.id, pm.pages_id, len(pm.entries), present,
                                               parent_pages, lazy, size, key.kind))
    infos = store.read_round_infos(round_dir)
    if infos is not None:
        for pms in summary.pagemaps:
            info = infos.get(codec.ImageKey("shmem" if pms.kind == "shmem" else "pid", pms.pid))
            pms.pages_zero = info.zero_runs.total_pages if info is not None else 0
        summary.pages_zero = sum(info.zero_runs.total_pages for info in infos.values())
    summary.bytes_total = sum(p.stat().st_size for p in round_dir.iterdir() if p.is_file() and not p.is_symlink())
    return summary


def _pagemap_name(pm: PagemapSummary) -> str:
    return codec.ImageKey("shmem" if pm.kind == "shmem" else "pid", pm.pid).pagemap_name


def inspect(path: Path, as_json: bool = False) -> int:
    rounds = [summarize_round(d) for d in _round_dirs(path)]
    if as_json:
        json.dump({"path": str(path), "rounds": [asdict(r) for r in rounds]}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    console = make_console()
    table = Table(title=f"{path}", title_justify="left")
    for col in ("round", "parent", "pagemap", "entries", "present", "in parent", "zero", "pages file", "total"):
        table.add_column(col, justify="right")
    for r in rounds:
        pagemaps: list[PagemapSummary | None] = list(r.pagemaps) or [None]
        for pm in pagemaps:
            table.add_row(
                r.directory, r.parent or "-", _pagemap_name(pm) if pm else "-",
                f"{pm.entries:,}" if pm else "-", f"{pm.pages_present:,}" if pm else "-",
                f"{pm.pages_parent:,}" if pm else "-", f"{pm.pages_zero if pm else r.pages_zero:,}",
                human_bytes(pm.pages_file_bytes) if pm else "-", human_bytes(r.bytes_total))
    console.print(table)
    chain = " <- ".join(r.directory for r in reversed(rounds))
    console.print(f"chain: {chain}; inventory of the last round: {rounds[-1].inventory}")
    return 0

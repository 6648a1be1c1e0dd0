"""Full migrations of processes that take signals all the time, checked against CRIU's own dump.

A process restored by ``pagehaul migrate`` gets its registers from CRIU's dump and its memory
from pagehaul's rounds (plus what only CRIU had). Both must describe the same instant: a signal
delivered in between (a 1 ms interval timer firing while the tree is frozen, a SIGCHLD, a queued
real-time signal) writes a handler frame onto the stack, and a restored process whose registers
point into that handler but whose stack lacks the frame crashes or corrupts itself.

So each test migrates ``python -m pagehaul.selfcheck --signals`` (handlers for SIGALRM at 1 ms,
SIGRTMIN+2 queued by a thread, SIGCHLD from children forked every 5 ms) several times, back and
forth between the two hosts, and checks after each move that
- every page the destination restores equals CRIU's own dump of the same frozen instant, byte for
  byte (CRIU's local dump is kept with ``--keep-dump``; both image sets are read the way CRIU
  reads them, parents and all), and
- the restored copy keeps running and verifying its memory and its signal counters.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pagehaul.criu_tools import CriuTools
from pagehaul.runs import Runs
from pagehaul.store import open_round
from tests.helpers.netns import Side, TwoHosts
from tests.integration.test_full_migration import (
    alive,
    in_pidns,
    kill_restored,
    log_lines,
    migrate_ok,
    passes_by_pid,
    receiver_in_b,
    wait_for,
)

pytestmark = pytest.mark.criu

PAGE = os.sysconf("SC_PAGE_SIZE")
MIGRATIONS = 3
STORM = [sys.executable, "-m", "pagehaul.selfcheck", "--size-mib", "16", "--regions", "16", "--rate-mib-s", "48",
         "--signals"]


def restored_equals_criu_dump(criu_dir: Path, images_dir: Path) -> list[str]:
    """Differences between what ``criu restore -D images_dir`` and ``-D criu_dir`` would put in
    memory, for every task and shared-memory pagemap of CRIU's dump (empty: none)."""
    problems: list[str] = []
    names = sorted(n for n in os.listdir(criu_dir) if n.startswith("pagemap-") and n.endswith(".img"))
    assert names, f"no pagemaps in {criu_dir}"
    for name in names:
        stem = name[len("pagemap-"):-len(".img")]
        shmem = name.startswith("pagemap-shmem-")
        ident = int(stem.split("-")[-1])
        with open_round(criu_dir, ident, PAGE, shmem=shmem) as theirs, \
                open_round(images_dir, ident, PAGE, shmem=shmem) as ours:
            want = theirs.present_runs().page_addrs(PAGE)
            have = ours.present_runs().page_addrs(PAGE)
            extra = np.setdiff1d(have, want)
            if extra.size:
                problems.append(f"{name}: {extra.size} page(s) restored that CRIU's dump does not have, "
                                f"first 0x{int(extra[0]):x}")
            for vaddr, n in Runs.from_page_addrs(want, PAGE):
                a = theirs.read_range(vaddr, n)
                b = ours.read_range(vaddr, n, absent_as_zero=True)
                if a != b:
                    pages = np.flatnonzero(np.frombuffer(a, np.uint8).reshape(n, PAGE)
                                           != np.frombuffer(b, np.uint8).reshape(n, PAGE)).size
                    first = next(i for i in range(n) if a[i * PAGE:(i + 1) * PAGE] != b[i * PAGE:(i + 1) * PAGE])
                    problems.append(f"{name}: bytes differ in {pages} byte(s) of run 0x{vaddr:x}+{n}, "
                                    f"first page 0x{vaddr + first * PAGE:x}")
    return problems


def rseq_pages(criu: CriuTools, dump_dir: Path) -> set[str]:
    """Each thread's rseq area, as "pagemap-VPID.img 0xPAGE": the kernel writes its cpu_id when a
    thread runs (CRIU's parasite runs the threads during the dump), so it may differ from what
    pagehaul read; CRIU saves and restores it."""
    out = set()
    for task in criu.crit_decode(dump_dir / "pstree.img")["entries"]:
        for tid in task["threads"]:
            core = dump_dir / f"core-{tid}.img"
            if not core.exists():
                continue  # a zombie: no threads, no memory
            for entry in criu.crit_decode(core)["entries"]:
                pointer = int(entry.get("thread_core", {}).get("rseq_entry", {}).get("rseq_abi_pointer", 0))
                if pointer:
                    out.add(f"pagemap-{task['pid']}.img 0x{pointer // PAGE * PAGE:x}")
    return out


def assert_restored_is_criu_instant(result: dict[str, Any], criu: CriuTools, what: str) -> None:
    """Every restored page equals CRIU's kept dump, and nothing but a thread's rseq area changed
    between pagehaul's final round and CRIU's dump (nothing ran in between)."""
    dump_dir = Path(result["dump_dir"])
    problems = restored_equals_criu_dump(dump_dir, Path(result["images_dir"]))
    assert not problems, f"{what}: restored memory is not CRIU's frozen instant: {problems[:5]}"
    unexplained = set(result["changed_at"]) - rseq_pages(criu, dump_dir)
    assert not unexplained, f"{what}: pages changed after pagehaul's final round: {unexplained}"


@pytest.mark.parametrize("dump", ["lazy", "full"])
def test_signal_storm_process_survives_repeated_migrations(hosts: TwoHosts, tmp_path: Path, criu_tools: CriuTools,
                                                           dump: str) -> None:
    """``lazy`` (the default): CRIU leaves private anonymous memory in the source, the tracker proves
    it unchanged since the final round (or it is read and shipped), and the kept dump is completed
    from the stopped source for the comparison. ``full``: CRIU copies all memory, compared by digest."""
    log = tmp_path / "storm.log"
    moved = survived = 0
    with in_pidns(hosts, [*STORM, "--log", str(log)]) as first:
        pid = first
        side_now: Side = "a"
        wait_for("a first verified pass", lambda: bool(log_lines(log, "pass ")))
        try:
            for i in range(MIGRATIONS):
                dest: Side = "b" if side_now == "a" else "a"
                work = tmp_path / f"move-{i}"
                work.mkdir()
                # The lazy case also restores through flattened rounds (receive --flatten).
                flatten = ["--flatten"] if dump == "lazy" else []
                with receiver_in_b(hosts, work, "--restore", "--criu", str(criu_tools.criu), *flatten,
                                   side=dest) as address:
                    result = migrate_ok(hosts, work, pid, address, criu_tools, "--keep-dump",
                                        *(["--full-dump"] if dump == "full" else []), side=side_now)
                assert result["lazy_dump"] == (dump == "lazy")
                moved += 1
                restored = result["restored_pid"]
                wait_for("the source to be gone", lambda p=pid: not alive(p), 10)  # type: ignore[misc]
                assert_restored_is_criu_instant(result, criu_tools, f"migration {i + 1}")
                pid, side_now = restored, dest
                at_move = sum(passes_by_pid(log).values())
                wait_for("two more verified passes after the move",
                         lambda n=at_move, p=pid: sum(passes_by_pid(log).values()) >= n + 2  # type: ignore[misc]
                         or bool(log_lines(log, "BAD")) or not alive(p))
                assert not log_lines(log, "BAD"), log.read_text()[-500:]
                assert alive(pid), f"migration {i + 1}: the restored copy died"
                survived += 1
        finally:
            if pid != first:
                kill_restored(pid)
    assert (moved, survived) == (MIGRATIONS, MIGRATIONS)

"""Lazy restore (``receive --restore --lazy-restore``, receiver/lazy.py): the restored tree runs
before its memory is all in, the receiver fills it as CRIU's lazy-pages daemon.

- a self-checking process that takes signals all the time and forks children every few
  milliseconds (userfaultfd FORK events while pages are missing) is migrated with the lazy
  restore: it keeps running and verifying itself on B, the images the receiver restored from equal
  CRIU's dump of the frozen instant page by page, and pages went in after the tree was continued
  (the restore no longer reads all memory before the tree runs);
- a stopped process is restored lazily from a two-level image chain (PE_PARENT|PE_LAZY and
  PE_PRESENT|PE_LAZY entries) and left stopped: once the daemon reports every page in, its memory
  equals the images page by page (pagehaul.oracle through /proc/PID/mem);
- when the daemon fails while pages are missing (a pages file cut short under it), the restored
  tree is killed and the error says why;
- when the receiver itself is SIGKILLed while pages are missing and the tree runs (a kill point
  before the daemon's first background push), its guard (receiver/lazy_guard.py) kills the tree
  before the userfaultfds close: the workload never reads a zero where its memory should be.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pagehaul import procfs
from pagehaul.codec import (
    PE_PARENT,
    PE_PRESENT,
    PagemapEntry,
    encode_pagemap,
    pages_name,
    read_pagemap,
)
from pagehaul.criu_tools import CriuTools
from pagehaul.killpoints import ENV as KILL_AT
from pagehaul.procfs import process_tree
from pagehaul.store import open_round
from receiver.lazy import LazyError, finish_lazy_restore, start_lazy_restore
from tests.helpers.netns import TwoHosts
from tests.integration.test_full_migration import (
    alive,
    in_pidns,
    kill_restored,
    log_lines,
    migrate,
    migrate_ok,
    receiver_in_b,
    state,
    wait_for,
)
from tests.integration.test_signal_migration import assert_restored_is_criu_instant, rseq_pages

pytestmark = pytest.mark.criu

PAGE = os.sysconf("SC_PAGE_SIZE")
STORM = [sys.executable, "-m", "pagehaul.selfcheck", "--size-mib", "64", "--regions", "16", "--rate-mib-s", "32",
         "--signals"]


def test_lazily_restored_process_keeps_verifying_and_is_criu_instant(hosts: TwoHosts, tmp_path: Path,
                                                                     criu_tools: CriuTools) -> None:
    log = tmp_path / "storm.log"
    with in_pidns(hosts, [*STORM, "--log", str(log)]) as pid:
        wait_for("a first verified pass", lambda: bool(log_lines(log, "pass ")))
        with receiver_in_b(hosts, tmp_path, "--restore", "--lazy-restore", "--criu", str(criu_tools.criu)) as address:
            result = migrate_ok(hosts, tmp_path, pid, address, criu_tools, "--keep-dump")
        restored = result["restored_pid"]
        try:
            wait_for("the source to be gone", lambda: not alive(pid), 10)
            assert alive(restored)
            assert state(restored) != "T"
            # What the receiver restored from is CRIU's frozen instant; the daemon served exactly it.
            assert_restored_is_criu_instant(result, criu_tools, "lazy restore")
            at_move = len(log_lines(log, "pass "))
            wait_for("two more verified passes on B",
                     lambda: len(log_lines(log, "pass ")) >= at_move + 2 or bool(log_lines(log, "BAD")))
            assert not log_lines(log, "BAD"), log.read_text()[-800:]
            assert alive(restored)
        finally:
            kill_restored(restored)
    # The memory was not read before the tree ran: the daemon had all of the workload's pages to
    # put in, and put some in after the tree was continued.
    assert result["lazy_pages"] >= (64 << 20) // PAGE
    assert result["lazy_after_resume_pages"] > 0
    d = result["downtime"]
    assert d["lazy_fill_us"] > 0
    assert d["total_us"] >= d["final_round_us"] + d["criu_dump_us"] + d["restore_us"] > 0


# --- restored from a chain, checked while stopped ----------------------------------------------


def _stopped_workload(tmp_path: Path) -> tuple[subprocess.Popen[bytes], int, Path]:
    log = tmp_path / "w.log"
    outer = subprocess.Popen(["unshare", "--pid", "--fork", "setsid", sys.executable, "-m", "pagehaul.selfcheck",
                              "--log", str(log), "--size-mib", "32", "--regions", "8", "--rate-mib-s", "64"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children = Path(f"/proc/{outer.pid}/task/{outer.pid}/children")
    wait_for("the workload's first pass", lambda: bool(log_lines(log, "pass ")) or outer.poll() is not None)
    inner = int(children.read_text().split()[0])
    os.kill(inner, signal.SIGSTOP)
    wait_for("the workload to stop", lambda: state(inner) == "T")
    return outer, inner, log


def _criu_dump(criu: CriuTools, pid: int, into: Path) -> None:
    """A plain (eager) criu dump of the stopped workload, which it kills."""
    proc = subprocess.run([str(criu.criu), "dump", "-t", str(pid), "-D", str(into), "-o", "dump.log", "--shell-job"],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, (into / "dump.log").read_text()[-2000:]


def _split_into_chain(dump: Path, top: Path) -> None:
    """``dump`` (CRIU's own images) becomes the parent of ``top``: every task pagemap in ``top`` has
    every other entry's first half PE_PARENT and the rest PE_PRESENT in a new pages file."""
    top.mkdir()
    os.symlink(f"../{dump.name}", top / "parent")
    for name in os.listdir(dump):
        src = dump / name
        if not src.is_file() or name.startswith(("pages-", "stats-")) or name.endswith(".log"):
            continue
        if not (name.startswith("pagemap-") and not name.startswith("pagemap-shmem-")):
            os.link(src, top / name)
            continue
        pm = read_pagemap(src)
        new_id = 1000 + pm.pages_id
        entries, data, off = [], bytearray(), 0
        with open(dump / pages_name(pm.pages_id), "rb") as f:
            for i, e in enumerate(pm.entries):
                assert e.flags & PE_PRESENT
                size = e.nr_pages * PAGE
                f.seek(off)
                chunk = f.read(size)
                off += size
                half = e.nr_pages // 2 if i % 2 == 0 else 0
                if half:
                    entries.append(PagemapEntry(e.vaddr, half, PE_PARENT))
                rest = e.nr_pages - half
                entries.append(PagemapEntry(e.vaddr + half * PAGE, rest, PE_PRESENT))
                data += chunk[half * PAGE:]
        (top / pages_name(new_id)).write_bytes(bytes(data))
        (top / name).write_bytes(encode_pagemap(new_id, entries))


def _differing_pages(images: Path, pid: int, vpid: int) -> set[int]:
    """Pages of ``pid`` (stopped) that differ from what ``criu restore`` puts there from ``images``:
    every page of its anonymous private mappings (absent from the pagemap: zero) and the pages the
    images hold in its other mappings."""
    out: set[int] = set()
    with open_round(images, vpid, PAGE) as image, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        held = image.present_runs()
        spans = [(v.start, v.end) for v in procfs.select_dumpable(procfs.read_maps(pid))
                 if v.kind != procfs.VmaKind.FILE_PRIVATE]
        spans += [(a, a + n * PAGE) for a, n in held]
        for start, end in spans:
            want = np.frombuffer(image.read_range(start, (end - start) // PAGE, absent_as_zero=True), np.uint8)
            got = np.frombuffer(os.pread(mem.fileno(), end - start, start), np.uint8)
            bad = np.flatnonzero((want.reshape(-1, PAGE) != got.reshape(-1, PAGE)).any(axis=1))
            out.update(start + int(i) * PAGE for i in bad)
    return out


def _rseq_pages(criu: CriuTools, dump: Path) -> set[int]:
    return {int(entry.split()[1], 16) for entry in rseq_pages(criu, dump)}


def test_lazy_restore_from_a_chain_fills_every_page(tmp_path: Path, criu_tools: CriuTools) -> None:
    outer, pid, _log = _stopped_workload(tmp_path)
    dump, images = tmp_path / "restore" / "dump", tmp_path / "restore" / "images"
    dump.mkdir(parents=True)
    try:
        _criu_dump(criu_tools, pid, dump)
    finally:
        outer.wait(30)
    _split_into_chain(dump, images)

    async def restore() -> tuple[int, int, int]:
        lazy = await start_lazy_restore(criu_tools.criu, images, timeout_s=60, options=["--shell-job"],
                                        continue_tree=lambda _root: None)
        stats = await finish_lazy_restore(lazy, 60)
        return lazy.root, stats.lazy_pages, stats.copied_pages

    root, lazy_pages, copied = asyncio.run(restore())
    try:
        assert state(root) == "T", "restored stopped, as dumped"
        assert lazy_pages >= (32 << 20) // PAGE
        assert copied >= lazy_pages
        assert process_tree(root) == [root]
        differ = _differing_pages(images, root, vpid=1)
        # Like an eager restore of the same images: each thread's rseq area differs (the kernel
        # writes its cpu_id when the thread runs CRIU's restorer), nothing else.
        assert differ <= _rseq_pages(criu_tools, dump), [hex(a) for a in sorted(differ - _rseq_pages(criu_tools, dump))]
        assert len(differ) <= 2
    finally:
        kill_restored(root)


def test_daemon_failure_kills_the_restored_tree(tmp_path: Path, criu_tools: CriuTools) -> None:
    outer, pid, _log = _stopped_workload(tmp_path)
    images = tmp_path / "restore" / "images"
    images.mkdir(parents=True)
    try:
        _criu_dump(criu_tools, pid, images)
    finally:
        outer.wait(30)
    biggest = max(images.glob("pages-*.img"), key=lambda p: p.stat().st_size)
    roots: list[int] = []

    def cut_then_continue(root: int) -> None:
        roots.append(root)
        os.truncate(biggest, 0)  # the daemon's source of most pages is gone before it pushes them

    async def restore() -> None:
        lazy = await start_lazy_restore(criu_tools.criu, images, timeout_s=60, options=["--shell-job"],
                                        continue_tree=cut_then_continue)
        await finish_lazy_restore(lazy, 60)

    with pytest.raises(LazyError, match="lazy-pages daemon failed"):
        asyncio.run(restore())
    wait_for("the restored tree to be killed", lambda: not alive(roots[0]), 10)
    shutil.rmtree(images.parent, ignore_errors=True)


# The receiver's part of a lazy restore, in a process of its own so that it can die: it restores,
# continues the tree, prints the root's pid and waits for the fill (the kill point ends it first).
_RECEIVER = """
import asyncio, sys
from pathlib import Path
from receiver.lazy import finish_lazy_restore, start_lazy_restore
from receiver.restore import continue_tree

def cont(root):
    continue_tree(root)
    print("root", root, flush=True)

async def main():
    lazy = await start_lazy_restore(Path(sys.argv[1]), Path(sys.argv[2]), timeout_s=60, options=["--shell-job"],
                                    continue_tree=cont)
    await finish_lazy_restore(lazy, 60)

asyncio.run(main())
"""

# A child subreaper around it: the restored root (criu's child, orphaned when criu exits) and the
# guard become its children, so how each ended is known: "exit PID STATUS" per child reaped.
_REAPER = """
import ctypes, os, subprocess, sys
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
subprocess.Popen(sys.argv[1:])
while True:
    try:
        pid, status = os.wait()
    except ChildProcessError:
        break
    print("exit", pid, status, flush=True)
"""


def test_receiver_killed_during_the_fill_takes_the_tree_with_it(tmp_path: Path, criu_tools: CriuTools) -> None:
    outer, pid, log = _stopped_workload(tmp_path)
    images = tmp_path / "restore" / "images"
    images.mkdir(parents=True)
    try:
        _criu_dump(criu_tools, pid, images)
    finally:
        outer.wait(30)
    passes = len(log_lines(log, "pass "))
    env = {**os.environ, KILL_AT: "lazy.push", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    argv = [sys.executable, "-c", _REAPER, sys.executable, "-c", _RECEIVER, str(criu_tools.criu), str(images)]
    try:
        out = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
                             check=False).stdout
    except subprocess.TimeoutExpired as err:  # the restored tree ran on: the failure this test is about
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
    words = [line.split() for line in out.splitlines()]
    root = next(int(w[1]) for w in words if w[0] == "root")
    ended = {int(w[1]): int(w[2]) for w in words if w[0] == "exit"}
    try:
        # The tree ran with most of its pages missing when the receiver died: the guard killed it
        # (SIGKILL), it did not crash on zeros, verify zeros or run on.
        assert root in ended, f"the restored tree outlived its receiver: {out}"
        assert os.WIFSIGNALED(ended[root]), (ended[root], out)
        assert os.WTERMSIG(ended[root]) == signal.SIGKILL, (ended[root], out)
        assert not log_lines(log, "BAD"), log.read_text()[-800:]
        assert len(log_lines(log, "pass ")) <= passes + 1
    finally:
        kill_restored(root)
        shutil.rmtree(images.parent, ignore_errors=True)


def test_receiver_killed_during_the_fill_of_a_migration(hosts: TwoHosts, tmp_path: Path, criu_tools: CriuTools,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same through ``pagehaul migrate``: the connection breaks after every image reached the
    receiver, so the sender cannot know whether B runs the tree and leaves the source stopped, never
    killed (RestoreUnknown, exit 10); the half-filled restored tree is dead, so continuing the source
    by hand is safe."""
    log = tmp_path / "storm.log"
    with in_pidns(hosts, [*STORM, "--log", str(log)]) as pid:
        wait_for("a first verified pass", lambda: bool(log_lines(log, "pass ")))
        monkeypatch.setenv(KILL_AT, "lazy.push")
        with receiver_in_b(hosts, tmp_path, "--restore", "--lazy-restore", "--criu", str(criu_tools.criu)) as address:
            monkeypatch.delenv(KILL_AT)
            rc, _, err = migrate(hosts, tmp_path, pid, address, criu_tools)
        assert rc == 10, err[-2000:]
        assert "Traceback" not in err
        pidfiles = list((tmp_path / "images-b").glob("*/restore-*/images/restore.pid"))
        assert len(pidfiles) == 1, "criu restored the tree before the receiver died"
        restored = int(pidfiles[0].read_text())
        try:
            wait_for("the restored tree to be killed", lambda: not alive(restored), 10)
            # By the guard (how it died is the test above's: this process is not its parent).
            assert "killed the restored tree" in (tmp_path / "receiver-b.log").read_text()
            assert alive(pid)
            assert state(pid) == "T", "the source is left stopped"
            passes = len(log_lines(log, "pass "))
            os.kill(pid, signal.SIGCONT)  # what the error tells the operator to do once B is checked
            wait_for("the source to go on verifying", lambda: len(log_lines(log, "pass ")) > passes)
            assert not log_lines(log, "BAD"), log.read_text()[-800:]
        finally:
            kill_restored(restored)

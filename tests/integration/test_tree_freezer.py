"""Freezing whole trees: the ptrace tree freezer against a parent that forks and reaps without
pause, and the cgroup v2 freezer."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from pagehaul import procfs
from pagehaul.errors import ProcessGone
from sender.tree import CgroupFreezer, PtraceTreeFreezer, TargetSpec, discover, make_tree_freezer
from tests.helpers.children import child_env, stop_child, wait_until
from tests.helpers.tree_child import FORKER_CHILD

CGROUP2 = procfs.cgroup2_mount()


@pytest.fixture
def forker() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", FORKER_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env=child_env())
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith(b"READY ")
        wait_until(lambda: len(procfs.process_tree(proc.pid)) > 4, "the forker to have children")
        yield proc
    finally:
        kids = procfs.process_tree(proc.pid) if proc.poll() is None else []
        for pid in kids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        stop_child(proc)  # children forked meanwhile die with it (PR_SET_PDEATHSIG)


def traced_stopped(pid: int) -> bool:
    return all(procfs.read_status(t).state == "t" and procfs.read_status(t).tracer_pid == os.getpid()
               for t in procfs.list_threads(pid))


def forked_since(root: int, tree: list[int]) -> Callable[[], bool]:
    held = set(tree)
    return lambda: not set(procfs.process_tree(root)) <= held


def test_ptrace_tree_freezer_holds_a_forking_tree(forker: subprocess.Popen[bytes]) -> None:
    spec = TargetSpec(pid=forker.pid)
    for _ in range(5):
        freezer = PtraceTreeFreezer(spec)
        freezer.freeze()
        try:
            # Stable: nothing forks or exits while frozen, and every process of the tree is held.
            tree = [p for p in procfs.process_tree(forker.pid) if procfs.read_status(p).state != "Z"]
            assert tree == freezer.pids  # zombies (killed, not reaped yet) are not held
            assert [p for p in procfs.process_tree(forker.pid) if procfs.read_status(p).state != "Z"] == tree
            assert all(traced_stopped(pid) for pid in tree)
            assert freezer.freezing_time_us > 0
        finally:
            freezer.thaw()
        assert not freezer.frozen
        # Running again: it keeps forking and reaping.
        wait_until(forked_since(forker.pid, tree), "the forker to fork again")


def test_ptrace_tree_freezer_leaves_the_tree_stopped(forker: subprocess.Popen[bytes]) -> None:
    freezer = PtraceTreeFreezer(TargetSpec(pid=forker.pid))
    freezer.freeze()
    tree = freezer.pids
    freezer.thaw(leave_stopped=True)
    try:
        for pid in tree:
            assert {procfs.read_status(t).state for t in procfs.list_threads(pid)} == {"T"}
            assert procfs.read_status(pid).tracer_pid == 0
    finally:
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):  # the forker may already have killed it
                os.kill(pid, signal.SIGCONT)


def test_gone_root_is_process_gone() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    with pytest.raises(ProcessGone, match=f"process {proc.pid}"):
        PtraceTreeFreezer(TargetSpec(pid=proc.pid)).freeze()
    with pytest.raises(ProcessGone):
        discover(TargetSpec(pid=proc.pid))


@pytest.mark.skipif(CGROUP2 is None or not os.access(CGROUP2, os.W_OK), reason="no writable cgroup v2 hierarchy")
def test_cgroup_freezer_freezes_a_forking_tree_atomically(forker: subprocess.Popen[bytes]) -> None:
    assert CGROUP2 is not None
    path = CGROUP2 / f"pagehaul-test-{secrets.token_hex(4)}"
    path.mkdir()
    try:
        for pid in procfs.process_tree(forker.pid):  # children forked later are born inside
            with contextlib.suppress(ProcessLookupError, OSError):
                (path / "cgroup.procs").write_text(f"{pid}\n")
        spec = TargetSpec(cgroup=path)
        freezer = make_tree_freezer(spec, discover(spec))
        assert isinstance(freezer, CgroupFreezer)
        freezer.freeze()
        try:
            assert b"frozen 1" in (path / "cgroup.events").read_bytes()
            assert freezer.pids == procfs.cgroup_procs(path)
            assert procfs.cgroup_procs(path) == freezer.pids  # nothing forks while frozen
        finally:
            freezer.thaw()
        assert b"frozen 0" in (path / "cgroup.events").read_bytes()
    finally:
        stop_child(forker)
        for pid in procfs.cgroup_procs(path):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not procfs.cgroup_procs(path), f"cgroup {path} to empty")
        path.rmdir()


@pytest.mark.skipif(CGROUP2 is None or not os.access(CGROUP2, os.W_OK), reason="no writable cgroup v2 hierarchy")
def test_cgroup_target_without_the_cgroup_freezer_uses_ptrace(forker: subprocess.Popen[bytes]) -> None:
    assert CGROUP2 is not None
    path = CGROUP2 / f"pagehaul-test-{secrets.token_hex(4)}"
    path.mkdir()
    try:
        (path / "cgroup.procs").write_text(f"{forker.pid}\n")
        spec = TargetSpec(cgroup=path)
        freezer = make_tree_freezer(spec, discover(spec), use_cgroup=False)
        assert isinstance(freezer, PtraceTreeFreezer)
        freezer.freeze()
        try:
            live = [p for p in procfs.cgroup_procs(path) if procfs.read_status(p).state != "Z"]
            assert freezer.pids == live
            assert all(traced_stopped(pid) for pid in live)
        finally:
            freezer.thaw()
    finally:
        stop_child(forker)
        for pid in procfs.cgroup_procs(path):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not procfs.cgroup_procs(path), f"cgroup {path} to empty")
        path.rmdir()

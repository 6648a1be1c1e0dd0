"""pagehaul.procfs for trees, namespaces, cgroups and shared memory, on a fake procfs root, plus a
cross-check against the real /proc/self."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pagehaul import procfs
from pagehaul.errors import ProcessGone

MAPS = b"""\
7f1a25000000-7f1a25100000 rw-s 00000000 00:01 2053                       /dev/zero (deleted)
7f1a25100000-7f1a25200000 rw-s 00000000 00:01 0                          /SYSV00000000 (deleted)
7f1a25200000-7f1a25300000 rw-s 00000000 fd:01 77                         /var/lib/shared.db
7f1a25300000-7f1a25301000 rw-s 00002000 00:01 5                          /memfd:ring (deleted)
7f1a25301000-7f1a25302000 rw-s 00000000 00:01 12                         [anon_shmem:ring]
7f1a25400000-7f1a25401000 rw-p 00000000 00:01 5                          /memfd:ring (deleted)
"""


def make_proc(root: Path, pid: int, threads: dict[int, list[int]], nspid: str | None = None) -> None:
    """/proc/PID with ``threads`` (tid -> children forked by that thread) and a status."""
    for tid, kids in threads.items():
        task = root / str(pid) / "task" / str(tid)
        task.mkdir(parents=True)
        (task / "children").write_text("".join(f"{k} " for k in kids))
    status = f"Name:\tx\nTgid:\t{pid}\nPPid:\t1\nTracerPid:\t0\nState:\tS (sleeping)\nThreads:\t{len(threads)}\n"
    if nspid is not None:
        status += f"NSpid:\t{nspid}\n"
    (root / str(pid) / "status").write_text(status)


def test_tree_walks_children_of_every_thread(tmp_path: Path) -> None:
    make_proc(tmp_path, 10, {10: [11], 12: [13]})  # thread 12 forked 13
    make_proc(tmp_path, 11, {11: [14]})
    make_proc(tmp_path, 13, {13: []})
    make_proc(tmp_path, 14, {14: []})
    assert procfs.read_children(10, tmp_path) == [11, 13]
    assert procfs.process_tree(10, tmp_path) == [10, 11, 13, 14]
    assert procfs.process_tree(11, tmp_path) == [11, 14]


def test_tree_leaves_out_children_gone_meanwhile(tmp_path: Path) -> None:
    make_proc(tmp_path, 10, {10: [11, 15]})  # 15 exited after the listing: no /proc/15
    make_proc(tmp_path, 11, {11: []})
    assert procfs.process_tree(10, tmp_path) == [10, 11]
    with pytest.raises(ProcessGone, match="process 99"):
        procfs.process_tree(99, tmp_path)


def test_vpid_is_the_innermost_nspid(tmp_path: Path) -> None:
    make_proc(tmp_path, 10, {10: []}, nspid="10\t4\t1")
    make_proc(tmp_path, 11, {11: []})  # no NSpid line (before 4.1): the pid itself
    assert procfs.read_vpid(10, tmp_path) == 1
    assert procfs.read_vpid(11, tmp_path) == 11
    assert procfs.read_vpid(os.getpid()) == os.getpid()  # this test runs in the host pid namespace


def test_shared_anonymous_mappings() -> None:
    entries = procfs.parse_maps(MAPS)
    shared = [(e.path, e.inode) for e in entries if procfs.is_shared_anon(e)]
    assert shared == [("/dev/zero (deleted)", 2053), ("/SYSV00000000 (deleted)", 0),
                      ("/memfd:ring (deleted)", 5), ("[anon_shmem:ring]", 12)]  # not files, not MAP_PRIVATE


def test_cgroup2_mount_and_procs(tmp_path: Path) -> None:
    (tmp_path / "self").mkdir()
    (tmp_path / "self" / "mountinfo").write_text(
        "25 1 0:23 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro\n"
        "30 25 0:26 / /sys/fs/cgroup/unified rw,nosuid,nodev - cgroup2 cgroup2 rw,nsdelegate\n")
    assert procfs.cgroup2_mount(tmp_path) == Path("/sys/fs/cgroup/unified")
    cg = tmp_path / "cg"
    (cg / "sub").mkdir(parents=True)
    (cg / "cgroup.procs").write_text("5\n3\n")
    (cg / "sub" / "cgroup.procs").write_text("9\n")
    assert procfs.cgroup_procs(cg) == [3, 5, 9]
    with pytest.raises(FileNotFoundError):
        procfs.cgroup_procs(tmp_path / "self")
    make_proc(tmp_path, 10, {10: []})
    (tmp_path / "10" / "cgroup").write_text("5:cpu:/x\n0::/a/b\n")
    assert procfs.read_cgroup2(10, tmp_path) == "/a/b"


def test_real_self() -> None:
    assert os.getpid() in procfs.process_tree(os.getpid())
    mount = procfs.cgroup2_mount()
    if mount is not None:
        assert (mount / "cgroup.procs").exists()


def test_start_time_after_a_tricky_comm(tmp_path: Path) -> None:
    (tmp_path / "10").mkdir()
    fields = " ".join(str(n) for n in range(3, 53))  # field 3 ... 52; field 22 is "22"
    (tmp_path / "10" / "stat").write_text(f"10 (a) b (c) {fields}\n")
    assert procfs.read_start_time(10, tmp_path) == 22
    assert procfs.read_start_time(os.getpid()) == procfs.read_start_time(os.getpid()) > 0

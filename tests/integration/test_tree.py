"""Whole process trees and cgroups: every process gets its own image, shared anonymous memory is
dumped once per object, processes that fork or exit between rounds are followed, and the final
images equal every stopped process byte for byte (``pagehaul.oracle.verify_tree``)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import mmap
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pagehaul import codec, kernel, procfs, store
from pagehaul.errors import ProcessGone
from pagehaul.integrity import verify_image_set
from pagehaul.kernel import PAGE_SIZE
from pagehaul.oracle import verify_tree
from receiver.config import ReceiverConfig
from receiver.grpc_server import Receiver
from sender.config import Progress, SendConfig, SendResult
from sender.policy import ConvergenceLimits
from sender.precopy import send
from sender.trackers import probe_all
from tests.helpers.children import Child, child_env, stop_child, wait_until
from tests.helpers.tree_child import NKIDS, SHARED_PAGES, TREE_CHILD, spawn_shm_kinds, spawn_tree
from tests.integration.test_bad_input import gone_pid, one_error_line, run_cli


def error_line(stderr: str) -> str:
    """The one error line, after the warning --insecure prints."""
    return one_error_line("\n".join(line for line in stderr.splitlines() if "INSECURE" not in line))

# Four live rounds, forced (the writers keep every round dirty), then the frozen one.
FORCED_ROUNDS = ConvergenceLimits(downtime_target_s=1e-9, min_iter_pages=0, max_grow_percent=1e9, max_rounds=4)
CGROUP2 = procfs.cgroup2_mount()


def session_dir(receiver: Receiver, result: SendResult) -> Path:
    return receiver.config.images_dir / result.session_id


def final_dir(receiver: Receiver, result: SendResult) -> Path:
    return session_dir(receiver, result) / result.rounds[-1].directory


def shared_inode(pid: int) -> int:
    (entry,) = [e for e in procfs.read_maps(pid) if procfs.is_shared_anon(e)]
    return entry.inode


def assert_tree_identical(round_dir: Path, pids: list[int]) -> None:
    report = verify_tree(round_dir, pids, PAGE_SIZE)
    assert report.ok, report.problems()
    assert sorted(report.processes) == sorted(pids)
    assert len(report.shmem) == len(pids)  # every process maps the shared region once
    assert all(r.pages_compared == SHARED_PAGES for r in report.shmem.values())


def assert_stored_once(round_dir: Path, pids: list[int], shmid: int) -> None:
    """One pagemap-shmem image for the region; no process's pagemap holds a page of it."""
    names = sorted(os.listdir(round_dir))
    assert [n for n in names if n.startswith("pagemap-shmem-")] == [codec.shmem_pagemap_name(shmid)]
    assert {n for n in names if n.startswith("pagemap-") and "shmem" not in n} == \
        {codec.pagemap_name(pid) for pid in pids}
    pages_ids = [codec.read_pagemap(round_dir / n).pages_id for n in names if n.startswith("pagemap-")]
    assert len(set(pages_ids)) == len(pages_ids)  # one pages file per image
    for pid in pids:
        (shared,) = [e for e in procfs.read_maps(pid) if procfs.is_shared_anon(e)]
        vaddr, nr, _ = codec.read_pagemap(round_dir / codec.pagemap_name(pid)).arrays()
        ends = vaddr + nr * np.uint64(PAGE_SIZE)
        assert not np.any((vaddr < shared.end) & (ends > shared.start)), f"pid {pid} pagemap holds shared pages"


def all_stopped(pids: list[int]) -> bool:
    return all(procfs.read_status(t).state == "T" for pid in pids for t in procfs.list_threads(pid))


async def test_tree_with_shared_memory(receiver: Receiver) -> None:
    with spawn_tree() as child:
        kids: list[int] = child.info["kids"]
        pids = [child.pid, *kids]
        shmid = shared_inode(child.pid)
        result = await send(SendConfig(pid=child.pid, target=receiver.address, limits=FORCED_ROUNDS))
        assert len(result.rounds) == 5, result.stop_reason
        assert (result.processes, result.shmem_objects) == (NKIDS + 1, 1)
        assert result.left_stopped
        wait_until(lambda: all_stopped(pids), "every process of the tree to be in group stop")
        assert_tree_identical(final_dir(receiver, result), pids)
        session = session_dir(receiver, result)
        for r in result.rounds:
            assert_stored_once(session / r.directory, pids, shmid)
        # Later rounds send what changed, in the shared region too: most of it stays in the parent.
        shm = codec.read_pagemap(final_dir(receiver, result) / codec.shmem_pagemap_name(shmid))
        parent_pages = sum(e.nr_pages for e in shm.entries if e.flags & codec.PE_PARENT)
        assert parent_pages >= 48 - 8 * NKIDS
        assert result.rounds[-1].pages_skipped_parent > result.rounds[-1].pages_written
        check = verify_image_set(session)
        assert check.ok, [p.describe() for p in check.problems]


async def test_no_children_takes_one_process(receiver: Receiver) -> None:
    with spawn_tree(nkids=2) as child:
        result = await send(SendConfig(pid=child.pid, target=receiver.address, children=False,
                                          leave_stopped=False, tracker="none"))
        names = os.listdir(final_dir(receiver, result))
        assert {n for n in names if n.startswith("pagemap-") and "shmem" not in n} == \
            {codec.pagemap_name(child.pid)}
        assert result.processes == 1


async def test_fork_and_exit_between_rounds(receiver: Receiver) -> None:
    with spawn_tree() as child:
        kids: list[int] = child.info["kids"]
        leaver = kids[0]
        born: list[int] = []

        def between_rounds(p: Progress) -> None:
            if p.round >= 1 and not p.frozen and not born:
                born.append(child.command("fork")["pid"])
                kids.append(born[0])
                child.command("exit", pid=leaver)
                kids.remove(leaver)

        result = await send(SendConfig(pid=child.pid, target=receiver.address, limits=FORCED_ROUNDS),
                               between_rounds)
        assert born, "no live round after round 0 sent data"
        session = session_dir(receiver, result)
        rounds = [session / r.directory for r in result.rounds]
        assert (rounds[0] / codec.pagemap_name(leaver)).exists()
        assert not (rounds[-1] / codec.pagemap_name(leaver)).exists()
        first_with_new = next(i for i, d in enumerate(rounds) if (d / codec.pagemap_name(born[0])).exists())
        assert first_with_new >= 1
        # The newcomer's first image is whole: no PE_PARENT entries.
        flags = codec.read_pagemap(rounds[first_with_new] / codec.pagemap_name(born[0])).arrays()[2]
        assert not np.any(flags & np.uint32(codec.PE_PARENT))
        pids = [child.pid, *kids]
        wait_until(lambda: all_stopped(pids), "every process of the tree to be in group stop")
        assert_tree_identical(rounds[-1], pids)
        assert_stored_once(rounds[-1], pids, shared_inode(child.pid))
        check = verify_image_set(session)
        assert check.ok, [p.describe() for p in check.problems]


@contextlib.contextmanager
def cgroup_with(child: Child, pids: list[int]) -> Iterator[Path]:
    """A new cgroup v2 under the hierarchy's root holding ``pids``; emptied and removed afterwards."""
    assert CGROUP2 is not None
    path = CGROUP2 / f"pagehaul-test-{secrets.token_hex(4)}"
    path.mkdir()
    try:
        for pid in pids:
            (path / "cgroup.procs").write_text(f"{pid}\n")
        yield path
    finally:
        with contextlib.suppress(OSError):
            (path / "cgroup.freeze").write_text("0")
        for pid in procfs.cgroup_procs(path):
            with contextlib.suppress(OSError):
                (CGROUP2 / "cgroup.procs").write_text(f"{pid}\n")
        wait_until(lambda: not procfs.cgroup_procs(path), f"cgroup {path} to empty")
        path.rmdir()


@pytest.mark.skipif(CGROUP2 is None or not os.access(CGROUP2, os.W_OK), reason="no writable cgroup v2 hierarchy")
async def test_cgroup_target(receiver: Receiver) -> None:
    with spawn_tree(nkids=2) as child:
        kids: list[int] = child.info["kids"]
        pids = [child.pid, *kids]
        with cgroup_with(child, pids) as cgroup:
            assert procfs.cgroup_procs(cgroup) == sorted(pids)
            result = await send(SendConfig(pid=0, cgroup=cgroup, target=receiver.address,
                                              limits=ConvergenceLimits(max_rounds=2)))
            assert result.freezer == "CgroupFreezer"
            assert result.processes == 3
            assert (cgroup / "cgroup.freeze").read_text().strip() == "0"  # thawed, left in group stop
            wait_until(lambda: all_stopped(pids), "every process of the cgroup to be in group stop")
            assert_tree_identical(final_dir(receiver, result), pids)
            assert_stored_once(final_dir(receiver, result), pids, shared_inode(child.pid))


@pytest.mark.skipif(CGROUP2 is None or not os.access(CGROUP2, os.W_OK), reason="no writable cgroup v2 hierarchy")
async def test_tree_that_is_a_cgroup_uses_the_cgroup_freezer(receiver: Receiver) -> None:
    with spawn_tree(nkids=1) as child:
        pids = [child.pid, *child.info["kids"]]
        with cgroup_with(child, pids):
            result = await send(SendConfig(pid=child.pid, target=receiver.address, leave_stopped=False,
                                              limits=ConvergenceLimits(max_rounds=1)))
            assert result.freezer == "CgroupFreezer"
            assert not result.left_stopped
            assert all(procfs.read_status(p).state in "RS" for p in pids)


@pytest.mark.parametrize(("args", "code", "words"), [
    (["--cgroup", "/no/such/cgroup-pagehaul"], 2, "cgroup /no/such/cgroup-pagehaul does not exist"),
    (["--pid", "1", "--cgroup", "/"], 2, "one of --pid or --cgroup"),
    (["--cgroup", "/", "--no-children"], 2, "--no-children goes with --pid"),
])
async def test_bad_targets_are_one_line(args: list[str], code: int, words: str) -> None:
    rc, _, err = await run_cli("send", "--insecure", "--to", "127.0.0.1:1", *args)
    assert rc == code
    assert words in error_line(err)


async def test_gone_pid_is_one_line() -> None:
    pid = gone_pid()
    rc, _, err = await run_cli("send", "--insecure", "--to", "127.0.0.1:1", "--pid", str(pid))
    assert rc == ProcessGone.exit_code
    assert f"process {pid}" in error_line(err)


@pytest.mark.skipif(CGROUP2 is None or not os.access(CGROUP2, os.W_OK), reason="no writable cgroup v2 hierarchy")
async def test_empty_cgroup_is_one_line() -> None:
    assert CGROUP2 is not None
    path = CGROUP2 / f"pagehaul-test-{secrets.token_hex(4)}"
    path.mkdir()
    try:
        rc, _, err = await run_cli("send", "--insecure", "--to", "127.0.0.1:1", "--cgroup", str(path))
        assert rc == ProcessGone.exit_code
        assert f"cgroup {path} has no processes" in error_line(err)
        # A path inside the hierarchy names the same cgroup.
        rc, _, err = await run_cli("send", "--insecure", "--to", "127.0.0.1:1", "--cgroup", f"/{path.name}")
        assert rc == ProcessGone.exit_code
        assert "has no processes" in error_line(err)
    finally:
        path.rmdir()


async def test_memfd_and_sysv_shm(receiver: Receiver) -> None:
    with spawn_shm_kinds() as child:
        pids = [child.pid, *child.info["kids"]]
        written: list[int] = []

        def between_rounds(p: Progress) -> None:
            if p.round >= 1 and not written:
                written.append(p.round)
                child.command("write", page=9, byte=0x45)

        result = await send(SendConfig(pid=child.pid, target=receiver.address, limits=FORCED_ROUNDS),
                               between_rounds)
        wait_until(lambda: all_stopped(pids), "both processes to be in group stop")
        final = final_dir(receiver, result)
        report = verify_tree(final, pids, PAGE_SIZE)
        assert report.ok, report.problems()
        assert len(report.shmem) == 6  # memfd twice and SysV, in the parent and in the worker (forked)
        paths = {e.inode: e.path for e in procfs.read_maps(child.pid) if procfs.is_shared_anon(e)}
        assert sorted(p.split(" ")[0].split(":")[0] for p in paths.values()) == ["/SYSV00000000", "/memfd"]
        shm_images = sorted(n for n in os.listdir(final) if n.startswith("pagemap-shmem-"))
        assert shm_images == sorted(codec.shmem_pagemap_name(i) for i in paths)
        # The memfd's image holds its pages by offset in the file: 5, 6, 16 and (written) 9.
        (memfd,) = [i for i, p in paths.items() if p.startswith("/memfd:")]
        with store.open_round(final, memfd, PAGE_SIZE, shmem=True) as image:
            assert image.read_range(9 * PAGE_SIZE, 1) == b"E" * PAGE_SIZE
            assert image.read_range(16 * PAGE_SIZE, 1) == b"C" * PAGE_SIZE
            assert {int(v) // PAGE_SIZE for v in image.present_runs().page_addrs(PAGE_SIZE)} == {5, 6, 9, 16}
        # Unchanged shared pages are left to the parent round after round 0.
        for name in shm_images:
            flags = codec.read_pagemap(final / name).arrays()[2]
            assert not np.any(flags & np.uint32(codec.PE_PRESENT)), name


@pytest.mark.skipif("uffd-wp" not in {a.name for a in probe_all() if a.available}, reason="uffd-wp unavailable")
def test_uffd_wp_misses_other_mappers() -> None:
    """Why shared memory is hash-tracked (sender.shmem): uffd-wp on a MAP_SHARED mapping reports
    writes through the registering process's ptes only, not a forked child's, nor pwrite()."""
    pages = 8
    region = mmap.mmap(-1, pages * PAGE_SIZE, mmap.MAP_SHARED)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(region))
    uffd = kernel.userfaultfd(os.O_CLOEXEC | os.O_NONBLOCK)
    pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    vec = np.zeros(16, dtype=kernel.PAGE_REGION_DTYPE)

    def written() -> list[int]:
        arg = kernel.pm_scan_arg(size=ctypes.sizeof(kernel.pm_scan_arg), flags=kernel.PM_SCAN_WP_MATCHING,
                                 start=addr, end=addr + pages * PAGE_SIZE, vec=vec.ctypes.data, vec_len=len(vec),
                                 category_mask=kernel.PAGE_IS_WRITTEN, return_mask=kernel.PAGE_IS_WRITTEN)
        n = kernel.pagemap_scan(pagemap, arg)
        return [p for i in range(n) for p in range((int(vec[i]["start"]) - addr) // PAGE_SIZE,
                                                    (int(vec[i]["end"]) - addr) // PAGE_SIZE)]

    try:
        for i in range(pages):
            region[i * PAGE_SIZE] = 1
        kernel.uffdio_api_ioctl(uffd, kernel.uffdio_api(
            api=kernel.UFFD_API, features=kernel.UFFD_FEATURE_WP_ASYNC | kernel.UFFD_FEATURE_WP_UNPOPULATED))
        kernel.uffdio_register_ioctl(uffd, kernel.uffdio_register(
            range=kernel.uffdio_range(start=addr, len=pages * PAGE_SIZE), mode=kernel.UFFDIO_REGISTER_MODE_WP))
        written()  # arm
        region[2 * PAGE_SIZE] = 5
        assert written() == [2]
        pid = os.fork()
        if pid == 0:  # pragma: no cover -- the child only writes and exits
            region[4 * PAGE_SIZE] = 9
            os._exit(0)
        os.waitpid(pid, 0)
        fd = os.open(f"/proc/self/map_files/{addr:x}-{addr + pages * PAGE_SIZE:x}", os.O_RDWR | os.O_CLOEXEC)
        try:
            os.pwrite(fd, b"\x07", 6 * PAGE_SIZE)
        finally:
            os.close(fd)
        assert (region[4 * PAGE_SIZE], region[6 * PAGE_SIZE]) == (9, 7)
        assert written() == []  # both writes invisible to uffd-wp
    finally:
        os.close(pagemap)
        os.close(uffd)
        region.close()


@contextlib.contextmanager
def tree_in_pid_namespace(nkids: int) -> Iterator[subprocess.Popen[bytes]]:
    """``unshare --pid --kill-child`` running the tree: its root is pid 1 in a new pid namespace."""
    proc = subprocess.Popen(["unshare", "--pid", "--kill-child", sys.executable, "-c", TREE_CHILD, str(nkids)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=child_env())
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith(b"READY ")
        yield proc
    finally:
        stop_child(proc)  # unshare kills the namespace's init, and with it the namespace


async def test_tree_in_a_pid_namespace_is_named_by_vpid(receiver: Receiver) -> None:
    with tree_in_pid_namespace(nkids=2) as unshare:
        pids = procfs.process_tree(unshare.pid)
        vpids = {pid: procfs.read_vpid(pid) for pid in pids}
        assert len(pids) == 4  # unshare (in our namespace), the tree's root (pid 1 in its own) and 2 workers
        assert vpids[unshare.pid] == unshare.pid
        assert 1 in vpids.values()
        assert all(vpids[p] != p for p in pids if p != unshare.pid)
        result = await send(SendConfig(pid=unshare.pid, target=receiver.address, limits=FORCED_ROUNDS))
        final = final_dir(receiver, result)
        names = {n for n in os.listdir(final) if n.startswith("pagemap-") and "shmem" not in n}
        assert names == {codec.pagemap_name(v) for v in vpids.values()}
        wait_until(lambda: all_stopped(pids), "the namespace's processes to be in group stop")
        report = verify_tree(final, pids, PAGE_SIZE)
        assert report.ok, report.problems()


async def test_receiver_restart_mid_tree_round_resends_it(tmp_path: Path) -> None:
    """The receiver restarts inside round 0 of a tree (the latest round the sender can send again, as
    for one process): the round is sent again from its begin, every image of it, and the result still
    equals every process."""
    images_dir = tmp_path / "images"
    first = Receiver(ReceiverConfig(images_dir=images_dir, listen="127.0.0.1:0"))
    port = await first.start()
    second: list[Receiver] = []
    batches = {"n": 0}

    async def restart() -> None:
        await first.stop(0)
        r = Receiver(ReceiverConfig(images_dir=images_dir, listen=f"127.0.0.1:{port}"))
        await r.start()
        second.append(r)

    def progress(p: Progress) -> None:
        if p.round == 0:
            batches["n"] += 1
            if batches["n"] == 40:
                asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(restart()))

    try:
        with spawn_tree(nkids=2) as child:
            pids = [child.pid, *child.info["kids"]]
            result = await send(SendConfig(pid=child.pid, target=f"127.0.0.1:{port}", batch_pages=2,
                                              limits=FORCED_ROUNDS), progress)
            assert second, f"round 0 had {batches['n']} batches; the receiver was never restarted"
            assert result.resumes >= 1
            session = images_dir / result.session_id
            assert not any(p.name.startswith(".round") for p in session.iterdir())
            wait_until(lambda: all_stopped(pids), "every process of the tree to be in group stop")
            assert_tree_identical(session / result.rounds[-1].directory, pids)
            check = verify_image_set(session)
            assert check.ok, [p.describe() for p in check.problems]
    finally:
        await first.stop(0)
        for r in second:
            await r.stop(0)


async def test_cli_send_takes_the_tree(receiver: Receiver) -> None:
    with spawn_tree(nkids=2) as child:
        rc, out, err = await run_cli("send", "--insecure", "--to", receiver.address, "--pid", str(child.pid),
                                     "--json", "--max-rounds", "2", "--resume")
        assert rc == 0, err
        doc = json.loads(out)
        assert (doc["processes"], doc["shmem_objects"], doc["freezer"]) == (3, 1, "PtraceTreeFreezer")
        assert not doc["left_stopped"]
        rc, out, err = await run_cli("send", "--insecure", "--to", receiver.address, "--pid", str(child.pid),
                                     "--json", "--tracker", "none", "--resume", "--no-children", "--no-shmem")
        assert rc == 0, err
        assert (json.loads(out)["processes"], json.loads(out)["shmem_objects"]) == (1, 0)


@pytest.mark.parametrize(("which", "says"), [
    ("kernel", "process 2 (kthreadd) is a kernel thread: it has no user memory to migrate"),
    ("ancestor", "is an ancestor of pagehaul (the shell or tool running it)"),
])
async def test_cli_refuses_targets_it_cannot_or_must_not_freeze(receiver: Receiver, which: str, says: str) -> None:
    """A kernel thread was reported as "gone", the test runner (pagehaul's parent) as "ptrace not
    permitted": each now says what it is, before anything is frozen."""
    pid = 2 if which == "kernel" else os.getpid()
    rc, _, err = await run_cli("send", "--insecure", "--to", receiver.address, "--pid", str(pid))
    assert rc == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("pagehaul: error: "), err
    assert says in last

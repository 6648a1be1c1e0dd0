"""Pages swapped out arrive byte for byte. This machine has no swap, so the test makes a swap
file, pushes the child's pages out with MADV_PAGEOUT, checks the kernel really swapped them
(pagemap bit 62), migrates, and removes the swap file again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cli.demo import dump_ranges
from pagehaul.kernel import PAGE_SIZE, PM_SWAP
from pagehaul.oracle import verify_against_process
from receiver.grpc_server import Receiver
from sender.config import SendConfig
from sender.precopy import send_frozen
from tests.conftest import in_ci, stop_process

SWAP_CHILD = r'''
import ctypes, json, mmap, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
P, N, MADV_PAGEOUT = mmap.PAGESIZE, 2048, 21
m = mmap.mmap(-1, N * P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(N):
    m[i * P:i * P + 16] = i.to_bytes(8, "little") * 2
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
rc = libc.madvise(addr, N * P, MADV_PAGEOUT)
print("READY " + json.dumps({"addr": addr, "pages": N, "rc": rc}), flush=True)
sys.stdin.readline()
'''


@pytest.fixture
def swapfile(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "swap.img"
    try:
        subprocess.run(["fallocate", "-l", "64M", str(path)], check=True)
        path.chmod(0o600)
        subprocess.run(["mkswap", str(path)], check=True, capture_output=True)
        subprocess.run(["swapon", str(path)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as err:
        if in_ci():
            pytest.fail(f"cannot set up a swap file: {err}")
        pytest.skip(f"cannot set up a swap file here: {err}")
    try:
        yield path
    finally:
        subprocess.run(["swapoff", str(path)], check=False, capture_output=True)


@pytest.fixture
def swapped_child(swapfile: Path) -> Iterator[tuple[subprocess.Popen[str], dict[str, int]]]:
    """A child whose pages the kernel really swapped out (pagemap bit 62), checked here."""
    proc = subprocess.Popen([sys.executable, "-c", SWAP_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline().removeprefix("READY "))
        assert info["rc"] == 0
        with open(f"/proc/{proc.pid}/pagemap", "rb", buffering=0) as f:
            words = np.frombuffer(os.pread(f.fileno(), info["pages"] * 8, info["addr"] // PAGE_SIZE * 8), "<u8")
        swapped = int(((words & np.uint64(PM_SWAP)) != 0).sum())
        assert swapped > info["pages"] // 2, f"only {swapped} pages were swapped out"
        yield proc, info
    finally:
        stop_process(proc)


async def test_swapped_out_pages_arrive(receiver: Receiver,
                                        swapped_child: tuple[subprocess.Popen[str], dict[str, int]]) -> None:
    proc, info = swapped_child
    result = await send_frozen(SendConfig(pid=proc.pid, target=receiver.address, leave_stopped=True))
    round_dir = receiver.config.images_dir / result.session_id / "round-0"
    report = verify_against_process(round_dir, proc.pid, dump_ranges(proc.pid), PAGE_SIZE)
    assert report.mismatches == 0
    assert report.ok
    assert result.rounds[0].pages_written >= info["pages"]

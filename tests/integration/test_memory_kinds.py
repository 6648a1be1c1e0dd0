"""Every kind of private memory a single process has, changing under pre-copy rounds, arrives
byte for byte: transparent huge pages, MADV_DONTNEED and MADV_FREE regions that become zero,
guard regions, PROT_NONE pages with data, and the copy-on-write pages of a private file mapping.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.demo import dump_ranges
from pagehaul.kernel import PAGE_SIZE
from pagehaul.oracle import verify_against_process
from receiver.grpc_server import Receiver
from sender.config import SendConfig
from sender.policy import ConvergenceLimits
from sender.precopy import send
from sender.trackers import probe_all
from tests.conftest import stop_process

AVAILABLE = {a.name for a in probe_all() if a.available}
TRACKERS = [pytest.param(name, marks=pytest.mark.skipif(name not in AVAILABLE, reason=f"{name} unavailable here"))
            for name in ("uffd-wp", "hash")]

# argv[1]: a file to map privately. Keeps changing every kind of memory until killed.
KINDS_CHILD = r'''
import ctypes, json, mmap, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
P, HUGE = mmap.PAGESIZE, 2 << 20
MADV_DONTNEED, MADV_FREE, MADV_HUGEPAGE, MADV_GUARD_INSTALL = 4, 8, 14, 102
RW = mmap.PROT_READ | mmap.PROT_WRITE
ANON = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS

def region(size, align=P):
    raw = libc.mmap(None, size + align, RW, ANON, -1, 0)
    start = (raw + align - 1) // align * align
    return start

def buf(addr, size):
    return (ctypes.c_char * size).from_address(addr)

thp = region(4 * HUGE, HUGE)
libc.madvise(thp, 4 * HUGE, MADV_HUGEPAGE)
ctypes.memset(thp, 0x11, 4 * HUGE)
churn = region(256 * P)
ctypes.memset(churn, 0x22, 256 * P)
guarded = region(64 * P)
ctypes.memset(guarded, 0x33, 64 * P)
guard_ok = libc.madvise(guarded + 8 * P, 4 * P, MADV_GUARD_INSTALL) == 0
sealed = region(16 * P)
ctypes.memset(sealed, 0x44, 16 * P)
libc.mprotect(sealed, 16 * P, 0)  # PROT_NONE
fd = os.open(sys.argv[1], os.O_RDONLY)
fmap = libc.mmap(None, 64 * P, RW, mmap.MAP_PRIVATE, fd, 0)
for i in range(0, 64, 3):
    buf(fmap + i * P, 8)[:] = b"cow-page"
smaps = open("/proc/self/smaps_rollup").read()
huge_kb = int([l for l in smaps.splitlines() if l.startswith("AnonHugePages")][0].split()[1])
print("READY " + json.dumps({"huge_kb": huge_kb, "guard": guard_ok}), flush=True)
i = 0
while True:
    i += 1
    page = (i * 7) % 256
    buf(thp + (i * 4097) % (4 * HUGE - 8), 8)[:] = i.to_bytes(8, "little")
    if i % 5 == 0:
        libc.madvise(churn + page * P, 3 * P, MADV_DONTNEED)
    elif i % 5 == 1:
        libc.madvise(churn + page * P, 2 * P, MADV_FREE)
    else:
        buf(churn + page * P, 8)[:] = i.to_bytes(8, "little")
    if i % 11 == 0:
        buf(fmap + (i % 64) * P + 16, 8)[:] = i.to_bytes(8, "little")
    buf(guarded + (i % 8) * P, 8)[:] = i.to_bytes(8, "little")
'''


@pytest.fixture
def kinds(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], dict[str, object]]]:
    backing = tmp_path / "backing.bin"
    backing.write_bytes(bytes(range(256)) * (64 * PAGE_SIZE // 256))
    proc = subprocess.Popen([sys.executable, "-c", KINDS_CHILD, str(backing)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("READY "), line
        yield proc, json.loads(line[6:])
    finally:
        stop_process(proc)


@pytest.mark.parametrize("tracker", TRACKERS)
async def test_every_kind_of_memory_arrives(receiver: Receiver, kinds: tuple[subprocess.Popen[str], dict[str, object]],
                                            tracker: str) -> None:
    proc, info = kinds
    assert int(str(info["huge_kb"])) >= 2048, "no transparent huge page to test with"
    assert info["guard"], "MADV_GUARD_INSTALL failed (kernel < 6.15?)"
    cfg = SendConfig(pid=proc.pid, target=receiver.address, tracker=tracker,
                     limits=ConvergenceLimits(downtime_target_s=1e-6, min_iter_pages=0, max_grow_percent=1e9,
                                              max_rounds=3))
    result = await send(cfg)
    assert len(result.rounds) >= 2
    round_dir = receiver.config.images_dir / result.session_id / result.rounds[-1].directory
    report = verify_against_process(round_dir, proc.pid, dump_ranges(proc.pid), PAGE_SIZE)
    assert report.mismatches == 0, f"first mismatch at {report.first_mismatch:#x}"
    assert report.pages_compared > 0

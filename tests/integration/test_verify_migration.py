"""``pagehaul verify`` on the images of a real pre-copy migration: intact, then with one page corrupted."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli.demo import dump_ranges
from pagehaul import codec, store
from pagehaul.criu_tools import CriuTools
from pagehaul.integrity import EXIT_BAD, EXIT_OK, format_report, main_verify, verify_image_set
from pagehaul.kernel import PAGE_SIZE
from pagehaul.oracle import verify_against_process
from receiver.grpc_server import Receiver
from sender.config import SendConfig
from sender.precopy import send
from tests.conftest import Workload


def round0_page_in(session: Path, pid: int, start: int, size: int) -> tuple[int, int]:
    """A page of round 0's pages file inside [start, start+size) that no later round sends again:
    (its index in the file, its address)."""
    later: set[int] = set()
    for n in store.committed_rounds(session)[1:]:
        pm = codec.read_pagemap(session / store.round_dir_name(n) / codec.pagemap_name(pid))
        for e in pm.entries:
            if e.flags & codec.PE_PRESENT:
                later.update(range(e.vaddr, e.vaddr + e.nr_pages * PAGE_SIZE, PAGE_SIZE))
    pm = codec.read_pagemap(session / "round-0" / codec.pagemap_name(pid))
    index = 0
    candidates: list[tuple[int, int]] = []
    for e in pm.entries:
        assert e.flags == codec.PE_PRESENT
        for i in range(e.nr_pages):
            vaddr = e.vaddr + i * PAGE_SIZE
            if start <= vaddr < start + size and vaddr not in later:
                candidates.append((index, vaddr))
            index += 1
    assert candidates, "no page of the region in round 0 only"
    return candidates[len(candidates) // 2]


async def test_migrated_images_verify_and_a_corrupt_page_is_found(
        receiver: Receiver, workload: Workload, capsys: pytest.CaptureFixture[str]) -> None:
    result = await send(SendConfig(pid=workload.pid, target=receiver.address))
    assert len(result.rounds) >= 2
    session = receiver.config.images_dir / result.session_id
    final = session / result.rounds[-1].directory

    report = verify_image_set(session)
    assert report.ok, format_report(report)
    assert [Path(r.round_dir).name for r in report.rounds] == [r.directory for r in result.rounds]
    assert {r.mode for r in report.rounds} == {"per-page digests"}
    assert report.pages_verified == report.pages == sum(r.pages_written for r in result.rounds) > 0
    through_links = verify_image_set(final)  # the last round reaches every other through parent links
    assert through_links.ok
    assert len(through_links.rounds) == len(result.rounds)
    assert main_verify(session, as_json=True) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["ok"] is True

    # One bit of one page that only round 0 holds: the final image restores it from there.
    start, size = workload.region("main")
    index, vaddr = round0_page_in(session, workload.pid, start, size)
    pages = session / "round-0" / "pages-1.img"
    with pages.open("r+b") as f:
        f.seek(index * PAGE_SIZE + 123)
        byte = f.read(1)[0]
        f.seek(index * PAGE_SIZE + 123)
        f.write(bytes([byte ^ 1]))

    report = verify_image_set(session)
    assert not report.ok
    bad = report.first_bad
    assert bad is not None
    assert (Path(bad.round_dir).name, bad.file, bad.pid, bad.vaddr) == ("round-0", "pages-1.img", workload.pid, vaddr)
    assert bad.expected != bad.actual
    assert report.bad_pages == 1
    assert len(report.problems) == 1, format_report(report)
    assert main_verify(final, as_json=True) == EXIT_BAD
    assert json.loads(capsys.readouterr().out)["first_bad"]["vaddr"] == vaddr
    # The byte-for-byte oracle against the stopped process sees the same page, and only it.
    oracle = verify_against_process(final, workload.pid, dump_ranges(workload.pid), PAGE_SIZE)
    assert (oracle.mismatches, oracle.first_mismatch) == (1, vaddr)


# A process CRIU can dump: its own session, no pipes to us (CRIU refuses external ones), shared
# memory with data (Python's anonymous mmap is MAP_SHARED), and a ready file instead of a READY line.
DUMPABLE_CHILD = r'''
import mmap, os, signal, sys
m = mmap.mmap(-1, 64 * mmap.PAGESIZE)
for i in range(64):
    m[i * mmap.PAGESIZE:i * mmap.PAGESIZE + 8] = i.to_bytes(8, "little")
tmp = sys.argv[1] + ".tmp"
with open(tmp, "w") as f:
    f.write(str(os.getpid()))
os.replace(tmp, sys.argv[1])
while True:
    signal.pause()
'''


@pytest.mark.criu
def test_round_written_by_criu_is_checked_structurally(criu_tools: CriuTools, tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    child = subprocess.Popen([sys.executable, "-c", DUMPABLE_CHILD, str(ready)], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    dump = tmp_path / "dump"
    dump.mkdir()
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():  # bounded poll for the child's ready file
            assert child.poll() is None, "the child died"
            assert time.monotonic() < deadline, "the child never got ready"
            time.sleep(0.01)
        done = subprocess.run([str(criu_tools.criu), "dump", "-t", str(child.pid), "-D", str(dump), "-o",
                               "dump.log", "--leave-stopped"], check=False, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, (dump / "dump.log").read_text()[-2000:]
    finally:
        child.kill()
        child.wait(timeout=30)
    report = verify_image_set(dump)
    assert report.ok, format_report(report)
    assert [r.mode for r in report.rounds] == ["structure only"]
    assert report.rounds[0].pids == [child.pid]
    assert report.pages >= 64
    assert report.pages_verified == 0
    assert "without a pagehaul sidecar (written by CRIU?)" in format_report(report)
    assert report.rounds[0].shmem, "the child's MAP_SHARED mapping should be in a pagemap-shmem image"
    # Structure is still checked: the process's pages file one page short, and the shared memory's.
    for pagemap in (codec.pagemap_name(child.pid), f"pagemap-shmem-{report.rounds[0].shmem[0]}.img"):
        pages = dump / codec.pages_name(codec.read_pagemap(dump / pagemap).pages_id)
        data = pages.read_bytes()
        pages.write_bytes(data[:-PAGE_SIZE])
        bad = verify_image_set(dump).first_bad
        assert bad is not None
        assert bad.file == pages.name
        assert "but the pagemap has" in bad.message
        pages.write_bytes(data)

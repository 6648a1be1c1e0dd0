"""End to end: a live workload frozen, migrated over real gRPC, checked byte for byte."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from cli.demo import dump_ranges
from pagehaul import codec, procfs, store
from pagehaul.kernel import PAGE_SIZE, PM_FILE, PM_PFRAME_MASK, PM_PRESENT, PM_SWAP
from pagehaul.oracle import verify_against_process
from pagehaul.runs import Runs
from receiver.grpc_server import Receiver
from sender.config import SendConfig, SendResult
from sender.precopy import send_frozen
from sender.scanner import find_zero_pfn
from tests.conftest import Workload


async def migrate(receiver: Receiver, pid: int, **kwargs: object) -> tuple[SendResult, Path]:
    cfg = SendConfig(pid=pid, target=receiver.address, leave_stopped=True, **kwargs)  # type: ignore[arg-type]
    result = await send_frozen(cfg)
    round_dir = receiver.config.images_dir / result.session_id / result.rounds[-1].directory
    return result, round_dir


def present_pages(pid: int, ranges: list[tuple[int, int]]) -> npt.NDArray[np.uint64]:
    """Addresses of every page the kernel says holds data (present or swapped, not the shared
    zero page, not an unmodified file page), read straight from /proc/PID/pagemap: an oracle
    independent of the sender's scanners."""
    zero_pfn = find_zero_pfn()
    found = []
    with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as f:
        for start, end in ranges:
            words = np.frombuffer(os.pread(f.fileno(), (end - start) // PAGE_SIZE * 8, start // PAGE_SIZE * 8), "<u8")
            present = (words & np.uint64(PM_PRESENT)) != 0
            data = (present | ((words & np.uint64(PM_SWAP)) != 0)) & ((words & np.uint64(PM_FILE)) == 0)
            data &= ~(present & ((words & np.uint64(PM_PFRAME_MASK)) == np.uint64(zero_pfn)))
            found.append(np.uint64(start) + np.flatnonzero(data).astype(np.uint64) * np.uint64(PAGE_SIZE))
    return np.concatenate(found) if found else np.zeros(0, np.uint64)


def held_pages(image: store.ImageSet) -> Runs:
    return Runs.concat([image.present_runs(), image.zero_runs()]).sorted()


@pytest.mark.parametrize("pagemap_file", [False, True], ids=["PAGEMAP_SCAN", "pagemap-file"])
async def test_frozen_migration_is_byte_identical(receiver: Receiver, workload: Workload, pagemap_file: bool) -> None:
    result, round_dir = await migrate(receiver, workload.pid, force_pagemap_file=pagemap_file)

    # The workload never stopped writing its hot region; it was left stopped at the final dump.
    states = {procfs.read_status(t).state[0] for t in procfs.list_threads(workload.pid)}
    assert states == {"T"}
    stats = result.rounds[0]
    assert stats.pages_scanned == stats.pages_written + stats.pages_zero
    assert stats.pages_zero >= workload.info["pages"]["zero"]  # the workload's zeroed chunks at least

    ranges = dump_ranges(workload.pid)
    report = verify_against_process(round_dir, workload.pid, ranges, PAGE_SIZE)
    assert report.mismatches == 0, f"first mismatch at {report.first_mismatch:#x}"
    assert report.pages_compared >= stats.pages_scanned

    with store.open_round(round_dir, workload.pid, PAGE_SIZE) as image:
        held = held_pages(image)
        assert image.present_runs().total_pages == stats.pages_written
        assert image.zero_runs().total_pages == stats.pages_zero
        image.check_digest()
    # Every page with data in the frozen process is in the image (as data or a known-zero page).
    live = present_pages(workload.pid, [(r.start, r.end) for r in ranges])
    held_addrs = held.page_addrs(PAGE_SIZE)
    missing = np.setdiff1d(live, held_addrs)
    assert missing.size == 0, f"{missing.size} present pages missing, first {int(missing[0]):#x}"
    assert np.setdiff1d(held_addrs, live).size == 0  # and nothing that was not there
    # Untouched memory and memory only read (the shared zero page) are never sent.
    for name in ("untouched", "read_only"):
        start, size = workload.region(name)
        inside = (held_addrs >= start) & (held_addrs < start + size)
        assert not inside.any(), f"{name} region pages were sent"
    start, size = workload.region("main")
    inside = (held_addrs >= start) & (held_addrs < start + size)
    assert int(inside.sum()) == size // PAGE_SIZE


async def test_uncompressed_migration(receiver: Receiver, workload: Workload) -> None:
    result, round_dir = await migrate(receiver, workload.pid, zstd_level=None)
    stats = result.rounds[0]
    assert stats.wire_bytes > stats.raw_bytes  # raw payload plus message framing
    report = verify_against_process(round_dir, workload.pid, dump_ranges(workload.pid), PAGE_SIZE)
    assert report.ok


async def test_resume_after_migration(receiver: Receiver, workload: Workload) -> None:
    """Without --leave-stopped the process runs on after its memory was sent."""
    cfg = SendConfig(pid=workload.pid, target=receiver.address, leave_stopped=False)
    await send_frozen(cfg)
    states = {procfs.read_status(t).state[0] for t in procfs.list_threads(workload.pid)}
    assert states <= {"R", "S"}
    assert procfs.read_status(workload.pid).tracer_pid == 0


async def test_session_manifest_and_layout(receiver: Receiver, workload: Workload) -> None:
    result, round_dir = await migrate(receiver, workload.pid)
    session = round_dir.parent
    assert sorted(p.name for p in session.iterdir()) == ["round-0", "session.json", "stats.json"]
    assert sorted(p.name for p in round_dir.iterdir()) == sorted(
        ["inventory.img", f"pagemap-{workload.pid}.img", "pages-1.img", "pages-1.xxh3", "pagehaul-round.json"])
    inv = codec.decode_inventory((round_dir / "inventory.img").read_bytes())
    assert inv.pre_dump_mode == codec.PRE_DUMP_READ
    assert inv.dump_uptime is not None
    assert inv.dump_uptime > 0
    manifest = json.loads((session / "session.json").read_text())
    assert manifest["complete"] is True
    assert manifest["rounds"] == ["round-0"]
    assert manifest["pid"] == workload.pid
    assert result.session_id == session.name

"""CRIU's own crit reads the images a real migration wrote, and sees what we meant to write."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from pagehaul import codec
from pagehaul.criu_tools import CriuTools
from pagehaul.kernel import PAGE_SIZE
from receiver.grpc_server import Receiver
from sender.config import SendConfig
from sender.precopy import send_frozen
from tests.conftest import Workload

FLAG_NAMES = {codec.PE_PRESENT: "PE_PRESENT", codec.PE_PARENT: "PE_PARENT"}


@pytest.mark.criu
async def test_crit_decodes_migrated_images(receiver: Receiver, workload: Workload, criu_tools: CriuTools) -> None:
    result = await send_frozen(SendConfig(pid=workload.pid, target=receiver.address))
    round_dir = receiver.config.images_dir / result.session_id / "round-0"
    ours = codec.read_pagemap(round_dir / f"pagemap-{workload.pid}.img")

    decoded = criu_tools.crit_decode(round_dir / f"pagemap-{workload.pid}.img")
    assert decoded["magic"] == "PAGEMAP"
    head, *entries = decoded["entries"]
    assert head == {"pages_id": ours.pages_id}
    assert [(e["vaddr"], e["nr_pages"], e["flags"], e["compat_nr_pages"]) for e in entries] == [
        (e.vaddr, e.nr_pages, e.flags, 0) for e in ours.entries]
    assert all("in_parent" not in e for e in entries)
    assert all(e.flags == codec.PE_PRESENT for e in ours.entries)
    # The pages file holds exactly the present pages, in pagemap order.
    present = sum(e["nr_pages"] for e in entries)
    assert present == result.rounds[0].pages_written
    assert (round_dir / f"pages-{ours.pages_id}.img").stat().st_size == present * PAGE_SIZE

    pretty = criu_tools.crit_decode(round_dir / f"pagemap-{workload.pid}.img", pretty=True)
    assert [(int(e["vaddr"], 16), e["flags"]) for e in pretty["entries"][1:]] == [
        (e.vaddr, FLAG_NAMES[e.flags]) for e in ours.entries]

    inventory = criu_tools.crit_decode(round_dir / "inventory.img")
    assert inventory["magic"] == "INVENTORY"
    ours_inv = codec.decode_inventory((round_dir / "inventory.img").read_bytes())
    (entry,) = inventory["entries"]
    assert entry["pre_dump_mode"] == codec.PRE_DUMP_READ == ours_inv.pre_dump_mode
    assert entry["dump_uptime"] == ours_inv.dump_uptime


async def test_migrated_images_reencode_byte_identical(receiver: Receiver, workload: Workload) -> None:
    result = await send_frozen(SendConfig(pid=workload.pid, target=receiver.address))
    round_dir = receiver.config.images_dir / result.session_id / "round-0"
    raw = (round_dir / f"pagemap-{workload.pid}.img").read_bytes()
    pagemap = codec.decode_pagemap(raw)
    assert len(pagemap.entries) > 10
    assert codec.encode_pagemap(pagemap.pages_id, pagemap.entries) == raw
    raw_inv = (round_dir / "inventory.img").read_bytes()
    assert codec.encode_inventory(codec.decode_inventory(raw_inv)) == raw_inv


async def test_inspect_reports_what_was_written(receiver: Receiver, workload: Workload) -> None:
    result = await send_frozen(SendConfig(pid=workload.pid, target=receiver.address))
    session = receiver.config.images_dir / result.session_id
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "cli", "inspect", str(session), "--json",
                                                stdout=subprocess.PIPE)
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    doc = json.loads(out)
    (rnd,) = doc["rounds"]
    assert rnd["directory"] == "round-0"
    assert rnd["parent"] is None
    (pm,) = rnd["pagemaps"]
    assert pm["pid"] == workload.pid
    assert pm["pages_present"] == result.rounds[0].pages_written
    assert pm["pages_file_bytes"] == result.rounds[0].pages_written * PAGE_SIZE
    assert rnd["pages_zero"] == result.rounds[0].pages_zero
    assert rnd["inventory"]["pre_dump_mode"] == codec.PRE_DUMP_READ

"""The receiver as a program and across rounds: SIGTERM, parent chains, stats."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import xxhash
import zstandard

from pagehaul import codec, store
from pagehaul.kernel import PAGE_SIZE
from pagehaul.v1 import migration_pb2 as pb
from receiver.grpc_server import Receiver
from tests.integration.test_bad_input import VMA, VMA_START, opening, raw_session


def batch(seq: int, first_page: int, data: bytes) -> pb.SenderMessage:
    return pb.SenderMessage(batch=pb.PageBatch(
        seq=seq, vaddr=[VMA_START + first_page * PAGE_SIZE], nr_pages=[len(data) // PAGE_SIZE],
        compression=pb.COMPRESSION_ZSTD, payload=zstandard.ZstdCompressor().compress(data),
        xxh3_64=xxhash.xxh3_64_intdigest(data)))


def holes(seq: int, kind: int, first_page: int, n: int) -> pb.SenderMessage:
    return pb.SenderMessage(holes=pb.Holes(seq=seq, kind=kind,  # type: ignore[arg-type]
                                           vaddr=[VMA_START + first_page * PAGE_SIZE], nr_pages=[n]))


def page(fill: int, n: int = 1) -> bytes:
    return bytes([fill]) * PAGE_SIZE * n


async def test_three_rounds_chain_through_parents(receiver: Receiver) -> None:
    """Round 0: pages 0-7. Round 1: page 2 rewritten, 0-1 and 3-7 from the parent. Round 2
    (final): page 5 rewritten, page 7 zeroed, the rest from the parent (some through two links)."""
    begin = [pb.SenderMessage(round_begin=pb.RoundBegin(round=r, frozen=r == 2, vmas=[VMA], dump_uptime_us=1))
             for r in range(3)]
    msgs = [
        opening()[0], begin[0], batch(1, 0, b"".join(page(i + 1) for i in range(8))),
        pb.SenderMessage(round_end=pb.RoundEnd(round=0, last_seq=1, stats=pb.RoundStats(pages_written=8))),
        begin[1], holes(2, pb.HOLE_KIND_PARENT, 0, 2), batch(3, 2, page(0xAA)), holes(4, pb.HOLE_KIND_PARENT, 3, 5),
        pb.SenderMessage(round_end=pb.RoundEnd(round=1, last_seq=4)),
        begin[2], holes(5, pb.HOLE_KIND_PARENT, 0, 5), batch(6, 5, page(0xBB)), holes(7, pb.HOLE_KIND_PARENT, 6, 1),
        holes(8, pb.HOLE_KIND_ZERO, 7, 1),
        pb.SenderMessage(round_end=pb.RoundEnd(round=2, last_seq=8, final=True)),
        pb.SenderMessage(stats=pb.SessionStats(frozen_time_us=1234, converged=True, stop_reason="test")),
    ]
    code, details = await raw_session(receiver.address, msgs)
    assert code == grpc.StatusCode.OK, details
    (session,) = list(receiver.config.images_dir.iterdir())
    assert os.readlink(session / "round-1" / "parent") == "../round-0"
    assert os.readlink(session / "round-2" / "parent") == "../round-1"
    want = [page(1), page(2), page(0xAA), page(4), page(5), page(0xBB), page(7), page(0)]
    with store.open_round(session / "round-2", 4242, PAGE_SIZE) as image:
        got = image.read_range(VMA_START, 8, absent_as_zero=True)
    assert got == b"".join(want)
    pm = codec.read_pagemap(session / "round-2" / "pagemap-4242.img")
    assert [(e.vaddr - VMA_START) // PAGE_SIZE for e in pm.entries] == [0, 5, 6]
    assert [e.flags for e in pm.entries] == [codec.PE_PARENT, codec.PE_PRESENT, codec.PE_PARENT]
    stats = json.loads((session / "stats.json").read_text())
    assert [r["round"] for r in stats["rounds"]] == [0, 1, 2]
    assert stats["rounds"][0]["pages_written"] == 8
    assert stats["session"]["frozen_time_us"] == 1234
    manifest = json.loads((session / "session.json").read_text())
    assert manifest["rounds"] == ["round-0", "round-1", "round-2"]
    assert manifest["complete"] is True


async def test_parent_hole_not_in_parent_is_refused(receiver: Receiver) -> None:
    msgs = [
        *opening(), batch(1, 0, page(1, 2)), pb.SenderMessage(round_end=pb.RoundEnd(round=0, last_seq=1)),
        pb.SenderMessage(round_begin=pb.RoundBegin(round=1, vmas=[VMA])), holes(2, pb.HOLE_KIND_PARENT, 1, 2),
        pb.SenderMessage(round_end=pb.RoundEnd(round=1, last_seq=2, final=True)),
    ]
    code, details = await raw_session(receiver.address, msgs)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "parent" in details
    (session,) = list(receiver.config.images_dir.iterdir())
    # The committed round stays; the refused one leaves nothing, not even a hidden directory.
    # flat-0 is round 0 folded for restore (pagehaul.flatten), made in the background after its commit.
    assert sorted(p.name for p in session.iterdir() if "flat-" not in p.name) == [
        "round-0", "session.json", "stats.json"]


def test_receiver_stops_on_sigterm(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "cli", "receive", "--listen", "127.0.0.1:0",
                             "--images-dir", str(tmp_path), "--insecure"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("pagehaul receiver listening on 127.0.0.1:")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_receiver_bad_listen_address(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "cli", "receive", "--listen", "256.1.1.1:1",
                           "--images-dir", str(tmp_path), "--insecure"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("pagehaul: error: cannot listen on 256.1.1.1:1")
    assert "Traceback" not in proc.stderr

"""Hostile clients against the receiver's resource bounds (issue 13): real receiver, real gRPC on
127.0.0.1:0, real files. Each test states the bound it holds: session slots, memory, file
descriptors, disk, and who may resume a session.
"""

from __future__ import annotations

import asyncio
import os
import resource
import struct
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Final

import grpc
import pytest
import zstandard

from pagehaul.security import Security
from pagehaul.v1 import migration_pb2 as pb
from pagehaul.v1 import restore_pb2 as rpb
from pagehaul.wire import CHANNEL_OPTIONS, MAX_BATCH_BYTES, METHOD_PATH
from receiver.restore import METHOD_PATH as RESTORE_PATH
from receiver.restore import RestoreConfig
from receiver.server import Receiver, ReceiverConfig
from receiver.session import SessionLimits
from sender.agent import PAGE_SIZE
from tests.integration.test_bad_input import VMA_START, batch, end, opening, raw_session
from tests.integration.test_restore_rpc import CASES as RESTORE_CASES
from tests.integration.test_restore_rpc import END, TOKEN, chunk, make_session
from tests.integration.test_restore_rpc import begin as restore_begin
from tests.integration.test_restore_rpc import call as restore_call


async def started(cfg: ReceiverConfig) -> AsyncIterator[Receiver]:
    r = Receiver(cfg)
    await r.start()
    try:
        yield r
    finally:
        await r.stop(0)


async def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    """Poll ``predicate`` while the event loop (and the receiver on it) runs; fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.005)  # yields to the receiver; the predicate is the synchronisation


def stream(channel: grpc.aio.Channel) -> grpc.aio.StreamStreamCall[pb.SenderMessage, pb.ReceiverMessage]:
    return channel.stream_stream(METHOD_PATH, request_serializer=pb.SenderMessage.SerializeToString,
                                 response_deserializer=pb.ReceiverMessage.FromString)()  # type: ignore[call-arg]


async def reply(call: grpc.aio.StreamStreamCall[pb.SenderMessage, pb.ReceiverMessage]) -> pb.ReceiverMessage:
    msg = await call.read()
    assert isinstance(msg, pb.ReceiverMessage), msg
    return msg


def fds_under(path: Path) -> int:
    """This process's open file descriptors on files under ``path`` (the receiver runs in it)."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        n += target.startswith(str(path))
    return n


def open_rounds(images: Path) -> list[Path]:
    return list(images.glob("*/.round-*"))


# --- 1. every way a stream ends detaches its session ------------------------------------------


@pytest.fixture
async def small_receiver(tmp_path: Path) -> AsyncIterator[Receiver]:
    async for r in started(ReceiverConfig(images_dir=tmp_path / "images", max_sessions=2, resume_window_s=0.2)):
        yield r


async def test_cancelled_streams_are_detached_and_expire(small_receiver: Receiver) -> None:
    """A client that cancels its call right after the receiver answered leaves the receiver's
    generator suspended at a ``yield``: grpc then closes it (GeneratorExit), which must detach
    the session like any other lost stream, so it expires and frees its slot, files and fds."""
    images = small_receiver.config.images_dir
    for _ in range(2 * small_receiver.config.max_sessions):
        async with grpc.aio.insecure_channel(small_receiver.address, options=CHANNEL_OPTIONS) as channel:
            call = stream(channel)
            for msg in opening():
                await call.write(msg)
            assert (await reply(call)).WhichOneof("msg") == "accepted"
            call.cancel()
    await wait_until(lambda: not open_rounds(images) and fds_under(images) == 0,
                     "cancelled sessions to expire (open rounds and their fds gone)")
    code, details = await raw_session(small_receiver.address, [*opening(), batch(), end()])
    assert code == grpc.StatusCode.OK, details


# --- 2. a zstd frame never produces more than it declares ----------------------------------


BIG_VMA = pb.Vma(start=VMA_START, end=VMA_START + (1 << 16) * PAGE_SIZE, prot=3, kind=pb.VMA_KIND_ANON)


def opening_big() -> list[pb.SenderMessage]:
    """``opening()`` with one VMA of 65,536 pages, room for the largest batch and many holes."""
    return [opening()[0], pb.SenderMessage(round_begin=pb.RoundBegin(round=0, frozen=True, vmas=[BIG_VMA],
                                                                     dump_uptime_us=1))]


def rle_bomb(declared: int, blocks: int) -> bytes:
    """A zstd frame that declares ``declared`` bytes but is not single-segment (a 128 KiB window
    descriptor), followed by ``blocks`` RLE blocks of 128 KiB: 4 bytes each on the wire."""
    header = struct.pack("<IBBI", 0xFD2FB528, 0x80, 0x38, declared)  # 4-byte content size; window 2**17
    block = 131072 << 3 | 2  # RLE, not the last block
    last = block | 1
    return header + (block.to_bytes(3, "little") + b"\0") * (blocks - 1) + last.to_bytes(3, "little") + b"\0"


async def test_zstd_bomb_with_a_window_descriptor_is_refused_within_its_declared_size(receiver: Receiver) -> None:
    raw_len = MAX_BATCH_BYTES
    bomb = rle_bomb(raw_len, 2000)  # 256 MiB from 8 KB
    assert zstandard.frame_content_size(bomb) == raw_len
    msg = batch(nr_pages=[raw_len // PAGE_SIZE], payload=bomb)
    tracemalloc.start()
    try:
        code, details = await raw_session(receiver.address, [*opening_big(), msg, end()])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert code == grpc.StatusCode.DATA_LOSS, details
    assert "batch 1" in details
    assert peak < 4 * raw_len, f"decoding an 8 KB batch took {peak} bytes"
    assert list(receiver.config.images_dir.iterdir()) == []


# --- 3. holes are bounded by the declared VMAs and by a per-round count -----------------------


def holes(seq: int, vaddr: list[int], kind: pb.HoleKind = pb.HOLE_KIND_ZERO) -> pb.SenderMessage:
    return pb.SenderMessage(holes=pb.Holes(seq=seq, kind=kind, vaddr=vaddr, nr_pages=[1] * len(vaddr)))


EVERY_PAGE: Final = [VMA_START + i * PAGE_SIZE for i in range(1 << 16)]


async def test_holes_repeated_beyond_the_declared_vmas_are_refused_at_once(receiver: Receiver) -> None:
    """The same 65,536 one-page runs sent again and again: the second message already covers
    more than the declared VMAs, so it is refused then, not at round end after all of them
    have piled up in memory."""
    messages = [*opening_big(), *(holes(seq, EVERY_PAGE) for seq in range(1, 6)), end(5)]
    code, details = await raw_session(receiver.address, messages)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.startswith("holes 2:"), details
    assert list(receiver.config.images_dir.iterdir()) == []


async def test_overlapping_runs_in_one_holes_message_are_refused(receiver: Receiver) -> None:
    messages = [*opening_big(), holes(1, [VMA_START, VMA_START + PAGE_SIZE, VMA_START]), end(1)]
    code, details = await raw_session(receiver.address, messages)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.startswith("holes 1:"), details


async def test_hole_runs_per_round_are_capped(tmp_path: Path) -> None:
    """Disjoint holes inside a huge VMA: what bounds their memory is the count of runs a round
    may hold; beyond it the session is refused as out of resources."""
    cfg = ReceiverConfig(images_dir=tmp_path / "images", limits=SessionLimits(max_hole_runs=3 << 15))
    huge = pb.Vma(start=VMA_START, end=VMA_START + (1 << 20) * PAGE_SIZE, prot=3, kind=pb.VMA_KIND_ANON)
    begin = pb.SenderMessage(round_begin=pb.RoundBegin(round=0, frozen=True, vmas=[huge], dump_uptime_us=1))
    every_other = [VMA_START + 2 * i * PAGE_SIZE for i in range(1 << 18)]
    messages = [opening()[0], begin, *(holes(seq + 1, every_other[seq << 16:(seq + 1) << 16]) for seq in range(4)),
                end(4)]
    async for r in started(cfg):
        code, details = await raw_session(r.address, messages)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert details.startswith("holes 2:"), details


# --- 4. file descriptors are bounded per session and in total ---------------------------------


def round_with_images(n: int) -> pb.SenderMessage:
    vma = opening()[1].round_begin.vmas[0]
    return pb.SenderMessage(round_begin=pb.RoundBegin(round=0, frozen=True, dump_uptime_us=1, images=[
        pb.Image(kind=pb.IMAGE_KIND_PROCESS, id=pid, vmas=[vma]) for pid in range(1, n + 1)]))


@pytest.fixture
def few_fds() -> Iterator[int]:
    """This process (the receiver's) may open only a few hundred more files."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    headroom = 600
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + headroom, hard))
    try:
        yield headroom
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_one_round_cannot_take_the_receivers_file_descriptors(tmp_path: Path, few_fds: int) -> None:
    """Rounds declaring hundreds of images are refused as out of resources (one of them more than
    the process may open, one within that but beyond a session's share), and a session already
    under way completes."""
    cfg = ReceiverConfig(images_dir=tmp_path / "images", max_sessions=4)
    async for r in started(cfg):
        async with grpc.aio.insecure_channel(r.address, options=CHANNEL_OPTIONS) as channel:
            legit = stream(channel)
            for msg in opening():
                await legit.write(msg)
            assert (await reply(legit)).WhichOneof("msg") == "accepted"
            for images in (few_fds, few_fds // 3):
                code, details = await raw_session(r.address, [opening()[0], round_with_images(images)])
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
            for msg in (batch(), end()):
                await legit.write(msg)
            await legit.done_writing()
            replies = []
            while isinstance(m := await legit.read(), pb.ReceiverMessage):
                replies.append(m)
            assert await legit.code() == grpc.StatusCode.OK, await legit.details()
            assert any(m.WhichOneof("msg") == "committed" for m in replies)


# --- 7. the Restore RPC gives back disk and time ----------------------------------------------


@pytest.fixture
async def restore_server(tmp_path: Path) -> AsyncIterator[Receiver]:
    cfg = ReceiverConfig(images_dir=tmp_path / "images", security=Security(insecure=True, token=TOKEN),
                         restore=RestoreConfig(Path("/bin/false"), max_bytes=1 << 20, idle_timeout_s=0.5))
    async for r in started(cfg):
        yield r


def shipped_left(images: Path) -> list[Path]:
    """What failed restores left besides criu's logs (nothing, or the disk fills up)."""
    return [p for p in images.glob("*/restore-*/**/*") if (not p.is_dir() and p.name not in ("restore.log", "criu.out"))
            or p.name == "shipped"]


@pytest.mark.parametrize("case", ["file-twice", "unfinished-file", "criu-fails"])
async def test_failed_restores_leave_no_shipped_files(restore_server: Receiver, case: str) -> None:
    images = restore_server.config.images_dir
    make_session(images)
    requests, code, _ = RESTORE_CASES[case]
    err = await restore_call(restore_server.address, requests)
    assert err.code() == code, err.details()
    assert shipped_left(images) == []


async def test_shipped_name_clashing_with_the_layout_is_invalid(restore_server: Receiver) -> None:
    make_session(restore_server.config.images_dir)
    err = await restore_call(restore_server.address, [restore_begin(), chunk("pages-1.img", b"x"), END])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert "pages-1.img" in (err.details() or "")
    assert shipped_left(restore_server.config.images_dir) == []


async def test_silent_restore_stream_times_out_and_frees_the_session(restore_server: Receiver) -> None:
    make_session(restore_server.config.images_dir)
    async with grpc.aio.insecure_channel(restore_server.address) as channel:
        rpc = channel.stream_unary(RESTORE_PATH, request_serializer=rpb.RestoreRequest.SerializeToString,
                                   response_deserializer=rpb.RestoreReply.FromString)
        silent = asyncio.Event()

        async def gen() -> AsyncIterator[rpb.RestoreRequest]:
            yield restore_begin()
            await silent.wait()  # never set: the client says nothing more

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await rpc(gen(), metadata=Security(insecure=True, token=TOKEN).token_metadata(), timeout=30)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "no restore message for 0.5 s" in (info.value.details() or "")
    assert shipped_left(restore_server.config.images_dir) == []
    again = await restore_call(restore_server.address, RESTORE_CASES["criu-fails"][0])
    assert again.code() == grpc.StatusCode.ABORTED, again.details()

"""The receiver session (no gRPC) with rounds of several images: per-image VMAs, ascending data and
pages files, and the refusals that keep a peer from mixing them up."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import xxhash

from pagehaul import codec, store
from pagehaul.errors import ProtocolError
from pagehaul.v1 import migration_pb2 as pb
from pagehaul.wire import PROTOCOL_VERSION
from receiver.session import ReceiverSession

PS = 4096
ROOT = 300


def vma(start: int, pages: int) -> pb.Vma:
    return pb.Vma(start=start, end=start + pages * PS, prot=3, kind=pb.VMA_KIND_ANON)


def proc(pid: int, start: int, pages: int) -> pb.Image:
    return pb.Image(kind=pb.IMAGE_KIND_PROCESS, id=pid, vmas=[vma(start, pages)], pid=pid)


def shm(shmid: int, pages: int) -> pb.Image:
    return pb.Image(kind=pb.IMAGE_KIND_SHMEM, id=shmid, vmas=[vma(0, pages)])


def batch(seq: int, image: int, vaddr: int, fill: int, pages: int = 1) -> pb.SenderMessage:
    data = bytes([fill]) * PS * pages
    return pb.SenderMessage(batch=pb.PageBatch(seq=seq, vaddr=[vaddr], nr_pages=[pages], image=image,
                                               compression=pb.COMPRESSION_NONE, payload=data,
                                               xxh3_64=xxhash.xxh3_64_intdigest(data)))


def begin(round_no: int, *imgs: pb.Image) -> pb.SenderMessage:
    return pb.SenderMessage(round_begin=pb.RoundBegin(round=round_no, images=list(imgs), dump_uptime_us=1))


async def opened(tmp_path: Path) -> ReceiverSession:
    session = ReceiverSession(tmp_path, "test")
    await session.handle(pb.SenderMessage(open=pb.SessionOpen(protocol_version=PROTOCOL_VERSION, pid=ROOT,
                                                              page_size=PS, tracker=pb.TRACKER_HASH)))
    return session


async def test_round_with_processes_and_shared_memory(tmp_path: Path) -> None:
    s = await opened(tmp_path)
    await s.handle(begin(0, proc(ROOT, 0x10000, 4), proc(301, 0x10000, 4), shm(77, 8)))
    # Interleaved images, each ascending on its own.
    for msg in (batch(1, 1, 0x10000, 1), batch(2, 0, 0x12000, 2), batch(3, 2, 0, 3), batch(4, 1, 0x11000, 4),
                batch(5, 2, 5 * PS, 5)):
        await s.handle(msg)
    replies = await s.handle(pb.SenderMessage(round_end=pb.RoundEnd(round=0, last_seq=5)))
    committed = replies[0].committed
    assert committed.pages_written == 5
    round0 = tmp_path / s.session_id / committed.directory
    infos = store.read_round_infos(round0)
    assert infos is not None
    assert {k: v.stats.pages_written for k, v in infos.items()} == {
        codec.ImageKey("pid", ROOT): 1, codec.ImageKey("pid", 301): 2, codec.ImageKey("shmem", 77): 2}
    with store.open_round(round0, 77, PS, shmem=True) as image:
        assert image.read_range(5 * PS, 1) == bytes([5]) * PS
    # Round 1: parent holes per image, resolved in that image's parent.
    await s.handle(begin(1, proc(ROOT, 0x10000, 4), shm(77, 8)))
    await s.handle(pb.SenderMessage(holes=pb.Holes(seq=6, kind=pb.HOLE_KIND_PARENT, vaddr=[0], nr_pages=[1],
                                                   image=1)))
    await s.handle(batch(7, 0, 0x12000, 9))
    replies = await s.handle(pb.SenderMessage(round_end=pb.RoundEnd(round=1, last_seq=7, final=True)))
    round1 = tmp_path / s.session_id / replies[0].committed.directory
    with store.open_round(round1, 77, PS, shmem=True) as image:
        assert image.read_range(0, 1) == bytes([3]) * PS
    assert not (round1 / codec.pagemap_name(301)).exists()  # gone between rounds


@pytest.mark.parametrize(("msg", "words"), [
    (begin(0, shm(77, 8), proc(ROOT, 0x10000, 4)), "the first image must be a process"),
    (begin(0, proc(ROOT, 0x10000, 4), proc(ROOT, 0x20000, 4)), "declared twice"),
    (begin(0, proc(ROOT, 0x10000, 4), pb.Image(kind=pb.IMAGE_KIND_PROCESS, id=5)), "declares no VMAs"),
    (begin(0, proc(0, 0x10000, 4)), "process image id 0 out of range"),
    (begin(0, proc(ROOT, 0x10000, 4), pb.Image(kind=7, id=5, vmas=[vma(0, 1)])),  # type: ignore[arg-type]
     "unknown image kind"),
    (pb.SenderMessage(round_begin=pb.RoundBegin(round=0, vmas=[vma(0x10000, 1)], images=[proc(ROOT, 0x10000, 4)])),
     "both VMAs and images"),
])
async def test_bad_images_are_refused(tmp_path: Path, msg: pb.SenderMessage, words: str) -> None:
    s = await opened(tmp_path)
    with pytest.raises(ProtocolError, match=words):
        await s.handle(msg)


@pytest.mark.parametrize(("msg", "words"), [
    (batch(1, 2, 0x10000, 1), "image 2 not declared"),
    (batch(1, 1, 0x10000, 1), r"run at 0x10000 is not inside a declared VMA"),  # image 1's VMAs, not image 0's
])
async def test_runs_are_checked_against_their_own_image(tmp_path: Path, msg: pb.SenderMessage, words: str) -> None:
    s = await opened(tmp_path)
    await s.handle(begin(0, proc(ROOT, 0x10000, 4), proc(301, 0x40000, 4)))
    with pytest.raises(ProtocolError, match=words):
        await s.handle(msg)
    s.abort()
    assert os.listdir(tmp_path) == []


async def test_data_must_ascend_within_an_image(tmp_path: Path) -> None:
    s = await opened(tmp_path)
    await s.handle(begin(0, proc(ROOT, 0x10000, 4), proc(301, 0x10000, 4)))
    await s.handle(batch(1, 0, 0x12000, 1))
    await s.handle(batch(2, 1, 0x10000, 1))  # another image: its own order
    with pytest.raises(ProtocolError, match="does not ascend"):
        await s.handle(batch(3, 0, 0x11000, 1))

"""The round writer's parent-hole check from the cover kept in memory after the parent's commit, against
the on-disk fallback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xxhash

from pagehaul import codec, store
from pagehaul.codec import ImageKey, InventoryEntry
from pagehaul.errors import ImageError
from pagehaul.runs import Runs
from pagehaul.store import ImageCover, ImageWriter, RoundWriter, parent_link
from pagehaul.v1 import migration_pb2 as pb
from pagehaul.wire import PROTOCOL_VERSION
from receiver.session import ReceiverSession

PS = 4096
PID = 4242
INV = InventoryEntry.for_pre_dump(dump_uptime_us=1)
KEY = ImageKey("pid", PID)


def _commit(session: Path, round_no: int, present: list[tuple[int, int]], holes: list[tuple[int, int]],
            cover: ImageCover | None = None) -> ImageCover:
    with RoundWriter(session, round_no, PS, parent_link(round_no)) as rw:
        w = rw.image(KEY, parent_cover=cover)
        runs = Runs.from_pairs(sorted(present))
        w.append_pages(runs, bytes(runs.total_pages * PS))
        if holes:
            w.add_parent_holes(Runs.from_pairs(holes))
        rw.commit(INV)
        return rw.covers[KEY]


def _accepts(session: Path, round_no: int, holes: Runs, cover: ImageCover | None) -> bool:
    rw = RoundWriter(session, round_no, PS, parent_link(round_no))
    try:
        rw.image(KEY, parent_cover=cover).add_parent_holes(holes)
        rw.commit(INV)
    except ImageError as err:
        if "not found in parent" not in str(err):
            raise
        return False
    finally:
        rw.abort()
    (session / store.round_dir_name(round_no) / codec.pagemap_name(PID)).unlink()
    for f in (session / store.round_dir_name(round_no)).iterdir():
        f.unlink()
    (session / store.round_dir_name(round_no)).rmdir()
    return True


def test_memory_cover_decides_like_the_pagemap_on_disk(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    base = 0x10000
    # Round 0: scattered present runs; round 1: present runs and parent holes (so its pagemap mixes
    # PE_PRESENT and PE_PARENT entries, touching each other in places).
    r0 = [(base + p * PS, n) for p, n in ((0, 3), (3, 2), (8, 1), (10, 4), (20, 2), (30, 5))]
    cover0 = _commit(tmp_path, 0, r0, [])
    cover1 = _commit(tmp_path, 1, [(base + 5 * PS, 2), (base + 14 * PS, 1), (base + 40 * PS, 2)],
                     [(base, 5), (base + 10 * PS, 4), (base + 31 * PS, 3)], cover0)
    for cover, rnd in ((cover0, 0), (cover1, 1)):
        on_disk = ImageCover.read(tmp_path / store.round_dir_name(rnd), rnd, KEY, PS)
        assert (cover.round_no, cover.key) == (on_disk.round_no, on_disk.key)
        np.testing.assert_array_equal(cover.starts, on_disk.starts)
        np.testing.assert_array_equal(cover.ends, on_disk.ends)
        assert not cover.starts.flags.writeable
    decisions = []
    for _ in range(150):
        holes = Runs.from_pairs([(base + int(rng.integers(0, 45)) * PS, int(rng.integers(1, 6)))
                                 for _ in range(int(rng.integers(1, 3)))])
        if len(holes) == 2 and not _disjoint(holes):
            continue
        in_memory = _accepts(tmp_path, 2, holes, cover1)
        assert _accepts(tmp_path, 2, holes, None) == in_memory, list(holes)
        decisions.append(in_memory)
    assert any(decisions)
    assert not all(decisions)


def _disjoint(holes: Runs) -> bool:
    (a, an), (b, _) = sorted(holes)
    return a + an * PS <= b


def test_cover_of_another_round_image_or_link_is_not_used(tmp_path: Path) -> None:
    base = 0x10000
    cover0 = _commit(tmp_path, 0, [(base, 2)], [])
    everything = ImageCover(0, KEY, np.array([0], np.uint64), np.array([2**63], np.uint64))
    hole = Runs.of([base + 4 * PS], [1])  # not in round 0
    # A cover for this image and round 0 is trusted as is (the caller keeps it from round 0's commit):
    # this made-up one covers everything, which shows it is what decides.
    assert _accepts(tmp_path, 1, hole, everything)
    assert _accepts(tmp_path, 1, Runs.of([base], [2]), cover0)
    for wrong in (ImageCover(5, KEY, everything.starts, everything.ends),
                  ImageCover(0, ImageKey("shmem", PID), everything.starts, everything.ends),
                  ImageCover(0, ImageKey("pid", PID + 1), everything.starts, everything.ends)):
        # Not this image's or not round 0's: ignored, and the pagemap on disk refuses the hole.
        assert not _accepts(tmp_path, 1, hole, wrong)
    rw = RoundWriter(tmp_path, 1, PS, "../round-0/.")
    try:
        rw.image(KEY, parent_cover=everything).add_parent_holes(hole)
        with pytest.raises(ImageError, match="not found in parent"):
            rw.commit(INV)
    finally:
        rw.abort()


def test_commit_with_memory_cover_does_not_read_the_parent_pagemap(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    base = 0x10000
    cover0 = _commit(tmp_path, 0, [(base, 4)], [])

    def no_read(path: Path) -> codec.Pagemap:
        raise AssertionError(f"read {path}")

    monkeypatch.setattr(store, "read_pagemap", no_read)
    cover1 = _commit(tmp_path, 1, [(base + 8 * PS, 1)], [(base, 4)], cover0)
    np.testing.assert_array_equal(cover1.starts, [base, base + 8 * PS])
    np.testing.assert_array_equal(cover1.ends, [base + 4 * PS, base + 9 * PS])
    with pytest.raises(AssertionError, match="read"):  # without a cover: the fallback reads the disk
        _commit(tmp_path, 2, [], [(base, 1)])


def _batch(seq: int, vaddr: int) -> pb.SenderMessage:
    data = bytes([seq]) * PS
    return pb.SenderMessage(batch=pb.PageBatch(seq=seq, vaddr=[vaddr], nr_pages=[1],
                                               compression=pb.COMPRESSION_NONE, payload=data,
                                               xxh3_64=xxhash.xxh3_64_intdigest(data)))


async def test_session_hands_covers_to_the_next_round_and_recovery_reads_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vmas = [pb.Vma(start=0x10000, end=0x10000 + 8 * PS, prot=3, kind=pb.VMA_KIND_ANON)]
    s = ReceiverSession(tmp_path, "test")
    accepted = await s.handle(pb.SenderMessage(open=pb.SessionOpen(protocol_version=PROTOCOL_VERSION, pid=PID,
                                                                   page_size=PS, tracker=pb.TRACKER_HASH)))
    token = accepted[0].accepted.resume_token
    seen: list[ImageCover | None] = []
    real_image = RoundWriter.image

    def spy(self: RoundWriter, key: ImageKey, *, parent_cover: ImageCover | None = None) -> ImageWriter:
        writer = real_image(self, key, parent_cover=parent_cover)
        seen.append(writer._parent_cover)
        return writer

    monkeypatch.setattr(RoundWriter, "image", spy)
    await s.handle(pb.SenderMessage(round_begin=pb.RoundBegin(round=0, vmas=vmas, dump_uptime_us=1)))
    await s.handle(_batch(1, 0x10000))
    await s.handle(_batch(2, 0x11000))
    await s.handle(pb.SenderMessage(round_end=pb.RoundEnd(round=0, last_seq=2)))
    await s.handle(pb.SenderMessage(round_begin=pb.RoundBegin(round=1, vmas=vmas, dump_uptime_us=1)))
    await s.handle(pb.SenderMessage(holes=pb.Holes(seq=3, kind=pb.HOLE_KIND_PARENT, vaddr=[0x10000], nr_pages=[2])))
    await s.handle(pb.SenderMessage(round_end=pb.RoundEnd(round=1, last_seq=3)))
    assert seen[0] is None
    assert seen[1] is not None
    assert (seen[1].round_no, seen[1].key) == (0, KEY)
    # A restarted receiver has no covers: round 2's writer checks against round 1's pagemap on disk.
    r = ReceiverSession.recover(tmp_path, s.session_id, token, "test")
    assert r is not None
    await r.handle(pb.SenderMessage(round_begin=pb.RoundBegin(round=2, vmas=vmas, dump_uptime_us=1)))
    assert seen[2] is None
    await r.handle(pb.SenderMessage(holes=pb.Holes(seq=4, kind=pb.HOLE_KIND_PARENT, vaddr=[0x10000],
                                                   nr_pages=[3])))
    with pytest.raises(ImageError, match="not found in parent"):
        await r.handle(pb.SenderMessage(round_end=pb.RoundEnd(round=2, last_seq=4)))

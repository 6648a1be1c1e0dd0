"""The image store (``pagehaul.store``): round directories written by the round writer, the sidecar,
and the round-chain reader, on real files."""

from __future__ import annotations

import errno
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import xxhash

from pagehaul import digest as page_digest
from pagehaul import store
from pagehaul.codec import (
    PE_LAZY,
    PE_PARENT,
    PE_PRESENT,
    ImageKey,
    InventoryEntry,
    PagemapEntry,
    decode_inventory,
    decode_pagemap,
    encode_pagemap,
)
from pagehaul.errors import ImageError
from pagehaul.runs import Runs
from pagehaul.store import (
    DumpDirWriter,
    ImageWriter,
    RoundFiles,
    RoundWriter,
    committed_rounds,
    iter_chain,
    open_round,
    parent_link,
    read_round_info,
)

PS = 4096
PID = 4242
KEY = ImageKey("pid", PID)
INV = InventoryEntry.for_pre_dump(dump_uptime_us=123_456_789)


def page(tag: int, vaddr: int) -> bytes:
    """A page whose bytes say which round wrote it and where it lives."""
    return struct.pack("<QQ", tag, vaddr) * (PS // 16)


def pages_of(tag: int, runs: Runs) -> bytes:
    return b"".join(page(tag, addr) for addr in runs.page_addrs(PS).tolist())


def entries_of(round_dir: Path) -> list[tuple[int, int, int]]:
    pm = decode_pagemap((round_dir / f"pagemap-{PID}.img").read_bytes())
    assert pm.pages_id == 1
    return [(e.vaddr, e.nr_pages, e.flags) for e in pm.entries]


def write_round(session: Path, round_no: int, present: Runs, data: bytes, *, holes: Runs | None = None,
                zeros: Runs | None = None) -> Path:
    with RoundWriter(session, round_no, PS, parent_link(round_no)) as rw:
        w = rw.image(KEY)
        w.append_pages(present, data)
        if holes is not None:
            w.add_parent_holes(holes)
        if zeros is not None:
            w.add_zero_runs(zeros)
        return rw.commit(INV)



# === Round directories =================================================================================

A = Runs.of([0x10000], [4])
B = Runs.of([0x20000], [2])
C = Runs.of([0x30000], [3])
Z = Runs.of([0x40000], [2])
NEW = Runs.of([0x50000], [1])


def build_three_rounds(session: Path) -> dict[int, dict[int, bytes]]:
    """Round 0: A, B, C present and Z zero. Round 1: one page of A, all of C and a new page rewritten,
    parent holes for the rest. Round 2: parent holes only. Returns the expected memory of each round."""
    zero = bytes(PS)
    mem: dict[int, bytes] = {}
    for r in (A, B, C):
        mem.update((addr, page(0, addr)) for addr in r.page_addrs(PS).tolist())
    mem.update((addr, zero) for addr in Z.page_addrs(PS).tolist())
    expected = {0: dict(mem)}

    with RoundWriter(session, 0, PS, None) as rw:
        w = rw.image(KEY)
        first = Runs.concat([A, B])
        w.append_pages(first, pages_of(0, first))
        w.append_pages(C, memoryview(pages_of(0, C)))
        w.add_zero_runs(Z)
        assert rw.commit(INV) == session / "round-0"
        assert (rw.stats.pages_written, rw.stats.pages_zero, rw.stats.pages_skipped_parent) == (9, 2, 0)

    rewritten = Runs.of([0x11000, 0x30000, 0x50000], [1, 3, 1])
    with RoundWriter(session, 1, PS, "../round-0") as rw:
        w = rw.image(KEY)
        w.append_pages(rewritten, pages_of(1, rewritten))
        w.add_parent_holes(Runs.of([0x20000, 0x12000, 0x10000], [2, 2, 1]))  # any order
        w.add_zero_runs(Z)
        w.sync_data()
        rw.commit(INV)
        assert rw.stats.pages_written == 5
        assert rw.stats.pages_skipped_parent == 5
        assert rw.stats.bytes_written == 5 * PS
    mem.update((addr, page(1, addr)) for addr in rewritten.page_addrs(PS).tolist())
    expected[1] = dict(mem)

    with RoundWriter(session, 2, PS, "../round-1") as rw:
        w = rw.image(KEY)
        w.add_parent_holes(Runs.concat([A, B, C, NEW]))
        w.add_zero_runs(Z)
        rw.commit(InventoryEntry(img_version=2, fdinfo_per_id=True, ns_per_id=True))
    expected[2] = dict(mem)
    return expected


def test_three_round_chain_reads_back_every_page(tmp_path: Path) -> None:
    expected = build_three_rounds(tmp_path)
    assert committed_rounds(tmp_path) == (0, 1, 2)
    assert sorted(os.listdir(tmp_path)) == ["round-0", "round-1", "round-2"]
    assert not os.path.lexists(tmp_path / "round-0" / "parent")
    assert os.readlink(tmp_path / "round-1" / "parent") == "../round-0"
    assert os.readlink(tmp_path / "round-2" / "parent") == "../round-1"

    assert entries_of(tmp_path / "round-0") == [(0x10000, 4, PE_PRESENT), (0x20000, 2, PE_PRESENT),
                                                (0x30000, 3, PE_PRESENT)]
    assert entries_of(tmp_path / "round-1") == [
        (0x10000, 1, PE_PARENT), (0x11000, 1, PE_PRESENT), (0x12000, 2, PE_PARENT),
        (0x20000, 2, PE_PARENT), (0x30000, 3, PE_PRESENT), (0x50000, 1, PE_PRESENT)]
    assert entries_of(tmp_path / "round-2") == [(0x10000, 4, PE_PARENT), (0x20000, 2, PE_PARENT),
                                                (0x30000, 3, PE_PARENT), (0x50000, 1, PE_PARENT)]
    assert (tmp_path / "round-2" / "pages-1.img").stat().st_size == 0
    assert decode_inventory((tmp_path / "round-1" / "inventory.img").read_bytes()) == INV

    for round_no, mem in expected.items():
        with open_round(tmp_path / f"round-{round_no}", PID, PS) as img:
            for addr, data in mem.items():
                assert img.read_range(addr, 1) == data, (round_no, hex(addr))
            # Multi-page reads cross entry boundaries and, in round 2, split one parent range over
            # three entries of round 1, two of which recurse into round 0.
            assert img.read_range(0x10000, 4) == b"".join(mem[0x10000 + i * PS] for i in range(4))
            assert img.read_range(0x30000, 3) == b"".join(mem[0x30000 + i * PS] for i in range(3))
            # "Every present page is in the image": held as data or known zero, nothing else.
            held = Runs.concat([img.present_runs(), img.zero_runs()]).sorted().merged(PS)
            assert Runs.from_page_addrs(held.page_addrs(PS), PS).pairs() == \
                Runs.from_page_addrs(np.array(sorted(mem), np.uint64), PS).pairs()
            assert img.zero_runs().pairs() == [(0x40000, 2)]
            img.check_digest()
            with pytest.raises(ImageError, match=r"pages 0x60000\.\.0x61000 are not in the pagemap"):
                img.read_range(0x60000, 1)
            assert img.read_range(0x60000, 1, absent_as_zero=True) == bytes(PS)


def test_sidecar_records_counts_zero_runs_and_digest(tmp_path: Path) -> None:
    build_three_rounds(tmp_path)
    round1 = tmp_path / "round-1"
    doc = json.loads((round1 / "pagehaul-round.json").read_text())
    digest = xxhash.xxh3_128((round1 / "pages-1.img").read_bytes()).hexdigest()
    assert doc == {
        "version": 1, "round": 1, "pid": PID, "page_size": PS, "pages_id": 1, "pages_written": 5,
        "pages_zero": 2, "pages_skipped_parent": 5, "bytes_written": 5 * PS, "pages_xxh3_128": digest,
        "zero_runs": [[0x40000, 2]],
        "pagemap_xxh3_128": xxhash.xxh3_128((round1 / f"pagemap-{PID}.img").read_bytes()).hexdigest(),
        "inventory_xxh3_128": xxhash.xxh3_128((round1 / "inventory.img").read_bytes()).hexdigest(),
        "page_digests": "pages-1.xxh3",
        "page_digests_xxh3_128": xxhash.xxh3_128((round1 / "pages-1.xxh3").read_bytes()).hexdigest(),
    }
    info = read_round_info(round1)
    assert info is not None
    assert info.files == RoundFiles(doc["pagemap_xxh3_128"], doc["inventory_xxh3_128"], "pages-1.xxh3",
                                    doc["page_digests_xxh3_128"])


def test_page_digest_file_holds_xxh3_64_of_every_page_in_pages_file_order(tmp_path: Path) -> None:
    build_three_rounds(tmp_path)
    for name in ("round-0", "round-1", "round-2"):
        pages = (tmp_path / name / "pages-1.img").read_bytes()
        raw = (tmp_path / name / "pages-1.xxh3").read_bytes()
        assert len(raw) == 8 * (len(pages) // PS)
        expected = [xxhash.xxh3_64_intdigest(pages[i:i + PS]) for i in range(0, len(pages), PS)]
        assert list(struct.unpack(f"<{len(raw) // 8}Q", raw)) == expected
        assert page_digest.from_bytes(raw).tolist() == expected


def test_page_digests_are_flushed_in_batches_and_by_sync_data(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "_DIGEST_FLUSH_PAGES", 3)
    runs = [Runs.of([0x10000 + i * PS], [1]) for i in range(7)]
    with RoundWriter(tmp_path, 0, PS, None) as rw:
        w = rw.image(KEY)
        assert w.page_digests_path is not None
        sizes = []
        for run in runs:
            w.append_pages(run, pages_of(0, run))
            sizes.append(w.page_digests_path.stat().st_size)
        assert sizes == [0, 0, 24, 24, 24, 48, 48]  # written three pages at a time
        w.sync_data()
        assert w.page_digests_path.stat().st_size == 56
        final = rw.commit(INV)
    expected = [xxhash.xxh3_64_intdigest(page(0, 0x10000 + i * PS)) for i in range(7)]
    assert page_digest.from_bytes((final / "pages-1.xxh3").read_bytes()).tolist() == expected


def test_sidecar_without_file_digests_still_reads(tmp_path: Path) -> None:
    build_three_rounds(tmp_path)
    path = tmp_path / "round-1" / "pagehaul-round.json"
    doc = json.loads(path.read_text())
    for key in ("pagemap_xxh3_128", "inventory_xxh3_128", "page_digests", "page_digests_xxh3_128"):
        del doc[key]
    path.write_text(json.dumps(doc))  # what a round written before the file digests looks like
    info = read_round_info(tmp_path / "round-1")
    assert info is not None
    assert info.files is None
    with open_round(tmp_path / "round-1", PID, PS) as img:
        img.check_digest()


@pytest.mark.parametrize(("change", "message"), [
    ({"page_digests": None}, "file digests without page_digests"),
    ({"page_digests": "../../etc/passwd"}, r"page_digests is '\.\./\.\./etc/passwd', expected 'pages-1\.xxh3'"),
    ({"pagemap_xxh3_128": "00"}, "pagemap_xxh3_128 is '00', expected 32 hex digits"),
    ({"inventory_xxh3_128": 5}, "inventory_xxh3_128 is 5, expected 32 hex digits"),
])
def test_sidecar_file_digests_are_checked(tmp_path: Path, change: dict[str, object], message: str) -> None:
    build_three_rounds(tmp_path)
    path = tmp_path / "round-1" / "pagehaul-round.json"
    doc = json.loads(path.read_text())
    for key, value in change.items():
        if value is None:
            del doc[key]
        else:
            doc[key] = value
    path.write_text(json.dumps(doc))
    with pytest.raises(ImageError, match=message):
        read_round_info(tmp_path / "round-1")


def test_check_digest_detects_a_flipped_byte(tmp_path: Path) -> None:
    build_three_rounds(tmp_path)
    pages = tmp_path / "round-0" / "pages-1.img"
    data = bytearray(pages.read_bytes())
    data[5000] ^= 1
    pages.write_bytes(bytes(data))
    with open_round(tmp_path / "round-2", PID, PS) as img:
        chain = list(iter_chain(img))
        assert [r.round_dir.resolve().name for r in chain] == ["round-2", "round-1", "round-0"]
        chain[0].check_digest()
        chain[1].check_digest()
        with pytest.raises(ImageError, match="xxh3-128"):
            chain[2].check_digest()


def test_round_is_invisible_until_commit(tmp_path: Path) -> None:
    rw = RoundWriter(tmp_path, 0, PS, None)
    rw.image(KEY).append_pages(A, pages_of(0, A))
    names = os.listdir(tmp_path)
    assert len(names) == 1
    assert names[0].startswith(".round-0.tmp-")
    assert rw.tmp_dir == tmp_path / names[0]
    assert sorted(os.listdir(rw.tmp_dir)) == ["pages-1.img", "pages-1.xxh3"]
    assert committed_rounds(tmp_path) == ()
    final = rw.commit(INV)
    assert os.listdir(tmp_path) == ["round-0"]
    assert sorted(os.listdir(final)) == ["inventory.img", "pagehaul-round.json", f"pagemap-{PID}.img",
                                         "pages-1.img", "pages-1.xxh3"]


def test_abort_removes_everything_and_is_idempotent(tmp_path: Path) -> None:
    rw = RoundWriter(tmp_path, 1, PS, "../round-0")
    w = rw.image(KEY)
    w.append_pages(A, pages_of(0, A))
    rw.abort()
    assert os.listdir(tmp_path) == []
    rw.abort()
    with pytest.raises(ImageError, match=r"writer of pagemap-4242\.img is aborted"):
        w.append_pages(B, pages_of(0, B))
    with pytest.raises(ImageError, match="round writer is aborted"):
        rw.image(ImageKey("pid", PID + 1))


def test_context_manager_aborts_on_error_and_keeps_committed(tmp_path: Path) -> None:
    def fail_midway() -> None:
        with RoundWriter(tmp_path, 0, PS, None) as rw:
            rw.image(KEY).append_pages(A, pages_of(0, A))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_midway()
    assert os.listdir(tmp_path) == []
    final = write_round(tmp_path, 0, A, pages_of(0, A))
    rw = RoundWriter(tmp_path, 1, PS, "../round-0")
    rw.abort()
    assert final.is_dir()


def test_touching_entries_merge_and_data_order_holds(tmp_path: Path) -> None:
    write_round(tmp_path, 0, Runs.of([0x1000], [16]), pages_of(0, Runs.of([0x1000], [16])))
    with RoundWriter(tmp_path, 1, PS, "../round-0") as rw:
        w = rw.image(KEY)
        for vaddr, nr in [(0x1000, 1), (0x2000, 1), (0x3000, 2)]:
            run = Runs.of([vaddr], [nr])
            w.append_pages(run, pages_of(1, run))
        w.append_pages(Runs.of([0x9000, 0xA000], [1, 2]), pages_of(1, Runs.of([0x9000], [3])))
        w.add_parent_holes(Runs.of([0x6000, 0x5000, 0x7000], [1, 1, 2]))
        w.add_parent_holes(Runs.of([0xD000], [1]))
        final = rw.commit(INV)
    assert entries_of(final) == [(0x1000, 4, PE_PRESENT), (0x5000, 4, PE_PARENT), (0x9000, 3, PE_PRESENT),
                                 (0xD000, 1, PE_PARENT)]
    with open_round(final, PID, PS) as img:
        assert img.read_range(0x1000, 16, absent_as_zero=True) == b"".join(
            page(1, a) if a < 0x5000 or 0x9000 <= a < 0xC000 else
            page(0, a) if 0x5000 <= a < 0x9000 or a == 0xD000 else bytes(PS)
            for a in range(0x1000, 0x11000, PS))


def test_short_writes_are_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    calls = 0

    def short_write(fd: int, data: bytes | memoryview) -> int:
        nonlocal calls
        calls += 1
        return real_write(fd, memoryview(data)[:1000])

    data = pages_of(0, A)
    with RoundWriter(tmp_path, 0, PS, None) as rw:
        with monkeypatch.context() as m:
            m.setattr(os, "write", short_write)
            rw.image(KEY).append_pages(A, data)
        final = rw.commit(INV)
    assert calls == -(-len(data) // 1000)
    assert (final / "pages-1.img").read_bytes() == data


def test_write_failure_leaves_only_abort(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full_disk(fd: int, data: bytes | memoryview) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    rw = RoundWriter(tmp_path, 0, PS, None)
    w = rw.image(KEY)
    with monkeypatch.context() as m:
        m.setattr(os, "write", full_disk)
        with pytest.raises(ImageError, match=r"pages-1\.img: offset 0: write failed: No space left"):
            w.append_pages(A, pages_of(0, A))
    with pytest.raises(ImageError, match=r"writer of pagemap-4242\.img is failed"):
        rw.commit(INV)
    with pytest.raises(ImageError, match="round writer is failed"):
        rw.commit(INV)
    rw.abort()
    assert os.listdir(tmp_path) == []


# --- validation


@pytest.fixture
def round0(tmp_path: Path) -> Path:
    """round-0 holding A and B."""
    present = Runs.concat([A, B])
    return write_round(tmp_path, 0, present, pages_of(0, present))


@pytest.fixture
def round1(tmp_path: Path, round0: Path) -> Iterator[RoundWriter]:
    with RoundWriter(tmp_path, 1, PS, "../round-0") as rw:
        yield rw


@pytest.fixture
def writer1(round1: RoundWriter) -> ImageWriter:
    return round1.image(KEY)


def test_overlap_present_and_hole(round1: RoundWriter, writer1: ImageWriter) -> None:
    run = Runs.of([0x10000], [2])
    writer1.append_pages(run, pages_of(1, run))
    writer1.add_parent_holes(Runs.of([0x11000], [2]))
    with pytest.raises(ImageError, match=r"present run 0x10000\+2 overlaps parent hole run 0x11000\+2"):
        round1.commit(INV)
    assert not (round1.session_dir / "round-1").exists()


def test_overlap_zero_and_present(round1: RoundWriter, writer1: ImageWriter) -> None:
    run = Runs.of([0x20000], [2])
    writer1.append_pages(run, pages_of(1, run))
    writer1.add_zero_runs(Runs.of([0x1F000], [2]))
    with pytest.raises(ImageError, match=r"zero run 0x1f000\+2 overlaps present run 0x20000\+2"):
        round1.commit(INV)


def test_overlap_between_holes(round1: RoundWriter, writer1: ImageWriter) -> None:
    writer1.add_parent_holes(Runs.of([0x10000], [2]))
    writer1.add_parent_holes(Runs.of([0x11000], [1]))
    with pytest.raises(ImageError, match=r"parent hole run 0x10000\+2 overlaps parent hole run 0x11000\+1"):
        round1.commit(INV)


@pytest.mark.parametrize(("first", "second", "message"), [
    (Runs.of([0x20000], [1]), Runs.of([0x10000], [1]), r"run at 0x10000 is below the end of earlier pages "
                                                       r"\(0x21000\)"),
    (Runs.of([0x10000], [2]), Runs.of([0x11000], [1]), r"run at 0x11000 is below the end of earlier pages "
                                                       r"\(0x12000\)"),
    (Runs.empty(), Runs.of([0x2000, 0x1000], [1, 1]), r"present runs are not ascending and disjoint"),
    (Runs.empty(), Runs.of([0x1800], [1]), r"present run at 0x1800 is not page-aligned"),
    (Runs.empty(), Runs.of([0x1000], [0]), r"present run at 0x1000 has no pages"),
])
def test_append_rejects_bad_order(writer1: ImageWriter, first: Runs, second: Runs, message: str) -> None:
    writer1.append_pages(first, pages_of(1, first))
    with pytest.raises(ImageError, match=message):
        writer1.append_pages(second, pages_of(1, second))
    # A rejected batch writes nothing.
    assert writer1.pages_path.stat().st_size == first.total_pages * PS


def test_append_rejects_wrong_data_size(writer1: ImageWriter) -> None:
    with pytest.raises(ImageError, match=r"4095 bytes of data for 1 pages \(4096 bytes\)"):
        writer1.append_pages(Runs.of([0x10000], [1]), bytes(PS - 1))


@pytest.mark.parametrize("hole", [
    Runs.of([0x13000], [2]),  # runs past the end of A into a gap of round 0
    Runs.of([0x60000], [1]),  # nowhere near round 0
    Runs.of([0x0F000], [2]),  # starts before A
])
def test_hole_not_covered_by_parent(round1: RoundWriter, writer1: ImageWriter, hole: Runs) -> None:
    writer1.add_parent_holes(Runs.of([0x20000], [2]))  # covered: fine on its own
    writer1.add_parent_holes(hole)
    with pytest.raises(ImageError, match=rf"parent hole {int(hole.vaddr[0]):#x}\+\d+ not found in parent "
                                         r"\.\./round-0 pagemap \(1 of 2 holes uncovered\)"):
        round1.commit(INV)


def test_hole_covered_across_parent_entries_of_both_kinds(tmp_path: Path, round0: Path) -> None:
    # round 1 has A split into present + hole entries; a round-2 hole over all of A must pass.
    mid = Runs.of([0x11000], [1])
    write_round(tmp_path, 1, mid, pages_of(1, mid), holes=Runs.of([0x10000, 0x12000], [1, 2]))
    final = write_round(tmp_path, 2, Runs.empty(), b"", holes=A)
    assert entries_of(final) == [(0x10000, 4, PE_PARENT)]


def test_hole_without_parent(tmp_path: Path) -> None:
    rw = RoundWriter(tmp_path, 3, PS, None)  # a full round after PID reuse: no parent
    with pytest.raises(ImageError, match=r"pagemap-4242\.img has no parent to hold 1 parent holes"):
        rw.image(KEY).add_parent_holes(Runs.of([0x1000], [1]))
    rw.abort()
    with pytest.raises(ImageError, match="round 0 cannot have a parent"):
        RoundWriter(tmp_path, 0, PS, "../round-x")
    with pytest.raises(ImageError, match="must be a relative path"):
        RoundWriter(tmp_path, 1, PS, str(tmp_path / "round-0"))
    assert os.listdir(tmp_path) == []


def test_hole_with_missing_parent_round(tmp_path: Path) -> None:
    with RoundWriter(tmp_path, 1, PS, "../round-0") as rw:
        rw.image(KEY).add_parent_holes(Runs.of([0x1000], [1]))
        with pytest.raises(ImageError, match=r"parent/pagemap-4242\.img: cannot read pagemap"):
            rw.commit(INV)
    assert os.listdir(tmp_path) == []


def test_existing_round_is_never_replaced(tmp_path: Path, round0: Path) -> None:
    with pytest.raises(ImageError, match="round-0: round already exists"):
        RoundWriter(tmp_path, 0, PS, None)
    rw = RoundWriter(tmp_path, 1, PS, "../round-0")
    rw.image(KEY)
    (tmp_path / "round-1").mkdir()  # someone else got there first; rename(2) would replace it
    with pytest.raises(ImageError, match="round-1: round already exists"):
        rw.commit(INV)
    rw.abort()
    assert sorted(os.listdir(tmp_path)) == ["round-0", "round-1"]
    assert os.listdir(tmp_path / "round-1") == []


# === Reader strictness on hand-made rounds =============================================================


def make_round(path: Path, entries: list[PagemapEntry], pages: bytes, parent: str | None = None) -> Path:
    path.mkdir()
    (path / f"pagemap-{PID}.img").write_bytes(encode_pagemap(1, entries))
    (path / "pages-1.img").write_bytes(pages)
    if parent is not None:
        os.symlink(parent, path / "parent")
    return path


def test_reader_on_criu_style_round_with_lazy_entries(tmp_path: Path) -> None:
    # No sidecar. A lazy-only entry contributes no bytes to pages-1.img; PE_PRESENT|PE_LAZY does.
    entries = [PagemapEntry(0x1000, 2, PE_PRESENT), PagemapEntry(0x3000, 3, PE_LAZY),
               PagemapEntry(0x8000, 1, PE_PRESENT | PE_LAZY), PagemapEntry(0x9000, 1, PE_PRESENT)]
    data = page(7, 0x1000) + page(7, 0x2000) + page(7, 0x8000) + page(7, 0x9000)
    with open_round(make_round(tmp_path / "r", entries, data), PID, PS) as img:
        assert img.info is None
        assert img.zero_runs().pairs() == []
        assert img.read_range(0x8000, 2) == page(7, 0x8000) + page(7, 0x9000)
        assert img.read_range(0x2000, 1) == page(7, 0x2000)
        with pytest.raises(ImageError, match=r"pages 0x3000\.\.0x4000 are lazy"):
            img.read_range(0x2000, 2)
        assert img.present_runs().pairs() == [(0x1000, 2), (0x8000, 2)]
        img.check_digest()  # nothing to compare against: no-op


@pytest.mark.parametrize(("entries", "pages", "message"), [
    ([PagemapEntry(0x1000, 2, PE_PRESENT)], bytes(PS),
     r"pages-1\.img: 4096 bytes, but the pagemap has 2 present"),
    ([PagemapEntry(0x1000, 1, PE_PARENT)], b"", r"PE_PARENT entries but no parent round"),
    ([PagemapEntry(0x1000, 1, PE_PARENT | PE_PRESENT)], bytes(PS), r"entry 0x1000 has flags 0x5"),
    ([PagemapEntry(0x1000, 2, PE_PRESENT), PagemapEntry(0x2000, 1, PE_PRESENT)], bytes(3 * PS),
     r"pagemap runs are not ascending and disjoint"),
    ([PagemapEntry(0x1800, 1, PE_PRESENT)], bytes(PS), r"pagemap run at 0x1800 is not page-aligned"),
])
def test_reader_rejects_inconsistent_round(tmp_path: Path, entries: list[PagemapEntry], pages: bytes,
                                           message: str) -> None:
    with pytest.raises(ImageError, match=message):
        open_round(make_round(tmp_path / "r", entries, pages), PID, PS)


def test_reader_rejects_parent_entry_missing_from_parent(tmp_path: Path) -> None:
    make_round(tmp_path / "round-0", [PagemapEntry(0x1000, 1, PE_PRESENT)], bytes(PS))
    make_round(tmp_path / "round-1", [PagemapEntry(0x1000, 2, PE_PARENT)], b"", parent="../round-0")
    with pytest.raises(ImageError, match=r"PE_PARENT entry 0x1000\+2 not found in parent"):
        open_round(tmp_path / "round-1", PID, PS)


def test_reader_rejects_parent_loop_and_dangling_parent(tmp_path: Path) -> None:
    make_round(tmp_path / "a", [PagemapEntry(0x1000, 1, PE_PARENT)], b"", parent="../b")
    make_round(tmp_path / "b", [PagemapEntry(0x1000, 1, PE_PRESENT)], bytes(PS), parent="../a")
    with pytest.raises(ImageError, match="parent links form a loop"):
        open_round(tmp_path / "a", PID, PS)
    make_round(tmp_path / "c", [], b"", parent="../gone")
    with pytest.raises(ImageError, match=r"parent round '\.\./gone' is missing"):
        open_round(tmp_path / "c", PID, PS)


# === Images for a CRIU dump directory (the page server's) ==============================================


def test_dump_dir_writer_keeps_one_entry_per_run_and_nothing_of_its_own(tmp_path: Path) -> None:
    dump = tmp_path / "dump"
    dump.mkdir()
    (dump / "pages-1.img").write_bytes(b"the dumper's")
    touching = Runs.of([0x11000], [2])
    with DumpDirWriter(dump, PS, prefix=".t-") as dw:
        w = dw.image(KEY, 0x10001, parent_cover=None)
        w.add_run(0x10000, 1, PE_PRESENT)
        w.write_pages(page(0, 0x10000))
        w.add_run(0x11000, 2, PE_PRESENT)  # touches the run before: stays an entry of its own
        with pytest.raises(ImageError, match="added before the 8192 bytes of page data still due"):
            w.add_run(0x20000, 1, PE_LAZY)
        data = pages_of(0, touching)
        w.write_pages(data[:PS])  # a run's data may come in parts
        w.write_pages(data[PS:])
        w.add_run(0x20000, 3, PE_LAZY)
        with pytest.raises(ImageError, match="has no parent to hold 1 parent holes"):
            w.add_run(0x30000, 1, PE_PARENT)
        with pytest.raises(ImageError, match=r"below the end of earlier runs \(0x23000\)"):
            w.add_run(0x22000, 1, PE_LAZY)
        assert [n for n in os.listdir(dump) if n.startswith(".t-")] == [dw.tmp_dir.name]
        dw.commit()
    assert sorted(os.listdir(dump)) == ["pagemap-4242.img", "pages-1.img", "pages-65537.img"]
    pm = decode_pagemap((dump / "pagemap-4242.img").read_bytes())
    assert pm.pages_id == 0x10001
    assert [(e.vaddr, e.nr_pages, e.flags) for e in pm.entries] == [
        (0x10000, 1, PE_PRESENT), (0x11000, 2, PE_PRESENT), (0x20000, 3, PE_LAZY)]
    assert (dump / "pages-65537.img").read_bytes() == page(0, 0x10000) + data


def test_dump_dir_writer_never_replaces_a_file(tmp_path: Path) -> None:
    dump = tmp_path / "dump"
    dump.mkdir()
    (dump / "pagemap-4242.img").write_bytes(b"stale")
    dw = DumpDirWriter(dump, PS, prefix=".t-")
    dw.image(KEY, 0x10001, parent_cover=None).add_run(0x10000, 1, PE_LAZY)
    with pytest.raises(ImageError, match=r"pagemap-4242\.img already exists"):
        dw.commit()
    dw.abort()
    assert sorted(os.listdir(dump)) == ["pagemap-4242.img"]  # the pages file linked first is gone again

"""``pagehaul verify``: image sets written by the real RoundWriter, then damaged one way at a time."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import xxhash

from pagehaul.codec import (
    PE_PARENT,
    PE_PRESENT,
    ImageKey,
    InventoryEntry,
    PagemapEntry,
    encode_inventory,
    encode_pagemap,
)
from pagehaul.errors import ConfigError
from pagehaul.integrity import EXIT_BAD, EXIT_OK, IntegrityReport, format_report, main_verify, verify_image_set
from pagehaul.runs import Runs
from pagehaul.store import RoundWriter, parent_link

PS = 4096
PID = 4242
INV = InventoryEntry.for_pre_dump(dump_uptime_us=123_456_789)

A = Runs.of([0x10000], [4])
B = Runs.of([0x20000], [2])
C = Runs.of([0x30000], [3])
Z = Runs.of([0x40000], [2])
ROUND1 = Runs.of([0x11000, 0x30000, 0x50000], [1, 3, 1])  # page 2 of round 1's pages file is 0x31000


def page(tag: int, vaddr: int) -> bytes:
    return struct.pack("<QQ", tag, vaddr) * (PS // 16)


def pages_of(tag: int, runs: Runs) -> bytes:
    return b"".join(page(tag, addr) for addr in runs.page_addrs(PS).tolist())


def write_round(session: Path, round_no: int, present: Runs, *, holes: Runs | None = None,
                parent: str | None = "default") -> Path:
    link = parent_link(round_no) if parent == "default" else parent
    with RoundWriter(session, round_no, PS, link) as rw:
        w = rw.image(ImageKey("pid", PID))
        w.append_pages(present, pages_of(round_no, present))
        if holes is not None:
            w.add_parent_holes(holes)
        w.add_zero_runs(Z)
        return rw.commit(INV)


@pytest.fixture
def session(tmp_path: Path) -> Path:
    """Three rounds: 0 holds A, B, C; 1 rewrites a page of A, all of C and a new page; 2 only holes."""
    path = tmp_path / "session"
    path.mkdir()
    write_round(path, 0, Runs.concat([A, B, C]))
    write_round(path, 1, ROUND1, holes=Runs.of([0x10000, 0x12000, 0x20000], [1, 2, 2]))
    write_round(path, 2, Runs.empty(), holes=Runs.concat([A, B, C, Runs.of([0x50000], [1])]))
    return path


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def only_problem(report: IntegrityReport) -> str:
    assert not report.ok
    assert len(report.problems) == 1, [p.describe() for p in report.problems]
    return report.problems[0].message


def test_intact_chain_verifies_every_page(session: Path) -> None:
    report = verify_image_set(session)
    assert report.ok, [p.describe() for p in report.problems]
    assert report.first_bad is None
    assert [Path(r.round_dir).name for r in report.rounds] == ["round-0", "round-1", "round-2"]
    assert [r.pages for r in report.rounds] == [9, 5, 0]
    assert report.pages_verified == report.pages == 14
    assert {r.mode for r in report.rounds} == {"per-page digests"}
    assert [r.parent for r in report.rounds] == [None, "../round-0", "../round-1"]
    assert report.rounds[0].pids == [PID]
    # A round directory brings its ancestors; round 0 alone is a flattened set of one.
    assert [Path(r.round_dir).name for r in verify_image_set(session / "round-2").rounds] == \
        ["round-0", "round-1", "round-2"]
    alone = verify_image_set(session / "round-0")
    assert alone.ok
    assert len(alone.rounds) == 1
    assert "OK" in format_report(report).splitlines()[0]


def test_flipped_byte_names_the_page_and_round(session: Path) -> None:
    pages = session / "round-1" / "pages-1.img"
    original = pages.read_bytes()[2 * PS:3 * PS]
    flip_byte(pages, 2 * PS + 100)
    corrupt = pages.read_bytes()[2 * PS:3 * PS]
    for path in (session, session / "round-2", session / "round-1"):
        report = verify_image_set(path)
        assert "does not match its xxh3_64 in pages-1.xxh3; 1 of 5 pages bad" in only_problem(report)
        bad = report.first_bad
        assert bad is not None
        assert (Path(bad.round_dir).name, bad.file, bad.pid, bad.vaddr) == ("round-1", "pages-1.img", PID, 0x31000)
        assert bad.expected == f"{xxhash.xxh3_64_intdigest(original):016x}"
        assert bad.actual == f"{xxhash.xxh3_64_intdigest(corrupt):016x}"
        assert report.bad_pages == 1
        assert report.pages_verified == 14  # a round brings its parents: 9 + 5 + 0 pages
    # The rounds before and after are intact on their own.
    assert verify_image_set(session / "round-0").ok
    text = format_report(verify_image_set(session))
    assert text.splitlines()[0].endswith(": BAD")
    assert f"first bad page: 0x31000 of pid {PID} in {session / 'round-1'}/pages-1.img" in text


def test_every_bad_page_is_counted_and_the_first_reported(session: Path) -> None:
    pages = session / "round-0" / "pages-1.img"
    for index in (8, 3, 5):
        flip_byte(pages, index * PS + 7)
    report = verify_image_set(session)
    bad = report.first_bad
    assert bad is not None
    assert (Path(bad.round_dir).name, bad.vaddr) == ("round-0", 0x13000)  # page 3: A is 0x10000+4
    assert report.bad_pages == 3
    assert report.rounds[0].bad_pages == 3


def test_truncated_pagemap(session: Path) -> None:
    pagemap = session / "round-1" / f"pagemap-{PID}.img"
    pagemap.write_bytes(pagemap.read_bytes()[:-3])
    report = verify_image_set(session)
    assert not report.ok
    files = [(Path(p.round_dir).name, p.file) for p in report.problems]
    assert files == [("round-1", f"pagemap-{PID}.img"), ("round-1", f"pagemap-{PID}.img"),
                     ("round-2", f"pagemap-{PID}.img")]
    digest_problem, parse_problem, child_problem = report.problems
    assert digest_problem.message == "xxh3-128 differs from the sidecar's"
    assert digest_problem.expected is not None
    assert digest_problem.actual == xxhash.xxh3_128(pagemap.read_bytes()).hexdigest()
    assert "is truncated" in parse_problem.message
    assert child_problem.message == "PE_PARENT entries, but the parent round is unusable (see above)"


def test_missing_parent(session: Path) -> None:
    shutil.rmtree(session / "round-0")
    report = verify_image_set(session)
    assert [Path(r.round_dir).name for r in report.rounds] == ["round-1", "round-2"]
    first, second, third = report.problems
    assert (Path(first.round_dir).name, first.file) == ("round-1", "parent")
    assert first.message == "parent round '../round-0' is missing"
    assert (Path(second.round_dir).name, second.file) == ("round-1", f"pagemap-{PID}.img")
    assert second.message == "PE_PARENT entries, but the parent round is missing"
    # Round 2's holes point into round 1, which cannot be read through: a consequence, said as one.
    assert (Path(third.round_dir).name, third.message) == \
        ("round-2", "PE_PARENT entries, but the parent round is unusable (see above)")
    # Round 1's own pages were still checked page by page.
    assert report.rounds[0].pages_verified == 5


def test_digest_file_mismatch(session: Path) -> None:
    digests = session / "round-1" / "pages-1.xxh3"
    flip_byte(digests, 9)
    report = verify_image_set(session)
    assert only_problem(report) == "xxh3-128 differs from the sidecar's: the per-page digests are not usable"
    bad = report.first_bad
    assert bad is not None
    assert (Path(bad.round_dir).name, bad.file, bad.vaddr) == ("round-1", "pages-1.xxh3", None)
    assert bad.actual == xxhash.xxh3_128(digests.read_bytes()).hexdigest()
    # Without usable per-page digests the pages file is still checked as a whole, and is fine.
    assert report.rounds[1].mode == "whole-file digest"
    assert report.rounds[1].pages_verified == 0


def test_digest_file_of_the_wrong_length(session: Path) -> None:
    digests = session / "round-1" / "pages-1.xxh3"
    digests.write_bytes(digests.read_bytes()[:-8])
    sidecar = session / "round-1" / "pagehaul-round.json"
    doc = json.loads(sidecar.read_text())
    doc["page_digests_xxh3_128"] = xxhash.xxh3_128(digests.read_bytes()).hexdigest()  # consistent, but short
    sidecar.write_text(json.dumps(doc))
    assert only_problem(verify_image_set(session)) == "4 digests for 5 present pages"


def test_inventory_changed(session: Path) -> None:
    inventory = session / "round-2" / "inventory.img"
    inventory.write_bytes(encode_inventory(InventoryEntry.for_pre_dump(dump_uptime_us=1)))  # valid, but not ours
    report = verify_image_set(session)
    assert only_problem(report) == "xxh3-128 differs from the sidecar's"
    bad = report.first_bad
    assert bad is not None
    assert (Path(bad.round_dir).name, bad.file) == ("round-2", "inventory.img")


def test_garbage_inventory_does_not_parse(session: Path) -> None:
    (session / "round-0" / "inventory.img").write_bytes(b"\x16\x31\x31\x58\x05\x00\x00\x00\x08")
    messages = [p.message for p in verify_image_set(session).problems]
    assert messages[0] == "xxh3-128 differs from the sidecar's"
    assert "entry of 5 bytes is truncated" in messages[1]


def test_pages_file_cut_short(session: Path) -> None:
    pages = session / "round-0" / "pages-1.img"
    pages.write_bytes(pages.read_bytes()[:-PS])
    report = verify_image_set(session)
    first = report.first_bad
    assert first is not None
    assert first.file == "pages-1.img"
    assert first.message == f"{8 * PS} bytes, but the pagemap has 9 present pages ({9 * PS} bytes)"
    assert [p.message for p in report.problems[1:]] == ["PE_PARENT entries, but the parent round is unusable "
                                                        "(see above)"] * 2


def test_malformed_sidecar(session: Path) -> None:
    (session / "round-1" / "pagehaul-round.json").write_text("{")
    report = verify_image_set(session)
    first = report.first_bad
    assert first is not None
    assert (Path(first.round_dir).name, first.file) == ("round-1", "pagehaul-round.json")
    assert "cannot load round sidecar" in first.message


def test_sidecar_before_file_digests_checks_the_whole_file(session: Path) -> None:
    sidecar = session / "round-0" / "pagehaul-round.json"
    doc = json.loads(sidecar.read_text())
    for key in ("pagemap_xxh3_128", "inventory_xxh3_128", "page_digests", "page_digests_xxh3_128"):
        del doc[key]
    sidecar.write_text(json.dumps(doc))
    report = verify_image_set(session)
    assert report.ok
    assert report.rounds[0].mode == "whole-file digest"
    assert report.pages_verified == 5
    flip_byte(session / "round-0" / "pages-1.img", 10)
    report = verify_image_set(session)
    assert "no per-page digests: the bad page is not known" in only_problem(report)
    bad = report.first_bad
    assert bad is not None
    assert bad.vaddr is None
    assert bad.expected == doc["pages_xxh3_128"]


def make_criu_round(path: Path, entries: list[PagemapEntry], pages: bytes, parent: str | None = None) -> Path:
    """A round as CRIU writes it: no pagehaul sidecar, no digest file."""
    path.mkdir()
    (path / "inventory.img").write_bytes(encode_inventory(INV))
    (path / f"pagemap-{PID}.img").write_bytes(encode_pagemap(1, entries))
    (path / "pages-1.img").write_bytes(pages)
    if parent is not None:
        os.symlink(parent, path / "parent")
    return path


def test_criu_rounds_are_checked_structurally_and_say_so(tmp_path: Path) -> None:
    make_criu_round(tmp_path / "pre", [PagemapEntry(0x1000, 2, PE_PRESENT)], bytes(2 * PS))
    make_criu_round(tmp_path / "dump", [PagemapEntry(0x1000, 1, PE_PARENT), PagemapEntry(0x2000, 1, PE_PRESENT)],
                    bytes(PS), parent="../pre")
    report = verify_image_set(tmp_path / "dump")
    assert report.ok
    assert [r.mode for r in report.rounds] == ["structure only"] * 2
    assert report.structure_only_rounds == 2
    assert report.pages == 3
    assert report.pages_verified == 0
    assert "2 rounds without a pagehaul sidecar (written by CRIU?): structure checked only" in format_report(report)
    # Structure is still checked: a parent entry the parent does not hold.
    make_criu_round(tmp_path / "bad", [PagemapEntry(0x1000, 4, PE_PARENT)], b"", parent="../pre")
    report = verify_image_set(tmp_path / "bad")
    assert "PE_PARENT entry 0x1000+4 not found in parent" in only_problem(report)


def test_parent_loop(tmp_path: Path) -> None:
    make_criu_round(tmp_path / "a", [PagemapEntry(0x1000, 1, PE_PRESENT)], bytes(PS), parent="../b")
    make_criu_round(tmp_path / "b", [PagemapEntry(0x1000, 1, PE_PRESENT)], bytes(PS), parent="../a")
    report = verify_image_set(tmp_path / "a")
    assert not report.ok
    assert any(p.message == "parent links form a loop" for p in report.problems)


def test_not_an_image_set(tmp_path: Path) -> None:
    report = verify_image_set(tmp_path)
    assert "neither a round directory" in only_problem(report)
    assert not verify_image_set(tmp_path / "nowhere").ok
    with pytest.raises(ConfigError, match="is not a directory"):
        main_verify(tmp_path / "nowhere", as_json=False)


def test_session_json_listing_a_missing_round(session: Path) -> None:
    (session / "session.json").write_text(json.dumps({"rounds": ["round-0", "round-1", "round-2", "round-3"]}))
    report = verify_image_set(session)
    assert only_problem(report) == "committed round 'round-3' is listed but missing"


def test_main_verify_exit_codes_and_json(session: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main_verify(session, as_json=True) == EXIT_OK == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True
    assert doc["pages_verified"] == 14
    assert doc["first_bad"] is None
    flip_byte(session / "round-1" / "pages-1.img", 2 * PS)
    assert main_verify(session, as_json=True) == EXIT_BAD == 8
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False
    assert doc["first_bad"]["vaddr"] == 0x31000
    assert doc["first_bad"]["file"] == "pages-1.img"
    assert doc["bad_pages"] == 1
    assert main_verify(session, as_json=False) == 8
    assert "first bad page: 0x31000" in capsys.readouterr().out

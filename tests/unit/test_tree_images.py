"""Rounds with several images (processes of a tree, shared-memory objects): one pages file per image,
a version 2 sidecar, PE_PARENT through the parent round's image of the same process or object, images
new in a round, and ``pagehaul verify`` naming the image of a bad page."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cli.inspect import inspect
from pagehaul import store
from pagehaul.codec import ImageKey, InventoryEntry
from pagehaul.errors import ImageError
from pagehaul.integrity import verify_image_set
from pagehaul.runs import Runs
from pagehaul.store import RoundWriter

PS = 4096
INV = InventoryEntry.for_pre_dump(123)
SHMID = 99001


def page(tag: int, n: int = 1) -> bytes:
    return b"".join(bytes([(tag + i) % 256]) * PS for i in range(n))


def write_round0(session: Path) -> Path:
    w = RoundWriter(session, 0, PS, None)
    w.image(ImageKey("pid", 100)).append_pages(Runs.of([0x10000], [2]), page(1, 2))
    kid = w.image(ImageKey("pid", 101))
    kid.append_pages(Runs.of([0x20000], [1]), page(7))
    kid.add_zero_runs(Runs.of([0x21000], [1]))
    shm = w.image(ImageKey("shmem", SHMID))
    shm.append_pages(Runs.of([0, 3 * PS], [2, 1]), page(20, 3))
    return w.commit(INV)


def write_round1(session: Path) -> Path:
    w = RoundWriter(session, 1, PS, "../round-0")
    proc = w.image(ImageKey("pid", 100))
    proc.add_parent_holes(Runs.of([0x10000], [1]))
    proc.append_pages(Runs.of([0x11000], [1]), page(50))
    shm = w.image(ImageKey("shmem", SHMID))
    shm.add_parent_holes(Runs.of([0, 3 * PS], [1, 1]))
    shm.append_pages(Runs.of([PS], [1]), page(60))
    born = w.image(ImageKey("pid", 102))  # a process new in this round: no parent entries
    born.append_pages(Runs.of([0x30000], [1]), page(80))
    return w.commit(INV)


def test_round_with_several_images(tmp_path: Path) -> None:
    r0 = write_round0(tmp_path)
    names = sorted(os.listdir(r0))
    assert names == sorted(["inventory.img", "pagehaul-round.json", "pagemap-100.img", "pagemap-101.img",
                            "pagemap-shmem-99001.img", "pages-1.img", "pages-1.xxh3", "pages-2.img", "pages-2.xxh3",
                            "pages-3.img", "pages-3.xxh3"])
    assert json.loads((r0 / "pagehaul-round.json").read_text())["version"] == store.SIDECAR_VERSION_IMAGES
    infos = store.read_round_infos(r0)
    assert infos is not None
    assert list(infos) == [ImageKey("pid", 100), ImageKey("pid", 101), ImageKey("shmem", SHMID)]
    assert [i.pages_id for i in infos.values()] == [1, 2, 3]
    assert infos[ImageKey("pid", 101)].zero_runs.total_pages == 1
    r1 = write_round1(tmp_path)
    with store.open_round(r1, SHMID, PS, shmem=True) as shm:
        assert shm.read_range(0, 4, absent_as_zero=True) == page(20) + page(60) + bytes(PS) + page(22)
    with store.open_round(r1, 100, PS) as proc:
        assert proc.read_range(0x10000, 2) == page(1) + page(50)
    with store.open_round(r1, 102, PS) as born:
        assert born.parent is None
        assert born.read_range(0x30000, 1) == page(80)
    report = verify_image_set(tmp_path)
    assert report.ok, [p.describe() for p in report.problems]
    assert report.rounds[-1].pids == [100, 102]
    assert report.rounds[-1].shmem == [SHMID]
    assert report.pages_verified == report.pages == 2 + 1 + 3 + 1 + 1 + 1


def test_one_process_keeps_the_version_1_sidecar(tmp_path: Path) -> None:
    w = RoundWriter(tmp_path, 0, PS, None)
    w.image(ImageKey("pid", 100)).append_pages(Runs.of([0x10000], [1]), page(1))
    r0 = w.commit(INV)
    assert json.loads((r0 / "pagehaul-round.json").read_text())["version"] == store.SIDECAR_VERSION


def test_bad_shared_page_is_named(tmp_path: Path) -> None:
    r0 = write_round0(tmp_path)
    with (r0 / "pages-3.img").open("r+b") as f:
        f.seek(2 * PS + 5)
        f.write(b"\xff")
    report = verify_image_set(tmp_path)
    assert not report.ok
    bad = report.first_bad
    assert bad is not None
    assert (bad.file, bad.vaddr) == ("pages-3.img", 3 * PS)


def test_parent_hole_for_an_image_the_parent_lacks(tmp_path: Path) -> None:
    write_round0(tmp_path)
    w = RoundWriter(tmp_path, 1, PS, "../round-0")
    w.image(ImageKey("pid", 100)).append_pages(Runs.of([0x10000], [1]), page(1))
    w.image(ImageKey("pid", 102)).add_parent_holes(Runs.of([0x30000], [1]))
    with pytest.raises(ImageError, match=r"has no pagemap-102\.img"):
        w.commit(INV)
    w.abort()  # what the receiver does with a round that failed to commit
    assert not (tmp_path / "round-1").exists()
    assert [n for n in os.listdir(tmp_path) if n.startswith(".round-1")] == []


def test_an_image_twice_is_refused(tmp_path: Path) -> None:
    w = RoundWriter(tmp_path, 0, PS, None)
    w.image(ImageKey("pid", 100))
    with pytest.raises(ImageError, match="already has image pid 100"):
        w.image(ImageKey("pid", 100))
    w.image(ImageKey("shmem", 100))  # a shared-memory object may have the same number
    w.abort()
    assert os.listdir(tmp_path) == []


def test_inspect_lists_every_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_round0(tmp_path)
    write_round1(tmp_path)
    assert inspect(tmp_path, as_json=True) == 0
    doc = json.loads(capsys.readouterr().out)
    last = doc["rounds"][-1]
    assert [(p["kind"], p["pid"], p["pages_parent"]) for p in last["pagemaps"]] == \
        [("pid", 100, 1), ("pid", 102, 0), ("shmem", SHMID, 2)]
    assert doc["rounds"][0]["pages_zero"] == 1

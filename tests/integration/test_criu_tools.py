"""The private CRIU 4.2.x tools run, and crit reads hand-made pagemap and inventory images.

Needs ``scripts/install-criu.sh``. Without it the tests skip, except under CI (``$CI`` set), where
a missing install is a failure: CI must not pass by skipping the image checks.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from pagehaul.criu_tools import DEFAULT_PREFIX, PREFIX_ENV, CriuTools, default_prefix
from pagehaul.errors import ImageError

IMG_COMMON_MAGIC = 0x54564319
PAGEMAP_MAGIC = 0x56084025
INVENTORY_MAGIC = 0x58313116  # inventory.img has no common magic in front

# pagemap_head{pages_id=1}
PAGEMAP_HEAD = bytes.fromhex("0801")
# pagemap_entry{vaddr=0x400000 (field 1), compat_nr_pages=0 (2), flags=PE_PRESENT=4 (4), nr_pages=1 (5)}
PAGEMAP_ENTRY = bytes.fromhex("08 80 80 80 02 10 00 20 04 28 01")
# inventory_entry{img_version=2 (field 1), fdinfo_per_id=true (field 2)}
INVENTORY_ENTRY = bytes.fromhex("08 02 10 01")


def write_image(path: Path, magics: tuple[int, ...], entries: list[bytes]) -> Path:
    """A CRIU protobuf image: u32 LE magics, then [u32 LE length][message] per entry."""
    data = b"".join(struct.pack("<I", m) for m in magics)
    data += b"".join(struct.pack("<I", len(e)) + e for e in entries)
    path.write_bytes(data)
    return path


def pagemap_image(tmp_path: Path) -> Path:
    return write_image(tmp_path / "pagemap-1.img", (IMG_COMMON_MAGIC, PAGEMAP_MAGIC),
                       [PAGEMAP_HEAD, PAGEMAP_ENTRY])


@pytest.mark.criu
def test_criu_version_is_4_2(criu_tools: CriuTools) -> None:
    version = criu_tools.criu_version()
    assert version.startswith("4.2."), version


@pytest.mark.criu
def test_crit_decodes_pagemap(criu_tools: CriuTools, tmp_path: Path) -> None:
    decoded = criu_tools.crit_decode(pagemap_image(tmp_path))
    assert decoded == {
        "magic": "PAGEMAP",
        "entries": [
            {"pages_id": 1},
            # plain decode: numbers as numbers (0x400000, PE_PRESENT = 4)
            {"vaddr": 4194304, "compat_nr_pages": 0, "flags": 4, "nr_pages": 1},
        ],
    }


@pytest.mark.criu
def test_crit_decodes_pagemap_pretty(criu_tools: CriuTools, tmp_path: Path) -> None:
    decoded = criu_tools.crit_decode(pagemap_image(tmp_path), pretty=True)
    assert decoded == {
        "magic": "PAGEMAP",
        "entries": [
            {"pages_id": 1},
            {"vaddr": "0x400000", "compat_nr_pages": 0, "flags": "PE_PRESENT", "nr_pages": 1},
        ],
    }


@pytest.mark.criu
def test_crit_decodes_inventory(criu_tools: CriuTools, tmp_path: Path) -> None:
    image = write_image(tmp_path / "inventory.img", (INVENTORY_MAGIC,), [INVENTORY_ENTRY])
    decoded = criu_tools.crit_decode(image)
    assert decoded == {"magic": "INVENTORY", "entries": [{"img_version": 2, "fdinfo_per_id": True}]}


@pytest.mark.criu
def test_crit_rejects_unknown_magic(criu_tools: CriuTools, tmp_path: Path) -> None:
    image = tmp_path / "garbage.img"
    image.write_bytes(b"garbage!")
    with pytest.raises(ImageError, match=r"Unknown magic 0x62726167") as info:
        criu_tools.crit_decode(image)
    assert "\n" not in str(info.value)


@pytest.mark.criu
def test_crit_rejects_truncated_entry(criu_tools: CriuTools, tmp_path: Path) -> None:
    image = write_image(tmp_path / "pagemap-1.img", (IMG_COMMON_MAGIC, PAGEMAP_MAGIC),
                        [PAGEMAP_HEAD, PAGEMAP_ENTRY[:3]])
    with pytest.raises(ImageError, match=r"DecodeError: .*pagemap_entry") as info:
        criu_tools.crit_decode(image)
    assert "\n" not in str(info.value)


def test_locate_returns_none_without_wrappers(tmp_path: Path) -> None:
    assert CriuTools.locate(tmp_path) is None
    (tmp_path / "bin").mkdir()
    for name in ("criu", "crit"):
        (tmp_path / "bin" / name).write_text("#!/bin/sh\n")
    assert CriuTools.locate(tmp_path) is None  # present but not executable
    for name in ("criu", "crit"):
        (tmp_path / "bin" / name).chmod(0o755)
    assert CriuTools.locate(tmp_path) == CriuTools(tmp_path)
    assert CriuTools(tmp_path).crit == tmp_path / "bin" / "crit"


def test_default_prefix_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(PREFIX_ENV, str(tmp_path))
    assert default_prefix() == tmp_path
    monkeypatch.setenv(PREFIX_ENV, "")
    assert default_prefix() == DEFAULT_PREFIX
    monkeypatch.delenv(PREFIX_ENV)
    assert default_prefix() == Path.home() / ".cache" / "pagehaul" / "criu-4.2.1"

"""The CRIU image codec (``pagehaul.codec``): framing, pagemaps and the inventory, on real bytes."""

from __future__ import annotations

import struct

import numpy as np
import numpy.typing as npt
import pytest

from pagehaul.codec import (
    INVENTORY_HEAD,
    PAGEMAP_HEAD,
    PE_LAZY,
    PE_PARENT,
    PE_PRESENT,
    PRE_DUMP_READ,
    STATS_HEAD,
    ImageKey,
    InventoryEntry,
    Pagemap,
    PagemapEntry,
    decode_image,
    decode_inventory,
    decode_pagemap,
    encode_entries,
    encode_inventory,
    encode_pagemap,
    encode_pagemap_arrays,
    is_pagemap,
)
from pagehaul.criu import inventory_pb2, pagemap_pb2
from pagehaul.errors import ImageError
from pagehaul.runs import U64

PS = 4096
INV = InventoryEntry.for_pre_dump(dump_uptime_us=123_456_789)

# From CRIU (criu/include/magic.h, images/pagemap.proto): the head of every pagemap, the framed
# pagemap_head{pages_id=1}, and the framed pagemap_entry{vaddr=0x400000, compat_nr_pages=0,
# flags=PE_PRESENT, nr_pages=1}.
WORKED_PAGEMAP = bytes.fromhex("19435654 25400856" "02000000 0801" "0b000000 0880808002100020042801")


def varint(value: int) -> bytes:
    """Protobuf base-128 varint, written out here so the expectations do not come from protobuf."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


# === Framing, pagemap, inventory =======================================================================


def test_worked_pagemap_bytes() -> None:
    encoded = encode_pagemap(1, [PagemapEntry(0x400000, 1, PE_PRESENT)])
    assert encoded == WORKED_PAGEMAP
    assert encoded[:8] == bytes.fromhex("1943565425400856")
    assert decode_pagemap(WORKED_PAGEMAP) == Pagemap(1, (PagemapEntry(0x400000, 1, PE_PRESENT),))


def test_decode_image_splits_entries() -> None:
    raw = decode_image(WORKED_PAGEMAP)
    assert raw.magic_name == "PAGEMAP"
    assert raw.entries == (b"\x08\x01", bytes.fromhex("0880808002100020042801"))
    assert raw.offsets == (8, 14)
    stats = decode_image(encode_entries(STATS_HEAD, [b"", b"\x08\x05"]))
    assert stats.magic_name == "STATS"
    assert stats.entries == (b"", b"\x08\x05")


def test_pagemap_reencode_is_byte_identical() -> None:
    # A CRIU-written pagemap built by hand: write_pagemap_loc sets compat_nr_pages=0, flags, nr_pages.
    def entry(vaddr: int, flags: int, nr_pages: int) -> bytes:
        payload = b"\x08" + varint(vaddr) + b"\x10\x00" + b"\x20" + varint(flags) + b"\x28" + varint(nr_pages)
        return struct.pack("<I", len(payload)) + payload

    original = (bytes.fromhex("19435654 25400856") + struct.pack("<I", 2) + b"\x08" + varint(7)
                + entry(0x400000, PE_PRESENT, 3) + entry(0x403000, PE_PARENT, 0x1234)
                + entry(0x7FFD_F000_0000, PE_PRESENT | PE_LAZY, 33) + entry(0x7FFF_FFFF_F000, PE_LAZY, 1))
    pm = decode_pagemap(original)
    assert pm.pages_id == 7
    assert pm.entries == (
        PagemapEntry(0x400000, 3, PE_PRESENT),
        PagemapEntry(0x403000, 0x1234, PE_PARENT),
        PagemapEntry(0x7FFD_F000_0000, 33, PE_PRESENT | PE_LAZY),
        PagemapEntry(0x7FFF_FFFF_F000, 1, PE_LAZY),
    )
    assert encode_pagemap(pm.pages_id, pm.entries) == original


@pytest.mark.parametrize(("fields", "expected"), [
    # vaddr=0x400000, compat_nr_pages=3, in_parent=true: an old hole
    (bytes.fromhex("0880808002 1003 1801"), PagemapEntry(0x400000, 3, PE_PARENT)),
    # no flags at all: an old present run
    (bytes.fromhex("0880808002 1002"), PagemapEntry(0x400000, 2, PE_PRESENT)),
    # in_parent=false explicitly, no flags: still present
    (bytes.fromhex("0880808002 1002 1800"), PagemapEntry(0x400000, 2, PE_PRESENT)),
    # flags set to 0 explicitly stays 0 (only a missing flags field means PE_PRESENT)
    (bytes.fromhex("0880808002 1000 2000 2805"), PagemapEntry(0x400000, 5, 0)),
    # in_parent with PE_LAZY flags: the bits add up
    (bytes.fromhex("0880808002 1000 1801 2002 2804"), PagemapEntry(0x400000, 4, PE_LAZY | PE_PARENT)),
    # nr_pages wins over compat_nr_pages
    (bytes.fromhex("0880808002 1009 2004 2802"), PagemapEntry(0x400000, 2, PE_PRESENT)),
])
def test_pagemap_reader_compat(fields: bytes, expected: PagemapEntry) -> None:
    data = encode_entries(PAGEMAP_HEAD, [b"\x08\x01", fields])
    assert decode_pagemap(data).entries == (expected,)


def test_pagemap_encoder_never_writes_in_parent() -> None:
    data = encode_pagemap(1, [PagemapEntry(0x1000, 2, PE_PARENT)])
    msg = pagemap_pb2.pagemap_entry.FromString(decode_image(data).entries[1])
    assert not msg.HasField("in_parent")
    assert msg.compat_nr_pages == 0
    assert msg.HasField("flags")
    assert (msg.flags, msg.nr_pages) == (PE_PARENT, 2)


# A final-dump inventory as CRIU lays it out: fields in ascending number, including root_ids (3) and
# plugins (12), which pagehaul's proto leaves out, and root_cg_set (5) / network_lock_method (11) /
# dump_criu_run_id (13), which it knows but does not model.
CRIU_INVENTORY_PAYLOAD = bytes.fromhex(
    "0802"          # img_version = 2
    "1001"          # fdinfo_per_id = true
    "1a0408011002"  # root_ids = {1: 1, 2: 2}
    "2001"          # ns_per_id = true
    "2805"          # root_cg_set = 5
    "3002"          # lsmtype = APPARMOR
    "40e807"        # dump_uptime = 1000
    "4802"          # pre_dump_mode = READ
    "5802"          # network_lock_method = 2
    "6203616263"    # plugins = "abc"
    "6a0472316432"  # dump_criu_run_id = "r1d2"
)


def test_inventory_unknown_fields_survive_byte_identical() -> None:
    original = encode_entries(INVENTORY_HEAD, [CRIU_INVENTORY_PAYLOAD])
    assert original[:8] == bytes.fromhex("16313158") + struct.pack("<I", len(CRIU_INVENTORY_PAYLOAD))
    inv = decode_inventory(original)
    assert (inv.img_version, inv.fdinfo_per_id, inv.ns_per_id, inv.lsmtype, inv.dump_uptime,
            inv.pre_dump_mode) == (2, True, True, inventory_pb2.APPARMOR, 1000, PRE_DUMP_READ)
    assert [n for n, _ in inv.other_fields] == [3, 5, 11, 12, 13]
    assert encode_inventory(inv) == original
    # Plain protobuf re-serialisation would move the unknown fields 3 and 12 to the end.
    naive = inventory_pb2.inventory_entry.FromString(CRIU_INVENTORY_PAYLOAD).SerializeToString()
    assert naive != CRIU_INVENTORY_PAYLOAD


def test_inventory_pre_dump_bytes() -> None:
    # cr_pre_dump_finish: INVENTORY_ENTRY__INIT (required img_version packed as 0), dump_uptime, mode.
    expected = bytes.fromhex("16313158 09000000 0800 40959aef3a 4802")
    assert encode_inventory(INV) == expected
    assert decode_inventory(expected) == INV


def test_inventory_keeps_lsm_value_our_enum_lacks() -> None:
    data = encode_entries(INVENTORY_HEAD, [bytes.fromhex("0802 3007")])
    inv = decode_inventory(data)
    assert inv.lsmtype is None
    assert inv.other_fields == ((6, b"\x30\x07"),)
    assert encode_inventory(inv) == data


def test_inventory_entry_rejects_misplaced_fields() -> None:
    with pytest.raises(ValueError, match="set as an attribute and in other_fields"):
        InventoryEntry(fdinfo_per_id=True, other_fields=((2, b"\x10\x01"),))
    with pytest.raises(ValueError, match="img_version"):
        InventoryEntry(other_fields=((1, b"\x08\x01"),))
    with pytest.raises(ValueError, match="LSM"):
        InventoryEntry(lsmtype=9)


GOOD_HEAD = bytes.fromhex("19435654 25400856 02000000 0801")


@pytest.mark.parametrize(("data", "message"), [
    (b"\x19\x43", r"offset 0: 2 bytes, too short"),
    (bytes.fromhex("19435654"), r"offset 4: file ends inside the type magic"),
    (bytes.fromhex("efbeadde 00000000"), r"offset 0: unknown magic 0xdeadbeef"),
    (bytes(PS), r"offset 0: unknown magic 0x00000000 \(a raw pages-N.img"),
    (bytes.fromhex("19435654 efbeadde"), r"offset 4: unknown image type magic 0xdeadbeef"),
    (bytes.fromhex("40591055 25400856 02000000 0801"), r"offset 0: PAGEMAP image starts with 0x55105940"),
    (encode_entries(INVENTORY_HEAD, [b"\x08\x02"]), r"offset 0: INVENTORY image, expected PAGEMAP"),
    (WORKED_PAGEMAP + b"\x01\x00", r"offset 29: file ends inside an entry size \(2 of 4 bytes\)"),
    (WORKED_PAGEMAP[:-1], r"offset 14: entry of 11 bytes is truncated \(10 bytes left\)"),
    (GOOD_HEAD + bytes.fromhex("02000000 08ff"), r"offset 14: pagemap_entry entry does not parse"),
    (GOOD_HEAD + bytes.fromhex("05000000 0880808002"), r"offset 14: pagemap_entry entry lacks required "
                                                       r"compat_nr_pages"),
    (bytes.fromhex("19435654 25400856"), r"offset 8: pagemap has no pagemap_head"),
    (bytes.fromhex("19435654 25400856 00000000"), r"offset 8: pagemap_head entry lacks required pages_id"),
])
def test_pagemap_decode_is_strict(data: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=r"^/x/pagemap-1\.img: " + message):
        decode_pagemap(data, path="/x/pagemap-1.img")


@pytest.mark.parametrize(("data", "message"), [
    (encode_entries(INVENTORY_HEAD, []), r"offset 4: inventory has 0 entries"),
    (encode_entries(INVENTORY_HEAD, [b"\x08\x02", b"\x08\x02"]), r"offset 4: inventory has 2 entries"),
    (encode_entries(INVENTORY_HEAD, [b"\x10\x01"]),
     r"offset 4: inventory_entry entry lacks required img_version"),
    (encode_entries(INVENTORY_HEAD, [b"\x08"]), r"offset 4: inventory_entry entry does not parse"),
    (encode_entries((0x54564319, 0x58313116), [b"\x08\x02"]), r"offset 4: unknown image type magic"),
    (WORKED_PAGEMAP, r"offset 0: PAGEMAP image, expected INVENTORY"),
])
def test_inventory_decode_is_strict(data: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=r"^inv\.img: " + message):
        decode_inventory(data, path="inv.img")


def _entries_arrays(entries: list[PagemapEntry]) -> tuple[U64, U64, npt.NDArray[np.uint32]]:
    return (np.array([e.vaddr for e in entries], np.uint64), np.array([e.nr_pages for e in entries], np.uint64),
            np.array([e.flags for e in entries], np.uint32))


@pytest.mark.parametrize("seed", range(20))
def test_encode_pagemap_arrays_is_byte_identical(seed: int) -> None:
    rng = np.random.default_rng(seed)

    def pick(edges: list[int], bits: int) -> int:
        choices: list[int] = [*edges, int(rng.integers(0, 2**bits, dtype=np.uint64)), 2 ** int(rng.integers(0, bits))]
        return choices[int(rng.integers(0, len(choices)))]

    edge64 = [0, 1, 127, 128, 16383, 16384, 2**63, 2**64 - 1]
    edge32 = [0, PE_PARENT, PE_LAZY, PE_PRESENT, PE_PRESENT | PE_LAZY, 127, 128, 2**32 - 1]
    entries = [PagemapEntry(pick(edge64, 64), pick(edge64, 64), pick(edge32, 32))
               for _ in range(int(rng.integers(0, 200)))]
    pages_id = [0, 1, 2, 300, 2**32 - 1][seed % 5]
    assert encode_pagemap_arrays(pages_id, *_entries_arrays(entries)) == encode_pagemap(pages_id, entries)


def test_encode_pagemap_arrays_rejects_ragged_arrays() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        encode_pagemap_arrays(1, np.zeros(2, np.uint64), np.zeros(1, np.uint64), np.zeros(2, np.uint32))


@pytest.mark.parametrize(("name", "key"), [
    ("pagemap-42.img", ImageKey("pid", 42)),
    ("pagemap-shmem-99001.img", ImageKey("shmem", 99001)),
    ("pagemap-42.img.tmp", None),
    ("pagemap-shmem-.img", None),
    ("pages-1.img", None),
    ("inventory.img", None),
])
def test_pagemap_names_parse_back_to_their_image(name: str, key: ImageKey | None) -> None:
    assert ImageKey.of_pagemap_name(name) == key
    assert is_pagemap(name) == (key is not None)
    if key is not None:
        assert key.pagemap_name == name

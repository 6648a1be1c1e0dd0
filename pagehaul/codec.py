"""The CRIU image codec: the grammar of CRIU's memory images, their magics and names, and the
encoders and decoders of framing, pagemaps and the inventory. Bytes in, bytes out; nothing here
knows about rounds, sessions or pagehaul's own files (those are ``pagehaul.store``'s).

Grammar, after CRIU's ``lib/pycriu/images/images.py`` and ``criu/image.c`` / ``criu/protobuf.c``. Every
integer is a u32 in host order, which is little-endian on every platform CRIU restores pagehaul images on,
so the formats below say ``'<I'`` explicitly::

    IMAGE_FILE ::= HEAD { ENTRY }
    HEAD       ::= IMG_COMMON_MAGIC TYPE_MAGIC      a v1.1 protobuf image (inventory img_version = 2)
                 | IMG_SERVICE_MAGIC TYPE_MAGIC     a service file (stats-dump, irmap-cache)
                 | INVENTORY_MAGIC                  inventory.img carries its own magic only
    ENTRY      ::= SIZE PAYLOAD                     SIZE = len(PAYLOAD); no CRC, no count, no trailer
    PAYLOAD    ::= one protobuf message of SIZE bytes

    inventory.img    ::= INVENTORY_MAGIC ENTRY(inventory_entry)          exactly one entry
    pagemap-PID.img  ::= IMG_COMMON_MAGIC PAGEMAP_MAGIC ENTRY(pagemap_head) { ENTRY(pagemap_entry) }
                         entries ascend by vaddr and do not overlap
    pages-ID.img     ::= { PAGE }   raw: no magic, no framing. The pages of every entry flagged PE_PRESENT,
                                    in pagemap order. PE_PARENT and lazy-only entries add no bytes
                                    (``skip_pagemap_pages`` moves the data offset only for PE_PRESENT).
    parent           ::= symlink to the parent (previous) images directory, relative

The entries end exactly at EOF on a SIZE boundary (``do_pb_read_one``). EOF inside SIZE or PAYLOAD is
an error. This module does not read or write v1 images (img_version 1, which have no common magic).
"""

from __future__ import annotations

import os
import re
import struct
import types
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, NamedTuple, TypeVar, cast

import numpy as np
import numpy.typing as npt
from google.protobuf.message import DecodeError, Message

from pagehaul.criu import inventory_pb2, pagemap_pb2
from pagehaul.errors import ImageError
from pagehaul.runs import U64

# === Constants =========================================================================================

# criu/include/magic.h
IMG_COMMON_MAGIC: Final = 0x54564319  # "Sarov": first u32 of every v1.1 image except inventory
IMG_SERVICE_MAGIC: Final = 0x55105940  # "Zlatoust": first u32 of service files
INVENTORY_MAGIC: Final = 0x58313116
PAGEMAP_MAGIC: Final = 0x56084025  # "Vladimir"
STATS_MAGIC: Final = 0x57093306
IRMAP_CACHE_MAGIC: Final = 0x57004059
CRTOOLS_IMAGES_V1_1: Final = 2  # inventory img_version meaning "common magic in every head"

# criu/include/pagemap.h
PE_PARENT: Final = 1 << 0  # the pages are in the parent snapshot
PE_LAZY: Final = 1 << 1  # the pages may be restored lazily
PE_PRESENT: Final = 1 << 2  # the pages are in pages-ID.img

# inventory_entry.pre_dump_mode (CRIU criu/include/cr_options.h, --pre-dump-mode=splice|read)
PRE_DUMP_SPLICE: Final = 1
PRE_DUMP_READ: Final = 2

# File names: criu/image-desc.c (inventory, pagemap-%lu for a task's vpid, pages-%u) and
# CR_PARENT_LINK in criu/include/image.h.
INVENTORY_NAME: Final = "inventory.img"
PARENT_LINK: Final = "parent"

# The heads written before the entries of each kind of file.
INVENTORY_HEAD: Final = (INVENTORY_MAGIC,)
PAGEMAP_HEAD: Final = (IMG_COMMON_MAGIC, PAGEMAP_MAGIC)
STATS_HEAD: Final = (IMG_SERVICE_MAGIC, STATS_MAGIC)

# Type magics this module can name (criu/include/magic.h), and the two that sit behind the service
# magic rather than the common one (``img_check_magic`` checks which head each file has).
MAGIC_NAMES: Final[Mapping[int, str]] = types.MappingProxyType({
    INVENTORY_MAGIC: "INVENTORY",
    PAGEMAP_MAGIC: "PAGEMAP",
    STATS_MAGIC: "STATS",
    IRMAP_CACHE_MAGIC: "IRMAP_CACHE",
    0x55053847: "CORE",
    0x57492820: "MM",
    0x54123737: "VMAS",
    0x50273030: "PSTREE",
    0x56213732: "FDINFO",
    0x54432030: "IDS",
    0x48453499: "MEMFD_INODE",
    0x56303138: "FILES",
})
SERVICE_IMAGES: Final = frozenset({"STATS", "IRMAP_CACHE"})

# Flag values a pagemap entry may carry. A hole is exactly PE_PARENT (``get_hole_flags``). A lazy
# page is PE_LAZY, or PE_PRESENT|PE_LAZY once transferred. CRIU's reader lets PE_PARENT win over
# PE_PRESENT while its data offset follows PE_PRESENT, so any other combination would put the
# data out of step.
VALID_PE_FLAGS: Final = frozenset({PE_PRESENT, PE_PARENT, PE_LAZY, PE_PRESENT | PE_LAZY})

_U32: Final = struct.Struct("<I")
_U32_MAX: Final = 0xFFFF_FFFF
U64_MAX: Final = 0xFFFF_FFFF_FFFF_FFFF

_M = TypeVar("_M", bound=Message)
PathLike = str | os.PathLike[str]

# CRIU's image names for memory (criu/include/image-desc.h: pagemap-%u, pagemap-shmem-%lu, pages-%u).
TASK_PAGEMAP_RE: Final = re.compile(r"pagemap-(\d+)\.img")
SHMEM_PAGEMAP_RE: Final = re.compile(r"pagemap-shmem-(\d+)\.img")
PAGES_RE: Final = re.compile(r"pages-(\d+)\.img")
# A file the receiver accepts from a sender: a plain CRIU image name, never a path.
IMAGE_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\.img")


def pagemap_name(pid: int) -> str:
    return f"pagemap-{pid}.img"


def shmem_pagemap_name(shmid: int) -> str:
    """CRIU's name for a shared-memory object's pagemap (``shmid`` = inode of its shmem file)."""
    return f"pagemap-shmem-{shmid}.img"


ImageKind = Literal["pid", "shmem"]


class ImageKey(NamedTuple):
    """Which memory image of a dump: a process's (``pagemap-VPID.img``) or a shared-memory
    object's (``pagemap-shmem-SHMID.img``, vaddr = byte offset in the object, as CRIU)."""

    kind: ImageKind
    id: int

    @property
    def pagemap_name(self) -> str:
        return shmem_pagemap_name(self.id) if self.kind == "shmem" else pagemap_name(self.id)

    @classmethod
    def of_pagemap_name(cls, name: str) -> ImageKey | None:
        """The image a file name is the pagemap of (the inverse of ``pagemap_name``); None for any other name."""
        if m := SHMEM_PAGEMAP_RE.fullmatch(name):
            return cls("shmem", int(m.group(1)))
        if m := TASK_PAGEMAP_RE.fullmatch(name):
            return cls("pid", int(m.group(1)))
        return None


def pages_name(pages_id: int) -> str:
    return f"pages-{pages_id}.img"


def is_pagemap(name: str) -> bool:
    return ImageKey.of_pagemap_name(name) is not None


def at_offset(path: PathLike, offset: int) -> str:
    """``PATH: offset N``, how errors about a place in a file name it."""
    return f"{os.fspath(path)}: offset {offset}"


# === Framing ===========================================================================================


class RawImage(NamedTuple):
    """A decoded image file: its type, each entry's payload, and the file offset of each entry's SIZE."""

    magic_name: str
    entries: tuple[bytes, ...]
    offsets: tuple[int, ...]


def encode_entries(magics: Sequence[int], messages: Iterable[Message | bytes]) -> bytes:
    """``HEAD {SIZE PAYLOAD}``. ``magics`` is one of the ``*_HEAD`` tuples; bytes items are raw payloads."""
    parts = [_U32.pack(m) for m in magics]
    for msg in messages:
        payload = msg if isinstance(msg, bytes) else msg.SerializeToString()
        if len(payload) > _U32_MAX:
            raise ImageError(f"entry of {len(payload)} bytes does not fit a u32 size")
        parts.append(_U32.pack(len(payload)))
        parts.append(payload)
    return b"".join(parts)


def decode_image(data: bytes, *, path: PathLike = "<bytes>") -> RawImage:
    """Split an image into its entries, checking the head magics and the framing, not the payloads."""
    size = len(data)
    if size < 4:
        raise ImageError(f"{at_offset(path, 0)}: {size} bytes, too short for a magic")
    (first,) = _U32.unpack_from(data, 0)
    if first == INVENTORY_MAGIC:
        name, pos = "INVENTORY", 4
    elif first in (IMG_COMMON_MAGIC, IMG_SERVICE_MAGIC):
        if size < 8:
            raise ImageError(f"{at_offset(path, 4)}: file ends inside the type magic")
        (second,) = _U32.unpack_from(data, 4)
        found = MAGIC_NAMES.get(second)
        if found is None or found == "INVENTORY":
            raise ImageError(f"{at_offset(path, 4)}: unknown image type magic {second:#010x}")
        name, pos = found, 8
        head = IMG_SERVICE_MAGIC if name in SERVICE_IMAGES else IMG_COMMON_MAGIC
        if first != head:
            raise ImageError(f"{at_offset(path, 0)}: {name} image starts with {first:#010x}, "
                             f"expected {head:#010x}")
    else:
        raise ImageError(f"{at_offset(path, 0)}: unknown magic {first:#010x} (a raw pages-N.img has no magic; "
                         "v1 images without the common magic are not supported)")
    entries: list[bytes] = []
    offsets: list[int] = []
    while pos < size:
        if size - pos < 4:
            raise ImageError(f"{at_offset(path, pos)}: file ends inside an entry size ({size - pos} of 4 bytes)")
        (length,) = _U32.unpack_from(data, pos)
        if length > size - pos - 4:
            raise ImageError(f"{at_offset(path, pos)}: entry of {length} bytes is truncated "
                             f"({size - pos - 4} bytes left)")
        entries.append(bytes(data[pos + 4:pos + 4 + length]))
        offsets.append(pos)
        pos += 4 + length
    return RawImage(name, tuple(entries), tuple(offsets))


def _parse(cls: type[_M], payload: bytes, path: PathLike, offset: int) -> _M:
    msg = cls()
    try:
        msg.ParseFromString(payload)
    except DecodeError as err:
        raise ImageError(f"{at_offset(path, offset)}: {cls.DESCRIPTOR.name} entry does not parse: {err}") \
            from err
    # upb does not check proto2 required fields on parse.
    if not msg.IsInitialized():
        fields = cls.DESCRIPTOR.fields
        missing = ", ".join(f.name for f in fields if f.is_required and not msg.HasField(f.name))
        raise ImageError(f"{at_offset(path, offset)}: {cls.DESCRIPTOR.name} entry lacks required {missing}")
    return msg


def _expect(raw: RawImage, name: str, path: PathLike) -> None:
    if raw.magic_name != name:
        raise ImageError(f"{at_offset(path, 0)}: {raw.magic_name} image, expected {name}")


# === Pagemap ===========================================================================================


@dataclass(frozen=True, slots=True)
class PagemapEntry:
    """One pagemap run after CRIU's reader compat: ``flags`` are PE_* bits, ``nr_pages`` the real count."""

    vaddr: int
    nr_pages: int
    flags: int

    def __post_init__(self) -> None:
        if not (0 <= self.vaddr <= U64_MAX and 0 <= self.nr_pages <= U64_MAX
                and 0 <= self.flags <= _U32_MAX):
            raise ValueError(f"pagemap entry out of range: {self}")


@dataclass(frozen=True, slots=True)
class Pagemap:
    """The contents of pagemap-PID.img: the pages file it names, and its entries in file order."""

    pages_id: int
    entries: tuple[PagemapEntry, ...]

    def arrays(self) -> tuple[U64, U64, npt.NDArray[np.uint32]]:
        """``(vaddr, nr_pages, flags)`` as parallel arrays."""
        n = len(self.entries)
        vaddr = np.fromiter((e.vaddr for e in self.entries), np.uint64, n)
        nr_pages = np.fromiter((e.nr_pages for e in self.entries), np.uint64, n)
        flags = np.fromiter((e.flags for e in self.entries), np.uint32, n)
        return vaddr, nr_pages, flags


def encode_pagemap(pages_id: int, entries: Sequence[PagemapEntry]) -> bytes:
    """pagemap-PID.img bytes as modern CRIU writes them (page-xfer.c ``write_pagemap_loc``).

    ``compat_nr_pages`` is 0, ``flags`` and ``nr_pages`` are always set, and ``in_parent`` is never
    written.
    """
    head = pagemap_pb2.pagemap_head(pages_id=pages_id)
    msgs: list[Message] = [head]
    msgs.extend(
        pagemap_pb2.pagemap_entry(vaddr=e.vaddr, compat_nr_pages=0, flags=e.flags, nr_pages=e.nr_pages)
        for e in entries)
    return encode_entries(PAGEMAP_HEAD, msgs)


class PagemapArrays(NamedTuple):
    """A pagemap as parallel arrays (what the round writer builds; no object per entry)."""

    pages_id: int
    vaddr: U64
    nr_pages: U64
    flags: npt.NDArray[np.uint32]


_VARINT_SHIFTS: Final = np.arange(0, 64, 7, dtype=np.uint64)  # 10 groups of 7 bits cover a u64


def _varints(values: U64) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.bool_]]:
    """Protobuf varints of (non-empty) ``values``: an ``(n, width)`` byte matrix, ``width`` the longest
    varint's length, and which of its bytes are used."""
    width = max(1, -(-int(values.max()).bit_length() // 7))
    groups = values[:, None] >> _VARINT_SHIFTS[:width]
    more = np.zeros(groups.shape, np.bool_)
    more[:, :-1] = groups[:, 1:] != 0  # a prefix of each row: higher groups are non-zero only if lower are
    data = (groups & np.uint64(0x7F)).astype(np.uint8) | (more.astype(np.uint8) << np.uint8(7))
    used = np.zeros(groups.shape, np.bool_)
    used[:, 0] = True
    used[:, 1:] = more[:, :-1]
    return data, used


def encode_pagemap_arrays(pages_id: int, vaddr: U64, nr_pages: U64, flags: npt.NDArray[np.uint32]) -> bytes:
    """The bytes of ``encode_pagemap`` from parallel arrays, built with numpy rather than one protobuf
    message per entry. Each entry is ``SIZE`` then fields 1 (vaddr), 2 (compat_nr_pages = 0), 4 (flags)
    and 5 (nr_pages) in field order, as the protobuf serializer writes them."""
    n = int(vaddr.size)
    if nr_pages.shape != (n,) or flags.shape != (n,):
        raise ValueError(f"pagemap arrays differ in length: {vaddr.shape}, {nr_pages.shape}, {flags.shape}")
    head = encode_entries(PAGEMAP_HEAD, [pagemap_pb2.pagemap_head(pages_id=pages_id)])
    if n == 0:
        return head
    v_data, v_used = _varints(np.asarray(vaddr, np.uint64))
    f_data, f_used = _varints(np.asarray(flags, np.uint32).astype(np.uint64))
    n_data, n_used = _varints(np.asarray(nr_pages, np.uint64))
    # payload <= 1+10 + 2 + 1+5 + 1+10 = 30 bytes, so SIZE is its low byte and three zero bytes.
    size = 5 + v_used.sum(axis=1) + f_used.sum(axis=1) + n_used.sum(axis=1)

    def tag(byte: int) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.bool_]]:
        return np.full((n, 1), byte, np.uint8), np.ones((n, 1), np.bool_)

    size_data = np.zeros((n, 4), np.uint8)
    size_data[:, 0] = size
    parts = [(size_data, np.ones((n, 4), np.bool_)), tag(0x08), (v_data, v_used), tag(0x10), tag(0x00),
             tag(0x20), (f_data, f_used), tag(0x28), (n_data, n_used)]
    data = np.concatenate([d for d, _ in parts], axis=1)
    used = np.concatenate([u for _, u in parts], axis=1)
    entries: bytes = data[used].tobytes()
    return head + entries


def decode_pagemap(data: bytes, *, path: PathLike = "<bytes>") -> Pagemap:
    """Parse pagemap-PID.img, mapping legacy entries the way CRIU's ``init_compat_pagemap_entry`` does.

    ``in_parent`` becomes PE_PARENT, a missing ``flags`` becomes PE_PRESENT, and a missing ``nr_pages``
    takes ``compat_nr_pages``.
    """
    raw = decode_image(data, path=path)
    _expect(raw, "PAGEMAP", path)
    if not raw.entries:
        raise ImageError(f"{at_offset(path, 8)}: pagemap has no pagemap_head entry")
    head = _parse(pagemap_pb2.pagemap_head, raw.entries[0], path, raw.offsets[0])
    entries: list[PagemapEntry] = []
    for payload, offset in zip(raw.entries[1:], raw.offsets[1:], strict=True):
        pe = _parse(pagemap_pb2.pagemap_entry, payload, path, offset)
        has_flags = pe.HasField("flags")
        flags = pe.flags if has_flags else 0
        if pe.HasField("in_parent") and pe.in_parent:
            flags |= PE_PARENT
        elif not has_flags:
            flags = PE_PRESENT
        nr_pages = pe.nr_pages if pe.HasField("nr_pages") else pe.compat_nr_pages
        entries.append(PagemapEntry(pe.vaddr, nr_pages, flags))
    return Pagemap(head.pages_id, tuple(entries))


def read_pagemap(path: Path) -> Pagemap:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ImageError(f"{path}: cannot read pagemap: {err.strerror}") from err
    return decode_pagemap(data, path=path)


# === Inventory =========================================================================================

# Protobuf wire types (encoding.md): varint, fixed64, length-delimited, start/end group, fixed32.
_WT_VARINT, _WT_I64, _WT_LEN, _WT_SGROUP, _WT_EGROUP, _WT_I32 = range(6)


def _read_varint(buf: bytes, pos: int, where: str) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ImageError(f"{where}: varint runs past the end of the entry")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise ImageError(f"{where}: varint longer than 10 bytes")


def _split_fields(payload: bytes, where: str) -> list[tuple[int, bytes]]:
    """The top-level fields of an encoded message, as ``(field number, tag and value bytes)`` in order."""
    fields: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(payload):
        start = pos
        tag, pos = _read_varint(payload, pos, where)
        number, wire_type = tag >> 3, tag & 7
        if wire_type == _WT_VARINT:
            _, pos = _read_varint(payload, pos, where)
        elif wire_type == _WT_I64:
            pos += 8
        elif wire_type == _WT_I32:
            pos += 4
        elif wire_type == _WT_LEN:
            length, pos = _read_varint(payload, pos, where)
            pos += length
        else:
            raise ImageError(f"{where}: field {number} has unsupported wire type {wire_type}")
        if pos > len(payload) or number == 0:
            raise ImageError(f"{where}: field {number} at byte {start} of the entry is malformed")
        fields.append((number, payload[start:pos]))
    return fields


def decode_fields(payload: bytes, where: str) -> Iterator[tuple[int, int | bytes]]:
    """The top-level fields of an encoded message as ``(field number, value)``: an int for a varint,
    the value's bytes for the other wire types. For the few fields pagehaul reads from CRIU images
    it has no generated message for (``mm-ID.img``'s VMAs)."""
    pos = 0
    while pos < len(payload):
        tag, pos = _read_varint(payload, pos, where)
        number, wire_type = tag >> 3, tag & 7
        if wire_type == _WT_VARINT:
            value, pos = _read_varint(payload, pos, where)
            yield number, value
            continue
        if wire_type == _WT_LEN:
            size, pos = _read_varint(payload, pos, where)
        elif wire_type in (_WT_I64, _WT_I32):
            size = 8 if wire_type == _WT_I64 else 4
        else:
            raise ImageError(f"{where}: field {number} has unsupported wire type {wire_type}")
        if pos + size > len(payload):
            raise ImageError(f"{where}: field {number} runs past the end of the entry")
        yield number, payload[pos:pos + size]
        pos += size


# The inventory fields pagehaul reads and writes; every other field is carried through as raw bytes.
_INVENTORY_MODELLED: Final[Mapping[int, str]] = types.MappingProxyType({
    1: "img_version", 2: "fdinfo_per_id", 4: "ns_per_id", 6: "lsmtype", 8: "dump_uptime", 9: "pre_dump_mode",
})


@dataclass(frozen=True, slots=True)
class InventoryEntry:
    """inventory.img: the ``inventory_entry`` fields pagehaul uses. ``None`` means the field is absent.

    ``other_fields`` keeps every other field verbatim as ``(field number, tag and value bytes)``.
    That covers CRIU's ``root_ids`` (3) and plugins (12), which our proto leaves out, and known
    fields we do not model. ``encode_inventory`` writes all fields in ascending field number,
    which is protobuf-c's packing order (its field descriptors are sorted by number). So an
    inventory CRIU made re-encodes byte for byte, where protobuf's own serializer would move the
    unknown fields to the end.
    """

    img_version: int = 0
    fdinfo_per_id: bool | None = None
    ns_per_id: bool | None = None
    lsmtype: int | None = None
    dump_uptime: int | None = None  # /proc/uptime at dump time in µs; the next round checks PID reuse
    pre_dump_mode: int | None = None
    other_fields: tuple[tuple[int, bytes], ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.img_version <= _U32_MAX:
            raise ValueError(f"img_version {self.img_version} out of range")
        if self.lsmtype is not None and self.lsmtype not in inventory_pb2.lsm_type.values():
            raise ValueError(f"lsmtype {self.lsmtype} is not a known LSM; "
                             "keep unknown values in other_fields")
        for number, _ in self.other_fields:
            # A modelled field may sit here raw only when its attribute is unset (a value our schema
            # cannot hold, like an lsmtype newer than our enum); otherwise it would be written twice.
            name = _INVENTORY_MODELLED.get(number)
            if name is not None and (name == "img_version" or getattr(self, name) is not None):
                raise ValueError(f"field {number} ({name}) is set as an attribute and in other_fields")

    @classmethod
    def for_pre_dump(cls, dump_uptime_us: int, pre_dump_mode: int = PRE_DUMP_READ) -> InventoryEntry:
        """What ``cr_pre_dump_finish`` writes: ``INVENTORY_ENTRY__INIT`` (img_version 0) plus two fields."""
        return cls(img_version=0, dump_uptime=dump_uptime_us, pre_dump_mode=pre_dump_mode)


def _inventory_payload(inv: InventoryEntry) -> bytes:
    msg = inventory_pb2.inventory_entry(img_version=inv.img_version)
    if inv.fdinfo_per_id is not None:
        msg.fdinfo_per_id = inv.fdinfo_per_id
    if inv.ns_per_id is not None:
        msg.ns_per_id = inv.ns_per_id
    if inv.lsmtype is not None:
        msg.lsmtype = cast(inventory_pb2.lsm_type, inv.lsmtype)
    if inv.dump_uptime is not None:
        msg.dump_uptime = inv.dump_uptime
    if inv.pre_dump_mode is not None:
        msg.pre_dump_mode = inv.pre_dump_mode
    fields = _split_fields(msg.SerializeToString(), "<inventory encode>")
    fields.extend(inv.other_fields)
    fields.sort(key=lambda field: field[0])  # stable: repeated fields keep their order
    return b"".join(raw for _, raw in fields)


def encode_inventory(inv: InventoryEntry) -> bytes:
    return encode_entries(INVENTORY_HEAD, [_inventory_payload(inv)])


def decode_inventory(data: bytes, *, path: PathLike = "<bytes>") -> InventoryEntry:
    raw = decode_image(data, path=path)
    _expect(raw, "INVENTORY", path)
    if len(raw.entries) != 1:
        raise ImageError(f"{at_offset(path, 4)}: inventory has {len(raw.entries)} entries, expected 1")
    payload, offset = raw.entries[0], raw.offsets[0]
    msg = _parse(inventory_pb2.inventory_entry, payload, path, offset)
    # A modelled field protobuf did not accept (an lsmtype value newer than our enum) lands in the
    # message's unknown fields; keep it raw too.
    other = tuple((number, field) for number, field in _split_fields(payload, at_offset(path, offset))
                  if number not in _INVENTORY_MODELLED or not msg.HasField(_INVENTORY_MODELLED[number]))
    return InventoryEntry(
        img_version=msg.img_version,
        fdinfo_per_id=msg.fdinfo_per_id if msg.HasField("fdinfo_per_id") else None,
        ns_per_id=msg.ns_per_id if msg.HasField("ns_per_id") else None,
        lsmtype=int(msg.lsmtype) if msg.HasField("lsmtype") else None,
        dump_uptime=msg.dump_uptime if msg.HasField("dump_uptime") else None,
        pre_dump_mode=msg.pre_dump_mode if msg.HasField("pre_dump_mode") else None,
        other_fields=other,
    )

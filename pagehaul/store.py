"""The image store: pagehaul's round directories on disk, the files it keeps beside CRIU's, and the
writers and the reader of memory images. The bytes of each CRIU file are ``pagehaul.codec``'s.

Round directories are the receiver's on-disk model, one CRIU pre-dump directory per round::

    SESSION/
        round-0/              inventory.img  pagemap-PID.img  pages-1.img  pages-1.xxh3  pagehaul-round.json
        round-1/              the same files, plus  parent -> ../round-0
        .round-2.tmp-XXXXXX/  a round still being received; ``RoundWriter.commit`` renames it to round-2

``pagehaul-round.json`` and ``pages-ID.xxh3`` are pagehaul's own and CRIU ignores them::

    pages-ID.xxh3        ::= { U64 }   the xxh3_64 of each page of pages-ID.img, in the same order,
                                       little-endian (``pagehaul.digest``)
    pagehaul-round.json  ::= the sidecar: the zero pages, which CRIU leaves out of the pagemap because
                             an absent anonymous page restores as zero, plus counters and xxh3-128
                             digests of pages-ID.img, pages-ID.xxh3, the pagemap and the inventory
                             (``pagehaul.integrity`` checks them all, and every page against pages-ID.xxh3)

What this module owns:

* names and listing: ``round_dir_name``, ``parent_link``, ``committed_rounds``;
* durable file work: ``write_all``, ``fsync_dir``, ``link_or_copy``, files created never replacing one;
* the sidecar: ``RoundStats``, ``RoundFiles``, ``RoundInfo``, ``read_round_infos``;
* writing: one :class:`ImageWriter` per memory image (pages-ID.img as the pages arrive, the pagemap
  at the end), gathered by a round writer that makes them visible together on commit. A
  :class:`RoundWriter` builds a pagehaul round (the gRPC receiver); a :class:`DumpDirWriter` adds
  the images CRIU's page server would write to a directory ``criu dump`` writes into (the CRIU
  page-server receiver);
* reading: :class:`ImageSet` and ``open_round``, a round and its parents as CRIU restores them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
from array import array
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, NamedTuple, Self

import numpy as np
import numpy.typing as npt
import xxhash

from pagehaul import digest as page_digest
from pagehaul.codec import (
    INVENTORY_NAME,
    PARENT_LINK,
    PE_PARENT,
    PE_PRESENT,
    U64_MAX,
    VALID_PE_FLAGS,
    ImageKey,
    InventoryEntry,
    PagemapArrays,
    at_offset,
    encode_inventory,
    encode_pagemap_arrays,
    pages_name,
    read_pagemap,
)
from pagehaul.errors import ImageError
from pagehaul.kernel import PAGE_SIZE
from pagehaul.runs import U64, Runs

log = logging.getLogger(__name__)

SIDECAR_NAME: Final = "pagehaul-round.json"
SIDECAR_VERSION: Final = 1
# Rounds with several images (a process tree, shared memory): one entry per image.
SIDECAR_VERSION_IMAGES: Final = 2

_IO_CHUNK: Final = 4 << 20
# Per-page digests are buffered and written this many at a time (128 KiB, for 64 MiB of 4 KiB pages).
_DIGEST_FLUSH_PAGES: Final = 16384
_HEX128_CHARS: Final = frozenset("0123456789abcdef")


def page_digests_name(pages_id: int) -> str:
    """pagehaul's per-page digest file beside ``pages-ID.img`` (not a CRIU file)."""
    return f"pages-{pages_id}.xxh3"


def round_dir_name(round_no: int) -> str:
    return f"round-{round_no}"


def parent_link(round_no: int) -> str | None:
    """The relative ``parent`` link target of a round (none for round 0), the way P.Haul links rounds."""
    return None if round_no == 0 else f"../{round_dir_name(round_no - 1)}"


def committed_rounds(session_dir: Path) -> tuple[int, ...]:
    """Round numbers with a committed ``round-N`` directory, ascending."""
    try:
        names = os.listdir(session_dir)
    except OSError as err:
        raise ImageError(f"{session_dir}: cannot list session: {err.strerror}") from err
    found = [int(name[6:]) for name in names
             if name.startswith("round-") and name[6:].isdecimal() and (session_dir / name).is_dir()]
    return tuple(sorted(found))


# === Run checks shared by the writer and the reader ====================================================


def _check_runs(runs: Runs, page_size: int, what: str, where: str, *, ordered: bool) -> None:
    """Aligned, non-empty and not wrapping past 2**64; with ``ordered``, ascending and disjoint too."""
    if len(runs) == 0:
        return
    ps = np.uint64(page_size)
    bad = np.flatnonzero(runs.vaddr % ps)
    if bad.size:
        raise ImageError(f"{where}: {what} run at {int(runs.vaddr[bad[0]]):#x} is not page-aligned")
    bad = np.flatnonzero(runs.nr_pages == 0)
    if bad.size:
        raise ImageError(f"{where}: {what} run at {int(runs.vaddr[bad[0]]):#x} has no pages")
    bad = np.flatnonzero(runs.nr_pages > (np.uint64(U64_MAX) - runs.vaddr) // ps)
    if bad.size:
        i = int(bad[0])
        raise ImageError(f"{where}: {what} run {int(runs.vaddr[i]):#x}+{int(runs.nr_pages[i])} "
                         "wraps the address space")
    if ordered:
        ends = runs.ends(page_size)
        bad = np.flatnonzero(ends[:-1] > runs.vaddr[1:])
        if bad.size:
            i = int(bad[0])
            raise ImageError(f"{where}: {what} runs are not ascending and disjoint: "
                             f"{int(runs.vaddr[i]):#x}+{int(runs.nr_pages[i])} then "
                             f"{int(runs.vaddr[i + 1]):#x}+{int(runs.nr_pages[i + 1])}")


def _union(runs: Runs, page_size: int) -> tuple[U64, U64]:
    """Start and end addresses of the union of possibly unsorted, overlapping runs, as maximal ranges."""
    if len(runs) == 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64)
    order = np.argsort(runs.vaddr, kind="stable")
    starts = runs.vaddr[order]
    ends = runs.ends(page_size)[order]
    reach = np.maximum.accumulate(ends)
    first = np.concatenate(([True], starts[1:] > reach[:-1]))
    idx = np.flatnonzero(first)
    last = np.concatenate((idx[1:] - 1, [len(starts) - 1]))
    return starts[idx], reach[last]


def _covered(starts: U64, ends: U64, cov_starts: U64, cov_ends: U64) -> npt.NDArray[np.bool_]:
    """For each range ``[starts[i], ends[i])``, whether it lies inside one maximal covering range."""
    if cov_starts.size == 0:
        return np.zeros(starts.size, np.bool_)
    idx = np.searchsorted(cov_starts, starts, side="right").astype(np.int64) - 1
    ok: npt.NDArray[np.bool_] = (idx >= 0) & (cov_ends[np.maximum(idx, 0)] >= ends)
    return ok


def _merge_touching(vaddr: U64, nr_pages: U64, flags: npt.NDArray[np.uint32],
                    page_size: int) -> tuple[U64, U64, npt.NDArray[np.uint32]]:
    """Merge neighbours (sorted, disjoint) that touch and have the same flags."""
    if vaddr.size < 2:
        return vaddr, nr_pages, flags
    ends = vaddr + nr_pages * np.uint64(page_size)
    first = np.concatenate(([True], (vaddr[1:] != ends[:-1]) | (flags[1:] != flags[:-1])))
    idx = np.flatnonzero(first)
    last = np.concatenate((idx[1:] - 1, [vaddr.size - 1]))
    return vaddr[idx], (ends[last] - vaddr[idx]) // np.uint64(page_size), flags[idx]



# === Durable files =====================================================================================


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` as ``dst``; copy where a link cannot be made (another filesystem). For
    images nobody writes again (committed rounds, a finished dump)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def write_all(fd: int, data: memoryview, path: Path, offset: int = 0) -> None:
    """``os.write`` until everything is written; a write may be short (signals, RLIMIT_FSIZE, >2 GiB).
    Errors name the file and the offset (``offset``: where ``data`` starts in the file)."""
    while data:
        try:
            n = os.write(fd, data)
        except OSError as err:
            raise ImageError(f"{at_offset(path, offset)}: write failed: {err.strerror}") from err
        if n <= 0:
            raise ImageError(f"{at_offset(path, offset)}: write made no progress")
        data = data[n:]
        offset += n


def read_exact(fd: int, view: memoryview, offset: int, path: Path) -> None:
    """Fill ``view`` from ``offset`` of an image file: a read may be short; the file ending early is
    an ImageError, as is a failed read (both name the file and the offset)."""
    while view:
        try:
            n = os.preadv(fd, [view], offset)
        except OSError as err:
            raise ImageError(f"{at_offset(path, offset)}: read failed: {err.strerror}") from err
        if n == 0:
            raise ImageError(f"{at_offset(path, offset)}: file ends early")
        view = view[n:]
        offset += n


def _create_file(path: Path, data: bytes, *, sync: bool = True) -> None:
    """Write a new file (never replacing one) and, with ``sync``, fsync it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as err:
        raise ImageError(f"{path}: cannot create: {err.strerror}") from err
    try:
        write_all(fd, memoryview(data), path, 0)
        if sync:
            os.fsync(fd)
    except OSError as err:
        raise ImageError(f"{path}: fsync failed: {err.strerror}") from err
    finally:
        os.close(fd)


def _fsync(path: Path, flags: int, failed: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        raise ImageError(f"{path}: {failed}: {err.strerror}") from err


def fsync_file(path: Path) -> None:
    """fsync a file written and closed before (the data of any descriptor it was written through)."""
    _fsync(path, 0, "fsync failed")


def fsync_dir(path: Path) -> None:
    """fsync a directory, so a rename or link inside it survives a crash."""
    _fsync(path, os.O_DIRECTORY, "cannot fsync directory")


def _rename_dir_noreplace(src: Path, dst: Path) -> None:
    # rename(2) onto an existing empty directory would replace it, so look first. The session
    # directory belongs to one receiver, which commits its rounds one at a time, so nothing races
    # this check. (renameat2 RENAME_NOREPLACE would close the gap but needs ctypes, which
    # belongs in one module.)
    if os.path.lexists(dst):
        raise ImageError(f"{dst}: round already exists")
    try:
        os.rename(src, dst)
    except OSError as err:
        raise ImageError(f"{dst}: cannot rename round into place: {err.strerror}") from err



# === Round sidecar =====================================================================================


@dataclass(frozen=True, slots=True)
class RoundStats:
    """Per-round counters, named like CRIU's ``dump_stats_entry``. ``bytes_written`` counts page data."""

    round_no: int
    pid: int
    page_size: int
    pages_written: int
    pages_zero: int
    pages_skipped_parent: int
    bytes_written: int
    pages_xxh3_128: str  # hex digest of pages-1.img


@dataclass(frozen=True, slots=True)
class RoundFiles:
    """xxh3-128 digests (hex) of a round's other files, recorded in the sidecar at commit.

    ``page_digests_name`` is the per-page digest file (``pages-ID.xxh3``), and
    ``page_digests_xxh3_128`` the digest of that file. Sidecars written before these fields
    existed have none (``RoundInfo.files is None``).
    """

    pagemap_xxh3_128: str
    inventory_xxh3_128: str
    page_digests_name: str
    page_digests_xxh3_128: str


_FILES_KEYS: Final = ("pagemap_xxh3_128", "inventory_xxh3_128", "page_digests", "page_digests_xxh3_128")


@dataclass(frozen=True, slots=True)
class RoundInfo:
    """The contents of ``pagehaul-round.json``."""

    stats: RoundStats
    pages_id: int
    zero_runs: Runs
    files: RoundFiles | None = None


def _sidecar_json(stats: RoundStats, pages_id: int, zero_runs: Runs, files: RoundFiles | None = None) -> bytes:
    doc = {
        "version": SIDECAR_VERSION,
        "round": stats.round_no,
        "pid": stats.pid,
        "page_size": stats.page_size,
        "pages_id": pages_id,
        "pages_written": stats.pages_written,
        "pages_zero": stats.pages_zero,
        "pages_skipped_parent": stats.pages_skipped_parent,
        "bytes_written": stats.bytes_written,
        "pages_xxh3_128": stats.pages_xxh3_128,
        "zero_runs": [[vaddr, nr] for vaddr, nr in zero_runs],
    }
    if files is not None:
        doc.update(zip(_FILES_KEYS, (files.pagemap_xxh3_128, files.inventory_xxh3_128, files.page_digests_name,
                                     files.page_digests_xxh3_128), strict=True))
    return (json.dumps(doc, sort_keys=True) + "\n").encode()


def _is_hex128(value: object) -> bool:
    return isinstance(value, str) and len(value) == 32 and set(value) <= _HEX128_CHARS


def _sidecar_files(doc: Mapping[str, object], pages_id: int, path: Path) -> RoundFiles | None:
    """The file digests, all or none; the digest file's name must be the one for ``pages_id``."""
    present = [key for key in _FILES_KEYS if key in doc]
    if not present:
        return None
    if len(present) != len(_FILES_KEYS):
        missing = ", ".join(key for key in _FILES_KEYS if key not in doc)
        raise ImageError(f"{path}: malformed round sidecar: file digests without {missing}")
    for key in ("pagemap_xxh3_128", "inventory_xxh3_128", "page_digests_xxh3_128"):
        if not _is_hex128(doc[key]):
            raise ImageError(f"{path}: malformed round sidecar: {key} is {doc[key]!r}, expected 32 hex digits")
    name = doc["page_digests"]
    if name != page_digests_name(pages_id):  # a plain name we derive: never a path from the file
        raise ImageError(f"{path}: malformed round sidecar: page_digests is {name!r}, "
                         f"expected {page_digests_name(pages_id)!r}")
    return RoundFiles(str(doc["pagemap_xxh3_128"]), str(doc["inventory_xxh3_128"]), str(name),
                      str(doc["page_digests_xxh3_128"]))


def _sidecar_int(doc: Mapping[str, object], key: str, path: Path) -> int:
    value = doc.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ImageError(f"{path}: malformed round sidecar: {key} is {value!r}, "
                         "expected a non-negative integer")
    return value


def _sidecar_pairs(value: object) -> list[tuple[int, int]] | None:
    if not isinstance(value, list):
        return None
    pairs: list[tuple[int, int]] = []
    for item in value:
        if not (isinstance(item, list) and len(item) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= U64_MAX for x in item)):
            return None
        pairs.append((item[0], item[1]))
    return pairs


def _sidecar_images_json(round_no: int, page_size: int, inventory_xxh3_128: str,
                         parts: Sequence[tuple[ImageKey, RoundStats, int, Runs, RoundFiles]]) -> bytes:
    """Version 2: one entry per image of the round (processes of a tree, shared memory)."""
    entries = []
    for key, stats, pages_id, zero_runs, files in parts:
        entries.append({
            "kind": key.kind, "id": key.id, "pages_id": pages_id,
            "pages_written": stats.pages_written, "pages_zero": stats.pages_zero,
            "pages_skipped_parent": stats.pages_skipped_parent, "bytes_written": stats.bytes_written,
            "pages_xxh3_128": stats.pages_xxh3_128, "zero_runs": [[vaddr, nr] for vaddr, nr in zero_runs],
            "pagemap_xxh3_128": files.pagemap_xxh3_128, "page_digests": files.page_digests_name,
            "page_digests_xxh3_128": files.page_digests_xxh3_128,
        })
    doc = {"version": SIDECAR_VERSION_IMAGES, "round": round_no, "page_size": page_size,
           "inventory_xxh3_128": inventory_xxh3_128, "images": entries}
    return (json.dumps(doc, sort_keys=True) + "\n").encode()


def _info_from(doc: Mapping[str, object], path: Path) -> RoundInfo:
    digest = doc.get("pages_xxh3_128")
    if not isinstance(digest, str):
        raise ImageError(f"{path}: malformed round sidecar: pages_xxh3_128 is {digest!r}")
    pairs = _sidecar_pairs(doc.get("zero_runs"))
    if pairs is None:
        raise ImageError(f"{path}: malformed round sidecar: zero_runs is not a list of [vaddr, nr_pages]")
    stats = RoundStats(
        round_no=_sidecar_int(doc, "round", path), pid=_sidecar_int(doc, "pid", path),
        page_size=_sidecar_int(doc, "page_size", path),
        pages_written=_sidecar_int(doc, "pages_written", path),
        pages_zero=_sidecar_int(doc, "pages_zero", path),
        pages_skipped_parent=_sidecar_int(doc, "pages_skipped_parent", path),
        bytes_written=_sidecar_int(doc, "bytes_written", path), pages_xxh3_128=digest)
    pages_id = _sidecar_int(doc, "pages_id", path)
    return RoundInfo(stats, pages_id, Runs.from_pairs(pairs), _sidecar_files(doc, pages_id, path))


def read_round_infos(round_dir: Path) -> dict[ImageKey, RoundInfo] | None:
    """Every image's sidecar entry, or ``None`` if the round has no sidecar (a directory CRIU wrote).

    A version 1 sidecar describes one process (``pid``); version 2 lists every image of the round.
    For a shared-memory image ``RoundInfo.stats.pid`` holds its shmid.
    """
    path = round_dir / SIDECAR_NAME
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise ImageError(f"{path}: cannot load round sidecar: {err}") from err
    if not isinstance(doc, dict):
        raise ImageError(f"{path}: malformed round sidecar: not a JSON object")
    version = _sidecar_int(doc, "version", path)
    if version == SIDECAR_VERSION:
        info = _info_from(doc, path)
        return {ImageKey("pid", info.stats.pid): info}
    if version != SIDECAR_VERSION_IMAGES:
        raise ImageError(f"{path}: round sidecar version {version}, expected {SIDECAR_VERSION} "
                         f"or {SIDECAR_VERSION_IMAGES}")
    entries = doc.get("images")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise ImageError(f"{path}: malformed round sidecar: images is not a non-empty list of objects")
    out: dict[ImageKey, RoundInfo] = {}
    pages_ids: set[int] = set()
    for entry in entries:
        kind = entry.get("kind")
        if kind not in ("pid", "shmem"):
            raise ImageError(f"{path}: malformed round sidecar: image kind {kind!r}")
        merged = {**entry, "round": doc.get("round"), "page_size": doc.get("page_size"), "pid": entry.get("id"),
                  "inventory_xxh3_128": doc.get("inventory_xxh3_128")}
        info = _info_from(merged, path)
        key = ImageKey(kind, info.stats.pid)
        if key in out or info.pages_id in pages_ids:
            raise ImageError(f"{path}: malformed round sidecar: image {key.kind} {key.id} or pages id "
                             f"{info.pages_id} listed twice")
        out[key] = info
        pages_ids.add(info.pages_id)
    return out


def read_round_info(round_dir: Path) -> RoundInfo | None:
    """The sidecar of the round's first process image, or ``None`` without a sidecar."""
    infos = read_round_infos(round_dir)
    if infos is None:
        return None
    return next((info for key, info in infos.items() if key.kind == "pid"), next(iter(infos.values())))


# === Writing ===========================================================================================


@dataclass(frozen=True, slots=True, eq=False)
class ImageCover:
    """What one image's pagemap covers: the maximal ranges ``[starts[i], ends[i])`` of the union of its
    PE_PRESENT and PE_PARENT runs, the ranges a child's PE_PARENT holes may take.

    A round writer keeps the covers of a committed round in memory so that the next round checks its
    parent holes without reading the parent pagemap back (``RoundWriter.image(parent_cover=...)``).
    ``round_no`` is the round it belongs to, None for a directory outside a session. The arrays are
    read-only.
    """

    round_no: int | None
    key: ImageKey
    starts: U64
    ends: U64

    @classmethod
    def of_pagemap(cls, round_no: int | None, key: ImageKey, pagemap: PagemapArrays, page_size: int) -> ImageCover:
        """The cover of a pagemap's usable (PE_PRESENT or PE_PARENT) entries."""
        usable = (pagemap.flags & np.uint32(PE_PRESENT | PE_PARENT)) != 0
        starts, ends = _union(Runs(pagemap.vaddr[usable], pagemap.nr_pages[usable]), page_size)
        starts.flags.writeable = False
        ends.flags.writeable = False
        return cls(round_no, key, starts, ends)

    @classmethod
    def read(cls, round_dir: Path, round_no: int | None, key: ImageKey, page_size: int) -> ImageCover:
        """The cover of ``round_dir``'s pagemap for ``key``, read from disk."""
        pagemap = read_pagemap(round_dir / key.pagemap_name)
        return cls.of_pagemap(round_no, key, PagemapArrays(pagemap.pages_id, *pagemap.arrays()), page_size)

    def covered(self, starts: U64, ends: U64) -> npt.NDArray[np.bool_]:
        """For each range ``[starts[i], ends[i])``, whether it lies inside the cover."""
        return _covered(starts, ends, self.starts, self.ends)

    def covers(self, start: int, end: int) -> bool:
        """``covered`` for one range, without the arrays (a protocol checks each run as it comes)."""
        i = int(np.searchsorted(self.starts, np.uint64(start), side="right")) - 1
        return i >= 0 and int(self.ends[i]) >= end


class _Entries:
    """Pagemap entries in the order they were added, as three growable columns (no object per entry)."""

    def __init__(self) -> None:
        self.vaddr = array("Q")
        self.nr_pages = array("Q")
        self.flags = array("I")

    def __len__(self) -> int:
        return len(self.vaddr)

    def add(self, vaddr: int, nr_pages: int, flags: int) -> None:
        self.vaddr.append(vaddr)
        self.nr_pages.append(nr_pages)
        self.flags.append(flags)

    def extend(self, runs: Runs, flags: int) -> None:
        self.vaddr.frombytes(np.asarray(runs.vaddr, np.uint64).tobytes())
        self.nr_pages.frombytes(np.asarray(runs.nr_pages, np.uint64).tobytes())
        self.flags.frombytes(np.full(len(runs), flags, np.uint32).tobytes())

    def arrays(self) -> tuple[U64, U64, npt.NDArray[np.uint32]]:
        return np.array(self.vaddr, np.uint64), np.array(self.nr_pages, np.uint64), np.array(self.flags, np.uint32)


class FinishedImage(NamedTuple):
    """What :meth:`ImageWriter.finish` wrote: the pagemap, the zero runs (merged) and, with digests,
    the file digests for the sidecar (the inventory's is filled in by the round)."""

    pagemap: PagemapArrays
    zero_runs: Runs
    files: RoundFiles | None


# Run kinds in the order a round's runs are sorted and named when two overlap.
_RUN_KINDS: Final = ("present", "parent hole", "zero", "lazy")


class ImageWriter:
    """One memory image being written into a round writer's hidden directory: ``pages-ID.img`` as the
    pages arrive, then at :meth:`finish` its pagemap (``pagemap-*.img``); the round writer's commit
    fsyncs them. Made by :meth:`RoundWriter.image` or :meth:`DumpDirWriter.image`. Not thread-safe: one task
    drives a writer.

    Runs come two ways, which may mix: in batches (``append_pages`` for pages in ascending order,
    ``add_parent_holes`` and ``add_zero_runs`` in any order), as the gRPC receiver gets them, or one
    pagemap entry at a time in address order (``add_run``, then ``write_pages`` for a PE_PRESENT
    run's data), as CRIU's page server gets them. ``finish`` checks them against each other
    (no overlaps) and PE_PARENT holes against the parent's cover, then sorts them into the pagemap.

    With ``digests`` the writer also records each page's xxh3_64 in ``pages-ID.xxh3`` (buffered,
    written every ``_DIGEST_FLUSH_PAGES`` pages) and the xxh3-128 of the pages file, for the
    sidecar. With ``merge`` touching entries of the same flags become one; without, the pagemap
    has one entry per run, as CRIU's ``write_pagemap_loc`` writes it.
    """

    def __init__(self, directory: Path, key: ImageKey, pages_id: int, page_size: int, *, digests: bool,
                 merge: bool, parent_dir: Path | None, parent_cover: ImageCover | None) -> None:
        """``parent_dir`` is where the parent images are (None: no parent, PE_PARENT is refused);
        ``parent_cover`` this image's cover there if known, else it is read from ``parent_dir``
        when a hole needs it."""
        self.directory = directory
        self.key = key
        self.pages_id = pages_id
        self.page_size = page_size
        self.merge = merge
        self.parent_dir = parent_dir
        self._parent_cover = parent_cover
        self.pages_path = directory / pages_name(pages_id)
        self.page_digests_path = directory / page_digests_name(pages_id) if digests else None
        self._state: Literal["open", "finished", "failed", "aborted"] = "open"
        self._entries = _Entries()
        self._zeros: list[Runs] = []
        self._next_vaddr = 0
        self._pending = 0  # bytes of PE_PRESENT runs added and not yet written
        self._offset = 0
        self._pages_parent = 0
        self._pages_zero = 0
        self._digest = xxhash.xxh3_128()
        self._page_digests: list[U64] = []  # not yet written to pages-ID.xxh3
        self._page_digests_pending = 0
        self._page_digests_offset = 0
        self._page_digests_digest = xxhash.xxh3_128()
        self._finished: FinishedImage | None = None
        self._fd: int | None = None
        self._digests_fd: int | None = None
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            self._fd = os.open(self.pages_path, flags, 0o600)
            if self.page_digests_path is not None:
                self._digests_fd = os.open(self.page_digests_path, flags, 0o600)
        except OSError as err:
            self._close_files()
            self._state = "aborted"
            raise ImageError(f"{directory}: cannot create the files of {key.pagemap_name}: {err.strerror}") from err

    # --- counters ---

    @property
    def pages_written(self) -> int:
        return self._offset // self.page_size

    @property
    def bytes_written(self) -> int:
        return self._offset

    @property
    def pages_zero(self) -> int:
        return self._pages_zero

    @property
    def pages_skipped_parent(self) -> int:
        return self._pages_parent

    @property
    def pages_xxh3_128(self) -> str:
        """The xxh3-128 of the pages written so far (with ``digests``)."""
        return self._digest.hexdigest()

    @property
    def runs_added(self) -> int:
        """Pagemap entries added so far (before any merging)."""
        return len(self._entries)

    @property
    def next_vaddr(self) -> int:
        """The end of the last run added in address order (``add_run``, ``append_pages``)."""
        return self._next_vaddr

    @property
    def has_parent(self) -> bool:
        return self.parent_dir is not None

    # --- adding runs ---

    def _require_open(self) -> int:
        if self._state != "open" or self._fd is None:
            raise ImageError(f"{self.directory}: the writer of {self.key.pagemap_name} is {self._state}")
        return self._fd

    def _require_no_pending(self, vaddr: int) -> None:
        if self._pending:
            raise ImageError(f"{at_offset(self.pages_path, self._offset)}: run at {vaddr:#x} added before the "
                             f"{self._pending} bytes of page data still due")

    def _require_parent(self, runs: int) -> None:
        if self.parent_dir is None:
            raise ImageError(f"{self.directory}: {self.key.pagemap_name} has no parent to hold {runs} parent holes")

    def add_run(self, vaddr: int, nr_pages: int, flags: int) -> None:
        """One pagemap entry, at or above the end of the one before. The pages of a PE_PRESENT run
        are due next, through :meth:`write_pages`."""
        self._require_open()
        self._require_no_pending(vaddr)
        where = f"{self.directory / self.key.pagemap_name}"
        if flags not in VALID_PE_FLAGS:
            raise ImageError(f"{where}: run at {vaddr:#x} has flags {flags:#x}")
        if vaddr < 0 or vaddr % self.page_size or nr_pages <= 0 or vaddr + nr_pages * self.page_size > U64_MAX + 1:
            raise ImageError(f"{where}: run {vaddr:#x}+{nr_pages} is empty, not page-aligned or wraps the "
                             "address space")
        if vaddr < self._next_vaddr:
            raise ImageError(f"{where}: run at {vaddr:#x} is below the end of earlier runs ({self._next_vaddr:#x})")
        if flags == PE_PARENT:
            self._require_parent(1)
            self._pages_parent += nr_pages
        self._entries.add(vaddr, nr_pages, flags)
        self._next_vaddr = vaddr + nr_pages * self.page_size
        if flags & PE_PRESENT:
            self._pending = nr_pages * self.page_size

    def append_pages(self, runs: Runs, data: bytes | bytearray | memoryview) -> None:
        """Append the pages of ``runs`` (ascending, above earlier ones); ``data`` is their bytes in order."""
        self._require_open()
        where = at_offset(self.pages_path, self._offset)
        _check_runs(runs, self.page_size, "present", where, ordered=True)
        view = memoryview(data).cast("B")
        expected = runs.total_pages * self.page_size
        if view.nbytes != expected:
            raise ImageError(f"{where}: {view.nbytes} bytes of data for {runs.total_pages} pages "
                             f"({expected} bytes)")
        if len(runs) == 0:
            return
        first = int(runs.vaddr[0])
        self._require_no_pending(first)
        if first < self._next_vaddr:
            raise ImageError(f"{where}: run at {first:#x} is below the end of earlier pages "
                             f"({self._next_vaddr:#x}); pages must be appended in ascending address order")
        self._entries.extend(runs, PE_PRESENT)
        self._next_vaddr = int(runs.ends(self.page_size)[-1])
        self._pending = expected
        self.write_pages(view)

    def write_pages(self, data: bytes | bytearray | memoryview) -> None:
        """Write whole pages of the PE_PRESENT runs added, in order; a run's data may come in parts."""
        fd = self._require_open()
        view = memoryview(data).cast("B")
        if view.nbytes > self._pending or view.nbytes % self.page_size:
            raise ImageError(f"{at_offset(self.pages_path, self._offset)}: {view.nbytes} bytes of page data, "
                             f"{self._pending} due in whole pages")
        try:
            write_all(fd, view, self.pages_path, self._offset)
        except ImageError:
            self._state = "failed"  # the file now holds part of this data; only abort() is left
            raise
        self._pending -= view.nbytes
        self._offset += view.nbytes
        if self.page_digests_path is not None:
            self._digest.update(view)
            self._page_digests.append(page_digest.page_digests(view, self.page_size))
            self._page_digests_pending += view.nbytes // self.page_size
            if self._page_digests_pending >= _DIGEST_FLUSH_PAGES:
                self._flush_page_digests()

    def _flush_page_digests(self) -> None:
        """Write the buffered per-page digests to pages-ID.xxh3."""
        if not self._page_digests:
            return
        assert self._digests_fd is not None
        assert self.page_digests_path is not None
        data = b"".join(page_digest.to_bytes(d) for d in self._page_digests)
        try:
            write_all(self._digests_fd, memoryview(data), self.page_digests_path, self._page_digests_offset)
        except ImageError:
            self._state = "failed"
            raise
        self._page_digests_digest.update(data)
        self._page_digests_offset += len(data)
        self._page_digests.clear()
        self._page_digests_pending = 0

    def add_parent_holes(self, runs: Runs) -> None:
        """Record PE_PARENT ranges (any order): pages unchanged since the parent round."""
        self._require_open()
        self._require_parent(len(runs))
        _check_runs(runs, self.page_size, "parent hole", f"{self.directory}", ordered=False)
        self._entries.extend(runs, PE_PARENT)
        self._pages_parent += runs.total_pages

    def add_zero_runs(self, runs: Runs) -> None:
        """Record zero pages. They stay out of the pagemap (absent anonymous pages restore as zero)."""
        self._require_open()
        _check_runs(runs, self.page_size, "zero", f"{self.directory}", ordered=False)
        self._zeros.append(runs)
        self._pages_zero += runs.total_pages

    def sync_data(self) -> None:
        """Make the pages written so far, and their digests, durable (before acknowledging them)."""
        fd = self._require_open()
        self._flush_page_digests()
        for sync_fd, path in ((fd, self.pages_path), (self._digests_fd, self.page_digests_path)):
            if sync_fd is None:
                continue
            try:
                os.fdatasync(sync_fd)
            except OSError as err:
                self._state = "failed"
                raise ImageError(f"{path}: fdatasync failed: {err.strerror}") from err

    def parent_cover(self) -> ImageCover:
        """This image's cover in the parent: the one given, or read from the parent's pagemap once."""
        if self._parent_cover is None:
            if self.parent_dir is None:
                raise ImageError(f"{self.directory}: {self.key.pagemap_name} has no parent")
            parent_path = self.parent_dir / self.key.pagemap_name
            if self.parent_dir.is_dir() and not parent_path.exists():
                raise ImageError(f"{self.directory}: parent holes for {self.key.kind} {self.key.id}, but the parent "
                                 f"round {self._parent_name()} has no {self.key.pagemap_name}")
            self._parent_cover = ImageCover.read(self.parent_dir, None, self.key, self.page_size)
        return self._parent_cover

    def _parent_name(self) -> str:
        assert self.parent_dir is not None
        return os.readlink(self.parent_dir) if self.parent_dir.is_symlink() else str(self.parent_dir)

    # --- the end ---

    def _validate(self) -> tuple[PagemapArrays, Runs]:
        """Check the runs against each other and the parent; return the pagemap and the merged zero runs."""
        ps = self.page_size
        e_vaddr, e_nr, e_flags = self._entries.arrays()
        zeros = Runs.concat(self._zeros)
        in_parent = e_flags == np.uint32(PE_PARENT)
        kind = np.where((e_flags & np.uint32(PE_PRESENT)) != 0, 0, np.where(in_parent, 1, 3))
        vaddr = np.concatenate([e_vaddr, zeros.vaddr])
        nr_pages = np.concatenate([e_nr, zeros.nr_pages])
        kind = np.concatenate([kind, np.full(len(zeros), 2)])
        order = np.lexsort((kind, vaddr))  # stable: runs of one kind at one address keep their order
        vaddr, nr_pages, kind = vaddr[order], nr_pages[order], kind[order]
        ends = vaddr + nr_pages * np.uint64(ps)
        bad = np.flatnonzero(ends[:-1] > vaddr[1:])
        if bad.size:
            i = int(bad[0])
            raise ImageError(
                f"{self.directory}: {_RUN_KINDS[int(kind[i])]} run {int(vaddr[i]):#x}+{int(nr_pages[i])} overlaps "
                f"{_RUN_KINDS[int(kind[i + 1])]} run {int(vaddr[i + 1]):#x}+{int(nr_pages[i + 1])}")
        if in_parent.any():
            self._check_holes_in_parent(Runs(e_vaddr[in_parent], e_nr[in_parent]))
        # Ascending and disjoint; present data sits in the pages file in the same ascending order, so
        # touching present runs merge without moving any byte.
        order = order[order < e_vaddr.size]
        pm_vaddr, pm_nr, pm_flags = e_vaddr[order], e_nr[order], e_flags[order]
        if self.merge:
            pm_vaddr, pm_nr, pm_flags = _merge_touching(pm_vaddr, pm_nr, pm_flags, ps)
        return PagemapArrays(self.pages_id, pm_vaddr, pm_nr, pm_flags), zeros.sorted().merged(ps)

    def _check_holes_in_parent(self, holes: Runs) -> None:
        """Every hole must lie inside the parent's pagemap ranges (CRIU ``check_pagehole_in_parent``)."""
        bad = np.flatnonzero(~self.parent_cover().covered(holes.vaddr, holes.ends(self.page_size)))
        if bad.size:
            i = int(bad[0])
            raise ImageError(f"{self.directory}: parent hole {int(holes.vaddr[i]):#x}+{int(holes.nr_pages[i])} "
                             f"not found in parent {self._parent_name()} pagemap "
                             f"({bad.size} of {len(holes)} holes uncovered)")

    def finish(self) -> FinishedImage:
        """Check the runs, write the pagemap and close the image's files (the same result when called
        again); nothing is fsynced yet (the round writer's commit does, after finishing every image
        still open). Finishing early frees the files of an image that is complete."""
        if self._finished is not None:
            return self._finished
        self._require_open()
        if self._pending:
            raise ImageError(f"{at_offset(self.pages_path, self._offset)}: {self._pending} bytes of page "
                             "data still due")
        try:
            pagemap, zeros = self._validate()
            self._flush_page_digests()
            pagemap_bytes = encode_pagemap_arrays(pagemap.pages_id, pagemap.vaddr, pagemap.nr_pages, pagemap.flags)
            files = None if self.page_digests_path is None else RoundFiles(
                pagemap_xxh3_128=xxhash.xxh3_128_hexdigest(pagemap_bytes),
                inventory_xxh3_128="",
                page_digests_name=self.page_digests_path.name,
                page_digests_xxh3_128=self._page_digests_digest.hexdigest())
            _create_file(self.directory / self.key.pagemap_name, pagemap_bytes, sync=False)
        except ImageError:
            self._state = "failed"
            raise
        self._close_files()
        self._state = "finished"
        self._finished = FinishedImage(pagemap, zeros, files)
        return self._finished

    @property
    def paths(self) -> tuple[Path, ...]:
        """The image's files: pages, per-page digests (with ``digests``), pagemap."""
        digests = () if self.page_digests_path is None else (self.page_digests_path,)
        return (self.pages_path, *digests, self.directory / self.key.pagemap_name)

    def _close_files(self) -> None:
        """Close the pages and digest files (both, even if the first close fails)."""
        fd, digests_fd = self._fd, self._digests_fd
        self._fd = self._digests_fd = None
        try:
            if fd is not None:
                os.close(fd)
        finally:
            if digests_fd is not None:
                os.close(digests_fd)

    def _fail(self) -> None:
        if self._state in ("open", "finished"):
            self._state = "failed"

    def abort(self) -> None:
        """Close the files; what was written is left to the round writer to remove."""
        if self._state != "finished":
            self._state = "aborted"
        self._page_digests.clear()
        try:
            self._close_files()
        except OSError as err:
            log.warning("closing image files failed dir=%s image=%s error=%s", self.directory,
                        self.key.pagemap_name, err)


class _Staging:
    """Images written into a hidden directory and made visible together on commit: what the round
    writers share. Not thread-safe."""

    def __init__(self, tmp_dir: Path, page_size: int) -> None:
        self.tmp_dir = tmp_dir
        self.page_size = page_size
        self._images: list[ImageWriter] = []
        self._keys: set[ImageKey] = set()
        self._state: Literal["open", "committed", "failed", "aborted"] = "open"

    @property
    def images(self) -> Sequence[ImageWriter]:
        """The image writers, in the order they were added."""
        return self._images

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._state != "committed":
            self.abort()

    def _require_open(self) -> None:
        if self._state != "open":
            raise ImageError(f"{self.tmp_dir}: round writer is {self._state}")

    def _add_image(self, key: ImageKey, pages_id: int, *, digests: bool, merge: bool, parent_dir: Path | None,
                   parent_cover: ImageCover | None) -> ImageWriter:
        self._require_open()
        if key in self._keys:
            raise ImageError(f"{self.tmp_dir}: already has image {key.kind} {key.id}")
        writer = ImageWriter(self.tmp_dir, key, pages_id, self.page_size, digests=digests, merge=merge,
                             parent_dir=parent_dir, parent_cover=parent_cover)
        self._images.append(writer)
        self._keys.add(key)
        return writer

    def _finish_images(self) -> list[FinishedImage]:
        """Finish every image (those finished before return what they wrote) and fsync its files."""
        self._require_open()
        done = [w.finish() for w in self._images]
        for w in self._images:
            for path in w.paths:
                fsync_file(path)
        return done

    def _fail(self) -> None:
        self._state = "failed"
        for w in self._images:
            w._fail()

    def abort(self) -> None:
        """Remove everything written (the hidden directory). Idempotent; does nothing once committed."""
        if self._state == "committed":
            return
        self._state = "aborted"
        for w in self._images:
            w.abort()
        try:
            shutil.rmtree(self.tmp_dir)
        except FileNotFoundError:
            pass
        except OSError as err:
            log.warning("removing aborted images failed dir=%s error=%s", self.tmp_dir, err)


class RoundWriter(_Staging):
    """Builds one round directory out of sight and makes it appear, complete and durable, on ``commit``.

    The work goes into ``SESSION/.round-N.tmp-XXXXXX/``, and ``round-N`` appears only through the
    final rename. A reader, CRIU included, never sees a half-written round. Each image (:meth:`image`)
    has its own pages file, ``pages-1.img`` for the first, then 2, 3, ..., with its per-page digests
    beside it, and touching pagemap entries merged.
    """

    def __init__(self, session_dir: Path, round_no: int, page_size: int, parent: str | None) -> None:
        """``parent`` is the relative link to the parent round (``parent_link``), None for none."""
        if round_no < 0 or page_size <= 0 or page_size & (page_size - 1):
            raise ImageError(f"{session_dir}: bad round parameters round={round_no} page_size={page_size}")
        if parent is not None and (os.path.isabs(parent) or not parent or "\0" in parent):
            # CRIU warns that absolute parent links may not work on restore (the images move).
            raise ImageError(f"{session_dir}: parent link {parent!r} must be a relative path")
        if parent is not None and round_no == 0:
            raise ImageError(f"{session_dir}: round 0 cannot have a parent")
        self.session_dir = session_dir
        self.round_no = round_no
        self.parent = parent
        self.final_dir = session_dir / round_dir_name(round_no)
        if os.path.lexists(self.final_dir):
            raise ImageError(f"{self.final_dir}: round already exists")
        try:
            tmp_dir = Path(tempfile.mkdtemp(prefix=f".{round_dir_name(round_no)}.tmp-", dir=session_dir))
        except OSError as err:
            raise ImageError(f"{session_dir}: cannot create round directory: {err.strerror}") from err
        super().__init__(tmp_dir, page_size)
        self._covers: dict[ImageKey, ImageCover] = {}
        if parent is not None:
            try:
                os.symlink(parent, tmp_dir / PARENT_LINK)
            except OSError as err:
                self.abort()
                raise ImageError(f"{tmp_dir}: cannot set up round: {err.strerror}") from err

    def image(self, key: ImageKey, *, parent_cover: ImageCover | None = None) -> ImageWriter:
        """Add an image (a process, or a shared-memory object) to the round.

        ``parent_cover`` is the parent round's cover of this image, kept from its commit (:attr:`covers`).
        It is used only when it is this image's and round ``round_no - 1``'s and the parent is the usual
        link to that round (``parent_link``); otherwise parent holes are checked against the parent's
        pagemap on disk.
        """
        if key.id < 0 or (key.kind == "pid" and key.id == 0):
            raise ImageError(f"{self.tmp_dir}: bad image {key.kind} {key.id}")
        trusted = parent_cover if (
            parent_cover is not None and parent_cover.key == key and parent_cover.round_no == self.round_no - 1
            and self.parent is not None and self.parent == parent_link(self.round_no)) else None
        return self._add_image(key, len(self._images) + 1, digests=True, merge=True,
                               parent_dir=self.tmp_dir / PARENT_LINK if self.parent is not None else None,
                               parent_cover=trusted)

    @property
    def covers(self) -> dict[ImageKey, ImageCover]:
        """What each image's pagemap covers, once the round is committed (empty before): the next
        round's ``parent_cover``."""
        return dict(self._covers)

    def _image_stats(self, w: ImageWriter) -> RoundStats:
        return RoundStats(round_no=self.round_no, pid=w.key.id, page_size=self.page_size,
                          pages_written=w.pages_written, pages_zero=w.pages_zero,
                          pages_skipped_parent=w.pages_skipped_parent, bytes_written=w.bytes_written,
                          pages_xxh3_128=w.pages_xxh3_128)

    @property
    def stats(self) -> RoundStats:
        """The round's counters over all its images (with one image: its own); final after ``commit``."""
        if not self._images:
            raise ImageError(f"{self.tmp_dir}: round {self.round_no} has no image")
        parts = [self._image_stats(w) for w in self._images]
        if len(parts) == 1:
            return parts[0]
        return dataclasses.replace(
            parts[0], pages_written=sum(p.pages_written for p in parts), pages_zero=sum(p.pages_zero for p in parts),
            pages_skipped_parent=sum(p.pages_skipped_parent for p in parts),
            bytes_written=sum(p.bytes_written for p in parts))

    def commit(self, inventory: InventoryEntry) -> Path:
        """Finish every image, write the inventory and the sidecar, fsync, and rename into ``round-N``.

        A round of one process image gets the version 1 sidecar; rounds with more images (or a
        shared-memory one) get version 2.
        """
        self._require_open()
        if not self._images:
            raise ImageError(f"{self.tmp_dir}: round {self.round_no} has no image")
        try:
            done = self._finish_images()
            inventory_bytes = encode_inventory(inventory)
            inventory_digest = xxhash.xxh3_128_hexdigest(inventory_bytes)
            _create_file(self.tmp_dir / INVENTORY_NAME, inventory_bytes)
            parts = []
            for w, finished in zip(self._images, done, strict=True):
                assert finished.files is not None
                files = dataclasses.replace(finished.files, inventory_xxh3_128=inventory_digest)
                parts.append((w.key, self._image_stats(w), w.pages_id, finished.zero_runs, files))
            if len(parts) == 1 and parts[0][0].kind == "pid":
                _, stats, pages_id, zeros, files = parts[0]
                sidecar = _sidecar_json(stats, pages_id, zeros, files)
            else:
                sidecar = _sidecar_images_json(self.round_no, self.page_size, inventory_digest, parts)
            _create_file(self.tmp_dir / SIDECAR_NAME, sidecar)
            fsync_dir(self.tmp_dir)
            _rename_dir_noreplace(self.tmp_dir, self.final_dir)
        except ImageError:
            self._fail()
            raise
        self._state = "committed"
        for w, finished in zip(self._images, done, strict=True):
            pagemap = finished.pagemap
            self._covers[w.key] = ImageCover.of_pagemap(self.round_no, w.key, pagemap, self.page_size)
            log.info("round committed round=%d image=%s:%d dir=%s entries=%d pages_written=%d pages_zero=%d "
                     "pages_skipped_parent=%d", self.round_no, w.key.kind, w.key.id, self.final_dir,
                     pagemap.vaddr.size, w.pages_written, w.pages_zero, w.pages_skipped_parent)
        fsync_dir(self.session_dir)
        return self.final_dir


class DumpDirWriter(_Staging):
    """The memory images CRIU's page server would write into a directory ``criu dump`` writes into:
    a pagemap and a pages file per image, pages ids chosen by the caller, one pagemap entry per run,
    nothing of pagehaul's own. They are written into a hidden ``PREFIX*`` directory inside it and
    linked into place on :meth:`commit`, never replacing a file.
    """

    def __init__(self, images_dir: Path, page_size: int, *, prefix: str) -> None:
        try:
            tmp_dir = Path(tempfile.mkdtemp(prefix=prefix, dir=images_dir))
        except OSError as err:
            raise ImageError(f"{images_dir}: cannot create a session directory: {err.strerror}") from err
        super().__init__(tmp_dir, page_size)
        self.images_dir = images_dir

    def image(self, key: ImageKey, pages_id: int, *, parent_cover: ImageCover | None) -> ImageWriter:
        """Add an image; ``parent_cover`` is its cover in the directory's ``parent`` (None: no parent)."""
        return self._add_image(key, pages_id, digests=False, merge=False,
                               parent_dir=self.images_dir / PARENT_LINK if parent_cover is not None else None,
                               parent_cover=parent_cover)

    def commit(self) -> None:
        """Finish every image, then link pages files and then pagemaps into the images directory.

        ``link`` fails with EEXIST instead of replacing a file, atomically. On any failure the
        links made so far are removed again, so the directory is as it was.
        """
        try:
            self._finish_images()
            names = [pages_name(w.pages_id) for w in self._images] + [w.key.pagemap_name for w in self._images]
            linked: list[Path] = []
            try:
                for name in names:
                    dst = self.images_dir / name
                    try:
                        os.link(self.tmp_dir / name, dst)
                    except FileExistsError as err:
                        raise ImageError(f"{dst} already exists; images in a dump directory are never replaced") \
                            from err
                    except OSError as err:
                        raise ImageError(f"{dst}: cannot link into place: {err.strerror}") from err
                    linked.append(dst)
                fsync_dir(self.images_dir)
            except BaseException:
                for path in linked:
                    with contextlib.suppress(OSError):
                        path.unlink()
                raise
        except ImageError:
            self._fail()
            raise
        self._state = "committed"
        shutil.rmtree(self.tmp_dir, ignore_errors=True)


# === Reading a round and its parents ===================================================================


class ImageSet:
    """One round's memory image (pagemap-PID.img plus pages-ID.img) and, through ``parent``, its ancestors.

    Made by ``open_round``. Reads follow PE_PARENT entries down the chain the way CRIU's
    ``read_parent_page`` does: a range may split across several shorter parent entries, which may
    themselves be PE_PARENT. Entries are found with ``searchsorted``; data is read with
    ``preadv`` straight into the result, one call per entry touched.
    """

    def __init__(self, round_dir: Path, pid: int, page_size: int, parent: ImageSet | None, *,
                 shmem: bool = False) -> None:
        self.round_dir = round_dir
        self.pid = pid
        self.key = ImageKey("shmem" if shmem else "pid", pid)
        self.page_size = page_size
        self.parent = parent
        self.pagemap_path = round_dir / self.key.pagemap_name
        self.pagemap = read_pagemap(self.pagemap_path)
        infos = read_round_infos(round_dir)
        self.info = infos.get(self.key) if infos is not None else None
        if infos is not None and self.info is None:
            raise ImageError(f"{round_dir / SIDECAR_NAME}: no entry for {self.key.pagemap_name}")
        self.pages_path = round_dir / pages_name(self.pagemap.pages_id)
        self._zero_starts, self._zero_ends = _union(self.zero_runs(), page_size)
        self._vaddr, self._nr, self._flags = self.pagemap.arrays()
        ps = np.uint64(page_size)
        self._ends = self._vaddr + self._nr * ps
        self._validate()
        present_nr = np.where((self._flags & np.uint32(PE_PRESENT)) != 0, self._nr, np.uint64(0))
        cum = np.cumsum(present_nr, dtype=np.uint64)
        self._data_off = (cum - present_nr) * ps
        self.data_bytes = int(cum[-1]) * page_size if cum.size else 0
        try:
            self._fd = os.open(self.pages_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise ImageError(f"{self.pages_path}: cannot open pages: {err.strerror}") from err
        size = os.fstat(self._fd).st_size
        if size != self.data_bytes:
            os.close(self._fd)
            raise ImageError(f"{self.pages_path}: {size} bytes, but the pagemap has "
                             f"{self.data_bytes // page_size} present pages ({self.data_bytes} bytes)")

    def _validate(self) -> None:
        where = f"{self.pagemap_path}"
        _check_runs(Runs(self._vaddr, self._nr), self.page_size, "pagemap", where, ordered=True)
        bad = np.flatnonzero(~np.isin(self._flags, np.fromiter(VALID_PE_FLAGS, np.uint32)))
        if bad.size:
            i = int(bad[0])
            raise ImageError(f"{where}: entry {int(self._vaddr[i]):#x} has flags {int(self._flags[i]):#x}")
        in_parent = (self._flags & np.uint32(PE_PARENT)) != 0
        if in_parent.any():
            if self.parent is None:
                raise ImageError(f"{where}: PE_PARENT entries but no parent round")
            # The writer-side invariant (``check_pagehole_in_parent``), one level down; the parent was
            # checked against its own parent when it was opened.
            p = self.parent
            usable = (p._flags & np.uint32(PE_PRESENT | PE_PARENT)) != 0
            cov_s, cov_e = _union(Runs(p._vaddr[usable], p._nr[usable]), self.page_size)
            bad = np.flatnonzero(~_covered(self._vaddr[in_parent], self._ends[in_parent], cov_s, cov_e))
            if bad.size:
                i = int(np.flatnonzero(in_parent)[bad[0]])
                raise ImageError(f"{where}: PE_PARENT entry {int(self._vaddr[i]):#x}+{int(self._nr[i])} "
                                 f"not found in parent {p.pagemap_path}")
        if self.info is not None:
            st = self.info.stats
            ours = (self.pid, self.page_size, self.pagemap.pages_id)
            if (st.pid, st.page_size, self.info.pages_id) != ours:
                raise ImageError(f"{self.round_dir / SIDECAR_NAME}: sidecar says pid={st.pid} page_size="
                                 f"{st.page_size} pages_id={self.info.pages_id}, reading pid={self.pid} "
                                 f"page_size={self.page_size} pages_id={self.pagemap.pages_id}")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close this round's pages file and the whole parent chain's."""
        node: ImageSet | None = self
        while node is not None:
            if node._fd >= 0:
                os.close(node._fd)
                node._fd = -1
            node = node.parent

    def present_runs(self) -> Runs:
        """Pages this round restores, held here (PE_PRESENT) or inherited (PE_PARENT), merged."""
        mask = (self._flags & np.uint32(PE_PRESENT | PE_PARENT)) != 0
        return Runs(self._vaddr[mask], self._nr[mask]).merged(self.page_size)

    def zero_runs(self) -> Runs:
        """Pages the sender reported as zero in this round (from the sidecar; empty without one)."""
        return self.info.zero_runs if self.info is not None else Runs.empty()

    def read_range(self, vaddr: int, nr_pages: int, *, absent_as_zero: bool = False) -> bytes:
        """The bytes of ``nr_pages`` pages at ``vaddr`` as CRIU would restore them from this round.

        Pages must be in the pagemap, directly or through parents, or be among this round's zero runs.
        With ``absent_as_zero`` every other page reads as zero, the way an anonymous page missing from
        the pagemap restores; otherwise such a page is an ImageError.
        """
        if vaddr % self.page_size or nr_pages < 0 or vaddr < 0:
            raise ImageError(f"{self.round_dir}: bad read range {vaddr:#x}+{nr_pages}")
        out = bytearray(nr_pages * self.page_size)
        self._fill(memoryview(out), vaddr, known_zero=True, absent_as_zero=absent_as_zero)
        return bytes(out)

    def _fill(self, out: memoryview, vaddr: int, *, known_zero: bool, absent_as_zero: bool) -> None:
        end = vaddr + out.nbytes
        lo = max(int(np.searchsorted(self._vaddr, vaddr, side="right")) - 1, 0)
        hi = int(np.searchsorted(self._vaddr, end, side="left"))
        cursor = vaddr
        for i in range(lo, hi):
            e_start, e_end = int(self._vaddr[i]), int(self._ends[i])
            if e_end <= cursor:
                continue
            if e_start > cursor:
                self._absent(cursor, e_start, known_zero=known_zero, absent_as_zero=absent_as_zero)
                cursor = e_start
            seg_end = min(e_end, end)
            dst = out[cursor - vaddr:seg_end - vaddr]
            flags = int(self._flags[i])
            if flags & PE_PARENT:
                assert self.parent is not None  # checked when opened
                # A parent's pages must be in its pagemap; its zero runs do not count (as on restore).
                self.parent._fill(dst, cursor, known_zero=False, absent_as_zero=False)
            elif flags & PE_PRESENT:
                read_exact(self._fd, dst, int(self._data_off[i]) + cursor - e_start, self.pages_path)
            else:
                raise ImageError(f"{self.pagemap_path}: pages {cursor:#x}..{seg_end:#x} are lazy, "
                                 "not in the image")
            cursor = seg_end
        if cursor < end:
            self._absent(cursor, end, known_zero=known_zero, absent_as_zero=absent_as_zero)

    def _absent(self, start: int, end: int, *, known_zero: bool, absent_as_zero: bool) -> None:
        """Pages outside the pagemap: left zero if allowed, else an error."""
        if absent_as_zero:
            return
        if known_zero and _covered(np.array([start], np.uint64), np.array([end], np.uint64),
                                   self._zero_starts, self._zero_ends)[0]:
            return
        raise ImageError(f"{self.pagemap_path}: pages {start:#x}..{end:#x} are not in the pagemap")

    def check_digest(self) -> None:
        """Compare pages-ID.img with the sidecar's xxh3-128 digest (no-op without a sidecar)."""
        if self.info is None:
            return
        digest = xxhash.xxh3_128()
        buf = bytearray(_IO_CHUNK)
        offset = 0
        while True:
            n = os.preadv(self._fd, [buf], offset)
            if n == 0:
                break
            digest.update(memoryview(buf)[:n])
            offset += n
        if digest.hexdigest() != self.info.stats.pages_xxh3_128:
            raise ImageError(f"{self.pages_path}: xxh3-128 {digest.hexdigest()} does not match the sidecar's "
                             f"{self.info.stats.pages_xxh3_128}")


def open_round(round_dir: Path, pid: int, page_size: int = PAGE_SIZE, *, shmem: bool = False) -> ImageSet:
    """Open a round and every ancestor reachable through ``parent`` links (for one image: process
    ``pid``, or with ``shmem`` the shared-memory object ``pid``)."""
    chain: list[Path] = []
    seen: set[str] = set()
    current: Path | None = round_dir
    while current is not None:
        real = os.path.realpath(current)
        if real in seen:
            raise ImageError(f"{current}: parent links form a loop")
        seen.add(real)
        chain.append(current)
        link = current / PARENT_LINK
        if os.path.islink(link):
            if not os.path.isdir(link):
                raise ImageError(f"{link}: parent round {os.readlink(link)!r} is missing")
            # An image new in this round (a process born or a mapping made since) has no parent: its
            # chain ends here, and its pagemap may not have PE_PARENT entries (checked when opened).
            key = ImageKey("shmem" if shmem else "pid", pid)
            current = link if os.path.lexists(link / key.pagemap_name) else None
        else:
            current = None
    opened: list[ImageSet] = []
    node: ImageSet | None = None
    try:
        for path in reversed(chain):
            node = ImageSet(path, pid, page_size, node, shmem=shmem)
            opened.append(node)
    except BaseException:
        if opened:
            opened[-1].close()
        raise
    assert node is not None
    return node




def iter_chain(images: ImageSet) -> Iterator[ImageSet]:
    """The round itself, then its parent, grandparent, and so on."""
    node: ImageSet | None = images
    while node is not None:
        yield node
        node = node.parent

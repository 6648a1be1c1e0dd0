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
* writing: :class:`RoundWriter`, a round built out of sight and renamed into place on commit;
* reading: :class:`ImageSet` and ``open_round``, a round and its parents as CRIU restores them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import mmap
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, Self

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


def _create_file(path: Path, data: bytes) -> None:
    """Write a new file (never replacing one) and fsync it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as err:
        raise ImageError(f"{path}: cannot create: {err.strerror}") from err
    try:
        write_all(fd, memoryview(data), path, 0)
        os.fsync(fd)
    except OSError as err:
        raise ImageError(f"{path}: fsync failed: {err.strerror}") from err
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """fsync a directory, so a rename or link inside it survives a crash."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        raise ImageError(f"{path}: cannot fsync directory: {err.strerror}") from err


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



# === Writing a round ===================================================================================


@dataclass(frozen=True, slots=True, eq=False)
class ImageCover:
    """What one image of a committed round covers: the maximal ranges ``[starts[i], ends[i])`` of the
    union of its pagemap's runs (all PE_PRESENT or PE_PARENT, as ``RoundWriter`` writes them).

    Kept in memory after a commit so that the next round's writer checks its parent holes without
    reading the parent pagemap back (``RoundWriter(parent_cover=...)``). The arrays are read-only.
    """

    round_no: int
    key: ImageKey
    starts: U64
    ends: U64

    @classmethod
    def of_pagemap(cls, round_no: int, key: ImageKey, pagemap: PagemapArrays, page_size: int) -> ImageCover:
        """The cover of a pagemap's usable (PE_PRESENT or PE_PARENT) entries."""
        usable = (pagemap.flags & np.uint32(PE_PRESENT | PE_PARENT)) != 0
        starts, ends = _union(Runs(pagemap.vaddr[usable], pagemap.nr_pages[usable]), page_size)
        starts.flags.writeable = False
        ends.flags.writeable = False
        return cls(round_no, key, starts, ends)

    @classmethod
    def read(cls, round_dir: Path, round_no: int, key: ImageKey, page_size: int) -> ImageCover:
        """The cover of ``round_dir``'s pagemap for ``key``, read from disk."""
        pagemap = read_pagemap(round_dir / key.pagemap_name)
        return cls.of_pagemap(round_no, key, PagemapArrays(pagemap.pages_id, *pagemap.arrays()), page_size)


class RoundWriter:
    """Builds one round directory out of sight and makes it appear, complete and durable, on ``commit``.

    The work goes into ``SESSION/.round-N.tmp-XXXXXX/``, and ``round-N`` appears only through the
    final rename. A reader, CRIU included, never sees a half-written round. Not thread-safe: one
    task drives a writer.

    Besides the pages, ``append_pages`` records each page's xxh3_64 in ``pages-1.xxh3`` (buffered,
    written every ``_DIGEST_FLUSH_PAGES`` pages), which is fsynced with the pages file and renamed
    into place with the round.
    """

    PAGES_ID: Final = 1  # the first image's pages file; more images of a round take 2, 3, ...

    def __init__(self, session_dir: Path, round_no: int, pid: int, page_size: int,
                 parent: str | None, *, shmem: bool = False, share: RoundWriter | None = None,
                 parent_cover: ImageCover | None = None) -> None:
        """``pid`` (or, with ``shmem``, the shmid) names the image. With ``share``, this writer is one
        more image of ``share``'s round: it writes into the same directory with the next pages id,
        and ``share.commit`` commits it (its own ``commit`` is not called).

        ``parent_cover`` is the parent round's :attr:`cover` of this image, kept from its commit. It
        is used only when it is this image's and round ``round_no - 1``'s and ``parent`` is the usual
        link to that round (``parent_link``); otherwise parent holes are checked against the parent's
        pagemap on disk."""
        if round_no < 0 or pid < 0 or (pid == 0 and not shmem) or page_size <= 0 or page_size & (page_size - 1):
            raise ImageError(f"{session_dir}: bad round parameters round={round_no} pid={pid} "
                             f"page_size={page_size}")
        if parent is not None and (os.path.isabs(parent) or not parent or "\0" in parent):
            # CRIU warns that absolute parent links may not work on restore (the images move).
            raise ImageError(f"{session_dir}: parent link {parent!r} must be a relative path")
        if parent is not None and round_no == 0:
            raise ImageError(f"{session_dir}: round 0 cannot have a parent")
        self.session_dir = session_dir
        self.round_no = round_no
        self.pid = pid
        self.key = ImageKey("shmem" if shmem else "pid", pid)
        self.page_size = page_size
        self.parent = parent
        self.final_dir = session_dir / round_dir_name(round_no)
        self._owner = share
        self._members: list[RoundWriter] = []
        if share is None and os.path.lexists(self.final_dir):
            raise ImageError(f"{self.final_dir}: round already exists")
        self._state: Literal["open", "committed", "failed", "aborted"] = "open"
        self._present: list[Runs] = []
        self._holes: list[Runs] = []
        self._zeros: list[Runs] = []
        self._next_vaddr = 0
        self._offset = 0
        self._digest = xxhash.xxh3_128()
        self._page_digests: list[U64] = []  # not yet written to pages-ID.xxh3
        self._page_digests_pending = 0
        self._page_digests_offset = 0
        self._page_digests_digest = xxhash.xxh3_128()
        self._stats: RoundStats | None = None
        self._cover: ImageCover | None = None
        self._parent_cover = parent_cover if (
            parent_cover is not None and parent_cover.key == self.key and parent_cover.round_no == round_no - 1
            and parent is not None and parent == parent_link(round_no)) else None
        self._fd: int | None = None
        self._digests_fd: int | None = None
        if share is not None:
            share._require_open()
            if share.round_no != round_no or share.page_size != page_size or share.parent != parent:
                raise ImageError(f"{session_dir}: image {self.key} does not belong to round {share.round_no}")
            if any(w.key == self.key for w in (share, *share._members)):
                raise ImageError(f"{session_dir}: round {round_no} already has image {self.key.kind} {pid}")
            self.pages_id = share.PAGES_ID + len(share._members) + 1
            self.tmp_dir: Path = share.tmp_dir
        else:
            self.pages_id = self.PAGES_ID
            try:
                self.tmp_dir = Path(tempfile.mkdtemp(prefix=f".{round_dir_name(round_no)}.tmp-", dir=session_dir))
            except OSError as err:
                raise ImageError(f"{session_dir}: cannot create round directory: {err.strerror}") from err
        self.pages_path = self.tmp_dir / pages_name(self.pages_id)
        self.page_digests_path = self.tmp_dir / page_digests_name(self.pages_id)
        try:
            if parent is not None and share is None:
                os.symlink(parent, self.tmp_dir / PARENT_LINK)
            self._fd = os.open(self.pages_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            self._digests_fd = os.open(self.page_digests_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                       0o600)
        except OSError as err:
            for fd in (self._fd, self._digests_fd):
                if fd is not None:
                    os.close(fd)
            self._fd = self._digests_fd = None
            if share is None:
                shutil.rmtree(self.tmp_dir, ignore_errors=True)
            self._state = "aborted"
            raise ImageError(f"{self.tmp_dir}: cannot set up round: {err.strerror}") from err
        if share is not None:
            share._members.append(self)

    def image(self, image_id: int, *, shmem: bool = False, parent_cover: ImageCover | None = None) -> RoundWriter:
        """One more image (another process, or a shared-memory object) of this round."""
        return RoundWriter(self.session_dir, self.round_no, image_id, self.page_size, self.parent,
                           shmem=shmem, share=self, parent_cover=parent_cover)

    @property
    def cover(self) -> ImageCover | None:
        """What this image's pagemap covers, once the round is committed (None before): the next
        round's ``parent_cover``."""
        return self._cover

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._state != "committed":
            self.abort()

    def _require_open(self) -> int:
        if self._state != "open" or self._fd is None:
            raise ImageError(f"{self.tmp_dir}: round writer is {self._state}")
        return self._fd

    def append_pages(self, runs: Runs, data: bytes | bytearray | memoryview) -> None:
        """Append the pages of ``runs`` (ascending, above earlier ones); ``data`` is their bytes in order."""
        fd = self._require_open()
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
        if first < self._next_vaddr:
            raise ImageError(f"{where}: run at {first:#x} is below the end of earlier pages "
                             f"({self._next_vaddr:#x}); pages must be appended in ascending address order")
        try:
            write_all(fd, view, self.pages_path, self._offset)
        except ImageError:
            self._state = "failed"  # the file now holds part of this batch; only abort() is left
            raise
        self._digest.update(view)
        self._offset += expected
        self._next_vaddr = int(runs.ends(self.page_size)[-1])
        self._present.append(runs)
        self._page_digests.append(page_digest.page_digests(view, self.page_size))
        self._page_digests_pending += runs.total_pages
        if self._page_digests_pending >= _DIGEST_FLUSH_PAGES:
            self._flush_page_digests()

    def _flush_page_digests(self) -> None:
        """Write the buffered per-page digests to pages-1.xxh3."""
        if not self._page_digests:
            return
        assert self._digests_fd is not None
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
        where = f"{self.tmp_dir}"
        if self.parent is None:
            raise ImageError(f"{where}: round {self.round_no} has no parent to hold {len(runs)} parent holes")
        _check_runs(runs, self.page_size, "parent hole", where, ordered=False)
        self._holes.append(runs)

    def add_zero_runs(self, runs: Runs) -> None:
        """Record zero pages. They stay out of the pagemap (absent anonymous pages restore as zero)."""
        self._require_open()
        _check_runs(runs, self.page_size, "zero", f"{self.tmp_dir}", ordered=False)
        self._zeros.append(runs)

    def sync_data(self) -> None:
        """Make the pages appended so far, and their digests, durable (before acknowledging them)."""
        fd = self._require_open()
        self._flush_page_digests()
        for sync_fd, path in ((fd, self.pages_path), (self._digests_fd, self.page_digests_path)):
            assert sync_fd is not None
            try:
                os.fdatasync(sync_fd)
            except OSError as err:
                self._state = "failed"
                raise ImageError(f"{path}: fdatasync failed: {err.strerror}") from err

    @property
    def stats(self) -> RoundStats:
        """Counters so far; final after ``commit``."""
        if self._stats is not None:
            return self._stats
        return RoundStats(
            round_no=self.round_no, pid=self.pid, page_size=self.page_size,
            pages_written=self._offset // self.page_size,
            pages_zero=sum(r.total_pages for r in self._zeros),
            pages_skipped_parent=sum(r.total_pages for r in self._holes),
            bytes_written=self._offset, pages_xxh3_128=self._digest.hexdigest(),
        )

    def _validate(self) -> tuple[PagemapArrays, Runs]:
        """Check the round against itself and its parent; return the pagemap and the merged zero runs."""
        ps = self.page_size
        where = f"{self.tmp_dir}"
        present = Runs.concat(self._present)
        holes = Runs.concat(self._holes)
        zeros = Runs.concat(self._zeros)
        kinds = ("present", "parent hole", "zero")
        parts = (present, holes, zeros)
        vaddr = np.concatenate([p.vaddr for p in parts])
        nr_pages = np.concatenate([p.nr_pages for p in parts])
        kind = np.repeat(np.arange(3), [len(p) for p in parts])
        order = np.argsort(vaddr, kind="stable")
        vaddr, nr_pages, kind = vaddr[order], nr_pages[order], kind[order]
        ends = vaddr + nr_pages * np.uint64(ps)
        bad = np.flatnonzero(ends[:-1] > vaddr[1:])
        if bad.size:
            i = int(bad[0])
            raise ImageError(
                f"{where}: {kinds[int(kind[i])]} run {int(vaddr[i]):#x}+{int(nr_pages[i])} overlaps "
                f"{kinds[int(kind[i + 1])]} run {int(vaddr[i + 1]):#x}+{int(nr_pages[i + 1])}")

        if len(holes):
            self._check_holes_in_parent(holes)

        # Ascending, disjoint; present data sits in pages-1.img in the same ascending order, so touching
        # present runs merge without moving any byte.
        keep = kind < 2
        flags = np.where(kind[keep] == 0, PE_PRESENT, PE_PARENT).astype(np.uint32)
        pm_vaddr, pm_nr, pm_flags = _merge_touching(vaddr[keep], nr_pages[keep], flags, ps)
        zero_sorted = zeros.sorted()
        return PagemapArrays(self.pages_id, pm_vaddr, pm_nr, pm_flags), zero_sorted.merged(ps)

    def _check_holes_in_parent(self, holes: Runs) -> None:
        """Every hole must lie inside the parent's pagemap ranges (CRIU ``check_pagehole_in_parent``).

        The parent's cover comes from memory (``parent_cover``, kept from the parent's commit) or, without
        one (a receiver restarted, a resumed session), from the parent pagemap on disk.
        """
        parent_dir = self.tmp_dir / PARENT_LINK
        cover = self._parent_cover
        if cover is None:
            parent_path = parent_dir / self.key.pagemap_name
            if parent_dir.is_dir() and not parent_path.exists():
                raise ImageError(f"{self.tmp_dir}: parent holes for {self.key.kind} {self.pid}, but the parent "
                                 f"round {os.readlink(parent_dir)} has no {self.key.pagemap_name}")
            cover = ImageCover.read(parent_dir, self.round_no - 1, self.key, self.page_size)
        cov_s, cov_e = cover.starts, cover.ends
        bad = np.flatnonzero(~_covered(holes.vaddr, holes.ends(self.page_size), cov_s, cov_e))
        if bad.size:
            i = int(bad[0])
            raise ImageError(f"{self.tmp_dir}: parent hole {int(holes.vaddr[i]):#x}+{int(holes.nr_pages[i])} "
                             f"not found in parent {os.readlink(parent_dir)} pagemap "
                             f"({bad.size} of {len(holes)} holes uncovered)")

    def _finish_image(self) -> tuple[PagemapArrays, Runs, RoundStats, RoundFiles, bytes]:
        """Validate this image and write its pagemap into the round directory (not yet durable)."""
        self._require_open()
        pagemap, zeros = self._validate()
        stats = self.stats
        self._flush_page_digests()
        pagemap_bytes = encode_pagemap_arrays(pagemap.pages_id, pagemap.vaddr, pagemap.nr_pages, pagemap.flags)
        files = RoundFiles(
            pagemap_xxh3_128=xxhash.xxh3_128_hexdigest(pagemap_bytes),
            inventory_xxh3_128="",
            page_digests_name=self.page_digests_path.name,
            page_digests_xxh3_128=self._page_digests_digest.hexdigest())
        _create_file(self.tmp_dir / self.key.pagemap_name, pagemap_bytes)
        return pagemap, zeros, stats, files, pagemap_bytes

    def _fsync_files(self) -> None:
        for sync_fd, path in ((self._fd, self.pages_path), (self._digests_fd, self.page_digests_path)):
            assert sync_fd is not None
            try:
                os.fsync(sync_fd)
            except OSError as err:
                raise ImageError(f"{path}: fsync failed: {err.strerror}") from err

    def commit(self, inventory: InventoryEntry) -> Path:
        """Validate, write the pagemaps, inventory and sidecar, fsync, and rename into ``round-N``.

        Commits every image added with :meth:`image` too. A round of one process image keeps the
        version 1 sidecar; rounds with more images (or a shared-memory one) get version 2.
        """
        self._require_open()
        if self._owner is not None:
            raise ImageError(f"{self.tmp_dir}: commit the round through its first image's writer")
        writers = [self, *self._members]
        try:
            for w in self._members:
                w._require_open()
            done = [w._finish_image() for w in writers]
            inventory_bytes = encode_inventory(inventory)
            inventory_digest = xxhash.xxh3_128_hexdigest(inventory_bytes)
            _create_file(self.tmp_dir / INVENTORY_NAME, inventory_bytes)
            if not self._members and self.key.kind == "pid":
                pagemap, zeros, stats, files, _ = done[0]
                files = dataclasses.replace(files, inventory_xxh3_128=inventory_digest)
                sidecar = _sidecar_json(stats, pagemap.pages_id, zeros, files)
            else:
                sidecar = _sidecar_images_json(self.round_no, self.page_size, inventory_digest, [
                    (w.key, stats, pagemap.pages_id, zeros, files)
                    for w, (pagemap, zeros, stats, files, _) in zip(writers, done, strict=True)])
            _create_file(self.tmp_dir / SIDECAR_NAME, sidecar)
            for w in writers:
                w._fsync_files()
            for w in writers:
                w._close_files()
            fsync_dir(self.tmp_dir)
            _rename_dir_noreplace(self.tmp_dir, self.final_dir)
        except ImageError:
            for w in writers:
                w._state = "failed"
            raise
        for w, (pagemap, _, stats, _, _) in zip(writers, done, strict=True):
            w._state = "committed"
            w._stats = stats
            w._cover = ImageCover.of_pagemap(self.round_no, w.key, pagemap, self.page_size)
            log.info("round committed round=%d image=%s:%d dir=%s entries=%d pages_written=%d pages_zero=%d "
                     "pages_skipped_parent=%d", self.round_no, w.key.kind, w.pid, self.final_dir,
                     pagemap.vaddr.size, stats.pages_written, stats.pages_zero, stats.pages_skipped_parent)
        fsync_dir(self.session_dir)
        return self.final_dir

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

    def abort(self) -> None:
        """Remove the unfinished round (with every image of it). Idempotent; does nothing once committed."""
        if self._owner is not None:
            self._owner.abort()
            return
        if self._state == "committed":
            return
        for w in (self, *self._members):
            w._state = "aborted"
            w._page_digests.clear()
            try:
                w._close_files()
            except OSError as err:
                log.warning("closing round files failed dir=%s error=%s", w.tmp_dir, err)
        try:
            shutil.rmtree(self.tmp_dir)
        except FileNotFoundError:
            pass
        except OSError as err:
            log.warning("removing aborted round failed dir=%s error=%s", self.tmp_dir, err)


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
                self._pread(dst, int(self._data_off[i]) + cursor - e_start)
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

    def _pread(self, dst: memoryview, offset: int) -> None:
        while dst:
            try:
                n = os.preadv(self._fd, [dst], offset)
            except OSError as err:
                raise ImageError(f"{at_offset(self.pages_path, offset)}: read failed: {err.strerror}") from err
            if n == 0:
                raise ImageError(f"{at_offset(self.pages_path, offset)}: pages file ends early")
            dst = dst[n:]
            offset += n

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


def open_round(round_dir: Path, pid: int, page_size: int = mmap.PAGESIZE, *, shmem: bool = False) -> ImageSet:
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

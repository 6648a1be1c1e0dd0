"""``pagehaul verify DIR``: re-check an image set on disk, file by file and page by page.

DIR is a session directory (every committed ``round-N`` is checked) or one round directory (that
round and every round its ``parent`` links reach). A flattened image set is a round directory
without parent links, and takes the same path. For each round, oldest first:

1. the sidecar (``pagehaul-round.json``) loads and is well formed;
2. ``inventory.img`` and every ``pagemap-PID.img`` parse strictly (``codec.decode_*``), and their
   xxh3-128 equals the sidecar's;
3. the round's structure holds (``store.ImageSet``): entries aligned, ascending and disjoint, valid
   flags, the pages file exactly as long as the present pages, the sidecar's pid, page size and
   pages id those of the files, and every ``PE_PARENT`` entry covered by the parent round;
4. ``pages-ID.xxh3`` has one digest per present page and equals its xxh3-128 in the sidecar;
5. every page of ``pages-ID.img`` has the xxh3_64 recorded for it, and the whole file the sidecar's
   xxh3-128.

The first problem found in that order is the report's ``first_bad``; for a corrupt page it names
the round directory, the pid, the page's virtual address, the file, and the expected and actual
digests. Pages are counted, not listed: one problem per file says how many pages are bad.

Rounds of a process tree hold one ``pagemap-VPID.img`` per process and one ``pagemap-shmem-SHMID.img``
per shared-memory object, each with its own pages file and its own entry in the (version 2) sidecar;
every image gets steps 2 to 5, a shared-memory image's ``PE_PARENT`` entries resolved through the
parent round's image of the same object.

Rounds without a sidecar (written by CRIU itself) get steps 2 and 3 only, and the report says so.
Rounds whose sidecar predates the per-page digests get the whole-file digest in step 5 only, which
says that the pages file is wrong but not where. Shared-memory pagemaps without a sidecar entry (CRIU's)
are parsed and their pages files' lengths checked.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final, Literal

import numpy as np
import xxhash

from pagehaul import codec, digest, store
from pagehaul.errors import ConfigError, ImageError
from pagehaul.kernel import PAGE_SIZE
from pagehaul.runs import U64
from pagehaul.wire import MIN_PAGE_SIZE

EXIT_OK: Final = 0
EXIT_BAD: Final = ImageError.exit_code  # 8: a malformed or corrupt image

CHUNK_PAGES: Final = 1024  # pages read and hashed at a time (4 MiB of 4 KiB pages)

Mode = Literal["per-page digests", "whole-file digest", "structure only"]
MODE_NOTES: Final[dict[str, str]] = {
    "per-page digests": "every page checked against pages-ID.xxh3",
    "whole-file digest": "pages file checked as a whole (no usable per-page digests)",
    "structure only": "no pagehaul sidecar (a round written by CRIU?): structure checked, no digests",
}


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with an image set. ``vaddr`` is set for a bad page; ``expected`` and
    ``actual`` are hex digests when a digest differs (xxh3_64 for a page, xxh3-128 for a file)."""

    round_dir: str
    file: str
    message: str
    pid: int | None = None
    vaddr: int | None = None
    expected: str | None = None
    actual: str | None = None

    def describe(self) -> str:
        where = f"{self.round_dir}/{self.file}" if self.file else self.round_dir
        parts = [where]
        if self.pid is not None:
            parts.append(f"pid {self.pid}")
        if self.vaddr is not None:
            parts.append(f"page {self.vaddr:#x}")
        text = ", ".join(parts) + f": {self.message}"
        if self.expected is not None or self.actual is not None:
            text += f" (expected {self.expected}, actual {self.actual})"
        return text


@dataclass(slots=True)
class RoundCheck:
    """What was checked in one round directory."""

    round_dir: str
    parent: str | None = None
    pids: list[int] = field(default_factory=list)
    shmem: list[int] = field(default_factory=list)  # shared-memory pagemaps (shmids)
    mode: Mode = "structure only"
    pages: int = 0  # present pages in the round's pages files
    pages_verified: int = 0  # of those, compared with their own digest
    bad_pages: int = 0
    problems: int = 0


@dataclass(slots=True)
class IntegrityReport:
    path: str
    rounds: list[RoundCheck] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and bool(self.rounds)

    @property
    def first_bad(self) -> Problem | None:
        return self.problems[0] if self.problems else None

    @property
    def pages(self) -> int:
        return sum(r.pages for r in self.rounds)

    @property
    def pages_verified(self) -> int:
        return sum(r.pages_verified for r in self.rounds)

    @property
    def bad_pages(self) -> int:
        return sum(r.bad_pages for r in self.rounds)

    @property
    def structure_only_rounds(self) -> int:
        return sum(r.mode == "structure only" for r in self.rounds)

    def to_json(self) -> dict[str, object]:
        first = self.first_bad
        return {
            "path": self.path, "ok": self.ok, "rounds_checked": len(self.rounds), "pages": self.pages,
            "pages_verified": self.pages_verified, "bad_pages": self.bad_pages,
            "structure_only_rounds": self.structure_only_rounds,
            "first_bad": asdict(first) if first is not None else None,
            "rounds": [asdict(r) for r in self.rounds], "problems": [asdict(p) for p in self.problems],
        }


# === Checking ==========================================================================================


@dataclass(slots=True)
class _Round:
    """A checked round: the image sets (by pid) whose structure held, for the rounds that name it as their
    parent; a pid missing here makes the child's PE_PARENT entries unusable."""

    path: Path
    sets: dict[codec.ImageKey, store.ImageSet] = field(default_factory=dict)


class _Checker:
    def __init__(self, report: IntegrityReport) -> None:
        self.report = report
        self.done: dict[str, _Round] = {}  # by realpath

    def close(self) -> None:
        for rnd in self.done.values():
            for image in rnd.sets.values():
                image.close()

    def problem(self, check: RoundCheck | None, round_dir: Path, file: str, message: str, *, pid: int | None = None,
                vaddr: int | None = None, expected: str | None = None, actual: str | None = None) -> None:
        self.report.problems.append(Problem(str(round_dir), file, message, pid, vaddr, expected, actual))
        if check is not None:
            check.problems += 1

    def check_chain(self, round_dir: Path) -> None:
        """``round_dir`` and its ancestors, oldest first, each once."""
        chain: list[Path] = []
        seen: set[str] = set()
        current: Path | None = round_dir
        while current is not None and os.path.realpath(current) not in self.done:
            real = os.path.realpath(current)
            if real in seen:
                self.problem(None, current, codec.PARENT_LINK, "parent links form a loop")
                self.done[real] = _Round(current)
                break
            seen.add(real)
            chain.append(current)
            link = current / codec.PARENT_LINK
            current = _parent_path(link) if os.path.islink(link) and os.path.isdir(link) else None
        for path in reversed(chain):
            real = os.path.realpath(path)
            if real not in self.done:
                self.done[real] = self.check_round(path)

    def _parent(self, round_dir: Path, check: RoundCheck) -> tuple[_Round | None, bool]:
        """The checked parent round, and whether the round has a parent link at all."""
        link = round_dir / codec.PARENT_LINK
        if not os.path.islink(link):
            return None, False
        check.parent = os.readlink(link)
        if not os.path.isdir(link):
            self.problem(check, round_dir, codec.PARENT_LINK, f"parent round {check.parent!r} is missing")
            return None, True
        return self.done.get(os.path.realpath(link)), True

    def check_round(self, round_dir: Path) -> _Round:
        check = RoundCheck(str(round_dir))
        self.report.rounds.append(check)
        rnd = _Round(round_dir)
        parent, has_link = self._parent(round_dir, check)
        try:
            infos = store.read_round_infos(round_dir)
        except ImageError as err:
            self.problem(check, round_dir, store.SIDECAR_NAME, str(err))
            return rnd
        info = next(iter(infos.values())) if infos else None
        files = info.files if info is not None else None
        page_size = PAGE_SIZE
        if info is not None:
            check.mode = "per-page digests" if files is not None else "whole-file digest"
            page_size = info.stats.page_size
            if page_size < MIN_PAGE_SIZE or page_size & (page_size - 1):
                self.problem(check, round_dir, store.SIDECAR_NAME, f"page size {page_size} is not a power of two "
                             f">= {MIN_PAGE_SIZE}")
                return rnd

        inv_bytes = self._read(check, round_dir, codec.INVENTORY_NAME)
        if inv_bytes is not None:
            self._check_file_digest(check, round_dir, codec.INVENTORY_NAME, inv_bytes,
                                    expected=files.inventory_xxh3_128 if files is not None else None, pid=None)
            try:
                codec.decode_inventory(inv_bytes, path=round_dir / codec.INVENTORY_NAME)
            except ImageError as err:
                self.problem(check, round_dir, codec.INVENTORY_NAME, str(err))

        check.pids = self._ids(round_dir, "pid")
        check.shmem = self._ids(round_dir, "shmem")
        if not check.pids:
            self.problem(check, round_dir, "", "no pagemap-PID.img in the round")
        keys = [codec.ImageKey("pid", pid) for pid in check.pids] + \
            [codec.ImageKey("shmem", shmid) for shmid in check.shmem]
        for key in infos or {}:
            if key not in keys:
                what = "pid" if key.kind == "pid" else "shared memory"
                self.problem(check, round_dir, key.pagemap_name,
                             f"the sidecar is for {what} {key.id}, but its pagemap is missing")
        for key in keys:
            entry = infos.get(key) if infos is not None else None
            if key.kind == "shmem" and entry is None:
                self._check_shmem(check, round_dir, key.id)
                continue
            image = self._check_pagemap(check, rnd, key, parent=parent, has_link=has_link, page_size=page_size,
                                        info=entry)
            if image is not None:
                rnd.sets[key] = image
        return rnd

    def _check_shmem(self, check: RoundCheck, round_dir: Path, shmid: int) -> None:
        """A CRIU shared-memory pagemap: it parses, and its pages file holds exactly its present pages."""
        name = codec.shmem_pagemap_name(shmid)
        data = self._read(check, round_dir, name)
        if data is None:
            return
        try:
            pagemap = codec.decode_pagemap(data, path=round_dir / name)
        except ImageError as err:
            self.problem(check, round_dir, name, str(err))
            return
        total = sum(e.nr_pages for e in pagemap.entries if e.flags & codec.PE_PRESENT)
        check.pages += total
        self._check_pages_size(check, round_dir, codec.pages_name(pagemap.pages_id), total, page_size=PAGE_SIZE,
                               pid=None)

    def _check_pages_size(self, check: RoundCheck, round_dir: Path, pages_name: str, total: int, *, page_size: int,
                          pid: int | None) -> bool:
        """The pages file exists and holds ``total`` pages; else a problem, and False."""
        try:
            size = (round_dir / pages_name).stat().st_size
        except OSError as err:
            self.problem(check, round_dir, pages_name, f"cannot read: {err.strerror}", pid=pid)
            return False
        if size != total * page_size:
            self.problem(check, round_dir, pages_name, f"{size} bytes, but the pagemap has {total} present "
                         f"pages ({total * page_size} bytes)", pid=pid)
            return False
        return True

    def _check_pagemap(self, check: RoundCheck, rnd: _Round, key: codec.ImageKey, *, parent: _Round | None,
                       has_link: bool, page_size: int, info: store.RoundInfo | None) -> store.ImageSet | None:
        """One image's pagemap and pages in one round; returns its image set if the structure holds."""
        round_dir = rnd.path
        name = key.pagemap_name
        pid = key.id if key.kind == "pid" else None
        data = self._read(check, round_dir, name)
        if data is None:
            return None
        files = info.files if info is not None else None
        self._check_file_digest(check, round_dir, name, data, expected=files.pagemap_xxh3_128 if files else None,
                                pid=pid)
        try:
            pagemap = codec.decode_pagemap(data, path=round_dir / name)
        except ImageError as err:
            self.problem(check, round_dir, name, str(err), pid=pid)
            return None

        # The pages file's length first: the image set below refuses a wrong one too, but the page
        # check needs it right, and the problem belongs to the pages file.
        vaddr, nr_pages, flags = pagemap.arrays()
        present = (flags & np.uint32(codec.PE_PRESENT)) != 0
        p_vaddr, p_nr = vaddr[present], nr_pages[present]
        total = int(p_nr.sum())
        check.pages += total
        pages_name = codec.pages_name(pagemap.pages_id)
        if not self._check_pages_size(check, round_dir, pages_name, total, page_size=page_size, pid=pid):
            return None

        image: store.ImageSet | None = None
        in_parent = any(e.flags & codec.PE_PARENT for e in pagemap.entries)
        parent_set = parent.sets.get(key) if parent is not None else None
        if in_parent and has_link and parent_set is None:
            why = "is missing" if parent is None else "is unusable (see above)"
            self.problem(check, round_dir, name, f"PE_PARENT entries, but the parent round {why}", pid=pid)
        else:
            try:
                image = store.ImageSet(round_dir, key.id, page_size, parent_set, shmem=key.kind == "shmem")
            except ImageError as err:
                self.problem(check, round_dir, name, str(err), pid=pid)

        if info is not None:
            self._check_pages(check, round_dir, pid, pages_name=pages_name, p_vaddr=p_vaddr, p_nr=p_nr,
                              page_size=page_size, info=info)
        return image

    def _check_pages(self, check: RoundCheck, round_dir: Path, pid: int | None, *, pages_name: str, p_vaddr: U64,
                     p_nr: U64, page_size: int, info: store.RoundInfo) -> None:
        """Hash every page of the pages file; compare with the per-page and whole-file digests."""
        total = int(p_nr.sum())
        pages_path = round_dir / pages_name

        stored = self._stored_digests(check, round_dir, pid, info, total)
        whole = xxhash.xxh3_128()
        first: tuple[int, int, int] | None = None  # page index, expected, actual
        bad = 0
        buf = bytearray(CHUNK_PAGES * page_size)
        try:
            fd = os.open(pages_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            self.problem(check, round_dir, pages_name, f"cannot open: {err.strerror}", pid=pid)
            return
        try:
            for at, count in _chunks(total, CHUNK_PAGES):
                view = memoryview(buf)[:count * page_size]
                store.read_exact(fd, view, at * page_size, pages_path)
                whole.update(view)
                if stored is None:
                    continue
                actual = digest.page_digests(view, page_size)
                expected = stored[at:at + count]
                mismatch = np.flatnonzero(actual != expected)
                check.pages_verified += count
                if mismatch.size:
                    bad += int(mismatch.size)
                    if first is None:
                        i = int(mismatch[0])
                        first = (at + i, int(expected[i]), int(actual[i]))
        except ImageError as err:
            self.problem(check, round_dir, pages_name, str(err), pid=pid)
            return
        finally:
            os.close(fd)

        check.bad_pages += bad
        if first is not None:
            index, want, got = first
            page_vaddr = _page_vaddr(p_vaddr, p_nr, index, page_size)
            self.problem(check, round_dir, pages_name,
                         f"page {index} of the pages file does not match its xxh3_64 in "
                         f"{info.files.page_digests_name if info.files else '?'}; {bad} of {total} pages bad",
                         pid=pid, vaddr=page_vaddr, expected=f"{want:016x}", actual=f"{got:016x}")
        elif whole.hexdigest() != info.stats.pages_xxh3_128:
            if stored is not None:
                message = "every page matches its digest, but the file's xxh3-128 differs from the sidecar's"
            else:
                message = "xxh3-128 differs from the sidecar's (no per-page digests: the bad page is not known)"
            self.problem(check, round_dir, pages_name, message, pid=pid, expected=info.stats.pages_xxh3_128,
                         actual=whole.hexdigest())

    def _stored_digests(self, check: RoundCheck, round_dir: Path, pid: int | None, info: store.RoundInfo,
                        total: int) -> U64 | None:
        """The per-page digests, if the sidecar names them and they are intact; else None."""
        files = info.files
        if files is None:
            return None
        raw = self._read(check, round_dir, files.page_digests_name, pid=pid)
        if raw is None:
            check.mode = "whole-file digest"
            return None
        actual = xxhash.xxh3_128_hexdigest(raw)
        if actual != files.page_digests_xxh3_128:
            self.problem(check, round_dir, files.page_digests_name,
                         "xxh3-128 differs from the sidecar's: the per-page digests are not usable",
                         pid=pid, expected=files.page_digests_xxh3_128, actual=actual)
            check.mode = "whole-file digest"
            return None
        if len(raw) != total * digest.DIGEST_SIZE:
            self.problem(check, round_dir, files.page_digests_name,
                         f"{len(raw) // digest.DIGEST_SIZE} digests for {total} present pages", pid=pid)
            check.mode = "whole-file digest"
            return None
        return digest.from_bytes(raw)

    def _check_file_digest(self, check: RoundCheck, round_dir: Path, name: str, data: bytes, *,
                           expected: str | None, pid: int | None) -> None:
        if expected is None:
            return
        actual = xxhash.xxh3_128_hexdigest(data)
        if actual != expected:
            self.problem(check, round_dir, name, "xxh3-128 differs from the sidecar's", pid=pid,
                         expected=expected, actual=actual)

    def _read(self, check: RoundCheck, round_dir: Path, name: str, *, pid: int | None = None) -> bytes | None:
        try:
            return (round_dir / name).read_bytes()
        except OSError as err:
            self.problem(check, round_dir, name, f"cannot read: {err.strerror}", pid=pid)
            return None

    @staticmethod
    def _ids(round_dir: Path, kind: codec.ImageKind) -> list[int]:
        """The ids of the round's pagemaps of ``kind`` (pids, shmem ids)."""
        try:
            names = os.listdir(round_dir)
        except OSError:
            return []
        return sorted(key.id for key in map(codec.ImageKey.of_pagemap_name, names)
                      if key is not None and key.kind == kind)


def _parent_path(link: Path) -> Path:
    """The parent round named the way its link reads (round-2/../round-1 is round-1), not round-2/parent,
    unless the lexical name would lead elsewhere (a round directory that is itself a symlink)."""
    named = Path(os.path.normpath(link.parent / os.readlink(link)))
    return named if os.path.realpath(named) == os.path.realpath(link) else link


def _chunks(total: int, size: int) -> Iterator[tuple[int, int]]:
    for at in range(0, total, size):
        yield at, min(size, total - at)


def _page_vaddr(p_vaddr: U64, p_nr: U64, index: int, page_size: int) -> int:
    """The virtual address of the ``index``-th page of a pages file (present entries in file order)."""
    ends = np.cumsum(p_nr, dtype=np.uint64)
    entry = int(np.searchsorted(ends, np.uint64(index), side="right"))
    before = int(ends[entry]) - int(p_nr[entry])
    return int(p_vaddr[entry]) + (index - before) * page_size


def _is_round_dir(path: Path) -> bool:
    try:
        names = os.listdir(path)
    except OSError:
        return False
    return any(name in (codec.INVENTORY_NAME, store.SIDECAR_NAME) or codec.TASK_PAGEMAP_RE.fullmatch(name)
               for name in names)


def _session_rounds(path: Path, report: IntegrityReport) -> list[Path]:
    """The committed rounds of a session; rounds its session.json lists but that are gone are problems."""
    try:
        numbers = store.committed_rounds(path)
    except ImageError as err:
        report.problems.append(Problem(str(path), "", str(err)))
        return []
    rounds = [path / store.round_dir_name(n) for n in numbers]
    try:
        doc = json.loads((path / "session.json").read_bytes())
    except (OSError, ValueError):
        doc = None
    listed = doc.get("rounds") if isinstance(doc, dict) else None
    if isinstance(listed, list):
        for name in listed:
            if isinstance(name, str) and not (path / name).is_dir():
                report.problems.append(Problem(str(path), "session.json",
                                               f"committed round {name!r} is listed but missing"))
    if not rounds:
        report.problems.append(Problem(str(path), "", "neither a round directory (no inventory.img, no "
                                                      "pagemap-PID.img) nor a session with committed round-N"))
    return rounds


def verify_image_set(path: Path) -> IntegrityReport:
    """Check a session directory (every committed round) or a round directory (it and its parents)."""
    path = Path(path)
    report = IntegrityReport(str(path))
    if not path.is_dir():
        report.problems.append(Problem(str(path), "", "not a directory"))
        return report
    targets = [path] if _is_round_dir(path) else _session_rounds(path, report)
    checker = _Checker(report)
    try:
        for target in targets:
            checker.check_chain(target)
    finally:
        checker.close()
    return report


# === Output ============================================================================================


def format_report(report: IntegrityReport) -> str:
    """The report for people: a verdict, the first bad page or file, counts, one line per round."""
    lines = [f"{report.path}: {'OK' if report.ok else 'BAD'}"]
    first = report.first_bad
    if first is not None:
        if first.vaddr is not None:
            lines.append(f"first bad page: {first.vaddr:#x} of pid {first.pid} in {first.round_dir}/{first.file}: "
                         f"xxh3_64 {first.actual}, expected {first.expected}")
        else:
            lines.append(f"first problem: {first.describe()}")
    lines.append(f"{len(report.rounds)} rounds, {report.pages:,} pages; {report.pages_verified:,} checked page by "
                 f"page, {report.bad_pages:,} bad; {len(report.problems)} problems")
    if report.structure_only_rounds:
        lines.append(f"{report.structure_only_rounds} rounds without a pagehaul sidecar (written by CRIU?): "
                     "structure checked only, no digests")
    for r in report.rounds:
        parent = f" (parent {r.parent})" if r.parent else ""
        pids = ",".join(map(str, r.pids)) or "-"
        verdict = "ok" if not r.problems else f"{r.problems} problems"
        shmem = f" + {len(r.shmem)} shmem" if r.shmem else ""
        lines.append(f"  {r.round_dir}{parent}: pid {pids}{shmem}, {r.pages:,} pages, {MODE_NOTES[r.mode]}: {verdict}")
    lines.extend(f"  problem: {p.describe()}" for p in report.problems)
    return "\n".join(lines)


def main_verify(path: Path, as_json: bool) -> int:
    """``pagehaul verify DIR [--json]``: print the report; exit 0 if the image set is intact, else 8."""
    if not path.is_dir():
        raise ConfigError(f"{path} is not a directory")
    report = verify_image_set(path)
    if as_json:
        json.dump(report.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_report(report))
    return EXIT_OK if report.ok else EXIT_BAD

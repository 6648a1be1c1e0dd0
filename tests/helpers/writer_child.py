"""Page-write histories for dirty-tracker tests: a real writer child and a fake soft-dirty process.

* :class:`WriterChild` is a real process that maps named regions and writes chosen pages on
  command (one JSON line on stdin, one ``OK {json}`` line back). After each answer it waits
  until the child sleeps in ``read(0, ...)`` again (``tests.helpers.children.spawn_python``'s
  rule), so its memory is quiescent when the test looks; no sleeps.
* :class:`FakeSoftDirtyProcess` is a fake ``/proc/PID`` for the soft-dirty trackers, which
  cannot run for real on a kernel without CONFIG_MEM_SOFT_DIRTY (this project's machine): the
  test plays the kernel. ``pagemap`` is a regular (sparse) file of u64 words at offset
  ``vaddr / PAGE_SIZE * 8``, ``clear_refs`` a regular file in which the tracker's ``4`` stays
  visible, ``maps`` lists the regions. A write sets present + bit 55 on its pages; a new
  region is wholly soft-dirty (the kernel's VM_SOFTDIRTY); :meth:`FakeSoftDirtyProcess.kernel_clear_refs`
  checks that the tracker wrote ``4`` and then clears bit 55 as the kernel would have.
* :func:`fake_scan_fn` derives PAGEMAP_SCAN answers from those words, since a regular file
  cannot take the ioctl.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from pagehaul import kernel, procfs
from pagehaul.procfs import Vma
from pagehaul.runs import U64, Runs
from sender.trackers.softdirty import ScanFn
from tests.helpers.children import (
    CHILD_LIBC_PRELUDE,
    PAGE_SIZE,
    Child,
    blocked_reading_stdin,
    spawn_python,
    wait_until,
)

P: Final = PAGE_SIZE
_SHIFT: Final = P.bit_length() - 1

# --- the real writer --------------------------------------------------------------------------

# argv: JSON {"name": pages, ...}, the regions to map at start. Each region is followed by one
# PROT_NONE page, a VMA of its own, so regions never merge with each other or a neighbour.
# Every page of a region is written when mapped; a write stores a fresh stamp (a counter never
# used before) in the page's first word, so its content always changes.
WRITER_CHILD = CHILD_LIBC_PRELUDE + r'''
MADV_DONTNEED = 4
regions = {}
stamp = [0]

def check(ok, what):
    if not ok:
        raise OSError(ctypes.get_errno(), what)

def word(name, page):
    addr, pages = regions[name]
    if not 0 <= page < pages:
        raise IndexError(f"page {page} outside region {name} of {pages} pages")
    return ctypes.c_uint64.from_address(addr + page * P)

def write(name, page):
    stamp[0] += 1
    word(name, page).value = stamp[0]

def new_region(name, pages):
    addr = libc.mmap(None, (pages + 1) * P, mmap.PROT_READ | mmap.PROT_WRITE,
                     mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    check(addr not in (None, MAP_FAILED), "mmap")
    check(libc.mprotect(addr + pages * P, P, 0) == 0, "mprotect")
    regions[name] = (addr, pages)
    for page in range(pages):
        write(name, page)

def rewrite(name, page):
    w = word(name, page)
    w.value = w.value  # a real store of the bytes already there

for name, pages in json.loads(sys.argv[1]).items():
    new_region(name, pages)
print("READY " + json.dumps({"regions": regions}), flush=True)
while line := sys.stdin.readline():
    cmd = json.loads(line)
    op, name = cmd["op"], cmd["name"]
    if op == "map":
        new_region(name, cmd["pages"])
    elif op == "write":
        for page in cmd["pages"]:
            write(name, page)
    elif op == "rewrite":
        for page in cmd["pages"]:
            rewrite(name, page)
    elif op == "set":
        word(name, cmd["page"]).value = cmd["value"]
    elif op == "munmap":
        addr, _ = regions[name]
        for page in cmd["pages"]:
            check(libc.munmap(addr + page * P, P) == 0, "munmap")
    elif op == "dontneed":
        addr, _ = regions[name]
        for page in cmd["pages"]:
            check(libc.madvise(addr + page * P, P, MADV_DONTNEED) == 0, "madvise")
    else:
        raise ValueError(op)
    print("OK " + json.dumps({"regions": regions}), flush=True)
'''


class WriterChild:
    """Drives a running WRITER_CHILD; ``regions`` maps name -> (start address, pages)."""

    def __init__(self, child: Child) -> None:
        self.child = child
        self.regions: dict[str, tuple[int, int]] = _regions(child.info)

    @property
    def pid(self) -> int:
        return self.child.pid

    def command(self, op: str, name: str, **args: Any) -> None:
        stdin = self.child.proc.stdin
        assert stdin is not None
        stdin.write((json.dumps({"op": op, "name": name, **args}) + "\n").encode())
        stdin.flush()
        line = self.child.readline()
        assert line.startswith("OK "), line
        self.regions = _regions(json.loads(line[len("OK "):]))
        wait_until(lambda: blocked_reading_stdin(self.pid), f"child {self.pid} to block reading stdin")

    def map(self, name: str, pages: int) -> None:
        self.command("map", name, pages=pages)

    def write(self, name: str, pages: Iterable[int]) -> None:
        self.command("write", name, pages=sorted(pages))

    def rewrite(self, name: str, pages: Iterable[int]) -> None:
        self.command("rewrite", name, pages=sorted(pages))

    def set_word(self, name: str, page: int, value: int) -> None:
        self.command("set", name, page=page, value=value)

    def dontneed(self, name: str, pages: Iterable[int]) -> None:
        self.command("dontneed", name, pages=sorted(pages))

    def munmap(self, name: str, pages: Iterable[int]) -> None:
        self.command("munmap", name, pages=sorted(pages))

    def addr(self, name: str, page: int = 0) -> int:
        return self.regions[name][0] + page * P


def _regions(info: dict[str, Any]) -> dict[str, tuple[int, int]]:
    return {name: (int(addr), int(pages)) for name, (addr, pages) in info["regions"].items()}


@contextmanager
def writer_child(regions: dict[str, int]) -> Iterator[WriterChild]:
    """A WRITER_CHILD with ``regions`` mapped and written; killed and reaped on exit."""
    with spawn_python(WRITER_CHILD, json.dumps(regions)) as child:
        yield WriterChild(child)


def dumpable_vmas(pid: int) -> list[Vma]:
    return procfs.select_dumpable(procfs.read_maps(pid))


# --- results relative to regions --------------------------------------------------------------


def relative_pages(runs: Runs, regions: dict[str, tuple[int, int]],
                   present: Runs | None = None) -> dict[str, set[int]]:
    """Page indices of ``runs`` (intersected with ``present`` if given) inside each region."""
    addrs = runs.page_addrs(P)
    if present is not None:
        addrs = np.intersect1d(addrs, present.page_addrs(P))
    result = {}
    for name, (start, pages) in regions.items():
        inside = addrs[(addrs >= start) & (addrs < start + pages * P)]
        result[name] = {int(i) for i in (inside - np.uint64(start)) >> np.uint64(_SHIFT)}
    return result


# --- the fake soft-dirty process --------------------------------------------------------------

FAKE_PID: Final = 4242
FAKE_BASE: Final = 0x1000_0000  # pagemap offset 512 KiB: the sparse file stays small
_PRESENT_DIRTY: Final = kernel.PM_PRESENT | kernel.PM_SOFT_DIRTY


def write_pagemap(pid_dir: Path, vaddr: int, words: npt.ArrayLike) -> None:
    """Store pagemap ``words`` for the pages from ``vaddr`` in a fake ``pid_dir/pagemap``."""
    data = np.asarray(words, dtype="<u8").tobytes()
    fd = os.open(pid_dir / "pagemap", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, (vaddr >> _SHIFT) * 8)
    finally:
        os.close(fd)


def read_pagemap(pid_dir: Path, vaddr: int, pages: int) -> U64:
    """Words of a fake pagemap; beyond the file's end (never written) they are 0."""
    with open(pid_dir / "pagemap", "rb") as f:
        f.seek((vaddr >> _SHIFT) * 8)
        data = f.read(pages * 8)
    words = np.zeros(pages, dtype=np.uint64)
    words[:len(data) // 8] = np.frombuffer(data, dtype="<u8")
    return words


def write_maps(pid_dir: Path, spans: Iterable[tuple[int, int]], perms: str = "rw-p") -> None:
    lines = [f"{start:x}-{end:x} {perms} 00000000 00:00 0\n" for start, end in sorted(spans)]
    (pid_dir / "maps").write_text("".join(lines))


class FakeSoftDirtyProcess:
    """A fake /proc/PID on which the test plays the soft-dirty kernel (see module docstring)."""

    def __init__(self, root: Path, pid: int = FAKE_PID) -> None:
        self.root = root
        self.pid = pid
        self.dir = root / str(pid)
        self.dir.mkdir(parents=True)
        (self.dir / "pagemap").write_bytes(b"")
        (self.dir / "clear_refs").write_bytes(b"")
        self.regions: dict[str, tuple[int, int]] = {}
        self._next = FAKE_BASE
        self._pfn = 0x1000
        write_maps(self.dir, [])

    def map(self, name: str, pages: int, *, vm_softdirty: bool = True) -> int:
        """A new region, every page written. ``vm_softdirty=False`` leaves bit 55 clear, as a
        kernel that failed to mark the new VMA would (the trackers must still report it)."""
        start = self._next
        self._next += (pages + 1) * P  # a one-page hole before the next region
        self.regions[name] = (start, pages)
        bits = _PRESENT_DIRTY if vm_softdirty else kernel.PM_PRESENT
        write_pagemap(self.dir, start, np.uint64(bits) | self._pfns(pages))
        self._write_maps()
        return start

    def grow(self, name: str, extra: int, *, vm_softdirty: bool = True) -> None:
        """Extend the most recent region in place (brk, mremap), every new page written. The
        kernel marks the grown VMA soft-dirty as a whole; ``vm_softdirty=False`` only the new pages."""
        start, pages = self.regions[name]
        if start + (pages + 1) * P != self._next:
            raise ValueError("only the most recent region has room to grow")
        self.regions[name] = (start, pages + extra)
        self._next = start + (pages + extra + 1) * P
        grown = np.uint64(_PRESENT_DIRTY) | self._pfns(extra)
        write_pagemap(self.dir, start + pages * P, grown)
        if vm_softdirty:
            self.write(name, range(pages))
        self._write_maps()

    def write(self, name: str, pages: Iterable[int]) -> None:
        """The target writes these pages: present, soft-dirty."""
        start, count = self.regions[name]
        idx = self._indices(pages, count)
        words = read_pagemap(self.dir, start, count)
        words[idx] |= np.uint64(_PRESENT_DIRTY)
        words[idx] |= np.where(words[idx] & np.uint64(kernel.PM_PFRAME_MASK), np.uint64(0), self._pfns(idx.size))
        write_pagemap(self.dir, start, words)

    def dontneed(self, name: str, pages: Iterable[int]) -> None:
        """MADV_DONTNEED: the ptes are gone, so are the bits."""
        start, count = self.regions[name]
        idx = self._indices(pages, count)
        words = read_pagemap(self.dir, start, count)
        words[idx] = 0
        write_pagemap(self.dir, start, words)

    def set_words(self, vaddr: int, words: npt.ArrayLike) -> None:
        write_pagemap(self.dir, vaddr, words)

    def kernel_clear_refs(self) -> None:
        """Assert the tracker wrote ``4`` to clear_refs, then do what the kernel would have done."""
        written = (self.dir / "clear_refs").read_bytes()
        assert written == b"4", f"tracker wrote {written!r} to clear_refs, expected b'4'"
        (self.dir / "clear_refs").write_bytes(b"")
        size = (self.dir / "pagemap").stat().st_size
        words = read_pagemap(self.dir, 0, size // 8)
        words &= np.uint64(~kernel.PM_SOFT_DIRTY & (1 << 64) - 1)
        write_pagemap(self.dir, 0, words)

    def clear_refs_pending(self) -> bool:
        return (self.dir / "clear_refs").read_bytes() != b""

    def vmas(self) -> list[Vma]:
        return procfs.select_dumpable(procfs.read_maps(self.pid, self.root))

    def present(self) -> Runs:
        found = []
        for start, pages in sorted(self.regions.values()):
            words = read_pagemap(self.dir, start, pages)
            idx = np.flatnonzero(words & np.uint64(kernel.PM_PRESENT)).astype(np.uint64)
            found.append(np.uint64(start) + idx * np.uint64(P))
        if not found:
            return Runs.empty()
        return Runs.from_page_addrs(np.concatenate(found), P)

    def _write_maps(self) -> None:
        write_maps(self.dir, [(start, start + pages * P) for start, pages in self.regions.values()])

    def _pfns(self, count: int) -> U64:
        pfns = np.arange(self._pfn, self._pfn + count, dtype=np.uint64)
        self._pfn += count
        return pfns

    @staticmethod
    def _indices(pages: Iterable[int], count: int) -> npt.NDArray[np.int64]:
        idx = np.asarray(sorted(pages), dtype=np.int64)
        if idx.size and (idx[0] < 0 or idx[-1] >= count):
            raise IndexError(f"pages {idx.tolist()} outside a region of {count} pages")
        return idx


_MAX_FAKE_SCANS: Final = 100_000  # far above any test's need; a stuck resume loop fails instead of hanging


def fake_scan_fn(fake: FakeSoftDirtyProcess, *, quirky_walk_end: bool = False) -> ScanFn:
    """PAGEMAP_SCAN emulated over the fake pagemap words (a regular file cannot take the ioctl).

    Categories: PAGE_IS_SOFT_DIRTY from bit 55, PAGE_IS_PRESENT/SWAPPED from bits 63/62. The
    filter, the merging of adjacent pages with equal reported categories, a full vector stopping
    the walk, and ``walk_end`` follow Documentation/admin-guide/mm/pagemap.rst. With
    ``quirky_walk_end`` a full vector leaves ``walk_end`` at the walk's start, the quirk the
    trackers must survive (sender.scanner's module doc). It also asserts that no clear_refs
    write is pending when bits are read: a tracker clearing before reading would lose writes.
    """

    calls = 0

    def scan(fd: int, arg: kernel.pm_scan_arg, vec: npt.NDArray[np.void]) -> int:
        nonlocal calls
        calls += 1
        assert calls <= _MAX_FAKE_SCANS, "the scan loop does not progress (walk_end quirk not handled?)"
        assert not fake.clear_refs_pending(), "soft-dirty bits read after clear_refs was written"
        start, end = int(arg.start), int(arg.end)
        pages = (end - start) >> _SHIFT
        data = os.pread(fd, pages * 8, (start >> _SHIFT) * 8)
        words = np.zeros(pages, dtype=np.uint64)
        words[:len(data) // 8] = np.frombuffer(data, dtype="<u8")
        cats = np.zeros(pages, dtype=np.uint64)
        for bit, category in ((kernel.PM_SOFT_DIRTY, kernel.PAGE_IS_SOFT_DIRTY),
                              (kernel.PM_PRESENT, kernel.PAGE_IS_PRESENT),
                              (kernel.PM_SWAP, kernel.PAGE_IS_SWAPPED)):
            cats |= np.where(words & np.uint64(bit), np.uint64(category), np.uint64(0))
        flipped = cats ^ np.uint64(arg.category_inverted)
        keep = (flipped & np.uint64(arg.category_mask)) == np.uint64(arg.category_mask)
        if arg.category_anyof_mask:
            keep &= (flipped & np.uint64(arg.category_anyof_mask)) != 0
        idx = np.flatnonzero(keep)
        if idx.size == 0:
            arg.walk_end = end
            return 0
        reported = cats[idx] & np.uint64(arg.return_mask)
        new_region = np.concatenate(([True], (np.diff(idx) != 1) | (reported[1:] != reported[:-1])))
        firsts = np.flatnonzero(new_region)
        lasts = np.concatenate((firsts[1:], [idx.size])) - 1
        n = min(firsts.size, int(arg.vec_len))
        vec["start"][:n] = np.uint64(start) + idx[firsts[:n]].astype(np.uint64) * np.uint64(P)
        vec["end"][:n] = np.uint64(start) + (idx[lasts[:n]].astype(np.uint64) + np.uint64(1)) * np.uint64(P)
        vec["categories"][:n] = reported[firsts[:n]]
        if firsts.size <= n:
            arg.walk_end = end
        elif quirky_walk_end:
            arg.walk_end = start
        else:  # the walk stopped at the first page that did not fit
            arg.walk_end = start + int(idx[firsts[n]]) * P
        return n

    return scan

"""Parsing ``/proc`` for a process that can vanish between two reads.

Some facts about /proc/PID (Documentation/filesystems/proc.rst, fs/proc/):

* Every file is generated on read. A process can exit between listing ``/proc/PID/task`` and
  opening ``/proc/PID/task/TID/status``: opening then fails with ENOENT, and reading some files
  of a process that is exiting fails with ESRCH. Both mean "gone", but ENOENT also comes from a
  file that never existed (an older kernel, a fake root), so psutil's rule is used: ENOENT
  means gone only if ``/proc/PID`` itself has disappeared too.
* ``maps`` is a seq_file: each ``read()`` renders as many lines as fit, dropping ``mmap_lock``
  between calls, so a small buffer can see a VMA twice or miss one when the map changes
  meanwhile (psutil issues #708, #2050). It is read here with 1 MiB ``read()`` calls; a
  stopped process gives a consistent snapshot either way.
* Reading ``maps`` of another user's process needs PTRACE_MODE_READ; without it the open
  fails with EACCES (AccessDenied).
* ``maps`` columns: ``start-end perms offset dev inode pathname``. ``offset`` is the file
  offset in bytes (vm_pgoff << PAGE_SHIFT), ``perms`` is ``rwx`` plus ``p`` (private) or ``s``
  (shared). The path may contain spaces and ends in `` (deleted)`` for unlinked files; special
  mappings are bracketed: ``[heap]``, ``[stack]``, ``[vdso]``, ``[vvar]``, ``[vvar_vclock]``
  (6.13), ``[vsyscall]``, ``[uprobes]``, and ``[anon:NAME]``/``[anon_shmem:NAME]`` for
  mappings named with PR_SET_VMA_ANON_NAME (5.17).
"""

from __future__ import annotations

import enum
import errno
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from pagehaul.errors import AccessDenied, ProcessGone

log = logging.getLogger(__name__)

PROC_ROOT: Final = Path("/proc")

PROT_READ: Final = 0x1
PROT_WRITE: Final = 0x2
PROT_EXEC: Final = 0x4

_READ_CHUNK: Final = 1 << 20

_GONE_ERRNOS: Final = frozenset({errno.ENOENT, errno.ESRCH})
_DENIED_ERRNOS: Final = frozenset({errno.EACCES, errno.EPERM})


@contextmanager
def translate_errors(pid: int, proc_root: Path = PROC_ROOT) -> Iterator[None]:
    """The one boundary turning OSError about ``pid`` into ``ProcessGone``/``AccessDenied``."""
    try:
        yield
    except OSError as err:
        if err.errno == errno.ESRCH or (err.errno == errno.ENOENT and not (proc_root / str(pid)).exists()):
            raise ProcessGone(pid, f"process {pid} is gone ({err.strerror}: {err.filename or ''})") from err
        if err.errno in _DENIED_ERRNOS:
            raise AccessDenied(pid, f"access to process {pid} denied "
                                    f"({err.strerror}: {err.filename or ''})") from err
        raise


def open_proc(pid: int, name: str, proc_root: Path = PROC_ROOT) -> int:
    """``/proc/PID/NAME`` opened read-only (close-on-exec), errors translated as above."""
    with translate_errors(pid, proc_root):
        return os.open(proc_root / str(pid) / name, os.O_RDONLY | os.O_CLOEXEC)


class ProcFd:
    """Owns one file descriptor (``_fd``, -1 once closed): ``close()`` or the end of a ``with``
    closes it once. Subclasses that hold more (a mapping) extend ``close``."""

    _fd: int = -1

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _read_bytes(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        parts = []
        while chunk := os.read(fd, _READ_CHUNK):
            parts.append(chunk)
        return b"".join(parts)
    finally:
        os.close(fd)


# === maps ====================================================================================


@dataclass(frozen=True, slots=True)
class MapsEntry:
    """One line of ``/proc/PID/maps``."""

    start: int
    end: int
    perms: str  # "rw-p"
    pgoff: int  # file offset in bytes, as CRIU's VmaEntry.pgoff
    dev: int  # os.makedev(major, minor)
    inode: int
    path: str  # "" for anonymous memory; bracketed for special mappings

    @property
    def prot(self) -> int:
        return ((PROT_READ if self.perms[0] == "r" else 0)
                | (PROT_WRITE if self.perms[1] == "w" else 0)
                | (PROT_EXEC if self.perms[2] == "x" else 0))

    @property
    def shared(self) -> bool:
        return self.perms[3] == "s"

    @property
    def size_bytes(self) -> int:
        return self.end - self.start


def parse_maps(text: bytes) -> list[MapsEntry]:
    entries = []
    for line in text.splitlines():
        if not line:
            continue
        # maxsplit=5 keeps spaces inside the path; a line without a path has five fields.
        fields = line.split(maxsplit=5)
        if len(fields) < 5:
            raise ValueError(f"malformed maps line: {line!r}")
        start, _, end = fields[0].partition(b"-")
        major, _, minor = fields[3].partition(b":")
        entries.append(MapsEntry(
            start=int(start, 16),
            end=int(end, 16),
            perms=fields[1].decode("ascii"),
            pgoff=int(fields[2], 16),
            dev=os.makedev(int(major, 16), int(minor, 16)),
            inode=int(fields[4]),
            path=os.fsdecode(fields[5]) if len(fields) == 6 else "",
        ))
    return entries


def read_maps(pid: int, proc_root: Path = PROC_ROOT) -> list[MapsEntry]:
    with translate_errors(pid, proc_root):
        return parse_maps(_read_bytes(proc_root / str(pid) / "maps"))


class VmaKind(enum.IntEnum):
    """Mirrors the wire enum ``pagehaul.v1.VmaKind``."""

    ANON = 1
    HEAP = 2
    STACK = 3
    FILE_PRIVATE = 4


@dataclass(frozen=True, slots=True)
class Vma:
    """A mapping whose pages the sender dumps."""

    start: int
    end: int
    prot: int
    kind: VmaKind
    pgoff: int
    path: str

    @property
    def size_bytes(self) -> int:
        return self.end - self.start


# Never dumped. [vdso]/[vvar]/[vvar_vclock]/[vsyscall] are provided afresh by the kernel on
# the destination (CRIU checks vdso compatibility instead of restoring pages from the image),
# [vvar] is VM_PFNMAP and unreadable, [vsyscall] lies above TASK_SIZE and is outside the range
# PAGEMAP_SCAN accepts. [uprobes] is the kernel's execute-out-of-line slot area.
_SKIPPED_SPECIAL: Final = frozenset({"[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]", "[uprobes]"})


def _kind_of(entry: MapsEntry) -> VmaKind | None:
    path = entry.path
    if not path or path.startswith("[anon:"):
        return VmaKind.ANON
    if path == "[heap]":
        return VmaKind.HEAP
    if path == "[stack]" or path.startswith("[stack:"):  # "[stack:TID]" before Linux 4.5
        return VmaKind.STACK
    if path.startswith("["):
        return None
    return VmaKind.FILE_PRIVATE


def select_dumpable(entries: Sequence[MapsEntry]) -> list[Vma]:
    """The private mappings whose present pages are part of the process's memory image.

    Kept: private anonymous memory (named or not), ``[heap]``, ``[stack]``, and private file
    mappings (the scanner reports only their COW-ed pages; the rest comes back from the file).
    Kept even without PROT_READ, as CRIU does: the reader falls back to ``/proc/PID/mem``,
    which reads them with FOLL_FORCE. Skipped: every shared mapping (MAP_SHARED anonymous or
    file, SysV shm, ``[anon_shmem:...]``; handled separately, later), the kernel-provided
    special mappings, and unknown bracketed names.
    """
    vmas = []
    for entry in entries:
        if entry.shared or entry.path in _SKIPPED_SPECIAL:
            continue
        kind = _kind_of(entry)
        if kind is None:
            log.debug("skipping unknown special mapping start=0x%x path=%s", entry.start, entry.path)
            continue
        vmas.append(Vma(entry.start, entry.end, entry.prot, kind, entry.pgoff, entry.path))
    return vmas


# === status, threads, comm, uptime ===========================================================


@dataclass(frozen=True, slots=True)
class ProcStatus:
    name: str
    tgid: int
    ppid: int
    tracer_pid: int  # 0 when not traced
    state: str  # one letter: R S D T t Z X I ...
    threads: int


def read_status(pid: int, proc_root: Path = PROC_ROOT) -> ProcStatus:
    """Fields of ``/proc/PID/status``; ``pid`` may also be a thread id."""
    with translate_errors(pid, proc_root):
        text = _read_bytes(proc_root / str(pid) / "status").decode("utf-8", "surrogateescape")
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key] = value.strip()
    try:
        return ProcStatus(
            name=fields["Name"],
            tgid=int(fields["Tgid"]),
            ppid=int(fields["PPid"]),
            tracer_pid=int(fields["TracerPid"]),
            state=fields["State"][:1],
            threads=int(fields["Threads"]),
        )
    except (KeyError, ValueError) as err:
        raise ValueError(f"unexpected /proc/{pid}/status content: missing or bad {err}") from err


def list_threads(pid: int, proc_root: Path = PROC_ROOT) -> list[int]:
    """Thread ids of ``pid`` in ascending order."""
    with translate_errors(pid, proc_root):
        names = os.listdir(proc_root / str(pid) / "task")
    return sorted(int(name) for name in names)


def read_comm(pid: int, proc_root: Path = PROC_ROOT) -> str:
    with translate_errors(pid, proc_root):
        raw = _read_bytes(proc_root / str(pid) / "comm")
    return os.fsdecode(raw.rstrip(b"\n"))


def read_uptime_us(proc_root: Path = PROC_ROOT) -> int:
    """System uptime in microseconds, as CRIU's ``dump_uptime``: sec * 10**6 + csec * 10**4.

    ``/proc/uptime`` prints ``SECONDS.CC IDLE.CC`` with exactly two decimals; parsing the
    integer parts avoids float rounding.
    """
    first = (proc_root / "uptime").read_text().split()[0]
    sec, _, csec = first.partition(".")
    return int(sec) * 1_000_000 + int(csec[:2].ljust(2, "0")) * 10_000


# === process trees, pid namespaces, cgroups, shared memory ====================================


def read_children(pid: int, proc_root: Path = PROC_ROOT) -> list[int]:
    """Children of every thread of ``pid`` (``/proc/PID/task/TID/children``, Linux >= 3.5 with
    CONFIG_PROC_CHILDREN), ascending. A thread that exits meanwhile contributes nothing; the
    list is exact only while the process cannot fork (stopped), which is how freezers use it."""
    children: set[int] = set()
    for tid in list_threads(pid, proc_root):
        try:
            raw = _read_bytes(proc_root / str(pid) / "task" / str(tid) / "children")
        except OSError as err:
            if err.errno in _GONE_ERRNOS:
                continue
            with translate_errors(pid, proc_root):
                raise
        children.update(int(tok) for tok in raw.split())
    return sorted(children)


def process_tree(root: int, proc_root: Path = PROC_ROOT) -> list[int]:
    """``root`` and all its descendants, ascending. ``ProcessGone`` only if ``root`` is gone;
    descendants that exit while the tree is walked are left out."""
    found = {root}
    todo = [root]
    while todo:
        pid = todo.pop()
        try:
            kids = read_children(pid, proc_root)
        except ProcessGone:
            if pid == root:
                raise
            found.discard(pid)
            continue
        for kid in kids:
            if kid not in found:
                found.add(kid)
                todo.append(kid)
    return sorted(found)


def read_vpid(pid: int, proc_root: Path = PROC_ROOT) -> int:
    """The process's pid in its own (innermost) pid namespace: the last ``NSpid`` field of its
    status (Linux >= 4.1), which is how CRIU names task images; ``pid`` where there is none."""
    with translate_errors(pid, proc_root):
        text = _read_bytes(proc_root / str(pid) / "status").decode("ascii", "replace")
    for line in text.splitlines():
        if line.startswith("NSpid:"):
            fields = line.split()[1:]
            if fields:
                return int(fields[-1])
    return pid


def cgroup2_mount(proc_root: Path = PROC_ROOT) -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (``/sys/fs/cgroup``, or ``/sys/fs/cgroup/unified``
    on hybrid systems), from ``/proc/self/mountinfo``; None if it is not mounted."""
    try:
        text = (proc_root / "self" / "mountinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if sep and right.split()[:1] == ["cgroup2"]:
            return Path(left.split()[4].replace("\\040", " "))
    return None


def read_cgroup2(pid: int, proc_root: Path = PROC_ROOT) -> str | None:
    """The process's cgroup v2 path relative to the hierarchy's root (``/a/b``), from the ``0::``
    line of ``/proc/PID/cgroup``; None without one."""
    with translate_errors(pid, proc_root):
        text = _read_bytes(proc_root / str(pid) / "cgroup").decode("utf-8", "surrogateescape")
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


def cgroup_procs(cgroup_dir: Path) -> list[int]:
    """Every process of a cgroup v2 directory and of its descendants (``cgroup.procs`` of each:
    freezing a cgroup freezes its whole subtree), ascending. OSError if it is not a cgroup."""
    pids: set[int] = set()
    for dirpath, _dirs, files in os.walk(cgroup_dir):
        if "cgroup.procs" not in files:
            continue
        try:
            text = (Path(dirpath) / "cgroup.procs").read_text()
        except FileNotFoundError:
            continue  # removed while walking
        pids.update(int(tok) for tok in text.split())
    if not (cgroup_dir / "cgroup.procs").exists():
        raise FileNotFoundError(errno.ENOENT, "not a cgroup v2 directory", str(cgroup_dir))
    return sorted(pids)


# Shared anonymous memory as /proc/PID/maps shows it (mm/shmem.c, ipc/shm.c, mm/memfd.c): the
# backing file of MAP_SHARED|MAP_ANONYMOUS is "/dev/zero (deleted)", SysV segments are
# "/SYSV%08x (deleted)" (the key), memfds "/memfd:NAME (deleted)"; shared anonymous mappings
# named with PR_SET_VMA_ANON_NAME show "[anon_shmem:NAME]". Their inode column is the inode of
# the shmem file, the same in every process that maps the object (CRIU's shmid); for a SysV
# segment it is the segment's id (ipc/shm.c sets i_ino), which may be 0.
_SHMEM_PREFIXES: Final = ("/dev/zero", "/SYSV", "/memfd:", "[anon_shmem:")


def is_shared_anon(entry: MapsEntry) -> bool:
    """A MAP_SHARED mapping of anonymous shared memory (dumped once per object, not per process)."""
    return entry.shared and entry.path.startswith(_SHMEM_PREFIXES)


PF_KTHREAD: Final = 0x00200000  # include/linux/sched.h (Linux 6.18): the task is a kernel thread


def _stat_fields(pid: int, proc_root: Path) -> list[bytes]:
    """Fields 3 onwards of ``/proc/PID/stat`` (after the comm, which may hold spaces and ')')."""
    with translate_errors(pid, proc_root):
        raw = _read_bytes(proc_root / str(pid) / "stat")
    return raw.rsplit(b")", 1)[1].split()


def is_kernel_thread(pid: int, proc_root: Path = PROC_ROOT) -> bool:
    """Field 9 of ``/proc/PID/stat``, the task flags, has PF_KTHREAD."""
    return bool(int(_stat_fields(pid, proc_root)[6]) & PF_KTHREAD)


def ancestors(pid: int, proc_root: Path = PROC_ROOT) -> list[int]:
    """``pid``'s parent, grandparent, ... up to (and without) pid 0."""
    out: list[int] = []
    while True:
        pid = int(_stat_fields(pid, proc_root)[1])
        if pid <= 0:
            return out
        out.append(pid)


def read_start_time(pid: int, proc_root: Path = PROC_ROOT) -> int:
    """When the process started, in clock ticks after boot (field 22 of ``/proc/PID/stat``): with
    the pid, it names one process across pid reuse (CRIU's ``detect_pid_reuse`` uses it too)."""
    return int(_stat_fields(pid, proc_root)[19])

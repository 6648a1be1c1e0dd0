"""pagehaul.procfs on a fake procfs root, plus a cross-check against the real /proc/self."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from pagehaul import procfs
from pagehaul.errors import AccessDenied, ProcessGone
from pagehaul.procfs import MapsEntry, Vma, VmaKind
from pagehaul.v1 import migration_pb2

PID = 4242

MAPS = b"""\
55d0c0a00000-55d0c0a02000 r--p 00000000 fd:01 1048612                    /usr/bin/cat
55d0c0a02000-55d0c0a07000 r-xp 00002000 fd:01 1048612                    /usr/bin/cat
55d0c0a0c000-55d0c0a0d000 rw-p 0000b000 fd:01 1048612                    /usr/bin/cat
55d0c1c3e000-55d0c1c5f000 rw-p 00000000 00:00 0                          [heap]
7f1a20000000-7f1a20021000 rw-p 00000000 00:00 0\x20
7f1a20021000-7f1a24000000 ---p 00000000 00:00 0\x20
7f1a25000000-7f1a25100000 rw-s 00000000 00:01 2053                       /dev/zero (deleted)
7f1a25100000-7f1a25200000 rw-s 00000000 00:01 32769                      /SYSV00000000 (deleted)
7f1a25200000-7f1a25300000 rw-s 00000000 fd:01 77                         /var/lib/shared.db
7f1a25300000-7f1a25301000 rw-p 00000000 00:00 0                          [anon:my buffer]
7f1a25301000-7f1a25302000 rw-s 00000000 00:01 12                         [anon_shmem:ring]
7f1a25400000-7f1a25402000 rw-p 00004000 fd:01 99                         /srv/a file with spaces (deleted)
7ffd5a5e0000-7ffd5a601000 rw-p 00000000 00:00 0                          [stack]
7ffd5a6f0000-7ffd5a6f4000 r--p 00000000 00:00 0                          [vvar]
7ffd5a6f4000-7ffd5a6f5000 r--p 00000000 00:00 0                          [vvar_vclock]
7ffd5a6f5000-7ffd5a6f7000 r-xp 00000000 00:00 0                          [vdso]
7ffd5a6f7000-7ffd5a6f8000 r-xp 00000000 00:00 0                          [uprobes]
7ffd5a6f8000-7ffd5a6f9000 r-xp 00000000 00:00 0                          [mystery]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
"""

STATUS = """\
Name:\tmy (weird) name
Umask:\t0022
State:\tt (tracing stop)
Tgid:\t4242
Ngid:\t0
Pid:\t4242
PPid:\t1
TracerPid:\t777
Threads:\t3
"""


@pytest.fixture
def fake_proc(tmp_path: Path) -> Path:
    root = tmp_path / "proc"
    pid_dir = root / str(PID)
    (pid_dir / "task").mkdir(parents=True)
    for tid in (4242, 4250, 4244):
        (pid_dir / "task" / str(tid)).mkdir()
    (pid_dir / "maps").write_bytes(MAPS)
    (pid_dir / "status").write_text(STATUS)
    (pid_dir / "comm").write_bytes(b"my (weird) name\n")
    (root / "uptime").write_text("12345.67 23456.78\n")
    return root


def test_read_maps_parses_every_field(fake_proc: Path) -> None:
    entries = procfs.read_maps(PID, fake_proc)
    assert len(entries) == MAPS.count(b"\n")
    text = entries[1]
    assert text == MapsEntry(0x55D0C0A02000, 0x55D0C0A07000, "r-xp", 0x2000, os.makedev(0xFD, 1), 1048612,
                             "/usr/bin/cat")
    assert text.prot == procfs.PROT_READ | procfs.PROT_EXEC
    assert not text.shared
    assert entries[4].path == ""  # trailing space, no path
    assert entries[5].prot == 0
    assert entries[6].shared
    assert entries[11].path == "/srv/a file with spaces (deleted)"
    assert entries[11].pgoff == 0x4000
    assert entries[-1].start == 0xFFFFFFFFFF600000


def test_select_dumpable(fake_proc: Path) -> None:
    vmas = procfs.select_dumpable(procfs.read_maps(PID, fake_proc))
    got = [(v.start, v.kind, v.path) for v in vmas]
    assert got == [
        (0x55D0C0A00000, VmaKind.FILE_PRIVATE, "/usr/bin/cat"),
        (0x55D0C0A02000, VmaKind.FILE_PRIVATE, "/usr/bin/cat"),
        (0x55D0C0A0C000, VmaKind.FILE_PRIVATE, "/usr/bin/cat"),
        (0x55D0C1C3E000, VmaKind.HEAP, "[heap]"),
        (0x7F1A20000000, VmaKind.ANON, ""),
        (0x7F1A20021000, VmaKind.ANON, ""),  # PROT_NONE is kept; the reader uses /proc/PID/mem
        (0x7F1A25300000, VmaKind.ANON, "[anon:my buffer]"),
        (0x7F1A25400000, VmaKind.FILE_PRIVATE, "/srv/a file with spaces (deleted)"),
        (0x7FFD5A5E0000, VmaKind.STACK, "[stack]"),
    ]
    assert vmas[2] == Vma(0x55D0C0A0C000, 0x55D0C0A0D000, procfs.PROT_READ | procfs.PROT_WRITE,
                          VmaKind.FILE_PRIVATE, 0xB000, "/usr/bin/cat")
    assert vmas[5].prot == 0


def test_vma_kind_mirrors_wire_enum() -> None:
    for kind in VmaKind:
        assert migration_pb2.VmaKind.Value(f"VMA_KIND_{kind.name}") == kind.value


def test_read_status(fake_proc: Path) -> None:
    status = procfs.read_status(PID, fake_proc)
    assert status == procfs.ProcStatus(name="my (weird) name", tgid=4242, ppid=1, tracer_pid=777, state="t",
                                       threads=3)


def test_list_threads_comm_uptime(fake_proc: Path) -> None:
    assert procfs.list_threads(PID, fake_proc) == [4242, 4244, 4250]
    assert procfs.read_comm(PID, fake_proc) == "my (weird) name"
    assert procfs.read_uptime_us(fake_proc) == 12345 * 1_000_000 + 67 * 10_000


def test_missing_process_is_gone(fake_proc: Path) -> None:
    for call in (procfs.read_maps, procfs.read_status, procfs.list_threads, procfs.read_comm):
        with pytest.raises(ProcessGone) as info:
            call(PID + 1, fake_proc)
        assert info.value.pid == PID + 1


def test_missing_file_of_live_process_is_not_gone(fake_proc: Path) -> None:
    (fake_proc / str(PID) / "comm").unlink()
    with pytest.raises(FileNotFoundError):
        procfs.read_comm(PID, fake_proc)


def test_proc_fd_owns_one_fd(fake_proc: Path) -> None:
    class Maps(procfs.ProcFd):
        def __init__(self) -> None:
            self._fd = procfs.open_proc(PID, "maps", fake_proc)

    with Maps() as f:
        fd = f._fd
        assert os.pread(fd, 12, 0) == MAPS[:12]
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)
    f.close()  # idempotent
    assert f._fd == -1
    with pytest.raises(ProcessGone):
        procfs.open_proc(PID + 1, "maps", fake_proc)


@pytest.mark.parametrize(("err", "expected"), [
    (errno.ESRCH, ProcessGone), (errno.EACCES, AccessDenied), (errno.EPERM, AccessDenied),
])
def test_translate_errors(fake_proc: Path, err: int, expected: type[Exception]) -> None:
    with pytest.raises(expected) as info, procfs.translate_errors(PID, fake_proc):
        raise OSError(err, os.strerror(err), "/proc/4242/maps")
    assert isinstance(info.value.__cause__, OSError)
    assert "4242" in str(info.value)


def test_other_errors_pass_through(fake_proc: Path) -> None:
    with pytest.raises(OSError, match="io") as info, procfs.translate_errors(PID, fake_proc):
        raise OSError(errno.EIO, "io")
    assert info.value.errno == errno.EIO


def test_malformed_input_is_reported(fake_proc: Path) -> None:
    (fake_proc / str(PID) / "maps").write_bytes(b"55d0c0a00000-55d0c0a02000 r--p\n")
    with pytest.raises(ValueError, match="malformed"):
        procfs.read_maps(PID, fake_proc)
    (fake_proc / str(PID) / "status").write_text("Name:\tx\n")
    with pytest.raises(ValueError, match="status"):
        procfs.read_status(PID, fake_proc)


def test_real_proc_self_agrees_with_itself() -> None:
    pid = os.getpid()
    status = procfs.read_status(pid)
    assert status.tgid == pid
    assert status.ppid == os.getppid()
    assert status.tracer_pid == 0 or status.tracer_pid > 0
    assert status.name == procfs.read_comm(pid)
    assert status.threads == len(procfs.list_threads(pid))
    entries = procfs.read_maps(pid)
    assert entries == sorted(entries, key=lambda e: e.start)
    kinds = {v.kind for v in procfs.select_dumpable(entries)}
    assert {VmaKind.STACK, VmaKind.FILE_PRIVATE, VmaKind.ANON} <= kinds
    assert procfs.read_uptime_us() > 0

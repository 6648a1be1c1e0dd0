"""Copy pages of another process into a local buffer.

Some facts about reading another process's memory (mm/process_vm_access.c, fs/proc/base.c
``mem_rw``, observed on Linux 6.18):

* ``process_vm_readv`` pins the remote pages like a user access would (no FOLL_FORCE), so it
  faults on PROT_NONE and on unmapped pages. It copies in iovec order and stops at the first
  page it cannot pin, returning the bytes copied so far. Unlike what the man page says it
  *does* stop in the middle of an iovec: one iovec over 8 pages whose pages 4-5 are PROT_NONE
  returns 4 pages. When the very first page faults it fails with EFAULT; a vanished process is
  ESRCH. The local side is one iovec over the output buffer; the remote side takes up to
  IOV_MAX (1024) iovecs, one per run.
* ``/proc/PID/mem`` reads with FOLL_FORCE, so it also reads PROT_NONE and non-readable
  private mappings (as CRIU and gdb rely on). A read stops at the first unreadable page and
  returns the bytes so far, or fails with EIO if that is the first page. After the process's
  mm is gone it returns 0 bytes.
* Both copy the page contents at call time: a page the target writes during the copy may be
  torn. Callers read a frozen target, or track dirtiness and send such pages again.

The reader tries ``process_vm_readv`` (the fast path: up to 1024 runs, one iovec each, into one
buffer per call) and, when it stops short, reads the rest of the offending run through
``/proc/PID/mem``, then goes back to ``process_vm_readv`` for the following runs.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from pagehaul import kernel
from pagehaul.errors import AccessDenied, ProcessError, ProcessGone
from pagehaul.procfs import PROC_ROOT, ProcFd, open_proc, translate_errors
from pagehaul.runs import Runs

# Bytes per process_vm_readv call. The kernel caps one call at MAX_RW_COUNT (2 GiB - 4 KiB)
# and returns short beyond it; a smaller cap keeps every call's work bounded.
MAX_CALL_BYTES: Final = 256 << 20

Buffer = bytearray | memoryview | npt.NDArray[np.generic]  # any C-contiguous writable bytes


def _byte_view(out: Buffer) -> npt.NDArray[np.uint8]:
    if isinstance(out, np.ndarray):
        if not out.flags.c_contiguous:
            raise ValueError("out must be C-contiguous")
        arr: npt.NDArray[np.uint8] = out.reshape(-1).view(np.uint8)
    else:
        arr = np.frombuffer(out, dtype=np.uint8)
    if not arr.flags.writeable:
        raise ValueError("out is read-only")
    return arr


class _Iovecs:
    """One thread's iovec arrays: numpy for filling by column, ctypes views for the kernel.

    Kept referenced (thread-local) for as long as the kernel may read them.
    """

    def __init__(self) -> None:
        self.remote = np.zeros(kernel.IOV_MAX, dtype=kernel.IOVEC_DTYPE)
        self.remote_c = kernel.iovec_view(self.remote)
        self.local = np.zeros(1, dtype=kernel.IOVEC_DTYPE)
        self.local_c = kernel.iovec_view(self.local)


class MemoryReader(ProcFd):
    """Reads page runs of ``pid``.

    ``read`` may be called from several threads at once (the agent's worker pool shares one
    reader): each thread gets its own iovec arrays, and the kernel calls share nothing else.
    The counters are statistics only and may undercount under concurrency.
    """

    def __init__(self, pid: int, proc_root: Path = PROC_ROOT, max_call_bytes: int = MAX_CALL_BYTES) -> None:
        self.pid = pid
        self._proc_root = proc_root
        self._max_call_bytes = max_call_bytes
        self._fd = open_proc(pid, "mem", proc_root)
        self._local = threading.local()
        self.vm_readv_calls = 0
        self.mem_reads = 0
        self.mem_read_bytes = 0


    def read(self, runs: Runs, out: Buffer, page_size: int = kernel.PAGE_SIZE) -> None:
        """Fill ``out`` with the pages of ``runs``, in run order, packed back to back.

        ``out`` must hold at least ``runs.total_pages * page_size`` bytes; bytes beyond that
        are left alone. Raises ``ProcessGone`` if the process exits, ``ProcessError`` naming
        the address if a page is readable through neither interface (unmapped meanwhile).
        """
        buf = _byte_view(out)  # referenced until return: the local iovec points into it
        total = runs.total_pages * page_size
        if buf.size < total:
            raise ValueError(f"out holds {buf.size} bytes, the runs need {total}")
        if total == 0:
            return
        run_bytes = runs.nr_pages * np.uint64(page_size)
        run_end = np.cumsum(run_bytes)  # offset in out just past each run
        iov = self._iovecs()
        base = int(buf.ctypes.data)
        pos = 0
        while pos < total:
            first = int(np.searchsorted(run_end, pos, side="right"))  # the run holding byte pos
            skip = pos - int(run_end[first] - run_bytes[first])
            count, call_bytes = self._fill_remote(iov.remote, runs, run_bytes, run_end,
                                                  first=first, skip=skip, pos=pos)
            iov.local["iov_base"][0] = base + pos
            iov.local["iov_len"][0] = call_bytes
            got = self._vm_readv(iov, count)
            if got > 0:
                pos += got
                continue
            # The page at pos faults for process_vm_readv (PROT_NONE, or gone): read the rest
            # of its run with FOLL_FORCE.
            vaddr = int(runs.vaddr[first]) + skip
            pos += self._read_mem(vaddr, buf[pos:pos + int(run_bytes[first]) - skip])

    def _iovecs(self) -> _Iovecs:
        iov: _Iovecs | None = getattr(self._local, "iovecs", None)
        if iov is None:
            iov = self._local.iovecs = _Iovecs()
        return iov

    def _fill_remote(self, remote: npt.NDArray[np.void], runs: Runs, run_bytes: npt.NDArray[np.uint64],
                     run_end: npt.NDArray[np.uint64], *, first: int, skip: int, pos: int) -> tuple[int, int]:
        """Point the remote iovecs at the runs from byte ``pos`` on; returns (count, bytes)."""
        stop = min(first + kernel.IOV_MAX, len(runs))
        # Bytes each iovec ends at, counted from pos; cut where the call cap is reached.
        ends = run_end[first:stop] - np.uint64(pos)
        count = min(int(np.searchsorted(ends, self._max_call_bytes, side="left")) + 1, stop - first)
        riov = remote[:count]
        riov["iov_base"] = runs.vaddr[first:first + count]
        riov["iov_len"] = run_bytes[first:first + count]
        riov["iov_base"][0] += np.uint64(skip)
        riov["iov_len"][0] -= np.uint64(skip)
        call_bytes = int(ends[count - 1])
        if call_bytes > self._max_call_bytes:
            riov["iov_len"][count - 1] -= np.uint64(call_bytes - self._max_call_bytes)
            call_bytes = self._max_call_bytes
        return count, call_bytes

    def _vm_readv(self, iov: _Iovecs, count: int) -> int:
        self.vm_readv_calls += 1
        try:
            return kernel.process_vm_readv(self.pid, iov.local_c, 1, iov.remote_c, count)
        except OSError as err:
            if err.errno == errno.EFAULT:
                return 0
            if err.errno == errno.ESRCH:
                raise ProcessGone(self.pid, f"process {self.pid} is gone") from err
            if err.errno in (errno.EPERM, errno.EACCES):
                raise AccessDenied(self.pid, f"process_vm_readv on process {self.pid} denied") from err
            raise

    def _read_mem(self, vaddr: int, dest: npt.NDArray[np.uint8]) -> int:
        self.mem_reads += 1
        try:
            with translate_errors(self.pid, self._proc_root):
                got = os.preadv(self._fd, [dest.data], vaddr)
        except OSError as err:
            if err.errno == errno.EIO:
                raise ProcessError(self.pid, f"page at 0x{vaddr:x} of process {self.pid} is readable through "
                                             "neither process_vm_readv nor /proc/PID/mem "
                                             "(unmapped meanwhile?)") from err
            raise
        if got == 0:
            raise ProcessGone(self.pid, f"process {self.pid} exited while its memory was read")
        self.mem_read_bytes += got
        return got

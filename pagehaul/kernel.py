"""Every ctypes binding and kernel uapi mirror pagehaul uses, in one place.

Nothing else imports ctypes. Each struct and constant group names the header it mirrors and the
kernel it was checked against; ``tests/unit/test_kernel.py`` asserts struct sizes and ioctl
numbers so a typo in a mirror fails CI instead of corrupting a syscall argument.

Target ABI: Linux on x86-64. The ioctl encoding below is asm-generic (x86-64, arm64, riscv);
powerpc, mips and sparc encode direction bits differently. Syscall numbers and
``user_regs_struct`` are x86-64 only. Importing on anything else raises ``ImportError`` so a
wrong number can never reach the kernel.

Some facts about calling libc through ctypes (the trio ``_subprocess.py`` pattern):

* ``CDLL(None, use_errno=True)`` resolves symbols in the already-loaded libc; with
  ``use_errno`` ctypes swaps a private errno copy in and out around each call, so
  ``ctypes.get_errno()`` right after the call is the call's errno, unaffected by other Python
  code. ``ptrace(PTRACE_PEEK*)`` returns data, so -1 is a valid word: clear errno first with
  ``ctypes.set_errno(0)`` and check it afterwards.
* Every function gets explicit ``argtypes``/``restype``; without them ctypes converts Python
  ints to C ``int`` (a 64-bit address does not fit) and reads every result as ``int``.
* ctypes structures and iovec arrays hold raw addresses. The memory an iovec points at must
  stay referenced for the whole call, or the kernel writes into freed heap.
  ``iovecs_from_numpy`` returns arrays that keep their own storage alive; the buffers they
  point into are the caller's responsibility.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import sys
from typing import TYPE_CHECKING, Final

import numpy as np
import numpy.typing as npt

assert not TYPE_CHECKING or sys.platform == "linux"

if sys.platform != "linux" or platform.machine() != "x86_64":
    raise ImportError(f"pagehaul.kernel mirrors the Linux x86-64 ABI only, not {platform.machine()}")

PAGE_SIZE: Final = mmap.PAGESIZE

_libc = ctypes.CDLL(None, use_errno=True)

_u64 = ctypes.c_uint64


def _check(ret: int) -> int:
    """Raise ``OSError`` from the saved errno when a libc call returned -1."""
    if ret == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


# --- ioctl number encoding ------------------------------------------------------------------
# include/uapi/asm-generic/ioctl.h (Linux 6.18): nr 8 bits, type 8 bits, size 14 bits, dir 2 bits.

_IOC_NRBITS: Final = 8
_IOC_TYPEBITS: Final = 8
_IOC_SIZEBITS: Final = 14
_IOC_NRSHIFT: Final = 0
_IOC_TYPESHIFT: Final = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT: Final = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT: Final = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE: Final = 0
_IOC_WRITE: Final = 1
_IOC_READ: Final = 2


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:  # noqa: N802 - kernel macro name
    if not 0 <= size < (1 << _IOC_SIZEBITS):
        raise ValueError(f"ioctl argument size {size} does not fit {_IOC_SIZEBITS} bits")
    return ((direction << _IOC_DIRSHIFT) | (type_ << _IOC_TYPESHIFT)
            | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT))


def _IOR(type_: int, nr: int, struct: type[ctypes.Structure]) -> int:  # noqa: N802 - kernel macro name
    return _IOC(_IOC_READ, type_, nr, ctypes.sizeof(struct))


def _IOWR(type_: int, nr: int, struct: type[ctypes.Structure]) -> int:  # noqa: N802 - kernel macro name
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, ctypes.sizeof(struct))


_libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_libc.ioctl.restype = ctypes.c_int


def _ioctl(fd: int, request: int, arg: ctypes.Structure) -> int:
    return _check(_libc.ioctl(fd, request, ctypes.byref(arg)))


# --- /proc/PID/pagemap entries ---------------------------------------------------------------
# Documentation/admin-guide/mm/pagemap.rst (Linux 6.18), fs/proc/task_mmu.c PM_* macros.
# One little-endian u64 per virtual page at offset (vaddr / PAGE_SIZE) * 8.

PM_PRESENT: Final = 1 << 63
PM_SWAP: Final = 1 << 62
PM_FILE: Final = 1 << 61  # file-backed page or shared anonymous (shmem) page
PM_GUARD_REGION: Final = 1 << 58  # MADV_GUARD_INSTALL marker (6.15); such entries also carry PM_SWAP
PM_UFFD_WP: Final = 1 << 57
PM_MMAP_EXCLUSIVE: Final = 1 << 56
PM_SOFT_DIRTY: Final = 1 << 55
PM_PFRAME_BITS: Final = 55
PM_PFRAME_MASK: Final = (1 << PM_PFRAME_BITS) - 1  # PFN when present, zero without CAP_SYS_ADMIN

# A non-present entry with PM_SWAP holds ``swap type | swap offset << 5`` in the PFN bits (only
# with CAP_SYS_ADMIN, like PFNs). PTE markers (include/linux/swapops.h, 5.19+: uffd-wp markers
# on write-protected never-populated ptes, guard markers, poison markers) are swap entries of
# the last type, SWP_PTE_MARKER = (1 << MAX_SWAPFILES_SHIFT) - SWP_PTE_MARKER_NUM = 31 on every
# configuration (include/linux/swap.h); real swap files and migration/device entries use lower
# types. A uffd-wp marker reads 0x420000000000003f (PM_SWAP | PM_UFFD_WP, type 31, offset 1,
# observed on 6.18).
PM_SWAP_TYPE_MASK: Final = (1 << 5) - 1  # MAX_SWAPFILES_SHIFT = 5
SWP_PTE_MARKER: Final = 31


# --- PAGEMAP_SCAN ----------------------------------------------------------------------------
# include/uapi/linux/fs.h (Linux 6.18). The ioctl appeared in 6.7, PAGE_IS_SOFT_DIRTY in 6.8,
# PAGE_IS_GUARD in 6.15; an unknown category bit or flag is EINVAL, a kernel without the ioctl
# answers ENOTTY.

PROCFS_IOCTL_MAGIC: Final = ord("f")

PM_SCAN_WP_MATCHING: Final = 1 << 0  # write-protect matched pages atomically with the get
PM_SCAN_CHECK_WPASYNC: Final = 1 << 1  # abort if a page is not registered for uffd async WP

PAGE_IS_WPALLOWED: Final = 1 << 0
PAGE_IS_WRITTEN: Final = 1 << 1
PAGE_IS_FILE: Final = 1 << 2
PAGE_IS_PRESENT: Final = 1 << 3
PAGE_IS_SWAPPED: Final = 1 << 4
PAGE_IS_PFNZERO: Final = 1 << 5
PAGE_IS_HUGE: Final = 1 << 6
PAGE_IS_SOFT_DIRTY: Final = 1 << 7
PAGE_IS_GUARD: Final = 1 << 8


class page_region(ctypes.Structure):
    _fields_ = (
        ("start", _u64),
        ("end", _u64),  # exclusive
        ("categories", _u64),
    )


# The same layout as a numpy dtype, so the ioctl can fill a reused numpy array and the result is
# turned into runs by column arithmetic instead of a Python loop over regions.
PAGE_REGION_DTYPE: Final = np.dtype([("start", np.uint64), ("end", np.uint64), ("categories", np.uint64)])


class pm_scan_arg(ctypes.Structure):
    _fields_ = (
        ("size", _u64),  # sizeof(struct pm_scan_arg), lets the kernel grow the struct
        ("flags", _u64),
        ("start", _u64),
        ("end", _u64),
        ("walk_end", _u64),  # out: where the walk stopped
        ("vec", _u64),  # address of struct page_region[vec_len]
        ("vec_len", _u64),
        ("max_pages", _u64),  # 0 = unlimited
        ("category_inverted", _u64),
        ("category_mask", _u64),
        ("category_anyof_mask", _u64),
        ("return_mask", _u64),
    )


PAGEMAP_SCAN: Final = _IOWR(PROCFS_IOCTL_MAGIC, 16, pm_scan_arg)


def pagemap_scan(fd: int, arg: pm_scan_arg) -> int:
    """Run ``ioctl(fd, PAGEMAP_SCAN, &arg)`` on an open ``/proc/PID/pagemap``.

    Returns the number of ``page_region`` entries written to ``arg.vec``; ``arg.walk_end`` is
    updated in place. ``arg.size`` is filled in if left zero. The caller keeps the ``vec``
    buffer alive.
    """
    if arg.size == 0:
        arg.size = ctypes.sizeof(pm_scan_arg)
    return _ioctl(fd, PAGEMAP_SCAN, arg)


# --- process_vm_readv ------------------------------------------------------------------------
# include/uapi/linux/uio.h (Linux 6.18): struct iovec, UIO_MAXIOV = 1024 (IOV_MAX in glibc).


class iovec(ctypes.Structure):
    _fields_ = (
        ("iov_base", ctypes.c_void_p),
        ("iov_len", ctypes.c_size_t),
    )


IOV_MAX: Final = 1024

IOVEC_DTYPE: Final = np.dtype([("iov_base", np.uint64), ("iov_len", np.uint64)])

IovecArray = ctypes.Array[iovec]


def iovec_view(array: npt.NDArray[np.void]) -> IovecArray:
    """A ctypes ``struct iovec[]`` sharing memory with a numpy ``IOVEC_DTYPE`` array.

    Writes to ``array["iov_base"]``/``array["iov_len"]`` show through. ctypes ``from_buffer``
    keeps a reference to ``array``, so the iovec storage lives as long as the view.
    """
    if array.dtype != IOVEC_DTYPE or array.ndim != 1 or not array.flags.c_contiguous:
        raise ValueError("need a 1-D C-contiguous array of IOVEC_DTYPE")
    return (iovec * array.size).from_buffer(array.data)


def iovecs_from_numpy(bases: npt.ArrayLike, lengths: npt.ArrayLike) -> IovecArray:
    """Build ``struct iovec[]`` from address and length columns without a per-element loop."""
    base_arr = np.asarray(bases, dtype=np.uint64).reshape(-1)
    len_arr = np.asarray(lengths, dtype=np.uint64).reshape(-1)
    if base_arr.shape != len_arr.shape:
        raise ValueError(f"bases and lengths differ in length: {base_arr.size} vs {len_arr.size}")
    array = np.empty(base_arr.size, dtype=IOVEC_DTYPE)
    array["iov_base"] = base_arr
    array["iov_len"] = len_arr
    return iovec_view(array)


_libc.process_vm_readv.argtypes = (
    ctypes.c_int,  # pid_t
    ctypes.c_void_p, ctypes.c_ulong,  # local iov, liovcnt
    ctypes.c_void_p, ctypes.c_ulong,  # remote iov, riovcnt
    ctypes.c_ulong,  # flags, must be 0
)
_libc.process_vm_readv.restype = ctypes.c_ssize_t


def process_vm_readv(pid: int, local_iov: IovecArray, liovcnt: int,
                     remote_iov: IovecArray, riovcnt: int) -> int:
    """Copy from ``pid``'s memory described by ``remote_iov[:riovcnt]`` into ``local_iov[:liovcnt]``.

    Returns the number of bytes copied, which is short when a remote page faults (the copy
    stops there); raises ``OSError`` (EFAULT when the very first byte faults, ESRCH when the
    process is gone, EPERM without ptrace access). At most ``IOV_MAX`` entries per side.
    """
    if not (0 <= liovcnt <= len(local_iov) and 0 <= riovcnt <= len(remote_iov)):
        raise ValueError("iovec count exceeds the array it describes")
    if liovcnt > IOV_MAX or riovcnt > IOV_MAX:
        raise ValueError(f"at most {IOV_MAX} iovecs per process_vm_readv call")
    ret = _libc.process_vm_readv(pid, ctypes.addressof(local_iov), liovcnt,
                                 ctypes.addressof(remote_iov), riovcnt, 0)
    return _check(int(ret))


# --- ptrace ----------------------------------------------------------------------------------
# include/uapi/linux/ptrace.h and arch/x86/include/uapi/asm/ptrace-abi.h (Linux 6.18).

PTRACE_TRACEME: Final = 0
PTRACE_PEEKTEXT: Final = 1
PTRACE_PEEKDATA: Final = 2
PTRACE_PEEKUSER: Final = 3
PTRACE_POKETEXT: Final = 4
PTRACE_POKEDATA: Final = 5
PTRACE_POKEUSER: Final = 6
PTRACE_CONT: Final = 7
PTRACE_KILL: Final = 8
PTRACE_SINGLESTEP: Final = 9
PTRACE_GETREGS: Final = 12  # x86 asm/ptrace-abi.h
PTRACE_SETREGS: Final = 13  # x86 asm/ptrace-abi.h
PTRACE_ATTACH: Final = 16
PTRACE_DETACH: Final = 17
PTRACE_SYSCALL: Final = 24
PTRACE_SETOPTIONS: Final = 0x4200
PTRACE_GETEVENTMSG: Final = 0x4201
PTRACE_GETSIGINFO: Final = 0x4202
PTRACE_SETSIGINFO: Final = 0x4203
PTRACE_SEIZE: Final = 0x4206
PTRACE_INTERRUPT: Final = 0x4207
PTRACE_LISTEN: Final = 0x4208
PTRACE_GETSIGMASK: Final = 0x420A  # 3.11; addr = sizeof(kernel sigset_t) = 8, data = &mask
PTRACE_SETSIGMASK: Final = 0x420B

PTRACE_O_TRACESYSGOOD: Final = 1
PTRACE_O_TRACEFORK: Final = 1 << 1
PTRACE_O_TRACEVFORK: Final = 1 << 2
PTRACE_O_TRACECLONE: Final = 1 << 3
PTRACE_O_TRACEEXEC: Final = 1 << 4
PTRACE_O_TRACEVFORKDONE: Final = 1 << 5
PTRACE_O_TRACEEXIT: Final = 1 << 6
PTRACE_O_TRACESECCOMP: Final = 1 << 7
PTRACE_O_EXITKILL: Final = 1 << 20
PTRACE_O_SUSPEND_SECCOMP: Final = 1 << 21

# Event codes, reported in waitpid status bits 16-23 (status >> 16).
PTRACE_EVENT_FORK: Final = 1
PTRACE_EVENT_VFORK: Final = 2
PTRACE_EVENT_CLONE: Final = 3
PTRACE_EVENT_EXEC: Final = 4
PTRACE_EVENT_VFORK_DONE: Final = 5
PTRACE_EVENT_EXIT: Final = 6
PTRACE_EVENT_SECCOMP: Final = 7
PTRACE_EVENT_STOP: Final = 128  # PTRACE_INTERRUPT and group-stop under PTRACE_SEIZE

# include/uapi/linux/wait.h (Linux 6.18): wait for any child, clone or not. Without it waitpid
# does not see non-leader threads, which are "clone children" of their tracer.
WALL: Final = 0x40000000


class user_regs_struct(ctypes.Structure):
    """arch/x86/include/asm/user_64.h (Linux 6.18), the PTRACE_GETREGS/SETREGS layout."""

    _fields_ = tuple((name, ctypes.c_ulong) for name in (
        "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8",
        "rax", "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss",
        "fs_base", "gs_base", "ds", "es", "fs", "gs",
    ))


# long ptrace(enum __ptrace_request, pid_t, void *addr, void *data): variadic in glibc, but on
# x86-64 variadic integer arguments travel in the same registers, so fixed argtypes are safe.
_libc.ptrace.argtypes = (ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_libc.ptrace.restype = ctypes.c_long

_WORD_MASK: Final = (1 << 64) - 1


def ptrace(request: int, pid: int, addr: int = 0, data: int = 0) -> int:
    """``ptrace(2)``; raises ``OSError`` on failure.

    For ``PTRACE_PEEK*`` glibc returns the word read, so -1 is ambiguous: errno is cleared
    before the call and checked after it. Other requests return 0. Must be called from the
    OS thread that attached (the kernel records the tracer per thread).
    """
    ctypes.set_errno(0)
    ret = int(_libc.ptrace(request, pid, addr, data))
    if ret == -1:
        err = ctypes.get_errno()
        if err != 0 or request not in (PTRACE_PEEKTEXT, PTRACE_PEEKDATA, PTRACE_PEEKUSER):
            raise OSError(err, os.strerror(err))
    return ret


def ptrace_peekdata(pid: int, addr: int) -> int:
    """The tracee's 8-byte word at ``addr``, as an unsigned integer."""
    return ptrace(PTRACE_PEEKDATA, pid, addr, 0) & _WORD_MASK


def ptrace_pokedata(pid: int, addr: int, word: int) -> None:
    ptrace(PTRACE_POKEDATA, pid, addr, word & _WORD_MASK)


def ptrace_getregs(pid: int) -> user_regs_struct:
    regs = user_regs_struct()
    ptrace(PTRACE_GETREGS, pid, 0, ctypes.addressof(regs))
    return regs


def ptrace_setregs(pid: int, regs: user_regs_struct) -> None:
    ptrace(PTRACE_SETREGS, pid, 0, ctypes.addressof(regs))


class siginfo_t(ctypes.Structure):
    """include/uapi/asm-generic/siginfo.h (Linux 6.18): 128 bytes; the three ints, padding to 8
    (``__ARCH_SI_PREAMBLE_SIZE`` is 16 on 64-bit), then the union ``_sifields`` (kept opaque)."""

    _fields_ = (
        ("si_signo", ctypes.c_int),
        ("si_errno", ctypes.c_int),
        ("si_code", ctypes.c_int),
        ("_pad", ctypes.c_int),
        ("_sifields", _u64 * 14),
    )


def ptrace_getsiginfo(pid: int) -> siginfo_t:
    """The siginfo of the stop the tracee is in (kernel/ptrace.c ptrace_getsiginfo).

    A signal-delivery-stop shows the dequeued signal; a PTRACE_EVENT_STOP (interrupt or
    group-stop of a seized tracee) shows ``si_code == SIGTRAP | PTRACE_EVENT_STOP << 8`` (or
    the stop signal in the low byte); a syscall-stop shows ``SIGTRAP | 0x80`` with
    PTRACE_O_TRACESYSGOOD. EINVAL for a group-stop of a tracee attached without SEIZE.
    """
    info = siginfo_t()
    ptrace(PTRACE_GETSIGINFO, pid, 0, ctypes.addressof(info))
    return info


# The kernel's sigset_t is _NSIG = 64 bits on x86-64 (arch/x86/include/uapi/asm/signal.h), one u64;
# bit (signo - 1) stands for signal signo. glibc's 1024-bit sigset_t is a different thing.
KERNEL_SIGSET_BYTES: Final = 8


def ptrace_getsigmask(pid: int) -> int:
    """The tracee's blocked-signal mask. Since 5.1 this is the mask saved by pselect/ppoll/
    sigsuspend (TIF_RESTORE_SIGMASK) while one of them is interrupted, i.e. the mask user code
    will see again (commit fcfc2aa0185f, "ptrace: take into account saved_sigmask")."""
    mask = _u64(0)
    ptrace(PTRACE_GETSIGMASK, pid, KERNEL_SIGSET_BYTES, ctypes.addressof(mask))
    return int(mask.value)


def ptrace_setsigmask(pid: int, mask: int) -> None:
    """Set the tracee's blocked mask; SIGKILL and SIGSTOP are dropped by the kernel, and a
    pending TIF_RESTORE_SIGMASK is cleared (the value set here is the one user code sees)."""
    value = _u64(mask & _WORD_MASK)
    ptrace(PTRACE_SETSIGMASK, pid, KERNEL_SIGSET_BYTES, ctypes.addressof(value))


# --- raw syscalls ----------------------------------------------------------------------------
# arch/x86/entry/syscalls/syscall_64.tbl (Linux 6.18). pidfd_open and pidfd_getfd have the same
# number on every architecture (the unified table from 424 on); userfaultfd does not.

NR_userfaultfd: Final = 323
NR_pidfd_open: Final = 434
NR_pidfd_getfd: Final = 438

_libc.syscall.argtypes = (ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_long)
_libc.syscall.restype = ctypes.c_long


def _syscall(nr: int, a: int = 0, b: int = 0, c: int = 0) -> int:
    return _check(int(_libc.syscall(nr, a, b, c)))


def pidfd_open(pid: int, flags: int = 0) -> int:
    """A pidfd for ``pid`` (Linux 5.3). The caller closes it."""
    return _syscall(NR_pidfd_open, pid, flags)


def pidfd_getfd(pidfd: int, targetfd: int, flags: int = 0) -> int:
    """Duplicate fd ``targetfd`` of the process behind ``pidfd`` into this process (Linux 5.6).

    Needs PTRACE_MODE_ATTACH_REALCREDS over the target; the new fd is close-on-exec.
    """
    return _syscall(NR_pidfd_getfd, pidfd, targetfd, flags)


def userfaultfd(flags: int) -> int:
    """A userfaultfd for the *calling* process's mm (a uffd is bound to its creator's mm)."""
    return _syscall(NR_userfaultfd, flags)


# --- userfaultfd -----------------------------------------------------------------------------
# include/uapi/linux/userfaultfd.h (Linux 6.18). The uffd-wp dirty tracker
# (sender/trackers/uffd.py) creates the fd inside the target and drives it with these.

UFFD_API: Final = 0xAA
UFFDIO: Final = 0xAA
UFFD_USER_MODE_ONLY: Final = 1  # userfaultfd() flag: only user-mode faults (5.11)

UFFD_FEATURE_PAGEFAULT_FLAG_WP: Final = 1 << 0
UFFD_FEATURE_EVENT_FORK: Final = 1 << 1
UFFD_FEATURE_EVENT_REMAP: Final = 1 << 2
UFFD_FEATURE_EVENT_REMOVE: Final = 1 << 3
UFFD_FEATURE_MISSING_HUGETLBFS: Final = 1 << 4
UFFD_FEATURE_MISSING_SHMEM: Final = 1 << 5
UFFD_FEATURE_EVENT_UNMAP: Final = 1 << 6
UFFD_FEATURE_SIGBUS: Final = 1 << 7
UFFD_FEATURE_THREAD_ID: Final = 1 << 8
UFFD_FEATURE_MINOR_HUGETLBFS: Final = 1 << 9
UFFD_FEATURE_MINOR_SHMEM: Final = 1 << 10
UFFD_FEATURE_EXACT_ADDRESS: Final = 1 << 11
UFFD_FEATURE_WP_HUGETLBFS_SHMEM: Final = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED: Final = 1 << 13  # 6.4
UFFD_FEATURE_POISON: Final = 1 << 14
UFFD_FEATURE_WP_ASYNC: Final = 1 << 15  # 6.7; implies WP_UNPOPULATED
UFFD_FEATURE_MOVE: Final = 1 << 16

UFFDIO_REGISTER_MODE_MISSING: Final = 1 << 0
UFFDIO_REGISTER_MODE_WP: Final = 1 << 1
UFFDIO_REGISTER_MODE_MINOR: Final = 1 << 2

UFFDIO_WRITEPROTECT_MODE_WP: Final = 1 << 0
UFFDIO_WRITEPROTECT_MODE_DONTWAKE: Final = 1 << 1

_UFFDIO_REGISTER: Final = 0x00
_UFFDIO_UNREGISTER: Final = 0x01
_UFFDIO_WAKE: Final = 0x02
_UFFDIO_COPY: Final = 0x03
_UFFDIO_ZEROPAGE: Final = 0x04
_UFFDIO_MOVE: Final = 0x05
_UFFDIO_WRITEPROTECT: Final = 0x06
_UFFDIO_CONTINUE: Final = 0x07
_UFFDIO_POISON: Final = 0x08
_UFFDIO_API: Final = 0x3F


class uffdio_api(ctypes.Structure):
    _fields_ = (
        ("api", _u64),  # in: UFFD_API
        ("features", _u64),  # in: requested, out: supported
        ("ioctls", _u64),  # out: 1 << _UFFDIO_* available on the fd
    )


class uffdio_range(ctypes.Structure):
    _fields_ = (
        ("start", _u64),
        ("len", _u64),
    )


class uffdio_register(ctypes.Structure):
    _fields_ = (
        ("range", uffdio_range),
        ("mode", _u64),
        ("ioctls", _u64),  # out: range ioctls available
    )


class uffdio_writeprotect(ctypes.Structure):
    _fields_ = (
        ("range", uffdio_range),
        ("mode", _u64),
    )


UFFDIO_API: Final = _IOWR(UFFDIO, _UFFDIO_API, uffdio_api)
UFFDIO_REGISTER: Final = _IOWR(UFFDIO, _UFFDIO_REGISTER, uffdio_register)
UFFDIO_UNREGISTER: Final = _IOR(UFFDIO, _UFFDIO_UNREGISTER, uffdio_range)
UFFDIO_WRITEPROTECT: Final = _IOWR(UFFDIO, _UFFDIO_WRITEPROTECT, uffdio_writeprotect)


def uffdio_api_ioctl(fd: int, arg: uffdio_api) -> None:
    _ioctl(fd, UFFDIO_API, arg)


def uffdio_register_ioctl(fd: int, arg: uffdio_register) -> None:
    _ioctl(fd, UFFDIO_REGISTER, arg)


def uffdio_unregister_ioctl(fd: int, arg: uffdio_range) -> None:
    _ioctl(fd, UFFDIO_UNREGISTER, arg)


def uffdio_writeprotect_ioctl(fd: int, arg: uffdio_writeprotect) -> None:
    _ioctl(fd, UFFDIO_WRITEPROTECT, arg)



# --- userfaultfd: serving missing pages (receiver/lazy.py, the lazy-pages daemon) ---------------
# include/uapi/linux/userfaultfd.h (Linux 6.18): the messages read from a uffd and the ioctls that
# resolve a missing-page fault. CRIU opens the uffd in each restored task and passes it over
# (criu/uffd.c setup_uffd), having done UFFDIO_API itself.

UFFD_EVENT_PAGEFAULT: Final = 0x12
UFFD_EVENT_FORK: Final = 0x13
UFFD_EVENT_REMAP: Final = 0x14
UFFD_EVENT_REMOVE: Final = 0x15
UFFD_EVENT_UNMAP: Final = 0x16

UFFDIO_COPY_MODE_DONTWAKE: Final = 1 << 0
UFFDIO_ZEROPAGE_MODE_DONTWAKE: Final = 1 << 0


class uffd_msg(ctypes.Structure):
    """``struct uffd_msg`` (__packed, 32 bytes): ``event`` then a union; the variants are read
    with ``arg_u64(i)`` (the union's i-th u64) by the event's layout:
    PAGEFAULT flags, address, (ptid); FORK ufd (u32); REMAP from, to, len; REMOVE/UNMAP start, end."""

    _pack_ = 1
    _fields_ = (
        ("event", ctypes.c_uint8),
        ("reserved1", ctypes.c_uint8),
        ("reserved2", ctypes.c_uint16),
        ("reserved3", ctypes.c_uint32),
        ("arg", _u64 * 3),
    )


UFFD_MSG_SIZE: Final = ctypes.sizeof(uffd_msg)


def decode_uffd_msgs(data: bytes) -> list[tuple[int, int, int, int]]:
    """``(event, arg0, arg1, arg2)`` for each whole message in ``data`` (a read of a uffd returns
    whole messages only). FORK's ufd is the low 32 bits of arg0."""
    out = []
    for off in range(0, len(data) - UFFD_MSG_SIZE + 1, UFFD_MSG_SIZE):
        m = uffd_msg.from_buffer_copy(data, off)
        out.append((int(m.event), int(m.arg[0]), int(m.arg[1]), int(m.arg[2])))
    return out


class uffdio_copy(ctypes.Structure):
    _fields_ = (
        ("dst", _u64),
        ("src", _u64),
        ("len", _u64),
        ("mode", _u64),
        ("copy", ctypes.c_int64),  # out: bytes copied, or -errno when none was
    )


class uffdio_zeropage(ctypes.Structure):
    _fields_ = (
        ("range", uffdio_range),
        ("mode", _u64),
        ("zeropage", ctypes.c_int64),  # out: bytes zeroed, or -errno when none was
    )


UFFDIO_COPY: Final = _IOWR(UFFDIO, _UFFDIO_COPY, uffdio_copy)
UFFDIO_ZEROPAGE: Final = _IOWR(UFFDIO, _UFFDIO_ZEROPAGE, uffdio_zeropage)
UFFDIO_WAKE: Final = _IOR(UFFDIO, _UFFDIO_WAKE, uffdio_range)


def _uffd_fill(fd: int, request: int, arg: ctypes.Structure, done: ctypes.c_int64) -> tuple[int, int]:
    """``(bytes filled, errno)``: errno 0 when all were. The kernel (fs/userfaultfd.c
    userfaultfd_copy) answers a partial fill with EAGAIN and the count in the struct, and a fill
    that did nothing with the error there too (EEXIST: a page already present; EAGAIN: the mm is
    changing, read its events first; ENOENT: no registered VMA; ESRCH: the mm is gone)."""
    if _libc.ioctl(fd, request, ctypes.byref(arg)) == 0:
        return int(done.value), 0
    err = ctypes.get_errno()
    got = int(done.value)
    return (got, err) if got > 0 else (0, -got if got < 0 else err)


def uffdio_copy_ioctl(fd: int, dst: int, src: int, length: int, mode: int = 0) -> tuple[int, int]:
    """UFFDIO_COPY ``length`` bytes from our address ``src`` to ``dst`` in the uffd's mm, waking
    the threads waiting there (unless DONTWAKE). Returns ``(bytes copied, errno)``, see ``_uffd_fill``."""
    arg = uffdio_copy(dst=dst, src=src, len=length, mode=mode, copy=0)
    return _uffd_fill(fd, UFFDIO_COPY, arg, _field_view(arg, "copy"))


def uffdio_zeropage_ioctl(fd: int, start: int, length: int, mode: int = 0) -> tuple[int, int]:
    """UFFDIO_ZEROPAGE: map the zero page over a missing range. ``(bytes, errno)`` as for copy."""
    arg = uffdio_zeropage(range=uffdio_range(start=start, len=length), mode=mode, zeropage=0)
    return _uffd_fill(fd, UFFDIO_ZEROPAGE, arg, _field_view(arg, "zeropage"))


def _field_view(struct: ctypes.Structure, name: str) -> ctypes.c_int64:
    """The ``name`` field of ``struct`` as a c_int64 sharing its memory (read after the ioctl)."""
    return ctypes.c_int64.from_buffer(struct, getattr(type(struct), name).offset)


# --- glibc malloc tuning ---------------------------------------------------------------------
# malloc/malloc.h (glibc 2.36). mallopt returns 1 on success and 0 on failure without setting
# errno. Its value is a C int, so thresholds cannot exceed 2 GiB - 1.

M_TRIM_THRESHOLD: Final = -1
M_MMAP_THRESHOLD: Final = -3
M_ARENA_MAX: Final = -8

_INT_MAX: Final = (1 << 31) - 1

_mallopt = getattr(_libc, "mallopt", None)  # glibc only
if _mallopt is not None:
    _mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    _mallopt.restype = ctypes.c_int


def mallopt(param: int, value: int) -> None:
    if not -_INT_MAX - 1 <= value <= _INT_MAX:
        raise ValueError(f"mallopt value {value} does not fit a C int")
    if _mallopt is None:
        raise OSError(errno.ENOSYS, "this C library has no mallopt")
    if _mallopt(param, value) != 1:
        raise OSError(errno.EINVAL, f"mallopt({param}, {value}) rejected by glibc")


MMAP_THRESHOLD_BYTES: Final = 256 << 20
TRIM_THRESHOLD_BYTES: Final = _INT_MAX  # the env-var recipe uses 4 GiB; mallopt's int caps it
ARENA_MAX: Final = 2


def tune_malloc() -> bool:
    """Make glibc keep multi-MiB buffers on the heap and stop returning them to the kernel.

    By default glibc serves allocations above its (dynamic, at most 32 MiB) mmap threshold
    with fresh ``mmap`` memory and unmaps it on free, so every 1-4 MiB temporary (compressed
    chunk joins, packed pages, protobuf messages, gRPC receive buffers) is faulted in 4 KiB at
    a time: about one minor fault per 4 KiB of payload. Raising the mmap and trim thresholds
    keeps that memory in the heap for reuse, and two arenas bound the heap growth of the
    worker threads. It matters most without compression, where those faults are a large share
    of the sender's CPU (``bench/bench_round0.py`` shows it). Call it before the first
    large allocation; it affects only later ones.

    Returns False, after applying what it could, if the C library has no ``mallopt`` (musl)
    or rejects a setting; the process then just runs slower. Older glibc releases reject mmap
    thresholds above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit); that maximum is tried instead.
    glibc 2.36 (this machine) accepts any value.
    """
    applied = True
    for param, values in ((M_MMAP_THRESHOLD, (MMAP_THRESHOLD_BYTES, 32 << 20)),
                          (M_TRIM_THRESHOLD, (TRIM_THRESHOLD_BYTES,)),
                          (M_ARENA_MAX, (ARENA_MAX,))):
        for i, value in enumerate(values):
            try:
                mallopt(param, value)
            except OSError:
                applied = False
                continue
            applied = applied and i == 0
            break
    return applied

"""The uapi mirrors in pagehaul.kernel: sizes, layouts, ioctl numbers, and the thin wrappers."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pagehaul import kernel
from tests.helpers.children import child_env


@pytest.mark.parametrize(("struct", "size"), [
    (kernel.pm_scan_arg, 96),
    (kernel.page_region, 24),
    (kernel.user_regs_struct, 216),
    (kernel.iovec, 16),
    (kernel.uffdio_api, 24),
    (kernel.uffdio_range, 16),
    (kernel.uffdio_register, 32),
    (kernel.uffdio_writeprotect, 24),
    (kernel.siginfo_t, 128),
])
def test_struct_sizes(struct: type[ctypes.Structure], size: int) -> None:
    assert ctypes.sizeof(struct) == size


@pytest.mark.parametrize(("name", "value"), [
    ("PAGEMAP_SCAN", 0xC0606610),
    ("UFFDIO_API", 0xC018AA3F),
    ("UFFDIO_REGISTER", 0xC020AA00),
    ("UFFDIO_UNREGISTER", 0x8010AA01),
    ("UFFDIO_WRITEPROTECT", 0xC018AA06),
])
def test_ioctl_numbers(name: str, value: int) -> None:
    assert getattr(kernel, name) == value


def test_ioc_encoding_fields() -> None:
    # dir in bits 30-31, size in 16-29, type in 8-15, nr in 0-7 (asm-generic/ioctl.h)
    number = kernel._IOWR(ord("f"), 16, kernel.pm_scan_arg)
    assert number >> 30 == 3
    assert (number >> 16) & 0x3FFF == 96
    assert (number >> 8) & 0xFF == ord("f")
    assert number & 0xFF == 16
    with pytest.raises(ValueError, match="does not fit"):
        kernel._IOC(3, 0, 0, 1 << 14)


def test_pm_scan_arg_field_order() -> None:
    names = [name for name, _ in kernel.pm_scan_arg._fields_]
    assert names == ["size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
                     "category_inverted", "category_mask", "category_anyof_mask", "return_mask"]
    assert kernel.pm_scan_arg.walk_end.offset == 32
    assert kernel.pm_scan_arg.return_mask.offset == 88


def test_numpy_dtypes_match_ctypes_layouts() -> None:
    for dtype, struct in ((kernel.PAGE_REGION_DTYPE, kernel.page_region), (kernel.IOVEC_DTYPE, kernel.iovec)):
        assert dtype.itemsize == ctypes.sizeof(struct)
        assert dtype.names is not None
        for name in dtype.names:
            assert dtype.fields is not None
            assert dtype.fields[name][1] == getattr(struct, name).offset


def test_user_regs_struct_offsets() -> None:
    # arch/x86/include/asm/user_64.h: orig_rax is word 15, rip word 16, rsp word 19
    assert kernel.user_regs_struct.orig_rax.offset == 15 * 8
    assert kernel.user_regs_struct.rip.offset == 16 * 8
    assert kernel.user_regs_struct.rsp.offset == 19 * 8
    assert kernel.user_regs_struct.gs.offset == 26 * 8


def test_category_and_pagemap_bits() -> None:
    assert kernel.PAGE_IS_PRESENT == 8
    assert kernel.PAGE_IS_PFNZERO == 32
    assert kernel.PAGE_IS_GUARD == 256
    assert kernel.PM_PRESENT == 0x8000000000000000
    assert kernel.PM_GUARD_REGION == 1 << 58
    assert kernel.PM_PFRAME_MASK == (1 << 55) - 1
    assert kernel.UFFD_FEATURE_WP_ASYNC == 1 << 15


def test_ptrace_signal_requests_and_siginfo_layout() -> None:
    # include/uapi/linux/ptrace.h; siginfo: three ints, then the union at offset 16 on 64-bit
    assert (kernel.PTRACE_GETSIGINFO, kernel.PTRACE_GETSIGMASK, kernel.PTRACE_SETSIGMASK) == (0x4202, 0x420A, 0x420B)
    assert kernel.siginfo_t.si_code.offset == 8
    assert kernel.siginfo_t._sifields.offset == 16
    assert kernel.KERNEL_SIGSET_BYTES == 8
    with pytest.raises(OSError, match=os.strerror(errno.ESRCH)):  # not our tracee
        kernel.ptrace_getsigmask(os.getpid())
    with pytest.raises(OSError, match=os.strerror(errno.ESRCH)):
        kernel.ptrace_getsiginfo(os.getpid())


def test_pte_marker_swap_type() -> None:
    # SWP_PTE_MARKER = (1 << MAX_SWAPFILES_SHIFT) - SWP_PTE_MARKER_NUM, the last swap type
    assert kernel.SWP_PTE_MARKER == kernel.PM_SWAP_TYPE_MASK == 31


def _own_uffd() -> int:
    try:
        fd = kernel.userfaultfd(os.O_CLOEXEC | os.O_NONBLOCK | kernel.UFFD_USER_MODE_ONLY)
    except OSError as err:
        pytest.skip(f"userfaultfd unavailable: {err}")
    api = kernel.uffdio_api(api=kernel.UFFD_API, features=kernel.UFFD_FEATURE_WP_ASYNC)
    try:
        kernel.uffdio_api_ioctl(fd, api)
    except OSError as err:
        os.close(fd)
        pytest.skip(f"no UFFD_FEATURE_WP_ASYNC (Linux < 6.7): {err}")
    return fd


def test_uffd_register_writeprotect_unregister_on_own_memory() -> None:
    buf = np.ones(8 * 4096 + 4095, dtype=np.uint8)  # written: present pages
    start = (buf.ctypes.data + 4095) & ~4095
    fd = _own_uffd()
    pagemap = os.open("/proc/self/pagemap", os.O_RDONLY)

    def wp_bits() -> list[bool]:
        words = np.frombuffer(os.pread(pagemap, 8 * 8, (start // 4096) * 8), "<u8")
        return [bool(w & np.uint64(kernel.PM_UFFD_WP)) for w in words]

    try:
        rng = kernel.uffdio_range(start=start, len=8 * 4096)
        reg = kernel.uffdio_register(range=rng, mode=kernel.UFFDIO_REGISTER_MODE_WP)
        kernel.uffdio_register_ioctl(fd, reg)
        assert reg.ioctls & (1 << 6)  # _UFFDIO_WRITEPROTECT available on the range
        assert wp_bits() == [False] * 8
        protect = kernel.uffdio_writeprotect(range=rng, mode=kernel.UFFDIO_WRITEPROTECT_MODE_WP)
        kernel.uffdio_writeprotect_ioctl(fd, protect)
        assert wp_bits() == [True] * 8
        buf[(start - buf.ctypes.data) + 4096] = 7  # async: resolved in the kernel, bit cleared
        assert wp_bits() == [True, False] + [True] * 6
        kernel.uffdio_unregister_ioctl(fd, rng)
        assert wp_bits() == [False] * 8
    finally:
        os.close(pagemap)
        os.close(fd)


def test_iovecs_from_numpy_share_memory_and_values() -> None:
    bases = np.array([0x1000, 0x7FFF_FFFF_F000], dtype=np.uint64)
    iovs = kernel.iovecs_from_numpy(bases, [4096, 8192])
    assert [(iov.iov_base, iov.iov_len) for iov in iovs] == [(0x1000, 4096), (0x7FFF_FFFF_F000, 8192)]
    array = np.zeros(2, kernel.IOVEC_DTYPE)
    view = kernel.iovec_view(array)
    array["iov_len"] = [5, 6]
    assert view[1].iov_len == 6
    with pytest.raises(ValueError, match="differ"):
        kernel.iovecs_from_numpy([1, 2], [3])
    with pytest.raises(ValueError, match="IOVEC_DTYPE"):
        kernel.iovec_view(np.zeros(2, np.uint64))


def test_process_vm_readv_reads_own_memory() -> None:
    src = np.arange(4096, dtype=np.uint8)
    dst = np.zeros(4096, dtype=np.uint8)
    local = kernel.iovecs_from_numpy([dst.ctypes.data], [dst.size])
    remote = kernel.iovecs_from_numpy([src.ctypes.data + 1000, src.ctypes.data], [96, 1000])
    assert kernel.process_vm_readv(os.getpid(), local, 1, remote, 2) == 1096
    assert bytes(dst[:1096]) == bytes(src[1000:1096]) + bytes(src[:1000])
    with pytest.raises(OSError, match=os.strerror(errno.EFAULT)):
        kernel.process_vm_readv(os.getpid(), local, 1, kernel.iovecs_from_numpy([8], [8]), 1)
    with pytest.raises(ValueError, match="exceeds"):
        kernel.process_vm_readv(os.getpid(), local, 2, remote, 2)


def test_pagemap_scan_on_self() -> None:
    buf = np.ones(16 * 4096, dtype=np.uint8)  # written: present anonymous pages
    start = (buf.ctypes.data + 4095) & ~4095
    vec = np.zeros(8, kernel.PAGE_REGION_DTYPE)
    arg = kernel.pm_scan_arg(start=start, end=start + 8 * 4096, vec=vec.ctypes.data, vec_len=vec.size,
                             category_anyof_mask=kernel.PAGE_IS_PRESENT, return_mask=kernel.PAGE_IS_PRESENT)
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        n = kernel.pagemap_scan(fd, arg)
        with pytest.raises(OSError, match=os.strerror(errno.EINVAL)):  # unaligned start
            kernel.pagemap_scan(fd, kernel.pm_scan_arg(start=start + 1, end=start + 4096))
    finally:
        os.close(fd)
    assert arg.size == 96
    assert n == 1
    assert (int(vec[0]["start"]), int(vec[0]["end"])) == (start, start + 8 * 4096)
    assert int(vec[0]["categories"]) == kernel.PAGE_IS_PRESENT
    assert arg.walk_end == start + 8 * 4096


def test_ptrace_errors_raise_oserror() -> None:
    # Not our tracee: every request but SEIZE/ATTACH fails with ESRCH, PEEK included (errno check).
    with pytest.raises(OSError, match=os.strerror(errno.ESRCH)):
        kernel.ptrace_peekdata(os.getpid(), 0)
    with pytest.raises(OSError, match=os.strerror(errno.ESRCH)):
        kernel.ptrace_getregs(os.getpid())


def test_pidfd_open_and_getfd_on_self() -> None:
    pidfd = kernel.pidfd_open(os.getpid())
    try:
        dup = kernel.pidfd_getfd(pidfd, pidfd)
        try:
            assert os.path.samestat(os.fstat(dup), os.fstat(pidfd))
            assert not os.get_inheritable(dup)
        finally:
            os.close(dup)
    finally:
        os.close(pidfd)
    with pytest.raises(OSError, match=os.strerror(errno.EINVAL)):
        kernel.pidfd_open(-1)


def test_mallopt_rejects_values_beyond_c_int() -> None:
    # glibc 2.36 itself accepts any value and any parameter, so only our own check can fail.
    with pytest.raises(ValueError, match="C int"):
        kernel.mallopt(kernel.M_TRIM_THRESHOLD, 4 << 30)


_WHERE_16MIB_LANDS = r'''
import ctypes, json, sys
from pagehaul import kernel
if sys.argv[1] == "tuned":
    assert kernel.tune_malloc()
buf = bytearray(16 << 20)
addr = ctypes.addressof((ctypes.c_char * 1).from_buffer(buf))
for line in open("/proc/self/maps"):
    fields = line.split()
    start, end = (int(x, 16) for x in fields[0].split("-"))
    if start <= addr < end:
        print(json.dumps(fields[5] if len(fields) > 5 else ""))
'''


@pytest.mark.parametrize(("mode", "expect_heap"), [("default", False), ("tuned", True)])
def test_tune_malloc_keeps_large_buffers_on_the_heap(mode: str, expect_heap: bool) -> None:
    # glibc's default serves 16 MiB with a fresh mmap; tuned, it comes from the brk heap.
    out = subprocess.run([sys.executable, "-c", _WHERE_16MIB_LANDS, mode], env=child_env(),
                         capture_output=True, text=True, check=True, timeout=60)
    assert (json.loads(out.stdout) == "[heap]") is expect_heap

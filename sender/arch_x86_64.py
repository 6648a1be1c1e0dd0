"""x86-64 specifics of running one system call inside a ptrace-stopped thread (``sender.inject``).

Everything the injector needs to know about the CPU lives here, so an arm64 module with the
same names can follow (``svc #0`` = ``01 00 00 d4``, number in x8, arguments in x0-x5, result
in x0, registers through PTRACE_GETREGSET/NT_PRSTATUS, the syscall number through
NT_ARM_SYSTEM_CALL instead of orig_rax).

Some facts about the x86-64 system call ABI (arch/x86/entry/entry_64.S, arch/x86/kernel/signal.c,
arch/x86/include/asm/syscall.h; CRIU compel/arch/x86/src/lib/infect.c does the same):

* ``syscall`` is the two bytes ``0f 05``. The number is in rax, the arguments in rdi, rsi,
  rdx, r10, r8, r9; the result comes back in rax, -4095..-1 meaning -errno. The instruction
  itself overwrites rcx (return address) and r11 (rflags); all other registers survive.
* On entry the kernel copies rax into ``orig_ax`` (``orig_rax`` in ``user_regs_struct``); it is
  -1 while the thread is not in a system call. After a signal or ptrace stop interrupts a
  blocking call, the saved registers hold ``rax = -ERESTART*`` and ``orig_rax = nr``, with rip
  already past the ``syscall`` instruction. When the thread leaves ``get_signal()`` without
  running a handler, ``arch_do_signal_or_restart()`` restarts it if ``orig_rax >= 0``:
  -ERESTARTSYS/-ERESTARTNOINTR/-ERESTARTNOHAND -> ``rax = orig_rax, rip -= 2``;
  -ERESTART_RESTARTBLOCK -> ``rax = __NR_restart_syscall, rip -= 2``. Injected registers
  therefore carry ``orig_rax = -1``: nothing is "restarted" on their way into our call, and
  restoring the saved registers exactly lets the kernel restart the original call.
* Syscall numbers below come from arch/x86/entry/syscalls/syscall_64.tbl (Linux 6.18).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Final

from pagehaul import kernel

NAME: Final = "x86_64"

SYSCALL_INSN: Final = b"\x0f\x05"
MAX_SYSCALL_ARGS: Final = 6

Regs = kernel.user_regs_struct

# The argument registers, in order.
_ARG_REGS: Final = ("rdi", "rsi", "rdx", "r10", "r8", "r9")
_MASK64: Final = (1 << 64) - 1

NR_read: Final = 0
NR_write: Final = 1
NR_close: Final = 3
NR_nanosleep: Final = 35
NR_getpid: Final = 39
NR_getppid: Final = 110
NR_gettid: Final = 186
NR_restart_syscall: Final = 219
NR_clock_nanosleep: Final = 230
NR_userfaultfd: Final = kernel.NR_userfaultfd  # 323; pagehaul.kernel calls it locally too


def get_regs(tid: int) -> Regs:
    return kernel.ptrace_getregs(tid)


def set_regs(tid: int, regs: Regs) -> None:
    kernel.ptrace_setregs(tid, regs)


def copy_regs(regs: Regs) -> Regs:
    return Regs.from_buffer_copy(regs)


def regs_equal(a: Regs, b: Regs) -> bool:
    return bytes(a) == bytes(b)


def instruction_pointer(regs: Regs) -> int:
    return int(regs.rip)


def syscall_in_progress(regs: Regs) -> int:
    """The number of the system call the thread was stopped in, or -1 (not in one)."""
    return int(ctypes.c_long(regs.orig_rax).value)


def syscall_regs(saved: Regs, ip: int, nr: int, args: Sequence[int]) -> Regs:
    """``saved`` changed to execute ``syscall`` at ``ip`` with number ``nr`` and ``args``."""
    if len(args) > MAX_SYSCALL_ARGS:
        raise ValueError(f"a system call takes at most {MAX_SYSCALL_ARGS} arguments, got {len(args)}")
    regs = copy_regs(saved)
    regs.rip = ip
    regs.rax = nr
    regs.orig_rax = _MASK64  # -1: not in a system call, so no restart logic touches these registers
    for name, value in zip(_ARG_REGS, args, strict=False):
        setattr(regs, name, value & _MASK64)
    return regs


def syscall_result(regs: Regs) -> int:
    """The signed return value of the call that just finished (``-errno`` on failure)."""
    return int(ctypes.c_long(regs.rax).value)

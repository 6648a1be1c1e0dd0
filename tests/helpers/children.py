"""Real child processes with known memory layouts, started, read and always killed and reaped.

Children are ``python -c`` programs that set up their memory, print one ``READY {json}`` line
with the addresses the tests need, then block reading stdin; tests synchronise on that line
(and on further lines), never on sleeps. Printing READY is not the end of the child's work:
the interpreter still allocates and frees on its way into ``readline()``, so ``spawn_python``
also waits until the main thread sits in ``read(0, ...)`` (``/proc/PID/syscall``); only then
is a single-threaded child's memory quiescent. It kills and reaps the child however the test
ends.
"""

from __future__ import annotations

import json
import mmap
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pagehaul.runs import Runs
from sender.freezer import PtraceFreezer

REPO_ROOT = Path(__file__).resolve().parents[2]
PAGE_SIZE = mmap.PAGESIZE
READY_TIMEOUT_S = 60.0

# --- child programs ---------------------------------------------------------------------------

# argv: FILE (at least 8 pages, mapped privately), BIG_PAGES (0 for none).
# Every written page holds its own addresses as little-endian u64 words (see page_pattern).
# The libc calls the child programs make (ctypes, so they can map what Python's mmap cannot).
CHILD_LIBC_PRELUDE = r'''
import ctypes, json, mmap, os, struct, sys
P = mmap.PAGESIZE
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                      ctypes.c_long)
libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
MAP_FAILED = ctypes.c_void_p(-1).value
'''

LAYOUT_CHILD = CHILD_LIBC_PRELUDE + r'''
RW = mmap.PROT_READ | mmap.PROT_WRITE

def mm(pages, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, fd=-1):
    addr = libc.mmap(None, pages * P, RW, flags, fd, 0)
    if addr is None or addr == MAP_FAILED:
        raise OSError(ctypes.get_errno(), "mmap")
    return addr

def fill(addr, pages):
    for i in range(pages):
        a = addr + i * P
        ctypes.memmove(a, struct.pack("<%dQ" % (P // 8), *range(a, a + P, 8)), P)

def touch_read(addr, pages):
    ctypes.string_at(addr, pages * P)

info = {}
# 64 read-write pages, then 4 pages made PROT_NONE after being written: two touching VMAs,
# followed by a one-page hole (no later mapping is that small).
anon = mm(69)
libc.munmap(anon + 68 * P, P)
for first, count in ((0, 8), (10, 1), (20, 10), (60, 8)):
    fill(anon + first * P, count)
ctypes.memset(anon + 12 * P, 0, P)  # written with zeros: a real page, not the zero page
touch_read(anon + 40 * P, 8)  # only read: maps the shared zero page
if libc.mprotect(anon + 64 * P, 4 * P, 0) != 0:  # PROT_NONE
    raise OSError(ctypes.get_errno(), "mprotect")
info["anon"] = anon
info["protnone"] = anon + 64 * P

# A private mapping of an 8-page file: every page read, pages 2 and 5 copied on write.
fd = os.open(sys.argv[1], os.O_RDWR)
fmap = mm(8, flags=mmap.MAP_PRIVATE, fd=fd)
os.close(fd)
touch_read(fmap, 8)
fill(fmap + 2 * P, 1)
fill(fmap + 5 * P, 1)
info["file"] = fmap

# Shared anonymous memory, written: never dumped by this sender (yet).
shared = mm(4, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
fill(shared, 4)
info["shared"] = shared

# 8 written pages with guard markers over pages 2-3 (MADV_GUARD_INSTALL = 102, Linux 6.13).
guard = mm(8)
fill(guard, 8)
info["guard_ok"] = int(libc.madvise(guard + 2 * P, 2 * P, 102) == 0)
info["guard"] = guard

# A 2 MiB-aligned THP-eligible range that is only read: the huge zero page when THP is on.
raw = mm(1024)
hugezero = (raw + (2 << 20) - 1) & ~((2 << 20) - 1)
libc.madvise(hugezero, 2 << 20, 14)  # MADV_HUGEPAGE; harmless when THP is off
touch_read(hugezero, 1)
info["hugezero"] = hugezero

big_pages = int(sys.argv[2])
if big_pages:
    big = mm(big_pages)
    for i in range(big_pages):
        if i % 3 != 2:
            fill(big + i * P, 1)
    info["big"] = big
info["big_pages"] = big_pages

print("READY " + json.dumps(info), flush=True)
sys.stdin.readline()
'''

# argv: N busy threads, each incrementing counters[i] forever. SIGUSR1 prints "USR1".
THREADS_CHILD = r'''
import ctypes, json, signal, sys, threading
n = int(sys.argv[1])
counters = (ctypes.c_uint64 * max(n, 1))()
tids = [0] * n
started = threading.Barrier(n + 1)

def run(i):
    tids[i] = threading.get_native_id()
    started.wait()
    c = counters
    while True:
        c[i] += 1

for i in range(n):
    threading.Thread(target=run, args=(i,), daemon=True).start()
started.wait()
signal.signal(signal.SIGUSR1, lambda signum, frame: print("USR1", flush=True))
print("READY " + json.dumps({"counters": ctypes.addressof(counters), "tids": tids}), flush=True)
sys.stdin.readline()
'''

# Threads are born and die all the time; counters[0] counts the threads started.
CHURN_CHILD = r'''
import ctypes, json, sys, threading
counters = (ctypes.c_uint64 * 1)()

def churn():
    while True:
        workers = [threading.Thread(target=sum, args=((),)) for _ in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        counters[0] += len(workers)

threading.Thread(target=churn, daemon=True).start()
print("READY " + json.dumps({"counters": ctypes.addressof(counters)}), flush=True)
sys.stdin.readline()
'''

# argv: TID to PTRACE_SEIZE and hold until stdin closes.
SEIZER_CHILD = r'''
import sys
from pagehaul import kernel
kernel.ptrace(kernel.PTRACE_SEIZE, int(sys.argv[1]), 0, 0)
print("READY {}", flush=True)
sys.stdin.readline()
'''


# A memory workbench driven by JSON commands on stdin, one reply line per command ("OK {json}"),
# so tests change the child's memory at exactly the points they choose. argv: PAGES for the
# initial anonymous region, FILL ("all", "none", or "even": every other page written).
# Writes store a per-command byte in every target page (numpy fancy indexing, no per-page loop);
# "kernel_write" makes read() fill the pages (kernel-mode writes); "own_uffd" maps pages and
# registers them with a userfaultfd of the child's own (sync write-protect, nothing protected).
MEMORY_CHILD = r"""
import ctypes, json, mmap, os, sys
import numpy as np
P = mmap.PAGESIZE
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
libc.mremap.restype = ctypes.c_void_p
libc.mremap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p)
libc.read.restype = ctypes.c_ssize_t
libc.read.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t)
MAP_FAILED = ctypes.c_void_p(-1).value
RW = mmap.PROT_READ | mmap.PROT_WRITE

def check(ok, what):
    if not ok:
        raise OSError(ctypes.get_errno(), what)

def mm(pages, hugepage=False, align=0, fixed=None):
    size = pages * P + align
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | (0x10 if fixed else 0)  # MAP_FIXED: replace
    addr = libc.mmap(fixed, size, RW, flags, -1, 0)
    check(addr not in (None, MAP_FAILED), "mmap")
    if align:
        aligned = (addr + align - 1) & ~(align - 1)
        if aligned > addr:
            libc.munmap(addr, aligned - addr)
        tail = addr + size - (aligned + pages * P)
        if tail:
            libc.munmap(aligned + pages * P, tail)
        addr = aligned
    if hugepage:
        check(libc.madvise(addr, pages * P, 14) == 0, "madvise(MADV_HUGEPAGE)")
    return addr

def view(addr, pages):
    return np.frombuffer((ctypes.c_char * (pages * P)).from_address(addr), np.uint8)

def idx(cmd):
    return np.asarray(cmd["pages"], dtype=np.int64)

stamp = 0
def write(addr, pages, index):
    global stamp
    stamp = stamp % 255 + 1
    view(addr, pages)[index * P] = stamp

pages = int(sys.argv[1])
region = mm(pages)
fill = sys.argv[2]
if fill == "all":
    view(region, pages)[::P] = 1
elif fill == "even":
    view(region, pages)[::2 * P] = 1
urandom = os.open("/dev/urandom", os.O_RDONLY)
print("READY " + json.dumps({"region": region, "pages": pages}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    op, reply = cmd["op"], {}
    if op == "write":
        size = cmd.get("size", max(cmd["pages"]) + 1)
        write(cmd["addr"], size, idx(cmd))
    elif op == "read":
        size = cmd.get("size", max(cmd["pages"]) + 1)
        reply["sum"] = int(view(cmd["addr"], size)[idx(cmd) * P].sum())
    elif op == "kernel_write":  # the kernel writes the pages (copy_to_user in read()), not user code
        for i in cmd["pages"]:
            check(libc.read(urandom, cmd["addr"] + i * P, P) == P, "read")
    elif op == "mmap":
        reply["addr"] = mm(cmd["pages"], cmd.get("hugepage", False), cmd.get("align", 0), cmd.get("fixed"))
    elif op == "mmap_file":  # private mapping of a file, every page read (page cache mapped)
        fd = os.open(cmd["path"], os.O_RDONLY)
        addr = libc.mmap(None, cmd["pages"] * P, RW, mmap.MAP_PRIVATE, fd, 0)
        os.close(fd)
        check(addr not in (None, MAP_FAILED), "mmap")
        reply["addr"], reply["sum"] = addr, int(view(addr, cmd["pages"])[::P].sum())
    elif op == "munmap":
        check(libc.munmap(cmd["addr"], cmd["pages"] * P) == 0, "munmap")
    elif op == "mremap":
        new = libc.mremap(cmd["addr"], cmd["old"] * P, cmd["new"] * P, cmd.get("flags", 0), None)
        check(new not in (None, MAP_FAILED), "mremap")
        reply["addr"] = new
    elif op == "madvise":
        check(libc.madvise(cmd["addr"], cmd["pages"] * P, cmd["advice"]) == 0, "madvise")
    elif op == "fds":
        reply["fds"] = sorted(int(n) for n in os.listdir("/proc/self/fd"))
    elif op == "own_uffd":  # a written mapping registered with a userfaultfd of the child's own
        from pagehaul import kernel
        addr = mm(cmd["pages"])
        write(addr, cmd["pages"], np.arange(cmd["pages"]))
        own = kernel.userfaultfd(os.O_CLOEXEC | os.O_NONBLOCK | kernel.UFFD_USER_MODE_ONLY)
        kernel.uffdio_api_ioctl(own, kernel.uffdio_api(api=kernel.UFFD_API))
        kernel.uffdio_register_ioctl(own, kernel.uffdio_register(
            range=kernel.uffdio_range(start=addr, len=cmd["pages"] * P), mode=kernel.UFFDIO_REGISTER_MODE_WP))
        reply["addr"] = addr
    print("OK " + json.dumps(reply), flush=True)
"""


# Threads parked in blocking system calls on command, for the syscall injector. Commands (stdin
# lines): "read" starts a thread blocked in a raw read() on a pipe, "feed TEXT" writes TEXT to
# that pipe, "sleep SECONDS raw|py" starts a thread in a raw nanosleep() or in time.sleep(),
# "fd" opens /dev/null; each replies "OK N" (the new thread's tid, or the fd). Threads report
# "READ n errno text" and "SLEPT ret errno seconds" with the raw libc results, so an EINTR or a
# leaked -ERESTART* value would show. SIGUSR2 and SIGRTMIN are blocked in every thread; a
# SIGUSR1 prints "USR1".
BLOCKING_CHILD = r"""
import ctypes, os, signal, sys, threading, time
libc = ctypes.CDLL(None, use_errno=True)
libc.read.restype = ctypes.c_ssize_t
libc.read.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t)
class timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))
libc.nanosleep.argtypes = (ctypes.POINTER(timespec), ctypes.POINTER(timespec))
lock = threading.RLock()

def say(*words):
    with lock:
        print(*words, flush=True)

signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2, signal.SIGRTMIN})
signal.signal(signal.SIGUSR1, lambda signum, frame: say("USR1"))
r, w = os.pipe()

def reader():
    buf = ctypes.create_string_buffer(64)
    n = libc.read(r, buf, 64)
    say("READ", n, ctypes.get_errno(), buf.raw[:max(n, 0)].decode())

def sleeper(seconds, raw):
    start = time.monotonic()
    if raw:
        req, rem = timespec(int(seconds), int(seconds % 1 * 1e9)), timespec()
        ret = libc.nanosleep(ctypes.byref(req), ctypes.byref(rem))
        err = ctypes.get_errno()
    else:
        time.sleep(seconds)
        ret = err = 0
    say("SLEPT", ret, err, round(time.monotonic() - start, 3))

def spawn(target, *args):
    tid = []
    started = threading.Event()
    def run():
        tid.append(threading.get_native_id())
        started.set()
        target(*args)
    threading.Thread(target=run, daemon=True).start()
    started.wait()
    return tid[0]

say("READY {}")
for line in sys.stdin:
    op, _, arg = line.strip().partition(" ")
    if op == "read":
        say("OK", spawn(reader))
    elif op == "feed":
        os.write(w, arg.encode())
        say("OK", 0)
    elif op == "sleep":
        seconds, kind = arg.split()
        say("OK", spawn(sleeper, float(seconds), kind == "raw"))
    elif op == "fd":
        say("OK", os.open("/dev/null", os.O_RDONLY))
"""


# --- running children -------------------------------------------------------------------------


@dataclass
class Child:
    proc: subprocess.Popen[bytes]
    info: dict[str, Any] = field(default_factory=dict)
    _pending: bytearray = field(default_factory=bytearray)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def readline(self, timeout_s: float = READY_TIMEOUT_S) -> str:
        """The next stdout line (without newline); fails after ``timeout_s`` or at EOF."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"child {self.pid} printed no line within {timeout_s} s")
            readable, _, _ = select.select([fd], [], [], remaining)
            if readable:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise AssertionError(f"child {self.pid} closed stdout (exit status {self.proc.poll()})")
                self._pending += chunk
        line, _, rest = bytes(self._pending).partition(b"\n")
        self._pending = bytearray(rest)
        return line.decode()


    def command(self, op: str, **args: Any) -> dict[str, Any]:
        """Send one MEMORY_CHILD command and return its reply; waits until the child is back in read(0)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"op": op, **args}) + "\n").encode())
        self.proc.stdin.flush()
        line = self.readline()
        assert line.startswith("OK "), line
        wait_until(lambda: blocked_reading_stdin(self.pid), f"child {self.pid} to block reading stdin")
        reply: dict[str, Any] = json.loads(line[len("OK "):])
        return reply


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO_ROOT), env.get("PYTHONPATH"))))
    return env


def stop_child(proc: subprocess.Popen[bytes]) -> bytes:
    """Kill and reap, whatever state (running, stopped, traced) the child is in; returns stderr."""
    if proc.poll() is None:
        proc.kill()
    if proc.stdout is not None and proc.stdout.closed:  # stopped before
        proc.wait(timeout=30)
        return b""
    _, err = proc.communicate(timeout=30)  # reaps, drains and closes the pipes
    return err or b""


@contextmanager
def spawn_python(code: str, *args: str) -> Iterator[Child]:
    """Run ``python -c code args``, wait for its ``READY {json}`` line, kill it on exit."""
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env())
    try:
        child = Child(proc)
        try:
            line = child.readline()
        except AssertionError as err:
            raise AssertionError(f"{err}; child stderr: {stop_child(proc).decode()}") from None
        assert line.startswith("READY "), line
        child.info = json.loads(line[len("READY "):])
        wait_until(lambda: blocked_reading_stdin(proc.pid), f"child {proc.pid} to block reading stdin")
        yield child
    finally:
        stop_child(proc)


@contextmanager
def layout_child(tmp_path: Path, big_pages: int = 0) -> Iterator[Child]:
    """A LAYOUT_CHILD mapping an 8-page file created under ``tmp_path``."""
    path = tmp_path / "mapped.bin"
    path.write_bytes(b"F" * (8 * PAGE_SIZE))
    with spawn_python(LAYOUT_CHILD, str(path), str(big_pages)) as child:
        yield child


# --- inspecting children ----------------------------------------------------------------------


def page_pattern(vaddr: int, pages: int = 1) -> bytes:
    """What LAYOUT_CHILD writes to ``pages`` pages at ``vaddr``: each u64 word is its address."""
    return np.arange(vaddr, vaddr + pages * PAGE_SIZE, 8, dtype="<u8").tobytes()


def page_indices(runs: Runs, start: int, pages: int) -> list[int]:
    """Indices (relative to ``start``) of the pages of ``runs`` inside ``pages`` pages from ``start``."""
    addrs = runs.page_addrs(PAGE_SIZE)
    inside = addrs[(addrs >= start) & (addrs < start + pages * PAGE_SIZE)]
    return [int(i) for i in (inside - np.uint64(start)) // np.uint64(PAGE_SIZE)]


def read_mem(pid: int, vaddr: int, size: int) -> bytes:
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        return os.pread(fd, size, vaddr)
    finally:
        os.close(fd)


def in_syscall(pid: int, tid: int, numbers: tuple[int, ...]) -> bool:
    """Whether thread ``tid`` of ``pid`` sleeps (state S) inside one of the x86-64 syscalls ``numbers``."""
    with open(f"/proc/{pid}/task/{tid}/syscall", "rb") as f:
        fields = f.read().split()
    return bool(fields) and fields[0].isdigit() and int(fields[0]) in numbers and thread_states(pid).get(tid) == "S"


def blocked_reading_stdin(tid: int) -> bool:
    """Whether the thread sleeps in read(0, ...): x86-64 syscall 0 with first argument 0."""
    with open(f"/proc/{tid}/syscall", "rb") as f:
        fields = f.read().split()
    return fields[:2] == [b"0", b"0x0"] and thread_states(tid).get(tid) == "S"


def thread_states(pid: int) -> dict[int, str]:
    """State letter of every thread, from /proc/PID/task/TID/stat (after the last ')')."""
    states = {}
    for name in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{name}/stat", "rb") as f:
                stat = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that exited between the listing and the read (churning children)
        states[int(name)] = stat[stat.rindex(b")") + 2:].split()[0].decode()
    return states


def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    """Poll ``predicate`` until true; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.002)


@contextmanager
def frozen_in_signal_delivery_stop(child: Child, sig: int) -> Iterator[PtraceFreezer]:
    """``child`` (THREADS_CHILD) frozen while its main thread sits in a signal-delivery-stop for ``sig``.

    Forces the race a freezer must survive: the thread dequeues a signal after SEIZE and before
    INTERRUPT, so waitpid reports a signal-delivery-stop. The public API cannot hit that window
    deterministically, hence the private first step. Thawed on exit.
    """
    freezer = PtraceFreezer(child.pid)
    freezer._seize(child.pid)
    os.kill(child.pid, sig)
    wait_until(lambda: thread_states(child.pid)[child.pid] == "t", "the signal-delivery-stop")
    freezer.freeze()
    try:
        yield freezer
    finally:
        freezer.thaw()

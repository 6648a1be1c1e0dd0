"""A forking server-like process tree for migration tests.

``TREE_CHILD`` maps a 64-page shared anonymous region (``MAP_SHARED|MAP_ANONYMOUS``: ``/dev/zero
(deleted)``) and fills pages 0..47 (48..63 stay untouched), then forks ``NKIDS`` workers. Each
worker maps 256 private pages (even ones filled with its number), and two threads keep rewriting
its private pages while a third keeps rewriting its own 8-page slice of the shared region, so
every pre-copy round finds dirty pages in every process and in the shared object. The parent does
the same with a private region and one writer thread, prints ``READY {...}`` and then serves
commands on stdin (one JSON object a line, answered ``OK {...}``):

* ``{"op": "fork"}``: fork one more worker (it fills its memory before the answer);
* ``{"op": "exit", "pid": P}``: make worker P exit and reap it.

Workers die with the parent (``PR_SET_PDEATHSIG``), so killing the parent cleans the whole tree;
tests kill the workers too. Writers pause 0.5 ms between writes: a dirty rate, not
synchronisation.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

from tests.helpers.children import Child, spawn_python

NKIDS = 4
SHARED_PAGES = 64
SHARED_FILLED = 48
KID_PAGES = 256

TREE_CHILD = r'''
import ctypes, json, mmap, os, signal, sys, threading, time
P = mmap.PAGESIZE
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1
NKIDS = int(sys.argv[1])
shared = mmap.mmap(-1, 64 * P, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
for i in range(48):
    shared[i * P:(i + 1) * P] = bytes([i % 251 + 1]) * P
shared_addr = ctypes.addressof(ctypes.c_char.from_buffer(shared))

def writer(buf, base, count, seed):
    n = 0
    while True:
        n += 1
        off = base + (n % count) * P + (n * 8) % P
        buf[off:off + 8] = (seed * 1000003 + n).to_bytes(8, "little")
        time.sleep(0.0005)

def worker(k, ready_fd):
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    priv = mmap.mmap(-1, 256 * P, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for i in range(0, 256, 2):
        priv[i * P:(i + 1) * P] = bytes([k % 250 + 1]) * P
    for t in range(2):
        threading.Thread(target=writer, args=(priv, t * 128 * P, 128, k * 10 + t), daemon=True).start()
    threading.Thread(target=writer, args=(shared, (k % 8) * 8 * P, 8, 100 + k), daemon=True).start()
    os.write(ready_fd, b"x")
    os.close(ready_fd)
    threading.Event().wait()

def fork_worker(k):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            worker(k, w)
        finally:
            os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"x"
    os.close(r)
    return pid

kids = [fork_worker(k) for k in range(NKIDS)]
mine = mmap.mmap(-1, 64 * P, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(64):
    mine[i * P:(i + 1) * P] = b"parent" * (P // 6) + b"\0" * (P % 6)
threading.Thread(target=writer, args=(mine, 0, 64, 999), daemon=True).start()
print("READY " + json.dumps({"kids": kids, "shared": shared_addr}), flush=True)
next_k = NKIDS
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "fork":
        pid = fork_worker(next_k)
        next_k += 1
        kids.append(pid)
        print("OK " + json.dumps({"pid": pid}), flush=True)
    elif cmd["op"] == "exit":
        os.kill(cmd["pid"], signal.SIGKILL)
        os.waitpid(cmd["pid"], 0)
        kids.remove(cmd["pid"])
        print("OK " + json.dumps({"pid": cmd["pid"]}), flush=True)
'''


def kill_tree(child: Child, kids: list[int]) -> None:
    for pid in kids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextmanager
def spawn_tree(nkids: int = NKIDS) -> Iterator[Child]:
    """The tree, killed (workers too) on exit; ``child.info["kids"]`` lists the workers' pids."""
    with spawn_python(TREE_CHILD, str(nkids)) as child:
        try:
            yield child
        finally:
            kill_tree(child, list(child.info.get("kids", [])))


# A parent and one forked worker sharing a memfd (mapped twice in the parent, the second time at
# offset 16 pages) and a SysV segment (IPC_RMID'ed, so "/SYSV00000000 (deleted)"). Commands:
# {"op": "write", "page": N, "byte": B} fills memfd page N with B through the parent's mapping.
SHM_KINDS_CHILD = r'''
import ctypes, json, mmap, os, signal, sys, threading
P = mmap.PAGESIZE
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
IPC_PRIVATE, IPC_CREAT, IPC_RMID = 0, 0o1000, 0
seg = libc.shmget(IPC_PRIVATE, 16 * P, IPC_CREAT | 0o600)
assert seg >= 0, ctypes.get_errno()
sysv = libc.shmat(seg, None, 0)
assert libc.shmctl(seg, IPC_RMID, None) == 0
ctypes.memset(sysv + 2 * P, 0x41, P)
fd = os.memfd_create("pagehaul-test")
os.ftruncate(fd, 32 * P)
whole = mmap.mmap(fd, 32 * P, mmap.MAP_SHARED)
whole[5 * P:6 * P] = b"B" * P
tail = mmap.mmap(fd, 8 * P, mmap.MAP_SHARED, offset=16 * P)
tail[0:P] = b"C" * P
r, w = os.pipe()
kid = os.fork()
if kid == 0:
    libc.prctl(1, signal.SIGKILL)
    ctypes.memset(sysv + 3 * P, 0x44, P)
    whole[6 * P:7 * P] = b"D" * P
    os.write(w, b"x")
    threading.Event().wait()
assert os.read(r, 1) == b"x"
print("READY " + json.dumps({"kids": [kid]}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "write":
        whole[cmd["page"] * P:(cmd["page"] + 1) * P] = bytes([cmd["byte"]]) * P
        print("OK {}", flush=True)
'''


@contextmanager
def spawn_shm_kinds() -> Iterator[Child]:
    with spawn_python(SHM_KINDS_CHILD) as child:
        try:
            yield child
        finally:
            kill_tree(child, list(child.info.get("kids", [])))


# Forks without pause: keeps up to 6 children alive (each busy-looping), and every child that is
# replaced exits; so processes appear and vanish all the time, also while a freezer walks the tree.
FORKER_CHILD = r'''
import ctypes, json, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
live = []
parent = os.getpid()
print("READY " + json.dumps({"pid": os.getpid()}), flush=True)
i = 0
while True:
    i += 1
    pid = os.fork()
    if pid == 0:
        libc.prctl(1, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl: nobody would kill us
            os._exit(0)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # do not hold the test's pipe open
        n = 0
        while True:
            n += 1
    live.append(pid)
    if len(live) > 6:
        old = live.pop(0)
        os.kill(old, signal.SIGKILL)
        os.waitpid(old, 0)
'''

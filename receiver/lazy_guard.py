"""The process that kills a lazily restored tree if the receiver dies before every page is in.

During a lazy restore (``receiver.lazy``) the restored tree runs while some of its private
anonymous memory is still missing; the receiver's daemon thread holds each task's userfaultfd and
fills those pages. If the receiver died then (SIGKILL, the OOM killer) and its uffds were the only
references, the tree would read zeros where its memory should be. What the kernel does (Linux
6.12 fs/userfaultfd.c and mm/userfaultfd.c, unchanged in this respect through 6.18; checked on
6.18 by tests/integration/test_lazy_restore.py):

* ``userfaultfd_release`` is the uffd file's ``.release`` (``userfaultfd_fops``), called by
  ``__fput`` when the *last* reference to the file goes: an fd in another process (SCM_RIGHTS, or
  inherited) or an fd in flight in a unix socket keeps the file open, whatever happens to the
  receiver. On release it sets ``ctx->released``, ``userfaultfd_release_all`` (mm/userfaultfd.c)
  clears the uffd from every VMA registered with it (``userfaultfd_clear_vma``), and it wakes every
  fault waiting on the ctx (``fault_pending_wqh``, ``fault_wqh``) and every event waiter
  (``event_wqh``). A woken fault returns VM_FAULT_RETRY, and ``handle_userfault`` returns at once
  (VM_FAULT_RETRY too) on a ctx already released; the retry finds a VMA no longer registered and
  maps the zero page: silent corruption, seen as a SIGSEGV of the restored Python workload.
* While the file stays open and nobody reads it, a fault on a missing page waits in
  ``handle_userfault`` (``schedule()`` in TASK_INTERRUPTIBLE for a user fault: the fault flags
  carry FAULT_FLAG_INTERRUPTIBLE, ``userfaultfd_get_blocking_state``), so a signal wakes it to
  retry (it faults again and waits again), and SIGKILL ends the task. A fork waits for its FORK
  event to be read (``userfaultfd_event_wait_completion``, TASK_KILLABLE, ends on a fatal signal
  or release).

Hence this guard: ``python -m receiver.lazy_guard FD``, started before ``criu restore`` in a session
of its own (a signal to the receiver's process group spares it); it ignores SIGINT, SIGTERM, SIGHUP.
FD is its end of a SOCK_SEQPACKET socketpair whose other end only the receiver holds
(close-on-exec, and every child the receiver starts closes fds it was not given). Each record:

* ``uffd VPID`` with the uffd as SCM_RIGHTS: a duplicate of a task's uffd (from criu, or from a
  FORK event), sent by the daemon thread as soon as it has one;
* ``criu PID``: criu restore runs (its descendants are the tree until it exits); ``root PID``:
  the restored tree's root, once criu has written it;
* ``done``: every page is in (or the tree is already dead): close the duplicates, exit.

At end of file without ``done`` (the receiver died, or gave up and closed its end) the guard
stops every task of the tree (SIGSTOP, again until a walk of the tree finds nobody new: a stopped
task forks no more, so nobody is lost by reparenting), then SIGKILLs them all, waits (pidfd) until
each has exited, and only then closes the uffds. End of file means the receiver's files are
closed (``do_exit`` -> ``exit_files``: every thread of it is past running code), so unlike
``sender.inject_guard`` there is nothing to wait for before acting.

What it cannot cover: the guard and the receiver killed together (a cgroup-wide kill, the OOM
killer taking both); a FORK event read by the daemon in the microseconds before it forwards the
child's new uffd, if the receiver dies right then (the child may run on zeros until the guard's
kill reaches it a moment later); a receiver that dies after the last page but before its Restore
reply (the sender then continues the source; the restored tree, complete, runs on: as with an
eager restore).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from pagehaul.errors import PagehaulError, ProcessGone
from pagehaul.killpoints import ENV as KILL_AT_ENV
from pagehaul.procfs import process_tree

log = logging.getLogger(__name__)

_PACKAGE_ROOT: Final = Path(__file__).resolve().parents[1]
_DONE: Final = b"done"
_MAX_RECORD: Final = 256
_MAX_FDS: Final = 4
# Each task of the tree is SIGKILLed and then waited for this long at most.
_EXIT_WAIT_S: Final = 10.0


class LazyGuard:
    """The receiver's end of the guard (module doc). ``hold`` may be called from any thread."""

    def __init__(self) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            env = {key: value for key, value in os.environ.items() if key != KILL_AT_ENV}
            env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(_PACKAGE_ROOT), env.get("PYTHONPATH"))))
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "receiver.lazy_guard", str(theirs.fileno())], pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True, cwd="/", env=env)
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        self._sock: socket.socket | None = mine

    @property
    def pid(self) -> int:
        return self._proc.pid

    def hold(self, fd: int, vpid: int) -> None:
        """The guard keeps a duplicate of ``fd`` (task ``vpid``'s uffd); PagehaulError if it is gone."""
        self._send(f"uffd {vpid}".encode(), [fd])

    def criu(self, pid: int) -> None:
        self._send(f"criu {pid}".encode())

    def root(self, pid: int) -> None:
        self._send(f"root {pid}".encode())

    def done(self) -> None:
        """Every page is in (or the tree is dead already): the guard closes its duplicates and exits."""
        self._end(_DONE)

    def fire(self) -> None:
        """Kill the tree now, as the receiver's death would, and wait for the guard to exit."""
        self._end(b"")

    def _send(self, record: bytes, fds: Iterable[int] = ()) -> None:
        sock = self._sock
        if sock is None:
            raise PagehaulError("the lazy-restore guard has been ended")
        try:
            socket.send_fds(sock, [record], list(fds), socket.MSG_NOSIGNAL)
        except OSError as err:
            raise PagehaulError(f"the lazy-restore guard (pid {self._proc.pid}) is gone "
                                f"(exit status {self._proc.poll()}): {err}") from err

    def _end(self, word: bytes) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if word:
            with contextlib.suppress(OSError):
                sock.sendmsg([word], [], socket.MSG_NOSIGNAL)
        sock.close()
        rc = self._proc.wait()
        if rc != 0:
            log.warning("lazy-restore guard %d exited with status %d", self._proc.pid, rc)


# --- the guard process ------------------------------------------------------------------------


def _say(message: str) -> None:
    sys.stderr.write(f"pagehaul lazy-restore guard: {message}\n")
    sys.stderr.flush()


def _tree(pidfd: int, pid: int) -> set[int]:
    """``pid`` and its descendants, if the process ``pidfd`` names is still there."""
    if pidfd < 0:
        return set()
    try:
        signal.pidfd_send_signal(pidfd, 0)
        return set(process_tree(pid))
    except (ProcessLookupError, ProcessGone):
        return set()


def _stop_all(roots: list[tuple[int, int]]) -> dict[int, int]:
    """SIGSTOP the trees of ``roots`` (pidfd, pid) until a walk finds no one new; their pidfds."""
    held: dict[int, int] = {}
    while True:
        found = set().union(*(_tree(fd, pid) for fd, pid in roots)) - held.keys()
        if not found:
            return held
        for pid in sorted(found):
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            held[pid] = fd
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGSTOP)


def _kill_and_wait(held: dict[int, int]) -> list[int]:
    """SIGKILL every task of ``held``, wait for each to exit; those still there after the wait."""
    for fd in held.values():
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
    poller = select.poll()
    for fd in held.values():
        poller.register(fd, select.POLLIN)
    left = set(held.values())
    deadline = time.monotonic() + _EXIT_WAIT_S
    while left and (remaining := deadline - time.monotonic()) > 0:
        for fd, _ev in poller.poll(int(remaining * 1000) + 1):
            left.discard(fd)
            poller.unregister(fd)
    return sorted(pid for pid, fd in held.items() if fd in left)


def main(argv: list[str]) -> int:
    """The guard process: ``python -m receiver.lazy_guard SOCKET_FD`` (module doc)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    sock = socket.socket(fileno=int(argv[0]))
    uffds: list[int] = []
    criu = root = (-1, 0)
    while True:
        data, fds, _flags, _addr = socket.recv_fds(sock, _MAX_RECORD, _MAX_FDS, socket.MSG_CMSG_CLOEXEC)
        uffds.extend(fds)
        if not data:
            break
        words = data.split()
        if words == [_DONE]:
            return 0
        if words[0] in (b"criu", b"root"):
            pid = int(words[1])
            try:
                entry = (os.pidfd_open(pid), pid)
            except ProcessLookupError:
                continue
            if words[0] == b"criu":
                criu = entry
            else:
                root = entry
    # The receiver is gone (or gave up) with pages missing: no task of the tree may run on.
    held = _stop_all([root, criu])
    left = _kill_and_wait(held)
    if left:
        _say(f"tasks {left} did not exit after SIGKILL; their userfaultfds stay open while this guard waits")
        for pid in left:
            with contextlib.suppress(OSError):
                _wait_gone(held[pid])
    for fd in uffds:
        os.close(fd)
    if held:
        _say(f"the receiver died during a lazy restore; killed the restored tree ({len(held)} tasks)")
    return 0


def _wait_gone(pidfd: int) -> None:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    while not poller.poll():
        pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

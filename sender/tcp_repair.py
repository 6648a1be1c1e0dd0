"""The stopped tree's connected TCP sockets, out of repair mode again if the migration fails late.

``criu dump --tcp-established`` puts every connected TCP socket in repair mode (TCP_REPAIR) to read
its state, and after a successful dump that leaves the tree stopped it leaves them so: CRIU
turns repair off (``network_unlock`` -> ``cpt_unlock_tcp_connections``) only when the dump failed
or the tree is left running (criu/cr-dump.c, ``cr_dump_finish``), because a socket closed in repair
mode ends silently (criu/sk-tcp.c: "Socket is left in repair mode, so that at the end it's just
closed"; the kernel's ``tcp_disconnect`` sends no reset for it). That is right when the source
is killed. When the destination fails instead and the source is continued, its sockets still
in repair mode do not carry on the connections (the tests see the clients reset). So pagehaul
notes every connected TCP
socket's ``SO_REUSEADDR`` before the dump (repair mode forces it, and turning repair off clears
it) and, on that failure, does what CRIU's own rollback does (soccr ``libsoccr_resume``):
``TCP_REPAIR`` off, which also sends a window probe so the peer resynchronises, and
``SO_REUSEADDR`` back. Sockets are reached with ``pidfd_getfd`` (the tree is stopped; our copy is
closed at once).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final

from pagehaul import kernel

log = logging.getLogger(__name__)

TCP_REPAIR: Final = 19  # include/uapi/linux/tcp.h
TCP_REPAIR_OFF: Final = 0


@dataclass(frozen=True, slots=True)
class HeldSocket:
    """A connected TCP socket of the tree: where to reach it, and its SO_REUSEADDR before the dump."""

    pid: int
    fd: int
    reuseaddr: int


@contextlib.contextmanager
def _their_fd(pidfd: int, fd: int) -> Iterator[socket.socket | None]:
    """Our copy of the process's fd ``fd`` as a socket (None if it is not one any more)."""
    try:
        local = kernel.pidfd_getfd(pidfd, fd)
    except OSError:
        yield None
        return
    try:
        sk = socket.socket(fileno=local)
    except OSError:
        os.close(local)
        yield None
        return
    with sk:
        yield sk


def _connected_tcp(sk: socket.socket) -> bool:
    if sk.family not in (socket.AF_INET, socket.AF_INET6) or sk.type != socket.SOCK_STREAM or \
            sk.proto != socket.IPPROTO_TCP:
        return False
    try:
        sk.getpeername()
    except OSError:
        return False
    return True


def connected(pids: Sequence[int]) -> list[HeldSocket]:
    """Every connected TCP socket of the (stopped) tree, once each however many fds share it."""
    out: list[HeldSocket] = []
    seen: set[int] = set()
    for pid in pids:
        try:
            pidfd = kernel.pidfd_open(pid)
        except OSError:
            continue  # exited: nothing of it to resume
        try:
            for name in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:["):
                        continue
                    with _their_fd(pidfd, int(name)) as sk:
                        if sk is None or not _connected_tcp(sk):
                            continue
                        inode = os.fstat(sk.fileno()).st_ino
                        if inode in seen:
                            continue
                        seen.add(inode)
                        out.append(HeldSocket(pid, int(name), sk.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)))
        except OSError:
            pass  # its fd table is gone: exited
        finally:
            os.close(pidfd)
    return out


def resume(held: Sequence[HeldSocket]) -> int:
    """Turn repair mode off on every held socket that is in it (criu dump succeeded, or was
    killed halfway) and give back its SO_REUSEADDR; returns how many. Never raises: the source
    must be continued whatever happens here."""
    resumed = 0
    for h in held:
        try:
            pidfd = kernel.pidfd_open(h.pid)
        except OSError:
            continue
        try:
            with _their_fd(pidfd, h.fd) as sk:
                if sk is None or sk.getsockopt(socket.SOL_TCP, TCP_REPAIR) == 0:
                    continue  # criu turned it off itself (failed dump)
                sk.setsockopt(socket.SOL_TCP, TCP_REPAIR, TCP_REPAIR_OFF)
                sk.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, h.reuseaddr)
                resumed += 1
        except OSError as err:
            log.warning("could not take socket fd %d of pid %d out of repair mode: %s", h.fd, h.pid, err)
        finally:
            os.close(pidfd)
    if resumed:
        log.info("%d TCP socket(s) of the source taken out of repair mode", resumed)
    return resumed

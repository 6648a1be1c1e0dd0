"""CRIU's own page-server protocol (CRIU 4.x), server side: ``criu dump --page-server`` into pagehaul.

This is the receiving half of criu/page-xfer.c (``page_server_serve`` and the functions it calls),
so that::

    criu dump -t PID -D DIR --page-server --address HOST --port PORT

sends the task's memory straight to a pagehaul receiver while criu writes the other images itself.
A restore needs both halves in one directory, which is what CRIU users do on one host: give the
page server the dumper's ``-D`` directory.

Wire format (criu/page-xfer.c; host byte order, little-endian on every platform pagehaul runs on).
Every message starts with one 32-byte ``struct page_server_iov``, not packed, so there are 4 pad
bytes after ``cmd`` on x86_64::

    struct page_server_iov { u32 cmd; u64 nr_pages; u64 vaddr; u64 dst_id; };

    cmd    = flags << 16 | op          (PS_CMD_BITS; flags are PE_* bits, used by PS_IOV_ADD_F only)
    dst_id = id << 8 | type            (PS_TYPE_BITS; type 1 = task pagemap-<vpid>.img,
                                        2 = pagemap-shmem-<shmid>.img; older CRIUs' codes in decode_pm)

    op                          followed by                      reply
    PS_IOV_OPEN2   4            -                                u8 has_parent
    PS_IOV_PARENT  5            -                                int: does parent/ hold this pagemap?
    PS_IOV_ADD_F   6            nr_pages pages iff PE_PRESENT    -
    PS_IOV_OPEN    3            -                                - (older CRIUs)
    PS_IOV_ADD 1, PS_IOV_HOLE 2  as ADD_F|PE_PRESENT, ADD_F|PE_PARENT (older CRIUs)
    PS_IOV_CLOSE 0x1023,        -                                int32 status, 0 = all data received
    PS_IOV_FORCE_CLOSE 0x1024

With a :class:`~pagehaul.security.TlsFiles` (``receive --criu-page-server-tls``) the connection is
``criu dump --page-server --tls`` (criu/tls.c: GnuTLS, X.509): mutual TLS with pagehaul's
certificates, the client's checked for clientAuth, before the first header is read.

Mapping onto pagehaul:

* One connection is one session, and one session writes one image directory: the directory given
  to :class:`PageServer`, never one named by the peer. Sessions run one at a time; a connection
  arriving while one is open is closed at once.
* Each OPEN2 starts a pagemap (``pagemap-<id>.img`` or ``pagemap-shmem-<id>.img``) with its own
  ``pages-<K>.img``, as ``open_page_local_xfer`` does. K counts up from ``1 + 0x10000``: CRIU's page
  server bumps its ids by 0x10000 (``up_page_ids_base`` in criu/image.c) so they cannot clash with
  pages files the dumper writes into the same directory; ids already taken there are skipped too.
* Everything is written through the image store (``pagehaul.store.DumpDirWriter``, with the
  per-image writer the gRPC receiver's rounds use too) into a hidden ``.pagehaul-ps.tmp-*``
  directory inside the images directory, each pagemap as soon as the next one opens, and
  hard-linked into place only at PS_IOV_CLOSE, after an fsync: pages files first, then the
  pagemaps that name them, never replacing an existing file. Only then is status 0 sent, so a
  ``criu dump`` that succeeded means the images are complete and durable, and a session that
  breaks off leaves nothing behind. (CRIU's page server writes in place and answers CLOSE before
  its files are closed.) If the commit fails, the reply is a non-zero status and criu's dump fails
  (``disconnect_from_page_server`` returns it), resuming the task.
* The parent (``--prev-images-dir`` style) comes from the receiver's configuration: a ``parent``
  symlink in the images directory. has_parent is 1 when ``parent/`` holds a readable pagemap with
  the same name (``open_page_local_xfer``); PS_IOV_PARENT answers whether that file exists
  (``check_parent_local_xfer``). A PE_PARENT hole must lie inside the parent pagemap's present or
  in-parent entries (``check_pagehole_in_parent``), and is refused when there is no parent.
  Told has_parent=1, criu checks for pid reuse against the inventory.img behind the ``parent``
  link of its own ``-D`` directory (criu/mem.c ``detect_pid_reuse``) and fails the dump if there
  is none with a ``dump_uptime``: the dumper's directory needs the matching parent chain, as with
  CRIU's own page server.
* criu sends PS_IOV_CLOSE even when its dump has failed (criu/cr-dump.c ``cr_dump_finish``), so
  the pagemaps of a failed dump are committed, as CRIU's page server leaves them: only criu's exit
  status says whether the directory holds a whole dump. Dump again into a fresh directory (a
  second session will not replace the first one's pagemaps).

Everything the peer sends is checked before it reaches the disk: unknown commands (including
PS_IOV_GET, the lazy-pages request a receiver cannot serve), flags on commands that take none,
unknown pagemap types, flag sets other than the four CRIU writes, unaligned or wrapping runs, runs
that do not ascend within their pagemap, a pagemap opened twice, and the limits in
:class:`PageServerLimits`. Any of these logs one line and closes the connection; the server keeps
serving. Page data is received with ``loop.sock_recv_into`` into one reused buffer and written
with ``os.write``: the Python work is per run (one header), never per page.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import signal
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, NamedTuple, TypeVar

import numpy as np

from pagehaul.codec import (
    PARENT_LINK,
    PE_LAZY,
    PE_PARENT,
    PE_PRESENT,
    VALID_PE_FLAGS,
    ImageKey,
    ImageKind,
    pages_name,
)
from pagehaul.criu_pageserver import (
    ADDRESS_LIMIT,
    LEGACY_PID_TYPES,
    LEGACY_SHMEM_TYPES,
    PAGE_IDS_BASE,
    PAGE_SERVER_IOV,
    PID_MAX_LIMIT,
    PS_CMD_BITS,
    PS_CMD_MASK,
    PS_IOV_ADD,
    PS_IOV_ADD_F,
    PS_IOV_CLOSE,
    PS_IOV_FORCE_CLOSE,
    PS_IOV_GET,
    PS_IOV_HOLE,
    PS_IOV_OPEN,
    PS_IOV_OPEN2,
    PS_IOV_PARENT,
    PS_TYPE_BITS,
    PS_TYPE_MASK,
    PS_TYPE_PID,
    PS_TYPE_SHMEM,
    STATUS_OK,
    STATUS_REPLY,
)
from pagehaul.errors import ConfigError, ImageError, PagehaulError, ProtocolError
from pagehaul.kernel import PAGE_SIZE
from pagehaul.security import TlsFiles, client_cert_refusal
from pagehaul.store import DumpDirWriter, ImageCover, ImageWriter

log = logging.getLogger(__name__)

# Protocol constants: pagehaul.criu_pageserver (criu/page-xfer.c).

TMP_PREFIX: Final = ".pagehaul-ps.tmp-"
_T = TypeVar("_T")


class PageServerIov(NamedTuple):
    """One decoded ``struct page_server_iov``."""

    cmd: int
    nr_pages: int = 0
    vaddr: int = 0
    dst_id: int = 0

    @property
    def op(self) -> int:
        return decode_cmd(self.cmd)

    @property
    def flags(self) -> int:
        return decode_flags(self.cmd)

    def pack(self) -> bytes:
        return PAGE_SERVER_IOV.pack(self.cmd, self.nr_pages, self.vaddr, self.dst_id)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> PageServerIov:
        """The pad bytes are ignored: CRIU's stack-built headers may carry anything there."""
        return cls(*PAGE_SERVER_IOV.unpack(data))


def encode_cmd(op: int, flags: int = 0) -> int:
    """``encode_ps_cmd``: flags in the upper 16 bits."""
    return (flags << PS_CMD_BITS | op) & 0xFFFF_FFFF


def decode_cmd(cmd: int) -> int:
    return cmd & PS_CMD_MASK


def decode_flags(cmd: int) -> int:
    return cmd >> PS_CMD_BITS


def encode_dst_id(kind: ImageKind, ident: int) -> int:
    """``encode_pm``."""
    return ident << PS_TYPE_BITS | (PS_TYPE_PID if kind == "pid" else PS_TYPE_SHMEM)


def decode_dst_id(dst_id: int) -> ImageKey:
    """``decode_pm``, legacy type codes included; ProtocolError for any other type."""
    kind_code = dst_id & PS_TYPE_MASK
    ident = dst_id >> PS_TYPE_BITS
    if kind_code == PS_TYPE_PID or kind_code in LEGACY_PID_TYPES:
        return ImageKey("pid", ident)
    if kind_code == PS_TYPE_SHMEM or kind_code in LEGACY_SHMEM_TYPES:
        return ImageKey("shmem", ident)
    raise ProtocolError(f"unknown pagemap type {kind_code} in dst_id {dst_id:#x}")


# === Limits and results ================================================================================


@dataclass(frozen=True, slots=True)
class PageServerLimits:
    """What one session may ask of the receiver. A peer over a limit is disconnected."""

    # Pages of data in one ADD_F. CRIU sends at most one pipe's worth per run (a few MiB); holes
    # and lazy entries carry no data and are bounded only by ADDRESS_LIMIT.
    max_run_pages: int = 1 << 18
    max_session_bytes: int = 1 << 40  # page data per session
    max_pagemaps: int = 1 << 16  # per session
    max_entries_per_pagemap: int = 1 << 22
    # Silence allowed on the connection. criu connects at the start of a dump and may send
    # nothing while it freezes and inspects the tree.
    idle_timeout_s: float = 600.0
    # How long to wait for the peer to hang up after the CLOSE reply (CRIU waits too, to avoid
    # TIME_WAIT on its side).
    close_timeout_s: float = 10.0
    # With TLS, how long a client may take to authenticate; until then it holds the one session.
    handshake_timeout_s: float = 10.0
    recv_buffer_bytes: int = 1 << 20  # reused for page data; a multiple of the page size

    def __post_init__(self) -> None:
        if min(self.max_run_pages, self.max_session_bytes, self.max_pagemaps, self.max_entries_per_pagemap,
               self.recv_buffer_bytes) < 1 or self.idle_timeout_s <= 0 or self.close_timeout_s <= 0 \
                or self.handshake_timeout_s <= 0:
            raise ValueError(f"page server limits must be positive: {self}")


@dataclass(frozen=True, slots=True)
class PagemapResult:
    """One pagemap a committed session wrote."""

    name: str  # pagemap-<id>.img or pagemap-shmem-<id>.img
    dst_id: int
    pages_id: int
    entries: int
    pages_written: int  # PE_PRESENT pages, in pages-<pages_id>.img
    pages_skipped_parent: int  # PE_PARENT holes
    pages_lazy: int  # PE_LAZY pages, transferred or not
    has_parent: bool


@dataclass(frozen=True, slots=True)
class SessionResult:
    peer: str
    images_dir: Path
    pagemaps: tuple[PagemapResult, ...]
    bytes_received: int  # page data
    seconds: float


# === One connection ====================================================================================


class _PlainConn:
    """CRIU's page-server protocol over plain TCP: the non-blocking socket itself."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()

    async def handshake(self) -> None:
        return None

    async def recv_into(self, view: memoryview) -> int:
        return await self.loop.sock_recv_into(self.sock, view)

    async def sendall(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)


class _TlsConn(_PlainConn):
    """``criu dump --page-server --tls``: the same protocol inside TLS (CRIU's criu/tls.c, GnuTLS,
    X.509, a client certificate required), run with memory BIOs over the socket, since asyncio's
    ``sock_*`` calls take no ``SSLSocket``. Records, not pages, are the unit here: each read
    decrypts into the caller's buffer."""

    RECV_BYTES: Final = 1 << 18

    def __init__(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        super().__init__(sock)
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self._in, self._out, server_side=True)

    async def _flush(self) -> None:
        data = self._out.read()
        if data:
            await self.loop.sock_sendall(self.sock, data)

    async def _fill(self) -> None:
        data = await self.loop.sock_recv(self.sock, self.RECV_BYTES)
        if data:
            self._in.write(data)
        else:
            self._in.write_eof()

    async def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
        await self._flush()
        refusal = client_cert_refusal(self._peer_pem())
        if refusal is not None:
            raise ProtocolError(f"TLS client refused: {refusal}")

    def _peer_pem(self) -> bytes | None:
        der = self.tls.getpeercert(binary_form=True)
        return ssl.DER_cert_to_PEM_cert(der).encode() if der else None

    async def recv_into(self, view: memoryview) -> int:
        while True:
            try:
                return int(self.tls.read(len(view), view))  # with a buffer: bytes read
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return 0  # close_notify, or the peer's plain EOF: the protocol says whether that was early

    async def sendall(self, data: bytes) -> None:
        self.tls.write(data)
        await self._flush()




class _Session:
    """One page-server connection: the message loop of ``page_server_serve``, and the commit."""

    def __init__(self, conn: _PlainConn, peer: str, images_dir: Path, limits: PageServerLimits,
                 page_size: int) -> None:
        self.conn = conn
        self.peer = peer
        self.images_dir = images_dir
        self.limits = limits
        self.page_size = page_size
        self.loop = asyncio.get_running_loop()
        self.started = time.monotonic()
        self._hdr = bytearray(PAGE_SERVER_IOV.size)
        chunk = max(limits.recv_buffer_bytes // page_size, 1) * page_size
        self._data = memoryview(bytearray(chunk))
        self._images = DumpDirWriter(images_dir, page_size, prefix=TMP_PREFIX)
        self._current: ImageWriter | None = None  # the open pagemap, where runs go
        self._opened: set[ImageKey] = set()
        self._dst_ids: list[int] = []  # of each pagemap opened, in order
        self._next_pages_id = PAGE_IDS_BASE
        self.bytes_received = 0

    # --- socket ---

    async def _recv_exact(self, view: memoryview) -> int:
        """Fill ``view``; returns fewer bytes only if the peer closed the connection."""
        got = 0
        while got < len(view):
            async with asyncio.timeout(self.limits.idle_timeout_s):
                n = await self.conn.recv_into(view[got:])
            if n == 0:
                break
            got += n
        return got

    async def _recv_header(self) -> PageServerIov | None:
        """The next header, or None at a clean end of stream (EOF on a header boundary)."""
        got = await self._recv_exact(memoryview(self._hdr))
        if got == 0:
            return None
        if got < PAGE_SERVER_IOV.size:
            raise ProtocolError(f"connection closed inside a header ({got} of {PAGE_SERVER_IOV.size} bytes)")
        return PageServerIov.unpack(self._hdr)

    async def _recv_pages(self, pm: ImageWriter, vaddr: int, nbytes: int) -> None:
        """Stream ``nbytes`` of page data from the socket into the pages file, one buffer at a time."""
        remaining = nbytes
        while remaining:
            view = self._data[:min(remaining, len(self._data))]
            got = await self._recv_exact(view)
            if got < len(view):
                raise ProtocolError(f"connection closed inside the page data of run {vaddr:#x} "
                                    f"({nbytes - remaining + got} of {nbytes} bytes)")
            pm.write_pages(view)
            remaining -= len(view)
        self.bytes_received += nbytes

    async def _send(self, data: bytes) -> None:
        async with asyncio.timeout(self.limits.idle_timeout_s):
            await self.conn.sendall(data)

    # --- the message loop (page_server_serve) ---

    async def run(self) -> SessionResult:
        while True:
            iov = await self._recv_header()
            if iov is None:
                # page_server_serve: "The data were not flushed"
                raise ProtocolError("connection closed without PS_IOV_CLOSE: the data were not flushed")
            op, flags = iov.op, iov.flags
            if op in (PS_IOV_ADD_F, PS_IOV_ADD, PS_IOV_HOLE):
                if op == PS_IOV_ADD:
                    flags = PE_PRESENT
                elif op == PS_IOV_HOLE:
                    flags = PE_PARENT
                if op != PS_IOV_ADD_F and iov.flags:
                    raise ProtocolError(f"command {op} carries flags {iov.flags:#x}")
                await self._add(iov, flags)
                continue
            if flags:
                raise ProtocolError(f"command {op:#x} carries flags {flags:#x}; only PS_IOV_ADD_F has flags")
            if op == PS_IOV_OPEN2:
                has_parent = await self._open(iov.dst_id)
                await self._send(b"\x01" if has_parent else b"\x00")
            elif op == PS_IOV_OPEN:
                await self._open(iov.dst_id)
            elif op == PS_IOV_PARENT:
                await self._send(STATUS_REPLY.pack(int(self._parent_has(decode_dst_id(iov.dst_id)))))
            elif op in (PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE):
                return await self._close()
            elif op == PS_IOV_GET:
                raise ProtocolError("PS_IOV_GET (a lazy-pages request) is not served: this page server only receives")
            else:
                raise ProtocolError(f"unknown command {iov.cmd:#x}")

    def _parent_dir(self) -> Path | None:
        """``open_parent``: the images directory's ``parent`` entry, if it leads to a directory."""
        link = self.images_dir / PARENT_LINK
        return link if link.is_dir() else None

    def _parent_has(self, key: ImageKey) -> bool:
        """``check_parent_local_xfer``: does the parent directory hold this pagemap file?"""
        parent = self._parent_dir()
        return parent is not None and (parent / key.pagemap_name).is_file()

    def _parent_cover(self, key: ImageKey) -> ImageCover | None:
        """``open_page_local_xfer``: the parent's pagemap of ``key``, if there is a readable one."""
        parent = self._parent_dir()
        if parent is None or not (parent / key.pagemap_name).is_file():
            return None
        try:
            return ImageCover.read(parent, None, key, self.page_size)
        except ImageError as err:
            # open_page_local_xfer: "No parent image found, though parent directory is set"
            log.warning("page-server parent pagemap unusable, answering has_parent=0 peer=%s error=%s",
                        self.peer, err)
            return None

    async def _open(self, dst_id: int) -> bool:
        """``page_server_open``: finish the open pagemap, start the next; returns has_parent."""
        key = decode_dst_id(dst_id)
        if key.kind == "pid" and not 0 < key.id <= PID_MAX_LIMIT:
            raise ProtocolError(f"pagemap for pid {key.id} (dst_id {dst_id:#x}): no such pid can exist")
        if key in self._opened:
            raise ProtocolError(f"{key.pagemap_name} opened twice in one session")
        if len(self._opened) >= self.limits.max_pagemaps:
            raise ProtocolError(f"more than {self.limits.max_pagemaps} pagemaps in one session")
        await self._finish_current()
        cover = self._parent_cover(key)
        self._current = self._images.image(key, self._take_pages_id(), parent_cover=cover)
        self._opened.add(key)
        self._dst_ids.append(dst_id)
        log.debug("page-server open peer=%s pagemap=%s pages_id=%d has_parent=%s", self.peer, key.pagemap_name,
                  self._current.pages_id, cover is not None)
        return cover is not None

    def _take_pages_id(self) -> int:
        while (self.images_dir / pages_name(self._next_pages_id)).exists():
            self._next_pages_id += 1
        pages_id = self._next_pages_id
        self._next_pages_id += 1
        return pages_id

    async def _finish_current(self) -> None:
        """Write the open pagemap and close its files: a session may open more pagemaps than the
        receiver may hold files open."""
        if self._current is not None:
            writer, self._current = self._current, None
            await _run_to_completion(writer.finish)

    async def _add(self, iov: PageServerIov, flags: int) -> None:
        """``page_server_add``: one pagemap entry, then its pages if PE_PRESENT."""
        pm = self._current
        if pm is None or self._dst_ids[-1] != iov.dst_id:
            # prep_loc_xfer: older CRIUs sent runs without opening the pagemap first.
            log.warning("page-server deprecated IO without open peer=%s dst_id=%#x", self.peer, iov.dst_id)
            await self._open(iov.dst_id)
            pm = self._current
            assert pm is not None
        vaddr, nr_pages, ps = iov.vaddr, iov.nr_pages, self.page_size
        where = f"{pm.key.pagemap_name} run {vaddr:#x}+{nr_pages}"
        if flags not in VALID_PE_FLAGS:
            raise ProtocolError(f"{where}: flags {flags:#x} are not a combination CRIU writes")
        if nr_pages == 0 or vaddr % ps:
            raise ProtocolError(f"{where}: runs must be page-aligned and non-empty")
        if vaddr >= ADDRESS_LIMIT or nr_pages > (ADDRESS_LIMIT - vaddr) // ps:
            raise ProtocolError(f"{where}: run reaches past {ADDRESS_LIMIT:#x}")
        end = vaddr + nr_pages * ps
        if vaddr < pm.next_vaddr:
            raise ProtocolError(f"{where}: runs must ascend without overlapping; the previous run ends at "
                                f"{pm.next_vaddr:#x}")
        if pm.runs_added >= self.limits.max_entries_per_pagemap:
            raise ProtocolError(f"{where}: more than {self.limits.max_entries_per_pagemap} entries in one pagemap")
        if flags == PE_PARENT:
            if not pm.has_parent:
                raise ProtocolError(f"{where}: a PE_PARENT hole, but the pagemap has no parent (has_parent was 0)")
            if not pm.parent_cover().covers(vaddr, end):
                # write_pagemap_loc: "Hole ... not found in parent"
                raise ProtocolError(f"{where}: hole not found in the parent pagemap")
        nbytes = nr_pages * ps if flags & PE_PRESENT else 0
        if nbytes:
            if nr_pages > self.limits.max_run_pages:
                raise ProtocolError(f"{where}: more than {self.limits.max_run_pages} pages of data in one run")
            if self.bytes_received + nbytes > self.limits.max_session_bytes:
                raise ProtocolError(f"{where}: session would exceed {self.limits.max_session_bytes} bytes of pages")
        pm.add_run(vaddr, nr_pages, flags)
        if nbytes:
            await self._recv_pages(pm, vaddr, nbytes)

    # --- the end of a session ---

    async def _close(self) -> SessionResult:
        """PS_IOV_CLOSE: commit, reply the status, and wait for the peer to hang up.

        Only after the commit (every file fsynced, then linked into place) is status 0 sent.
        """
        self._current = None  # the commit finishes it
        status = STATUS_OK
        try:
            await _run_to_completion(self._images.commit)
        except ImageError as err:
            log.warning("page-server commit failed peer=%s dir=%s error=%s", self.peer, self.images_dir, err)
            status = -(err.__cause__.errno or errno.EIO) if isinstance(err.__cause__, OSError) else -errno.EIO
        await self._send(STATUS_REPLY.pack(status))
        if status != STATUS_OK:
            raise ImageError(f"{self.images_dir}: session not committed (replied status {status})")
        pagemaps = tuple(_result(w, dst_id) for w, dst_id in zip(self._images.images, self._dst_ids, strict=True))
        result = SessionResult(self.peer, self.images_dir, pagemaps, self.bytes_received,
                               time.monotonic() - self.started)
        await self._wait_hangup()
        return result

    async def _wait_hangup(self) -> None:
        """page_server_serve waits for the peer to close after the last reply (no TIME_WAIT there)."""
        try:
            got = await asyncio.wait_for(self.conn.recv_into(memoryview(self._hdr)), self.limits.close_timeout_s)
        except (TimeoutError, OSError) as err:
            log.warning("page-server peer did not hang up after PS_IOV_CLOSE peer=%s error=%r", self.peer, err)
            return
        if got:
            log.warning("page-server unexpected data after PS_IOV_CLOSE peer=%s (ignored; already committed)",
                        self.peer)

    def abort(self) -> None:
        """Drop everything the session wrote. Idempotent; nothing to do once committed."""
        self._current = None
        self._images.abort()


def _result(writer: ImageWriter, dst_id: int) -> PagemapResult:
    """What a committed session wrote for one pagemap."""
    pagemap = writer.finish().pagemap
    lazy = int(pagemap.nr_pages[(pagemap.flags & np.uint32(PE_LAZY)) != 0].sum())
    return PagemapResult(writer.key.pagemap_name, dst_id, writer.pages_id, int(pagemap.vaddr.size),
                         writer.pages_written, writer.pages_skipped_parent, lazy, writer.has_parent)


async def _run_to_completion(fn: Callable[[], _T]) -> _T:
    """Run blocking file work in a thread; if cancelled, let it finish before the caller cleans up."""
    work = asyncio.ensure_future(asyncio.to_thread(fn))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        await asyncio.wait([work])
        raise


# === The server ========================================================================================


def _split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{listen!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


class PageServer:
    """A CRIU page server on ``listen`` writing into ``images_dir``. ``await start()`` binds and returns the port.

    ``parent`` is the previous images directory, like CRIU's ``--prev-images-dir``: a relative path
    is taken relative to ``images_dir`` and used as the ``parent`` link as is; an absolute one is
    turned into a relative link (CRIU warns that absolute links may not work on restore).
    """

    def __init__(self, images_dir: Path, listen: str = "127.0.0.1:0", parent: Path | None = None, *,
                 limits: PageServerLimits | None = None, page_size: int = PAGE_SIZE,
                 tls: TlsFiles | None = None) -> None:
        self.images_dir = images_dir
        # criu dump --page-server --tls: mutual TLS with these files (a client certificate signed by
        # their CA, for clientAuth); None: CRIU's plain TCP, which takes any writer.
        self.tls_context = tls.server_ssl_context() if tls is not None else None
        self.listen = listen
        self.parent = parent
        self.limits = limits if limits is not None else PageServerLimits()
        self.page_size = page_size
        self.port = 0
        self.sessions_committed = 0
        self.sessions_failed = 0
        self.sessions_refused = 0  # connections closed because a session was already open
        self.last_result: SessionResult | None = None
        self._lsock: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._session_task: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        host = self.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    def _link_parent(self) -> None:
        if self.parent is None:
            return
        parent = self.parent
        target = os.path.relpath(parent, os.path.abspath(self.images_dir)) if parent.is_absolute() else str(parent)
        link = self.images_dir / PARENT_LINK
        if not (self.images_dir / target).is_dir():
            raise ConfigError(f"parent images directory {parent} (link {target!r} from {self.images_dir}) "
                              "is not a directory")
        if os.path.lexists(link):
            if not link.is_symlink() or os.readlink(link) != target:
                raise ConfigError(f"{link} exists and is not a link to {target!r}")
            return
        try:
            os.symlink(target, link)
        except OSError as err:
            raise ConfigError(f"{link}: cannot create parent link: {err.strerror}") from err

    async def start(self) -> int:
        try:
            self.images_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"{self.images_dir}: cannot create images directory: {err.strerror}") from err
        self._link_parent()
        host, port = _split_listen(self.listen)
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            family, kind, proto, _, addr = infos[0]
            lsock = socket.socket(family, kind, proto)
            try:
                lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                lsock.bind(addr)
                lsock.listen(8)
                lsock.setblocking(False)
            except BaseException:
                lsock.close()
                raise
        except OSError as err:
            raise PagehaulError(f"cannot listen on {self.listen}: {err}") from err
        self._lsock = lsock
        self.port = lsock.getsockname()[1]
        self._accept_task = asyncio.create_task(self._accept_loop(lsock), name="page-server-accept")
        log.info("page server listening address=%s images_dir=%s parent=%s tls=%s", self.address, self.images_dir,
                 self.parent, self.tls_context is not None)
        return self.port

    async def _accept_loop(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(lsock)
            except OSError as err:  # EMFILE and the like: this connection is lost, the server is not
                log.warning("page-server accept failed error=%s", err)
                continue
            peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
            if self._session_task is not None:
                log.warning("page-server connection refused peer=%s reason=a session is already open", peer)
                self.sessions_refused += 1
                conn.close()
                continue
            conn.setblocking(False)
            # page_server_serve: the server writes replies back now and then; never delay them.
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = asyncio.create_task(self._serve_connection(conn, peer), name=f"page-server {peer}")
            self._session_task = task
            task.add_done_callback(functools.partial(self._session_done, conn=conn))

    def _session_done(self, task: asyncio.Task[None], conn: socket.socket) -> None:
        # After the session's own cleanup (abort, counters), even if it was cancelled before it
        # started: a peer that sees the connection close sees the server ready for the next one.
        if self._session_task is task:
            self._session_task = None
        conn.close()

    async def _serve_connection(self, conn: socket.socket, peer: str) -> None:
        session: _Session | None = None
        try:
            log.info("page-server session started peer=%s dir=%s", peer, self.images_dir)
            channel = _PlainConn(conn) if self.tls_context is None else _TlsConn(conn, self.tls_context)
            async with asyncio.timeout(self.limits.handshake_timeout_s):
                await channel.handshake()
            session = _Session(channel, peer, self.images_dir, self.limits, self.page_size)
            result = await session.run()
            self.sessions_committed += 1
            self.last_result = result
            log.info("page-server session committed peer=%s dir=%s pagemaps=%s pages_written=%d "
                     "pages_skipped_parent=%d pages_lazy=%d bytes=%d seconds=%.3f", peer, self.images_dir,
                     ",".join(p.name for p in result.pagemaps), sum(p.pages_written for p in result.pagemaps),
                     sum(p.pages_skipped_parent for p in result.pagemaps),
                     sum(p.pages_lazy for p in result.pagemaps), result.bytes_received, result.seconds)
        except asyncio.CancelledError:
            self.sessions_failed += 1
            log.warning("page-server session cancelled peer=%s: nothing committed", peer)
            raise
        except (ProtocolError, ImageError, ssl.SSLError) as err:
            self.sessions_failed += 1
            log.warning("page-server session refused peer=%s reason=%s", peer, err)
        except TimeoutError:
            self.sessions_failed += 1
            if session is None:
                log.warning("page-server session refused peer=%s reason=no TLS handshake within %g s", peer,
                            self.limits.handshake_timeout_s)
            else:
                log.warning("page-server session refused peer=%s reason=idle for %g s", peer,
                            self.limits.idle_timeout_s)
        except OSError as err:
            self.sessions_failed += 1
            log.warning("page-server session lost peer=%s error=%s", peer, err)
        except Exception:
            self.sessions_failed += 1
            log.exception("page-server session failed peer=%s", peer)
        finally:
            # Clean up before the socket closes: a peer that sees the close sees the end state.
            if session is not None:
                session.abort()

    async def idle(self) -> None:
        """Return once no session is open (at once if none is)."""
        task = self._session_task
        if task is not None:
            await asyncio.wait([task])

    async def stop(self, grace_s: float = 0.0) -> None:
        """Stop accepting; give an open session ``grace_s`` to finish, then cancel it."""
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
            self._accept_task = None
        if self._lsock is not None:
            self._lsock.close()
            self._lsock = None
        task = self._session_task
        if task is not None:
            if grace_s > 0:
                await asyncio.wait([task], timeout=grace_s)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def serve_page_server(images_dir: Path, listen: str, parent: Path | None = None, *,
                            limits: PageServerLimits | None = None, ready: asyncio.Future[str] | None = None,
                            handle_signals: bool = True, grace_s: float = 10.0, tls: TlsFiles | None = None) -> None:
    """Serve CRIU's page-server protocol into ``images_dir`` until cancelled, or SIGTERM/SIGINT.

    With ``handle_signals=False`` the caller owns the signals (when it runs the gRPC receiver's
    ``serve`` in the same loop, which installs its own handlers) and stops this by cancelling it.
    An open session gets ``grace_s`` to finish.
    """
    server = PageServer(images_dir, listen, parent, limits=limits, tls=tls)
    await server.start()
    if ready is not None:
        ready.set_result(server.address)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT) if handle_signals else ()
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        print(f"pagehaul CRIU page server listening on {server.address}", flush=True)
        await stop.wait()
        log.info("page server stopping grace_s=%s", grace_s)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await server.stop(grace_s)

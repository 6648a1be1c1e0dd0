"""The destination half of a full migration: take CRIU's images, restore the process tree.

Transport-free: :meth:`Restorer.restore` takes the restore's requests as an async iterator of
``RestoreRequest`` (proto/pagehaul/v1/restore.proto) and returns the ``RestoreReply``, or raises a
:class:`RestoreRefused` (the request cannot be served as sent; its subclasses say why) or another
``PagehaulError`` (the restore itself failed, e.g. criu's). A transport adapter
(``receiver.grpc_server`` for the ``/pagehaul.v1.Restore/Restore`` RPC) checks the peer's
credentials, feeds the requests and maps those errors to its status codes.

``begin`` names a session whose final round is committed, then the image files follow in chunks,
then ``end``. The receiver writes them into ``SESSION/restore-N/shipped`` (plain names only,
bounded in total), lays out ``SESSION/restore-N`` with ``receiver.assemble.assemble``, runs
``criu restore -d`` there, continues the restored tree (CRIU restores it stopped, as it was
dumped) and answers with its pid. Any failure answers with a status and the reason (the first
error of criu's log) and leaves of ``restore-N`` only criu's logs for a look: the shipped files
and the layout are removed (they are not counted by the disk quota). The session's rounds are
never changed. A stream silent for ``idle_timeout_s`` ends the restore (DEADLINE_EXCEEDED) and
frees the session for another attempt (:class:`RestoreIdle`).

A tree that moves with its IPv4 addresses (``begin.addresses``, ``pagehaul migrate --move-address``)
is refused at ``begin`` (:class:`AddressRefused`) unless this receiver has a service device
(``--service-device``) and none of them is in use here; around criu restore they are added to
that device and announced once the tree runs (``pagehaul.netaddr.take``), and removed again if
the restore fails.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final

from pagehaul import netaddr
from pagehaul.codec import IMAGE_NAME_RE
from pagehaul.criu_opts import CriuOptions
from pagehaul.criu_tools import run_criu
from pagehaul.errors import AccessDenied, PagehaulError, ProcessGone
from pagehaul.kernel import PAGE_SIZE
from pagehaul.procfs import process_tree, read_status
from pagehaul.v1 import restore_pb2 as rpb
from receiver.assemble import IMAGES_SUBDIR, Layout, assemble
from receiver.lazy import LazyRestore, finish_lazy_restore, start_lazy_restore
from receiver.session import plain_session_id

log = logging.getLogger(__name__)

SHIPPED_SUBDIR: Final = "shipped"
RESTORE_LOG: Final = "restore.log"
CRIU_OUT: Final = "criu.out"


class RestoreRefused(PagehaulError):
    """The request cannot be served as sent: a bad session id, image name or stream."""


class NoSuchSession(RestoreRefused):
    """No session of that id under the images dir."""


class NotRestorable(RestoreRefused):
    """The session has no committed final round, or is being restored already."""


class RestoreTooLarge(RestoreRefused):
    """More image bytes than one restore may ship (``RestoreConfig.max_bytes``)."""


class RestoreIdle(RestoreRefused):
    """The client sent nothing for ``RestoreConfig.idle_timeout_s``."""


class AddressRefused(RestoreRefused):
    """The tree brings addresses this receiver cannot take: it has no service device, or one of
    them is in use here."""


@dataclass(frozen=True, slots=True)
class RestoreConfig:
    criu: Path
    # Bytes of image files one restore may ship (CRIU's non-memory images are small; shared memory
    # pagehaul does not move yet ships whole).
    max_bytes: int = 1 << 30
    timeout_s: float = 300.0
    # A restore stream that sends nothing for this long is ended (it holds its session busy).
    idle_timeout_s: float = 60.0
    # CRIU's own options for criu restore (--criu-opt, --criu-config), validated.
    criu_opts: CriuOptions = field(default_factory=CriuOptions)
    # Where addresses moved with a tree go (--service-device); None: such restores are refused.
    service_device: str | None = None
    # criu restore --lazy-pages with the receiver as the lazy-pages daemon (receiver/lazy.py).
    lazy: bool = False


def _state(pid: int) -> str:
    try:
        return read_status(pid).state
    except (ProcessGone, AccessDenied, ValueError):
        return "?"


def _tree(root: int) -> list[int]:
    try:
        return process_tree(root)
    except ProcessGone:
        return []


class Restorer:
    """Restores of one receiver's sessions (under ``images_dir``), one at a time per session."""

    def __init__(self, images_dir: Path, config: RestoreConfig) -> None:
        self.images_dir = images_dir
        self.config = config
        self.page_size = PAGE_SIZE
        self._busy: set[str] = set()

    def _session_dir(self, session_id: str) -> Path:
        if not plain_session_id(session_id):
            raise RestoreRefused(f"bad session id {session_id!r}")
        path = self.images_dir / session_id
        try:
            doc = json.loads((path / "session.json").read_text())
        except (OSError, ValueError) as err:
            raise NoSuchSession(f"no session {session_id!r} here") from err
        if not doc.get("complete"):
            raise NotRestorable(f"session {session_id!r} has no committed final round")
        return path

    async def restore(self, requests: AsyncIterator[rpb.RestoreRequest], peer: str) -> rpb.RestoreReply:
        """One restore: ``begin``, the image files, ``end``; ``peer`` only names the client in logs."""
        first = await self._next(requests)
        if first is None or first.WhichOneof("msg") != "begin":
            raise RestoreRefused("a restore starts with begin")
        begin = first.begin
        session_dir = self._session_dir(begin.session_id)
        if begin.total_bytes > self.config.max_bytes:
            raise RestoreTooLarge(f"{begin.total_bytes} bytes of images exceed this receiver's limit "
                                  f"of {self.config.max_bytes}")
        if begin.session_id in self._busy:
            raise NotRestorable(f"session {begin.session_id!r} is being restored already")
        addresses = self._addresses(begin)
        self._busy.add(begin.session_id)
        try:
            n = 0
            while (session_dir / f"restore-{n}").exists():
                n += 1
            restore_dir = session_dir / f"restore-{n}"
            shipped = restore_dir / SHIPPED_SUBDIR
            shipped.mkdir(parents=True)
            log.info("restore begins session=%s dir=%s peer=%s tasks=%d", begin.session_id, restore_dir, peer,
                     len(begin.tasks))
            try:
                await self._receive_files(requests, shipped, begin.total_bytes)
                t0 = time.monotonic_ns()
                layout = await self._assemble(session_dir, restore_dir, shipped)
                t1 = time.monotonic_ns()
                lazy: LazyRestore | None = None
                with netaddr.take(addresses, self.config.service_device or ""):
                    if self.config.lazy:
                        lazy = await start_lazy_restore(
                            self.config.criu, layout.images, timeout_s=self.config.timeout_s,
                            options=self._criu_options(tcp_close=begin.tcp_close, shell_job=begin.shell_job,
                                                       tcp_established=begin.tcp_established),
                            continue_tree=continue_tree)
                        root = lazy.root
                    else:
                        root = await self._run_criu(layout.images, tcp_close=begin.tcp_close,
                                                    shell_job=begin.shell_job, tcp_established=begin.tcp_established)
                t2 = time.monotonic_ns()
                # The answer waits for the last lazy page: the sender kills the source only then.
                filled = await finish_lazy_restore(lazy, self.config.timeout_s) if lazy is not None else None
            except BaseException:
                await asyncio.shield(asyncio.to_thread(_discard, restore_dir))
                raise
            log.info("restored session=%s root_pid=%d assemble_us=%d restore_us=%d", begin.session_id, root,
                     (t1 - t0) // 1000, (t2 - t1) // 1000)
            reply = rpb.RestoreReply(root_pid=root, images_dir=str(layout.images), assemble_us=(t1 - t0) // 1000,
                                     restore_us=(t2 - t1) // 1000, extra_pages=layout.extra_pages)
            if filled is not None:
                reply.lazy_pages, reply.lazy_after_resume_pages = filled.lazy_pages, filled.after_resume_pages
                reply.lazy_faults, reply.lazy_fill_us = filled.faults, max(0, filled.last_page_ns - t2) // 1000
            return reply
        finally:
            self._busy.discard(begin.session_id)

    def _addresses(self, begin: rpb.RestoreBegin) -> list[ipaddress.IPv4Interface]:
        """The addresses the tree brings along, checked before anything is received: this
        receiver takes addresses (--service-device), and none of them is in use here."""
        if not begin.addresses:
            return []
        if self.config.service_device is None:
            raise AddressRefused(f"the tree moves with its address ({', '.join(begin.addresses)}), and this "
                                 "receiver takes no addresses: start it with --service-device DEV")
        try:
            out = [ipaddress.IPv4Interface(a) for a in begin.addresses]
        except ValueError as err:
            raise RestoreRefused(f"bad address to move: {err}") from err
        try:
            netaddr.check_takeable(out, self.config.service_device)
        except netaddr.AddressError as err:
            raise AddressRefused(str(err)) from err
        return out

    async def _assemble(self, session_dir: Path, restore_dir: Path, shipped: Path) -> Layout:
        try:
            return await asyncio.to_thread(assemble, session_dir, restore_dir, shipped, self.page_size)
        except FileExistsError as err:
            name = Path(err.filename).name if err.filename else "a shipped file"
            raise RestoreRefused(f"shipped {name} clashes with an image the receiver lays out") from err

    async def _next(self, requests: AsyncIterator[rpb.RestoreRequest]) -> rpb.RestoreRequest | None:
        """The next request, None at the end of the stream; refused after ``idle_timeout_s`` of silence."""
        try:
            return await asyncio.wait_for(anext(requests, None), self.config.idle_timeout_s)
        except TimeoutError as err:
            raise RestoreIdle(f"no restore message for {self.config.idle_timeout_s:g} s") from err

    async def _receive_files(self, requests: AsyncIterator[rpb.RestoreRequest], into: Path, declared: int) -> None:
        total = 0
        current: IO[bytes] | None = None
        name = ""
        try:
            while (req := await self._next(requests)) is not None:
                kind = req.WhichOneof("msg")
                if kind == "end":
                    if current is not None:
                        raise RestoreRefused(f"{name} ends without its last chunk")
                    return
                if kind != "file_chunk":
                    raise RestoreRefused(f"unexpected {kind} in a restore")
                chunk = req.file_chunk
                total += len(chunk.data)
                if total > declared:
                    raise RestoreRefused("more image bytes than begin declared")
                if current is None:
                    if not IMAGE_NAME_RE.fullmatch(chunk.name):
                        raise RestoreRefused(f"{chunk.name!r} is not a CRIU image name")
                    name = chunk.name
                    try:
                        current = open(into / name, "xb")  # noqa: SIM115, ASYNC230 -- closed on its last chunk; small local file
                    except FileExistsError as err:
                        raise RestoreRefused(f"{name} sent twice") from err
                elif chunk.name != name:
                    raise RestoreRefused(f"{chunk.name} starts before {name} ended")
                current.write(chunk.data)
                if chunk.last:
                    current.close()
                    current = None
            raise RestoreRefused("the restore stream ended without end")
        finally:
            if current is not None:
                current.close()

    def _criu_options(self, *, tcp_close: bool, shell_job: bool, tcp_established: bool) -> list[str]:
        """criu restore's options beyond the images, pidfile and log: the user's and the dump's."""
        argv = self.config.criu_opts.argv()
        if tcp_close:
            argv.append("--tcp-close")
        if tcp_established and not self.config.criu_opts.has("tcp-established"):
            argv.append("--tcp-established")
        if shell_job:
            argv.append("--shell-job")
        return argv

    async def _run_criu(self, images: Path, *, tcp_close: bool, shell_job: bool, tcp_established: bool) -> int:
        pidfile = images / "restore.pid"
        argv = [str(self.config.criu), "restore", "-D", str(images), "-d", "--pidfile", str(pidfile),
                "-o", RESTORE_LOG, "-v4", *self._criu_options(tcp_close=tcp_close, shell_job=shell_job,
                                                              tcp_established=tcp_established)]
        # Never a pipe: restored tasks must not hold ours open.
        with open(images / CRIU_OUT, "wb") as out:  # noqa: ASYNC230 -- creating an empty local file
            await run_criu(argv, log=images / RESTORE_LOG, timeout_s=self.config.timeout_s, out=out)
        try:
            root = int(pidfile.read_text().strip())
        except (OSError, ValueError) as err:
            raise PagehaulError(f"criu restore wrote no pid to {pidfile}") from err
        await asyncio.to_thread(continue_tree, root)
        return root


def _discard(restore_dir: Path) -> None:
    """What a failed restore leaves: criu's logs only (the reason names its log's path)."""
    keep = {restore_dir / IMAGES_SUBDIR / RESTORE_LOG, restore_dir / IMAGES_SUBDIR / CRIU_OUT}
    for entry in restore_dir.iterdir():
        if entry.name == IMAGES_SUBDIR and entry.is_dir() and not entry.is_symlink():
            for inner in entry.iterdir():
                if inner not in keep:
                    _remove(inner)
            if not any(entry.iterdir()):
                entry.rmdir()
        else:
            _remove(entry)
    if not any(restore_dir.iterdir()):
        restore_dir.rmdir()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def continue_tree(root: int, timeout_s: float = 10.0) -> None:
    """SIGCONT every task of the restored tree once CRIU has put it back in the stopped state it
    was dumped in (``pagehaul migrate`` always dumps a stopped tree).

    ``criu restore -d`` can return just before a task's own last step stops it again, so a
    SIGCONT sent at once could come first and be undone: wait (bounded) until every task is
    stopped, then continue them and wait until none is.
    """
    deadline = time.monotonic() + timeout_s
    while any(_state(p) != "T" for p in _tree(root)) and time.monotonic() < deadline:
        time.sleep(0.001)  # bounded poll: the restored tasks stop themselves asynchronously
    while True:
        stopped = [p for p in _tree(root) if _state(p) == "T"]
        if not stopped:
            return
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except OSError as err:
                if err.errno != errno.ESRCH:
                    raise
        if time.monotonic() > deadline + timeout_s:
            raise PagehaulError(f"restored tasks {stopped} stay stopped after SIGCONT")
        time.sleep(0.001)  # bounded poll: the kernel wakes them asynchronously

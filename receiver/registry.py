"""The receiver's sessions, for every transport: open, resume, detach, expiry and their bounds.

Transport-free. A transport adapter (``receiver.grpc_server`` for gRPC) accepts connections,
checks the peer's credentials, decodes ``SenderMessage``s, writes replies and maps errors to its
own status codes; the life of a session is decided here, so a second transport reuses this module
and ``receiver.session`` unchanged. Its whole contract with the registry:

* ``await registry.start()`` before the first stream: leftovers of an earlier receiver are
  scheduled for collection, the disk quota counts what the images dir holds;
* per stream, ``stream = registry.connect(peer, identity)`` (``identity``: the client certificate,
  ``pagehaul.security.client_identity``, "" without TLS; only it may resume the session), then::

      try:
          send(await stream.open(first))       # open or resume: the first reply
          while (msg := receive()) is not None:
              replies = await stream.handle(msg)
              if replies is None:               # resumed on another stream: end this one quietly
                  return
              send(*replies)
          if stream.close():                    # finished, or detached for a resume
              tell the peer it was kept for resume_window_s (if it still listens)
      except Exception as err:
          if stream.fail(err):                  # False: the receiver is stopping under the stream
              refuse the stream: say why, in-band, with the adapter's code for err
      finally:
          stream.close()                        # any other way out (cancelled, closed): detach

  ``handle`` runs each message to its end even if the stream is cancelled meanwhile (a resume
  waits for it); an ``abandon`` raises :class:`SessionAbandoned`. ``close`` after ``fail`` or a
  second ``close`` does nothing, so every way a stream ends leads to exactly one of: forgotten
  (finished, or failed: open round discarded) or detached (expires after ``resume_window_s``);
* ``registry.begin_stop()`` before the transport stops (streams ending from then on are the
  shutdown's, not failures) and ``await registry.stop()`` after: open rounds are dropped, the
  sessions stay resumable from disk.

The errors a stream can raise are :class:`ResumeRefused`, :class:`SessionLimitError`,
:class:`SessionAbandoned`, ``receiver.session``'s ``QuotaExceeded``, ``LimitExceeded`` and the
``PagehaulError``s of validation; anything else is a bug.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pagehaul.errors import PagehaulError, ProtocolError
from pagehaul.v1 import migration_pb2 as pb
from pagehaul.wire import BatchFrame
from receiver.session import TOKEN_FILE, DiskQuota, FdBudget, ReceiverSession

if TYPE_CHECKING:
    # Only read here; the config module imports pagehaul.security, which carries gRPC's credentials.
    from receiver.config import ReceiverConfig

log = logging.getLogger(__name__)


class ResumeRefused(PagehaulError):
    """A resume named no session we have, or the wrong token."""


class SessionLimitError(PagehaulError):
    """Too many sessions at once."""


class SessionAbandoned(PagehaulError):
    """The sender gave up; not an error of the receiver's."""


# File descriptors kept for everything but round files: sockets, the restore RPC, criu, logs.
FD_RESERVE = 256


def fd_budget(config: ReceiverConfig) -> FdBudget:
    total = config.max_open_files
    if total is None:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return FdBudget(None)
        total = soft - len(os.listdir("/proc/self/fd")) - FD_RESERVE
    total = max(total, 0)
    return FdBudget(total, total // max(config.max_sessions, 1))


def raise_fd_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard one: round files are bounded by our own budget."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as err:
            log.warning("cannot raise the open files limit from %d to %d: %s", soft, hard, err)


class SessionRegistry:
    """Live and detached sessions of one receiver, by id, under ``config.images_dir``."""

    def __init__(self, config: ReceiverConfig) -> None:
        self.config = config
        self._sessions: dict[str, ReceiverSession] = {}
        # Detached sessions' expiry, oldest first.
        self._expiry: dict[str, asyncio.TimerHandle] = {}
        self._quota = DiskQuota(config.max_total_bytes)
        self.fds = FdBudget(None)
        self._stopping = False
        # Sessions a previous receiver left resumable on disk, collected when their window ends.
        self._leftovers: dict[str, asyncio.TimerHandle] = {}

    @property
    def detached(self) -> list[str]:
        """Ids of the sessions waiting for a resume, detached longest first."""
        return list(self._expiry)

    async def start(self) -> None:
        cfg = self.config
        cfg.images_dir.mkdir(parents=True, exist_ok=True)
        self.fds = fd_budget(cfg)
        if cfg.max_total_bytes is not None:
            self._quota.used_bytes = await asyncio.to_thread(_pages_bytes, cfg.images_dir)
        loop = asyncio.get_running_loop()
        for path, age_s in await asyncio.to_thread(_leftovers, cfg.images_dir):
            if age_s >= cfg.resume_window_s:
                self._collect(path.name)
            else:
                self._leftovers[path.name] = loop.call_later(cfg.resume_window_s - age_s, self._collect, path.name)

    def connect(self, peer: str, identity: str) -> SessionStream:
        """A new stream from ``peer`` (for logs), authenticated as ``identity``."""
        return SessionStream(self, peer, identity)

    def begin_stop(self) -> None:
        """The transport is about to stop: streams that end from now on are not failures."""
        self._stopping = True
        for handle in self._leftovers.values():
            handle.cancel()
        self._leftovers.clear()

    async def stop(self) -> None:
        """After the transport stopped: open rounds go; sessions stay resumable from disk."""
        self.begin_stop()
        for sid in list(self._sessions):
            self._cancel_expiry(sid)
            session = self._sessions.pop(sid)
            with contextlib.suppress(Exception):  # its failure is moot: the round is dropped anyway
                await session.idle()
            session.suspend()

    async def _attach(self, first: pb.SenderMessage, peer: str,
                      identity: str) -> tuple[ReceiverSession, pb.ReceiverMessage]:
        """A new session for ``open``; the detached (or, after a restart, on-disk) one for ``resume``.

        A resume must come with the session's current token, which it then replaces (a captured
        resume cannot be replayed), and over TLS from the client certificate that opened it."""
        kind = first.WhichOneof("msg")
        if kind == "resume":
            sid, token = first.resume.session_id, first.resume.resume_token
            session = self._sessions.get(sid)
            if session is not None:
                if not session.token_ok(token, identity):
                    raise ResumeRefused(f"session {sid!r} cannot be resumed with that token and certificate")
                try:
                    await session.idle()
                except Exception as err:  # the message in flight at the cut failed: nothing to resume
                    self._forget(session)
                    session.abort()
                    raise ResumeRefused(f"session {sid!r} failed while detached: {err}") from err
                self._cancel_expiry(sid)
                log.info("session resumed session=%s peer=%s handled=%d", sid, peer, session.handled)
                return session, session.resumed()
            recovered = ReceiverSession.recover(self.config.images_dir, sid, token, peer, identity=identity,
                                                limits=self.config.limits, metrics=self.config.metrics,
                                                quota=self._quota, fds=self.fds)
            if recovered is None:
                raise ResumeRefused(f"no session {sid!r} to resume")
            if (handle := self._leftovers.pop(sid, None)) is not None:
                handle.cancel()  # taken back: from now on it detaches and expires like any session
            self._sessions[sid] = recovered
            return recovered, recovered.restarted()
        if len(self._sessions) >= self.config.max_sessions and self._expiry:
            # Full, but some sessions only wait for a resume: the one detached longest gives way.
            self._expire(next(iter(self._expiry)))
        if len(self._sessions) >= self.config.max_sessions:
            raise SessionLimitError(f"the receiver already has {len(self._sessions)} sessions "
                                    f"(limit {self.config.max_sessions})")
        session = ReceiverSession(self.config.images_dir, peer, self.config.limits, self.config.metrics, self._quota,
                                  fds=self.fds, identity=identity)
        replies = await session.handle(first)
        self._sessions[session.session_id] = session
        self.config.metrics.sessions_active.set(len(self._sessions))
        return session, replies[0]

    def _collect(self, sid: str) -> None:
        """A session a previous receiver left (crashed, or stopped mid-round) whose sender did not come
        back within the resume window: drop its open round and token, and the session if it
        committed nothing, as its expiry would have."""
        self._leftovers.pop(sid, None)
        if sid in self._sessions:  # resumed meanwhile: its own detach and expiry apply
            return
        path = self.config.images_dir / sid
        freed = _open_round_bytes(path)
        for leftover in path.glob(".round-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        (path / TOKEN_FILE).unlink(missing_ok=True)
        if not any(path.glob("round-*")):
            shutil.rmtree(path, ignore_errors=True)
        self._quota.give_back(freed)
        log.warning("session collected session=%s: left by an earlier receiver and not resumed within %g s",
                    sid, self.config.resume_window_s)

    def _detach(self, session: ReceiverSession, peer: str) -> None:
        """The connection went away mid-session: keep the session for ``resume_window_s``."""
        sid = session.session_id
        log.warning("session detached session=%s peer=%s handled=%d; resumable for %g s",
                    sid, peer, session.handled, self.config.resume_window_s)
        self._cancel_expiry(sid)
        self._expiry[sid] = asyncio.get_running_loop().call_later(self.config.resume_window_s, self._expire, sid)

    def _expire(self, sid: str) -> None:
        session = self._sessions.pop(sid, None)
        self._cancel_expiry(sid)
        if session is not None:
            log.warning("session expired session=%s: not resumed in time; open round discarded", sid)
            session.abort()
            self.config.metrics.sessions.labels("expired").inc()
            self.config.metrics.sessions_active.set(len(self._sessions))

    def _cancel_expiry(self, sid: str) -> None:
        handle = self._expiry.pop(sid, None)
        if handle is not None:
            handle.cancel()

    def _forget(self, session: ReceiverSession) -> None:
        self._sessions.pop(session.session_id, None)
        self._cancel_expiry(session.session_id)
        self.config.metrics.sessions_active.set(len(self._sessions))


class SessionStream:
    """One transport stream's hold on a session (see the module docstring for its use).

    A session is driven by one stream at a time: a resume on another stream takes it over, and
    this one then neither handles its messages nor detaches or forgets it."""

    def __init__(self, registry: SessionRegistry, peer: str, identity: str) -> None:
        self._registry = registry
        self.peer = peer
        self._identity = identity
        self._session: ReceiverSession | None = None
        # This stream already forgot or detached its session.
        self._settled = False

    def _owns(self) -> bool:
        return self._session is not None and self._session.owner is self

    async def open(self, first: pb.SenderMessage | BatchFrame) -> pb.ReceiverMessage:
        """Open a session (``open``) or take one back (``resume``); the reply to send first."""
        if isinstance(first, BatchFrame):
            first = first.message()  # not an open: refused as any such first message
        session, reply = await self._registry._attach(first, self.peer, self._identity)
        session.owner = self
        self._session = session
        return reply

    async def handle(self, msg: pb.SenderMessage | BatchFrame) -> list[pb.ReceiverMessage] | None:
        """The replies to one message after :meth:`open`; None once the session was resumed on
        another stream."""
        session = self._session
        if session is None:
            raise ProtocolError("a message before the session was opened")
        if session.owner is not self:
            return None
        if not isinstance(msg, BatchFrame) and msg.WhichOneof("msg") == "abandon":
            raise SessionAbandoned(f"sender abandoned the session: {msg.abandon.reason}")
        # Shielded: a connection lost mid-write must not leave the session half-updated (data
        # appended, sequence not advanced); the next stream waits for it to finish.
        return await session.run(msg)

    def fail(self, err: BaseException) -> bool:
        """The stream failed with ``err``: its session's open round is discarded and the session
        forgotten. False if the receiver is stopping under the stream: not the session's failure,
        and ``stop`` leaves it resumable from disk as for a lost connection."""
        registry, session = self._registry, self._session
        if registry._stopping and session is not None:
            log.info("stream ended by shutdown peer=%s session=%s: %s", self.peer, session.session_id, err)
            return False
        if session is not None and self._owns():
            registry._forget(session)
            session.abort()
        self._settled = True
        registry.config.metrics.sessions.labels("refused").inc()
        return True

    def close(self) -> bool:
        """The stream ended without an error: a finished session is forgotten, any other is
        detached for ``resume_window_s``. True if the session was kept for a resume (tell the peer
        if it still listens)."""
        registry, session = self._registry, self._session
        if self._settled or session is None or not self._owns():
            return False
        self._settled = True
        if registry._stopping:  # stop() drops the open round, the session stays resumable from disk
            return not session.finished
        if session.finished:
            registry._forget(session)
            registry.config.metrics.sessions.labels("complete").inc()
            return False
        registry._detach(session, self.peer)
        return True


def _pages_bytes(images_dir: Path) -> int:
    """Bytes of page files under ``images_dir``, committed or in rounds left open by an earlier
    receiver (what counts against the quota until they are collected)."""
    return sum(p.stat().st_size for pattern in ("*/round-*/pages-*.img", "*/.round-*/pages-*.img")
               for p in images_dir.glob(pattern))


def _open_round_bytes(session_dir: Path) -> int:
    return sum(p.stat().st_size for p in session_dir.glob(".round-*/pages-*.img"))


def _leftovers(images_dir: Path) -> list[tuple[Path, float]]:
    """Sessions an earlier receiver left resumable (a token or an open round on disk), with the
    seconds since anything in them was last written."""
    now = time.time()
    found = []
    for path in images_dir.iterdir():
        if path.name.startswith(".") or not path.is_dir() or path.is_symlink():
            continue
        marks = [path / TOKEN_FILE, *path.glob(".round-*")]
        present = [m for m in marks if m.exists()]
        if not present:
            continue
        touched = [m for p in present for m in (p, *(p.iterdir() if p.is_dir() else ()))]
        newest = max([(path / "session.json").stat().st_mtime if (path / "session.json").exists() else 0.0,
                      *(m.lstat().st_mtime for m in touched)])
        found.append((path, max(0.0, now - newest)))
    return found

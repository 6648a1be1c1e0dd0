"""The receiver's gRPC server (grpc.aio): one :class:`ReceiverSession` per stream.

Expected errors become status codes through one table (:data:`STATUS_BY_ERROR`); anything
else is a bug, logged with its traceback and answered with INTERNAL. Either way the session's
open round is discarded and the server keeps serving other sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import shutil
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from pagehaul.errors import ImageError, IntegrityError, PagehaulError, ProtocolError
from pagehaul.metrics import ReceiverMetrics
from pagehaul.security import Security, client_identity
from pagehaul.v1 import migration_pb2 as pb
from pagehaul.v1 import restore_pb2 as rpb
from pagehaul.wire import CHANNEL_OPTIONS, METHOD, RESTORE_METHOD, RESTORE_SERVICE, SERVICE
from receiver.restore import (
    NoSuchSession,
    NotRestorable,
    RestoreConfig,
    RestoreIdle,
    Restorer,
    RestoreRefused,
    RestoreTooLarge,
)
from receiver.session import (
    TOKEN_FILE,
    DiskQuota,
    FdBudget,
    LimitExceeded,
    QuotaExceeded,
    ReceiverSession,
    SessionLimits,
)

log = logging.getLogger(__name__)

class ResumeRefused(PagehaulError):
    """A resume named no session we have, or the wrong token."""


class SessionLimitError(PagehaulError):
    """Too many sessions at once."""


class SessionAbandoned(PagehaulError):
    """The sender gave up; not an error of the receiver's."""


STATUS_BY_ERROR: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (DecodeError, grpc.StatusCode.INVALID_ARGUMENT),  # bytes that are no SenderMessage at all
    (ResumeRefused, grpc.StatusCode.NOT_FOUND),
    (SessionAbandoned, grpc.StatusCode.ABORTED),
    (SessionLimitError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (QuotaExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (IntegrityError, grpc.StatusCode.DATA_LOSS),
    (ProtocolError, grpc.StatusCode.INVALID_ARGUMENT),
    (ImageError, grpc.StatusCode.INVALID_ARGUMENT),
    (PagehaulError, grpc.StatusCode.FAILED_PRECONDITION),
]


# The Restore RPC's refusals; any other PagehaulError of a restore is ABORTED.
RESTORE_STATUS_BY_ERROR: list[tuple[type[RestoreRefused], grpc.StatusCode]] = [
    (NoSuchSession, grpc.StatusCode.NOT_FOUND),
    (NotRestorable, grpc.StatusCode.FAILED_PRECONDITION),
    (RestoreTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (RestoreIdle, grpc.StatusCode.DEADLINE_EXCEEDED),
    (RestoreRefused, grpc.StatusCode.INVALID_ARGUMENT),
]


class _Undecodable:
    """Stands for bytes that are no SenderMessage: the deserializer must not raise, or the stream
    ends there and a refusal's drain stops with the sender still writing."""


def _decode(data: bytes) -> pb.SenderMessage | _Undecodable:
    try:
        return pb.SenderMessage.FromString(data)
    except DecodeError:
        return _Undecodable()


Incoming = pb.SenderMessage | _Undecodable


def status_for(err: BaseException) -> grpc.StatusCode:
    cause: BaseException | None = err
    while cause is not None:  # a full disk or fd table may be wrapped (ImageError from OSError)
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT, errno.EMFILE, errno.ENFILE):
            return grpc.StatusCode.RESOURCE_EXHAUSTED
        cause = cause.__cause__
    for kind, code in STATUS_BY_ERROR:
        if isinstance(err, kind):
            return code
    return grpc.StatusCode.INTERNAL


# How long a refused sender gets to stop writing before the call is ended under it.
DRAIN_S = 2.0


async def refuse(
    requests: AsyncIterator[pb.SenderMessage] | AsyncIterator[Incoming],
    context: grpc.aio.ServicerContext[pb.SenderMessage, pb.ReceiverMessage],
    code: grpc.StatusCode,
    reason: str,
) -> AsyncIterator[pb.ReceiverMessage]:
    """End a session with ``code``: say why in-band, give the sender ``DRAIN_S`` to stop
    writing, then end the call, so the status is not lost to a write racing the end of the
    stream (see SessionError in the protocol)."""
    yield pb.ReceiverMessage(error=pb.SessionError(code=code.value[0], reason=reason))
    try:
        async with asyncio.timeout(DRAIN_S):
            async for _ in requests:
                pass
    except Exception:  # noqa: S110 -- the drain only discards: undecodable or broken input ends it too
        pass
    await context.abort(code, reason)


@dataclass(frozen=True, slots=True)
class ReceiverConfig:
    images_dir: Path
    listen: str = "127.0.0.1:0"
    limits: SessionLimits = field(default_factory=SessionLimits)
    grace_s: float = 10.0
    # The CLI makes users choose; the Python API defaults to plain TCP for in-process use.
    security: Security = field(default_factory=lambda: Security(insecure=True))
    # Sessions (live or waiting to be resumed) at once.
    max_sessions: int = 16
    # How long a session whose connection broke waits to be resumed before its open round goes.
    resume_window_s: float = 60.0
    metrics: ReceiverMetrics = field(default_factory=ReceiverMetrics)
    # A stream that delivers nothing for this long is treated as a lost connection.
    idle_timeout_s: float = 60.0
    # Page bytes all sessions together may write, counting what the images dir held at start.
    max_total_bytes: int | None = None
    # Also serve the Restore RPC (full migration: criu restore of a committed session).
    restore: RestoreConfig | None = None
    # Files the open rounds of all sessions may hold (None: RLIMIT_NOFILE less what is open at
    # start and FD_RESERVE); each session gets at most an equal share of max_sessions.
    max_open_files: int | None = None


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


class Receiver:
    """Owns the grpc.aio server. ``await start()`` binds and returns the port."""

    def __init__(self, config: ReceiverConfig) -> None:
        self.config = config
        self._server: grpc.aio.Server | None = None
        self.port = 0
        # Live and detached sessions by id; detached ones expire after resume_window_s.
        self._sessions: dict[str, ReceiverSession] = {}
        self._expiry: dict[str, asyncio.TimerHandle] = {}
        self._quota = DiskQuota(config.max_total_bytes)
        self._fds = FdBudget(None)
        self._stopping = False
        # Sessions a previous receiver left resumable on disk, collected when their window ends.
        self._leftovers: dict[str, asyncio.TimerHandle] = {}
        self._restorer = Restorer(config.images_dir, config.restore) if config.restore is not None else None

    async def start(self) -> int:
        cfg = self.config
        cfg.images_dir.mkdir(parents=True, exist_ok=True)
        self._fds = fd_budget(cfg)
        if cfg.max_total_bytes is not None:
            self._quota.used_bytes = await asyncio.to_thread(_pages_bytes, cfg.images_dir)
        loop = asyncio.get_running_loop()
        for path, age_s in await asyncio.to_thread(_leftovers, cfg.images_dir):
            if age_s >= cfg.resume_window_s:
                self._collect(path.name)
            else:
                self._leftovers[path.name] = loop.call_later(cfg.resume_window_s - age_s, self._collect, path.name)
        server = grpc.aio.server(options=CHANNEL_OPTIONS)
        handler = grpc.stream_stream_rpc_method_handler(
            self._migrate,
            request_deserializer=_decode,
            response_serializer=pb.ReceiverMessage.SerializeToString,
        )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler}),))
        if self._restorer is not None:
            if cfg.security.tls is None:
                log.warning("INSECURE: --restore without TLS: anyone who reaches this port can have processes "
                            "restored here as root")
            server.add_generic_rpc_handlers((self._restore_handler(),))
        try:
            if cfg.security.tls is not None:
                self.port = server.add_secure_port(cfg.listen, cfg.security.tls.server_credentials())
            else:
                self.port = server.add_insecure_port(cfg.listen)
        except RuntimeError as err:
            raise PagehaulError(f"cannot listen on {cfg.listen}: {err}") from err
        await server.start()
        self._server = server
        log.info("receiver listening address=%s images_dir=%s tls=%s token=%s round_fds=%s per_session=%s",
                 self.address, cfg.images_dir, cfg.security.tls is not None, cfg.security.token is not None,
                 self._fds.limit, self._fds.per_session)
        return self.port

    @property
    def address(self) -> str:
        host = self.config.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def stop(self, grace_s: float | None = None) -> None:
        self._stopping = True
        for handle in self._leftovers.values():
            handle.cancel()
        self._leftovers.clear()
        if self._server is not None:
            await self._server.stop(self.config.grace_s if grace_s is None else grace_s)
        for sid in list(self._sessions):  # open rounds go; sessions stay resumable from disk
            self._cancel_expiry(sid)
            session = self._sessions.pop(sid)
            with contextlib.suppress(Exception):  # its failure is moot: the round is dropped anyway
                await session.idle()
            session.suspend()

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def _migrate(
        self,
        requests: AsyncIterator[pb.SenderMessage | _Undecodable],
        context: grpc.aio.ServicerContext[pb.SenderMessage, pb.ReceiverMessage],
    ) -> AsyncIterator[pb.ReceiverMessage]:
        peer = context.peer()
        auth = context.auth_context()
        refusal = ("missing or wrong token" if not self.config.security.token_ok(context.invocation_metadata())
                   else self.config.security.peer_refusal(auth))
        if refusal is not None:
            # In-band and drained like any refusal: a bare abort races the sender's writes, which
            # then fail with INTERNAL (taken for a lost connection) instead of this status.
            log.warning("session refused peer=%s code=UNAUTHENTICATED reason=%s", peer, refusal)
            async for out in refuse(requests, context, grpc.StatusCode.UNAUTHENTICATED, refusal):
                yield out
            return
        identity = client_identity(auth)
        session: ReceiverSession | None = None
        owner = object()  # this stream; a session resumed elsewhere no longer listens to it
        settled = False  # this stream already forgot or detached its session
        ended_early = False
        it = aiter(requests)
        try:
            first = await self._next(it)
            if first is None:
                return
            session, reply = await self._attach(first, peer, identity)
            session.owner = owner
            yield reply
            while (msg := await self._next(it)) is not None:
                if isinstance(msg, _Undecodable):
                    raise ProtocolError("a message that is not a SenderMessage")  # noqa: TRY301 -- refused like any bad input
                if session.owner is not owner:
                    return  # a stale connection: the session was resumed on another one
                if msg.WhichOneof("msg") == "abandon":
                    raise SessionAbandoned(f"sender abandoned the session: {msg.abandon.reason}")  # noqa: TRY301 -- abort like any failure
                # Shielded: a connection lost mid-write must not leave the session half-updated
                # (data appended, sequence not advanced); the next stream waits for it to finish.
                for out in await session.run(msg):
                    yield out
            # grpc.aio ends the request stream without an error when the connection dies, and an
            # idle stream ends the same way: the finally keeps the session for a resume; only an
            # explicit abandon gives it up.
            ended_early = not session.finished and session.owner is owner
        except grpc.aio.AbortError:
            raise
        except Exception as err:  # every failure must discard the open round
            if self._stopping and session is not None:
                # The server is shutting down under this stream (grpc raises _ServerStoppedError
                # and the like): not the session's failure. stop() drops its open round and leaves
                # it resumable from disk, as for a lost connection.
                log.info("stream ended by shutdown peer=%s session=%s: %s", peer, session.session_id, err)
                return
            if session is not None and session.owner is owner:
                self._forget(session)
                session.abort()
            settled = True
            code = status_for(err)
            self.config.metrics.errors.labels(code.name).inc()
            self.config.metrics.sessions.labels("refused").inc()
            if code == grpc.StatusCode.INTERNAL:
                log.exception("session failed peer=%s", peer)
            else:
                log.warning("session refused peer=%s code=%s reason=%s", peer, code.name, err)
            async for out in refuse(requests, context, code, str(err)):
                yield out
        finally:
            # Every other way out lands here too: the end of the request stream, cancellation, and
            # grpc closing this generator while it waits at a yield (GeneratorExit, which no
            # except clause above sees). A session this stream still owns is finished or detached.
            if not settled and session is not None and session.owner is owner and not self._stopping:
                if session.finished:
                    self._forget(session)
                    self.config.metrics.sessions.labels("complete").inc()
                else:
                    self._detach(session, peer)
        if ended_early:  # tell a peer that is still there; a dead connection cannot hear it
            try:
                await context.abort(grpc.StatusCode.ABORTED, "stream ended before the final round; "
                                    f"session kept for resume for {self.config.resume_window_s:g} s")
            except grpc.aio.AbortError:
                raise
            except Exception as err:
                log.debug("could not send ABORTED to peer=%s: %s", peer, err)

    def _restore_handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        method = grpc.stream_unary_rpc_method_handler(
            self._restore, request_deserializer=rpb.RestoreRequest.FromString,
            response_serializer=rpb.RestoreReply.SerializeToString)
        return grpc.method_handlers_generic_handler(RESTORE_SERVICE, {RESTORE_METHOD: method})

    async def _restore(self, requests: AsyncIterator[rpb.RestoreRequest],
                       context: grpc.aio.ServicerContext[rpb.RestoreRequest, rpb.RestoreReply]) -> rpb.RestoreReply:
        assert self._restorer is not None  # the handler is added only with a restorer
        security = self.config.security
        peer = context.peer()
        if not security.token_ok(context.invocation_metadata()):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")
        if (refusal := security.peer_refusal(context.auth_context())) is not None:
            log.warning("restore refused peer=%s code=UNAUTHENTICATED reason=%s", peer, refusal)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, refusal)
        try:
            return await self._restorer.restore(requests, peer)
        except RestoreRefused as err:
            code = next(code for kind, code in RESTORE_STATUS_BY_ERROR if isinstance(err, kind))
            log.warning("restore refused peer=%s code=%s reason=%s", peer, code.name, err)
            await context.abort(code, str(err))
        except PagehaulError as err:
            log.warning("restore failed peer=%s reason=%s", peer, err)
            await context.abort(grpc.StatusCode.ABORTED, str(err))
        raise AssertionError("unreachable")  # context.abort raises

    async def _next(self, it: AsyncIterator[Incoming]) -> Incoming | None:
        """The next message, or None at the end of the stream or after ``idle_timeout_s`` of
        silence (a peer behind a dead link that keepalive did not catch)."""
        try:
            return await asyncio.wait_for(anext(it), self.config.idle_timeout_s)
        except (StopAsyncIteration, TimeoutError):
            return None

    async def _attach(self, first: Incoming, peer: str, identity: str) -> tuple[ReceiverSession, pb.ReceiverMessage]:
        """A new session for ``open``; the detached (or, after a restart, on-disk) one for ``resume``.

        A resume must come with the session's current token, which it then replaces (a captured
        resume cannot be replayed), and over TLS from the client certificate that opened it."""
        if isinstance(first, _Undecodable):
            raise ProtocolError("a message that is not a SenderMessage")
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
                                                quota=self._quota, fds=self._fds)
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
                                  fds=self._fds, identity=identity)
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


async def serve(config: ReceiverConfig, ready: asyncio.Future[str] | None = None) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully (in-flight sessions get ``grace_s``)."""
    raise_fd_limit()
    receiver = Receiver(config)
    await receiver.start()
    if ready is not None:
        ready.set_result(receiver.address)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        print(f"pagehaul receiver listening on {receiver.address}", flush=True)
        await stop.wait()
        log.info("receiver stopping grace_s=%s", config.grace_s)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await receiver.stop()

"""The receiver's gRPC transport (grpc.aio): the Migrate stream and the Restore RPC.

One adapter per service over the transport-free modules: a Migrate stream is checked against
the token and the client certificate, its bytes decoded into ``SenderMessage``s and fed to a
``receiver.registry.SessionStream`` (which drives one ``ReceiverSession``), its replies written
back; a Restore call feeds its requests to ``receiver.restore.Restorer``. What ends a session,
detaches or resumes it is the registry's; what this module adds is gRPC's: decoding, the idle
timeout on reads, refusals said in-band and drained (:func:`refuse`), and the status codes.

Expected errors become status codes through one table per service (:data:`STATUS_BY_ERROR`,
:data:`RESTORE_STATUS_BY_ERROR`); anything else is a bug, logged with its traceback and answered
with INTERNAL. Either way the session's open round is discarded and the server keeps serving
other sessions.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from pagehaul.errors import ImageError, IntegrityError, PagehaulError, ProtocolError
from pagehaul.security import client_identity
from pagehaul.v1 import migration_pb2 as pb
from pagehaul.v1 import restore_pb2 as rpb
from pagehaul.wire import CHANNEL_OPTIONS, METHOD, RESTORE_METHOD, RESTORE_SERVICE, SERVICE, BatchFrame, decode_sender
from receiver.config import ReceiverConfig
from receiver.registry import (
    ResumeRefused,
    SessionAbandoned,
    SessionLimitError,
    SessionRegistry,
    raise_fd_limit,
)
from receiver.restore import (
    AddressRefused,
    NoSuchSession,
    NotRestorable,
    RestoreIdle,
    Restorer,
    RestoreRefused,
    RestoreTooLarge,
)
from receiver.session import LimitExceeded, QuotaExceeded

log = logging.getLogger(__name__)

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
    (AddressRefused, grpc.StatusCode.FAILED_PRECONDITION),
    (RestoreTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (RestoreIdle, grpc.StatusCode.DEADLINE_EXCEEDED),
    (RestoreRefused, grpc.StatusCode.INVALID_ARGUMENT),
]


class _Undecodable:
    """Stands for bytes that are no SenderMessage: the deserializer must not raise, or the stream
    ends there and a refusal's drain stops with the sender still writing."""


def _decode(data: bytes) -> pb.SenderMessage | BatchFrame | _Undecodable:
    try:
        return decode_sender(data)  # a batch's payload stays a view into data
    except DecodeError:
        return _Undecodable()


Incoming = pb.SenderMessage | BatchFrame | _Undecodable


def _message(incoming: Incoming) -> pb.SenderMessage | BatchFrame:
    if isinstance(incoming, _Undecodable):
        raise ProtocolError("a message that is not a SenderMessage")
    return incoming


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


class Receiver:
    """Owns the grpc.aio server over one :class:`SessionRegistry` (and a :class:`Restorer` with
    ``config.restore``). ``await start()`` binds and returns the port."""

    def __init__(self, config: ReceiverConfig) -> None:
        self.config = config
        self.sessions = SessionRegistry(config)
        self._restorer = Restorer(config.images_dir, config.restore) if config.restore is not None else None
        self._server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> int:
        cfg = self.config
        await self.sessions.start()
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
                 self.sessions.fds.limit, self.sessions.fds.per_session)
        return self.port

    @property
    def address(self) -> str:
        host = self.config.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def stop(self, grace_s: float | None = None) -> None:
        self.sessions.begin_stop()
        if self._server is not None:
            await self._server.stop(self.config.grace_s if grace_s is None else grace_s)
        await self.sessions.stop()

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def _migrate(
        self,
        requests: AsyncIterator[Incoming],
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
        stream = self.sessions.connect(peer, client_identity(auth))
        kept = False
        it = aiter(requests)
        try:
            first = await self._next(it)
            if first is None:
                return
            yield await stream.open(_message(first))
            while (msg := await self._next(it)) is not None:
                replies = await stream.handle(_message(msg))
                if replies is None:
                    return  # a stale connection: the session was resumed on another one
                for out in replies:
                    yield out
            # grpc.aio ends the request stream without an error when the connection dies, and an
            # idle stream ends the same way: the session is kept for a resume; only an explicit
            # abandon gives it up.
            kept = stream.close()
        except grpc.aio.AbortError:
            raise
        except Exception as err:  # every failure must discard the open round
            # The server shutting down under this stream (grpc raises _ServerStoppedError and
            # the like) is not the session's failure.
            if not stream.fail(err):
                return
            code = status_for(err)
            self.config.metrics.errors.labels(code.name).inc()
            if code == grpc.StatusCode.INTERNAL:
                log.exception("session failed peer=%s", peer)
            else:
                log.warning("session refused peer=%s code=%s reason=%s", peer, code.name, err)
            async for out in refuse(requests, context, code, str(err)):
                yield out
        finally:
            # Every other way out lands here too: cancellation, and grpc closing this generator
            # while it waits at a yield (GeneratorExit, which no except clause above sees).
            stream.close()
        if kept:  # tell a peer that is still there; a dead connection cannot hear it
            try:
                await context.abort(grpc.StatusCode.ABORTED, "stream ended before the final round; "
                                    f"session kept for resume for {self.config.resume_window_s:g} s")
            except grpc.aio.AbortError:
                raise
            except Exception as err:
                log.debug("could not send ABORTED to peer=%s: %s", peer, err)

    async def _next(self, it: AsyncIterator[Incoming]) -> Incoming | None:
        """The next message, or None at the end of the stream or after ``idle_timeout_s`` of
        silence (a peer behind a dead link that keepalive did not catch)."""
        try:
            return await asyncio.wait_for(anext(it), self.config.idle_timeout_s)
        except (StopAsyncIteration, TimeoutError):
            return None

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

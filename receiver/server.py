"""The receiver's gRPC server (grpc.aio): one :class:`ReceiverSession` per stream.

Expected errors become status codes through one table (:data:`STATUS_BY_ERROR`); anything
else is a bug, logged with its traceback and answered with INTERNAL. Either way the session's
open round is discarded and the server keeps serving other sessions.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from pagehaul.errors import ImageError, IntegrityError, PagehaulError, ProtocolError
from pagehaul.security import Security
from pagehaul.v1 import migration_pb2 as pb
from pagehaul.wire import CHANNEL_OPTIONS, METHOD, SERVICE
from receiver.session import ReceiverSession, SessionLimits

log = logging.getLogger(__name__)

STATUS_BY_ERROR: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (IntegrityError, grpc.StatusCode.DATA_LOSS),
    (ProtocolError, grpc.StatusCode.INVALID_ARGUMENT),
    (ImageError, grpc.StatusCode.INVALID_ARGUMENT),
    (PagehaulError, grpc.StatusCode.FAILED_PRECONDITION),
]


def status_for(err: BaseException) -> grpc.StatusCode:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    for kind, code in STATUS_BY_ERROR:
        if isinstance(err, kind):
            return code
    return grpc.StatusCode.INTERNAL


# How long a refused sender gets to stop writing before the call is ended under it.
DRAIN_S = 2.0


async def refuse(
    requests: AsyncIterator[pb.SenderMessage],
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
    except (TimeoutError, grpc.RpcError):
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


class Receiver:
    """Owns the grpc.aio server. ``await start()`` binds and returns the port."""

    def __init__(self, config: ReceiverConfig) -> None:
        self.config = config
        self._server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> int:
        cfg = self.config
        cfg.images_dir.mkdir(parents=True, exist_ok=True)
        server = grpc.aio.server(options=CHANNEL_OPTIONS)
        handler = grpc.stream_stream_rpc_method_handler(
            self._migrate,
            request_deserializer=pb.SenderMessage.FromString,
            response_serializer=pb.ReceiverMessage.SerializeToString,
        )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler}),))
        try:
            if cfg.security.tls is not None:
                self.port = server.add_secure_port(cfg.listen, cfg.security.tls.server_credentials())
            else:
                self.port = server.add_insecure_port(cfg.listen)
        except RuntimeError as err:
            raise PagehaulError(f"cannot listen on {cfg.listen}: {err}") from err
        await server.start()
        self._server = server
        log.info("receiver listening address=%s images_dir=%s tls=%s token=%s", self.address, cfg.images_dir,
                 cfg.security.tls is not None, cfg.security.token is not None)
        return self.port

    @property
    def address(self) -> str:
        host = self.config.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def stop(self, grace_s: float | None = None) -> None:
        if self._server is not None:
            await self._server.stop(self.config.grace_s if grace_s is None else grace_s)

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def _migrate(
        self,
        requests: AsyncIterator[pb.SenderMessage],
        context: grpc.aio.ServicerContext[pb.SenderMessage, pb.ReceiverMessage],
    ) -> AsyncIterator[pb.ReceiverMessage]:
        if not self.config.security.token_ok(context.invocation_metadata()):
            log.warning("session refused peer=%s code=UNAUTHENTICATED reason=missing or wrong token", context.peer())
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")
        session = ReceiverSession(self.config.images_dir, context.peer(), self.config.limits)
        try:
            async for msg in requests:
                for reply in await session.handle(msg):
                    yield reply
            if not session.finished:
                raise ProtocolError("stream ended before the final round was committed")  # noqa: TRY301 -- same cleanup as any failure
        except asyncio.CancelledError:
            log.warning("session cancelled peer=%s dir=%s", context.peer(), session.directory)
            session.abort()
            raise
        except Exception as err:  # every failure must discard the open round
            session.abort()
            code = status_for(err)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("session failed peer=%s", context.peer())
            else:
                log.warning("session refused peer=%s code=%s reason=%s", context.peer(), code.name, err)
            async for reply in refuse(requests, context, code, str(err)):
                yield reply


async def serve(config: ReceiverConfig, ready: asyncio.Future[str] | None = None) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully (in-flight sessions get ``grace_s``)."""
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

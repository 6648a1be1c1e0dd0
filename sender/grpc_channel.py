"""The sender's channels over gRPC (grpc.aio): connecting (TLS or plain TCP), the session's
bidirectional stream call, the Restore call, and what a gRPC status means for the sender.

Implements ``pagehaul.transport.SessionChannel`` and ``RestoreChannel``; nothing else in the
sender imports grpc.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc

from pagehaul.errors import AccessDenied, PagehaulError, ProtocolError, RestoreUnknown, TransportError
from pagehaul.security import Security
from pagehaul.transport import ChannelBroken, LinkLost, RestoreChannel, SessionChannel, SessionConnector
from pagehaul.v1 import migration_pb2 as pb
from pagehaul.v1 import restore_pb2 as rpb
from pagehaul.wire import CHANNEL_OPTIONS, METHOD_PATH, RESTORE_METHOD_PATH, Outgoing, encode_sender

# Status codes that mean "the connection, not the data": worth a resume.
TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL,
                       grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED})
# Codes a receiver answers a Restore call with when it decided the restore failed (nothing of the
# tree runs there: receiver/grpc_server.py's tables); any other code after the last request, such
# as a lost connection or the caller's deadline, leaves the outcome unknown.
RESTORE_DECIDED = frozenset({grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
                             grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT,
                             grpc.StatusCode.ABORTED, grpc.StatusCode.UNAUTHENTICATED,
                             grpc.StatusCode.PERMISSION_DENIED})
# What breaks a call on the client side: the call failed, or it has already ended.
_BROKEN = (grpc.aio.AioRpcError, asyncio.InvalidStateError)


def status_code(value: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN


def status_error(code: grpc.StatusCode, details: str, target: str) -> PagehaulError:
    """The sender's error for a receiver's status (the call's, or an in-band SessionError's)."""
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DATA_LOSS):
        return ProtocolError(f"receiver refused the data: {details}")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return AccessDenied(0, f"receiver refused the sender: {details}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return TransportError(f"receiver out of resources: {details}")
    if code == grpc.StatusCode.NOT_FOUND:
        return TransportError(f"receiver cannot resume the session: {details}")
    return TransportError(f"receiver at {target} failed ({code.name}): {details}")


@asynccontextmanager
async def connect(target: str, timeout_s: float, security: Security) -> AsyncIterator[grpc.aio.Channel]:
    """A gRPC channel to the receiver at ``target``, ready, or TransportError within ``timeout_s``."""
    if security.tls is not None:
        channel = grpc.aio.secure_channel(target, security.tls.channel_credentials(), options=CHANNEL_OPTIONS)
    else:
        channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
    try:
        try:
            await asyncio.wait_for(channel.channel_ready(), timeout_s)
        except TimeoutError as err:
            how = "with TLS (is the receiver using TLS, and does its certificate match the CA?)" if security.tls \
                else "over plain TCP"
            raise TransportError(f"cannot reach receiver at {target} within {timeout_s:g} s {how}") from err
        yield channel
    finally:
        await channel.close(None)


class GrpcSessionChannel:
    """The session's stream call (``pagehaul.v1.Migration/Migrate``) on one gRPC channel."""

    def __init__(self, call: grpc.aio.StreamStreamCall[Outgoing, pb.ReceiverMessage], target: str) -> None:
        self._call = call
        self._target = target

    @property
    def done(self) -> bool:
        return self._call.done()

    async def write(self, msg: Outgoing) -> None:
        try:
            await self._call.write(msg)
        except _BROKEN as err:
            raise ChannelBroken(str(err)) from err

    async def read(self) -> pb.ReceiverMessage | None:
        # read() only: grpc.aio refuses to mix it with `async for` on one call.
        try:
            reply = await self._call.read()
        except _BROKEN as err:
            raise ChannelBroken(str(err)) from err
        return reply if isinstance(reply, pb.ReceiverMessage) else None  # else grpc.aio.EOF

    async def done_writing(self) -> None:
        try:
            await self._call.done_writing()
        except _BROKEN as err:
            raise ChannelBroken(str(err)) from err

    async def ended(self) -> PagehaulError | None:
        code = await self._call.code()
        if code == grpc.StatusCode.OK:
            return None
        err = status_error(code, await self._call.details() or "", self._target)
        return LinkLost(err) if code in TRANSIENT else err

    def refusal(self, error: pb.SessionError) -> PagehaulError:
        return status_error(status_code(error.code), error.reason, self._target)

    def cancel(self) -> None:
        self._call.cancel()


def session_connector(target: str, timeout_s: float, security: Security) -> SessionConnector:
    """Connects anew for the session's open and for each resume."""

    @asynccontextmanager
    async def session() -> AsyncIterator[SessionChannel]:
        async with connect(target, timeout_s, security) as channel:
            call = channel.stream_stream(
                METHOD_PATH, request_serializer=encode_sender,
                response_deserializer=pb.ReceiverMessage.FromString,
            )(metadata=security.token_metadata())  # type: ignore[call-arg]  # grpc-stubs 1.53 predates aio's writer-style call
            yield GrpcSessionChannel(call, target)

    return session


class GrpcRestoreChannel:
    """The Restore call (``pagehaul.v1.Restore/Restore``) on one gRPC channel."""

    def __init__(self, channel: grpc.aio.Channel, target: str, security: Security) -> None:
        self._channel = channel
        self._target = target
        self._security = security

    async def restore(self, requests: AsyncIterator[rpb.RestoreRequest], timeout_s: float) -> rpb.RestoreReply:
        call = self._channel.stream_unary(RESTORE_METHOD_PATH, request_serializer=rpb.RestoreRequest.SerializeToString,
                                          response_deserializer=rpb.RestoreReply.FromString)
        sent_all = False

        async def counted() -> AsyncIterator[rpb.RestoreRequest]:
            nonlocal sent_all
            async for request in requests:
                yield request
            sent_all = True

        try:
            reply: rpb.RestoreReply = await call(counted(), metadata=self._security.token_metadata(),
                                                 timeout=timeout_s)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise TransportError(f"the receiver at {self._target} does not restore processes "
                                     "(start it with --restore)") from err
            what = f"restore on {self._target} failed ({err.code().name}): {err.details()}"
            if sent_all and err.code() not in RESTORE_DECIDED:
                raise RestoreUnknown(f"{what}, after every image was sent: the destination may be running the "
                                     "tree") from err
            raise TransportError(what) from err
        return reply


@asynccontextmanager
async def restore_channel(target: str, timeout_s: float, security: Security) -> AsyncIterator[RestoreChannel]:
    """A connection to the receiver at ``target`` for the Restore call."""
    async with connect(target, timeout_s, security) as channel:
        yield GrpcRestoreChannel(channel, target, security)

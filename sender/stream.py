"""The sender's side of the session stream: ordered writes, replies read in the background, and
survival of a lost connection.

Every message after ``open`` is numbered (1, 2, ...) and kept in a replay buffer until the
receiver's ``Ack.handled`` covers it; the buffer is bounded (``window_bytes``), so a receiver
that stops acknowledging slows the sender down instead of growing its memory. When the call
fails for a transport reason (connection reset, receiver restart, link down), the stream
reconnects with exponential backoff and sends ``resume``:

* the receiver still has the session (a network cut): it answers how many messages it handled,
  and the stream replays the rest of the buffer; the caller never notices;
* the receiver restarted and took the session back from disk at its last committed round: the
  stream raises :class:`RoundRestart`, and the caller sends that round again;
* no answer within ``resume_deadline_s``: :class:`~pagehaul.errors.TransportError`.

Refusals (the receiver's in-band ``SessionError``, or a non-transport status) are never retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

import grpc

from pagehaul.errors import AccessDenied, PagehaulError, ProtocolError, TransportError
from pagehaul.v1 import migration_pb2 as pb
from pagehaul.wire import METHOD_PATH

log = logging.getLogger(__name__)

# How long to wait for the receiver's in-band reason once the call has failed.
REFUSAL_WAIT_S = 5.0
# Status codes that mean "the connection, not the data": worth a resume.
TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL,
                       grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED})

ChannelFactory = Callable[[], AbstractAsyncContextManager[grpc.aio.Channel]]


@dataclass(frozen=True, slots=True)
class RoundRestart(Exception):
    """The receiver restarted and lost the open round: send round ``next_round`` again."""

    next_round: int
    last_seq: int
    handled: int


def status_code(value: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN


class SessionStream:
    def __init__(self, connect: ChannelFactory, target: str, metadata: tuple[tuple[str, str], ...] = (),
                 resume_deadline_s: float = 30.0, window_bytes: int = 32 << 20) -> None:
        self._connect = connect
        self._target = target
        self._metadata = metadata
        self._resume_deadline_s = resume_deadline_s
        self._window_bytes = window_bytes
        self._stack = contextlib.AsyncExitStack()
        self._call: grpc.aio.StreamStreamCall[pb.SenderMessage, pb.ReceiverMessage] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._buffer: deque[tuple[int, pb.SenderMessage, int]] = deque()
        self._buffer_bytes = 0
        self._index = 0
        self._acked = 0
        self._progress = asyncio.Event()
        self.committed: asyncio.Queue[pb.RoundCommitted] = asyncio.Queue()
        self.session_id = ""
        self._token = ""
        self.resumes = 0
        # Set when the receiver explains in-band why it is ending the session.
        self.refused: PagehaulError | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    async def open(self, msg: pb.SessionOpen) -> pb.SessionAccepted:
        accepted = await self._start(pb.SenderMessage(open=msg))
        self.session_id, self._token = accepted.session_id, accepted.resume_token
        return accepted

    async def close(self) -> None:
        self.cancel()
        await self._stack.aclose()

    async def abandon(self, reason: str, timeout_s: float = 2.0) -> None:
        """Tell the receiver we give up, so it drops the open round now; best effort."""
        call = self._call
        if call is None or call.done() or self.refused is not None:
            return
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError, TimeoutError):
            await asyncio.wait_for(call.write(pb.SenderMessage(abandon=pb.Abandon(reason=reason[:1000]))), timeout_s)
            await asyncio.wait_for(call.code(), timeout_s)

    def cancel(self) -> None:
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            self._reader.cancel()

    async def finish(self) -> None:
        """Half-close after the final round and wait for the receiver to end the call."""
        assert self._call is not None
        assert self._reader is not None
        await self._call.done_writing()
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self._reader
        code = await self._call.code()
        if code != grpc.StatusCode.OK:
            raise await self._failure()

    # -- writing ------------------------------------------------------------------------------

    async def write(self, msg: pb.SenderMessage) -> None:
        while True:
            if self.refused is not None:
                raise self.refused
            if self._buffer_bytes < self._window_bytes or not self._buffer:
                break
            await self._wait_progress()
        size = msg.ByteSize()
        self._index += 1
        self._buffer.append((self._index, msg, size))
        self._buffer_bytes += size
        assert self._call is not None
        try:
            await self._call.write(msg)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await self._recover()  # replays the buffer, this message included

    async def wait_committed(self) -> pb.RoundCommitted:
        while True:
            if not self.committed.empty():
                return self.committed.get_nowait()
            await self._wait_progress()

    async def _wait_progress(self) -> None:
        """Wait for an ack or a commit; if the reader died, find out why and maybe resume."""
        assert self._reader is not None
        self._progress.clear()
        waiter = asyncio.ensure_future(self._progress.wait())
        done, _ = await asyncio.wait({waiter, self._reader}, return_when=asyncio.FIRST_COMPLETED)
        if waiter not in done:
            waiter.cancel()
            await self._recover()

    # -- replies ------------------------------------------------------------------------------

    async def _read_replies(self, call: grpc.aio.StreamStreamCall[pb.SenderMessage, pb.ReceiverMessage]) -> None:
        # read() only: grpc.aio refuses to mix it with `async for` on one call.
        while isinstance(reply := await call.read(), pb.ReceiverMessage):  # else grpc.aio.EOF
            kind = reply.WhichOneof("msg")
            if kind == "ack":
                self._trim(reply.ack.handled)
            elif kind == "committed":
                await self.committed.put(reply.committed)
            elif kind == "error":
                self.refused = self._error(status_code(reply.error.code), reply.error.reason)
            self._progress.set()

    def _trim(self, handled: int) -> None:
        self._acked = max(self._acked, handled)
        while self._buffer and self._buffer[0][0] <= handled:
            _, _, size = self._buffer.popleft()
            self._buffer_bytes -= size

    # -- connecting and resuming ----------------------------------------------------------------

    async def _start(self, first: pb.SenderMessage) -> pb.SessionAccepted:
        """A new channel and call, ``first`` written, the ``accepted`` reply read."""
        await self._stack.aclose()
        self._stack = contextlib.AsyncExitStack()
        channel = await self._stack.enter_async_context(self._connect())
        call = channel.stream_stream(
            METHOD_PATH, request_serializer=pb.SenderMessage.SerializeToString,
            response_deserializer=pb.ReceiverMessage.FromString,
        )(metadata=self._metadata)  # type: ignore[call-arg]  # grpc-stubs 1.53 predates aio's writer-style call
        self._call = call
        try:
            await call.write(first)
            reply = await call.read()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as err:
            raise await self._failure() from err
        if isinstance(reply, pb.ReceiverMessage) and reply.WhichOneof("msg") == "error":
            self.refused = self._error(status_code(reply.error.code), reply.error.reason)
            raise self.refused
        if not isinstance(reply, pb.ReceiverMessage) or reply.WhichOneof("msg") != "accepted":
            raise await self._failure()
        self._reader = asyncio.create_task(self._read_replies(call))
        return reply.accepted

    async def _recover(self) -> None:
        """The call failed: raise the refusal, or resume on a new connection within the deadline."""
        error = await self._failure()
        if self.refused is not None or not isinstance(error, _Transient):
            raise error.cause if isinstance(error, _Transient) else error
        if not self.session_id:
            raise error.cause
        deadline = time.monotonic() + self._resume_deadline_s
        backoff = 0.05
        log.warning("connection to the receiver lost (%s); resuming session %s", error.cause, self.session_id)
        while True:
            try:
                accepted = await self._start(pb.SenderMessage(
                    resume=pb.Resume(session_id=self.session_id, resume_token=self._token)))
                break
            except (TransportError, _Transient) as err:
                if time.monotonic() + backoff > deadline:
                    raise TransportError(f"connection to the receiver at {self._target} lost and not resumed "
                                         f"within {self._resume_deadline_s:g} s") from err
                await asyncio.sleep(backoff)  # exponential backoff between reconnects, not a sync
                backoff = min(backoff * 2, 2.0)
        self.resumes += 1
        if accepted.resume_token:  # each token resumes once; the next resume needs this one
            self._token = accepted.resume_token
        if accepted.round_restarted:
            self._buffer.clear()
            self._buffer_bytes = 0
            self._index = self._acked = accepted.handled
            log.warning("receiver restarted; sending round %d again", accepted.next_round)
            raise RoundRestart(accepted.next_round, accepted.last_seq, accepted.handled)
        self._trim(accepted.handled)
        if (self._buffer and self._buffer[0][0] != accepted.handled + 1) or accepted.handled > self._index:
            raise TransportError(f"cannot resume: the receiver handled {accepted.handled} messages, "
                                 f"the replay buffer starts at {self._buffer[0][0] if self._buffer else '-'}")
        log.info("session %s resumed after message %d; replaying %d messages", self.session_id,
                 accepted.handled, len(self._buffer))
        assert self._call is not None
        for _, msg, _ in list(self._buffer):
            try:
                await self._call.write(msg)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await self._recover()
                return

    async def _failure(self) -> PagehaulError:
        """Why the current call ended: the in-band refusal if any, else its status."""
        call = self._call
        if call is None:
            return TransportError(f"no connection to {self._target}")
        if self._reader is not None and self.refused is None:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await call.done_writing()
            with contextlib.suppress(grpc.aio.AioRpcError, TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._reader), REFUSAL_WAIT_S)
        if self.refused is not None:
            return self.refused
        code = await call.code()
        err = self._error(code, await call.details() or "")
        return _Transient(err) if code in TRANSIENT else err

    def _error(self, code: grpc.StatusCode, details: str) -> PagehaulError:
        if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DATA_LOSS):
            return ProtocolError(f"receiver refused the data: {details}")
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return AccessDenied(0, f"receiver refused the sender: {details}")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return TransportError(f"receiver out of resources: {details}")
        if code == grpc.StatusCode.NOT_FOUND:
            return TransportError(f"receiver cannot resume the session: {details}")
        return TransportError(f"receiver at {self._target} failed ({code.name}): {details}")


class _Transient(TransportError):
    """A failure of the connection rather than of the data: resume may fix it."""

    def __init__(self, cause: PagehaulError) -> None:
        super().__init__(str(cause))
        self.cause = cause


"""The sender's side of the session stream: ordered writes, replies read in the background, and
survival of a lost connection, over any ``pagehaul.transport.SessionChannel``.

Every message after ``open`` is kept in a ``ReplayBuffer`` until the receiver acknowledges it.
When the call fails for a transport reason (connection reset, receiver restart, link down), the
stream reconnects with exponential backoff and sends ``resume``:

* the receiver still has the session (a network cut): it answers how many messages it handled,
  and the stream replays the rest of the buffer; the caller never notices;
* the receiver restarted and took the session back from disk at its last committed round: the
  stream raises :class:`~pagehaul.transport.RoundRestart`, and the caller sends that round again;
* no answer within ``resume_deadline_s``: :class:`~pagehaul.errors.TransportError`.

Refusals (the receiver's in-band ``SessionError``, or a failure that is not the connection's)
are never retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from pagehaul.errors import PagehaulError, TransportError
from pagehaul.transport import (
    DEFAULT_WINDOW_BYTES,
    ChannelBroken,
    LinkLost,
    ReplayBuffer,
    SessionChannel,
    SessionConnector,
)
from pagehaul.v1 import migration_pb2 as pb
from pagehaul.wire import Outgoing
from sender import messages

log = logging.getLogger(__name__)

# How long to wait for the receiver's in-band reason once the call has failed.
REFUSAL_WAIT_S = 5.0


class ResumableStream:
    """The session's messages in order over one channel after another: the sender's view of the
    session stream, whatever carries it."""

    def __init__(self, connect: SessionConnector, target: str, resume_deadline_s: float = 30.0,
                 window_bytes: int = DEFAULT_WINDOW_BYTES) -> None:
        self._connect = connect
        self._target = target
        self._resume_deadline_s = resume_deadline_s
        self._stack = contextlib.AsyncExitStack()
        self._channel: SessionChannel | None = None
        self._reader: asyncio.Task[None] | None = None
        self._replay = ReplayBuffer(window_bytes)
        self._progress = asyncio.Event()
        self.committed: asyncio.Queue[pb.RoundCommitted] = asyncio.Queue()
        self.session_id = ""
        self._token = ""
        self.resumes = 0
        # Set when the receiver explains in-band why it is ending the session.
        self.refused: PagehaulError | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    async def open(self, first: pb.SenderMessage) -> pb.SessionAccepted:
        """Connect and open the session with ``first`` (a SessionOpen)."""
        accepted = await self._start(first)
        self.session_id, self._token = accepted.session_id, accepted.resume_token
        return accepted

    async def close(self) -> None:
        self.cancel()
        await self._stack.aclose()

    async def abandon(self, reason: str, timeout_s: float = 2.0) -> None:
        """Tell the receiver we give up, so it drops the open round now; best effort."""
        channel = self._channel
        if channel is None or channel.done or self.refused is not None:
            return
        with contextlib.suppress(ChannelBroken, TimeoutError):
            await asyncio.wait_for(channel.write(messages.abandon(reason)), timeout_s)
            await asyncio.wait_for(channel.ended(), timeout_s)

    def cancel(self) -> None:
        if self._channel is not None:
            self._channel.cancel()
        if self._reader is not None:
            self._reader.cancel()

    async def finish(self) -> None:
        """Half-close after the final round and wait for the receiver to end the call."""
        assert self._channel is not None
        assert self._reader is not None
        await self._channel.done_writing()
        with contextlib.suppress(ChannelBroken):
            await self._reader
        if await self._channel.ended() is not None:
            raise await self._failure()

    # -- writing ------------------------------------------------------------------------------

    async def write(self, msg: Outgoing) -> None:
        while True:
            if self.refused is not None:
                raise self.refused
            if self._replay.has_room:
                break
            await self._wait_progress()
        self._replay.push(msg)
        assert self._channel is not None
        try:
            await self._channel.write(msg)
        except ChannelBroken:
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

    async def _read_replies(self, channel: SessionChannel) -> None:
        while (reply := await channel.read()) is not None:
            kind = reply.WhichOneof("msg")
            if kind == "ack":
                self._replay.ack(reply.ack.handled)
            elif kind == "committed":
                await self.committed.put(reply.committed)
            elif kind == "error":
                self.refused = channel.refusal(reply.error)
            self._progress.set()

    # -- connecting and resuming ----------------------------------------------------------------

    async def _start(self, first: pb.SenderMessage) -> pb.SessionAccepted:
        """A new connection and call, ``first`` written, the ``accepted`` reply read."""
        await self._stack.aclose()
        self._stack = contextlib.AsyncExitStack()
        channel = await self._stack.enter_async_context(self._connect())
        self._channel = channel
        try:
            await channel.write(first)
            reply = await channel.read()
        except ChannelBroken as err:
            raise await self._failure() from err
        if reply is not None and reply.WhichOneof("msg") == "error":
            self.refused = channel.refusal(reply.error)
            raise self.refused
        if reply is None or reply.WhichOneof("msg") != "accepted":
            raise await self._failure()
        self._reader = asyncio.create_task(self._read_replies(channel))
        return reply.accepted

    async def _recover(self) -> None:
        """The call failed: raise the refusal, or resume on a new connection within the deadline."""
        error = await self._failure()
        if self.refused is not None or not isinstance(error, LinkLost):
            raise error.cause if isinstance(error, LinkLost) else error
        if not self.session_id:
            raise error.cause
        deadline = time.monotonic() + self._resume_deadline_s
        backoff = 0.05
        log.warning("connection to the receiver lost (%s); resuming session %s", error.cause, self.session_id)
        while True:
            try:
                accepted = await self._start(messages.resume(self.session_id, self._token))
                break
            except TransportError as err:  # LinkLost included
                if time.monotonic() + backoff > deadline:
                    raise TransportError(f"connection to the receiver at {self._target} lost and not resumed "
                                         f"within {self._resume_deadline_s:g} s") from err
                await asyncio.sleep(backoff)  # exponential backoff between reconnects, not a sync
                backoff = min(backoff * 2, 2.0)
        self.resumes += 1
        if accepted.resume_token:  # each token resumes once; the next resume needs this one
            self._token = accepted.resume_token
        if accepted.round_restarted:
            log.warning("receiver restarted; sending round %d again", accepted.next_round)
        replay = self._replay.resume(accepted)  # RoundRestart when the receiver lost the round
        log.info("session %s resumed after message %d; replaying %d messages", self.session_id,
                 accepted.handled, len(replay))
        assert self._channel is not None
        for msg in replay:
            try:
                await self._channel.write(msg)
            except ChannelBroken:
                await self._recover()
                return

    async def _failure(self) -> PagehaulError:
        """Why the current call ended: the in-band refusal if any, else the channel's reason."""
        channel = self._channel
        if channel is None:
            return TransportError(f"no connection to {self._target}")
        if self._reader is not None and self.refused is None:
            with contextlib.suppress(ChannelBroken):
                await channel.done_writing()
            with contextlib.suppress(ChannelBroken, TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._reader), REFUSAL_WAIT_S)
        if self.refused is not None:
            return self.refused
        return await channel.ended() or TransportError(f"receiver at {self._target} ended the session early")

"""The transport seam: what a sender needs from a connection to a receiver, and the replay
buffer that lets a session outlive one.

Two channels, one per kind of call the sender makes:

* ``SessionChannel``: one connection carrying one session call (the migration stream). The
  sender writes its messages (the first is ``open`` or ``resume``), reads the receiver's replies
  (accepted, acks, commits, an in-band refusal), half-closes when done, and asks why the call
  ended. A ``SessionConnector`` makes a new one for the open and for each resume.
* ``RestoreChannel``: CRIU's images to the receiver in one call, which answers once the restored
  tree runs (``pagehaul migrate``).

Nothing here knows gRPC: ``sender.grpc_channel`` implements both channels with grpc.aio, and a
second transport implements them again without touching the session, the replay buffer or
the pre-copy.

The replay buffer (``ReplayBuffer``) numbers every message after ``open`` (1, 2, ...) and keeps
it until the receiver's ``Ack.handled`` covers it; it is bounded (``window_bytes``), so a
receiver that stops acknowledging slows the sender down instead of growing its memory. On a
resume the receiver answers how many messages it handled: the buffer says what to send again,
or, when the receiver restarted and took the session back from disk at its last committed
round, raises ``RoundRestart``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

from pagehaul.errors import PagehaulError, TransportError
from pagehaul.v1 import migration_pb2 as pb
from pagehaul.v1 import restore_pb2 as rpb
from pagehaul.wire import Outgoing

DEFAULT_WINDOW_BYTES = 32 << 20


class ChannelBroken(TransportError):
    """The call can no longer be written or read; ``SessionChannel.ended`` says why."""


class LinkLost(TransportError):
    """A failure of the connection rather than of the data: a resume may fix it."""

    def __init__(self, cause: PagehaulError) -> None:
        super().__init__(str(cause))
        self.cause = cause


@dataclass(frozen=True, slots=True)
class RoundRestart(Exception):
    """The receiver restarted and lost the open round: send round ``next_round`` again."""

    next_round: int
    last_seq: int
    handled: int


class SessionChannel(Protocol):
    """One connection to a receiver carrying one session call."""

    @property
    def done(self) -> bool:
        """The call has ended (or was cancelled)."""
        ...

    async def write(self, msg: Outgoing) -> None:
        """Raises ChannelBroken once the call cannot take it. A ``BatchFrame`` goes on the wire
        as the SenderMessage it stands for (``pagehaul.wire.encode_sender``)."""
        ...

    async def read(self) -> pb.ReceiverMessage | None:
        """The next reply; None once the receiver has ended the call. Raises ChannelBroken."""
        ...

    async def done_writing(self) -> None:
        """Half-close: this side sends nothing more. Raises ChannelBroken."""
        ...

    async def ended(self) -> PagehaulError | None:
        """Wait for the end of the call: None if the receiver ended it well, else why (LinkLost
        when the connection failed, not the data)."""
        ...

    def refusal(self, error: pb.SessionError) -> PagehaulError:
        """What the receiver's in-band SessionError means."""
        ...

    def cancel(self) -> None: ...


SessionConnector = Callable[[], AbstractAsyncContextManager[SessionChannel]]


class RestoreChannel(Protocol):
    """A connection to a receiver that restores processes from CRIU's images."""

    async def restore(self, requests: AsyncIterator[rpb.RestoreRequest], timeout_s: float) -> rpb.RestoreReply:
        """Send ``requests`` (begin, file chunks, end); the receiver answers once the tree runs.
        Raises TransportError."""
        ...


class ReplayBuffer:
    """The session's messages after ``open``, numbered and kept until the receiver handled them."""

    def __init__(self, window_bytes: int = DEFAULT_WINDOW_BYTES) -> None:
        self._window_bytes = window_bytes
        self._kept: deque[tuple[int, Outgoing, int]] = deque()
        self._kept_bytes = 0
        self._last = 0  # number of the latest message

    @property
    def has_room(self) -> bool:
        """Another message may go out now; a message larger than the window goes out alone."""
        return self._kept_bytes < self._window_bytes or not self._kept

    @property
    def kept_bytes(self) -> int:
        return self._kept_bytes

    def push(self, msg: Outgoing) -> int:
        """Keep ``msg`` for a replay; returns its number."""
        size = msg.ByteSize()
        self._last += 1
        self._kept.append((self._last, msg, size))
        self._kept_bytes += size
        return self._last

    def ack(self, handled: int) -> None:
        """The receiver handled every message up to number ``handled``."""
        while self._kept and self._kept[0][0] <= handled:
            _, _, size = self._kept.popleft()
            self._kept_bytes -= size

    def resume(self, accepted: pb.SessionAccepted) -> list[Outgoing]:
        """The messages to send again on a resumed call, after the receiver's ``accepted``.

        Raises RoundRestart when the receiver lost the open round (the buffer is emptied and
        numbering goes on from what it handled), TransportError when the messages it lacks
        are no longer kept."""
        if accepted.round_restarted:
            self._kept.clear()
            self._kept_bytes = 0
            self._last = accepted.handled
            raise RoundRestart(accepted.next_round, accepted.last_seq, accepted.handled)
        self.ack(accepted.handled)
        if (self._kept and self._kept[0][0] != accepted.handled + 1) or accepted.handled > self._last:
            raise TransportError(f"cannot resume: the receiver handled {accepted.handled} messages, "
                                 f"the replay buffer starts at {self._kept[0][0] if self._kept else '-'}")
        return [msg for _, msg, _ in self._kept]

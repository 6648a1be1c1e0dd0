"""pagehaul.transport.ReplayBuffer: numbering, the window, acks, and what a resume sends again."""

from __future__ import annotations

import pytest

from pagehaul.errors import TransportError
from pagehaul.transport import ReplayBuffer, RoundRestart
from pagehaul.v1 import migration_pb2 as pb


def msg(n: int) -> pb.SenderMessage:
    return pb.SenderMessage(holes=pb.Holes(seq=n, vaddr=[4096 * n], nr_pages=[1]))


def test_messages_are_numbered_and_acks_drop_them() -> None:
    buf = ReplayBuffer()
    assert [buf.push(msg(i)) for i in range(1, 4)] == [1, 2, 3]
    total = buf.kept_bytes
    buf.ack(2)
    assert buf.kept_bytes == msg(3).ByteSize() < total
    buf.ack(1)  # an older ack changes nothing
    assert buf.kept_bytes == msg(3).ByteSize()


def test_window_full_until_acked_and_one_big_message_goes_alone() -> None:
    size = msg(1).ByteSize()
    buf = ReplayBuffer(window_bytes=2 * size)
    buf.push(msg(1))
    assert buf.has_room
    buf.push(msg(2))
    assert not buf.has_room
    buf.ack(1)
    assert buf.has_room
    tiny = ReplayBuffer(window_bytes=1)
    assert tiny.has_room  # empty: a message larger than the window still goes
    tiny.push(msg(1))
    assert not tiny.has_room


def test_resume_sends_again_what_the_receiver_did_not_handle() -> None:
    buf = ReplayBuffer()
    sent = [msg(i) for i in range(1, 6)]
    for m in sent:
        buf.push(m)
    buf.ack(1)
    assert buf.resume(pb.SessionAccepted(session_id="s", handled=3)) == sent[3:]
    assert buf.push(msg(6)) == 6  # numbering goes on
    assert buf.resume(pb.SessionAccepted(session_id="s", handled=6)) == []


def test_resume_cannot_skip_messages_no_longer_kept() -> None:
    buf = ReplayBuffer()
    for i in range(1, 4):
        buf.push(msg(i))
    buf.ack(3)
    buf.push(msg(4))
    with pytest.raises(TransportError, match="cannot resume"):
        buf.resume(pb.SessionAccepted(session_id="s", handled=7))  # handled more than was sent


def test_receiver_restart_empties_the_buffer_and_numbering_follows_the_receiver() -> None:
    buf = ReplayBuffer()
    for i in range(1, 9):
        buf.push(msg(i))
    with pytest.raises(RoundRestart) as info:
        buf.resume(pb.SessionAccepted(session_id="s", handled=5, round_restarted=True, next_round=1, last_seq=4))
    assert (info.value.next_round, info.value.last_seq, info.value.handled) == (1, 4, 5)
    assert buf.kept_bytes == 0
    assert buf.push(msg(1)) == 6

"""pagehaul.wire's batch frames: the payload kept out of protobuf, the same bytes on the wire."""

from __future__ import annotations

import pytest

from pagehaul.v1 import migration_pb2 as pb
from pagehaul.wire import BatchFrame, decode_sender, encode_sender


def batch(payload: bytes = b"p" * 8192, **fields: int) -> pb.PageBatch:
    return pb.PageBatch(seq=fields.get("seq", 7), vaddr=[4096, 1 << 40], nr_pages=[1, 1],
                        compression=pb.COMPRESSION_NONE, payload=payload, xxh3_64=fields.get("xxh3_64", 1 << 63),
                        image=fields.get("image", 3))


def test_a_frame_serializes_as_protobuf_parses_it() -> None:
    want = batch()
    header = pb.PageBatch()
    header.CopyFrom(want)
    header.ClearField("payload")
    frame = BatchFrame(header, want.payload)
    size = frame.ByteSize()
    wire = encode_sender(frame)
    assert len(wire) == size == pb.SenderMessage(batch=want).ByteSize()
    assert pb.SenderMessage.FromString(wire) == pb.SenderMessage(batch=want)
    assert bytes(frame.payload) == want.payload  # now a view into the wire bytes
    assert frame.message() == pb.SenderMessage(batch=want)


@pytest.mark.parametrize("payload", [b"", b"x", b"y" * 300, bytes(range(256)) * 64])
def test_decoding_cuts_the_payload_out_as_a_view(payload: bytes) -> None:
    data = pb.SenderMessage(batch=batch(payload)).SerializeToString()
    frame = decode_sender(data)
    assert isinstance(frame, BatchFrame)
    assert isinstance(frame.payload, memoryview)
    assert bytes(frame.payload) == payload
    want = batch(payload)
    want.ClearField("payload")
    assert frame.batch == want


def test_protobuf_semantics_kept_for_odd_encodings() -> None:
    # Payload first, twice (the last counts), seq split over two occurrences.
    body = (pb.PageBatch(payload=b"first").SerializeToString() + pb.PageBatch(seq=5).SerializeToString()
            + pb.PageBatch(payload=b"second").SerializeToString() + pb.PageBatch(seq=9, image=2).SerializeToString())
    data = bytes([0x1A, len(body)]) + body
    frame = decode_sender(data)
    ref = pb.SenderMessage.FromString(data)
    assert isinstance(frame, BatchFrame)
    assert bytes(frame.payload) == ref.batch.payload == b"second"
    assert (frame.batch.seq, frame.batch.image) == (ref.batch.seq, ref.batch.image) == (9, 2)


@pytest.mark.parametrize("data", [
    pb.SenderMessage(round_end=pb.RoundEnd(round=1, last_seq=3)).SerializeToString(),
    # Two batch fields merge in protobuf: left to it.
    pb.SenderMessage(batch=pb.PageBatch(seq=1)).SerializeToString() * 2,
])
def test_other_messages_go_through_protobuf(data: bytes) -> None:
    msg = decode_sender(data)
    assert isinstance(msg, pb.SenderMessage)
    assert msg == pb.SenderMessage.FromString(data)


@pytest.mark.parametrize("data", [b"\x1a\x05\x08", b"\x1a\x02\x2a\x09", b"\x1a\x01\x0b", b"\x1a\xff"])
def test_malformed_batches_fail_as_protobuf_does(data: bytes) -> None:
    from google.protobuf.message import DecodeError

    with pytest.raises(DecodeError):
        decode_sender(data)

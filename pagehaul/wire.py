"""Wire-level constants and helpers shared by sender and receiver.

The RPC is registered through grpc's generic handlers rather than grpc_tools' generated
``*_pb2_grpc`` stubs: one method, typed here, with no untyped generated module to carry.
"""

from __future__ import annotations

from typing import Final, cast

from pagehaul.v1 import migration_pb2 as pb

PROTOCOL_VERSION: Final = 1
SERVICE: Final = "pagehaul.v1.Migration"
METHOD: Final = "Migrate"
METHOD_PATH: Final = f"/{SERVICE}/{METHOD}"
# Full migration's restore (proto/pagehaul/v1/restore.proto), served beside it.
RESTORE_SERVICE: Final = "pagehaul.v1.Restore"
RESTORE_METHOD: Final = "Restore"
RESTORE_METHOD_PATH: Final = f"/{RESTORE_SERVICE}/{RESTORE_METHOD}"

# A batch carries at most this many raw bytes (1024 pages of 4 KiB): large enough that gRPC's
# per-message cost (Python work per message, not per byte) is small against the payload, small
# enough to keep memory bounded.
MAX_BATCH_BYTES: Final = 4 << 20
# A batch message is its payload (never larger than the raw bytes: incompressible data goes
# uncompressed) plus two packed u64 arrays of at most 1024 runs each and a few scalars.
MAX_MESSAGE_BYTES: Final = MAX_BATCH_BYTES + (64 << 10)
# The page sizes a session may carry: powers of two in this range (4 KiB to 64 KiB covers x86-64,
# arm64's three sizes and ppc64).
MIN_PAGE_SIZE: Final = 4096
MAX_PAGE_SIZE: Final = 65536
# Holes and round_begin messages are bounded by this many runs / VMAs.
MAX_RUNS_PER_MESSAGE: Final = 65536
MAX_VMAS: Final = 65536

CHANNEL_OPTIONS: Final[list[tuple[str, int]]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # HTTP/2 keepalive pings every second, 1 s to answer: a link that died (no RST, no FIN) is
    # noticed in seconds and the session resumed, instead of after TCP's ~15 minutes of
    # retransmissions. Both ends allow pings at that rate without calls or data in flight.
    ("grpc.keepalive_time_ms", 1000),
    ("grpc.keepalive_timeout_ms", 1000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 500),
    ("grpc.http2.min_ping_interval_without_data_ms", 500),
    ("grpc.http2.max_ping_strikes", 0),
]

# A dirty tracker's one identity: its wire value (pagehaul.v1 ``Tracker``) and its name (``--tracker``,
# logs, the session's sidecar). Both sides use only this table.
TRACKER_NAMES: Final[dict[int, str]] = {
    pb.TRACKER_NONE: "none",
    pb.TRACKER_UFFD_WP: "uffd-wp",
    pb.TRACKER_SOFT_DIRTY_PAGEMAP: "soft-dirty-pagemap",
    pb.TRACKER_SOFT_DIRTY_SCAN: "soft-dirty-scan",
    pb.TRACKER_HASH: "hash",
}
_TRACKER_BY_NAME: Final = {name: value for value, name in TRACKER_NAMES.items()}


def tracker_wire(name: str) -> pb.Tracker:
    """The wire value of the tracker called ``name`` (``KeyError`` for an unknown name)."""
    return cast("pb.Tracker", _TRACKER_BY_NAME[name])


# --- batches with their payload kept out of protobuf ------------------------------------------
#
# A PageBatch's payload is almost all of the session's bytes. Through protobuf it is copied when
# the field is set, again when the message is serialized, and on the receiver when it is parsed
# and again when the field is read. A ``BatchFrame`` keeps the payload as a buffer of its own:
# the sender writes the message's bytes by hand around it (the same protobuf encoding: fields may
# come in any order, so the payload goes last), and the receiver cuts it out of the received bytes
# as a memoryview and parses only the small rest with protobuf.

_BATCH_KEY: Final = (3 << 3) | 2  # SenderMessage.batch, length-delimited
_PAYLOAD_KEY: Final = (5 << 3) | 2  # PageBatch.payload, length-delimited


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(data: bytes, pos: int, end: int) -> tuple[int, int] | None:
    """(value, position after it), or None if it runs past ``end`` or beyond 10 bytes."""
    value = shift = 0
    for i in range(pos, min(pos + 10, end)):
        b = data[i]
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i + 1
        shift += 7
    return None


class BatchFrame:
    """A ``SenderMessage`` holding one ``PageBatch`` whose payload is not copied into protobuf.

    ``batch`` holds every field but the payload. Serialized once (:meth:`serialize`, the bytes a
    gRPC call writes); the payload is then a view into those bytes, so a frame kept for a replay
    holds one copy of it.
    """

    __slots__ = ("_wire", "batch", "payload")

    def __init__(self, batch: pb.PageBatch, payload: bytes | memoryview) -> None:
        self.batch = batch
        self.payload = payload
        self._wire: bytes | None = None

    def ByteSize(self) -> int:  # noqa: N802 -- named like protobuf's, where a message is sized
        if self._wire is not None:
            return len(self._wire)
        n = len(self.payload)
        inner = self.batch.ByteSize() + 1 + len(_varint(n)) + n
        return 1 + len(_varint(inner)) + inner

    def serialize(self) -> bytes:
        """The message's wire bytes (the batch's fields, then the payload); fixed from the first call."""
        if self._wire is None:
            head = self.batch.SerializeToString()
            n = len(self.payload)
            field = _varint(n)
            inner = len(head) + 1 + len(field) + n
            prefix = b"".join((bytes((_BATCH_KEY,)), _varint(inner), head, bytes((_PAYLOAD_KEY,)), field))
            self._wire = b"".join((prefix, self.payload))
            self.payload = memoryview(self._wire)[len(prefix):]
        return self._wire

    def message(self) -> pb.SenderMessage:
        """The same as a protobuf message (copies the payload: for tests and fakes)."""
        return pb.SenderMessage.FromString(self.serialize())


Outgoing = pb.SenderMessage | BatchFrame


def encode_sender(msg: Outgoing) -> bytes:
    """A sender message's wire bytes (the stream's request serializer)."""
    return msg.serialize() if isinstance(msg, BatchFrame) else msg.SerializeToString()


def decode_sender(data: bytes) -> pb.SenderMessage | BatchFrame:
    """A sender message from its wire bytes: a batch as a ``BatchFrame`` whose payload is a view
    into ``data``, anything else (or a batch encoded some other way) through protobuf. Raises
    protobuf's DecodeError for bytes that are no SenderMessage."""
    if data[:1] == bytes((_BATCH_KEY,)):
        frame = _split_batch(data)
        if frame is not None:
            return frame
    return pb.SenderMessage.FromString(data)


def _field_end(data: bytes, pos: int, end: int, kind: int) -> tuple[int, int] | None:
    """Where a field's value that starts at ``pos`` ends, and where its bytes begin (a
    length-delimited field's content); None for what this walk does not take (groups, truncation)."""
    if kind == 0:
        got = _read_varint(data, pos, end)
        return None if got is None else (got[1], pos)
    if kind == 2:
        got = _read_varint(data, pos, end)
        return None if got is None else (got[1] + got[0], got[1])
    if kind in (1, 5):
        return pos + (8 if kind == 1 else 4), pos
    return None


def _split_batch(data: bytes) -> BatchFrame | None:
    """``data`` as one batch field whose payload is cut out, or None (then protobuf decides)."""
    end = len(data)
    got = _read_varint(data, 1, end)
    if got is None or got[1] + got[0] != end:
        return None  # not exactly one batch field
    pos = got[1]
    kept: list[tuple[int, int]] = []  # spans of the batch's bytes other than payload fields
    payload = (0, 0)
    while pos < end:
        start = pos
        got = _read_varint(data, pos, end)
        field = None if got is None or got[0] >> 3 == 0 else _field_end(data, got[1], end, got[0] & 7)
        if got is None or field is None or field[0] > end:
            return None
        pos = field[0]
        if got[0] == _PAYLOAD_KEY:
            payload = (field[1], pos)  # the last one counts, as in protobuf
        else:
            kept.append((start, pos))
    view = memoryview(data)
    head = b"".join(view[a:b] for a, b in kept)
    return BatchFrame(pb.PageBatch.FromString(head), view[payload[0]:payload[1]])

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

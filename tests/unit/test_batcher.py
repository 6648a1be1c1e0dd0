"""BatchEncoder on byte fixtures: zero pages out, the rest packed, checksummed, compressed or not."""

from __future__ import annotations

import numpy as np
import pytest
import xxhash
import zstandard

from pagehaul.runs import Runs
from pagehaul.v1 import migration_pb2 as pb
from sender import messages
from sender.batcher import BatchEncoder, nonzero_pages, packed_bytes

P = 4096


def pages(spec: str) -> np.ndarray:
    """One page per character: '0' all zero, 'r' random, 't' compressible text, 'e' zero but its last byte."""
    rng = np.random.default_rng(7)
    out = np.zeros(len(spec) * P, np.uint8)
    for i, c in enumerate(spec):
        page = out[i * P:(i + 1) * P]
        if c == "r":
            page[:] = rng.integers(0, 256, P, dtype=np.uint8)
        elif c == "t":
            page[:] = np.frombuffer((b"log line %d " % i) * P, np.uint8)[:P]
        elif c == "e":
            page[-1] = 1
    return out


@pytest.mark.parametrize("spec", ["0", "r", "t0r", "00tt0e", "rrrr", "0r0r0r", "e000"])
def test_packed_bytes_keeps_the_masked_pages_in_order(spec: str) -> None:
    raw = pages(spec)
    mask = nonzero_pages(raw, P)
    assert mask.tolist() == [c != "0" for c in spec]
    assert packed_bytes(raw, mask, P) == raw.reshape(-1, P)[mask].tobytes()


@pytest.mark.parametrize("level", [None, 1, -5])
@pytest.mark.parametrize("spec", ["t0r", "00tt0e", "rrrr", "tttt", "0000"])
def test_encode_round_trips(spec: str, level: int | None) -> None:
    raw = pages(spec)
    # Two runs: pages 0-1 at 1 MiB, the rest at 8 MiB.
    n = len(spec)
    runs = Runs.of([1 << 20, 8 << 20], [min(2, n), max(n - 2, 0)]) if n > 2 else Runs.of([1 << 20], [n])
    enc = BatchEncoder(P, 1).encode(runs, raw, level=level)
    nonzero = [c != "0" for c in spec]
    addrs = runs.page_addrs(P)
    assert enc.pages_data == sum(nonzero)
    assert enc.pages_zero == n - sum(nonzero)
    assert enc.zero_runs.page_addrs(P).tolist() == addrs[~np.array(nonzero)].tolist()
    if enc.message is None:
        assert not any(nonzero)
        return
    assert messages.numbered(enc.message, 7, 2) is enc.message  # numbered in place, the payload not copied
    wire = enc.message.message()
    assert wire.WhichOneof("msg") == "batch"
    msg = wire.batch
    assert (msg.seq, msg.image) == (7, 2)
    assert Runs.of(msg.vaddr, msg.nr_pages).page_addrs(P).tolist() == addrs[np.array(nonzero)].tolist()
    expected = raw.reshape(-1, P)[np.array(nonzero)].tobytes()
    if msg.compression == pb.COMPRESSION_ZSTD:
        assert level is not None
        data = zstandard.ZstdDecompressor().decompress(msg.payload)
    else:
        data = msg.payload
    assert data == expected
    assert msg.xxh3_64 == xxhash.xxh3_64_intdigest(expected)
    assert enc.raw_bytes == len(expected)
    assert enc.payload_bytes == len(msg.payload)


def test_incompressible_pages_travel_raw() -> None:
    enc = BatchEncoder(P, 1).encode(Runs.of([0], [3]), pages("rrr"))
    assert enc.message is not None
    assert enc.message.batch.compression == pb.COMPRESSION_NONE

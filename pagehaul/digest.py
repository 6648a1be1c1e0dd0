"""Per-page digests, shared by the sender (the hash tracker) and the receiver (``pages-ID.xxh3``).

One xxh3_64 per page, unseeded, iterated by ``map()`` over memoryview slices so that no bytecode
runs per page: of the hashes fit for the job it is the fastest (seeded xxh3, xxh64, crc32 and
blake2b are all slower), so hashing a page costs less than reading it from the target.
Vectorised numpy hashes over the u64 words of each page are slower, or weaker: a multiply-xor
fold has no provable collision bound, and a strongly universal multilinear hash, which has one,
is slower still. Collision odds: ``sender/trackers/hashing.py``. ``bench/`` measures the speeds.

On disk a digest array is raw little-endian u64, one per page, in the pages file's order
(``to_bytes`` / ``from_bytes``): 8 bytes per 4 KiB page, 2 MiB per GiB.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt
import xxhash

from pagehaul.kernel import PAGE_SIZE
from pagehaul.runs import U64

DIGEST_SIZE: Final = 8
DIGEST_DTYPE: Final = np.dtype("<u8")

# Anything exporting C-contiguous bytes: what the readers fill and what the wire decodes to.
Buffer = bytes | bytearray | memoryview | npt.NDArray[np.generic]


def page_digests(data: Buffer, page_size: int = PAGE_SIZE) -> U64:
    """xxh3_64 of each ``page_size`` slice of ``data`` (whose length is a multiple of it)."""
    view = memoryview(data).cast("B")  # type: ignore[arg-type]  # numpy arrays export the buffer protocol
    size = len(view)
    if size % page_size:
        raise ValueError(f"{size} bytes is not a whole number of {page_size}-byte pages")
    # map() keeps the per-page iteration in C, which a Python for loop over the pages does not.
    pages = map(view.__getitem__, map(slice, range(0, size, page_size), range(page_size, size + page_size, page_size)))
    return np.fromiter(map(xxhash.xxh3_64_intdigest, pages), dtype=np.uint64, count=size // page_size)


def to_bytes(digests: U64) -> bytes:
    """The on-disk form: little-endian u64 per page."""
    return digests.astype(DIGEST_DTYPE, copy=False).tobytes()


def from_bytes(data: Buffer) -> U64:
    """Digests from their on-disk form (a length that is not a multiple of 8 is a ValueError)."""
    view = memoryview(data).cast("B")  # type: ignore[arg-type]  # numpy arrays export the buffer protocol
    if len(view) % DIGEST_SIZE:
        raise ValueError(f"{len(view)} bytes is not a whole number of {DIGEST_SIZE}-byte digests")
    return np.frombuffer(view, dtype=DIGEST_DTYPE).astype(np.uint64)

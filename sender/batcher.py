"""Turn the raw bytes of a run batch into a wire batch: zero pages out, the rest compressed
(the message itself is ``sender.messages.batch``).

Runs in worker threads: numpy's reductions and zstandard's ``compress`` release the GIL, so
two workers use two cores. Nothing here loops over pages in Python.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
import xxhash
import zstandard

from pagehaul.digest import page_digests
from pagehaul.runs import U64, Runs
from pagehaul.wire import BatchFrame
from sender import messages


@dataclass(frozen=True, slots=True)
class EncodedBatch:
    """One batch ready for the wire. ``message`` (a PageBatch and its payload) is None when every
    page was zero; its seq and image are set when it is sent (``messages.numbered``).
    """

    message: BatchFrame | None
    zero_runs: Runs
    pages_data: int
    pages_zero: int
    raw_bytes: int
    payload_bytes: int
    # xxh3 of each data page, in ``data`` run order (encoders made with ``page_digests=True``).
    page_digests: U64 | None = None


def nonzero_pages(raw: npt.NDArray[np.uint8], page_size: int) -> npt.NDArray[np.bool_]:
    """Per page: does it hold any non-zero byte?

    Looking at the first 8 bytes of every page first and scanning in full only the pages where
    they are zero is faster than ``any()`` over everything on mixed memory: most non-zero pages
    are told apart by their first word.
    """
    words = raw.view(np.uint64).reshape(-1, page_size // 8)
    nonzero = words[:, 0] != 0
    candidates = np.flatnonzero(~nonzero)
    if candidates.size:
        nonzero[candidates] = words[candidates].any(axis=1)
    return np.asarray(nonzero, dtype=np.bool_)


def packed_bytes(raw: npt.NDArray[np.uint8], mask: npt.NDArray[np.bool_], page_size: int) -> bytes:
    """The pages of ``raw`` whose ``mask`` is set, back to back, copied once.

    ``bytes.join`` over views of the runs of kept pages: one copy, where packing with numpy
    first (``raw.reshape(-1, page_size)[mask]``) and then ``bytes()`` copies twice.
    """
    view = memoryview(raw.data).cast("B")
    if mask.all():
        return bytes(view)
    edges = np.flatnonzero(np.diff(mask.astype(np.int8), prepend=np.int8(0), append=np.int8(0)))
    starts = (edges[0::2] * page_size).tolist()
    ends = (edges[1::2] * page_size).tolist()
    return b"".join([view[a:b] for a, b in zip(starts, ends, strict=True)])


class BatchEncoder:
    """Zero detection, packing, checksum and compression; one zstd context per thread."""

    def __init__(self, page_size: int, zstd_level: int | None, *, page_digests: bool = False) -> None:
        self._page_size = page_size
        self._level = zstd_level
        self._page_digests = page_digests
        self._local = threading.local()

    def _compressor(self, level: int) -> zstandard.ZstdCompressor:
        comps: dict[int, zstandard.ZstdCompressor] | None = getattr(self._local, "comps", None)
        if comps is None:
            comps = self._local.comps = {}
        comp = comps.get(level)
        if comp is None:
            comp = comps[level] = zstandard.ZstdCompressor(level=level)
        return comp

    def encode(self, runs: Runs, raw: npt.NDArray[np.uint8], *,
               level: int | Literal["default"] | None = "default") -> EncodedBatch:
        """Build the batch for ``runs`` whose bytes (in run order) are ``raw``.

        ``level``: a zstd level, None for no compression, "default" for the encoder's own.
        The caller assigns the sequence number; ``raw`` may be reused once this returns.
        """
        if level == "default":
            level = self._level
        ps = self._page_size
        total = runs.total_pages
        if raw.size != total * ps:
            raise ValueError(f"raw holds {raw.size} bytes for {total} pages")
        mask = nonzero_pages(raw, ps)
        n_data = int(np.count_nonzero(mask))
        if n_data == 0:
            return EncodedBatch(None, runs, 0, total, 0, 0)
        if n_data == total:
            data_runs, zero_runs = runs, Runs.empty()
        else:
            data_runs = runs.select_pages(mask, ps)
            zero_runs = runs.select_pages(~mask, ps)
        raw_bytes = n_data * ps
        if level is None:
            # Without compression the payload is the only copy made: the non-zero pages go
            # straight from the read buffer into one bytes object.
            payload = packed_bytes(raw, mask, ps)
            digest = xxhash.xxh3_64_intdigest(payload)
            digests = page_digests(payload, ps) if self._page_digests else None
            zstd = False
        else:
            packed = raw if n_data == total else raw.reshape(-1, ps)[mask].reshape(-1)
            view = memoryview(packed.data).cast("B")
            digest = xxhash.xxh3_64_intdigest(view)
            digests = page_digests(view, ps) if self._page_digests else None
            frame = self._compressor(level).compress(view)
            zstd = len(frame) < raw_bytes
            # incompressible: raw bytes are smaller and cheaper to check
            payload = frame if zstd else bytes(view)
        message = messages.batch(data_runs, payload, zstd=zstd, xxh3_64=digest)
        return EncodedBatch(message, zero_runs, n_data, total - n_data, raw_bytes, len(payload), digests)

"""One migration session on the receiver: validate every message, write rounds, commit them.

The session is transport-free: :meth:`ReceiverSession.handle` takes one decoded sender message
and returns the replies; the registry (``receiver.registry``) decides which stream drives it and
when it detaches or expires, and a transport adapter (``receiver.grpc_server``) only moves
messages and maps errors to status codes. Every check that protects the receiver from a malformed or hostile
peer lives here, before anything reaches the disk:

* the first message opens the session; rounds are numbered 0, 1, 2, ... with no gaps;
* sequence numbers of batches and holes are 1, 2, 3, ... with no gaps or repeats;
* every run is page aligned, non-empty and inside one of the round's declared VMAs;
* a batch declares its raw size through its runs; it may not exceed ``max_batch_bytes``, and
  its payload must decompress to exactly that size (decoded into a buffer of that size, so a
  decompression bomb costs no more) and match its xxh3_64 checksum;
* page data ascends through the round (the pages file is written in pagemap order); holes
  may come in any order, but not overlap within a message; the pages of all runs of an image
  may not exceed its VMAs', a round holds at most ``max_hole_runs`` hole runs, and overlaps
  between any runs are refused at round end at the latest.

Directory names are chosen here, never taken from the peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import xxhash
import zstandard
from google.protobuf.message import Message

from pagehaul import codec, store
from pagehaul.errors import ImageError, IntegrityError, PagehaulError, ProtocolError
from pagehaul.flatten import FlattenStopped, flatten_round
from pagehaul.metrics import ReceiverMetrics
from pagehaul.runs import Runs
from pagehaul.v1 import migration_pb2 as pb
from pagehaul.wire import (
    MAX_BATCH_BYTES,
    MAX_PAGE_SIZE,
    MAX_RUNS_PER_MESSAGE,
    MAX_VMAS,
    MIN_PAGE_SIZE,
    PROTOCOL_VERSION,
    TRACKER_NAMES,
    BatchFrame,
    tracker_wire,
)

log = logging.getLogger(__name__)

TOKEN_FILE = ".resume-token"  # noqa: S105 -- a file name


@dataclass(frozen=True, slots=True)
class SessionLimits:
    max_batch_bytes: int = MAX_BATCH_BYTES
    max_runs_per_message: int = MAX_RUNS_PER_MESSAGE
    max_vmas: int = MAX_VMAS
    # Page bytes one session may write, over all its rounds (None: no quota).
    max_session_bytes: int | None = None
    # Zero and parent hole runs one round may hold in memory until it commits (16 bytes each).
    # Page data is bounded by the disk quotas; holes cost no disk, so they are counted here.
    max_hole_runs: int = 1 << 22
    # Fold each committed live round into flat-K for a faster restore (pagehaul.flatten). Off by
    # default: it costs a copy of the memory in CPU and disk per round on the destination, for a
    # faster eager restore that has not been shown to outweigh that.
    flatten: bool = False


class DiskQuota:
    """Page bytes all sessions of one receiver may write (the global quota); shared by them."""

    def __init__(self, limit_bytes: int | None, used_bytes: int = 0) -> None:
        self.limit_bytes = limit_bytes
        self.used_bytes = used_bytes

    def take(self, nbytes: int) -> None:
        if self.limit_bytes is not None and self.used_bytes + nbytes > self.limit_bytes:
            raise QuotaExceeded(f"the receiver's disk quota of {self.limit_bytes} bytes is used up "
                                f"({self.used_bytes} written)")
        self.used_bytes += nbytes

    def give_back(self, nbytes: int) -> None:
        """Bytes of a round that was dropped: they are no longer on disk."""
        self.used_bytes = max(0, self.used_bytes - nbytes)


class QuotaExceeded(PagehaulError):
    """A session or the receiver reached its disk quota."""


class LimitExceeded(PagehaulError):
    """A session or the receiver reached a bound on memory or open files."""


MAX_IMAGES = 4096  # processes plus shared-memory objects in one round
# An image of the open round holds its pages file and its digests file open until commit.
FDS_PER_IMAGE = 2


class FdBudget:
    """File descriptors the open rounds of all sessions may hold, and one session's share of them
    (None: unbounded); shared by the sessions of one receiver. A round takes its files at
    ``round_begin`` and gives them back when it commits or is dropped."""

    def __init__(self, limit: int | None, per_session: int | None = None) -> None:
        self.limit = limit
        self.per_session = per_session
        self.used = 0

    def take(self, n: int, what: str) -> None:
        if self.per_session is not None and n > self.per_session:
            raise LimitExceeded(f"{what} needs {n} open files, more than a session may hold ({self.per_session})")
        if self.limit is not None and self.used + n > self.limit:
            raise LimitExceeded(f"{what} needs {n} open files; the receiver has {self.limit - self.used} "
                                f"of {self.limit} left")
        self.used += n

    def give_back(self, n: int) -> None:
        self.used = max(0, self.used - n)


@dataclass(slots=True)
class _Image:
    """One memory image of the open round: its declared ranges (merged where they touch) and writer."""

    key: codec.ImageKey
    vma_starts: npt.NDArray[np.uint64]
    vma_ends: npt.NDArray[np.uint64]
    writer: store.ImageWriter
    data_end: int = 0
    # Pages its batches and holes covered so far this round; runs may not overlap, so never more
    # than its VMAs hold.
    pages_covered: int = 0

    @property
    def vma_pages_bytes(self) -> int:
        return int(np.sum(self.vma_ends - self.vma_starts))


@dataclass(slots=True)
class _Round:
    number: int
    frozen: bool
    writer: store.RoundWriter  # commits (and aborts) the round with all its images
    parts: list[_Image]
    dump_uptime_us: int
    pages_zero: int = 0
    hole_runs: int = 0
    # Open files taken from the FdBudget; given back when the round commits or is dropped.
    fds: int = 0
    # Page bytes of this round counted against the quotas; given back if the round is dropped.
    bytes_charged: int = 0


@dataclass(slots=True)
class SessionSummary:
    session_id: str
    pid: int = 0
    rounds: list[str] = field(default_factory=list)
    complete: bool = False


def plain_session_id(session_id: str) -> bool:
    """A session id from a peer names a plain directory entry under the images dir: not empty,
    no path separator, no dot file, no NUL."""
    return bool(session_id) and "/" not in session_id and not session_id.startswith(".") and "\0" not in session_id


class ReceiverSession:
    """State of one session. Not thread-safe: one task drives it, message by message."""

    def __init__(self, images_dir: Path, peer: str, limits: SessionLimits | None = None,
                 metrics: ReceiverMetrics | None = None, quota: DiskQuota | None = None, *,
                 fds: FdBudget | None = None, identity: str = "") -> None:
        self._metrics = metrics
        # The client certificate that opened the session (security.client_identity; "" without
        # TLS): only it may resume the session.
        self._identity = identity
        self._quota = quota
        self._fds = fds or FdBudget(None)
        self._bytes_written = 0
        self._images_dir = images_dir
        self._peer = peer
        self._limits = limits or SessionLimits()
        self._dir: Path | None = None
        self._summary = SessionSummary(session_id="")
        self._page_size = 0
        self._pid = 0
        self._open: pb.SessionOpen | None = None
        self._round: _Round | None = None
        self._next_round = 0
        self._seq = 0
        self._finished = False
        self._got_stats = False
        self._handled = 0
        self._token = ""
        self._inflight: asyncio.Future[list[pb.ReceiverMessage]] | None = None
        # The stream currently driving the session (set by receiver.registry; compared by identity).
        self.owner: object = None
        # Per committed round: (sequence number, messages handled) at its end, for recovery.
        self._marks: list[tuple[int, int]] = []
        self._round_stats: list[dict[str, object]] = []
        # Per image of the last committed round: what its pagemap covers, for the next round's parent-hole
        # check (without it, after a recovery, the writer reads the parent pagemap from disk).
        self._covers: dict[codec.ImageKey, store.ImageCover] = {}
        self._decompressor = zstandard.ZstdDecompressor()
        # The flattening of a committed live round, running in a thread (pagehaul.flatten).
        self._flattening: asyncio.Future[object] | None = None
        self._stop_flattening = threading.Event()

    def _flatten(self, round_no: int) -> None:
        """Fold the chain up to ``round_no`` into ``flat-ROUND`` in the background, when asked
        (``SessionLimits.flatten``) and unless one is still being made (the next commit tries
        again), the final round has begun, or a total disk quota is set (it would hold a second
        copy of the memory the quota does not see)."""
        if not self._limits.flatten or (self._quota is not None and self._quota.limit_bytes is not None):
            return
        if (self._flattening is not None and not self._flattening.done()) or self._stop_flattening.is_set():
            return
        assert self._dir is not None
        session_dir, page_size, stop = self._dir, self._page_size, self._stop_flattening

        def run() -> object:
            try:
                return flatten_round(session_dir, round_no, page_size, stop=stop)
            except FlattenStopped:
                log.info("flattening round %d given up: the final round began dir=%s", round_no, session_dir)
                return None
            except (OSError, ImageError) as err:
                # Derived data: without it restore reads the whole chain.
                log.warning("flattening round %d failed (restore will read the chain) dir=%s: %s", round_no,
                            session_dir, err)
                return None

        self._flattening = asyncio.ensure_future(asyncio.to_thread(run))

    @property
    def directory(self) -> Path | None:
        return self._dir

    @property
    def finished(self) -> bool:
        return self._finished

    @classmethod
    def recover(cls, images_dir: Path, session_id: str, token: str, peer: str, *,
                limits: SessionLimits | None = None, metrics: ReceiverMetrics | None = None,
                quota: DiskQuota | None = None, fds: FdBudget | None = None,
                identity: str = "") -> ReceiverSession | None:
        """Take back a session from disk after a receiver restart, at its last committed round.

        ``session_id`` comes from the peer, so it must name a plain directory entry (no path
        separators, no dot files); None when there is nothing to resume or the token is wrong.
        """
        if not plain_session_id(session_id):
            return None
        path = images_dir / session_id
        try:
            doc = json.loads((path / "session.json").read_text())
            saved = (path / TOKEN_FILE).read_text()
        except (OSError, ValueError):
            return None
        if (not hmac.compare_digest(saved.encode(), token.encode())
                or not hmac.compare_digest(str(doc.get("client_identity", "")).encode(), identity.encode())
                or doc.get("complete")):
            return None
        self = cls(images_dir, peer, limits, metrics, quota, fds=fds, identity=identity)
        self._dir = path
        self._open = pb.SessionOpen(protocol_version=PROTOCOL_VERSION, pid=int(doc["pid"]),
                                    page_size=int(doc["page_size"]), comm=str(doc.get("comm", "")),
                                    source_host=str(doc.get("source_host", "")),
                                    tracker=tracker_wire(doc["tracker"]) if doc["tracker"] in TRACKER_NAMES.values()
                                    else pb.TRACKER_NONE)
        self._page_size, self._pid, self._token = int(doc["page_size"]), int(doc["pid"]), saved
        self._summary = SessionSummary(session_id=session_id, pid=self._pid, rounds=list(doc["rounds"]))
        self._marks = [(int(a), int(b)) for a, b in doc.get("round_marks", [])]
        self._next_round = len(self._summary.rounds)
        self._seq, self._handled = self._marks[-1] if self._marks else (0, 0)
        for leftover in path.glob(".round-*"):  # the open round died with the old receiver
            freed = sum(p.stat().st_size for p in leftover.glob("pages-*.img"))
            shutil.rmtree(leftover, ignore_errors=True)
            if quota is not None:  # counted at the receiver's start
                quota.give_back(freed)
        stats_file = path / "stats.json"
        if stats_file.exists():
            with contextlib.suppress(OSError, ValueError):
                self._round_stats = list(json.loads(stats_file.read_text()).get("rounds", []))
        log.info("session recovered session=%s next_round=%d seq=%d handled=%d",
                 session_id, self._next_round, self._seq, self._handled)
        return self

    def restarted(self) -> pb.ReceiverMessage:
        """The reply to a resume after recovery: send round ``next_round`` again (with a new token)."""
        self._rotate_token()
        return pb.ReceiverMessage(accepted=pb.SessionAccepted(
            session_id=self.session_id, protocol_version=PROTOCOL_VERSION,
            max_batch_bytes=self._limits.max_batch_bytes, resume_token=self._token, handled=self._handled,
            round_restarted=True, next_round=self._next_round, last_seq=self._seq))

    @property
    def session_id(self) -> str:
        return self._summary.session_id

    @property
    def handled(self) -> int:
        return self._handled

    def token_ok(self, token: str, identity: str = "") -> bool:
        return (bool(self._token) and hmac.compare_digest(token.encode(), self._token.encode())
                and hmac.compare_digest(identity.encode(), self._identity.encode()))

    def _rotate_token(self) -> None:
        """Each token resumes once: the reply to a resume carries the next one."""
        assert self._dir is not None
        self._token = secrets.token_urlsafe(24)
        tmp = self._dir / f".{TOKEN_FILE}.tmp"
        tmp.unlink(missing_ok=True)
        _write_private(tmp, self._token)
        tmp.replace(self._dir / TOKEN_FILE)

    def resumed(self) -> pb.ReceiverMessage:
        """The reply to a resume on a session still in memory: continue after ``handled`` (with a
        new token)."""
        self._rotate_token()
        return pb.ReceiverMessage(accepted=pb.SessionAccepted(
            session_id=self.session_id, protocol_version=PROTOCOL_VERSION,
            max_batch_bytes=self._limits.max_batch_bytes, resume_token=self._token, handled=self._handled))

    async def run(self, msg: pb.SenderMessage | BatchFrame) -> list[pb.ReceiverMessage]:
        """:meth:`handle` as a task that finishes even if the caller is cancelled (connection
        lost): a message is handled wholly or not at all. :meth:`idle` waits for it."""
        task = asyncio.ensure_future(self.handle(msg))
        self._inflight = task
        return await asyncio.shield(task)

    async def idle(self) -> None:
        """Wait until the message in flight when a connection broke has been handled."""
        task, self._inflight = self._inflight, None
        if task is not None:
            await task

    async def handle(self, msg: pb.SenderMessage | BatchFrame) -> list[pb.ReceiverMessage]:
        """Handle one message; the caller must not run two at once (see ``receiver.registry``).
        A batch may come as a ``BatchFrame`` (its payload a view into the received bytes)."""
        if isinstance(msg, pb.SenderMessage) and msg.WhichOneof("msg") == "batch":
            msg = BatchFrame(msg.batch, msg.batch.payload)
        kind = "batch" if isinstance(msg, BatchFrame) else msg.WhichOneof("msg")
        if kind is None:
            raise ProtocolError("empty message")
        if self._open is None and kind != "open":
            raise ProtocolError(f"first message must be 'open', got {kind!r}")
        if kind == "open":
            assert isinstance(msg, pb.SenderMessage)
            return [self._on_open(msg.open)]
        if kind == "resume":
            raise ProtocolError("resume inside a session")
        replies = await self._dispatch(kind, msg)
        self._handled += 1
        return [*replies, pb.ReceiverMessage(ack=pb.Ack(received_seq=self._seq, handled=self._handled))]

    async def _dispatch(self, kind: str, msg: pb.SenderMessage | BatchFrame) -> list[pb.ReceiverMessage]:
        if isinstance(msg, BatchFrame):
            if self._finished:
                raise ProtocolError("message 'batch' after the final round was committed")
            await self._on_batch(msg.batch, msg.payload)
            return []
        if self._finished:
            if kind == "stats" and not self._got_stats:
                self._got_stats = True
                await asyncio.to_thread(self._write_stats, msg.stats)
                return []
            raise ProtocolError(f"message {kind!r} after the final round was committed")
        if kind == "round_begin":
            self._on_round_begin(msg.round_begin)
            return []
        if kind == "holes":
            self._on_holes(msg.holes)
            return []
        if kind == "round_end":
            return [await self._on_round_end(msg.round_end)]
        raise ProtocolError(f"unexpected message {kind!r}")

    def suspend(self) -> None:
        """Receiver shutting down: drop the open round, keep the session resumable from disk."""
        self._drop_round()

    def _drop_round(self) -> None:
        if self._round is not None:
            self._round.writer.abort()
            self._fds.give_back(self._round.fds)
            self._bytes_written -= self._round.bytes_charged
            if self._quota is not None:
                self._quota.give_back(self._round.bytes_charged)
            self._round = None

    def abort(self) -> None:
        """Drop the open round (nothing of it stays visible); keep committed rounds.

        A session that committed nothing leaves no directory behind.
        """
        self._drop_round()
        if self._dir is not None:  # an aborted session cannot be resumed
            (self._dir / TOKEN_FILE).unlink(missing_ok=True)
        if self._dir is not None and not self._summary.rounds:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    # -- message handlers -------------------------------------------------------------------

    def _on_open(self, m: pb.SessionOpen) -> pb.ReceiverMessage:
        if self._open is not None:
            raise ProtocolError("session already open")
        if m.protocol_version != PROTOCOL_VERSION:
            raise ProtocolError(f"protocol version {m.protocol_version} not supported (want {PROTOCOL_VERSION})")
        ps = m.page_size
        if not (MIN_PAGE_SIZE <= ps <= MAX_PAGE_SIZE) or ps & (ps - 1):
            raise ProtocolError(f"page size {ps} is not a power of two between 4 KiB and 64 KiB")
        if not 0 < m.pid < 1 << 22:
            raise ProtocolError(f"pid {m.pid} out of range")
        if m.tracker not in TRACKER_NAMES:
            raise ProtocolError(f"unknown tracker {m.tracker}")
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        session_id = f"pid{m.pid}-{stamp}-{secrets.token_hex(3)}"
        path = self._images_dir / session_id
        path.mkdir(mode=0o700)
        self._dir, self._open, self._page_size, self._pid = path, m, ps, m.pid
        self._summary = SessionSummary(session_id=session_id, pid=m.pid)
        self._token = secrets.token_urlsafe(24)
        _write_private(path / TOKEN_FILE, self._token)
        self._write_manifest()  # from now on a restarted receiver can take the session back
        log.info("session open session=%s pid=%d comm=%s peer=%s tracker=%s",
                 session_id, m.pid, m.comm, self._peer, TRACKER_NAMES[m.tracker])
        return pb.ReceiverMessage(accepted=pb.SessionAccepted(
            session_id=session_id, protocol_version=PROTOCOL_VERSION,
            max_batch_bytes=self._limits.max_batch_bytes, resume_token=self._token))

    def _on_round_begin(self, m: pb.RoundBegin) -> None:
        assert self._dir is not None
        if self._round is not None:
            raise ProtocolError(f"round {m.round} begins while round {self._round.number} is open")
        if m.round != self._next_round:
            raise ProtocolError(f"round {m.round} out of order (expected {self._next_round})")
        if m.images:
            declared = [(im.kind, im.id, im.vmas) for im in m.images]
            if m.vmas:
                raise ProtocolError(f"round {m.round} declares both VMAs and images")
            if len(declared) > MAX_IMAGES:
                raise ProtocolError(f"round {m.round} declares {len(declared)} images (max {MAX_IMAGES})")
        else:
            declared = [(pb.IMAGE_KIND_PROCESS, self._pid, m.vmas)]
        total_vmas = sum(len(vmas) for _, _, vmas in declared)
        if not 0 < total_vmas <= self._limits.max_vmas:
            raise ProtocolError(f"round {m.round} declares {total_vmas} VMAs (1..{self._limits.max_vmas})")
        if declared[0][0] != pb.IMAGE_KIND_PROCESS:
            raise ProtocolError(f"round {m.round}: the first image must be a process")
        keys: set[codec.ImageKey] = set()
        parsed: list[tuple[codec.ImageKey, npt.NDArray[np.uint64], npt.NDArray[np.uint64]]] = []
        for kind, image_id, vmas in declared:
            if kind == pb.IMAGE_KIND_PROCESS:
                if not 0 < image_id < 1 << 22:
                    raise ProtocolError(f"round {m.round}: process image id {image_id} out of range")
                key = codec.ImageKey("pid", image_id)
            elif kind == pb.IMAGE_KIND_SHMEM:
                if not 0 <= image_id < 1 << 63:  # a SysV segment's inode is its id, 0 included
                    raise ProtocolError(f"round {m.round}: shared-memory image id {image_id} out of range")
                key = codec.ImageKey("shmem", image_id)
            else:
                raise ProtocolError(f"round {m.round}: unknown image kind {kind}")
            if key in keys:
                raise ProtocolError(f"round {m.round}: image {key.kind} {key.id} declared twice")
            keys.add(key)
            if not vmas:
                raise ProtocolError(f"round {m.round}: image {key.kind} {key.id} declares no VMAs")
            parsed.append((key, *self._vma_union(vmas)))
        parent = store.parent_link(m.round)
        fds = FDS_PER_IMAGE * len(parsed)
        self._fds.take(fds, f"round {m.round} with {len(parsed)} images")
        try:
            writer, imgs = self._writers(m.round, parent, parsed)
        except BaseException:
            self._fds.give_back(fds)
            raise
        self._round = _Round(m.round, m.frozen, writer, imgs, m.dump_uptime_us, fds=fds)
        if m.frozen:
            # The source is frozen now: the final round and the restore need the CPU and the disk
            # more than a flat image that would not be complete in time (restore uses an older one).
            self._stop_flattening.set()

    def _writers(self, round_no: int, parent: str | None,
                 parsed: list[tuple[codec.ImageKey, npt.NDArray[np.uint64], npt.NDArray[np.uint64]]]
                 ) -> tuple[store.RoundWriter, list[_Image]]:
        assert self._dir is not None
        writer = store.RoundWriter(self._dir, round_no, self._page_size, parent)
        try:
            imgs = [_Image(key, starts, ends, writer.image(key, parent_cover=self._covers.get(key)))
                    for key, starts, ends in parsed]
        except BaseException:
            writer.abort()
            raise
        return writer, imgs

    def _vma_union(self, vmas: Sequence[pb.Vma]) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
        starts = np.fromiter((v.start for v in vmas), np.uint64, len(vmas))
        ends = np.fromiter((v.end for v in vmas), np.uint64, len(vmas))
        ps = np.uint64(self._page_size)
        if np.any(starts % ps) or np.any(ends % ps) or np.any(ends <= starts):
            raise ProtocolError("a VMA is empty or not page aligned")
        if np.any(starts[1:] < ends[:-1]):
            raise ProtocolError("VMAs are not sorted and disjoint")
        # Runs may span VMAs that touch (the kernel reports adjacent mappings separately), so
        # containment is checked against the union of the VMAs.
        touching = np.flatnonzero(starts[1:] == ends[:-1])
        keep = np.ones(starts.size, bool)
        keep[touching + 1] = False
        last = np.concatenate((np.flatnonzero(keep)[1:] - 1, [starts.size - 1]))
        return starts[keep], ends[last]

    def _image(self, rnd: _Round, index: int, what: str) -> _Image:
        if index >= len(rnd.parts):
            raise ProtocolError(f"{what}: image {index} not declared in round {rnd.number}")
        return rnd.parts[index]

    def _runs(self, vaddr: list[int] | object, nr_pages: object, what: str, image: _Image) -> Runs:
        v = np.asarray(vaddr, dtype=np.uint64)
        n = np.asarray(nr_pages, dtype=np.uint64)
        if v.shape != n.shape or v.size == 0:
            raise ProtocolError(f"{what}: vaddr and nr_pages must be non-empty and of equal length")
        if v.size > self._limits.max_runs_per_message:
            raise ProtocolError(f"{what}: {v.size} runs (max {self._limits.max_runs_per_message})")
        ps = np.uint64(self._page_size)
        if np.any(v % ps) or np.any(n == 0) or np.any(n > np.uint64(1 << 40)):
            raise ProtocolError(f"{what}: a run is empty or not page aligned")
        end = v + n * ps
        if np.any(end <= v):
            raise ProtocolError(f"{what}: a run wraps around the address space")
        idx = np.searchsorted(image.vma_starts, v, side="right").astype(np.int64) - 1
        bad = (idx < 0) | (end > image.vma_ends[np.maximum(idx, 0)])
        if np.any(bad):
            first = int(v[np.flatnonzero(bad)[0]])
            raise ProtocolError(f"{what}: run at {first:#x} is not inside a declared VMA")
        return Runs(v, n)

    def _take_seq(self, seq: int, what: str) -> None:
        if seq != self._seq + 1:
            raise ProtocolError(f"{what}: sequence number {seq}, expected {self._seq + 1}")
        self._seq = seq

    async def _on_batch(self, m: pb.PageBatch, payload: bytes | memoryview) -> None:
        rnd = self._require_round("batch")
        self._take_seq(m.seq, "batch")
        image = self._image(rnd, m.image, f"batch {m.seq}")
        runs = self._runs(m.vaddr, m.nr_pages, f"batch {m.seq}", image)
        raw_len = runs.total_pages * self._page_size
        if raw_len > self._limits.max_batch_bytes:
            raise ProtocolError(f"batch {m.seq}: {raw_len} bytes exceed the limit of {self._limits.max_batch_bytes}")
        first = int(runs.vaddr[0])
        if first < image.data_end or not runs.is_sorted_disjoint(self._page_size):
            raise ProtocolError(f"batch {m.seq}: page data at {first:#x} does not ascend")
        lim = self._limits.max_session_bytes
        if lim is not None and self._bytes_written + raw_len > lim:
            raise QuotaExceeded(f"session quota of {lim} bytes reached ({self._bytes_written} written)")
        if self._quota is not None:
            self._quota.take(raw_len)
        rnd.bytes_charged += raw_len

        def decode_and_write() -> None:  # one trip to a thread per batch: each wakes the loop
            image.writer.append_pages(runs, self._decode_payload(m, payload, raw_len))

        try:
            await asyncio.to_thread(decode_and_write)
        except BaseException:
            if self._quota is not None:  # charged only for what is written
                self._quota.give_back(raw_len)
            rnd.bytes_charged -= raw_len
            raise
        self._bytes_written += raw_len
        image.data_end = int(runs.ends(self._page_size)[-1])
        image.pages_covered += runs.total_pages
        if self._metrics is not None:
            self._metrics.pages.labels("data").inc(runs.total_pages)
            self._metrics.bytes.inc(len(payload))

    def _decode_payload(self, m: pb.PageBatch, payload: bytes | memoryview, raw_len: int) -> bytes | memoryview:
        if m.compression == pb.COMPRESSION_NONE:
            data: bytes | memoryview = payload
        elif m.compression == pb.COMPRESSION_ZSTD:
            try:
                declared = zstandard.frame_content_size(payload)
            except zstandard.ZstdError as err:
                raise IntegrityError(f"batch {m.seq}: corrupt zstd frame: {err}") from err
            if declared != raw_len:
                raise IntegrityError(f"batch {m.seq}: zstd frame declares {declared} bytes, runs declare {raw_len}")
            try:
                # One shot into a buffer of the declared size: a frame with a window descriptor
                # (not single-segment) may carry blocks past its declared size, and a streaming
                # decoder would produce them all before noticing; here they fail at the buffer's end.
                data = self._decompressor.decompress(payload, allow_extra_data=False)
            except zstandard.ZstdError as err:
                raise IntegrityError(f"batch {m.seq}: {self._zstd_failure(payload, raw_len, err)}") from err
        else:
            raise ProtocolError(f"batch {m.seq}: unknown compression {m.compression}")
        if len(data) != raw_len:
            raise IntegrityError(f"batch {m.seq}: payload holds {len(data)} bytes, runs declare {raw_len}")
        if xxhash.xxh3_64_intdigest(data) != m.xxh3_64:
            raise IntegrityError(f"batch {m.seq}: xxh3_64 checksum mismatch")
        return data

    def _zstd_failure(self, payload: bytes | memoryview, raw_len: int, err: zstandard.ZstdError) -> str:
        """Why a frame declaring ``raw_len`` bytes did not decode (the refusal's reason). Every
        decoder here writes into a bounded buffer, so a bomb costs no more than ``raw_len``."""
        try:
            self._decompressor.decompress(payload)  # bytes after the frame allowed this time
        except zstandard.ZstdError:
            pass
        else:  # the frame alone decodes to exactly raw_len, so this decoder stops there
            dobj = self._decompressor.decompressobj()
            dobj.decompress(payload)
            return f"{len(dobj.unused_data)} bytes after the zstd frame"
        reader = self._decompressor.stream_reader(payload, read_across_frames=False)
        try:
            reader.read(raw_len + 1)
        except zstandard.ZstdError as again:
            return f"corrupt zstd frame: {again}"
        # The reader stops without an error where the input ends inside the frame.
        return f"truncated zstd frame ({err})"

    def _on_holes(self, m: pb.Holes) -> None:
        rnd = self._require_round("holes")
        self._take_seq(m.seq, "holes")
        image = self._image(rnd, m.image, f"holes {m.seq}")
        runs = self._runs(m.vaddr, m.nr_pages, f"holes {m.seq}", image).sorted()
        if not runs.is_sorted_disjoint(self._page_size):
            raise ProtocolError(f"holes {m.seq}: runs overlap")
        # Holes are held in memory until the round commits (where overlaps between messages are
        # found): cap them by what the VMAs hold and by count, so repeats cannot pile up.
        covered = image.pages_covered + runs.total_pages
        if covered * self._page_size > image.vma_pages_bytes:
            raise ProtocolError(f"holes {m.seq}: runs cover {covered} pages of image {m.image}, more than its "
                                "declared VMAs hold (runs overlap)")
        if rnd.hole_runs + len(runs) > self._limits.max_hole_runs:
            raise LimitExceeded(f"holes {m.seq}: round {rnd.number} would hold {rnd.hole_runs + len(runs)} hole runs "
                                f"(limit {self._limits.max_hole_runs})")
        image.pages_covered = covered
        rnd.hole_runs += len(runs)
        if self._metrics is not None:
            self._metrics.pages.labels("zero" if m.kind == pb.HOLE_KIND_ZERO else "parent").inc(runs.total_pages)
        if m.kind == pb.HOLE_KIND_ZERO:
            image.writer.add_zero_runs(runs)
        elif m.kind == pb.HOLE_KIND_PARENT:
            if rnd.number == 0:
                raise ProtocolError(f"holes {m.seq}: parent holes in round 0, which has no parent")
            image.writer.add_parent_holes(runs)
        else:
            raise ProtocolError(f"holes {m.seq}: unknown hole kind {m.kind}")

    async def _on_round_end(self, m: pb.RoundEnd) -> pb.ReceiverMessage:
        rnd = self._require_round("round_end")
        assert self._dir is not None
        if m.round != rnd.number:
            raise ProtocolError(f"round_end for round {m.round} while round {rnd.number} is open")
        if m.last_seq != self._seq:
            raise ProtocolError(f"round {rnd.number} ends at sequence {m.last_seq}, received up to {self._seq}")
        inventory = codec.InventoryEntry.for_pre_dump(rnd.dump_uptime_us)
        path = await asyncio.to_thread(rnd.writer.commit, inventory)
        # Only this round's images can be the next round's parents; one it lacks has no cover.
        self._covers = rnd.writer.covers
        w = rnd.writer.stats
        self._round = None
        self._fds.give_back(rnd.fds)
        self._next_round += 1
        self._summary.rounds.append(path.name)
        if self._metrics is not None:
            self._metrics.rounds.inc()
        self._marks.append((self._seq, self._handled + 1))
        self._finished = m.final
        self._summary.complete = m.final
        self._round_stats.append({"round": rnd.number, "directory": path.name, "frozen": rnd.frozen,
                                  **_fields(m.stats)})
        await asyncio.to_thread(self._write_manifest)
        await asyncio.to_thread(self._write_stats, None)
        if m.final:  # complete: nothing left to resume
            (self._dir / TOKEN_FILE).unlink(missing_ok=True)
        else:
            self._flatten(rnd.number)
        log.info("round committed session=%s round=%d pages_written=%d pages_zero=%d "
                 "pages_skipped_parent=%d final=%s", self._summary.session_id, rnd.number,
                 w.pages_written, w.pages_zero, w.pages_skipped_parent, m.final)
        return pb.ReceiverMessage(committed=pb.RoundCommitted(
            round=rnd.number, directory=path.name, pages_written=w.pages_written,
            pages_zero=w.pages_zero, pages_skipped_parent=w.pages_skipped_parent,
            bytes_written=w.bytes_written))

    def _require_round(self, what: str) -> _Round:
        if self._round is None:
            raise ProtocolError(f"{what} outside a round")
        return self._round

    def _write_stats(self, session: pb.SessionStats | None) -> None:
        """stats.json: the sender's per-round counters and, at the end, its session totals."""
        assert self._dir is not None
        doc: dict[str, object] = {"rounds": self._round_stats}
        if session is not None:
            doc["session"] = _fields(session)
        _write_json_atomic(self._dir, "stats.json", doc)

    def _write_manifest(self) -> None:
        """session.json: what the session is and which rounds are complete (atomic replace)."""
        assert self._dir is not None
        assert self._open is not None
        doc = {
            "session_id": self._summary.session_id,
            "pid": self._pid,
            "comm": self._open.comm,
            "source_host": self._open.source_host,
            "page_size": self._page_size,
            "tracker": TRACKER_NAMES[self._open.tracker],
            "client_identity": self._identity,
            "rounds": self._summary.rounds,
            "complete": self._summary.complete,
            # [last_seq, messages handled] at the end of each committed round: lets a restarted
            # receiver take the session back at a round boundary.
            "round_marks": [list(m) for m in self._marks],
        }
        _write_json_atomic(self._dir, "session.json", doc)




def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fields(msg: Message) -> dict[str, object]:
    """A flat message's scalar fields as JSON values (numbers stay numbers, unlike proto3 JSON)."""
    return {f.name: getattr(msg, f.name) for f in msg.DESCRIPTOR.fields}


def _write_json_atomic(directory: Path, name: str, doc: object) -> None:
    """Replace ``directory/name`` with ``doc`` as JSON: written, fsynced, renamed, dir fsynced."""
    tmp = directory / f".{name}.tmp"
    with tmp.open("w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(directory / name)
    store.fsync_dir(directory)

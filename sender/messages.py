"""Every message the sender puts on the wire (pagehaul.v1 ``SenderMessage``), built in one place.

The rest of the sender works on its own types (``RoundStats``, ``RoundPart``, ``Runs``); this
module turns them into protobuf messages. Batch messages are built by the encoding workers
(``batch``), the rest on the event loop by the session (``sender.session``).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal, cast

from pagehaul import procfs
from pagehaul.codec import ImageKey
from pagehaul.runs import Runs
from pagehaul.v1 import migration_pb2 as pb
from pagehaul.wire import MAX_RUNS_PER_MESSAGE, PROTOCOL_VERSION, BatchFrame, tracker_wire

if TYPE_CHECKING:
    from sender.config import RoundStats, SendResult
    from sender.rounds import RoundPart

HoleKind = Literal["parent", "zero"]
_HOLE_KIND: dict[HoleKind, pb.HoleKind] = {"parent": pb.HOLE_KIND_PARENT, "zero": pb.HOLE_KIND_ZERO}


def session_open(pid: int, comm: str, tracker: str, page_size: int) -> pb.SenderMessage:
    return pb.SenderMessage(open=pb.SessionOpen(
        protocol_version=PROTOCOL_VERSION, pid=pid, page_size=page_size,
        tracker=tracker_wire(tracker), comm=comm, source_host=socket.gethostname()))


def vma(v: procfs.Vma) -> pb.Vma:
    return pb.Vma(start=v.start, end=v.end, prot=v.prot, kind=cast("pb.VmaKind", int(v.kind)),
                  pgoff=v.pgoff, path=v.path)


def image(part: RoundPart) -> pb.Image:
    kind = pb.IMAGE_KIND_SHMEM if part.key.kind == "shmem" else pb.IMAGE_KIND_PROCESS
    return pb.Image(kind=kind, id=part.key.id, vmas=[vma(v) for v in part.vmas],
                    pid=part.pid if part.key.kind == "pid" else 0)


def round_begin(stats: RoundStats, parts: list[RoundPart], session_pid: int) -> pb.SenderMessage:
    begin = pb.RoundBegin(round=stats.round, frozen=stats.frozen, dump_uptime_us=procfs.read_uptime_us())
    only = parts[0]
    if len(parts) == 1 and only.key == ImageKey("pid", session_pid):
        begin.vmas.extend(vma(v) for v in only.vmas)  # one process: the original encoding
    else:
        begin.images.extend(image(p) for p in parts)
    return pb.SenderMessage(round_begin=begin)


def round_stats(stats: RoundStats) -> pb.RoundStats:
    return pb.RoundStats(
        pages_scanned=stats.pages_scanned, pages_skipped_parent=stats.pages_skipped_parent,
        pages_written=stats.pages_written, pages_zero=stats.pages_zero, dirty_pages=stats.dirty_pages,
        wire_bytes=stats.wire_bytes, memdump_time_us=stats.memdump_time_us,
        tracker_time_us=stats.tracker_time_us, freezing_time_us=stats.freezing_time_us)


def round_end(stats: RoundStats, last_seq: int, final: bool) -> pb.SenderMessage:
    return pb.SenderMessage(round_end=pb.RoundEnd(round=stats.round, last_seq=last_seq, final=final,
                                                  stats=round_stats(stats)))


def hole_chunks(runs: Runs) -> Iterator[Runs]:
    """``runs`` in pieces of at most the runs one Holes message may carry."""
    n = MAX_RUNS_PER_MESSAGE
    for i in range(0, len(runs), n):
        yield Runs(runs.vaddr[i:i + n], runs.nr_pages[i:i + n])


def holes(seq: int, kind: HoleKind, runs: Runs, image_index: int) -> pb.SenderMessage:
    """One Holes message; ``runs`` at most MAX_RUNS_PER_MESSAGE long (``hole_chunks``)."""
    return pb.SenderMessage(holes=pb.Holes(seq=seq, kind=_HOLE_KIND[kind], vaddr=runs.vaddr.tolist(),
                                           nr_pages=runs.nr_pages.tolist(), image=image_index))


def batch(runs: Runs, payload: bytes, *, zstd: bool, xxh3_64: int) -> BatchFrame:
    """A batch of data pages (``runs``, in run order in ``payload``); its seq and image are set
    when it goes on the wire (``numbered``). The payload stays out of protobuf (``BatchFrame``):
    setting a bytes field copies it, and serializing the message copies it again."""
    msg = pb.PageBatch()
    msg.vaddr.extend(runs.vaddr.tolist())
    msg.nr_pages.extend(runs.nr_pages.tolist())
    msg.compression = pb.COMPRESSION_ZSTD if zstd else pb.COMPRESSION_NONE
    msg.xxh3_64 = xxh3_64
    return BatchFrame(msg, payload)


def numbered(frame: BatchFrame, seq: int, image_index: int) -> BatchFrame:
    """A batch with its place in the session: sent as is, without a copy of the payload."""
    frame.batch.seq = seq
    frame.batch.image = image_index
    return frame


def batch_runs(frame: BatchFrame) -> Runs:
    return Runs.of(frame.batch.vaddr, frame.batch.nr_pages)


def session_stats(result: SendResult) -> pb.SenderMessage:
    return pb.SenderMessage(stats=pb.SessionStats(
        frozen_time_us=result.frozen_time_us, total_time_us=result.total_time_us, converged=result.converged,
        stop_reason=result.stop_reason, left_stopped=result.left_stopped))


def resume(session_id: str, token: str) -> pb.SenderMessage:
    return pb.SenderMessage(resume=pb.Resume(session_id=session_id, resume_token=token))


def abandon(reason: str) -> pb.SenderMessage:
    return pb.SenderMessage(abandon=pb.Abandon(reason=reason[:1000]))

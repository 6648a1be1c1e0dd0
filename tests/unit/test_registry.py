"""The session registry driven without any transport, as a second transport's adapter would drive
it (receiver/registry.py's contract): open, handle, close or fail per stream, resume elsewhere."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import xxhash

from pagehaul.errors import ProtocolError
from pagehaul.v1 import migration_pb2 as pb
from pagehaul.wire import PROTOCOL_VERSION
from receiver.config import ReceiverConfig
from receiver.registry import ResumeRefused, SessionAbandoned, SessionLimitError, SessionRegistry, SessionStream

PS = 4096
VMA_START = 0x10000


def open_msg() -> pb.SenderMessage:
    return pb.SenderMessage(open=pb.SessionOpen(protocol_version=PROTOCOL_VERSION, pid=300, page_size=PS,
                                                tracker=pb.TRACKER_HASH))


def begin(round_no: int = 0) -> pb.SenderMessage:
    vma = pb.Vma(start=VMA_START, end=VMA_START + 4 * PS, prot=3, kind=pb.VMA_KIND_ANON)
    return pb.SenderMessage(round_begin=pb.RoundBegin(round=round_no, vmas=[vma], dump_uptime_us=1))


def batch(seq: int, page: int) -> pb.SenderMessage:
    data = bytes([seq]) * PS
    return pb.SenderMessage(batch=pb.PageBatch(seq=seq, vaddr=[VMA_START + page * PS], nr_pages=[1],
                                               compression=pb.COMPRESSION_NONE, payload=data,
                                               xxh3_64=xxhash.xxh3_64_intdigest(data)))


def end(round_no: int, last_seq: int, *, final: bool = False) -> pb.SenderMessage:
    return pb.SenderMessage(round_end=pb.RoundEnd(round=round_no, last_seq=last_seq, final=final))


def resume(session_id: str, token: str) -> pb.SenderMessage:
    return pb.SenderMessage(resume=pb.Resume(session_id=session_id, resume_token=token))


def test_the_transport_free_modules_import_no_grpc() -> None:
    code = ("import sys, receiver.registry, receiver.session, receiver.restore, receiver.assemble; "
            "print(sorted(m for m in sys.modules if m.partition('.')[0] == 'grpc'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[SessionRegistry]:
    reg = SessionRegistry(ReceiverConfig(images_dir=tmp_path / "images", max_sessions=2))
    await reg.start()
    yield reg
    await reg.stop()


async def opened(registry: SessionRegistry, identity: str = "") -> tuple[SessionStream, pb.SessionAccepted]:
    stream = registry.connect("test", identity)
    reply = await stream.open(open_msg())
    return stream, reply.accepted


async def test_a_stream_ending_early_detaches_and_another_resumes(registry: SessionRegistry) -> None:
    first, accepted = await opened(registry)
    await first.handle(begin())
    await first.handle(batch(1, 0))
    assert first.close(), "an unfinished session is kept for a resume"
    assert registry.detached == [accepted.session_id]
    assert not first.close(), "a second close does nothing"

    second = registry.connect("test", "")
    resumed = (await second.open(resume(accepted.session_id, accepted.resume_token))).accepted
    assert resumed.handled == 2
    assert resumed.resume_token != accepted.resume_token
    assert registry.detached == []
    assert await first.handle(batch(2, 1)) is None, "the old stream no longer drives the session"
    assert not first.close()
    replies = await second.handle(end(0, 1, final=True))
    assert replies is not None
    assert replies[0].committed.round == 0
    assert not second.close(), "a finished session is forgotten, not kept"
    assert registry.detached == []
    with pytest.raises(ResumeRefused):
        await registry.connect("test", "").open(resume(accepted.session_id, resumed.resume_token))


async def test_resume_needs_the_current_token_and_the_same_identity(registry: SessionRegistry) -> None:
    stream, accepted = await opened(registry, identity="client-a")
    stream.close()
    for token, identity in [("wrong", "client-a"), (accepted.resume_token, "client-b")]:
        with pytest.raises(ResumeRefused):
            await registry.connect("test", identity).open(resume(accepted.session_id, token))
    await registry.connect("test", "client-a").open(resume(accepted.session_id, accepted.resume_token))


async def test_a_failed_stream_discards_its_session(registry: SessionRegistry, tmp_path: Path) -> None:
    stream, accepted = await opened(registry)
    await stream.handle(begin())
    with pytest.raises(ProtocolError):
        await stream.handle(batch(2, 0))  # a sequence gap
    assert stream.fail(ProtocolError("sequence gap"))
    assert not stream.close()
    assert registry.detached == []
    assert not (tmp_path / "images" / accepted.session_id).exists(), "it committed nothing"
    with pytest.raises(ResumeRefused):
        await registry.connect("test", "").open(resume(accepted.session_id, accepted.resume_token))


async def test_abandon_is_refused_like_a_failure(registry: SessionRegistry) -> None:
    stream, _ = await opened(registry)
    with pytest.raises(SessionAbandoned):
        await stream.handle(pb.SenderMessage(abandon=pb.Abandon(reason="gave up")))


async def test_a_detached_session_gives_way_when_the_registry_is_full(registry: SessionRegistry) -> None:
    first, accepted = await opened(registry)
    first.close()
    await opened(registry)  # two sessions: the limit
    await opened(registry)  # the detached one gave way
    with pytest.raises(ResumeRefused):
        await registry.connect("test", "").open(resume(accepted.session_id, accepted.resume_token))
    with pytest.raises(SessionLimitError):
        await opened(registry)


async def test_a_detached_session_expires_after_the_resume_window(tmp_path: Path) -> None:
    registry = SessionRegistry(ReceiverConfig(images_dir=tmp_path, resume_window_s=0.0))
    await registry.start()
    stream, accepted = await opened(registry)
    stream.close()
    assert registry.detached == [accepted.session_id]
    for _ in range(100):  # the expiry timer runs on the next loop iterations
        if not registry.detached:
            break
        await asyncio.sleep(0)
    assert registry.detached == []
    assert not (tmp_path / accepted.session_id).exists()
    await registry.stop()


async def test_streams_ending_while_stopping_leave_the_session_on_disk(registry: SessionRegistry,
                                                                      tmp_path: Path) -> None:
    stream, accepted = await opened(registry)
    await stream.handle(begin())
    await stream.handle(batch(1, 0))
    await stream.handle(end(0, 1))
    registry.begin_stop()
    assert not stream.fail(ConnectionError("server stopped")), "a shutdown is not the session's failure"
    stream.close()
    await registry.stop()
    assert registry.detached == []
    assert (tmp_path / "images" / accepted.session_id / ".resume-token").exists()

"""The receiver's Restore RPC against bad and hostile requests, on a real gRPC server (127.0.0.1:0).

Each refusal must come back as a status with a reason, write nothing outside the session's
``restore-N`` directory, and leave the receiver serving. criu is ``/bin/false`` here: the one
well-formed request reaches it and must come back as ABORTED with criu's failure. A real restore
is in test_full_migration.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import grpc
import pytest

from pagehaul.codec import PE_PRESENT, PagemapEntry, encode_pagemap
from pagehaul.security import Security
from pagehaul.v1 import restore_pb2 as rpb
from pagehaul.wire import RESTORE_METHOD_PATH
from receiver.config import ReceiverConfig
from receiver.grpc_server import Receiver
from receiver.restore import RestoreConfig

SID = "pid42-20261122T000000-abcdef"
TOKEN = "s3cret"  # noqa: S105 -- a test token


def make_session(images: Path, sid: str = SID, complete: bool = True) -> Path:
    s = images / sid
    (s / "round-0").mkdir(parents=True)
    (s / "round-0" / "pagemap-1.img").write_bytes(encode_pagemap(1, [PagemapEntry(0x1000, 1, PE_PRESENT)]))
    (s / "round-0" / "pages-1.img").write_bytes(b"\1" * 4096)
    (s / "session.json").write_text(json.dumps({"session_id": sid, "complete": complete}))
    return s


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Receiver]:
    r = Receiver(ReceiverConfig(images_dir=tmp_path / "images", listen="127.0.0.1:0",
                                restore=RestoreConfig(Path("/bin/false"), max_bytes=1 << 20),
                                security=Security(insecure=True, token=TOKEN)))
    await r.start()
    try:
        yield r
    finally:
        await r.stop(0)


def begin(sid: str = SID, total: int = 100) -> rpb.RestoreRequest:
    return rpb.RestoreRequest(begin=rpb.RestoreBegin(session_id=sid, total_bytes=total,
                                                     tasks=[rpb.TaskPid(host_pid=42, vpid=1)]))


def chunk(name: str, data: bytes, last: bool = True) -> rpb.RestoreRequest:
    return rpb.RestoreRequest(file_chunk=rpb.FileChunk(name=name, data=data, last=last))


END = rpb.RestoreRequest(end=rpb.RestoreEnd())


async def call(address: str, requests: Iterable[rpb.RestoreRequest], token: str = TOKEN) -> grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(address) as channel:
        rpc = channel.stream_unary(RESTORE_METHOD_PATH, request_serializer=rpb.RestoreRequest.SerializeToString,
                                   response_deserializer=rpb.RestoreReply.FromString)

        async def gen() -> AsyncIterator[rpb.RestoreRequest]:
            for r in requests:
                yield r

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await rpc(gen(), metadata=Security(insecure=True, token=token).token_metadata(), timeout=30)
        return info.value


def outside_restore(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if "restore-" not in str(p))


CASES = {
    "no-begin": ([chunk("core-1.img", b"x"), END], grpc.StatusCode.INVALID_ARGUMENT, "starts with begin"),
    "path-in-session-id": ([begin("../" + SID), END], grpc.StatusCode.INVALID_ARGUMENT, "bad session id"),
    "unknown-session": ([begin("pid1-nope"), END], grpc.StatusCode.NOT_FOUND, "no session"),
    "too-big": ([begin(total=2 << 20), END], grpc.StatusCode.RESOURCE_EXHAUSTED, "exceed"),
    "path-as-file-name": ([begin(), chunk("../../escape.img", b"x"), END], grpc.StatusCode.INVALID_ARGUMENT,
                          "not a CRIU image name"),
    "not-an-image-name": ([begin(), chunk("core-1", b"x"), END], grpc.StatusCode.INVALID_ARGUMENT,
                          "not a CRIU image name"),
    "more-than-declared": ([begin(total=3), chunk("core-1.img", b"xxxx"), END], grpc.StatusCode.INVALID_ARGUMENT,
                           "more image bytes"),
    "file-twice": ([begin(), chunk("core-1.img", b"x"), chunk("core-1.img", b"y"), END],
                   grpc.StatusCode.INVALID_ARGUMENT, "sent twice"),
    "interleaved": ([begin(), chunk("a.img", b"x", last=False), chunk("b.img", b"y"), END],
                    grpc.StatusCode.INVALID_ARGUMENT, "starts before"),
    "unfinished-file": ([begin(), chunk("a.img", b"x", last=False), END], grpc.StatusCode.INVALID_ARGUMENT,
                        "without its last chunk"),
    "no-end": ([begin(), chunk("a.img", b"x")], grpc.StatusCode.INVALID_ARGUMENT, "without end"),
    "criu-fails": ([begin(), chunk("core-1.img", b"x"), END], grpc.StatusCode.ABORTED, "criu restore failed"),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_bad_restores_are_refused_with_a_reason(server: Receiver, tmp_path: Path, case: str) -> None:
    session = make_session(tmp_path / "images")
    before = outside_restore(tmp_path)
    requests, code, reason = CASES[case]
    err = await call(server.address, requests)
    assert err.code() == code, err.details()
    assert reason in (err.details() or "")
    assert outside_restore(tmp_path) == before, "nothing written outside restore-N"
    assert not (tmp_path / "escape.img").exists()
    assert (session / "round-0" / "pages-1.img").read_bytes() == b"\1" * 4096
    # The receiver still serves: the next request gets its own answer.
    again = await call(server.address, [begin("pid1-nope"), END])
    assert again.code() == grpc.StatusCode.NOT_FOUND


async def test_incomplete_session_and_wrong_token(server: Receiver, tmp_path: Path) -> None:
    make_session(tmp_path / "images", "pid7-incomplete", complete=False)
    err = await call(server.address, [begin("pid7-incomplete"), END])
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    make_session(tmp_path / "images")
    err = await call(server.address, [begin(), END], token=TOKEN + "-wrong")
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert not any((tmp_path / "images" / SID).glob("restore-*"))


async def test_receiver_without_restore_says_unimplemented(receiver: Receiver, tmp_path: Path) -> None:
    make_session(tmp_path / "images")
    err = await call(receiver.address, [begin(), END])
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED

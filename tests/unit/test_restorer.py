"""The restore logic driven without any transport (receiver/restore.py): each refusal is its own
exception, for an adapter to map to its status codes; nothing of a refused restore stays but
criu's logs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pagehaul.errors import PagehaulError
from pagehaul.v1 import restore_pb2 as rpb
from receiver.restore import (
    NoSuchSession,
    NotRestorable,
    RestoreConfig,
    RestoreIdle,
    Restorer,
    RestoreRefused,
    RestoreTooLarge,
)

SID = "pid42-20261122T000000-abcdef"
END = rpb.RestoreRequest(end=rpb.RestoreEnd())


def session(images: Path, sid: str = SID, *, complete: bool = True) -> Path:
    path = images / sid
    (path / "round-0").mkdir(parents=True)
    (path / "session.json").write_text(json.dumps({"session_id": sid, "complete": complete}))
    return path


def begin(sid: str = SID, total: int = 100) -> rpb.RestoreRequest:
    return rpb.RestoreRequest(begin=rpb.RestoreBegin(session_id=sid, total_bytes=total))


async def feed(*requests: rpb.RestoreRequest, then_wait: bool = False) -> AsyncIterator[rpb.RestoreRequest]:
    for r in requests:
        yield r
    if then_wait:  # a client that goes silent
        await asyncio.Event().wait()


@pytest.mark.parametrize(("requests", "kind"), [
    ([END], RestoreRefused),
    ([begin("../" + SID), END], RestoreRefused),
    ([begin("pid1-nope"), END], NoSuchSession),
    ([begin("pid7-incomplete"), END], NotRestorable),
    ([begin(total=2 << 20), END], RestoreTooLarge),
    ([begin(), rpb.RestoreRequest(file_chunk=rpb.FileChunk(name="core-1", data=b"x", last=True)), END],
     RestoreRefused),
])
async def test_refusals_are_typed(tmp_path: Path, requests: list[rpb.RestoreRequest],
                                  kind: type[RestoreRefused]) -> None:
    session(tmp_path)
    session(tmp_path, "pid7-incomplete", complete=False)
    restorer = Restorer(tmp_path, RestoreConfig(Path("/bin/false"), max_bytes=1 << 20))
    with pytest.raises(kind) as info:
        await restorer.restore(feed(*requests), "test")
    assert type(info.value) is kind
    assert not any((tmp_path / SID).glob("restore-*/shipped"))


async def test_a_silent_client_ends_the_restore_and_frees_the_session(tmp_path: Path) -> None:
    session(tmp_path)
    restorer = Restorer(tmp_path, RestoreConfig(Path("/bin/false"), idle_timeout_s=0.05))
    with pytest.raises(RestoreIdle):
        await restorer.restore(feed(begin(), then_wait=True), "test")
    # Not "being restored already": the next attempt gets past begin (and fails later, there is
    # nothing to restore in this session).
    with pytest.raises(PagehaulError) as info:
        await restorer.restore(feed(begin(total=0), END), "test")
    assert not isinstance(info.value, RestoreRefused), info.value

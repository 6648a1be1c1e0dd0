"""Disk quotas on the receiver: per session and for all sessions; a session over quota is
refused with RESOURCE_EXHAUSTED, its partial round removed, and the source keeps running."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pagehaul import procfs
from pagehaul.errors import TransportError
from receiver.config import ReceiverConfig
from receiver.grpc_server import Receiver
from receiver.session import SessionLimits
from sender.config import SendConfig
from sender.precopy import send_frozen
from tests.conftest import Workload


async def start(cfg: ReceiverConfig) -> AsyncIterator[Receiver]:
    r = Receiver(cfg)
    await r.start()
    try:
        yield r
    finally:
        await r.stop(0)


def assert_nothing_partial(images: Path) -> None:
    for session in images.iterdir():
        assert not any(p.name.startswith((".round", "round-")) for p in session.iterdir()), list(session.iterdir())


def assert_running(pid: int) -> None:
    for tid in procfs.list_threads(pid):
        status = procfs.read_status(tid)
        assert status.tracer_pid == 0
        assert status.state[0] in "RS"


@pytest.fixture
async def small_session_quota(tmp_path: Path) -> AsyncIterator[Receiver]:
    async for r in start(ReceiverConfig(images_dir=tmp_path / "images",
                                        limits=SessionLimits(max_session_bytes=1 << 20))):
        yield r


@pytest.fixture
async def small_total_quota(tmp_path: Path) -> AsyncIterator[Receiver]:
    async for r in start(ReceiverConfig(images_dir=tmp_path / "images", max_total_bytes=2 << 20)):
        yield r


async def test_session_quota(small_session_quota: Receiver, workload: Workload) -> None:
    cfg = SendConfig(pid=workload.pid, target=small_session_quota.address, leave_stopped=False)
    with pytest.raises(TransportError, match="receiver out of resources: session quota of 1048576 bytes"):
        await send_frozen(cfg)
    assert_nothing_partial(small_session_quota.config.images_dir)
    assert_running(workload.pid)


async def test_total_quota(small_total_quota: Receiver, workload: Workload) -> None:
    cfg = SendConfig(pid=workload.pid, target=small_total_quota.address, leave_stopped=False)
    with pytest.raises(TransportError, match="disk quota of 2097152 bytes is used up"):
        await send_frozen(cfg)
    assert_nothing_partial(small_total_quota.config.images_dir)
    assert_running(workload.pid)

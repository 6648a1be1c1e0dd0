"""Bad input on both sides: one clear line and a documented exit code; the receiver survives.

Sender side: the real ``pagehaul send`` CLI against a missing process, a process another tool
traces, a receiver that is not there, and a receiver that refuses the data.
Receiver side: a raw gRPC client sends malformed sessions to the real receiver; each is refused
with a status code and a reason, leaves nothing visible on disk, and a valid migration into the
same receiver still succeeds afterwards.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import pytest
import xxhash
import zstandard

from pagehaul import procfs
from pagehaul.kernel import PAGE_SIZE
from pagehaul.oracle import verify_against_process
from pagehaul.security import TlsFiles, make_test_pki
from pagehaul.v1 import migration_pb2 as pb
from pagehaul.wire import CHANNEL_OPTIONS, METHOD, METHOD_PATH, PROTOCOL_VERSION, SERVICE
from receiver.grpc_server import Receiver, refuse
from sender.config import SendConfig
from sender.precopy import send_frozen
from tests.conftest import Workload, start_workload, stop_process
from tests.helpers.children import SEIZER_CHILD, spawn_python

PAGEHAUL = [sys.executable, "-m", "cli"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pki")
    make_test_pki(path)
    return path


def tls_args(pki: Path, role: str) -> list[str]:
    return ["--tls-cert", str(pki / f"{role}.crt"), "--tls-key", str(pki / f"{role}.key"),
            "--tls-ca", str(pki / "ca.crt")]


async def run_cli(*args: str) -> tuple[int, str, str]:
    """``pagehaul ARGS`` as a subprocess, without blocking the event loop the receiver runs on."""
    proc = await asyncio.create_subprocess_exec(*PAGEHAUL, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {stderr!r}"
    assert lines[0].startswith("pagehaul: error: ")
    assert "Traceback" not in stderr
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gone_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def assert_running_untraced(pid: int) -> None:
    for tid in procfs.list_threads(pid):
        status = procfs.read_status(tid)
        assert status.tracer_pid == 0
        assert status.state[0] in "RS", f"thread {tid} is {status.state}"


# --- sender side -------------------------------------------------------------------------------


async def test_send_to_missing_process(pki: Path) -> None:
    pid = gone_pid()
    code, _, err = await run_cli("send", "--pid", str(pid), "--to", f"127.0.0.1:{free_port()}",
                                 *tls_args(pki, "sender"))
    assert code == 3
    assert f"{pid}" in one_error_line(err)


async def test_send_to_traced_process(workload: Workload, pki: Path) -> None:
    with spawn_python(SEIZER_CHILD, str(workload.pid)) as tracer:
        code, _, err = await run_cli("send", "--pid", str(workload.pid), "--to", f"127.0.0.1:{free_port()}",
                                     *tls_args(pki, "sender"))
        assert code == 4
        line = one_error_line(err)
        assert f"already traced by process {tracer.pid}" in line


async def test_send_to_unreachable_receiver(workload: Workload, pki: Path) -> None:
    port = free_port()
    code, _, err = await run_cli("send", "--pid", str(workload.pid), "--to", f"127.0.0.1:{port}",
                                 "--connect-timeout", "1", *tls_args(pki, "sender"))
    assert code == 5
    assert f"cannot reach receiver at 127.0.0.1:{port}" in one_error_line(err)
    assert_running_untraced(workload.pid)


@pytest.mark.parametrize("value", [["--pid", "abc"], ["--pid", "1", "--to", "nohost"], ["--zstd-level", "x"]])
async def test_usage_errors(value: list[str]) -> None:
    code, _, err = await run_cli("send", *value)
    assert code == 2
    assert "usage:" in err
    assert "Traceback" not in err


MIGRATE_MISUSE = {
    "no-pid": (["--to", "127.0.0.1:1"], "needs --to"),
    "cgroup": (["--cgroup", "/x", "--to", "127.0.0.1:1"], "whole process tree"),
    "no-shmem": (["--pid", "1", "--no-shmem", "--to", "127.0.0.1:1"], "whole process tree"),
    "no-criu": (["--pid", "1", "--to", "127.0.0.1:1", "--criu", "/nonexistent/criu"], "cannot run criu"),
    "gone": (["--pid", "999999999", "--to", "127.0.0.1:1"], "is gone"),
}


@pytest.mark.parametrize("case", list(MIGRATE_MISUSE))
async def test_migrate_misuse_is_one_line(case: str) -> None:
    args, says = MIGRATE_MISUSE[case]
    code, _, err = await run_cli("migrate", "--insecure", "--quiet", *args)
    assert code in (2, 3), err
    assert says in err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("pagehaul: error: ")


class _RefusingReceiver:
    """A receiver double that accepts the session, then refuses the first batch the way the real
    one refuses a checksum mismatch (the same ``refuse``): the sender's reader computes correct
    checksums, so only a double can make the CLI meet DATA_LOSS end to end."""

    async def migrate(
        self, requests: AsyncIterator[pb.SenderMessage],
        context: grpc.aio.ServicerContext[pb.SenderMessage, pb.ReceiverMessage],
    ) -> AsyncIterator[pb.ReceiverMessage]:
        async for msg in requests:
            if msg.WhichOneof("msg") == "open":
                yield pb.ReceiverMessage(accepted=pb.SessionAccepted(session_id="x", protocol_version=1))
            elif msg.WhichOneof("msg") == "batch":
                reason = f"batch {msg.batch.seq}: xxh3_64 checksum mismatch"
                async for reply in refuse(requests, context, grpc.StatusCode.DATA_LOSS, reason):
                    yield reply


async def test_send_refused_by_receiver(workload: Workload, pki: Path) -> None:
    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    handler = grpc.stream_stream_rpc_method_handler(
        _RefusingReceiver().migrate, request_deserializer=pb.SenderMessage.FromString,
        response_serializer=pb.ReceiverMessage.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler}),))
    port = server.add_secure_port("127.0.0.1:0", TlsFiles(pki / "receiver.crt", pki / "receiver.key",
                                                          pki / "ca.crt").server_credentials())
    await server.start()
    try:
        code, _, err = await run_cli("send", "--pid", str(workload.pid), "--to", f"127.0.0.1:{port}",
                                     "--tracker", "none", *tls_args(pki, "sender"))
    finally:
        await server.stop(0)
    assert code == 6, err
    assert "receiver refused the data: batch 1: xxh3_64 checksum mismatch" in one_error_line(err)
    assert_running_untraced(workload.pid)


# --- receiver side -----------------------------------------------------------------------------

VMA_START = 0x7F0000000000
VMA = pb.Vma(start=VMA_START, end=VMA_START + 64 * PAGE_SIZE, prot=3, kind=pb.VMA_KIND_ANON)
PAGES = bytes(range(256)) * (4 * PAGE_SIZE // 256)  # 4 pages of data


def opening() -> list[pb.SenderMessage]:
    return [
        pb.SenderMessage(open=pb.SessionOpen(protocol_version=PROTOCOL_VERSION, pid=4242, page_size=PAGE_SIZE,
                                             tracker=pb.TRACKER_NONE, comm="test")),
        pb.SenderMessage(round_begin=pb.RoundBegin(round=0, frozen=True, vmas=[VMA], dump_uptime_us=1)),
    ]


def batch(seq: int = 1, vaddr: int = VMA_START, data: bytes = PAGES, **overrides: object) -> pb.SenderMessage:
    fields: dict[str, object] = {
        "seq": seq, "vaddr": [vaddr], "nr_pages": [len(data) // PAGE_SIZE], "compression": pb.COMPRESSION_ZSTD,
        "payload": zstandard.ZstdCompressor().compress(data), "xxh3_64": xxhash.xxh3_64_intdigest(data),
    }
    fields.update(overrides)
    return pb.SenderMessage(batch=pb.PageBatch(**fields))  # type: ignore[arg-type]


def end(last_seq: int = 1) -> pb.SenderMessage:
    return pb.SenderMessage(round_end=pb.RoundEnd(round=0, last_seq=last_seq, final=True))


async def raw_session(address: str, messages: Sequence[pb.SenderMessage]) -> tuple[grpc.StatusCode, str]:
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        call = channel.stream_stream(METHOD_PATH, request_serializer=pb.SenderMessage.SerializeToString,
                                     response_deserializer=pb.ReceiverMessage.FromString)()  # type: ignore[call-arg]
        try:
            for msg in messages:
                await call.write(msg)
            await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the receiver ended the call early; its status says why
        try:
            while isinstance(await call.read(), pb.ReceiverMessage):
                pass
        except grpc.aio.AioRpcError:
            pass
        return await call.code(), await call.details() or ""


BAD_SESSIONS: dict[str, tuple[list[pb.SenderMessage], grpc.StatusCode, str]] = {
    "truncated zstd frame": (
        [*opening(), batch(payload=zstandard.ZstdCompressor().compress(PAGES)[:-9]), end()],
        grpc.StatusCode.DATA_LOSS, "batch 1: truncated zstd frame"),
    "checksum mismatch": (
        [*opening(), batch(xxh3_64=12345), end()], grpc.StatusCode.DATA_LOSS, "batch 1: xxh3_64 checksum mismatch"),
    "payload shorter than its runs": (
        [*opening(), batch(nr_pages=[5]), end()], grpc.StatusCode.DATA_LOSS, "runs declare 20480"),
    "bytes after the zstd frame": (
        [*opening(), batch(payload=zstandard.ZstdCompressor().compress(PAGES) + b"junk"), end()],
        grpc.StatusCode.DATA_LOSS, "4 bytes after the zstd frame"),
    "frame declaring another size": (
        [*opening(), batch(nr_pages=[2]), end()], grpc.StatusCode.DATA_LOSS, "declares 16384 bytes, runs declare 8192"),
    "decompression bomb": (
        [*opening(), batch(payload=zstandard.ZstdCompressor().compress(PAGES * 64)), end()],
        grpc.StatusCode.DATA_LOSS, "batch 1"),
    "raw payload of the wrong size": (
        [*opening(), batch(compression=pb.COMPRESSION_NONE, payload=PAGES[:-1]), end()],
        grpc.StatusCode.DATA_LOSS, "payload holds 16383 bytes"),
    "run outside the VMAs": (
        [*opening(), batch(vaddr=VMA_START - PAGE_SIZE), end()], grpc.StatusCode.INVALID_ARGUMENT,
        "not inside a declared VMA"),
    "unaligned run": (
        [*opening(), batch(vaddr=VMA_START + 8), end()], grpc.StatusCode.INVALID_ARGUMENT, "not page aligned"),
    "sequence gap": (
        [*opening(), batch(seq=2), end(2)], grpc.StatusCode.INVALID_ARGUMENT, "sequence number 2, expected 1"),
    "data going backwards": (
        [*opening(), batch(vaddr=VMA_START + 8 * PAGE_SIZE), batch(seq=2), end(2)],
        grpc.StatusCode.INVALID_ARGUMENT, "does not ascend"),
    "batch before open": ([batch(), end()], grpc.StatusCode.INVALID_ARGUMENT, "first message must be 'open'"),
    "wrong protocol version": (
        [pb.SenderMessage(open=pb.SessionOpen(protocol_version=99, pid=1, page_size=PAGE_SIZE,
                                              tracker=pb.TRACKER_NONE))],
        grpc.StatusCode.INVALID_ARGUMENT, "protocol version 99"),
    "round end with missing messages": (
        [*opening(), batch(), end(last_seq=3)], grpc.StatusCode.INVALID_ARGUMENT, "ends at sequence 3"),
    "parent holes in round 0": (
        [*opening(), pb.SenderMessage(holes=pb.Holes(seq=1, kind=pb.HOLE_KIND_PARENT, vaddr=[VMA_START],
                                                     nr_pages=[1])), end()],
        grpc.StatusCode.INVALID_ARGUMENT, "no parent"),
    "overlapping zero hole": (
        [*opening(), batch(), pb.SenderMessage(holes=pb.Holes(seq=2, kind=pb.HOLE_KIND_ZERO, vaddr=[VMA_START],
                                                              nr_pages=[1])), end(2)],
        grpc.StatusCode.INVALID_ARGUMENT, "overlap"),
}


def visible_entries(images_dir: Path) -> list[str]:
    return sorted(p.name for p in images_dir.iterdir()) if images_dir.exists() else []


@pytest.mark.parametrize("case", list(BAD_SESSIONS), ids=list(BAD_SESSIONS))
async def test_receiver_refuses_bad_session(receiver: Receiver, case: str) -> None:
    messages, want_code, want_reason = BAD_SESSIONS[case]
    code, details = await raw_session(receiver.address, messages)
    assert code == want_code, details
    assert want_reason in details
    assert visible_entries(receiver.config.images_dir) == []  # nothing partial left, not even hidden


async def test_stream_ending_early_keeps_the_session_for_resume(receiver: Receiver) -> None:
    """A stream that ends before the final round looks the same as a dead connection: the
    session is kept (resumable, nothing committed, nothing visible but its directory)."""
    code, details = await raw_session(receiver.address, [*opening(), batch()])
    assert code == grpc.StatusCode.ABORTED
    assert "session kept for resume" in details
    (session,) = visible_entries(receiver.config.images_dir)
    names = sorted(p.name for p in (receiver.config.images_dir / session).iterdir())
    assert not [n for n in names if n.startswith("round-")]
    assert "session.json" in names


async def test_valid_raw_session_is_accepted(receiver: Receiver) -> None:
    code, details = await raw_session(receiver.address, [*opening(), batch(), end()])
    assert code == grpc.StatusCode.OK, details
    (session,) = visible_entries(receiver.config.images_dir)
    assert (receiver.config.images_dir / session / "round-0" / "pages-1.img").read_bytes() == PAGES


async def test_receiver_keeps_serving_after_bad_sessions(receiver: Receiver) -> None:
    for messages, _, _ in BAD_SESSIONS.values():
        await raw_session(receiver.address, messages)
    workload = start_workload(size_mib=8, mutate=True)
    try:
        cfg = SendConfig(pid=workload.pid, target=receiver.address, leave_stopped=True)
        result = await send_frozen(cfg)
        round_dir = receiver.config.images_dir / result.session_id / "round-0"
        from cli.demo import dump_ranges
        assert verify_against_process(round_dir, workload.pid, dump_ranges(workload.pid), PAGE_SIZE).ok
    finally:
        stop_process(workload.proc)

"""Hostile clients against the receiver's resource bounds (issue 13): real receiver, real gRPC on
127.0.0.1:0, real files. Each test states the bound it holds: session slots, memory, file
descriptors, disk, and who may resume a session.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import resource
import shutil
import struct
import subprocess
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Final

import grpc
import pytest
import zstandard
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cli.demo import dump_ranges
from pagehaul.kernel import PAGE_SIZE
from pagehaul.oracle import verify_against_process
from pagehaul.security import Security, TlsFiles, make_test_pki
from pagehaul.v1 import migration_pb2 as pb
from pagehaul.v1 import restore_pb2 as rpb
from pagehaul.wire import CHANNEL_OPTIONS, MAX_BATCH_BYTES, METHOD_PATH, RESTORE_METHOD_PATH
from receiver.config import ReceiverConfig
from receiver.grpc_server import Receiver
from receiver.restore import RestoreConfig
from receiver.session import SessionLimits
from sender.config import Progress, SendConfig
from sender.precopy import send
from tests.conftest import start_workload, stop_process
from tests.integration.test_bad_input import PAGES, VMA_START, batch, end, opening, raw_session
from tests.integration.test_quota import start as started
from tests.integration.test_restore_rpc import CASES as RESTORE_CASES
from tests.integration.test_restore_rpc import END, TOKEN, chunk, make_session
from tests.integration.test_restore_rpc import begin as restore_begin
from tests.integration.test_restore_rpc import call as restore_call
from tests.integration.test_resume import Relay


async def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    """Poll ``predicate`` while the event loop (and the receiver on it) runs; fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.005)  # yields to the receiver; the predicate is the synchronisation


def stream(channel: grpc.aio.Channel) -> grpc.aio.StreamStreamCall[pb.SenderMessage, pb.ReceiverMessage]:
    return channel.stream_stream(METHOD_PATH, request_serializer=pb.SenderMessage.SerializeToString,
                                 response_deserializer=pb.ReceiverMessage.FromString)()  # type: ignore[call-arg]


async def reply(call: grpc.aio.StreamStreamCall[pb.SenderMessage, pb.ReceiverMessage]) -> pb.ReceiverMessage:
    msg = await call.read()
    assert isinstance(msg, pb.ReceiverMessage), msg
    return msg


def fds_under(path: Path) -> int:
    """This process's open file descriptors on files under ``path`` (the receiver runs in it)."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        n += target.startswith(str(path))
    return n


def open_rounds(images: Path) -> list[Path]:
    return list(images.glob("*/.round-*"))


# --- 1. every way a stream ends detaches its session ------------------------------------------


@pytest.fixture
async def small_receiver(tmp_path: Path) -> AsyncIterator[Receiver]:
    async for r in started(ReceiverConfig(images_dir=tmp_path / "images", max_sessions=2, resume_window_s=0.2)):
        yield r


async def test_cancelled_streams_are_detached_and_expire(small_receiver: Receiver) -> None:
    """A client that cancels its call right after the receiver answered leaves the receiver's
    generator suspended at a ``yield``: grpc then closes it (GeneratorExit), which must detach
    the session like any other lost stream, so it expires and frees its slot, files and fds."""
    images = small_receiver.config.images_dir
    for _ in range(2 * small_receiver.config.max_sessions):
        async with grpc.aio.insecure_channel(small_receiver.address, options=CHANNEL_OPTIONS) as channel:
            call = stream(channel)
            for msg in opening():
                await call.write(msg)
            assert (await reply(call)).WhichOneof("msg") == "accepted"
            call.cancel()
    await wait_until(lambda: not open_rounds(images) and fds_under(images) == 0,
                     "cancelled sessions to expire (open rounds and their fds gone)")
    code, details = await raw_session(small_receiver.address, [*opening(), batch(), end()])
    assert code == grpc.StatusCode.OK, details


# --- 2. a zstd frame never produces more than it declares ----------------------------------


BIG_VMA = pb.Vma(start=VMA_START, end=VMA_START + (1 << 16) * PAGE_SIZE, prot=3, kind=pb.VMA_KIND_ANON)


def opening_big() -> list[pb.SenderMessage]:
    """``opening()`` with one VMA of 65,536 pages, room for the largest batch and many holes."""
    return [opening()[0], pb.SenderMessage(round_begin=pb.RoundBegin(round=0, frozen=True, vmas=[BIG_VMA],
                                                                     dump_uptime_us=1))]


def rle_bomb(declared: int, blocks: int) -> bytes:
    """A zstd frame that declares ``declared`` bytes but is not single-segment (a 128 KiB window
    descriptor), followed by ``blocks`` RLE blocks of 128 KiB: 4 bytes each on the wire."""
    header = struct.pack("<IBBI", 0xFD2FB528, 0x80, 0x38, declared)  # 4-byte content size; window 2**17
    block = 131072 << 3 | 2  # RLE, not the last block
    last = block | 1
    return header + (block.to_bytes(3, "little") + b"\0") * (blocks - 1) + last.to_bytes(3, "little") + b"\0"


def window_bomb_batch() -> pb.SenderMessage:
    """A batch of the largest size whose frame (a window descriptor, 8 KB) holds 256 MiB."""
    return batch(nr_pages=[MAX_BATCH_BYTES // PAGE_SIZE], payload=rle_bomb(MAX_BATCH_BYTES, 2000))


async def test_zstd_bomb_with_a_window_descriptor_is_refused_within_its_declared_size(receiver: Receiver) -> None:
    raw_len = MAX_BATCH_BYTES
    msg = window_bomb_batch()
    assert zstandard.frame_content_size(msg.batch.payload) == raw_len
    tracemalloc.start()
    try:
        code, details = await raw_session(receiver.address, [*opening_big(), msg, end()])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert code == grpc.StatusCode.DATA_LOSS, details
    assert "batch 1" in details
    assert peak < 4 * raw_len, f"decoding an 8 KB batch took {peak} bytes"
    assert list(receiver.config.images_dir.iterdir()) == []


# --- 3. holes are bounded by the declared VMAs and by a per-round count -----------------------


def holes(seq: int, vaddr: list[int], kind: pb.HoleKind = pb.HOLE_KIND_ZERO) -> pb.SenderMessage:
    return pb.SenderMessage(holes=pb.Holes(seq=seq, kind=kind, vaddr=vaddr, nr_pages=[1] * len(vaddr)))


EVERY_PAGE: Final = [VMA_START + i * PAGE_SIZE for i in range(1 << 16)]


def holes_beyond_the_vmas(repeats: int = 5) -> list[pb.SenderMessage]:
    """The same 65,536 one-page zero holes, ``repeats`` times: from the second on, more than the VMA."""
    return [*opening_big(), *(holes(seq, EVERY_PAGE) for seq in range(1, repeats + 1)), end(repeats)]


HOLE_RUNS_CAP: Final = 3 << 15  # the cap test_hole_runs_per_round_are_capped sets (the default is 1 << 22)


def hole_runs_over_the_cap() -> list[pb.SenderMessage]:
    """262,144 disjoint one-page holes in a VMA of 2**20 pages: within the VMA, over ``HOLE_RUNS_CAP`` runs
    from the second message on."""
    huge = pb.Vma(start=VMA_START, end=VMA_START + (1 << 20) * PAGE_SIZE, prot=3, kind=pb.VMA_KIND_ANON)
    begin = pb.SenderMessage(round_begin=pb.RoundBegin(round=0, frozen=True, vmas=[huge], dump_uptime_us=1))
    every_other = [VMA_START + 2 * i * PAGE_SIZE for i in range(1 << 18)]
    return [opening()[0], begin, *(holes(seq + 1, every_other[seq << 16:(seq + 1) << 16]) for seq in range(4)),
            end(4)]


async def test_holes_repeated_beyond_the_declared_vmas_are_refused_at_once(receiver: Receiver) -> None:
    """The same 65,536 one-page runs sent again and again: the second message already covers
    more than the declared VMAs, so it is refused then, not at round end after all of them
    have piled up in memory."""
    messages = holes_beyond_the_vmas()
    code, details = await raw_session(receiver.address, messages)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.startswith("holes 2:"), details
    assert list(receiver.config.images_dir.iterdir()) == []


async def test_overlapping_runs_in_one_holes_message_are_refused(receiver: Receiver) -> None:
    messages = [*opening_big(), holes(1, [VMA_START, VMA_START + PAGE_SIZE, VMA_START]), end(1)]
    code, details = await raw_session(receiver.address, messages)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.startswith("holes 1:"), details


async def test_hole_runs_per_round_are_capped(tmp_path: Path) -> None:
    """Disjoint holes inside a huge VMA: what bounds their memory is the count of runs a round
    may hold; beyond it the session is refused as out of resources."""
    cfg = ReceiverConfig(images_dir=tmp_path / "images", limits=SessionLimits(max_hole_runs=HOLE_RUNS_CAP))
    messages = hole_runs_over_the_cap()
    async for r in started(cfg):
        code, details = await raw_session(r.address, messages)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert details.startswith("holes 2:"), details


# --- 4. file descriptors are bounded per session and in total ---------------------------------


def round_with_images(n: int) -> pb.SenderMessage:
    vma = opening()[1].round_begin.vmas[0]
    return pb.SenderMessage(round_begin=pb.RoundBegin(round=0, frozen=True, dump_uptime_us=1, images=[
        pb.Image(kind=pb.IMAGE_KIND_PROCESS, id=pid, vmas=[vma]) for pid in range(1, n + 1)]))


@pytest.fixture
def few_fds() -> Iterator[int]:
    """This process (the receiver's) may open only a few hundred more files."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    headroom = 600
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + headroom, hard))
    try:
        yield headroom
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_one_round_cannot_take_the_receivers_file_descriptors(tmp_path: Path, few_fds: int) -> None:
    """Rounds declaring hundreds of images are refused as out of resources (one of them more than
    the process may open, one within that but beyond a session's share), and a session already
    under way completes."""
    cfg = ReceiverConfig(images_dir=tmp_path / "images", max_sessions=4)
    async for r in started(cfg):
        async with grpc.aio.insecure_channel(r.address, options=CHANNEL_OPTIONS) as channel:
            legit = stream(channel)
            for msg in opening():
                await legit.write(msg)
            assert (await reply(legit)).WhichOneof("msg") == "accepted"
            for images in (few_fds, few_fds // 3):
                code, details = await raw_session(r.address, [opening()[0], round_with_images(images)])
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
            for msg in (batch(), end()):
                await legit.write(msg)
            await legit.done_writing()
            replies = []
            while isinstance(m := await legit.read(), pb.ReceiverMessage):
                replies.append(m)
            assert await legit.code() == grpc.StatusCode.OK, await legit.details()
            assert any(m.WhichOneof("msg") == "committed" for m in replies)


# --- 7. the Restore RPC gives back disk and time ----------------------------------------------


@pytest.fixture
async def restore_server(tmp_path: Path) -> AsyncIterator[Receiver]:
    cfg = ReceiverConfig(images_dir=tmp_path / "images", security=Security(insecure=True, token=TOKEN),
                         restore=RestoreConfig(Path("/bin/false"), max_bytes=1 << 20, idle_timeout_s=0.5))
    async for r in started(cfg):
        yield r


def shipped_left(images: Path) -> list[Path]:
    """What failed restores left besides criu's logs (nothing, or the disk fills up)."""
    return [p for p in images.glob("*/restore-*/**/*") if (not p.is_dir() and p.name not in ("restore.log", "criu.out"))
            or p.name == "shipped"]


@pytest.mark.parametrize("case", ["file-twice", "unfinished-file", "criu-fails"])
async def test_failed_restores_leave_no_shipped_files(restore_server: Receiver, case: str) -> None:
    images = restore_server.config.images_dir
    make_session(images)
    requests, code, _ = RESTORE_CASES[case]
    err = await restore_call(restore_server.address, requests)
    assert err.code() == code, err.details()
    assert shipped_left(images) == []


async def test_shipped_name_clashing_with_the_layout_is_invalid(restore_server: Receiver) -> None:
    make_session(restore_server.config.images_dir)
    err = await restore_call(restore_server.address, [restore_begin(), chunk("pages-1.img", b"x"), END])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert "pages-1.img" in (err.details() or "")
    assert shipped_left(restore_server.config.images_dir) == []


async def test_silent_restore_stream_times_out_and_frees_the_session(restore_server: Receiver) -> None:
    make_session(restore_server.config.images_dir)
    async with grpc.aio.insecure_channel(restore_server.address) as channel:
        rpc = channel.stream_unary(RESTORE_METHOD_PATH, request_serializer=rpb.RestoreRequest.SerializeToString,
                                   response_deserializer=rpb.RestoreReply.FromString)
        silent = asyncio.Event()

        async def gen() -> AsyncIterator[rpb.RestoreRequest]:
            yield restore_begin()
            await silent.wait()  # never set: the client says nothing more

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await rpc(gen(), metadata=Security(insecure=True, token=TOKEN).token_metadata(), timeout=30)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "no restore message for 0.5 s" in (info.value.details() or "")
    assert shipped_left(restore_server.config.images_dir) == []
    again = await restore_call(restore_server.address, RESTORE_CASES["criu-fails"][0])
    assert again.code() == grpc.StatusCode.ABORTED, again.details()


# --- 9. a resume token is single-use and bound to the client certificate ----------------------


Credentials = grpc.ChannelCredentials | None


async def first_reply(address: str, messages: list[pb.SenderMessage],
                      creds: Credentials = None) -> tuple[pb.ReceiverMessage | None, grpc.StatusCode]:
    """Send ``messages``, read the first reply, then drop the connection (the session detaches)."""
    channel = (grpc.aio.secure_channel(address, creds, options=CHANNEL_OPTIONS) if creds is not None
               else grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS))
    async with channel:
        call = stream(channel)
        try:
            for msg in messages:
                await call.write(msg)
            got = await call.read()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            return None, await call.code()  # a write raced the end of the call; its status says why
        if not isinstance(got, pb.ReceiverMessage):
            return None, await call.code()
        if got.WhichOneof("msg") == "error":
            return got, await call.code()
        call.cancel()
        return got, grpc.StatusCode.OK


def resume(session_id: str, token: str) -> pb.SenderMessage:
    return pb.SenderMessage(resume=pb.Resume(session_id=session_id, resume_token=token))


async def test_a_captured_resume_cannot_be_replayed(receiver: Receiver) -> None:
    opened, _ = await first_reply(receiver.address, opening())
    assert opened is not None
    sid, token = opened.accepted.session_id, opened.accepted.resume_token
    await wait_until(lambda: bool(receiver.sessions.detached), "the session to detach")
    resumed, code = await first_reply(receiver.address, [resume(sid, token)])
    assert code == grpc.StatusCode.OK
    assert resumed is not None
    new_token = resumed.accepted.resume_token
    assert new_token != token, "a resume must hand out a new token"
    await wait_until(lambda: bool(receiver.sessions.detached), "the session to detach again")
    replayed, code = await first_reply(receiver.address, [resume(sid, token)])
    assert code == grpc.StatusCode.NOT_FOUND, replayed
    again, code = await first_reply(receiver.address, [resume(sid, new_token)])
    assert code == grpc.StatusCode.OK, again


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """The test PKI plus, signed by the same CA: ``other`` (a second client), ``noclient`` (for
    serverAuth only) and ``noeku`` (no extended key usage at all, which X.509 reads as any)."""
    path = tmp_path / "pki"
    make_test_pki(path)
    ca_key = serialization.load_pem_private_key((path / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca = x509.load_pem_x509_certificate((path / "ca.crt").read_bytes())
    now = datetime.datetime.now(datetime.UTC)
    usages = {"other": ExtendedKeyUsageOID.CLIENT_AUTH, "noclient": ExtendedKeyUsageOID.SERVER_AUTH, "noeku": None}
    for name, usage in usages.items():
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"pagehaul {name}")]))
                   .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1)))
        if usage is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        (path / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (path / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                             serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()))
    return path


def tls(pki: Path, role: str) -> TlsFiles:
    return TlsFiles(pki / f"{role}.crt", pki / f"{role}.key", pki / "ca.crt")


@pytest.fixture
async def tls_receiver(tmp_path: Path, pki: Path) -> AsyncIterator[Receiver]:
    async for r in started(ReceiverConfig(images_dir=tmp_path / "images", security=Security(tls=tls(pki, "receiver")))):
        yield r


async def test_resume_is_bound_to_the_client_certificate(tls_receiver: Receiver, pki: Path) -> None:
    opened, _ = await first_reply(tls_receiver.address, opening(), tls(pki, "sender").channel_credentials())
    assert opened is not None
    sid, token = opened.accepted.session_id, opened.accepted.resume_token
    await wait_until(lambda: bool(tls_receiver.sessions.detached), "the session to detach")
    other, mine = tls(pki, "other").channel_credentials(), tls(pki, "sender").channel_credentials()
    stolen, code = await first_reply(tls_receiver.address, [resume(sid, token)], other)
    assert code == grpc.StatusCode.NOT_FOUND, stolen
    again, code = await first_reply(tls_receiver.address, [resume(sid, token)], mine)
    assert code == grpc.StatusCode.OK, again


@pytest.mark.parametrize("role", ["noeku", "noclient"])
async def test_client_certificate_without_client_auth_usage_is_refused(tls_receiver: Receiver, pki: Path,
                                                                       role: str) -> None:
    """Signed by the right CA but not for clientAuth: refused, by the TLS library where the
    extension names other usages (UNAVAILABLE: no handshake), by the receiver where there is none."""
    reply_, code = await first_reply(tls_receiver.address, opening(), tls(pki, role).channel_credentials())
    assert code == (grpc.StatusCode.UNAUTHENTICATED if role == "noeku" else grpc.StatusCode.UNAVAILABLE), reply_
    assert list(tls_receiver.config.images_dir.iterdir()) == []


async def test_sender_resumes_twice_with_the_rotated_token(receiver: Receiver) -> None:
    """Two network cuts in one round: the second resume works only with the token the first one
    handed out."""
    relay = Relay(receiver.port)
    await relay.start()
    cuts = {"batches": 0}

    def progress(p: Progress) -> None:
        cuts["batches"] += 1
        if p.round == 0 and cuts["batches"] in (20, 60):
            asyncio.get_running_loop().call_soon(relay.cut)

    workload = start_workload(size_mib=48, mutate=True)
    try:
        cfg = SendConfig(pid=workload.pid, target=f"127.0.0.1:{relay.port}", batch_pages=64)
        result = await send(cfg, progress)
        assert result.resumes >= 2
        round_dir = receiver.config.images_dir / result.session_id / result.rounds[-1].directory
        assert verify_against_process(round_dir, workload.pid, dump_ranges(workload.pid), PAGE_SIZE).ok
    finally:
        stop_process(workload.proc)
        await relay.stop()


# --- 8. a receiver that crashed leaves nothing behind for ever ----------------------------------


async def crashed_session(tmp_path: Path) -> Path:
    """A session as a receiver that died mid-round leaves it: token, manifest, an open round
    with pages in it (copied while the real receiver that wrote it was still running)."""
    async for r in started(ReceiverConfig(images_dir=tmp_path / "first")):
        async with grpc.aio.insecure_channel(r.address, options=CHANNEL_OPTIONS) as channel:
            call = stream(channel)
            for msg in [*opening(), batch()]:
                await call.write(msg)
            while (await reply(call)).ack.handled < 2:  # round_begin and the batch
                pass
            (session,) = r.config.images_dir.iterdir()
            shutil.copytree(session, tmp_path / "crashed" / session.name, symlinks=True)
            call.cancel()
    return tmp_path / "crashed" / session.name


async def test_leftovers_of_a_crashed_receiver_are_collected_and_counted(tmp_path: Path) -> None:
    crashed = await crashed_session(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    old, fresh = images / "pid1-old", images / "pid1-fresh"
    shutil.copytree(crashed, old, symlinks=True)
    shutil.copytree(crashed, fresh, symlinks=True)
    an_hour_ago = time.time() - 3600
    for path in [old, *old.rglob("*")]:
        os.utime(path, (an_hour_ago, an_hour_ago), follow_symlinks=False)
    cfg = ReceiverConfig(images_dir=images, resume_window_s=600, max_total_bytes=2 * len(PAGES))
    async for r in started(cfg):
        assert not old.exists(), "a session older than the resume window, with nothing committed, goes"
        assert open_rounds(images), "a younger one waits for its sender"
        assert (fresh / ".resume-token").exists()
        # The fresh leftover's open round still counts against the quota: two more batches no longer fit.
        code, details = await raw_session(r.address, [*opening(), batch(), batch(seq=2, vaddr=VMA_START + len(PAGES)),
                                                      end(2)])
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details


# --- 10. all of it at once, against a receiver process ------------------------------------------


def test_short_hostile_campaign_leaves_the_receiver_whole(tmp_path: Path) -> None:
    """bench/bench_hostile.py for 15 s with CI's fixed seed: four clients at once sending every kind
    of hostile input above (and the fuzz's sessions) into a ``pagehaul receive`` process; then a
    legitimate migration must verify, and sessions and fds must be back to where they started.
    The bench exits non-zero on any violation and names it."""
    seed = os.environ.get("PAGEHAUL_FUZZ_SEED", "20261122")
    proc = subprocess.run([sys.executable, "-m", "bench.bench_hostile", "--minutes", "0.25", "--seed", seed,
                           "--clients", "4", "--workload-mib", "16", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, check=False,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, f"seed {seed}:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert "legitimate migration verified" in proc.stdout

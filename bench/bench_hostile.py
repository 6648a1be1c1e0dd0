"""A long hostile-client campaign against a real ``pagehaul receive`` process (issue 13).

    .venv/bin/python -m bench.bench_hostile --minutes 5 --seed 1

The receiver runs as its own process (``python -m cli receive`` on 127.0.0.1, port 0) with small
limits: 8 sessions, a 3 s resume window and idle timeout, disk quotas, 512 open files for rounds,
98,304 hole runs per round, ``--restore`` with ``/bin/false`` as criu and a 2 s restore idle timeout.
``--clients`` hostile clients at once (default 8), each drawing its next attack from a seeded RNG,
until ``--minutes`` have passed. Every input comes from the test suite's generators and clients
(tests/integration: ``test_fuzz_receiver``, ``test_hostile_receiver``, ``test_bad_input``,
``test_restore_rpc``), which the CI runs in bounded time with one fixed seed:

* ``fuzz``: grammar-fuzzed sessions (the fuzz test's Hypothesis strategy, seeded with ``--seed``,
  after its fixed corpus of named hostile sessions): mutated messages, raw and garbage bytes,
  resumes of earlier sessions with right, wrong, empty and hostile tokens;
* ``cancel``: a session opened, one batch sent, the call cancelled mid-round;
* ``session-flood``: ``max_sessions + 1`` sessions at once, held until all are answered;
* ``holes-flood``: 65,536-run hole messages repeated past the VMAs, and disjoint holes past the
  per-round cap;
* ``zstd-bomb``: 256 MiB from 8 KB (window descriptor), 32 MiB honest, RLE under a declared size,
  a frame declaring 2**62 bytes;
* ``fd-exhaustion``: rounds declaring hundreds to thousands of images (two files each);
* ``resume-replay``: a session resumed with its token, then the captured old token replayed;
* ``restore-abuse``: the Restore RPC's bad requests (paths as names, too big, twice, unfinished,
  no end, wrong session), many at once on one session;
* ``idle``: raw TCP connections that never speak, and a session that goes silent mid-round.

The receiver's VmRSS, VmHWM and open fds are sampled from /proc every 0.25 s, and its
``pagehaul_receiver_sessions_active`` gauge from its metrics endpoint. At the end, after the
resume window: a legitimate ``pagehaul send`` of a live workload (``--workload-mib``) whose
committed round must equal the stopped process byte for byte, and sessions and fds back to their
baseline. A violation (a status of INTERNAL or UNKNOWN, a hang, a bomb or flood accepted, a
replayed token accepted, a restore that succeeded, an error or traceback in the receiver's log,
the receiver gone, RSS over ``--max-rss-mib``, a failed legitimate migration, sessions or fds
left over) is listed and the exit status is 1.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import os
import queue
import random
import re
import socket
import sys
import threading
import time
import urllib.request
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import grpc
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis.errors import HypothesisWarning
from rich.console import Console

from bench.common import (
    BenchError,
    Report,
    RunFailed,
    WorkloadSpec,
    free_port,
    machine_line,
    make_console,
    pagehaul_send,
    running_workload,
    start_pagehaul_receiver,
)
from cli.demo import dump_ranges
from pagehaul.kernel import PAGE_SIZE
from pagehaul.oracle import verify_against_process
from pagehaul.v1 import migration_pb2 as pb
from pagehaul.wire import CHANNEL_OPTIONS
from tests.integration.test_bad_input import PAGES, batch, end, opening, raw_session
from tests.integration.test_fuzz_receiver import (
    CLIENT_OPTIONS,
    LogCollector,
    Planned,
    Stats,
    client_view,
    explicit_sessions,
    fill_session_limit,
    honest_bomb,
    lying_batch,
    resume_message,
    send_frames,
    serialize,
    sessions,
    zstd_rle_bomb,
)
from tests.integration.test_hostile_receiver import (
    HOLE_RUNS_CAP,
    first_reply,
    hole_runs_over_the_cap,
    holes_beyond_the_vmas,
    opening_big,
    resume,
    round_with_images,
    stream,
    window_bomb_batch,
)
from tests.integration.test_restore_rpc import CASES as RESTORE_CASES
from tests.integration.test_restore_rpc import call as restore_call
from tests.integration.test_restore_rpc import make_session

MAX_SESSIONS: Final = 8
RESUME_WINDOW_S: Final = 3.0
IDLE_TIMEOUT_S: Final = 3.0
RESTORE_IDLE_S: Final = 2.0
MAX_OPEN_FILES: Final = 512
RECEIVER_LIMITS: Final = (
    "--max-sessions", str(MAX_SESSIONS), "--resume-window", str(RESUME_WINDOW_S), "--idle-timeout",
    str(IDLE_TIMEOUT_S), "--max-session-bytes", "512M", "--max-total-bytes", "4G", "--max-open-files",
    str(MAX_OPEN_FILES), "--max-hole-runs", str(HOLE_RUNS_CAP), "--restore", "--criu", "/bin/false",
    "--restore-idle-timeout", str(RESTORE_IDLE_S))
# A status that says the receiver failed rather than refused (receiver.grpc_server's contract).
BROKEN: Final = frozenset({"INTERNAL", "UNKNOWN"})
# Every attack may also meet a full receiver (RESOURCE_EXHAUSTED at open) or end before it.
KINDS: Final = {  # kind: weight
    "fuzz": 8, "cancel": 2, "session-flood": 1, "holes-flood": 1, "zstd-bomb": 2, "fd-exhaustion": 2,
    "resume-replay": 2, "restore-abuse": 2, "idle": 1,
}
CALL_TIMEOUT_S: Final = 60.0  # one attack longer than this is a hang


@dataclass
class Tally:
    tried: collections.Counter[str] = field(default_factory=collections.Counter)
    statuses: dict[str, collections.Counter[str]] = field(default_factory=lambda: collections.defaultdict(
        collections.Counter))
    violations: list[str] = field(default_factory=list)

    def record(self, kind: str, codes: collections.Counter[str], inputs: int = 1) -> None:
        self.tried[kind] += inputs
        self.statuses[kind].update(codes)
        for code in BROKEN & codes.keys():
            self.violate(f"{kind}: status {code}")

    def violate(self, what: str) -> None:
        if len(self.violations) < 200:
            self.violations.append(what)


# === the receiver, watched ====================================================================


@dataclass
class Sample:
    t: float
    rss_kib: int
    hwm_kib: int
    fds: int
    sessions: int | None


def proc_status(pid: int) -> tuple[int, int]:
    """VmRSS and VmHWM of ``pid`` in KiB."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return values["VmRSS"], values["VmHWM"]


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_targets(pid: int) -> collections.Counter[str]:
    """What ``pid``'s fds lead to (sockets and pipes by kind, not inode)."""
    out: collections.Counter[str] = collections.Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            out[re.sub(r"\[[0-9]+\]$", "", os.readlink(f"/proc/{pid}/fd/{fd}"))] += 1
    return out


def sessions_active(metrics_port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    m = re.search(r"^pagehaul_receiver_sessions_active (\S+)$", text, re.MULTILINE)
    return int(float(m.group(1))) if m else None


class Sampler(threading.Thread):
    def __init__(self, pid: int, metrics_port: int, every_s: float = 0.25) -> None:
        super().__init__(name="receiver-sampler", daemon=True)
        self.pid, self.metrics_port, self.every_s = pid, metrics_port, every_s
        self.samples: list[Sample] = []
        self.t0 = time.monotonic()
        self._halt = threading.Event()

    def sample(self) -> Sample:
        rss, hwm = proc_status(self.pid)
        return Sample(time.monotonic() - self.t0, rss, hwm, open_fds(self.pid), sessions_active(self.metrics_port))

    def run(self) -> None:
        while not self._halt.wait(self.every_s):
            with contextlib.suppress(OSError, KeyError):
                self.samples.append(self.sample())

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


# === the attacks ===============================================================================


class Campaign:
    def __init__(self, address: str, seed_: int, tally: Tally) -> None:
        self.address = address
        self.seed = seed_
        self.tally = tally
        self.stats = Stats()  # accepted (session id, token) pairs, for the fuzz's resumes
        self.plans: queue.Queue[Planned] = queue.Queue(maxsize=32)
        self.stop_plans = threading.Event()
        self.channel: grpc.aio.Channel | None = None

    # --- the grammar fuzz's plans, from a thread (Hypothesis drives a synchronous function) ---

    def produce_plans(self) -> None:
        # The fuzz makes megabyte strings on purpose; Hypothesis warns about their repr.
        warnings.filterwarnings("ignore", category=HypothesisWarning)
        for plan in explicit_sessions():
            if self.stop_plans.is_set():
                return
            self.plans.put(plan)

        class Enough(Exception):
            pass

        @settings(max_examples=10**9, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(plan=sessions())
        def one(plan: Planned) -> None:
            while True:
                if self.stop_plans.is_set():
                    raise Enough
                with contextlib.suppress(queue.Full):
                    self.plans.put(plan, timeout=0.5)
                    return

        with contextlib.suppress(Enough):
            seed(self.seed)(one)()

    async def next_plan(self) -> Planned:
        return await asyncio.to_thread(self.plans.get)

    # --- one attack of each kind; each returns the statuses it saw ---

    async def fuzz(self) -> collections.Counter[str]:
        assert self.channel is not None
        plan = await self.next_plan()
        if plan.resume is not None:
            plan.frames[0] = resume_message(plan, self.stats)
        frames = [serialize(m) for m in plan.frames]
        out = await send_frames(self.channel, frames, LogCollector())
        for r in out.replies:
            if r.WhichOneof("msg") == "accepted" and r.accepted.resume_token:
                self.stats.accepted.append((r.accepted.session_id, r.accepted.resume_token))
        status, finding = client_view(out, frames)
        if finding is not None:
            self.tally.violate(f"fuzz: {finding[0]}: {finding[1][:200]!r} (mutations {plan.notes[:4]})")
        return collections.Counter([status])

    async def cancel(self) -> collections.Counter[str]:
        async with grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS) as channel:
            call = stream(channel)
            try:
                for msg in [*opening(), batch()]:
                    await call.write(msg)
                got = await call.read()
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                return collections.Counter([(await call.code()).name])
            if isinstance(got, pb.ReceiverMessage) and got.WhichOneof("msg") == "accepted":
                call.cancel()
                return collections.Counter(["cancelled by the client"])
            return collections.Counter([(await call.code()).name])

    async def session_flood(self) -> collections.Counter[str]:
        assert self.channel is not None
        return await fill_session_limit(self.channel, MAX_SESSIONS)

    async def holes_flood(self, rng: random.Random) -> collections.Counter[str]:
        over_cap = rng.random() < 0.5
        code, details = await raw_session(self.address, _over_cap() if over_cap else _beyond_vmas())
        want = "RESOURCE_EXHAUSTED" if over_cap else "INVALID_ARGUMENT"
        if code.name not in (want, "RESOURCE_EXHAUSTED"):
            self.tally.violate(f"holes-flood ({'over the cap' if over_cap else 'beyond the VMAs'}): "
                               f"{code.name} {details}")
        return collections.Counter([code.name])

    async def zstd_bomb(self, rng: random.Random) -> collections.Counter[str]:
        which = rng.choice(["window 256 MiB", "honest 32 MiB", "RLE under its size", "declaring 2**62"])
        code, details = await raw_session(self.address, _bomb(which))
        if code.name not in ("DATA_LOSS", "RESOURCE_EXHAUSTED"):
            self.tally.violate(f"zstd-bomb {which}: {code.name} {details}")
        return collections.Counter([code.name])

    async def fd_exhaustion(self, rng: random.Random) -> collections.Counter[str]:
        images = rng.choice([100, 300, MAX_OPEN_FILES, 2000, 4096])
        code, details = await raw_session(self.address, [opening()[0], round_with_images(images)])
        if code.name not in ("RESOURCE_EXHAUSTED", "INVALID_ARGUMENT"):
            self.tally.violate(f"fd-exhaustion with {images} images: {code.name} {details}")
        return collections.Counter([code.name])

    async def _first_reply(self, step: str, messages: list[pb.SenderMessage]) -> tuple[
            pb.ReceiverMessage | None, grpc.StatusCode]:
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S / 3):
                return await first_reply(self.address, messages)
        except TimeoutError:
            self.tally.violate(f"resume-replay: no answer to the {step} within {CALL_TIMEOUT_S / 3:g} s")
            raise

    async def resume_replay(self) -> collections.Counter[str]:
        codes: collections.Counter[str] = collections.Counter()
        opened, code = await self._first_reply("open", opening())
        if opened is None or opened.WhichOneof("msg") != "accepted":
            codes[code.name] += 1
            return codes
        sid, token = opened.accepted.session_id, opened.accepted.resume_token
        for _ in range(10):  # the receiver may not have seen the cancel yet; a flood may have taken the slot
            _, code = await self._first_reply("resume", [resume(sid, token)])
            if code.name == "OK":
                break
            await asyncio.sleep(0.1)
        codes[f"resume {code.name}"] += 1
        if code.name != "OK":
            return codes
        for _ in range(3):  # the old token, captured: refused whether the session is detached yet or not
            _, code = await self._first_reply("replayed resume", [resume(sid, token)])
            codes[f"replay {code.name}"] += 1
            if code.name == "OK":
                self.tally.violate(f"resume-replay: the captured token of {sid} was accepted again")
            await asyncio.sleep(0.05)
        return codes

    async def restore_abuse(self, rng: random.Random) -> collections.Counter[str]:
        case = rng.choice(list(RESTORE_CASES))
        requests, _, _ = RESTORE_CASES[case]
        try:
            err = await restore_call(self.address, requests)
        except Exception as exc:  # pytest.raises' failure: the restore succeeded
            self.tally.violate(f"restore-abuse {case}: no error ({exc!r})")
            return collections.Counter(["OK"])
        return collections.Counter([err.code().name])

    async def idle(self, rng: random.Random) -> collections.Counter[str]:
        codes: collections.Counter[str] = collections.Counter()
        host, port = self.address.rsplit(":", 1)
        socks = []
        for _ in range(rng.randint(5, 40)):  # raw TCP, no HTTP/2 preface, held a while
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect((host, int(port)))
            socks.append(s)
        codes["tcp connection held silent"] += len(socks)
        async with grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS) as channel:
            call = stream(channel)
            try:
                for msg in opening():
                    await call.write(msg)
                async with asyncio.timeout(IDLE_TIMEOUT_S + 30):
                    while isinstance(await call.read(), pb.ReceiverMessage):
                        pass  # the receiver must end the silent stream by itself
                codes[(await call.code()).name] += 1
            except TimeoutError:
                self.tally.violate(f"idle: a silent session was not ended after {IDLE_TIMEOUT_S + 30:g} s")
                codes["not ended"] += 1
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                codes[(await call.code()).name] += 1
        for s in socks:
            s.close()
        return codes

    # --- the clients ---

    async def client(self, k: int, deadline: float) -> None:
        rng = random.Random(self.seed * 1000 + k)  # noqa: S311 -- reproducible choices, not secrets
        kinds, weights = list(KINDS), list(KINDS.values())
        attacks: dict[str, Callable[[], Awaitable[collections.Counter[str]]]] = {
            "fuzz": self.fuzz, "cancel": self.cancel, "session-flood": self.session_flood,
            "holes-flood": lambda: self.holes_flood(rng), "zstd-bomb": lambda: self.zstd_bomb(rng),
            "fd-exhaustion": lambda: self.fd_exhaustion(rng), "resume-replay": self.resume_replay,
            "restore-abuse": lambda: self.restore_abuse(rng), "idle": lambda: self.idle(rng),
        }
        while time.monotonic() < deadline:
            kind = rng.choices(kinds, weights)[0]
            try:
                async with asyncio.timeout(CALL_TIMEOUT_S):
                    codes = await attacks[kind]()
            except TimeoutError:
                self.tally.violate(f"{kind}: no answer within {CALL_TIMEOUT_S:g} s")
                codes = collections.Counter(["hang"])
            except grpc.aio.AioRpcError as err:
                codes = collections.Counter([err.code().name])
            inputs = codes.total() if kind == "session-flood" else 1
            self.tally.record(kind, codes, inputs)

    async def run(self, clients: int, seconds: float) -> None:
        producer = threading.Thread(target=self.produce_plans, name="fuzz-plans", daemon=True)
        producer.start()
        try:
            async with grpc.aio.insecure_channel(self.address, options=CLIENT_OPTIONS) as channel:
                self.channel = channel
                deadline = time.monotonic() + seconds
                await asyncio.gather(*(self.client(k, deadline) for k in range(clients)))
        finally:
            self.stop_plans.set()
            with contextlib.suppress(queue.Empty):
                while True:
                    self.plans.get_nowait()
            producer.join(30)


@functools.cache
def _beyond_vmas() -> list[pb.SenderMessage]:
    return holes_beyond_the_vmas()


@functools.cache
def _over_cap() -> list[pb.SenderMessage]:
    return hole_runs_over_the_cap()


@functools.cache
def _bomb(which: str) -> list[pb.SenderMessage]:
    if which == "window 256 MiB":
        return [*opening_big(), window_bomb_batch(), end()]
    if which == "honest 32 MiB":
        payload, digest = honest_bomb(32 << 20, content_size=True)
        return [*opening(), batch(payload=payload, xxh3_64=digest), end()]
    if which == "RLE under its size":
        return [*opening(), batch(payload=zstd_rle_bomb(512, len(PAGES))), end()]
    return [*opening(), lying_batch(1 << 62), end()]


# === the run ===================================================================================


def wait_for_baseline(sampler: Sampler, fds_before: int, timeout_s: float) -> Sample:
    """Sample until no session is active and the fds are back to ``fds_before``; the last sample."""
    deadline = time.monotonic() + timeout_s
    while True:
        s = sampler.sample()
        if (s.sessions == 0 and s.fds <= fds_before) or time.monotonic() > deadline:
            return s
        time.sleep(0.25)


def legit_migration(address: str, workdir: Path, size_mib: int, seed_: int, images_dir: Path) -> tuple[bool, str]:
    """``pagehaul send`` of a live workload, left stopped; its last round against its memory."""
    spec = WorkloadSpec(size_mib=size_mib, seed=seed_)
    with running_workload(spec, workdir) as workload:
        try:
            run = pagehaul_send(workload.pid, address, workdir, tracker="auto", resume=False)
        except RunFailed as err:
            return False, str(err)
        round_dir = images_dir / run.result["session_id"] / run.rounds[-1]["directory"]
        report = verify_against_process(round_dir, workload.pid, dump_ranges(workload.pid), PAGE_SIZE)
        pages = sum(int(r["pages_written"]) for r in run.rounds)
        return report.ok, (f"{spec.describe()}: {len(run.rounds)} round(s), {pages:,} pages written, "
                           f"{run.total_s:.1f} s; {report}")


def main(args: argparse.Namespace, console: Console) -> int:
    if os.geteuid() != 0:
        raise BenchError("must run as root (the legitimate migration ptraces its workload)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="pagehaul-bench-hostile-", dir=args.workdir))
    images = work / "images"
    make_session(images)  # the Restore RPC's target: a committed session
    metrics_port = free_port()
    receiver = start_pagehaul_receiver(images, work, extra=(*RECEIVER_LIMITS, "--metrics-listen",
                                                            f"127.0.0.1:{metrics_port}"))
    pid = receiver.child.pid
    tally = Tally()
    try:
        sampler = Sampler(pid, metrics_port)
        time.sleep(0.5)
        start = sampler.sample()
        fds_at_start = fd_targets(pid)
        sampler.start()
        console.print(f"receiver pid {pid} at {receiver.address}: RSS {start.rss_kib / 1024:.1f} MiB, "
                      f"{start.fds} fds; {args.clients} hostile clients for {args.minutes:g} min, seed {args.seed}")
        t0 = time.monotonic()
        asyncio.run(Campaign(receiver.address, args.seed, tally).run(args.clients, args.minutes * 60))
        attack_s = time.monotonic() - t0
        alive = receiver.child.wait(0) is None
        if not alive:
            tally.violate(f"the receiver exited during the campaign (status {receiver.child.exit})")
            raise BenchError("the receiver died")
        settle = wait_for_baseline(sampler, start.fds, RESUME_WINDOW_S + IDLE_TIMEOUT_S + 30)
        ok, legit = legit_migration(receiver.address, work, args.workload_mib, args.seed, images)
        if not ok:
            tally.violate(f"legitimate migration: {legit}")
        after = wait_for_baseline(sampler, start.fds, RESUME_WINDOW_S + 30)
        sampler.stop()
        if after.sessions != 0:
            tally.violate(f"{after.sessions} session(s) still active after the resume window")
        if after.fds > start.fds:
            extra_fds = dict(fd_targets(pid) - fds_at_start)
            tally.violate(f"receiver fds {start.fds} before, {after.fds} after the campaign: {extra_fds} more")
        samples = [*sampler.samples, settle, after]
        peak_rss = max(s.rss_kib for s in samples)
        peak_hwm = max(s.hwm_kib for s in samples)
        peak_fds = max(s.fds for s in samples)
        peak_sessions = max((s.sessions or 0) for s in samples)
        if peak_hwm > args.max_rss_mib * 1024:
            tally.violate(f"receiver peak RSS {peak_hwm / 1024:.0f} MiB over --max-rss-mib {args.max_rss_mib}")
    finally:
        exit_info = receiver.stop()
    log = (work / "receiver.err").read_text(errors="replace")
    bad_lines = [ln for ln in log.splitlines() if " ERROR " in ln or "Traceback" in ln or " CRITICAL " in ln]
    tally.violations += [f"receiver log: {ln[:300]}" for ln in bad_lines[:20]]
    if exit_info.returncode != 0:
        tally.violate(f"receiver exited {exit_info.returncode} on SIGTERM")

    report = Report("Hostile clients against one receiver", args)
    report.note(f"{machine_line()}; receiver: `pagehaul receive {' '.join(RECEIVER_LIMITS)}`; {args.clients} "
                f"clients for {attack_s:.0f} s, seed {args.seed}")
    statuses = collections.Counter[str]()
    rows = []
    for kind in KINDS:
        codes = tally.statuses.get(kind, collections.Counter())
        statuses.update({c: n for c, n in codes.items() if c.isupper()})
        rows.append([kind, f"{tally.tried[kind]:,}", ", ".join(f"{c} {n:,}" for c, n in codes.most_common())])
    rows.append(["total", f"{tally.tried.total():,}", f"{tally.tried.total() / attack_s:.1f} inputs/s"])
    report.table("inputs tried, by kind, and how each ended", ["kind", "inputs", "statuses"], rows)
    report.table("refusals by status (gRPC status of each call)", ["status", "calls"],
                 [[c, f"{n:,}"] for c, n in statuses.most_common()])
    report.table("the receiver", ["what", "value"], [
        ["RSS at start / peak (sampled) / VmHWM", f"{start.rss_kib / 1024:.1f} / {peak_rss / 1024:.1f} / "
                                                  f"{peak_hwm / 1024:.1f} MiB"],
        ["RSS after", f"{after.rss_kib / 1024:.1f} MiB"],
        ["open fds before / peak / after", f"{start.fds} / {peak_fds} / {after.fds}"],
        ["sessions active before / peak / after", f"{start.sessions} / {peak_sessions} / {after.sessions}"],
        ["samples", f"{len(samples):,} (every 0.25 s)"],
        ["legitimate migration verified", ("yes: " if ok else "NO: ") + legit],
        ["receiver log errors", str(len(bad_lines))],
        ["violations", str(len(tally.violations))],
    ])
    if tally.violations:
        report.note("violations:\n" + "\n".join(f"  - {v}" for v in tally.violations))
    report.finish(console)
    if args.keep:
        print(f"kept {work}", file=sys.stderr)
    else:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 1 if tally.violations else 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench.bench_hostile", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=5.0, help="how long the clients attack (default: 5)")
    p.add_argument("--seed", type=int, default=1, help="seed of the fuzz and of each client's choices (default: 1)")
    p.add_argument("--clients", type=int, default=8, help="hostile clients at once (default: 8)")
    p.add_argument("--workload-mib", type=int, default=64, help="the legitimate migration's workload (default: 64)")
    p.add_argument("--max-rss-mib", type=int, default=1024,
                   help="the receiver's peak RSS (VmHWM) above this is a violation (default: 1024)")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"),  # noqa: S108 -- a disk; own mkdtemp inside
                   help="parent of the scratch directory (default: /var/tmp)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory (images, receiver log)")
    p.add_argument("--markdown", type=Path, metavar="PATH", help="also write the tables as Markdown here")
    return p


if __name__ == "__main__":
    _parser = parser()
    _args = _parser.parse_args()
    if _args.minutes <= 0 or _args.clients < 1 or _args.workload_mib < 1:
        _parser.error("--minutes, --clients and --workload-mib must be positive")
    try:
        sys.exit(main(_args, make_console()))
    except BenchError as _err:
        print(f"{_parser.prog}: error: {_err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)

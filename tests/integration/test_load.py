"""Load: eight migrations at once into one receiver process. Every one completes and equals its
stopped process byte for byte, and the receiver's peak memory stays bounded (a bound on memory,
not on speed: the receiver holds at most a few batches per session, whatever the sizes)."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cli.demo import dump_ranges
from pagehaul.integrity import format_report, verify_image_set
from pagehaul.kernel import PAGE_SIZE
from pagehaul.oracle import verify_against_process
from sender.config import SendConfig, SendResult
from sender.precopy import send
from tests.conftest import Workload, start_workload, stop_process

MIGRATIONS = 8
RECEIVER_HWM_BOUND = 400 << 20  # generous: Python + gRPC + numpy is ~100 MiB, each session a few 4 MiB batches
LISTENING = re.compile(r"^pagehaul receiver listening on (\S+:\d+)$")


@contextmanager
def receiver_process(images_dir: Path, log: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``pagehaul receive`` as its own process; yields it and the address from its "listening on" line."""
    with log.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "cli", "receive", "--insecure", "--listen",
                                 "127.0.0.1:0", "--images-dir", str(images_dir)],
                                stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()  # blocks until it listens (or exits: "")
        match = LISTENING.match(line)
        assert match, f"receiver did not start: {line!r}; {log.read_text()!r}"
        yield proc, match.group(1)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()


def vm_hwm(pid: int) -> int:
    """Peak resident set size of ``pid`` in bytes (VmHWM in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


async def test_eight_concurrent_migrations(tmp_path: Path) -> None:
    images_dir = tmp_path / "images"
    workloads: list[Workload] = []
    try:
        with receiver_process(images_dir, tmp_path / "receiver.log") as (receiver, address):
            hwm_idle = vm_hwm(receiver.pid)
            # 8..15 MiB each; every other one keeps writing, so pre-copy has rounds to run.
            for i in range(MIGRATIONS):
                workloads.append(start_workload(size_mib=8 + i, mutate=i % 2 == 0, seed=i + 1))
            outcomes = await asyncio.gather(*(send(SendConfig(pid=w.pid, target=address)) for w in workloads),
                                            return_exceptions=True)
            hwm = vm_hwm(receiver.pid)
            assert receiver.poll() is None, "the receiver died"

            results: list[SendResult] = []
            for w, outcome in zip(workloads, outcomes, strict=True):
                assert isinstance(outcome, SendResult), f"migration of {w.pid} failed: {outcome!r}"
                results.append(outcome)
            assert len({r.session_id for r in results}) == MIGRATIONS
            for w, result in zip(workloads, results, strict=True):
                assert result.left_stopped
                session = images_dir / result.session_id
                final = session / result.rounds[-1].directory
                report = verify_against_process(final, w.pid, dump_ranges(w.pid), PAGE_SIZE)
                assert report.mismatches == 0, f"{w.pid}: {report.mismatches} pages differ, first at " \
                                               f"{report.first_mismatch:#x}"
                assert report.pages_compared >= (8 << 20) // PAGE_SIZE
                integrity = verify_image_set(session)
                assert integrity.ok, format_report(integrity)
            assert hwm < RECEIVER_HWM_BOUND, \
                f"receiver peak RSS {hwm >> 20} MiB (idle {hwm_idle >> 20} MiB) exceeds {RECEIVER_HWM_BOUND >> 20} MiB"
    finally:
        for w in workloads:
            stop_process(w.proc)

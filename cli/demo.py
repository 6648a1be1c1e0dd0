"""``pagehaul demo``: migrate a live workload over loopback and check the result byte for byte.

Three processes, as in a real migration: a receiver (``pagehaul receive`` on 127.0.0.1, port
chosen by the kernel), a workload that keeps writing to its memory, and this process as the
sender. The workload is left stopped after the final dump so its memory can be compared with
what the receiver wrote; then it is killed and the receiver shut down with SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from cli.report import human_bytes, make_console, print_send_result, progress_display
from pagehaul import procfs
from pagehaul.errors import PagehaulError
from pagehaul.kernel import PAGE_SIZE
from pagehaul.oracle import Range, verify_against_process
from pagehaul.security import Security, TlsFiles, make_test_pki
from pagehaul.tune import tune_process
from sender.config import SendConfig
from sender.precopy import send

READY_PREFIX = "pagehaul receiver listening on "


def _start(cmd: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _first_line(proc: subprocess.Popen[str], what: str) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise PagehaulError(f"{what} exited before it was ready (exit code {proc.wait()})")
    return line.strip()


def _stop(proc: subprocess.Popen[str] | None, sig: signal.Signals) -> None:
    if proc is None:
        return
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            stream.close()


def dump_ranges(pid: int) -> list[Range]:
    return [Range(v.start, v.end, v.kind != procfs.VmaKind.FILE_PRIVATE)
            for v in procfs.select_dumpable(procfs.read_maps(pid))]


def run_demo(size_mib: int, images_dir: Path | None, force_pagemap_file: bool = False, tracker: str = "auto",
             full: bool = True) -> int:
    console = make_console()
    tune_process()
    tmp = None if images_dir else tempfile.mkdtemp(prefix="pagehaul-demo-")
    root = images_dir or Path(str(tmp))
    receiver = workload = None
    pki: Path | None = None
    try:
        pki = Path(tempfile.mkdtemp(prefix="pagehaul-demo-pki-"))
        make_test_pki(pki)
        receiver = _start([sys.executable, "-m", "cli", "receive", "--listen", "127.0.0.1:0",
                           "--images-dir", str(root), "--tls-cert", str(pki / "receiver.crt"),
                           "--tls-key", str(pki / "receiver.key"), "--tls-ca", str(pki / "ca.crt")])
        line = _first_line(receiver, "receiver")
        if not line.startswith(READY_PREFIX):
            raise PagehaulError(f"unexpected receiver output: {line!r}")
        address = line[len(READY_PREFIX):]
        console.print(f"[bold]receiver[/] pid {receiver.pid} on {address} (mutual TLS, test CA from "
                      f"'pagehaul certs'), images in {root}")

        t0 = time.monotonic()
        workload = _start([sys.executable, "-m", "pagehaul.workload", "--size-mib", str(size_mib), "--mutate"])
        info = json.loads(_first_line(workload, "workload").removeprefix("READY "))
        mix = ", ".join(f"{k} {human_bytes(v * PAGE_SIZE)}" for k, v in info["pages"].items())
        console.print(f"[bold]workload[/] pid {workload.pid}: {size_mib} MiB ({mix}), "
                      f"filled in {time.monotonic() - t0:.1f} s, now rewriting a hot region non-stop")

        cfg = SendConfig(pid=workload.pid, target=address, force_pagemap_file=force_pagemap_file,
                         tracker=tracker, leave_stopped=True,
                         security=Security(tls=TlsFiles(pki / "sender.crt", pki / "sender.key", pki / "ca.crt")))
        with progress_display() as progress:
            result = asyncio.run(send(cfg, progress))
        print_send_result(result, console=console)
        first, rnd = result.rounds[0], result.rounds[-1]
        rate = first.raw_bytes / max(first.memdump_time_us / 1e6, 1e-9)
        console.print(f"round 0 moved {human_bytes(first.raw_bytes)} of non-zero memory at {human_bytes(rate)}/s "
                      f"while the workload ran; it was frozen for {result.frozen_time_us / 1000:.0f} ms")
        round_dir = root / result.session_id / rnd.directory
        report = verify_against_process(round_dir, workload.pid, dump_ranges(workload.pid), PAGE_SIZE)
        if report.ok:
            console.print(f"[bold green]verified[/]: {report.pages_compared:,} pages of the stopped process "
                          f"equal the images in {round_dir} byte for byte")
            return 0 if not full else _full_migration(console, pki, root)
        where = f"{report.first_mismatch:#x}" if report.first_mismatch is not None else "-"
        console.print(f"[bold red]MISMATCH[/]: {report.mismatches} of {report.pages_compared} pages differ "
                      f"(first at {where})")
        return 1
    finally:
        if workload is not None:
            os.kill(workload.pid, signal.SIGKILL)
            _stop(workload, signal.SIGKILL)
        _stop(receiver, signal.SIGTERM)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if pki is not None:
            shutil.rmtree(pki, ignore_errors=True)


def _passes(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if line.startswith(("pass ", "BAD"))] if log.exists() else []


def _wait(cond: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise PagehaulError(f"demo: not within {timeout_s:g} s: {what}")
        time.sleep(0.05)


def _full_migration(console: Console, pki: Path, root: Path) -> int:
    """Act two: a process tree that checks its own memory, moved whole (``pagehaul migrate``) and
    restored by CRIU into a fresh PID namespace, where it goes on checking."""
    from cli.report import print_migrate_result
    from pagehaul.criu_tools import CriuTools
    from sender.migrate import MigrateConfig, migrate

    tools = CriuTools.locate()
    if tools is None:
        console.print("[yellow]full migration skipped[/]: no CRIU (scripts/install-criu.sh installs CRIU 4.2.1)")
        return 0
    console.rule("full migration: pagehaul moves the memory, CRIU the rest, restored in a fresh PID namespace")
    tls = ["--tls-cert", str(pki / "receiver.crt"), "--tls-key", str(pki / "receiver.key"), "--tls-ca",
           str(pki / "ca.crt")]
    receiver = _start([sys.executable, "-m", "cli", "receive", "--listen", "127.0.0.1:0", "--images-dir",
                       str(root / "full"), "--restore", "--criu", str(tools.criu), *tls])
    log = root / "selfcheck.log"
    outer: subprocess.Popen[str] | None = None
    pid = restored = 0
    try:
        line = _first_line(receiver, "receiver")
        address = line[len(READY_PREFIX):]
        outer = subprocess.Popen(["unshare", "--pid", "--fork", "setsid", sys.executable, "-m", "pagehaul.selfcheck",
                                  "--log", str(log), "--size-mib", "64", "--children", "2", "--shared-mib", "16"],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 text=True)
        children = Path(f"/proc/{outer.pid}/task/{outer.pid}/children")
        _wait(lambda: outer.poll() is not None or bool(children.read_text().split()), "the workload to start")
        pid = int(children.read_text().split()[0])
        _wait(lambda: len({ln.split()[-2] for ln in _passes(log)}) >= 3, "every workload process to check itself")
        console.print(f"[bold]workload[/] pid {pid}: init of its own PID namespace with 2 children; each writes "
                      "64 MiB of its own and checks it, all check a 16 MiB shared region")
        cfg = MigrateConfig(send=SendConfig(pid=pid, target=address, leave_stopped=True, security=Security(
            tls=TlsFiles(pki / "sender.crt", pki / "sender.key", pki / "ca.crt"))), criu=tools.criu)
        with progress_display() as progress:
            result = asyncio.run(migrate(cfg, progress))
        restored = result.restored_pid
        print_migrate_result(result, console=console)
        seen = len(_passes(log))
        _wait(lambda: len(_passes(log)) >= seen + 6, "the restored processes to check themselves again")
        after = _passes(log)[seen:]
        for ln in after[:6]:
            console.print(f"  restored: {ln}")
        if any(ln.startswith("BAD") for ln in after):
            console.print("[bold red]the restored workload found corrupt memory[/]")
            return 1
        console.print(f"[bold green]running on[/]: restored pid {restored} (pid 1 of a fresh PID namespace) and its "
                      "children keep verifying their memory; the source was killed after the restore")
        return 0
    finally:
        for p in (restored, pid):
            if p:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
        if outer is not None:
            outer.kill()
            outer.wait()
        _stop(receiver, signal.SIGTERM)

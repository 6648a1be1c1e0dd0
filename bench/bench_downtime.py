"""Downtime of a full migration between two hosts: ``pagehaul migrate`` vs CRIU's dump -> copy -> restore.

The hosts: two network namespaces joined by a veth pair shaped with tbf (``--rate``, default
1gbit), as in bench_shaped. The workload: ``python -m pagehaul.selfcheck`` (``--size-mib`` of
random data in regions it keeps rewriting at ``--rate-mib-s`` and verifying), as the init of its
own PID namespace in the source namespace; both paths restore it into a fresh one in the other.
Each rep starts a fresh workload for each path; the restored copy must log a verified pass on the
destination, else the run counts as failed.

* pagehaul: ``pagehaul migrate`` (pre-copy rounds, final frozen round, ``criu dump`` of the stopped
  tree into /dev/shm with the memory pagehaul moved dropped, the rest shipped, ``criu restore`` by
  the receiver). Downtime = end of the final freeze -> restored tree running, in the parts the
  sender reports.
* CRIU: ``criu dump`` into /dev/shm on the source (the tree frozen from its start), the image
  directory copied over the link by a plain TCP copy (sendfile) to the destination's disk,
  ``criu restore -d`` there. Downtime = dump + copy + restore.

    python -m bench.bench_downtime [--size-mib 1024] [--rate 1gbit] [--reps 1] [--downtime-ms 100]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from rich.console import Console
from rich.table import Table

from bench.bench_shaped import RECEIVER_ADDR, shaped_link
from bench.common import BenchError, in_netns, require_criu, require_root
from pagehaul.criu_tools import CriuTools

COPY_PORT: Final = 7311
READY_TIMEOUT_S: Final = 300.0
PARTS: Final = ("final_round_us", "criu_dump_us", "reduce_us", "ship_us", "assemble_us", "restore_us",
                 "lazy_fill_us")

_COPY_SINK = r"""
import os, socket, struct, sys
dest = sys.argv[3]; os.makedirs(dest, exist_ok=True)
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1)
print("ready", flush=True)
c, _ = s.accept(); f = c.makefile("rb")
while True:
    head = f.read(12)
    if len(head) < 12:
        break
    nlen, size = struct.unpack("<IQ", head)
    name = f.read(nlen).decode()
    with open(os.path.join(dest, name), "wb") as out:
        left = size
        while left:
            chunk = f.read(min(left, 1 << 22))
            out.write(chunk); left -= len(chunk)
c.sendall(b"k")
"""


def _copy_dir(src: Path, host: str, port: int) -> None:
    """Send every file of ``src`` to the copy sink (runs inside the source namespace via a child)."""
    import socket
    import struct

    with socket.create_connection((host, port)) as s:
        for path in sorted(src.iterdir()):
            if not path.is_file():
                continue
            size = path.stat().st_size
            s.sendall(struct.pack("<IQ", len(path.name), size) + path.name.encode())
            with path.open("rb") as f:
                sent = 0
                while sent < size:
                    sent += os.sendfile(s.fileno(), f.fileno(), sent, size - sent)
        s.shutdown(socket.SHUT_WR)
        s.recv(1)


@dataclass
class Workload:
    outer: subprocess.Popen[str]
    pid: int
    log: Path

    def passes(self) -> int:
        text = self.log.read_text() if self.log.exists() else ""
        if "BAD" in text:
            raise BenchError(f"the workload found corrupt memory: {text[-300:]}")
        return sum(1 for line in text.splitlines() if line.startswith("pass "))


@contextmanager
def workload(ns: str, size_mib: int, rate: float, log: Path) -> Iterator[Workload]:
    argv = [sys.executable, "-m", "pagehaul.selfcheck", "--log", str(log), "--size-mib", str(size_mib),
            "--regions", "64", "--rate-mib-s", str(rate)]
    outer = subprocess.Popen(in_netns(["unshare", "--pid", "--fork", "setsid", *argv], ns, "nsenter"),
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    pid = 0
    try:
        children = Path(f"/proc/{outer.pid}/task/{outer.pid}/children")
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not pid:
            text = children.read_text().split() if outer.poll() is None else []
            pid = int(text[0]) if text else 0
            if outer.poll() is not None or time.monotonic() > deadline:
                raise BenchError("the workload did not start")
            time.sleep(0.01)
        w = Workload(outer, pid, log)
        wait(lambda: w.passes() >= 2, "two verified passes of the workload")
        yield w
    finally:
        if pid:
            with_suppress_kill(pid)
        outer.kill()
        outer.wait()


def with_suppress_kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def wait(cond: object, what: str, timeout_s: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise BenchError(f"not within {timeout_s:g} s: {what}")
        time.sleep(0.02)


@dataclass
class Result:
    total_ms: float
    parts: dict[str, float] = field(default_factory=dict)


def run_pagehaul(ns_src: str, ns_dst: str, w: Workload, images: Path, tools: CriuTools, *,
                 downtime_ms: float, lazy: bool = False) -> Result:
    recv = subprocess.Popen(in_netns([sys.executable, "-m", "cli", "receive", "--insecure", "--listen",
                                      f"{RECEIVER_ADDR}:0", "--images-dir", str(images), "--restore",
                                      "--criu", str(tools.criu), *(["--lazy-restore"] if lazy else [])],
                                     ns_dst, "nsenter"),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert recv.stdout is not None
        line = recv.stdout.readline()
        if not line.startswith("pagehaul receiver listening on "):
            raise BenchError(f"receiver did not start: {line!r}")
        address = line.rsplit(" ", 1)[1].strip()
        proc = subprocess.run(in_netns([sys.executable, "-m", "cli", "migrate", "--insecure", "--json",
                                        "--pid", str(w.pid), "--to", address, "--criu", str(tools.criu),
                                        "--downtime-ms", str(downtime_ms)],
                                       ns_src, "nsenter"),
                              capture_output=True, text=True, check=False, timeout=READY_TIMEOUT_S)
        if proc.returncode != 0:
            raise BenchError(f"pagehaul migrate failed: {proc.stderr.strip().splitlines()[-1:]}")
        doc = json.loads(proc.stdout)
        restored = int(doc["restored_pid"])
        try:
            before = w.passes()
            wait(lambda: w.passes() > before, "a verified pass of the restored workload")
        finally:
            with_suppress_kill(restored)
        d = doc["downtime"]
        return Result(d["total_us"] / 1000, {k: d.get(k, 0) / 1000 for k in PARTS})
    finally:
        recv.kill()
        recv.wait()


def run_criu(ns_src: str, ns_dst: str, w: Workload, dst_dir: Path, tools: CriuTools) -> Result:
    local = Path(tempfile.mkdtemp(prefix="criu-dump-", dir="/dev/shm"))
    sink = subprocess.Popen(in_netns([sys.executable, "-c", _COPY_SINK, RECEIVER_ADDR, str(COPY_PORT),
                                      str(dst_dir)], ns_dst, "nsenter"),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert sink.stdout is not None
        if sink.stdout.readline().strip() != "ready":
            raise BenchError("copy sink did not start")
        t0 = time.monotonic()
        dump = subprocess.run(in_netns([str(tools.criu), "dump", "-t", str(w.pid), "-D", str(local), "-o",
                                        "dump.log"], ns_src, "nsenter"),
                              capture_output=True, text=True, check=False, timeout=READY_TIMEOUT_S)
        t1 = time.monotonic()
        if dump.returncode != 0:
            raise BenchError(f"criu dump failed: {(local / 'dump.log').read_text()[-500:]}")
        copy = subprocess.run(in_netns([sys.executable, "-c", "import sys; from bench.bench_downtime import "
                                        "_copy_dir; from pathlib import Path; "
                                        "_copy_dir(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]))",
                                        str(local), RECEIVER_ADDR, str(COPY_PORT)], ns_src, "nsenter"),
                              capture_output=True, text=True, check=False, timeout=READY_TIMEOUT_S)
        sink.wait(timeout=60)
        t2 = time.monotonic()
        if copy.returncode != 0:
            raise BenchError(f"copy failed: {copy.stderr[-300:]}")
        pidfile = dst_dir / "restored.pid"
        restore = subprocess.run(in_netns([str(tools.criu), "restore", "-D", str(dst_dir), "-d", "--pidfile",
                                           str(pidfile), "-o", "restore.log"], ns_dst, "nsenter"),
                                 capture_output=True, text=True, check=False, timeout=READY_TIMEOUT_S,
                                 stdin=subprocess.DEVNULL)
        t3 = time.monotonic()
        if restore.returncode != 0:
            raise BenchError(f"criu restore failed: {(dst_dir / 'restore.log').read_text()[-500:]}")
        restored = int(pidfile.read_text())
        try:
            before = w.passes()
            wait(lambda: w.passes() > before, "a verified pass of CRIU's restored workload")
        finally:
            with_suppress_kill(restored)
        return Result((t3 - t0) * 1000, {"criu_dump_us": (t1 - t0) * 1000, "ship_us": (t2 - t1) * 1000,
                                         "restore_us": (t3 - t2) * 1000})
    finally:
        sink.kill()
        sink.wait()
        shutil.rmtree(local, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--rate-mib-s", type=float, default=32.0, help="workload's writing rate")
    p.add_argument("--rate", default="1gbit", help="tbf rate of the link")
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--downtime-ms", type=float, default=100.0, help="pagehaul's pre-copy downtime target")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    p.add_argument("--lazy-restore", action="store_true",
                   help="also migrate to a receiver with --lazy-restore (a third column)")
    args = p.parse_args(argv)
    console = Console()
    try:
        require_root()
        tools = require_criu()
        results: dict[str, list[Result]] = {"pagehaul migrate": [], "criu dump -> copy -> restore": []}
        if args.lazy_restore:
            results["pagehaul lazy-restore"] = []
        with shaped_link(args.rate, "256kb", "50ms") as link, \
                tempfile.TemporaryDirectory(dir=args.workdir, prefix="bench-downtime-") as tmp:
            for rep in range(args.reps):
                for name, rs in results.items():
                    run_dir = Path(tmp) / f"{rep}-{name.split()[0]}-{name.split()[-1]}"
                    run_dir.mkdir()
                    with workload(link.sender_ns, args.size_mib, args.rate_mib_s, run_dir / "selfcheck.log") as w:
                        if name.startswith("pagehaul"):
                            r = run_pagehaul(link.sender_ns, link.receiver_ns, w, run_dir / "images", tools,
                                             downtime_ms=args.downtime_ms, lazy=name.endswith("lazy-restore"))
                        else:
                            r = run_criu(link.sender_ns, link.receiver_ns, w, run_dir / "criu", tools)
                    rs.append(r)
                    console.print(f"rep {rep} {name}: downtime {r.total_ms:.0f} ms")
    except BenchError as err:
        console.print(f"[red]bench_downtime: {err}[/]")
        return 1
    table = Table(title=f"downtime of a full migration, {args.size_mib} MiB self-checking workload writing "
                        f"{args.rate_mib_s:g} MiB/s, veth shaped to {args.rate} (median of {args.reps})",
                  title_justify="left")
    table.add_column("part (ms)")
    for name in results:
        table.add_column(name, justify="right")
    labels = {"final_round_us": "final round (frozen)", "criu_dump_us": "criu dump (local)",
              "reduce_us": "drop moved memory", "ship_us": "ship / copy images", "assemble_us": "assemble",
              "restore_us": "criu restore", "lazy_fill_us": "lazy pages in, after the tree runs (not downtime)"}

    def med(rs: list[Result], key: str | None) -> str:
        vals = sorted(r.total_ms if key is None else r.parts.get(key, 0.0) for r in rs)
        return f"{vals[len(vals) // 2]:.0f}" if vals else "-"

    for key, label in labels.items():
        table.add_row(label, *(med(rs, key) for rs in results.values()))
    table.add_row("[bold]total downtime[/]", *(f"[bold]{med(rs, None)}[/]" for rs in results.values()))
    console.print(table)
    medians = {name: sorted(r.total_ms for r in rs)[len(rs) // 2] for name, rs in results.items()}
    theirs = medians["criu dump -> copy -> restore"]
    for name, ms in medians.items():
        if name.startswith("pagehaul"):
            console.print(f"{name} downtime = {ms / theirs:.3f} x CRIU's dump -> copy -> restore")
    return 0


if __name__ == "__main__":
    sys.exit(main())

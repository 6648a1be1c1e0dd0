"""Shared helpers for the benchmarks: processes, workloads, receivers, CRIU runs, foreign load, tables.

How every benchmark measures (and so how far to trust the numbers):

* Each tool runs as its own process, as it would in production: the workload
  (``python -m pagehaul.workload``), ``pagehaul receive`` / ``criu page-server``, and
  ``pagehaul send`` / ``criu dump``. Wall time, CPU time and peak RSS of a command come from
  ``wait4`` on that very process (``ru_maxrss`` is its VmHWM), so they are per process.
* Compared tools run interleaved, round-robin, ``--reps`` times (the order rotates every
  repetition); tables show the median with min-max.
* ``foreign`` is the CPU (in cores) used during a measurement by user-space processes that are
  not descendants of the benchmark, from ``/proc/PID/stat`` (utime + stime + cutime + cstime,
  so that children reaped during the window are counted). Kernel threads are left out: the
  softirq and writeback work the benchmark itself causes would otherwise count as foreign.
  Before each measurement the benchmark waits (up to ``--max-quiet-wait-s``) for foreign load
  under ``--quiet-cores``; a measurement disturbed by more is run again (up to ``--redo``
  times) and, if still disturbed, kept and marked with ``!``.
* Images go to a fresh directory under ``--workdir`` (default /var/tmp, the ext4 disk), removed
  after each run, followed by an untimed ``sync`` so no run pays for the previous one's
  writeback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final, Literal

from rich.console import Console
from rich.table import Table

from pagehaul.criu_tools import CRIU_VERSION, CriuTools, default_prefix
from pagehaul.errors import PagehaulError

REPO_ROOT: Final = Path(__file__).resolve().parents[1]
RESULTS_DIR: Final = REPO_ROOT / "bench" / "results"
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
MIB: Final = 1 << 20
FULL_SIZE_MIB: Final = 1024
QUICK_SIZE_MIB: Final = 128
PF_KTHREAD: Final = 0x00200000  # task flag of kernel threads (include/linux/sched.h)
START_TIMEOUT_S: Final = 600.0  # filling a large workload takes a while on a loaded machine
RUN_TIMEOUT_S: Final = 900.0


class BenchError(Exception):
    """A prerequisite is missing or the benchmark cannot go on; printed as one line, no traceback."""


class RunFailed(BenchError):
    """One measured run failed (a tool exited non-zero); the benchmark records it and goes on."""


# === prerequisites ==============================================================================


def require_root() -> None:
    if os.geteuid() != 0:
        raise BenchError("must run as root (ptrace, /proc/PID/pagemap, criu, ip netns); "
                         "e.g. sudo .venv/bin/python -m bench.run_all")


def require_commands(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        raise BenchError(f"missing command(s): {', '.join(missing)} (install iproute2 / util-linux)")


def require_criu() -> CriuTools:
    tools = CriuTools.locate()
    if tools is None:
        raise BenchError(f"CRIU {CRIU_VERSION} is not installed under {default_prefix()}: "
                         "run scripts/install-criu.sh (or set PAGEHAUL_CRIU_PREFIX)")
    try:
        version = tools.criu_version()
    except PagehaulError as err:
        raise BenchError(f"{tools.criu} does not run ({err}); re-run scripts/install-criu.sh") from err
    if not version.startswith("4.2"):
        raise BenchError(f"{tools.criu} is CRIU {version}, the benchmarks compare with 4.2; "
                         "re-run scripts/install-criu.sh")
    return tools


def pagehaul_argv() -> list[str]:
    """The ``pagehaul`` console script of the running venv, else ``python -m cli``."""
    script = Path(sys.executable).with_name("pagehaul")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "cli"]


# === child processes ============================================================================


@dataclass(frozen=True, slots=True)
class ExitInfo:
    """How a child ended and what it used (from wait4; RSS is the peak, ``VmHWM``)."""

    returncode: int
    wall_s: float
    user_s: float
    sys_s: float
    maxrss_kib: int

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s


NetnsMode = Literal["exec", "nsenter"]


def in_netns(argv: Sequence[str], netns: str | None, how: NetnsMode = "exec") -> list[str]:
    """``argv`` run in network namespace ``netns`` (both wrappers exec, so the pid stays the same).

    ``ip netns exec`` also enters a new mount namespace (to remount /sys); ``nsenter --net``
    changes the network namespace only, which CRIU needs: it would try to dump the mount
    namespace of a target that is not in its own.
    """
    if netns is None:
        return list(argv)
    if how == "exec":
        return ["ip", "netns", "exec", netns, *argv]
    return ["nsenter", f"--net=/run/netns/{netns}", "--", *argv]


GNU_TIME: Final = "/usr/bin/time"


def gnu_time() -> str | None:
    """GNU time, if installed: the exact peak RSS of a command started by a large parent (see Child)."""
    return GNU_TIME if os.access(GNU_TIME, os.X_OK) else None


def rss_method() -> str:
    """How peak RSS is measured here, for the reports."""
    if gnu_time() is not None:
        return "peak RSS of the command itself (GNU time %M, i.e. its ru_maxrss)"
    return ("ru_maxrss from wait4 -- an upper bound: it includes the benchmark's own RSS at spawn; "
            "install GNU time (/usr/bin/time) for exact numbers")


class Child:
    """A child process whose exit is awaited with a pidfd and reaped with wait4 (for its rusage).

    ``ru_maxrss`` of a child counts the memory of the process it was forked from: Linux records
    the peak RSS of the mm that ``execve`` replaces, and Python spawns with vfork, whose mm is
    the benchmark's own (tens to hundreds of MiB). With ``measure=True`` the command runs under
    GNU time, a small C process that forks and waits for it, and the peak RSS and CPU times are
    the command's own (``%M %U %S``); ``pid`` is then GNU time's.
    """

    def __init__(self, argv: Sequence[str], *, stdout: int | IO[Any] = subprocess.DEVNULL,
                 stderr: int | IO[Any] = subprocess.DEVNULL, env: dict[str, str] | None = None,
                 new_session: bool = False, pass_fds: Sequence[int] = (), cwd: Path | None = None,
                 measure: bool = False) -> None:
        self.argv = list(argv)
        self._usage_file: Path | None = None
        timer = gnu_time() if measure else None
        if timer is not None:
            fd, name = tempfile.mkstemp(prefix="pagehaul-bench-time-")
            os.close(fd)
            self._usage_file = Path(name)
            self.argv = [timer, "-o", name, "-f", "%M %U %S", *self.argv]
        self.t0 = time.monotonic()
        try:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                         env=env, start_new_session=new_session, pass_fds=tuple(pass_fds),
                                         cwd=cwd)
        except OSError as err:
            raise BenchError(f"cannot run {self.argv[0]}: {err.strerror or err}") from err
        self.pid = self.proc.pid
        self._pidfd = os.pidfd_open(self.pid)
        self.exit: ExitInfo | None = None

    def wait(self, timeout_s: float | None = None) -> ExitInfo | None:
        """The exit info once the child has exited; None if it is still running after ``timeout_s``."""
        if self.exit is not None:
            return self.exit
        ready, _, _ = select.select([self._pidfd], [], [], timeout_s)
        if not ready:
            return None
        _, status, ru = os.wait4(self.pid, 0)
        t1 = time.monotonic()
        os.close(self._pidfd)
        code = os.waitstatus_to_exitcode(status)
        self.proc.returncode = code  # reaped here: keep Popen from waiting again
        maxrss, user, sys_ = ru.ru_maxrss, ru.ru_utime, ru.ru_stime
        if self._usage_file is not None:
            with contextlib.suppress(OSError, ValueError, IndexError):
                last = self._usage_file.read_text().strip().splitlines()[-1].split()
                maxrss, user, sys_ = int(last[0]), float(last[1]), float(last[2])
            self._usage_file.unlink(missing_ok=True)
        self.exit = ExitInfo(code, t1 - self.t0, user, sys_, maxrss)
        return self.exit

    def send_signal(self, sig: int) -> None:
        if self.exit is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> ExitInfo:
        """Send ``sig``, wait up to ``timeout_s``, then SIGKILL; always reaps."""
        self.send_signal(sig)
        info = self.wait(timeout_s)
        if info is None:
            self.send_signal(signal.SIGKILL)
            info = self.wait(None)
        assert info is not None
        return info


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a live process, in seconds (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _thread_states(pid: int) -> list[str]:
    states = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                states.append(f.read().rsplit(b")", 1)[1].split()[0].decode())
    return states


def wait_sleeping(pid: int, timeout_s: float = 10.0) -> None:
    """Wait until every thread of ``pid`` sleeps twice in a row (its memory is then quiescent)."""
    deadline = time.monotonic() + timeout_s
    calm = 0
    while calm < 2 and time.monotonic() < deadline:
        states = _thread_states(pid)
        calm = calm + 1 if states and all(s in "SD" for s in states) else 0
        time.sleep(0.02)


def sync_disk() -> None:
    """Untimed: flush what earlier runs left dirty so that the next one does not pay for it."""
    os.sync()


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def new_dir(parent: Path, name: str) -> Path:
    path = parent / name
    remove_tree(path)
    path.mkdir(parents=True)
    return path


# === workload ===================================================================================


@dataclass(slots=True)
class Workload:
    child: Child
    info: dict[str, Any]

    @property
    def pid(self) -> int:
        return self.child.pid

    def alive(self) -> bool:
        return self.child.wait(0) is None

    def cpu_s(self) -> float:
        """CPU seconds the workload used so far (user + system, its threads included): CRIU's
        parasite runs inside it, so a dump's share is the difference around the dump."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.child.stop(signal.SIGKILL)


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    """Arguments of ``python -m pagehaul.workload``; equal specs give identical memory contents."""

    size_mib: int
    seed: int = 1
    dirty_mib_per_s: float = 0.0
    small_vmas: int = 0
    small_vma_kib: int = 40
    sparse_mib: int = 0
    sparse_written_pct: float = 1.0

    def argv(self, ready_file: Path) -> list[str]:
        argv = [sys.executable, "-m", "pagehaul.workload", "--size-mib", str(self.size_mib), "--seed", str(self.seed),
                "--exact-mix", "--ready-file", str(ready_file), "--detach"]
        if self.dirty_mib_per_s:
            argv += ["--dirty-mib-per-s", f"{self.dirty_mib_per_s:g}"]
        if self.small_vmas:
            argv += ["--small-vmas", str(self.small_vmas), "--small-vma-kib", str(self.small_vma_kib)]
        if self.sparse_mib:
            argv += ["--sparse-mib", str(self.sparse_mib), "--sparse-written-pct", f"{self.sparse_written_pct:g}"]
        return argv

    def describe(self) -> str:
        parts = [f"{self.size_mib} MiB mix (zero/random/text/structs, 1/4 each, seed {self.seed})"]
        if self.dirty_mib_per_s:
            parts.append(f"dirtying {self.dirty_mib_per_s:g} MiB/s")
        if self.small_vmas:
            parts.append(f"{self.small_vmas} VMAs of {self.small_vma_kib} KiB")
        if self.sparse_mib:
            parts.append(f"{self.sparse_mib} MiB mapping {self.sparse_written_pct:g}% written")
        return ", ".join(parts)


_workload_counter = 0


def start_workload(spec: WorkloadSpec, workdir: Path, netns: str | None = None) -> Workload:
    """Start a detached workload (own session, no pipes: CRIU can dump it) and wait until it is ready."""
    global _workload_counter  # noqa: PLW0603 -- unique file names within one benchmark process
    _workload_counter += 1
    ready = workdir / f"workload-{_workload_counter}.ready"
    err_path = workdir / f"workload-{_workload_counter}.err"
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")  # one thread: a quiet target
    with err_path.open("wb") as err:
        child = Child(in_netns(spec.argv(ready), netns, "nsenter"), stderr=err, env=env, new_session=True,
                      cwd=REPO_ROOT)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready.exists():
        info = child.wait(0.05)
        if info is not None:
            raise BenchError(f"workload exited with status {info.returncode} before it was ready: {_tail(err_path)}")
        if time.monotonic() > deadline:
            child.stop(signal.SIGKILL)
            raise BenchError(f"workload not ready after {START_TIMEOUT_S:g} s")
    doc = json.loads(ready.read_text().removeprefix("READY "))
    if doc["pid"] != child.pid:
        child.stop(signal.SIGKILL)
        raise BenchError(f"workload reports pid {doc['pid']}, started as {child.pid}")
    wait_sleeping(child.pid)
    return Workload(child, doc)


# === pagehaul ===================================================================================

RECEIVER_READY: Final = "pagehaul receiver listening on "
# CRIU's page server is plain TCP, so the comparisons run pagehaul without TLS too.
INSECURE: Final = ("--insecure",)


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Test certificates from ``pagehaul certs`` (receiver valid for 127.0.0.1 and localhost)."""

    directory: Path

    @classmethod
    def make(cls, directory: Path) -> TlsFiles:
        proc = subprocess.run([*pagehaul_argv(), "certs", "--out", str(directory)], check=False,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise BenchError(f"pagehaul certs failed: {proc.stderr.strip()}")
        return cls(directory)

    def args(self, side: Literal["sender", "receiver"]) -> tuple[str, ...]:
        d = self.directory
        return ("--tls-cert", str(d / f"{side}.crt"), "--tls-key", str(d / f"{side}.key"),
                "--tls-ca", str(d / "ca.crt"))


@dataclass(slots=True)
class PagehaulReceiver:
    child: Child
    address: str
    images_dir: Path

    def cpu_s(self) -> float:
        return proc_cpu_s(self.child.pid)

    def stop(self) -> ExitInfo:
        return self.child.stop(signal.SIGTERM)


def start_pagehaul_receiver(images_dir: Path, log_dir: Path, host: str = "127.0.0.1",
                            netns: str | None = None, security: Sequence[str] = INSECURE, *,
                            extra: Sequence[str] = ()) -> PagehaulReceiver:
    images_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / "receiver.err"
    argv = [*pagehaul_argv(), "receive", "--listen", f"{host}:0", "--images-dir", str(images_dir), *security,
            *extra]
    with log.open("ab") as err:
        child = Child(in_netns(argv, netns), stdout=subprocess.PIPE, stderr=err)
    assert child.proc.stdout is not None
    ready, _, _ = select.select([child.proc.stdout], [], [], 60)
    line = child.proc.stdout.readline().decode(errors="replace").strip() if ready else ""
    if not line.startswith(RECEIVER_READY):
        child.stop(signal.SIGKILL)
        raise BenchError(f"pagehaul receive did not start ({line or 'no output'}): {_tail(log)}")
    return PagehaulReceiver(child, line.removeprefix(RECEIVER_READY), images_dir)


@dataclass(frozen=True, slots=True)
class SendRun:
    """``pagehaul send --json`` output (SendResult as a dict) and the process's own numbers."""

    result: dict[str, Any]
    exit: ExitInfo
    log: Path | None = None  # the sender's stderr

    @property
    def rounds(self) -> list[dict[str, Any]]:
        rounds: list[dict[str, Any]] = self.result["rounds"]
        return rounds

    @property
    def pages_dumped(self) -> int:
        """Pages of the first round: present pages, zero pages included (they travel as holes)."""
        first = self.rounds[0]
        return int(first["pages_written"]) + int(first["pages_zero"]) + int(first["pages_unreadable"])

    @property
    def total_s(self) -> float:
        return float(self.result["total_time_us"]) / 1e6

    @property
    def frozen_ms(self) -> float:
        return float(self.result["frozen_time_us"]) / 1e3


def pagehaul_send(pid: int, address: str, log_dir: Path, *, tracker: str = "none", resume: bool = True,
                  extra: Sequence[str] = (), netns: str | None = None, wrap: Sequence[str] = (),
                  security: Sequence[str] = INSECURE, timeout_s: float = RUN_TIMEOUT_S,
                  debug_log: bool = False) -> SendRun:
    """Run ``pagehaul send --json --quiet`` as a child process and wait for it (RunFailed on error).

    ``debug_log``: run it with ``-vv`` (its log goes to ``send.err``; see :func:`final_round_breakdown`).
    """
    out_path, err_path = log_dir / "send.json", log_dir / "send.err"
    argv = [*pagehaul_argv(), *(["-v", "-v"] if debug_log else []), "send", "--pid", str(pid), "--to", address,
            "--tracker", tracker, "--json", "--quiet", *(["--resume"] if resume else []), *security, *extra]
    with out_path.open("wb") as out, err_path.open("wb") as err:
        child = Child(in_netns([*wrap, *argv], netns, "nsenter"), stdout=out, stderr=err, measure=not wrap)
    info = child.wait(timeout_s)
    if info is None:
        child.stop(signal.SIGKILL)
        raise RunFailed(f"pagehaul send timed out after {timeout_s:g} s")
    if info.returncode != 0:
        raise RunFailed(f"pagehaul send exited {info.returncode}: {_tail(err_path, 1)}")
    text = out_path.read_text()
    try:  # a wrapper (py-spy) may print lines of its own around the JSON
        result, _ = json.JSONDecoder().raw_decode(text, max(text.find("{"), 0))
    except json.JSONDecodeError as err:
        raise RunFailed(f"pagehaul send printed no JSON: {err}") from err
    return SendRun(result, info, err_path)



_FINAL_COLLECT: Final = re.compile(r"final round: scan\+collect (\d+) us, plan (\d+) us")
_FINAL_SEND: Final = re.compile(r"final round: send (\d+) us, commit (\d+) us")


def final_round_breakdown(run: SendRun) -> dict[str, float]:
    """The frozen round's phases in ms, from the sender's debug log (``pagehaul_send(debug_log=True)``).

    ``collect``: scan + dirty collection; ``plan``; ``stream``: round_begin to round_end written
    (holes and data, the round's memdump_time_us); ``after_stream``: the sender's bookkeeping after
    round_end (the receiver's holdings for a next round); ``commit_wait``: round_end written to the
    receiver's RoundCommitted (its queued decoding and writes, fsync, rename). Empty without the log lines.
    """
    text = run.log.read_text(errors="replace") if run.log is not None and run.log.is_file() else ""
    collect, send = _FINAL_COLLECT.findall(text), _FINAL_SEND.findall(text)
    if not collect or not send:
        return {}
    stream_us = float(run.rounds[-1]["memdump_time_us"])
    send_us = float(send[-1][0])
    return {"collect_ms": float(collect[-1][0]) / 1e3, "plan_ms": float(collect[-1][1]) / 1e3,
            "stream_ms": stream_us / 1e3, "after_stream_ms": max(send_us - stream_us, 0.0) / 1e3,
            "commit_wait_ms": float(send[-1][1]) / 1e3}


_ADAPTIVE: Final = re.compile(r"adaptive compression: level (\S+) -> (\S+) ")
LEVEL_OFF: Final = -100.0  # stands for "no compression" among the zstd levels in a sample's values


def adaptive_levels(run: SendRun) -> dict[str, float]:
    """Where ``--zstd-level auto`` went, from the sender's log (needs ``debug_log``): the last level
    (``LEVEL_OFF`` for none) and how many steps it took. Empty when the log has no such line."""
    text = run.log.read_text(errors="replace") if run.log is not None and run.log.is_file() else ""
    steps = _ADAPTIVE.findall(text)
    if not steps:
        return {}
    last = steps[-1][1]
    return {"zstd_last": LEVEL_OFF if last == "None" else float(last), "zstd_steps": float(len(steps))}


def fmt_level(level: float) -> str:
    return "off" if level == LEVEL_OFF else f"{level:g}"

def send_values(run: SendRun) -> dict[str, float]:
    """The numbers every pagehaul row shows: times, CPU and peak RSS of ``pagehaul send``."""
    return {"wall_s": run.exit.wall_s, "tool_s": run.total_s, "frozen_ms": run.frozen_ms,
            "memdump_s": float(run.rounds[0]["memdump_time_us"]) / 1e6, "sender_cpu_s": run.exit.cpu_s,
            "sender_rss_mib": run.exit.maxrss_kib / 1024}


@dataclass(frozen=True, slots=True)
class PagehaulRun:
    send: SendRun
    receiver_cpu_s: float


def run_pagehaul(pid: int, run_dir: Path, window: Window, *, host: str = "127.0.0.1", receiver_netns: str | None = None,
                 sender_netns: str | None = None, tls: TlsFiles | None = None, **send_kw: Any) -> PagehaulRun:
    """``pagehaul receive`` into ``run_dir/images``, one timed ``pagehaul send`` to it, the receiver stopped.

    ``send_kw`` goes to :func:`pagehaul_send` (tracker, extra, resume, debug_log, ...).
    """
    recv = start_pagehaul_receiver(run_dir / "images", run_dir, host=host, netns=receiver_netns,
                                   security=tls.args("receiver") if tls else INSECURE)
    try:
        cpu0 = recv.cpu_s()
        with window.timed():
            out = pagehaul_send(pid, recv.address, run_dir, netns=sender_netns,
                                security=tls.args("sender") if tls else INSECURE, **send_kw)
        recv_cpu = recv.cpu_s() - cpu0
    finally:
        recv.stop()
    return PagehaulRun(out, recv_cpu)


@contextlib.contextmanager
def run_directory(parent: Path, name: str) -> Iterator[Path]:
    """A fresh directory for one measured run, removed afterwards and followed by an untimed ``sync``."""
    d = new_dir(parent, name)
    try:
        yield d
    finally:
        remove_tree(d)
        sync_disk()


@contextlib.contextmanager
def running_workload(spec: WorkloadSpec, workdir: Path, netns: str | None = None) -> Iterator[Workload]:
    """A workload for the duration of the block, killed afterwards whatever happens."""
    w = start_workload(spec, workdir, netns=netns)
    try:
        yield w
    finally:
        w.stop()

# === CRIU =======================================================================================


@dataclass(frozen=True, slots=True)
class CriuRun:
    dump: ExitInfo
    wall_s: float  # dump start until the dump and its page server (if any) have both exited
    stats: dict[str, int]
    server: ExitInfo | None = None

    @property
    def pages_dumped(self) -> int:
        return int(self.stats["pages_written"])


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def start_criu_page_server(tools: CriuTools, images_dir: Path, host: str, port: int, *,
                           netns: str | None = None, log_level: int = 2) -> Child:
    """``criu page-server`` on ``host:port``; returns once it listens (its --status-fd said so)."""
    images_dir.mkdir(parents=True, exist_ok=True)
    r, w = os.pipe()
    argv = [str(tools.criu), "page-server", "--images-dir", str(images_dir), "--address", host, "--port", str(port),
            "--status-fd", str(w), "-o", "page-server.log", f"-v{log_level}"]
    try:
        child = Child(in_netns(argv, netns), pass_fds=(w,))
    finally:
        os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], 60)
        status = os.read(r, 1) if ready else b""
    finally:
        os.close(r)
    if status != b"\0":
        child.stop(signal.SIGKILL)
        raise BenchError(f"criu page-server did not start: {_tail(images_dir / 'page-server.log')}")
    return child


def criu_dump(tools: CriuTools, pid: int, images_dir: Path, *, leave_running: bool,
              page_server: tuple[str, int, Child] | None = None, netns: str | None = None, log_level: int = 2,
              timeout_s: float = RUN_TIMEOUT_S) -> CriuRun:
    """``criu dump --shell-job`` of ``pid`` into ``images_dir`` (pages to ``page_server`` if given)."""
    images_dir.mkdir(parents=True, exist_ok=True)
    argv = [str(tools.criu), "dump", "-t", str(pid), "-D", str(images_dir), "--shell-job", "-o", "dump.log",
            f"-v{log_level}"]
    if leave_running:
        argv.append("--leave-running")
    if page_server is not None:
        argv += ["--page-server", "--address", page_server[0], "--port", str(page_server[1])]
    t0 = time.monotonic()
    child = Child(in_netns(argv, netns, "nsenter"), measure=True)
    info = child.wait(timeout_s)
    if info is None:
        child.stop(signal.SIGKILL)
        raise RunFailed(f"criu dump timed out after {timeout_s:g} s")
    server_info = None
    if page_server is not None:
        server_info = page_server[2].wait(60 if info.returncode == 0 else 5) or page_server[2].stop(signal.SIGKILL)
    wall = time.monotonic() - t0 if server_info is not None else info.wall_s
    if info.returncode != 0:
        raise RunFailed(f"criu dump exited {info.returncode}: {_tail(images_dir / 'dump.log', 2)}")
    if server_info is not None and server_info.returncode != 0:
        raise RunFailed(f"criu page-server exited {server_info.returncode}")
    return CriuRun(info, wall, criu_stats(tools, images_dir), server_info)


def criu_stats(tools: CriuTools, images_dir: Path) -> dict[str, int]:
    """CRIU's dump statistics (stats.proto dump_stats_entry; times in microseconds), through crit."""
    try:
        doc = tools.crit_decode(images_dir / "stats-dump")
    except PagehaulError as err:
        raise RunFailed(f"cannot decode {images_dir / 'stats-dump'}: {err}") from err
    dump: dict[str, int] = doc["entries"][0]["dump"]
    return dump


# === foreign load ===============================================================================


def _proc_table() -> dict[int, tuple[int, int, int]]:
    """pid -> (ppid, flags, utime + stime + cutime + cstime in ticks) for every process."""
    table: dict[int, tuple[int, int, int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        table[int(name)] = (int(fields[1]), int(fields[6]), sum(int(x) for x in fields[11:15]))
    return table


def _foreign_ticks() -> int:
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    mine: set[int] = set()
    todo = [os.getpid()]
    while todo:
        pid = todo.pop()
        mine.add(pid)
        todo.extend(children.get(pid, ()))
    ancestors: set[int] = set()
    pid = os.getpid()
    while pid in table and pid not in ancestors and pid > 1:  # idle parents (run_all, the shell) are ours too
        ancestors.add(pid)
        pid = table[pid][0]
    return sum(ticks for pid, (_, flags, ticks) in table.items()
               if pid not in mine and pid not in ancestors and not flags & PF_KTHREAD)


class ForeignLoad:
    """CPU used by other people's processes between start() and cores()."""

    def __init__(self) -> None:
        self._t0 = time.monotonic()
        self._ticks0 = _foreign_ticks()

    def cores(self) -> float:
        dt = time.monotonic() - self._t0
        return max(0.0, (_foreign_ticks() - self._ticks0) / CLK_TCK / dt) if dt > 0 else 0.0


@dataclass(frozen=True, slots=True)
class QuietPolicy:
    threshold_cores: float = 0.15
    max_wait_s: float = 60.0
    redo: int = 2

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> QuietPolicy:
        return cls(args.quiet_cores, args.max_quiet_wait_s, args.redo)


def wait_quiet(policy: QuietPolicy, console: Console, sample_s: float = 1.0) -> float:
    """Wait until foreign load over ``sample_s`` is under the threshold, at most ``max_wait_s``."""
    deadline = time.monotonic() + policy.max_wait_s
    said = False
    while True:
        load = ForeignLoad()
        time.sleep(sample_s)
        cores = load.cores()
        if cores < policy.threshold_cores:
            return cores
        if time.monotonic() >= deadline:
            console.print(f"    [yellow]machine still busy ({cores:.2f} foreign cores); measuring anyway[/]")
            return cores
        if not said:
            console.print(f"    waiting for a quiet machine ({cores:.2f} foreign cores) ...")
            said = True


class Window:
    """The timed part of one measurement: waits for a quiet machine first, records foreign load."""

    def __init__(self, policy: QuietPolicy, console: Console) -> None:
        self.policy = policy
        self.console = console
        self.foreign_cores = 0.0
        self.used = False

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        wait_quiet(self.policy, self.console)
        load = ForeignLoad()
        self.used = True
        try:
            yield
        finally:
            self.foreign_cores = load.cores()


# === repetitions ================================================================================


@dataclass(slots=True)
class Sample:
    values: dict[str, float]
    foreign_cores: float
    attempts: int
    error: str = ""
    disturbed: bool = False


RunOne = Callable[[str, int, Window], dict[str, float]]


def interleave(names: Sequence[str], reps: int, run_one: RunOne, policy: QuietPolicy, console: Console, *,
               summary: Callable[[str, dict[str, float]], str] | None = None) -> dict[str, list[Sample]]:
    """Run ``run_one(name, rep, window)`` for every name, round-robin, ``reps`` times.

    The order rotates each repetition, so no tool always runs first or after the same one.
    A run disturbed by foreign load is repeated; a failing run (RunFailed) is recorded and the
    benchmark goes on.
    """
    results: dict[str, list[Sample]] = {n: [] for n in names}
    for rep in range(reps):
        k = rep % len(names)
        for name in [*names[k:], *names[:k]]:
            for attempt in range(1, policy.redo + 2):
                window = Window(policy, console)
                try:
                    values = run_one(name, rep, window)
                except RunFailed as err:
                    console.print(f"  rep {rep + 1}/{reps} {name}: [red]failed[/]: {err}")
                    results[name].append(Sample({}, window.foreign_cores, attempt, str(err)))
                    break
                disturbed = window.foreign_cores >= policy.threshold_cores
                shown = summary(name, values) if summary else ""
                mark = " [yellow]disturbed[/]" if disturbed else ""
                console.print(f"  rep {rep + 1}/{reps} {name}: {shown} foreign {window.foreign_cores:.2f}{mark}")
                if not disturbed or attempt > policy.redo:
                    results[name].append(Sample(values, window.foreign_cores, attempt, disturbed=disturbed))
                    break
                console.print("    re-running the disturbed measurement")
    return results


# === statistics and formatting ==================================================================


def ok_samples(samples: Sequence[Sample]) -> list[Sample]:
    return [s for s in samples if not s.error]


def values(samples: Sequence[Sample], key: str) -> list[float]:
    return [s.values[key] for s in samples if not s.error and key in s.values]


def median(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None


def fmt_stat(xs: Sequence[float], spec: str = ".0f") -> str:
    """``median (min-max)``, or the value alone for one sample, or ``-``."""
    if not xs:
        return "-"
    med = format(statistics.median(xs), spec)
    if len(xs) == 1 or min(xs) == max(xs):
        return med
    return f"{med} ({format(min(xs), spec)}-{format(max(xs), spec)})"


def fmt_foreign(samples: Sequence[Sample]) -> str:
    xs = [s.foreign_cores for s in samples]
    if not xs:
        return "-"
    text = f"{statistics.median(xs):.2f} (max {max(xs):.2f})"
    return text + " !" if any(s.disturbed for s in samples) else text


def fmt_errors(samples: Sequence[Sample]) -> str:
    errors = [s.error for s in samples if s.error]
    return f"{len(errors)} failed: {errors[0]}" if errors else ""


def mib(nbytes: float) -> float:
    return nbytes / MIB


# === reports ====================================================================================


@dataclass(frozen=True, slots=True)
class Ratio:
    name: str
    value: float | None
    target: str
    ok: bool | None  # None: could not be measured
    how: str

    @property
    def verdict(self) -> str:
        return "n/a" if self.ok is None else ("PASS" if self.ok else "MISS")


@dataclass(slots=True)
class _Section:
    title: str
    columns: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    text: str = ""


def make_console() -> Console:
    return Console() if sys.stdout.isatty() else Console(width=160)


class Report:
    """Tables, notes and ratios of one benchmark: printed with rich, optionally written as Markdown."""

    def __init__(self, title: str, args: argparse.Namespace) -> None:
        self.title = title
        self.args = args
        self.command = command_line()
        self.sections: list[_Section] = []
        self.ratios: list[Ratio] = []

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        self.sections.append(_Section(title, list(columns), [list(r) for r in rows]))

    def note(self, text: str) -> None:
        self.sections.append(_Section("", text=text))

    def ratio(self, name: str, value: float | None, target: str, ok: bool | None, how: str) -> None:
        self.ratios.append(Ratio(name, value, target, ok, how))

    def print(self, console: Console) -> None:
        console.rule(f"[bold]{self.title}")
        for s in self.sections:
            if s.text:
                console.print(s.text, highlight=False)
                continue
            table = Table(title=s.title, title_justify="left")
            numeric = _numeric_columns(s)
            for i, col in enumerate(s.columns):
                table.add_column(col, justify="right" if numeric[i] else "left")
            for row in s.rows:
                table.add_row(*row)
            console.print(table)
        if self.ratios:
            console.print("[bold]ratios[/]")
            for r in self.ratios:
                colour = {"PASS": "green", "MISS": "red"}.get(r.verdict, "yellow")
                value = "-" if r.value is None else f"{r.value:.3g}"
                console.print(f"  [{colour}]{r.verdict}[/] {r.name}: {value} (target {r.target}) -- {r.how}",
                              highlight=False)

    def markdown(self) -> str:
        out = [f"## {self.title}", "", f"`{self.command}`", ""]
        for s in self.sections:
            if s.text:
                out += [s.text, ""]
                continue
            out += [f"**{s.title}**", "", "| " + " | ".join(s.columns) + " |",
                    "|" + "|".join("---:" if num else "---" for num in _numeric_columns(s)) + "|"]
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in s.rows]
            out.append("")
        if self.ratios:
            out += ["**Ratios**", "", "| verdict | ratio | value | target | how |", "|---|---|---:|---|---|"]
            for r in self.ratios:
                value = "-" if r.value is None else f"{r.value:.3g}"
                out.append(f"| {r.verdict} | {r.name} | {value} | {_md_cell(r.target)} | {_md_cell(r.how)} |")
            out.append("")
        return "\n".join(out)

    def finish(self, console: Console) -> None:
        self.print(console)
        path: Path | None = self.args.markdown
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(self.markdown() + "\n")


def _numeric_columns(section: _Section) -> list[bool]:
    """Right-align a column when every cell is a number or "-" (the first column never)."""
    out = []
    for i in range(len(section.columns)):
        cells = [row[i] for row in section.rows if i < len(row)]
        out.append(i > 0 and all(re.match(r"^[-+]?[\d.,]", c) or c == "-" for c in cells))
    return out


def command_line() -> str:
    """How this benchmark was started, as a user would type it (``--markdown PATH`` left out)."""
    argv = list(sys.argv)
    script = Path(argv[0])
    head = [".venv/bin/python", "-m", f"bench.{script.stem}"] if script.parent.name == "bench" else [argv[0]]
    rest: list[str] = []
    skip = False
    for arg in argv[1:]:
        if skip:
            skip = False
            continue
        if arg == "--markdown":
            skip = True
            continue
        if not arg.startswith("--markdown="):
            rest.append(arg)
    return " ".join([*head, *rest])


def _md_cell(text: str) -> str:
    return re.sub(r"\[/?[a-z ]+\]", "", text).replace("|", "\\|")


# === command line ===============================================================================


def base_parser(prog: str, description: str, *, size_mib: bool = False) -> argparse.ArgumentParser:
    """The options every benchmark takes; with ``size_mib``, also the size of its one workload."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--quick", action="store_true",
                        help=f"small sizes for a smoke run ({QUICK_SIZE_MIB} MiB instead of {FULL_SIZE_MIB} MiB)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions, interleaved round-robin (default: 3)")
    parser.add_argument("--markdown", type=Path, metavar="PATH", help="also write the tables as Markdown here")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"),  # noqa: S108 -- a disk, not tmpfs; own mkdtemp inside
                        help="parent of the scratch directory for images (default: /var/tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (logs, images)")
    parser.add_argument("--quiet-cores", type=float, default=0.15,
                        help="foreign load (cores) above which a measurement counts as disturbed (default: 0.15)")
    parser.add_argument("--max-quiet-wait-s", type=float, default=60.0,
                        help="wait at most this long for a quiet machine before each measurement (default: 60)")
    parser.add_argument("--redo", type=int, default=2, help="re-run a disturbed measurement up to N times (default: 2)")
    if size_mib:
        parser.add_argument("--size-mib", type=int, default=FULL_SIZE_MIB,
                            help=f"workload size (default: {FULL_SIZE_MIB})")
    return parser


@contextlib.contextmanager
def scratch_dir(args: argparse.Namespace, name: str) -> Iterator[Path]:
    args.workdir.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"pagehaul-bench-{name}-", dir=args.workdir))
    try:
        yield path
    finally:
        if args.keep:
            print(f"kept {path}", file=sys.stderr)
        else:
            remove_tree(path)


def run(main: Callable[[argparse.Namespace, Console], None], parser: argparse.ArgumentParser) -> None:
    """Parse arguments and run ``main``; prerequisites and failures end with one line, no traceback."""
    args = parser.parse_args()
    if args.reps < 1:
        parser.error("--reps must be at least 1")
    console = make_console()
    try:
        main(args, console)
    except BenchError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(0)


def begin(args: argparse.Namespace, console: Console, title: str, runs: str, *,
          dirty_mib_per_s: float = 0.0) -> tuple[WorkloadSpec, Report]:
    """A benchmark on one workload sets out: the workload (``--size-mib``, or the small one with
    ``--quick``), the report titled ``title``, and one line on the machine and on what ``runs``."""
    spec = WorkloadSpec(size_mib=QUICK_SIZE_MIB if args.quick else args.size_mib, dirty_mib_per_s=dirty_mib_per_s)
    report = Report(title, args)
    console.print(f"{machine_line()}; workload: {spec.describe()}; {args.reps} reps of {runs}")
    return spec, report


def machine_line() -> str:
    """One line about where this ran: kernel, cores, memory, load."""
    mem_kib = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    load = os.getloadavg()[0]
    return (f"Linux {os.uname().release}, {os.cpu_count()} CPUs, {mem_kib / MIB:.0f} GiB RAM, "
            f"load average {load:.2f} at start")

"""(a) Round 0 on loopback: pagehaul vs CRIU 4.2 page server vs CRIU dump into a local directory.

One frozen round of a 1 GiB mixed workload (1/4 zero, 1/4 random, 1/4 text, 1/4 structs pages):

* ``pagehaul send --tracker none --resume`` to ``pagehaul receive`` (zstd level 1, the default,
  and with ``--zstd-level off``);
* ``criu dump --page-server --leave-running`` to ``criu page-server``;
* ``criu dump --leave-running -D DIR`` (local directory, the page cache of the same disk).

Each repetition starts one fresh workload (same seed, identical contents) that every tool dumps
in turn (all leave it running); the tools' order rotates between repetitions. Throughput is the
memory each tool put into its image (present pages, zero pages included) divided by the wall
time of its sending command (``pagehaul send`` / ``criu dump`` until the page server has
exited too), interpreter start-up included. "tool s" is pagehaul's own total_time_us (attach to
commit, without interpreter start-up) and CRIU's dump wall time.

``--profile DIR`` adds one unmeasured pagehaul run under py-spy (sender and receiver) and prints
where the time goes.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from rich.console import Console

from bench.common import (
    MIB,
    BenchError,
    Child,
    QuietPolicy,
    Report,
    RunFailed,
    Sample,
    TlsFiles,
    Window,
    Workload,
    WorkloadSpec,
    adaptive_levels,
    base_parser,
    begin,
    criu_dump,
    fmt_errors,
    fmt_foreign,
    fmt_level,
    fmt_stat,
    free_port,
    interleave,
    median,
    new_dir,
    pagehaul_send,
    remove_tree,
    require_criu,
    require_root,
    rss_method,
    run,
    run_directory,
    run_pagehaul,
    scratch_dir,
    send_values,
    start_criu_page_server,
    start_pagehaul_receiver,
    start_workload,
    values,
)
from pagehaul.criu_tools import CriuTools
from pagehaul.kernel import PAGE_SIZE

PAGEHAUL: Final = "pagehaul"
PAGEHAUL_RAW: Final = "pagehaul --zstd-level off"
PAGEHAUL_RAW1: Final = "pagehaul --zstd-level off --workers 1"
PAGEHAUL_TLS: Final = "pagehaul with mutual TLS"
PAGEHAUL_AUTO: Final = "pagehaul --zstd-level auto"
# Extra `pagehaul send` arguments of each pagehaul variant.
PAGEHAUL_VARIANTS: Final[dict[str, tuple[str, ...]]] = {
    PAGEHAUL_RAW: ("--zstd-level", "off"), PAGEHAUL_AUTO: ("--zstd-level", "auto"),
    PAGEHAUL_RAW1: ("--zstd-level", "off", "--workers", "1")}
CRIU_PS: Final = "criu page-server"
CRIU_LOCAL: Final = "criu dump -D (local dir)"
TARGET_SENDER_RSS_MIB: Final = 128.0


BASE_SUFFIX: Final = " @base"


@contextlib.contextmanager
def _python_path(tree: Path) -> Iterator[None]:
    """pagehaul's children (sender, receiver) import their modules from ``tree`` meanwhile."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(tree)
    try:
        yield
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old


@dataclass(frozen=True, slots=True)
class Net:
    """Where the receivers listen and which network namespaces the two sides run in."""

    label: str = "loopback"
    receiver_host: str = "127.0.0.1"
    receiver_netns: str | None = None
    sender_netns: str | None = None


@dataclass(slots=True)
class Round0Bench:
    """Runs one tool on the repetition's workload; shared by bench_round0 and bench_shaped."""

    tools: CriuTools
    spec: WorkloadSpec
    scratch: Path
    net: Net
    tls: TlsFiles | None = None
    compare_tree: Path | None = None
    workloads: dict[int, Workload] = field(default_factory=dict)
    _ports: itertools.count[int] = field(default_factory=lambda: itertools.count(27100))

    def workload(self, rep: int) -> Workload:
        w = self.workloads.get(rep)
        if w is not None and w.alive():
            return w
        for old in self.workloads.values():
            old.stop()
        self.workloads.clear()
        w = start_workload(self.spec, self.scratch, netns=self.net.sender_netns)
        self.workloads[rep] = w
        return w

    def close(self) -> None:
        for w in self.workloads.values():
            w.stop()
        self.workloads.clear()

    def _port(self) -> int:
        # Loopback: ask the kernel. A private namespace has nobody else in it.
        return free_port(self.net.receiver_host) if self.net.receiver_netns is None else next(self._ports)

    def run_one(self, name: str, rep: int, window: Window) -> dict[str, float]:
        if name.endswith(BASE_SUFFIX):  # the same variant from another tree (--compare-tree)
            assert self.compare_tree is not None
            with _python_path(self.compare_tree):
                return self.run_one(name.removesuffix(BASE_SUFFIX), rep, window)
        w = self.workload(rep)
        target_cpu = w.cpu_s()
        with run_directory(self.scratch, f"run-{rep}-{name.split(maxsplit=1)[0]}") as d:
            if name.startswith(PAGEHAUL):
                extra = PAGEHAUL_VARIANTS.get(name, ())
                v = self._pagehaul(w, d, window, extra, tls=self.tls if name == PAGEHAUL_TLS else None)
            else:
                v = self._criu(w, d, window, page_server=name == CRIU_PS)
        # The workload sleeps: what it used meanwhile is the dumping tool's (CRIU's parasite).
        v["target_cpu_s"] = w.cpu_s() - target_cpu
        v["total_cpu_s"] = v["sender_cpu_s"] + v["receiver_cpu_s"] + v["target_cpu_s"]
        return v

    def _pagehaul(self, w: Workload, d: Path, window: Window, extra: Sequence[str],
                  tls: TlsFiles | None = None) -> dict[str, float]:
        run = run_pagehaul(w.pid, d, window, host=self.net.receiver_host, receiver_netns=self.net.receiver_netns,
                           sender_netns=self.net.sender_netns, tls=tls, tracker="none", extra=extra,
                           debug_log="auto" in extra)
        out = run.send
        r0 = out.rounds[0]
        return {**send_values(out), "bytes": out.pages_dumped * PAGE_SIZE, "wire_bytes": float(r0["wire_bytes"]),
                "receiver_cpu_s": run.receiver_cpu_s, **adaptive_levels(out)}

    def _criu(self, w: Workload, d: Path, window: Window, *, page_server: bool) -> dict[str, float]:
        server: Child | None = None
        host = self.net.receiver_host
        try:
            ps = None
            if page_server:
                port = self._port()
                server = start_criu_page_server(self.tools, d / "ps", host, port, netns=self.net.receiver_netns)
                ps = (host, port, server)
            with window.timed():
                out = criu_dump(self.tools, w.pid, d / "dump", leave_running=True, page_server=ps,
                                netns=self.net.sender_netns)
        finally:
            if server is not None:
                server.stop(signal.SIGKILL, 5)
        st = out.stats
        return {"bytes": out.pages_dumped * PAGE_SIZE, "wall_s": out.wall_s, "tool_s": out.wall_s,
                "memdump_s": st["memdump_time"] / 1e6, "frozen_ms": st["frozen_time"] / 1e3,
                "wire_bytes": out.pages_dumped * PAGE_SIZE if page_server else 0.0,
                "sender_cpu_s": out.dump.cpu_s, "sender_rss_mib": out.dump.maxrss_kib / 1024,
                "receiver_cpu_s": out.server.cpu_s if out.server is not None else 0.0}


def summary(name: str, v: dict[str, float]) -> str:
    level = f", zstd auto ended at {fmt_level(v['zstd_last'])}" if "zstd_last" in v else ""
    return (f"{v['bytes'] / MIB:.0f} MiB in {v['wall_s']:.2f} s = {v['bytes'] / MIB / v['wall_s']:.0f} MiB/s, "
            f"rss {v['sender_rss_mib']:.0f} MiB{level}")


def adaptive_note(report: Report, results: dict[str, list[Sample]]) -> None:
    """Where ``--zstd-level auto`` ended in each run (it starts without compression)."""
    ok = [s for s in results.get(PAGEHAUL_AUTO, []) if not s.error]
    if not ok:
        return
    ends = ", ".join(fmt_level(s.values["zstd_last"]) if "zstd_last" in s.values else "1 (never moved)" for s in ok)
    report.note(f"{PAGEHAUL_AUTO}: starts without compression, probes the levels of the ladder off, -5, -1, 1, 3 "
                f"for 8 batches at a time and keeps the one with the faster pace, taking compression up only when "
                f"25 % faster and probing no compression first from any compressing level (sender.adaptive); "
                f"level at the end of each run: {ends}.")


def rate(samples: Sequence[Sample], time_key: str) -> list[float]:
    return [s.values["bytes"] / MIB / s.values[time_key] for s in samples if not s.error]


def result_rows(results: dict[str, list[Sample]]) -> list[list[str]]:
    rows = []
    for name, samples in results.items():
        ok = [s for s in samples if not s.error]
        wire = values(ok, "wire_bytes")
        rows.append([
            name, fmt_stat([v / MIB for v in values(ok, "bytes")]),
            fmt_stat(values(ok, "wall_s"), ".2f"), fmt_stat(rate(ok, "wall_s")),
            fmt_stat(values(ok, "tool_s"), ".2f"), fmt_stat(rate(ok, "tool_s")),
            fmt_stat(values(ok, "memdump_s"), ".2f"), fmt_stat(values(ok, "frozen_ms")),
            fmt_stat([x / MIB for x in wire]) if any(wire) else "-",
            fmt_stat(values(ok, "sender_cpu_s"), ".2f"), fmt_stat(values(ok, "sender_rss_mib")),
            fmt_stat(values(ok, "receiver_cpu_s"), ".2f"), fmt_stat(values(ok, "target_cpu_s"), ".2f"),
            fmt_stat(values(ok, "total_cpu_s"), ".2f"), fmt_stat(cpu_per_gib(ok), ".2f"), fmt_foreign(samples),
            f"{len(ok)}" + (f" ({fmt_errors(samples)})" if len(ok) < len(samples) else ""),
        ])
    return rows


COLUMNS: Final = ["tool", "image MiB", "wall s", "MiB/s (wall)", "tool s", "MiB/s (tool)", "memdump s",
                  "frozen ms", "wire MiB", "sender CPU s", "sender peak RSS MiB", "receiver CPU s",
                  "target CPU s", "CPU s (all)", "CPU s per GiB", "foreign cores", "n"]


def cpu_per_gib(samples: Sequence[Sample]) -> list[float]:
    """CPU seconds of both ends and the target (CRIU's parasite) per GiB of image moved."""
    return [s.values["total_cpu_s"] / (s.values["bytes"] / (1 << 30)) for s in samples if not s.error]


def cpu_ratio(results: dict[str, list[Sample]], ours: str, theirs: str) -> float | None:
    a, b = median(cpu_per_gib(results.get(ours, []))), median(cpu_per_gib(results.get(theirs, [])))
    return a / b if a is not None and b else None


def throughput_ratio(results: dict[str, list[Sample]], ours: str, theirs: str, key: str = "wall_s") -> float | None:
    a, b = median(rate(results.get(ours, []), key)), median(rate(results.get(theirs, []), key))
    return a / b if a is not None and b else None


def rss_ratio(report: Report, results: dict[str, list[Sample]]) -> None:
    rss = [x for name in (PAGEHAUL, PAGEHAUL_RAW, PAGEHAUL_AUTO, PAGEHAUL_TLS)
           for x in values(results.get(name, []), "sender_rss_mib")]
    worst = max(rss) if rss else None
    report.ratio("sender peak RSS (MiB, worst run)", worst, f"<= {TARGET_SENDER_RSS_MIB:.0f} MiB",
                 None if worst is None else worst <= TARGET_SENDER_RSS_MIB,
                 f"`pagehaul send`: {rss_method()}")
    one = values(results.get(PAGEHAUL_RAW1, []), "sender_rss_mib")
    if one:
        report.ratio(f"sender peak RSS of {PAGEHAUL_RAW1} (MiB, worst run)", max(one),
                     f"<= {TARGET_SENDER_RSS_MIB:.0f} MiB", max(one) <= TARGET_SENDER_RSS_MIB,
                     "without compression the event loop is the limit, and every worker thread keeps a malloc "
                     "arena of its own buffers (~28 MiB)")


# === profile ====================================================================================


PROFILE_RATE_HZ: Final = 200
# Leaf frames that mean "this thread waits": an idle pool worker, the event loop in select, grpc's
# poller thread blocked in C. py-spy's own idle filter does not catch them here.
_IDLE_LEAVES: Final = {
    ("_worker", "thread.py"), ("EpollSelector.select", "selectors.py"), ("Thread.run", "threading.py"),
    ("Condition.wait", "threading.py"), ("Event.wait", "threading.py"),
}
_PROJECT: Final = ("sender/", "receiver/", "pagehaul/")


@dataclass(slots=True)
class Profile:
    """py-spy raw (collapsed) stacks: busy thread-seconds per thread, per function (inclusive), per leaf."""

    threads: collections.Counter[str] = field(default_factory=collections.Counter)
    busy: collections.Counter[str] = field(default_factory=collections.Counter)
    inclusive: collections.Counter[str] = field(default_factory=collections.Counter)
    leaves: collections.Counter[str] = field(default_factory=collections.Counter)

    @classmethod
    def load(cls, path: Path) -> Profile:
        prof = cls()
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count_text = line.rpartition(" ")
            frames = [f for f in stack.split(";") if f]
            if len(frames) < 2 or not count_text.isdigit():
                continue
            count = int(count_text)
            thread = frames[0].split(": ", 1)[-1].split(" (", 1)[0]
            prof.threads[thread] += count
            name, file = _frame(frames[-1])
            if (name, file) in _IDLE_LEAVES:
                continue
            prof.busy[thread] += count
            prof.leaves[f"{name} ({file})"] += count
            seen = set()
            for f in frames[1:]:
                if any(p in f for p in _PROJECT):
                    key = "{} ({})".format(*_frame(f))
                    if key not in seen:
                        seen.add(key)
                        prof.inclusive[key] += count
        return prof


def _frame(frame: str) -> tuple[str, str]:
    """"function (path/to/module.py:123)" -> ("function", "module.py")."""
    name, _, where = frame.partition(" (")
    return name, where.rstrip(")").rsplit("/", 1)[-1].split(":", 1)[0]


def _core_s(samples: int) -> str:
    return f"{samples / PROFILE_RATE_HZ:.2f}"


def profile_pagehaul(bench: Round0Bench, out_dir: Path, console: Console, report: Report) -> None:
    pyspy = Path(sys.executable).with_name("py-spy")
    if not pyspy.is_file():
        raise BenchError(f"--profile needs py-spy in the venv: {Path(sys.executable).with_name('pip')} install py-spy")
    out_dir.mkdir(parents=True, exist_ok=True)
    w = bench.workload(-1)
    d = new_dir(bench.scratch, "profile")
    recv = start_pagehaul_receiver(d / "images", d, host=bench.net.receiver_host, netns=bench.net.receiver_netns)
    recv_prof = out_dir / "receiver.txt"
    spy = Child([str(pyspy), "record", "--pid", str(recv.child.pid), "--rate", "200", "--format", "raw",
                 "--threads", "-o", str(recv_prof)], stderr=subprocess.DEVNULL)
    try:
        send_prof = out_dir / "sender.txt"
        wrap = [str(pyspy), "record", "--rate", "200", "--format", "raw", "--threads",
                "-o", str(send_prof), "--"]
        try:
            out = pagehaul_send(w.pid, recv.address, d, tracker="none", netns=bench.net.sender_netns, wrap=wrap)
        except RunFailed as err:
            raise BenchError(f"profiled run failed: {err}") from err
    finally:
        spy.stop(signal.SIGINT, 30)
        recv.stop()
        bench.close()
        remove_tree(d)
    console.print(f"profiled run: {out.pages_dumped * PAGE_SIZE / MIB:.0f} MiB in {out.total_s:.2f} s "
                  f"(slowed by py-spy); raw stacks in {out_dir}")
    for label, path in (("sender", send_prof), ("receiver", recv_prof)):
        if not path.is_file():
            report.note(f"py-spy wrote no {label} profile")
            continue
        prof = Profile.load(path)
        threads = ", ".join(f"{t} {_core_s(prof.busy[t])}/{_core_s(n)}" for t, n in prof.threads.most_common(6))
        report.note(f"profile of the {label} (py-spy --threads at {PROFILE_RATE_HZ} Hz; busy/sampled thread-seconds "
                    f"per thread): {threads}")
        rows = [[f, _core_s(n)] for f, n in prof.inclusive.most_common(14)]
        rows += [[f"leaf: {f}", _core_s(n)] for f, n in prof.leaves.most_common(8)]
        report.table(f"profile: {label}, busy thread-seconds by pagehaul function (inclusive), then by leaf frame",
                     ["function", "busy thread-s"], rows)


# === main =======================================================================================


def main(args: argparse.Namespace, console: Console) -> None:
    require_root()
    tools = require_criu()
    names = [PAGEHAUL, *([] if args.no_raw else [PAGEHAUL_RAW, PAGEHAUL_RAW1]),
             *([] if args.no_auto else [PAGEHAUL_AUTO]),
             *([] if args.no_tls else [PAGEHAUL_TLS]), CRIU_PS, CRIU_LOCAL]
    if args.compare_tree is not None:
        names[-2:-2] = [f"{n}{BASE_SUFFIX}" for n in names if n in (PAGEHAUL, PAGEHAUL_RAW, PAGEHAUL_AUTO)]
    spec, report = begin(args, console, "(a) round 0 on loopback: pagehaul vs CRIU page server vs CRIU local dump",
                         ", ".join(names))
    with scratch_dir(args, "round0") as scratch:
        tls = None if args.no_tls else TlsFiles.make(scratch / "certs")
        bench = Round0Bench(tools, spec, scratch, Net(), tls, args.compare_tree)
        try:
            results = interleave(names, args.reps, bench.run_one, QuietPolicy.from_args(args), console,
                                  summary=summary)
        finally:
            bench.close()
        report.table(f"round 0, {spec.describe()}, loopback (median (min-max) of {args.reps})", COLUMNS,
                     result_rows(results))
        report.note("image MiB: present pages each tool put in its image (zero pages included; pagehaul sends them "
                    "as holes). MiB/s (wall): image / wall time of `pagehaul send` or `criu dump` (+ page server "
                    "exit), start-up included. tool s: pagehaul's total_time_us (no interpreter start-up). "
                    "pagehaul's receiver decompresses and fsyncs the pages before committing; CRIU does not fsync. "
                    "target CPU: what the (sleeping) workload used during the run, i.e. CRIU's parasite; CPU s "
                    "(all): sender + receiver + target. "
                    "foreign: CPU of other users' processes during the run (! = still disturbed after re-runs).")
        adaptive_note(report, results)
        base = [f"{n}{BASE_SUFFIX}" for n in (PAGEHAUL, PAGEHAUL_RAW, PAGEHAUL_AUTO)]
        for ours in (PAGEHAUL, PAGEHAUL_RAW, PAGEHAUL_RAW1, PAGEHAUL_AUTO, PAGEHAUL_TLS, *base):
            if ours not in names:
                continue
            ratio = throughput_ratio(results, ours, CRIU_PS)
            report.ratio(f"loopback round 0, {ours} / CRIU page-server (wall MiB/s)", ratio, ">= 1.0",
                         None if ratio is None else ratio >= 1.0, "ratio of median throughputs")
        for ours in (PAGEHAUL, PAGEHAUL_RAW, PAGEHAUL_AUTO, *base):
            if ours not in names:
                continue
            ratio = cpu_ratio(results, ours, CRIU_PS)
            report.ratio(f"CPU per GiB moved, {ours} / CRIU dump + page-server", ratio, "<= 1.0",
                         None if ratio is None else ratio <= 1.0,
                         "sender + receiver + target (CRIU's parasite), same transport security (none)")
        tool_ratio = throughput_ratio(results, PAGEHAUL, CRIU_PS, "tool_s")
        report.ratio("same, pagehaul without interpreter start-up (tool s)", tool_ratio, ">= 1.0",
                     None if tool_ratio is None else tool_ratio >= 1.0, "pagehaul total_time_us vs criu dump wall")
        local = throughput_ratio(results, PAGEHAUL, CRIU_LOCAL)
        report.ratio(f"{PAGEHAUL} / CRIU local dump (wall MiB/s)", local, "(no target)", None, "for reference")
        rss_ratio(report, results)
        if args.profile is not None:
            profile_pagehaul(bench, args.profile, console, report)
    report.finish(console)


def variant_options(p: argparse.ArgumentParser, *, tls: bool) -> None:
    """The options that leave pagehaul variants out of a round-0 comparison."""
    p.add_argument("--no-raw", action="store_true", help="leave out the pagehaul --zstd-level off runs")
    if tls:
        p.add_argument("--no-tls", action="store_true", help="leave out the pagehaul runs with mutual TLS")
    p.add_argument("--no-auto", action="store_true", help="leave out the pagehaul --zstd-level auto runs")


def parser() -> argparse.ArgumentParser:
    p = base_parser("bench_round0", __doc__.splitlines()[0], size_mib=True)
    variant_options(p, tls=True)
    p.add_argument("--profile", type=Path, metavar="DIR", help="one more pagehaul run under py-spy; stacks into DIR")
    p.add_argument("--compare-tree", type=Path, metavar="DIR",
                   help="also run pagehaul, --zstd-level off and auto from this source tree (e.g. `git archive` of an "
                        "earlier commit), interleaved with the rest: rows marked @base")
    return p


if __name__ == "__main__":
    run(main, parser())

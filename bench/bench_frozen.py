"""(c) Frozen time: pagehaul pre-copy vs CRIU's full stop-and-copy dump of a workload dirtying 32 MiB/s.

The workload: 1 GiB of the mixed contents, and a loop that writes one word in 32 MiB worth of
pages per second, scattered over the whole region (``--dirty-mib-per-s``). Every run gets a
fresh workload with the same seed and rate (CRIU's dump kills it; pagehaul leaves it stopped).

* pagehaul: ``pagehaul send --tracker auto`` (pre-copy rounds while the workload runs, then a
  frozen final round), frozen time = SendResult.frozen_time_us (final freeze to thaw);
* CRIU: ``criu dump -t PID -D DIR --shell-job`` (no --leave-running: the whole memory is copied
  with the task frozen), frozen time = ``frozen_time`` of CRIU's stats-dump (decoded with crit).

Targets: pagehaul's frozen time <= 1/10 of CRIU's and <= 100 ms.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Final

from rich.console import Console

from bench.common import (
    MIB,
    QuietPolicy,
    Sample,
    Window,
    WorkloadSpec,
    base_parser,
    begin,
    criu_dump,
    final_round_breakdown,
    fmt_errors,
    fmt_foreign,
    fmt_stat,
    interleave,
    median,
    require_criu,
    require_root,
    run,
    run_directory,
    run_pagehaul,
    running_workload,
    scratch_dir,
    send_values,
    values,
)
from pagehaul.criu_tools import CriuTools
from pagehaul.kernel import PAGE_SIZE

CRIU: Final = "criu dump (stop-and-copy)"
TARGET_FRACTION: Final = 0.1
TARGET_FROZEN_MS: Final = 100.0
PHASES: Final = ("collect_ms", "plan_ms", "stream_ms", "after_stream_ms", "commit_wait_ms")


class FrozenBench:
    def __init__(self, tools: CriuTools, spec: WorkloadSpec, scratch: Path, args: argparse.Namespace) -> None:
        self.tools = tools
        self.spec = spec
        self.scratch = scratch
        self.args = args

    def run_one(self, name: str, rep: int, window: Window) -> dict[str, float]:
        with run_directory(self.scratch, f"run-{rep}") as d, running_workload(self.spec, self.scratch) as w:
            if name == CRIU:
                with window.timed():
                    out = criu_dump(self.tools, w.pid, d / "dump", leave_running=False)
                st = out.stats
                return {"frozen_ms": st["frozen_time"] / 1e3, "freezing_ms": st["freezing_time"] / 1e3,
                        "wall_s": out.wall_s, "rounds": 1, "final_mib": st["pages_written"] * PAGE_SIZE / MIB,
                        "final_send_ms": st["memdump_time"] / 1e3,
                        "total_mib": st["pages_written"] * PAGE_SIZE / MIB, "sender_cpu_s": out.dump.cpu_s,
                        "sender_rss_mib": out.dump.maxrss_kib / 1024, "converged": 1.0}
            return self._pagehaul(name, w.pid, d, window)

    def _pagehaul(self, name: str, pid: int, d: Path, window: Window) -> dict[str, float]:
        words = name.split()  # "pagehaul --tracker T [--downtime-ms N]"
        out = run_pagehaul(pid, d, window, tracker=words[2], extra=words[3:], resume=self.args.resume,
                           debug_log=True).send
        rounds = out.rounds
        final = rounds[-1]
        sent = sum(int(r["pages_written"]) for r in rounds)
        return {**send_values(out), **final_round_breakdown(out),
                "freezing_ms": out.result["freezing_time_us"] / 1e3, "rounds": float(len(rounds)),
                "final_mib": int(final["pages_written"]) * PAGE_SIZE / MIB,
                "final_zero_pages": float(final["pages_zero"]),
                "final_send_ms": float(final["memdump_time_us"]) / 1e3,
                "total_mib": sent * PAGE_SIZE / MIB, "converged": 1.0 if out.result["converged"] else 0.0,
                "tracker_ms": float(final["tracker_time_us"]) / 1e3}


def summary(name: str, v: dict[str, float]) -> str:
    return f"frozen {v['frozen_ms']:.0f} ms, {v['rounds']:.0f} round(s), wall {v['wall_s']:.2f} s"


def rows(results: dict[str, list[Sample]]) -> list[list[str]]:
    out = []
    for name, samples in results.items():
        ok = [s for s in samples if not s.error]
        conv = values(ok, "converged")
        out.append([name, fmt_stat(values(ok, "frozen_ms")), fmt_stat(values(ok, "freezing_ms"), ".1f"),
                    fmt_stat(values(ok, "rounds")), fmt_stat(values(ok, "final_mib"), ".1f"),
                    fmt_stat(values(ok, "final_send_ms"), ".1f"),
                    fmt_stat(values(ok, "total_mib")), fmt_stat(values(ok, "tracker_ms"), ".1f"),
                    fmt_stat(values(ok, "wall_s"), ".2f"), f"{sum(conv):.0f}/{len(conv)}" if conv else "-",
                    fmt_stat(values(ok, "sender_cpu_s"), ".2f"), fmt_stat(values(ok, "sender_rss_mib")),
                    fmt_foreign(samples),
                    f"{len(ok)}" + (f" ({fmt_errors(samples)})" if len(ok) < len(samples) else "")])
    return out


def main(args: argparse.Namespace, console: Console) -> None:
    require_root()
    tools = require_criu()
    names = [f"pagehaul --tracker {t}" + ("" if d == "default" else f" --downtime-ms {d}")
             for t in args.trackers.split(",") if t for d in args.downtimes.split(",") if d]
    names += [f"pagehaul --tracker {t} --zstd-level {z}" for t in args.trackers.split(",") if t
              for z in args.zstd_levels.split(",") if z] + [CRIU]
    spec, report = begin(args, console, "(c) frozen time: pagehaul pre-copy vs CRIU full stop-and-copy dump",
                         ", ".join(names), dirty_mib_per_s=args.dirty_mib_per_s)
    with scratch_dir(args, "frozen") as scratch:
        bench = FrozenBench(tools, spec, scratch, args)
        results = interleave(names, args.reps, bench.run_one, QuietPolicy.from_args(args), console, summary=summary)
    report.table(f"frozen time, {spec.describe()} (median (min-max) of {args.reps})",
                 ["tool", "frozen ms", "freezing ms", "rounds", "final round data MiB", "final send ms",
                  "data MiB sent (all rounds)",
                  "final collect ms", "wall s", "converged", "sender CPU s", "sender peak RSS MiB", "foreign cores",
                  "n"], rows(results))
    breakdown = [[name, fmt_stat(values(ok, "frozen_ms")), *[fmt_stat(values(ok, k), ".1f") for k in PHASES],
                  fmt_stat(values(ok, "final_mib"), ".1f"), fmt_stat(values(ok, "final_zero_pages"))]
                 for name, ok in ((n, [s for s in results[n] if not s.error]) for n in names[:-1])]
    report.table("pagehaul's frozen time by phase (ms, median (min-max); from the sender's debug log)",
                 ["tool", "frozen ms", "scan + collect", "plan", "stream (holes + data)", "after stream",
                  "commit wait", "final data MiB", "final zero pages"], breakdown)
    report.note("Phases of the frozen round, in order: scan + collect = present pages and the tracker's dirty "
                "set (PAGEMAP_SCAN); plan = data / parent / zero split (numpy set operations); stream = "
                "round_begin to round_end written (parent and zero holes, then data batches read, compressed "
                "and sent by the worker pipeline; the round's memdump_time_us); after stream = the sender's "
                "bookkeeping before it waits (the receiver's holdings after the round, `held_after`); commit "
                "wait = until the receiver's RoundCommitted: it finishes decoding and writing the queued "
                "batches, writes the pagemaps, fsyncs and renames. frozen also holds the freeze/thaw calls.")
    state = "resumed" if args.resume else "left stopped"
    report.note("pagehaul: without --downtime-ms the policy's default downtime target applies (50 ms); source "
                f"{state} after the final round; frozen = final freeze to thaw (SendResult.frozen_time_us); "
                "final collect = tracker_time_us of the frozen round (scan + dirty collection). CRIU: frozen_time and "
                "freezing_time of stats-dump; CRIU's data MiB = pages_written (every page, zero pages too) and its "
                "send = memdump_time. pagehaul's data MiB = pages_written (zero pages travel as holes); final send = "
                "the frozen round's memdump_time_us (frozen = collect + plan + send + waiting for the commit).")
    criu_frozen = median(values(results[CRIU], "frozen_ms"))
    for name in names[:-1]:
        ours = values(results[name], "frozen_ms")
        ph = median(ours)
        frac = ph / criu_frozen if ph is not None and criu_frozen else None
        report.ratio(f"{name} frozen / CRIU frozen", frac, f"<= {TARGET_FRACTION:g}",
                     None if frac is None else frac <= TARGET_FRACTION, "ratio of medians")
        report.ratio(f"{name} frozen time (ms, median)", ph, f"<= {TARGET_FROZEN_MS:g} ms",
                     None if ph is None else ph <= TARGET_FROZEN_MS,
                     f"worst run {max(ours):.0f} ms" if ours else "no successful run")
    report.finish(console)


def parser() -> argparse.ArgumentParser:
    p = base_parser("bench_frozen", __doc__.splitlines()[0], size_mib=True)
    p.add_argument("--dirty-mib-per-s", type=float, default=32.0, help="dirty rate of the workload (default: 32)")
    p.add_argument("--trackers", default="auto", help="comma-separated pagehaul trackers to run (default: auto)")
    p.add_argument("--downtimes", default="default,20", metavar="LIST",
                   help="pagehaul --downtime-ms values to run, 'default' for none given (default: default,20)")
    p.add_argument("--zstd-levels", default="auto", metavar="LIST",
                   help="extra pagehaul runs with these --zstd-level values (default: auto; '' for none)")
    p.add_argument("--resume", action="store_true", help="resume the workload after pagehaul's final round")
    return p


if __name__ == "__main__":
    run(main, parser())

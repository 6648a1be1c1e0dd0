"""Run every benchmark in sequence and write bench/results/latest.md (all tables, ratios and commands).

    sudo .venv/bin/python -m bench.run_all [--quick] [--reps N] [--only round0,frozen]

Each benchmark runs as its own process (``python -m bench.bench_X``), its console output shown
as it goes; its tables come back as Markdown (``--markdown``) and are put together in
``bench/results/latest.md``, with the command lines and the machine. A benchmark that fails
(a missing prerequisite, say) is reported in the file and the others still run.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Final

from rich.console import Console

from bench.common import REPO_ROOT, RESULTS_DIR, BenchError, machine_line, require_root, run

BENCHMARKS: Final = {
    "round0": ("bench.bench_round0", "(a) round 0 on loopback"),
    "shaped": ("bench.bench_shaped", "(b) round 0 over a shaped 1 Gbit/s veth link"),
    "frozen": ("bench.bench_frozen", "(c) frozen time under a 32 MiB/s dirtying workload"),
    "scan": ("bench.bench_scan", "(d) scan cost and round cost"),
    "stages": ("bench.bench_stages", "(e) stage ceilings and end-to-end"),
}


def main(args: argparse.Namespace, console: Console) -> None:
    require_root()
    chosen = list(BENCHMARKS) if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in BENCHMARKS]
    if unknown:
        raise BenchError(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    common = [*(["--quick"] if args.quick else []), "--reps", str(args.reps),
              "--max-quiet-wait-s", f"{args.max_quiet_wait_s:g}", "--quiet-cores", f"{args.quiet_cores:g}",
              "--redo", str(args.redo)]
    started = datetime.datetime.now(datetime.UTC)
    header = machine_line()
    parts: dict[str, str] = {}
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="pagehaul-bench-md-") as tmp:
        for name in chosen:
            module, title = BENCHMARKS[name]
            md = Path(tmp) / f"{name}.md"
            argv = [sys.executable, "-m", module, *common, "--markdown", str(md)]
            shown = " ".join([".venv/bin/python", "-m", module, *common])
            console.rule(f"[bold]{title}: {shown}")
            t0 = time.monotonic()
            proc = subprocess.run(argv, cwd=REPO_ROOT, check=False, stderr=subprocess.PIPE, text=True)
            took = time.monotonic() - t0
            sys.stderr.write(proc.stderr)
            stamp = f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC"
            if proc.returncode == 0 and md.is_file():
                parts[name] = md.read_text().rstrip() + f"\n\n_{name}: {took:.0f} s, finished {stamp}_\n"
            else:
                failures.append(name)
                last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
                parts[name] = f"## {title}\n\n`{shown}` **failed** (exit status {proc.returncode}): {last}\n"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = args.output
    previous = out.read_text() if args.update and out.is_file() else ""
    kept = _sections(previous)
    kept_names = [n for n in kept if n not in parts]
    merged = {n: parts.get(n) or kept[n] for n in BENCHMARKS if n in parts or n in kept}
    mode = "quick (smoke sizes)" if args.quick else "full sizes"
    command = f"`.venv/bin/python -m bench.run_all {' '.join(sys.argv[1:])}`"
    if kept_names:  # keep the earlier header, say what was re-run
        head = [previous.split(MARK, 1)[0].rstrip(), "",
                f"Updated {started:%Y-%m-%d %H:%M} UTC with {command}: re-ran {', '.join(parts)} ({mode}, "
                f"{args.reps} repetitions, tree {tree_state()}); the other sections are from the earlier run.", ""]
    else:
        head = [
            "# pagehaul benchmarks: latest results", "",
            f"Run {started:%Y-%m-%d %H:%M} UTC, {mode}, {args.reps} repetitions, with {command}.", "",
            f"Machine: {header}. Tree: {tree_state()}.", "",
            "Every table gives the median with (min-max) over the repetitions, the compared tools run interleaved "
            "round-robin. `foreign cores` is the CPU other people's processes used meanwhile (a measurement above "
            f"{args.quiet_cores:g} cores is re-run up to {args.redo} times; `!` marks one still disturbed). "
            "Benchmarks are measurements, not tests: a missed target is reported, never an error.", "",
        ]
    doc = [*head, *[f"{MARK}{n} -->\n{text}" for n, text in merged.items()]]
    out.write_text("\n".join(doc).rstrip() + "\n")
    console.print(f"wrote {out}")
    if failures:
        raise BenchError(f"benchmark(s) failed: {', '.join(failures)} (the others are in {out})")


MARK: Final = "<!-- bench: "


def _sections(text: str) -> dict[str, str]:
    """The per-benchmark sections of an earlier results file, by name (from their markers)."""
    out: dict[str, str] = {}
    pieces = text.split(MARK)
    for piece in pieces[1:]:
        name, _, body = piece.partition(" -->\n")
        if name in BENCHMARKS:
            out[name] = body.rstrip() + "\n"
    return out


def tree_state() -> str:
    """The commit measured, and whether the work tree had changes on top (it usually has: others work in it)."""
    def git(*argv: str) -> str:
        proc = subprocess.run(["git", "-C", str(REPO_ROOT), *argv], check=False, capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD") or "unknown commit"
    changed = [line for line in git("status", "--porcelain").splitlines() if line and not line[3:].startswith("bench/")]
    return f"{head}" + (f" with {len(changed)} changed or new files outside bench/" if changed else ", clean")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run_all", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    p.add_argument("--reps", type=int, default=3, help="repetitions per benchmark (default: 3)")
    p.add_argument("--only", metavar="NAMES", help=f"comma-separated subset of {', '.join(BENCHMARKS)}")
    p.add_argument("--update", action="store_true",
                   help="replace only the sections of the benchmarks run now in an existing output file")
    p.add_argument("--output", type=Path, default=RESULTS_DIR / "latest.md", help="default: bench/results/latest.md")
    p.add_argument("--quiet-cores", type=float, default=0.15, help="passed on (default: 0.15)")
    p.add_argument("--max-quiet-wait-s", type=float, default=60.0, help="passed on (default: 60)")
    p.add_argument("--redo", type=int, default=2, help="passed on (default: 2)")
    return p


if __name__ == "__main__":
    run(main, parser())

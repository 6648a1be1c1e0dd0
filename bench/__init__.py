"""Benchmarks: pagehaul against CRIU 4.2, measured side by side on the same workload (see common.py).

Run one with ``.venv/bin/python -m bench.bench_round0 [--quick] [--reps N]`` (as root), or all
with ``.venv/bin/python -m bench.run_all``. Nothing here is a test: the scripts print tables and
ratios against the targets and exit 0 whether a target is met or missed.
"""

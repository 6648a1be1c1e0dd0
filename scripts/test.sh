#!/usr/bin/env bash
# Set up everything (venv, CRIU prefix) and run every check: generated code, ruff, mypy, tests.
# Under CI (CI set) a skipped test fails the run (tests/conftest.py), so CI runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --criu --servers
echo "== generated protobuf code"
.venv/bin/python scripts/gen_proto.py --check
echo "== ruff"
.venv/bin/ruff check .
echo "== layering contract (ARCHITECTURE.md)"
.venv/bin/lint-imports --no-cache
echo "== mypy --strict"
.venv/bin/mypy
echo "== pytest"
.venv/bin/pytest "$@"

#!/usr/bin/env bash
# Set up pagehaul and migrate a live demo workload over loopback (needs root for ptrace).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/pagehaul demo "$@"

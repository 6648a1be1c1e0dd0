#!/usr/bin/env bash
# Set up pagehaul (and CRIU 4.2.1 in a private prefix), migrate a live demo workload over loopback,
# then move a process tree whole and restore it with CRIU (needs root).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install-criu.sh   # act two of the demo restores a process tree with CRIU 4.2.1
exec .venv/bin/pagehaul demo "$@"

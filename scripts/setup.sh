#!/usr/bin/env bash
# Set up pagehaul on a fresh Debian/Ubuntu machine: a virtualenv in .venv with pagehaul and its
# development tools, and (with --criu) CRIU 4.2.1 in a private prefix for the image tests.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

want_criu=0
for arg in "$@"; do
  case "$arg" in
    --criu) want_criu=1 ;;
    *) echo "usage: $0 [--criu]" >&2; exit 2 ;;
  esac
done

log() { echo "setup: $*" >&2; }

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "setup: pagehaul needs Python >= 3.11 ($PYTHON is $("$PYTHON" --version 2>&1))" >&2
  exit 1
fi
if ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
  log "installing python3-venv"
  apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
fi

stamp=.venv/.pagehaul-setup
if [ ! -x .venv/bin/python ] || [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  log "creating .venv and installing pagehaul[dev]"
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[dev]"
  touch "$stamp"
fi

if [ "$want_criu" = 1 ]; then
  bash scripts/install-criu.sh >/dev/null
fi
log "ready: $(.venv/bin/pagehaul --help >/dev/null && echo "pagehaul $(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("pagehaul"))')")"

#!/usr/bin/env bash
# Set up pagehaul on a fresh Debian/Ubuntu machine: a virtualenv in .venv with pagehaul and its
# development tools, (with --criu) CRIU 4.2.1 in a private prefix for the image tests, and (with
# --servers) the real servers the migration tests move (Redis, from the machine's apt sources).
# Idempotent: a second run only checks. Quiet: it says what it installs and that it is ready;
# pip's and the CRIU installer's own output goes to a log, printed only when they fail.
set -euo pipefail
cd "$(dirname "$0")/.."

want_criu=0
want_servers=0
for arg in "$@"; do
  case "$arg" in
    --criu) want_criu=1 ;;
    --servers) want_servers=1 ;;
    *) echo "usage: $0 [--criu] [--servers]" >&2; exit 2 ;;
  esac
done

log() { echo "setup: $*" >&2; }
# Run a command with its output appended to the log file $1; on failure print the log and stop.
quietly() {
  local logfile="$1"; shift
  if ! "$@" >>"$logfile" 2>&1; then
    log "failed: $* (its output, also in $logfile):"
    cat "$logfile" >&2
    exit 1
  fi
}

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "setup: pagehaul needs Python >= 3.11 ($PYTHON is $("$PYTHON" --version 2>&1))" >&2
  exit 1
fi
if ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
  log "installing python3-venv (apt-get)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
fi

stamp=.venv/.pagehaul-setup
if [ ! -x .venv/bin/python ] || [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  start=$(date +%s)
  log "installing pagehaul[dev] and its dependencies into .venv (pip, log in .venv/pip.log)"
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  pip=(.venv/bin/python -m pip --disable-pip-version-check)
  : >.venv/pip.log
  quietly .venv/pip.log "${pip[@]}" install --upgrade pip
  quietly .venv/pip.log "${pip[@]}" install -e ".[dev]"
  log "done in $(( $(date +%s) - start )) s ($("${pip[@]}" list --format=freeze 2>/dev/null | wc -l) Python packages in .venv)"
  touch "$stamp"
fi

if [ "$want_criu" = 1 ]; then
  criu_prefix="${PAGEHAUL_CRIU_PREFIX:-$HOME/.cache/pagehaul/criu-4.2.1}"
  if [ ! -x "$criu_prefix/bin/criu" ]; then
    log "installing CRIU 4.2.1 (criu, crit) from Debian unstable into $criu_prefix (log in .venv/install-criu.log)"
  fi
  : >.venv/install-criu.log
  quietly .venv/install-criu.log bash scripts/install-criu.sh
  if ! grep -q "already installed" .venv/install-criu.log; then
    log "installed CRIU $("$criu_prefix/bin/criu" --version | sed -n 's/^Version: //p') (criu, crit) in $criu_prefix"
  fi
fi
if [ "$want_servers" = 1 ] && ! command -v redis-server >/dev/null; then
  log "installing redis-server and redis-tools for the real-server tests (apt-get, log in .venv/apt.log)"
  : >.venv/apt.log
  quietly .venv/apt.log apt-get update -qq
  quietly .venv/apt.log env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    redis-server redis-tools
  # The package starts a system-wide server on 6379; the tests start their own.
  systemctl disable --now redis-server >/dev/null 2>&1 || service redis-server stop >/dev/null 2>&1 || true
fi
log "ready: $(.venv/bin/pagehaul --help >/dev/null && echo "pagehaul $(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("pagehaul"))')")"

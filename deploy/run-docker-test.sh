#!/usr/bin/env bash
# End-to-end test of the container images on this machine, with a Docker engine of its own:
#
#   1. start dockerd by hand (data, exec root and socket under a temporary folder; no iptables,
#      no default bridge), unless PAGEHAUL_DOCKER_HOST names a running engine to use instead;
#   2. deploy/build-images.sh (debootstrap base, wheels, both images);
#   3. a test PKI (pagehaul certs, in the sender image);
#   4. the receiver container (non-root, host network on 127.0.0.1, mTLS), a workload container
#      (uid 65534, docker's default seccomp profile and capabilities: an ordinary application),
#      and the sender container with exactly the documented settings (--pid=host, all
#      capabilities dropped but SYS_PTRACE, SYS_ADMIN, DAC_OVERRIDE and KILL, seccomp and
#      AppArmor unconfined) migrating the workload by its host PID;
#   5. checks: the sender succeeded (with the uffd-wp tracker on Linux >= 6.7), the receiver
#      committed the session (session.json complete, `pagehaul inspect --json` in the receiver
#      container), and every page of the stopped workload equals the images byte for byte
#      (pagehaul.oracle, run in the sender image);
#   6. the same demo through deploy/compose.yaml, when `docker compose` or docker-compose is
#      installed (PAGEHAUL_COMPOSE_TEST=0 skips it);
#   7. everything is removed again (containers, dockerd, its mounts, the temporary folder), on
#      failure or interruption too.
#
# Needs root, docker.io (dockerd, containerd, runc) and debootstrap; .ci/docker-stage installs
# them. Prints the time each part took.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'run-docker-test: %s\n' "$*" >&2; }
die() { printf 'run-docker-test: FAIL: %s\n' "$*" >&2; exit 1; }

[[ $EUID -eq 0 ]] || die "needs root (dockerd, ptrace)"
DOCKER=${DOCKER:-docker}
export DOCKER
command -v "$DOCKER" >/dev/null || die "no docker client ($DOCKER); apt-get install docker.io"

t_start=$(date +%s)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/pagehaul-docker.XXXXXX")
chmod 0755 "$WORK"
NAME="pagehaul-test-$$"
PROJECT="pagehaul-test-$$"
DOCKERD_PID=""
COMPOSE=()
compose_up=0
containers=("$NAME-receiver" "$NAME-workload" "$NAME-sender" "$NAME-verify" "$NAME-certs")

show_logs() {
  local c
  for c in "${containers[@]}"; do
    if "$DOCKER" container inspect "$c" >/dev/null 2>&1; then
      log "--- docker logs $c (last 20 lines)"
      "$DOCKER" logs --tail 20 "$c" 2>&1 | sed 's/^/    /' >&2 || true
    fi
  done
  if [[ -n "$DOCKERD_PID" && -f "$WORK/dockerd.log" ]]; then
    log "--- dockerd.log (last 20 lines)"
    tail -n 20 "$WORK/dockerd.log" | sed 's/^/    /' >&2 || true
  fi
}

stop_dockerd() {
  [[ -n "$DOCKERD_PID" ]] || return 0
  kill -TERM "$DOCKERD_PID" 2>/dev/null || return 0
  for _ in $(seq 1 300); do
    kill -0 "$DOCKERD_PID" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$DOCKERD_PID" 2>/dev/null; then
    log "dockerd did not stop within 30 s; killing it"
    kill -KILL "$DOCKERD_PID" 2>/dev/null || true
  fi
  wait "$DOCKERD_PID" 2>/dev/null || true
  DOCKERD_PID=""
}

cleanup() {
  local rc=$? c
  trap - EXIT INT TERM
  set +e
  [[ $rc -eq 0 ]] || show_logs
  if [[ $compose_up -eq 1 ]]; then
    "${COMPOSE[@]}" -f deploy/compose.yaml -p "$PROJECT" down --volumes --remove-orphans >/dev/null 2>&1
  fi
  for c in "${containers[@]}"; do
    "$DOCKER" rm --force --volumes "$c" >/dev/null 2>&1
  done
  local t=$SECONDS
  stop_dockerd
  log "dockerd stopped in $(( SECONDS - t )) s"
  # Whatever an interrupted dockerd left mounted below WORK (overlays, netns), deepest first.
  awk -v w="$WORK/" 'index($5, w) == 1 { print $5 }' /proc/self/mountinfo | sort -r | while read -r m; do
    umount -l "$m" 2>/dev/null
  done
  rm -rf "$WORK"
  if [[ $rc -eq 0 ]]; then log "cleaned up in $(( SECONDS - t )) s"; else log "cleaned up after failure (exit $rc)"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

wait_for() {  # $1 = seconds, $2 = what, then a command that succeeds when ready
  local limit=$1 what=$2 deadline
  shift 2
  deadline=$(( $(date +%s) + limit ))
  until "$@"; do
    (( $(date +%s) < deadline )) || die "timed out after ${limit} s waiting for $what"
    sleep 0.2
  done
}

# ---- 1. dockerd ---------------------------------------------------------------------------
t0=$(date +%s)
if [[ -n "${PAGEHAUL_DOCKER_HOST:-}" ]]; then
  export DOCKER_HOST=$PAGEHAUL_DOCKER_HOST
  log "using the running engine at $DOCKER_HOST"
else
  command -v dockerd >/dev/null || die "dockerd is missing; apt-get install docker.io"
  export DOCKER_HOST="unix://$WORK/docker.sock"
  log "starting dockerd (data root $WORK/data)"
  dockerd --data-root "$WORK/data" --exec-root "$WORK/exec" --pidfile "$WORK/dockerd.pid" \
    --host "$DOCKER_HOST" --iptables=false --bridge=none >"$WORK/dockerd.log" 2>&1 &
  DOCKERD_PID=$!
  dockerd_up() {
    kill -0 "$DOCKERD_PID" 2>/dev/null || die "dockerd exited; see the log above"
    "$DOCKER" version >/dev/null 2>&1
  }
  wait_for 60 "dockerd's socket" dockerd_up
fi
log "engine $("$DOCKER" version --format '{{.Server.Version}}') ready in $(( $(date +%s) - t0 )) s"

# ---- 2. images ----------------------------------------------------------------------------
t0=$(date +%s)
PAGEHAUL_WHEEL_DIR="$WORK/wheels" bash deploy/build-images.sh
t_build=$(( $(date +%s) - t0 ))
log "images built in $t_build s"

# ---- 3. PKI -------------------------------------------------------------------------------
t0=$(date +%s)
mkdir -p "$WORK/pki" "$WORK/images" "$WORK/ready"
"$DOCKER" run --rm --name "$NAME-certs" --network none -v "$WORK/pki:/pki" pagehaul-sender:latest \
  certs --out /pki >/dev/null
chown 10001:10001 "$WORK/pki/receiver.key" "$WORK/images"   # the receiver's uid
chmod 1777 "$WORK/ready"                                     # the workload runs as 65534

# ---- 4. receiver, workload, sender ----------------------------------------------------------
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$DOCKER" run --detach --name "$NAME-receiver" --network host --no-healthcheck \
  -v "$WORK/images:/var/lib/pagehaul" -v "$WORK/pki:/pki:ro" pagehaul-receiver:latest \
  receive --listen "127.0.0.1:$PORT" --images-dir /var/lib/pagehaul \
  --tls-cert /pki/receiver.crt --tls-key /pki/receiver.key --tls-ca /pki/ca.crt >/dev/null
receiver_up() {
  [[ "$("$DOCKER" inspect -f '{{.State.Running}}' "$NAME-receiver")" == true ]] || die "the receiver exited"
  "$DOCKER" logs "$NAME-receiver" 2>&1 | grep -q "listening on"
}
wait_for 60 "the receiver to listen on 127.0.0.1:$PORT" receiver_up

"$DOCKER" run --detach --name "$NAME-workload" --user 65534:65534 --network none \
  -v "$WORK/ready:/ready" --entrypoint python3 pagehaul-sender:latest \
  -m pagehaul.workload --size-mib 64 --mutate --ready-file /ready/ready >/dev/null
workload_ready() {
  [[ "$("$DOCKER" inspect -f '{{.State.Running}}' "$NAME-workload")" == true ]] || die "the workload exited"
  [[ -s "$WORK/ready/ready" ]]
}
wait_for 120 "the workload's ready file" workload_ready
PID=$("$DOCKER" inspect -f '{{.State.Pid}}' "$NAME-workload")
grep -q "pagehaul.workload" "/proc/$PID/cmdline" || die "host PID $PID is not the workload"
log "receiver on 127.0.0.1:$PORT, workload host PID $PID ($(grep '^Seccomp:' "/proc/$PID/status" | tr -s '\t ' ' '))"

t_mig=$(date +%s)
SECURITY=(--pid=host --cap-drop=ALL --cap-add=SYS_PTRACE --cap-add=SYS_ADMIN --cap-add=DAC_OVERRIDE
          --cap-add=KILL --security-opt seccomp=unconfined --security-opt apparmor=unconfined)
timeout 300 "$DOCKER" run --rm --name "$NAME-sender" --network host "${SECURITY[@]}" \
  -v "$WORK/pki:/pki:ro" pagehaul-sender:latest \
  send --pid "$PID" --to "127.0.0.1:$PORT" --json \
  --tls-cert /pki/sender.crt --tls-key /pki/sender.key --tls-ca /pki/ca.crt >"$WORK/send.json" \
  || die "the sender failed (exit $?)"
log "migrated in $(( $(date +%s) - t_mig )) s"

# ---- 5. checks ----------------------------------------------------------------------------
kernel_has_pagemap_scan() {  # Linux >= 6.7
  local major minor
  IFS=. read -r major minor _ <<<"$(uname -r)"
  (( major > 6 || (major == 6 && minor >= 7) ))
}
expect_tracker=${PAGEHAUL_EXPECT_TRACKER:-}
if [[ -z "$expect_tracker" ]] && kernel_has_pagemap_scan; then expect_tracker=uffd-wp; fi

read -r SESSION ROUND < <(python3 - "$WORK/send.json" "$expect_tracker" <<'EOF'
import json
import sys

result = json.load(open(sys.argv[1]))
want = sys.argv[2]
assert result["left_stopped"], "the workload should have been left stopped"
assert not want or result["tracker"] == want, f"tracker {result['tracker']}, expected {want}"
print(result["session_id"], result["rounds"][-1]["directory"])
print(f"sender: tracker {result['tracker']}, {len(result['rounds'])} rounds, "
      f"frozen {result['frozen_time_us'] / 1000:.0f} ms", file=sys.stderr)
EOF
) || die "unexpected sender result: $(head -c 2000 "$WORK/send.json")"
[[ -n "${ROUND:-}" ]] || die "no session in the sender's result"
grep -q '^State:.*stopped' "/proc/$PID/status" || die "the workload is not stopped after the migration"

python3 - "$WORK/images/$SESSION/session.json" <<'EOF' || die "the receiver did not commit the session"
import json
import sys

session = json.load(open(sys.argv[1]))
assert session["complete"] is True, session
print(f"receiver: session {session['session_id']} complete, rounds {', '.join(session['rounds'])}", file=sys.stderr)
EOF
"$DOCKER" exec "$NAME-receiver" pagehaul inspect --json "/var/lib/pagehaul/$SESSION" >"$WORK/inspect.json" \
  || die "pagehaul inspect failed in the receiver container"
python3 - "$WORK/inspect.json" "$ROUND" <<'EOF' || die "pagehaul inspect: unexpected output"
import json
import sys

doc = json.load(open(sys.argv[1]))
rounds = [r["directory"] for r in doc["rounds"]]
assert rounds and rounds[-1] == sys.argv[2], rounds
assert sum(p["pages_present"] for r in doc["rounds"] for p in r["pagemaps"]) > 0, doc
EOF

# The oracle: every page of the stopped workload equals the images (needs to read /proc/PID/mem
# of uid 65534 and the receiver's 0700 session folders: SYS_PTRACE and DAC_OVERRIDE).
VERIFY='
import json, mmap, sys
from pathlib import Path
from cli.demo import dump_ranges
from pagehaul.oracle import verify_against_process
from pagehaul.procfs import read_vpid
pid, round_dir = int(sys.argv[1]), Path(sys.argv[2])
# Images are named by the pid the process has in the pid namespace of its container.
r = verify_against_process(round_dir, pid, dump_ranges(pid), mmap.PAGESIZE, image_id=read_vpid(pid))
print(f"verify: {r.pages_compared} pages compared, {r.mismatches} mismatches", file=sys.stderr)
sys.exit(0 if r.ok else 1)
'
"$DOCKER" run --rm --name "$NAME-verify" --network none --pid=host --cap-drop=ALL --cap-add=SYS_PTRACE \
  --cap-add=DAC_OVERRIDE -v "$WORK/images:/images:ro" --entrypoint python3 pagehaul-sender:latest \
  -c "$VERIFY" "$PID" "/images/$SESSION/$ROUND" || die "the images differ from the stopped workload"
"$DOCKER" rm --force "$NAME-workload" "$NAME-receiver" >/dev/null
t_run=$(( $(date +%s) - t0 ))

# ---- 6. compose ---------------------------------------------------------------------------
t0=$(date +%s)
if [[ "${PAGEHAUL_COMPOSE_TEST:-1}" == 0 ]]; then
  log "compose demo skipped (PAGEHAUL_COMPOSE_TEST=0)"
elif "$DOCKER" compose version >/dev/null 2>&1; then
  COMPOSE=("$DOCKER" compose)
elif command -v docker-compose >/dev/null; then
  COMPOSE=(docker-compose)
else
  log "compose demo skipped: neither 'docker compose' nor docker-compose is installed"
fi
if [[ ${#COMPOSE[@]} -gt 0 ]]; then
  log "compose demo (${COMPOSE[*]})"
  "${COMPOSE[@]}" -f deploy/compose.yaml -p "$PROJECT" config --quiet || die "compose.yaml is invalid"
  compose_up=1
  timeout 300 "${COMPOSE[@]}" -f deploy/compose.yaml -p "$PROJECT" up --no-build \
    --exit-code-from sender sender >"$WORK/compose.log" 2>&1 \
    || { tail -n 30 "$WORK/compose.log" >&2; die "compose demo failed"; }
  CSESSION=$(grep -o '"session_id": "[^"]*"' "$WORK/compose.log" | head -n 1 | cut -d'"' -f4)
  [[ -n "$CSESSION" ]] || { tail -n 30 "$WORK/compose.log" >&2; die "compose demo: no session_id"; }
  "${COMPOSE[@]}" -f deploy/compose.yaml -p "$PROJECT" run --rm --no-deps --entrypoint cat receiver \
    "/var/lib/pagehaul/$CSESSION/session.json" 2>>"$WORK/compose.log" | grep -q '"complete": true' \
    || die "compose demo: session $CSESSION is not complete"
  "${COMPOSE[@]}" -f deploy/compose.yaml -p "$PROJECT" down --volumes --remove-orphans >/dev/null 2>&1
  compose_up=0
  log "compose demo: session $CSESSION committed in $(( $(date +%s) - t0 )) s"
fi

log "PASS in $(( $(date +%s) - t_start )) s (images $t_build s, docker run migration and checks $t_run s)"

#!/usr/bin/env bash
# Build the container images pagehaul-sender and pagehaul-receiver from this work tree, with no
# registry but Debian's and PyPI:
#
#   1. a minimal Debian rootfs (debootstrap --variant=minbase, plus python3 and python3-venv) in
#      a cache folder, made once;
#   2. `docker import` of that rootfs as $BASE_IMAGE (pagehaul-base:bookworm), skipped when the
#      image already comes from this very rootfs;
#   3. wheels: pagehaul's own (`pip wheel`) and its dependencies' (`pip download`, binary only,
#      for the image's Python and CPU) in dist/docker/, the build context of both images;
#   4. `docker build` of deploy/Dockerfile.sender and deploy/Dockerfile.receiver.
#
# Idempotent: a second run reuses the rootfs and the base image, and docker's layer cache.
#
# Environment (all optional):
#   DOCKER                   docker client (default: docker); DOCKER_HOST picks the daemon
#   PAGEHAUL_CACHE           cache folder (default: ~/.cache/pagehaul)
#   PAGEHAUL_DEBIAN_MIRROR   Debian mirror URI (default: the machine's own apt sources)
#   PAGEHAUL_SUITE           Debian suite of the base (default: bookworm)
#   PAGEHAUL_BASE_IMAGE      base image (default: pagehaul-base:$PAGEHAUL_SUITE); set it to an
#                            existing image (python:3.11-slim) to skip steps 1 and 2
#   PAGEHAUL_IMAGE_PYTHON    Python version of the base image, for the wheels (default: 3.11)
#   PAGEHAUL_IMAGE_TAG       tag of the two images (default: latest)
#   PAGEHAUL_WHEEL_DIR       build context with the wheels (default: dist/docker; emptied first)
#   PYTHON                   Python with pip for the wheels (default: .venv/bin/python, else python3)
#
# Needs root for debootstrap (step 1 only).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'build-images: %s\n' "$*" >&2; }
die() { printf 'build-images: error: %s\n' "$*" >&2; exit 1; }

DOCKER=${DOCKER:-docker}
SUITE=${PAGEHAUL_SUITE:-bookworm}
CACHE=${PAGEHAUL_CACHE:-${HOME:?HOME is unset; set PAGEHAUL_CACHE}/.cache/pagehaul}
CACHE=${CACHE%/}
BASE_IMAGE=${PAGEHAUL_BASE_IMAGE:-pagehaul-base:$SUITE}
IMAGE_PYTHON=${PAGEHAUL_IMAGE_PYTHON:-3.11}
TAG=${PAGEHAUL_IMAGE_TAG:-latest}
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
ROOTFS="$CACHE/rootfs-$SUITE"
STAMP="$ROOTFS.stamp"          # written last: its presence means the rootfs is complete
CONTEXT=${PAGEHAUL_WHEEL_DIR:-dist/docker}

# ---- the machine's Debian mirror ----------------------------------------------------------
# The first URI of a deb822 stanza or one-line entry whose suite is a plain release name (no
# -security/-updates suffix): the same rule as scripts/install-criu.sh.
# shellcheck source=scripts/lib/apt-mirror.sh disable=SC1091  # checked on its own
source scripts/lib/apt-mirror.sh  # cwd is the repository root (cd above)

# ---- 1. rootfs ----------------------------------------------------------------------------
# Delete $1, first unmounting what a failed debootstrap may have left mounted in it (proc, sys).
remove_tree() {
  awk -v d="$1/" 'index($5, d) == 1 { print $5 }' /proc/self/mountinfo | sort -r | while read -r m; do
    umount -l "$m" || true
  done
  rm -rf "$1"
}

make_rootfs() {
  command -v debootstrap >/dev/null || die "debootstrap is missing (apt-get install debootstrap)"
  [[ $EUID -eq 0 ]] || die "debootstrap needs root"
  local mirror tmp
  mirror=${PAGEHAUL_DEBIAN_MIRROR:-$(find_mirror | grep -m1 -E '^(https?|file)://' || true)}
  [[ -n "$mirror" ]] || die "no Debian mirror in /etc/apt/sources.list{,.d}; set PAGEHAUL_DEBIAN_MIRROR"
  tmp="$ROOTFS.tmp"
  remove_tree "$tmp"
  trap 'remove_tree "$tmp"' EXIT
  log "debootstrap $SUITE (minbase + python3, python3-venv) from $mirror into $ROOTFS"
  debootstrap --variant=minbase --include=python3,python3-venv "$SUITE" "$tmp" "$mirror" \
    >"$CACHE/debootstrap-$SUITE.log" 2>&1 || die "debootstrap failed; see $CACHE/debootstrap-$SUITE.log"
  # What an image does not need: package lists and caches, documentation, other languages.
  rm -rf "$tmp"/var/lib/apt/lists/* "$tmp"/var/cache/apt/* "$tmp"/var/cache/debconf/*-old \
    "$tmp"/usr/share/doc/* "$tmp"/usr/share/man/* "$tmp"/usr/share/info/* "$tmp"/var/log/*
  find "$tmp/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} +
  remove_tree "$ROOTFS"
  mv "$tmp" "$ROOTFS"
  trap - EXIT
  # The stamp names this rootfs (the image label compares with it): suite, mirror, date, and a
  # digest of the installed package set.
  printf '%s %s %s %s\n' "$SUITE" "$mirror" "$(date -u +%Y%m%dT%H%M%SZ)" \
    "$(sha256sum <"$ROOTFS/var/lib/dpkg/status" | cut -c1-16)" >"$STAMP"
}

# ---- 2. base image ------------------------------------------------------------------------
import_base() {
  local want have
  want=$(tr ' ' '_' <"$STAMP")
  have=$("$DOCKER" image inspect -f '{{index .Config.Labels "io.pagehaul.rootfs"}}' "$BASE_IMAGE" 2>/dev/null || true)
  if [[ "$have" == "$want" ]]; then
    log "$BASE_IMAGE is up to date"
    return
  fi
  log "importing $ROOTFS as $BASE_IMAGE"
  tar --numeric-owner -C "$ROOTFS" -c . | "$DOCKER" import \
    --change "LABEL io.pagehaul.rootfs=$want" \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    - "$BASE_IMAGE" >/dev/null
}

# ---- 3. wheels ----------------------------------------------------------------------------
build_wheels() {
  local arch platforms=() minor
  case "$(uname -m)" in
    x86_64) arch=x86_64 ;;
    aarch64) arch=aarch64 ;;
    *) die "no manylinux wheels for $(uname -m)" ;;
  esac
  # glibc 2.17 (manylinux2014) up to bookworm's 2.36; pip does not expand manylinux_2_X itself.
  for minor in $(seq 17 36); do platforms+=(--platform "manylinux_2_${minor}_$arch"); done
  platforms+=(--platform "manylinux2014_$arch")
  rm -rf "$CONTEXT"
  mkdir -p "$CONTEXT"
  log "wheels for Python $IMAGE_PYTHON/$arch in $CONTEXT"
  local pip_log="$CONTEXT/.pip.log" wheel
  quiet_pip() { "$PYTHON" -m pip "$@" >>"$pip_log" 2>&1 || { cat "$pip_log" >&2; die "pip $1 failed"; }; }
  quiet_pip wheel --no-deps --wheel-dir "$CONTEXT" .
  wheel=$(find "$CONTEXT" -maxdepth 1 -name 'pagehaul-*.whl' -print -quit)
  [[ -n "$wheel" ]] || die "pip wheel made no pagehaul wheel"
  quiet_pip download --dest "$CONTEXT" --only-binary=:all: \
    --python-version "$IMAGE_PYTHON" --implementation cp "${platforms[@]}" "$wheel"
  rm -f "$pip_log"
  log "$(find "$CONTEXT" -maxdepth 1 -name '*.whl' | wc -l) wheels"
}

# ---- 4. images ----------------------------------------------------------------------------
build_image() {  # $1 = sender|receiver
  log "docker build pagehaul-$1:$TAG (FROM $BASE_IMAGE)"
  "$DOCKER" build --quiet --build-arg "BASE=$BASE_IMAGE" -f "deploy/Dockerfile.$1" \
    -t "pagehaul-$1:$TAG" "$CONTEXT" >/dev/null
}

"$DOCKER" version --format '{{.Server.Version}}' >/dev/null 2>&1 \
  || die "no Docker engine answers (DOCKER_HOST=${DOCKER_HOST:-unset}); see deploy/run-docker-test.sh"
mkdir -p "$CACHE"
if [[ -z "${PAGEHAUL_BASE_IMAGE:-}" ]]; then
  exec 9>"$CACHE/rootfs-$SUITE.lock"
  flock 9
  [[ -f "$STAMP" && -d "$ROOTFS" ]] || make_rootfs
  import_base
  flock -u 9
fi
build_wheels
build_image sender
build_image receiver
log "built pagehaul-sender:$TAG and pagehaul-receiver:$TAG"

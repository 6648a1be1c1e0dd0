#!/usr/bin/env bash
# Install CRIU 4.2.x (criu + crit) from Debian unstable (sid) into a private prefix.
#
# Why: pagehaul writes CRIU-compatible image files and checks them with crit, and its
# end-to-end tests restore with criu. On our machines (Debian 12 bookworm userland,
# Linux 6.18 kernel) the packaged versions do not work: bookworm's criu 3.17 fails on
# this kernel, and trixie's 4.1.1 is unfit as well. sid's 4.2.1 works, so this script
# takes criu and the shared libraries it needs (including sid's own glibc) from sid
# and runs criu through the prefix's own dynamic loader. Nothing is installed into the
# system: the machine's apt sources, lists and dpkg database are left as they are.
#
# Usage:
#     scripts/install-criu.sh               # install (or confirm) and print the prefix
#     PREFIX=$(scripts/install-criu.sh)     # the prefix is the last line on stdout
#     "$PREFIX/bin/criu" --version; "$PREFIX/bin/crit" decode -i pagemap-1.img --pretty
#
# Environment:
#     PAGEHAUL_CRIU_PREFIX   where to install (default ~/.cache/pagehaul/criu-4.2.1)
#     PAGEHAUL_CRIU_MIRROR   Debian mirror URI (default: the machine's own apt sources)
#
# How: a private apt configuration (own sources file, lists and cache folders under a
# temp folder) fetches sid's index; `apt-get download` fetches criu, libcompel1,
# python3-pycriu (which ships crit) and the dependency closure of criu (glibc,
# libprotobuf-c, libnl, libnet, gnutls, nftables, ... as sid has them); `dpkg -x`
# unpacks them into "$PREFIX.tmp"; `pip install --target` adds protobuf<6 for crit;
# wrapper scripts bin/criu and bin/crit are written; everything is verified; then
# "$PREFIX.tmp" is renamed to "$PREFIX". A failed run leaves no half-installed prefix.
# Re-running with a working prefix exits at once. Needs root only to apt-get install
# missing host tools (ca-certificates for an https mirror, python3-pip); amd64 only.
set -euo pipefail

CRIU_SERIES="4.2"   # accept 4.2.x; sid keeps only its newest version of a package
TRIPLET="x86_64-linux-gnu"
LOADER="ld-linux-x86-64.so.2"
PREFIX="${PAGEHAUL_CRIU_PREFIX:-${HOME:?HOME is unset; set PAGEHAUL_CRIU_PREFIX}/.cache/pagehaul/criu-4.2.1}"
PREFIX="${PREFIX%/}"
MARKER=".pagehaul-criu-prefix"

log() { printf 'install-criu: %s\n' "$*" >&2; }
die() { printf 'install-criu: error: %s\n' "$*" >&2; exit 1; }

# ---- already installed? -------------------------------------------------------------
prefix_works() {  # $1 = prefix; true if its criu is 4.2.x and its crit runs
    local p="$1" version
    [[ -x "$p/bin/criu" && -x "$p/bin/crit" ]] || return 1
    version=$("$p/bin/criu" --version 2>/dev/null) || return 1
    [[ "$version" == *"Version: ${CRIU_SERIES}."* ]] || return 1
    "$p/bin/crit" --help >/dev/null 2>&1 || return 1
}

if prefix_works "$PREFIX"; then
    log "CRIU already installed: $("$PREFIX/bin/criu" --version | head -n1)"
    printf '%s\n' "$PREFIX"
    exit 0
fi

# ---- preconditions ------------------------------------------------------------------
arch=$(dpkg --print-architecture 2>/dev/null) || die "dpkg not found: this script needs a Debian system"
[[ "$arch" == amd64 ]] || die "only amd64 is supported (this machine is $arch)"
command -v apt-get >/dev/null || die "apt-get not found"
[[ "$PREFIX" == /* ]] || die "PAGEHAUL_CRIU_PREFIX must be an absolute path (got '$PREFIX')"
if [[ -e "$PREFIX" && ! -e "$PREFIX/$MARKER" ]] && [[ -n "$(ls -A "$PREFIX" 2>/dev/null)" ]]; then
    die "$PREFIX exists and was not made by this script; remove it or choose another PAGEHAUL_CRIU_PREFIX"
fi
mkdir -p "$(dirname "$PREFIX")"

# One installer at a time per prefix (two CI jobs, or a test and a developer).
exec 9>"$PREFIX.lock"
if command -v flock >/dev/null; then
    flock 9
    if prefix_works "$PREFIX"; then  # another run finished while we waited
        log "CRIU installed by a concurrent run: $("$PREFIX/bin/criu" --version | head -n1)"
        printf '%s\n' "$PREFIX"
        exit 0
    fi
fi

as_root() {
    if [[ $(id -u) -eq 0 ]]; then "$@"
    elif command -v sudo >/dev/null; then sudo -n "$@"
    else die "need root to run: $*"
    fi
}
host_apt_updated=0
host_install() {  # install small host tools with the machine's own apt configuration
    log "installing host tools: $*"
    if [[ $host_apt_updated -eq 0 ]]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
        host_apt_updated=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
}

# ---- mirror from the machine's own apt sources --------------------------------------
# The first URI of a stanza/line whose suite is a release (no "-security"/"-updates"
# suffix). Works for deb822 *.sources files and one-line sources.list files.
# shellcheck source=scripts/lib/apt-mirror.sh disable=SC1091  # checked on its own
source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/lib/apt-mirror.sh"
MIRROR="${PAGEHAUL_CRIU_MIRROR:-$(find_mirror | grep -m1 -E '^(https?|file)://' || true)}"
[[ -n "$MIRROR" ]] || die "no Debian mirror found in /etc/apt/sources.list{,.d}; set PAGEHAUL_CRIU_MIRROR"
MIRROR="${MIRROR%/}"
if [[ "$MIRROR" == https://* && ! -s /etc/ssl/certs/ca-certificates.crt ]]; then
    host_install ca-certificates
fi

KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
[[ -s "$KEYRING" ]] || host_install debian-archive-keyring

# ---- python for crit ----------------------------------------------------------------
# crit runs with the system python3 (3.11 on bookworm), not the interpreter of whatever
# virtualenv or pyenv is active, so a project venv's protobuf 7 never meets pycriu.
if [[ -x /usr/bin/python3 ]]; then PYTHON=/usr/bin/python3
else PYTHON=$(command -v python3) || die "python3 not found"
fi
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 8))' || die "$PYTHON is older than 3.8"
# protobuf's wheels are abi3, so any python3's pip may fetch them for $PYTHON.
PIP=()
if "$PYTHON" -m pip --version >/dev/null 2>&1; then PIP=("$PYTHON" -m pip)
elif command -v python3 >/dev/null && python3 -m pip --version >/dev/null 2>&1; then PIP=(python3 -m pip)
else host_install python3-pip; PIP=("$PYTHON" -m pip)
fi

# ---- private apt --------------------------------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/pagehaul-criu.XXXXXX")
STAGE="$PREFIX.tmp"
cleanup() {
    local rc=$?
    rm -rf "$WORK"
    [[ $rc -eq 0 ]] || rm -rf "$STAGE"
    return $rc
}
trap cleanup EXIT
mkdir -p "$WORK/lists/partial" "$WORK/cache/archives/partial" "$WORK/debs"
# The bookworm keyring (2023.3+deb12u2) carries the keys sid's Release is signed with.
printf 'deb [signed-by=%s] %s sid main\n' "$KEYRING" "$MIRROR" >"$WORK/sources.list"
APT_OPTS=(
    -o "Dir::Etc::SourceList=$WORK/sources.list"
    -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::Etc::Preferences=/dev/null"
    -o "Dir::Etc::PreferencesParts=/dev/null"
    -o "Dir::State::Lists=$WORK/lists"
    -o "Dir::Cache=$WORK/cache"
    -o "Dir::Cache::pkgcache=pkgcache.bin"
    -o "Dir::Cache::srcpkgcache=srcpkgcache.bin"
    -o "APT::Default-Release="
    -o "APT::Sandbox::User=root"
    -o "Acquire::Languages=none"
    -o "Acquire::Retries=3"
    -o "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false"
    -o "Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled=false"
)
sid_apt_get() { DEBIAN_FRONTEND=noninteractive apt-get -q "${APT_OPTS[@]}" "$@"; }
sid_apt_cache() { apt-cache "${APT_OPTS[@]}" "$@"; }

log "fetching the sid package index from $MIRROR (private lists in $WORK)"
sid_apt_get update --error-on=any >"$WORK/update.log" 2>&1 || {
    cat "$WORK/update.log" >&2
    die "apt-get update for sid failed (does $MIRROR carry sid?)"
}

CRIU_VERSION=$(sid_apt_cache show --no-all-versions criu 2>/dev/null | awk '/^Version:/ {print $2; exit}' || true)
[[ -n "$CRIU_VERSION" ]] || die "sid has no criu package"
[[ "$CRIU_VERSION" == "${CRIU_SERIES}".* ]] ||
    die "sid now ships criu $CRIU_VERSION, not ${CRIU_SERIES}.x; pagehaul is tested with ${CRIU_SERIES}.x - update this script"
log "sid has criu $CRIU_VERSION"

# criu's run-time closure (libc6, libgnutls30t64, libnftables1, ... as sid names them):
# taking all of it from sid keeps the prefix self-contained and consistent with sid's
# glibc. python3-pycriu is added on its own: its dependencies (python3, protobuf) are
# served by the host python and pip instead.
mapfile -t closure < <(
    sid_apt_cache depends --recurse --no-recommends --no-suggests --no-conflicts \
        --no-breaks --no-replaces --no-enhances criu | grep -E '^[a-z0-9][a-z0-9.+-]*$' | sort -u)
packages=()
for pkg in "${closure[@]}"; do
    case "$pkg" in
        criu|libcompel1|python3-pycriu) ;;
        lib*|gcc-*-base) packages+=("$pkg") ;;
        *) die "criu's dependency closure in sid now includes '$pkg' (not a library); review this script" ;;
    esac
done
packages=("criu=$CRIU_VERSION" "libcompel1=$CRIU_VERSION" "python3-pycriu=$CRIU_VERSION" "${packages[@]}")
log "downloading ${#packages[@]} packages: ${packages[*]}"
(cd "$WORK/debs" && sid_apt_get download "${packages[@]}" >"$WORK/download.log" 2>&1) || {
    cat "$WORK/download.log" >&2
    die "apt-get download failed"
}

# ---- unpack into the staging prefix -------------------------------------------------
rm -rf "$STAGE"
mkdir -p "$STAGE/bin"
for deb in "$WORK"/debs/*.deb; do
    dpkg-deb -x "$deb" "$STAGE"
done
LIBDIR="usr/lib/$TRIPLET"
for f in "$LIBDIR/$LOADER" usr/sbin/criu usr/bin/crit usr/lib/python3/dist-packages/pycriu/__init__.py; do
    [[ -e "$STAGE/$f" ]] || die "unpacked packages lack $f"
done

log "installing protobuf<6 for crit into $STAGE/pylib"
PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1 "${PIP[@]}" install --quiet --no-input \
    --no-compile --target "$STAGE/pylib" 'protobuf>=3.20,<6' >&2 2>"$WORK/pip.log" || {
    cat "$WORK/pip.log" >&2
    die "pip install of protobuf<6 failed"
}

# ---- wrappers -----------------------------------------------------------------------
# Both find the prefix from their own location, so the staging folder can be renamed
# (and the prefix moved) without rewriting them. The loader's --library-path, unlike
# LD_LIBRARY_PATH, does not leak sid's glibc into programs criu starts (ip, iptables).
cat >"$STAGE/bin/criu" <<EOF
#!/bin/sh
# criu $CRIU_VERSION from Debian sid, run with sid's glibc through the prefix's own
# dynamic loader. Made by pagehaul scripts/install-criu.sh.
p=\$(dirname "\$(dirname "\$(readlink -f "\$0")")")
exec "\$p/$LIBDIR/$LOADER" --library-path "\$p/$LIBDIR" --argv0 "\$0" "\$p/usr/sbin/criu" "\$@"
EOF
cat >"$STAGE/bin/crit" <<EOF
#!/bin/sh
# crit $CRIU_VERSION (python3-pycriu from Debian sid) on the host's python3, with
# protobuf<6 from pylib/. Made by pagehaul scripts/install-criu.sh.
p=\$(dirname "\$(dirname "\$(readlink -f "\$0")")")
PYTHONPATH="\$p/usr/lib/python3/dist-packages:\$p/pylib"
PYTHONNOUSERSITE=1
export PYTHONPATH PYTHONNOUSERSITE
exec "$PYTHON" -s "\$p/usr/bin/crit" "\$@"
EOF
chmod 0755 "$STAGE/bin/criu" "$STAGE/bin/crit"
printf 'criu %s from Debian sid via %s, installed %s by scripts/install-criu.sh\n' \
    "$CRIU_VERSION" "$MIRROR" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" >"$STAGE/$MARKER"
printf '%s\n' "${packages[@]}" >"$STAGE/packages.txt"

# ---- verify the staging prefix ------------------------------------------------------
log "verifying"
outside=$("$STAGE/$LIBDIR/$LOADER" --library-path "$STAGE/$LIBDIR" --list "$STAGE/usr/sbin/criu" |
    awk '$2 == "=>" && $3 !~ /^\// {print $1; next} $2 == "=>" {print $3}' |
    grep -v -F "$STAGE/" || true)
[[ -z "$outside" ]] || die "criu's libraries resolve outside the prefix (missing from sid's closure?): $outside"
version=$("$STAGE/bin/criu" --version) || die "criu does not run: $version"
[[ "$version" == *"Version: ${CRIU_SERIES}."* ]] || die "unexpected criu --version output: $version"
"$STAGE/bin/crit" --help >/dev/null || die "crit does not run"
# A two-entry pagemap image: common magic, PAGEMAP magic, pagemap_head{pages_id=1},
# pagemap_entry{vaddr=0x400000, compat_nr_pages=0, flags=PE_PRESENT, nr_pages=1}.
printf '\x19\x43\x56\x54\x25\x40\x08\x56\x02\x00\x00\x00\x08\x01\x0b\x00\x00\x00\x08\x80\x80\x80\x02\x10\x00\x20\x04\x28\x01' \
    >"$WORK/pagemap-1.img"
decoded=$("$STAGE/bin/crit" decode -i "$WORK/pagemap-1.img") || die "crit decode failed on a test image"
[[ "$decoded" == *'"magic": "PAGEMAP"'* && "$decoded" == *'"vaddr": 4194304'* ]] ||
    die "crit decoded a test image wrongly: $decoded"

# ---- move into place ----------------------------------------------------------------
if [[ -e "$PREFIX" ]]; then
    log "replacing the broken or outdated $PREFIX"
    rm -rf "$PREFIX.old"
    mv "$PREFIX" "$PREFIX.old"
fi
mv "$STAGE" "$PREFIX"
rm -rf "$PREFIX.old"
log "installed $("$PREFIX/bin/criu" --version | head -n1) ($("$PREFIX/bin/crit" --version 2>&1) crit) in $PREFIX"
printf '%s\n' "$PREFIX"

#!/usr/bin/env bash
# Sets up the emulated aarch64 device: an aarch64 Python 3.11 with the aarch64 apache-tvm wheel,
# run by qemu-user, that infra/arm/rpc_device.sh starts as a TVM RPC server on 127.0.0.1.
#
#   infra/arm/setup_device.sh [--check]   # idempotent; ~2 s when everything is already there
#
# What it does (each step is skipped when already done):
#   1. host packages: qemu-user (/usr/bin/qemu-aarch64), gcc-aarch64-linux-gnu and libc6-dev-arm64-cross
#      (the cross linker and the crt files it links shared libraries with);
#      installed with apt-get when we are root, otherwise it prints the command and exits 1.
#   2. an aarch64 sysroot: Debian's arm64 debs of python3.11 and the libraries it and TVM need,
#      downloaded with apt-get (a private apt state under the cache: nothing arm64 is installed into
#      this system, and its apt configuration is not changed) and unpacked with dpkg -x.
#   3. the aarch64 wheels of the apache-tvm version in .venv (and its runtime deps, same versions as
#      .venv where it has them) in <sysroot>/opt/shrinkflow/site-packages.
#   4. <cache>/bin/python3.11: a host script that runs that Python under qemu-aarch64; it is also the
#      guest's sys.executable, so the subprocesses TVM's RPC server starts run under qemu as well.
#   5. a check: the emulated Python imports tvm and prints its version (after a change, or --check).
#
# Cache (survives fresh clones): ${SHRINKFLOW_CACHE:-$HOME/.cache/shrinkflow}/devices/aarch64
# Environment: VENV (default <repo>/.venv), SHRINKFLOW_CACHE.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
VENV=${VENV:-$REPO/.venv}
CACHE=${SHRINKFLOW_CACHE:-$HOME/.cache/shrinkflow}/devices/aarch64
SYSROOT=$CACHE/sysroot
SITE=$SYSROOT/opt/shrinkflow/site-packages
WRAPPER=$CACHE/bin/python3.11
QEMU=/usr/bin/qemu-aarch64

# Debian arm64 packages unpacked into the sysroot: Python 3.11 and the shared libraries that its
# stdlib modules, numpy's and TVM's wheels link against (libstdc++/libgcc for libtvm*.so).
SYSROOT_DEBS=(
  libc6 libgcc-s1 libstdc++6 zlib1g libexpat1 libffi8 libssl3 libbz2-1.0 liblzma5 libcrypt1
  libuuid1 python3.11-minimal libpython3.11-minimal libpython3.11-stdlib
)
# Python packages the aarch64 tvm needs at run time (tvm's own requirements, plus psutil that its
# RPC server uses to end timed-out sessions and cloudpickle that its popen workers use).
RUNTIME_PYPI=(apache-tvm-ffi numpy ml_dtypes typing_extensions psutil cloudpickle)

log() { echo "setup_device: $*"; }
die() { echo "setup_device: error: $*" >&2; exit 1; }

# --- 1. host packages -------------------------------------------------------------------------
need_pkgs=()
[ -x "$QEMU" ] || need_pkgs+=(qemu-user)
command -v aarch64-linux-gnu-gcc >/dev/null || need_pkgs+=(gcc-aarch64-linux-gnu)
# crti.o & co.: without them the cross gcc cannot link a shared library (a Recommends of the gcc).
[ -f /usr/aarch64-linux-gnu/lib/crti.o ] || need_pkgs+=(libc6-dev-arm64-cross)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "setup_device: missing ${need_pkgs[*]}; install them first:" >&2
    echo "  sudo apt-get update && sudo apt-get install -y ${need_pkgs[*]}" >&2
    exit 1
  fi
  log "installing ${need_pkgs[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null; }
  [ -x "$QEMU" ] || die "apt-get installed qemu-user but $QEMU is missing"
fi

# --- 2. the aarch64 sysroot -------------------------------------------------------------------
mkdir -p "$CACHE"
sysroot_stamp="$SYSROOT/.shrinkflow-debs"
if [ "$(cat "$sysroot_stamp" 2>/dev/null || true)" != "${SYSROOT_DEBS[*]}" ]; then
  log "building the aarch64 sysroot in $SYSROOT (Debian arm64 debs)"
  apt_dir=$CACHE/apt
  mkdir -p "$apt_dir/state/lists/partial" "$apt_dir/cache/archives/partial" "$CACHE/debs"
  : > "$apt_dir/state/status"
  # A private apt state that knows only arm64: the host's sources, no change to the host's apt/dpkg.
  apt_opts=(
    -o "APT::Architecture=arm64" -o "APT::Architectures=arm64"
    -o "Dir::State=$apt_dir/state" -o "Dir::State::status=$apt_dir/state/status"
    -o "Dir::Cache=$apt_dir/cache" -o "Debug::NoLocking=1" -o "APT::Sandbox::User=$(id -un)"
  )
  apt-get "${apt_opts[@]}" update -qq
  rm -f "$CACHE"/debs/*.deb
  (cd "$CACHE/debs" && apt-get "${apt_opts[@]}" download -qq "${SYSROOT_DEBS[@]}")
  rm -rf "$SYSROOT.tmp"
  mkdir -p "$SYSROOT.tmp"
  for deb in "$CACHE"/debs/*.deb; do
    dpkg -x "$deb" "$SYSROOT.tmp"
  done
  # Keep the site-packages of an earlier run (step 3 has its own stamp).
  if [ -d "$SITE" ]; then
    mkdir -p "$SYSROOT.tmp/opt/shrinkflow"
    mv "$SITE" "$SYSROOT.tmp/opt/shrinkflow/"
  fi
  rm -rf "$SYSROOT"
  mv "$SYSROOT.tmp" "$SYSROOT"
  (cd "$CACHE/debs" && ls *.deb) > "$SYSROOT/.shrinkflow-deb-files"
  echo "${SYSROOT_DEBS[*]}" > "$sysroot_stamp"
fi

# --- 3. aarch64 wheels ------------------------------------------------------------------------
[ -x "$VENV/bin/pip" ] || die "$VENV/bin/pip is missing: run 'make install' first (or set VENV)"
# Same versions as the host venv (its tvm is what builds the libraries the device runs).
specs=()
pip_list=$("$VENV/bin/pip" list --format=freeze 2>/dev/null)
for name in apache-tvm "${RUNTIME_PYPI[@]}"; do
  pinned=$(grep -i "^${name//[-_]/[-_]}==" <<<"$pip_list" || true)
  if [ -n "$pinned" ]; then specs+=("$pinned"); else specs+=("$name"); fi
done
want=$(printf '%s\n' "${specs[@]}" | grep -i '^apache-tvm==' | cut -d= -f3)
[ -n "$want" ] || die "$VENV has no apache-tvm: run 'make install'"
site_stamp="$SITE/.shrinkflow-wheels"
if [ "$(cat "$site_stamp" 2>/dev/null || true)" != "${specs[*]}" ]; then
  log "installing aarch64 wheels into $SITE: ${specs[*]}"
  plat=(--platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux_2_27_aarch64
        --platform manylinux_2_28_aarch64 --python-version 3.11 --implementation cp --abi cp311 --abi abi3
        --abi none --only-binary=:all:)
  mkdir -p "$CACHE/wheels"
  "$VENV/bin/pip" download -q --disable-pip-version-check "${plat[@]}" -d "$CACHE/wheels" "${specs[@]}"
  rm -rf "$SITE.tmp"
  "$VENV/bin/pip" install -q --isolated --disable-pip-version-check --no-index --find-links "$CACHE/wheels" \
    "${plat[@]}" --target "$SITE.tmp" "${specs[@]}"
  rm -rf "$SITE"
  mv "$SITE.tmp" "$SITE"
  echo "${specs[*]}" > "$site_stamp"
fi

# --- 4. the emulated python -------------------------------------------------------------------
mkdir -p "$CACHE/bin"
wrapper_text="#!/bin/sh
# aarch64 Python 3.11 under qemu-user (written by infra/arm/setup_device.sh). -0 makes this script
# the guest's sys.executable, so the Python subprocesses the guest starts are emulated too.
export PYTHONHOME='$SYSROOT/usr' PYTHONPATH='$SITE' PYTHONNOUSERSITE=1
exec '$QEMU' -L '$SYSROOT' -0 '$WRAPPER' '$SYSROOT/usr/bin/python3.11' \"\$@\"
"
if [ "$(cat "$WRAPPER" 2>/dev/null || true)" != "${wrapper_text%$'\n'}" ]; then
  printf '%s' "$wrapper_text" > "$WRAPPER"
  chmod +x "$WRAPPER"
fi

# --- 5. check ---------------------------------------------------------------------------------
# Importing tvm under emulation takes ~20 s, so it runs only after a change (or with --check);
# otherwise a quick check that qemu still runs the sysroot's Python.
check_stamp=$CACHE/.shrinkflow-checked
check_key="${specs[*]} | ${SYSROOT_DEBS[*]} | $("$QEMU" --version | head -n1)"
if [ "${1:-}" = --check ] || [ "$(cat "$check_stamp" 2>/dev/null || true)" != "$check_key" ]; then
  log "checking that the emulated Python imports tvm (about 20 s under qemu)"
  rm -f "$check_stamp"
  got=$("$WRAPPER" -c "import platform, tvm; print(platform.machine(), tvm.__version__)" 2>&1) \
    || die "the emulated Python cannot import tvm:
$got"
  got=$(tail -n1 <<<"$got")
  [ "$got" = "aarch64 $want" ] || die "expected 'aarch64 $want' from the emulated Python, got: $got"
  echo "$check_key" > "$check_stamp"
else
  got=$("$WRAPPER" -c "import platform; print(platform.machine())" 2>&1) \
    || die "the emulated Python does not run (re-run with --check for the full check):
$got"
  [ "$(tail -n1 <<<"$got")" = aarch64 ] || die "expected 'aarch64' from the emulated Python, got: $got"
fi
log "ok: $WRAPPER is an aarch64 Python 3.11 with tvm $want ($("$QEMU" --version | head -n1))"
log "start the device with: infra/arm/rpc_device.sh start [port]"

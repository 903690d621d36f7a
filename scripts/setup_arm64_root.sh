#!/usr/bin/env bash
# Make an arm64 (aarch64) Debian root in which the TVM runtime runs under qemu-user,
# so that Raspberry Pi 4 artifacts can be checked on an x86-64 machine without a Pi.
#
#   scripts/setup_arm64_root.sh [ROOT]     (default: $MOSC_ARM64_ROOT or ~/.cache/mosc/arm64-root)
#
# Then: qemu-aarch64 -L ROOT ROOT/usr/bin/python3 -c 'import tvm'   (binfmt is not needed)
#   with PYTHONPATH=ROOT/opt/mosc-site (the aarch64 wheels of apache-tvm, tvm-ffi, numpy, ...).
# Idempotent: each step leaves a marker and is skipped when it is there; prints its time.
# Needs root (apt-get, debootstrap) and network access to Debian and PyPI.
# Emulated timings mean nothing for a real Pi: this checks function, not speed.
set -euo pipefail

ROOT="${1:-${MOSC_ARM64_ROOT:-$HOME/.cache/mosc/arm64-root}}"
SUITE=bookworm                      # Python 3.11, same as the build machine
MIRROR=http://deb.debian.org/debian
TVM_VERSION=0.27.0.post1            # must match the TVM that builds the artifacts
TVM_FFI_VERSION=0.1.14.post1
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# host interpreter with pip, only to download wheels: $PYTHON, else the repo venv, else python3
PY="${PYTHON:-$( [[ -x $REPO/.venv/bin/python ]] && echo "$REPO/.venv/bin/python" || echo python3)}"
SITE="$ROOT/opt/mosc-site"          # aarch64 Python packages, put on PYTHONPATH

step() {  # step NAME MARKER COMMAND...: run once, timed
  local name=$1 marker=$2; shift 2
  if [[ -e $marker ]]; then echo "[skip] $name (done)"; return; fi
  local t0=$SECONDS
  "$@"
  touch "$marker"
  echo "[done] $name in $((SECONDS - t0)) s"
}

host_tools() {
  local missing=()
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v qemu-aarch64 >/dev/null || missing+=(qemu-user)
  command -v aarch64-linux-gnu-gcc >/dev/null || missing+=(gcc-aarch64-linux-gnu g++-aarch64-linux-gnu)
  if ((${#missing[@]})); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

root_fs() {
  # --foreign: only unpack (the second stage would need arm64 binfmt); enough to run python3
  rm -rf "$ROOT"
  mkdir -p "$(dirname "$ROOT")"
  debootstrap --foreign --arch=arm64 --variant=minbase \
    --include=python3,libgomp1,libstdc++6 "$SUITE" "$ROOT" "$MIRROR" >/dev/null
  # --foreign unpacks only the base set; the --include'd packages (python3, ...) are just
  # downloaded. Unpack every downloaded .deb (no maintainer scripts: qemu -L needs none).
  local deb
  for deb in "$ROOT"/var/cache/apt/archives/*.deb; do dpkg-deb -x "$deb" "$ROOT"; done
}

wheels() {
  # pip on the host resolves aarch64 wheels and unpacks them: nothing aarch64 runs here
  rm -rf "$SITE"
  "$PY" -m pip install --quiet --disable-pip-version-check --no-deps --target "$SITE" \
    --platform manylinux_2_28_aarch64 --python-version 3.11 --implementation cp --only-binary=:all: \
    "apache-tvm==$TVM_VERSION" "apache-tvm-ffi==$TVM_FFI_VERSION" numpy ml_dtypes typing_extensions
}

check() {
  PYTHONPATH="$SITE" TVM_USE_RUNTIME_LIB=1 qemu-aarch64 -L "$ROOT" "$ROOT/usr/bin/python3" -c \
    'import platform, tvm, numpy; print("arm64 root ok:", platform.machine(), "tvm", tvm.__version__, "numpy", numpy.__version__)'
}

mkdir -p "$(dirname "$ROOT")"
t_all=$SECONDS
t0=$SECONDS; host_tools; echo "[done] host tools (debootstrap, qemu-user, aarch64 gcc) in $((SECONDS - t0)) s"
step "debootstrap $SUITE arm64 (+ python3, libgomp1) into $ROOT" "$ROOT/.mosc-rootfs-done" root_fs
step "aarch64 wheels into $SITE" "$SITE/.mosc-wheels-done" wheels
t0=$SECONDS; check; echo "[done] check in $((SECONDS - t0)) s"
echo "arm64 root ready in $((SECONDS - t_all)) s: $ROOT"

#!/usr/bin/env bash
# The GPU half of mosc, checked on a machine with an Nvidia GPU and nothing set up: makes a
# venv with the project and a CUDA torch, then runs benchmarks/gpu_check.py (trains a tiny
# supernet on the GPU in fp32 and bf16 next to the CPU, checks collapse exactness on the GPU,
# exports, compiles for target nvidia, times TVM against torch eager on CUDA) and writes
# benchmarks/results/gpu_check.json. The Python step takes a few minutes (limit: 8).
#
#   scripts/gpu_check.sh                 # on the GPU machine (needs the network for pip once)
#   scripts/gpu_check.sh --dry-run       # anywhere: prints the set-up it would do, then runs the same
#                                        # Python step on the CPU with tiny sizes, in the existing
#                                        # .venv; CUDA-only parts say "skipped (no GPU)"; JSON in /tmp
#   scripts/gpu_check.sh --out FILE      # the JSON somewhere else
#
# Environment: PYTHON (3.11+, makes the venv; default python3), VENV (default
# ~/.cache/mosc/gpu-venv, outside the repo; the dry run uses .venv), TORCH (default
# torch==2.13.0: PyPI's Linux wheel of it is the CUDA build), GPU_CHECK_TIMEOUT (seconds
# for the Python step, default 480). Other options go to benchmarks/gpu_check.py.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH="${TORCH:-torch==2.13.0}"
LIMIT="${GPU_CHECK_TIMEOUT:-480}"
VENV="${VENV:-$HOME/.cache/mosc/gpu-venv}"  # its own: a CPU torch in .venv would satisfy ==2.13.0 too
# TVM 0.27's CUDA runtime links libcudart.so.13 and compiles its kernels' CUDA source when an
# artifact is loaded (NVRTC through cuda-bindings): both come from PyPI, for CUDA 13.
TVM_CUDA=("cuda-bindings[all]==13.*" "nvidia-cuda-runtime==13.*")
DRY=0
OUT=""
EXTRA=()

die() { echo "gpu_check: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) [ $# -ge 2 ] || die "--out needs a file name"; OUT="$2"; shift ;;
        --out=*) OUT="${1#--out=}" ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) EXTRA+=("$1") ;;  # passed on to benchmarks/gpu_check.py (--steps, --repeats, ...)
    esac
    shift
done

# On a GPU machine: a venv with the CUDA torch and TVM's CUDA pieces. The dry run only says it.
setup() {
    local venv="$1" run=()
    [ "$DRY" = 1 ] && run=(echo "  would run:")
    [ -x "$venv/bin/python" ] || "${run[@]}" "$PYTHON" -m venv "$venv"
    "${run[@]}" "$venv/bin/pip" install -q --disable-pip-version-check "$TORCH"  # first and pinned, as in the Makefile
    "${run[@]}" "$venv/bin/pip" install -q --disable-pip-version-check -e "$ROOT[test]"
    "${run[@]}" "$venv/bin/pip" install -q --disable-pip-version-check "${TVM_CUDA[@]}"
}

# The pip-installed CUDA libraries (nvidia/*/lib) for TVM's runtime, which dlopens them by name.
cuda_lib_path() {
    "$1" - <<'EOF'
import glob, os, site
dirs = [d for sp in site.getsitepackages() for d in sorted(glob.glob(os.path.join(sp, "nvidia", "**", "lib"), recursive=True))]
print(":".join(dict.fromkeys(dirs)))
EOF
}

check_gpu() {
    command -v nvidia-smi >/dev/null || die "no Nvidia driver here (nvidia-smi not found); on a machine without a GPU use --dry-run"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/gpu: /'
    local driver
    driver="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1 | cut -d. -f1)"
    if [ "${driver:-0}" -lt 580 ] 2>/dev/null; then
        echo "gpu_check: driver $driver is older than CUDA 13's 580: training runs, the TVM stage will fail" >&2
    fi
}

cd "$ROOT"
if [ "$DRY" = 1 ]; then
    echo "dry run: the set-up a GPU machine gets"
    setup "$VENV"
    PY="$ROOT/.venv/bin/python"
    [ -x "$PY" ] || die "no $ROOT/.venv (make setup) for the dry run"
    OUT="${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/mosc-gpu-check.XXXXXX")/gpu_check.json}"
    exec timeout "$LIMIT" "$PY" benchmarks/gpu_check.py --dry-run --out "$OUT" ${EXTRA[@]+"${EXTRA[@]}"}
fi

check_gpu
setup "$VENV"
PY="$VENV/bin/python"
"$PY" -c 'import sys, torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")
sys.exit(0 if torch.cuda.is_available() else 1)' \
    || die "this torch sees no GPU (a CPU wheel from a local index or find-links? set TORCH to a CUDA build)"
LIBS="$(cuda_lib_path "$PY")"
export LD_LIBRARY_PATH="${LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
OUT="${OUT:-$ROOT/benchmarks/results/gpu_check.json}"
timeout "$LIMIT" "$PY" benchmarks/gpu_check.py --out "$OUT" ${EXTRA[@]+"${EXTRA[@]}"}

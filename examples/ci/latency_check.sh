#!/usr/bin/env bash
# Latency-regression check for one device, callable from any CI system.
#
#   examples/ci/latency_check.sh TARGET ARCH.json [BASELINE.json]
#
# 1. `mosc bench` measures ARCH (artifact built or reused from the artifact cache) with the
#    target's [protocol] and writes the raw samples to $OUT_DIR/result.json;
# 2. the baseline is the one of the machine that was measured (this runner, or the device
#    over RPC): $BASELINES/<target>-<arch hash>-<machine>.json, <machine> = its hostname and
#    CPU model (e.g. host-fc12a1ac56bf6404-vm-amd-epyc.json). Timings of one machine say
#    nothing about another, so a machine is only ever compared with itself;
# 3. no baseline for this machine yet (a new runner or device): this run's result becomes it
#    (exit 0, "created"); keep it (commit it, or point BASELINES at a folder the runner keeps)
#    and the next runs compare with it;
# 4. otherwise `mosc check` compares the result with it (bootstrap CI of the median/p90 ratio
#    vs the target file's [regression] tolerances) and writes $OUT_DIR/junit.xml and
#    $OUT_DIR/check.json for the CI system to upload/show.
# Exit code: 0 pass (or improved, or baseline created), 1 latency regression, 2 bad input /
# baseline not comparable (other TVM version, protocol or thread count: re-baseline on purpose
# with UPDATE_BASELINE=1 FORCE=1).
#
# Environment knobs:
#   MOSC           the mosc command (default: mosc)
#   PYTHON         the Python that has mosc installed (default: python3)
#   OUT_DIR        where result.json, check.json, junit.xml go (default: latency-out)
#   BASELINES      folder of the per-machine baselines (default: examples/ci/baselines)
#   REPEATS        timed runs (default 200: see benchmarks/regression_power.py for why)
#   TUNE           --tune or --no-tune (default --no-tune: the examples' baseline is untuned)
#   TVM_NUM_THREADS  pinned to 1 by default: a baseline is only comparable at the same count
#   UPDATE_BASELINE=1  write the result as the new baseline when the check passes
#   FORCE=1        with UPDATE_BASELINE=1: replace the baseline even on a regression / not comparable
#   EXTRA_ARGS     more options for mosc bench (e.g. "--checkpoint runs/x" or "--tracker HOST:PORT")
# The machine's name comes from its hostname: give CI containers a fixed one (docker run
# --hostname), or every run is a new machine with a new baseline.
set -euo pipefail

TARGET=${1:?usage: latency_check.sh TARGET ARCH.json [BASELINE.json]}
ARCH=${2:?usage: latency_check.sh TARGET ARCH.json [BASELINE.json]}
MOSC=${MOSC:-mosc}
PYTHON=${PYTHON:-python3}
OUT_DIR=${OUT_DIR:-latency-out}
REPEATS=${REPEATS:-200}
TUNE=${TUNE:---no-tune}
export TVM_NUM_THREADS=${TVM_NUM_THREADS:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
HERE=$(cd "$(dirname "$0")" && pwd)
BASELINES=${BASELINES:-$HERE/baselines}
HASH=$("$PYTHON" -c 'import sys; from mosc.space import Arch; print(Arch.load(sys.argv[1]).hash)' "$ARCH")
mkdir -p "$OUT_DIR"

# shellcheck disable=SC2086
$MOSC bench --target "$TARGET" --arch "$ARCH" $TUNE --repeats "$REPEATS" --out "$OUT_DIR/result.json" ${EXTRA_ARGS:-}

MACHINE=$("$PYTHON" -c 'import sys; from mosc.regress import load_result, machine_slug; print(machine_slug(load_result(sys.argv[1])))' \
  "$OUT_DIR/result.json")
BASELINE=${3:-$BASELINES/$TARGET-$HASH-$MACHINE.json}

UPDATE=()
if [[ "${UPDATE_BASELINE:-0}" == 1 ]]; then UPDATE=(--update-baseline); fi
if [[ "${UPDATE_BASELINE:-0}" == 1 && "${FORCE:-0}" == 1 ]]; then UPDATE+=(--force); fi
if [[ ! -f "$BASELINE" ]]; then  # a machine never measured before: this run is its baseline
  $MOSC check --baseline "$BASELINE" --result "$OUT_DIR/result.json" --target "$TARGET" --update-baseline
  echo "no baseline for machine '$MACHINE' yet: created $BASELINE from this run;" \
       "keep it (commit it) so that the next runs on this machine compare with it"
  exit 0
fi
set +e
$MOSC check --baseline "$BASELINE" --result "$OUT_DIR/result.json" --target "$TARGET" \
  --json-out "$OUT_DIR/check.json" --junit "$OUT_DIR/junit.xml" "${UPDATE[@]}"
rc=$?
set -e
echo "mosc check exit code: $rc (0 pass, 1 regression, 2 bad input / not comparable)"
exit $rc

#!/usr/bin/env bash
# Latency-regression check for one device, callable from any CI system.
#
#   examples/ci/latency_check.sh TARGET ARCH.json [BASELINE.json]
#
# 1. `mosc bench` measures ARCH (artifact built or reused from the artifact cache) with the
#    target's [protocol] and writes the raw samples to $OUT_DIR/result.json;
# 2. `mosc check` compares it with the committed baseline (bootstrap CI of the median/p90
#    ratio vs the target's [regression] tolerances) and writes $OUT_DIR/junit.xml and
#    $OUT_DIR/check.json for the CI system to upload/show.
# Exit code: 0 pass (or improved), 1 latency regression, 2 bad input / baseline not comparable
# (other target, arch, TVM version, protocol or thread count: re-baseline on purpose).
#
# Environment knobs:
#   MOSC           the mosc command (default: mosc)
#   OUT_DIR        where result.json, check.json, junit.xml go (default: latency-out)
#   REPEATS        timed runs (default 200: see benchmarks/regression_power.py for why)
#   TUNE           --tune or --no-tune (default --no-tune: the examples' baseline is untuned)
#   TVM_NUM_THREADS  pinned to 1 by default: a baseline is only comparable at the same count
#   UPDATE_BASELINE=1  write the result as the new baseline when the check passes
#   EXTRA_ARGS     more options for mosc bench (e.g. "--checkpoint runs/x" or "--tracker HOST:PORT")
set -euo pipefail

TARGET=${1:?usage: latency_check.sh TARGET ARCH.json [BASELINE.json]}
ARCH=${2:?usage: latency_check.sh TARGET ARCH.json [BASELINE.json]}
MOSC=${MOSC:-mosc}
OUT_DIR=${OUT_DIR:-latency-out}
REPEATS=${REPEATS:-200}
TUNE=${TUNE:---no-tune}
export TVM_NUM_THREADS=${TVM_NUM_THREADS:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
HERE=$(cd "$(dirname "$0")" && pwd)
HASH=$(python3 -c 'import json,sys,hashlib; from mosc.space import Arch; print(Arch.load(sys.argv[1]).hash)' "$ARCH")
BASELINE=${3:-$HERE/baselines/$TARGET-$HASH.json}
mkdir -p "$OUT_DIR"

# shellcheck disable=SC2086
$MOSC bench --target "$TARGET" --arch "$ARCH" $TUNE --repeats "$REPEATS" --out "$OUT_DIR/result.json" ${EXTRA_ARGS:-}

UPDATE=()
if [[ "${UPDATE_BASELINE:-0}" == 1 ]]; then UPDATE=(--update-baseline); fi
if [[ ! -f "$BASELINE" && ${#UPDATE[@]} -eq 0 ]]; then
  echo "no baseline $BASELINE: run with UPDATE_BASELINE=1 once on the device and commit it" >&2
  exit 2
fi
set +e
$MOSC check --baseline "$BASELINE" --result "$OUT_DIR/result.json" \
  --json-out "$OUT_DIR/check.json" --junit "$OUT_DIR/junit.xml" "${UPDATE[@]}"
rc=$?
set -e
echo "mosc check exit code: $rc (0 pass, 1 regression, 2 bad input / not comparable)"
exit $rc

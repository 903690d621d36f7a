"""Latency-regression checks per device: `mosc bench` results and `mosc check` verdicts.

    bench(target, artifact, arch)        measure an artifact with the target's protocol -> result dict
    environment()                        mosc.rpc.machine_info() + TVM / tvm-ffi versions, CPU model, governor
    compatible(baseline, result)         refuse comparisons that mean nothing (MoscError, one line):
                                         other target, arch, machine, TVM, threads or protocol
    compare(baseline, result, ...)       bootstrap CIs of current/baseline ratios + Mann-Whitney U
    junit_xml(report) / print-free       CI outputs (the CLI prints the table)

A *result* (JSON, format "mosc-bench/1") holds the raw per-run total latencies (ms) of
one measurement with the target's [protocol], what one run was (`timing`: one call of the
artifact's compiled translate function; results written before it: per graph call), the protocol, the target, the arch (hash +
JSON), the artifact's manifest sha256 and the environment. A *baseline* is a result that
was accepted earlier (`mosc check --update-baseline`).

Model kinds (mosc.contract; `kind`, from the artifact's graphs, "translation" when a result
predates the field). For a translation model one run is a whole translation (encoder +
decoder_steps steps). For an encoder-classifier one run is one call of its classifier graph:
samples_ms = encoder_ms = that call's time, decoder_ms = 0 per run, protocol.source_len = the
sequence length and protocol.decoder_steps = 0 (there is no decoder, so the target's
decoder_steps must not decide comparability). A result is compared only with one of its kind.

Statistics. For each metric (p50 = median of the trimmed runs, p90 = 90th percentile of
the trimmed runs, the same definitions as mosc.device.protocol.summarize), the two sample sets
are bootstrapped independently (seeded, `resamples` draws each) and the ratio
current/baseline of the statistic is formed per draw; its percentile interval is the
confidence interval. Verdict per metric, with the target's [regression] tolerance tol:
    regression  CI lower bound > 1 + tol  (confidently slower by more than tol)
    improved    CI upper bound < 1 - tol  (confidently faster by more than tol)
    pass        otherwise
Mann-Whitney U (one-sided, "current is slower") is reported as a secondary statistic
only; it does not decide (with many runs it flags differences far below the tolerance).

Device world: numpy (and scipy for the U test) at most; tvm inside functions; no torch.
Knows nothing of how an artifact is loaded or timed (mosc.device.backends.measure_artifact)
nor of the latency database.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable

import numpy as np

from mosc.contract import ENCODER_CLASSIFIER, KIND_GRAPHS, TRANSLATION
from mosc.device.protocol import GRAPH_CALLS, _trimmed, summarize
from mosc.errors import MoscError
from mosc.rpc import cpu_model  # noqa: F401  (re-exported: the CPU model recorded with a result)

FORMAT = "mosc-bench/1"
RESAMPLES = 2000
CONFIDENCE = 0.95
SEED = 0
METRICS = ("p50", "p90")
# protocol fields that must match between baseline and result (repeats may differ)
PROTOCOL_KEYS = ("source_len", "decoder_steps", "batch", "warmup", "trim")
EXIT = {"pass": 0, "improved": 0, "regression": 1}
DEFAULT_TOLERANCES = {"p50_tol": 0.05, "p90_tol": 0.10}  # a target file's [regression] defaults


# ----------------------------------------------------------------------------- environment
def _pkg(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def environment() -> dict:
    """Where a result was measured (this machine; for RPC the device's own info is added by bench):
    machine_info() (hostname and CPU model: a baseline compares only with its own machine) plus
    what decides comparability (TVM and tvm-ffi versions, TVM_NUM_THREADS) and what explains
    drift (frequency governor)."""
    from mosc.rpc import machine_info

    return {
        "tvm_version": _pkg("apache-tvm"), "tvm_ffi_version": _pkg("apache-tvm-ffi"),
        "governor": _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
        **machine_info(), "tvm_num_threads": os.environ.get("TVM_NUM_THREADS"),
    }


# ----------------------------------------------------------------------------- bench
def bench(target, artifact: str | Path, arch=None, *, repeats: int | None = None, remote=None,
          measure: Callable | None = None) -> dict:
    """Measure an artifact with the target's protocol (repeats overridable) -> a result dict.

    arch: a mosc.space.Arch, or None to take it from the artifact's manifest. remote: a
    mosc.rpc.Remote (measure on a device over RPC) or None (this machine). measure:
    the timing function (default mosc.device.backends.measure_tvm); tests may wrap it.
    """
    from mosc.device.backends import measure_artifact, measure_tvm

    artifact = Path(artifact)
    manifest, protocol, kind = bench_inputs(target, artifact, arch, repeats)
    t0 = time.perf_counter()
    try:
        m, dev = measure_artifact(artifact, protocol, remote, measure=measure or measure_tvm)
    except ConnectionError as e:  # tracker down, key not registered, device busy
        if remote is None:
            raise
        raise MoscError(f"cannot reach device {remote.key!r} via tracker {remote.addr}: {e}") from None
    wall = time.perf_counter() - t0
    _check_shapes(m.shapes, target, protocol, kind, artifact)  # what was timed, not only what the manifest says
    return _result(target, protocol, artifact, manifest, arch, m, remote, dev, wall, kind)


def run_protocol_of(protocol, kind: str) -> dict:
    """The protocol a measurement of this kind follows, as recorded in its result: an
    encoder-classifier has no decoder, so its decoder_steps is 0 whatever the target says."""
    p = asdict(protocol)
    return {**p, "decoder_steps": 0} if kind == ENCODER_CLASSIFIER else p


def timing_of(r: dict) -> str:
    """What one run of a result was (mosc.device.protocol): results written before the compiled loop
    timed a translation per graph call."""
    return r.get("timing", GRAPH_CALLS)


def kind_of(r: dict) -> str:
    """The model kind a result was measured on (results written before kinds existed: translation)."""
    return r.get("kind", TRANSLATION)


def bench_inputs(target, artifact: Path, arch, repeats: int | None) -> tuple[dict, object, str]:
    """(verified manifest, protocol, model kind) of a bench; MoscError (one line) when the artifact
    is not for these: its files, arch, target, or its graphs' shapes (read from the manifest, so
    a wrong artifact is refused before anything is loaded or uploaded)."""
    from dataclasses import replace

    from mosc.compiler.artifact import verify_artifact
    from mosc.contract import graph_kind

    manifest = verify_artifact(artifact)
    model = manifest.get("model") or {}
    if arch is not None and model.get("arch_hash") not in (None, arch.hash):
        raise MoscError(f"{artifact} holds arch {model.get('arch_hash')}, not {arch.hash} (wrong --arch?)")
    if manifest.get("target") != target.name:
        raise MoscError(f"{artifact} was compiled for target {manifest.get('target')!r}, not {target.name!r}")
    protocol = target.protocol if repeats is None else replace(target.protocol, repeats=repeats)
    if protocol.repeats < 2:
        raise MoscError("--repeats must be at least 2 (a statistic needs several runs)")
    kind = graph_kind(manifest["graphs"], f"artifact {artifact}")
    _check_shapes(artifact_shapes(manifest["graphs"], kind), target, protocol, kind, artifact)
    return manifest, protocol, kind


def artifact_shapes(graphs: dict, kind: str) -> dict[str, int]:
    """batch, source_len, decoder_steps of an artifact's graphs (as a Measurement's `shapes` says
    them: an encoder-classifier's sequence length is its source_len, its decoder_steps 0)."""
    from mosc.contract import CLASSIFIER, ENCODER, cache_shape

    if kind == ENCODER_CLASSIFIER:
        B, T = graphs[CLASSIFIER]["inputs"][0]["shape"]
        return {"batch": B, "source_len": T, "decoder_steps": 0}
    B, S = graphs[ENCODER]["inputs"][0]["shape"]
    return {"batch": B, "source_len": S, "decoder_steps": cache_shape(graphs)[1]}


def _check_shapes(shapes: dict, target, protocol, kind: str, artifact: Path) -> None:
    p = {k: shapes[k] for k in ("batch", "source_len", "decoder_steps")}
    want = {k: v for k, v in run_protocol_of(protocol, kind).items() if k in p}
    if p != want:
        how = ("re-export it with --source-len {source_len} --batch {batch}: an encoder's sequence length is the "
               "protocol's source_len" if kind == ENCODER_CLASSIFIER else "rebuild it").format(**want)
        raise MoscError(f"{artifact}: graphs have shapes {p}, the {target.name} protocol says {want} ({how})")


def _result(target, protocol, artifact: Path, manifest: dict, arch, m, remote, dev: dict | None,
            wall: float, kind: str = TRANSLATION) -> dict:
    """The `mosc bench` result dict (format FORMAT) of one measurement."""
    from mosc.fileio import sha256_file

    model = manifest.get("model") or {}
    return {
        "format": FORMAT, "target": target.name, "kind": kind,
        "protocol": run_protocol_of(protocol, kind), "regression": asdict(target.regression),
        "arch": {"hash": arch.hash if arch is not None else model.get("arch_hash"),
                 "json": arch.to_json() if arch is not None else model.get("arch")},
        "artifact": {"sha256": sha256_file(artifact / "manifest.json"), "dir": str(artifact),
                     "tuned": (manifest.get("tuning") or {}).get("tuned"),
                     "tvm_version": manifest.get("tvm_version"), "tvm_ffi_version": manifest.get("tvm_ffi_version")},
        "environment": environment(),
        "device": {"where": "local" if remote is None else f"rpc {remote.key}@{remote.addr}", **(dev or {})},
        "method": m.method, "timing": m.protocol,
        "samples_ms": [round(x, 6) for x in m.total_ms],
        **({} if m.kernel_ms is None else {"kernel_ms": [round(x, 6) for x in m.kernel_ms]}),
        "encoder_ms": [round(x, 6) for x in m.encoder_ms], "decoder_ms": [round(x, 6) for x in m.decoder_ms],
        "stats": summarize(m.total_ms, protocol.trim),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "wall_s": round(wall, 3),
    }


def load_result(path: str | Path, what: str = "result") -> dict:
    """A `mosc bench` result (or baseline) file, its structure checked (MoscError, one line)."""
    from mosc.fileio import read_json

    r = read_json(path, what)
    if r.get("format") != FORMAT:
        raise MoscError(f"{what} {path} is not a mosc bench result (format {r.get('format')!r}, expected {FORMAT!r})")
    check_result(r, f"{what} {path}")
    return r


def check_result(r: dict, where: str) -> dict:
    """The structure compatible() and compare() rely on; MoscError naming the field otherwise."""
    from mosc.fileio import field

    field(r, "target", str, where)
    if kind_of(r) not in KIND_GRAPHS:
        raise MoscError(f"{where}: 'kind' must be one of {', '.join(map(repr, KIND_GRAPHS))}, not {r.get('kind')!r}")
    protocol = field(r, "protocol", dict, where)
    for k in PROTOCOL_KEYS:
        field(protocol, k, (int, float) if k == "trim" else int, f"{where} protocol")
    if not 0 <= protocol["trim"] < 0.5:
        raise MoscError(f"{where} protocol: 'trim' must be in [0, 0.5), not {protocol['trim']!r}")
    field(field(r, "arch", dict, where), "hash", str, f"{where} arch")
    env = field(r, "environment", dict, where)
    for k in ("tvm_version", "tvm_ffi_version", "tvm_num_threads", "hostname", "cpu_model"):
        if env.get(k) is not None:
            field(env, k, str, f"{where} environment")
    for k in ("device", "artifact", "regression"):
        if r.get(k) is not None:
            field(r, k, dict, where)
    s = field(r, "samples_ms", list, where)
    if len(s) < 2 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0
                             for x in s):
        raise MoscError(f"{where} has no usable samples_ms (need >= 2 positive run latencies)")
    return r


# ----------------------------------------------------------------------------- comparability
def machine(r: dict) -> tuple[str | None, str | None]:
    """(hostname, CPU model) of the machine a result was timed on: the device's for a result
    measured over RPC, this machine's otherwise (None where the result does not say)."""
    dev = r.get("device") or {}
    src = dev if dev.get("where", "local") != "local" else r.get("environment") or {}
    return src.get("hostname"), src.get("cpu_model")


def machine_slug(r: dict) -> str:
    """The machine a result was timed on as a file-name part ("vm-amd-epyc"): baselines are kept
    per machine (examples/ci/latency_check.sh names them <target>-<arch hash>-<this>.json)."""
    import re

    text = "-".join(x for x in machine(r) if x)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:80] or "unknown-machine"


def compatible(baseline: dict, result: dict) -> None:
    """MoscError (one line) when the two were measured under different conditions."""
    check_result(baseline, "baseline")
    check_result(result, "result")
    bk, rk = kind_of(baseline), kind_of(result)
    if bk != rk:  # first: a classifier call and a whole translation share nothing to compare
        raise MoscError(f"baseline was measured on a model of kind {bk!r}, result on one of kind {rk!r}: "
                        "not comparable (keep one baseline per model)")
    bm, rm = timing_of(baseline), timing_of(result)
    if bm != rm:
        raise MoscError(f"baseline runs were timed as {bm!r}, result runs as {rm!r} (one translate call since the decode "
                        "loop is compiled): not comparable (re-baseline with --update-baseline --force)")
    bt, rt = baseline.get("target"), result.get("target")
    if bt != rt:
        raise MoscError(f"baseline is for target {bt!r}, result for {rt!r}: not comparable (use the {rt} baseline)")
    ba, ra = (baseline.get("arch") or {}).get("hash"), (result.get("arch") or {}).get("hash")
    if ba != ra:
        raise MoscError(f"baseline is for arch {ba}, result for arch {ra}: not comparable")
    (bh, bc), (rh, rc) = machine(baseline), machine(result)
    if (bh and rh and bh != rh) or (bc and rc and bc != rc):  # another machine's timings are not a baseline
        raise MoscError(f"baseline recorded on {bh} / CPU {bc}, result on {rh} / CPU {rc}: re-baseline on this "
                        "machine with --update-baseline --force")
    be, re_ = baseline.get("environment") or {}, result.get("environment") or {}
    for key, name in (("tvm_version", "TVM"), ("tvm_ffi_version", "tvm-ffi")):
        if be.get(key) != re_.get(key):
            raise MoscError(f"baseline was measured with {name} {be.get(key)}, result with {re_.get(key)}: "
                            "not comparable (re-baseline with --update-baseline --force)")
    bn, rn = be.get("tvm_num_threads"), re_.get("tvm_num_threads")
    if "tvm_num_threads" in be and "tvm_num_threads" in re_ and bn != rn:
        raise MoscError(f"baseline was measured with TVM_NUM_THREADS={bn}, result with {rn}: not comparable")
    bp, rp = baseline.get("protocol") or {}, result.get("protocol") or {}
    diff = [k for k in PROTOCOL_KEYS if bp.get(k) != rp.get(k)]
    if diff:
        d = ", ".join(f"{k} {bp.get(k)} vs {rp.get(k)}" for k in diff)
        raise MoscError(f"baseline and result use different protocols ({d}): not comparable")


# ----------------------------------------------------------------------------- statistics
def statistic(x, metric: str, trim: float) -> np.ndarray | float:
    """p50/p90 of the trimmed runs along the last axis (scalar for 1-D input), trimmed as
    mosc.device.protocol.summarize trims."""
    t = _trimmed(x, trim)
    q = {"p50": 50, "p90": 90}[metric]
    return np.percentile(t, q, axis=-1)


def _boot(x: np.ndarray, metric: str, trim: float, resamples: int, rng: np.random.Generator) -> np.ndarray:
    idx = rng.integers(0, len(x), size=(resamples, len(x)))
    return statistic(x[idx], metric, trim)


def tolerances_of(tolerances: dict | None) -> dict[str, float]:
    """{"p50_tol": .., "p90_tol": ..}: the given ones over DEFAULT_TOLERANCES, each a finite number >= 0.
    Never taken from a result file: a result must not choose how much slowdown it is allowed."""
    tol = {**DEFAULT_TOLERANCES, **{k: v for k, v in (tolerances or {}).items() if v is not None}}
    for k, v in tol.items():
        if k not in DEFAULT_TOLERANCES:
            raise MoscError(f"unknown tolerance {k!r} (known: {', '.join(DEFAULT_TOLERANCES)})")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v < 10:
            raise MoscError(f"tolerance {k} must be a number in [0, 10) (a fraction: 0.05 = 5%), got {v!r}")
    return {k: float(v) for k, v in tol.items()}


def compare(baseline: dict, result: dict, *, tolerances: dict | None = None, resamples: int = RESAMPLES,
            confidence: float = CONFIDENCE, seed: int = SEED, check_compatible: bool = True) -> dict:
    """The check report: per metric baseline, current, ratio, CI, tolerance, U test, verdict.

    tolerances: {"p50_tol", "p90_tol"} from the target file (jobs.measure.check reads it) or the
    command line; missing ones are DEFAULT_TOLERANCES. The result's own `regression` is ignored."""
    from scipy.stats import mannwhitneyu

    if check_compatible:
        compatible(baseline, result)
    else:
        check_result(baseline, "baseline")
        check_result(result, "result")
    if resamples < 100:
        raise MoscError("--resamples must be at least 100")
    if not 0.5 <= confidence < 1:
        raise MoscError("--confidence must be in [0.5, 1)")
    tol = tolerances_of(tolerances)
    trim = float(result["protocol"]["trim"])
    b = np.asarray(baseline["samples_ms"], np.float64)
    c = np.asarray(result["samples_ms"], np.float64)
    rng = np.random.default_rng(seed)
    u = mannwhitneyu(c, b, alternative="greater")
    rows = [_metric_row(metric, b, c, trim, tol[f"{metric}_tol"], resamples, confidence, rng) for metric in METRICS]
    verdicts = {r["verdict"] for r in rows}
    overall = "regression" if "regression" in verdicts else "improved" if "improved" in verdicts else "pass"
    return {
        "format": "mosc-check/1", "verdict": overall, "exit_code": EXIT[overall],
        "target": result.get("target"), "kind": kind_of(result), "arch_hash": (result.get("arch") or {}).get("hash"),
        "metrics": rows,
        "mann_whitney": {"alternative": "current slower than baseline", "U": float(u.statistic),
                         "p_value": float(u.pvalue)},
        "method": {"ci": f"percentile bootstrap of the ratio current/baseline, {resamples} independent resamples "
                         f"of each side, seed {seed}", "confidence": confidence, "trim": trim,
                   "rule": "regression if CI low > 1 + tol; improved if CI high < 1 - tol; else pass"},
        "runs": {"baseline": int(b.size), "current": int(c.size)},
        "artifact_sha256": {"baseline": (baseline.get("artifact") or {}).get("sha256"),
                            "current": (result.get("artifact") or {}).get("sha256")},
    }


def _metric_row(metric: str, b: np.ndarray, c: np.ndarray, trim: float, tol: float, resamples: int,
                confidence: float, rng: np.random.Generator) -> dict:
    """One metric of the report: the statistic of both sides, the bootstrap CI of their ratio, the verdict."""
    a = (1 - confidence) / 2
    bs, cs = float(statistic(b, metric, trim)), float(statistic(c, metric, trim))
    ratios = _boot(c, metric, trim, resamples, rng) / _boot(b, metric, trim, resamples, rng)
    lo, hi = (float(v) for v in np.quantile(ratios, [a, 1 - a]))
    verdict = "regression" if lo > 1 + tol else "improved" if hi < 1 - tol else "pass"
    return {"metric": metric, "baseline_ms": bs, "current_ms": cs, "ratio": cs / bs,
            "ci_low": lo, "ci_high": hi, "tolerance": tol, "verdict": verdict}


# ----------------------------------------------------------------------------- CI outputs
def junit_xml(report: dict) -> str:
    """JUnit XML: one testsuite, one testcase per metric, a <failure> per regression."""
    import xml.etree.ElementTree as ET

    rows = report["metrics"]
    fails = sum(r["verdict"] == "regression" for r in rows)
    suite = ET.Element("testsuite", name=f"mosc latency {report['target']}", tests=str(len(rows)),
                       failures=str(fails), errors="0", skipped="0")
    props = ET.SubElement(suite, "properties")
    for k, v in (("target", report["target"]), ("kind", report.get("kind", TRANSLATION)),
                 ("arch_hash", report["arch_hash"]), ("verdict", report["verdict"]),
                 ("mann_whitney_p", f"{report['mann_whitney']['p_value']:.4g}")):
        ET.SubElement(props, "property", name=k, value=str(v))
    for r in rows:
        case = ET.SubElement(suite, "testcase", classname=f"latency.{report['target']}.{report['arch_hash']}",
                             name=r["metric"], time="0")
        text = (f"{r['metric']}: baseline {r['baseline_ms']:.4f} ms, current {r['current_ms']:.4f} ms, "
                f"ratio {r['ratio']:.4f}, {report['method']['confidence']:.0%} CI [{r['ci_low']:.4f}, "
                f"{r['ci_high']:.4f}], tolerance +{r['tolerance']:.0%}: {r['verdict']}")
        if r["verdict"] == "regression":
            ET.SubElement(case, "failure", message=f"latency regression: {text}", type="LatencyRegression").text = text
        else:
            ET.SubElement(case, "system-out").text = text
    root = ET.Element("testsuites", name="mosc check", tests=str(len(rows)), failures=str(fails))
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"

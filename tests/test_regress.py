"""Latency-regression checks: `mosc bench` results, `mosc check` statistics and verdicts,
refusals, exit codes, JUnit XML, --update-baseline.

One tiny artifact (space tiny, smallest arch, source 8 tokens, 4 decoder steps, --no-tune) is
built once for the module into a private cache; measurements are real. A slowdown is injected
with a test double of the *timer only* (one real measurement replayed, its samples scaled); the
statistics are real.
"""

import copy
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from rpc_helpers import REPO, host_test_env

from mosc.errors import MoscError

PROTOCOL = {"source_len": 8, "decoder_steps": 4, "batch": 1, "warmup": 2, "repeats": 150, "trim": 0.1}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    work = tmp_path_factory.mktemp("regress")
    return {**host_test_env(work, PROTOCOL), "work": str(work)}


@pytest.fixture(scope="module")
def built(env):
    """(target, arch, artifact dir), built once."""
    os.environ.update({k: env[k] for k in ("MOSC_TARGETS_DIR", "MOSC_ARTIFACT_CACHE")})
    try:
        from mosc.jobs.artifacts import ArtifactCache, ModelSource
        from mosc.space import SearchSpace
        from mosc.compiler.targets import load_target

        tg = load_target("host")
        arch = SearchSpace.load("tiny").smallest()
        art, _ = ArtifactCache(tg, ModelSource(), tune=False, tune_db=Path(env["MOSC_TUNE_DIR"]),
                               log=lambda m: None).artifact(arch)
        return SimpleNamespace(target=tg, arch=arch, art=art)
    finally:
        for k in ("MOSC_TARGETS_DIR", "MOSC_ARTIFACT_CACHE"):
            os.environ.pop(k, None)


@pytest.fixture(scope="module")
def baseline(built):
    from mosc.regress import bench

    return bench(built.target, built.art, built.arch)


def recording_timer(into):
    """The real timer (measure_tvm), each Measurement it returns also appended to `into`."""
    from mosc.device.backends import measure_tvm

    def measure(art, protocol):
        m = measure_tvm(art, protocol)
        into.append(m)
        return m

    return measure


def replayed_timer(m, factor):
    """A test double of the timer only: no new timing, the recorded Measurement m with every
    sample scaled by factor (the rest of bench -- loading the artifact, shape checks, result -- is real)."""
    from mosc.device.protocol import Measurement

    def measure(art, protocol):
        return Measurement([x * factor for x in m.total_ms], [x * factor for x in m.encoder_ms],
                           [x * factor for x in m.decoder_ms], m.warmup, m.trim, m.shapes, m.method + " (scaled)",
                           protocol=m.protocol, kernel_ms=[x * factor for x in m.kernel_ms])

    return measure


def inproc(env, *args):
    from typer.testing import CliRunner

    from mosc.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args], env={k: v for k, v in env.items() if k != "work"})
    if r.exception and not isinstance(r.exception, SystemExit):
        raise r.exception
    return SimpleNamespace(returncode=r.exit_code, stdout=r.stdout, stderr=r.stderr)


def write(path, obj):
    Path(path).write_text(json.dumps(obj))
    return path


# ----------------------------------------------------------------------------- pure parts
def test_module_does_not_import_torch_or_tvm():
    code = "import sys, mosc.regress; print(sorted(m for m in ('torch', 'tvm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def test_statistic_matches_summarize():
    from mosc.device.protocol import summarize
    from mosc.regress import statistic

    x = np.random.default_rng(0).lognormal(1, 0.2, 97)
    s = summarize(x, 0.1)
    assert statistic(x, "p50", 0.1) == pytest.approx(s["median_ms"])
    assert statistic(x, "p90", 0.1) == pytest.approx(s["p90_ms"])


def test_environment_fields():
    from mosc.regress import environment

    e = environment()
    for k in ("tvm_version", "tvm_ffi_version", "cpu_model", "governor", "hostname", "machine", "system",
              "release", "python", "cpus", "tvm_num_threads"):
        assert k in e
    assert e["tvm_version"] and e["hostname"]


# ----------------------------------------------------------------------------- bench + compare
def test_bench_result_records_everything(built, baseline):
    r = baseline
    assert r["format"] == "mosc-bench/1" and r["target"] == "host"
    assert len(r["samples_ms"]) == PROTOCOL["repeats"] and all(x > 0 for x in r["samples_ms"])
    assert r["protocol"] == PROTOCOL and r["regression"] == {"p50_tol": 0.05, "p90_tol": 0.10}
    assert r["arch"]["hash"] == built.arch.hash and json.loads(r["arch"]["json"]) == json.loads(built.arch.to_json())
    from mosc.fileio import sha256_file

    assert r["artifact"]["sha256"] == sha256_file(built.art / "manifest.json")
    assert r["environment"]["tvm_version"] and r["environment"]["tvm_ffi_version"]
    assert r["stats"]["median_ms"] > 0 and r["device"]["where"] == "local"
    assert r["timing"] == "translate-call/1" and len(r["kernel_ms"]) == PROTOCOL["repeats"]


def test_aa_resampled_noise_does_not_flag(baseline):
    """A/A from the real samples: two interleaved halves of one measurement."""
    from mosc.regress import compare

    a, b = copy.deepcopy(baseline), copy.deepcopy(baseline)
    a["samples_ms"], b["samples_ms"] = baseline["samples_ms"][0::2], baseline["samples_ms"][1::2]
    rep = compare(a, b)
    assert rep["verdict"] == "pass" and rep["exit_code"] == 0
    for row in rep["metrics"]:
        assert row["ci_low"] <= row["ratio"] <= row["ci_high"]
    assert compare(a, b) == rep  # seeded: same inputs, same report


def test_aa_measured_twice_does_not_flag_regression(built, baseline):
    """Two real measurements of one artifact. On a shared 2-core CI machine load changes between
    them (benchmarks/regression_power.py measures that: up to 10% false alarms under contention),
    so the check here uses a 25% tolerance: it tests the real path end to end, not the machine."""
    from mosc.regress import bench, compare

    # A translation of this model is ~0.2 ms (one compiled call): a burst of load on the shared
    # machine moves a whole measurement by 40% (seen in CI). A real regression fails every try;
    # a burst seldom lasts through three fresh measurements.
    for _ in range(3):
        again = bench(built.target, built.art, built.arch)
        rep = compare(baseline, again, tolerances={"p50_tol": 0.25, "p90_tol": 0.25})
        if rep["verdict"] != "regression":
            break
    assert rep["verdict"] != "regression", rep["metrics"]


def test_injected_slowdown_is_flagged(built):
    """One real measurement, then the same runs replayed through bench 1.3x slower: the check must
    flag that, deterministically. Baseline and slowed result share their runs, so machine load
    between two live timings (test_aa_measured_twice_... covers that path) cannot hide the slowdown."""
    from mosc.regress import bench, compare

    runs = []
    real = bench(built.target, built.art, built.arch, measure=recording_timer(runs))  # the one live timing
    (m,) = runs
    slow = bench(built.target, built.art, built.arch, measure=replayed_timer(m, 1.3))
    assert slow["samples_ms"] == pytest.approx([x * 1.3 for x in real["samples_ms"]], rel=1e-6, abs=1e-5)
    assert slow["method"].endswith("(scaled)") and slow["stats"]["median_ms"] > real["stats"]["median_ms"]
    rep = compare(real, slow)
    assert rep["verdict"] == "regression" and rep["exit_code"] == 1, rep["metrics"]
    p50 = rep["metrics"][0]
    assert p50["metric"] == "p50" and p50["verdict"] == "regression" and p50["ci_low"] > 1.05
    assert p50["ratio"] == pytest.approx(1.3, rel=1e-4)
    assert rep["mann_whitney"]["p_value"] < 0.01
    assert compare(real, slow) == rep  # seeded: the same runs give the same verdict every time
    same = compare(real, copy.deepcopy(real))  # the unscaled runs: no regression
    assert same["verdict"] == "pass" and same["exit_code"] == 0, same["metrics"]
    fast = copy.deepcopy(real)
    fast["samples_ms"] = [x * 0.7 for x in real["samples_ms"]]
    assert compare(real, fast)["verdict"] == "improved"


@pytest.mark.parametrize("change, needle", [
    (lambda r: r.update(target="rpi4"), "target"),
    (lambda r: r["arch"].update(hash="0123456789abcdef"), "arch"),
    (lambda r: r["environment"].update(tvm_version="0.0.1"), "TVM"),
    (lambda r: r["environment"].update(tvm_ffi_version="0.0.1"), "tvm-ffi"),
    (lambda r: r["protocol"].update(decoder_steps=30), "protocol"),
    (lambda r: r["environment"].update(tvm_num_threads="7"), "TVM_NUM_THREADS"),
    (lambda r: r.pop("timing"), "result runs as 'graph-calls/1'"),  # a result from before the compiled loop
])
def test_mismatches_are_refused(baseline, change, needle):
    from mosc.regress import compare

    other = copy.deepcopy(baseline)
    change(other)
    with pytest.raises(MoscError, match=needle):
        compare(baseline, other)
    more = copy.deepcopy(baseline)
    more["protocol"]["repeats"] = 10  # a different number of runs is fine
    compare(baseline, more)


# ----------------------------------------------------------------------------- CLI
def test_cli_exit_codes_json_and_junit(env, baseline, tmp_path):
    base = write(tmp_path / "base.json", baseline)
    same = copy.deepcopy(baseline)
    same["samples_ms"] = baseline["samples_ms"][::-1]
    slow = copy.deepcopy(baseline)
    slow["samples_ms"] = [x * 1.3 for x in baseline["samples_ms"]]
    ok = inproc(env, "check", "--baseline", base, "--result", write(tmp_path / "same.json", same),
                "--junit", tmp_path / "ok.xml", "--json-out", tmp_path / "ok.json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "verdict: pass" in ok.stdout and "95% CI" in ok.stdout
    root = ET.parse(tmp_path / "ok.xml").getroot()
    assert root.tag == "testsuites" and len(root.findall(".//testcase")) == 2 and not root.findall(".//failure")
    assert json.loads((tmp_path / "ok.json").read_text())["verdict"] == "pass"

    bad = inproc(env, "check", "--baseline", base, "--result", write(tmp_path / "slow.json", slow),
                 "--junit", tmp_path / "bad.xml", "--json-out", tmp_path / "bad.json")
    assert bad.returncode == 1 and "regression" in bad.stdout
    root = ET.parse(tmp_path / "bad.xml").getroot()
    cases = {c.get("name"): c for c in root.iter("testcase")}
    assert set(cases) == {"p50", "p90"} and cases["p50"].find("failure") is not None
    assert root.find("testsuite").get("failures") == str(len(root.findall(".//failure")))
    assert json.loads((tmp_path / "bad.json").read_text())["exit_code"] == 1

    other = copy.deepcopy(baseline)
    other["target"] = "rpi4"
    mism = inproc(env, "check", "--baseline", base, "--result", write(tmp_path / "o.json", other))
    assert mism.returncode == 2
    errs = [l for l in mism.stderr.splitlines() if l.strip()]
    assert len(errs) == 1 and errs[0].startswith("error:") and "target" in errs[0]
    missing = inproc(env, "check", "--baseline", tmp_path / "nope.json", "--result", tmp_path / "same.json")
    assert missing.returncode == 2 and "cannot read baseline" in missing.stderr
    junk = inproc(env, "check", "--baseline", base, "--result", write(tmp_path / "j.json", {"format": "x"}))
    assert junk.returncode == 2 and "not a mosc bench result" in junk.stderr


def test_update_baseline(env, baseline, tmp_path):
    base = write(tmp_path / "base.json", baseline)
    before = base.read_text()
    slow = copy.deepcopy(baseline)
    slow["samples_ms"] = [x * 1.3 for x in baseline["samples_ms"]]
    r = inproc(env, "check", "--baseline", base, "--result", write(tmp_path / "slow.json", slow), "--update-baseline")
    assert r.returncode == 1 and base.read_text() == before and "not updated" in r.stdout
    r = inproc(env, "check", "--baseline", base, "--result", tmp_path / "slow.json", "--update-baseline", "--force")
    assert r.returncode == 1 and json.loads(base.read_text())["samples_ms"] == slow["samples_ms"]
    same = copy.deepcopy(slow)
    same["samples_ms"] = slow["samples_ms"][::-1]
    r = inproc(env, "check", "--baseline", base, "--result", write(tmp_path / "same.json", same), "--update-baseline")
    assert r.returncode == 0 and json.loads(base.read_text())["samples_ms"] == same["samples_ms"]
    # not comparable: refused, unless forced
    other = copy.deepcopy(baseline)
    other["environment"]["tvm_version"] = "9.9"
    r = inproc(env, "check", "--baseline", base, "--result", write(tmp_path / "o.json", other), "--update-baseline")
    assert r.returncode == 2 and json.loads(base.read_text())["samples_ms"] == same["samples_ms"]
    r = inproc(env, "check", "--baseline", base, "--result", tmp_path / "o.json", "--update-baseline", "--force")
    assert r.returncode == 0 and json.loads(base.read_text())["environment"]["tvm_version"] == "9.9"
    # a new baseline is created when there is none
    fresh = tmp_path / "sub" / "new.json"
    r = inproc(env, "check", "--baseline", fresh, "--result", tmp_path / "same.json", "--update-baseline")
    assert r.returncode == 0 and json.loads(fresh.read_text())["samples_ms"] == same["samples_ms"]
    assert not [p for p in tmp_path.rglob(".*.tmp")]  # atomic writes leave no temp files


def test_update_baseline_write_is_atomic(env, baseline, tmp_path, monkeypatch):
    """A crash while replacing leaves the old baseline intact."""
    base = write(tmp_path / "base.json", baseline)
    before = base.read_text()
    same = copy.deepcopy(baseline)
    same["samples_ms"] = baseline["samples_ms"][::-1]
    write(tmp_path / "same.json", same)

    def boom(*a):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        inproc(env, "check", "--baseline", base, "--result", tmp_path / "same.json", "--update-baseline")
    assert base.read_text() == before and not list(tmp_path.glob(".*.tmp"))


def test_cli_bench_then_check_in_one_call(env, built, tmp_path):
    out = tmp_path / "r.json"
    r = inproc(env, "bench", "--target", "host", "--artifact", built.art, "--out", out, "--repeats", "80")
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    assert len(res["samples_ms"]) == 80 and res["arch"]["hash"] == built.arch.hash
    r = inproc(env, "check", "--baseline", out, "--artifact", built.art, "--repeats", "80", "--junit", tmp_path / "j.xml")
    assert r.returncode in (0, 1) and "latency check" in r.stdout  # a real A/A: pass expected, noise may vary
    ET.parse(tmp_path / "j.xml")
    wrong = inproc(env, "bench", "--target", "rpi4", "--artifact", built.art, "--out", tmp_path / "x.json")
    assert wrong.returncode == 2 and "rpi4" in wrong.stderr
    none = inproc(env, "bench", "--target", "host", "--out", tmp_path / "x.json")
    assert none.returncode == 2 and "--artifact" in none.stderr


# ----------------------------------------------------------------------------- what a check may trust
@pytest.mark.parametrize("change, needle", [
    (lambda r: r.update(protocol="30 tokens"), "'protocol' must be a object, not string"),
    (lambda r: r["protocol"].pop("trim"), "protocol: missing 'trim'"),
    (lambda r: r["protocol"].update(warmup="5"), "'warmup' must be a number, not string"),
    (lambda r: r.update(arch=["fc12"]), "'arch' must be a object, not array"),
    (lambda r: r.update(environment="x86"), "'environment' must be a object, not string"),
    (lambda r: r["environment"].update(tvm_version=27), "'tvm_version' must be a string, not number"),
    (lambda r: r.update(samples_ms={"a": 1}), "'samples_ms' must be a array, not object"),
    (lambda r: r.update(samples_ms=[1.0, True]), "no usable samples_ms"),
    (lambda r: r.update(device="local"), "'device' must be a object, not string"),
])
def test_result_structure_is_checked_before_use(env, baseline, tmp_path, change, needle):
    from mosc.regress import compare, load_result

    bad = copy.deepcopy(baseline)
    change(bad)
    path = write(tmp_path / "bad.json", bad)
    with pytest.raises(MoscError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_result(path)
    with pytest.raises(MoscError, match="result"):
        compare(baseline, bad)
    base = write(tmp_path / "base.json", baseline)
    for args in (["--baseline", base, "--result", path], ["--baseline", path, "--result", base]):
        r = inproc(env, "check", *args)
        assert r.returncode == 2, r.stdout + r.stderr
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.stderr


def test_tolerance_comes_from_the_target_file_not_the_result(env, baseline, tmp_path):
    from mosc.jobs.measure import check

    slow = copy.deepcopy(baseline)
    slow["samples_ms"] = [x * 1.2 for x in baseline["samples_ms"]]
    slow["regression"] = {"p50_tol": 10, "p90_tol": 10}  # a result that would let itself off
    base = write(tmp_path / "base.json", baseline)
    r = inproc(env, "check", "--baseline", base, "--result", write(tmp_path / "slow.json", slow),
               "--json-out", tmp_path / "rep.json")
    assert r.returncode == 1 and "regression" in r.stdout, r.stdout + r.stderr
    rep = json.loads((tmp_path / "rep.json").read_text())
    assert [m["tolerance"] for m in rep["metrics"]] == [0.05, 0.10]  # targets/host.toml [regression]
    assert rep["method"]["tolerances"] == "target file 'host'"
    # explicit tolerances (the command line's) win; a partial set takes the rest from the target
    os.environ["MOSC_TARGETS_DIR"] = env["MOSC_TARGETS_DIR"]
    try:
        c = check(tmp_path / "base.json", baseline, slow, tolerances={"p50_tol": 0.5, "p90_tol": 0.5})
        assert c.exit_code == 0 and c.report["method"]["tolerances"] == "command line"
        c = check(tmp_path / "base.json", baseline, slow, tolerances={"p50_tol": 0.5, "p90_tol": None})
        assert [m["tolerance"] for m in c.report["metrics"]] == [0.5, 0.10]
        with pytest.raises(MoscError, match="tolerance p50_tol must be a number"):
            check(tmp_path / "base.json", baseline, slow, tolerances={"p50_tol": float("nan")})
    finally:
        os.environ.pop("MOSC_TARGETS_DIR")


def test_target_given_must_be_the_result_and_baseline_target(baseline, tmp_path):
    from mosc.jobs.measure import check

    with pytest.raises(MoscError, match="--target rpi4: the result is for target 'host', not 'rpi4'"):
        check(tmp_path / "b.json", baseline, baseline, target="rpi4")
    other = copy.deepcopy(baseline)
    other["target"] = "rpi4"
    with pytest.raises(MoscError, match="--target rpi4: the baseline is for target 'host'"):
        check(tmp_path / "b.json", baseline, other, target="rpi4")
    assert not (tmp_path / "b.json").exists()


@pytest.mark.parametrize("change", [
    lambda r: r["environment"].update(hostname="ci-runner-7"),
    lambda r: r["environment"].update(cpu_model="Intel(R) Xeon(R) Gold 6230"),
    lambda r: r.update(device={"where": "rpc rpi4@127.0.0.1:9190", "hostname": "pi-2", "machine": "aarch64"}),
])
def test_a_result_from_another_machine_is_refused_not_a_regression(env, baseline, tmp_path, change):
    from mosc.regress import compare, machine

    other = copy.deepcopy(baseline)
    other["samples_ms"] = [x * 2 for x in baseline["samples_ms"]]  # slower: another machine
    change(other)
    if other["device"]["where"] != "local":
        baseline = copy.deepcopy(baseline)
        baseline["device"] = {**other["device"], "hostname": "pi-1"}
    (bh, bc), (rh, rc) = machine(baseline), machine(other)
    expected = (f"baseline recorded on {bh} / CPU {bc}, result on {rh} / CPU {rc}: re-baseline on this machine "
                "with --update-baseline --force")
    with pytest.raises(MoscError) as e:
        compare(baseline, other)
    assert str(e.value) == expected
    base = write(tmp_path / "base.json", baseline)
    r = inproc(env, "check", "--baseline", base, "--result", write(tmp_path / "o.json", other))
    assert r.returncode == 2 and r.stderr.strip() == f"error: {expected}" and "regression" not in r.stdout
    r = inproc(env, "check", "--baseline", base, "--result", tmp_path / "o.json", "--update-baseline", "--force")
    assert r.returncode == 0 and json.loads(base.read_text())["samples_ms"] == other["samples_ms"]


def test_committed_ci_baseline_is_a_valid_result():
    from mosc.regress import load_result, machine

    (path,) = (REPO / "examples/ci/baselines").glob("*.json")
    r = load_result(path, "baseline")
    host, cpu = machine(r)
    assert host and cpu and r["target"] == "host"


def test_check_table_is_readable_at_80_columns(tmp_path):
    """A CI log without a terminal is 80 columns: the verdict column must not be cut."""
    import json
    import os
    import subprocess
    import sys

    base = Path(__file__).resolve().parents[1] / "examples/ci/baselines/host-fc12a1ac56bf6404-vm-amd-epyc.json"
    r = json.loads(base.read_text())
    r["samples_ms"] = [x * 1.10 for x in r["samples_ms"]]
    (tmp_path / "slow.json").write_text(json.dumps(r))
    p = subprocess.run([sys.executable, "-c", "from mosc.cli import app; app()", "check", "--baseline", str(base),
                        "--result", str(tmp_path / "slow.json")], capture_output=True, text=True,
                       env={**os.environ, "COLUMNS": "80"})
    assert p.returncode == 1, p.stdout + p.stderr
    assert "…" not in p.stdout and "regression" in p.stdout.split("Mann-Whitney")[0], p.stdout
    assert max(len(line) for line in p.stdout.splitlines()) <= 80

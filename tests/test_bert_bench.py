"""`mosc bench` / `mosc check` on an encoder-classifier artifact: one run = one call of the
classifier graph, timed with the target's [protocol] on the device clock, into the same result
JSON, statistics, verdict and JUnit as a translation model. Refusals: the other model kind,
another sequence length than the protocol's, a tampered or broken artifact.

One tiny bert-tiny classifier (sequence 16, batch 1, --no-tune) is built once for the module;
a `host` target with a short protocol (sequence 16) lives in a private targets folder.
Measurements are real (TVM on this machine, and once over a real RPC tracker + server).
"""

import json
import random
import shutil
import xml.etree.ElementTree as ET

import pytest
from typer.testing import CliRunner

from rpc_helpers import REPO, host_test_env, rpc_device

T = 16
PROTOCOL = {"source_len": T, "batch": 1, "warmup": 2, "repeats": 60, "trim": 0.1}  # decoder_steps stays 30
# A real A/A on a shared 2-core machine moves by tens of percent (a 1-2 ms classifier call is
# at the mercy of the other processes): the checks that measure now allow 2x, which still
# makes a 10x-faster baseline a regression beyond doubt.
LOOSE = ["--p50-tol", "1.0", "--p90-tol", "1.0"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    work = tmp_path_factory.mktemp("bert-bench")
    return host_test_env(work, PROTOCOL)


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    import torch

    from mosc.bert_space import BertSpace
    from mosc.compiler.targets import load_target
    from mosc.jobs.build import compile_export
    from mosc.nn.bert import BertConfig, BertSupernet, collapse_bert
    from mosc.nn.bert_export import ClassifierShapes, export_classifier

    work = tmp_path_factory.mktemp("bert-bench-art")
    torch.manual_seed(0)
    s = BertSpace.load("bert-tiny")
    sup = BertSupernet(BertConfig(space=s.to_dict(), vocab_size=500)).eval()
    enc = collapse_bert(sup, s.sample(random.Random(0))).with_classifier(2).eval()
    export_classifier(enc, work / "onnx", ClassifierShapes(batch=1, seq_len=T), check=False)
    # an empty tuning database: a --no-tune build touches no ~/.cache
    return compile_export(work / "onnx", load_target("host"), work / "art", tune=False, tune_db=work / "db").path


def mosc(env, *args):
    from mosc.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args], env=env)
    if r.exception and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r


def one_line_error(r, needle: str):
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def base(env, art, tmp_path_factory):
    """A real bench of the classifier through the CLI: the result file."""
    out = tmp_path_factory.mktemp("bert-bench-base") / "base.json"
    r = mosc(env, "bench", "-t", "host", "--artifact", art, "-o", out)
    assert r.exit_code == 0, r.output
    assert "(encoder-classifier)" in r.output and "one classifier call each" in r.output
    return out


def test_bench_result_of_a_classifier(base, art):
    from mosc.fileio import sha256_file
    from mosc.regress import load_result

    r = load_result(base)
    assert r["kind"] == "encoder-classifier" and r["target"] == "host"
    # the protocol actually run: the sequence length is source_len, no decoder steps
    assert r["protocol"] == {**PROTOCOL, "decoder_steps": 0}
    n = PROTOCOL["repeats"]
    assert len(r["samples_ms"]) == n and all(0 < x < 1000 for x in r["samples_ms"])
    assert r["encoder_ms"] == r["samples_ms"] and r["decoder_ms"] == [0.0] * n  # one graph: the encoder is all
    assert "device clock" in r["method"] and "one run = one classifier call" in r["method"]
    model = json.loads((art / "manifest.json").read_text())["model"]
    assert r["arch"]["hash"] == model["arch_hash"] and r["artifact"]["sha256"] == sha256_file(art / "manifest.json")
    assert r["stats"]["median_ms"] > 0 and r["device"]["where"] == "local"


def test_check_passes_and_a_10x_faster_baseline_is_a_regression(env, art, base, tmp_path):
    r = mosc(env, "check", "-b", base, "--artifact", art, *LOOSE, "--junit", tmp_path / "ok.xml",
             "--json-out", tmp_path / "ok.json")
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "ok.json").read_text())
    assert rep["verdict"] != "regression" and rep["kind"] == "encoder-classifier"
    assert not ET.parse(tmp_path / "ok.xml").getroot().findall(".//failure")

    fast = json.loads(base.read_text())
    fast["samples_ms"] = [x / 10 for x in fast["samples_ms"]]
    (tmp_path / "fast.json").write_text(json.dumps(fast))
    r = mosc(env, "check", "-b", tmp_path / "fast.json", "--artifact", art, *LOOSE, "--junit", tmp_path / "bad.xml")
    assert r.exit_code == 1, r.output  # the translation path's regression exit code
    assert "verdict: regression" in r.output
    root = ET.parse(tmp_path / "bad.xml").getroot()
    # p50 only: a p90 measured now is a tail, which load on this machine can move by more than 5x
    assert "p50" in {c.get("name") for c in root.iter("testcase") if c.find("failure") is not None}
    # the same from a result file, with the target file's tolerances: exactly 10x, both metrics
    r = mosc(env, "check", "-b", tmp_path / "fast.json", "-r", base, "--junit", tmp_path / "bad2.xml")
    assert r.exit_code == 1, r.output
    root = ET.parse(tmp_path / "bad2.xml").getroot()
    assert {c.get("name") for c in root.iter("testcase") if c.find("failure") is not None} == {"p50", "p90"}
    props = {p.get("name"): p.get("value") for p in root.iter("property")}
    assert props["kind"] == "encoder-classifier"


def test_translation_and_classifier_results_are_not_compared(env, base):
    (translation,) = (REPO / "examples/ci/baselines").glob("*.json")  # a committed translation baseline
    assert "kind" not in json.loads(translation.read_text())  # written before kinds: read as translation
    for b, r, kinds in ((translation, base, "'translation', result on one of kind 'encoder-classifier'"),
                        (base, translation, "'encoder-classifier', result on one of kind 'translation'")):
        one_line_error(mosc(env, "check", "-b", b, "-r", r), f"baseline was measured on a model of kind {kinds}")


def test_result_kind_is_checked(env, base, tmp_path):
    bad = json.loads(base.read_text())
    bad["kind"] = "speech"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    one_line_error(mosc(env, "check", "-b", base, "-r", tmp_path / "bad.json"), "'kind' must be one of")


def test_tampered_library_is_refused(env, art, base, tmp_path):
    bad = tmp_path / "art"
    shutil.copytree(art, bad)
    with open(bad / "model.so", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    one_line_error(mosc(env, "bench", "-t", "host", "--artifact", bad, "-o", tmp_path / "x.json"), "sha256")
    one_line_error(mosc(env, "check", "-b", base, "--artifact", bad), "sha256")
    assert not (tmp_path / "x.json").exists()


def test_broken_artifacts_and_translate_are_one_line(env, art, tmp_path):
    gone = tmp_path / "gone"
    shutil.copytree(art, gone)
    (gone / "model.so").unlink()
    junk = tmp_path / "junk"
    shutil.copytree(art, junk)
    (junk / "manifest.json").write_text('{"format": ')
    (tmp_path / "empty").mkdir()
    for d, needle in ((gone, "model.so is missing"), (junk, "not valid JSON"),
                      (tmp_path / "empty", "not a mosc artifact")):
        one_line_error(mosc(env, "bench", "-t", "host", "--artifact", d, "-o", tmp_path / "x.json"), needle)
    # a classifier is not a translation model: one line whatever jobs.translate checks first
    one_line_error(mosc(env, "translate", "--artifact", art, "--text", "hello"), str(art))


def test_another_sequence_length_than_the_protocol_is_refused(art, tmp_path):
    env30 = host_test_env(tmp_path, {**PROTOCOL, "source_len": 30, "repeats": 2})
    one_line_error(mosc(env30, "bench", "-t", "host", "--artifact", art, "-o", tmp_path / "x.json"),
                   "re-export it with --source-len 30 --batch 1")


def test_bench_over_rpc_is_the_same_measurement(env, art, base, tmp_path):
    """Through a real tracker and server on 127.0.0.1: the artifact is uploaded and timed on the
    device's clock, as a translation artifact is; the result names the device."""
    with rpc_device("bert-dev") as (port, _):
        r = mosc(env, "bench", "-t", "host", "--artifact", art, "-o", tmp_path / "rpc.json", "--repeats", "10",
                 "--tracker", f"127.0.0.1:{port}", "--key", "bert-dev")
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "rpc.json").read_text())
    assert res["kind"] == "encoder-classifier" and len(res["samples_ms"]) == 10
    assert res["device"]["where"] == f"rpc bert-dev@127.0.0.1:{port}" and res["device"]["machine"]
    loc = json.loads(base.read_text())
    assert res["protocol"] == {**loc["protocol"], "repeats": 10}  # comparable with the local result's protocol

"""Deploying a BERT encoder with a classifier head: export (ONNX, checked against torch), compile
with TVM for host (same artifact and default schedules as translation models), run (TVM == ORT),
latency side by side, and the CLI on a saved encoder folder. Real torch, onnxruntime and TVM on
a tiny bert-tiny encoder (sequence length 16); the module's export and build are shared."""

import json
import random

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mosc.bert_space import BertSpace
from mosc.cli import app
from mosc.errors import MoscError
from mosc.nn.bert import BertConfig, BertSupernet, collapse_bert, save_bert_encoder

T, V, C = 16, 500, 3
runner = CliRunner(env={"COLUMNS": "200"})


def _encoder(n_classes=C, seed=0):
    torch.manual_seed(seed)
    s = BertSpace.load("bert-tiny")
    sup = BertSupernet(BertConfig(space=s.to_dict(), vocab_size=V)).eval()
    enc = collapse_bert(sup, s.sample(random.Random(seed)))
    return enc.with_classifier(n_classes).eval() if n_classes else enc


def _tokens(batch, seed):
    """<s> first, random ids, row 0 padded from position 5 on (pad id 0)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, V, (batch, T)).astype(np.int64)
    tokens[:, 0] = 1
    tokens[0, 5:] = 0
    return tokens


@pytest.fixture(scope="module")
def enc():
    return _encoder()


@pytest.fixture(scope="module")
def export_dir(enc, tmp_path_factory):
    from mosc.nn.bert_export import ClassifierShapes, export_classifier

    out = tmp_path_factory.mktemp("bert") / "onnx"
    export_classifier(enc, out, ClassifierShapes(batch=2, seq_len=T))
    return out


@pytest.fixture(scope="module")
def artifact(export_dir, tmp_path_factory):
    from mosc.compiler.targets import load_target
    from mosc.jobs.build import compile_export

    work = tmp_path_factory.mktemp("bert-art")  # an empty database: a --no-tune build touches no ~/.cache
    return compile_export(export_dir, load_target("host"), work / "art", tune=False, tune_db=work / "db")


def test_export_is_one_classifier_graph_equal_to_torch(enc, export_dir):
    from mosc.contract import CLASSIFIER, ENCODER_CLASSIFIER, export_kind, load_export
    from mosc.runtime import ort_classifier

    meta = load_export(export_dir, ENCODER_CLASSIFIER)
    assert export_kind(meta) == ENCODER_CLASSIFIER and list(meta["graphs"]) == [CLASSIFIER]
    g = meta["graphs"][CLASSIFIER]
    assert g["inputs"] == [{"name": "tokens", "shape": [2, T], "dtype": "int64"}]
    assert g["outputs"] == [{"name": "logits", "shape": [2, C], "dtype": "float32"}]
    assert meta["parity"]["classifier_max_abs_diff"] <= 1e-4 and meta["parity"]["argmax_equal"]
    tokens = _tokens(2, seed=7)  # fresh input with a padded row
    with torch.no_grad():
        ref = enc.classify(torch.from_numpy(tokens)).numpy()
    got = ort_classifier(export_dir).run(tokens)
    assert np.abs(ref - got).max() <= 1e-4


def test_translation_readers_refuse_a_classifier_export(export_dir):
    from mosc.contract import TRANSLATION, load_export
    from mosc.runtime import ort_backend

    with pytest.raises(MoscError, match="kind 'encoder-classifier', not 'translation'"):
        load_export(export_dir, TRANSLATION)
    with pytest.raises(MoscError, match="encoder-classifier"):
        ort_backend(export_dir, load_export(export_dir))


def test_encoder_without_head_is_one_line(tmp_path):
    from mosc.nn.bert_export import export_classifier

    with pytest.raises(MoscError, match="no classifier head"):
        export_classifier(_encoder(n_classes=0), tmp_path / "x")


def test_compiled_artifact_runs_like_onnxruntime(artifact, export_dir):
    from mosc.compiler.artifact import load_artifact, schedule_coverage, verify_artifact
    from mosc.runtime import artifact_classifier, ort_classifier

    m = verify_artifact(artifact.path)  # sha256 of model.so checked
    assert list(m["graphs"]) == ["classifier"] and m["model"]["kind"] == "encoder-classifier"
    assert m["model"]["n_classes"] == C and m["model"]["onnx_sha256"] == json.loads(
        (export_dir / "export.json").read_text())["files"]
    cov = schedule_coverage(m)
    assert cov["functions"] > 0 and cov["naive"] == 0 and cov["default_scheduled"] == cov["functions"]
    tvm_clf = artifact_classifier(load_artifact(artifact.path))
    ort_clf = ort_classifier(export_dir)
    for seed in (1, 2):
        tokens = _tokens(2, seed)
        assert np.abs(tvm_clf.run(tokens) - ort_clf.run(tokens)).max() <= 1e-4


@pytest.mark.parametrize("target, machine", [("xeon", 62), ("rpi4", 183)])  # ELF e_machine: x86-64, aarch64
def test_other_targets_build_on_the_same_path(export_dir, tmp_path, target, machine):
    import shutil

    from mosc.compiler.artifact import schedule_coverage
    from mosc.compiler.targets import load_target
    from mosc.jobs.build import compile_export

    tg = load_target(target)
    if tg.cross_compiler and not shutil.which(tg.cross_compiler):
        pytest.skip(f"{tg.cross_compiler} not installed (apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu)")
    c = compile_export(export_dir, tg, tmp_path / "art", tune=False, tune_db=tmp_path / "db")
    head = (c.path / "model.so").read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == machine
    assert c.manifest["target"] == target and schedule_coverage(c.manifest)["naive"] == 0


def test_tampered_classifier_library_is_refused(artifact, tmp_path):
    import shutil

    from mosc.compiler.artifact import load_artifact

    bad = tmp_path / "art"
    shutil.copytree(artifact.path, bad)
    with open(bad / "model.so", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(MoscError, match="sha256"):
        load_artifact(bad)


def test_latency_side_by_side(enc, export_dir, tmp_path):
    from mosc.compiler.targets import load_target
    from mosc.jobs.bert_deploy import classifier_latency
    from mosc.jobs.build import compile_export
    from mosc.nn.bert_export import ClassifierShapes, export_classifier

    onnx = tmp_path / "onnx"
    export_classifier(enc, onnx, ClassifierShapes(batch=1, seq_len=T), check=False)
    compile_export(onnx, load_target("host"), tmp_path / "art", tune=False, tune_db=tmp_path / "db")
    threads = torch.get_num_threads()
    r = classifier_latency(tmp_path / "art", onnx, enc, runs=5, warmup=1)
    assert torch.get_num_threads() == threads  # restored
    assert r["shapes"] == {"batch": 1, "seq_len": T} and r["threads"] == 1
    for backend in ("tvm", "ort", "torch"):
        s = r["latency"][backend]
        assert s["runs"] == 5 and 0 < s["min_ms"] <= s["median_ms"] < 1000, (backend, s)
    with pytest.raises(MoscError, match="not compiled from"):  # the module's export: another model file
        classifier_latency(tmp_path / "art", export_dir, enc, runs=1)


def test_cli_exports_and_compiles_a_saved_encoder(enc, tmp_path):
    enc_dir = tmp_path / "enc"
    save_bert_encoder(enc, enc_dir)
    r = runner.invoke(app, ["export", "--subnet", str(enc_dir), "-o", str(tmp_path / "onnx"), "--source-len", str(T)])
    assert r.exit_code == 0, r.output
    assert "encoder-classifier export" in r.output and "same classes" in r.output
    r = runner.invoke(app, ["compile", "-t", "host", "--onnx-dir", str(tmp_path / "onnx"), "-o", str(tmp_path / "art"),
                            "--no-tune", "--tune-db", str(tmp_path / "db")])
    assert r.exit_code == 0, r.output
    assert "compiled" in r.output and (tmp_path / "art" / "model.so").is_file()
    r = runner.invoke(app, ["compile", "-t", "host", "--subnet", str(enc_dir), "-o", str(tmp_path / "art1"),
                            "--source-len", "8", "--no-tune", "--tune-db", str(tmp_path / "db")])  # one step
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "art1" / "manifest.json").read_text())
    assert m["model"]["kind"] == "encoder-classifier" and m["graphs"]["classifier"]["inputs"][0]["shape"] == [1, 8]


def one_line_error(result, needle: str):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert needle in lines[0], lines[0]


def test_cli_bad_encoder_inputs_are_one_line(enc, tmp_path):
    enc_dir = tmp_path / "enc"
    save_bert_encoder(enc, enc_dir)
    weights = enc_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10:] = b"\xff" * 10  # flipped bytes: the config's weights_sha256 no longer matches
    weights.write_bytes(bytes(data))
    r = runner.invoke(app, ["export", "--subnet", str(enc_dir), "-o", str(tmp_path / "o"), "--source-len", str(T)])
    one_line_error(r, "sha256")
    save_bert_encoder(enc, enc_dir)
    r = runner.invoke(app, ["export", "--subnet", str(enc_dir), "-o", str(tmp_path / "o"), "--cache-len", "8"])
    one_line_error(r, "--cache-len is for translation models")
    r = runner.invoke(app, ["compile", "-t", "host", "--subnet", str(enc_dir), "-o", str(tmp_path / "a"),
                            "--source-len", "999", "--no-tune", "--tune-db", str(tmp_path / "db")])
    one_line_error(r, "exceeds the encoder's")

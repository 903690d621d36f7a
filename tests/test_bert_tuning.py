"""Tuning an encoder-only (BERT) space once (`mosc tune --space bert-tiny`): the covering set (one
uniform arch per hidden size) covers, and an arch never seen while tuning compiles with zero
default-scheduled functions and classifies exactly like ONNX Runtime. Real exports, real TVM
builds and real MetaSchedule trials on a small space (2 layers, 2 hidden sizes, 8 tokens) so
the file runs in about a minute on 2 cores.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mosc.bert_space import BertArch, BertSpace
from mosc.compiler.targets import load_target
from mosc.jobs.tune import ModelShape
from rpc_helpers import one_core_host_target

SPACE_TOML = """
name = "bert-small"
description = "a small encoder-only space for the space-tuning tests"
[bert]
width = 32
layers = 2
hidden = [16, 32]
heads = 2
ffn_dim = 64
"""
SHAPE = ModelShape(vocab_size=300, max_positions=64, seq_len=8)


@pytest.fixture()
def env(tmp_path, monkeypatch):
    (tmp_path / "bert-small.toml").write_text(SPACE_TOML)
    tdir = one_core_host_target(tmp_path)
    monkeypatch.setenv("MOSC_TARGETS_DIR", str(tdir))
    return tmp_path


def test_covering_archs_are_in_the_space_and_show_every_hidden_size():
    for name in ("bert-tiny", "bert"):
        sp = BertSpace.load(name)
        archs = sp.covering_archs()
        assert archs and all(sp.contains(a) for a in archs)
        assert {h for a in archs for h in a.hidden} == set(sp.hidden)
        assert len(archs) == len(sp.hidden)


def test_random_archs_add_no_workload_to_the_covering_set(env):
    """Mixed archs (neighbours with other hidden sizes) add nothing: a layer's kernels depend on its own h."""
    from mosc.jobs.tune import _workloads_of, model_key

    sp, target, shape = BertSpace.load("bert-tiny"), load_target("host"), ModelShape(vocab_size=300, seq_len=8)
    covering = _workloads_of(sp.covering_archs(), sp, shape, target)
    rng = random.Random(3)
    mixed = [a for a in (sp.sample(rng) for _ in range(20)) if len(set(a.hidden)) > 2][:2]
    assert len(mixed) == 2
    found = _workloads_of(mixed, sp, shape, target)
    assert set(found) <= set(covering), [found[k].name for k in set(found) - set(covering)]
    assert {w.calls for w in covering.values()} >= {1, 4}  # the embedding once, a per-layer kernel once a layer
    key = model_key(sp, shape, target)
    assert key["kind"] == "encoder-classifier" and key["shapes"] == {"batch": 1, "seq_len": 8}
    assert key["width"] == sp.width and key["n_classes"] == 2 and key["vocab_size"] == 300


def test_tuned_space_compiles_an_unseen_arch_from_records_as_onnx_runtime_computes(env, tmp_path):
    from mosc.compiler.artifact import load_artifact, schedule_coverage
    from mosc.compiler.workloads import allot
    from mosc.jobs.build import compile_export
    from mosc.jobs.tune import space_status, space_workloads, tune_space
    from mosc.nn.bert import BertEncoder, BertEncoderConfig
    from mosc.nn.bert_export import ClassifierShapes, example_tokens, export_classifier
    from mosc.runtime import artifact_classifier, ort_classifier

    sp, target, db = BertSpace.load(env / "bert-small.toml"), load_target("host"), tmp_path / "db"
    assert sp.size() == 4
    sf, extra = space_workloads(sp, SHAPE, target, db)
    assert extra == 0 and len(sf.workloads) > 10
    trials = len(sf.workloads)  # every workload its minimum (one trial), nothing more: seconds
    assert min(allot(sf.workloads, trials).values()) >= 1
    sf, extra, rep = tune_space(sp, SHAPE, target, trials=trials, tune_db=db, progress=False)
    assert rep.with_record == rep.workloads == len(sf.workloads), rep
    _, cov = space_status(sp, SHAPE, target, db)
    assert all(c.best_us is not None for c in cov), [c.name for c in cov if c.best_us is None]
    assert (db / "spaces" / "bert-small-v300-w32-p64-c2-b1s8.json").is_file()

    # an arch that is not a covering one (mixed hidden sizes): every function from a record
    arch = BertArch((16, 32))
    assert arch.to_dict() not in sf.archs and sp.contains(arch)
    torch.manual_seed(0)
    enc = BertEncoder(BertEncoderConfig(arch, sp.to_dict(), SHAPE.vocab_size, SHAPE.max_positions, 0, 2)).eval()
    with torch.no_grad():
        enc.embed.normal_(0.0, 0.5)  # a zero embedding would leave only the positions to classify
        enc.classifier.weight.normal_(0.0, 0.5)
    onnx = tmp_path / "onnx"
    export_classifier(enc, onnx, ClassifierShapes(1, SHAPE.seq_len), check=False)
    c = compile_export(onnx, target, tmp_path / "art", tune=False, tune_db=db)
    cov = schedule_coverage(c.manifest)
    assert cov["default_scheduled"] == 0 and cov["naive"] == 0 and cov["from_database"] == cov["functions"] > 0, cov
    tvm_clf, ort_clf = artifact_classifier(load_artifact(tmp_path / "art")), ort_classifier(onnx)
    for seed in range(3):
        tokens = example_tokens(enc, ClassifierShapes(1, SHAPE.seq_len), seed).numpy()
        got, want = tvm_clf.run(tokens), ort_clf.run(tokens)
        assert np.abs(got - want).max() < 1e-4 and np.array_equal(got.argmax(-1), want.argmax(-1)), (got, want)


def _cli(args):
    from mosc.cli import app

    return CliRunner().invoke(app, args)


def test_status_of_a_never_tuned_bert_space_is_one_line(env, tmp_path):
    r = _cli(["tune", "-t", "host", "--space", "bert-tiny", "--seq-len", "16", "--tune-db", str(tmp_path / "none"),
              "--status"])
    assert r.exit_code == 2 and "has not been tuned for host" in r.output and "Traceback" not in r.output, r.output
    assert r.output.strip().count("\n") == 0 and "s16" in r.output


def test_seq_len_with_a_translation_space_is_one_line(env, tmp_path):
    r = _cli(["tune", "-t", "host", "--space", "tiny", "--seq-len", "16", "--tune-db", str(tmp_path / "none"), "--status"])
    assert r.exit_code == 2 and r.output.count("error:") == 1 and "--seq-len" in r.output, r.output
    assert r.output.strip().count("\n") == 0


def test_shape_of_a_bert_checkpoint(tmp_path):
    """A BERT supernet checkpoint gives its vocabulary and positions (and SST-2's 2 classes);
    its space is the checkpoint's own."""
    from mosc.jobs.tune import load_tune_space

    d = tmp_path / "ck"
    d.mkdir()
    sp = BertSpace.load("bert-tiny")
    (d / "config.json").write_text(json.dumps({"kind": "mosc-bert-supernet", "config": {
        "space": sp.to_dict(), "vocab_size": 401, "max_positions": 128, "pad_id": 0}}))
    assert ModelShape.of_checkpoint(d) == ModelShape(vocab_size=401, max_positions=128, pad_id=0, n_classes=2)
    assert load_tune_space(None, d) == sp

"""Latency predictors: features, fitting, metrics, save/load and the `mosc predictor` commands."""

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mosc.cli import app
from mosc.device.db import LatencyDB
from mosc.errors import MoscError
from mosc.search.predictor import (COST_NAMES, Dataset, Predictor, Shapes, component_costs, featurize, fit, fit_eval,
                            metrics, read_db, read_hat_csv, split_indices)
from mosc.space import SearchSpace

HAT_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "hat-latency"
HAT_XEON = HAT_DIR / "wmt14ende_cpu_xeon_all.csv"
runner = CliRunner(env={"COLUMNS": "200"})
TINY = SearchSpace.load("tiny")


def analytic_ms(arch, noise=0.0, rng=None) -> float:
    """A synthetic device: compute + memory + per-op overhead."""
    c = component_costs(arch.hat_features(), Shapes(qkv_dim=TINY.qkv_dim, vocab=1000))
    macs = sum(c[f"macs_{k}"] for k in ("enc_attn", "enc_ffn", "dec_self_attn", "dec_cross_attn", "dec_ffn", "out_proj"))
    ms = 0.5 + macs / 2e8 + 0.05 * c["ops_decoder"] + 0.2 * c["ops_encoder"]
    return ms * (1 + noise * rng.gauss(0, 1)) if noise else ms


def synthetic_db(path, n=120, target="synth", seed=0, noise=0.01):
    rng = random.Random(seed)
    archs = list({a.hash: a for a in (TINY.sample(rng) for _ in range(n))}.values())
    with LatencyDB(path) as db:
        db.insert_many([{"target": target, "backend": "torch", "device_key": "local:test", "arch_hash": a.hash,
                         "arch_json": a.to_json(), "features": a.hat_features(),
                         "latency_ms": analytic_ms(a, noise, rng)} for a in archs])
    return archs


def test_costs_from_averages_equal_costs_from_layers():
    # every cost is linear in per-layer dims: layers x mean dim is exact
    rng = random.Random(1)
    a = TINY.sample(rng)
    sh = Shapes(qkv_dim=128)
    per_layer = {k: 0.0 for k in COST_NAMES}
    from mosc.space import Arch
    for i in range(a.dec_layers):  # split the decoder into single-layer archs and add their decoder costs
        one = Arch(a.enc_embed, a.enc_ffn, a.enc_heads, a.dec_embed, (a.dec_ffn[i],), (a.dec_heads[i],),
                   (a.dec_cross_heads[i],), (a.dec_arbitrary[i],))
        for k, v in component_costs(one.hat_features(), sh).items():
            per_layer[k] += v
    full = component_costs(a.hat_features(), sh)
    assert math.isclose(full["macs_dec_ffn"], per_layer["macs_dec_ffn"], rel_tol=1e-9)
    assert math.isclose(full["macs_dec_cross_attn"], per_layer["macs_dec_cross_attn"], rel_tol=1e-9)
    assert all(v >= 0 for v in full.values())


def test_split_is_seeded_and_disjoint():
    a = split_indices(100, 3)
    assert a == split_indices(100, 3) and a != split_indices(100, 4)
    assert [len(x) for x in a] == [80, 10, 10] and len(set(sum(a, []))) == 100


def test_metrics():
    y = np.array([10.0, 20.0, 30.0, 40.0])
    m = metrics(y, y * np.array([1.05, 0.8, 1.0, 1.09]))
    assert m["within_10pct"] == 0.75 and m["kendall_tau"] == pytest.approx(1.0) and m["n"] == 4
    assert m["mape"] == pytest.approx((0.05 + 0.2 + 0 + 0.09) / 4)


@pytest.mark.parametrize("model", ["lsq", "gbt", "hybrid", "mlp"])
def test_fit_on_synthetic_db_rows(tmp_path, model):
    synthetic_db(tmp_path / "lat.db", n=150)
    data = read_db(tmp_path / "lat.db", "synth", "tiny")
    assert len(data) > 100 and all(a is not None for a in data.archs)
    kw = {"mlp_steps": 300} if model == "mlp" else {"gbt_rounds": 150}
    p, m = fit_eval(data, model=model, space=TINY, **kw)
    assert p.features == ("hat" if model == "mlp" else "layers")
    limit = {"lsq": 0.03, "hybrid": 0.05, "gbt": 0.15, "mlp": 0.5}[model]
    assert m["mape"] < limit, m
    # save -> load -> same predictions; the arch callable agrees
    f = p.save(tmp_path / "p.json")
    q = Predictor.load(f, target="synth", space="tiny")
    archs = [a for a in data.archs[:5]]
    assert np.allclose(p.predict(archs), q.predict(archs), rtol=1e-5)
    assert q.latency(archs[0]) == pytest.approx(float(q.predict(archs[:1])[0]))
    doc = json.loads(f.read_text())
    assert doc["target"] == "synth" and doc["space"] == "tiny" and doc["meta"]["training_rows"] == p.meta["split"]["train"]
    assert "metrics" in doc["meta"] and "pickle" not in f.read_text()


def test_load_errors(tmp_path):
    synthetic_db(tmp_path / "lat.db", n=40)
    p = fit(read_db(tmp_path / "lat.db", "synth", "tiny"), model="gbt", gbt_rounds=20)
    f = p.save(tmp_path / "p.json")
    with pytest.raises(MoscError, match="fitted for target 'synth', not 'rpi4'"):
        Predictor.load(f, target="rpi4")
    with pytest.raises(MoscError, match="search space 'tiny', not 'wmt'"):
        Predictor.load(f, space="wmt")
    (tmp_path / "p.xgb.json").write_text("{}")
    with pytest.raises(MoscError, match="sha256"):
        Predictor.load(f)
    (tmp_path / "x.json").write_text('{"format": "other"}')
    with pytest.raises(MoscError, match="not a mosc latency predictor"):
        Predictor.load(tmp_path / "x.json")


def test_empty_db_and_layers_without_archs(tmp_path):
    with LatencyDB(tmp_path / "e.db"):
        pass
    with pytest.raises(MoscError, match="no real .*rows for target 'synth'"):
        read_db(tmp_path / "e.db", "synth", "tiny")
    with pytest.raises(MoscError, match="no latency database"):
        read_db(tmp_path / "missing.db", "synth", "tiny")
    d = Dataset(np.ones((3, 10)), [None] * 3, np.ones(3), "x", "t", "tiny")
    with pytest.raises(MoscError, match="needs an arch JSON"):
        featurize("layers", d.features, d.archs, TINY, Shapes())


@pytest.mark.skipif(not HAT_XEON.exists(), reason=f"HAT latency data not found at {HAT_DIR} (../shared/data)")
def test_hat_csv_subset_beats_mlp():
    d = read_hat_csv(HAT_XEON, max_rows=600)
    assert d.target == "hat:wmt14ende_cpu_xeon_all" and d.space == "wmt" and len(d) == 600
    _, m_lsq = fit_eval(d, model="lsq")
    _, m_mlp = fit_eval(d, model="mlp", mlp_steps=400)
    assert m_lsq["mape"] < 0.08 and m_lsq["mape"] < m_mlp["mape"]


def test_cli_fit_and_eval(tmp_path):
    synthetic_db(tmp_path / "lat.db", n=80)
    out = tmp_path / "p.json"
    r = runner.invoke(app, ["predictor", "fit", "--db", str(tmp_path / "lat.db"), "--target", "synth", "--model", "lsq",
                            "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "within ±10%" in r.output and out.exists()
    r = runner.invoke(app, ["predictor", "eval", str(out), "--db", str(tmp_path / "lat.db")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["predictor", "eval", str(out), "--db", str(tmp_path / "lat.db"), "--target", "other"])
    assert r.exit_code == 2 and "no real" in r.output
    r = runner.invoke(app, ["predictor", "fit", "--out", str(out)])
    assert r.exit_code == 2 and "--db PATH --target T or --csv FILE" in r.output
    r = runner.invoke(app, ["predictor", "fit", "--db", str(tmp_path / "lat.db"), "--target", "synth", "--space", "wmt",
                            "--out", str(out)])
    assert r.exit_code == 2 and "outside space 'wmt'" in r.output


def test_cli_refuses_feature_rows_of_another_space(tmp_path):
    synthetic_db(tmp_path / "lat.db", n=20)
    with LatencyDB(tmp_path / "lat.db") as db:  # a HAT-like feature-only row (WMT dims) under the same target
        db.insert({"target": "synth", "backend": "hat-pytorch", "device_key": "hat:x",
                   "features": [512, 6, 1024, 4, 512, 3, 2048, 4, 4, 1], "latency_ms": 100.0})
    r = runner.invoke(app, ["predictor", "fit", "--db", str(tmp_path / "lat.db"), "--target", "synth",
                            "--out", str(tmp_path / "p.json")])
    assert r.exit_code == 2 and "several backends for target 'synth' (hat-pytorch, torch)" in r.output
    r = runner.invoke(app, ["predictor", "fit", "--db", str(tmp_path / "lat.db"), "--target", "synth",
                            "--backend", "hat-pytorch", "--out", str(tmp_path / "p.json")])
    assert r.exit_code == 2 and "do not fit space 'tiny'" in r.output
    r = runner.invoke(app, ["predictor", "fit", "--db", str(tmp_path / "lat.db"), "--target", "synth",
                            "--backend", "torch", "--out", str(tmp_path / "p.json")])
    assert r.exit_code == 0, r.output  # one backend's rows: fine

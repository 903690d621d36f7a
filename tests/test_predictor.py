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


# ------------------------------------------------------------------- damaged predictor files
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{model: saved predictor file} for lsq, mlp and gbt."""
    d = tmp_path_factory.mktemp("saved")
    synthetic_db(d / "lat.db", n=40)
    data = read_db(d / "lat.db", "synth", "tiny")
    out = {}
    for model, kw in [("lsq", {}), ("mlp", {"mlp_steps": 5}), ("gbt", {"gbt_rounds": 5})]:
        out[model] = fit(data, model=model, **kw).save(d / f"{model}.json")
    return out


def _damaged(tmp_path, src: Path, edit) -> Path:
    doc = json.loads(src.read_text())
    edit(doc)
    for f in src.parent.glob(src.stem + ".xgb.json"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    dst = tmp_path / src.name
    dst.write_text(json.dumps(doc))
    return dst


def _pop(key):
    return lambda d: d.pop(key)


def _set(path, value):
    def edit(d):
        *head, last = path
        for k in head:
            d = d[k]
        d[last] = value
    return edit


DAMAGE = [
    ("lsq", _pop("state"), "missing 'state'"),
    ("lsq", _set(["state"], []), "'state' must be a object"),
    ("lsq", lambda d: d["state"]["coef"].pop(), "state.coef has 16 values, the model needs 17"),
    ("lsq", _set(["state", "coef"], "x"), "state.coef must be a list of finite numbers"),
    ("lsq", _set(["state", "scale", 0], -1.0), "state.scale must be a list of finite positive numbers"),
    ("lsq", _set(["model"], "forest"), "unknown model 'forest'; known: lsq, mlp, gbt, hybrid"),
    ("lsq", _set(["features"], "pixels"), "unknown features 'pixels'"),
    ("lsq", _set(["features"], "hat"), "model lsq needs cost features"),
    ("lsq", _set(["model"], 3), "'model' must be a string"),
    ("lsq", _set(["target"], 7), "'target' must be a string"),
    ("lsq", _set(["shapes"], "big"), "'shapes' must be a object"),
    ("lsq", _set(["shapes", "rows"], 0), "shapes rows must be a positive integer"),
    ("lsq", _set(["shapes", "beam"], 4), "shapes has unknown key 'beam'"),
    ("lsq", _set(["meta"], []), "'meta' must be a object"),
    ("lsq", _set(["space_def"], "tiny"), "'space_def' must be a object"),
    ("mlp", lambda d: d["state"]["layers"].pop(), "the last layer of state.layers has 400 outputs, not 1"),
    ("mlp", lambda d: d["state"]["layers"][0][0].pop(), "state.layers[0] weights must be 10 rows"),
    ("mlp", _set(["state", "y_scale"], None), "state.y_scale must be a list of finite positive numbers"),
    ("mlp", _set(["state", "layers"], {}), "state.layers must be a non-empty list"),
    ("gbt", _pop("xgboost_model"), "model gbt needs its xgboost model"),
    ("gbt", _set(["xgboost_model", "file"], "../x.json"), "must be a file name next to the predictor"),
    ("gbt", _set(["features"], "layers"), "the xgboost model reads 26 features, the predictor's layers features are 46"),
    ("gbt", _set(["xgboost_model", "sha256"], 5), "'sha256' must be a string"),
]


@pytest.mark.parametrize("model,edit,needle", DAMAGE)
def test_damaged_predictor_files_are_one_line_errors(tmp_path, saved, model, edit, needle):
    bad = _damaged(tmp_path, saved[model], edit)
    with pytest.raises(MoscError) as e:
        Predictor.load(bad)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_undamaged_predictor_files_load(saved):
    for f in saved.values():
        assert math.isfinite(Predictor.load(f, target="synth", space="tiny").latency(TINY.smallest()))


def test_cli_damaged_predictor_is_one_line(tmp_path, saved):
    bad = _damaged(tmp_path, saved["lsq"], _pop("state"))
    r = runner.invoke(app, ["search", "-t", "synth", "-p", str(bad), "--fitness", "macs", "-l", "100",
                            "-o", str(tmp_path / "o")])
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "missing 'state'" in lines[0], r.output


# ------------------------------------------------------------------- HAT CSV input
HAT_HEADER = ("encoder_embed_dim,encoder_layer_num,encoder_ffn_embed_dim_avg,encoder_self_attention_heads_avg,"
              "decoder_embed_dim,decoder_layer_num,decoder_ffn_embed_dim_avg,decoder_self_attention_heads_avg,"
              "decoder_ende_attention_heads_avg,decoder_arbitrary_ende_attn_avg,latency_mean_encoder,"
              "latency_mean_decoder")
GOOD_ROW = "512,6,2048,8,512,6,2048,8,8,1,20.5,100.25"


def test_hat_csv_header_matches_the_feature_names():
    from mosc.space import HAT_FEATURE_NAMES

    assert HAT_HEADER.split(",")[:10] == HAT_FEATURE_NAMES


@pytest.mark.parametrize("row,needle", [
    ("512,6,2048,8,512,6,2048,8,8,1,nan,100", ":3: latency must be a finite positive number"),
    ("512,6,2048,8,512,6,2048,8,8,1,20,inf", ":3: latency must be a finite positive number"),
    ("512,6,2048,8,512,6,2048,8,8,1,0,100", ":3: latency must be a finite positive number"),
    ("512,6,2048,8,512,6,2048,8,8,1,-5,100", ":3: latency must be a finite positive number"),
    ("512,nan,2048,8,512,6,2048,8,8,1,20,100", ":3: a feature is not a finite number"),
    ("512,6,2048,8,512,6,2048,8,8,1,fast,100", ":3: a feature or latency is not a number"),
    ("512,6,2048", ":3: a feature or latency is not a number"),
])
def test_hat_csv_bad_rows_name_their_line(tmp_path, row, needle):
    f = tmp_path / "hat.csv"
    f.write_text(f"{HAT_HEADER}\n{GOOD_ROW}\n{row}\n")
    with pytest.raises(MoscError, match=needle) as e:
        read_hat_csv(f)
    assert "\n" not in str(e.value)


def test_hat_csv_encodings(tmp_path):
    f = tmp_path / "bom.csv"
    f.write_bytes(b"\xef\xbb\xbf" + f"{HAT_HEADER}\n{GOOD_ROW}\n".encode())
    d = read_hat_csv(f)  # a BOM is fine
    assert len(d) == 1 and d.latency_ms[0] == pytest.approx(120.75)
    f.write_bytes(f"{HAT_HEADER}\n{GOOD_ROW}\n".encode() + b"\xff\xfe,1\n")
    with pytest.raises(MoscError, match="is not UTF-8 text"):
        read_hat_csv(f)
    f.write_text("a,b\n1,2\n")
    with pytest.raises(MoscError, match="lacks the column"):
        read_hat_csv(f)
    with pytest.raises(MoscError, match="cannot read"):
        read_hat_csv(tmp_path / "missing.csv")


def test_mlp_never_predicts_a_negative_latency():
    """A net whose linear output is negative (as far from its training rows) predicts the floor, not < 0."""
    from mosc.search.predictor import predict_mlp

    X = np.ones((3, 4))
    state = {"layers": [[np.full((4, 1), -1.0).tolist(), [0.5]]], "y_scale": 2.0}  # 4 * -1 + 0.5 < 0
    pred = predict_mlp(state, X)
    assert pred.shape == (3,) and (pred > 0).all() and pred.max() == pytest.approx(1e-6)
    state["layers"][0][1] = [10.0]  # positive outputs pass through unchanged
    assert predict_mlp(state, X) == pytest.approx(np.full(3, 12.0))

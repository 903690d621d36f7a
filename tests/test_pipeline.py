"""mosc.pipeline: the config file and the whole main job on a very small config (~1 min)."""

import json

import pytest

from mosc.errors import MoscError
from mosc.pipeline import PipelineConfig

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_defaults_and_examples_parse():
    d = PipelineConfig()
    assert d.target == "host" and d.measure_archs == 12 and d.tune_trials == 1000 and d.population == 40
    assert PipelineConfig.load(ROOT / "examples" / "tiny.toml") == d  # the built-in default, written out
    m = PipelineConfig.load(ROOT / "examples" / "multi30k.toml")
    assert m.corpus == "multi30k" and m.train_steps > d.train_steps
    r = PipelineConfig.load(ROOT / "examples" / "rpi4.toml")
    assert r.target == "rpi4" and r.tracker and r.key == "rpi4"


@pytest.mark.parametrize("text, msg", [
    ("trian_steps = 5\n", "unknown key 'trian_steps'"),
    ("train_steps = 'five'\n", "train_steps must be int"),
    ("pareto = 1\n", "pareto must be bool"),
    ("train_steps = true\n", "train_steps must be int"),
    ("measure_archs = 3\n", "measure_archs must be between 5 and"),
    ("train_steps = \n", "not valid TOML"),
    ("mutation_prob = 7.0\n", "mutation_prob must be between 0 and 1"),
    ("population = 1000000000\n", "population must be between 2 and 100000"),
    ("train_lr = nan\n", "train_lr must be between"),
    ("mode = 'moe'\n", "mode must be one of shared, layer, neuron"),
    ("predictor = 'forest'\n", "predictor must be one of lsq, mlp, gbt, hybrid"),
    ("parents = 50\n", "parents (50) must not exceed population (40)"),
])
def test_bad_config_is_one_line(tmp_path, text, msg):
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(MoscError) as e:
        PipelineConfig.load(f)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_int_accepted_for_float(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("latency_budget_ms = 5\n")
    assert PipelineConfig.load(f).latency_budget_ms == 5.0


def test_cli_bad_config_exits_2(tmp_path):
    from typer.testing import CliRunner

    from mosc.cli import app

    f = tmp_path / "c.toml"
    f.write_text("nope = 1\n")
    r = CliRunner().invoke(app, ["pipeline", "--config", str(f), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "unknown key 'nope'" in r.output


SMALL = dict(train_steps=3, train_max_tokens=256, train_warmup=1, max_train_pairs=200, measure_archs=5,
             measure_warmup=0, measure_repeats=3, population=6, parents=3, mutations=2, crossovers=2, generations=2,
             val_sentences=10, bleu_archs=1, bleu_sentences=5, tune_trials=0, cross_target="",
             translate_sentences=2)


def test_pipeline_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("MOSC_ARTIFACT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MOSC_TUNE_DIR", str(tmp_path / "tune"))  # never the machine's own database
    from mosc.pipeline import run_pipeline

    out = tmp_path / "p"
    s = run_pipeline(PipelineConfig(**SMALL), out)
    j = json.loads((out / "summary.json").read_text())
    assert j["train"]["steps"] == 3
    assert len(j["measure"]["latency_ms"]) == 5 and j["tune"] == {"trials": 0}
    assert j["predictor"]["rows"] == 5
    assert j["search"]["budget_ms"] == pytest.approx(j["measure"]["median_ms"])
    assert j["front"] and any(r["winner"] for r in j["front"]) and any(r["bleu"] is not None for r in j["front"])
    assert set(j["stage_seconds"]) == {"train", "tune", "measure", "predictor", "search", "export", "compile",
                                       "translate", "check"}
    checked = [r for r in j["front"] if r["bleu"] is not None]
    assert checked and all(r["measured_ms"] > 0 for r in checked)  # every checked arch was measured
    w = j["winner_artifact"]
    assert w["latency_ms"] > 0 and w["measured_row_ms"] > 0  # the winner is among the checked archs
    host = j["compile"]["host"]
    assert host["functions"] > 0 and host["functions_from_database"] == 0  # an empty database: default schedules
    assert len(j["translate"]["sentences"]) == 2 and all("output" in r for r in j["translate"]["sentences"])
    assert j["next"] and s["total_seconds"] > 0

    # the compiled artifact translates through the CLI too
    from typer.testing import CliRunner

    from mosc.cli import app

    r = CliRunner().invoke(app, ["translate", "--artifact", j["compile"]["host"]["path"], "--text",
                                 j["translate"]["sentences"][0]["source"]])
    assert r.exit_code == 0, r.output

    # a second run resumes: training is not repeated, measured archs are skipped
    s2 = run_pipeline(PipelineConfig(**SMALL), out)
    assert s2["train"]["resumed"] and s2["measure"]["skipped"] == 5

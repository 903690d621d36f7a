"""Hardware-aware search: HAT's evolution, NSGA-II Pareto mode, errors and `mosc search`."""

import json
import math
import random

import pytest
from typer.testing import CliRunner

from mosc.cli import app
from mosc.errors import MoscError
from mosc.search.predictor import Shapes, component_costs, fit, read_db
from mosc.search.evolve import (Cached, EvoConfig, crowding, evolve, non_dominated_sort, pareto_front, pareto_search)
from mosc.space import SearchSpace

TINY = SearchSpace.load("tiny")
SH = Shapes(qkv_dim=128, vocab=1000)
runner = CliRunner(env={"COLUMNS": "200"})
SMALL = EvoConfig(population=30, parents=8, mutations=12, crossovers=12, generations=8, seed=0)


def macs(a) -> float:
    c = component_costs(a.hat_features(), SH)
    return sum(v for k, v in c.items() if k.startswith("macs_"))


def latency(a) -> float:
    return 0.5 + macs(a) / 2e7


def loss(a) -> float:  # bigger is better, with diminishing returns
    return 5.0 - 0.4 * math.log(macs(a)) + 0.01 * (a.enc_heads[0] == 2)


def test_evolve_respects_constraint_and_beats_random():
    lo, hi = latency(TINY.smallest()), latency(TINY.largest())
    limit = lo + 0.3 * (hi - lo)
    res = evolve(TINY, loss, latency, limit, SMALL)
    assert res.best.latency_ms <= limit
    assert all(c.latency_ms <= limit for c in res.front)
    rng = random.Random(0)
    rand = [a for a in (TINY.sample(rng) for _ in range(res.evaluated)) if latency(a) <= limit]
    assert res.best.loss <= min(loss(a) for a in rand) + 1e-9
    hist = [h["best_loss"] for h in res.history]
    assert hist == sorted(hist, reverse=True)  # elitist: never worse
    assert len(res.history) == SMALL.generations


def test_fitness_is_cached_per_arch():
    calls = []
    score = Cached(lambda a: calls.append(a.hash) or loss(a))
    evolve(TINY, score, latency, latency(TINY.largest()), SMALL)
    assert len(calls) == len(set(calls)) == score.calls


def test_impossible_constraint_is_a_clear_error():
    with pytest.raises(MoscError, match="even the smallest arch is predicted"):
        evolve(TINY, loss, latency, latency(TINY.smallest()) * 0.5, SMALL)
    with pytest.raises(MoscError, match="parents must be between"):
        evolve(TINY, loss, latency, 1e9, EvoConfig(population=5, parents=6))


def test_non_dominated_sort_and_crowding():
    objs = [(1, 5), (2, 4), (3, 3), (2, 5), (4, 4), (5, 5)]
    fronts = non_dominated_sort(objs)
    assert fronts[0] == [0, 1, 2] and sorted(fronts[1]) == [3, 4] and fronts[2] == [5]
    cd = crowding(objs, fronts[0])
    assert cd[0] == cd[2] == float("inf") and 0 < cd[1] < float("inf")


def test_pareto_search_front_is_non_dominated_and_spans_latency():
    res = pareto_search(TINY, loss, latency, None, SMALL)
    f = res.front
    assert len(f) >= 5
    assert all(a.latency_ms < b.latency_ms and a.loss > b.loss for a, b in zip(f, f[1:]))
    assert f[0].latency_ms == pytest.approx(latency(TINY.smallest()))  # the latency end is reached
    assert pareto_front([c.arch for c in f], loss, latency) == f


@pytest.fixture()
def predictor_file(tmp_path):
    from mosc.device.db import LatencyDB

    rng = random.Random(0)
    archs = list({a.hash: a for a in (TINY.sample(rng) for _ in range(60))}.values())
    with LatencyDB(tmp_path / "lat.db") as db:
        db.insert_many([{"target": "synth", "backend": "torch", "device_key": "k", "arch_hash": a.hash,
                         "arch_json": a.to_json(), "features": a.hat_features(), "latency_ms": latency(a)}
                        for a in archs])
    p = fit(read_db(tmp_path / "lat.db", "synth", "tiny"), model="lsq")
    return p.save(tmp_path / "p.json")


def test_cli_search_and_pareto(tmp_path, predictor_file):
    base = ["search", "-t", "synth", "-p", str(predictor_file), "--fitness", "macs", "--population", "20",
            "--parents", "5", "--mutations", "8", "--crossovers", "8", "--generations", "4"]
    limit = latency(TINY.smallest()) * 3
    r = runner.invoke(app, base + ["-l", str(limit), "-o", str(tmp_path / "o"), "--db", str(tmp_path / "lat.db")])
    assert r.exit_code == 0, r.output
    best = json.loads((tmp_path / "o" / "best.json").read_text())
    TINY.validate(__import__("mosc.space", fromlist=["Arch"]).Arch.from_dict(best))
    s = json.loads((tmp_path / "o" / "search.json").read_text())
    assert s["best"]["latency_ms"] <= limit and s["config"]["population"] == 20
    assert (tmp_path / "o" / "pareto.csv").read_text().startswith("arch_hash,latency_ms,loss")
    r = runner.invoke(app, base + ["--pareto", "-o", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    assert len(json.loads((tmp_path / "p" / "pareto.json").read_text())["front"]) >= 2


def test_cli_search_errors(tmp_path, predictor_file):
    base = ["search", "-p", str(predictor_file), "--fitness", "macs", "-o", str(tmp_path / "o")]
    r = runner.invoke(app, base + ["-t", "rpi4", "-l", "100"])
    assert r.exit_code == 2 and "fitted for target 'synth', not 'rpi4'" in r.output
    r = runner.invoke(app, base + ["-t", "synth", "-l", "100", "-s", "wmt"])
    assert r.exit_code == 2 and "search space 'tiny', not 'wmt'" in r.output
    r = runner.invoke(app, base + ["-t", "synth", "-l", "0.001"])
    assert r.exit_code == 2 and "relax --latency-ms" in r.output
    r = runner.invoke(app, base + ["-t", "synth"])
    assert r.exit_code == 2 and "--latency-ms" in r.output
    r = runner.invoke(app, ["search", "-p", str(predictor_file), "-t", "synth", "-l", "100"])
    assert r.exit_code == 2 and "needs --checkpoint" in r.output


def test_search_world_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys, mosc.search.evolve, mosc.search.predictor; "
            "bad = [m for m in ('torch', 'tvm') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_feedback_rounds_measure_refit_and_report():
    from mosc.search.feedback import feedback_search

    device = lambda a: latency(a) * 1.3  # noqa: E731  the real device is 30% slower than the first predictor
    measured, refits = [], []
    scale = {"k": 1.0}

    def measure(archs):
        measured.extend(a.hash for a in archs)
        return {a.hash: device(a) for a in archs}

    def refit():  # "refit on the DB": learns the 1.3 factor from what was measured
        refits.append(len(measured))
        scale["k"] = 1.3
        return lambda a: latency(a) * scale["k"]

    limit = latency(TINY.smallest()) * 3
    score = Cached(loss)
    r = feedback_search(lambda lat: evolve(TINY, score, lat, limit, SMALL), measure, refit, latency, rounds=3,
                        top_k=2, limit_ms=limit)
    assert len(r.rounds) == 3 and refits == [2, 4]
    assert len(measured) == len(set(measured))  # nothing measured twice
    assert r.final_measured_ms == pytest.approx(device(r.final.arch))
    assert abs(r.final_error) < 1e-9 and r.final_measured_ms <= limit  # the refitted predictor is right
    assert r.rounds[0].measured and all(v["measured_ms"] > v["predicted_ms"] for v in r.rounds[0].measured.values())
    d = r.to_dict()
    assert d["final"]["arch_hash"] == r.final.arch.hash and len(d["rounds"]) == 3


def test_cli_rounds_need_db(tmp_path, predictor_file):
    r = runner.invoke(app, ["search", "-t", "synth", "-p", str(predictor_file), "--fitness", "macs", "-l", "100",
                            "--rounds", "2", "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "--rounds needs --db" in r.output


def test_rpi4_search_without_measurements_uses_the_labelled_prior(tmp_path):
    from typer.testing import CliRunner

    from mosc.cli import app

    runner = CliRunner(env={"COLUMNS": "200"})
    args = ["search", "--target", "rpi4", "--latency-ms", "300", "--fitness", "macs", "--generations", "2",
            "--population", "20", "--parents", "5", "--mutations", "8", "--crossovers", "8", "-o", str(tmp_path / "s")]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "ANALYTIC PRIOR" in r.output and (tmp_path / "s" / "best.json").exists()
    r = runner.invoke(app, [*args[:2], "xeon", *args[3:]])
    assert r.exit_code == 2 and "--predictor is required for 'xeon'" in r.output


# ---------------------------------------------------------------------- bounds (no hangs)
@pytest.mark.parametrize("kw,pattern", [
    ({"population": 10**9}, "population must be between 2 and 100,000"),
    ({"population": 1}, "population must be between 2"),
    ({"generations": 10**6}, "generations must be between 1 and 10,000"),
    ({"generations": 0}, "generations must be between 1"),
    ({"mutations": 10**9}, "mutations must be between 0 and 100,000"),
    ({"crossovers": -1}, "crossovers must be between 0"),
    ({"mutation_prob": float("nan")}, "mutation probability must be in"),
    ({"max_tries": 0}, "max_tries must be between 1"),
])
def test_evo_config_is_bounded(kw, pattern):
    with pytest.raises(MoscError, match=pattern):
        EvoConfig(**kw).check()
    with pytest.raises(MoscError, match=pattern):  # the search checks before any work
        evolve(TINY, loss, latency, 1e9, EvoConfig(**kw))


def test_population_larger_than_the_space_is_refused():
    small = SearchSpace.from_dict({"name": "small", "qkv_dim": 8,
                                   "encoder": {"embed_dim": [8], "layers": [1], "ffn_dim": [8, 16], "heads": [1]},
                                   "decoder": {"embed_dim": [8], "layers": [1], "ffn_dim": [8], "heads": [1],
                                               "cross_heads": [1], "arbitrary_attn": [1]}})
    assert small.size() == 2
    with pytest.raises(MoscError, match="population 3 exceeds the 2 distinct archs of space 'small'"):
        pareto_search(small, loss, latency, None, EvoConfig(population=3, parents=1))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, 0.0])
def test_latency_budget_must_be_finite_and_positive(bad):
    for run in (evolve, pareto_search):
        with pytest.raises(MoscError, match="must be a finite positive number of ms"):
            run(TINY, loss, latency, bad, SMALL)


def test_non_finite_latency_or_fitness_stops_the_search():
    with pytest.raises(MoscError, match=r"predicted latency of arch \w+ is nan"):
        evolve(TINY, loss, lambda a: float("nan"), 1e9, SMALL)
    with pytest.raises(MoscError, match=r"fitness of arch \w+ is inf"):
        pareto_search(TINY, lambda a: float("inf"), latency, None, SMALL)


def test_two_objective_sort_matches_the_definition_and_scales():
    import time

    from mosc.search.evolve import _dominates

    def brute(objs):
        left, out = set(range(len(objs))), []
        while left:
            front = sorted(i for i in left if not any(_dominates(objs[j], objs[i]) for j in left))
            out.append(front)
            left -= set(front)
        return out

    rng = random.Random(0)
    for _ in range(500):  # small integer grids: many ties and duplicates
        k = rng.choice([2, 4, 50])
        objs = [(float(rng.randint(0, k)), float(rng.randint(0, k))) for _ in range(rng.randint(0, 25))]
        assert non_dominated_sort(objs) == brute(objs), objs
    big = [(rng.random(), rng.random()) for _ in range(100_000)]
    t0 = time.perf_counter()
    fronts = non_dominated_sort(big)
    assert sum(map(len, fronts)) == len(big) and time.perf_counter() - t0 < 30


def test_sample_archs_is_bounded():
    from mosc.jobs.artifacts import sample_archs

    with pytest.raises(MoscError, match="at most 100,000"):
        sample_archs(SearchSpace.load("wmt"), 10**9, 0)
    with pytest.raises(MoscError, match="must be from 1 to"):
        sample_archs(TINY, 0, 0)
    small = SearchSpace.from_dict({"name": "small", "qkv_dim": 8,
                                   "encoder": {"embed_dim": [8], "layers": [1], "ffn_dim": [8, 16], "heads": [1]},
                                   "decoder": {"embed_dim": [8], "layers": [1], "ffn_dim": [8], "heads": [1],
                                               "cross_heads": [1], "arbitrary_attn": [1]}})
    with pytest.raises(MoscError, match="space 'small' holds only 2 distinct archs"):
        sample_archs(small, 3, 0)
    assert len(sample_archs(small, 2, 0)) == 2


def test_cli_search_bounds_and_budget_are_one_line(tmp_path, predictor_file):
    base = ["search", "-t", "synth", "-p", str(predictor_file), "--fitness", "macs", "-o", str(tmp_path / "o")]
    for extra, needle in [(["-l", "100", "--population", "1000000000"], "population must be between 2 and 100,000"),
                          (["-l", "100", "--generations", "1000000"], "generations must be between 1 and 10,000"),
                          (["-l", "nan"], "finite positive number of ms, got nan"),
                          (["-l", "inf"], "finite positive number of ms, got inf"),
                          (["-l", "-3"], "finite positive number of ms, got -3")]:
        r = runner.invoke(app, base + extra)
        lines = [x for x in r.output.splitlines() if x.strip()]
        assert r.exit_code == 2 and len(lines) == 1 and needle in lines[0], r.output


def test_cli_search_target_aliases_and_unknown_targets(tmp_path, predictor_file):
    args = ["--latency-ms", "300", "--fitness", "macs", "--generations", "2", "--population", "20", "--parents", "5",
            "--mutations", "8", "--crossovers", "8", "-o", str(tmp_path / "s")]
    r = runner.invoke(app, ["search", "--target", "rpi", *args])
    assert r.exit_code == 0, r.output
    assert "ANALYTIC PRIOR" in r.output and (tmp_path / "s" / "best.json").exists()
    r = runner.invoke(app, ["search", "--target", "nope", *args])
    assert r.exit_code == 2 and "unknown target 'nope'; valid targets: " in r.output and "rpi4" in r.output
    r = runner.invoke(app, ["search", "--target", "../targets/host", *args])
    assert r.exit_code == 2 and "invalid target name" in r.output


def test_latency_model_resolves_aliases(predictor_file):
    from mosc.jobs.search import latency_model, row_target

    assert row_target("pi") == "rpi4" and row_target("synth") == "synth" and row_target("hat:x") == "hat:x"
    assert latency_model("raspberrypi", TINY, None, None, log=lambda m: None).target == "rpi4"
    assert latency_model("synth", TINY, predictor_file, None).target == "synth"
    with pytest.raises(MoscError, match="--predictor is required for 'xeon'"):
        latency_model("xeon", TINY, None, None)

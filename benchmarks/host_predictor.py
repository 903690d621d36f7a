"""Latency-predictor accuracy on this machine's own measurements (goal: >= 95% of
archs within ±10%).

Measures N distinct `tiny` archs on `host` through TVM, untuned builds from an EMPTY tuning
database (so no arch gets schedules another arch's tuning left behind; the pipeline measures
the same way), with the target's protocol, into a latency DB under --work (re-running resumes:
archs already measured are skipped). Then scores lsq / gbt / hybrid / HAT's MLP on (a) the
seeded 80/10/10 test split and (b) 5-fold cross-validation over every row (each row predicted
by a model that never saw it). Measure on an otherwise idle machine: load between
measurements is label noise no model can predict. Writes benchmarks/results/host_predictor.json.

    python benchmarks/host_predictor.py [--archs 150] [--work runs/host_predictor]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from mosc.search.predictor import fit, fit_eval, metrics, read_db  # noqa: E402

MODELS = ("lsq", "gbt", "hybrid", "mlp")


def measure(work: Path, n: int, seed: int) -> dict:
    from mosc.jobs.artifacts import ArtifactCache, ModelSource, load_space, sample_archs
    from mosc.device.db import LatencyDB
    from mosc.device.campaign import Campaign
    from mosc.compiler.targets import load_target

    tg = load_target("host")
    source = ModelSource(space="tiny", mode="neuron", seed=seed)
    archs = sample_archs(load_space(source), n, seed)
    cache = ArtifactCache(tg, source, root=work / "artifacts", tune=False, tune_db=work / "tune-db-empty",
                          log=lambda m: print(m, flush=True))
    t0 = time.perf_counter()
    with LatencyDB(work / "latency.db") as db:
        res = Campaign(tg, "tvm", db, log=lambda m: print(m, flush=True), source="benchmarks/host_predictor.py").run(
            archs, lambda a: cache.prepare(a, "tvm"))
    return {"archs": n, "new": len(res.measured), "skipped": len(res.skipped),
            "seconds": round(time.perf_counter() - t0, 1)}


def cross_val(data, model: str, k: int, seed: int, space) -> dict:
    idx = list(range(len(data)))
    random.Random(seed).shuffle(idx)
    pred = np.zeros(len(data))
    for f in range(k):
        test = idx[f::k]
        train = [i for i in idx if i not in set(test)]
        p = fit(data.subset(train), model=model, seed=seed, space=space)
        sub = data.subset(test)
        pred[test] = p.predict_features(sub.features, sub.archs)
    return metrics(data.latency_ms, pred)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", type=int, default=150)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "host_predictor")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "host_predictor.json")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    from mosc.space import SearchSpace

    m = measure(a.work, a.archs, a.seed)
    sp = SearchSpace.load("tiny")
    data = read_db(a.work / "latency.db", "host", "tiny", backend="tvm")
    from mosc.device.db import LatencyDB

    with LatencyDB(a.work / "latency.db") as db:
        rows = db.query("host", backend="tvm")
        rel_std = [r["std_ms"] / r["median_ms"] for r in rows]
        noisy = sum('"noisy"' in (r["extra"] or "") for r in rows)
    out = {"benchmark": "host_predictor", "measure": m, "rows": len(data),
           "latency_ms": {"min": float(data.latency_ms.min()), "median": float(np.median(data.latency_ms)),
                          "max": float(data.latency_ms.max())},
           "label_noise": {"median_rel_std": float(np.median(rel_std)), "max_rel_std": float(max(rel_std)),
                           "noisy_rows": noisy},
           "models": {}}
    print(f"\n{len(data)} host rows, latency {data.latency_ms.min():.2f}..{data.latency_ms.max():.2f} ms; per-row "
          f"std/median: median {np.median(rel_std):.1%}, max {max(rel_std):.1%}; {noisy} flagged noisy")
    print(f"{'model':8} {'test MAPE':>10} {'test ±10%':>10} {'test tau':>9} | {'5-fold MAPE':>11} {'5-fold ±10%':>11} "
          f"{'5-fold tau':>10}")
    for model in MODELS:
        _, test = fit_eval(data, model=model, seed=a.seed, space=sp)
        cv = cross_val(data, model, 5, a.seed, sp)
        out["models"][model] = {"test": test, "cv5": cv}
        tau = lambda d: float("nan") if d["kendall_tau"] is None else d["kendall_tau"]  # noqa: E731
        print(f"{model:8} {test['mape']:10.2%} {test['within_10pct']:10.1%} {tau(test):9.3f} | {cv['mape']:11.2%} "
              f"{cv['within_10pct']:11.1%} {tau(cv):10.3f}")
    a.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

"""Speed of HAT's default evolutionary search (population 125, 25 parents, 50 mutations p=0.3,
50 crossovers, 30 generations) on the tiny space, with a cached fitness (goal < 30 s).

Fitness: a cheap synthetic loss (decreasing in MACs), cached per arch hash, standing in for
precomputed supernet losses. Latency: (a) the analytic cost directly, (b) a fitted lsq
predictor, (c) a fitted hybrid (lsq + xgboost) predictor, each called per arch as the search
does. Also times the NSGA-II --pareto mode with (c). Writes benchmarks/results/search_speed.json.

    python benchmarks/search_speed.py
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from mosc.search.predictor import Dataset, Shapes, component_costs, fit  # noqa: E402
from mosc.search.evolve import Cached, EvoConfig, evolve, pareto_search  # noqa: E402
from mosc.space import SearchSpace  # noqa: E402

SP = SearchSpace.load("tiny")
SH = Shapes(qkv_dim=SP.qkv_dim, vocab=1000)


def macs(a) -> float:
    return sum(v for k, v in component_costs(a.hat_features(), SH).items() if k.startswith("macs_"))


def analytic_ms(a) -> float:
    return 0.5 + macs(a) / 2e7


def loss(a) -> float:
    return 5.0 - 0.4 * math.log(macs(a))


def main() -> None:
    rng = random.Random(0)
    archs = list({a.hash: a for a in (SP.sample(rng) for _ in range(300))}.values())
    data = Dataset(np.array([a.hat_features() for a in archs]), archs,
                   np.array([analytic_ms(a) * (1 + 0.02 * rng.gauss(0, 1)) for a in archs]), "synthetic", "synth", "tiny")
    preds = {"analytic": analytic_ms, "lsq": fit(data, model="lsq", space=SP).latency,
             "hybrid": fit(data, model="hybrid", space=SP).latency}
    limit = analytic_ms(SP.smallest()) + 0.4 * (analytic_ms(SP.largest()) - analytic_ms(SP.smallest()))
    cfg = EvoConfig()
    out = {"benchmark": "search_speed", "space": "tiny", "config": cfg.__dict__, "constraint_ms": limit, "runs": {}}
    for name, lat in preds.items():
        t0 = time.perf_counter()
        r = evolve(SP, Cached(loss), lat, limit, cfg)
        s = time.perf_counter() - t0
        out["runs"][f"evolve/{name}"] = {"seconds": round(s, 3), "archs_scored": r.evaluated,
                                         "best_loss": r.best.loss, "best_latency_ms": r.best.latency_ms}
        print(f"evolve, latency={name:8s}: {s:6.2f} s, {r.evaluated} archs scored, best loss {r.best.loss:.4f} "
              f"at {r.best.latency_ms:.2f} ms (constraint {limit:.2f})")
    t0 = time.perf_counter()
    r = pareto_search(SP, Cached(loss), preds["hybrid"], None, cfg)
    s = time.perf_counter() - t0
    out["runs"]["pareto/hybrid"] = {"seconds": round(s, 3), "archs_scored": r.evaluated, "front_size": len(r.front)}
    print(f"pareto, latency=hybrid  : {s:6.2f} s, {r.evaluated} archs scored, front of {len(r.front)}")
    out["goal_s"] = 30
    out["all_under_goal"] = all(v["seconds"] < 30 for v in out["runs"].values())
    p = ROOT / "benchmarks" / "results" / "search_speed.json"
    p.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    print(f"wrote {p}")


if __name__ == "__main__":
    main()

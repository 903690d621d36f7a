"""Measurement overhead: archs per minute locally and over RPC on 127.0.0.1, and run-to-run noise.

    .venv/bin/python benchmarks/measure_overhead.py            # ~2-3 min on 2 busy cores
    .venv/bin/python benchmarks/measure_overhead.py --archs 6 --rounds 8

Setup: `tiny` space archs (random-init supernet: latency does not depend on weights),
artifacts built with --no-tune (an EMPTY tuning database, so TVM's CPU code is unscheduled:
absolute latencies are those of untuned code; this benchmark is about the measuring
machinery, not about speed). The host target's [protocol] (30-token source, 30 decoder
steps, batch 1, 5 warm-up + 50 timed runs), one TVM thread.

Reported:
  * throughput (archs/minute) of the measuring loop, artifacts already built (build time is
    `mosc compile`'s business): locally (tvm.cpu) and over RPC (a tracker + server on
    127.0.0.1, one session per arch: connect, upload, load, measure);
  * coefficient of variation (std / mean) of the trimmed mean across `--rounds` repeated
    measurements of the same artifact on this host, and the median within-run CV.
Results: a rich table and benchmarks/results/measure_overhead.json (no binaries).
"""

from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", type=int, default=4, help="archs measured for the throughput numbers")
    ap.add_argument("--rounds", type=int, default=6, help="repeated measurements of one artifact (CV)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/measure_overhead.json")
    args = ap.parse_args()

    from rpc_helpers import rpc_device

    from mosc.jobs.artifacts import ArtifactCache, ModelSource, sample_archs
    from mosc.compiler.artifact import load_artifact
    from mosc.device.db import LatencyDB
    from mosc.device.backends import measure_tvm
    from mosc.device.campaign import Campaign
    from mosc.rpc import Remote
    from mosc.space import SearchSpace
    from mosc.compiler.targets import load_target

    console = Console()
    target = load_target("host")
    work = Path(tempfile.mkdtemp(prefix="mosc-measure-bench-"))
    archs = sample_archs(SearchSpace.load("tiny"), args.archs, 0)
    cache = ArtifactCache(target, ModelSource(), root=work / "cache", tune=False, tune_db=work / "tune",
                          log=lambda m: None)
    t0 = time.perf_counter()
    preps = {a.hash: cache.prepare(a, "tvm") for a in archs}
    build_s = time.perf_counter() - t0
    console.print(f"built {len(archs)} untuned artifacts in {build_s:.0f} s (not counted below)")

    results = {}

    def campaign(remote):
        with LatencyDB(work / f"{'rpc' if remote else 'local'}.db") as db:
            camp = Campaign(target, "tvm", db, remote=remote, log=lambda m: None)
            t = time.perf_counter()
            res = camp.run(archs, lambda a: preps[a.hash])
            dt = time.perf_counter() - t
        lat = [r["trimmed_mean_ms"] for r in res.measured]
        return {"archs": len(res.measured), "seconds": round(dt, 2), "archs_per_min": round(60 * len(lat) / dt, 1),
                "mean_latency_ms": round(float(np.mean(lat)), 3),
                "timed_ms_per_arch": round(float(np.mean([r["mean_ms"] * r["runs"] for r in res.measured])), 1)}

    results["local"] = campaign(None)
    with rpc_device("bench") as (port, _):
        results["rpc_127.0.0.1"] = campaign(Remote("127.0.0.1", port, "bench"))

    art = load_artifact(preps[archs[0].hash].artifact)
    means, cvs = [], []
    for _ in range(args.rounds):
        m = measure_tvm(art, target.protocol)
        means.append(m.stats["trimmed_mean_ms"])
        cvs.append(m.stats["std_ms"] / m.stats["mean_ms"])
    results["repeatability"] = {
        "arch": archs[0].hash, "rounds": args.rounds, "trimmed_means_ms": [round(x, 4) for x in means],
        "cv_of_trimmed_mean": round(float(np.std(means, ddof=1) / np.mean(means)), 4),
        "median_within_run_cv": round(float(np.median(cvs)), 4),
    }
    p = target.protocol
    out = {
        "what": "mosc measure overhead: tiny space, --no-tune artifacts (empty tuning DB: unscheduled CPU code)",
        "protocol": {k: getattr(p, k) for k in ("source_len", "decoder_steps", "batch", "warmup", "repeats", "trim")},
        "host": {"machine": platform.machine(), "cpus": len(os.sched_getaffinity(0)),
                 "note": "shared 2-core machine, other jobs running; TVM_NUM_THREADS=1"},
        "build_seconds_not_counted": round(build_s, 1),
        **results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")

    t = Table(title="measurement overhead (host target protocol, untuned tiny artifacts)")
    for c in ("where", "archs", "seconds", "archs/min", "mean latency ms", "timed work ms/arch"):
        t.add_column(c, justify="right" if c != "where" else "left")
    for k in ("local", "rpc_127.0.0.1"):
        r = results[k]
        t.add_row(k, str(r["archs"]), f"{r['seconds']:.1f}", f"{r['archs_per_min']:.1f}", f"{r['mean_latency_ms']:.2f}",
                  f"{r['timed_ms_per_arch']:.0f}")
    console.print(t)
    rep = results["repeatability"]
    console.print(f"repeatability of arch {rep['arch']} over {rep['rounds']} measurements: trimmed means "
                  f"{', '.join(f'{x:.3f}' for x in rep['trimmed_means_ms'])} ms -> CV {100 * rep['cv_of_trimmed_mean']:.2f}%"
                  f" (median within-run CV {100 * rep['median_within_run_cv']:.1f}%)")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

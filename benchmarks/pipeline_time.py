"""Wall time of the main job on the built-in default (`mosc demo`; goal < 10 min on
2 cores), per stage, as on a fresh machine: empty artifact cache and an empty MetaSchedule
tuning database (both in a temporary folder), so nothing is reused from earlier runs.

Also records what the run produced: the BLEU and measured latency of the checked front archs,
the winner's compiled artifact latency and the translations. Run it on an otherwise idle
machine (every stage is CPU bound; a concurrent job slows torch training many times over).
Writes benchmarks/results/pipeline_time.json (--out to change).

    python benchmarks/pipeline_time.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "pipeline_time.json")
    ap.add_argument("--keep", type=Path, default=None, help="run in this folder (kept) instead of a temporary one")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="mosc-pipeline-time-") as tmp:
        work = args.keep or Path(tmp)
        os.environ["MOSC_ARTIFACT_CACHE"] = str(work / "artifact-cache")  # nothing prebuilt
        from mosc.pipeline import PipelineConfig, run_pipeline

        cfg = PipelineConfig(tune_db=str(work / "tune-db"))  # the default, with an empty tuning DB
        s = run_pipeline(cfg, work / "demo", Console(stderr=True))

    total = s["total_seconds"]
    res = {
        "benchmark": "pipeline_time", "config": "mosc demo (examples/tiny.toml), empty artifact cache and tuning DB",
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "total_seconds": total, "stage_seconds": s["stage_seconds"],
        "stage_share": {k: round(v / total, 3) for k, v in s["stage_seconds"].items()},
        "train": s["train"], "tune": s["tune"], "measure": {k: s["measure"][k] for k in ("archs", "label", "median_ms", "latency_ms")},
        "predictor": {k: s["predictor"][k] for k in ("model", "rows", "in_sample", "held_out")},
        "search": s["search"], "checked": [r for r in s["front"] if r["bleu"] is not None],
        "front_size": len(s["front"]), "winner_artifact": s["winner_artifact"],
        "compile": s["compile"], "translations": s["translate"]["sentences"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")

    t = Table("stage", "seconds", "share", title=f"mosc demo from scratch: {total:.1f} s ({total / 60:.1f} min)")
    for k, v in s["stage_seconds"].items():
        t.add_row(k, f"{v:.1f}", f"{v / total:.0%}")
    Console().print(t)
    c = Table("arch", "val loss", "BLEU", "predicted ms", "measured ms", title="checked front archs")
    for r in res["checked"]:
        c.add_row(("* " if r["winner"] else "  ") + r["arch_hash"], f"{r['loss']:.4f}", f"{r['bleu']:.2f}",
                  f"{r['predicted_ms']:.2f}", f"{r['measured_ms']:.2f}")
    Console().print(c)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

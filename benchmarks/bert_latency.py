"""Latency of one classification with a BERT encoder on `host`: TVM vs ONNX Runtime vs PyTorch eager.

    .venv/bin/python benchmarks/bert_latency.py               # bert-tiny smallest/largest, seq 16 and 32
    .venv/bin/python benchmarks/bert_latency.py --runs 200    # more rounds
    # also from a space-tuned database (tuned first: mosc tune -t host --space bert-tiny
    # --vocab-size 4001 --seq-len 64), at the BERT pipeline's shape:
    .venv/bin/python benchmarks/bert_latency.py --vocab 4001 --seq 64 --tune-db ~/.cache/mosc/tune/host-<cpu>

Per model: collapse a randomly initialised bert-tiny supernet (vocab 500 by default, 2 classes;
latency does not depend on weight values), export the classifier graph (batch 1, checked
against torch), compile for host without tuning (an empty database: mosc's default CPU
schedules, the build a fresh target gets; with --tune-db, a second build from that database's
records, as the pipeline's compile stage does), check TVM == ORT, then time the backends with
mosc.jobs.bert_deploy.classifier_latency (interleaved rounds, median, one thread each).
Results: a table on stdout and benchmarks/results/bert_latency.json (one row per model, length
and build; `schedule_coverage` says how many functions came from database records, and `tuned`
how many of those are tuned candidates rather than the default schedule's own record: the tuner
records each workload's default schedule, measured alike, so a tuned record is applied only where
it measured faster; see mosc.compiler.tune.commit_default_schedules).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mosc.bert_space import BertSpace  # noqa: E402
from mosc.compiler.artifact import load_artifact, schedule_coverage  # noqa: E402
from mosc.compiler.targets import load_target  # noqa: E402
from mosc.jobs.bert_deploy import classifier_latency  # noqa: E402
from mosc.jobs.build import compile_export  # noqa: E402
from mosc.nn.bert import BertConfig, BertSupernet, collapse_bert  # noqa: E402
from mosc.nn.bert_export import ClassifierShapes, export_classifier  # noqa: E402
from mosc.runtime import artifact_classifier, ort_classifier  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=100, help="timed rounds per model (default 100)")
    ap.add_argument("--seq", type=int, nargs="+", default=[16, 32], help="sequence lengths (default 16 32)")
    ap.add_argument("--vocab", type=int, default=500, help="model vocabulary (default 500; the BERT pipeline's: 4001)")
    ap.add_argument("--tune-db", type=Path, default=None,
                    help="also build from this tuning database (its records, tune=False) and time that build; "
                         "tune the space at the same --vocab and --seq first (mosc tune --space bert-tiny)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bert_latency.json",
                    help="results JSON (default benchmarks/results/bert_latency.json)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    space = BertSpace.load("bert-tiny")
    sup = BertSupernet(BertConfig(space=space.to_dict(), vocab_size=args.vocab)).eval()
    host = load_target("host")
    builds = {"default": None, **({"tuned": args.tune_db.expanduser()} if args.tune_db else {})}
    rows = []
    with tempfile.TemporaryDirectory(prefix="mosc-bert-bench-") as tmp:
        for name, arch in (("smallest", space.smallest()), ("largest", space.largest())):
            enc = collapse_bert(sup, arch).with_classifier(2).eval()
            for T in args.seq:
                work = Path(tmp) / f"{name}-{T}"
                meta = export_classifier(enc, work / "onnx", ClassifierShapes(1, T))
                for build, db in builds.items():
                    t0 = time.perf_counter()
                    c = compile_export(work / "onnx", host, work / f"art-{build}", tune=False,
                                       tune_db=db or work / "db")
                    compile_s = time.perf_counter() - t0
                    cov = schedule_coverage(c.manifest)
                    # of the functions from records, those from tuned candidates (the rest replay the
                    # default schedule's record, which the tuner keeps as the yardstick)
                    cov["tuned"] = sum(g.get("tuned", 0) for g in (c.manifest["tuning"].get("coverage") or {}).values())
                    tokens = np.full((1, T), 7, np.int64)
                    tokens[0, 0] = 1
                    diff = float(np.abs(artifact_classifier(load_artifact(c.path)).run(tokens)
                                        - ort_classifier(work / "onnx").run(tokens)).max())
                    r = classifier_latency(c.path, work / "onnx", enc, runs=args.runs)
                    rows.append({"model": name, "arch": arch.to_dict(), "seq_len": T, "vocab_size": args.vocab,
                                 "build": build, "tune_db": str(db) if db else None, "schedule_coverage": cov,
                                 "param_count": meta["param_count"],
                                 "ort_vs_torch_max_abs_diff": meta["parity"]["classifier_max_abs_diff"],
                                 "tvm_vs_ort_max_abs_diff": diff, "compile_s": round(compile_s, 2), **r})
                    lat = r["latency"]
                    print(f"{name:8s} T={T:3d} {build:7s} tvm {lat['tvm']['median_ms']:.3f} ms  "
                          f"ort {lat['ort']['median_ms']:.3f} ms  torch {lat['torch']['median_ms']:.3f} ms  "
                          f"tvm/ort {lat['tvm']['median_ms'] / lat['ort']['median_ms']:.2f}  "
                          f"({cov['from_database']}/{cov['functions']} functions from records, {cov['tuned']} tuned, |tvm-ort| {diff:.1e}, "
                          f"compile {compile_s:.1f} s)")
    out = args.out
    out.write_text(json.dumps({"runs": args.runs, "vocab_size": args.vocab, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Latency of one classification with a BERT encoder on `host`: TVM vs ONNX Runtime vs PyTorch eager.

    .venv/bin/python benchmarks/bert_latency.py               # bert-tiny smallest/largest, seq 16 and 32
    .venv/bin/python benchmarks/bert_latency.py --runs 200    # more rounds

Per model: collapse a randomly initialised bert-tiny supernet (vocab 500, 2 classes; latency
does not depend on weight values), export the classifier graph (batch 1, checked against
torch), compile for host without tuning (an empty database: mosc's default CPU schedules, the
build a fresh target gets), check TVM == ORT, then time the three backends with
mosc.jobs.bert_deploy.classifier_latency (interleaved rounds, median, one thread each).
Results: a table on stdout and benchmarks/results/bert_latency.json.
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
from mosc.compiler.artifact import load_artifact  # noqa: E402
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
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    space = BertSpace.load("bert-tiny")
    sup = BertSupernet(BertConfig(space=space.to_dict(), vocab_size=500)).eval()
    host = load_target("host")
    rows = []
    with tempfile.TemporaryDirectory(prefix="mosc-bert-bench-") as tmp:
        for name, arch in (("smallest", space.smallest()), ("largest", space.largest())):
            enc = collapse_bert(sup, arch).with_classifier(2).eval()
            for T in args.seq:
                work = Path(tmp) / f"{name}-{T}"
                meta = export_classifier(enc, work / "onnx", ClassifierShapes(1, T))
                t0 = time.perf_counter()
                c = compile_export(work / "onnx", host, work / "art", tune=False, tune_db=work / "db")
                compile_s = time.perf_counter() - t0
                tokens = np.full((1, T), 7, np.int64)
                tokens[0, 0] = 1
                diff = float(np.abs(artifact_classifier(load_artifact(c.path)).run(tokens)
                                    - ort_classifier(work / "onnx").run(tokens)).max())
                r = classifier_latency(c.path, work / "onnx", enc, runs=args.runs)
                rows.append({"model": name, "arch": arch.to_dict(), "seq_len": T, "param_count": meta["param_count"],
                             "ort_vs_torch_max_abs_diff": meta["parity"]["classifier_max_abs_diff"],
                             "tvm_vs_ort_max_abs_diff": diff, "compile_s": round(compile_s, 2), **r})
                lat = r["latency"]
                print(f"{name:8s} T={T:3d}  tvm {lat['tvm']['median_ms']:.3f} ms  ort {lat['ort']['median_ms']:.3f} ms  "
                      f"torch {lat['torch']['median_ms']:.3f} ms  (|tvm-ort| {diff:.1e}, compile {compile_s:.1f} s)")
    out = REPO / "benchmarks" / "results" / "bert_latency.json"
    out.write_text(json.dumps({"runs": args.runs, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

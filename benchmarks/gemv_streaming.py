"""A decoder step's matrix-vector products, warm and cold: mosc's streamed GEMV vs the register tile vs onnxruntime.

    .venv/bin/python benchmarks/gemv_streaming.py            # 6 shapes, ~2 min
    .venv/bin/python benchmarks/gemv_streaming.py --quick    # 2 shapes

A decoder step multiplies one token's vector by every weight matrix of the model once, so in
a model each weight arrives from L3 or DRAM, never from the L1/L2 that back-to-back calls of
one kernel leave it in. For y[1,N] = x[1,K] @ W[K,N] + b (K-major W, what PREPARE leaves for a
Linear weight) this times, side by side in one run, 1 thread:
    streamed       mosc's default schedule (mosc.compiler.schedules._stream_gemv): k outside n,
                   GEMV_ROWS rows of W per pass, W read once front to back
    register tile  the same default with streaming switched off (GEMV_STREAM_MIN raised): N
                   strips outside k, accumulators in registers (what M > 1 matmuls get)
    onnxruntime    a MatMul + Add graph (MLAS)
  warm: the same W every call (it stays in L2/L3 when it fits);
  cold: the call rotates through copies of W totalling >= 400 MB (> the 32 MB L3), so every
        call reads its W from DRAM, as a decoder step of a `wmt` model does.
Each: best of 5 rounds of the per-call mean. Prints a table; writes
benchmarks/results/gemv_streaming.json. What it does NOT do: fuse epilogues other than the
bias, time more than one thread, or tune anything (records replace these defaults only where
a tuning candidate measured faster, cold: mosc.compiler.tune._evaluator_config).
"""

from __future__ import annotations

import os

os.environ["TVM_NUM_THREADS"] = "1"  # before tvm is imported
os.environ["OMP_NUM_THREADS"] = "1"

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHAPES = [(512, 512), (512, 2048), (2048, 512), (512, 8000), (640, 3072), (256, 1024)]  # (K, N): wmt/tiny decoder Linears
QUICK_SHAPES = [(512, 512), (512, 8000)]
COLD_BYTES = 400e6  # the rotation's total: > L3, so each call reads DRAM
ROUNDS = 5
WARM_CALLS = 200


def gemv_func(k: int, n: int):
    from tvm import te

    a = te.placeholder((1, k), "float32", name="A")
    w = te.placeholder((k, n), "float32", name="W")
    b = te.placeholder((n,), "float32", name="bias")
    r = te.reduce_axis((0, k), name="k")
    c = te.compute((1, n), lambda i, j: te.sum(a[i, r] * w[r, j], axis=r), name="matmul")
    out = te.compute((1, n), lambda i, j: c[i, j] + b[j], name="T_add")
    return te.create_prim_func([a, w, b, out])


def build_default(k: int, n: int, target, streamed: bool):
    import tvm

    from mosc.compiler import schedules

    saved = schedules.GEMV_STREAM_MIN
    schedules.GEMV_STREAM_MIN = saved if streamed else 1 << 62
    try:
        func, rule = schedules.schedule_func(gemv_func(k, n), target)
    finally:
        schedules.GEMV_STREAM_MIN = saved
    assert rule == "matmul"
    return tvm.compile(tvm.IRModule({"main": func}), target=target)["main"]


def per_call_us(call, calls: int) -> float:
    best = float("inf")
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        for i in range(calls):
            call(i)
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def ort_session(weights: list[np.ndarray], bias: np.ndarray):
    """One graph with a MatMul + Add per weight copy, all on the same input: a run calls each once."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k, n = weights[0].shape
    nodes, inits, outs = [], [numpy_helper.from_array(bias, "b")], []
    for r, w in enumerate(weights):
        inits.append(numpy_helper.from_array(w, f"W{r}"))
        nodes += [helper.make_node("MatMul", ["x", f"W{r}"], [f"m{r}"]), helper.make_node("Add", [f"m{r}", "b"], [f"y{r}"])]
        outs.append(helper.make_tensor_value_info(f"y{r}", TensorProto.FLOAT, [1, n]))
    graph = helper.make_graph(nodes, "gemv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])], outs, inits)
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def one_shape(k: int, n: int, target) -> dict:
    import tvm

    rng = np.random.default_rng(0)
    copies = max(4, int(COLD_BYTES // (k * n * 4)))
    x = rng.standard_normal((1, k)).astype("float32")
    ws = [rng.standard_normal((k, n)).astype("float32") for _ in range(copies)]
    bias = rng.standard_normal(n).astype("float32")
    ref = x @ ws[0] + bias
    xa, ba = tvm.runtime.tensor(x), tvm.runtime.tensor(bias)
    wa = [tvm.runtime.tensor(w) for w in ws]
    out = tvm.runtime.tensor(np.zeros((1, n), "float32"))
    row = {"k": k, "n": n, "weight_mb": k * n * 4 / 1e6, "cold_copies": copies}
    for name, streamed in (("streamed", True), ("register tile", False)):
        f = build_default(k, n, target, streamed)
        f(xa, wa[0], ba, out)
        err = float(np.abs(out.numpy() - ref).max())
        warm = per_call_us(lambda i: f(xa, wa[0], ba, out), WARM_CALLS)
        cold = per_call_us(lambda i: f(xa, wa[i % copies], ba, out), 3 * copies)
        row[name] = {"warm_us": warm, "cold_us": cold, "max_abs_err": err}
    one, many = ort_session(ws[:1], bias), ort_session(ws, bias)
    assert np.abs(one.run(None, {"x": x})[0] - ref).max() < 1e-3
    row["onnxruntime"] = {"warm_us": per_call_us(lambda i: one.run(None, {"x": x}), WARM_CALLS),
                          "cold_us": per_call_us(lambda i: many.run(None, {"x": x}), 3) / copies}
    for name in ("streamed", "register tile", "onnxruntime"):
        row[name]["cold_gb_per_s"] = k * n * 4 / row[name]["cold_us"] / 1e3
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 shapes")
    ap.add_argument("--out", type=Path, default=None, help="JSON output path")
    args = ap.parse_args(argv)

    import tvm
    from rich.console import Console
    from rich.table import Table

    from mosc.compiler.targets import load_target

    base = load_target("host")
    spec = {**base.resolved_spec(), "num-cores": 1}
    target = tvm.target.Target(spec)
    console = Console(width=160)
    t0 = time.perf_counter()
    rows = [one_shape(k, n, target) for k, n in (QUICK_SHAPES if args.quick else SHAPES)]
    table = Table(title="y[1,N] = x[1,K] @ W[K,N] + b, 1 thread, us per call (warm / cold from DRAM)")
    for col in ["K x N", "MB", "streamed", "register tile", "onnxruntime", "streamed / ORT cold", "streamed / tile cold"]:
        table.add_column(col, justify="right")
    for r in rows:
        cells = [f"{r[v]['warm_us']:.1f} / {r[v]['cold_us']:.1f}" for v in ("streamed", "register tile", "onnxruntime")]
        table.add_row(f"{r['k']} x {r['n']}", f"{r['weight_mb']:.1f}", *cells,
                      f"{r['streamed']['cold_us'] / r['onnxruntime']['cold_us']:.2f}",
                      f"{r['streamed']['cold_us'] / r['register tile']['cold_us']:.2f}")
    console.print(table)
    out = args.out or REPO / "benchmarks" / "results" / ("gemv_streaming_quick.json" if args.quick else "gemv_streaming.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "gemv_streaming", "threads": 1, "tvm_target": spec, "rounds": ROUNDS,
                               "warm_calls": WARM_CALLS, "cold_bytes": COLD_BYTES, "rows": rows,
                               "machine": platform.processor() or platform.machine(), "tvm": tvm.__version__,
                               "total_seconds": time.perf_counter() - t0}, indent=2) + "\n")
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

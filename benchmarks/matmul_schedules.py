"""Kernel anchors for space tuning: how fast can TVM 0.27 run mosc's matmuls on this CPU?

Three Linear layers exported to ONNX and imported the way `mosc compile` imports them
(mosc.compiler.passes.PREPARE), timed side by side in one run, 1 thread everywhere:
    gemv   [1,512] x [512,8000] + bias   the vocabulary projection of one decoder step
    ffn    [30,512] x [512,2048] + bias  an encoder FFN matmul (30 source tokens)
Variants: onnxruntime, torch F.linear, TVM unscheduled, TVM with dlight's CPU GEMV rule
(after FuseTransposeMatmul, which is what it takes for the rule to match at all), and TVM
with a hand-written outer-reduction schedule of the fused PrimFunc exactly as PREPARE leaves
it (K-major weight: vectorise along N, keep an I x N tile of accumulators in registers), and
TVM with mosc's default schedules (mosc.compiler.schedules.apply_default_schedules: what a
build without a tuning record gets).

Why: dlight's CPU GEMV rule only schedules inner reductions (s_tir/dlight/cpu/gemv.py gives
up on the outer-reduction case), and PREPARE's FoldConstant leaves the weight K-major, which is
the outer-reduction layout. Prints a table; writes benchmarks/results/matmul_schedules.json.

    python benchmarks/matmul_schedules.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ["TVM_NUM_THREADS"] = "1"  # before tvm is imported
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {"gemv": (1, 512, 8000), "ffn": (30, 512, 2048)}  # M, K, N
TILES = {"gemv": (1, 64), "ffn": (6, 64)}  # hand schedule: rows x columns of accumulators


def export(path: Path, m: int, k: int, n: int) -> None:
    import torch

    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n)
    torch.onnx.export(lin, (torch.randn(m, k),), str(path), input_names=["x"], output_names=["y"],
                      opset_version=17, dynamo=False)


def prepared(path: Path, target, transpose_matmul: bool = False):
    from tvm import relax

    from mosc.compiler.passes import PREPARE, import_onnx

    passes = list(PREPARE)
    if transpose_matmul:  # W^T @ x as one NT_matmul: the inner-reduction layout dlight's GEMV wants
        at = [name for name, _ in passes].index("legalize_ops")
        passes.insert(at, ("fuse_transpose_matmul", lambda: relax.transform.FuseTransposeMatmul()))
    mod = import_onnx(path)
    with target:
        for _, make in passes:
            mod = make()(mod)
    return mod


def outer_reduction(func, ti: int, tn: int):
    """[M,K] x [K,N] (+ bias): N tiles outside, then I tiles, K, then the I x N tile (I unrolled,
    N vectorised) so the accumulators stay in registers for the whole K loop."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    b = sch.get_sblock("matmul")
    i, n, k = sch.get_loops(b)
    n0, n1 = sch.split(n, [None, tn])
    i0, i1 = sch.split(i, [None, ti])
    sch.reorder(n0, i0, k, i1, n1)
    sch.vectorize(n1)  # before decompose_reduction: vectorising afterwards fails
    sch.unroll(i1)
    sch.decompose_reduction(b, k)
    epilogue = sch.get_sblock("T_add")
    sch.reverse_compute_at(epilogue, n0)
    sch.vectorize(sch.get_loops(epilogue)[-1])
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def scheduled(mod, kind: str, target, tile):
    from tvm import tirx
    from tvm.s_tir import dlight as dl

    if kind == "dlight-gemv":
        with target:
            mod = dl.ApplyDefaultSchedule(dl.cpu.GEMV())(mod)
    elif kind == "default":
        from mosc.compiler.schedules import apply_default_schedules

        mod = apply_default_schedules(mod, target)
    elif kind == "hand":
        for gv, fn in list(mod.functions_items()):
            if isinstance(fn, tirx.PrimFunc) and "matmul" in gv.name_hint:
                mod[gv] = outer_reduction(fn, *tile)
    flags = [bool(fn.attrs and fn.attrs.get("tirx.is_scheduled")) for _, fn in mod.functions_items()
             if isinstance(fn, tirx.PrimFunc)]
    return mod, all(flags)


def time_tvm(mod, target, x, ref, number, repeat) -> tuple[float, float]:
    import numpy as np
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    xa = tvm.runtime.tensor(x)
    err = float(np.abs(vm["main"](xa).numpy() - ref).max())
    te = vm.time_evaluator("main", tvm.cpu(), number=number, repeat=repeat)(xa)
    return statistics.median(te.results) * 1e3, err


def time_host(fn, number, repeat) -> float:
    fn()
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        runs.append((time.perf_counter() - t0) / number * 1e3)
    return statistics.median(runs)


def one_shape(name: str, work: Path, target, number: int, repeat: int) -> dict:
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    m, k, n = SHAPES[name]
    path = work / f"{name}.onnx"
    export(path, m, k, n)
    x = np.random.default_rng(0).standard_normal((m, k)).astype("float32")
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ref = sess.run(None, {"x": x})[0]
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    w = torch.from_numpy(next(v for v in inits.values() if v.ndim == 2).copy())
    b = torch.from_numpy(next(v for v in inits.values() if v.ndim == 1).copy())
    w = w if w.shape == (n, k) else w.T.contiguous()
    xt = torch.from_numpy(x)
    rows = {"onnxruntime": {"ms": time_host(lambda: sess.run(None, {"x": x}), number, repeat)}}
    with torch.no_grad():
        rows["torch"] = {"ms": time_host(lambda: torch.nn.functional.linear(xt, w, b), number, repeat)}
    for label, transpose, kind in [("tvm unscheduled", False, "none"), ("tvm dlight GEMV", True, "dlight-gemv"),
                                   ("tvm hand outer-reduction", False, "hand"),
                                   ("tvm default schedule", False, "default")]:
        mod, all_scheduled = scheduled(prepared(path, target, transpose), kind, target, TILES[name])
        ms, err = time_tvm(mod, target, x, ref, number, repeat)
        rows[label] = {"ms": ms, "max_abs_err": err, "scheduled": all_scheduled}
    ort_ms = rows["onnxruntime"]["ms"]
    for r in rows.values():
        r["over_ort"] = r["ms"] / ort_ms
    return {"shape": {"m": m, "k": k, "n": n}, "rows": rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer timed calls (a smoke run)")
    args = ap.parse_args()
    import torch
    import tvm
    from rich.console import Console
    from rich.table import Table
    from tvm.target import codegen

    torch.set_num_threads(1)
    cpu = codegen.llvm_get_system_cpu()
    target = tvm.target.Target({"kind": "llvm", "mcpu": cpu, "num-cores": 1})
    number, repeat = (10, 3) if args.quick else (50, 5)
    work = Path(tempfile.mkdtemp(prefix="mosc-matmul-"))
    results = {name: one_shape(name, work, target, number, repeat) for name in SHAPES}
    t = Table(title=f"matmul kernels, 1 thread, {cpu} (median ms; ratio to onnxruntime)")
    t.add_column("variant")
    for name, r in results.items():
        t.add_column(f"{name} {r['shape']['m']}x{r['shape']['k']}x{r['shape']['n']}", justify="right")
    for label in results["gemv"]["rows"]:
        cells = []
        for r in results.values():
            row = r["rows"][label]
            flag = "" if row.get("scheduled", True) else " (unscheduled)"
            cells.append(f"{row['ms']:.3f} ({row['over_ort']:.2f}x){flag}")
        t.add_row(label, *cells)
    Console().print(t)
    out = ROOT / "benchmarks" / "results" / "matmul_schedules.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": cpu, "machine": platform.node(), "threads": 1, "number": number,
                               "repeat": repeat, "tvm": tvm.__version__, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

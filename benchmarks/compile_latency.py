"""Latency of one translation on `host`: PyTorch eager vs ONNX Runtime vs TVM (untuned, tuned).

    .venv/bin/python benchmarks/compile_latency.py                 # default budget, ~25 min on 2 busy cores
    .venv/bin/python benchmarks/compile_latency.py --quick         # 2 tiny archs, few trials: a smoke run
    .venv/bin/python benchmarks/compile_latency.py --trials 256    # more tuning per model

One translation = the encoder on a source of 30 tokens + 30 decoder steps with the
fixed-size KV cache (batch 1; greedy, fed back on the host; no early stop), the host
target's [protocol]. Models: the largest, smallest and a middle arch of the `tiny`
space, and the smallest and a middle arch of HAT's `wmt` space (random-init weights,
vocab 8000: latency does not depend on the values). "Middle" takes the upper-middle
choice of every dimension.

Per model: export (ONNX, checked against PyTorch), build TVM without tuning (an empty
database: TVM applies no CPU schedule), tune with MetaSchedule (`--trials` per model,
one database shared by all models, as `mosc compile` does per target), then time all
four backends side by side: each round runs every backend once (order rotating), the
number is the median over rounds. Every backend runs on ONE thread (torch, ORT intra-op,
TVM_NUM_THREADS=1 and a num-cores=1 target), so the numbers compare kernels, not
threading, and the other jobs on a shared machine disturb them less. The greedy tokens
of all four backends are compared (they must be equal).

Then: the compile time of a second subnet (a random `wmt` arch) against the warm
database, without and with tuning of the tasks the database lacks, and a per-kernel
profile of the tuned TVM translation (VM instrumentation: time per called function).

The tuning database lives in ~/.cache/mosc/tune-bench/ (never in the repository); it is
emptied at the start unless --keep-db. Results: a rich table on stdout and JSON in
benchmarks/results/compile_latency.json (compile_latency_quick.json with --quick).
"""

from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "1")  # before tvm is imported (threads of the TVM runtime)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import contextlib
import dataclasses
import json
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mosc.compiler.artifact import load_artifact, read_manifest  # noqa: E402
from mosc.compiler.build import compile_artifact  # noqa: E402
from mosc.nn.export import Shapes, export_subnet  # noqa: E402
from mosc.space import Arch, SearchSpace  # noqa: E402
from mosc.nn.subnet import Subnet, SubnetConfig  # noqa: E402
from mosc.compiler.targets import load_target  # noqa: E402
from mosc.contract import cache_shape, decoder_layers, load_export, onnx_files  # noqa: E402

BOS = 1
VOCAB = 8000
DB_ROOT = Path.home() / ".cache" / "mosc" / "tune-bench"
RESULTS = REPO / "benchmarks" / "results"
BACKENDS = ["torch", "ort", "tvm_untuned", "tvm_tuned"]


# ----------------------------------------------------------------------------- models
def middle(space: SearchSpace) -> Arch:
    """The upper-middle choice of every dimension (valid: arbitrary <= encoder layers)."""
    mid = lambda xs: sorted(xs)[len(xs) // 2]
    le, ld = mid(space.enc_layers), mid(space.dec_layers)
    return space.validate(Arch(
        enc_embed=mid(space.enc_embed), enc_ffn=(mid(space.enc_ffn),) * le, enc_heads=(mid(space.enc_heads),) * le,
        dec_embed=mid(space.dec_embed), dec_ffn=(mid(space.dec_ffn),) * ld, dec_heads=(mid(space.dec_heads),) * ld,
        dec_cross_heads=(mid(space.dec_cross_heads),) * ld, dec_arbitrary=(mid(space.arbitrary_choices(le)),) * ld,
    ))


def pick(space_name: str, which: str) -> Arch:
    space = SearchSpace.load(space_name)
    if which == "largest":
        return space.largest()
    if which == "smallest":
        return space.smallest()
    if which == "middle":
        return middle(space)
    if which.startswith("random"):
        return space.sample(random.Random(int(which.removeprefix("random") or 0)))
    raise ValueError(which)


def make_subnet(space_name: str, arch: Arch, seed: int = 0) -> Subnet:
    torch.manual_seed(seed)
    sub = Subnet(SubnetConfig(arch, VOCAB, SearchSpace.load(space_name).qkv_dim)).eval()
    with torch.no_grad():
        sub.embed.normal_(0.0, max(arch.enc_embed, arch.dec_embed) ** -0.5)  # Subnet starts with a zero embedding
    return sub


# ----------------------------------------------------------------------------- runners
# Each returns run() -> the 30 greedy tokens; one call = one timed translation.
def torch_runner(sub: Subnet, src: np.ndarray, T: int):
    src_t = torch.from_numpy(src)
    pos = [torch.tensor([t]) for t in range(T)]

    def run():
        with torch.inference_mode():
            cross = sub.encode(src_t)
            caches = sub.init_cache(src.shape[0], T)
            tok = torch.full((src.shape[0],), BOS, dtype=torch.long)
            out = []
            for t in range(T):
                logits, *caches = sub.decode_step(tok, pos[t], *caches, *cross)
                tok = logits.argmax(-1)
                out.append(int(tok[0]))
        return out

    return run


def ort_runner(export_dir: Path, src: np.ndarray, T: int, threads: int = 1):
    import onnxruntime as ort

    meta = load_export(export_dir)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    enc, dec = (ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
                for p in onnx_files(export_dir, meta).values())
    names = [s["name"] for s in meta["graphs"]["decoder_step"]["inputs"]]
    zeros = [np.zeros(cache_shape(meta["graphs"]), np.float32)] * (2 * decoder_layers(meta["graphs"]))
    pos = [np.array([t], np.int64) for t in range(T)]

    def run():
        cross = enc.run(None, {"src": src})
        caches = zeros
        tok = np.full((src.shape[0],), BOS, np.int64)
        out = []
        for t in range(T):
            logits, *caches = dec.run(None, dict(zip(names, [tok, pos[t], *caches, *cross])))
            tok = logits.argmax(-1)
            out.append(int(tok[0]))
        return out

    return run


def tvm_runner(art_dir: Path, src: np.ndarray, T: int):
    """The artifact's compiled greedy loop (its translate function), one VM call per translation,
    eos disabled: exactly T steps, as the other runners."""
    import tvm

    art = load_artifact(art_dir)
    translate = art.vm[art.function("translate")]
    dev = art.device
    args = [tvm.runtime.tensor(x, dev) for x in (src, np.array([T], np.int64), np.array([-1], np.int64))]

    def run():
        return translate(*args).numpy()[0, :T].tolist()

    return run, art


def profile_table(title: str, profile: dict):
    """profile_tvm's top kernels as a rich table: kernel, calls, ms, share of kernel time."""
    from rich.table import Table

    pt = Table(title=title)
    for col in ["kernel", "calls", "ms", "share"]:
        pt.add_column(col, justify="left" if col == "kernel" else "right")
    for k in profile["top"]:
        pt.add_row(k["kernel"], str(k["calls"]), f"{k['ms']:.2f}", f"{k['share_of_kernels']:.0%}")
    return pt


@contextlib.contextmanager
def bytecode_vm():
    """Builds inside run the Relax VM as bytecode (mosc.compiler.build.VM_EXEC_MODE), which VM
    instrumentation (profile_tvm) can see; artifacts otherwise compile the VM to machine code.
    Same kernels; the VM builtins then cost the interpreter's time, which deployed builds do not pay."""
    from mosc.compiler import build as cbuild

    saved, cbuild.VM_EXEC_MODE = cbuild.VM_EXEC_MODE, "bytecode"
    try:
        yield
    finally:
        cbuild.VM_EXEC_MODE = saved


def profile_tvm(art, run, top: int = 8) -> dict:
    """Time per VM call (kernels and VM builtins) over one translation, via VM instrumentation.

    The Python callback adds ~5-10 us per call, mostly visible in the builtins' share."""
    calls: dict[str, list] = {}

    def instrument(func, sym, before, ret, *args):
        now = time.perf_counter()
        c = calls.setdefault(sym, [0, 0.0, 0.0])
        if before:
            c[2] = now
        else:
            c[0] += 1
            c[1] += now - c[2]
        return 0

    art.vm.set_instrument(instrument)
    t0 = time.perf_counter()
    run()
    total = time.perf_counter() - t0
    art.vm.set_instrument(lambda *a: 0)
    if not calls:
        raise RuntimeError("VM instrumentation saw no call: profile an artifact built with "
                           "mosc.compiler.build.VM_EXEC_MODE = 'bytecode'")
    kernels = {k: v for k, v in calls.items() if not k.startswith("vm.builtin")}
    builtin_s = sum(v[1] for k, v in calls.items() if k.startswith("vm.builtin"))
    kernel_s = sum(v[1] for v in kernels.values())
    rows = sorted(kernels.items(), key=lambda kv: -kv[1][1])
    return {
        "total_ms_instrumented": total * 1e3,
        "kernel_ms": kernel_s * 1e3,
        "vm_builtin_ms": builtin_s * 1e3,
        "top": [{"kernel": k, "calls": v[0], "ms": v[1] * 1e3, "share_of_kernels": v[1] / kernel_s}
                for k, v in rows[:top]],
        "matmul_share_of_kernels": sum(v[1] for k, v in kernels.items() if "matmul" in k or "dense" in k) / kernel_s,
    }


def measure(runners: dict, rounds: int, slow_budget_s: float, warmup: int = 2) -> tuple[dict, dict]:
    """Interleaved timing: each round runs every backend once (rotating order); medians in ms.

    A backend slower than slow_budget_s / rounds per call runs in fewer rounds (at least 3)."""
    tokens, once = {}, {}
    for name, run in runners.items():
        t0 = time.perf_counter()
        tokens[name] = run()
        once[name] = time.perf_counter() - t0
        for _ in range(warmup - 1):
            run()
    limit = {n: max(3, min(rounds, int(slow_budget_s / max(once[n], 1e-9)))) for n in runners}
    times = {n: [] for n in runners}
    names = list(runners)
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            if len(times[n]) < limit[n]:
                t0 = time.perf_counter()
                runners[n]()
                times[n].append(time.perf_counter() - t0)
    stats = {n: {"median_ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3, "n": len(ts)} for n, ts in times.items()}
    return stats, tokens


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=None, help="MetaSchedule trial budget per model (default 96; quick: 16)")
    ap.add_argument("--quick", action="store_true", help="2 tiny archs, 16 trials, 5 rounds: a smoke run (~3 min)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per model (default 20; quick: 5)")
    ap.add_argument("--keep-db", action="store_true", help="reuse the benchmark's tuning database instead of emptying it")
    ap.add_argument("--out", type=Path, default=None, help="JSON output path")
    args = ap.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)  # log files: no wrapping
    quick = args.quick
    trials = args.trials if args.trials is not None else (16 if quick else 96)
    rounds = args.rounds or (5 if quick else 20)
    models = ([("tiny", "largest"), ("tiny", "smallest")] if quick else
              [("tiny", "largest"), ("tiny", "smallest"), ("tiny", "middle"), ("wmt", "smallest"), ("wmt", "middle")])
    second = ("tiny", "random0") if quick else ("wmt", "random0")
    out_path = args.out or RESULTS / ("compile_latency_quick.json" if quick else "compile_latency.json")

    torch.set_num_threads(1)
    base = load_target("host")
    # one thread everywhere: the schedules are tuned for, and measured on, one core
    spec = {**base.resolved_spec(), "num-cores": 1}
    target = dataclasses.replace(base, tvm_target_spec=spec)
    db = DB_ROOT / (f"host-{spec['mcpu']}-1core" + ("-quick" if quick else ""))
    if db.exists() and not args.keep_db:
        shutil.rmtree(db)
    shapes = Shapes.from_protocol(base.protocol)  # batch 1, source 30, 30 decoder steps
    T = shapes.cache_len
    work = Path(tempfile.mkdtemp(prefix="mosc-bench-"))
    rng = np.random.default_rng(0)
    src = rng.integers(4, VOCAB, (shapes.batch, shapes.source_len)).astype(np.int64)
    console.print(f"[bold]compile_latency[/]: {len(models)} models, {trials} trials/model, {rounds} rounds, "
                  f"target {json.dumps(spec)}, database {db}")

    t_start = time.perf_counter()
    load_start = os.getloadavg()
    results = []
    for space, which in models:
        arch = pick(space, which)
        name = f"{space}-{which}"
        sub = make_subnet(space, arch)
        row = {"name": name, "space": space, "which": which, "arch": arch.to_dict(), "arch_hash": arch.hash,
               "params": sum(p.numel() for p in sub.parameters())}
        console.print(f"[bold]{name}[/] ({row['params'] / 1e6:.1f}M params): export", end="")
        exp = export_subnet(sub, work / name / "onnx", shapes)
        row["export_s"], row["parity"] = exp["export_seconds"], exp["parity"]
        files = onnx_files(work / name / "onnx")
        console.print(", build untuned", end="")
        t0 = time.perf_counter()
        compile_artifact(files, target, work / name / "untuned", tune=False, db_dir=work / "empty-db")
        row["compile_untuned_s"] = time.perf_counter() - t0
        console.print(f", tune ({trials} trials)", end="")
        t0 = time.perf_counter()
        compile_artifact(files, target, work / name / "tuned", trials=trials, db_dir=db, progress=False)
        row["compile_tuned_s"] = time.perf_counter() - t0
        row["tuning"] = read_manifest(work / name / "tuned")["tuning"]["report"]
        console.print(", measure")
        tvm_u, _ = tvm_runner(work / name / "untuned", src, T)
        tvm_t, art_t = tvm_runner(work / name / "tuned", src, T)
        runners = {"torch": torch_runner(sub, src, T), "ort": ort_runner(work / name / "onnx", src, T),
                   "tvm_untuned": tvm_u, "tvm_tuned": tvm_t}
        row["latency"], tokens = measure(runners, rounds, slow_budget_s=15.0 if not quick else 5.0)
        row["tokens_equal"] = all(tokens[n] == tokens["torch"] for n in BACKENDS)
        with bytecode_vm():  # the tuned records again (no trials left to spend), as bytecode
            compile_artifact(files, target, work / name / "tuned-bytecode", tune=False, db_dir=db)
        run_b, art_b = tvm_runner(work / name / "tuned-bytecode", src, T)
        row["profile_tvm_tuned"] = profile_tvm(art_b, run_b)
        lat = {n: row["latency"][n]["median_ms"] for n in BACKENDS}
        row["ratios"] = {"tvm_tuned_over_ort": lat["tvm_tuned"] / lat["ort"],
                         "tvm_tuned_over_torch": lat["tvm_tuned"] / lat["torch"],
                         "tvm_untuned_over_tvm_tuned": lat["tvm_untuned"] / lat["tvm_tuned"]}
        r = row["tuning"]
        console.print(f"  torch {lat['torch']:.2f} ms, ort {lat['ort']:.2f} ms, tvm untuned {lat['tvm_untuned']:.1f} ms, "
                      f"tvm tuned {lat['tvm_tuned']:.2f} ms; tuning {r['tasks']} tasks ({r['cached']} cached), "
                      f"{r['trials']} trials, {r['seconds']:.0f} s; tokens equal: {row['tokens_equal']}", highlight=False)
        results.append(row)
        shutil.rmtree(work / name / "untuned", ignore_errors=True)

    # a second subnet against the warm database
    space, which = second
    arch = pick(space, which)
    sub = make_subnet(space, arch, seed=1)
    console.print(f"[bold]second subnet[/] {space}-{which} ({arch.hash}): warm-database compiles")
    t0 = time.perf_counter()
    export_subnet(sub, work / "second" / "onnx", shapes, check=False)
    export_s = time.perf_counter() - t0
    files = onnx_files(work / "second" / "onnx")
    t0 = time.perf_counter()
    compile_artifact(files, target, work / "second" / "no-tune", tune=False, db_dir=db)
    warm_no_tune_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compile_artifact(files, target, work / "second" / "tuned", trials=trials, db_dir=db, progress=False)
    warm_tune_s = time.perf_counter() - t0
    rep = read_manifest(work / "second" / "tuned")["tuning"]["report"]
    tvm_2, _ = tvm_runner(work / "second" / "tuned", src, T)
    ort_2 = ort_runner(work / "second" / "onnx", src, T)
    lat2, _ = measure({"ort": ort_2, "tvm_tuned": tvm_2}, max(5, rounds // 2), 10.0)
    second_row = {
        "name": f"{space}-{which}", "arch": arch.to_dict(), "arch_hash": arch.hash,
        "params": sum(p.numel() for p in sub.parameters()), "export_s": export_s,
        "compile_warm_db_no_tune_s": warm_no_tune_s, "compile_warm_db_tune_missing_s": warm_tune_s,
        "tuning": rep, "latency": lat2, "goal_s": 60,
    }
    console.print(f"  export {export_s:.1f} s; compile with warm database: {warm_no_tune_s:.1f} s without tuning, "
                  f"{warm_tune_s:.1f} s tuning the {rep['tasks'] - rep['cached'] - rep['untunable']} missing of {rep['tasks']} tasks "
                  f"({rep['trials']} trials); tvm tuned {lat2['tvm_tuned']['median_ms']:.2f} ms vs ort "
                  f"{lat2['ort']['median_ms']:.2f} ms", highlight=False)

    import onnxruntime
    import tvm

    total_s = time.perf_counter() - t_start
    out = {
        "benchmark": "compile_latency",
        "what": "one translation: encoder (source 30) + 30 greedy decoder steps with KV cache, batch 1, host, 1 thread",
        "quick": quick,
        "trials_per_model": trials,
        "rounds": rounds,
        "tuning_seconds_total": sum(r["tuning"]["seconds"] for r in results) + rep["seconds"],
        "trials_total": sum(r["tuning"]["trials"] for r in results) + rep["trials"],
        "total_seconds": total_s,
        "machine": {"cpu": spec["mcpu"], "nproc": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "threads_per_backend": 1},
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "tvm": tvm.__version__},
        "tvm_target": json.dumps(spec),
        "database": str(db),
        "models": results,
        "second_subnet": second_row,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=2) + "\n")

    t = Table(title=f"one translation (encoder + {T} decoder steps), ms, median of interleaved rounds; "
                    f"TVM tuned with {trials} trials/model", show_lines=False)
    for col in ["model", "params", "torch", "ORT", "TVM untuned", "TVM tuned", "tuned/ORT", "tuned/torch",
                "tasks (cached)", "trials", "tune s", "tokens equal"]:
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in results:
        lat = {n: r["latency"][n]["median_ms"] for n in BACKENDS}
        tr = r["tuning"]
        t.add_row(r["name"], f"{r['params'] / 1e6:.1f}M", f"{lat['torch']:.2f}", f"{lat['ort']:.2f}",
                  f"{lat['tvm_untuned']:.1f}", f"{lat['tvm_tuned']:.2f}", f"{r['ratios']['tvm_tuned_over_ort']:.2f}x",
                  f"{r['ratios']['tvm_tuned_over_torch']:.2f}x", f"{tr['tasks']} ({tr['cached']})", str(tr["trials"]),
                  f"{tr['seconds']:.0f}", "yes" if r["tokens_equal"] else "NO")
    console.print(t)
    p = results[-1]["profile_tvm_tuned"]
    console.print(profile_table(f"where TVM (tuned) time goes: {results[-1]['name']}, one translation, instrumented "
                                f"({p['kernel_ms']:.1f} ms in kernels, {p['vm_builtin_ms']:.1f} ms in VM builtins; "
                                f"matmuls {p['matmul_share_of_kernels']:.0%} of kernel time)", p))
    console.print(f"second subnet {second_row['name']}: compile with warm database "
                  f"{second_row['compile_warm_db_no_tune_s']:.1f} s (no tuning), "
                  f"{second_row['compile_warm_db_tune_missing_s']:.1f} s (tuning {rep['tasks'] - rep['cached'] - rep['untunable']} missing "
                  f"tasks); goal < 60 s")
    console.print(f"total {total_s / 60:.1f} min; wrote {out_path}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The GPU half of mosc checked on a machine with an Nvidia GPU, in one run of a few minutes.

    scripts/gpu_check.sh                                  # sets up a venv and runs this
    python benchmarks/gpu_check.py                        # on the GPU machine, venv ready
    python benchmarks/gpu_check.py --dry-run --out x.json # CPU only, tiny sizes, CUDA parts skipped

Stages, each timed; one that fails is recorded as "error: ..." and the others still run:

  train      mosc.nn.train.train() of a tiny supernet for --steps updates on the GPU in fp32
             and in bf16 (target tokens/s each), and a few updates of the same model on the CPU
             with --cpu-threads threads (the 2-core development machine) for the GPU/CPU ratio
  collapse   the fp32 run's checkpoint (CPU tensors, loaded as a CPU-only machine would) moved
             to the GPU and collapsed at the largest arch: max |supernet - collapsed| in fp32
  export     the collapsed subnet to ONNX at the nvidia target's shapes (with ORT parity)
  compile    mosc.jobs.build.compile_export for target nvidia, no tuning
  translate  one translation (encoder + decoder_steps cached steps, the measuring protocol's
             run) with the TVM artifact on CUDA and with torch eager on CUDA, median of
             --repeats each: tvm_over_torch_cuda = TVM ms / torch ms (< 1: TVM is faster)

Writes the JSON after every stage (a run cut short keeps what it had): keys
train_tokens_per_s {device: {precision: tokens/s}}, cpu_train_tokens_per_s,
collapse_max_abs_diff, tvm_over_torch_cuda, gpu_name, and the details of each stage.
--dry-run trains on the CPU instead (the same code, tiny sizes) and writes
"skipped (no GPU)" for what needs CUDA; it never writes to benchmarks/results.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mosc.fileio import atomic_write_json  # noqa: E402

SKIPPED = "skipped (no GPU)"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu_check.json"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU only, tiny sizes; CUDA-only stages are skipped")
    ap.add_argument("--out", default=None, help=f"result JSON (default {DEFAULT_OUT}; a temp file with --dry-run)")
    ap.add_argument("--steps", type=int, default=None, help="GPU training updates per precision (default 300; dry run 3)")
    ap.add_argument("--cpu-steps", type=int, default=None, help="CPU training updates for the ratio (default 8; dry run 2)")
    ap.add_argument("--cpu-threads", type=int, default=2, help="torch threads of the CPU comparison (this dev machine: 2)")
    ap.add_argument("--max-tokens", type=int, default=None, help="padded tokens per batch (default 2048; dry run 512)")
    ap.add_argument("--repeats", type=int, default=None, help="timed translations per backend (default 30)")
    ap.add_argument("--work", default=None, help="folder for runs, exports and artifacts, kept (default: a temp "
                    "folder, removed at the end)")
    args = ap.parse_args(argv)
    dry = args.dry_run
    args.steps = args.steps or (3 if dry else 300)
    args.cpu_steps = args.cpu_steps or (2 if dry else 8)
    args.max_tokens = args.max_tokens or (512 if dry else 2048)
    args.repeats = args.repeats or 30
    if args.out is None:
        args.out = str(Path(tempfile.mkdtemp(prefix="mosc-gpu-check-")) / "gpu_check.json") if dry else str(DEFAULT_OUT)
    if dry and Path(args.out).resolve().is_relative_to(ROOT / "benchmarks" / "results"):
        ap.error("--dry-run numbers are not results: write them outside benchmarks/results")
    return args


class Report:
    """The result JSON, rewritten after every stage."""

    def __init__(self, path: str, dry: bool):
        self.path, self.t0 = path, time.perf_counter()
        self.data = {"dry_run": dry, "train_tokens_per_s": {}, "cpu_train_tokens_per_s": None,
                     "collapse_max_abs_diff": None, "tvm_over_torch_cuda": None, "gpu_name": None,
                     "stages": {}, "errors": {},
                     "host": {"machine": platform.machine(), "torch": torch.__version__, "cuda": torch.version.cuda}}

    def stage(self, name: str, fn, *a):
        """Run one stage; its exception is recorded (one line) instead of ending the check."""
        t = time.perf_counter()
        print(f"[gpu_check] {name} ...", flush=True)
        try:
            out = fn(*a)
        except Exception as e:  # noqa: BLE001  (a check reports every failure and goes on)
            out = None
            self.data["errors"][name] = f"error: {type(e).__name__}: {(str(e).strip().splitlines() or ['?'])[0][:300]}"
            print(f"[gpu_check] {name} failed: {self.data['errors'][name]}", flush=True)
        self.data["stages"][name] = {"seconds": round(time.perf_counter() - t, 2)}
        self.write()
        return out

    def write(self):
        self.data["seconds"] = round(time.perf_counter() - self.t0, 1)
        atomic_write_json(self.path, self.data)


# ----------------------------------------------------------------------------- stages


def load_data(dry: bool):
    from mosc.nn.corpus import load_corpus
    from mosc.nn.synthetic import SyntheticConfig

    size = SyntheticConfig(n_train=300, n_val=30, n_test=30) if dry else SyntheticConfig(n_train=4000, n_val=100, n_test=100)
    return load_corpus("synthetic", synthetic=size, vocab_size=400 if dry else 1000)


def train_once(work: Path, data, device: str, precision: str, steps: int, max_tokens: int):
    from mosc.nn.train import TrainConfig, train

    cfg = TrainConfig(steps=steps, max_tokens=max_tokens, warmup=min(50, steps // 2), lr=2e-3, save_every=steps,
                      log_every=max(1, steps // 4), max_len=64, device=device, precision=precision)
    return train(work / f"run-{device.replace(':', '')}-{precision}", data=data, cfg=cfg, progress=False)


def stage_train(rep: Report, args, work: Path, data) -> Path:
    """GPU (or, dry, CPU) fp32 + bf16 throughput, then the CPU comparison; returns the fp32 run."""
    device = "cpu" if args.dry_run else "cuda"
    per = rep.data["train_tokens_per_s"].setdefault(device, {})
    runs = {}
    for precision in ("fp32", "bf16"):
        r = train_once(work, data, device, precision, args.steps, args.max_tokens)
        per[precision] = r.tokens_per_s
        runs[precision] = r
        rep.data["train_device"] = r.device
        rep.data.setdefault("train_final_loss", {})[precision] = r.final_loss
    threads = torch.get_num_threads()
    torch.set_num_threads(args.cpu_threads)
    try:
        cpu = train_once(work / "cpu", data, "cpu", "fp32", args.cpu_steps, args.max_tokens)
    finally:
        torch.set_num_threads(threads)
    rep.data["cpu_train_tokens_per_s"] = cpu.tokens_per_s
    rep.data["cpu_train"] = {"threads": args.cpu_threads, "steps": args.cpu_steps}
    rep.data["train_over_cpu"] = SKIPPED if args.dry_run else {p: v / cpu.tokens_per_s for p, v in per.items()}
    rep.data["train"] = {"steps": args.steps, "max_tokens": args.max_tokens, "space": "tiny", "mode": "neuron",
                         "sandwich": 3, "cpu_dry_run": args.dry_run}
    return runs["fp32"].checkpoint


def checkpoint_is_portable(ckpt: Path) -> dict:
    """Every tensor of the checkpoint is a CPU tensor, and a CUDA RNG state sits apart from the CPU one."""
    from mosc.fileio import load_tensors

    names = {}
    for f in ("model.safetensors", "optim.safetensors"):
        tensors = load_tensors(ckpt / f)
        names[f] = sorted({str(t.device) for t in tensors.values()})
    rng = sorted(k for k in load_tensors(ckpt / "optim.safetensors") if k.startswith("__"))
    return {"tensor_devices": names, "rng_states": rng}


def stage_collapse(rep: Report, args, ckpt: Path):
    """Supernet and collapsed subnet on the GPU (CPU when dry), outputs compared in fp32."""
    from mosc.jobs.model import COLLAPSE_ATOL
    from mosc.nn.subnet import collapse
    from mosc.nn.train import load_trained

    dev = torch.device("cpu" if args.dry_run else "cuda")
    rep.data["checkpoint"] = checkpoint_is_portable(ckpt)
    model, tok, _ = load_trained(ckpt)  # loads on the CPU: what a CPU-only machine does
    model.to(dev).eval()
    arch = model.space.largest()
    sub = collapse(model, arch).to(dev)
    g = torch.Generator().manual_seed(0)
    V = model.cfg.vocab_size
    src = torch.randint(4, V, (4, 20), generator=g)
    src[1, 12:] = model.cfg.pad_id
    tgt = torch.randint(4, V, (4, 15), generator=g)
    src, tgt = src.to(dev), tgt.to(dev)
    with torch.no_grad():
        diff = (model(src, tgt, arch) - sub(src, tgt)).abs().max().item()
    rep.data["collapse_max_abs_diff"] = diff
    rep.data["collapse"] = {"device": str(dev), "arch": arch.hash, "atol": COLLAPSE_ATOL, "exact": diff <= COLLAPSE_ATOL,
                            "float32_matmul_precision": torch.get_float32_matmul_precision()}
    return sub.cpu(), tok


def stage_export(rep: Report, args, work: Path, sub, tok):
    from mosc.compiler.targets import load_target
    from mosc.nn.export import Shapes, export_subnet

    target = load_target("nvidia")
    shapes = Shapes(1, 8, 8) if args.dry_run else Shapes.from_protocol(target.protocol)
    meta = export_subnet(sub, work / "onnx", shapes, tokenizer_json=tok.to_json())
    rep.data["export"] = {"shapes": meta["shapes"], "parity": meta["parity"]}
    return work / "onnx"


def stage_compile(rep: Report, work: Path, onnx_dir: Path) -> Path:
    from mosc.compiler.targets import load_target
    from mosc.jobs.build import compile_export

    c = compile_export(onnx_dir, load_target("nvidia"), work / "art", tune=False, tune_db=work / "tune_db", progress=False)
    rep.data["compile"] = {"tvm_target": c.manifest["tvm_target"], "cuda_kernels": c.manifest["cuda_kernels"],
                           "compile_seconds": c.manifest["compile_seconds"]}
    return c.path


# ----------------------------------------------------------------------------- translation timing


def torch_translation(sub, shapes: dict, dev: torch.device):
    """() -> one translation with torch eager on dev: the encoder, then decoder_steps cached
    steps with the caches fed back (the measuring protocol's run), synchronized at the end."""
    from mosc.contract import BOS_ID

    B, S, T = shapes["batch"], shapes["source_len"], shapes["cache_len"]
    sub = sub.to(dev).eval()
    src = (4 + torch.arange(B * S) % 16).view(B, S).to(dev)
    token = torch.full((B,), BOS_ID, dtype=torch.long, device=dev)
    positions = [torch.tensor([p], device=dev) for p in range(T)]

    @torch.no_grad()
    def run():
        cross = sub.encode(src)
        caches = sub.init_cache(B, T)
        for p in positions:
            _, *caches = sub.decode_step(token, p, *caches, *cross)
        torch.cuda.synchronize(dev)

    return run


def tvm_translation(art):
    """() -> the same translation with the TVM artifact's compiled loop (translate: encoder + T
    greedy steps, eos disabled) on its device."""
    import numpy as np
    import tvm

    from mosc.contract import ENCODER, TRANSLATE, cache_shape

    dev, vm, fn = art.device, art.vm, art.function(TRANSLATE)
    B, S = art.manifest["graphs"][ENCODER]["inputs"][0]["shape"]
    T = cache_shape(art.manifest["graphs"])[1]
    src = (4 + np.arange(B * S) % 16).reshape(B, S).astype(np.int64)
    vm.set_input(fn, *(tvm.runtime.tensor(x, dev) for x in (src, np.array([T], np.int64), np.array([-1], np.int64))))

    def run():
        vm.invoke_stateful(fn)
        dev.sync()

    return run


def median_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):  # CUDA context, kernel JIT and allocator warm-up are not the model's latency
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def stage_translate(rep: Report, args, art_dir: Path, sub, shapes: dict):
    from mosc.compiler.artifact import load_artifact

    dev = torch.device("cuda")
    art = load_artifact(art_dir, "cuda")  # compiles the kernels' CUDA source here (NVRTC or nvcc)
    tvm_ms = median_ms(tvm_translation(art), args.repeats)
    torch_ms = median_ms(torch_translation(sub, shapes, dev), args.repeats)
    rep.data["translation_ms"] = {"tvm_cuda": tvm_ms, "torch_eager_cuda": torch_ms, "repeats": args.repeats,
                                  "shapes": shapes, "method": "wall clock of encoder + all decoder steps, "
                                  "device synchronized at the end; median"}
    rep.data["tvm_over_torch_cuda"] = tvm_ms / torch_ms


# ----------------------------------------------------------------------------- main


def gpu_name(dry: bool) -> str:
    if dry:
        return SKIPPED
    if not torch.cuda.is_available():
        from mosc.nn.device import cuda_found

        raise SystemExit(f"error: no CUDA device: {cuda_found()} (use --dry-run on a machine without a GPU)")
    return torch.cuda.get_device_name(0)


def main(argv=None) -> int:
    args = parse_args(argv)
    rep = Report(args.out, args.dry_run)
    rep.data["gpu_name"] = gpu_name(args.dry_run)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mosc-gpu-work-"))
    try:
        run_stages(rep, args, work)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({k: rep.data[k] for k in ("gpu_name", "train_tokens_per_s", "cpu_train_tokens_per_s",
                                                "collapse_max_abs_diff", "tvm_over_torch_cuda", "errors", "seconds")},
                     indent=1))
    print(f"wrote {args.out}")
    return 1 if rep.data["errors"] else 0


def run_stages(rep: Report, args, work: Path) -> None:
    # Each stage needs the one before it: after a failure the rest are left out (errors says why).
    data = rep.stage("data", load_data, args.dry_run)
    ckpt = data and rep.stage("train", stage_train, rep, args, work, data)
    collapsed = ckpt and rep.stage("collapse", stage_collapse, rep, args, ckpt)
    onnx_dir = collapsed and rep.stage("export", stage_export, rep, args, work, *collapsed)
    art = onnx_dir and rep.stage("compile", stage_compile, rep, work, onnx_dir)
    if args.dry_run:
        rep.data["tvm_over_torch_cuda"] = rep.data["translation_ms"] = SKIPPED
    elif art:
        rep.stage("translate", stage_translate, rep, args, art, collapsed[0], rep.data["export"]["shapes"])
    rep.write()


if __name__ == "__main__":
    sys.exit(main())

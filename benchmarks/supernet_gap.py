"""Inherited vs standalone quality per FFN mode: the paper's central claim on real data.

Trains three supernets (shared = HAT, layer-wise MoS, neuron-wise MoS) with the same
budget on a parallel corpus (default Multi30k En-De from ../shared/data), then for four
archs spanning the space (largest, smallest, two by parameter count in between) reports
the inherited BLEU and loss of each supernet next to the same arch trained alone from
scratch with the same number of updates. Also training throughput per mode and MoS's
overhead over `shared`, measured in this one run.

    python benchmarks/supernet_gap.py                 # ~40 min on 2 CPU cores
    python benchmarks/supernet_gap.py --quick         # a few minutes, numbers meaningless
    python benchmarks/supernet_gap.py --device cuda   # train and evaluate on the GPU

Runs are kept in --work and resumed, so an interrupted benchmark continues. Prints a
table and writes benchmarks/results/supernet_gap.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mosc.nn.corpus import load_corpus  # noqa: E402
from mosc.nn.device import describe, resolve_device  # noqa: E402
from mosc.nn.evaluate import evaluate  # noqa: E402
from mosc.fileio import atomic_write_json  # noqa: E402
from mosc.space import SearchSpace  # noqa: E402
from mosc.nn.subnet import analytic_param_count, collapse  # noqa: E402
from mosc.fileio import latest_checkpoint  # noqa: E402
from mosc.nn.train import TrainConfig, load_trained, train  # noqa: E402

MODES = ("shared", "layer", "neuron")


def spanning_archs(space: SearchSpace, vocab: int) -> dict:
    """largest, smallest, and the archs at the 1/3 and 2/3 quantiles of parameter count
    among 300 seeded samples."""
    rng = random.Random(0)
    pool = sorted({space.sample(rng) for _ in range(300)}, key=lambda a: (analytic_param_count(a, vocab, space.qkv_dim), a.hash))
    return {"smallest": space.smallest(), "small-mid": pool[len(pool) // 3], "large-mid": pool[2 * len(pool) // 3],
            "largest": space.largest()}


def train_or_load(run: Path, steps: int, **kw):
    """Train (resuming an interrupted run); a finished run is reused. Returns (seconds, tokens/s)."""
    ckpt = latest_checkpoint(run) if run.exists() else None
    stats = run / "bench_stats.json"
    if ckpt is not None and ckpt.name == f"step_{steps:07d}" and stats.exists():
        return json.loads(stats.read_text())
    r = train(run, resume=ckpt is not None, **kw)
    out = {"seconds": r.seconds, "tokens_per_s": r.tokens_per_s, "final_loss": r.final_loss}
    atomic_write_json(stats, out)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", default="multi30k", help="corpus spec (default: ../shared/data/multi30k)")
    ap.add_argument("--space", default="tiny", help="search space")
    ap.add_argument("--steps", type=int, default=600, help="updates per supernet and per standalone arch")
    ap.add_argument("--max-tokens", type=int, default=2048, help="padded tokens per batch")
    ap.add_argument("--vocab", type=int, default=5000, help="joint BPE vocabulary size")
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    ap.add_argument("--warmup", type=int, default=100, help="warm-up updates")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids stragglers on a shared machine)")
    ap.add_argument("--device", default="auto", help="where to train and evaluate: auto (the GPU when there is one), "
                    "cpu, cuda or cuda:N")
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench_gap"), help="folder for the training runs")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "supernet_gap.json"), help="result JSON")
    ap.add_argument("--quick", action="store_true", help="tiny budget: checks the script, not the claim")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.work = 10, args.work + "_quick"
        args.out = args.out.replace(".json", "_quick.json")
    torch.set_num_threads(args.threads)
    device = describe(resolve_device(args.device))  # a GPU that is not here fails now, not after the corpus
    from rich.console import Console
    from rich.table import Table

    console = Console(width=150)
    t0 = time.perf_counter()
    data = load_corpus(args.corpus, vocab_size=args.vocab, max_train_pairs=2000 if args.quick else None)
    space = SearchSpace.load(args.space)
    archs = spanning_archs(space, data.tokenizer.vocab_size)
    cfg = TrainConfig(steps=args.steps, max_tokens=args.max_tokens, lr=args.lr, warmup=min(args.warmup, args.steps // 2),
                      save_every=max(args.steps // 4, 1), log_every=max(args.steps // 20, 1), max_len=64,
                      device=args.device)
    work = Path(args.work)
    eval_kw = dict(max_sentences=100) if args.quick else {}
    eval_kw["device"] = args.device

    results = {"modes": {}, "standalone": {}}
    for mode in MODES:
        console.rule(f"supernet, {mode}")
        stats = train_or_load(work / mode, args.steps, data=data, space=args.space, mode=mode, cfg=cfg)
        model, _, _ = load_trained(work / mode)
        per_arch = {}
        for name, arch in archs.items():
            sub = collapse(model, arch)  # exact: evaluating it is evaluating the supernet at arch (tested)
            test = evaluate(sub, data, split="test", **eval_kw)
            val = evaluate(sub, data, split="val", bleu=False, **eval_kw)
            per_arch[name] = {"bleu": test.bleu, "test_loss": test.loss, "val_loss": val.loss}
            console.print(f"{mode:7s} {name:10s} BLEU {test.bleu:5.2f}  val loss {val.loss:.3f}")
        results["modes"][mode] = {**stats, "archs": per_arch}
    for name, arch in archs.items():
        console.rule(f"standalone, {name}")
        run = work / f"standalone-{name}-{arch.hash}"
        stats = train_or_load(run, args.steps, data=data, space=args.space, mode="shared", cfg=cfg, arch=arch)
        model, _, _ = load_trained(run)
        sub = collapse(model, arch)
        test = evaluate(sub, data, split="test", **eval_kw)
        val = evaluate(sub, data, split="val", bleu=False, **eval_kw)
        results["standalone"][name] = {**stats, "bleu": test.bleu, "test_loss": test.loss, "val_loss": val.loss}
        console.print(f"standalone {name:10s} BLEU {test.bleu:5.2f}  val loss {val.loss:.3f}")

    # ---- report ---------------------------------------------------------------------------
    t = Table(title=f"inherited vs standalone, {args.corpus} test BLEU (val loss), {args.steps} updates each")
    t.add_column("arch")
    t.add_column("params")
    for mode in MODES:
        t.add_column(mode)
    t.add_column("standalone")
    for mode in MODES:
        t.add_column(f"gap {mode}")
    gaps = {m: [] for m in MODES}
    for name, arch in archs.items():
        sa = results["standalone"][name]
        row = [name, f"{analytic_param_count(arch, data.tokenizer.vocab_size, space.qkv_dim):,}"]
        for m in MODES:
            r = results["modes"][m]["archs"][name]
            row.append(f"{r['bleu']:.2f} ({r['val_loss']:.3f})")
        row.append(f"{sa['bleu']:.2f} ({sa['val_loss']:.3f})")
        for m in MODES:
            gap = sa["bleu"] - results["modes"][m]["archs"][name]["bleu"]
            gaps[m].append(gap)
            row.append(f"{gap:+.2f}")
        t.add_row(*row)
    console.print(t)
    tps = {m: results["modes"][m]["tokens_per_s"] for m in MODES}
    t2 = Table(title="training throughput (target tokens/s, sandwich of 3 archs per update)")
    t2.add_column("mode")
    t2.add_column("tokens/s")
    t2.add_column("overhead vs shared")
    t2.add_column("mean BLEU gap to standalone")
    for m in MODES:
        t2.add_row(m, f"{tps[m]:,.0f}", f"{(tps['shared'] / tps[m] - 1) * 100:+.1f}%", f"{sum(gaps[m]) / len(gaps[m]):+.2f}")
    console.print(t2)
    results.update({
        "corpus": args.corpus, "space": args.space, "steps": args.steps, "max_tokens": args.max_tokens,
        "vocab_size": data.tokenizer.vocab_size, "threads": args.threads, "quick": args.quick, "device": device,
        "archs": {k: a.to_dict() for k, a in archs.items()},
        "overhead_vs_shared_pct": {m: (tps["shared"] / tps[m] - 1) * 100 for m in MODES},
        "mean_bleu_gap": {m: sum(gaps[m]) / len(gaps[m]) for m in MODES},
        "host": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
        "wall_s": time.perf_counter() - t0,
    })
    atomic_write_json(args.out, results)
    console.print(f"wrote {args.out} ({results['wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()

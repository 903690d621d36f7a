"""Inherited vs standalone BERT subnets at three parameter budgets: masked-LM loss and SST-2.

The BERT half of the paper's claim (MOS.md sections 3 and 7), scaled to this machine:
pre-trains three masked-LM supernets on `bert-tiny` (shared = weight sharing, layer-wise
and neuron-wise MoS) with the same updates, batch and seed on the default text
(wikitext-2 + unlabelled SST-2 and Multi30k English, ../shared/data). Three budgets are
the parameter counts of the uniform archs h = 32, 64, 96 (every layer at hidden size h);
the arch at a budget is that uniform arch. For each budget the arch is collapsed from
each supernet (inherited weights) and trained alone from scratch with the same updates
and batch (standalone). All four encoders are scored on the same validation masks
(masked-LM loss) and then fine-tuned on SST-2 with one FinetuneConfig (dev accuracy).

Goal: at every budget, layer- or neuron-wise MoS within 1 accuracy point of standalone
and better than shared.

    python benchmarks/bert_gap.py            # ~30 min on 2 CPU cores (phase times printed)
    python benchmarks/bert_gap.py --quick    # ~1-2 min: checks the script, numbers meaningless

Cost per pre-training update (1 thread): ~0.45 s a supernet (three archs), ~0.12-0.2 s a
standalone arch, so ~1.85 s for all six runs: 700 updates ~22 min. Fine-tuning: ~0.03 s
an update, 12 encoders x 600 updates x 2 seeds ~7 min. SST-2 dev has 872 sentences and two
fine-tuning seeds of one encoder differ by ~1 point: the dev accuracy is the seeds' mean.

Runs are kept in --work and reused (an interrupted pre-training resumes), so a rerun
only fine-tunes. Prints a table and writes benchmarks/results/bert_gap.json
(--quick: bert_gap_quick.json, never the real result).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mosc.bert_space import BertSpace, param_count  # noqa: E402
from mosc.fileio import atomic_write_json, latest_checkpoint  # noqa: E402
from mosc.nn.bert import collapse_bert  # noqa: E402
from mosc.nn.device import describe, resolve_device  # noqa: E402
from mosc.nn.finetune import FinetuneConfig, finetune, load_sst2  # noqa: E402
from mosc.nn.mlm import load_text_corpus, mlm_loss, valid_batches  # noqa: E402
from mosc.nn.train import TrainConfig, load_bert_trained, train  # noqa: E402

MODES = ("shared", "layer", "neuron")
VARIANTS = MODES + ("standalone",)
BUDGET_H = (32, 64, 96)  # the uniform archs whose parameter counts are the budgets
TOLERANCE = 0.01  # "within 1 point" of standalone dev accuracy (accuracies are fractions)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--space", default="bert-tiny", help="encoder-only search space")
    ap.add_argument("--steps", type=int, default=700, help="pre-training updates per supernet and per standalone arch")
    ap.add_argument("--max-tokens", type=int, default=2048, help="padded tokens per pre-training batch")
    ap.add_argument("--max-len", type=int, default=64, help="pre-training block length")
    ap.add_argument("--vocab", type=int, default=4000, help="subword vocabulary of the pre-training text")
    ap.add_argument("--lr", type=float, default=5e-4, help="peak pre-training learning rate (MOS.md)")
    ap.add_argument("--warmup", type=int, default=70, help="pre-training warm-up updates")
    ap.add_argument("--ft-steps", type=int, default=600, help="SST-2 fine-tuning updates per encoder")
    ap.add_argument("--ft-batch", type=int, default=32, help="SST-2 sentences per fine-tuning update")
    ap.add_argument("--ft-lr", type=float, default=FinetuneConfig.lr, help="peak fine-tuning learning rate")
    ap.add_argument("--ft-seeds", type=int, default=2, help="fine-tuning seeds per encoder (dev accuracy is their mean)")
    ap.add_argument("--valid-blocks", type=int, default=256, help="validation blocks for the masked-LM loss")
    ap.add_argument("--seed", type=int, default=0, help="pre-training seed (init, archs, batches, masks)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids stragglers on a shared machine)")
    ap.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda or cuda:N")
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench_bert_gap"), help="folder for the pre-training runs")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bert_gap.json"), help="result JSON")
    ap.add_argument("--quick", action="store_true", help="tiny budget (~2 min): checks the script, not the claim")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.warmup, args.ft_steps, args.valid_blocks = 6, 2, 20, 32
        args.work += "_quick"
        args.out = args.out.replace(".json", "_quick.json")
    return args


def train_or_load(run: Path, data, settings: dict, **kw) -> dict:
    """Pre-train (resuming an interrupted run); a finished run with the same settings is
    reused. Returns {seconds, tokens_per_s, final_loss, reused}."""
    cfg: TrainConfig = kw["cfg"]
    stats = run / "bench_stats.json"
    ckpt = latest_checkpoint(run) if run.exists() else None
    if ckpt is not None and stats.exists():
        old = json.loads(stats.read_text())
        if old.get("settings") != settings:
            sys.exit(f"{run} was trained with other settings; delete it (or pass another --work) to retrain")
        if ckpt.name == f"step_{cfg.steps:07d}":
            return {**old, "reused": True}
    r = train(run, resume=ckpt is not None, data=data, **kw)
    out = {"seconds": r.seconds, "tokens_per_s": r.tokens_per_s, "final_loss": r.final_loss, "settings": settings}
    atomic_write_json(stats, out)
    return {**out, "reused": False}


def check_tokenizer(meta: dict, data, run: Path) -> None:
    """Every encoder must read SST-2 with the tokenizer the text was cut with."""
    if meta["tokenizer"] != data.tokenizer.to_json():
        sys.exit(f"{run} has another tokenizer than this corpus; delete it (or pass another --work) to retrain")


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    t_all = time.perf_counter()
    seconds: dict = {}

    def phase(name: str, t0: float) -> None:
        seconds[name] = time.perf_counter() - t0
        console.print(f"[dim]phase {name}: {seconds[name]:.1f} s (total {time.perf_counter() - t_all:.0f} s)[/]")

    # ---- text and budgets ------------------------------------------------------------------
    t0 = time.perf_counter()
    space = BertSpace.load(args.space)
    data = load_text_corpus("default", seq_len=args.max_len, vocab_size=args.vocab)
    vocab = data.vocab_size
    archs = {h: space.uniform(h) for h in BUDGET_H}
    budgets = {h: param_count(a, space, vocab) for h, a in archs.items()}
    batches = valid_batches(data.valid, vocab - 1, max_blocks=args.valid_blocks)  # the same masks for every encoder
    phase("corpus", t0)

    cfg = TrainConfig(steps=args.steps, max_tokens=args.max_tokens, max_len=args.max_len, lr=args.lr,
                      warmup=min(args.warmup, args.steps // 2), label_smoothing=0.0, sandwich_random=1, distill=0.0,
                      save_every=max(args.steps // 4, 1), log_every=max(args.steps // 20, 1), seed=args.seed,
                      device=args.device)
    overrides = {"dropout": 0.1}
    # what a reused run must have been trained with (the device may differ: a run resumes anywhere)
    settings = {"space": args.space, "vocab": args.vocab, "model_overrides": overrides,
                "train": {k: v for k, v in asdict(cfg).items() if k != "device"}}
    work = Path(args.work)

    # ---- pre-training: three supernets, three standalone archs -------------------------------
    encoders: dict[int, dict] = {h: {} for h in BUDGET_H}
    pretrain: dict = {}
    for mode in MODES:
        console.rule(f"supernet, {mode}")
        t0 = time.perf_counter()
        run = work / mode
        pretrain[mode] = train_or_load(run, data, settings, space=args.space, mode=mode, cfg=cfg,
                                       model_overrides=overrides)
        supernet, _, meta = load_bert_trained(run)
        check_tokenizer(meta, data, run)
        for h, a in archs.items():
            encoders[h][mode] = collapse_bert(supernet, a)
        phase(f"pretrain_{mode}", t0)
    for h, a in archs.items():
        console.rule(f"standalone, hidden {h}")
        t0 = time.perf_counter()
        run = work / f"standalone-h{h}"
        pretrain[f"standalone_h{h}"] = train_or_load(run, data, {**settings, "arch": a.to_dict()}, space=args.space,
                                                     mode="shared", cfg=cfg, model_overrides=overrides, arch=a)
        model, _, meta = load_bert_trained(run)
        check_tokenizer(meta, data, run)
        encoders[h]["standalone"] = collapse_bert(model, a)
        phase(f"pretrain_standalone_h{h}", t0)

    # ---- masked-LM loss on the same validation masks ----------------------------------------
    t0 = time.perf_counter()
    results = {h: {v: {} for v in VARIANTS} for h in BUDGET_H}
    for h in BUDGET_H:
        for v in VARIANTS:
            enc = encoders[h][v].to(device).eval()
            results[h][v]["mlm_valid_loss"] = mlm_loss(enc, enc.mlm_logits, batches, device)
            encoders[h][v] = enc.cpu()
    phase("mlm_eval", t0)

    # ---- SST-2 fine-tuning -------------------------------------------------------------------
    t0 = time.perf_counter()
    sst2 = load_sst2(data.tokenizer, seq_len=64)
    phase("sst2_load", t0)
    ft_cfgs = [FinetuneConfig(steps=args.ft_steps, batch_size=args.ft_batch, lr=args.ft_lr, seed=s, device=args.device)
               for s in range(args.ft_seeds)]
    t0 = time.perf_counter()
    for h in BUDGET_H:
        for v in VARIANTS:
            accs, secs, losses = [], 0.0, []
            for fc in ft_cfgs:
                _, r = finetune(encoders[h][v], fc, sst2)
                accs.append(r["sst2_dev_acc"])
                losses.append(r["final_loss"])
                secs += r["seconds"]
            results[h][v].update({"sst2_dev_acc": statistics.fmean(accs), "sst2_dev_acc_per_seed": accs,
                                  "ft_final_loss": statistics.fmean(losses), "ft_seconds": secs})
            console.print(f"h={h:3d} {v:10s} MLM valid loss {results[h][v]['mlm_valid_loss']:.3f}  "
                          f"SST-2 dev {100 * results[h][v]['sst2_dev_acc']:.2f}%  ({secs:.0f} s)")
    phase("finetune", t0)

    # ---- goal and report -----------------------------------------------------------------------
    goal = {"metric": "sst2_dev_acc", "tolerance": TOLERANCE, "modes": {}}
    for m in ("layer", "neuron"):
        within = [results[h][m]["sst2_dev_acc"] >= results[h]["standalone"]["sst2_dev_acc"] - TOLERANCE for h in BUDGET_H]
        better = [results[h][m]["sst2_dev_acc"] > results[h]["shared"]["sst2_dev_acc"] for h in BUDGET_H]
        mlm_better = [results[h][m]["mlm_valid_loss"] < results[h]["shared"]["mlm_valid_loss"] for h in BUDGET_H]
        goal["modes"][m] = {"within_1pt_of_standalone": within, "better_than_shared": better,
                            "met_at_every_budget": all(within) and all(better),
                            "mlm_loss_below_shared": mlm_better}
    goal["met"] = any(g["met_at_every_budget"] for g in goal["modes"].values())
    goal["summary"] = ("layer- or neuron-wise MoS is within 1 point of standalone and above shared at every budget"
                       if goal["met"] else "not met: " + "; ".join(
                           f"{m}: within 1pt {sum(g['within_1pt_of_standalone'])}/{len(BUDGET_H)}, above shared "
                           f"{sum(g['better_than_shared'])}/{len(BUDGET_H)}" for m, g in goal["modes"].items()))

    t = Table(title=f"inherited vs standalone, bert-tiny, {args.steps} pre-training updates, {args.ft_steps} SST-2 "
                    f"updates x {args.ft_seeds} seed(s): SST-2 dev accuracy (validation MLM loss)")
    for col in ("hidden", "params", *VARIANTS, *(f"{m} - standalone" for m in MODES)):
        t.add_column(col)
    for h in BUDGET_H:
        r = results[h]
        row = [str(h), f"{budgets[h]:,}"]
        row += [f"{100 * r[v]['sst2_dev_acc']:.2f}% ({r[v]['mlm_valid_loss']:.3f})" for v in VARIANTS]
        row += [f"{100 * (r[m]['sst2_dev_acc'] - r['standalone']['sst2_dev_acc']):+.2f} pt" for m in MODES]
        t.add_row(*row)
    console.print(t)
    console.print(f"goal: {'[green]met[/]' if goal['met'] else '[red]not met[/]'} ({goal['summary']})")

    seconds["total"] = time.perf_counter() - t_all
    t2 = Table(title="time per phase (s)")
    t2.add_column("phase")
    t2.add_column("seconds")
    for k, s in seconds.items():
        t2.add_row(k, f"{s:.1f}")
    console.print(t2)
    out = {
        "budgets": [{"hidden": h, "params": budgets[h], "arch": archs[h].to_dict(),
                     "params_with_head": param_count(archs[h], space, vocab, n_classes=2),
                     "variants": results[h]} for h in BUDGET_H],
        "settings": {"quick": args.quick, "space": args.space, "vocab_size": vocab, "corpus": data.info,
                     "pretrain": asdict(cfg), "model_overrides": overrides, "standalone_mode": "shared",
                     "finetune": asdict(ft_cfgs[0]) | {"seeds": list(range(args.ft_seeds))}, "sst2": sst2.info,
                     "valid_blocks": sum(len(b) for b in batches), "threads": args.threads,
                     "device": describe(device), "host": {"cpu": platform.processor() or platform.machine(),
                                                          "torch": torch.__version__}},
        "pretrain": pretrain,
        "seconds": seconds,
        "goal": goal,
    }
    atomic_write_json(args.out, out)
    console.print(f"wrote {args.out} ({seconds['total'] / 60:.1f} min)")


if __name__ == "__main__":
    main()

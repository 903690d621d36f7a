"""Training throughput per FFN mode and MoS's overhead over plain weight sharing.

The three modes are timed interleaved (round r: shared, layer, neuron, each for a few
sandwich updates on the same batches), so drift on a shared machine hits all of them
alike; the table reports the median over rounds.

    python benchmarks/train_throughput.py            # Multi30k from ../shared/data, else synthetic
    python benchmarks/train_throughput.py --threads 1

Prints a table and writes benchmarks/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mosc.nn.batching import BatchIterator  # noqa: E402
from mosc.nn.corpus import load_corpus, shared_data_dir  # noqa: E402
from mosc.fileio import atomic_write_json  # noqa: E402
from mosc.nn.model import Supernet, SupernetConfig  # noqa: E402
from mosc.space import SearchSpace  # noqa: E402
from mosc.nn.train import TrainConfig, archs_for_update, update_loss  # noqa: E402

MODES = ("shared", "layer", "neuron")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", default=None, help="corpus spec (default: multi30k if present, else synthetic)")
    ap.add_argument("--space", default="tiny", help="search space")
    ap.add_argument("--vocab", type=int, default=5000, help="BPE vocabulary (as in supernet_gap.py)")
    ap.add_argument("--max-tokens", type=int, default=2048, help="padded tokens per batch")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds")
    ap.add_argument("--updates", type=int, default=8, help="timed updates per mode per round")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_throughput.json"), help="result JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    corpus = args.corpus or ("multi30k" if shared_data_dir() and (shared_data_dir() / "multi30k").is_dir() else "synthetic")
    data = load_corpus(corpus, vocab_size=args.vocab if corpus != "synthetic" else None)
    space = SearchSpace.load(args.space)
    cfg = TrainConfig(max_tokens=args.max_tokens)
    models, opts = {}, {}
    for mode in MODES:
        torch.manual_seed(0)
        models[mode] = Supernet(SupernetConfig(space=space.to_dict(), vocab_size=data.tokenizer.vocab_size, ffn_mode=mode)).train()
        opts[mode] = torch.optim.Adam(models[mode].parameters(), lr=1e-4)
    stream = BatchIterator(data.train, args.max_tokens, max_len=64).batches()
    samples = {m: [] for m in MODES}
    for r in range(args.rounds + 1):  # round 0 warms up allocators and caches, not recorded
        batches = [next(stream) for _ in range(args.updates)]
        seed = r
        for mode in MODES:
            rng = random.Random(seed)  # same archs for every mode in this round
            t0 = time.perf_counter()
            for b in batches:
                opts[mode].zero_grad(set_to_none=True)
                update_loss(models[mode], b, archs_for_update(space, rng, cfg.sandwich_random, None), cfg)
                torch.nn.utils.clip_grad_norm_(models[mode].parameters(), cfg.clip_norm)
                opts[mode].step()
            dt = time.perf_counter() - t0
            if r > 0:
                samples[mode].append(sum(b.n_tokens for b in batches) / dt)

    from rich.console import Console
    from rich.table import Table

    med = {m: statistics.median(v) for m, v in samples.items()}
    t = Table(title=f"training throughput, {corpus}, {args.threads} thread(s), sandwich of {2 + cfg.sandwich_random} archs/update")
    for c in ("mode", "target tokens/s (median)", "min", "max", "overhead vs shared", "params"):
        t.add_column(c)
    for m in MODES:
        n = sum(p.numel() for p in models[m].parameters())
        t.add_row(m, f"{med[m]:,.0f}", f"{min(samples[m]):,.0f}", f"{max(samples[m]):,.0f}",
                  f"{(med['shared'] / med[m] - 1) * 100:+.1f}%", f"{n:,}")
    Console(width=150).print(t)
    atomic_write_json(args.out, {
        "corpus": corpus, "space": args.space, "threads": args.threads, "max_tokens": args.max_tokens,
        "rounds": args.rounds, "updates_per_round": args.updates, "tokens_per_s": samples,
        "median_tokens_per_s": med, "overhead_vs_shared_pct": {m: (med["shared"] / med[m] - 1) * 100 for m in MODES},
        "host": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

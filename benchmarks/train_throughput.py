"""Training throughput per FFN mode, device and precision, and MoS's overhead over plain weight sharing.

The three modes are timed interleaved (round r: shared, layer, neuron, each for a few
sandwich updates on the same batches), so drift on a shared machine hits all of them
alike; the table reports the median over rounds. With several devices or precisions
every (device, precision, mode) takes its turn in each round the same way.

    python benchmarks/train_throughput.py            # Multi30k from ../shared/data, else synthetic
    python benchmarks/train_throughput.py --threads 1
    python benchmarks/train_throughput.py --device cpu cuda --precision fp32 bf16

Prints a table and writes benchmarks/results/train_throughput.json. Its top-level
`tokens_per_s`, `median_tokens_per_s` and `overhead_vs_shared_pct` are those of the first
device and precision; `by_device` has every pair: by_device[device][precision][...].
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

from mosc.errors import MoscError  # noqa: E402
from mosc.fileio import atomic_write_json  # noqa: E402
from mosc.nn.batching import BatchIterator  # noqa: E402
from mosc.nn.corpus import load_corpus, shared_data_dir  # noqa: E402
from mosc.nn.device import Amp, describe, resolve_device, to_device  # noqa: E402
from mosc.nn.model import Supernet, SupernetConfig  # noqa: E402
from mosc.nn.train import TrainConfig, archs_for_update, update_loss  # noqa: E402
from mosc.space import SearchSpace  # noqa: E402

MODES = ("shared", "layer", "neuron")


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", default=None, help="corpus spec (default: multi30k if present, else synthetic)")
    ap.add_argument("--space", default="tiny", help="search space")
    ap.add_argument("--vocab", type=int, default=5000, help="BPE vocabulary (as in supernet_gap.py)")
    ap.add_argument("--max-tokens", type=int, default=2048, help="padded tokens per batch")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds")
    ap.add_argument("--updates", type=int, default=8, help="timed updates per mode per round")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    ap.add_argument("--device", nargs="+", default=["auto"], help="devices: auto, cpu, cuda, cuda:N (several allowed)")
    ap.add_argument("--precision", nargs="+", default=["fp32"], help="fp32, bf16, fp16 (several allowed)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_throughput.json"), help="result JSON")
    return ap.parse_args()


def setups(devices: list[str], precisions: list[str]) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """[(device, precision)] that can run here, and {"device/precision": why not} for the rest."""
    ok, skipped = [], {}
    for spec in devices:
        dev = resolve_device(spec)
        for prec in precisions:
            try:
                Amp(dev, prec)
                ok.append((str(dev), prec))
            except MoscError as e:
                skipped[f"{dev}/{prec}"] = str(e)
    if not ok:
        raise MoscError("nothing to time: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    return list(dict.fromkeys(ok)), skipped


class Trainee:
    """One supernet of one mode on one device, in one precision, with its optimizer."""

    def __init__(self, mode: str, device: str, precision: str, space: SearchSpace, vocab: int):
        torch.manual_seed(0)
        self.device = torch.device(device)
        self.model = Supernet(SupernetConfig(space=space.to_dict(), vocab_size=vocab, ffn_mode=mode)).to(self.device).train()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        self.amp = Amp(self.device, precision)

    def timed_updates(self, batches, space, seed: int, cfg: TrainConfig) -> float:
        """Target tokens/s over the sandwich updates on these batches."""
        rng = random.Random(seed)  # same archs for every trainee in this round
        t0 = time.perf_counter()
        for b in batches:
            self.opt.zero_grad(set_to_none=True)
            update_loss(self.model, to_device(b, self.device), archs_for_update(space, rng, cfg.sandwich_random, None),
                        cfg, self.amp, b.n_tokens)
            self.amp.unscale(self.opt)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_norm)
            self.amp.step(self.opt)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the last step's kernels belong to this timing
        return sum(b.n_tokens for b in batches) / (time.perf_counter() - t0)


def run_rounds(trainees: dict, stream, space, cfg: TrainConfig, rounds: int, updates: int) -> dict:
    samples = {key: [] for key in trainees}
    for r in range(rounds + 1):  # round 0 warms up allocators, caches and CUDA kernels, not recorded
        batches = [next(stream) for _ in range(updates)]
        for key, t in trainees.items():
            tps = t.timed_updates(batches, space, r, cfg)
            if r > 0:
                samples[key].append(tps)
    return samples


def summary(samples: dict, pairs: list[tuple[str, str]]) -> dict:
    """by_device[device][precision] = {tokens_per_s, median_tokens_per_s, overhead_vs_shared_pct}."""
    out: dict = {}
    for dev, prec in pairs:
        raw = {m: samples[(dev, prec, m)] for m in MODES}
        med = {m: statistics.median(v) for m, v in raw.items()}
        out.setdefault(dev, {})[prec] = {"tokens_per_s": raw, "median_tokens_per_s": med,
                                         "overhead_vs_shared_pct": {m: (med["shared"] / med[m] - 1) * 100 for m in MODES}}
    return out


def print_table(by_device: dict, pairs, trainees, corpus: str, threads: int, cfg: TrainConfig) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"training throughput, {corpus}, {threads} CPU thread(s), sandwich of {2 + cfg.sandwich_random} archs/update")
    for c in ("device", "precision", "mode", "target tokens/s (median)", "min", "max", "overhead vs shared", "params"):
        t.add_column(c)
    for dev, prec in pairs:
        s = by_device[dev][prec]
        for m in MODES:
            n = sum(p.numel() for p in trainees[(dev, prec, m)].model.parameters())
            raw = s["tokens_per_s"][m]
            t.add_row(describe(torch.device(dev)), prec, m, f"{s['median_tokens_per_s'][m]:,.0f}", f"{min(raw):,.0f}",
                      f"{max(raw):,.0f}", f"{s['overhead_vs_shared_pct'][m]:+.1f}%", f"{n:,}")
    Console(width=170).print(t)


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    pairs, skipped = setups(args.device, args.precision)
    corpus = args.corpus or ("multi30k" if shared_data_dir() and (shared_data_dir() / "multi30k").is_dir() else "synthetic")
    data = load_corpus(corpus, vocab_size=args.vocab if corpus != "synthetic" else None)
    space = SearchSpace.load(args.space)
    cfg = TrainConfig(max_tokens=args.max_tokens)
    trainees = {(dev, prec, m): Trainee(m, dev, prec, space, data.tokenizer.vocab_size) for dev, prec in pairs for m in MODES}
    stream = BatchIterator(data.train, args.max_tokens, max_len=64).batches()
    samples = run_rounds(trainees, stream, space, cfg, args.rounds, args.updates)
    by_device = summary(samples, pairs)
    print_table(by_device, pairs, trainees, corpus, args.threads, cfg)
    first = by_device[pairs[0][0]][pairs[0][1]]
    gpus = {dev: torch.cuda.get_device_name(torch.device(dev)) for dev, _ in pairs if dev.startswith("cuda")}
    atomic_write_json(args.out, {
        "corpus": corpus, "space": args.space, "threads": args.threads, "max_tokens": args.max_tokens,
        "rounds": args.rounds, "updates_per_round": args.updates, **first,  # the first device and precision
        "device": pairs[0][0], "precision": pairs[0][1], "by_device": by_device, "skipped": skipped,
        "host": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "gpus": gpus},
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    try:
        main()
    except MoscError as e:
        sys.exit(f"error: {e}")

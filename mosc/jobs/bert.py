"""Jobs of the encoder-only (BERT) half: collapse-and-check, masked-LM evaluation, and the
search under a parameter budget.

Each takes plain arguments (paths, names, numbers) and returns plain data; none prints.
The CLI calls these and only these. torch is imported inside the functions.

The search is HAT's evolutionary search (mosc.search.evolve, unchanged) over a BertSpace:
fitness = the supernet's validation masked-LM loss at the arch (inherited weights, the
same masked positions for every arch), constraint = the static encoder's parameter
count, counted from the arch alone (mosc.bert_space.param_count).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mosc.bert_space import BertArch, BertSpace, param_count
from mosc.errors import MoscError
from mosc.jobs.model import CollapseResult

Log = Callable[[str], None]
MAX_VALID_BLOCKS = 256  # validation blocks a fitness call scores (the same for every arch)


def is_bert_checkpoint(path: Path | None) -> bool:
    """Whether a model or run folder holds an encoder-only supernet (read from its config)."""
    from mosc.fileio import model_kind
    from mosc.nn.bert import BERT_SUPERNET_KIND

    return path is not None and model_kind(path) == BERT_SUPERNET_KIND


def load_bert_arch(path: Path, space: BertSpace) -> BertArch:
    return space.validate(BertArch.load(path))


def bert_supernet_for(checkpoint: Path | None, space: str, mode: str, seed: int):
    """(supernet, checkpoint config or {}, description): a trained one, or a fresh seeded one."""
    import torch

    from mosc.nn.bert import BertConfig, BertSupernet, load_bert_supernet
    from mosc.nn.modes import FFNMode

    if checkpoint is not None:
        supernet, meta = load_bert_supernet(checkpoint)
        return supernet, meta, str(checkpoint)
    mode = FFNMode(mode).value
    torch.manual_seed(seed)
    supernet = BertSupernet(BertConfig(space=BertSpace.load(space).to_dict(), ffn_mode=mode)).eval()
    return supernet, {}, f"untrained {mode} BERT supernet (seed {seed})"


def collapse_bert_and_check(checkpoint: Path | None, arch_file: Path | None, out: Path | None, *,
                            space: str = "bert-tiny", mode: str = "neuron", seed: int = 0) -> CollapseResult:
    """Collapse an encoder-only supernet at one arch, compare outputs and parameter counts,
    optionally save the static encoder (with the run's tokenizer)."""
    import torch

    from mosc.nn.bert import collapse_bert, count_parameters, save_bert_encoder

    supernet, meta, source = bert_supernet_for(checkpoint, space, mode, seed)
    sp = supernet.space
    arch = load_bert_arch(arch_file, sp) if arch_file else sp.sample(random.Random(seed))
    t0 = time.perf_counter()
    enc = collapse_bert(supernet, arch)
    collapse_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, supernet.cfg.vocab_size, (4, 20), generator=g)
    tokens[1, 12:] = supernet.cfg.pad_id
    with torch.no_grad():
        diff = (supernet(tokens, arch) - enc(tokens)).abs().max().item()
    r = CollapseResult(source, arch, sp.name, supernet.cfg.ffn_mode.value, count_parameters(supernet),
                       count_parameters(enc), param_count(arch, sp, supernet.cfg.vocab_size), diff, collapse_s)
    if out is not None:
        extra = {"source": source, "max_abs_diff": diff}
        if "tokenizer" in meta:
            extra["tokenizer"] = meta["tokenizer"]
        save_bert_encoder(enc, out, extra)
        r.out = str(out)
    return r


@dataclass
class MlmFitness:
    """score(arch) -> validation MLM loss of the supernet at arch (lower is better)."""

    space: BertSpace
    vocab_size: int
    score: Callable[[BertArch], float]
    blocks: int  # validation blocks scored per arch


def _run_and_valid(checkpoint: Path, valid_blocks: int, device: str):
    """(supernet in eval mode on the device, its config.json dict, the masked validation
    batches of its own text, how many blocks they hold, the device)."""
    from mosc.nn.device import resolve_device
    from mosc.nn.mlm import valid_batches
    from mosc.nn.train import load_bert_trained, load_run_text

    dev = resolve_device(device)
    model, tok, meta = load_bert_trained(checkpoint)
    data = load_run_text(meta, tok)
    batches = valid_batches(data.valid, data.vocab_size - 1, max_blocks=valid_blocks)
    return model.to(dev).eval(), meta, batches, min(valid_blocks, len(data.valid)), dev


def mlm_fitness(checkpoint: Path, valid_blocks: int = MAX_VALID_BLOCKS, device: str = "auto") -> MlmFitness:
    from mosc.nn.mlm import mlm_loss

    model, _, batches, n_blocks, dev = _run_and_valid(checkpoint, valid_blocks, device)
    score = lambda a: mlm_loss(lambda x: model(x, a), model.mlm_logits, batches, dev)  # noqa: E731
    return MlmFitness(model.space, model.cfg.vocab_size, score, n_blocks)


def evaluate_mlm(checkpoint: Path, arch_file: Path | None = None, encoder: Path | None = None,
                 valid_blocks: int = MAX_VALID_BLOCKS, device: str = "auto") -> dict:
    """Validation MLM loss (nats per masked token) of the supernet at an arch (default: the
    run's fixed arch, else the largest) or of a collapsed encoder, on the run's text."""
    import math

    from mosc.nn.bert import load_bert_encoder
    from mosc.nn.mlm import mlm_loss
    from mosc.nn.train import run_arch

    model, meta, batches, n_blocks, dev = _run_and_valid(checkpoint, valid_blocks, device)
    if encoder is not None:
        if arch_file is not None:
            raise MoscError("--arch goes with the supernet; an --encoder folder already has its arch")
        enc, _ = load_bert_encoder(encoder)
        if enc.cfg.vocab_size != model.cfg.vocab_size:
            raise MoscError(f"encoder {encoder} has vocabulary {enc.cfg.vocab_size}, the run {model.cfg.vocab_size}")
        enc.to(dev).eval()
        arch, loss, what = enc.arch, mlm_loss(enc, enc.mlm_logits, batches, dev), f"encoder {encoder}"
    else:
        arch = load_bert_arch(arch_file, model.space) if arch_file else run_arch(model, meta)
        loss, what = mlm_loss(lambda x: model(x, arch), model.mlm_logits, batches, dev), f"supernet {checkpoint}"
    return {"what": what, "arch": arch.to_dict(), "arch_hash": arch.hash, "mlm_valid_loss": loss,
            "perplexity": math.exp(min(loss, 50.0)), "valid_blocks": n_blocks,
            "params": param_count(arch, model.space, model.cfg.vocab_size)}


def check_max_params(space: BertSpace, vocab_size: int, max_params) -> int:
    """A budget the smallest arch fits (else nothing can), as a whole number of parameters."""
    if isinstance(max_params, bool) or not isinstance(max_params, int | float) or not max_params > 0 \
            or max_params != max_params or max_params == float("inf"):
        raise MoscError(f"--max-params must be a positive number of parameters, got {max_params}")
    low = param_count(space.smallest(), space, vocab_size)
    if low > max_params:
        raise MoscError(f"no arch of space {space.name!r} fits {max_params:,.0f} parameters: the smallest has "
                        f"{low:,}; raise --max-params")
    return int(max_params)


def search_params(fit: MlmFitness, max_params: float, cfg, log: Log | None = None):
    """Lowest validation MLM loss under a parameter budget (HAT's evolution; cost in millions
    of parameters). Returns mosc.search.evolve.SearchResult with latency_ms = M params."""
    from mosc.search.evolve import evolve

    budget = check_max_params(fit.space, fit.vocab_size, max_params)
    millions = lambda a: param_count(a, fit.space, fit.vocab_size) / 1e6  # noqa: E731
    return evolve(fit.space, fit.score, millions, budget / 1e6, cfg.check(fit.space), log=log, unit="M params")


def write_search(out: Path, res, info: dict) -> None:
    """best.json (the arch) and search.json (settings, best, front, history), atomically."""
    from mosc.fileio import atomic_write_json, atomic_write_text

    row = lambda c: {"arch": c.arch.to_dict(), "arch_hash": c.arch.hash, "mlm_valid_loss": c.loss,  # noqa: E731
                     "params": round(c.latency_ms * 1e6)}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "best.json", res.best.arch.to_json(indent=2) + "\n")
    atomic_write_json(out / "search.json", {**info, "best": row(res.best), "front": [row(c) for c in res.front],
                                            "history": res.history, "evaluated": res.evaluated,
                                            "seconds": round(res.seconds, 2)})

"""Jobs of the torch world: collapse-and-check, export, the search fitness.

Each takes plain arguments (paths, names, numbers) and returns plain data; none prints.
The CLI and the pipeline call these and only these, so a job exists once. Imports torch
inside the functions: `mosc --help` stays fast.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mosc.errors import MoscError
from mosc.space import Arch, SearchSpace

Log = Callable[[str], None]
COLLAPSE_ATOL = 1e-5  # max |supernet(x, arch) - collapsed(x)| accepted (fp32; observed: 0.0)


def load_arch(path: Path, space: SearchSpace) -> Arch:
    """An arch JSON file, validated against the space (one-line errors)."""
    return space.validate(Arch.load(path))


@dataclass
class CollapseResult:
    source: str  # where the supernet came from
    arch: Arch
    space: str
    ffn_mode: str
    supernet_params: int
    subnet_params: int
    analytic_params: int  # counted from the arch alone
    max_abs_diff: float  # |supernet(x, arch) - collapsed(x)| on a padded random batch
    collapse_s: float
    out: str | None = None  # folder written, if any

    @property
    def exact(self) -> bool:
        return self.subnet_params == self.analytic_params and self.max_abs_diff <= COLLAPSE_ATOL


def supernet_for(checkpoint: Path | None, space: str, mode: str, seed: int):
    """(supernet, checkpoint config or {}, description): a trained one, or a fresh seeded one."""
    import torch

    from mosc.nn.model import FFNMode, Supernet, SupernetConfig, load_supernet

    if checkpoint is not None:
        supernet, meta = load_supernet(checkpoint)
        return supernet, meta, str(checkpoint)
    mode = FFNMode(mode).value  # an enum member or its name
    torch.manual_seed(seed)
    sp = SearchSpace.load(space)
    supernet = Supernet(SupernetConfig(space=sp.to_dict(), ffn_mode=mode)).eval()
    return supernet, {}, f"untrained {mode} supernet (seed {seed})"


def collapse_diff(supernet, sub, seed: int = 0) -> float:
    """max |supernet(x, arch) - sub(x)| on a random batch with padding (both in eval mode)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    V = supernet.cfg.vocab_size
    src = torch.randint(4, V, (4, 20), generator=g)
    src[1, 12:] = supernet.cfg.pad_id
    tgt = torch.randint(4, V, (4, 15), generator=g)
    with torch.no_grad():
        return (supernet(src, tgt, sub.arch) - sub(src, tgt)).abs().max().item()


def collapse_and_check(checkpoint: Path | None, arch_file: Path | None, out: Path | None, *, space: str = "tiny",
                       mode: str = "neuron", seed: int = 0) -> CollapseResult:
    """Collapse a supernet at one arch, compare it with the supernet, optionally save it.

    The check is the core invariant: same outputs, parameter count equal to the analytic
    count. The caller decides what a failed check means (`mosc collapse` exits 2)."""
    from mosc.nn.model import count_parameters
    from mosc.nn.subnet import analytic_param_count, collapse, save_subnet

    supernet, meta, source = supernet_for(checkpoint, space, mode, seed)
    sp = supernet.space
    arch = load_arch(arch_file, sp) if arch_file else sp.sample(random.Random(seed))
    t0 = time.perf_counter()
    sub = collapse(supernet, arch)
    collapse_s = time.perf_counter() - t0
    diff = collapse_diff(supernet, sub, seed)
    r = CollapseResult(source, arch, sp.name, supernet.cfg.ffn_mode.value, count_parameters(supernet),
                       count_parameters(sub), analytic_param_count(arch, supernet.cfg.vocab_size, sp.qkv_dim), diff,
                       collapse_s)
    if out is not None:
        extra = {"source": source, "max_abs_diff": diff}
        if "tokenizer" in meta:  # a trained run's tokenizer travels with the subnet (export, translate)
            extra["tokenizer"] = meta["tokenizer"]
        save_subnet(sub, out, extra)
        r.out = str(out)
    return r


def load_subnet_source(subnet: Path | None, checkpoint: Path | None, arch_file: Path | None):
    """(Subnet, tokenizer JSON or None, description) from a subnet folder, or a checkpoint
    collapsed at an arch."""
    if (subnet is None) == (checkpoint is None):
        raise MoscError("give exactly one of --subnet DIR or --checkpoint RUN (with --arch a.json)")
    if subnet is not None:
        if arch_file is not None:
            raise MoscError("--arch goes with --checkpoint; a --subnet folder already has its arch")
        from mosc.fileio import read_json
        from mosc.nn.subnet import load_subnet

        sub = load_subnet(subnet)
        meta = read_json(subnet / "config.json", "subnet config")
        return sub, meta.get("tokenizer"), f"subnet {subnet}"
    if arch_file is None:
        raise MoscError("--checkpoint needs --arch a.json (the architecture to collapse and export)")
    from mosc.fileio import resolve_checkpoint
    from mosc.nn.model import load_supernet
    from mosc.nn.subnet import collapse

    ckpt = resolve_checkpoint(checkpoint)
    supernet, meta = load_supernet(ckpt)
    arch = load_arch(arch_file, supernet.space)
    return collapse(supernet, arch), meta.get("tokenizer"), f"{ckpt} at arch {arch.hash}"


def export(subnet: Path | None, checkpoint: Path | None, arch_file: Path | None, out: Path, target,
           shapes: dict | None = None, check: bool = True) -> dict:
    """Collapse (if needed) and export to the target's static ONNX graphs; returns export.json.
    shapes: overrides of batch / source_len / cache_len (None: the target's protocol)."""
    from mosc.nn.export import Shapes, export_subnet

    sh = Shapes.from_protocol(target.protocol, **(shapes or {}))
    sub, tok_json, source = load_subnet_source(subnet, checkpoint, arch_file)
    return export_subnet(sub, out, sh, tokenizer_json=tok_json, check=check, extra={"source": source})


def supernet_fitness(checkpoint: Path, val_sentences: int, max_tokens: int = 4096, device: str = "auto"):
    """(space, arch -> validation loss of the supernet at arch on the first N validation sentences),
    computed on `device` (auto: the GPU when there is one; the checkpoint loads anywhere)."""
    from mosc.nn.device import resolve_device
    from mosc.nn.evaluate import supernet_fitness as fitness
    from mosc.nn.train import load_run_corpus, load_trained

    resolve_device(device)  # a device that is not here fails before the checkpoint and corpus are read
    model, tok, meta = load_trained(checkpoint)
    return model.space, fitness(model, load_run_corpus(meta, tok), val_sentences, max_tokens, device)


def train_or_resume(run_dir: Path, *, steps: int, corpus: str, space: str, mode: str, cfg, model_overrides: dict,
                    corpus_args: dict, log: Log = print) -> dict:
    """Train a supernet into run_dir, resume it if it stopped early, or reuse it when it is
    already at `steps` or beyond. Returns what happened (steps, resumed, checkpoint, ...)."""
    from mosc.fileio import latest_checkpoint, read_json
    from mosc.nn.train import train

    ck = latest_checkpoint(run_dir) if run_dir.exists() else None
    done = read_json(ck / "config.json", "checkpoint config").get("train", {}).get("step") if ck else None
    if ck is not None and done is not None and done >= steps:
        log(f"{run_dir} is already at step {done} (>= {steps}): reusing it")
        r = {"steps": done, "resumed": True, "trained_now": 0}
    else:
        if ck is not None:
            log(f"resuming {run_dir} from step {done}")
        res = train(run_dir, corpus=corpus, space=space, mode=mode, cfg=cfg, model_overrides=model_overrides,
                    corpus_args=corpus_args, resume=ck is not None)
        r = {"steps": res.steps, "resumed": ck is not None, "final_loss": res.final_loss,
             "tokens_per_s": res.tokens_per_s}
    r["checkpoint"] = str(latest_checkpoint(run_dir))
    return r

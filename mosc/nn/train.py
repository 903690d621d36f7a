"""Supernet training: the sandwich rule with checkpoints that resume bit for bit.

One update = gradients of the largest, the smallest and k random archs accumulated over
the same batch, then one Adam step (HAT/MoS recipe, MOS.md section 3): linear warm-up,
cosine decay, label-smoothed cross-entropy, gradient clipping, dropout scaled by the
arch's embed dim (inside the model), and optional in-place distillation from the largest
arch. With `arch=` the same loop trains one fixed architecture from scratch: the
"standalone" baseline (a supernet whose every update uses one arch only computes, and
updates, exactly that arch's slices).

A run folder holds `step_NNNNNNN/` checkpoints and a `latest` pointer written after the
checkpoint is complete, so a crash mid-write leaves the previous one valid. A checkpoint
has the weights, the Adam moments, the torch RNG (dropout), the arch sampler's RNG and the
batch iterator's position: resuming continues exactly where the run stopped.

Data parallel: started under `torchrun` (WORLD_SIZE > 1) every process takes a disjoint
shard of each epoch's batches, gradients are averaged with one all-reduce per update
(gloo on CPU), and rank 0 alone writes. Archs are drawn from the same seeded RNG on every
rank, so all ranks train the same archs on different data. Bit-for-bit resume is for a
single process (other ranks' dropout RNG is reseeded from the step).

Knows nothing of devices, latency or search.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from mosc.contract import PAD_ID
from mosc.nn.batching import BatchIterator
from mosc.nn.corpus import ParallelData, load_corpus
from mosc.nn.tokenizer import SubwordTokenizer
from mosc.errors import MoscError
from mosc.fileio import atomic_write_text, latest_checkpoint, load_tensors, save_tensors
from mosc.nn.model import FFNMode, Supernet, SupernetConfig, load_supernet, save_supernet
from mosc.space import Arch, SearchSpace


@dataclass
class TrainConfig:
    steps: int = 2000  # optimizer updates in total
    max_tokens: int = 2048  # padded tokens per batch (per process)
    lr: float = 1e-3  # peak learning rate, reached after warm-up
    warmup: int = 200  # linear warm-up updates
    min_lr: float = 1e-7  # cosine decay ends here at `steps`
    beta2: float = 0.98  # Adam betas = (0.9, beta2)
    label_smoothing: float = 0.1
    clip_norm: float = 1.0  # max global gradient norm (0 = no clipping)
    sandwich_random: int = 1  # k: random archs per update besides the largest and smallest
    distill: float = 0.0  # weight of KL(largest || arch) for the other archs (0 = off)
    save_every: int = 500  # checkpoint every N updates (and always at the end)
    keep: int = 2  # checkpoints kept in the run folder
    log_every: int = 20  # updates between log lines (log.jsonl and the progress bar)
    max_len: int = 128  # longest sentence in subword tokens (longer pairs are skipped)
    seed: int = 0  # arch sampling, dropout, batch order

    def lr_at(self, step: int) -> float:
        """Learning rate for update number `step` (0-based)."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.steps - self.warmup))
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * progress))


# ---- one update -------------------------------------------------------------------------


def archs_for_update(space: SearchSpace, rng: random.Random, k: int, fixed: Arch | None) -> list[Arch]:
    """Sandwich rule: largest, smallest, k random (the largest first: it is the teacher)."""
    if fixed is not None:
        return [fixed]
    return [space.largest(), space.smallest()] + [space.sample(rng) for _ in range(k)]


def update_loss(model: Supernet, batch, archs: list[Arch], cfg: TrainConfig) -> float:
    """Forward + backward every arch on the batch (gradients accumulate); returns mean loss."""
    n_tok = batch.n_tokens
    teacher = None
    total = 0.0
    for i, arch in enumerate(archs):
        logits = model(batch.src, batch.tgt_in, arch)  # [B, T, V]
        flat, gold = logits.flatten(0, 1), batch.tgt_out.flatten()
        loss = F.cross_entropy(flat, gold, ignore_index=PAD_ID, label_smoothing=cfg.label_smoothing, reduction="sum") / n_tok
        if cfg.distill > 0 and i == 0 and len(archs) > 1:
            teacher = torch.log_softmax(flat.detach(), -1)
        elif teacher is not None:
            mask = (gold != PAD_ID).float()
            kl = (F.kl_div(torch.log_softmax(flat, -1), teacher, log_target=True, reduction="none").sum(-1) * mask).sum() / n_tok
            loss = (1 - cfg.distill) * loss + cfg.distill * kl
        (loss / len(archs)).backward()
        total += loss.item()
    return total / len(archs)


# ---- distributed ------------------------------------------------------------------------


def dist_info() -> tuple[int, int]:
    """(rank, world_size) from torchrun's environment; (0, 1) when run plainly."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def all_reduce_grads(model: Supernet, world: int):
    """Average gradients over ranks with one flat all-reduce (params without grad count as 0)."""
    import torch.distributed as dist

    params = list(model.parameters())
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


# ---- checkpoints ------------------------------------------------------------------------


def _optim_tensors(opt: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, torch.Tensor]:
    out = {}
    for idx, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"{names[idx]}::{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def _load_optim(opt: torch.optim.Optimizer, names: dict[int, str], tensors: dict):
    sd = opt.state_dict()
    by_name = {v: k for k, v in names.items()}
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        name, k = key.split("::")
        state.setdefault(by_name[name], {})[k] = v
    sd["state"] = state
    opt.load_state_dict(sd)


def save_checkpoint(run: Path, step: int, model: Supernet, opt, names, data_meta: dict, cfg: TrainConfig,
                    rng: random.Random, batches: BatchIterator, fixed: Arch | None) -> Path:
    ckpt = run / f"step_{step:07d}"
    if ckpt.exists():
        shutil.rmtree(ckpt)
    optim_sha = save_tensors({**_optim_tensors(opt, names), "__torch_rng__": torch.get_rng_state()}, ckpt / "optim.safetensors")
    save_supernet(model, ckpt, {
        **data_meta,
        "train": {"config": asdict(cfg), "step": step, "fixed_arch": fixed.to_dict() if fixed else None,
                  "arch_rng": json.loads(json.dumps(rng.getstate())), "batches": batches.state_dict(),
                  "optim_sha256": optim_sha},
    })
    atomic_write_text(run / "latest", ckpt.name + "\n")  # the checkpoint is complete: point at it
    for old in sorted(run.glob("step_*"))[: -cfg.keep]:
        shutil.rmtree(old, ignore_errors=True)
    return ckpt


def load_trained(path: str | Path) -> tuple[Supernet, SubwordTokenizer, dict]:
    """(supernet, tokenizer, config.json dict) from a checkpoint or run folder."""
    model, meta = load_supernet(path)
    if "tokenizer" not in meta:
        raise MoscError(f"{path} has no tokenizer: not written by `mosc train`")
    return model, SubwordTokenizer.from_json(meta["tokenizer"]), meta


def load_run_corpus(meta: dict, tokenizer: SubwordTokenizer) -> ParallelData:
    """The corpus a checkpoint was trained on (same files/synthetic settings), with its tokenizer."""
    args = {k: v for k, v in meta.get("corpus_args", {}).items() if k != "vocab_size"}
    return load_corpus(meta["corpus"], tokenizer=tokenizer, **args)


# ---- the loop ---------------------------------------------------------------------------


class _FinishUpdateOnCtrlC:
    """The first Ctrl-C only sets `requested`: the loop finishes the update it is in, saves and
    stops, so the checkpoint's batch position and RNGs match its weights (an update cut in
    half would leave the iterator and RNGs one update ahead). A second Ctrl-C stops at once.
    Single process, main thread only; elsewhere Ctrl-C interrupts as usual."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested = False
        self._old = None

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self._old)  # the next Ctrl-C is a plain KeyboardInterrupt

    def __enter__(self):
        if self.enabled:
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self.enabled and not self.requested:
            signal.signal(signal.SIGINT, self._old)


@dataclass
class TrainResult:
    run: Path
    checkpoint: Path
    steps: int
    final_loss: float
    tokens_per_s: float  # target tokens of data per second (each token seen by every sandwich arch)
    seconds: float
    history: list[dict] = field(default_factory=list)
    start_step: int = 0  # where this call began (> 0 when it resumed)


@dataclass
class _Start:
    """Where a run starts: a fresh model, or everything restored from a checkpoint."""

    model: Supernet
    cfg: TrainConfig
    data: ParallelData
    tokenizer: SubwordTokenizer  # the checkpoint's when resuming (not necessarily data's)
    corpus: str
    corpus_args: dict
    fixed: Arch | None  # the one arch of a standalone run
    step: int = 0
    ckpt: Path | None = None  # the checkpoint resumed from
    saved: dict | None = None  # its config.json["train"]


def _init_distributed() -> tuple[int, int]:
    """(rank, world_size); joins the gloo process group when started by torchrun."""
    rank, world = dist_info()
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
    return rank, world


def _checkpoint_to_resume(run: Path, resume: bool) -> Path | None:
    """The run folder's latest checkpoint when resuming; refuses to overwrite a run or resume nothing."""
    ckpt = latest_checkpoint(run) if run.exists() else None
    if ckpt is not None and not resume:
        raise MoscError(f"{run} already holds a run (at {ckpt.name}); pass --resume to continue it or choose another --out")
    if resume and ckpt is None:
        raise MoscError(f"nothing to resume in {run} (no 'latest' checkpoint)")
    return ckpt


def _resumed_start(ckpt: Path, cfg: TrainConfig, data: ParallelData | None) -> _Start:
    """Everything comes from the checkpoint (model, config, tokenizer, corpus) except cfg.steps."""
    model, meta = load_supernet(ckpt)
    tr = meta["train"]
    saved_cfg = TrainConfig(**tr["config"])
    cfg = TrainConfig(**{**asdict(saved_cfg), "steps": cfg.steps})  # only the horizon may change
    tokenizer = SubwordTokenizer.from_json(meta["tokenizer"])
    fixed = Arch.from_dict(tr["fixed_arch"]) if tr["fixed_arch"] else None
    corpus_args = {k: v for k, v in meta.get("corpus_args", {}).items() if k != "vocab_size"}
    if data is None:
        data = load_run_corpus(meta, tokenizer)
    return _Start(model, cfg, data, tokenizer, meta["corpus"], corpus_args, fixed, tr["step"], ckpt, tr)


def _fresh_start(space: str, mode: str, arch: Arch | None, corpus: str, corpus_args: dict | None,
                 data: ParallelData | None, cfg: TrainConfig, model_overrides: dict | None) -> _Start:
    """A new supernet initialized from cfg.seed, and the corpus (loaded unless given)."""
    s = SearchSpace.load(space)
    if mode not in FFNMode.__members__:
        raise MoscError(f"mode must be one of {', '.join(FFNMode.__members__)}, got {mode!r}")
    fixed = s.validate(arch) if arch is not None else None
    corpus_args = dict(corpus_args or {})
    if data is None:
        data = load_corpus(corpus, **corpus_args)
    torch.manual_seed(cfg.seed)
    model = Supernet(SupernetConfig(space=s.to_dict(), vocab_size=data.tokenizer.vocab_size, ffn_mode=mode,
                                    max_positions=max(256, cfg.max_len + 2), **(model_overrides or {})))
    return _Start(model, cfg, data, data.tokenizer, corpus, corpus_args, fixed)


def _restore_training_state(s: _Start, opt: torch.optim.Optimizer, names: dict[int, str],
                            batches: BatchIterator, arch_rng: random.Random) -> None:
    """Adam moments, the torch RNG (dropout), batch position and arch RNG from s.ckpt."""
    tensors = load_tensors(s.ckpt / "optim.safetensors", s.saved.get("optim_sha256"))
    torch.set_rng_state(tensors.pop("__torch_rng__"))
    _load_optim(opt, names, tensors)
    batches.load_state_dict(s.saved["batches"])
    st = s.saved["arch_rng"]
    arch_rng.setstate((st[0], tuple(st[1]), st[2]))


def _progress_bar(show: bool):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]train[/] {task.fields[what]}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                    TimeElapsedColumn(), TimeRemainingColumn(), disable=not show, transient=False)


class _Run:
    """One training run in progress: the state that updates, log lines and checkpoints share."""

    def __init__(self, run: Path, s: _Start, rank: int, world: int):
        cfg = self.cfg = s.cfg
        self.run, self.rank, self.world, self.model, self.fixed = run, rank, world, s.model, s.fixed
        self.names = {i: n for i, (n, _) in enumerate(s.model.named_parameters())}
        self.opt = torch.optim.Adam(s.model.parameters(), lr=cfg.lr, betas=(0.9, cfg.beta2))
        self.batches = BatchIterator(s.data.train, cfg.max_tokens, max_len=cfg.max_len, seed=cfg.seed, rank=rank, world_size=world)
        self.arch_rng = random.Random(cfg.seed)
        if s.saved is not None:
            _restore_training_state(s, self.opt, self.names, self.batches, self.arch_rng)
            if rank > 0:
                torch.manual_seed(cfg.seed * 1000 + rank * 7919 + s.step)
        elif rank > 0:
            torch.manual_seed(cfg.seed + rank)  # different dropout masks per rank
        self.data_meta = {"tokenizer": s.tokenizer.to_json(), "corpus": s.corpus, "corpus_args": s.corpus_args,
                          "corpus_info": s.data.info}
        if rank == 0:
            run.mkdir(parents=True, exist_ok=True)
        if cfg.steps <= s.step:
            raise MoscError(f"run is already at step {s.step}; ask for more --steps than that")
        self.start = self.step = self.ckpt_step = s.step
        self.last, self.tok_count, self.t_start = 0.0, 0, 0.0
        self.window_loss, self.window_n = 0.0, 0
        self.history: list[dict] = []

    def loop(self, progress: bool) -> None:
        """Updates until cfg.steps. Ctrl-C: save what was done, say how to resume, re-raise."""
        self.model.train()
        stream = self.batches.batches()
        self.t_start = time.perf_counter()
        prog = _progress_bar(progress and self.rank == 0)
        what = "standalone " + self.fixed.hash if self.fixed else f"{self.model.cfg.ffn_mode.value} supernet"
        try:
            with _FinishUpdateOnCtrlC(self.world == 1) as ctrl_c, prog:
                task = prog.add_task("train", total=self.cfg.steps, completed=self.start, what=what, loss="-", tps="-")
                while self.step < self.cfg.steps and not ctrl_c.requested:
                    self.update(next(stream))
                    self.after_update(prog, task)
            if ctrl_c.requested:
                raise KeyboardInterrupt
        except KeyboardInterrupt:
            self.save_interrupted()
            raise

    def update(self, batch) -> None:
        """One optimizer update: the sandwich archs' gradients on one batch (averaged over ranks)."""
        cfg, opt = self.cfg, self.opt
        archs = archs_for_update(self.model.space, self.arch_rng, cfg.sandwich_random, self.fixed)
        for g in opt.param_groups:
            g["lr"] = cfg.lr_at(self.step)
        opt.zero_grad(set_to_none=True)
        self.last = update_loss(self.model, batch, archs, cfg)
        if self.world > 1:
            all_reduce_grads(self.model, self.world)
        if cfg.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_norm)
        opt.step()
        self.step += 1
        self.tok_count += batch.n_tokens * self.world
        self.window_loss, self.window_n = self.window_loss + self.last, self.window_n + 1

    def after_update(self, prog, task) -> None:
        """Log line every cfg.log_every updates, checkpoint every cfg.save_every (and both at the end)."""
        step, cfg = self.step, self.cfg
        if step % cfg.log_every == 0 or step == cfg.steps:
            rec = self.log_line()
            prog.update(task, loss=f"{rec['loss']:.3f}", tps=f"{rec['tokens_per_s']:,.0f}")
        prog.update(task, completed=step)
        if self.rank == 0 and (step % cfg.save_every == 0 or step == cfg.steps):
            self.save()

    def log_line(self) -> dict:
        """The mean loss since the last line, into history and (rank 0) log.jsonl."""
        tps = self.tok_count / (time.perf_counter() - self.t_start)
        rec = {"step": self.step, "loss": self.window_loss / self.window_n, "lr": self.cfg.lr_at(self.step - 1),
               "tokens_per_s": tps}
        self.history.append(rec)
        self.window_loss, self.window_n = 0.0, 0
        if self.rank == 0:
            with open(self.run / "log.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
        return rec

    def save(self) -> None:
        save_checkpoint(self.run, self.step, self.model, self.opt, self.names, self.data_meta, self.cfg,
                        self.arch_rng, self.batches, self.fixed)
        self.ckpt_step = self.step

    def save_interrupted(self) -> None:
        """Keep what was done (resume continues from here) and say how to resume; rank 0 only."""
        if self.rank != 0:
            return
        if self.step > self.ckpt_step:
            self.save()
        run, saved = self.run, latest_checkpoint(self.run) if self.run.exists() else None
        print(f"interrupted at step {self.step}: " + (f"checkpoint {saved}; `mosc train -o {run} --steps {self.cfg.steps} "
              "--resume` continues it" if saved else "nothing saved yet"), file=sys.stderr)

    def result(self) -> TrainResult:
        seconds = time.perf_counter() - self.t_start
        if self.world > 1:
            _check_ranks_agree(self.model)
        return TrainResult(self.run, latest_checkpoint(self.run) if self.rank == 0 else self.run, self.step, self.last,
                           self.tok_count / max(seconds, 1e-9), seconds, self.history, self.start)


def _check_ranks_agree(model: Supernet) -> None:
    """Every rank applied the same averaged gradients: weights must agree bit for bit."""
    import torch.distributed as dist

    check = torch.stack([p.detach().double().sum() for p in model.parameters()])
    low, high = check.clone(), check.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise MoscError("data-parallel ranks diverged: their weights differ after training")
    dist.barrier()


def train(
    run: str | Path,
    corpus: str = "synthetic",
    space: str = "tiny",
    mode: str = "neuron",
    cfg: TrainConfig = TrainConfig(),
    model_overrides: dict | None = None,
    corpus_args: dict | None = None,
    arch: Arch | None = None,
    resume: bool = False,
    data: ParallelData | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train a supernet (or, with arch=, one fixed arch) into the run folder."""
    run = Path(run)
    rank, world = _init_distributed()
    ckpt = _checkpoint_to_resume(run, resume)
    if ckpt is not None:
        start = _resumed_start(ckpt, cfg, data)
    else:
        start = _fresh_start(space, mode, arch, corpus, corpus_args, data, cfg, model_overrides)
    r = _Run(run, start, rank, world)
    r.loop(progress)
    return r.result()

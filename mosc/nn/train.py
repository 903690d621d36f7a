"""Supernet training: the sandwich rule with checkpoints that resume bit for bit.

One update = gradients of the largest, the smallest and k random archs accumulated over
the same batch, then one Adam step (HAT/MoS recipe, MOS.md section 3): linear warm-up,
cosine decay, label-smoothed cross-entropy, gradient clipping, dropout scaled by the
arch's embed dim (inside the model), and optional in-place distillation from the largest
arch. With `arch=` the same loop trains one fixed architecture from scratch: the
"standalone" baseline (a supernet whose every update uses one arch only computes, and
updates, exactly that arch's slices).

A run folder holds `step_NNNNNNN/` checkpoints and a `latest` pointer. A checkpoint is
written under a hidden name, renamed into place when complete, and only then named by
`latest`, so a crash mid-write leaves the previous one valid. A checkpoint has the weights,
the Adam moments, the torch RNG (dropout), the arch sampler's RNG and the batch iterator's
position, always of the same update: resuming continues exactly where the run stopped, also
after Ctrl-C pressed any number of times at any moment (see `_CtrlC`).

Devices (mosc.nn.device): the model, each batch and the loss live on `cfg.device` (auto =
the GPU when torch sees one), the forward runs under autocast in bf16/fp16, and fp16 scales
the loss (skipped overflowed steps are counted in the log). Checkpoints hold CPU tensors
only (weights, Adam moments, the CPU RNG and, from a GPU, the CUDA RNG stored apart), so a
run trained on a GPU resumes, collapses and exports on a CPU-only machine. Device and
precision are how a stretch of a run computes, not what the run is: a resume takes them
from the caller, like the number of steps. Bit-for-bit resume is a CPU promise (fp32 there
is exactly the arithmetic of the version without devices); on a GPU the RNGs are restored
too, but some CUDA kernels (the embedding's backward) add with atomics in no fixed order.

Data parallel: started under `torchrun` (WORLD_SIZE > 1) every process takes a disjoint
shard of each epoch's batches, gradients are averaged with one all-reduce per update
(gloo on CPU, NCCL on GPUs with each process on cuda:LOCAL_RANK), and rank 0 alone
writes. Archs are drawn from the same seeded RNG on every rank, so all ranks train the
same archs on different data. Bit-for-bit resume is for a single process (other ranks'
dropout RNG is reseeded from the step).

Knows nothing of deployment devices, latency or search.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from mosc.contract import PAD_ID
from mosc.nn.batching import BatchIterator
from mosc.nn.corpus import ParallelData, load_corpus
from mosc.nn.tokenizer import SubwordTokenizer
from mosc.errors import MoscError
from mosc.fileio import atomic_write_text, field as json_field, latest_checkpoint, load_tensors, model_kind, save_tensors
from mosc.nn.device import (CPU_RNG, CUDA_RNG, Amp, check_device_spec, check_precision, describe, resolve_device,
                             rng_states, set_rng_states, to_device)
from mosc.nn.model import FFNMode, Supernet, SupernetConfig, load_supernet, save_supernet
from mosc.nn.settings import real, whole
from mosc.bert_space import BertArch, BertSpace, load_space
from mosc.nn.bert import BERT_SUPERNET_KIND, BertConfig, BertSupernet, load_bert_supernet, save_bert_supernet
from mosc.nn.mlm import DEFAULT_CORPUS, MaskedBatchIterator, TextData, load_text_corpus
from mosc.space import Arch, SearchSpace

CORPUS_ARGS = ("src_lang", "tgt_lang", "vocab_size", "test_split", "max_train_pairs")  # what a run records
MLM_CORPUS_ARGS = ("vocab_size",)  # what an encoder-only (masked-LM) run records
DEFAULT_TRANSLATION_CORPUS = "synthetic"  # the corpus when none is named (MLM: mosc.nn.mlm.DEFAULT_CORPUS)
MAX_LEN = 100_000  # longest sentence in tokens; the position table grows with it
MAX_SANDWICH_RANDOM = 1000  # random archs per update: each costs a forward and backward pass
LATER_KEYS = {"device": "auto", "precision": "fp32"}  # training settings older checkpoints lack: their defaults


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
    device: str = "auto"  # auto (the GPU when there is one), cpu, cuda or cuda:N
    precision: str = "fp32"  # forward arithmetic: fp32, bf16 (autocast) or fp16 (autocast + loss scaling, GPU)

    def __post_init__(self):
        """Every setting in range before anything is read or written (one line per bad value)."""
        whole("steps", self.steps, 1)
        whole("max_len", self.max_len, 1, MAX_LEN)
        whole("max_tokens", self.max_tokens, self.max_len + 1)  # one pair of max_len must fit a batch
        real("lr", self.lr, 0, above=True)
        whole("warmup", self.warmup, 0)
        real("min_lr", self.min_lr, 0)
        real("beta2", self.beta2, 0, 1, below=True)
        real("label_smoothing", self.label_smoothing, 0, 1, below=True)
        real("clip_norm", self.clip_norm, 0)
        whole("sandwich_random", self.sandwich_random, 0, MAX_SANDWICH_RANDOM)
        real("distill", self.distill, 0, 1)
        whole("save_every", self.save_every, 1)
        whole("keep", self.keep, 1)
        whole("log_every", self.log_every, 1)
        whole("seed", self.seed, 0, 2**32 - 1)
        check_device_spec(self.device)
        check_precision(self.precision)

    @classmethod
    def from_dict(cls, d, where: str) -> TrainConfig:
        """The settings a checkpoint recorded: exactly this class's fields, each in range."""
        names = [f.name for f in fields(cls)]
        if isinstance(d, dict) and not set(LATER_KEYS) & set(d):
            d = {**d, **LATER_KEYS}  # written before runs had a device
        if not isinstance(d, dict) or set(d) != set(names):
            got = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise MoscError(f"{where}: the training settings must have exactly the keys {names}, got {got}")
        try:
            return cls(**d)
        except MoscError as e:
            raise MoscError(f"{where}: {e}") from None

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


def predictions(model, batch, arch) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, V], gold ids [N], PAD_ID where nothing is asked) of one arch on a batch:
    a translation supernet predicts every target token, an encoder-only one the masked ones."""
    if isinstance(model, BertSupernet):
        keep = batch.labels != PAD_ID  # only the masked positions go through the [V]-wide output
        return model.mlm_logits(model(batch.tokens, arch)[keep]), batch.labels[keep]
    return model(batch.src, batch.tgt_in, arch).flatten(0, 1), batch.tgt_out.flatten()  # [B*T, V]


def update_loss(model, batch, archs: list, cfg: TrainConfig, amp: Amp | None = None,
                n_tokens: int | None = None) -> float:
    """Forward + backward every arch on the batch (gradients accumulate); returns mean loss.
    amp: autocast and loss scaling (None: plain fp32). n_tokens: batch.n_tokens counted on
    the host (on a GPU counting them again would wait for the device)."""
    n_tok = batch.n_tokens if n_tokens is None else n_tokens
    autocast = amp.autocast if amp is not None else contextlib.nullcontext
    teacher = None
    losses = []
    for i, arch in enumerate(archs):
        with autocast():
            logits, gold = predictions(model, batch, arch)
        # The loss in fp32 whatever the forward ran in (a no-op in fp32): a bf16 log-softmax
        # over the vocabulary would round away the small probabilities label smoothing needs.
        flat = logits.float()
        loss = F.cross_entropy(flat, gold, ignore_index=PAD_ID, label_smoothing=cfg.label_smoothing, reduction="sum") / n_tok
        if cfg.distill > 0 and i == 0 and len(archs) > 1:
            teacher = torch.log_softmax(flat.detach(), -1)
        elif teacher is not None:
            mask = (gold != PAD_ID).float()
            kl = (F.kl_div(torch.log_softmax(flat, -1), teacher, log_target=True, reduction="none").sum(-1) * mask).sum() / n_tok
            loss = (1 - cfg.distill) * loss + cfg.distill * kl
        if amp is not None:
            amp.backward(loss / len(archs))
        else:
            (loss / len(archs)).backward()
        losses.append(loss.detach())
    # Read the losses once at the end: on a GPU each .item() waits for the device. Summed in
    # the same order as before, so the number is the same as reading each one at once.
    total = 0.0
    for loss in losses:
        total += loss.item()
    return total / len(archs)


# ---- distributed ------------------------------------------------------------------------


def dist_info() -> tuple[int, int]:
    """(rank, world_size) from torchrun's environment; (0, 1) when run plainly."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def run_device(spec: str, world: int) -> torch.device:
    """The device this process trains on: under torchrun a GPU run puts each process of a
    machine on its own GPU, cuda:LOCAL_RANK."""
    return resolve_device(spec, int(os.environ.get("LOCAL_RANK", 0)) if world > 1 else None)


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


def save_checkpoint(run: Path, step: int, model: Supernet | BertSupernet, opt, names, data_meta: dict, cfg: TrainConfig,
                    rng: random.Random, batches, fixed: Arch | BertArch | None, *,
                    device: torch.device | None = None, extra: dict | None = None) -> Path:
    """step_N/ is written whole under a hidden name, renamed into place, and only then named
    by `latest`: a crash, kill or power cut at any moment leaves the previous checkpoint in
    charge and never a folder that mixes two states. Every tensor is written from the CPU
    (save_tensors copies them there), so any machine can load it. extra: more keys of the
    config's "train" section (the loss scale, where the run ran)."""
    ckpt, partial = run / f"step_{step:07d}", run / f".step_{step:07d}.partial"
    for stale in run.glob(".step_*.partial"):  # left by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    rngs = rng_states(device or torch.device("cpu"))
    optim_sha = save_tensors({**_optim_tensors(opt, names), **rngs}, partial / "optim.safetensors")
    (save_bert_supernet if isinstance(model, BertSupernet) else save_supernet)(model, partial, {
        **data_meta,
        "train": {"config": asdict(cfg), "step": step, "fixed_arch": fixed.to_dict() if fixed else None,
                  "arch_rng": json.loads(json.dumps(rng.getstate())), "batches": batches.state_dict(),
                  "optim_sha256": optim_sha, **(extra or {})},
    })
    if ckpt.exists():  # a folder `latest` never named (the run went past it before and was cut short)
        shutil.rmtree(ckpt)
    os.replace(partial, ckpt)
    atomic_write_text(run / "latest", ckpt.name + "\n")  # the checkpoint is complete: point at it
    _prune(run, step, cfg.keep)
    return ckpt


def _prune(run: Path, step: int, keep: int) -> None:
    """Keep the newest `keep` checkpoints up to `step` (by number: step_10000000 > step_9999999).
    Folders past `step` are leftovers of a run cut short before `latest` named them: a later
    save at their step replaces them."""
    numbered = [(int(p.name[5:]), p) for p in run.glob("step_*") if p.name[5:].isascii() and p.name[5:].isdigit()]
    older = sorted((n, p) for n, p in numbered if n < step)
    for _, p in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)


def load_trained(path: str | Path) -> tuple[Supernet, SubwordTokenizer, dict]:
    """(supernet, tokenizer, config.json dict) from a checkpoint or run folder."""
    model, meta = load_supernet(path)
    if "tokenizer" not in meta:
        raise MoscError(f"{path} has no tokenizer: not written by `mosc train`")
    return model, SubwordTokenizer.from_json(meta["tokenizer"]), meta


def load_any_supernet(path: str | Path) -> tuple[Supernet | BertSupernet, dict]:
    """A translation or encoder-only supernet, by the kind its config.json names."""
    return load_bert_supernet(path) if model_kind(path) == BERT_SUPERNET_KIND else load_supernet(path)


def load_bert_trained(path: str | Path) -> tuple[BertSupernet, SubwordTokenizer, dict]:
    """(encoder-only supernet, tokenizer, config.json dict) from a checkpoint or run folder."""
    model, meta = load_bert_supernet(path)
    if "tokenizer" not in meta:
        raise MoscError(f"{path} has no tokenizer: not written by `mosc train`")
    return model, SubwordTokenizer.from_json(meta["tokenizer"]), meta


def run_arch(model: BertSupernet, meta: dict) -> BertArch:
    """The arch a BERT run stands for when none is named: its fixed arch (a standalone run),
    else the supernet's largest."""
    fixed = meta.get("train", {}).get("fixed_arch")
    return BertArch.from_dict(fixed) if fixed else model.space.largest()


def load_run_text(meta: dict, tokenizer: SubwordTokenizer) -> TextData:
    """The text an encoder-only checkpoint was trained on, as blocks of its sequence length."""
    where = "the checkpoint's config.json"
    seq_len = json_field(json_field(json_field(meta, "train", dict, where), "config", dict, where), "max_len", int, where)
    return load_text_corpus(json_field(meta, "corpus", str, where), seq_len=seq_len, tokenizer=tokenizer)


def load_run_corpus(meta: dict, tokenizer: SubwordTokenizer) -> ParallelData:
    """The corpus a checkpoint was trained on (same files/synthetic settings), with its tokenizer."""
    where = "the checkpoint's config.json"
    args = {k: v for k, v in json_field(meta, "corpus_args", dict, where).items() if k != "vocab_size"}
    unknown = sorted(set(args) - set(CORPUS_ARGS))
    if unknown:
        raise MoscError(f"{where}: corpus_args has unknown settings {unknown}; known: {list(CORPUS_ARGS)}")
    return load_corpus(json_field(meta, "corpus", str, where), tokenizer=tokenizer, **args)


# ---- the loop ---------------------------------------------------------------------------


class _CtrlC:
    """Ctrl-C during training, handled so that a checkpoint always matches its weights.

    Every Ctrl-C sets `requested`: the loop finishes the update it is in, saves and stops.
    A second one while the update is still computing gradients (`abortable`: nothing applied
    yet) abandons that update at once; the loop rewinds batch position and RNGs to where it
    began and saves from there. While an update is applied or a checkpoint written, Ctrl-C
    only counts: the handler stays installed until the last save is done, so neither can be
    cut in half. Single process, main thread only; elsewhere Ctrl-C interrupts as usual and
    the loop's phase decides what can still be saved."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.presses = 0
        self.abortable = False
        self._old = None

    @property
    def requested(self) -> bool:
        return self.presses > 0

    def _handle(self, signum, frame):
        self.presses += 1
        if self.presses > 1 and self.abortable:
            self.abortable = False
            raise KeyboardInterrupt

    def __enter__(self):
        if self.enabled:
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self.enabled:  # a handler installed outside Python reads as None: put Python's back
            signal.signal(signal.SIGINT, self._old if self._old is not None else signal.default_int_handler)


BETWEEN, COMPUTING, APPLYING, SAVING = "between updates", "computing", "applying", "saving"


def _make_run_folder(run: Path) -> None:
    try:
        run.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise MoscError(f"run folder {run} exists and is not a folder") from None
    except OSError as e:
        raise MoscError(f"cannot create run folder {run} ({e.strerror or e})") from None


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
    device: str = "cpu"  # where it trained, e.g. "cuda:0 (NVIDIA H200)"
    precision: str = "fp32"


@dataclass
class _Start:
    """Where a run starts: a fresh model, or everything restored from a checkpoint."""

    model: Supernet | BertSupernet  # translation, or encoder-only (masked LM)
    cfg: TrainConfig
    data: ParallelData | TextData
    tokenizer: SubwordTokenizer  # the checkpoint's when resuming (not necessarily data's)
    corpus: str
    corpus_args: dict
    fixed: Arch | BertArch | None  # the one arch of a standalone run
    step: int = 0
    ckpt: Path | None = None  # the checkpoint resumed from
    saved: dict | None = None  # its config.json["train"]


def _init_distributed(world: int, device: torch.device) -> None:
    """Joins torchrun's process group: NCCL between GPUs, gloo between CPU processes."""
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)  # NCCL binds each process to its current GPU
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def _checkpoint_to_resume(run: Path, resume: bool) -> Path | None:
    """The run folder's latest checkpoint when resuming; refuses to overwrite a run or resume nothing."""
    if run.exists() and not run.is_dir():
        raise MoscError(f"run folder {run} exists and is not a folder")
    ckpt = latest_checkpoint(run) if run.exists() else None
    if ckpt is not None and not resume:
        raise MoscError(f"{run} already holds a run (at {ckpt.name}); pass --resume to continue it or choose another --out")
    if resume and ckpt is None:
        raise MoscError(f"nothing to resume in {run} (no 'latest' checkpoint)")
    return ckpt


def _resumed_start(ckpt: Path, cfg: TrainConfig, data: ParallelData | None) -> _Start:
    """Everything comes from the checkpoint (model, config, tokenizer, corpus) except cfg.steps,
    cfg.device and cfg.precision."""
    model, meta = load_any_supernet(ckpt)
    bert = isinstance(model, BertSupernet)
    where = f"checkpoint {ckpt / 'config.json'}"
    tr = json_field(meta, "train", dict, where)
    saved_cfg = TrainConfig.from_dict(json_field(tr, "config", dict, where), where)
    # The horizon, and where and in what arithmetic this stretch runs, come from the caller
    cfg = replace(saved_cfg, steps=cfg.steps, device=cfg.device, precision=cfg.precision)
    tokenizer = SubwordTokenizer.from_json(json_field(meta, "tokenizer", str, where))
    fixed = json_field(tr, "fixed_arch", (dict, type(None)), where)
    if fixed is not None:
        try:
            fixed = model.space.validate((BertArch if bert else Arch).from_dict(fixed))
        except MoscError as e:
            raise MoscError(f"{where}: fixed_arch: {e}") from None
    corpus_args = {k: v for k, v in json_field(meta, "corpus_args", dict, where).items() if k != "vocab_size"}
    json_field(meta, "corpus", str, where)
    if data is None:
        data = load_run_text(meta, tokenizer) if bert else load_run_corpus(meta, tokenizer)
    step = whole(f"{where}: train.step", json_field(tr, "step", int, where), 0)
    return _Start(model, cfg, data, tokenizer, meta["corpus"], corpus_args, fixed, step, ckpt, tr)


def _fresh_start(space: str, mode: str, arch: Arch | BertArch | None, corpus: str | None, corpus_args: dict | None,
                 data: ParallelData | TextData | None, cfg: TrainConfig, model_overrides: dict | None) -> _Start:
    """A new supernet initialized from cfg.seed, and the corpus (loaded unless given). Every
    setting is checked before the corpus is read: a typo costs no tokenizer training.
    The space says what is trained: a translation space a translation supernet on a
    parallel corpus, an encoder-only space a masked-LM supernet on plain text."""
    s = load_space(space)
    if mode not in FFNMode.__members__:
        raise MoscError(f"mode must be one of {', '.join(FFNMode.__members__)}, got {mode!r}")
    fixed = s.validate(arch) if arch is not None else None
    if isinstance(s, BertSpace):
        return _fresh_bert_start(s, mode, fixed, corpus, corpus_args, data, cfg, model_overrides)
    corpus = DEFAULT_TRANSLATION_CORPUS if corpus is None else corpus
    model_cfg = SupernetConfig(space=s.to_dict(), ffn_mode=mode, max_positions=max(256, cfg.max_len + 2),
                               **(model_overrides or {}))  # vocab_size: the tokenizer's, below
    corpus_args = dict(corpus_args or {})
    if data is None:
        data = load_corpus(corpus, **corpus_args)
    torch.manual_seed(cfg.seed)
    model = Supernet(replace(model_cfg, vocab_size=data.tokenizer.vocab_size))
    return _Start(model, cfg, data, data.tokenizer, corpus, corpus_args, fixed)


def _fresh_bert_start(s: BertSpace, mode: str, fixed: BertArch | None, corpus: str | None, corpus_args: dict | None,
                      data: TextData | None, cfg: TrainConfig, model_overrides: dict | None) -> _Start:
    corpus = DEFAULT_CORPUS if corpus is None else corpus
    corpus_args = dict(corpus_args or {})
    unknown = sorted(set(corpus_args) - set(MLM_CORPUS_ARGS))
    if unknown:
        raise MoscError(f"an encoder-only (masked-LM) run takes no corpus settings {unknown}; only {list(MLM_CORPUS_ARGS)}")
    model_cfg = BertConfig(space=s.to_dict(), ffn_mode=mode, max_positions=max(512, cfg.max_len),
                           **(model_overrides or {}))  # vocab_size: the tokenizer's + [MASK], below
    if cfg.max_tokens // cfg.max_len < 1:
        raise MoscError(f"max_tokens {cfg.max_tokens} holds no block of max_len {cfg.max_len}")
    if data is None:
        data = load_text_corpus(corpus, seq_len=cfg.max_len, **corpus_args)
    torch.manual_seed(cfg.seed)
    model = BertSupernet(replace(model_cfg, vocab_size=data.vocab_size))
    return _Start(model, cfg, data, data.tokenizer, corpus, corpus_args, fixed)


def _restore_training_state(s: _Start, opt: torch.optim.Optimizer, names: dict[int, str],
                            batches: BatchIterator, arch_rng: random.Random, device: torch.device, amp: Amp) -> None:
    """Adam moments (moved to the device by the optimizer), the torch RNGs (dropout), the fp16
    loss scale, batch position and arch RNG from s.ckpt."""
    where = f"checkpoint {s.ckpt / 'config.json'}"
    tensors = load_tensors(s.ckpt / "optim.safetensors", json_field(s.saved, "optim_sha256", str, where))
    try:
        states = {k: tensors.pop(k) for k in (CPU_RNG, CUDA_RNG) if k in tensors}
        set_rng_states(states, device, cuda_seed=s.cfg.seed * 1000 + s.step)
        _load_optim(opt, names, tensors)
    except (KeyError, ValueError, RuntimeError) as e:
        raise MoscError(f"{s.ckpt / 'optim.safetensors'} does not fit the model ({(str(e).splitlines() or ['?'])[0]})") from None
    scaler = s.saved.get("grad_scaler")
    try:
        amp.load_state_dict(scaler)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError):
        raise MoscError(f"{where}: train.grad_scaler is not a loss-scaler state") from None
    batches.load_state_dict(json_field(s.saved, "batches", dict, where))
    st = json_field(s.saved, "arch_rng", list, where)
    try:
        arch_rng.setstate((st[0], tuple(st[1]), st[2]))
    except (IndexError, TypeError, ValueError):
        raise MoscError(f"{where}: train.arch_rng is not a random generator state") from None


def _progress_bar(show: bool):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]train[/] {task.fields[what]}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                    TimeElapsedColumn(), TimeRemainingColumn(), disable=not show, transient=False)


class _Run:
    """One training run in progress: the state that updates, log lines and checkpoints share."""

    def __init__(self, run: Path, s: _Start, rank: int, world: int, device: torch.device):
        cfg = self.cfg = s.cfg
        self.run, self.rank, self.world, self.model, self.fixed = run, rank, world, s.model, s.fixed
        self.device, self.amp = device, Amp(device, cfg.precision)
        s.model.to(device)  # before Adam is made: its moments are allocated next to the weights
        self.names = {i: n for i, (n, _) in enumerate(s.model.named_parameters())}
        self.opt = torch.optim.Adam(s.model.parameters(), lr=cfg.lr, betas=(0.9, cfg.beta2))
        if isinstance(s.model, BertSupernet):  # blocks of max_len tokens, max_tokens // max_len per batch
            self.batches = MaskedBatchIterator(s.data.train, cfg.max_tokens // cfg.max_len, s.data.vocab_size - 1,
                                               seed=cfg.seed, rank=rank, world_size=world)
        else:
            self.batches = BatchIterator(s.data.train, cfg.max_tokens, max_len=cfg.max_len, seed=cfg.seed, rank=rank, world_size=world)
        self.arch_rng = random.Random(cfg.seed)
        if s.saved is not None:
            _restore_training_state(s, self.opt, self.names, self.batches, self.arch_rng, device, self.amp)
            if rank > 0:
                torch.manual_seed(cfg.seed * 1000 + rank * 7919 + s.step)
        elif rank > 0:
            torch.manual_seed(cfg.seed + rank)  # different dropout masks per rank
        self.data_meta = {"tokenizer": s.tokenizer.to_json(), "corpus": s.corpus, "corpus_args": s.corpus_args,
                          "corpus_info": s.data.info}
        if cfg.steps <= s.step:
            raise MoscError(f"run is already at step {s.step}; ask for more --steps than that")
        if rank == 0:
            _make_run_folder(run)
        self.start = self.step = self.ckpt_step = s.step
        self.last, self.tok_count, self.t_start = 0.0, 0, 0.0
        self.window_loss, self.window_n = 0.0, 0
        self.skipped = 0  # fp16 updates the loss scaler skipped (overflowed gradients) since the last log line
        self.history: list[dict] = []
        # Where the loop stands, for what an interruption may save: BETWEEN updates (all state
        # agrees), COMPUTING one (nothing applied yet: rewind to `began`), APPLYING one (weights
        # half-way: save nothing), SAVING (the atomic save keeps the previous checkpoint).
        self.phase, self.began = BETWEEN, None

    def loop(self, progress: bool) -> None:
        """Updates until cfg.steps. Ctrl-C: save a consistent state, say how to resume, re-raise."""
        self.model.train()
        with _CtrlC(self.world == 1) as ctrl_c:
            stopped = self.updates(ctrl_c, progress)
            if stopped:
                self.save_interrupted()  # still under the handler: a Ctrl-C now cannot cut the save
        if stopped:
            raise KeyboardInterrupt

    def updates(self, ctrl_c: _CtrlC, progress: bool) -> bool:
        """Update until cfg.steps or Ctrl-C; True when stopped early."""
        stream = self.batches.batches()
        self.t_start = time.perf_counter()
        what = "standalone " + self.fixed.hash if self.fixed else f"{self.model.cfg.ffn_mode.value} supernet"
        with _progress_bar(progress and self.rank == 0) as prog:
            task = prog.add_task("train", total=self.cfg.steps, completed=self.start, what=what, loss="-", tps="-")
            try:
                while self.step < self.cfg.steps and not ctrl_c.requested:
                    self.update(stream, ctrl_c)
                    self.after_update(prog, task)
            except KeyboardInterrupt:
                return True
        return ctrl_c.requested

    def update(self, stream, ctrl_c: _CtrlC) -> None:
        """One optimizer update: the sandwich archs' gradients on one batch (averaged over ranks)."""
        cfg, opt = self.cfg, self.opt
        self.began = (self.batches.epoch, self.batches.position, self.arch_rng.getstate(), rng_states(self.device))
        self.phase = COMPUTING
        ctrl_c.abortable = True
        host = next(stream)
        n_tokens = host.n_tokens
        batch = to_device(host, self.device)
        archs = archs_for_update(self.model.space, self.arch_rng, cfg.sandwich_random, self.fixed)
        for g in opt.param_groups:
            g["lr"] = cfg.lr_at(self.step)
        opt.zero_grad(set_to_none=True)
        loss = update_loss(self.model, batch, archs, cfg, self.amp, n_tokens)
        if self.world > 1:
            all_reduce_grads(self.model, self.world)  # still scaled under fp16: every rank unscales alike
        ctrl_c.abortable = False  # from here on the update changes weights: it must finish
        self.phase = APPLYING
        self.amp.unscale(opt)
        if cfg.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_norm)
        if not self.amp.step(opt):
            self.skipped += 1  # the schedule still advances: the step is spent, as in torch's recipe
        self.step += 1
        self.last = loss
        self.tok_count += n_tokens * self.world
        self.window_loss, self.window_n = self.window_loss + loss, self.window_n + 1
        self.phase = BETWEEN

    def rewind(self) -> None:
        """Back to where the update in progress began (its batch and RNG draws never happened)."""
        epoch, position, arch_state, torch_states = self.began
        self.batches.epoch, self.batches.position = epoch, position
        self.arch_rng.setstate(arch_state)
        set_rng_states(torch_states, self.device, cuda_seed=0)  # began holds the CUDA state when there is one
        self.phase = BETWEEN

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
        if self.amp.scaler is not None:
            rec["skipped"], rec["loss_scale"] = self.skipped, self.amp.scaler.get_scale()
        self.history.append(rec)
        self.window_loss, self.window_n, self.skipped = 0.0, 0, 0
        if self.rank == 0:
            with open(self.run / "log.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
        return rec

    def save(self) -> None:
        self.phase = SAVING
        ran_on = {"device": describe(self.device), "precision": self.cfg.precision, "world_size": self.world}
        scaler = self.amp.state_dict()
        save_checkpoint(self.run, self.step, self.model, self.opt, self.names, self.data_meta, self.cfg,
                        self.arch_rng, self.batches, self.fixed, device=self.device,
                        extra={"ran_on": ran_on, **({"grad_scaler": scaler} if scaler is not None else {})})
        self.ckpt_step, self.phase = self.step, BETWEEN

    def save_interrupted(self) -> None:
        """Keep what was done if it is consistent (resume continues from it) and say how to
        resume; rank 0 only."""
        if self.rank != 0:
            return
        if self.phase == COMPUTING:
            self.rewind()
        note = ""
        if self.phase == BETWEEN and self.step > self.ckpt_step:
            self.save()
        elif self.phase != BETWEEN:  # cut while weights changed or a save ran (no handler: torchrun)
            note = " (stopped in the middle of an update or a save: kept the previous checkpoint)"
        saved = latest_checkpoint(self.run) if self.run.exists() else None
        print(f"interrupted at step {self.ckpt_step if note else self.step}{note}: " + (
            f"checkpoint {saved}; `mosc train -o {self.run} --steps {self.cfg.steps} --resume` continues it"
            if saved else "nothing saved yet"), file=sys.stderr)

    def result(self) -> TrainResult:
        seconds = time.perf_counter() - self.t_start
        if self.world > 1:
            _check_ranks_agree(self.model)
        return TrainResult(self.run, latest_checkpoint(self.run) if self.rank == 0 else self.run, self.step, self.last,
                           self.tok_count / max(seconds, 1e-9), seconds, self.history, self.start,
                           describe(self.device), self.cfg.precision)


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
    corpus: str | None = None,  # None: "synthetic" for a translation space, mosc.nn.mlm's default text for a BERT one
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
    rank, world = dist_info()
    device = run_device(cfg.device, world)
    Amp(device, cfg.precision)  # fp16 on a CPU is refused before a corpus is read or a folder made
    _init_distributed(world, device)
    ckpt = _checkpoint_to_resume(run, resume)
    if ckpt is not None:
        start = _resumed_start(ckpt, cfg, data)
    else:
        start = _fresh_start(space, mode, arch, corpus, corpus_args, data, cfg, model_overrides)
    r = _Run(run, start, rank, world, device)
    r.loop(progress)
    return r.result()

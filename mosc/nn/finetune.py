"""SST-2 fine-tuning of a collapsed (static) BERT encoder, with optional logit distillation.

What this module does:
- reads the GLUE SST-2 files (`train.tsv(.gz)`: `label<TAB>sentence`, `dev.tsv(.gz)`:
  `label<TAB>content`, a header line each; default folder ../shared/data/sst2) and turns
  each sentence into `[<s>] + ids[: seq_len - 1]` padded with 0 (<s> = the [CLS] position
  the classifier reads) with the pre-training run's tokenizer (`load_sst2`);
- fine-tunes a `BertEncoder` with a fresh 2-class head (`finetune`): AdamW, linear warm-up
  then linear decay to 0, gradient clipping, dropout on the embeddings and the classifier
  input only (the static encoder's own), cross-entropy on the labels and, given a teacher
  (e.g. the fine-tuned largest subnet, MOS.md section 7), (1 - distill) x CE + distill x
  KL(teacher || student) on the logits: 0.5 / 0.5 by default. Deterministic under a seed:
  the head's init, the batch order and the dropout masks all derive from `cfg.seed`;
- scores dev accuracy (`evaluate_accuracy`);
- the file-level job behind `mosc finetune` (`finetune_files`): a pre-training run at an
  arch (collapsed here) or a saved encoder in, a fine-tuned encoder folder out.

What it does NOT know: how the encoder was pre-trained or collapsed (mosc.nn.train,
mosc.nn.bert), masking, search, export or latency.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from mosc.contract import BOS_ID, PAD_ID
from mosc.errors import MoscError
from mosc.fileio import read_text
from mosc.nn.settings import real, whole

N_CLASSES = 2  # SST-2: 0 = negative, 1 = positive
SST2_FOLDER = "sst2"  # under mosc.nn.corpus.shared_data_dir()
EVAL_BATCH = 256  # sentences per forward when scoring (no gradients: memory is small)
MAX_SEQ_LEN = 512  # the static encoder's sinusoidal table (BertConfig.max_positions default)


@dataclass
class FinetuneConfig:
    steps: int = 600  # optimizer updates
    batch_size: int = 32  # sentences per update (MOS.md: 16 or 32)
    lr: float = 1e-3  # peak AdamW rate; bert-tiny on SST-2, 600 updates: 1e-3 beat 2e-4, 5e-4 and 2e-3
    warmup: float = 0.1  # fraction of `steps` of linear warm-up; then linear decay to 0 at `steps`
    weight_decay: float = 0.01  # AdamW decay of matrices (biases and LayerNorms: none, as in BERT)
    clip_norm: float = 1.0  # max global gradient norm (0 = no clipping)
    dropout: float = 0.1  # on the embeddings and the classifier input while fine-tuning
    seq_len: int = 64  # tokens per sentence, <s> included; longer sentences are cut
    bucket: int = 50  # batches drawn together and sorted by length (less padding); 1 = plain shuffle
    distill: float = 0.5  # with a teacher: loss = (1 - distill) CE + distill KL(teacher || student)
    seed: int = 0  # the classifier head's init, batch order and dropout
    device: str = "auto"  # auto (the GPU when torch sees one), cpu, cuda or cuda:N

    def __post_init__(self):
        """Every setting in range before any data is read (one line per bad value)."""
        from mosc.nn.device import check_device_spec

        whole("steps", self.steps, 1)
        whole("batch_size", self.batch_size, 1, 1_000_000)
        real("lr", self.lr, 0, above=True)
        real("warmup", self.warmup, 0, 1, below=True)
        real("weight_decay", self.weight_decay, 0)
        real("clip_norm", self.clip_norm, 0)
        real("dropout", self.dropout, 0, 1, below=True)
        whole("seq_len", self.seq_len, 2, MAX_SEQ_LEN)
        whole("bucket", self.bucket, 1, 1_000_000)
        real("distill", self.distill, 0, 1)
        whole("seed", self.seed, 0, 2**32 - 1)
        check_device_spec(self.device)

    def lr_factor(self, step: int) -> float:
        """Multiplier of `lr` at update `step` (0-based): linear warm-up, then linear decay to 0."""
        w = max(1, round(self.warmup * self.steps))
        if step < w:
            return (step + 1) / w
        return max(0.0, (self.steps - step) / max(1, self.steps - w))


# ---------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------


@dataclass
class Labelled:
    """Tokenized labelled sentences."""

    tokens: torch.Tensor  # [N, seq_len] int64: <s> first, padded with PAD_ID at the end
    labels: torch.Tensor  # [N] int64 in [0, N_CLASSES)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Sst2:
    train: Labelled
    dev: Labelled
    info: dict  # files, sentence counts, seq_len, how many sentences were cut


def sst2_folder(folder: str | Path | None = None) -> Path:
    """The folder holding train.tsv(.gz) and dev.tsv(.gz): `folder`, or ../shared/data/sst2."""
    if folder is not None:
        return Path(folder)
    from mosc.nn.corpus import shared_data_dir

    d = shared_data_dir()
    if d is None:
        raise MoscError("SST-2 lives in ../shared/data/sst2, which is absent here; give a folder with "
                        "train.tsv(.gz) and dev.tsv(.gz)")
    return d / SST2_FOLDER


def split_file(folder: Path, split: str) -> Path:
    """folder/split.tsv.gz, else folder/split.tsv; a missing file is one line."""
    for name in (f"{split}.tsv.gz", f"{split}.tsv"):
        if (folder / name).is_file():
            return folder / name
    raise MoscError(f"SST-2 {split} file missing: no {folder / f'{split}.tsv.gz'} or {folder / f'{split}.tsv'}")


def read_labelled_tsv(path: str | Path) -> tuple[list[int], list[str]]:
    """(labels, sentences) of a GLUE-style `label<TAB>text` file with a header line whose
    first column is `label`. Anything else (unreadable, not UTF-8, a row without a tab, a
    label other than 0/1, an empty text, no rows) is one MoscError line naming the file."""
    path = Path(path)
    lines = read_text(path, "SST-2 file").splitlines()
    header = lines[0].split("\t") if lines else []
    if len(header) != 2 or header[0].strip() != "label":
        shown = repr(lines[0][:60]) if lines else "nothing"
        raise MoscError(f"SST-2 file {path}: expected a header 'label<TAB>sentence', got {shown}")
    labels, sentences = [], []
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        label, tab, sentence = line.partition("\t")
        sentence = " ".join(sentence.split())
        if not tab or label.strip() not in ("0", "1") or not sentence:
            raise MoscError(f"SST-2 file {path} line {n}: expected '0 or 1<TAB>text', got {line[:60]!r}")
        labels.append(int(label))
        sentences.append(sentence)
    if not labels:
        raise MoscError(f"SST-2 file {path} has a header but no labelled rows")
    return labels, sentences


def encode_sentences(tokenizer, sentences: list[str], seq_len: int) -> tuple[torch.Tensor, int]:
    """([N, seq_len] int64 rows `<s> ids[:seq_len-1] 0...`, how many sentences were cut)."""
    rows = torch.full((len(sentences), seq_len), PAD_ID, dtype=torch.long)
    cut = 0
    for i, ids in enumerate(tokenizer.encode_batch(sentences)):
        cut += len(ids) > seq_len - 1
        ids = [BOS_ID] + ids[: seq_len - 1]
        rows[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return rows, cut


def load_labelled(path: str | Path, tokenizer, seq_len: int) -> tuple[Labelled, int]:
    labels, sentences = read_labelled_tsv(path)
    tokens, cut = encode_sentences(tokenizer, sentences, seq_len)
    return Labelled(tokens, torch.tensor(labels, dtype=torch.long)), cut


def load_sst2(tokenizer, seq_len: int = 64, folder: str | Path | None = None) -> Sst2:
    """SST-2 train and dev, tokenized with the pre-training run's tokenizer."""
    whole("seq_len", seq_len, 2, MAX_SEQ_LEN)
    d = sst2_folder(folder)
    train_file, dev_file = split_file(d, "train"), split_file(d, "dev")
    train, cut_train = load_labelled(train_file, tokenizer, seq_len)
    dev, cut_dev = load_labelled(dev_file, tokenizer, seq_len)
    info = {"train_file": str(train_file), "dev_file": str(dev_file), "train_sentences": len(train),
            "dev_sentences": len(dev), "seq_len": seq_len, "train_cut": cut_train, "dev_cut": cut_dev,
            "dev_positive": float(dev.labels.float().mean())}
    return Sst2(train, dev, info)


def _trim(tokens: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B, T'] without the columns that are padding in every row. Exact: padding
    sits at the end, is masked out of attention as a key, and position 0 never reads it."""
    longest = int((tokens != PAD_ID).sum(1).max())
    return tokens[:, : max(longest, 1)]


# ---------------------------------------------------------------------------------
# fine-tuning and accuracy
# ---------------------------------------------------------------------------------


@torch.no_grad()
def _logits(encoder, tokens: torch.Tensor, device: torch.device) -> torch.Tensor:
    """[N, T] -> [N, C] class logits in eval mode (no dropout), in batches of EVAL_BATCH."""
    out = [encoder.classify(_trim(tokens[i : i + EVAL_BATCH]).to(device)).float().cpu()
           for i in range(0, len(tokens), EVAL_BATCH)]
    return torch.cat(out) if out else torch.zeros(0, N_CLASSES)


def evaluate_accuracy(encoder, dev: Labelled, device: str | torch.device | None = None) -> float:
    """Fraction of `dev` the encoder's head classifies right (0..1). device: where to compute
    (default: where the encoder is); the encoder's train/eval mode is restored after."""
    from mosc.nn.device import model_device

    if encoder.classifier is None:
        raise MoscError("this encoder has no classifier head: fine-tune it first")
    dev_ = model_device(encoder) if device is None else torch.device(device)
    was_training, moved = encoder.training, model_device(encoder)
    encoder.to(dev_).eval()
    try:
        pred = _logits(encoder, dev.tokens, dev_).argmax(1)
    finally:
        encoder.to(moved).train(was_training)
    return float((pred == dev.labels).float().mean()) if len(dev) else 0.0


def _with_head(encoder, seed: int):
    """A copy to fine-tune: an encoder with a head of N_CLASSES keeps it (continued
    fine-tuning); any other gets a fresh seeded head. The caller's encoder is never touched."""
    head = encoder.classifier
    if head is not None and head.out_features == N_CLASSES:
        return copy.deepcopy(encoder)
    return encoder.with_classifier(N_CLASSES, seed=seed)


def _check_teacher(student, teacher) -> None:
    if teacher.classifier is None or teacher.classifier.out_features != N_CLASSES:
        raise MoscError(f"the teacher must be a fine-tuned encoder with a {N_CLASSES}-class head")
    if teacher.cfg.vocab_size != student.cfg.vocab_size:
        raise MoscError(f"the teacher has vocabulary {teacher.cfg.vocab_size}, the student {student.cfg.vocab_size}: "
                        f"they must share the pre-training run's tokenizer")


def _param_groups(model, weight_decay: float) -> list[dict]:
    """Matrices decay; biases and LayerNorm weights (1-D) do not (BERT's AdamW recipe)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _batches(lengths: torch.Tensor, batch_size: int, bucket: int, g: torch.Generator):
    """Index tensors [batch_size] forever. Each epoch: a seeded permutation (ragged tail
    dropped), cut into chunks of `bucket` batches, each chunk sorted by sentence length and
    cut into batches, the batches shuffled. Rows of a batch have similar lengths, so trimming
    leaves little padding (SST-2 train: mean 15 tokens, but the longest of 32 random rows ~45)."""
    n = len(lengths)
    bs = min(batch_size, n)
    while True:
        perm = torch.randperm(n, generator=g)
        perm = perm[: n - n % bs]
        batches = []
        for c in range(0, len(perm), bucket * bs):
            chunk = perm[c : c + bucket * bs]
            batches += list(chunk[torch.argsort(lengths[chunk], stable=True)].split(bs))
        for k in torch.randperm(len(batches), generator=g).tolist():
            yield batches[k]


def _progress(show: bool):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]finetune[/] {task.fields[what]}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    disable=not show, transient=False)


def finetune(encoder, cfg: FinetuneConfig, data: Sst2, teacher=None, progress: bool = False):
    """(fine-tuned copy of `encoder` on the CPU, in eval mode; result dict with the dev accuracy).

    encoder: a mosc.nn.bert.BertEncoder (collapsed from a supernet, or trained standalone);
    teacher: an already fine-tuned BertEncoder (same tokenizer) whose logits the student
    also matches, weighted by cfg.distill. The global torch RNG is left as it was."""
    from mosc.nn.device import describe, resolve_device

    if not isinstance(cfg, FinetuneConfig):
        raise MoscError(f"cfg must be a FinetuneConfig, got {type(cfg).__name__}")
    device = resolve_device(cfg.device)
    if len(data.train) == 0:
        raise MoscError("SST-2 train set is empty")
    if data.train.tokens.shape[1] > encoder.cfg.max_positions:
        raise MoscError(f"seq_len {data.train.tokens.shape[1]} exceeds the encoder's max_positions {encoder.cfg.max_positions}")
    if int(data.train.tokens.max()) >= encoder.cfg.vocab_size:
        raise MoscError(f"token id {int(data.train.tokens.max())} outside the encoder's vocabulary "
                        f"({encoder.cfg.vocab_size}): tokenize with the pre-training run's tokenizer")
    distill = cfg.distill if teacher is not None else 0.0
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)  # dropout masks: derived from the seed, the caller's RNG untouched
        model = _with_head(encoder, cfg.seed)
        model.dropout = cfg.dropout
        model.to(device).train()
        if teacher is not None:
            _check_teacher(model, teacher)
            teacher = copy.deepcopy(teacher).to(device).eval()
        opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, cfg.lr_factor)
        lengths = (data.train.tokens != PAD_ID).sum(1)  # [N]
        batches = _batches(lengths, cfg.batch_size, cfg.bucket, torch.Generator().manual_seed(cfg.seed))
        history, losses, log_every = [], [], max(1, cfg.steps // 20)
        with _progress(progress) as prog:
            task = prog.add_task("", total=cfg.steps, what=f"{list(model.arch.hidden)}", loss="-")
            for step in range(cfg.steps):
                idx = next(batches)
                tokens = _trim(data.train.tokens[idx]).to(device)  # [B, T'], T' = longest row
                labels = data.train.labels[idx].to(device)  # [B]
                logits = model.classify(tokens).float()  # [B, C]
                loss = F.cross_entropy(logits, labels)
                if distill > 0:
                    with torch.no_grad():
                        t_logp = F.log_softmax(teacher.classify(tokens).float(), -1)  # [B, C]
                    kl = F.kl_div(F.log_softmax(logits, -1), t_logp, log_target=True, reduction="batchmean")
                    loss = (1 - distill) * loss + distill * kl
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.clip_norm > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
                opt.step()
                sched.step()
                losses.append(loss.item())
                if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
                    recent = sum(losses[-log_every:]) / len(losses[-log_every:])
                    history.append({"step": step + 1, "loss": recent, "lr": opt.param_groups[0]["lr"]})
                    prog.update(task, completed=step + 1, loss=f"{recent:.3f}")
    train_s = time.perf_counter() - t0
    model.eval()
    acc = evaluate_accuracy(model, data.dev)
    model.cpu()
    tail = losses[-max(1, cfg.steps // 10):]
    result = {"sst2_dev_acc": acc, "final_loss": sum(tail) / len(tail), "history": history,
              "distilled": distill > 0, "distill_weight": distill, "config": asdict(cfg), "arch": model.arch.to_dict(),
              "train_seconds": train_s, "seconds": time.perf_counter() - t0, "device": describe(device),
              "data": data.info}
    return model, result


# ---------------------------------------------------------------------------------
# files: the job behind `mosc finetune`
# ---------------------------------------------------------------------------------


def _tokenizer_of(meta: dict, where: str):
    from mosc.nn.tokenizer import SubwordTokenizer

    if "tokenizer" not in meta:
        raise MoscError(f"{where} holds no tokenizer: collapse it with `mosc collapse --checkpoint RUN --out` "
                        f"(which stores the run's tokenizer) or give --checkpoint and --arch")
    return SubwordTokenizer.from_json(meta["tokenizer"], where=f"{where} tokenizer")


def load_student(checkpoint: Path | None, arch_file: Path | None, encoder: Path | None):
    """(BertEncoder, tokenizer JSON text, description): collapsed from a pre-training run at
    an arch (default: the run's fixed arch, else the largest), or a saved encoder."""
    from mosc.bert_space import BertArch
    from mosc.nn.bert import collapse_bert, load_bert_encoder
    from mosc.nn.train import load_bert_trained, run_arch

    if (checkpoint is None) == (encoder is None):
        raise MoscError("give exactly one of --checkpoint (a BERT pre-training run) or --encoder (a collapsed encoder)")
    if encoder is not None:
        if arch_file is not None:
            raise MoscError("--arch goes with --checkpoint; an --encoder folder already has its arch")
        enc, meta = load_bert_encoder(encoder)
        tok = _tokenizer_of(meta, f"encoder {encoder}")
        return enc, tok, meta["tokenizer"], f"encoder {encoder}"
    supernet, tok, meta = load_bert_trained(checkpoint)
    arch = supernet.space.validate(BertArch.load(arch_file)) if arch_file is not None else run_arch(supernet, meta)
    return collapse_bert(supernet, arch), tok, meta["tokenizer"], f"{checkpoint} at arch {list(arch.hidden)}"


def finetune_files(cfg: FinetuneConfig, out: Path, *, checkpoint: Path | None = None, arch_file: Path | None = None,
                   encoder: Path | None = None, teacher: Path | None = None, data_dir: Path | None = None,
                   progress: bool = False) -> dict:
    """Fine-tune on SST-2 and save the encoder (with head, tokenizer and result) to `out`.
    Returns the result dict (dev accuracy, losses, where it came from)."""
    from mosc.nn.bert import count_parameters, load_bert_encoder, save_bert_encoder

    enc, tok, tok_json, source = load_student(checkpoint, arch_file, encoder)
    teacher_enc = None
    if teacher is not None:
        teacher_enc, _ = load_bert_encoder(teacher)
        _check_teacher(enc, teacher_enc)
    if enc.cfg.vocab_size != tok.vocab_size + 1:
        raise MoscError(f"{source}: vocabulary {enc.cfg.vocab_size} does not fit its tokenizer ({tok.vocab_size} + [MASK])")
    data = load_sst2(tok, cfg.seq_len, data_dir)
    model, result = finetune(enc, cfg, data, teacher_enc, progress=progress)
    result.update({"source": source, "teacher": str(teacher) if teacher else None, "out": str(out),
                   "param_count": count_parameters(model)})
    extra = {"tokenizer": tok_json, "source": source, "finetune": {k: v for k, v in result.items() if k != "history"},
             "sst2_dev_acc": result["sst2_dev_acc"]}
    save_bert_encoder(model, out, extra)
    return result

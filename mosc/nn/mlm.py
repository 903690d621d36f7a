"""Masked-language-model data: plain text -> fixed-length token blocks -> masked batches.

What this module does: reads a text corpus (the built-in default, a folder of .txt/.txt.gz
files, or one file), holds out every VALID_EVERY-th line for validation, trains the
subword tokenizer on the rest, packs each split into blocks of exactly `seq_len` ids
(`<s>` first: the [CLS] position; lines joined with `</s>`), and masks them BERT-style
(15% of positions: 80% [MASK], 10% a random subword, 10% unchanged). Masks are drawn
from a generator seeded by (seed, epoch, batch), so a resumed run sees the very same
masks; validation masks are fixed by a seed of their own, so every arch is scored on
the same positions (`mlm_loss`).

[MASK] is the id just past the tokenizer's vocabulary: the model's vocabulary is the
tokenizer's + 1, and text can never produce it.

What it does NOT know: the model's layout, training, devices or files other than the corpus.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from mosc.contract import BOS_ID, EOS_ID, PAD_ID
from mosc.errors import MoscError
from mosc.fileio import read_text
from mosc.nn.batching import Resumable
from mosc.nn.corpus import shared_data_dir
from mosc.nn.tokenizer import N_RESERVED, SubwordTokenizer

DEFAULT_CORPUS = "default"  # wikitext-2 + unlabelled SST-2 train and Multi30k train English (../shared/data)
VALID_EVERY = 20  # every 20th non-blank line is held out for validation
MASK_PROB = 0.15  # BERT: predict 15% of positions ...
MASK_REPLACE, MASK_RANDOM = 0.8, 0.1  # ... of which 80% become [MASK], 10% a random subword, 10% stay
DEFAULT_VOCAB_MLM = 4000  # tokenizer vocabulary of an MLM run (the model adds [MASK])
VALID_SEED = 1234  # the validation masks: fixed, the same for every arch and every run
MAX_VALID_BLOCKS = 256  # mlm_loss scores at most this many validation blocks (search fitness cost)
TEXT_SUFFIXES = (".txt", ".txt.gz")


def mask_id(tokenizer: SubwordTokenizer) -> int:
    return tokenizer.vocab_size


# ---- reading text --------------------------------------------------------------------------


def _read_text(path: Path) -> list[str]:
    """Non-blank lines, whitespace-normalized; a .tsv(.gz) keeps its last column minus the
    header (SST-2's sentences). Unreadable or non-UTF-8 files are one line."""
    lines = read_text(path, "text file").splitlines()
    if ".tsv" in path.name:
        lines = [ln.split("\t")[-1] for ln in lines[1:]]
    return [s for ln in lines if (s := " ".join(ln.split()))]


def default_corpus_files() -> list[Path]:
    d = shared_data_dir()
    if d is None:
        raise MoscError("the default MLM corpus lives in ../shared/data, which is absent here; "
                        "give --corpus a folder of .txt files")
    files = [d / "wikitext-2" / "valid.txt.gz", d / "wikitext-2" / "test.txt.gz", d / "sst2" / "train.tsv.gz",
             d / "multi30k" / "train.en.gz"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise MoscError(f"default MLM corpus incomplete: missing {', '.join(missing)}")
    return files


def corpus_files(spec: str) -> list[Path]:
    """The files of a corpus spec: "default", a folder (its .txt/.txt.gz files, sorted) or a file."""
    if spec == DEFAULT_CORPUS:
        return default_corpus_files()
    p = Path(spec)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.name.endswith(TEXT_SUFFIXES))
        if not files:
            raise MoscError(f"corpus folder {p} has no .txt or .txt.gz files")
        return files
    if p.is_file():
        return [p]
    raise MoscError(f"corpus {spec!r} is neither {DEFAULT_CORPUS!r}, a folder nor a file")


def read_corpus_lines(spec: str) -> tuple[list[str], list[str]]:
    """(train lines, validation lines): every VALID_EVERY-th line is held out."""
    lines = [ln for f in corpus_files(spec) for ln in _read_text(f)]
    if len(lines) < 2 * VALID_EVERY:
        raise MoscError(f"corpus {spec!r} has {len(lines)} non-blank lines; an MLM run needs at least {2 * VALID_EVERY}")
    valid = lines[VALID_EVERY - 1 :: VALID_EVERY]
    train = [ln for i, ln in enumerate(lines) if (i + 1) % VALID_EVERY]
    return train, valid


# ---- blocks ----------------------------------------------------------------------------------


def pack_blocks(tokenizer: SubwordTokenizer, lines: list[str], seq_len: int) -> torch.Tensor:
    """Lines -> [N, seq_len] int64: `<s>` then seq_len - 1 ids of the running text (lines
    joined with `</s>`); the last block is padded with PAD_ID."""
    if seq_len < 2:
        raise MoscError(f"seq_len must be at least 2, got {seq_len}")
    stream: list[int] = []
    for ids in tokenizer.encode_batch(lines):
        stream += ids + [EOS_ID]
    n = seq_len - 1
    rows = [[BOS_ID] + stream[i : i + n] for i in range(0, len(stream), n)]
    rows[-1] += [PAD_ID] * (seq_len - len(rows[-1]))
    return torch.tensor(rows, dtype=torch.long)


@dataclass
class TextData:
    tokenizer: SubwordTokenizer
    train: torch.Tensor  # [N, seq_len] token blocks
    valid: torch.Tensor  # [M, seq_len]
    info: dict

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary: the tokenizer's ids plus [MASK]."""
        return self.tokenizer.vocab_size + 1


def load_text_corpus(spec: str = DEFAULT_CORPUS, seq_len: int = 128, vocab_size: int = DEFAULT_VOCAB_MLM,
                     tokenizer: SubwordTokenizer | None = None) -> TextData:
    """The corpus as token blocks; trains the tokenizer on the train lines unless one is given."""
    train_lines, valid_lines = read_corpus_lines(spec)
    if tokenizer is None:
        tokenizer = SubwordTokenizer.train(train_lines, vocab_size=vocab_size)
    train, valid = pack_blocks(tokenizer, train_lines, seq_len), pack_blocks(tokenizer, valid_lines, seq_len)
    info = {"train_lines": len(train_lines), "valid_lines": len(valid_lines), "train_blocks": len(train),
            "valid_blocks": len(valid), "seq_len": seq_len, "vocab_size": tokenizer.vocab_size + 1,
            "train_tokens": int((train != PAD_ID).sum())}
    return TextData(tokenizer, train, valid, info)


# ---- masking ---------------------------------------------------------------------------------


@dataclass
class MaskedBatch:
    tokens: torch.Tensor  # [B, T] input ids with masked positions replaced
    labels: torch.Tensor  # [B, T] the original id where a prediction is asked, PAD_ID elsewhere

    @property
    def n_tokens(self) -> int:
        """Positions to predict: the denominator of the per-token loss."""
        return int((self.labels != PAD_ID).sum())

    def to(self, device, non_blocking: bool = False) -> MaskedBatch:
        return MaskedBatch(*(getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)))

    def __len__(self) -> int:
        return self.tokens.shape[0]


def mask_blocks(blocks: torch.Tensor, mask: int, g: torch.Generator) -> MaskedBatch:
    """BERT masking of [B, T] blocks. Never masks <s> or padding; every row with a
    maskable position predicts at least one (a short last block still counts)."""
    can = (blocks != PAD_ID) & (blocks != BOS_ID)
    pick = (torch.rand(blocks.shape, generator=g) < MASK_PROB) & can
    none = ~pick.any(1) & can.any(1)
    if none.any():  # rows that drew nothing: predict their first maskable position
        first = can.float().argmax(1)
        pick[none, first[none]] = True
    r = torch.rand(blocks.shape, generator=g)
    random_ids = torch.randint(N_RESERVED, max(mask, N_RESERVED + 1), blocks.shape, generator=g)
    tokens = blocks.clone()
    tokens[pick & (r < MASK_REPLACE)] = mask
    swap = pick & (r >= MASK_REPLACE) & (r < MASK_REPLACE + MASK_RANDOM) & (mask > N_RESERVED)
    tokens[swap] = random_ids[swap]
    labels = torch.where(pick, blocks, torch.full_like(blocks, PAD_ID))
    return MaskedBatch(tokens, labels)


class MaskedBatchIterator(Resumable):
    """Batches of `batch_size` blocks with fresh masks, resumable mid-epoch, sharded by rank.

    The same contract as mosc.nn.batching.BatchIterator (epoch, position, batches(),
    state_dict/load_state_dict from Resumable): an epoch is a permutation seeded by
    (seed, epoch) cut to a multiple of world_size batches; rank r takes every world_size-th batch; batch k of
    epoch e is masked with a generator seeded by (seed, e, k), so resuming recomputes it."""

    def __init__(self, blocks: torch.Tensor, batch_size: int, mask: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        if not 0 <= rank < world_size:
            raise MoscError(f"rank {rank} outside world size {world_size}")
        self.blocks, self.batch_size, self.mask = blocks, max(1, batch_size), mask
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.position = 0, 0
        self.n_batches = len(blocks) // self.batch_size
        if self.n_batches < world_size:
            raise MoscError(f"only {len(blocks)} blocks of text for batches of {self.batch_size} on {world_size} "
                            f"rank(s); use a bigger corpus or a smaller --max-tokens")

    def __len__(self) -> int:
        return self.n_batches // self.world_size

    def epoch_order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
        perm = torch.randperm(len(self.blocks), generator=g)[: self.n_batches * self.batch_size]
        batches = perm.view(self.n_batches, self.batch_size)
        batches = batches[: self.n_batches - self.n_batches % self.world_size]
        return [(k, batches[k]) for k in range(self.rank, len(batches), self.world_size)]

    def __iter__(self) -> Iterator[MaskedBatch]:
        order = self.epoch_order(self.epoch)
        epoch = self.epoch
        for j in range(self.position, len(order)):
            self.position = j + 1  # advanced before the batch is handed out (see BatchIterator)
            if self.position == len(order):
                self.epoch, self.position = self.epoch + 1, 0
            k, rows = order[j]
            g = torch.Generator().manual_seed(((self.seed * 1_000_003 + epoch) * 1_000_033 + k) % (2**63))
            yield mask_blocks(self.blocks[rows], self.mask, g)

    def batches(self) -> Iterator[MaskedBatch]:
        while True:
            yield from iter(self)

    def _fingerprint(self) -> dict:
        return {"n_blocks": len(self.blocks), "n_tokens": int((self.blocks != PAD_ID).sum()),
                "seq_len": self.blocks.shape[1], "batch_size": self.batch_size, "seed": self.seed,
                "world_size": self.world_size}


# ---- validation loss ---------------------------------------------------------------------------


def valid_batches(valid: torch.Tensor, mask: int, batch_size: int = 64,
                  max_blocks: int = MAX_VALID_BLOCKS) -> list[MaskedBatch]:
    """The first max_blocks validation blocks, masked once with VALID_SEED (fixed positions)."""
    g = torch.Generator().manual_seed(VALID_SEED)
    blocks = valid[:max_blocks]
    return [mask_blocks(blocks[i : i + batch_size], mask, g) for i in range(0, len(blocks), batch_size)]


@torch.no_grad()
def mlm_loss(hidden_fn: Callable[[torch.Tensor], torch.Tensor], logits_fn: Callable[[torch.Tensor], torch.Tensor],
             batches: list[MaskedBatch], device: torch.device | str = "cpu") -> float:
    """Mean cross-entropy per predicted token (nats). hidden_fn: tokens [B, T] -> [B, T, W]
    (a supernet at one arch, or a static encoder); logits_fn: [N, W] -> [N, V]."""
    total, n = 0.0, 0
    for b in batches:
        b = b.to(device)
        keep = b.labels != PAD_ID
        logits = logits_fn(hidden_fn(b.tokens)[keep]).float()
        total += F.cross_entropy(logits, b.labels[keep], reduction="sum").item()
        n += int(keep.sum())
    return total / max(n, 1)

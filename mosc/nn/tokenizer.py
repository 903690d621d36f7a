"""The joint source/target subword tokenizer (BPE via HF `tokenizers`) and its reserved ids.

What this module does: trains a joint (source+target) BPE tokenizer, encodes and decodes
sentences, and serializes it to a JSON string so it can live inside a checkpoint
(`SubwordTokenizer`).

What it does NOT know: files of a corpus, the synthetic task, batches, models or BLEU.
`tokenizers` is imported only when a tokenizer is trained or parsed.

Token ids: <pad>=0, <s>=1 (bos), </s>=2 (eos), <unk>=3 (fixed by mosc.contract), then 256
byte tokens <0x00>..<0xFF> (byte fallback: a character never seen in training is spelled
as its UTF-8 bytes, so encode never produces <unk> and decode(encode(s)) == s for any
NFC-normalized, whitespace-normalized s), then the learned subwords.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import torch

from mosc.contract import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from mosc.errors import MoscError
from mosc.fileio import atomic_write_text, parse_json, read_text
from mosc.nn.settings import MAX_VOCAB, whole

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]  # in id order
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]  # ids 4..259, sentencepiece-style byte fallback
N_RESERVED = len(SPECIAL_TOKENS) + len(BYTE_TOKENS)  # 260 ids before the first learned subword

MIN_VOCAB = N_RESERVED + 40  # a vocab below this could learn almost no subwords
DEFAULT_VOCAB_REAL = 8000  # joint BPE vocab for real corpora (Multi30k: ~14 tokens/sentence)
DEFAULT_VOCAB_SYNTHETIC = 1000  # the synthetic task has ~250 distinct words; BPE stops early
DEFAULT_MIN_FREQUENCY = 2  # a merge must occur at least this often in training text


def check_vocab_size(vocab_size) -> int:
    """A vocabulary size BPE can train: the reserved ids, room to learn, and not absurdly large."""
    if isinstance(vocab_size, int) and not isinstance(vocab_size, bool) and vocab_size < MIN_VOCAB:
        raise MoscError(f"tokenizer: vocab_size {vocab_size} too small; it must be at least {MIN_VOCAB} "
                        f"({N_RESERVED} reserved ids and room to learn subwords)")
    return whole("vocab_size", vocab_size, MIN_VOCAB, MAX_VOCAB)


class SubwordTokenizer:
    """Joint source/target BPE (HF `tokenizers`): NFC, Metaspace ("▁" marks a word start),
    byte fallback. Special ids are handled here, not by HF: text can never produce them
    (a literal "<s>" in a sentence is spelled out), and decode drops them."""

    def __init__(self, tok):  # tok: tokenizers.Tokenizer; use train/from_json/load instead
        # The model and the batcher rely on these ids; a foreign tokenizer JSON would not have them.
        want = {**{t: i for i, t in enumerate(SPECIAL_TOKENS)}, BYTE_TOKENS[0]: 4, BYTE_TOKENS[-1]: N_RESERVED - 1}
        for t, i in want.items():
            if tok.token_to_id(t) != i:
                raise MoscError(f"{t} has id {tok.token_to_id(t)}, expected {i}; not a mosc tokenizer")
        self._tok = tok
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = PAD_ID, BOS_ID, EOS_ID, UNK_ID

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_REAL, min_frequency: int = DEFAULT_MIN_FREQUENCY
    ) -> SubwordTokenizer:
        """Learn BPE merges from texts (pass source and target sentences together: joint vocab).

        vocab_size counts the 260 reserved ids; BPE stops early if it runs out of merges."""
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

        check_vocab_size(vocab_size)
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        tok.normalizer = normalizers.NFC()
        # Metaspace splits on spaces only and keeps them as "▁", so decode restores the exact
        # text (ByteLevel also round-trips Multi30k exactly but needs ~5% more tokens).
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
        tok.decoder = decoders.Sequence(
            [decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)]
        )
        # Passing specials + bytes as "special tokens" puts them first in the vocab, in order.
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS + BYTE_TOKENS,
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        # ...but then HF would also match "<s>" or "<0x41>" literally inside input text and
        # would treat them specially in decode. Keep them as plain vocab entries only.
        spec = json.loads(tok.to_str())
        spec["added_tokens"] = []
        return cls(Tokenizer.from_str(json.dumps(spec, ensure_ascii=False)))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Sentence -> subword ids, no bos/eos (the batcher adds those)."""
        return self._tok.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Many sentences at once (parallel in Rust): a few seconds for all of Multi30k."""
        return [e.ids for e in self._tok.encode_batch(list(texts))]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Ids -> plain detokenized text: stops at the first </s>, drops <pad> <s> <unk>."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if EOS_ID in ids:
            ids = ids[: ids.index(EOS_ID)]
        ids = [i for i in ids if i > UNK_ID]
        if ids and not 0 <= max(ids) < self.vocab_size:
            raise MoscError(f"tokenizer: id {max(ids)} outside the vocabulary (size {self.vocab_size})")
        return self._tok.decode(ids, skip_special_tokens=False)

    def decode_batch(self, rows: Sequence[Sequence[int]] | torch.Tensor) -> list[str]:
        """[B, T] ids (e.g. generated hypotheses) -> B sentences."""
        return [self.decode(r) for r in (rows.tolist() if isinstance(rows, torch.Tensor) else rows)]

    def tokens(self, text: str) -> list[str]:
        """The subword strings of a sentence, for inspection."""
        return self._tok.encode(text).tokens

    def to_json(self) -> str:
        """The full tokenizer as a JSON string (HF format): store it inside a checkpoint."""
        return self._tok.to_str()

    @classmethod
    def from_json(cls, s: str, where: str = "tokenizer") -> SubwordTokenizer:
        from tokenizers import Tokenizer

        if not isinstance(s, str):
            raise MoscError(f"{where}: a tokenizer is JSON text, not {type(s).__name__}")
        parse_json(s, where, expect=dict)  # NaN, wrong top-level type: one line before HF sees it
        try:
            tok = Tokenizer.from_str(s)
        except Exception as e:  # HF raises a bare Exception on malformed JSON
            raise MoscError(f"{where}: cannot parse tokenizer JSON: {(str(e).splitlines() or ['?'])[0]}") from None
        except BaseException as e:  # a Rust panic in HF (pyo3's PanicException is a BaseException)
            if type(e).__name__ != "PanicException":
                raise
            raise MoscError(f"{where}: cannot parse tokenizer JSON: {(str(e).splitlines() or ['?'])[0]}") from None
        try:
            return cls(tok)
        except MoscError as e:
            raise MoscError(f"{where}: {e}") from None

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> SubwordTokenizer:
        return cls.from_json(read_text(path, "tokenizer"), where=f"tokenizer {path}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SubwordTokenizer) and self.to_json() == other.to_json()

    def __repr__(self) -> str:
        return f"SubwordTokenizer(vocab_size={self.vocab_size})"

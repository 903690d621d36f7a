"""Parallel text for translation: reading, a synthetic task, BPE, and token-budget batches.

What this module does:
  - reads a parallel corpus from two line-aligned text files (plain or .gz) and refuses
    misaligned files or empty lines, naming the file and line (`read_parallel`);
  - generates a seeded synthetic "language pair" that a tiny transformer learns in
    minutes on a CPU and that needs attention (`synthetic_splits`, `SyntheticConfig`);
  - trains a joint (source+target) BPE tokenizer with HF `tokenizers`, serializable to
    a JSON string so it can live inside a checkpoint (`SubwordTokenizer`);
  - bundles tokenizer + encoded train/val/test (`ParallelData`, built by `load_corpus`);
  - packs encoded pairs into padded batches under a token budget, in a seeded order that
    can be resumed mid-epoch bit for bit and sharded across DDP ranks (`BatchIterator`).

What it does NOT know: anything about the model, architectures, the search space,
training, devices or BLEU. Batches are CPU LongTensors; the caller moves them.

Token ids: <pad>=0, <s>=1 (bos), </s>=2 (eos), <unk>=3, then 256 byte tokens <0x00>..<0xFF>
(byte fallback: a character never seen in training is spelled as its UTF-8 bytes, so
encode never produces <unk> and decode(encode(s)) == s for any NFC-normalized,
whitespace-normalized s), then the learned subwords.
"""

from __future__ import annotations

import gzip
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from mosc.contract import BOS_ID, EOS_ID, PAD_ID, UNK_ID  # noqa: F401  (re-exported to the torch world)
from mosc.errors import MoscError

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]  # in id order
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]  # ids 4..259, sentencepiece-style byte fallback
N_RESERVED = len(SPECIAL_TOKENS) + len(BYTE_TOKENS)  # 260 ids before the first learned subword

DEFAULT_VOCAB_REAL = 8000  # joint BPE vocab for real corpora (Multi30k: ~14 tokens/sentence)
DEFAULT_VOCAB_SYNTHETIC = 1000  # the synthetic task has ~250 distinct words; BPE stops early
DEFAULT_MIN_FREQUENCY = 2  # a merge must occur at least this often in training text

VAL_NAMES = ("val", "valid", "dev")  # split file names tried, in order, for the validation set
TRAIN_NAME = "train"  # split file name of the training set
TEST_PREFIX = "test"  # test split: "test" if present, else the single "test*" (e.g. test_2016_flickr)


# ----------------------------------------------------------------------------------------
# shared data lookup


def shared_data_dir() -> Path | None:
    """The project's sibling `shared/data` folder (real corpora nobody here wrote), or None.

    A fresh clone has no `../shared`; tests skip and `load_corpus("multi30k")` fails cleanly."""
    d = Path(__file__).resolve().parents[3] / "shared" / "data"
    return d if d.is_dir() else None


# ----------------------------------------------------------------------------------------
# reading parallel files


def _normalize_line(line: str) -> str:
    # Collapse runs of whitespace and strip the ends: Multi30k's train.de has 40 lines with
    # stray leading/trailing spaces and 44 with double spaces; they carry no meaning and would
    # otherwise break decode(encode(s)) == s for the references.
    return " ".join(line.split())


def read_lines(path: str | Path) -> list[str]:
    """One whitespace-normalized sentence per line of a UTF-8 text file (plain or .gz).

    Raises MoscError on a missing/unreadable file, non-UTF-8 bytes, or an empty line."""
    path = Path(path)
    try:
        data = path.read_bytes()
        if path.name.endswith(".gz") or data[:2] == b"\x1f\x8b":  # by name or by gzip magic
            data = gzip.decompress(data)
    except FileNotFoundError:
        raise MoscError(f"{path}: no such file") from None
    except (OSError, EOFError) as e:  # includes gzip.BadGzipFile and truncated archives
        raise MoscError(f"{path}: cannot read: {e}") from None
    try:
        text = data.decode("utf-8-sig")  # -sig: drop a leading byte-order mark if any
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise MoscError(f"{path}:{line}: not UTF-8 text ({e.reason})") from None
    # Split on "\n" only: str.splitlines() also splits on \x0b, \x1c, \u2028, ... which can
    # appear inside a sentence and would silently misalign the two sides.
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last line, it does not start a new one
    lines = [_normalize_line(x) for x in lines]  # also drops the "\r" of CRLF files
    empty = [i + 1 for i, x in enumerate(lines) if not x]
    if empty:
        more = f" ({len(empty)} empty lines in all)" if len(empty) > 1 else ""
        raise MoscError(f"{path}:{empty[0]}: empty line; a parallel corpus needs one sentence per line{more}")
    return lines


def read_parallel(src_path: str | Path, tgt_path: str | Path) -> tuple[list[str], list[str]]:
    """Two line-aligned files -> (source sentences, target sentences), same length.

    Raises MoscError naming the file and line of the first empty line, or of the first
    line that has no counterpart when the line counts differ."""
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        longer, n_long, n_short = (src_path, len(src), len(tgt)) if len(src) > len(tgt) else (tgt_path, len(tgt), len(src))
        shorter = tgt_path if longer == src_path else src_path
        raise MoscError(
            f"{longer}:{n_short + 1}: misaligned parallel files: {longer} has {n_long} lines "
            f"but {shorter} has {n_short}"
        )
    return src, tgt


# ----------------------------------------------------------------------------------------
# the synthetic task
#
# Source grammar (made-up words, lower case, space separated):
#   sentence -> clause (CONJ clause)?
#   clause   -> NP VERB NP? (PREP NP)?          subject, verb, optional object, optional PP
#   NP       -> DET ADJ{0..max_adjs} NOUN
# Target = deterministic transformation of the source:
#   - every word maps through a fixed bilingual lexicon (different made-up words);
#   - NP:     DET ADJ1 ADJ2 NOUN  ->  DET' NOUN' ADJ2' ADJ1'   (adjectives after the noun, mirrored)
#   - DET' agrees with the noun's hidden gender (3 genders): needs a look-ahead over the adjectives;
#   - clause: S V O (P NP)        ->  S' O' NP' P' V'         (verb-final, postpositions)
#   - V' = verb stem + a suffix agreeing with the subject noun's gender: the last word of a
#     clause depends on a word up to ~10 positions earlier.
# Word-for-word it is easy; reordering and agreement need attention, and a larger lexicon
# needs more capacity, so BLEU separates small from large subnets.


@dataclass(frozen=True)
class SyntheticConfig:
    n_train: int = 10000  # training pairs
    n_val: int = 500  # validation pairs (generated first: fixed whatever n_train is)
    n_test: int = 500  # test pairs (generated second: fixed whatever n_train is)
    seed: int = 0  # which sentences are drawn (the language itself does not change)
    language_seed: int = 20240229  # which lexicon/genders: change only to get another language
    n_nouns: int = 48  # lexicon sizes: more words = more to memorize = needs more capacity
    n_adjs: int = 24
    n_verbs: int = 24
    n_preps: int = 8
    n_dets: int = 3
    n_conjs: int = 2
    n_genders: int = 3  # noun classes that determiners and verbs agree with in the target
    max_adjs: int = 2  # adjectives per noun phrase, uniform in 0..max_adjs
    p_object: float = 0.6  # probability a clause has an object
    p_pp: float = 0.4  # probability a clause has a prepositional phrase
    p_conj: float = 0.3  # probability a sentence has a second clause


# Syllables: the two sides look different, so nothing can be copied; the target uses
# umlauts so the non-ASCII path of the tokenizer is exercised like German.
_SRC_ONSETS, _SRC_VOWELS = "bdgklmnprstv", "aeiou"
_TGT_ONSETS, _TGT_VOWELS = ["f", "h", "j", "w", "z", "sch", "kr", "tz"], ["a", "e", "i", "o", "u", "ä", "ö", "ü"]


class _Language:
    """The fixed lexicon of one synthetic language pair (derived from language_seed only)."""

    def __init__(self, cfg: SyntheticConfig):
        rng = random.Random(cfg.language_seed)
        used: set[str] = set()

        def words(n: int, onsets: Sequence[str], vowels: Sequence[str], syllables: tuple[int, int]) -> list[str]:
            out = []
            while len(out) < n:
                w = "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(rng.randint(*syllables)))
                if w not in used:  # unique across every word class and both sides
                    used.add(w)
                    out.append(w)
            return out

        s, t = (_SRC_ONSETS, _SRC_VOWELS), (_TGT_ONSETS, _TGT_VOWELS)
        # Function words are short (1 syllable), content words longer, as in real languages.
        self.nouns = list(zip(words(cfg.n_nouns, *s, (2, 3)), words(cfg.n_nouns, *t, (2, 3))))
        self.adjs = list(zip(words(cfg.n_adjs, *s, (2, 3)), words(cfg.n_adjs, *t, (2, 3))))
        self.verbs = list(zip(words(cfg.n_verbs, *s, (2, 3)), words(cfg.n_verbs, *t, (2, 2))))
        self.preps = list(zip(words(cfg.n_preps, *s, (1, 2)), words(cfg.n_preps, *t, (1, 2))))
        self.conjs = list(zip(words(cfg.n_conjs, *s, (1, 1)), words(cfg.n_conjs, *t, (1, 2))))
        self.gender = [rng.randrange(cfg.n_genders) for _ in self.nouns]  # hidden noun class
        # A determiner has one target form per gender; a verb one suffix per gender.
        self.dets = [(w, words(cfg.n_genders, *t, (1, 1))) for w in words(cfg.n_dets, *s, (1, 1))]
        self.verb_suffix = ["", "ri", "lo", "ka", "ne", "tu"][: cfg.n_genders]
        if cfg.n_genders > len(self.verb_suffix):
            raise MoscError(f"synthetic: n_genders must be at most {len(self.verb_suffix)}")


def _synthetic_pair(lang: _Language, cfg: SyntheticConfig, rng: random.Random) -> tuple[str, str]:
    def np_() -> tuple[list[str], list[str], int]:
        det_src, det_tgt = rng.choice(lang.dets)
        k = rng.randrange(len(lang.nouns))
        adjs = [rng.choice(lang.adjs) for _ in range(rng.randint(0, cfg.max_adjs))]
        g = lang.gender[k]
        src = [det_src] + [a for a, _ in adjs] + [lang.nouns[k][0]]
        tgt = [det_tgt[g], lang.nouns[k][1]] + [b for _, b in reversed(adjs)]
        return src, tgt, g

    def clause() -> tuple[list[str], list[str]]:
        subj_s, subj_t, g = np_()
        verb_s, verb_t = rng.choice(lang.verbs)
        src, tgt = subj_s + [verb_s], list(subj_t)
        if rng.random() < cfg.p_object:
            obj_s, obj_t, _ = np_()
            src += obj_s
            tgt += obj_t
        if rng.random() < cfg.p_pp:
            prep_s, prep_t = rng.choice(lang.preps)
            pp_s, pp_t, _ = np_()
            src += [prep_s] + pp_s
            tgt += pp_t + [prep_t]
        tgt.append(verb_t + lang.verb_suffix[g])  # verb-final, agreeing with the subject
        return src, tgt

    src, tgt = clause()
    if rng.random() < cfg.p_conj:
        conj_s, conj_t = rng.choice(lang.conjs)
        src2, tgt2 = clause()
        src, tgt = src + [conj_s] + src2, tgt + [conj_t] + tgt2
    return " ".join(src), " ".join(tgt)


def synthetic_pairs(n: int, cfg: SyntheticConfig = SyntheticConfig()) -> tuple[list[str], list[str]]:
    """n distinct (source, target) sentence pairs drawn with cfg.seed, in a fixed order."""
    lang, rng = _Language(cfg), random.Random(cfg.seed)
    src, tgt, seen = [], [], set()
    attempts = 0
    while len(src) < n:
        attempts += 1
        if attempts > 20 * n + 1000:
            raise MoscError(f"synthetic: the grammar cannot produce {n} distinct sentences; enlarge the lexicon")
        s, t = _synthetic_pair(lang, cfg, rng)
        if s not in seen:  # distinct, so val/test never leak into train
            seen.add(s)
            src.append(s)
            tgt.append(t)
    return src, tgt


def synthetic_splits(cfg: SyntheticConfig = SyntheticConfig()) -> dict[str, tuple[list[str], list[str]]]:
    """{"train", "val", "test"} -> (source sentences, target sentences), disjoint, from cfg.seed.

    val and test are drawn first, so they stay the same when only n_train changes."""
    src, tgt = synthetic_pairs(cfg.n_val + cfg.n_test + cfg.n_train, cfg)
    a, b = cfg.n_val, cfg.n_val + cfg.n_test
    return {"val": (src[:a], tgt[:a]), "test": (src[a:b], tgt[a:b]), "train": (src[b:], tgt[b:])}


# ----------------------------------------------------------------------------------------
# the tokenizer


class SubwordTokenizer:
    """Joint source/target BPE (HF `tokenizers`): NFC, Metaspace ("▁" marks a word start),
    byte fallback. Special ids are handled here, not by HF: text can never produce them
    (a literal "<s>" in a sentence is spelled out), and decode drops them."""

    def __init__(self, tok):  # tok: tokenizers.Tokenizer; use train/from_json/load instead
        # The model and the batcher rely on these ids; a foreign tokenizer JSON would not have them.
        want = {**{t: i for i, t in enumerate(SPECIAL_TOKENS)}, BYTE_TOKENS[0]: 4, BYTE_TOKENS[-1]: N_RESERVED - 1}
        for t, i in want.items():
            if tok.token_to_id(t) != i:
                raise MoscError(f"tokenizer: {t} has id {tok.token_to_id(t)}, expected {i}; not a mosc tokenizer")
        self._tok = tok
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = PAD_ID, BOS_ID, EOS_ID, UNK_ID

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_REAL, min_frequency: int = DEFAULT_MIN_FREQUENCY
    ) -> SubwordTokenizer:
        """Learn BPE merges from texts (pass source and target sentences together: joint vocab).

        vocab_size counts the 260 reserved ids; BPE stops early if it runs out of merges."""
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

        if vocab_size < N_RESERVED + 40:
            raise MoscError(f"tokenizer: vocab_size {vocab_size} too small; it must exceed {N_RESERVED + 40}")
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
    def from_json(cls, s: str) -> SubwordTokenizer:
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_str(s)
        except Exception as e:  # HF raises a bare Exception on malformed JSON
            raise MoscError(f"tokenizer: cannot parse tokenizer JSON: {(str(e).splitlines() or ['?'])[0]}") from None
        return cls(tok)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> SubwordTokenizer:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise MoscError(f"{path}: cannot read tokenizer: {e.strerror}") from None
        return cls.from_json(text)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SubwordTokenizer) and self.to_json() == other.to_json()

    def __repr__(self) -> str:
        return f"SubwordTokenizer(vocab_size={self.vocab_size})"


# ----------------------------------------------------------------------------------------
# the corpus container


@dataclass
class Split:
    """One split: raw sentences (BLEU references are the raw target text) and their ids."""

    src_text: list[str]
    tgt_text: list[str]
    src: list[list[int]]  # subword ids, no bos/eos
    tgt: list[list[int]]

    def __len__(self) -> int:
        return len(self.src)


@dataclass
class ParallelData:
    name: str  # "synthetic" or the corpus path prefix it was read from
    src_lang: str  # file suffix of the source side ("src" for synthetic)
    tgt_lang: str  # file suffix of the target side ("tgt" for synthetic)
    tokenizer: SubwordTokenizer  # joint vocab: one embedding table serves both sides
    train: Split
    val: Split
    test: Split
    info: dict = field(default_factory=dict)  # how it was built: sizes, timings (for logs)

    def split(self, name: str) -> Split:
        if name not in ("train", "val", "test"):
            raise MoscError(f"unknown split {name!r}; use train, val or test")
        return getattr(self, name)


def _find_split_file(prefix: str, split: str, lang: str) -> Path | None:
    for name in (f"{prefix}{split}.{lang}", f"{prefix}{split}.{lang}.gz"):
        if Path(name).is_file():
            return Path(name)
    return None


def _resolve_prefix(spec: str) -> str:
    p = Path(spec)
    if p.is_dir():
        return str(p) + "/"
    shared = shared_data_dir()
    if not p.exists() and "/" not in spec and shared is not None and (shared / spec).is_dir():
        return str(shared / spec) + "/"  # a bare name like "multi30k" means ../shared/data/multi30k
    return spec


def find_corpus_files(spec: str, src_lang: str = "en", tgt_lang: str = "de", test_split: str | None = None) -> dict[str, tuple[Path, Path]]:
    """Corpus spec -> {"train", "val", "test"} -> (source file, target file).

    spec is a directory, a bare name under shared_data_dir() ("multi30k"), or a path prefix
    P with files P{split}.{lang}[.gz] (a directory D is the prefix "D/"). Splits: train;
    val|valid|dev; test, else the single test* file (Multi30k: test_2016_flickr), or test_split."""
    prefix = _resolve_prefix(spec)
    files: dict[str, tuple[Path, Path]] = {}
    if test_split is None:  # "test", else the only test* set (Multi30k: test_2016_flickr)
        d, stem = (Path(prefix), "") if prefix.endswith("/") else (Path(prefix).parent, Path(prefix).name)
        found = sorted({f.name[len(stem):].split(".")[0] for f in d.glob(f"{stem}{TEST_PREFIX}*.{src_lang}*")}) if d.is_dir() else []
        if len(found) > 1 and TEST_PREFIX not in found:
            raise MoscError(f"{spec}: several test sets ({', '.join(found)}); choose one with test_split")
        test_split = TEST_PREFIX if TEST_PREFIX in found or not found else found[0]
    for split, names in (("train", (TRAIN_NAME,)), ("val", VAL_NAMES), ("test", (test_split,))):
        for name in names:
            s, t = _find_split_file(prefix, name, src_lang), _find_split_file(prefix, name, tgt_lang)
            if s and t:
                files[split] = (s, t)
                break
        else:
            want = f"{prefix}{names[0]}.{{{src_lang},{tgt_lang}}}[.gz]"
            raise MoscError(
                f"{spec}: no {split} files (looked for {want}); a corpus is 'synthetic', a directory, "
                "a name under ../shared/data, or a path prefix"
            )
    return files


def encode_split(tok: SubwordTokenizer, src_text: list[str], tgt_text: list[str]) -> Split:
    return Split(src_text, tgt_text, tok.encode_batch(src_text), tok.encode_batch(tgt_text))


def load_corpus(
    spec: str,
    *,
    src_lang: str = "en",  # source language suffix of the files (ignored for "synthetic")
    tgt_lang: str = "de",  # target language suffix of the files (ignored for "synthetic")
    tokenizer: SubwordTokenizer | None = None,  # reuse (e.g. from a checkpoint) instead of training one
    vocab_size: int | None = None,  # None: DEFAULT_VOCAB_REAL, or DEFAULT_VOCAB_SYNTHETIC for "synthetic"
    synthetic: SyntheticConfig = SyntheticConfig(),  # sizes/seed of the synthetic task
    test_split: str | None = None,  # test file name when a directory has several test* sets
    max_train_pairs: int | None = None,  # keep only the first N training pairs (quick runs)
) -> ParallelData:
    """Read or generate a corpus, train (or reuse) the joint BPE on its train split, encode all.

    spec: "synthetic", or a directory / bare shared name / path prefix (see find_corpus_files)."""
    t0 = time.perf_counter()
    if spec == "synthetic":
        raw = synthetic_splits(synthetic)
        name, src_lang, tgt_lang = "synthetic", "src", "tgt"
        default_vocab = DEFAULT_VOCAB_SYNTHETIC
    else:
        files = find_corpus_files(spec, src_lang, tgt_lang, test_split)
        raw = {split: read_parallel(*paths) for split, paths in files.items()}
        name, default_vocab = _resolve_prefix(spec), DEFAULT_VOCAB_REAL
    if max_train_pairs is not None:
        raw["train"] = (raw["train"][0][:max_train_pairs], raw["train"][1][:max_train_pairs])
    t_read = time.perf_counter()
    if tokenizer is None:
        tokenizer = SubwordTokenizer.train(raw["train"][0] + raw["train"][1], vocab_size or default_vocab)
    t_tok = time.perf_counter()
    splits = {k: encode_split(tokenizer, *v) for k, v in raw.items()}
    info = {
        "pairs": {k: len(v) for k, v in splits.items()},
        "vocab_size": tokenizer.vocab_size,
        "seconds": {"read": round(t_read - t0, 3), "tokenizer": round(t_tok - t_read, 3), "encode": round(time.perf_counter() - t_tok, 3)},
    }
    if spec == "synthetic":
        info["synthetic"] = asdict(synthetic)
    return ParallelData(name, src_lang, tgt_lang, tokenizer, splits["train"], splits["val"], splits["test"], info)


# ----------------------------------------------------------------------------------------
# batching


@dataclass
class Batch:
    src: torch.Tensor  # [B, S] source ids, right-padded with PAD_ID (no bos/eos)
    tgt_in: torch.Tensor  # [B, T] bos + target, right-padded: the decoder's input
    tgt_out: torch.Tensor  # [B, T] target + eos, right-padded: what the decoder must predict
    idx: torch.Tensor  # [B] index of each row's pair in its Split (to restore corpus order)

    @property
    def n_tokens(self) -> int:
        """Non-pad target tokens (eos included): the denominator of a per-token loss."""
        return int((self.tgt_out != PAD_ID).sum())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in (self.src, self.tgt_in, self.tgt_out, self.idx)))

    def __len__(self) -> int:
        return self.src.shape[0]


def collate(src: Sequence[Sequence[int]], tgt: Sequence[Sequence[int]], idx: Sequence[int]) -> Batch:
    """Pairs of id lists -> a padded Batch (targets get bos/eos here)."""
    B, S, T = len(src), max(len(s) for s in src), max(len(t) for t in tgt) + 1
    s_t = torch.full((B, S), PAD_ID, dtype=torch.long)
    t_in = torch.full((B, T), PAD_ID, dtype=torch.long)
    t_out = torch.full((B, T), PAD_ID, dtype=torch.long)
    for b, (s, t) in enumerate(zip(src, tgt)):
        s_t[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        t_in[b, : len(t) + 1] = torch.tensor([BOS_ID, *t], dtype=torch.long)
        t_out[b, : len(t) + 1] = torch.tensor([*t, EOS_ID], dtype=torch.long)
    return Batch(s_t, t_in, t_out, torch.tensor(list(idx), dtype=torch.long))


class BatchIterator:
    """Token-budget batches over one Split, resumable mid-epoch and shardable across ranks.

    Batches are planned once: pairs sorted by padded length (ties by index), then packed
    greedily so that B * max(S, T) <= max_tokens (T = target length + 1 for bos/eos). Only
    the ORDER of batches changes between epochs: a permutation drawn from a
    torch.Generator seeded with (seed, epoch), so any epoch's order can be recomputed.

    Each `iter()` yields the rest of the current epoch and advances `epoch`/`position` as it
    goes (position = batches of this epoch already handed out on this rank; after the last
    one the state is already (epoch + 1, 0)). To resume bit for bit mid-epoch: save
    `state_dict()` in the checkpoint right after the optimizer step of a batch, and on
    restart build the iterator with the same data and arguments, `load_state_dict(...)`,
    and iterate: the remaining batches come out identical. (The model's own RNG for
    dropout is the trainer's business.)

    DDP: every rank builds the same plan; each epoch's permuted list is cut to a multiple
    of world_size (the few left-over batches differ each epoch, so nothing is lost for
    good) and rank r takes every world_size-th batch from r: disjoint, same count per rank.
    The state is the same on all ranks, so rank 0's state_dict serves everyone.
    """

    def __init__(
        self,
        split: Split,
        max_tokens: int = 4096,  # padded tokens per batch, B * max(S, T), on each rank
        *,
        max_len: int = 256,  # longest source/target in subword tokens (before bos/eos)
        long: str = "filter",  # pairs over max_len: "filter" (drop; training) or "truncate" (eval)
        shuffle: bool = True,  # False: sorted order, no permutation (evaluation)
        seed: int = 0,  # batch order seed; epoch e uses seed and e
        rank: int = 0,  # DDP rank of this process
        world_size: int = 1,  # DDP world size
    ):
        if long not in ("filter", "truncate"):
            raise MoscError(f"long must be 'filter' or 'truncate', not {long!r}")
        if max_len < 1 or max_tokens < max_len + 1:
            raise MoscError(f"max_tokens ({max_tokens}) must be at least max_len + 1 ({max_len + 1})")
        if not 0 <= rank < world_size:
            raise MoscError(f"rank {rank} outside world size {world_size}")
        self.split, self.max_tokens, self.max_len, self.long = split, max_tokens, max_len, long
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        self.epoch, self.position = 0, 0

        # Which pairs take part, at what (possibly truncated) lengths.
        keep, src_len, tgt_len = [], [], []
        for i, (s, t) in enumerate(zip(split.src, split.tgt)):
            if long == "filter" and (len(s) > max_len or len(t) > max_len):
                continue
            keep.append(i)
            src_len.append(min(len(s), max_len))
            tgt_len.append(min(len(t), max_len))
        self.n_dropped = len(split) - len(keep)  # pairs filtered out for length
        if not keep:
            raise MoscError(f"no pair fits max_len={max_len}")
        cost = [max(a, b + 1) for a, b in zip(src_len, tgt_len)]  # padded width of a row

        # Sort by width, then target and source length, so rows in a batch pad little.
        order = sorted(range(len(keep)), key=lambda j: (cost[j], tgt_len[j], src_len[j], keep[j]))
        self.plan: list[list[int]] = []  # batches as lists of pair indices into split
        cur, width = [], 0
        for j in order:
            w = max(width, cost[j])
            if cur and (len(cur) + 1) * w > max_tokens:
                self.plan.append(cur)
                cur, w = [], cost[j]
            cur.append(keep[j])
            width = w
        self.plan.append(cur)
        if len(self.plan) < world_size:
            raise MoscError(f"only {len(self.plan)} batches for {world_size} ranks; lower max_tokens")

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return len(self.plan) // self.world_size

    def epoch_order(self, epoch: int) -> list[int]:
        """Plan indices of this rank's batches in epoch `epoch`, in order."""
        n = len(self.plan)
        if self.shuffle:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
            perm = torch.randperm(n, generator=g).tolist()
        else:
            perm = list(range(n))
        perm = perm[: n - n % self.world_size]  # equal count per rank
        return perm[self.rank :: self.world_size]

    def batch(self, plan_index: int) -> Batch:
        ids = self.plan[plan_index]
        m = self.max_len  # only bites in "truncate" mode: filtered pairs are already short
        return collate([self.split.src[i][:m] for i in ids], [self.split.tgt[i][:m] for i in ids], ids)

    def __iter__(self) -> Iterator[Batch]:
        order = self.epoch_order(self.epoch)
        for k in range(self.position, len(order)):
            # Advance the state before handing the batch out: a checkpoint saved while the
            # caller holds batch k must resume at k + 1.
            self.position = k + 1
            if self.position == len(order):
                self.epoch, self.position = self.epoch + 1, 0
            yield self.batch(order[k])

    def batches(self) -> Iterator[Batch]:
        """Endless stream across epochs (for step-based training loops)."""
        while True:
            yield from iter(self)

    def _fingerprint(self) -> dict:
        return {
            "n_pairs": len(self.split), "n_batches": len(self.plan),
            "n_tokens": sum(map(len, self.split.src)) + sum(map(len, self.split.tgt)),  # other data or tokenizer? "max_tokens": self.max_tokens,
            "max_len": self.max_len, "long": self.long, "shuffle": self.shuffle, "seed": self.seed,
            "world_size": self.world_size,
        }

    def state_dict(self) -> dict:
        """JSON-able resume point: {"epoch", "position", and what must match to resume}."""
        return {"epoch": self.epoch, "position": self.position, **self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        mine = self._fingerprint()
        diff = [k for k in mine if k in state and state[k] != mine[k]]
        if diff:
            k = diff[0]
            raise MoscError(f"cannot resume batches: {k} was {state[k]}, now {mine[k]} (data or batching settings changed)")
        if not 0 <= state["position"] < max(len(self), 1):
            raise MoscError(f"cannot resume batches: position {state['position']} outside an epoch of {len(self)}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def eval_batches(split: Split, max_tokens: int = 4096, max_len: int = 256) -> list[Batch]:
    """Every pair once, length-sorted, sources truncated to max_len (nothing dropped).

    Put hypotheses back in corpus order with batch.idx."""
    return list(BatchIterator(split, max_tokens, max_len=max_len, long="truncate", shuffle=False))

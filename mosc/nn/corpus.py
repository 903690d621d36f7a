"""Parallel corpora: line-aligned text files (or the synthetic task) -> tokenizer + encoded splits.

What this module does:
  - reads a parallel corpus from two line-aligned text files (plain or .gz) and refuses
    misaligned files or empty lines, naming the file and line (`read_parallel`);
  - finds a corpus's train/val/test files from a directory, a name under ../shared/data
    or a path prefix (`find_corpus_files`);
  - bundles tokenizer + encoded train/val/test (`ParallelData`, built by `load_corpus`,
    which also generates the synthetic task and trains the joint BPE when asked to).

What it does NOT know: batching, the model, architectures, the search space, training,
devices or BLEU. Sentences are strings and lists of ids; nothing here uses torch.
"""

from __future__ import annotations

import gzip
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mosc.errors import MoscError
from mosc.nn.synthetic import SyntheticConfig, synthetic_splits
from mosc.nn.settings import whole
from mosc.nn.tokenizer import DEFAULT_VOCAB_REAL, DEFAULT_VOCAB_SYNTHETIC, SubwordTokenizer, check_vocab_size

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


# ----------------------------------------------------------------------------------------
# finding and loading a corpus


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
    if vocab_size is not None:
        check_vocab_size(vocab_size)  # before hours of reading, not after
    if max_train_pairs is not None:
        whole("max_train_pairs", max_train_pairs, 1)
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

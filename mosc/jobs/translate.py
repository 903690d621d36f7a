"""Job: translate sentences with a compiled artifact (tokenize, greedy decode on the TVM
graphs, detokenize), for `mosc translate` and the pipeline's translate stage."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from mosc.errors import MoscError


@dataclass
class Translation:
    lines: list[str]  # one output line per input sentence
    ids: list[list[int]]  # output token ids per sentence
    truncated: int  # sentences cut to the graph's source length
    source_len: int
    ms: float  # wall time of the decoding (tokenizing excluded)
    target: str  # the artifact's target


MAX_SENTENCES = 1_000_000  # one request; more is a mistake (a binary file read as text)


def read_sentences(text: list[str] | None, file: Path | None) -> list[str]:
    """--text values, or every line of a file: output line N answers input line N, so blank
    lines stay (they translate to blank lines)."""
    from mosc.fileio import read_text

    if file is None:
        sentences = [s.strip() for s in text or []]
        if not any(sentences):
            raise MoscError("--text is empty: give a sentence to translate")
        return sentences
    lines = [line.strip() for line in read_text(file, "text file").splitlines()]
    if not any(lines):
        raise MoscError(f"{file} has no sentence to translate (empty or blank lines only)")
    if len(lines) > MAX_SENTENCES:
        raise MoscError(f"{file} has {len(lines):,} lines; translate at most {MAX_SENTENCES:,} per call")
    return lines


def translate(artifact: Path, sentences: list[str], tokenizer: Path | None = None) -> Translation:
    """Translate with an artifact folder (every sha256 is verified before its code is loaded).
    tokenizer: a tokenizer JSON file, for an artifact that carries none."""
    from mosc.compiler.artifact import load_artifact, read_manifest
    from mosc.nn.tokenizer import SubwordTokenizer
    from mosc.runtime import artifact_backend, translate_ids

    from mosc.contract import TRANSLATION, require_kind

    manifest = read_manifest(artifact)
    require_kind(manifest.get("graphs") or {}, TRANSLATION, f"artifact {artifact}")  # a classifier: say so first
    model = manifest.get("model")
    if not model:
        raise MoscError(f"{artifact} was not compiled from a mosc export (no model section in its manifest)")
    if tokenizer is not None:
        tok = SubwordTokenizer.load(tokenizer)
    elif model.get("tokenizer"):
        tok = SubwordTokenizer.from_json(model["tokenizer"])
    else:
        raise MoscError(f"{artifact} carries no tokenizer (the subnet came from an untrained supernet); pass --tokenizer FILE")
    art = load_artifact(artifact)
    backend = artifact_backend(art)
    todo = [i for i, s in enumerate(sentences) if s]  # blank lines stay blank, untranslated
    src = [tok.encode(sentences[i]) for i in todo]
    t0 = time.perf_counter()
    out, truncated = translate_ids(backend, src, model["bos_id"], model["eos_id"], model["pad_id"]) if todo else ([], 0)
    ms = (time.perf_counter() - t0) * 1000
    ids: list[list[int]] = [[] for _ in sentences]
    for i, row in zip(todo, out):
        ids[i] = row
    lines = [tok.decode(row) if sentences[i] else "" for i, row in enumerate(ids)]
    return Translation(lines, ids, truncated, backend.source_len, ms, art.manifest["target"])

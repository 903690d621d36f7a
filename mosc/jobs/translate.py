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


def read_sentences(text: list[str] | None, file: Path | None) -> list[str]:
    """--text values, or a file's non-empty lines."""
    if file is None:
        return list(text or [])
    try:
        return [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as e:
        raise MoscError(f"cannot read {file} ({e.strerror})") from None


def translate(artifact: Path, sentences: list[str], tokenizer: Path | None = None) -> Translation:
    """Translate with an artifact folder (every sha256 is verified before its code is loaded).
    tokenizer: a tokenizer JSON file, for an artifact that carries none."""
    from mosc.compiler.artifact import load_artifact, read_manifest
    from mosc.nn.tokenizer import SubwordTokenizer
    from mosc.runtime import artifact_backend, translate_ids

    model = read_manifest(artifact).get("model")
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
    src = [tok.encode(s) for s in sentences]
    t0 = time.perf_counter()
    out, truncated = translate_ids(backend, src, model["bos_id"], model["eos_id"], model["pad_id"])
    ms = (time.perf_counter() - t0) * 1000
    return Translation([tok.decode(row) for row in out], out, truncated, backend.source_len, ms, art.manifest["target"])

"""The deployed model run with any backend: greedy decoding (numpy in, numpy out), or the one
call of an encoder-classifier.

The deployed model is two static graphs (see mosc/nn/subnet.py and mosc/contract.py):
    encoder(src [B, S])                        -> cross: 3 tensors per decoder layer
    decoder_step(token [B], pos [1], *caches, *cross) -> logits [B, V], *caches
with caches = self_k_i, self_v_i [B, T, Q] for each of the L decoder layers.
`greedy` runs the encoder once and the decoder step T times (T = the fixed KV-cache
length), exactly like `Subnet.translate(src, bos, eos, max_len=T)`, so every backend
(PyTorch, ONNX Runtime, a TVM artifact) must produce the same token ids. A TVM artifact
runs that loop on the device in one call (its `translate` function, mosc.compiler.loop);
ONNX Runtime runs it here, in Python (`python_greedy`, the reference loop).

`Backend` wraps ONNX Runtime sessions or a loaded TVM artifact behind the same
calls; `Classifier` does the same for the one graph of an encoder-classifier
(classifier(tokens [B, T]) -> logits [B, C], mosc.contract). This module imports neither
torch nor tvm at module level: it runs on a device
(or under qemu) with only numpy and the TVM runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from mosc.contract import (CLASSIFIER, DECODER, ENCODER, ENCODER_CLASSIFIER, TRANSLATE, TRANSLATION, cache_shape,
                           check_translation_graphs, decoder_layers, load_export, require_kind)
from mosc.errors import MoscError

Fn = Callable[[list[np.ndarray]], list[np.ndarray]]
Loop = Callable[[np.ndarray, int, int], np.ndarray]  # (src [B, S], steps, eos) -> tokens [B, T]


@dataclass
class Backend:
    """The two graphs as functions of numpy lists (signature order) plus the static shapes."""

    encode: Fn
    step: Fn
    batch: int
    source_len: int
    cache_shape: tuple[int, ...]  # [B, T, Q] of every cache tensor
    layers: int  # L decoder layers: 2L cache tensors
    loop: Loop | None = None  # the whole greedy loop in one call (a TVM artifact's translate)

    @property
    def cache_len(self) -> int:
        return self.cache_shape[1]

    def zero_caches(self) -> list[np.ndarray]:
        """self_k_i, self_v_i for every layer, zeroed (the state before the first step)."""
        return [np.zeros(self.cache_shape, np.float32) for _ in range(2 * self.layers)]


# ----------------------------------------------------------------------------- backends
def _backend(encode: Fn, step: Fn, graphs: dict, loop: Loop | None = None) -> Backend:
    B, S = graphs[ENCODER]["inputs"][0]["shape"]
    return Backend(encode, step, B, S, tuple(cache_shape(graphs)), decoder_layers(graphs), loop)


def ort_backend(export_dir, meta: dict | None = None) -> Backend:
    """ONNX Runtime sessions (CPU, one thread per op) over an export folder."""
    export_dir = Path(export_dir)
    meta = meta or load_export(export_dir, TRANSLATION)
    require_kind(meta["graphs"], TRANSLATION, f"export {export_dir}")
    sess = {g: _ort_session(export_dir / meta["graphs"][g]["file"]) for g in (ENCODER, DECODER)}

    def fn(graph):
        names = [s["name"] for s in meta["graphs"][graph]["inputs"]]
        return lambda xs: sess[graph].run(None, dict(zip(names, xs)))

    return _backend(fn(ENCODER), fn(DECODER), meta["graphs"])


def _ort_session(path: Path, threads: int | None = None):
    """An ONNX Runtime CPU session; threads: intra-op threads (None: onnxruntime's default)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads is not None:
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def artifact_backend(art) -> Backend:
    """A loaded TVM artifact (mosc.compiler.artifact.Artifact) of a translation model: its
    compiled loop (translate), and its encoder and decoder_step graphs for step-wise use."""
    check_translation_graphs(art.manifest["graphs"], f"artifact {art.dir}")

    def loop(src, steps, eos):
        return art.run(TRANSLATE, [src, np.array([steps], np.int64), np.array([eos], np.int64)])[0]

    return _backend(lambda xs: art.run(ENCODER, xs), lambda xs: art.run(DECODER, xs), art.manifest["graphs"], loop)


# ----------------------------------------------------------------------------- encoder-classifier
@dataclass
class Classifier:
    """The one graph of an encoder-classifier as a function: tokens [B, T] int64 -> logits [B, C]."""

    fn: Callable[[np.ndarray], np.ndarray]
    batch: int
    seq_len: int
    n_classes: int

    def run(self, tokens: np.ndarray) -> np.ndarray:
        tokens = np.asarray(tokens)
        if tokens.shape != (self.batch, self.seq_len) or tokens.dtype != np.int64:
            raise MoscError(f"tokens must be int64[{self.batch}, {self.seq_len}], got {tokens.dtype}{list(tokens.shape)}")
        return self.fn(tokens)


def _classifier(fn, graphs: dict, where: str) -> Classifier:
    require_kind(graphs, ENCODER_CLASSIFIER, where)
    (B, T), (_, C) = graphs[CLASSIFIER]["inputs"][0]["shape"], graphs[CLASSIFIER]["outputs"][0]["shape"]
    return Classifier(fn, B, T, C)


def ort_classifier(export_dir, meta: dict | None = None, threads: int | None = None) -> Classifier:
    """ONNX Runtime (CPU) on an encoder-classifier export folder; threads: intra-op threads."""
    export_dir = Path(export_dir)
    meta = meta or load_export(export_dir, ENCODER_CLASSIFIER)
    clf = _classifier(None, meta["graphs"], f"export {export_dir}")
    sess = _ort_session(export_dir / meta["graphs"][CLASSIFIER]["file"], threads)
    clf.fn = lambda tokens: sess.run(None, {"tokens": tokens})[0]
    return clf


def artifact_classifier(art) -> Classifier:
    """A loaded TVM artifact (mosc.compiler.artifact.Artifact) holding an encoder-classifier."""
    return _classifier(lambda tokens: art.run(CLASSIFIER, [tokens])[0], art.manifest["graphs"], f"artifact {art.dir}")


def pad_tokens(rows: Sequence[Sequence[int]], batch: int, seq_len: int, bos: int, pad: int) -> np.ndarray:
    """Id lists (without <s>) -> [batch, seq_len] int64: <s> first, right-padded, cut at seq_len.
    Fewer rows than `batch`: the rest repeat the first row (their logits are dropped)."""
    if not rows or len(rows) > batch:
        raise MoscError(f"{len(rows)} rows for a graph of batch {batch}")
    out = np.full((batch, seq_len), pad, np.int64)
    for b in range(batch):
        ids = [bos, *(rows[b] if b < len(rows) else rows[0])][:seq_len]
        out[b, : len(ids)] = ids
    return out


def pad_source(rows: Sequence[Sequence[int]], batch: int, source_len: int, pad_id: int) -> tuple[np.ndarray, int]:
    """Id lists -> [batch, source_len] int64, right-padded; (array, how many rows were truncated).

    Fewer rows than `batch`: the rest repeat the first row (their output is dropped).
    """
    if not rows:
        raise MoscError("nothing to translate")
    if len(rows) > batch:
        raise MoscError(f"{len(rows)} sentences for a graph of batch {batch}")
    src = np.full((batch, source_len), pad_id, dtype=np.int64)
    truncated = 0
    for b in range(batch):
        ids = list(rows[b] if b < len(rows) else rows[0])
        if not ids:
            raise MoscError("empty source sentence (no tokens)")
        truncated += b < len(rows) and len(ids) > source_len
        ids = ids[:source_len]
        src[b, : len(ids)] = ids
    return src, truncated


def greedy(backend: Backend, src: np.ndarray, bos: int, eos: int) -> list[list[int]]:
    """Greedy decoding with the fixed-size KV cache: src [B, S] int64 -> ids per row (no bos/eos).

    The same loop as Subnet.translate(src, bos, eos, max_len=T): T = the cache length. A backend
    with a compiled loop runs it in one call (its bos is the contract's BOS_ID); others run
    python_greedy."""
    if backend.loop is None:
        return python_greedy(backend, src, bos, eos)
    rows = backend.loop(src, backend.cache_len, eos).tolist()
    return [r[: r.index(eos)] if eos in r else r for r in rows]


def python_greedy(backend: Backend, src: np.ndarray, bos: int, eos: int) -> list[list[int]]:
    """The reference loop, in Python: the encoder, then one decoder_step call per token."""
    cross = backend.encode([src])
    B = src.shape[0]
    caches = backend.zero_caches()
    token = np.full((B,), bos, np.int64)
    out = np.zeros((B, backend.cache_len), np.int64)
    done = np.zeros(B, bool)
    for t in range(backend.cache_len):
        logits, *caches = backend.step([token, np.array([t], np.int64), *caches, *cross])
        token = logits.argmax(-1).astype(np.int64)
        out[:, t] = token
        done |= token == eos
        if done.all():
            break
    rows = out.tolist()
    return [r[: r.index(eos)] if eos in r else r for r in rows]


def translate_ids(backend: Backend, sentences: Sequence[Sequence[int]], bos: int, eos: int, pad: int
                  ) -> tuple[list[list[int]], int]:
    """Many id lists, in chunks of the graph's batch -> (output ids per sentence, truncated count)."""
    outs, truncated = [], 0
    for i in range(0, len(sentences), backend.batch):
        chunk = sentences[i : i + backend.batch]
        src, n = pad_source(chunk, backend.batch, backend.source_len, pad)
        truncated += n
        outs.extend(greedy(backend, src, bos, eos)[: len(chunk)])
    return outs, truncated

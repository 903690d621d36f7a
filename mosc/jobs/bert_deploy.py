"""Jobs that deploy a BERT encoder with a classifier head: export, (compile: mosc.jobs.build), latency.

    is_bert_encoder(path)        whether a model folder holds a BERT encoder (by its config's kind)
    export_model(...)            `mosc export`/`mosc compile`'s export step: a BERT encoder folder or
                                 a translation subnet / checkpoint, told apart by the folder's kind
    export_bert_encoder(...)     a BERT encoder folder -> an encoder-classifier export folder
    classifier_latency(...)      one classification (batch 1) with TVM, ONNX Runtime and torch side
                                 by side, on one thread each

Compiling needs no job of its own: mosc.jobs.build.compile_export compiles any export kind.
Knows nothing of how the encoder was pre-trained or fine-tuned. Imports torch, tvm and
onnxruntime inside the functions only.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from mosc.errors import MoscError


def is_bert_encoder(path: Path | None) -> bool:
    """Whether `path` is a model folder whose config.json says it holds a BERT encoder. A folder
    without a readable config is not one (the translation loader then says what is wrong)."""
    if path is None or not (Path(path) / "config.json").is_file():
        return False
    from mosc.fileio import model_kind
    from mosc.nn.bert import BERT_ENCODER_KIND  # torch: every caller is about to export anyway

    return model_kind(path) == BERT_ENCODER_KIND


def export_bert_encoder(path: Path, out: Path, target, shapes: dict | None = None, check: bool = True) -> dict:
    """A saved BERT encoder (with a classifier head) -> classifier.onnx + export.json in `out`.

    shapes: batch / source_len (the sequence length) overrides; default: the target's [protocol]
    batch and source_len. cache_len means nothing to an encoder and is refused."""
    from mosc.nn.bert import load_bert_encoder
    from mosc.nn.bert_export import ClassifierShapes, export_classifier

    shapes = dict(shapes or {})
    if shapes.pop("cache_len", None) is not None:
        raise MoscError("--cache-len is for translation models; a BERT encoder has no decoder (use --source-len "
                        "for its sequence length)")
    p = target.protocol
    sh = ClassifierShapes(shapes.get("batch") or p.batch, shapes.get("source_len") or p.source_len)
    enc, _ = load_bert_encoder(path)
    return export_classifier(enc, out, sh, check=check, extra={"source": f"BERT encoder {path}"})


def export_model(subnet: Path | None, checkpoint: Path | None, arch_file: Path | None, out: Path, target,
                 shapes: dict | None = None, check: bool = True) -> dict:
    """Export what the options name: a BERT encoder folder (given as --subnet) as an
    encoder-classifier, anything else as a translation model (mosc.jobs.model.export)."""
    if is_bert_encoder(subnet):
        if checkpoint is not None or arch_file is not None:
            raise MoscError("--checkpoint/--arch do not go with a BERT encoder folder: it already has its arch")
        return export_bert_encoder(subnet, out, target, shapes, check)
    from mosc.jobs.model import export

    return export(subnet, checkpoint, arch_file, out, target, shapes, check)


@contextlib.contextmanager
def _threads(n: int):
    """torch and the TVM runtime on n threads for the duration (ORT takes it per session)."""
    import torch
    import tvm

    torch_before, tvm_before = torch.get_num_threads(), tvm.runtime.num_threads()
    config = tvm.get_global_func("runtime.config_threadpool")  # (affinity mode 1 = big cores, threads)
    torch.set_num_threads(n)
    config(1, n)
    try:
        yield
    finally:
        torch.set_num_threads(torch_before)
        config(1, tvm_before)


def classifier_latency(art_dir: Path, export_dir: Path, encoder, *, runs: int = 50, warmup: int = 5,
                       threads: int = 1) -> dict:
    """Median latency of one classification with TVM (the artifact, here), ONNX Runtime (the export)
    and torch eager (the encoder), interleaved rounds on `threads` threads each.

    The three must be the same model: the artifact's manifest must name the export's ONNX
    sha256s, and the export's arch the encoder's. The shapes are the export's (batch 1 is what
    "one classification" means; other batches are refused)."""
    from mosc.compiler.artifact import load_artifact, read_manifest
    from mosc.contract import CLASSIFIER, ENCODER_CLASSIFIER, load_export
    from mosc.device.backends import (HOST_CLASSIFY, TVM_CLASSIFY, ort_classify_timer, side_by_side,
                                      torch_classify_timer, tvm_classify_timer)

    meta = load_export(export_dir, ENCODER_CLASSIFIER)
    manifest = read_manifest(art_dir)
    if (manifest.get("model") or {}).get("onnx_sha256") != meta["files"]:
        raise MoscError(f"{art_dir} was not compiled from {export_dir} (its ONNX sha256s differ)")
    if meta["arch_hash"] != encoder.arch.hash:
        raise MoscError(f"{export_dir} holds arch {meta['arch_hash']}, the encoder is arch {encoder.arch.hash}")
    B, T = meta["graphs"][CLASSIFIER]["inputs"][0]["shape"]
    if B != 1:
        raise MoscError(f"{export_dir} was exported for batch {B}; one classification is batch 1 (export with --batch 1)")
    with _threads(threads):
        art = load_artifact(art_dir, manifest.get("device", "cpu"))  # each .so's sha256 checked first
        timers = {"tvm": tvm_classify_timer(art), "ort": ort_classify_timer(export_dir, threads),
                  "torch": torch_classify_timer(encoder, B, T)}
        stats = side_by_side(timers, runs, warmup)
    return {"shapes": {"batch": B, "seq_len": T}, "threads": threads, "arch_hash": meta["arch_hash"],
            "target": manifest["target"], "latency": stats,
            "method": {"tvm": TVM_CLASSIFY, "ort": f"onnxruntime CPU, {HOST_CLASSIFY}",
                       "torch": f"torch eager no_grad, {HOST_CLASSIFY}"}}

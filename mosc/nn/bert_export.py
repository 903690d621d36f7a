"""A BertEncoder with a classifier head -> one static ONNX graph + export.json, checked against PyTorch.

    export_classifier(enc, out_dir, shapes)   classifier.onnx + export.json (kind encoder-classifier)
    check_classifier_parity(enc, out_dir)     max |torch - onnxruntime| of the logits, argmax agreement
    ClassifierShapes                          batch B and sequence length T, fixed at export

The graph is `BertEncoder.classify`: tokens [B, T] int64 (pad id 0 masked out of attention,
<s> = [CLS] at position 0) -> class logits [B, C] fp32, the contract's `encoder-classifier`
kind (mosc.contract: CLASSIFIER, CLS_INPUTS, CLS_OUTPUTS, CLASSIFIER_EXPORT_FORMAT). The
ONNX export itself, its graph clean-up, export.json's seal and the write-then-check order
are mosc.nn.export's (export_graph, write_export), shared with the translation graphs.

Torch world: imports torch at module level; knows nothing of TVM, devices, or how the
encoder was trained (a classifier head from fine-tuning or a fresh `with_classifier` one
export alike).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from mosc.contract import (BOS_ID, CLASSIFIER, CLASSIFIER_EXPORT_FORMAT, CLS_INPUTS, CLS_OUTPUTS, ENCODER_CLASSIFIER,
                           load_export)
from mosc.errors import MoscError
from mosc.nn.bert import BertEncoder, count_parameters
from mosc.nn.export import ATOL, export_graph, exporter_info, fresh_export_dir, max_abs_diff, write_export
from mosc.runtime import ort_classifier

FIRST_ID = 4  # ids below are special (pad, <s>, </s>, unk): example tokens avoid them


@dataclass(frozen=True)
class ClassifierShapes:
    batch: int = 1
    seq_len: int = 30  # T: tokens per row, <s> included, right-padded with id 0

    def __post_init__(self):
        for k, v in asdict(self).items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise MoscError(f"export shape {k} must be a positive integer, got {v!r}")


class _Classify(torch.nn.Module):
    def __init__(self, enc: BertEncoder):
        super().__init__()
        self.enc = enc

    def forward(self, tokens):
        return self.enc.classify(tokens)


def example_tokens(enc: BertEncoder, shapes: ClassifierShapes, seed: int = 0) -> torch.Tensor:
    """tokens [B, T]: <s> first, random ids after it, the last row right-padded from the middle on
    (a graph traced on such input must mask padding, and the parity check sees it)."""
    g = torch.Generator().manual_seed(seed)
    B, T = shapes.batch, shapes.seq_len
    tokens = torch.randint(FIRST_ID, enc.cfg.vocab_size, (B, T), generator=g)
    tokens[:, 0] = BOS_ID
    if T > 2:
        tokens[-1, T // 2 + 1:] = enc.cfg.pad_id
    return tokens


def _check_encoder(enc: BertEncoder, shapes: ClassifierShapes) -> None:
    if enc.classifier is None:
        raise MoscError("this BERT encoder has no classifier head (n_classes = 0): fine-tune it for a task first, "
                        "or give it a head with BertEncoder.with_classifier(n_classes)")
    if enc.cfg.pad_id != 0:
        raise MoscError(f"the encoder pads with id {enc.cfg.pad_id}; the deploy contract pads with 0")
    if shapes.seq_len > enc.cfg.max_positions:
        raise MoscError(f"sequence length {shapes.seq_len} exceeds the encoder's {enc.cfg.max_positions} positions")


def export_classifier(
    enc: BertEncoder,
    out_dir: str | Path,
    shapes: ClassifierShapes = ClassifierShapes(),
    *,
    check: bool = True,
    atol: float = ATOL,
    seed: int = 0,
    extra: dict | None = None,
) -> dict:
    """Write classifier.onnx and export.json into out_dir; return export.json's dict.

    check=True compares onnxruntime with PyTorch on fresh random tokens (MoscError above atol);
    the numbers go into export.json["parity"]."""
    enc = enc.eval()
    _check_encoder(enc, shapes)
    out_dir = fresh_export_dir(out_dir)
    t0 = time.perf_counter()
    tokens = example_tokens(enc, shapes, seed)
    with torch.no_grad():
        ref = enc.classify(tokens)
    entry, sha = export_graph(CLASSIFIER, _Classify(enc), (tokens,), CLS_INPUTS, CLS_OUTPUTS, (ref,), out_dir)
    cfg = enc.cfg
    meta = {
        "format": CLASSIFIER_EXPORT_FORMAT,
        "kind": ENCODER_CLASSIFIER,  # for readers; the format is what check_export goes by
        "arch": cfg.arch.to_dict(),
        "arch_hash": cfg.arch.hash,
        "encoder_config": cfg.to_dict(),
        "param_count": count_parameters(enc),
        "n_classes": cfg.n_classes,
        "shapes": asdict(shapes),
        "graphs": {CLASSIFIER: entry},
        "files": {entry["file"]: sha},
        "bos_id": BOS_ID,
        "pad_id": cfg.pad_id,
        "exporter": exporter_info(),
        "export_seconds": round(time.perf_counter() - t0, 2),
        **(extra or {}),
    }
    parity = (lambda m: check_classifier_parity(enc, out_dir, m, seed=seed, atol=atol)) if check else None
    return write_export(out_dir, meta, parity)


def check_classifier_parity(enc: BertEncoder, out_dir: str | Path, meta: dict | None = None, *, seed: int = 0,
                            atol: float = ATOL) -> dict:
    """onnxruntime vs PyTorch on fresh random tokens (with a padded row): max abs diff of the
    logits and whether the predicted classes agree. MoscError when the diff exceeds atol."""
    meta = meta or load_export(out_dir, ENCODER_CLASSIFIER)
    shapes = ClassifierShapes(**meta["shapes"])
    tokens = example_tokens(enc.eval(), shapes, seed + 1)
    with torch.no_grad():
        ref = enc.classify(tokens).numpy()
    got = ort_classifier(out_dir, meta).run(tokens.numpy())
    diff = max_abs_diff(ref, got)
    if not diff <= atol:
        raise MoscError(f"onnxruntime differs from PyTorch: {CLASSIFIER} max abs diff {diff:.3e} (> {atol:g})")
    return {f"{CLASSIFIER}_max_abs_diff": diff, "atol": atol,
            "argmax_equal": bool(np.array_equal(ref.argmax(-1), got.argmax(-1))), "rows": int(ref.shape[0])}

"""Collapsed Subnet -> two static ONNX graphs + export.json, checked against PyTorch.

    export_subnet(sub, out_dir, shapes)   encoder.onnx, decoder_step.onnx, export.json
    check_parity(sub, out_dir)            max |torch - onnxruntime| per graph, greedy tokens
    load_export(out_dir)                  export.json with every file's sha256 verified (mosc.contract)
    export_graph, write_export, ...       the steps every graph kind shares (mosc.nn.bert_export uses them)

The graphs are `Subnet.encode` and `Subnet.decode_step` (see mosc/nn/subnet.py) with static
shapes: batch B, source length S, KV-cache length T (defaults: a target's [protocol],
source_len 30, decoder_steps 30, batch 1). `pos` is an int64 tensor of shape [1], and
the decoder writes its new key/value with a one-hot blend (no scatter), so the graph is
plain elementwise + matmul work that every backend fuses.

Exporter: `torch.onnx.export(..., dynamo=True)` (torch.export + onnxscript). The older
TorchScript exporter (`dynamo=False`) turns `F.pad` into a Pad with computed pads, which
TVM's ONNX frontend refuses ("Dynamic pads are not supported yet"); the dynamo graph
folds them to constants and imports cleanly (checked in tests/test_export.py). Weights
are stored inside each .onnx (external_data=False): one file per graph, one sha256.

Torch world: imports torch at module level; knows nothing of TVM or devices.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mosc.errors import MoscError
from mosc.fileio import atomic_write_json, sha256_file
from mosc.nn.subnet import Subnet
from mosc.contract import (BOS_ID, DECODER, ENC_INPUTS, ENCODER, EOS_ID, EXPORT_FORMAT, EXPORT_JSON, EXPORT_SEAL,
                           dec_inputs, dec_outputs, enc_outputs, load_export, seal)
from mosc.runtime import greedy, ort_backend

ATOL = 1e-4  # max |torch - onnxruntime| accepted (fp32; typical: ~2e-6)


@dataclass(frozen=True)
class Shapes:
    batch: int = 1
    source_len: int = 30
    cache_len: int = 30  # T: decoder steps = KV-cache slots

    def __post_init__(self):
        for k, v in asdict(self).items():
            if not isinstance(v, int) or v < 1:
                raise MoscError(f"export shape {k} must be a positive integer, got {v!r}")

    @classmethod
    def from_protocol(cls, p, batch: int | None = None, source_len: int | None = None,
                      cache_len: int | None = None) -> Shapes:
        """A target's [protocol] shapes (batch, source_len, decoder_steps), each overridable."""
        return cls(batch or p.batch, source_len or p.source_len, cache_len or p.decoder_steps)


class _Encoder(torch.nn.Module):
    def __init__(self, sub: Subnet):
        super().__init__()
        self.sub = sub

    def forward(self, src):
        return self.sub.encode(src)


class _DecoderStep(torch.nn.Module):
    def __init__(self, sub: Subnet):
        super().__init__()
        self.sub = sub

    def forward(self, token, pos, *state):
        return self.sub.decode_step(token, pos, *state)


def example_inputs(sub: Subnet, shapes: Shapes, seed: int = 0) -> tuple[torch.Tensor, tuple]:
    """(src [B, S] with padding in the last row, decoder-step inputs at a middle position)."""
    g = torch.Generator().manual_seed(seed)
    B, S, T = shapes.batch, shapes.source_len, shapes.cache_len
    V = sub.cfg.vocab_size
    src = torch.randint(4, V, (B, S), generator=g)
    if S > 2:
        src[-1, S // 2 + 1 :] = sub.cfg.pad_id
    with torch.no_grad():
        cross = sub.encode(src)
    caches = [torch.randn(B, T, sub.cfg.qkv_dim, generator=g) * 0.5 for _ in range(2 * len(sub.decoder))]
    token = torch.randint(4, V, (B,), generator=g)
    return src, (token, torch.tensor([T // 2]), *caches, *cross)


def _tensor_spec(name: str, t: torch.Tensor) -> dict:
    return {"name": name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}


def _onnx_export(module, args, path: Path, input_names, output_names) -> None:
    """torch.onnx.export (dynamo), quietly (it prints progress and warns about torchvision), then
    `_optimize` instead of the exporter's own optimizer."""
    buf = io.StringIO()
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module.eval(), args, None, input_names=list(input_names),
                                        output_names=list(output_names), dynamo=True, optimize=False, verbose=False)
            _optimize(program.model)
            program.save(str(path), external_data=False)
    except Exception as e:
        raise MoscError(f"ONNX export of {path.name} failed: {(str(e).strip().splitlines() or ['?'])[0]}") from e
    finally:
        onnx_logger.setLevel(level)


def _optimize(model) -> None:
    """The exporter's optimizer (onnxscript.optimizer.optimize_ir) without its common-subexpression
    elimination, in place.

    Why: CSE merges the masks every decoder layer computes for itself (mosc/nn/subnet.py) into
    one shared tensor; TVM then fuses a shared mask into its consumer when there is one (a
    single layer) and not when there are several, so kernels would depend on the depth. The
    rest is needed: TVM's ONNX importer reads neither Constant nodes nor unfolded shapes.
    """
    import onnx_ir.passes.common as common
    from onnxscript.optimizer import fold_constants_ir

    common.InlinePass()(model)
    for _ in range(2):
        fold_constants_ir(model)
        common.RemoveUnusedNodesPass()(model)
    for p in (common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
              common.DeduplicateInitializersPass(), common.OutputFixPass(), common.NameFixPass()):
        p(model)


def export_graph(name: str, module, args: tuple, input_names, output_names, ref, out_dir: Path) -> tuple[dict, str]:
    """Write out_dir/<name>.onnx traced on `args` -> (its export.json graph entry, its sha256).

    ref: the module's outputs on `args` (their shapes and dtypes are the graph's output
    signature). Shared by every graph kind's exporter (this module, mosc.nn.bert_export)."""
    path = out_dir / f"{name}.onnx"
    _onnx_export(module, args, path, input_names, output_names)
    entry = {
        "file": path.name,
        "inputs": [_tensor_spec(n, t) for n, t in zip(input_names, args)],
        "outputs": [_tensor_spec(n, t) for n, t in zip(output_names, ref)],
    }
    return entry, sha256_file(path)


def _export_graphs(sub: Subnet, out_dir: Path, shapes: Shapes, seed: int) -> tuple[dict, dict]:
    """Write encoder.onnx and decoder_step.onnx traced on example inputs: ({graph: io spec}, {file: sha256})."""
    src, step_args = example_inputs(sub, shapes, seed)
    with torch.no_grad():
        enc_out = sub.encode(src)
        dec_out = sub.decode_step(*step_args)
    L = len(sub.decoder)
    graphs = {
        ENCODER: (_Encoder(sub), (src,), ENC_INPUTS, enc_outputs(L), enc_out),
        DECODER: (_DecoderStep(sub), step_args, dec_inputs(L), dec_outputs(L), dec_out),
    }
    meta_graphs, files = {}, {}
    for name, (module, args, ins, outs, ref) in graphs.items():
        meta_graphs[name], sha = export_graph(name, module, args, ins, outs, ref, out_dir)
        files[meta_graphs[name]["file"]] = sha
    return meta_graphs, files


def fresh_export_dir(out_dir: str | Path) -> Path:
    """out_dir, created, with any export.json removed first: a half-rewritten folder is not an export."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / EXPORT_JSON).unlink(missing_ok=True)
    return out_dir


def exporter_info() -> dict:
    """What made the graphs (recorded in export.json)."""
    return {"torch": torch.__version__, "function": "torch.onnx.export(dynamo=True, external_data=False)"}


def write_export(out_dir: Path, meta: dict, parity: Callable[[dict], dict] | None) -> dict:
    """Seal and write export.json atomically; with `parity` (meta -> parity record, raising
    MoscError on a mismatch), check the written folder and write it again with meta["parity"].

    Written before the check (as export_subnet always did): when the check fails, the folder is
    still a loadable export without a "parity" record, which can be inspected or compiled."""
    atomic_write_json(out_dir / EXPORT_JSON, seal(meta, EXPORT_SEAL))
    if parity is not None:
        meta["parity"] = parity(meta)
        atomic_write_json(out_dir / EXPORT_JSON, seal(meta, EXPORT_SEAL))
    return meta


def export_subnet(
    sub: Subnet,
    out_dir: str | Path,
    shapes: Shapes = Shapes(),
    *,
    tokenizer_json: str | None = None,
    check: bool = True,
    atol: float = ATOL,
    seed: int = 0,
    extra: dict | None = None,
) -> dict:
    """Write encoder.onnx, decoder_step.onnx and export.json into out_dir; return export.json's dict.

    check=True compares onnxruntime with PyTorch on random inputs (MoscError above atol)
    and greedy-decodes one batch with both; the numbers go into export.json["parity"].
    """
    sub = sub.eval()
    out_dir = fresh_export_dir(out_dir)
    if shapes.cache_len > sub.cfg.max_positions or shapes.source_len > sub.cfg.max_positions:
        raise MoscError(f"shapes {shapes} exceed the model's {sub.cfg.max_positions} positions")
    t0 = time.perf_counter()
    meta_graphs, files = _export_graphs(sub, out_dir, shapes, seed)
    cfg = sub.cfg
    meta = {
        "format": EXPORT_FORMAT,
        "arch": cfg.arch.to_dict(),
        "arch_hash": cfg.arch.hash,
        "subnet_config": cfg.to_dict(),
        "param_count": sum(p.numel() for p in sub.parameters()),
        "shapes": asdict(shapes),
        "graphs": meta_graphs,
        "files": files,
        "bos_id": BOS_ID,
        "eos_id": EOS_ID,
        "pad_id": cfg.pad_id,
        "tokenizer": tokenizer_json,
        "exporter": exporter_info(),
        "export_seconds": round(time.perf_counter() - t0, 2),
        **(extra or {}),
    }
    return write_export(out_dir, meta, (lambda m: check_parity(sub, out_dir, m, seed=seed, atol=atol)) if check else None)


def max_abs_diff(ref: np.ndarray, got: np.ndarray) -> float:
    """max |ref - got|, with equal infinities (the -inf attention bias) counting as 0."""
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    if ref.shape != got.shape:
        return float("inf")
    with np.errstate(invalid="ignore"):  # inf - inf
        d = np.abs(ref - got)
    d[ref == got] = 0.0  # -inf == -inf
    return float(np.nan_to_num(d, nan=np.inf).max()) if d.size else 0.0


def check_parity(sub: Subnet, out_dir: str | Path, meta: dict | None = None, *, seed: int = 0,
                 atol: float = ATOL) -> dict:
    """onnxruntime vs PyTorch on fresh random inputs: per-graph max abs diff, greedy tokens.

    Decoder steps are checked at the first, a middle and the last cache slot. Raises
    MoscError when a diff exceeds atol.
    """
    meta = meta or load_export(out_dir)
    shapes = Shapes(**meta["shapes"])
    ort = ort_backend(out_dir, meta)
    src, step_args = example_inputs(sub, shapes, seed + 1)
    diffs = {}
    with torch.no_grad():
        ref = sub.encode(src)
        got = ort.encode([src.numpy()])
        diffs[ENCODER] = max(max_abs_diff(r.numpy(), g) for r, g in zip(ref, got))
        worst = 0.0
        n_caches = 2 * len(sub.decoder)
        for pos in sorted({0, shapes.cache_len // 2, shapes.cache_len - 1}):
            args = (step_args[0], torch.tensor([pos]), *step_args[2 : 2 + n_caches], *ref)
            r_out = sub.decode_step(*args)
            g_out = ort.step([a.numpy() for a in args])
            worst = max(worst, *(max_abs_diff(r.numpy(), g) for r, g in zip(r_out, g_out)))
        diffs[DECODER] = worst
        torch_ids = sub.translate(src, BOS_ID, EOS_ID, max_len=shapes.cache_len)
    ort_ids = greedy(ort, src.numpy(), BOS_ID, EOS_ID)
    result = {f"{g}_max_abs_diff": d for g, d in diffs.items()}
    result.update({"atol": atol, "greedy_tokens_equal": ort_ids == torch_ids, "greedy_rows": len(torch_ids)})
    bad = {g: d for g, d in diffs.items() if not d <= atol}
    if bad:
        raise MoscError("onnxruntime differs from PyTorch: " +
                        ", ".join(f"{g} max abs diff {d:.3e}" for g, d in bad.items()) + f" (> {atol:g})")
    return result

"""The deploy contract: what torch export writes and the compiler and devices read.

The graph names, their input and output names, the special token ids and the export
folder's metadata file are fixed here once; `mosc.nn.export` writes graphs that obey it,
`mosc.compiler` compiles them, `mosc.runtime` and `mosc.device` run them. This module knows
nothing of torch, TVM or how the graphs are made.
"""

from __future__ import annotations

from pathlib import Path

from mosc.errors import MoscError
from mosc.fileio import read_json, verify_files

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3  # fixed: the model relies on pad_id == 0
ENCODER, DECODER = "encoder", "decoder_step"
ENC_INPUTS = ["src"]
ENC_OUTPUTS = ["cross_k", "cross_v", "cross_bias"]
DEC_INPUTS = ["token", "pos", "self_k", "self_v", "cross_k", "cross_v", "cross_bias"]
DEC_OUTPUTS = ["logits", "new_self_k", "new_self_v"]  # ONNX outputs cannot reuse input names
EXPORT_JSON = "export.json"  # written by mosc.nn.export next to the .onnx files
EXPORT_FORMAT = "mosc-export/1"


def load_export(out_dir: str | Path) -> dict:
    """export.json of an export folder, after checking every ONNX file against its sha256."""
    out_dir = Path(out_dir)
    path = out_dir / EXPORT_JSON
    if not path.is_file():
        raise MoscError(f"{out_dir} is not an export folder (no {EXPORT_JSON}; make one with `mosc export`)")
    meta = read_json(path, "export metadata")
    if meta.get("format") != EXPORT_FORMAT:
        raise MoscError(f"{path}: format {meta.get('format')!r}, expected {EXPORT_FORMAT!r}")
    verify_files(out_dir, meta["files"], EXPORT_JSON)
    return meta


def onnx_files(out_dir: str | Path, meta: dict | None = None) -> dict[str, Path]:
    """graph name -> ONNX path, in the order compile_artifact should build them."""
    meta = meta or load_export(out_dir)
    return {g: Path(out_dir) / meta["graphs"][g]["file"] for g in (ENCODER, DECODER)}

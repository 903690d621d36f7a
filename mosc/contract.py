"""The deploy contract: what torch export writes and the compiler and devices read.

The graph names, their input and output names, the special token ids and the export
folder's metadata file are fixed here once; `mosc.nn.export` writes graphs that obey it,
`mosc.compiler` compiles them, `mosc.runtime` and `mosc.device` run them. The structure of
a folder record (a graph's file and tensor signature, the `files` sha256 table, the seal
over the whole record) is checked here too, for export.json and the artifact manifest
alike. This module knows nothing of torch, TVM or how the graphs are made.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from mosc.errors import MoscError
from mosc.fileio import field, read_json, verify_files

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3  # fixed: the model relies on pad_id == 0
ENCODER, DECODER = "encoder", "decoder_step"
ENC_INPUTS = ["src"]
ENC_OUTPUTS = ["cross_k", "cross_v", "cross_bias"]
DEC_INPUTS = ["token", "pos", "self_k", "self_v", "cross_k", "cross_v", "cross_bias"]
DEC_OUTPUTS = ["logits", "new_self_k", "new_self_v"]  # ONNX outputs cannot reuse input names
EXPORT_JSON = "export.json"  # written by mosc.nn.export next to the .onnx files
EXPORT_FORMAT = "mosc-export/1"
EXPORT_SEAL = "export_sha256"  # sha256 of export.json's canonical JSON without this key

GRAPH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")  # a graph name is also its file's stem
SHA256 = re.compile(r"[0-9a-f]{64}\Z")


# ---- seal: a sha256 over a whole record, so no field can be edited unnoticed ----------------
def canonical_sha256(doc: dict, without: str) -> str:
    """sha256 of `doc` as canonical JSON (sorted keys, no spaces), leaving out the key `without`."""
    body = {k: v for k, v in doc.items() if k != without}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def seal(doc: dict, key: str) -> dict:
    """`doc` as it reads back from JSON, with `key` = its canonical sha256 (what check_seal verifies)."""
    doc = json.loads(json.dumps(doc, allow_nan=False))  # tuples -> lists: hash what a reader will see
    doc[key] = canonical_sha256(doc, key)
    return doc


def check_seal(doc: dict, key: str, where: str, redo: str) -> None:
    """MoscError when the record has no seal `key` (an older writer) or its content changed since."""
    if key not in doc:
        raise MoscError(f"{where} has no {key} (written by an older mosc, or not by mosc): {redo}")
    if doc[key] != canonical_sha256(doc, key):
        raise MoscError(f"{where} was edited after it was written ({key} does not match its content): {redo}")


# ---- structure of a folder record: graphs, their tensors, their files' sha256s --------------
def check_tensor(spec, where: str) -> None:
    """{name, shape, dtype}: a non-empty name, a list of positive int dims, a dtype name."""
    if not isinstance(spec, dict):
        raise MoscError(f"{where} must be an object with name, shape and dtype")
    if not field(spec, "name", str, where):
        raise MoscError(f"{where}: 'name' is empty")
    shape = field(spec, "shape", list, where)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise MoscError(f"{where}: 'shape' must be a list of positive integers, got {shape!r}")
    if not field(spec, "dtype", str, where):
        raise MoscError(f"{where}: 'dtype' is empty")


def check_files(doc: dict, where: str) -> dict[str, str]:
    """doc["files"]: plain file name -> sha256 hex."""
    files = field(doc, "files", dict, where)
    for name, digest in files.items():
        if Path(name).name != name or name in ("", ".", ".."):
            raise MoscError(f"{where}: 'files' names {name!r}, which is not a plain file name")
        if not isinstance(digest, str) or not SHA256.match(digest):
            raise MoscError(f"{where}: 'files' has {digest!r} for {name}, not a sha256 (64 hex digits)")
    return files


def check_graphs(doc: dict, where: str, suffix: str) -> dict[str, dict]:
    """doc["graphs"]: name -> {file: "<name><suffix>", inputs: [...], outputs: [...]}, each file
    listed in doc["files"] and every listed file a graph's. Naming a file by its graph makes
    two swapped files fail their sha256s."""
    graphs = field(doc, "graphs", dict, where)
    files = check_files(doc, where)
    if not graphs:
        raise MoscError(f"{where}: 'graphs' is empty")
    for name, g in graphs.items():
        gw = f"{where}: graph {name!r}"
        if not GRAPH_NAME.match(name):
            raise MoscError(f"{gw}: a graph name must match {GRAPH_NAME.pattern[:-2]}")
        if not isinstance(g, dict):
            raise MoscError(f"{gw} must be an object with file, inputs and outputs")
        if field(g, "file", str, gw) != name + suffix:
            raise MoscError(f"{gw}: 'file' is {g['file']!r}, expected {name + suffix!r}")
        if g["file"] not in files:
            raise MoscError(f"{gw}: its file {g['file']} has no sha256 in 'files'")
        for key in ("inputs", "outputs"):
            specs = field(g, key, list, gw)
            if not specs:
                raise MoscError(f"{gw}: '{key}' is empty")
            for i, s in enumerate(specs):
                check_tensor(s, f"{gw} {key}[{i}]")
    stray = sorted(set(files) - {g["file"] for g in graphs.values()})
    if stray:
        raise MoscError(f"{where}: 'files' lists {', '.join(stray)}, which no graph uses")
    return graphs


def check_translation_graphs(graphs: dict, where: str) -> None:
    """The two graphs of a translation model with the contract's input and output names, a
    [B, S] source and equal [L, B, T, Q] self-attention caches (what the greedy loop relies on)."""
    missing = sorted({ENCODER, DECODER} - set(graphs))
    if missing:
        raise MoscError(f"{where}: lacks graph(s) {', '.join(missing)}: not a translation model")
    for g, ins, outs in ((ENCODER, ENC_INPUTS, ENC_OUTPUTS), (DECODER, DEC_INPUTS, DEC_OUTPUTS)):
        for key, want in (("inputs", ins), ("outputs", outs)):
            got = [s["name"] for s in graphs[g][key]]
            if got != want:
                raise MoscError(f"{where}: graph {g!r} has {key} {got}, the contract says {want}")
    src = graphs[ENCODER]["inputs"][0]["shape"]
    dec = {s["name"]: s["shape"] for s in graphs[DECODER]["inputs"]}
    if len(src) != 2 or len(dec["self_k"]) != 4 or dec["self_k"] != dec["self_v"] or dec["token"] != src[:1]:
        raise MoscError(f"{where}: inconsistent shapes: src {src}, token {dec['token']}, self_k {dec['self_k']}, "
                        f"self_v {dec['self_v']} (expected [B, S], [B] and two equal [L, B, T, Q])")


# ---- export.json ------------------------------------------------------------------------------
def check_export(meta: dict, where: str) -> dict:
    """The structure of export.json: format, arch hash, shapes, the two graphs and their files."""
    if field(meta, "format", str, where) != EXPORT_FORMAT:
        raise MoscError(f"{where}: format {meta['format']!r}, expected {EXPORT_FORMAT!r}")
    field(meta, "arch_hash", str, where)
    shapes = field(meta, "shapes", dict, where)
    for k in ("batch", "source_len", "cache_len"):
        if field(shapes, k, int, f"{where} shapes") < 1:
            raise MoscError(f"{where}: shapes {k} must be >= 1, got {shapes[k]}")
    graphs = check_graphs(meta, where, ".onnx")
    check_translation_graphs(graphs, where)
    src, cache = graphs[ENCODER]["inputs"][0]["shape"], graphs[DECODER]["inputs"][2]["shape"]
    if src != [shapes["batch"], shapes["source_len"]] or cache[1:3] != [shapes["batch"], shapes["cache_len"]]:
        raise MoscError(f"{where}: graph shapes (src {src}, self_k {cache}) disagree with shapes {shapes}")
    return meta


def load_export(out_dir: str | Path) -> dict:
    """export.json of an export folder, structure and seal checked (the whole record), after
    checking every ONNX file against its sha256."""
    out_dir = Path(out_dir)
    path = out_dir / EXPORT_JSON
    if not path.is_file():
        raise MoscError(f"{out_dir} is not an export folder (no {EXPORT_JSON}; make one with `mosc export`)")
    meta = read_json(path, "export metadata")
    check_export(meta, str(path))
    check_seal(meta, EXPORT_SEAL, str(path), "export the model again (mosc export)")
    verify_files(out_dir, meta["files"], EXPORT_JSON)
    return meta


def onnx_files(out_dir: str | Path, meta: dict | None = None) -> dict[str, Path]:
    """graph name -> ONNX path, in the order compile_artifact should build them."""
    meta = meta or load_export(out_dir)
    return {g: Path(out_dir) / meta["graphs"][g]["file"] for g in (ENCODER, DECODER)}

"""The deploy contract: what torch export writes and the compiler and devices read.

The graph names, their input and output names, the special token ids and the export
folder's metadata file are fixed here once, for each graph kind (protocol) a folder may hold:
`translation` (encoder + decoder_step, run by a greedy loop) and `encoder-classifier` (one
graph, tokens -> class logits, run once); `mosc.nn.export` writes graphs that obey it,
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
# Every decoder layer i has its own tensors (no stacked [L, ...] cache): each TIR workload then
# depends on that layer's choices only, never on the depth or the layer's position, so the
# workloads of a whole search space are few and can be tuned once (mosc tune --space).
ENC_INPUTS = ["src"]


def enc_outputs(layers: int) -> list[str]:
    """Per decoder layer i: cross_k_i, cross_v_i [B, k_i*S, Q], cross_bias_i [B, 1, 1, k_i*S]."""
    return [f"{n}_{i}" for i in range(layers) for n in ("cross_k", "cross_v", "cross_bias")]


def cache_names(layers: int) -> list[str]:
    """The self-attention caches, per decoder layer i: self_k_i, self_v_i [B, T, Q]."""
    return [f"{n}_{i}" for i in range(layers) for n in ("self_k", "self_v")]


def dec_inputs(layers: int) -> list[str]:
    """token [B], pos [1], the caches, then the encoder's outputs as they come."""
    return ["token", "pos", *cache_names(layers), *enc_outputs(layers)]


def dec_outputs(layers: int) -> list[str]:
    """logits [B, V], then the caches with slot pos written (ONNX outputs cannot reuse input names)."""
    return ["logits", *(f"new_{n}" for n in cache_names(layers))]


# The compiled greedy loop (mosc.compiler.loop), a function of every translation artifact: src [B, S],
# steps [1] (at most T), eos [1] (-1: never stop early, exactly `steps` steps) -> tokens [B, T] int64
# (PAD_ID after the last step). Not an ONNX graph: the compiler writes it around the two that are.
TRANSLATE = "translate"
TRANSLATE_INPUTS, TRANSLATE_OUTPUTS = ["src", "steps", "eos"], ["tokens"]

EXPORT_JSON = "export.json"  # written by mosc.nn.export next to the .onnx files
EXPORT_FORMAT = "mosc-export/2"  # /2: per-layer tensors (/1 stacked them)

# ---- graph kinds: what a folder's graphs compute, so compiler and runtime know what they hold ----
TRANSLATION = "translation"  # encoder + decoder_step with a fixed-size KV cache (EXPORT_FORMAT)
ENCODER_CLASSIFIER = "encoder-classifier"  # classifier(tokens [B, T] int64) -> logits [B, C] fp32
CLASSIFIER = "classifier"  # the one graph of an encoder-classifier
CLS_INPUTS, CLS_OUTPUTS = ["tokens"], ["logits"]  # pad id 0 is masked out; position 0 holds <s> ([CLS])
CLASSIFIER_EXPORT_FORMAT = "mosc-export-encoder-classifier/1"
EXPORT_KINDS = {EXPORT_FORMAT: TRANSLATION, CLASSIFIER_EXPORT_FORMAT: ENCODER_CLASSIFIER}  # export.json format -> kind
# The graphs of each kind, in the order compile_artifact builds them. A kind is told by its graph
# names (graph_kind): an artifact needs no extra field, and older artifacts keep working.
KIND_GRAPHS = {TRANSLATION: (ENCODER, DECODER), ENCODER_CLASSIFIER: (CLASSIFIER,)}
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


def check_graphs(doc: dict, where: str, suffix: str, *, library: str | None = None) -> dict[str, dict]:
    """doc["graphs"]: name -> {file: "<name><suffix>", inputs: [...], outputs: [...]}, each file
    listed in doc["files"] and every listed file a graph's. Naming a file by its graph makes
    two swapped files fail their sha256s. library: every graph is instead the function of that
    name in this one file ({file: library, function: name, ...}: an artifact's library)."""
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
        want = library or name + suffix
        if field(g, "file", str, gw) != want:
            raise MoscError(f"{gw}: 'file' is {g['file']!r}, expected {want!r}")
        if library and field(g, "function", str, gw) != name:
            raise MoscError(f"{gw}: 'function' is {g['function']!r}, expected {name!r}")
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


def decoder_layers(graphs: dict) -> int:
    """L, the number of decoder layers, from the encoder's outputs (three per layer)."""
    return len(graphs[ENCODER]["outputs"]) // 3


def cache_shape(graphs: dict) -> list[int]:
    """[B, T, Q]: the shape of every self-attention cache tensor."""
    return next(s["shape"] for s in graphs[DECODER]["inputs"] if s["name"] == "self_k_0")


def check_translation_graphs(graphs: dict, where: str) -> None:
    """The two graphs of a translation model with the contract's input and output names, a
    [B, S] source and equal [B, T, Q] self-attention caches (what the greedy loop relies on)."""
    missing = sorted({ENCODER, DECODER} - set(graphs))
    if missing:
        raise MoscError(f"{where}: lacks graph(s) {', '.join(missing)}: not a translation model")
    n_out = len(graphs[ENCODER]["outputs"])
    if n_out < 3 or n_out % 3:
        raise MoscError(f"{where}: the encoder has {n_out} outputs; the contract says three per decoder layer")
    L = n_out // 3
    want = {ENCODER: (ENC_INPUTS, enc_outputs(L)), DECODER: (dec_inputs(L), dec_outputs(L))}
    for g, (ins, outs) in want.items():
        for key, names in (("inputs", ins), ("outputs", outs)):
            got = [s["name"] for s in graphs[g][key]]
            if got != names:
                raise MoscError(f"{where}: graph {g!r} has {key} {_short(got)}, the contract says {_short(names)}")
    src = graphs[ENCODER]["inputs"][0]["shape"]
    dec = {s["name"]: s["shape"] for s in graphs[DECODER]["inputs"]}
    caches = [dec[n] for n in cache_names(L)]
    if len(src) != 2 or len(caches[0]) != 3 or any(c != caches[0] for c in caches) or dec["token"] != src[:1] \
            or caches[0][0] != src[0]:
        raise MoscError(f"{where}: inconsistent shapes: src {src}, token {dec['token']}, self_k_0 {caches[0]} "
                        f"(expected [B, S], [B] and equal [B, T, Q] caches)")


def check_translate_graph(graphs: dict, where: str) -> None:
    """An artifact's compiled greedy loop: the translate function with the contract's signature
    for its encoder and caches (src [B, S], steps [1], eos [1] -> tokens [B, T])."""
    if TRANSLATE not in graphs:
        raise MoscError(f"{where}: has no {TRANSLATE!r} function (the compiled decode loop): recompile it")
    B, S = graphs[ENCODER]["inputs"][0]["shape"]
    T = cache_shape(graphs)[1]
    want = {"inputs": [(TRANSLATE_INPUTS[0], [B, S]), (TRANSLATE_INPUTS[1], [1]), (TRANSLATE_INPUTS[2], [1])],
            "outputs": [(TRANSLATE_OUTPUTS[0], [B, T])]}
    for key, specs in want.items():
        got = [(s["name"], s["shape"]) for s in graphs[TRANSLATE][key]]
        if got != specs or any(s["dtype"] != "int64" for s in graphs[TRANSLATE][key]):
            raise MoscError(f"{where}: {TRANSLATE!r} has {key} {got}, the contract says int64 {specs}")


def check_classifier_graphs(graphs: dict, where: str) -> None:
    """The one graph of an encoder-classifier: tokens [B, T] int64 -> logits [B, C] float32."""
    if set(graphs) != {CLASSIFIER}:
        raise MoscError(f"{where}: has graph(s) {sorted(graphs)}; an {ENCODER_CLASSIFIER} has only {CLASSIFIER!r}")
    g = graphs[CLASSIFIER]
    for key, names in (("inputs", CLS_INPUTS), ("outputs", CLS_OUTPUTS)):
        got = [s["name"] for s in g[key]]
        if got != names:
            raise MoscError(f"{where}: graph {CLASSIFIER!r} has {key} {_short(got)}, the contract says {names}")
    tok, out = g["inputs"][0], g["outputs"][0]
    if len(tok["shape"]) != 2 or tok["dtype"] != "int64" or len(out["shape"]) != 2 or out["dtype"] != "float32" \
            or out["shape"][0] != tok["shape"][0]:
        raise MoscError(f"{where}: inconsistent signature: tokens {tok['dtype']}{tok['shape']}, logits "
                        f"{out['dtype']}{out['shape']} (expected int64 [B, T] and float32 [B, C])")


def graph_kind(graphs: dict, where: str) -> str:
    """The kind of a record's graphs (export.json or an artifact manifest), their contract checked."""
    if CLASSIFIER in graphs:
        check_classifier_graphs(graphs, where)
        return ENCODER_CLASSIFIER
    check_translation_graphs(graphs, where)
    return TRANSLATION


def require_kind(graphs: dict, kind: str, where: str) -> None:
    """MoscError (one line) when a record's graphs are not of `kind` (e.g. a classifier handed to
    the translation loop)."""
    have = graph_kind(graphs, where)
    if have != kind:
        raise MoscError(f"{where} holds a model of kind {have!r}, not {kind!r}")


def _short(names: list[str], keep: int = 8) -> str:
    return str(names) if len(names) <= keep else str(names[:keep])[:-1] + f", ... ({len(names)} in all)]"


# ---- export.json ------------------------------------------------------------------------------
def export_kind(meta: dict) -> str:
    """The graph kind of a checked export.json (from its format)."""
    return EXPORT_KINDS[meta["format"]]


# export.json "shapes" keys per kind
EXPORT_SHAPES = {TRANSLATION: ("batch", "source_len", "cache_len"), ENCODER_CLASSIFIER: ("batch", "seq_len")}


def check_export(meta: dict, where: str) -> dict:
    """The structure of export.json: format (which says the kind), arch hash, shapes, the graphs
    of that kind and their files."""
    fmt = field(meta, "format", str, where)
    if fmt not in EXPORT_KINDS:
        raise MoscError(f"{where}: format {fmt!r}, expected one of {', '.join(map(repr, EXPORT_KINDS))}")
    kind = EXPORT_KINDS[fmt]
    field(meta, "arch_hash", str, where)
    shapes = field(meta, "shapes", dict, where)
    for k in EXPORT_SHAPES[kind]:
        if field(shapes, k, int, f"{where} shapes") < 1:
            raise MoscError(f"{where}: shapes {k} must be >= 1, got {shapes[k]}")
    graphs = check_graphs(meta, where, ".onnx")
    if kind == ENCODER_CLASSIFIER:
        check_classifier_graphs(graphs, where)
        tokens = graphs[CLASSIFIER]["inputs"][0]["shape"]
        if tokens != [shapes["batch"], shapes["seq_len"]]:
            raise MoscError(f"{where}: graph shape (tokens {tokens}) disagrees with shapes {shapes}")
        return meta
    check_translation_graphs(graphs, where)
    src, cache = graphs[ENCODER]["inputs"][0]["shape"], cache_shape(graphs)
    if src != [shapes["batch"], shapes["source_len"]] or cache[:2] != [shapes["batch"], shapes["cache_len"]]:
        raise MoscError(f"{where}: graph shapes (src {src}, self_k_0 {cache}) disagree with shapes {shapes}")
    return meta


def load_export(out_dir: str | Path, kind: str | None = None) -> dict:
    """export.json of an export folder, structure and seal checked (the whole record), after
    checking every ONNX file against its sha256. kind: refuse an export of another graph kind."""
    out_dir = Path(out_dir)
    path = out_dir / EXPORT_JSON
    if not path.is_file():
        raise MoscError(f"{out_dir} is not an export folder (no {EXPORT_JSON}; make one with `mosc export`)")
    meta = read_json(path, "export metadata")
    check_export(meta, str(path))
    check_seal(meta, EXPORT_SEAL, str(path), "export the model again (mosc export)")
    if kind is not None and export_kind(meta) != kind:
        raise MoscError(f"{out_dir} holds an export of kind {export_kind(meta)!r}, not {kind!r}")
    verify_files(out_dir, meta["files"], EXPORT_JSON)
    return meta


def onnx_files(out_dir: str | Path, meta: dict | None = None) -> dict[str, Path]:
    """graph name -> ONNX path, in the order compile_artifact should build them."""
    meta = meta or load_export(out_dir)
    return {g: Path(out_dir) / meta["graphs"][g]["file"] for g in KIND_GRAPHS[export_kind(meta)]}

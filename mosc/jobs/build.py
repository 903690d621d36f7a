"""Jobs of the compiler world: compile an export folder into an artifact whose manifest
says which model it holds.

The manifest's "model" section is written here and only here (`model_manifest`), so
`mosc compile`, the pipeline and the artifact cache record the same keys: the graph kind
(translation or encoder-classifier, mosc.contract), arch, shapes, special token ids,
parameter count, ORT parity, tokenizer (translation) or class count (classifier) and the
ONNX files' sha256s. Every kind compiles through the same compile_artifact path: the
export's graphs, whatever they are, in the order the contract gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

Log = Callable[[str], None]

MODEL_KEYS = ("arch", "arch_hash", "shapes", "bos_id", "eos_id", "pad_id", "param_count", "parity", "tokenizer")
CLASSIFIER_MODEL_KEYS = ("arch", "arch_hash", "shapes", "bos_id", "pad_id", "n_classes", "param_count", "parity")


def model_manifest(export_meta: dict, source: str | None = None) -> dict:
    """The artifact manifest's "model" section, from an export folder's (checked) export.json."""
    from mosc.contract import ENCODER_CLASSIFIER, export_kind

    kind = export_kind(export_meta)
    keys = CLASSIFIER_MODEL_KEYS if kind == ENCODER_CLASSIFIER else MODEL_KEYS
    model = {"kind": kind, **{k: export_meta.get(k) for k in keys}}
    model["onnx_sha256"] = export_meta["files"]
    if source is not None:
        model["source"] = source
    return model


@dataclass
class Compiled:
    path: Path
    manifest: dict

    @property
    def report(self) -> dict | None:
        """The tuning report (tasks, cached, tuned, untried, untunable, trials, seconds), or None."""
        return self.manifest["tuning"]["report"]


def compile_export(onnx_dir: Path, target, out: Path, *, trials: int | None = None, tune: bool = True,
                   tune_db: Path | None = None, source: str | None = None, progress: bool | None = None,
                   log: Log = lambda m: None) -> Compiled:
    """Compile the graphs of an export folder (any kind) for a Target into the artifact folder `out`.

    tune: run up to `trials` MetaSchedule trials for tasks the tuning database lacks; without
    it the build still applies what the database holds. tune_db: None = the target's default."""
    from mosc.compiler.artifact import read_manifest
    from mosc.compiler.build import compile_artifact
    from mosc.compiler.tune import DEFAULT_TRIALS, default_db_dir
    from mosc.contract import export_kind, load_export, onnx_files

    meta = load_export(onnx_dir)
    trials = DEFAULT_TRIALS if trials is None else trials
    tune = tune and trials > 0
    db_dir = tune_db or default_db_dir(target)
    log(f"compiling {export_kind(meta)} arch {meta['arch_hash']} for {target.name} ({f'up to {trials} trials' if tune else 'no tuning'}; "
        f"database {db_dir})")
    compile_artifact(onnx_files(onnx_dir, meta), target, out, trials=trials, tune=tune, db_dir=db_dir,
                     extra_manifest={"model": model_manifest(meta, source)}, progress=progress)
    return Compiled(Path(out), read_manifest(out))

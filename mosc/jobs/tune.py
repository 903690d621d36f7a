"""Job: tune a whole search space once per target (`mosc tune --space`), and report its coverage.

    load_tune_space   the space to tune: a checkpoint's own, else one by name (either kind)
    space_workloads   the space's workloads for a model shape: read from the database folder, or
                      enumerated from a covering set of archs (exported here) and saved there
    tune_space        space_workloads + mosc.compiler.tune.tune_space
    space_status      coverage: workloads with a record / total, trials spent, best time each

Two kinds of space, told apart by type where they differ (model key, file name, what is
exported): a translation space (SearchSpace: encoder.onnx once + decoder_step.onnx once per
step) and an encoder-only one (BertSpace: classifier.onnx, an encoder with a classifier head,
once per inference).

The workloads depend on the space's per-layer choices and on the model's shape (vocabulary,
q/k/v size or width, position table, classes, the protocol's batch and lengths), not on weight
values: the covering archs are exported from plain randomly initialised Subnets/BertEncoders,
with no supernet. Knows nothing of how a build applies the records. Imports torch only when
it has to export.
"""

from __future__ import annotations

import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mosc.bert_space import BERT_TABLE, BertSpace
from mosc.compiler.targets import Target
from mosc.compiler.workloads import SpaceFile
from mosc.errors import MoscError
from mosc.space import SearchSpace

Log = Callable[[str], None]
CHECK_ARCHS = 2  # random archs exported besides the covering set, to check that it covers (they add 0)
Space = SearchSpace | BertSpace


@dataclass
class ModelShape:
    """What a space's workloads depend on besides the arch."""

    vocab_size: int = 1000  # SupernetConfig's default: a fresh supernet's
    max_positions: int = 256
    pad_id: int = 0
    n_classes: int = 2  # encoder-only: classes of the classifier head (2 = SST-2's)
    seq_len: int = 0  # encoder-only: tokens per row (0 = the target protocol's source_len)

    @classmethod
    def fresh(cls, space: Space) -> ModelShape:
        """A fresh supernet's shape for the space's kind (a BERT supernet: BertConfig's defaults)."""
        return cls(vocab_size=4000, max_positions=512) if isinstance(space, BertSpace) else cls()

    @classmethod
    def of_checkpoint(cls, checkpoint: Path | None) -> ModelShape:
        """A supernet checkpoint's (translation or BERT), or a fine-tuned BERT encoder's: its
        classes from its config (a BERT supernet has no head yet: SST-2's 2)."""
        if checkpoint is None:
            return cls()
        cfg = _checkpoint_config(checkpoint)
        try:
            shape = cls(int(cfg["vocab_size"]), int(cfg["max_positions"]), int(cfg["pad_id"]))
            if _is_bert_config(cfg):
                shape.n_classes = int(cfg.get("n_classes") or cls.n_classes)
            return shape
        except (KeyError, TypeError, ValueError):
            raise MoscError(f"{checkpoint}: not a supernet checkpoint (config lacks vocab_size/max_positions)") from None


def _checkpoint_config(checkpoint: Path) -> dict:
    from mosc.fileio import read_json, resolve_checkpoint

    cfg = read_json(resolve_checkpoint(checkpoint) / "config.json", "checkpoint config").get("config", {})
    return cfg if isinstance(cfg, dict) else {}


def _is_bert_config(cfg: dict) -> bool:
    """A BERT supernet's or encoder's config: its space has the [bert] table."""
    return isinstance(cfg.get("space"), dict) and BERT_TABLE in cfg["space"]


def load_tune_space(space: str | None, checkpoint: Path | None) -> Space:
    """The space to tune: the checkpoint's own (its config's space says which kind), else the
    named one (a built-in or a .toml path, either kind; default tiny)."""
    from mosc.bert_space import load_space
    from mosc.jobs.artifacts import ModelSource, load_space as checkpoint_space

    if checkpoint is None:
        return load_space(space or "tiny")
    cfg = _checkpoint_config(checkpoint)
    if _is_bert_config(cfg):
        return BertSpace.from_dict(cfg["space"], where=str(checkpoint))
    return checkpoint_space(ModelSource(checkpoint=checkpoint, space=space or "tiny"))


def _seq_len(shape: ModelShape, target: Target) -> int:
    return shape.seq_len or target.protocol.source_len


def model_key(space: Space, shape: ModelShape, target: Target) -> dict:
    p = target.protocol
    if isinstance(space, BertSpace):
        from mosc.contract import ENCODER_CLASSIFIER

        return {"kind": ENCODER_CLASSIFIER, "vocab_size": shape.vocab_size, "width": space.width,
                "max_positions": shape.max_positions, "n_classes": shape.n_classes,
                "shapes": {"batch": p.batch, "seq_len": _seq_len(shape, target)}}
    return {"vocab_size": shape.vocab_size, "qkv_dim": space.qkv_dim, "max_positions": shape.max_positions,
            "shapes": {"batch": p.batch, "source_len": p.source_len, "cache_len": p.decoder_steps}}


def space_workloads(space: Space, shape: ModelShape, target: Target, db_dir: Path, *,
                    log: Log = lambda m: None, check_archs: int = CHECK_ARCHS):
    """(SpaceFile, workloads the check archs added beyond the covering set: normally 0).

    Read from db_dir/spaces/ when there; else every covering arch (and `check_archs` random
    ones) is exported and imported once, and the file is saved for the next call."""
    model = model_key(space, shape, target)
    path = SpaceFile.path(db_dir, space.name, model)
    if path.is_file():
        return SpaceFile.load(path), 0
    archs = space.covering_archs()
    rng = random.Random(0)
    checks = [space.sample(rng) for _ in range(check_archs)]
    log(f"enumerating the workloads of space {space.name!r}: {len(archs)} covering archs + {len(checks)} random "
        "archs exported and imported once")
    t0 = time.perf_counter()
    covering = _workloads_of(archs, space, shape, target)
    with_checks = _workloads_of(checks, space, shape, target)
    extra = {k: w for k, w in with_checks.items() if k not in covering}
    for k, w in with_checks.items():  # tune what the checks found too; keep the most calls
        if k in covering:
            covering[k].calls = max(covering[k].calls, w.calls)
    sf = SpaceFile(space.name, model, [a.to_dict() for a in archs], {**covering, **extra})
    sf.save(db_dir)
    log(f"{len(sf.workloads)} distinct workloads ({len(extra)} found only by the random archs) in "
        f"{time.perf_counter() - t0:.0f} s; saved to {path}")
    return sf, len(extra)


def _workloads_of(archs, space: Space, shape: ModelShape, target: Target) -> dict:
    import torch

    from mosc.compiler.workloads import extract

    models = []
    with tempfile.TemporaryDirectory(prefix="mosc-space-") as tmp:
        for i, arch in enumerate(archs):
            torch.manual_seed(i)
            models.append(_export(arch, space, shape, target, Path(tmp) / str(i)))
        return extract(models, target)


def _export(arch, space: Space, shape: ModelShape, target: Target, out: Path) -> list[tuple[Path, int]]:
    """Export one arch of the space (random weights) into `out`: its graphs with calls per inference."""
    if isinstance(space, BertSpace):
        from mosc.contract import CLASSIFIER
        from mosc.nn.bert import BertEncoder, BertEncoderConfig
        from mosc.nn.bert_export import ClassifierShapes, export_classifier

        enc = BertEncoder(BertEncoderConfig(arch, space.to_dict(), shape.vocab_size, shape.max_positions,
                                            shape.pad_id, shape.n_classes)).eval()
        export_classifier(enc, out, ClassifierShapes(target.protocol.batch, _seq_len(shape, target)), check=False)
        return [(out / f"{CLASSIFIER}.onnx", 1)]
    from mosc.contract import DECODER, ENCODER
    from mosc.nn.export import Shapes, export_subnet
    from mosc.nn.subnet import Subnet, SubnetConfig

    shapes = Shapes.from_protocol(target.protocol)
    sub = Subnet(SubnetConfig(arch, shape.vocab_size, space.qkv_dim, shape.max_positions, shape.pad_id)).eval()
    export_subnet(sub, out, shapes, check=False)
    return [(out / f"{ENCODER}.onnx", 1), (out / f"{DECODER}.onnx", shapes.cache_len)]


def tune_space(space: Space, shape: ModelShape, target: Target, *, trials: int, budget_min: float | None = None,
               tune_db: Path | None = None, progress: bool | None = None, log: Log = lambda m: None):
    """Enumerate (or read) the space's workloads, then tune them into the target's database.
    Returns (SpaceFile, workloads only the check archs found, SpaceTuneReport)."""
    from mosc.compiler.build import require_cross_compiler
    from mosc.compiler.tune import check_tracker, default_db_dir, tune_space as tune_workloads

    require_cross_compiler(target)
    devices = check_tracker(target) if target.needs_rpc else 0  # before minutes of exporting
    db_dir = Path(tune_db) if tune_db is not None else default_db_dir(target)
    sf, extra = space_workloads(space, shape, target, db_dir, log=log)
    where = f"{devices} device(s) under key {target.rpc.key!r}" if devices else "this machine"
    log(f"tuning {len(sf.workloads)} workloads of space {space.name!r} for {target.name} on {where}: "
        f"budget {trials} trials" + (f" or {budget_min:g} min" if budget_min else "") + f"; database {db_dir}")
    report = tune_workloads(sf, target, db_dir, trials=trials,
                            budget_s=None if budget_min is None else budget_min * 60, progress=progress)
    return sf, extra, report


def space_status(space: Space, shape: ModelShape, target: Target, tune_db: Path | None = None):
    """(SpaceFile, [Coverage]) of a space already enumerated in the target's database folder."""
    from mosc.compiler.tune import default_db_dir, open_database
    from mosc.compiler.workloads import coverage, space_files

    db_dir = Path(tune_db) if tune_db is not None else default_db_dir(target)
    path = SpaceFile.path(db_dir, space.name, model_key(space, shape, target))
    if not path.is_file():
        known = ", ".join(p.name for p in space_files(db_dir)) or "none"
        raise MoscError(f"space {space.name!r} has not been tuned for {target.name} with this model shape "
                        f"(no {path}; spaces there: {known}); run `mosc tune --space {space.name} --target {target.name}`")
    sf = SpaceFile.load(path)
    return sf, coverage(open_database(db_dir), target, sf.workloads)

"""Job: arch -> measurable model files, built once and cached by everything that changes them.

`mosc measure` needs, per arch: a TVM artifact (backend tvm), an ONNX export (backend ort)
or a collapsed Subnet (backend torch). `ArtifactCache.prepare(arch, backend)` makes them
from a supernet (a checkpoint, or a seeded randomly initialised supernet of a space: latency
does not depend on weight values) with the export and compile jobs, and
keeps them in

    <root>/<target>/<arch hash>-b<B>s<S>t<T>-<weights>/onnx/
    <root>/<target>/<arch hash>-b<B>s<S>t<T>-<weights>-<tuned<N>|notune>-<build key>/art/

(root: $MOSC_ARTIFACT_CACHE or ~/.cache/mosc/artifacts). The build key is a sha256 over the
arch, shapes, weights, the resolved TVM target (host included), the cross compiler, tuning on
or off and the trial budget. A folder is reused when its export.json / manifest.json verify
(structure, seal, sha256s), name the same arch and TVM version, and the artifact was built
with a tuning database of the same content as the one there now (records the build did not
see could change its schedules); anything else is rebuilt. One process builds a folder at a
time (an flock on <folder>/.lock): several `mosc measure` processes may share a cache.
Imports torch (lazily, when something has to be built).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mosc import env
from mosc.errors import MoscError
from mosc.device.backends import Prepared
from mosc.space import Arch, SearchSpace
from mosc.compiler.targets import Target


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from: a supernet checkpoint, or a fresh seeded supernet of a space."""

    checkpoint: Path | None = None
    space: str = "tiny"
    mode: str = "neuron"
    seed: int = 0

    def describe(self) -> str:
        if self.checkpoint is not None:
            return f"checkpoint {self.checkpoint}"
        return (f"a randomly initialised {self.mode} supernet of space {self.space!r} (seed {self.seed}); "
                "latency does not depend on weight values")

    def tag(self) -> str:
        if self.checkpoint is None:
            return f"init-{self.mode}-s{self.seed}"
        from mosc.fileio import read_json, resolve_checkpoint

        ck = resolve_checkpoint(self.checkpoint)
        sha = read_json(ck / "config.json", "checkpoint config").get("weights_sha256") or str(ck.resolve())
        return "ck-" + hashlib.sha256(sha.encode()).hexdigest()[:12]


def load_space(source: ModelSource) -> SearchSpace:
    """The search space archs are sampled from (a checkpoint's own, else the named space)."""
    if source.checkpoint is None:
        return SearchSpace.load(source.space)
    from mosc.fileio import read_json, resolve_checkpoint

    meta = read_json(resolve_checkpoint(source.checkpoint) / "config.json", "checkpoint config")
    try:
        return SearchSpace.from_dict(meta["config"]["space"], where=str(source.checkpoint))
    except (KeyError, TypeError):
        raise MoscError(f"{source.checkpoint}: not a supernet checkpoint (no config.space)") from None


def sample_archs(space: SearchSpace, n: int, seed: int) -> list[Arch]:
    """n distinct archs, the same for the same (space, n, seed): `--sample N --seed S`. An n the
    space cannot give, or beyond MAX_ARCHS_PER_REQUEST, is one line before any sampling."""
    return space.sample_distinct(n, seed, "the number of archs to sample")


class ArtifactCache:
    def __init__(self, target: Target, source: ModelSource, *, root: Path | None = None, tune: bool = True,
                 trials: int | None = None, tune_db: Path | None = None, log: Callable[[str], None] = print):
        from mosc.compiler.tune import DEFAULT_TRIALS

        self.target, self.source, self.root = target, source, Path(root or env.artifact_cache_root())
        self.trials = DEFAULT_TRIALS if trials is None else trials
        self.tune = tune and self.trials > 0  # what compile_export does: no trials, no tuning
        self.tune_db, self.log = tune_db, log
        self._supernet = None
        self._tag = source.tag()
        self._build_id = None

    def model_folder(self, arch: Arch) -> Path:
        """The export's folder: depends on the arch, the shapes and the weights only."""
        p = self.target.protocol
        return self.root / self.target.name / f"{arch.hash}-b{p.batch}s{p.source_len}t{p.decoder_steps}-{self._tag}"

    def folder(self, arch: Arch) -> Path:
        """The artifact's folder: the model folder's name + tuning + a key of the whole build."""
        tuned = f"tuned{self.trials}" if self.tune else "notune"
        m = self.model_folder(arch)
        return m.with_name(f"{m.name}-{tuned}-{self.build_key(arch)}")

    def build_key(self, arch: Arch) -> str:
        """12 hex digits of a sha256 over everything the build depends on (but the tuning
        database, whose content is compared with the manifest's record instead)."""
        if self._build_id is None:
            t, p = self.target, self.target.protocol
            self._build_id = {"tvm_target": str(t.tvm_target()), "cross_compiler": t.cross_compiler,
                              "shapes": [p.batch, p.source_len, p.decoder_steps], "weights": self._tag,
                              "tune": self.tune, "trials": self.trials if self.tune else 0}
        doc = json.dumps({**self._build_id, "arch": arch.hash}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(doc.encode()).hexdigest()[:12]

    def db_dir(self) -> Path:
        from mosc.compiler.tune import default_db_dir

        return Path(self.tune_db) if self.tune_db is not None else default_db_dir(self.target)

    def supernet(self):
        if self._supernet is None:
            from mosc.jobs.model import supernet_for

            s = self.source
            self._supernet = supernet_for(s.checkpoint, s.space, s.mode, s.seed)[0]
        return self._supernet

    def subnet(self, arch: Arch):
        from mosc.nn.subnet import collapse

        return collapse(self.supernet(), arch)

    @contextmanager
    def _locked(self, folder: Path):
        """Hold a folder's lock: a second process waits, then finds the build done."""
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when f closes
            yield

    def export_dir(self, arch: Arch) -> Path:
        with self._locked(self.model_folder(arch)):
            return self._export_dir(arch)

    def _export_dir(self, arch: Arch) -> Path:
        from mosc.contract import load_export

        d = self.model_folder(arch) / "onnx"
        try:
            if load_export(d)["arch_hash"] == arch.hash:
                return d
        except MoscError:
            pass
        from mosc.nn.export import Shapes, export_subnet

        self.log(f"  exporting arch {arch.hash} to ONNX ({d})")
        export_subnet(self.subnet(arch), d, Shapes.from_protocol(self.target.protocol), check=False,
                      extra={"source": self.source.describe()})
        return d

    def artifact(self, arch: Arch) -> tuple[Path, bool]:
        """(artifact folder, whether it was reused)."""
        with self._locked(self.folder(arch)):
            return self._artifact(arch)

    def reusable(self, art: Path, arch: Arch) -> bool:
        """An artifact that verifies, holds this arch, was built by this TVM and with a tuning
        database of the same content as the one there now."""
        import tvm

        from mosc.compiler.artifact import verify_artifact
        from mosc.compiler.tune import database_id, same_database

        try:
            m = verify_artifact(art)
        except MoscError:
            return False
        return ((m.get("model") or {}).get("arch_hash") == arch.hash and m.get("tvm_version") == tvm.__version__
                and same_database(m["tuning"]["database"], database_id(self.db_dir())))

    def _artifact(self, arch: Arch) -> tuple[Path, bool]:
        from mosc.jobs.build import compile_export

        d = self.folder(arch) / "art"
        if self.reusable(d, arch):
            return d, True
        onnx = self.export_dir(arch)
        compile_export(onnx, self.target, d, trials=self.trials, tune=self.tune, tune_db=self.db_dir(),
                       source=self.source.describe(), progress=False, log=lambda m: self.log("  " + m))
        return d, False

    def prepare(self, arch: Arch, backend: str) -> Prepared:
        notes = {"weights": self.source.describe()}
        if backend == "tvm":
            art, reused = self.artifact(arch)
            from mosc.compiler.artifact import read_manifest, schedule_coverage

            m = read_manifest(art)
            cov = schedule_coverage(m)
            notes.update({"artifact": str(art), "artifact_reused": reused, "tuned": m["tuning"]["tuned"],
                          "tuning_records": m["tuning"]["database"].get("records"),
                          "tuning_db_sha256": m["tuning"]["database"].get("sha256"),
                          # how much of this build came from tuned records (the rest: default schedules)
                          "functions_from_database": cov["from_database"],
                          "functions_default_scheduled": cov["default_scheduled"]})
            return Prepared(artifact=art, notes=notes)
        if backend == "ort":
            return Prepared(export_dir=self.export_dir(arch), notes=notes)
        if backend == "torch":
            import torch

            notes["torch_threads"] = torch.get_num_threads()
            return Prepared(subnet=self.subnet(arch), notes=notes)
        raise MoscError(f"unknown backend {backend!r}")

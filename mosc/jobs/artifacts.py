"""Job: arch -> measurable model files, built once and cached by arch hash.

`mosc measure` needs, per arch: a TVM artifact (backend tvm), an ONNX export (backend ort)
or a collapsed Subnet (backend torch). `ArtifactCache.prepare(arch, backend)` makes them
from a supernet (a checkpoint, or a seeded randomly initialised supernet of a space: latency
does not depend on weight values) with the export and compile jobs, and
keeps them in

    <root>/<target>/<arch hash>-b<B>s<S>t<T>-<weights>-<tuned|notune>/{onnx,art}/

(root: $MOSC_ARTIFACT_CACHE or ~/.cache/mosc/artifacts). A folder is reused when its
export.json / manifest.json verify (sha256s) and name the same arch; anything else is
rebuilt. One process builds a folder at a time (an flock on <folder>/.lock): several
`mosc measure` processes may share a cache. Imports torch (lazily, when something has to be built).
"""

from __future__ import annotations

import fcntl
import hashlib
import random
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
    """n distinct archs, the same for the same (space, n, seed): `--sample N --seed S`."""
    rng, out, seen = random.Random(seed), [], set()
    for _ in range(n * 50):
        a = space.sample(rng)
        if a.hash not in seen:
            seen.add(a.hash)
            out.append(a)
        if len(out) == n:
            return out
    raise MoscError(f"space {space.name!r} has fewer than {n} distinct archs reachable with seed {seed}")


class ArtifactCache:
    def __init__(self, target: Target, source: ModelSource, *, root: Path | None = None, tune: bool = True,
                 trials: int | None = None, tune_db: Path | None = None, log: Callable[[str], None] = print):
        self.target, self.source, self.root = target, source, Path(root or env.artifact_cache_root())
        self.tune, self.trials, self.tune_db, self.log = tune, trials, tune_db, log
        self._supernet = None
        self._tag = source.tag()

    def folder(self, arch: Arch) -> Path:
        p = self.target.protocol
        tuned = "tuned" if self.tune else "notune"
        return self.root / self.target.name / f"{arch.hash}-b{p.batch}s{p.source_len}t{p.decoder_steps}-{self._tag}-{tuned}"

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
    def _locked(self, arch: Arch):
        """Hold the arch folder's lock: a second process waits, then finds the build done."""
        d = self.folder(arch)
        d.mkdir(parents=True, exist_ok=True)
        with open(d / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when f closes
            yield

    def export_dir(self, arch: Arch) -> Path:
        from mosc.contract import load_export

        d = self.folder(arch) / "onnx"
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
        with self._locked(arch):
            return self._artifact(arch)

    def _artifact(self, arch: Arch) -> tuple[Path, bool]:
        from mosc.compiler.artifact import verify_artifact
        from mosc.jobs.build import compile_export

        d = self.folder(arch) / "art"
        try:
            if verify_artifact(d).get("model", {}).get("arch_hash") == arch.hash:
                return d, True
        except MoscError:
            pass
        onnx = self.export_dir(arch)
        compile_export(onnx, self.target, d, trials=self.trials, tune=self.tune, tune_db=self.tune_db,
                       source=self.source.describe(), progress=False, log=lambda m: self.log("  " + m))
        return d, False

    def prepare(self, arch: Arch, backend: str) -> Prepared:
        notes = {"weights": self.source.describe()}
        if backend == "tvm":
            art, reused = self.artifact(arch)
            from mosc.compiler.artifact import read_manifest

            m = read_manifest(art)
            notes.update({"artifact": str(art), "artifact_reused": reused, "tuned": m["tuning"]["tuned"],
                          "tuning_records": m["tuning"]["database"].get("records")})
            return Prepared(artifact=art, notes=notes)
        if backend == "ort":
            with self._locked(arch):
                return Prepared(export_dir=self.export_dir(arch), notes=notes)
        if backend == "torch":
            import torch

            notes["torch_threads"] = torch.get_num_threads()
            return Prepared(subnet=self.subnet(arch), notes=notes)
        raise MoscError(f"unknown backend {backend!r}")

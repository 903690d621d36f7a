"""Deployment targets: one TOML file per device in the repo's `targets/` folder.

A target says what to compile for (a TVM target), how to build the shared library
(cross compiler), where to find the device (RPC tracker and key), how to measure it
(protocol) and how much slowdown a benchmark tolerates (regression). The schema is
documented at the top of every `targets/*.toml` file and mirrored by the dataclasses
below; every setting has its default here, once.

Pure Python (tomllib). TVM is imported only by `Target.tvm_target()`, which builds the
`tvm.target.Target`. This module does not know how to compile, tune, or measure.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from mosc import env
from mosc.errors import MoscError
from mosc.fileio import read_toml
from mosc.rpc import parse_hostport
from mosc.tables import from_table

AUTO = "auto"  # value of "mcpu" / "num-cores" in an inline tvm_target: detect on this machine
# A target name (or alias) is a file's stem and a folder of the tuning cache: no path separators.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")


def targets_dir() -> Path:
    """The folder of target files: the repo's `targets/`, or $MOSC_TARGETS_DIR."""
    return env.targets_dir()


def _in_range(where: str, name: str, value, lo, hi, why: str = "") -> None:
    """MoscError unless lo <= value <= hi (and finite)."""
    if not (math.isfinite(value) and lo <= value <= hi):
        raise MoscError(f"{where}: {name} must be between {lo:g} and {hi:g}{why}, got {value!r}")


@dataclass(frozen=True)
class Rpc:
    tracker_host: str = "127.0.0.1"
    tracker_port: int = 9190
    key: str = ""  # device key registered with the tracker; "" = the target's name

    def check(self, where: str) -> Rpc:
        if not self.tracker_host.strip():
            raise MoscError(f"{where}: tracker_host is empty")
        _in_range(where, "tracker_port", self.tracker_port, 1, 65535)
        return self


MAX_SHAPE = 4096  # tokens of source or decoder steps: far beyond any model here, short of a typo's 10**9


@dataclass(frozen=True)
class Protocol:
    source_len: int = 30  # encoder input length (tokens), static
    decoder_steps: int = 30  # decoder steps timed per translation (= KV cache length)
    batch: int = 1
    warmup: int = 5  # untimed runs before measuring
    repeats: int = 50  # timed runs
    trim: float = 0.1  # fraction dropped from each tail before p50/p90

    def check(self, where: str) -> Protocol:
        _in_range(where, "source_len", self.source_len, 1, MAX_SHAPE)
        _in_range(where, "decoder_steps", self.decoder_steps, 1, MAX_SHAPE)
        _in_range(where, "batch", self.batch, 1, 1024)
        _in_range(where, "warmup", self.warmup, 0, 10_000)
        _in_range(where, "repeats", self.repeats, 2, 100_000, " (a statistic needs several runs)")
        if not (math.isfinite(self.trim) and 0 <= self.trim < 0.5):
            raise MoscError(f"{where}: trim must be >= 0 and < 0.5 (a fraction cut from each tail), got {self.trim!r}")
        return self


@dataclass(frozen=True)
class Regression:
    p50_tol: float = 0.05  # allowed relative slowdown of the median
    p90_tol: float = 0.10  # allowed relative slowdown of the 90th percentile

    def check(self, where: str) -> Regression:
        _in_range(where, "p50_tol", self.p50_tol, 0, 100, " (a relative slowdown)")
        _in_range(where, "p90_tol", self.p90_tol, 0, 100, " (a relative slowdown)")
        return self


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    tvm_target_spec: str | dict  # TVM tag or target dict, as written ("auto" unresolved)
    host: str | dict = ""  # TVM host target; "" = the tvm target's own host / itself
    cross_compiler: str = ""  # e.g. "aarch64-linux-gnu-gcc"; "" = build machine default
    rpc: Rpc = field(default_factory=Rpc)
    protocol: Protocol = field(default_factory=Protocol)
    regression: Regression = field(default_factory=Regression)
    path: Path | None = None  # file it was read from
    rpc_explicit: bool = False  # a tracker or key was given (with_rpc): even a CPU target is remote

    @property
    def is_cross(self) -> bool:
        """True when the code cannot run on the build machine (needs a device or emulator)."""
        return bool(self.cross_compiler)

    @property
    def needs_rpc(self) -> bool:
        """True when the device is reached through the RPC tracker, for tuning and measuring alike:
        a tracker or key was given, or the code cannot run here (cross), or it runs on a GPU.
        Imports tvm (device_type)."""
        return self.rpc_explicit or self.is_cross or self.device_type() != "cpu"

    def resolved_spec(self) -> str | dict:
        """The TVM target spec with "auto" values detected on this machine (imports tvm for mcpu)."""
        spec = self.tvm_target_spec
        if not isinstance(spec, dict):
            return spec
        spec = dict(spec)
        if spec.get("mcpu") == AUTO:
            from tvm.target import codegen  # lazy: tvm takes ~2 s to import

            spec["mcpu"] = codegen.llvm_get_system_cpu()
        if spec.get("num-cores") == AUTO:
            # cores this process may use (respects taskset/cgroups), not the machine's total
            spec["num-cores"] = len(os.sched_getaffinity(0))
        return spec

    def tvm_target(self):
        """The `tvm.target.Target` (with its host attached) for this device."""
        import tvm  # lazy

        target = _tvm_target(self.resolved_spec(), self.name, "tvm_target")
        if self.host:
            host = _tvm_target(self.host, self.name, "host")
            if host.host is not None:  # a tag such as the Pi's carries its own host: drop it
                host = tvm.target.Target({k: v for k, v in host.export().items() if k != "host"})
            target = tvm.target.Target(target, host=host)
        elif target.kind.name != "llvm":
            # a GPU target needs a host for the VM's driver code
            target = tvm.target.Target(target, host=tvm.target.Target({"kind": "llvm"}))
        return target

    def with_rpc(self, tracker: str | None = None, key: str | None = None) -> Target:
        """This target with its [rpc] tracker ("HOST:PORT") and/or key replaced (None: keep);
        what `--tracker/--key` do, so tuning and measuring reach the same device. Either one
        makes the target remote (needs_rpc), even a CPU one."""
        if not tracker and not key:
            return self
        host, port = parse_hostport(tracker) if tracker else (self.rpc.tracker_host, self.rpc.tracker_port)
        rpc = Rpc(tracker_host=host, tracker_port=port, key=key or self.rpc.key)
        return replace(self, rpc=rpc, rpc_explicit=True)

    def device_type(self) -> str:
        """TVM device name the artifact runs on: "cpu" or "cuda" (imports tvm for tags)."""
        kind = self.tvm_target().kind.name
        return "cpu" if kind == "llvm" else kind


def _tvm_target(spec: str | dict, name: str, key: str):
    """tvm.target.Target(spec), with TVM's errors (unknown tag or kind, an mcpu LLVM does not
    know: TVM would only log it and build for a generic CPU) as one-line MoscErrors."""
    import tvm

    if isinstance(spec, dict) and spec.get("kind") == "llvm" and "mcpu" in spec:  # check before TVM logs it
        from tvm.target import codegen

        triple = str(spec.get("mtriple") or codegen.llvm_get_system_triple())
        if not codegen.llvm_is_valid_cpu(str(spec["mcpu"]), triple):
            raise MoscError(f"target {name}: {key} has mcpu {spec['mcpu']!r}, which LLVM does not know for {triple}")
    try:
        return tvm.target.Target(spec)
    except Exception as e:  # noqa: BLE001  (TVM raises ValueError / TVMError with long text)
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise MoscError(f"target {name}: {key} {spec!r} is not a TVM target ({first}); "
                        "see tvm.target.list_tags()") from None


def as_target(target: Target | str) -> Target:
    """A Target, or the target file of that name (or alias)."""
    return target if isinstance(target, Target) else load_target(target)


def list_targets() -> list[str]:
    """Names of the target files found, sorted."""
    return sorted(p.stem for p in targets_dir().glob("*.toml"))


def aliases() -> dict[str, str]:
    """alias -> target name, from the `aliases` lists of the target files. A file that does not
    parse is left out here (loading it by name reports what is wrong with it)."""
    out: dict[str, str] = {}
    for name in list_targets():
        try:
            raw = read_toml(targets_dir() / f"{name}.toml", "target file")
        except MoscError:
            continue
        for alias in raw.get("aliases", []) if isinstance(raw.get("aliases"), list) else []:
            if isinstance(alias, str) and out.setdefault(alias, name) != name:
                raise MoscError(f"target alias {alias!r} is claimed by both {out[alias]}.toml and {name}.toml "
                                f"(in {targets_dir()})")
    return out


def _valid_names() -> str:
    by_target: dict[str, list[str]] = {}
    for alias, name in aliases().items():
        by_target.setdefault(name, []).append(alias)
    return ", ".join(n + (f" (also {', '.join(sorted(by_target[n]))})" if n in by_target else "")
                     for n in list_targets()) or "(none)"


def resolve_name(name: str) -> str:
    """The target file name for a name or alias ("rpi" -> "rpi4"); MoscError when it is neither."""
    if not isinstance(name, str) or not NAME.match(name):
        raise MoscError(f"invalid target name {name!r}: letters, digits, '_', '.' and '-' only, no path "
                        f"separators; valid targets: {_valid_names()}")
    if (targets_dir() / f"{name}.toml").is_file():
        return name
    canonical = aliases().get(name)
    if canonical is None:
        raise MoscError(f"unknown target {name!r}; valid targets: {_valid_names()} (in {targets_dir()})")
    return canonical


def load_target(name: str) -> Target:
    """Read `targets/<name>.toml` (name may be an alias: the Target carries the file's name).
    Unknown name, malformed file or a setting out of range -> MoscError."""
    name = resolve_name(name)
    path = targets_dir() / f"{name}.toml"
    where = str(path)
    raw = read_toml(path, "target file")
    sections = {"rpc": Rpc, "protocol": Protocol, "regression": Regression}
    top = {"description", "tvm_target", "host", "cross_compiler", "aliases", *sections}
    unknown = sorted(set(raw) - top)
    if unknown:
        raise MoscError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(top))}")
    for key in ("description", "tvm_target"):
        if key not in raw:
            raise MoscError(f"{where}: missing required key {key!r}")
    spec = raw["tvm_target"]
    if not (isinstance(spec, str) and spec) and not (isinstance(spec, dict) and "kind" in spec):
        raise MoscError(f"{where}: tvm_target must be a TVM tag or a table with a 'kind'")
    host = raw.get("host", "")
    if not isinstance(host, str | dict):
        raise MoscError(f"{where}: host must be a TVM tag or a table")
    for key in ("description", "cross_compiler"):
        if not isinstance(raw.get(key, ""), str):
            raise MoscError(f"{where}: {key} must be a string")
    _check_aliases(raw.get("aliases", []), where)

    parsed = {k: from_table(cls, raw.get(k, {}), f"{where} [{k}]").check(f"{where} [{k}]")
              for k, cls in sections.items()}
    if not parsed["rpc"].key:
        parsed["rpc"] = replace(parsed["rpc"], key=name)
    return Target(
        name=name,
        description=raw["description"],
        tvm_target_spec=spec,
        host=host,
        cross_compiler=raw.get("cross_compiler", ""),
        path=path,
        **parsed,
    )


def _check_aliases(value, where: str) -> None:
    if not isinstance(value, list) or not all(isinstance(a, str) and NAME.match(a) for a in value):
        raise MoscError(f"{where}: aliases must be a list of names (letters, digits, '_', '.', '-'), got {value!r}")
    taken = [a for a in value if (targets_dir() / f"{a}.toml").is_file()]
    if taken:
        raise MoscError(f"{where}: alias {taken[0]!r} is the name of another target file")

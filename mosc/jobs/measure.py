"""Jobs of the device world: measure archs into the latency database, bench one artifact,
check a result against a baseline.

`measure_into_db` is the one way archs get measured, for `mosc measure`, the pipeline's
measure and check stages and the search's feedback rounds. Artifacts for archs come from
an `ArtifactCache` (built or reused per arch); where they run is the Target's business
(`needs_rpc`). Plain arguments in, plain data out, progress through a `log` callable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mosc.errors import Interrupted, MoscError

Log = Callable[[str], None]


def remote_for(target, backend: str = "tvm", timeout: float | None = None):
    """The RPC address (mosc.rpc.Remote) a backend measures the target through, or None for
    this machine. Only TVM artifacts travel to devices; ort and torch run here."""
    from mosc.rpc import Remote

    if backend != "tvm":
        if target.rpc_explicit:
            raise MoscError(f"--backend {backend} measures on this machine; --tracker/--key are for the tvm backend")
        return None
    if not target.needs_rpc:
        return None
    kw = {"session_timeout": timeout} if timeout else {}
    return Remote(target.rpc.tracker_host, target.rpc.tracker_port, target.rpc.key, **kw)


@dataclass
class Measured:
    new: list[dict] = field(default_factory=list)  # rows written now
    skipped: list[str] = field(default_factory=list)  # arch hashes already in the DB
    device_key: str = ""
    emulated: bool = False
    where: str = ""  # "this machine (x86_64)" or "device 'rpi4' via tracker HOST:PORT"
    latency_ms: dict[str, float] = field(default_factory=dict)  # arch hash -> latency, every asked arch found


def measure_into_db(target, archs: list, cache, db_path: Path, *, backend: str = "tvm", remote=None,
                    force: bool = False, tries: int | None = None, refuse_emulated: bool = False,
                    source: str = "mosc measure", announce: bool = False, log: Log = print,
                    done: Callable[[], None] | None = None) -> Measured:
    """Measure archs on the target with the target's protocol; each row is committed as soon as
    it is taken, archs already in the DB are skipped (unless force). cache: an ArtifactCache
    that prepares what the backend needs per arch. refuse_emulated: a MoscError when the
    device is emulated (its timings check function, not speed: nothing to fit or search on).
    announce: log which device was found before measuring. Ctrl-C: Interrupted, saying what was
    saved and that the same command continues."""
    from mosc.device.campaign import Campaign
    from mosc.device.db import LatencyDB

    kw = {"tries": tries} if tries else {}
    with LatencyDB(db_path, readonly=False, log=log) as ldb:  # for writing now: rows kept earlier are merged first
        camp = Campaign(target, backend, ldb, remote=remote, force=force, log=log, source=source, **kw)
        try:
            where = _start(camp, target, backend, remote, len(archs), refuse_emulated, announce, log)
            res = camp.run(archs, lambda a: cache.prepare(a, backend), **({"done": done} if done else {}))
        except KeyboardInterrupt:
            left = len(archs) - len(camp.result.measured) - len(camp.result.skipped)
            raise Interrupted(f"interrupted: {camp.saved_where()}; run the same command again to measure "
                              f"the remaining {left}") from None
        latency = {r["arch_hash"]: r["latency_ms"] for r in ldb.query(target.name, backend=backend)}
    if not camp.emulated:  # rows kept in the side file are not in the DB yet
        latency.update({r["arch_hash"]: r["latency_ms"] for r in res.measured})
    return Measured(res.measured, res.skipped, camp.key, camp.emulated, where,
                    {a.hash: latency[a.hash] for a in archs if a.hash in latency})


def _start(camp, target, backend: str, remote, n: int, refuse_emulated: bool, announce: bool, log: Log) -> str:
    """Probe the device (fails fast, one line, when the tracker or the device is not there) -> where it is."""
    dev = camp.probe()
    if refuse_emulated and camp.emulated:
        raise MoscError(f"the {target.name} device is emulated: its timings are not speeds, nothing to fit on")
    where = f"device {remote.key!r} via tracker {remote.addr}" if remote else f"this machine ({dev.get('machine')})"
    if announce:
        emu = " [EMULATED: timings check function, not speed; stored with emulated=1]" if camp.emulated else ""
        log(f"measuring {n} arch(s) for {target.name} with {backend} on {where}{emu}")
    return where


def bench(target, *, artifact: Path | None = None, arch=None, cache=None, repeats: int | None = None,
          log: Log = print) -> dict:
    """Measure one artifact (a folder, or an arch's artifact from the cache) with the target's
    protocol -> a `mosc bench` result dict (raw samples, stats, environment, arch, sha256s).
    A translation model or an encoder-classifier, told apart by the manifest's graphs (the
    result's `kind`; mosc.regress says what a run is for each)."""
    from mosc.contract import ENCODER_CLASSIFIER
    from mosc.regress import bench as bench_artifact
    from mosc.regress import bench_inputs

    if (artifact is None) == (arch is None):
        raise MoscError("give --artifact DIR or --arch ARCH.json")
    if arch is not None:
        artifact, _ = cache.artifact(arch)
    # an artifact that is broken (manifest, a file's sha256) or not for this target and protocol
    # (target, arch, shapes) is one line before anything is announced; bench checks again
    _, _, kind = bench_inputs(target, Path(artifact), arch, repeats)
    remote = remote_for(target)
    p = target.protocol
    run = (f"one classifier call each, sequence {p.source_len}, batch {p.batch}" if kind == ENCODER_CLASSIFIER
           else f"source {p.source_len}, {p.decoder_steps} steps")
    log(f"benchmarking {artifact} ({kind}) for {target.name} on "
        f"{'this machine' if remote is None else remote.key + ' via ' + remote.addr}: "
        f"{p.warmup} warm-up + {repeats or p.repeats} timed runs ({run})")
    return bench_artifact(target, artifact, arch, repeats=repeats, remote=remote)


@dataclass
class Checked:
    report: dict | None  # the compare() report; None when no comparison was made
    baseline_written: str | None = None  # why the baseline file was (re)written, if it was
    baseline_kept: str | None = None  # why an --update-baseline did not write it

    @property
    def exit_code(self) -> int:
        return self.report["exit_code"] if self.report else 0


def check(baseline_path: Path, baseline: dict | None, result: dict, *, tolerances: dict | None = None,
          target: str | None = None, update_baseline: bool = False, force: bool = False, resamples: int = 2000,
          confidence: float = 0.95, seed: int = 0) -> Checked:
    """Compare a result with a baseline and apply the baseline-update policy:
    no baseline yet -> the result becomes it; not comparable -> MoscError unless
    --update-baseline --force replaces it; --update-baseline writes the result when the
    verdict is not a regression (or with --force).

    tolerances: {"p50_tol", "p90_tol"} given explicitly (command line); the ones missing come
    from the target file the baseline names, never from the result file (a result must not
    choose how much slowdown it is allowed). target: when given (--target), the result's and
    the baseline's target must be it."""
    from mosc.fileio import atomic_write_json
    from mosc.regress import compare, compatible

    if force and not update_baseline:
        raise MoscError("--force only goes with --update-baseline")
    for what, r in (("result", result), ("baseline", baseline)):
        if target is not None and r is not None and r.get("target") != target:
            raise MoscError(f"--target {target}: the {what} is for target {r.get('target')!r}, not {target!r}")
    if baseline is None:
        atomic_write_json(baseline_path, result)
        return Checked(None, baseline_written="no baseline yet")
    try:
        compatible(baseline, result)
    except MoscError:
        if not (update_baseline and force):
            raise
        atomic_write_json(baseline_path, result)
        return Checked(None, baseline_written="baseline was not comparable; replaced (--force)")
    tol, source = check_tolerances(baseline["target"], tolerances)
    rep = compare(baseline, result, tolerances=tol, resamples=resamples, confidence=confidence, seed=seed,
                  check_compatible=False)
    rep["method"]["tolerances"] = source
    out = Checked(rep)
    if update_baseline:
        if rep["verdict"] != "regression" or force:
            atomic_write_json(baseline_path, result)
            out.baseline_written = "baseline updated"
        else:
            out.baseline_kept = "baseline not updated (regression; --force replaces it anyway)"
    return out


def check_tolerances(target: str, given: dict | None = None) -> tuple[dict[str, float], str]:
    """(tolerances, where they came from): those given (command line) over the target file's [regression]."""
    from dataclasses import asdict

    from mosc.regress import DEFAULT_TOLERANCES, tolerances_of

    given = {k: v for k, v in (given or {}).items() if v is not None}
    if set(DEFAULT_TOLERANCES) <= set(given):
        return tolerances_of(given), "command line"
    from mosc.compiler.targets import load_target

    tol = {**asdict(load_target(target).regression), **given}
    return tolerances_of(tol), f"target file {target!r}" + (" and command line" if given else "")

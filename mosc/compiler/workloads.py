"""The TIR workloads of a whole search space: enumerate them once, save them, tune them, report coverage.

    extract      ONNX graphs (each with its calls per translation) -> {key: Workload}
    SpaceFile    the workloads of one space and model shape, saved in a tuning database folder
    allot        a trial budget split over workloads by their expected share of latency
    coverage     per workload: trials spent, best time, whether the database has a record

A workload is one fused TIR function as PREPARE leaves it (mosc.compiler.passes); its key is
its structural hash, the same equality MetaSchedule's database uses (MODULE_EQUALITY). The
exported graphs keep each decoder layer's tensors apart, so a space's workloads are few
(tiny: 93, wmt: 112) and the same for every arch that uses the same per-layer choices.

This module does not know torch, archs or how the graphs were exported (mosc.jobs.tune
exports a covering set of archs), nor how a build applies the records (build.py). It imports
tvm only inside functions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

from mosc.compiler.passes import PREPARE, import_onnx, run_passes
from mosc.compiler.targets import Target
from mosc.errors import MoscError
from mosc.fileio import atomic_write_json, read_json

MODULE_EQUALITY = "structural"  # how workloads are told apart, here and in MetaSchedule's database
SPACE_FORMAT = "mosc-space-workloads/1"
MIN_TRIALS = 8  # trials every workload gets first: a record for each, then the budget by share
MAX_TRIALS_SHARE = 0.25  # no workload takes more than this share of a budget


@dataclass
class Workload:
    key: str  # structural hash of the PrimFunc module, 16 hex digits
    name: str  # TVM's task name (e.g. fused_matmul_add4_add7); not unique across shapes
    calls: int  # calls per translation, summed over the graphs it appears in (max over archs)
    flops: float  # estimated floating-point operations per call
    mod: str  # the IRModule as tvm.ir.save_json text (what the tuner and the database take)

    @property
    def cost(self) -> float:
        """Expected share of a translation's time, up to a factor: work x calls. Every call
        costs at least a launch's worth (1e4 flops), so tiny data-movement kernels still count."""
        return self.calls * max(self.flops, 1e4)

    @cached_property
    def ir_module(self):
        """The IRModule, parsed once (tuning and each coverage report ask for it)."""
        import tvm

        return tvm.ir.load_json(self.mod)


def workload_key(mod) -> str:
    import tvm_ffi

    return f"{tvm_ffi.structural_hash(mod) & 0xFFFFFFFFFFFFFFFF:016x}"


def extract(models: list[list[tuple[Path, int]]], target: Target) -> dict[str, Workload]:
    """The distinct workloads of several models' ONNX graphs. A model is a list of (graph path,
    calls per translation), e.g. [(encoder.onnx, 1), (decoder_step.onnx, 30)]. A workload's
    `calls` are its calls in one translation, the most over the models it appears in."""
    import tvm
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.analysis import estimate_tir_flops

    found: dict[str, Workload] = {}
    for graphs in models:
        calls_here: dict[str, int] = {}
        for path, calls in graphs:
            mod = run_passes(import_onnx(path), target, PREPARE)
            for task in ms.relax_integration.extract_tasks(mod, target.tvm_target(), module_equality=MODULE_EQUALITY):
                wmod = task.dispatched[0]
                key = workload_key(wmod)
                if key not in found:
                    found[key] = Workload(key, task.task_name, 0, float(estimate_tir_flops(wmod)), tvm.ir.save_json(wmod))
                calls_here[key] = calls_here.get(key, 0) + int(task.weight) * calls
        for key, n in calls_here.items():
            found[key].calls = max(found[key].calls, n)
    return found


# ----------------------------------------------------------------------------- the space file
@dataclass
class SpaceFile:
    """The workloads of one search space for one model shape (vocabulary, protocol lengths)."""

    space: str
    model: dict  # what the workloads depend on besides the arch: vocab, qkv, positions, shapes
    archs: list[dict]  # the covering archs the workloads came from
    workloads: dict[str, Workload]

    @staticmethod
    def path(db_dir: Path | str, space: str, model: dict) -> Path:
        """Named by the model key: an encoder-only space's key has a width, classes and one
        sequence length instead of a q/k/v size and decoder lengths."""
        s = model["shapes"]
        if model.get("kind") == "encoder-classifier":  # mosc.contract.ENCODER_CLASSIFIER
            return Path(db_dir) / "spaces" / (f"{space}-v{model['vocab_size']}-w{model['width']}-p{model['max_positions']}"
                                              f"-c{model['n_classes']}-b{s['batch']}s{s['seq_len']}.json")
        return Path(db_dir) / "spaces" / (f"{space}-v{model['vocab_size']}-q{model['qkv_dim']}-p{model['max_positions']}"
                                          f"-b{s['batch']}s{s['source_len']}t{s['cache_len']}.json")

    def save(self, db_dir: Path | str) -> Path:
        path = self.path(db_dir, self.space, self.model)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"format": SPACE_FORMAT, "space": self.space, "model": self.model, "archs": self.archs,
                                 "workloads": [asdict(w) for w in self.workloads.values()]})
        return path

    @classmethod
    def load(cls, path: Path | str) -> SpaceFile:
        doc = read_json(Path(path), "space workload file")
        if not isinstance(doc, dict) or doc.get("format") != SPACE_FORMAT:
            raise MoscError(f"{path}: not a {SPACE_FORMAT} file; delete it and run `mosc tune --space` again")
        try:
            wl = {w["key"]: Workload(**w) for w in doc["workloads"]}
            return cls(doc["space"], doc["model"], doc["archs"], wl)
        except (KeyError, TypeError) as e:
            raise MoscError(f"{path}: malformed space workload file ({e}); delete it and tune the space again") from None


# ----------------------------------------------------------------------------- budget
def allot(workloads: dict[str, Workload], trials: int) -> dict[str, int]:
    """Trials per workload: MIN_TRIALS each (every workload gets a record; fewer when the budget
    cannot pay that, never 0), the rest of the budget by expected share of latency (work x
    calls), none above MAX_TRIALS_SHARE of it."""
    if not workloads:
        return {}
    base = {k: max(1, min(MIN_TRIALS, trials // len(workloads))) for k in workloads}
    rest = max(0, trials - sum(base.values()))
    total = sum(w.cost for w in workloads.values()) or 1.0
    cap = max(MIN_TRIALS, int(trials * MAX_TRIALS_SHARE))
    return {k: min(cap, base[k] + math.floor(rest * w.cost / total)) for k, w in workloads.items()}


# ----------------------------------------------------------------------------- coverage
@dataclass
class Coverage:
    key: str
    name: str
    share: float  # of the space's expected latency (cost / total cost)
    trials: int  # tuned records in the database for this workload (candidates measured)
    best_us: float | None  # best measured time per call, microseconds (None: no valid record);
    # the default schedule's when no tuned candidate beat it
    default_us: float | None = None  # the default schedule's measured time (None: not recorded)


def record_us(record) -> float | None:
    """A record's mean measured time in microseconds; None for a failed run (MetaSchedule's 1e10 s)."""
    secs = [float(s) for s in (record.run_secs or [])]
    if not secs or sum(secs) / len(secs) >= 1e9:
        return None
    return 1e6 * sum(secs) / len(secs)


def split_records(database, mod) -> tuple[list, list]:
    """(tuned records best first, default-schedule records) of one workload in the database.
    A default-schedule record (mosc.compiler.schedules.default_schedule, committed by the
    tuner to guard builds against worse tuned records) is no trial."""
    from mosc.compiler.schedules import is_default_trace

    if not database.has_workload(mod):
        return [], []
    tuned, defaults = [], []
    for r in database.get_top_k(database.commit_workload(mod), 1 << 30):  # best first
        (defaults if is_default_trace(r.trace) else tuned).append(r)
    return tuned, defaults


def coverage(database, target: Target, workloads: dict[str, Workload]) -> list[Coverage]:
    """Per workload, from the database: trials spent, the best time and the default schedule's
    (sorted by share).

    Each workload is looked up with the database's own equality (as a build looks it up),
    not by comparing hashes: a module read back from the database's JSON does not always
    hash like the module it was written from (seen for `take` and a plain matmul)."""
    total = sum(w.cost for w in workloads.values()) or 1.0
    out = []
    for k, w in workloads.items():
        tuned, defaults = split_records(database, w.ir_module)
        best = min((u for u in map(record_us, tuned[:1] + defaults[:1]) if u is not None), default=None)
        out.append(Coverage(k, w.name, w.cost / total, len(tuned), best,
                            record_us(defaults[0]) if defaults else None))
    return sorted(out, key=lambda c: -c.share)


def space_files(db_dir: Path | str) -> list[Path]:
    return sorted((Path(db_dir) / "spaces").glob("*.json"))

"""MetaSchedule tuning against a persistent per-target database (JSON files in a folder).

    tune            tune the TIR tasks of some graphs that the database lacks; add the records
    tune_space      tune every workload of a search space (mosc.compiler.workloads.SpaceFile)
    commit_default_schedules  each task's default schedule, measured, as a record (the guard)
    open_database   the database in a folder; default_db_dir: ~/.cache/mosc/tune/<target>/
    database_id     path, record count and content sha256 of a database (what a manifest records)
    check_tracker   fail in one line, before any trial, when the device cannot be reached

Why tuning matters: `tvm.compile` applies no schedule to CPU code (legalize + lower only),
so an untuned CPU build is ~100x slower than onnxruntime. The database is keyed by TIR
workload, so it is shared by every model compiled for a target: tasks that already have a
record are not tuned again (a second, similar model costs few or no trials). Tasks that
MetaSchedule cannot tune are remembered next to it (UNTUNABLE) so no compile retries them.

The guard (commit_default_schedules): before a task is tuned, its default schedule
(mosc.compiler.schedules) is built and measured by the same builder and runner as the candidates
and committed as a record, so the database's best record is the default whenever no candidate
beat it, and a build replays that trace. Without it a few trials' best record was applied even
when 2-20x slower than the default (bert-tiny tuned with 1,090 trials built 2.6x slower than with
default schedules only). `tune --space` adds the default records a database tuned before this
lacks. Local measurements run on the target's num-cores threads (_run_on_threads).

CPU candidates are timed cold (_evaluator_config); a database says so in TIMING_FILE, and one
whose records were timed otherwise is refused for tuning (check_timing), since its records'
times would not compare with new ones.

This module does not know about artifacts, shared libraries or how a model is measured;
it reaches a device only through MetaSchedule's RPC runner. It imports tvm only inside
functions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mosc import env
from mosc.compiler.passes import PREPARE, run_passes
from mosc.compiler.targets import Target, as_target
from mosc.compiler.workloads import MODULE_EQUALITY, split_records, workload_key
from mosc.errors import MoscError
from mosc.fileio import atomic_write_json

log = logging.getLogger(__name__)

DEFAULT_TRIALS = 256  # global trial budget of one compile; ~300 took a d=512 model to torch speed
TRIALS_PER_TASK = 64  # cap per task: matmuls keep improving, small ops exhaust their space at 1
TRIALS_PER_ITER = 32  # candidates built+measured per round (TVM's 64 is coarse for small budgets)
BUILD_TIMEOUT_S = 60.0  # per candidate build in a tuning worker
RUN_TIMEOUT_S = 30.0  # per candidate measurement
MIN_REPEAT_MS = 20  # a candidate's timed calls last at least this long (TVM's 100 ms: 1 s a trial); GPU only
COLD_REPEATS = 10  # CPU: timed calls per candidate, each after its arguments were flushed from the caches
EVOLVE_MIN_TRIALS = 16  # below this many trials a task samples its design space at random:
# the evolutionary search costs seconds per round (population, cost model), more than 8 trials
UNTUNABLE = "untunable.json"  # in a database folder: tasks tried without any valid candidate


# ----------------------------------------------------------------------------- database
def default_db_dir(target: Target) -> Path:
    """~/.cache/mosc/tune/<target>/ ($MOSC_TUNE_DIR overrides the root).

    A target with "auto" settings (host) resolves to different CPUs on different
    machines; its folder carries the CPU name so their records never mix (the database
    matches workloads, not targets).
    """
    slug = target.name
    spec = target.tvm_target_spec
    if isinstance(spec, dict) and "auto" in spec.values():
        slug += "-" + str(target.resolved_spec().get("mcpu", "generic"))
    return env.tune_root() / slug


def open_database(db_dir: Path | str):
    """The JSON tuning database in `db_dir` (created empty if missing)."""
    from tvm.s_tir import meta_schedule as ms

    db_dir = Path(db_dir)
    db_dir.mkdir(parents=True, exist_ok=True)
    for name in DB_FILES:
        _drop_torn_tail(db_dir / name)
    return ms.database.JSONDatabase(
        path_workload=str(db_dir / "database_workload.json"),
        path_tuning_record=str(db_dir / "database_tuning_record.json"),
        module_equality=MODULE_EQUALITY,
    )


DB_FILES = ("database_workload.json", "database_tuning_record.json")
TIMING_FILE = "timing.json"  # in a database folder: how its CPU records were timed ({"cpu": CPU_TIMING})
CPU_TIMING = "cold"  # COLD_REPEATS single calls, arguments flushed first (see _evaluator_config)


def check_timing(db_dir: Path, target: Target) -> None:
    """Before records are timed into a CPU database: its records must have been timed alike.

    Records compare by their times (a build applies the fastest), so a database whose CPU
    records were timed warm, back to back (mosc before CPU timing went cold: no TIMING_FILE)
    cannot take cold-timed candidates: its warm records would always look faster and keep being
    applied. Refused with one line; an empty database gets the marker. GPU databases: no check.
    """
    if target.device_type() != "cpu":
        return
    from mosc.fileio import read_json

    path = db_dir / TIMING_FILE
    have = read_json(path, "tuning database timing marker").get("cpu") if path.is_file() else None
    if have == CPU_TIMING:
        return
    records = db_dir / DB_FILES[1]
    if have is None and not (records.is_file() and records.stat().st_size > 0):
        atomic_write_json(path, {"cpu": CPU_TIMING})
        return
    raise MoscError(f"tuning database {db_dir} holds CPU records timed {have or 'warm (before mosc timed candidates cold)'}, "
                    f"which new {CPU_TIMING}-timed candidates cannot be compared with: tune into a new --tune-db, or delete that folder")


def _drop_torn_tail(path: Path) -> None:
    """Cut a JSON-lines file back to its last complete line.

    MetaSchedule appends a line per record as it measures; a process killed mid-write leaves
    half a line, and the next process would append its first record onto it (both lost, or
    the file unreadable). The cut is written to a temp file and renamed over the old one.
    """
    if not path.is_file():
        return
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    from mosc.fileio import atomic_write_bytes

    atomic_write_bytes(path, data[: data.rfind(b"\n") + 1])


def database_id(db_dir: Path | str) -> dict:
    """Identity of a tuning database: its path, record count and one sha256 over the content of
    its workload and records files (what a build applies). Equal content, equal id, at any path."""
    h, records = hashlib.sha256(), 0
    for name in DB_FILES:
        path = Path(db_dir) / name
        data = path.read_bytes() if path.is_file() else b""
        h.update(f"{name}:{len(data)}:".encode() + data)
        if name == "database_tuning_record.json":
            records = data.count(b"\n")
    return {"path": str(db_dir), "records": records, "sha256": h.hexdigest() if records else None}


def same_database(a: dict, b: dict) -> bool:
    """Two database_id()s of the same content (the path does not matter)."""
    return (a.get("records"), a.get("sha256")) == (b.get("records"), b.get("sha256"))


def _task_key(task) -> str:
    return f"{task.task_name}:{workload_key(task.dispatched[0])}"


def _read_untunable(db_dir: Path) -> dict[str, str]:
    path = db_dir / UNTUNABLE
    return json.loads(path.read_text()) if path.is_file() else {}


def _remember_untunable(db_dir: Path, tasks: list) -> None:
    if tasks:
        atomic_write_json(db_dir / UNTUNABLE, {**_read_untunable(db_dir), **{_task_key(t): t.task_name for t in tasks}})


# ----------------------------------------------------------------------------- builders
def _import_tensor_intrinsics(tvm_target) -> None:
    """Import only the tensor intrinsics this target can use, before MetaSchedule imports all.

    TuneContext (in this process) and the stock builder (in each worker) run `import
    tvm.s_tir.tensor_intrin`, which takes ~16-24 s here: 12 s of it are CUDA intrinsics, 3.5 s
    ROCm, 1.4 s Hexagon. A CPU target needs x86 or arm_cpu only (~0.2 s / ~1.3 s). We register
    the package empty and import the submodules we need; a later import of another
    submodule (e.g. .cuda for a GPU target) still works.
    """
    import importlib
    import importlib.machinery
    import importlib.util

    import tvm.s_tir

    name = "tvm.s_tir.tensor_intrin"
    if name not in sys.modules:
        spec = importlib.util.find_spec(name)
        pkg = importlib.util.module_from_spec(importlib.machinery.ModuleSpec(name, None, is_package=True))
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules[name] = pkg
        tvm.s_tir.tensor_intrin = pkg
    if tvm_target.kind.name != "llvm":
        subs = [tvm_target.kind.name]  # cuda, rocm, metal
    elif "aarch64" in str(tvm_target.attrs.get("mtriple", "")) or "arm" in tvm_target.keys:
        subs = ["arm_cpu"]
    else:
        subs = ["x86"]
    for sub in subs:
        importlib.import_module(f"{name}.{sub}")


def _build_candidate(mod, target, _params=None):
    """Build one tuning candidate, without the stock builder's tensor_intrin import."""
    from tvm.tirx import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


def _fast_builder(max_workers: int, f_export=None):
    """A LocalBuilder whose workers skip `import tvm.s_tir.tensor_intrin` (TVM_NOTES.md).

    The stock default_build imports it in every fresh worker (~16 s, mostly CUDA
    intrinsics); CPU schedules from the default rules do not need it. Per-task overhead
    drops from ~20 s to ~3 s. `build` is defined locally so that cloudpickle ships it by
    value: the worker need not be able to import mosc.
    """
    from tvm.s_tir import meta_schedule as ms

    def build(mod, target, params):
        from tvm.tirx import build as tvm_build
        from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

        mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
        return tvm_build(mod, target=target)

    return ms.builder.LocalBuilder(
        max_workers=max_workers, timeout_sec=BUILD_TIMEOUT_S, f_build=build, f_export=f_export
    )


def _inprocess_builder(f_export=None):
    """A builder that compiles candidates in this process: no worker start-up per round.

    LocalBuilder starts a fresh process pool for every round (a known leak in long-lived
    workers), and each worker imports tvm (~2-3 s on a busy 2-core machine). Building in
    process saves that; the cost is no build timeout and no isolation from a crashing
    build (LLVM codegen of MetaSchedule candidates has not crashed here).
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.builder.local_builder import default_export

    export_fn = f_export or default_export

    @derived_object
    class _InProcessBuilder(ms.builder.PyBuilder):
        def build(self, build_inputs):
            results = []
            for inp in build_inputs:
                try:
                    path = export_fn(_build_candidate(inp.mod, inp.target))
                    results.append(ms.builder.BuilderResult(path, None))
                except Exception as e:  # a bad candidate is a result, not a failure of tuning
                    results.append(ms.builder.BuilderResult(None, f"in-process build: {e}"))
            return results

    return _InProcessBuilder()


def _cross_export(cross_compiler: str):
    """f_export for tuning workers of a cross target: a .so the device can dlopen."""

    def export(rt_mod):
        import os as _os
        import tempfile as _tempfile

        from tvm.support import cc

        path = _os.path.join(_tempfile.mkdtemp(), "tvm_tmp_mod.so")
        rt_mod.export_library(path, fcompile=cc.cross_compiler(cross_compiler))
        return path

    return export


def _default_builder(target: Target):
    """In-process or a worker pool ($MOSC_TUNE_BUILDER), exporting for the device when cross."""
    f_export = _cross_export(target.cross_compiler) if target.is_cross else None
    if env.tune_builder() == "inprocess":
        return _inprocess_builder(f_export)
    return _fast_builder(len(os.sched_getaffinity(0)), f_export)


# ----------------------------------------------------------------------------- runners
def check_tracker(target: Target, timeout_s: float = 5.0) -> int:
    """The number of devices registered under the target's key at its RPC tracker; MoscError
    (one line) unless the tracker answers like a tracker and at least one is registered:
    MetaSchedule's runner would otherwise wait forever (no such key) or fail every trial."""
    from mosc.rpc import device_count, registered_keys, tracker_summary

    host, port, key = target.rpc.tracker_host, target.rpc.tracker_port, target.rpc.key
    try:
        summary = tracker_summary(host, port, timeout_s)
        keys = registered_keys(summary)
    except ConnectionError as e:
        raise MoscError(f"tuning for {target.name} measures on the device, but {e}; start the tracker and the "
                        f"device's RPC server (key {key!r}), or compile with --no-tune") from None
    if key not in keys:
        raise MoscError(f"tuning for {target.name} measures on the device, but no device with key {key!r} is "
                        f"registered at the tracker {host}:{port} (registered: {', '.join(keys) or 'none'}); "
                        "start `mosc device serve --key ...` on it, or compile with --no-tune")
    return device_count(summary, key)


def rpc_runner(target: Target):
    """A MetaSchedule runner that measures on the target's devices through its RPC tracker: one
    worker per device registered under the key, so a farm of equal devices measures a round's
    candidates in parallel (the tracker hands each session a free device)."""
    from tvm.s_tir import meta_schedule as ms

    devices = check_tracker(target)
    config = ms.runner.RPCConfig(
        tracker_host=target.rpc.tracker_host,
        tracker_port=target.rpc.tracker_port,
        tracker_key=target.rpc.key,
        session_timeout_sec=int(RUN_TIMEOUT_S * 4),
    )
    return ms.runner.RPCRunner(rpc_config=config, evaluator_config=_evaluator_config(target), max_workers=max(1, devices),
                               f_alloc_argument=_alloc_arguments(remote=True))


def _alloc_arguments(remote: bool = False):
    """f_alloc_argument for MetaSchedule's runners: random floats, but integer tensors zeroed.

    The stock allocator fills every tensor with random bits. Integer inputs of mosc's kernels
    are token ids and positions: `take` reads the embedding at them without bounds checks
    (mode="fast"), so random ids crash the measurement and the task never gets a record.
    Zero is a valid id and position. Defined in a closure so cloudpickle ships it by value to
    runner workers, which need not import mosc.
    """

    def alloc_on(random_fill, device, args_info, alloc_repeat):
        import numpy as np
        from tvm.s_tir.meta_schedule.runner.utils import alloc_argument_common

        def fill(arg):
            if "int" in str(arg.dtype) or "bool" in str(arg.dtype):
                arg.copyfrom(np.zeros([int(d) for d in arg.shape], dtype=str(arg.dtype)))
            else:
                random_fill(arg)

        return alloc_argument_common(fill, device, args_info, alloc_repeat)

    def alloc_local(device, args_info, alloc_repeat):
        import tvm

        fill = tvm.get_global_func("tvm.contrib.random.random_fill_for_measure", True) or \
            tvm.get_global_func("tvm.contrib.random.random_fill")
        return alloc_on(fill, device, args_info, alloc_repeat)

    def alloc_remote(session, device, args_info, alloc_repeat):
        return alloc_on(session.get_function("tvm.contrib.random.random_fill"), device, args_info, alloc_repeat)

    return alloc_remote if remote else alloc_local


def _default_runner(target: Target):
    """On the device through its tracker when the target is remote, else in a local process."""
    from tvm.s_tir import meta_schedule as ms

    if target.needs_rpc:
        return rpc_runner(target)
    return ms.runner.LocalRunner(timeout_sec=RUN_TIMEOUT_S, f_alloc_argument=_alloc_arguments(),
                                 evaluator_config=_evaluator_config(target),
                                 f_run_evaluator=_run_on_threads(_target_threads(target)))


def _target_threads(target: Target) -> int:
    """Threads a local measurement uses: the target's num-cores (host: "auto" = the cores this
    process may use, so `taskset -c 0 mosc tune ...` tunes for 1 thread), else every core."""
    try:
        return max(1, int(target.tvm_target().attrs.get("num-cores", 0) or len(os.sched_getaffinity(0))))
    except (TypeError, ValueError):
        return len(os.sched_getaffinity(0))


def _run_on_threads(threads: int):
    """f_run_evaluator for the LocalRunner: MetaSchedule's own evaluator with the worker's TVM
    thread pool set to `threads` first. Without it a worker runs on every core whatever the
    target's num-cores says, so a num-cores=1 target's candidates (and its default schedules)
    were measured on 2 threads. Measured on bert-tiny (2 cores, one busy with another job):
    tuned at 2 threads, the recorded times were 1.2-1.8x the same kernels' 1-thread times and
    ranked them wrongly (a softmax record "faster" than its default ran 1.5x slower at 1 thread);
    tuned on 1 core they agreed within ~10%. Closure: cloudpickle ships it by value."""

    def run(rt_mod, device, evaluator_config, repeated_args):
        import tvm
        from tvm.s_tir.meta_schedule.runner.local_runner import default_run_evaluator

        tvm.get_global_func("runtime.config_threadpool")(1, threads)  # (affinity mode 1, threads)
        return default_run_evaluator(rt_mod, device, evaluator_config, repeated_args)

    return run


def _evaluator_config(target: Target):
    """How a candidate is timed. CPU: COLD_REPEATS single calls, each after its arguments
    (weights, caches, output; not the first input) were flushed from the caches.

    Why cold: in a model a decoder step reads each weight once, so it comes from L3 or DRAM, not
    from the L1/L2 that back-to-back calls leave it in. Timed warm, the tuner preferred register
    tiles that walk B in strided strips; in the model those kernels ran 3.5-6.6x slower per call
    than their recorded time (wmt, profile of session 4) and slower than the streaming default
    (mosc.compiler.schedules._stream_gemv). GPU: back-to-back calls for MIN_REPEAT_MS.
    """
    from tvm.s_tir import meta_schedule as ms

    if target.device_type() == "cpu":
        return ms.runner.EvaluatorConfig(number=1, repeat=COLD_REPEATS, min_repeat_ms=0, enable_cpu_cache_flush=True)
    return ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=MIN_REPEAT_MS, enable_cpu_cache_flush=False)


# ----------------------------------------------------------------------------- the default yardstick
def commit_default_schedules(tasks: list, target: Target, database, *, builder=None, runner=None) -> dict[str, float]:
    """Measure each task's default schedule (mosc.compiler.schedules.default_schedule) with the
    tuning builder and runner, and commit it to the database as a TuningRecord: its trace, its
    measured run_secs. Tasks that already have such a record are skipped.

    Why: a build applies a workload's best record, and nothing else compared a record with the
    default schedule the build would otherwise give (measured: bert-tiny tuned with 1,090 trials
    built 2.6x slower than default schedules; after a few trials a record is often 10-20x slower
    than the default). With the default's trace in the database, measured like the candidates,
    the best record is the default schedule whenever no candidate beat it, and the build
    (MetaScheduleApplyDatabase) replays that trace: the same code the FINISH pass would give.
    Returns {task name: default's mean time in us} of the tasks measured here; a default whose
    build or run fails is logged and not committed (its candidates then go unguarded). CPU
    targets only: a GPU build's fallback is dlight's schedule inside tvm.compile, which this
    does not reproduce (its records stay unguarded).
    """
    from tvm.s_tir import meta_schedule as ms

    from mosc.compiler.schedules import default_schedule

    if target.device_type() != "cpu":  # GPU builds get dlight's schedules in tvm.compile, not mosc's
        return {}
    tvm_target = target.tvm_target()
    todo = []
    for task in tasks:
        mod = task.dispatched[0]
        if split_records(database, mod)[1]:
            continue
        with tvm_target:
            sch, _rule = default_schedule(mod, tvm_target)
        if sch is None:  # no rule: the build leaves it naive; an unscheduled trace measures that
            from tvm import s_tir

            sch = s_tir.Schedule(mod)
        todo.append((task, sch))
    if not todo:
        return {}
    builder = builder if builder is not None else _default_builder(target)
    runner = runner if runner is not None else _default_runner(target)
    _import_tensor_intrinsics(tvm_target)
    built = builder.build([ms.builder.BuilderInput(sch.mod, tvm_target) for _, sch in todo])
    args = [ms.arg_info.ArgInfo.from_entry_func(sch.mod, remove_preproc=True) for _, sch in todo]
    ok = [i for i, b in enumerate(built) if b.error_msg is None]
    futures = runner.run([ms.runner.RunnerInput(built[i].artifact_path, "cpu", args[i]) for i in ok])
    measured = {}
    for i, fut in zip(ok, futures):
        res = fut.result()
        task, sch = todo[i]
        if res.error_msg is not None or not res.run_secs:
            log.warning("default schedule of %s could not be measured: %s", task.task_name,
                        " ".join(str(res.error_msg).split())[-600:])
            continue
        secs = [float(x) for x in res.run_secs]
        database.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, database.commit_workload(task.dispatched[0]), secs, tvm_target, args[i]))
        measured[task.task_name] = 1e6 * sum(secs) / len(secs)
    for i, b in enumerate(built):
        if b.error_msg is not None:
            log.warning("default schedule of %s did not build: %s", todo[i][0].task_name,
                        " ".join(str(b.error_msg).split())[:200])
        elif b.artifact_path and os.path.isfile(b.artifact_path):
            _remove_artifact(b.artifact_path)
    return measured


def _remove_artifact(path: str) -> None:
    """Builders export each candidate to a temp folder; MetaSchedule's runner removes them after
    measuring, a direct runner.run call does not."""
    import shutil

    shutil.rmtree(os.path.dirname(path), ignore_errors=True)


# ----------------------------------------------------------------------------- tuning
@dataclass
class TuneReport:
    db_dir: str
    tasks: int = 0  # distinct tuning tasks in the graphs
    cached: int = 0  # of which already had a record in the database
    tuned: int = 0  # of which were tuned in this call
    untried: int = 0  # of which got no trial (budget spent first): left unscheduled this time
    trials: int = 0  # candidates measured in this call
    untunable: int = 0  # tasks MetaSchedule cannot schedule (left unscheduled; see UNTUNABLE)
    seconds: float = 0.0
    task_names: list[str] = field(default_factory=list)


def _progress_callback(total: int, enabled: bool):
    """A MeasureCallback that counts trials (and their failures) per task, and shows
    measured/total on a rich progress bar (stderr) when enabled. Returns (callback, bar, state)."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    state = {"measured": 0, "task_ids": set(), "ok": 0, "first_error": None}
    bar, bar_task = _bar("tuning", total) if enabled else (None, None)

    @derived_object
    class _Progress(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            state["measured"] += len(measure_candidates)
            state["task_ids"].add(int(task_id))
            for b, r in zip(builder_results, runner_results):  # a failed run still counts as a trial
                err = b.error_msg or r.error_msg
                if err is None:
                    state["ok"] += 1
                elif state["first_error"] is None:
                    state["first_error"] = " ".join(str(err).split())[:300]
            if bar is not None:
                name = task_scheduler.tasks_[task_id].ctx.task_name
                bar.update(bar_task, completed=min(state["measured"], total), description=name)

    return _Progress(), bar, state


def _extract_tasks(mods: list, target: Target) -> list[tuple[Any, float]]:
    """Distinct tuning tasks over several graphs, with weights summed over the graphs."""
    from tvm.s_tir import meta_schedule as ms

    tasks: dict[str, list] = {}  # workload key -> [task, weight]
    for mod in mods:
        for task in ms.relax_integration.extract_tasks(mod, target.tvm_target(), module_equality=MODULE_EQUALITY):
            key = workload_key(task.dispatched[0])
            if key in tasks:
                tasks[key][1] += task.weight
            else:
                tasks[key] = [task, task.weight]
    return [tuple(v) for v in tasks.values()]


def tune(
    mods,
    target: Target | str,
    db_dir: Path | str | None = None,
    trials: int = DEFAULT_TRIALS,
    *,
    trials_per_task: int = TRIALS_PER_TASK,
    runner=None,
    progress: bool | None = None,
    seed: int | None = 0,
) -> TuneReport:
    """Tune the graphs' TIR tasks that the target's database lacks; add the records to it.

    mods: one imported IRModule or a list (the graphs of one model share one budget).
    trials: global trial budget of this call; tasks already in the database cost none.
    runner: a MetaSchedule runner; default: local for a target on this machine, the
    target's RPC tracker otherwise (needs_rpc). progress: rich bar on stderr (default: if a tty).
    """
    target = as_target(target)
    db_dir = Path(db_dir) if db_dir is not None else default_db_dir(target)
    mods = mods if isinstance(mods, list | tuple) else [mods]
    report = TuneReport(db_dir=str(db_dir))
    t0 = time.perf_counter()
    database = open_database(db_dir)
    todo = _new_tasks(mods, target, database, db_dir, report)
    if todo and trials > 0:
        check_timing(db_dir, target)
        _tune_tasks(todo, target, database, db_dir, report, trials=trials, trials_per_task=trials_per_task,
                    runner=runner if runner is not None else _default_runner(target),
                    progress=sys.stderr.isatty() if progress is None else progress, seed=seed)
    else:
        report.untried = len(todo)
    report.seconds = time.perf_counter() - t0
    return report


def _new_tasks(mods: list, target: Target, database, db_dir: Path, report: TuneReport) -> list[tuple[Any, float]]:
    """The (task, weight)s of the graphs that have no tuned record (a default-schedule record
    alone does not count) and are not known untunable; counts all of them into the report."""
    all_tasks = _extract_tasks([run_passes(m, target, PREPARE) for m in mods], target)
    untunable = _read_untunable(db_dir)
    known_bad = [(task, w) for task, w in all_tasks if _task_key(task) in untunable]
    todo = [
        (task, w) for task, w in all_tasks
        if _task_key(task) not in untunable and not split_records(database, task.dispatched[0])[0]
    ]
    report.tasks, report.untunable = len(all_tasks), len(known_bad)
    report.cached = len(all_tasks) - len(todo) - len(known_bad)
    report.task_names = [t.task_name for t, _ in todo]
    return todo


def _tune_tasks(todo, target: Target, database, db_dir: Path, report: TuneReport, *,
                trials: int, trials_per_task: int, runner, progress: bool, seed: int | None) -> None:
    """Run MetaSchedule on `todo` and record the outcome (tuned, untried, untunable) in the report."""
    from tvm.s_tir import meta_schedule as ms

    tvm_target = target.tvm_target()
    builder = _default_builder(target)
    _import_tensor_intrinsics(tvm_target)
    per_round = _trials_per_round(trials, len(todo))
    def make_contexts(tasks, template_only=frozenset()):
        return _tune_contexts(tasks, tvm_target, db_dir, seed, min(trials, trials_per_task), template_only)

    contexts = make_contexts(todo)
    todo, contexts = _drop_unschedulable(todo, contexts, db_dir, report, make_contexts)
    if not todo:
        return
    # the yardstick first: each task's default schedule, measured like its candidates, as a record
    commit_default_schedules([t for t, _ in todo], target, database, builder=builder, runner=runner)
    callback, bar, state = _progress_callback(min(trials, trials_per_task * len(todo)), progress)
    try:
        ms.tune.tune_tasks(
            tasks=contexts,
            task_weights=[w for _, w in todo],
            work_dir=str(db_dir),  # per-task logs go to db_dir/logs/, next to the database
            max_trials_global=trials,
            max_trials_per_task=trials_per_task,
            num_trials_per_iter=per_round,
            builder=builder,
            runner=runner,
            database=database,
            measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), callback],
            module_equality=MODULE_EQUALITY,
        )
    finally:
        if bar is not None:
            bar.stop()
    _record_outcome(state, todo, target, database, db_dir, report)


def _trials_per_round(trials: int, n_tasks: int) -> int:
    # Spread the budget so that every task gets a round when it can (a task without a record
    # stays unscheduled, and slow): at most TRIALS_PER_ITER per round, at least 2. With fewer
    # than 2 trials per new task some tasks get none: the report counts them as `untried`.
    # Not 1 per round: tried on a tiny subnet (53 tasks), 64 trials at 1 per round touched all
    # of them and ran 1.9x slower (16.5 ms) than 32 trials at 2 per round (8.7 ms, 32 tasks
    # left unscheduled): one random schedule is often worse than none.
    return max(2, min(TRIALS_PER_ITER, trials // n_tasks))


def _tune_contexts(todo, tvm_target, db_dir: Path, seed: int | None, trials_per_task: int = TRIALS_PER_TASK,
                   template_only: frozenset = frozenset()) -> list:
    """One MetaSchedule TuneContext per task, logging to db_dir/logs/.

    Design space: mosc's matmul template united with MetaSchedule's default (schedules.py);
    tasks in `template_only` (by index: the default space cannot be generated for them) get
    the template alone. Search: evolutionary, or random sampling of the space for budgets
    under EVOLVE_MIN_TRIALS per task.
    """
    from tvm.s_tir import meta_schedule as ms

    from mosc.compiler.schedules import space_generator

    num_cores = int(tvm_target.attrs.get("num-cores", 0) or len(os.sched_getaffinity(0)))
    loggers = _task_loggers(db_dir, [t.task_name for t, _ in todo])

    def strategy():
        if trials_per_task < EVOLVE_MIN_TRIALS:
            return ms.search_strategy.ReplayTrace()
        return ms.search_strategy.EvolutionarySearch(population_size=env.tune_search_population())

    return [
        ms.TuneContext(
            mod=task.dispatched[0], target=task.target,
            space_generator=space_generator(task.target, default_space=i not in template_only),
            search_strategy=strategy(), task_name=task.task_name, logger=logger,
            rand_state=rand, num_threads=num_cores,
        ).clone()
        for i, ((task, _), logger, rand) in enumerate(zip(todo, loggers, ms.utils.fork_seed(seed, n=len(todo))))
    ]


def _task_loggers(db_dir: Path, names: list[str]) -> list:
    """MetaSchedule's per-task file loggers in db_dir/logs/, its console kept at WARNING.

    MetaSchedule re-runs logging.config.dictConfig naming every handler of its logger; a
    handler someone else attached (pytest's log capture, an application's) has no name there
    and makes it fail, so those are set aside for the call and put back after.
    """
    from tvm.s_tir import meta_schedule as ms

    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    # its console handler takes the level this logger has when the loggers are created
    ms_logger.setLevel(logging.WARNING)
    foreign = [h for h in ms_logger.handlers if not (h.get_name() or "").startswith("tvm.s_tir.meta_schedule")]
    for h in foreign:
        ms_logger.removeHandler(h)
    try:
        return ms.logging.get_loggers_from_work_dir(str(db_dir), names)
    finally:
        for h in foreign:
            ms_logger.addHandler(h)


def _drop_unschedulable(todo, contexts, db_dir: Path, report: TuneReport, make_contexts) -> tuple[list, list]:
    """(todo, contexts) without the tasks whose design space cannot be generated; remembers them.

    Such a task raises out of tune_tasks and kills the whole run (seen: a matmul fused with
    the decoder's `slots > pos` mask, where MultiLevelTiling's reverse_compute_at fails on the
    mask's second producer). Generating the space costs ~5 ms a task, so try it first; a task
    whose default space fails is tried with mosc's matmul template alone before it is dropped.
    """
    broken = [i for i, ctx in enumerate(contexts) if not _space_ok(ctx)]
    if not broken:
        return todo, contexts
    retry = make_contexts([todo[i] for i in broken], frozenset(range(len(broken))))
    contexts = list(contexts)
    for i, ctx in zip(broken, retry):
        contexts[i] = ctx
    broken = {i for i, ctx in zip(broken, retry) if not _space_ok(ctx)}
    if not broken:
        return todo, contexts
    _remember_untunable(db_dir, [todo[i][0] for i in sorted(broken)])
    keep = [i for i in range(len(todo)) if i not in broken]
    report.untunable += len(broken)
    report.task_names = [todo[i][0].task_name for i in keep]
    return [todo[i] for i in keep], [contexts[i] for i in keep]


def _space_ok(ctx) -> bool:
    try:
        return len(ctx.generate_design_space()) > 0
    except Exception:  # TVM raises its own error types (ScheduleError, TVMError)
        return False


def _record_outcome(state: dict, todo, target: Target, database, db_dir: Path, report: TuneReport) -> None:
    """Count the trials and tuned tasks into the report; remember measured tasks left without a record."""
    report.trials = state["measured"]
    if state["measured"] and not state["ok"]:
        # Not one candidate ran: the device (or the local runner) is broken, not the tasks.
        # Blacklisting them would make every later compile skip them even once it works.
        raise MoscError(f"every one of {state['measured']} tuning trials failed on {target.name} "
                        f"(first error: {state['first_error']}); nothing was recorded; check the device "
                        f"(`mosc device list`) or compile with --no-tune")
    # Tasks that were measured and still have no record would be retried by every compile:
    # remember them. Here that is the embedding `take` (mode="fast": no bounds check), most
    # likely because MetaSchedule's runner feeds it random, out-of-range indices.
    failed = [todo[i][0] for i in state["task_ids"] if not split_records(database, todo[i][0].dispatched[0])[0]]
    _remember_untunable(db_dir, failed)
    report.tuned = len(state["task_ids"]) - len(failed)
    report.untunable += len(failed)
    report.untried = len(todo) - len(state["task_ids"])


# ----------------------------------------------------------------------------- a whole space
@dataclass
class _Task:
    """What _tune_tasks needs of a task, for a workload read back from a space file."""

    task_name: str
    dispatched: list
    target: Any


@dataclass
class SpaceTuneReport:
    db_dir: str
    workloads: int = 0  # in the space
    with_record: int = 0  # of which have a valid record after this call
    trials: int = 0  # candidates measured in this call
    trials_total: int = 0  # records in the database for the space's workloads, all calls together
    untunable: int = 0  # workloads with no valid candidate (they build with a default schedule)
    budget_left: bool = False  # stopped by --budget-min before every workload got its trials
    defaults: int = 0  # default schedules measured and recorded in this call (the guard; see commit_default_schedules)
    seconds: float = 0.0


def tune_space(space, target: Target | str, db_dir: Path | str | None = None, *, trials: int,
               budget_s: float | None = None, runner=None, progress: bool | None = None,
               seed: int | None = 0) -> SpaceTuneReport:
    """Tune every workload of a space file (mosc.compiler.workloads.SpaceFile) into the target's database.

    trials: the space's total budget, split by `allot` (MIN_TRIALS each first, then by share of
    latency). Resumable by construction: what a workload has already spent is counted from
    the database's records, so a killed run continues where it stopped. budget_s: stop starting
    new workloads after this many seconds (a later call goes on).
    """
    from mosc.compiler.workloads import MIN_TRIALS, allot, coverage

    target = as_target(target)
    db_dir = Path(db_dir) if db_dir is not None else default_db_dir(target)
    report = SpaceTuneReport(db_dir=str(db_dir), workloads=len(space.workloads))
    t0 = time.perf_counter()
    database = open_database(db_dir)
    check_timing(db_dir, target)
    untunable = _read_untunable(db_dir)
    tvm_target = target.tvm_target()
    goal = allot(space.workloads, trials)
    spent = {c.key: c.trials for c in coverage(database, target, space.workloads)}
    # Coverage first: every workload gets its first MIN_TRIALS, then the heavy ones the rest.
    order = sorted(space.workloads, key=lambda k: -space.workloads[k].cost)
    plan = [(k, min(MIN_TRIALS, goal[k])) for k in order] + [(k, goal[k]) for k in order]
    plan = [(k, n) for k, n in plan if n > spent.get(k, 0)]
    tasks = {k: _Task(w.name, [w.ir_module], tvm_target) for k, w in space.workloads.items()}
    todo_total = sum(max(0, goal[k] - spent.get(k, 0)) for k in space.workloads)
    show = sys.stderr.isatty() if progress is None else progress
    bar, bar_task = _bar("tuning the space", todo_total) if show else (None, None)
    guard = [t for t in tasks.values() if _task_key(t) not in untunable and not split_records(database, t.dispatched[0])[1]]
    runner = runner if runner is not None else (_default_runner(target) if plan or guard else None)
    # every workload's default schedule first, measured and recorded (a database tuned before
    # this guard existed gets them now): no build applies a record slower than its default
    report.defaults = len(commit_default_schedules(guard, target, database, runner=runner)) if guard else 0
    failed_in_a_row = 0
    try:
        for key, want in plan:
            if budget_s is not None and time.perf_counter() - t0 > budget_s:
                report.budget_left = True
                break
            have = spent.get(key, 0)
            if want <= have or _task_key(tasks[key]) in untunable:
                continue
            if bar is not None:
                bar.update(bar_task, description=f"{tasks[key].task_name} ({have}/{goal[key]})")
            one = TuneReport(db_dir=str(db_dir))
            try:
                _tune_tasks([(tasks[key], 1.0)], target, database, db_dir, one, trials=want - have,
                            trials_per_task=want - have, runner=runner, progress=False, seed=seed)
                failed_in_a_row = 0
            except MoscError:  # every candidate of this one workload failed: remember, go on
                _remember_untunable(db_dir, [tasks[key]])
                untunable = _read_untunable(db_dir)
                failed_in_a_row += 1
                if failed_in_a_row >= 3 and report.trials == 0:
                    raise MoscError(f"every trial of the first {failed_in_a_row} workloads failed on {target.name}; "
                                    "check the device (`mosc device list`)") from None
            report.trials += one.trials
            spent[key] = have + one.trials
            if bar is not None:
                bar.update(bar_task, advance=one.trials)
    finally:
        if bar is not None:
            bar.stop()
    cov = coverage(database, target, space.workloads)
    report.with_record = sum(c.best_us is not None for c in cov)
    report.trials_total = sum(c.trials for c in cov)
    report.untunable = sum(_task_key(t) in untunable for t in tasks.values())
    report.seconds = time.perf_counter() - t0
    return report


def _bar(label: str, total: int):
    """A started rich progress bar (stderr, removed when done): (bar, its task)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.description}"), transient=True)
    task = bar.add_task("", total=max(total, 1))
    bar.start()
    return bar, task

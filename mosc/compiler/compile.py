"""ONNX graphs -> tuned TVM libraries -> an artifact folder a device can run.

    import_onnx   ONNX file -> Relax IRModule (static shapes, weights as constants)
    tune          MetaSchedule against a persistent per-target database (JSON, in a folder)
    build         prepare + apply the database + FoldConstant + tvm.compile -> Executable
    compile_artifact   the above for every graph of a model, written as a folder:
                  one <graph>.so per graph + manifest.json (signatures, versions, sha256s)
    load_artifact verify every sha256, then load each .so into a Relax VM (local or RPC)

The Relax pipeline is the named pass list PREPARE (before tuning: the tuning tasks are
the fused TIR functions it produces) followed by FINISH (after tuning). `tvm.compile`
then lowers what is left with TVM's default pipeline for the target.

Why tuning matters: `tvm.compile` applies no schedule to CPU code (legalize + lower only),
so an untuned CPU build is ~100x slower than onnxruntime. The tuning database is keyed by
TIR workload, so it is shared by every model compiled for a target: tasks that already
have a record are not tuned again (a second, similar model costs few or no trials).

This module does not know about torch, the model, or how latency is measured (the device
world times artifacts through the same VM calls `Artifact.run` uses). It imports tvm only
inside functions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mosc import env
from mosc.errors import MoscError
from mosc.fileio import atomic_write_json, sha256_file, verify_files
from mosc.compiler.targets import Target, load_target

# ----------------------------------------------------------------------------- settings
DEFAULT_TRIALS = 256  # global trial budget of one compile; ~300 took a d=512 model to torch speed
TRIALS_PER_TASK = 64  # cap per task: matmuls keep improving, small ops exhaust their space at 1
TRIALS_PER_ITER = 32  # candidates built+measured per round (TVM's 64 is coarse for small budgets)
MODULE_EQUALITY = "structural"  # how the database matches workloads across models
BUILD_TIMEOUT_S = 60.0  # per candidate build in a tuning worker
RUN_TIMEOUT_S = 30.0  # per candidate measurement
MANIFEST = "manifest.json"
ARTIFACT_FORMAT = "mosc-artifact/1"


# ----------------------------------------------------------------------------- pipeline
def _relax():
    from tvm import relax  # lazy: importing tvm costs ~2 s

    return relax


# (name, pass factory) pairs, applied in order under the target. Factories, not passes,
# so that listing the pipeline does not import tvm.
PREPARE: list[tuple[str, Callable[[], Any]]] = [
    # batch_norm/layer_norm/... into primitive ops with their inference semantics
    ("decompose_ops_for_inference", lambda: _relax().transform.DecomposeOpsForInference()),
    ("canonicalize_bindings", lambda: _relax().transform.CanonicalizeBindings()),
    # legalize (Relax ops -> TIR), fold constants, fuse: the fused TIR funcs are the tuning tasks
    ("legalize_ops", lambda: _relax().transform.LegalizeOps()),
    ("annotate_tir_op_pattern", lambda: _relax().transform.AnnotateTIROpPattern()),
    ("fold_constant", lambda: _relax().transform.FoldConstant()),
    ("fuse_ops", lambda: _relax().transform.FuseOps()),
    ("fuse_tir", lambda: _relax().transform.FuseTIR()),
]
FINISH: list[tuple[str, Callable[[], Any]]] = [
    # replace each TIR function by its best schedule in Database.current() (untuned stay naive)
    ("apply_database", lambda: _relax().transform.MetaScheduleApplyDatabase(enable_warning=False)),
    # again: scheduled functions on constant weights (e.g. the transposes of W) fold now;
    # without this they run on every call (+1.6 ms on a d=512 model)
    ("fold_constant_after_tuning", lambda: _relax().transform.FoldConstant()),
]


def run_passes(mod, target: Target, passes: list[tuple[str, Callable[[], Any]]]):
    """Apply named passes in order, with `target` current (legalization is target-aware)."""
    with target.tvm_target(), _drop_known_tvm_noise():
        for name, factory in passes:
            try:
                mod = factory()(mod)
            except Exception as e:  # name the pass: TVM's tracebacks do not
                raise MoscError(f"pass {name!r} failed: {str(e).splitlines()[0]}") from e
    return mod


def _as_target(target: Target | str) -> Target:
    return target if isinstance(target, Target) else load_target(target)


# ----------------------------------------------------------------------------- import
def _onnx_dtype(elem_type: int) -> str:
    import onnx

    return str(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def onnx_inputs(path: Path | str) -> dict[str, tuple[list[int | str], str]]:
    """Graph inputs of an ONNX file: name -> (shape with symbolic dims as names, dtype)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}  # old exporters list weights as inputs
    out = {}
    for i in model.graph.input:
        if i.name in inits:
            continue
        t = i.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
        out[i.name] = (dims, _onnx_dtype(t.elem_type))
    return out


def import_onnx(path: Path | str, shape_dict: dict[str, list[int]] | None = None):
    """ONNX file -> Relax IRModule with static shapes and weights as constants.

    shape_dict pins symbolic dimensions (name -> full shape); inputs left out must already
    be static in the file. Static shapes are what edge deployment uses (fixed source
    length, fixed-size KV cache) and what MetaSchedule tunes.
    """
    import onnx
    from tvm.relax.frontend.onnx import from_onnx

    path = Path(path)
    if not path.is_file():
        raise MoscError(f"no ONNX file at {path}")
    shapes = {}
    for name, (dims, _) in onnx_inputs(path).items():
        shape = list((shape_dict or {}).get(name, dims))
        if not all(isinstance(d, int) and d > 0 for d in shape):
            raise MoscError(f"{path.name}: input {name!r} has dynamic shape {shape}; pass a static shape")
        shapes[name] = shape
    unknown = set(shape_dict or {}) - set(shapes)
    if unknown:
        raise MoscError(f"{path.name}: shape_dict names unknown input(s) {sorted(unknown)}; inputs: {sorted(shapes)}")
    model = onnx.load(str(path))  # with external data: weights become constants
    return from_onnx(model, shape_dict=shapes, keep_params_in_input=False)


def signature(mod, path: Path | str) -> dict[str, list[dict]]:
    """Input/output names, shapes, dtypes of an imported graph (names from ONNX, types from Relax)."""
    import onnx

    # TVM 0.27 types: Var.ty / Function.ret_ty (TensorType, TupleType); no struct_info
    def tensor(name, ty):
        return {"name": name, "shape": [int(d) for d in ty.shape.values], "dtype": str(ty.dtype)}

    func = mod["main"]
    inputs = [tensor(p.name, p.ty) for p in func.params]
    ret = func.ret_ty
    rets = list(ret.fields) if hasattr(ret, "fields") else [ret]
    names = [o.name for o in onnx.load(str(path), load_external_data=False).graph.output]
    if len(names) != len(rets):  # should not happen; keep positional names rather than fail
        names = [f"output{i}" for i in range(len(rets))]
    outputs = [tensor(n, r) for n, r in zip(names, rets)]
    return {"inputs": inputs, "outputs": outputs}


# ----------------------------------------------------------------------------- tuning
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
    return ms.database.JSONDatabase(
        path_workload=str(db_dir / "database_workload.json"),
        path_tuning_record=str(db_dir / "database_tuning_record.json"),
        module_equality=MODULE_EQUALITY,
    )


def database_id(db_dir: Path | str) -> dict:
    """Identity of a tuning database: its path, record count and sha256 of its records file."""
    records = Path(db_dir) / "database_tuning_record.json"
    if not records.is_file():
        return {"path": str(db_dir), "records": 0, "sha256": None}
    data = records.read_bytes()
    return {"path": str(db_dir), "records": data.count(b"\n"), "sha256": hashlib.sha256(data).hexdigest()}


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


def check_tracker(target: Target, timeout_s: float = 5.0) -> None:
    """MoscError (one line) unless the target's RPC tracker answers like a tracker and a device
    with the target's key is registered: MetaSchedule's runner would otherwise wait forever
    (no such key) or fail every trial (no tracker)."""
    from mosc.rpc import registered_keys, tracker_summary

    host, port, key = target.rpc.tracker_host, target.rpc.tracker_port, target.rpc.key
    try:
        keys = registered_keys(tracker_summary(host, port, timeout_s))
    except ConnectionError as e:
        raise MoscError(f"tuning for {target.name} measures on the device, but {e}; start the tracker and the "
                        f"device's RPC server (key {key!r}), or compile with --no-tune") from None
    if key not in keys:
        raise MoscError(f"tuning for {target.name} measures on the device, but no device with key {key!r} is "
                        f"registered at the tracker {host}:{port} (registered: {', '.join(keys) or 'none'}); "
                        "start `mosc device serve --key ...` on it, or compile with --no-tune")


def rpc_runner(target: Target):
    """A MetaSchedule runner that measures on the target's device through its RPC tracker."""
    from tvm.s_tir import meta_schedule as ms

    check_tracker(target)

    config = ms.runner.RPCConfig(
        tracker_host=target.rpc.tracker_host,
        tracker_port=target.rpc.tracker_port,
        tracker_key=target.rpc.key,
        session_timeout_sec=int(RUN_TIMEOUT_S * 4),
    )
    return ms.runner.RPCRunner(rpc_config=config, max_workers=1)


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
    """A MeasureCallback that shows measured/total on a rich progress bar (stderr)."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    state = {"measured": 0, "task_ids": set(), "ok": 0, "first_error": None}
    bar = None
    if enabled:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(TextColumn("tuning"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       TextColumn("{task.description}"), transient=True)
        bar_task = bar.add_task("", total=total)

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


UNTUNABLE = "untunable.json"  # in a database folder: tasks tried without any valid candidate


def _task_key(task) -> str:
    import tvm_ffi

    return f"{task.task_name}:{tvm_ffi.structural_hash(task.dispatched[0]) & 0xFFFFFFFFFFFFFFFF:016x}"


def _read_untunable(db_dir: Path) -> dict[str, str]:
    path = db_dir / UNTUNABLE
    return json.loads(path.read_text()) if path.is_file() else {}


def _extract_tasks(mods: list, target: Target) -> list[tuple[Any, float]]:
    """Distinct tuning tasks over several graphs, with weights summed over the graphs."""
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    tasks: dict[int, list] = {}  # structural hash -> [task, weight]
    for mod in mods:
        for task in ms.relax_integration.extract_tasks(mod, target.tvm_target(), module_equality=MODULE_EQUALITY):
            key = tvm_ffi.structural_hash(task.dispatched[0])
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
    runner: a MetaSchedule runner; default: local for a non-cross CPU target, the
    target's RPC tracker otherwise. progress: rich bar on stderr (default: if a tty).
    """
    from tvm.s_tir import meta_schedule as ms

    target = _as_target(target)
    db_dir = Path(db_dir) if db_dir is not None else default_db_dir(target)
    mods = mods if isinstance(mods, list | tuple) else [mods]
    report = TuneReport(db_dir=str(db_dir))
    t0 = time.perf_counter()

    tvm_target = target.tvm_target()
    prepared = [run_passes(m, target, PREPARE) for m in mods]
    database = open_database(db_dir)
    all_tasks = _extract_tasks(prepared, target)
    untunable = _read_untunable(db_dir)
    known_bad = [(task, w) for task, w in all_tasks if _task_key(task) in untunable]
    todo = [
        (task, w) for task, w in all_tasks
        if _task_key(task) not in untunable
        and database.query_tuning_record(task.dispatched[0], tvm_target, task.task_name) is None
    ]
    report.tasks, report.untunable = len(all_tasks), len(known_bad)
    report.cached = len(all_tasks) - len(todo) - len(known_bad)
    report.task_names = [t.task_name for t, _ in todo]
    if not todo or trials <= 0:
        report.untried = len(todo)
        report.seconds = time.perf_counter() - t0
        return report

    if runner is None:
        if target.is_cross or tvm_target.kind.name != "llvm":
            runner = rpc_runner(target)
        else:
            runner = ms.runner.LocalRunner(timeout_sec=RUN_TIMEOUT_S)
    _import_tensor_intrinsics(tvm_target)
    num_cores = int(tvm_target.attrs.get("num-cores", 0) or len(os.sched_getaffinity(0)))
    # Spread the budget so that every task gets a round when it can (a task without a record
    # stays unscheduled, and slow): at most TRIALS_PER_ITER per round, at least 2. With fewer
    # than 2 trials per new task some tasks get none: the report counts them as `untried`.
    # Not 1 per round: tried on a tiny subnet (53 tasks), 64 trials at 1 per round touched all
    # of them and ran 1.9x slower (16.5 ms) than 32 trials at 2 per round (8.7 ms, 32 tasks
    # left unscheduled): one random schedule is often worse than none.
    per_iter = max(2, min(TRIALS_PER_ITER, trials // len(todo)))
    f_export = _cross_export(target.cross_compiler) if target.is_cross else None
    if env.tune_builder() == "inprocess":
        builder = _inprocess_builder(f_export)
    else:
        builder = _fast_builder(len(os.sched_getaffinity(0)), f_export)

    work_dir = db_dir  # MetaSchedule's per-task logs go to db_dir/logs/, next to the database
    # MetaSchedule prints a task table per round to stdout at INFO. Its console handler takes
    # the level this logger has when the loggers are created; the files in logs/ keep it all.
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    loggers = ms.logging.get_loggers_from_work_dir(str(work_dir), [t.task_name for t, _ in todo])
    contexts = [
        ms.TuneContext(
            mod=task.dispatched[0], target=task.target, space_generator="post-order-apply",
            search_strategy=ms.search_strategy.EvolutionarySearch(population_size=env.tune_search_population()),
            task_name=task.task_name, logger=logger,
            rand_state=rand, num_threads=num_cores,
        ).clone()
        for (task, _), logger, rand in zip(todo, loggers, ms.utils.fork_seed(seed, n=len(todo)))
    ]
    # A task whose design space cannot be generated raises out of tune_tasks and kills the whole
    # run (seen: a matmul fused with the decoder's `slots > pos` mask, where MultiLevelTiling's
    # reverse_compute_at fails on the mask's second producer). Generating the space costs ~5 ms
    # a task: try it first, leave such tasks unscheduled and remember them.
    broken = {}
    for i, ctx in enumerate(contexts):
        try:
            ctx.generate_design_space()
        except Exception as e:  # TVM raises its own error types (ScheduleError, TVMError)
            broken[i] = str(e).splitlines()[0][:200]
    if broken:
        atomic_write_json(db_dir / UNTUNABLE, {**_read_untunable(db_dir),
                                                **{_task_key(todo[i][0]): todo[i][0].task_name for i in broken}})
        keep = [i for i in range(len(todo)) if i not in broken]
        todo, contexts = [todo[i] for i in keep], [contexts[i] for i in keep]
        report.untunable += len(broken)
        report.task_names = [t.task_name for t, _ in todo]
        if not todo:
            report.seconds = time.perf_counter() - t0
            return report
    weights = [w for _, w in todo]
    progress = sys.stderr.isatty() if progress is None else progress
    callback, bar, state = _progress_callback(min(trials, trials_per_task * len(contexts)), progress)

    try:
        if bar is not None:
            bar.start()
        ms.tune.tune_tasks(
            tasks=contexts,
            task_weights=weights,
            work_dir=str(work_dir),
            max_trials_global=trials,
            max_trials_per_task=trials_per_task,
            num_trials_per_iter=per_iter,
            builder=builder,
            runner=runner,
            database=database,
            measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), callback],
            module_equality=MODULE_EQUALITY,
        )
    finally:
        if bar is not None:
            bar.stop()
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
    failed = {
        _task_key(todo[i][0]): todo[i][0].task_name for i in state["task_ids"]
        if database.query_tuning_record(todo[i][0].dispatched[0], tvm_target, todo[i][0].task_name) is None
    }
    if failed:
        atomic_write_json(db_dir / UNTUNABLE, {**_read_untunable(db_dir), **failed})
    report.tuned = len(state["task_ids"]) - len(failed)
    report.untunable += len(failed)
    report.untried = len(todo) - len(state["task_ids"])
    report.seconds = time.perf_counter() - t0
    return report


_tune = tune  # compile_artifact's `tune` flag shadows the function's name there


# ----------------------------------------------------------------------------- build
def build(mod, target: Target | str, db_dir: Path | str | None = None, *, use_database: bool = True):
    """Imported IRModule -> tvm Executable: PREPARE, FINISH with the target's database, compile.

    With no database (or use_database=False) CPU code stays unscheduled (slow but correct);
    GPU targets still get TVM's default dlight schedules in tvm.compile.
    """
    import tvm

    target = _as_target(target)
    db_dir = Path(db_dir) if db_dir is not None else default_db_dir(target)
    mod = run_passes(mod, target, PREPARE)
    has_db = use_database and (db_dir / "database_tuning_record.json").is_file()
    if has_db:
        with open_database(db_dir):
            mod = run_passes(mod, target, FINISH)
    else:
        mod = run_passes(mod, target, [p for p in FINISH if p[0] != "apply_database"])
    try:
        with _drop_known_tvm_noise():
            return tvm.compile(mod, target=target.tvm_target())
    except Exception as e:
        raise MoscError(f"tvm.compile for {target.name} failed: {str(e).splitlines()[0]}") from e


# C++ warnings TVM prints to stderr on every build that say nothing actionable here: the
# ONNX Gather of the embedding lowers to `take(mode="fast")`, whose token ids are in range.
KNOWN_TVM_NOISE = ("Fast mode segfaults when there are out-of-bounds indices",)


@contextlib.contextmanager
def _drop_known_tvm_noise():
    """Route the process's stderr (fd 2, where TVM's C++ logs go) through a temp file for the
    duration, then replay every line except KNOWN_TVM_NOISE."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode(errors="replace").splitlines(keepends=True):
                if not any(noise in line for noise in KNOWN_TVM_NOISE):
                    sys.stderr.write(line)


def cuda_kernels(ex) -> str | None:
    """How an executable ships its CUDA kernels: "source", "binary", or None (no CUDA).

    TVM 0.27's tvm.compile keeps CUDA *source* in the library, even where nvcc exists and
    TVM_CUDA_COMPILE_MODE=nvcc is set (checked here: the build never calls the
    `tvm_callback_cuda_compile` hook). The TVM runtime on the GPU host compiles it when
    the library is loaded (NVRTC), so the first load there is slower.
    """
    stack = [ex.mod]
    while stack:
        m = stack.pop()
        if m.kind == "cuda":
            src = m.inspect_source("")
            return "source" if "__global__" in src else "binary"
        stack.extend(m.imports)
    return None


# apt packages that provide a cross compiler named in a target file
CROSS_PACKAGES = {"aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu g++-aarch64-linux-gnu",
                  "aarch64-linux-gnu-g++": "gcc-aarch64-linux-gnu g++-aarch64-linux-gnu"}


def require_cross_compiler(target: Target | str) -> None:
    """MoscError naming the apt package when the target's cross compiler is not on PATH."""
    target = _as_target(target)
    cc_name = target.cross_compiler
    if cc_name and not shutil.which(cc_name):
        pkg = CROSS_PACKAGES.get(cc_name)
        hint = f"apt-get install {pkg}" if pkg else "install it or fix cross_compiler in the target file"
        raise MoscError(f"cross compiler {cc_name!r} for target {target.name} not found on PATH ({hint})")


def export(ex, path: Path | str, target: Target | str) -> Path:
    """Executable -> shared library at `path` (cross-compiled where the target says so)."""
    from tvm.support import cc

    target = _as_target(target)
    path = Path(path)
    kwargs = {}
    if target.cross_compiler:
        require_cross_compiler(target)
        kwargs["fcompile"] = cc.cross_compiler(target.cross_compiler)
    ex.export_library(str(path), **kwargs)
    return path


# ----------------------------------------------------------------------------- artifact
def compile_artifact(
    onnx_files: dict[str, Path | str],
    target: Target | str,
    out_dir: Path | str,
    *,
    trials: int = DEFAULT_TRIALS,
    tune: bool = True,
    db_dir: Path | str | None = None,
    shape_dicts: dict[str, dict[str, list[int]]] | None = None,
    extra_manifest: dict | None = None,
    progress: bool | None = None,
) -> Path:
    """Compile every graph of a model into `out_dir`: <graph>.so each + manifest.json.

    onnx_files: graph name -> ONNX path, e.g. {"encoder": ..., "decoder_step": ...}.
    tune=False runs no trials but still applies whatever the database already holds.
    One .so per graph: each graph is its own Relax `main` with its own weights, the
    device world times graphs separately, and a graph can be rebuilt or loaded alone.
    (A combined module would only save one dlopen; weights would not be shared anyway.)
    The manifest is written last and atomically: a folder without one is not an artifact.
    """
    import tvm
    import tvm_ffi

    target = _as_target(target)
    require_cross_compiler(target)  # fail now, not after minutes of tuning
    if tune and trials > 0 and (target.is_cross or target.device_type() != "cpu"):
        check_tracker(target)  # measuring needs the device
    out_dir = Path(out_dir)
    db_dir = Path(db_dir) if db_dir is not None else default_db_dir(target)
    extra = dict(extra_manifest or {})
    t0 = time.perf_counter()

    mods = {g: import_onnx(p, (shape_dicts or {}).get(g)) for g, p in onnx_files.items()}
    report = tune_report = None
    if tune:
        report = _tune(list(mods.values()), target, db_dir, trials, progress=progress)
        tune_report = {k: v for k, v in report.__dict__.items() if k != "task_names"}

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)  # invalidate an older artifact first
    graphs, files = {}, {}
    cuda = set()
    for graph, mod in mods.items():
        sig = signature(mod, onnx_files[graph])
        ex = build(mod, target, db_dir, use_database=tune or (db_dir / "database_tuning_record.json").is_file())
        cuda.add(cuda_kernels(ex))
        lib = f"{graph}.so"
        tmp = out_dir / f".{lib}.{os.getpid()}.tmp.so"  # export_library picks the linker by the suffix
        export(ex, tmp, target)
        os.replace(tmp, out_dir / lib)
        files[lib] = sha256_file(out_dir / lib)
        graphs[graph] = {"file": lib, **sig}

    manifest = {
        "format": ARTIFACT_FORMAT,
        "target": target.name,
        "tvm_target": str(target.tvm_target()),
        "device": target.device_type(),
        "cuda_kernels": next(iter(cuda)) if len(cuda) == 1 else sorted(map(str, cuda)),
        "tvm_version": tvm.__version__,
        "tvm_ffi_version": tvm_ffi.__version__,
        "tuning": {"tuned": tune, "database": database_id(db_dir), "report": tune_report},
        "graphs": graphs,
        "files": files,
        "compile_seconds": round(time.perf_counter() - t0, 2),
    }
    clash = set(extra) & set(manifest)
    if clash:
        raise MoscError(f"extra_manifest may not override {sorted(clash)}")
    manifest.update(extra)
    atomic_write_json(out_dir / MANIFEST, manifest)
    return out_dir


def read_manifest(art_dir: Path | str) -> dict:
    path = Path(art_dir) / MANIFEST
    if not path.is_file():
        raise MoscError(f"{art_dir} is not a mosc artifact (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MoscError(f"{path}: malformed manifest ({e})") from None
    if manifest.get("format") != ARTIFACT_FORMAT:
        raise MoscError(f"{path}: format {manifest.get('format')!r}, expected {ARTIFACT_FORMAT!r}")
    return manifest


def verify_artifact(art_dir: Path | str) -> dict:
    """Check every file's sha256 against the manifest; return the manifest. Loads no code."""
    art_dir = Path(art_dir)
    manifest = read_manifest(art_dir)
    for graph in manifest["graphs"].values():
        if graph["file"] not in manifest["files"]:
            raise MoscError(f"{art_dir}: {graph['file']} has no sha256 in the manifest")
    verify_files(art_dir, manifest["files"], "the manifest")
    return manifest


class Artifact:
    """A loaded artifact: one Relax VM per graph, run with numpy in, numpy out.

    Calls go through vm.set_input / invoke_stateful / get_outputs, which also work over
    RPC (a remote VM's direct call returns an object that cannot be indexed).
    """

    def __init__(self, art_dir: Path, manifest: dict, vms: dict, device):
        self.dir, self.manifest, self.vms, self.device = art_dir, manifest, vms, device

    @property
    def graphs(self) -> list[str]:
        return list(self.manifest["graphs"])

    def _tensors(self, graph: str, inputs):
        import tvm

        spec = self.manifest["graphs"][graph]["inputs"]
        if isinstance(inputs, dict):
            missing = [s["name"] for s in spec if s["name"] not in inputs]
            if missing or len(inputs) != len(spec):
                raise MoscError(f"{graph}: inputs are {[s['name'] for s in spec]}, got {sorted(inputs)}")
            inputs = [inputs[s["name"]] for s in spec]
        if len(inputs) != len(spec):
            raise MoscError(f"{graph}: expects {len(spec)} inputs, got {len(inputs)}")
        out = []
        for s, x in zip(spec, inputs):
            x = np.asarray(x)
            if list(x.shape) != s["shape"] or str(x.dtype) != s["dtype"]:
                raise MoscError(f"{graph}: input {s['name']} must be {s['dtype']}{s['shape']}, got {x.dtype}{list(x.shape)}")
            out.append(tvm.runtime.tensor(x, self.device))
        return out

    def set_inputs(self, graph: str, inputs) -> None:
        """Copy inputs to the device (untimed part of a measurement)."""
        self.vms[graph].set_input("main", *self._tensors(graph, inputs))

    def run(self, graph: str, inputs) -> list[np.ndarray]:
        """Run one graph; inputs: list in signature order or dict by name. Returns numpy outputs."""
        vm = self.vms[graph]
        self.set_inputs(graph, inputs)
        vm.invoke_stateful("main")
        out = vm.get_outputs("main")
        outs = list(out) if not hasattr(out, "numpy") else [out]
        return [o.numpy() for o in outs]


def load_artifact(art_dir: Path | str, device: str = "cpu", session=None) -> Artifact:
    """Verify an artifact's sha256s, then load every graph into a VM.

    device: "cpu" or "cuda" (device 0). session: an RPC session (tvm.rpc.connect...):
    the libraries are verified here, uploaded, and loaded on the remote side.
    Works with the runtime-only TVM (`tvm.runtime`, no `tvm.relax` import).
    """
    art_dir = Path(art_dir)
    manifest = verify_artifact(art_dir)  # before any .so is loaded: a .so is code
    import tvm
    from tvm.runtime.vm import VirtualMachine

    dev = (session.device(device) if session is not None else tvm.device(device))
    vms = {}
    for graph, entry in manifest["graphs"].items():
        path = art_dir / entry["file"]
        if session is not None:
            session.upload(str(path))
            lib = session.load_module(entry["file"])
        else:
            try:
                lib = tvm.runtime.load_module(str(path))
            except Exception as e:  # noqa: BLE001  (TVM's error for a foreign .so says "No such file")
                raise MoscError(
                    f"{path} cannot be loaded on this machine ({platform.machine()}): the artifact was compiled for "
                    f"target {manifest.get('target')!r}; run it there (or over RPC: mosc measure/bench --tracker)"
                    + ("" if "cannot open shared object" in str(e) else f" [{str(e).strip().splitlines()[-1][:200]}]")
                ) from None
        vms[graph] = VirtualMachine(lib, dev)
    return Artifact(art_dir, manifest, vms, dev)

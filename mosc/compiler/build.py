"""Imported graphs -> shared libraries -> an artifact folder a device can run.

    build             PREPARE + the target's tuning database + FINISH + tvm.compile -> Executable
    export            Executable -> .so (cross-compiled where the target says so)
    compile_artifact  ONNX files of a model -> one tuned, built library (+ the decode loop) + manifest

This module does not know about torch, the model, or how latency is measured, and leaves
the artifact's format to artifact.py. It imports tvm only inside functions.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from mosc.compiler.artifact import LIBRARY, MANIFEST, write_manifest
from mosc.compiler.cuda import compile_kernels, cuda_modules, pack_imports, source_kernels
from mosc.compiler.loop import add_greedy_loop, loop_signature, merge_graphs
from mosc.compiler.passes import FINISH, PREPARE, drop_known_tvm_noise, import_onnx, run_passes, signature
from mosc.compiler.schedules import unscheduled_functions
from mosc.compiler.targets import Target, as_target
from mosc.compiler.tune import DEFAULT_TRIALS, check_tracker, database_id, default_db_dir, open_database
from mosc.compiler.tune import tune as _tune  # compile_artifact's `tune` flag shadows the name there
from mosc.contract import DECODER, ENCODER, GRAPH_NAME, TRANSLATE, check_translation_graphs
from mosc.errors import MoscError


# CPU: the Relax VM's own functions (allocations, the calls between kernels) are compiled to
# machine code instead of interpreted as bytecode: a decoder step makes ~140 VM calls, and the
# interpreter's dispatch was a few us each (tiny space, 1 thread: -3 to -6% of a translation).
VM_EXEC_MODE = "compiled"


def build(mod, target: Target | str, db_dir: Path | str | None = None, *, use_database: bool = True,
          coverage: dict | None = None):
    """Imported IRModule -> tvm Executable: PREPARE, FINISH with the target's database, compile.

    Functions the database has no record for get mosc's default schedules (CPU) or TVM's
    dlight ones (GPU, in tvm.compile). coverage: a dict that receives {"functions",
    "from_database", "default_scheduled", "naive", "tuned"} counts of this graph's TIR functions
    (naive: CPU functions no default rule matched; 0 is what every known graph gets; tuned: of
    from_database, those whose record is a tuned candidate rather than the default schedule's
    trace, which the tuner records as the yardstick a candidate must beat), and "loop_kernels":
    hand-written kernels (the decode loop's, mosc.compiler.loop), which are not among the graph's
    functions: their loops are their schedule and no tuning database holds them.
    """
    import tvm

    target = as_target(target)
    db_dir = Path(db_dir) if db_dir is not None else default_db_dir(target)
    mod = run_passes(mod, target, PREPARE)
    hand = len(_hand_written(mod))
    total = _prim_funcs(mod) - hand
    has_db = use_database and (db_dir / "database_tuning_record.json").is_file()
    if has_db:
        with open_database(db_dir):
            mod = run_passes(mod, target, FINISH[:1])
    from_db = _prim_funcs(mod) - len(unscheduled_functions(mod)) - hand  # hand-written ones count as scheduled
    tuned = sum(1 for _, f in mod.functions_items() if _is_tuned(f)) - hand
    cut = 1 + next(i for i, (name, _) in enumerate(FINISH) if name == "default_schedules")
    mod = run_passes(mod, target, FINISH[1:cut])
    # CPU: what no default rule matched runs as a naive loop nest; counted before the last
    # FoldConstant so a naive function on constants (folded away, never run) still shows.
    # GPU targets get dlight's schedules inside tvm.compile: nothing is naive there.
    naive = len(unscheduled_functions(mod)) if target.device_type() == "cpu" else 0
    mod = run_passes(mod, target, FINISH[cut:])
    if coverage is not None:
        coverage.update(functions=total, from_database=from_db, default_scheduled=total - from_db - naive,
                        naive=naive, tuned=tuned, loop_kernels=hand)
    try:
        with drop_known_tvm_noise():
            if target.device_type() == "cpu":  # the VM's functions as machine code, not bytecode
                return tvm.relax.build(mod, target.tvm_target(), exec_mode=VM_EXEC_MODE)
            return tvm.compile(mod, target=target.tvm_target())
    except Exception as e:
        raise MoscError(f"tvm.compile for {target.name} failed: {str(e).splitlines()[0]}") from e


def _is_tuned(func) -> bool:
    """A PrimFunc scheduled by a tuned record: from the database, and not the replayed trace of a
    default schedule (the tuner records those too; see mosc.compiler.tune.commit_default_schedules)."""
    from tvm import tirx

    from mosc.compiler.schedules import SCHEDULED_ATTR, default_rule_of

    return (isinstance(func, tirx.PrimFunc) and func.attrs is not None and bool(func.attrs.get(SCHEDULED_ATTR, False))
            and default_rule_of(func) is None)


def _hand_written(mod) -> list[str]:
    from tvm import tirx

    from mosc.compiler.loop import HAND

    return [gv.name_hint for gv, f in mod.functions_items()
            if isinstance(f, tirx.PrimFunc) and f.attrs is not None and bool(f.attrs.get(HAND, False))]


def _prim_funcs(mod) -> int:
    from tvm import tirx

    return sum(isinstance(f, tirx.PrimFunc) for _, f in mod.functions_items())


def cuda_kernels(ex) -> str | None:
    """How an executable holds its CUDA kernels: "source", "binary", or None (no CUDA).

    TVM 0.27's tvm.compile keeps CUDA *source* (a fallback module, not runnable) where no GPU
    driver is loaded, and always inside mosc.compiler.cuda.source_kernels(), which
    compile_artifact uses; with a driver it compiles them at build time for the build machine's
    own GPU (a runnable module). compile_artifact then compiles the source to a cubin for the
    target's SM with nvcc and exports the library with the cubin in its place, so such an
    artifact's manifest says "binary" even though this executable says "source"; without nvcc
    the library keeps the source, which the GPU host's TVM compiles when it loads it.
    """
    mods = cuda_modules(ex.mod)
    if not mods:
        return None
    return "binary" if all(m.is_runnable() for m in mods) else "source"


# apt packages that provide a cross compiler named in a target file
CROSS_PACKAGES = {"aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu g++-aarch64-linux-gnu",
                  "aarch64-linux-gnu-g++": "gcc-aarch64-linux-gnu g++-aarch64-linux-gnu"}


def require_cross_compiler(target: Target | str) -> None:
    """MoscError naming the apt package when the target's cross compiler is not on PATH."""
    target = as_target(target)
    cc_name = target.cross_compiler
    if cc_name and not shutil.which(cc_name):
        pkg = CROSS_PACKAGES.get(cc_name)
        hint = f"apt-get install {pkg}" if pkg else "install it or fix cross_compiler in the target file"
        raise MoscError(f"cross compiler {cc_name!r} for target {target.name} not found on PATH ({hint})")


def export(ex, path: Path | str, target: Target | str, *, cubins=()) -> Path:
    """Executable -> shared library at `path` (cross-compiled where the target says so).
    cubins: (CUDA source, cubin) pairs (mosc.compiler.cuda.compile_kernels) put in the
    library in place of the executable's CUDA source."""
    from tvm.support import cc

    target = as_target(target)
    path = Path(path)
    kwargs = {}
    if target.cross_compiler:
        require_cross_compiler(target)
        kwargs["fcompile"] = cc.cross_compiler(target.cross_compiler)
    if cubins:
        kwargs["fpack_imports"] = pack_imports(cubins)
    ex.export_library(str(path), **kwargs)
    return path


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
    """Compile every graph of a model into `out_dir`: model.so + manifest.json.

    onnx_files: graph name -> ONNX path, e.g. {"encoder": ..., "decoder_step": ...}.
    tune=False runs no trials but still applies whatever the database already holds.
    One library: each graph is the Relax function of its name, and a translation model
    (graphs encoder + decoder_step, mosc.contract) also gets `translate`, the greedy loop
    compiled around them (mosc.compiler.loop), so a translation is one call on the device.
    Tuning still sees each graph as its own module: the workloads are the same.
    The manifest is written last and atomically: a folder without one is not an artifact.
    """
    target = as_target(target)
    bad = [g for g in onnx_files if not GRAPH_NAME.match(g)]
    if bad:  # a graph's name is its function's name
        raise MoscError(f"graph name {bad[0]!r} must match {GRAPH_NAME.pattern[:-2]}")
    require_cross_compiler(target)  # fail now, not after minutes of tuning
    if tune and trials > 0 and target.needs_rpc:
        check_tracker(target)  # measuring needs the device
    out_dir = Path(out_dir)
    db_dir = Path(db_dir) if db_dir is not None else default_db_dir(target)
    t0 = time.perf_counter()

    mods = {g: import_onnx(p, (shape_dicts or {}).get(g)) for g, p in onnx_files.items()}
    graphs = {g: {"file": LIBRARY, "function": g, **signature(mod, onnx_files[g])} for g, mod in mods.items()}
    translation = {ENCODER, DECODER} <= set(graphs)
    if translation:  # the loop relies on the contract's names and shapes
        check_translation_graphs(graphs, "the ONNX graphs")
    tune_report = None
    if tune:
        report = _tune(list(mods.values()), target, db_dir, trials, progress=progress)
        tune_report = {k: v for k, v in report.__dict__.items() if k != "task_names"}

    mod = merge_graphs(mods)
    if translation:
        mod = add_greedy_loop(mod, graphs, gpu=target.device_type() != "cpu")
        graphs[TRANSLATE] = {"file": LIBRARY, "function": TRANSLATE, **loop_signature(graphs)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)  # invalidate an older artifact first
    for old in [p for p in out_dir.glob("*.so") if p.name != LIBRARY]:
        old.unlink()  # an older format's per-graph libraries
    kernels, coverage = _build_library(mod, target, db_dir, out_dir)  # kernels: the manifest's cuda_* fields

    write_manifest(
        out_dir, graphs, target=target.name, tvm_target=str(target.tvm_target()), device=target.device_type(),
        **kernels,
        tuning={"tuned": tune, "database": database_id(db_dir), "report": tune_report,
                "coverage": {LIBRARY: coverage}},
        compile_seconds=time.perf_counter() - t0, extra=extra_manifest,
    )
    return out_dir


def _build_library(mod, target: Target, db_dir: Path, out_dir: Path) -> tuple[dict, dict]:
    """Build the merged module into out_dir/model.so, replaced atomically; returns (the manifest's
    cuda_kernels / cuda_arch / cuda_note, coverage: how many of its functions came from the database).
    GPU targets: the kernels are compiled to a cubin for the target's SM here (nvcc), else kept as
    source with a note (mosc.compiler.cuda)."""
    coverage: dict = {}
    with source_kernels():  # GPU: the CUDA source, never kernels JIT-compiled for this machine's own GPU
        ex = build(mod, target, db_dir, coverage=coverage)  # whatever the database holds, tuned just now or before
    kernels = compile_kernels(ex, target.tvm_target(), target.name)
    tmp = out_dir / f".{LIBRARY}.{os.getpid()}.tmp.so"  # export_library picks the linker by the suffix
    try:
        export(ex, tmp, target, cubins=kernels.cubins)
        os.replace(tmp, out_dir / LIBRARY)
    finally:
        tmp.unlink(missing_ok=True)
    return kernels.manifest(), coverage

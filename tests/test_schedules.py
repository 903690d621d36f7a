"""mosc.compiler.schedules: default CPU schedules and the MetaSchedule matmul template, with real
TVM builds. Small matmuls made with te (both weight layouts, batch, epilogues, ragged tiles),
a tiny exported mosc subnet (every function scheduled, same numbers as the naive build), and a
short in-process tuning run of the template whose record replays through the database.
"""

import numpy as np
import pytest

from mosc.compiler.passes import FINISH, PREPARE, import_onnx, run_passes
from mosc.compiler.targets import as_target

ATOL = 1e-4


@pytest.fixture(scope="module")
def host():
    return as_target("host")


# ----------------------------------------------------------------------------- te matmuls
def _matmul_func(batch, m, k, n, *, inner=False, relu=False):
    """C = A @ B (+ bias, + relu): B is [K, N] (outer reduction) or [N, K] (inner)."""
    from tvm import te

    a = te.placeholder((*batch, m, k), "float32", name="A")
    b = te.placeholder((*batch, n, k) if inner else (*batch, k, n), "float32", name="B")
    bias = te.placeholder((n,), "float32", name="bias")
    r = te.reduce_axis((0, k), name="k")

    def mm(*idx):
        *bi, i, j = idx
        return te.sum(a[(*bi, i, r)] * (b[(*bi, j, r)] if inner else b[(*bi, r, j)]), axis=r)

    c = te.compute((*batch, m, n), mm, name="matmul")
    out = te.compute(c.shape, lambda *idx: c[idx] + bias[idx[-1]], name="T_add")
    if relu:
        out = te.compute(c.shape, lambda *idx: te.max(out[idx], 0.0), name="relu")
    return te.create_prim_func([a, b, bias, out])


def _run(func, target, arrays, out_shape):
    import tvm

    lib = tvm.compile(tvm.IRModule({"main": func}), target=target)
    args = [tvm.runtime.tensor(x) for x in arrays]
    out = tvm.runtime.tensor(np.zeros(out_shape, "float32"))
    lib["main"](*args, out)
    return out.numpy()


@pytest.mark.parametrize("batch,m,k,n,inner,relu", [
    ((), 1, 64, 1000, False, False),  # GEMV, N with no multiple-of-lanes divisor: 40-wide tile
    ((), 7, 32, 48, False, True),  # ragged M tile, relu epilogue
    ((), 31, 16, 30, False, False),  # M prime, N shorter than the tile
    ((1, 2), 3, 16, 10, False, False),  # attention-style batched matmul
    ((), 5, 32, 20, True, False),  # inner reduction (B stored [N, K])
    ((2,), 6, 24, 13, True, True),
    ((), 64, 32, 96, False, False),  # N tile of whole vectors, a power of two of them (32 on AVX-512)
    ((), 12, 16, 1000, False, True),  # no such divisor of a vector: half vectors
    ((), 1, 512, 1000, False, False),  # streamed GEMV (K x N >= GEMV_STREAM_MIN): k outside n
    ((), 1, 100, 768, False, True),  # streamed, K not a multiple of GEMV_ROWS (5 rows a pass), relu
    ((1,), 1, 256, 512, False, False),  # streamed under a unit batch loop
])
def test_matmul_rule_matches_numpy(host, batch, m, k, n, inner, relu):
    from mosc.compiler.schedules import schedule_func

    target = host.tvm_target()
    func = _matmul_func(batch, m, k, n, inner=inner, relu=relu)
    scheduled, rule = schedule_func(func, target)
    assert rule == "matmul" and scheduled.attrs["tirx.is_scheduled"]
    rng = np.random.default_rng(0)
    a = rng.standard_normal((*batch, m, k)).astype("float32")
    b = rng.standard_normal((*batch, n, k) if inner else (*batch, k, n)).astype("float32")
    bias = rng.standard_normal(n).astype("float32")
    ref = a @ (np.swapaxes(b, -1, -2) if inner else b) + bias
    if relu:
        ref = np.maximum(ref, 0)
    np.testing.assert_allclose(_run(scheduled, target, [a, b, bias], ref.shape), ref, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("m,k,n,streamed", [(1, 512, 512, True), (1, 64, 1000, False), (2, 512, 512, False)])
def test_large_gemv_streams_b_row_by_row(host, m, k, n, streamed):
    """An M = 1 matmul with a large K-major B puts the reduction outermost (B read once, front
    to back; see _stream_gemv); a small one or M > 1 keeps the register tile (k inside n)."""
    from mosc.compiler.schedules import default_schedule

    sch, rule = default_schedule(_matmul_func((), m, k, n), host.tvm_target())
    assert rule == "matmul"
    names = [str(sch.get(lp).loop_var.name) for lp in sch.get_loops(sch.get_sblock("matmul_update"))
             if sch.get(lp).extent.value > 1]
    assert (names[0].startswith("k")) == streamed, names


def test_n_tile_under_an_m_tile_is_a_power_of_two_of_vectors():
    """3 or 5 vectors (or 2.5) of accumulators per row of an unrolled M tile ran 10-90x slower
    than 1, 2 or 4 (see _pick_tile); a GEMV (no M tile) keeps the best-filled divisor."""
    from mosc.compiler.schedules import _pick_tile

    assert [_pick_tile(n, 64, 16, pow2_vectors=True) for n in (48, 80, 96, 192, 1000, 512, 30)] == [16, 16, 32, 64, 8, 64, 30]
    assert [_pick_tile(n, 32, 8, pow2_vectors=True) for n in (24, 96, 40, 20)] == [8, 32, 8, 20]
    assert _pick_tile(1000, 64, 16) == 40 and _pick_tile(48, 64, 16) == 48  # unchanged without an M tile


def test_non_cpu_targets_and_scheduled_functions_are_left_alone(host):
    import tvm

    from mosc.compiler.schedules import apply_default_schedules, unscheduled_functions

    func = _matmul_func((), 4, 8, 16)
    mod = tvm.IRModule({"mm": func, "done": func.with_attr("tirx.is_scheduled", True)})
    assert unscheduled_functions(mod) == ["mm"]
    assert apply_default_schedules(mod, tvm.target.Target("cuda")).same_as(mod)
    out = apply_default_schedules(mod, host.tvm_target())
    assert unscheduled_functions(out) == [] and out["done"].same_as(mod["done"])
    assert unscheduled_functions(mod) == ["mm"]  # the input module is not mutated


# ----------------------------------------------------------------------------- a real mosc subnet
@pytest.fixture(scope="module")
def subnet_graphs(tmp_path_factory):
    """encoder.onnx and decoder_step.onnx of the tiny space's smallest subnet (untrained), S=T=8."""
    from mosc.jobs.model import supernet_for
    from mosc.nn.export import Shapes, export_subnet
    from mosc.nn.subnet import collapse
    from mosc.space import SearchSpace

    out = tmp_path_factory.mktemp("subnet")
    supernet, _, _ = supernet_for(None, "tiny", "neuron", 0)
    export_subnet(collapse(supernet, SearchSpace.load("tiny").smallest()), out, Shapes(1, 8, 8), check=False)
    return {g: out / f"{g}.onnx" for g in ("encoder", "decoder_step")}


def _inputs(mod, seed=0):
    import tvm

    rng = np.random.default_rng(seed)
    out = []
    for p in mod["main"].params:
        shape, dtype = [int(d) for d in p.ty.shape.values], str(p.ty.dtype)
        x = rng.integers(1, 5, shape) if dtype.startswith("int") else rng.standard_normal(shape)
        out.append(tvm.runtime.tensor(x.astype(dtype)))
    return out


def _outputs(mod, target, args):
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.compile(mod, target=target.tvm_target()), tvm.cpu())
    res = vm["main"](*args)
    return [r.numpy() for r in res] if isinstance(res, (list, tuple)) or hasattr(res, "__len__") else [res.numpy()]


@pytest.mark.parametrize("graph", ["encoder", "decoder_step"])
def test_subnet_fully_scheduled_and_equal_to_naive(host, subnet_graphs, graph):
    from mosc.compiler.schedules import unscheduled_functions

    prepared = run_passes(import_onnx(subnet_graphs[graph]), host, PREPARE)
    finish = [p for p in FINISH if p[0] != "apply_database"]  # no database: what `build` runs then
    assert "default_schedules" in [n for n, _ in finish]
    scheduled = run_passes(prepared, host, finish)
    naive = run_passes(prepared, host, [p for p in finish if p[0] != "default_schedules"])
    assert unscheduled_functions(scheduled) == []
    assert len(unscheduled_functions(naive)) > 5  # the check above means something
    args = _inputs(prepared)
    for got, ref in zip(_outputs(scheduled, host, args), _outputs(naive, host, args)):
        np.testing.assert_allclose(got, ref, atol=ATOL, rtol=1e-4)


# ----------------------------------------------------------------------------- tuning template
def test_template_tunes_and_the_record_replays(host, subnet_graphs, tmp_path):
    """A few trials of the template alone on one real matmul task: valid records, and the best
    one replays through MetaScheduleApplyDatabase into a build with the naive build's numbers."""
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    from mosc.compiler.schedules import space_generator, unscheduled_functions
    from mosc.compiler.tune import (
        _extract_tasks,
        _import_tensor_intrinsics,
        _inprocess_builder,
        _task_loggers,
    )

    target = host.tvm_target()
    _import_tensor_intrinsics(target)
    prepared = run_passes(import_onnx(subnet_graphs["encoder"]), host, PREPARE)
    tasks = [t for t, _ in _extract_tasks([prepared], host)]
    matmuls = [t for t in tasks if t.task_name.startswith("fused_matmul") and "relu" in t.task_name]
    assert matmuls, [t.task_name for t in tasks]
    task = matmuls[0]

    # the union holds the template next to PostOrderApply's spaces; a non-matmul gets only those
    def spaces(t, gen):
        return ms.TuneContext(mod=t.dispatched[0], target=target, space_generator=gen,
                              task_name=t.task_name).generate_design_space()

    def from_template(trace):
        kinds = [i.kind.name for i in trace.insts]
        design = kinds[: kinds.index("EnterPostproc")] if "EnterPostproc" in kinds else kinds
        return "Unroll" in design and "DecomposeReduction" in design  # MS's own rules only annotate

    union = spaces(task, space_generator(target))
    assert sum(from_template(s.trace) for s in union) == 1 and len(union) > 1
    other = next(t for t in tasks if t.task_name.startswith("softmax"))
    assert not any(from_template(s.trace) for s in spaces(other, space_generator(target)))

    db = ms.database.JSONDatabase(path_workload=str(tmp_path / "w.json"), path_tuning_record=str(tmp_path / "r.json"),
                                  module_equality="structural")
    ctx = ms.TuneContext(
        mod=task.dispatched[0], target=target, space_generator=space_generator(target, default_space=False),
        search_strategy=ms.search_strategy.EvolutionarySearch(population_size=8), task_name=task.task_name,
        rand_state=0, num_threads=1, logger=_task_loggers(tmp_path, [task.task_name])[0],
    ).clone()
    ms.tune.tune_tasks(tasks=[ctx], task_weights=[1.0], work_dir=str(tmp_path), max_trials_global=6,
                       max_trials_per_task=6, num_trials_per_iter=6, builder=_inprocess_builder(),
                       runner=ms.runner.LocalRunner(timeout_sec=30), database=db,
                       measure_callbacks=ms.measure_callback.MeasureCallback.create("default"),
                       module_equality="structural")
    records = db.get_all_tuning_records()
    assert records and all(from_template(r.trace) for r in records)
    assert any(r.run_secs and all(float(s) < 1e9 for s in r.run_secs) for r in records)

    with target, db:
        applied = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(prepared)
    assert task.task_name not in unscheduled_functions(applied)
    args = _inputs(prepared)
    for got, ref in zip(_outputs(applied, host, args), _outputs(prepared, host, args)):
        np.testing.assert_allclose(got, ref, atol=ATOL, rtol=1e-4)

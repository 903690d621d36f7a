"""The tuner's guard: no build applies a tuning record slower than the default schedule.

mosc.compiler.tune commits each workload's default schedule (mosc.compiler.schedules) as a
record, measured by the same builder and runner as the candidates, so the database's best record
is the default whenever no candidate beat it. Here: a tiny Relax graph (two matmuls with
epilogues, a softmax) tuned with a couple of random trials per workload (which lose to the
default schedules), then built from the database: the default's trace replays to the same
TIR as the FINISH pass's default schedule, with the same numbers.
"""

from types import SimpleNamespace

import numpy as np
import pytest

from mosc.compiler.passes import FINISH, PREPARE, run_passes
from mosc.compiler.targets import as_target


@pytest.fixture(scope="module")
def host():
    return as_target("host")


def _graph():
    """x[16, 64] -> relu(x @ W1 + b1) @ W2 + b2 -> softmax: three fused workloads after PREPARE."""
    import tvm
    from tvm import relax

    rng = np.random.default_rng(0)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((16, 64), "float32"))

    def const(*shape):
        return relax.const(rng.standard_normal(shape).astype("float32") * 0.2)

    with bb.function("main", [x]):
        with bb.dataflow():
            h = bb.emit(relax.op.nn.relu(relax.op.add(relax.op.matmul(x, const(64, 64)), const(64))))
            y = bb.emit(relax.op.add(relax.op.matmul(h, const(64, 32)), const(32)))
            out = bb.emit_output(relax.op.nn.softmax(y))
        bb.emit_func_output(out)
    mod = bb.get()
    assert isinstance(mod, tvm.IRModule)
    return mod


def _space(prepared, host):
    """The graph's workloads as a space (what tune_space reads from a space file)."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from mosc.compiler.workloads import MODULE_EQUALITY, Workload, workload_key

    workloads = {}
    for task in ms.relax_integration.extract_tasks(prepared, host.tvm_target(), module_equality=MODULE_EQUALITY):
        mod = task.dispatched[0]
        workloads[workload_key(mod)] = Workload(workload_key(mod), task.task_name, 1, 1e6, tvm.ir.save_json(mod))
    return SimpleNamespace(workloads=workloads)


def _run(ex, x):
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def test_tuned_database_never_holds_a_best_record_slower_than_the_default(host, tmp_path):
    import tvm_ffi

    from mosc.compiler.build import build
    from mosc.compiler.schedules import apply_default_schedules, is_default_trace
    from mosc.compiler.tune import (TuneReport, _extract_tasks, _new_tasks, commit_default_schedules, open_database,
                                    tune_space)
    from mosc.compiler.workloads import coverage, record_us, split_records

    graph = _graph()
    prepared = run_passes(graph, host, PREPARE)
    space = _space(prepared, host)
    assert len(space.workloads) == 3
    db_dir = tmp_path / "db"
    report = tune_space(space, host, db_dir, trials=3 * len(space.workloads), progress=False)
    assert report.defaults == len(space.workloads) and report.with_record == len(space.workloads)
    assert report.trials == 3 * len(space.workloads)  # the defaults are no trials

    database = open_database(db_dir)
    default_won = 0
    for w in space.workloads.values():
        tuned, defaults = split_records(database, w.ir_module)
        assert len(defaults) == 1 and len(tuned) >= 1, w.name
        best = database.get_top_k(database.commit_workload(w.ir_module), 1)[0]
        # measured by the same runner: the best record is never slower than the default schedule
        assert record_us(best) is not None and record_us(best) <= record_us(defaults[0])
        default_won += is_default_trace(best.trace)
    assert default_won >= 1  # random schedules lose to the default ones: the guard did something here
    cov = {c.key: c for c in coverage(database, host, space.workloads)}
    assert all(c.trials == 3 and c.default_us is not None and c.best_us <= c.default_us for c in cov.values())

    # a second call measures nothing again: every workload has its default record
    again = tune_space(space, host, db_dir, trials=3 * len(space.workloads), progress=False)
    assert again.defaults == 0 and again.trials == 0

    # the compile path (tune()) still sees tasks whose only record is the default as untuned
    fresh = tmp_path / "fresh"
    tasks = [t for t, _ in _extract_tasks([prepared], host)]
    assert len(commit_default_schedules(tasks, host, open_database(fresh))) == 3
    assert len(_new_tasks([graph], host, open_database(fresh), fresh, TuneReport(db_dir=str(fresh)))) == 3

    # a build from the database replays the default's trace: same TIR as the FINISH pass's, same numbers
    with open_database(db_dir):
        applied = run_passes(prepared, host, FINISH[:1])
    defaulted = apply_default_schedules(prepared, host.tvm_target())
    for w in space.workloads.values():
        best = database.get_top_k(database.commit_workload(w.ir_module), 1)[0]
        if not is_default_trace(best.trace):
            continue
        gv = prepared.get_global_var(w.name)
        assert tvm_ffi.structural_equal(applied[gv].body, defaulted[gv].body), w.name
    cov_db, cov_default = {}, {}
    ex_db = build(graph, host, db_dir, coverage=cov_db)
    ex_default = build(graph, host, db_dir, use_database=False, coverage=cov_default)
    assert cov_db["from_database"] == cov_db["functions"] == cov_default["default_scheduled"] > 0
    assert cov_db["tuned"] == len(space.workloads) - default_won and cov_default["tuned"] == 0
    from mosc.compiler.artifact import describe_coverage

    n, tuned = cov_db["functions"], cov_db["tuned"]  # the wording users read tells tuned records from recorded defaults
    assert describe_coverage(cov_db) == (f"{n} of {n} functions from database records ({tuned} tuned, {n - tuned} "
                                         "the recorded default schedule), 0 mosc's default schedules")
    assert describe_coverage(cov_default).startswith(f"0 of {n} functions from database records (0 tuned")
    x = np.random.default_rng(1).standard_normal((16, 64)).astype("float32")
    np.testing.assert_allclose(_run(ex_db, x), _run(ex_default, x), atol=1e-6, rtol=1e-5)


def test_database_timed_otherwise_is_refused_for_tuning(host, tmp_path):
    """Records compare by time: a CPU database without the cold-timing marker but with records
    (tuned warm, before CPU timing went cold) is refused in one line; an empty one gets the marker."""
    import json

    from mosc.compiler.tune import CPU_TIMING, TIMING_FILE, check_timing
    from mosc.errors import MoscError

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    check_timing(fresh, host)
    assert json.loads((fresh / TIMING_FILE).read_text()) == {"cpu": CPU_TIMING}
    check_timing(fresh, host)  # marked alike: fine again
    old = tmp_path / "old"
    old.mkdir()
    (old / "database_tuning_record.json").write_text('[0, [[], [1e-05], {}, []]]\n')
    with pytest.raises(MoscError, match="timed warm .*new --tune-db"):
        check_timing(old, host)
    assert not (old / TIMING_FILE).exists()
    (old / TIMING_FILE).write_text('{"cpu": "warm"}')
    with pytest.raises(MoscError, match="timed warm, which new cold-timed"):
        check_timing(old, host)

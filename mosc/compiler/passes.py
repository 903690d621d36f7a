"""ONNX file -> Relax IRModule, and the named Relax pass lists that prepare it for tuning and build.

    import_onnx   ONNX file -> Relax IRModule (static shapes, weights as constants)
    signature     input/output names, shapes and dtypes of an imported graph
    PREPARE       passes before tuning: the fused TIR functions it produces are the tuning tasks
    FINISH        passes after tuning: apply the database's schedules, fold what they expose
    run_passes    apply a named pass list under a target

`tvm.compile` then lowers what is left with TVM's default pipeline for the target.

This module does not know about tuning databases, shared libraries or artifacts, nor about
torch. It imports tvm (and onnx) only inside functions: importing tvm costs ~2 s.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from mosc.compiler.targets import Target
from mosc.errors import MoscError


def _relax():
    from tvm import relax

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
    # replace each TIR function by its best schedule in Database.current()
    ("apply_database", lambda: _relax().transform.MetaScheduleApplyDatabase(enable_warning=False)),
    # every CPU function the database has no record for gets a rule-based schedule: none runs naive
    ("default_schedules", lambda: _default_schedules()),
    # again: scheduled functions on constant weights (e.g. the transposes of W) fold now;
    # without this they run on every call (+1.6 ms on a d=512 model)
    ("fold_constant_after_tuning", lambda: _relax().transform.FoldConstant()),
]


def _default_schedules():
    from mosc.compiler.schedules import default_schedules_pass

    return default_schedules_pass()


def run_passes(mod, target: Target, passes: list[tuple[str, Callable[[], Any]]]):
    """Apply named passes in order, with `target` current (legalization is target-aware)."""
    with target.tvm_target(), drop_known_tvm_noise():
        for name, factory in passes:
            try:
                mod = factory()(mod)
            except Exception as e:  # name the pass: TVM's tracebacks do not
                raise MoscError(f"pass {name!r} failed: {str(e).splitlines()[0]}") from e
    return mod


# C++ warnings TVM prints to stderr on every build that say nothing actionable here: the
# ONNX Gather of the embedding lowers to `take(mode="fast")`, whose token ids are in range.
KNOWN_TVM_NOISE = ("Fast mode segfaults when there are out-of-bounds indices",)


@contextlib.contextmanager
def drop_known_tvm_noise():
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

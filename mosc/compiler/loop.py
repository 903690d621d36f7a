"""One IRModule per model: each graph a named Relax function, and for a translation model the
greedy decode loop itself, so a translation is one VM call with no Python between steps.

    merge_graphs(mods)            {graph: imported IRModule} -> one IRModule, `main` of each renamed to its graph
    add_greedy_loop(mod, graphs)  + decode_loop (recursive, R.If) and translate (encoder, then the loop)
    loop_signature(graphs)        the translate function's inputs and outputs (mosc.contract.TRANSLATE)

The loop (TVM 0.27's Relax has no while op; a recursive function with R.If runs in both VM
exec modes), per step t while t < steps and some row has not emitted eos:
    logits, *caches = decoder_step(token, [t], *caches, *cross)
    token = argmax(logits)        [B] int64      \
    tokens[:, t] = token                          | one hand-written TIR kernel (greedy_pick): a
    done |= token == eos                          | step's bookkeeping as ~15 small Relax ops cost
    live = t + 1 < steps and not all(done)       /  ~8 us of calls; one kernel costs ~1 us
`steps` (1..T: the first step always runs) and `eos` are inputs: eos = -1 never matches, which
forces exactly `steps` steps (the timing protocol); the tokens after the last step stay PAD_ID. Caches, cross-attention tensors
and tokens never leave the device between steps.

The loop is written as TVMScript text with the shapes filled in, parsed, and the graphs'
stub declarations replaced by the imported functions (TVMScript needs a callee's signature
to parse a call to it). This module knows the contract's names and shapes, not torch, the
model's layers or how the result is scheduled and built. It imports tvm only inside functions.
"""

from __future__ import annotations

from mosc.contract import (BOS_ID, DECODER, ENCODER, PAD_ID, TRANSLATE, TRANSLATE_INPUTS, TRANSLATE_OUTPUTS,
                           cache_shape, decoder_layers)
from mosc.errors import MoscError

LOOP = "decode_loop"  # the recursive function: one decoder step, then itself
PICK = "greedy_pick"  # the loop's one kernel per step besides the decoder step (argmax and bookkeeping)
SCHEDULED = "tirx.is_scheduled"  # = mosc.compiler.schedules.SCHEDULED_ATTR: no rule touches PICK
ARGMAX_LANES = 8  # fp32 lanes the argmax keeps (AVX2; NEON's 4 take two registers)
HAND = "mosc.hand_written"  # PICK's mark: its loops are its schedule (counted apart in build coverage)


def merge_graphs(mods: dict):
    """{graph name: IRModule with a Relax `main`} -> one IRModule where each `main` is the Relax
    function named after its graph. The other functions (TIR the importer made) keep their names;
    two graphs with a same-named one cannot be merged (MoscError; never seen from mosc's exports)."""
    import tvm

    funcs, names = {}, set()
    for graph, mod in mods.items():
        for gv, func in mod.functions_items():
            name = graph if gv.name_hint == "main" else gv.name_hint
            if name in names:
                raise MoscError(f"cannot merge the graphs into one library: two functions named {name!r}")
            names.add(name)
            if gv.name_hint == "main":
                gv, func = tvm.ir.GlobalVar(name), func.with_attr("global_symbol", name)
            funcs[gv] = func
    return tvm.IRModule(funcs)


def _ty(spec: dict) -> str:
    shape = ", ".join(str(d) for d in spec["shape"]) + ("," if len(spec["shape"]) == 1 else "")
    return f'R.Tensor(({shape}), dtype="{spec["dtype"]}")'


def _params(names: list[str], specs: list[dict]) -> str:
    return ", ".join(f"{n}: {_ty(s)}" for n, s in zip(names, specs))


def loop_signature(graphs: dict) -> dict[str, list[dict]]:
    """The translate function's signature: src [B, S] int64, steps [1] int64, eos [1] int64 ->
    tokens [B, T] int64 (graphs: the encoder's and decoder_step's signatures)."""
    src = graphs[ENCODER]["inputs"][0]
    B, T = src["shape"][0], cache_shape(graphs)[1]
    one = {"shape": [1], "dtype": "int64"}
    ins = [dict(src, name=TRANSLATE_INPUTS[0]), dict(one, name=TRANSLATE_INPUTS[1]), dict(one, name=TRANSLATE_INPUTS[2])]
    return {"inputs": ins, "outputs": [{"name": TRANSLATE_OUTPUTS[0], "shape": [B, T], "dtype": "int64"}]}


def _loop_script(graphs: dict, gpu: bool) -> str:
    """TVMScript of stubs for encoder/decoder_step (replaced after parsing), the per-step kernel,
    decode_loop and translate. gpu: the kernel runs as one GPU thread (it is serial work on [B, V])."""
    enc, dec = graphs[ENCODER], graphs[DECODER]
    B, S = enc["inputs"][0]["shape"]
    _, T, Q = cache_shape(graphs)
    V = dec["outputs"][0]["shape"][1]
    # one lane for a vocabulary smaller than the lanes, and on GPUs (CUDA has no 8-wide int64 vector)
    W = ARGMAX_LANES if V >= ARGMAX_LANES and not gpu else 1
    L = decoder_layers(graphs)
    cache = {"shape": [B, T, Q], "dtype": "float32"}
    caches, cross = [f"c{i}" for i in range(2 * L)], [f"x{i}" for i in range(3 * L)]
    cross_specs = enc["outputs"]
    enc_ret = f"R.Tuple({', '.join(_ty(s) for s in cross_specs)})"
    dec_ret = f"R.Tuple({', '.join(_ty(s) for s in dec['outputs'])})"
    i64 = lambda *shape: _ty({"shape": list(shape), "dtype": "int64"})  # noqa: E731
    flags, flag = _ty({"shape": [B], "dtype": "bool"}), 'R.Tensor((), dtype="bool")'
    state = f"{_params(caches, [cache] * len(caches))}, {_params(cross, cross_specs)}"
    launch = ('\n        bx = T.launch_thread("blockIdx.x", 1)\n        tx = T.launch_thread("threadIdx.x", 1)'
              if gpu else "")
    scope = ', scope="local"' if gpu else ""
    return f"""
@I.ir_module
class Module:
    @R.function
    def {ENCODER}(src: {i64(B, S)}) -> {enc_ret}:
        return R.call_pure_packed("mosc.stub", src, ty_args={enc_ret})

    @R.function
    def {DECODER}(token: {i64(B)}, pos: {i64(1)}, {state}) -> {dec_ret}:
        return R.call_pure_packed("mosc.stub", token, ty_args={dec_ret})

    @T.prim_func(private=True)
    def {PICK}(logits: T.Buffer(({B}, {V}), "float32"), t: T.Buffer((1,), "int64"), steps: T.Buffer((1,), "int64"),
               eos: T.Buffer((1,), "int64"), done: T.Buffer(({B},), "bool"), tokens: T.Buffer(({B}, {T}), "int64"),
               nxt: T.Buffer(({B},), "int64"), tokens2: T.Buffer(({B}, {T}), "int64"), done2: T.Buffer(({B},), "bool"),
               t2: T.Buffer((1,), "int64"), live: T.Buffer((), "bool")):
        T.func_attr({{"tirx.noalias": True, "{SCHEDULED}": True, "{HAND}": True}}){launch}
        best = T.decl_buffer((1,), "float32"{scope})
        arg = T.decl_buffer((1,), "int64"{scope})
        left = T.decl_buffer((1,), "int32"{scope})
        lane_max = T.decl_buffer(({W},), "float32"{scope})
        lane_arg = T.decl_buffer(({W},), "int64"{scope})
        left[0] = 0
        for b in range({B}):
            # argmax: the first index of the largest logit (numpy's and torch's rule). {W} lanes each keep
            # the max of their column of logits and its first index (vectorised), then the lanes merge
            for w in T.vectorized({W}):
                lane_max[w] = logits[b, w]
                lane_arg[w] = T.int64(w)
            for v in range(1, {V // W}):
                for w in T.vectorized({W}):
                    lane_arg[w] = T.Select(logits[b, v * {W} + w] > lane_max[w], T.int64(v * {W} + w), lane_arg[w])
                    lane_max[w] = T.max(lane_max[w], logits[b, v * {W} + w])
            best[0] = lane_max[0]
            arg[0] = lane_arg[0]
            for w in range(1, {W}):
                if lane_max[w] > best[0] or (lane_max[w] == best[0] and lane_arg[w] < arg[0]):
                    best[0] = lane_max[w]
                    arg[0] = lane_arg[w]
            for v in range({V // W * W}, {V}):  # the tail: later indices win only when strictly larger
                if logits[b, v] > best[0]:
                    best[0] = logits[b, v]
                    arg[0] = T.int64(v)
            nxt[b] = arg[0]
            done2[b] = done[b] or arg[0] == eos[0]
            if not done2[b]:
                left[0] = left[0] + 1
            for j in range({T}):
                tokens2[b, j] = T.if_then_else(T.int64(j) == t[0], arg[0], tokens[b, j])
        t2[0] = t[0] + T.int64(1)
        live[()] = t2[0] < steps[0] and left[0] > 0

    @R.function
    def {LOOP}(t: {i64(1)}, steps: {i64(1)}, eos: {i64(1)}, token: {i64(B)}, done: {flags}, tokens: {i64(B, T)},
               live: {flag}, {state}) -> {i64(B, T)}:
        cls = Module
        if live:
            r = cls.{DECODER}(token, t, {", ".join(caches)}, {", ".join(cross)})
            p = R.call_tir(cls.{PICK}, (r[0], t, steps, eos, done, tokens),
                           out_ty=[{i64(B)}, {i64(B, T)}, {flags}, {i64(1)}, {flag}])
            out = cls.{LOOP}(p[3], steps, eos, p[0], p[2], p[1], p[4], {", ".join(f"r[{i + 1}]" for i in range(2 * L))},
                             {", ".join(cross)})
        else:
            out = tokens
        return out

    @R.function
    def {TRANSLATE}(src: {i64(B, S)}, steps: {i64(1)}, eos: {i64(1)}) -> {i64(B, T)}:
        cls = Module
        x = cls.{ENCODER}(src)
        with R.dataflow():
            zero = R.zeros(R.shape([{B}, {T}, {Q}]), "float32")
            t0 = R.zeros(R.shape([1]), "int64")
            bos = R.full(R.shape([{B}]), R.const({BOS_ID}, "int64"), "int64")
            done = R.zeros(R.shape([{B}]), "bool")
            tokens = R.full(R.shape([{B}, {T}]), R.const({PAD_ID}, "int64"), "int64")
            R.output(zero, t0, bos, done, tokens)
        out = cls.{LOOP}(t0, steps, eos, bos, done, tokens, R.const(True, "bool"), {", ".join(["zero"] * len(caches))},
                         {", ".join(f"x[{i}]" for i in range(len(cross)))})
        return out
"""


def add_greedy_loop(mod, graphs: dict, gpu: bool = False):
    """The merged translation module (merge_graphs) + greedy_pick, decode_loop and translate.

    graphs: the encoder's and decoder_step's signatures (mosc.compiler.passes.signature).
    gpu: for a GPU target (greedy_pick bound to one GPU thread)."""
    import tvm
    from tvm import relax
    from tvm.script import ir as I
    from tvm.script import relax as R
    from tvm.script import tirx as T

    script = tvm.script.from_source(_loop_script(graphs, gpu), extra_vars={"I": I, "R": R, "T": T})
    funcs = {gv: f for gv, f in mod.functions_items() if gv.name_hint not in (ENCODER, DECODER)}
    for gv, func in script.functions_items():
        name = gv.name_hint
        funcs[gv] = mod[name].with_attr("global_symbol", name) if name in (ENCODER, DECODER) else func
    try:
        return relax.transform.Normalize()(tvm.IRModule(funcs))
    except Exception as e:  # a signature that disagrees with the stubs
        raise MoscError(f"the greedy loop does not fit the graphs: {str(e).strip().splitlines()[0]}") from e

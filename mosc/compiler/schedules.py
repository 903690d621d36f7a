"""Default CPU schedules for the fused TIR functions of a graph, and a MetaSchedule matmul template.

    apply_default_schedules  IRModule -> IRModule: every PrimFunc not yet scheduled gets a rule
    default_schedule         one function's default schedule as a traced Schedule (the tuner records it)
    default_schedules_pass   the same as a module pass under the current target (FINISH)
    unscheduled_functions    names of the PrimFuncs that no rule could schedule (left naive)
    matmul_space             MetaSchedule schedule function: the matmul template, tiles sampled
    space_generator          MetaSchedule space: matmul_space united with the default post-order space

Why: TVM 0.27's `tvm.compile` schedules nothing on CPU, so a TIR function without a tuning
record runs as a naive loop nest (~100x slower than onnxruntime on a matmul). Rules, first
match wins:
    matmul     one block C[b.., m.., n..] += A[b.., m.., k] * B[b.., k, n..] (either operand
               layout), plus its elementwise epilogue: an MR x NR register tile of accumulators
               (NR along the contiguous axis of B, vectorised), K loop inside, epilogue fused
               at the tile. K-major B (what FoldConstant leaves for Linear weights) is the
               fast case; inner-reduction B ([N, K]) is vectorised along K (rfactor).
    reduction  softmax / layer_norm shaped functions (reductions and elementwise blocks over the
               same leading rows): every block under the row loop, inner loops vectorised.
    spatial    injective functions (elementwise, transpose, take, concatenate, pad):
               intermediate blocks inlined; elementwise nests fused and vectorised, others
               vectorised along their innermost loop; transposes (strided reads) keep their
               scalar loops, which measured 5x faster than vectorised gathers.

What it does NOT know: how fast a schedule is on another CPU (tiles follow the target's
vector width and register count, nothing was measured there), GPUs (non-llvm targets are
left to tvm.compile's own dlight pipeline), tuning databases, or which graphs these
functions come from. Functions already carrying "tirx.is_scheduled" (applied tuning
records) are never touched. Imports tvm only inside functions.
"""

from __future__ import annotations

from typing import Any

SCHEDULED_ATTR = "tirx.is_scheduled"  # what MetaScheduleApplyDatabase sets; tvm.compile skips nothing on CPU
DEFAULT_MARK = "mosc.default_schedule"  # root-block annotation (the rule's name) that ends every default schedule
MR_MAX = 6  # rows of the accumulator tile (unrolled); 6 x NR accumulators + broadcasts fit the register file
NR_VECTORS_WIDE = 4  # NR = this many vectors on a 32-register ISA (AVX-512, NEON): 6 x 4 = 24 registers
NR_VECTORS_NARROW = 2  # ... on a 16-register ISA (AVX2, SSE): 6 x 2 = 12 registers
INNER_NR = 8  # output columns per pass for inner-reduction B ([N, K]); measured best of 1/4/8 at [30,512]x[2048,512]^T
VECTORIZE_WHOLE_MAX = 4  # vectorise a loop whole when its extent is not a multiple of the lanes but <= this many vectors
PARALLEL_MIN_MACS = 1 << 22  # multiply-adds of a matmul below which a thread launch (~10 us) costs more than it saves
PARALLEL_MIN_ELEMENTS = 1 << 18  # elements of an elementwise/row function below which parallel does not pay
GEMV_ROWS = 8  # rows of B one pass of a streamed GEMV reads (unrolled): 8 concurrent streams keep the prefetchers busy
GEMV_STREAM_MIN = 1 << 16  # K x N elements of B from which an M = 1 matmul streams B row by row (below: the register tile)
TEMPLATE_MAX_NR = 128  # largest inner N tile the tuning template samples
TEMPLATE_MAX_MR = 8  # largest inner M tile the tuning template samples
TEMPLATE_MAX_INNER_NR = 16  # ... N tile for inner-reduction B (unrolled vectors of partial sums)


# ----------------------------------------------------------------------------- target facts
def _is_cpu(target) -> bool:
    return target is not None and target.kind.name == "llvm"


def _lanes(target, bits: int = 32) -> int:
    """fp32 lanes of one vector register (AVX-512: 16, AVX2: 8, NEON: 4)."""
    from tvm.target.codegen import llvm_get_vector_width

    try:
        width = int(llvm_get_vector_width(target))
    except Exception:  # no LLVM for this triple in the build: assume 128-bit vectors
        width = 128
    return max(width // bits, 1) if width > 0 else 4


def _many_registers(target) -> bool:
    """32 vector registers (AVX-512, AArch64) rather than 16 (AVX2/SSE)."""
    mtriple = str(target.attrs.get("mtriple", ""))
    return _lanes(target) >= 16 or "aarch64" in mtriple or "arm" in list(map(str, target.keys))


def _num_cores(target) -> int:
    try:
        return int(target.attrs.get("num-cores", 1) or 1)
    except Exception:
        return 1


# ----------------------------------------------------------------------------- IR helpers
def _extent(sch, loop) -> int | None:
    from tvm import tirx

    ext = sch.get(loop).extent
    return int(ext.value) if isinstance(ext, tirx.IntImm) else None


def _root_blocks(sch) -> list:
    return list(sch.get_child_blocks(sch.get_sblock("root")))


def _is_spatial_block(sch, block) -> bool:
    from tvm import tirx

    return all(iv.iter_type == tirx.IterVar.DataPar for iv in sch.get(block).iter_vars)


def _inline_all(sch, keep: set[str]) -> None:
    """compute_inline every spatial block that allows it, except those named in `keep`
    (outputs cannot be inlined; TVM refuses and we go on). Repeats until nothing moves."""
    changed = True
    while changed:
        changed = False
        for block in _root_blocks(sch):
            name = sch.get(block).name_hint
            if name in keep or not _is_spatial_block(sch, block):
                continue
            try:
                sch.compute_inline(block)
                changed = True
            except Exception:  # output block, or reads itself: stays a loop nest
                pass


def _vectorize_inner(sch, loop, lanes: int) -> None:
    """Vectorise `loop`: split by the lanes when they divide it, whole when it is short."""
    ext = _extent(sch, loop)
    if ext is None or ext < 2:
        return
    if ext % lanes == 0 and ext > lanes:
        sch.vectorize(sch.split(loop, [None, lanes])[1])
    elif ext <= VECTORIZE_WHOLE_MAX * lanes:
        sch.vectorize(loop)  # e.g. 30 fp32: LLVM legalises <30 x float> into 2 vectors
    else:  # long and ragged: a vector of lanes with a scalar tail (TVM scalarises the predicated loop)
        sch.vectorize(sch.split(loop, [None, lanes])[1])


# ----------------------------------------------------------------------------- matmul pattern
def _strip_cast(e):
    from tvm import tirx

    while isinstance(e, tirx.Cast):
        e = e.value
    return e


def _plain_indices(load) -> list | None:
    """The load's indices as Vars (None for a constant index); None if any index is an expression."""
    from tvm import tirx

    out = []
    for i in load.indices:
        if isinstance(i, tirx.Var):
            out.append(i)
        elif isinstance(i, tirx.IntImm):
            out.append(None)
        else:
            return None
    return out


def match_matmul(sch, block) -> dict | None:
    """Roles of a matmul-like block's loops, or None when it is not one.

    Matches C[..] = C[..] + A[..] * B[..] with exactly one reduction iter k and plain-variable
    indices; each spatial iter is batch (in A and B), m (in A only) or n (in B only). Returns
    {"batch": [loops], "m": [loops], "n": [loops], "k": loop, "inner": bool} where `inner` says
    B is stored [.., N, K] (k contiguous: an inner reduction) rather than [.., K, N].
    """
    import tvm
    from tvm import tirx
    from tvm.s_tir.dlight.analysis.common_analysis import get_sblockrealize

    stmt = sch.get(block)
    if stmt.init is None or not isinstance(stmt.body, tirx.BufferStore) or len(stmt.writes) != 1:
        return None
    red = [iv for iv in stmt.iter_vars if iv.iter_type == tirx.IterVar.CommReduce]
    if len(red) != 1 or any(iv.iter_type not in (tirx.IterVar.DataPar, tirx.IterVar.CommReduce) for iv in stmt.iter_vars):
        return None
    store = stmt.body
    value = store.value
    if not isinstance(value, tirx.Add):
        return None
    # TVM 0.27: a load is tvm.ir.expr.TensorLoad (tirx.BufferLoad is its constructor), buffer in .source
    Load = tvm.ir.expr.TensorLoad
    acc, prod = value.a, value.b
    if not (isinstance(acc, Load) and acc.source.same_as(store.buffer)):
        acc, prod = prod, acc
    prod = _strip_cast(prod)
    if not (isinstance(acc, Load) and acc.source.same_as(store.buffer) and isinstance(prod, tirx.Mul)):
        return None
    a, b = _strip_cast(prod.a), _strip_cast(prod.b)
    if not (isinstance(a, Load) and isinstance(b, Load)):
        return None
    ia, ib, ic = _plain_indices(a), _plain_indices(b), _plain_indices(store)
    if ia is None or ib is None or ic is None:
        return None
    k = red[0].var
    in_a = {v for v in ia if v is not None}
    in_b = {v for v in ib if v is not None}
    if k not in in_a or k not in in_b or k in set(ic):
        return None
    n_vars = [iv.var for iv in stmt.iter_vars if iv.var in in_b and iv.var not in in_a]
    if not n_vars:  # the operand holding N is B; swap when A is the one with the output's columns
        a, b, ia, ib, in_a, in_b = b, a, ib, ia, in_b, in_a
        n_vars = [iv.var for iv in stmt.iter_vars if iv.var in in_b and iv.var not in in_a]
        if not n_vars:
            return None
    # the loops must be one per iter var, bound 1:1 (what legalize's T.axis.remap gives)
    loops = sch.get_loops(block)
    realize = get_sblockrealize(sch, block)
    if len(loops) != len(stmt.iter_vars):
        return None
    roles: dict[str, Any] = {"batch": [], "m": [], "n": [], "k": None}
    for loop, iv, val in zip(loops, stmt.iter_vars, realize.iter_values):
        if not (isinstance(val, tirx.Var) and val.same_as(sch.get(loop).loop_var)):
            return None
        v = iv.var
        if v.same_as(k):
            roles["k"] = loop
        elif v in in_a and v in in_b:
            roles["batch"].append(loop)
        elif v in in_a:
            roles["m"].append(loop)
        elif v in in_b:
            roles["n"].append(loop)
        else:  # an output axis neither operand reads: a broadcast matmul, not this template
            return None
    if not roles["n"]:
        return None
    # the output's last axis must be an n axis (vectorised stores) and B's last index k or n
    if ic[-1] is None or ic[-1] not in set(n_vars):
        return None
    last_b = ib[-1]
    if last_b is None:
        return None
    roles["inner"] = last_b.same_as(k)
    if not roles["inner"] and last_b not in set(n_vars):
        return None
    roles["macs"] = 1
    for iv in stmt.iter_vars:
        ext = iv.dom.extent
        roles["macs"] *= int(ext.value) if isinstance(ext, tirx.IntImm) else 1 << 10
    return roles


def _find_matmul(sch):
    """(block, roles) of the one matmul-like block of the function, or None."""
    found = []
    for block in _root_blocks(sch):
        if not _is_spatial_block(sch, block):
            roles = match_matmul(sch, block)
            if roles is None:
                return None  # another reduction (softmax inside?): not this template's function
            found.append((block, roles))
    return found[0] if len(found) == 1 else None


def _producers_closure(sch, block) -> set[str]:
    """Names of every block the given block (transitively) reads from."""
    seen: set[str] = set()
    stack = [block]
    while stack:
        for p in sch.get_producers(stack.pop()):
            name = sch.get(p).name_hint
            if name not in seen:
                seen.add(name)
                stack.append(p)
    return seen


def _pick_tile(extent: int | None, preferred: int, lanes: int, pow2_vectors: bool = False) -> int:
    """Tile of a loop: the whole extent when it is short; else the divisor of the extent,
    at most `preferred`, that fills its vectors best (the larger on a tie), e.g. N=1000 with
    16 lanes: 40 (3 vectors, 83% full) rather than a ragged 64 (a predicated tail is
    scalarised: 0.83 ms instead of 0.02 ms for [1,512]x[512,1000]); `preferred` with a
    ragged tail only when no divisor reaches half a vector. lanes=1: plain largest divisor.
    pow2_vectors: the N tile under an unrolled M tile: the largest divisor that is 1, 2, 4.. whole
    vectors (half a vector for a long N without one), when one exists; else as above (a short
    N, e.g. 30, stays whole: not measured).
    """
    if extent is None:
        return preferred
    if pow2_vectors:
        # a register tile of 3 or 5 vectors (48, 80 fp32 on AVX-512) or a partial one (40) under
        # an unrolled M tile ran 10-90x slower than 1, 2 or 4 whole vectors (measured, 1 thread,
        # [64,128]x[128,N]: N=48 66 us with tile 48, 6 us with 16; N=96 548 vs 8 us with 32;
        # N=80 456 vs 10 us; N=192 620 us with 48, 16 us with 64; N=1000 4.3 ms with 40, 0.7 ms with 8)
        sizes = [lanes << j for j in range(8) if lanes << j <= preferred]
        if extent > preferred:  # long and no whole-vector divisor: half a vector beats 2.5 vectors
            sizes.append(max(1, lanes // 2))
        fits = [d for d in sizes if extent % d == 0]
        if fits:
            return max(fits)
    if extent <= preferred:
        return extent
    best, best_fill = None, 0.0
    for d in range(max(1, lanes // 2), preferred + 1):
        if extent % d == 0:
            fill = d / (-(-d // lanes) * lanes)
            if fill >= best_fill:
                best, best_fill = d, fill
    return best if best is not None else preferred


def _matmul_schedule(sch, block, roles, target, tiles: tuple | None, sample: bool) -> None:
    """The matmul template on `sch` in place: tile, order, vectorise, fuse the epilogue.

    Loop order (K-major B): batch, n0, m0, k, m1 (unrolled), n1 (vectorised), so the MR x NR
    accumulators live in registers through the whole K loop and each k streams one row of B.
    Inner-reduction B ([N, K]): see _inner_reduction.
    tiles = (mr, nr) fixes the tile; sample=True draws both with sample_perfect_tile (tuning).
    """
    name = sch.get(block).name_hint
    lanes = _lanes(target)
    # prologue blocks stay separate nests; everything else (bias, residual, relu, masks) inlines
    # into the one output block, which is then fused at the tile
    prologue = _producers_closure(sch, block)
    _inline_all(sch, keep=prologue | {name})
    for other in _root_blocks(sch):  # prologue nests (rare: PREPARE fuses reshapes into the matmul)
        if sch.get(other).name_hint in prologue and _is_spatial_block(sch, other):
            _spatial_nest(sch, other, target)
    block = sch.get_sblock(name)
    roles = match_matmul(sch, block)
    order = roles["batch"] + roles["m"] + roles["n"] + [roles["k"]]
    sch.reorder(*order)
    batch = sch.fuse(*roles["batch"]) if len(roles["batch"]) > 1 else (roles["batch"][0] if roles["batch"] else None)
    m = (sch.fuse(*roles["m"]) if len(roles["m"]) > 1 else roles["m"][0]) if roles["m"] else None
    n = sch.fuse(*roles["n"]) if len(roles["n"]) > 1 else roles["n"][0]
    k = roles["k"]
    if roles["inner"]:
        _inner_reduction(sch, block, batch, m, n, k, target, sample)
        return
    m_ext, n_ext = (_extent(sch, m) if m is not None else 1), _extent(sch, n)
    if not sample and m_ext == 1 and (batch is None or _extent(sch, batch) == 1) \
            and (_extent(sch, k) or 0) * (n_ext or 0) >= GEMV_STREAM_MIN:
        _stream_gemv(sch, block, [x for x in (batch, m) if x is not None], n, k, target, roles["macs"])
        return
    if sample:
        nf = sch.sample_perfect_tile(n, n=2, max_innermost_factor=TEMPLATE_MAX_NR)
        n0, n1 = sch.split(n, nf)
        if m is not None:
            mf = sch.sample_perfect_tile(m, n=2, max_innermost_factor=TEMPLATE_MAX_MR)
            m0, m1 = sch.split(m, mf)
    else:
        mr, nr = tiles or (MR_MAX, lanes * (NR_VECTORS_WIDE if _many_registers(target) else NR_VECTORS_NARROW))
        n0, n1 = sch.split(n, [None, _pick_tile(n_ext, nr, lanes, pow2_vectors=m is not None and (m_ext or 2) > 1)])
        if m is not None:  # a ragged M tile is cheap (its predicate is outside the vector loop)
            m0, m1 = sch.split(m, [None, _pick_tile(m_ext, mr, mr)])
    outer = [x for x in (batch, n0) if x is not None]
    if m is not None:
        sch.reorder(*outer, m0, k, m1, n1)
    else:
        sch.reorder(*outer, k, n1)
    sch.vectorize(n1)  # before decompose_reduction: vectorising the init afterwards fails
    if m is not None:
        sch.unroll(m1)
    if _num_cores(target) > 1 and roles["macs"] >= PARALLEL_MIN_MACS and not sample:
        # before decompose_reduction: `parallel` wants complete/reduction blocks below it
        par = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        if (_extent(sch, par) or 0) >= _num_cores(target):
            sch.parallel(par)
    sch.decompose_reduction(block, k)
    at = m0 if m is not None else n0
    for consumer in sch.get_consumers(block):
        try:
            # unit loops kept: a tuning trace must get as many loops back whatever tiles it samples
            sch.reverse_compute_at(consumer, at, preserve_unit_loops=True)
            if sample:  # no extent-dependent branching in a trace: the N tile, vectorised whole
                sch.vectorize(sch.get_loops(consumer)[-1])
            else:
                _vectorize_inner(sch, sch.get_loops(consumer)[-1], lanes)
        except Exception:  # e.g. a pad whose output outgrows the tile: its own nest, vectorised
            _spatial_nest(sch, consumer, target)


def _stream_gemv(sch, block, outer: list, n, k, target, macs: int) -> None:
    """M = 1 with K-major B ([K, N], a decoder step's Linear): k outside, so B is read once,
    front to back, GEMV_ROWS rows per pass: order outer.., k0, n0, k1 (unrolled), n1 (vectorised).
    The output row (N floats, <= 32 KB for N = 8000) stays in L1 as the accumulator; the
    epilogue (bias, residual, relu) runs after the whole reduction as its own vectorised nest.

    Why: the register tile (n0 outside k) walks B column strip by strip, N / NR strided streams
    of NR floats per row; a decoder step's weights come from L3 or DRAM (each is read once per
    step), where that pattern starves the prefetchers. Measured (benchmarks/gemv_streaming.py,
    1 thread, znver5; cold = weights rotated through 400 MB so each call reads DRAM): cold
    0.76-0.84x the register tile's time on 5 of 6 decoder shapes and equal on [512,8000];
    warm 0.43-0.67x (equal on [512,8000]); cold vs onnxruntime 0.74-1.09x.
    With num-cores > 1 the N strips are split across cores outside k (each core streams its
    columns of every row).
    """
    lanes = _lanes(target)
    k_ext, n_ext = _extent(sch, k), _extent(sch, n)
    nr = lanes * (NR_VECTORS_WIDE if _many_registers(target) else NR_VECTORS_NARROW)
    k0, k1 = sch.split(k, [None, _pick_tile(k_ext, GEMV_ROWS, 1)])
    n0, n1 = sch.split(n, [None, _pick_tile(n_ext, nr, lanes, pow2_vectors=True)])
    cores, par = _num_cores(target), []
    strips = _extent(sch, n0) or 0
    if cores > 1 and macs >= PARALLEL_MIN_MACS and strips % cores == 0:
        par_loop, n0 = sch.split(n0, [cores, None])
        par = [par_loop]
    sch.reorder(*outer, *par, k0, n0, k1, n1)
    sch.vectorize(n1)
    sch.unroll(k1)
    if par:
        sch.parallel(par[0])
    sch.decompose_reduction(block, k0)
    for consumer in sch.get_consumers(block):
        _spatial_nest(sch, consumer, target)


def _inner_reduction(sch, block, batch, m, n, k, target, sample: bool) -> None:
    """B stored [.., N, K]: vectorise along K with rfactor, NR output columns per pass.

    Order batch, n0, m, k0, n1 (unrolled), k1 (vectorised): rfactor turns k1 into a vector of
    partial sums per output (buffer [.., N, lanes], lanes last so stores are contiguous), a
    second block adds the lanes up. Row n of B stays in L1 while every row of A passes.
    Measured (1 thread, znver5): [1,512]x[8000,512]^T 0.23 ms (naive 3.9 ms; a scalar 4x4
    register tile 9.9 ms), [30,512]x[2048,512]^T 0.55 ms (naive 29 ms; K-major layout 0.30 ms).
    """
    lanes = _lanes(target)
    k_ext, n_ext = _extent(sch, k), _extent(sch, n)
    kv = lanes if k_ext is None or k_ext % lanes == 0 else _pick_tile(k_ext, lanes, 1)
    k0, k1 = sch.split(k, [None, kv])
    if sample:
        n0, n1 = sch.split(n, sch.sample_perfect_tile(n, n=2, max_innermost_factor=TEMPLATE_MAX_INNER_NR))
    else:
        n0, n1 = sch.split(n, [None, _pick_tile(n_ext, INNER_NR, 1)])
    rows = [x for x in (batch, n0, m) if x is not None]
    sch.reorder(*rows, n1, k0, k1)
    ndim = len(sch.get(block).writes[0].region)
    rf = sch.rfactor(k1, factor_axis=ndim)  # rf buffer: the output's shape + [kv]
    loops = sch.get_loops(rf)  # rows..., n1, k0, k1
    sch.reorder(loops[-2], loops[-3])  # k0 outside n1: NR vectors of partial sums in registers
    loops = sch.get_loops(rf)
    sch.vectorize(loops[-1])
    sch.unroll(loops[-2])
    sch.decompose_reduction(rf, loops[-3])
    at = rows[-1]  # the lane-sum block (rfactor leaves it there) and the epilogue go under the rows
    for consumer in sch.get_consumers(block):
        try:
            sch.reverse_compute_at(consumer, at, preserve_unit_loops=True)
        except Exception:  # its own nest
            _spatial_nest(sch, consumer, target)


# ----------------------------------------------------------------------------- other rules
def _access_pattern(sch, block) -> str:
    """How an injective block reads along its innermost non-unit loop:
    "elementwise"  every read has the write's indices, or none of them (scalars, broadcast rows)
    "contiguous"   reads are contiguous (or invariant) along the innermost loop
    "strided"      some read jumps along it (a transpose): vectorising gathers
    """
    import tvm_ffi
    from tvm import tirx

    stmt = sch.get(block)
    ivs = [iv for iv in stmt.iter_vars]
    loops = sch.get_loops(block)
    if len(loops) != len(ivs) or len(stmt.writes) != 1:
        return "strided"  # not remap-bound: do not guess
    inner = next((iv.var for iv in reversed(ivs) if not (isinstance(iv.dom.extent, tirx.IntImm)
                                                         and int(iv.dom.extent) == 1)), None)
    if inner is None:
        return "elementwise"
    write = [r.min for r in stmt.writes[0].region]

    def uses(e, v):
        return any(u.same_as(v) for u in tirx.analysis.undefined_vars(e))

    elementwise, strided = True, False
    for r in stmt.reads:
        mins = [x.min for x in r.region]
        same = len(mins) == len(write) and all(tvm_ffi.structural_equal(a, b) for a, b in zip(mins, write))
        if not same and any(uses(m, iv.var) for m in mins for iv in ivs):  # neither the write's nor a scalar
            elementwise = False
        if any(uses(m, inner) for m in mins[:-1]) or (mins and uses(mins[-1], inner)
                                                      and not mins[-1].same_as(inner)
                                                      and not tvm_ffi.structural_equal(mins[-1], inner)):
            strided = True
    return "elementwise" if elementwise else "strided" if strided else "contiguous"


def _spatial_nest(sch, block, target) -> None:
    """Schedule one injective loop nest by its access pattern (see _access_pattern).

    elementwise: fuse all loops, vectorise (one contiguous stream). contiguous: vectorise the
    innermost loop only (fusing it with the rows would put div/mod in every lane's index).
    strided: keep the loop nest; measured on a [1,30,512] -> [1,4,128,30] transpose, the
    vectorised gather ran 5x slower (73 us vs 15 us) than the scalar loops.
    Parallel over the outer loop only when large enough to pay for the thread launch.
    """
    loops = sch.get_loops(block)
    if not loops:
        return
    lanes = _lanes(target)
    kind = _access_pattern(sch, block)
    if kind == "strided":
        return
    if kind == "elementwise":
        loops = [sch.fuse(*loops)] if len(loops) > 1 else loops
    exts = [_extent(sch, lp) for lp in loops]
    size = 1
    for e in exts:
        size = size * e if e is not None and size is not None else None
    last = max((i for i, e in enumerate(exts) if e != 1), default=len(loops) - 1)
    cores = _num_cores(target)
    if cores > 1 and size is not None and size >= PARALLEL_MIN_ELEMENTS:
        if last == 0:  # one loop: split off a few chunks per core
            outer, rest = sch.split(loops[0], [cores * 4, None])
            sch.parallel(outer)
            loops, last = [outer, rest], 1
        else:
            sch.parallel(sch.fuse(*loops[:last]) if last > 1 else loops[0])
            loops = sch.get_loops(block)
            last = len(loops) - 1 - sum(1 for e in exts[last + 1:])
    _vectorize_inner(sch, loops[last], lanes)


def _spatial_rule(sch, target) -> bool:
    """Injective function: inline intermediates, vectorise each remaining nest."""
    blocks = _root_blocks(sch)
    if not blocks or not all(_is_spatial_block(sch, b) for b in blocks):
        return False
    _inline_all(sch, keep=set())
    for block in _root_blocks(sch):
        _spatial_nest(sch, block, target)
    return True


def _reduction_rule(sch, target) -> bool:
    """softmax / layer_norm: reductions and elementwise blocks over the same leading rows.

    Like dlight's cpu.Reduction, but on the loops as legalize wrote them (dlight's
    normalize_prim_func drops unit loops from some blocks only, so a [1, 512] layer_norm's
    "rows" became its 512 columns), and parallel only when the target has cores and the
    function enough elements (a thread launch costs more than a [1, 4, 1, 30] softmax).
    """
    from tvm import tirx

    blocks = _root_blocks(sch)
    if len(blocks) < 2:
        return False
    kinds = []
    for b in blocks:
        stmt = sch.get(b)
        if len(sch.get_loops(b)) != len(stmt.iter_vars):
            return False
        kind = "".join("S" if iv.iter_type == tirx.IterVar.DataPar else
                       "R" if iv.iter_type == tirx.IterVar.CommReduce else "O" for iv in stmt.iter_vars)
        kinds.append(kind)
    if all("R" not in k for k in kinds) or "R" in kinds[-1] or any(k.strip("S") and set(k.lstrip("S")) != {"R"} for k in kinds):
        return False  # needs reductions (S..S R..R), then an elementwise last block
    leading = min(len(k) - len(k.lstrip("S")) for k in kinds)
    if leading == 0 or leading >= len(kinds[-1]):
        return False
    lanes = _lanes(target)
    last = blocks[-1]
    loops = sch.get_loops(last)
    rows = sch.fuse(*loops[:leading]) if leading > 1 else loops[0]
    cores = _num_cores(target)
    elements = 1
    for iv in sch.get(last).iter_vars:
        ext = iv.dom.extent
        elements *= int(ext.value) if isinstance(ext, tirx.IntImm) else 1 << 10
    if cores > 1 and elements >= PARALLEL_MIN_ELEMENTS and (_extent(sch, rows) or 0) >= cores:
        sch.parallel(rows)
    tail = sch.get_loops(last)[1:]  # after the fuse: [rows, columns...]
    if len(tail) > 1:
        tail = [sch.fuse(*tail)]
    _vectorize_inner(sch, tail[0], lanes)
    for b in reversed(blocks[:-1]):
        sch.compute_at(b, rows, preserve_unit_loops=True)
    for b, kind in zip(blocks[:-1], kinds[:-1]):
        inner = sch.get_loops(b)[-1]
        if sch.get_sref(inner).same_as(sch.get_sref(rows)):
            continue  # e.g. layer_norm's mean: one value per row
        if "R" not in kind:
            _vectorize_inner(sch, inner, lanes)
        else:
            ext = _extent(sch, inner)
            if ext is not None and ext > lanes:  # let LLVM unroll the reduction by a vector's worth
                _, r = sch.split(inner, [None, lanes])
                sch.annotate(r, "pragma_auto_unroll_max_step", lanes)
                sch.annotate(r, "pragma_unroll_explicit", 1)
    return True


def _matmul_rule(sch, target) -> bool:
    found = _find_matmul(sch)
    if found is None:
        return False
    _matmul_schedule(sch, *found, target, tiles=None, sample=False)
    return True


RULES = [("matmul", _matmul_rule), ("reduction", _reduction_rule), ("spatial", _spatial_rule)]


def default_schedule(func_or_mod, target) -> tuple[Any, str | None]:
    """(traced Schedule with the default rule applied and marked, rule name), or (None, None)
    when no rule applies. Takes a PrimFunc or a one-function IRModule (a tuning workload).

    The Schedule's trace is replayable: the tuner commits it as a database record next to the
    tuned candidates, measured alike, so a build applies a tuned record only where it beats
    this (mosc.compiler.tune). The last instruction annotates the root block with
    DEFAULT_MARK, which tells such a record from tuned ones in a database (is_default_trace);
    lowering ignores the annotation. A rule that raises half-way is discarded whole: each
    attempt works on a fresh Schedule.
    """
    from tvm import s_tir

    for name, rule in RULES:
        sch = s_tir.Schedule(func_or_mod)
        try:
            if not rule(sch, target):
                continue
            sch.annotate(sch.get_sblock("root"), DEFAULT_MARK, name)
        except Exception:  # a shape the rule did not foresee: try the next one
            continue
        return sch, name
    return None, None


def is_default_trace(trace) -> bool:
    """True for the trace of a default_schedule (its DEFAULT_MARK annotation), e.g. a record's."""
    for inst in reversed(list(trace.insts)):
        if inst.kind.name == "Annotate" and inst.attrs and str(inst.attrs[0]) == DEFAULT_MARK:
            return True
    return False


def default_rule_of(func) -> str | None:
    """The rule name a scheduled PrimFunc's DEFAULT_MARK carries (a default schedule, applied by
    the FINISH pass or replayed from a database record), else None (tuned, or unscheduled)."""
    block = getattr(func.body, "block", None)
    if block is None or block.annotations is None:
        return None
    rule = block.annotations.get(DEFAULT_MARK)
    return None if rule is None else str(rule)


def schedule_func(func, target) -> tuple[Any, str | None]:
    """(scheduled PrimFunc, rule name), or (func unchanged, None) when no rule applies."""
    sch, name = default_schedule(func, target)
    if sch is None:
        return func, None
    return sch.mod["main"].with_attr(SCHEDULED_ATTR, True), name


def _is_scheduled(func) -> bool:
    return bool(func.attrs is not None and func.attrs.get(SCHEDULED_ATTR, False))


def apply_default_schedules(mod, target=None):
    """Every unscheduled PrimFunc of `mod` with its default schedule (and "tirx.is_scheduled").

    target: a tvm Target (default: the current one). Non-CPU targets: `mod` unchanged.
    Functions no rule matches stay as they are and unmarked (see unscheduled_functions).
    """
    import tvm
    from tvm import tirx

    target = target if target is not None else tvm.target.Target.current(allow_none=True)
    if not _is_cpu(target):
        return mod
    updates = {}
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc) and not _is_scheduled(func):
            new, rule = schedule_func(func, target)
            if rule is not None:
                updates[gv] = new
    if not updates:
        return mod
    mod = mod.clone()  # a pass must not mutate its input
    for gv, func in updates.items():
        mod[gv] = func
    return mod


def default_schedules_pass():
    """Module pass: apply_default_schedules under Target.current() (FINISH, after apply_database)."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="mosc.DefaultSchedules")
    def _pass(mod, _ctx):
        return apply_default_schedules(mod, tvm.target.Target.current(allow_none=True))

    return _pass


def unscheduled_functions(mod) -> list[str]:
    """Names of the PrimFuncs in `mod` without "tirx.is_scheduled": they run as naive loops."""
    from tvm import tirx

    return sorted(gv.name_hint for gv, f in mod.functions_items()
                  if isinstance(f, tirx.PrimFunc) and not _is_scheduled(f))


# ----------------------------------------------------------------------------- tuning template
def matmul_space(sch, target=None):
    """MetaSchedule schedule function: the matmul template with sampled tiles, or no space.

    Returns [sch] with both tiles drawn by sample_perfect_tile (so the search and its
    tile-size mutator explore them) when the workload is one matmul plus epilogue, else []
    (the workload then gets only the other generators' spaces). target: for the vector width
    of the epilogue; default Target.current(), else plain llvm.
    """
    import tvm

    if target is None:
        target = tvm.target.Target.current(allow_none=True) or tvm.target.Target("llvm")
    found = _find_matmul(sch)
    if found is None:
        return []
    try:
        _matmul_schedule(sch, *found, target, tiles=None, sample=True)
    except Exception:  # a matmul the template cannot tile: leave it to PostOrderApply
        return []
    return [sch]


def space_generator(target, *, default_space: bool = True):
    """A MetaSchedule space generator for a TuneContext: the matmul template (matmul-like
    workloads only) united with MetaSchedule's default PostOrderApply space (every workload).

        ctx = ms.TuneContext(mod=task.dispatched[0], target=target,
                             space_generator=space_generator(target), ...)

    target: the tvm Target tuned for (vector width of the template's fixed parts). Schedule
    rules, postprocessors and mutators come from the TuneContext's target, as for
    "post-order-apply". default_space=False: the template alone (a workload that is no
    matmul then has an empty design space: MetaSchedule fails it).
    """
    from tvm.s_tir import meta_schedule as ms

    def template(sch):
        return matmul_space(sch, target)

    generators = [ms.space_generator.ScheduleFn(template)]
    if default_space:
        generators.append(ms.space_generator.PostOrderApply())
    return ms.space_generator.SpaceGeneratorUnion(generators)

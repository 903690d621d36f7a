"""mosc.compiler.loop: the greedy loop's per-step kernel (greedy_pick) against numpy, on logits built
to break it: ties inside and across the argmax's lanes, the maximum in the tail past the last whole
lane group, at index 0, everywhere equal, and a vocabulary smaller than the lanes. The whole loop is
checked against the Python loop and torch in tests/test_export.py."""

import numpy as np
import pytest

from mosc.compiler.loop import ARGMAX_LANES, PICK, _loop_script
from mosc.contract import cache_names, dec_inputs, dec_outputs, enc_outputs


def _graphs(B: int, V: int, S: int = 4, T: int = 5, Q: int = 8, L: int = 1) -> dict:
    """Signatures as the contract has them (only names and shapes matter here)."""
    t = lambda n, shape, dt="float32": {"name": n, "shape": shape, "dtype": dt}  # noqa: E731
    cross = [t(n, [B, 1, 1, S] if n.startswith("cross_bias") else [B, S, Q]) for n in enc_outputs(L)]
    caches = [t(n, [B, T, Q]) for n in cache_names(L)]
    dec_in = [t("token", [B], "int64"), t("pos", [1], "int64"), *caches, *cross]
    assert [s["name"] for s in dec_in] == dec_inputs(L)
    return {"encoder": {"inputs": [t("src", [B, S], "int64")], "outputs": cross},
            "decoder_step": {"inputs": dec_in,
                             "outputs": [t(n, [B, V] if n == "logits" else [B, T, Q]) for n in dec_outputs(L)]}}


def _pick(B: int, V: int, T: int = 5):
    import tvm
    from tvm.script import ir as I
    from tvm.script import relax as R
    from tvm.script import tirx as Tx

    mod = tvm.script.from_source(_loop_script(_graphs(B, V, T=T), gpu=False), extra_vars={"I": I, "R": R, "T": Tx})
    func = mod[PICK].with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), target=tvm.target.Target({"kind": "llvm"}))
    dev = tvm.cpu()

    def run(logits, t, steps, eos, done, tokens):
        ins = [logits.astype("float32"), np.array([t]), np.array([steps]), np.array([eos]), np.asarray(done, bool),
               np.asarray(tokens, np.int64)]
        outs = [np.zeros((B,), np.int64), np.zeros((B, T), np.int64), np.zeros((B,), bool), np.zeros((1,), np.int64),
                np.zeros((), bool)]
        ts = [tvm.runtime.tensor(x, dev) for x in ins + outs]
        lib["main"](*ts)
        return [x.numpy() for x in ts[len(ins):]]

    return run


def _hard_logits(V: int, rng) -> list[np.ndarray]:
    W = ARGMAX_LANES
    cases = [np.zeros(V), rng.standard_normal(V)]  # all equal: index 0
    x = rng.standard_normal(V)
    x[[1, V - 1]] = 9.0  # a tie between lane 1 and the last index
    cases.append(x)
    if V > 2 * W + 1:
        x = rng.standard_normal(V)
        x[[W + 3, 2 * W + 1]] = 9.0  # a tie across lanes: index 11 (lane 3) beats the later 17 (lane 1)
        cases.append(x)
    x = rng.standard_normal(V)
    x[V - 1] = 9.0  # the maximum in the tail (V not a multiple of the lanes)
    cases.append(x)
    x = rng.standard_normal(V)
    x[0] = 9.0
    cases.append(x)
    x = np.round(rng.standard_normal(V))  # many ties everywhere
    cases.append(x)
    return cases


@pytest.mark.parametrize("V", [3, ARGMAX_LANES, 2 * ARGMAX_LANES + 3, 887])
def test_greedy_pick_is_numpy_argmax(V):
    rng = np.random.default_rng(V)
    run = _pick(2, V)
    for x in _hard_logits(V, rng):
        logits = np.stack([x, -x])
        nxt, *_ = run(logits, 0, 5, -1, [False, False], np.zeros((2, 5)))
        assert nxt.tolist() == logits.astype("float32").argmax(-1).tolist(), (V, x)


def test_greedy_pick_bookkeeping():
    """tokens[:, t] written, done at eos (and kept once set), t + 1, and live only while t + 1 < steps
    and some row is not done."""
    run = _pick(2, 16)
    logits = np.zeros((2, 16))
    logits[0, 7], logits[1, 2] = 1.0, 1.0
    tokens = np.full((2, 5), 9)
    nxt, tok2, done2, t2, live = run(logits, 2, 5, 2, [False, False], tokens)
    assert nxt.tolist() == [7, 2] and tok2.tolist() == [[9, 9, 7, 9, 9], [9, 9, 2, 9, 9]]
    assert done2.tolist() == [False, True] and t2.tolist() == [3] and bool(live)
    _, _, done2, _, live = run(logits, 2, 5, 7, [False, True], tokens)  # row 1 was done before: stays done
    assert done2.tolist() == [True, True] and not bool(live)
    *_, t2, live = run(logits, 3, 4, -1, [False, False], tokens)  # the last step: t + 1 == steps
    assert t2.tolist() == [4] and not bool(live)

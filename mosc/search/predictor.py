"""Latency predictors: features -> milliseconds, fitted on latency-DB rows or HAT's CSVs.

Search world: numpy, scipy and xgboost only (never torch, never tvm).

Features (`FEATURE_SETS`):
  hat     HAT's 10 summary features, divided by the space maxima (HAT's predictor input).
  cost    hat + analytic multiply-accumulates (MACs) and bytes moved per component
          (encoder attention / FFN, decoder self attention / cross attention / FFN, output
          projection) + op counts. Every cost is linear in the per-layer dims, so computing
          it from HAT's layer averages (layers x mean dim) is exact for rows without an arch.
  layers  cost + the per-layer encoding (`SearchSpace.encode_layers`); needs an arch JSON
          on every row (DB rows from `mosc measure`, not HAT imports).

Models (`MODELS`):
  mlp     HAT's predictor: 10 -> 3 x 400 ReLU -> 1, MSE, Adam (numpy).
  lsq     physically structured: latency = sum of non-negative per-component costs
          (coefficients x MACs / bytes / op counts), robust (Huber IRLS) non-negative least squares.
  gbt     xgboost gradient-boosted trees on `cost`/`layers` features, log-latency target,
          pseudo-Huber loss (robust to the Raspberry Pi file's outliers).
  hybrid  lsq, then gbt on the log residual (log(y) - log(lsq(x))).
  The default is lsq: best on all three HAT files (benchmarks/predictor_accuracy.py).

A fitted predictor is saved as JSON (metadata + numeric parameters), plus for the tree
models xgboost's own JSON model file next to it (`<name>.xgb.json`, sha256 checked). No pickle.
"""

from __future__ import annotations

import enum
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from mosc.errors import MoscError
from mosc.space import HAT_FEATURE_NAMES, Arch, SearchSpace

FORMAT = "mosc-latency-predictor"
VERSION = 1


class Model(enum.StrEnum):
    """The predictor families."""

    lsq = "lsq"  # robust non-negative fit of per-component costs (best on HAT's data)
    mlp = "mlp"  # HAT's 10 -> 3x400 -> 1
    gbt = "gbt"  # xgboost on the features
    hybrid = "hybrid"  # lsq + gbt on its residual (best on untuned TVM timings)


class FeatureSet(enum.StrEnum):
    """What a predictor sees of an arch."""

    hat = "hat"  # HAT's 10 summary features
    cost = "cost"  # per-component MACs and bytes
    layers = "layers"  # cost features + per-layer encoding (rows need the full arch)


FEATURE_SETS = tuple(FeatureSet)
MODELS = tuple(Model)
HAT_VOCAB = 32768  # output-projection vocabulary assumed by the cost features (a constant factor)

# the per-component cost names (in order) appended by the "cost" feature set
COMPONENTS = ("enc_attn", "enc_ffn", "dec_self_attn", "dec_cross_attn", "dec_ffn", "out_proj")
COST_NAMES = ([f"macs_{c}" for c in COMPONENTS] + [f"bytes_{c}" for c in COMPONENTS]
              + ["ops_encoder", "ops_decoder", "softmax_enc", "softmax_dec"])


# ----------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class Shapes:
    """The measured workload: source length, decoder steps, decoder rows (beam) and vocabulary."""

    qkv_dim: int = 512
    source_len: int = 30
    decoder_steps: int = 30
    rows: int = 1
    vocab: int = HAT_VOCAB

    def to_dict(self) -> dict:
        return {"qkv_dim": self.qkv_dim, "source_len": self.source_len, "decoder_steps": self.decoder_steps,
                "rows": self.rows, "vocab": self.vocab}


def component_costs(f: Sequence[float], sh: Shapes) -> dict[str, float]:
    """MACs, bytes (fp32 weights + activations read) and op counts of one translation from
    HAT's 10 features (raw, HAT column order): encoder on S tokens, T incremental decoder steps."""
    Ee, Le, Fe, He, Ed, Ld, Fd, Hd, Hc, K = (float(x) for x in f)
    q, S, T, B, V = sh.qkv_dim, sh.source_len, sh.decoder_steps, sh.rows, sh.vocab
    Tm = T * (T + 1) / 2  # sum over steps of the self-attention cache length
    w = 4.0  # bytes per fp32 value
    c = {}
    # encoder, per layer x Le: q/k/v/out projections + scores (S x S x q twice)
    c["macs_enc_attn"] = Le * (S * 4 * Ee * q + 2 * S * S * q)
    c["bytes_enc_attn"] = w * Le * (4 * Ee * q + S * (2 * Ee + 4 * q) + He * S * S)
    c["macs_enc_ffn"] = Le * S * 2 * Ee * Fe
    c["bytes_enc_ffn"] = w * Le * (2 * Ee * Fe + S * (2 * Ee + Fe))
    # decoder, per layer x Ld, per step: self attention over the growing cache
    c["macs_dec_self_attn"] = Ld * B * (T * 4 * Ed * q + 2 * Tm * q)
    c["bytes_dec_self_attn"] = w * Ld * (T * 4 * Ed * q + B * 2 * Tm * q)
    # cross attention: k/v of the last K encoder layers' outputs once, then q/out + scores per step
    mem = K * S
    c["macs_dec_cross_attn"] = Ld * (2 * mem * Ee * q + B * T * (2 * Ed * q + 2 * mem * q))
    c["bytes_dec_cross_attn"] = w * Ld * (2 * Ee * q + T * (2 * Ed * q + B * 2 * mem * q))
    c["macs_dec_ffn"] = Ld * B * T * 2 * Ed * Fd
    c["bytes_dec_ffn"] = w * Ld * T * (2 * Ed * Fd + B * (2 * Ed + Fd))
    c["macs_out_proj"] = B * T * Ed * V
    c["bytes_out_proj"] = w * T * Ed * V
    # op counts (launch/dispatch overheads) and softmax work (scales with heads)
    c["ops_encoder"] = Le
    c["ops_decoder"] = Ld * T
    c["softmax_enc"] = Le * He * S * S
    c["softmax_dec"] = Ld * B * (Hd * Tm + Hc * T * mem)
    return {k: c[k] for k in COST_NAMES}


def total_macs(f: Sequence[float], sh: Shapes) -> float:
    c = component_costs(f, sh)
    return sum(c[f"macs_{k}"] for k in COMPONENTS)


def total_bytes(f: Sequence[float], sh: Shapes) -> float:
    c = component_costs(f, sh)
    return sum(c[f"bytes_{k}"] for k in COMPONENTS)


# ------------------------------------------------------------------------------- data
@dataclass
class Dataset:
    """Training rows: HAT features (raw), optional archs, latency in ms."""

    features: np.ndarray  # [N, 10]
    archs: list[Arch | None]
    latency_ms: np.ndarray  # [N]
    source: str  # "db:<path>" or "csv:<path>"
    target: str
    space: str

    def __len__(self) -> int:
        return len(self.latency_ms)

    def subset(self, idx: Sequence[int]) -> Dataset:
        idx = list(idx)
        return Dataset(self.features[idx], [self.archs[i] for i in idx], self.latency_ms[idx],
                       self.source, self.target, self.space)


def read_hat_csv(path: str | Path, target: str | None = None, max_rows: int | None = None) -> Dataset:
    """One of HAT's latency CSVs: total latency = encoder + decoder mean. A feature that is not a
    finite number, or a latency that is not finite and positive, is an error naming its line."""
    from mosc.fileio import read_csv

    path = Path(path)
    lat_cols = ["latency_mean_encoder", "latency_mean_decoder"]
    _, rows = read_csv(path, "HAT latency CSV", HAT_FEATURE_NAMES + lat_cols)
    feats, lat = [], []
    for line, r in rows:
        try:
            f = [float(r[c]) for c in HAT_FEATURE_NAMES]
            ms = [float(r[c]) for c in lat_cols]
        except (TypeError, ValueError):
            raise MoscError(f"{path}:{line}: a feature or latency is not a number") from None
        if not all(math.isfinite(x) for x in f):
            raise MoscError(f"{path}:{line}: a feature is not a finite number ({f})")
        if not all(math.isfinite(x) and x > 0 for x in ms):
            raise MoscError(f"{path}:{line}: latency must be a finite positive number of ms, got "
                            f"encoder {ms[0]}, decoder {ms[1]}")
        feats.append(f)
        lat.append(ms[0] + ms[1])
        if max_rows and len(lat) >= max_rows:
            break
    if not lat:
        raise MoscError(f"{path}: no rows")
    return Dataset(np.array(feats, float), [None] * len(lat), np.array(lat, float), f"csv:{path}",
                   target or f"hat:{path.stem}", "wmt")


def read_db(path: str | Path, target: str, space: str, include_emulated: bool = False,
            backend: str | None = None) -> Dataset:
    """The latency DB's rows for one target and one backend (real measurements only unless asked).
    backend None: whichever backend the target's rows have; rows of several backends (tvm and
    ort timings of the same arch differ) are an error that names them."""
    from mosc.device.db import LatencyDB

    path = Path(path)
    if not path.exists():
        raise MoscError(f"no latency database at {path}")
    with LatencyDB(path) as db:
        if backend is None:
            found = sorted({r["backend"] for r in db.query(target, include_emulated=include_emulated)})
            if len(found) > 1:
                raise MoscError(f"latency database {path} has rows of several backends for target {target!r} "
                                f"({', '.join(found)}): pick one with --backend")
        rows = db.rows(target, backend=backend, include_emulated=include_emulated)
    if not rows:
        raise MoscError(f"latency database {path} has no {'' if include_emulated else 'real (non-emulated) '}"
                        f"rows for target {target!r}{f' and backend {backend!r}' if backend else ''}: measure some "
                        "archs first (mosc measure) or import HAT's CSV")
    return Dataset(np.array([r.features for r in rows], float), [r.arch for r in rows],
                   np.array([r.latency_ms for r in rows], float), f"db:{path}", target, space)


def split_indices(n: int, seed: int = 0, fractions=(0.8, 0.1, 0.1)) -> tuple[list[int], list[int], list[int]]:
    """Seeded train/validation/test split (HAT: 80/10/10)."""
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    a = int(round(n * fractions[0]))
    b = a + int(round(n * fractions[1]))
    return idx[:a], idx[a:b], idx[b:]


# --------------------------------------------------------------------------- featurise
HAT_SCALE = [640, 6, 2048, 6, 640, 6, 2048, 6, 6, 2]  # HAT's own normalisation


def featurize(kind: str, feats: np.ndarray, archs: Sequence[Arch | None], space: SearchSpace | None,
              sh: Shapes) -> np.ndarray:
    if kind not in FEATURE_SETS:
        raise MoscError(f"unknown feature set {kind!r}; choose from {', '.join(FEATURE_SETS)}")
    scale = np.array(space.hat_scale() if space is not None else HAT_SCALE, float)
    X = [feats / scale]
    if kind in ("cost", "layers"):
        X.append(np.array([list(component_costs(f, sh).values()) for f in feats], float))
    if kind == "layers":
        if space is None or any(a is None for a in archs):
            raise MoscError("feature set 'layers' needs an arch JSON on every row (HAT-imported rows have only "
                            "the 10 averages): use --features cost")
        X.append(np.array([space.encode_layers(a) for a in archs], float))
    return np.concatenate(X, axis=1)


def feature_names(kind: str, space: SearchSpace | None) -> list[str]:
    names = list(HAT_FEATURE_NAMES)
    if kind in ("cost", "layers"):
        names += COST_NAMES
    if kind == "layers" and space is not None:
        le, ld = max(space.enc_layers), max(space.dec_layers)
        names += ["enc_embed", "dec_embed", "enc_layers", "dec_layers"]
        names += [f"{f}[{i}]" for f in ("enc_ffn", "enc_heads") for i in range(le)]
        names += [f"{f}[{i}]" for f in ("dec_ffn", "dec_heads", "dec_cross_heads", "dec_arbitrary") for i in range(ld)]
    return names


# ----------------------------------------------------------------------------- models
def _mlp_forward(params, X):
    h = X
    acts = [h]
    for W, b in params[:-1]:
        h = np.maximum(h @ W + b, 0.0)
        acts.append(h)
    W, b = params[-1]
    return (h @ W + b)[:, 0], acts


def fit_mlp(X: np.ndarray, y: np.ndarray, *, hidden: int = 400, layers: int = 3, steps: int = 2000,
            batch: int = 128, lr: float = 1e-3, seed: int = 0) -> dict:
    """HAT's MLP (10 -> 3 x 400 ReLU -> 1), MSE on latency / max latency, Adam, numpy."""
    rng = np.random.default_rng(seed)
    y_scale = float(np.max(y))
    X, t = X.astype(np.float32), (y / y_scale).astype(np.float32)
    dims = [X.shape[1]] + [hidden] * layers + [1]
    params = [(rng.normal(0, math.sqrt(2.0 / a), (a, b)).astype(np.float32), np.zeros(b, np.float32)) for a, b in zip(dims[:-1], dims[1:])]
    m = [(np.zeros_like(W), np.zeros_like(b)) for W, b in params]
    v = [(np.zeros_like(W), np.zeros_like(b)) for W, b in params]
    b1, b2, eps = 0.9, 0.999, 1e-8
    n = len(y)
    for step in range(1, steps + 1):
        idx = rng.integers(0, n, min(batch, n))
        xb, tb = X[idx], t[idx]
        out, acts = _mlp_forward(params, xb)
        g = (2.0 / len(tb)) * (out - tb)[:, None]
        grads = []
        for li in range(len(params) - 1, -1, -1):
            W, _ = params[li]
            gW, gb = acts[li].T @ g, g.sum(0)
            grads.append((gW, gb))
            if li:
                g = (g @ W.T) * (acts[li] > 0)
        grads.reverse()
        lr_t = lr * math.sqrt(1 - b2**step) / (1 - b1**step)
        for li, ((W, b), (gW, gb)) in enumerate(zip(params, grads)):
            (mW, mb), (vW, vb) = m[li], v[li]
            mW[:] = b1 * mW + (1 - b1) * gW
            mb[:] = b1 * mb + (1 - b1) * gb
            vW[:] = b2 * vW + (1 - b2) * gW * gW
            vb[:] = b2 * vb + (1 - b2) * gb * gb
            W -= lr_t * mW / (np.sqrt(vW) + eps)
            b -= lr_t * mb / (np.sqrt(vb) + eps)
    return {"layers": [[W.tolist(), b.tolist()] for W, b in params], "y_scale": y_scale}


def predict_mlp(state: dict, X: np.ndarray) -> np.ndarray:
    """Latency in ms, at least 1e-6 as predict_lsq: the net's linear output can go negative far
    from its training rows (a tiny arch), and search would take a negative latency as free."""
    params = [(np.array(W), np.array(b)) for W, b in state["layers"]]
    return np.maximum(_mlp_forward(params, X)[0] * state["y_scale"], 1e-6)


def fit_lsq(C: np.ndarray, y: np.ndarray, *, iters: int = 20, huber: float = 1.345) -> dict:
    """Non-negative least squares on relative error: y ~ c0 + sum_j a_j C_j (a_j >= 0), Huber IRLS."""
    from scipy.optimize import nnls

    scale = np.maximum(C.max(axis=0), 1e-12)
    A = np.concatenate([np.ones((len(y), 1)), C / scale], axis=1)
    w = 1.0 / y  # relative error: divide each row by its latency
    wr = np.ones_like(y)
    coef = None
    for _ in range(iters):
        ww = w * wr
        coef, _ = nnls(A * ww[:, None], y * ww)
        r = (A @ coef - y) / y
        s = 1.4826 * np.median(np.abs(r - np.median(r))) + 1e-9
        u = np.abs(r) / (huber * s)
        new = np.where(u <= 1, 1.0, 1.0 / np.maximum(u, 1e-12))
        if np.allclose(new, wr, atol=1e-4):
            break
        wr = new
    return {"coef": coef.tolist(), "scale": scale.tolist()}


def predict_lsq(state: dict, C: np.ndarray) -> np.ndarray:
    A = np.concatenate([np.ones((len(C), 1)), C / np.array(state["scale"])], axis=1)
    return np.maximum(A @ np.array(state["coef"]), 1e-6)


GBT_PARAMS = {"max_depth": 4, "eta": 0.05, "subsample": 0.8, "colsample_bytree": 0.8, "min_child_weight": 3,
              "objective": "reg:pseudohubererror", "huber_slope": 0.05, "lambda": 1.0, "nthread": 1}
GBT_ROUNDS = 600


def fit_gbt(X: np.ndarray, t: np.ndarray, *, seed: int = 0, rounds: int = GBT_ROUNDS, base: float | None = None):
    import xgboost as xgb

    params = dict(GBT_PARAMS, seed=seed, base_score=float(np.median(t)) if base is None else base)
    return xgb.train(params, xgb.DMatrix(X, label=t), num_boost_round=rounds)


def predict_gbt(booster, X: np.ndarray) -> np.ndarray:
    import xgboost as xgb

    return booster.predict(xgb.DMatrix(X))


# --------------------------------------------------------------------------- metrics
def metrics(y: np.ndarray, p: np.ndarray) -> dict:
    from scipy.stats import kendalltau

    y, p = np.asarray(y, float), np.asarray(p, float)
    rel = np.abs(p - y) / y
    tau = float(kendalltau(y, p).statistic) if len(y) > 1 else float("nan")
    return {"rmse_ms": float(np.sqrt(np.mean((p - y) ** 2))), "mape": float(np.mean(rel)),
            "within_10pct": float(np.mean(rel <= 0.10)),
            "kendall_tau": None if math.isnan(tau) else tau, "n": int(len(y))}  # None: fewer than 2 rows (JSON-safe)


# --------------------------------------------------------------------------- predictor
@dataclass
class Predictor:
    """A fitted latency predictor for one target and one search space."""

    model: str
    features: str
    target: str
    space: str
    shapes: Shapes
    state: dict = field(default_factory=dict)  # numeric parameters (JSON-able)
    booster: object = None  # xgboost Booster (gbt, hybrid)
    meta: dict = field(default_factory=dict)  # training rows, metrics, source, ...
    _space_obj: SearchSpace | None = None

    # -- prediction ---------------------------------------------------------------------
    def _space(self) -> SearchSpace:
        if self._space_obj is None:
            self._space_obj = SearchSpace.load(self.space)
        return self._space_obj

    def _X(self, feats: np.ndarray, archs: Sequence[Arch | None]) -> tuple[np.ndarray, np.ndarray]:
        X = featurize(self.features, feats, archs, self._space(), self.shapes)
        C = X[:, 10:10 + len(COST_NAMES)] if self.features != "hat" else None
        return X, C

    def predict_features(self, feats: np.ndarray, archs: Sequence[Arch | None] | None = None) -> np.ndarray:
        feats = np.asarray(feats, float).reshape(-1, 10)
        archs = list(archs) if archs is not None else [None] * len(feats)
        X, C = self._X(feats, archs)
        if self.model == "mlp":
            return predict_mlp(self.state, X)
        if self.model == "lsq":
            return predict_lsq(self.state, C)
        if self.model == "gbt":
            return np.exp(predict_gbt(self.booster, X))
        base = predict_lsq(self.state, C)  # hybrid
        return base * np.exp(predict_gbt(self.booster, np.concatenate([X, np.log(base)[:, None]], axis=1)))

    def predict(self, archs: Sequence[Arch]) -> np.ndarray:
        archs = list(archs)
        return self.predict_features(np.array([a.hat_features() for a in archs], float), archs)

    def latency(self, arch: Arch) -> float:
        """The search world's latency callable: arch -> predicted ms."""
        return float(self.predict([arch])[0])

    def check(self, target: str | None = None, space: str | None = None) -> Predictor:
        """Raise a clear error when this predictor is for another target or space."""
        if target is not None and target != self.target:
            raise MoscError(f"predictor {self.meta.get('path', '')} was fitted for target {self.target!r}, "
                            f"not {target!r}: fit one for {target} (mosc predictor fit --target {target})")
        if space is not None and space != self.space:
            raise MoscError(f"predictor {self.meta.get('path', '')} was fitted for search space {self.space!r}, "
                            f"not {space!r}")
        return self

    # -- persistence -------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        from mosc.fileio import atomic_write_bytes, atomic_write_json

        path = Path(path)
        if path.suffix != ".json":
            raise MoscError(f"predictor file must end in .json, got {path}")
        doc = {"format": FORMAT, "version": VERSION, "model": self.model, "features": self.features,
               "feature_names": feature_names(self.features, self._space()),
               "target": self.target, "space": self.space, "space_def": self._space().to_dict(),
               "shapes": self.shapes.to_dict(), "state": self.state,
               "meta": {k: v for k, v in self.meta.items() if k != "path"}}
        if self.booster is not None:
            from mosc.fileio import sha256_file

            mpath = path.with_name(path.stem + ".xgb.json")
            raw = self.booster.save_raw(raw_format="json")
            atomic_write_bytes(mpath, bytes(raw))
            doc["xgboost_model"] = {"file": mpath.name, "sha256": sha256_file(mpath)}
        atomic_write_json(path, doc)
        return path

    @classmethod
    def load(cls, path: str | Path, target: str | None = None, space: str | None = None) -> Predictor:
        """A saved predictor, its structure and parameters checked (one-line MoscError each)."""
        from mosc.fileio import field, read_json

        path = Path(path)
        where = f"predictor file {path}"
        doc = read_json(path, "predictor file")
        if doc.get("format") != FORMAT:
            raise MoscError(f"{path} is not a mosc latency predictor (format {doc.get('format')!r})")
        if doc.get("version") != VERSION:
            raise MoscError(f"{path}: predictor format version {doc.get('version')}, this mosc reads {VERSION}")
        p = cls(model=_choice(doc, "model", MODELS, where), features=_choice(doc, "features", FEATURE_SETS, where),
                target=field(doc, "target", str, where), space=field(doc, "space", str, where),
                shapes=_load_shapes(field(doc, "shapes", dict, where), where), state=field(doc, "state", dict, where),
                meta={**(field(doc, "meta", dict, where) if "meta" in doc else {}), "path": str(path)})
        p.check(target, space)
        if "space_def" in doc:
            p._space_obj = SearchSpace.from_dict(field(doc, "space_def", dict, where), where=f"{where} space_def")
            if p._space_obj.name != p.space:
                raise MoscError(f"{where}: space_def is space {p._space_obj.name!r}, not {p.space!r}")
        width = len(feature_names(p.features, p._space()))
        _check_state(p.model, p.features, p.state, width, where)
        if p.model in ("gbt", "hybrid"):
            p.booster = _load_booster(doc, path, width + (p.model == "hybrid"), where)
        return p


def _choice(doc: dict, key: str, allowed: tuple, where: str) -> str:
    from mosc.fileio import field

    value = field(doc, key, str, where)
    if value not in allowed:
        raise MoscError(f"{where}: unknown {key} {value!r}; known: {', '.join(allowed)}")
    return value


def _load_shapes(d: dict, where: str) -> Shapes:
    from dataclasses import fields

    known = [f.name for f in fields(Shapes)]
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise MoscError(f"{where}: shapes has unknown key {unknown[0]!r} (known: {', '.join(known)})")
    for k, v in d.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise MoscError(f"{where}: shapes {k} must be a positive integer, got {v!r}")
    return Shapes(**d)


def _numbers(value, where: str, name: str, length: int | None = None, positive: bool = False) -> np.ndarray:
    """A JSON list of finite numbers (of `length`) as a float array."""
    ok = isinstance(value, list) and all(isinstance(x, int | float) and not isinstance(x, bool) for x in value)
    arr = np.array(value, float) if ok else None
    if arr is None or not np.all(np.isfinite(arr)) or (positive and np.any(arr <= 0)):
        raise MoscError(f"{where}: {name} must be a list of finite{' positive' if positive else ''} numbers")
    if length is not None and len(arr) != length:
        raise MoscError(f"{where}: {name} has {len(arr)} values, the model needs {length}")
    return arr


def _check_state(model: str, features: str, state: dict, width: int, where: str) -> None:
    """The numeric parameters a model's predict_* reads, with the sizes its features give."""
    if model in ("lsq", "hybrid"):
        if features == "hat":
            raise MoscError(f"{where}: model {model} needs cost features, the file says {features!r}")
        _numbers(state.get("coef"), where, "state.coef", 1 + len(COST_NAMES))
        _numbers(state.get("scale"), where, "state.scale", len(COST_NAMES), positive=True)
    if model != "mlp":
        return
    layers, fan_in = state.get("layers"), width
    if not isinstance(layers, list) or not layers:
        raise MoscError(f"{where}: state.layers must be a non-empty list of [weights, bias] pairs")
    for i, layer in enumerate(layers):
        if not isinstance(layer, list) or len(layer) != 2 or not isinstance(layer[0], list):
            raise MoscError(f"{where}: state.layers[{i}] must be a [weights, bias] pair")
        rows = [_numbers(r, where, f"state.layers[{i}] weights row") for r in layer[0]]
        out = len(rows[0]) if rows else 0
        if len(rows) != fan_in or any(len(r) != out for r in rows) or out < 1:
            raise MoscError(f"{where}: state.layers[{i}] weights must be {fan_in} rows of equal length")
        _numbers(layer[1], where, f"state.layers[{i}] bias", out)
        fan_in = out
    if fan_in != 1:
        raise MoscError(f"{where}: the last layer of state.layers has {fan_in} outputs, not 1")
    _numbers([state.get("y_scale")], where, "state.y_scale", positive=True)


def _load_booster(doc: dict, path: Path, width: int, where: str):
    """The xgboost model file next to a predictor, its sha256 and feature count checked."""
    from mosc.fileio import field, sha256_file

    ref = field(doc, "xgboost_model", dict, f"{where} (model {doc['model']} needs its xgboost model)")
    name = field(ref, "file", str, f"{where} xgboost_model")
    if Path(name).name != name:
        raise MoscError(f"{where}: xgboost_model file {name!r} must be a file name next to the predictor")
    mpath = path.with_name(name)
    if not mpath.is_file():
        raise MoscError(f"{path}: its xgboost model file {mpath} is missing")
    if sha256_file(mpath) != field(ref, "sha256", str, f"{where} xgboost_model"):
        raise MoscError(f"{path}: {mpath} does not match (sha256 differs; refit or restore it)")
    import xgboost as xgb

    booster = xgb.Booster()
    try:
        booster.load_model(bytearray(mpath.read_bytes()))
    except Exception as e:  # noqa: BLE001  (xgboost raises XGBoostError with its C++ log)
        raise MoscError(f"{mpath} is not an xgboost model ({str(e).strip().splitlines()[0][:200]})") from None
    if booster.num_features() != width:
        raise MoscError(f"{mpath}: the xgboost model reads {booster.num_features()} features, the predictor's "
                        f"{doc['features']} features are {width}")
    return booster


def fit(data: Dataset, *, model: str = "lsq", features: str | None = None, shapes: Shapes | None = None,
        seed: int = 0, space: SearchSpace | None = None, val: Dataset | None = None,
        mlp_steps: int = 2000, gbt_rounds: int = GBT_ROUNDS) -> Predictor:
    """Fit one predictor on `data` (all its rows). `val`, if given, is scored into meta['metrics']."""
    if model not in MODELS:
        raise MoscError(f"unknown predictor model {model!r}; choose from {', '.join(MODELS)}")
    if len(data) < 5:
        raise MoscError(f"only {len(data)} training row(s) for target {data.target!r}: need at least 5")
    if features is None:
        features = "hat" if model == "mlp" else (
            "layers" if space is not None and all(a is not None for a in data.archs) else "cost")
    if model in ("lsq", "hybrid") and features == "hat":
        raise MoscError(f"model {model} needs cost features (--features cost or layers)")
    if space is None:
        space = SearchSpace.load(data.space)
    if space.name != data.space:
        raise MoscError(f"rows are for space {data.space!r}, not {space.name!r}")
    sh = shapes or Shapes(qkv_dim=space.qkv_dim if space else 512)
    X = featurize(features, data.features, data.archs, space, sh)
    y = data.latency_ms
    if np.any(y <= 0):
        raise MoscError("latency must be positive in every training row")
    p = Predictor(model=model, features=features, target=data.target, space=data.space, shapes=sh, _space_obj=space)
    if model == "mlp":
        p.state = fit_mlp(X, y, steps=mlp_steps, seed=seed)
    elif model == "gbt":
        p.booster = fit_gbt(X, np.log(y), seed=seed, rounds=gbt_rounds)
    else:
        C = X[:, 10:10 + len(COST_NAMES)]
        p.state = fit_lsq(C, y)
        if model == "hybrid":
            base = predict_lsq(p.state, C)
            p.booster = fit_gbt(np.concatenate([X, np.log(base)[:, None]], axis=1), np.log(y) - np.log(base),
                                seed=seed, rounds=gbt_rounds, base=0.0)
    p.meta = {"training_rows": len(data), "source": data.source, "seed": seed,
              "latency_range_ms": [float(y.min()), float(y.max())]}
    if val is not None and len(val):
        p.meta["metrics"] = metrics(val.latency_ms, p.predict_features(val.features, val.archs))
        p.meta["metrics_rows"] = "held-out"
    return p


def fit_eval(data: Dataset, *, model: str = "lsq", features: str | None = None, seed: int = 0,
             space: SearchSpace | None = None, **kw) -> tuple[Predictor, dict]:
    """Seeded 80/10/10 split: fit on train, metrics on test (meta['metrics']). Returns (predictor, metrics)."""
    tr, va, te = split_indices(len(data), seed)
    p = fit(data.subset(tr), model=model, features=features, seed=seed, space=space, val=data.subset(te), **kw)
    p.meta["split"] = {"train": len(tr), "val": len(va), "test": len(te), "seed": seed}
    return p, p.meta["metrics"]


LatencyFn = Callable[[Arch], float]


# --------------------------------------------------------------------- analytic prior
CORTEX_A72 = {"peak_gmacs": 48.0, "bandwidth_gbs": 4.0}  # RPi 4: 4 cores x 1.5 GHz x 8 fp32 MAC/cycle; LPDDR4 (effective)


def roofline_ms(feats: Sequence[float], sh: Shapes = Shapes(), peak_gmacs: float = CORTEX_A72["peak_gmacs"],
                bandwidth_gbs: float = CORTEX_A72["bandwidth_gbs"]) -> float:
    """Analytic latency prior: per component, max(MACs / peak compute, bytes / bandwidth), summed."""
    c = component_costs(feats, sh)
    return sum(max(c[f"macs_{k}"] / (peak_gmacs * 1e6), c[f"bytes_{k}"] / (bandwidth_gbs * 1e6)) for k in COMPONENTS)


class AnalyticPrior:
    """`latency(arch) -> ms` from roofline_ms, with the Predictor interface search uses.
    Used for rpi4 until real measurements arrive; never fitted, always labelled."""

    model = "analytic-prior"

    def __init__(self, target: str, space: SearchSpace, shapes: Shapes | None = None):
        self.target, self.space_name = target, space.name
        self.shapes = shapes or Shapes(qkv_dim=space.qkv_dim)

    def latency(self, arch: Arch) -> float:
        return roofline_ms(arch.hat_features(), self.shapes)

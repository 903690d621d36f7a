"""HAT's measurement protocol and its statistics, independent of what is timed.

    run_protocol(encode, step, ...)   the loop: warm-up runs, then timed runs of encoder + decoder steps
    Measurement                       the per-run latencies of one measurement, with their statistics
    summarize(...)                    mean, trimmed mean, median, p90, std, min, max
    noisy(stats)                      why a measurement looks disturbed, or None

Protocol (HAT, MOS.md section 5; numbers from the target's [protocol]): one *run* is a whole
translation: the encoder on a fixed-length source (source_len tokens, batch rows), then
decoder_steps incremental decoder steps at positions 0..N-1 whose K/V-cache outputs are
fed back as the next step's inputs. `warmup` untimed runs, then `repeats` timed runs;
a run's latency is encoder + sum of its steps. Statistics: the trimmed mean (drop `trim`
of the runs from each tail; HAT's number, stored as `latency_ms`), plus median, p90 (of
the trimmed runs, as the target file says) and mean, std, min, max (of all runs).

Pure numpy. Knows nothing of backends, artifacts, devices or the database: the caller
passes `encode`/`step` functions that time one graph call each (mosc.device.backends).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from mosc.errors import MoscError

# What one timed run is, recorded with every measurement (latency rows' extra.protocol, bench results):
# TRANSLATE_CALL: one call of a TVM artifact's translate function (encoder + the compiled greedy loop,
# exactly decoder_steps steps), on the device clock: what a user of the artifact waits for.
# GRAPH_CALLS: the encoder call plus decoder_steps decoder_step calls, each timed alone with its
# inputs preset, summed: kernel time without the loop (ort/torch, and tvm rows before the compiled loop).
TRANSLATE_CALL = "translate-call/1"
GRAPH_CALLS = "graph-calls/1"

NOISY_STD = 0.15  # std above this fraction of the median: the runs did not agree
NOISY_SKEW = 0.05  # trimmed mean this far from the median: two modes (load came and went)


# ----------------------------------------------------------------------------- statistics
def _trimmed(xs, trim: float) -> np.ndarray:
    """xs sorted along the last axis with `trim` of each tail cut (all of it when too few)."""
    xs = np.sort(np.asarray(xs, np.float64), axis=-1)
    n = xs.shape[-1]
    k = int(math.floor(n * trim))
    return xs[..., k: n - k] if n - 2 * k > 0 else xs


def summarize(total_ms, trim: float, enc_ms=None, dec_ms=None, kernel_ms=None) -> dict[str, float]:
    """Statistics of per-run latencies (ms). trimmed_mean/median/p90 use the trimmed runs;
    mean/std/min/max use all runs. Encoder/decoder/kernel parts: trimmed means and stds."""
    x = np.asarray(total_ms, np.float64)
    if x.size == 0:
        raise MoscError("no timed runs (repeats must be >= 1)")
    t = _trimmed(x, trim)
    out = {
        "mean_ms": float(x.mean()), "trimmed_mean_ms": float(t.mean()), "median_ms": float(np.median(t)),
        "p90_ms": float(np.percentile(t, 90)), "std_ms": float(x.std(ddof=1)) if x.size > 1 else 0.0,
        "min_ms": float(x.min()), "max_ms": float(x.max()),
    }
    for name, part in (("encoder", enc_ms), ("decoder", dec_ms), ("kernel", kernel_ms)):
        if part is not None:
            p = np.asarray(part, np.float64)
            out[f"{name}_ms"] = float(_trimmed(p, trim).mean())
            out[f"{name}_std_ms"] = float(p.std(ddof=1)) if p.size > 1 else 0.0
    out["latency_ms"] = out["trimmed_mean_ms"]
    return out


def noisy(stats: dict) -> str | None:
    """Why a measurement looks disturbed (another process on the device), or None."""
    med = stats["median_ms"]
    if med <= 0:
        return None
    why = []
    if stats["std_ms"] > NOISY_STD * med:
        why.append(f"std {stats['std_ms'] / med:.0%} of the median")
    if abs(stats["trimmed_mean_ms"] - med) > NOISY_SKEW * med:
        why.append(f"trimmed mean {stats['trimmed_mean_ms'] / med - 1:+.0%} off the median")
    return ", ".join(why) or None


# ----------------------------------------------------------------------------- the protocol loop
@dataclass
class Measurement:
    # Per timed run. For an encoder-classifier (mosc.device.backends.measure_tvm_classifier) a run
    # is one classifier call: total_ms = encoder_ms = its time, decoder_ms = 0, and in shapes
    # source_len is the sequence length and decoder_steps 0. Same names, so that results, the
    # database and the statistics need no second layout.
    total_ms: list[float]
    encoder_ms: list[float]
    decoder_ms: list[float]
    warmup: int
    trim: float
    shapes: dict[str, int]  # batch, source_len, decoder_steps of the graphs measured
    method: str  # how calls were timed
    protocol: str = GRAPH_CALLS  # what one run is (TRANSLATE_CALL or GRAPH_CALLS)
    # TRANSLATE_CALL only: per run, encoder + decoder_steps x one decoder_step call, each timed alone
    # (the kernel time; total - kernel is what the loop itself costs)
    kernel_ms: list[float] | None = None
    stats: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        self.stats = summarize(self.total_ms, self.trim, self.encoder_ms, self.decoder_ms, self.kernel_ms)

    @classmethod
    def of_runs(cls, enc: list[float], dec: list[float], warmup: int, trim: float, shapes: dict[str, int],
                method: str) -> Measurement:
        """From run_protocol's per-run encoder and decoder times: a run's total is their sum."""
        return cls([e + d for e, d in zip(enc, dec)], enc, dec, warmup, trim, shapes, method)


# encode() -> (seconds, cross); step(pos, caches, cross) -> (seconds, caches): caches and cross are
# sequences of tensors (2 and 3 per decoder layer) in the contract's order
EncodeFn = Callable[[], tuple[float, Any]]
StepFn = Callable[[int, Any, Any], tuple[float, Any]]


def run_protocol(encode: EncodeFn, step: StepFn, zero_caches: Callable[[], Any], steps: int,
                 warmup: int, repeats: int) -> tuple[list[float], list[float]]:
    """HAT's loop: per run, the encoder then `steps` decoder steps with the caches fed back.
    Returns per-run (encoder ms, decoder ms) for the timed runs."""
    enc, dec = [], []
    for i in range(warmup + repeats):
        t_enc, cross = encode()
        caches = zero_caches()
        t_dec = 0.0
        for pos in range(steps):
            t, caches = step(pos, caches, cross)
            t_dec += t
        if i >= warmup:
            enc.append(t_enc * 1e3)
            dec.append(t_dec * 1e3)
    return enc, dec

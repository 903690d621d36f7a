"""Latency measurement: HAT's protocol, on this machine or on a device over TVM RPC.

    measure_tvm(art, protocol)      time a loaded artifact (local VM or RPC VM: one code path)
    measure_ort(export_dir, ...)    the same protocol with ONNX Runtime (side-by-side numbers)
    measure_torch(subnet, ...)      the same protocol with PyTorch eager (imports torch inside)
    summarize(...)                  mean, trimmed mean, median, p90, std, min, max
    Campaign                        many archs -> the latency database, with retries, resumable

Protocol (HAT, MOS.md section 5; numbers from the target's [protocol]): one *run* is a whole
translation: the encoder on a fixed-length source (source_len tokens, batch rows), then
decoder_steps incremental decoder steps at positions 0..N-1 whose K/V-cache outputs are
fed back as the next step's inputs. `warmup` untimed runs, then `repeats` timed runs;
a run's latency is encoder + sum of its steps. Statistics: the trimmed mean (drop `trim`
of the runs from each tail; HAT's number, stored as `latency_ms`), plus median, p90 (of
the trimmed runs, as the target file says) and mean, std, min, max (of all runs).

Timing method (TVM): every graph call of a run is timed on the device's own clock with
`vm.time_evaluator("invoke_stateful", dev, number=1, repeat=1)("main")` after `set_input`,
and its outputs are read back with `get_outputs` (remote handles over RPC: the caches never
leave the device). Why not a host-side loop of invoke_stateful around perf_counter: over
RPC each call costs a network round trip (~0.1 ms on 127.0.0.1, ~1 ms on a LAN), which
would be measured as model time; the device clock excludes it, and the same code runs
locally (tvm.cpu) and remotely. Cost: TVM's evaluator makes one untimed call before the
timed one, so the device does each graph call twice (the timed call runs with warm
caches, like the steps of a real decoding loop). The token fed to every step is fixed:
static graphs do the same work for every token value. ORT and torch run in this process
and are timed with time.perf_counter around each call (same loop, same statistics).

Device world: imports numpy and (inside functions) tvm, never torch (except
`measure_torch`, which needs it). Building artifacts for archs is the caller's job
(mosc.jobs.artifacts, torch world); a Campaign gets a `prepare(arch)` callback.
"""

from __future__ import annotations

import gc
import json
import math
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mosc.contract import BOS_ID, DECODER, ENCODER
from mosc.errors import MoscError
from mosc.space import Arch
from mosc.compiler.targets import Protocol, Target
from mosc.rpc import Remote, connect, device_info, host_info

TRIES = 3  # attempts per arch before giving up (connect, upload, load, measure)
BACKOFF_S = 0.5  # first pause between attempts; doubles each time
BACKENDS = ("tvm", "ort", "torch")


# ----------------------------------------------------------------------------- statistics
def _trimmed(xs: np.ndarray, trim: float) -> np.ndarray:
    xs = np.sort(np.asarray(xs, np.float64))
    k = int(math.floor(len(xs) * trim))
    return xs[k: len(xs) - k] if len(xs) - 2 * k > 0 else xs


def summarize(total_ms, trim: float, enc_ms=None, dec_ms=None) -> dict[str, float]:
    """Statistics of per-run latencies (ms). trimmed_mean/median/p90 use the trimmed runs;
    mean/std/min/max use all runs. Encoder/decoder parts: trimmed means and stds."""
    x = np.asarray(total_ms, np.float64)
    if x.size == 0:
        raise MoscError("no timed runs (repeats must be >= 1)")
    t = _trimmed(x, trim)
    out = {
        "mean_ms": float(x.mean()), "trimmed_mean_ms": float(t.mean()), "median_ms": float(np.median(t)),
        "p90_ms": float(np.percentile(t, 90)), "std_ms": float(x.std(ddof=1)) if x.size > 1 else 0.0,
        "min_ms": float(x.min()), "max_ms": float(x.max()),
    }
    for name, part in (("encoder", enc_ms), ("decoder", dec_ms)):
        if part is not None:
            p = np.asarray(part, np.float64)
            out[f"{name}_ms"] = float(_trimmed(p, trim).mean())
            out[f"{name}_std_ms"] = float(p.std(ddof=1)) if p.size > 1 else 0.0
    out["latency_ms"] = out["trimmed_mean_ms"]
    return out


# ----------------------------------------------------------------------------- the protocol loop
@dataclass
class Measurement:
    total_ms: list[float]
    encoder_ms: list[float]
    decoder_ms: list[float]
    warmup: int
    trim: float
    shapes: dict[str, int]  # batch, source_len, decoder_steps of the graphs measured
    method: str  # how calls were timed
    stats: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        self.stats = summarize(self.total_ms, self.trim, self.encoder_ms, self.decoder_ms)


# encode() -> (seconds, cross); step(pos, self_k, self_v, cross) -> (seconds, self_k, self_v)
EncodeFn = Callable[[], tuple[float, Any]]
StepFn = Callable[[int, Any, Any, Any], tuple[float, Any, Any]]


def run_protocol(encode: EncodeFn, step: StepFn, zero_cache: Callable[[], tuple[Any, Any]], steps: int,
                 warmup: int, repeats: int) -> tuple[list[float], list[float]]:
    """HAT's loop: per run, the encoder then `steps` decoder steps with the caches fed back.
    Returns per-run (encoder ms, decoder ms) for the timed runs."""
    enc, dec = [], []
    for i in range(warmup + repeats):
        t_enc, cross = encode()
        k, v = zero_cache()
        t_dec = 0.0
        for pos in range(steps):
            t, k, v = step(pos, k, v, cross)
            t_dec += t
        if i >= warmup:
            enc.append(t_enc * 1e3)
            dec.append(t_dec * 1e3)
    return enc, dec


def _spec(manifest_graph: dict) -> dict[str, dict]:
    return {s["name"]: s for s in manifest_graph["inputs"]}


def _source(batch: int, source_len: int) -> np.ndarray:
    """A fixed source: ids 4..19 (valid in any vocabulary of mosc's models), no padding."""
    return (4 + np.arange(batch * source_len) % 16).reshape(batch, source_len).astype(np.int64)


def measure_tvm(art, protocol: Protocol) -> Measurement:
    """Time a loaded mosc.compile.Artifact (local or over RPC) with HAT's protocol."""
    import tvm

    missing = {ENCODER, DECODER} - set(art.graphs)
    if missing:
        raise MoscError(f"{art.dir}: artifact lacks graph(s) {sorted(missing)}: not a translation model")
    dev = art.device
    enc_vm, dec_vm = art.vms[ENCODER], art.vms[DECODER]
    src_spec = art.manifest["graphs"][ENCODER]["inputs"][0]
    B, S = src_spec["shape"]
    dspec = _spec(art.manifest["graphs"][DECODER])
    cache_shape = dspec["self_k"]["shape"]
    T = cache_shape[2]
    src = tvm.runtime.tensor(_source(B, S), dev)
    token = tvm.runtime.tensor(np.full((B,), BOS_ID, np.int64), dev)
    positions = [tvm.runtime.tensor(np.array([p], np.int64), dev) for p in range(T)]
    zeros = tvm.runtime.tensor(np.zeros(cache_shape, np.float32), dev)
    t_enc = enc_vm.time_evaluator("invoke_stateful", dev, number=1, repeat=1)
    t_dec = dec_vm.time_evaluator("invoke_stateful", dev, number=1, repeat=1)

    def encode():
        enc_vm.set_input("main", src)
        seconds = t_enc("main").mean
        return seconds, tuple(enc_vm.get_outputs("main"))

    def step(pos, k, v, cross):
        dec_vm.set_input("main", token, positions[pos], k, v, *cross)
        seconds = t_dec("main").mean
        _, k, v = dec_vm.get_outputs("main")
        return seconds, k, v

    enc, dec = run_protocol(encode, step, lambda: (zeros, zeros), T, protocol.warmup, protocol.repeats)
    return Measurement([e + d for e, d in zip(enc, dec)], enc, dec, protocol.warmup, protocol.trim,
                       {"batch": B, "source_len": S, "decoder_steps": T},
                       "tvm time_evaluator(invoke_stateful, number=1, repeat=1) per graph call, device clock")


def _host_timed(fn):
    def timed(*a):
        t0 = time.perf_counter()
        out = fn(*a)
        return time.perf_counter() - t0, out
    return timed


def measure_ort(export_dir: str | Path, protocol: Protocol) -> Measurement:
    """The protocol with ONNX Runtime (CPU) on an export folder, in this process."""
    from mosc.runtime import ort_backend

    be = ort_backend(export_dir)
    src = _source(be.batch, be.source_len)
    token = np.full((be.batch,), BOS_ID, np.int64)
    positions = [np.array([p], np.int64) for p in range(be.cache_len)]
    zeros = np.zeros(be.cache_shape, np.float32)
    enc_fn, step_fn = _host_timed(be.encode), _host_timed(be.step)

    def step(pos, k, v, cross):
        seconds, (_, k, v) = step_fn([token, positions[pos], k, v, *cross])
        return seconds, k, v

    enc, dec = run_protocol(lambda: enc_fn([src]), step, lambda: (zeros, zeros), be.cache_len,
                            protocol.warmup, protocol.repeats)
    return Measurement([e + d for e, d in zip(enc, dec)], enc, dec, protocol.warmup, protocol.trim,
                       {"batch": be.batch, "source_len": be.source_len, "decoder_steps": be.cache_len},
                       "onnxruntime CPU, time.perf_counter per graph call")


def measure_torch(sub, protocol: Protocol, batch: int, source_len: int, steps: int) -> Measurement:
    """The protocol with PyTorch eager (no_grad, this process's torch threads)."""
    import torch  # the one torch import of this module

    sub = sub.eval()
    src = torch.from_numpy(_source(batch, source_len))
    token = torch.full((batch,), BOS_ID, dtype=torch.int64)
    positions = [torch.tensor([p]) for p in range(steps)]
    zeros = torch.zeros(len(sub.decoder), batch, steps, sub.cfg.qkv_dim)
    enc_fn, step_fn = _host_timed(sub.encode), _host_timed(sub.decode_step)

    def step(pos, k, v, cross):
        seconds, (_, k, v) = step_fn(token, positions[pos], k, v, *cross)
        return seconds, k, v

    with torch.no_grad():
        enc, dec = run_protocol(lambda: enc_fn(src), step, lambda: (zeros, zeros), steps,
                                protocol.warmup, protocol.repeats)
    return Measurement([e + d for e, d in zip(enc, dec)], enc, dec, protocol.warmup, protocol.trim,
                       {"batch": batch, "source_len": source_len, "decoder_steps": steps},
                       f"torch eager ({torch.get_num_threads()} threads), time.perf_counter per graph call")


def _one_line(e: BaseException) -> str:
    lines = [l.strip() for l in str(e).strip().splitlines() if l.strip()]
    # TVM errors carry a traceback; the last line is the message
    msg = lines[-1] if lines else type(e).__name__
    for marker in ("RPCSessionTimeoutError", "Connection reset", "connection closed", "Broken pipe"):
        for l in lines:
            if marker.lower() in l.lower():
                return l[:300]
    return f"{type(e).__name__}: {msg}"[:300]


# ----------------------------------------------------------------------------- campaign
@dataclass
class Prepared:
    """What a backend needs for one arch (made by the caller's prepare callback)."""

    artifact: Path | None = None  # tvm
    export_dir: Path | None = None  # ort
    subnet: Any = None  # torch (a mosc.subnet.Subnet)
    notes: dict = field(default_factory=dict)  # recorded in the row's `extra`


NOISY_STD = 0.15  # std above this fraction of the median: the runs did not agree
NOISY_SKEW = 0.05  # trimmed mean this far from the median: two modes (load came and went)


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


@dataclass
class CampaignResult:
    measured: list[dict] = field(default_factory=list)  # rows written
    skipped: list[str] = field(default_factory=list)  # arch hashes already in the DB


class Campaign:
    """Measure archs one by one into the latency DB; each row is committed as soon as it is taken.

    Every arch gets TRIES attempts (connect, upload, load, measure) with exponential backoff;
    a failure after the last one raises MoscError (one line) with what was saved. Archs
    already in the DB for (target, backend, device key, emulated, shapes) are skipped unless
    force=True, so re-running the same command continues where it stopped.
    """

    def __init__(self, target: Target, backend: str, db, *, remote: Remote | None = None, force: bool = False,
                 tries: int = TRIES, backoff_s: float = BACKOFF_S, log: Callable[[str], None] = print,
                 source: str = "mosc measure"):
        if backend not in BACKENDS:
            raise MoscError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if remote is not None and backend != "tvm":
            raise MoscError(f"--backend {backend} measures on this machine; --tracker/--key are for tvm artifacts")
        self.target, self.backend, self.db, self.remote = target, backend, db, remote
        self.force, self.tries, self.backoff_s, self.log, self.source = force, tries, backoff_s, log, source
        self.device: dict = {}
        self.key = remote.key if remote else f"local:{socket.gethostname()}"

    # -- device ------------------------------------------------------------------------
    def _retry(self, what: str, fn):
        last = None
        for attempt in range(1, self.tries + 1):
            try:
                return fn()
            except MoscError:
                raise
            except Exception as e:  # noqa: BLE001  (any device-world failure is retried)
                last = _one_line(e)
                if attempt < self.tries:
                    pause = self.backoff_s * 2 ** (attempt - 1)
                    self.log(f"  try {attempt}/{self.tries} of {what} failed: {last}; retrying in {pause:g} s")
                    time.sleep(pause)
        raise _Failed(f"{what} failed after {self.tries} tries: {last}")

    def probe(self) -> dict:
        """Check the device before building anything: tracker up, key registered, device info."""
        if self.remote is None:
            self.device = host_info()
            return self.device

        def once():
            sess = connect(self.remote)
            try:
                return device_info(sess)
            finally:
                del sess
                gc.collect()  # end the session now (see _measure)

        try:
            self.device = self._retry(f"connecting to {self.remote.key!r} via tracker {self.remote.addr}", once)
        except _Failed as e:
            raise MoscError(str(e)) from None
        return self.device

    @property
    def emulated(self) -> bool:
        return bool(self.device.get("emulated"))

    # -- one arch ----------------------------------------------------------------------
    def _measure(self, prep: Prepared) -> tuple[Measurement, str | None]:
        from mosc.fileio import sha256_file

        p = self.target.protocol
        if self.backend == "ort":
            m = measure_ort(prep.export_dir, p)
            files = sorted(Path(prep.export_dir).glob("*.onnx"))
            return m, ",".join(sha256_file(f) for f in files)
        if self.backend == "torch":
            return measure_torch(prep.subnet, p, p.batch, p.source_len, p.decoder_steps), None
        from mosc.compiler.compile import load_artifact

        device = json.loads((Path(prep.artifact) / "manifest.json").read_text()).get("device", "cpu")
        sess = art = None
        try:
            if self.remote is None:
                art = load_artifact(prep.artifact, device)
            else:
                sess = connect(self.remote)
                art = load_artifact(prep.artifact, device, session=sess)
            return measure_tvm(art, p), sha256_file(Path(prep.artifact) / "manifest.json")
        finally:
            # An RPC session has no close(): it ends when its last handle is freed, and until then
            # the server stays busy (the next request would wait for it). Free it now.
            del art, sess
            gc.collect()

    def run(self, archs: list[Arch], prepare: Callable[[Arch], Prepared],
            done: Callable[[], None] | None = None) -> CampaignResult:
        """Measure (or skip) every arch in order; `done()` is called after each one (a progress bar)."""
        res = CampaignResult()
        p = self.target.protocol
        shapes = {"batch": p.batch, "source_len": p.source_len, "decoder_steps": p.decoder_steps}
        if not self.device:
            self.probe()
        tag = " [emulated: timings check function, not speed]" if self.emulated else ""
        for i, arch in enumerate(archs, 1):
            if not self.force and self.db.has(arch.hash, self.target.name, self.backend, self.key, self.emulated, shapes):
                res.skipped.append(arch.hash)
                self.log(f"[{i}/{len(archs)}] {arch.hash}: already in the database, skipped (--force re-measures)")
                if done:
                    done()
                continue
            prep = prepare(arch)
            t0 = time.perf_counter()
            try:
                m, sha = self._retry(f"measuring arch {arch.hash} on {self.key}", lambda: self._measure(prep))
            except _Failed as e:
                raise MoscError(f"{e}; {len(res.measured)} arch(s) measured in this run are saved in {self.db.path}; "
                                f"re-run the same command to measure the rest") from None
            if m.shapes != shapes:
                raise MoscError(f"arch {arch.hash}: graphs have shapes {m.shapes}, the {self.target.name} protocol "
                                f"says {shapes} (stale artifact? rebuild it)")
            row = self._row(arch, m, sha, prep)
            noise = noisy(m.stats)
            if noise:
                row["extra"]["noisy"] = noise
            row["id"] = self.db.insert(row)  # committed now: a later failure loses nothing
            res.measured.append(row)
            s = m.stats
            self.log(f"[{i}/{len(archs)}] {arch.hash}: {s['trimmed_mean_ms']:.2f} ms trimmed mean "
                     f"(encoder {s['encoder_ms']:.2f} + decoder {s['decoder_ms']:.2f}; median {s['median_ms']:.2f}, "
                     f"p90 {s['p90_ms']:.2f}, std {s['std_ms']:.2f}; {len(m.total_ms)} runs, "
                     f"{time.perf_counter() - t0:.1f} s){tag}")
            if noise:
                self.log(f"  warning: noisy measurement ({noise}); is something else running? "
                         "`--force` re-measures (the row is kept, marked noisy in its extra)")
            if done:
                done()
        return res

    def _row(self, arch: Arch, m: Measurement, sha: str | None, prep: Prepared) -> dict:
        tvm_version = None
        if self.backend == "tvm":
            from importlib.metadata import version

            tvm_version = f"apache-tvm {version('apache-tvm')}, apache-tvm-ffi {version('apache-tvm-ffi')}"
        host = {"client": host_info()}
        if self.remote is not None:
            host["device"] = self.device
        return {
            "target": self.target.name, "backend": self.backend, "device_key": self.key,
            "emulated": self.emulated, "arch_hash": arch.hash, "arch_json": arch.to_json(),
            "features": arch.hat_features(), **m.shapes,
            **{k: m.stats[k] for k in ("latency_ms", "mean_ms", "trimmed_mean_ms", "median_ms", "p90_ms", "std_ms",
                                       "min_ms", "max_ms", "encoder_ms", "decoder_ms", "encoder_std_ms",
                                       "decoder_std_ms")},
            "runs": len(m.total_ms), "warmup": m.warmup, "trim": m.trim,
            "samples": [round(x, 6) for x in m.total_ms], "artifact_sha256": sha, "tvm_version": tvm_version,
            "host": host, "source": self.source,
            "extra": {"method": m.method, "encoder_samples": [round(x, 6) for x in m.encoder_ms],
                      "decoder_samples": [round(x, 6) for x in m.decoder_ms], **prep.notes},
        }


class _Failed(Exception):
    """Internal: retries exhausted (turned into a MoscError with context by the caller)."""


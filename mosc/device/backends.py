"""Timing one model with one backend, with HAT's protocol (mosc.device.protocol).

    measure_tvm(art, protocol)               a loaded artifact (local VM or RPC VM: one code path), a
                                             translation model or an encoder-classifier (by its graphs)
    measure_artifact(dir, protocol, remote)  load an artifact here or over a fresh RPC session, time it
    measure_ort(export_dir, protocol)        ONNX Runtime on an export folder (side-by-side numbers)
    measure_torch(subnet, protocol, ...)     PyTorch eager (imports torch inside)
    measure_prepared(backend, prep, ...)     whichever of these a backend name and a Prepared call for
    Prepared                                 what a backend needs for one arch
    classify_timers(...) + side_by_side(...) one encoder-classifier call per backend, interleaved, medians

Timing method (TVM, a translation model): one run is one call of the artifact's `translate`
function (the encoder and the compiled greedy loop, eos disabled so exactly decoder_steps
steps run), timed on the device's own clock with `vm.time_evaluator("invoke_stateful", dev,
number=1, repeat=1)` after `set_input`: what a user of the artifact waits for. Beside it,
the kernel time: the encoder call and one decoder_step call, each timed alone with its inputs
preset, as encoder + decoder_steps x step (a static step does the same work at any position).
Why the device clock: over RPC each call costs a network round trip (~0.1 ms on 127.0.0.1,
~1 ms on a LAN), which would be measured as model time; the same code runs locally (tvm.cpu)
and remotely. TVM's evaluator makes one untimed call before the timed one, so every timed call
runs with warm caches. ORT and torch run in this process, in the Python loop, and are timed
with time.perf_counter around each graph call (protocol GRAPH_CALLS).

An encoder-classifier artifact goes through the same protocol with one run = one call of its
classifier graph (no decoder: every run's decoder time is 0, its total is the classifier's
time), on the same device clock, so `mosc bench`/`mosc check` treat both kinds alike.

Imports numpy at module level; tvm, onnxruntime and torch only inside the function that
needs them. Knows nothing of archs, retries, the latency database or how artifacts are
built (the caller's prepare callback, mosc.jobs.artifacts).
"""

from __future__ import annotations

import enum
import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from mosc.contract import (BOS_ID, CLASSIFIER, DECODER, ENCODER, ENCODER_CLASSIFIER, TRANSLATE, cache_shape,
                           decoder_layers, graph_kind, require_kind)
from mosc.device.protocol import TRANSLATE_CALL, Measurement, run_protocol
from mosc.errors import MoscError
from mosc.rpc import connect, device_info, machine_info

if TYPE_CHECKING:
    from mosc.compiler.targets import Protocol
    from mosc.rpc import Remote



class Backend(enum.StrEnum):
    """How a model is timed."""

    tvm = "tvm"  # the compiled artifact, here or on the device over RPC
    ort = "ort"  # ONNX Runtime on this machine
    torch = "torch"  # PyTorch eager on this machine


BACKENDS = tuple(Backend)


@dataclass
class Prepared:
    """What a backend needs for one arch (made by the caller's prepare callback)."""

    artifact: Path | None = None  # tvm
    export_dir: Path | None = None  # ort
    subnet: Any = None  # torch (a mosc.subnet.Subnet)
    notes: dict = field(default_factory=dict)  # recorded in the row's `extra`


def _source(batch: int, source_len: int) -> np.ndarray:
    """A fixed source: ids 4..19 (valid in any vocabulary of mosc's models), no padding."""
    return (4 + np.arange(batch * source_len) % 16).reshape(batch, source_len).astype(np.int64)


def _shapes(batch: int, source_len: int, steps: int) -> dict[str, int]:
    return {"batch": batch, "source_len": source_len, "decoder_steps": steps}


# ----------------------------------------------------------------------------- TVM
def measure_tvm(art, protocol: Protocol) -> Measurement:
    """Time a loaded mosc.compiler.artifact.Artifact (local or over RPC) with HAT's protocol: a
    translation model (one run = one call of its translate function, exactly decoder_steps steps;
    kernel time beside it), or an encoder-classifier (measure_tvm_classifier), told apart by its graphs."""
    import tvm

    if graph_kind(art.manifest["graphs"], f"artifact {art.dir}") == ENCODER_CLASSIFIER:
        return measure_tvm_classifier(art, protocol)
    dev, vm = art.device, art.vm
    graphs = art.manifest["graphs"]
    B, S = graphs[ENCODER]["inputs"][0]["shape"]
    shape, L = cache_shape(graphs), decoder_layers(graphs)
    T = shape[1]
    fn = {g: art.function(g) for g in (TRANSLATE, ENCODER, DECODER)}
    src = tvm.runtime.tensor(_source(B, S), dev)
    # eos -1 never matches: exactly T steps, whatever the tokens (comparable timings)
    vm.set_input(fn[TRANSLATE], src, *(tvm.runtime.tensor(np.array([v], np.int64), dev) for v in (T, -1)))
    vm.set_input(fn[ENCODER], src)
    vm.invoke_stateful(fn[ENCODER])
    cross = tuple(vm.get_outputs(fn[ENCODER]))  # remote handles over RPC: they stay on the device
    zeros = [tvm.runtime.tensor(np.zeros(shape, np.float32), dev) for _ in range(2 * L)]
    token = tvm.runtime.tensor(np.full((B,), BOS_ID, np.int64), dev)
    # a static step does the same work at every position
    vm.set_input(fn[DECODER], token, tvm.runtime.tensor(np.array([T // 2], np.int64), dev), *zeros, *cross)
    timed = vm.time_evaluator("invoke_stateful", dev, number=1, repeat=1)
    total, enc, dec, kernel = [], [], [], []
    for i in range(protocol.warmup + protocol.repeats):
        t_call = timed(fn[TRANSLATE]).mean * 1e3
        t_enc = timed(fn[ENCODER]).mean * 1e3
        t_step = timed(fn[DECODER]).mean * 1e3
        if i >= protocol.warmup:
            total.append(t_call)
            enc.append(t_enc)
            dec.append(max(t_call - t_enc, 0.0))
            kernel.append(t_enc + T * t_step)
    return Measurement(total, enc, dec, protocol.warmup, protocol.trim, _shapes(B, S, T), TVM_TRANSLATE,
                       protocol=TRANSLATE_CALL, kernel_ms=kernel)


# how measure_tvm times a translation model
TVM_TRANSLATE = ("tvm time_evaluator(invoke_stateful, number=1, repeat=1), device clock: per run one translate call "
                 "(encoder + compiled greedy loop, eos disabled: exactly decoder_steps steps); kernel time beside it "
                 "= the encoder call + decoder_steps x one decoder_step call, each timed alone with inputs preset; "
                 "encoder_ms = the encoder call, decoder_ms = translate - encoder")


def measure_tvm_classifier(art, protocol: Protocol) -> Measurement:
    """The protocol on an encoder-classifier: `warmup` untimed runs, then `repeats` timed runs, a run
    being one call of the classifier graph on the device clock (tvm_classify_timer: the translation
    path's evaluator). What the Measurement's fields then mean: total_ms = encoder_ms = the call's
    time (the encoder and its head are one graph), decoder_ms = 0 (there is no decoder); shapes:
    source_len = the sequence length, decoder_steps = 0."""
    timer = tvm_classify_timer(art)
    B, T = art.manifest["graphs"][CLASSIFIER]["inputs"][0]["shape"]
    # run_protocol with no decoder steps: the same warm-up/timed loop, each run one call
    enc, dec = run_protocol(lambda: (timer(), ()), None, tuple, 0, protocol.warmup, protocol.repeats)
    return Measurement.of_runs(enc, dec, protocol.warmup, protocol.trim, _shapes(B, T, 0),
                               f"{TVM_CLASSIFY}; one run = one classifier call")


def measure_artifact(artifact: str | Path, protocol: Protocol, remote: Remote | None = None, *,
                     measure: Callable = measure_tvm) -> tuple[Measurement, dict | None]:
    """Load an artifact on this machine (remote None) or on the device of `remote` (a new RPC
    session, ended before returning) and time it with `measure` (measure_tvm; tests may wrap it).

    Returns the measurement and what the device says about itself (None locally). Failures of
    the device or the connection propagate as they are (ConnectionError, TVM's errors): whether
    to retry or report them is the caller's choice.
    """
    from mosc.compiler.artifact import load_artifact, read_manifest

    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    sess = art = info = None
    try:
        if remote is not None:
            sess = connect(remote)
            info = device_info(sess)
        check_machine(artifact, manifest, info or machine_info(),
                      f"device {remote.key!r}" if remote is not None else "this machine")
        art = load_artifact(artifact, manifest.get("device", "cpu"), session=sess)
        return measure(art, protocol), info
    finally:
        # An RPC session has no close(): it ends when its last handle is freed, and until then
        # the server stays busy (the next request would wait for it). Free it now.
        del art, sess
        gc.collect()


# ELF e_machine -> the name platform.machine() gives that CPU architecture
ELF_MACHINES = {3: "i686", 40: "arm", 62: "x86_64", 183: "aarch64", 243: "riscv64"}
# platform.machine() spellings of one architecture -> the name above
MACHINE_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv6l": "arm", "armv7l": "arm",
                   "armv8l": "arm", "i386": "i686", "i586": "i686", "x86": "i686"}


def artifact_machine(art_dir: Path, manifest: dict) -> str | None:
    """The CPU architecture of an artifact's graph libraries, read from their ELF headers (the
    code itself says what it runs on, whatever the target file said); None when not ELF."""
    found = set()
    for entry in manifest["graphs"].values():
        try:
            with open(Path(art_dir) / entry["file"], "rb") as f:
                head = f.read(20)
        except OSError:
            return None  # loading it reports the missing file
        if len(head) < 20 or head[:4] != b"\x7fELF":
            return None
        em = int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
        found.add(ELF_MACHINES.get(em, f"ELF machine {em}"))
    return ", ".join(sorted(found)) or None


def check_machine(art_dir: Path, manifest: dict, info: dict, where: str) -> None:
    """MoscError (one line) before anything is uploaded when the artifact's code is for another CPU
    architecture than the device's (its `machine`, from mosc.device_info or machine_info)."""
    have = str(info.get("machine") or "")
    want = artifact_machine(art_dir, manifest)
    if not have or not want or MACHINE_ALIASES.get(have.lower(), have.lower()) == want:
        return
    hint = ("measure it over RPC on such a device (--tracker HOST:PORT --key KEY)" if where == "this machine"
            else "compile it for that device's target (--target) and measure again")
    raise MoscError(f"{art_dir} holds {want} code (compiled for target {manifest.get('target')!r}), but {where} "
                    f"is {have}: {hint}")


# ----------------------------------------------------------------------------- in this process
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
    zeros = be.zero_caches()
    enc_fn, step_fn = _host_timed(be.encode), _host_timed(be.step)

    def step(pos, caches, cross):
        seconds, outs = step_fn([token, positions[pos], *caches, *cross])
        return seconds, outs[1:]

    enc, dec = run_protocol(lambda: enc_fn([src]), step, lambda: zeros, be.cache_len,
                            protocol.warmup, protocol.repeats)
    return Measurement.of_runs(enc, dec, protocol.warmup, protocol.trim,
                               _shapes(be.batch, be.source_len, be.cache_len),
                               "onnxruntime CPU, time.perf_counter per graph call")


def measure_torch(sub, protocol: Protocol, batch: int, source_len: int, steps: int) -> Measurement:
    """The protocol with PyTorch eager (no_grad, this process's torch threads)."""
    import torch  # the one torch import of the device world

    sub = sub.eval()
    dev = next(sub.parameters()).device  # a subnet on a GPU is timed there
    src = torch.from_numpy(_source(batch, source_len)).to(dev)
    token = torch.full((batch,), BOS_ID, dtype=torch.int64, device=dev)
    positions = [torch.tensor([p], device=dev) for p in range(steps)]
    zeros = sub.init_cache(batch, steps)

    def synced(fn):  # CUDA runs asynchronously: a call's time ends when its kernels have finished
        if dev.type != "cuda":
            return fn
        return lambda *a: (lambda out: (torch.cuda.synchronize(dev), out)[1])(fn(*a))

    enc_fn, step_fn = _host_timed(synced(sub.encode)), _host_timed(synced(sub.decode_step))

    def step(pos, caches, cross):
        seconds, outs = step_fn(token, positions[pos], *caches, *cross)
        return seconds, outs[1:]

    with torch.no_grad():
        enc, dec = run_protocol(lambda: enc_fn(src), step, lambda: zeros, steps,
                                protocol.warmup, protocol.repeats)
    return Measurement.of_runs(enc, dec, protocol.warmup, protocol.trim, _shapes(batch, source_len, steps),
                               f"torch eager on {dev} ({torch.get_num_threads()} CPU threads), time.perf_counter "
                               "per graph call" + (" after cuda.synchronize" if dev.type == "cuda" else ""))


# ----------------------------------------------------------------------------- by backend name
def measure_prepared(backend: str, prep: Prepared, protocol: Protocol,
                     remote: Remote | None = None) -> tuple[Measurement, str | None]:
    """Time what `prep` holds for `backend` -> (measurement, sha256 of what was timed: the
    artifact's manifest for tvm, the .onnx files for ort, None for torch). Only tvm goes to
    `remote`; ort and torch run in this process."""
    from mosc.fileio import sha256_file

    if backend == "ort":
        m = measure_ort(prep.export_dir, protocol)
        return m, ",".join(sha256_file(f) for f in sorted(Path(prep.export_dir).glob("*.onnx")))
    if backend == "torch":
        p = protocol
        return measure_torch(prep.subnet, p, p.batch, p.source_len, p.decoder_steps), None
    if backend == "tvm":
        m, _ = measure_artifact(prep.artifact, protocol, remote)
        return m, sha256_file(Path(prep.artifact) / "manifest.json")
    raise MoscError(f"unknown backend {backend!r} (known: {', '.join(BACKENDS)})")


# ----------------------------------------------------------------------------- encoder-classifier
# One classification is one call of the classifier graph: no loop, no state. Each backend gets a
# timer (a function that runs one call and returns its seconds), made with the same clocks as
# above: TVM on the device clock (time_evaluator around invoke_stateful, inputs set once), ORT and
# torch with time.perf_counter around the call in this process. TVM's evaluator makes one untimed
# call before the timed one; the host timers do the same. Why: side_by_side interleaves the
# backends, and a call right after the others ran finds its weights evicted from the caches:
# measured on a bert-tiny encoder (T=32), ORT took 0.97 ms cold against 0.46 ms warm, which
# made TVM (warm) look 2x faster than it is.
TVM_CLASSIFY = "tvm time_evaluator(invoke_stateful, number=1, repeat=1), device clock, after one untimed call"
HOST_CLASSIFY = "time.perf_counter around one call, after one untimed call"


def classify_tokens(batch: int, seq_len: int) -> np.ndarray:
    """Fixed tokens: <s>, then ids 4..19 (valid in any vocabulary of mosc's models), no padding
    (static graphs do the same work whatever the ids and however much is padding)."""
    t = _source(batch, seq_len)
    t[:, 0] = BOS_ID
    return t


def tvm_classify_timer(art) -> Callable[[], float]:
    """A loaded artifact holding an encoder-classifier (local or over RPC) -> a timer of one call."""
    import tvm

    require_kind(art.manifest["graphs"], ENCODER_CLASSIFIER, f"artifact {art.dir}")
    B, T = art.manifest["graphs"][CLASSIFIER]["inputs"][0]["shape"]
    vm, fn = art.vm, art.function(CLASSIFIER)
    vm.set_input(fn, tvm.runtime.tensor(classify_tokens(B, T), art.device))
    timed = vm.time_evaluator("invoke_stateful", art.device, number=1, repeat=1)
    return lambda: timed(fn).mean


def ort_classify_timer(export_dir: str | Path, threads: int | None = 1) -> Callable[[], float]:
    """An encoder-classifier export folder on ONNX Runtime (CPU, `threads` intra-op) -> a timer."""
    from mosc.runtime import ort_classifier

    clf = ort_classifier(export_dir, threads=threads)
    tokens = classify_tokens(clf.batch, clf.seq_len)
    run = _host_timed(clf.run)

    def once():
        clf.run(tokens)  # untimed: warm caches, as TVM's evaluator does
        return run(tokens)[0]

    return once


def torch_classify_timer(encoder, batch: int, seq_len: int) -> Callable[[], float]:
    """A torch module with `classify(tokens [B, T]) -> [B, C]` (mosc.nn.bert.BertEncoder), eager,
    no_grad, on this process's torch threads -> a timer."""
    import torch

    encoder = encoder.eval()
    tokens = torch.from_numpy(classify_tokens(batch, seq_len))

    def once():
        with torch.no_grad():
            encoder.classify(tokens)  # untimed: warm caches, as TVM's evaluator does
            t0 = time.perf_counter()
            encoder.classify(tokens)
            return time.perf_counter() - t0

    return once


def side_by_side(timers: dict[str, Callable[[], float]], runs: int, warmup: int = 3) -> dict[str, dict]:
    """Each timer `warmup` times untimed, then `runs` rounds in which every timer runs once (the
    order rotating, so load that comes and goes hits all alike) -> per name {median_ms, min_ms,
    mean_ms, runs}."""
    if runs < 1:
        raise MoscError(f"runs must be >= 1, got {runs}")
    for t in timers.values():
        for _ in range(warmup):
            t()
    names = list(timers)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(runs):
        for n in names[r % len(names):] + names[: r % len(names)]:
            times[n].append(timers[n]())
    return {n: {"median_ms": float(np.median(ts)) * 1e3, "min_ms": float(min(ts)) * 1e3, "mean_ms": float(np.mean(ts)) * 1e3,
                "runs": len(ts)} for n, ts in times.items()}

"""The artifact folder: what the compiler writes and a device loads and runs.

    model.so        one shared library: each graph is the Relax function of its name (with
                    its weights); a translation model also holds `translate`, the compiled
                    greedy loop around the other two (mosc.compiler.loop)
    manifest.json   written last, atomically: format, target, TVM versions, tuning, each
                    graph's signature and function, the library's sha256, and manifest_sha256
                    (a sha256 over all the rest, so no field can be edited unnoticed)

    write_manifest  the compiler's last step: a folder without a manifest is not an artifact
    read_manifest   the manifest, its structure and seal checked (the files are not read)
    verify_artifact read_manifest + every file's sha256; loads no code
    load_artifact   verify, then load the library into a Relax VM (here, or over an RPC session)
    Artifact        the loaded VM, its functions run with numpy in, numpy out

This module does not know how an artifact is compiled or tuned, nor how it is timed (the
device world times artifacts through the same VM calls `Artifact.run` uses). It imports
tvm only inside functions and needs only the TVM runtime, so a device can use it.
"""

from __future__ import annotations

import hashlib
import platform
import shutil
import tempfile
from pathlib import Path

import numpy as np

from mosc.contract import (DECODER, ENCODER, check_graphs, check_seal, check_translate_graph, check_translation_graphs,
                           seal)
from mosc.errors import MoscError
from mosc.fileio import atomic_write_json, field, read_json, sha256_file, verify_files

MANIFEST = "manifest.json"
LIBRARY = "model.so"  # the one library of an artifact
# /2: one library, a function per graph, translate (the compiled loop); /1 had a library per graph
ARTIFACT_FORMAT = "mosc-artifact/2"
SEAL = "manifest_sha256"
RECOMPILE = "recompile it (mosc compile; cached artifacts are rebuilt on their own)"


# ----------------------------------------------------------------------------- manifest
def write_manifest(art_dir: Path | str, graphs: dict[str, dict], *, target: str, tvm_target: str, device: str,
                   cuda_kernels, tuning: dict, compile_seconds: float, extra: dict | None = None,
                   cuda_arch: str | None = None, cuda_note: str | None = None) -> dict:
    """Write the manifest of the library already in `art_dir`; returns it.

    graphs: graph name -> {"file": LIBRARY, "function": name, "inputs": [...], "outputs": [...]}.
    cuda_kernels: None (no CUDA), "binary" (a cubin for the SM `cuda_arch`, e.g. "sm_90a", which
    load_artifact checks against the GPU) or "source" (compiled by the GPU host's TVM at load;
    cuda_note says why). See mosc.compiler.cuda.
    The library's sha256 and the TVM versions are added here; `extra` sections (e.g. "model")
    may not override any of these.
    """
    import tvm
    import tvm_ffi

    art_dir = Path(art_dir)
    manifest = {
        "format": ARTIFACT_FORMAT,
        "target": target,
        "tvm_target": tvm_target,
        "device": device,
        "cuda_kernels": cuda_kernels,
        "cuda_arch": cuda_arch,
        "cuda_note": cuda_note,
        "tvm_version": tvm.__version__,
        "tvm_ffi_version": tvm_ffi.__version__,
        "tuning": tuning,
        "graphs": graphs,
        "files": {g["file"]: sha256_file(art_dir / g["file"]) for g in graphs.values()},
        "compile_seconds": round(compile_seconds, 2),
    }
    clash = set(extra or {}) & (set(manifest) | {SEAL})
    if clash:
        raise MoscError(f"extra_manifest may not override {sorted(clash)}")
    manifest = seal({**manifest, **(extra or {})}, SEAL)
    check_manifest(manifest, f"manifest of {art_dir}")  # what a reader would refuse is never written
    atomic_write_json(art_dir / MANIFEST, manifest)
    return manifest


def schedule_coverage(manifest: dict) -> dict[str, int]:
    """Over all graphs of an artifact: {functions, from_database, tuned, default_scheduled, naive}
    (the TIR functions whose schedule came from a database record, those of them from a tuned
    record rather than a recorded default schedule, those given a default schedule by the build,
    and those left as naive loops). All 0 for a manifest written before builds recorded it."""
    per_graph = list((manifest["tuning"].get("coverage") or {}).values())
    keys = ("functions", "from_database", "tuned", "default_scheduled", "naive")
    return {k: sum(g.get(k, 0) for g in per_graph) for k in keys}


def describe_coverage(cov: dict, device: str = "cpu") -> str:
    """schedule_coverage as one phrase, e.g. "45 of 53 functions from database records (12 tuned,
    33 the recorded default schedule), 8 mosc's default schedules". A database record may be the
    default schedule's own (the tuner times it as the yardstick), so tuned ones are counted apart."""
    n, db, tuned, naive = cov["functions"], cov["from_database"], cov["tuned"], cov["naive"]
    rest = "TVM's default GPU schedules" if device != "cpu" else "mosc's default schedules"
    out = (f"{db} of {n} functions from database records ({tuned} tuned, {db - tuned} the recorded default schedule), "
           f"{n - db - naive} {rest}")
    return out + (f", {naive} unscheduled (naive loops)" if naive else "")


def check_manifest(manifest: dict, where: str) -> dict:
    """The structure a loader relies on: format, target, device, tuning, graphs and files."""
    if field(manifest, "format", str, where) != ARTIFACT_FORMAT:
        raise MoscError(f"{where}: format {manifest['format']!r}, this mosc runs {ARTIFACT_FORMAT!r} "
                        f"(one library with the compiled decode loop): {RECOMPILE}")
    for key in ("target", "tvm_target", "device"):
        if not field(manifest, key, str, where):
            raise MoscError(f"{where}: {key!r} is empty")
    tuning = field(manifest, "tuning", dict, where)
    field(tuning, "tuned", bool, f"{where} tuning")
    field(tuning, "database", dict, f"{where} tuning")
    graphs = check_graphs(manifest, where, ".so", library=LIBRARY)
    if {ENCODER, DECODER} & set(graphs):  # a translation model: its graphs and its compiled loop
        check_translation_graphs(graphs, where)
        check_translate_graph(graphs, where)
    return manifest


def read_manifest(art_dir: Path | str) -> dict:
    """The manifest of an artifact folder, its structure and seal checked; reads no library."""
    path = Path(art_dir) / MANIFEST
    if not path.is_file():
        raise MoscError(f"{art_dir} is not a mosc artifact (no {MANIFEST})")
    manifest = read_json(path, "artifact manifest")
    check_manifest(manifest, str(path))
    check_seal(manifest, SEAL, str(path), RECOMPILE)
    return manifest


def verify_artifact(art_dir: Path | str) -> dict:
    """Check the manifest and every file's sha256 against it; return the manifest. Loads no code."""
    art_dir = Path(art_dir)
    manifest = read_manifest(art_dir)
    verify_files(art_dir, manifest["files"], "the manifest")
    return manifest


# ----------------------------------------------------------------------------- loading
class Artifact:
    """A loaded artifact: its library in one Relax VM, each graph a function, run with numpy in,
    numpy out.

    Over RPC, calls go through vm.set_input / invoke_stateful / get_outputs (a remote VM's
    direct call returns an object that cannot be indexed); in this process, directly.
    """

    def __init__(self, art_dir: Path, manifest: dict, vm, device, local_cpu: bool = False):
        self.dir, self.manifest, self.vm, self.device = art_dir, manifest, vm, device
        self.local_cpu = local_cpu  # the VM runs in this process on the CPU: its memory is ours
        self._inputs: dict[str, list] = {}  # graph -> (input tensor on the device, numpy view or None), reused
        self._calls: dict[str, object] = {}  # graph -> its VM function (local calls)

    @property
    def graphs(self) -> list[str]:
        return list(self.manifest["graphs"])

    def function(self, graph: str) -> str:
        """The VM function of a graph."""
        return self.manifest["graphs"][graph]["function"]

    def tensors(self, graph: str, inputs) -> list:
        """Inputs (list in signature order, or dict by name) checked and copied to the device, into
        tensors allocated on the graph's first call and reused (the next call overwrites them): a
        new TVM tensor costs ~50 us of Python, a copy into one ~15 us (~1 us through a numpy view of
        local CPU memory), and a translation is one call."""
        import tvm

        spec = self.manifest["graphs"][graph]["inputs"]
        if isinstance(inputs, dict):
            missing = [s["name"] for s in spec if s["name"] not in inputs]
            if missing or len(inputs) != len(spec):
                raise MoscError(f"{graph}: inputs are {[s['name'] for s in spec]}, got {sorted(inputs)}")
            inputs = [inputs[s["name"]] for s in spec]
        if len(inputs) != len(spec):
            raise MoscError(f"{graph}: expects {len(spec)} inputs, got {len(inputs)}")
        arrays = []
        for s, x in zip(spec, inputs):
            x = np.asarray(x)
            if list(x.shape) != s["shape"] or str(x.dtype) != s["dtype"]:
                raise MoscError(f"{graph}: input {s['name']} must be {s['dtype']}{s['shape']}, got {x.dtype}{list(x.shape)}")
            arrays.append(np.ascontiguousarray(x))
        if graph not in self._inputs:
            tensors = [tvm.runtime.empty(s["shape"], s["dtype"], self.device) for s in spec]
            # this process's CPU memory: write through numpy views of it (~1 us; copyfrom's Python: ~15 us)
            self._inputs[graph] = [(t, np.from_dlpack(t) if self.local_cpu else None) for t in tensors]
        for (t, view), x in zip(self._inputs[graph], arrays):
            if view is not None:
                view[...] = x
            else:
                t.copyfrom(x)
        return [t for t, _ in self._inputs[graph]]

    def set_inputs(self, graph: str, inputs) -> None:
        """Copy inputs to the device (untimed part of a measurement)."""
        self.vm.set_input(self.function(graph), *self.tensors(graph, inputs))

    def run(self, graph: str, inputs) -> list[np.ndarray]:
        """Run one graph; inputs: list in signature order or dict by name. Returns numpy outputs.
        Locally the function is called directly; over RPC through set_input/invoke_stateful/get_outputs."""
        fn = self.function(graph)
        if self.local_cpu:
            if graph not in self._calls:
                self._calls[graph] = self.vm[fn]  # the lookup costs ~50 us of Python per call
            out = self._calls[graph](*self.tensors(graph, inputs))
            outs = list(out) if not hasattr(out, "numpy") else [out]
            return [np.from_dlpack(o).copy() for o in outs]  # .numpy() costs ~10 us more per tensor
        self.set_inputs(graph, inputs)
        self.vm.invoke_stateful(fn)
        out = self.vm.get_outputs(fn)
        outs = list(out) if not hasattr(out, "numpy") else [out]
        return [o.numpy() for o in outs]


def load_artifact(art_dir: Path | str, device: str = "cpu", session=None) -> Artifact:
    """Verify an artifact's sha256s, then load its library into a VM.

    device: "cpu" or "cuda" (device 0). session: an RPC session (tvm.rpc.connect...):
    the library is verified here, uploaded, and loaded on the remote side.
    Works with the runtime-only TVM (`tvm.runtime`, no `tvm.relax` import).

    What is loaded is a verified private copy (or, over RPC, the verified bytes) under a
    name carrying its sha256, never the artifact's own file: dlopen matches libraries
    already loaded by path, so after the artifact is recompiled in place a second load in
    the same process would get the old code back; and the file could change between the
    check and the load.
    """
    art_dir = Path(art_dir)
    manifest = verify_artifact(art_dir)  # fail before copying or loading anything: a .so is code
    import tvm
    from tvm.runtime.vm import VirtualMachine

    dev = session.device(device) if session is not None else tvm.device(device)
    _check_gpu(art_dir, manifest, session)  # a cubin for another GPU: one line now, not a CUDA error at a call
    # mkdtemp: mode 0700, so no other user can swap a copy between its check and its load
    private = Path(tempfile.mkdtemp(prefix="mosc-artifact-")) if session is None else None
    try:
        digest = manifest["files"][LIBRARY]
        if session is None:
            lib = _load_local(art_dir, LIBRARY, digest, private, manifest.get("target"))
        else:
            lib = _load_remote(session, art_dir, LIBRARY, digest)
        vm = VirtualMachine(lib, dev)
    finally:
        if private is not None:  # a loaded library stays mapped without its file
            shutil.rmtree(private, ignore_errors=True)
    return Artifact(art_dir, manifest, vm, dev, local_cpu=session is None and device == "cpu")


def _check_gpu(art_dir: Path, manifest: dict, session) -> None:
    """An artifact whose kernels are a cubin needs a GPU that can run it (CUDA device 0 here, or
    on the RPC session's side): MoscError in one line otherwise (mosc.compiler.cuda.check_gpu_arch)."""
    if manifest.get("cuda_kernels") != "binary":
        return  # no CUDA, or source that the GPU host's TVM compiles for its own GPU
    import tvm

    from mosc.compiler.cuda import check_gpu_arch, compute_version

    gpu = session.device("cuda") if session is not None else tvm.cuda(0)
    check_gpu_arch(manifest.get("cuda_arch"), compute_version(gpu), f"artifact {art_dir}")


def _private_name(file: str, digest: str) -> str:
    return f"{Path(file).stem}-{digest}.so"  # keep the suffix: load_module picks the loader by it


def _changed(art_dir: Path, file: str) -> MoscError:
    return MoscError(f"{art_dir}: {file} changed while it was being loaded (it no longer matches its sha256 "
                     "in the manifest); load it again once it is no longer being written")


def _load_local(art_dir: Path, file: str, digest: str, private: Path, target: str | None):
    import tvm

    copy = private / _private_name(file, digest)
    shutil.copyfile(art_dir / file, copy)
    if sha256_file(copy) != digest:
        raise _changed(art_dir, file)
    try:
        return tvm.runtime.load_module(str(copy))
    except Exception as e:  # noqa: BLE001  (TVM's error for a foreign .so says "No such file")
        raise MoscError(
            f"{art_dir / file} cannot be loaded on this machine ({platform.machine()}): the artifact was compiled for "
            f"target {target!r}; run it there (or over RPC: mosc measure/bench --tracker)"
            + ("" if "cannot open shared object" in str(e) else f" [{str(e).strip().splitlines()[-1][:200]}]")
        ) from None


def _load_remote(session, art_dir: Path, file: str, digest: str):
    data = (art_dir / file).read_bytes()
    if hashlib.sha256(data).hexdigest() != digest:
        raise _changed(art_dir, file)
    name = _private_name(file, digest)  # the remote side dlopens by path too
    session.upload(bytearray(data), name)
    return session.load_module(name)

"""CUDA kernels compiled ahead of time: a cubin in the library, and the GPU it fits.

    source_kernels   context: TVM keeps the kernels' CUDA source, even where a GPU driver is present
    compile_kernels  the CUDA source of a built executable -> cubins for the target's SM (nvcc)
    Kernels          what compile_kernels made, and the manifest fields that say so
    pack_imports     export_library's fpack_imports: the library's module blob with the cubins swapped in
    swap_kernels     the same on the blob's bytes (pure)
    check_gpu_arch   refuse, in one line, a GPU that cannot run an artifact's cubin (pure)
    compute_version  a TVM device's compute capability, or None where there is no CUDA GPU

What it knows, checked against apache-tvm 0.27.0.post1 from PyPI (and its upstream source):
- tvm.compile creates the CUDA module through the registry's "ffi.Module.create.cuda". That
  factory lives in libtvm_runtime_cuda.so, which loads only where libcuda.so.1 (the driver) is;
  without it, and always under TVM_COMPILE_FORCE_FALLBACK=1, the codegen makes a fallback module
  of kind "cuda" that holds the source with fmt "cuda". With the factory, TVM compiles the source
  at build time (tvm_callback_cuda_compile: NVRTC by default) for the *build machine's* GPU: the
  target scope is not entered at that point. So mosc always builds with the fallback.
- A library's imported modules are one blob (`__tvm_ffi__library_bin`): <u64 size> <import
  tree: two u64 vectors> then per module <kind: str> [<payload: str>] (no payload for "_lib");
  a str is <u64 length> <bytes>. A "cuda" payload is <fmt: str> <function table> <code: str>,
  the layout of CUDAModuleNode::SaveToBytes, which the GPU host's loader
  ("ffi.Module.load_from_bytes.cuda") reads: fmt "cuda" is compiled there (needs
  tvm_callback_cuda_compile, so TVM's Python side and NVRTC or nvcc on the GPU host), "cubin"
  goes straight to cuModuleLoadData.
- The Python side offers no way to make a "cuda" module from bytes without the driver, so the
  cubin is put into the blob's bytes: `swap_kernels` replaces fmt and code, keeps the function
  table's bytes as they are, and checks that the payload is exactly what it expects.
- A cubin for sm_XY runs on compute capability X.Z with Z >= Y; one for sm_XYa only on X.Y;
  one for sm_XYf on X.Z with Z >= Y (CUDA's binary compatibility rules).

What it does not know: the artifact's layout or manifest (artifact.py), the model, how tuning
works; it never runs a kernel, and never touches a GPU itself (callers pass the device). It
imports tvm only inside functions and never imports torch.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
from contextlib import contextmanager
from dataclasses import dataclass

from mosc.errors import MoscError

FORCE_FALLBACK = "TVM_COMPILE_FORCE_FALLBACK"
NVCC = "nvcc"
SOURCE_FMT, CUBIN_FMT = b"cuda", b"cubin"
ARCH = re.compile(r"sm_(\d+)(\d)([af]?)\Z")
NO_NVCC = ("nvcc was not on PATH at build time, so the kernels are CUDA source that the GPU host's TVM compiles "
           "when it loads the library (NVRTC via cuda-bindings, or nvcc); install the CUDA toolkit (nvcc) on the "
           "build machine and recompile to ship a cubin")


@contextmanager
def source_kernels():
    """tvm.compile inside keeps CUDA kernels as source (the fallback module), wherever it runs."""
    old = os.environ.get(FORCE_FALLBACK)
    os.environ[FORCE_FALLBACK] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(FORCE_FALLBACK, None)
        else:
            os.environ[FORCE_FALLBACK] = old


def cuda_modules(mod) -> list:
    """The modules of kind "cuda" in a runtime module's import tree."""
    out, stack, seen = [], [mod], set()
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        if m.kind == "cuda":
            out.append(m)
        stack.extend(m.imports)
    return out


def sm_arch(tvm_target) -> str | None:
    """The SM architecture of a CUDA tvm.target.Target ("sm_90a"), None for other kinds or none set."""
    if tvm_target.kind.name != "cuda":
        return None
    arch = tvm_target.attrs.get("arch")
    return str(arch) if arch else None


@dataclass(frozen=True)
class Kernels:
    """How a library ships its CUDA kernels: kind None (no CUDA), "source" or "binary"; arch: the
    SM of the cubin; note: why they are source on a GPU target; cubins: (source, cubin) pairs."""

    kind: str | None = None
    arch: str | None = None
    note: str | None = None
    cubins: tuple = ()

    def manifest(self) -> dict:
        return {"cuda_kernels": self.kind, "cuda_arch": self.arch, "cuda_note": self.note}


def compile_kernels(ex, tvm_target, name: str) -> Kernels:
    """The CUDA source modules of executable `ex` (built inside source_kernels()) compiled to
    cubins for the target's SM with nvcc. Without nvcc, or for a target without an arch, the
    kernels stay source and the note says why. name: the target's, for messages."""
    mods = cuda_modules(ex.mod)
    if not mods:
        return Kernels()
    if any(m.is_runnable() for m in mods):  # only outside source_kernels(), on a machine with a driver
        raise MoscError(f"target {name}: TVM compiled the CUDA kernels for this machine's GPU instead of keeping "
                        f"their source; build inside mosc.compiler.cuda.source_kernels()")
    arch = sm_arch(tvm_target)
    if arch is None or not ARCH.match(arch):
        return Kernels("source", note=f"the target's tvm_target names no SM architecture like sm_90a ({arch!r}), "
                                      "so the kernels are CUDA source compiled by the GPU host's TVM at load")
    if not shutil.which(NVCC):
        return Kernels("source", note=NO_NVCC)
    return Kernels("binary", arch, cubins=tuple((src, nvcc_cubin(src, tvm_target, name))
                                                 for src in (m.inspect_source("cuda") for m in mods)))


def nvcc_cubin(source: str, tvm_target, name: str) -> bytes:
    """CUDA source -> a cubin for the target's arch, with TVM's own nvcc flags (tvm.support.nvcc:
    -O3, --use_fast_math like its NVRTC path at load time)."""
    from tvm.support import nvcc

    arch = sm_arch(tvm_target)
    try:
        with tvm_target:  # compile_cuda reads the arch's major version from the current target
            cubin = bytes(nvcc.compile_cuda(source, target_format="cubin", arch=arch, compiler="nvcc"))
    except Exception as e:  # noqa: BLE001  (RuntimeError: the whole source, then nvcc's output)
        text = str(e).split("Compilation error:")[-1]
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        why = next((ln for ln in lines if "error" in ln.lower()), lines[-1] if lines else type(e).__name__)
        raise MoscError(f"target {name}: nvcc could not compile the CUDA kernels for {arch}: {why[:300]}") from None
    if cubin[:4] != b"\x7fELF":
        raise MoscError(f"target {name}: nvcc made no cubin for {arch} (got {cubin[:8]!r}...)")
    return cubin


# ----------------------------------------------------------------------------- the library's blob
def _str(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


class _Reader:
    def __init__(self, data: bytes, where: str):
        self.data, self.pos, self.where = data, 0, where

    def u64(self) -> int:
        if self.pos + 8 > len(self.data):
            raise MoscError(f"{self.where}: the module blob ends early (not the TVM 0.27 layout)")
        (v,) = struct.unpack_from("<Q", self.data, self.pos)
        self.pos += 8
        return v

    def vec(self) -> list[int]:
        n = self.u64()
        return [self.u64() for _ in range(n)]

    def str(self) -> bytes:
        n = self.u64()
        if self.pos + n > len(self.data):
            raise MoscError(f"{self.where}: the module blob ends early (not the TVM 0.27 layout)")
        self.pos += n
        return self.data[self.pos - n:self.pos]


def swap_kernels(blob: bytes, cubins, where: str = "library") -> bytes:
    """A packed-imports blob (<u64 size> + body) with each "cuda" module's source replaced by its
    cubin (cubins: (source, cubin) pairs). Every "cuda" payload must be fmt "cuda" + function
    table + one of the given sources, else MoscError: nothing is guessed."""
    cubins = [(s.encode() if isinstance(s, str) else bytes(s), bytes(c)) for s, c in cubins]
    r = _Reader(blob, where)
    size = r.u64()
    if size != len(blob) - 8:
        raise MoscError(f"{where}: the module blob says {size} bytes, holds {len(blob) - 8} (not the TVM 0.27 layout)")
    start = r.pos
    indptr = r.vec()
    r.vec()  # child indices
    out = [blob[start:r.pos]]
    swapped = 0
    for _ in range(max(len(indptr) - 1, 0)):
        kind = r.str()
        out.append(_str(kind))
        if kind == b"_lib":
            continue
        payload = r.str()
        if kind == b"cuda":
            payload = _swap_payload(payload, cubins, where)
            swapped += 1
        out.append(_str(payload))
    if r.pos != len(blob):
        raise MoscError(f"{where}: {len(blob) - r.pos} bytes after the last module (not the TVM 0.27 layout)")
    if swapped == 0 and cubins:
        raise MoscError(f"{where}: no CUDA module in the library to put the cubin in")
    body = b"".join(out)
    return struct.pack("<Q", len(body)) + body


def _swap_payload(payload: bytes, cubins, where: str) -> bytes:
    head = _str(SOURCE_FMT)
    if not payload.startswith(head):
        raise MoscError(f"{where}: its CUDA module is not CUDA source (fmt {payload[8:16]!r}...), "
                        "so there is no source to replace by a cubin")
    for source, cubin in cubins:
        tail = _str(source)
        if payload.endswith(tail) and len(payload) >= len(head) + len(tail):
            return _str(CUBIN_FMT) + payload[len(head):len(payload) - len(tail)] + _str(cubin)
    raise MoscError(f"{where}: its CUDA module's source is not the one compiled to a cubin (not the TVM 0.27 layout)")


def pack_imports(cubins):
    """export_library's fpack_imports: TVM's own packing (runtime.ModulePackImportsToTensor, then
    codegen.codegen_blob for the host's LLVM target, as export_library does) with the CUDA source
    swapped for the cubins."""

    def fpack(mod, is_system_lib, symbol_prefix, workspace_dir):
        import tvm_ffi

        blob = tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")(mod).numpy().tobytes()
        blob = swap_kernels(blob, cubins)
        hosts = [m for m in _tree(mod) if m.kind == "llvm"]
        if not hosts:
            raise MoscError("the library has no LLVM host module to hold the CUDA kernels' cubin")
        llvm_target = hosts[0].get_function("_get_target_string")()
        obj = tvm_ffi.get_global_func("codegen.codegen_blob")(blob, is_system_lib, llvm_target, symbol_prefix)
        path = os.path.join(workspace_dir, f"{symbol_prefix}devc.o")
        obj.write_to_file(path)
        return path

    return fpack


def _tree(mod) -> list:
    out, stack, seen = [], [mod], set()
    while stack:
        m = stack.pop()
        if id(m) not in seen:
            seen.add(id(m))
            out.append(m)
            stack.extend(m.imports)
    return out


# ----------------------------------------------------------------------------- the GPU at load time
def compute_version(dev) -> str | None:
    """A TVM CUDA device's compute capability ("9.0"), local or over RPC; None where there is no
    CUDA GPU or this TVM has no CUDA runtime (tvm.cuda(0).compute_version would raise)."""
    try:
        return str(dev.compute_version) if dev.exist else None
    except Exception:  # noqa: BLE001  ("Device API cuda is not enabled")
        return None


def _sm(compute: str) -> tuple[int, int] | None:
    m = re.fullmatch(r"(\d+)\.(\d+)", compute.strip())
    return (int(m[1]), int(m[2])) if m else None


def check_gpu_arch(arch, compute: str | None, what: str) -> None:
    """MoscError, one line, unless a GPU of compute capability `compute` ("9.0"; None: no GPU)
    can run a cubin compiled for `arch` ("sm_90a"). what: the artifact, for the message."""
    m = ARCH.match(arch) if isinstance(arch, str) else None
    if m is None:
        raise MoscError(f"{what}: its manifest's cuda_arch {arch!r} is not an SM architecture like 'sm_90a'; "
                        "recompile it (mosc compile)")
    major, minor, suffix = int(m[1]), int(m[2]), m[3]
    if compute is None:
        raise MoscError(f"{what} holds CUDA kernels compiled for {arch}, but no CUDA GPU is visible here "
                        f"(or this TVM has no CUDA runtime): run it on a machine with an {arch} GPU")
    gpu = _sm(compute)
    if gpu is None:
        raise MoscError(f"{what}: the GPU reports compute capability {compute!r}, not MAJOR.MINOR")
    fits = gpu == (major, minor) if suffix == "a" else gpu[0] == major and gpu[1] >= minor
    if not fits:
        raise MoscError(f"{what} holds CUDA kernels for {arch}, this GPU is sm_{gpu[0]}{gpu[1]} "
                        f"(compute capability {compute}): compile it for this GPU's target")

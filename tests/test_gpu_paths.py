"""Devices and precisions: device resolution and its errors, bf16 autocast training on the CPU,
checkpoints that hold only CPU tensors (so a GPU run resumes on a CPU-only machine), fp16
refused on the CPU, evaluation and the search fitness on a chosen device, the gpu_check dry
run, the Jetson Orin target (cross-compiled here), and GPU artifacts whose kernels are a cubin
compiled here for the target's SM (nvcc; source without it), checked against the GPU at load.
Tests marked `cuda` run only where torch sees a GPU."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mosc.errors import MoscError
from mosc.fileio import load_tensors, save_tensors
from mosc.nn.corpus import load_corpus
from mosc.nn.device import CPU_RNG, CUDA_RNG, Amp, Precision, resolve_device, rng_states, to_device
from mosc.nn.synthetic import SyntheticConfig
from mosc.nn.train import TrainConfig, load_trained, train

REPO = Path(__file__).resolve().parent.parent
HAS_CUDA = torch.cuda.is_available()
HAS_NVCC = shutil.which("nvcc") is not None
KERNELS = "binary" if HAS_NVCC else "source"  # what a GPU artifact built here carries
cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
SMALL = SyntheticConfig(n_train=300, n_val=30, n_test=30)


@pytest.fixture(scope="module")
def data():
    return load_corpus("synthetic", synthetic=SMALL, vocab_size=400)


def cfg(**kw):
    base = dict(steps=6, max_tokens=512, warmup=2, save_every=3, log_every=2, max_len=64, device="cpu")
    return TrainConfig(**{**base, **kw})


def weights(run: Path) -> dict:
    return load_tensors(run / (run / "latest").read_text().strip() / "model.safetensors")


def one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# ---------------------------------------------------------------- device resolution


def test_resolve_cpu_and_auto_without_gpu(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("auto", local_rank=1) == torch.device("cpu")


@pytest.mark.parametrize("spec", ["gpu", "CUDA", "cuda:", "cuda:x", "cuda:-1", "cuda0", " cpu", "", 0, None])
def test_bad_device_spec_is_one_line(spec):
    with pytest.raises(MoscError) as e:
        resolve_device(spec)
    assert one_line(e).startswith("device must be auto, cpu, cuda or cuda:N, got")
    with pytest.raises(MoscError, match="device must be"):
        TrainConfig(device=spec)


@pytest.mark.skipif(HAS_CUDA, reason="this machine has a GPU")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_gpu_names_what_was_found(spec):
    with pytest.raises(MoscError) as e:
        resolve_device(spec)
    msg = one_line(e)
    assert f"device {spec!r} asked for, but there is no CUDA device here" in msg
    assert "CPU-only build" in msg or "sees no GPU" in msg, msg


def test_cuda_indices_and_torchrun_ranks(monkeypatch):
    """With (pretended) two GPUs: cuda:N must exist, and under torchrun each process takes
    cuda:LOCAL_RANK (an explicit cuda:N there would put two processes on one GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "Fake GPU")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cuda", local_rank=1) == resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    with pytest.raises(MoscError) as e:
        resolve_device("cuda:3")
    assert one_line(e) == "device cuda:3 does not exist: this machine has 2 CUDA devices (cuda:0 Fake GPU, cuda:1 Fake GPU)"
    with pytest.raises(MoscError, match="under torchrun each process takes cuda:LOCAL_RANK"):
        resolve_device("cuda:0", local_rank=0)
    with pytest.raises(MoscError, match="does not exist"):
        resolve_device("cuda", local_rank=2)


# ---------------------------------------------------------------- precision


@pytest.mark.parametrize("value", ["fp8", "FP32", "float32", "", None, 16])
def test_bad_precision_is_one_line(value):
    with pytest.raises(MoscError) as e:
        TrainConfig(precision=value)
    assert one_line(e).startswith("precision must be one of fp32, bf16, fp16, got")


def test_fp16_on_cpu_is_refused_before_anything_is_made(tmp_path, data):
    with pytest.raises(MoscError) as e:
        Amp(torch.device("cpu"), "fp16")
    assert one_line(e).startswith("precision fp16 needs a CUDA device")
    with pytest.raises(MoscError, match="precision fp16 needs a CUDA device"):
        train(tmp_path / "r", data=data, cfg=cfg(precision="fp16"), progress=False)
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(HAS_CUDA, reason="this machine has a GPU")
def test_train_on_missing_gpu_is_refused_before_anything_is_made(tmp_path, monkeypatch):
    import mosc.nn.corpus as C

    monkeypatch.setattr(C, "synthetic_splits", lambda *a: pytest.fail("read the corpus before checking the device"))
    with pytest.raises(MoscError, match="no CUDA device here"):
        train(tmp_path / "r", cfg=cfg(device="cuda"), progress=False)
    assert not (tmp_path / "r").exists()


def test_fp32_on_cpu_adds_nothing():
    """The fp32 CPU path is the code path of before: no autocast, no scaler, the same batch
    tensors, only the CPU generator in a checkpoint."""
    from mosc.nn.batching import collate

    amp = Amp(torch.device("cpu"), Precision.fp32)
    assert amp.dtype is None and amp.scaler is None and amp.state_dict() is None
    b = collate([[5, 6, 7]], [[8, 9]], [0])
    assert to_device(b, torch.device("cpu")) is b
    assert set(rng_states(torch.device("cpu"))) == {CPU_RNG}


def test_bf16_autocast_training_is_close_to_fp32(tmp_path, data):
    """bf16 on the CPU really runs in bf16 (other weights) and trains like fp32 (close losses)."""
    kw = dict(steps=12, lr=3e-3, warmup=3, save_every=12, log_every=4)
    fp32 = train(tmp_path / "fp32", data=data, cfg=cfg(**kw), mode="layer", progress=False)
    bf16 = train(tmp_path / "bf16", data=data, cfg=cfg(precision="bf16", **kw), mode="layer", progress=False)
    assert bf16.precision == "bf16" and bf16.device == "cpu"
    losses = [(a["loss"], b["loss"]) for a, b in zip(fp32.history, bf16.history)]
    assert len(losses) == 3 and all(abs(a - b) < 0.05 for a, b in losses), losses
    assert losses[-1][1] < losses[0][1] - 0.5  # and it learns
    a, b = weights(fp32.run), weights(bf16.run)
    assert not all(torch.equal(a[k], b[k]) for k in a)  # autocast changed the arithmetic
    _, _, meta = load_trained(bf16.run)
    assert meta["train"]["config"]["precision"] == "bf16"
    assert meta["train"]["ran_on"] == {"device": "cpu", "precision": "bf16", "world_size": 1}


# ---------------------------------------------------------------- checkpoints that travel


def test_checkpoint_tensors_are_cpu_tensors(tmp_path, data):
    r = train(tmp_path / "r", data=data, cfg=cfg(steps=3, save_every=3), progress=False)
    for f in ("model.safetensors", "optim.safetensors"):
        tensors = load_tensors(r.checkpoint / f)
        assert tensors and {t.device.type for t in tensors.values()} == {"cpu"}
    optim = load_tensors(r.checkpoint / "optim.safetensors")
    assert CPU_RNG in optim and CUDA_RNG not in optim  # a CPU run has no CUDA generator to keep


def _add_cuda_rng(ckpt: Path) -> None:
    """Make a CPU checkpoint look like a GPU run's: a CUDA generator state next to the CPU one."""
    tensors = load_tensors(ckpt / "optim.safetensors")
    tensors[CUDA_RNG] = torch.randint(0, 255, (16,), dtype=torch.uint8)
    meta = json.loads((ckpt / "config.json").read_text())
    meta["train"]["optim_sha256"] = save_tensors(tensors, ckpt / "optim.safetensors")
    meta["train"]["config"]["device"] = "cuda"
    (ckpt / "config.json").write_text(json.dumps(meta))


def test_gpu_checkpoint_resumes_on_a_cpu_only_machine(tmp_path, data):
    """A checkpoint with a CUDA RNG state (and device cuda in its settings) resumes here: the
    CUDA state is ignored, the device is the caller's, and the run ends exactly where an
    uninterrupted CPU run ends (the CUDA state changed nothing on the CPU)."""
    full = train(tmp_path / "full", data=data, cfg=cfg(), progress=False)
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(full.run / "step_0000003", part / "step_0000003")
    (part / "latest").write_text("step_0000003\n")
    _add_cuda_rng(part / "step_0000003")
    resumed = train(part, data=data, cfg=cfg(), resume=True, progress=False)
    assert resumed.start_step == 3 and resumed.device == "cpu"
    a, b = weights(full.run), weights(part)
    assert all(torch.equal(a[k], b[k]) for k in a)
    _, _, meta = load_trained(part)
    assert meta["train"]["config"]["device"] == "cpu"


def test_older_checkpoint_without_device_settings_resumes(tmp_path, data):
    """Checkpoints written before runs had a device lack both keys: their defaults apply. One
    key alone is an edit, refused like any other unknown set of keys."""
    run = tmp_path / "r"
    train(run, data=data, cfg=cfg(steps=3, save_every=3), progress=False)
    ck = run / "step_0000003"
    meta = json.loads((ck / "config.json").read_text())
    old = {k: v for k, v in meta["train"]["config"].items() if k not in ("device", "precision")}
    (ck / "config.json").write_text(json.dumps({**meta, "train": {**meta["train"], "config": old}}))
    assert train(run, data=data, cfg=cfg(steps=4), resume=True, progress=False).steps == 4
    ck = run / "step_0000004"
    meta = json.loads((ck / "config.json").read_text())
    half = {k: v for k, v in meta["train"]["config"].items() if k != "precision"}
    (ck / "config.json").write_text(json.dumps({**meta, "train": {**meta["train"], "config": half}}))
    with pytest.raises(MoscError, match="must have exactly the keys"):
        train(run, data=data, cfg=cfg(steps=5), resume=True, progress=False)


def test_resume_takes_precision_from_the_caller(tmp_path, data):
    run = tmp_path / "r"
    train(run, data=data, cfg=cfg(steps=3, save_every=3), progress=False)
    r = train(run, data=data, cfg=cfg(steps=5, precision="bf16"), resume=True, progress=False)
    assert r.precision == "bf16"
    _, _, meta = load_trained(run)
    assert meta["train"]["config"]["precision"] == "bf16" and meta["train"]["ran_on"]["precision"] == "bf16"


# ---------------------------------------------------------------- evaluation and fitness on a device


def test_evaluate_and_fitness_take_a_device(tmp_path, data):
    from mosc.jobs.model import supernet_fitness as job_fitness
    from mosc.nn.evaluate import evaluate, supernet_fitness

    r = train(tmp_path / "r", data=data, cfg=cfg(steps=3, save_every=3), progress=False)
    model, _, _ = load_trained(r.run)
    arch = model.space.smallest()
    e = evaluate(model, data, arch, max_sentences=8, device="cpu")
    assert e.bleu is not None and next(model.parameters()).device.type == "cpu"
    assert e.loss == pytest.approx(supernet_fitness(model, data, 8, device="cpu")(arch), abs=1e-6)
    _, score = job_fitness(r.run, 8, device="cpu")
    assert score(arch) == pytest.approx(e.loss, abs=1e-6)
    if not HAS_CUDA:
        for call in (lambda: evaluate(model, data, arch, device="cuda"),
                     lambda: supernet_fitness(model, data, 8, device="cuda"),
                     lambda: job_fitness(r.run, 8, device="cuda:0")):
            with pytest.raises(MoscError, match="no CUDA device here"):
                call()


# ---------------------------------------------------------------- CUDA (run only where there is a GPU)


@cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_training_checkpoint_loads_on_cpu(tmp_path, data, precision):
    r = train(tmp_path / "r", data=data, cfg=cfg(steps=4, save_every=4, device="cuda", precision=precision),
              progress=False)
    assert r.device.startswith("cuda:0") and all(h["loss"] == h["loss"] for h in r.history)
    optim = load_tensors(r.checkpoint / "optim.safetensors")
    assert CUDA_RNG in optim and {t.device.type for t in optim.values()} == {"cpu"}
    model, _, meta = load_trained(r.run)  # on the CPU
    assert next(model.parameters()).device.type == "cpu"
    assert ("grad_scaler" in meta["train"]) == (precision == "fp16")
    if precision == "fp16":
        assert "skipped" in r.history[-1] and "loss_scale" in r.history[-1]
    resumed = train(r.run, data=data, cfg=cfg(steps=5, device="cpu", precision="fp32"), resume=True, progress=False)
    assert resumed.steps == 5 and resumed.device == "cpu"


@cuda
def test_cuda_fp32_resume_matches_closely(tmp_path, data):
    """On a GPU resume restores the CUDA generator too; the embedding's backward adds with
    atomics, so the runs agree closely rather than bit for bit."""
    full = train(tmp_path / "full", data=data, cfg=cfg(device="cuda"), progress=False)
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(full.run / "step_0000003", part / "step_0000003")
    (part / "latest").write_text("step_0000003\n")
    train(part, data=data, cfg=cfg(device="cuda"), resume=True, progress=False)
    a, b = weights(full.run), weights(part)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


@cuda
def test_cuda_collapse_and_evaluation_agree(tmp_path, data):
    from mosc.jobs.model import COLLAPSE_ATOL
    from mosc.nn.evaluate import evaluate
    from mosc.nn.subnet import collapse

    r = train(tmp_path / "r", data=data, cfg=cfg(steps=3, save_every=3), progress=False)
    model, _, _ = load_trained(r.run)
    arch = model.space.largest()
    dev = torch.device("cuda")
    model.to(dev)
    sub = collapse(model, arch).to(dev)
    src = torch.randint(4, model.cfg.vocab_size, (4, 20), device=dev)
    tgt = torch.randint(4, model.cfg.vocab_size, (4, 15), device=dev)
    with torch.no_grad():
        assert (model(src, tgt, arch) - sub(src, tgt)).abs().max().item() <= COLLAPSE_ATOL
    on_gpu = evaluate(sub, data, max_sentences=16, device="cuda")
    on_cpu = evaluate(sub, data, max_sentences=16, device="cpu")
    assert on_gpu.loss == pytest.approx(on_cpu.loss, abs=1e-4)
    assert next(sub.parameters()).device == dev  # left where it was


# ---------------------------------------------------------------- scripts/gpu_check.sh --dry-run


GPU_CHECK_KEYS = {"train_tokens_per_s", "cpu_train_tokens_per_s", "collapse_max_abs_diff", "tvm_over_torch_cuda",
                  "gpu_name"}


def test_gpu_check_dry_run_writes_its_json(tmp_path):
    """The whole Python step on the CPU with tiny sizes (~20 s): train fp32 and bf16, the CPU
    comparison, collapse, export, compile for nvidia; CUDA-only parts say so."""
    out = tmp_path / "gpu_check.json"
    results = REPO / "benchmarks" / "results" / "gpu_check.json"
    before = results.read_bytes() if results.exists() else None
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "would run:" in r.stdout and "torch==2.13.0" in r.stdout  # the set-up a GPU machine gets, not done
    d = json.loads(out.read_text())
    assert GPU_CHECK_KEYS <= set(d) and d["dry_run"] is True and d["errors"] == {}
    assert set(d["train_tokens_per_s"]["cpu"]) == {"fp32", "bf16"}
    assert all(v > 0 for v in d["train_tokens_per_s"]["cpu"].values()) and d["cpu_train_tokens_per_s"] > 0
    assert d["collapse_max_abs_diff"] <= 1e-5
    assert d["gpu_name"] == d["tvm_over_torch_cuda"] == "skipped (no GPU)"
    assert d["checkpoint"]["tensor_devices"] == {"model.safetensors": ["cpu"], "optim.safetensors": ["cpu"]}
    assert d["compile"]["cuda_kernels"] == KERNELS and '"arch":"sm_90a"' in d["compile"]["tvm_target"]
    assert (results.read_bytes() if results.exists() else None) == before  # the real results stay as they were


def test_gpu_check_dry_run_never_writes_results():
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run", "--out",
                        str(REPO / "benchmarks" / "results" / "gpu_check.json")], capture_output=True, text=True)
    assert r.returncode == 2 and "not results" in r.stderr


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has an Nvidia driver")
def test_gpu_check_without_gpu_says_use_dry_run():
    r = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "use --dry-run" in r.stderr


# ---------------------------------------------------------------- the Jetson Orin target


CROSS_GCC = "aarch64-linux-gnu-gcc"


def test_jetson_orin_target_loads():
    from mosc.compiler.targets import load_target

    t = load_target("jetson-orin")
    assert load_target("orin").name == "jetson-orin"
    assert t.cross_compiler == CROSS_GCC and t.is_cross and t.rpc.key == "jetson-orin" and t.needs_rpc
    assert t.device_type() == "cuda"
    spec = t.tvm_target().export()
    assert spec["kind"] == "cuda" and spec["arch"] == "sm_87"
    host = spec["host"]
    assert host["mtriple"] == "aarch64-linux-gnu" and host["mcpu"] == "cortex-a78ae"  # not the tag's own host


@pytest.fixture(scope="module")
def orin_artifact(tmp_path_factory):
    if not shutil.which(CROSS_GCC):
        pytest.skip(f"{CROSS_GCC} not installed (apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu)")
    from mosc.compiler.build import compile_artifact

    d = tmp_path_factory.mktemp("orin")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
    torch.onnx.export(model, (torch.randn(2, 16),), d / "mlp.onnx", input_names=["x"], output_names=["y"])
    return compile_artifact({"mlp": d / "mlp.onnx"}, "jetson-orin", d / "art", tune=False, db_dir=d / "db")


def test_jetson_orin_cross_compiles(orin_artifact):
    """aarch64 host code (the VM's driver loop) with the kernels inside: an sm_87 cubin where
    nvcc is installed, else their CUDA source (the Jetson's TVM runtime compiles it at load).
    No GPU and no driver are needed to build."""
    from mosc.compiler.artifact import verify_artifact

    m = verify_artifact(orin_artifact)
    assert m["target"] == "jetson-orin" and m["device"] == "cuda" and m["cuda_kernels"] == KERNELS
    assert m["cuda_arch"] == ("sm_87" if HAS_NVCC else None)
    lib = (orin_artifact / "model.so").read_bytes()
    assert lib[:4] == b"\x7fELF" and int.from_bytes(lib[18:20], "little") == 183  # EM_AARCH64
    assert (b"__global__" in lib) == (not HAS_NVCC)


@pytest.mark.skipif(not shutil.which("nvcc"), reason="nvcc not installed")
def test_jetson_orin_kernels_compile_for_sm87(tmp_path):
    """The CUDA that TVM writes for the Orin compiles for sm_87 with nvcc (ahead of time, no GPU)."""
    from mosc.compiler.build import build
    from mosc.compiler.passes import import_onnx
    from mosc.compiler.targets import load_target

    torch.manual_seed(0)
    torch.onnx.export(torch.nn.Linear(16, 8).eval(), (torch.randn(2, 16),), tmp_path / "l.onnx",
                      input_names=["x"], output_names=["y"])
    ex = build(import_onnx(tmp_path / "l.onnx"), load_target("jetson-orin"), tmp_path / "db")
    mods, stack = [], [ex.mod]
    while stack:
        m = stack.pop()
        mods += [m] if m.kind == "cuda" else []
        stack.extend(m.imports)
    assert len(mods) == 1
    (tmp_path / "k.cu").write_text(mods[0].inspect_source(""))
    r = subprocess.run(["nvcc", "-cubin", "-arch=sm_87", "-o", str(tmp_path / "k.cubin"), str(tmp_path / "k.cu")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "k.cubin").read_bytes()[:4] == b"\x7fELF"


# ---------------------------------------------------------------- GPU kernels compiled ahead of time


EM_CUDA = 190  # e_machine of a cubin (an ELF file)


def _mlp_onnx(d: Path) -> Path:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
    torch.onnx.export(model, (torch.randn(2, 16),), d / "mlp.onnx", input_names=["x"], output_names=["y"])
    return d / "mlp.onnx"


@pytest.fixture(scope="module")
def nvidia_artifact(tmp_path_factory):
    from mosc.compiler.build import compile_artifact

    d = tmp_path_factory.mktemp("nvidia")
    return compile_artifact({"mlp": _mlp_onnx(d)}, "nvidia", d / "art", tune=False, db_dir=d / "db")


def _cuda_payload(library: Path) -> bytes:
    """What the GPU host's "ffi.Module.load_from_bytes.cuda" would be given when the library is
    loaded: captured here by a stand-in loader (this machine has no CUDA runtime to register one)."""
    import tvm
    import tvm_ffi

    name = "ffi.Module.load_from_bytes.cuda"
    if tvm_ffi.get_global_func(name, allow_missing=True) is not None:
        pytest.skip("a CUDA runtime is loaded here: its loader would take the library")
    got = []

    def loader(data):
        got.append(bytes(data))
        return tvm_ffi.get_global_func("runtime.SourceModuleCreate")("", "cuda")

    tvm_ffi.register_global_func(name, loader)
    try:
        tvm.runtime.load_module(str(library))
    finally:
        tvm_ffi.remove_global_func(name)
    assert len(got) == 1
    return got[0]


def _fields(payload: bytes) -> tuple[bytes, bytes]:
    """A "cuda" payload's fmt and code (<fmt: str> <function table> <code: str>): the code is the
    last str, found from its length, the first u64 after fmt that spans the payload's tail exactly
    (the function table's small counts and names never do)."""
    import struct

    (n,) = struct.unpack_from("<Q", payload)
    fmt = payload[8:8 + n]
    for start in range(8 + n, len(payload) - 8):
        (k,) = struct.unpack_from("<Q", payload, start)
        if start + 8 + k == len(payload):
            return fmt, payload[start + 8:]
    return fmt, b""


@pytest.mark.skipif(not HAS_NVCC, reason="nvcc not installed (the CUDA toolkit): kernels stay CUDA source")
def test_nvidia_artifact_carries_a_cubin_for_sm90a(nvidia_artifact):
    """Built on this CPU machine: the library holds an sm_90 cubin, not CUDA source, and its
    loader on the GPU host gets fmt "cubin" (cuModuleLoadData, no compiler there)."""
    import struct

    from mosc.compiler.artifact import verify_artifact

    m = verify_artifact(nvidia_artifact)
    assert (m["device"], m["cuda_kernels"], m["cuda_arch"], m["cuda_note"]) == ("cuda", "binary", "sm_90a", None)
    assert b"__global__" not in (nvidia_artifact / "model.so").read_bytes()
    fmt, cubin = _fields(_cuda_payload(nvidia_artifact / "model.so"))
    assert fmt == b"cubin" and cubin[:4] == b"\x7fELF"
    assert struct.unpack_from("<H", cubin, 18)[0] == EM_CUDA
    if cubin[8] == 8:  # CUDA ELF ABI v8 (CUDA 12.8+): the SM in e_flags bits 8-15
        assert (struct.unpack_from("<I", cubin, 48)[0] >> 8) & 0xFF == 90


def test_without_nvcc_kernels_stay_source_with_a_note(tmp_path, monkeypatch):
    """No nvcc: the build still succeeds, the library keeps the CUDA source (compiled by the GPU
    host's TVM at load) and the manifest says so and why; no arch is claimed, none is checked."""
    import mosc.compiler.cuda as C
    from mosc.compiler.artifact import verify_artifact
    from mosc.compiler.build import compile_artifact

    monkeypatch.setattr(C, "NVCC", "nvcc-not-installed-here")
    out = compile_artifact({"mlp": _mlp_onnx(tmp_path)}, "nvidia", tmp_path / "art", tune=False, db_dir=tmp_path / "db")
    m = verify_artifact(out)
    assert (m["cuda_kernels"], m["cuda_arch"]) == ("source", None)
    assert "nvcc was not on PATH" in m["cuda_note"] and "install the CUDA toolkit" in m["cuda_note"]
    assert b"__global__" in (out / "model.so").read_bytes()
    fmt, code = _fields(_cuda_payload(out / "model.so"))
    assert fmt == b"cuda" and b"__global__" in code


def test_cpu_artifact_has_no_cuda_fields(tmp_path):
    from mosc.compiler.build import compile_artifact

    m = json.loads((compile_artifact({"mlp": _mlp_onnx(tmp_path)}, "host", tmp_path / "art", tune=False,
                                     db_dir=tmp_path / "db") / "manifest.json").read_text())
    assert (m["cuda_kernels"], m["cuda_arch"], m["cuda_note"]) == (None, None, None)


@pytest.mark.parametrize("arch, compute", [("sm_90a", "9.0"), ("sm_90", "9.0"), ("sm_87", "8.7"), ("sm_86", "8.9"),
                                           ("sm_100f", "10.3"), ("sm_120", "12.0")])
def test_gpu_arch_check_accepts_a_gpu_that_runs_the_cubin(arch, compute):
    from mosc.compiler.cuda import check_gpu_arch

    check_gpu_arch(arch, compute, "artifact a")


@pytest.mark.parametrize("arch, compute, says", [
    ("sm_90a", "8.6", "artifact a holds CUDA kernels for sm_90a, this GPU is sm_86 (compute capability 8.6): "
                      "compile it for this GPU's target"),
    ("sm_90a", "10.0", "this GPU is sm_100"),  # arch-specific: that GPU only
    ("sm_90", "12.0", "this GPU is sm_120"),  # another major: no binary compatibility
    ("sm_89", "8.6", "this GPU is sm_86"),  # an older minor cannot run a newer one's cubin
    ("sm_87", None, "artifact a holds CUDA kernels compiled for sm_87, but no CUDA GPU is visible here"),
    ("sm90", "9.0", "artifact a: its manifest's cuda_arch 'sm90' is not an SM architecture"),
    (None, "9.0", "cuda_arch None is not an SM architecture"),
    ("sm_90a", "nine", "the GPU reports compute capability 'nine'"),
])
def test_gpu_arch_check_refuses_in_one_line(arch, compute, says):
    from mosc.compiler.cuda import check_gpu_arch

    with pytest.raises(MoscError) as e:
        check_gpu_arch(arch, compute, "artifact a")
    assert says in one_line(e)


def test_loading_a_cubin_on_the_wrong_gpu_is_refused_before_loading(nvidia_artifact, monkeypatch):
    """load_artifact asks the GPU for its compute capability and refuses a mismatch in one line,
    before the library is copied or loaded (here: a pretended sm_86 GPU, then no GPU at all)."""
    import mosc.compiler.artifact as A
    import mosc.compiler.cuda as C

    if A.read_manifest(nvidia_artifact)["cuda_kernels"] != "binary":
        pytest.skip("nvcc not installed: the artifact holds CUDA source, which has no arch to check")
    monkeypatch.setattr(A, "_load_local", lambda *a: pytest.fail("loaded the library before checking the GPU"))
    monkeypatch.setattr(C, "compute_version", lambda dev: "8.6")
    with pytest.raises(MoscError) as e:
        A.load_artifact(nvidia_artifact, "cuda")
    assert one_line(e) == (f"artifact {nvidia_artifact} holds CUDA kernels for sm_90a, this GPU is sm_86 "
                           "(compute capability 8.6): compile it for this GPU's target")
    monkeypatch.setattr(C, "compute_version", lambda dev: None)
    with pytest.raises(MoscError, match="no CUDA GPU is visible here"):
        A.load_artifact(nvidia_artifact, "cuda")


def test_compute_version_without_a_cuda_runtime_is_none():
    import tvm

    from mosc.compiler.cuda import compute_version

    if tvm.cuda(0).exist:
        assert compute_version(tvm.cuda(0)) == tvm.cuda(0).compute_version
    else:
        assert compute_version(tvm.cuda(0)) is None  # tvm.cuda(0).compute_version itself raises here


def test_swap_kernels_replaces_the_source_and_refuses_what_it_does_not_know():
    """The blob surgery on bytes: only a "cuda" payload of fmt "cuda" ending in the compiled
    source is changed; anything else is a one-line MoscError, never a guess."""
    import struct

    from mosc.compiler.cuda import swap_kernels

    def s(b):
        return struct.pack("<Q", len(b)) + b

    def vec(v):
        return struct.pack("<Q", len(v)) + b"".join(struct.pack("<Q", x) for x in v)

    def blob(*mods):
        body = vec([0, 1, 2, 2]) + vec([1, 2]) + b"".join(mods)
        return struct.pack("<Q", len(body)) + body

    src, table = "__global__ void k() {}", b"\x01\x02table"
    vm = s(b"relax.VMExecutable") + s(b"vm bytes")
    before = blob(vm, s(b"_lib"), s(b"cuda") + s(s(b"cuda") + table + s(src.encode())))
    after = swap_kernels(before, [(src, b"\x7fELFcubin")])
    assert after == blob(vm, s(b"_lib"), s(b"cuda") + s(s(b"cubin") + table + s(b"\x7fELFcubin")))
    for bad, says in [(swap_kernels(before, [(src, b"x")]), "not CUDA source"),
                      (before.replace(b"__global__", b"__device__"), "not the one compiled"),
                      (before[:-3], "module blob says"),
                      (before + b"junk", "module blob says")]:
        with pytest.raises(MoscError) as e:
            swap_kernels(bad, [(src, b"\x7fELFcubin")])
        assert says in one_line(e)


@pytest.mark.skipif(not HAS_NVCC, reason="nvcc not installed")
def test_nvcc_failure_is_one_line():
    import tvm

    from mosc.compiler.cuda import nvcc_cubin

    target = tvm.target.Target("nvidia/nvidia-h100", host={"kind": "llvm"})
    with pytest.raises(MoscError) as e:
        nvcc_cubin("__global__ void k( {", target, "nvidia")
    assert one_line(e).startswith("target nvidia: nvcc could not compile the CUDA kernels for sm_90a: ")

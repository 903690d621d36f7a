"""mosc.compiler (passes, tune, build, artifact) with real TVM builds of tiny ONNX graphs (made here with torch.onnx.export).

Two graphs shaped like the real ones: an encoder (embedding + one transformer-ish block)
and a decoder step with several inputs and outputs (token, K/V caches, memory -> logits,
new caches). Numerics are checked against onnxruntime on the same ONNX files.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mosc.compiler.artifact import load_artifact, verify_artifact
from mosc.compiler.build import compile_artifact
from mosc.compiler.passes import FINISH, PREPARE, import_onnx, signature
from mosc.compiler.tune import database_id, tune
from mosc.errors import MoscError

from damage import drop, edited, put

V, D, S, L = 64, 32, 8, 8  # vocab, width, source length, KV cache length
ATOL = 1e-4
REPO = Path(__file__).resolve().parent.parent
ARM64_ROOT = Path(os.environ.get("MOSC_ARM64_ROOT") or Path.home() / ".cache/mosc/arm64-root")
CROSS_GCC = "aarch64-linux-gnu-gcc"


# ----------------------------------------------------------------------------- tiny models
def _export_models(out: Path) -> dict[str, Path]:
    import torch
    from torch import nn

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(V, D)
            self.pos = nn.Parameter(torch.randn(S, D) * 0.1)
            self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
            self.qkv, self.o = nn.Linear(D, 3 * D), nn.Linear(D, D)
            self.fc1, self.fc2 = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

        def forward(self, src):
            x = self.emb(src) + self.pos
            q, k, v = self.qkv(self.ln1(x)).chunk(3, -1)
            x = x + self.o(torch.softmax(q @ k.transpose(-1, -2) / D**0.5, -1) @ v)
            return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))

    class DecoderStep(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.qkv, self.out = nn.Embedding(V, D), nn.Linear(D, 3 * D), nn.Linear(D, V)

        def forward(self, token, k_cache, v_cache, memory):
            q, k, v = self.qkv(self.emb(token)).chunk(3, -1)
            k_cache = torch.cat([k_cache[:, 1:], k], 1)  # fixed-size cache: shift in the new step
            v_cache = torch.cat([v_cache[:, 1:], v], 1)
            a = torch.softmax(q @ k_cache.transpose(-1, -2) / D**0.5, -1) @ v_cache
            c = torch.softmax(a @ memory.transpose(-1, -2), -1) @ memory
            return self.out(a + c)[:, 0], k_cache, v_cache

    torch.manual_seed(0)
    paths = {"enc": out / "encoder.onnx", "step": out / "decoder_step.onnx"}
    torch.onnx.export(Encoder().eval(), (torch.randint(0, V, (1, S)),), paths["enc"],
                      input_names=["src"], output_names=["memory"])
    example = (torch.randint(0, V, (1, 1)), torch.randn(1, L, D), torch.randn(1, L, D), torch.randn(1, S, D))
    torch.onnx.export(DecoderStep().eval(), example, paths["step"],
                      input_names=["token", "k_cache", "v_cache", "memory"],
                      output_names=["logits", "k_out", "v_out"])
    return paths


def _export_linear(path: Path, seed: int = 0) -> Path:
    """A one-matmul graph: few tuning tasks, for the tuning test. The seed picks the weights."""
    import torch

    torch.manual_seed(seed)
    torch.onnx.export(torch.nn.Linear(D, D).eval(), (torch.randn(4, D),), path,
                      input_names=["x"], output_names=["y"])
    return path


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    return _export_models(tmp_path_factory.mktemp("onnx"))


@pytest.fixture(scope="module")
def host_artifact(onnx_files, tmp_path_factory):
    db = tmp_path_factory.mktemp("db")  # empty: a --no-tune build must not touch ~/.cache
    out = tmp_path_factory.mktemp("art") / "host"
    return compile_artifact(onnx_files, "host", out, tune=False, db_dir=db,
                            extra_manifest={"arch": {"d_model": D}})


def _inputs(signature: list[dict], seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        s["name"]: (rng.integers(0, V, s["shape"]) if s["dtype"] == "int64" else rng.standard_normal(s["shape"])
                    ).astype(s["dtype"])
        for s in signature
    }


def _ort(path, feeds):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


# ----------------------------------------------------------------------------- tests
def test_compile_does_not_import_torch_or_tvm():
    code = ("import sys, mosc.compiler.artifact, mosc.compiler.build, mosc.compiler.passes, mosc.compiler.tune, "
            "mosc.compiler.targets; assert 'torch' not in sys.modules and 'tvm' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_pipeline_is_a_named_pass_list():
    names = [n for n, _ in PREPARE + FINISH]
    assert len(names) == len(set(names))
    assert names[-1] == "fold_constant_after_tuning" and "apply_database" in names


def test_import_onnx_static_shapes(onnx_files):
    mod = import_onnx(onnx_files["step"])
    sig = signature(mod, onnx_files["step"])
    assert [s["name"] for s in sig["inputs"]] == ["token", "k_cache", "v_cache", "memory"]
    assert sig["outputs"] == [
        {"name": "logits", "shape": [1, V], "dtype": "float32"},
        {"name": "k_out", "shape": [1, L, D], "dtype": "float32"},
        {"name": "v_out", "shape": [1, L, D], "dtype": "float32"},
    ]
    with pytest.raises(MoscError, match="unknown input"):
        import_onnx(onnx_files["enc"], {"nope": [1, 2]})


def test_host_artifact_matches_onnxruntime(host_artifact, onnx_files):
    art = load_artifact(host_artifact)
    assert sorted(art.graphs) == ["enc", "step"]  # not the translation contract's names: no loop added
    for graph, path in onnx_files.items():
        feeds = _inputs(art.manifest["graphs"][graph]["inputs"])
        ref, got = _ort(path, feeds), art.run(graph, feeds)
        assert len(ref) == len(got)
        for r, g in zip(ref, got):
            np.testing.assert_allclose(g, r, atol=ATOL, rtol=1e-4)
    # positional inputs work too, and a wrong shape is a clear error
    feeds = _inputs(art.manifest["graphs"]["enc"]["inputs"])
    np.testing.assert_array_equal(art.run("enc", list(feeds.values()))[0], art.run("enc", feeds)[0])
    with pytest.raises(MoscError, match="must be int64"):
        art.run("enc", [np.zeros((1, S + 1), np.int64)])


def test_manifest(host_artifact):
    import tvm
    import tvm_ffi

    m = json.loads((host_artifact / "manifest.json").read_text())
    assert m["target"] == "host" and m["device"] == "cpu"
    assert m["tvm_version"] == tvm.__version__ and m["tvm_ffi_version"] == tvm_ffi.__version__
    assert m["arch"] == {"d_model": D}  # extra_manifest
    assert set(m["files"]) == {"model.so"} and m["format"] == "mosc-artifact/2"
    assert {g["file"] for g in m["graphs"].values()} == {"model.so"}
    assert {n: g["function"] for n, g in m["graphs"].items()} == {"enc": "enc", "step": "step"}
    assert m["graphs"]["enc"]["inputs"] == [{"name": "src", "shape": [1, S], "dtype": "int64"}]
    assert m["tuning"]["tuned"] is False and "database" in m["tuning"]
    assert not list(host_artifact.glob(".*"))  # no temp files left behind


def test_tampered_artifact_is_refused(host_artifact, tmp_path):
    bad = shutil.copytree(host_artifact, tmp_path / "bad")
    with open(bad / "model.so", "r+b") as f:  # flip one byte in the middle
        f.seek(os.path.getsize(bad / "model.so") // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(MoscError, match="model.so does not match its sha256"):
        load_artifact(bad)
    (bad / "model.so").unlink()
    with pytest.raises(MoscError, match="missing"):
        load_artifact(bad)
    with pytest.raises(MoscError, match="not a mosc artifact"):
        load_artifact(tmp_path)


def test_recompiled_artifact_loads_the_new_model(tmp_path):
    """Compile, load, recompile the same folder with other weights, load again in the same process:
    the second load runs the second model (dlopen would hand back the first by its path)."""
    x = np.random.default_rng(0).standard_normal((4, D)).astype("float32")
    out = tmp_path / "art"
    first_onnx, second_onnx = _export_linear(tmp_path / "a.onnx", seed=0), _export_linear(tmp_path / "b.onnx", seed=1)
    compile_artifact({"linear": first_onnx}, "host", out, tune=False, db_dir=tmp_path / "db")
    first = load_artifact(out)  # kept alive: its library stays loaded
    np.testing.assert_allclose(first.run("linear", [x])[0], _ort(first_onnx, {"x": x})[0], atol=ATOL)
    compile_artifact({"linear": second_onnx}, "host", out, tune=False, db_dir=tmp_path / "db")
    second = load_artifact(out)
    np.testing.assert_allclose(second.run("linear", [x])[0], _ort(second_onnx, {"x": x})[0], atol=ATOL)
    np.testing.assert_allclose(first.run("linear", [x])[0], _ort(first_onnx, {"x": x})[0], atol=ATOL)


def test_extra_manifest_cannot_override(onnx_files, tmp_path):
    with pytest.raises(MoscError, match="may not override"):
        compile_artifact({"enc": onnx_files["enc"]}, "host", tmp_path / "a", tune=False,
                         db_dir=tmp_path / "db", extra_manifest={"files": {}})


def test_unknown_target(onnx_files, tmp_path):
    with pytest.raises(MoscError, match=r"unknown target 'pi5'; valid targets: .*rpi4"):
        compile_artifact(onnx_files, "pi5", tmp_path / "a", tune=False)


@pytest.fixture(scope="module")
def rpi4_artifact(onnx_files, tmp_path_factory):
    if not shutil.which(CROSS_GCC):
        pytest.skip(f"{CROSS_GCC} not installed (apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu)")
    out = tmp_path_factory.mktemp("art") / "rpi4"
    return compile_artifact(onnx_files, "rpi4", out, tune=False, db_dir=tmp_path_factory.mktemp("db"))


def test_rpi4_cross_build(rpi4_artifact):
    m = verify_artifact(rpi4_artifact)
    assert m["target"] == "rpi4" and "aarch64" in m["tvm_target"]
    for lib in m["files"]:
        head = (rpi4_artifact / lib).read_bytes()[:20]
        assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183  # EM_AARCH64


_QEMU_RUN = """
import sys, numpy as np
sys.path.insert(0, sys.argv[1])
from mosc.compiler.artifact import load_artifact
art = load_artifact(sys.argv[2])
feeds = dict(np.load(sys.argv[3]))
np.savez(sys.argv[4], *art.run(sys.argv[5], feeds))
"""


@pytest.mark.skipif(not (ARM64_ROOT / "opt/mosc-site/.mosc-wheels-done").exists() or not shutil.which("qemu-aarch64"),
                    reason=f"no arm64 root at {ARM64_ROOT} (run scripts/setup_arm64_root.sh)")
def test_rpi4_artifact_runs_under_qemu(rpi4_artifact, onnx_files, tmp_path):
    out = rpi4_artifact
    (tmp_path / "run.py").write_text(_QEMU_RUN)
    env = {**os.environ, "PYTHONPATH": str(ARM64_ROOT / "opt/mosc-site"), "TVM_USE_RUNTIME_LIB": "1"}
    manifest = verify_artifact(out)
    for graph in ["enc", "step"]:
        feeds = _inputs(manifest["graphs"][graph]["inputs"], seed=1)
        np.savez(tmp_path / "in.npz", **feeds)
        subprocess.run(
            ["qemu-aarch64", "-L", str(ARM64_ROOT), str(ARM64_ROOT / "usr/bin/python3"), str(tmp_path / "run.py"),
             str(REPO), str(out), str(tmp_path / "in.npz"), str(tmp_path / "out.npz"), graph],
            check=True, env=env, timeout=300, capture_output=True,
        )
        got = np.load(tmp_path / "out.npz")
        ref = _ort(onnx_files[graph], feeds)
        for i, r in enumerate(ref):
            np.testing.assert_allclose(got[f"arr_{i}"], r, atol=ATOL, rtol=1e-4)


def test_nvidia_build_without_gpu(onnx_files, tmp_path):
    """CUDA code is generated (dlight schedules) and exported, as an sm_90a cubin where nvcc is
    installed (else CUDA source); it runs only where a GPU is."""
    out = compile_artifact({"enc": onnx_files["enc"]}, "nvidia", tmp_path / "nv", tune=False,
                           db_dir=tmp_path / "db")
    m = verify_artifact(out)
    assert m["device"] == "cuda" and m["cuda_kernels"] == ("binary" if shutil.which("nvcc") else "source")


def test_tuning_database_is_reused(tmp_path):
    """A tiny tuning run fills the database; a second compile of the same shapes tunes nothing.

    ~20-25 s on 2 busy cores (one task, 8 trials), so not marked slow."""
    onnx_path = _export_linear(tmp_path / "linear.onnx")
    db = tmp_path / "db"
    t0 = time.perf_counter()
    first = tune(import_onnx(onnx_path), "host", db, trials=8, progress=False)
    t_first = time.perf_counter() - t0
    assert first.tasks >= 1 and first.trials >= 1 and first.cached == 0
    assert database_id(db)["records"] >= 1

    out = compile_artifact({"linear": onnx_path}, "host", tmp_path / "art", trials=8, db_dir=db)
    report = json.loads((out / "manifest.json").read_text())["tuning"]["report"]
    assert report["trials"] == 0 and report["cached"] == report["tasks"] == first.tasks
    x = np.random.default_rng(0).standard_normal((4, D)).astype("float32")
    np.testing.assert_allclose(load_artifact(out).run("linear", [x])[0], _ort(onnx_path, {"x": x})[0], atol=ATOL)
    print(f"\ntuning {first.trials} trials over {first.tasks} task(s): {t_first:.1f} s; "
          f"warm compile {json.loads((out / 'manifest.json').read_text())['compile_seconds']} s")


def test_tuning_a_remote_target_needs_a_real_tracker_with_the_key(tmp_path):
    """A port that accepts TCP but is no tracker, and a tracker without the key: one line each,
    before any trial (MetaSchedule would fail every trial, or wait forever)."""
    import socket
    import threading

    from rpc_helpers import start_tracker

    from mosc.compiler.tune import check_tracker
    from mosc.compiler.targets import Rpc, load_target

    rpi4 = load_target("rpi4")
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    def accept_and_close():  # a TCP port that is not a tracker
        try:
            while True:
                srv.accept()[0].close()
        except OSError:  # srv closed: done
            pass

    threading.Thread(target=accept_and_close, daemon=True).start()
    fake = dataclasses.replace(rpi4, rpc=Rpc("127.0.0.1", srv.getsockname()[1], "rpi4"))
    # a port that accepts and then closes (or resets) counts as no tracker answering
    with pytest.raises(MoscError, match="does not answer like an RPC tracker|dropped the connection|"
                                        "no RPC tracker answers"):
        check_tracker(fake)
    srv.close()
    tracker, port = start_tracker()
    try:
        with pytest.raises(MoscError, match="no device with key 'rpi4' is registered"):
            check_tracker(dataclasses.replace(rpi4, rpc=Rpc("127.0.0.1", port, "rpi4")))
    finally:
        tracker.kill()


# ----------------------------------------------------------------------------- damaged manifests
def _edit_manifest(src: Path, dst: Path, edit) -> Path:
    """A copy of an artifact whose manifest.json was edited by hand (not re-sealed)."""
    return edited(src, dst, "manifest.json", edit)


def swap_graph_functions(m):
    g = m["graphs"]
    g["enc"]["function"], g["step"]["function"] = g["step"]["function"], g["enc"]["function"]
    return m


MANIFEST_DAMAGE = [
    ("a list", lambda m: [m], "must hold a JSON object, not array"),
    ("no graphs", drop("graphs"), "missing 'graphs'"),
    ("graphs as a list", lambda m: {**m, "graphs": list(m["graphs"].values())}, "'graphs' must be a object"),
    ("no files", drop("files"), "missing 'files'"),
    ("files as a list", lambda m: {**m, "files": list(m["files"])}, "'files' must be a object"),
    ("edited input shape", put(["graphs", "enc", "inputs", 0, "shape"], [1, 99]), "was edited after it was written"),
    ("negative shape", put(["graphs", "enc", "inputs", 0, "shape"], [1, -1]), "list of positive integers"),
    ("shape as a string", put(["graphs", "enc", "inputs", 0, "shape"], "1x8"), "'shape' must be a array"),
    ("no dtype", lambda m: (m["graphs"]["enc"]["inputs"][0].pop("dtype"), m)[1], "missing 'dtype'"),
    ("no inputs", lambda m: (m["graphs"]["enc"].pop("inputs"), m)[1], "missing 'inputs'"),
    ("graph not an object", put(["graphs", "enc"], "model.so"), "must be an object with file"),
    ("graph in another file", put(["graphs", "enc", "file"], "enc.so"), "'file' is 'enc.so', expected 'model.so'"),
    ("graph functions swapped", swap_graph_functions, "'function' is 'step', expected 'enc'"),
    ("file without sha256", lambda m: (m["files"].pop("model.so"), m)[1], "has no sha256 in 'files'"),
    ("file outside the folder", lambda m: (m["files"].update({"../x.so": "0" * 64}), m)[1], "not a plain file name"),
    ("bad sha256", put(["files", "model.so"], "abc"), "not a sha256"),
    ("an older format", put(["format"], "mosc-artifact/1"), "'mosc-artifact/1', this mosc runs 'mosc-artifact/2'"),
    ("edited target", put(["target"], "rpi4"), "was edited after it was written"),
    ("edited tvm version", put(["tvm_version"], "0.1"), "was edited after it was written"),
    ("older artifact", drop("manifest_sha256"), "has no manifest_sha256"),
    ("no format", drop("format"), "missing 'format'"),
]


@pytest.mark.parametrize("case,edit,needle", MANIFEST_DAMAGE, ids=[c[0] for c in MANIFEST_DAMAGE])
def test_damaged_manifest_is_one_line(host_artifact, tmp_path, case, edit, needle):
    bad = _edit_manifest(host_artifact, tmp_path / "bad", edit)
    for fn in (verify_artifact, load_artifact):
        with pytest.raises(MoscError) as e:
            fn(bad)
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    if case == "older artifact":
        assert "recompile" in str(e.value)


def test_manifest_seal_covers_every_field(host_artifact):
    from mosc.contract import canonical_sha256

    m = json.loads((host_artifact / "manifest.json").read_text())
    assert m["manifest_sha256"] == canonical_sha256(m, "manifest_sha256")
    assert verify_artifact(host_artifact) == m


def test_bad_graph_name_is_refused_before_building(onnx_files, tmp_path):
    with pytest.raises(MoscError, match="graph name '../enc' must match"):
        compile_artifact({"../enc": onnx_files["enc"]}, "host", tmp_path / "a", tune=False, db_dir=tmp_path / "db")


# ----------------------------------------------------------------------------- artifact cache key
def test_artifact_cache_is_keyed_on_trials_and_database_content(tmp_path, monkeypatch):
    """The cache rebuilds when the trial budget, tuning on/off or the tuning database's content
    change, and reuses otherwise (the compile itself is faked: only the keying is under test)."""
    from mosc.compiler.artifact import write_manifest
    from mosc.compiler.targets import load_target
    from mosc.jobs import artifacts, build
    from mosc.space import SearchSpace

    arch = SearchSpace.load("tiny").smallest()
    sig = {"inputs": [{"name": "x", "shape": [1], "dtype": "float32"}],
           "outputs": [{"name": "y", "shape": [1], "dtype": "float32"}]}
    builds = []

    def fake_compile(onnx, target, out, *, trials, tune, tune_db, **kw):
        out.mkdir(parents=True, exist_ok=True)
        (out / "model.so").write_bytes(os.urandom(32))
        write_manifest(out, {"g": {"file": "model.so", "function": "g", **sig}}, target=target.name, tvm_target="llvm", device="cpu",
                       cuda_kernels=None, tuning={"tuned": tune, "database": database_id(tune_db), "report": None},
                       compile_seconds=0.0, extra={"model": {"arch_hash": arch.hash}})
        builds.append((tune, trials))

    monkeypatch.setattr(build, "compile_export", fake_compile)
    monkeypatch.setattr(artifacts.ArtifactCache, "export_dir", lambda self, a: tmp_path / "onnx")
    db = tmp_path / "db"

    def get(db_dir=db, **kw):
        cache = artifacts.ArtifactCache(load_target("host"), artifacts.ModelSource(), root=tmp_path / "cache",
                                        tune_db=db_dir, log=lambda m: None, **kw)
        return cache.artifact(arch)

    a8, reused = get(trials=8)
    assert not reused and get(trials=8) == (a8, True)
    a256, reused = get(trials=256)
    assert not reused and a256 != a8 and "tuned256" in str(a256) and "tuned8" in str(a8)
    assert get(trials=8) == (a8, True)  # each budget keeps its own artifact
    notune, reused = get(tune=False, trials=8)
    assert not reused and notune not in (a8, a256) and get(tune=False, trials=99) == (notune, True)
    db.mkdir()
    (db / "database_workload.json").write_text('["w"]\n')
    (db / "database_tuning_record.json").write_text('[0, "r"]\n')
    assert get(trials=8) == (a8, False)  # new records: rebuilt in place
    assert get(trials=8) == (a8, True)
    (db / "database_tuning_record.json").write_text('[0, "other"]\n')  # same count, other content
    assert get(trials=8) == (a8, False)
    shutil.copytree(db, tmp_path / "db2")
    assert get(db_dir=tmp_path / "db2", trials=8) == (a8, True)  # the content counts, not the path
    assert builds == [(True, 8), (True, 256), (False, 8), (True, 8), (True, 8)]
    m = json.loads((a8 / "manifest.json").read_text())
    (a8 / "manifest.json").write_text(json.dumps({**m, "target": "rpi4"}))  # edited: rebuilt, not trusted
    assert get(trials=8) == (a8, False)

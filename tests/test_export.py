"""Export and deployment end to end, on a quickly built (untrained) tiny supernet with a
small BPE vocabulary:

    mosc collapse --checkpoint -> mosc export (ONNX, onnxruntime parity) -> mosc compile
    --no-tune (TVM, host) -> mosc translate, and the same ONNX cross-compiled for rpi4 and
    run under qemu. Every backend must give the PyTorch subnet's greedy tokens.

The module's fixtures build each file once through the CLI; the tests read them.
"""

import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mosc.cli import app
from mosc.errors import MoscError

from damage import drop, edited, put, swap_graph_files

runner = CliRunner(env={"COLUMNS": "200"})
REPO = Path(__file__).resolve().parent.parent
ARM64_ROOT = Path(os.environ.get("MOSC_ARM64_ROOT") or Path.home() / ".cache/mosc/arm64-root")
S = T = 30  # the host target's protocol: source_len, decoder_steps
BOS, EOS, PAD = 1, 2, 0


def invoke(*args):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r


def one_line_error(result, needle: str):
    assert result.exit_code == 2, result.output
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert needle in lines[0], lines[0]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def tok():
    from mosc.nn.synthetic import synthetic_pairs
    from mosc.nn.tokenizer import SubwordTokenizer

    src, tgt = synthetic_pairs(1500)
    return SubwordTokenizer.train(src + tgt, vocab_size=400)


@pytest.fixture(scope="module")
def subnet_dir(work, tok):
    """A checkpoint as `mosc train` writes it (weights + tokenizer), collapsed by the CLI."""
    from mosc.nn.model import Supernet, SupernetConfig, save_supernet
    from mosc.space import SearchSpace

    space = SearchSpace.load("tiny")
    torch.manual_seed(0)
    sn = Supernet(SupernetConfig(space=space.to_dict(), vocab_size=tok.vocab_size, ffn_mode="neuron"))
    with torch.no_grad():  # untrained at init scale, greedy repeats one token; x3 makes it vary
        for name, p in sn.named_parameters():
            if p.dim() >= 2 and name != "embed":
                p.mul_(3.0)
    save_supernet(sn, work / "ck", {"tokenizer": tok.to_json()})
    arch = space.sample(random.Random(1))
    (work / "arch.json").write_text(arch.to_json())
    invoke("collapse", "--checkpoint", work / "ck", "--arch", work / "arch.json", "-o", work / "sub")
    return work / "sub"


@pytest.fixture(scope="module")
def sub(subnet_dir):
    from mosc.nn.subnet import load_subnet

    return load_subnet(subnet_dir)


@pytest.fixture(scope="module")
def export_dir(work, subnet_dir):
    r = invoke("export", "--subnet", subnet_dir, "-o", work / "onnx")
    assert "max |torch - onnxruntime| encoder" in r.output and "same tokens" in r.output, r.output
    return work / "onnx"


@pytest.fixture(scope="module")
def host_artifact(work, export_dir):
    r = invoke("compile", "--target", "host", "--onnx-dir", export_dir, "--no-tune", "--tune-db", work / "db", "-o", work / "art")
    assert "skipped (--no-tune)" in r.output, r.output
    return work / "art"


def torch_greedy(sub, rows: list[list[int]]) -> list[list[int]]:
    from mosc.runtime import pad_source

    out = []
    for ids in rows:
        src, _ = pad_source([ids], 1, S, PAD)
        out += sub.translate(torch.from_numpy(src), BOS, EOS, max_len=T)
    return out


def random_sources(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, vocab) for _ in range(rng.randint(1, S + 5))] for _ in range(n)]  # some truncated


# ----------------------------------------------------------------------------- export + ORT
def test_export_folder(export_dir, sub, tok):
    from mosc.fileio import sha256_file
    from mosc.contract import load_export

    meta = load_export(export_dir)
    assert meta["shapes"] == {"batch": 1, "source_len": S, "cache_len": T}
    assert meta["arch"] == sub.arch.to_dict() and (meta["bos_id"], meta["eos_id"], meta["pad_id"]) == (BOS, EOS, PAD)
    assert meta["tokenizer"] == tok.to_json()  # carried checkpoint -> subnet -> export
    dec = meta["graphs"]["decoder_step"]
    L, Q = sub.arch.dec_layers, sub.cfg.qkv_dim
    names = [i["name"] for i in dec["inputs"]]
    assert names[:4] == ["token", "pos", "self_k_0", "self_v_0"] and len(names) == 2 + 2 * L + 3 * L
    assert names[2 + 2 * L : 2 + 2 * L + 3] == ["cross_k_0", "cross_v_0", "cross_bias_0"]
    assert dec["inputs"][1] == {"name": "pos", "shape": [1], "dtype": "int64"}
    by_name = {i["name"]: i["shape"] for i in dec["inputs"]}
    for i, k in enumerate(sub.arch.dec_arbitrary):  # each layer's cross tensors cover only its k encoder layers
        assert by_name[f"self_k_{i}"] == [1, T, Q] and by_name[f"cross_k_{i}"] == [1, k * S, Q]
        assert by_name[f"cross_bias_{i}"] == [1, 1, 1, k * S]
    assert dec["outputs"][0] == {"name": "logits", "shape": [1, tok.vocab_size], "dtype": "float32"}
    for name, digest in meta["files"].items():
        assert sha256_file(export_dir / name) == digest
    p = meta["parity"]
    assert p["encoder_max_abs_diff"] <= 1e-4 and p["decoder_step_max_abs_diff"] <= 1e-4 and p["greedy_tokens_equal"]
    assert not list(export_dir.glob("*.data"))  # weights inside the .onnx files


def test_export_graph_is_static_and_scatter_free(export_dir):
    import onnx

    for name in ("encoder.onnx", "decoder_step.onnx"):
        g = onnx.load(str(export_dir / name)).graph
        ops = {n.op_type for n in g.node}
        assert not ops & {"ScatterND", "ScatterElements", "Loop", "If"}, ops
        for v in list(g.input) + list(g.output):
            assert all(d.HasField("dim_value") for d in v.type.tensor_type.shape.dim), v


def test_ort_parity_and_greedy_match_torch(export_dir, sub, tok):
    from mosc.nn.export import check_parity
    from mosc.runtime import ort_backend, translate_ids

    p = check_parity(sub, export_dir, seed=7)
    assert max(p["encoder_max_abs_diff"], p["decoder_step_max_abs_diff"]) <= 1e-4 and p["greedy_tokens_equal"]
    rows = random_sources(4, tok.vocab_size) + [tok.encode("a short sentence")]
    got, truncated = translate_ids(ort_backend(export_dir), rows, BOS, EOS, PAD)
    assert got == torch_greedy(sub, rows) and truncated == sum(len(r) > S for r in rows)


def test_export_shape_flags_and_batch(work, sub, tok):
    """Flags override the target's shapes; a batch-2 graph decodes rows independently."""
    from mosc.runtime import ort_backend, translate_ids

    out = work / "onnx-b2"
    invoke("export", "--checkpoint", work / "ck", "--arch", work / "arch.json", "--batch", 2, "--source-len", 12,
           "--cache-len", 10, "-o", out)
    meta = json.loads((out / "export.json").read_text())
    assert meta["shapes"] == {"batch": 2, "source_len": 12, "cache_len": 10}
    rows = [r[:12] for r in random_sources(3, tok.vocab_size, seed=3)]
    got, _ = translate_ids(ort_backend(out), rows, BOS, EOS, PAD)
    from mosc.runtime import pad_source

    ref = sub.translate(torch.from_numpy(pad_source(rows[:2], 2, 12, PAD)[0]), BOS, EOS, max_len=10)
    ref += sub.translate(torch.from_numpy(pad_source(rows[2:], 1, 12, PAD)[0]), BOS, EOS, max_len=10)
    assert got == ref


def test_parity_failure_raises(export_dir, sub):
    """A subnet whose weights differ from the exported ones fails the check with one line."""
    from mosc.nn.export import check_parity
    from mosc.nn.subnet import Subnet

    other = Subnet(sub.cfg).eval()
    with torch.no_grad():
        for p in other.parameters():
            p.normal_()
    with pytest.raises(MoscError, match=r"onnxruntime differs from PyTorch: encoder max abs diff"):
        check_parity(other, export_dir)


# ----------------------------------------------------------------------------- TVM (host)
def test_tvm_artifact_greedy_matches_torch(host_artifact, sub, tok):
    from mosc.compiler.artifact import load_artifact
    from mosc.runtime import artifact_backend, translate_ids

    m = json.loads((host_artifact / "manifest.json").read_text())
    assert m["model"]["arch_hash"] == sub.arch.hash and m["model"]["tokenizer"] == tok.to_json()
    rows = random_sources(3, tok.vocab_size, seed=5)
    got, _ = translate_ids(artifact_backend(load_artifact(host_artifact)), rows, BOS, EOS, PAD)
    assert got == torch_greedy(sub, rows)


def test_compiled_loop_matches_the_python_loop(host_artifact, tok):
    """The artifact's translate function (one call: encoder + the greedy loop on the device) against
    Python stepping the same artifact's graphs: exactly `steps` steps with eos = -1, an early stop at
    eos (the slots after it PAD), and fewer steps than the cache holds."""
    from mosc.compiler.artifact import load_artifact
    from mosc.runtime import artifact_backend, greedy, pad_source, python_greedy

    be = artifact_backend(load_artifact(host_artifact))
    src, _ = pad_source(random_sources(1, tok.vocab_size, seed=7), 1, S, PAD)
    full = be.loop(src, T, -1)[0].tolist()  # eos never matches: all T steps
    assert len(full) == T and full == python_greedy(be, src, BOS, -1)[0]
    stop = next(t for t in full[3:] if t != PAD)  # a token the model emits after a few steps
    k = full.index(stop)
    got = be.loop(src, T, stop)[0].tolist()
    assert got[: k + 1] == full[: k + 1] and got[k + 1:] == [PAD] * (T - k - 1)
    assert greedy(be, src, BOS, stop) == python_greedy(be, src, BOS, stop) == [full[:k]]
    assert be.loop(src, 7, -1)[0].tolist() == full[:7] + [PAD] * (T - 7)


def test_cli_translate_matches_torch(host_artifact, sub, tok, tmp_path):
    text = "the small dog sees a red house"
    r = invoke("translate", "--artifact", host_artifact, "--text", text, "--ids")
    ids_line = [l for l in r.stdout.splitlines() if l.startswith("ids:")]
    want = torch_greedy(sub, [tok.encode(text)])[0]
    assert ids_line == ["ids: " + " ".join(map(str, want))]
    assert tok.decode(want) in r.stdout
    f = tmp_path / "in.txt"
    f.write_text(f"{text}\n\nanother one\n")
    r = invoke("translate", "--artifact", host_artifact, "--file", f)
    lines = [l for l in r.stdout.splitlines() if "sentence(s) in" not in l]
    first, second = (tok.decode(x) for x in torch_greedy(sub, [tok.encode(text), tok.encode("another one")]))
    assert lines == [first, "", second]  # output line N answers input line N: the blank line stays


def test_tampered_artifact_is_refused_by_translate(host_artifact, tmp_path):
    bad = shutil.copytree(host_artifact, tmp_path / "bad")
    lib = bad / "model.so"
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0xFF
    lib.write_bytes(bytes(data))
    one_line_error(runner.invoke(app, ["translate", "--artifact", str(bad), "--text", "hello"]),
                   "model.so does not match its sha256")
    one_line_error(runner.invoke(app, ["translate", "--artifact", str(tmp_path), "--text", "hello"]),
                   "is not a mosc artifact")


def test_tampered_export_is_refused_by_compile(export_dir, tmp_path):
    bad = shutil.copytree(export_dir, tmp_path / "bad")
    with open(bad / "encoder.onnx", "ab") as f:
        f.write(b"\0")
    one_line_error(runner.invoke(app, ["compile", "-t", "host", "--onnx-dir", str(bad), "--no-tune", "-o", str(tmp_path / "a")]),
                   "encoder.onnx does not match its sha256")


# ----------------------------------------------------------------------------- rpi4 under qemu
_QEMU_TRANSLATE = """
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from mosc.compiler.artifact import load_artifact
from mosc.runtime import artifact_backend, translate_ids
art = load_artifact(sys.argv[2])
m = art.manifest["model"]
rows = json.loads(open(sys.argv[3]).read())
out, _ = translate_ids(artifact_backend(art), rows, m["bos_id"], m["eos_id"], m["pad_id"])
open(sys.argv[4], "w").write(json.dumps(out))
"""


@pytest.mark.skipif(not shutil.which("aarch64-linux-gnu-gcc"),
                    reason="aarch64-linux-gnu-gcc not installed (apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu)")
@pytest.mark.skipif(not (ARM64_ROOT / "opt/mosc-site/.mosc-wheels-done").exists() or not shutil.which("qemu-aarch64"),
                    reason=f"no arm64 root at {ARM64_ROOT} or no qemu-aarch64 (run scripts/setup_arm64_root.sh)")
def test_rpi4_artifact_translates_under_qemu(export_dir, sub, tok, work, tmp_path):
    from mosc.compiler.build import compile_artifact
    from mosc.contract import load_export, onnx_files

    meta = load_export(export_dir)
    art = compile_artifact(onnx_files(export_dir, meta), "rpi4", work / "art-rpi4", tune=False, db_dir=tmp_path / "db",
                           extra_manifest={"model": {"bos_id": BOS, "eos_id": EOS, "pad_id": PAD}})
    rows = random_sources(2, tok.vocab_size, seed=11)
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    (tmp_path / "run.py").write_text(_QEMU_TRANSLATE)
    env = {**os.environ, "PYTHONPATH": str(ARM64_ROOT / "opt/mosc-site"), "TVM_USE_RUNTIME_LIB": "1"}
    subprocess.run(
        ["qemu-aarch64", "-L", str(ARM64_ROOT), str(ARM64_ROOT / "usr/bin/python3"), str(tmp_path / "run.py"),
         str(REPO), str(art), str(tmp_path / "rows.json"), str(tmp_path / "out.json")],
        check=True, env=env, timeout=300, capture_output=True,
    )
    assert json.loads((tmp_path / "out.json").read_text()) == torch_greedy(sub, rows)


def test_outputs_are_not_trivial(sub, tok):
    """Guard for the parity tests above: the greedy output is long and changes from step to step
    (so the KV cache matters), not one token repeated."""
    out = torch_greedy(sub, random_sources(3, tok.vocab_size, seed=5))
    assert all(len(r) >= 5 for r in out) and max(len(set(r)) for r in out) >= 3, out


def test_compile_one_step_from_subnet(subnet_dir, sub, tok, work):
    """`mosc compile --subnet` exports (with shape flags) and compiles in one call."""
    from mosc.compiler.artifact import load_artifact
    from mosc.runtime import artifact_backend, pad_source

    out = work / "art-one-step"
    r = invoke("compile", "-t", "host", "--subnet", subnet_dir, "--source-len", 12, "--cache-len", 8, "--batch", 2,
               "--no-tune", "--tune-db", work / "db1", "-o", out)
    assert "greedy: onnxruntime vs torch" in r.output and "compiled" in r.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["model"]["shapes"] == {"batch": 2, "source_len": 12, "cache_len": 8}
    assert m["graphs"]["decoder_step"]["inputs"][2]["shape"][1] == 8
    assert m["graphs"]["translate"]["outputs"] == [{"name": "tokens", "shape": [2, 8], "dtype": "int64"}]
    rows = [r[:12] for r in random_sources(4, tok.vocab_size, seed=9)]
    from mosc.runtime import greedy, python_greedy

    backend = artifact_backend(load_artifact(out))
    for i in range(0, len(rows), 2):
        src = pad_source(rows[i:i + 2], 2, 12, PAD)[0]
        want = sub.translate(torch.from_numpy(src), BOS, EOS, max_len=8)
        assert greedy(backend, src, BOS, EOS) == want
        # a batch whose rows stop at different steps: one row's eos does not stop the other
        full = backend.loop(src, 8, -1).tolist()
        stop = full[0][2]  # row 0 emits it at step 3 (or earlier); as eos, row 0 is cut there
        assert greedy(backend, src, BOS, stop) == python_greedy(backend, src, BOS, stop)


# ----------------------------------------------------------------------------- damaged records


def _sealed_then_edited(d):
    from mosc.contract import EXPORT_SEAL, seal

    return {**seal(d, EXPORT_SEAL), "arch_hash": "0" * 16}


EXPORT_DAMAGE = [
    ("a list", lambda d: [d], "must hold a JSON object"),
    ("no graphs", drop("graphs"), "missing 'graphs'"),
    ("graphs as a list", lambda d: {**d, "graphs": list(d["graphs"].values())}, "'graphs' must be a object"),
    ("no files", drop("files"), "missing 'files'"),
    ("no arch hash", drop("arch_hash"), "missing 'arch_hash'"),
    ("edited source length", put(["graphs", "encoder", "inputs", 0, "shape"], [1, 99]), "disagree with shapes"),
    ("zero batch", put(["shapes", "batch"], 0), "shapes batch must be >= 1"),
    ("graph files swapped", swap_graph_files, "expected 'decoder_step.onnx'"),
    ("renamed input", put(["graphs", "decoder_step", "inputs", 1, "name"], "position"), "the contract says"),
    ("missing graph", lambda d: (d["graphs"].pop("decoder_step"), d)[1], "no graph uses"),
    ("sealed, then edited", _sealed_then_edited, "was edited after it was written"),
]


@pytest.mark.parametrize("case,edit,needle", EXPORT_DAMAGE, ids=[c[0] for c in EXPORT_DAMAGE])
def test_damaged_export_json_is_one_line(export_dir, tmp_path, case, edit, needle):
    from mosc.contract import load_export

    bad = edited(export_dir, tmp_path / "bad", "export.json", edit)
    with pytest.raises(MoscError) as e:
        load_export(bad)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_sealed_export_loads(export_dir, tmp_path):
    from mosc.contract import EXPORT_SEAL, load_export, seal

    ok = edited(export_dir, tmp_path / "ok", "export.json", lambda d: seal(d, EXPORT_SEAL))
    assert load_export(ok)["arch_hash"] == load_export(export_dir)["arch_hash"]


def test_cli_damaged_export_and_manifest_are_one_line(export_dir, host_artifact, tmp_path):
    bad = edited(export_dir, tmp_path / "onnx", "export.json", drop("graphs"))
    one_line_error(runner.invoke(app, ["compile", "-t", "host", "--onnx-dir", str(bad), "--no-tune",
                                       "-o", str(tmp_path / "a")]), "missing 'graphs'")
    art = edited(host_artifact, tmp_path / "art", "manifest.json", put(["target"], "rpi4"))
    one_line_error(runner.invoke(app, ["translate", "--artifact", str(art), "--text", "hello"]),
                   "was edited after it was written")
    art = edited(host_artifact, tmp_path / "art2", "manifest.json", lambda d: [d])
    one_line_error(runner.invoke(app, ["translate", "--artifact", str(art), "--text", "hello"]),
                   "must hold a JSON object")


def test_artifact_backend_checks_the_contract(host_artifact):
    from types import SimpleNamespace

    from mosc.compiler.artifact import verify_artifact
    from mosc.runtime import artifact_backend

    m = verify_artifact(host_artifact)
    m["graphs"]["decoder_step"]["inputs"][2]["shape"] = [1, 2]
    with pytest.raises(MoscError, match="inconsistent shapes"):
        artifact_backend(SimpleNamespace(dir=host_artifact, manifest=m, graphs=list(m["graphs"])))
    del m["graphs"]["encoder"]
    with pytest.raises(MoscError, match="lacks graph"):
        artifact_backend(SimpleNamespace(dir=host_artifact, manifest=m, graphs=list(m["graphs"])))

"""CLI: every command and option has help; commands work; bad input is one line + exit 2."""

import json

import pytest
import typer
from typer.testing import CliRunner

from mosc.cli import app
from mosc.errors import MoscError

runner = CliRunner(env={"COLUMNS": "200"})  # no line wrapping in assertions


def walk(cmd, path=()):
    """Every (sub)command of a click/typer command tree (typer may vendor its own click:
    duck typing, not isinstance)."""
    yield path, cmd
    if hasattr(cmd, "commands"):
        for name, sub in cmd.commands.items():
            yield from walk(sub, path + (name,))


def test_every_command_and_option_has_help():
    root = typer.main.get_command(app)
    missing = []
    for path, cmd in walk(root):
        if path and not (cmd.help or cmd.short_help):
            missing.append(" ".join(path))
        for p in cmd.params:
            if p.param_type_name == "option" and not p.help and p.name not in ("help", "install_completion", "show_completion"):
                missing.append(f"{' '.join(path)} --{p.name}")
            if p.param_type_name == "argument" and not getattr(p, "help", None):
                missing.append(f"{' '.join(path)} {p.name}")
    assert not missing, missing
    assert sum(p.param_type_name == "option" for _, c in walk(root) for p in c.params) > 100  # the walk saw them
    for path, _ in walk(root):
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)


def test_space_show_prints_size():
    r = runner.invoke(app, ["space", "show", "tiny"])
    assert r.exit_code == 0, r.output
    assert "2,122,272 distinct archs" in r.output


def test_arch_sample_and_validate(tmp_path):
    out = tmp_path / "a.json"
    r = runner.invoke(app, ["arch", "sample", "--space", "wmt", "--seed", "4", "--out", str(out)])
    assert r.exit_code == 0, r.output
    arch = json.loads(out.read_text())
    assert len(arch["enc_ffn"]) == 6
    r = runner.invoke(app, ["arch", "validate", str(out), "--space", "wmt"])
    assert r.exit_code == 0 and "inside space" in r.output
    r = runner.invoke(app, ["arch", "validate", str(out), "--space", "tiny"])
    assert r.exit_code == 2 and "outside space 'tiny'" in r.output


def test_collapse_prints_counts_and_diff(tmp_path):
    r = runner.invoke(app, ["collapse", "--space", "tiny", "--mode", "layer", "--seed", "2", "--out", str(tmp_path / "sub")])
    assert r.exit_code == 0, r.output
    assert "collapsed parameters" in r.output and "analytic parameters" in r.output and "(equal)" in r.output
    assert "max |supernet - collapsed|" in r.output
    assert (tmp_path / "sub" / "model.safetensors").exists() and (tmp_path / "sub" / "config.json").exists()


def test_collapse_from_checkpoint(tmp_path):
    import torch

    from mosc.nn.model import Supernet, SupernetConfig, save_supernet
    from mosc.space import SearchSpace

    torch.manual_seed(0)
    save_supernet(Supernet(SupernetConfig(space=SearchSpace.load("tiny").to_dict(), ffn_mode="shared")), tmp_path / "ck")
    arch = tmp_path / "a.json"
    arch.write_text(SearchSpace.load("tiny").smallest().to_json())
    r = runner.invoke(app, ["collapse", "--checkpoint", str(tmp_path / "ck"), "--arch", str(arch)])
    assert r.exit_code == 0, r.output
    assert "(equal)" in r.output


def one_line_error(result, needle: str):
    assert result.exit_code == 2, result.output
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert needle in lines[0], lines[0]
    assert "Traceback" not in result.output


@pytest.mark.parametrize("args,needle", [
    (["space", "show", "nope"], "unknown search space 'nope'"),
    (["arch", "sample", "--space", "nope"], "built-ins: bert, bert-tiny, tiny, wmt"),
    (["collapse", "--mode", "moe"], "'moe' is not one of 'shared', 'layer', 'neuron'"),
    (["collapse", "--no-such-option"], "No such option: --no-such-option"),
    (["arch", "sample", "--which", "medium"], "'medium' is not one of 'random', 'largest', 'smallest'"),
    (["collapse", "--checkpoint", "/nonexistent/ck"], "is not a model folder"),
    (["collapse", "--arch", "/nonexistent/a.json"], "cannot read"),
])
def test_bad_input_is_one_line(args, needle):
    one_line_error(runner.invoke(app, args), needle)


def test_malformed_arch_and_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{ nope")
    one_line_error(runner.invoke(app, ["collapse", "--arch", str(bad)]), "is not valid JSON")
    outside = tmp_path / "outside.json"
    from mosc.space import SearchSpace

    d = SearchSpace.load("tiny").largest().to_dict()
    d["dec_heads"] = [4, 3, 4]
    outside.write_text(json.dumps(d))
    one_line_error(runner.invoke(app, ["collapse", "--arch", str(outside)]), "dec_heads[1] = 3, allowed: [2, 4]")
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.json").write_text('{"kind": "mosc-supernet", "config": {}}')
    (ck / "model.safetensors").write_bytes(b"garbage")
    one_line_error(runner.invoke(app, ["collapse", "--checkpoint", str(ck)]), "has no weights_sha256")
    import hashlib

    (ck / "config.json").write_text(json.dumps({"kind": "mosc-supernet", "config": {},
                                                "weights_sha256": hashlib.sha256(b"garbage").hexdigest()}))
    one_line_error(runner.invoke(app, ["collapse", "--checkpoint", str(ck)]), "corrupt or not a safetensors")


def test_targets_lists_tvm_targets():
    r = runner.invoke(app, ["targets"])
    assert r.exit_code == 0, r.output
    for name, tvm_target in [("host", '"mcpu": "auto"'), ("rpi4", "raspberry-pi/4b-aarch64"),
                             ("xeon", "aws/cpu/c5.xlarge"), ("nvidia", "nvidia/nvidia-h100")]:
        line = next((l for l in r.output.splitlines() if f" {name} " in l), "")
        assert tvm_target in line, (name, r.output)
    assert "aarch64-linux-gnu-gcc" in r.output


@pytest.mark.parametrize("args,needle", [
    (["compile", "--target", "pi5", "--onnx-dir", ".", "-o", "x"], "unknown target 'pi5'; valid targets: host, jetson-orin (also orin), nvidia, rpi4 (also pi, raspberrypi, rpi), xeon"),
    (["compile", "--target", "host", "-o", "x"], "give exactly one of --onnx-dir DIR, --subnet DIR or --checkpoint"),
    (["compile", "--target", "host", "--onnx-dir", "/nonexistent", "-o", "x"], "is not an export folder"),
    (["export", "-o", "x"], "give exactly one of --subnet DIR or --checkpoint RUN"),
    (["export", "--checkpoint", "/nonexistent", "-o", "x"], "--checkpoint needs --arch"),
    (["export", "--target", "pi5", "--subnet", "/nonexistent", "-o", "x"], "unknown target 'pi5'"),
    (["translate", "--artifact", "/nonexistent", "--text", "hi"], "is not a mosc artifact"),
    (["translate", "--artifact", "/nonexistent"], "give --text SENTENCE (repeatable) or --file FILE"),
])
def test_bad_deploy_input_is_one_line(args, needle):
    one_line_error(runner.invoke(app, args), needle)


def test_missing_cross_compiler_names_the_apt_package(tmp_path):
    r = CliRunner(env={"COLUMNS": "200", "PATH": str(tmp_path)}).invoke(
        app, ["compile", "--target", "rpi4", "--onnx-dir", str(tmp_path), "--no-tune", "-o", str(tmp_path / "a")])
    one_line_error(r, "cross compiler 'aarch64-linux-gnu-gcc' for target rpi4 not found on PATH "
                      "(apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu)")


def test_tuning_a_remote_target_needs_its_tracker(tmp_path, monkeypatch):
    """rpi4 tuning measures on the Pi through the RPC tracker; none running: one line, before any work."""
    import shutil

    from mosc.compiler import build

    if not shutil.which("aarch64-linux-gnu-gcc"):
        pytest.skip("aarch64-linux-gnu-gcc not installed")
    monkeypatch.setattr(build, "import_onnx", lambda *a, **k: pytest.fail("should refuse before importing"))
    from mosc.compiler.targets import Rpc, load_target
    import dataclasses

    t = dataclasses.replace(load_target("rpi4"), rpc=Rpc("127.0.0.1", 1, "rpi4"))  # nothing listens on port 1
    with pytest.raises(MoscError, match=r"no RPC tracker answers at 127.0.0.1:1 .*or compile with --no-tune"):
        build.compile_artifact({"encoder": tmp_path / "e.onnx"}, t, tmp_path / "a", trials=8)

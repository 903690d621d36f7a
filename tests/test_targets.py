"""mosc.compiler.targets: the target files in targets/ and their loader (pure Python but for tvm_target())."""

import dataclasses

import pytest

from mosc.errors import MoscError
from mosc.compiler.targets import Target, list_targets, load_target

SHIPPED = ["host", "nvidia", "rpi4", "xeon"]


def test_shipped_targets_load():
    assert set(SHIPPED) <= set(list_targets())
    for name in SHIPPED:
        t = load_target(name)
        assert t.name == name and t.description and t.rpc.key
        assert (t.protocol.source_len, t.protocol.decoder_steps, t.protocol.batch) == (30, 30, 1)
        assert (t.protocol.warmup, t.protocol.repeats, t.protocol.trim) == (5, 50, 0.1)
        assert (t.regression.p50_tol, t.regression.p90_tol) == (0.05, 0.10)
    assert load_target("rpi4").cross_compiler == "aarch64-linux-gnu-gcc" and load_target("rpi4").is_cross
    assert load_target("rpi4").rpc.key == "rpi4"
    assert not load_target("xeon").is_cross


def test_target_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        load_target("host").name = "x"


def test_unknown_target_lists_valid_names():
    with pytest.raises(MoscError) as e:
        load_target("pi5")
    msg = str(e.value)
    assert "\n" not in msg and "unknown target 'pi5'" in msg
    for name in SHIPPED:
        assert name in msg


def test_tvm_targets():
    rpi4 = load_target("rpi4").tvm_target()
    assert rpi4.kind.name == "llvm" and "aarch64" in str(rpi4.attrs["mtriple"])
    assert rpi4.host is not None and rpi4.host.host is None  # the tag's nested host is dropped
    assert str(load_target("xeon").tvm_target().attrs["mcpu"]) == "skylake-avx512"
    nv = load_target("nvidia")
    assert nv.tvm_target().kind.name == "cuda" and nv.tvm_target().host.kind.name == "llvm"
    assert nv.device_type() == "cuda" and load_target("rpi4").device_type() == "cpu"


def test_needs_rpc():
    """One rule for "reached over RPC": a cross or GPU target, or any target given a tracker/key."""
    host = load_target("host")
    assert not host.needs_rpc and load_target("rpi4").needs_rpc and load_target("nvidia").needs_rpc
    assert host.with_rpc() is host
    remote = host.with_rpc("10.0.0.2:9191")
    assert remote.needs_rpc and (remote.rpc.tracker_host, remote.rpc.tracker_port) == ("10.0.0.2", 9191)
    assert host.with_rpc(key="box").needs_rpc


def test_host_is_detected():
    from tvm.target import codegen

    t = load_target("host")
    spec = t.resolved_spec()
    assert spec["mcpu"] == codegen.llvm_get_system_cpu() and spec["num-cores"] >= 1
    assert t.tvm_target_spec["mcpu"] == "auto"  # the dataclass keeps what the file says
    assert str(t.tvm_target().attrs["mcpu"]) == spec["mcpu"]


def _write(dir_, name, text):
    (dir_ / f"{name}.toml").write_text(text)


def test_env_dir_and_malformed_files(tmp_path, monkeypatch):
    monkeypatch.setenv("MOSC_TARGETS_DIR", str(tmp_path))
    _write(tmp_path, "ok", 'description = "x"\ntvm_target = "aws/cpu/c5.xlarge"\n[rpc]\nkey = "k"\n')
    _write(tmp_path, "broken", 'description = "x\n')
    _write(tmp_path, "typo", 'description = "x"\ntvm_target = "llvm"\n[protocol]\nrepeat = 3\n')
    _write(tmp_path, "badtype", 'description = "x"\ntvm_target = "llvm"\n[protocol]\nrepeats = "many"\n')
    _write(tmp_path, "nokind", 'description = "x"\ntvm_target = { mcpu = "x" }\n')
    assert list_targets() == ["badtype", "broken", "nokind", "ok", "typo"]
    ok = load_target("ok")
    assert isinstance(ok, Target) and ok.rpc.key == "k" and ok.protocol.repeats == 50  # defaults
    for name, pattern in [("broken", "not valid TOML"), ("typo", "unknown key.*repeat"),
                          ("badtype", "repeats must be int"), ("nokind", "with a 'kind'")]:
        with pytest.raises(MoscError, match=pattern):
            load_target(name)


def test_unknown_tvm_tag_and_mcpu_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("MOSC_TARGETS_DIR", str(tmp_path))
    _write(tmp_path, "badtag", 'description = "x"\ntvm_target = "nvidia/jetson-orin-nanoo"\n')
    _write(tmp_path, "badcpu", 'description = "x"\ntvm_target = { kind = "llvm", mtriple = "aarch64-linux-gnu", '
                               'mcpu = "cortex-a78x" }\n')
    _write(tmp_path, "goodcpu", 'description = "x"\ntvm_target = { kind = "llvm", mtriple = "aarch64-linux-gnu", '
                                'mcpu = "cortex-a78ae" }\ncross_compiler = "aarch64-linux-gnu-gcc"\n')
    for name, pattern in [("badtag", "is not a TVM target"), ("badcpu", "mcpu 'cortex-a78x', which LLVM does not know")]:
        with pytest.raises(MoscError, match=pattern) as e:
            load_target(name).tvm_target()
        assert "\n" not in str(e.value)
    assert str(load_target("goodcpu").tvm_target().attrs["mcpu"]) == "cortex-a78ae"


def test_targets_cli_lists_good_files_and_names_broken_ones(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from mosc.cli import app

    monkeypatch.setenv("MOSC_TARGETS_DIR", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "200")
    _write(tmp_path, "ok", 'description = "fine"\ntvm_target = "llvm"\n')
    _write(tmp_path, "typo", 'description = "x"\ntvm_target = "llvm"\n[rpc]\nport = 1\n')
    r = CliRunner().invoke(app, ["targets"])
    assert r.exit_code == 2
    assert "fine" in r.output and "BROKEN" in r.output
    assert "typo.toml [rpc]: unknown key 'port'" in r.output  # "[rpc]" printed, not eaten as markup


def test_aliases_resolve_to_the_canonical_target():
    for alias in ("rpi", "pi", "raspberrypi", "rpi4"):
        t = load_target(alias)
        assert t.name == "rpi4" and t.rpc.key == "rpi4"
    with pytest.raises(MoscError) as e:
        load_target("nope")
    msg = str(e.value)
    assert "\n" not in msg and "unknown target 'nope'" in msg and "rpi4 (also pi, raspberrypi, rpi)" in msg


@pytest.mark.parametrize("name", ["../targets/host", "/etc/passwd", "a/b", ".hidden", "", "host\n", "x y"])
def test_target_names_with_path_separators_are_refused(name):
    with pytest.raises(MoscError, match="invalid target name") as e:
        load_target(name)
    assert "\n" not in str(e.value).replace(repr(name), "")


def test_alias_clashes_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("MOSC_TARGETS_DIR", str(tmp_path))
    _write(tmp_path, "a", 'aliases = ["x"]\ndescription = "a"\ntvm_target = "llvm"\n')
    _write(tmp_path, "b", 'aliases = ["x"]\ndescription = "b"\ntvm_target = "llvm"\n')
    with pytest.raises(MoscError, match="alias 'x' is claimed by both a.toml and b.toml"):
        load_target("x")
    assert load_target("a").name == "a"  # by its file name a target is always found
    _write(tmp_path, "c", 'aliases = ["a"]\ndescription = "c"\ntvm_target = "llvm"\n')
    with pytest.raises(MoscError, match="alias 'a' is the name of another target file"):
        load_target("c")
    _write(tmp_path, "d", 'aliases = ["../up"]\ndescription = "d"\ntvm_target = "llvm"\n')
    with pytest.raises(MoscError, match="aliases must be a list of names"):
        load_target("d")


BAD_SETTINGS = [
    ("protocol", "repeats = 0", "repeats must be between 2"),
    ("protocol", "repeats = 1", "repeats must be between 2"),
    ("protocol", "warmup = -1", "warmup must be between 0"),
    ("protocol", "trim = 0.7", "trim must be >= 0 and < 0.5"),
    ("protocol", "trim = 0.5", "trim must be >= 0 and < 0.5"),
    ("protocol", "trim = -0.1", "trim must be >= 0 and < 0.5"),
    ("protocol", "trim = nan", "trim must be >= 0 and < 0.5"),
    ("protocol", "batch = 0", "batch must be between 1"),
    ("protocol", "source_len = 0", "source_len must be between 1"),
    ("protocol", "source_len = 1000000000", "source_len must be between 1 and 4096"),
    ("protocol", "decoder_steps = 0", "decoder_steps must be between 1"),
    ("rpc", "tracker_port = 99999", "tracker_port must be between 1 and 65535"),
    ("rpc", "tracker_port = 0", "tracker_port must be between 1 and 65535"),
    ("rpc", 'tracker_host = ""', "tracker_host is empty"),
    ("regression", "p50_tol = -0.1", "p50_tol must be between 0"),
    ("regression", "p90_tol = inf", "p90_tol must be between 0"),
    ("regression", "p90_tol = nan", "p90_tol must be between 0"),
]


@pytest.mark.parametrize("section,line,pattern", BAD_SETTINGS)
def test_settings_out_of_range_are_refused_at_load(tmp_path, monkeypatch, section, line, pattern):
    monkeypatch.setenv("MOSC_TARGETS_DIR", str(tmp_path))
    _write(tmp_path, "t", f'description = "x"\ntvm_target = "llvm"\n[{section}]\n{line}\n')
    with pytest.raises(MoscError, match=pattern) as e:
        load_target("t")
    assert "\n" not in str(e.value) and f"t.toml [{section}]" in str(e.value)


def test_settings_at_their_limits_load(tmp_path, monkeypatch):
    monkeypatch.setenv("MOSC_TARGETS_DIR", str(tmp_path))
    _write(tmp_path, "t", 'description = "x"\ntvm_target = "llvm"\n[protocol]\nrepeats = 2\nwarmup = 0\ntrim = 0.0\n'
                          '[rpc]\ntracker_port = 65535\n[regression]\np50_tol = 0\n')
    t = load_target("t")
    assert (t.protocol.repeats, t.protocol.warmup, t.rpc.tracker_port, t.regression.p50_tol) == (2, 0, 65535, 0.0)

"""Tuning a whole search space once (`mosc tune --space`): the covering set covers, a killed run
resumes, and an arch never seen while tuning compiles with zero workloads without a record and
translates exactly like PyTorch. Real exports, real TVM builds and real MetaSchedule trials on a
small space (one embed size, few choices) so the whole file runs in a few minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mosc.compiler.targets import load_target
from mosc.space import SearchSpace
from rpc_helpers import one_core_host_target

SPACE_TOML = """
name = "small"
description = "a small space for the space-tuning tests"
qkv_dim = 32
[encoder]
embed_dim = [32]
layers = [1, 2]
ffn_dim = [64, 128]
heads = [2, 4]
[decoder]
embed_dim = [32]
layers = [1, 2]
ffn_dim = [64, 128]
heads = [2, 4]
cross_heads = [2]
arbitrary_attn = [1, 2]
"""
VOCAB = 1000  # what `mosc tune` assumes without --checkpoint (a fresh supernet's)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("space")
    (d / "small.toml").write_text(SPACE_TOML)
    one_core_host_target(d)
    return d


@pytest.fixture()
def targets_dir(env, monkeypatch):
    monkeypatch.setenv("MOSC_TARGETS_DIR", str(env / "targets"))
    return env / "targets"


def _space(env) -> SearchSpace:
    return SearchSpace.load(env / "small.toml")


def test_covering_archs_are_in_the_space_and_show_every_choice():
    for name in ("tiny", "wmt"):
        sp = SearchSpace.load(name)
        archs = sp.covering_archs()
        assert archs and all(sp.contains(a) for a in archs)
        for field in ("enc_ffn", "enc_heads", "dec_ffn", "dec_heads", "dec_cross_heads", "dec_arbitrary"):
            seen = {v for a in archs for v in getattr(a, field)}
            assert seen == set(getattr(sp, field)), (name, field)
        assert {(a.enc_embed, a.dec_embed) for a in archs} == {(e, d) for e in sp.enc_embed for d in sp.dec_embed}
    assert len(SearchSpace.load("tiny").covering_archs()) == 8 and len(SearchSpace.load("wmt").covering_archs()) == 4


def test_workloads_do_not_depend_on_depth_or_position(env, targets_dir):
    """Random archs of the space (other depths, other layer orders) add no workload to the covering set's."""
    from mosc.jobs.tune import ModelShape, _workloads_of

    sp, target, shape = _space(env), load_target("host"), ModelShape(vocab_size=VOCAB)
    covering = _workloads_of(sp.covering_archs(), sp, shape, target)
    rng = random.Random(7)
    others = [sp.sample(rng) for _ in range(4)] + [sp.smallest(), sp.largest()]
    assert any(a.dec_layers == 1 for a in others) and any(a.dec_layers == 2 for a in others)
    found = _workloads_of(others, sp, shape, target)
    assert set(found) <= set(covering), [found[k].name for k in set(found) - set(covering)]
    # a decoder-step workload runs once per step: its calls per translation count the steps
    assert max(w.calls for w in covering.values()) >= 8


def _tune_cmd(env, db: Path, trials: int) -> list[str]:
    return [sys.executable, "-m", "mosc", "tune", "-t", "host", "-s", str(env / "small.toml"), "--trials",
            str(trials), "--tune-db", str(db)]


def _records(db: Path) -> int:
    f = db / "database_tuning_record.json"
    return f.read_bytes().count(b"\n") if f.is_file() else 0


def test_tune_space_resumes_after_a_kill_then_any_arch_compiles_from_records(env, targets_dir, tmp_path, monkeypatch):
    from mosc.compiler.artifact import load_artifact
    from mosc.compiler.build import compile_artifact
    from mosc.compiler.tune import open_database
    from mosc.compiler.workloads import SpaceFile, allot, coverage
    from mosc.contract import BOS_ID, EOS_ID
    from mosc.jobs.tune import ModelShape, space_workloads
    from mosc.nn.export import Shapes, export_subnet
    from mosc.nn.subnet import Subnet, SubnetConfig
    from mosc.runtime import artifact_backend, greedy

    db = tmp_path / "db"
    sp, target, shape = _space(env), load_target("host"), ModelShape(vocab_size=VOCAB)
    # the workload file first (in process), so that the killed run below is killed while tuning
    sf, extra = space_workloads(sp, shape, target, db)
    assert extra == 0 and len(sf.workloads) > 10
    trials = 2 * len(sf.workloads)
    goal = allot(sf.workloads, trials)

    environ = {**os.environ, "MOSC_TARGETS_DIR": str(targets_dir)}
    proc = subprocess.Popen(_tune_cmd(env, db, trials), env=environ, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while _records(db) < 6 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]  # still tuning: kill it mid-run
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _records(db)
    assert 0 < killed_at < sum(goal.values())

    r = subprocess.run(_tune_cmd(env, db, trials), env=environ, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "workloads have a tuned record or a timed default schedule" in r.stdout
    cov = {c.key: c for c in coverage(open_database(db), target, SpaceFile.load(SpaceFile.path(
        db, sp.name, sf.model)).workloads)}
    # resumed, not restarted: every workload got its allotment once, what the killed run measured counts
    spent = sum(c.trials for c in cov.values())
    assert sum(goal.values()) <= spent < sum(goal.values()) + killed_at
    missing = [c.name for c in cov.values() if c.best_us is None]
    assert not missing, missing
    again = subprocess.run(_tune_cmd(env, db, trials) + ["--status"], env=environ, capture_output=True, text=True)
    assert again.returncode == 0 and f"{len(cov)}/{len(cov)} workloads" in again.stdout

    # an arch seen neither in the covering set nor by the check archs: zero functions without a record
    seen = {json.dumps(a, sort_keys=True) for a in sf.archs}
    rng = random.Random(123)
    arch = next(a for a in (sp.sample(rng) for _ in range(100)) if json.dumps(a.to_dict(), sort_keys=True) not in seen)
    torch.manual_seed(0)
    sub = Subnet(SubnetConfig(arch, VOCAB, sp.qkv_dim)).eval()
    with torch.no_grad():
        sub.embed.normal_(0.0, 0.2)  # a zero embedding would make every greedy token the same
    export_subnet(sub, tmp_path / "onnx", Shapes(1, 8, 8), check=False)
    t0 = time.perf_counter()
    out = compile_artifact({"encoder": tmp_path / "onnx/encoder.onnx", "decoder_step": tmp_path / "onnx/decoder_step.onnx"},
                           target, tmp_path / "art", tune=False, db_dir=db)
    seconds = time.perf_counter() - t0
    m = json.loads((out / "manifest.json").read_text())
    assert all(g["default_scheduled"] == 0 and g["from_database"] == g["functions"] > 0
               for g in m["tuning"]["coverage"].values()), m["tuning"]["coverage"]
    assert seconds < 60  # seconds, not minutes: nothing is tuned (the benchmark reports the real time)
    src = torch.randint(4, VOCAB, (1, 8), generator=torch.Generator().manual_seed(1))
    want = sub.translate(src, BOS_ID, EOS_ID, max_len=8)
    assert greedy(artifact_backend(load_artifact(out)), src.numpy(), BOS_ID, EOS_ID) == want


def test_status_of_a_space_never_tuned_is_one_line(env, targets_dir, tmp_path):
    from typer.testing import CliRunner

    from mosc.cli import app

    r = CliRunner().invoke(app, ["tune", "-t", "host", "-s", str(env / "small.toml"), "--tune-db", str(tmp_path / "none"),
                                 "--status"])
    assert r.exit_code == 2 and "has not been tuned for host" in r.output and "Traceback" not in r.output


def test_a_farm_of_devices_under_one_key_measures_at_once(tmp_path):
    """Two RPC servers (this machine) registered under one key: the tuner's runner gets one
    worker per device, tuning over the tracker records real measurements, and both devices
    served sessions (each server prints a line per session with --log-sessions)."""
    from rpc_helpers import free_port, start_server, start_tracker

    from mosc.compiler.passes import import_onnx
    from mosc.compiler.tune import check_tracker, rpc_runner, tune

    path = tmp_path / "mlp.onnx"
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64)).eval()
    torch.onnx.export(mlp, (torch.randn(4, 64),), path, input_names=["x"], output_names=["y"], dynamo=False)
    tracker, port = start_tracker()
    servers = []
    try:
        for _ in range(2):
            servers.append(start_server(port, "farm", argv=[sys.executable, "-m", "mosc.device.server", "serve",
                                                             "--tracker", f"127.0.0.1:{port}", "--key", "farm",
                                                             "--port", str(free_port()), "--log-sessions"]))
        target = load_target("host").with_rpc(f"127.0.0.1:{port}", "farm")  # given explicitly: measured over RPC
        deadline = time.time() + 60  # start_server returns once the key is there: the first one
        while check_tracker(target) < 2 and time.time() < deadline:
            time.sleep(0.2)
        assert target.needs_rpc and check_tracker(target) == 2
        assert rpc_runner(target).pool._threadpool._max_workers == 2  # one measuring worker per device
        report = tune([import_onnx(path)], target, tmp_path / "db", trials=16, progress=False)
        assert report.trials >= 8 and report.tuned >= 1, report
        sessions = []
        for s in servers:  # stop it, then read what it printed
            os.killpg(s.p.pid, signal.SIGKILL)
            s.p.wait(timeout=10)
            sessions.append(s.p.stdout.read().count("session connected from"))
    finally:
        for s in servers:
            s.kill()
        tracker.kill()
    assert all(n > 0 for n in sessions), sessions

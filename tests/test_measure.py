"""Measurement: HAT's protocol and statistics, local and over real RPC on 127.0.0.1, the CLI,
and faults (device killed mid-run, tracker down, session timeout) with resumable runs.

Artifacts are tiny (space tiny, source 8 tokens, 4 decoder steps, --no-tune), built once for
the module in a private cache; a test target file gives the short protocol.
"""

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psutil
import pytest

from rpc_helpers import REPO, free_port, hold_write_lock, host_test_env, rpc_device, start_server, start_tracker

from mosc.device.protocol import run_protocol, summarize

N_SAMPLE = 2  # archs of `--sample 2 --seed 0` (built once for the module: ~12 s each on busy cores)
CLI = "from mosc.cli import app; app()"  # `mosc ...` in a subprocess, with this interpreter
PROTOCOL = {"source_len": 8, "decoder_steps": 4, "batch": 1, "warmup": 1, "repeats": 60, "trim": 0.1}


# ----------------------------------------------------------------------------- pure functions
def test_module_does_not_import_torch_or_tvm():
    code = ("import sys, mosc.device.protocol, mosc.device.backends, mosc.device.campaign, mosc.device.db, "
            "mosc.device.server; print(sorted(m for m in ('torch', 'tvm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def test_summarize_trims_each_tail():
    x = list(range(1, 11))  # trim 0.1 of 10 runs: drop 1 and 10
    s = summarize(x, 0.1, enc_ms=[1.0] * 10, dec_ms=[v - 1.0 for v in x])
    assert s["trimmed_mean_ms"] == pytest.approx(5.5) and s["latency_ms"] == s["trimmed_mean_ms"]
    assert s["mean_ms"] == pytest.approx(5.5) and s["min_ms"] == 1 and s["max_ms"] == 10
    assert s["median_ms"] == pytest.approx(5.5) and s["p90_ms"] == pytest.approx(np.percentile(range(2, 10), 90))
    assert s["std_ms"] == pytest.approx(np.std(x, ddof=1)) and s["encoder_ms"] == 1.0
    outlier = summarize([1.0] * 9 + [100.0], 0.1)
    assert outlier["trimmed_mean_ms"] == 1.0 and outlier["mean_ms"] > 10


def test_protocol_feeds_caches_back_in_order():
    calls = []

    def encode():
        return 0.001, "cross"

    def step(pos, caches, cross):
        k, v = caches
        calls.append((pos, k, v, cross))
        return 0.002, (k + 1, v + 10)

    enc, dec = run_protocol(encode, step, lambda: (0, 0), steps=4, warmup=2, repeats=3)
    assert len(enc) == len(dec) == 3 and dec[0] == pytest.approx(8.0) and enc[0] == pytest.approx(1.0)
    first = calls[:4]
    assert [c[0] for c in first] == [0, 1, 2, 3]  # positions 0..N-1
    assert [c[1] for c in first] == [0, 1, 2, 3] and [c[2] for c in first] == [0, 10, 20, 30]  # outputs fed back
    assert len(calls) == 4 * 5 and calls[4][1] == 0  # every run starts from an empty cache


# ----------------------------------------------------------------------------- retries
class _MemoryDB:
    path = pending_path = ":memory:"

    def __init__(self):
        self.rows = []

    def has(self, *key):
        return False

    def insert_or_keep(self, row):
        self.rows.append(row)
        return len(self.rows)


def _fake_campaign(monkeypatch, measure=None, log=None, db=None):
    """A Campaign (backend torch, this machine) whose timing is a stub, and its in-memory DB."""
    from mosc.compiler.targets import Protocol
    from mosc.device import campaign
    from mosc.device.protocol import Measurement

    shapes = {"batch": 1, "source_len": 8, "decoder_steps": 4}

    def timed(backend, prep, protocol, remote):
        return Measurement.of_runs([1.0, 1.1, 1.2], [2.0, 2.1, 2.2], 1, 0.1, shapes, "stub"), None

    monkeypatch.setattr(campaign, "measure_prepared", measure or timed)
    target = SimpleNamespace(name="host", protocol=Protocol(**PROTOCOL))
    db = _MemoryDB() if db is None else db
    return campaign.Campaign(target, "torch", db, backoff_s=0, log=log or (lambda m: None)), db


def _failing(*errors, then=None):
    """A callable that raises errors[0], errors[1], ... on successive calls, then returns `then`."""
    calls = []

    def fn(*args):
        calls.append(args)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return then

    return fn, calls


def _arch():
    from mosc.space import SearchSpace

    return SearchSpace.load("tiny").smallest()


def test_campaign_does_not_retry_a_bug(monkeypatch):
    from mosc.device.backends import Prepared

    camp, db = _fake_campaign(monkeypatch)
    prepare, calls = _failing(KeyError("d_model"), then=Prepared())
    with pytest.raises(KeyError, match="d_model"):
        camp.run([_arch()], prepare)
    assert len(calls) == 1 and db.rows == []
    measure, calls = _failing(TypeError("bad argument"))
    camp, db = _fake_campaign(monkeypatch, measure=measure)
    with pytest.raises(TypeError):
        camp.run([_arch()], lambda a: Prepared())
    assert len(calls) == 1 and db.rows == []


def test_campaign_does_not_retry_a_user_error(monkeypatch):
    from mosc.device.backends import Prepared
    from mosc.errors import MoscError

    measure, calls = _failing(MoscError("artifact lacks graph(s) ['decoder']"))
    camp, db = _fake_campaign(monkeypatch, measure=measure)
    with pytest.raises(MoscError, match="lacks graph"):
        camp.run([_arch()], lambda a: Prepared())
    assert len(calls) == 1 and db.rows == []


def test_campaign_retries_connection_failures(monkeypatch):
    from mosc.device.backends import Prepared
    from mosc.errors import MoscError

    logged = []
    camp, db = _fake_campaign(monkeypatch, log=logged.append)
    prepare, calls = _failing(ConnectionError("tracker gone"), ConnectionError("tracker gone"), then=Prepared())
    res = camp.run([_arch()], prepare)
    assert len(calls) == 3 and len(res.measured) == 1 and len(db.rows) == 1
    assert sum("try " in m and "tracker gone" in m for m in logged) == 2
    measure, calls = _failing(*[TimeoutError("timed out")] * 3)  # every try fails: one line, nothing saved
    camp, db = _fake_campaign(monkeypatch, measure=measure)
    with pytest.raises(MoscError, match="after 3 tries: TimeoutError: timed out; 0 arch"):
        camp.run([_arch()], lambda a: Prepared())
    assert len(calls) == 3 and db.rows == []


def test_campaign_keeps_every_measurement_while_the_database_is_locked(monkeypatch, tmp_path):
    """Another process holds the write lock through the inserts: each row goes to the side file
    with a warning, every arch is still measured, and the next writer merges them all."""
    from mosc.device.backends import Prepared
    from mosc.device.db import LatencyDB
    from mosc.space import SearchSpace

    path = tmp_path / "lat.db"
    LatencyDB(path).close()
    archs = [SearchSpace.load("tiny").smallest(), SearchSpace.load("tiny").largest()]
    logged = []
    holder = hold_write_lock(path)
    try:
        with LatencyDB(path, busy_timeout_s=0.3, log=logged.append) as db:
            camp, _ = _fake_campaign(monkeypatch, log=logged.append, db=db)
            res = camp.run(archs, lambda a: Prepared())
            assert len(res.measured) == 2 and res.kept == 2 and all(r["id"] is None for r in res.measured)
            assert "2 of them kept in" in camp.saved_where()
    finally:
        holder.kill()
        holder.wait()
    assert sum("stayed locked" in m and "kept in" in m for m in logged) == 2, logged
    assert sum(m.startswith("[") and "ms trimmed mean" in m for m in logged) == 2  # both archs measured
    with LatencyDB(path, readonly=False, log=logged.append) as db:
        rows = db.query("host")
        assert {r["arch_hash"] for r in rows} == {a.hash for a in archs} and len(rows) == 2
    assert not (tmp_path / "lat.db.pending.jsonl").exists()


def test_ctrl_c_during_measure_says_what_was_kept(monkeypatch, tmp_path):
    import random

    from mosc.device.backends import Prepared
    from mosc.errors import Interrupted
    from mosc.jobs.measure import measure_into_db
    from mosc.space import SearchSpace

    camp, _ = _fake_campaign(monkeypatch)  # the stub timer, installed in mosc.device.campaign
    space = SearchSpace.load("tiny")
    archs = [space.smallest(), space.largest(), space.sample(random.Random(3))]
    calls = []

    def prepare(arch, backend):
        calls.append(arch)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return Prepared()

    db = tmp_path / "lat.db"
    with pytest.raises(Interrupted) as e:
        measure_into_db(camp.target, archs, SimpleNamespace(prepare=prepare), db, backend="torch", log=lambda m: None)
    assert str(e.value) == (f"interrupted: 1 arch(s) measured and saved in {db}; run the same command again to "
                            "measure the remaining 2")
    assert e.value.exit_code == 130 and len(db_rows(db)) == 1


def test_foreign_architecture_is_refused_before_upload(monkeypatch, tmp_path):
    """An x86-64 artifact and an aarch64 device: one line at once, nothing sent."""
    from mosc.device import backends
    from mosc.errors import MoscError
    from mosc.rpc import Remote

    art = tmp_path / "art"
    art.mkdir()
    elf = bytearray(64)
    elf[:6] = b"\x7fELF\x02\x01"
    elf[18:20] = (62).to_bytes(2, "little")  # EM_X86_64
    (art / "encoder.so").write_bytes(bytes(elf))
    manifest = {"target": "host", "device": "cpu", "graphs": {"encoder": {"file": "encoder.so"}}}
    monkeypatch.setattr("mosc.compiler.artifact.read_manifest", lambda d: manifest)
    monkeypatch.setattr(backends, "connect", lambda remote: object())
    monkeypatch.setattr(backends, "device_info", lambda sess: {"machine": "aarch64", "hostname": "pi"})

    def no_upload(*a, **k):
        raise AssertionError("uploaded anyway")

    monkeypatch.setattr("mosc.compiler.artifact.load_artifact", no_upload)
    with pytest.raises(MoscError, match=r"holds x86_64 code \(compiled for target 'host'\), but device 'rpi4' is "
                                        r"aarch64: compile it for that device's target"):
        backends.measure_artifact(art, None, Remote("127.0.0.1", 9, "rpi4"))
    # the same machine, spelled differently, passes the check
    backends.check_machine(art, manifest, {"machine": "AMD64"}, "this machine")


def test_device_failure_tells_transport_from_bugs():
    import socket

    import tvm.error
    import tvm_ffi

    from mosc.errors import MoscError
    from mosc.rpc import device_failure

    def from_tvm(kind, msg):  # an exception as TVM's FFI raises it
        return tvm_ffi.core.Error(kind, msg, "").py_error()

    dropped = from_tvm("InternalError", "Socket SockChannel::Send Error:Broken pipe")
    assert device_failure(dropped, over_session=True) and not device_failure(dropped)
    for e in (ConnectionError("refused"), socket.timeout(), TimeoutError(), OSError(104, "reset"),
              tvm.error.RPCError("remote"), tvm.error.RPCSessionTimeoutError("expired")):
        assert device_failure(e), e
    for e in (KeyError("k"), TypeError(), ValueError(), AttributeError(), AssertionError(), MoscError("x"),
              FileNotFoundError("x.so"), from_tvm("TypeError", "mismatched argument"), RuntimeError("ours")):
        assert not device_failure(e, over_session=True), e


def test_machine_info_is_the_one_description():
    from mosc.device.server import own_info
    from mosc.regress import environment
    from mosc.rpc import device_info, machine_info

    m = machine_info()
    assert set(m) >= {"hostname", "machine", "system", "release", "python", "cpus", "emulated"}
    assert device_info() == m
    assert own_info().items() >= m.items() and own_info()["pid"] == os.getpid()
    assert environment().items() >= m.items()


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Environment of the CLI runs: a test target (short protocol), private caches."""
    work = tmp_path_factory.mktemp("measure")
    return {**host_test_env(work, PROTOCOL), "MOSC_LATENCY_DB": str(work / "default.db")}


@pytest.fixture(scope="module")
def archs(env):
    """The archs of `--sample N_SAMPLE --seed 0`, with their artifacts and exports built into the cache."""
    os.environ.update({k: env[k] for k in ("MOSC_TARGETS_DIR", "MOSC_ARTIFACT_CACHE")})
    try:
        from mosc.jobs.artifacts import ArtifactCache, ModelSource, sample_archs
        from mosc.space import SearchSpace
        from mosc.compiler.targets import load_target

        archs = sample_archs(SearchSpace.load("tiny"), N_SAMPLE, 0)
        cache = ArtifactCache(load_target("host"), ModelSource(), tune=False,
                              tune_db=Path(env["MOSC_TUNE_DIR"]), log=lambda m: None)
        for a in archs:
            cache.prepare(a, "tvm")
        return archs
    finally:
        for k in ("MOSC_TARGETS_DIR", "MOSC_ARTIFACT_CACHE"):
            os.environ.pop(k, None)


def mosc(env, *args, timeout=120):
    return subprocess.run([sys.executable, "-c", CLI, *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=REPO)


def one_error_line(stderr: str) -> str:
    errors = [l for l in stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and stderr.strip().splitlines()[-1] == errors[0], stderr
    return errors[0]


def db_rows(path):
    con = sqlite3.connect(path)
    con.row_factory = sqlite3.Row
    return con.execute("SELECT * FROM measurements ORDER BY id").fetchall()


# ----------------------------------------------------------------------------- measuring
def inproc(env, *args):
    """The CLI in this process (saves a tvm+torch import per call); stderr kept apart."""
    from typer.testing import CliRunner

    from mosc.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args], env=env)
    if r.exception and not isinstance(r.exception, SystemExit):
        raise r.exception
    return SimpleNamespace(returncode=r.exit_code, stdout=r.stdout, stderr=r.stderr)


def test_measure_local_records_everything(env, archs, tmp_path):
    (tmp_path / "a.json").write_text(archs[0].to_json())
    db = tmp_path / "lat.db"
    r = inproc(env, "measure", "-t", "host", "--arch", tmp_path / "a.json", "--no-tune", "--db", db)
    assert r.returncode == 0, r.stderr
    assert "randomly initialised" in r.stderr and "latency does not depend on weight values" in r.stderr
    assert "compiling" not in r.stderr  # the cached artifact was reused
    (row,) = db_rows(db)
    assert row["arch_hash"] == archs[0].hash and json.loads(row["arch_json"]) == archs[0].to_dict()
    assert row["backend"] == "tvm" and row["device_key"].startswith("local:") and row["emulated"] == 0
    assert row["runs"] == PROTOCOL["repeats"] and len(json.loads(row["samples"])) == PROTOCOL["repeats"]
    assert (row["source_len"], row["decoder_steps"], row["batch"]) == (8, 4, 1)
    assert 0 < row["min_ms"] <= row["median_ms"] <= row["p90_ms"] <= row["max_ms"]
    assert row["encoder_ms"] > 0 and row["decoder_ms"] > 0 and row["artifact_sha256"] and "apache-tvm 0.27" in row["tvm_version"]
    extra = json.loads(row["extra"])
    assert "device clock" in extra["method"] and extra["protocol"] == "translate-call/1"
    # one translate call per run; the kernels alone (encoder + 4 x one step call) beside it
    assert len(extra["kernel_samples"]) == PROTOCOL["repeats"] and extra["kernel_ms"] > 0
    assert "kernels alone" in r.stdout
    # same command again: nothing to do; --force measures again
    r = inproc(env, "measure", "-t", "host", "--arch", tmp_path / "a.json", "--no-tune", "--db", db)
    assert r.returncode == 0 and "measured 0, skipped 1" in r.stdout, r.stdout + r.stderr
    # ort on the same arch: side-by-side rows
    r = inproc(env, "measure", "-t", "host", "--arch", tmp_path / "a.json", "--backend", "ort", "--db", db)
    assert r.returncode == 0, r.stderr
    rows = db_rows(db)
    assert [x["backend"] for x in rows] == ["tvm", "ort"] and rows[1]["arch_hash"] == archs[0].hash


def test_measure_torch_backend(env, archs, tmp_path):
    from mosc.compiler.targets import Protocol
    from mosc.device.backends import measure_torch
    from mosc.jobs.artifacts import ArtifactCache, ModelSource

    sub = ArtifactCache.__new__(ArtifactCache)
    sub.source, sub._supernet = ModelSource(), None
    m = measure_torch(sub.subnet(archs[1]), Protocol(**{**PROTOCOL, "repeats": 5}), 1, 8, 4)
    assert len(m.total_ms) == 5 and m.stats["trimmed_mean_ms"] > 0 and "torch" in m.method


def test_rpc_matches_local_path(env, archs):
    """The same measure_tvm over RPC; the device says it is not emulated."""
    from mosc.compiler.artifact import load_artifact
    from mosc.device.backends import measure_tvm
    from mosc.rpc import Remote, connect, device_info
    from mosc.compiler.targets import Protocol

    art_dir = next(Path(env["MOSC_ARTIFACT_CACHE"]).glob(f"host/{archs[0].hash}-*/art"))
    p = Protocol(**{**PROTOCOL, "repeats": 10})
    with rpc_device("k-rpc") as (port, _):
        sess = connect(Remote("127.0.0.1", port, "k-rpc"))
        info = device_info(sess)
        assert info["emulated"] is False and info["machine"]
        m = measure_tvm(load_artifact(art_dir, "cpu", session=sess), p)
    assert len(m.total_ms) == 10 and m.stats["median_ms"] > 0 and m.shapes["decoder_steps"] == 4


def test_tracker_down_is_one_line_quickly(env, tmp_path):
    t0 = time.monotonic()
    r = mosc(env, "measure", "-t", "host", "--sample", "2", "--no-tune", "--db", tmp_path / "l.db",
             "--tracker", f"127.0.0.1:{free_port()}", "--key", "nobody")
    assert r.returncode == 2
    line = one_error_line(r.stderr)
    assert "no RPC tracker answers" in line and "after 3 tries" in line, line
    assert time.monotonic() - t0 < 20


@pytest.mark.slow
def test_unknown_key_is_one_line(env, tmp_path):
    with rpc_device("present") as (port, _):
        r = mosc(env, "measure", "-t", "host", "--sample", "1", "--no-tune", "--db", tmp_path / "l.db",
                 "--tracker", f"127.0.0.1:{port}", "--key", "absent", "--tries", "1")
    assert r.returncode == 2
    assert "no device with key 'absent'" in one_error_line(r.stderr) and "present" in r.stderr


def test_server_killed_mid_run_then_resume(env, archs, tmp_path):
    """Kill the device during `--sample N`: finished archs are in the DB, one error line, exit 2;
    a re-run with a new server measures only the rest."""
    db = tmp_path / "lat.db"
    args = ["measure", "-t", "host", "--sample", N_SAMPLE, "--no-tune", "--db", db, "--key", "dev"]
    tracker, port = start_tracker()
    server = None
    try:
        server = start_server(port, "dev")
        run = subprocess.Popen([sys.executable, "-c", CLI, *map(str, args), "--tracker", f"127.0.0.1:{port}"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and run.poll() is None:
            try:  # one arch saved and the next one's RPC session running: kill mid-measurement
                if db.exists() and len(db_rows(db)) >= 1 and psutil.Process(server.p.pid).children():
                    break
            except sqlite3.OperationalError:  # created, table not there yet
                pass
            time.sleep(0.05)
        server.kill()  # the device drops (its session process with it)
        out, err = run.communicate(timeout=90)
        assert run.returncode == 2, out + err
        line = one_error_line(err)
        assert "after 3 tries" in line and "re-run" in line, line
        done = {r["arch_hash"] for r in db_rows(db)}
        assert 1 <= len(done) < N_SAMPLE and done <= {a.hash for a in archs}

        server = start_server(port, "dev")  # a new device under the same key
        r = mosc(env, *args, "--tracker", f"127.0.0.1:{port}")
        assert r.returncode == 0, r.stderr
        assert f"measured {N_SAMPLE - len(done)}, skipped {len(done)}" in r.stdout, r.stdout
        rows = db_rows(db)
        assert len(rows) == N_SAMPLE and {x["arch_hash"] for x in rows} == {a.hash for a in archs}
        assert all(x["device_key"] == "dev" for x in rows)
    finally:
        if server:
            server.kill()
        tracker.kill()


@pytest.mark.slow
def test_session_timeout_is_retried_then_reported(env, archs, tmp_path):
    (tmp_path / "a.json").write_text(archs[0].to_json())
    slow = {**env}  # a protocol that cannot finish in a 1 s session
    tdir = tmp_path / "targets"
    tdir.mkdir()
    text = Path(env["MOSC_TARGETS_DIR"], "host.toml").read_text().replace("repeats = 60", "repeats = 3000")
    (tdir / "host.toml").write_text(text)
    slow["MOSC_TARGETS_DIR"] = str(tdir)
    with rpc_device("slow") as (port, _):
        r = mosc(slow, "measure", "-t", "host", "--arch", tmp_path / "a.json", "--no-tune", "--db", tmp_path / "l.db",
                 "--tracker", f"127.0.0.1:{port}", "--key", "slow", "--timeout", "1", "--tries", "2")
    assert r.returncode == 2
    line = one_error_line(r.stderr)
    assert "after 2 tries" in line and "try 1/2" in r.stderr, r.stderr
    assert not (tmp_path / "l.db").exists() or not db_rows(tmp_path / "l.db")

"""The latency database: schema, WAL, concurrent writers, HAT import, export, the predictor query."""

import csv
import json
import multiprocessing as mp
import random
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mosc.cli import app
from mosc.device.db import HAT_BACKEND, LatencyDB
from mosc.errors import MoscError
from mosc.space import HAT_FEATURE_NAMES, SearchSpace

HAT_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "hat-latency"
HAT_PI = HAT_DIR / "wmt14ende_cpu_raspberrypi_all.csv"


def _record(arch, latency=1.0, **kw):
    return {"target": "host", "backend": "tvm", "device_key": "local:test", "arch_hash": arch.hash,
            "arch_json": arch.to_json(), "features": arch.hat_features(), "latency_ms": latency,
            "samples": [latency] * 3, "runs": 3, "batch": 1, "source_len": 30, "decoder_steps": 30, **kw}


def _archs(n, seed=0):
    s = SearchSpace.load("tiny")
    rng = random.Random(seed)
    return [s.sample(rng) for _ in range(n)]


def test_schema_wal_and_roundtrip(tmp_path):
    a, b = _archs(2)
    with LatencyDB(tmp_path / "lat.db") as db:
        assert db.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        db.insert(_record(a, 2.0))
        db.insert(_record(b, 3.0, emulated=True, device_key="rpi4"))
        assert db.has(a.hash, "host", "tvm", "local:test")
        assert not db.has(a.hash, "host", "ort", "local:test")
        assert not db.has(a.hash, "host", "tvm", "local:test", protocol={"source_len": 8})
        rows = db.rows("host")  # emulated rows are left out unless asked
        assert [r.arch for r in rows] == [a] and rows[0].latency_ms == 2.0
        assert rows[0].features == a.hat_features()
        assert {r.arch for r in db.rows("host", include_emulated=True)} == {a, b}
        raw = db.query("host", include_emulated=True)
        assert json.loads(raw[0]["samples"]) == [2.0] * 3 and raw[1]["emulated"] == 1
    # a second open sees the committed rows
    with LatencyDB(tmp_path / "lat.db") as db:
        assert db.count() == 2


def test_bad_records_are_refused(tmp_path):
    (a,) = _archs(1)
    with LatencyDB(tmp_path / "lat.db") as db:
        with pytest.raises(MoscError, match="unknown field"):
            db.insert({**_record(a), "colour": "red"})
        with pytest.raises(MoscError, match="lacks"):
            db.insert({k: v for k, v in _record(a).items() if k != "latency_ms"})
        assert db.count() == 0


def _writer(path, worker, n):
    s = SearchSpace.load("tiny")
    rng = random.Random(worker)
    with LatencyDB(path) as db:
        for i in range(n):
            db.insert(_record(s.sample(rng), float(worker * 1000 + i), device_key=f"w{worker}"))


def test_concurrent_writers_lose_nothing(tmp_path):
    path = tmp_path / "lat.db"
    LatencyDB(path).close()
    ctx = mp.get_context("spawn")  # fresh interpreters: separate connections, real lock contention
    procs = [ctx.Process(target=_writer, args=(path, w, 40)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    with LatencyDB(path) as db:
        assert db.count() == 160
        got = sorted(r["latency_ms"] for r in db.query())
        assert got == sorted(float(w * 1000 + i) for w in range(4) for i in range(40))
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"


@pytest.mark.skipif(not HAT_PI.exists(), reason=f"HAT latency data not found at {HAT_DIR} (../shared/data)")
def test_import_hat_export_and_stats(tmp_path):
    runner = CliRunner()
    db = tmp_path / "lat.db"
    r = runner.invoke(app, ["db", "import-hat", str(HAT_PI), "--target", "rpi4", "--db", str(db)])
    assert r.exit_code == 0, r.output
    with open(HAT_PI) as f:
        src = list(csv.DictReader(f))
    assert f"imported {len(src)} rows" in r.output
    r = runner.invoke(app, ["db", "import-hat", str(HAT_PI), "--target", "rpi4", "--db", str(db)])
    assert "already imported" in r.output  # idempotent
    (a,) = _archs(1)
    with LatencyDB(db) as ldb:
        assert ldb.count() == len(src)
        ldb.insert({**_record(a, 5.0), "target": "rpi4", "device_key": "rpi4", "emulated": True})
        rows = ldb.rows("rpi4")
        assert len(rows) == len(src) and all(r.arch is None and r.backend == HAT_BACKEND for r in rows)
        first = src[0]
        assert rows[0].features == [float(first[c]) for c in HAT_FEATURE_NAMES]
        assert rows[0].latency_ms == pytest.approx(float(first["latency_mean_encoder"]) + float(first["latency_mean_decoder"]))
    out = tmp_path / "out.csv"
    r = runner.invoke(app, ["db", "export", "--out", str(out), "--target", "rpi4", "--db", str(db)])
    assert r.exit_code == 0 and f"wrote {len(src) + 1} rows" in r.output, r.output
    with open(out) as f:
        exported = list(csv.DictReader(f))
    assert set(HAT_FEATURE_NAMES) <= set(exported[0]) and exported[0]["arch_json"] == ""
    assert exported[-1]["emulated"] == "1" and json.loads(exported[-1]["arch_json"]) == a.to_dict()
    r = runner.invoke(app, ["db", "stats", "--db", str(db)], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "hat-pytorch" in r.output and "features only" in r.output, r.output
    assert "hat:wmt14ende_cpu_raspberrypi_all" in r.output and "2000" in r.output


def test_import_rejects_a_non_hat_csv(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    r = CliRunner().invoke(app, ["db", "import-hat", str(bad), "--target", "x", "--db", str(tmp_path / "l.db")])
    assert r.exit_code == 2 and "not a HAT latency CSV" in r.output

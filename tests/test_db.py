"""The latency database: schema, WAL, concurrent writers, HAT import, export, the predictor query."""

import csv
import json
import multiprocessing as mp
import os
import random
import shutil
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rpc_helpers import hold_write_lock

from mosc.cli import app
from mosc.device.db import HAT_BACKEND, LatencyDB
from mosc.device.protocol import GRAPH_CALLS, TRANSLATE_CALL
from mosc.errors import MoscError
from mosc.space import HAT_FEATURE_NAMES, SearchSpace

HAT_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "hat-latency"
HAT_PI = HAT_DIR / "wmt14ende_cpu_raspberrypi_all.csv"


def _record(arch, latency=1.0, **kw):
    return {"target": "host", "backend": "tvm", "device_key": "local:test", "arch_hash": arch.hash,
            "arch_json": arch.to_json(), "features": arch.hat_features(), "latency_ms": latency,
            "samples": [latency] * 3, "runs": 3, "batch": 1, "source_len": 30, "decoder_steps": 30,
            "extra": {"protocol": TRANSLATE_CALL}, **kw}


def test_old_protocol_tvm_rows_are_refused_for_refits(tmp_path):
    """tvm rows timed per graph call (before artifacts compiled their loop) never feed a fit: refused in
    one line while an arch has only such a row, left out once it was measured again; has() does not
    count them, so `mosc measure` re-measures those archs on its own."""
    a, b = _archs(2)
    with LatencyDB(tmp_path / "lat.db") as db:
        db.insert(_record(a, 2.0, extra={"method": "per graph call"}))  # what an older mosc wrote
        db.insert(_record(b, 3.0))
        assert not db.has(a.hash, "host", "tvm", "local:test") and db.has(b.hash, "host", "tvm", "local:test")
        with pytest.raises(MoscError, match=r"1 tvm row\(s\) of target 'host' were timed per graph call") as e:
            db.rows("host")
        assert "\n" not in str(e.value) and "re-measure" in str(e.value)
        db.insert(_record(a, 2.5))
        assert sorted(r.latency_ms for r in db.rows("host")) == [2.5, 3.0]
        db.insert({**_record(a, 9.0), "backend": "ort", "extra": {"protocol": GRAPH_CALLS}})  # not tvm: kept
        assert sorted(r.latency_ms for r in db.rows("host")) == [2.5, 3.0, 9.0]


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
            db.insert(_record(s.sample(rng), float(worker * 1000 + i + 1), device_key=f"w{worker}"))


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
        assert got == sorted(float(w * 1000 + i + 1) for w in range(4) for i in range(40))
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


# ----------------------------------------------------------------------------- a locked database
def test_locked_database_keeps_rows_aside_then_merges_them_once(tmp_path):
    path = tmp_path / "lat.db"
    a, b, c = _archs(3)
    logged = []
    with LatencyDB(path, busy_timeout_s=0.3, log=logged.append) as db:
        db.insert(_record(a, 1.0))
        holder = hold_write_lock(path)
        try:
            with pytest.raises(MoscError, match="stayed locked"):
                db.insert(_record(b, 2.0))  # insert() itself never hides a failure
            assert db.insert_or_keep(_record(b, 2.0)) is None
            assert db.insert_or_keep(_record(c, 3.0)) is None
            assert db.count() == 1  # reads go on while another process writes
        finally:
            holder.kill()
            holder.wait()
    assert any("kept in" in m and "pending.jsonl" in m for m in logged), logged
    pending = tmp_path / "lat.db.pending.jsonl"
    kept = pending.read_text()
    assert len(kept.splitlines()) == 2
    with LatencyDB(path) as db:  # opening to read merges nothing and writes nothing
        assert db.count() == 1 and pending.exists()
    with LatencyDB(path, readonly=False, log=logged.append) as db:  # the next writer merges them
        assert db.count() == 3 and not pending.exists()
        assert sorted(r.latency_ms for r in db.rows("host")) == [1.0, 2.0, 3.0]
    assert any("merged 2 measurement(s)" in m for m in logged), logged
    # merged rows that come back (a crash between the commit and the removal) are not added twice
    pending.write_text(kept + '{"cut short')
    with LatencyDB(path, readonly=False, log=logged.append) as db:
        assert db.count() == 3 and not pending.exists()
    assert any("incomplete" in m for m in logged)


def test_corrupt_pending_file_is_one_line(tmp_path):
    path = tmp_path / "lat.db"
    LatencyDB(path).close()
    (tmp_path / "lat.db.pending.jsonl").write_text('{"target": "host"}\n')
    with pytest.raises(MoscError, match=r"pending measurements file .* line 1 is not a kept measurement"):
        LatencyDB(path, readonly=False)


# ----------------------------------------------------------------------------- reading never writes
def _foreign_sqlite(path):
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE songs (title TEXT)")
    con.execute("INSERT INTO songs VALUES ('x')")
    con.commit()
    con.close()
    return path


def _snapshot(path):
    con = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
    try:
        tables = sorted(r[0] for r in con.execute("SELECT name FROM sqlite_master"))
        return path.read_bytes(), tables, con.execute("PRAGMA journal_mode").fetchone()[0]
    finally:
        con.close()


def test_read_commands_refuse_a_foreign_sqlite_file_and_leave_it_alone(tmp_path):
    from mosc.search.predictor import read_db

    other = _foreign_sqlite(tmp_path / "music.sqlite")
    before = _snapshot(other)
    runner = CliRunner()
    for args in (["db", "stats"], ["db", "export", "--out", str(tmp_path / "o.csv")]):
        r = runner.invoke(app, [*args, "--db", str(other)])
        assert r.exit_code == 2, r.output
        errors = [l for l in r.output.splitlines() if l.strip()]
        assert len(errors) == 1 and "is an SQLite database but not a mosc latency database" in errors[0], r.output
    for readonly in (True, None, False):
        with pytest.raises(MoscError, match="not a mosc latency database"):
            LatencyDB(other, readonly=readonly)
    with pytest.raises(MoscError, match="not a mosc latency database"):
        read_db(other, "host", "tiny")
    assert _snapshot(other) == before  # no table created, journal mode untouched, not a byte changed
    assert before[2] == "delete" and not (tmp_path / "o.csv").exists()


def test_read_commands_refuse_a_file_that_is_not_sqlite(tmp_path):
    junk = tmp_path / "notes.db"
    junk.write_text("these are not the rows you are looking for\n" * 50)
    before = junk.read_bytes()
    r = CliRunner().invoke(app, ["db", "stats", "--db", str(junk)])
    assert r.exit_code == 2 and "not an SQLite file" in r.output, r.output
    with pytest.raises(MoscError, match="not an SQLite file"):
        LatencyDB(junk, readonly=False)
    assert junk.read_bytes() == before


def test_read_only_database_file_is_readable(tmp_path):
    path = tmp_path / "lat.db"
    (a,) = _archs(1)
    with LatencyDB(path) as db:
        db.insert(_record(a, 2.5))
    path.chmod(0o444)
    try:
        with LatencyDB(path, readonly=True) as db:
            assert db.count() == 1 and db.rows("host")[0].latency_ms == 2.5
        r = CliRunner().invoke(app, ["db", "stats", "--db", str(path)], env={"COLUMNS": "200"})
        assert r.exit_code == 0 and "local:test" in r.output, r.output
        r = CliRunner().invoke(app, ["db", "export", "--db", str(path), "--out", str(tmp_path / "o.csv")])
        assert r.exit_code == 0 and "wrote 1 rows" in r.output, r.output
        with LatencyDB(path, readonly=True) as db:
            with pytest.raises(MoscError, match="opened read-only"):
                db.insert(_record(a, 1.0))
        if os.geteuid() != 0:  # root writes anyway
            with pytest.raises(MoscError, match="is read-only"):
                LatencyDB(path, readonly=False)
    finally:
        path.chmod(0o644)


READ_AS_NOBODY = """
import sys
sys.path.insert(0, sys.argv[1])
from mosc.device.db import LatencyDB
with LatencyDB(sys.argv[2], readonly=True) as db:
    print(db.count(), db.rows("host")[0].latency_ms)
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv to read as nobody")
def test_read_only_database_in_a_read_only_folder_is_readable_by_another_user():
    """SQLite cannot create the -shm file of a WAL database there: the file alone is read."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="mosc-ro-", dir="/tmp"))  # pytest's tmp_path is root's only
    try:
        _read_as_nobody(folder)
    finally:
        folder.chmod(0o755)
        shutil.rmtree(folder)


def _read_as_nobody(folder):
    import subprocess
    import sys

    (a,) = _archs(1)
    with LatencyDB(folder / "lat.db") as db:
        db.insert(_record(a, 2.5))
    assert sorted(p.name for p in folder.iterdir()) == ["lat.db"]  # a clean close leaves no -wal/-shm
    (folder / "lat.db").chmod(0o444)
    folder.chmod(0o555)
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
                        READ_AS_NOBODY, str(Path(__file__).resolve().parents[1]), str(folder / "lat.db")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.split() == ["1", "2.5"], r.stdout + r.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["lat.db"]


def test_export_of_a_database_missing_a_column_is_one_line(tmp_path):
    path = tmp_path / "lat.db"
    (a,) = _archs(1)
    with LatencyDB(path) as db:
        db.insert(_record(a))
    con = sqlite3.connect(path)
    con.execute("ALTER TABLE measurements DROP COLUMN host")
    con.commit()
    con.close()
    r = CliRunner().invoke(app, ["db", "export", "--db", str(path), "--out", str(tmp_path / "o.csv")])
    assert r.exit_code == 2 and "lacks the column(s) host" in r.output and "Traceback" not in r.output, r.output
    assert len([l for l in r.output.splitlines() if l.strip()]) == 1


def test_a_poisoned_row_names_itself_instead_of_crashing_a_fit(tmp_path):
    path = tmp_path / "lat.db"
    (a,) = _archs(1)
    with LatencyDB(path) as db:
        rid = db.insert(_record(a))
        db.conn.execute("UPDATE measurements SET features = ? WHERE id = ?",  # as an old mosc let in
                        (json.dumps([float("nan")] + a.hat_features()[1:]), rid))
        with pytest.raises(MoscError, match=f"row id {rid} .*encoder_embed_dim = nan"):
            db.rows("host")


# ----------------------------------------------------------------------------- HAT CSV checks
HAT_COLUMNS = HAT_FEATURE_NAMES + ["latency_mean_encoder", "latency_mean_decoder", "latency_std_encoder",
                                   "latency_std_decoder"]
GOOD_ROW = ["512", "6", "2048", "8", "512", "6", "2048", "8", "8", "1", "10.5", "120.25", "0.1", "2.0"]


def _hat_csv(path, rows, bom=False, encoding="utf-8"):
    text = ",".join(HAT_COLUMNS) + "\n" + "".join(",".join(r) + "\n" for r in rows)
    path.write_bytes(("\ufeff" if bom else "").encode() + text.encode(encoding))
    return path


@pytest.mark.parametrize("column, value, needle", [
    ("encoder_embed_dim", "nan", "encoder_embed_dim = nan"),
    ("decoder_layer_num", "inf", "decoder_layer_num = inf"),
    ("encoder_ffn_embed_dim_avg", "1e12", "encoder_ffn_embed_dim_avg = 1000000000000.0"),
    ("latency_mean_encoder", "nan", "latency_mean_encoder = nan"),
    ("latency_mean_decoder", "-inf", "latency_mean_decoder = -inf"),
    ("latency_mean_decoder", "0", "latency_mean_decoder = 0.0"),
    ("latency_mean_decoder", "2e6", "latency_mean_decoder = 2000000.0"),
    ("latency_std_encoder", "-1", "latency_std_encoder = -1.0"),
    ("decoder_embed_dim", "lots", "decoder_embed_dim = 'lots' is not a number"),
])
def test_import_refuses_non_finite_or_absurd_values_with_the_line(tmp_path, column, value, needle):
    bad = list(GOOD_ROW)
    bad[HAT_COLUMNS.index(column)] = value
    csv_file = _hat_csv(tmp_path / "hat.csv", [GOOD_ROW, bad, GOOD_ROW])
    db = tmp_path / "l.db"
    r = CliRunner().invoke(app, ["db", "import-hat", str(csv_file), "--target", "rpi4", "--db", str(db)])
    assert r.exit_code == 2, r.output
    lines = [l for l in r.output.splitlines() if l.strip()]
    assert len(lines) == 1 and f"hat.csv:3: {needle}" in lines[0], r.output
    assert not db.exists() or LatencyDB(db, readonly=True).count() == 0  # nothing imported


def test_import_reads_a_csv_with_a_bom_and_refuses_non_utf8(tmp_path):
    db = tmp_path / "l.db"
    r = CliRunner().invoke(app, ["db", "import-hat", str(_hat_csv(tmp_path / "bom.csv", [GOOD_ROW] * 3, bom=True)),
                                 "--target", "rpi4", "--db", str(db)])
    assert r.exit_code == 0 and "imported 3 rows" in r.output, r.output
    with LatencyDB(db) as ldb:
        assert [x.features[0] for x in ldb.rows("rpi4")] == [512.0] * 3
    latin = _hat_csv(tmp_path / "latin.csv", [GOOD_ROW], encoding="utf-8")
    latin.write_bytes(latin.read_bytes().replace(b"512", b"5\xe912", 1))
    r = CliRunner().invoke(app, ["db", "import-hat", str(latin), "--target", "rpi4", "--db", str(db)])
    assert r.exit_code == 2 and "is not UTF-8 text (line 2" in r.output, r.output
    assert len([l for l in r.output.splitlines() if l.strip()]) == 1


def test_import_takes_a_csv_without_std_columns(tmp_path):
    text = ",".join(HAT_COLUMNS[:-2]) + "\n" + ",".join(GOOD_ROW[:-2]) + "\n"
    (tmp_path / "nostd.csv").write_text(text)
    with LatencyDB(tmp_path / "l.db") as db:
        assert db.import_hat_csv(tmp_path / "nostd.csv", "rpi4") == 1
        (row,) = db.query("rpi4")
        assert row["latency_ms"] == pytest.approx(130.75) and row["encoder_std_ms"] is None

"""The latency database: one SQLite file, one row per measurement, nothing ever lost.

    LatencyDB(path)            open (create) the database; WAL mode, busy timeout
    db.insert(record)          one measurement -> one row, committed at once
    db.has(...)                was this arch measured on this target/backend/device already?
    db.rows(target, ...)       the predictor's view: (HAT features, arch or None, latency_ms)
    db.import_hat_csv(...)     HAT's published measurements (features only, no arch)
    db.export_csv(...), db.stats()

Schema (table `measurements`): every measured row carries the arch's canonical JSON and
hash; rows imported from HAT's CSVs have only the 10 HAT features (`arch_json` and
`arch_hash` are NULL) and backend "hat-pytorch". `features` (JSON list, HAT column order,
see mosc.space.HAT_FEATURE_NAMES) is filled for every row, so a predictor can train on
both kinds. `latency_ms` is the headline number: the trimmed mean of whole translations
(encoder + decoder steps), HAT's statistic. `emulated` = 1 marks timings taken under qemu:
they are never returned by `rows()` unless asked (`include_emulated=True`).

Concurrency: WAL journal (readers never block the writer), `busy_timeout` so that writers
from several processes queue instead of failing, and every insert is its own short
`BEGIN IMMEDIATE` transaction. Pure Python (sqlite3): no torch, no tvm.
"""

from __future__ import annotations

import csv
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from mosc.errors import MoscError
from mosc.fileio import sha256_file
from mosc.space import HAT_FEATURE_NAMES, Arch

SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 60_000
HAT_BACKEND = "hat-pytorch"
STAT_FIELDS = ("mean_ms", "trimmed_mean_ms", "median_ms", "p90_ms", "std_ms", "min_ms", "max_ms")

# Column name -> SQL type. The order is the CSV export's column order.
COLUMNS: dict[str, str] = {
    "id": "INTEGER PRIMARY KEY AUTOINCREMENT",
    "timestamp": "TEXT NOT NULL",  # ISO 8601, UTC
    "target": "TEXT NOT NULL",
    "backend": "TEXT NOT NULL",  # tvm, ort, torch, hat-pytorch
    "device_key": "TEXT NOT NULL",  # tracker key, "local:<hostname>", or "hat:<csv stem>"
    "emulated": "INTEGER NOT NULL DEFAULT 0",  # 1: timed under qemu, meaningless as speed
    "arch_hash": "TEXT",  # NULL for feature-only (imported) rows
    "arch_json": "TEXT",  # canonical JSON (Arch.to_json()); NULL for feature-only rows
    "features": "TEXT NOT NULL",  # JSON list of the 10 HAT features (raw, HAT column order)
    "batch": "INTEGER",
    "source_len": "INTEGER",
    "decoder_steps": "INTEGER",
    "latency_ms": "REAL NOT NULL",  # headline: trimmed mean of encoder + all decoder steps
    "mean_ms": "REAL",
    "trimmed_mean_ms": "REAL",
    "median_ms": "REAL",
    "p90_ms": "REAL",
    "std_ms": "REAL",
    "min_ms": "REAL",
    "max_ms": "REAL",
    "encoder_ms": "REAL",  # trimmed mean of the encoder part
    "decoder_ms": "REAL",  # trimmed mean of the decoder part (all steps)
    "encoder_std_ms": "REAL",
    "decoder_std_ms": "REAL",
    "runs": "INTEGER",  # timed runs (before trimming)
    "warmup": "INTEGER",
    "trim": "REAL",
    "samples": "TEXT",  # JSON list of per-run totals in ms (NULL for imports)
    "artifact_sha256": "TEXT",  # sha256 of the artifact's manifest.json (tvm) or of the ONNX files (ort)
    "tvm_version": "TEXT",
    "host": "TEXT",  # JSON: the measuring client and, over RPC, what the device said about itself
    "source": "TEXT",  # where the row came from: "mosc measure", "hat:<file> sha256:<...>"
    "extra": "TEXT",  # JSON: anything else (timing method, tuning, weights)
}
REQUIRED = ("target", "backend", "device_key", "features", "latency_ms")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True)
class LatencyRow:
    """One row as the predictor sees it."""

    features: list[float]  # the 10 HAT features, raw
    arch: Arch | None  # None for imported feature-only rows
    latency_ms: float
    backend: str
    device_key: str
    emulated: bool


class LatencyDB:
    """A latency database file. Cheap to open; safe to use from several processes at once."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
            self.conn.row_factory = sqlite3.Row
            self.conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = self.conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise MoscError(f"latency database {self.path}: cannot switch to WAL mode (got {mode})")
            self.conn.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: durable at checkpoints, never corrupt
            self._create()
        except sqlite3.DatabaseError as e:
            raise MoscError(f"latency database {self.path}: {e}") from None

    # ---- schema ---------------------------------------------------------------------
    def _create(self) -> None:
        cols = ",\n  ".join(f"{k} {v}" for k, v in COLUMNS.items())
        with self._tx():
            self.conn.execute(f"CREATE TABLE IF NOT EXISTS measurements (\n  {cols}\n)")
            self.conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            self.conn.execute("CREATE INDEX IF NOT EXISTS by_arch ON measurements "
                              "(arch_hash, target, backend, device_key, emulated)")
            self.conn.execute("CREATE INDEX IF NOT EXISTS by_target ON measurements (target, emulated)")
        version = self.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
        if int(version) != SCHEMA_VERSION:
            raise MoscError(f"latency database {self.path} has schema version {version}, this mosc reads {SCHEMA_VERSION}")

    class _Tx:
        def __init__(self, conn):
            self.conn = conn

        def __enter__(self):
            self.conn.execute("BEGIN IMMEDIATE")  # take the write lock now (waits up to busy_timeout)
            return self.conn

        def __exit__(self, exc_type, *_):
            self.conn.execute("ROLLBACK" if exc_type else "COMMIT")

    def _tx(self):
        return self._Tx(self.conn)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()

    # ---- writing --------------------------------------------------------------------
    @staticmethod
    def _row(record: dict[str, Any]) -> dict[str, Any]:
        unknown = set(record) - set(COLUMNS)
        if unknown:
            raise MoscError(f"latency record has unknown field(s) {sorted(unknown)}")
        row = {k: v for k, v in record.items() if k != "id"}
        row.setdefault("timestamp", _now())
        for k in ("features", "samples", "host", "extra"):
            if k in row and row[k] is not None and not isinstance(row[k], str):
                row[k] = json.dumps(row[k], sort_keys=True)
        missing = [k for k in REQUIRED if row.get(k) is None]
        if missing:
            raise MoscError(f"latency record lacks {missing}")
        row["emulated"] = int(bool(row.get("emulated", 0)))
        return row

    def insert(self, record: dict[str, Any]) -> int:
        """Insert one measurement and commit. Returns its id."""
        return self.insert_many([record])[0]

    def insert_many(self, records: Iterable[dict[str, Any]]) -> list[int]:
        """Insert rows in one transaction (all or nothing). Returns their ids."""
        rows = [self._row(r) for r in records]
        ids = []
        with self._tx() as c:
            for row in rows:
                keys = list(row)
                cur = c.execute(f"INSERT INTO measurements ({', '.join(keys)}) VALUES ({', '.join('?' * len(keys))})",
                                [row[k] for k in keys])
                ids.append(cur.lastrowid)
        return ids

    # ---- reading ----------------------------------------------------------------------
    def has(self, arch_hash: str, target: str, backend: str, device_key: str, emulated: bool = False,
            protocol: dict | None = None) -> bool:
        """True when this arch already has a measurement for target/backend/device (and protocol shapes)."""
        sql = ("SELECT 1 FROM measurements WHERE arch_hash = ? AND target = ? AND backend = ? AND device_key = ? "
               "AND emulated = ?")
        args: list[Any] = [arch_hash, target, backend, device_key, int(bool(emulated))]
        for k in ("batch", "source_len", "decoder_steps"):
            if protocol and protocol.get(k) is not None:
                sql += f" AND {k} = ?"
                args.append(protocol[k])
        return self.conn.execute(sql + " LIMIT 1", args).fetchone() is not None

    def query(self, target: str | None = None, *, backend: str | None = None, device_key: str | None = None,
              include_emulated: bool = False, emulated_only: bool = False) -> list[sqlite3.Row]:
        """Raw rows (sqlite3.Row, by column name), oldest first. Emulated rows only when asked."""
        sql, args = "SELECT * FROM measurements WHERE 1=1", []
        for col, val in (("target", target), ("backend", backend), ("device_key", device_key)):
            if val is not None:
                sql += f" AND {col} = ?"
                args.append(val)
        if emulated_only:
            sql += " AND emulated = 1"
        elif not include_emulated:
            sql += " AND emulated = 0"
        return self.conn.execute(sql + " ORDER BY id", args).fetchall()

    def rows(self, target: str, *, backend: str | None = None, device_key: str | None = None,
             include_emulated: bool = False) -> list[LatencyRow]:
        """The predictor's training data for a target: features (+ arch when known) -> latency_ms.

        Real measurements only, unless include_emulated=True (emulated timings are not speeds).
        """
        out = []
        for r in self.query(target, backend=backend, device_key=device_key, include_emulated=include_emulated):
            out.append(LatencyRow(
                features=json.loads(r["features"]),
                arch=Arch.from_json(r["arch_json"]) if r["arch_json"] else None,
                latency_ms=r["latency_ms"], backend=r["backend"], device_key=r["device_key"],
                emulated=bool(r["emulated"]),
            ))
        return out

    def count(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM measurements").fetchone()[0]

    def stats(self) -> list[dict]:
        """One summary per (target, backend, device_key, emulated): rows, archs, latency range."""
        cur = self.conn.execute(
            "SELECT target, backend, device_key, emulated, COUNT(*) AS n, COUNT(DISTINCT arch_hash) AS archs, "
            "MIN(latency_ms) AS lo, AVG(latency_ms) AS avg, MAX(latency_ms) AS hi, MAX(timestamp) AS last "
            "FROM measurements GROUP BY target, backend, device_key, emulated ORDER BY target, backend, device_key, emulated")
        return [dict(r) for r in cur.fetchall()]

    # ---- import / export ------------------------------------------------------------
    def import_hat_csv(self, csv_path: str | Path, target: str, *, force: bool = False) -> int:
        """Import one of HAT's latency CSVs as feature-only rows. Returns the number of rows added.

        Each row: features = the 10 HAT columns; encoder/decoder means and stds; latency_ms =
        encoder + decoder mean (HAT's trimmed means). A file already imported for this target
        (same sha256) is skipped unless force=True (which replaces its rows).
        """
        csv_path = Path(csv_path)
        if not csv_path.is_file():
            raise MoscError(f"no such CSV file: {csv_path}")
        digest = sha256_file(csv_path)
        source = f"hat:{csv_path.name} sha256:{digest}"
        n_old = self.conn.execute("SELECT COUNT(*) FROM measurements WHERE source = ? AND target = ?",
                                  (source, target)).fetchone()[0]
        if n_old and not force:
            return 0
        lat_cols = ["latency_mean_encoder", "latency_mean_decoder", "latency_std_encoder", "latency_std_decoder"]
        records = []
        with open(csv_path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in HAT_FEATURE_NAMES + lat_cols if c not in (reader.fieldnames or [])]
            if missing:
                raise MoscError(f"{csv_path}: not a HAT latency CSV (missing columns {missing})")
            for i, r in enumerate(reader, start=2):
                try:
                    feats = [float(r[c]) for c in HAT_FEATURE_NAMES]
                    enc, dec, enc_sd, dec_sd = (float(r[c]) for c in lat_cols)
                except (TypeError, ValueError):
                    raise MoscError(f"{csv_path}:{i}: not a number in {dict(r)}") from None
                records.append({
                    "target": target, "backend": HAT_BACKEND, "device_key": f"hat:{csv_path.stem}",
                    "features": feats, "latency_ms": enc + dec, "trimmed_mean_ms": enc + dec,
                    "encoder_ms": enc, "decoder_ms": dec, "encoder_std_ms": enc_sd, "decoder_std_ms": dec_sd,
                    "batch": 1, "source_len": 30, "decoder_steps": 30, "trim": 0.1, "source": source,
                    "extra": {"csv_row": i},
                })
        if not records:
            raise MoscError(f"{csv_path}: no rows")
        rows = [self._row(r) for r in records]
        with self._tx() as c:  # replace + insert atomically
            c.execute("DELETE FROM measurements WHERE source = ? AND target = ?", (source, target))
            keys = list(rows[0])
            c.executemany(f"INSERT INTO measurements ({', '.join(keys)}) VALUES ({', '.join('?' * len(keys))})",
                          [[row[k] for k in keys] for row in rows])
        return len(rows)

    def export_csv(self, out: str | Path, *, target: str | None = None, include_emulated: bool = True) -> int:
        """Write rows as CSV (features expanded into HAT's 10 named columns). Returns rows written."""
        import io

        from mosc.fileio import atomic_write_text

        rows = self.query(target, include_emulated=include_emulated)
        cols = [c for c in COLUMNS if c != "features"]
        at = list(COLUMNS).index("features")  # the 10 feature columns go where `features` is
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(cols[:at] + HAT_FEATURE_NAMES + cols[at:])
        for r in rows:
            vals = [r[c] for c in cols]
            w.writerow(vals[:at] + json.loads(r["features"]) + vals[at:])
        atomic_write_text(out, buf.getvalue())
        return len(rows)

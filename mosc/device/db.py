"""The latency database: one SQLite file, one row per measurement, nothing ever lost.

    LatencyDB(path)            open a database: read-only until the first write (a new file is
                               created for writing); readonly=True never writes, False opens for
                               writing at once (creating it, merging kept rows)
    db.insert(record)          one measurement -> one row, committed at once
    db.insert_or_keep(record)  the same, but a database locked for too long keeps the row in the
                               side file <db>.pending.jsonl (merged in when it next opens for writing)
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

Opening never changes a file that is not already a mosc database: reading goes through a
read-only connection (SQLite URI mode=ro: no table created, journal mode untouched, a
read-only file is fine), and a file without mosc's schema is refused with one line before
anything is written to it.

Concurrency: WAL journal (readers never block the writer), `busy_timeout` so that writers
from several processes queue instead of failing, and every insert is its own short
`BEGIN IMMEDIATE` transaction. A measurement is never lost to a lock held too long: it is
appended (fsync'd) to the side file, whose rows are merged in, once each, by the next
writer. Pure Python (sqlite3): no torch, no tvm.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import math
import os
import sqlite3
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mosc.device.protocol import TRANSLATE_CALL
from mosc.errors import MoscError
from mosc.fileio import parse_json, read_csv, read_text, sha256_file
from mosc.space import HAT_FEATURE_NAMES, Arch

SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 60.0  # longest wait for the write lock, all tries of one insert together
WRITE_TRIES = 3  # attempts of one insert while the database is locked
PENDING_SUFFIX = ".pending.jsonl"  # rows kept while the database was locked: <db>.pending.jsonl
HAT_BACKEND = "hat-pytorch"
MAX_LATENCY_MS = 1e6  # a latency this long (17 minutes for one translation) is a unit or data error
# HAT feature -> (lowest, highest) a real Transformer can have; outside: a corrupt or unit-shifted file
FEATURE_BOUNDS = {
    "encoder_embed_dim": (1, 1e5), "encoder_layer_num": (1, 1e3), "encoder_ffn_embed_dim_avg": (1, 1e6),
    "encoder_self_attention_heads_avg": (1, 1e4), "decoder_embed_dim": (1, 1e5), "decoder_layer_num": (1, 1e3),
    "decoder_ffn_embed_dim_avg": (1, 1e6), "decoder_self_attention_heads_avg": (1, 1e4),
    "decoder_ende_attention_heads_avg": (1, 1e4), "decoder_arbitrary_ende_attn_avg": (-1, 1e3),
}
assert list(FEATURE_BOUNDS) == HAT_FEATURE_NAMES

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


def _protocol(r: sqlite3.Row) -> str | None:
    """What one timed run of a row was (mosc.device.protocol; None: not recorded, an older mosc)."""
    try:
        return (json.loads(r["extra"] or "{}") or {}).get("protocol")
    except (TypeError, ValueError, AttributeError):
        return None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _is_locked(e: sqlite3.Error) -> bool:
    """SQLITE_BUSY / SQLITE_LOCKED: another connection holds the lock (worth waiting for)."""
    return getattr(e, "sqlite_errorcode", None) in (5, 6) or "locked" in str(e) or "busy" in str(e)


class DatabaseLocked(MoscError):
    """The write lock stayed with another process through every try."""


def bad_features(features) -> str | None:
    """Why a features value is not 10 finite HAT features within FEATURE_BOUNDS, or None."""
    if not isinstance(features, list) or len(features) != len(HAT_FEATURE_NAMES):
        return f"features must be a list of {len(HAT_FEATURE_NAMES)} numbers"
    for name, v in zip(HAT_FEATURE_NAMES, features):
        lo, hi = FEATURE_BOUNDS[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
            return f"{name} = {v!r} is not a finite number in [{lo:g}, {hi:g}]"
    return None


def bad_latency(name: str, v, allow_zero: bool = False) -> str | None:
    """Why a latency (ms) is not a finite number in (0, MAX_LATENCY_MS) ([0, ...) with allow_zero), or None."""
    ok = (not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
          and (v >= 0 if allow_zero else v > 0) and v < MAX_LATENCY_MS)
    return None if ok else f"{name} = {v!r} is not a finite latency in {'[' if allow_zero else '('}0, {MAX_LATENCY_MS:g}) ms"


@dataclass(frozen=True)
class LatencyRow:
    """One row as the predictor sees it."""

    features: list[float]  # the 10 HAT features, raw
    arch: Arch | None  # None for imported feature-only rows
    latency_ms: float
    backend: str
    device_key: str
    emulated: bool


@contextlib.contextmanager
def _flocked(path: Path, create: bool):
    """An fd of `path` (append mode) under an exclusive flock, or None when it does not exist
    (and create is False). Re-opens when the file was replaced or removed while waiting, so a
    row is never appended to a file another process has just merged and removed."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | (os.O_CREAT if create else 0), 0o666)
        except FileNotFoundError:
            yield None
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield fd
    finally:
        os.close(fd)


class LatencyDB:
    """A latency database file. Cheap to open; safe to use from several processes at once.

    readonly: True never writes (URI mode=ro; a missing file or one without mosc's schema is a
    MoscError); False opens for writing now (creates the file and its tables, WAL mode, merges
    rows kept in the side file); None (default) reads through a read-only connection and opens
    for writing at the first write, or at once when the file does not exist yet.
    """

    def __init__(self, path: str | Path, readonly: bool | None = None, *, busy_timeout_s: float = BUSY_TIMEOUT_S,
                 log: Callable[[str], None] | None = None):
        self.path = Path(path)
        self.readonly, self.busy_timeout_s, self.log = readonly, busy_timeout_s, log or _stderr
        self.writable = False
        self.conn: sqlite3.Connection | None = None
        try:
            if self.path.is_dir():
                raise MoscError(f"latency database {self.path} is a folder, not a file")
            exists = self.path.is_file() and self.path.stat().st_size > 0
        except OSError as e:  # a folder on the way that this user may not enter
            raise MoscError(f"cannot read latency database {self.path} ({e.strerror or e})") from None
        if readonly or (readonly is None and exists):
            self._open_readonly()
        else:
            self._open_for_writing()

    @property
    def pending_path(self) -> Path:
        """The side file of rows kept while the database could not take them."""
        return self.path.with_name(self.path.name + PENDING_SUFFIX)

    # ---- opening ----------------------------------------------------------------------
    def _connect(self, readonly: bool, immutable: bool = False) -> sqlite3.Connection:
        uri = self.path.absolute().as_uri() + "?mode=ro" + ("&immutable=1" if immutable else "")
        where, kw = (uri, {"uri": True}) if readonly else (str(self.path), {})
        conn = sqlite3.connect(where, timeout=self.busy_timeout_s, isolation_level=None, **kw)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
        return conn

    def _error(self, e: sqlite3.Error) -> MoscError:
        if "not a database" in str(e):
            return MoscError(f"{self.path} is not a mosc latency database (not an SQLite file: {e})")
        return MoscError(f"latency database {self.path}: {e}")

    def _open_readonly(self) -> None:
        if not self.path.exists():
            raise MoscError(f"no latency database at {self.path}")
        try:
            self.conn = self._connect(readonly=True)
            try:
                has_schema = self._check_schema()
            except sqlite3.OperationalError:
                if not self._wal_is_empty():
                    raise
                # a WAL database in a folder this user cannot write: SQLite cannot create its -shm
                # file. With no -wal content the file alone is the whole database: read it as is.
                self.close()
                self.conn = self._connect(readonly=True, immutable=True)
                has_schema = self._check_schema()
            if not has_schema:
                raise MoscError(f"{self.path} is not a mosc latency database (an SQLite file without tables)")
        except sqlite3.Error as e:
            self.close()
            raise self._error(e) from None
        except MoscError:
            self.close()
            raise

    def _wal_is_empty(self) -> bool:
        wal = self.path.with_name(self.path.name + "-wal")
        return not wal.exists() or wal.stat().st_size == 0

    def _open_for_writing(self) -> None:
        """(Re)open with a read-write connection: create a new file's tables, WAL mode, merge kept rows.
        A file that is an SQLite database of something else is refused before anything is written."""
        if self.readonly:
            raise MoscError(f"latency database {self.path} was opened read-only")
        if self.path.exists() and not os.access(self.path, os.W_OK):
            raise MoscError(f"latency database {self.path} is read-only (no write permission); storing "
                            "measurements needs a writable file")
        self.close()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = self._connect(readonly=False)
            has_schema = self._check_schema()
            mode = self.conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise MoscError(f"latency database {self.path}: cannot switch to WAL mode (got {mode})")
            self.conn.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: durable at checkpoints, never corrupt
            if not has_schema:
                self._create()
        except sqlite3.Error as e:
            self.close()
            raise self._error(e) from None
        except OSError as e:
            self.close()
            raise MoscError(f"cannot create latency database {self.path} ({e.strerror or e})") from None
        except MoscError:
            self.close()
            raise
        self.writable = True
        self.merge_pending()

    def _writable(self) -> None:
        if not self.writable:
            self._open_for_writing()

    # ---- schema ---------------------------------------------------------------------
    def _check_schema(self) -> bool:
        """True when the file holds mosc's tables (version and columns checked), False when it
        holds no table at all; MoscError for an SQLite file of anything else."""
        tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                  if not r[0].startswith("sqlite_")}
        if not tables:
            return False
        if not {"measurements", "meta"} <= tables:
            raise MoscError(f"{self.path} is an SQLite database but not a mosc latency database "
                            f"(its tables: {', '.join(sorted(tables))})")
        cols = {r["name"] for r in self.conn.execute("PRAGMA table_info(measurements)")}
        missing = [c for c in COLUMNS if c not in cols]
        if missing:
            raise MoscError(f"latency database {self.path}: table 'measurements' lacks the column(s) "
                            f"{', '.join(missing)} (not mosc's schema)")
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None or str(row[0]) != str(SCHEMA_VERSION):
            raise MoscError(f"latency database {self.path} has schema version {row[0] if row else None}, "
                            f"this mosc reads {SCHEMA_VERSION}")
        return True

    def _create(self) -> None:
        cols = ",\n  ".join(f"{k} {v}" for k, v in COLUMNS.items())
        with self._tx():
            self.conn.execute(f"CREATE TABLE IF NOT EXISTS measurements (\n  {cols}\n)")
            self.conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            self.conn.execute("CREATE INDEX IF NOT EXISTS by_arch ON measurements "
                              "(arch_hash, target, backend, device_key, emulated)")
            self.conn.execute("CREATE INDEX IF NOT EXISTS by_target ON measurements (target, emulated)")

    @contextlib.contextmanager
    def _tx(self):
        """One write transaction: BEGIN IMMEDIATE takes the write lock now (waiting up to busy_timeout)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
            self.conn.execute("COMMIT")
        except BaseException:
            if self.conn.in_transaction:  # a failed COMMIT leaves the transaction open
                self.conn.execute("ROLLBACK")
            raise

    def _write(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """fn(conn) in one write transaction. While another process holds the write lock it is tried
        WRITE_TRIES times, busy_timeout_s in all; DatabaseLocked after that, MoscError on any other failure."""
        self._writable()
        per_try = self.busy_timeout_s / WRITE_TRIES
        self.conn.execute(f"PRAGMA busy_timeout = {max(1, int(per_try * 1000))}")
        try:
            for attempt in range(1, WRITE_TRIES + 1):
                try:
                    with self._tx() as c:
                        return fn(c)
                except sqlite3.OperationalError as e:
                    if not _is_locked(e):
                        raise self._error(e) from None
                if attempt < WRITE_TRIES:
                    time.sleep(min(0.5, per_try / 4))  # a lock refused without waiting (recovery) gets a pause
        except sqlite3.Error as e:
            raise self._error(e) from None
        finally:
            self.conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
        raise DatabaseLocked(f"latency database {self.path} stayed locked for {self.busy_timeout_s:g} s "
                             f"({WRITE_TRIES} tries): another process holds its write lock")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        self.writable = False

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()

    # ---- writing --------------------------------------------------------------------
    @staticmethod
    def _row(record: dict[str, Any]) -> dict[str, Any]:
        """A record checked and made ready for SQL (JSON columns as text); MoscError when it is not a measurement."""
        unknown = set(record) - set(COLUMNS)
        if unknown:
            raise MoscError(f"latency record has unknown field(s) {sorted(unknown)}")
        row = {k: v for k, v in record.items() if k != "id"}
        row.setdefault("timestamp", _now())
        missing = [k for k in REQUIRED if row.get(k) is None]
        if missing:
            raise MoscError(f"latency record lacks {missing}")
        feats = row["features"]
        if isinstance(feats, str):
            feats = parse_json(feats, "latency record features", list)
        why = bad_features(feats) or bad_latency("latency_ms", row["latency_ms"])
        if why:
            raise MoscError(f"latency record: {why}")
        for k in ("features", "samples", "host", "extra"):
            if k in row and row[k] is not None and not isinstance(row[k], str):
                row[k] = json.dumps(row[k], sort_keys=True)
        row["emulated"] = int(bool(row.get("emulated", 0)))
        return row

    @staticmethod
    def _insert_rows(c: sqlite3.Connection, rows: list[dict[str, Any]]) -> list[int]:
        ids = []
        for row in rows:
            keys = list(row)
            cur = c.execute(f"INSERT INTO measurements ({', '.join(keys)}) VALUES ({', '.join('?' * len(keys))})",
                            [row[k] for k in keys])
            ids.append(cur.lastrowid)
        return ids

    def insert(self, record: dict[str, Any]) -> int:
        """Insert one measurement and commit. Returns its id."""
        return self.insert_many([record])[0]

    def insert_many(self, records: Iterable[dict[str, Any]]) -> list[int]:
        """Insert rows in one transaction (all or nothing). Returns their ids. DatabaseLocked when
        another process kept the write lock through every try."""
        rows = [self._row(r) for r in records]
        return self._write(lambda c: self._insert_rows(c, rows))

    def insert_or_keep(self, record: dict[str, Any]) -> int | None:
        """insert(record), or, when the database cannot take it (locked through every try, or a
        write failing), the row appended to pending_path and a warning logged: None then. The
        next time the database opens for writing, the kept rows are merged in."""
        row = self._row(record)
        try:
            return self._write(lambda c: self._insert_rows(c, [row]))[0]
        except MoscError as e:
            self._keep(row, str(e))
            return None

    def _keep(self, row: dict[str, Any], why: str) -> None:
        """Append the row (with a pending_id, so that merging it twice adds it once) to pending_path, fsync'd."""
        try:
            extra = json.loads(row["extra"]) if row.get("extra") else {}
        except ValueError:
            extra = {"extra": row["extra"]}
        extra = extra if isinstance(extra, dict) else {"extra": extra}
        row = {**row, "extra": json.dumps({**extra, "pending_id": uuid.uuid4().hex}, sort_keys=True)}
        data = (json.dumps(row, sort_keys=True) + "\n").encode()
        try:
            with _flocked(self.pending_path, create=True) as fd:
                while data:
                    data = data[os.write(fd, data):]
                os.fsync(fd)
            dfd = os.open(self.pending_path.parent, os.O_RDONLY)  # the file's name is durable too
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            raise MoscError(f"{why}; keeping the measurement in {self.pending_path} failed too "
                            f"({e.strerror or e})") from None
        self.log(f"  warning: {why}; the measurement is kept in {self.pending_path} and merged into the "
                 "database the next time it is opened for writing")

    def merge_pending(self) -> int:
        """Insert the rows kept in pending_path (each once: a row already in, by its pending_id, is
        skipped), then remove the file. While the database stays locked the file stays for the next
        writer. Returns the number of rows added."""
        if not self.pending_path.exists():
            return 0
        with _flocked(self.pending_path, create=False) as fd:
            if fd is None:
                return 0
            rows = self._read_pending()

            def add(c):
                return self._insert_rows(c, [r for r in rows if not self._merged(c, r)])

            try:
                added = self._write(add)
            except DatabaseLocked:
                self.log(f"  warning: {len(rows)} measurement(s) kept in {self.pending_path} are not merged yet: "
                         "the database is still locked (the next writer merges them)")
                return 0
            self.pending_path.unlink()
        if added:
            self.log(f"merged {len(added)} measurement(s) kept in {self.pending_path} into {self.path}")
        return len(added)

    @staticmethod
    def _merged(c: sqlite3.Connection, row: dict[str, Any]) -> bool:
        pid = json.loads(row["extra"])["pending_id"]
        return c.execute("SELECT 1 FROM measurements WHERE extra LIKE ? LIMIT 1",
                         (f'%"pending_id": "{pid}"%',)).fetchone() is not None

    def _read_pending(self) -> list[dict[str, Any]]:
        """The rows of pending_path; a last line cut short (a crash mid-append) is dropped with a warning."""
        what = f"pending measurements file {self.pending_path}"
        lines = read_text(self.pending_path, "pending measurements file").split("\n")
        if lines[-1].strip():
            self.log(f"  warning: {what}: its last line is incomplete (a write cut short) and is dropped")
        rows = []
        for i, line in enumerate(lines[:-1], 1):
            if not line.strip():
                continue
            rec = parse_json(line, f"{what} line {i}")
            try:
                row = self._row(rec)
                json.loads(row["extra"])["pending_id"]
            except (MoscError, ValueError, KeyError, TypeError) as e:
                raise MoscError(f"{what} line {i} is not a kept measurement ({e}): fix or remove that line") from None
            rows.append(row)
        return rows

    # ---- reading ----------------------------------------------------------------------
    def _select(self, sql: str, args: Iterable[Any] = ()) -> list[sqlite3.Row]:
        try:
            return self.conn.execute(sql, list(args)).fetchall()
        except sqlite3.Error as e:
            raise self._error(e) from None

    def has(self, arch_hash: str, target: str, backend: str, device_key: str, emulated: bool = False,
            protocol: dict | None = None) -> bool:
        """True when this arch already has a measurement for target/backend/device (and protocol shapes);
        for tvm, one of the artifact's translate call (a row of an older protocol does not count)."""
        sql = ("SELECT 1 FROM measurements WHERE arch_hash = ? AND target = ? AND backend = ? AND device_key = ? "
               "AND emulated = ?")
        args: list[Any] = [arch_hash, target, backend, device_key, int(bool(emulated))]
        if backend == "tvm":
            sql += " AND json_extract(extra, '$.protocol') = ?"
            args.append(TRANSLATE_CALL)
        for k in ("batch", "source_len", "decoder_steps"):
            if protocol and protocol.get(k) is not None:
                sql += f" AND {k} = ?"
                args.append(protocol[k])
        return bool(self._select(sql + " LIMIT 1", args))

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
        return self._select(sql + " ORDER BY id", args)

    def _features(self, r: sqlite3.Row) -> list[float]:
        """A row's features, checked: a bad row names itself instead of crashing a predictor fit."""
        try:
            feats = json.loads(r["features"])
        except (TypeError, ValueError):
            feats = r["features"]
        why = bad_features(feats) or bad_latency("latency_ms", r["latency_ms"])
        if why:
            raise MoscError(f"latency database {self.path}: row id {r['id']} ({r['source'] or r['backend']}): {why}; "
                            f"delete it (sqlite3 {self.path} 'DELETE FROM measurements WHERE id = {r['id']}')")
        return feats

    def rows(self, target: str, *, backend: str | None = None, device_key: str | None = None,
             include_emulated: bool = False) -> list[LatencyRow]:
        """The predictor's training data for a target: features (+ arch when known) -> latency_ms.

        Real measurements only, unless include_emulated=True (emulated timings are not speeds).
        tvm rows timed before artifacts compiled their decode loop (per graph call: kernel time,
        not what a user waits for) are left out where the same arch has a new row, and refused
        (MoscError) where it has none: a fit must not mix the two.
        """
        out, rows = [], self.query(target, backend=backend, device_key=device_key, include_emulated=include_emulated)
        current = {(r["arch_hash"], r["device_key"]) for r in rows if _protocol(r) == TRANSLATE_CALL}
        old = [r for r in rows if r["backend"] == "tvm" and _protocol(r) != TRANSLATE_CALL]
        stale = [r for r in old if (r["arch_hash"], r["device_key"]) not in current]
        if stale:
            raise MoscError(f"latency database {self.path}: {len(stale)} tvm row(s) of target {target!r} were timed per "
                            "graph call by an older mosc (kernel time, not the compiled translate call): re-measure "
                            f"them (mosc measure --target {target} ...; those archs are measured again on their own)")
        for r in rows:
            if r["backend"] == "tvm" and _protocol(r) != TRANSLATE_CALL:
                continue
            out.append(LatencyRow(
                features=self._features(r),
                arch=Arch.from_json(r["arch_json"]) if r["arch_json"] else None,
                latency_ms=r["latency_ms"], backend=r["backend"], device_key=r["device_key"],
                emulated=bool(r["emulated"]),
            ))
        return out

    def count(self) -> int:
        return self._select("SELECT COUNT(*) FROM measurements")[0][0]

    def stats(self) -> list[dict]:
        """One summary per (target, backend, device_key, emulated): rows, archs, latency range."""
        return [dict(r) for r in self._select(
            "SELECT target, backend, device_key, emulated, COUNT(*) AS n, COUNT(DISTINCT arch_hash) AS archs, "
            "MIN(latency_ms) AS lo, AVG(latency_ms) AS avg, MAX(latency_ms) AS hi, MAX(timestamp) AS last "
            "FROM measurements GROUP BY target, backend, device_key, emulated ORDER BY target, backend, device_key, emulated")]

    # ---- import / export ------------------------------------------------------------
    def import_hat_csv(self, csv_path: str | Path, target: str, *, force: bool = False) -> int:
        """Import one of HAT's latency CSVs as feature-only rows. Returns the number of rows added.

        Each row: features = the 10 HAT columns; encoder/decoder means (and stds, when the file has them); latency_ms =
        encoder + decoder mean (HAT's trimmed means). A file already imported for this target
        (same sha256) is skipped unless force=True (which replaces its rows). A row that is not
        finite numbers within sane bounds is refused with its line number (nothing imported).
        """
        csv_path = Path(csv_path)
        records = _hat_records(csv_path, target)
        source = records[0]["source"]
        n_old = self._select("SELECT COUNT(*) FROM measurements WHERE source = ? AND target = ?", (source, target))[0][0]
        if n_old and not force:
            return 0
        rows = [self._row(r) for r in records]

        def replace(c):  # replace + insert atomically
            c.execute("DELETE FROM measurements WHERE source = ? AND target = ?", (source, target))
            keys = list(rows[0])
            c.executemany(f"INSERT INTO measurements ({', '.join(keys)}) VALUES ({', '.join('?' * len(keys))})",
                          [[row[k] for k in keys] for row in rows])

        self._write(replace)
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
            w.writerow(vals[:at] + self._features(r) + vals[at:])
        atomic_write_text(out, buf.getvalue())
        return len(rows)


HAT_LATENCY_COLUMNS = ["latency_mean_encoder", "latency_mean_decoder"]
HAT_STD_COLUMNS = ["latency_std_encoder", "latency_std_decoder"]  # optional: NULL when a CSV has none


def _number(row: dict, column: str, where: str) -> float:
    try:
        return float(row[column])
    except (TypeError, ValueError):  # None: a row with fewer cells than the header
        raise MoscError(f"{where}: {column} = {row[column]!r} is not a number") from None


def _hat_records(csv_path: Path, target: str) -> list[dict[str, Any]]:
    """The latency records of a HAT CSV, every value checked (MoscError naming the line)."""
    if not csv_path.is_file():
        raise MoscError(f"no such CSV file: {csv_path}")
    header, lines = read_csv(csv_path, "HAT latency CSV", [])
    missing = [c for c in HAT_FEATURE_NAMES + HAT_LATENCY_COLUMNS if c not in header]
    if missing:
        raise MoscError(f"{csv_path}: not a HAT latency CSV (missing columns {missing})")
    source = f"hat:{csv_path.name} sha256:{sha256_file(csv_path)}"
    records = []
    for line, r in lines:
        num = {c: _number(r, c, f"{csv_path}:{line}") for c in HAT_FEATURE_NAMES + HAT_LATENCY_COLUMNS + HAT_STD_COLUMNS
               if c in header}
        feats = [num[c] for c in HAT_FEATURE_NAMES]
        enc, dec = num["latency_mean_encoder"], num["latency_mean_decoder"]
        enc_sd, dec_sd = num.get("latency_std_encoder"), num.get("latency_std_decoder")
        why = (bad_features(feats) or bad_latency("latency_mean_encoder", enc) or bad_latency("latency_mean_decoder", dec)
               or bad_latency("latency_mean_encoder + latency_mean_decoder", enc + dec)
               or bad_latency("latency_std_encoder", 0.0 if enc_sd is None else enc_sd, allow_zero=True)
               or bad_latency("latency_std_decoder", 0.0 if dec_sd is None else dec_sd, allow_zero=True))
        if why:
            raise MoscError(f"{csv_path}:{line}: {why} (nothing imported)")
        records.append({
            "target": target, "backend": HAT_BACKEND, "device_key": f"hat:{csv_path.stem}",
            "features": feats, "latency_ms": enc + dec, "trimmed_mean_ms": enc + dec,
            "encoder_ms": enc, "decoder_ms": dec, "encoder_std_ms": enc_sd, "decoder_std_ms": dec_sd,
            "batch": 1, "source_len": 30, "decoder_steps": 30, "trim": 0.1, "source": source,
            "extra": {"csv_row": line},
        })
    if not records:
        raise MoscError(f"{csv_path}: no rows")
    return records

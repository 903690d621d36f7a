"""Atomic writes, hashes and safe tensor files.

Every file mosc writes goes through a temp file in the same folder and `os.replace`, so a
crash leaves either the old file or the new one, never half of one. Tensors are stored
with safetensors (no pickle, so loading an untrusted file cannot run code).

Knows nothing of models or archs: bytes, JSON and flat dicts of tensors only.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

from mosc.errors import MoscError


@functools.cache
def _umask() -> int:
    """The process umask, read once: reading it means setting it, which is not thread-safe."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write via a temp file in the same folder + os.replace; the file gets the mode a plain
    open() would give it (0666 less the umask), not mkstemp's private 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


# ---- reading: every file mosc reads enters through one of these --------------------------
# Each turns "not there", "not readable", "not UTF-8", "not JSON/TOML" and "not the expected
# structure" into one MoscError line naming the file and what is wrong; a UTF-8 BOM is fine.
def read_text(path: str | Path, what: str = "file") -> str:
    """A UTF-8 text file (a name ending in .gz is decompressed first); one line on any failure."""
    path = Path(path)
    try:
        data = path.read_bytes()
        if path.name.endswith(".gz"):
            data = gzip.decompress(data)
    except IsADirectoryError:
        raise MoscError(f"{what} {path} is a folder, not a file") from None
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError; a cut-off stream is EOFError
        raise MoscError(f"cannot read {what} {path} ({getattr(e, 'strerror', None) or e})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise MoscError(f"{what} {path} is not UTF-8 text (line {line}, byte {e.start})") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def parse_json(text: str, where: str, expect: type | None = dict):
    """JSON text -> value (NaN/Infinity rejected); expect: the top-level type (None: any)."""
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except (json.JSONDecodeError, ValueError) as e:
        raise MoscError(f"{where} is not valid JSON ({e})") from None
    if expect is not None and not isinstance(value, expect):
        raise MoscError(f"{where} must hold a JSON {_kind(expect)}, not {_kind(type(value))}")
    return value


def _kind(t: type) -> str:
    return {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
            type(None): "null"}.get(t, t.__name__)


def read_json(path: str | Path, what: str = "file", expect: type | None = dict):
    """A JSON file whose top level is `expect` (an object by default)."""
    return parse_json(read_text(path, what), f"{what} {path}", expect)


def read_toml(path: str | Path, what: str = "file") -> dict:
    import tomllib

    try:
        return tomllib.loads(read_text(path, what))
    except tomllib.TOMLDecodeError as e:
        raise MoscError(f"{what} {path} is not valid TOML ({e})") from None


def read_csv(path: str | Path, what: str, need: list[str]):
    """(header, [(line number, row dict)]) of a CSV file that has the columns `need`."""
    import csv
    import io

    path = Path(path)
    text = read_text(path, what)
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        header = reader.fieldnames or []
        missing = [c for c in need if c not in header]
        if missing:
            raise MoscError(f"{what} {path} lacks the column(s) {', '.join(missing)}")
        return header, [(reader.line_num, row) for row in reader]
    except csv.Error as e:
        raise MoscError(f"{what} {path} is not a valid CSV file ({e})") from None


def field(d: dict, key: str, kind: type | tuple, where: str):
    """d[key], which must exist and be of `kind`: the structure check of a file read as JSON."""
    if not isinstance(d, dict) or key not in d:
        raise MoscError(f"{where}: missing {key!r}")
    v = d[key]
    if not isinstance(v, kind) or (isinstance(v, bool) and kind in (int, float, (int, float))):
        want = " or ".join(_kind(k) for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise MoscError(f"{where}: {key!r} must be a {want}, not {_kind(type(v))}")
    return v


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_files(folder: str | Path, files: dict[str, str], record: str) -> None:
    """Check every `name -> sha256` of a folder's record (a manifest); one-line MoscError on a
    missing, misplaced, tampered or corrupt file."""
    folder = Path(folder)
    for name, digest in files.items():
        path = folder / name
        if Path(name).name != name or not path.is_file():
            raise MoscError(f"{folder}: {name} is missing")
        if sha256_file(path) != digest:
            raise MoscError(f"{folder}: {name} does not match its sha256 in {record} (tampered or corrupt)")


def save_tensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> str:
    """Write a flat {name: tensor} dict as safetensors, atomically. Returns its sha256."""
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def load_tensors(path: str | Path, expect_sha256: str | None = None) -> dict:
    """Read a safetensors file; a missing, truncated or tampered file raises MoscError."""
    from safetensors.torch import load

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise MoscError(f"cannot read weights {path} ({e.strerror})") from None
    if expect_sha256 is not None and hashlib.sha256(data).hexdigest() != expect_sha256:
        raise MoscError(f"weights {path} do not match the sha256 recorded next to them (corrupt or replaced)")
    try:
        return load(data)
    except Exception as e:  # safetensors raises its own error types for bad headers/truncation
        raise MoscError(f"weights {path} are corrupt or not a safetensors file "
                        f"({(str(e).splitlines() or [type(e).__name__])[0]})") from None


# A model folder: DIR/model.safetensors + DIR/config.json. The config is written last and
# records the weights' sha256, so a folder with a config is complete and verifiable.
WEIGHTS, CONFIG = "model.safetensors", "config.json"
_SHA256 = re.compile(r"[0-9a-f]{64}")


def save_model_dir(out_dir: str | Path, kind: str, tensors: dict, meta: dict) -> Path:
    out_dir = Path(out_dir)
    sha = save_tensors(tensors, out_dir / WEIGHTS)
    atomic_write_json(out_dir / CONFIG, {"kind": kind, **meta, "weights_sha256": sha})
    return out_dir


def model_kind(path: str | Path) -> str | None:
    """The kind a model folder (or a run folder's latest checkpoint) says it holds, read from
    its config.json alone (no weights); None when that cannot be read: the loader then says why."""
    try:
        p = Path(path)
        p = resolve_checkpoint(p) if not (p / CONFIG).exists() and (p / "latest").exists() else p
        kind = read_json(p / CONFIG, "model config").get("kind")
        return kind if isinstance(kind, str) else None
    except (MoscError, OSError, AttributeError):
        return None


def load_model_dir(path: str | Path, kind: str) -> tuple[dict, dict]:
    """(meta, tensors) of a model folder written by save_model_dir (or of a training run
    folder's latest checkpoint), checked for kind and sha256."""
    path = Path(path)
    if not (path / CONFIG).exists() and (path / "latest").exists():
        path = resolve_checkpoint(path)
    if not path.is_dir():
        raise MoscError(f"{path} is not a model folder (expected {path}/{CONFIG} and {path}/{WEIGHTS})")
    meta = read_json(path / CONFIG, "model config")
    if meta.get("kind") != kind:
        raise MoscError(f"{path} holds a {meta.get('kind')!r}, expected a {kind!r}")
    # The hash is what ties config and weights together: without it flipped bytes would load.
    sha = meta.get("weights_sha256")
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        what = "has no weights_sha256" if sha is None else "has a malformed weights_sha256"
        raise MoscError(f"{path / CONFIG} {what}: not written by mosc, or edited")
    return meta, load_tensors(path / WEIGHTS, sha)


# A training run folder: step_NNNNNNN/ model folders and a `latest` pointer file naming the
# newest complete one (written after it, so a crash mid-checkpoint leaves the previous).
_STEP_DIR = re.compile(r"step_[0-9]+")


def latest_checkpoint(run: str | Path) -> Path | None:
    """The checkpoint a run folder's `latest` names, or None without one. The pointer may only
    name a step_N folder directly inside the run: never a path elsewhere."""
    run = Path(run)
    pointer = run / "latest"
    if not os.path.lexists(pointer):
        return None
    name = read_text(pointer, "checkpoint pointer").strip()
    if not _STEP_DIR.fullmatch(name):
        raise MoscError(f"{pointer} must name a step_N folder inside {run}, not {name[:80]!r}")
    ckpt = run / name
    if ckpt.is_symlink() or not (ckpt / CONFIG).is_file():
        raise MoscError(f"{pointer} points at {name}, which is missing, incomplete or not a folder of the run")
    return ckpt


def resolve_checkpoint(path: str | Path) -> Path:
    """A model folder, or a run folder (its latest checkpoint)."""
    path = Path(path)
    if (path / CONFIG).exists():
        return path
    ckpt = latest_checkpoint(path) if path.is_dir() else None
    if ckpt is None:
        raise MoscError(f"{path} is neither a checkpoint folder ({CONFIG}) nor a run folder with a 'latest' checkpoint")
    return ckpt

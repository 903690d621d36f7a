"""Where mosc keeps its files, and every environment variable it reads: one place.

Each value is read when asked for (not at import), so a variable set after `import mosc`
(a test's monkeypatch, a wrapper script) is honoured. Pure standard library: this module
also runs inside the emulated device's Python, which has neither torch nor typer.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # the checkout: targets/ and examples/ live here


def _path(var: str, default: Path) -> Path:
    return Path(os.environ.get(var) or default)


def cache_root() -> Path:
    """~/.cache/mosc: every cache below lives here unless its own variable moves it."""
    return Path.home() / ".cache" / "mosc"


def tune_root() -> Path:
    """Per-target MetaSchedule databases ($MOSC_TUNE_DIR)."""
    return _path("MOSC_TUNE_DIR", cache_root() / "tune")


def artifact_cache_root() -> Path:
    """Artifacts built per arch by `mosc measure`/`bench` ($MOSC_ARTIFACT_CACHE)."""
    return _path("MOSC_ARTIFACT_CACHE", cache_root() / "artifacts")


def latency_db_path() -> Path:
    """The default latency database ($MOSC_LATENCY_DB)."""
    return _path("MOSC_LATENCY_DB", cache_root() / "latency.db")


def targets_dir() -> Path:
    """The folder of target files: the repo's targets/ ($MOSC_TARGETS_DIR)."""
    return _path("MOSC_TARGETS_DIR", REPO / "targets")


def arm64_root() -> Path:
    """The arm64 Debian root with the TVM runtime, for the emulated Pi ($MOSC_ARM64_ROOT)."""
    return _path("MOSC_ARM64_ROOT", cache_root() / "arm64-root")


def emulate_workdir(target: str) -> Path:
    """Scratch folder of an emulated device's server."""
    return cache_root() / "emulate" / target


def emulated() -> bool:
    """True inside an emulated device's server ($MOSC_EMULATED=1, set by `mosc device emulate`)."""
    return os.environ.get("MOSC_EMULATED") == "1"


def emulator() -> str:
    """What emulates this device ($MOSC_EMULATOR), when emulated()."""
    return os.environ.get("MOSC_EMULATOR", "qemu-user")


def tune_search_population() -> int:
    """Candidates MetaSchedule evolves (and scores with its cost model) per tuning round
    ($MOSC_SEARCH_POPULATION, default 128). TVM's 512 suits rounds of 64 measured candidates;
    ours are smaller, and on 2 busy cores a 512 round costs ~10 s."""
    return int(os.environ.get("MOSC_SEARCH_POPULATION", 128))


def tune_builder() -> str:
    """How tuning builds candidates ($MOSC_TUNE_BUILDER): inprocess (default) or local workers."""
    return os.environ.get("MOSC_TUNE_BUILDER", "inprocess")

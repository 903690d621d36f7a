"""A TOML table -> a frozen settings dataclass, with one-line errors.

Target files and pipeline configs are flat tables of typed settings whose defaults live in
a dataclass. This module checks a table against such a class once, for both: no unknown
key, every value of its default's type (an int where a float is expected is fine, a bool
is never an int). It knows nothing of what the settings mean; ranges are the caller's.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from mosc.errors import MoscError


def from_table(cls, raw: Any, where: str):
    """cls(**raw) after checking keys and types; MoscError naming `where` and the key."""
    if not isinstance(raw, dict):
        raise MoscError(f"{where}: expected a table")
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise MoscError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(known)})")
    defaults = cls()
    values = {}
    for name, value in raw.items():
        want = type(getattr(defaults, name))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # p50_tol = 0 means 0.0
        if not isinstance(value, want) or isinstance(value, bool) != (want is bool):
            raise MoscError(f"{where}: {name} must be {want.__name__}, got {type(value).__name__} {value!r}")
        values[name] = value
    return cls(**values)

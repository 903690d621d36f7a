"""Range checks for numeric settings (training, model, tokenizer, corpus).

A bad value is one MoscError line naming the setting, the allowed range and what was
given, raised where the setting lives (its dataclass), so every way in (CLI, a saved
checkpoint, a Python caller) is checked the same way and before anything is written.
"""

from __future__ import annotations

import math

from mosc.errors import MoscError

MAX_VOCAB = 1_000_000  # no joint vocabulary mosc trains or loads is larger


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def whole(name: str, value, lo: int, hi: int | None = None) -> int:
    """value, which must be an int (not a bool) in [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        allowed = f">= {lo}" if hi is None else f"from {lo} to {hi}"
        raise MoscError(f"{name} must be a whole number {allowed}, got {_shown(value)}")
    return value


def real(name: str, value, lo: float, hi: float | None = None, *, above: bool = False, below: bool = False) -> float:
    """value, which must be a finite number >= lo (> lo when `above`) and <= hi (< hi when `below`)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if above else value >= lo) and (hi is None or (value < hi if below else value <= hi))
    if not ok:
        allowed = (f"> {lo:g}" if above else f">= {lo:g}") + ("" if hi is None else f" and {'<' if below else '<='} {hi:g}")
        raise MoscError(f"{name} must be a finite number {allowed}, got {_shown(value)}")
    return value

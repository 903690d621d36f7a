"""Search -> measure -> refit rounds (`mosc search --rounds R --measure-top K`).

Each round searches with the current predictor, measures the K best new archs under the
constraint on the real target (rows go to the latency DB), refits the predictor on the
DB's rows and searches again. The final pick is measured too, so the report gives its
predicted against its measured latency.

Pure orchestration: searching, measuring and refitting are callables (mosc.jobs.search
wires in mosc.search.evolve, the measure job and mosc.search.predictor), so this module
imports neither torch nor tvm and tests drive it with a synthetic device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from mosc.errors import MoscError
from mosc.search.evolve import Candidate, SearchResult
from mosc.space import Arch

SearchFn = Callable[[Callable[[Arch], float]], SearchResult]  # latency -> result
MeasureFn = Callable[[list[Arch]], dict[str, float]]  # archs -> {arch hash: measured ms}
RefitFn = Callable[[], Callable[[Arch], float]]  # -> new latency callable (refitted on the DB)


@dataclass
class Round:
    round: int
    best: dict  # arch hash, loss, predicted ms (this round's search)
    measured: dict[str, dict] = field(default_factory=dict)  # hash -> {predicted_ms, measured_ms}


@dataclass
class FeedbackResult:
    final: Candidate
    final_measured_ms: float
    rounds: list[Round]
    result: SearchResult  # the last search

    @property
    def final_error(self) -> float:
        return self.final.latency_ms / self.final_measured_ms - 1.0

    def to_dict(self) -> dict:
        return {"final": {**self.final.to_dict(), "measured_ms": self.final_measured_ms,
                          "relative_error": self.final_error},
                "rounds": [{"round": r.round, "best": r.best, "measured": r.measured} for r in self.rounds]}


def top_new(result: SearchResult, k: int, done: set[str], limit_ms: float | None) -> list[Arch]:
    """The k lowest-loss archs of the last search not measured yet (front first, then the best)."""
    cands = sorted([*result.front, *([result.best] if result.best else [])], key=lambda c: (c.loss, c.latency_ms))
    out, seen = [], set(done)
    for c in cands:
        if c.arch.hash not in seen and (limit_ms is None or c.latency_ms <= limit_ms):
            seen.add(c.arch.hash)
            out.append(c.arch)
        if len(out) >= k:
            break
    return out


def feedback_search(search: SearchFn, measure: MeasureFn, refit: RefitFn, latency: Callable[[Arch], float],
                    rounds: int, top_k: int, limit_ms: float | None,
                    log: Callable[[str], None] = lambda _m: None) -> FeedbackResult:
    if rounds < 1 or top_k < 1:
        raise MoscError("--rounds and --measure-top must be >= 1")
    done: dict[str, float] = {}
    history = []
    res = None
    for r in range(1, rounds + 1):
        res = search(latency)
        rnd = Round(r, {"arch_hash": res.best.arch.hash, "loss": res.best.loss, "predicted_ms": res.best.latency_ms})
        if r == rounds:
            history.append(rnd)
            break
        archs = top_new(res, top_k, set(done), limit_ms)
        got = measure(archs) if archs else {}
        done.update(got)
        for a in archs:
            if a.hash in got:
                rnd.measured[a.hash] = {"predicted_ms": latency(a), "measured_ms": got[a.hash]}
        history.append(rnd)
        errs = [abs(v["predicted_ms"] / v["measured_ms"] - 1) for v in rnd.measured.values()]
        log(f"round {r}/{rounds}: measured {len(got)} arch(s)"
            + (f", mean |predicted/measured - 1| {sum(errs) / len(errs):.1%}" if errs else "") + "; refitting")
        latency = refit()
    best = res.best
    if best.arch.hash not in done:
        done.update(measure([best.arch]))
    if best.arch.hash not in done:
        raise MoscError(f"final pick {best.arch.hash} was not measured")
    return FeedbackResult(best, done[best.arch.hash], history, res)

"""Hardware-aware evolutionary search (HAT, MOS.md section 5) and an NSGA-II Pareto mode.

Search world: no torch, no tvm. Latency is a plain callable `latency(arch) -> ms` and
fitness `score(arch) -> loss` (lower is better), so search cannot tell a predictor from a
device, or a supernet from a synthetic function. Both are cached per arch hash here.
"""

from __future__ import annotations

import bisect
import csv
import io
import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable

from mosc.errors import MoscError
from mosc.space import Arch, SearchSpace

ScoreFn = Callable[[Arch], float]
LatencyFn = Callable[[Arch], float]


# Far beyond HAT's 125 / 50 / 30, short of a typo's 10**9 (which would grow memory without end).
MAX_POPULATION = 100_000  # also the most mutations, crossovers (children per generation)
MAX_GENERATIONS = 10_000
MAX_TRIES = 10_000


@dataclass(frozen=True)
class EvoConfig:
    """HAT's defaults."""

    population: int = 125
    parents: int = 25
    mutations: int = 50
    mutation_prob: float = 0.3
    crossovers: int = 50
    generations: int = 30
    seed: int = 0
    max_tries: int = 200  # attempts to make one valid (in-constraint, new) child before giving up on it

    def check(self, space: SearchSpace | None = None) -> EvoConfig:
        """One-line MoscError for a setting out of range; with a space, a population it cannot fill."""
        if not 2 <= self.population <= MAX_POPULATION:
            raise MoscError(f"population must be between 2 and {MAX_POPULATION:,}, got {self.population:,}")
        if not 1 <= self.generations <= MAX_GENERATIONS:
            raise MoscError(f"generations must be between 1 and {MAX_GENERATIONS:,}, got {self.generations:,}")
        if not 1 <= self.parents <= self.population:
            raise MoscError(f"parents must be between 1 and the population ({self.population}), got {self.parents}")
        for name in ("mutations", "crossovers"):
            if not 0 <= getattr(self, name) <= MAX_POPULATION:
                raise MoscError(f"{name} must be between 0 and {MAX_POPULATION:,}, got {getattr(self, name):,}")
        if not 0 <= self.mutation_prob <= 1:
            raise MoscError(f"mutation probability must be in [0, 1], got {self.mutation_prob}")
        if not 1 <= self.max_tries <= MAX_TRIES:
            raise MoscError(f"max_tries must be between 1 and {MAX_TRIES:,}, got {self.max_tries:,}")
        if space is not None and self.population > space.size():
            raise MoscError(f"population {self.population:,} exceeds the {space.size():,} distinct archs of space "
                            f"{space.name!r}")
        return self


class Cached:
    """Memoise an arch -> float function by arch hash; counts real calls. A value that is not a
    finite number (a broken predictor or a diverged supernet) stops the search in one line."""

    def __init__(self, fn: Callable[[Arch], float], what: str = "fitness"):
        self.fn, self.what, self.cache, self.archs, self.calls = fn, what, {}, {}, 0

    def __call__(self, arch: Arch) -> float:
        h = arch.hash
        if h not in self.cache:
            self.calls += 1
            v = float(self.fn(arch))
            if not math.isfinite(v):
                raise MoscError(f"the {self.what} of arch {h} is {v}, not a finite number: the search cannot rank it")
            self.cache[h] = v
            self.archs[h] = arch
        return self.cache[h]


@dataclass
class Candidate:
    arch: Arch
    loss: float
    latency_ms: float

    def to_dict(self) -> dict:
        return {"arch_hash": self.arch.hash, "loss": self.loss, "latency_ms": self.latency_ms,
                "arch": self.arch.to_dict()}


@dataclass
class SearchResult:
    best: Candidate | None  # constrained mode: lowest loss under the constraint
    front: list[Candidate]  # non-dominated (loss, latency) among every arch evaluated, by latency
    history: list[dict] = field(default_factory=list)  # per generation: best loss, its latency
    evaluated: int = 0  # distinct archs scored
    seconds: float = 0.0


def check_budget(max_ms: float | None) -> None:
    """A latency constraint is a finite positive number of ms (or None: no constraint)."""
    if max_ms is None:
        return
    if isinstance(max_ms, bool) or not isinstance(max_ms, int | float) or not math.isfinite(max_ms) or max_ms <= 0:
        raise MoscError(f"latency constraint (--latency-ms) must be a finite positive number of ms, got {max_ms}")


def check_constraint(space: SearchSpace, latency: LatencyFn, max_ms: float | None) -> None:
    """The constraint must be a positive number of ms, and the smallest arch must fit it, or nothing can."""
    if max_ms is None:
        return
    check_budget(max_ms)
    low = latency(space.smallest())
    if low > max_ms:
        raise MoscError(f"no arch of space {space.name!r} can meet {max_ms:g} ms: even the smallest arch is "
                        f"predicted at {low:.2f} ms; relax --latency-ms")


def _child(make: Callable[[], Arch], ok: Callable[[Arch], bool], tries: int) -> Arch | None:
    for _ in range(tries):
        a = make()
        if ok(a):
            return a
    return None


def _initial(space: SearchSpace, rng: random.Random, n: int, ok, tries: int) -> list[Arch]:
    pop, seen = [], set()
    for _ in range(n * tries):
        if len(pop) >= n:
            break
        a = space.sample(rng)
        if a.hash not in seen and ok(a):
            seen.add(a.hash)
            pop.append(a)
    if not pop:
        a = space.smallest()
        if ok(a):
            pop.append(a)
    if not pop:
        raise MoscError("could not sample any arch under the latency constraint")
    return pop


def _offspring(space: SearchSpace, rng: random.Random, parents: list[Arch], cfg: EvoConfig, ok) -> list[Arch]:
    out = []
    for _ in range(cfg.mutations):
        c = _child(lambda: space.mutate(rng.choice(parents), rng, cfg.mutation_prob), ok, cfg.max_tries)
        if c is not None:
            out.append(c)
    for _ in range(cfg.crossovers):
        c = _child(lambda: space.crossover(rng.choice(parents), rng.choice(parents), rng), ok, cfg.max_tries)
        if c is not None:
            out.append(c)
    return out


def _dedupe(archs: list[Arch]) -> list[Arch]:
    seen, out = set(), []
    for a in archs:
        if a.hash not in seen:
            seen.add(a.hash)
            out.append(a)
    return out


def evolve(space: SearchSpace, score: ScoreFn, latency: LatencyFn, max_latency_ms: float,
           cfg: EvoConfig = EvoConfig(), log: Callable[[str], None] | None = None, unit: str = "ms") -> SearchResult:
    """HAT's evolutionary search: keep the `parents` lowest-loss archs, add mutations and
    crossovers of them, drop every candidate over the latency constraint; 30 generations.
    Any cost works as "latency" (mosc.jobs.bert: millions of parameters); `unit` names it in the log."""
    cfg.check(space)
    t0 = time.perf_counter()
    score, latency = _cached(score, "fitness"), _cached(latency, "predicted latency")
    check_constraint(space, latency, max_latency_ms)
    rng = random.Random(cfg.seed)
    ok = lambda a: latency(a) <= max_latency_ms
    pop = _initial(space, rng, cfg.population, ok, cfg.max_tries)
    history = []
    for g in range(cfg.generations):
        ranked = sorted(pop, key=lambda a: (score(a), latency(a)))
        parents = ranked[:cfg.parents]
        b = parents[0]
        history.append({"generation": g, "best_loss": score(b), "best_latency_ms": latency(b),
                        "evaluated": score.calls})
        if log:
            log(f"generation {g + 1}/{cfg.generations}: best loss {score(b):.4f} at {latency(b):.2f} {unit} "
                f"({score.calls} archs scored)")
        if g == cfg.generations - 1:
            break
        pop = _dedupe(parents + _offspring(space, rng, parents, cfg, ok))
    best = min(pop, key=lambda a: (score(a), latency(a)))
    front = _front_of_cache(score, latency)
    return SearchResult(Candidate(best, score(best), latency(best)), front, history, score.calls,
                        time.perf_counter() - t0)


# ------------------------------------------------------------------------------ NSGA-II
def non_dominated_sort(objs: list[tuple[float, float]]) -> list[list[int]]:
    """Fronts of indices, ascending within a front (minimisation of every objective).
    Two objectives take O(n log n) (a population of 10**5 sorts in a second); more take O(n^2)."""
    if objs and len(objs[0]) == 2:
        return _fronts_2d(objs)
    n = len(objs)
    dominated = [[] for _ in range(n)]
    count = [0] * n
    fronts: list[list[int]] = [[]]
    for i in range(n):
        for j in range(i + 1, n):
            if _dominates(objs[i], objs[j]):
                dominated[i].append(j)
                count[j] += 1
            elif _dominates(objs[j], objs[i]):
                dominated[j].append(i)
                count[i] += 1
    fronts[0] = [i for i in range(n) if count[i] == 0]
    k = 0
    while fronts[k]:
        nxt = []
        for i in fronts[k]:
            for j in dominated[i]:
                count[j] -= 1
                if count[j] == 0:
                    nxt.append(j)
        k += 1
        fronts.append(sorted(nxt))
    return fronts[:-1]


def _dominates(p, q) -> bool:
    return all(a <= b for a, b in zip(p, q)) and any(a < b for a, b in zip(p, q))


def _fronts_2d(objs: list[tuple[float, float]]) -> list[list[int]]:
    """Points in (x, y) order: only earlier points can dominate a point, and if front f does not
    dominate it no later front does (domination is transitive), so its front is found by
    bisection. A front dominates q iff its lowest y is below q's, or equal at a smaller x."""
    fronts: list[list[int]] = []
    low: list[tuple[float, float]] = []  # per front: (lowest y, smallest x at that y)
    def free(f: int, x: float, y: float) -> bool:  # front f does not dominate (x, y)
        return not (low[f][0] < y or (low[f][0] == y and low[f][1] < x))

    for i in sorted(range(len(objs)), key=lambda i: objs[i]):
        x, y = objs[i]
        f = bisect.bisect_left(range(len(fronts)), True, key=lambda f, x=x, y=y: free(f, x, y))
        if f == len(fronts):
            fronts.append([])
            low.append((y, x))
        elif y < low[f][0]:
            low[f] = (y, x)
        fronts[f].append(i)
    return [sorted(f) for f in fronts]


def crowding(objs: list[tuple[float, float]], front: list[int]) -> dict[int, float]:
    d = {i: 0.0 for i in front}
    for m in range(len(objs[front[0]])):
        s = sorted(front, key=lambda i: objs[i][m])
        lo, hi = objs[s[0]][m], objs[s[-1]][m]
        d[s[0]] = d[s[-1]] = float("inf")
        if hi > lo:
            for a, i, c in zip(s, s[1:], s[2:]):
                d[i] += (objs[c][m] - objs[a][m]) / (hi - lo)
    return d


def nsga_order(archs: list[Arch], score: ScoreFn, latency: LatencyFn) -> list[Arch]:
    """Archs sorted by (front rank, -crowding distance)."""
    objs = [(score(a), latency(a)) for a in archs]
    out = []
    for front in non_dominated_sort(objs):
        cd = crowding(objs, front)
        out += [archs[i] for i in sorted(front, key=lambda i: -cd[i])]
    return out


def pareto_search(space: SearchSpace, score: ScoreFn, latency: LatencyFn, max_latency_ms: float | None = None,
                  cfg: EvoConfig = EvoConfig(), log: Callable[[str], None] | None = None) -> SearchResult:
    """NSGA-II on (loss, latency): parents = the NSGA-best of the population, offspring by HAT's
    mutation and crossover, survivors by non-dominated sorting + crowding. Returns the
    non-dominated front of every arch evaluated (and the lowest-loss arch as `best`)."""
    cfg.check(space)
    t0 = time.perf_counter()
    score, latency = _cached(score, "fitness"), _cached(latency, "predicted latency")
    check_constraint(space, latency, max_latency_ms)
    rng = random.Random(cfg.seed)
    ok = (lambda a: latency(a) <= max_latency_ms) if max_latency_ms is not None else (lambda a: True)
    pop = _initial(space, rng, cfg.population, ok, cfg.max_tries)
    # anchor the latency end of the front
    for a in (space.smallest(),):
        if ok(a) and a.hash not in {p.hash for p in pop}:
            pop.append(a)
    history = []
    for g in range(cfg.generations):
        ordered = nsga_order(pop, score, latency)
        parents = ordered[:cfg.parents]
        front = _front_of_cache(score, latency)
        history.append({"generation": g, "front_size": len(front), "evaluated": score.calls,
                        "best_loss": min(c.loss for c in front)})
        if log:
            log(f"generation {g + 1}/{cfg.generations}: front of {len(front)} archs, "
                f"loss {min(c.loss for c in front):.4f}..{max(c.loss for c in front):.4f}, "
                f"{score.calls} archs scored")
        if g == cfg.generations - 1:
            break
        union = _dedupe(pop + _offspring(space, rng, parents, cfg, ok))
        pop = nsga_order(union, score, latency)[:cfg.population]
    front = _front_of_cache(score, latency)
    best = min(front, key=lambda c: (c.loss, c.latency_ms))
    return SearchResult(best, front, history, score.calls, time.perf_counter() - t0)


def _cached(fn, what: str) -> Cached:
    return fn if isinstance(fn, Cached) else Cached(fn, what)


def _front_of_cache(score: Cached, latency: Cached) -> list[Candidate]:
    """Non-dominated (loss, latency) among every arch scored so far, sorted by latency."""
    return pareto_front(list(score.archs.values()), score, latency)


def pareto_front(archs: list[Arch], score: ScoreFn, latency: LatencyFn) -> list[Candidate]:
    cands = sorted((Candidate(a, score(a), latency(a)) for a in _dedupe(archs)), key=lambda c: (c.latency_ms, c.loss))
    front, best = [], float("inf")
    for c in cands:
        if c.loss < best:
            front.append(c)
            best = c.loss
    return front


# ---------------------------------------------------------------------------- outputs
def front_csv(front: list[Candidate]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["arch_hash", "latency_ms", "loss", "arch_json"])
    for c in front:
        w.writerow([c.arch.hash, f"{c.latency_ms:.6g}", f"{c.loss:.6g}", c.arch.to_json()])
    return buf.getvalue()


def plot_front(path, front: list[Candidate], measured: list[tuple[float, float]] | None = None,
               title: str = "", constraint_ms: float | None = None,
               ylabel: str = "validation loss (nats/token)") -> bool:
    """PNG of the loss-latency front (and measured points). False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([c.latency_ms for c in front], [c.loss for c in front], "o-", label="Pareto front (predicted latency)")
    if measured:
        ax.scatter([m[0] for m in measured], [m[1] for m in measured], marker="x", color="red", label="measured")
    if constraint_ms:
        ax.axvline(constraint_ms, ls="--", color="grey", label=f"constraint {constraint_ms:g} ms")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True

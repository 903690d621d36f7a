"""Hardware-aware evolutionary search (HAT, MOS.md section 5) and an NSGA-II Pareto mode.

Search world: no torch, no tvm. Latency is a plain callable `latency(arch) -> ms` and
fitness `score(arch) -> loss` (lower is better), so search cannot tell a predictor from a
device, or a supernet from a synthetic function. Both are cached per arch hash here.
"""

from __future__ import annotations

import csv
import io
import random
import time
from dataclasses import dataclass, field
from typing import Callable

from mosc.errors import MoscError
from mosc.space import Arch, SearchSpace

ScoreFn = Callable[[Arch], float]
LatencyFn = Callable[[Arch], float]


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

    def check(self) -> EvoConfig:
        if self.population < 2 or self.generations < 1:
            raise MoscError("population must be >= 2 and generations >= 1")
        if not 1 <= self.parents <= self.population:
            raise MoscError(f"parents must be between 1 and the population ({self.population}), got {self.parents}")
        if self.mutations < 0 or self.crossovers < 0 or not 0 <= self.mutation_prob <= 1:
            raise MoscError("mutations and crossovers must be >= 0 and mutation probability in [0, 1]")
        return self


class Cached:
    """Memoise an arch -> float function by arch hash; counts real calls."""

    def __init__(self, fn: Callable[[Arch], float]):
        self.fn, self.cache, self.archs, self.calls = fn, {}, {}, 0

    def __call__(self, arch: Arch) -> float:
        h = arch.hash
        if h not in self.cache:
            self.calls += 1
            self.cache[h] = float(self.fn(arch))
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


def check_constraint(space: SearchSpace, latency: LatencyFn, max_ms: float | None) -> None:
    """The smallest arch must fit the constraint, or nothing can."""
    if max_ms is None:
        return
    if max_ms <= 0:
        raise MoscError(f"latency constraint must be positive, got {max_ms} ms")
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
           cfg: EvoConfig = EvoConfig(), log: Callable[[str], None] | None = None) -> SearchResult:
    """HAT's evolutionary search: keep the `parents` lowest-loss archs, add mutations and
    crossovers of them, drop every candidate over the latency constraint; 30 generations."""
    cfg.check()
    t0 = time.perf_counter()
    score, latency = _cached(score), _cached(latency)
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
            log(f"generation {g + 1}/{cfg.generations}: best loss {score(b):.4f} at {latency(b):.2f} ms "
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
    """Fronts of indices (minimisation of every objective)."""
    n = len(objs)
    dominated = [[] for _ in range(n)]
    count = [0] * n
    fronts: list[list[int]] = [[]]
    dom = lambda p, q: all(a <= b for a, b in zip(p, q)) and any(a < b for a, b in zip(p, q))
    for i in range(n):
        for j in range(i + 1, n):
            if dom(objs[i], objs[j]):
                dominated[i].append(j)
                count[j] += 1
            elif dom(objs[j], objs[i]):
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
        fronts.append(nxt)
    return fronts[:-1]


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
    cfg.check()
    t0 = time.perf_counter()
    score, latency = _cached(score), _cached(latency)
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


def _cached(fn) -> Cached:
    return fn if isinstance(fn, Cached) else Cached(fn)


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

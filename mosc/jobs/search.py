"""Jobs of the search world: fit a latency predictor, pick a latency model for a target,
run the search and write its outputs, and the measured feedback loop.

The policies live here, once: which rows a predictor may be fitted on, when the rpi4
analytic prior stands in for a predictor, how a search's outputs are laid out on disk,
how a feedback round measures, refits and searches again.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mosc.errors import MoscError

Log = Callable[[str], None]
PRIOR_TARGET = "rpi4"  # the one target with an analytic prior (Cortex-A72 roofline)


class Fitness(enum.StrEnum):
    """What the search minimises."""

    supernet = "supernet"  # the supernet's validation loss at the arch (needs a checkpoint)
    macs = "macs"  # -log(multiply-adds): a cheap stand-in for dry runs


# ---------------------------------------------------------------------------- predictor
def row_target(name: str | None) -> str | None:
    """The name rows and predictors are filed under: a target file's name for a target or its
    alias ("rpi" -> "rpi4"); any other label (a synthetic "synth", "hat:<file>") unchanged."""
    from mosc.compiler.targets import resolve_name

    if name is None:
        return None
    try:
        return resolve_name(name)
    except MoscError:
        return name


def predictor_data(db: Path | None, csv_file: Path | None, target: str | None, space: str | None,
                   max_rows: int | None = None, backend: str | None = None):
    """(Dataset, SearchSpace) from a latency DB's rows of one target, or a HAT CSV."""
    from mosc.search.predictor import read_db, read_hat_csv
    from mosc.space import SearchSpace

    if (db is None) == (csv_file is None):
        raise MoscError("give either --db PATH --target T or --csv FILE")
    target = row_target(target)
    if csv_file is not None:
        data = read_hat_csv(csv_file, target, max_rows)  # HAT's CSVs are the WMT space
        if space not in (None, "wmt"):
            raise MoscError(f"HAT CSVs describe the 'wmt' space, not {space!r}")
        return data, SearchSpace.load("wmt")
    if target is None:
        raise MoscError("--db needs --target T")
    sp = SearchSpace.load(space or "tiny")
    data = read_db(db, target, sp.name, backend=backend)
    bad = [a.hash for a in data.archs if a is not None and not sp.contains(a)]
    if bad:
        raise MoscError(f"{len(bad)} row(s) of target {target!r} hold archs outside space {sp.name!r} "
                        f"(e.g. {bad[0]}): pass the right --space")
    odd = [f for f, a in zip(data.features, data.archs) if a is None and not sp.fits_hat_features(f)]
    if odd:
        raise MoscError(f"{len(odd)} feature-only row(s) of target {target!r} (e.g. HAT imports) do not fit space "
                        f"{sp.name!r} (embed dims / layer counts): pass the right --space")
    if max_rows:
        data = data.subset(range(min(max_rows, len(data))))
    return data, sp


HELD_OUT_MIN_ROWS = 50  # below this a 10% test split has under 5 rows: no held-out metrics


def fit_predictor(data, space, *, model: str = "lsq", features: str | None = None, seed: int = 0,
                  refit: bool = True, min_rows_held_out: int = 0):
    """(Predictor, held-out metrics or None). Scores a seeded 80/10/10 split, then (refit)
    refits on every row: the saved model has seen all data, its metrics are the held-out ones.
    With fewer than min_rows_held_out rows no split is scored."""
    from mosc.search.predictor import fit, fit_eval

    if len(data) < min_rows_held_out:
        return fit(data, model=model, features=features, seed=seed, space=space), None
    p, m = fit_eval(data, model=model, features=features, seed=seed, space=space)
    if refit:
        split, metrics = p.meta["split"], p.meta["metrics"]
        p = fit(data, model=model, features=p.features, seed=seed, space=space)
        p.meta.update(split=split, metrics=metrics, metrics_rows="held-out test split before refitting on all rows")
    return p, m


def latency_model(target: str, space, predictor: Path | None, db: Path | None, log: Log = print):
    """The latency model the search uses for a target: a fitted predictor file, or for rpi4 with
    no real measurements the clearly labelled analytic prior (refits replace it once rows arrive).
    Its `.target` is the name the rows are filed under (an alias resolved)."""
    from mosc.compiler.targets import load_target
    from mosc.search.predictor import AnalyticPrior, Predictor

    if predictor is not None:  # a predictor may be for a label that is no target file (synthetic rows)
        return Predictor.load(predictor, target=row_target(target), space=space.name)
    target = load_target(target).name  # an alias resolved; an unknown name is one line listing the valid ones
    if target != PRIOR_TARGET:
        raise MoscError(f"--predictor is required for {target!r} (fit one with: mosc predictor fit --db DB --target "
                        f"{target}); only {PRIOR_TARGET} has an analytic prior")
    if db is not None and Path(db).exists():
        from mosc.device.db import LatencyDB

        with LatencyDB(db) as ldb:
            n = len(ldb.rows(target))
        if n:
            raise MoscError(f"{db} holds {n} real {target} measurements: fit a predictor on them "
                            f"(mosc predictor fit --db {db} --target {target}) and pass --predictor")
    log("latency: ANALYTIC PRIOR (Cortex-A72 roofline: MACs / peak compute vs bytes / bandwidth), "
        "not measured; Kendall tau 0.81 against HAT's Raspberry Pi 4 measurements")
    return AnalyticPrior(target, space)


def refit_latency(pred, db: Path, target: str, space, backend: str):
    """latency(arch) -> ms refitted on the DB's rows: the same model family, or lsq once
    measurements replace the analytic prior."""
    from mosc.search.predictor import AnalyticPrior, fit, read_db

    data = read_db(db, row_target(target), space.name, backend=backend)
    if isinstance(pred, AnalyticPrior):
        return fit(data, space=space).latency
    return fit(data, model=pred.model, features=pred.features, space=space).latency


# ---------------------------------------------------------------------------- search
def fitness(kind: str, checkpoint: Path | None, space: str, val_sentences: int, max_tokens: int):
    """(SearchSpace, score(arch) -> float, lower is better)."""
    if kind == Fitness.supernet:
        if checkpoint is None:
            raise MoscError("--fitness supernet needs --checkpoint RUN (or use --fitness macs for a dry run)")
        from mosc.jobs.model import supernet_fitness

        return supernet_fitness(checkpoint, val_sentences, max_tokens)
    if kind == Fitness.macs:
        from mosc.search.predictor import Shapes, total_macs
        from mosc.space import SearchSpace

        sp = SearchSpace.load(space)
        sh = Shapes(qkv_dim=sp.qkv_dim)
        return sp, lambda a: -math.log(total_macs(a.hat_features(), sh))
    raise MoscError(f"--fitness must be one of {', '.join(Fitness)}, got {kind!r}")


def fitness_label(kind: str) -> str:
    return "validation loss (nats/token)" if kind == Fitness.supernet else "-log(multiply-adds): stand-in fitness"


@dataclass
class SearchOutputs:
    dir: Path
    plotted: bool  # pareto.png written (matplotlib present)


def write_outputs(out: Path, res, info: dict, *, measured: list[tuple[float, float]], title: str,
                  latency_ms: float | None, ylabel: str, extra: dict | None = None) -> SearchOutputs:
    """A search's files: best.json (the arch), search.json (settings, best, history), pareto.json,
    pareto.csv, pareto.png (front + measured points, when matplotlib is there)."""
    from mosc.fileio import atomic_write_json, atomic_write_text
    from mosc.search.evolve import front_csv, plot_front

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "best.json", res.best.arch.to_json(indent=2) + "\n")
    atomic_write_json(out / "search.json", {**info, "best": res.best.to_dict(), "history": res.history,
                                            **(extra or {})})
    atomic_write_json(out / "pareto.json", {**info, "front": [c.to_dict() for c in res.front]})
    atomic_write_text(out / "pareto.csv", front_csv(res.front))
    plotted = plot_front(out / "pareto.png", res.front, measured, title, latency_ms, ylabel)
    return SearchOutputs(out, plotted)


def measured_points(db: Path | None, target: str, space, score) -> list[tuple[float, float]]:
    """(measured latency, fitness) of the DB's rows of the target inside the space: the plot's dots."""
    if db is None or not Path(db).exists():
        return []
    from mosc.device.db import LatencyDB

    with LatencyDB(db) as ldb:
        rows = [r for r in ldb.rows(row_target(target)) if r.arch is not None and space.contains(r.arch)]
    return [(r.latency_ms, score(r.arch)) for r in rows]


def feedback(search, space, score, pred, target, latency_ms, *, db: Path | None, checkpoint: Path | None,
             seed: int, backend: str, rounds: int, top_k: int, log: Log = print):
    """Search, measure the top K archs on the target (a Target or its name) into the DB, refit the predictor on the DB,
    search again; R rounds, then the final pick is measured too. search(space, score, latency)
    runs one search. Returns the FeedbackResult."""
    from mosc.compiler.targets import as_target
    from mosc.jobs.artifacts import ArtifactCache, ModelSource
    from mosc.jobs.measure import measure_into_db, remote_for
    from mosc.search.evolve import Cached
    from mosc.search.feedback import feedback_search

    if db is None:
        raise MoscError("--rounds needs --db (measured rows are added there and the predictor is refitted on them)")
    target = as_target(target)
    cache = ArtifactCache(target, ModelSource(checkpoint=checkpoint, space=space.name, seed=seed), log=log)
    remote = remote_for(target, backend)

    def measure_archs(archs):
        return measure_into_db(target, archs, cache, db, backend=backend, remote=remote, refuse_emulated=True,
                               log=log).latency_ms

    score = Cached(score)  # one loss cache across rounds
    return feedback_search(lambda lat: search(space, score, lat), measure_archs,
                           lambda: refit_latency(pred, db, target.name, space, backend), pred.latency,
                           rounds, top_k, latency_ms, log=log)

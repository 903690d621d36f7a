"""The main job end to end (`mosc pipeline`, `mosc demo`).

train a MoS supernet -> tune the space's TIR workloads once for the target (mosc tune --space)
-> measure a sample of subnets on the target through TVM, built from that database -> fit a
latency predictor on those rows -> search under a latency budget (fitness: the supernet's
validation loss) plus the loss-latency Pareto front -> collapse + export the winner -> compile
it from the same database (host; the target; a cross target) -> translate a few validation
sentences with the compiled artifact -> check the front (BLEU and measured latency of a few
front archs and the winner, the winner's deployed artifact timed against its measured row) ->
summary (printed, and summary.json in the output folder). No build tunes on its own, so what
was measured, predicted and searched on is what is deployed.

Every stage is a call into the library; this module only wires them together, times them and
prints what happened. A `PipelineConfig` is a flat TOML file (see examples/*.toml); every key
is optional and an unknown key or a wrong type is a one-line MoscError.
"""

from __future__ import annotations

import dataclasses
import shutil
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.table import Table

from mosc.errors import MoscError


@dataclass
class PipelineConfig:
    # -- data and supernet training (stage 1) ----------------------------------------------
    corpus: str = "synthetic"  # 'synthetic' (built in), a corpus folder, a name under ../shared/data, or a path prefix
    max_train_pairs: int = 0  # use only the first N training pairs (0 = all)
    space: str = "tiny"  # search space: built-in name or a .toml path
    mode: str = "neuron"  # FFN mode: shared (HAT), layer or neuron (MoS)
    experts: int = 2  # m: experts per FFN matrix (MoS modes)
    train_steps: int = 600  # optimizer updates, ~2 min on 2 cores (an existing run folder is resumed)
    train_max_tokens: int = 1024  # padded tokens per batch
    train_lr: float = 3e-3  # peak learning rate (high: the synthetic task is small and clean)
    train_warmup: int = 60  # linear warm-up updates
    train_dropout: float = 0.1  # residual dropout at the largest embed dim (0.3 suits real data)
    seed: int = 0  # seed of training, arch sampling and the search
    # -- tuning the space once per target (stage 2): every later build applies its records --
    target: str = "host"  # device measured and searched for (a name in targets/)
    tune_trials: int = 1000  # trial budget for the space's workloads (0 = none: default schedules only)
    tune_budget_min: float = 1.0  # stop tuning after this many minutes (0 = no limit); the next run goes on
    tune_db: str = ""  # tuning database folder ("" = ~/.cache/mosc/tune/<target>)
    # -- latency measurement (stage 3), from the space's tuning database -------------------
    measure_archs: int = 12  # subnets sampled and measured through TVM
    measure_warmup: int = -1  # untimed runs per measurement (-1 = the target's [protocol])
    measure_repeats: int = 0  # timed runs per measurement (0 = the target's [protocol])
    tracker: str = ""  # RPC tracker HOST:PORT for a remote target ("" = the target file's [rpc])
    key: str = ""  # device key at the tracker ("" = the target file's [rpc] key)
    # -- predictor (stage 4) ----------------------------------------------------------------
    predictor: str = "lsq"  # lsq, mlp, gbt or hybrid (mosc predictor fit --model)
    # -- search (stage 5) -------------------------------------------------------------------
    latency_budget_ms: float = 0.0  # latency constraint (0 = the median measured latency)
    val_sentences: int = 100  # validation sentences of the search fitness (supernet loss)
    population: int = 40  # population size (HAT: 125)
    parents: int = 10  # parents kept per generation (HAT: 25)
    mutations: int = 15  # mutated children per generation (HAT: 50)
    crossovers: int = 15  # crossover children per generation (HAT: 50)
    mutation_prob: float = 0.3  # per-gene mutation probability (HAT: 0.3)
    generations: int = 10  # generations (HAT: 30)
    pareto: bool = True  # also run NSGA-II for the whole loss-latency front
    bleu_archs: int = 4  # front archs checked for the summary: BLEU + measured latency (0 = only the winner)
    bleu_sentences: int = 100  # validation sentences for those BLEU scores
    # -- compile (stage 7): from the same database, so what was measured is deployed--------------------------------------------------------------
    cross_target: str = "rpi4"  # also cross-compile (untuned) for this target when its compiler exists ("" = skip)
    # -- translate (stage 8) ----------------------------------------------------------------
    translate_sentences: int = 5  # validation sentences translated with the compiled host artifact

    @classmethod
    def from_dict(cls, raw: dict, where: str = "config") -> PipelineConfig:
        from mosc.tables import from_table

        return from_table(cls, raw, where).check(where)

    @classmethod
    def load(cls, path: str | Path) -> PipelineConfig:
        from mosc.fileio import read_toml

        return cls.from_dict(read_toml(path, "pipeline config"), str(path))

    # Ranges of the numeric settings: (low, high), inclusive; checked at load, before any work.
    RANGES = {
        "max_train_pairs": (0, 10**8), "experts": (1, 64), "train_steps": (1, 10**7), "train_max_tokens": (1, 10**6),
        "train_lr": (1e-8, 1.0), "train_warmup": (0, 10**7), "train_dropout": (0.0, 0.9), "seed": (0, 2**32 - 1),
        "measure_archs": (5, 10**5), "tune_trials": (0, 10**7), "tune_budget_min": (0.0, 1e6),
        "measure_warmup": (-1, 10**4),
        "measure_repeats": (0, 10**5), "latency_budget_ms": (0.0, 1e7), "val_sentences": (1, 10**7),
        "population": (2, 10**5), "parents": (1, 10**5), "mutations": (0, 10**5), "crossovers": (0, 10**5),
        "mutation_prob": (0.0, 1.0), "generations": (1, 10**4), "bleu_archs": (0, 1000),
        "bleu_sentences": (1, 10**7), "translate_sentences": (0, 10**5),
    }

    def check(self, where: str = "config") -> PipelineConfig:
        """One line for the first setting out of range or not a known choice."""
        from mosc.search.predictor import MODELS

        check_common(self, where, {"measure_archs": " (the predictor needs 5 rows)"})
        if self.predictor not in MODELS:
            raise MoscError(f"{where}: predictor must be one of {', '.join(MODELS)}, got {self.predictor!r}")
        if self.tracker:
            from mosc.rpc import parse_hostport

            parse_hostport(self.tracker, f"{where}: tracker")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_common(cfg, where: str, why: dict[str, str] | None = None) -> None:
    """What every pipeline config checks (this module's and mosc.bert_pipeline's): each
    numeric setting within cfg.RANGES (why: a reason to add per key), parents <= population,
    a known FFN mode. One line for the first that fails."""
    import math

    from mosc.nn.modes import FFNMode

    for k, (lo, hi) in cfg.RANGES.items():
        v = getattr(cfg, k)
        if not (isinstance(v, int) or math.isfinite(v)) or not lo <= v <= hi:
            raise MoscError(f"{where}: {k} must be between {lo:g} and {hi:g}{(why or {}).get(k, '')}, got {v!r}")
    if cfg.parents > cfg.population:
        raise MoscError(f"{where}: parents ({cfg.parents}) must not exceed population ({cfg.population})")
    if cfg.mode not in FFNMode.__members__:
        raise MoscError(f"{where}: mode must be one of {', '.join(FFNMode.__members__)}, got {cfg.mode!r}")


# ---------------------------------------------------------------------------- the run
@dataclass
class Run:
    """What the stages share: the settings, where files go, the target, and what earlier
    stages produced (typed, for later stages; each stage's summary section is plain data)."""

    cfg: PipelineConfig
    out: Path
    console: Console
    target: Any  # mosc.compiler.targets.Target with the config's protocol / RPC overrides
    summary: dict = field(default_factory=dict)  # written to OUT/summary.json
    predictor: Any = None  # Predictor (stage predictor)
    best: Any = None  # the winner, a search Candidate (stage search)
    front: list = field(default_factory=list)  # the loss-latency front (stage search)
    measured: dict = field(default_factory=dict)  # arch hash -> measured ms (stages measure, check)
    sample: list = field(default_factory=list)  # the sampled, measured archs (stage measure)

    @property
    def run_dir(self) -> Path:
        return self.out / "run"

    @property
    def db_path(self) -> Path:
        return self.out / "latency.db"

    @property
    def tune_db(self) -> Path:
        """The target's tuning database: the space's records, applied by every build of the run."""
        from mosc.compiler.tune import default_db_dir

        return Path(self.cfg.tune_db).expanduser() if self.cfg.tune_db else default_db_dir(self.target)

    def log(self, msg: str) -> None:
        self.console.print(msg, highlight=False, markup=False, soft_wrap=True)

    @contextmanager
    def bar(self, what: str, total: int):
        """A progress bar over one stage's items; lines printed meanwhile appear above it.
        Yields advance(): call it once per item done."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=self.console, transient=True) as prog:
            task = prog.add_task(what, total=total)
            yield lambda: prog.advance(task)

    def space(self):
        from mosc.jobs.artifacts import ModelSource, load_space

        return load_space(ModelSource(checkpoint=self.run_dir))

    def measure_label(self) -> str:
        return f"built from the tuning database {self.tune_db} (tuned records + default schedules, no per-arch tuning)"

    def measure(self, archs: list):
        """Measure archs on the target through TVM into the run's latency DB (archs already there
        are skipped), with a progress bar; returns mosc.jobs.measure.Measured."""
        from mosc.jobs.artifacts import ArtifactCache, ModelSource
        from mosc.jobs.measure import measure_into_db, remote_for

        c = self.cfg
        source = ModelSource(checkpoint=self.run_dir, space=c.space, mode=c.mode, seed=c.seed)
        # Every build applies the space's database as the tune stage left it and tunes nothing
        # itself: the rows, the search and the deployed artifact all see the same schedules.
        cache = ArtifactCache(self.target, source, root=self.out / "artifacts", tune=False, tune_db=self.tune_db,
                              log=self.log)
        with self.bar(f"measuring on {self.target.name}", len(archs)) as advance:
            return measure_into_db(self.target, archs, cache, self.db_path, remote=remote_for(self.target),
                                   refuse_emulated=True, source="mosc pipeline", log=self.log, done=advance)


def _target(name: str, cfg: PipelineConfig):
    """The target with the config's protocol and RPC overrides applied."""
    from mosc.compiler.targets import load_target

    tg = load_target(name).with_rpc(cfg.tracker or None, cfg.key or None)
    p = tg.protocol
    proto = dataclasses.replace(p, warmup=cfg.measure_warmup if cfg.measure_warmup >= 0 else p.warmup,
                                repeats=cfg.measure_repeats or p.repeats)
    return dataclasses.replace(tg, protocol=proto)


# ---------------------------------------------------------------------------- the stages
def train_stage(r: Run) -> dict:
    from mosc.jobs.model import train_or_resume
    from mosc.nn.train import TrainConfig, load_trained

    c = r.cfg
    tc = TrainConfig(steps=c.train_steps, max_tokens=c.train_max_tokens, lr=c.train_lr, warmup=c.train_warmup,
                     save_every=max(c.train_steps // 2, 1), seed=c.seed, log_every=max(1, min(20, c.train_steps // 10)))
    res = train_or_resume(r.run_dir, steps=c.train_steps, corpus=c.corpus, space=c.space, mode=c.mode, cfg=tc,
                          model_overrides={"n_experts": c.experts, "dropout": c.train_dropout},
                          corpus_args={"max_train_pairs": c.max_train_pairs} if c.max_train_pairs else {}, log=r.log)
    model, _, meta = load_trained(r.run_dir)
    r.log(f"supernet: {meta['corpus']} corpus, {model.cfg.ffn_mode.value} mode, step {res['steps']}; {res['checkpoint']}")
    return {"train": res}


def tune_stage(r: Run) -> dict:
    from mosc.jobs.tune import ModelShape, tune_space

    c = r.cfg
    if c.tune_trials == 0:
        r.log("tune_trials = 0: no tuning; builds use the database as it is plus default schedules")
        return {"tune": {"trials": 0}}
    sf, extra, rep = tune_space(r.space(), ModelShape.of_checkpoint(r.run_dir), r.target, trials=c.tune_trials,
                                budget_min=c.tune_budget_min or None, tune_db=r.tune_db, log=r.log)
    return tune_summary(sf, extra, rep, r.log)


def tune_summary(sf, extra: int, rep, log) -> dict:
    """A tune stage's log line and summary entry, from mosc.jobs.tune.tune_space's result
    (both pipelines: translation here, encoder-only in mosc.bert_pipeline)."""
    log(f"space {sf.space}: {rep.with_record}/{rep.workloads} workloads with a record (tuned, or their timed default "
        f"schedule), {rep.trials} trials in {rep.seconds:.0f} s ({rep.trials_total} in the database)" +
        ("; stopped by tune_budget_min: the next run goes on" if rep.budget_left else ""))
    return {"tune": {"db": rep.db_dir, "workloads": rep.workloads, "with_record": rep.with_record,
                     "trials": rep.trials, "trials_total": rep.trials_total, "untunable": rep.untunable,
                     "found_only_by_random_archs": extra, "seconds": round(rep.seconds, 1),
                     "budget_left": rep.budget_left}}


def measure_stage(r: Run) -> dict:
    from mosc.jobs.artifacts import sample_archs

    archs = r.sample = sample_archs(r.space(), r.cfg.measure_archs, r.cfg.seed)
    p = r.target.protocol
    r.log(f"measuring {len(archs)} archs on {r.target.name} through TVM, {r.measure_label()}; protocol: batch "
          f"{p.batch}, source {p.source_len}, {p.decoder_steps} decoder steps, {p.warmup} warm-up + {p.repeats} timed runs")
    m = r.measure(archs)
    r.measured = dict(m.latency_ms)
    lat = sorted(m.latency_ms.values())
    r.log(f"measured {len(m.new)} new, {len(m.skipped)} already in {r.db_path}; "
          f"latency {lat[0]:.2f}..{lat[-1]:.2f} ms, median {statistics.median(lat):.2f} ms")
    return {"measure": {"archs": len(archs), "new": len(m.new), "skipped": len(m.skipped),
                        "label": r.measure_label(), "db": str(r.db_path), "device_key": m.device_key,
                        "latency_ms": m.latency_ms, "median_ms": statistics.median(lat)}}


def predictor_stage(r: Run) -> dict:
    from mosc.jobs.search import HELD_OUT_MIN_ROWS, fit_predictor
    from mosc.search.predictor import metrics, read_db

    sp, c = r.space(), r.cfg
    data = read_db(r.db_path, r.target.name, sp.name, backend="tvm")
    p, held_out = fit_predictor(data, sp, model=c.predictor, seed=c.seed, min_rows_held_out=HELD_OUT_MIN_ROWS)
    path = r.out / "predictor.json"
    p.save(path)
    fit_m = metrics(data.latency_ms, p.predict_features(data.features, data.archs))
    r.log(f"{c.predictor} predictor on {len(data)} rows ({p.features} features): in-sample MAPE "
          f"{fit_m['mape']:.1%}, Kendall tau {fit_m['kendall_tau'] or float('nan'):.2f}"
          + (f"; held-out MAPE {held_out['mape']:.1%}" if held_out else " (too few rows for a held-out split)"))
    r.predictor = p
    return {"predictor": {"path": str(path), "model": c.predictor, "features": p.features, "rows": len(data),
                          "in_sample": fit_m, "held_out": held_out}}


def search_stage(r: Run) -> dict:
    from mosc.jobs.model import supernet_fitness
    from mosc.jobs.search import write_outputs
    from mosc.search.evolve import Cached, EvoConfig, evolve, pareto_search

    c = r.cfg
    sp, score = supernet_fitness(r.run_dir, c.val_sentences)
    score = Cached(score)  # shared by both searches
    budget = c.latency_budget_ms or r.summary["measure"]["median_ms"]
    ec = EvoConfig(population=c.population, parents=min(c.parents, c.population), mutations=c.mutations,
                   crossovers=c.crossovers, mutation_prob=c.mutation_prob, generations=c.generations, seed=c.seed)
    r.log(f"budget {budget:.2f} ms ({'configured' if c.latency_budget_ms else 'median measured latency'}); "
          f"fitness: supernet validation loss on {c.val_sentences} sentences")
    with r.bar("search generations", c.generations * (2 if c.pareto else 1)) as advance:
        step = lambda msg: (r.log(msg), advance())  # noqa: E731  (the search logs once per generation)
        res = evolve(sp, score, r.predictor.latency, budget, ec, log=step)
        if c.pareto:
            r.log("NSGA-II for the loss-latency front:")
            res.front = pareto_search(sp, score, r.predictor.latency, None, ec, log=step).front
            fits = [x for x in res.front if x.latency_ms <= budget and x.loss < res.best.loss]
            if fits:  # NSGA-II found a lower-loss arch that also meets the budget: it wins
                res.best = min(fits, key=lambda x: (x.loss, x.latency_ms))
    pts = [(r.measured[a.hash], score(a)) for a in r.sample if a.hash in r.measured]
    d = write_outputs(r.out / "search", res, {"budget_ms": budget}, measured=pts, latency_ms=budget,
                      title=f"{r.target.name}: loss vs latency ({sp.name})", ylabel="validation loss (nats/token)").dir
    b = r.best = res.best
    r.front = res.front
    r.log(f"best under {budget:.2f} ms: {b.arch.hash}, loss {b.loss:.4f}, predicted {b.latency_ms:.2f} ms "
          f"({score.calls} archs scored in all)")
    return {"search": {"budget_ms": budget, "budget_from": "config" if c.latency_budget_ms else "median measured",
                       "best": b.to_dict(), "evaluated": score.calls, "dir": str(d)}}


def _deploy_targets(r: Run) -> list[str]:
    """Targets the winner is exported and compiled for: host, the measured target, the cross target."""
    return list(dict.fromkeys(["host", r.target.name] + ([r.cfg.cross_target] if r.cfg.cross_target else [])))


def _shape_key(sh) -> str:
    return f"b{sh.batch}s{sh.source_len}t{sh.cache_len}"


def export_stage(r: Run) -> dict:
    from mosc.nn.export import Shapes, export_subnet
    from mosc.nn.model import load_supernet
    from mosc.nn.subnet import collapse, save_subnet

    supernet, meta = load_supernet(r.run_dir)
    sub = collapse(supernet, r.best.arch)
    where = f"{r.run_dir} at arch {r.best.arch.hash}"
    sub_dir = r.out / "subnet"
    save_subnet(sub, sub_dir, {"source": where, "tokenizer": meta.get("tokenizer")})
    exports = {}
    for name in _deploy_targets(r):
        sh = Shapes.from_protocol(_target(name, r.cfg).protocol)
        if _shape_key(sh) not in exports:
            d = r.out / f"onnx-{_shape_key(sh)}"
            m = export_subnet(sub, d, sh, tokenizer_json=meta.get("tokenizer"), check=True, extra={"source": where})
            same = (m.get("parity") or {}).get("greedy_tokens_equal")
            r.log(f"exported {d} ({m['param_count']:,} parameters; onnxruntime greedy tokens "
                  f"{'match' if same else 'DIFFER from'} torch)")
            exports[_shape_key(sh)] = str(d)
    return {"export": {"subnet": str(sub_dir), "arch": r.best.arch.to_dict(), "arch_hash": r.best.arch.hash,
                       "param_count": sum(p.numel() for p in sub.parameters()), "onnx": exports}}


def _compile_one(r: Run, target, db: Path) -> dict:
    from mosc.compiler.artifact import describe_coverage, schedule_coverage
    from mosc.jobs.build import compile_export
    from mosc.nn.export import Shapes

    onnx = Path(r.summary["export"]["onnx"][_shape_key(Shapes.from_protocol(target.protocol))])
    d = r.out / f"artifact-{target.name}"
    r.log(f"compiling for {target.name} from the tuning database {db} -> {d}")
    c = compile_export(onnx, target, d, tune=False, tune_db=db)
    cov = schedule_coverage(c.manifest)
    from_db, total = cov["from_database"], cov["functions"]
    r.log(f"  {c.manifest['compile_seconds']:.1f} s; {describe_coverage(cov, c.manifest['device'])}")
    return {"path": str(d), "compile_seconds": c.manifest["compile_seconds"], "functions": total,
            "functions_from_database": from_db}


def compile_stage(r: Run) -> dict:
    from mosc.compiler.tune import default_db_dir

    c, tg = r.cfg, r.target
    host = tg if tg.name == "host" else _target("host", c)
    arts = {"host": _compile_one(r, host, r.tune_db if tg.name == "host" else default_db_dir(host))}
    if tg.name != "host":
        arts[tg.name] = _compile_one(r, tg, r.tune_db)  # the build the measure stage timed
    ct = c.cross_target
    if ct and ct not in arts:
        cross = _target(ct, PipelineConfig())
        cc = cross.cross_compiler
        if cc and not shutil.which(cc):
            r.log(f"skipping {ct}: cross compiler {cc!r} not on PATH (apt-get install gcc-aarch64-linux-gnu)")
            arts[ct] = {"skipped": f"cross compiler {cc} not found"}
        else:
            arts[ct] = _compile_one(r, cross, default_db_dir(cross))
    return {"compile": arts}


def translate_stage(r: Run) -> dict:
    from mosc.jobs.translate import translate
    from mosc.nn.train import load_run_corpus, load_trained

    art_dir = Path(r.summary["compile"]["host"]["path"])
    _, tok, meta = load_trained(r.run_dir)
    val = load_run_corpus(meta, tok).val
    n = min(r.cfg.translate_sentences, len(val))
    tr = translate(art_dir, val.src_text[:n])
    rows = [{"source": val.src_text[i], "output": tr.lines[i], "reference": val.tgt_text[i]} for i in range(n)]
    t = Table("source", "output (compiled host artifact)", "reference", title=f"{n} validation sentences",
              show_lines=True)
    for x in rows:
        t.add_row(x["source"], x["output"], x["reference"])
    r.console.print(t)
    return {"translate": {"artifact": str(art_dir), "sentences": rows, "ms": round(tr.ms, 1)}}


def _front_bleu(r: Run, picks: list) -> dict:
    """arch hash -> greedy BLEU of the supernet at the arch on the first validation sentences."""
    from mosc.nn.evaluate import evaluate
    from mosc.nn.train import load_run_corpus, load_trained

    model, tok, meta = load_trained(r.run_dir)
    data = load_run_corpus(meta, tok)
    n = min(r.cfg.bleu_sentences, len(data.val))
    bleu = {}
    with r.bar("BLEU", len(picks)) as advance:
        for c in picks:
            bleu[c.arch.hash] = evaluate(model, data, c.arch, split="val", max_sentences=n).bleu
            r.log(f"{c.arch.hash}: BLEU {bleu[c.arch.hash]:.2f} on {n} validation sentences, loss {c.loss:.4f}, "
                  f"predicted {c.latency_ms:.2f} ms")
            advance()
    return bleu


def check_stage(r: Run) -> dict:
    from mosc.jobs.measure import bench

    picks = front_picks(r.front, r.best, r.cfg.bleu_archs)
    bleu = _front_bleu(r, picks)
    r.log(f"measuring the {len(picks)} checked archs on {r.target.name} (like the sample: {r.measure_label()})")
    r.measured.update(r.measure([c.arch for c in picks]).latency_ms)
    rows = []
    for c in r.front + ([r.best] if r.best.arch.hash not in {c.arch.hash for c in r.front} else []):
        rows.append({"arch_hash": c.arch.hash, "loss": c.loss, "bleu": bleu.get(c.arch.hash),
                     "predicted_ms": c.latency_ms, "measured_ms": r.measured.get(c.arch.hash),
                     "winner": c.arch.hash == r.best.arch.hash})
    rows.sort(key=lambda x: x["predicted_ms"])
    errs = [abs(x["predicted_ms"] / x["measured_ms"] - 1) for x in rows if x["bleu"] is not None and x["measured_ms"]]
    r.log(f"predicted vs measured on the checked archs: mean error {statistics.mean(errs):.1%}, max {max(errs):.1%}")
    # the deployment artifact of the winner, built like the measured ones, timed with the same protocol
    art = r.summary["compile"][r.target.name]
    result = bench(r.target, artifact=Path(art["path"]), log=lambda m: None)
    stats = result["stats"]
    kernel_ms = statistics.median(result["kernel_ms"]) if result.get("kernel_ms") else None
    row_ms = r.measured.get(r.best.arch.hash)
    agree = stats["latency_ms"] / row_ms if row_ms else None
    r.log(f"winner's deployed {r.target.name} artifact: {stats['latency_ms']:.2f} ms per translate call (median "
          f"{stats['median_ms']:.2f}, p90 {stats['p90_ms']:.2f}" +
          (f"; its kernels alone {kernel_ms:.2f} ms)" if kernel_ms else ")") +
          (f"; its measured row: {row_ms:.2f} ms (deployed/measured {agree:.2f})" if row_ms else ""))
    return {"front": rows, "winner_artifact": {"path": art["path"], "measured_row_ms": row_ms,
                                               "deployed_over_measured": agree, "kernel_ms": kernel_ms,
                                               **{k: stats[k] for k in ("latency_ms", "median_ms", "p90_ms", "std_ms")}}}


@dataclass(frozen=True)
class Stage:
    name: str
    title: Callable[[Run], str]  # the rule printed before the stage
    run: Callable[[Run], dict]  # returns summary sections to add


# The main job, as a named list of stages (the way a compile pipeline is a named list of passes).
STAGES = [
    Stage("train", lambda r: f"train a {r.cfg.mode} supernet ({r.cfg.space} space, {r.cfg.corpus} corpus)", train_stage),
    Stage("tune", lambda r: f"tune the {r.cfg.space} space's workloads once for {r.target.name}", tune_stage),
    Stage("measure", lambda r: f"measure {r.cfg.measure_archs} subnets on {r.target.name} (TVM)", measure_stage),
    Stage("predictor", lambda r: f"fit the {r.cfg.predictor} latency predictor", predictor_stage),
    Stage("search", lambda r: "evolutionary search under the latency budget + Pareto front", search_stage),
    Stage("export", lambda r: f"collapse + export the winner {r.best.arch.hash}", export_stage),
    Stage("compile", lambda r: "compile with TVM", compile_stage),
    Stage("translate", lambda r: "translate with the compiled host artifact", translate_stage),
    Stage("check", lambda r: "check the front: BLEU and measured latency", check_stage),
]


def run_stages(r, stages: list[Stage]) -> None:
    """Each stage in turn under a numbered rule, its summary sections merged into r.summary,
    its wall time printed; r.summary gets stage_seconds and total_seconds. r: anything with
    .console and .summary (this module's Run, mosc.bert_pipeline's BertRun)."""
    times, t_all = {}, time.perf_counter()
    for i, st in enumerate(stages, 1):
        r.console.rule(f"[bold cyan][{i}/{len(stages)}] {st.title(r)}")
        t0 = time.perf_counter()
        try:
            r.summary.update(st.run(r))
        finally:
            times[st.name] = round(time.perf_counter() - t0, 2)
            r.console.print(f"[dim]{st.name}: {times[st.name]:.1f} s[/]")
    r.summary["stage_seconds"] = times
    r.summary["total_seconds"] = round(time.perf_counter() - t_all, 2)


def run_pipeline(cfg: PipelineConfig, out_dir: str | Path, console: Console | None = None,
                 stages: list[Stage] = STAGES) -> dict:
    """Run every stage into out_dir; returns (and writes to out_dir/summary.json) the summary."""
    from mosc.fileio import atomic_write_json

    cfg.check()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    r = Run(cfg, out, console or Console(), _target(cfg.target, cfg))
    if cfg.cross_target:
        _target(cfg.cross_target, cfg)  # an unknown cross target is one line now, not after training
    r.summary.update(config=cfg.to_dict(), out_dir=str(out))
    run_stages(r, stages)
    s = r.summary
    s["artifacts"] = {"run": str(r.run_dir), "latency_db": str(r.db_path), "predictor": s["predictor"]["path"],
                      "search": s["search"]["dir"], "subnet": s["export"]["subnet"],
                      **{f"onnx {k}": v for k, v in s["export"]["onnx"].items()},
                      **{f"artifact {k}": v.get("path", "skipped: " + v.get("skipped", "")) for k, v in s["compile"].items()}}
    s["next"] = next_commands(cfg, out)
    atomic_write_json(out / "summary.json", s)
    print_summary(s, r.console)
    return s


def front_picks(front: list, best, k: int) -> list:
    """k archs spread evenly along the front (by predicted latency), plus the winner."""
    picks = {}
    if k > 0 and front:
        for i in range(min(k, len(front))):
            c = front[round(i * (len(front) - 1) / max(k - 1, 1))]
            picks[c.arch.hash] = c
    picks[best.arch.hash] = best
    return sorted(picks.values(), key=lambda c: c.latency_ms)


def next_commands(cfg: PipelineConfig, out: Path) -> list[str]:
    return [
        "mosc pipeline --config examples/multi30k.toml -o runs/m30k-pipeline   # real data (../shared/data/multi30k), bigger budget",
        "mosc pipeline --config examples/rpi4.toml -o runs/rpi4-pipeline       # a real Raspberry Pi over RPC (see the file's comments)",
        f"mosc translate --artifact {out}/artifact-host --text \"...\"          # the compiled winner",
        f"mosc tune -t {cfg.target} -c {out}/run --status                      # the space's tuning coverage",
        f"mosc evaluate -c {out}/run --subnet {out}/subnet --beam 4             # the winner's BLEU on the full split",
        f"mosc search -t {cfg.target} -p {out}/predictor.json -c {out}/run --pareto -o {out}/search-hat   # HAT-size search",
    ]


SHOWN_FRONT_ROWS = 12  # longer fronts are thinned in the printed table (all rows: search/pareto.csv)


def print_summary(s: dict, console: Console) -> None:
    rows = s["front"]
    if len(rows) > SHOWN_FRONT_ROWS:  # keep the checked archs, spread the rest evenly
        checked = [i for i, r in enumerate(rows) if r["bleu"] is not None or r["winner"]]
        spread = [round(i * (len(rows) - 1) / (SHOWN_FRONT_ROWS - 1)) for i in range(SHOWN_FRONT_ROWS)]
        keep = sorted(set(checked) | set(spread[:max(SHOWN_FRONT_ROWS - len(checked), 2)]) | {len(rows) - 1})
        rows = [rows[i] for i in keep]
    shown = f"{len(rows)} of {len(s['front'])} archs, " if len(rows) < len(s["front"]) else ""
    t = Table(title=f"Pareto front on {s['config']['target']} ({shown}* = winner under {s['search']['budget_ms']:.2f} ms)",
              caption="measured: TVM builds from the space's tuning database, the target's protocol; "
                      f"BLEU: greedy, {s['config']['bleu_sentences']} validation sentences")
    for c in ("arch", "val loss", "BLEU", "predicted ms", "measured ms"):
        t.add_column(c, justify="left" if c == "arch" else "right")
    for r in rows:
        t.add_row(("* " if r["winner"] else "  ") + r["arch_hash"], f"{r['loss']:.4f}",
                  "-" if r["bleu"] is None else f"{r['bleu']:.2f}", f"{r['predicted_ms']:.2f}",
                  "-" if r["measured_ms"] is None else f"{r['measured_ms']:.2f}")
    console.print(t)
    w = s.get("winner_artifact")
    if w:
        row = w.get("measured_row_ms")
        console.print(f"winner's deployment artifact: {w['latency_ms']:.2f} ms measured ({w['path']})" +
                      (f"; its row in the latency DB: {row:.2f} ms" if row else ""), highlight=False)
    a = Table("artifact", "where", title="files")
    for k, v in s["artifacts"].items():
        a.add_row(k, v)
    console.print(a)
    total = s["total_seconds"]
    w = Table("stage", "seconds", "share", title=f"wall time: {total:.1f} s")
    for k, v in s["stage_seconds"].items():
        w.add_row(k, f"{v:.1f}", f"{v / max(total, 1e-9):.0%}")
    console.print(w)
    console.print(f"[dim]measurements: {s['measure']['label']}[/]")
    console.print("[bold]next:[/]")
    for c in s["next"]:
        console.print("  " + c, highlight=False, markup=False, soft_wrap=True)
    console.print(f"[green]done[/]: {s['out_dir']}/summary.json")

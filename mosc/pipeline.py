"""The main job end to end (`mosc pipeline`, `mosc demo`).

train a MoS supernet -> measure a sample of subnets on a target through TVM -> fit a latency
predictor on those rows -> search under a latency budget (fitness: the supernet's validation
loss) plus the loss-latency Pareto front -> collapse + export the winner -> compile it (host,
tuned; the target; a cross target) -> translate a few validation sentences with the compiled
artifact -> check the front (BLEU and measured latency of a few front archs and the winner,
the winner's compiled artifact timed) -> summary (printed, and summary.json in the output folder).

Every stage is a call into the library; this module only wires them together, times them and
prints what happened. A `PipelineConfig` is a flat TOML file (see examples/*.toml); every key
is optional and an unknown key or a wrong type is a one-line MoscError.
"""

from __future__ import annotations

import dataclasses
import shutil
import statistics
import time
import tomllib
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path

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
    # -- latency measurement (stage 2) ------------------------------------------------------
    target: str = "host"  # device measured and searched for (a name in targets/)
    measure_archs: int = 12  # subnets sampled and measured through TVM
    measure_tune: bool = False  # tune each measured artifact (real speed, slow) or build untuned (fast, labelled)
    measure_trials: int = 64  # MetaSchedule trials per measured artifact when measure_tune = true
    measure_warmup: int = -1  # untimed runs per measurement (-1 = the target's [protocol])
    measure_repeats: int = 0  # timed runs per measurement (0 = the target's [protocol])
    tracker: str = ""  # RPC tracker HOST:PORT for a remote target ("" = the target file's [rpc])
    key: str = ""  # device key at the tracker ("" = the target file's [rpc] key)
    # -- predictor (stage 3) ----------------------------------------------------------------
    predictor: str = "lsq"  # lsq, mlp, gbt or hybrid (mosc predictor fit --model)
    # -- search (stage 4) -------------------------------------------------------------------
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
    # -- compile (stage 6) ------------------------------------------------------------------
    compile_tune: bool = True  # tune the host artifact with MetaSchedule
    compile_trials: int = 32  # trial budget of that tuning
    tune_db: str = ""  # tuning database folder ("" = ~/.cache/mosc/tune/<target>)
    cross_target: str = "rpi4"  # also cross-compile (untuned) for this target when its compiler exists ("" = skip)
    # -- translate (stage 7) ----------------------------------------------------------------
    translate_sentences: int = 5  # validation sentences translated with the compiled host artifact

    @classmethod
    def from_dict(cls, raw: dict, where: str = "config") -> PipelineConfig:
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise MoscError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(known)})")
        vals = {}
        for k, v in raw.items():
            want = type(getattr(cls(), k))
            ok = isinstance(v, want) and not (want is int and isinstance(v, bool))
            if want is float and isinstance(v, int) and not isinstance(v, bool):
                v, ok = float(v), True
            if not ok:
                raise MoscError(f"{where}: {k} must be {want.__name__}, got {type(v).__name__} {v!r}")
            vals[k] = v
        cfg = cls(**vals)
        cfg.check(where)
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> PipelineConfig:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise MoscError(f"cannot read config {path} ({e.strerror})") from None
        except tomllib.TOMLDecodeError as e:
            raise MoscError(f"{path}: not valid TOML ({e})") from None
        return cls.from_dict(raw, str(path))

    def check(self, where: str = "config") -> PipelineConfig:
        for k in ("train_steps", "train_max_tokens", "val_sentences", "population", "generations", "parents"):
            if getattr(self, k) < 1:
                raise MoscError(f"{where}: {k} must be >= 1, got {getattr(self, k)}")
        if self.measure_archs < 5:
            raise MoscError(f"{where}: measure_archs must be >= 5 (the predictor needs 5 rows), got {self.measure_archs}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class _Stages:
    console: Console
    times: dict = field(default_factory=dict)
    total: int = 8
    _i: int = 0

    def run(self, name: str, title: str, fn):
        self._i += 1
        self.console.rule(f"[bold cyan][{self._i}/{self.total}] {title}")
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            self.times[name] = round(time.perf_counter() - t0, 2)
            self.console.print(f"[dim]{name}: {self.times[name]:.1f} s[/]")


@contextmanager
def _bar(console: Console, what: str, total: int):
    """A progress bar over one stage's items; lines printed meanwhile appear above it.
    Yields advance(): call it once per item done."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as prog:
        task = prog.add_task(what, total=total)
        yield lambda: prog.advance(task)


def _target(name: str, cfg: PipelineConfig):
    """The target with the config's protocol and RPC overrides applied."""
    from mosc.compiler.targets import load_target

    tg = load_target(name).with_rpc(cfg.tracker or None, cfg.key or None)
    p = tg.protocol
    proto = dataclasses.replace(p, warmup=cfg.measure_warmup if cfg.measure_warmup >= 0 else p.warmup,
                                repeats=cfg.measure_repeats or p.repeats)
    return dataclasses.replace(tg, protocol=proto)


def _remote_for(tg, cfg: PipelineConfig):
    from mosc.rpc import Remote

    if cfg.tracker or cfg.key or tg.is_cross or tg.device_type() != "cpu":
        return Remote(tg.rpc.tracker_host, tg.rpc.tracker_port, tg.rpc.key)
    return None


def run_pipeline(cfg: PipelineConfig, out_dir: str | Path, console: Console | None = None) -> dict:
    """Run every stage into out_dir; returns (and writes to out_dir/summary.json) the summary."""
    from mosc.fileio import atomic_write_json

    cfg.check()
    console = console or Console()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda msg: console.print(msg, highlight=False, markup=False, soft_wrap=True)  # noqa: E731
    st = _Stages(console)
    t_all = time.perf_counter()
    s: dict = {"config": cfg.to_dict(), "out_dir": str(out)}
    run_dir, db_path = out / "run", out / "latency.db"
    tune_db = Path(cfg.tune_db).expanduser() if cfg.tune_db else None
    tg = _target(cfg.target, cfg)

    # 1. train ------------------------------------------------------------------------------
    def train_stage():
        from mosc.fileio import latest_checkpoint
        from mosc.nn.train import TrainConfig, load_trained, train

        tc = TrainConfig(steps=cfg.train_steps, max_tokens=cfg.train_max_tokens, lr=cfg.train_lr,
                         warmup=cfg.train_warmup, save_every=max(cfg.train_steps // 2, 1), seed=cfg.seed,
                         log_every=max(1, min(20, cfg.train_steps // 10)))
        ck = latest_checkpoint(run_dir) if run_dir.exists() else None
        done = None
        if ck is not None:
            from mosc.fileio import read_json

            done = read_json(ck / "config.json", "checkpoint config").get("train", {}).get("step")
        if ck is not None and done is not None and done >= cfg.train_steps:
            log(f"{run_dir} is already at step {done} (>= {cfg.train_steps}): reusing it")
            r = {"steps": done, "resumed": True, "trained_now": 0}
        else:
            corpus_args = {"max_train_pairs": cfg.max_train_pairs} if cfg.max_train_pairs else {}
            if ck is not None:
                log(f"resuming {run_dir} from step {done}")
            res = train(run_dir, corpus=cfg.corpus, space=cfg.space, mode=cfg.mode, cfg=tc,
                        model_overrides={"n_experts": cfg.experts, "dropout": cfg.train_dropout},
                        corpus_args=corpus_args, resume=ck is not None)
            r = {"steps": res.steps, "resumed": ck is not None, "final_loss": res.final_loss,
                 "tokens_per_s": res.tokens_per_s}
        model, tok, meta = load_trained(run_dir)
        r["checkpoint"] = str(latest_checkpoint(run_dir))
        log(f"supernet: {meta['corpus']} corpus, {model.cfg.ffn_mode.value} mode, step {r['steps']}; {r['checkpoint']}")
        return r

    s["train"] = st.run("train", f"train a {cfg.mode} supernet ({cfg.space} space, {cfg.corpus} corpus)", train_stage)

    # 2. measure ----------------------------------------------------------------------------
    remote = _remote_for(tg, cfg)

    def measure(archs: list, what: str) -> tuple:
        """Measure archs on the target through TVM into the pipeline's latency DB (archs already
        there are skipped); returns (campaign result, device key, {arch hash: latency ms})."""
        from mosc.jobs.artifacts import ArtifactCache, ModelSource
        from mosc.device.db import LatencyDB
        from mosc.device.measure import Campaign

        source = ModelSource(checkpoint=run_dir, space=cfg.space, mode=cfg.mode, seed=cfg.seed)
        # Untuned measurement builds read an empty tuning database, not the machine's: otherwise
        # schedules tuned later (the winner's, another run's) would leak into some rows only.
        cache = ArtifactCache(tg, source, root=out / "artifacts", tune=cfg.measure_tune, trials=cfg.measure_trials,
                              tune_db=tune_db if cfg.measure_tune else out / "tune-db-empty", log=log)
        with LatencyDB(db_path) as ldb, _bar(console, what, len(archs)) as advance:
            camp = Campaign(tg, "tvm", ldb, remote=remote, log=log, source="mosc pipeline")
            camp.probe()
            if camp.emulated:
                raise MoscError(f"the {tg.name} device is emulated: its timings are not speeds, nothing to fit on")
            res = camp.run(archs, lambda a: cache.prepare(a, "tvm"), done=advance)
            rows = {r.arch.hash: r.latency_ms for r in ldb.rows(tg.name, backend="tvm") if r.arch is not None}
        return res, camp.key, {a.hash: rows[a.hash] for a in archs if a.hash in rows}

    measure_label = (f"tuned ({cfg.measure_trials} trials each)" if cfg.measure_tune else
                     "UNTUNED builds (no schedules: absolute times are pessimistic, the ranking is what counts)")

    def measure_stage():
        from mosc.jobs.artifacts import ModelSource, load_space, sample_archs

        sp = load_space(ModelSource(checkpoint=run_dir))
        archs = sample_archs(sp, cfg.measure_archs, cfg.seed)
        p = tg.protocol
        log(f"measuring {len(archs)} archs on {tg.name} through TVM, {measure_label}; protocol: batch {p.batch}, "
            f"source {p.source_len}, {p.decoder_steps} decoder steps, {p.warmup} warm-up + {p.repeats} timed runs")
        res, key, measured = measure(archs, f"measuring on {tg.name}")
        lat = sorted(measured.values())
        log(f"measured {len(res.measured)} new, {len(res.skipped)} already in {db_path}; "
            f"latency {lat[0]:.2f}..{lat[-1]:.2f} ms, median {statistics.median(lat):.2f} ms")
        return {"archs": len(archs), "new": len(res.measured), "skipped": len(res.skipped), "tuned": cfg.measure_tune,
                "label": measure_label, "db": str(db_path), "device_key": key, "latency_ms": measured,
                "median_ms": statistics.median(lat)}

    s["measure"] = st.run("measure", f"measure {cfg.measure_archs} subnets on {tg.name} (TVM)", measure_stage)

    # 3. predictor --------------------------------------------------------------------------
    def predictor_stage():
        from mosc.jobs.artifacts import ModelSource, load_space
        from mosc.search.predictor import fit, fit_eval, read_db

        sp = load_space(ModelSource(checkpoint=run_dir))
        data = read_db(db_path, tg.name, sp.name, backend="tvm")
        metrics = None
        if len(data) >= 50:  # a 10% held-out split of at least 5 rows
            _, metrics = fit_eval(data, model=cfg.predictor, seed=cfg.seed, space=sp)
        p = fit(data, model=cfg.predictor, seed=cfg.seed, space=sp)
        path = out / "predictor.json"
        p.save(path)
        from mosc.search.predictor import metrics as score

        fit_m = score(data.latency_ms, p.predict_features(data.features, data.archs))
        log(f"{cfg.predictor} predictor on {len(data)} rows ({p.features} features): in-sample MAPE "
            f"{fit_m['mape']:.1%}, Kendall tau {fit_m['kendall_tau'] or float('nan'):.2f}"
            + (f"; held-out MAPE {metrics['mape']:.1%}" if metrics else " (too few rows for a held-out split)"))
        return p, {"path": str(path), "model": cfg.predictor, "features": p.features, "rows": len(data),
                   "in_sample": fit_m, "held_out": metrics}

    pred, s["predictor"] = st.run("predictor", f"fit the {cfg.predictor} latency predictor", predictor_stage)

    # 4. search -----------------------------------------------------------------------------
    def search_stage():
        from mosc.search.evolve import Cached, EvoConfig, evolve, front_csv, pareto_search, plot_front

        from mosc.nn.evaluate import supernet_fitness
        from mosc.nn.train import load_run_corpus, load_trained

        model, tok, meta = load_trained(run_dir)
        sp = model.space
        score = Cached(supernet_fitness(model, load_run_corpus(meta, tok), cfg.val_sentences))  # shared by both searches
        budget = cfg.latency_budget_ms or s["measure"]["median_ms"]
        ec = EvoConfig(population=cfg.population, parents=min(cfg.parents, cfg.population), mutations=cfg.mutations,
                       crossovers=cfg.crossovers, mutation_prob=cfg.mutation_prob, generations=cfg.generations,
                       seed=cfg.seed)
        log(f"budget {budget:.2f} ms ({'configured' if cfg.latency_budget_ms else 'median measured latency'}); "
            f"fitness: supernet validation loss on {cfg.val_sentences} sentences")
        with _bar(console, "search generations", cfg.generations * (2 if cfg.pareto else 1)) as advance:
            step = lambda msg: (log(msg), advance())  # noqa: E731  (evolve logs once per generation)
            res = evolve(sp, score, pred.latency, budget, ec, log=step)
            front = res.front
            if cfg.pareto:
                log("NSGA-II for the loss-latency front:")
                front = pareto_search(sp, score, pred.latency, None, ec, log=step).front
                fits = [c for c in front if c.latency_ms <= budget and c.loss < res.best.loss]
                if fits:  # NSGA-II found a lower-loss arch that also meets the budget: it wins
                    res.best = min(fits, key=lambda c: (c.loss, c.latency_ms))
        d = out / "search"
        d.mkdir(exist_ok=True)
        from mosc.fileio import atomic_write_text

        atomic_write_text(d / "best.json", res.best.arch.to_json(indent=2) + "\n")
        atomic_write_text(d / "pareto.csv", front_csv(front))
        atomic_write_json(d / "pareto.json", {"front": [c.to_dict() for c in front]})
        measured = s["measure"]["latency_ms"]
        pts = [(ms, score(a)) for h, ms in measured.items() for a in [_arch_of(sp, h, run_dir, cfg)] if a]
        plot_front(d / "pareto.png", front, pts, f"{tg.name}: loss vs latency ({sp.name})", budget,
                   "validation loss (nats/token)")
        b = res.best
        log(f"best under {budget:.2f} ms: {b.arch.hash}, loss {b.loss:.4f}, predicted {b.latency_ms:.2f} ms "
            f"({score.calls} archs scored in all)")
        return res.best, front, {"budget_ms": budget, "budget_from": "config" if cfg.latency_budget_ms else "median measured",
                                 "best": b.to_dict(), "evaluated": score.calls, "dir": str(d)}

    best, front, s["search"] = st.run("search", "evolutionary search under the latency budget + Pareto front", search_stage)

    # 5. collapse + export ------------------------------------------------------------------
    def export_stage():
        from mosc.nn.export import Shapes, export_subnet
        from mosc.nn.model import load_supernet
        from mosc.nn.subnet import collapse, save_subnet

        supernet, meta = load_supernet(run_dir)
        sub = collapse(supernet, best.arch)
        sub_dir = out / "subnet"
        save_subnet(sub, sub_dir, {"source": f"{run_dir} at arch {best.arch.hash}", "tokenizer": meta.get("tokenizer")})
        exports = {}
        for name in dict.fromkeys(["host", tg.name] + ([cfg.cross_target] if cfg.cross_target else [])):
            shapes = Shapes.from_target(name)
            key = f"b{shapes.batch}s{shapes.source_len}t{shapes.cache_len}"
            if key not in exports:
                d = out / f"onnx-{key}"
                m = export_subnet(sub, d, shapes, tokenizer_json=meta.get("tokenizer"), check=True,
                                  extra={"source": f"{run_dir} at arch {best.arch.hash}"})
                par = m.get("parity") or {}
                log(f"exported {d} ({m['param_count']:,} parameters; onnxruntime greedy tokens "
                    f"{'match' if par.get('greedy_tokens_equal') else 'DIFFER from'} torch)")
                exports[key] = str(d)
        return {"subnet": str(sub_dir), "arch": best.arch.to_dict(), "arch_hash": best.arch.hash,
                "param_count": sum(p.numel() for p in sub.parameters()), "onnx": exports}

    s["export"] = st.run("export", f"collapse + export the winner {best.arch.hash}", export_stage)

    # 6. compile ----------------------------------------------------------------------------
    def compile_stage():
        from mosc.compiler import compile as C
        from mosc.nn.export import Shapes
        from mosc.contract import load_export, onnx_files

        arts = {}

        def one(t, tune: bool, trials: int):
            sh = Shapes.from_target(t)
            onnx = Path(s["export"]["onnx"][f"b{sh.batch}s{sh.source_len}t{sh.cache_len}"])
            meta = load_export(onnx)
            model = {k: meta.get(k) for k in ("arch", "arch_hash", "shapes", "bos_id", "eos_id", "pad_id",
                                              "param_count", "parity", "tokenizer")}
            model["onnx_sha256"] = meta["files"]
            d = out / f"artifact-{t.name}"
            what = f"tuned, {trials} trials" if tune else "untuned (--no-tune)"
            log(f"compiling for {t.name} ({what}) -> {d}")
            C.compile_artifact(onnx_files(onnx, meta), t, d, trials=trials, tune=tune, db_dir=tune_db,
                               extra_manifest={"model": model})
            m = C.read_manifest(d)
            r = m["tuning"]["report"]
            log(f"  {m['compile_seconds']:.1f} s" + (f"; {r['tasks']} tasks: {r['cached']} cached, {r['tuned']} tuned, "
                                                    f"{r.get('untried', 0)} without a trial; {r['trials']} trials"
                                                    if r else ""))
            return {"path": str(d), "tuned": tune, "trials": trials if tune else 0,
                    "compile_seconds": m["compile_seconds"]}

        tune_host = cfg.compile_tune and cfg.compile_trials > 0
        host_tg = tg if tg.name == "host" else _target("host", cfg)
        arts["host"] = one(host_tg, tune_host, cfg.compile_trials)
        if tg.name != "host":
            arts[tg.name] = one(tg, tune_host, cfg.compile_trials)
        ct = cfg.cross_target
        if ct and ct not in arts:
            cross = _target(ct, PipelineConfig())
            cc = cross.cross_compiler
            if cc and not shutil.which(cc):
                log(f"skipping {ct}: cross compiler {cc!r} not on PATH (apt-get install gcc-aarch64-linux-gnu)")
                arts[ct] = {"skipped": f"cross compiler {cc} not found"}
            else:
                arts[ct] = one(cross, False, 0)
        return arts

    s["compile"] = st.run("compile", "compile with TVM", compile_stage)

    # 7. translate --------------------------------------------------------------------------
    def translate_stage():
        from mosc.compiler.compile import load_artifact, read_manifest
        from mosc.nn.data import SubwordTokenizer
        from mosc.nn.train import load_run_corpus, load_trained
        from mosc.runtime import artifact_backend, translate_ids

        art_dir = Path(s["compile"]["host"]["path"])
        model = read_manifest(art_dir)["model"]
        tok = SubwordTokenizer.from_json(model["tokenizer"])
        _, _, meta = load_trained(run_dir)
        val = load_run_corpus(meta, tok).val
        n = min(cfg.translate_sentences, len(val))
        backend = artifact_backend(load_artifact(art_dir))
        t0 = time.perf_counter()
        ids, _ = translate_ids(backend, [tok.encode(x) for x in val.src_text[:n]], model["bos_id"], model["eos_id"],
                               model["pad_id"])
        ms = (time.perf_counter() - t0) * 1000
        rows = [{"source": val.src_text[i], "output": tok.decode(ids[i]), "reference": val.tgt_text[i]} for i in range(n)]
        t = Table("source", "output (compiled host artifact)", "reference", title=f"{n} validation sentences",
                  show_lines=True)
        for r in rows:
            t.add_row(r["source"], r["output"], r["reference"])
        console.print(t)
        return {"artifact": str(art_dir), "sentences": rows, "ms": round(ms, 1)}

    s["translate"] = st.run("translate", "translate with the compiled host artifact", translate_stage)

    # 8. check the front ------------------------------------------------------------------
    def check_stage():
        from mosc.nn.evaluate import evaluate
        from mosc.nn.train import load_run_corpus, load_trained

        picks = front_picks(front, best, cfg.bleu_archs)
        model, tok, meta = load_trained(run_dir)
        data = load_run_corpus(meta, tok)
        n = min(cfg.bleu_sentences, len(data.val))
        bleu = {}
        with _bar(console, "BLEU", len(picks)) as advance:
            for c in picks:
                bleu[c.arch.hash] = evaluate(model, data, c.arch, split="val", max_sentences=n).bleu
                log(f"{c.arch.hash}: BLEU {bleu[c.arch.hash]:.2f} on {n} validation sentences, loss {c.loss:.4f}, "
                    f"predicted {c.latency_ms:.2f} ms")
                advance()
        log(f"measuring the {len(picks)} checked archs on {tg.name} (like the sample: {measure_label})")
        _, _, measured = measure([c.arch for c in picks], f"measuring on {tg.name}")
        measured = {**s["measure"]["latency_ms"], **measured}
        rows = []
        for c in front + ([best] if best.arch.hash not in {c.arch.hash for c in front} else []):
            rows.append({"arch_hash": c.arch.hash, "loss": c.loss, "bleu": bleu.get(c.arch.hash),
                         "predicted_ms": c.latency_ms, "measured_ms": measured.get(c.arch.hash),
                         "winner": c.arch.hash == best.arch.hash})
        rows.sort(key=lambda r: r["predicted_ms"])
        errs = [abs(r["predicted_ms"] / r["measured_ms"] - 1) for r in rows if r["bleu"] is not None and r["measured_ms"]]
        log(f"predicted vs measured on the checked archs: mean error {statistics.mean(errs):.1%}, max {max(errs):.1%}")
        # the deployment artifact of the winner (tuned when compile_tune), timed with the same protocol
        art = s["compile"][tg.name]
        from mosc.regress import bench

        stats = bench(tg, art["path"], remote=remote)["stats"]  # mosc bench's measurement, local or RPC
        log(f"winner's compiled {tg.name} artifact ({'tuned, %d trials' % art['trials'] if art['tuned'] else 'untuned'}): "
            f"{stats['latency_ms']:.2f} ms (median {stats['median_ms']:.2f}, p90 {stats['p90_ms']:.2f})")
        return rows, {"path": art["path"], "tuned": art["tuned"], "trials": art["trials"], **{
            k: stats[k] for k in ("latency_ms", "median_ms", "p90_ms", "std_ms")}}

    s["front"], s["winner_artifact"] = st.run("check", "check the front: BLEU and measured latency", check_stage)
    s["stage_seconds"] = st.times
    s["total_seconds"] = round(time.perf_counter() - t_all, 2)
    s["artifacts"] = {"run": str(run_dir), "latency_db": str(db_path), "predictor": s["predictor"]["path"],
                      "search": s["search"]["dir"], "subnet": s["export"]["subnet"], **{
                          f"onnx {k}": v for k, v in s["export"]["onnx"].items()},
                      **{f"artifact {k}": v.get("path", "skipped: " + v.get("skipped", "")) for k, v in s["compile"].items()}}
    s["next"] = next_commands(cfg, out)
    atomic_write_json(out / "summary.json", s)
    print_summary(s, console)
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


def _arch_of(sp, h: str, run_dir: Path, cfg: PipelineConfig):
    """The sampled arch with hash h (measured archs are the seeded sample)."""
    from mosc.jobs.artifacts import sample_archs

    cache = _arch_of.__dict__.setdefault("cache", {})
    key = (sp.name, cfg.measure_archs, cfg.seed)
    if key not in cache:
        cache[key] = {a.hash: a for a in sample_archs(sp, cfg.measure_archs, cfg.seed)}
    return cache[key].get(h)


def next_commands(cfg: PipelineConfig, out: Path) -> list[str]:
    return [
        "mosc pipeline --config examples/multi30k.toml -o runs/m30k-pipeline   # real data (../shared/data/multi30k), bigger budget",
        "mosc pipeline --config examples/rpi4.toml -o runs/rpi4-pipeline       # a real Raspberry Pi over RPC (see the file's comments)",
        f"mosc translate --artifact {out}/artifact-host --text \"...\"          # the compiled winner",
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
              caption=f"measured: {'tuned' if s['measure']['tuned'] else 'untuned'} TVM builds, the target's protocol; "
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
        console.print(f"winner's deployment artifact ({'tuned, %d trials' % w['trials'] if w['tuned'] else 'untuned'}): "
                      f"{w['latency_ms']:.2f} ms measured ({w['path']})", highlight=False)
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

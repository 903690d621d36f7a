"""The encoder-only (BERT) main job end to end: `mosc pipeline --config examples/bert-tiny.toml`.

pre-train a MoS BERT supernet on plain text (masked LM, sandwich rule) -> search the space
for the lowest validation MLM loss under a parameter budget -> collapse the winner and
fine-tune it on SST-2 -> export it with its classifier head (ONNX, checked against
ONNX Runtime) -> tune the space's workloads at the export's shape into the target's
database (mosc.jobs.tune; a later run goes on) -> compile with TVM from that database
(host; a cross target, untuned, when its compiler exists) ->
check: SST-2 dev accuracy of the compiled artifact equals torch's, and one classification
timed with TVM, ONNX Runtime and torch side by side -> summary (printed, summary.json).

Every stage is a call into the library (mosc.jobs.bert, mosc.nn.finetune,
mosc.jobs.bert_deploy, mosc.jobs.tune, mosc.jobs.build); the stage loop is mosc.pipeline's. A
`BertPipelineConfig` is a flat TOML file whose `space` names an encoder-only space;
`mosc pipeline` picks this module by that key. An existing OUT/run is resumed (a finished
one reused).
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from mosc.errors import MoscError
from mosc.pipeline import Stage, check_common, run_stages, tune_summary


@dataclass
class BertPipelineConfig:
    # -- pre-training (stage 1) --------------------------------------------------------------
    corpus: str = "default"  # 'default' (wikitext-2 + SST-2 train + Multi30k English), a folder of .txt files, or one file
    space: str = "bert-tiny"  # an encoder-only space: built-in name or a .toml path
    mode: str = "neuron"  # FFN mode: shared, layer or neuron (MoS)
    experts: int = 2  # m: experts per FFN matrix (MoS modes)
    vocab_size: int = 4000  # BPE vocabulary of the text (the model adds [MASK])
    seq_len: int = 64  # tokens per pre-training block and per fine-tuning sentence
    train_steps: int = 400  # pre-training updates (~3 min on 2 cores for bert-tiny)
    train_max_tokens: int = 2048  # tokens per batch (max_tokens // seq_len blocks)
    train_lr: float = 1e-3  # peak learning rate
    train_warmup: int = 40  # linear warm-up updates
    distill: float = 0.0  # in-place distillation weight (largest arch teaches the sampled ones)
    seed: int = 0  # seed of pre-training, the search and fine-tuning
    # -- search under a parameter budget (stage 2) -----------------------------------------------
    max_params: int = 0  # most parameters of the static encoder (0 = halfway between the smallest and largest arch)
    population: int = 20  # population size (HAT: 125)
    parents: int = 5  # parents kept per generation (HAT: 25)
    mutations: int = 10  # mutated children per generation (HAT: 50)
    crossovers: int = 10  # crossover children per generation (HAT: 50)
    mutation_prob: float = 0.3  # per-gene mutation probability (HAT: 0.3)
    generations: int = 5  # generations (HAT: 30)
    # -- fine-tuning on SST-2 (stage 3) ------------------------------------------------------------
    sst2_dir: str = ""  # folder with train.tsv(.gz) and dev.tsv(.gz) ("" = ../shared/data/sst2)
    finetune_steps: int = 600  # fine-tuning updates (~0.03 s each for bert-tiny)
    finetune_lr: float = 1e-3  # peak AdamW learning rate (a tiny encoder wants more than BERT-base's 2e-5..5e-5)
    finetune_batch: int = 32  # sentences per update
    # -- deploy (stages 4-7) --------------------------------------------------------------------------
    target: str = "host"  # device compiled for and timed on (a name in targets/; timing runs here)
    cross_target: str = "rpi4"  # also cross-compile for this target when its compiler exists ("" = skip)
    tune_trials: int = 0  # trial budget for the space's workloads at the export's shape (0 = none; 1,090 trials' records ran slower than the default schedules)
    tune_budget_min: float = 1.5  # stop tuning after this many minutes (0 = no limit); the next run goes on
    latency_runs: int = 50  # interleaved rounds of one classification per backend (medians reported)

    RANGES = {
        "experts": (1, 64), "vocab_size": (300, 10**6), "seq_len": (4, 512), "train_steps": (1, 10**7),
        "train_max_tokens": (4, 10**7), "train_lr": (1e-8, 1.0), "train_warmup": (0, 10**7), "distill": (0.0, 1.0),
        "seed": (0, 2**32 - 1), "max_params": (0, 10**12), "population": (2, 10**5), "parents": (1, 10**5),
        "mutations": (0, 10**5), "crossovers": (0, 10**5), "mutation_prob": (0.0, 1.0), "generations": (1, 10**4),
        "finetune_steps": (1, 10**7), "finetune_lr": (1e-8, 1.0), "finetune_batch": (1, 10**5), "latency_runs": (1, 10**5),
        "tune_trials": (0, 10**7), "tune_budget_min": (0.0, 1e6),
    }

    @classmethod
    def from_dict(cls, raw: dict, where: str = "config") -> BertPipelineConfig:
        from mosc.tables import from_table

        return from_table(cls, raw, where).check(where)

    def check(self, where: str = "config") -> BertPipelineConfig:
        from mosc.bert_space import BertSpace

        check_common(self, where)
        if self.train_max_tokens < self.seq_len:
            raise MoscError(f"{where}: train_max_tokens ({self.train_max_tokens}) holds no block of seq_len {self.seq_len}")
        BertSpace.load(self.space)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def is_bert_config(raw: dict) -> bool:
    """Whether a pipeline TOML (as a dict) names an encoder-only space (its `space` key)."""
    from mosc.bert_space import is_bert_space

    space = raw.get("space", "tiny") if isinstance(raw, dict) else "tiny"
    return isinstance(space, str) and is_bert_space(space)


@dataclass
class BertRun:
    cfg: BertPipelineConfig
    out: Path
    console: Console
    summary: dict = field(default_factory=dict)  # written to OUT/summary.json
    best: Any = None  # the winner, a search Candidate (stage search)
    encoder: Any = None  # the fine-tuned BertEncoder (stage finetune)
    sst2: Any = None  # mosc.nn.finetune.Sst2, tokenized with the run's tokenizer

    @property
    def run_dir(self) -> Path:
        return self.out / "run"

    def log(self, msg: str) -> None:
        self.console.print(msg, highlight=False, markup=False, soft_wrap=True)

    def target(self, name: str):
        from mosc.compiler.targets import load_target

        return load_target(name)


# ---------------------------------------------------------------------------- the stages
def train_stage(r: BertRun) -> dict:
    from mosc.jobs.model import train_or_resume
    from mosc.nn.train import TrainConfig

    c = r.cfg
    tc = TrainConfig(steps=c.train_steps, max_tokens=c.train_max_tokens, max_len=c.seq_len, lr=c.train_lr,
                     warmup=c.train_warmup, distill=c.distill, label_smoothing=0.0, seed=c.seed,
                     save_every=max(c.train_steps // 2, 1), log_every=max(1, min(20, c.train_steps // 10)))
    res = train_or_resume(r.run_dir, steps=c.train_steps, corpus=c.corpus, space=c.space, mode=c.mode, cfg=tc,
                          model_overrides={"n_experts": c.experts}, corpus_args={"vocab_size": c.vocab_size}, log=r.log)
    r.log(f"BERT supernet: {c.mode} mode, {c.corpus} text, step {res['steps']}; {res['checkpoint']}")
    return {"train": res}


def search_stage(r: BertRun) -> dict:
    from mosc.bert_space import param_count
    from mosc.jobs.bert import mlm_fitness, search_params, write_search
    from mosc.search.evolve import EvoConfig

    c = r.cfg
    fit = mlm_fitness(r.run_dir)
    sp, V = fit.space, fit.vocab_size
    lo, hi = param_count(sp.smallest(), sp, V), param_count(sp.largest(), sp, V)
    budget = c.max_params or (lo + hi) // 2
    evo = EvoConfig(population=min(c.population, sp.size()), parents=min(c.parents, sp.size()), mutations=c.mutations,
                    crossovers=c.crossovers, mutation_prob=c.mutation_prob, generations=c.generations, seed=c.seed)
    res = search_params(fit, budget, evo, log=r.log)
    write_search(r.out / "search", res, {"space": sp.name, "checkpoint": str(r.run_dir), "max_params": budget,
                                         "fitness": "validation masked-LM loss", "config": evo.__dict__})
    r.best = res.best
    largest = fit.score(sp.largest())
    r.log(f"winner {res.best.arch.hash} {list(res.best.arch.hidden)}: MLM loss {res.best.loss:.4f}, "
          f"{res.best.latency_ms * 1e6:,.0f} parameters (budget {budget:,}; largest arch: {hi:,}, loss {largest:.4f})")
    return {"search": {"dir": str(r.out / "search"), "max_params": budget, "evaluated": res.evaluated,
                       "best": {"arch": res.best.arch.to_dict(), "arch_hash": res.best.arch.hash,
                                "mlm_valid_loss": res.best.loss, "params": round(res.best.latency_ms * 1e6)},
                       "largest": {"params": hi, "mlm_valid_loss": largest}, "seconds": round(res.seconds, 1)}}


def finetune_stage(r: BertRun) -> dict:
    from mosc.nn.bert import collapse_bert, save_bert_encoder
    from mosc.nn.finetune import FinetuneConfig, finetune, load_sst2
    from mosc.nn.train import load_bert_trained

    c = r.cfg
    supernet, tok, meta = load_bert_trained(r.run_dir)
    r.sst2 = load_sst2(tok, c.seq_len, c.sst2_dir or None)
    fc = FinetuneConfig(steps=c.finetune_steps, lr=c.finetune_lr, batch_size=c.finetune_batch, seq_len=c.seq_len,
                        seed=c.seed)
    enc, res = finetune(collapse_bert(supernet, r.best.arch), fc, r.sst2, progress=True)
    r.encoder = enc
    d = r.out / "encoder"
    save_bert_encoder(enc, d, {"tokenizer": meta["tokenizer"], "source": f"{r.run_dir} at arch {r.best.arch.hash}",
                               "sst2_dev_acc": res["sst2_dev_acc"]})
    r.log(f"fine-tuned {fc.steps} steps on {len(r.sst2.train):,} SST-2 sentences: dev accuracy "
          f"{res['sst2_dev_acc']:.4f} ({len(r.sst2.dev)} sentences) -> {d}")
    return {"finetune": {"encoder": str(d), "sst2_dev_acc": res["sst2_dev_acc"], "steps": fc.steps,
                         "seconds": round(res["seconds"], 1)}}


def export_stage(r: BertRun) -> dict:
    from mosc.jobs.bert_deploy import export_bert_encoder

    d = r.out / "onnx"
    m = export_bert_encoder(Path(r.summary["finetune"]["encoder"]), d, r.target(r.cfg.target),
                            shapes={"batch": 1, "source_len": r.cfg.seq_len}, check=True)
    r.log(f"exported {d} ({m['param_count']:,} parameters; ONNX Runtime parity checked)")
    return {"export": {"onnx": str(d), "param_count": m["param_count"], "parity": m.get("parity")}}


def _one_row(tg):
    """The target with batch 1 in its protocol: the pipeline exports, tunes and times one classification."""
    return tg if tg.protocol.batch == 1 else dataclasses.replace(tg, protocol=dataclasses.replace(tg.protocol, batch=1))


def tune_stage(r: BertRun) -> dict:
    from mosc.bert_space import BertSpace
    from mosc.jobs.tune import ModelShape, tune_space

    c = r.cfg
    if c.tune_trials == 0:
        r.log("tune_trials = 0: no tuning; the build uses the database as it is plus default schedules")
        return {"tune": {"trials": 0}}
    # the export's shape: the fine-tuned encoder's vocabulary, positions and classes, batch 1, seq_len
    shape = dataclasses.replace(ModelShape.of_checkpoint(Path(r.summary["finetune"]["encoder"])), seq_len=c.seq_len)
    sf, extra, rep = tune_space(BertSpace.load(c.space), shape, _one_row(r.target(c.target)), trials=c.tune_trials,
                                budget_min=c.tune_budget_min or None, log=r.log)
    return tune_summary(sf, extra, rep, r.log)


def compile_stage(r: BertRun) -> dict:
    from mosc.compiler.artifact import describe_coverage, schedule_coverage
    from mosc.jobs.build import compile_export

    c, onnx = r.cfg, Path(r.summary["export"]["onnx"])
    arts = {}
    for name in dict.fromkeys([c.target] + ([c.cross_target] if c.cross_target else [])):
        tg = r.target(name)
        if tg.cross_compiler and not shutil.which(tg.cross_compiler):
            r.log(f"skipping {name}: cross compiler {tg.cross_compiler!r} not on PATH (apt-get install gcc-aarch64-linux-gnu)")
            arts[name] = {"skipped": f"cross compiler {tg.cross_compiler} not found"}
            continue
        d = r.out / f"artifact-{name}"
        comp = compile_export(onnx, tg, d, tune=False, log=r.log)  # from the target's database (tuned above for cfg.target)
        cov = schedule_coverage(comp.manifest)
        from_db, total = cov["from_database"], cov["functions"]
        arts[name] = {"path": str(d), "compile_seconds": comp.manifest["compile_seconds"], "functions": total,
                      "functions_from_database": from_db}
        r.log(f"  {name}: {comp.manifest['compile_seconds']:.1f} s; {describe_coverage(cov, comp.manifest['device'])} -> {d}")
    return {"compile": arts}


def check_stage(r: BertRun) -> dict:
    """The compiled artifact classifies SST-2 dev as torch does; one classification timed side by side."""
    import numpy as np

    from mosc.compiler.artifact import load_artifact, read_manifest
    from mosc.jobs.bert_deploy import classifier_latency
    from mosc.nn.finetune import evaluate_accuracy
    from mosc.runtime import artifact_classifier

    art_dir = Path(r.summary["compile"][r.cfg.target]["path"])
    if r.cfg.target != "host":
        return {"check": {"skipped": "timing and artifact accuracy run on the host target only"}}
    art = load_artifact(art_dir, read_manifest(art_dir).get("device", "cpu"))
    clf = artifact_classifier(art)
    dev = r.sst2.dev
    tokens = np.zeros((len(dev), clf.seq_len), dtype=np.int64)
    tokens[:, : dev.tokens.shape[1]] = dev.tokens[:, : clf.seq_len].numpy()
    pred = np.array([int(clf.run(tokens[i : i + 1]).argmax()) for i in range(len(dev))])
    tvm_acc = float((pred == dev.labels.numpy()).mean())
    torch_acc = evaluate_accuracy(r.encoder, dev)
    lat = classifier_latency(art_dir, Path(r.summary["export"]["onnx"]), r.encoder, runs=r.cfg.latency_runs)
    ms = {k: v["median_ms"] for k, v in lat["latency"].items()}
    r.log(f"SST-2 dev accuracy: compiled (TVM) {tvm_acc:.4f}, torch {torch_acc:.4f}; one classification: "
          f"TVM {ms['tvm']:.3f} ms, ONNX Runtime {ms['ort']:.3f} ms, torch {ms['torch']:.3f} ms")
    return {"check": {"sst2_dev_acc_tvm": tvm_acc, "sst2_dev_acc_torch": torch_acc, "latency_ms": ms,
                      "tvm_over_ort": ms["tvm"] / ms["ort"], "latency": lat}}


STAGES = [
    Stage("train", lambda r: f"pre-train a {r.cfg.mode} BERT supernet ({r.cfg.space} space, masked LM, {r.cfg.corpus} text)", train_stage),
    Stage("search", lambda r: "evolutionary search: lowest validation MLM loss under the parameter budget", search_stage),
    Stage("finetune", lambda r: f"collapse the winner {r.best.arch.hash} and fine-tune it on SST-2", finetune_stage),
    Stage("export", lambda r: "export the encoder and its classifier head (ONNX)", export_stage),
    Stage("tune", lambda r: f"tune the {r.cfg.space} space's workloads for {r.cfg.target} at the export's shape", tune_stage),
    Stage("compile", lambda r: "compile with TVM from the tuning database", compile_stage),
    Stage("check", lambda r: "check: compiled accuracy and latency (TVM vs ONNX Runtime vs torch)", check_stage),
]


def run_bert_pipeline(cfg: BertPipelineConfig, out_dir: str | Path, console: Console | None = None,
                      stages: list[Stage] = STAGES) -> dict:
    """Run every stage into out_dir; returns (and writes to out_dir/summary.json) the summary."""
    from mosc.fileio import atomic_write_json

    cfg.check()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    r = BertRun(cfg, out, console or Console())
    r.summary.update(config=cfg.to_dict(), out_dir=str(out))
    run_stages(r, stages)
    s = r.summary
    atomic_write_json(out / "summary.json", s)
    print_summary(s, r.console)
    return s


def print_summary(s: dict, console: Console) -> None:
    b, ck = s["search"]["best"], s.get("check", {})
    t = Table("", "value", title="BERT pipeline")
    t.add_row("winner", f"{b['arch_hash']} hidden {b['arch']['hidden']}")
    t.add_row("parameters", f"{b['params']:,} (budget {s['search']['max_params']:,}; largest {s['search']['largest']['params']:,})")
    t.add_row("validation MLM loss", f"{b['mlm_valid_loss']:.4f} (largest arch {s['search']['largest']['mlm_valid_loss']:.4f})")
    t.add_row("SST-2 dev accuracy", f"{s['finetune']['sst2_dev_acc']:.4f}" +
              (f" (compiled artifact: {ck['sst2_dev_acc_tvm']:.4f})" if "sst2_dev_acc_tvm" in ck else ""))
    if "latency_ms" in ck:
        ms = ck["latency_ms"]
        t.add_row("one classification", f"TVM {ms['tvm']:.3f} ms, ONNX Runtime {ms['ort']:.3f} ms, torch {ms['torch']:.3f} ms "
                  f"(TVM/ORT {ck['tvm_over_ort']:.2f})")
    tn = s.get("tune", {})
    if "workloads" in tn:
        t.add_row("space tuning", f"{tn['with_record']}/{tn['workloads']} workloads with a record, "
                  f"{tn['trials']} trials this run ({tn['trials_total']} in {tn['db']})")
    for k, v in s["compile"].items():
        cov = f" ({v['functions_from_database']}/{v['functions']} functions from database records)" if "functions" in v else ""
        t.add_row(f"artifact {k}", v.get("path", "skipped: " + v.get("skipped", "")) + cov)
    t.add_row("wall time", ", ".join(f"{k} {v:.0f} s" for k, v in s["stage_seconds"].items()) + f"; total {s['total_seconds']:.0f} s")
    console.print(t)
    console.print(f"[green]done[/]: {s['out_dir']}/summary.json")

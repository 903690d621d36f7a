"""The `mosc` command line: options, one job call, printing.

Each command declares its options, turns them into plain arguments (a Target object, an
Arch, paths), calls one function of `mosc.jobs` (or a library function when the job is a
single call) and prints the result with rich. It holds no domain logic: what a job does,
and every policy (checks, what gets reused, where things run), lives in the jobs.
Heavy imports (torch, tvm) happen inside the commands so `mosc --help` answers at once. A
`MoscError` from anywhere becomes one red line on stderr and exit code 2; anything else is
a bug and keeps its traceback.
"""

from __future__ import annotations

import enum
import functools
import json
import random
import statistics
import sys
from pathlib import Path
from typing import Optional

import typer
import typer.core
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mosc.contract import DECODER, ENCODER
from mosc.device.backends import Backend
from mosc.errors import MoscError
from mosc.jobs.search import Fitness
from mosc.nn.modes import FFNMode
from mosc.search.predictor import FeatureSet, Model

console = Console()
err_console = Console(stderr=True)


def error_line(msg: str) -> None:
    """The one red line every bad input ends with (plain text: "[rpc]" in it must print, not be markup)."""
    err_console.print(f"[bold red]error:[/] {escape(msg)}", markup=True, highlight=False, soft_wrap=True)


# Click's exception classes, wherever this typer takes click from (recent ones vendor it).
_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
_NoArgsIsHelp = getattr(sys.modules[_ClickException.__module__], "NoArgsIsHelpError", ())


class _OneLineErrors(typer.core.TyperGroup):
    """Click's usage errors (unknown option, bad choice, missing value) as one `error:` line and
    exit 2, like every other bad input, instead of a usage box."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _NoArgsIsHelp as e:  # `mosc space`: the help, not an error
            e.show()
            sys.exit(0)
        except _ClickException as e:
            where = f" (see: {e.ctx.command_path} --help)" if getattr(e, "ctx", None) else ""
            error_line(e.format_message().replace("Value error, ", "") + where)
            sys.exit(2)
        except typer.Abort:
            error_line("aborted")
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors,
    help="mosc: train, search, collapse, export and compile Mixture-of-Supernets Transformers for edge devices.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
space_app = typer.Typer(help="Inspect search spaces.", no_args_is_help=True)
arch_app = typer.Typer(help="Sample and validate architectures (arch JSON files).", no_args_is_help=True)
device_app = typer.Typer(help="RPC tracker, RPC servers and emulated devices for measuring latency.", no_args_is_help=True)
db_app = typer.Typer(help="The latency database (SQLite): import HAT's data, export, summarise.", no_args_is_help=True)
predictor_app = typer.Typer(help="Latency predictors: fit on the latency DB or a HAT CSV, evaluate.", no_args_is_help=True)
for sub, name in ((space_app, "space"), (arch_app, "arch"), (device_app, "device"), (db_app, "db"),
                  (predictor_app, "predictor")):
    app.add_typer(sub, name=name)


def _version(value: bool):
    if value:
        from mosc import __version__

        print(f"mosc {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print mosc's version and exit.")):
    """mosc: train, search, collapse, export and compile Mixture-of-Supernets Transformers for edge devices."""


def command(typer_app: typer.Typer, *args, **kwargs):
    """Register a command whose MoscErrors print one line and exit 2 (Interrupted: 130)."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*a, **kw):
            try:
                return fn(*a, **kw)
            except MoscError as e:
                error_line(str(e))
                raise typer.Exit(e.exit_code)
            except KeyboardInterrupt:
                error_line("interrupted (Ctrl-C); every file mosc writes is replaced atomically, so none is half-written")
                raise typer.Exit(130)

        return typer_app.command(*args, **kwargs)(wrapper)

    return decorate


def log(msg: str) -> None:
    """Progress lines of a job: stderr, plain text."""
    err_console.print(msg, highlight=False, markup=False, soft_wrap=True)


# ---- options used by several commands ---------------------------------------------------
SPACE_HELP = "Search space: a built-in name (tiny, wmt) or a path to a .toml file."
TARGET_HELP = "Target device: a file name in targets/ (see `mosc targets`)."
DB_HELP = "Latency database file (default: $MOSC_LATENCY_DB or ~/.cache/mosc/latency.db)."
TUNE_DB_HELP = "Tuning database folder (default: $MOSC_TUNE_DIR/<target> or ~/.cache/mosc/tune/<target>)."
CACHE_HELP = "Artifact cache folder (default: $MOSC_ARTIFACT_CACHE or ~/.cache/mosc/artifacts)."
TRACKER_HELP = "RPC tracker HOST:PORT (default: the target's \\[rpc]); giving it measures over RPC."
KEY_HELP = "Device key at the tracker (default: the target's \\[rpc] key); giving it measures over RPC."
RANDOM_SUPERNET_HELP = ("Supernet run/checkpoint; omitted: a seeded randomly initialised supernet "
                        "(latency does not depend on weights).")
SHAPE_OPTS = {
    "batch": "Batch size B of the static graphs (default: the target's protocol).",
    "source_len": "Source length S in tokens, or a BERT encoder's sequence length (default: the target's protocol source_len).",
    "cache_len": "KV-cache length T = decoder steps (default: the target's protocol decoder_steps).",
}


class Which(enum.StrEnum):
    random = "random"
    largest = "largest"
    smallest = "smallest"


def _target(name: str, tracker: str | None = None, key: str | None = None):
    """The Target object for a name, with --tracker/--key applied."""
    from mosc.compiler.targets import load_target

    return load_target(name).with_rpc(tracker, key)


def _space(name: str):
    """A translation or encoder-only (BERT) space, by what its file holds."""
    from mosc.bert_space import load_space

    return load_space(name)


def _db_path(db: Optional[Path]) -> Path:
    from mosc import env

    return db or env.latency_db_path()


def _arch_cache(tg, checkpoint, space, seed, *, cache=None, tune=True, trials=None, tune_db=None):
    """(ArtifactCache, ModelSource, SearchSpace of the weights)."""
    from mosc.jobs.artifacts import ArtifactCache, ModelSource, load_space

    source = ModelSource(checkpoint=checkpoint, space=space, seed=seed)
    return (ArtifactCache(tg, source, root=cache, tune=tune, trials=trials, tune_db=tune_db, log=log), source,
            load_space(source))


def _arch_table(arch) -> Table:
    from mosc.bert_space import BertArch

    if isinstance(arch, BertArch):
        t = Table("layer", "hidden", title=f"arch {arch.hash}")
        for i, h in enumerate(arch.hidden):
            t.add_row(str(i), str(h))
        return t
    t = Table("part", "embed", "layers", "ffn", "heads", "cross heads", "attends last k enc", title=f"arch {arch.hash}")
    t.add_row("encoder", str(arch.enc_embed), str(arch.enc_layers), str(list(arch.enc_ffn)), str(list(arch.enc_heads)), "", "")
    t.add_row("decoder", str(arch.dec_embed), str(arch.dec_layers), str(list(arch.dec_ffn)), str(list(arch.dec_heads)),
              str(list(arch.dec_cross_heads)), str(list(arch.dec_arbitrary)))
    return t


# ---- mosc space / arch ------------------------------------------------------------------


@command(space_app, "list")
def space_list():
    """List the built-in search spaces."""
    from mosc.space import builtin_spaces

    t = Table("name", "archs", "description")
    for name in builtin_spaces():
        s = _space(name)
        t.add_row(name, f"{s.size():.3e}", s.description)
    console.print(t)


@command(space_app, "show")
def space_show(name: str = typer.Argument(..., help=SPACE_HELP)):
    """Show a space's choices per dimension and its size (number of distinct archs)."""
    from mosc.bert_space import BertSpace

    s = _space(name)
    t = Table("dimension", "choices", title=f"search space {s.name!r}: {s.description}")
    if isinstance(s, BertSpace):
        for f in ("width", "layers", "hidden", "heads", "ffn_dim"):
            v = getattr(s, f)
            t.add_row(f, ", ".join(map(str, v)) if isinstance(v, tuple) else str(v))
        console.print(t)
        console.print(f"size: [bold]{s.size():,}[/] distinct archs (10^{s.summary()['log10_size']:.2f})")
        return
    for part in ("enc", "dec"):
        for f in ("embed", "layers", "ffn", "heads", "cross_heads", "arbitrary"):
            if hasattr(s, f"{part}_{f}"):
                t.add_row(f"{part}_{f}", ", ".join(map(str, getattr(s, f"{part}_{f}"))))
    t.add_row("qkv_dim", str(s.qkv_dim))
    console.print(t)
    console.print(f"size: [bold]{s.size():,}[/] distinct archs (10^{s.summary()['log10_size']:.2f})")


@command(arch_app, "sample")
def arch_sample(
    space: str = typer.Option("tiny", "--space", "-s", help=SPACE_HELP),
    seed: int = typer.Option(0, help="Random seed; the same seed gives the same archs."),
    count: int = typer.Option(1, "--count", "-n", min=1, help="How many archs to sample."),
    which: Which = typer.Option(Which.random, help="Sample at random, or take the space's largest or smallest arch."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the arch JSON here (count=1) or one JSON per line (count>1)."),
):
    """Sample architectures from a space and print (or write) them as JSON."""
    from mosc.fileio import atomic_write_text

    s = _space(space)
    s.check_count(count, "--count", distinct=False)
    rng = random.Random(seed)
    archs = [s.sample(rng) if which == Which.random else getattr(s, which.value)() for _ in range(count)]
    if out is not None:
        text = archs[0].to_json(indent=2) + "\n" if count == 1 else "".join(a.to_json() + "\n" for a in archs)
        atomic_write_text(out, text)
        console.print(f"wrote {count} arch(s) to {out}")
    for a in archs:
        console.print(_arch_table(a)) if count == 1 else print(a.to_json())
    if count == 1 and out is None:
        print(archs[0].to_json(indent=2))


@command(arch_app, "validate")
def arch_validate(
    path: Path = typer.Argument(..., help="Arch JSON file."),
    space: str = typer.Option("tiny", "--space", "-s", help=SPACE_HELP),
):
    """Check that an arch JSON file is well formed and inside the space."""
    from mosc.bert_space import BertSpace
    from mosc.jobs.bert import load_bert_arch
    from mosc.jobs.model import load_arch

    sp = _space(space)
    console.print(_arch_table((load_bert_arch if isinstance(sp, BertSpace) else load_arch)(path, sp)))
    console.print(f"[green]ok[/]: {path} is inside space {space!r}")


# ---- mosc collapse / train / evaluate -----------------------------------------------------


@command(app, "collapse")
def collapse_cmd(
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Supernet checkpoint folder; omitted: a freshly initialised supernet (for a quick look)."),
    arch_file: Optional[Path] = typer.Option(None, "--arch", "-a", help="Arch JSON file; omitted: one sampled with --seed."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for the collapsed subnet (model.safetensors + config.json)."),
    space: str = typer.Option("tiny", "--space", "-s", help=SPACE_HELP + " Used without --checkpoint."),
    mode: FFNMode = typer.Option(FFNMode.neuron, help="FFN mode of the fresh supernet (without --checkpoint)."),
    seed: int = typer.Option(0, help="Seed for the fresh supernet and the sampled arch."),
):
    """Collapse a supernet at one arch into a plain static Transformer and check it against the supernet.

    Prints the parameter counts (actual vs analytic) and the max |supernet(x, arch) - collapsed(x)|; exits 2 when they disagree.
    """
    from mosc.bert_space import is_bert_space
    from mosc.jobs.bert import collapse_bert_and_check, is_bert_checkpoint
    from mosc.jobs.model import COLLAPSE_ATOL, collapse_and_check

    bert = is_bert_checkpoint(checkpoint) if checkpoint is not None else is_bert_space(space)
    r = (collapse_bert_and_check if bert else collapse_and_check)(checkpoint, arch_file, out, space=space, mode=mode, seed=seed)
    console.print(_arch_table(r.arch))
    t = Table("", "value", title=f"collapse of {r.source} ({r.ffn_mode}, space {r.space})")
    t.add_row("supernet parameters", f"{r.supernet_params:,}")
    t.add_row("collapsed parameters", f"{r.subnet_params:,}")
    same = r.subnet_params == r.analytic_params
    t.add_row("analytic parameters", f"{r.analytic_params:,} " + ("[green](equal)[/]" if same else "[red](DIFFERENT)[/]"))
    t.add_row("max |supernet - collapsed|", f"{r.max_abs_diff:.3e}")
    t.add_row("collapse time", f"{r.collapse_s * 1000:.1f} ms")
    if r.out:
        t.add_row("written to", r.out)
    console.print(t)
    if not r.exact:
        raise MoscError(f"collapse check failed: parameter count or outputs differ from the supernet "
                        f"(limit {COLLAPSE_ATOL:g})")


@command(app, "train")
def train_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: checkpoints (step_*/), 'latest' pointer, log.jsonl."),
    corpus: Optional[str] = typer.Option(None, help="Translation: 'synthetic' (the default), a corpus folder, a name under ../shared/data (multi30k) or a path prefix. Encoder-only (BERT) space: 'default' (wikitext-2 + SST-2 and Multi30k English, the default), a folder of .txt/.txt.gz files or one file."),
    src_lang: str = typer.Option("en", help="Source language suffix of the corpus files."),
    tgt_lang: str = typer.Option("de", help="Target language suffix of the corpus files."),
    vocab_size: Optional[int] = typer.Option(None, help="BPE vocabulary size (default 8000 real, 1000 synthetic, 4000 masked-LM text)."),
    max_train_pairs: Optional[int] = typer.Option(None, help="Use only the first N training pairs (quick runs)."),
    space: str = typer.Option("tiny", "--space", "-s", help=SPACE_HELP),
    mode: FFNMode = typer.Option(FFNMode.neuron, help="FFN mode: shared (HAT), layer or neuron (MoS)."),
    experts: int = typer.Option(2, help="m: experts per FFN matrix (MoS modes)."),
    router_hidden: int = typer.Option(128, help="H: router hidden size (MoS modes)."),
    arch_file: Optional[Path] = typer.Option(None, "--arch", "-a", help="Train this one arch from scratch (standalone baseline) instead of a supernet."),
    steps: int = typer.Option(2000, help="Optimizer updates in total."),
    max_tokens: int = typer.Option(2048, help="Padded tokens per batch (per process)."),
    lr: float = typer.Option(1e-3, help="Peak learning rate."),
    warmup: int = typer.Option(200, help="Linear warm-up updates."),
    sandwich_random: int = typer.Option(1, help="k random archs per update besides the largest and smallest."),
    distill: float = typer.Option(0.0, help="Weight of in-place distillation from the largest arch (0 = off)."),
    dropout: Optional[float] = typer.Option(None, help="Residual dropout (default 0.3 for translation, scaled by D / D_max; 0.1 for BERT)."),
    max_len: int = typer.Option(128, help="Longest sentence in subword tokens (translation); the block length (masked LM)."),
    save_every: int = typer.Option(500, help="Checkpoint every N updates (and at the end)."),
    log_every: int = typer.Option(20, help="Updates between log lines (log.jsonl, progress bar)."),
    seed: int = typer.Option(0, help="Seed for init, arch sampling, dropout and batch order."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out where it stopped, with the run's own settings (only --steps, --device and --precision are read; a larger --steps stretches the cosine schedule)."),
    device: str = typer.Option("auto", help="Where to train: auto (the GPU when torch sees one), cpu, cuda or cuda:N; under torchrun each process takes cuda:LOCAL_RANK."),
    precision: str = typer.Option("fp32", help="Forward arithmetic: fp32, bf16 (autocast, CPU or GPU) or fp16 (autocast with loss scaling, GPU only)."),
):
    """Train a MoS supernet with the sandwich rule or, with --arch, one standalone arch.

    Works under `torchrun --nproc_per_node N` for data-parallel training (gloo).
    """
    from mosc.bert_space import BertArch, is_bert_space
    from mosc.nn.train import TrainConfig, train
    from mosc.space import Arch

    cfg = TrainConfig(steps=steps, max_tokens=max_tokens, lr=lr, warmup=warmup, sandwich_random=sandwich_random,
                      distill=distill, save_every=save_every, log_every=log_every, seed=seed, device=device,
                      precision=precision, max_len=max_len)
    bert = not resume and is_bert_space(space)  # a resumed run takes everything from its checkpoint
    if bert:  # masked LM on plain text: no languages, no pairs
        corpus_args = {"vocab_size": vocab_size}
    else:
        corpus_args = {"src_lang": src_lang, "tgt_lang": tgt_lang, "vocab_size": vocab_size, "max_train_pairs": max_train_pairs}
    overrides = {"n_experts": experts, "router_hidden": router_hidden, **({"dropout": dropout} if dropout is not None else {})}
    r = train(out, corpus=corpus, space=space, mode=mode.value, cfg=cfg, model_overrides=overrides,
              corpus_args={k: v for k, v in corpus_args.items() if v is not None},
              arch=(BertArch if bert else Arch).load(arch_file) if arch_file else None, resume=resume)
    if r.checkpoint != r.run:
        console.print(f"[green]trained[/] {r.steps - r.start_step} updates"
                      f"{f' (steps {r.start_step}->{r.steps})' if r.start_step else ''} in {r.seconds:.0f} s, {r.tokens_per_s:,.0f} predicted tokens/s, "
                      f"last loss {r.final_loss:.3f} ({r.device}, {r.precision}); checkpoint: {r.checkpoint}")


@command(app, "finetune")
def finetune_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the fine-tuned encoder (model.safetensors + config.json with the dev accuracy and the tokenizer)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="BERT pre-training run or checkpoint folder; the subnet --arch is collapsed from it."),
    arch_file: Optional[Path] = typer.Option(None, "--arch", "-a", help="BertArch JSON file (with --checkpoint); default: the run's fixed arch, else the largest."),
    encoder: Optional[Path] = typer.Option(None, "--encoder", "-e", help="A collapsed encoder folder (`mosc collapse --out`, holding the run's tokenizer) instead of --checkpoint."),
    teacher: Optional[Path] = typer.Option(None, "--teacher", help="A fine-tuned encoder folder (e.g. the largest subnet's) whose logits the student also matches (0.5 CE + 0.5 KL by default)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Folder with train.tsv(.gz) and dev.tsv(.gz) in SST-2's format (default: ../shared/data/sst2)."),
    steps: int = typer.Option(600, help="Optimizer updates."),
    batch_size: int = typer.Option(32, "--batch-size", help="Sentences per update."),
    lr: float = typer.Option(1e-3, help="Peak AdamW learning rate (linear warm-up, then linear decay to 0)."),
    seq_len: int = typer.Option(64, "--seq-len", help="Tokens per sentence, <s> included; longer sentences are cut."),
    distill: float = typer.Option(0.5, help="With --teacher: weight of the KL to the teacher's logits (the rest is cross-entropy)."),
    seed: int = typer.Option(0, help="Seed for the classifier head's init, batch order and dropout."),
    device: str = typer.Option("auto", help="Where to fine-tune: auto (the GPU when torch sees one), cpu, cuda or cuda:N."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
):
    """Fine-tune a collapsed BERT subnet on SST-2 (binary sentiment) and report its dev accuracy.

    The subnet comes from a pre-training run at --arch (collapsed here) or from a saved --encoder; sentences are tokenized with the run's tokenizer.
    """
    from mosc.nn.finetune import FinetuneConfig, finetune_files

    cfg = FinetuneConfig(steps=steps, batch_size=batch_size, lr=lr, seq_len=seq_len, distill=distill, seed=seed,
                         device=device)
    r = finetune_files(cfg, out, checkpoint=checkpoint, arch_file=arch_file, encoder=encoder, teacher=teacher,
                       data_dir=data, progress=progress)
    t = Table("", "value", title=f"SST-2 fine-tuning of {r['source']}")
    t.add_row("arch (hidden per layer)", str(r["arch"]["hidden"]))
    t.add_row("parameters (with head)", f"{r['param_count']:,}")
    t.add_row("train / dev sentences", f"{r['data']['train_sentences']:,} / {r['data']['dev_sentences']:,}")
    t.add_row("updates x batch", f"{steps} x {batch_size}")
    t.add_row("distilled from", f"{r['teacher']} (weight {r['distill_weight']:g})" if r["distilled"] else "-")
    t.add_row("final train loss", f"{r['final_loss']:.4f}")
    t.add_row("dev accuracy", f"[bold]{100 * r['sst2_dev_acc']:.2f}%[/]")
    t.add_row("time", f"{r['seconds']:.1f} s ({r['device']})")
    console.print(t)
    console.print(f"[green]wrote[/] {out}")


@command(app, "evaluate")
def evaluate_cmd(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="Run folder or checkpoint folder from `mosc train`."),
    arch_file: Optional[Path] = typer.Option(None, "--arch", "-a", help="Arch JSON; default: the run's fixed arch, else the largest."),
    subnet: Optional[Path] = typer.Option(None, help="Evaluate this collapsed subnet (or BERT encoder) folder instead of the supernet."),
    split: str = typer.Option("val", help="train, val or test (translation; a BERT run scores its validation text)."),
    beam: int = typer.Option(1, help="Beam size (1 = greedy)."),
    max_sentences: Optional[int] = typer.Option(None, help="Evaluate only the first N sentences."),
    bleu: bool = typer.Option(True, "--bleu/--no-bleu", help="Decode and score BLEU (slower) or loss only."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the numbers (and hypotheses) as JSON here."),
    device: str = typer.Option("auto", help="Where to compute: auto (the GPU when torch sees one), cpu, cuda or cuda:N."),
):
    """Validation loss and corpus BLEU (sacrebleu) of the supernet at an arch (inherited weights) or of a collapsed subnet.

    A BERT (masked-LM) run: the validation masked-LM loss and perplexity instead.
    """
    from mosc.fileio import atomic_write_json
    from mosc.jobs.bert import evaluate_mlm, is_bert_checkpoint
    from mosc.jobs.model import load_arch
    from mosc.nn.device import resolve_device
    from mosc.nn.evaluate import evaluate
    from mosc.nn.subnet import load_subnet
    from mosc.nn.train import load_run_corpus, load_trained
    from mosc.space import Arch

    resolve_device(device)  # a missing GPU is one line before anything is loaded
    if is_bert_checkpoint(checkpoint):
        r = evaluate_mlm(checkpoint, arch_file, subnet, device=device)
        t = Table("", "value", title=f"{r['what']}, arch {r['arch_hash']}, {r['valid_blocks']} validation blocks")
        t.add_row("masked-LM loss (nats/token)", f"{r['mlm_valid_loss']:.4f}")
        t.add_row("perplexity", f"{r['perplexity']:.2f}")
        t.add_row("parameters (static encoder)", f"{r['params']:,}")
        console.print(t)
        if out is not None:
            atomic_write_json(out, r)
        return
    model, tok, meta = load_trained(checkpoint)
    data = load_run_corpus(meta, tok)
    fixed = meta.get("train", {}).get("fixed_arch")
    if subnet is not None:
        target, arch, what = load_subnet(subnet), None, f"subnet {subnet}"
        arch_shown = target.arch
    else:
        arch = load_arch(arch_file, model.space) if arch_file else (Arch.from_dict(fixed) if fixed else model.space.largest())
        target, what, arch_shown = model, "supernet (inherited weights)", arch
    e = evaluate(target, data, arch, split=split, beam=beam, max_sentences=max_sentences, bleu=bleu, device=device)
    t = Table("", "value", title=f"{what}, arch {arch_shown.hash}, {split} ({e.n_sentences} sentences)")
    t.add_row("loss (nats/token)", f"{e.loss:.4f}")
    t.add_row("perplexity", f"{e.ppl:.2f}")
    if e.bleu is not None:
        t.add_row(f"BLEU ({'greedy' if beam == 1 else f'beam {beam}'})", f"{e.bleu:.2f}")
    t.add_row("time", f"{e.seconds:.1f} s")
    console.print(t)
    if out is not None:
        atomic_write_json(out, {"arch": arch_shown.to_dict(), "what": what, "split": split, "beam": beam, "loss": e.loss,
                                "bleu": e.bleu, "n_sentences": e.n_sentences, "hypotheses": e.hypotheses})


# ---- mosc targets / export / compile / translate ------------------------------------------


@command(app, "targets")
def targets_cmd():
    """List the deployment targets (targets/*.toml) with their TVM target and description."""
    from mosc.compiler.targets import aliases, list_targets, load_target, targets_dir

    t = Table("name", "TVM target", "cross compiler", "description", title=f"targets in {targets_dir()}")
    also = aliases()
    broken = []
    for name in list_targets():
        try:  # one broken file must not hide the others
            tg = load_target(name)
            tg.tvm_target()  # an unknown tag or mcpu is an error here too, not at compile time
        except MoscError as e:
            broken.append(str(e))
            t.add_row(name, "-", "-", "[red]BROKEN[/] (below)")
            continue
        spec = tg.tvm_target_spec if isinstance(tg.tvm_target_spec, str) else json.dumps(tg.tvm_target_spec)
        als = ", ".join(a for a, n in also.items() if n == name)
        t.add_row(name + (f" ({als})" if als else ""), escape(spec), tg.cross_compiler or "-", escape(tg.description))
    console.print(t)
    if broken:
        raise MoscError(f"{len(broken)} broken target file(s): " + " | ".join(broken))


def _print_export(meta: dict, out: Path):
    if "seq_len" in meta["shapes"]:  # an encoder-classifier export (mosc.contract)
        return _print_classifier_export(meta, out)
    sh = meta["shapes"]
    t = Table("", "value", title=f"export of arch {meta['arch_hash']} ({meta['param_count']:,} parameters)")
    t.add_row("shapes", f"batch {sh['batch']}, source length {sh['source_len']}, KV cache {sh['cache_len']}")
    for g in meta["graphs"].values():
        size = (out / g["file"]).stat().st_size / 1e6
        t.add_row(g["file"], f"{size:.1f} MB, inputs {', '.join(i['name'] for i in g['inputs'])}")
    p = meta.get("parity")
    if p:
        for g in (ENCODER, DECODER):
            t.add_row(f"max |torch - onnxruntime| {g}", f"{p[f'{g}_max_abs_diff']:.2e} (limit {p['atol']:g})")
        same = "[green]same tokens[/]" if p["greedy_tokens_equal"] else "[red]DIFFERENT tokens[/]"
        t.add_row("greedy: onnxruntime vs torch", same)
    t.add_row("tokenizer", "included" if meta.get("tokenizer") else "none (translate will print ids)")
    t.add_row("time", f"{meta['export_seconds']:.1f} s")
    console.print(t)


def _print_classifier_export(meta: dict, out: Path):
    sh, p = meta["shapes"], meta.get("parity")
    t = Table("", "value", title=f"encoder-classifier export of arch {meta['arch_hash']} ({meta['param_count']:,} parameters)")
    t.add_row("shapes", f"batch {sh['batch']}, sequence length {sh['seq_len']}, {meta['n_classes']} classes")
    for g in meta["graphs"].values():
        t.add_row(g["file"], f"{(out / g['file']).stat().st_size / 1e6:.1f} MB, inputs {', '.join(i['name'] for i in g['inputs'])}")
    if p:
        t.add_row("max |torch - onnxruntime| classifier", f"{p['classifier_max_abs_diff']:.2e} (limit {p['atol']:g})")
        t.add_row("argmax: onnxruntime vs torch", "[green]same classes[/]" if p["argmax_equal"] else "[red]DIFFERENT classes[/]")
    t.add_row("time", f"{meta['export_seconds']:.1f} s")
    console.print(t)


def _shapes(batch, source_len, cache_len) -> dict:
    return {k: v for k, v in {"batch": batch, "source_len": source_len, "cache_len": cache_len}.items() if v}


@command(app, "export")
def export_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the .onnx graphs (encoder + decoder_step, or classifier) and export.json."),
    subnet: Optional[Path] = typer.Option(None, "--subnet", help="Collapsed subnet folder (from `mosc collapse -o`), or a BERT encoder folder with a classifier head."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Supernet run or checkpoint folder; needs --arch."),
    arch_file: Optional[Path] = typer.Option(None, "--arch", "-a", help="Arch JSON to collapse the checkpoint at."),
    target: str = typer.Option("host", "--target", "-t", help="Target whose \\[protocol] gives the static shapes."),
    batch: Optional[int] = typer.Option(None, min=1, help=SHAPE_OPTS["batch"]),
    source_len: Optional[int] = typer.Option(None, min=1, help=SHAPE_OPTS["source_len"]),
    cache_len: Optional[int] = typer.Option(None, min=1, help=SHAPE_OPTS["cache_len"]),
    check: bool = typer.Option(True, "--check/--no-check", help="Compare onnxruntime with PyTorch (max abs diff, greedy tokens)."),
):
    """Export a collapsed subnet to static ONNX graphs (encoder, decoder step with KV cache; a BERT encoder: one classifier graph), checked against PyTorch with onnxruntime.

    A BERT encoder folder is told by its kind; --source-len is then its sequence length."""
    from mosc.jobs.bert_deploy import export_model

    tg = _target(target)  # an unknown target is one line before any work
    meta = export_model(subnet, checkpoint, arch_file, out, tg, _shapes(batch, source_len, cache_len), check)
    _print_export(meta, out)
    console.print(f"[green]exported[/] {out}")


def _print_compiled(c, target_name: str):
    m, r = c.manifest, c.report
    t = Table("", "value", title=f"artifact {c.path} for {target_name}")
    t.add_row("TVM target", m["tvm_target"])
    if r:
        t.add_row("tuning tasks", f"{r['tasks']} ({r['cached']} cached, {r['tuned']} tuned; without a record: "
                                  f"{r.get('untried', 0)} without a trial (raise --trials), "
                                  f"{r.get('untunable', 0)} untunable)")
        t.add_row("trials measured", str(r["trials"]))
        t.add_row("tuning time", f"{r['seconds']:.1f} s")
    else:
        t.add_row("tuning", "skipped (--no-tune): the database's records applied as they are")
    from mosc.compiler.artifact import describe_coverage, schedule_coverage

    cov = schedule_coverage(m)
    if cov["functions"]:
        t.add_row("schedules", ("[red]" if cov["naive"] else "") + describe_coverage(cov, m["device"]))
    t.add_row("database", f"{m['tuning']['database']['path']} ({m['tuning']['database']['records']} records)")
    for f in m["files"]:
        t.add_row(f, f"{(c.path / f).stat().st_size / 1e6:.1f} MB")
    t.add_row("compile time", f"{m['compile_seconds']:.1f} s")
    console.print(t)
    if r:
        print(f"tuning report: tasks={r['tasks']} cached={r['cached']} tuned={r['tuned']} untried={r.get('untried', 0)} "
              f"untunable={r.get('untunable', 0)} trials={r['trials']} seconds={r['seconds']:.1f}")


@command(app, "compile")
def compile_cmd(
    target: str = typer.Option(..., "--target", "-t", help=TARGET_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Artifact folder: one .so per graph (encoder + decoder_step, or classifier) and manifest.json."),
    onnx_dir: Optional[Path] = typer.Option(None, "--onnx-dir", help="Export folder from `mosc export`."),
    subnet: Optional[Path] = typer.Option(None, "--subnet", help="One step: export this subnet (or BERT encoder) folder, then compile."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="One step: collapse this checkpoint at --arch, export, compile."),
    arch_file: Optional[Path] = typer.Option(None, "--arch", "-a", help="Arch JSON (with --checkpoint)."),
    trials: int = typer.Option(256, min=0, help="MetaSchedule trial budget for tasks the tuning database lacks."),
    tune: bool = typer.Option(True, "--tune/--no-tune", help="Tune (default) or build with what the database already holds."),
    tune_db: Optional[Path] = typer.Option(None, "--tune-db", help=TUNE_DB_HELP),
    tracker: Optional[str] = typer.Option(None, help="RPC tracker HOST:PORT where tuning measures a cross/GPU target (default: the target's \\[rpc])."),
    key: Optional[str] = typer.Option(None, help="Device key at the tracker (default: the target's \\[rpc] key)."),
    batch: Optional[int] = typer.Option(None, min=1, help=SHAPE_OPTS["batch"] + " One-step path only."),
    source_len: Optional[int] = typer.Option(None, min=1, help=SHAPE_OPTS["source_len"] + " One-step path only."),
    cache_len: Optional[int] = typer.Option(None, min=1, help=SHAPE_OPTS["cache_len"] + " One-step path only."),
):
    """Compile an exported model with TVM for a target into a verifiable artifact folder, tuned with MetaSchedule against the target's database."""
    import tempfile

    from mosc.compiler.build import require_cross_compiler
    from mosc.jobs.bert_deploy import export_model
    from mosc.jobs.build import compile_export

    tg = _target(target, tracker, key)
    require_cross_compiler(tg)
    if sum(x is not None for x in (onnx_dir, subnet, checkpoint)) != 1:
        raise MoscError("give exactly one of --onnx-dir DIR, --subnet DIR or --checkpoint RUN --arch a.json")
    shapes = _shapes(batch, source_len, cache_len)
    if onnx_dir is not None and (shapes or arch_file is not None):
        raise MoscError("--batch/--source-len/--cache-len/--arch apply to the one-step path; an export's shapes are fixed")
    with tempfile.TemporaryDirectory(prefix="mosc-export-") as tmp:
        if onnx_dir is None:
            onnx_dir = Path(tmp)
            _print_export(export_model(subnet, checkpoint, arch_file, onnx_dir, tg, shapes), onnx_dir)
        c = compile_export(onnx_dir, tg, out, trials=trials, tune=tune, tune_db=tune_db, log=log)
    _print_compiled(c, tg.name)
    console.print(f"[green]compiled[/] {out}")


@command(app, "tune")
def tune_cmd(
    target: str = typer.Option(..., "--target", "-t", help=TARGET_HELP),
    space: Optional[str] = typer.Option(None, "--space", "-s", help=SPACE_HELP + " Default: the checkpoint's, else tiny."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Supernet run/checkpoint (translation or BERT; or a fine-tuned BERT encoder folder) whose space, vocabulary, positions and classes the graphs have (default: a fresh supernet's)."),
    vocab_size: Optional[int] = typer.Option(None, "--vocab-size", min=8, help="Vocabulary of the model to deploy, without --checkpoint (default: a fresh supernet's, 1000; a BERT one's 4000, its run's vocab_size + 1 for [MASK]); the embedding and output kernels depend on it."),
    trials: int = typer.Option(2000, min=1, help="Trial budget of the whole space (every workload first gets its minimum, then the budget goes by share of latency)."),
    budget_min: Optional[float] = typer.Option(None, "--budget-min", min=0.1, help="Stop starting new workloads after this many minutes (run again to go on)."),
    tune_db: Optional[Path] = typer.Option(None, "--tune-db", help=TUNE_DB_HELP),
    tracker: Optional[str] = typer.Option(None, help="RPC tracker HOST:PORT where a cross/GPU target's candidates are measured (default: the target's \\[rpc])."),
    key: Optional[str] = typer.Option(None, help="Device key at the tracker; every device registered under it measures at once (default: the target's \\[rpc] key)."),
    status: bool = typer.Option(False, "--status", help="Print the coverage of the space's database (workloads with a record, trials, best times) and exit."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", min=1, help="Tokens per row of an encoder-only (BERT) space's graphs (default: the target's protocol source_len); translation spaces take their lengths from the protocol."),
):
    """Tune every TIR workload a search space can produce, once per target, so any arch compiles from records in seconds.

    The workloads come from a covering set of archs (each layer's kernels depend only on its own choices). Translation and encoder-only (BERT) spaces alike. The run is resumable: kill it, run it again, it continues.
    """
    import dataclasses

    from mosc.bert_space import BertSpace
    from mosc.jobs.tune import ModelShape, load_tune_space, space_status, tune_space

    tg = _target(target, tracker, key)
    sp = load_tune_space(space, checkpoint)
    if space is not None and checkpoint is not None and sp.name != _space(space).name:
        raise MoscError(f"--space {space} differs from the checkpoint's space {sp.name!r}; give one of them")
    if checkpoint is not None and vocab_size is not None:
        raise MoscError("--vocab-size comes from the checkpoint; give one of --checkpoint and --vocab-size")
    if seq_len is not None and not isinstance(sp, BertSpace):
        raise MoscError(f"--seq-len is for encoder-only (BERT) spaces; {sp.name!r} is a translation space, "
                        "whose lengths are the target's [protocol] source_len and decoder_steps")
    shape = ModelShape.of_checkpoint(checkpoint) if checkpoint is not None else ModelShape.fresh(sp)
    if vocab_size is not None:
        shape = dataclasses.replace(shape, vocab_size=vocab_size)
    if seq_len is not None:
        shape = dataclasses.replace(shape, seq_len=seq_len)
    if not status:
        sf, extra, r = tune_space(sp, shape, tg, trials=trials, budget_min=budget_min, tune_db=tune_db, log=log)
        log(f"tuned {r.trials} trials in {r.seconds:.0f} s" + (" (stopped by --budget-min; run again to go on)"
                                                                if r.budget_left else ""))
    sf, cov = space_status(sp, shape, tg, tune_db)
    _print_coverage(sf, cov, tg.name)


def _print_coverage(sf, cov, target_name: str) -> None:
    have = sum(c.best_us is not None for c in cov)
    beat = sum(c.best_us is not None and c.default_us is not None and c.best_us < c.default_us for c in cov)
    t = Table("workload", "share", "trials", "best us", "default us",
              title=f"space {sf.space} on {target_name}: {have}/{len(cov)} workloads with a record, "
                    f"{sum(c.trials for c in cov)} trials (top 15 by share of latency)")
    for c in cov[:15]:
        t.add_row(c.name, f"{100 * c.share:.1f}%", str(c.trials), "-" if c.best_us is None else f"{c.best_us:.1f}",
                  "-" if c.default_us is None else f"{c.default_us:.1f}")
    console.print(t)
    missing = [c.name for c in cov if c.best_us is None]
    # A record is the default schedule's own timing unless a tuned candidate beat it: builds
    # replay the best, so a tuned schedule is used only where it measured faster.
    console.print(f"{have}/{len(cov)} workloads have a tuned record or a timed default schedule; "
                  f"a tuned candidate beat the default on {beat}" +
                  (f"; without any (built with a default schedule): {', '.join(missing[:6])}"
                   f"{' ...' if len(missing) > 6 else ''}" if missing else ""))


@command(app, "translate")
def translate_cmd(
    artifact: Path = typer.Option(..., "--artifact", help="Artifact folder from `mosc compile` (sha256s are verified)."),
    text: Optional[list[str]] = typer.Option(None, "--text", help="Sentence to translate (repeatable)."),
    file: Optional[Path] = typer.Option(None, "--file", "-f", help="Text file, one sentence per line."),
    tokenizer: Optional[Path] = typer.Option(None, help="Tokenizer JSON, when the artifact carries none."),
    ids: bool = typer.Option(False, "--ids", help="Also print the output token ids."),
):
    """Translate with a compiled artifact: tokenize, run the TVM encoder and greedy decoder steps, detokenize."""
    from mosc.jobs.translate import read_sentences, translate

    if (text is None) == (file is None):
        raise MoscError("give --text SENTENCE (repeatable) or --file FILE")
    r = translate(artifact, read_sentences(text, file), tokenizer)
    if r.truncated:
        err_console.print(f"[yellow]warning:[/] {r.truncated} sentence(s) longer than {r.source_len} tokens were truncated")
    for line, row in zip(r.lines, r.ids):
        print(line)
        if ids:
            print("ids: " + " ".join(map(str, row)))
    err_console.print(f"{len(r.lines)} sentence(s) in {r.ms:.1f} ms on {r.target}", highlight=False)


# ---- mosc measure / device / db -------------------------------------------------------------


@command(app, "measure")
def measure_cmd(
    target: str = typer.Option(..., "--target", "-t", help=TARGET_HELP),
    arch_file: Optional[Path] = typer.Option(None, "--arch", "-a", help="Measure this arch JSON file."),
    sample: Optional[int] = typer.Option(None, "--sample", "-n", min=1, help="Measure N distinct archs sampled with --seed."),
    seed: int = typer.Option(0, help="Seed of --sample and of the random supernet (without --checkpoint)."),
    space: str = typer.Option("tiny", "--space", "-s", help=SPACE_HELP + " Used without --checkpoint."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help=RANDOM_SUPERNET_HELP),
    backend: Backend = typer.Option(Backend.tvm, help="tvm: the compiled artifact, here or over RPC; ort and torch run on this machine."),
    db: Optional[Path] = typer.Option(None, "--db", help=DB_HELP),
    tracker: Optional[str] = typer.Option(None, help=TRACKER_HELP),
    key: Optional[str] = typer.Option(None, help=KEY_HELP),
    force: bool = typer.Option(False, "--force", help="Measure archs already in the database again (adds rows)."),
    tune: bool = typer.Option(False, "--tune/--no-tune", help="Build from the target's tuning database as it is (default: tune the space once with `mosc tune --space`, so what is measured is what is deployed) or also tune what each new artifact lacks."),
    trials: Optional[int] = typer.Option(None, min=1, help="MetaSchedule trial budget per new artifact (default: mosc compile's)."),
    tune_db: Optional[Path] = typer.Option(None, "--tune-db", help=TUNE_DB_HELP),
    cache: Optional[Path] = typer.Option(None, help=CACHE_HELP),
    timeout: float = typer.Option(600.0, min=1.0, help="Seconds one arch's RPC session may last before the server ends it (then it is retried)."),
    tries: int = typer.Option(3, min=1, help="Attempts per arch (connect, upload, measure) before giving up."),
):
    """Measure latency with HAT's protocol, on this machine or on a device over TVM RPC, into the latency database.

    One run is one translation: with the tvm backend, one call of the artifact's compiled translate function (encoder plus exactly N greedy decoder steps, on the device clock), with the kernel time (encoder + N x one step call) beside it; with ort/torch, the encoder plus N decoder-step calls. The trimmed mean of the timed runs is stored. Every arch's row is committed at once, and a re-run skips archs already measured.
    """
    from mosc.jobs.artifacts import sample_archs
    from mosc.jobs.measure import measure_into_db, remote_for
    from mosc.jobs.model import load_arch

    tg = _target(target, tracker, key)  # tuning new artifacts (--tune) uses the same device
    if (arch_file is None) == (sample is None):
        raise MoscError("give --arch a.json or --sample N")
    cache_, source, sp = _arch_cache(tg, checkpoint, space, seed, cache=cache, tune=tune, trials=trials, tune_db=tune_db)
    archs = [load_arch(arch_file, sp)] if arch_file else sample_archs(sp, sample, seed)
    remote = remote_for(tg, backend, timeout)
    p = tg.protocol
    log(f"protocol: batch {p.batch}, source {p.source_len} tokens, {p.decoder_steps} decoder steps, "
        f"{p.warmup} warm-up + {p.repeats} timed runs, trim {p.trim:g} per tail; weights: {source.describe()}")
    m = measure_into_db(tg, archs, cache_, _db_path(db), backend=backend, remote=remote, force=force, tries=tries,
                        announce=True, log=log)
    t = Table(title=f"{tg.name} / {backend} / {m.device_key}{' (emulated)' if m.emulated else ''}: latency in ms")
    t.add_column("arch", no_wrap=True)
    for c in ("trimmed mean", "kernels alone", "encoder", "decoder", "median", "p90", "std", "runs"):
        t.add_column(c, justify="right")
    for r in m.new:
        kernel = r["extra"].get("kernel_ms")
        t.add_row(r["arch_hash"], f"{r['trimmed_mean_ms']:.3f}", "-" if kernel is None else f"{kernel:.3f}",
                  f"{r['encoder_ms']:.3f}", f"{r['decoder_ms']:.3f}", f"{r['median_ms']:.3f}", f"{r['p90_ms']:.3f}",
                  f"{r['std_ms']:.3f}", str(r["runs"]))
    if m.new:
        console.print(t)
    console.print(f"[green]measured[/] {len(m.new)}, skipped {len(m.skipped)} already in {_db_path(db)}")


@command(device_app, "tracker")
def device_tracker(
    host: str = typer.Option("127.0.0.1", help="Address to bind (a tracker hands out devices that run any code sent: keep it local or trusted)."),
    port: int = typer.Option(9190, help="TCP port."),
):
    """Run a TVM RPC tracker in the foreground (Ctrl-C stops it)."""
    from mosc.device.server import run_tracker

    run_tracker(host, port)


@command(device_app, "serve")
def device_serve(
    tracker: str = typer.Option("127.0.0.1:9190", help="Tracker HOST:PORT to register with."),
    key: str = typer.Option(..., help="Device key to register under (a target's \\[rpc] key, e.g. host, rpi4)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (an RPC server runs any code it is sent: keep it local or trusted)."),
    port: int = typer.Option(9091, help="First TCP port to try; the next free one up to +100 is taken."),
    log_sessions: bool = typer.Option(False, "--log-sessions", help="Print a line per RPC session (which device of a farm got work)."),
):
    """Run a TVM RPC server on this machine, registered with a tracker (foreground).

    Several devices registered under one key form a farm: `mosc measure` takes any free one, `mosc tune` measures on all of them at once.
    """
    from mosc.device.server import run_server
    from mosc.rpc import parse_hostport

    run_server(*parse_hostport(tracker), key, host, port, log_sessions=log_sessions)


@command(device_app, "emulate")
def device_emulate(
    target: str = typer.Argument(..., help="Target to emulate (rpi4: aarch64 under qemu-user)."),
    tracker: str = typer.Option("127.0.0.1:9190", help="Tracker HOST:PORT to register with."),
    key: Optional[str] = typer.Option(None, help="Device key (default: the target's \\[rpc] key)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind."),
    port: int = typer.Option(9091, help="First TCP port to try."),
    root: Optional[Path] = typer.Option(None, help="arm64 root (default: $MOSC_ARM64_ROOT or ~/.cache/mosc/arm64-root; see scripts/setup_arm64_root.sh)."),
):
    """Run an RPC server for the target's CPU under qemu-user, replacing this process.

    Its timings are marked emulated=1 everywhere: they check function, not speed.
    """
    import os

    from mosc import env
    from mosc.device.server import emulate_command
    from mosc.rpc import parse_hostport

    tg = _target(target)
    target = tg.name  # an alias ("rpi") emulates the target it names
    try:
        argv, environ = emulate_command(target, *parse_hostport(tracker), key or tg.rpc.key, host, port,
                                        env.emulate_workdir(target), root)
    except SystemExit as e:
        raise MoscError(str(e).removeprefix("error: ")) from None
    log(f"starting an emulated {target} RPC server (qemu-user); first start takes ~10-30 s")
    os.execve(argv[0], argv, environ)


@command(device_app, "list")
def device_list(tracker: str = typer.Option("127.0.0.1:9190", help="Tracker HOST:PORT.")):
    """Show the devices registered with a tracker."""
    from mosc.rpc import parse_hostport, tracker_summary

    try:
        s = tracker_summary(*parse_hostport(tracker))
    except ConnectionError as e:
        raise MoscError(str(e)) from None
    t = Table("key", "address", "free", "pending", title=f"tracker {tracker}")
    q = s.get("queue_info", {})
    for srv in s.get("server_info", []):
        k = srv["key"].removeprefix("server:")
        t.add_row(k, f"{srv['addr'][0]}:{srv['addr'][1]}", str(q.get(k, {}).get("free", "?")), str(q.get(k, {}).get("pending", "?")))
    console.print(t)


@command(db_app, "import-hat")
def db_import_hat(
    csv_file: Path = typer.Argument(..., help="HAT latency CSV (../shared/data/hat-latency/*.csv)."),
    target: str = typer.Option(..., "--target", "-t", help="Target name to file the rows under (e.g. rpi4, xeon)."),
    db: Optional[Path] = typer.Option(None, "--db", help=DB_HELP),
    force: bool = typer.Option(False, "--force", help="Replace the rows of a file already imported."),
):
    """Import HAT's published measurements: features only (no full arch), backend hat-pytorch."""
    from mosc.device.db import LatencyDB
    from mosc.jobs.search import row_target

    target = row_target(target)

    with LatencyDB(_db_path(db)) as ldb:
        n = ldb.import_hat_csv(csv_file, target, force=force)
        total = ldb.count()
    if n == 0:
        console.print(f"{csv_file.name} was already imported for {target}; nothing added (--force replaces it)")
    else:
        console.print(f"[green]imported[/] {n} rows from {csv_file.name} as target {target} ({total} rows in {_db_path(db)})")


@command(db_app, "export")
def db_export(
    out: Path = typer.Option(..., "--out", "-o", help="CSV file to write."),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="Only this target's rows."),
    db: Optional[Path] = typer.Option(None, "--db", help=DB_HELP),
    real_only: bool = typer.Option(False, "--real-only", help="Leave out emulated rows."),
):
    """Write the database (or one target's rows) as CSV, HAT's feature columns included."""
    from mosc.device.db import LatencyDB
    from mosc.jobs.search import row_target

    target = row_target(target)

    with LatencyDB(_db_path(db), readonly=True) as ldb:
        n = ldb.export_csv(out, target=target, include_emulated=not real_only)
    console.print(f"[green]wrote[/] {n} rows to {out}")


@command(db_app, "stats")
def db_stats(db: Optional[Path] = typer.Option(None, "--db", help=DB_HELP)):
    """Summarise the database: rows per target, backend, device and emulated flag."""
    from mosc.device.db import LatencyDB

    path = _db_path(db)
    with LatencyDB(path, readonly=True) as ldb:
        rows = ldb.stats()
    t = Table(title=f"latency database {path}")
    for c in ("target", "backend", "device", "emulated"):
        t.add_column(c, no_wrap=True)
    for c in ("rows", "archs", "min ms", "mean ms", "max ms"):
        t.add_column(c, justify="right", no_wrap=True)
    for r in rows:
        t.add_row(r["target"], r["backend"], r["device_key"], "yes" if r["emulated"] else "no", str(r["n"]),
                  str(r["archs"]) if r["archs"] else "-", f"{r['lo']:.2f}", f"{r['avg']:.2f}", f"{r['hi']:.2f}")
    console.print(t)
    console.print("archs '-': imported rows with HAT features only (no arch JSON); emulated rows are never "
                  "returned to predictors unless asked" if rows else "(empty)")


# ---- mosc bench / check (latency-regression CI) ------------------------------------------
BENCH_ARTIFACT_HELP = "Measure this compiled artifact folder (from `mosc compile`)."
BENCH_ARCH_HELP = "Measure this arch JSON: its artifact is built (or reused) in the artifact cache."


def _bench(target, artifact, arch_file, checkpoint, space, seed, tune, trials, tune_db, cache, repeats) -> dict:
    """Options -> jobs.measure.bench: an artifact folder, or an arch whose artifact is built or reused."""
    from mosc.jobs.measure import bench
    from mosc.jobs.model import load_arch

    if artifact is not None and checkpoint is not None:
        raise MoscError("--checkpoint goes with --arch (an artifact folder already holds its weights)")
    arch = arch_cache = None
    if arch_file is not None:
        arch_cache, _, sp = _arch_cache(target, checkpoint, space, seed, cache=cache, tune=tune, trials=trials,
                                        tune_db=tune_db)
        arch = load_arch(arch_file, sp)
    return bench(target, artifact=artifact, arch=arch, cache=arch_cache, repeats=repeats, log=log)


def _bench_line(r: dict) -> str:
    s = r["stats"]
    kind = f" ({r['kind']})" if r.get("kind", "translation") != "translation" else ""
    kernel = f", kernels alone {statistics.median(r['kernel_ms']):.3f} ms" if r.get("kernel_ms") else ""
    return (f"{r['target']} / arch {r['arch']['hash']}{kind}: median {s['median_ms']:.3f} ms, p90 {s['p90_ms']:.3f} ms, "
            f"trimmed mean {s['trimmed_mean_ms']:.3f} ms, std {s['std_ms']:.3f} ms over {len(r['samples_ms'])} runs"
            f"{kernel} ({r['wall_s']:.1f} s)")


@command(app, "bench")
def bench_cmd(
    target: str = typer.Option(..., "--target", "-t", help=TARGET_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Result JSON to write (raw samples, stats, environment, protocol, arch, artifact sha256)."),
    artifact: Optional[Path] = typer.Option(None, "--artifact", help=BENCH_ARTIFACT_HELP),
    arch_file: Optional[Path] = typer.Option(None, "--arch", "-a", help=BENCH_ARCH_HELP),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help=RANDOM_SUPERNET_HELP + " Used with --arch."),
    space: str = typer.Option("tiny", "--space", "-s", help=SPACE_HELP + " Used with --arch without --checkpoint."),
    seed: int = typer.Option(0, help="Seed of the random supernet (--arch without --checkpoint)."),
    repeats: Optional[int] = typer.Option(None, min=2, help="Timed runs (default: the target's \\[protocol] repeats)."),
    tune: bool = typer.Option(True, "--tune/--no-tune", help="Tune a new artifact for --arch with MetaSchedule, or build with what the tuning database holds."),
    trials: Optional[int] = typer.Option(None, min=1, help="MetaSchedule trial budget for a new artifact (default: mosc compile's)."),
    tune_db: Optional[Path] = typer.Option(None, "--tune-db", help=TUNE_DB_HELP),
    cache: Optional[Path] = typer.Option(None, help=CACHE_HELP),
    tracker: Optional[str] = typer.Option(None, help=TRACKER_HELP),
    key: Optional[str] = typer.Option(None, help=KEY_HELP),
):
    """Measure one artifact with the target's protocol and write a result JSON for `mosc check`.

    A translation artifact: one run = one translation (encoder + decoder steps). An encoder-classifier artifact (told apart by its graphs): one run = one call of its classifier graph, at the protocol's source_len as sequence length.
    """
    from mosc.fileio import atomic_write_json

    r = _bench(_target(target, tracker, key), artifact, arch_file, checkpoint, space, seed, tune, trials, tune_db,
               cache, repeats)
    atomic_write_json(out, r)
    console.print(_bench_line(r), highlight=False)
    console.print(f"[green]wrote[/] {out}")


VERDICT_COLOUR = {"pass": "green", "improved": "cyan", "regression": "bold red"}


def _check_table(rep: dict):
    """The verdict per metric: a table, or one plain line per metric when the console is narrower
    than the table (a CI log without a terminal is 80 columns), so a verdict is never cut."""
    from rich.console import Group
    from rich.text import Text

    conf = rep["method"]["confidence"]
    title = (f"latency check: {rep['target']} / arch {rep['arch_hash']} "
             f"({rep['runs']['baseline']} vs {rep['runs']['current']} runs)")
    t = Table(title=title)
    for c in ("metric", "base ms", "now ms", "ratio", f"{conf:.0%} CI", "tol"):
        t.add_column(c, justify="left" if c == "metric" else "right", no_wrap=True)
    t.add_column("verdict", no_wrap=True)
    lines = [Text(title)]
    for r in rep["metrics"]:
        verdict = f"[{VERDICT_COLOUR[r['verdict']]}]{r['verdict']}[/]"
        nums = (f"{r['baseline_ms']:.4f}", f"{r['current_ms']:.4f}", f"{r['ratio']:.4f}")
        ci, tol = f"\\[{r['ci_low']:.4f}, {r['ci_high']:.4f}]", f"+{r['tolerance']:.0%}"
        t.add_row(r["metric"], *nums, ci, tol, verdict)
        lines.append(Text.from_markup(f"{r['metric']} {verdict}: baseline {nums[0]} ms, current {nums[1]} ms, "
                                      f"ratio {nums[2]}, {conf:.0%} CI {ci}, tolerance {tol}"))
    fits = console.measure(t, options=console.options.update_width(10_000)).maximum <= console.width
    return t if fits else Group(*lines)


@command(app, "check")
def check_cmd(
    baseline: Path = typer.Option(..., "--baseline", "-b", help="Baseline result JSON (from `mosc bench`); with --update-baseline it may not exist yet."),
    result: Optional[Path] = typer.Option(None, "--result", "-r", help="Result JSON to check (from `mosc bench`); or give --artifact/--arch to measure now."),
    artifact: Optional[Path] = typer.Option(None, "--artifact", help=BENCH_ARTIFACT_HELP + " Measured now, then checked."),
    arch_file: Optional[Path] = typer.Option(None, "--arch", "-a", help=BENCH_ARCH_HELP + " Measured now, then checked."),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="Target when measuring now (default: the baseline's); with --result, the target the result and baseline must be for."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help=RANDOM_SUPERNET_HELP + " Used with --arch."),
    space: str = typer.Option("tiny", "--space", "-s", help=SPACE_HELP + " Used with --arch without --checkpoint."),
    seed: int = typer.Option(0, help="Seed of the random supernet (--arch without --checkpoint)."),
    repeats: Optional[int] = typer.Option(None, min=2, help="Timed runs when measuring now (default: the target's \\[protocol] repeats)."),
    tune: bool = typer.Option(True, "--tune/--no-tune", help="Tune a new artifact for --arch, or build with what the tuning database holds."),
    trials: Optional[int] = typer.Option(None, min=1, help="MetaSchedule trial budget for a new artifact."),
    tune_db: Optional[Path] = typer.Option(None, "--tune-db", help=TUNE_DB_HELP),
    cache: Optional[Path] = typer.Option(None, help=CACHE_HELP),
    tracker: Optional[str] = typer.Option(None, help="RPC tracker HOST:PORT when measuring now over RPC."),
    key: Optional[str] = typer.Option(None, help="Device key at the tracker when measuring now over RPC."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write the result measured now to this JSON."),
    json_out: Optional[Path] = typer.Option(None, "--json-out", help="Write the check report (ratios, CIs, verdicts, U test) as JSON."),
    junit: Optional[Path] = typer.Option(None, "--junit", help="Write JUnit XML (one testcase per metric, a failure per regression)."),
    update_baseline: bool = typer.Option(False, "--update-baseline", help="Write the result as the new baseline (atomically) when the check passes (or there is no baseline yet)."),
    force: bool = typer.Option(False, "--force", help="With --update-baseline: replace the baseline even on a regression or when it is not comparable."),
    resamples: int = typer.Option(2000, min=100, help="Bootstrap resamples per side."),
    confidence: float = typer.Option(0.95, help="Confidence level of the ratio's interval."),
    ci_seed: int = typer.Option(0, "--ci-seed", help="Seed of the bootstrap (the same inputs give the same verdict)."),
    p50_tol: Optional[float] = typer.Option(None, "--p50-tol", min=0, help="Allowed relative slowdown of the median, e.g. 0.05 for 5% (default: the target file's \\[regression] p50_tol)."),
    p90_tol: Optional[float] = typer.Option(None, "--p90-tol", min=0, help="Allowed relative slowdown of the p90 (default: the target file's \\[regression] p90_tol)."),
):
    """Compare a result with a baseline and exit 0 (pass or improved), 1 (regression) or 2 (bad input or not comparable).

    The verdict comes from bootstrap confidence intervals of the current/baseline ratio of the median and p90 against the target file's \\[regression] tolerances (or --p50-tol/--p90-tol; never the result file's); Mann-Whitney U is reported as a secondary statistic. A baseline from another machine is refused, not compared.
    """
    from mosc.fileio import atomic_write_json, atomic_write_text
    from mosc.jobs.measure import check
    from mosc.regress import junit_xml, load_result

    base = load_result(baseline, "baseline") if baseline.exists() or not update_baseline else None
    want = _target(target).name if target else None  # --target: result and baseline must be for it
    if result is not None:
        if artifact is not None or arch_file is not None:
            raise MoscError("give --result or --artifact/--arch (measure now), not both")
        res = load_result(result)
    else:
        tname = want or (base or {}).get("target")
        if not tname:
            raise MoscError("give --target (there is no baseline to take it from)")
        res = _bench(_target(tname, tracker, key), artifact, arch_file, checkpoint, space, seed, tune, trials, tune_db,
                     cache, repeats)
        console.print(_bench_line(res), highlight=False)
        if out is not None:
            atomic_write_json(out, res)
    c = check(baseline, base, res, tolerances={"p50_tol": p50_tol, "p90_tol": p90_tol}, target=want,
              update_baseline=update_baseline, force=force, resamples=resamples, confidence=confidence, seed=ci_seed)
    if c.report is not None:
        rep = c.report
        console.print(_check_table(rep))
        mw = rep["mann_whitney"]
        console.print(f"Mann-Whitney U (secondary, current slower?): U = {mw['U']:.0f}, p = {mw['p_value']:.3g}",
                      highlight=False)
        if json_out is not None:
            atomic_write_json(json_out, rep)
        if junit is not None:
            atomic_write_text(junit, junit_xml(rep))
        console.print(f"verdict: [{VERDICT_COLOUR[rep['verdict']]}]{rep['verdict']}[/]")
    if c.baseline_written:
        console.print(f"[green]{c.baseline_written}:[/] {baseline}")
    if c.baseline_kept:
        console.print(f"[yellow]{c.baseline_kept}[/]")
    raise typer.Exit(c.exit_code)


# ---- mosc predictor / search ------------------------------------------------------------------


def _metrics_table(title: str, rows: dict) -> Table:
    t = Table(title=title)
    for c in ("model", "rows", "RMSE ms", "MAPE", "within ±10%", "Kendall tau"):
        t.add_column(c, justify="right" if c != "model" else "left")
    for name, m in rows.items():
        t.add_row(name, str(m["n"]), f"{m['rmse_ms']:.3f}", f"{m['mape']:.2%}", f"{m['within_10pct']:.1%}",
                  "-" if m["kendall_tau"] is None else f"{m['kendall_tau']:.3f}")
    if any(m["n"] < 10 for m in rows.values()):
        t.caption = "fewer than 10 rows scored: these numbers say little (measure more archs)"
    return t


ROWS_BACKEND_HELP = "Use the DB rows of this backend (tvm, ort, torch, hat-pytorch); needed when the target has several."


@command(predictor_app, "fit")
def predictor_fit(
    out: Path = typer.Option(..., "--out", "-o", help="Predictor file to write (.json; tree models add <name>.xgb.json)."),
    db: Optional[Path] = typer.Option(None, "--db", help="Latency database to train on (with --target)."),
    csv_file: Optional[Path] = typer.Option(None, "--csv", help="A HAT latency CSV to train on (features only, 'wmt' space)."),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="Target whose DB rows to use (with --csv: the name recorded; default hat:<file stem>)."),
    space: Optional[str] = typer.Option(None, "--space", "-s", help=SPACE_HELP + " Default: tiny for --db, wmt for --csv."),
    model: Model = typer.Option(Model.lsq, help="lsq: robust non-negative fit of per-component costs (best on HAT's data); mlp: HAT's 10 -> 3x400 -> 1; gbt: xgboost; hybrid: lsq + gbt on its residual."),
    features: Optional[FeatureSet] = typer.Option(None, help="Features (default: hat for mlp, layers when every row has an arch, else cost)."),
    seed: int = typer.Option(0, help="Seed of the 80/10/10 split and of the model."),
    refit: bool = typer.Option(True, "--refit/--no-refit", help="After scoring on the held-out split, refit on every row (the saved model)."),
    max_rows: Optional[int] = typer.Option(None, help="Use only the first N rows (quick runs)."),
    backend: Optional[str] = typer.Option(None, help=ROWS_BACKEND_HELP),
):
    """Fit a latency predictor for one target and store it with its held-out metrics (seeded 80/10/10 split)."""
    from mosc.jobs.search import fit_predictor, predictor_data

    data, sp = predictor_data(db, csv_file, target, space, max_rows, backend)
    p, m = fit_predictor(data, sp, model=model, features=features, seed=seed, refit=refit)
    p.save(out)
    console.print(_metrics_table(f"{model} on {p.features} features, target {p.target}, space {p.space}: held-out test",
                                 {model: m}))
    console.print(f"[green]wrote[/] {out} ({p.meta['training_rows']} training rows)")


@command(predictor_app, "eval")
def predictor_eval(
    predictor: Path = typer.Argument(..., help="Predictor file from `mosc predictor fit`."),
    db: Optional[Path] = typer.Option(None, "--db", help="Latency database to score on (with --target)."),
    csv_file: Optional[Path] = typer.Option(None, "--csv", help="A HAT latency CSV to score on."),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="Target of the rows (must match the predictor's)."),
    max_rows: Optional[int] = typer.Option(None, help="Score only the first N rows."),
    backend: Optional[str] = typer.Option(None, help=ROWS_BACKEND_HELP),
):
    """Score a predictor on every row of a DB target or a HAT CSV (RMSE, MAPE, ±10%, Kendall tau)."""
    from mosc.jobs.search import predictor_data
    from mosc.search.predictor import Predictor, metrics

    p = Predictor.load(predictor)
    data, sp = predictor_data(db, csv_file, target or (p.target if db is not None else None),
                              p.space if db is not None else None, max_rows, backend)
    p.check(data.target, sp.name)
    m = metrics(data.latency_ms, p.predict_features(data.features, data.archs))
    console.print(_metrics_table(f"{predictor} on {data.source}", {p.model: m}))
    if p.meta.get("source") == data.source:
        console.print(f"note: the predictor was fitted on these rows (in-sample); its held-out metrics: "
                      f"{json.dumps(p.meta.get('metrics'))}")


@command(app, "search")
def search_cmd(
    target: Optional[str] = typer.Option(None, "--target", "-t", help="Target device (must match the predictor's target); required unless searching a BERT run under --max-params."),
    max_params: Optional[float] = typer.Option(None, "--max-params", help="BERT (masked-LM) run: the most parameters the static encoder may have (e.g. 2.5e6); fitness = validation masked-LM loss."),
    predictor: Optional[Path] = typer.Option(None, "--predictor", "-p", help="Latency predictor file (mosc predictor fit) for --target. Omitted for rpi4 with no real measurements in --db: the analytic Cortex-A72 roofline prior."),
    latency_ms: Optional[float] = typer.Option(None, "--latency-ms", "-l", help="Latency constraint in ms (required without --pareto; optional cap with it)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Supernet run/checkpoint: fitness = its validation loss at each arch."),
    val_sentences: int = typer.Option(200, min=1, help="Validation sentences used for the fitness (first N)."),
    max_tokens: int = typer.Option(4096, min=1, help="Tokens per validation batch."),
    fitness: Fitness = typer.Option(Fitness.supernet, help="supernet: the checkpoint's validation loss; macs: -log(multiply-adds), a cheap proxy for dry runs."),
    space: str = typer.Option("tiny", "--space", "-s", help=SPACE_HELP + " Used with --fitness macs (else the checkpoint's)."),
    pareto: bool = typer.Option(False, "--pareto", help="NSGA-II: the whole loss-latency Pareto front in one run."),
    population: int = typer.Option(125, min=2, help="Population size (HAT: 125)."),
    parents: int = typer.Option(25, min=1, help="Parents kept per generation (HAT: 25)."),
    mutations: int = typer.Option(50, min=0, help="Mutated children per generation (HAT: 50)."),
    mutation_prob: float = typer.Option(0.3, min=0.0, max=1.0, help="Per-gene mutation probability (HAT: 0.3)."),
    crossovers: int = typer.Option(50, min=0, help="Crossover children per generation (HAT: 50)."),
    generations: int = typer.Option(30, min=1, help="Generations (HAT: 30)."),
    seed: int = typer.Option(0, help="Seed of the search."),
    db: Optional[Path] = typer.Option(None, "--db", help=DB_HELP + " Measured points of --target are drawn on the plot."),
    out: Path = typer.Option(Path("search-out"), "--out", "-o", help="Output folder: best.json, search.json, pareto.csv, pareto.json, pareto.png."),
    rounds: int = typer.Option(1, min=1, help="Search -> measure the top archs -> refit the predictor on --db -> search again, R times (1: search only)."),
    measure_top: int = typer.Option(5, min=1, help="Archs measured per round (with --rounds > 1); the final pick is measured too."),
    backend: Backend = typer.Option(Backend.torch, help="Measuring backend for --rounds (tvm: the target's artifact, over RPC for cross targets)."),
):
    """Hardware-aware evolutionary search (HAT defaults) for the lowest-loss arch under a latency budget.

    Candidates over --latency-ms are dropped; fitness is the supernet's validation loss (cached per arch), latency comes from the predictor. With --rounds R the top archs are measured on the target, added to --db, the predictor is refitted and the search repeated.
    """
    from mosc.jobs import search as jobs
    from mosc.jobs.bert import is_bert_checkpoint
    from mosc.search.evolve import EvoConfig, check_budget, evolve, pareto_search

    evo = EvoConfig(population=population, parents=parents, mutations=mutations, mutation_prob=mutation_prob,
                    crossovers=crossovers, generations=generations, seed=seed)
    if is_bert_checkpoint(checkpoint):
        return _search_bert(checkpoint, max_params, evo, out, latency_ms=latency_ms, target=target, pareto=pareto)
    if max_params is not None:
        raise MoscError("--max-params constrains a BERT (masked-LM) run's search; a translation search takes --latency-ms")
    if target is None:
        raise MoscError("give --target T (the device whose latency constrains the search)")
    if latency_ms is None and not pareto:
        raise MoscError("give --latency-ms L (or --pareto for the whole front)")
    check_budget(latency_ms)  # before any work is announced
    sp, score = jobs.fitness(fitness, checkpoint, space, val_sentences, max_tokens)
    cfg = evo.check(sp)
    pred = jobs.latency_model(target, sp, predictor, db, log=lambda m: err_console.print(m, style="yellow"))
    target = pred.target  # the canonical name ("rpi" -> "rpi4") in search.json, the plot and the feedback rows
    run = pareto_search if pareto else evolve
    search = lambda sp_, score_, lat: run(sp_, score_, lat, latency_ms, cfg, log=log)  # noqa: E731
    loop = None
    if rounds > 1:
        loop = jobs.feedback(search, sp, score, pred, target, latency_ms, db=db, checkpoint=checkpoint,
                             seed=seed, backend=backend, rounds=rounds, top_k=measure_top, log=log)
        res = loop.result
    else:
        res = search(sp, score, pred.latency)
    info = {"target": target, "space": sp.name, "predictor": str(predictor), "fitness": fitness.value,
            "checkpoint": str(checkpoint) if checkpoint else None, "val_sentences": val_sentences,
            "latency_constraint_ms": latency_ms, "mode": "pareto" if pareto else "constrained",
            "config": cfg.__dict__, "evaluated": res.evaluated, "seconds": round(res.seconds, 2)}
    o = jobs.write_outputs(out, res, info, measured=jobs.measured_points(db, target, sp, score),
                           title=f"{target}: loss vs latency ({sp.name})", latency_ms=latency_ms,
                           ylabel=jobs.fitness_label(fitness), extra={"feedback": loop.to_dict()} if loop else None)
    _print_search(res, latency_ms, loop, rounds)
    console.print(f"[green]wrote[/] {out}/best.json, search.json, pareto.json, pareto.csv"
                  + (", pareto.png" if o.plotted else " (no plot: matplotlib is not installed)"))


def _search_bert(checkpoint: Path, max_params: float | None, evo, out: Path, *, latency_ms, target, pareto) -> None:
    """mosc search on a BERT run: lowest validation MLM loss under a parameter budget."""
    from mosc.jobs import bert as jobs

    if max_params is None:
        raise MoscError("a BERT (masked-LM) run is searched under a parameter budget: give --max-params N")
    if latency_ms is not None or target is not None or pareto:
        raise MoscError("--target/--latency-ms/--pareto are not supported for a BERT run yet; use --max-params")
    fit = jobs.mlm_fitness(checkpoint)
    jobs.check_max_params(fit.space, fit.vocab_size, max_params)  # before any arch is scored
    res = jobs.search_params(fit, max_params, evo, log=log)
    info = {"space": fit.space.name, "checkpoint": str(checkpoint), "fitness": "validation masked-LM loss",
            "valid_blocks": fit.blocks, "max_params": int(max_params), "config": evo.__dict__}
    jobs.write_search(out, res, info)
    t = Table(title=f"front: loss vs parameters ({len(res.front)} archs of {res.evaluated} scored, {res.seconds:.1f} s)")
    for c in ("arch", "hidden", "parameters", "MLM loss"):
        t.add_column(c, justify="left" if c in ("arch", "hidden") else "right")
    for c in res.front:
        t.add_row(c.arch.hash, str(list(c.arch.hidden)), f"{c.latency_ms * 1e6:,.0f}", f"{c.loss:.4f}")
    console.print(t)
    b = res.best
    console.print(f"best: {b.arch.hash} {list(b.arch.hidden)}, MLM loss {b.loss:.4f}, {b.latency_ms * 1e6:,.0f} "
                  f"parameters (budget {max_params:,.0f})")
    console.print(f"[green]wrote[/] {out}/best.json, search.json")


def _print_search(res, latency_ms, loop, rounds):
    t = Table(title=f"Pareto front ({len(res.front)} archs of {res.evaluated} scored, {res.seconds:.1f} s)")
    for c in ("arch", "predicted ms", "loss"):
        t.add_column(c, justify="right" if c != "arch" else "left")
    for c in res.front:
        t.add_row(c.arch.hash, f"{c.latency_ms:.3f}", f"{c.loss:.4f}")
    console.print(t)
    b = res.best
    console.print(f"best: {b.arch.hash}, loss {b.loss:.4f}, predicted {b.latency_ms:.3f} ms"
                  + (f" (constraint {latency_ms:g} ms)" if latency_ms else ""))
    if loop is not None:
        console.print(f"final pick after {rounds} rounds: predicted {loop.final.latency_ms:.3f} ms, measured "
                      f"{loop.final_measured_ms:.3f} ms ({loop.final_error:+.1%})")


# ---- mosc pipeline / demo (the main job) ----------------------------------------------------


@command(app, "pipeline")
def pipeline_cmd(
    config: Optional[Path] = typer.Option(None, "--config", help="Pipeline TOML (examples/*.toml); omitted: the built-in default."),
    out: Path = typer.Option(Path("runs/pipeline"), "--out", "-o", help="Output folder (an existing run in OUT/run is resumed)."),
):
    """The main job end to end: train, measure, fit the predictor, search, export, compile, translate, check the front, summarise.

    The summary is printed and written to OUT/summary.json; every key of the config file is optional (examples/*.toml).

    A config whose space is encoder-only (examples/bert-tiny.toml) runs the BERT pipeline instead: pre-train (masked LM), search under a parameter budget, fine-tune on SST-2, export, compile, check accuracy and latency.
    """
    from mosc.bert_pipeline import BertPipelineConfig, is_bert_config, run_bert_pipeline
    from mosc.fileio import read_toml
    from mosc.pipeline import PipelineConfig, run_pipeline

    raw = read_toml(config, "pipeline config") if config is not None else {}
    if is_bert_config(raw):
        return run_bert_pipeline(BertPipelineConfig.from_dict(raw, str(config)), out, console)
    run_pipeline(PipelineConfig.from_dict(raw, str(config)) if config is not None else PipelineConfig(), out, console)


@command(app, "demo")
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Output folder (an existing run in OUT/run is resumed)."),
    seed: int = typer.Option(0, help="Seed of training, arch sampling and the search."),
):
    """The main job on the built-in default (examples/tiny.toml), the README's first command.

    Trains a tiny MoS supernet on the synthetic task, measures subnets on this machine through TVM, fits the latency predictor, searches under a latency budget, collapses, exports and compiles the winner, translates with it, checks BLEU and measured latency along the Pareto front and writes OUT/summary.json.
    """
    from mosc.pipeline import PipelineConfig, run_pipeline

    run_pipeline(PipelineConfig(seed=seed).check(), out, console)


def main():  # console-script entry point
    app()

"""The `mosc` command line: a thin Typer layer over the library.

Each command resolves its options, calls one library function and prints the result
with rich. Heavy imports (torch, tvm) happen inside the commands so `mosc --help`
answers at once. A `MoscError` from anywhere becomes one red line on stderr and exit
code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import json
import random
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mosc.errors import MoscError

console = Console()
err_console = Console(stderr=True)

app = typer.Typer(
    help="mosc: train, search, collapse, export and compile Mixture-of-Supernets Transformers for edge devices.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
space_app = typer.Typer(help="Inspect search spaces.", no_args_is_help=True)
arch_app = typer.Typer(help="Sample and validate architectures (arch JSON files).", no_args_is_help=True)
app.add_typer(space_app, name="space")
app.add_typer(arch_app, name="arch")


def command(typer_app: typer.Typer, *args, **kwargs):
    """Register a command whose MoscErrors print one line and exit 2."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*a, **kw):
            try:
                return fn(*a, **kw)
            except MoscError as e:
                # the message is plain text: "[rpc]" in it must print, not be taken as markup
                err_console.print(f"[bold red]error:[/] {escape(str(e))}", markup=True, highlight=False, soft_wrap=True)
                raise typer.Exit(2)

        return typer_app.command(*args, **kwargs)(wrapper)

    return decorate


# ---- shared option helpers ---------------------------------------------------------

SPACE_HELP = "Search space: a built-in name (tiny, wmt) or a path to a .toml file."


def _load_arch(path: Path, space) -> "Arch":
    from mosc.space import Arch

    return space.validate(Arch.load(path))


def _arch_table(arch) -> Table:
    t = Table(title=f"arch {arch.hash}", show_header=True)
    t.add_column("part")
    t.add_column("embed")
    t.add_column("layers")
    t.add_column("ffn")
    t.add_column("heads")
    t.add_column("cross heads")
    t.add_column("attends last k enc")
    t.add_row("encoder", str(arch.enc_embed), str(arch.enc_layers), str(list(arch.enc_ffn)), str(list(arch.enc_heads)), "", "")
    t.add_row("decoder", str(arch.dec_embed), str(arch.dec_layers), str(list(arch.dec_ffn)), str(list(arch.dec_heads)),
              str(list(arch.dec_cross_heads)), str(list(arch.dec_arbitrary)))
    return t


# ---- mosc space ---------------------------------------------------------------------


@command(space_app, "list")
def space_list():
    """List the built-in search spaces."""
    from mosc.space import SearchSpace, builtin_spaces

    t = Table("name", "archs", "description")
    for name in builtin_spaces():
        s = SearchSpace.load(name)
        t.add_row(name, f"{s.size():.3e}", s.description)
    console.print(t)


@command(space_app, "show")
def space_show(name: str = typer.Argument(..., help=SPACE_HELP)):
    """Show a space's choices per dimension and its size (number of distinct archs)."""
    from mosc.space import SearchSpace

    s = SearchSpace.load(name)
    t = Table("dimension", "choices", title=f"search space {s.name!r}: {s.description}")
    for part in ("enc", "dec"):
        for f in ("embed", "layers", "ffn", "heads", "cross_heads", "arbitrary"):
            if hasattr(s, f"{part}_{f}"):
                t.add_row(f"{part}_{f}", ", ".join(map(str, getattr(s, f"{part}_{f}"))))
    t.add_row("qkv_dim", str(s.qkv_dim))
    console.print(t)
    console.print(f"size: [bold]{s.size():,}[/] distinct archs (10^{s.summary()['log10_size']:.2f})")


# ---- mosc arch ----------------------------------------------------------------------


@command(arch_app, "sample")
def arch_sample(
    space: str = typer.Option("tiny", "--space", "-s", help=SPACE_HELP),
    seed: int = typer.Option(0, help="Random seed; the same seed gives the same archs."),
    count: int = typer.Option(1, "--count", "-n", min=1, help="How many archs to sample."),
    which: str = typer.Option("random", help="random, largest or smallest."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the arch JSON here (count=1) or one JSON per line (count>1)."),
):
    """Sample architectures from a space and print (or write) them as JSON."""
    from mosc.fileio import atomic_write_text
    from mosc.space import SearchSpace

    s = SearchSpace.load(space)
    if which not in ("random", "largest", "smallest"):
        raise MoscError(f"--which must be random, largest or smallest, got {which!r}")
    rng = random.Random(seed)
    archs = [s.sample(rng) if which == "random" else getattr(s, which)() for _ in range(count)]
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
    from mosc.space import SearchSpace

    arch = _load_arch(path, SearchSpace.load(space))
    console.print(_arch_table(arch))
    console.print(f"[green]ok[/]: {path} is inside space {space!r}")


# ---- mosc collapse ------------------------------------------------------------------


@command(app, "collapse")
def collapse_cmd(
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Supernet checkpoint folder; omitted: a freshly initialised supernet (for a quick look)."),
    arch_file: Optional[Path] = typer.Option(None, "--arch", "-a", help="Arch JSON file; omitted: one sampled with --seed."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for the collapsed subnet (model.safetensors + config.json)."),
    space: str = typer.Option("tiny", "--space", "-s", help=SPACE_HELP + " Used without --checkpoint."),
    mode: str = typer.Option("neuron", help="FFN mode without --checkpoint: shared, layer or neuron."),
    seed: int = typer.Option(0, help="Seed for the fresh supernet and the sampled arch."),
):
    """Collapse a supernet at one arch into a plain static Transformer; print parameter counts
    (actual vs analytic) and the max |supernet(x, arch) - collapsed(x)|."""
    result = run_collapse(checkpoint, arch_file, out, space, mode, seed)
    _print_collapse(result)


def run_collapse(checkpoint, arch_file, out, space, mode, seed) -> dict:
    import torch

    from mosc.nn.model import FFNMode, Supernet, SupernetConfig, count_parameters, load_supernet
    from mosc.space import SearchSpace
    from mosc.nn.subnet import analytic_param_count, collapse, save_subnet

    ck_meta = {}
    if checkpoint is not None:
        supernet, ck_meta = load_supernet(checkpoint)
        s = supernet.space
        source = str(checkpoint)
    else:
        if mode not in FFNMode.__members__:
            raise MoscError(f"--mode must be one of {', '.join(FFNMode.__members__)}, got {mode!r}")
        s = SearchSpace.load(space)
        torch.manual_seed(seed)
        supernet = Supernet(SupernetConfig(space=s.to_dict(), ffn_mode=mode)).eval()
        source = f"untrained {mode} supernet (seed {seed})"
    arch = _load_arch(arch_file, s) if arch_file else s.sample(random.Random(seed))
    t0 = time.perf_counter()
    sub = collapse(supernet, arch)
    collapse_s = time.perf_counter() - t0
    # Exactness check on a random batch with padding (dropout off: both in eval mode).
    g = torch.Generator().manual_seed(seed)
    V = supernet.cfg.vocab_size
    src = torch.randint(4, V, (4, 20), generator=g)
    src[1, 12:] = supernet.cfg.pad_id
    tgt = torch.randint(4, V, (4, 15), generator=g)
    with torch.no_grad():
        diff = (supernet(src, tgt, arch) - sub(src, tgt)).abs().max().item()
    result = {
        "source": source, "arch": arch, "space": s.name, "ffn_mode": supernet.cfg.ffn_mode.value,
        "supernet_params": count_parameters(supernet), "subnet_params": count_parameters(sub),
        "analytic_params": analytic_param_count(arch, V, s.qkv_dim), "max_abs_diff": diff,
        "collapse_s": collapse_s, "out": None,
    }
    if out is not None:
        extra = {"source": source, "max_abs_diff": diff}
        if "tokenizer" in ck_meta:  # a trained run's tokenizer travels with the subnet (export, translate)
            extra["tokenizer"] = ck_meta["tokenizer"]
        save_subnet(sub, out, extra)
        result["out"] = str(out)
    return result


def _print_collapse(r: dict):
    console.print(_arch_table(r["arch"]))
    t = Table("", "value", title=f"collapse of {r['source']} ({r['ffn_mode']}, space {r['space']})")
    t.add_row("supernet parameters", f"{r['supernet_params']:,}")
    t.add_row("collapsed parameters", f"{r['subnet_params']:,}")
    ok = r["subnet_params"] == r["analytic_params"]
    t.add_row("analytic parameters", f"{r['analytic_params']:,} " + ("[green](equal)[/]" if ok else "[red](DIFFERENT)[/]"))
    t.add_row("max |supernet - collapsed|", f"{r['max_abs_diff']:.3e}")
    t.add_row("collapse time", f"{r['collapse_s'] * 1000:.1f} ms")
    if r["out"]:
        t.add_row("written to", r["out"])
    console.print(t)
    if not ok or r["max_abs_diff"] > 1e-5:
        raise MoscError("collapse check failed: parameter count or outputs differ from the supernet")


# ---- mosc train / evaluate ------------------------------------------------------------


@command(app, "train")
def train_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: checkpoints (step_*/), 'latest' pointer, log.jsonl."),
    corpus: str = typer.Option("synthetic", help="'synthetic' (built in), a corpus folder, a name under ../shared/data (multi30k) or a path prefix."),
    src_lang: str = typer.Option("en", help="Source language suffix of the corpus files."),
    tgt_lang: str = typer.Option("de", help="Target language suffix of the corpus files."),
    vocab_size: Optional[int] = typer.Option(None, help="Joint BPE vocabulary size (default 8000 real, 1000 synthetic)."),
    max_train_pairs: Optional[int] = typer.Option(None, help="Use only the first N training pairs (quick runs)."),
    space: str = typer.Option("tiny", "--space", "-s", help=SPACE_HELP),
    mode: str = typer.Option("neuron", help="FFN mode: shared (HAT), layer or neuron (MoS)."),
    experts: int = typer.Option(2, help="m: experts per FFN matrix (MoS modes)."),
    router_hidden: int = typer.Option(128, help="H: router hidden size (MoS modes)."),
    arch_file: Optional[Path] = typer.Option(None, "--arch", "-a", help="Train this one arch from scratch (standalone baseline) instead of a supernet."),
    steps: int = typer.Option(2000, help="Optimizer updates in total."),
    max_tokens: int = typer.Option(2048, help="Padded tokens per batch (per process)."),
    lr: float = typer.Option(1e-3, help="Peak learning rate."),
    warmup: int = typer.Option(200, help="Linear warm-up updates."),
    sandwich_random: int = typer.Option(1, help="k random archs per update besides the largest and smallest."),
    distill: float = typer.Option(0.0, help="Weight of in-place distillation from the largest arch (0 = off)."),
    dropout: float = typer.Option(0.3, help="Residual dropout at the largest embed dim (scaled by D / D_max)."),
    save_every: int = typer.Option(500, help="Checkpoint every N updates (and at the end)."),
    log_every: int = typer.Option(20, help="Updates between log lines (log.jsonl, progress bar)."),
    seed: int = typer.Option(0, help="Seed for init, arch sampling, dropout and batch order."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out where it stopped, with the run's own settings (only --steps is read; a larger --steps stretches the cosine schedule)."),
):
    """Train a MoS supernet (sandwich rule) or, with --arch, one standalone arch. Works under
    `torchrun --nproc_per_node N` for data-parallel training (gloo)."""
    from mosc.space import Arch
    from mosc.nn.train import TrainConfig, train

    cfg = TrainConfig(steps=steps, max_tokens=max_tokens, lr=lr, warmup=warmup, sandwich_random=sandwich_random,
                      distill=distill, save_every=save_every, log_every=log_every, seed=seed)
    corpus_args = {"src_lang": src_lang, "tgt_lang": tgt_lang}
    if vocab_size is not None:
        corpus_args["vocab_size"] = vocab_size
    if max_train_pairs is not None:
        corpus_args["max_train_pairs"] = max_train_pairs
    arch = Arch.load(arch_file) if arch_file else None
    overrides = {"n_experts": experts, "router_hidden": router_hidden, "dropout": dropout}
    r = train(out, corpus=corpus, space=space, mode=mode, cfg=cfg, model_overrides=overrides, corpus_args=corpus_args,
              arch=arch, resume=resume)
    if r.checkpoint != r.run:
        console.print(f"[green]trained[/] {r.steps - r.start_step} updates"
                      f"{f' (steps {r.start_step}->{r.steps})' if r.start_step else ''} in {r.seconds:.0f} s, {r.tokens_per_s:,.0f} target tokens/s, "
                      f"last loss {r.final_loss:.3f}; checkpoint: {r.checkpoint}")


@command(app, "evaluate")
def evaluate_cmd(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="Run folder or checkpoint folder from `mosc train`."),
    arch_file: Optional[Path] = typer.Option(None, "--arch", "-a", help="Arch JSON; default: the run's fixed arch, else the largest."),
    subnet: Optional[Path] = typer.Option(None, help="Evaluate this collapsed subnet folder instead of the supernet."),
    split: str = typer.Option("val", help="train, val or test."),
    beam: int = typer.Option(1, help="Beam size (1 = greedy)."),
    max_sentences: Optional[int] = typer.Option(None, help="Evaluate only the first N sentences."),
    bleu: bool = typer.Option(True, "--bleu/--no-bleu", help="Decode and score BLEU (slower) or loss only."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the numbers (and hypotheses) as JSON here."),
):
    """Validation loss and corpus BLEU (sacrebleu) of the supernet at an arch (inherited weights)
    and, with --subnet, of a collapsed subnet."""
    from mosc.nn.evaluate import evaluate
    from mosc.fileio import atomic_write_json
    from mosc.space import Arch
    from mosc.nn.subnet import load_subnet
    from mosc.nn.train import load_run_corpus, load_trained

    model, tok, meta = load_trained(checkpoint)
    data = load_run_corpus(meta, tok)
    fixed = meta.get("train", {}).get("fixed_arch")
    if subnet is not None:
        target, arch, what = load_subnet(subnet), None, f"subnet {subnet}"
        arch_shown = target.arch
    else:
        arch = model.space.validate(Arch.load(arch_file)) if arch_file else (Arch.from_dict(fixed) if fixed else model.space.largest())
        target, what, arch_shown = model, "supernet (inherited weights)", arch
    e = evaluate(target, data, arch, split=split, beam=beam, max_sentences=max_sentences, bleu=bleu)
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


# ---- mosc targets / export / compile / translate ------------------------------------

TARGET_HELP = "Target device: a file name in targets/ (see `mosc targets`)."


@command(app, "targets")
def targets_cmd():
    """List the deployment targets (targets/*.toml) with their TVM target and description."""
    from mosc.compiler.targets import list_targets, load_target, targets_dir

    t = Table("name", "TVM target", "cross compiler", "description", title=f"targets in {targets_dir()}")
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
        t.add_row(name, escape(spec), tg.cross_compiler or "-", escape(tg.description))
    console.print(t)
    if broken:
        raise MoscError(f"{len(broken)} broken target file(s): " + " | ".join(broken))


def _load_subnet_source(subnet: Optional[Path], checkpoint: Optional[Path], arch_file: Optional[Path]):
    """(Subnet, tokenizer JSON or None, description) from --subnet DIR or --checkpoint RUN --arch a.json."""
    if (subnet is None) == (checkpoint is None):
        raise MoscError("give exactly one of --subnet DIR or --checkpoint RUN (with --arch a.json)")
    if subnet is not None:
        if arch_file is not None:
            raise MoscError("--arch goes with --checkpoint; a --subnet folder already has its arch")
        from mosc.fileio import read_json
        from mosc.nn.subnet import load_subnet

        sub = load_subnet(subnet)
        meta = read_json(subnet / "config.json", "subnet config")
        return sub, meta.get("tokenizer"), f"subnet {subnet}"
    if arch_file is None:
        raise MoscError("--checkpoint needs --arch a.json (the architecture to collapse and export)")
    from mosc.nn.model import load_supernet
    from mosc.nn.subnet import collapse
    from mosc.fileio import resolve_checkpoint

    ckpt = resolve_checkpoint(checkpoint)
    supernet, meta = load_supernet(ckpt)
    arch = _load_arch(arch_file, supernet.space)
    return collapse(supernet, arch), meta.get("tokenizer"), f"{ckpt} at arch {arch.hash}"


def run_export(subnet, checkpoint, arch_file, out, target, batch, source_len, cache_len, check=True) -> dict:
    from mosc.nn.export import Shapes, export_subnet

    shapes = Shapes.from_target(target, batch, source_len, cache_len)  # unknown target: one line
    sub, tok_json, source = _load_subnet_source(subnet, checkpoint, arch_file)
    return export_subnet(sub, out, shapes, tokenizer_json=tok_json, check=check, extra={"source": source})


def _print_export(meta: dict, out: Path):
    sh = meta["shapes"]
    t = Table("", "value", title=f"export of arch {meta['arch_hash']} ({meta['param_count']:,} parameters)")
    t.add_row("shapes", f"batch {sh['batch']}, source length {sh['source_len']}, KV cache {sh['cache_len']}")
    for g in meta["graphs"].values():
        size = (out / g["file"]).stat().st_size / 1e6
        t.add_row(g["file"], f"{size:.1f} MB, inputs {', '.join(i['name'] for i in g['inputs'])}")
    p = meta.get("parity")
    if p:
        for g in ("encoder", "decoder_step"):
            t.add_row(f"max |torch - onnxruntime| {g}", f"{p[f'{g}_max_abs_diff']:.2e} (limit {p['atol']:g})")
        same = "[green]same tokens[/]" if p["greedy_tokens_equal"] else "[red]DIFFERENT tokens[/]"
        t.add_row("greedy: onnxruntime vs torch", same)
    t.add_row("tokenizer", "included" if meta.get("tokenizer") else "none (translate will print ids)")
    t.add_row("time", f"{meta['export_seconds']:.1f} s")
    console.print(t)


SHAPE_OPTS = {
    "batch": "Batch size B of the static graphs (default: the target's protocol).",
    "source_len": "Source length S in tokens (default: the target's protocol source_len).",
    "cache_len": "KV-cache length T = decoder steps (default: the target's protocol decoder_steps).",
}


@command(app, "export")
def export_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Folder for encoder.onnx, decoder_step.onnx and export.json."),
    subnet: Optional[Path] = typer.Option(None, "--subnet", help="Collapsed subnet folder (from `mosc collapse -o`)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Supernet run or checkpoint folder; needs --arch."),
    arch_file: Optional[Path] = typer.Option(None, "--arch", "-a", help="Arch JSON to collapse the checkpoint at."),
    target: str = typer.Option("host", "--target", "-t", help="Target whose \\[protocol] gives the static shapes."),
    batch: Optional[int] = typer.Option(None, min=1, help=SHAPE_OPTS["batch"]),
    source_len: Optional[int] = typer.Option(None, min=1, help=SHAPE_OPTS["source_len"]),
    cache_len: Optional[int] = typer.Option(None, min=1, help=SHAPE_OPTS["cache_len"]),
    check: bool = typer.Option(True, "--check/--no-check", help="Compare onnxruntime with PyTorch (max abs diff, greedy tokens)."),
):
    """Export a collapsed subnet to two static ONNX graphs (encoder, decoder step with KV cache),
    checked against PyTorch with onnxruntime."""
    meta = run_export(subnet, checkpoint, arch_file, out, target, batch, source_len, cache_len, check)
    _print_export(meta, out)
    console.print(f"[green]exported[/] to {out}")


@command(app, "compile")
def compile_cmd(
    target: str = typer.Option(..., "--target", "-t", help=TARGET_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Artifact folder: encoder.so, decoder_step.so, manifest.json."),
    onnx_dir: Optional[Path] = typer.Option(None, "--onnx-dir", help="Export folder from `mosc export`."),
    subnet: Optional[Path] = typer.Option(None, "--subnet", help="One step: export this subnet folder, then compile."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="One step: collapse this checkpoint at --arch, export, compile."),
    arch_file: Optional[Path] = typer.Option(None, "--arch", "-a", help="Arch JSON (with --checkpoint)."),
    trials: int = typer.Option(256, min=0, help="MetaSchedule trial budget for tasks the tuning database lacks."),
    tune: bool = typer.Option(True, "--tune/--no-tune", help="Tune (default) or build with what the database already holds."),
    db: Optional[Path] = typer.Option(None, help="Tuning database folder (default: ~/.cache/mosc/tune/<target>)."),
    tracker: Optional[str] = typer.Option(None, help="RPC tracker HOST:PORT where tuning measures a cross/GPU target (default: the target's \\[rpc])."),
    key: Optional[str] = typer.Option(None, help="Device key at the tracker (default: the target's \\[rpc] key)."),
    batch: Optional[int] = typer.Option(None, min=1, help=SHAPE_OPTS["batch"] + " One-step path only."),
    source_len: Optional[int] = typer.Option(None, min=1, help=SHAPE_OPTS["source_len"] + " One-step path only."),
    cache_len: Optional[int] = typer.Option(None, min=1, help=SHAPE_OPTS["cache_len"] + " One-step path only."),
):
    """Compile an exported model with TVM for a target (tuned with MetaSchedule against a
    per-target database) into a verifiable artifact folder."""
    import tempfile

    from mosc.compiler import compile as C
    from mosc.compiler.targets import load_target
    from mosc.contract import load_export, onnx_files

    tg = load_target(target).with_rpc(tracker, key)
    C.require_cross_compiler(tg)
    if sum(x is not None for x in (onnx_dir, subnet, checkpoint)) != 1:
        raise MoscError("give exactly one of --onnx-dir DIR, --subnet DIR or --checkpoint RUN --arch a.json")
    with tempfile.TemporaryDirectory(prefix="mosc-export-") as tmp:
        if onnx_dir is None:
            onnx_dir = Path(tmp)
            meta = run_export(subnet, checkpoint, arch_file, onnx_dir, target, batch, source_len, cache_len)
            _print_export(meta, onnx_dir)
        else:
            if any(x is not None for x in (batch, source_len, cache_len, arch_file)):
                raise MoscError("--batch/--source-len/--cache-len/--arch apply to the one-step path; an export's shapes are fixed")
            meta = load_export(onnx_dir)
        model = {k: meta.get(k) for k in ("arch", "arch_hash", "shapes", "bos_id", "eos_id", "pad_id", "param_count",
                                          "parity", "tokenizer")}
        model["onnx_sha256"] = meta["files"]
        db_dir = db or C.default_db_dir(tg)
        what = f"{trials} trials" if tune and trials else "no tuning"
        err_console.print(f"compiling arch {meta['arch_hash']} for {tg.name} ({what}; database {db_dir})", highlight=False)
        art = C.compile_artifact(onnx_files(onnx_dir, meta), tg, out, trials=trials, tune=tune and trials > 0,
                                 db_dir=db_dir, extra_manifest={"model": model})
    m = C.read_manifest(art)
    r = m["tuning"]["report"]
    t = Table("", "value", title=f"artifact {out} for {tg.name}")
    t.add_row("TVM target", m["tvm_target"])
    if r:
        t.add_row("tuning tasks", f"{r['tasks']} ({r['cached']} cached, {r['tuned']} tuned; left unscheduled: "
                                  f"{r.get('untried', 0)} without a trial (raise --trials), "
                                  f"{r.get('untunable', 0)} untunable)")
        t.add_row("trials measured", str(r["trials"]))
        t.add_row("tuning time", f"{r['seconds']:.1f} s")
    else:
        t.add_row("tuning", "skipped (--no-tune): " + (
            "database records applied" if m["tuning"]["database"]["records"] else
            "no records: TVM's default GPU schedules" if m["device"] != "cpu" else
            "no records, unscheduled CPU code is slow"))
    t.add_row("database", f"{m['tuning']['database']['path']} ({m['tuning']['database']['records']} records)")
    for f in m["files"]:
        t.add_row(f, f"{(art / f).stat().st_size / 1e6:.1f} MB")
    t.add_row("compile time", f"{m['compile_seconds']:.1f} s")
    console.print(t)
    if r:
        print(f"tuning report: tasks={r['tasks']} cached={r['cached']} tuned={r['tuned']} untried={r.get('untried', 0)} "
              f"untunable={r.get('untunable', 0)} trials={r['trials']} seconds={r['seconds']:.1f}")
    console.print(f"[green]compiled[/] {out}")


@command(app, "translate")
def translate_cmd(
    artifact: Path = typer.Option(..., "--artifact", help="Artifact folder from `mosc compile` (sha256s are verified)."),
    text: Optional[list[str]] = typer.Option(None, "--text", help="Sentence to translate (repeatable)."),
    file: Optional[Path] = typer.Option(None, "--file", "-f", help="Text file, one sentence per line."),
    tokenizer: Optional[Path] = typer.Option(None, help="Tokenizer JSON, when the artifact carries none."),
    ids: bool = typer.Option(False, "--ids", help="Also print the output token ids."),
):
    """Translate with a compiled artifact: tokenize, run the TVM encoder and decoder steps
    (greedy, fixed-size KV cache), detokenize."""
    from mosc.compiler.compile import load_artifact, read_manifest
    from mosc.runtime import artifact_backend, translate_ids

    if (text is None) == (file is None):
        raise MoscError("give --text SENTENCE (repeatable) or --file FILE")
    model = read_manifest(artifact).get("model")
    if not model:
        raise MoscError(f"{artifact} was not compiled from a mosc export (no model section in its manifest)")
    if file is not None:
        try:
            sentences = [l.strip() for l in file.read_text(encoding="utf-8").splitlines() if l.strip()]
        except OSError as e:
            raise MoscError(f"cannot read {file} ({e.strerror})") from None
    else:
        sentences = [s for s in text]
    from mosc.nn.data import SubwordTokenizer

    tok = SubwordTokenizer.load(tokenizer) if tokenizer else (
        SubwordTokenizer.from_json(model["tokenizer"]) if model.get("tokenizer") else None)
    if tok is None:
        raise MoscError(f"{artifact} carries no tokenizer (the subnet came from an untrained supernet); pass --tokenizer FILE")
    art = load_artifact(artifact)  # verifies every sha256 before loading code
    backend = artifact_backend(art)
    src = [tok.encode(s) for s in sentences]
    t0 = time.perf_counter()
    out_ids, truncated = translate_ids(backend, src, model["bos_id"], model["eos_id"], model["pad_id"])
    dt = time.perf_counter() - t0
    if truncated:
        err_console.print(f"[yellow]warning:[/] {truncated} sentence(s) longer than {backend.source_len} tokens were truncated")
    for row in out_ids:
        print(tok.decode(row))
        if ids:
            print("ids: " + " ".join(map(str, row)))
    err_console.print(f"{len(sentences)} sentence(s) in {dt * 1000:.1f} ms on {art.manifest['target']}", highlight=False)


# ---- mosc demo (the README's first command) -----------------------------------------


@command(app, "demo")
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Output folder (an existing run in OUT/run is resumed)."),
    seed: int = typer.Option(0, help="Seed of training, arch sampling and the search."),
):
    """The main job on the built-in default (examples/tiny.toml): train a tiny MoS supernet on the
    synthetic task, measure subnets on this machine through TVM, fit the latency predictor, search
    under a latency budget, collapse + export + compile the winner, translate with it, check BLEU and
    measured latency along the Pareto front, summarise (OUT/summary.json)."""
    from mosc.pipeline import PipelineConfig, run_pipeline

    run_pipeline(PipelineConfig(seed=seed).check(), out, console)


# ---- mosc measure / device / db (issue 5) ---------------------------------------------

device_app = typer.Typer(help="RPC tracker, RPC servers and emulated devices for measuring latency.", no_args_is_help=True)
db_app = typer.Typer(help="The latency database (SQLite): import HAT's data, export, summarise.", no_args_is_help=True)
app.add_typer(device_app, name="device")
app.add_typer(db_app, name="db")
DB_HELP = "Latency database file (default: $MOSC_LATENCY_DB or ~/.cache/mosc/latency.db)."


def _db_path(db: Optional[Path]) -> Path:
    from mosc import env

    return db or env.latency_db_path()


@command(app, "measure")
def measure_cmd(
    target: str = typer.Option(..., "--target", "-t", help=TARGET_HELP),
    arch_file: Optional[Path] = typer.Option(None, "--arch", "-a", help="Measure this arch JSON file."),
    sample: Optional[int] = typer.Option(None, "--sample", "-n", min=1, help="Measure N distinct archs sampled with --seed."),
    seed: int = typer.Option(0, help="Seed of --sample and of the random supernet (without --checkpoint)."),
    space: str = typer.Option("tiny", "--space", "-s", help=SPACE_HELP + " Used without --checkpoint."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Supernet run/checkpoint; omitted: a seeded randomly initialised supernet (latency does not depend on weights)."),
    backend: str = typer.Option("tvm", help="tvm (compiled artifact, local or over RPC), ort (ONNX Runtime) or torch (PyTorch eager); ort/torch run on this machine."),
    db: Optional[Path] = typer.Option(None, "--db", help=DB_HELP),
    tracker: Optional[str] = typer.Option(None, help="RPC tracker HOST:PORT (default: the target's \\[rpc]); giving it measures over RPC."),
    key: Optional[str] = typer.Option(None, help="Device key at the tracker (default: the target's \\[rpc] key); giving it measures over RPC."),
    force: bool = typer.Option(False, "--force", help="Measure archs already in the database again (adds rows)."),
    tune: bool = typer.Option(True, "--tune/--no-tune", help="Tune new artifacts with MetaSchedule (real speed) or build with what the tuning database holds."),
    trials: Optional[int] = typer.Option(None, min=1, help="MetaSchedule trial budget per new artifact (default: mosc compile's)."),
    tune_db: Optional[Path] = typer.Option(None, help="Tuning database folder (default: ~/.cache/mosc/tune/<target>)."),
    cache: Optional[Path] = typer.Option(None, help="Artifact cache folder (default: $MOSC_ARTIFACT_CACHE or ~/.cache/mosc/artifacts)."),
    timeout: float = typer.Option(600.0, min=1.0, help="Seconds one arch's RPC session may last before the server ends it (then it is retried)."),
    tries: int = typer.Option(3, min=1, help="Attempts per arch (connect, upload, measure) before giving up."),
):
    """Measure latency with HAT's protocol (encoder + N incremental decoder steps, warm-up, repeats,
    trimmed mean) locally or on a device over TVM RPC; every arch's row is committed to the database
    at once, and a re-run skips archs already measured."""
    from mosc.jobs.artifacts import ArtifactCache, ModelSource, load_space, sample_archs
    from mosc.device.db import LatencyDB
    from mosc.device.measure import Campaign
    from mosc.rpc import Remote
    from mosc.compiler.targets import load_target

    tg = load_target(target)
    if (arch_file is None) == (sample is None):
        raise MoscError("give --arch a.json or --sample N")
    source = ModelSource(checkpoint=checkpoint, space=space, seed=seed)
    sp = load_space(source)
    archs = [_load_arch(arch_file, sp)] if arch_file else sample_archs(sp, sample, seed)
    remote = None
    if backend == "tvm" and (tracker or key or tg.is_cross or tg.device_type() != "cpu"):
        tg = tg.with_rpc(tracker, key)  # tuning new artifacts (--tune) uses the same device
        remote = Remote(tg.rpc.tracker_host, tg.rpc.tracker_port, tg.rpc.key, session_timeout=timeout)
    elif backend != "tvm" and (tracker or key):
        raise MoscError(f"--backend {backend} measures on this machine; --tracker/--key are for the tvm backend")
    db_path = _db_path(db)
    log = lambda msg: err_console.print(msg, highlight=False, markup=False, soft_wrap=True)
    with LatencyDB(db_path) as ldb:
        camp = Campaign(tg, backend, ldb, remote=remote, force=force, tries=tries, log=log)
        dev = camp.probe()  # fails fast (one line) when the tracker or the device is not there
        where = f"device {remote.key!r} via tracker {remote.addr}" if remote else f"this machine ({dev.get('machine')})"
        emu = " [EMULATED: timings check function, not speed; stored with emulated=1]" if camp.emulated else ""
        p = tg.protocol
        log(f"measuring {len(archs)} arch(s) for {tg.name} with {backend} on {where}{emu}")
        log(f"protocol: batch {p.batch}, source {p.source_len} tokens, {p.decoder_steps} decoder steps, "
            f"{p.warmup} warm-up + {p.repeats} timed runs, trim {p.trim:g} per tail; weights: {source.describe()}")
        cache_ = ArtifactCache(tg, source, root=cache, tune=tune, trials=trials, tune_db=tune_db, log=log)
        res = camp.run(archs, lambda a: cache_.prepare(a, backend))
    t = Table(title=f"{tg.name} / {backend} / {camp.key}{' (emulated)' if camp.emulated else ''}: latency in ms")
    t.add_column("arch", no_wrap=True)
    for c in ("trimmed mean", "encoder", "decoder", "median", "p90", "std", "runs"):
        t.add_column(c, justify="right")
    for r in res.measured:
        t.add_row(r["arch_hash"], f"{r['trimmed_mean_ms']:.3f}", f"{r['encoder_ms']:.3f}", f"{r['decoder_ms']:.3f}",
                  f"{r['median_ms']:.3f}", f"{r['p90_ms']:.3f}", f"{r['std_ms']:.3f}", str(r["runs"]))
    if res.measured:
        console.print(t)
    console.print(f"[green]measured[/] {len(res.measured)}, skipped {len(res.skipped)} already in {db_path}")


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
):
    """Run a TVM RPC server on this machine, registered with a tracker (foreground)."""
    from mosc.device.server import run_server
    from mosc.rpc import parse_hostport

    th, tp = parse_hostport(tracker)
    run_server(th, tp, key, host, port)


@command(device_app, "emulate")
def device_emulate(
    target: str = typer.Argument(..., help="Target to emulate (rpi4: aarch64 under qemu-user)."),
    tracker: str = typer.Option("127.0.0.1:9190", help="Tracker HOST:PORT to register with."),
    key: Optional[str] = typer.Option(None, help="Device key (default: the target's \\[rpc] key)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind."),
    port: int = typer.Option(9091, help="First TCP port to try."),
    root: Optional[Path] = typer.Option(None, help="arm64 root (default: $MOSC_ARM64_ROOT or ~/.cache/mosc/arm64-root; see scripts/setup_arm64_root.sh)."),
):
    """Run an RPC server for the target's CPU under qemu-user (replaces this process). Its timings
    are marked emulated=1 everywhere: they check function, not speed."""
    import os

    from mosc import env
    from mosc.device.server import emulate_command
    from mosc.rpc import parse_hostport
    from mosc.compiler.targets import load_target

    tg = load_target(target)
    th, tp = parse_hostport(tracker)
    work = env.emulate_workdir(target)
    try:
        argv, env = emulate_command(target, th, tp, key or tg.rpc.key, host, port, work, root)
    except SystemExit as e:
        raise MoscError(str(e).removeprefix("error: ")) from None
    err_console.print(f"starting an emulated {target} RPC server (qemu-user); first start takes ~10-30 s", highlight=False)
    os.execve(argv[0], argv, env)


@command(device_app, "list")
def device_list(tracker: str = typer.Option("127.0.0.1:9190", help="Tracker HOST:PORT.")):
    """Show the devices registered with a tracker."""
    from mosc.rpc import parse_hostport, tracker_summary

    th, tp = parse_hostport(tracker)
    try:
        s = tracker_summary(th, tp)
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

    with LatencyDB(_db_path(db)) as ldb:
        n = ldb.export_csv(out, target=target, include_emulated=not real_only)
    console.print(f"[green]wrote[/] {n} rows to {out}")


@command(db_app, "stats")
def db_stats(db: Optional[Path] = typer.Option(None, "--db", help=DB_HELP)):
    """Summarise the database: rows per target, backend, device and emulated flag."""
    from mosc.device.db import LatencyDB

    path = _db_path(db)
    if not path.exists():
        raise MoscError(f"no latency database at {path}")
    with LatencyDB(path) as ldb:
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


# ---- mosc bench / check (issue 7: latency-regression CI) -------------------------------

BENCH_ARTIFACT_HELP = "Measure this compiled artifact folder (from `mosc compile`)."
BENCH_ARCH_HELP = "Measure this arch JSON: its artifact is built (or reused) in the artifact cache."


def _bench_result(target, artifact, arch_file, checkpoint, space, seed, tune, trials, tune_db, cache, repeats,
                  tracker, key, log) -> dict:
    """Measure (artifact folder or arch JSON) with the target's protocol -> a mosc bench result dict."""
    from mosc.rpc import Remote
    from mosc.regress import bench
    from mosc.compiler.targets import load_target

    tg = load_target(target).with_rpc(tracker, key)  # building with --tune measures on the same device
    if (artifact is None) == (arch_file is None):
        raise MoscError("give --artifact DIR or --arch ARCH.json")
    arch = None
    if arch_file is not None:
        from mosc.jobs.artifacts import ArtifactCache, ModelSource, load_space

        source = ModelSource(checkpoint=checkpoint, space=space, seed=seed)
        arch = _load_arch(arch_file, load_space(source))
        artifact, _ = ArtifactCache(tg, source, root=cache, tune=tune, trials=trials, tune_db=tune_db,
                                    log=log).artifact(arch)
    elif checkpoint is not None:
        raise MoscError("--checkpoint goes with --arch (an artifact folder already holds its weights)")
    remote = None
    if tracker or key or tg.is_cross:
        remote = Remote(tg.rpc.tracker_host, tg.rpc.tracker_port, tg.rpc.key)
    p = tg.protocol
    log(f"benchmarking {artifact} for {tg.name} on {'this machine' if remote is None else remote.key + ' via ' + remote.addr}: "
        f"{p.warmup} warm-up + {repeats or p.repeats} timed runs (source {p.source_len}, {p.decoder_steps} steps)")
    return bench(tg, artifact, arch, repeats=repeats, remote=remote)


def _bench_line(r: dict) -> str:
    s = r["stats"]
    return (f"{r['target']} / arch {r['arch']['hash']}: median {s['median_ms']:.3f} ms, p90 {s['p90_ms']:.3f} ms, "
            f"trimmed mean {s['trimmed_mean_ms']:.3f} ms, std {s['std_ms']:.3f} ms over {len(r['samples_ms'])} runs "
            f"({r['wall_s']:.1f} s)")


@command(app, "bench")
def bench_cmd(
    target: str = typer.Option(..., "--target", "-t", help=TARGET_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Result JSON to write (raw samples, stats, environment, protocol, arch, artifact sha256)."),
    artifact: Optional[Path] = typer.Option(None, "--artifact", help=BENCH_ARTIFACT_HELP),
    arch_file: Optional[Path] = typer.Option(None, "--arch", "-a", help=BENCH_ARCH_HELP),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Supernet run/checkpoint for --arch; omitted: a seeded randomly initialised supernet (latency does not depend on weights)."),
    space: str = typer.Option("tiny", "--space", "-s", help=SPACE_HELP + " Used with --arch without --checkpoint."),
    seed: int = typer.Option(0, help="Seed of the random supernet (--arch without --checkpoint)."),
    repeats: Optional[int] = typer.Option(None, min=2, help="Timed runs (default: the target's \\[protocol] repeats)."),
    tune: bool = typer.Option(True, "--tune/--no-tune", help="Tune a new artifact for --arch with MetaSchedule, or build with what the tuning database holds."),
    trials: Optional[int] = typer.Option(None, min=1, help="MetaSchedule trial budget for a new artifact (default: mosc compile's)."),
    tune_db: Optional[Path] = typer.Option(None, help="Tuning database folder (default: ~/.cache/mosc/tune/<target>)."),
    cache: Optional[Path] = typer.Option(None, help="Artifact cache folder (default: $MOSC_ARTIFACT_CACHE or ~/.cache/mosc/artifacts)."),
    tracker: Optional[str] = typer.Option(None, help="RPC tracker HOST:PORT (default: the target's \\[rpc]); giving it measures over RPC."),
    key: Optional[str] = typer.Option(None, help="Device key at the tracker (default: the target's \\[rpc] key); giving it measures over RPC."),
):
    """Measure one artifact with the target's protocol and write a result JSON for `mosc check`."""
    from mosc.fileio import atomic_write_json

    log = lambda msg: err_console.print(msg, highlight=False, markup=False, soft_wrap=True)
    r = _bench_result(target, artifact, arch_file, checkpoint, space, seed, tune, trials, tune_db, cache, repeats,
                      tracker, key, log)
    atomic_write_json(out, r)
    console.print(_bench_line(r), highlight=False)
    console.print(f"[green]wrote[/] {out}")


def _check_table(rep: dict) -> Table:
    colour = {"pass": "green", "improved": "cyan", "regression": "bold red"}
    conf = rep["method"]["confidence"]
    t = Table(title=f"latency check: {rep['target']} / arch {rep['arch_hash']} "
                    f"({rep['runs']['baseline']} vs {rep['runs']['current']} runs)")
    t.add_column("metric", no_wrap=True)
    for c in ("baseline ms", "current ms", "ratio", f"{conf:.0%} CI", "tolerance"):
        t.add_column(c, justify="right", no_wrap=True)
    t.add_column("verdict", no_wrap=True)
    for r in rep["metrics"]:
        t.add_row(r["metric"], f"{r['baseline_ms']:.4f}", f"{r['current_ms']:.4f}", f"{r['ratio']:.4f}",
                  f"\\[{r['ci_low']:.4f}, {r['ci_high']:.4f}]", f"+{r['tolerance']:.0%}",
                  f"[{colour[r['verdict']]}]{r['verdict']}[/]")
    return t


@command(app, "check")
def check_cmd(
    baseline: Path = typer.Option(..., "--baseline", "-b", help="Baseline result JSON (from `mosc bench`); with --update-baseline it may not exist yet."),
    result: Optional[Path] = typer.Option(None, "--result", "-r", help="Result JSON to check (from `mosc bench`); or give --artifact/--arch to measure now."),
    artifact: Optional[Path] = typer.Option(None, "--artifact", help=BENCH_ARTIFACT_HELP + " Measured now, then checked."),
    arch_file: Optional[Path] = typer.Option(None, "--arch", "-a", help=BENCH_ARCH_HELP + " Measured now, then checked."),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="Target when measuring now (default: the baseline's)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Supernet run/checkpoint for --arch (default: a seeded random supernet)."),
    space: str = typer.Option("tiny", "--space", "-s", help=SPACE_HELP + " Used with --arch without --checkpoint."),
    seed: int = typer.Option(0, help="Seed of the random supernet (--arch without --checkpoint)."),
    repeats: Optional[int] = typer.Option(None, min=2, help="Timed runs when measuring now (default: the target's \\[protocol] repeats)."),
    tune: bool = typer.Option(True, "--tune/--no-tune", help="Tune a new artifact for --arch, or build with what the tuning database holds."),
    trials: Optional[int] = typer.Option(None, min=1, help="MetaSchedule trial budget for a new artifact."),
    tune_db: Optional[Path] = typer.Option(None, help="Tuning database folder (default: ~/.cache/mosc/tune/<target>)."),
    cache: Optional[Path] = typer.Option(None, help="Artifact cache folder (default: $MOSC_ARTIFACT_CACHE or ~/.cache/mosc/artifacts)."),
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
):
    """Compare a result with a baseline: bootstrap confidence intervals of the current/baseline ratio of
    the median and p90 (Mann-Whitney U as a secondary statistic) against the target's \\[regression]
    tolerances. Exit 0 pass or improved, 1 regression, 2 bad input or not comparable."""
    from mosc.fileio import atomic_write_json, atomic_write_text
    from mosc.regress import compare, compatible, junit_xml, load_result

    if force and not update_baseline:
        raise MoscError("--force only goes with --update-baseline")
    base = load_result(baseline, "baseline") if baseline.exists() or not update_baseline else None
    log = lambda msg: err_console.print(msg, highlight=False, markup=False, soft_wrap=True)
    if result is not None:
        if artifact is not None or arch_file is not None:
            raise MoscError("give --result or --artifact/--arch (measure now), not both")
        res = load_result(result)
    else:
        tname = target or (base or {}).get("target")
        if not tname:
            raise MoscError("give --target (there is no baseline to take it from)")
        res = _bench_result(tname, artifact, arch_file, checkpoint, space, seed, tune, trials, tune_db, cache,
                            repeats, tracker, key, log)
        console.print(_bench_line(res), highlight=False)
        if out is not None:
            atomic_write_json(out, res)
    if base is None:
        atomic_write_json(baseline, res)
        console.print(f"[green]no baseline yet: wrote[/] {baseline}")
        return
    try:
        compatible(base, res)
    except MoscError:
        if not (update_baseline and force):
            raise
        atomic_write_json(baseline, res)
        console.print(f"[yellow]baseline was not comparable; replaced (--force):[/] {baseline}")
        return
    rep = compare(base, res, resamples=resamples, confidence=confidence, seed=ci_seed, check_compatible=False)
    console.print(_check_table(rep))
    mw = rep["mann_whitney"]
    console.print(f"Mann-Whitney U (secondary, current slower?): U = {mw['U']:.0f}, p = {mw['p_value']:.3g}",
                  highlight=False)
    if json_out is not None:
        atomic_write_json(json_out, rep)
    if junit is not None:
        atomic_write_text(junit, junit_xml(rep))
    colour = {"pass": "green", "improved": "cyan", "regression": "bold red"}[rep["verdict"]]
    console.print(f"verdict: [{colour}]{rep['verdict']}[/]")
    if update_baseline:
        if rep["verdict"] != "regression" or force:
            atomic_write_json(baseline, res)
            console.print(f"[green]baseline updated:[/] {baseline}")
        else:
            console.print(f"[yellow]baseline not updated (regression; --force replaces it anyway)[/]")
    raise typer.Exit(rep["exit_code"])


# ---- mosc predictor / search (issue 6) -------------------------------------------------

predictor_app = typer.Typer(help="Latency predictors: fit on the latency DB or a HAT CSV, evaluate.", no_args_is_help=True)
app.add_typer(predictor_app, name="predictor")


def _predictor_data(db: Optional[Path], csv_file: Optional[Path], target: Optional[str], space: Optional[str],
                    max_rows: Optional[int] = None, backend: Optional[str] = None):
    """(Dataset, SearchSpace) from --db/--target or --csv."""
    from mosc.search.predictor import read_db, read_hat_csv
    from mosc.space import SearchSpace

    if (db is None) == (csv_file is None):
        raise MoscError("give either --db PATH --target T or --csv FILE")
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
    odd = [f for f, a in zip(data.features, data.archs) if a is None and not (
        f[0] in sp.enc_embed and f[4] in sp.dec_embed and f[1] in sp.enc_layers and f[5] in sp.dec_layers)]
    if odd:
        raise MoscError(f"{len(odd)} feature-only row(s) of target {target!r} (e.g. HAT imports) do not fit space "
                        f"{sp.name!r} (embed dims / layer counts): pass the right --space")
    if max_rows:
        data = data.subset(range(min(max_rows, len(data))))
    return data, sp


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


@command(predictor_app, "fit")
def predictor_fit(
    out: Path = typer.Option(..., "--out", "-o", help="Predictor file to write (.json; tree models add <name>.xgb.json)."),
    db: Optional[Path] = typer.Option(None, "--db", help="Latency database to train on (with --target)."),
    csv_file: Optional[Path] = typer.Option(None, "--csv", help="A HAT latency CSV to train on (features only, 'wmt' space)."),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="Target whose DB rows to use (with --csv: the name recorded; default hat:<file stem>)."),
    space: Optional[str] = typer.Option(None, "--space", "-s", help=SPACE_HELP + " Default: tiny for --db, wmt for --csv."),
    model: str = typer.Option("lsq", help="lsq (robust non-negative fit of per-component costs; best on HAT's data), mlp (HAT's 10 -> 3x400 -> 1), gbt (xgboost) or hybrid (lsq + gbt on its residual)."),
    features: Optional[str] = typer.Option(None, help="hat, cost or layers (default: hat for mlp, layers when every row has an arch, else cost)."),
    seed: int = typer.Option(0, help="Seed of the 80/10/10 split and of the model."),
    refit: bool = typer.Option(True, "--refit/--no-refit", help="After scoring on the held-out split, refit on every row (the saved model)."),
    max_rows: Optional[int] = typer.Option(None, help="Use only the first N rows (quick runs)."),
    backend: Optional[str] = typer.Option(None, help="Use the DB rows of this backend (tvm, ort, torch, hat-pytorch); needed when the target has several."),
):
    """Fit a latency predictor for one target: held-out metrics (seeded 80/10/10 split) are
    printed and stored in the file with the target, space, features and training rows."""
    from mosc.search.predictor import fit, fit_eval

    data, sp = _predictor_data(db, csv_file, target, space, max_rows, backend)
    p, m = fit_eval(data, model=model, features=features, seed=seed, space=sp)
    if refit:
        split, metrics = p.meta["split"], p.meta["metrics"]
        p = fit(data, model=model, features=p.features, seed=seed, space=sp)
        p.meta.update(split=split, metrics=metrics, metrics_rows="held-out test split before refitting on all rows")
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
    backend: Optional[str] = typer.Option(None, help="Use the DB rows of this backend (tvm, ort, torch, hat-pytorch); needed when the target has several."),
):
    """Score a predictor on every row of a DB target or a HAT CSV (RMSE, MAPE, ±10%, Kendall tau)."""
    from mosc.search.predictor import Predictor, metrics

    p = Predictor.load(predictor)
    data, sp = _predictor_data(db, csv_file, target or (p.target if db is not None else None),
                               p.space if db is not None else None, max_rows, backend)
    p.check(data.target, sp.name)
    m = metrics(data.latency_ms, p.predict_features(data.features, data.archs))
    console.print(_metrics_table(f"{predictor} on {data.source}", {p.model: m}))
    if p.meta.get("source") == data.source:
        console.print(f"note: the predictor was fitted on these rows (in-sample); its held-out metrics: "
                      f"{json.dumps(p.meta.get('metrics'))}")


def _supernet_fitness(checkpoint: Path, val_sentences: int, max_tokens: int):
    """(space, arch -> validation loss of the supernet at arch on the first N validation sentences)."""
    from mosc.nn.evaluate import supernet_fitness
    from mosc.nn.train import load_run_corpus, load_trained

    model, tok, meta = load_trained(checkpoint)
    return model.space, supernet_fitness(model, load_run_corpus(meta, tok), val_sentences, max_tokens)


def _feedback(run, sp, score, pred, target, latency_ms, cfg, log, db, checkpoint, backend, rounds, top_k, out):
    """--rounds: search, measure the top K on the target (mosc.device.measure's Campaign), refit on the DB, repeat."""
    from mosc.jobs.artifacts import ArtifactCache, ModelSource
    from mosc.device.db import LatencyDB
    from mosc.search.feedback import feedback_search
    from mosc.device.measure import Campaign
    from mosc.rpc import Remote
    from mosc.search.predictor import AnalyticPrior, fit, read_db
    from mosc.search.evolve import Cached
    from mosc.compiler.targets import load_target

    if db is None:
        raise MoscError("--rounds needs --db (measured rows are added there and the predictor is refitted on them)")
    tg = load_target(target)
    remote = None
    if backend == "tvm" and (tg.is_cross or tg.device_type() != "cpu"):
        remote = Remote(tg.rpc.tracker_host, tg.rpc.tracker_port, tg.rpc.key)
    source = ModelSource(checkpoint=checkpoint, space=sp.name, seed=cfg.seed)
    cache = ArtifactCache(tg, source, log=log)
    score = Cached(score)  # one loss cache across rounds

    def measure(archs):
        with LatencyDB(db) as ldb:
            camp = Campaign(tg, backend, ldb, remote=remote, log=log, force=False)
            camp.probe()
            if camp.emulated:
                raise MoscError(f"the {target} device is emulated: its timings are not speeds, nothing to refit on")
            camp.run(archs, lambda a: cache.prepare(a, backend))
            rows = {r.arch.hash: r.latency_ms for r in ldb.rows(target, backend=backend) if r.arch is not None}
        return {a.hash: rows[a.hash] for a in archs if a.hash in rows}

    def refit():
        if isinstance(pred, AnalyticPrior):  # measurements have arrived: the prior gives way to a fit
            p = fit(read_db(db, target, sp.name, backend=backend), space=sp)
        else:
            p = fit(read_db(db, target, sp.name, backend=backend), model=pred.model, features=pred.features, space=sp)
        return p.latency

    return feedback_search(lambda lat: run(sp, score, lat, latency_ms, cfg, log=log), measure, refit, pred.latency,
                           rounds, top_k, latency_ms, log=log)


def _prior_for(target: str, sp, db):
    """The clearly labelled analytic prior that stands in for a predictor on rpi4 until real
    measurements exist (then: fit one with `mosc predictor fit`)."""
    from mosc.search.predictor import AnalyticPrior

    if target != "rpi4":
        raise MoscError(f"--predictor is required for {target!r} (fit one with: mosc predictor fit --db DB --target {target}); "
                        "only rpi4 has an analytic prior")
    if db is not None and Path(db).exists():
        from mosc.device.db import LatencyDB

        with LatencyDB(db) as ldb:
            n = len(ldb.rows(target))
        if n:
            raise MoscError(f"{db} holds {n} real {target} measurements: fit a predictor on them "
                            f"(mosc predictor fit --db {db} --target {target}) and pass --predictor")
    err_console.print("latency: ANALYTIC PRIOR (Cortex-A72 roofline: MACs / peak compute vs bytes / bandwidth), "
                      "not measured; Kendall tau 0.81 against HAT's Raspberry Pi 4 measurements", style="yellow")
    return AnalyticPrior(target, sp)


@command(app, "search")
def search_cmd(
    target: str = typer.Option(..., "--target", "-t", help="Target device (must match the predictor's target)."),
    predictor: Optional[Path] = typer.Option(None, "--predictor", "-p", help="Latency predictor file (mosc predictor fit) for --target. Omitted for rpi4 with no real measurements in --db: the analytic Cortex-A72 roofline prior."),
    latency_ms: Optional[float] = typer.Option(None, "--latency-ms", "-l", help="Latency constraint in ms (required without --pareto; optional cap with it)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Supernet run/checkpoint: fitness = its validation loss at each arch."),
    val_sentences: int = typer.Option(200, min=1, help="Validation sentences used for the fitness (first N)."),
    max_tokens: int = typer.Option(4096, min=1, help="Tokens per validation batch."),
    fitness: str = typer.Option("supernet", help="supernet (needs --checkpoint) or macs (a cheap proxy: -log MACs, for dry runs)."),
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
    out: Path = typer.Option(Path("search-out"), "--out", "-o", help="Output folder: best.json, pareto.csv, pareto.json, pareto.png."),
    rounds: int = typer.Option(1, min=1, help="Search -> measure the top archs -> refit the predictor on --db -> search again, R times (1: search only)."),
    measure_top: int = typer.Option(5, min=1, help="Archs measured per round (with --rounds > 1); the final pick is measured too."),
    backend: str = typer.Option("torch", help="Measuring backend for --rounds: torch or ort (this machine) or tvm (the target's artifact; over RPC for cross targets)."),
):
    """Hardware-aware evolutionary search (HAT defaults): candidates over --latency-ms are dropped,
    fitness = supernet validation loss (cached per arch), latency = the predictor. With --rounds R,
    the top archs are measured on the target, added to --db, the predictor refitted, and the search repeated."""
    from mosc.fileio import atomic_write_json, atomic_write_text
    from mosc.search.predictor import Predictor, total_macs
    from mosc.search.evolve import EvoConfig, evolve, front_csv, pareto_search, plot_front
    from mosc.space import SearchSpace

    if latency_ms is None and not pareto:
        raise MoscError("give --latency-ms L (or --pareto for the whole front)")
    if fitness == "supernet":
        if checkpoint is None:
            raise MoscError("--fitness supernet needs --checkpoint RUN (or use --fitness macs for a dry run)")
        sp, score = _supernet_fitness(checkpoint, val_sentences, max_tokens)
    elif fitness == "macs":
        import math

        sp = SearchSpace.load(space)
        score = lambda a: -math.log(total_macs(a.hat_features(), pred.shapes))  # noqa: E731
    else:
        raise MoscError(f"--fitness must be supernet or macs, got {fitness!r}")
    pred = Predictor.load(predictor, target=target, space=sp.name) if predictor else _prior_for(target, sp, db)
    cfg = EvoConfig(population=population, parents=parents, mutations=mutations, mutation_prob=mutation_prob,
                    crossovers=crossovers, generations=generations, seed=seed)
    log = lambda msg: err_console.print(msg, highlight=False, markup=False, soft_wrap=True)  # noqa: E731
    run = pareto_search if pareto else evolve
    loop = None
    if rounds > 1:
        loop = _feedback(run, sp, score, pred, target, latency_ms, cfg, log, db, checkpoint, backend, rounds,
                         measure_top, out)
        res = loop.result
    else:
        res = run(sp, score, pred.latency, latency_ms, cfg, log=log)
    out.mkdir(parents=True, exist_ok=True)
    info = {"target": target, "space": sp.name, "predictor": str(predictor), "fitness": fitness,
            "checkpoint": str(checkpoint) if checkpoint else None, "val_sentences": val_sentences,
            "latency_constraint_ms": latency_ms, "mode": "pareto" if pareto else "constrained",
            "config": cfg.__dict__, "evaluated": res.evaluated, "seconds": round(res.seconds, 2)}
    atomic_write_text(out / "best.json", res.best.arch.to_json(indent=2) + "\n")
    atomic_write_json(out / "search.json", {**info, "best": res.best.to_dict(), "history": res.history,
                                            **({"feedback": loop.to_dict()} if loop else {})})
    atomic_write_json(out / "pareto.json", {**info, "front": [c.to_dict() for c in res.front]})
    atomic_write_text(out / "pareto.csv", front_csv(res.front))
    measured = []
    if db is not None and Path(db).exists():
        from mosc.device.db import LatencyDB

        with LatencyDB(db) as ldb:
            rows = [r for r in ldb.rows(target) if r.arch is not None and sp.contains(r.arch)]
        measured = [(r.latency_ms, score(r.arch)) for r in rows]
    ylabel = "validation loss (nats/token)" if fitness == "supernet" else "-log(multiply-adds): stand-in fitness"
    plotted = plot_front(out / "pareto.png", res.front, measured, f"{target}: loss vs latency ({sp.name})", latency_ms, ylabel)
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
    console.print(f"[green]wrote[/] {out}/best.json, search.json, pareto.json, pareto.csv"
                  + (", pareto.png" if plotted else " (no plot: matplotlib is not installed)"))


# ---- mosc pipeline (issue 8) -----------------------------------------------------------


@command(app, "pipeline")
def pipeline_cmd(
    config: Optional[Path] = typer.Option(None, "--config", help="Pipeline TOML (examples/*.toml); omitted: the built-in default."),
    out: Path = typer.Option(Path("runs/pipeline"), "--out", "-o", help="Output folder (an existing run in OUT/run is resumed)."),
):
    """The main job end to end: train -> measure -> predictor -> search -> collapse/export ->
    compile -> translate -> check the front (BLEU, measured latency) -> summary (OUT/summary.json)."""
    from mosc.pipeline import PipelineConfig, run_pipeline

    cfg = PipelineConfig.load(config) if config is not None else PipelineConfig()
    run_pipeline(cfg, out, console)


def main():  # console-script entry point
    app()

"""SST-2 fine-tuning of collapsed BERT subnets: data, determinism, learning, distillation, CLI.

A tiny masked-LM supernet is pre-trained once (a few updates on a few hundred synthetic
lines, vocabulary 400); the "easy" task is sentences that hold "good" (1) or "bad" (0)
among filler words, written as SST-2-format files, so a head that learns nothing scores
about 50% and the accuracy check can fail.
"""

import dataclasses
import gzip
import json
import random

import pytest
import torch
import typer
from typer.testing import CliRunner

from mosc.cli import app
from mosc.errors import MoscError
from mosc.nn.bert import collapse_bert, load_bert_encoder
from mosc.nn.corpus import shared_data_dir
from mosc.nn.finetune import FinetuneConfig, evaluate_accuracy, finetune, load_sst2, read_labelled_tsv
from mosc.nn.train import TrainConfig, load_bert_trained, train

runner = CliRunner(env={"COLUMNS": "200"})
FILLER = "the a movie film story actor plot scene was is very quite rather really long short music script".split()


def easy_rows(n: int, seed: int) -> list[tuple[int, str]]:
    """(label, sentence): 4-10 filler words with "good" (1) or "bad" (0) at a random place."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = [rng.choice(FILLER) for _ in range(rng.randint(4, 10))]
        words.insert(rng.randint(0, len(words)), "good" if label else "bad")
        rows.append((label, " ".join(words)))
    return rows


def write_tsv(path, rows, header="label\tsentence"):
    text = header + "\n" + "".join(f"{y}\t{s}\n" for y, s in rows)
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """(run folder, supernet, tokenizer): 3 sandwich updates on 400 synthetic lines."""
    root = tmp_path_factory.mktemp("ft")
    (root / "corpus").mkdir()
    (root / "corpus" / "a.txt").write_text("\n".join(s for _, s in easy_rows(400, seed=1)) + "\n")
    cfg = TrainConfig(steps=3, max_tokens=512, max_len=32, lr=5e-4, warmup=1, label_smoothing=0.0, save_every=3)
    train(root / "run", corpus=str(root / "corpus"), space="bert-tiny", mode="neuron", cfg=cfg,
          model_overrides={"dropout": 0.1}, corpus_args={"vocab_size": 400}, progress=False)
    supernet, tok, _ = load_bert_trained(root / "run")
    return root / "run", supernet, tok


@pytest.fixture(scope="module")
def easy_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("easy")
    write_tsv(d / "train.tsv", easy_rows(400, seed=2))
    write_tsv(d / "dev.tsv.gz", easy_rows(200, seed=3), header="label\tcontent")
    return d


@pytest.fixture(scope="module")
def easy(pretrained, easy_dir):
    return load_sst2(pretrained[2], seq_len=32, folder=easy_dir)


FAST = dict(batch_size=16, lr=1e-3, seq_len=32, device="cpu")


@pytest.fixture(scope="module")
def teacher(pretrained, easy):
    """The largest subnet fine-tuned on the easy task, and its result."""
    supernet = pretrained[1]
    return finetune(collapse_bert(supernet, supernet.space.largest()), FinetuneConfig(steps=60, **FAST), easy)


# ---- data ------------------------------------------------------------------------------------


@pytest.mark.skipif(shared_data_dir() is None, reason="../shared/data is absent (a fresh clone): no real SST-2 here")
def test_real_sst2_loads_with_the_runs_tokenizer(pretrained):
    tok = pretrained[2]
    d = load_sst2(tok, seq_len=64)
    assert (len(d.train), len(d.dev)) == (67_349, 872)  # GLUE SST-2 train and dev (shared/data/README.md)
    first = [1] + tok.encode("hide new secretions from the parental units")[:63]
    assert d.train.tokens[0, : len(first)].tolist() == first and d.train.labels[0] == 0
    assert d.train.tokens[0, len(first):].eq(0).all()
    assert d.dev.tokens[:, 0].eq(1).all() and set(d.dev.labels.tolist()) == {0, 1}
    assert 0.45 < d.info["dev_positive"] < 0.55


@pytest.mark.parametrize("name,text,needle", [
    ("train.tsv", "sentence\tlabel\ngood\t1\n", "expected a header 'label<TAB>sentence'"),
    ("train.tsv", "label\tsentence\n1 a fine film\n", "line 2: expected '0 or 1<TAB>text'"),
    ("train.tsv", "label\tsentence\n1\tok\n2\tfine\n", "line 3: expected '0 or 1<TAB>text'"),
    ("train.tsv", "label\tsentence\n", "has a header but no labelled rows"),
    ("train.tsv.gz", "not gzip", "cannot read SST-2 file"),
])
def test_malformed_file_is_one_line(tmp_path, name, text, needle):
    (tmp_path / name).write_text(text)
    with pytest.raises(MoscError) as e:
        read_labelled_tsv(tmp_path / name)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_missing_file_is_one_line(tmp_path, pretrained):
    write_tsv(tmp_path / "train.tsv", easy_rows(10, 0))
    with pytest.raises(MoscError, match="SST-2 dev file missing") as e:
        load_sst2(pretrained[2], 32, tmp_path)
    assert "\n" not in str(e.value)


def test_long_sentences_are_cut_after_bos(pretrained, tmp_path):
    write_tsv(tmp_path / "train.tsv", [(1, " ".join(FILLER * 3))])
    write_tsv(tmp_path / "dev.tsv", [(0, "good")])
    d = load_sst2(pretrained[2], seq_len=8, folder=tmp_path)
    assert d.train.tokens.shape == (1, 8) and d.train.tokens[0, 0] == 1 and d.train.tokens[0].ne(0).all()
    assert d.info["train_cut"] == 1 and d.info["dev_cut"] == 0


# ---- fine-tuning -----------------------------------------------------------------------------


def test_finetune_is_deterministic_under_a_seed(pretrained, easy):
    supernet = pretrained[1]
    enc = collapse_bert(supernet, supernet.space.smallest())
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    torch.manual_seed(123)
    outer = torch.rand(3)  # the caller's RNG stream must not be disturbed
    torch.manual_seed(123)
    a, ra = finetune(enc, FinetuneConfig(steps=12, seed=7, **FAST), easy)
    assert torch.equal(torch.rand(3), outer)
    b, rb = finetune(enc, FinetuneConfig(steps=12, seed=7, **FAST), easy)
    c, rc = finetune(enc, FinetuneConfig(steps=12, seed=8, **FAST), easy)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and ra["history"] == rb["history"]
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert all(torch.equal(v, before[k]) for k, v in enc.state_dict().items())  # the input is not touched
    assert enc.classifier is None and a.classifier.out_features == 2


def test_finetune_learns_an_easy_task(teacher, easy):
    model, r = teacher
    assert r["sst2_dev_acc"] >= 0.85, r  # chance is ~0.5: "good" vs "bad" among filler words
    assert r["sst2_dev_acc"] == evaluate_accuracy(model, easy.dev)
    assert r["history"][-1]["loss"] < r["history"][0]["loss"] and not r["distilled"]


def test_distillation_from_the_largest_runs(pretrained, easy, teacher):
    supernet = pretrained[1]
    small = collapse_bert(supernet, supernet.space.smallest())
    cfg = FinetuneConfig(steps=20, **FAST)
    plain, rp = finetune(small, cfg, easy)
    student, rd = finetune(small, cfg, easy, teacher=teacher[0])
    assert rd["distilled"] and rd["distill_weight"] == 0.5 and not rp["distilled"]
    assert rd["history"] != rp["history"]  # the KL term changes the updates
    # distill = 1: only the teacher's logits teach; the student moves towards them
    mimic, _ = finetune(small, dataclasses.replace(cfg, distill=1.0, steps=40), easy, teacher=teacher[0])
    with torch.no_grad():
        t = torch.softmax(teacher[0].classify(easy.dev.tokens), -1)
        gap = lambda m: (torch.softmax(m.eval().classify(easy.dev.tokens), -1) - t).abs().mean()  # noqa: E731
        assert gap(mimic) < gap(small.with_classifier(2))
    with pytest.raises(MoscError, match="the teacher must be a fine-tuned encoder"):
        finetune(small, cfg, easy, teacher=small)


def test_bad_settings_are_one_line():
    with pytest.raises(MoscError, match="steps must be a whole number >= 1, got 0"):
        FinetuneConfig(steps=0)
    with pytest.raises(MoscError, match="distill must be a finite number >= 0 and <= 1, got 1.5"):
        FinetuneConfig(distill=1.5)
    with pytest.raises(MoscError, match="lr must be a finite number > 0"):
        FinetuneConfig(lr=0.0)


# ---- CLI ------------------------------------------------------------------------------------


def one_line_error(result, needle: str):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert needle in lines[0], lines[0]


def test_cli_defaults_are_the_configs():
    cmd = typer.main.get_command(app).commands["finetune"]
    defaults = {p.name: p.default for p in cmd.params}
    cfg = FinetuneConfig()
    for name in ("steps", "batch_size", "lr", "seq_len", "distill", "seed", "device"):
        assert defaults[name] == getattr(cfg, name), name


def test_cli_end_to_end(pretrained, easy_dir, tmp_path):
    run, supernet, _ = pretrained
    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps({"hidden": [64, 64, 32, 32]}))
    common = ["--data", str(easy_dir), "--steps", "60", "--lr", "1e-3", "--batch-size", "16", "--seq-len", "32",
              "--device", "cpu", "--no-progress"]
    r = runner.invoke(app, ["finetune", "--checkpoint", str(run), "--arch", str(arch), "--out", str(tmp_path / "ft"), *common])
    assert r.exit_code == 0, r.output
    assert "dev accuracy" in r.output and "[64, 64, 32, 32]" in r.output
    enc, meta = load_bert_encoder(tmp_path / "ft")
    assert enc.arch.hidden == (64, 64, 32, 32) and meta["sst2_dev_acc"] >= 0.85
    assert meta["finetune"]["config"]["steps"] == 60 and "tokenizer" in meta
    easy = load_sst2(pretrained[2], 32, easy_dir)
    assert evaluate_accuracy(enc, easy.dev) == meta["sst2_dev_acc"]  # what was saved is what was scored
    # a collapsed encoder (mosc collapse keeps the run's tokenizer), distilled from the first
    r = runner.invoke(app, ["collapse", "--checkpoint", str(run), "--out", str(tmp_path / "small")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["finetune", "--encoder", str(tmp_path / "small"), "--teacher", str(tmp_path / "ft"),
                            "--out", str(tmp_path / "ft2"), "--data", str(easy_dir), "--steps", "10", "--no-progress"])
    assert r.exit_code == 0, r.output
    _, meta2 = load_bert_encoder(tmp_path / "ft2")
    assert meta2["finetune"]["distilled"] and meta2["finetune"]["teacher"] == str(tmp_path / "ft")


def test_cli_bad_input_is_one_line(pretrained, easy_dir, tmp_path):
    run = str(pretrained[0])
    out = ["--out", str(tmp_path / "o"), "--no-progress"]
    one_line_error(runner.invoke(app, ["finetune", *out]), "give exactly one of --checkpoint")
    one_line_error(runner.invoke(app, ["finetune", "--checkpoint", run, "--encoder", run, *out]), "give exactly one of")
    one_line_error(runner.invoke(app, ["finetune", "--checkpoint", run, "--data", str(tmp_path), *out]),
                   "SST-2 train file missing")
    one_line_error(runner.invoke(app, ["finetune", "--checkpoint", run, "--steps", "0", *out]), "steps must be")
    bad = tmp_path / "bad"
    bad.mkdir()
    write_tsv(bad / "train.tsv", [(3, "a film")])
    write_tsv(bad / "dev.tsv", [(1, "good")])
    one_line_error(runner.invoke(app, ["finetune", "--checkpoint", run, "--data", str(bad), *out]), "line 2")
    arch = tmp_path / "a.json"
    arch.write_text(json.dumps({"hidden": [48, 64, 64, 64]}))
    one_line_error(runner.invoke(app, ["finetune", "--checkpoint", run, "--arch", str(arch), *out]), "hidden[0] = 48")
    one_line_error(runner.invoke(app, ["finetune", "--checkpoint", run, "--teacher", run, "--data", str(easy_dir), *out]),
                   "holds a 'mosc-bert-supernet', expected a 'mosc-bert-encoder'")
    assert not (tmp_path / "o").exists()

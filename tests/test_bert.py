"""The encoder-only (BERT) half: spaces, the MoS supernet and its exact collapse, masked-LM
data, pre-training (sandwich, resume bit for bit, standalone), the search under a
parameter budget, and the CLI on all of it. Real torch, real tokenizer, tiny sizes."""

import json
import random
import shutil

import pytest
import torch
from typer.testing import CliRunner

from mosc.bert_space import BertArch, BertSpace, load_space, param_count
from mosc.cli import app
from mosc.contract import BOS_ID, PAD_ID
from mosc.errors import MoscError
from mosc.nn.bert import (BertConfig, BertSupernet, collapse_bert, count_parameters, load_bert_encoder,
                          load_bert_supernet, save_bert_encoder, save_bert_supernet)
from mosc.nn.mlm import MaskedBatchIterator, load_text_corpus, mask_blocks, mlm_loss, valid_batches
from mosc.nn.train import TrainConfig, load_bert_trained, train
from mosc.space import SearchSpace

runner = CliRunner(env={"COLUMNS": "200"})
SPACE = BertSpace.load("bert-tiny")
WORDS = ("the cat dog bird sat ran on a mat log tree big small red blue green happy sad quick slow very "
         "and then it was not good bad film movie story").split()


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    """Two .txt files of ~400 random short sentences, one .gz-less folder (the corpus)."""
    d = tmp_path_factory.mktemp("text")
    rng = random.Random(0)
    for name in ("a.txt", "b.txt"):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) + " ." for _ in range(200)]
        (d / name).write_text("\n".join(lines) + "\n\n")
    (d / "ignored.md").write_text("not text of the corpus")
    return d


def tiny_cfg(**kw):
    base = dict(steps=6, max_tokens=256, max_len=16, lr=2e-3, warmup=2, save_every=3, log_every=3, label_smoothing=0.0)
    return TrainConfig(**{**base, **kw})


# ---- spaces ---------------------------------------------------------------------------------


def test_builtin_bert_spaces():
    bert = BertSpace.load("bert")
    assert (bert.width, bert.layers, bert.heads, bert.ffn_dim) == (768, 12, 12, 3072)
    assert bert.hidden == (120, 240, 360, 480, 540, 600, 768) and bert.size() == 7**12
    assert SPACE.size() == 256
    assert isinstance(load_space("bert-tiny"), BertSpace) and isinstance(load_space("tiny"), SearchSpace)
    with pytest.raises(MoscError, match="encoder-only"):
        SearchSpace.load("bert-tiny")
    with pytest.raises(MoscError, match="translation space"):
        BertSpace.load("tiny")


def test_arch_validation_and_evolution_ops():
    rng = random.Random(0)
    for _ in range(50):
        a, b = SPACE.sample(rng), SPACE.sample(rng)
        for c in (a, SPACE.mutate(a, rng, 0.5), SPACE.crossover(a, b, rng)):
            assert SPACE.validate(c) is c
    with pytest.raises(MoscError, match=r"hidden\[2\] = 48"):
        SPACE.validate(BertArch((32, 64, 48, 128)))
    with pytest.raises(MoscError, match="3 layers"):
        SPACE.validate(BertArch((32, 64, 96)))
    with pytest.raises(MoscError, match="exactly the field"):
        BertArch.from_dict({"hidden": [32] * 4, "extra": 1})
    a = BertArch((32, 64, 96, 128))
    assert BertArch.from_json(a.to_json()) == a and a.hash == BertArch.from_dict(a.to_dict()).hash


def test_bad_space_files_are_one_line(tmp_path):
    cases = {
        "heads.toml": "[bert]\nwidth = 64\nlayers = 2\nhidden = [30, 64]\nheads = 4\nffn_dim = 128\n",
        "nohidden.toml": "[bert]\nwidth = 64\nlayers = 2\nheads = 4\nffn_dim = 128\n",
        "layers.toml": "[bert]\nwidth = 64\nlayers = 0\nhidden = [32]\nheads = 4\nffn_dim = 128\n",
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(MoscError) as e:
            load_space(tmp_path / name)
        assert "\n" not in str(e.value) and name in str(e.value)


# ---- model and collapse ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["shared", "layer", "neuron"])
def test_collapse_is_exact_and_counted(mode):
    torch.manual_seed(0)
    model = BertSupernet(BertConfig(space=SPACE.to_dict(), vocab_size=300, ffn_mode=mode))
    # Make the routers matter: alphas away from uniform, so a wrong mix would show.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    rng = random.Random(1)
    tokens = torch.randint(4, 300, (3, 17))
    tokens[0, 11:] = PAD_ID
    for arch in [SPACE.largest(), SPACE.smallest(), SPACE.sample(rng), SPACE.sample(rng)]:
        enc = collapse_bert(model, arch)
        assert (model(tokens, arch) - enc(tokens)).abs().max().item() <= 1e-5
        assert count_parameters(enc) == param_count(arch, SPACE, 300)
        assert count_parameters(enc.with_classifier(2)) == param_count(arch, SPACE, 300, n_classes=2)
    # The subnet of a smaller arch really is smaller, and different archs compute different functions.
    small, large = collapse_bert(model, SPACE.smallest()), collapse_bert(model, SPACE.largest())
    assert count_parameters(small) < count_parameters(large)
    assert not torch.allclose(small(tokens), large(tokens))


def test_files_roundtrip_and_tamper(tmp_path):
    model = BertSupernet(BertConfig(space=SPACE.to_dict(), vocab_size=300, ffn_mode="neuron")).eval()
    save_bert_supernet(model, tmp_path / "sn")
    back, _ = load_bert_supernet(tmp_path / "sn")
    arch = SPACE.sample(random.Random(3))
    tokens = torch.randint(4, 300, (2, 9))
    assert torch.equal(back(tokens, arch), model(tokens, arch))
    enc = collapse_bert(model, arch).with_classifier(2)
    save_bert_encoder(enc, tmp_path / "enc")
    enc2, meta = load_bert_encoder(tmp_path / "enc")
    assert torch.equal(enc2.eval().classify(tokens), enc.eval().classify(tokens)) and meta["param_count"] == count_parameters(enc)
    w = tmp_path / "enc" / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(MoscError, match="sha256|corrupt"):
        load_bert_encoder(tmp_path / "enc")


# ---- masked-LM data ---------------------------------------------------------------------------


def test_corpus_blocks_and_masking(text_dir):
    d = load_text_corpus(str(text_dir), seq_len=16, vocab_size=400)
    assert d.train.shape[1] == 16 and (d.train[:, 0] == BOS_ID).all() and len(d.valid) > 0
    assert d.info["train_lines"] + d.info["valid_lines"] == 400  # blank lines and the .md file are not text
    mask = d.vocab_size - 1
    b = mask_blocks(d.train[:64], mask, torch.Generator().manual_seed(0))
    picked = b.labels != PAD_ID
    assert not picked[:, 0].any() and not picked[d.train[:64] == PAD_ID].any()
    frac = picked.sum().item() / (d.train[:64, 1:] != PAD_ID).sum().item()
    assert 0.10 < frac < 0.20  # BERT's 15%
    assert torch.equal(b.labels[picked], d.train[:64][picked])
    assert (b.tokens[picked] == mask).float().mean().item() > 0.6  # ~80% become [MASK]
    assert torch.equal(b.tokens[~picked], d.train[:64][~picked])
    # The same (seed, epoch, batch) gives the same masks: what bit-for-bit resume relies on.
    it1, it2 = MaskedBatchIterator(d.train, 8, mask, seed=3), MaskedBatchIterator(d.train, 8, mask, seed=3)
    next(iter(it1))
    it2.load_state_dict(it1.state_dict())
    assert torch.equal(next(iter(it1)).tokens, next(iter(it2)).tokens)
    with pytest.raises(MoscError, match="cannot resume batches: n_tokens was"):
        MaskedBatchIterator(d.train[:, :8], 8, mask, seed=3).load_state_dict(it1.state_dict())


def test_bad_corpora_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MoscError, match="no .txt"):
        load_text_corpus(str(tmp_path / "empty"))
    (tmp_path / "few.txt").write_text("one line\n")
    with pytest.raises(MoscError, match="at least"):
        load_text_corpus(str(tmp_path / "few.txt"))
    (tmp_path / "latin.txt").write_bytes("caf\xe9\n".encode("latin-1") * 50)
    with pytest.raises(MoscError, match="not UTF-8"):
        load_text_corpus(str(tmp_path / "latin.txt"))
    with pytest.raises(MoscError, match="neither"):
        load_text_corpus(str(tmp_path / "nowhere"))


# ---- pre-training -------------------------------------------------------------------------------


def test_pretraining_learns_and_resumes_bit_for_bit(text_dir, tmp_path):
    args = dict(corpus=str(text_dir), space="bert-tiny", mode="layer", corpus_args={"vocab_size": 400}, progress=False)
    whole = train(tmp_path / "a", cfg=tiny_cfg(steps=30, save_every=10, log_every=5), **args)
    losses = [h["loss"] for h in whole.history]
    assert losses[-1] < losses[0] - 0.5, losses  # it learns (unigram statistics at least)
    # A run cut short after its step-10 checkpoint (later checkpoints lost), then resumed.
    cut = train(tmp_path / "b", cfg=tiny_cfg(steps=30, save_every=10, log_every=5, keep=5), **args)
    for late in ("step_0000020", "step_0000030"):
        shutil.rmtree(cut.run / late)
    (cut.run / "latest").write_text("step_0000010\n")
    train(tmp_path / "b", cfg=tiny_cfg(steps=30, save_every=10, log_every=5), resume=True, progress=False)
    a, tok, meta = load_bert_trained(tmp_path / "a")
    b, _, _ = load_bert_trained(tmp_path / "b")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert meta["corpus"] == str(text_dir) and a.cfg.vocab_size == tok.vocab_size + 1


def test_standalone_run_trains_only_its_arch(text_dir, tmp_path):
    arch = BertArch((64, 32, 96, 32))
    r = train(tmp_path / "s", corpus=str(text_dir), space="bert-tiny", mode="shared", arch=arch, cfg=tiny_cfg(steps=2),
              corpus_args={"vocab_size": 400}, progress=False)
    model, _, meta = load_bert_trained(r.run)
    assert meta["train"]["fixed_arch"] == arch.to_dict()
    # Rows of layer 0's down projection past hidden 64 were never used: still their init.
    torch.manual_seed(0)  # the run's init: seed 0
    fresh = BertSupernet(BertConfig(space=SPACE.to_dict(), vocab_size=model.cfg.vocab_size, ffn_mode="shared"))
    assert torch.equal(model.down[0].weight[64:], fresh.down[0].weight[64:])
    assert not torch.equal(model.down[0].weight[:64], fresh.down[0].weight[:64])
    with pytest.raises(MoscError, match="outside space"):
        train(tmp_path / "t", corpus=str(text_dir), space="bert-tiny", arch=BertArch((48,) * 4), cfg=tiny_cfg(),
              progress=False)


def test_mlm_loss_of_supernet_equals_collapsed(text_dir, tmp_path):
    r = train(tmp_path / "n", corpus=str(text_dir), space="bert-tiny", mode="neuron", cfg=tiny_cfg(steps=3),
              corpus_args={"vocab_size": 400}, progress=False)
    model, tok, meta = load_bert_trained(r.run)
    d = load_text_corpus(str(text_dir), seq_len=16, tokenizer=tok)
    batches = valid_batches(d.valid, d.vocab_size - 1)
    arch = SPACE.sample(random.Random(5))
    enc = collapse_bert(model, arch)
    a = mlm_loss(lambda x: model(x, arch), model.mlm_logits, batches)
    b = mlm_loss(enc, enc.mlm_logits, batches)
    assert abs(a - b) < 1e-5 and 0 < a < 10


# ---- CLI ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_run(text_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    r = runner.invoke(app, ["train", "-o", str(run), "--space", "bert-tiny", "--corpus", str(text_dir), "--vocab-size", "400",
                            "--steps", "4", "--max-tokens", "256", "--max-len", "16", "--save-every", "2", "--mode", "layer"])
    assert r.exit_code == 0, r.output
    assert "predicted tokens/s" in r.output
    return run


def test_cli_collapse_evaluate_search(cli_run, tmp_path):
    arch = tmp_path / "a.json"
    arch.write_text(BertArch((64, 64, 32, 128)).to_json())
    r = runner.invoke(app, ["arch", "validate", str(arch), "--space", "bert-tiny"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["collapse", "-c", str(cli_run), "-a", str(arch), "-o", str(tmp_path / "enc")])
    assert r.exit_code == 0 and "(equal)" in r.output, r.output
    r = runner.invoke(app, ["evaluate", "-c", str(cli_run), "-a", str(arch), "-o", str(tmp_path / "e1.json")])
    assert r.exit_code == 0 and "masked-LM loss" in r.output, r.output
    r = runner.invoke(app, ["evaluate", "-c", str(cli_run), "--subnet", str(tmp_path / "enc"), "-o", str(tmp_path / "e2.json")])
    assert r.exit_code == 0, r.output
    e1, e2 = (json.loads((tmp_path / f).read_text()) for f in ("e1.json", "e2.json"))
    assert abs(e1["mlm_valid_loss"] - e2["mlm_valid_loss"]) < 1e-5  # inherited == collapsed
    budget = param_count(BertArch((64,) * 4), SPACE, load_bert_trained(cli_run)[0].cfg.vocab_size)
    r = runner.invoke(app, ["search", "-c", str(cli_run), "--max-params", str(budget), "--population", "12", "--parents", "4",
                            "--mutations", "8", "--crossovers", "8", "--generations", "3", "-o", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "s" / "search.json").read_text())
    assert s["best"]["params"] <= budget and s["max_params"] == budget
    best = BertArch.load(tmp_path / "s" / "best.json")
    assert SPACE.contains(best) and best.to_dict() == s["best"]["arch"]
    assert all(f["params"] <= budget for f in s["front"])


@pytest.mark.parametrize("args, msg", [
    (["search", "--max-params", "10"], "smallest has"),
    (["search"], "--max-params"),
    (["search", "--max-params", "1e6", "-t", "host", "-l", "5"], "not supported"),
    (["evaluate", "-a", "{arch}"], "outside space"),
])
def test_cli_bad_inputs_are_one_line(cli_run, tmp_path, args, msg):
    arch = tmp_path / "bad.json"
    arch.write_text(json.dumps({"hidden": [48] * 4}))
    r = runner.invoke(app, [a.replace("{arch}", str(arch)) for a in args] + ["-c", str(cli_run)])
    assert r.exit_code == 2 and msg in r.output, r.output
    assert r.output.count("error:") == 1 and "Traceback" not in r.output


def test_tune_takes_a_bert_run(cli_run, tmp_path):
    """`mosc tune --checkpoint` reads a BERT run's space and shape (width 128, positions 512, 2 classes)."""
    r = runner.invoke(app, ["tune", "-t", "host", "--checkpoint", str(cli_run), "--tune-db", str(tmp_path / "db"),
                            "--status"])
    assert r.exit_code == 2 and "'bert-tiny' has not been tuned" in r.output and "-w128-p512-c2-" in r.output, r.output
    assert r.output.count("error:") == 1 and "Traceback" not in r.output


# ---- the BERT pipeline ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sst2_dir(tmp_path_factory):
    """A small SST-2-shaped folder: 'good' sentences are positive, 'bad' ones negative."""
    d = tmp_path_factory.mktemp("sst2")
    rng = random.Random(1)

    def rows(n):
        out = []
        for _ in range(n):
            y = rng.randint(0, 1)
            words = [rng.choice(WORDS) for _ in range(rng.randint(3, 8))] + ["good" if y else "bad"]
            rng.shuffle(words)
            out.append(f"{y}\t{' '.join(words)}")
        return out

    (d / "train.tsv").write_text("label\tsentence\n" + "\n".join(rows(300)) + "\n")
    (d / "dev.tsv").write_text("label\tcontent\n" + "\n".join(rows(60)) + "\n")
    return d


def test_bert_pipeline_end_to_end(text_dir, sst2_dir, tmp_path):
    cfg = tmp_path / "bert.toml"
    cfg.write_text(f'corpus = "{text_dir}"\nspace = "bert-tiny"\nvocab_size = 400\nseq_len = 16\ntrain_steps = 4\n'
                   f'train_max_tokens = 256\ntrain_warmup = 1\npopulation = 4\nparents = 2\nmutations = 2\ncrossovers = 2\n'
                   f'generations = 2\nsst2_dir = "{sst2_dir}"\nfinetune_steps = 60\nfinetune_batch = 16\n'
                   f'cross_target = ""\nlatency_runs = 3\ntune_trials = 0\n')
    out = tmp_path / "out"
    r = runner.invoke(app, ["pipeline", "--config", str(cfg), "-o", str(out)])
    assert r.exit_code == 0, r.output
    s = json.loads((out / "summary.json").read_text())
    assert set(s["stage_seconds"]) == {"train", "search", "finetune", "export", "tune", "compile", "check"}
    best = s["search"]["best"]
    assert best["params"] <= s["search"]["max_params"] < s["search"]["largest"]["params"]
    assert SPACE.contains(BertArch.from_dict(best["arch"]))
    ck = s["check"]
    # The same sentences right (float32 vs float64 means differ past 1e-7, counts cannot).
    assert ck["sst2_dev_acc_tvm"] == pytest.approx(ck["sst2_dev_acc_torch"], abs=1e-6)
    assert ck["sst2_dev_acc_torch"] == pytest.approx(s["finetune"]["sst2_dev_acc"], abs=1e-6)
    assert ck["sst2_dev_acc_tvm"] >= 0.8  # the easy task is learnt, and the compiled artifact keeps it
    assert all(ck["latency_ms"][k] > 0 for k in ("tvm", "ort", "torch"))
    assert (out / "artifact-host" / "manifest.json").is_file() and (out / "onnx" / "export.json").is_file()
    # Run again: the finished pre-training run is reused, not retrained.
    r = runner.invoke(app, ["pipeline", "--config", str(cfg), "-o", str(out)])
    assert r.exit_code == 0 and "reusing it" in r.output, r.output


def test_bert_pipeline_bad_config_is_one_line(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('space = "bert-tiny"\nmeasure_archs = 5\n')  # a translation key
    r = runner.invoke(app, ["pipeline", "--config", str(cfg), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and r.output.count("error:") == 1 and "measure_archs" in r.output, r.output
    cfg.write_text('space = "bert-tiny"\nseq_len = 2\n')
    r = runner.invoke(app, ["pipeline", "--config", str(cfg), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "seq_len" in r.output, r.output


def test_pretraining_under_torchrun_two_processes(text_dir, tmp_path):
    """Data-parallel masked-LM pre-training with 2 processes (gloo): both ranks end with the
    same weights (checked inside train), rank 0 writes one checkpoint of a 2-rank run."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    bin_dir = Path(sys.executable).parent
    run = tmp_path / "ddp"
    r = subprocess.run(
        [str(bin_dir / "torchrun"), "--nproc_per_node", "2", "--master_port", "29527", str(bin_dir / "mosc"), "train",
         "-o", str(run), "--space", "bert-tiny", "--corpus", str(text_dir), "--vocab-size", "400", "--max-len", "16",
         "--max-tokens", "128", "--steps", "3", "--save-every", "3", "--warmup", "1"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"},
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (run / "latest").read_text().strip() == "step_0000003"
    _, _, meta = load_bert_trained(run)
    assert meta["train"]["batches"]["world_size"] == 2

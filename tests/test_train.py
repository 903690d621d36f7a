"""Training: the sandwich rule, bit-for-bit resume, standalone training, interruption,
data-parallel training under torchrun (2 processes, gloo), and evaluation parity."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mosc.nn.corpus import load_corpus
from mosc.nn.synthetic import SyntheticConfig
from mosc.errors import MoscError
from mosc.nn.evaluate import CachedDecoder, FullDecoder, beam_search, evaluate, logits_fn
from mosc.fileio import load_tensors
from mosc.space import SearchSpace
from mosc.nn.subnet import collapse
from mosc.nn.train import TrainConfig, archs_for_update, load_trained, train

BIN = Path(sys.executable).parent
SMALL = SyntheticConfig(n_train=300, n_val=30, n_test=30)


@pytest.fixture(scope="module")
def data():
    return load_corpus("synthetic", synthetic=SMALL, vocab_size=400)


def cfg(**kw):
    base = dict(steps=6, max_tokens=512, warmup=2, save_every=3, log_every=2, max_len=64)
    return TrainConfig(**{**base, **kw})


def weights(run: Path) -> dict:
    return load_tensors(run / (run / "latest").read_text().strip() / "model.safetensors")


def test_sandwich_order():
    import random

    s = SearchSpace.load("tiny")
    archs = archs_for_update(s, random.Random(0), 2, None)
    assert archs[0] == s.largest() and archs[1] == s.smallest() and len(archs) == 4


def test_resume_is_bit_for_bit(tmp_path, data):
    full = train(tmp_path / "full", data=data, cfg=cfg(), mode="neuron", progress=False)
    assert full.steps == 6 and (tmp_path / "full" / "step_0000003").exists()
    # Same run stopped at step 3: copy its step-3 checkpoint alone and resume to 6.
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(tmp_path / "full" / "step_0000003", part / "step_0000003")
    (part / "latest").write_text("step_0000003\n")
    resumed = train(part, data=data, cfg=cfg(), resume=True, progress=False)
    assert resumed.steps == 6
    a, b = weights(tmp_path / "full"), weights(part)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and a run that did not resume from the same point differs (the test can fail)
    train(tmp_path / "other", data=data, cfg=cfg(seed=1), progress=False)
    c = weights(tmp_path / "other")
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_existing_run_needs_resume(tmp_path, data):
    train(tmp_path / "r", data=data, cfg=cfg(steps=3), progress=False)
    with pytest.raises(MoscError, match="pass --resume"):
        train(tmp_path / "r", data=data, cfg=cfg(steps=3), progress=False)
    with pytest.raises(MoscError, match="nothing to resume"):
        train(tmp_path / "empty", data=data, cfg=cfg(), resume=True, progress=False)


def test_loss_decreases(tmp_path, data):
    r = train(tmp_path / "r", data=data, cfg=cfg(steps=20, lr=3e-3, warmup=4, save_every=20, log_every=5), mode="layer", progress=False)
    assert r.history[-1]["loss"] < r.history[0]["loss"] - 0.5


def test_standalone_trains_only_its_slices(tmp_path, data):
    s = SearchSpace.load("tiny")
    arch = s.smallest()  # 1 encoder layer, 1 decoder layer, embed 64
    r = train(tmp_path / "solo", data=data, cfg=cfg(steps=3, save_every=3), mode="shared", arch=arch, progress=False)
    model, tok, meta = load_trained(r.run)
    assert meta["train"]["fixed_arch"] == arch.to_dict()
    torch.manual_seed(0)  # the same init the run started from
    from mosc.nn.model import Supernet, SupernetConfig

    init = Supernet(SupernetConfig(**{**meta["config"]}))
    # Layers the arch does not use never change; the used slice does.
    assert torch.equal(model.encoder[1].ffn.w1, init.encoder[1].ffn.w1)
    assert torch.equal(model.decoder[2].self_attn.q.weight, init.decoder[2].self_attn.q.weight)
    assert not torch.equal(model.encoder[0].ffn.w1[0, :128, :64], init.encoder[0].ffn.w1[0, :128, :64])
    assert torch.equal(model.encoder[0].ffn.w1[0, 128:, :], init.encoder[0].ffn.w1[0, 128:, :])


def test_evaluation_parity_supernet_vs_collapsed(tmp_path, data):
    r = train(tmp_path / "r", data=data, cfg=cfg(steps=15, lr=3e-3, warmup=5, save_every=15), mode="neuron", progress=False)
    model, _, _ = load_trained(r.run)
    arch = model.space.sample(__import__("random").Random(1))
    sub = collapse(model, arch)
    e_super = evaluate(model, data, arch)
    e_sub = evaluate(sub, data)
    assert abs(e_super.loss - e_sub.loss) < 1e-5
    assert e_super.hypotheses == e_sub.hypotheses and e_super.bleu == e_sub.bleu
    # beam 1 is greedy; a wider beam never scores worse on the model's own objective
    src = torch.tensor([data.val.src[0], data.val.src[1][: len(data.val.src[0])]])
    g = beam_search(CachedDecoder(sub, 30), src, beam=1, max_len=30)
    assert g == sub.translate(src, 1, 2, 30)
    assert beam_search(FullDecoder(logits_fn(model, arch)), src, beam=3, max_len=30) == beam_search(CachedDecoder(sub, 30), src, beam=3, max_len=30)


def test_interrupt_saves_and_resume_finishes(tmp_path):
    """SIGINT during `mosc train` keeps a checkpoint at the step reached; --resume finishes the run."""
    run = tmp_path / "r"
    args = [str(BIN / "mosc"), "train", "-o", str(run), "--max-train-pairs", "300", "--max-tokens", "512",
            "--steps", "100000", "--save-every", "100000", "--log-every", "2", "--warmup", "2"]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "200"})
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "log.jsonl").exists():
        time.sleep(0.5)
    assert (run / "log.jsonl").exists(), p.stdout.read().decode() if p.poll() is not None else "no log in time"
    p.send_signal(signal.SIGINT)
    p.wait(timeout=60)
    step = int((run / "latest").read_text().strip().split("_")[1])
    assert step >= 2  # log_every is 2: at least that many updates were kept
    r = subprocess.run(args[:-8] + ["--steps", str(step + 2), "--resume"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (run / "latest").read_text().strip() == f"step_{step + 2:07d}"


def test_torchrun_two_processes(tmp_path):
    """Data-parallel training with 2 processes (gloo): both ranks finish with identical
    weights (checked inside train) and rank 0 writes one checkpoint."""
    run = tmp_path / "ddp"
    r = subprocess.run(
        [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29517", str(BIN / "mosc"), "train",
         "-o", str(run), "--max-train-pairs", "300", "--max-tokens", "512", "--steps", "4", "--save-every", "4",
         "--warmup", "2"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"},
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (run / "latest").read_text().strip() == "step_0000004"
    model, tok, meta = load_trained(run)
    assert meta["train"]["batches"]["world_size"] == 2


def test_cli_train_collapse_evaluate(tmp_path):
    """`mosc train` -> `mosc collapse` on the run folder -> `mosc evaluate` of supernet and subnet agree."""
    import json

    from typer.testing import CliRunner

    from mosc.cli import app

    runner = CliRunner(env={"COLUMNS": "200"})
    run = tmp_path / "run"
    r = runner.invoke(app, ["train", "-o", str(run), "--max-train-pairs", "200", "--max-tokens", "512", "--steps", "3",
                            "--warmup", "1", "--mode", "layer"])
    assert r.exit_code == 0, r.output
    arch = tmp_path / "a.json"
    arch.write_text(SearchSpace.load("tiny").smallest().to_json())
    r = runner.invoke(app, ["collapse", "-c", str(run), "-a", str(arch), "-o", str(tmp_path / "sub")])
    assert r.exit_code == 0 and "(equal)" in r.output, r.output
    outs = []
    for extra in (["--arch", str(arch)], ["--subnet", str(tmp_path / "sub")]):
        out = tmp_path / f"eval{len(outs)}.json"
        r = runner.invoke(app, ["evaluate", "-c", str(run), "--max-sentences", "8", "-o", str(out), *extra])
        assert r.exit_code == 0, r.output
        assert "BLEU (greedy)" in r.output
        outs.append(json.loads(out.read_text()))
    assert outs[0]["loss"] == pytest.approx(outs[1]["loss"], abs=1e-5)
    assert outs[0]["hypotheses"] == outs[1]["hypotheses"]


def test_distillation_runs_and_differs(tmp_path, data):
    """In-place distillation from the largest arch changes the updates of the others."""
    plain = train(tmp_path / "plain", data=data, cfg=cfg(steps=2, save_every=2), progress=False)
    dist = train(tmp_path / "dist", data=data, cfg=cfg(steps=2, save_every=2, distill=0.5), progress=False)
    assert all(map(lambda r: r["loss"] == r["loss"], dist.history))  # finite, not NaN
    a, b = weights(plain.run), weights(dist.run)
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_mid_update_then_resume_is_bit_for_bit(tmp_path, data, monkeypatch, capsys):
    """Ctrl-C arriving in the middle of update 4 (after its batch and archs were drawn): the
    update finishes, is saved, and --resume gives exactly the weights of an uninterrupted run."""
    import os
    import signal

    import mosc.nn.train as T

    full = train(tmp_path / "full", data=data, cfg=cfg(), progress=False)
    real, calls = T.update_loss, {"n": 0}

    def interrupted(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 4:
            os.kill(os.getpid(), signal.SIGINT)  # delivered now, while this update is running
        return real(*a, **kw)

    monkeypatch.setattr(T, "update_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "part", data=data, cfg=cfg(), progress=False)
    assert (tmp_path / "part" / "latest").read_text().strip() == "step_0000004"
    assert "interrupted at step 4" in capsys.readouterr().err
    monkeypatch.setattr(T, "update_loss", real)
    resumed = train(tmp_path / "part", data=data, cfg=cfg(), resume=True, progress=False)
    assert resumed.steps == full.steps == 6 and resumed.start_step == 4
    a, b = weights(tmp_path / "full"), weights(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored

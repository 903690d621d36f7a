"""Training: the sandwich rule, bit-for-bit resume, standalone training, interruption,
data-parallel training under torchrun (2 processes, gloo), and evaluation parity."""

import os
import re
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
    base = dict(steps=6, max_tokens=512, warmup=2, save_every=3, log_every=2, max_len=64, device="cpu")  # exact equality needs CPU arithmetic
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


# ---------------------------------------------------------------- interruption at any moment


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data):
    """The weights of the 6-update run every interrupted-and-resumed run must reproduce."""
    run = tmp_path_factory.mktemp("full") / "run"
    train(run, data=data, cfg=cfg(), progress=False)
    return weights(run)


def resume_matches(run: Path, data, reference: dict) -> int:
    """Resume whatever checkpoint the interrupted run kept; it must finish bit for bit like the
    uninterrupted run. Returns the step it resumed from (0: nothing kept, trained afresh)."""
    if (run / "latest").exists() and (run / "latest").read_text().strip() == "step_0000006":
        start = 6  # the run finished before the interruption
    elif (run / "latest").exists():
        start = train(run, data=data, cfg=cfg(), resume=True, progress=False).start_step
    else:
        shutil.rmtree(run, ignore_errors=True)
        train(run, data=data, cfg=cfg(), progress=False)
        start = 0
    assert not list(run.glob(".step_*.partial"))  # the next save cleared what a cut save left
    got = weights(run)
    assert got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in got)
    return start


def _ctrl_c_twice():
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGINT)  # a second press ~instantly after the first


@pytest.mark.parametrize("where,save_every,expect_step", [
    ("computing", 100, 3),  # update 4 still computing: abandoned, rewound, saved at 3
    ("applying", 100, 4),  # weights being changed: the update finishes and is saved
    ("saving", 3, 3),  # the periodic save at 3 completes; the run stops there
    ("logging", 100, 4),  # between updates (the log line of step 4)
])
def test_two_ctrl_c_at_once_never_save_a_mixed_state(tmp_path, data, uninterrupted, monkeypatch, where, save_every,
                                                     expect_step):
    """Two SIGINTs within microseconds, at each phase of the loop: the checkpoint kept always
    resumes to exactly the uninterrupted run (the old handler saved weights at N with batch
    position and RNGs at N + 1 when the second press landed mid-update)."""
    import mosc.nn.train as T

    calls = {"n": 0}

    def on_call(n, real):
        def wrapped(*a, **kw):
            calls["n"] += 1
            if calls["n"] == n:
                _ctrl_c_twice()
            return real(*a, **kw)
        return wrapped

    if where == "computing":
        monkeypatch.setattr(T, "update_loss", on_call(4, T.update_loss))
    elif where == "applying":
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", on_call(4, torch.nn.utils.clip_grad_norm_))
    elif where == "saving":
        monkeypatch.setattr(T, "save_supernet", on_call(1, T.save_supernet))
    else:
        monkeypatch.setattr(T._Run, "log_line", on_call(2, T._Run.log_line))
    run = tmp_path / "r"
    with pytest.raises(KeyboardInterrupt):
        train(run, data=data, cfg=cfg(save_every=save_every), progress=False)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    assert (run / "latest").read_text().strip() == f"step_{expect_step:07d}"
    assert not list(run.glob(".step_*.partial"))
    monkeypatch.undo()
    assert resume_matches(run, data, uninterrupted) == expect_step


@pytest.mark.parametrize("where", ["computing", "applying", "saving"])
def test_interrupt_without_handler_keeps_a_consistent_checkpoint(tmp_path, data, uninterrupted, monkeypatch, where):
    """Where no handler can be installed (torchrun, a worker thread) Ctrl-C lands anywhere: the
    loop saves only a state that agrees with itself, and a save cut short leaves the previous
    checkpoint in charge (the new one is written under a hidden name and renamed at the end)."""
    import mosc.nn.train as T

    real_init = T._CtrlC.__init__
    monkeypatch.setattr(T._CtrlC, "__init__", lambda self, enabled: real_init(self, False))
    calls = {"n": 0}

    def raising(n, real):
        def wrapped(*a, **kw):
            calls["n"] += 1
            if calls["n"] == n:
                if where == "saving":
                    real(*a, **kw)  # the files are written...
                raise KeyboardInterrupt  # ...but the save never finishes
            return real(*a, **kw)
        return wrapped

    if where == "computing":
        monkeypatch.setattr(T, "update_loss", raising(5, T.update_loss))
    elif where == "applying":
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", raising(5, torch.nn.utils.clip_grad_norm_))
    else:
        monkeypatch.setattr(T, "save_supernet", raising(2, T.save_supernet))  # the save at step 6
    run = tmp_path / "r"
    with pytest.raises(KeyboardInterrupt):
        train(run, data=data, cfg=cfg(), progress=False)
    kept = int((run / "latest").read_text().strip()[5:])
    assert kept == {"computing": 4, "applying": 3, "saving": 3}[where]
    if where == "saving":
        assert list(run.glob(".step_*.partial")) and not (run / "step_0000006").exists()
    monkeypatch.undo()
    assert resume_matches(run, data, uninterrupted) == kept


def test_two_ctrl_c_at_random_moments(tmp_path, data, uninterrupted):
    """Two SIGINTs 0.1 ms apart from a timer thread, wherever the run happens to be: whatever
    was kept resumes to exactly the uninterrupted run."""
    import threading

    stray = []
    signal.signal(signal.SIGINT, lambda *a: stray.append(a))  # a press landing after train() returned
    try:
        for i, delay in enumerate((0.02, 0.45, 0.9, 1.3)):
            run = tmp_path / f"r{i}"

            def fire():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1e-4)
                os.kill(os.getpid(), signal.SIGINT)

            timer = threading.Timer(delay, fire)
            timer.start()
            try:
                train(run, data=data, cfg=cfg(save_every=2), progress=False)
            except KeyboardInterrupt:
                pass
            timer.join()
            resume_matches(run, data, uninterrupted)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


# ---------------------------------------------------------------- checkpoints that lie


def test_latest_pointer_must_name_a_step_folder_inside_the_run(tmp_path, data):
    """`latest` may name only a step_N folder directly inside the run folder."""
    from mosc.fileio import latest_checkpoint, resolve_checkpoint

    run = tmp_path / "run"
    train(run, data=data, cfg=cfg(steps=3, save_every=3), progress=False)
    assert latest_checkpoint(run) == run / "step_0000003" == resolve_checkpoint(run)
    elsewhere = tmp_path / "elsewhere" / "step_0000003"
    shutil.copytree(run / "step_0000003", elsewhere)  # a complete checkpoint, outside the run
    (run / "step_0000009").symlink_to(elsewhere, target_is_directory=True)
    for pointer in ["../elsewhere/step_0000003", str(elsewhere), "step_0000003/../../elsewhere/step_0000003",
                    "step_0000003\nstep_0000001", "step_-1", "step_", "", "latest", "step_0000009", "step_0000004",
                    "step_\u0663"]:
        (run / "latest").write_text(pointer + "\n")
        for look in (latest_checkpoint, resolve_checkpoint, load_trained):
            with pytest.raises(MoscError) as e:
                look(run)
            assert "latest" in str(e.value) and "\n" not in str(e.value), (pointer, str(e.value))
        with pytest.raises(MoscError, match="latest"):
            train(run, data=data, cfg=cfg(steps=4), resume=True, progress=False)
    (run / "latest").write_bytes(b"step_\xff\n")
    with pytest.raises(MoscError, match="not UTF-8"):
        latest_checkpoint(run)


def test_checkpoint_without_hashes_is_refused(tmp_path, data):
    """A checkpoint whose config lost weights_sha256 (or optim_sha256) is not loaded: with no
    hash, flipped weight bytes would load silently."""
    import json

    run = tmp_path / "run"
    train(run, data=data, cfg=cfg(steps=3, save_every=3), progress=False)
    ck = run / "step_0000003"
    meta = json.loads((ck / "config.json").read_text())
    assert len(meta["weights_sha256"]) == 64 and len(meta["train"]["optim_sha256"]) == 64  # the writer stores both
    w = ck / "model.safetensors"
    data_bytes = bytearray(w.read_bytes())
    data_bytes[-5] ^= 0x01  # one flipped bit in a weight
    w.write_bytes(bytes(data_bytes))
    with pytest.raises(MoscError, match="do not match the sha256"):
        load_trained(run)
    (ck / "config.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "weights_sha256"}))
    with pytest.raises(MoscError, match=r"config\.json has no weights_sha256: not written by mosc, or edited"):
        load_trained(run)
    (ck / "config.json").write_text(json.dumps({**meta, "weights_sha256": "abc"}))
    with pytest.raises(MoscError, match="malformed weights_sha256"):
        load_trained(ck)
    data_bytes[-5] ^= 0x01
    w.write_bytes(bytes(data_bytes))
    train_meta = {k: v for k, v in meta["train"].items() if k != "optim_sha256"}
    (ck / "config.json").write_text(json.dumps({**meta, "train": train_meta}))
    with pytest.raises(MoscError, match="missing 'optim_sha256'"):
        train(run, data=data, cfg=cfg(steps=4), resume=True, progress=False)
    (ck / "config.json").write_text(json.dumps({**meta, "train": {**meta["train"], "step": "3"}}))
    with pytest.raises(MoscError, match="'step' must be a number"):
        train(run, data=data, cfg=cfg(steps=4), resume=True, progress=False)
    (ck / "config.json").write_text(json.dumps({**meta, "train": {**meta["train"], "config": {**meta["train"]["config"], "lr": -1}}}))
    with pytest.raises(MoscError, match="lr must be a finite number > 0"):
        train(run, data=data, cfg=cfg(steps=4), resume=True, progress=False)


# ---------------------------------------------------------------- settings checked before anything is made


@pytest.mark.parametrize("kw,says", [
    ({"steps": 0}, "steps must be a whole number >= 1, got 0"),
    ({"steps": -5}, "steps must be"), ({"steps": 2.5}, "steps must be"), ({"steps": True}, "steps must be"),
    ({"max_tokens": 0}, "max_tokens must be"), ({"max_tokens": 64}, "max_tokens must be a whole number >= 65"),
    ({"lr": 0.0}, "lr must be a finite number > 0"), ({"lr": float("nan")}, "lr must be"),
    ({"lr": float("inf")}, "lr must be"), ({"lr": -1e-3}, "lr must be"),
    ({"warmup": -1}, "warmup must be"), ({"sandwich_random": -1}, "sandwich_random must be"),
    ({"sandwich_random": 10**9}, "sandwich_random must be"), ({"distill": -0.1}, "distill must be"),
    ({"distill": 1.5}, "distill must be"), ({"save_every": 0}, "save_every must be"),
    ({"log_every": 0}, "log_every must be"), ({"keep": 0}, "keep must be"), ({"max_len": 0}, "max_len must be"),
    ({"beta2": 1.0}, "beta2 must be"), ({"label_smoothing": -0.1}, "label_smoothing must be"),
    ({"clip_norm": float("nan")}, "clip_norm must be"), ({"seed": -1}, "seed must be"),
])
def test_train_config_rejects_out_of_range(kw, says):
    with pytest.raises(MoscError, match=re.escape(says)) as e:
        cfg(**kw)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("args,says", [
    (["--steps", "0"], "steps must be a whole number >= 1, got 0"),
    (["--max-tokens", "0"], "max_tokens must be"),
    (["--lr", "0"], "lr must be a finite number > 0"),
    (["--lr", "nan"], "lr must be"),
    (["--lr", "inf"], "lr must be"),
    (["--warmup", "-1"], "warmup must be"),
    (["--sandwich-random", "-1"], "sandwich_random must be"),
    (["--distill", "-0.5"], "distill must be"),
    (["--dropout", "1.0"], "dropout must be a finite number >= 0 and < 1"),
    (["--dropout", "-0.1"], "dropout must be"),
    (["--save-every", "0"], "save_every must be"),
    (["--log-every", "0"], "log_every must be"),
    (["--experts", "0"], "n_experts must be"),
    (["--router-hidden", "0"], "router_hidden must be"),
    (["--vocab-size", "10"], "vocab_size 10 too small"),
    (["--vocab-size", "2000000"], "vocab_size must be a whole number from 300 to 1000000"),
    (["--max-train-pairs", "0"], "max_train_pairs must be"),
    (["--space", "nope"], "unknown search space"),
])
def test_cli_train_bad_setting_is_one_line_and_creates_nothing(tmp_path, monkeypatch, args, says):
    """`mosc train --steps 0` and friends: one error line, exit 2, and no run folder left behind."""
    from typer.testing import CliRunner

    import mosc.nn.corpus as C
    from mosc.cli import app

    monkeypatch.setattr(C, "synthetic_splits", lambda *a: pytest.fail("read the corpus before checking settings"))
    run = tmp_path / "run"
    r = CliRunner(env={"COLUMNS": "300"}).invoke(app, ["train", "-o", str(run), *args])
    lines = [l for l in r.output.splitlines() if l.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), r.output
    assert says in lines[0], lines[0]
    assert not run.exists()

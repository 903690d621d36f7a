"""The core invariant: supernet(x, arch) == collapse(supernet, arch)(x), in every FFN mode,
for many archs of both spaces; the collapsed model's size and its cached decoding."""

import random
import re

import pytest
import torch

from mosc.errors import MoscError
from mosc.nn.model import FFNMode, Supernet, SupernetConfig, count_parameters, load_supernet, save_supernet
from mosc.space import Arch, SearchSpace
from mosc.nn.evaluate import FullDecoder, beam_search
from mosc.nn.subnet import analytic_param_count, collapse, load_subnet, save_subnet

MODES = [m.value for m in FFNMode]


def make_supernet(space: str, mode: str, vocab: int = 60, seed: int = 0, dropout: float = 0.3) -> Supernet:
    torch.manual_seed(seed)
    cfg = SupernetConfig(space=SearchSpace.load(space).to_dict(), vocab_size=vocab, ffn_mode=mode, dropout=dropout)
    model = Supernet(cfg)
    with torch.no_grad():  # untrained routers are near uniform: push them so experts really differ
        for name, p in model.named_parameters():
            if "router" in name:
                p.mul_(3.0)
    return model.eval()


def batch(vocab: int, B=3, S=9, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, vocab, (B, S), generator=g)
    src[0, 6:] = 0  # padding in the source
    return src, torch.randint(4, vocab, (B, T), generator=g)


def archs(space: SearchSpace, n: int, seed: int = 0) -> list[Arch]:
    rng = random.Random(seed)
    return [space.largest(), space.smallest()] + [space.sample(rng) for _ in range(n)]


@pytest.mark.parametrize("mode", MODES)
def test_collapse_exact_tiny(mode):
    model = make_supernet("tiny", mode)
    src, tgt = batch(60)
    for arch in archs(model.space, 20):
        sub = collapse(model, arch)
        with torch.no_grad():
            diff = (model(src, tgt, arch) - sub(src, tgt)).abs().max().item()
        assert diff <= 1e-5, (arch, diff)
        assert count_parameters(sub) == analytic_param_count(arch, 60, model.space.qkv_dim)


@pytest.mark.parametrize("mode", MODES)
def test_collapse_exact_wmt(mode):
    model = make_supernet("wmt", mode, vocab=40)
    src, tgt = batch(40, B=2, S=8, T=5)
    for arch in archs(model.space, 2, seed=1):
        sub = collapse(model, arch)
        with torch.no_grad():
            diff = (model(src, tgt, arch) - sub(src, tgt)).abs().max().item()
        assert diff <= 1e-5, (arch, diff)
        assert count_parameters(sub) == analytic_param_count(arch, 40, 512)


def test_collapsed_holds_no_router_and_only_arch_sized_weights():
    model = make_supernet("tiny", "neuron")
    arch = model.space.sample(random.Random(3))
    sub = collapse(model, arch)
    names = [n for n, _ in sub.named_parameters()]
    assert not any("router" in n or "expert" in n for n in names)
    assert sub.encoder[0].ffn.fc1.weight.shape == (arch.enc_ffn[0], arch.enc_embed)
    assert sub.decoder[-1].ffn.fc2.weight.shape == (arch.dec_embed, arch.dec_ffn[-1])
    assert len(sub.encoder) == arch.enc_layers and len(sub.decoder) == arch.dec_layers


def test_routing_matters_in_moe_modes():
    """The mixed weights depend on the arch through the router: two archs that share a layer's
    dims get different FFN weights in MoS modes and the same weights in shared mode."""
    s = SearchSpace.load("tiny")
    a = s.largest()
    b = Arch.from_dict({**a.to_dict(), "dec_ffn": [512, 512, 128]})  # layer 0 dims unchanged
    for mode, same in (("shared", True), ("layer", False), ("neuron", False)):
        m = make_supernet("tiny", mode)
        w_a = collapse(m, a).encoder[0].ffn.fc1.weight
        w_b = collapse(m, b).encoder[0].ffn.fc1.weight
        assert torch.equal(w_a, w_b) == same, mode


def test_collapse_is_not_fooled_by_a_perturbation():
    """Guards the guard: a changed weight in the collapsed model is detected."""
    model = make_supernet("tiny", "layer")
    arch = model.space.largest()
    sub = collapse(model, arch)
    with torch.no_grad():
        sub.decoder[0].ffn.fc1.weight[0, 0] += 1e-2
    src, tgt = batch(60)
    with torch.no_grad():
        assert (model(src, tgt, arch) - sub(src, tgt)).abs().max() > 1e-5


def sharp_supernet(mode: str) -> Supernet:
    """Random weights make greedy decoding repeat its input token (the residual stream is
    dominated by the token's own embedding); amplified layer outputs make it depend on the
    source and position instead, so the decoding tests see varied tokens."""
    model = make_supernet("tiny", mode, vocab=60, seed=1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("out.weight", "w2")):
                p.mul_(10.0)
    return model


@pytest.mark.parametrize("mode", MODES)
def test_cached_greedy_equals_full_sequence_greedy(mode):
    model = sharp_supernet(mode)
    src, _ = batch(60, B=4, S=10)
    outputs = set()
    for arch in archs(model.space, 4, seed=2):
        sub = collapse(model, arch)
        cached = sub.translate(src, bos=1, eos=2, max_len=12)
        full = beam_search(FullDecoder(sub), src, beam=1, max_len=12)
        inherited = beam_search(FullDecoder(lambda s, t: model(s, t, arch)), src, beam=1, max_len=12)
        assert cached == full == inherited
        outputs |= {tuple(row) for row in cached}
    assert len(outputs) > 4  # outputs vary with source and arch: the comparison is not vacuous


def test_decode_step_logits_match_forward():
    """Teacher-forced: every step's logits from the KV cache equal the full-sequence logits."""
    model = sharp_supernet("neuron")
    arch = model.space.largest()
    sub = collapse(model, arch)
    src, tgt = batch(60, B=2, S=8, T=6)
    with torch.no_grad():
        full = sub(src, tgt)  # [B, T, V]
        cross = sub.encode(src)
        caches = sub.init_cache(2, 10)  # cache longer than the target: unused slots stay masked
        for t in range(tgt.shape[1]):
            logits, *caches = sub.decode_step(tgt[:, t], torch.tensor([t]), *caches, *cross)
            assert (logits - full[:, t]).abs().max() <= 1e-5


def test_save_load_round_trip(tmp_path):
    model = make_supernet("tiny", "layer")
    arch = model.space.sample(random.Random(4))
    sub = collapse(model, arch)
    save_subnet(sub, tmp_path / "sub")
    again = load_subnet(tmp_path / "sub")
    src, tgt = batch(60)
    with torch.no_grad():
        assert torch.equal(sub(src, tgt), again(src, tgt))
    save_supernet(model, tmp_path / "sn")
    model2, meta = load_supernet(tmp_path / "sn")
    assert meta["config"]["ffn_mode"] == "layer"
    with torch.no_grad():
        assert torch.equal(model(src, tgt, arch), model2(src, tgt, arch))


def test_corrupt_and_mismatched_checkpoints(tmp_path):
    model = make_supernet("tiny", "shared")
    save_supernet(model, tmp_path / "sn")
    weights = tmp_path / "sn" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(MoscError, match="do not match the sha256"):
        load_supernet(tmp_path / "sn")
    # A truncated file without a recorded hash: safetensors itself refuses it.
    from mosc.fileio import load_tensors

    with pytest.raises(MoscError, match="corrupt or not a safetensors"):
        load_tensors(weights)
    # Weights from another mode under this config: mismatched keys.
    save_supernet(make_supernet("tiny", "neuron"), tmp_path / "other")
    import json

    cfg = json.loads((tmp_path / "other" / "config.json").read_text())
    cfg["config"]["ffn_mode"] = "shared"
    (tmp_path / "other" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MoscError, match="do not match the supernet config"):
        load_supernet(tmp_path / "other")
    with pytest.raises(MoscError, match="holds a 'mosc-supernet', expected a 'mosc-subnet'"):
        load_subnet(tmp_path / "other")
    with pytest.raises(MoscError, match="not a model folder"):
        load_supernet(tmp_path / "missing")


def test_collapse_refuses_arch_outside_space():
    model = make_supernet("tiny", "shared")
    bad = Arch.from_dict({**model.space.largest().to_dict(), "enc_embed": 256})
    with pytest.raises(MoscError, match="enc_embed = 256"):
        collapse(model, bad)


@pytest.mark.parametrize("kind", ["supernet", "subnet"])
def test_model_folder_without_weights_hash_is_refused(tmp_path, kind):
    """Every writer stores weights_sha256 and every loader demands it: a folder without one
    (hand-made or edited) would load flipped weight bytes silently."""
    import json

    model = make_supernet("tiny", "layer")
    folder = tmp_path / kind
    if kind == "supernet":
        save_supernet(model, folder)
        load = load_supernet
    else:
        save_subnet(collapse(model, model.space.smallest()), folder)
        load = load_subnet
    meta = json.loads((folder / "config.json").read_text())
    assert len(meta["weights_sha256"]) == 64 and int(meta["weights_sha256"], 16) >= 0
    load(folder)
    w = folder / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-3] ^= 0x80  # a flipped bit in the last weight
    w.write_bytes(bytes(data))
    with pytest.raises(MoscError, match="do not match the sha256"):
        load(folder)
    for bad, says in [(None, "has no weights_sha256: not written by mosc, or edited"),
                      ("", "malformed weights_sha256"), (123, "malformed weights_sha256"),
                      ("A" * 64, "malformed weights_sha256")]:
        edited = {k: v for k, v in meta.items() if k != "weights_sha256"}
        if bad is not None:
            edited["weights_sha256"] = bad
        (folder / "config.json").write_text(json.dumps(edited))
        with pytest.raises(MoscError, match=says) as e:
            load(folder)
        assert str(folder / "config.json") in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("kw,says", [
    ({"n_experts": 0}, "n_experts must be"), ({"n_experts": 10**6}, "n_experts must be"),
    ({"router_hidden": 0}, "router_hidden must be"), ({"dropout": 1.0}, "dropout must be"),
    ({"dropout": float("nan")}, "dropout must be"), ({"attn_dropout": -0.1}, "attn_dropout must be"),
    ({"vocab_size": 3}, "vocab_size must be"), ({"vocab_size": 10**7}, "vocab_size must be"),
    ({"vocab_size": 100.0}, "vocab_size must be"), ({"max_positions": 10**9}, "max_positions must be"),
    ({"ffn_mode": "moe"}, "ffn_mode must be one of shared, layer, neuron"),
    ({"space": {"qkv_dim": 64}}, "missing [encoder]"),
])
def test_supernet_config_rejects_out_of_range(kw, says):
    base = {"space": SearchSpace.load("tiny").to_dict(), "vocab_size": 60, "ffn_mode": "neuron"}
    with pytest.raises(MoscError, match=re.escape(says)) as e:
        SupernetConfig(**{**base, **kw})
    assert "\n" not in str(e.value)


def test_supernet_folder_with_out_of_range_config_is_one_line(tmp_path):
    import json

    save_supernet(make_supernet("tiny", "shared"), tmp_path / "sn")
    cfg_file = tmp_path / "sn" / "config.json"
    meta = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**meta, "config": {**meta["config"], "n_experts": -2}}))
    with pytest.raises(MoscError, match=r"sn: supernet config: n_experts must be"):
        load_supernet(tmp_path / "sn")

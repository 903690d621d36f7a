"""Search space: loading, size, sampling/evolution stay inside, validation messages, encodings."""

import itertools
import json
import random

import pytest

from mosc.errors import MoscError
from mosc.space import Arch, SearchSpace, builtin_spaces


@pytest.fixture(params=["tiny", "wmt"])
def space(request):
    return SearchSpace.load(request.param)


def brute_force_size(s: SearchSpace) -> int:
    """Count archs by enumerating every combination (only feasible for the tiny space)."""
    n = 0
    for le, ld in itertools.product(s.enc_layers, s.dec_layers):
        enc = (len(s.enc_ffn) * len(s.enc_heads)) ** le
        dec = len(list(itertools.product(s.dec_ffn, s.dec_heads, s.dec_cross_heads, s.arbitrary_choices(le)))) ** ld
        n += enc * dec
    return n * len(s.enc_embed) * len(s.dec_embed)


def test_builtins_listed():
    assert {"tiny", "wmt"} <= set(builtin_spaces())


def test_tiny_size_matches_enumeration():
    s = SearchSpace.load("tiny")
    assert s.size() == brute_force_size(s)
    # Enumerate the smallest slice fully: 1 enc layer, 1 dec layer (k must be 1).
    assert s.arbitrary_choices(1) == (1,)


def test_wmt_space_is_hat_space0():
    s = SearchSpace.load("wmt")
    assert s.enc_embed == (512, 640) and s.enc_layers == (6,) and s.dec_layers == (1, 2, 3, 4, 5, 6)
    assert s.enc_ffn == (1024, 2048, 3072) and s.dec_heads == (4, 8) and s.dec_arbitrary == (1, 2, 3)
    assert s.qkv_dim == 512
    # 2*2 embeds * (3*2)^6 encoder * sum_{L=1..6} (3*2*2*3)^L decoder
    assert s.size() == 4 * 6**6 * sum(36**L for L in range(1, 7))


def test_sample_mutate_crossover_stay_inside(space):
    rng = random.Random(0)
    seen = set()
    for _ in range(500):
        a, b = space.sample(rng), space.sample(rng)
        for arch in (a, space.mutate(a, rng, prob=0.5), space.crossover(a, b, rng)):
            space.validate(arch)
            seen.add(arch)
    assert len(seen) > 900  # sampling actually varies
    space.validate(space.largest())
    space.validate(space.smallest())


def test_mutation_probability_zero_is_identity(space):
    rng = random.Random(1)
    a = space.sample(rng)
    assert space.mutate(a, rng, prob=0.0) == a


def test_same_seed_same_archs(space):
    assert [space.sample(random.Random(7)) for _ in range(3)] == [space.sample(random.Random(7)) for _ in range(3)]


def test_arch_json_round_trip_and_hash(space):
    a = space.sample(random.Random(2))
    b = Arch.from_json(a.to_json(indent=2))
    assert a == b and hash(a) == hash(b) and a.hash == b.hash
    assert len({a.hash, space.largest().hash, space.smallest().hash}) == 3
    assert json.loads(a.to_json())["enc_embed"] == a.enc_embed


def test_validation_names_field_and_allowed_values():
    s = SearchSpace.load("tiny")
    a = s.largest()
    bad = Arch.from_dict({**a.to_dict(), "dec_ffn": [512, 999, 512]})
    with pytest.raises(MoscError, match=r"dec_ffn\[1\] = 999, allowed: \[128, 256, 512\]"):
        s.validate(bad)
    with pytest.raises(MoscError, match=r"enc_embed = 96, allowed: \[64, 128\]"):
        s.validate(Arch.from_dict({**a.to_dict(), "enc_embed": 96}))
    # k=2 encoder layers attended is impossible with 1 encoder layer
    one_enc = Arch.from_dict({**a.to_dict(), "enc_ffn": [128], "enc_heads": [2]})
    with pytest.raises(MoscError, match=r"dec_arbitrary\[0\] = 2, allowed: \[1\]"):
        s.validate(one_enc)


def test_malformed_arch_json_messages():
    with pytest.raises(MoscError, match="malformed JSON"):
        Arch.from_json("{not json")
    with pytest.raises(MoscError, match="missing fields"):
        Arch.from_json('{"enc_embed": 64}')
    good = SearchSpace.load("tiny").largest().to_dict()
    with pytest.raises(MoscError, match="must be a list of integers"):
        Arch.from_dict({**good, "enc_ffn": "512"})
    with pytest.raises(MoscError, match="equal length"):
        Arch.from_dict({**good, "enc_heads": [4]})


def test_unknown_space_and_bad_toml(tmp_path):
    with pytest.raises(MoscError, match="unknown search space 'nope'.*tiny, wmt"):
        SearchSpace.load("nope")
    bad = tmp_path / "bad.toml"
    bad.write_text("qkv_dim = 64\n[encoder]\nembed_dim = [64]\n")
    with pytest.raises(MoscError, match=r"missing \[encoder\] layers"):
        SearchSpace.load(bad)
    bad.write_text("this is = = not toml")
    with pytest.raises(MoscError, match="malformed TOML"):
        SearchSpace.load(bad)


def test_space_toml_round_trip(tmp_path):
    s = SearchSpace.load("tiny")
    assert SearchSpace.from_dict(s.to_dict()) == s


def test_encodings(space):
    a = space.sample(random.Random(5))
    feats = a.hat_features()
    assert len(feats) == 10 and feats[1] == a.enc_layers and feats[5] == a.dec_layers
    enc = space.encode(space.largest())
    assert enc == [1.0] * 10
    fine = space.encode_layers(a)
    assert len(fine) == 4 + 2 * max(space.enc_layers) + 4 * max(space.dec_layers)
    assert all(0.0 <= x <= 1.0 for x in fine)
    # Different per-layer choices with equal means: HAT's features collide, the fine encoding does not.
    s = SearchSpace.load("tiny")
    b = s.largest()
    c1 = Arch.from_dict({**b.to_dict(), "dec_ffn": [128, 512, 512]})
    c2 = Arch.from_dict({**b.to_dict(), "dec_ffn": [512, 512, 128]})
    assert s.encode(c1) == s.encode(c2) and s.encode_layers(c1) != s.encode_layers(c2)


def test_hat_feature_order_matches_hat_csv():
    """The CSV in shared/data uses the same 10 columns in the same order."""
    from mosc.space import HAT_FEATURE_NAMES

    assert HAT_FEATURE_NAMES[0] == "encoder_embed_dim" and HAT_FEATURE_NAMES[-1] == "decoder_arbitrary_ende_attn_avg"

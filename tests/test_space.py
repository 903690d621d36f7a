"""Search space: loading, size, sampling/evolution stay inside, validation messages, encodings."""

import itertools
import json
import random

import pytest

from mosc.errors import MoscError
from mosc.space import BUILTIN_DIR, Arch, SearchSpace, builtin_spaces


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
    with pytest.raises(MoscError, match="not valid JSON"):
        Arch.from_json("{not json")
    with pytest.raises(MoscError, match="missing fields"):
        Arch.from_json('{"enc_embed": 64}')
    good = SearchSpace.load("tiny").largest().to_dict()
    with pytest.raises(MoscError, match="must be a list of 1 to 1000 whole numbers"):
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
    with pytest.raises(MoscError, match="not valid TOML"):
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


BOM = b"\xef\xbb\xbf"


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


@pytest.mark.parametrize("data,says", [
    (b"\xff\xfe{}", "not UTF-8"),
    ('{"enc_embed": "café"}'.encode("latin-1"), "not UTF-8"),
    (b"", "not valid JSON"),
    (b"[1, 2, 3]", "must hold a JSON object, not array"),
    (b'"a string"', "must hold a JSON object"),
    (b'{"enc_embed": NaN}', "not valid JSON"),
])
def test_arch_file_unreadable_is_one_line_naming_it(tmp_path, data, says):
    f = tmp_path / "a.json"
    f.write_bytes(data)
    with pytest.raises(MoscError, match=says) as e:
        Arch.load(f)
    assert str(f) in one_line(e)
    with pytest.raises(MoscError, match="cannot read"):
        Arch.load(tmp_path / "missing.json")


@pytest.mark.parametrize("field,value", [
    ("enc_embed", True), ("enc_embed", "128"), ("enc_embed", 1e400), ("enc_embed", 128.0), ("enc_embed", 10**30),
    ("enc_embed", 0), ("enc_embed", -64), ("enc_embed", None), ("enc_ffn", ["512", "512"]), ("enc_ffn", [True, 1]),
    ("enc_ffn", 512), ("enc_ffn", []), ("enc_ffn", [10**30, 512]), ("dec_arbitrary", [1, 1.5, 1]),
    ("dec_heads", {"a": 1}), ("dec_ffn", [512] * 5000),
])
def test_arch_with_wrong_types_is_one_line(tmp_path, field, value):
    d = SearchSpace.load("tiny").largest().to_dict()
    d[field] = value
    f = tmp_path / "a.json"
    f.write_text(json.dumps(d))  # 1e400 is written as Infinity, which JSON files may not hold
    with pytest.raises(MoscError) as e:
        Arch.load(f)
    assert str(f) in one_line(e)
    assert field in str(e.value) or "not valid JSON" in str(e.value)


def test_arch_file_with_bom_loads(tmp_path):
    a = SearchSpace.load("tiny").largest()
    f = tmp_path / "a.json"
    f.write_bytes(BOM + a.to_json(indent=2).encode())
    assert Arch.load(f) == a


TINY_TOML = (BUILTIN_DIR / "tiny.toml").read_bytes()


@pytest.mark.parametrize("data,says", [
    (b"\x00\xff binary", "not UTF-8"),
    ('description = "café"\n'.encode("latin-1"), "not UTF-8"),
    (b"[encoder]\nembed_dim = ", "not valid TOML"),
    (BOM + b"= = =\n", "not valid TOML"),
    (b"qkv_dim = 64\nencoder = 5\n", r"missing \[encoder\] embed_dim"),
    (TINY_TOML.replace(b"qkv_dim = 128", b"qkv_dim = true"), "qkv_dim must be a whole number"),
    (TINY_TOML.replace(b"qkv_dim = 128", b"qkv_dim = nan"), "qkv_dim must be a whole number"),
    (TINY_TOML.replace(b"layers = [1, 2, 3]", b"layers = [1, 2, 1000000000]", 1), "layers must be"),
    (TINY_TOML.replace(b"layers = [1, 2, 3]", b"layers = [true]", 1), "layers must be"),
    (TINY_TOML.replace(b"layers = [1, 2, 3]", b'layers = ["2"]', 1), "layers must be"),
])
def test_space_toml_unreadable_is_one_line_naming_it(tmp_path, data, says):
    assert b"qkv_dim = 128" in TINY_TOML and b"layers = [1, 2, 3]" in TINY_TOML  # the edits above bite
    f = tmp_path / "s.toml"
    f.write_bytes(data)
    with pytest.raises(MoscError, match=says) as e:
        SearchSpace.load(f)
    assert str(f) in one_line(e)


def test_space_toml_with_bom_loads_and_names_are_not_paths(tmp_path):
    f = tmp_path / "s.toml"
    f.write_bytes(BOM + TINY_TOML)
    assert SearchSpace.load(f).to_dict() == {**SearchSpace.load("tiny").to_dict(), "name": SearchSpace.load(f).name}
    with pytest.raises(MoscError, match="unknown search space"):
        SearchSpace.load("../spaces/tiny")
    with pytest.raises(MoscError, match="table of settings"):
        SearchSpace.from_dict([1, 2])


def test_check_count_bounds_requests():
    from mosc.space import MAX_ARCHS_PER_REQUEST

    s = SearchSpace.load("tiny")
    assert s.check_count(5, "--count") == 5
    assert s.check_count(MAX_ARCHS_PER_REQUEST, "-n") == MAX_ARCHS_PER_REQUEST
    for bad in (0, -1, MAX_ARCHS_PER_REQUEST + 1, 1_000_000_000, True, 2.0, "3"):
        with pytest.raises(MoscError, match="--count must be from 1 to 100,000") as e:
            s.check_count(bad, "--count")
        one_line(e)
    with pytest.raises(MoscError, match="at most 100,000 archs per request"):
        s.check_count(1_000_000_000, "--count", distinct=False)
    # A space smaller than the cap: distinct requests are bounded by its size, repeats only by the cap.
    small = SearchSpace.from_dict({**s.to_dict(), "encoder": {**s.to_dict()["encoder"], "layers": [1], "embed_dim": [64]},
                                   "decoder": {**s.to_dict()["decoder"], "layers": [1], "embed_dim": [64]}})
    n = small.size()
    assert n < MAX_ARCHS_PER_REQUEST
    assert small.check_count(n) == n
    with pytest.raises(MoscError, match=f"holds only {n:,} distinct archs"):
        small.check_count(n + 1, "--sample")
    assert small.check_count(n + 1, distinct=False) == n + 1


def test_sample_distinct_is_bounded_and_seeded():
    import time

    s = SearchSpace.load("tiny")
    a = s.sample_distinct(50, seed=3)
    assert len(set(a)) == 50 and a == s.sample_distinct(50, seed=3) and a != s.sample_distinct(50, seed=4)
    assert all(s.contains(x) for x in a)
    t = time.perf_counter()
    with pytest.raises(MoscError, match="must be from 1 to 100,000"):
        s.sample_distinct(1_000_000_000, seed=0)  # refused up front, not after a billion draws
    assert time.perf_counter() - t < 1

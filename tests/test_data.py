"""mosc.nn.corpus, synthetic, tokenizer, batching: readers, synthetic task, BPE, batches. Fast (a few seconds)."""

import gzip
from pathlib import Path

import pytest
import torch

from mosc.contract import BOS_ID, EOS_ID, PAD_ID
from mosc.nn.batching import BatchIterator, eval_batches
from mosc.nn.corpus import find_corpus_files, load_corpus, read_lines, read_parallel, shared_data_dir
from mosc.nn.synthetic import SyntheticConfig, synthetic_pairs, synthetic_splits
from mosc.nn.tokenizer import SubwordTokenizer
from mosc.errors import MoscError

SMALL = SyntheticConfig(n_train=1500, n_val=100, n_test=100, seed=7)


@pytest.fixture(scope="module")
def syn():
    return load_corpus("synthetic", synthetic=SMALL)


# ---------------------------------------------------------------- synthetic task


def test_synthetic_deterministic_by_seed():
    a, b = synthetic_splits(SMALL), synthetic_splits(SMALL)
    assert a == b
    c = synthetic_splits(SyntheticConfig(n_train=1500, n_val=100, n_test=100, seed=8))
    assert c["train"][0] != a["train"][0]
    # Same language whatever the seed: a source word always maps to the same target lexicon.
    assert set(" ".join(c["train"][1]).split()) & set(" ".join(a["train"][1]).split())


def test_synthetic_splits_disjoint_and_stable():
    s = synthetic_splits(SMALL)
    assert [len(s[k][0]) for k in ("train", "val", "test")] == [1500, 100, 100]
    train, val, test = (set(s[k][0]) for k in ("train", "val", "test"))
    assert not (train & val or train & test or val & test)
    # val/test do not move when only the training size changes
    bigger = synthetic_splits(SyntheticConfig(n_train=3000, n_val=100, n_test=100, seed=7))
    assert bigger["val"] == s["val"] and bigger["test"] == s["test"]


def test_synthetic_transformation():
    from mosc.nn.synthetic import _Language

    lang = _Language(SMALL)
    det = {s: forms for s, forms in lang.dets}
    noun = {s: (t, lang.gender[k]) for k, (s, t) in enumerate(lang.nouns)}
    adj, verb = dict(lang.adjs), dict(lang.verbs)
    src, tgt = synthetic_pairs(400, SMALL)
    assert all(s == " ".join(s.split()) and s for s in src + tgt)  # plain space-separated words
    assert all(len(s.split()) == len(t.split()) for s, t in zip(src, tgt))
    assert not set(" ".join(src).split()) & set(" ".join(tgt).split())  # nothing to copy
    # Intransitive one-clause sentences: DET ADJ* NOUN VERB -> DET'[g] NOUN' ADJ'* (mirrored) VERB'+agr[g]
    checked = 0
    for s, t in zip(src, tgt):
        w = s.split()
        if w[-1] not in verb or not all(x in adj for x in w[1:-2]):
            continue
        n, g = noun[w[-2]]
        want = [det[w[0]][g], n] + [adj[a] for a in reversed(w[1:-2])] + [verb[w[-1]] + lang.verb_suffix[g]]
        assert t.split() == want
        checked += 1
    assert checked > 10


# ---------------------------------------------------------------- reading files


def _write(path: Path, lines: list[str], gz: bool = False) -> Path:
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def test_read_plain_and_gz_normalizes_whitespace(tmp_path):
    p = _write(tmp_path / "a.en", ["Two  dogs ", "\ufeffnot a BOM here", "x\r"])
    g = _write(tmp_path / "a.en.gz", ["Two  dogs ", "y", "z"], gz=True)
    assert read_lines(p) == ["Two dogs", "\ufeffnot a BOM here", "x"]
    assert read_lines(g) == ["Two dogs", "y", "z"]
    h = _write(tmp_path / "gzipped_without_suffix.en", ["q"], gz=True)
    assert read_lines(h) == ["q"]


def test_empty_line_reports_file_and_line(tmp_path):
    p = _write(tmp_path / "c.de.gz", ["eins", "zwei", "   ", "vier", ""], gz=True)
    with pytest.raises(MoscError, match=r"c\.de\.gz:3: empty line.*2 empty lines"):
        read_lines(p)


def test_misaligned_reports_file_and_line(tmp_path):
    s = _write(tmp_path / "m.en", ["a", "b", "c"])
    t = _write(tmp_path / "m.de", ["a", "b"])
    with pytest.raises(MoscError, match=r"m\.en:3: misaligned.*3 lines.*m\.de has 2"):
        read_parallel(s, t)
    with pytest.raises(MoscError, match=r"m\.en:3: misaligned"):
        read_parallel(t, s)


def test_bad_files(tmp_path):
    with pytest.raises(MoscError, match="no such file"):
        read_lines(tmp_path / "missing.en")
    (tmp_path / "bad.en").write_bytes(b"ok\nbad \xff byte\n")
    with pytest.raises(MoscError, match=r"bad\.en:2: not UTF-8"):
        read_lines(tmp_path / "bad.en")
    (tmp_path / "bad.en.gz").write_bytes(b"not gzip")
    with pytest.raises(MoscError, match="cannot read"):
        read_lines(tmp_path / "bad.en.gz")


def test_corpus_directory_layout(tmp_path):
    for split in ("train", "val", "test_2016_flickr"):
        _write(tmp_path / f"{split}.en.gz", [f"a {split} {i}" for i in range(40)], gz=True)
        _write(tmp_path / f"{split}.de", [f"b {split} {i}" for i in range(40)])
    files = find_corpus_files(str(tmp_path))
    assert files["test"][0].name == "test_2016_flickr.en.gz"
    d = load_corpus(str(tmp_path), vocab_size=300)
    assert (d.src_lang, d.tgt_lang, len(d.train), len(d.test)) == ("en", "de", 40, 40)
    assert d.tokenizer.decode(d.test.tgt[5]) == "b test_2016_flickr 5"
    r = load_corpus(str(tmp_path), src_lang="de", tgt_lang="en", tokenizer=d.tokenizer)
    assert r.train.src_text == d.train.tgt_text
    _write(tmp_path / "test_2017_mscoco.en", ["x"])
    _write(tmp_path / "test_2017_mscoco.de", ["y"])
    with pytest.raises(MoscError, match="several test sets"):
        find_corpus_files(str(tmp_path))
    assert find_corpus_files(str(tmp_path), test_split="test_2017_mscoco")["test"][1].name == "test_2017_mscoco.de"
    with pytest.raises(MoscError, match="no train files"):
        find_corpus_files(str(tmp_path / "nothing_"))


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_specials(syn):
    tok = syn.tokenizer
    assert tok.vocab_size <= 1000
    for s in syn.test.src_text[:50] + syn.test.tgt_text[:50]:
        assert tok.decode(tok.encode(s)) == s
    ids = tok.encode(syn.val.tgt_text[0])
    assert min(ids) > 3  # text never yields pad/bos/eos/unk
    # decode stops at eos and drops pad/bos: what a generator outputs
    assert tok.decode([BOS_ID, *ids, EOS_ID, 99, PAD_ID]) == syn.val.tgt_text[0]
    assert tok.decode(torch.tensor([BOS_ID, *ids])) == syn.val.tgt_text[0]
    # unseen characters and literal special-token text survive via byte fallback
    for s in ["Ein Mann fährt 日本 Fahrrad ☃.", "a <s> b </s> <pad> <0x41>"]:
        assert tok.decode(tok.encode(s)) == s
    with pytest.raises(MoscError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


def test_tokenizer_json_and_file_round_trip(syn, tmp_path):
    tok = syn.tokenizer
    again = SubwordTokenizer.from_json(tok.to_json())
    assert again == tok and again.to_json() == tok.to_json()
    tok.save(tmp_path / "tok.json")
    loaded = SubwordTokenizer.load(tmp_path / "tok.json")
    assert loaded == tok
    s = syn.test.tgt_text[3]
    assert loaded.encode(s) == tok.encode(s)
    with pytest.raises(MoscError, match="not valid JSON"):
        SubwordTokenizer.from_json("{not json")


def test_tokenizer_training_is_deterministic(syn):
    # DDP ranks each train their own: they must agree.
    texts = syn.train.src_text + syn.train.tgt_text
    assert SubwordTokenizer.train(texts, 600) == SubwordTokenizer.train(texts, 600)
    with pytest.raises(MoscError, match="too small"):
        SubwordTokenizer.train(texts, 100)
    for bad in (10**7, 600.0, True, "600"):
        with pytest.raises(MoscError, match="vocab_size must be a whole number from 300 to 1000000"):
            SubwordTokenizer.train(texts, bad)


BOM = b"\xef\xbb\xbf"


@pytest.mark.parametrize("data,says", [
    (b"\xff\xfe\x00binary", "not UTF-8"),
    ('{"model": "café"}'.encode("latin-1"), "not UTF-8"),
    (b"", "not valid JSON"),
    (b'{"version": "1.0", "model": ', "not valid JSON"),
    (b"[1, 2, 3]", "must hold a JSON object, not array"),
    (b'{"version": NaN}', "not valid JSON"),
    (b'{"version": "1.0"}', "cannot parse tokenizer JSON"),
    (BOM + b'"a string"', "must hold a JSON object"),
])
def test_tokenizer_file_unreadable_is_one_line_naming_it(tmp_path, data, says):
    f = tmp_path / "tok.json"
    f.write_bytes(data)
    with pytest.raises(MoscError, match=says) as e:
        SubwordTokenizer.load(f)
    assert str(f) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(MoscError, match="cannot read tokenizer"):
        SubwordTokenizer.load(tmp_path / "missing.json")


def test_tokenizer_file_foreign_or_with_bom(syn, tmp_path):
    import json

    f = tmp_path / "tok.json"
    f.write_bytes(BOM + syn.tokenizer.to_json().encode())
    assert SubwordTokenizer.load(f) == syn.tokenizer
    spec = json.loads(syn.tokenizer.to_json())
    vocab = spec["model"]["vocab"]
    vocab["<pad>"], vocab["<s>"] = vocab["<s>"], vocab["<pad>"]  # ids swapped: not a mosc tokenizer
    f.write_text(json.dumps(spec))
    with pytest.raises(MoscError, match=r"tok\.json: <pad> has id 1, expected 0; not a mosc tokenizer"):
        SubwordTokenizer.load(f)


def test_corpus_settings_checked_before_reading(tmp_path, monkeypatch):
    import mosc.nn.corpus as C

    monkeypatch.setattr(C, "synthetic_splits", lambda *a: pytest.fail("read the corpus before checking settings"))
    for kw, says in [({"vocab_size": 10}, "too small"), ({"vocab_size": 10**7}, "vocab_size must be"),
                     ({"max_train_pairs": 0}, "max_train_pairs must be a whole number >= 1"),
                     ({"max_train_pairs": -3}, "max_train_pairs must be")]:
        with pytest.raises(MoscError, match=says):
            load_corpus("synthetic", **kw)
        with pytest.raises(MoscError, match=says):
            load_corpus(str(tmp_path / "nothing_"), **kw)  # before looking for files, too


def test_corpus_file_with_bom_and_bad_bytes(tmp_path):
    (tmp_path / "bom.en").write_bytes(BOM + "a b\nc d\n".encode())
    assert read_lines(tmp_path / "bom.en") == ["a b", "c d"]
    (tmp_path / "latin.en").write_bytes("one\ntwo\ncafé au lait\n".encode("latin-1"))
    with pytest.raises(MoscError, match=r"latin\.en:3: not UTF-8"):
        read_lines(tmp_path / "latin.en")


# ---------------------------------------------------------------- batching


def test_batches_respect_budget_and_cover_everything(syn):
    it = BatchIterator(syn.train, max_tokens=300, max_len=40, seed=1)
    seen = []
    for b in it:
        B, S = b.src.shape
        T = b.tgt_in.shape[1]
        assert B * max(S, T) <= 300
        assert b.tgt_in.shape == b.tgt_out.shape == (B, T)
        for r in range(B):
            i = int(b.idx[r])
            n = len(syn.train.tgt[i])
            assert b.tgt_in[r, : n + 1].tolist() == [BOS_ID, *syn.train.tgt[i]]
            assert b.tgt_out[r, : n + 1].tolist() == [*syn.train.tgt[i], EOS_ID]
            assert (b.tgt_out[r, n + 1 :] == PAD_ID).all()
            assert b.src[r, : len(syn.train.src[i])].tolist() == syn.train.src[i]
        assert b.n_tokens == sum(len(syn.train.tgt[int(i)]) + 1 for i in b.idx)
        seen += b.idx.tolist()
    assert sorted(seen) == list(range(len(syn.train)))
    assert it.epoch == 1 and it.position == 0


def test_max_len_filter_and_truncate(syn):
    long_ = sum(max(len(s), len(t)) > 8 for s, t in zip(syn.train.src, syn.train.tgt))
    it = BatchIterator(syn.train, max_tokens=200, max_len=8)
    assert it.n_dropped == long_ > 0
    assert all(b.src.shape[1] <= 8 and b.tgt_in.shape[1] <= 9 for b in it)
    ev = eval_batches(syn.val, max_tokens=200, max_len=8)
    assert sorted(i for b in ev for i in b.idx.tolist()) == list(range(len(syn.val)))
    with pytest.raises(MoscError, match="max_tokens"):
        BatchIterator(syn.train, max_tokens=8, max_len=8)


def test_epochs_differ_and_are_reproducible(syn):
    a = BatchIterator(syn.train, 400, seed=3)
    e0, e1 = [b.idx.tolist() for b in a], [b.idx.tolist() for b in a]
    assert e0 != e1 and sorted(map(tuple, e0)) == sorted(map(tuple, e1))  # same batches, new order
    b = BatchIterator(syn.train, 400, seed=3)
    assert [x.idx.tolist() for x in b] == e0


def test_resume_mid_epoch_is_identical(syn):
    full = BatchIterator(syn.train, 400, seed=5)
    ref = [b for _ in range(2) for b in full]  # two whole epochs
    run = BatchIterator(syn.train, 400, seed=5)
    stream = run.batches()
    k = len(run) + 7  # stop in the middle of epoch 1
    got = [next(stream) for _ in range(k)]
    state = run.state_dict()
    assert (state["epoch"], state["position"]) == (1, 7)
    resumed = BatchIterator(syn.train, 400, seed=5)
    resumed.load_state_dict(state)
    got += list(resumed)
    assert len(got) == len(ref)
    for x, y in zip(got, ref):
        assert all(torch.equal(getattr(x, f), getattr(y, f)) for f in ("src", "tgt_in", "tgt_out", "idx"))
    with pytest.raises(MoscError, match="cannot resume batches: seed"):
        BatchIterator(syn.train, 400, seed=6).load_state_dict(state)
    # Another budget can give as many batches, but different ones: refused too.
    other = next(it for m in range(401, 600) if len((it := BatchIterator(syn.train, m, seed=5)).plan) == len(run.plan))
    with pytest.raises(MoscError, match="cannot resume batches: max_tokens"):
        other.load_state_dict(state)


def test_ddp_sharding_disjoint_equal_counts(syn):
    world = 3
    ranks = [BatchIterator(syn.train, 300, seed=2, rank=r, world_size=world) for r in range(world)]
    for epoch in range(2):
        shards = [[tuple(b.idx.tolist()) for b in it] for it in ranks]
        assert len({len(s) for s in shards}) == 1 and len(shards[0]) == len(ranks[0])
        flat = [i for s in shards for batch in s for i in batch]
        assert len(flat) == len(set(flat))  # no pair on two ranks
        assert len(shards[0]) * world > len(ranks[0].plan) - world
    with pytest.raises(MoscError, match="rank"):
        BatchIterator(syn.train, 300, rank=3, world_size=3)


# ---------------------------------------------------------------- Multi30k (real data)


def test_shared_data_dir_is_the_repo_sibling():
    d = shared_data_dir()
    assert d is None or d == Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.skipif(
    shared_data_dir() is None or not (shared_data_dir() / "multi30k").is_dir(),
    reason="no ../shared/data/multi30k next to the repository (a fresh clone has none)",
)
def test_multi30k_loads_and_round_trips():
    d = load_corpus(str(shared_data_dir() / "multi30k"))
    assert (len(d.train), len(d.val), len(d.test)) == (29000, 1014, 1000)
    assert d.tokenizer.vocab_size == 8000
    assert d.train.src_text[0] == "Two young, White males are outside near many bushes."
    tok = d.tokenizer
    refs = d.test.src_text + d.test.tgt_text
    ok = sum(tok.decode(ids) == s for ids, s in zip(d.test.src + d.test.tgt, refs))
    assert ok == len(refs)
    mean_len = sum(map(len, d.train.tgt)) / len(d.train)
    assert 10 < mean_len < 20  # subwords, not characters

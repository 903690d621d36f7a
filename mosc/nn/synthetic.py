"""The built-in synthetic "language pair": seeded, made-up, and learnable on a CPU in minutes.

What this module does: generates (source, target) sentence pairs from a small grammar and
a fixed bilingual lexicon, in disjoint train/val/test splits drawn from a seed
(`synthetic_splits`, `SyntheticConfig`). The grammar is described below.

What it does NOT know: files, tokenizers, token ids, batches, torch or models. It returns
plain strings; `mosc.nn.corpus.load_corpus("synthetic")` turns them into a corpus.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from mosc.errors import MoscError


# Source grammar (made-up words, lower case, space separated):
#   sentence -> clause (CONJ clause)?
#   clause   -> NP VERB NP? (PREP NP)?          subject, verb, optional object, optional PP
#   NP       -> DET ADJ{0..max_adjs} NOUN
# Target = deterministic transformation of the source:
#   - every word maps through a fixed bilingual lexicon (different made-up words);
#   - NP:     DET ADJ1 ADJ2 NOUN  ->  DET' NOUN' ADJ2' ADJ1'   (adjectives after the noun, mirrored)
#   - DET' agrees with the noun's hidden gender (3 genders): needs a look-ahead over the adjectives;
#   - clause: S V O (P NP)        ->  S' O' NP' P' V'         (verb-final, postpositions)
#   - V' = verb stem + a suffix agreeing with the subject noun's gender: the last word of a
#     clause depends on a word up to ~10 positions earlier.
# Word-for-word it is easy; reordering and agreement need attention, and a larger lexicon
# needs more capacity, so BLEU separates small from large subnets.


@dataclass(frozen=True)
class SyntheticConfig:
    n_train: int = 10000  # training pairs
    n_val: int = 500  # validation pairs (generated first: fixed whatever n_train is)
    n_test: int = 500  # test pairs (generated second: fixed whatever n_train is)
    seed: int = 0  # which sentences are drawn (the language itself does not change)
    language_seed: int = 20240229  # which lexicon/genders: change only to get another language
    n_nouns: int = 48  # lexicon sizes: more words = more to memorize = needs more capacity
    n_adjs: int = 24
    n_verbs: int = 24
    n_preps: int = 8
    n_dets: int = 3
    n_conjs: int = 2
    n_genders: int = 3  # noun classes that determiners and verbs agree with in the target
    max_adjs: int = 2  # adjectives per noun phrase, uniform in 0..max_adjs
    p_object: float = 0.6  # probability a clause has an object
    p_pp: float = 0.4  # probability a clause has a prepositional phrase
    p_conj: float = 0.3  # probability a sentence has a second clause


# Syllables: the two sides look different, so nothing can be copied; the target uses
# umlauts so the non-ASCII path of the tokenizer is exercised like German.
_SRC_ONSETS, _SRC_VOWELS = "bdgklmnprstv", "aeiou"
_TGT_ONSETS, _TGT_VOWELS = ["f", "h", "j", "w", "z", "sch", "kr", "tz"], ["a", "e", "i", "o", "u", "ä", "ö", "ü"]


class _Language:
    """The fixed lexicon of one synthetic language pair (derived from language_seed only)."""

    def __init__(self, cfg: SyntheticConfig):
        rng = random.Random(cfg.language_seed)
        used: set[str] = set()

        def words(n: int, onsets: Sequence[str], vowels: Sequence[str], syllables: tuple[int, int]) -> list[str]:
            out = []
            while len(out) < n:
                w = "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(rng.randint(*syllables)))
                if w not in used:  # unique across every word class and both sides
                    used.add(w)
                    out.append(w)
            return out

        s, t = (_SRC_ONSETS, _SRC_VOWELS), (_TGT_ONSETS, _TGT_VOWELS)
        # Function words are short (1 syllable), content words longer, as in real languages.
        self.nouns = list(zip(words(cfg.n_nouns, *s, (2, 3)), words(cfg.n_nouns, *t, (2, 3))))
        self.adjs = list(zip(words(cfg.n_adjs, *s, (2, 3)), words(cfg.n_adjs, *t, (2, 3))))
        self.verbs = list(zip(words(cfg.n_verbs, *s, (2, 3)), words(cfg.n_verbs, *t, (2, 2))))
        self.preps = list(zip(words(cfg.n_preps, *s, (1, 2)), words(cfg.n_preps, *t, (1, 2))))
        self.conjs = list(zip(words(cfg.n_conjs, *s, (1, 1)), words(cfg.n_conjs, *t, (1, 2))))
        self.gender = [rng.randrange(cfg.n_genders) for _ in self.nouns]  # hidden noun class
        # A determiner has one target form per gender; a verb one suffix per gender.
        self.dets = [(w, words(cfg.n_genders, *t, (1, 1))) for w in words(cfg.n_dets, *s, (1, 1))]
        self.verb_suffix = ["", "ri", "lo", "ka", "ne", "tu"][: cfg.n_genders]
        if cfg.n_genders > len(self.verb_suffix):
            raise MoscError(f"synthetic: n_genders must be at most {len(self.verb_suffix)}")


def _synthetic_pair(lang: _Language, cfg: SyntheticConfig, rng: random.Random) -> tuple[str, str]:
    def np_() -> tuple[list[str], list[str], int]:
        det_src, det_tgt = rng.choice(lang.dets)
        k = rng.randrange(len(lang.nouns))
        adjs = [rng.choice(lang.adjs) for _ in range(rng.randint(0, cfg.max_adjs))]
        g = lang.gender[k]
        src = [det_src] + [a for a, _ in adjs] + [lang.nouns[k][0]]
        tgt = [det_tgt[g], lang.nouns[k][1]] + [b for _, b in reversed(adjs)]
        return src, tgt, g

    def clause() -> tuple[list[str], list[str]]:
        subj_s, subj_t, g = np_()
        verb_s, verb_t = rng.choice(lang.verbs)
        src, tgt = subj_s + [verb_s], list(subj_t)
        if rng.random() < cfg.p_object:
            obj_s, obj_t, _ = np_()
            src += obj_s
            tgt += obj_t
        if rng.random() < cfg.p_pp:
            prep_s, prep_t = rng.choice(lang.preps)
            pp_s, pp_t, _ = np_()
            src += [prep_s] + pp_s
            tgt += pp_t + [prep_t]
        tgt.append(verb_t + lang.verb_suffix[g])  # verb-final, agreeing with the subject
        return src, tgt

    src, tgt = clause()
    if rng.random() < cfg.p_conj:
        conj_s, conj_t = rng.choice(lang.conjs)
        src2, tgt2 = clause()
        src, tgt = src + [conj_s] + src2, tgt + [conj_t] + tgt2
    return " ".join(src), " ".join(tgt)


def synthetic_pairs(n: int, cfg: SyntheticConfig = SyntheticConfig()) -> tuple[list[str], list[str]]:
    """n distinct (source, target) sentence pairs drawn with cfg.seed, in a fixed order."""
    lang, rng = _Language(cfg), random.Random(cfg.seed)
    src, tgt, seen = [], [], set()
    attempts = 0
    while len(src) < n:
        attempts += 1
        if attempts > 20 * n + 1000:
            raise MoscError(f"synthetic: the grammar cannot produce {n} distinct sentences; enlarge the lexicon")
        s, t = _synthetic_pair(lang, cfg, rng)
        if s not in seen:  # distinct, so val/test never leak into train
            seen.add(s)
            src.append(s)
            tgt.append(t)
    return src, tgt


def synthetic_splits(cfg: SyntheticConfig = SyntheticConfig()) -> dict[str, tuple[list[str], list[str]]]:
    """{"train", "val", "test"} -> (source sentences, target sentences), disjoint, from cfg.seed.

    val and test are drawn first, so they stay the same when only n_train changes."""
    src, tgt = synthetic_pairs(cfg.n_val + cfg.n_test + cfg.n_train, cfg)
    a, b = cfg.n_val, cfg.n_val + cfg.n_test
    return {"val": (src[:a], tgt[:a]), "test": (src[a:b], tgt[a:b]), "train": (src[b:], tgt[b:])}

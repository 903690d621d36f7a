"""Encoder-only (BERT) architectures and search spaces: plain, frozen, hashable data.

The MoS/SuperShaper BERT space (MOS.md section 7): a fixed number of layers over a fixed
residual width W (the embedding width), and per layer one hidden size h_i. Layer i reads
the residual stream through a bottleneck W -> h_i, runs a Transformer layer of width h_i
(attention q/k/v of size h_i with a fixed head count, a fixed FFN size) and writes back
through h_i -> W. A `BertArch` is the tuple of per-layer hidden sizes; a `BertSpace` is
the set of choices, read from a TOML file with a `[bert]` table (built-ins `bert`, `bert-tiny`
live in `mosc/spaces/` next to the translation spaces).

A BertSpace offers what the evolutionary search uses from a space (sample, mutate,
crossover, largest, smallest, size, validate, name), so `mosc.search.evolve` works on it
unchanged; fitness is the validation MLM loss and the constraint a parameter count.

Knows nothing of torch, weights, data or devices.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from pathlib import Path

from mosc.errors import MoscError
from mosc.fileio import parse_json, read_json, read_toml
from mosc.space import (BUILTIN_DIR, MAX_ARCH_LAYERS, MAX_ARCH_VALUE, MAX_ARCHS_PER_REQUEST, MAX_SPACE_LAYERS, SearchSpace,
                        _arch_int, canonical_json)

BERT_TABLE = "bert"  # the TOML table that makes a space file an encoder-only space


@dataclass(frozen=True)
class BertArch:
    """One encoder-only subnet: the hidden size of each layer (the depth is the length)."""

    hidden: tuple[int, ...]

    def __post_init__(self):
        if isinstance(self.hidden, list):
            object.__setattr__(self, "hidden", tuple(self.hidden))
        if not self.hidden:
            raise MoscError("arch: hidden must list at least one layer")

    @property
    def layers(self) -> int:
        return len(self.hidden)

    def to_dict(self) -> dict:
        return {"hidden": list(self.hidden)}

    def to_json(self, indent: int | None = None) -> str:
        return canonical_json(self.to_dict(), indent)

    @property
    def hash(self) -> str:
        """Stable 16-hex-digit id (sha256 of the canonical JSON), as Arch.hash."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: dict) -> BertArch:
        if not isinstance(d, dict):
            raise MoscError(f"arch: expected a JSON object, got {type(d).__name__}")
        if set(d) != {"hidden"}:
            raise MoscError(f"arch: an encoder-only arch has exactly the field ['hidden'], got {sorted(d)}")
        v = d["hidden"]
        if not (isinstance(v, (list, tuple)) and 0 < len(v) <= MAX_ARCH_LAYERS and all(map(_arch_int, v))):
            shown = repr(v) if len(repr(v)) <= 60 else repr(v)[:57] + "..."
            raise MoscError(f"arch: field 'hidden' must be a list of 1 to {MAX_ARCH_LAYERS} whole numbers "
                            f"from 1 to {MAX_ARCH_VALUE:,}, got {shown}")
        return cls(tuple(v))

    @classmethod
    def from_json(cls, text: str, where: str = "arch") -> BertArch:
        return cls.from_dict(parse_json(text, where, expect=dict))

    @classmethod
    def load(cls, path: str | Path) -> BertArch:
        d = read_json(path, "arch file", expect=dict)
        try:
            return cls.from_dict(d)
        except MoscError as e:
            raise MoscError(f"arch file {path}: {str(e).removeprefix('arch: ')}") from None


@dataclass(frozen=True)
class BertSpace:
    """The choices of an encoder-only space. `hidden` is sorted ascending."""

    name: str
    description: str
    width: int  # W: the residual stream and embedding width (fixed)
    layers: int  # number of layers (fixed, as in the paper's space)
    hidden: tuple[int, ...]  # per-layer hidden size choices h
    heads: int  # attention heads in every layer (fixed); the head dim is h / heads
    ffn_dim: int  # FFN hidden size in every layer (fixed)

    @classmethod
    def from_dict(cls, d: dict, where: str = "space") -> BertSpace:
        if not isinstance(d, dict) or not isinstance(d.get(BERT_TABLE), dict):
            raise MoscError(f"{where}: an encoder-only space needs a [{BERT_TABLE}] table")
        t = d[BERT_TABLE]

        def one(key: str, top: int = MAX_ARCH_VALUE) -> int:
            v = t.get(key)
            if not (_arch_int(v) and v <= top):
                raise MoscError(f"{where}: [{BERT_TABLE}] {key} must be a whole number from 1 to {top:,}, got {v!r}")
            return v

        h = t.get("hidden")
        if not isinstance(h, list) or not h or not all(_arch_int(x) for x in h):
            shown = repr(h) if len(repr(h)) <= 60 else repr(h)[:57] + "..."
            raise MoscError(f"{where}: [{BERT_TABLE}] hidden must be a non-empty list of whole numbers "
                            f"from 1 to {MAX_ARCH_VALUE:,}, got {shown}")
        space = cls(name=str(d.get("name", where)), description=str(d.get("description", "")), width=one("width"),
                    layers=one("layers", MAX_SPACE_LAYERS), hidden=tuple(sorted(set(h))), heads=one("heads"),
                    ffn_dim=one("ffn_dim"))
        bad = [x for x in space.hidden if x % space.heads]
        if bad:
            raise MoscError(f"{where}: hidden sizes {bad} are not divisible by heads = {space.heads}")
        return space

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description,
                BERT_TABLE: {"width": self.width, "layers": self.layers, "hidden": list(self.hidden),
                             "heads": self.heads, "ffn_dim": self.ffn_dim}}

    @classmethod
    def load(cls, name_or_path: str | Path) -> BertSpace:
        space = load_space(name_or_path)
        if not isinstance(space, BertSpace):
            raise MoscError(f"search space {space.name!r} is a translation space; this needs an encoder-only "
                            f"(BERT) space such as bert-tiny")
        return space

    # ---- size and extremes ------------------------------------------------------------
    def size(self) -> int:
        return len(self.hidden) ** self.layers

    def check_count(self, n, what: str = "the number of archs", distinct: bool = True) -> int:
        size = self.size() if distinct else MAX_ARCHS_PER_REQUEST
        limit = min(size, MAX_ARCHS_PER_REQUEST)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limit:
            shown = f"{n:,}" if isinstance(n, int) and not isinstance(n, bool) else repr(n)
            raise MoscError(f"{what} must be from 1 to {limit:,} (space {self.name!r}), got {shown}")
        return n

    def sample_distinct(self, n: int, seed: int, what: str = "the number of archs") -> list[BertArch]:
        self.check_count(n, what)
        rng, out, seen = random.Random(seed), [], set()
        for _ in range(n * 50):
            a = self.sample(rng)
            if a not in seen:
                seen.add(a)
                out.append(a)
                if len(out) == n:
                    return out
        raise MoscError(f"space {self.name!r}: found only {len(out):,} distinct archs in {n * 50:,} draws; ask for fewer")

    def largest(self) -> BertArch:
        return BertArch((max(self.hidden),) * self.layers)

    def smallest(self) -> BertArch:
        return BertArch((min(self.hidden),) * self.layers)

    def uniform(self, h: int) -> BertArch:
        """Every layer at hidden size h (a choice of the space)."""
        return self.validate(BertArch((h,) * self.layers))

    def covering_archs(self) -> list[BertArch]:
        """Few archs whose layers, together, show every per-layer choice the compiled graph
        depends on: one uniform arch per hidden size h.

        Why this covers the space's kernels: width, heads and FFN are fixed, the exported
        graph keeps each layer's tensors apart, and TVM fuses within a layer's pieces (the
        bottlenecks, attention, FFN, cut at the LayerNorms and at the W-wide residual
        stream), so a kernel depends on its own layer's h and the fixed shapes, never on the
        neighbours' h, depth or position. `mosc tune --space` also compiles a few random
        archs and reports what they add (0)."""
        return [self.uniform(h) for h in self.hidden]

    # ---- validation ---------------------------------------------------------------------
    def validate(self, arch: BertArch) -> BertArch:
        if not isinstance(arch, BertArch):
            raise MoscError(f"arch outside space {self.name!r}: a translation arch, but this is an encoder-only space")
        if arch.layers != self.layers:
            raise MoscError(f"arch outside space {self.name!r}: {arch.layers} layers, the space has {self.layers}")
        for i, h in enumerate(arch.hidden):
            if h not in self.hidden:
                raise MoscError(f"arch outside space {self.name!r}: hidden[{i}] = {h}, allowed: {list(self.hidden)}")
        return arch

    def contains(self, arch) -> bool:
        try:
            self.validate(arch)
            return True
        except MoscError:
            return False

    # ---- sampling and evolution ----------------------------------------------------------
    def sample(self, rng: random.Random) -> BertArch:
        return BertArch(tuple(rng.choice(self.hidden) for _ in range(self.layers)))

    def mutate(self, arch: BertArch, rng: random.Random, prob: float = 0.3) -> BertArch:
        """Each layer's hidden size is resampled with probability `prob` (HAT's mutation)."""
        return BertArch(tuple(rng.choice(self.hidden) if rng.random() < prob else h for h in arch.hidden))

    def crossover(self, a: BertArch, b: BertArch, rng: random.Random) -> BertArch:
        return BertArch(tuple(x if rng.random() < 0.5 else y for x, y in zip(a.hidden, b.hidden)))

    # ---- encodings ----------------------------------------------------------------------
    def encode(self, arch: BertArch) -> list[float]:
        """The router input: every layer's hidden size divided by the largest choice ([layers])."""
        top = max(self.hidden)
        return [h / top for h in arch.hidden]

    def summary(self) -> dict:
        size = self.size()
        return {"name": self.name, "size": size, "log10_size": math.log10(size), **self.to_dict()}


def param_count(arch: BertArch, space: BertSpace, vocab_size: int, n_classes: int = 0) -> int:
    """Parameters of the static encoder of `arch`, counted from the arch alone: embedding
    [V, W] (tied with the MLM output, whose bias [V] counts), per layer the bottlenecks
    W -> h -> W, attention (4 h x h), FFN (h x F twice), two LayerNorms of h; the final
    LayerNorm; and, with n_classes, the classifier W -> n_classes. mosc.nn.bert's static
    encoder has exactly this many parameters (a test checks it)."""
    W, F, V = space.width, space.ffn_dim, vocab_size
    n = V * W + V + 2 * W  # embedding, MLM output bias, final LayerNorm
    for h in arch.hidden:
        n += (W * h + h) + (h * W + W)  # down and up bottlenecks
        n += 4 * (h * h + h)  # q, k, v, out
        n += (h * F + F) + (F * h + h)  # FFN
        n += 2 * 2 * h  # two LayerNorms
    if n_classes:
        n += W * n_classes + n_classes
    return n


def load_space(name_or_path: str | Path) -> SearchSpace | BertSpace:
    """A built-in space by name or a TOML file, translation or encoder-only by its tables."""
    from mosc.space import builtin_spaces

    path = Path(name_or_path)
    if path.suffix != ".toml":
        if str(name_or_path) not in builtin_spaces():
            raise MoscError(f"unknown search space {str(name_or_path)!r}; built-ins: {', '.join(builtin_spaces())} (or give a .toml path)")
        path = BUILTIN_DIR / f"{name_or_path}.toml"
    d = read_toml(path, "search space")
    if isinstance(d, dict) and BERT_TABLE in d:
        return BertSpace.from_dict(d, where=f"search space {path}")
    return SearchSpace.from_dict(d, where=f"search space {path}")


def is_bert_space(name_or_path: str | Path) -> bool:
    """Whether a space name or file is encoder-only (reads the file; errors as load_space)."""
    return isinstance(load_space(name_or_path), BertSpace)

"""Architectures and search spaces: plain, frozen, hashable data.

An `Arch` is one subnet of the supernet: embed dims, one FFN dim / head count per
layer, and per decoder layer the "arbitrary attention" choice k (attend to the last k
encoder layers). A `SearchSpace` is the set of choices for each of those, read from a
TOML file (built-ins live in `mosc/spaces/`).

This module knows nothing of torch, weights, latency or devices: it is pure Python, so
the search world can use it without importing a framework.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from mosc.errors import MoscError
from mosc.fileio import parse_json, read_json, read_toml

BUILTIN_DIR = Path(__file__).resolve().parent / "spaces"

# Per-layer fields of an Arch, with the SearchSpace field that holds their choices.
ENC_LAYER_FIELDS = {"enc_ffn": "enc_ffn", "enc_heads": "enc_heads"}
DEC_LAYER_FIELDS = {
    "dec_ffn": "dec_ffn",
    "dec_heads": "dec_heads",
    "dec_cross_heads": "dec_cross_heads",
    "dec_arbitrary": "dec_arbitrary",
}


MAX_ARCH_VALUE = 1_000_000  # no dim, head count or k of any arch comes near this
MAX_ARCH_LAYERS = 1000  # per-layer lists longer than this are not archs
MAX_SPACE_LAYERS = 64  # most layers (and k of arbitrary attention) a space may offer
MAX_ARCHS_PER_REQUEST = 100_000  # most archs one command may ask for (sample, measure, search)


def _arch_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_ARCH_VALUE


def canonical_json(d: dict, indent: int | None = None) -> str:
    """Sorted keys, no spaces (unless indent): equal archs give equal strings, hence equal hashes."""
    if indent is None:
        return json.dumps(d, sort_keys=True, separators=(",", ":"))
    return json.dumps(d, sort_keys=True, indent=indent)


@dataclass(frozen=True)
class Arch:
    """One subnet. The number of encoder (decoder) layers is the length of the per-layer tuples."""

    enc_embed: int
    enc_ffn: tuple[int, ...]  # FFN hidden dim of each encoder layer
    enc_heads: tuple[int, ...]  # self-attention heads of each encoder layer
    dec_embed: int
    dec_ffn: tuple[int, ...]  # FFN hidden dim of each decoder layer
    dec_heads: tuple[int, ...]  # self-attention heads of each decoder layer
    dec_cross_heads: tuple[int, ...]  # encoder-decoder attention heads of each decoder layer
    dec_arbitrary: tuple[int, ...]  # k: each decoder layer attends to the last k encoder layers

    def __post_init__(self):
        for name in ("enc_ffn", "enc_heads", *DEC_LAYER_FIELDS):
            value = getattr(self, name)
            if isinstance(value, list):  # accept lists, store tuples (hashable)
                object.__setattr__(self, name, tuple(value))
        if len(self.enc_ffn) != len(self.enc_heads) or not self.enc_ffn:
            raise MoscError(
                f"arch: enc_ffn and enc_heads must be non-empty and of equal length "
                f"(got {len(self.enc_ffn)} and {len(self.enc_heads)})"
            )
        lens = {name: len(getattr(self, name)) for name in DEC_LAYER_FIELDS}
        if len(set(lens.values())) != 1 or not self.dec_ffn:
            raise MoscError(f"arch: decoder per-layer lists must be non-empty and of equal length (got {lens})")

    @property
    def enc_layers(self) -> int:
        return len(self.enc_ffn)

    @property
    def dec_layers(self) -> int:
        return len(self.dec_ffn)

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in dataclasses.fields(self)}

    def to_json(self, indent: int | None = None) -> str:
        return canonical_json(self.to_dict(), indent)

    @property
    def hash(self) -> str:
        """Stable 16-hex-digit id (sha256 of the canonical JSON), the same in every process."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: dict) -> Arch:
        if not isinstance(d, dict):
            raise MoscError(f"arch: expected a JSON object, got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in d]
        unknown = [k for k in d if k not in names]
        if missing or unknown:
            raise MoscError(f"arch: missing fields {missing}, unknown fields {unknown}; expected exactly {names}")
        for n in names:
            v = d[n]
            if n.endswith("_embed"):
                ok = _arch_int(v)
            else:
                ok = isinstance(v, (list, tuple)) and 0 < len(v) <= MAX_ARCH_LAYERS and all(map(_arch_int, v))
            if not ok:
                kind = "a whole number" if n.endswith("_embed") else f"a list of 1 to {MAX_ARCH_LAYERS} whole numbers"
                shown = repr(v) if len(repr(v)) <= 60 else repr(v)[:57] + "..."
                raise MoscError(f"arch: field {n!r} must be {kind} from 1 to {MAX_ARCH_VALUE:,}, got {shown}")
        return cls(**{n: d[n] for n in names})

    @classmethod
    def from_json(cls, text: str, where: str = "arch") -> Arch:
        return cls.from_dict(parse_json(text, where, expect=dict))

    @classmethod
    def load(cls, path: str | Path) -> Arch:
        """An arch JSON file; anything unreadable or malformed is one line naming the file."""
        d = read_json(path, "arch file", expect=dict)
        try:
            return cls.from_dict(d)
        except MoscError as e:
            raise MoscError(f"arch file {path}: {str(e).removeprefix('arch: ')}") from None

    def hat_features(self) -> list[float]:
        """HAT's 10 summary features, raw (unnormalised), in HAT's CSV column order."""
        mean = lambda xs: sum(xs) / len(xs)
        return [
            float(self.enc_embed), float(self.enc_layers), mean(self.enc_ffn), mean(self.enc_heads),
            float(self.dec_embed), float(self.dec_layers), mean(self.dec_ffn), mean(self.dec_heads),
            mean(self.dec_cross_heads), mean(self.dec_arbitrary),
        ]


HAT_FEATURE_NAMES = [
    "encoder_embed_dim", "encoder_layer_num", "encoder_ffn_embed_dim_avg", "encoder_self_attention_heads_avg",
    "decoder_embed_dim", "decoder_layer_num", "decoder_ffn_embed_dim_avg", "decoder_self_attention_heads_avg",
    "decoder_ende_attention_heads_avg", "decoder_arbitrary_ende_attn_avg",
]


@dataclass(frozen=True)
class SearchSpace:
    """The choices for every dimension of an Arch. All tuples are sorted ascending."""

    name: str
    description: str
    qkv_dim: int  # fixed attention projection size (HAT: 512); heads only change the head dim
    enc_embed: tuple[int, ...]
    enc_layers: tuple[int, ...]
    enc_ffn: tuple[int, ...]
    enc_heads: tuple[int, ...]
    dec_embed: tuple[int, ...]
    dec_layers: tuple[int, ...]
    dec_ffn: tuple[int, ...]
    dec_heads: tuple[int, ...]
    dec_cross_heads: tuple[int, ...]
    dec_arbitrary: tuple[int, ...]

    # ---- loading -----------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict, where: str = "space") -> SearchSpace:
        if not isinstance(d, dict):
            raise MoscError(f"{where}: a search space is a table of settings, not {type(d).__name__}")
        if "bert" in d:  # mosc.bert_space.BERT_TABLE (that module imports this one)
            raise MoscError(f"{where}: an encoder-only (BERT) space; this needs a translation space such as tiny or wmt")

        def choices(section: str, key: str) -> tuple[int, ...]:
            try:
                v = d[section][key]
            except (KeyError, TypeError, IndexError):
                raise MoscError(f"{where}: missing [{section}] {key}") from None
            top = MAX_SPACE_LAYERS if key in ("layers", "arbitrary_attn") else MAX_ARCH_VALUE
            if not isinstance(v, list) or not v or not all(_arch_int(x) and x <= top for x in v):
                shown = repr(v) if len(repr(v)) <= 60 else repr(v)[:57] + "..."
                raise MoscError(f"{where}: [{section}] {key} must be a non-empty list of whole numbers "
                                f"from 1 to {top:,}, got {shown}")
            return tuple(sorted(set(v)))

        qkv = d.get("qkv_dim")
        if not _arch_int(qkv):
            raise MoscError(f"{where}: qkv_dim must be a whole number from 1 to {MAX_ARCH_VALUE:,}, got {qkv!r}")
        space = cls(
            name=str(d.get("name", where)),
            description=str(d.get("description", "")),
            qkv_dim=qkv,
            enc_embed=choices("encoder", "embed_dim"),
            enc_layers=choices("encoder", "layers"),
            enc_ffn=choices("encoder", "ffn_dim"),
            enc_heads=choices("encoder", "heads"),
            dec_embed=choices("decoder", "embed_dim"),
            dec_layers=choices("decoder", "layers"),
            dec_ffn=choices("decoder", "ffn_dim"),
            dec_heads=choices("decoder", "heads"),
            dec_cross_heads=choices("decoder", "cross_heads"),
            dec_arbitrary=choices("decoder", "arbitrary_attn"),
        )
        for h in {*space.enc_heads, *space.dec_heads, *space.dec_cross_heads}:
            if qkv % h:
                raise MoscError(f"{where}: qkv_dim {qkv} is not divisible by head count {h}")
        if min(space.dec_arbitrary) > min(space.enc_layers):
            raise MoscError(f"{where}: no arbitrary_attn choice fits {min(space.enc_layers)} encoder layer(s)")
        return space

    def to_dict(self) -> dict:
        """The TOML layout, as a dict (round-trips through from_dict)."""
        return {
            "name": self.name, "description": self.description, "qkv_dim": self.qkv_dim,
            "encoder": {"embed_dim": list(self.enc_embed), "layers": list(self.enc_layers),
                        "ffn_dim": list(self.enc_ffn), "heads": list(self.enc_heads)},
            "decoder": {"embed_dim": list(self.dec_embed), "layers": list(self.dec_layers),
                        "ffn_dim": list(self.dec_ffn), "heads": list(self.dec_heads),
                        "cross_heads": list(self.dec_cross_heads), "arbitrary_attn": list(self.dec_arbitrary)},
        }

    @classmethod
    def load(cls, name_or_path: str | Path) -> SearchSpace:
        """A built-in space by name (`tiny`, `wmt`) or a TOML file by path."""
        path = Path(name_or_path)
        if not path.suffix == ".toml":
            if str(name_or_path) not in builtin_spaces():  # a name, never a path out of BUILTIN_DIR
                raise MoscError(f"unknown search space {str(name_or_path)!r}; built-ins: {', '.join(builtin_spaces())} (or give a .toml path)")
            path = BUILTIN_DIR / f"{name_or_path}.toml"
        return cls.from_dict(read_toml(path, "search space"), where=f"search space {path}")

    # ---- size and extremes -------------------------------------------------------
    def arbitrary_choices(self, enc_layers: int) -> tuple[int, ...]:
        """A decoder layer cannot attend to more encoder layers than exist."""
        return tuple(k for k in self.dec_arbitrary if k <= enc_layers)

    def size(self) -> int:
        """Number of distinct archs (exact integer)."""
        enc_layer_opts = len(self.enc_ffn) * len(self.enc_heads)
        dec_base = len(self.dec_ffn) * len(self.dec_heads) * len(self.dec_cross_heads)
        total = 0
        for le in self.enc_layers:
            per_dec_layer = dec_base * len(self.arbitrary_choices(le))
            total += enc_layer_opts**le * sum(per_dec_layer**ld for ld in self.dec_layers)
        return total * len(self.enc_embed) * len(self.dec_embed)

    def check_count(self, n, what: str = "the number of archs", distinct: bool = True) -> int:
        """n, if a request for n archs (n distinct ones unless `distinct` is False) can be met:
        every command that makes, measures or searches archs one by one asks this first, so a
        typo such as -n 1000000000 is one line instead of a run that never ends."""
        size = self.size() if distinct else MAX_ARCHS_PER_REQUEST
        limit = min(size, MAX_ARCHS_PER_REQUEST)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limit:
            why = (f"space {self.name!r} holds only {size:,} distinct archs" if size < MAX_ARCHS_PER_REQUEST
                   else f"at most {MAX_ARCHS_PER_REQUEST:,} archs per request")
            shown = f"{n:,}" if isinstance(n, int) and not isinstance(n, bool) else repr(n)
            raise MoscError(f"{what} must be from 1 to {limit:,} ({why}), got {shown}")
        return n

    def sample_distinct(self, n: int, seed: int, what: str = "the number of archs") -> list[Arch]:
        """n distinct archs, the same for the same (space, n, seed); refuses an n the space
        cannot meet, and gives up (one line) after 50 draws per arch asked for."""
        self.check_count(n, what)
        rng, out, seen = random.Random(seed), [], set()
        for _ in range(n * 50):
            a = self.sample(rng)
            if a not in seen:
                seen.add(a)
                out.append(a)
                if len(out) == n:
                    return out
        raise MoscError(f"space {self.name!r}: found only {len(out):,} distinct archs in {n * 50:,} draws with "
                        f"seed {seed}; ask for fewer")

    def largest(self) -> Arch:
        le, ld = max(self.enc_layers), max(self.dec_layers)
        return Arch(
            enc_embed=max(self.enc_embed), enc_ffn=(max(self.enc_ffn),) * le, enc_heads=(max(self.enc_heads),) * le,
            dec_embed=max(self.dec_embed), dec_ffn=(max(self.dec_ffn),) * ld, dec_heads=(max(self.dec_heads),) * ld,
            dec_cross_heads=(max(self.dec_cross_heads),) * ld, dec_arbitrary=(max(self.arbitrary_choices(le)),) * ld,
        )

    def smallest(self) -> Arch:
        le, ld = min(self.enc_layers), min(self.dec_layers)
        return Arch(
            enc_embed=min(self.enc_embed), enc_ffn=(min(self.enc_ffn),) * le, enc_heads=(min(self.enc_heads),) * le,
            dec_embed=min(self.dec_embed), dec_ffn=(min(self.dec_ffn),) * ld, dec_heads=(min(self.dec_heads),) * ld,
            dec_cross_heads=(min(self.dec_cross_heads),) * ld, dec_arbitrary=(min(self.dec_arbitrary),) * ld,
        )

    def covering_archs(self) -> list[Arch]:
        """Few archs whose layers, together, show every per-layer choice the compiled graphs
        depend on: for each (encoder embed, decoder embed) pair, every encoder (heads) and
        (FFN), every decoder (heads), (cross heads, arbitrary-attention count) and (FFN).

        Why this covers the space's kernels: the exported graphs keep each layer's tensors
        apart (mosc/nn/subnet.py), and TVM fuses within a sub-layer (attention or FFN, cut at
        the LayerNorms), so a kernel depends on its sub-layer's choices, the two embed dims and
        the protocol's fixed lengths, never on depth or position. Choices of one sub-layer
        are cycled together (Latin-square style), not crossed with the other sub-layers'.
        `mosc tune --space` also compiles a few random archs and reports what they add (0).
        """
        le, ld = max(self.enc_layers), max(self.dec_layers)
        enc_opts = _cycled(self.enc_heads, self.enc_ffn)  # [(heads, ffn)] per encoder layer
        cross = [(hc, k) for hc in self.dec_cross_heads for k in self.arbitrary_choices(le)]
        dec_opts = _cycled(self.dec_heads, cross, self.dec_ffn)  # [(heads, (cross_heads, k), ffn)]
        n = max(-(-len(enc_opts) // le), -(-len(dec_opts) // ld))  # archs per embed pair
        archs = []
        for de in self.enc_embed:
            for dd in self.dec_embed:
                for a in range(n):
                    enc = [enc_opts[(a * le + j) % len(enc_opts)] for j in range(le)]
                    dec = [dec_opts[(a * ld + j) % len(dec_opts)] for j in range(ld)]
                    archs.append(Arch(
                        enc_embed=de, enc_heads=tuple(h for h, _ in enc), enc_ffn=tuple(f for _, f in enc),
                        dec_embed=dd, dec_heads=tuple(h for h, _, _ in dec),
                        dec_cross_heads=tuple(c[0] for _, c, _ in dec), dec_arbitrary=tuple(c[1] for _, c, _ in dec),
                        dec_ffn=tuple(f for _, _, f in dec)))
        return [self.validate(a) for a in archs]

    # ---- validation ----------------------------------------------------------------
    def validate(self, arch: Arch) -> Arch:
        """Return arch unchanged, or raise MoscError naming the first field outside the space."""
        def check(field: str, value: int, allowed: tuple[int, ...], layer: int | None = None):
            if value not in allowed:
                where = f"{field}[{layer}]" if layer is not None else field
                raise MoscError(f"arch outside space {self.name!r}: {where} = {value}, allowed: {list(allowed)}")

        check("enc_embed", arch.enc_embed, self.enc_embed)
        check("dec_embed", arch.dec_embed, self.dec_embed)
        check("encoder layers (len(enc_ffn))", arch.enc_layers, self.enc_layers)
        check("decoder layers (len(dec_ffn))", arch.dec_layers, self.dec_layers)
        for field in ENC_LAYER_FIELDS:
            for i, v in enumerate(getattr(arch, field)):
                check(field, v, getattr(self, field), i)
        allowed = {**{f: getattr(self, f) for f in DEC_LAYER_FIELDS}, "dec_arbitrary": self.arbitrary_choices(arch.enc_layers)}
        for field in DEC_LAYER_FIELDS:
            for i, v in enumerate(getattr(arch, field)):
                check(field, v, allowed[field], i)
        return arch

    def fits_hat_features(self, features) -> bool:
        """Whether HAT's 10 summary features (a row imported without its arch) can come from
        this space: its embed dims and layer counts are choices here."""
        f = dict(zip(HAT_FEATURE_NAMES, features))
        return (f["encoder_embed_dim"] in self.enc_embed and f["decoder_embed_dim"] in self.dec_embed
                and f["encoder_layer_num"] in self.enc_layers and f["decoder_layer_num"] in self.dec_layers)

    def contains(self, arch: Arch) -> bool:
        try:
            self.validate(arch)
            return True
        except MoscError:
            return False

    # ---- sampling and evolution ---------------------------------------------------
    def sample(self, rng: random.Random) -> Arch:
        le, ld = rng.choice(self.enc_layers), rng.choice(self.dec_layers)
        arb = self.arbitrary_choices(le)
        return Arch(
            enc_embed=rng.choice(self.enc_embed),
            enc_ffn=tuple(rng.choice(self.enc_ffn) for _ in range(le)),
            enc_heads=tuple(rng.choice(self.enc_heads) for _ in range(le)),
            dec_embed=rng.choice(self.dec_embed),
            dec_ffn=tuple(rng.choice(self.dec_ffn) for _ in range(ld)),
            dec_heads=tuple(rng.choice(self.dec_heads) for _ in range(ld)),
            dec_cross_heads=tuple(rng.choice(self.dec_cross_heads) for _ in range(ld)),
            dec_arbitrary=tuple(rng.choice(arb) for _ in range(ld)),
        )

    def mutate(self, arch: Arch, rng: random.Random, prob: float = 0.3) -> Arch:
        """HAT's mutation: every gene (embed dims, layer counts, each per-layer value) is
        resampled with probability `prob`; layers added by a deeper count are sampled fresh."""
        pick = lambda cur, choices: rng.choice(choices) if rng.random() < prob else cur
        le = pick(arch.enc_layers, self.enc_layers)
        ld = pick(arch.dec_layers, self.dec_layers)
        arb = self.arbitrary_choices(le)

        def layers(values: tuple[int, ...], choices: tuple[int, ...], n: int) -> tuple[int, ...]:
            return tuple(pick(values[i], choices) if i < len(values) else rng.choice(choices) for i in range(n))

        dec_arbitrary = tuple(k if k in arb else rng.choice(arb) for k in layers(arch.dec_arbitrary, arb, ld))
        return Arch(
            enc_embed=pick(arch.enc_embed, self.enc_embed),
            enc_ffn=layers(arch.enc_ffn, self.enc_ffn, le),
            enc_heads=layers(arch.enc_heads, self.enc_heads, le),
            dec_embed=pick(arch.dec_embed, self.dec_embed),
            dec_ffn=layers(arch.dec_ffn, self.dec_ffn, ld),
            dec_heads=layers(arch.dec_heads, self.dec_heads, ld),
            dec_cross_heads=layers(arch.dec_cross_heads, self.dec_cross_heads, ld),
            dec_arbitrary=dec_arbitrary,
        )

    def crossover(self, a: Arch, b: Arch, rng: random.Random) -> Arch:
        """Uniform crossover: each gene from either parent; layer i comes from a parent that has it."""
        either = lambda x, y: x if rng.random() < 0.5 else y
        le, ld = either(a.enc_layers, b.enc_layers), either(a.dec_layers, b.dec_layers)

        def layers(field: str, n: int) -> tuple[int, ...]:
            va, vb = getattr(a, field), getattr(b, field)
            return tuple(
                either(va[i], vb[i]) if i < len(va) and i < len(vb) else (va[i] if i < len(va) else vb[i])
                for i in range(n)
            )

        arb = self.arbitrary_choices(le)
        return Arch(
            enc_embed=either(a.enc_embed, b.enc_embed),
            enc_ffn=layers("enc_ffn", le), enc_heads=layers("enc_heads", le),
            dec_embed=either(a.dec_embed, b.dec_embed),
            dec_ffn=layers("dec_ffn", ld), dec_heads=layers("dec_heads", ld),
            dec_cross_heads=layers("dec_cross_heads", ld),
            dec_arbitrary=tuple(k if k in arb else max(arb) for k in layers("dec_arbitrary", ld)),
        )

    # ---- encodings -------------------------------------------------------------------
    def hat_scale(self) -> list[float]:
        """Divisors that map hat_features into ~[0, 1] for this space (the maxima of each feature)."""
        return [
            max(self.enc_embed), max(self.enc_layers), max(self.enc_ffn), max(self.enc_heads),
            max(self.dec_embed), max(self.dec_layers), max(self.dec_ffn), max(self.dec_heads),
            max(self.dec_cross_heads), max(self.dec_arbitrary),
        ]

    def encode(self, arch: Arch) -> list[float]:
        """HAT's 10-feature encoding, normalised by the space maxima. The MoS router input."""
        return [f / s for f, s in zip(arch.hat_features(), self.hat_scale())]

    def encode_layers(self, arch: Arch) -> list[float]:
        """A finer encoding: embed dims and depths, then every layer's choices (0 for absent
        layers), each divided by its maximum. Length 4 + 2*max_enc + 4*max_dec."""
        le, ld = max(self.enc_layers), max(self.dec_layers)
        out = [arch.enc_embed / max(self.enc_embed), arch.dec_embed / max(self.dec_embed),
               arch.enc_layers / le, arch.dec_layers / ld]
        for field in ENC_LAYER_FIELDS:
            vals, top = getattr(arch, field), max(getattr(self, field))
            out += [vals[i] / top if i < len(vals) else 0.0 for i in range(le)]
        for field in DEC_LAYER_FIELDS:
            vals, top = getattr(arch, field), max(getattr(self, field))
            out += [vals[i] / top if i < len(vals) else 0.0 for i in range(ld)]
        return out

    def summary(self) -> dict:
        """Human-facing facts: choices per dimension and the size."""
        size = self.size()
        return {"name": self.name, "size": size, "log10_size": math.log10(size), **self.to_dict()}


def builtin_spaces() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.toml"))


def _cycled(*choices: tuple) -> list[tuple]:
    """Rows that show every value of each choice list at least once, the lists cycled side by
    side: _cycled((2, 4), (128, 256, 512)) -> [(2, 128), (4, 256), (2, 512)]."""
    n = max(len(c) for c in choices)
    return [tuple(c[i % len(c)] for c in choices) for i in range(n)]

"""The deployable subnet: a plain Transformer of exactly one arch's dims, and `collapse`.

`collapse(supernet, arch)` evaluates every router once (eval mode, no dropout), mixes and
slices the expert weights, and copies the result into a `Subnet` whose parameters are
ordinary static tensors: no router, no unused expert, no unused slice. It computes the
same function as `supernet(src, tgt_in, arch)` (the core test of the project).

Deployment interface (static shapes, what export and compile consume), one tensor per
decoder layer i and nothing stacked over layers (mosc.contract names them):
  encode(src [B, S])                      -> per layer: cross_k_i, cross_v_i [B, k_i*S, Q],
                                             cross_bias_i [B, 1, 1, k_i*S]   (3L tensors)
  decode_step(token [B], pos [1], *caches, *cross)
      caches: per layer self_k_i, self_v_i [B, T, Q]   -> (logits [B, V], *caches with slot pos filled)
with L decoder layers, k_i the encoder layers decoder layer i attends to, T the fixed
KV-cache length. The encoder precomputes every decoder layer's cross-attention keys/values
once per source. The decoder step writes its new key/value into slot `pos` with a one-hot
blend rather than a scatter: same numbers, and every backend fuses it.

Why per layer, and why each layer recomputes its masks: a compiled graph's fused kernels
(TIR workloads) then depend on that layer's own choices only. A stacked [L, ...] cache makes
the gather/stack kernels depend on L; a mask computed once and shared is fused into its
single consumer when L = 1 but not when L > 1. Per layer, the workloads of a whole search
space are few and enumerable, so they are tuned once (mosc tune --space).

Knows nothing of data, training or devices.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from mosc.errors import MoscError
from mosc.fileio import load_model_dir, save_model_dir
from mosc.nn.model import Supernet, attention, causal_bias, padding_bias, sinusoidal_positions
from mosc.space import Arch


@dataclass
class SubnetConfig:
    arch: Arch
    vocab_size: int
    qkv_dim: int
    max_positions: int = 256
    pad_id: int = 0

    def to_dict(self) -> dict:
        return {**asdict(self), "arch": self.arch.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> SubnetConfig:
        return cls(**{**d, "arch": Arch.from_dict(d["arch"])})


def analytic_param_count(arch: Arch, vocab_size: int, qkv_dim: int) -> int:
    """Parameters of the static subnet, counted from the arch alone (no model built)."""
    De, Dd, Q = arch.enc_embed, arch.dec_embed, qkv_dim
    attn = lambda d_q, d_kv, d_out: (d_q * Q + Q) + 2 * (d_kv * Q + Q) + (Q * d_out + d_out)
    ffn = lambda d, f: (d * f + f) + (f * d + d)
    n = vocab_size * max(De, Dd)  # shared embedding, as wide as the wider side
    n += sum(attn(De, De, De) + 2 * 2 * De + ffn(De, f) for f in arch.enc_ffn) + 2 * De
    n += sum(attn(Dd, Dd, Dd) + attn(Dd, De, Dd) + 3 * 2 * Dd + ffn(Dd, f) for f in arch.dec_ffn) + 2 * Dd
    return n


class Attention(nn.Module):
    def __init__(self, d_q: int, d_kv: int, qkv_dim: int, d_out: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(d_q, qkv_dim), nn.Linear(d_kv, qkv_dim), nn.Linear(d_kv, qkv_dim)
        self.out = nn.Linear(qkv_dim, d_out)


class FFN(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, f), nn.Linear(f, d)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, d: int, f: int, heads: int, qkv_dim: int):
        super().__init__()
        self.ln_attn, self.ln_ffn = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn, self.ffn = Attention(d, d, qkv_dim, d, heads), FFN(d, f)

    def forward(self, x, bias):
        h, a = self.ln_attn(x), self.attn
        x = x + a.out(attention(a.q(h), a.k(h), a.v(h), a.heads, bias, 0.0, False))
        return x + self.ffn(self.ln_ffn(x))


class DecoderLayer(nn.Module):
    def __init__(self, d: int, d_enc: int, f: int, heads: int, cross_heads: int, k: int, qkv_dim: int):
        super().__init__()
        self.k = k  # attends to the last k encoder layers
        self.ln_self, self.ln_cross, self.ln_ffn = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn = Attention(d, d, qkv_dim, d, heads)
        self.cross_attn = Attention(d, d_enc, qkv_dim, d, cross_heads)
        self.ffn = FFN(d, f)

    def forward(self, x, self_k, self_v, self_bias, cross_k, cross_v, cross_bias):
        """x [B, Tq, D]; keys/values already projected: self [B, Tk, Q], cross [B, M, Q]."""
        sa, ca = self.self_attn, self.cross_attn
        x = x + sa.out(attention(sa.q(self.ln_self(x)), self_k, self_v, sa.heads, self_bias, 0.0, False))
        x = x + ca.out(attention(ca.q(self.ln_cross(x)), cross_k, cross_v, ca.heads, cross_bias, 0.0, False))
        return x + self.ffn(self.ln_ffn(x))


class Subnet(nn.Module):
    """A static encoder-decoder Transformer of one arch. Inference only (no dropout)."""

    def __init__(self, cfg: SubnetConfig):
        super().__init__()
        self.cfg = cfg
        arch, Q = cfg.arch, cfg.qkv_dim
        De, Dd = arch.enc_embed, arch.dec_embed
        self.embed = nn.Parameter(torch.zeros(cfg.vocab_size, max(De, Dd)))  # [V, max(De, Dd)], shared
        self.encoder = nn.ModuleList(
            EncoderLayer(De, f, h, Q) for f, h in zip(arch.enc_ffn, arch.enc_heads)
        )
        self.decoder = nn.ModuleList(
            DecoderLayer(Dd, De, f, h, hc, k, Q)
            for f, h, hc, k in zip(arch.dec_ffn, arch.dec_heads, arch.dec_cross_heads, arch.dec_arbitrary)
        )
        self.enc_ln, self.dec_ln = nn.LayerNorm(De), nn.LayerNorm(Dd)
        # Positions are computed, not trained: buffers, not saved with the weights.
        self.register_buffer("pos_enc", sinusoidal_positions(cfg.max_positions, De), persistent=False)
        self.register_buffer("pos_dec", sinusoidal_positions(cfg.max_positions, Dd), persistent=False)

    @property
    def arch(self) -> Arch:
        return self.cfg.arch

    # -- encoder -----------------------------------------------------------------
    def encoder_states(self, src: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """src [B, S] -> (each encoder layer's output after the final LayerNorm [B, S, De], bias [B, 1, 1, S])."""
        De = self.arch.enc_embed
        x = F.embedding(src, self.embed[:, :De]) * math.sqrt(De) + self.pos_enc[: src.shape[1]]
        outs = []
        for layer in self.encoder:
            x = layer(x, padding_bias(src, self.cfg.pad_id))  # per layer: see the module docstring
            outs.append(self.enc_ln(x))
        return outs, padding_bias(src, self.cfg.pad_id)

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """src [B, S] -> per decoder layer i: cross_k_i, cross_v_i [B, k_i*S, Q], cross_bias_i [B, 1, 1, k_i*S]."""
        outs, _ = self.encoder_states(src)
        out = []
        for layer in self.decoder:
            mem = torch.cat(outs[-layer.k :], dim=1)  # [B, k*S, De]
            bias = padding_bias(src, self.cfg.pad_id).repeat(1, 1, 1, layer.k)  # [B, 1, 1, k*S]
            out += [layer.cross_attn.k(mem), layer.cross_attn.v(mem), bias]
        return tuple(out)

    # -- decoder -----------------------------------------------------------------
    def init_cache(self, batch: int, length: int) -> list[torch.Tensor]:
        """Zeroed self-attention caches, per layer self_k_i, self_v_i [B, T, Q]."""
        shape = (batch, length, self.cfg.qkv_dim)
        return [torch.zeros(shape, device=self.embed.device) for _ in range(2 * len(self.decoder))]

    def decode_step(self, token, pos, *state):
        """One incremental step. token [B] int64, pos [1] int64 (0-based step index), state =
        (*caches, *cross) as in the module docstring -> (logits [B, V], *caches with slot `pos` filled)."""
        L = len(self.decoder)
        caches, cross = state[: 2 * L], state[2 * L :]
        Dd, T = self.arch.dec_embed, caches[0].shape[1]
        x = F.embedding(token[:, None], self.embed[:, :Dd]) * math.sqrt(Dd) + self.pos_dec[pos]  # [B, 1, Dd]
        new = []
        for i, layer in enumerate(self.decoder):
            # The masks are recomputed per layer (cheap, [T]) so that each layer's kernels are alike.
            slots = torch.arange(T, device=token.device)
            write = (slots == pos).to(x.dtype)[None, :, None]  # [1, T, 1]: one-hot of slot pos
            bias = torch.zeros(T, device=token.device).masked_fill(slots > pos, float("-inf"))  # [T]: see slots <= pos
            h = layer.ln_self(x)
            k = caches[2 * i] * (1 - write) + layer.self_attn.k(h) * write  # [B, T, Q]
            v = caches[2 * i + 1] * (1 - write) + layer.self_attn.v(h) * write
            x = layer(x, k, v, bias, *cross[3 * i : 3 * i + 3])
            new += [k, v]
        logits = F.linear(self.dec_ln(x[:, 0]), self.embed[:, :Dd])  # [B, V]
        return (logits, *new)

    # -- full sequence (training-style) forward ----------------------------------------
    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """src [B, S], tgt_in [B, T] -> logits [B, T, V]; the same function as the supernet at this arch."""
        outs, src_bias = self.encoder_states(src)
        Dd, T = self.arch.dec_embed, tgt_in.shape[1]
        x = F.embedding(tgt_in, self.embed[:, :Dd]) * math.sqrt(Dd) + self.pos_dec[:T]
        self_bias = causal_bias(T, tgt_in.device)
        for layer in self.decoder:
            mem = torch.cat(outs[-layer.k :], dim=1)
            h = layer.ln_self(x)
            x = layer(x, layer.self_attn.k(h), layer.self_attn.v(h), self_bias,
                      layer.cross_attn.k(mem), layer.cross_attn.v(mem), src_bias.repeat(1, 1, 1, layer.k))
        return F.linear(self.dec_ln(x), self.embed[:, :Dd])

    @torch.no_grad()
    def translate(self, src: torch.Tensor, bos: int, eos: int, max_len: int = 64) -> list[list[int]]:
        """Greedy decoding with the KV cache: src [B, S] -> token ids per sentence (no bos/eos)."""
        B = src.shape[0]
        cross = self.encode(src)
        caches = self.init_cache(B, max_len)
        token = torch.full((B,), bos, dtype=torch.long, device=src.device)
        out = torch.zeros(B, max_len, dtype=torch.long, device=src.device)
        done = torch.zeros(B, dtype=torch.bool, device=src.device)
        for t in range(max_len):
            pos = torch.tensor([t], device=src.device)
            logits, *caches = self.decode_step(token, pos, *caches, *cross)
            token = logits.argmax(-1)
            out[:, t] = token
            done |= token == eos
            if done.all():
                break
        return [strip_eos(row, eos) for row in out.tolist()]


def strip_eos(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids


# ---------------------------------------------------------------------------------
# collapse
# ---------------------------------------------------------------------------------


def _set_linear(dst: nn.Linear, w: torch.Tensor, b: torch.Tensor):
    dst.weight.copy_(w)
    dst.bias.copy_(b)


def _set_attention(dst: Attention, src, d_q: int, d_kv: int, d_out: int, qkv: int | None = None):
    Q = qkv or src.qkv_dim
    _set_linear(dst.q, *src.q.collapse(d_q, Q))
    _set_linear(dst.k, *src.k.collapse(d_kv, Q))
    _set_linear(dst.v, *src.v.collapse(d_kv, Q))
    _set_linear(dst.out, *src.out.collapse(Q, d_out))


def _set_ffn(dst: FFN, src, code, d: int, f: int):
    w1, b1, w2, b2 = src.collapse(code, d, f)
    _set_linear(dst.fc1, w1, b1)
    _set_linear(dst.fc2, w2, b2)


def _set_ln(dst: nn.LayerNorm, src, d: int):
    dst.weight.copy_(src.weight[:d])
    dst.bias.copy_(src.bias[:d])


@torch.no_grad()
def collapse(supernet: Supernet, arch: Arch) -> Subnet:
    """The static Subnet that computes supernet(., ., arch), with copied weights."""
    supernet.space.validate(arch)
    was_training = supernet.training
    supernet.eval()  # routers without dropout: alpha is the constant the deployed model bakes in
    try:
        cfg = supernet.cfg
        sub = Subnet(SubnetConfig(arch, cfg.vocab_size, supernet.space.qkv_dim, cfg.max_positions, cfg.pad_id))
        code = supernet.arch_code(arch)
        De, Dd = arch.enc_embed, arch.dec_embed
        sub.embed.copy_(supernet.embed[:, : max(De, Dd)])
        for i, dst in enumerate(sub.encoder):
            src = supernet.encoder[i]
            _set_ln(dst.ln_attn, src.ln_attn, De)
            _set_ln(dst.ln_ffn, src.ln_ffn, De)
            _set_attention(dst.attn, src.attn, De, De, De)
            _set_ffn(dst.ffn, src.ffn, code, De, arch.enc_ffn[i])
        for i, dst in enumerate(sub.decoder):
            src = supernet.decoder[i]
            for name in ("ln_self", "ln_cross", "ln_ffn"):
                _set_ln(getattr(dst, name), getattr(src, name), Dd)
            _set_attention(dst.self_attn, src.self_attn, Dd, Dd, Dd)
            _set_attention(dst.cross_attn, src.cross_attn, Dd, De, Dd)
            _set_ffn(dst.ffn, src.ffn, code, Dd, arch.dec_ffn[i])
        _set_ln(sub.enc_ln, supernet.enc_ln, De)
        _set_ln(sub.dec_ln, supernet.dec_ln, Dd)
    finally:
        supernet.train(was_training)
    return sub.eval()


# ---------------------------------------------------------------------------------
# files: DIR/model.safetensors + DIR/config.json
# ---------------------------------------------------------------------------------

SUBNET_KIND = "mosc-subnet"


def save_subnet(sub: Subnet, out_dir: str | Path, extra: dict | None = None) -> Path:
    meta = {"config": sub.cfg.to_dict(), "param_count": sum(p.numel() for p in sub.parameters()), **(extra or {})}
    return save_model_dir(out_dir, SUBNET_KIND, sub.state_dict(), meta)


def load_subnet(path: str | Path) -> Subnet:
    meta, state = load_model_dir(path, SUBNET_KIND)
    try:
        sub = Subnet(SubnetConfig.from_dict(meta["config"]))
    except (KeyError, TypeError) as e:
        raise MoscError(f"{path}: malformed subnet config ({e})") from None
    try:
        sub.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise MoscError(f"{path}: weights do not match the config's arch ({str(e).splitlines()[0]})") from None
    return sub.eval()

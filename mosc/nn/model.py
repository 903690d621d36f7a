"""The Mixture-of-Supernets encoder-decoder Transformer, whole, in one place.

`Supernet.forward(src, tgt_in, arch)` runs the subnet `arch` with weights inherited from
the supernet: every elastic layer slices its weights to the arch's dims (HAT weight
sharing) and, for the FFNs in MoS modes, first mixes `m` expert matrices with weights
that a small router computes from the arch encoding (Jawahar et al., MOS.md section 2).

The arch is an explicit argument everywhere: there is no hidden "active subnet" state.
Every elastic module has `collapse(...)` that hands back the plain static weights for
one arch; `mosc.subnet.collapse` walks them to build the deployable model.

Layout: pre-LayerNorm Transformer (stable under short CPU training), sinusoidal
positions, embeddings shared by encoder input, decoder input and output projection
(sliced to each side's embed dim), attention with a fixed q/k/v size (`qkv_dim`;
the head count only changes the head dim), and HAT's arbitrary encoder-decoder
attention (a decoder layer attends to the concatenated outputs of the last k encoder
layers). Shapes: B batch, S source length, T target length, D embed dim, Q qkv_dim.

This module knows nothing of data, tokenizers, training, files or devices.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mosc.errors import MoscError
from mosc.nn.modes import FFNMode  # noqa: F401  (part of the model's interface)
from mosc.fileio import load_model_dir, save_model_dir
from mosc.nn.settings import MAX_VOCAB, real, whole
from mosc.space import Arch, SearchSpace


MIN_VOCAB = 8  # pad, bos, eos, unk and a few tokens to translate
MAX_EXPERTS = 256  # m: every FFN matrix is stored m times
MAX_ROUTER_HIDDEN = 65_536
MAX_POSITIONS = 131_072  # the sinusoidal tables hold max_positions rows per embed dim


@dataclass
class SupernetConfig:
    space: dict  # SearchSpace.to_dict(): the max dims come from here
    vocab_size: int = 1000  # joint source/target vocabulary (shared embeddings)
    ffn_mode: FFNMode = FFNMode.neuron  # how FFN weights are made for an arch
    n_experts: int = 2  # m: expert matrices per FFN matrix (MoS modes only)
    router_hidden: int = 128  # H: router hidden size
    router_dropout: float = 0.1  # dropout inside the router while training
    dropout: float = 0.3  # residual dropout at the largest embed dim; scaled by D / D_max
    attn_dropout: float = 0.1  # dropout on attention probabilities
    max_positions: int = 256  # longest sequence the sinusoidal table covers
    pad_id: int = 0  # padding token id: masked out of attention

    def __post_init__(self):
        """Every setting in range before a weight is allocated (one line per bad value)."""
        if self.ffn_mode not in [m.value for m in FFNMode]:
            raise MoscError(f"ffn_mode must be one of {', '.join(FFNMode.__members__)}, got {self.ffn_mode!r}")
        self.ffn_mode = FFNMode(self.ffn_mode)
        SearchSpace.from_dict(self.space, where="the model's search space")  # its own checks: dims, heads
        whole("vocab_size", self.vocab_size, MIN_VOCAB, MAX_VOCAB)
        check_model_settings(self)

    @property
    def search_space(self) -> SearchSpace:
        return SearchSpace.from_dict(self.space)

    def to_dict(self) -> dict:
        return {**asdict(self), "ffn_mode": self.ffn_mode.value}


def check_model_settings(cfg) -> None:
    """The settings every supernet config has (this module's, mosc.nn.bert's), each in range."""
    whole("n_experts", cfg.n_experts, 1, MAX_EXPERTS)
    whole("router_hidden", cfg.router_hidden, 1, MAX_ROUTER_HIDDEN)
    real("router_dropout", cfg.router_dropout, 0, 1, below=True)
    real("dropout", cfg.dropout, 0, 1, below=True)
    real("attn_dropout", cfg.attn_dropout, 0, 1, below=True)
    whole("max_positions", cfg.max_positions, 2, MAX_POSITIONS)
    whole("pad_id", cfg.pad_id, 0, cfg.vocab_size - 1)


def sinusoidal_positions(n: int, dim: int) -> torch.Tensor:
    """fairseq-style table [n, dim]: sin in the first half, cos in the second. Depends on dim,
    so every embed dim gets its own table (computed, never trained)."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / max(half - 1, 1)))
    angles = torch.arange(n, dtype=torch.float32)[:, None] * freq[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def attention(q, k, v, n_heads: int, bias: torch.Tensor | None, dropout: float, training: bool) -> torch.Tensor:
    """Multi-head scaled dot-product attention written out (exportable, same math everywhere).
    q [B, Tq, Q], k/v [B, Tk, Q], bias broadcastable to [B, heads, Tq, Tk] (0 or -inf)."""
    B, Tq, Q = q.shape
    Tk, hd = k.shape[1], Q // n_heads
    q = q.view(B, Tq, n_heads, hd).transpose(1, 2)  # [B, h, Tq, hd]
    k = k.view(B, Tk, n_heads, hd).transpose(1, 2)
    v = v.view(B, Tk, n_heads, hd).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(hd))  # [B, h, Tq, Tk]
    if bias is not None:
        scores = scores + bias
    probs = F.dropout(torch.softmax(scores, dim=-1), dropout, training)
    return (probs @ v).transpose(1, 2).reshape(B, Tq, Q)  # [B, Tq, Q]


# ---------------------------------------------------------------------------------
# Elastic building blocks: weights sized for the largest arch, sliced per call.
# ---------------------------------------------------------------------------------


class ElasticLinear(nn.Module):
    """Linear layer whose input and output dims can shrink: W[:d_out, :d_in], b[:d_out]."""

    def __init__(self, in_max: int, out_max: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_max, in_max))
        self.bias = nn.Parameter(torch.zeros(out_max))
        nn.init.xavier_uniform_(self.weight)

    def collapse(self, d_in: int, d_out: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weight[:d_out, :d_in], self.bias[:d_out]

    def forward(self, x, d_out: int):
        return F.linear(x, *self.collapse(x.shape[-1], d_out))


class ElasticLayerNorm(nn.Module):
    """LayerNorm over the first d features, with the first d scales and shifts."""

    def __init__(self, d_max: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_max))
        self.bias = nn.Parameter(torch.zeros(d_max))

    def collapse(self, d: int):
        return self.weight[:d], self.bias[:d]

    def forward(self, x):
        d = x.shape[-1]
        return F.layer_norm(x, (d,), *self.collapse(d))


class Router(nn.Module):
    """Arch encoding [10] -> Linear(10, H) -> ReLU -> Dropout -> Linear(H, out) logits [out]."""

    def __init__(self, d_in: int, hidden: int, out: int, dropout: float):
        super().__init__()
        self.fc1, self.fc2, self.dropout = nn.Linear(d_in, hidden), nn.Linear(hidden, out), dropout

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.dropout(F.relu(self.fc1(code)), self.dropout, self.training))


class ElasticFFN(nn.Module):
    """fc1 (D -> F) -> ReLU -> fc2 (F -> D), with elastic D and F, in one of three modes.

    shared: W = E[:d_out, :d_in]                                  (m = 1, no router)
    layer:  W = sum_i alpha_i E_i[:d_out, :d_in], alpha = softmax(router(code)) in R^m,
            one router for the layer, the same alpha for fc1 and fc2
    neuron: W[j] = sum_i alpha[j, i] E_i[j, :d_in], alpha = softmax over m of
            router(code).view(d_out_max, m), one router per matrix
    Biases are mixed the same way as their rows.
    """

    def __init__(self, d_max: int, f_max: int, cfg, code_dim: int):
        """cfg: a SupernetConfig or mosc.nn.bert.BertConfig (ffn_mode, n_experts, router_*)."""
        super().__init__()
        self.mode = cfg.ffn_mode
        m = 1 if self.mode is FFNMode.shared else cfg.n_experts
        self.m, self.d_max, self.f_max = m, d_max, f_max
        # Experts stacked on dim 0: [m, out_max, in_max]; independently Xavier-initialised.
        self.w1 = nn.Parameter(torch.empty(m, f_max, d_max))
        self.b1 = nn.Parameter(torch.zeros(m, f_max))
        self.w2 = nn.Parameter(torch.empty(m, d_max, f_max))
        self.b2 = nn.Parameter(torch.zeros(m, d_max))
        for i in range(m):
            nn.init.xavier_uniform_(self.w1[i])
            nn.init.xavier_uniform_(self.w2[i])
        H, p = cfg.router_hidden, cfg.router_dropout
        if self.mode is FFNMode.layer:
            self.router = Router(code_dim, H, m, p)
        elif self.mode is FFNMode.neuron:
            self.router1 = Router(code_dim, H, m * f_max, p)  # one alpha row per fc1 output neuron
            self.router2 = Router(code_dim, H, m * d_max, p)  # one alpha row per fc2 output neuron

    @staticmethod
    def _mix(E, b, alpha, d_in: int, d_out: int):
        """E [m, out_max, in_max], b [m, out_max], alpha [m] or [out_max, m] -> W [d_out, d_in], b [d_out]."""
        E, b = E[:, :d_out, :d_in], b[:, :d_out]
        if alpha.dim() == 1:  # layer-wise: one scalar per expert
            return torch.einsum("m,moi->oi", alpha, E), torch.einsum("m,mo->o", alpha, b)
        alpha = alpha[:d_out]  # neuron-wise: [d_out, m]
        return torch.einsum("om,moi->oi", alpha, E), torch.einsum("om,mo->o", alpha, b)

    def collapse(self, code: torch.Tensor, d: int, f: int):
        """Static (w1 [f, d], b1 [f], w2 [d, f], b2 [d]) for embed dim d, hidden dim f."""
        if self.mode is FFNMode.shared:
            return self.w1[0, :f, :d], self.b1[0, :f], self.w2[0, :d, :f], self.b2[0, :d]
        if self.mode is FFNMode.layer:
            a = torch.softmax(self.router(code), dim=-1)  # [m]
            a1 = a2 = a
        else:
            a1 = torch.softmax(self.router1(code).view(self.f_max, self.m), dim=-1)  # [f_max, m]
            a2 = torch.softmax(self.router2(code).view(self.d_max, self.m), dim=-1)  # [d_max, m]
        w1, b1 = self._mix(self.w1, self.b1, a1, d, f)
        w2, b2 = self._mix(self.w2, self.b2, a2, f, d)
        return w1, b1, w2, b2

    def forward(self, x, code: torch.Tensor, f: int, dropout: float):
        w1, b1, w2, b2 = self.collapse(code, x.shape[-1], f)
        h = F.dropout(F.relu(F.linear(x, w1, b1)), dropout, self.training)
        return F.linear(h, w2, b2)


class ElasticAttention(nn.Module):
    """q/k/v projections D_in -> Q (Q fixed), output projection Q -> D; heads only reshape."""

    def __init__(self, q_in_max: int, kv_in_max: int, qkv_dim: int, out_max: int):
        super().__init__()
        self.qkv_dim = qkv_dim
        self.q = ElasticLinear(q_in_max, qkv_dim)
        self.k = ElasticLinear(kv_in_max, qkv_dim)
        self.v = ElasticLinear(kv_in_max, qkv_dim)
        self.out = ElasticLinear(qkv_dim, out_max)

    def forward(self, x, mem, heads: int, bias, attn_dropout: float, qkv: int | None = None):
        """qkv: slice the q/k/v size too (encoder-only spaces, where it is the layer's width)."""
        Q = qkv or self.qkv_dim
        ctx = attention(self.q(x, Q), self.k(mem, Q), self.v(mem, Q), heads, bias, attn_dropout, self.training)
        return self.out(ctx, x.shape[-1])


class EncoderLayer(nn.Module):
    """Pre-LN self-attention + FFN over elastic width D <= d_max. Also the layer of the
    encoder-only (BERT) supernet (mosc.nn.bert), which slices q/k/v to D as well (qkv=D)."""

    def __init__(self, d_max: int, f_max: int, qkv_dim: int, cfg, code_dim: int):
        super().__init__()
        self.ln_attn, self.ln_ffn = ElasticLayerNorm(d_max), ElasticLayerNorm(d_max)
        self.attn = ElasticAttention(d_max, d_max, qkv_dim, d_max)
        self.ffn = ElasticFFN(d_max, f_max, cfg, code_dim)

    def forward(self, x, bias, code, heads: int, ffn: int, p: float, p_attn: float, qkv: int | None = None):
        h = self.ln_attn(x)
        x = x + F.dropout(self.attn(h, h, heads, bias, p_attn, qkv), p, self.training)
        return x + F.dropout(self.ffn(self.ln_ffn(x), code, ffn, p), p, self.training)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: SupernetConfig, s: SearchSpace, code_dim: int):
        super().__init__()
        D, De, F_ = max(s.dec_embed), max(s.enc_embed), max(s.dec_ffn)
        self.ln_self, self.ln_cross, self.ln_ffn = ElasticLayerNorm(D), ElasticLayerNorm(D), ElasticLayerNorm(D)
        self.self_attn = ElasticAttention(D, D, s.qkv_dim, D)
        self.cross_attn = ElasticAttention(D, De, s.qkv_dim, D)
        self.ffn = ElasticFFN(D, F_, cfg, code_dim)

    def forward(self, x, self_bias, mem, mem_bias, code, heads, cross_heads, ffn, p, p_attn):
        h = self.ln_self(x)
        x = x + F.dropout(self.self_attn(h, h, heads, self_bias, p_attn), p, self.training)
        x = x + F.dropout(self.cross_attn(self.ln_cross(x), mem, cross_heads, mem_bias, p_attn), p, self.training)
        return x + F.dropout(self.ffn(self.ln_ffn(x), code, ffn, p), p, self.training)


def padding_bias(src: torch.Tensor, pad_id: int) -> torch.Tensor:
    """src [B, S] -> additive key bias [B, 1, 1, S]: 0 for tokens, -inf for padding."""
    return torch.zeros(src.shape, dtype=torch.float32, device=src.device).masked_fill(src == pad_id, float("-inf"))[:, None, None, :]


def causal_bias(T: int, device=None) -> torch.Tensor:
    """[T, T] additive bias: position t sees positions <= t."""
    return torch.full((T, T), float("-inf"), device=device).triu(1)


class Supernet(nn.Module):
    def __init__(self, cfg: SupernetConfig):
        super().__init__()
        self.cfg = cfg
        s = self.space = cfg.search_space
        code_dim = len(s.hat_scale())  # router input: HAT's 10-feature encoding
        self.embed = nn.Parameter(torch.empty(cfg.vocab_size, max(max(s.enc_embed), max(s.dec_embed))))
        nn.init.normal_(self.embed, std=max(s.dec_embed) ** -0.5)  # fairseq's init for shared embeddings
        with torch.no_grad():
            self.embed[cfg.pad_id].zero_()
        self.encoder = nn.ModuleList(EncoderLayer(max(s.enc_embed), max(s.enc_ffn), s.qkv_dim, cfg, code_dim)
                                     for _ in range(max(s.enc_layers)))
        self.decoder = nn.ModuleList(DecoderLayer(cfg, s, code_dim) for _ in range(max(s.dec_layers)))
        self.enc_ln, self.dec_ln = ElasticLayerNorm(max(s.enc_embed)), ElasticLayerNorm(max(s.dec_embed))

    # -- helpers shared with collapse ------------------------------------------------
    def arch_code(self, arch: Arch) -> torch.Tensor:
        return torch.tensor(self.space.encode(arch), dtype=torch.float32, device=self.embed.device)

    def dropouts(self, d: int, d_max: int) -> tuple[float, float]:
        """(residual dropout scaled by d / d_max, attention dropout); zeros in eval mode."""
        if not self.training:
            return 0.0, 0.0
        return self.cfg.dropout * d / d_max, self.cfg.attn_dropout

    def embed_tokens(self, tokens, d: int, offset: int = 0):
        """tokens [B, T] -> [B, T, d]: scaled embedding + sinusoidal position."""
        pos = sinusoidal_positions(offset + tokens.shape[1], d).to(self.embed.device)[offset:]
        return F.embedding(tokens, self.embed[:, :d]) * math.sqrt(d) + pos

    # -- forward -----------------------------------------------------------------
    def encode(self, src: torch.Tensor, arch: Arch) -> tuple[list[torch.Tensor], torch.Tensor]:
        """src [B, S] -> (outputs of every encoder layer after the final LayerNorm, each [B, S, De];
        source padding bias [B, 1, 1, S])."""
        if src.shape[1] > self.cfg.max_positions:
            raise MoscError(f"source length {src.shape[1]} exceeds max_positions {self.cfg.max_positions}")
        code, d = self.arch_code(arch), arch.enc_embed
        p, p_attn = self.dropouts(d, max(self.space.enc_embed))
        bias = padding_bias(src, self.cfg.pad_id)
        x = F.dropout(self.embed_tokens(src, d), p, self.training)
        outs = []
        for i in range(arch.enc_layers):
            x = self.encoder[i](x, bias, code, arch.enc_heads[i], arch.enc_ffn[i], p, p_attn)
            outs.append(self.enc_ln(x))
        return outs, bias

    def decode(self, tgt_in: torch.Tensor, enc_outs: list[torch.Tensor], src_bias: torch.Tensor, arch: Arch):
        """tgt_in [B, T] (bos + target prefix) -> logits [B, T, V]."""
        code, d = self.arch_code(arch), arch.dec_embed
        p, p_attn = self.dropouts(d, max(self.space.dec_embed))
        T = tgt_in.shape[1]
        if T > self.cfg.max_positions:
            raise MoscError(f"target length {T} exceeds max_positions {self.cfg.max_positions}")
        self_bias = causal_bias(T, tgt_in.device)
        x = F.dropout(self.embed_tokens(tgt_in, d), p, self.training)
        for i in range(arch.dec_layers):
            k = arch.dec_arbitrary[i]
            mem = torch.cat(enc_outs[-k:], dim=1)  # [B, k*S, De]: the last k encoder layers
            mem_bias = src_bias.repeat(1, 1, 1, k)  # [B, 1, 1, k*S]
            x = self.decoder[i](x, self_bias, mem, mem_bias, code, arch.dec_heads[i], arch.dec_cross_heads[i],
                                arch.dec_ffn[i], p, p_attn)
        return F.linear(self.dec_ln(x), self.embed[:, :d])  # [B, T, V]

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor, arch: Arch) -> torch.Tensor:
        """src [B, S], tgt_in [B, T] -> logits [B, T, V] of the subnet `arch` (inherited weights)."""
        self.space.validate(arch)
        enc_outs, src_bias = self.encode(src, arch)
        return self.decode(tgt_in, enc_outs, src_bias, arch)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------
# files: DIR/model.safetensors + DIR/config.json (training adds its state next to them)
# ---------------------------------------------------------------------------------

SUPERNET_KIND = "mosc-supernet"


def save_supernet(model: Supernet, out_dir, extra: dict | None = None):
    return save_model_dir(out_dir, SUPERNET_KIND, model.state_dict(), {"config": model.cfg.to_dict(), **(extra or {})})


def load_module(path, kind: str, build, what: str) -> tuple[nn.Module, dict]:
    """(module in eval mode, the config.json dict) of a model folder of `kind`: build(config
    dict) makes the module, then the checked weights are loaded strictly. Corrupt, tampered or
    mismatched files raise MoscError naming `what` (e.g. "supernet")."""
    meta, state = load_model_dir(path, kind)
    try:
        model = build(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise MoscError(f"{path}: malformed {what} config ({e})") from None
    except MoscError as e:
        raise MoscError(f"{path}: {what} config: {e}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise MoscError(f"{path}: weights do not match the {what} config ({str(e).splitlines()[0]})") from None
    return model.eval(), meta


def load_supernet(path) -> tuple[Supernet, dict]:
    """(model in eval mode, the config.json dict). Corrupt, tampered or mismatched files raise MoscError."""
    return load_module(path, SUPERNET_KIND, lambda c: Supernet(SupernetConfig(**c)), "supernet")

"""The encoder-only (BERT) MoS supernet, its static encoder, and `collapse_bert`.

Built from the translation supernet's own elastic blocks (mosc.nn.model): each layer is
an `EncoderLayer` of width h_i (q/k/v sliced to h_i too, heads fixed, FFN fixed) whose
FFN is shared / layer-wise / neuron-wise MoS exactly as in MT, wrapped in SuperShaper's
bottlenecks: down W -> h_i before the layer, up h_i -> W after it, residual over W.

    x   = embed(tokens) * sqrt(W) + pos                       [B, T, W]
    x_i = x_{i-1} + up_i(layer_i(down_i(x_{i-1}), h_i))     (layer_i has its own residuals)
    out = LayerNorm(x_L)                                       [B, T, W]
    MLM logits = out @ embed.T + mlm_bias                      [B, T, V]  (tied embedding)
    class logits = classifier(out[:, 0])                       [B, C]     (static encoder only;
                                                                 position 0 holds <s> = [CLS])

The router input is the arch's per-layer hidden sizes divided by the largest choice.
`collapse_bert(supernet, arch)` evaluates the routers once and copies sliced, mixed
weights into a `BertEncoder`, a plain static model of one arch (the same function, the
core test) whose parameter count is `mosc.bert_space.param_count`.

Knows nothing of text, masking, training, files of a corpus or devices.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mosc.bert_space import BertArch, BertSpace
from mosc.errors import MoscError
from mosc.fileio import save_model_dir
from mosc.nn.model import (MIN_VOCAB, ElasticLayerNorm, ElasticLinear, EncoderLayer, check_model_settings, count_parameters,
                           load_module, padding_bias, sinusoidal_positions)
from mosc.nn.modes import FFNMode
from mosc.nn.settings import MAX_VOCAB, whole
from mosc.nn.subnet import EncoderLayer as StaticEncoderLayer
from mosc.nn.subnet import _set_attention, _set_ffn, _set_linear, _set_ln

MAX_CLASSES = 10_000


@dataclass
class BertConfig:
    space: dict  # BertSpace.to_dict(): width, layers, hidden choices, heads, FFN
    vocab_size: int = 4000  # tokenizer ids + 1 ([MASK] is the last id)
    ffn_mode: FFNMode = FFNMode.neuron  # how FFN weights are made for an arch
    n_experts: int = 2  # m: expert matrices per FFN matrix (MoS modes; MOS.md: 2)
    router_hidden: int = 128  # H: router hidden size (MOS.md: 128)
    router_dropout: float = 0.1  # dropout inside the router while training
    dropout: float = 0.1  # residual dropout (BERT's 0.1)
    attn_dropout: float = 0.1  # dropout on attention probabilities
    max_positions: int = 512  # longest sequence the sinusoidal table covers
    pad_id: int = 0  # padding token id: masked out of attention

    def __post_init__(self):
        if self.ffn_mode not in [m.value for m in FFNMode]:
            raise MoscError(f"ffn_mode must be one of {', '.join(FFNMode.__members__)}, got {self.ffn_mode!r}")
        self.ffn_mode = FFNMode(self.ffn_mode)
        BertSpace.from_dict(self.space, where="the model's search space")
        whole("vocab_size", self.vocab_size, MIN_VOCAB, MAX_VOCAB + 1)  # + 1: [MASK] past the tokenizer's ids
        check_model_settings(self)

    @property
    def search_space(self) -> BertSpace:
        return BertSpace.from_dict(self.space)

    def to_dict(self) -> dict:
        return {**asdict(self), "ffn_mode": self.ffn_mode.value}


def _embed(tokens: torch.Tensor, embed: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """tokens [B, T] -> [B, T, W]: scaled embedding + sinusoidal position (pos [>=T, W])."""
    return F.embedding(tokens, embed) * math.sqrt(embed.shape[1]) + pos[: tokens.shape[1]]


class BertSupernet(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        s = self.space = cfg.search_space
        W, Hm = s.width, max(s.hidden)
        self.embed = nn.Parameter(torch.empty(cfg.vocab_size, W))  # [V, W], tied with the MLM output
        nn.init.normal_(self.embed, std=W**-0.5)
        with torch.no_grad():
            self.embed[cfg.pad_id].zero_()
        self.mlm_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.down = nn.ModuleList(ElasticLinear(W, Hm) for _ in range(s.layers))  # W -> h_i
        self.layers = nn.ModuleList(EncoderLayer(Hm, s.ffn_dim, Hm, cfg, s.layers) for _ in range(s.layers))
        self.up = nn.ModuleList(ElasticLinear(Hm, W) for _ in range(s.layers))  # h_i -> W
        self.ln_f = ElasticLayerNorm(W)
        self.register_buffer("pos", sinusoidal_positions(cfg.max_positions, W), persistent=False)

    def arch_code(self, arch: BertArch) -> torch.Tensor:
        return torch.tensor(self.space.encode(arch), dtype=torch.float32, device=self.embed.device)

    def forward(self, tokens: torch.Tensor, arch: BertArch) -> torch.Tensor:
        """tokens [B, T] -> final hidden states [B, T, W] of the subnet `arch` (inherited weights)."""
        self.space.validate(arch)
        if tokens.shape[1] > self.cfg.max_positions:
            raise MoscError(f"sequence length {tokens.shape[1]} exceeds max_positions {self.cfg.max_positions}")
        p, p_attn = (self.cfg.dropout, self.cfg.attn_dropout) if self.training else (0.0, 0.0)
        code, heads, W = self.arch_code(arch), self.space.heads, self.space.width
        bias = padding_bias(tokens, self.cfg.pad_id)  # [B, 1, 1, T]
        x = F.dropout(_embed(tokens, self.embed, self.pos), p, self.training)
        for i, h in enumerate(arch.hidden):
            y = self.layers[i](self.down[i](x, h), bias, code, heads, self.space.ffn_dim, p, p_attn, qkv=h)
            x = x + F.dropout(self.up[i](y, W), p, self.training)
        return self.ln_f(x)

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., W] -> [..., V] (the embedding, tied)."""
        return F.linear(hidden, self.embed, self.mlm_bias)


# ---------------------------------------------------------------------------------
# the static encoder of one arch
# ---------------------------------------------------------------------------------


@dataclass
class BertEncoderConfig:
    arch: BertArch
    space: dict  # the BertSpace (width, heads, FFN come from here)
    vocab_size: int
    max_positions: int = 512
    pad_id: int = 0
    n_classes: int = 0  # > 0: a classifier head on position 0

    def __post_init__(self):
        if isinstance(self.arch, dict):
            self.arch = BertArch.from_dict(self.arch)
        BertSpace.from_dict(self.space, where="the encoder's space").validate(self.arch)
        whole("n_classes", self.n_classes, 0, MAX_CLASSES)

    def to_dict(self) -> dict:
        return {**asdict(self), "arch": self.arch.to_dict()}


class BertLayer(nn.Module):
    """down W -> h, a static encoder layer of width h (q/k/v = h), up h -> W."""

    def __init__(self, W: int, h: int, f: int, heads: int):
        super().__init__()
        self.down, self.layer, self.up = nn.Linear(W, h), StaticEncoderLayer(h, f, heads, h), nn.Linear(h, W)

    def forward(self, x, bias):
        return x + self.up(self.layer(self.down(x), bias))


class BertEncoder(nn.Module):
    """A plain encoder of one arch. Inference and fine-tuning (dropout only when training)."""

    def __init__(self, cfg: BertEncoderConfig, dropout: float = 0.1):
        super().__init__()
        self.cfg, self.dropout = cfg, dropout
        s = BertSpace.from_dict(cfg.space)
        W = s.width
        self.embed = nn.Parameter(torch.zeros(cfg.vocab_size, W))
        self.mlm_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.layers = nn.ModuleList(BertLayer(W, h, s.ffn_dim, s.heads) for h in cfg.arch.hidden)
        self.ln_f = nn.LayerNorm(W)
        self.classifier = nn.Linear(W, cfg.n_classes) if cfg.n_classes else None
        self.register_buffer("pos", sinusoidal_positions(cfg.max_positions, W), persistent=False)

    @property
    def arch(self) -> BertArch:
        return self.cfg.arch

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> hidden states [B, T, W]. Dropout (fine-tuning) on the embedding
        and classifier input only: the layers have none, so eval == collapse exactly."""
        bias = padding_bias(tokens, self.cfg.pad_id)
        x = F.dropout(_embed(tokens, self.embed, self.pos), self.dropout, self.training)
        for layer in self.layers:
            x = layer(x, bias)
        return self.ln_f(x)

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.embed, self.mlm_bias)

    def classify(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] (<s> first) -> class logits [B, C]."""
        if self.classifier is None:
            raise MoscError("this encoder has no classifier head (n_classes = 0)")
        return self.classifier(F.dropout(self(tokens)[:, 0], self.dropout, self.training))

    def with_classifier(self, n_classes: int, seed: int = 0) -> BertEncoder:
        """A copy with a fresh classifier head of n_classes (seeded init; the encoder copied)."""
        cfg = BertEncoderConfig(self.arch, self.cfg.space, self.cfg.vocab_size, self.cfg.max_positions,
                                self.cfg.pad_id, n_classes)
        out = BertEncoder(cfg, self.dropout)
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("classifier.")}
        out.load_state_dict(state, strict=False)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            out.classifier.weight.normal_(0.0, 0.02, generator=g)
            out.classifier.bias.zero_()
        return out


@torch.no_grad()
def collapse_bert(supernet: BertSupernet, arch: BertArch) -> BertEncoder:
    """The static BertEncoder that computes supernet(., arch), with copied weights."""
    s = supernet.space
    s.validate(arch)
    was_training = supernet.training
    supernet.eval()  # routers without dropout: alpha is the constant the static model bakes in
    try:
        cfg = supernet.cfg
        enc = BertEncoder(BertEncoderConfig(arch, s.to_dict(), cfg.vocab_size, cfg.max_positions, cfg.pad_id))
        code, W = supernet.arch_code(arch), s.width
        enc.embed.copy_(supernet.embed)
        enc.mlm_bias.copy_(supernet.mlm_bias)
        for i, (dst, h) in enumerate(zip(enc.layers, arch.hidden)):
            _set_linear(dst.down, *supernet.down[i].collapse(W, h))
            _set_linear(dst.up, *supernet.up[i].collapse(h, W))
            src = supernet.layers[i]
            _set_ln(dst.layer.ln_attn, src.ln_attn, h)
            _set_ln(dst.layer.ln_ffn, src.ln_ffn, h)
            _set_attention(dst.layer.attn, src.attn, h, h, h, qkv=h)
            _set_ffn(dst.layer.ffn, src.ffn, code, h, s.ffn_dim)
        _set_ln(enc.ln_f, supernet.ln_f, W)
    finally:
        supernet.train(was_training)
    return enc.eval()


# ---------------------------------------------------------------------------------
# files: DIR/model.safetensors + DIR/config.json
# ---------------------------------------------------------------------------------

BERT_SUPERNET_KIND = "mosc-bert-supernet"
BERT_ENCODER_KIND = "mosc-bert-encoder"


def save_bert_supernet(model: BertSupernet, out_dir, extra: dict | None = None):
    return save_model_dir(out_dir, BERT_SUPERNET_KIND, model.state_dict(), {"config": model.cfg.to_dict(), **(extra or {})})


def load_bert_supernet(path) -> tuple[BertSupernet, dict]:
    """(model in eval mode, the config.json dict). Corrupt or mismatched files raise MoscError."""
    return load_module(path, BERT_SUPERNET_KIND, lambda c: BertSupernet(BertConfig(**c)), "BERT supernet")


def save_bert_encoder(enc: BertEncoder, out_dir, extra: dict | None = None):
    meta = {"config": enc.cfg.to_dict(), "param_count": count_parameters(enc), **(extra or {})}
    return save_model_dir(out_dir, BERT_ENCODER_KIND, enc.state_dict(), meta)


def load_bert_encoder(path) -> tuple[BertEncoder, dict]:
    return load_module(path, BERT_ENCODER_KIND, lambda c: BertEncoder(BertEncoderConfig(**c)), "BERT encoder")

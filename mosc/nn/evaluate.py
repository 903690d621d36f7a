"""Quality of one architecture: validation loss, greedy/beam decoding, corpus BLEU.

A model here is either a supernet at an arch (inherited weights, evaluated through the
supernet's own full-sequence forward, no cache) or a collapsed `Subnet` (evaluated
through its deployment path: encoder once, then cached decoder steps). Both go through
the same beam search, so equal numbers mean the collapsed model really is the same
function, not the same code.

BLEU is sacrebleu's corpus BLEU on detokenized text (the tokenizer's decode) against the
raw reference sentences. Runs on a torch device (`device`: auto = the GPU when there is
one), always in fp32; batches are made on the host and moved, hypotheses come back as
lists. Knows nothing of training, deployment devices or search.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mosc.contract import BOS_ID, EOS_ID, PAD_ID
from mosc.nn.batching import eval_batches
from mosc.nn.corpus import ParallelData, Split
from mosc.nn.device import model_device, resolve_device, to_device
from mosc.nn.model import Supernet
from mosc.space import Arch
from mosc.nn.subnet import Subnet


def logits_fn(model: Supernet | Subnet, arch: Arch | None = None):
    """(src [B, S], tgt_in [B, T]) -> logits [B, T, V] for a subnet, or a supernet at arch."""
    if isinstance(model, Supernet):
        if arch is None:
            raise ValueError("a supernet needs an arch")
        return lambda src, tgt: model(src, tgt, arch)
    return model


@torch.no_grad()
def validation_loss(fn, batches, device: torch.device | None = None) -> float:
    """Mean per-token cross-entropy (nats, no label smoothing) over all non-pad targets.
    device: where fn computes (batches are moved there; None: they are used as they are)."""
    total, n = 0.0, 0
    for b in batches:
        n_tokens = b.n_tokens  # counted where the batch is, before it moves
        if device is not None:
            b = to_device(b, device)
        logits = fn(b.src, b.tgt_in)
        total += F.cross_entropy(logits.flatten(0, 1), b.tgt_out.flatten(), ignore_index=PAD_ID, reduction="sum").item()
        n += n_tokens
    return total / max(n, 1)


# ---- decoding -------------------------------------------------------------------------


class CachedDecoder:
    """Subnet deployment path: encoder once, decode_step with a fixed-size KV cache.
    State: (*caches, *cross) as Subnet.decode_step takes them; every tensor's dim 0 = beam rows."""

    def __init__(self, sub: Subnet, max_len: int):
        self.sub, self.max_len = sub, max_len

    def start(self, src):
        cross = self.sub.encode(src)
        return (*self.sub.init_cache(src.shape[0], self.max_len), *cross)

    def step(self, state, tokens, t: int):
        logits, *caches = self.sub.decode_step(tokens, torch.tensor([t], device=tokens.device), *state)
        return logits, (*caches, *state[len(caches):])

    @staticmethod
    def reorder(state, rows):
        return tuple(t[rows] for t in state)


class FullDecoder:
    """Reference path: re-run the full-sequence forward on the whole prefix each step.
    State: (src [N, S], prefix [N, t+1])."""

    def __init__(self, fn):
        self.fn = fn

    def start(self, src):
        return src, torch.full((src.shape[0], 1), BOS_ID, dtype=torch.long, device=src.device)

    def step(self, state, tokens, t: int):
        src, prefix = state
        if t > 0:
            prefix = torch.cat([prefix, tokens[:, None]], dim=1)
        return self.fn(src, prefix)[:, -1], (src, prefix)

    @staticmethod
    def reorder(state, rows):
        return state[0][rows], state[1][rows]


@torch.no_grad()
def beam_search(decoder, src: torch.Tensor, beam: int = 1, max_len: int = 64, len_penalty: float = 1.0) -> list[list[int]]:
    """src [B, S] -> best hypothesis per row (ids, no bos/eos). beam=1 is greedy decoding.
    Scores are summed log-probs; the final pick divides by length**len_penalty."""
    B, dev = src.shape[0], src.device  # the search's own tensors live where the model's outputs do
    N = B * beam
    state = decoder.start(src.repeat_interleave(beam, dim=0))  # rows b*beam + j
    scores = torch.full((B, beam), float("-inf"), device=dev)
    scores[:, 0] = 0.0  # all beams start identical: keep one alive
    tokens = torch.full((N,), BOS_ID, dtype=torch.long, device=dev)
    hyps = torch.zeros(N, 0, dtype=torch.long, device=dev)
    finished = torch.zeros(N, dtype=torch.bool, device=dev)
    lengths = torch.zeros(N, device=dev)
    for t in range(max_len):
        logits, state = decoder.step(state, tokens, t)
        logp = torch.log_softmax(logits.float(), dim=-1)  # [N, V]
        V = logp.shape[-1]
        # A finished row may only extend itself with eos, at no cost.
        logp[finished] = float("-inf")
        logp[finished, EOS_ID] = 0.0
        cand = (scores.view(N, 1) + logp).view(B, beam * V)
        scores, flat = cand.topk(beam, dim=1)  # [B, beam]
        origin = (flat // V) + torch.arange(B, device=dev)[:, None] * beam  # global row each winner came from
        origin, tokens = origin.view(N), (flat % V).view(N)
        state = decoder.reorder(state, origin)
        hyps = torch.cat([hyps[origin], tokens[:, None]], dim=1)
        lengths = lengths[origin] + (~finished[origin]).float()
        finished = finished[origin] | (tokens == EOS_ID)
        if finished.all():
            break
    final = scores.view(N) / lengths.clamp(min=1) ** len_penalty
    best = final.view(B, beam).argmax(dim=1) + torch.arange(B, device=dev) * beam
    out = []
    for row in hyps[best].tolist():
        out.append(row[: row.index(EOS_ID)] if EOS_ID in row else row)
    return out


def decoder_for(model: Supernet | Subnet, arch: Arch | None, max_len: int):
    if isinstance(model, Subnet):
        return CachedDecoder(model, max_len)
    return FullDecoder(logits_fn(model, arch))


@torch.no_grad()
def translate_split(model, arch: Arch | None, split: Split, beam: int = 1, max_len: int = 64,
                    max_tokens: int = 2048, progress=None) -> list[list[int]]:
    """Hypothesis ids for every pair of the split, in corpus order."""
    out: list[list[int] | None] = [None] * len(split)
    dec = decoder_for(model, arch, max_len)
    device = model_device(model)
    for b in eval_batches(split, max_tokens=max_tokens):
        for i, ids in zip(b.idx.tolist(), beam_search(dec, to_device(b, device).src, beam, max_len)):
            out[i] = ids
        if progress is not None:
            progress(len(b))
    return out


@dataclass
class Evaluation:
    loss: float  # mean per-token cross-entropy on the split (nats)
    bleu: float | None  # sacrebleu corpus BLEU, None when decoding was skipped
    n_sentences: int
    seconds: float
    hypotheses: list[str] | None = None

    @property
    def ppl(self) -> float:
        return math.exp(min(self.loss, 50.0))


@contextlib.contextmanager
def on_device(model: torch.nn.Module, device: torch.device):
    """The model on `device` for the block, then back where the caller had it."""
    home = model_device(model)
    model.to(device)
    try:
        yield model
    finally:
        model.to(home)


def evaluate(model: Supernet | Subnet, data: ParallelData, arch: Arch | None = None, split: str = "val",
             beam: int = 1, max_len: int | None = None, max_sentences: int | None = None,
             bleu: bool = True, progress=None, device: str = "auto") -> Evaluation:
    """Validation loss (and BLEU of greedy/beam output) of a subnet or a supernet at arch,
    computed on `device` (auto: the GPU when there is one); the model is left where it was."""
    import sacrebleu

    dev = resolve_device(device)
    model.eval()
    t0 = time.perf_counter()
    sp = data.split(split)
    if max_sentences is not None and max_sentences < len(sp):
        sp = Split(sp.src_text[:max_sentences], sp.tgt_text[:max_sentences], sp.src[:max_sentences], sp.tgt[:max_sentences])
    score, hyps = None, None
    with on_device(model, dev):
        loss = validation_loss(logits_fn(model, arch), eval_batches(sp), dev)
        if bleu:
            # Room for targets a bit longer than the longest source, capped by the position table.
            limit = max_len or min(max(map(len, sp.src)) + 10, model.cfg.max_positions)
            ids = translate_split(model, arch, sp, beam=beam, max_len=limit, progress=progress)
            hyps = data.tokenizer.decode_batch(ids)
            score = sacrebleu.corpus_bleu(hyps, [sp.tgt_text]).score
    return Evaluation(loss, score, len(sp), time.perf_counter() - t0, hyps)


def supernet_fitness(model: Supernet, data: ParallelData, val_sentences: int, max_tokens: int = 4096,
                     device: str = "auto"):
    """arch -> validation loss (nats/token) of the supernet at arch on the first N validation
    sentences: the search's fitness (lower is better; HAT and MoS search on it too).

    The model moves to `device` (auto: the GPU when there is one) and stays there for the
    search's thousands of calls, and so do the batches: they are moved once, not per arch."""
    dev = resolve_device(device)
    model.eval().to(dev)
    v = data.val
    n = min(val_sentences, len(v))
    batches = eval_batches(Split(v.src_text[:n], v.tgt_text[:n], v.src[:n], v.tgt[:n]), max_tokens=max_tokens)
    batches = [to_device(b, dev) for b in batches]

    def score(arch: Arch) -> float:
        return validation_loss(logits_fn(model, arch), batches)

    return score

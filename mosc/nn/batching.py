"""Token-budget batches of encoded sentence pairs, resumable mid-epoch and shardable across ranks.

What this module does: packs the encoded pairs of one split into padded batches under a
token budget (`collate`, `Batch`), in a seeded order that can be resumed mid-epoch bit for
bit and sharded across DDP ranks (`BatchIterator`), or once in length order for
evaluation (`eval_batches`).

What it does NOT know: files, text, tokenizers (only the fixed ids of mosc.contract), the
model, training or devices. A split is anything with `src`/`tgt` lists of id lists and a
length (a `mosc.nn.corpus.Split`). Batches are CPU LongTensors; the caller moves them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from mosc.contract import BOS_ID, EOS_ID, PAD_ID
from mosc.errors import MoscError

if TYPE_CHECKING:
    from mosc.nn.corpus import Split

@dataclass
class Batch:
    src: torch.Tensor  # [B, S] source ids, right-padded with PAD_ID (no bos/eos)
    tgt_in: torch.Tensor  # [B, T] bos + target, right-padded: the decoder's input
    tgt_out: torch.Tensor  # [B, T] target + eos, right-padded: what the decoder must predict
    idx: torch.Tensor  # [B] index of each row's pair in its Split (to restore corpus order)

    @property
    def n_tokens(self) -> int:
        """Non-pad target tokens (eos included): the denominator of a per-token loss."""
        return int((self.tgt_out != PAD_ID).sum())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in (self.src, self.tgt_in, self.tgt_out, self.idx)))

    def __len__(self) -> int:
        return self.src.shape[0]


def collate(src: Sequence[Sequence[int]], tgt: Sequence[Sequence[int]], idx: Sequence[int]) -> Batch:
    """Pairs of id lists -> a padded Batch (targets get bos/eos here)."""
    B, S, T = len(src), max(len(s) for s in src), max(len(t) for t in tgt) + 1
    s_t = torch.full((B, S), PAD_ID, dtype=torch.long)
    t_in = torch.full((B, T), PAD_ID, dtype=torch.long)
    t_out = torch.full((B, T), PAD_ID, dtype=torch.long)
    for b, (s, t) in enumerate(zip(src, tgt)):
        s_t[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        t_in[b, : len(t) + 1] = torch.tensor([BOS_ID, *t], dtype=torch.long)
        t_out[b, : len(t) + 1] = torch.tensor([*t, EOS_ID], dtype=torch.long)
    return Batch(s_t, t_in, t_out, torch.tensor(list(idx), dtype=torch.long))


def _lengths(split: Split, max_len: int, long: str) -> tuple[list[int], list[int], list[int]]:
    """Which pairs take part (their indices), at what (possibly truncated) source/target lengths."""
    keep, src_len, tgt_len = [], [], []
    for i, (s, t) in enumerate(zip(split.src, split.tgt)):
        if long == "filter" and (len(s) > max_len or len(t) > max_len):
            continue
        keep.append(i)
        src_len.append(min(len(s), max_len))
        tgt_len.append(min(len(t), max_len))
    return keep, src_len, tgt_len


def _pack(keep: list[int], src_len: list[int], tgt_len: list[int], max_tokens: int) -> list[list[int]]:
    """Pairs -> batches (lists of pair indices) with B * max(S, T) <= max_tokens each."""
    cost = [max(a, b + 1) for a, b in zip(src_len, tgt_len)]  # padded width of a row
    # Sort by width, then target and source length, so rows in a batch pad little.
    order = sorted(range(len(keep)), key=lambda j: (cost[j], tgt_len[j], src_len[j], keep[j]))
    plan: list[list[int]] = []
    cur, width = [], 0
    for j in order:
        w = max(width, cost[j])
        if cur and (len(cur) + 1) * w > max_tokens:
            plan.append(cur)
            cur, w = [], cost[j]
        cur.append(keep[j])
        width = w
    plan.append(cur)
    return plan


class Resumable:
    """The resume point of a batch iterator (epoch, position within it) and the check that it
    is resumed on the same data and settings. Subclasses have `epoch`, `position`,
    `__len__` (batches per epoch on this rank) and `_fingerprint()` (what must match)."""

    def state_dict(self) -> dict:
        """JSON-able resume point: {"epoch", "position", and what must match to resume}."""
        return {"epoch": self.epoch, "position": self.position, **self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        mine = self._fingerprint()
        diff = [k for k in mine if k in state and state[k] != mine[k]]
        if diff:
            k = diff[0]
            raise MoscError(f"cannot resume batches: {k} was {state[k]}, now {mine[k]} (data or batching settings changed)")
        epoch, position = state.get("epoch"), state.get("position")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (epoch, position)):
            raise MoscError(f"cannot resume batches: epoch and position must be whole numbers, got {epoch!r} and {position!r}")
        if not position < max(len(self), 1):
            raise MoscError(f"cannot resume batches: position {position} outside an epoch of {len(self)}")
        self.epoch, self.position = epoch, position


class BatchIterator(Resumable):
    """Token-budget batches over one Split, resumable mid-epoch and shardable across ranks.

    Batches are planned once: pairs sorted by padded length (ties by index), then packed
    greedily so that B * max(S, T) <= max_tokens (T = target length + 1 for bos/eos). Only
    the ORDER of batches changes between epochs: a permutation drawn from a
    torch.Generator seeded with (seed, epoch), so any epoch's order can be recomputed.

    Each `iter()` yields the rest of the current epoch and advances `epoch`/`position` as it
    goes (position = batches of this epoch already handed out on this rank; after the last
    one the state is already (epoch + 1, 0)). To resume bit for bit mid-epoch: save
    `state_dict()` in the checkpoint right after the optimizer step of a batch, and on
    restart build the iterator with the same data and arguments, `load_state_dict(...)`,
    and iterate: the remaining batches come out identical. (The model's own RNG for
    dropout is the trainer's business.)

    DDP: every rank builds the same plan; each epoch's permuted list is cut to a multiple
    of world_size (the few left-over batches differ each epoch, so nothing is lost for
    good) and rank r takes every world_size-th batch from r: disjoint, same count per rank.
    The state is the same on all ranks, so rank 0's state_dict serves everyone.
    """

    def __init__(
        self,
        split: Split,
        max_tokens: int = 4096,  # padded tokens per batch, B * max(S, T), on each rank
        *,
        max_len: int = 256,  # longest source/target in subword tokens (before bos/eos)
        long: str = "filter",  # pairs over max_len: "filter" (drop; training) or "truncate" (eval)
        shuffle: bool = True,  # False: sorted order, no permutation (evaluation)
        seed: int = 0,  # batch order seed; epoch e uses seed and e
        rank: int = 0,  # DDP rank of this process
        world_size: int = 1,  # DDP world size
    ):
        if long not in ("filter", "truncate"):
            raise MoscError(f"long must be 'filter' or 'truncate', not {long!r}")
        if max_len < 1 or max_tokens < max_len + 1:
            raise MoscError(f"max_tokens ({max_tokens}) must be at least max_len + 1 ({max_len + 1})")
        if not 0 <= rank < world_size:
            raise MoscError(f"rank {rank} outside world size {world_size}")
        self.split, self.max_tokens, self.max_len, self.long = split, max_tokens, max_len, long
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        self.epoch, self.position = 0, 0

        keep, src_len, tgt_len = _lengths(split, max_len, long)
        self.n_dropped = len(split) - len(keep)  # pairs filtered out for length
        if not keep:
            raise MoscError(f"no pair fits max_len={max_len}")
        self.plan = _pack(keep, src_len, tgt_len, max_tokens)  # batches as lists of pair indices into split
        if len(self.plan) < world_size:
            raise MoscError(f"only {len(self.plan)} batches for {world_size} ranks; lower max_tokens")

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return len(self.plan) // self.world_size

    def epoch_order(self, epoch: int) -> list[int]:
        """Plan indices of this rank's batches in epoch `epoch`, in order."""
        n = len(self.plan)
        if self.shuffle:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
            perm = torch.randperm(n, generator=g).tolist()
        else:
            perm = list(range(n))
        perm = perm[: n - n % self.world_size]  # equal count per rank
        return perm[self.rank :: self.world_size]

    def batch(self, plan_index: int) -> Batch:
        ids = self.plan[plan_index]
        m = self.max_len  # only bites in "truncate" mode: filtered pairs are already short
        return collate([self.split.src[i][:m] for i in ids], [self.split.tgt[i][:m] for i in ids], ids)

    def __iter__(self) -> Iterator[Batch]:
        order = self.epoch_order(self.epoch)
        for k in range(self.position, len(order)):
            # Advance the state before handing the batch out: a checkpoint saved while the
            # caller holds batch k must resume at k + 1.
            self.position = k + 1
            if self.position == len(order):
                self.epoch, self.position = self.epoch + 1, 0
            yield self.batch(order[k])

    def batches(self) -> Iterator[Batch]:
        """Endless stream across epochs (for step-based training loops)."""
        while True:
            yield from iter(self)

    def _fingerprint(self) -> dict:
        return {
            "n_pairs": len(self.split), "n_batches": len(self.plan),
            "n_tokens": sum(map(len, self.split.src)) + sum(map(len, self.split.tgt)),  # other data or tokenizer?
            "max_tokens": self.max_tokens,
            "max_len": self.max_len, "long": self.long, "shuffle": self.shuffle, "seed": self.seed,
            "world_size": self.world_size,
        }



def eval_batches(split: Split, max_tokens: int = 4096, max_len: int = 256) -> list[Batch]:
    """Every pair once, length-sorted, sources truncated to max_len (nothing dropped).

    Put hypotheses back in corpus order with batch.idx."""
    return list(BatchIterator(split, max_tokens, max_len=max_len, long="truncate", shuffle=False))

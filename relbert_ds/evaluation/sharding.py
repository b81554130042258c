"""Sharded, lockstep inference: one table of relation vectors for many word pairs, many ranks.

The plan (a pure function of the pairs, their prompt lengths, ``batch_size`` and the world
size; every rank computes the same plan without talking):

1. the unique pairs (first occurrence order), sorted by prompt token length, longest first,
   ties by the pair itself; so the plan never depends on input order or on the rank;
2. cut into batches of ``batch_size`` consecutive pairs of that order (the same batches for any
   world size: a pair is always encoded together with the same other pairs, with the same
   padding, so its vector is bit-identical whether 1 or 8 ranks run);
3. batch ``b`` goes to rank ``b % W``; every rank runs exactly ``ceil(n_batches / W)`` forwards.
   A rank whose turn has no batch left runs a 1-pair dummy forward and discards it: under
   ZeRO-3 every forward is a collective (parameters are all-gathered layer by layer) and a rank
   that skipped one would leave the others waiting forever.

Every rank gets the full (N, H) table in input order (one all-gather at the end). That costs
no more than gathering on rank 0 alone with an all-gather, and lets every rank compute the
same metrics (and shard the classification grid search over the same features).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from relbert_ds.collectives import all_gather_no_grad, world_info
from relbert_ds.encoder import Pair, validate_pairs
from relbert_ds.errors import ConfigError


@dataclass(frozen=True)
class ShardPlan:
    """Which rows of the unique-pair list each forward of each rank encodes.

    ``steps[r]`` is rank ``r``'s list of forwards; each entry is a tuple of row indices into
    the unique pairs, or ``None`` for a dummy forward. Every ``steps[r]`` has the same length.
    """

    batches: tuple[tuple[int, ...], ...]  # all batches, in plan order
    steps: tuple[tuple[Optional[tuple[int, ...]], ...], ...]  # per rank, per forward

    def rows_of_rank(self, rank: int) -> list[int]:
        """Row indices that rank ``rank`` encodes, in the order it produces their vectors."""
        return [i for batch in self.steps[rank] if batch is not None for i in batch]


def length_order(pairs: Sequence[Pair], lengths: Sequence[int]) -> list[int]:
    """Indices of ``pairs`` sorted by prompt length (longest first), ties by the pair itself."""
    if len(pairs) != len(lengths):
        raise ValueError("one length per pair is needed")
    return sorted(range(len(pairs)), key=lambda i: (-lengths[i], pairs[i]))


def plan_shards(order: Sequence[int], batch_size: int, world_size: int) -> ShardPlan:
    """Cut ``order`` into batches and deal them round-robin to ``world_size`` lockstep ranks."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}; fix: pass a positive batch size")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    batches = tuple(tuple(order[s:s + batch_size]) for s in range(0, len(order), batch_size))
    n_steps = -(-len(batches) // world_size)  # ceil
    steps = tuple(
        tuple(batches[k * world_size + r] if k * world_size + r < len(batches) else None for k in range(n_steps))
        for r in range(world_size)
    )
    return ShardPlan(batches=batches, steps=steps)


def encode_sharded(encoder: torch.nn.Module, pairs: Sequence[Sequence[str]], batch_size: int = 64,
                   show_progress: bool = False) -> np.ndarray:
    """Relation vectors of ``pairs`` (float32, (N, H), input order), computed across all ranks.

    Must be called by every rank with the same ``pairs`` (a collective). Returns the full table
    on every rank. Runs under ``torch.no_grad()`` (not ``inference_mode``: ZeRO-3 gathers
    parameters inside the forward, and inference tensors must not leak into the training
    state) with ``encoder.eval()``; the encoder's previous train/eval mode is restored.

    ``encoder`` is a :class:`relbert_ds.RelationEncoder` (or the same module held by a DeepSpeed
    engine): only ``prompt_lengths``, ``embed`` and ``hidden_size`` are used.
    """
    pairs = validate_pairs(pairs)
    rank, world = world_info()
    unique = list(dict.fromkeys(pairs))
    row_of = {pair: i for i, pair in enumerate(unique)}
    lengths = encoder.prompt_lengths(unique) if unique else []
    plan = plan_shards(length_order(unique, lengths), batch_size, world)
    hidden = int(encoder.hidden_size)
    mine: list[torch.Tensor] = []
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            steps = plan.steps[rank] if plan.steps else ()
            if show_progress and rank == 0:
                from tqdm.auto import tqdm
                steps = tqdm(steps, desc=f"encode ({world} rank{'s' if world > 1 else ''})", unit="batch")
            for batch in steps:
                if batch is None:
                    encoder.embed([unique[0]])  # lockstep dummy; its output is discarded
                    continue
                mine.append(encoder.embed([unique[i] for i in batch]).float().cpu())
    finally:
        encoder.train(was_training)
    local = torch.cat(mine) if mine else torch.zeros(0, hidden, dtype=torch.float32)
    # Send the vectors from the compute device when there is one (nccl moves CUDA tensors).
    gathered = all_gather_no_grad(local).cpu()
    rows = [i for r in range(world) for i in plan.rows_of_rank(r)]
    table = torch.zeros(len(unique), hidden, dtype=torch.float32)
    if rows:
        table[torch.tensor(rows)] = gathered
    out = table[[row_of[p] for p in pairs]] if pairs else table
    return out.numpy()

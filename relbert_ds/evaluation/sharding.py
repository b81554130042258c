"""Sharded, lockstep inference: one table of relation vectors for many word pairs, many ranks.

The batches are the encoder's (:mod:`relbert_ds.model.batching`: unique pairs, longest prompts first,
fixed batches; the same for any world size, so a pair's vector is bit-identical whether 1 or 8 ranks
run); every rank computes them without talking. This module deals them to the ranks:
batch ``b`` goes to rank ``b % W``; every rank runs exactly ``ceil(n_batches / W)`` forwards.
   A rank whose turn has no batch left runs a 1-pair dummy forward and discards it: under
   ZeRO-3 every forward is a collective (parameters are all-gathered layer by layer) and a rank
   that skipped one would leave the others waiting forever.

Every rank gets the full (N, H) table in input order (one all-gather at the end). That costs
no more than gathering on rank 0 alone with an all-gather, and lets every rank compute the
same metrics (and shard the classification grid search over the same features).

When the forwards need no lockstep (anything but ZeRO-3), :func:`encode_sharing_ranks` deals the
same batches dynamically instead, from a :class:`~relbert_ds.parallel.work_queue.WorkQueue`
that also holds other jobs (the evaluator's classification probes): each rank takes the next
item when it is free. A pair is still encoded with the same other pairs, so its vector is the
same as with the lockstep plan.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from relbert_ds.data.schemas import Pair
from relbert_ds.model.batching import PairRows, plan_batches
from relbert_ds.model.encoder import validate_pairs
from relbert_ds.parallel.collectives import all_gather_no_grad, world_info
from relbert_ds.progress import Progress


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


def deal_batches(batches: Sequence[tuple[int, ...]], world_size: int) -> ShardPlan:
    """Deal ``batches`` round-robin to ``world_size`` lockstep ranks (dummy forwards fill the last turn)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    batches = tuple(batches)
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
    batching = plan_batches(pairs, encoder.prompt_lengths, batch_size)
    unique = batching.unique
    plan = deal_batches(batching.batches, world)
    mine: list[torch.Tensor] = []
    steps = plan.steps[rank] if plan.steps else ()
    # Rank 0's share in unique pairs, scaled to the job (the ranks' shares differ by at most one batch).
    progress = Progress(len(unique), f"encode ({world} rank{'s' if world > 1 else ''})", unit="pair",
                        enabled=show_progress and rank == 0)
    def encode_mine() -> None:
        with _eval_mode(encoder):
            for batch in steps:
                if batch is None:
                    _embed(encoder, [unique[0]])  # lockstep dummy; its output is discarded
                    continue
                mine.append(_embed(encoder, [unique[i] for i in batch]))
                progress.advance_to(min(len(unique), progress.n + len(batch) * world))

    from relbert_ds.parallel.distributed import agree

    # Agreed before the gather: a rank whose batch fails (a model giving nan vectors) stops every rank with
    # one message, and no rank waits in the gather for it.
    agree(encode_mine)
    progress.advance_to(len(unique))
    progress.close()
    local = torch.cat(mine) if mine else torch.zeros(0, int(encoder.hidden_size), dtype=torch.float32)
    # Send the vectors from the compute device when there is one (nccl moves CUDA tensors).
    gathered = all_gather_no_grad(local).cpu()
    rows = [i for r in range(world) for i in plan.rows_of_rank(r)]
    return _table(pairs, unique, rows, gathered)


def forwards_are_collective(encoder: torch.nn.Module) -> bool:
    """Whether every rank must run the encoder's forwards in lockstep: ZeRO-3 (its partitioned parameters
    carry ``ds_id``) gathers each layer's parameters from all ranks inside the forward."""
    return any(hasattr(p, "ds_id") for p in encoder.parameters()) if isinstance(encoder, torch.nn.Module) else False


@dataclass
class SharedRun:
    """What :func:`encode_sharing_ranks` did: the table, this rank's job results and every rank's share."""

    table: np.ndarray
    job_results: dict[int, Any]  # job index -> its return value, for the jobs this rank ran
    ranks: list[dict[str, float]]  # per rank: encode_s, jobs_s, batches, jobs (how the queue split the work)


def encode_sharing_ranks(encoder: torch.nn.Module, pairs: Sequence[Sequence[str]], jobs: Sequence[Callable[[], Any]],
                         batch_size: int = 64, show_progress: bool = False) -> SharedRun:
    """Encode ``pairs`` as :func:`encode_sharded` does while the ranks also run ``jobs`` (a collective).

    The jobs (first, in the given order: put the longest first) and the batches of the plan go into one
    :class:`WorkQueue`; every rank takes the next item when it is free, so a rank busy with a long job
    encodes less and all finish together. The batches are the plan's for one rank (the same for any
    world size), so every vector is bit-identical to :func:`encode_sharded`'s; a job's result must not
    depend on the rank that runs it. Not for an encoder whose forwards are collective
    (:func:`forwards_are_collective`: the ranks would run different numbers of them). An exception on
    any rank, in a job or a forward, is raised on every rank once the queue is empty
    (:func:`relbert_ds.parallel.distributed.agree`), so no rank waits for a peer that gave up.
    """
    from relbert_ds.parallel.distributed import agree
    from relbert_ds.parallel.work_queue import WorkQueue

    pairs = validate_pairs(pairs)
    rank, world = world_info()
    plan = plan_batches(pairs, encoder.prompt_lengths, batch_size)
    unique, batches = plan.unique, plan.batches
    queue = WorkQueue(len(jobs) + len(batches))
    done: dict[int, Any] = {}
    encoded: list[tuple[int, torch.Tensor]] = []
    share = {"encode_s": 0.0, "jobs_s": 0.0, "batches": 0.0, "jobs": 0.0}

    def work() -> None:
        # The queue's position is every rank's progress: items are batches of pairs and whole probes.
        progress = Progress(queue.n_items, f"encode + probes ({world} rank{'s' if world > 1 else ''})",
                            unit="item", enabled=show_progress and rank == 0)
        with _eval_mode(encoder):
            for item in queue:
                start = time.perf_counter()
                if item < len(jobs):
                    done[item] = jobs[item]()
                    share["jobs_s"] += time.perf_counter() - start
                    share["jobs"] += 1
                else:
                    batch = item - len(jobs)
                    encoded.append((batch, _embed(encoder, [unique[i] for i in batches[batch]])))
                    share["encode_s"] += time.perf_counter() - start
                    share["batches"] += 1
                progress.advance_to(item + 1)
        progress.advance_to(queue.n_items)
        progress.close()

    agree(work)
    hidden = int(encoder.hidden_size)
    local = torch.cat([v for _, v in encoded]) if encoded else torch.zeros(0, hidden, dtype=torch.float32)
    gathered = all_gather_no_grad(local).cpu()
    ids = all_gather_no_grad(torch.tensor([b for b, _ in encoded], dtype=torch.int64)).tolist()
    rows = [i for b in ids for i in batches[b]]  # rank by rank, each in its claim order: as gathered
    keys = ("encode_s", "jobs_s", "batches", "jobs")
    shares = all_gather_no_grad(torch.tensor([[share[k] for k in keys]], dtype=torch.float64)).tolist()
    return SharedRun(_table(pairs, unique, rows, gathered), done,
                     [{k: (int(v) if k in ("batches", "jobs") else v) for k, v in zip(keys, r)} for r in shares])


@contextmanager
def _eval_mode(encoder: torch.nn.Module) -> Iterator[None]:
    """``encoder.eval()`` and ``torch.no_grad()`` for a block; the encoder's train/eval mode restored after."""
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        encoder.train(was_training)


def _embed(encoder: torch.nn.Module, batch: Sequence[Pair]) -> torch.Tensor:
    """One batch's vectors, float32 on the CPU."""
    return encoder.embed(list(batch)).float().cpu()


def _table(pairs: Sequence[Pair], unique: Sequence[Pair], rows: Sequence[int], gathered: torch.Tensor) -> np.ndarray:
    """The (len(pairs), H) table in input order from ``gathered``, whose row ``j`` is unique pair ``rows[j]``."""
    table = torch.zeros(len(unique), gathered.shape[1], dtype=torch.float32)
    if rows:
        table[torch.tensor(rows)] = gathered
    return PairRows(unique).take(table, pairs).numpy()

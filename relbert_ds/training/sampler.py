"""The relation-aware distributed sampler: one global batch per optimizer step, planned alike on
every rank, whatever the number of ranks.

The global batch of an optimizer step holds ``relations_per_step`` distinct relations (the
user's global batch, DeepSpeed's ``train_batch_size`` semantics). Each relation comes as a
*group*: ``min(positives_per_relation, available)`` positives, then up to
``negatives_per_relation`` of the relation's own negatives. The plan is a pure function of
``(seed, epoch, step, dataset, knobs)`` built from CPU ``torch.Generator`` streams seeded with
integers mixed by SplitMix64 (never Python's salted ``hash()``): every rank and every platform
computes the same plan without communicating, and the plan does not depend on the world size.

How a step is divided:

1. Gradient accumulation: the step's groups are split into ``accumulation`` micro batches of
   whole groups (sizes differ by at most one group). Negatives are shared within a micro batch
   only, so accumulation trades negatives for memory, never the data seen per step.
2. Ranks: each micro batch is flattened into prompts (group by group: positives, then
   negatives) and cut into ``world_size`` contiguous runs of prompts whose lengths differ by at
   most one (``shard_by="prompt"``, the default): a relation's group may span ranks, and the
   loss, which gathers every rank's rows with their relation ids, scores it exactly as one
   process would. ``shard_by="relation"`` keeps whole groups on a rank (group counts differ by
   at most one). Concatenating the ranks' slices in rank order
   gives the flattened micro batch, for any world size.

Relation order per epoch: a permutation seeded by ``(seed, epoch)``. With ``parent_grouping``
the parents are permuted and the relations of each parent kept adjacent (permuted inside the
parent), so siblings tend to share a global batch and act as hard negatives for each other.
Relations without a parent are groups of their own.

Weights (``relation_weights``, per relation, e.g. from per-source weights): a relation of weight
``w`` is planned ``floor(w*(e+1) + phase) - floor(w*e + phase)`` times in epoch ``e``, so over
``E`` epochs it is planned ``floor(w*E + phase)`` times: within one of ``w*E`` (the remainders
carry over from epoch to epoch; a relation of weight 0.5 is in exactly every other epoch, one of
0.1 in one epoch of ten, one of 2.5 in two or three). The phase is fixed for the run and drawn
from the seed: the relations sharing a weight get the phases ``(j + u)/n`` (``j`` a seeded
permutation of their ``n`` positions, ``u`` one seeded offset), which by Hermite's identity keeps
their total per epoch at ``floor(n*w)`` or ``ceil(n*w)``; arithmetic is exact (integers, weights
as fractions). A step never holds a relation twice (repeats are moved into other steps), so a
weight may be at most the steps of an epoch minus one (the last step may be partial).

Uneven tails: ``tail="drop"`` runs ``slots // relations_per_step`` steps and skips the leftover
this epoch (a new permutation next epoch gives it its turn); ``tail="fill"`` runs
``ceil(slots / relations_per_step)`` steps and completes the last one with relations drawn,
seeded by ``(seed, epoch, step)``, from those not already in it: uniformly without weights, in
proportion to the weights with them. Both act on whole optimizer steps, so gradient accumulation
never drops a micro step. With weights the planned slots of an epoch vary by at most one per
distinct weight: ``fill`` sizes the epoch for the most, ``drop`` for the fewest.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Optional, Sequence

import numpy as np
import torch

from relbert_ds.data.schemas import Pair, RelationDataset
from relbert_ds.errors import CheckpointError, ConfigError

__all__ = ["LocalBatch", "RelationAwareSampler", "GroupPlan", "mix_seed", "TAILS", "SHARD_BY", "check_knobs",
           "split_evenly"]

# (relation index, positive indices, negative indices) into dataset.relations[i].{positives,negatives}
GroupPlan = tuple[int, list[int], list[int]]

TAILS = ("fill", "drop")
SHARD_BY = ("prompt", "relation")
MIN_POSITIVES = 2  # a contrastive term needs an anchor and another positive

_MASK64 = (1 << 64) - 1
# Stream tags keep the generators of different purposes independent for equal (epoch, step).
_TAG_ORDER, _TAG_PARENTS, _TAG_FILL, _TAG_GROUP, _TAG_PHASE = 0x0A, 0x0B, 0x0C, 0x0D, 0x0F
_PHASE_BITS = 32  # resolution of a weight group's seeded phase offset
# A weight is read as the fraction it was written as (0.1 = 1/10, not the binary float's value).
_WEIGHT_DENOMINATOR = 10**6
_STATE_VERSION = 2


def _splitmix64(x: int) -> int:
    """One SplitMix64 step: a well-mixed 64-bit function of a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (order matters); identical on every platform."""
    h = 0x6A09E667F3BCC909  # arbitrary non-zero start
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK64))
    return h >> 1  # 63 bits: safe for torch.Generator.manual_seed everywhere


def _generator(*parts: int) -> torch.Generator:
    """A CPU generator (the CPU stream is the same on every platform) seeded from ``parts``."""
    return torch.Generator(device="cpu").manual_seed(mix_seed(*parts))


def split_evenly(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ``[start, end)`` ranges covering ``range(n)``, lengths differing by at
    most one (the longer ones first)."""
    base, extra = divmod(n, parts)
    starts = [i * base + min(i, extra) for i in range(parts + 1)]
    return [(starts[i], starts[i + 1]) for i in range(parts)]


def even_part(n: int, parts: int, i: int) -> tuple[int, int]:
    """``split_evenly(n, parts)[i]`` without building the other parts (O(1) at any world size)."""
    base, extra = divmod(n, parts)
    return i * base + min(i, extra), (i + 1) * base + min(i + 1, extra)


@dataclass
class LocalBatch:
    """This rank's share of one micro step, flattened pair by pair.

    Rows follow the global flattening (group by group: positives, then negatives). All tensors
    have one entry per pair (shape ``(n,)``) and live on the CPU; the trainer moves them.
    """

    pairs: list[Pair]
    relation_ids: torch.Tensor  # (n,) long: index of the relation in dataset.relations
    is_positive: torch.Tensor  # (n,) bool
    parent_ids: torch.Tensor  # (n,) long: index into sampler.parent_names, -1 = no parent
    pair_ids: torch.Tensor  # (n,) long: dataset-wide id of the (head, tail) strings
    epoch: int
    step: int
    micro: int = 0

    def __len__(self) -> int:
        return len(self.pairs)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_knobs(*, relations_per_step: Optional[int] = None, accumulation: int = 1, world_size: int = 1,
                rank: int = 0, positives_per_relation: int = 8, negatives_per_relation: int = 8, seed: int = 0,
                tail: str = "fill", shard_by: str = "prompt") -> None:
    """ConfigError, naming the fix, for any knob the sampler cannot honour (no data needed).

    The run config calls this at start-up; the sampler calls it again with the data's limits
    in :meth:`RelationAwareSampler.__init__`.
    """
    if not _is_int(world_size) or world_size < 1:
        raise ConfigError(f"world size must be an integer >= 1, got {world_size!r}")
    if not _is_int(rank) or not 0 <= rank < world_size:
        raise ConfigError(f"rank must be in 0..{world_size - 1} for world size {world_size}, got {rank!r}")
    if relations_per_step is not None and (not _is_int(relations_per_step) or relations_per_step < 1):
        raise ConfigError(f"--relations_per_step must be an integer >= 1, got {relations_per_step!r}; fix: set it "
                          f"to 1 or more")
    if not _is_int(accumulation) or accumulation < 1:
        raise ConfigError(f"gradient accumulation steps must be an integer >= 1, got {accumulation!r}")
    if relations_per_step is not None and accumulation > relations_per_step:
        raise ConfigError(f"{accumulation} gradient accumulation steps cannot split a global batch of "
                          f"{relations_per_step} relations (each micro step needs a whole relation); fix: lower "
                          f"gradient_accumulation_steps to at most {relations_per_step} or raise --relations_per_step")
    if not _is_int(positives_per_relation) or positives_per_relation < MIN_POSITIVES:
        raise ConfigError(f"--positives_per_relation must be an integer >= {MIN_POSITIVES} (an anchor and another "
                          f"positive), got {positives_per_relation!r}; fix: set it to {MIN_POSITIVES} or more")
    if not _is_int(negatives_per_relation) or negatives_per_relation < 0:
        raise ConfigError(f"--negatives_per_relation must be an integer >= 0, got {negatives_per_relation!r}; fix: "
                          f"set it to 0 (in-batch negatives only) or more")
    if not _is_int(seed):
        raise ConfigError(f"--seed must be an integer, got {seed!r}")
    if tail not in TAILS:
        raise ConfigError(f"--tail {tail!r} is not one of {', '.join(TAILS)}; fix: pick one of them")
    if shard_by not in SHARD_BY:
        raise ConfigError(f"--shard_by {shard_by!r} is not one of {', '.join(SHARD_BY)}; fix: pick one of them")


class RelationAwareSampler:
    """Plans global batches of relation groups and hands each rank its share of each micro step.

    Args:
        dataset: the training relations.
        world_size, rank: the data-parallel world this sampler serves.
        relations_per_step: relations per optimizer step, over all ranks (the global batch).
        accumulation: micro steps per optimizer step (DeepSpeed's gradient accumulation).
        positives_per_relation: positives drawn per group (>= 2); fewer when the relation has fewer.
        negatives_per_relation: own negatives drawn per group (>= 0); fewer when it has fewer.
        seed: the run's seed; the plan depends on nothing else but the epoch and step.
        tail: ``"fill"`` or ``"drop"`` (see the module docstring).
        parent_grouping: keep relations of one parent adjacent in the epoch order.
        shard_by: ``"prompt"`` (even prompt counts) or ``"relation"`` (whole groups per rank).
        relation_weights: optional per-relation sampling weights (> 0): expected appearances per
            epoch, see the module docstring.

    Attributes:
        steps_per_epoch: optimizer steps per epoch, identical on every rank and world size.
        parent_names: distinct parent names in dataset order (``parent_ids`` index it).
    """

    def __init__(
        self,
        dataset: RelationDataset,
        *,
        world_size: int,
        rank: int,
        relations_per_step: int = 16,
        accumulation: int = 1,
        positives_per_relation: int = 8,
        negatives_per_relation: int = 8,
        seed: int = 0,
        tail: str = "fill",
        parent_grouping: bool = False,
        shard_by: str = "prompt",
        relation_weights: Optional[Sequence[float]] = None,
    ) -> None:
        check_knobs(relations_per_step=relations_per_step, accumulation=accumulation, world_size=world_size,
                    rank=rank, positives_per_relation=positives_per_relation,
                    negatives_per_relation=negatives_per_relation, seed=seed, tail=tail, shard_by=shard_by)
        self.dataset = dataset
        self.world_size = world_size
        self.rank = rank
        self.relations_per_step = relations_per_step
        self.accumulation = accumulation
        self.positives_per_relation = positives_per_relation
        self.negatives_per_relation = negatives_per_relation
        self.seed = int(seed)
        self.tail = tail
        self.parent_grouping = bool(parent_grouping)
        self.shard_by = shard_by
        n = len(dataset.relations)
        self.weights = _check_weights(relation_weights, n)
        # (numerator, offset, denominator) per relation: planned count by epoch e = (num*e + off) // den
        self._carry = None if self.weights is None else _carry_terms(self.weights, self.seed)
        _check_against_data(self)
        fewest, most = self.slot_range
        self.steps_per_epoch = max(1, fewest // relations_per_step if tail == "drop" else
                                   math.ceil(most / relations_per_step))
        _check_weights_fit(self)

        self.parent_names: list[str] = []
        self._relation_parent: list[int] = []  # relation index -> parent index or -1
        for group in dataset.relations:
            if group.parent is None:
                self._relation_parent.append(-1)
                continue
            if group.parent not in self.parent_names:
                self.parent_names.append(group.parent)
            self._relation_parent.append(self.parent_names.index(group.parent))
        self._parents = torch.tensor(self._relation_parent, dtype=torch.long)

        # Identical (head, tail) strings share one id across the whole dataset, so the loss
        # can mask a pair that shows up in two relations (a false negative otherwise).
        pair_index: dict[Pair, int] = {}
        self._pos_pair_ids: list[list[int]] = []
        self._neg_pair_ids: list[list[int]] = []
        for group in dataset.relations:
            self._pos_pair_ids.append([pair_index.setdefault(tuple(p), len(pair_index)) for p in group.positives])
            self._neg_pair_ids.append([pair_index.setdefault(tuple(p), len(pair_index)) for p in group.negatives])
        self.num_pairs = len(pair_index)

        self._fingerprint = self._make_fingerprint()
        self._order_cache: tuple[int, np.ndarray] = (-1, np.zeros(0, dtype=np.int64))
        # prompts per group: known without drawing it
        self._sizes = np.array([self.group_size(i) for i in range(n)], dtype=np.int64)
        self._step_cache: tuple[tuple[int, int], np.ndarray, np.ndarray] = ((-1, -1), self._sizes[:0], self._sizes[:0])
        self._weight_array = None if self.weights is None else np.array(self.weights, dtype=np.float64)

    # ---------------------------------------------------------------- sizes

    @property
    def slot_range(self) -> tuple[int, int]:
        """The fewest and the most relation slots an epoch plans: the relation count twice without
        weights; with weights, over the relations sharing a weight, ``floor`` and ``ceil`` of
        their count times the weight, summed."""
        if self._carry is None:
            n = len(self.dataset.relations)
            return n, n
        totals: dict[Fraction, int] = Counter(_exact_weight(w) for w in self.weights)
        fewest = sum(math.floor(w * k) for w, k in totals.items())
        most = sum(math.ceil(w * k) for w, k in totals.items())
        return max(1, fewest), max(1, most)

    def epoch_counts(self, epoch: int) -> list[int]:
        """How many slots each relation has in ``epoch`` (1 each without weights): with weights
        ``floor(w*(epoch+1) + phase) - floor(w*epoch + phase)``, exact."""
        if self._carry is None:
            return [1] * len(self.dataset.relations)
        return [(num * (epoch + 1) + off) // den - (num * epoch + off) // den for num, off, den in self._carry]

    def group_size(self, relation: int) -> int:
        """Prompts of one relation's group."""
        group = self.dataset.relations[relation]
        return min(self.positives_per_relation, len(group.positives)) + min(self.negatives_per_relation,
                                                                             len(group.negatives))

    # ---------------------------------------------------------------- planning

    def epoch_order(self, epoch: int) -> list[int]:
        """The relation slots of ``epoch`` in order (a permutation of all relations without
        weights; with weights, each relation :meth:`epoch_counts` times)."""
        return self._epoch_array(epoch).tolist()

    def _epoch_array(self, epoch: int) -> np.ndarray:
        """:meth:`epoch_order` as an int64 array, computed once per epoch (steps slice it)."""
        if self._order_cache[0] == epoch:
            return self._order_cache[1]
        if self.parent_grouping:
            order = self._grouped_order(epoch)
        elif self.weights is None:  # the slots are the relations 0..n-1: the permutation is the order
            order = torch.randperm(len(self.dataset.relations), generator=_generator(self.seed, epoch,
                                                                                       _TAG_ORDER)).numpy()
        else:
            slots = self._weighted_slots(epoch)
            order = [slots[i] for i in torch.randperm(len(slots), generator=_generator(self.seed, epoch,
                                                                                         _TAG_ORDER)).tolist()]
        if self.weights is not None:
            order = _spread_repeats(list(order), self.relations_per_step)
        self._order_cache = (epoch, np.asarray(order, dtype=np.int64))
        return self._order_cache[1]

    def _weighted_slots(self, epoch: int) -> list[int]:
        """Each relation :meth:`epoch_counts` times, in relation order."""
        return [i for i, c in enumerate(self.epoch_counts(epoch)) for _ in range(c)]

    def _grouped_order(self, epoch: int) -> list[int]:
        """Parents in a permuted order, each parent's relations adjacent and permuted."""
        groups: dict[Any, list[int]] = {}  # key: parent index, or ("solo", i) without parent
        for i in self._weighted_slots(epoch):
            p = self._relation_parent[i]
            groups.setdefault(p if p >= 0 else ("solo", i), []).append(i)
        keys = list(groups)  # dataset order: deterministic
        g = _generator(self.seed, epoch, _TAG_PARENTS)
        order: list[int] = []
        for k in torch.randperm(len(keys), generator=g).tolist():
            members = groups[keys[k]]
            order.extend(members[j] for j in torch.randperm(len(members), generator=g).tolist())
        return order

    def _step_relations(self, epoch: int, step: int) -> np.ndarray:
        """The ``relations_per_step`` distinct relation indices of one global step (int64)."""
        per_step = self.relations_per_step
        chosen = self._epoch_array(epoch)[step * per_step:(step + 1) * per_step]
        if self.weights is not None:  # dict.fromkeys drops a weighted repeat that could not be moved
            chosen = np.fromiter(dict.fromkeys(chosen.tolist()), dtype=np.int64)
        missing = per_step - len(chosen)
        if missing > 0:  # the last step under tail="fill" (or a repeat dropped above)
            free = np.ones(len(self.dataset.relations), dtype=bool)
            free[chosen] = False
            rest = np.flatnonzero(free)  # the relations not in the step, ascending
            g = _generator(self.seed, epoch, step, _TAG_FILL)
            if self.weights is None:
                picks = torch.randperm(len(rest), generator=g)[:missing].numpy()
            else:  # fillers in proportion to the weights, so a fill does not favour light sources
                share = torch.from_numpy(self._weight_array[rest])
                picks = torch.multinomial(share, missing, replacement=False, generator=g).numpy()
            chosen = np.concatenate([chosen, rest[picks]])
        return chosen

    def _group(self, epoch: int, step: int, relation: int) -> GroupPlan:
        """Positives and negatives of one relation at one step, drawn without replacement."""
        group = self.dataset.relations[relation]
        g = _generator(self.seed, epoch, step, relation, _TAG_GROUP)
        pos = torch.randperm(len(group.positives), generator=g)[: self.positives_per_relation].tolist()
        neg = torch.randperm(len(group.negatives), generator=g)[: self.negatives_per_relation].tolist()
        return relation, pos, neg

    def plan(self, epoch: int, step: int) -> list[GroupPlan]:
        """The GLOBAL batch of optimizer step ``(epoch, step)``: its relation groups in order.

        Identical on every rank and for every world size (no communication needed).
        """
        self._check_step(epoch, step)
        return [self._group(epoch, step, rel) for rel in self._step_relations(epoch, step).tolist()]

    def micro_plan(self, epoch: int, step: int, micro: int) -> list[GroupPlan]:
        """The groups of micro step ``micro`` (0-based, < ``accumulation``) of a global step."""
        if not 0 <= micro < self.accumulation:
            raise ValueError(f"micro step {micro} is outside 0..{self.accumulation - 1}")
        groups = self.plan(epoch, step)
        start, end = split_evenly(len(groups), self.accumulation)[micro]
        return groups[start:end]

    def rank_rows(self, groups: Sequence[GroupPlan]) -> list[tuple[int, int]]:
        """Each rank's ``[start, end)`` rows of the flattened ``groups`` (rank order)."""
        if self.shard_by == "prompt":
            return split_evenly(sum(len(pos) + len(neg) for _, pos, neg in groups), self.world_size)
        bounds, row = [0], 0
        for _, pos, neg in groups:
            row += len(pos) + len(neg)
            bounds.append(row)
        return [(bounds[a], bounds[b]) for a, b in split_evenly(len(groups), self.world_size)]

    def global_batch(self, epoch: int, step: int, micro: int = 0) -> LocalBatch:
        """The whole micro batch flattened (every rank's rows, in rank order)."""
        return self.batch_from_groups(self.micro_plan(epoch, step, micro), epoch, step, micro)

    def local_batch(self, epoch: int, step: int, micro: int = 0) -> LocalBatch:
        """This rank's contiguous share of :meth:`global_batch`, planning only the groups it holds.

        Group sizes are known without drawing the groups, so the rank's rows are found from their
        prefix sums and only the (one or few) groups that overlap them are drawn: the host work
        does not grow with the world size (a rank of 512 draws its own groups, not 4,096)."""
        if not 0 <= micro < self.accumulation:
            raise ValueError(f"micro step {micro} is outside 0..{self.accumulation - 1}")
        relations, ends = self._step_layout(epoch, step)
        first, last = even_part(len(relations), self.accumulation, micro)
        end_of = functools.partial(_rows_through, ends)
        base = end_of(first - 1)  # rows of the micro steps before this one
        if self.shard_by == "prompt":
            start, end = even_part(end_of(last - 1) - base, self.world_size, self.rank)
        else:
            a, b = even_part(last - first, self.world_size, self.rank)
            start, end = end_of(first + a - 1) - base, end_of(first + b - 1) - base
        # Groups [g0, g1) of the step overlap this rank's rows [start, end) of the micro step.
        g0 = first + int(np.searchsorted(ends[first:last], base + start, side="right"))
        g1 = first + int(np.searchsorted(ends[first:last], base + end, side="left")) + 1 if end > start else g0
        g1 = min(g1, last)
        groups = [self._group(epoch, step, rel) for rel in relations[g0:g1].tolist()]
        offset = end_of(g0 - 1) - base  # row of the first drawn group in the micro step
        return self.batch_from_groups(groups, epoch, step, micro, rows=(start - offset, end - offset))

    def row_counts(self, epoch: int, step: int, micro: int = 0) -> list[int]:
        """Every rank's number of rows in micro step ``micro`` (what the loss would otherwise have to
        exchange), from the group sizes alone."""
        relations, ends = self._step_layout(epoch, step)
        first, last = even_part(len(relations), self.accumulation, micro)
        end_of = functools.partial(_rows_through, ends)
        if self.shard_by == "prompt":
            total = end_of(last - 1) - end_of(first - 1)
            return [b - a for a, b in (even_part(total, self.world_size, r) for r in range(self.world_size))]
        parts = (even_part(last - first, self.world_size, r) for r in range(self.world_size))
        return [end_of(first + b - 1) - end_of(first + a - 1) for a, b in parts]

    def _step_layout(self, epoch: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The step's relations and the running totals of their group sizes (cached per step, so
        the micro steps of one optimizer step share it)."""
        if self._step_cache[0] != (epoch, step):
            self._check_step(epoch, step)
            relations = self._step_relations(epoch, step)
            self._step_cache = ((epoch, step), relations, np.cumsum(self._sizes[relations]))
        return self._step_cache[1], self._step_cache[2]

    def batch_from_groups(self, groups: Sequence[GroupPlan], epoch: int = 0, step: int = 0, micro: int = 0,
                          rows: Optional[tuple[int, int]] = None) -> LocalBatch:
        """Flatten relation groups into a batch; ``rows`` keeps only ``[start, end)`` of it."""
        pairs: list[Pair] = []
        rel_ids: list[int] = []
        is_pos: list[bool] = []
        pair_ids: list[int] = []
        for rel, pos, neg in groups:
            group = self.dataset.relations[rel]
            for positive, idx in ((True, pos), (False, neg)):
                source = group.positives if positive else group.negatives
                ids = self._pos_pair_ids[rel] if positive else self._neg_pair_ids[rel]
                for j in idx:
                    pairs.append(tuple(source[j]))
                    rel_ids.append(rel)
                    is_pos.append(positive)
                    pair_ids.append(ids[j])
        if rows is not None:
            start, end = rows
            pairs, rel_ids, is_pos, pair_ids = pairs[start:end], rel_ids[start:end], is_pos[start:end], \
                pair_ids[start:end]
        relation_ids = torch.tensor(rel_ids, dtype=torch.long)
        return LocalBatch(
            pairs=pairs,
            relation_ids=relation_ids,
            is_positive=torch.tensor(is_pos, dtype=torch.bool),
            parent_ids=self._parents[relation_ids] if rel_ids else torch.zeros(0, dtype=torch.long),
            pair_ids=torch.tensor(pair_ids, dtype=torch.long),
            epoch=epoch,
            step=step,
            micro=micro,
        )

    def _check_step(self, epoch: int, step: int) -> None:
        if epoch < 0 or not 0 <= step < self.steps_per_epoch:
            raise ValueError(
                f"step ({epoch}, {step}) is outside the epoch: steps run 0..{self.steps_per_epoch - 1}"
            )

    def describe(self) -> dict[str, Any]:
        """The plan's sizes for the log and ``--dry_run``: prompts per micro step and per rank."""
        groups = self.plan(0, 0)
        micro = [groups[a:b] for a, b in split_evenly(len(groups), self.accumulation)]
        per_rank = [[b - a for a, b in self.rank_rows(m)] for m in micro]
        return {"relations_per_step": self.relations_per_step, "accumulation": self.accumulation,
                "world_size": self.world_size, "shard_by": self.shard_by, "steps_per_epoch": self.steps_per_epoch,
                "prompts_per_step": sum(self.group_size(r) for r, _, _ in groups),
                "prompts_per_rank_first_step": per_rank}

    # ---------------------------------------------------------------- resume

    def _make_fingerprint(self) -> dict[str, Any]:
        """What a checkpoint's position is only meaningful for (the world size is not: the plan
        does not depend on it)."""
        digest = hashlib.sha256(
            json.dumps(
                [[g.relation_type, g.parent, [list(p) for p in g.positives], [list(p) for p in g.negatives]]
                 for g in self.dataset.relations],
                ensure_ascii=False,
            ).encode("utf-8")
        ).hexdigest()[:16]
        fingerprint = {
            "n_relations": len(self.dataset.relations),
            "relations_per_step": self.relations_per_step,
            "accumulation": self.accumulation,
            "positives_per_relation": self.positives_per_relation,
            "negatives_per_relation": self.negatives_per_relation,
            "seed": self.seed,
            "tail": self.tail,
            "parent_grouping": self.parent_grouping,
            "relation_weights": None if self.weights is None else [round(w, 9) for w in self.weights],
            "dataset": f"{self.dataset.name}/{self.dataset.split}",
            "dataset_digest": digest,
        }
        if self.weights is not None:  # weighted plans before this scheme differ: refuse to mix them
            fingerprint["weights_plan"] = _WEIGHTS_PLAN
        return fingerprint

    def state_dict(self) -> dict[str, Any]:
        """The fingerprint a checkpoint's progress belongs to (plain JSON-able types)."""
        return {"version": _STATE_VERSION, "fingerprint": dict(self._fingerprint)}

    def check_state(self, state: Any) -> None:
        """:class:`CheckpointError` when a checkpoint's sampler state is not this plan's."""
        if not isinstance(state, dict) or "fingerprint" not in state:
            raise CheckpointError(
                "the checkpoint has no sampler state (fingerprint): it was not written by relbert-ds's trainer; "
                "fix: start a fresh run or point --resume at a relbert-ds checkpoint"
            )
        saved = state["fingerprint"]
        for key, ours in self._fingerprint.items():
            theirs = saved.get(key)
            if theirs != ours:
                raise CheckpointError(_mismatch_message(key, theirs, ours))

    def check_position(self, epoch: int, step: int) -> None:
        """:class:`CheckpointError` when a saved position lies outside this plan's epochs."""
        if epoch < 0 or not 0 <= step < self.steps_per_epoch:
            raise CheckpointError(
                f"the checkpoint's position (epoch {epoch}, step {step}) is outside this run's "
                f"{self.steps_per_epoch} steps per epoch: the checkpoint is damaged; fix: resume from an earlier one"
            )


def _rows_through(ends: np.ndarray, group: int) -> int:
    """Rows of a step up to and including ``group`` (``ends``: running totals of group sizes; -1: 0)."""
    return int(ends[group]) if group >= 0 else 0


def _spread_repeats(order: list[int], per_step: int) -> list[int]:
    """Move repeated relations out of a step: swap each repeat with a slot of another step (later
    steps first, then earlier ones) that lacks the repeated relation and whose own relation is
    not in this step (deterministic; the multiset is unchanged). A repeat that finds no partner
    is replaced by a filler in :meth:`RelationAwareSampler._step_relations`."""
    order = list(order)
    bounds = [(a, min(a + per_step, len(order))) for a in range(0, len(order), per_step)]
    members = [Counter(order[a:b]) for a, b in bounds]
    for k, (start, end) in enumerate(bounds):
        for i in range(start, end):
            rel = order[i]
            if members[k][rel] < 2:
                continue
            for k2 in [*range(k + 1, len(bounds)), *range(k)]:
                if members[k2][rel]:
                    continue
                j = next((j for j in range(*bounds[k2]) if not members[k][order[j]]), None)
                if j is not None:
                    other = order[j]
                    order[i], order[j] = other, rel
                    members[k][rel] -= 1
                    members[k][other] += 1
                    members[k2][other] -= 1
                    members[k2][rel] += 1
                    break
    if any(c > 1 for m in members for c in m.values()):
        return _deal_steps(order, bounds)
    return order


def _deal_steps(order: list[int], bounds: list[tuple[int, int]]) -> list[int]:
    """Steps without repeats when pairwise swaps got stuck (a weight close to the steps of an
    epoch), by the Gale-Ryser construction: relations by decreasing count, each one's copies into
    the steps with the most free places. Inside a step relations keep their order of first
    appearance."""
    counts = Counter(order)
    first = {rel: i for i, rel in reversed(list(enumerate(order)))}
    free = [b - a for a, b in bounds]
    steps: list[list[int]] = [[] for _ in bounds]
    for rel in sorted(counts, key=lambda r: (-counts[r], first[r])):
        open_steps = sorted((k for k in range(len(free)) if free[k] > 0), key=lambda k: -free[k])
        chosen = open_steps[:counts[rel]]
        if len(chosen) < counts[rel]:
            return order  # no arrangement: _step_relations replaces what repeats
        for k in chosen:
            steps[k].append(rel)
            free[k] -= 1
    return [rel for step in steps for rel in sorted(step, key=first.__getitem__)]


@functools.lru_cache(maxsize=1024)  # a few distinct weights, looked up once per relation
def _exact_weight(w: float) -> Fraction:
    """The weight as the fraction it was most likely written as (0.1 -> 1/10); the float's exact
    value when no fraction with a small denominator is that close."""
    exact = Fraction(w)
    near = exact.limit_denominator(_WEIGHT_DENOMINATOR)
    return near if near > 0 and abs(near - exact) * 10**12 <= exact else exact


def _carry_terms(weights: Sequence[float], seed: int) -> list[tuple[int, int, int]]:
    """Per relation ``(num, off, den)`` with ``(num*e + off) // den == floor(w*e + phase)``.

    The relations of one weight ``w = a/b`` (``n`` of them, dataset order) get the phases
    ``(j + u/2**32)/n`` for a seeded permutation ``j`` and one seeded offset ``u``: evenly spread,
    so the group's total per epoch stays within one of ``n*w`` (Hermite's identity).
    """
    weights = [_exact_weight(w) for w in weights]
    groups: dict[Fraction, list[int]] = {}
    for i, w in enumerate(weights):
        groups.setdefault(w, []).append(i)
    g = _generator(seed, _TAG_PHASE)
    scale = 1 << _PHASE_BITS
    terms: list[tuple[int, int, int]] = [(0, 0, 1)] * len(weights)
    for w, members in groups.items():
        n, a, b = len(members), w.numerator, w.denominator
        positions = torch.randperm(n, generator=g).tolist()
        u = int(torch.randint(0, scale, (1,), generator=g))
        for i, j in zip(members, positions):
            # floor(a/b * e + (j*scale + u)/(n*scale)) over one common denominator
            terms[i] = (a * n * scale, b * (j * scale + u), b * n * scale)
    return terms


def _check_weights_fit(s: RelationAwareSampler) -> None:
    """A step holds a relation once, and the last step of an epoch may be partial (or skipped),
    so an epoch of S steps can place a relation S - 1 times for certain (once when S is 1)."""
    if s.weights is None:
        return
    heaviest = max(s.weights)
    places, most = math.ceil(_exact_weight(heaviest)), max(1, s.steps_per_epoch - 1)
    if places > most:
        raise ConfigError(f"a relation sampling weight of {heaviest:g} needs up to {places} places per epoch, but "
                          f"an epoch of {s.steps_per_epoch} steps holds a relation at most {most} times (once per "
                          f"step, the last step may be partial); fix: lower that weight (--train_weights) to at "
                          f"most {most}, or lower --relations_per_step for more steps per epoch")


def _check_weights(weights: Optional[Sequence[float]], n: int) -> Optional[list[float]]:
    if weights is None:
        return None
    values = [float(w) for w in weights]
    if len(values) != n:
        raise ConfigError(f"{len(values)} relation weights for {n} relations; fix: give one weight per relation")
    bad = [w for w in values if not (math.isfinite(w) and w > 0)]
    if bad:
        raise ConfigError(f"sampling weight {bad[0]!r} is not a positive number; fix: use weights > 0")
    return None if all(w == 1.0 for w in values) else values


def _check_against_data(s: RelationAwareSampler) -> None:
    """Knobs that depend on the data: distinct relations per step, a prompt for every rank."""
    n = len(s.dataset.relations)
    label = f"{s.dataset.name}/{s.dataset.split}" if s.dataset.split else s.dataset.name
    if n == 0:
        raise ConfigError(f"the training set {label} has no relations; fix: check the data file {s.dataset.source!r}")
    if s.relations_per_step > n:
        raise ConfigError(f"--relations_per_step {s.relations_per_step} exceeds the {n} relations of {label} (a "
                          f"global batch holds each relation at most once); fix: use --relations_per_step {n} or "
                          f"less (more ranks can share a smaller batch: it is divided by prompts)")
    per_micro = s.relations_per_step // s.accumulation
    if s.shard_by == "relation" and per_micro < s.world_size:
        raise ConfigError(f"--shard_by relation needs a whole relation per rank: {per_micro} relations per micro "
                          f"step for {s.world_size} ranks; fix: raise --relations_per_step to at least "
                          f"{s.world_size * s.accumulation}, or use --shard_by prompt")
    smallest = sorted(s.group_size(r) for r in range(n))[:per_micro]
    if sum(smallest) < s.world_size:
        raise ConfigError(f"a micro step of {per_micro} relations can hold as few as {sum(smallest)} prompts, fewer "
                          f"than the {s.world_size} ranks (each rank needs one); fix: raise --relations_per_step or "
                          f"use fewer ranks")


_KNOB_OPTION = {
    "relations_per_step": "--relations_per_step",
    "accumulation": "gradient_accumulation_steps",
    "positives_per_relation": "--positives_per_relation",
    "negatives_per_relation": "--negatives_per_relation",
    "seed": "--seed",
    "tail": "--tail",
    "parent_grouping": "--parent_grouping",
    "relation_weights": "the sampling weights",
}
_WEIGHTS_PLAN = "carry-v1"  # the weighted scheme of the module docstring


def _mismatch_message(key: str, theirs: Any, ours: Any) -> str:
    """One line naming what differs between a checkpoint and this run, and the fix."""
    if key in ("n_relations", "dataset", "dataset_digest"):
        return (f"checkpoint was written on different training data ({key}: {theirs}, this run: {ours}); fix: "
                f"resume with the same training set, or start a new run")
    if key == "weights_plan":
        return (f"checkpoint was written by a relbert-ds whose weighted batch plan differs ({theirs}, this run: "
                f"{ours}); fix: resume it with the relbert-ds version that wrote it, or start a new run")
    label = _KNOB_OPTION.get(key, key)
    return f"checkpoint was written with {label} = {theirs}, this run has {ours}; fix: resume with {label} = " \
           f"{theirs}, or start a new run"

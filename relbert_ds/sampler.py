"""The relation-aware distributed sampler: one global batch per step, planned alike on every rank.

Every step the *global* batch holds ``relations_per_rank * world_size`` distinct relations;
rank ``r`` takes the ``r``-th run of ``relations_per_rank`` whole relation groups. Each group
carries ``min(positives_per_relation, available)`` positives and up to
``negatives_per_relation`` of the relation's own negatives. The plan is a pure function of
``(seed, epoch, step, dataset, knobs)`` built from CPU ``torch.Generator`` streams seeded
with integers mixed by SplitMix64 (never Python's salted ``hash()``), so every rank and
every platform computes the same plan without communicating, and every rank runs the same
number of steps (no collective can hang on an uneven tail).

Relation order per epoch: a permutation seeded by ``(seed, epoch)``. With
``parent_grouping`` the parents are permuted and the relations of each parent kept
adjacent (permuted inside the parent), so siblings tend to share a global batch and act as
hard negatives for each other. Relations without a parent are groups of their own.

Uneven tails: ``tail="drop"`` runs ``n_relations // B`` steps (``B`` relations per global
step) and skips the leftover relations this epoch (a new permutation next epoch gives them
their turn); ``tail="fill"`` runs ``ceil(n_relations / B)`` steps and completes the last one
with relations drawn, seeded by ``(seed, epoch, step)``, from those not already in it.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import torch

from relbert_ds.data.schemas import Pair, RelationDataset
from relbert_ds.errors import CheckpointError, ConfigError

__all__ = ["LocalBatch", "RelationAwareSampler", "GroupPlan", "mix_seed"]

# (relation index, positive indices, negative indices) into dataset.relations[i].{positives,negatives}
GroupPlan = tuple[int, list[int], list[int]]

_MASK64 = (1 << 64) - 1
# Stream tags keep the generators of different purposes independent for equal (epoch, step).
_TAG_ORDER, _TAG_PARENTS, _TAG_FILL, _TAG_GROUP = 0x0A, 0x0B, 0x0C, 0x0D
_STATE_VERSION = 1
_TAILS = ("fill", "drop")


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


@dataclass
class LocalBatch:
    """This rank's share of one global step, flattened pair by pair.

    Relation group by group: the group's positives, then its negatives. All tensors have one
    entry per pair (shape ``(n,)``) and live on the CPU; the trainer moves them.
    """

    pairs: list[Pair]
    relation_ids: torch.Tensor  # (n,) long: index of the relation in dataset.relations
    is_positive: torch.Tensor  # (n,) bool
    parent_ids: torch.Tensor  # (n,) long: index into sampler.parent_names, -1 = no parent
    pair_ids: torch.Tensor  # (n,) long: dataset-wide id of the (head, tail) strings
    epoch: int
    step: int

    def __len__(self) -> int:
        return len(self.pairs)


class RelationAwareSampler:
    """Plans global batches of whole relation groups and hands each rank its slice.

    Args:
        dataset: the training relations.
        world_size, rank: the data-parallel world this sampler serves.
        relations_per_rank: relation groups per rank per step (>= 1).
        positives_per_relation: positives drawn per group (>= 2: a contrastive term needs
            an anchor and another positive); fewer when the relation has fewer.
        negatives_per_relation: own negatives drawn per group (>= 0; 0 leaves only the
            in-batch negatives); fewer when the relation has fewer.
        seed: the run's seed; the plan depends on nothing else but the epoch and step.
        tail: ``"fill"`` or ``"drop"`` (see the module docstring).
        parent_grouping: keep relations of one parent adjacent in the epoch order.

    Attributes:
        steps_per_epoch: identical on every rank.
        parent_names: distinct parent names in dataset order (``parent_ids`` index it).
        position: ``(epoch, next step)``, moved by :meth:`advance`, saved by :meth:`state_dict`.
    """

    def __init__(
        self,
        dataset: RelationDataset,
        *,
        world_size: int,
        rank: int,
        relations_per_rank: int = 8,
        positives_per_relation: int = 8,
        negatives_per_relation: int = 8,
        seed: int = 0,
        tail: str = "fill",
        parent_grouping: bool = False,
    ) -> None:
        _validate_knobs(
            dataset, world_size, rank, relations_per_rank, positives_per_relation,
            negatives_per_relation, seed, tail,
        )
        self.dataset = dataset
        self.world_size = world_size
        self.rank = rank
        self.relations_per_rank = relations_per_rank
        self.positives_per_relation = positives_per_relation
        self.negatives_per_relation = negatives_per_relation
        self.seed = int(seed)
        self.tail = tail
        self.parent_grouping = bool(parent_grouping)

        n = len(dataset.relations)
        per_step = relations_per_rank * world_size
        self.relations_per_step = per_step
        self.steps_per_epoch = n // per_step if tail == "drop" else math.ceil(n / per_step)

        self.parent_names: list[str] = []
        self._relation_parent: list[int] = []  # relation index -> parent index or -1
        for group in dataset.relations:
            if group.parent is None:
                self._relation_parent.append(-1)
                continue
            if group.parent not in self.parent_names:
                self.parent_names.append(group.parent)
            self._relation_parent.append(self.parent_names.index(group.parent))

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
        self._order_cache: tuple[int, list[int]] = (-1, [])
        self.position: tuple[int, int] = (0, 0)

    # ---------------------------------------------------------------- planning

    def epoch_order(self, epoch: int) -> list[int]:
        """The relation order of ``epoch`` (a permutation of all relation indices)."""
        if self._order_cache[0] == epoch:
            return list(self._order_cache[1])
        n = len(self.dataset.relations)
        if not self.parent_grouping:
            order = torch.randperm(n, generator=_generator(self.seed, epoch, _TAG_ORDER)).tolist()
        else:
            order = self._grouped_order(epoch)
        self._order_cache = (epoch, order)
        return list(order)

    def _grouped_order(self, epoch: int) -> list[int]:
        """Parents in a permuted order, each parent's relations adjacent and permuted."""
        groups: dict[Any, list[int]] = {}  # key: parent index, or ("solo", i) without parent
        for i, p in enumerate(self._relation_parent):
            groups.setdefault(p if p >= 0 else ("solo", i), []).append(i)
        keys = list(groups)  # dataset order: deterministic
        g = _generator(self.seed, epoch, _TAG_PARENTS)
        order: list[int] = []
        for k in torch.randperm(len(keys), generator=g).tolist():
            members = groups[keys[k]]
            order.extend(members[j] for j in torch.randperm(len(members), generator=g).tolist())
        return order

    def _step_relations(self, epoch: int, step: int) -> list[int]:
        """The ``relations_per_step`` distinct relation indices of one global step."""
        per_step = self.relations_per_step
        chosen = self.epoch_order(epoch)[step * per_step:(step + 1) * per_step]
        missing = per_step - len(chosen)
        if missing > 0:  # only the last step under tail="fill"
            taken = set(chosen)
            rest = [i for i in range(len(self.dataset.relations)) if i not in taken]
            g = _generator(self.seed, epoch, step, _TAG_FILL)
            chosen += [rest[j] for j in torch.randperm(len(rest), generator=g)[:missing].tolist()]
        return chosen

    def _group(self, epoch: int, step: int, relation: int) -> GroupPlan:
        """Positives and negatives of one relation at one step, drawn without replacement."""
        group = self.dataset.relations[relation]
        g = _generator(self.seed, epoch, step, relation, _TAG_GROUP)
        pos = torch.randperm(len(group.positives), generator=g)[: self.positives_per_relation].tolist()
        neg = torch.randperm(len(group.negatives), generator=g)[: self.negatives_per_relation].tolist()
        return relation, pos, neg

    def plan(self, epoch: int, step: int) -> list[list[GroupPlan]]:
        """The GLOBAL batch of ``(epoch, step)``: per rank, its relation groups.

        ``plan(e, s)[r]`` is rank ``r``'s list of ``(relation index, positive indices,
        negative indices)``. Identical on every rank (no communication needed).
        """
        self._check_step(epoch, step)
        relations = self._step_relations(epoch, step)
        groups = [self._group(epoch, step, rel) for rel in relations]
        r = self.relations_per_rank
        return [groups[k * r:(k + 1) * r] for k in range(self.world_size)]

    def local_batch(self, epoch: int, step: int) -> LocalBatch:
        """This rank's slice of :meth:`plan`, flattened into pairs and id tensors."""
        return self.batch_from_groups(self.plan(epoch, step)[self.rank], epoch, step)

    def batch_from_groups(self, groups: list[GroupPlan], epoch: int = 0, step: int = 0) -> LocalBatch:
        """Flatten relation groups (e.g. one rank's, or all ranks' concatenated) into a batch."""
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
        relation_ids = torch.tensor(rel_ids, dtype=torch.long)
        parents = torch.tensor(self._relation_parent, dtype=torch.long)
        return LocalBatch(
            pairs=pairs,
            relation_ids=relation_ids,
            is_positive=torch.tensor(is_pos, dtype=torch.bool),
            parent_ids=parents[relation_ids] if rel_ids else torch.zeros(0, dtype=torch.long),
            pair_ids=torch.tensor(pair_ids, dtype=torch.long),
            epoch=epoch,
            step=step,
        )

    def _check_step(self, epoch: int, step: int) -> None:
        if epoch < 0 or not 0 <= step < self.steps_per_epoch:
            raise ValueError(
                f"step ({epoch}, {step}) is outside the epoch: steps run 0..{self.steps_per_epoch - 1}"
            )

    # ---------------------------------------------------------------- position and resume

    def advance(self) -> tuple[int, int]:
        """Move :attr:`position` to the next step (rolling over to the next epoch)."""
        epoch, step = self.position
        step += 1
        if step >= self.steps_per_epoch:
            epoch, step = epoch + 1, 0
        self.position = (epoch, step)
        return self.position

    def _make_fingerprint(self) -> dict[str, Any]:
        """What a checkpoint's position is only meaningful for (rank excluded: all ranks share it)."""
        digest = hashlib.sha256(
            json.dumps(
                [[g.relation_type, g.parent, [list(p) for p in g.positives], [list(p) for p in g.negatives]]
                 for g in self.dataset.relations],
                ensure_ascii=False,
            ).encode("utf-8")
        ).hexdigest()[:16]
        return {
            "n_relations": len(self.dataset.relations),
            "world_size": self.world_size,
            "relations_per_rank": self.relations_per_rank,
            "positives_per_relation": self.positives_per_relation,
            "negatives_per_relation": self.negatives_per_relation,
            "seed": self.seed,
            "tail": self.tail,
            "parent_grouping": self.parent_grouping,
            "dataset": f"{self.dataset.name}/{self.dataset.split}",
            "dataset_digest": digest,
        }

    def state_dict(self) -> dict[str, Any]:
        """The position plus the fingerprint it belongs to (plain JSON-able types)."""
        return {
            "version": _STATE_VERSION,
            "position": list(self.position),
            "fingerprint": dict(self._fingerprint),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position; :class:`CheckpointError` if the run does not match."""
        if not isinstance(state, dict) or "position" not in state or "fingerprint" not in state:
            raise CheckpointError(
                "the checkpoint has no sampler state (position and fingerprint): it was not "
                "written by relbert-ds's trainer; start a fresh run or point --resume at a relbert-ds checkpoint"
            )
        saved = state["fingerprint"]
        for key, ours in self._fingerprint.items():
            theirs = saved.get(key)
            if theirs != ours:
                raise CheckpointError(_mismatch_message(key, theirs, ours))
        epoch, step = (int(v) for v in state["position"])
        if epoch < 0 or not 0 <= step < self.steps_per_epoch:
            raise CheckpointError(
                f"the checkpoint's sampler position (epoch {epoch}, step {step}) is outside this "
                f"run's {self.steps_per_epoch} steps per epoch: the checkpoint is damaged; resume from an earlier one"
            )
        self.position = (epoch, step)


_KNOB_OPTION = {
    "relations_per_rank": "relations per rank",
    "positives_per_relation": "positives per relation",
    "negatives_per_relation": "negatives per relation",
    "seed": "seed",
    "tail": "tail",
    "parent_grouping": "parent grouping",
}


def _mismatch_message(key: str, theirs: Any, ours: Any) -> str:
    """One line naming what differs between a checkpoint and this run, and the fix."""
    if key == "world_size":
        return (
            f"checkpoint was written with world size {theirs}, this run has {ours}: resume with "
            f"the same number of ranks ({theirs}), or start a new run (the sampler's plan and "
            f"the global batch depend on the world size)"
        )
    if key in ("n_relations", "dataset", "dataset_digest"):
        return (
            f"checkpoint was written on different training data ({key}: {theirs}, this run: "
            f"{ours}): resume with the same training set, or start a new run"
        )
    label = _KNOB_OPTION.get(key, key)
    return (
        f"checkpoint was written with {label} = {theirs}, this run has {ours}: resume with "
        f"{label} = {theirs}, or start a new run"
    )


def _validate_knobs(
    dataset: RelationDataset,
    world_size: int,
    rank: int,
    relations_per_rank: int,
    positives_per_relation: int,
    negatives_per_relation: int,
    seed: int,
    tail: str,
) -> None:
    """ConfigError, naming the fix, for any knob the sampler cannot honour."""

    def _is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not _is_int(world_size) or world_size < 1:
        raise ConfigError(f"world size must be an integer >= 1, got {world_size!r}")
    if not _is_int(rank) or not 0 <= rank < world_size:
        raise ConfigError(f"rank must be in 0..{world_size - 1} for world size {world_size}, got {rank!r}")
    if not _is_int(relations_per_rank) or relations_per_rank < 1:
        raise ConfigError(f"relations_per_rank must be an integer >= 1, got {relations_per_rank!r}: set it to 1 or more")
    if not _is_int(positives_per_relation) or positives_per_relation < 2:
        raise ConfigError(
            f"positives_per_relation must be an integer >= 2 (an anchor and another positive), "
            f"got {positives_per_relation!r}: set it to 2 or more"
        )
    if not _is_int(negatives_per_relation) or negatives_per_relation < 0:
        raise ConfigError(
            f"negatives_per_relation must be an integer >= 0, got {negatives_per_relation!r}: "
            f"set it to 0 (in-batch negatives only) or more"
        )
    if not _is_int(seed):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    if tail not in _TAILS:
        raise ConfigError(f"tail must be one of {', '.join(_TAILS)}, got {tail!r}")
    n = len(dataset.relations)
    label = f"{dataset.name}/{dataset.split}" if dataset.split else dataset.name
    if n == 0:
        raise ConfigError(f"the training set {label} has no relations: check the data file {dataset.source!r}")
    per_step = relations_per_rank * world_size
    if per_step > n:
        if n // world_size >= 1:
            fix = f"lower relations_per_rank to at most {n // world_size}"
        else:
            fix = f"use at most {n} ranks (each rank needs one whole relation per step)"
        raise ConfigError(
            f"relations_per_rank x world size = {per_step} exceeds the {n} relations of {label}; {fix}"
        )

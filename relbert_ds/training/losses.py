"""Relation losses with exact cross-device negatives (pure torch; no DeepSpeed here).

Every rank passes its LOCAL embeddings ``(n, d)`` and id tensors ``(n,)``. The loss gathers
the embeddings of all ranks *with autograd* and the ids without, and scores its local
anchors against the global candidates: every anchor sees every relation of the global
batch. Work is ``O(n_local x N_global)`` per rank, not ``O(N^2)``.

Vocabulary (``N`` = global batch, ``n`` = local rows, ``i`` an anchor, ``k`` a candidate):

* anchors are the positives of a relation ``r`` (negatives are never anchors);
* positives of ``i``: the other positives of ``r`` whose (head, tail) strings differ from
  ``i``'s (``pair_id``): ``i`` itself and duplicates are never scored against ``i``;
* negatives of ``i``: ``r``'s own negatives plus the positives of every *other* relation
  of the global batch (RelBERT 2023); never a candidate whose pair is a positive of ``r``
  somewhere in the global batch (an identical pair listed under another relation, or on
  another rank, would be a false negative). Other relations' own negatives are neither.

Exact data-parallel scaling. DeepSpeed/DDP *average* parameter gradients over the ``W``
ranks, and the autograd gather *sums* into each rank's local embeddings the gradients that
every rank's copy of them received. Each loss is a mean over ``T`` terms of the whole
global batch (``T`` from an all-reduce, so identical on every rank), and rank ``r``
backpropagates ``loss_r = W * (sum of the terms whose anchor is on r) / T``, so that
``mean_r grad(loss_r) == grad(global mean)``. ``LossOutput.value`` is the global mean
itself (all-reduced sum / ``T``), identical on every rank; with ``W = 1`` ``loss == value``.

Precision: embeddings are promoted to at least fp32 before any arithmetic (fp64 input stays
fp64, which the tests use to compare with naive loops at 1e-10).
"""
from __future__ import annotations

import math
from functools import cached_property
from typing import Any, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from relbert_ds.errors import ConfigError
from relbert_ds.parallel import collectives

__all__ = [
    "LossOutput",
    "RelationLoss",
    "NCELoss",
    "InfoLOOBLoss",
    "TripletLoss",
    "ClassificationLoss",
    "CombinedLoss",
    "LOSS_NAMES",
    "build_loss",
    "check_loss_options",
]

LOSS_NAMES = ("nce", "iloob", "triplet")



def _masked_logit(dtype: torch.dtype) -> float:
    """Finite "minus infinity" for masked logits of ``dtype``: exp() of it is exactly 0 next to real
    logits, yet an all-masked row stays finite, so no inf - inf = NaN reaches the gradients. The
    dtype's own minimum: a fixed -1e9 overflows to -inf in fp16 (autocast)."""
    return torch.finfo(dtype).min


class _EuclideanDistance(torch.autograd.Function):
    """``torch.cdist(a, c)`` forward (direct differences), backward as two matrix products.

    torch's own cdist backward on CUDA materialises (n, N, H) differences, twice: ~55 GB at
    RelBERT-2021 batch shapes. The gradient of ``d_ij = |a_i - c_j|`` is ``(a_i - c_j) / d_ij``, so
    with ``W = g / d`` (0 where ``d`` is 0, as cdist defines it) ``grad_a = a * rowsum(W) - W c``
    and ``grad_c = c * colsum(W) - W^T a``: memory (n, N), not (n, N, H).
    """

    @staticmethod
    def forward(ctx: Any, a: Tensor, c: Tensor) -> Tensor:
        d = torch.cdist(a, c, compute_mode="donot_use_mm_for_euclid_dist")
        ctx.save_for_backward(a, c, d)
        return d

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        a, c, d = ctx.saved_tensors
        w = torch.where(d > 0, grad / d.clamp_min(torch.finfo(d.dtype).tiny), grad.new_zeros(()))
        grad_a = a * w.sum(dim=1, keepdim=True) - w @ c
        grad_c = c * w.sum(dim=0).unsqueeze(1) - w.T @ a
        return grad_a, grad_c


def euclidean_distance(a: Tensor, c: Tensor) -> Tensor:
    """(n, N) Euclidean distances of the rows of ``a`` (n, H) and ``c`` (N, H), with a backward that
    needs no (n, N, H) buffer (see ``_EuclideanDistance``)."""
    return _EuclideanDistance.apply(a, c)


class LossOutput(NamedTuple):
    """What a loss returns on each rank (a NamedTuple, not a dataclass: DeepSpeed's ZeRO-3
    hooks find the loss tensor inside tuples, lists and dicts only).

    ``loss`` is what this rank backpropagates (scaled as in the module docstring);
    ``value`` the global mean loss, identical on all ranks, for logging; ``metrics`` global
    batch statistics, identical on all ranks (NaN when a statistic has no members):
    ``pos_cos`` mean cosine of an anchor and its positives, ``neg_cos`` mean cosine of an
    anchor and its negatives, ``retrieval_acc`` fraction of anchors whose most similar
    other global candidate (itself and identical pairs excluded) is a pair that is a
    positive of the anchor's relation.
    """

    loss: Tensor
    value: float
    metrics: dict[str, float]


# A family of terms: (sum of this rank's terms, with autograd; number of them, no grad).
# A loss is the sum over its families of each family's global mean.
_Family = tuple[Tensor, Tensor]


class _GlobalBatch:
    """The global candidates and this rank's anchors, with the masks every loss shares.

    Anchors are this rank's positive rows (``n`` of them); masks are ``(n, N)`` bools
    indexed [local anchor, global candidate column]. ``a_pos`` is all True; the masks keep
    it anyway so that they read as the definitions in the module docstring.
    """

    def __init__(
        self,
        embeddings: Tensor,
        relation_ids: Tensor,
        is_positive: Tensor,
        parent_ids: Optional[Tensor],
        pair_ids: Optional[Tensor],
        row_counts: Optional[Sequence[int]] = None,
        gather_dtype: Optional[torch.dtype] = None,
    ) -> None:
        if embeddings.dim() != 2:
            raise ValueError(f"embeddings must be (n, d), got shape {tuple(embeddings.shape)}")
        n = embeddings.shape[0]
        for name, t in (("relation_ids", relation_ids), ("is_positive", is_positive),
                        ("parent_ids", parent_ids), ("pair_ids", pair_ids)):
            if t is None and name in ("relation_ids", "is_positive"):
                raise ValueError(f"{name} is required")
            if t is not None and tuple(t.shape) != (n,):
                raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
        emb = embeddings if embeddings.dtype == torch.float64 else embeddings.float()
        device = emb.device
        self.rank, self.world_size = collectives.world_info()
        # Every rank's row count: from the batch plan when the caller passes it, else one size exchange.
        sizes = list(row_counts) if row_counts is not None else collectives.gather_sizes(n, device)
        self.offset = sum(sizes[: self.rank])

        def _long(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=torch.long)

        local_rows = torch.arange(self.offset, self.offset + n, device=device)
        ids = torch.stack(
            [
                _long(relation_ids),
                _long(is_positive),
                _long(parent_ids) if parent_ids is not None else torch.full_like(local_rows, -1),
                _long(pair_ids) if pair_ids is not None else -1 - local_rows,  # each row its own pair
            ],
            dim=1,
        )  # (n, 4)
        # One collective for the embeddings (autograd; in ``gather_dtype`` on the wire) and the ids.
        payload = gather_dtype if gather_dtype not in (None, torch.float32) else None  # fp64 stays fp64
        self.cand, gids = collectives.gather_rows(emb, ids, sizes, payload)  # (N, d), (N, 4)
        self.rel, self.pos, self.par, self.pair = gids[:, 0], gids[:, 1].bool(), gids[:, 2], gids[:, 3]
        # Only positives are anchors: the (n_anchors, N) matrices skip the local negatives
        # (with RelBERT's 400 negatives per relation that is ~40x less work and memory).
        local_pos = self.pos[self.offset:self.offset + n]
        rows = self.offset + torch.nonzero(local_pos).squeeze(1)  # (n_anchors,) global rows
        self.n = int(rows.numel())
        # Anchors are read from the gathered tensor: every rank's loss then runs through the
        # gather, so every rank joins its backward collective even with nothing local.
        self.anchors = self.cand[rows]  # (n_anchors, d)
        self.a_rel, self.a_pos, self.a_par, self.a_pair = (
            self.rel[rows], self.pos[rows], self.par[rows], self.pair[rows],
        )

    # ------------------------------------------------------------------ similarities

    @cached_property
    def cosine(self) -> Tensor:
        """(n, N) cosine similarity of local anchors and global candidates (autograd)."""
        a = F.normalize(self.anchors, dim=1)
        c = F.normalize(self.cand, dim=1)
        return a @ c.T

    @cached_property
    def distance(self) -> Tensor:
        """(n, N) Euclidean distance, computed directly (no ||a||^2+||b||^2-2ab cancellation)."""
        return euclidean_distance(self.anchors, self.cand)

    # ------------------------------------------------------------------ masks

    @cached_property
    def same_rel(self) -> Tensor:
        return self.a_rel[:, None] == self.rel[None, :]

    @cached_property
    def same_pair(self) -> Tensor:
        return self.a_pair[:, None] == self.pair[None, :]

    def _pair_in(self, member: Tensor) -> Tensor:
        """(n, N): candidate k's pair equals the pair of some j with ``member[i, j]``."""
        uniq, inv = torch.unique(self.pair, return_inverse=True)  # (N,) -> 0..U-1
        hits = torch.zeros(self.n, uniq.numel(), device=member.device)
        hits.index_add_(1, inv, member.to(hits.dtype))  # (n, U): how often i's set holds pair u
        return hits[:, inv] > 0

    @cached_property
    def relation_positive_pair(self) -> Tensor:
        """(n, N): candidate's pair is a positive of the anchor's relation in this batch."""
        return self._pair_in(self.same_rel & self.pos[None, :])

    @cached_property
    def positives(self) -> Tensor:
        """(n, N): other positives of the anchor's relation, identical pairs excluded."""
        return self.a_pos[:, None] & self.same_rel & self.pos[None, :] & ~self.same_pair

    @cached_property
    def own_negatives(self) -> Tensor:
        """(n, N): the anchor relation's own negatives (never a pair that is also its positive)."""
        return self.a_pos[:, None] & self.same_rel & ~self.pos[None, :] & ~self.relation_positive_pair

    @cached_property
    def in_batch_negatives(self) -> Tensor:
        """(n, N): positives of the other relations (never a pair that is a positive of r)."""
        return self.a_pos[:, None] & ~self.same_rel & self.pos[None, :] & ~self.relation_positive_pair

    @cached_property
    def negatives(self) -> Tensor:
        """(n, N): the RelBERT 2023 negative set: own negatives + other relations' positives."""
        return self.own_negatives | self.in_batch_negatives

    @cached_property
    def same_parent(self) -> Tensor:
        """(n, N): both rows have a parent and it is the same one."""
        return (self.a_par[:, None] >= 0) & (self.a_par[:, None] == self.par[None, :])

    @cached_property
    def sibling_positives(self) -> Tensor:
        """(n, N): positives of a sibling relation (same parent, other relation)."""
        return (self.a_pos[:, None] & self.same_parent & ~self.same_rel & self.pos[None, :]
                & ~self.same_pair)

    @cached_property
    def other_parent_positives(self) -> Tensor:
        """(n, N): positives of relations of another parent, never a pair of the anchor's parent."""
        parent_pair = self._pair_in(self.same_parent & self.pos[None, :])
        other = (self.a_par[:, None] >= 0) & (self.par[None, :] >= 0) & ~self.same_parent
        return self.a_pos[:, None] & other & self.pos[None, :] & ~parent_pair

    # ------------------------------------------------------------------ reduction

    def metric_stats(self) -> Tensor:
        """[pos_cos sum, count, neg_cos sum, count, retrieval hits, anchors] of local anchors."""
        if self.cand.shape[0] == 0:  # an empty global batch has nothing to measure
            return torch.zeros(6, dtype=torch.float64, device=self.cand.device)
        with torch.no_grad():
            sims = self.cosine.detach().double()  # (n, N)
            pos, neg = self.positives, self.negatives
            others = ~self.same_pair  # every candidate but the anchor's own pair (and copies)
            best = sims.masked_fill(~others, -math.inf).argmax(dim=1)  # (n,)
            hit = self.relation_positive_pair.gather(1, best[:, None])[:, 0]  # (n,)
            counted = self.a_pos & others.any(dim=1)
            return torch.stack([
                sims[pos].sum(), pos.sum().double(),
                sims[neg].sum(), neg.sum().double(),
                (hit & counted).sum().double(), counted.sum().double(),
            ])

    def reduce(self, groups: dict[str, list[_Family]]) -> LossOutput:
        """One all-reduce of every family's (sum, count) and the metrics, then scale."""
        families = [f for fams in groups.values() for f in fams]
        local = torch.cat([
            torch.stack([s.detach().double() for s, _ in families]) if families else self.cand.new_zeros(0).double(),
            torch.stack([c.double() for _, c in families]) if families else self.cand.new_zeros(0).double(),
            self.metric_stats().to(self.cand.device),
        ])
        total = collectives.all_reduce_sum(local).tolist()
        k = len(families)
        sums, counts, stats = total[:k], total[k:2 * k], total[2 * k:]
        loss = self.anchors.sum() * 0.0  # keeps the graph (and the gather) alive with no terms
        means: list[float] = []
        for (local_sum, _), count in zip(families, counts):
            # W * local share / global count: averaged over ranks this is the global mean's gradient.
            loss = loss + local_sum * (self.world_size / max(count, 1.0))
        for s, c in zip(sums, counts):
            means.append(s / c if c > 0 else 0.0)
        metrics = {
            "pos_cos": stats[0] / stats[1] if stats[1] > 0 else math.nan,
            "neg_cos": stats[2] / stats[3] if stats[3] > 0 else math.nan,
            "retrieval_acc": stats[4] / stats[5] if stats[5] > 0 else math.nan,
        }
        start = 0
        for name, fams in groups.items():
            if name:
                metrics[f"loss_{name}"] = float(sum(means[start:start + len(fams)]))
            start += len(fams)
        return LossOutput(loss=loss, value=float(sum(means)), metrics=metrics)


def _compact(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Column indices of each row's True entries, left-aligned: idx, valid both (n, P).

    P is the largest row count, so triplet tensors are (n, P, N) rather than (n, N, N).
    """
    p = int(mask.sum(dim=1).max()) if mask.numel() else 0
    order = torch.argsort(mask.to(torch.int32), dim=1, descending=True, stable=True)[:, :p]
    return order, mask.gather(1, order)


def _triplet_family(dist: Tensor, pos: Tensor, neg: Tensor, margin: float) -> _Family:
    """sum / count of max(0, d(a,p) - d(a,n) + margin) over all (a, p, n) of the masks."""
    idx, valid = _compact(pos)  # (n, P)
    d_ap = dist.gather(1, idx)  # (n, P)
    terms = F.relu(d_ap[:, :, None] - dist[:, None, :] + margin)  # (n, P, N)
    mask = valid[:, :, None] & neg[:, None, :]  # (n, P, N)
    return torch.where(mask, terms, terms.new_zeros(())).sum(), mask.sum().to(dist.dtype)


class RelationLoss(torch.nn.Module):
    """Base class: gathers the global batch, lets the subclass build its term families,
    then reduces them exactly (module docstring). Subclasses implement :meth:`families`.
    """

    gather_dtype: torch.dtype = torch.float32  # the embeddings' dtype on the wire

    def forward(
        self,
        embeddings: Tensor,
        relation_ids: Tensor,
        is_positive: Tensor,
        parent_ids: Optional[Tensor] = None,
        pair_ids: Optional[Tensor] = None,
        row_counts: Optional[Sequence[int]] = None,
    ) -> LossOutput:
        """Loss of this rank's rows ``embeddings`` (n, d) with ids of shape (n,).

        ``parent_ids`` -1 (or None) where there is no parent; ``pair_ids`` None treats every
        row as a distinct pair; ``row_counts`` every rank's row count when the caller knows them
        (the sampler's plan; else they are exchanged). Every rank of the process group must call
        it (collectives). The embeddings travel in :attr:`gather_dtype` (fp32 by default; the
        trainer sets bf16 under bf16 training), the loss is computed in fp32.
        """
        batch = _GlobalBatch(embeddings, relation_ids, is_positive, parent_ids, pair_ids, row_counts,
                             self.gather_dtype)
        return batch.reduce(self.family_groups(batch))

    def family_groups(self, batch: _GlobalBatch) -> dict[str, list[_Family]]:
        """Term families by part name ("" for a plain loss)."""
        return {"": self.families(batch)}

    def families(self, batch: _GlobalBatch) -> list[_Family]:  # pragma: no cover - abstract
        raise NotImplementedError


def _check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ConfigError(f"--temperature must be a number > 0, got {temperature!r}; fix: use a positive value "
                          f"(RelBERT uses 0.05)")
    return float(temperature)


def _check_margin(margin: float) -> float:
    if isinstance(margin, bool) or not (isinstance(margin, (int, float)) and margin >= 0):
        raise ConfigError(f"--margin must be a number >= 0, got {margin!r}; fix: use a value >= 0 (RelBERT uses 1.0)")
    return float(margin)


def check_loss_options(name: str, temperature: float = 0.05, margin: float = 1.0) -> None:
    """ConfigError, naming the fix, for a loss name or hyper-parameter the losses refuse (the
    run config calls this at start-up; the loss classes run the same checks)."""
    if str(name).strip().lower() not in LOSS_NAMES:
        raise ConfigError(f"--loss {name!r} is not one of {', '.join(LOSS_NAMES)}; fix: pick one of them (the "
                          f"classification loss is added to any of them with --classification_loss)")
    _check_temperature(temperature)
    _check_margin(margin)


class NCELoss(RelationLoss):
    """InfoNCE of RelBERT 2023 (``"nce"``), over the global batch.

    For every anchor ``i`` (a positive of relation ``r``) and every positive ``j`` of ``i``:
    ``-log(e^{s_ij/t} / (e^{s_ij/t} + sum_k e^{s_ik/t}))``, ``s`` the cosine, ``k`` over
    the negatives of ``i`` (module docstring). The loss is the mean over all ``(i, j)`` of
    the global batch (RelBERT sums; the mean keeps the scale independent of batch size).
    Anchors without any negative are left out: their term carries no contrastive signal
    (it is exactly 0 here, undefined for InfoLOOB) and would only dilute the mean.
    """

    leave_one_out = False

    def __init__(self, temperature: float = 0.05) -> None:
        super().__init__()
        self.temperature = _check_temperature(temperature)

    def families(self, batch: _GlobalBatch) -> list[_Family]:
        logits = batch.cosine / self.temperature  # (n, N)
        neg = batch.negatives
        neg_lse = torch.logsumexp(logits.masked_fill(~neg, _masked_logit(logits.dtype)), dim=1)  # (n,)
        if self.leave_one_out:
            terms = neg_lse[:, None] - logits  # -log(e^x / sum_k e^{x_k})
        else:
            terms = torch.logaddexp(logits, neg_lse[:, None]) - logits  # -log(e^x / (e^x + sum_k))
        valid = batch.positives & neg.any(dim=1, keepdim=True)  # (n, N)
        return [(torch.where(valid, terms, terms.new_zeros(())).sum(), valid.sum().to(terms.dtype))]


class InfoLOOBLoss(NCELoss):
    """InfoLOOB (``"iloob"``): NCE with the positive term dropped from the denominator,
    ``-log(e^{s_ij/t} / sum_k e^{s_ik/t})`` (it can be negative). Same terms and masks.
    """

    leave_one_out = True


class TripletLoss(RelationLoss):
    """RelBERT 2021 triplet loss on Euclidean distances (embeddings not normalised).

    Relation level: every (anchor ``a``, positive ``p``) of a relation ``r`` in both orders
    (which *is* the symmetric loss: swapping a and p is another ordered pair) against every
    negative ``n``: ``r``'s own negatives, plus, with ``in_batch_negatives``, the positives of
    the other relations of the global batch; term ``max(0, |a-p| - |a-n| + margin)``.
    Parent level (``parent_negatives`` and parent ids present): ``p`` a positive of a
    sibling relation (same parent, other relation), ``n`` a positive of a relation of
    another parent (never a pair listed under the anchor's parent).
    The loss is the mean over relation-level triplets plus the mean over parent-level
    triplets: a single mean would let the far more numerous parent triplets drown the
    relation-level signal. Memory is (n_local x P x N), P the most positives of an anchor.
    """

    def __init__(self, margin: float = 1.0, in_batch_negatives: bool = True, parent_negatives: bool = True) -> None:
        super().__init__()
        self.margin = _check_margin(margin)
        self.in_batch_negatives = in_batch_negatives
        self.parent_negatives = parent_negatives

    def families(self, batch: _GlobalBatch) -> list[_Family]:
        dist = batch.distance  # (n, N)
        neg = batch.negatives if self.in_batch_negatives else batch.own_negatives
        out = [_triplet_family(dist, batch.positives, neg, self.margin)]
        if self.parent_negatives:
            out.append(_triplet_family(dist, batch.sibling_positives, batch.other_parent_positives, self.margin))
        return out


class _PromotingLinear(torch.nn.Linear):
    """A Linear computed in its input's dtype (fp32/fp64) whatever its parameters' dtype.

    It must be *called as a module*: under ZeRO-3 DeepSpeed gathers a module's partitioned
    parameters in a forward hook, so reading ``weight`` from outside would see an empty
    shard. Under a bf16/fp16 engine the parameters are half precision: promote them here.
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


class ClassificationLoss(RelationLoss):
    """RelBERT 2021 / SBERT classification loss: ``g(u,v) = sigmoid(W [u; v; |u-v|] + b)``.

    Over the triplets (a, p, n) of the relation level (a an anchor, p one of its positives,
    n one of ``r``'s own negatives, plus other relations' positives with
    ``in_batch_negatives``): ``-log g(a,p) - log(1 - g(a,n))``, mean over triplets; computed
    without a (n, P, N) tensor since the term splits into a p part and an n part. Only the
    scored pairs get features (K x 3d, not n x N x d). Has parameters (a Linear(3d, 1)):
    the trainer must hand them to the optimizer.
    """

    def __init__(self, hidden_size: int, in_batch_negatives: bool = False) -> None:
        super().__init__()
        if not (isinstance(hidden_size, int) and hidden_size >= 1):
            raise ConfigError(f"hidden_size must be an integer >= 1, got {hidden_size!r}")
        self.hidden_size = hidden_size
        self.in_batch_negatives = in_batch_negatives
        self.linear = _PromotingLinear(3 * hidden_size, 1)

    def logits(self, u: Tensor, v: Tensor) -> Tensor:
        """(K,) logits of ``g`` for row-aligned pairs u, v (K, d), in the inputs' dtype."""
        feats = torch.cat([u, v, (u - v).abs()], dim=1)  # (K, 3d)
        return self.linear(feats)[:, 0]

    def families(self, batch: _GlobalBatch) -> list[_Family]:
        pos = batch.positives
        neg = batch.negatives if self.in_batch_negatives else batch.own_negatives
        ia, ic = (pos | neg).nonzero(as_tuple=True)
        z = self.logits(batch.anchors[ia], batch.cand[ic])  # (K,)
        logit = torch.zeros(pos.shape, dtype=z.dtype, device=z.device).index_put((ia, ic), z)  # (n, N)
        n_pos, n_neg = pos.sum(1).to(z.dtype), neg.sum(1).to(z.dtype)  # (n,)
        # Each (p, n) combination of an anchor is one triplet: the p part repeats n_neg times.
        pos_part = (F.softplus(-logit) * pos).sum(1) * n_neg  # -log g(a,p) = softplus(-z)
        neg_part = (F.softplus(logit) * neg).sum(1) * n_pos  # -log(1-g(a,n)) = softplus(z)
        return [((pos_part + neg_part).sum(), (n_pos * n_neg).sum())]


class CombinedLoss(RelationLoss):
    """``main + extra`` over one gather: loss and value are sums; metrics are the shared
    batch metrics plus ``loss_main`` and ``loss_extra`` (each part's global value).
    """

    def __init__(self, main: RelationLoss, extra: RelationLoss) -> None:
        super().__init__()
        self.main = main
        self.extra = extra

    def families(self, batch: _GlobalBatch) -> list[_Family]:
        return self.main.families(batch) + self.extra.families(batch)

    def family_groups(self, batch: _GlobalBatch) -> dict[str, list[_Family]]:
        return {"main": self.main.families(batch), "extra": self.extra.families(batch)}


def build_loss(
    name: str,
    *,
    hidden_size: int,
    temperature: float = 0.05,
    margin: float = 1.0,
    classification: bool = False,
) -> RelationLoss:
    """The loss called ``name`` ("nce", "iloob" or "triplet"), plus the classification loss
    (needs ``hidden_size``) when ``classification`` is set. ConfigError on an unknown name.
    """
    check_loss_options(name, temperature, margin)
    key = str(name).strip().lower()
    if key == "nce":
        main: RelationLoss = NCELoss(temperature)
    elif key == "iloob":
        main = InfoLOOBLoss(temperature)
    else:
        main = TripletLoss(margin)
    if classification:
        return CombinedLoss(main, ClassificationLoss(hidden_size))
    return main

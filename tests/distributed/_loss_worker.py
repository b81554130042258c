"""One rank of the multi-process loss-equivalence test (run by test_loss_multiprocess.py).

Usage: python _loss_worker.py RANK WORLD_SIZE PORT OUT_FILE

Each rank runs a tiny deterministic encoder on its local slice of a RelationAwareSampler
global batch, computes its loss share, backpropagates, averages the parameter gradients
over ranks (what DeepSpeed/DDP do) and saves everything to OUT_FILE for the parent test.
The scenario helpers are shared with the parent, which computes the single-process
reference over the sampler's global batch.

Two launches: 2 ranks (uneven prompt counts, a relation group split across the ranks, a pair
shared across ranks) and :data:`EDGE_WORLD` ranks, where some rank holds only negatives (no
anchor) and some rank a single prompt.
"""
from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from relbert_ds.data.schemas import RelationDataset, RelationGroup  # noqa: E402
from relbert_ds.parallel import collectives  # noqa: E402
from relbert_ds.training.losses import (  # noqa: E402
    ClassificationLoss,
    CombinedLoss,
    InfoLOOBLoss,
    NCELoss,
    RelationLoss,
    TripletLoss,
)
from relbert_ds.training.sampler import LocalBatch, RelationAwareSampler  # noqa: E402

WORLD = 2
EDGE_WORLD = 6
FEATURES, HIDDEN, DIM = 12, 16, 8


def dataset() -> RelationDataset:
    """8 relations, 3 parents, uneven group sizes, and pairs shared between relations."""
    groups = []
    for r in range(8):
        n_pos, n_neg = 3 + r % 4, r % 3  # 3..6 positives, 0..2 negatives
        pos = [(f"h{r}_{i}", f"t{r}_{i}") for i in range(n_pos)]
        neg = [(f"nh{r}_{i}", f"nt{r}_{i}") for i in range(n_neg)]
        pos[-1] = (f"h{(r + 1) % 8}_0", f"t{(r + 1) % 8}_0")  # a positive of the next relation too
        groups.append(RelationGroup(f"R{r}", tuple(pos), tuple(neg), parent=str(r % 3)))
    return RelationDataset("synthetic", "train", tuple(groups))


def sampler(rank: int, world: int = WORLD) -> RelationAwareSampler:
    """4 relations per step on 2 ranks; 2 relations (6-12 prompts) on EDGE_WORLD ranks."""
    return RelationAwareSampler(dataset(), world_size=world, rank=rank, relations_per_step=4 if world == WORLD else 2,
                                positives_per_relation=4, negatives_per_relation=2, seed=11, parent_grouping=True)


def rank_batches(world: int, epoch: int, step: int) -> list[LocalBatch]:
    return [sampler(r, world).local_batch(epoch, step) for r in range(world)]


def _suits(world: int, parts: list[LocalBatch]) -> bool:
    if world == WORLD:
        shared = set(parts[0].pair_ids.tolist()) & set(parts[1].pair_ids.tolist())
        split_group = bool(set(parts[0].relation_ids.tolist()) & set(parts[1].relation_ids.tolist()))
        return len(parts[0]) != len(parts[1]) and bool(shared) and split_group
    no_anchor = any(not bool(p.is_positive.any()) for p in parts)
    return no_anchor and any(len(p) == 1 for p in parts)


def choose_step(world: int = WORLD) -> tuple[int, int]:
    """The first (epoch, step) of the plan that exercises what the launch at ``world`` ranks is
    for: on 2 ranks different row counts, a relation group split across the ranks and a pair on
    both (the padded gather, remote positives, cross-rank duplicate masking); on EDGE_WORLD
    ranks a rank without any positive anchor and a rank with a single prompt."""
    s = sampler(0, world)
    for epoch in range(50):
        for step in range(s.steps_per_epoch):
            if _suits(world, rank_batches(world, epoch, step)):
                return epoch, step
    raise AssertionError(f"no suitable step in the synthetic plan for {world} ranks")


def features(num_pairs: int) -> torch.Tensor:
    """Fixed random input features per pair id (the stand-in for the prompt + backbone)."""
    return torch.randn(num_pairs, FEATURES, generator=torch.Generator().manual_seed(5))


def encoder() -> torch.nn.Module:
    torch.manual_seed(1234)
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, DIM))


def make_loss(case: str) -> RelationLoss:
    torch.manual_seed(99)  # the classification head's init
    return {
        "nce": lambda: NCELoss(0.1),
        "iloob": lambda: InfoLOOBLoss(0.1),
        "triplet": lambda: TripletLoss(margin=1.0),
        "nce+classification": lambda: CombinedLoss(NCELoss(0.1), ClassificationLoss(DIM)),
    }[case]()


CASES = ("nce", "iloob", "triplet", "nce+classification")
BUGGY_CASES = ("nce", "triplet")


def run_case(case: str, batch: LocalBatch, feats: torch.Tensor, row_counts=None,
             gather_dtype: torch.dtype = torch.float32) -> dict:
    """Forward + backward of one loss on ``batch``; grads averaged over ranks. ``row_counts``: the
    ranks' rows from the plan (else the loss exchanges them); ``gather_dtype``: the wire dtype."""
    model, loss_fn = encoder(), make_loss(case)
    loss_fn.gather_dtype = gather_dtype
    params = list(model.parameters()) + list(loss_fn.parameters())
    emb = model(feats[batch.pair_ids])  # (n, DIM) fp32
    out = loss_fn(emb, batch.relation_ids, batch.is_positive, batch.parent_ids, batch.pair_ids, row_counts)
    out.loss.backward()
    _, world = collectives.world_info()
    grads = []
    for p in params:
        g = p.grad.detach().clone()
        if world > 1:  # DeepSpeed/DDP: the MEAN of the ranks' parameter gradients
            torch.distributed.all_reduce(g)
            g /= world
        grads.append(g)
    return {"loss": out.loss.item(), "value": out.value, "metrics": out.metrics, "grads": grads}


_GATHER_ROWS = collectives.gather_rows


def _biased_gather(x: torch.Tensor, ids: torch.Tensor, sizes=None, payload=None):
    """The classic bug (open_clip#616): other ranks' rows gathered without autograd."""
    rank, _ = collectives.world_info()
    sizes = sizes if sizes is not None else collectives.gather_sizes(x.shape[0])
    with torch.no_grad():
        full, gids = _GATHER_ROWS(x.detach(), ids, sizes, payload)
    start = sum(sizes[:rank])
    return torch.cat([full[:start], x, full[start + x.shape[0]:]]), gids


def count_collectives(fn: Callable[[], object]) -> dict[str, int]:
    """Calls of each torch.distributed collective while ``fn`` runs (what one loss step issues)."""
    counts: dict[str, int] = {}
    names = [n for n in ("all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter_tensor",
                         "reduce_scatter_single", "all_to_all", "all_to_all_single", "all_reduce")
             if hasattr(torch.distributed, n)]
    originals = {n: getattr(torch.distributed, n) for n in names}

    def counted(name: str) -> Callable:
        def call(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return originals[name](*args, **kwargs)
        return call

    for n in names:
        setattr(torch.distributed, n, counted(n))
    try:
        fn()
    finally:
        for n in names:
            setattr(torch.distributed, n, originals[n])
    return counts


def check_collectives(rank: int) -> dict:
    """Uneven autograd gather: values, and the local gradient = sum over ranks' copies."""
    n = 2 + rank  # rank 0: 2 rows, rank 1: 3 rows
    x = (torch.arange(n * 3, dtype=torch.float32).view(n, 3) + 100 * rank).requires_grad_(True)
    y = collectives.all_gather_with_grad(x)  # (5, 3)
    weight = (rank + 1) * torch.arange(y.numel(), dtype=torch.float32).view_as(y)
    (y * weight).sum().backward()
    ids = collectives.all_gather_no_grad(torch.tensor([rank] * n))
    flags = collectives.all_gather_no_grad(torch.tensor([rank == 1] * n))
    # The one-collective gather of rows and ids, with the sizes given (no size exchange).
    x2 = (torch.arange(n * 3, dtype=torch.float32).view(n, 3) + 100 * rank).requires_grad_(True)
    ids2 = torch.stack([torch.full((n,), rank), torch.arange(n) - 7], dim=1)
    y2, gids2 = collectives.gather_rows(x2, ids2, [2, 3])
    (y2 * weight).sum().backward()
    return {
        "rows_gathered": y2.detach(), "rows_grad": x2.grad.clone(), "rows_ids": gids2,
        "gathered": y.detach(), "grad": x.grad.clone(), "ids": ids, "flags": flags,
        "sum": collectives.all_reduce_sum(torch.tensor([float(rank), 2.0 * rank], dtype=torch.float64)),
        "objects": collectives.all_gather_object({"rank": rank, "failed": [] if rank == 0 else ["x"]}),
        "world_info": collectives.world_info(),
    }


def main(rank: int, world: int, port: int, out_file: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=timedelta(seconds=300),  # oversubscribed CI: slow imports
    )
    try:
        s = sampler(rank, world)
        epoch, step = choose_step(world)
        batch = s.local_batch(epoch, step)
        feats = features(s.num_pairs)
        results: dict = {"n_local": len(batch), "cases": {}, "buggy": {}}
        counts = s.row_counts(epoch, step)
        for case in CASES:
            results["cases"][case] = run_case(case, batch, feats)
            # The row counts from the plan instead of a size exchange: the same numbers.
            results["cases"][case + "/planned_counts"] = run_case(case, batch, feats, counts)
        results["cases"]["nce/bf16_wire"] = run_case("nce", batch, feats, counts, torch.bfloat16)
        results["collective_calls"] = {
            "sizes_exchanged": count_collectives(lambda: run_case("nce", batch, feats)),
            "sizes_planned": count_collectives(lambda: run_case("nce", batch, feats, counts))}
        if world == WORLD:
            results["collectives"] = check_collectives(rank)
            # Rank 1 brings no rows at all: no hang, and the result is rank 0's batch alone.
            results["empty_rank1"] = run_case("triplet", batch if rank == 0 else s.batch_from_groups([]), feats)
            collectives.gather_rows = _biased_gather
            try:
                for case in BUGGY_CASES:
                    results["buggy"][case] = run_case(case, batch, feats)
            finally:
                collectives.gather_rows = _GATHER_ROWS
        torch.save(results, out_file)
        # Nobody tears down while a peer still talks to the store (rank 0 hosts it).
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])

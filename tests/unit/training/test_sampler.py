"""Tests of relbert_ds.training.sampler.RelationAwareSampler: the global plan, rank slices, tails, resume."""
from __future__ import annotations

import itertools
import json
import math
import random
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from relbert_ds.data.schemas import RelationDataset, RelationGroup
from relbert_ds.errors import CheckpointError, ConfigError
from relbert_ds.training.sampler import (
    LocalBatch,
    RelationAwareSampler,
    _splitmix64,
    _spread_repeats,
    mix_seed,
    split_evenly,
)

TRAIN = Path(__file__).resolve().parents[3] / "relbert_ds" / "resources" / "data" / "semeval2012" / "train.jsonl"


def _semeval() -> RelationDataset:
    """The bundled 79-relation training set, read directly (parent = digits of the type)."""
    groups = []
    for line in TRAIN.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        groups.append(RelationGroup(
            relation_type=row["relation_type"],
            positives=tuple(tuple(p) for p in row["positives"]),
            negatives=tuple(tuple(p) for p in row["negatives"]),
            parent=re.match(r"\d+", row["relation_type"]).group(0),
        ))
    return RelationDataset(name="semeval2012", split="train", relations=tuple(groups), source=str(TRAIN))


SEMEVAL = _semeval()


def _synthetic(n_relations: int = 12, n_pos: int = 20, n_neg: int = 5, parents: int = 3) -> RelationDataset:
    """Relations with more pairs than the sampler takes; relation 1 repeats a pair of relation 0."""
    groups = []
    for r in range(n_relations):
        pos = [(f"h{r}_{i}", f"t{r}_{i}") for i in range(n_pos)]
        neg = [(f"nh{r}_{i}", f"nt{r}_{i}") for i in range(n_neg)]
        if r == 1:
            pos[0] = ("h0_0", "t0_0")  # identical to a positive of relation 0
            neg[0] = ("h0_1", "t0_1")  # identical to another positive of relation 0
        groups.append(RelationGroup(f"R{r}", tuple(pos), tuple(neg), parent=str(r % parents) if parents else None))
    return RelationDataset(name="synthetic", split="train", relations=tuple(groups))


def _sampler(rank: int = 0, world_size: int = 2, dataset: RelationDataset = SEMEVAL, **kw) -> RelationAwareSampler:
    return RelationAwareSampler(dataset, world_size=world_size, rank=rank, **kw)


def _relations(plan) -> list[int]:
    return [rel for rel, _, _ in plan]


def test_dataset_is_realistic():
    assert len(SEMEVAL) == 79
    assert len({g.parent for g in SEMEVAL.relations}) == 10


@pytest.mark.parametrize("tail", ["fill", "drop"])
@pytest.mark.parametrize("parent_grouping", [False, True])
def test_plans_identical_on_independently_built_ranks(tail, parent_grouping):
    ranks = [_sampler(r, 2, tail=tail, parent_grouping=parent_grouping) for r in range(2)]
    assert ranks[0].steps_per_epoch == ranks[1].steps_per_epoch
    for epoch in range(3):
        for step in range(ranks[0].steps_per_epoch):
            assert ranks[0].plan(epoch, step) == ranks[1].plan(epoch, step)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8, 64])
def test_plan_does_not_depend_on_the_world_size(world):
    one = _sampler(0, 1, relations_per_step=16, accumulation=2)
    many = _sampler(0, world, relations_per_step=16, accumulation=2)
    assert one.steps_per_epoch == many.steps_per_epoch == 5  # ceil(79 / 16)
    for step in range(one.steps_per_epoch):
        assert one.plan(1, step) == many.plan(1, step)
        for micro in range(2):
            assert one.global_batch(1, step, micro).pairs == many.global_batch(1, step, micro).pairs


@pytest.mark.parametrize("shard_by", ["prompt", "relation"])
@pytest.mark.parametrize("world", [1, 2, 3, 5, 8])
def test_union_of_rank_slices_is_the_global_batch(shard_by, world):
    samplers = [_sampler(r, world, relations_per_step=12, accumulation=1, shard_by=shard_by) for r in range(world)]
    for step in range(samplers[0].steps_per_epoch):
        whole = samplers[0].global_batch(1, step)
        parts = [s.local_batch(1, step) for s in samplers]
        assert sum((p.pairs for p in parts), []) == whole.pairs
        assert torch.equal(torch.cat([p.relation_ids for p in parts]), whole.relation_ids)
        assert torch.equal(torch.cat([p.is_positive for p in parts]), whole.is_positive)
        assert torch.equal(torch.cat([p.pair_ids for p in parts]), whole.pair_ids)
        assert all((p.epoch, p.step, p.micro) == (1, step, 0) for p in parts)
        sizes = [len(p) for p in parts]
        if shard_by == "prompt":
            assert max(sizes) - min(sizes) <= 1  # even prompt counts, a group may span ranks
        else:  # whole groups per rank, group counts differing by at most one
            groups = [len(set(p.relation_ids.tolist())) for p in parts]
            assert max(groups) - min(groups) <= 1
            for p in parts:
                for rel in set(p.relation_ids.tolist()):
                    assert int((whole.relation_ids == rel).sum()) == int((p.relation_ids == rel).sum())


@pytest.mark.parametrize("seed", range(6))
def test_local_batches_are_the_global_batch_sliced_for_every_knob(seed):
    """local_batch plans only its own groups; whatever the knobs, the ranks' batches concatenated are
    global_batch (the whole plan, flattened) for every micro step: tails, weights (repeats moved,
    fills), accumulation, both shardings, more ranks than prompts."""
    rnd = random.Random(seed)
    data = _synthetic(n_relations=rnd.randint(5, 14), n_pos=rnd.randint(2, 9), n_neg=rnd.randint(1, 6))
    n = len(data.relations)
    weighted = seed % 2 == 1  # a weight of 1.5 needs two steps an epoch: at least three steps then
    kw = dict(relations_per_step=rnd.randint(2, max(2, n // 3) if weighted else n - 1),
              tail=rnd.choice(["fill", "drop"]),
              parent_grouping=rnd.random() < 0.5, shard_by=rnd.choice(["prompt", "relation"]),
              positives_per_relation=rnd.randint(2, 6), negatives_per_relation=rnd.randint(0, 4), seed=seed)
    kw["accumulation"] = rnd.randint(1, min(3, kw["relations_per_step"]))
    if weighted:
        kw["relation_weights"] = [rnd.choice([0.5, 1.0, 1.5]) for _ in range(n)]
    tested = []
    for world in (1, 2, 3, 7, 40):
        try:
            samplers = [_sampler(r, world, data, **kw) for r in range(world)]
        except ConfigError as exc:  # more ranks than a micro step's prompts (or relations) is refused
            assert "ranks" in str(exc) and world > 1
            continue
        tested.append(world)
        for epoch in range(2):
            for step in range(samplers[0].steps_per_epoch):
                for micro in range(kw["accumulation"]):
                    whole = samplers[0].global_batch(epoch, step, micro)
                    parts = [sm.local_batch(epoch, step, micro) for sm in samplers]
                    assert sum((q.pairs for q in parts), []) == whole.pairs, (world, epoch, step, micro, kw)
                    assert samplers[-1].row_counts(epoch, step, micro) == [len(q) for q in parts]
                    for field in ("relation_ids", "is_positive", "parent_ids", "pair_ids"):
                        assert torch.equal(torch.cat([getattr(q, field) for q in parts]), getattr(whole, field))
    assert len(tested) >= 2, (tested, kw)


def test_a_rank_draws_only_the_groups_its_rows_touch(monkeypatch):
    """The host work of a rank does not grow with the global batch: at 64 ranks over 64 relations of
    about 10 prompts, a rank draws the one or two groups its ~10 rows fall in, not 64."""
    data = _synthetic(n_relations=80, n_pos=8, n_neg=4, parents=0)
    sampler = _sampler(5, 64, data, relations_per_step=64)
    drawn = []
    real = RelationAwareSampler._group
    monkeypatch.setattr(RelationAwareSampler, "_group", lambda self, e, st, r: drawn.append(r) or real(self, e, st, r))
    batch = sampler.local_batch(0, 0)
    assert 1 <= len(drawn) <= 2 and len(batch) in (12, 13) and set(batch.relation_ids.tolist()) <= set(drawn)


def test_split_evenly():
    assert split_evenly(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert split_evenly(3, 5) == [(0, 1), (1, 2), (2, 3), (3, 3), (3, 3)]
    for n in range(30):
        for parts in range(1, 9):
            ranges = split_evenly(n, parts)
            lengths = [b - a for a, b in ranges]
            assert sum(lengths) == n and max(lengths) - min(lengths) <= 1
            assert all(ranges[i][1] == ranges[i + 1][0] for i in range(parts - 1))


def test_accumulation_splits_a_step_into_whole_groups():
    s = _sampler(0, 2, relations_per_step=16, accumulation=3)
    for step in range(s.steps_per_epoch):
        plan = s.plan(0, step)
        micro = [s.micro_plan(0, step, m) for m in range(3)]
        assert [g for m in micro for g in m] == plan  # nothing dropped, nothing repeated
        assert sorted(len(m) for m in micro) == [5, 5, 6]
    with pytest.raises(ValueError, match="micro step 3"):
        s.micro_plan(0, 0, 3)


@pytest.mark.parametrize("tail", ["fill", "drop"])
@pytest.mark.parametrize("parent_grouping", [False, True])
def test_no_relation_twice_in_a_global_batch(tail, parent_grouping):
    s = _sampler(0, 2, relations_per_step=16, tail=tail, parent_grouping=parent_grouping)
    for epoch in range(4):
        for step in range(s.steps_per_epoch):
            rels = _relations(s.plan(epoch, step))
            assert len(rels) == 16
            assert len(set(rels)) == 16, (epoch, step)


def test_relation_sharding_gives_whole_groups():
    m, k = 8, 3
    samplers = [_sampler(r, 3, relations_per_step=15, positives_per_relation=m, negatives_per_relation=k,
                         shard_by="relation") for r in range(3)]
    for s in samplers:
        for step in range(s.steps_per_epoch):
            b = s.local_batch(0, step)
            rels = b.relation_ids.tolist()
            assert len(set(rels)) == 5
            # Whole groups, contiguous: each relation's positives, then its negatives.
            seen: list[int] = []
            for rel in rels:
                if not seen or seen[-1] != rel:
                    assert rel not in seen, "a relation group is split"
                    seen.append(rel)
            for rel in set(rels):
                mine = b.relation_ids == rel
                group = SEMEVAL.relations[rel]
                assert int((mine & b.is_positive).sum()) == min(m, len(group.positives))
                assert int((mine & ~b.is_positive).sum()) == min(k, len(group.negatives))
                flags = b.is_positive[mine].tolist()
                assert flags == sorted(flags, reverse=True), "positives come before negatives"


def test_steps_per_epoch_same_on_every_rank_and_tail_counts():
    drop = [_sampler(r, 2, relations_per_step=16, tail="drop") for r in range(2)]
    fill = [_sampler(r, 2, relations_per_step=16, tail="fill") for r in range(2)]
    assert [s.steps_per_epoch for s in drop] == [4, 4]  # 79 // 16
    assert [s.steps_per_epoch for s in fill] == [5, 5]  # ceil(79 / 16)
    assert {_sampler(r, 4, relations_per_step=16, tail="drop").steps_per_epoch for r in range(4)} == {4}


def test_fill_with_accumulation_still_covers_every_relation():
    # relbert-ds 0.1 dropped the last micro step of an epoch when the micro steps did not divide
    # by the accumulation: with accumulation 2 the filled tail step was lost (15 of 79 relations).
    s = _sampler(0, 2, relations_per_step=16, accumulation=2, tail="fill")
    for epoch in range(3):
        seen = {g[0] for step in range(s.steps_per_epoch) for m in range(2) for g in s.micro_plan(epoch, step, m)}
        assert seen == set(range(79))


def test_drop_skips_the_leftover_and_fill_covers_every_relation():
    drop = _sampler(0, 2, relations_per_step=16, tail="drop")
    fill = _sampler(0, 2, relations_per_step=16, tail="fill")
    for epoch in range(2):
        order = fill.epoch_order(epoch)
        assert sorted(order) == list(range(79))
        seen_drop = [r for s in range(drop.steps_per_epoch) for r in _relations(drop.plan(epoch, s))]
        assert len(seen_drop) == len(set(seen_drop)) == 64
        assert seen_drop == drop.epoch_order(epoch)[:64]
        seen_fill = [_relations(fill.plan(epoch, s)) for s in range(fill.steps_per_epoch)]
        assert set().union(*map(set, seen_fill)) == set(range(79))
        last = seen_fill[-1]
        assert last[:15] == order[64:]  # the 15 leftover relations, then 1 filler
        assert last[15] not in last[:15]


def _weighted(sources: list[tuple[float, int]]) -> tuple[RelationDataset, list[float], list[int]]:
    """One relation group per (weight, relation count) source: the dataset, per-relation weights and sources."""
    groups, weights, owner = [], [], []
    for s, (w, n) in enumerate(sources):
        for r in range(n):
            pairs = tuple((f"h{s}_{r}_{i}", f"t{s}_{r}_{i}") for i in range(3))
            groups.append(RelationGroup(f"S{s}R{r}", pairs, (), parent=f"{s}:{r % 4}"))
            weights.append(w)
            owner.append(s)
    return RelationDataset(name="weighted", split="train", relations=tuple(groups)), weights, owner


# Sources of 1, 3 and 50 relations at weights the old rounding got wrong: round-half-even gave a
# lone relation of 0.5 (or 0.3) no slot at all, multinomial draws of the fractional parts saw 0.6
# as 0.57 and 0.1 as 0.13 (+35%) on average, and single relations anywhere in 0.5-0.65.
SOURCES = [(0.5, 1), (0.3, 3), (0.6, 50), (0.1, 50), (2.5, 3), (0.5, 3), (1.0, 20)]


@pytest.mark.parametrize("parent_grouping", [False, True])
def test_weights_are_expected_appearances_per_epoch_with_carried_remainders(parent_grouping):
    data, weights, owner = _weighted(SOURCES)
    s = _sampler(0, 1, dataset=data, relations_per_step=8, positives_per_relation=2, negatives_per_relation=0,
                 relation_weights=weights, parent_grouping=parent_grouping, seed=11)
    epochs = 200
    counts = [0] * len(weights)
    per_epoch: list[list[int]] = []
    for epoch in range(epochs):
        order = s.epoch_order(epoch)
        assert sorted(order) == [i for i, c in enumerate(s.epoch_counts(epoch)) for _ in range(c)]
        per_epoch.append(s.epoch_counts(epoch))
        for r in order:
            counts[r] += 1
    for r, w in enumerate(weights):
        # carried remainders: after E epochs floor(w*E + phase) appearances, within one of w*E
        assert abs(counts[r] - w * epochs) < 1, (r, w, counts[r])
        # ... and after every prefix of epochs too (no drift, no long gaps)
        done = 0
        for epoch, row in enumerate(per_epoch):
            done += row[r]
            assert abs(done - w * (epoch + 1)) < 1, (r, w, epoch, done)
    lone = owner.index(0)  # the 1-relation source at 0.5: exactly every other epoch
    seen = [row[lone] for row in per_epoch]
    assert sum(seen) == epochs // 2 and all(a + b == 1 for a, b in zip(seen, seen[1:]))
    for src, (w, n) in enumerate(SOURCES):  # each source within one (per distinct weight) of n*w per epoch
        totals = [sum(c for c, o in zip(row, owner) if o == src) for row in per_epoch]
        assert set(totals) <= {math.floor(n * w), math.ceil(n * w)}, (src, set(totals))


def test_weighted_fills_and_every_planned_slot_is_trained():
    data, weights, owner = _weighted(SOURCES)
    s = _sampler(0, 1, dataset=data, relations_per_step=8, positives_per_relation=2, negatives_per_relation=0,
                 relation_weights=weights, tail="fill", seed=3)
    fewest, most = s.slot_range
    assert s.steps_per_epoch == math.ceil(most / 8)
    fills = [0] * len(SOURCES)
    for epoch in range(200):
        planned = Counter(s.epoch_order(epoch))
        trained = Counter(r for step in range(s.steps_per_epoch) for r in _relations(s.plan(epoch, step)))
        assert not planned - trained, "a planned slot was lost (a repeat that could not be moved)"
        for r, extra in (trained - planned).items():
            fills[owner[r]] += extra
        assert sum(trained.values()) == 8 * s.steps_per_epoch
    # Fillers are drawn in proportion to the weights: the 50 relations at 0.6 get six times the
    # fills of the 50 at 0.1 (a uniform fill, as before, gives them the same); 5 standard deviations.
    heavy, light = fills[2], fills[3]
    ratio, spread = heavy / light, 6 * math.sqrt(1 / heavy + 1 / light)
    assert abs(ratio - 6) < 5 * spread and ratio > 3, (heavy, light)


def test_drop_runs_the_fewest_planned_slots_and_skips_the_rest():
    data, weights, _ = _weighted(SOURCES)
    s = _sampler(0, 1, dataset=data, relations_per_step=8, positives_per_relation=2, negatives_per_relation=0,
                 relation_weights=weights, tail="drop")
    fewest, most = s.slot_range
    assert s.steps_per_epoch == fewest // 8 and most - fewest <= len(set(weights))
    for epoch in range(20):
        order = s.epoch_order(epoch)
        flat = [r for step in range(s.steps_per_epoch) for r in _relations(s.plan(epoch, step))]
        assert flat == order[: len(flat)]  # nothing moved or refilled, the leftover skipped


def test_weights_keep_the_plan_independent_of_the_world_size():
    data, weights, _ = _weighted(SOURCES)
    kw = dict(dataset=data, relations_per_step=12, accumulation=2, positives_per_relation=2, negatives_per_relation=0,
              relation_weights=weights, seed=5)
    one = _sampler(0, 1, **kw)
    for world in (2, 3, 8):
        many = [_sampler(r, world, **kw) for r in range(world)]
        assert many[0].steps_per_epoch == one.steps_per_epoch
        for epoch in range(3):
            for step in range(one.steps_per_epoch):
                assert many[world - 1].plan(epoch, step) == one.plan(epoch, step)
                for micro in range(2):
                    whole = one.global_batch(epoch, step, micro)
                    assert sum((m.local_batch(epoch, step, micro).pairs for m in many), []) == whole.pairs


def test_weights_are_read_exactly_and_seeded():
    data, weights, _ = _weighted([(0.1, 7), (1 / 3, 5)])
    s = _sampler(0, 1, dataset=data, relations_per_step=2, positives_per_relation=2, negatives_per_relation=0,
                 relation_weights=weights)
    # 0.1 is 1/10 and 1/3 is 1/3 (not their binary floats): exactly 1 and 1 appearances per 10 and 3 epochs
    for start in (0, 17, 1000):
        window = [s.epoch_counts(e) for e in range(start, start + 30)]
        assert all(sum(row[r] for row in window) == 3 for r in range(7))
        assert all(sum(row[r] for row in window) == 10 for r in range(7, 12))
    other = _sampler(0, 1, dataset=data, relations_per_step=2, positives_per_relation=2, negatives_per_relation=0,
                     relation_weights=weights, seed=1)
    assert [s.epoch_counts(e) for e in range(10)] != [other.epoch_counts(e) for e in range(10)]


def test_repeats_are_spread_whenever_an_arrangement_exists():
    # Pairwise swaps get stuck on [0 0 0 | 1 3 3 | 1] (3 per step); the Gale-Ryser fallback does not.
    stuck = _spread_repeats([0, 0, 0, 1, 3, 3, 1], 3)
    assert sorted(stuck) == [0, 0, 0, 1, 1, 3, 3] and all(len(set(stuck[a:a + 3])) == len(stuck[a:a + 3])
                                                          for a in (0, 3, 6))
    rng = random.Random(0)
    checked = 0
    for _ in range(400):
        per_step, steps = rng.randint(2, 3), rng.randint(2, 3)
        length = rng.randint(per_step * (steps - 1) + 1, min(7, per_step * steps))
        order = [rng.randrange(rng.randint(2, 5)) for _ in range(length)]
        bounds = [(a, min(a + per_step, length)) for a in range(0, length, per_step)]
        possible = any(all(len(set(p[a:b])) == b - a for a, b in bounds) for p in set(itertools.permutations(order)))
        spread = _spread_repeats(order, per_step)
        assert sorted(spread) == sorted(order)
        if possible:
            checked += 1
            assert all(len(set(spread[a:b])) == b - a for a, b in bounds), (order, per_step, spread)
    assert checked > 100


def test_weights_change_how_often_a_relation_is_seen():
    weights = [2.0] * 40 + [0.5] * 39
    s = _sampler(0, 2, relations_per_step=16, relation_weights=weights)
    assert s.slot_range == (80 + 19, 80 + 20)  # 40 x 2 + floor/ceil(39 x 0.5)
    assert s.steps_per_epoch == 7
    counts = [0] * 79
    for epoch in range(6):
        for step in range(s.steps_per_epoch):
            rels = _relations(s.plan(epoch, step))
            assert len(set(rels)) == 16  # never twice in one step
            for r in rels:
                counts[r] += 1
        planned = s.epoch_counts(epoch)
        assert planned[:40] == [2] * 40 and sum(planned[40:]) in (19, 20)
    assert all(c >= 12 for c in counts[:40]) and all(3 <= c <= 3 + 6 for c in counts[40:])
    assert _sampler(0, 2, relations_per_step=16, relation_weights=[1.0] * 79).weights is None  # uniform = none
    with pytest.raises(ConfigError, match="not a positive number"):
        _sampler(0, 2, relation_weights=[0.0] * 79)
    with pytest.raises(ConfigError, match="one weight per relation"):
        _sampler(0, 2, relation_weights=[1.0] * 3)


def test_a_weight_an_epoch_cannot_hold_is_refused():
    # 79 relations of weight 1 and one of 5 at 16 per step: 6 steps, at most 5 places for a relation
    _sampler(0, 2, relations_per_step=16, relation_weights=[5.0] + [1.0] * 78)
    with pytest.raises(ConfigError) as err:
        _sampler(0, 2, relations_per_step=16, relation_weights=[5.5] + [1.0] * 78)
    message = str(err.value)
    assert "weight of 5.5 needs up to 6 places per epoch" in message and "at most 5 times" in message
    assert "fix: lower that weight (--train_weights) to at most 5" in message and "\n" not in message


def test_a_weighted_checkpoint_of_the_old_plan_is_refused():
    s = _sampler(0, 2, relations_per_step=16, relation_weights=[2.0] * 79)
    state = s.state_dict()
    s.check_state(json.loads(json.dumps(state)))
    del state["fingerprint"]["weights_plan"]  # what a checkpoint of the rounding scheme holds
    with pytest.raises(CheckpointError, match="weighted batch plan differs .*fix: resume it with the relbert-ds"):
        s.check_state(state)
    assert "weights_plan" not in _sampler(0, 2, relations_per_step=16).state_dict()["fingerprint"]


def test_determinism_and_variation():
    a, b = _sampler(0, 2, seed=7), _sampler(1, 2, seed=7)
    assert a.plan(2, 3) == b.plan(2, 3)
    assert a.plan(2, 3) == _sampler(0, 2, seed=7).plan(2, 3)  # a fresh object, same answer
    assert a.plan(0, 0) != _sampler(0, 2, seed=8).plan(0, 0)
    assert a.plan(0, 0) != a.plan(1, 0)
    assert a.epoch_order(0) != a.epoch_order(1)
    # Pair subsets vary with the step when a relation has more pairs than taken.
    s = _sampler(0, 1, dataset=_synthetic(), relations_per_step=12, positives_per_relation=4, negatives_per_relation=2)
    per_step = {tuple(tuple(g[1]) for g in sorted(s.plan(e, 0))) for e in range(5)}
    assert len(per_step) > 1


def test_seed_mixing_is_a_fixed_function():
    # Pure integer arithmetic (no salted hash()): the same on every platform and run.
    assert mix_seed(0, 0, 10) == mix_seed(0, 0, 10)
    assert mix_seed(0, 0, 10) != mix_seed(0, 10, 0)
    assert 0 <= mix_seed(-1, 2**70) < 2**63
    assert _splitmix64(0) == 0xE220A8397B1DCDAF  # the published SplitMix64 output for seed 0
    assert mix_seed(1, 2, 3) == 6204445667966614714  # pinned: plans must not change silently


def test_pairs_are_subsets_without_replacement():
    ds = _synthetic()
    s = _sampler(0, 2, dataset=ds, relations_per_step=6, positives_per_relation=6, negatives_per_relation=3)
    for epoch in range(3):
        for step in range(s.steps_per_epoch):
            for rel, pos, neg in s.plan(epoch, step):
                assert len(pos) == len(set(pos)) == 6
                assert len(neg) == len(set(neg)) == 3
                assert all(0 <= i < 20 for i in pos) and all(0 <= i < 5 for i in neg)
            b = s.local_batch(epoch, step)
            for pair, rel, positive in zip(b.pairs, b.relation_ids.tolist(), b.is_positive.tolist()):
                group = ds.relations[rel]
                assert pair in (group.positives if positive else group.negatives)


def test_min_of_requested_and_available():
    s = _sampler(0, 1, relations_per_step=4, positives_per_relation=100, negatives_per_relation=100)
    b = s.local_batch(0, 0)
    for rel in set(b.relation_ids.tolist()):
        mine = b.relation_ids == rel
        assert int((mine & b.is_positive).sum()) == len(SEMEVAL.relations[rel].positives)
        assert int((mine & ~b.is_positive).sum()) == len(SEMEVAL.relations[rel].negatives)


def test_pair_ids_identify_strings_across_relations():
    ds = _synthetic()
    s = _sampler(0, 1, dataset=ds, relations_per_step=12, positives_per_relation=20, negatives_per_relation=5)
    b = s.local_batch(0, 0)  # every pair of the dataset
    by_pair: dict = {}
    for pair, pid in zip(b.pairs, b.pair_ids.tolist()):
        by_pair.setdefault(pair, set()).add(pid)
    assert all(len(ids) == 1 for ids in by_pair.values())  # one id per string pair
    assert len({next(iter(v)) for v in by_pair.values()}) == len(by_pair)  # distinct pairs, distinct ids
    dup = [pid for pair, pid in zip(b.pairs, b.pair_ids.tolist()) if pair == ("h0_0", "t0_0")]
    assert len(dup) == 2 and dup[0] == dup[1]
    # SemEval lists ("clothing", "shirt") as a positive of both 1a and 1b.
    sem = _sampler(0, 1, relations_per_step=79, positives_per_relation=10, tail="drop")
    whole = sem.local_batch(0, 0)
    ids = {pid for pair, pid in zip(whole.pairs, whole.pair_ids.tolist()) if pair == ("clothing", "shirt")}
    rels = {whole.relation_ids[i].item() for i, p in enumerate(whole.pairs) if p == ("clothing", "shirt")}
    assert len(ids) == 1 and len(rels) >= 2
    assert sem.num_pairs == len(set(SEMEVAL.pairs))


def test_parent_ids_index_parent_names():
    s = _sampler(0, 2, relations_per_step=16)
    assert s.parent_names == [str(i) for i in range(1, 11)]
    b = s.local_batch(0, 0)
    for rel, pid in zip(b.relation_ids.tolist(), b.parent_ids.tolist()):
        assert s.parent_names[pid] == SEMEVAL.relations[rel].parent
    no_parent = _synthetic(parents=0)
    nb = _sampler(0, 1, dataset=no_parent, relations_per_step=4).local_batch(0, 0)
    assert set(nb.parent_ids.tolist()) == {-1}


def test_parent_grouping_keeps_siblings_adjacent():
    s = _sampler(0, 2, relations_per_step=16, parent_grouping=True)
    for epoch in range(3):
        order = s.epoch_order(epoch)
        assert sorted(order) == list(range(79))
        parents = [SEMEVAL.relations[i].parent for i in order]
        runs = [p for i, p in enumerate(parents) if i == 0 or parents[i - 1] != p]
        assert len(runs) == len(set(runs)) == 10  # each parent one contiguous run
        # and the global batches follow that order
        flat = [r for step in range(s.steps_per_epoch - 1) for r in _relations(s.plan(epoch, step))]
        assert flat == order[: len(flat)]
    assert s.epoch_order(0) != s.epoch_order(1)
    plain = _sampler(0, 2, relations_per_step=16).epoch_order(0)
    parents = [SEMEVAL.relations[i].parent for i in plain]
    assert len([p for i, p in enumerate(parents) if i == 0 or parents[i - 1] != p]) > 10


def test_local_batch_shapes_and_types():
    b = _sampler(1, 2, relations_per_step=4, positives_per_relation=3, negatives_per_relation=2).local_batch(0, 1)
    assert isinstance(b, LocalBatch)
    assert len(b) == len(b.pairs) == 2 * (3 + 2)
    for t, dtype in ((b.relation_ids, torch.long), (b.is_positive, torch.bool), (b.parent_ids, torch.long),
                     (b.pair_ids, torch.long)):
        assert t.dtype == dtype and t.shape == (10,)


def test_state_round_trip_and_position_check():
    s = _sampler(1, 2, relations_per_step=16, seed=3, parent_grouping=True)
    state = json.loads(json.dumps(s.state_dict()))  # plain JSON-able types
    _sampler(1, 2, relations_per_step=16, seed=3, parent_grouping=True).check_state(state)
    # neither the rank nor the world size is part of the fingerprint: the plan does not depend on them
    _sampler(0, 4, relations_per_step=16, seed=3, parent_grouping=True).check_state(state)
    s.check_position(1, 4)
    with pytest.raises(CheckpointError, match="outside this run's 5 steps per epoch"):
        s.check_position(1, 5)


def test_state_fingerprint_mismatch():
    state = _sampler(0, 4, relations_per_step=16).state_dict()
    with pytest.raises(CheckpointError, match="--seed = 0, this run has 1; fix: resume with --seed = 0"):
        _sampler(0, 4, relations_per_step=16, seed=1).check_state(state)
    with pytest.raises(CheckpointError, match="--relations_per_step = 16, this run has 20"):
        _sampler(0, 4, relations_per_step=20).check_state(state)
    with pytest.raises(CheckpointError, match="gradient_accumulation_steps = 1, this run has 2"):
        _sampler(0, 4, relations_per_step=16, accumulation=2).check_state(state)
    changed = RelationDataset("semeval2012", "train", SEMEVAL.relations[:-1] + (
        RelationGroup("10d", SEMEVAL.relations[-1].positives[:-1], SEMEVAL.relations[-1].negatives, "10"),))
    with pytest.raises(CheckpointError, match="different training data"):
        RelationAwareSampler(changed, world_size=4, rank=0, relations_per_step=16).check_state(state)
    with pytest.raises(CheckpointError, match="no sampler state"):
        _sampler(0, 4, relations_per_step=16).check_state({"epoch": 3})


def test_relations_exceed_dataset_and_world_size_limits():
    with pytest.raises(ConfigError) as err:
        _sampler(0, 2, relations_per_step=80)
    assert str(err.value) == (
        "--relations_per_step 80 exceeds the 79 relations of semeval2012/train (a global batch holds each relation "
        "at most once); fix: use --relations_per_step 79 or less (more ranks can share a smaller batch: it is "
        "divided by prompts)")
    # any world size up to the prompts of a micro step runs: 2 relations of >= 2 prompts each = 4 ranks
    small = _sampler(3, 4, relations_per_step=2, positives_per_relation=2, negatives_per_relation=0)
    assert len(small.local_batch(0, 0)) == 1
    with pytest.raises(ConfigError, match="fewer than the 5 ranks"):
        _sampler(0, 5, relations_per_step=2, positives_per_relation=2, negatives_per_relation=0)
    with pytest.raises(ConfigError, match="--shard_by relation needs a whole relation per rank"):
        _sampler(0, 8, relations_per_step=4, shard_by="relation")
    with pytest.raises(ConfigError, match="cannot split a global batch of 2 relations"):
        _sampler(0, 1, relations_per_step=2, accumulation=3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(relations_per_step=0), "--relations_per_step must be an integer >= 1"),
        (dict(positives_per_relation=1), "--positives_per_relation must be an integer >= 2"),
        (dict(negatives_per_relation=-1), "--negatives_per_relation must be an integer >= 0"),
        (dict(tail="pad"), "--tail 'pad' is not one of fill, drop"),
        (dict(shard_by="pair"), "--shard_by 'pair' is not one of prompt, relation"),
        (dict(rank=2), "rank must be in 0..1"),
        (dict(world_size=0), "world size must be an integer >= 1"),
        (dict(seed="x"), "--seed must be an integer"),
    ],
)
def test_knob_errors(kwargs, message):
    args = dict(world_size=2, rank=0)
    args.update(kwargs)
    with pytest.raises(ConfigError, match=message):
        RelationAwareSampler(SEMEVAL, **args)


def test_step_outside_epoch():
    s = _sampler(0, 2, relations_per_step=16, tail="drop")
    with pytest.raises(ValueError, match="outside the epoch"):
        s.plan(0, 4)

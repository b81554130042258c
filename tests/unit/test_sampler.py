"""Tests of relbert_ds.sampler.RelationAwareSampler: the global plan, rank slices, tails, resume."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from relbert_ds.data.schemas import RelationDataset, RelationGroup
from relbert_ds.errors import CheckpointError, ConfigError
from relbert_ds.sampler import LocalBatch, RelationAwareSampler, _splitmix64, mix_seed

TRAIN = Path(__file__).resolve().parents[2] / "relbert_ds" / "resources" / "data" / "semeval2012" / "train.jsonl"


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
    return [rel for rank in plan for rel, _, _ in rank]


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


def test_union_of_rank_slices_is_the_plan():
    world = 4
    samplers = [_sampler(r, world, relations_per_rank=3) for r in range(world)]
    for step in range(samplers[0].steps_per_epoch):
        plan = samplers[0].plan(1, step)
        assert len(plan) == world
        joined_pairs, joined_rel = [], []
        for r, s in enumerate(samplers):
            local = s.local_batch(1, step)
            expected = s.batch_from_groups(plan[r], 1, step)
            assert local.pairs == expected.pairs
            assert torch.equal(local.relation_ids, expected.relation_ids)
            assert (local.epoch, local.step) == (1, step)
            joined_pairs += local.pairs
            joined_rel += local.relation_ids.tolist()
        whole = samplers[0].batch_from_groups([g for rank in plan for g in rank])
        assert joined_pairs == whole.pairs
        assert joined_rel == whole.relation_ids.tolist()


@pytest.mark.parametrize("tail", ["fill", "drop"])
@pytest.mark.parametrize("parent_grouping", [False, True])
def test_no_relation_twice_in_a_global_batch(tail, parent_grouping):
    s = _sampler(0, 2, relations_per_rank=8, tail=tail, parent_grouping=parent_grouping)
    for epoch in range(4):
        for step in range(s.steps_per_epoch):
            rels = _relations(s.plan(epoch, step))
            assert len(rels) == 16
            assert len(set(rels)) == 16, (epoch, step)


def test_each_rank_gets_whole_groups():
    R, m, k = 5, 8, 3
    samplers = [_sampler(r, 3, relations_per_rank=R, positives_per_relation=m, negatives_per_relation=k) for r in range(3)]
    for s in samplers:
        for step in range(s.steps_per_epoch):
            b = s.local_batch(0, step)
            rels = b.relation_ids.tolist()
            assert len(set(rels)) == R
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
                first = rels.index(rel)
                flags = b.is_positive[mine].tolist()
                assert flags == sorted(flags, reverse=True), "positives come before negatives"
                assert all(rels[first + i] == rel for i in range(int(mine.sum())))


def test_steps_per_epoch_same_on_every_rank_and_tail_counts():
    drop = [_sampler(r, 2, relations_per_rank=8, tail="drop") for r in range(2)]
    fill = [_sampler(r, 2, relations_per_rank=8, tail="fill") for r in range(2)]
    assert [s.steps_per_epoch for s in drop] == [4, 4]  # 79 // 16
    assert [s.steps_per_epoch for s in fill] == [5, 5]  # ceil(79 / 16)
    # world 4 x 4 relations: the same 16 relations per step
    assert {_sampler(r, 4, relations_per_rank=4, tail="drop").steps_per_epoch for r in range(4)} == {4}


def test_drop_skips_the_leftover_and_fill_covers_every_relation():
    drop = _sampler(0, 2, relations_per_rank=8, tail="drop")
    fill = _sampler(0, 2, relations_per_rank=8, tail="fill")
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


def test_determinism_and_variation():
    a, b = _sampler(0, 2, seed=7), _sampler(1, 2, seed=7)
    assert a.plan(2, 3) == b.plan(2, 3)
    assert a.plan(2, 3) == _sampler(0, 2, seed=7).plan(2, 3)  # a fresh object, same answer
    assert a.plan(0, 0) != _sampler(0, 2, seed=8).plan(0, 0)
    assert a.plan(0, 0) != a.plan(1, 0)
    assert a.epoch_order(0) != a.epoch_order(1)
    # Pair subsets vary with the step when a relation has more pairs than taken.
    s = _sampler(0, 1, dataset=_synthetic(), relations_per_rank=12, positives_per_relation=4, negatives_per_relation=2)
    per_step = {tuple(tuple(g[1]) for g in sorted(s.plan(e, 0)[0])) for e in range(5)}
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
    s = _sampler(0, 2, dataset=ds, relations_per_rank=3, positives_per_relation=6, negatives_per_relation=3)
    for epoch in range(3):
        for step in range(s.steps_per_epoch):
            for rank in s.plan(epoch, step):
                for rel, pos, neg in rank:
                    assert len(pos) == len(set(pos)) == 6
                    assert len(neg) == len(set(neg)) == 3
                    assert all(0 <= i < 20 for i in pos) and all(0 <= i < 5 for i in neg)
            b = s.local_batch(epoch, step)
            for pair, rel, positive in zip(b.pairs, b.relation_ids.tolist(), b.is_positive.tolist()):
                group = ds.relations[rel]
                assert pair in (group.positives if positive else group.negatives)


def test_min_of_requested_and_available():
    s = _sampler(0, 1, relations_per_rank=4, positives_per_relation=100, negatives_per_relation=100)
    b = s.local_batch(0, 0)
    for rel in set(b.relation_ids.tolist()):
        mine = b.relation_ids == rel
        assert int((mine & b.is_positive).sum()) == len(SEMEVAL.relations[rel].positives)
        assert int((mine & ~b.is_positive).sum()) == len(SEMEVAL.relations[rel].negatives)


def test_pair_ids_identify_strings_across_relations():
    ds = _synthetic()
    s = _sampler(0, 1, dataset=ds, relations_per_rank=12, positives_per_relation=20, negatives_per_relation=5)
    b = s.local_batch(0, 0)  # every pair of the dataset
    by_pair: dict = {}
    for pair, pid in zip(b.pairs, b.pair_ids.tolist()):
        by_pair.setdefault(pair, set()).add(pid)
    assert all(len(ids) == 1 for ids in by_pair.values())  # one id per string pair
    assert len({next(iter(v)) for v in by_pair.values()}) == len(by_pair)  # distinct pairs, distinct ids
    dup = [pid for pair, pid in zip(b.pairs, b.pair_ids.tolist()) if pair == ("h0_0", "t0_0")]
    assert len(dup) == 2 and dup[0] == dup[1]
    # SemEval lists ("clothing", "shirt") as a positive of both 1a and 1b.
    sem = _sampler(0, 1, relations_per_rank=79, positives_per_relation=10, tail="drop")
    whole = sem.local_batch(0, 0)
    ids = {pid for pair, pid in zip(whole.pairs, whole.pair_ids.tolist()) if pair == ("clothing", "shirt")}
    rels = {whole.relation_ids[i].item() for i, p in enumerate(whole.pairs) if p == ("clothing", "shirt")}
    assert len(ids) == 1 and len(rels) >= 2
    assert sem.num_pairs == len(set(SEMEVAL.pairs))


def test_parent_ids_index_parent_names():
    s = _sampler(0, 2, relations_per_rank=8)
    assert s.parent_names == [str(i) for i in range(1, 11)]
    b = s.local_batch(0, 0)
    for rel, pid in zip(b.relation_ids.tolist(), b.parent_ids.tolist()):
        assert s.parent_names[pid] == SEMEVAL.relations[rel].parent
    no_parent = _synthetic(parents=0)
    nb = _sampler(0, 1, dataset=no_parent, relations_per_rank=4).local_batch(0, 0)
    assert set(nb.parent_ids.tolist()) == {-1}


def test_parent_grouping_keeps_siblings_adjacent():
    s = _sampler(0, 2, relations_per_rank=8, parent_grouping=True)
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
    plain = _sampler(0, 2, relations_per_rank=8).epoch_order(0)
    parents = [SEMEVAL.relations[i].parent for i in plain]
    assert len([p for i, p in enumerate(parents) if i == 0 or parents[i - 1] != p]) > 10


def test_local_batch_shapes_and_types():
    b = _sampler(1, 2, relations_per_rank=2, positives_per_relation=3, negatives_per_relation=2).local_batch(0, 1)
    assert isinstance(b, LocalBatch)
    assert len(b) == len(b.pairs) == 2 * (3 + 2)
    for t, dtype in ((b.relation_ids, torch.long), (b.is_positive, torch.bool), (b.parent_ids, torch.long), (b.pair_ids, torch.long)):
        assert t.dtype == dtype and t.shape == (10,)


def test_advance_rolls_over_epochs():
    s = _sampler(0, 2, relations_per_rank=8, tail="drop")
    assert s.position == (0, 0)
    seen = [s.advance() for _ in range(9)]
    assert seen[:4] == [(0, 1), (0, 2), (0, 3), (1, 0)]
    assert s.position == (2, 1)


def test_state_dict_round_trip():
    s = _sampler(1, 2, relations_per_rank=8, seed=3, parent_grouping=True)
    for _ in range(7):
        s.advance()
    state = json.loads(json.dumps(s.state_dict()))  # plain JSON-able types
    fresh = _sampler(1, 2, relations_per_rank=8, seed=3, parent_grouping=True)
    fresh.load_state_dict(state)
    assert fresh.position == s.position == (1, 2)
    e, st = fresh.position
    assert fresh.local_batch(e, st).pairs == s.local_batch(e, st).pairs
    # rank is not part of the fingerprint: rank 0 may load rank 1's state
    other_rank = _sampler(0, 2, relations_per_rank=8, seed=3, parent_grouping=True)
    other_rank.load_state_dict(state)
    assert other_rank.position == (1, 2)


def test_state_dict_fingerprint_mismatch():
    state = _sampler(0, 4, relations_per_rank=4).state_dict()
    with pytest.raises(CheckpointError, match="world size 4, this run has 2: resume with the same number of ranks"):
        _sampler(0, 2, relations_per_rank=4).load_state_dict(state)
    with pytest.raises(CheckpointError, match="seed = 0, this run has 1"):
        _sampler(0, 4, relations_per_rank=4, seed=1).load_state_dict(state)
    with pytest.raises(CheckpointError, match="relations per rank = 4, this run has 5"):
        _sampler(0, 4, relations_per_rank=5).load_state_dict(state)
    changed = RelationDataset("semeval2012", "train", SEMEVAL.relations[:-1] + (
        RelationGroup("10d", SEMEVAL.relations[-1].positives[:-1], SEMEVAL.relations[-1].negatives, "10"),))
    with pytest.raises(CheckpointError, match="different training data"):
        RelationAwareSampler(changed, world_size=4, rank=0, relations_per_rank=4).load_state_dict(state)
    with pytest.raises(CheckpointError, match="no sampler state"):
        _sampler(0, 4, relations_per_rank=4).load_state_dict({"epoch": 3})


def test_relations_exceed_dataset_error():
    with pytest.raises(ConfigError) as err:
        _sampler(0, 2, relations_per_rank=40)
    assert str(err.value) == (
        "relations_per_rank x world size = 80 exceeds the 79 relations of semeval2012/train; "
        "lower relations_per_rank to at most 39"
    )
    with pytest.raises(ConfigError, match="use at most 79 ranks"):
        _sampler(0, 80, relations_per_rank=1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(relations_per_rank=0), "relations_per_rank must be an integer >= 1"),
        (dict(positives_per_relation=1), "positives_per_relation must be an integer >= 2"),
        (dict(negatives_per_relation=-1), "negatives_per_relation must be an integer >= 0"),
        (dict(tail="pad"), "tail must be one of fill, drop"),
        (dict(rank=2), "rank must be in 0..1"),
        (dict(world_size=0), "world size must be an integer >= 1"),
        (dict(seed="x"), "seed must be an integer"),
    ],
)
def test_knob_errors(kwargs, message):
    args = dict(world_size=2, rank=0)
    args.update(kwargs)
    with pytest.raises(ConfigError, match=message):
        RelationAwareSampler(SEMEVAL, **args)


def test_step_outside_epoch():
    s = _sampler(0, 2, relations_per_rank=8, tail="drop")
    with pytest.raises(ValueError, match="outside the epoch"):
        s.plan(0, 4)

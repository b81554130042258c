"""Several training sets in one run: relbert_ds.data.training_sources, and its data at scale
(5,000 generated relations through the sampler and the loss)."""
from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from relbert_ds.data import load_relation_dataset
from relbert_ds.data.derived import relation_analogy_questions
from relbert_ds.data.sources import bundled_path
from relbert_ds.data.training_sources import load_training_sources, per_source_validation, relation_weights
from relbert_ds.errors import ConfigError, DataError
from relbert_ds.training.config import parse_train_command
from relbert_ds.training.losses import NCELoss
from relbert_ds.training.sampler import RelationAwareSampler
from tests.fakes import write_relations


@pytest.fixture(scope="module")
def big_source(tmp_path_factory) -> Path:
    """The 5,000-relation training set."""
    return write_relations(tmp_path_factory.mktemp("big") / "big5000", 5000, tag="b")


# --------------------------------------------------------------------------- combining


def test_bundled_semeval_with_a_local_folder(tmp_path):
    # The second source uses parent "1" too: it must not merge with SemEval's category 1.
    extra = write_relations(tmp_path / "extra", 6, parents=2, tag="x")
    data, weights = load_training_sources(["semeval2012", str(extra)], "train", None)
    semeval = load_relation_dataset("semeval2012", "train")
    assert weights is None
    assert len(data) == len(semeval) + 6 == 85
    assert [g.relation_type for g in data.relations] == [g.relation_type for g in semeval.relations] + \
        [f"x{r}" for r in range(6)]
    assert data.relations[0].positives == semeval.relations[0].positives
    assert data.relations[0].parent == "semeval2012:1" and data.relations[79].parent == "extra:0"
    assert data.relations[80].parent == "extra:1"
    assert {g.parent for g in data.relations[:79]}.isdisjoint({g.parent for g in data.relations[79:]})
    assert data.name == "semeval2012+extra" and data.split == "train"
    assert str(bundled_path("relation", "semeval2012")) in data.source and str(extra) in data.source
    # The sampler keeps the two parents called "1" apart.
    sampler = RelationAwareSampler(data, world_size=1, rank=0, relations_per_step=8, parent_grouping=True)
    assert "semeval2012:1" in sampler.parent_names and "extra:1" in sampler.parent_names


def test_weights_become_per_relation_weights(tmp_path):
    a = write_relations(tmp_path / "a", 4, tag="a")
    b = write_relations(tmp_path / "b", 10, tag="b")
    data, weights = load_training_sources([str(a), str(b)], "train", [2, 0.5])
    assert weights == [2.0] * 4 + [0.5] * 10
    sampler = RelationAwareSampler(data, world_size=1, rank=0, relations_per_step=3, relation_weights=weights,
                                   positives_per_relation=2, negatives_per_relation=1)
    order = sampler.epoch_order(0)
    # weight 2: every relation of a twice per epoch; weight 0.5: 5 of b's 10 relations once
    assert sorted(order[i] for i in range(len(order)) if order[i] < 4) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert len([i for i in order if i >= 4]) == 5 and len(set(i for i in order if i >= 4)) == 5
    # one source with a weight: the data unchanged, the weight on every relation
    alone, w = load_training_sources([str(a)], "train", [3])
    assert alone == load_relation_dataset(str(a), "train") and w == [3.0] * 4


def test_share_mode_gives_sources_their_share_of_the_slots(tmp_path):
    # 4 and 10 relations at 1 1: "relations" sees each relation once per epoch (4 and 10 slots),
    # "share" gives each source half of the 14 slots (7 and 7) whatever its size.
    a = write_relations(tmp_path / "a", 4, tag="a")
    b = write_relations(tmp_path / "b", 10, tag="b")
    data, per_relation = load_training_sources([str(a), str(b)], "train", [1, 1])
    assert per_relation == [1.0] * 14
    data, shared = load_training_sources([str(a), str(b)], "train", [1, 1], mode="share")
    assert shared == pytest.approx([7 / 4] * 4 + [7 / 10] * 10)
    assert math.fsum(shared) == pytest.approx(len(data))  # the epoch keeps its length
    sampler = RelationAwareSampler(data, world_size=2, rank=0, relations_per_step=2, relation_weights=shared,
                                   positives_per_relation=2, negatives_per_relation=1)
    epochs = 40
    per_source = [0, 0]
    for epoch in range(epochs):
        counts = sampler.epoch_counts(epoch)
        assert (sum(counts[:4]), sum(counts[4:])) == (7, 7)  # 4 x 7/4 and 10 x 7/10: exactly half each
        per_source[0] += sum(counts[:4])
        per_source[1] += sum(counts[4:])
        trained = [r for step in range(sampler.steps_per_epoch) for r, _, _ in sampler.plan(epoch, step)]
        assert len(trained) == 14 and sum(r < 4 for r in trained) == 7
    assert per_source == [7 * epochs, 7 * epochs]
    # 1 3: a quarter and three quarters of the slots
    _, quarter = load_training_sources([str(a), str(b)], "train", [1, 3], mode="share")
    assert math.fsum(quarter[:4]) == pytest.approx(14 / 4) and math.fsum(quarter[4:]) == pytest.approx(14 * 3 / 4)
    # one source: a share of everything, so no weights at all for the sampler
    _, single = load_training_sources([str(b)], "train", [5], mode="share")
    assert single == [1.0] * 10
    assert relation_weights([2, 0.5], [4, 10]) == [2.0] * 4 + [0.5] * 10


def test_train_weights_mode_is_a_checked_option(tmp_path):
    command = parse_train_command(["--train_data", "semeval2012", "extra", "--train_weights", "1", "3",
                                   "--train_weights_mode", "share"])
    assert command.run.data.train_weights_mode == "share"
    assert parse_train_command([]).run.data.train_weights_mode == "relations"
    with pytest.raises(ConfigError) as exc:
        parse_train_command(["--train_weights_mode", "steps"])
    assert str(exc.value) == "--train_weights_mode 'steps' is not one of relations, share; fix: pick one of them"
    with pytest.raises(ConfigError, match="--train_weights_mode 'steps' is not one of relations, share; fix:"):
        load_training_sources(["semeval2012"], "train", [1], mode="steps")


def test_same_short_name_twice_is_made_distinct(tmp_path):
    first = write_relations(tmp_path / "one" / "data", 2, tag="p")
    second = write_relations(tmp_path / "two" / "data", 2, tag="q", parents=1)
    data, _ = load_training_sources([str(first), str(second)], "train")
    assert data.name == "data+data-2"
    assert data.relations[2].parent == "data-2:0"


def test_hub_ids_load_from_a_local_copy_in_the_hub_schema(tmp_path, monkeypatch):
    """Offline, a hub id is read from $RELBERT_DS_DATA/<owner>/<name>/<split>.jsonl: the rows the
    hub's relbert/*_relational_similarity sets hold (relation_type, positives, negatives)."""
    for name, tag in (("t_rex_relational_similarity", "T"), ("conceptnet_relational_similarity", "C")):
        write_relations(tmp_path / "hub" / "relbert" / name, 3, tag=tag)
    with open(tmp_path / "hub" / "relbert" / "t_rex_relational_similarity" / "train.jsonl", "a") as handle:
        handle.write(json.dumps(T_REX_ROWS[0]) + "\n")  # a real row's names: brackets, spaces
    monkeypatch.setenv("RELBERT_DS_DATA", str(tmp_path / "hub"))
    data, weights = load_training_sources(["relbert/t_rex_relational_similarity",
                                           "relbert/conceptnet_relational_similarity", "semeval2012"], "train",
                                          [1, 1, 2])
    assert data.name == "t_rex_relational_similarity+conceptnet_relational_similarity+semeval2012"
    assert [g.relation_type for g in data.relations[:7]] == ["T0", "T1", "T2", T_REX_ROWS[0]["relation_type"], "C0",
                                                             "C1", "C2"]
    assert data.relations[3].positives[0] == ("Korean Air", "Seoul")
    assert weights == [1.0] * 7 + [2.0] * 79
    valid = per_source_validation(["relbert/t_rex_relational_similarity", "semeval2012"], "validation")
    assert [d.name for d in valid] == ["t_rex_relational_similarity", "semeval2012"]
    assert valid[0].relations[0].positives[0] == ("Tvh0n0", "Tvt0n0")


# Rows as the hub's relbert/t_rex_relational_similarity holds them (its dataset card's example).
T_REX_ROWS = [
    {"relation_type": "[Airline] has a hub in [Location]",
     "positives": [["Korean Air", "Seoul"], ["Cathay Pacific", "Hong Kong"], ["Qantas", "Singapore"]],
     "negatives": [["joint resolution", "United States Congress"], ["harp", "Ireland"]]},
    {"relation_type": "[Person] is a citizen of [Country]",
     "positives": [["Marie Curie", "France"], ["Alan Turing", "United Kingdom"]],
     "negatives": [["Seoul", "Korean Air"]]},
]


def test_hub_ids_load_through_the_datasets_path(monkeypatch):
    """No local copy: the hub id goes through ``datasets.load_dataset`` (stood in for by an
    in-memory ``datasets.Dataset`` of hub-schema rows) and its rows through the same checks."""
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(T_REX_ROWS)

    monkeypatch.delenv("RELBERT_DS_DATA", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data, weights = load_training_sources(["relbert/t_rex_relational_similarity", "semeval2012"], "train", [0.5, 1])
    assert calls == [("relbert/t_rex_relational_similarity", None, "train")]
    assert [g.relation_type for g in data.relations[:2]] == [r["relation_type"] for r in T_REX_ROWS]
    assert data.relations[0].positives[1] == ("Cathay Pacific", "Hong Kong") and data.relations[0].parent is None
    assert data.source.startswith("relbert/t_rex_relational_similarity + ")
    assert weights == [0.5, 0.5] + [1.0] * 79


def test_per_source_validation_gives_one_analogy_set_per_source(tmp_path):
    extra = write_relations(tmp_path / "extra", 5, tag="x", negatives=2)
    sets = per_source_validation(["semeval2012", str(extra)], "validation")
    assert [s.name for s in sets] == ["semeval2012", "extra"]
    assert sets[0].relations == load_relation_dataset("semeval2012", "validation").relations
    questions = [relation_analogy_questions(s) for s in sets]
    assert [(q.name, len(q)) for q in questions] == [("semeval2012", 79), ("extra", 5)]
    combined, _ = load_training_sources(["semeval2012", str(extra)], "validation")
    assert len(combined) == 84


# --------------------------------------------------------------------------- bad input


def test_a_source_that_cannot_be_read(tmp_path):
    with pytest.raises(DataError, match="no such file or folder") as exc:
        load_training_sources(["semeval2012", str(tmp_path / "missing")], "train")
    assert "\n" not in str(exc.value)
    garbled = tmp_path / "garbled"
    garbled.mkdir()
    (garbled / "train.jsonl").write_bytes(b"{not json\n")
    with pytest.raises(DataError, match="line 1: is not valid JSON"):
        load_training_sources(["semeval2012", str(garbled)], "train")


def test_an_empty_source(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "train.jsonl").write_text("\n")
    with pytest.raises(DataError, match="holds no records"):
        load_training_sources(["semeval2012", str(empty)], "train")


def test_a_relation_in_two_sources_with_different_pairs(tmp_path):
    other = write_relations(tmp_path / "other", 3, tag="x")
    lines = (other / "train.jsonl").read_text().splitlines()
    record = json.loads(lines[1])
    record["relation_type"] = "8d"  # a SemEval-2012 relation name, with other pairs
    (other / "train.jsonl").write_text("\n".join([lines[0], json.dumps(record), lines[2]]) + "\n")
    with pytest.raises(DataError) as exc:
        load_training_sources(["semeval2012", str(other)], "train")
    message = str(exc.value)
    assert "'8d'" in message and "semeval2012" in message and "other" in message and "different pairs" in message
    assert "fix:" in message and "\n" not in message


def test_the_same_data_twice(tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(bundled_path("relation", "semeval2012"), copy)
    with pytest.raises(DataError, match="same pairs"):
        load_training_sources(["semeval2012", str(copy)], "train")
    with pytest.raises(DataError, match="twice"):
        load_training_sources([str(copy), str(copy / ".." / "copy")], "train")


@pytest.mark.parametrize("weights", [[1, 0], [1, -2], [1, math.nan], [1, math.inf], [1, "2"], [1, True], [1]])
def test_weights_that_are_not_one_positive_number_per_source(weights):
    with pytest.raises(ConfigError) as exc:
        load_training_sources(["semeval2012", "semeval2012"], "train", weights)
    assert "--train_weights" in str(exc.value) and "fix:" in str(exc.value)


# --------------------------------------------------------------------------- 5,000 relations


def test_five_thousand_relations_plan_and_shard(big_source):
    data, _ = load_training_sources([str(big_source), "semeval2012"], "train")
    assert len(data) == 5079
    sampler = RelationAwareSampler(data, world_size=64, rank=0, relations_per_step=256, positives_per_relation=3,
                                   negatives_per_relation=2, seed=1)
    assert sampler.steps_per_epoch == math.ceil(5079 / 256) == 20
    seen = [r for step in range(sampler.steps_per_epoch) for r, _, _ in sampler.plan(0, step)]
    assert set(seen) == set(range(5079))  # every relation in the epoch (the last step filled)
    step = sampler.plan(0, 3)
    assert len({r for r, _, _ in step}) == 256
    whole = sampler.global_batch(0, 3)
    # Each rank's view: a copy with its rank (a fresh sampler costs ~1 s at this size); the
    # last rank's also from a sampler of its own.
    views = [copy.copy(sampler) for _ in range(64)]
    for r, view in enumerate(views):
        view.rank = r
    parts = [view.local_batch(0, 3) for view in views]
    last = RelationAwareSampler(data, world_size=64, rank=63, relations_per_step=256, positives_per_relation=3,
                                negatives_per_relation=2, seed=1).local_batch(0, 3)
    assert last.pairs == parts[63].pairs and torch.equal(last.relation_ids, parts[63].relation_ids)
    assert sum((p.pairs for p in parts), []) == whole.pairs
    assert torch.equal(torch.cat([p.is_positive for p in parts]), whole.is_positive)
    assert {len(p) for p in parts} <= {len(whole) // 64, len(whole) // 64 + 1}


def test_five_thousand_relations_loss_against_the_closed_form(big_source):
    """At 256 relations x (3 positives + 2 negatives) per step, embeddings that separate the
    relations perfectly (one axis per relation's positives, another per its negatives) give
    cosines of exactly 1 (positives) and 0 (negatives), so NCE's every term is
    log(1 + K exp(-1/t)), K = 2 own negatives + 255 x 3 positives of the other relations."""
    data, _ = load_training_sources([str(big_source)], "train")
    sampler = RelationAwareSampler(data, world_size=1, rank=0, relations_per_step=256, positives_per_relation=3,
                                   negatives_per_relation=2, seed=2)
    batch = sampler.global_batch(0, 5)
    slot = {rel: i for i, rel in enumerate(dict.fromkeys(batch.relation_ids.tolist()))}
    axes = torch.tensor([2 * slot[r] + (0 if p else 1) for r, p in zip(batch.relation_ids.tolist(),
                                                                       batch.is_positive.tolist())])
    emb = torch.nn.functional.one_hot(axes, 512).double().requires_grad_(True)
    t = 0.05
    out = NCELoss(t)(emb, batch.relation_ids, batch.is_positive, batch.parent_ids, batch.pair_ids)
    k = 2 + 255 * 3
    assert out.value == pytest.approx(math.log1p(k * math.exp(-1 / t)), rel=1e-9)
    assert out.metrics["pos_cos"] == pytest.approx(1.0) and out.metrics["neg_cos"] == pytest.approx(0.0)
    assert out.metrics["retrieval_acc"] == 1.0
    out.loss.backward()
    assert torch.isfinite(emb.grad).all()


def test_the_mode_reaches_the_batch_plan(tmp_path):
    # The command line's --train_weights_mode is what the run's plan uses (the dry run plans as the
    # trainer does): with equal weights, share gives the small source half of the slots, relations a
    # twelfth of them, so the first step's prompts differ.
    from relbert_ds.training.dry_run import batch_plan
    from tests.fakes import write_relations

    extra = write_relations(tmp_path / "extra", 12, positives=4, negatives=3, parents=3, tag="x")
    plans = {}
    for mode in ("relations", "share"):
        run = parse_train_command(["--train_data", "semeval2012", str(extra), "--train_weights", "1", "1",
                                   "--train_weights_mode", mode]).run
        plans[mode] = batch_plan(run, 2)
    assert plans["relations"]["relations"] == plans["share"]["relations"] == 91
    assert plans["relations"]["prompts_per_step"] != plans["share"]["prompts_per_step"]

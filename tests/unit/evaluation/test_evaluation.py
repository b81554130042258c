"""The evaluator in one process: shard plan, analogy scoring, classification probe, mapping search,
task preparation and bad input, the runner end to end with a fake encoder, outputs."""
from __future__ import annotations

import itertools
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from relbert_ds import evaluation
from relbert_ds.data.schemas import AnalogyDataset, AnalogyQuestion, ClassificationDataset, LexicalPair
from relbert_ds.errors import ConfigError, DataError, ModelError, UserError
from relbert_ds.evaluation import analogy, classification, mapping, runner, sharding
from relbert_ds.evaluation.classification import ProbeOptions
from relbert_ds.evaluation.runner import EncodingOptions
from relbert_ds.evaluation.sharding import deal_batches, encode_sharded
from relbert_ds.model.batching import fixed_batches, length_order
from tests.fakes import FakeEncoder, hashed_vector

# --------------------------------------------------------------------------- helpers


def table_lookup(table: dict):
    return lambda pairs: np.stack([np.asarray(table[tuple(p)], dtype=np.float32) for p in pairs])


# --------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("n_items,batch_size", [(0, 4), (1, 4), (7, 3), (12, 4), (13, 4), (40, 5)])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_plan_assigns_every_batch_once_with_equal_forward_counts(n_items, batch_size, world):
    order = list(range(n_items))[::-1]
    plan = deal_batches(fixed_batches(order, batch_size), world)
    n_batches = math.ceil(n_items / batch_size)
    assert len(plan.batches) == n_batches
    assert {len(s) for s in plan.steps} <= {math.ceil(n_batches / world)}  # lockstep
    assert len(plan.steps) == world
    seen = [b for steps in plan.steps for b in steps if b is not None]
    assert sorted(seen) == sorted(plan.batches)  # each batch exactly once
    for r in range(world):
        for k, batch in enumerate(plan.steps[r]):
            b = k * world + r
            assert batch == (plan.batches[b] if b < n_batches else None)  # round robin, dummies at the end
    assert sum(b is None for s in plan.steps for b in s) == world * math.ceil(n_batches / world) - n_batches
    # The batches themselves never depend on the world size.
    assert plan.batches == deal_batches(fixed_batches(order, batch_size), 1).batches
    assert [i for b in plan.batches for i in b] == order


def test_length_order_longest_first_ties_by_pair():
    pairs = [("b", "x"), ("a", "x"), ("long", "word"), ("a", "y")]
    lengths = [2, 2, 8, 2]
    assert length_order(pairs, lengths) == [2, 1, 3, 0]


def test_plan_rejects_bad_batch_size():
    with pytest.raises(ConfigError):
        fixed_batches([0, 1], 0)


def _simulate(monkeypatch, encoder, pairs, batch_size, world):
    """Run encode_sharded as each rank of a fake world; the fake all-gather checks each rank's
    local rows against the plan and returns what a real gather would."""
    unique = list(dict.fromkeys(pairs))
    plan = deal_batches(fixed_batches(length_order(unique, encoder.prompt_lengths(unique)), batch_size), world)
    expected = [torch.from_numpy(np.stack([encoder.vector_fn(unique[i]) for i in plan.rows_of_rank(r)]))
                if plan.rows_of_rank(r) else torch.zeros(0, encoder.dim) for r in range(world)]
    outputs, forwards = [], []
    for rank in range(world):
        def fake_gather(local, rank=rank):
            assert torch.equal(local, expected[rank])
            return torch.cat(expected)

        monkeypatch.setattr(sharding, "world_info", lambda rank=rank: (rank, world))
        monkeypatch.setattr(sharding, "all_gather_no_grad", fake_gather)
        encoder.calls.clear()
        outputs.append(encode_sharded(encoder, pairs, batch_size=batch_size))
        forwards.append([len(c) for c in encoder.calls])
    return outputs, forwards, plan


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_encode_sharded_order_and_dummy_forwards(monkeypatch, world):
    words = ["cat", "dog", "electroencephalography", "ox", "tree", "ant", "sun", "moon", "ab"]
    pairs = [(a, b) for a in words for b in words if a != b][:50]
    pairs = pairs + pairs[:7]  # duplicates come back in place
    enc = FakeEncoder()
    enc.train()
    outputs, forwards, plan = _simulate(monkeypatch, enc, pairs, batch_size=6, world=world)
    want = np.stack([hashed_vector(p) for p in pairs])
    for out in outputs:
        assert out.dtype == np.float32 and out.shape == (len(pairs), 8)
        assert np.array_equal(out, want)  # full table, input order, on every rank
    n_batches = len(plan.batches)
    assert all(len(f) == math.ceil(n_batches / world) for f in forwards)
    dummies = sum(f.count(1) for f in forwards) - sum(len(b) == 1 for b in plan.batches)
    assert dummies == world * math.ceil(n_batches / world) - n_batches
    assert enc.training  # mode restored


def test_encode_sharded_matches_encoder_encode(minilm):
    pairs = [("cat", "animal"), ("paris", "france"), ("oak", "tree"), ("cat", "animal"), ("hammer", "nail")]
    got = encode_sharded(minilm, pairs, batch_size=2)
    want = minilm.encode(pairs, batch_size=2)
    assert np.allclose(got, want, atol=1e-5)


# --------------------------------------------------------------------------- analogy


def _analogy_case():
    vec = {("s", "1"): [1, 0], ("a", "1"): [0, 1], ("b", "1"): [1, 0.1], ("c", "1"): [1, 0],
           ("s", "2"): [1, 0], ("a", "2"): [1, 0], ("b", "2"): [2, 0], ("c", "2"): [0, 1],
           ("s", "3"): [0, 1], ("a", "3"): [0, 1], ("b", "3"): [1, 1]}
    questions = (
        AnalogyQuestion(("s", "1"), (("a", "1"), ("b", "1"), ("c", "1")), 2, "A"),  # right
        AnalogyQuestion(("s", "2"), (("a", "2"), ("b", "2"), ("c", "2")), 1, "A"),  # exact tie 0/1, answer 1
        AnalogyQuestion(("s", "3"), (("a", "3"), ("b", "3")), 1, "B"),  # wrong
    )
    return AnalogyDataset("toy", "test", questions, "mem"), table_lookup(vec)


def test_analogy_accuracy_ties_and_prefixes_by_hand():
    data, lookup = _analogy_case()
    out = analogy.score_analogy(data, lookup, keep_predictions=True)
    # Credits: 1, 1/2 (tie between choices 0 and 1, answer among them), 0.
    assert out["accuracy"] == pytest.approx(1.5 / 3)
    assert out["accuracy_by_position"] == pytest.approx(1 / 3)  # lowest index wins the tie: 0 != 1
    assert out["n_tied"] == 1
    assert out["accuracy_by_prefix"] == {"A": pytest.approx(0.75), "B": 0.0}
    assert out["n_by_prefix"] == {"A": 2, "B": 1}
    preds = out["predictions"]
    assert [p["prediction"] for p in preds] == [2, 0, 0]
    assert preds[1]["tied"] == [0, 1] and preds[1]["credit"] == 0.5
    assert preds[0]["scores"][2] == pytest.approx(1.0) and preds[0]["scores"][0] == pytest.approx(0.0)


def test_tie_with_answer_outside_earns_nothing():
    r = analogy.answer_question(np.array([1.0, 0.0]), np.array([[1, 0], [3, 0], [0, 1]], float), 2)
    assert r.tied == (0, 1) and r.prediction == 0 and r.credit == 0.0


# --------------------------------------------------------------------------- classification


def _synthetic_classification(n_train=30, n_val=9, n_test=12, with_validation=True):
    """Three relations, separable by the (h, t) vector; (t, h) vectors are noise."""
    rng = np.random.default_rng(0)
    centers = {"hyper": np.eye(6)[0] * 4, "mero": np.eye(6)[1] * 4, "random": np.eye(6)[2] * 4}
    table, splits = {}, {}
    for split, n in (("train", n_train), ("validation", n_val), ("test", n_test)):
        rows = []
        for i in range(n):
            label = list(centers)[i % 3]
            h, t = f"{split}{i}h", f"{split}{i}t"
            table[(h, t)] = centers[label] + rng.normal(0, 0.3, 6)
            table[(t, h)] = rng.normal(0, 1, 6)
            rows.append(LexicalPair(h, t, label))
        splits[split] = tuple(rows)
    if not with_validation:
        del splits["validation"]
    return ClassificationDataset("synthetic", splits, "mem"), table_lookup(table)


@pytest.mark.parametrize("probe", ["torch", "sklearn"])
def test_classification_learns_separable_data(probe):
    data, lookup = _synthetic_classification()
    out = classification.run_classification(data, lookup, split="test", options=ProbeOptions(max_iter=300, probe=probe),
                                            keep_predictions=True)
    assert out["probe"] == probe and out["features"] == "mean"
    assert out["accuracy"] == 1.0 and out["f1_macro"] == 1.0 and out["f1_micro"] == 1.0
    assert out["f1_per_class"] == {"hyper": 1.0, "mero": 1.0, "random": 1.0}
    assert out["selected_on"] == "validation" and len(out["grid"]) == 9
    assert out["n_train"] == 30 and out["n_eval"] == 12 and out["labels"] == ["hyper", "mero", "random"]
    assert {p["gold"] for p in out["predictions"]} == {"hyper", "mero", "random"}
    json.dumps(out)


def test_parallel_fits_change_nothing():
    data, lookup = _synthetic_classification()
    one = classification.run_classification(data, lookup, options=ProbeOptions(max_iter=20, workers=1, probe="sklearn"))
    two = classification.run_classification(data, lookup, options=ProbeOptions(max_iter=20, workers=2, probe="sklearn"))
    for out in (one, two):
        out.pop("time_s")
    assert one == two


def test_classification_features_are_both_directions():
    data, lookup = _synthetic_classification()
    feats = classification.pair_features(data.splits["train"][:2], lookup)
    p = data.splits["train"][0]
    assert feats.shape == (2, 12)
    assert np.allclose(feats[0], np.concatenate([lookup([(p.head, p.tail)])[0], lookup([(p.tail, p.head)])[0]]))


def _scripted_fit(good_config: int, also_good=()):
    """fit_predict stand-in: configuration ``good_config`` (and ``also_good``) predict validation right;
    test predictions encode the configuration index so the test can see which one was reported."""
    grid = classification.search_grid()
    calls = []

    def fit(config, x_train, y_train, x_eval, max_iter=200, seed=0, blas_threads=1):
        index = grid.index(config) if config in grid else -1
        calls.append(index)
        x_val, x_test = x_eval
        good = index == good_config or index in also_good
        y_val = _scripted_fit.y_val if good else np.zeros(len(x_val), dtype=np.int64)
        return [y_val, np.full(len(x_test), index % 3, dtype=np.int64)], 7

    return fit, calls


def test_grid_selection_uses_validation(monkeypatch):
    data, lookup = _synthetic_classification()
    code = {"hyper": 0, "mero": 1, "random": 2}
    _scripted_fit.y_val = np.array([code[p.relation] for p in data.splits["validation"]])
    fit, calls = _scripted_fit(good_config=7)
    monkeypatch.setattr(classification, "fit_predict", fit)
    out = classification.run_classification(data, lookup, options=ProbeOptions(probe="sklearn"), split="test")
    assert sorted(calls) == list(range(9))
    assert out["config"]["learning_rate_init"] == 1e-5 and out["config"]["hidden_layer_sizes"] == 150
    assert out["grid"][7]["validation_f1_macro"] == 1.0
    assert all(g["validation_f1_macro"] == pytest.approx(1 / 6) for i, g in enumerate(out["grid"]) if i != 7)
    # The reported test predictions are those of configuration 7 (all label 7 % 3 = 1).
    assert out["f1_per_class"]["mero"] > 0 and out["f1_per_class"]["hyper"] == 0
    # Ties go to the first configuration in grid order.
    fit, _ = _scripted_fit(good_config=5, also_good=(2,))
    monkeypatch.setattr(classification, "fit_predict", fit)
    out = classification.run_classification(data, lookup, options=ProbeOptions(probe="sklearn"))
    assert out["config"]["hidden_layer_sizes"] == 200


def test_no_validation_or_validation_reported_uses_default(monkeypatch):
    data, lookup = _synthetic_classification(with_validation=False)
    out = classification.run_classification(data, lookup, options=ProbeOptions(max_iter=50), split="test")
    assert out["selected_on"] is None and len(out["grid"]) == 1
    assert out["config"]["learning_rate_init"] == 1e-3 and out["config"]["hidden_layer_sizes"] == 100
    data, lookup = _synthetic_classification()
    out = classification.run_classification(data, lookup, options=ProbeOptions(max_iter=50), split="validation")
    assert out["selected_on"] is None and out["n_eval"] == 9
    assert classification.needed_splits(data, "validation") == ["train", "validation"]
    assert classification.needed_splits(data, "test") == ["train", "validation", "test"]


# --------------------------------------------------------------------------- mapping


@pytest.mark.parametrize("n", [6, 7, 8])
@pytest.mark.parametrize("seed", range(4))
def test_local_search_matches_brute_force(n, seed):
    rng = np.random.default_rng(100 * n + seed)
    src = rng.standard_normal((n * (n - 1), 5))
    tgt = rng.standard_normal((n * (n - 1), 5))
    sim = mapping.similarity_tensor(src, tgt, n)
    exact_perm, exact = mapping.brute_force(sim)
    perm, score = mapping.local_search(sim)
    assert score == pytest.approx(exact, abs=1e-9)
    assert perm == exact_perm
    # The score really is the mean over ordered pairs of the pair cosines.
    manual = np.mean([sim[a, b, exact_perm[a], exact_perm[b]] for a in range(n) for b in range(n) if a != b])
    assert exact == pytest.approx(manual)
    assert sim[0, 0].sum() == 0  # a term paired with itself is not a pair


def test_brute_force_is_exhaustive_on_small_case():
    n = 4
    rng = np.random.default_rng(3)
    sim = mapping.similarity_tensor(rng.standard_normal((12, 3)), rng.standard_normal((12, 3)), n)
    perms = np.array(list(itertools.permutations(range(n))))
    scores = mapping.mapping_scores(sim, perms)
    assert mapping.brute_force(sim) == (tuple(perms[np.argmax(scores)]), pytest.approx(scores.max()))


def _planted(n, seed=0, noise=0.05):
    rng = np.random.default_rng(seed)
    vec = {f"s{i}": rng.standard_normal(16) for i in range(n)}
    sigma = rng.permutation(n)  # source i <-> target t{sigma[i]}
    for i in range(n):
        vec[f"t{sigma[i]}"] = vec[f"s{i}"] + rng.normal(0, noise, 16)
    fn = lambda pairs: np.stack([vec[a] - vec[b] for a, b in pairs])  # noqa: E731
    return [f"s{i}" for i in range(n)], [f"t{k}" for k in range(n)], sigma, fn


@pytest.mark.parametrize("n", [5, 12])
def test_solve_mapping_recovers_planted_alignment(n):
    source, target, sigma, fn = _planted(n)
    solution = mapping.solve_mapping(fn, source, target)
    assert solution.exhaustive == (n <= 8)
    assert solution.permutation == tuple(int(s) for s in sigma)


def test_solve_mapping_with_an_encoder(minilm):
    solution = mapping.solve_mapping(minilm, ["sun", "planet", "gravity"], ["nucleus", "electron", "charge"])
    assert sorted(solution.permutation) == [0, 1, 2] and -1 <= solution.score <= 1


def test_mapping_dataset_evaluation_and_errors(tmp_path):
    source, target, sigma, fn = _planted(6, seed=1)
    aligned = [target[s] for s in sigma]  # target[i] is the counterpart of source[i]
    good = tmp_path / "map.jsonl"
    good.write_text(json.dumps({"source": source, "target": aligned}) + "\n"
                    + json.dumps({"source": ["a", "b"], "target": ["c", "d"]}) + "\n")
    data = mapping.load_mapping_dataset(str(good))
    assert len(data) == 2
    vec_fn = lambda pairs: np.stack([fn([p])[0] if p[0][0] in "st" else hashed_vector(p) for p in pairs])  # noqa
    out = mapping.run_mapping(data, vec_fn, keep_predictions=True)
    assert out["predictions"][0]["accuracy"] == 1.0
    assert out["n_problems"] == 2 and 0.5 <= out["accuracy"] <= 1.0
    for line, fragment in [({"source": ["a", "b"], "target": ["c"]}, "'source' has 2 terms"),
                           ({"source": ["a", "a"], "target": ["c", "d"]}, "twice"),
                           ({"source": ["a"], "target": ["c"]}, "at least 2"),
                           ({"target": ["c", "d"]}, "missing field 'source'")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"source": ["x", "y"], "target": ["z", "w"]}) + "\n" + json.dumps(line) + "\n")
        with pytest.raises(DataError, match=fragment) as info:
            mapping.load_mapping_dataset(str(bad))
        assert "line 2" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(DataError, match="does not exist"):
        mapping.load_mapping_dataset(str(tmp_path / "nope.jsonl"))


# --------------------------------------------------------------------------- tasks and bad input


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_default_tasks_list_missing_splits_instead_of_failing():
    tasks = evaluation.prepare_tasks(classification="none", split="test")
    assert [d.name for d in tasks.analogy] == ["sat", "u2"]
    assert {(m["dataset"], m["split"]) for m in tasks.missing} == {("u4", "test"), ("google", "test"),
                                                                     ("bats", "test")}
    tasks = evaluation.prepare_tasks(analogy=["sat"], classification="none", split=["valid", "test"])
    assert [(d.name, d.split, len(d)) for d in tasks.analogy] == [("sat", "validation", 37), ("sat", "test", 337)]


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(analogy=["no_such_set"]), "unknown dataset 'no_such_set'"),
    (dict(analogy=["u4"], split="test"), "no split 'test'"),
    (dict(analogy=["/no/such/folder"]), "no such file or folder"),
    (dict(analogy=["sat"], split="train"), "unknown split"),
    (dict(analogy=["sat", "none"]), "'none' cannot be combined"),
    (dict(analogy="none", classification=["nope"]), "unknown dataset 'nope'"),
    (dict(analogy="none", classification="none", mapping=["/no/map.jsonl"]), "does not exist"),
])
def test_bad_input_fails_with_one_line(kwargs, fragment):
    kwargs.setdefault("classification", "none")
    with pytest.raises((DataError, ConfigError), match=fragment) as info:
        evaluation.prepare_tasks(**kwargs)
    assert "\n" not in str(info.value)


def test_bad_files_fail_before_encoding(tmp_path):
    q = {"stem": ["a", "b"], "choice": [["c", "d"], ["e", "f"]], "answer": 0}
    _write_jsonl(tmp_path / "empty_dir" / "notes.txt", [])
    cases = {
        "malformed": [q, "{not json"],
        "out_of_range": [q, {**q, "answer": 5}],
    }
    for name, rows in cases.items():
        _write_jsonl(tmp_path / name / "test.jsonl", rows)
    with pytest.raises(DataError, match="line 2: is not valid JSON"):
        evaluation.prepare_tasks(analogy=[str(tmp_path / "malformed")], classification="none")
    with pytest.raises(DataError, match="answer index 5 is out of range"):
        evaluation.prepare_tasks(analogy=[str(tmp_path / "out_of_range")], classification="none")
    with pytest.raises(DataError, match="no split 'test'"):
        evaluation.prepare_tasks(analogy=[str(tmp_path / "empty_dir")], classification="none")
    cls = tmp_path / "cls"
    _write_jsonl(cls / "train.jsonl", [{"head": "a", "tail": "b", "relation": "hyper"}])
    _write_jsonl(cls / "test.jsonl", [{"head": "c", "tail": "d", "relation": "mero"}])
    with pytest.raises(DataError, match="label 'mero' occurs in split 'test' but never in train"):
        evaluation.prepare_tasks(analogy="none", classification=[str(cls)])
    only_train = tmp_path / "only_train"
    _write_jsonl(only_train / "train.jsonl", [{"head": "a", "tail": "b", "relation": "hyper"}])
    with pytest.raises(DataError, match="needs train.jsonl and test.jsonl"):
        evaluation.prepare_tasks(analogy="none", classification=[str(only_train)])


# --------------------------------------------------------------------------- runner end to end


def _runner_case(tmp_path):
    words = [f"w{i}" for i in range(12)]
    valid = [{"stem": [words[i], words[i + 1]], "choice": [[words[i + 2], words[i + 3]], [words[i], words[i + 1]]],
              "answer": 1, "prefix": "p"} for i in range(4)]
    test = [{"stem": [words[i], words[i + 1]], "choice": [[words[i], words[i + 1]], [words[i + 4], words[i + 2]]],
             "answer": 0, "prefix": "q" if i % 2 else "p"} for i in range(5)]
    _write_jsonl(tmp_path / "ana" / "valid.jsonl", valid)
    _write_jsonl(tmp_path / "ana" / "test.jsonl", test)
    cls = tmp_path / "cls"
    for split, n in (("train", 24), ("validation", 6), ("test", 9)):
        _write_jsonl(cls / f"{split}.jsonl", [{"head": f"{split}h{i}", "tail": f"{split}t{i}",
                                               "relation": ["a", "b", "c"][i % 3]} for i in range(n)])
    _write_jsonl(tmp_path / "map.jsonl", [{"source": ["x1", "x2", "x3"], "target": ["y1", "y2", "y3"]}])
    return evaluation.prepare_tasks(analogy=[str(tmp_path / "ana")], classification=[str(cls)],
                                mapping=[str(tmp_path / "map.jsonl")], split=["valid", "test"])


def test_runner_end_to_end_with_fake_encoder(tmp_path):
    tasks = _runner_case(tmp_path)
    assert len(tasks.pairs()) == len(set(tasks.pairs()))
    enc = FakeEncoder()
    res = runner.evaluate_tasks(enc, tasks, encoding=EncodingOptions(batch_size=5), probe=ProbeOptions(max_iter=30),
                                keep_predictions=True)
    ana = res["analogy"]
    assert set(ana) == {"ana/validation", "ana/test", "ana/full"}
    assert ana["ana/validation"]["accuracy"] == 1.0 and ana["ana/test"]["accuracy"] == 1.0  # choice == stem
    assert ana["ana/full"]["n_questions"] == 9 and ana["ana/full"]["n_by_prefix"] == {"p": 7, "q": 2}
    # Next to test, the classification validation split (the probe selects on it) is listed, not fitted.
    assert set(res["classification"]) == {"cls/test"}
    assert {"task": "classification", "dataset": "cls", "split": "validation",
            "reason": "the probe selects on it; ask for it alone to fit the default grid point"} in res["missing"]
    assert res["classification"]["cls/test"]["selected_on"] == "validation"
    assert res["mapping"]["map"]["n_problems"] == 1
    assert res["metrics"]["analogy/ana/full/accuracy"] == 1.0
    assert "classification/cls/test/f1_macro" in res["metrics"]
    # One encode for everything: every unique pair embedded exactly once.
    embedded = [p for call in enc.calls for p in call]
    assert sorted(embedded) == sorted(tasks.pairs())

    out = tmp_path / "out"
    doc = evaluation.write_outputs({"model": res, "baseline": res}, {"world_size": 1}, output=out / "r.json",
                               predictions=out / "p.jsonl", tensorboard_dir=out / "tb")
    saved = json.loads((out / "r.json").read_text())
    assert saved == json.loads(json.dumps(doc))
    assert "predictions" not in saved["models"]["model"]["analogy"]["ana/test"]
    records = [json.loads(line) for line in (out / "p.jsonl").read_text().splitlines()]
    assert {r["task"] for r in records} == {"analogy", "classification", "mapping"}
    assert sum(r["task"] == "analogy" and r["model"] == "model" for r in records) == 9
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tb").iterdir())

    table = evaluation.markdown_table({"model": res, "baseline": res})
    assert "| analogy | ana | full | accuracy | 9 | 100.0 | 100.0 |" in table
    assert "| classification | cls | test | f1_macro | 9 |" in table


def test_markdown_shows_missing_bundled_split():
    tasks = evaluation.prepare_tasks(analogy=["sat"], classification="none", split="validation")
    tasks.missing.append({"task": "analogy", "dataset": "u4", "split": "test", "reason": "no test split in the "
                                                                                           "bundled data"})
    res = runner.evaluate_tasks(FakeEncoder(), tasks)
    table = evaluation.markdown_table({"model": res})
    assert "| u4 |" not in table  # only what was measured is a row
    assert "Not measured: u4 test (no test split in the bundled data)" in table
    assert "| analogy | sat | validation | accuracy | 37 |" in table


def test_semeval2012_is_one_name_in_the_trainer_and_the_evaluator():
    from relbert_ds.evaluation import validation

    tasks = evaluation.prepare_tasks(analogy=["semeval2012"], classification="none", split=["validation", "test"])
    assert [(d.name, d.split, len(d)) for d in tasks.analogy] == [("semeval2012", "validation", 79)]
    assert tasks.missing == [{"task": "analogy", "dataset": "semeval2012", "split": "test",
                              "reason": "SemEval-2012 questions exist for validation only"}]
    from relbert_ds.data import load_relation_dataset

    relations = load_relation_dataset("semeval2012", "validation")
    trainer_set = validation.load_validation_sets(["semeval2012"], relations)[0]
    assert trainer_set.questions == tasks.analogy[0].questions
    with pytest.raises(DataError, match="validation split only"):
        evaluation.prepare_tasks(analogy=["semeval2012"], classification="none", split="test")


def test_evaluate_with_real_encoder_is_usable_from_python(minilm, tmp_path):
    q = {"stem": ["cat", "animal"], "choice": [["oak", "tree"], ["paris", "france"]], "answer": 0}
    _write_jsonl(tmp_path / "ana" / "test.jsonl", [q, {**q, "answer": 1}])
    res = runner.evaluate(minilm, analogy=[str(tmp_path / "ana")], classification=(), split="test")
    assert res["analogy"]["ana/test"]["n_questions"] == 2
    assert res["analogy"]["ana/test"]["accuracy"] == pytest.approx(0.5)  # same stem, answers differ
    assert res["model"]["template"] == minilm.template and res["world_size"] == 1


# --------------------------------------------------------------------------- CLI pieces (no process group)


def test_cli_parsing_and_model_resolution(tmp_path):
    from relbert_ds.cli import evaluate as cli
    from relbert_ds.training.model_specs import resolve_model

    args = cli.parse_args(["--model", "m", "--analogy", "sat", "u2", "--split", "valid", "test",
                           "--classification", "none", "--local_rank=1"])
    assert args.analogy == ["sat", "u2"] and args.split == ["valid", "test"] and args.classification == ["none"]
    with pytest.raises(ConfigError, match="--split"):
        cli.parse_args(["--model", "m", "--split", "train"])
    with pytest.raises(ConfigError, match="--batch_size"):
        cli.parse_args(["--model", "m", "--batch_size", "0"])
    ckpt = tmp_path / "run"
    (ckpt / "checkpoints" / "global_step10").mkdir(parents=True)
    (ckpt / "checkpoints" / "latest").write_text("global_step10")
    with pytest.raises(UserError, match="not a complete"):  # a tag folder without its completion marker
        resolve_model(str(ckpt / "checkpoints"))
    (ckpt / "history.jsonl").write_text("")
    with pytest.raises(ModelError, match=r"training run.*best_model.*checkpoints"):
        resolve_model(str(ckpt))
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(str(tmp_path / "missing_model"))
    assert resolve_model("all-MiniLM-L6-v2").kind == "huggingface"


def test_trained_model_keeps_its_prompt_unless_overridden(tiny_bert, tmp_path):
    """A saved RelBERT model is evaluated with the template/pooling it was trained with."""
    from relbert_ds import RelationEncoder
    from relbert_ds.model.prompts import TEMPLATES
    from relbert_ds.training import model_specs as cli

    RelationEncoder.from_pretrained(tiny_bert, template="b", pooling="average").save_pretrained(tmp_path / "m")
    saved = str(tmp_path / "m")
    assert cli.resolve_model(saved).trained and cli.resolve_model(saved, template=TEMPLATES["b"]).trained
    with pytest.raises(ModelError, match=r"trained with template.*--override_prompt"):
        cli.resolve_model(saved, template="a")
    with pytest.raises(ModelError, match="trained with pooling 'average'"):
        cli.resolve_model(saved, pooling="mask")
    forced = cli.resolve_model(saved, template="a", override_prompt=True)
    assert forced.load().template == TEMPLATES["a"]
    # a plain backbone takes any prompt (zero-shot)
    assert not cli.resolve_model(tiny_bert, template="a").trained


# --------------------------------------------------------------------------- encoding once, vector cache


def _without_timing(res: dict) -> dict:
    out = {k: v for k, v in res.items() if k not in ("timing", "cache_hit", "cache_file")}
    out["classification"] = {k: {m: v for m, v in e.items() if m != "time_s"} for k, e in res["classification"].items()}
    return out


def test_classification_prompts_both_directions_encoded_once(tmp_path):
    tasks = _runner_case(tmp_path)
    enc = FakeEncoder()
    runner.evaluate_tasks(enc, tasks, probe=ProbeOptions(max_iter=5))
    embedded = [p for call in enc.calls for p in call]
    assert len(embedded) == len(set(embedded))  # nothing encoded twice
    data, _ = tasks.classification[0]
    for split in ("train", "validation", "test"):
        for p in data.splits[split]:
            assert (p.head, p.tail) in embedded and (p.tail, p.head) in embedded


def test_vector_cache_second_run_does_not_encode_and_gives_the_same_metrics(tmp_path):
    tasks = _runner_case(tmp_path)
    cache = tmp_path / "cache"
    first_encoder = FakeEncoder()
    first = runner.evaluate_tasks(first_encoder, tasks, encoding=EncodingOptions(cache_dir=cache),
                                  probe=ProbeOptions(max_iter=20))
    assert first["cache_hit"] is False and first_encoder.calls
    files = list(cache.glob("*.npz"))
    assert len(files) == 1 and str(files[0]) == first["cache_file"]
    second_encoder = FakeEncoder()
    second = runner.evaluate_tasks(second_encoder, tasks, encoding=EncodingOptions(cache_dir=cache),
                                   probe=ProbeOptions(max_iter=20, probe="sklearn"))
    assert second["cache_hit"] is True and second_encoder.calls == []  # not one forward
    third = runner.evaluate_tasks(FakeEncoder(), tasks, encoding=EncodingOptions(cache_dir=cache),
                                  probe=ProbeOptions(max_iter=20))
    assert _without_timing(third) == _without_timing(first)
    assert second["analogy"] == first["analogy"] and second["classification"]["cls/test"]["probe"] == "sklearn"


def test_corrupt_or_foreign_cache_file_is_ignored_with_a_warning(tmp_path):
    tasks = _runner_case(tmp_path)
    cache = tmp_path / "cache"
    reference = runner.evaluate_tasks(FakeEncoder(), tasks, encoding=EncodingOptions(cache_dir=cache),
                                      probe=ProbeOptions(max_iter=10))
    path = Path(reference["cache_file"])
    path.write_bytes(path.read_bytes()[:100])  # truncated, as by an interrupted copy
    enc = FakeEncoder()
    with pytest.warns(UserWarning, match="unreadable vector cache file"):
        again = runner.evaluate_tasks(enc, tasks, encoding=EncodingOptions(cache_dir=cache),
                                      probe=ProbeOptions(max_iter=10))
    assert enc.calls and _without_timing(again) == _without_timing(reference)
    # A well-formed file under the wrong key (copied by hand) is refused too, then rewritten.
    from relbert_ds.evaluation.cache import VectorCache

    np.savez(path, table=np.zeros((3, 8), np.float32), key=np.array(json.dumps({"key": "other"})))
    with pytest.warns(UserWarning, match="do not match its key"):
        assert VectorCache(cache).load(json.loads(json.dumps({**_key(tasks), "key": path.stem}))) is None


def _key(tasks):
    from relbert_ds.evaluation.cache import cache_key

    return cache_key(FakeEncoder(), tasks.pairs())


def test_cache_key_follows_weights_prompt_and_pairs():
    from relbert_ds.evaluation.cache import cache_key, model_fingerprint

    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b.weight[0, 0] += 1e-3
    assert model_fingerprint(a) != model_fingerprint(b)
    pairs = [("a", "b"), ("c", "d")]
    base = cache_key(a, pairs)
    a.template, a.pooling, a.max_length = "t", "average", 64
    assert cache_key(a, pairs)["key"] != base["key"]
    assert cache_key(a, pairs[::-1])["key"] != cache_key(a, pairs)["key"]
    a.max_length = 32
    assert cache_key(a, pairs)["key"] != cache_key(b, pairs)["key"]


# --------------------------------------------------------------------------- summed (relbert) features


def test_sum_features_are_relbert_summed_pooling(minilm):
    pairs = [("cat", "animal"), ("paris", "france"), ("hydrogen", "element")]
    counts = runner.pooled_token_counts(minilm, pairs)
    was_training = minilm.training  # the session's encoder may have been left in train mode (dropout)
    minilm.eval()
    with torch.no_grad():
        tokens = minilm.tokenize(pairs)
        hidden = minilm.backbone(**tokens).last_hidden_state
    minilm.train(was_training)
    # average_no_mask: every prompt token except the template's mask token (template d has one).
    keep = tokens["attention_mask"].bool() & (tokens["input_ids"] != minilm.tokenizer.mask_token_id)
    assert counts.tolist() == keep.sum(1).tolist() and keep.sum() < tokens["attention_mask"].sum()
    summed = (hidden * keep.unsqueeze(2)).sum(1).numpy()  # relbert: the sum of the token vectors
    mean = minilm.encode(pairs)
    assert np.allclose(mean * counts[:, None], summed, rtol=1e-4, atol=1e-4)
    scaled = classification.scale_by_counts(lambda q: minilm.encode(q),
                                            lambda q: runner.pooled_token_counts(minilm, q))
    assert np.allclose(scaled(pairs), summed, rtol=1e-4, atol=1e-4)


def test_probe_and_features_are_reported_in_json_and_table(tmp_path):
    tasks = _runner_case(tmp_path)
    res = runner.evaluate_tasks(FakeEncoder(), tasks, probe=ProbeOptions(max_iter=5, probe="sklearn"))
    assert res["probe"] == {"implementation": "sklearn", "features": "mean", "protocol": "paper", "device": "cpu"}
    assert "sklearn probe on cpu (paper protocol)" in evaluation.markdown_table({"model": res})
    res = runner.evaluate_tasks(FakeEncoder(), tasks,
                                probe=ProbeOptions(max_iter=5))  # the torch probe: fast unless told
    assert res["probe"]["protocol"] == "fast" and res["classification"]["cls/test"]["protocol"] == "fast"
    table = evaluation.markdown_table({"model": res})
    assert "torch probe on cpu (fast protocol: grid cut by successive halving" in table
    with pytest.raises(ConfigError, match="features 'sum' need the encoder's tokenizer"):
        runner.evaluate_tasks(FakeEncoder(), tasks, probe=ProbeOptions(max_iter=5, features="sum"))


# --------------------------------------------------------------------------- the paper's sets by name


def _hub_copy(root, with_validation=True):
    """Small local copies of hub datasets, laid out as <root>/<owner>/<name>/<config>/<split>.jsonl."""
    from relbert_ds.data.sources import PAPER_ANALOGY, PAPER_CLASSIFICATION

    q = {"stem": ["a", "b"], "choice": [["c", "d"], ["a", "b"]], "answer": 1, "prefix": ""}
    for label in PAPER_ANALOGY:
        hub_id, config = label.split(":")
        for split in ("validation", "test"):
            _write_jsonl(root / hub_id / config / f"{split}.jsonl", [q, {**q, "stem": ["e", config]}])
    for label in PAPER_CLASSIFICATION:
        hub_id, config = label.split(":")
        splits = ("train", "validation", "test") if with_validation or config != "CogALexV" else ("train", "test")
        for split in splits:
            _write_jsonl(root / hub_id / config / f"{split}.jsonl",
                         [{"head": f"{config}{split}{i}", "tail": f"t{i}", "relation": "ab"[i % 2]} for i in range(8)])


def test_paper_sets_by_name_and_hub_id_from_a_data_dir(tmp_path, monkeypatch):
    root = tmp_path / "hub"
    _hub_copy(root, with_validation=False)
    tasks = evaluation.prepare_tasks(analogy=["scan", "relbert/analogy_questions:t_rex_relational_similarity"],
                                 classification=["CogALexV", "relbert/lexical_relation_classification:ROOT09"],
                                 data_dir=root)
    assert [d.name for d in tasks.analogy] == ["scan", "relbert/analogy_questions:t_rex_relational_similarity"]
    assert tasks.analogy[0].source == str(root.resolve() / "relbert/analogy_questions/scan/test.jsonl")
    assert [d.name for d, _ in tasks.classification] == ["CogALexV", "relbert/lexical_relation_classification:ROOT09"]
    # The environment variable does the same as the argument.
    monkeypatch.setenv("RELBERT_DS_DATA", str(root))
    assert evaluation.prepare_tasks(analogy="none",
                                    classification=["cogalex-v"]).classification[0][0].name == "CogALexV"
    # CogALex-V has no validation split: the default grid point, and the table says so.
    res = runner.evaluate_tasks(FakeEncoder(), tasks, probe=ProbeOptions(max_iter=5))
    cogalex = res["classification"]["CogALexV/test"]
    assert cogalex["selected_on"] is None and cogalex["default_reason"] == "no validation split"
    assert res["classification"]["relbert/lexical_relation_classification:ROOT09/test"]["selected_on"] == "validation"
    table = evaluation.markdown_table({"model": res})
    assert "| classification | CogALexV | test | f1_macro | 8 |" in table
    assert "(default grid point: no validation split)" in table


def test_preset_paper_selects_every_set(tmp_path):
    from relbert_ds.cli import evaluate as cli
    from relbert_ds.data.sources import PAPER_ANALOGY, PAPER_CLASSIFICATION

    assert len(PAPER_ANALOGY) == 9 and len(PAPER_CLASSIFICATION) == 5
    _hub_copy(tmp_path / "hub")
    args = cli.parse_args(["--model", "m", "--preset", "paper", "--data_dir", str(tmp_path / "hub")])
    assert args.preset == "paper" and args.probe == "torch" and args.probe_features == "mean"
    tasks = evaluation.prepare_tasks(analogy=PAPER_ANALOGY, classification=PAPER_CLASSIFICATION,
                                 data_dir=tmp_path / "hub")
    assert len(tasks.analogy) == 9 and len(tasks.classification) == 5
    assert {d.name.split(":")[1] for d in tasks.analogy} >= {"sat", "scan", "nell_relational_similarity"}


def test_named_hub_set_missing_offline_is_one_line_naming_the_layout(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'relbert/analogy_questions' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.delenv("RELBERT_DS_DATA", raising=False)
    with pytest.raises(DataError) as exc:
        evaluation.prepare_tasks(analogy=["scan"], classification="none", data_dir=tmp_path)
    message = str(exc.value)
    assert "\n" not in message and "OfflineModeIsEnabled" in message
    assert f"{tmp_path}/relbert/analogy_questions/scan/<split>.jsonl" in message
    with pytest.raises(DataError, match=r"\$RELBERT_DS_DATA/relbert/lexical_relation_classification/EVALution"):
        evaluation.prepare_tasks(analogy="none", classification=["EVALution"])


@pytest.mark.parametrize("extra, protocol", [([], "paper"), (["--probe_protocol", "fast"], "fast")])
def test_preset_paper_runs_the_paper_probe_protocol_unless_told(tiny_bert, tmp_path, extra, protocol):
    import subprocess
    import sys

    _hub_copy(tmp_path / "hub")
    out = tmp_path / "r.json"
    done = subprocess.run([sys.executable, "launchers/evaluate.py", "--model", tiny_bert, "--preset", "paper",
                           "--data_dir", str(tmp_path / "hub"), "--max_iter", "3", "--output", str(out), *extra],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["options"]["probe_protocol"] == protocol
    results = doc["models"]["model"]["classification"]
    assert len(results) == 5 and {r["protocol"] for r in results.values()} == {protocol}


# --------------------------------------------------------------------------- encoding first, jobs alongside


class BatchSensitiveEncoder(FakeEncoder):
    """A vector that depends on the batch the pair is encoded in (as real padding does, to rounding): the
    pair's hash vector plus the batch's size, so a change of batch partners shows."""

    def embed(self, pairs):
        return super().embed(pairs) + len(pairs)


def _pairs_first_rest():
    words = ["cat", "dog", "electroencephalography", "ox", "tree", "ant", "sun", "moon", "ab"]
    pairs = [(a, b) for a in words for b in words if a != b]
    return pairs + pairs[:5], pairs[::3]  # the list (duplicates kept), and the pairs to encode first


def test_encode_table_encodes_first_pairs_in_batches_of_their_own_and_runs_jobs_alongside():
    pairs, first = _pairs_first_rest()
    enc = BatchSensitiveEncoder()
    calls = []

    def make_jobs(lookup):
        calls.append(lookup)
        return [lambda: {"first_vector": lookup([first[0]])[0].tolist()}, lambda: time.sleep(0.3) or "second"]

    start = time.perf_counter()
    encoded = runner.encode_table(enc, pairs, encoding=EncodingOptions(batch_size=5), first=first, make_jobs=make_jobs)
    wall = time.perf_counter() - start
    # The first pairs' batches hold first pairs only; the rest's, the others only; each batch of 5 or fewer.
    in_first = set(first)
    batches = [set(c) for c in enc.calls]
    assert all(b <= in_first or not (b & in_first) for b in batches)
    assert sum(len(b) for b in batches) == len(set(pairs))
    # The table equals encoding the two groups on their own, in input order.
    want = {}
    for group in (first, [p for p in dict.fromkeys(pairs) if p not in in_first]):
        want.update(zip(group, encode_sharded(BatchSensitiveEncoder(), group, batch_size=5)))
    assert np.array_equal(encoded.table, np.stack([want[p] for p in pairs]))
    # The jobs got the first pairs' vectors (before the rest was encoded) and their results came back.
    assert len(calls) == 1
    assert encoded.job_results == {0: {"first_vector": want[first[0]].tolist()}, 1: "second"}
    shares = encoded.timing["shared_queue"]
    assert len(shares) == 1 and shares[0]["jobs"] == 2 and shares[0]["batches"] == math.ceil(
        (len(set(pairs)) - len(first)) / 5)
    assert encoded.timing["first_pairs"] == len(first)
    # The encoding's own time leaves the jobs' out (one rank here: the wall minus the jobs).
    assert 0 < encoded.timing["encoding_alone_s"] <= wall - shares[0]["jobs_s"] + 1e-3
    assert shares[0]["jobs_s"] >= 0.3


def test_encode_table_under_lockstep_forwards_runs_no_jobs_and_gives_the_same_table():
    pairs, first = _pairs_first_rest()
    free = runner.encode_table(BatchSensitiveEncoder(), pairs, encoding=EncodingOptions(batch_size=5), first=first,
                               make_jobs=lambda lookup: [lambda: 1])
    zero3 = BatchSensitiveEncoder()
    zero3.weight = torch.nn.Parameter(torch.zeros(1))
    zero3.weight.ds_id = 0  # what a ZeRO-3 partitioned parameter carries
    assert sharding.forwards_are_collective(zero3) and not sharding.forwards_are_collective(BatchSensitiveEncoder())
    lockstep = runner.encode_table(zero3, pairs, encoding=EncodingOptions(batch_size=5), first=first,
                                   make_jobs=lambda lookup: [lambda: 1])
    assert lockstep.job_results is None and "shared_queue" not in lockstep.timing
    assert free.job_results == {0: 1}
    assert np.array_equal(free.table, lockstep.table)

"""The benchmarks' pure parts, in one process: helpers, the public scheme's batches and loss,
negatives counted from the loss masks, the memory estimates against DeepSpeed's estimators.
No timing is asserted anywhere."""
import json
import math

import pytest
import torch

from benchmarks import common


def test_summary_ratio_and_table(tmp_path):
    s = common.summary([3.0, 1.0, 2.0, float("nan")])
    assert s == {"n": 3, "median": 2.0, "min": 1.0, "max": 3.0, "mean": 2.0}
    r = common.ratio_summary([2.0, 3.0], [1.0, 2.0])
    assert r["median"] == pytest.approx(1.75) and r["min"] == 1.5 and r["max"] == 2.0
    table = common.markdown_table(["a", "b"], [[1.23456, None], ["x", float("nan")]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1.23 | n/a |", "| x | n/a |"]
    path = common.write_json(tmp_path / "r.json", {"x": float("inf"), "y": [1, float("nan")]})
    doc = json.loads(path.read_text())
    assert doc["x"] is None and doc["y"] == [1, None] and len(doc["loadavg_end"]) == 3


def test_header_records_machine_and_load():
    head = common.header("memory", ["--no_measure"])
    assert head["command"] == "python benchmarks/memory.py --no_measure"
    assert head["machine"]["cpu_count"] >= 1 and head["machine"]["torch"]
    assert len(head["loadavg_start"]) == 3


class _Tok:
    """Enough of a tokenizer/encoder for PublicScheme without a model."""

    pad_token_id = 0
    max_length = 16

    def __init__(self):
        self.tokenizer = self

    def prompts(self, pairs):
        return [f"{h} {t}" for h, t in pairs]

    def __call__(self, texts, truncation, max_length, padding=None, return_token_type_ids=False):
        ids = [[1] + [2 + (hash(w) % 50) for w in t.split()] + [3] for t in texts]
        if padding == "max_length":
            ids = [x + [0] * (max_length - len(x)) for x in ids]
        return {"input_ids": ids, "attention_mask": [[int(i != 0) for i in x] for x in ids]}


def test_public_scheme_batches_follow_the_public_trainer():
    from benchmarks.public_scheme import PublicScheme
    from relbert_ds.data import load_relation_dataset

    data = load_relation_dataset("semeval2012", "train")
    scheme = PublicScheme(data, _Tok(), num_positive=10, num_negative=400, seed=0)
    assert scheme.steps_per_epoch == 79
    order = scheme.epoch_order()
    assert sorted(order) == sorted(g.relation_type for g in data.relations)
    group = next(g for g in data.relations if g.relation_type == order[0])
    pos, neg = scheme.step_pairs(order[0])
    assert len(pos) == min(10, len(group.positives)) == 8
    assert len(neg) == 400  # own negatives + other relations' positives, sampled down to 400
    own = {tuple(p) for p in group.negatives}
    others = {tuple(p) for g in data.relations if g.relation_type != order[0] for p in g.positives}
    assert set(neg) <= own | others
    tensors = scheme.tensors(pos)
    assert tensors["input_ids"].shape == (8, 16)  # padded to max_length, as the public code does


def test_public_nce_loss_equals_the_written_out_sum():
    from benchmarks.public_scheme import public_nce_loss

    g = torch.Generator().manual_seed(0)
    p, n = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(7, 6, generator=g, dtype=torch.float64)
    t = 0.05
    cos = lambda a, b: float(torch.dot(a, b) / (a.norm() * b.norm()))  # noqa: E731
    expected = 0.0
    for i in range(4):
        deno = sum(math.exp(cos(p[i], n[k]) / t) for k in range(7))
        for j in range(4):  # the diagonal i = j is part of the public loss
            e = math.exp(cos(p[i], p[j]) / t)
            expected += -math.log(e / (deno + e + 1e-5))
    assert float(public_nce_loss(p, n, t)) == pytest.approx(expected, rel=1e-9)


def test_negatives_per_sequence_counted_from_the_loss_masks():
    from benchmarks.train_throughput import count_ours
    from relbert_ds.data import load_relation_dataset
    from relbert_ds.sampler import RelationAwareSampler

    data = load_relation_dataset("semeval2012", "train")
    one = count_ours(RelationAwareSampler(data, world_size=1, rank=0, relations_per_rank=16), 0)
    two = count_ours(RelationAwareSampler(data, world_size=2, rank=0, relations_per_rank=8), 0, 2)
    # the global batch, not the rank count, decides the masks
    assert one["anchor_negative_pairs"] == two["anchor_negative_pairs"] and one["sequences"] == two["sequences"]
    assert one["steps"] == 5 and one["sequences_per_step"] == 256 and one["anchors"] == 5 * 128
    # each anchor: its relation's 8 negatives + the 15 other relations' 8 positives (duplicates masked)
    assert 120 <= one["negatives_per_anchor"] <= 128
    assert one["negatives_per_sequence"] == pytest.approx(one["anchor_negative_pairs"] / one["sequences"])


def test_memory_estimates_agree_with_deepspeed(tmp_path):
    from benchmarks import memory

    out = tmp_path / "memory.json"
    assert memory.main(["--no_measure", "--models", "roberta-large", "llama-7b (7B decoder)", "--gpus", "1", "8",
                        "--output", str(out)]) == 0
    doc = json.loads(out.read_text())
    params = {m["model"]: m["parameters"] for m in doc["models"]}
    assert 350e6 < params["roberta-large"] < 360e6 and 6.5e9 < params["llama-7b (7B decoder)"] < 6.8e9
    assert doc["formula_checks"] and all(c["agrees"] for c in doc["formula_checks"])
    row = next(r for r in doc["estimates"] if r["model"] == "llama-7b (7B decoder)" and r["gpus"] == 1)
    assert row["zero0"]["fits"] == "no" and row["zero3_offload"]["fits"] == "yes"
    assert row["zero0"]["gpu_gb"] == pytest.approx(20 * params["llama-7b (7B decoder)"] / 1e9)
    assert "| model |" in doc["table_markdown"] and doc["measured"] is None

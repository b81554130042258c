"""One validation path: the trainer's validation, RelationEncoder.encode and the evaluator share the
evaluator's batch plan and scoring, so their numbers agree bit for bit."""
from __future__ import annotations

import numpy as np
import pytest

from relbert_ds.data import load_analogy_dataset, load_relation_dataset
from relbert_ds.data.derived import relation_analogy_questions
from relbert_ds.evaluation import validation
from relbert_ds.evaluation.runner import EncodingOptions, evaluate
from relbert_ds.evaluation.sharding import encode_sharded


@pytest.fixture(scope="module")
def tiny(tiny_bert):
    import torch

    from relbert_ds import RelationEncoder

    torch.set_num_threads(1)
    return RelationEncoder.from_pretrained(tiny_bert)


def test_encode_and_sharded_encoding_are_bit_identical(tiny):
    # Many pairs of equal prompt length: relbert-ds 0.1's encode() ordered ties by position and
    # the sharded encoder by the pair, so the same pair met different batch mates and padding.
    pairs = [(f"w{i}", f"v{(7 * i) % 13}") for i in range(40)] + [("paris", "france"), ("cat", "animal")]
    pairs = pairs[::-1]
    for batch_size in (3, 8, 64):
        np.testing.assert_array_equal(tiny.encode(pairs, batch_size=batch_size),
                                      encode_sharded(tiny, pairs, batch_size=batch_size))


def test_trainer_validation_equals_the_evaluator(tiny):
    relations = load_relation_dataset("semeval2012", "validation")
    sets = validation.load_validation_sets(["semeval2012", "sat"], relations)
    assert [s.name for s in sets] == ["semeval2012", "sat"] and len(sets[0]) == 79
    got = validation.analogy_accuracies(tiny, sets, batch_size=16)
    # the evaluator on the same questions, computed independently of the validation module
    want = evaluate(tiny, encoding=EncodingOptions(batch_size=16), analogy=("sat",), classification=(), split="valid")
    assert got["sat"] == want["analogy"]["sat/validation"]["accuracy"]
    derived = relation_analogy_questions(relations)
    vectors = tiny.encode([p for q in derived.questions for p in (q.stem, *q.choices)])
    correct, offset = 0.0, 0
    for q in derived.questions:
        k = len(q.choices)
        stem, choices = vectors[offset], vectors[offset + 1:offset + 1 + k]
        cos = choices @ stem / (np.linalg.norm(choices, axis=1) * np.linalg.norm(stem))
        top = np.flatnonzero(cos == cos.max())
        correct += (q.answer in top) / len(top)
        offset += 1 + k
    assert got["semeval2012"] == pytest.approx(correct / 79, abs=1e-12)


def test_unknown_validation_split_is_one_error():
    from relbert_ds.errors import DataError

    with pytest.raises(DataError, match="needs the 'validation' split"):
        validation.load_validation_sets(["semeval2012"], None)
    assert load_analogy_dataset("sat", "valid").name == "sat"

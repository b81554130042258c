"""The inference API of RelationEncoder: one pair or many, similarity, analogy, device, untrained warning.

Every number is checked against an independent numpy computation from ``encode()``.
"""
import warnings

import numpy as np
import pytest
import torch

from relbert_ds import RelationEncoder
from relbert_ds.errors import ConfigError
from relbert_ds.model.encoder import RankedChoice, UntrainedModelWarning, resolve_device
from tests.assertions import assert_one_line

PAIRS = [("cat", "animal"), ("paris", "france"), ("oak", "tree"), ("hammer", "nail")]
OTHERS = [("tokyo", "japan"), ("dog", "mammal"), ("rome", "italy"), ("pen", "paper"), ("rose", "flower")]


def numpy_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of every row of ``a`` with every row of ``b``, written out element by element."""
    out = np.empty((len(a), len(b)))
    for i, u in enumerate(a.astype(np.float64)):
        for j, v in enumerate(b.astype(np.float64)):
            out[i, j] = float(np.dot(u, v)) / (np.sqrt(np.dot(u, u)) * np.sqrt(np.dot(v, v)))
    return out


@pytest.fixture(scope="module")
def trained_folder(tiny_bert, tmp_path_factory):
    """A model with a relbert_config, as the trainer exports it (save_pretrained)."""
    folder = tmp_path_factory.mktemp("trained")
    encoder = RelationEncoder.from_pretrained(tiny_bert, template="a", pooling="mask", warn_untrained=False)
    encoder.save_pretrained(folder)
    return str(folder)


def test_one_pair_is_a_vector_equal_to_its_row_in_a_batch(minilm):
    batch = minilm.encode(PAIRS)
    one = minilm.encode(("paris", "france"))
    assert one.shape == (minilm.hidden_size,) and one.dtype == np.float32
    assert np.allclose(one, batch[1], atol=1e-5)  # padding in the batch changes only the last bits
    assert np.array_equal(minilm.encode(["paris", "france"]), one)  # a list of two words is one pair too
    tensor = minilm.encode(("oak", "tree"), as_tensor=True)
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (minilm.hidden_size,)
    assert np.allclose(tensor.numpy(), batch[2], atol=1e-5)
    assert minilm.encode([("paris", "france")]).shape == (1, minilm.hidden_size)  # a list of one pair stays 2-D
    with pytest.raises(ConfigError, match="two non-empty strings"):
        minilm.encode(("paris", ""))


def test_similarity_equals_numpy_cosine_of_encode(minilm):
    va, vb = minilm.encode(PAIRS), minilm.encode(OTHERS)
    want = numpy_cosines(va, vb)
    got = minilm.similarity(PAIRS, OTHERS)
    assert isinstance(got, np.ndarray) and got.shape == (len(PAIRS), len(OTHERS))
    assert np.allclose(got, want, atol=1e-6)
    # One side a single pair: 1-D; both single: a float.
    row = minilm.similarity(PAIRS[1], OTHERS)
    assert row.shape == (len(OTHERS),) and np.allclose(row, want[1], atol=1e-6)
    column = minilm.similarity(PAIRS, OTHERS[2])
    assert column.shape == (len(PAIRS),) and np.allclose(column, want[:, 2], atol=1e-6)
    one = minilm.similarity(PAIRS[1], OTHERS[0])
    assert isinstance(one, float) and one == pytest.approx(want[1, 0], abs=1e-6)
    assert minilm.similarity(PAIRS[0], PAIRS[0]) == pytest.approx(1.0, abs=1e-6)
    # The values differ from pair to pair: the check above is not satisfied by a constant.
    assert want.max() - want.min() > 0.05


def test_analogy_ranks_choices_by_cosine(minilm):
    stem = ("paris", "france")
    choices = OTHERS + [("tokyo", "japan")]  # a repeated choice ties exactly with its first copy
    cos = numpy_cosines(minilm.encode([stem]), minilm.encode(choices))[0]
    ranked = minilm.analogy(stem, choices)
    assert all(isinstance(r, RankedChoice) for r in ranked) and len(ranked) == len(choices)
    assert [r.index for r in ranked] == [int(i) for i in np.argsort(-cos, kind="stable")]
    assert [r.pair for r in ranked] == [choices[r.index] for r in ranked]
    assert np.allclose([r.score for r in ranked], cos[[r.index for r in ranked]], atol=1e-6)
    assert all(x.score >= y.score for x, y in zip(ranked, ranked[1:]))
    tie = [r.index for r in ranked if r.pair == ("tokyo", "japan")]
    assert tie[0] == 0 and tie[1] == len(choices) - 1  # equal scores keep the input order
    with pytest.raises(ConfigError, match="no choices"):
        minilm.analogy(stem, [])
    with pytest.raises(ConfigError, match="stem"):
        minilm.analogy([stem, stem], choices)


def test_analogy_first_choice_is_the_evaluators_prediction(minilm):
    from relbert_ds.evaluation.analogy import answer_question

    stem, choices = ("word", "language"), [("paint", "portrait"), ("note", "music"), ("tale", "story"),
                                           ("week", "year")]
    vectors = minilm.encode([stem] + choices)
    assert minilm.analogy(stem, choices)[0].index == answer_question(vectors[0], vectors[1:], answer=0).prediction


def test_a_loaded_model_stays_in_eval_mode_after_encode(tiny_bert):
    """from_pretrained gives an eval-mode model (as transformers does), and encode() leaves it so: a forward
    after encode() is deterministic (it once switched the backbone's dropout on)."""
    model = RelationEncoder.from_pretrained(tiny_bert, warn_untrained=False)
    assert not model.training and not model.backbone.training
    model.encode(PAIRS)
    assert not model.training and not model.backbone.training
    batch = model.tokenize(PAIRS)
    with torch.no_grad():
        assert torch.equal(model(**batch), model(**batch))
    model.train()
    model.encode(PAIRS)
    assert model.training and model.backbone.training  # a caller's train mode is kept too


def test_device_auto_and_explicit(tiny_bert):
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert RelationEncoder.from_pretrained(tiny_bert, device="auto", warn_untrained=False).device.type == expected
    # Default: left on the CPU (what the trainer and the evaluator expect before placing it themselves).
    assert RelationEncoder.from_pretrained(tiny_bert, warn_untrained=False).device.type == "cpu"
    assert RelationEncoder.from_pretrained(tiny_bert, device=torch.device("cpu"),
                                           warn_untrained=False).device == torch.device("cpu")
    assert resolve_device(None) is None and resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="not a device"):
        resolve_device("gpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            RelationEncoder.from_pretrained(tiny_bert, device="cuda:1")
    else:
        count = torch.cuda.device_count()
        with pytest.raises(ConfigError, match=f"sees {count} CUDA"):
            resolve_device(f"cuda:{count}")


def _untrained_warnings(record):
    return [w for w in record if issubclass(w.category, UntrainedModelWarning)]


def test_untrained_backbone_warns_once_and_trained_model_does_not(bundled_model_path, trained_folder):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        RelationEncoder.from_pretrained(bundled_model_path)
    found = _untrained_warnings(record)
    assert len(found) == 1 and "no relbert_config" in str(found[0].message)
    assert found[0].filename == __file__  # points at the caller's line, not at relbert-ds

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        encoder = RelationEncoder.from_pretrained()  # no model named: the bundled backbone
    found = _untrained_warnings(record)
    assert len(found) == 1 and "no model named" in str(found[0].message)
    assert encoder.backbone.config.hidden_size == 384

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trained = RelationEncoder.from_pretrained(trained_folder)
        RelationEncoder.from_pretrained(bundled_model_path, warn_untrained=False)
    assert _untrained_warnings(record) == []
    assert trained.pooling == "mask"  # it really is the saved model, with its relbert_config


def test_equal_rows_get_bit_identical_cosines_wherever_they_sit():
    """The cosine scores each distinct row once: a repeated choice at any position ties exactly with its first
    copy (a BLAS matrix product may sum the same row differently at another position of the matrix)."""
    from relbert_ds.model.similarity import cosine

    rng = np.random.default_rng(0)
    for n_choices in (2, 5, 6, 9, 17, 33):
        for repeat_at in range(1, n_choices):
            choices = rng.standard_normal((n_choices, 384)).astype(np.float32)
            choices[repeat_at] = choices[0]
            stems = rng.standard_normal((3, 384)).astype(np.float32)
            scores = cosine(stems, choices)
            assert scores.shape == (3, n_choices)
            assert np.array_equal(scores[:, 0], scores[:, repeat_at])
            one = cosine(stems[1], choices)  # one stem: 1-D, the same scores up to rounding (another kernel)
            assert one.shape == (n_choices,) and one[0] == one[repeat_at] and np.allclose(one, scores[1], atol=1e-12)
            assert np.allclose(scores, numpy_cosines(stems, choices), atol=1e-12)
    assert np.array_equal(cosine(np.zeros(4), np.ones((2, 4))), np.zeros(2))  # zero vectors score 0


def test_a_model_with_nan_weights_is_an_error_not_a_silent_score(minilm):
    import copy

    from relbert_ds.errors import ModelError

    broken = copy.deepcopy(minilm)
    with torch.no_grad():
        next(broken.backbone.parameters()).fill_(float("nan"))
    broken.name = "diverged-model"
    with pytest.raises(ModelError) as err:
        broken.encode([("paris", "france"), ("dog", "puppy")])
    assert_one_line(err, "diverged-model gives non-finite relation vectors (nan or inf) for 2 of 2 pairs",
                    "use an earlier checkpoint")
    assert minilm.encode([("paris", "france")]).shape == (1, minilm.hidden_size)  # a sound model encodes

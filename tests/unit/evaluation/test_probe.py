"""The torch classification probe: sklearn's procedure, the batched grid, stopping, determinism, selection."""
from __future__ import annotations

import math
import os
import warnings

import numpy as np
import pytest
import torch

from relbert_ds.data.schemas import ClassificationDataset, LexicalPair
from relbert_ds.evaluation import classification, probe
from relbert_ds.evaluation.classification import ProbeOptions

GRID = [probe.GridPoint(c["hidden_layer_sizes"], c["learning_rate_init"]) for c in classification.search_grid()]


def blobs(n: int = 600, dim: int = 12, k: int = 4, noise: float = 1.6, seed: int = 0):
    """Overlapping Gaussian classes: learnable, but not perfectly (so F1 differences are visible)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1, (k, dim))
    y = rng.integers(0, k, n)
    return (centers[y] + rng.normal(0, noise, (n, dim))).astype(np.float32), y.astype(np.int64)


def macro_f1(y_true, y_pred) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y_true, y_pred, average="macro"))


def test_matches_sklearn_mlp_within_tolerance():
    """Same data, same hyper-parameters: test macro F1 and epochs run agree with MLPClassifier's."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    x, y = blobs(n=900)
    x_train, y_train, x_test, y_test = x[:600], y[:600], x[600:], y[600:]
    points = [probe.GridPoint(100, 1e-3), probe.GridPoint(200, 1e-3)]
    grid = probe.fit_grid(x_train, y_train, points, 4, max_iter=200, seed=0)
    ours = grid.predict(x_test)
    for i, point in enumerate(points):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            ref = MLPClassifier(hidden_layer_sizes=(point.hidden,), learning_rate_init=point.learning_rate,
                                random_state=0).fit(x_train, y_train)
        assert abs(macro_f1(y_test, ours[i]) - macro_f1(y_test, ref.predict(x_test))) < 0.05
        # Same stopping rule on the same loss: the number of epochs is of the same order.
        assert 0.5 < grid.n_iter[i] / ref.n_iter_ < 2.0
        assert grid.loss_curves[i][-1] == pytest.approx(ref.loss_, rel=0.5)


def test_one_step_matches_a_hand_computed_sklearn_update():
    """One full-batch epoch from given weights equals sklearn's formulas computed here in numpy (float64)."""
    x, y = blobs(n=50, dim=5, k=3)
    point = probe.GridPoint(7, 1e-2)
    w1, b1, w2, b2 = (t.double().numpy() for t in probe.initial_weights(0, point, 5, 3, seed=3))
    grid = probe.fit_grid(x, y, [point], 3, max_iter=1, seed=3, batch_size=200)  # 50 rows: one batch
    # Independent forward/backward (sklearn's _backprop) and Adam (sklearn's AdamOptimizer), t = 1.
    xd = x.astype(np.float64)
    z = xd @ w1 + b1
    a = np.maximum(z, 0)
    logits = a @ w2 + b2
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    onehot = np.eye(3)[y]
    n, alpha = len(x), 1e-4
    loss = -np.sum(onehot * np.log(p)) / n + 0.5 * alpha * (np.sum(w1 ** 2) + np.sum(w2 ** 2)) / n
    delta = (p - onehot) / n
    grads = [None] * 4
    grads[2] = a.T @ delta + alpha * w2 / n
    grads[3] = delta.sum(0)
    dz = (delta @ w2.T) * (z > 0)
    grads[0] = xd.T @ dz + alpha * w1 / n
    grads[1] = dz.sum(0)
    lr = 1e-2 * math.sqrt(1 - 0.999) / (1 - 0.9)
    expected = [w - lr * (0.1 * g) / (np.sqrt(0.001 * g * g) + 1e-8) for w, g in zip((w1, b1, w2, b2), grads)]
    for got, want in zip(grid.weights[0], expected):
        assert np.allclose(got.double().numpy(), want, atol=1e-5)
    assert grid.loss_curves[0][0] == pytest.approx(loss, rel=1e-5)


def test_batched_grid_equals_each_point_alone():
    x, y = blobs(n=400)
    together = probe.fit_grid(x, y, GRID, 4, max_iter=30, seed=5)
    for i, point in enumerate(GRID):
        # Alone, the point would start from index 0's weights: give it its own index's.
        alone = _fit_alone(x, y, i, point, max_iter=30, seed=5)
        assert alone.n_iter[0] == together.n_iter[i]
        # Packed with others, the GEMMs sum in another order: last-bit differences, not other models.
        assert np.mean(alone.predict(x)[0] == together.predict(x)[i]) >= 0.99
        for a, b in zip(alone.weights[0], together.weights[i]):
            assert torch.allclose(a, b, atol=1e-5), point


def _fit_alone(x, y, index, point, **kwargs):
    """fit_grid of one point with the initial weights it has at position ``index`` of the grid."""
    original = probe.initial_weights
    try:
        probe.initial_weights = lambda i, p, d, k, seed: original(index, p, d, k, seed)
        return probe.fit_grid(x, y, [point], 4, **kwargs)
    finally:
        probe.initial_weights = original


def test_each_point_stops_on_its_own_and_then_stays_frozen():
    x, y = blobs(n=1000, noise=0.3)  # easy: the fast points converge long before max_iter
    grid = probe.fit_grid(x, y, GRID, 4, max_iter=120, seed=0)
    fast, slow = grid.n_iter[0], grid.n_iter[8]  # lr 1e-3 / hidden 100 and lr 1e-5 / hidden 200
    assert fast < 120 and slow == 120
    for curve, n_iter in zip(grid.loss_curves, grid.n_iter):
        assert len(curve) == n_iter
    # sklearn's rule: stop after more than 10 epochs without an improvement of tol over the best loss.
    curve = grid.loss_curves[0]
    best, stale = math.inf, 0
    for loss in curve:
        stale = stale + 1 if loss > best - 1e-4 else 0
        best = min(best, loss)
    assert stale == 11
    # Its weights are those of its last epoch: continuing the others changed nothing in them.
    early = probe.fit_grid(x, y, GRID, 4, max_iter=fast, seed=0)
    for a, b in zip(early.weights[0], grid.weights[0]):
        assert torch.equal(a, b)


def test_deterministic_for_a_seed_and_different_across_seeds():
    x, y = blobs(n=300)
    one = probe.fit_grid(x, y, GRID[:3], 4, max_iter=15, seed=1)
    two = probe.fit_grid(x, y, GRID[:3], 4, max_iter=15, seed=1)
    other = probe.fit_grid(x, y, GRID[:3], 4, max_iter=15, seed=2)
    assert all(torch.equal(a, b) for wa, wb in zip(one.weights, two.weights) for a, b in zip(wa, wb))
    assert one.loss_curves == two.loss_curves
    assert not torch.equal(one.weights[0][0], other.weights[0][0])


def test_glorot_bounds_follow_sklearn():
    w, b = probe.glorot_uniform(torch.Generator().manual_seed(0), 300, 100)
    bound = math.sqrt(6 / 400)
    assert w.shape == (300, 100) and b.shape == (100,)
    assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound and b.abs().max() <= bound


def _dataset(with_validation: bool = True, seed: int = 0, k: int = 3):
    """Classification records whose (h, t) vectors are blobs; (t, h) vectors are noise."""
    x, y = blobs(n=360, dim=6, k=k, noise=1.0, seed=seed)
    rng = np.random.default_rng(seed + 1)
    labels = ["hyper", "mero", "random", "sibl", "syn"][:k]
    table, splits = {}, {}
    for split, rows in (("train", range(0, 240)), ("validation", range(240, 300)), ("test", range(300, 360))):
        records = []
        for i in rows:
            table[(f"h{i}", f"t{i}")] = x[i]
            table[(f"t{i}", f"h{i}")] = rng.normal(0, 1, 6).astype(np.float32)
            records.append(LexicalPair(f"h{i}", f"t{i}", labels[y[i]]))
        splits[split] = tuple(records)
    if not with_validation:
        del splits["validation"]
    return ClassificationDataset("blobs", splits, "mem"), lambda pairs: np.stack([table[tuple(p)] for p in pairs])


def test_torch_and_sklearn_probes_agree_on_a_synthetic_dataset():
    data, lookup = _dataset()
    torch_out = classification.run_classification(data, lookup, options=ProbeOptions(max_iter=100, probe="torch"))
    sklearn_out = classification.run_classification(data, lookup, options=ProbeOptions(max_iter=100, probe="sklearn"))
    assert torch_out["probe"] == "torch" and sklearn_out["probe"] == "sklearn"
    assert abs(torch_out["f1_macro"] - sklearn_out["f1_macro"]) < 0.06
    assert len(torch_out["grid"]) == 9 and torch_out["selected_on"] == "validation"


@pytest.mark.parametrize("protocol", ["paper", "fast"])
def test_selection_is_the_best_validation_macro_f1_and_reports_its_predictions(protocol):
    data, lookup = _dataset()
    out = classification.run_classification(data, lookup, options=ProbeOptions(max_iter=40, protocol=protocol),
                                            keep_predictions=True)
    assert out["protocol"] == protocol
    scores = [g["validation_f1_macro"] for g in out["grid"]]
    best = scores.index(max(scores))  # first among ties
    assert out["config"]["hidden_layer_sizes"] == out["grid"][best]["hidden_layer_sizes"]
    assert out["config"]["learning_rate_init"] == out["grid"][best]["learning_rate_init"]
    # Recompute independently: the same grid point's validation F1 and its test predictions.
    code = {label: i for i, label in enumerate(data.labels)}
    problem = classification._problem(data, lookup, "test", None)
    schedule = {} if protocol == "paper" else dict(validation=(problem.x_val, problem.y_val),
                                                   prune_at=classification.FAST_PRUNE_AT)
    grid = probe.fit_grid(problem.x_train, problem.y_train, GRID, 3, max_iter=40, seed=0, **schedule)
    assert [g["stopped_by"] for g in out["grid"]] == grid.stopped_by
    val = grid.predict(problem.x_val)
    assert [macro_f1(problem.y_val, v) for v in val] == pytest.approx(scores)
    predicted = [code[p["prediction"]] for p in out["predictions"]]
    assert predicted == grid.predict(problem.x_eval)[best].tolist()
    assert out["n_iter"] == grid.n_iter[best]


def test_without_validation_the_default_grid_point_is_used_and_said():
    data, lookup = _dataset(with_validation=False)
    out = classification.run_classification(data, lookup, options=ProbeOptions(max_iter=30))
    assert out["selected_on"] is None and out["default_reason"] == "no validation split"
    assert [(g["hidden_layer_sizes"], g["learning_rate_init"]) for g in out["grid"]] == [(100, 1e-3)]
    data, lookup = _dataset()
    out = classification.run_classification(data, lookup, options=ProbeOptions(max_iter=30), split="validation")
    assert out["default_reason"] == "the validation split is the one reported"


def test_datasets_are_dealt_to_ranks_by_cost():
    assert classification.owners([10, 40, 20], 2) == [1, 0, 1]
    assert classification.owners([5, 5], 3) == [0, 1]
    assert classification.owners([1, 2, 3], 1) == [0, 0, 0]


def test_unknown_probe_or_features_is_one_clear_error():
    from relbert_ds.errors import ConfigError

    data, lookup = _dataset()
    with pytest.raises(ConfigError, match="unknown probe 'keras'; fix: use one of torch, sklearn"):
        classification.run_classification(data, lookup, options=ProbeOptions(probe="keras"))
    with pytest.raises(ConfigError, match="unknown probe features"):
        classification.run_classification(data, lookup, options=ProbeOptions(features="max"))


def _without_time(out: dict) -> dict:
    return {k: v for k, v in out.items() if k != "time_s"}


def test_the_evaluators_torch_probe_trains_on_one_thread_whatever_the_rank_has(monkeypatch):
    """A rank's threads depend on how many ranks share the machine (1 rank on 2 cores gets 2); the probe's
    predictions must not, so it trains on TORCH_PROBE_THREADS (1) threads whatever the process is set to."""
    # One grid point and five classes (as BLESS and K&H+N): its (5 x 200) x (200 x 100) output-layer gradient is
    # what MKL splits differently on 2 threads (test below).
    data, lookup = _dataset(with_validation=False, k=5)
    seen = []
    fit_grid = probe.fit_grid

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return fit_grid(*args, **kwargs)

    monkeypatch.setattr(classification.probe_mod, "fit_grid", spy)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            options = ProbeOptions(max_iter=40, blas_threads=threads)
            outs.append(classification.run_classification(data, lookup, options=options, keep_predictions=True))
            assert torch.get_num_threads() == threads  # restored after the fit
    finally:
        torch.set_num_threads(before)
    assert seen == [classification.TORCH_PROBE_THREADS] * 2 == [1, 1]
    assert _without_time(outs[0]) == _without_time(outs[1])


def test_two_threads_change_the_probes_arithmetic_on_this_blas():
    """Why the probe is pinned to one thread: here (MKL), one point's training on 2 threads differs from 1."""
    if torch.__config__.parallel_info().count("OpenMP") == 0 or (os.cpu_count() or 1) < 2:
        pytest.skip("needs 2 cores and a threaded BLAS")
    x, y = blobs(n=400, dim=40, k=5)
    before = torch.get_num_threads()
    try:
        fits = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            fits.append(probe.fit_grid(x, y, [probe.GridPoint(100, 1e-3)], 5, max_iter=5, seed=0))
    finally:
        torch.set_num_threads(before)
    same = (all(torch.equal(p, q) for p, q in zip(fits[0].weights[0], fits[1].weights[0]))
            and fits[0].loss_curves == fits[1].loss_curves)
    if same:
        pytest.skip("this BLAS gives the same numbers on 1 and 2 threads: the pin costs nothing here")
    assert not same


def test_macro_f1_columns_equals_sklearn_over_present_labels():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 5, 200)
    pred = np.stack([rng.integers(0, 5, 200), np.where(rng.random(200) < 0.7, y, 0), np.full(200, 2)], axis=1)
    ours = probe.macro_f1_columns(torch.from_numpy(y), torch.from_numpy(pred), 6)  # label 5 never occurs
    for column, value in zip(pred.T, ours):
        want = classification.classification_metrics(y, column, [str(i) for i in range(6)])["f1_macro"]
        assert value == pytest.approx(want, abs=1e-12)


def test_classification_metrics_equal_sklearn_metrics():
    """numpy metrics (the torch probe needs no scikit-learn) against sklearn's own, labels present in
    either array, zero_division=0: a constant prediction, a label only predicted, one only true."""
    from sklearn.metrics import accuracy_score, f1_score

    rng = np.random.default_rng(5)
    y = rng.integers(0, 6, 300)
    cases = [rng.integers(0, 6, 300), np.where(rng.random(300) < 0.6, y, 1), np.full(300, 2),
             np.where(y == 4, 5, y), np.where(y == 0, 3, y)]
    for pred in cases:
        got = classification.classification_metrics(y, pred, [str(i) for i in range(7)])
        present = sorted(set(y.tolist()) | set(pred.tolist()))
        per_class = f1_score(y, pred, labels=present, average=None, zero_division=0)
        assert got["accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)
        for average in ("macro", "micro"):
            want = f1_score(y, pred, labels=present, average=average, zero_division=0)
            assert got[f"f1_{average}"] == pytest.approx(want, abs=1e-12)
        assert got["f1_per_class"] == pytest.approx({str(c): f for c, f in zip(present, per_class)}, abs=1e-12)


def _split(n_train: int = 600, n_val: int = 200):
    x, y = blobs(n=n_train + n_val)
    return x[:n_train], y[:n_train], (x[n_train:], y[n_train:])


def test_validation_curve_is_the_macro_f1_of_each_epochs_weights():
    x, y, val = _split()
    for epochs in (3, 7):
        grid = probe.fit_grid(x, y, GRID[:3], 4, max_iter=epochs, seed=0, validation=val, monitor={"train": (x, y)})
        for i in range(3):
            assert len(grid.validation_curves[i]) == len(grid.monitor_curves["train"][i]) == epochs
            # The last entry scores the weights the grid ends with (independent F1 on fresh predictions).
            assert grid.validation_curves[i][-1] == pytest.approx(macro_f1(val[1], grid.predict(val[0])[i]))
            assert grid.monitor_curves["train"][i][-1] == pytest.approx(macro_f1(y, grid.predict(x)[i]))


def test_pruning_keeps_the_best_third_and_the_kept_points_end_as_without_pruning():
    x, y, val = _split()
    grid = probe.fit_grid(x, y, GRID, 4, max_iter=40, seed=0, validation=val, prune_at=(3, 8))
    full = probe.fit_grid(x, y, GRID, 4, max_iter=40, seed=0, validation=val)
    ranking = sorted(range(9), key=lambda i: (-max(full.validation_curves[i][:3]), i))
    first_cut = [i for i in range(9) if grid.stopped_by[i] == "pruned" and grid.n_iter[i] == 3]
    assert sorted(first_cut) == sorted(ranking[3:])  # 9 -> 3 after epoch 3, by best F1 so far
    second = sorted(ranking[:3], key=lambda i: (-max(full.validation_curves[i][:8]), i))
    assert [grid.stopped_by[i] for i in second[1:]] == ["pruned", "pruned"]  # 3 -> 1 after epoch 8
    assert [grid.n_iter[i] for i in second[1:]] == [8, 8]
    winner = second[0]
    assert grid.stopped_by[winner] in ("loss", "max_iter")
    # The survivor trained exactly as in the full grid: same epochs, same weights, same curves.
    assert grid.n_iter[winner] == full.n_iter[winner]
    for a, b in zip(grid.weights[winner], full.weights[winner]):
        assert torch.allclose(a, b, atol=1e-6)
    assert grid.loss_curves[winner] == pytest.approx(full.loss_curves[winner], rel=1e-6)
    # Cut points keep the weights of the epoch they were cut at.
    early = probe.fit_grid(x, y, GRID, 4, max_iter=3, seed=0, validation=val)
    for i in first_cut:
        for a, b in zip(grid.weights[i], early.weights[i]):
            assert torch.allclose(a, b, atol=1e-6)


def test_pruning_needs_validation_data():
    x, y, _ = _split(100, 20)
    with pytest.raises(ValueError, match="prune_at needs validation"):
        probe.fit_grid(x, y, GRID[:1], 4, prune_at=(3,))


def test_unfused_adam_fallback_gives_the_fused_updates(monkeypatch):
    """torch._fused_adam_ is private: where it is missing the probe runs the same update unfused."""
    x, y = blobs(n=400, dim=20)
    assert probe.fused_adam_works(torch.device("cpu"))
    fused = probe.fit_grid(x, y, GRID, 4, max_iter=5, seed=0)
    monkeypatch.setitem(probe._FUSED_ADAM, "cpu", False)
    unfused = probe.fit_grid(x, y, GRID, 4, max_iter=5, seed=0)
    for a, b in zip(fused.weights, unfused.weights):
        for p, q in zip(a, b):
            assert torch.allclose(p, q, atol=1e-5)
    assert np.allclose(unfused.loss_curves, fused.loss_curves, rtol=1e-5)

"""Lexical relation classification: an MLP probe on frozen relation embeddings.

Feature of a pair (h, t): ``concat(emb(h, t), emb(t, h))``. Classifier: scikit-learn
``MLPClassifier`` (one hidden layer, adam, ``random_state`` fixed). As in RelBERT 2021, the
learning rate {1e-3, 1e-4, 1e-5} x hidden size {100, 150, 200} grid is searched and the
configuration with the best macro F1 on the ``validation`` split is reported on the evaluated
split (ties: the first in grid order, learning rate outer). Without a validation split, or
when the evaluated split *is* the validation split (selecting on it would leak), the default
configuration (1e-3, 100) is fitted alone.

The nine fits are independent, so they are sharded over ranks: rank ``r`` fits configurations
``r, r + W, ...`` and returns its validation scores and evaluated-split predictions; one
all-gather gives every rank all of them and every rank picks the same winner. Each fit runs
with BLAS limited to ``blas_threads`` (default 1) so that its arithmetic, hence its result, is
the same whatever the number of ranks; spare cores of a rank can run several fits at once
(``workers``), which changes nothing in the results.

Reported: accuracy, macro F1 and micro F1 (sklearn's definitions over the labels present in
gold or predictions; for single-label data micro F1 equals accuracy), per-class F1, the chosen
configuration and every configuration's validation macro F1.

Cost (measured on the 2-core development CPU, all-MiniLM-L6-v2 = 768 features, max_iter 200,
one fit per core, while other jobs kept the load at 4-7): the grid search on BLESS (18.6k
training pairs) took 330 s on 1 rank with the fits run one after the other and 388 s on 2
ranks; on K&H+N (40.3k training pairs) 935 s and 656 s. Fits with learning rate 1e-4 and 1e-5
run to ``max_iter`` (they do not converge within 200 epochs), so ``max_iter`` (sklearn's
default, exposed as ``--max_iter``) bounds the cost almost linearly. Encoding the pairs of
both datasets (both directions, about 138k prompts) costs more than the fits; see runner.
"""
from __future__ import annotations

import time
import warnings
from contextlib import nullcontext
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from relbert_ds.collectives import all_gather_no_grad, world_info
from relbert_ds.data.schemas import ClassificationDataset, LexicalPair, Pair

Lookup = Callable[[Sequence[Pair]], np.ndarray]

LEARNING_RATES = (1e-3, 1e-4, 1e-5)
HIDDEN_SIZES = (100, 150, 200)
DEFAULT_CONFIG = {"learning_rate_init": 1e-3, "hidden_layer_sizes": 100}
DEFAULT_MAX_ITER = 200


def search_grid() -> list[dict]:
    """The nine configurations, learning rate outer, hidden size inner (the tie-break order)."""
    return [{"learning_rate_init": lr, "hidden_layer_sizes": h} for lr in LEARNING_RATES for h in HIDDEN_SIZES]


def will_search(dataset: ClassificationDataset, split: str, search: Optional[bool] = None) -> bool:
    """Whether :func:`run_classification` runs the grid search for ``split`` (see module docstring)."""
    has_validation = "validation" in dataset.splits
    if search is None:
        return has_validation and split != "validation"
    return bool(search) and has_validation


def needed_splits(dataset: ClassificationDataset, split: str, search: Optional[bool] = None) -> list[str]:
    """The splits whose pairs the evaluation of ``split`` encodes."""
    out = ["train"] + (["validation"] if will_search(dataset, split, search) else []) + [split]
    return list(dict.fromkeys(out))


def classification_pairs(dataset: ClassificationDataset, splits: Optional[Sequence[str]] = None) -> list[Pair]:
    """Both directions of every pair of ``splits`` (default: all), duplicates kept."""
    out: list[Pair] = []
    for split in (splits if splits is not None else list(dataset.splits)):
        for p in dataset.splits[split]:
            out.append((p.head, p.tail))
            out.append((p.tail, p.head))
    return out


def pair_features(pairs: Sequence[LexicalPair], lookup: Lookup) -> np.ndarray:
    """(n, 2H) float32 features ``concat(emb(h, t), emb(t, h))``."""
    vectors = lookup([q for p in pairs for q in ((p.head, p.tail), (p.tail, p.head))])
    return np.ascontiguousarray(vectors.reshape(len(pairs), -1), dtype=np.float32)


def _blas_limit(threads: Optional[int]):
    if threads is None:
        return nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=threads)


def fit_predict(config: dict, x_train: np.ndarray, y_train: np.ndarray, x_eval: Sequence[np.ndarray],
                max_iter: int = DEFAULT_MAX_ITER, seed: int = 0,
                blas_threads: Optional[int] = 1) -> tuple[list[np.ndarray], int]:
    """Fit one MLP configuration and predict each array of ``x_eval``; returns (predictions, n_iter)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    model = MLPClassifier(hidden_layer_sizes=(int(config["hidden_layer_sizes"]),),
                          learning_rate_init=float(config["learning_rate_init"]), max_iter=max_iter,
                          random_state=seed)
    with _blas_limit(blas_threads), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x_train, y_train)
        preds = [model.predict(x) if len(x) else np.zeros(0, dtype=y_train.dtype) for x in x_eval]
    return preds, int(model.n_iter_)


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, labels: Sequence[str]) -> dict:
    """Accuracy, macro/micro F1 and per-class F1 of integer-coded predictions."""
    from sklearn.metrics import accuracy_score, f1_score

    present = sorted(set(y_true.tolist()) | set(y_pred.tolist()))
    per_class = f1_score(y_true, y_pred, labels=present, average=None, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "f1_macro": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "f1_micro": float(f1_score(y_true, y_pred, labels=present, average="micro", zero_division=0)),
        "f1_per_class": {labels[i]: float(f) for i, f in zip(present, per_class)},
    }


def run_classification(dataset: ClassificationDataset, lookup: Lookup, split: str = "test",
                       max_iter: int = DEFAULT_MAX_ITER, seed: int = 0, blas_threads: Optional[int] = 1,
                       search: Optional[bool] = None, keep_predictions: bool = False, workers: int = 1) -> dict:
    """Fit the probe on ``train`` and report it on ``split`` (a collective: every rank calls it).

    Args:
        dataset: needs ``train`` and ``split``; ``validation`` enables the grid search.
        lookup: pairs -> vectors (the shared table of :func:`encode_sharded`).
        split: the split reported (``test`` or ``validation``).
        search: force the grid search on or off; default: on iff a validation split exists and
            ``split`` is not it.
        workers: fit this rank's configurations in that many processes at once (joblib/loky);
            each fit stays single-threaded (``blas_threads``), so results do not change. The CLI
            uses its threads per rank; inside a training job keep 1.

    Returns a JSON-ready dict, identical on every rank.
    """
    start = time.perf_counter()
    labels = dataset.labels
    code = {label: i for i, label in enumerate(labels)}
    train = dataset.splits["train"]
    evaluated = dataset.splits[split]
    validation = dataset.splits.get("validation")
    search = will_search(dataset, split, search)
    configs = search_grid() if search else [dict(DEFAULT_CONFIG)]

    x_train = pair_features(train, lookup)
    y_train = np.array([code[p.relation] for p in train], dtype=np.int64)
    x_eval = pair_features(evaluated, lookup)
    y_eval = np.array([code[p.relation] for p in evaluated], dtype=np.int64)
    x_val = pair_features(validation, lookup) if search else np.zeros((0, x_train.shape[1]), np.float32)
    y_val = np.array([code[p.relation] for p in validation], dtype=np.int64) if search else np.zeros(0, np.int64)

    rank, world = world_info()
    mine = list(range(rank, len(configs), world))
    jobs = [(configs[i], x_train, y_train, [x_val, x_eval], max_iter, seed, blas_threads) for i in mine]
    if workers > 1 and len(jobs) > 1:
        from joblib import Parallel, delayed  # scikit-learn's own dependency

        fitted = Parallel(n_jobs=min(workers, len(jobs)), backend="loky")(delayed(fit_predict)(*j) for j in jobs)
    else:
        fitted = [fit_predict(*j) for j in jobs]
    rows = []
    for index, ((pred_val, pred_eval), n_iter) in zip(mine, fitted):
        val_f1 = classification_metrics(y_val, pred_val, labels)["f1_macro"] if search else float("nan")
        rows.append(np.concatenate([[index, val_f1, n_iter], pred_eval.astype(np.float64)]))
    width = 3 + len(evaluated)
    local = torch.from_numpy(np.stack(rows) if rows else np.zeros((0, width))).to(torch.float64)
    table = all_gather_no_grad(local).cpu().numpy()
    table = table[np.argsort(table[:, 0], kind="stable")]
    assert [int(i) for i in table[:, 0]] == list(range(len(configs))), "every configuration fitted once"

    best = 0
    if search:
        scores = table[:, 1]
        best = int(np.flatnonzero(scores == scores.max())[0])  # first in grid order among ties
    chosen = table[best, 3:].astype(np.int64)
    out = {
        "dataset": dataset.name,
        "split": split,
        "source": dataset.source,
        "n_train": len(train),
        "n_validation": len(validation) if validation is not None else 0,
        "n_eval": len(evaluated),
        "labels": labels,
        "selected_on": "validation" if search else None,
        "config": {**configs[best], "max_iter": max_iter, "random_state": seed},
        "n_iter": int(table[best, 2]),
        "grid": [{**c, "validation_f1_macro": (float(table[i, 1]) if search else None), "n_iter": int(table[i, 2])}
                 for i, c in enumerate(configs)],
    }
    out.update(classification_metrics(y_eval, chosen, labels))
    out["time_s"] = time.perf_counter() - start
    if keep_predictions:
        out["predictions"] = [{"index": i, "head": p.head, "tail": p.tail, "gold": p.relation,
                               "prediction": labels[int(c)]} for i, (p, c) in enumerate(zip(evaluated, chosen))]
    return out

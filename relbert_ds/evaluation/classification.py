"""Lexical relation classification: an MLP probe on frozen relation embeddings.

Feature of a pair (h, t): ``concat(emb(h, t), emb(t, h))``, with ``emb`` the pooled relation
vector (``features="mean"``, relbert-ds's pooling) or that vector times the number of pooled
tokens (``features="sum"``, the public relbert code's summed pooling; the caller scales the
lookup, see ``runner``). Classifier: a one-hidden-layer MLP with scikit-learn
``MLPClassifier``'s defaults. As in RelBERT 2021, the learning rate {1e-3, 1e-4, 1e-5} x hidden
size {100, 150, 200} grid is searched and the configuration with the best macro F1 on the
``validation`` split is reported on the evaluated split (ties: the first in grid order,
learning rate outer). Without a validation split, or when the evaluated split *is* the
validation split (selecting on it would leak), the default configuration (1e-3, 100) is fitted
alone and the result says so (``selected_on`` is None, ``default_reason`` why).

Two implementations of the same protocol (``probe``):

- ``"torch"`` (default): :mod:`relbert_ds.evaluation.probe` trains the nine grid points
  together as one batched model, on ``device`` (a GPU when the caller has one; on the CPU on
  one thread, ``TORCH_PROBE_THREADS``). Ranks split the *datasets* (each dataset is trained
  whole on one rank, so its arithmetic, hence its predictions, are the same for any number of
  ranks) and all-gather the finished results: here the costliest first to the least-loaded
  rank; the evaluator instead runs the same jobs (:func:`torch_probe_jobs`) from a queue the
  ranks share with part of the encoding (``runner``).
- ``"sklearn"`` (the reference): nine ``MLPClassifier`` fits, sharded over ranks by
  configuration (rank ``r`` fits ``r, r + W, ...``), each with BLAS limited to ``blas_threads``
  so that its result is the same whatever the number of ranks; ``workers`` runs several fits
  of a rank at once (joblib), which changes nothing in the results.

Reported: accuracy, macro F1 and micro F1 (sklearn's definitions over the labels present in
gold or predictions; for single-label data micro F1 equals accuracy), per-class F1, the chosen
configuration, every configuration's validation macro F1 and epochs, the probe and features.
Timings of both probes: docs/PROBE_AGREEMENT.md.
"""
from __future__ import annotations

import json
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from relbert_ds.data.schemas import ClassificationDataset, LexicalPair, Pair
from relbert_ds.errors import ConfigError
from relbert_ds.evaluation import probe as probe_mod
from relbert_ds.parallel.collectives import all_gather_no_grad, gather_sizes, world_info

Lookup = Callable[[Sequence[Pair]], np.ndarray]

LEARNING_RATES = (1e-3, 1e-4, 1e-5)
HIDDEN_SIZES = (100, 150, 200)
DEFAULT_CONFIG = {"learning_rate_init": 1e-3, "hidden_layer_sizes": 100}
DEFAULT_MAX_ITER = 200
PROBES = ("torch", "sklearn")
DEFAULT_PROBE = "torch"
FEATURES = ("mean", "sum")
DEFAULT_FEATURES = "mean"
PROTOCOLS = ("fast", "paper")
# The fast protocol: successive halving of the grid on validation macro F1, 9 points -> the best 3 after
# FAST_PRUNE_AT[0] epochs -> the best 1 after FAST_PRUNE_AT[1]; the points kept train on to the paper's
# stopping rule from the same start on the same batches (docs/PROBE_AGREEMENT.md measures both).
FAST_PRUNE_AT = (3, 10)
# CPU threads of the torch probe, whatever the rank has: its arithmetic depends on the thread count at
# real sizes (MKL splits a long dot product, or a thin product such as one point's (5 x 200) x (200 x 150)
# output-layer gradient, differently on 2 threads than on 1), so a rank's threads, which depend on how
# many ranks share the machine, would make the predictions depend on the number of ranks. Measured on
# the bundled BLESS (trained model): 1 rank with 2 threads picked the same point but stopped it after
# 159 epochs instead of 177 (test macro F1 88.45 vs 89.09).
TORCH_PROBE_THREADS = 1


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
    """Accuracy, macro/micro F1 and per-class F1 of integer-coded predictions: sklearn's definitions over
    the labels present in either array (``zero_division=0``), in numpy, so that the torch probe runs where
    scikit-learn is not installed (an offline GPU node); tests compare with ``sklearn.metrics``."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    present = sorted(set(y_true.tolist()) | set(y_pred.tolist()))
    tp = np.array([np.sum((y_true == c) & (y_pred == c)) for c in present], dtype=np.float64)
    fp = np.array([np.sum((y_true != c) & (y_pred == c)) for c in present], dtype=np.float64)
    fn = np.array([np.sum((y_true == c) & (y_pred != c)) for c in present], dtype=np.float64)
    # F1 = 2PR / (P + R) = 2tp / (2tp + fp + fn); 0 where a class has no true positive.
    per_class = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp), where=tp > 0)
    micro_denominator = 2 * tp.sum() + fp.sum() + fn.sum()
    return {
        "accuracy": float(np.mean(y_true == y_pred)),
        "f1_macro": float(per_class.mean()) if len(present) else 0.0,
        "f1_micro": float(2 * tp.sum() / micro_denominator) if micro_denominator else 0.0,
        "f1_per_class": {labels[i]: float(f) for i, f in zip(present, per_class)},
    }


def check_probe(probe: str, features: str = DEFAULT_FEATURES, protocol: Optional[str] = None) -> str:
    """The protocol to run: ``protocol``, or when None the probe's default (torch ``fast``, sklearn ``paper``,
    its only one). Refuses an unknown probe, feature or protocol name, or sklearn with the fast protocol (a
    ConfigError)."""
    if probe not in PROBES:
        raise ConfigError(f"unknown probe {probe!r}; fix: use one of {', '.join(PROBES)}")
    if features not in FEATURES:
        raise ConfigError(f"unknown probe features {features!r}; fix: use one of {', '.join(FEATURES)}")
    if protocol is not None and protocol not in PROTOCOLS:
        raise ConfigError(f"unknown probe protocol {protocol!r}; fix: use one of {', '.join(PROTOCOLS)}")
    if probe == "sklearn" and protocol == "fast":
        raise ConfigError("the sklearn probe runs the paper protocol only; fix: --probe torch for the fast protocol, "
                          "or --probe_protocol paper")
    return protocol or ("fast" if probe == "torch" else "paper")


@dataclass(frozen=True)
class ProbeOptions:
    """How the classification probe is fitted: one object from the command line to the fit.

    Checked on construction (an unknown probe, feature or protocol name, or sklearn with the fast
    protocol, is a ConfigError); ``protocol=None`` becomes the probe's default (torch ``fast``,
    sklearn ``paper``).

    - ``probe``: ``"torch"`` (batched grid, datasets split over ranks) or ``"sklearn"`` (reference);
    - ``features``: ``"mean"`` or ``"sum"`` (the vectors scaled by their pooled token counts, as
      relbert's summed pooling), recorded in the result (the lookup carries it);
    - ``protocol``: ``"paper"`` (every grid point trained to sklearn's training-loss stopping) or
      ``"fast"`` (torch only: the grid cut by successive halving on validation macro F1,
      ``FAST_PRUNE_AT``, the points kept trained as in ``"paper"``). Without a grid search both fit
      the default point alike;
    - ``max_iter``, ``seed``: the MLP's epochs cap and seed;
    - ``search``: force the grid search on or off; default: on iff a validation split exists and
      the evaluated split is not it;
    - ``device``: where the torch probe trains (default CPU);
    - ``blas_threads``: sklearn only: BLAS threads of one fit, fixed so that results do not depend on
      the number of ranks (the torch probe always trains on ``TORCH_PROBE_THREADS`` CPU threads);
    - ``workers``: sklearn only: fit that many configurations of a rank at once.
    """

    probe: str = DEFAULT_PROBE
    features: str = DEFAULT_FEATURES
    protocol: Optional[str] = None
    max_iter: int = DEFAULT_MAX_ITER
    seed: int = 0
    search: Optional[bool] = None
    device: Any = None
    blas_threads: Optional[int] = 1
    workers: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "protocol", check_probe(self.probe, self.features, self.protocol))

    def describe(self) -> dict:
        """What a result records of the probe."""
        return {"implementation": self.probe, "features": self.features, "protocol": self.protocol,
                "device": str(torch.device(self.device)) if self.device is not None else "cpu"}


@dataclass
class _Fit:
    """One fitted configuration: its predictions, epochs run and why it stopped.

    ``pred_eval`` is the evaluated split's predictions, or (torch) a function computing them: only the
    chosen configuration's are read, so the others' are never computed."""

    pred_val: np.ndarray
    pred_eval: Union[np.ndarray, Callable[[], np.ndarray]]
    n_iter: int
    stopped_by: str  # "loss", "max_iter" or "pruned"

    def eval_predictions(self) -> np.ndarray:
        return self.pred_eval() if callable(self.pred_eval) else self.pred_eval


def _sklearn_fit(pred_val: np.ndarray, pred_eval: np.ndarray, n_iter: int, max_iter: int) -> _Fit:
    return _Fit(pred_val, pred_eval, n_iter, "max_iter" if n_iter >= max_iter else "loss")


@dataclass
class _Problem:
    """One dataset's probe inputs: integer-coded features of train, validation and the evaluated split."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_eval: np.ndarray
    y_eval: np.ndarray
    configs: list[dict]
    search: bool


def _problem(dataset: ClassificationDataset, lookup: Lookup, split: str, search: Optional[bool]) -> _Problem:
    code = {label: i for i, label in enumerate(dataset.labels)}
    search = will_search(dataset, split, search)

    def coded(pairs: Sequence[LexicalPair]) -> tuple[np.ndarray, np.ndarray]:
        return pair_features(pairs, lookup), np.array([code[p.relation] for p in pairs], dtype=np.int64)

    x_train, y_train = coded(dataset.splits["train"])
    x_eval, y_eval = coded(dataset.splits[split])
    if search:
        x_val, y_val = coded(dataset.splits["validation"])
    else:
        x_val, y_val = np.zeros((0, x_train.shape[1]), np.float32), np.zeros(0, np.int64)
    return _Problem(x_train, y_train, x_val, y_val, x_eval, y_eval,
                    search_grid() if search else [dict(DEFAULT_CONFIG)], search)


def _fit_sklearn(problem: _Problem, indices: Sequence[int], max_iter: int, seed: int, blas_threads: Optional[int],
                 workers: int) -> list[_Fit]:
    """The fits of configurations ``indices``."""
    jobs = [(problem.configs[i], problem.x_train, problem.y_train, [problem.x_val, problem.x_eval], max_iter, seed,
             blas_threads) for i in indices]
    if workers > 1 and len(jobs) > 1:
        from joblib import Parallel, delayed  # scikit-learn's own dependency

        fitted = Parallel(n_jobs=min(workers, len(jobs)), backend="loky")(delayed(fit_predict)(*j) for j in jobs)
    else:
        fitted = [fit_predict(*j) for j in jobs]
    return [_sklearn_fit(pred_val, pred_eval, n_iter, max_iter) for (pred_val, pred_eval), n_iter in fitted]


def _thread_limit(threads: Optional[int], device: Any):
    """Torch's CPU threads pinned to ``threads`` while the probe trains (its arithmetic depends on them)."""
    if threads is None or torch.device(device or "cpu").type != "cpu":
        return nullcontext()

    class _Limit:
        def __enter__(self):
            self.before = torch.get_num_threads()
            torch.set_num_threads(threads)

        def __exit__(self, *exc):
            torch.set_num_threads(self.before)

    return _Limit()


def _fit_torch(problem: _Problem, max_iter: int, seed: int, device: Any, protocol: str) -> list[_Fit]:
    """Every configuration of ``problem`` trained together (:func:`probe.fit_grid`); with the fast protocol
    and a grid search, cut by successive halving on validation (``FAST_PRUNE_AT``). On the CPU on
    ``TORCH_PROBE_THREADS`` threads."""
    threads = TORCH_PROBE_THREADS
    points = [probe_mod.GridPoint(int(c["hidden_layer_sizes"]), float(c["learning_rate_init"]))
              for c in problem.configs]
    n_classes = int(max(problem.y_train.max(initial=0), problem.y_eval.max(initial=0),
                        problem.y_val.max(initial=0))) + 1
    with _thread_limit(threads, device):
        schedule = {}
        if protocol == "fast" and problem.search:
            schedule = dict(validation=(problem.x_val, problem.y_val), prune_at=FAST_PRUNE_AT)
        grid = probe_mod.fit_grid(problem.x_train, problem.y_train, points, n_classes, max_iter=max_iter, seed=seed,
                                  device=device, **schedule)
        pred_val = grid.predict(problem.x_val)

    def eval_of(i: int) -> Callable[[], np.ndarray]:
        def predict() -> np.ndarray:
            with _thread_limit(threads, device):
                return grid.predict(problem.x_eval, points=[i])[0]
        return predict

    return [_Fit(pred_val[i], eval_of(i), grid.n_iter[i], grid.stopped_by[i]) for i in range(len(points))]


def _report(dataset: ClassificationDataset, split: str, problem: _Problem,
            fitted: Sequence[_Fit], options: ProbeOptions, keep_predictions: bool) -> dict:
    """The result dict from every configuration's predictions (selection on validation macro F1)."""
    labels = dataset.labels
    scores = [classification_metrics(problem.y_val, f.pred_val, labels)["f1_macro"] if problem.search else float("nan")
              for f in fitted]
    best = int(np.flatnonzero(np.array(scores) == max(scores))[0]) if problem.search else 0  # first among ties
    chosen = np.asarray(fitted[best].eval_predictions(), dtype=np.int64)
    validation = dataset.splits.get("validation")
    default_reason = None
    if not problem.search:
        default_reason = "no validation split" if validation is None else "the validation split is the one reported"
    evaluated = dataset.splits[split]
    out = {
        "dataset": dataset.name,
        "split": split,
        "source": dataset.source,
        "n_train": len(dataset.splits["train"]),
        "n_validation": len(validation) if validation is not None else 0,
        "n_eval": len(evaluated),
        "labels": labels,
        "probe": options.probe,
        "features": options.features,
        "protocol": options.protocol,
        "selected_on": "validation" if problem.search else None,
        "default_reason": default_reason,
        "config": {**problem.configs[best], "max_iter": options.max_iter, "random_state": options.seed},
        "n_iter": int(fitted[best].n_iter),
        "grid": [{**c, "validation_f1_macro": (float(scores[i]) if problem.search else None),
                  "n_iter": int(fitted[i].n_iter), "stopped_by": fitted[i].stopped_by}
                 for i, c in enumerate(problem.configs)],
    }
    out.update(classification_metrics(problem.y_eval, chosen, labels))
    if keep_predictions:
        out["predictions"] = [{"index": i, "head": p.head, "tail": p.tail, "gold": p.relation,
                               "prediction": labels[int(c)]} for i, (p, c) in enumerate(zip(evaluated, chosen))]
    return out


def _gather_sklearn(problem: _Problem, max_iter: int, seed: int, blas_threads: Optional[int],
                    workers: int) -> list[_Fit]:
    """The sklearn grid sharded by configuration over ranks; every rank gets every configuration's results."""
    rank, world = world_info()
    mine = list(range(rank, len(problem.configs), world))
    rows = [np.concatenate([[index, fit.n_iter], fit.pred_val, fit.pred_eval]).astype(np.float64)
            for index, fit in zip(mine, _fit_sklearn(problem, mine, max_iter, seed, blas_threads, workers))]
    width = 2 + len(problem.y_val) + len(problem.y_eval)
    local = torch.from_numpy(np.stack(rows) if rows else np.zeros((0, width))).to(torch.float64)
    table = all_gather_no_grad(local).cpu().numpy()
    table = table[np.argsort(table[:, 0], kind="stable")]
    assert [int(i) for i in table[:, 0]] == list(range(len(problem.configs))), "every configuration fitted once"
    n_val = len(problem.y_val)
    return [_sklearn_fit(r[2:2 + n_val].astype(np.int64), r[2 + n_val:].astype(np.int64), int(r[1]), max_iter)
            for r in table]


def costliest_first(costs: Sequence[float]) -> list[int]:
    """Indices of ``costs``, the largest first (ties: lower index first)."""
    return sorted(range(len(costs)), key=lambda i: (-costs[i], i))


def owners(costs: Sequence[float], world: int) -> list[int]:
    """Rank of each item: largest cost first to the least-loaded rank (ties: lowest rank); deterministic."""
    load = [0.0] * world
    out = [0] * len(costs)
    for i in costliest_first(costs):
        r = min(range(world), key=lambda r: (load[r], r))
        out[i] = r
        load[r] += costs[i]
    return out


def _all_gather_json(items: dict[int, dict]) -> dict[int, dict]:
    """Union of every rank's ``{index: result}`` (JSON-encoded bytes over one all-gather)."""
    _, world = world_info()
    if world == 1:
        return items
    payload = json.dumps({str(k): v for k, v in items.items()}).encode("utf-8")
    local = torch.tensor(list(payload), dtype=torch.uint8)
    sizes = gather_sizes(len(payload))
    gathered = bytes(all_gather_no_grad(local, sizes).cpu().tolist())
    out: dict[int, dict] = {}
    offset = 0
    for size in sizes:
        out.update({int(k): v for k, v in json.loads(gathered[offset:offset + size].decode("utf-8")).items()})
        offset += size
    return out


def run_classifications(items: Sequence[tuple[ClassificationDataset, str]], lookup: Lookup,
                        options: ProbeOptions = ProbeOptions(), keep_predictions: bool = False) -> list[dict]:
    """Fit the probe of every ``(dataset, split)`` and report it (a collective: every rank calls it).

    ``items``: each dataset needs ``train`` and its split; ``validation`` enables the grid search.
    ``lookup``: pairs -> vectors (the shared table of :func:`encode_sharded`; for ``features="sum"``
    already scaled by the pooled token counts). Returns one JSON-ready dict per item, identical on
    every rank.
    """
    if options.probe == "sklearn":
        out = []
        for dataset, split in items:
            start = time.perf_counter()
            problem = _problem(dataset, lookup, split, options.search)
            fitted = _gather_sklearn(problem, options.max_iter, options.seed, options.blas_threads, options.workers)
            result = _report(dataset, split, problem, fitted, options, keep_predictions)
            out.append({**result, "time_s": time.perf_counter() - start})
        return out
    jobs = torch_probe_jobs(items, lookup, options, keep_predictions)
    rank, world = world_info()
    mine = {index: jobs[index]() for index, owner in enumerate(owners(probe_costs(items, options.search), world))
            if owner == rank}
    return gather_probe_reports(mine, len(items))


def probe_costs(items: Sequence[tuple[ClassificationDataset, str]], search: Optional[bool] = None) -> list[int]:
    """A relative cost of each item's torch probe, to put the longest first: training rows x grid points."""
    return [len(d.splits["train"]) * (9 if will_search(d, s, search) else 1) for d, s in items]


def torch_probe_jobs(items: Sequence[tuple[ClassificationDataset, str]], lookup: Lookup,
                     options: ProbeOptions = ProbeOptions(),
                     keep_predictions: bool = False) -> list[Callable[[], dict]]:
    """One job per item: fit the torch probe of that ``(dataset, split)`` and return its report (with
    ``time_s`` and ``device``). A job runs on any one rank and gives the same report on every rank (its
    arithmetic is fixed: ``TORCH_PROBE_THREADS`` CPU threads, or the device). Collect the reports with
    :func:`gather_probe_reports`. Arguments as :func:`run_classifications`."""
    if options.probe != "torch":
        raise ValueError(f"torch_probe_jobs needs probe='torch', got {options.probe!r}")

    def job(dataset: ClassificationDataset, split: str) -> dict:
        start = time.perf_counter()
        problem = _problem(dataset, lookup, split, options.search)
        fitted = _fit_torch(problem, options.max_iter, options.seed, options.device, options.protocol)
        result = _report(dataset, split, problem, fitted, options, keep_predictions)
        return {**result, "time_s": time.perf_counter() - start, "device": str(torch.device(options.device or "cpu"))}

    return [lambda dataset=dataset, split=split: job(dataset, split) for dataset, split in items]


def gather_probe_reports(mine: dict[int, dict], n_items: int) -> list[dict]:
    """Every rank's ``{item index: report}`` joined (a collective): the ``n_items`` reports in item order."""
    results = _all_gather_json(mine)
    missing = sorted(set(range(n_items)) - set(results))
    assert not missing, f"probe reports of items {missing} were computed by no rank"
    return [results[i] for i in range(n_items)]


def run_classification(dataset: ClassificationDataset, lookup: Lookup, split: str = "test",
                       options: ProbeOptions = ProbeOptions(), keep_predictions: bool = False) -> dict:
    """Fit the probe on ``train`` and report it on ``split``: :func:`run_classifications` of one dataset."""
    return run_classifications([(dataset, split)], lookup, options, keep_predictions)[0]


def scale_by_counts(lookup: Lookup, counts: Callable[[Sequence[Pair]], np.ndarray]) -> Lookup:
    """A lookup whose vectors are multiplied by their prompts' pooled token counts (relbert's summed pooling)."""
    def scaled(pairs: Sequence[Pair]) -> np.ndarray:
        return lookup(pairs) * counts(pairs)[:, None].astype(np.float32)

    return scaled

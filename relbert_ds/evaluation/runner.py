"""The evaluation flow: benchmark files -> unique pairs -> one sharded encode -> metrics -> outputs.

Used by ``launchers/evaluate.py`` and by the trainer's validation
(:mod:`relbert_ds.evaluation.validation`) alike::

    from relbert_ds import RelationEncoder
    from relbert_ds.evaluation import evaluate
    encoder = RelationEncoder.from_pretrained("runs/default/best_model")   # or trainer.encoder in a job
    result = evaluate(encoder, analogy=("sat",), classification=(), split="valid")

Contract:
- ``evaluate`` is a collective: every rank calls it with the same arguments (inside a live
  DeepSpeed job, with the engine's encoder module; under ZeRO-3 the lockstep forwards of
  :func:`encode_sharded` are what keeps the parameter gathers matched).
- Data are loaded and validated on every rank *before* anything is encoded; a problem on any
  rank is raised on every rank as the same :class:`UserError` (the lowest failing rank's
  message), so no rank waits for a peer that already gave up.
- The pairs of all datasets are collected first and encoded once (``encode_sharded``); every
  rank gets the full vector table and computes the same metrics. With classification sets,
  their pairs are encoded first, on their own; then the torch probes (one dataset each, longest
  first) and the batches of the remaining pairs go into one queue that the ranks share
  (``encode_sharing_ranks``): a rank busy with a long probe encodes less, so the probes cost
  about their CPU time shared by the ranks instead of the longest probe's time. The batches are
  fixed by the pair lists, not by the ranks, so the vectors are the same for any number of
  ranks. Under ZeRO-3 (lockstep forwards) the rest is encoded in lockstep and the probes run
  after it; the sklearn probe shards its grid over ranks after the encoding. The returned dict
  is therefore the same on every rank (except the ``timing`` numbers): every rank can take the same
  decision (best epoch, early stop) without a broadcast. Files, the markdown table and
  TensorBoard are written by the caller on rank 0 (:func:`write_outputs` does that).

Measured costs: docs/PERFORMANCE.md and docs/EVALUATION.md.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from relbert_ds.data.schemas import Pair
from relbert_ds.errors import ConfigError
from relbert_ds.evaluation import analogy as analogy_mod
from relbert_ds.evaluation import classification as classification_mod
from relbert_ds.evaluation import mapping as mapping_mod
from relbert_ds.evaluation.classification import ProbeOptions
from relbert_ds.evaluation.report import flat_metrics
from relbert_ds.evaluation.sharding import encode_sharded, encode_sharing_ranks, forwards_are_collective
from relbert_ds.evaluation.tasks import Spec, TaskSet, classification_pairs, prepare_tasks, probe_order
from relbert_ds.model.batching import PairRows
from relbert_ds.parallel.collectives import all_gather_no_grad, world_info
from relbert_ds.parallel.work_queue import shared_queue_available


@dataclass(frozen=True)
class EncodingOptions:
    """How the vector table is encoded: ``batch_size`` prompts per forward, a progress bar, and a
    folder that caches tables (:mod:`relbert_ds.evaluation.cache`; None: no cache)."""

    batch_size: int = 64
    show_progress: bool = False
    cache_dir: Optional[Union[str, Path]] = None


def model_identity(encoder: Any) -> dict:
    """What identifies the evaluated model in the results."""
    ident = {"name": getattr(encoder, "name", type(encoder).__name__)}
    for key in ("template", "pooling", "max_length", "hidden_size"):
        value = getattr(encoder, key, None)
        if value is not None:
            ident[key] = value
    return ident


def pooled_token_counts(encoder: Any, pairs: Sequence[Pair], chunk: int = 1024) -> np.ndarray:
    """(N,) float32: how many tokens the encoder's pooling averages for each pair's prompt.

    The same tokenization as ``RelationEncoder.tokenize`` (truncation at ``max_length``) and the
    same selection as ``pooling.token_weights``; at least 1, as ``pooling.pool`` divides by it.
    Multiplying a pooled vector by it gives the public relbert code's summed pooling.
    """
    from relbert_ds.model.pooling import token_weights

    if not hasattr(encoder, "tokenizer") or not hasattr(encoder, "prompts"):
        raise ConfigError("probe features 'sum' need the encoder's tokenizer to count pooled tokens; fix: evaluate "
                          "a RelationEncoder, or use the features 'mean'")
    out = np.zeros(len(pairs), dtype=np.float32)
    for start in range(0, len(pairs), chunk):
        part = list(pairs[start:start + chunk])
        batch = encoder.tokenizer(encoder.prompts(part), truncation=True, max_length=encoder.max_length,
                                  padding=True, return_tensors="pt", return_token_type_ids=False)
        weights = token_weights(batch["input_ids"], batch["attention_mask"], encoder.pooling, encoder.mask_token_id)
        out[start:start + len(part)] = weights.sum(dim=1).clamp_min(1.0).numpy()
    return out


def _all_ranks_true(flag: bool) -> bool:
    """True on every rank iff ``flag`` is true on every rank (one tiny all-gather)."""
    _, world = world_info()
    if world == 1:
        return flag
    return bool(all_gather_no_grad(torch.tensor([int(flag)], dtype=torch.int64)).min().item())


Lookup = Callable[[Sequence[Pair]], np.ndarray]


def table_lookup(pairs: Sequence[Pair], table: np.ndarray) -> Lookup:
    """query pairs -> their rows of ``table`` (row ``i`` is ``pairs[i]``'s vector)."""
    return functools.partial(PairRows(pairs).take, table)


@dataclass
class EncodedTable:
    """:func:`encode_table`'s result: the table, what the cache did, how the time went, and the results of
    the jobs run while encoding (None when they were not run)."""

    table: np.ndarray
    info: dict
    timing: dict
    job_results: Optional[dict[int, Any]] = None


def encode_table(encoder: Any, pairs: Sequence[Pair], encoding: EncodingOptions = EncodingOptions(),
                 first: Sequence[Pair] = (),
                 make_jobs: Optional[Callable[[Lookup], Sequence[Callable[[], Any]]]] = None) -> EncodedTable:
    """The (N, H) vector table of ``pairs`` (a collective), read from ``cache_dir`` when it holds it.

    Every rank reads the cache; unless every rank found the table, all of them encode and rank 0 writes
    it. ``first`` (a subset of ``pairs``) is encoded on its own before the other pairs, so work that only
    needs its vectors can start early: ``make_jobs(lookup of first)`` gives jobs that the ranks run while
    they encode the rest (:func:`encode_sharing_ranks`, when the forwards need no lockstep and a work
    queue can be shared; else they are not run and ``job_results`` is None). Which pairs are encoded
    together depends on ``pairs`` and ``first`` only, so the table is the same for any number of ranks,
    with or without jobs.
    """
    from relbert_ds.evaluation.cache import VectorCache, cache_key

    batch_size, show_progress = encoding.batch_size, encoding.show_progress
    cache = VectorCache(encoding.cache_dir) if encoding.cache_dir is not None else None
    info: dict[str, Any] = {}
    if cache is not None:
        key = cache_key(encoder, pairs)
        table = cache.load(key, int(encoder.hidden_size))
        info = {"cache_file": str(cache.path(key)), "cache_hit": _all_ranks_true(table is not None)}
        if info["cache_hit"]:
            return EncodedTable(table, info, {"encoding_alone_s": 0.0})
    start = time.perf_counter()
    first = list(dict.fromkeys(tuple(p) for p in first))
    if not first:
        encoded = EncodedTable(encode_sharded(encoder, pairs, batch_size=batch_size, show_progress=show_progress),
                               info, {})
    else:
        first_table = encode_sharded(encoder, first, batch_size=batch_size, show_progress=show_progress)
        timing: dict[str, Any] = {"first_pairs": len(first), "first_s": time.perf_counter() - start}
        in_first = set(first)
        rest = [p for p in dict.fromkeys(tuple(p) for p in pairs) if p not in in_first]
        job_results = None
        if make_jobs is not None and not forwards_are_collective(encoder) and shared_queue_available():
            shared_start = time.perf_counter()
            run = encode_sharing_ranks(encoder, rest, make_jobs(table_lookup(first, first_table)),
                                       batch_size=batch_size, show_progress=show_progress)
            rest_table, job_results = run.table, run.job_results
            timing.update(shared_queue=run.ranks, shared_s=time.perf_counter() - shared_start)
        else:
            rest_table = encode_sharded(encoder, rest, batch_size=batch_size, show_progress=show_progress)
        lookup = table_lookup(first + rest, np.concatenate([first_table, rest_table]))
        encoded = EncodedTable(lookup(pairs), info, timing, job_results)
    if cache is not None and world_info()[0] == 0:
        cache.save(key, encoded.table)
    # What the encoding alone took: all of it but the phase shared with jobs, whose forwards count with their
    # time summed over the ranks and shared out evenly (the batches are small and go to whichever rank is free).
    alone = time.perf_counter() - start
    if "shared_queue" in encoded.timing:
        shares = encoded.timing["shared_queue"]
        alone += sum(r["encode_s"] for r in shares) / len(shares) - encoded.timing["shared_s"]
    encoded.timing["encoding_alone_s"] = alone
    return encoded


def _probe_lookup(encoder: Any, tasks: TaskSet, lookup: Lookup, probe_features: str) -> Lookup:
    """The probes' features: the vectors, or with ``sum`` features each scaled by its pooled token count."""
    if probe_features != "sum" or not tasks.classification:
        return lookup
    counted = classification_pairs(tasks)
    count_of = dict(zip(counted, pooled_token_counts(encoder, counted).tolist()))
    return classification_mod.scale_by_counts(
        lookup, lambda query: np.array([count_of[tuple(p)] for p in query], dtype=np.float32))


def evaluate_tasks(encoder: Any, tasks: TaskSet, encoding: EncodingOptions = EncodingOptions(),
                   probe: ProbeOptions = ProbeOptions(), keep_predictions: bool = False, keep_vectors: bool = False,
                   exhaustive_limit: int = mapping_mod.DEFAULT_EXHAUSTIVE_LIMIT) -> dict:
    """Evaluate one encoder on prepared tasks (a collective; see the module docstring).

    ``probe``: the classification probe; ``sum`` features scale each prompt's vector by its pooled
    token count (:func:`pooled_token_counts`). With ``keep_vectors`` the result also holds ``vectors``:
    ``{"pairs": [...], "table": (N, H) float32}``, the one table every metric was computed from (not
    JSON; pop it before saving).
    """
    start = time.perf_counter()
    _, world = world_info()
    pairs = tasks.pairs()

    def probe_jobs(first_lookup: Lookup) -> list[Callable[[], dict]]:
        # The longest probes first: they start at once and the ranks free earlier encode the rest.
        jobs = classification_mod.torch_probe_jobs(
            tasks.classification, _probe_lookup(encoder, tasks, first_lookup, probe.features), probe, keep_predictions)
        return [jobs[i] for i in probe_order(tasks)]

    encoded = encode_table(encoder, pairs, encoding, first=classification_pairs(tasks) if tasks.classification else (),
                           make_jobs=probe_jobs if tasks.classification and probe.probe == "torch" else None)
    table = encoded.table
    lookup = table_lookup(pairs, table)

    timing = {"encode_s": time.perf_counter() - start, **encoded.timing}
    result: dict[str, Any] = {"model": model_identity(encoder), "world_size": world, "n_pairs": len(pairs),
                              "batch_size": encoding.batch_size, "analogy": {}, "classification": {}, "mapping": {},
                              "missing": list(tasks.missing), **encoded.info}
    if tasks.classification:
        result["probe"] = probe.describe()

    t = time.perf_counter()
    result["analogy"] = analogy_mod.score_analogies(tasks.analogy, lookup, keep_predictions)
    timing["analogy_s"] = time.perf_counter() - t

    t = time.perf_counter()
    if encoded.job_results is not None:  # the probes ran while the rest was encoded
        order = probe_order(tasks)
        reports = classification_mod.gather_probe_reports(
            {order[job]: report for job, report in encoded.job_results.items()}, len(tasks.classification))
    else:
        reports = classification_mod.run_classifications(
            tasks.classification, _probe_lookup(encoder, tasks, lookup, probe.features), probe, keep_predictions)
    for (data, split), report in zip(tasks.classification, reports):
        result["classification"][f"{data.name}/{split}"] = report
    timing["classification_s"] = time.perf_counter() - t

    t = time.perf_counter()
    for data in tasks.mapping:
        result["mapping"][data.name] = mapping_mod.run_mapping(data, lookup, exhaustive_limit=exhaustive_limit,
                                                               keep_predictions=keep_predictions)
    timing["mapping_s"] = time.perf_counter() - t
    timing["total_s"] = time.perf_counter() - start
    result["timing"] = timing
    result["metrics"] = flat_metrics(result)
    if keep_vectors:
        result["vectors"] = {"pairs": pairs, "table": table}
    return result


def evaluate(encoder: Any, analogy: Spec = None, classification: Spec = None, mapping: Spec = None,
             split: Union[str, Sequence[str]] = "test", encoding: EncodingOptions = EncodingOptions(),
             probe: ProbeOptions = ProbeOptions(), keep_predictions: bool = False) -> dict:
    """Evaluate ``encoder`` on analogy, classification and mapping benchmarks (a collective).

    Every rank calls it with the same arguments and gets the same result dict (``metrics``
    holds the flat ``task/dataset/split/metric`` numbers; ``timing`` is per rank). Data are
    validated before any encoding; see :func:`prepare_tasks` for the dataset arguments.
    """
    tasks = prepare_tasks(analogy=analogy, classification=classification, mapping=mapping, split=split)
    return evaluate_tasks(encoder, tasks, encoding, probe, keep_predictions)

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
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar, Union

import numpy as np
import torch

from relbert_ds.data import (
    BUNDLED_ANALOGY,
    BUNDLED_CLASSIFICATION,
    bundled_path,
    canonical_split,
    load_analogy_dataset,
    load_classification_dataset,
)
from relbert_ds.data.schemas import AnalogyDataset, ClassificationDataset, Pair
from relbert_ds.errors import ConfigError, DataError
from relbert_ds.evaluation import analogy as analogy_mod
from relbert_ds.evaluation import classification as classification_mod
from relbert_ds.evaluation import mapping as mapping_mod
from relbert_ds.evaluation.sharding import encode_sharded, encode_sharing_ranks, forwards_are_collective
from relbert_ds.model.batching import PairRows
from relbert_ds.model.prompts import template_id
from relbert_ds.parallel.collectives import all_gather_no_grad, world_info
from relbert_ds.parallel.work_queue import shared_queue_available

T = TypeVar("T")
DERIVED_ANALOGY = "semeval2012"  # the trainer's validation questions (relbert_ds.evaluation.validation)
SPLITS = ("test", "validation")
Spec = Union[None, str, Sequence[str]]


# --------------------------------------------------------------------------- tasks


@dataclass
class TaskSet:
    """Every dataset of one evaluation, loaded and validated, and what was skipped."""

    splits: tuple[str, ...]
    analogy: list[AnalogyDataset] = field(default_factory=list)
    classification: list[tuple[ClassificationDataset, str]] = field(default_factory=list)  # (data, split)
    mapping: list[mapping_mod.MappingDataset] = field(default_factory=list)
    missing: list[dict] = field(default_factory=list)  # bundled defaults without the split

    def pairs(self) -> list[Pair]:
        """The unique pairs of all tasks (first-occurrence order)."""
        out: list[Pair] = []
        for data in self.analogy:
            out.extend(analogy_mod.analogy_pairs(data.questions))
        for data, split in self.classification:
            out.extend(classification_mod.classification_pairs(data, classification_mod.needed_splits(data, split)))
        for data in self.mapping:
            out.extend(mapping_mod.evaluation_pairs(data))
        return list(dict.fromkeys(out))

    def identities(self) -> list[dict]:
        """Name, source, split and record count of every dataset (for the results JSON)."""
        out = [{"task": "analogy", "dataset": d.name, "split": d.split, "source": d.source,
                "n_records": len(d.questions)} for d in self.analogy]
        out += [{"task": "classification", "dataset": d.name, "split": s, "source": d.source,
                 "n_records": {k: len(v) for k, v in d.splits.items()}} for d, s in self.classification]
        out += [{"task": "mapping", "dataset": d.name, "split": "all", "source": d.source,
                 "n_records": len(d.problems)} for d in self.mapping]
        return out


def _normalize_splits(split: Union[str, Sequence[str]]) -> tuple[str, ...]:
    splits = [split] if isinstance(split, str) else list(split)
    out = []
    for s in splits:
        c = canonical_split(str(s).strip().lower())
        if c not in SPLITS:
            raise ConfigError(f"unknown split {s!r}; fix: use test, valid or both")
        out.append(c)
    if not out:
        raise ConfigError("no split given; fix: use test, valid or both")
    return tuple(dict.fromkeys(out))


def _normalize_sources(spec: Spec, default: Sequence[str]) -> tuple[list[str], bool]:
    """(sources, are_defaults). None -> the bundled defaults; "none"/[] -> nothing."""
    if spec is None:
        return list(default), True
    items = [spec] if isinstance(spec, str) else list(spec)
    if any(isinstance(i, str) and i.strip().lower() == "none" for i in items):
        if len(items) > 1:
            raise ConfigError("'none' cannot be combined with dataset names; fix: pass either 'none' or names")
        return [], False
    return [str(i) for i in items], False


def _bundled_has_split(kind: str, name: str, split: str) -> bool:
    folder = bundled_path(kind, name)
    spellings = ("valid", "validation") if split == "validation" else (split,)
    return any((folder / f"{s}.jsonl").is_file() for s in spellings)


def _load_tasks(analogy: Spec, classification: Spec, mapping: Spec, split: Union[str, Sequence[str]],
                data_dir: Optional[Union[str, Path]] = None) -> TaskSet:
    splits = _normalize_splits(split)
    tasks = TaskSet(splits=splits)
    sources, defaults = _normalize_sources(analogy, BUNDLED_ANALOGY)
    for source in sources:
        if source.lower() == DERIVED_ANALOGY:
            _add_derived_analogy(tasks, source, splits, data_dir)
            continue
        # A bundled set lacking one of several requested splits is listed as not measured (U4, Google
        # and BATS ship their valid split only); asked for that split alone, it is an error below.
        lenient = defaults or (len(splits) > 1 and source.lower() in BUNDLED_ANALOGY)
        for s in splits:
            if lenient and not _bundled_has_split("analogy", source.lower(), s):
                tasks.missing.append({"task": "analogy", "dataset": source, "split": s,
                                      "reason": f"no {s} split in the bundled data"})
                continue
            data = load_analogy_dataset(source, s, data_dir=data_dir)
            tasks.analogy.append(AnalogyDataset(data.name, s, data.questions, data.source))
    sources, defaults = _normalize_sources(classification, BUNDLED_CLASSIFICATION)
    for source in sources:
        data = load_classification_dataset(source, data_dir=data_dir)
        for s in splits:
            if "train" not in data.splits:
                raise DataError(f"classification dataset {source}: no train split (splits present: "
                                f"{', '.join(data.splits) or 'none'}); fix: pass a folder holding train.jsonl "
                                "and test.jsonl (validation.jsonl optional)")
            if s not in data.splits:
                if defaults:
                    tasks.missing.append({"task": "classification", "dataset": data.name, "split": s,
                                          "reason": f"no {s} split in the bundled data"})
                    continue
                raise DataError(f"classification dataset {source}: no {s} split (splits present: "
                                f"{', '.join(data.splits)}); fix: ask for one of those splits or add {s}.jsonl")
            if s == "validation" and "test" in splits and "validation" in data.splits:
                # The probe's grid is selected on this split: next to the test row, a validation row would
                # only be the default grid point trained once more, so it is listed, not computed.
                tasks.missing.append({"task": "classification", "dataset": data.name, "split": s,
                                      "reason": "the probe selects on it; ask for it alone to fit the default "
                                                "grid point"})
                continue
            tasks.classification.append((data, s))
    sources, _ = _normalize_sources(mapping, ())
    for source in sources:
        tasks.mapping.append(mapping_mod.load_mapping_dataset(source))
    return tasks


def _add_derived_analogy(tasks: TaskSet, source: str, splits: Sequence[str],
                         data_dir: Optional[Union[str, Path]]) -> None:
    """``semeval2012``: the 79 questions the trainer validates on, built from SemEval-2012's
    validation relations (one name for one set, in the trainer and the evaluator). They exist
    for the validation split only."""
    from relbert_ds.data import load_relation_dataset
    from relbert_ds.data.derived import relation_analogy_questions

    if "validation" not in splits:
        raise DataError(f"--analogy {source}: the SemEval-2012 analogy questions exist for the validation split "
                        f"only (built from its validation relations); fix: pass --split valid")
    tasks.analogy.append(relation_analogy_questions(load_relation_dataset(DERIVED_ANALOGY, "validation")))
    for s in splits:
        if s != "validation":
            tasks.missing.append({"task": "analogy", "dataset": DERIVED_ANALOGY, "split": s,
                                  "reason": "SemEval-2012 questions exist for validation only"})


def prepare_tasks(analogy: Spec = None, classification: Spec = None, mapping: Spec = None,
                  split: Union[str, Sequence[str]] = "test", data_dir: Optional[Union[str, Path]] = None) -> TaskSet:
    """Load and validate every requested dataset (a collective; cheap, no model involved).

    Args:
        analogy: sources (bundled name, folder, file, hub id); None = every bundled set, where
            a bundled default lacking the split is listed in ``missing`` instead of failing;
            ``"none"`` or ``()`` = no analogy.
        classification: likewise (default: BLESS and KHN).
        mapping: relation-mapping JSONL files (default: none).
        split: ``"test"``, ``"valid"``/``"validation"``, or both (both for sat = SAT-full too).
        data_dir: folder of local copies of hub datasets, ``<dir>/<owner>/<name>/<config>/<split>.jsonl``
            (default ``$RELBERT_DS_DATA``); a hub id is looked for there before the hub.

    Raises:
        UserError (DataError, ConfigError) on every rank when any rank finds bad input.
    """
    from relbert_ds.parallel.distributed import agree

    return agree(lambda: _load_tasks(analogy, classification, mapping, split, data_dir))


# --------------------------------------------------------------------------- evaluation


def model_identity(encoder: Any) -> dict:
    """What identifies the evaluated model in the results."""
    ident = {"name": getattr(encoder, "name", type(encoder).__name__)}
    for key in ("template", "pooling", "max_length", "hidden_size"):
        value = getattr(encoder, key, None)
        if value is not None:
            ident[key] = value
    return ident


def _finite(x: Any) -> Optional[float]:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


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


def encode_table(encoder: Any, pairs: Sequence[Pair], batch_size: int = 64, show_progress: bool = False,
                 cache_dir: Optional[Union[str, Path]] = None, first: Sequence[Pair] = (),
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

    cache = VectorCache(cache_dir) if cache_dir is not None else None
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


def classification_pairs(tasks: TaskSet) -> list[Pair]:
    """The unique pairs the classification probes read (both directions of every split they use)."""
    return list(dict.fromkeys(
        p for data, split in tasks.classification
        for p in classification_mod.classification_pairs(data, classification_mod.needed_splits(data, split))))


def _probe_lookup(encoder: Any, tasks: TaskSet, lookup: Lookup, probe_features: str) -> Lookup:
    """The probes' features: the vectors, or with ``sum`` features each scaled by its pooled token count."""
    if probe_features != "sum" or not tasks.classification:
        return lookup
    counted = classification_pairs(tasks)
    count_of = dict(zip(counted, pooled_token_counts(encoder, counted).tolist()))
    return classification_mod.scale_by_counts(
        lookup, lambda query: np.array([count_of[tuple(p)] for p in query], dtype=np.float32))


def evaluate_tasks(encoder: Any, tasks: TaskSet, batch_size: int = 64,
                   max_iter: int = classification_mod.DEFAULT_MAX_ITER, seed: int = 0,
                   blas_threads: Optional[int] = 1, keep_predictions: bool = False,
                   exhaustive_limit: int = mapping_mod.DEFAULT_EXHAUSTIVE_LIMIT,
                   show_progress: bool = False, keep_vectors: bool = False, fit_workers: int = 1,
                   probe: str = classification_mod.DEFAULT_PROBE,
                   probe_features: str = classification_mod.DEFAULT_FEATURES, device: Any = None,
                   cache_dir: Optional[Union[str, Path]] = None, probe_protocol: Optional[str] = None) -> dict:
    """Evaluate one encoder on prepared tasks (a collective; see the module docstring).

    ``probe``/``probe_features``/``probe_protocol``/``device``: the classification probe (see
    :func:`classification.run_classifications`); ``sum`` features scale each prompt's vector
    by its pooled token count (:func:`pooled_token_counts`). ``cache_dir``: read and write the
    vector table there (:mod:`relbert_ds.evaluation.cache`). With ``keep_vectors`` the result
    also holds ``vectors``: ``{"pairs": [...], "table": (N, H) float32}``, the one table every
    metric was computed from (not JSON; pop it before saving).
    """
    probe_protocol = classification_mod.check_probe(probe, probe_features, probe_protocol)
    start = time.perf_counter()
    _, world = world_info()
    pairs = tasks.pairs()
    probe_args = dict(max_iter=max_iter, seed=seed, keep_predictions=keep_predictions, features=probe_features,
                      device=device, protocol=probe_protocol)

    def probe_jobs(first_lookup: Lookup) -> list[Callable[[], dict]]:
        # The longest probes first: they start at once and the ranks free earlier encode the rest.
        jobs = classification_mod.torch_probe_jobs(tasks.classification,
                                                   _probe_lookup(encoder, tasks, first_lookup, probe_features),
                                                   **probe_args)
        return [jobs[i] for i in probe_order(tasks)]

    encoded = encode_table(encoder, pairs, batch_size=batch_size, show_progress=show_progress, cache_dir=cache_dir,
                           first=classification_pairs(tasks) if tasks.classification else (),
                           make_jobs=probe_jobs if tasks.classification and probe == "torch" else None)
    table = encoded.table
    lookup = table_lookup(pairs, table)

    timing = {"encode_s": time.perf_counter() - start, **encoded.timing}
    result: dict[str, Any] = {"model": model_identity(encoder), "world_size": world, "n_pairs": len(pairs),
                              "batch_size": batch_size, "analogy": {}, "classification": {}, "mapping": {},
                              "missing": list(tasks.missing), **encoded.info}
    if tasks.classification:
        result["probe"] = {"implementation": probe, "features": probe_features, "protocol": probe_protocol,
                           "device": str(torch.device(device)) if device is not None else "cpu"}

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
            tasks.classification, _probe_lookup(encoder, tasks, lookup, probe_features), blas_threads=blas_threads,
            workers=fit_workers, probe=probe, **probe_args)
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


def probe_order(tasks: TaskSet) -> list[int]:
    """Indices of ``tasks.classification``, the costliest probe first (ties: task order)."""
    return classification_mod.costliest_first(classification_mod.probe_costs(tasks.classification))


def evaluate(encoder: Any, analogy: Spec = None, classification: Spec = None, mapping: Spec = None,
             split: Union[str, Sequence[str]] = "test", batch_size: int = 64,
             max_iter: int = classification_mod.DEFAULT_MAX_ITER, seed: int = 0, blas_threads: Optional[int] = 1,
             keep_predictions: bool = False, show_progress: bool = False, fit_workers: int = 1,
             probe: str = classification_mod.DEFAULT_PROBE,
             probe_features: str = classification_mod.DEFAULT_FEATURES, device: Any = None,
             cache_dir: Optional[Union[str, Path]] = None, probe_protocol: Optional[str] = None) -> dict:
    """Evaluate ``encoder`` on analogy, classification and mapping benchmarks (a collective).

    Every rank calls it with the same arguments and gets the same result dict (``metrics``
    holds the flat ``task/dataset/split/metric`` numbers; ``timing`` is per rank). Data are
    validated before any encoding; see :func:`prepare_tasks` for the dataset arguments.
    """
    tasks = prepare_tasks(analogy=analogy, classification=classification, mapping=mapping, split=split)
    return evaluate_tasks(encoder, tasks, batch_size=batch_size, max_iter=max_iter, seed=seed,
                          blas_threads=blas_threads, keep_predictions=keep_predictions, show_progress=show_progress,
                          fit_workers=fit_workers, probe=probe, probe_features=probe_features, device=device,
                          cache_dir=cache_dir, probe_protocol=probe_protocol)


# --------------------------------------------------------------------------- reporting

ANALOGY_METRICS = ("accuracy",)
CLASSIFICATION_METRICS = ("f1_macro", "f1_micro", "accuracy")
MAPPING_METRICS = ("accuracy",)


def flat_metrics(result: dict) -> dict[str, float]:
    """``{"analogy/sat/test/accuracy": 0.5, ...}``: the scalar metrics (for TensorBoard, selection)."""
    out: dict[str, float] = {}
    for key, entry in result["analogy"].items():
        out[f"analogy/{key}/accuracy"] = entry["accuracy"]
        out[f"analogy/{key}/n_tied"] = float(entry["n_tied"])
    for key, entry in result["classification"].items():
        for metric in CLASSIFICATION_METRICS:
            out[f"classification/{key}/{metric}"] = entry[metric]
    for key, entry in result["mapping"].items():
        out[f"mapping/{key}/accuracy"] = entry["accuracy"]
    return out


def strip_predictions(result: dict) -> tuple[dict, list[dict]]:
    """A copy of ``result`` without per-item predictions, and those predictions as records."""
    records: list[dict] = []
    clean = {k: v for k, v in result.items() if k != "vectors"}
    for task in ("analogy", "classification", "mapping"):
        clean[task] = {}
        for key, entry in result.get(task, {}).items():
            entry = dict(entry)
            for item in entry.pop("predictions", []):
                records.append({"task": task, "dataset": entry["dataset"], "split": entry["split"], **item})
            clean[task][key] = entry
    return clean, records


def _rows(results: dict[str, dict]) -> list[tuple[str, str, str, str, str]]:
    """(task, dataset, split, metric, n) of every measured number, in a stable order (what was not
    measured is listed under the table, not as rows of n/a)."""
    rows: list[tuple[str, str, str, str, str]] = []
    seen = set()
    for res in results.values():
        items = [("analogy", e["dataset"], e["split"], m, str(e["n_questions"]))
                 for e in res["analogy"].values() for m in ANALOGY_METRICS]
        items += [("classification", e["dataset"], e["split"], m, str(e["n_eval"]))
                  for e in res["classification"].values() for m in CLASSIFICATION_METRICS]
        items += [("mapping", e["dataset"], e["split"], m, str(e["n_problems"]))
                  for e in res["mapping"].values() for m in MAPPING_METRICS]
        for row in items:
            if row[:4] not in seen:
                seen.add(row[:4])
                rows.append(row)
    order = {"analogy": 0, "classification": 1, "mapping": 2}
    split_order = {"validation": 0, "test": 1, "full": 2}
    return sorted(rows, key=lambda r: (order[r[0]], r[1].lower(), split_order.get(r[2], 3), r[3]))


def _cell(res: dict, task: str, dataset: str, split: str, metric: str) -> str:
    key = dataset if task == "mapping" else f"{dataset}/{split}"
    entry = res[task].get(key)
    if entry is None:
        for m in res["missing"]:
            if (m["task"], m["dataset"], m["split"]) == (task, dataset, split):
                return f"n/a ({m['reason']})"
        return "-"
    value = entry[metric]
    text = f"{100 * value:.1f}"
    if task == "analogy" and entry.get("n_tied"):
        text += f" ({entry['n_tied']} tied)"
    if task == "classification" and entry.get("default_reason") == "no validation split":
        text += " (default grid point: no validation split)"
    return text


def _probe_note(results: dict[str, dict]) -> str:
    """The footer line naming the classification probe and features of each model ('' without classification)."""
    notes = []
    for label, res in results.items():
        probe = res.get("probe")
        if probe and res.get("classification"):
            pooled = "summed (relbert's)" if probe["features"] == "sum" else "mean"
            protocol = probe.get("protocol", "paper")
            how = ("fast protocol: grid cut by successive halving on validation macro F1" if protocol == "fast"
                   else "paper protocol")
            notes.append(f"{label} = {probe['implementation']} probe on {probe['device']} ({how}), features "
                         f"concat(emb(h,t), emb(t,h)) of {pooled} pooled vectors")
    if not notes:
        return ""
    return ("Classification: " + "; ".join(notes) + "; grid hidden {100,150,200} x lr {1e-3,1e-4,1e-5} selected on "
            "validation macro F1 (without a validation split: the default grid point hidden 100, lr 1e-3).\n")


def markdown_table(results: dict[str, dict]) -> str:
    """A markdown table of the metrics (in %), one column per evaluated model (side by side)."""
    labels = list(results)
    header = "| task | dataset | split | metric | n | " + " | ".join(labels) + " |"
    lines = [header, "|" + "---|" * (5 + len(labels))]
    for task, dataset, split, metric, n in _rows(results):
        cells = [_cell(results[label], task, dataset, split, metric) for label in labels]
        lines.append(f"| {task} | {dataset} | {split} | {metric} | {n} | " + " | ".join(cells) + " |")
    identities = {label: r["model"] for label, r in results.items()}
    models = "; ".join(f"{label} = {m.get('name')} (template {_template_name(m.get('template'))}, "
                       f"pooling {m.get('pooling')})" for label, m in identities.items())
    return "\n".join(lines) + f"\n\nModels: {models}\n" + _missing_note(results) + _probe_note(results)


def _template_name(template: Optional[str]) -> str:
    return template_id(template) or repr(template)


def _missing_note(results: dict[str, dict]) -> str:
    """One line naming the requested dataset/split pairs that could not be measured, and why."""
    missing = {(m["dataset"], m["split"]): m["reason"] for res in results.values() for m in res.get("missing", [])}
    if not missing:
        return ""
    by_reason: dict[str, list[str]] = {}
    for (dataset, split), reason in missing.items():
        by_reason.setdefault(reason, []).append(f"{dataset} {split}")
    return "Not measured: " + "; ".join(f"{', '.join(sorted(names))} ({reason})"
                                         for reason, names in by_reason.items()) + "\n"


def write_tensorboard(results: dict[str, dict], log_dir: Union[str, Path], step: int = 0,
                      writer: Any = None) -> None:
    """Write every flat metric as ``<label>/<task>/<dataset>/<split>/<metric>`` (rank 0 only)."""
    rank, _ = world_info()
    if rank != 0:
        return
    own = writer is None
    if own:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for label, res in results.items():
            for key, value in res["metrics"].items():
                if _finite(value) is not None:
                    writer.add_scalar(f"{label}/{key}", value, global_step=step)
        writer.flush()
    finally:
        if own:
            writer.close()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _jsonable(obj: Any) -> Any:
    """NaN -> None (strict JSON), recursively."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def write_outputs(results: dict[str, dict], header: dict, output: Optional[Union[str, Path]] = None,
                  predictions: Optional[Union[str, Path]] = None, tensorboard_dir: Optional[Union[str, Path]] = None,
                  step: int = 0) -> dict:
    """Rank 0: results JSON (``header`` + one entry per model), predictions JSONL, TensorBoard.

    Returns the JSON document. Other ranks write nothing and get it back too.
    """
    rank, _ = world_info()
    clean: dict[str, dict] = {}
    records: list[dict] = []
    for label, res in results.items():
        clean[label], recs = strip_predictions(res)
        records += [{"model": label, **r} for r in recs]
    document = _jsonable({**header, "models": clean})
    if rank != 0:
        return document
    if output:
        path = Path(output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document, indent=2, default=_json_default) + "\n", encoding="utf-8")
    if predictions:
        path = Path(predictions)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as handle:
            for rec in records:
                handle.write(json.dumps(_jsonable(rec), default=_json_default) + "\n")
    if tensorboard_dir:
        write_tensorboard(results, tensorboard_dir, step=step)
    return document

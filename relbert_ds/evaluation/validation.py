"""Validation during training: the analogy validation sets through the evaluator's own path
(:func:`relbert_ds.evaluation.runner.evaluate_tasks`), so the accuracy the trainer selects its
best model on is the accuracy ``relbert-ds-evaluate`` reports for the same model and sets.

Used by the trainer and by the benchmarks (``benchmarks/time_to_quality.py``,
``benchmarks/quality_recipe.py``). Like every evaluation it is a collective: every rank calls
it with the same arguments and gets the same numbers.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from relbert_ds.data import load_analogy_dataset
from relbert_ds.data.derived import relation_analogy_questions
from relbert_ds.data.schemas import AnalogyDataset, Pair, RelationDataset
from relbert_ds.errors import DataError

# The analogy questions built from a relational-similarity set's validation split (RelBERT's model
# selection) have the same name in the evaluator's --analogy.
from relbert_ds.evaluation.tasks import DERIVED_ANALOGY


def load_validation_sets(names: Sequence[str], validation_relations: Optional[RelationDataset],
                         split_label: str = "validation",
                         per_source: Optional[Sequence[RelationDataset]] = None) -> list[AnalogyDataset]:
    """The analogy validation sets by name; ``semeval2012`` is built from
    ``validation_relations`` (the training data's validation split), or, with several training
    sources, from each of ``per_source`` (one set, and one accuracy, per source)."""
    sets = []
    for name in names:
        if name.lower() == DERIVED_ANALOGY:
            if validation_relations is None:
                raise DataError(f"--analogy {DERIVED_ANALOGY} needs the {split_label!r} split of the training data; "
                                f"fix: pass --validation_split or drop {DERIVED_ANALOGY} from --analogy")
            sets.extend(relation_analogy_questions(d) for d in (per_source or [validation_relations]))
        else:
            sets.append(load_analogy_dataset(name, "valid"))
    return sets


def analogy_accuracies(encoder: Any, sets: Sequence[AnalogyDataset], batch_size: int = 64) -> dict[str, float]:
    """Accuracy per analogy validation set (by dataset name), one sharded encoding for all."""
    from relbert_ds.evaluation.runner import EncodingOptions, evaluate_tasks
    from relbert_ds.evaluation.tasks import TaskSet

    if not sets:
        return {}
    tasks = TaskSet(splits=tuple(sorted({d.split for d in sets})), analogy=list(sets))
    result = evaluate_tasks(encoder, tasks, EncodingOptions(batch_size=batch_size))
    return {entry["dataset"]: entry["accuracy"] for key, entry in result["analogy"].items()
            if entry["split"] != "full"}


def encode_pairs(encoder: Any, pairs: Sequence[Pair], batch_size: int = 64) -> np.ndarray:
    """Vectors of ``pairs`` (a collective: sharded over the ranks, the full table on each)."""
    from relbert_ds.evaluation.sharding import encode_sharded

    return encode_sharded(encoder, list(pairs), batch_size=batch_size)

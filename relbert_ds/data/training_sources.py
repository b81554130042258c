"""Several relational-similarity training sets in one run (``--train_data A B ...``).

Each source is whatever :func:`relbert_ds.data.load_relation_dataset` takes: a bundled name
(``semeval2012``), a local ``.jsonl`` file or folder of ``<split>.jsonl`` files, or a hub id
(``relbert/t_rex_relational_similarity``, ``relbert/conceptnet_relational_similarity``,
``relbert/nell_relational_similarity``, ``relbert/semeval2012_relational_similarity``; offline,
a local copy under ``$RELBERT_DS_DATA/<owner>/<name>/<split>.jsonl`` is used). The sources are
combined into one :class:`RelationDataset`:

* Relations keep their names and their source's order; the sampler and the loss identify a
  relation by its index, so relations of different sources never merge.
* Relation names must be unique across the sources. A name found in two sources is either the
  same relation given twice (then its positives would be in-batch negatives of itself) or two
  versions of it that the logs, the projector and a checkpoint's fingerprint could not tell
  apart: both are refused, with different messages (same pairs: "the same data given twice",
  which ``--train_weights`` expresses properly; different pairs: name the relation and both
  sources). The same source named twice is refused for the same reason.
* Parents are prefixed with their source's short name (``semeval2012:1``) when there are
  several sources, so SemEval-2012's parent categories never merge with another source's
  (parent-level negatives and ``--parent_grouping`` work within a source).
* Per-source sampling weights become per-relation weights for
  :class:`relbert_ds.training.sampler.RelationAwareSampler` (``relation_weights``): a source of weight 2
  is seen twice per epoch, one of weight 0.5 half.

:func:`per_source_validation` loads the validation split of each source on its own, named by
the source's short name, so the validation analogy questions derived from it give one accuracy
per source.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

from relbert_ds.data.schemas import RelationDataset, RelationGroup
from relbert_ds.data.sources import load_relation_dataset
from relbert_ds.errors import ConfigError, DataError

__all__ = ["load_training_sources", "per_source_validation", "source_short_names"]

_SPLIT_NAMES = {"train", "validation", "valid", "test"}


def source_short_names(sources: Sequence[str], datasets: Sequence[RelationDataset]) -> list[str]:
    """A short, distinct name per source: the file's stem for a ``<name>.jsonl`` that is not a
    split file, else the dataset's name without its hub owner (``t_rex_relational_similarity``);
    a repeated name gets ``-2``, ``-3``, ... ."""
    names: list[str] = []
    for source, data in zip(sources, datasets):
        path = Path(source).expanduser()
        if path.suffix == ".jsonl" and path.is_file() and path.stem.lower() not in _SPLIT_NAMES:
            short = path.stem
        else:
            short = data.name.rsplit("/", 1)[-1]
        names.append(short)
    seen: dict[str, int] = {}
    unique = []
    for short in names:
        seen[short] = seen.get(short, 0) + 1
        unique.append(short if seen[short] == 1 else f"{short}-{seen[short]}")
    return unique


def _check_weights(sources: Sequence[str], weights: Optional[Sequence[float]]) -> Optional[list[float]]:
    if weights is None:
        return None
    if len(weights) != len(sources):
        raise ConfigError(f"--train_weights has {len(weights)} value(s) for {len(sources)} --train_data source(s); "
                          f"fix: give one weight per source")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not (math.isfinite(w) and w > 0):
            raise ConfigError(f"--train_weights {w!r} is not a positive number; fix: use weights > 0 (2 sees a "
                              f"source twice per epoch, 0.5 half)")
    return [float(w) for w in weights]


def _load_each(sources: Sequence[str], split: str) -> list[RelationDataset]:
    """Every source's split, refusing a source named twice (same file, folder or hub id)."""
    if not sources:
        raise ConfigError("--train_data names no source; fix: name one, e.g. --train_data semeval2012")
    datasets = [load_relation_dataset(source, split) for source in sources]
    first: dict[str, str] = {}
    for source, data in zip(sources, datasets):
        if data.source in first:
            raise DataError(f"--train_data names {data.source} twice ({first[data.source]!r} and {source!r}); fix: "
                            f"give each source once (use --train_weights to sample one more often)")
        first[data.source] = source
    return datasets


def _check_unique_relations(shorts: Sequence[str], datasets: Sequence[RelationDataset]) -> None:
    owner: dict[str, tuple[str, RelationGroup]] = {}
    for short, data in zip(shorts, datasets):
        for group in data.relations:
            if group.relation_type not in owner:
                owner[group.relation_type] = (short, group)
                continue
            other_short, other = owner[group.relation_type]
            same = (set(other.positives), set(other.negatives)) == (set(group.positives), set(group.negatives))
            if same:
                raise DataError(f"--train_data sources {other_short} and {short} both hold relation "
                                f"{group.relation_type!r} with the same pairs (the same data given twice); fix: drop "
                                f"one of them (use --train_weights to sample a source more often)")
            raise DataError(f"relation {group.relation_type!r} is in --train_data sources {other_short} and {short} "
                            f"with different pairs (relation names must be unique across sources); fix: rename it "
                            f"in one source, or drop one of the two sources")


def load_training_sources(sources: Sequence[str], split: str,
                          weights: Optional[Sequence[float]] = None) -> tuple[RelationDataset, Optional[list[float]]]:
    """Load ``split`` of every source and combine them (see the module docstring).

    Args:
        sources: one or more sources as :func:`load_relation_dataset` takes them.
        split: the split to load from each (``"train"``, ``"validation"``, ...).
        weights: optional sampling weight per source (> 0).

    Returns:
        The combined dataset (``name`` ``"a+b"``, ``source`` every source's path or hub id) and,
        when ``weights`` is given, one weight per relation of it (else None).

    Raises:
        DataError: a source that cannot be read, is empty, lacks ``split``, is named twice, or
            shares a relation name with another source.
        ConfigError: a weight that is not a positive number, or not one per source.
    """
    checked = _check_weights(sources, weights)
    datasets = _load_each(sources, split)
    if len(datasets) == 1:
        data = datasets[0]
        return data, None if checked is None else [checked[0]] * len(data)
    shorts = source_short_names(sources, datasets)
    _check_unique_relations(shorts, datasets)
    groups: list[RelationGroup] = []
    relation_weights: list[float] = []
    for i, (short, data) in enumerate(zip(shorts, datasets)):
        for group in data.relations:
            parent = None if group.parent is None else f"{short}:{group.parent}"
            groups.append(RelationGroup(group.relation_type, group.positives, group.negatives, parent))
        if checked is not None:
            relation_weights += [checked[i]] * len(data)
    combined = RelationDataset(name="+".join(shorts), split=split, relations=tuple(groups),
                               source=" + ".join(data.source for data in datasets))
    return combined, relation_weights if checked is not None else None


def per_source_validation(sources: Sequence[str], split: str) -> list[RelationDataset]:
    """``split`` of each source on its own, named by the source's short name (distinct), for
    one validation result per source (e.g. the analogy questions derived from each).

    Raises the same errors as :func:`load_training_sources` for the same input.
    """
    datasets = _load_each(sources, split)
    shorts = source_short_names(sources, datasets)
    if len(datasets) > 1:
        _check_unique_relations(shorts, datasets)
    return [RelationDataset(name=short, split=data.split, relations=data.relations, source=data.source)
            for short, data in zip(shorts, datasets)]


def load_train_data(sources: Sequence[str], split: str,
                    weights: Optional[Sequence[float]] = None) -> tuple[RelationDataset, Optional[list[float]]]:
    """The ``--train_data`` sources of a run: one source without weights is read as it is (its
    relation and parent names untouched); several, or weights, are combined by
    :func:`load_training_sources`. Returns the dataset and the per-relation weights (or None)."""
    if len(sources) == 1 and weights is None:
        return load_relation_dataset(sources[0], split), None
    return load_training_sources(sources, split, weights)

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
  :class:`relbert_ds.training.sampler.RelationAwareSampler` (``relation_weights``: expected
  appearances per epoch, remainders carried over epochs). ``mode="relations"`` (the default)
  gives every relation its source's weight: a relation of a source of weight 2 is seen twice per
  epoch, of weight 0.5 in every other epoch, whatever the source's size. ``mode="share"`` reads
  the weights as the sources' shares of the relation slots (of the steps): weights ``1 1`` give
  each source half of an epoch's slots however many relations each has, the epoch keeping its
  length (one slot per relation in all); a source's relations share its slots evenly.

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

__all__ = ["load_training_sources", "per_source_validation", "relation_weights", "source_short_names", "WEIGHT_MODES"]

_SPLIT_NAMES = {"train", "validation", "valid", "test"}
WEIGHT_MODES = ("relations", "share")  # what a --train_weights weight scales (see the module docstring)


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
                              f"source's relations twice per epoch, 0.5 in every other epoch)")
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


def _check_mode(mode: str) -> None:
    if mode not in WEIGHT_MODES:
        raise ConfigError(f"--train_weights_mode {mode!r} is not one of {', '.join(WEIGHT_MODES)}; fix: pick one of "
                          f"them")


def relation_weights(weights: Sequence[float], sizes: Sequence[int], mode: str = "relations") -> list[float]:
    """One weight per relation from one weight per source of ``sizes`` relations.

    ``relations``: each relation gets its source's weight. ``share``: source ``s`` gets the share
    ``w_s / sum(w)`` of the ``sum(sizes)`` slots of an epoch, spread evenly over its relations.
    """
    _check_mode(mode)
    if mode == "relations":
        return [float(w) for w, n in zip(weights, sizes) for _ in range(n)]
    total_weight, total_relations = math.fsum(weights), sum(sizes)
    return [w / total_weight * total_relations / n for w, n in zip(weights, sizes) for _ in range(n)]


def load_training_sources(sources: Sequence[str], split: str, weights: Optional[Sequence[float]] = None,
                          mode: str = "relations") -> tuple[RelationDataset, Optional[list[float]]]:
    """Load ``split`` of every source and combine them (see the module docstring).

    Args:
        sources: one or more sources as :func:`load_relation_dataset` takes them.
        split: the split to load from each (``"train"``, ``"validation"``, ...).
        weights: optional sampling weight per source (> 0).
        mode: ``"relations"`` (a weight is each relation's expected appearances per epoch) or
            ``"share"`` (a weight is the source's share of the slots), see the module docstring.

    Returns:
        The combined dataset (``name`` ``"a+b"``, ``source`` every source's path or hub id) and,
        when ``weights`` is given, one weight per relation of it (else None).

    Raises:
        DataError: a source that cannot be read, is empty, lacks ``split``, is named twice, or
            shares a relation name with another source.
        ConfigError: a weight that is not a positive number, or not one per source; an unknown mode.
    """
    checked = _check_weights(sources, weights)
    _check_mode(mode)
    datasets = _load_each(sources, split)
    per_relation = None if checked is None else relation_weights(checked, [len(d) for d in datasets], mode)
    if len(datasets) == 1:
        return datasets[0], per_relation
    shorts = source_short_names(sources, datasets)
    _check_unique_relations(shorts, datasets)
    groups: list[RelationGroup] = []
    for short, data in zip(shorts, datasets):
        for group in data.relations:
            parent = None if group.parent is None else f"{short}:{group.parent}"
            groups.append(RelationGroup(group.relation_type, group.positives, group.negatives, parent))
    combined = RelationDataset(name="+".join(shorts), split=split, relations=tuple(groups),
                               source=" + ".join(data.source for data in datasets))
    return combined, per_relation


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


def load_train_data(sources: Sequence[str], split: str, weights: Optional[Sequence[float]] = None,
                    mode: str = "relations") -> tuple[RelationDataset, Optional[list[float]]]:
    """The ``--train_data`` sources of a run: one source without weights is read as it is (its
    relation and parent names untouched); several, or weights, are combined by
    :func:`load_training_sources` (``mode``: ``--train_weights_mode``). Returns the dataset and
    the per-relation weights (or None)."""
    if len(sources) == 1 and weights is None:
        _check_mode(mode)
        return load_relation_dataset(sources[0], split), None
    return load_training_sources(sources, split, weights, mode)

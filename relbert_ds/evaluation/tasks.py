"""The datasets of one evaluation: which analogy, classification and mapping sets, which splits,
loaded and validated on every rank before anything is encoded (:func:`prepare_tasks`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

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

DERIVED_ANALOGY = "semeval2012"  # the trainer's validation questions (relbert_ds.evaluation.validation)
SPLITS = ("test", "validation")
Spec = Union[None, str, Sequence[str]]


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


def classification_pairs(tasks: TaskSet) -> list[Pair]:
    """The unique pairs the classification probes read (both directions of every split they use)."""
    return list(dict.fromkeys(
        p for data, split in tasks.classification
        for p in classification_mod.classification_pairs(data, classification_mod.needed_splits(data, split))))


def probe_order(tasks: TaskSet) -> list[int]:
    """Indices of ``tasks.classification``, the costliest probe first (ties: task order)."""
    return classification_mod.costliest_first(classification_mod.probe_costs(tasks.classification))

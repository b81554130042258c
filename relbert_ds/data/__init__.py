"""Datasets of the three relbert schemas: relational similarity, analogy questions, lexical relations.

Sources may be local JSONL files/folders, bundled names or Hugging Face ids; every record is
validated on load and problems raise a one-line :class:`relbert_ds.errors.DataError`.
"""
from relbert_ds.data.schemas import (
    AnalogyDataset,
    AnalogyQuestion,
    ClassificationDataset,
    LexicalPair,
    Pair,
    RelationDataset,
    RelationGroup,
)
from relbert_ds.data.sources import (
    BUNDLED_ANALOGY,
    BUNDLED_CLASSIFICATION,
    BUNDLED_RELATION,
    bundled_path,
    canonical_split,
    load_analogy_dataset,
    load_classification_dataset,
    load_relation_dataset,
)

__all__ = [
    "AnalogyDataset",
    "AnalogyQuestion",
    "BUNDLED_ANALOGY",
    "BUNDLED_CLASSIFICATION",
    "BUNDLED_RELATION",
    "ClassificationDataset",
    "LexicalPair",
    "Pair",
    "RelationDataset",
    "RelationGroup",
    "bundled_path",
    "canonical_split",
    "load_analogy_dataset",
    "load_classification_dataset",
    "load_relation_dataset",
]

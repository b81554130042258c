"""The records of the three relbert dataset schemas (Hugging Face ``relbert/*`` layouts).

Word pairs are ``tuple[str, str]`` (head, tail) everywhere in relbert-ds.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

Pair = tuple[str, str]


@dataclass(frozen=True)
class RelationGroup:
    """One relation of a relational-similarity dataset (one JSONL line).

    ``positives`` are prototypical pairs of the relation, ``negatives`` pairs that are not
    (for SemEval-2012: the least typical pairs rated for it). ``parent`` is the coarse
    category (SemEval-2012: "1".."10") or None where the data has none.
    """

    relation_type: str
    positives: tuple[Pair, ...]
    negatives: tuple[Pair, ...]
    parent: Optional[str] = None


@dataclass(frozen=True)
class RelationDataset:
    """A split of a relational-similarity dataset: relations in file order."""

    name: str
    split: str
    relations: tuple[RelationGroup, ...]
    source: str = ""  # file path or hub id, for messages and run records

    def __len__(self) -> int:
        return len(self.relations)

    @property
    def pairs(self) -> list[Pair]:
        """Every pair (positives then negatives, relation by relation), duplicates kept."""
        out: list[Pair] = []
        for group in self.relations:
            out.extend(group.positives)
            out.extend(group.negatives)
        return out


@dataclass(frozen=True)
class AnalogyQuestion:
    """One multiple-choice analogy question: which ``choices[i]`` relates like ``stem``."""

    stem: Pair
    choices: tuple[Pair, ...]
    answer: int  # 0-based index into choices
    prefix: str = ""  # the source's group tag (SAT source, U2 grade, Google category, ...)


@dataclass(frozen=True)
class AnalogyDataset:
    """One split of one analogy benchmark (e.g. name="sat", split="test")."""

    name: str
    split: str
    questions: tuple[AnalogyQuestion, ...]
    source: str = ""

    def __len__(self) -> int:
        return len(self.questions)


@dataclass(frozen=True)
class LexicalPair:
    """One labelled pair of a lexical relation classification dataset."""

    head: str
    tail: str
    relation: str


@dataclass(frozen=True)
class ClassificationDataset:
    """A lexical relation classification benchmark: its splits keyed by name.

    Keys are ``train``, ``test`` and, where present, ``validation``.
    """

    name: str
    splits: dict[str, tuple[LexicalPair, ...]] = field(default_factory=dict)
    source: str = ""

    @property
    def labels(self) -> list[str]:
        """Sorted label set of the training split."""
        return sorted({p.relation for p in self.splits.get("train", ())})

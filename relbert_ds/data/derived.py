"""Datasets derived from others: the SemEval-2012 validation analogy questions.

RelBERT 2023 selects its epoch by accuracy on analogy questions built from the SemEval-2012
validation split (79 questions, 3 choices): per relation, a positive pair is the stem, another
positive is the answer, and the relation's negatives are the distractors.
"""
from __future__ import annotations

import torch

from relbert_ds.data.schemas import AnalogyDataset, AnalogyQuestion, RelationDataset
from relbert_ds.errors import DataError


def relation_analogy_questions(dataset: RelationDataset, distractors: int = 2, seed: int = 0) -> AnalogyDataset:
    """One question per relation: stem = positives[0], answer = positives[1], distractors = the first
    ``distractors`` negatives; the answer's position is shuffled deterministically per relation."""
    questions = []
    for index, group in enumerate(dataset.relations):
        if len(group.positives) < 2 or len(group.negatives) < 1:
            raise DataError(f"{dataset.source}: relation {group.relation_type!r} needs 2 positives and 1 negative to "
                            f"make a validation analogy question; fix: use a validation split with them, or pass "
                            f"--analogy without semeval2012")
        choices = [group.positives[1], *group.negatives[:distractors]]
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        order = torch.randperm(len(choices), generator=generator).tolist()
        shuffled = tuple(choices[i] for i in order)
        questions.append(AnalogyQuestion(stem=group.positives[0], choices=shuffled, answer=order.index(0),
                                         prefix=group.parent or ""))
    return AnalogyDataset(name=dataset.name, split=dataset.split, questions=tuple(questions), source=dataset.source)

"""Multiple-choice analogy questions: the stem's cosine with each choice, argmax, accuracy.

Ties are counted honestly. The prediction is the highest-scoring choice with the lowest index
(deterministic), but the accuracy does not credit a tie by position: a question whose top
score is shared by ``k`` choices earns ``1/k`` when the answer is one of them (the expected
accuracy of a random tie-break), else 0. Scores tie exactly only when vectors do (e.g. a
choice repeated in a question, or a model that maps many prompts to one vector), so
``n_tied`` is normally 0; ``accuracy_by_position`` is what the lowest-index rule alone gives.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np

from relbert_ds.data.schemas import AnalogyDataset, AnalogyQuestion, Pair
from relbert_ds.model.similarity import cosine

Lookup = Callable[[Sequence[Pair]], np.ndarray]  # pairs -> (n, H) vectors


@dataclass(frozen=True)
class QuestionResult:
    """How one question was answered."""

    scores: tuple[float, ...]  # cosine(stem, choice_i)
    prediction: int  # argmax, lowest index among tied maxima
    tied: tuple[int, ...]  # indices sharing the top score (length 1 without a tie)
    credit: float  # 1/len(tied) if the answer is among them, else 0


def analogy_pairs(questions: Iterable[AnalogyQuestion]) -> list[Pair]:
    """Every pair the questions need (stems and choices), duplicates kept."""
    out: list[Pair] = []
    for q in questions:
        out.append(q.stem)
        out.extend(q.choices)
    return out


def answer_question(stem: np.ndarray, choices: np.ndarray, answer: int) -> QuestionResult:
    """Score one question from its stem vector (H,) and choice vectors (k, H)."""
    scores = cosine(stem, choices)
    top = scores.max()
    tied = tuple(int(i) for i in np.flatnonzero(scores == top))
    credit = 1.0 / len(tied) if answer in tied else 0.0
    return QuestionResult(tuple(float(s) for s in scores), tied[0], tied, credit)


def answer_questions(questions: Sequence[AnalogyQuestion], lookup: Lookup) -> list[QuestionResult]:
    """Answer every question from a pair -> vector lookup (one lookup call for all pairs)."""
    vectors = lookup(analogy_pairs(questions))
    results: list[QuestionResult] = []
    offset = 0
    for q in questions:
        k = len(q.choices)
        results.append(answer_question(vectors[offset], vectors[offset + 1:offset + 1 + k], q.answer))
        offset += 1 + k
    return results


def score_analogy(dataset: AnalogyDataset, lookup: Lookup, keep_predictions: bool = False) -> dict:
    """Accuracy of one analogy split (overall and per ``prefix``) from a pair -> vector lookup.

    Returns a JSON-ready dict (see :func:`summarize`) plus ``dataset``, ``split``, ``source``
    and, with ``keep_predictions``, one record per question under ``predictions``.
    """
    return _entry(dataset, answer_questions(dataset.questions, lookup), keep_predictions)


def score_analogies(datasets: Sequence[AnalogyDataset], lookup: Lookup, keep_predictions: bool = False) -> dict:
    """:func:`score_analogy` of every split, keyed ``name/split``, plus ``name/full`` wherever a dataset
    has both a validation and a test split (SAT-full: the two pooled, as the paper reports SAT)."""
    out, answered = {}, {}
    for dataset in datasets:
        results = answer_questions(dataset.questions, lookup)
        out[f"{dataset.name}/{dataset.split}"] = _entry(dataset, results, keep_predictions)
        answered.setdefault(dataset.name, []).append((dataset, results))
    for name, parts in answered.items():
        if {d.split for d, _ in parts} >= {"validation", "test"}:
            entry = {"dataset": name, "split": "full", "source": [d.source for d, _ in parts],
                     "splits": [d.split for d, _ in parts]}
            entry.update(summarize([q for d, _ in parts for q in d.questions], [r for _, rs in parts for r in rs]))
            out[f"{name}/full"] = entry
    return out


def _entry(dataset: AnalogyDataset, results: Sequence[QuestionResult], keep_predictions: bool) -> dict:
    out = {"dataset": dataset.name, "split": dataset.split, "source": dataset.source}
    out.update(summarize(dataset.questions, results))
    if keep_predictions:
        out["predictions"] = question_records(dataset.questions, results)
    return out


def question_records(questions: Sequence[AnalogyQuestion], results: Sequence[QuestionResult]) -> list[dict]:
    """One JSON-ready record per answered question."""
    return [{"index": i, "stem": list(q.stem), "choices": [list(c) for c in q.choices], "answer": q.answer,
             "prediction": r.prediction, "tied": list(r.tied), "credit": r.credit, "scores": list(r.scores),
             "prefix": q.prefix}
            for i, (q, r) in enumerate(zip(questions, results))]


def summarize(questions: Sequence[AnalogyQuestion], results: Sequence[QuestionResult]) -> dict:
    """Accuracy numbers of answered questions (also used for SAT-full = valid + test pooled).

    ``accuracy`` credits ties by 1/k; ``n_correct`` is the summed credit; ``accuracy_by_prefix``
    groups questions by their ``prefix`` tag.
    """
    n = len(results)
    by_prefix: dict[str, list[float]] = {}
    for q, r in zip(questions, results):
        by_prefix.setdefault(q.prefix, []).append(r.credit)
    credit = sum(r.credit for r in results)
    return {
        "n_questions": n,
        "accuracy": float(credit / n) if n else float("nan"),
        "n_correct": float(credit),
        "accuracy_by_position": float(sum(r.prediction == q.answer for q, r in zip(questions, results)) / n)
        if n else float("nan"),
        "n_tied": sum(len(r.tied) > 1 for r in results),
        "accuracy_by_prefix": {p: float(sum(v) / len(v)) for p, v in sorted(by_prefix.items())},
        "n_by_prefix": {p: len(v) for p, v in sorted(by_prefix.items())},
    }

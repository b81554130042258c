"""How the encoder batches word pairs: each unique pair once, longest prompts first, fixed batches.

The plan is a pure function of the pairs, their prompt lengths and ``batch_size``:

1. the unique pairs (first occurrence order), so identical pairs get identical vectors by construction;
2. sorted by prompt token length, longest first (running out of memory happens on the first batch,
   not the last), ties by the pair itself, so the order never depends on the input order;
3. cut into batches of ``batch_size`` consecutive pairs of that order.

``RelationEncoder.encode`` runs these batches in one process; the evaluator deals the same batches to
its ranks (:mod:`relbert_ds.evaluation.sharding`), so a pair is always encoded with the same other
pairs and the same padding, and its vector is bit-identical whether 1 or 8 ranks run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

from relbert_ds.data.schemas import Pair
from relbert_ds.errors import ConfigError

Table = TypeVar("Table")  # a numpy array or a torch tensor, indexed by a list of rows


class PairRows:
    """The row of each pair in a list of unique pairs: puts a table of unique pairs back in input order."""

    def __init__(self, unique: Sequence[Sequence[str]]) -> None:
        self._row = {tuple(pair): i for i, pair in enumerate(unique)}

    def rows(self, pairs: Sequence[Sequence[str]]) -> list[int]:
        """Row of each of ``pairs`` (duplicates map to the same row)."""
        return [self._row[tuple(pair)] for pair in pairs]

    def take(self, table: Table, pairs: Sequence[Sequence[str]]) -> Table:
        """``table``'s rows for ``pairs``, in their order ((0, H) for no pairs)."""
        return table[self.rows(pairs)]


@dataclass(frozen=True)
class BatchPlan:
    """The unique pairs and the batches (row indices into them) they are encoded in, in plan order."""

    unique: tuple[Pair, ...]
    batches: tuple[tuple[int, ...], ...]

    def rows(self) -> PairRows:
        return PairRows(self.unique)


def length_order(pairs: Sequence[Pair], lengths: Sequence[int]) -> list[int]:
    """Indices of ``pairs`` sorted by prompt length (longest first), ties by the pair itself."""
    if len(pairs) != len(lengths):
        raise ValueError("one length per pair is needed")
    return sorted(range(len(pairs)), key=lambda i: (-lengths[i], pairs[i]))


def fixed_batches(order: Sequence[int], batch_size: int) -> tuple[tuple[int, ...], ...]:
    """``order`` cut into consecutive batches of ``batch_size`` (the last one shorter)."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}; fix: pass a positive batch size")
    return tuple(tuple(order[s:s + batch_size]) for s in range(0, len(order), batch_size))


def plan_batches(pairs: Sequence[Pair], prompt_lengths: Callable[[list[Pair]], list[int]],
                 batch_size: int) -> BatchPlan:
    """The batch plan of ``pairs`` (validated (head, tail) tuples); ``prompt_lengths`` gives token counts."""
    unique = list(dict.fromkeys(pairs))
    if batch_size < 1:  # before tokenizing anything
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}; fix: pass a positive batch size")
    lengths = prompt_lengths(unique) if unique else []
    return BatchPlan(tuple(unique), fixed_batches(length_order(unique, lengths), batch_size))

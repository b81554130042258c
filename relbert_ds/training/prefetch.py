"""The next micro batch, drawn and tokenized on a worker thread while the current one computes.

Drawing a rank's share of the plan and tokenizing its prompts is host work: inline, a GPU waits for
it at every micro step. :class:`MicroBatchPrefetcher` prepares the position that comes next while
the step runs (the fast tokenizers release the GIL; a GPU step waits on CUDA, not Python) and hands
it over at the next micro step. On CPU ranks it prepares inline (the trainer passes
``background=False``): there the step itself already uses every core.

What it returns is exactly what the inline path returns: the same sampler plan (a copy of the sampler
with its own caches) and the same tokenizer settings (a copy of the tokenizer: a fast tokenizer's
padding and truncation state is not safe to share between threads, and validation tokenizes on the
main thread while a prefetch may run).
"""
from __future__ import annotations

import copy
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import torch

from relbert_ds.model.encoder import RelationEncoder
from relbert_ds.training.sampler import LocalBatch, RelationAwareSampler

Position = tuple[int, int, int]  # (epoch, step in epoch, micro step)
# The rank's batch, its CPU token tensors, and every rank's row count (for the loss's one gather).
Prepared = tuple[LocalBatch, dict[str, torch.Tensor], list[int]]

__all__ = ["MicroBatchPrefetcher", "next_position"]


def next_position(position: Position, accumulation: int, steps_per_epoch: int) -> Position:
    """The micro step after ``position`` in the plan: the next micro step, else the next optimizer
    step's first (the next epoch's after the last step)."""
    epoch, step, micro = position
    if micro + 1 < accumulation:
        return epoch, step, micro + 1
    return (epoch, step + 1, 0) if step + 1 < steps_per_epoch else (epoch + 1, 0, 0)


class MicroBatchPrefetcher:
    """This rank's batch, its CPU token tensors and the ranks' row counts for a plan position,
    prepared one position ahead.

    ``get(position)`` returns the prefetched result when it is for that position (re-raising what
    the worker raised), else prepares it now; ``prefetch(position)`` starts the next one.
    """

    def __init__(self, sampler: RelationAwareSampler, encoder: RelationEncoder, background: bool = True) -> None:
        """``background`` False prepares every position when asked, in the calling thread: on CPU ranks
        the step's own compute already uses every core (torch's threads), so a worker thread would only
        time-share them, not hide work behind a device."""
        self._sampler = copy.copy(sampler)  # rebinding its caches leaves the trainer's sampler alone
        self._encoder = encoder
        self._tokenizer = copy.deepcopy(encoder.tokenizer) if background else encoder.tokenizer
        self._pool: Optional[ThreadPoolExecutor] = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="relbert-prefetch") if background else None
        self._pending: Optional[tuple[Position, Future]] = None

    def prepare(self, position: Position) -> Prepared:
        """The batch, its tokens (on the CPU) and the ranks' row counts for ``position``, computed in
        the calling thread."""
        batch = self._sampler.local_batch(*position)
        tokens = self._encoder.tokenize(batch.pairs, device=torch.device("cpu"), tokenizer=self._tokenizer)
        return batch, tokens, self._sampler.row_counts(*position)

    def get(self, position: Position) -> Prepared:
        pending, self._pending = self._pending, None
        if pending is not None:
            if pending[0] == position:
                return pending[1].result()
            pending[1].cancel()
        return self.prepare(position)

    def prefetch(self, position: Position) -> None:
        if self._pool is not None:
            self._pending = (position, self._pool.submit(self.prepare, position))

    def close(self) -> None:
        """Stop the worker (a prefetch in flight is dropped: it only read the plan and tokenized)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool, self._pending = None, None

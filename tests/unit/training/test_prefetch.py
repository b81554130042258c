"""MicroBatchPrefetcher: what it hands over is exactly the inline path's batch and tokens, at every
position (micro steps, step and epoch boundaries), prefetched or not, and a worker's error reaches
the caller."""
import pytest
import torch

from relbert_ds.model.encoder import RelationEncoder
from relbert_ds.training.prefetch import MicroBatchPrefetcher, next_position
from relbert_ds.training.sampler import RelationAwareSampler
from tests.unit.training.test_sampler import SEMEVAL


@pytest.fixture(scope="module")
def encoder(tiny_bert):
    return RelationEncoder.from_pretrained(tiny_bert)


def test_next_position_walks_micro_steps_steps_and_epochs():
    assert next_position((0, 0, 0), 2, 3) == (0, 0, 1)
    assert next_position((0, 0, 1), 2, 3) == (0, 1, 0)
    assert next_position((0, 2, 1), 2, 3) == (1, 0, 0)
    assert next_position((4, 2, 0), 1, 3) == (5, 0, 0)


def test_prefetched_batches_and_tokens_equal_the_inline_ones(encoder):
    sampler = RelationAwareSampler(SEMEVAL, world_size=3, rank=1, relations_per_step=12, accumulation=2)
    inline = RelationAwareSampler(SEMEVAL, world_size=3, rank=1, relations_per_step=12, accumulation=2)
    prefetcher = MicroBatchPrefetcher(sampler, encoder)
    position = (0, sampler.steps_per_epoch - 2, 0)  # crosses a step and an epoch boundary
    try:
        for _ in range(7):
            batch, tokens, counts = prefetcher.get(position)
            prefetcher.prefetch(next_position(position, 2, sampler.steps_per_epoch))
            want = inline.local_batch(*position)
            want_tokens = encoder.tokenize(want.pairs, device=torch.device("cpu"))
            assert batch.pairs == want.pairs and torch.equal(batch.pair_ids, want.pair_ids)
            assert (batch.epoch, batch.step, batch.micro) == position
            assert counts == [len(RelationAwareSampler(SEMEVAL, world_size=3, rank=r, relations_per_step=12,
                                                       accumulation=2).local_batch(*position)) for r in range(3)]
            assert tokens.keys() == want_tokens.keys()
            assert all(torch.equal(tokens[k], want_tokens[k]) for k in tokens)
            position = next_position(position, 2, sampler.steps_per_epoch)
        # A position other than the prefetched one (a resume, a skipped step) is prepared on the spot.
        batch, _, _ = prefetcher.get((3, 1, 1))
        assert batch.pairs == inline.local_batch(3, 1, 1).pairs
    finally:
        prefetcher.close()


def test_an_error_of_the_worker_is_raised_by_get(encoder):
    sampler = RelationAwareSampler(SEMEVAL, world_size=1, rank=0, relations_per_step=12)
    prefetcher = MicroBatchPrefetcher(sampler, encoder)
    try:
        prefetcher.prefetch((0, sampler.steps_per_epoch, 0))  # a step outside the epoch
        with pytest.raises(ValueError, match="outside the epoch"):
            prefetcher.get((0, sampler.steps_per_epoch, 0))
    finally:
        prefetcher.close()


def test_without_a_background_thread_every_position_is_prepared_on_the_spot(encoder):
    """What CPU ranks use (the step needs every core there): no worker thread, the same batches."""
    sampler = RelationAwareSampler(SEMEVAL, world_size=2, rank=0, relations_per_step=12)
    prefetcher = MicroBatchPrefetcher(sampler, encoder, background=False)
    prefetcher.prefetch((0, 1, 0))  # nothing is started
    assert prefetcher._pool is None and prefetcher._pending is None
    batch, _, counts = prefetcher.get((0, 1, 0))
    assert batch.pairs == sampler.local_batch(0, 1).pairs and counts == sampler.row_counts(0, 1)
    prefetcher.close()

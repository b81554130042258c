"""Items that the ranks of a job claim one at a time: dynamic load balancing without a coordinator.

Each claim is one atomic increment of a counter in the process group's key-value store (the
TCPStore every ``env://`` rendezvous creates; ~0.1 ms a claim on one node), so a rank that
finishes early takes the next item instead of waiting for a slow peer. Which rank runs which
item then depends on timing: use it only for items whose result does not depend on the rank
that runs them (a fixed batch of pairs; a classification probe trained on one thread).

Without a process group (one process) the queue is a local counter: the same items, in order.
"""
from __future__ import annotations

import itertools
from typing import Any, Iterator, Optional

import torch.distributed as dist

from relbert_ds.parallel.collectives import world_info

_SERIAL = itertools.count()  # every rank makes its queues in the same order (collectively): the same keys


def _default_store() -> Optional[Any]:
    """The default process group's store, or None (no process group, or a torch without the accessor)."""
    if world_info()[1] == 1:
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None


def shared_queue_available() -> bool:
    """Whether the ranks can share a :class:`WorkQueue` (one process, or a process group with a store)."""
    return world_info()[1] == 1 or _default_store() is not None


class WorkQueue:
    """Indices ``0 .. n_items - 1``, each handed to exactly one rank (a collective constructor).

    Iterating yields the indices this rank claimed, in increasing order; it stops once every
    index has been claimed by some rank.
    """

    def __init__(self, n_items: int) -> None:
        self.n_items = int(n_items)
        self.serial = next(_SERIAL)
        self.key = f"relbert_ds/work_queue/{self.serial}"
        self.store = _default_store()
        if world_info()[1] > 1 and self.store is None:
            raise RuntimeError("no key-value store to share a work queue over; check shared_queue_available() first")
        self._local = itertools.count()

    def claim(self) -> int:
        """The next unclaimed index (``>= n_items`` once all are taken)."""
        if self.store is None:
            return next(self._local)
        return int(self.store.add(self.key, 1)) - 1

    def __iter__(self) -> Iterator[int]:
        while True:
            index = self.claim()
            if index >= self.n_items:
                return
            yield index

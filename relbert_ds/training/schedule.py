"""How long a run is and how its learning rate moves: one place, used by the engine (to size the
LR schedule) and the trainer (to run the loop), so the two can never disagree.

A run is counted in *optimizer steps*. The sampler plans whole optimizer steps (gradient
accumulation splits a step, never drops one), so ``steps_per_epoch`` is the sampler's. A recipe
states either ``--max_steps`` (the first-class form at scale, where an epoch over 79 relations
is one or a few steps) or ``--epochs`` (default 10), or both (the run stops at the earlier).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

DEFAULT_EPOCHS = 10


@dataclass(frozen=True)
class StepPlan:
    """The optimizer steps of a run."""

    steps_per_epoch: int
    total_steps: int

    @property
    def epochs(self) -> int:
        """Epochs started by the run (the last one may be partial)."""
        return math.ceil(self.total_steps / self.steps_per_epoch)



def plan_steps(steps_per_epoch: int, epochs: Optional[int] = None, max_steps: Optional[int] = None) -> StepPlan:
    """``max_steps`` alone: exactly that many steps (epochs follow each other as needed);
    ``epochs`` alone (default 10): whole epochs; both: whichever ends first."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    if max_steps is not None and epochs is None:
        total = max_steps
    else:
        total = steps_per_epoch * (epochs if epochs is not None else DEFAULT_EPOCHS)
        if max_steps is not None:
            total = min(total, max_steps)
    return StepPlan(steps_per_epoch, max(1, total))


class WarmupSchedule:
    """LR factor for the optimizer step with 0-based index ``s``: linear warm-up that already
    trains on the first step ((s+1)/warmup), then constant or linear decay to 0 at the end.

    Ours rather than DeepSpeed's WarmupLR, which spends its first two steps at lr 0. A callable
    object (not a lambda), so ``LambdaLR.state_dict`` carries it into checkpoints.
    """

    def __init__(self, warmup_steps: int, kind: str, total_steps: int) -> None:
        self.warmup_steps, self.kind, self.total_steps = int(warmup_steps), kind, int(total_steps)

    def __call__(self, s: int) -> float:
        if s < self.warmup_steps:
            return (s + 1) / self.warmup_steps
        if self.kind == "linear":
            return max(0.0, (self.total_steps - s) / max(1, self.total_steps - self.warmup_steps))
        return 1.0

    def describe(self) -> str:
        tail = f"linear decay to 0 at step {self.total_steps}" if self.kind == "linear" else "constant"
        return f"{self.warmup_steps} linear warm-up steps then {tail}"

    def __repr__(self) -> str:
        return f"WarmupSchedule({self.warmup_steps}, {self.kind!r}, {self.total_steps})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WarmupSchedule) and vars(self) == vars(other)

"""``--dry_run``: the batch plan of a run at any world size, without a model or ranks.

Prints what the sampler and the engine would do (the global batch, the micro steps, the prompts
each rank encodes per step, the steps per epoch and in all) so a recipe can be checked for 64
or 512 GPUs on a laptop. Reads only the training data and the DeepSpeed JSON.
"""
from __future__ import annotations

import json
from typing import Any

from relbert_ds.parallel import distributed
from relbert_ds.training.config import RunConfig
from relbert_ds.training.engine import load_ds_config, resolve_batch
from relbert_ds.training.schedule import plan_steps


def batch_plan(run: RunConfig, world_size: int) -> dict[str, Any]:
    """The plan as a dict (what :func:`print_plan` prints); raises the run's own ConfigErrors."""
    from relbert_ds.data.training_sources import load_train_data
    from relbert_ds.training.sampler import RelationAwareSampler

    d = run.data
    data, weights = load_train_data(d.train_data, d.train_split, d.train_weights, d.train_weights_mode)
    ds, source = load_ds_config(run.deepspeed_config)
    batch = resolve_batch(ds, source, d.relations_per_step, world_size, d.relations_per_rank)
    sampler = RelationAwareSampler(data, world_size=world_size, rank=0, relations_per_step=batch.relations_per_step,
                                   accumulation=batch.accumulation, positives_per_relation=d.positives_per_relation,
                                   negatives_per_relation=d.negatives_per_relation, seed=d.seed, tail=d.tail,
                                   parent_grouping=d.parent_grouping, shard_by=d.shard_by, relation_weights=weights)
    steps = plan_steps(sampler.steps_per_epoch, run.train.epochs, run.train.max_steps)
    plan = sampler.describe()
    sizes = [n for micro in plan["prompts_per_rank_first_step"] for n in micro]
    return {"training_data": data.source, "relations": len(data), **plan,
            "prompts_per_rank_min": min(sizes), "prompts_per_rank_max": max(sizes),
            "total_steps": steps.total_steps, "epochs": steps.epochs, "notes": list(batch.notes),
            "deepspeed_triad": dict(zip(("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                         "train_batch_size"), batch.deepspeed_triad))}


def print_plan(run: RunConfig) -> dict[str, Any]:
    """Print the plan for ``--world_size`` (or this job's world size) on one rank; return it."""
    world = run.train.world_size or distributed.discover().world_size
    plan = distributed.agree(lambda: batch_plan(run, world))
    if distributed.env_rank() == 0:
        per_rank = plan["prompts_per_rank_first_step"]
        print(f"dry run: {plan['relations']} relations from {plan['training_data']}; global batch "
              f"{plan['relations_per_step']} relations = {plan['prompts_per_step']} prompts per optimizer step, "
              f"{plan['accumulation']} micro step(s), over {world} rank(s) (shard_by {plan['shard_by']})")
        print(f"prompts per rank per micro step: {plan['prompts_per_rank_min']}-{plan['prompts_per_rank_max']} "
              f"(first step: {per_rank[0][:16]}{' ...' if world > 16 else ''})")
        print(f"steps: {plan['steps_per_epoch']} per epoch, {plan['total_steps']} in all ({plan['epochs']} epoch(s))")
        for note in plan["notes"]:
            print(f"note: {note}")
        print(json.dumps(plan))
    return plan

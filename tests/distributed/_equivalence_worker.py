"""One rank of the world-size equivalence test: the real engine path (resolve config, ZeRO-3
construction context, deepspeed.initialize) on this rank's share of one global batch.

Usage: ``torchrun --nproc_per_node W _equivalence_worker.py MODEL_DIR OUT_DIR CASES``, CASES a
JSON list of ``[scenario, loss, stage]``. One launch runs every case (a multi-rank launch costs
more in imports than all its cases together); rank 0 saves ``OUT_DIR/w<W>.pt`` holding, per case
key ``"<scenario>/<loss>/zero<stage>"``, the loss value and every parameter's full gradient.

The scenarios (:data:`SCENARIOS`) are shared with the test, which computes the one-process
reference over :meth:`RelationAwareSampler.global_batch` of the same plan.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Sampler knobs per scenario (the SemEval-2012 training split; epoch 0, step 0):
# - "prompt": 4 relations x (4 positives + 3 negatives) = 28 prompts, prompt sharding: groups
#   span ranks and, at 3 and 8 ranks, ranks hold unequal prompt counts;
# - "relation": the same batch kept in whole groups (4 groups on 3 ranks: 2, 1, 1);
# - "edge": 3 relations x (2 + 2) = 12 prompts; on 8 ranks (2,2,2,2,1,1,1,1 prompts) ranks 1
#   and 3 hold only negatives, ranks 4 and 5 a single positive whose partner is on the other,
#   ranks 6 and 7 a single negative.
SCENARIOS: dict[str, dict[str, Any]] = {
    "prompt": dict(relations_per_step=4, positives_per_relation=4, negatives_per_relation=3, seed=7,
                   parent_grouping=True, shard_by="prompt"),
    "relation": dict(relations_per_step=4, positives_per_relation=4, negatives_per_relation=3, seed=7,
                     parent_grouping=True, shard_by="relation"),
    "edge": dict(relations_per_step=3, positives_per_relation=2, negatives_per_relation=2, seed=3,
                 parent_grouping=True, shard_by="prompt"),
}


def make_sampler(scenario: str, world_size: int = 1, rank: int = 0):
    from relbert_ds.data import load_relation_dataset
    from relbert_ds.training.sampler import RelationAwareSampler

    data = load_relation_dataset("semeval2012", "train")
    return RelationAwareSampler(data, world_size=world_size, rank=rank, **SCENARIOS[scenario])


def case_key(scenario: str, loss_name: str, stage: int) -> str:
    return f"{scenario}/{loss_name}/zero{stage}"


def run_case(model_dir: str, out_dir: Path, scenario: str, loss_name: str, stage: int, info: Any) -> dict:
    """One engine, one forward and backward of this rank's share; full grads on rank 0."""
    from deepspeed.utils import safe_get_full_grad

    from relbert_ds.model.encoder import RelationEncoder
    from relbert_ds.parallel import distributed
    from relbert_ds.training.config import RunConfig
    from relbert_ds.training.engine import initialize_engine, model_construction_context, resolve_deepspeed_config
    from relbert_ds.training.losses import build_loss
    from relbert_ds.training.trainer import RelationTrainingModule

    knobs = SCENARIOS[scenario]
    run = RunConfig()
    run.train.loss = loss_name
    run.data.relations_per_step = knobs["relations_per_step"]
    path = out_dir / f"ds{stage}.json"
    if info.rank == 0 and not path.exists():
        path.write_text(json.dumps({"zero_optimization": {"stage": stage}, "gradient_clipping": 0.0}))
    distributed.barrier()
    run.deepspeed_config = str(path)
    resolved = resolve_deepspeed_config(run.deepspeed_config, run, info.world_size, 10)
    sampler = make_sampler(scenario, info.world_size, info.rank)
    torch.manual_seed(0)
    with model_construction_context(resolved):
        encoder = RelationEncoder.from_pretrained(model_dir, warn_untrained=False)
        module = RelationTrainingModule(encoder, build_loss(loss_name, hidden_size=encoder.hidden_size))
    engine = initialize_engine(module, resolved)
    batch = sampler.local_batch(0, 0)
    tokens = encoder.tokenize(batch.pairs, device=engine.device)
    out = engine(**tokens, relation_ids=batch.relation_ids, is_positive=batch.is_positive,
                 parent_ids=batch.parent_ids, pair_ids=batch.pair_ids)
    engine.backward(out.loss)
    grads = {}
    for name, param in engine.module.named_parameters():
        grad = safe_get_full_grad(param)  # a collective under ZeRO-3: every rank calls it
        if info.rank == 0 and grad is not None:
            grads[name] = grad.detach().cpu().clone()
    engine.destroy()
    return {"value": out.value, "grads": grads, "n_local": len(batch)}


def main(model_dir: str, out_dir: str, cases: str) -> None:
    from relbert_ds.parallel import distributed

    torch.set_num_threads(1)
    info = distributed.init_distributed()
    results = {}
    for scenario, loss_name, stage in json.loads(cases):
        results[case_key(scenario, loss_name, stage)] = run_case(model_dir, Path(out_dir), scenario, loss_name,
                                                                 int(stage), info)
    if info.rank == 0:
        torch.save(results, Path(out_dir) / f"w{info.world_size}.pt")
    distributed.barrier()
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])

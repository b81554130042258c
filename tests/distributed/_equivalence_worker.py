"""One rank of the equivalence test: the real engine path (resolve config, ZeRO-3 construction
context, deepspeed.initialize), one micro step of the sampler's batch, full gradients saved."""
import json
import sys
from pathlib import Path

import torch


def main(model_dir: str, stage: int, loss_name: str, out_dir: str) -> None:
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from relbert_ds import distributed
    from relbert_ds.config import RunConfig
    from relbert_ds.data import load_relation_dataset
    from relbert_ds.encoder import RelationEncoder
    from relbert_ds.engine import initialize_engine, model_construction_context, resolve_deepspeed_config
    from relbert_ds.losses import build_loss
    from relbert_ds.sampler import RelationAwareSampler
    from relbert_ds.trainer import RelationTrainingModule

    torch.set_num_threads(1)
    info = distributed.init_distributed()
    run = RunConfig()
    run.train.loss = loss_name
    path = Path(out_dir) / f"ds{stage}.json"
    if info.rank == 0:
        path.write_text(json.dumps({"zero_optimization": {"stage": stage}, "gradient_clipping": 0.0}))
    distributed.barrier()
    run.deepspeed_config = str(path)
    run.data.relations_per_rank = 3
    resolved = resolve_deepspeed_config(run.deepspeed_config, run, info.world_size, 10)
    data = load_relation_dataset("semeval2012", "train")
    sampler = RelationAwareSampler(data, world_size=info.world_size, rank=info.rank, relations_per_rank=3,
                                   positives_per_relation=4, negatives_per_relation=3, seed=7, parent_grouping=True)
    torch.manual_seed(0)
    with model_construction_context(resolved):
        encoder = RelationEncoder.from_pretrained(model_dir)
        module = RelationTrainingModule(encoder, build_loss(loss_name, hidden_size=encoder.hidden_size))
    engine = initialize_engine(module, resolved)
    batch = sampler.local_batch(0, 0)
    tokens = encoder.tokenize(batch.pairs, device=engine.device)
    out = engine(**tokens, relation_ids=batch.relation_ids, is_positive=batch.is_positive,
                 parent_ids=batch.parent_ids, pair_ids=batch.pair_ids)
    engine.backward(out.loss)
    grads = {}
    for name, param in engine.module.named_parameters():
        grad = safe_get_full_grad(param)  # collective under ZeRO-3: every rank calls it
        if info.rank == 0 and grad is not None:
            grads[name] = grad.detach().cpu().clone()
    if info.rank == 0:
        torch.save({"value": out.value, "grads": grads}, Path(out_dir) / f"stage{stage}_{loss_name}.pt")
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])

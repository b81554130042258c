"""The export: a Hugging Face folder of the trained encoder (``RelationEncoder.from_pretrained`` loads it),
its loss head when the loss has parameters, ``relbert_ds_training.json`` (the run's record) and a model card
written from that record.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from relbert_ds.model.encoder import RelationEncoder
from relbert_ds.parallel import distributed
from relbert_ds.training.config import RunConfig, write_json
from relbert_ds.training.engine import ResolvedDeepSpeed

BACKBONE_PREFIX = "encoder.backbone."  # RelationTrainingModule's names of the backbone's parameters
LOSS_PREFIX = "loss."
LOSS_HEAD_FILE = "relbert_ds_loss_head.safetensors"
TRAINING_RECORD_FILE = "relbert_ds_training.json"


def consolidated_state_dict(module: torch.nn.Module) -> Optional[dict[str, torch.Tensor]]:
    """Full CPU state dict of ``module`` on rank 0 (None elsewhere), any ZeRO stage.

    Under ZeRO-3 each parameter is gathered on its own (a collective on every rank), so the
    peak extra memory is one parameter, not the whole model.
    """
    import deepspeed

    state = module.state_dict()  # buffers are whole; ZeRO-3 parameters are empty placeholders here
    out: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if distributed.is_main():
                out[name] = param.detach().cpu().clone()
    if not distributed.is_main():
        return None
    for name, value in state.items():
        if name not in out:
            out[name] = value.detach().cpu().clone()
    return out


def training_record(run: RunConfig, resolved: ResolvedDeepSpeed, world_size: int, optimizer_steps: int,
                    epoch_results: Optional[dict], best: Optional[dict]) -> dict[str, Any]:
    """What the export records of its run (``relbert_ds_training.json``; the model card is written from it)."""
    schedule = resolved.schedule
    return {**run.to_dict(), "deepspeed": resolved.config, "world_size": world_size,
            "relations_per_step": resolved.relations_per_step, "optimizer_steps": optimizer_steps,
            "schedule": f"{schedule.describe()} (relbert-ds)" if schedule is not None else None,
            "validation_results": epoch_results, "best": best}


def write_export(folder: Path, encoder: RelationEncoder, state: dict[str, torch.Tensor], record: dict[str, Any],
                 relbert_compatible: bool) -> None:
    """Rank 0: the export's files into ``folder`` (a temporary folder that then replaces the export)."""
    from relbert_ds.publish.model_card import build_card

    backbone_state = {k[len(BACKBONE_PREFIX):]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}
    encoder.save_pretrained(folder, state_dict=backbone_state, relbert_compatible=relbert_compatible)
    head = {k: v.contiguous() for k, v in state.items() if k.startswith(LOSS_PREFIX)}
    if head:
        from safetensors.torch import save_file

        save_file(head, str(folder / LOSS_HEAD_FILE))
    write_json(folder / TRAINING_RECORD_FILE, record)
    (folder / "README.md").write_text(build_card(record, template=encoder.template))

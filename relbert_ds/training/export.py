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


def consolidated_state_dict(module: torch.nn.Module, optimizer: Any = None) -> Optional[dict[str, torch.Tensor]]:
    """Full CPU state dict of ``module`` on rank 0 (None elsewhere), any ZeRO stage, parameters in fp32.

    The parameters are the optimizer's fp32 master weights, not the bf16/fp16 copies the forward
    runs on: an export of a mixed-precision run then loads (and evaluates) like its checkpoint,
    whose weights ``zero_to_fp32`` rebuilds from the same masters. ``optimizer`` is the engine's
    (needed for ZeRO-0 with 16-bit weights, whose masters live in DeepSpeed's FP16 optimizer
    wrappers; ZeRO 1-3 link each parameter to its master). Every parameter is one collective on
    every rank (the same order everywhere), so the peak extra memory is one parameter.
    """
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    state = module.state_dict()  # buffers are whole; ZeRO-3 parameters are empty placeholders here
    masters = _zero0_master_weights(optimizer)
    out: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        master = masters.get(id(param))
        if master is None:
            master = safe_get_full_fp32_param(param)  # ZeRO 1-3: a collective; None for ZeRO-0 or frozen
        if master is not None:
            if distributed.is_main():
                shape = getattr(param, "ds_shape", param.shape)
                out[name] = master.detach().float().reshape(shape).cpu().clone()
            continue
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if distributed.is_main():
                out[name] = param.detach().cpu().clone()
    if not distributed.is_main():
        return None
    for name, value in state.items():
        if name not in out:
            out[name] = value.detach().cpu().clone()
    return {name: _as_fp32(value) for name, value in out.items()}


def _as_fp32(value: torch.Tensor) -> torch.Tensor:
    # A parameter that only ever existed in 16 bits (frozen, or a 16-bit buffer) is widened
    # losslessly, so that the export has one dtype and transformers loads it as fp32.
    return value.float() if value.is_floating_point() and value.dtype != torch.float64 else value


def _zero0_master_weights(optimizer: Any) -> dict[int, torch.Tensor]:
    """ZeRO-0 with bf16/fp16: each trainable parameter's fp32 master, keyed by ``id(param)``.

    DeepSpeed wraps the optimizer in FP16_UnfusedOptimizer (``fp16_groups`` / ``fp32_groups``:
    lists of tensors, parameter for parameter) or FP16_Optimizer (``fp32_groups_flat``: one flat
    fp32 tensor per group, laid out as ``fp16_groups``). Any other optimizer: no masters here.
    """
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    masters: dict[int, torch.Tensor] = {}
    if isinstance(optimizer, FP16_UnfusedOptimizer):
        for params, fp32 in zip(optimizer.fp16_groups, optimizer.fp32_groups):
            masters.update({id(p): m for p, m in zip(params, fp32)})
    elif isinstance(optimizer, FP16_Optimizer):
        from torch._utils import _unflatten_dense_tensors

        for params, flat in zip(optimizer.fp16_groups, optimizer.fp32_groups_flat):
            masters.update({id(p): m for p, m in zip(params, _unflatten_dense_tensors(flat, params))})
    return masters


def training_record(run: RunConfig, resolved: ResolvedDeepSpeed, world_size: int, optimizer_steps: int,
                    epoch_results: Optional[dict], best: Optional[dict]) -> dict[str, Any]:
    """What the export records of its run (``relbert_ds_training.json``; the model card is written from it)."""
    schedule = resolved.schedule
    return {**run.to_dict(), "deepspeed": resolved.config, "precision": resolved.precision, "world_size": world_size,
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

"""Pooling of the backbone's last hidden states into one relation vector per prompt.

This is the one place that pools. ``average`` and ``average_no_mask`` take the *mean* of
the selected token vectors. The public relbert code takes their *sum*; cosine similarity
(analogy, nce/iloob) is identical either way, but a sum makes Euclidean distances (the
triplet margin) grow with prompt length, so a margin of 1 would mean different things for
long and short pairs. The mean keeps the margin comparable across pairs and backbones.
"""
from __future__ import annotations

import torch

POOLING_MODES = ("average_no_mask", "average", "mask", "last")
DEFAULT_POOLING = "average_no_mask"


def token_weights(input_ids: torch.Tensor, attention_mask: torch.Tensor, mode: str,
                  mask_token_id: int | None) -> torch.Tensor:
    """(B, L) 0/1 weights of the tokens that ``mode`` pools.

    average: every non-padding token, special tokens included; average_no_mask: the same
    without the mask token(s); mask: the mask token(s) only; last: the last non-padding
    token (for decoder-only LMs, whose last position has attended to the whole prompt).
    """
    keep = attention_mask.bool()
    if mode == "average":
        selected = keep
    elif mode == "average_no_mask":
        selected = keep if mask_token_id is None else keep & (input_ids != mask_token_id)
    elif mode == "mask":
        if mask_token_id is None:
            raise ValueError("pooling 'mask' needs a tokenizer with a mask token")
        selected = keep & (input_ids == mask_token_id)
    elif mode == "last":
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        # The highest attended position: right padding and left padding both work.
        last = torch.where(keep, positions, torch.full_like(positions, -1)).max(dim=1).values
        selected = positions == last.unsqueeze(1)
    else:
        raise ValueError(f"unknown pooling mode {mode!r}; choose one of {', '.join(POOLING_MODES)}")
    return selected.to(dtype=torch.float32)


def pool(hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, mode: str,
         mask_token_id: int | None) -> torch.Tensor:
    """(B, L, H) hidden states -> (B, H) relation vectors in fp32 (fp64 stays fp64), whatever the model's dtype.

    The mean is taken in fp32 so that bf16/fp16 training does not round the relation vectors to
    16 bits (8 bits of mantissa in bf16) before the loss, which computes in fp32.
    """
    if hidden.dtype != torch.float64:
        hidden = hidden.float()
    weights = token_weights(input_ids, attention_mask, mode, mask_token_id).to(hidden.dtype)
    counts = weights.sum(dim=1, keepdim=True).clamp_min(1.0)
    return torch.einsum("bl,blh->bh", weights, hidden) / counts

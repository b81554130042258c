"""Tensor and object collectives of relbert-ds (pure ``torch.distributed``).

Every function degrades to a no-op when ``torch.distributed`` is not initialised or the
world has a single rank, so the same loss code runs in a plain ``python`` process, in a
test, and inside a DeepSpeed engine. Works with gloo (CPU tensors) and nccl (CUDA tensors):
the small bookkeeping tensors (sizes, scalars) are created on the device the backend needs.

Collectives must be called by *every* rank in the same order; none of these functions has a
rank-dependent early return (an empty local tensor still takes part in the gather).
"""
from __future__ import annotations

import warnings
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

# torch marks the autograd all_gather as deprecated in favour of the functional collectives,
# but it is the documented, backend-agnostic (gloo + nccl) differentiable gather; silence
# only that one message so that it does not print on every training step.
warnings.filterwarnings(
    "ignore",
    message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated",
    category=FutureWarning,
)

__all__ = [
    "world_info",
    "is_distributed",
    "gather_sizes",
    "gather_rows",
    "all_gather_with_grad",
    "all_gather_no_grad",
    "all_reduce_sum",
    "all_gather_object",
]


def world_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group; ``(0, 1)`` if there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialised."""
    return world_info()[1] > 1


def _comm_device(preferred: Optional[torch.device] = None) -> torch.device:
    """A device the backend can communicate on: ``preferred`` unless nccl needs CUDA."""
    if dist.get_backend() == "nccl":  # nccl only moves CUDA tensors
        if preferred is not None and preferred.type == "cuda":
            return preferred
        return torch.device("cuda", torch.cuda.current_device())
    return preferred if preferred is not None else torch.device("cpu")


def gather_sizes(n: int, device: Optional[torch.device] = None) -> list[int]:
    """First-dimension sizes of every rank, in rank order (``[n]`` without a process group).

    ``device`` is where the tiny size tensor lives (the data tensor's device is the right
    choice); under nccl a CPU device is replaced by the current CUDA device.
    """
    _, world = world_info()
    if world == 1:
        return [n]
    mine = torch.tensor([n], dtype=torch.long, device=_comm_device(device))
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine)
    return [int(t.item()) for t in everyone]


def _pad_rows(x: Tensor, rows: int) -> Tensor:
    """``x`` with zero rows appended up to ``rows`` (differentiable: ``cat`` keeps autograd)."""
    if x.shape[0] == rows:
        return x
    pad = x.new_zeros((rows - x.shape[0],) + tuple(x.shape[1:]))
    return torch.cat([x, pad], dim=0)


def _strip_and_concat(parts: Sequence[Tensor], sizes: Sequence[int]) -> Tensor:
    """Drop each rank's padding rows and concatenate in rank order."""
    return torch.cat([p[:s] for p, s in zip(parts, sizes)], dim=0)


def all_gather_with_grad(x: Tensor, sizes: Optional[Sequence[int]] = None) -> Tensor:
    """Concatenate ``x`` (n_r, ...) of all ranks along dim 0, in rank order, with autograd.

    Backward: the gradient that reaches the local ``x`` is the *sum over ranks* of the
    gradients of that rank's copy of it (torch's all_gather backward is a reduce-scatter
    with SUM). First dims may differ between ranks: sizes are gathered (or taken from
    ``sizes`` when the caller already has them), every rank pads to the largest, and the
    padding is stripped after the gather. Without a multi-rank process group it returns
    ``x`` itself.
    """
    _, world = world_info()
    if world == 1:
        return x
    # Imported here: torch.distributed.nn pulls in RPC machinery we do not need at import.
    import torch.distributed.nn.functional as dist_fn

    sizes = list(sizes) if sizes is not None else gather_sizes(x.shape[0], x.device)
    padded = _pad_rows(x.contiguous(), max(sizes)).contiguous()
    parts = dist_fn.all_gather(padded)  # tuple of world tensors (max_n, ...)
    return _strip_and_concat(parts, sizes)


def _all_gather_single(out: Tensor, x: Tensor) -> None:
    # torch 2.13 renames all_gather_into_tensor (deprecated there); older torch has only that name.
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, x)


def _reduce_scatter_single(out: Tensor, x: Tensor) -> None:
    (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(out, x)


class _GatherRows(torch.autograd.Function):
    """Every rank's rows of ``x`` (float, with autograd) and ``ids`` (int64, none) in ONE collective.

    Forward: each rank packs its rows as bytes, ``x`` in ``payload`` dtype then its ids, pads to the
    largest rank's row count and all-gathers one flat tensor; the padding is dropped. Backward: the
    gradient of the gathered rows, in ``x``'s dtype (fp32: the sum over ranks is not rounded), is
    reduce-scattered (SUM) back to the ranks that own them, which is the sum over ranks of each
    rank's gradient for this rank's rows, as torch's autograd all_gather gives.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, ids: Tensor, sizes: tuple[int, ...],
                payload: torch.dtype) -> tuple[Tensor, Tensor]:
        world, rows = len(sizes), max(sizes)
        n, width = x.shape
        device = _comm_device(x.device)
        send_x = x.detach().to(device=device, dtype=payload).contiguous()
        send_ids = ids.to(device=device, dtype=torch.int64).contiguous()
        x_bytes, id_bytes = width * send_x.element_size(), 8 * ids.shape[1]
        packed = torch.zeros(rows, x_bytes + id_bytes, dtype=torch.uint8, device=device)
        packed[:n, :x_bytes] = send_x.view(torch.uint8).reshape(n, x_bytes)
        packed[:n, x_bytes:] = send_ids.view(torch.uint8).reshape(n, id_bytes)
        out = packed.new_empty(world * rows, packed.shape[1])
        _all_gather_single(out, packed)
        keep = torch.cat([torch.arange(r * rows, r * rows + s, device=device) for r, s in enumerate(sizes)])
        out = out[keep]
        emb = out[:, :x_bytes].contiguous().view(payload).reshape(-1, width).to(device=x.device, dtype=x.dtype)
        gathered_ids = out[:, x_bytes:].contiguous().view(torch.int64).reshape(-1, ids.shape[1]).to(ids.device)
        ctx.save_for_backward(keep)
        ctx.shape, ctx.rows, ctx.world, ctx.device = (n, width), rows, world, x.device
        ctx.mark_non_differentiable(gathered_ids)
        return emb, gathered_ids

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _grad_ids: Optional[Tensor]) -> tuple[Optional[Tensor], None, None, None]:
        (keep,) = ctx.saved_tensors
        (n, width), rows = ctx.shape, ctx.rows
        device = _comm_device(grad.device)
        padded = torch.zeros(ctx.world * rows, width, dtype=grad.dtype, device=device)
        padded[keep] = grad.to(device)
        mine = padded.new_empty(rows, width)
        _reduce_scatter_single(mine, padded)
        return mine[:n].to(ctx.device), None, None, None


def gather_rows(x: Tensor, ids: Tensor, sizes: Optional[Sequence[int]] = None,
                payload: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """``x`` (n_r, d) and ``ids`` (n_r, k) of every rank concatenated in rank order, in one
    collective: ``x`` with autograd (backward: one reduce-scatter), ``ids`` without.

    ``sizes``: every rank's row count when the caller knows them (the batch plan does), else they
    are gathered first. ``payload``: the dtype ``x`` travels in (e.g. bf16 under bf16 training: half
    the bytes of fp32); the result is ``x``'s dtype again. Without a multi-rank process group it
    returns ``x`` itself and ``ids``.
    """
    rank, world = world_info()
    if world == 1:
        return x, ids
    sizes = tuple(int(s) for s in sizes) if sizes is not None else tuple(gather_sizes(x.shape[0], x.device))
    if len(sizes) != world or sizes[rank] != x.shape[0]:
        raise ValueError(f"row counts {list(sizes)} do not fit this rank's {x.shape[0]} rows of {world} ranks")
    return _GatherRows.apply(x, ids, sizes, payload or x.dtype)


def all_gather_no_grad(x: Tensor, sizes: Optional[Sequence[int]] = None) -> Tensor:
    """Like :func:`all_gather_with_grad` but outside autograd (for id and label tensors).

    The result never requires grad and lives on ``x``'s device (under nccl a CPU tensor
    travels through the current CUDA device). Bool tensors are sent as uint8 (not every
    backend handles bool) and converted back.
    """
    _, world = world_info()
    if world == 1:
        return x.detach()
    sizes = list(sizes) if sizes is not None else gather_sizes(x.shape[0], x.device)
    with torch.no_grad():
        is_bool = x.dtype == torch.bool
        send = x.detach().to(_comm_device(x.device))
        send = send.to(torch.uint8) if is_bool else send
        padded = _pad_rows(send.contiguous(), max(sizes)).contiguous()
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        out = _strip_and_concat(parts, sizes).to(x.device)
    return out.bool() if is_bool else out


def all_reduce_sum(x: Tensor) -> Tensor:
    """Element-wise sum of ``x`` over ranks, outside autograd (a new detached tensor)."""
    if not is_distributed():
        return x.detach().clone()
    out = x.detach().to(_comm_device(x.device)).clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(x.device)


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order, on every rank (``[obj]`` without a process group).

    Also a barrier: no rank returns before every rank has sent its object.
    """
    _, world = world_info()
    if world == 1:
        return [obj]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered

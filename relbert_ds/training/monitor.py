"""What a training run reports: TensorBoard scalars and projector (rank 0), the progress bar,
throughput, FLOP/s and MFU, peak memory.

relbert-ds writes its own tags (``train/*``, ``val/*``) with a rank-0 SummaryWriter; it does not
enable DeepSpeed's monitor, which in DeepSpeed 0.19 logs only the learning rate, so no tag is
written twice.
"""
from __future__ import annotations

import resource
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from relbert_ds.parallel import collectives

# Dense bf16/fp16 tensor-core peaks (FLOP/s) of common training GPUs, by name fragment.
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A10G": 125e12, "L40S": 362e12, "L4": 121e12,
                  "V100": 125e12, "A6000": 155e12, "4090": 165e12}
# Their fp32 peaks without tensor cores (what fp32 matmuls get with TF32 off, torch's default):
# 1/15 of the bf16 figure on an H100, not 1/2. V100 has no TF32.
GPU_FP32_PEAK_FLOPS = {"H200": 67e12, "H100": 67e12, "A100": 19.5e12, "A10G": 31.2e12, "L40S": 91.6e12,
                       "L4": 30.3e12, "V100": 15.7e12, "A6000": 38.7e12, "4090": 82.6e12}


def model_flops_per_token(num_params: int, num_layers: int, hidden: int, seq_len: float,
                          training: bool = True) -> float:
    """FLOPs per token: 2N (forward) + 4N (backward) for the weights, plus attention scores
    (QK^T and AV: 2 x 2 x seq x hidden per layer and token, forward).

    The PaLM/nanoGPT estimate, with N the matmul parameters (:func:`matmul_parameters`).
    """
    forward = 2 * num_params + 4 * num_layers * seq_len * hidden
    return 3 * forward if training else forward


def matmul_parameters(module: torch.nn.Module) -> int:
    """Parameters that do matmul work per token: all but embedding tables (a lookup is free).

    Counts ZeRO-3 partitioned parameters by their full size (``ds_numel``).
    """
    def numel(p: torch.nn.Parameter) -> int:
        return int(getattr(p, "ds_numel", p.numel()))

    embedding = sum(numel(p) for m in module.modules() if isinstance(m, torch.nn.Embedding)
                    for p in m.parameters(recurse=False))
    return sum(numel(p) for p in module.parameters()) - embedding


def measure_matmul_peak(dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 8) -> float:
    """Achieved FLOP/s of a square matmul on this device with the current thread count."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # A private generator: measuring must not move the global RNG (dropout masks after a resume).
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, dtype=dtype, device=device, generator=generator)
    b = torch.randn(size, size, dtype=dtype, device=device, generator=generator)
    a @ b  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def device_peak_flops(user_tflops: Optional[float], precision: str) -> tuple[float, str]:
    """Per-device peak FLOP/s for MFU and where the figure comes from."""
    if user_tflops:
        return user_tflops * 1e12, "given by --peak_tflops"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, peak in GPU_PEAK_FLOPS.items():
            if key in name:
                if precision in ("bf16", "fp16"):
                    return peak, f"datasheet {precision} peak of {name}"
                if key != "V100" and torch.backends.cuda.matmul.allow_tf32:
                    return peak / 2, f"datasheet TF32 peak of {name} (fp32 matmuls run in TF32)"
                return GPU_FP32_PEAK_FLOPS[key], f"datasheet fp32 peak of {name} (TF32 off)"
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16 if precision == "fp16" else torch.float32
        return measure_matmul_peak(dtype, 4096), f"measured matmul peak of {name}"
    threads = torch.get_num_threads()
    return measure_matmul_peak(torch.float32), f"measured fp32 matmul peak of this CPU ({threads} threads)"


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a host clock read next times the work itself.

    CUDA kernels run asynchronously: unread, the forward's time shows up in the backward's or the
    optimizer's. A no-op on CPU, whose work is done when the call returns.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_bytes() -> int:
    """Peak memory of this process: GPU allocations on CUDA, else the resident set size."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss_kib * (1 if sys.platform == "darwin" else 1024))


class TrainingMonitor:
    """Rank 0's TensorBoard writer and progress (a bar on a terminal, plain lines in a log:
    :class:`relbert_ds.progress.Progress`); a no-op on other ranks."""

    def __init__(self, log_dir: Optional[Path], enabled: bool, total_steps: int, initial_step: int = 0) -> None:
        self.enabled = enabled
        self.writer = None
        self.bar = None
        if not enabled:
            return
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir))
        from relbert_ds.progress import Progress

        self.bar = Progress(total_steps, "train", unit="step", initial=initial_step, dynamic_ncols=True,
                            mininterval=1.0)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def progress(self, steps: int, postfix: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.update(steps, postfix)

    def embeddings(self, step: int, vectors: torch.Tensor, labels: Sequence[Sequence[str]], header: Sequence[str],
                   tag: str) -> None:
        """Vectors with label columns for TensorBoard's projector."""
        if self.writer is not None:
            self.writer.add_embedding(vectors, metadata=[list(row) for row in labels], metadata_header=list(header),
                                      global_step=step, tag=tag)

    def write(self, message: str) -> None:
        if self.enabled:
            if self.bar is not None:
                self.bar.write(message)
            else:
                print(message, file=sys.stderr)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        """Flush and close the bar and the writer (a second call does nothing)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class StepMeter:
    """Accumulates the micro steps of one optimizer step into its history record: loss and metrics,
    pairs and real tokens (summed over ranks), throughput, TFLOP/s and MFU, peak memory, timings."""

    def __init__(self) -> None:
        self.values: list[float] = []
        self.metrics: dict[str, list[float]] = {}
        self.pairs = 0
        self.tokens = 0
        self.seconds = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
        self.skipped = False  # DeepSpeed skipped the update (fp16 overflow, non-finite gradient norm)
        self.start = time.perf_counter()  # a step's clock starts at its first micro step

    def add(self, out: Any, pairs: int, tokens: int) -> None:
        """One micro step: ``out`` is its LossOutput (``value`` and ``metrics``)."""
        self.values.append(out.value)
        for k, v in out.metrics.items():
            self.metrics.setdefault(k, []).append(v)
        self.pairs += pairs
        self.tokens += tokens

    def time(self, **seconds: float) -> None:
        for k, v in seconds.items():
            self.seconds[k] += v

    def close(self, engine: Any, step: int, epoch: int, world: int, num_params: int, layers: int, hidden: int,
              peak: float, lr: float) -> dict[str, Any]:
        counts = torch.tensor([self.pairs, self.tokens], dtype=torch.float64)
        pairs, tokens = collectives.all_reduce_sum(counts).tolist()
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        seq = tokens / max(pairs, 1)
        flops = tokens * model_flops_per_token(num_params, layers, hidden, seq)
        grad_norm = engine.get_global_grad_norm()
        record = {"kind": "step", "optimizer_step": step, "epoch": epoch,
                  "loss": sum(self.values) / len(self.values), "lr": lr,
                  "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                  "pairs_per_s": pairs / elapsed, "tokens_per_s": tokens / elapsed,
                  "tflops_per_device": flops / elapsed / world / 1e12,
                  "mfu": (flops / elapsed / world / peak) if peak else 0.0,
                  "peak_memory_mb": peak_memory_bytes() / 2**20, "step_seconds": elapsed,
                  "update_skipped": self.skipped,
                  **{f"{k}_seconds": v for k, v in self.seconds.items()}}
        for k, v in self.metrics.items():
            record[k] = sum(v) / len(v)
        return record

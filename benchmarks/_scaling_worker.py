#!/usr/bin/env python
"""One rank of ``benchmarks/scaling.py`` (started by torchrun): trains a few optimizer steps through the
real :class:`relbert_ds.training.trainer.Trainer` and records, per step, the trainer's own timings plus every
collective this process issued, counted and timed by a shim around ``torch.distributed``.

The shim is installed before anything imports DeepSpeed, so DeepSpeed's communication layer
(``deepspeed.comm``, whose torch backend captures ``all_gather_into_tensor``/``reduce_scatter_tensor``
when it is created) and relbert-ds's loss gather (``relbert_ds.parallel.collectives`` ->
``torch.distributed.nn.functional.all_gather``) both go through it. No library file is changed.

Each collective is filed under a *source* read from the call stack and the *phase* the trainer was in
(engine forward, backward, optimizer step, or other):

- ``gather_fwd``: the embedding all-gather of the loss (autograd forward);
- ``gather_bwd``: its backward (a reduce-scatter; gloo emulates it with one scatter per rank);
- ``gather_ids``: the sizes and id gathers next to it (a few integers per prompt);
- ``loss_stats``: the loss's small all-reduces of counts and metrics;
- ``deepspeed``: everything DeepSpeed issues (gradient reduction, parameter all-gather, norms);
- ``trainer``: the trainer's own bookkeeping (pairs/tokens counts, stop flag).

Bytes follow the NCCL-tests convention of "size": the whole logical buffer of the collective on this
rank (all-gather: its output; all-reduce, reduce, broadcast: the tensor; reduce-scatter: its input;
gloo's scatter-based reduce-scatter: the root's full send list, counted on the root only). Seconds are
wall time of the blocking call (gloo collectives are synchronous), so they include waiting for the
slowest rank.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Collectives of torch.distributed worth counting (point-to-point and object collectives are not
# used on the training path; barrier moves no payload).
_OPS = ("all_gather", "all_gather_into_tensor", "all_gather_single", "_all_gather_base", "all_gather_coalesced",
        "all_reduce", "all_reduce_coalesced", "reduce", "reduce_scatter", "reduce_scatter_tensor",
        "reduce_scatter_single", "_reduce_scatter_base",
        "broadcast", "scatter", "gather", "all_to_all", "all_to_all_single")


def _nbytes(obj: Any) -> int:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o) for o in obj)
    return 0


class CommMeter:
    """Counts calls, bytes and seconds of every collective, keyed by (source, phase, op)."""

    def __init__(self) -> None:
        self.stats: dict[tuple[str, str, str], list[float]] = defaultdict(lambda: [0, 0, 0.0])
        self.phase = "other"
        self._depth = 0  # only the outermost collective counts (one may call another)

    # ------------------------------------------------------------------ bookkeeping
    def snapshot(self) -> dict[tuple[str, str, str], list[float]]:
        return {k: list(v) for k, v in self.stats.items()}

    def diff(self, before: dict) -> list[dict[str, Any]]:
        """Per-key calls, bytes, seconds since ``before`` (keys with no calls left out)."""
        out = []
        for key, (calls, nbytes, secs) in self.stats.items():
            c0, b0, s0 = before.get(key, [0, 0, 0.0])
            if calls - c0:
                out.append({"source": key[0], "phase": key[1], "op": key[2], "calls": int(calls - c0),
                            "bytes": int(nbytes - b0), "seconds": secs - s0})
        return out

    # ------------------------------------------------------------------ classification
    @staticmethod
    def _source() -> str:
        frame = sys._getframe(2)  # 0: here, 1: the shim, 2: whoever called the collective
        seen: set[str] = set()
        while frame is not None:
            name = frame.f_code.co_filename.replace("\\", "/")
            func = frame.f_code.co_name
            if name.endswith("torch/distributed/nn/functional.py"):
                # The gather's backward runs inside engine.backward (on gloo as an autograd all-to-all
                # whose forward issues the scatters), its forward inside engine.forward.
                return "gather_bwd" if func == "backward" or METER.phase == "backward" else "gather_fwd"
            if name.endswith("relbert_ds/parallel/collectives.py") and func in ("forward", "backward"):
                # the loss's one gather of rows and ids (collectives._GatherRows) and its backward
                return "gather_fwd" if func == "forward" else "gather_bwd"
            if name.endswith("relbert_ds/training/losses.py"):
                return "loss_stats" if "all_reduce_sum" in seen else "gather_ids"  # gather_ids: the sizes
            if "/deepspeed/" in name and "/deepspeed/comm/" not in name:
                return "deepspeed"
            if name.endswith(("relbert_ds/training/trainer.py", "relbert_ds/parallel/distributed.py",
                              "relbert_ds/training/checkpointing.py")):
                return "trainer"
            if name.endswith("relbert_ds/parallel/collectives.py"):
                seen.add(func)  # the collective's name; who called it decides the class
            frame = frame.f_back
        return "other"

    def _payload(self, op: str, args: tuple, kwargs: dict) -> int:
        import torch.distributed as dist

        first = args[0] if args else next(iter(kwargs.values()), None)
        if op in ("all_gather", "all_gather_coalesced", "all_gather_into_tensor", "all_gather_single",
                  "_all_gather_base"):
            return _nbytes(args[0] if args else kwargs.get("tensor_list", kwargs.get("output_tensor")))
        if op in ("reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single", "_reduce_scatter_base"):
            src = args[1] if len(args) > 1 else \
                kwargs.get("input_list", kwargs.get("input", kwargs.get("input_tensor")))
            return _nbytes(src)
        if op == "scatter":
            src_rank = args[2] if len(args) > 2 else kwargs.get("src", 0)
            send = args[1] if len(args) > 1 else kwargs.get("scatter_list")
            return _nbytes(send) if dist.get_rank() == src_rank else 0
        if op in ("all_to_all", "all_to_all_single"):
            return _nbytes(args[1] if len(args) > 1 else kwargs.get("input_tensor_list", kwargs.get("input")))
        return _nbytes(first)

    def wrap(self, op: str, fn: Callable) -> Callable:
        meter = self

        def counted(*args: Any, **kwargs: Any) -> Any:
            if meter._depth:
                return fn(*args, **kwargs)
            meter._depth += 1
            try:
                key = (meter._source(), meter.phase, op)
                payload = meter._payload(op, args, kwargs)
                start = time.perf_counter()
                result = fn(*args, **kwargs)
                if kwargs.get("async_op") and result is not None:  # count the wait too
                    result.wait()
                entry = meter.stats[key]
                entry[0] += 1
                entry[1] += payload
                entry[2] += time.perf_counter() - start
                return result
            finally:
                meter._depth -= 1

        counted.__wrapped__ = fn  # type: ignore[attr-defined]
        return counted

    def install(self) -> None:
        """Replace the collectives in ``torch.distributed`` (and its c10d module) by counting ones."""
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        for op in _OPS:
            original = getattr(c10d, op, None) or getattr(dist, op, None)
            if original is None:
                continue
            counted = self.wrap(op, original)
            for module in (dist, c10d):
                if hasattr(module, op):
                    setattr(module, op, counted)


METER = CommMeter()


def _phase(name: str, fn: Callable) -> Callable:
    def timed(*args: Any, **kwargs: Any) -> Any:
        previous, METER.phase = METER.phase, name
        try:
            return fn(*args, **kwargs)
        finally:
            METER.phase = previous

    return timed


def build_run(args: argparse.Namespace) -> Any:
    from benchmarks.arms import measurement_run

    # A fixed peak_tflops: no matmul peak measured per run.
    return measurement_run(args.deepspeed_config, args.model, args.output_dir, dropout=0.0,
                           relations_per_step=args.relations_per_step,
                           positives_per_relation=args.positives_per_relation,
                           negatives_per_relation=args.negatives_per_relation, max_steps=args.steps,
                           threads=args.threads, peak_tflops=args.peak_tflops)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--deepspeed_config", required=True)
    p.add_argument("--relations_per_step", type=int, required=True)
    p.add_argument("--positives_per_relation", type=int, default=8)
    p.add_argument("--negatives_per_relation", type=int, default=8)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--peak_tflops", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--result", required=True, help="JSON written by each rank: <result>.rank<r>.json")
    args = p.parse_args()

    METER.install()  # before DeepSpeed's comm backend exists
    from relbert_ds.cli.common import setup_logging
    from relbert_ds.training.trainer import Trainer

    setup_logging(False)
    import logging

    logging.getLogger("relbert_ds").setLevel(logging.WARNING)
    trainer = Trainer(build_run(args)).prepare()
    engine = trainer.engine
    engine.forward = _phase("forward", engine.forward)
    engine.backward = _phase("backward", engine.backward)
    engine.step = _phase("step", engine.step)

    steps = []
    for _ in range(args.steps):
        before = METER.snapshot()
        record = trainer.train_step()
        steps.append({**{k: v for k, v in record.items() if isinstance(v, (int, float))},
                      "collectives": METER.diff(before)})
    trainer.monitor.close()
    import torch

    plan = trainer.sampler.describe()
    info = trainer.setup.info
    trainable = sum(int(getattr(q, "ds_numel", q.numel())) for q in engine.module.parameters() if q.requires_grad)
    document = {"rank": info.rank, "world_size": info.world_size, "backend": info.backend,
                "hidden_size": int(trainer.encoder.hidden_size), "parameters": int(trainer.setup.num_parameters),
                "trainable_parameters": trainable, "zero_stage": trainer.setup.resolved.zero_stage,
                "precision": trainer.setup.resolved.precision, "torch_threads": torch.get_num_threads(),
                "prompts_per_step": plan["prompts_per_step"],
                "prompts_per_rank": plan["prompts_per_rank_first_step"][0], "steps": steps}
    Path(f"{args.result}.rank{info.rank}.json").write_text(json.dumps(document, indent=1) + "\n")
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())

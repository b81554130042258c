#!/usr/bin/env python
"""Host work of the batch plan per optimizer step at 8, 64 and 512 simulated ranks.

    python benchmarks/host_planning.py                 # 5,000 relations, 8 relations per rank per step

One rank's sampler (``RelationAwareSampler``, rank r of N; no process group is needed: the plan is a
pure function of the position) over a synthetic dataset of ``--relations`` relations (``--positives``
and ``--negatives`` pairs each, groups of 8 + 8 prompts), ``--relations_per_rank`` relations per rank
per step (the global batch grows with the ranks, as a weak-scaling job's does). Two arms, interleaved
step by step on the same sampler positions:

- **whole plan** (before): every rank draws every group of the global step and flattens the micro
  batch to slice its rows (``batch_from_groups(micro_plan(...), rows=rank_rows(...)[rank])``);
- **own groups** (``local_batch``, now): the rank's rows from the running totals of group sizes
  (known without drawing), only the groups they touch drawn.

Each timed call starts on a sampler whose step cache is cold (a fresh step), over several epochs, so
the epoch permutation and the last step's fill are counted where they fall. Reported: ms per step
(median and max over steps and the sampled ranks) per arm and the ratio, and the mean of ten times
as many steps of the new path back to back (no other arm between them: warm caches).

Tokenization (``--prompts_per_rank``, default 128 256 512: a GPU micro batch): ms to tokenize one
micro batch with the bundled backbone's fast tokenizer, and how much of it the trainer's prefetcher
(``relbert_ds.training.prefetch``) hides behind a step: ``--gpu_step_ms`` (20) of simulated device
time per micro step (a sleep, which releases the GIL as a CUDA synchronize does), run with the
batch prepared inline and prefetched, interleaved. Results: ``benchmarks/results/host_planning.json``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world_sizes", type=int, nargs="+", default=[8, 64, 512])
    p.add_argument("--relations", type=int, default=5000)
    p.add_argument("--positives", type=int, default=20, help="positive pairs per relation in the data")
    p.add_argument("--negatives", type=int, default=20, help="negative pairs per relation in the data")
    p.add_argument("--relations_per_rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=12, help="optimizer steps timed per world size and rank")
    p.add_argument("--prompts_per_rank", type=int, nargs="+", default=[128, 256, 512])
    p.add_argument("--gpu_step_ms", type=float, default=20.0, help="simulated device time per micro step")
    p.add_argument("--output", default=None)
    return p


def synthetic(n: int, positives: int, negatives: int) -> Any:
    from relbert_ds.data.schemas import RelationDataset, RelationGroup

    groups = tuple(RelationGroup(f"R{r}", tuple((f"h{r}_{i}", f"t{r}_{i}") for i in range(positives)),
                                 tuple((f"nh{r}_{i}", f"nt{r}_{i}") for i in range(negatives)))
                   for r in range(n))
    return RelationDataset(name="synthetic", split="train", relations=groups)


def whole_plan(sampler: Any, epoch: int, step: int) -> Any:
    """The former local_batch: the global micro batch drawn and flattened, this rank's rows kept."""
    groups = sampler.micro_plan(epoch, step, 0)
    return sampler.batch_from_groups(groups, epoch, step, 0, rows=sampler.rank_rows(groups)[sampler.rank])


def measure(data: Any, world: int, args: argparse.Namespace) -> dict[str, Any]:
    from relbert_ds.training.sampler import RelationAwareSampler

    per_step = args.relations_per_rank * world
    ranks = sorted({0, world // 2, world - 1})
    times: dict[str, list[float]] = {"whole_plan": [], "own_groups": []}
    rows = set()
    for rank in ranks:
        samplers = {arm: RelationAwareSampler(data, world_size=world, rank=rank, relations_per_step=per_step)
                    for arm in times}
        steps = samplers["own_groups"].steps_per_epoch
        for k in range(args.steps):
            epoch, step = divmod(k, steps)
            for arm, sampler in samplers.items():  # interleaved: both arms see the same machine state
                start = time.perf_counter()
                batch = whole_plan(sampler, epoch, step) if arm == "whole_plan" else sampler.local_batch(epoch, step)
                times[arm].append(time.perf_counter() - start)
            rows.add(len(batch))
    summary = {arm: {"median_ms": 1e3 * statistics.median(t), "max_ms": 1e3 * max(t), "n": len(t)}
               for arm, t in times.items()}
    # The same steps back to back without the other arm in between (warm caches: what the figure is
    # when the step's other host work is small).
    alone = RelationAwareSampler(data, world_size=world, rank=world // 2, relations_per_step=per_step)
    start = time.perf_counter()
    for k in range(args.steps * 10):
        alone.local_batch(*divmod(k, steps))
    summary["own_groups_alone_mean_ms"] = 1e3 * (time.perf_counter() - start) / (args.steps * 10)
    return {"world_size": world, "relations_per_step": per_step, "ranks_sampled": ranks, "prompts_per_rank":
            sorted(rows), "steps_per_epoch": steps, **summary,
            "ratio_median": summary["own_groups"]["median_ms"] / summary["whole_plan"]["median_ms"]}


def tokenization(data: Any, prompts: int, args: argparse.Namespace) -> dict[str, Any]:
    """Tokenizing one micro batch of ``prompts`` prompts, inline and behind a simulated device step."""
    from relbert_ds.model.encoder import RelationEncoder
    from relbert_ds.training.prefetch import MicroBatchPrefetcher, next_position
    from relbert_ds.training.sampler import RelationAwareSampler

    encoder = RelationEncoder.from_pretrained("all-MiniLM-L6-v2")
    sampler = RelationAwareSampler(data, world_size=1, rank=0, relations_per_step=prompts // 16)
    cpu = __import__("torch").device("cpu")
    alone = []
    for k in range(args.steps):
        batch = sampler.local_batch(0, k)
        start = time.perf_counter()
        encoder.tokenize(batch.pairs, device=cpu)
        alone.append(time.perf_counter() - start)
    prefetcher = MicroBatchPrefetcher(sampler, encoder)
    walls: dict[str, list[float]] = {"inline": [], "prefetched": []}
    position = (0, 0, 0)
    try:
        for k in range(args.steps):
            for arm in walls:  # interleaved
                start = time.perf_counter()
                if arm == "inline":
                    encoder.tokenize(sampler.local_batch(*position).pairs, device=cpu)
                else:
                    prefetcher.get(position)
                    prefetcher.prefetch(next_position(position, 1, sampler.steps_per_epoch))
                time.sleep(args.gpu_step_ms / 1e3)  # the device step
                walls[arm].append(time.perf_counter() - start)
            position = next_position(position, 1, sampler.steps_per_epoch)
    finally:
        prefetcher.close()
    inline, prefetched = (1e3 * statistics.median(walls[a][1:]) for a in walls)
    return {"prompts": prompts, "tokenize_ms": 1e3 * statistics.median(alone), "step_inline_ms": inline,
            "step_prefetched_ms": prefetched, "gpu_step_ms": args.gpu_step_ms,
            "hidden_fraction": (inline - prefetched) / max(inline - args.gpu_step_ms, 1e-9)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    from benchmarks import common

    args = build_parser().parse_args(argv)
    head = common.header("host_planning", argv if argv is not None else sys.argv[1:])
    data = synthetic(args.relations, args.positives, args.negatives)
    rows = [measure(data, world, args) for world in args.world_sizes]
    table = common.markdown_table(
        ["ranks", "relations / step", "whole plan ms (median / max)", "own groups ms (median / max)", "ratio",
         "own groups alone ms (mean)"],
        [[r["world_size"], r["relations_per_step"],
          f"{r['whole_plan']['median_ms']:.2f} / {r['whole_plan']['max_ms']:.2f}",
          f"{r['own_groups']['median_ms']:.3f} / {r['own_groups']['max_ms']:.3f}", r["ratio_median"],
          r["own_groups_alone_mean_ms"]] for r in rows],
        digits=3)
    tokens = [tokenization(data, n, args) for n in args.prompts_per_rank]
    table += "\n" + common.markdown_table(
        ["prompts / micro step", "tokenize ms", f"step ms inline (device {args.gpu_step_ms:g} ms)",
         "step ms prefetched", "share of tokenization hidden"],
        [[t["prompts"], t["tokenize_ms"], t["step_inline_ms"], t["step_prefetched_ms"],
          f"{100 * t['hidden_fraction']:.0f}%"] for t in tokens], digits=2)
    common.emit(table, Path(args.output or common.default_output("host_planning")),
                {**head, "config": vars(args), "rows": rows, "tokenization": tokens})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""ZeRO-2's gradient reduction, DeepSpeed's default against the shipped configs, side by side in one run.

DeepSpeed 0.19's ZeRO-2 reduces each gradient bucket with one all-reduce when
``use_multi_rank_bucket_allreduce`` is true (its default): every rank receives every partition's sum
and keeps its own, twice the bytes a reduce-scatter moves. ds_configs/zero2.json sets it false: each
slice is reduced to the rank that owns its partition (``dist.reduce``), the reduce-scatter ZeRO-2
needs. Both arms run ``benchmarks/scaling.py`` (the real trainer, a collective-counting shim) on the
same ranks, data and seed; reported per rank per step: payload bytes and calls of the gradient
reduction, the bytes a ring algorithm sends for them (``scaling.wire_factor``), and the per-step
losses of both arms (the same sums in another order).

    python benchmarks/zero2_reduction.py --model all-MiniLM-L6-v2 --world_sizes 2 4
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common  # noqa: E402

SHIPPED = common.REPO / "ds_configs" / "zero2.json"


def arms(work: Path) -> dict[str, Path]:
    """The shipped config and the same with DeepSpeed's default bucketed all-reduce."""
    default = json.loads(SHIPPED.read_text())
    default["zero_optimization"]["use_multi_rank_bucket_allreduce"] = True
    work.mkdir(parents=True, exist_ok=True)
    (work / "zero2_allreduce.json").write_text(json.dumps(default, indent=2))
    return {"allreduce (DeepSpeed default)": work / "zero2_allreduce.json", "reduce to owner (shipped)": SHIPPED}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--world_sizes", type=int, nargs="+", default=[2, 4])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--work_dir", default="runs/zero2_reduction")
    p.add_argument("--output", default="benchmarks/results/zero2_reduction.json")
    args = p.parse_args(argv)
    work = Path(args.work_dir)
    results: dict[str, Any] = {}
    for name, config in arms(work).items():
        out = work / (config.stem + ".json")
        subprocess.run([sys.executable, "benchmarks/scaling.py", "--model", args.model, "--deepspeed_config",
                        str(config), "--world_sizes", *map(str, args.world_sizes), "--steps", str(args.steps),
                        "--relations_per_step", "8", "--work_dir", str(work / config.stem), "--output", str(out),
                        "--markdown", "", "--figure", ""],
                       check=True, cwd=str(common.REPO), env=common.rank_env())
        results[name] = {m["world_size"]: m for m in json.loads(out.read_text())["measured"]}
    (before, a), (after, b) = results.items()
    rows = []
    for n in args.world_sizes:
        ga, gb = a[n]["bytes"]["gradient_allreduce"], b[n]["bytes"]["gradient_allreduce"]
        rows.append({"world_size": n, "payload_bytes_per_rank": [ga["bytes_per_rank"], gb["bytes_per_rank"]],
                     "calls_per_step": [ga["calls_per_step"], gb["calls_per_step"]],
                     "ring_bytes_sent_per_rank": [ga["ring_bytes_sent_per_rank"], gb["ring_bytes_sent_per_rank"]],
                     "ring_bytes_ratio": gb["ring_bytes_sent_per_rank"] / ga["ring_bytes_sent_per_rank"],
                     "max_loss_difference": max(abs(x - y) for x, y in zip(a[n]["loss_per_step"],
                                                                           b[n]["loss_per_step"]))})
    doc = {**common.header("zero2_reduction", argv), "arms": [before, after], "model": args.model,
           "rows": rows}
    common.write_json(Path(args.output), doc)
    for r in rows:
        print(f"{r['world_size']} ranks: gradient bytes sent per rank per step {r['ring_bytes_sent_per_rank'][0]:,.0f} "
              f"-> {r['ring_bytes_sent_per_rank'][1]:,.0f} ({r['ring_bytes_ratio']:.2f}x), calls "
              f"{r['calls_per_step'][0]:.0f} -> {r['calls_per_step'][1]:.0f}, losses within "
              f"{r['max_loss_difference']:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

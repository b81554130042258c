#!/usr/bin/env python
"""Data-parallel scaling at a fixed global batch: measured on CPU ranks, then modelled for GPUs.

MEASURED. The real trainer (``Trainer(run).prepare()`` / ``train_step()``, DeepSpeed ZeRO-2 by
default, gloo, fp32) trains the same global batch (``--relations_per_step`` relations x (positives +
negatives) prompts, SemEval-2012, dropout 0) on 1, 2, 4 and 8 ranks started with torchrun
(``benchmarks/_scaling_worker.py``). On a machine with fewer cores than ranks the ranks are
OVERSUBSCRIBED (the JSON and the table say so): their compute then shares the cores, and collective
times include waiting for descheduled ranks, so the CPU figures show the mechanics (what is sent,
how the step splits), not the speed of a cluster. Per optimizer step (median of the timed steps,
step 1 excluded as warm-up) the step time is split into:

- encode forward: tokenizing, the encoder and the loss, without the loss's collectives;
- encode backward: the backward pass without collectives;
- embedding gather: the loss's one all-gather of the prompt embeddings with their ids (forward; the
  row counts come from the batch plan, no size exchange) and its reduce-scatter (backward);
- gradient all-reduce: DeepSpeed's reduction of the gradients (ZeRO-2 on gloo: one all-reduce);
- parameter all-gather: ZeRO-2's all-gather of the updated parameter partitions (in the step);
- optimizer: DeepSpeed's step without its collectives; other: the rest of the step's wall time.

Every collective is counted by a shim around ``torch.distributed`` installed in the worker before
DeepSpeed starts (no library file changes): calls, bytes and seconds per step, per rank. Bytes are
compared with the formulas: gather = prompts x (hidden x 4 + 32) bytes per rank (fp32 embeddings and
four int64 ids per row; under bf16 training hidden x 2 + 32), its backward prompts x hidden x 4 (the
gradient is reduced in fp32), gradient all-reduce = trainable parameters x 4 bytes, parameter
all-gather = parameters x 4 bytes.

MODEL (not a measurement). From the measured byte formulas and the measured tokens per prompt, the
step time of roberta-large and a 7B decoder on 8, 64 and 512 GPUs (``--gpus``) is modelled as
compute (training FLOPs / (peak x assumed MFU)) + optimizer (Adam over the ZeRO-2 shard, memory
bound) + the embedding gather (forward all-gather + backward reduce-scatter) + ZeRO-2's gradient
reduce-scatter and parameter all-gather (bf16 by default: ``--grad_bytes 2``), each collective by the
ring formula ((N-1)/N x size / bus bandwidth + latency), with no overlap of communication and
compute (an upper bound on the communication share). Bus bandwidth: NVLink within a node of
``--gpus_per_node``; between nodes the node's NICs. Weak scaling keeps ``--model_prompts_per_gpu``
per GPU; strong scaling keeps ``--model_global_prompts`` in total; efficiencies are against one GPU
running the same per-GPU (weak) or global (strong) batch without communication.

    python benchmarks/scaling.py                # 1, 2, 4, 8 ranks, MiniLM, 32 relations per step
    python benchmarks/scaling.py --quick --model <tiny model folder>   # smoke test: 1 and 2 ranks
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

WORKER = "benchmarks/_scaling_worker.py"
PARTS = ("encode_forward", "encode_backward", "embedding_gather", "gradient_allreduce", "parameter_allgather",
         "optimizer", "other")
PART_LABEL = {"encode_forward": "encode fwd", "encode_backward": "encode bwd", "embedding_gather": "emb. gather",
              "gradient_allreduce": "grad all-reduce", "parameter_allgather": "param all-gather",
              "optimizer": "optimizer", "other": "other"}
# The modelled backbones: sizes from their public config.json files (as benchmarks/memory.py).
MODELLED = {"roberta-large": "roberta-large", "7B decoder": "llama-7b (7B decoder)"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("measured (CPU ranks)")
    m.add_argument("--world_sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    m.add_argument("--model", default="all-MiniLM-L6-v2", help="backbone of the measured runs (default: bundled)")
    m.add_argument("--relations_per_step", type=int, default=32, help="the fixed global batch (relations)")
    m.add_argument("--positives_per_relation", type=int, default=4)
    m.add_argument("--negatives_per_relation", type=int, default=4)
    m.add_argument("--steps", type=int, default=3, help="optimizer steps per world size (the first is warm-up)")
    m.add_argument("--deepspeed_config", default="ds_configs/zero2.json")
    m.add_argument("--threads", type=int, default=1,
                   help="torch threads per rank (default 1: N ranks want N cores; beyond the cores they share)")
    m.add_argument("--timeout", type=float, default=600, help="seconds allowed per world size")
    m.add_argument("--reuse", action="store_true",
                   help="reuse the measurements kept in --work_dir from an earlier run with the same settings "
                        "(re-render the tables, model and figure without training again)")
    m.add_argument("--quick", action="store_true",
                   help="smoke test: 1 and 2 ranks, 8 relations per step, 2 steps (pass a tiny --model)")
    g = p.add_argument_group("model (GPUs; assumptions, not measurements)")
    g.add_argument("--gpus", type=int, nargs="+", default=[8, 64, 512])
    g.add_argument("--gpus_per_node", type=int, default=8)
    g.add_argument("--peak_tflops", type=float, default=989.0, help="per-GPU dense bf16 peak (H100 SXM: 989)")
    g.add_argument("--mfu", type=float, default=0.40, help="assumed model FLOPs utilisation of the compute")
    g.add_argument("--nvlink_GBps", type=float, default=900.0,
                   help="NVLink bandwidth per GPU, both directions (H100: 900 GB/s); a ring uses half")
    g.add_argument("--inter_node_Gbps", type=float, default=400.0, help="inter-node bandwidth per NIC (Gb/s)")
    g.add_argument("--nics_per_node", type=int, default=1, help="NICs per node (DGX H100: 8; default 1, pessimistic)")
    g.add_argument("--latency_us", type=float, default=10.0, help="per-step latency of a collective (tree: x log2 N)")
    g.add_argument("--hbm_TBps", type=float, default=3.35, help="GPU memory bandwidth for the Adam step (H100: 3.35)")
    g.add_argument("--grad_bytes", type=int, default=2, help="bytes per gradient/parameter element on the wire "
                                                              "(bf16: 2; fp32: 4 as measured on CPU)")
    g.add_argument("--model_prompts_per_gpu", type=int, default=128, help="weak scaling: prompts per GPU")
    g.add_argument("--model_global_prompts", type=int, default=4096, help="strong scaling: prompts in total")
    g.add_argument("--model_tokens_per_prompt", type=float, default=None,
                   help="default: the mean measured in the CPU runs")
    g.add_argument("--prompts_per_group", type=int, default=16,
                   help="prompts of one relation in a step (8 positives + 8 negatives): sizes the relations a "
                        "step needs")
    g.add_argument("--dataset_relations", type=int, default=79,
                   help="relations the training data has (SemEval-2012: 79)")
    g.add_argument("--host_results", default="benchmarks/results/host_planning.json",
                   help="measured host work per step (benchmarks/host_planning.py); absent: none assumed")
    g.add_argument("--small_collectives", type=int, default=4,
                   help="latency-bound collectives per step besides the named ones (loss statistics, DeepSpeed's "
                        "overflow check and gradient norm)")
    o = p.add_argument_group("output")
    o.add_argument("--work_dir", default="runs/benchmarks/scaling")
    o.add_argument("--output", default=None, help="results JSON (default benchmarks/results/scaling.json)")
    o.add_argument("--markdown", default="docs/SCALING.md", help="the markdown page ('' for none)")
    o.add_argument("--figure", default="docs/figures/scaling.png", help="the figure ('' for none)")
    return p


# --------------------------------------------------------------------------- measuring


def measure_world_size(args: argparse.Namespace, world: int) -> dict[str, Any]:
    """Start ``world`` ranks with torchrun; return every rank's JSON document (also kept in
    ``<work_dir>/ws<N>/measurement.json``, which ``--reuse`` reads instead of running again)."""
    work = Path(args.work_dir) / f"ws{world}"
    saved = work / "measurement.json"
    if args.reuse and saved.exists():
        run = json.loads(saved.read_text())
        if run.get("settings") == _settings(args):
            print(f"reusing {saved}", file=sys.stderr, flush=True)
            return run
    work.mkdir(parents=True, exist_ok=True)
    result = work / "result"
    for old in work.glob("result.rank*.json"):
        old.unlink()
    worker_args = ["--model", args.model, "--deepspeed_config", args.deepspeed_config,
                   "--relations_per_step", str(args.relations_per_step),
                   "--positives_per_relation", str(args.positives_per_relation),
                   "--negatives_per_relation", str(args.negatives_per_relation), "--steps", str(args.steps),
                   "--threads", str(args.threads), "--output_dir", str(work / "run"), "--result", str(result)]
    cmd = common.launch_cmd(WORKER, worker_args, world, "torchrun")
    with common.Phase() as phase:
        common.run(cmd, timeout=args.timeout, echo=True, log_path=work / "log.txt")
    ranks = [json.loads((work / f"result.rank{r}.json").read_text()) for r in range(world)]
    run = {"world_size": world, "command": " ".join(cmd), "wall_s": phase.record["seconds"],
           "loadavg_before": phase.record["loadavg_before"], "loadavg_after": phase.record["loadavg_after"],
           "settings": _settings(args), "ranks": ranks}
    saved.write_text(json.dumps(run) + "\n")
    return run


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """What a measurement depends on (a reused one must match)."""
    return {k: getattr(args, k) for k in ("model", "relations_per_step", "positives_per_relation",
                                          "negatives_per_relation", "steps", "deepspeed_config", "threads")}


def wire_factor(op: str, world: int) -> float:
    """Bytes one rank sends per byte of a collective's payload (the shim's ``bytes``), for the ring
    algorithms NCCL uses: an all-reduce is a reduce-scatter plus an all-gather, 2(N-1)/N; a reduce to
    one rank, a reduce-scatter, an all-gather (payload: the output) and a broadcast, (N-1)/N each."""
    if world < 2:
        return 0.0
    share = (world - 1) / world
    return 2 * share if op in ("all_reduce", "all_reduce_coalesced") else share


def _collective_parts(step: dict[str, Any], world: int = 1) -> dict[str, dict[str, float]]:
    """One rank's step: seconds, bytes (payload, and sent on a ring: ``wire``) and calls per reported part,
    plus per phase."""
    parts = {k: {"seconds": 0.0, "bytes": 0, "wire": 0.0, "calls": 0} for k in
             ("gather_fwd", "gather_bwd", "gather_ids", "gradient_allreduce", "parameter_allgather", "small")}
    in_phase = {"forward": 0.0, "backward": 0.0, "step": 0.0, "other": 0.0}
    for c in step["collectives"]:
        src, op = c["source"], c["op"]
        if src in ("gather_fwd", "gather_bwd", "gather_ids"):
            key = src
        elif src == "deepspeed" and op.startswith("all_gather") and c["phase"] == "step":
            key = "parameter_allgather"
        elif src == "deepspeed" and c["bytes"] >= 1024 and ("reduce" in op):
            key = "gradient_allreduce"
        else:
            key = "small"  # loss statistics, counts, DeepSpeed's overflow/norm scalars
        parts[key]["seconds"] += c["seconds"]
        parts[key]["bytes"] += c["bytes"]
        parts[key]["wire"] += c["bytes"] * wire_factor(op, world)
        parts[key]["calls"] += c["calls"]
        in_phase[c["phase"]] += c["seconds"]
    parts["_phase"] = in_phase  # type: ignore[assignment]
    return parts


def split_step(step: dict[str, Any]) -> dict[str, float]:
    """The step's wall time split into :data:`PARTS` (seconds), from one rank's record."""
    c = _collective_parts(step)
    ph = c["_phase"]
    gather = c["gather_fwd"]["seconds"] + c["gather_bwd"]["seconds"] + c["gather_ids"]["seconds"]
    out = {"encode_forward": step["forward_seconds"] - ph["forward"],
           "encode_backward": step["backward_seconds"] - ph["backward"],
           "embedding_gather": gather,
           "gradient_allreduce": c["gradient_allreduce"]["seconds"],
           "parameter_allgather": c["parameter_allgather"]["seconds"],
           "optimizer": step["optimizer_seconds"] - ph["step"]}
    # Collectives not in the named parts (small ones, in any phase) stay in "other".
    out["other"] = step["step_seconds"] - sum(out.values())
    return out


def summarise(run: dict[str, Any], warmup: int) -> dict[str, Any]:
    """Median over the timed steps of the rank-mean of each part; bytes per rank per step."""
    world = run["world_size"]
    ranks = run["ranks"]
    timed = [i for i in range(len(ranks[0]["steps"])) if i >= warmup] or [len(ranks[0]["steps"]) - 1]
    parts = {k: statistics.median(statistics.fmean(split_step(r["steps"][i])[k] for r in ranks) for i in timed)
             for k in PARTS}
    step_s = statistics.median(statistics.fmean(r["steps"][i]["step_seconds"] for r in ranks) for i in timed)
    r0 = ranks[0]
    prompts, hidden = r0["prompts_per_step"], r0["hidden_size"]
    nbytes: dict[str, Any] = {}
    # each timed step of each rank classified once
    classified = [[_collective_parts(r["steps"][i], world) for i in timed] for r in ranks]
    for key in ("gather_fwd", "gather_bwd", "gather_ids", "gradient_allreduce", "parameter_allgather", "small"):
        per_rank = [statistics.fmean(parts[key]["bytes"] for parts in steps) for steps in classified]
        wire = [statistics.fmean(parts[key]["wire"] for parts in steps) for steps in classified]
        calls = statistics.fmean(parts[key]["calls"] for parts in classified[0])
        nbytes[key] = {"bytes_per_rank": statistics.fmean(per_rank), "min_rank": min(per_rank),
                       "max_rank": max(per_rank), "calls_per_step": calls,
                       "ring_bytes_sent_per_rank": statistics.fmean(wire)}
    max_rows = max(r0["prompts_per_rank"]) if r0["prompts_per_rank"] else 0
    # The forward gather carries each row's embedding (fp32 here) and its 4 int64 ids in one tensor.
    formula = {"gather_fwd": prompts * (hidden * 4 + 32), "gather_bwd": prompts * hidden * 4,
               "gradient_allreduce": r0["trainable_parameters"] * 4, "parameter_allgather": r0["parameters"] * 4,
               "gather_padded": world * max_rows * (hidden * 4 + 32)}
    if world == 1:  # one rank: no collective runs at all
        formula = {k: 0 for k in formula}
    steps0 = [r0["steps"][i] for i in timed]
    tokens_per_prompt = statistics.fmean(s["tokens_per_s"] / s["pairs_per_s"] for s in steps0)
    return {"world_size": world, "step_s": step_s, "parts_s": parts,
            "pairs_per_s": statistics.median(s["pairs_per_s"] for s in steps0), "tokens_per_prompt": tokens_per_prompt,
            "loss_per_step": [s["loss"] for s in r0["steps"]], "bytes": nbytes, "formula_bytes": formula,
            "prompts_per_step": prompts, "prompts_per_rank": r0["prompts_per_rank"], "hidden_size": hidden,
            "parameters": r0["parameters"], "trainable_parameters": r0["trainable_parameters"],
            "zero_stage": r0["zero_stage"], "precision": r0["precision"], "backend": r0["backend"],
            "torch_threads_per_rank": r0["torch_threads"], "timed_steps": [i + 1 for i in timed],
            "wall_s": run["wall_s"], "loadavg_before": run["loadavg_before"], "loadavg_after": run["loadavg_after"]}


def byte_checks(summaries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Measured bytes per rank per step against the formulas (relative error)."""
    checks = []
    for s in summaries:
        if s["world_size"] == 1:
            continue
        for key in ("gather_fwd", "gather_bwd", "gradient_allreduce", "parameter_allgather"):
            measured, expected = s["bytes"][key]["bytes_per_rank"], s["formula_bytes"][key]
            checks.append({"world_size": s["world_size"], "collective": key, "measured_bytes": measured,
                           "formula_bytes": expected,
                           "relative_error": abs(measured - expected) / expected if expected else None})
    return checks


# --------------------------------------------------------------------------- the GPU model


def model_shape(name: str) -> dict[str, Any]:
    """Parameters (all and matmul), hidden size and layers of a modelled backbone (meta device)."""
    import torch
    from transformers import AutoConfig, AutoModel

    from benchmarks.memory import MODEL_CONFIGS
    from relbert_ds.training.monitor import matmul_parameters

    spec = dict(MODEL_CONFIGS[MODELLED[name]])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    return {"model": name, "config": MODELLED[name], "parameters": int(sum(p.numel() for p in model.parameters())),
            "matmul_parameters": int(matmul_parameters(model)), "hidden_size": int(config.hidden_size),
            "num_layers": int(config.num_hidden_layers)}


def bus_bandwidth(args: argparse.Namespace, n: int) -> float:
    """Bytes/s a ring collective sustains per GPU: half of NVLink within a node, the node's NICs across."""
    intra = args.nvlink_GBps * 1e9 / 2
    if n <= args.gpus_per_node:
        return intra
    return min(intra, args.nics_per_node * args.inter_node_Gbps * 1e9 / 8)


@functools.lru_cache(maxsize=None)  # model_step runs thousands of times (the world-size searches)
def _zero2_section(ds_config: str) -> dict[str, Any]:
    return json.loads((common.REPO / ds_config).read_text()).get("zero_optimization", {})


def _zero2_buckets(ds_config: str) -> tuple[int, int]:
    """(reduce_bucket_size, allgather_bucket_size) in elements, from the shipped ZeRO-2 config."""
    zero = _zero2_section(ds_config)
    return int(zero.get("reduce_bucket_size", 5e8)), int(zero.get("allgather_bucket_size", 5e8))


def _zero2_overlaps(ds_config: str) -> bool:
    """Whether the ZeRO-2 config overlaps the gradient reduction with the backward (``overlap_comm``)."""
    return bool(_zero2_section(ds_config).get("overlap_comm"))


def host_ms(args: argparse.Namespace, n: int) -> float:
    """Host work per step at ``n`` ranks measured by benchmarks/host_planning.py (the plan of the rank's
    share; tokenization is prefetched behind the step): the nearest measured world size, else 0."""
    if not args.host_results:
        return 0.0
    path = common.REPO / args.host_results if not Path(args.host_results).is_absolute() else Path(args.host_results)
    try:
        rows = json.loads(path.read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return 0.0
    nearest = min(rows, key=lambda r: abs(math.log2(r["world_size"]) - math.log2(max(n, 1))))
    return float(nearest["own_groups"]["median_ms"])


def model_step(args: argparse.Namespace, shape: dict[str, Any], n: int, prompts_per_gpu: float,
               tokens_per_prompt: float, reduction: str = "reduce", zeropp: bool = False,
               overlap: Optional[bool] = None) -> dict[str, float]:
    """Modelled seconds per part of one optimizer step on ``n`` GPUs.

    ``reduction``: how ZeRO-2 reduces a gradient bucket: ``"reduce"`` (the shipped config: each
    partition's slice to its owner, one call per owner and bucket, (N-1)/N of the bytes) or
    ``"all_reduce"`` (DeepSpeed's default, one call per bucket, 2(N-1)/N). ``zeropp``: ZeRO++'s qgZ
    (gradients sent as int4: a quarter of bf16's bytes) and hpZ (the parameter all-gather inside a node).
    ``overlap``: DeepSpeed's ``overlap_comm`` (default: as the config says; the shipped one overlaps):
    the gradient reduction runs beside the backward pass, so only what exceeds the backward, and at least
    the last bucket, is exposed. Every collective call
    costs ``--latency_us`` x log2(N) on top of its bytes."""
    from relbert_ds.training.monitor import model_flops_per_token

    tokens = prompts_per_gpu * tokens_per_prompt
    flops = tokens * model_flops_per_token(shape["matmul_parameters"], shape["num_layers"], shape["hidden_size"],
                                           tokens_per_prompt)
    compute = flops / (args.peak_tflops * 1e12 * args.mfu)
    bus = bus_bandwidth(args, n)
    lat = args.latency_us * 1e-6 * math.ceil(math.log2(n)) if n > 1 else 0.0  # per collective call
    share = (n - 1) / n if n > 1 else 0.0
    # Every prompt on every rank: the embedding in the training precision (grad_bytes: 2 = bf16) and four
    # int64 ids forward; the gradient in fp32 backward; one call each.
    gather_fwd = prompts_per_gpu * n * (shape["hidden_size"] * args.grad_bytes + 32)
    gather_bwd = prompts_per_gpu * n * shape["hidden_size"] * 4
    grad_size = shape["parameters"] * args.grad_bytes
    reduce_bucket, allgather_bucket = _zero2_buckets(args.deepspeed_config)
    buckets = math.ceil(shape["parameters"] / reduce_bucket)
    wire_grad = grad_size * (0.25 if zeropp else 1.0)
    if reduction == "reduce":  # a bucket spans several owners' partitions: about N + buckets calls in all
        grad = share * wire_grad / bus + (n + buckets - 1) * lat if n > 1 else 0.0
    else:
        grad = 2 * share * wire_grad / bus + buckets * lat
    if overlap if overlap is not None else _zero2_overlaps(args.deepspeed_config):
        grad = max(grad - 2 * compute / 3, grad / buckets)
    param_bus = args.nvlink_GBps * 1e9 / 2 if zeropp else bus
    param = share * grad_size / param_bus + math.ceil(shape["parameters"] / allgather_bucket) * lat
    # Adam over this rank's ZeRO-2 shard: fp32 master, two moments, read and written, grad read, 16-bit param written
    optimizer = shape["parameters"] / n * (3 * 4 * 2 + args.grad_bytes + args.grad_bytes) / (args.hbm_TBps * 1e12)
    parts = {"encode_forward": compute / 3, "encode_backward": 2 * compute / 3,
             "embedding_gather": share * (gather_fwd + gather_bwd) / bus + 2 * lat if n > 1 else 0.0,
             "gradient_allreduce": grad, "parameter_allgather": param, "optimizer": optimizer,
             "small_collectives": args.small_collectives * lat, "host": host_ms(args, n) / 1e3}
    parts["step"] = sum(parts.values())
    return parts


def largest_world(args: argparse.Namespace, shape: dict[str, Any], tokens_per_prompt: float, mode: str,
                  limit: float = 0.10, top: int = 2 ** 20) -> dict[str, Any]:
    """Largest power-of-two world size (>= 2) whose embedding gather stays under ``limit`` of the step,
    searched up to ``top`` GPUs (strong scaling: up to one prompt per GPU)."""
    best, n, searched = None, 2, 2
    while n <= top:
        per_gpu = args.model_prompts_per_gpu if mode == "weak" else args.model_global_prompts / n
        if per_gpu < 1:
            break
        p = model_step(args, shape, n, per_gpu, tokens_per_prompt)
        if p["embedding_gather"] / p["step"] < limit:
            best = n
        searched = n
        n *= 2
    return {"gpus": best, "searched_up_to": searched, "capped": best == searched}


def gpu_model(args: argparse.Namespace, tokens_per_prompt: float) -> dict[str, Any]:
    rows, limits = [], {}
    for name in MODELLED:
        shape = model_shape(name)
        one_weak = model_step(args, shape, 1, args.model_prompts_per_gpu, tokens_per_prompt)["step"]
        one_strong = model_step(args, shape, 1, args.model_global_prompts, tokens_per_prompt)["step"]
        for mode in ("weak", "strong"):
            for n in args.gpus:
                per_gpu = args.model_prompts_per_gpu if mode == "weak" else args.model_global_prompts / n
                p = model_step(args, shape, n, per_gpu, tokens_per_prompt)
                ar = model_step(args, shape, n, per_gpu, tokens_per_prompt, reduction="all_reduce")
                ov = model_step(args, shape, n, per_gpu, tokens_per_prompt,
                                overlap=not _zero2_overlaps(args.deepspeed_config))  # the other choice
                comm = (p["embedding_gather"] + p["gradient_allreduce"] + p["parameter_allgather"]
                        + p["small_collectives"])
                eff = one_weak / p["step"] if mode == "weak" else one_strong / (n * p["step"])
                eff_ar, eff_ov = (one_weak / x["step"] if mode == "weak" else one_strong / (n * x["step"])
                                  for x in (ar, ov))
                relations = per_gpu * n / args.prompts_per_group
                rows.append({"model": name, "scaling": mode, "gpus": n, "prompts_per_gpu": per_gpu,
                             "global_prompts": per_gpu * n, "step_s": p["step"], "parts_s": p,
                             "communication_share": comm / p["step"], "gather_share": p["embedding_gather"] / p["step"],
                             "efficiency": eff, "efficiency_all_reduce": eff_ar, "step_s_all_reduce": ar["step"],
                             "efficiency_other_overlap": eff_ov,
                             "relations_per_step": relations, "data_can_feed": relations <= args.dataset_relations,
                             "bus_bandwidth_GBps": bus_bandwidth(args, n) / 1e9})
        limits[name] = {"shape": shape,
                        "largest_world_gather_under_10pct_weak": largest_world(args, shape, tokens_per_prompt, "weak"),
                        "largest_world_gather_under_10pct_strong": largest_world(args, shape, tokens_per_prompt,
                                                                                  "strong")}
    assumptions = {"peak_tflops": args.peak_tflops, "mfu": args.mfu, "nvlink_GBps_bidirectional": args.nvlink_GBps,
                   "ring_bus_GBps_intra_node": args.nvlink_GBps / 2, "inter_node_Gbps_per_nic": args.inter_node_Gbps,
                   "nics_per_node": args.nics_per_node, "gpus_per_node": args.gpus_per_node,
                   "latency_us_per_log2_step": args.latency_us, "hbm_TBps": args.hbm_TBps,
                   "grad_bytes": args.grad_bytes, "embedding_bytes": args.grad_bytes,
                   "tokens_per_prompt": tokens_per_prompt,
                   "prompts_per_gpu_weak": args.model_prompts_per_gpu,
                   "global_prompts_strong": args.model_global_prompts,
                   "overlap": "the gradient reduction beside the backward pass when overlap_comm is on (what exceeds "
                              "the backward, at least the last bucket, exposed); every other collective adds up",
                   "zero_stage": 2, "reduction": "reduce to each partition's owner (the shipped zero2.json)",
                   "overlap_comm": _zero2_overlaps(args.deepspeed_config),
                   "buckets_elements": dict(zip(("reduce", "allgather"), _zero2_buckets(args.deepspeed_config))),
                   "host_ms": {n: host_ms(args, n) for n in args.gpus}, "host_results": args.host_results,
                   "small_collectives": args.small_collectives, "prompts_per_group": args.prompts_per_group,
                   "dataset_relations": args.dataset_relations}
    zeropp = []
    shape = model_shape("roberta-large")
    one = model_step(args, shape, 1, args.model_prompts_per_gpu, tokens_per_prompt)["step"]
    for n in args.gpus:
        base = model_step(args, shape, n, args.model_prompts_per_gpu, tokens_per_prompt)
        plus = model_step(args, shape, n, args.model_prompts_per_gpu, tokens_per_prompt, zeropp=True)
        zeropp.append({"model": "roberta-large", "scaling": "weak", "gpus": n, "efficiency": one / base["step"],
                       "efficiency_zeropp": one / plus["step"], "step_s": base["step"], "step_s_zeropp": plus["step"]})
    return {"label": "MODEL (not a measurement)", "assumptions": assumptions, "rows": rows, "limits": limits,
            "zeropp": zeropp}


# --------------------------------------------------------------------------- output


def tables(doc: dict[str, Any]) -> str:
    s = doc["measured"]
    cfg = doc["config"]
    cores = doc["machine"]["cpu_count"]
    over = [x["world_size"] for x in s if x["world_size"] > cores]
    text = (f"### Measured on CPU: fixed global batch of {cfg['relations_per_step']} relations "
            f"({s[0]['prompts_per_step']} prompts), {cfg['model']}, DeepSpeed ZeRO-{s[0]['zero_stage']}, "
            f"{s[0]['precision']}, gloo\n\n")
    if over:
        text += (f"**OVERSUBSCRIBED:** {cores} CPU cores for up to {max(x['world_size'] for x in s)} ranks "
                 f"(world sizes {over} have more ranks than cores): ranks share cores and collective times include "
                 f"waiting for descheduled ranks. Load average during the runs: "
                 f"{', '.join(str(x['loadavg_before'][0]) + '->' + str(x['loadavg_after'][0]) for x in s)} "
                 f"(1-min, per world size; the machine is shared).\n\n")
    base = s[0]["step_s"] * s[0]["world_size"]
    rows = []
    for x in s:
        rows.append([x["world_size"], x["step_s"], *(x["parts_s"][k] for k in PARTS),
                     base / (x["world_size"] * x["step_s"])])
    text += common.markdown_table(["ranks", "step s", *(PART_LABEL[k] + " s" for k in PARTS),
                                   f"strong eff. (T{s[0]['world_size']} / (N x TN))"], rows, digits=3)
    if over:
        text += ("\nBeyond the core count the efficiency means little: the ranks time-share the cores, and on a "
                 "shared machine more processes also win a larger share of the CPU from other jobs.\n")
    text += "\nBytes per rank per step (measured by the shim vs formula):\n\n"
    brows = []
    for x in s:
        if x["world_size"] == 1:
            continue
        b, f = x["bytes"], x["formula_bytes"]
        brows.append([x["world_size"], f"{b['gather_fwd']['bytes_per_rank']:,.0f} / {f['gather_fwd']:,}",
                      f"{b['gather_bwd']['bytes_per_rank']:,.0f} / {f['gather_bwd']:,}",
                      f"{b['gather_ids']['bytes_per_rank']:,.0f}",
                      f"{b['gradient_allreduce']['bytes_per_rank']:,.0f} / {f['gradient_allreduce']:,}",
                      f"{b['parameter_allgather']['bytes_per_rank']:,.0f} / {f['parameter_allgather']:,}",
                      f"{b['small']['bytes_per_rank']:,.0f} ({b['small']['calls_per_step']:.0f} calls)"])
    text += common.markdown_table(["ranks", "emb. gather fwd (with ids)", "emb. gather bwd", "size gathers",
                                   "grad all-reduce", "param all-gather", "small collectives"], brows)
    worst = max((c["relative_error"] for c in doc["byte_checks"] if c["relative_error"] is not None), default=None)
    text += (f"\nFormulas: gather = prompts x (hidden x 4 + 32 bytes of ids) = {s[0]['prompts_per_step']} x "
             f"({s[0]['hidden_size']} x 4 + 32), its backward prompts x hidden x 4; "
             f"gradient all-reduce = trainable parameters x 4 = {s[0]['trainable_parameters']:,} x 4; parameter "
             f"all-gather = parameters x 4 = {s[0]['parameters']:,} x 4. Largest relative difference: "
             f"{'n/a' if worst is None else f'{100 * worst:.2f}%'}")
    multi = [x for x in s if x["world_size"] > 1]
    if multi:
        gap = (multi[0]["formula_bytes"]["gradient_allreduce"]
               - multi[0]["bytes"]["gradient_allreduce"]["bytes_per_rank"])
        if gap > 0:
            text += (f" (the gradient all-reduce moves {gap:,.0f} bytes = {gap / 4:,.0f} parameters less than the "
                     f"formula: parameters that get no gradient, such as a backbone's pooler that the relation "
                     f"pooling does not use)")
    text += ".\n"
    m = doc["model"]
    a = m["assumptions"]
    other = "off" if a.get("overlap_comm") else "on"
    text += (f"\n### GPU {m['label']}\n\nAssumed: {a['peak_tflops']:.0f} TFLOP/s bf16 peak per GPU (H100 SXM) at "
             f"{100 * a['mfu']:.0f}% MFU for the encoder's compute; NVLink {a['nvlink_GBps_bidirectional']:.0f} GB/s "
             f"per GPU ({a['ring_bus_GBps_intra_node']:.0f} GB/s ring bus bandwidth) within a node of "
             f"{a['gpus_per_node']} GPUs; {a['nics_per_node']} x {a['inter_node_Gbps_per_nic']:.0f} Gb/s per node "
             f"between nodes; {a['latency_us_per_log2_step']:.0f} us latency per log2(N) step for every collective "
             f"call; Adam at {a['hbm_TBps']} TB/s HBM; gradients, parameters and the gathered embeddings on the wire "
             f"in {8 * a['grad_bytes']}-bit (the embeddings with 32 bytes of ids per prompt, their gradient back in "
             f"fp32); {a['tokens_per_prompt']:.1f} tokens per prompt (measured above); ZeRO-2 as shipped: each "
             f"gradient bucket ({a['buckets_elements']['reduce']:,} elements) reduced to its partitions' owners, "
             f"about N + buckets calls per step, and the parameters all-gathered in "
             f"{a['buckets_elements']['allgather']:,}-element buckets; {a['small_collectives']} small "
             f"latency-bound collectives per step; host work per step as measured by "
             f"`benchmarks/host_planning.py` ({', '.join(f'{v:.2f} ms at {k}' for k, v in a['host_ms'].items())}; "
             f"tokenization is prefetched behind the step); the gradient reduction "
             f"{'overlapped with the backward pass as the shipped overlap_comm does (what exceeds the backward, and at least the last bucket, exposed)' if a.get('overlap_comm') else 'not overlapped'}, "  # noqa: E501
             f"every other collective added to the step. Weak "
             f"scaling: {a['prompts_per_gpu_weak']} prompts per GPU; strong scaling: {a['global_prompts_strong']} "
             f"prompts per step in total. Efficiency is against one GPU running the same batch without "
             f"communication; the all-reduce column is the same step with DeepSpeed's default bucket all-reduce, "
             f"the last column with overlap_comm {other}. "
             f"A step holds each relation once, in groups of {a['prompts_per_group']} prompts: a row whose "
             f"relations per step exceed the data's ({a['dataset_relations']} in SemEval-2012) is marked *: that "
             f"batch needs more relations than SemEval-2012 has.\n\n")
    mrows = []
    for r in m["rows"]:
        p = r["parts_s"]
        mrows.append([r["model"], r["scaling"], r["gpus"], f"{r['prompts_per_gpu']:g}",
                      _relations_cell(r), 1000 * r["step_s"],
                      1000 * (p["encode_forward"] + p["encode_backward"]), 1000 * p["embedding_gather"],
                      1000 * (p["gradient_allreduce"] + p["parameter_allgather"]),
                      1000 * (p["small_collectives"] + p["host"]),
                      f"{100 * r['communication_share']:.0f}%",
                      f"{100 * r['gather_share']:.1f}%", f"{100 * r['efficiency']:.0f}%",
                      f"{100 * r['efficiency_all_reduce']:.0f}%", f"{100 * r['efficiency_other_overlap']:.0f}%"])
    text += common.markdown_table(["model", "scaling", "GPUs", "prompts/GPU", "relations/step", "step ms",
                                   "compute ms", "gather ms", "ZeRO-2 grad+param ms", "small + host ms",
                                   "comm share", "gather share", "efficiency", "efficiency, all-reduce",
                                   f"efficiency, overlap_comm {other}"], mrows, digits=1)
    alt = doc.get("model_8_nics")
    if alt:
        text += (f"\nThe same MODEL with {alt['assumptions']['nics_per_node']} x "
                 f"{alt['assumptions']['inter_node_Gbps_per_nic']:.0f} Gb/s NICs per node (a DGX H100-class "
                 f"network; within a node nothing changes):\n\n")
        text += common.markdown_table(
            ["model", "scaling", "GPUs", "relations/step", "step ms", "comm share", "gather share", "efficiency",
             "efficiency, all-reduce", f"efficiency, overlap_comm {other}"],
            [[r["model"], r["scaling"], r["gpus"], _relations_cell(r), 1000 * r["step_s"],
              f"{100 * r['communication_share']:.0f}%",
              f"{100 * r['gather_share']:.1f}%", f"{100 * r['efficiency']:.0f}%",
              f"{100 * r['efficiency_all_reduce']:.0f}%", f"{100 * r['efficiency_other_overlap']:.0f}%"]
             for r in alt["rows"] if r["gpus"] > m["assumptions"]["gpus_per_node"]], digits=1)
        text += _verdict(m, alt)
        text += _zeropp_text(m, alt)
    text += "\nLargest world size (power of two) where the embedding gather stays under 10% of the step (MODEL):\n\n"
    lim_rows = []
    for k, v in m["limits"].items():
        row = [k, f"{v['shape']['parameters'] / 1e6:,.0f}M", _fmt_limit(v["largest_world_gather_under_10pct_weak"]),
               _fmt_limit(v["largest_world_gather_under_10pct_strong"])]
        if alt:
            a = alt["limits"][k]
            row += [_fmt_limit(a["largest_world_gather_under_10pct_weak"]),
                    _fmt_limit(a["largest_world_gather_under_10pct_strong"])]
        lim_rows.append(row)
    heads = ["model", "params", "weak, 1 NIC/node", "strong, 1 NIC/node"]
    if alt:
        heads += [f"weak, {alt['assumptions']['nics_per_node']} NICs/node",
                  f"strong, {alt['assumptions']['nics_per_node']} NICs/node"]
    text += common.markdown_table(heads, lim_rows)
    text += (f"\nWeak scaling keeps {m['assumptions']['prompts_per_gpu_weak']} prompts per GPU, so the gathered "
             f"batch (and the gather) grows with N while the compute per GPU stays; strong scaling keeps "
             f"{m['assumptions']['global_prompts_strong']} prompts in all (the search stops at one prompt per GPU), "
             f"where the gradient reduction, not the gather, is what stops scaling.\n")
    return text


def _verdict(one_nic: dict[str, Any], eight_nics: dict[str, Any], target: float = 0.90) -> str:
    """What the model says of the weak-scaling target (roberta-large, 64 GPUs), from its own rows."""
    def row(model: dict[str, Any], gpus: int) -> Optional[dict[str, Any]]:
        return next((r for r in model["rows"] if r["model"] == "roberta-large" and r["scaling"] == "weak"
                     and r["gpus"] == gpus), None)

    r8, r1 = row(eight_nics, 64), row(one_nic, 64)
    if r8 is None or r1 is None:
        return ""
    other = "off" if eight_nics["assumptions"].get("overlap_comm") else "on"
    big = row(eight_nics, max(r["gpus"] for r in eight_nics["rows"]))
    met = "meet" if r8["efficiency"] >= target else "miss"
    text = (f"\nThe weak-scaling target ({100 * target:.0f}% at 64 GPUs, roberta-large, "
            f"{eight_nics['assumptions']['nics_per_node']} x {eight_nics['assumptions']['inter_node_Gbps_per_nic']:.0f}"
            f" Gb/s per node) in this MODEL: the shipped configs {met} it at {100 * r8['efficiency']:.0f}% "
            f"(1 NIC per node: {100 * r1['efficiency']:.0f}%); with overlap_comm {other} "
            f"{100 * r8['efficiency_other_overlap']:.0f}%, with DeepSpeed's default all-reduce "
            f"{100 * r8['efficiency_all_reduce']:.0f}%.")
    if big is not None and big["efficiency_all_reduce"] > big["efficiency"]:
        text += (f" At {big['gpus']} GPUs the owner-by-owner reduction's {big['gpus']}+ calls per step cost more than "
                 f"the bytes they save ({100 * big['efficiency']:.0f}% against "
                 f"{100 * big['efficiency_all_reduce']:.0f}% with the all-reduce): there, set "
                 f"`\"use_multi_rank_bucket_allreduce\": true`.")
    return text + (" Efficiencies above 100% are ZeRO-2 sharding the optimizer step, which one GPU runs whole. Every "
                   "row past 9 GPUs at 128 prompts per GPU needs more relations per step than SemEval-2012's 79 (*).\n")


def _relations_cell(row: dict[str, Any]) -> str:
    """Relations a step needs; * where the training data has fewer."""
    return f"{row['relations_per_step']:g}{'' if row['data_can_feed'] else ' *'}"


def _zeropp_text(one_nic: dict[str, Any], eight_nics: dict[str, Any]) -> str:
    """The roberta-large weak-scaling efficiencies with and without ZeRO++ (qgZ + hpZ), both networks."""
    rows = []
    for label, model in (("1 NIC/node", one_nic), (f"{eight_nics['assumptions']['nics_per_node']} NICs/node",
                                                         eight_nics)):
        for r in model["zeropp"]:
            rows.append([label, r["gpus"], 1000 * r["step_s"], f"{100 * r['efficiency']:.0f}%",
                         1000 * r["step_s_zeropp"], f"{100 * r['efficiency_zeropp']:.0f}%"])
    return ("\nWhat ZeRO++ would add (MODEL; roberta-large, weak scaling; qgZ sends gradients as int4, a quarter "
            "of bf16's bytes, and hpZ keeps a parameter copy per node so that the all-gather stays on NVLink; "
            "DeepSpeed's `zero_quantized_gradients` and `zero_hpz_partition_size`, not in the shipped configs):\n\n"
            + common.markdown_table(["network", "GPUs", "step ms", "efficiency", "step ms, ZeRO++",
                                     "efficiency, ZeRO++"], rows, digits=1))


def _fmt_limit(found: dict[str, Any]) -> str:
    if found["gpus"] is None:
        return "none (>= 10% at 2 GPUs)"
    if found["capped"]:
        return f">= {found['gpus']:,} (search limit)"
    return f"{found['gpus']:,}"


def figure(doc: dict[str, Any], path: Path) -> None:
    """Left: measured CPU step split per world size; right: MODEL communication shares vs GPUs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = doc["measured"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    bottom = [0.0] * len(s)
    labels = [str(x["world_size"]) for x in s]
    for k in PARTS:
        values = [max(0.0, x["parts_s"][k]) for x in s]
        ax1.bar(labels, values, bottom=bottom, label=PART_LABEL[k])
        bottom = [b + v for b, v in zip(bottom, values)]
    cores = doc["machine"]["cpu_count"]
    ax1.set_title(f"MEASURED: CPU ranks, {s[0]['prompts_per_step']} prompts/step\n({cores} cores: "
                  f"ranks > {cores} oversubscribed)", fontsize=10)
    ax1.set_xlabel("ranks")
    ax1.set_ylabel("seconds per optimizer step")
    ax1.legend(fontsize=8)
    m = doc["model"]
    for name in MODELLED:
        for mode, style in (("weak", "-"), ("strong", "--")):
            rows = [r for r in m["rows"] if r["model"] == name and r["scaling"] == mode]
            ax2.plot([r["gpus"] for r in rows], [100 * r["communication_share"] for r in rows], style, marker="o",
                     label=f"{name}, {mode}: all comm.")
            ax2.plot([r["gpus"] for r in rows], [100 * r["gather_share"] for r in rows], style, marker="x",
                     label=f"{name}, {mode}: gather")
    ax2.axhline(10, color="grey", lw=0.8)
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("GPUs")
    ax2.set_ylabel("% of the step")
    ax2.set_title("MODEL (not measured): share of communication, ZeRO-2", fontsize=10)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.world_sizes, args.relations_per_step, args.steps = [1, 2], 8, 2
    head = common.header("scaling", argv if argv is not None else sys.argv[1:])
    cores = os.cpu_count() or 1
    runs = [measure_world_size(args, n) for n in args.world_sizes]
    warmup = 1 if args.steps > 1 else 0
    summaries = [summarise(r, warmup) for r in runs]
    tokens = args.model_tokens_per_prompt or statistics.fmean(s["tokens_per_prompt"] for s in summaries)
    doc = {**head, "config": vars(args), "oversubscribed": {
        "cpu_cores": cores, "world_sizes_over_cores": [n for n in args.world_sizes if n > cores],
        "note": "ranks beyond the core count share cores; collective times include waiting for descheduled ranks"},
        "measured": summaries, "byte_checks": byte_checks(summaries), "model": gpu_model(args, tokens),
        "model_8_nics": gpu_model(argparse.Namespace(**{**vars(args), "nics_per_node": 8}), tokens),
        "raw_steps": {r["world_size"]: [{k: v for k, v in rk.items() if k != "steps"} | {"steps": rk["steps"]}
                                        for rk in r["ranks"]] for r in runs}}
    table = tables(doc)
    out = Path(args.output or common.default_output("scaling"))
    common.emit(table, out, doc)
    if args.figure:
        figure(doc, Path(args.figure))
    if args.markdown:
        given = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--reuse"]
        command = "python " + " ".join(["benchmarks/scaling.py", *given])
        measured_at = ", ".join(f"{r['world_size']} rank(s) {r['wall_s']:.0f} s" for r in runs)
        page = (f"# Scaling\n\nData-parallel scaling of relbert-ds at a fixed global batch: the CPU part is measured "
                f"(real trainer, real ranks), the GPU part is a MODEL built from the measured byte counts and the "
                f"stated assumptions. Produced by\n\n    {command}\n\n(wall time per world size: {measured_at}"
                f"{'; tables re-rendered from the kept measurements with --reuse' if args.reuse else ''}; "
                f"results: `{_relative(out)}`"
                + (f", figure: `{args.figure}`" if args.figure else "")
                + ", which records the commit, date and machine load).\n\n"
                + (f"![scaling]({os.path.relpath(args.figure, Path(args.markdown).parent)})"
                                                f"\n\n" if args.figure else "") + table + _METHOD)
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(page)
    return 0


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(common.REPO))
    except ValueError:
        return str(path)


_METHOD = """
## How it is measured

`benchmarks/_scaling_worker.py` runs one rank: it wraps `torch.distributed`'s collectives in a
counting and timing shim before DeepSpeed starts, builds the real `Trainer` (`prepare()`), and runs
`train_step()`. Each collective is filed by its caller (the loss's embedding gather, its backward,
the sizes and id gathers, DeepSpeed, the trainer's bookkeeping) and by the trainer's phase
(engine forward, backward, step). Bytes are the whole logical buffer on the rank (all-gather output,
all-reduce tensor, reduce-scatter input). The CPU step parts are medians over the timed steps of
the mean over ranks; "other" is the rest of the step's wall time (sampling, small collectives).

## Reading the model

- The embedding gather grows with the *global* number of prompts, the ZeRO-2 gradient traffic with
  the number of parameters, and neither shrinks when GPUs are added. Under weak scaling the compute
  per GPU is constant and the gather grows linearly with N; under strong scaling the compute per GPU
  shrinks as 1/N while the communication stays: the efficiency then falls.
- Only the gradient reduction is overlapped with compute in the model (the shipped `overlap_comm`: it
  runs while the backward pass goes on); the gather and the parameter all-gather add to the step.
  On CPU ranks there is no stream to overlap on: the measured CPU steps show no overlap.
- The gather sends the embeddings in the training precision (bf16) with each prompt's ids in one
  all-gather; the row counts come from the batch plan, so no size exchange precedes it.
- Every collective call pays a latency on top of its bytes. The shipped ZeRO-2 reduction sends half
  the bytes of an all-reduce but issues a call per partition owner: at a few hundred GPUs and small
  models those calls cost more than the bytes saved (the all-reduce column).
"""


if __name__ == "__main__":
    sys.exit(main())

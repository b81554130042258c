#!/usr/bin/env python
"""Memory of model states per rank under ZeRO 0/1/2/3 and offload, for named backbones, from
DeepSpeed's own estimators (no weights downloaded: every model is built from its config on the
meta device to count parameters), plus the measured peak of the bundled backbone on CPU.

Estimates (bf16/fp16 mixed precision with Adam, as on GPUs), bytes per parameter with N data-
parallel ranks, in the accounting of DeepSpeed 0.19's estimators (16-bit params 2, 16-bit grads
2, fp32 grads 4, fp32 master params 4, Adam moments 8):

- ZeRO-0: 2 + 2 + 16 = 20 (no estimator in DeepSpeed: this formula)
- ZeRO-1: 2 + 2 + 16/N (optimizer side partitioned; this formula)
- ZeRO-2: 2 + 18/N (``estimate_zero2_model_states_mem_needs``; the formula is checked against it)
- ZeRO-3: 18/N + 4 x largest layer (``estimate_zero3_model_states_mem_needs``; checked too)
- ZeRO-2 + optimizer offload: 2 on the GPU; ZeRO-3 + optimizer and parameter offload: 4 x
  largest layer on the GPU (host memory per node from the estimators, 1.5x buffer factor).

"Fits" on an 80 GB GPU means: model states + activations of one micro batch + 10% headroom
(CUDA context, communication buckets, fragmentation) <= 80 GB. Activations are estimated for
``--tokens`` tokens per GPU (default 8 relations x 16 prompts x 64 tokens = 8192) in bf16 with
Korthikanti et al.'s (2022) per-layer count s*b*h*(34 + 5*a*s/h) bytes, and with gradient
checkpointing (layer inputs 2*h bytes per token per layer + one layer's activations).

Measured: short real training runs (``--measure_steps`` optimizer steps) of the bundled backbone on
``--nproc`` CPU ranks per DeepSpeed config (ds_configs/*.json), peak resident set of rank 0
(``monitor.peak_memory_bytes`` as logged in history.jsonl), next to the resident set of a process
that only imported the libraries and loaded the model (the floor); fp32 on CPU.

    python benchmarks/memory.py
    python benchmarks/memory.py --no_measure --gpus 1 8 64 512
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

GB = 1e9  # decimal, as GPU datasheets ("80 GB")

# transformers config dicts (model_type + fields) of the backbones in the table; shapes from the
# public config.json files of roberta-large, microsoft/deberta-v3-large, facebook/opt-1.3b and
# a Llama-7B-shaped decoder (meta-llama/Llama-2-7b-hf).
MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "roberta-large": {"model_type": "roberta", "vocab_size": 50265, "hidden_size": 1024, "num_hidden_layers": 24,
                      "num_attention_heads": 16, "intermediate_size": 4096, "max_position_embeddings": 514,
                      "type_vocab_size": 1, "pad_token_id": 1},
    "deberta-v3-large": {"model_type": "deberta-v2", "vocab_size": 128100, "hidden_size": 1024,
                         "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
                         "max_position_embeddings": 512, "type_vocab_size": 0, "relative_attention": True,
                         "position_buckets": 256, "norm_rel_ebd": "layer_norm", "share_att_key": True,
                         "pos_att_type": ["p2c", "c2p"], "position_biased_input": False, "max_relative_positions": -1,
                         "layer_norm_eps": 1e-7},
    "opt-1.3b (1.3B decoder)": {"model_type": "opt", "vocab_size": 50272, "hidden_size": 2048, "num_hidden_layers": 24,
                                "num_attention_heads": 32, "ffn_dim": 8192, "max_position_embeddings": 2048,
                                "word_embed_proj_dim": 2048, "do_layer_norm_before": True},
    "llama-7b (7B decoder)": {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096,
                              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                              "intermediate_size": 11008, "max_position_embeddings": 4096},
}
BUNDLED = "all-MiniLM-L6-v2 (bundled)"
CONFIG_FILES = {"zero0": "ds_configs/zero0.json", "zero1": "ds_configs/zero1.json", "zero2": "ds_configs/zero2.json",
                "zero3": "ds_configs/zero3.json", "zero3_offload": "ds_configs/zero3_offload.json"}
SCHEMES = ("zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload")
SCHEME_LABEL = {"zero0": "ZeRO-0", "zero1": "ZeRO-1", "zero2": "ZeRO-2", "zero3": "ZeRO-3",
                "zero2_offload": "ZeRO-2 + opt. offload", "zero3_offload": "ZeRO-3 + opt.+param offload"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODEL_CONFIGS) + [BUNDLED],
                   help="names from the built-in configs (default all) and/or the bundled backbone")
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 8, 64], help="data-parallel GPUs (8 per node)")
    p.add_argument("--gpu_gb", type=float, default=80.0, help="memory per GPU in GB (default 80)")
    p.add_argument("--tokens", type=int, default=8192, help="tokens per GPU per micro step for activations")
    p.add_argument("--seq_len", type=int, default=64, help="prompt length for the attention term")
    p.add_argument("--headroom", type=float, default=0.10, help="fraction of GPU memory kept free (default 0.1)")
    p.add_argument("--no_measure", action="store_true", help="skip the measured CPU runs")
    p.add_argument("--measure_model", default="all-MiniLM-L6-v2", help="backbone of the measured runs")
    p.add_argument("--measure_configs", nargs="+", default=list(CONFIG_FILES), choices=list(CONFIG_FILES))
    p.add_argument("--measure_steps", type=int, default=3)
    p.add_argument("--nproc", type=int, default=2, help="ranks of the measured runs (default 2)")
    p.add_argument("--launcher", default="deepspeed", choices=("deepspeed", "torchrun", "python"))
    p.add_argument("--work_dir", default="runs/benchmarks/memory")
    p.add_argument("--output", default=None, help="results JSON (default benchmarks/results/memory.json)")
    return p


# --------------------------------------------------------------------------- counting


def count_parameters(name: str) -> dict[str, Any]:
    """Parameters, largest layer and shape of a backbone built on the meta device from its config."""
    import torch
    from transformers import AutoConfig, AutoModel

    if name == BUNDLED:
        from relbert_ds.model.backbones import resolve_model_name

        config = AutoConfig.from_pretrained(resolve_model_name("all-MiniLM-L6-v2"))
    else:
        spec = dict(MODEL_CONFIGS[name])
        config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a shared tensor once
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return {"model": name, "model_type": config.model_type, "parameters": int(total),
            "largest_layer_parameters": int(largest), "hidden_size": int(config.hidden_size),
            "num_layers": int(config.num_hidden_layers), "num_heads": int(config.num_attention_heads)}


def formula_bytes(scheme: str, params: int, largest: int, n: int) -> float:
    """Per-GPU bytes of model states (the DeepSpeed estimators' accounting; see the module docstring)."""
    if scheme == "zero0":
        return 20.0 * params
    if scheme == "zero1":
        return 4.0 * params + 16.0 * params / n
    if scheme == "zero2":
        return 2.0 * params + 18.0 * params / n
    if scheme == "zero3":
        return 4.0 * largest + 18.0 * params / n
    if scheme == "zero2_offload":
        return 2.0 * params
    if scheme == "zero3_offload":
        return 4.0 * largest
    raise ValueError(scheme)


def estimator_bytes(scheme: str, params: int, largest: int, n: int) -> Optional[tuple[float, float]]:
    """(per-GPU bytes, host bytes per node) from DeepSpeed's estimators, None where it has none."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    per_node, nodes = min(n, 8), max(1, n // 8)
    if scheme in ("zero2", "zero2_offload"):
        cpu, gpu = estimate_zero2_model_states_mem_needs(params, per_node, nodes, cpu_offload=scheme == "zero2_offload")
        return float(gpu), float(cpu)
    if scheme in ("zero3", "zero3_offload"):
        offload = scheme == "zero3_offload"
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(params, largest, per_node, nodes, cpu_offload=offload,
                                                            cpu_offload_params=offload, zero_init=True)
        return float(gpu), float(cpu)
    return None


def activation_bytes(info: dict[str, Any], tokens: int, seq: int, checkpointing: bool) -> float:
    """bf16 activations of ``tokens`` tokens (Korthikanti et al. 2022, no sequence parallelism)."""
    h, layers, heads = info["hidden_size"], info["num_layers"], info["num_heads"]
    per_layer_token = h * (34 + 5 * heads * seq / h)
    if not checkpointing:
        return tokens * layers * per_layer_token
    return tokens * (layers * 2 * h + per_layer_token)


def estimate_table(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    models = [count_parameters(m) for m in args.models]
    rows = []
    limit = args.gpu_gb * GB * (1 - args.headroom)
    for info in models:
        act = activation_bytes(info, args.tokens, args.seq_len, False)
        act_ckpt = activation_bytes(info, args.tokens, args.seq_len, True)
        for n in args.gpus:
            entry: dict[str, Any] = {"model": info["model"], "gpus": n, "parameters": info["parameters"],
                                     "activations_gb": act / GB, "activations_checkpointed_gb": act_ckpt / GB}
            for scheme in SCHEMES:
                mine = formula_bytes(scheme, info["parameters"], info["largest_layer_parameters"], n)
                est = estimator_bytes(scheme, info["parameters"], info["largest_layer_parameters"], n)
                gpu = est[0] if est else mine
                fits = "yes" if gpu + act <= limit else "with gradient checkpointing" if gpu + act_ckpt <= limit \
                    else "no"
                entry[scheme] = {"gpu_gb": gpu / GB, "formula_gb": mine / GB,
                                 "estimator_gb": est[0] / GB if est else None,
                                 "host_gb_per_node": est[1] / GB if est else None,
                                 "source": "DeepSpeed estimator" if est else "formula", "fits": fits}
            rows.append(entry)
    return models, rows


# --------------------------------------------------------------------------- measuring


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Short real training runs per DeepSpeed config; rank 0's peak RSS from history.jsonl."""
    work = Path(args.work_dir)
    floor_code = ("import resource, torch, deepspeed, transformers, relbert_ds; "
                  "from relbert_ds import RelationEncoder; "
                  f"e = RelationEncoder.from_pretrained({args.measure_model!r}); "
                  "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    floor = int(common.run([sys.executable, "-c", floor_code], timeout=600).stdout.strip().splitlines()[-1])
    out: dict[str, Any] = {"floor_rss_mb": floor / 2**20, "nproc": args.nproc, "steps": args.measure_steps,
                           "model": args.measure_model, "runs": {}}
    for name in args.measure_configs:
        run_dir = work / name
        train_args = ["--deepspeed_config", CONFIG_FILES[name], "--model", args.measure_model, "--output_dir",
                      str(run_dir), "--overwrite", "--max_steps", str(args.measure_steps), "--metric", "none",
                      "--analogy", "--no-projector", "--no-tensorboard", "--no-export_best", "--keep_last", "1"]
        cmd = common.launch_cmd("launchers/train.py", train_args, args.nproc, args.launcher)
        with common.Phase() as phase:
            try:
                common.run(cmd, timeout=1800, echo=True, log_path=work / f"{name}.log")
                error = None
            except RuntimeError as exc:
                error = str(exc).splitlines()[0]
        record: dict[str, Any] = {"command": " ".join(cmd), "seconds": phase.record["seconds"], "error": error}
        if error is None:
            steps, _ = common.read_history(run_dir)
            record["peak_rss_mb"] = max(s["peak_memory_mb"] for s in steps)
            record["above_floor_mb"] = record["peak_rss_mb"] - out["floor_rss_mb"]
            record["step_s_median"] = common.summary(s["step_seconds"] for s in steps)["median"]
            cfg = json.loads((run_dir / "config.json").read_text())
            record["zero_stage"] = cfg["resolved"]["zero_stage"]
            record["precision"] = cfg["resolved"]["precision"]
        out["runs"][name] = record
    return out


def fp32_states_mb(params: int, stage: int, n: int) -> float:
    """fp32 training (CPU): params 4 + grads 4 + Adam 8 bytes, partitioned by stage."""
    p = float(params)
    if stage == 0:
        b = 16 * p
    elif stage == 1:
        b = 8 * p + 8 * p / n
    elif stage == 2:
        b = 4 * p + 12 * p / n
    else:
        b = 16 * p / n
    return b / 2**20


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    head = common.header("memory", argv if argv is not None else sys.argv[1:])
    models, rows = estimate_table(args)
    # The formula must agree with DeepSpeed's estimators wherever they exist.
    checks = [{"model": r["model"], "gpus": r["gpus"], "scheme": s,
               "formula_gb": r[s]["formula_gb"], "estimator_gb": r[s]["estimator_gb"],
               "agrees": abs(r[s]["formula_gb"] - r[s]["estimator_gb"]) < 1e-6}
              for r in rows for s in SCHEMES if r[s]["estimator_gb"] is not None]
    measured = None if args.no_measure else measure(args)

    table = common.markdown_table(
        ["model", "params", "GPUs", *(SCHEME_LABEL[s] + " GB/GPU" for s in SCHEMES), "activations GB (ckpt)"],
        [[r["model"], f"{r['parameters'] / 1e6:,.0f}M", r["gpus"], *(r[s]["gpu_gb"] for s in SCHEMES),
          f"{r['activations_gb']:.1f} ({r['activations_checkpointed_gb']:.1f})"] for r in rows], digits=1)

    short = {"zero0": "Z0", "zero1": "Z1", "zero2": "Z2", "zero3": "Z3", "zero2_offload": "Z2+off",
             "zero3_offload": "Z3+off"}

    def fit_cell(model: str, n: int) -> str:
        r = next(x for x in rows if x["model"] == model and x["gpus"] == n)
        parts = []
        for s in SCHEMES:
            if r[s]["fits"] == "no":
                continue
            text = short[s] + ("*" if r[s]["fits"] != "yes" else "")
            if s.endswith("offload"):
                text += f" (host {r[s]['host_gb_per_node']:.0f} GB/node)"
            parts.append(text)
        return ", ".join(parts) or "none"

    fit_rows = [[m["model"], *(fit_cell(m["model"], n) for n in args.gpus)] for m in models]
    table += "\n" + common.markdown_table(["model", *(f"{n} x {args.gpu_gb:.0f} GB" for n in args.gpus)], fit_rows)
    table += ("\nZ0-Z3 = ZeRO stage, +off = ZeRO-2 with optimizer offload / ZeRO-3 with optimizer and parameter "
              "offload (host memory per node from the estimators); * = only with gradient checkpointing.\n")
    table += (f"Fits = model states + activations of {args.tokens} tokens per GPU (bf16, prompts of {args.seq_len} "
              f"tokens) + {100 * args.headroom:.0f}% headroom <= {args.gpu_gb:.0f} GB. Model states: DeepSpeed "
              f"{head['machine'].get('deepspeed')} estimators (ZeRO-2/3, offload) and the same accounting for "
              f"ZeRO-0/1 (20 and 4 + 16/N bytes per parameter); offload needs host memory: see the JSON "
              f"(host_gb_per_node). Formula vs estimators: "
              f"{'all agree' if all(c['agrees'] for c in checks) else 'DISAGREE (see JSON)'}.\n")
    if measured:
        bundled = count_parameters(BUNDLED)["parameters"]
        mrows = []
        for name, rec in measured["runs"].items():
            if rec.get("error"):
                mrows.append([name, "failed", rec["error"][:80], "", ""])
                continue
            mrows.append([name, rec["peak_rss_mb"], rec["above_floor_mb"],
                          fp32_states_mb(bundled, rec["zero_stage"], measured["nproc"]), rec["step_s_median"]])
        table += "\n" + common.markdown_table(
            ["DeepSpeed config", "peak RSS rank 0 (MB)", "above floor (MB)", "fp32 model states, formula (MB)",
             "step s"], mrows, digits=0)
        table += (f"\nMeasured: {measured['model']} ({bundled / 1e6:.1f}M parameters), {measured['nproc']} CPU ranks, "
                  f"{measured['steps']} optimizer steps, fp32; floor = RSS of a process that imported torch, "
                  f"deepspeed, transformers and loaded the model: {measured['floor_rss_mb']:.0f} MB.\n")
    document = {**head, "config": vars(args), "models": models, "estimates": rows, "formula_checks": checks,
                "measured": measured}
    common.emit(table, Path(args.output or common.default_output("memory")), document)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Draw the benchmark results into docs/figures/ (what the README shows).

    python benchmarks/make_figures.py            # reads benchmarks/results/*.json

- time_to_quality.json -> time_to_quality.png: accuracy against each arm's clock, every arm (the real
  relbert 2.0.2 trainer, relbert-ds, the re-implemented public scheme);
- memory.json -> memory.png: model-state memory per GPU by ZeRO scheme, and the measured CPU runs;
- train_throughput.json -> throughput.png: tokens/s, MFU and epoch time per arm, negatives per
  encoded prompt by ranks.

A result file that is missing is skipped with a note; the rest are drawn.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Union

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from relbert_ds.training.plotting import new_figure, save_figure  # noqa: E402  (the run figures' canvas)


class FigureError(ValueError):
    """A results file that is not the benchmark's it is drawn as."""


def _load(path: Union[str, Path], benchmark: str) -> dict:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FigureError(f"cannot read {path} ({exc}); fix: run benchmarks/{benchmark}.py first") from exc
    if doc.get("benchmark") != benchmark:
        raise FigureError(f"{path} is not a {benchmark} result (benchmark = {doc.get('benchmark')!r}); fix: pass "
                        f"benchmarks/results/{benchmark}.json")
    return doc


def plot_time_to_quality(results: Union[str, Path], out_path: Union[str, Path]) -> Path:
    """Accuracy against each arm's wall clock in minutes, with the zero-shot level and, at each target
    relbert-ds and another arm both reached, the speed-up over relbert-ds (the benchmark's own ratios)."""
    doc = _load(results, "time_to_quality")
    fig, axes = new_figure(8, 4.8)
    ax = axes[0][0]
    labels = {"real": "public relbert 2.0.2 trainer (the real one, its own venv)",
              "ours": "relbert-ds (cross-device negatives, batched relations)",
              "public": "public RelBERT scheme re-implemented (1 relation per step, 400 negatives)"}
    colours = {"real": "tab:red", "ours": "tab:blue", "public": "tab:orange"}
    for key, arm in doc["arms"].items():
        curve = arm.get("curve") or []
        ax.plot([c["wall_s"] / 60 for c in curve], [100 * c["accuracy"] for c in curve], "o-",
                color=colours.get(key), label=labels.get(key, key), markersize=4)
    if isinstance(doc.get("zero_shot_accuracy"), (int, float)):
        ax.axhline(100 * doc["zero_shot_accuracy"], color="0.5", linestyle=":", label="zero-shot backbone")
    zero_shot = doc.get("zero_shot_accuracy") or 0.0
    for target in doc.get("targets", []):
        if target["target"] <= zero_shot + 1e-3:  # the zero-shot level itself says nothing about training
            continue
        ours = target.get("ours", {})
        if not ours.get("reached"):
            continue
        for other in ("real", "public"):  # the real trainer's ratio first, as every table quotes it
            theirs, ratio = target.get(other, {}), target.get(f"wall_ratio_{other}_over_ours")
            if theirs.get("reached") and ratio:
                y = 100 * target["target"]
                ax.annotate("", xy=(ours["wall_s"] / 60, y), xytext=(theirs["wall_s"] / 60, y),
                            arrowprops={"arrowstyle": "<->", "color": colours[other], "linewidth": 0.8})
                ax.text((ours["wall_s"] + theirs["wall_s"]) / 120, y + 0.4, f"{y:.1f}%: {ratio:.1f}x faster",
                        ha="center", va="bottom", fontsize=8, color=colours[other])
                break
    config = doc.get("config", {})
    ax.set(xlabel="minutes of the arm's own clock (set-up + steps + validation)",
           ylabel="SemEval-2012 validation analogy accuracy %",
           title=f"Time to quality on one {doc.get('machine', {}).get('cpu_count', '?')}-core CPU machine: "
                 f"{config.get('model', '?')}, lr {config.get('lr', '?')} in every arm")
    ax.set_xlim(left=0)
    ax.legend(loc="upper right", fontsize=8)
    return save_figure(fig, Path(out_path))


_SCHEMES = (("zero0", "ZeRO-0"), ("zero1", "ZeRO-1"), ("zero2", "ZeRO-2"), ("zero3", "ZeRO-3"),
            ("zero2_offload", "ZeRO-2 + optimizer offload"), ("zero3_offload", "ZeRO-3 + full offload"))


def plot_memory(results: Union[str, Path], out_path: Union[str, Path]) -> Path:
    """Model-state memory per GPU by ZeRO scheme (estimates, 1/8/64 GPUs) and the measured CPU runs."""
    doc = _load(results, "memory")
    gpus = sorted({e["gpus"] for e in doc["estimates"]})
    models = list(dict.fromkeys(e["model"] for e in doc["estimates"]))
    measured = (doc.get("measured") or {}).get("runs") or {}
    fig, axes = new_figure(4.2 * (len(gpus) + (1 if measured else 0)), 4.8, ncols=len(gpus) + (1 if measured else 0))
    width = 0.8 / len(_SCHEMES)
    colours = ["#1f77b4", "#6baed6", "#2ca02c", "#98df8a", "#ff7f0e", "#d62728"]
    limit = doc.get("config", {}).get("gpu_gb")
    for col, n in enumerate(gpus):
        ax = axes[0][col]
        rows = {e["model"]: e for e in doc["estimates"] if e["gpus"] == n}
        for i, (key, label) in enumerate(_SCHEMES):
            values = [max(rows[m][key]["gpu_gb"], 1e-3) if m in rows and key in rows[m] else math.nan for m in models]
            ax.bar([j + (i - (len(_SCHEMES) - 1) / 2) * width for j in range(len(models))], values, width,
                   color=colours[i], label=label)
        if limit:
            ax.axhline(limit, color="k", linestyle="--", linewidth=1, label=f"{limit:.0f} GB GPU")
        ax.set_yscale("log")
        ax.set_xticks(range(len(models)), [m.split(" (")[0] for m in models], rotation=30, ha="right", fontsize=8)
        ax.set(title=f"{n} GPU{'s' if n > 1 else ''}: model states per GPU (estimate)", ylabel="GB per GPU (log)")
        if col == 0:
            handles, names = ax.get_legend_handles_labels()
            fig.legend(handles, names, loc="outside lower center", ncol=len(names), fontsize=8)
    if measured:
        ax = axes[0][-1]
        names = [k for k in measured if measured[k].get("peak_rss_mb")]
        ax.bar(range(len(names)), [measured[k]["peak_rss_mb"] / 1024 for k in names],
               color=[colours[[s for s, _ in _SCHEMES].index(k)] if k in dict(_SCHEMES) else "0.5" for k in names])
        floor = doc["measured"].get("floor_rss_mb")
        if floor:
            ax.axhline(floor / 1024, color="0.4", linestyle=":", label="process floor (imports)")
            ax.legend(fontsize=7, loc="upper left")
        ax.set_xticks(range(len(names)), [dict(_SCHEMES).get(k, k) for k in names], rotation=30, ha="right", fontsize=8)
        ax.set(title=f"measured: {doc['measured'].get('model')}, {doc['measured'].get('nproc')} CPU ranks",
               ylabel="peak RSS per rank, GB")
    return save_figure(fig, Path(out_path))


_ARM_LABELS = {"real": "public relbert\n2.0.2 (real)", "ours": "relbert-ds", "bare": "bare PyTorch\n(same tokens)",
               "public": "public scheme\n(pad to 64)", "public_longest": "public scheme\n(pad to longest)"}


def plot_throughput(results: Union[str, Path], out_path: Union[str, Path]) -> Path:
    """Training throughput per arm (real tokens/s, MFU), the epoch time it implies, and how many
    negatives each encoded prompt serves as the number of ranks grows."""
    doc = _load(results, "train_throughput")
    arms = [k for k in ("real", "ours", "bare", "public", "public_longest") if k in doc["arms"]]
    colours = {"real": "tab:purple", "ours": "tab:blue", "bare": "0.6", "public": "tab:orange",
               "public_longest": "tab:red"}
    fig, axes = new_figure(19, 4.6, ncols=4)
    ax = axes[0][0]
    ax.bar(range(len(arms)), [doc["arms"][a]["tokens_per_s"] for a in arms], color=[colours[a] for a in arms])
    ax.set_xticks(range(len(arms)), [_ARM_LABELS[a] for a in arms], fontsize=7)
    ax.set(ylabel="real (unpadded) tokens per second", title="Training throughput")
    ax = axes[0][1]
    ax.bar(range(len(arms)), [100 * doc["arms"][a]["mfu"] for a in arms], color=[colours[a] for a in arms])
    ax.set_xticks(range(len(arms)), [_ARM_LABELS[a] for a in arms], fontsize=7)
    peak = doc.get("peak_flops")
    peak_text = f" of {peak['tflops']:.3f} TFLOP/s" if isinstance(peak, dict) and "tflops" in peak else ""
    ax.set(ylabel=f"MFU %{peak_text}", title="Model FLOPs utilisation")
    ax = axes[0][2]
    epochs = doc.get("epoch_seconds") or {}
    keys = [k for k in ("real_extrapolated", "ours", "public_extrapolated", "public_longest_extrapolated")
            if k in epochs]
    arm_of = {k: k.removesuffix("_extrapolated") for k in keys}  # the epoch keys name the arms they time
    bars = ax.bar(range(len(keys)), [epochs[k]["median"] for k in keys],
                  color=[colours.get(arm_of[k], "0.5") for k in keys])
    for bar, k in zip(bars, keys):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{epochs[k]['median']:.0f} s", ha="center",
                va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(keys)), [_ARM_LABELS[arm_of[k]] for k in keys], fontsize=8)
    ax.set(ylabel="seconds per epoch (log)", title="One epoch over SemEval-2012 (public: extrapolated)")
    ax = axes[0][3]
    by_world = (doc.get("negatives") or {}).get("ours_by_world_size") or []
    if by_world:
        ax.plot([r["world_size"] for r in by_world], [r["negatives_per_sequence"] for r in by_world], "o-",
                color="tab:blue", label="relbert-ds (cross-device negatives)")
        public = (doc.get("negatives") or {}).get("public", {}).get("negatives_per_sequence")
        if public:
            ax.axhline(public, color="tab:orange", linestyle="--", label="public scheme (any number of GPUs)")
        ax.set_xscale("log", base=2)
        ax.set_xticks([r["world_size"] for r in by_world], [str(r["world_size"]) for r in by_world])
        ax.legend(fontsize=8)
    ax.set(xlabel="ranks", ylabel="negative pairs per encoded prompt", title="Negatives per encoded prompt")
    machine = doc.get("machine", {})
    fig.suptitle(f"all arms on the same {machine.get('cpu_count', '?')}-core CPU, {machine.get('torch', '')}; "
                 f"median of the timed steps", fontsize=9)
    return save_figure(fig, Path(out_path))


FIGURES = (("time_to_quality.json", "time_to_quality.png", plot_time_to_quality),
           ("memory.json", "memory.png", plot_memory),
           ("train_throughput.json", "throughput.png", plot_throughput))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"), help="folder of the result JSONs")
    p.add_argument("--out", default=str(ROOT / "docs" / "figures"), help="where to write the PNGs")
    args = p.parse_args(argv)
    for source, target, draw in FIGURES:
        path = Path(args.results) / source
        if not path.is_file():
            print(f"skipped {target}: no {path}", file=sys.stderr)
            continue
        print(draw(path, Path(args.out) / target))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Figures: a training run's curves from ``history.jsonl``, and the benchmarks' results.

    from relbert_ds.training.plotting import plot_run
    plot_run("runs/default")            # -> runs/default/figures/{loss,lr,throughput,validation,overview}.png

``history.jsonl`` (written by the trainer on rank 0) holds one record per optimizer step
(``kind == "step"``: loss, lr, pairs_per_s, mfu, ...) and one per validation (``kind == "epoch"``
at the epoch cadence, ``"eval"`` every N steps: ``analogy`` accuracies per set, ``analogy_mean``,
``loss``), all with ``optimizer_step``, so every figure shares that x axis.

matplotlib draws headless: figures are built with :class:`matplotlib.figure.Figure` on the Agg
canvas, never through pyplot, so no display and no global state are involved.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from relbert_ds.errors import UserError

HISTORY = "history.jsonl"
VALIDATION_KINDS = ("epoch", "eval")
_DPI = 120


class PlotError(UserError):
    """A run directory or results file that cannot be drawn."""


# --------------------------------------------------------------------------- reading


def read_history(run_dir: Union[str, Path]) -> tuple[list[dict], list[dict]]:
    """(step records, validation records) of a run, each sorted by optimizer step.

    ``run_dir`` is a run directory or its ``history.jsonl``. A resumed run may repeat a step
    (the trainer truncates history on resume; an older file may not be): the last record wins.
    """
    path = Path(run_dir).expanduser()
    fix = f"fix: pass a relbert-ds run directory (the --output_dir of a training run, which holds {HISTORY})"
    if not path.exists():
        raise PlotError(f"{path} does not exist; {fix}")
    if path.is_dir():
        if not (path / HISTORY).is_file():
            raise PlotError(f"{path} has no {HISTORY}, so it is not a relbert-ds run directory; {fix}")
        path = path / HISTORY
    steps: dict[int, dict] = {}
    evals: dict[tuple, dict] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            kind, step = record.get("kind"), int(record["optimizer_step"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PlotError(f"{path}:{number} is not a history record ({exc.__class__.__name__}); fix: pass the "
                            f"history.jsonl the trainer wrote") from exc
        if kind == "step":
            steps[step] = record
        elif kind in VALIDATION_KINDS:
            evals[(step, record.get("epoch"))] = record
    if not steps and not evals:
        raise PlotError(f"{path} has no step or validation records yet; fix: plot after the first optimizer step")
    return [steps[k] for k in sorted(steps)], [evals[k] for k in sorted(evals, key=lambda k: (k[0], k[1] or 0))]


# --------------------------------------------------------------------------- drawing helpers


def _figure(width: float = 7.0, height: float = 4.0, ncols: int = 1, nrows: int = 1) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), format="png")
    return path


def _finite(values: Iterable[Any]) -> list[float]:
    return [float(v) if isinstance(v, (int, float)) and math.isfinite(v) else math.nan for v in values]


def _smooth(values: list[float], span: int) -> list[float]:
    """Exponential moving average (NaN-skipping): the trend of a noisy per-step curve."""
    alpha, out, level = 2.0 / (span + 1), [], None
    for v in values:
        if not math.isnan(v):
            level = v if level is None else alpha * v + (1 - alpha) * level
        out.append(level if level is not None else math.nan)
    return out


def _integer_steps(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _epoch_marks(ax: Any, steps: list[dict]) -> None:
    """Light vertical lines where an epoch starts (after the first)."""
    last = None
    for record in steps:
        epoch = record.get("epoch")
        if last is not None and epoch != last:
            ax.axvline(record["optimizer_step"] - 0.5, color="0.85", linewidth=0.8, zorder=0)
        last = epoch


def _draw_loss(ax: Any, steps: list[dict], evals: list[dict]) -> None:
    x = [r["optimizer_step"] for r in steps]
    y = _finite(r.get("loss") for r in steps)
    ax.plot(x, y, color="tab:blue", alpha=0.35 if len(x) > 20 else 1.0, linewidth=1, label="training loss (per step)")
    if len(x) > 20:
        ax.plot(x, _smooth(y, max(5, len(x) // 20)), color="tab:blue", linewidth=2, label="training loss (EMA)")
    val = [(r["optimizer_step"], r["loss"]) for r in evals if isinstance(r.get("loss"), (int, float))]
    if val:
        ax.plot(*zip(*val), "o-", color="tab:orange", label="validation loss")
    _epoch_marks(ax, steps)
    _integer_steps(ax)
    ax.set(xlabel="optimizer step", ylabel="loss", title="Loss")
    ax.legend(loc="best", fontsize=8)


def _draw_lr(ax: Any, steps: list[dict]) -> None:
    ax.plot([r["optimizer_step"] for r in steps], _finite(r.get("lr") for r in steps), color="tab:green")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    _epoch_marks(ax, steps)
    _integer_steps(ax)
    ax.set(xlabel="optimizer step", ylabel="learning rate", title="Learning rate")


def _draw_throughput(ax: Any, steps: list[dict]) -> None:
    x = [r["optimizer_step"] for r in steps]
    ax.plot(x, _finite(r.get("pairs_per_s") for r in steps), color="tab:purple", label="pairs/s")
    ax.set(xlabel="optimizer step", ylabel="word pairs per second (all ranks)", title="Throughput and MFU")
    ax.set_ylim(bottom=0)
    _integer_steps(ax)
    mfu = _finite(100 * r["mfu"] if isinstance(r.get("mfu"), (int, float)) else None for r in steps)
    twin = ax.twinx()
    twin.plot(x, mfu, color="tab:red", linestyle="--", label="MFU")
    twin.set_ylabel("MFU (% of peak)")
    twin.set_ylim(bottom=0)
    lines = ax.get_lines() + twin.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="lower right", fontsize=8)


def _draw_validation(ax: Any, evals: list[dict]) -> None:
    if not evals or not any(r.get("analogy") for r in evals):
        ax.text(0.5, 0.5, "no analogy validation in this run", ha="center", va="center", transform=ax.transAxes)
        ax.set(title="Validation accuracy")
        return
    x = [r["optimizer_step"] for r in evals]
    names = list(dict.fromkeys(name for r in evals for name in (r.get("analogy") or {})))
    for name in names:
        ax.plot(x, [100 * r["analogy"][name] if name in (r.get("analogy") or {}) else math.nan for r in evals],
                "o-", markersize=3, linewidth=1, label=name)
    if any("analogy_mean" in r for r in evals):
        ax.plot(x, [100 * r["analogy_mean"] if "analogy_mean" in r else math.nan for r in evals], "k-",
                linewidth=2.5, label="mean (selection)" if any(r.get("metric") == "analogy_mean" for r in evals)
                else "mean")
    best = [r for r in evals if r.get("best_step", r.get("best_epoch")) is not None]
    if best:
        last = best[-1]
        chosen = [r for r in evals if (r["optimizer_step"] == last.get("best_step")) or
                  ("best_step" not in last and r.get("epoch") == last.get("best_epoch"))]
        if chosen and "analogy_mean" in chosen[-1]:
            ax.plot([chosen[-1]["optimizer_step"]], [100 * chosen[-1]["analogy_mean"]], "*", color="gold",
                    markersize=16, markeredgecolor="k", label="best (exported)", zorder=5)
    kinds = {r.get("kind") for r in evals}
    per = "epoch" if kinds == {"epoch"} else "evaluation"
    _integer_steps(ax)
    ax.set(xlabel=f"optimizer step (one point per {per})", ylabel="accuracy %",
           title="Validation analogy accuracy")
    ax.legend(loc="best", fontsize=8, ncol=2)


# --------------------------------------------------------------------------- a run


def plot_run(run_dir: Union[str, Path], out_dir: Optional[Union[str, Path]] = None) -> list[Path]:
    """Write loss.png, lr.png, throughput.png, validation.png and overview.png (all four) for a run.

    Default ``out_dir``: ``<run_dir>/figures``. Returns the written paths.
    """
    steps, evals = read_history(run_dir)
    run_dir = Path(run_dir).expanduser()
    base = run_dir if run_dir.is_dir() else run_dir.parent
    out = Path(out_dir).expanduser() if out_dir else base / "figures"
    written = []
    for name, draw in (("loss", lambda ax: _draw_loss(ax, steps, evals)), ("lr", lambda ax: _draw_lr(ax, steps)),
                       ("throughput", lambda ax: _draw_throughput(ax, steps)),
                       ("validation", lambda ax: _draw_validation(ax, evals))):
        fig, axes = _figure()
        draw(axes[0][0])
        written.append(_save(fig, out / f"{name}.png"))
    fig, axes = _figure(13, 8, ncols=2, nrows=2)
    _draw_loss(axes[0][0], steps, evals)
    _draw_lr(axes[0][1], steps)
    _draw_throughput(axes[1][0], steps)
    _draw_validation(axes[1][1], evals)
    fig.suptitle(f"relbert-ds run {base.name}: {len(steps)} optimizer steps, {len(evals)} validations")
    written.append(_save(fig, out / "overview.png"))
    return written


# --------------------------------------------------------------------------- benchmarks


def _load(path: Union[str, Path], benchmark: str) -> dict:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PlotError(f"cannot read {path} ({exc}); fix: run benchmarks/{benchmark}.py first") from exc
    if doc.get("benchmark") != benchmark:
        raise PlotError(f"{path} is not a {benchmark} result (benchmark = {doc.get('benchmark')!r}); fix: pass "
                        f"benchmarks/results/{benchmark}.json")
    return doc


def plot_time_to_quality(results: Union[str, Path], out_path: Union[str, Path]) -> Path:
    """Accuracy against each arm's wall clock in minutes, with the zero-shot level and, at each target
    relbert-ds and another arm both reached, the speed-up over relbert-ds (the benchmark's own ratios)."""
    doc = _load(results, "time_to_quality")
    fig, axes = _figure(8, 4.8)
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
    return _save(fig, Path(out_path))


_SCHEMES = (("zero0", "ZeRO-0"), ("zero1", "ZeRO-1"), ("zero2", "ZeRO-2"), ("zero3", "ZeRO-3"),
            ("zero2_offload", "ZeRO-2 + optimizer offload"), ("zero3_offload", "ZeRO-3 + full offload"))


def plot_memory(results: Union[str, Path], out_path: Union[str, Path]) -> Path:
    """Model-state memory per GPU by ZeRO scheme (estimates, 1/8/64 GPUs) and the measured CPU runs."""
    doc = _load(results, "memory")
    gpus = sorted({e["gpus"] for e in doc["estimates"]})
    models = list(dict.fromkeys(e["model"] for e in doc["estimates"]))
    measured = (doc.get("measured") or {}).get("runs") or {}
    fig, axes = _figure(4.2 * (len(gpus) + (1 if measured else 0)), 4.8, ncols=len(gpus) + (1 if measured else 0))
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
    return _save(fig, Path(out_path))


_ARM_LABELS = {"real": "public relbert\n2.0.2 (real)", "ours": "relbert-ds", "bare": "bare PyTorch\n(same tokens)",
               "public": "public scheme\n(pad to 64)", "public_longest": "public scheme\n(pad to longest)"}


def plot_throughput(results: Union[str, Path], out_path: Union[str, Path]) -> Path:
    """Training throughput per arm (real tokens/s, MFU), the epoch time it implies, and how many
    negatives each encoded prompt serves as the number of ranks grows."""
    doc = _load(results, "train_throughput")
    arms = [k for k in ("real", "ours", "bare", "public", "public_longest") if k in doc["arms"]]
    colours = {"real": "tab:purple", "ours": "tab:blue", "bare": "0.6", "public": "tab:orange",
               "public_longest": "tab:red"}
    fig, axes = _figure(19, 4.6, ncols=4)
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
    return _save(fig, Path(out_path))

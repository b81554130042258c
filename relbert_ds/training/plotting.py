"""Figures of a training run's curves from ``history.jsonl`` (benchmarks/make_figures.py draws the
benchmarks' results on the same canvas, :func:`new_figure` and :func:`save_figure`).

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

import math
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from relbert_ds.errors import UserError
from relbert_ds.training import run_directory

_DPI = 120


class PlotError(UserError):
    """A run directory or results file that cannot be drawn."""


# --------------------------------------------------------------------------- reading


def read_history(run_dir: Union[str, Path]) -> tuple[list[dict], list[dict]]:
    """The run's step and validation records (:func:`relbert_ds.training.run_directory.read_history`);
    a history without any is a PlotError."""
    steps, evals = run_directory.read_history(run_dir)
    if not steps and not evals:
        raise PlotError(f"{run_dir} has no step or validation records yet; fix: plot after the first optimizer step")
    return steps, evals


# --------------------------------------------------------------------------- drawing helpers


def new_figure(width: float = 7.0, height: float = 4.0, ncols: int = 1, nrows: int = 1) -> tuple[Any, Any]:
    """A headless figure (Agg canvas, no pyplot state) and its ``(nrows, ncols)`` axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def save_figure(fig: Any, path: Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (its folder created)."""
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
        fig, axes = new_figure()
        draw(axes[0][0])
        written.append(save_figure(fig, out / f"{name}.png"))
    fig, axes = new_figure(13, 8, ncols=2, nrows=2)
    _draw_loss(axes[0][0], steps, evals)
    _draw_lr(axes[0][1], steps)
    _draw_throughput(axes[1][0], steps)
    _draw_validation(axes[1][1], evals)
    fig.suptitle(f"relbert-ds run {base.name}: {len(steps)} optimizer steps, {len(evals)} validations")
    written.append(save_figure(fig, out / "overview.png"))
    return written

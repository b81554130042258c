"""relbert-ds-plot and the benchmark figures: PNGs written, readable, of the expected size, with the
history's numbers on their axes; a bad run directory is one error line."""
from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import make_figures
from relbert_ds.cli import plot as plot_cli
from relbert_ds.training import plotting
from tests.assertions import assert_one_error_line

ROOT = Path(__file__).resolve().parents[3]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _step(step: int, epoch: int) -> dict:
    """A step record with the fields Trainer's step meter writes."""
    return {"kind": "step", "optimizer_step": step, "epoch": epoch, "loss": 3.0 / step + 0.01 * (step % 3),
            "lr": 1e-4 * min(1.0, step / 4), "grad_norm": 1.5, "pairs_per_s": 100.0 + step,
            "tokens_per_s": 2000.0 + step, "tflops_per_device": 0.05, "mfu": 0.01 * (1 + step % 5),
            "peak_memory_mb": 900.0, "step_seconds": 0.5, "forward_seconds": 0.2, "accuracy": 0.5}


def _validation(kind: str, step: int, epoch: int, sat: float, semeval: float, best_step: int) -> dict:
    return {"kind": kind, "epoch": epoch, "optimizer_step": step, "analogy": {"semeval2012": semeval, "sat": sat},
            "analogy_mean": (sat + semeval) / 2, "loss": 2.0 - step / 100, "metric": "analogy_mean",
            "score": (sat + semeval) / 2, "seconds": 1.2, "best_epoch": epoch, "best_step": best_step}


def _write_history(run_dir: Path, kind: str = "epoch") -> tuple[list[dict], list[dict]]:
    steps = [_step(s, (s - 1) // 10) for s in range(1, 31)]
    evals = [_validation(kind, 10, 0, 0.30, 0.40, 10), _validation(kind, 20, 1, 0.35, 0.50, 20),
             _validation(kind, 30, 2, 0.32, 0.45, 20)]
    # written in the trainer's order: an epoch's steps, then its validation
    lines = []
    for epoch in range(3):
        lines += [json.dumps(r) for r in steps if r["epoch"] == epoch]
        lines.append(json.dumps(evals[epoch]))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "history.jsonl").write_text("\n".join(lines) + "\n")
    return steps, evals


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


def _drawn_fraction(path: Path) -> float:
    """Share of pixels that are not white: an empty canvas has none."""
    import matplotlib.image

    image = matplotlib.image.imread(str(path))[..., :3]
    return float((image < 0.95).any(axis=-1).mean())


def test_cli_writes_every_figure(tmp_path, capsys):
    run_dir = tmp_path / "run"
    _write_history(run_dir, "eval")  # every-N-steps validations ("epoch" ones: test_axes_carry_the_history_numbers)
    assert plot_cli.main([str(run_dir)]) == 0
    printed = capsys.readouterr().out.split()
    names = ["loss", "lr", "throughput", "validation", "overview"]
    assert printed == [str(run_dir / "figures" / f"{n}.png") for n in names]
    for name in names:
        path = run_dir / "figures" / f"{name}.png"
        width, height = _png_size(path)
        assert (width, height) == ((13 * 120, 8 * 120) if name == "overview" else (7 * 120, 4 * 120))
        assert path.stat().st_size > 10_000
        assert 0.02 < _drawn_fraction(path) < 0.6  # lines and text, not a blank or a filled canvas
    out = tmp_path / "elsewhere"
    assert plot_cli.main([str(run_dir / "history.jsonl"), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}.png" for n in names)


def test_axes_carry_the_history_numbers(tmp_path):
    steps, evals = _write_history(tmp_path / "run")
    read_steps, read_evals = plotting.read_history(tmp_path / "run")
    assert [r["optimizer_step"] for r in read_steps] == list(range(1, 31))
    assert [r["optimizer_step"] for r in read_evals] == [10, 20, 30]

    fig, axes = plotting.new_figure(ncols=4)
    plotting._draw_loss(axes[0][0], read_steps, read_evals)
    lines = {line.get_label(): line for line in axes[0][0].get_lines()}
    np.testing.assert_allclose(lines["training loss (per step)"].get_ydata(), [r["loss"] for r in steps])
    np.testing.assert_allclose(lines["validation loss"].get_ydata(), [r["loss"] for r in evals])
    # the EMA is a trend of the raw curve: it starts at the first loss and stays within its range
    ema = np.asarray(lines["training loss (EMA)"].get_ydata())
    assert ema[0] == pytest.approx(steps[0]["loss"]) and ema.min() >= min(r["loss"] for r in steps) - 1e-12

    plotting._draw_lr(axes[0][1], read_steps)
    np.testing.assert_allclose(axes[0][1].get_lines()[0].get_ydata(), [r["lr"] for r in steps])

    plotting._draw_throughput(axes[0][2], read_steps)
    np.testing.assert_allclose(axes[0][2].get_lines()[0].get_ydata(), [r["pairs_per_s"] for r in steps])
    twin = [a for a in fig.axes if a is not axes[0][2] and a.get_shared_x_axes().joined(a, axes[0][2])]
    np.testing.assert_allclose(twin[0].get_lines()[0].get_ydata(), [100 * r["mfu"] for r in steps])

    plotting._draw_validation(axes[0][3], read_evals)
    lines = {line.get_label(): line for line in axes[0][3].get_lines()}
    np.testing.assert_allclose(lines["sat"].get_ydata(), [30.0, 35.0, 32.0])
    np.testing.assert_allclose(lines["semeval2012"].get_ydata(), [40.0, 50.0, 45.0])
    np.testing.assert_allclose(lines["mean (selection)"].get_ydata(), [35.0, 42.5, 38.5])
    # the star marks the validation the last record names as best (step 20), not the last one
    assert list(lines["best (exported)"].get_xdata()) == [20]
    assert list(lines["best (exported)"].get_ydata()) == [pytest.approx(42.5)]


def test_resumed_history_keeps_the_last_record_per_step(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first, again = _step(1, 0), {**_step(1, 0), "loss": 9.0}
    (run_dir / "history.jsonl").write_text(json.dumps(first) + "\n" + json.dumps(again) + "\n"
                                           + json.dumps({**_step(2, 0), "loss": math.nan}) + "\n")
    steps, evals = plotting.read_history(run_dir)
    assert [r["loss"] for r in steps][0] == 9.0 and math.isnan(steps[1]["loss"]) and evals == []
    assert len(plotting.plot_run(run_dir)) == 5  # a run without validation yet still draws


def _one_error_line(err: str) -> str:
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err  # nothing but the error
    return assert_one_error_line(err, "; fix: ")


def test_bad_run_dirs_are_one_error_line(tmp_path, capsys):
    assert plot_cli.main([str(tmp_path / "missing")]) == 2
    assert "missing does not exist" in _one_error_line(capsys.readouterr().err)
    (tmp_path / "not_a_run").mkdir()
    assert plot_cli.main([str(tmp_path / "not_a_run")]) == 2
    assert "has no history.jsonl" in _one_error_line(capsys.readouterr().err)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "history.jsonl").write_text("")
    assert plot_cli.main([str(tmp_path / "empty")]) == 2
    assert "no step or validation records" in _one_error_line(capsys.readouterr().err)
    (tmp_path / "garbled").mkdir()
    (tmp_path / "garbled" / "history.jsonl").write_text(json.dumps(_step(1, 0)) + "\n{not json\n")
    assert plot_cli.main([str(tmp_path / "garbled")]) == 2
    assert "history.jsonl:2 is not a history record" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "garbled" / "figures").exists()


def test_console_module_bad_run_dir(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "relbert_ds.plot", str(tmp_path / "nope")], capture_output=True,
                          text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "does not exist" in _one_error_line(proc.stderr)


def test_benchmark_figures_from_the_committed_results(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/make_figures.py", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory.png", "throughput.png", "time_to_quality.png"]
    for name in ("time_to_quality.png", "memory.png", "throughput.png"):
        width, height = _png_size(tmp_path / name)
        assert width >= 800 and height >= 400 and 0.02 < _drawn_fraction(tmp_path / name) < 0.6
    # the curves drawn are the arms' curves of the results file
    doc = json.loads((ROOT / "benchmarks" / "results" / "time_to_quality.json").read_text())
    axes = _axes_drawn(make_figures.plot_time_to_quality, "time_to_quality.json", tmp_path)
    drawn = [line for line in axes[0].get_lines() if line.get_label().startswith(("relbert-ds", "public"))]
    assert list(doc["arms"]) == ["real", "ours", "public"] and len(drawn) == 3
    assert drawn[0].get_label().startswith("public relbert 2.0.2")  # the real trainer, drawn and named first
    for line, arm in zip(drawn, ("real", "ours", "public")):
        np.testing.assert_allclose(line.get_ydata(), [100 * c["accuracy"] for c in doc["arms"][arm]["curve"]])


def test_wrong_benchmark_file_is_a_plot_error(tmp_path):
    with pytest.raises(make_figures.FigureError, match="is not a memory result"):
        make_figures.plot_memory(ROOT / "benchmarks" / "results" / "time_to_quality.json", tmp_path / "m.png")


def test_throughput_figure_draws_every_arm_of_the_results_real_trainer_first(tmp_path):
    doc = json.loads((ROOT / "benchmarks" / "results" / "train_throughput.json").read_text())
    axes = _axes_drawn(make_figures.plot_throughput, "train_throughput.json", tmp_path)
    tokens = axes[0]
    arms = [a for a in ("real", "ours", "bare", "public", "public_longest") if a in doc["arms"]]
    assert arms[0] == "real"
    assert [t.get_text() for t in tokens.get_xticklabels()][0].startswith("public relbert")
    np.testing.assert_allclose([bar.get_height() for bar in tokens.patches],
                               [doc["arms"][a]["tokens_per_s"] for a in arms])
    epochs = axes[2]
    np.testing.assert_allclose(epochs.patches[0].get_height(), doc["epoch_seconds"]["real_extrapolated"]["median"])


def _axes_drawn(plot, results_name: str, tmp_path):
    """The axes of the figure ``plot`` draws from the committed ``benchmarks/results/<results_name>``."""
    import matplotlib.figure

    captured = {}
    original = matplotlib.figure.Figure.savefig

    def keep(self, *args, **kwargs):
        captured["axes"] = self.axes
        return original(self, *args, **kwargs)

    matplotlib.figure.Figure.savefig = keep
    try:
        plot(ROOT / "benchmarks" / "results" / results_name, tmp_path / "figure.png")
    finally:
        matplotlib.figure.Figure.savefig = original
    return captured["axes"]

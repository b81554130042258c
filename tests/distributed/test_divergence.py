"""A run whose loss or gradients go non-finite stops with one line (exit 3), keeps its last checkpoint
from before the divergence as latest and exports nothing; --max_nonfinite_steps 0 lets it run on and the
summary counts the skipped updates. Real 2-rank runs (tiny BERT, ZeRO-2, fp32 on CPU)."""
import json
import math

import pytest

from relbert_ds.training.trainer import step_is_finite
from tests.assertions import assert_one_error_line
from tests.launch import deepspeed_cmd, run

TRAIN = "launchers/train.py"
# lr 1e6: the first update wrecks the weights, the loss is nan from step 2 (DeepSpeed then skips updates)
DIVERGING = ["--deepspeed_config", "ds_configs/zero2.json", "--relations_per_step", "4", "--positives_per_relation",
             "4", "--negatives_per_relation", "2", "--analogy", "sat", "--max_steps", "8", "--lr", "1e6",
             "--warmup_steps", "1", "--save_every_steps", "1"]


def history(out):
    return [r for r in map(json.loads, (out / "history.jsonl").read_text().splitlines()) if r["kind"] == "step"]


@pytest.mark.slow
def test_a_diverging_run_stops_with_one_line_and_keeps_the_last_good_checkpoint(tiny_bert, tmp_path):
    out = tmp_path / "run"
    result = run(deepspeed_cmd(TRAIN, "--model", tiny_bert, "--output_dir", str(out), *DIVERGING), timeout=300)
    assert result.returncode == 3, result.stderr[-3000:]
    assert_one_error_line(result.stderr, "training diverged", "optimizer steps 2-4 (3 in a row",
                          f"{out}/checkpoints/global_step1, is from before it", "no model was exported",
                          "lower the learning rate (this run: 1000000.0)")
    assert not (out / "model").exists() and not (out / "best_model").exists()
    assert '{"output_dir"' not in result.stdout  # no summary presented as a finished run
    # checkpoints of the non-finite steps were not written: latest is the last one before them
    assert (out / "checkpoints" / "latest").read_text() == "global_step1"
    assert sorted(p.name for p in (out / "checkpoints").glob("global_step*")) == ["global_step1"]
    steps = history(out)  # the history shows where it started
    assert [r["optimizer_step"] for r in steps] == [1, 2, 3, 4]
    assert math.isfinite(steps[0]["loss"]) and not steps[0]["update_skipped"]
    assert all(math.isnan(r["loss"]) and r["update_skipped"] for r in steps[1:])


@pytest.mark.slow
def test_max_nonfinite_steps_0_runs_on_and_the_summary_counts_skipped_updates(tiny_bert, tmp_path):
    out = tmp_path / "run"
    result = run(deepspeed_cmd(TRAIN, "--model", tiny_bert, "--output_dir", str(out), *DIVERGING,
                               "--max_nonfinite_steps", "0"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(next(line for line in result.stdout.splitlines() if line.startswith('{"output_dir"')))
    assert summary["optimizer_steps"] == 8 and summary["skipped_updates"] == 7
    assert sum(r["update_skipped"] for r in history(out)) == 7


def test_which_steps_count_as_non_finite():
    nan, inf = float("nan"), float("inf")
    assert step_is_finite(2.7, False, "fp32") and step_is_finite(2.7, False, "bf16")
    assert not step_is_finite(nan, False, "bf16")  # bf16: DeepSpeed applies non-finite updates, the loss shows it
    assert not step_is_finite(inf, True, "fp32") and not step_is_finite(nan, True, "fp16")
    assert not step_is_finite(2.7, True, "fp32")  # ZeRO 1/2 skipped a non-finite gradient norm
    assert step_is_finite(2.7, True, "fp16")  # a loss-scale overflow: normal under fp16

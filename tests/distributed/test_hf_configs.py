"""DeepSpeed JSONs as Hugging Face users write them, run for real through the command line (one
rank, tiny random BERT, CPU): the docs' ZeRO-2 and ZeRO-3 "auto" examples train and the run's
ds_config.json holds the resolved numbers; DeepSpeed's own csv monitor writes the files it
promises, with one row per optimizer step."""
import csv
import json
import math
import sys
from pathlib import Path

import pytest

from tests.launch import REPO, check, run

pytestmark = pytest.mark.slow
TINY = ["--relations_per_step", "4", "--positives_per_relation", "4", "--negatives_per_relation", "4",
        "--analogy", "sat", "--batch_size", "128"]
HIDDEN = 32  # tests.tiny_models.make_tiny_bert's default


def train(model: str, out: Path, config: Path, *extra: str, timeout: float = 400):
    """`python -m relbert_ds.cli.train`: one rank, no launcher."""
    return check(run([sys.executable, "-m", "relbert_ds.cli.train", "--deepspeed_config", str(config),
                      "--model", model, "--output_dir", str(out), *TINY, *extra], timeout=timeout))


def steps(out: Path) -> list[dict]:
    records = map(json.loads, (out / "history.jsonl").read_text().splitlines())
    return [r for r in records if r["kind"] == "step"]


def ds_warmup_lr(lr: float, warmup: int, step: int) -> float:
    """The lr DeepSpeed's WarmupLR (log warm-up from 0, its default type) gives the 1-based
    optimizer step ``step``: the scheduler starts at iteration -1 (lr 0) and moves after each step."""
    iteration = step - 2
    if iteration < 0:
        return 0.0
    return lr * min(1.0, math.log(iteration + 1) / math.log(max(2, warmup)))


def test_hf_zero2_example_trains_with_its_auto_values_filled(tiny_bert, tmp_path):
    out = tmp_path / "run"
    result = train(tiny_bert, out, REPO / "ds_configs" / "hf_zero2_auto.json", "--max_steps", "4", "--lr", "1e-4",
                   "--warmup_steps", "3")
    summary = json.loads(next(line for line in result.stdout.splitlines() if line.startswith('{"output_dir"')))
    assert summary["optimizer_steps"] == 4
    ds = json.loads((out / "ds_config.json").read_text())
    assert "auto" not in json.dumps(ds)
    params = ds["optimizer"]["params"]
    assert (params["lr"], params["betas"], params["eps"], params["weight_decay"]) == (1e-4, [0.9, 0.999], 1e-8, 0.0)
    assert ds["scheduler"] == {"type": "WarmupLR",
                               "params": {"warmup_min_lr": 0, "warmup_max_lr": 1e-4, "warmup_num_steps": 3}}
    assert ds["gradient_clipping"] == 1.0
    assert ds["zero_optimization"]["reduce_bucket_size"] == 2e8  # given in the example, not "auto": kept
    triad = ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    assert triad == (4, 4, 1)
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False  # CPU: fp32
    # DeepSpeed built the JSON's scheduler: the lr each step used follows its log warm-up
    lrs = [r["lr"] for r in steps(out)]
    assert lrs == pytest.approx([ds_warmup_lr(1e-4, 3, s) for s in (1, 2, 3, 4)], abs=1e-12)
    assert lrs[2] == pytest.approx(1e-4 * math.log(2) / math.log(3))
    assert all(math.isfinite(r["loss"]) for r in steps(out))


def test_hf_zero3_example_bucket_sizes_from_the_backbone(tiny_bert, tmp_path):
    out = tmp_path / "run"
    train(tiny_bert, out, REPO / "ds_configs" / "hf_zero3_auto.json", "--max_steps", "2")
    ds = json.loads((out / "ds_config.json").read_text())
    assert "auto" not in json.dumps(ds)
    z = ds["zero_optimization"]
    assert (z["stage"], z["reduce_bucket_size"], z["stage3_prefetch_bucket_size"],
            z["stage3_param_persistence_threshold"]) == (3, HIDDEN ** 2, 9 * HIDDEN ** 2 // 10, 10 * HIDDEN)
    # no --lr / --warmup_steps given: relbert-ds's defaults fill the "auto" values
    assert ds["optimizer"]["params"]["lr"] == 2e-5 and ds["scheduler"]["params"]["warmup_num_steps"] == 10
    assert len(steps(out)) == 2


def rows_of(path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_deepspeed_csv_monitor_writes_one_row_per_step(tiny_bert, tmp_path):
    ds = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    ds["csv_monitor"] = {"enabled": True, "output_path": str(tmp_path / "csv"), "job_name": "tiny"}
    ds["wall_clock_breakdown"] = True  # DeepSpeed then also writes its step timings
    config = tmp_path / "ds.json"
    config.write_text(json.dumps(ds))
    out = tmp_path / "run"
    train(tiny_bert, out, config, "--max_steps", "3", "--lr", "1e-4", "--warmup_steps", "4")

    folder = tmp_path / "csv" / "tiny"
    timings = ["forward", "backward", "backward_inner", "backward_allreduce", "step"]
    want = {"Train_Samples_lr.csv", *(f"Train_Samples_elapsed_time_ms_{t}.csv" for t in timings)}
    names = {p.name for p in folder.iterdir()}
    assert want <= names and "Train_Samples_loss_scale.csv" not in names  # fp32: no loss_scale file
    # relbert-ds's own scalars go to the same monitor (DeepSpeed logs only the lr and timings)
    ours = rows_of(folder / "relbert_ds_train_loss.csv")
    assert ours[0] == ["step", "loss"] and [int(r[0]) for r in ours[1:]] == [1, 2, 3]
    assert [float(r[1]) for r in ours[1:]] == pytest.approx([r["loss"] for r in steps(out)], rel=1e-6)
    assert "relbert_ds_train_pairs_per_s.csv" in names

    def rows(name: str) -> list[list[str]]:
        return rows_of(folder / name)

    samples_per_step = json.loads((out / "ds_config.json").read_text())["train_batch_size"]
    lr = rows("Train_Samples_lr.csv")
    assert lr[0] == ["step", "lr"]
    # x axis: samples seen (DeepSpeed's global_samples); value: the lr after the step (the schedule
    # has already moved on), i.e. relbert-ds's linear warm-up at the next step: 1e-4 * (k + 1) / 4
    assert [int(r[0]) for r in lr[1:]] == [samples_per_step * k for k in (1, 2, 3)]
    assert [float(r[1]) for r in lr[1:]] == pytest.approx([1e-4 * (k + 1) / 4 for k in (1, 2, 3)])
    used = [r["lr"] for r in steps(out)]  # what history.jsonl says each step used: one step behind
    assert [float(r[1]) for r in lr[1:3]] == pytest.approx(used[1:3])
    for t in timings:
        table = rows(f"Train_Samples_elapsed_time_ms_{t}.csv")
        assert table[0] == ["step", f"elapsed_time_ms_{t}"] and len(table) == 4
        assert all(float(v) >= 0 for _, v in table[1:])
    assert all(float(v) > 0 for _, v in rows("Train_Samples_elapsed_time_ms_forward.csv")[1:])

"""End to end: the same recipe (a global batch of ``--relations_per_step`` relations, ``--dropout
0``) trained for a few steps through the real command line on 1 and on 4 ranks gives the same
per-step losses (history.jsonl) and the same exported weights (model/model.safetensors), to
1e-5. Only the dropout masks depend on the world size (they are drawn per rank): with dropout
on, the batches, negatives and schedule are still the same, the numbers are not.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.launch import check, run, torchrun_cmd

pytestmark = pytest.mark.slow
TRAIN = "launchers/train.py"
STEPS = 3
# 6 relations x (3 positives + 2 negatives) = 30 prompts per step: 8, 8, 7, 7 prompts on 4 ranks.
RECIPE = ["--deepspeed_config", "ds_configs/zero2.json", "--relations_per_step", "6", "--positives_per_relation", "3",
          "--negatives_per_relation", "2", "--dropout", "0", "--max_steps", str(STEPS), "--lr", "1e-4",
          "--warmup_steps", "0", "--metric", "none", "--analogy", "--no-projector", "--no-tensorboard",
          "--no-export_best", "--seed", "5"]


def train(model: str, out: Path, world: int) -> Path:
    cmd = torchrun_cmd(TRAIN, "--model", model, "--output_dir", str(out), *RECIPE, nproc=world)
    check(run(cmd, timeout=300 + 120 * world))
    return out


def step_losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["optimizer_step"] for r in steps] == list(range(1, STEPS + 1))
    return [r["loss"] for r in steps]


def weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "model" / "model.safetensors"))


def test_one_and_four_ranks_train_the_same_model(tiny_bert, tmp_path):
    one = train(tiny_bert, tmp_path / "w1", 1)
    four = train(tiny_bert, tmp_path / "w4", 4)
    for out, world in ((one, 1), (four, 4)):
        resolved = json.loads((out / "config.json").read_text())["resolved"]
        assert resolved["world_size"] == world and resolved["relations_per_step"] == 6
    losses1, losses4 = step_losses(one), step_losses(four)
    assert max(abs(a - b) for a, b in zip(losses1, losses4)) <= 1e-5, (losses1, losses4)
    assert len({round(v, 4) for v in losses1}) == STEPS  # each step sees another batch
    w1, w4 = weights(one), weights(four)
    assert set(w1) == set(w4) and len(w1) > 20
    worst = max(float((w1[k].float() - w4[k].float()).abs().max()) for k in w1)
    assert worst <= 1e-5, worst
    # The runs trained: the exported weights moved away from the initial backbone's.
    from safetensors.torch import load_file

    initial = load_file(str(Path(tiny_bert) / "model.safetensors"))
    moved = max(float((w1[k].float() - initial[k].float()).abs().max()) for k in w1 if k in initial)
    assert moved > 1e-4, moved

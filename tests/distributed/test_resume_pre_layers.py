"""Checkpoints written before the package moved into layer subpackages still resume.

tests/fixtures/pre_layers_run_zero{0,2,3} were written by the code of commit bfcfc8b (see
tests/fixtures/make_pre_layers_checkpoints.py): a run stopped after optimizer step 2 of 4, and the
uninterrupted run's history. Today's code resumes each and must reproduce steps 3 and 4 exactly.
"""
from __future__ import annotations

import json
import shutil
import sys

import pytest

from tests.fixtures.make_pre_layers_checkpoints import HERE, TRAIN_OPTIONS
from tests.launch import REPO, check, rank_env, run


def losses(history) -> dict[int, float]:
    rows = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
    return {r["optimizer_step"]: r["loss"] for r in rows if r.get("kind") == "step"}


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_a_checkpoint_written_before_the_layer_move_resumes(stage, tmp_path):
    fixture = HERE / f"pre_layers_run_zero{stage}"
    run_dir = tmp_path / "run"
    shutil.copytree(fixture / "run", run_dir)
    result = check(run([sys.executable, "-m", "relbert_ds.train", "--deepspeed_config",
                        str(REPO / "ds_configs" / f"zero{stage}.json"),
                        "--model", str((fixture / "backbone").relative_to(REPO)),
                        "--output_dir", str(run_dir), *TRAIN_OPTIONS, "--resume", "latest"],
                       timeout=300, env=rank_env()))
    assert "global_step2" in result.stdout + result.stderr  # it did resume, not start over
    expected, resumed = losses(fixture / "expected_history.jsonl"), losses(run_dir / "history.jsonl")
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), (step, resumed, expected)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "global_step4"

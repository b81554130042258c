"""One run per run directory, with real ranks: a second run on a folder whose run is alive refuses in one
line and leaves it alone; after that run is SIGKILLed (no clean-up at all) the next --resume auto takes the
folder over and finishes. (tiny BERT, 2 ranks, ZeRO-2 on CPU)"""
import json
import subprocess
import time

import pytest

from tests.assertions import assert_one_error_line
from tests.launch import check, deepspeed_cmd, kill_group, run

pytestmark = pytest.mark.slow
TRAIN = "launchers/train.py"
ARGS = ["--deepspeed_config", "ds_configs/zero2.json", "--relations_per_step", "4", "--positives_per_relation", "2",
        "--negatives_per_relation", "1", "--metric", "none", "--analogy", "--no-projector", "--no-tensorboard",
        "--save_every_steps", "5", "--lr", "1e-4", "--warmup_steps", "0"]


def start(model, out, steps, log):
    return subprocess.Popen(deepspeed_cmd(TRAIN, "--model", model, "--output_dir", str(out), "--max_steps", str(steps),
                                          "--resume", "auto", *ARGS),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def steps_done(out):
    path = out / "history.jsonl"
    if not path.exists():
        return []
    return [r["optimizer_step"] for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "step"]


def wait_for_steps(out, n, proc, timeout=120):
    deadline = time.time() + timeout
    while len(steps_done(out)) < n:
        assert proc.poll() is None, f"the first run ended early ({proc.returncode})"
        assert time.time() < deadline, "the first run did not reach its steps in time"
        time.sleep(0.2)


def test_a_live_run_keeps_its_directory_and_a_killed_one_is_taken_over(tiny_bert, tmp_path):
    out = tmp_path / "run"
    with open(tmp_path / "first.log", "w") as log:
        first = start(tiny_bert, out, 300, log)
        try:
            wait_for_steps(out, 1, first)
            second = run(deepspeed_cmd(TRAIN, "--model", tiny_bert, "--output_dir", str(out), "--max_steps", "300",
                                       "--resume", "auto", *ARGS), timeout=300)
            assert second.returncode == 2, second.stderr[-3000:]
            assert_one_error_line(second.stderr, f"{out} is in use by another run", "heartbeat is",
                                  "fix: wait for it to end, pass another --output_dir")
            assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-3000:]
        finally:
            kill_group(first)
    assert steps_done(out) == list(range(1, 301))  # the refused run changed nothing
    assert not (out / "run.lock").exists()  # released at the end
    # A run killed outright (SIGKILL: no handler, no release) leaves its lock behind ...
    out2 = tmp_path / "run2"
    with open(tmp_path / "third.log", "w") as log:
        third = start(tiny_bert, out2, 300, log)
        try:
            wait_for_steps(out2, 6, third)
        finally:
            kill_group(third)
            third.wait()
    assert (out2 / "run.lock").exists()
    # ... and the requeued --resume auto sees that its holder is gone, takes over and finishes.
    resumed = check(run(deepspeed_cmd(TRAIN, "--model", tiny_bert, "--output_dir", str(out2), "--max_steps", "12",
                                      "--resume", "auto", *ARGS), timeout=300))
    assert "took over" in resumed.stderr and "its process is no longer running" in resumed.stderr
    assert "resumed from" in resumed.stderr
    assert steps_done(out2)[-1] == 12 and not (out2 / "run.lock").exists()

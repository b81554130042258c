"""File-system faults, each really produced under 2 running ranks (tiny model, CPU) through the
real command line:

- the disk fills up: a tmpfs of a few checkpoints' size as --output_dir. The next checkpoint is
  refused before anything is written (its size is known from the previous one), or, with that
  check turned off, the write itself fails part-way inside DeepSpeed's save;
- --output_dir cannot be created or written (a file in the way, a parent under /proc, a
  read-only mount), or is on a full file system (config.json cannot be written);
- the disk fills up while the final model is exported (then --resume latest exports it);
- a checkpoint file truncated before --resume;
- history.jsonl replaced by a folder while the run is going.

Each ends with exit status 2 on every rank within the timeout (no hang), exactly one ``error:``
line (rank 0's) that names the folder/file and the fix, no traceback; after a failed save the
partial folder is gone and ``latest`` still names the previous complete checkpoint.

The tmpfs cases need root (mount); they are skipped with the reason elsewhere.
"""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.cluster.helpers import finish, history, opts, run_ranks, snapshot, start_ranks, wait_for

pytestmark = pytest.mark.slow
TRAIN = "launchers/train.py"
NO_SPACE_CHECK = "tests/cluster/_no_space_check_train.py"
MARKER = "relbert_ds_checkpoint.json"


def one_error(results, world: int = 2) -> str:
    """Every rank exited 2, one ``error:`` line in all their output (rank 0's), no traceback."""
    report = "\n".join(f"--- rank {r.rank} (exit {r.returncode})\nstdout:\n{r.stdout[-1500:]}\nstderr:\n"
                       f"{r.stderr[-3000:]}" for r in results)
    assert [r.returncode for r in results] == [2] * world, report
    errors = [(r.rank, line) for r in results for line in (r.stdout + r.stderr).splitlines()
              if line.startswith("error:") or "] error:" in line]
    assert len(errors) == 1 and errors[0][0] == 0, f"want one 'error:' line from rank 0\n{report}"
    assert "Traceback" not in report, report
    assert "fix:" in errors[0][1], errors[0][1]
    print(f"\n{errors[0][1]}")
    return errors[0][1]


def checkpoint_bytes(model: str) -> int:
    """A 2-rank ZeRO-2 fp32 checkpoint of ``model``, about: fp32 weights + fp32 master weights and
    two Adam moments (what relbert_ds.training.checkpointing estimates before the first save)."""
    from transformers import AutoModel

    return 16 * AutoModel.from_pretrained(model).num_parameters()


def tags(run_dir: Path) -> list[str]:
    root = run_dir / "checkpoints"
    return sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []


@pytest.mark.parametrize("check", ["before_writing", "while_writing"])
def test_disk_full_at_a_checkpoint(check, tiny_bert, tmpfs):
    """Room for one checkpoint and a half: the first is written, the second does not fit."""
    size = checkpoint_bytes(tiny_bert)
    disk = tmpfs(int(1.5 * size))
    out = disk / "run"
    script = TRAIN if check == "before_writing" else NO_SPACE_CHECK
    started = time.monotonic()
    results = run_ranks(script, opts(tiny_bert, out, "--max_steps", "5", "--save_every_steps", "1",
                                     "--keep_last", "2"), world=2, timeout=600)
    seconds = time.monotonic() - started
    message = one_error(results)
    tag_dir = out / "checkpoints" / "global_step2"
    assert message.startswith(f"error: no room for checkpoint {tag_dir} "), message
    when = "(nothing was written)" if check == "before_writing" else \
        "(the disk filled up while it was written; the partial folder was removed)"
    assert when in message and "latest still names global_step1" in message, message
    assert "point --output_dir elsewhere" in message and "--keep_last 1 needs less" in message, message
    assert (out / "checkpoints" / "latest").read_text() == "global_step1"
    assert (out / "checkpoints" / "global_step1" / MARKER).is_file()
    assert tags(out) == ["global_step1"], "the partial checkpoint folder was not removed"
    assert [r["optimizer_step"] for r in history(out)] == [1, 2]
    print(f"{check}: both ranks exited 2 after {seconds:.0f} s (start-up included)")


def test_disk_full_at_the_start(tiny_bert, tmpfs):
    """A file system with no byte left: the folder and an empty file can be created, the run lock's
    contents cannot (rank 0 writes it first; every rank stops, the empty lock file is removed)."""
    disk = tmpfs(256 << 10)
    with open(disk / "filler", "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError:
            pass
    out = disk / "run"
    results = run_ranks(TRAIN, opts(tiny_bert, out, "--max_steps", "2"), world=2, timeout=400)
    message = one_error(results)
    assert message == (f"error: {out / 'run.lock'} cannot be written (no space left on device); fix: free space "
                       f"on that file system or pass another --output_dir")
    assert sorted(p.name for p in out.iterdir()) == []


@pytest.mark.parametrize("where", ["file_in_the_way", "under_proc", "read_only_mount"])
def test_output_dir_not_writable(where, tiny_bert, tmp_path, tmpfs):
    if where == "file_in_the_way":
        (tmp_path / "taken").write_text("a file")
        out, expect = tmp_path / "taken" / "run", f"{tmp_path / 'taken'} is a file, not a folder"
    elif where == "under_proc":
        out, expect = Path("/proc/relbert_ds_nowhere/run"), "cannot be created (no such file or directory)"
    else:
        out, expect = tmpfs(1 << 20, read_only=True) / "run", "cannot be created (read-only file system)"
    results = run_ranks(TRAIN, opts(tiny_bert, out, "--max_steps", "2"), world=2, timeout=300)
    message = one_error(results)
    assert message.startswith(f"error: --output_dir {out} "), message
    assert expect in message, message
    assert not out.exists()


def test_truncated_checkpoint_file_on_resume(trained_run, tiny_bert, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    shard = run_dir / "checkpoints" / "global_step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    full = shard.stat().st_size
    with open(shard, "r+b") as handle:
        handle.truncate(full // 2)
    before = snapshot(run_dir)
    results = run_ranks(TRAIN, opts(tiny_bert, run_dir, "--max_steps", "4", "--resume", "latest"), world=2,
                        timeout=300)
    message = one_error(results)
    assert message == (f"error: checkpoint file {shard} is {full // 2} bytes, it was written with {full} (truncated "
                       f"or damaged); fix: restore it, or resume from another checkpoint of {shard.parent.parent}")
    assert snapshot(run_dir) == before, "the refused resume changed the run directory"


def test_history_unwritable_mid_run(tiny_bert, tmp_path):
    out = tmp_path / "run"
    procs = start_ranks(TRAIN, opts(tiny_bert, out, "--max_steps", "2000", "--save_every_steps", "3"), world=2)
    try:
        wait_for(lambda: len(history(out)) >= 4 or any(p.poll() is not None for p in procs), 400, "4 steps")
        assert all(p.poll() is None for p in procs), "a rank ended early"
        kept = tmp_path / "history.kept"
        (out / "history.jsonl").rename(kept)
        (out / "history.jsonl").mkdir()
        moved_after = len([line for line in kept.read_text().splitlines() if line.strip()])
    finally:
        results = finish(procs, timeout=300)
    message = one_error(results)
    latest = (out / "checkpoints" / "latest").read_text()
    done = int(latest.removeprefix("global_step"))
    assert (out / "checkpoints" / latest / MARKER).is_file()
    assert message.startswith(f"error: {out / 'history.jsonl'} cannot be written (it is a folder) after optimizer "
                              f"step "), message
    step = int(message.split("after optimizer step ")[1].split(":")[0])
    assert step > moved_after - 1 and done <= step, message
    assert f"lost: the training since checkpoint {latest} (steps {done + 1}-{step}" in message, message
    assert "--resume latest re-runs those steps" in message, message
    # no checkpoint was written after the history stopped
    assert all(int(t.removeprefix("global_step")) <= step for t in tags(out))


def test_disk_full_while_exporting(tiny_bert, tmpfs):
    """Room for the last checkpoint but not for the export after it; then, with more room,
    --resume latest writes the export without training again."""
    size = checkpoint_bytes(tiny_bert)
    disk = tmpfs(int(1.25 * size))
    out = disk / "run"
    results = run_ranks(TRAIN, opts(tiny_bert, out, "--max_steps", "2"), world=2, timeout=600)
    message = one_error(results)
    assert message.startswith(f"error: no room to write {out / 'model'}: the disk filled up after "), message
    assert "fix: free space on that file system or point --output_dir elsewhere, then --resume latest" in message
    assert not (out / "model").exists() and not (out / "model.tmp").exists()
    assert (out / "checkpoints" / "latest").read_text() == "global_step2"
    steps = [r["optimizer_step"] for r in history(out)]
    assert steps == [1, 2]
    done = subprocess.run(["mount", "-o", f"remount,size={3 * size}", str(disk)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    results = run_ranks(TRAIN, opts(tiny_bert, out, "--max_steps", "2", "--resume", "latest"), world=2, timeout=600)
    assert [r.returncode for r in results] == [0, 0], "\n".join(r.stderr[-3000:] for r in results)
    assert (out / "model" / "model.safetensors").is_file()
    assert [r["optimizer_step"] for r in history(out)] == steps  # nothing trained again

"""The run-directory object and the checkpoint writer's failure paths, in one process.

The multi-rank, real-command-line versions (a real full file system, a truncated shard on resume,
an unwritable history mid-run) are in tests/cluster/test_faults_disk.py.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from relbert_ds.errors import CheckpointError, ConfigError, DiskFullError
from relbert_ds.training import checkpointing, run_directory
from relbert_ds.training.run_directory import HistoryError, RunDirectory
from tests.fakes import FakeEngine

MARKER = run_directory.MARKER


def make_checkpoint(run: RunDirectory, step: int, complete: bool = True, payload: bytes = b"x" * 100) -> Path:
    """A fake checkpoint folder: one model-states file, and the marker listing it when complete."""
    tag_dir = run.tag_dir(step)
    tag_dir.mkdir(parents=True)
    (tag_dir / "mp_rank_00_model_states.pt").write_bytes(payload)
    if complete:
        (tag_dir / MARKER).write_text(json.dumps({"step": step, "files": {"mp_rank_00_model_states.pt":
                                                                          len(payload)}}))
    return tag_dir


# ---------------------------------------------------------------------- layout and latest
def test_paths_are_the_documented_layout(tmp_path):
    run = RunDirectory(tmp_path / "run")
    assert run.checkpoints == tmp_path / "run" / "checkpoints"
    assert run.latest_file == tmp_path / "run" / "checkpoints" / "latest"
    assert run.history == tmp_path / "run" / "history.jsonl"
    assert (run.config.name, run.ds_config.name, run.results.name) == ("config.json", "ds_config.json",
                                                                        "results.json")
    assert (run.best_model.name, run.model.name, run.tensorboard.name) == ("best_model", "model", "tensorboard")
    assert run.tag_dir(12) == run.checkpoints / "global_step12"
    # the checkpoint module and the trainer use these very names
    assert (checkpointing.CHECKPOINTS, checkpointing.LATEST, checkpointing.MARKER) == \
        ("checkpoints", "latest", "relbert_ds_checkpoint.json")


def test_latest_round_trip_and_missing(tmp_path):
    run = RunDirectory(tmp_path)
    assert run.read_latest() is None and run.latest_tag_dir() is None
    run.checkpoints.mkdir()
    run.write_latest("global_step3")
    assert run.latest_file.read_text() == "global_step3"
    run.latest_file.write_text("global_step4\n")  # a hand-edited pointer with a newline
    assert run.read_latest() == "global_step4"
    assert run.latest_tag_dir() == run.checkpoints / "global_step4"
    assert not (run.checkpoints / "latest.tmp").exists()


def test_write_latest_failure_keeps_the_old_pointer(tmp_path, monkeypatch):
    run = RunDirectory(tmp_path)
    run.checkpoints.mkdir()
    run.write_latest("global_step2")

    def refuse(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError):
        run.write_latest("global_step4")
    monkeypatch.undo()
    assert run.read_latest() == "global_step2"
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["latest"]  # no latest.tmp left


def test_checkpoint_lookups_follow_latest(tmp_path):
    run = RunDirectory(tmp_path / "run")
    make_checkpoint(run, 2)
    make_checkpoint(run, 4, complete=False)
    run.write_latest("global_step2")
    assert checkpointing.latest_complete(run.path) == run.tag_dir(2)
    assert checkpointing.find_checkpoint(run.path, "latest") == run.tag_dir(2)
    # the evaluator's spellings: the run's checkpoints folder, the run folder, a tag folder
    for spec in (run.checkpoints, run.path, run.tag_dir(2)):
        assert checkpointing.resolve_tag_dir(spec) == run.tag_dir(2)
    with pytest.raises(CheckpointError, match="global_step4 is not a complete"):
        checkpointing.find_checkpoint(run.path, str(run.tag_dir(4)))
    run.write_latest("global_step4")
    assert checkpointing.latest_complete(run.path) is None
    with pytest.raises(CheckpointError, match=r"global_step4 \(named by .*latest\) is not a complete"):
        checkpointing.resolve_tag_dir(run.path)


def test_prune_keeps_the_newest_and_latest(tmp_path):
    run = RunDirectory(tmp_path)
    for step in (1, 2, 3, 5):
        make_checkpoint(run, step)
    make_checkpoint(run, 4, complete=False)  # a leftover of a kill, older than the newest complete one
    make_checkpoint(run, 6, complete=False)  # being written: newer than every complete one
    run.write_latest("global_step1")  # an old checkpoint that latest names is never pruned
    checkpointing.prune(run.checkpoints, keep_last=2)
    assert [d.name for d in run.tag_dirs()] == ["global_step1", "global_step3", "global_step5", "global_step6"]


def test_is_run_directory_and_looks_like_checkpoint(tmp_path):
    run = RunDirectory(tmp_path / "run")
    assert not run.is_run_directory() and not run.looks_like_checkpoint()
    make_checkpoint(run, 2)
    assert not run.is_run_directory()  # checkpoints alone: a copied checkpoints folder's parent
    assert run.looks_like_checkpoint()
    run.history.write_text("")
    assert run.is_run_directory()
    assert RunDirectory(run.checkpoints).looks_like_checkpoint()
    assert RunDirectory(run.tag_dir(2)).looks_like_checkpoint()
    assert not RunDirectory(tmp_path / "elsewhere").looks_like_checkpoint()
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert not RunDirectory(hf).looks_like_checkpoint() and not RunDirectory(hf).is_run_directory()


def test_existing_run_files_and_clear(tmp_path):
    run = RunDirectory(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    assert run.existing_run_files() == []
    make_checkpoint(run, 1)
    run.config.write_text("{}")
    run.history.write_text("{}\n")
    run.tensorboard.mkdir()
    assert run.existing_run_files() == ["config.json", "checkpoints"]
    run.clear()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


# ---------------------------------------------------------------------- history
def test_history_append_read_rewrite(tmp_path):
    run = RunDirectory(tmp_path)
    assert run.history_lines() == []
    run.append_history({"kind": "step", "optimizer_step": 1})
    run.append_history({"kind": "step", "optimizer_step": 2})
    assert [json.loads(line)["optimizer_step"] for line in run.history_lines()] == [1, 2]
    run.rewrite_history(run.history_lines()[:1])
    assert run.history.read_text() == json.dumps({"kind": "step", "optimizer_step": 1}) + "\n"


def test_history_replaced_by_a_folder(tmp_path):
    run = RunDirectory(tmp_path)
    run.history.mkdir()
    with pytest.raises(HistoryError) as info:
        run.append_history({"kind": "step"})
    assert str(info.value).startswith(f"{run.history} cannot be written (it is a folder); fix: ")
    with pytest.raises(HistoryError, match="cannot be read"):
        run.history_lines()
    stopped = info.value.stopped(7, run.tag_dir(4))
    assert isinstance(stopped, ConfigError)
    assert "after optimizer step 7" in str(stopped) and "since checkpoint global_step4 (steps 5-7" in str(stopped)
    assert "since the start (there is no checkpoint) (steps 1-3" in str(info.value.stopped(3, None))


# ---------------------------------------------------------------------- writable output dir
def test_check_writable_creates_and_leaves_nothing(tmp_path):
    run = RunDirectory(tmp_path / "a" / "b")
    run.check_writable()
    assert run.path.is_dir() and list(run.path.iterdir()) == []
    missing = RunDirectory(tmp_path / "c")
    missing.check_writable(create=False)  # nothing to check, nothing created
    assert not missing.path.exists()


def test_check_writable_file_in_the_way(tmp_path):
    (tmp_path / "f").write_text("a file")
    for path in (tmp_path / "f", tmp_path / "f" / "run"):
        with pytest.raises(ConfigError) as info:
            RunDirectory(path).check_writable()
        assert str(info.value) == (f"--output_dir {path} cannot be created: {tmp_path / 'f'} is a file, not a "
                                   f"folder; fix: pass an --output_dir on a writable file system (a folder you can "
                                   f"create files in)")


def test_check_writable_impossible_parent():
    with pytest.raises(ConfigError, match=r"^--output_dir /proc/relbert_ds_x/run cannot be created \(no such file "
                                          r"or directory\); fix: "):
        RunDirectory("/proc/relbert_ds_x/run").check_writable()


def test_check_writable_read_only_mount(tmpfs):
    point = tmpfs(1 << 20, read_only=True)
    with pytest.raises(ConfigError, match=rf"^--output_dir {point}/run cannot be created \(read-only file "
                                          r"system\); fix: "):
        RunDirectory(point / "run").check_writable()
    with pytest.raises(ConfigError, match=rf"^--output_dir {point} is not writable \(read-only file system\)"):
        RunDirectory(point).check_writable()


# ---------------------------------------------------------------------- space and truncation
Usage = namedtuple("Usage", "total used free")


def test_free_space_checked_before_writing(tmp_path, monkeypatch):
    run = RunDirectory(tmp_path / "run")
    make_checkpoint(run, 2, payload=b"x" * 3_000_000)
    run.write_latest("global_step2")
    needed = checkpointing.estimate_checkpoint_bytes(object(), run)
    assert needed == 3_000_000 + len((run.tag_dir(2) / MARKER).read_bytes())  # the previous checkpoint's size
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 1_200_000, 1_200_000))
    with pytest.raises(DiskFullError) as info:
        checkpointing.check_free_space(run.tag_dir(4), needed, keep_last=3)
    assert str(info.value) == (
        f"no room for checkpoint {run.tag_dir(4)} (nothing was written): it needs about 3.0 MB, 1.2 MB free; "
        f"latest still names global_step2; fix: free space on that file system or point --output_dir elsewhere; "
        f"--keep_last 1 needs less: one checkpoint kept instead of 3")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 0, needed))
    checkpointing.check_free_space(run.tag_dir(4), needed, keep_last=3)  # exactly enough: no error


def test_estimate_without_a_previous_checkpoint(tmp_path):
    class Engine:
        module = torch.nn.Linear(10, 5)  # 55 fp32 parameters

    assert checkpointing.estimate_checkpoint_bytes(Engine(), RunDirectory(tmp_path)) == 55 * 4 + 55 * 12


def test_truncated_checkpoint_file_is_named(tmp_path):
    run = RunDirectory(tmp_path / "run")
    tag_dir = make_checkpoint(run, 2)
    run.write_latest("global_step2")
    with open(tag_dir / "mp_rank_00_model_states.pt", "r+b") as handle:
        handle.truncate(40)
    message = (f"checkpoint file {tag_dir / 'mp_rank_00_model_states.pt'} is 40 bytes, it was written with 100 "
               f"(truncated or damaged); fix: restore it, or resume from another checkpoint of {run.checkpoints}")
    with pytest.raises(CheckpointError) as info:
        checkpointing.find_checkpoint(run.path, "latest")
    assert str(info.value) == message
    with pytest.raises(CheckpointError, match="is 40 bytes, it was written with 100"):
        checkpointing.resolve_tag_dir(run.checkpoints)  # the evaluator's path too
    (tag_dir / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt is missing"):
        checkpointing.find_checkpoint(run.path, "latest")


# ---------------------------------------------------------------------- the writer, one rank
def test_save_writes_the_marker_with_file_sizes(tmp_path):
    run = RunDirectory(tmp_path)
    tag_dir = checkpointing.save_checkpoint(FakeEngine(), run.path, 3, {"a": 1}, {"model": "m"}, keep_last=2)
    assert run.read_latest() == "global_step3"
    files = json.loads((tag_dir / MARKER).read_text())["files"]
    assert files == {p.name: p.stat().st_size for p in tag_dir.iterdir() if p.name != MARKER}
    assert set(files) == {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                          "rng_state_rank0.pt"}
    assert checkpointing.find_checkpoint(run.path, "latest") == tag_dir


def test_disk_full_inside_the_engine_save(tmp_path, monkeypatch):
    run = RunDirectory(tmp_path)
    checkpointing.save_checkpoint(FakeEngine(), run.path, 2, {}, {}, keep_last=2)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    engine = FakeEngine(fail_with=RuntimeError("basic_ios::clear: iostream error"))
    real_save = engine.checkpoint_engine.save
    full = {"now": False}  # the disk fills up during the engine's write: enough room before it, none after

    def fill_up(state_dict, path):
        full["now"] = True
        real_save(state_dict, path)

    engine.checkpoint_engine.save = fill_up
    real_save = fill_up
    free = lambda p: Usage(10**9, 10**9, 0) if full["now"] else Usage(10**9, 0, 10**9)  # noqa: E731
    monkeypatch.setattr(shutil, "disk_usage", free)
    with pytest.raises(DiskFullError) as info:
        # torch's message does not say "disk full": the file system's free space does
        checkpointing.save_checkpoint(engine, run.path, 4, {}, {}, keep_last=2)
    monkeypatch.undo()
    assert str(info.value).startswith(f"no room for checkpoint {run.tag_dir(4)} (the disk filled up while it was "
                                      f"written; the partial folder was removed): it needs about ")
    assert "latest still names global_step2" in str(info.value) and "--keep_last 1 needs less" in str(info.value)
    assert not run.tag_dir(4).exists() and run.read_latest() == "global_step2"
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
    assert engine.checkpoint_engine.save == real_save  # the recording wrapper is gone


def test_other_write_failure_is_a_checkpoint_error(tmp_path):
    run = RunDirectory(tmp_path)
    engine = FakeEngine(fail_with=OSError(errno.EIO, "Input/output error"))
    with pytest.raises(CheckpointError) as info:
        checkpointing.save_checkpoint(engine, run.path, 1, {}, {}, keep_last=2)
    assert not isinstance(info.value, DiskFullError)
    assert str(info.value) == (
        f"could not write checkpoint {run.tag_dir(1)} (writing mp_rank_00_model_states.pt: OSError: [Errno 5] "
        f"Input/output error); the partial folder was removed and latest still names no checkpoint; fix: check "
        f"that the file system of --output_dir is writable and healthy, then --resume latest")
    assert list(run.checkpoints.iterdir()) == []


def test_disk_full_on_a_real_tmpfs(tmpfs):
    """A real full file system (no mocks): the failed write is found, the folder removed."""
    point = tmpfs(256 << 10)
    run = RunDirectory(point / "run")

    class Big(FakeEngine):
        def __init__(self):
            super().__init__()
            self.module = torch.nn.Linear(256, 256)  # 257 kB of fp32 weights: cannot fit

    with pytest.raises(DiskFullError) as info:
        checkpointing.save_checkpoint(Big(), run.path, 1, {}, {}, keep_last=1)
    # the pre-check estimate (weights + Adam states) already refuses it: nothing is written
    assert "(nothing was written)" in str(info.value) and not run.tag_dir(1).exists()
    with pytest.raises(DiskFullError) as info:
        # without the pre-check the write itself fails
        import unittest.mock

        with unittest.mock.patch.object(checkpointing, "check_free_space", lambda *a: None):
            checkpointing.save_checkpoint(Big(), run.path, 1, {}, {}, keep_last=1)
    assert "the disk filled up while it was written" in str(info.value)
    assert list(run.checkpoints.iterdir()) == [] and shutil.disk_usage(point).used < 64 * 1024


def fill(point: Path) -> None:
    """Fill the file system of ``point`` to the last byte."""
    with open(point / "filler", "wb", buffering=0) as handle:  # unbuffered: close has nothing left to write
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError:
            pass


def test_run_json_on_a_full_disk(tmpfs):
    point = tmpfs(64 << 10)
    run = RunDirectory(point / "run")
    run.check_writable()
    fill(point)
    run.check_writable()  # an empty file still fits: writability is not room
    with pytest.raises(ConfigError) as info:
        run.write_json(run.config, {"a": "x" * 10_000})
    assert str(info.value) == (f"{run.config} cannot be written (no space left on device); fix: free space on that "
                               f"file system or pass another --output_dir")
    assert sorted(p.name for p in run.path.iterdir()) == []  # no config.json.tmp left


def test_write_folder_all_or_nothing(tmp_path):
    run = RunDirectory(tmp_path)
    run.write_folder(run.model, lambda tmp: (tmp.mkdir(), (tmp / "a.txt").write_text("one")))
    assert (run.model / "a.txt").read_text() == "one" and not (tmp_path / "model.tmp").exists()

    def fails(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "a.txt").write_text("two")
        raise OSError(errno.EACCES, "Permission denied")

    with pytest.raises(ConfigError) as info:
        run.write_folder(run.model, fails)
    assert str(info.value) == (f"could not write {run.model} (permission denied; the partial folder was removed; the "
                               f"earlier model is kept); fix: make --output_dir writable, then --resume latest")
    assert (run.model / "a.txt").read_text() == "one" and not (tmp_path / "model.tmp").exists()

    def bug(tmp: Path) -> None:
        raise RuntimeError("a shape mismatch")  # plenty of room: not the file system, keeps its traceback

    with pytest.raises(RuntimeError, match="a shape mismatch"):
        run.write_folder(run.model, bug)


def test_write_folder_on_a_full_disk(tmpfs):
    point = tmpfs(256 << 10)
    run = RunDirectory(point)

    def big(tmp: Path) -> None:
        tmp.mkdir()
        torch.save(torch.zeros(100_000), tmp / "pytorch_model.bin")  # 400 kB: torch's own wording of ENOSPC

    with pytest.raises(DiskFullError) as info:
        run.write_folder(run.best_model, big)
    assert str(info.value).startswith(f"no room to write {run.best_model}: the disk filled up after ")
    assert str(info.value).endswith("fix: free space on that file system or point --output_dir elsewhere, then "
                                    "--resume latest (it writes best_model again)")
    assert list(point.iterdir()) == []

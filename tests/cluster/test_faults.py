"""Faults, each really injected into 2 running ranks:

- one rank SIGKILLed mid-training (torchrun, the deepspeed launcher, mpirun): the whole job exits
  non-zero within 2 minutes, no process of the run is left, the last complete checkpoint loads
  and the resumed run reproduces the uninterrupted losses (lost: the steps since that checkpoint);
- a kill inside checkpoint writing, at every boundary (before a rank's first file, a torn
  DeepSpeed file, before the completeness marker, before ``latest`` moves): ``latest`` always
  names a complete checkpoint, and a chain of killed-and-resumed runs ends with exactly the
  uninterrupted run's losses;
- a rank that cannot reach the master fails within the connect timeout with a message saying so.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.assertions import error_lines
from tests.cluster.helpers import (
    finish,
    history,
    kill_group,
    opts,
    processes_mentioning,
    run_ranks,
    start_ranks,
    step_losses,
    wait_for,
)
from tests.launch import REPO, check, free_port, rank_env, run, tool, torchrun_cmd

pytestmark = pytest.mark.slow
TRAIN = "launchers/train.py"
FAULTY = "tests/cluster/_faulty_train.py"
MARKER = "relbert_ds_checkpoint.json"


def checkpoint_files_complete(tag_dir: Path, world: int = 2) -> None:
    """Every file a 2-rank ZeRO-2 checkpoint consists of is there, the marker last."""
    names = {p.name for p in tag_dir.iterdir()}
    want = {MARKER, "mp_rank_00_model_states.pt",
            *(f"rng_state_rank{r}.pt" for r in range(world)),
            *(f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world))}
    assert want <= names, f"{tag_dir} lacks {sorted(want - names)}"
    marker_time = (tag_dir / MARKER).stat().st_mtime_ns
    assert all((tag_dir / n).stat().st_mtime_ns <= marker_time for n in want), "marker written before a shard"


def latest_tag(run_dir: Path) -> Path:
    root = run_dir / "checkpoints"
    tag = root / (root / "latest").read_text().strip()
    assert (tag / MARKER).exists(), f"latest names {tag.name}, which is not complete"
    return tag


def step_of(tag_dir: Path) -> int:
    return int(tag_dir.name.removeprefix("global_step"))


def rank_pid(launcher_pid: int, rank: int) -> int:
    """The pid of rank ``rank`` among the launcher's descendants (torchrun and mpirun put each rank
    into a session of its own, so the process tree is the way to find them)."""
    import psutil

    names = {f"{k}={rank}".encode() for k in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK")}
    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            environ = set(Path(f"/proc/{child.pid}/environ").read_bytes().split(b"\0"))
            cmdline = " ".join(child.cmdline())
        except (OSError, psutil.Error):
            continue
        if environ & names and "train.py" in cmdline and "deepspeed.launcher" not in cmdline:
            return child.pid
    raise AssertionError(f"no rank {rank} under launcher {launcher_pid}")


def mpirun_cmd(script: str, *args: str) -> list[str]:
    return [tool("mpirun"), "-np", "2", tool("python"), "-m", "mpi4py", script, *args]


LAUNCHERS = {
    "torchrun": lambda *a: torchrun_cmd(TRAIN, *a),
    "deepspeed": lambda *a: [tool("deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), TRAIN, *a],
    "mpirun": lambda *a: mpirun_cmd(TRAIN, *a),
}


@pytest.fixture(scope="module")
def reference(tiny_bert, tmp_path_factory):
    """Uninterrupted 2-rank run, 16 steps (the losses every resumed run must reproduce)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    results = run_ranks(TRAIN, opts(tiny_bert, out, "--max_steps", "16"), world=2)
    assert all(r.returncode == 0 for r in results), "\n".join(r.stderr[-3000:] for r in results)
    return step_losses(out)


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_sigkill_one_rank_mid_training(launcher, tiny_bert, tmp_path, reference):
    if launcher == "mpirun" and subprocess.run([tool("mpirun"), "--version"], capture_output=True).returncode != 0:
        pytest.skip("no mpirun (pip install relbert-ds[mpi])")
    out = tmp_path / "run"
    cmd = LAUNCHERS[launcher](*opts(tiny_bert, out, "--max_steps", "2000", "--save_every_steps", "3"))
    proc = subprocess.Popen(cmd, cwd=str(REPO), env=rank_env(RELBERT_DS_COLLECTIVE_TIMEOUT="60"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for(lambda: len(history(out)) >= 7 or proc.poll() is not None, 300, "7 training steps")
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        victim = rank_pid(proc.pid, 1)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        steps_at_kill = len(history(out))
        try:
            output, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{launcher}: the job still runs 120 s after rank 1 was killed")
        seconds = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            kill_group(proc)
            proc.communicate()
    assert proc.returncode != 0, output[-3000:]
    # nothing of the run survives (ranks, launcher helpers): the output dir is on every command line
    time.sleep(1)
    assert processes_mentioning(str(out)) == [], processes_mentioning(str(out))
    tag = latest_tag(out)
    checkpoint_files_complete(tag)
    print(f"{launcher}: job ended {seconds:.1f} s after the kill (exit {proc.returncode}); "
          f"last checkpoint step {step_of(tag)}, steps logged {steps_at_kill}: "
          f"lost {steps_at_kill - step_of(tag)} step(s)")
    if launcher != "torchrun":
        return
    # The checkpoint is intact: resuming from it (at most 16 steps) reproduces the uninterrupted run.
    assert step_of(tag) < 16, f"the kill came late (checkpoint at step {step_of(tag)}): nothing left to resume"
    check(run(torchrun_cmd(TRAIN, *opts(tiny_bert, out, "--max_steps", "16", "--save_every_steps", "3",
                                         "--resume", "latest"))))
    got = step_losses(out)
    assert sorted(got) == list(range(1, 17))
    assert max(abs(got[s] - reference[s]) for s in reference) <= 1e-6


# Kill points inside checkpoint writing, in the order a save reaches them; each link of the chain
# resumes (--resume auto) from what the previous kill left and is killed at its 2nd save.
KILLS = [
    ("rng", 1, "rank 1 before writing its first file (rank 0 waits in a collective)"),
    ("engine", 0, "rank 0 after a torn model-states file, before its optimizer shard"),
    ("marker", 0, "every shard written, before the completeness marker"),
    ("latest", 0, "marker written and latest.tmp too, before latest is replaced"),
]


def test_kill_during_checkpoint_writing_never_leaves_latest_partial(tiny_bert, tmp_path, reference):
    out = tmp_path / "run"
    args = opts(tiny_bert, out, "--max_steps", "16", "--save_every_steps", "1", "--keep_last", "3", "--resume", "auto")
    env = {"RELBERT_DS_COLLECTIVE_TIMEOUT": "60"}
    previous = 0
    for point, victim, what in KILLS:
        results = run_ranks(FAULTY, args, world=2, env=env, rank_envs={victim: {"RELBERT_DS_TEST_KILL": f"{point}:2"}},
                            timeout=300)
        report = "\n".join(f"--- rank {r.rank} exit {r.returncode}\n{r.stderr[-2500:]}" for r in results)
        assert results[victim].returncode == -signal.SIGKILL, f"{point}: the kill did not happen\n{report}"
        assert all(r.returncode != 0 for r in results), report  # the survivor did not carry on alone
        assert processes_mentioning(str(out)) == []
        tag = latest_tag(out)  # complete, whatever was cut off
        checkpoint_files_complete(tag)
        assert step_of(tag) > previous, f"{point}: no progress ({tag.name})"
        newest = max(step_of(p) for p in (out / "checkpoints").glob("global_step*"))
        assert newest == step_of(tag) + 1, f"{point}: expected an unfinished global_step{step_of(tag) + 1}"
        unfinished = out / "checkpoints" / f"global_step{newest}"
        if point == "latest":
            assert (unfinished / MARKER).exists()  # complete, but latest was not moved: resume takes the older one
        else:
            assert not (unfinished / MARKER).exists()
        previous = step_of(tag)
    # The last link runs to the end; the losses equal the uninterrupted run's, step for step.
    final = run_ranks(TRAIN, args, world=2, env=env)
    assert all(r.returncode == 0 for r in final), "\n".join(r.stderr[-3000:] for r in final)
    assert "resumed from" in final[0].stderr
    got = step_losses(out)
    assert sorted(got) == list(range(1, 17))
    assert max(abs(got[s] - reference[s]) for s in reference) <= 1e-6
    assert (out / "model" / "model.safetensors").exists()


def test_a_plain_exception_on_one_rank_stops_every_rank_with_one_message(tiny_bert, tmp_path):
    """A bug (not a user error) on rank 1 only, inside the start-up checks: both ranks exit within
    seconds, non-zero, and the job prints one message (rank 0: the traceback and one error line)."""
    start = time.monotonic()
    results = run_ranks(FAULTY, opts(tiny_bert, tmp_path / "run", "--max_steps", "2"), world=2,
                        rank_envs={1: {"RELBERT_DS_TEST_RAISE": "load"}}, timeout=240)
    seconds = time.monotonic() - start
    report = "\n".join(f"--- rank {r.rank} exit {r.returncode}\n{r.stderr[-2500:]}" for r in results)
    assert [r.returncode for r in results] == [1, 1], report
    assert seconds < 120, f"{seconds:.0f} s: a rank waited for its peer (the collective timeout is 30 min)"
    errors = error_lines("\n".join(r.stdout + "\n" + r.stderr for r in results))
    assert len(errors) == 1 and "rank 1: RuntimeError: injected fault" in errors[0], report
    assert "Traceback" not in results[1].stderr and results[0].stderr.count("Traceback") == 1, report
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unreachable_master_fails_within_the_connect_timeout(tiny_bert, tmp_path):
    """Rank 1 pointed at a closed port; rank 0 of a 2-rank job started alone: both give up after
    RELBERT_DS_CONNECT_TIMEOUT seconds with a message naming the master and the fix."""
    closed = free_port()  # nothing listens there
    common = {"RELBERT_DS_CONNECT_TIMEOUT": "5", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": str(closed)}
    procs = []
    for rank, out in ((1, tmp_path / "worker"), (0, tmp_path / "lonely")):
        procs += start_ranks(TRAIN, opts(tiny_bert, out, "--max_steps", "2"), world=1,
                             env={**common, "RANK": str(rank), "LOCAL_RANK": str(rank),
                                  "MASTER_PORT": str(closed if rank == 1 else free_port())})
    start = time.monotonic()
    worker, lonely = finish(procs, timeout=120)
    assert time.monotonic() - start < 90
    for result, words in ((worker, ("rank 1 could not reach the master", f"127.0.0.1:{closed}", "within 5 s")),
                          (lonely, ("not all ranks joined", "within 5 s"))):
        errors = [line for line in (result.stdout + result.stderr).splitlines() if "error:" in line]
        assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
        assert all(w in errors[0] for w in words) and "fix:" in errors[0], errors[0]
        assert "Traceback" not in result.stderr

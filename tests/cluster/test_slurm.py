"""The real sbatch scripts on a real (local, one-node) SLURM cluster: 2 tasks on 1 CPU node, gloo.

- launchers/slurm/train.sbatch completes and exports a model (job state, per-job log, files);
- the same job sent ``scancel --signal=USR1`` mid-run checkpoints, requeues itself, resumes and
  ends with the uninterrupted job's per-step losses;
- launchers/slurm/evaluate.sbatch writes its results JSON;
- the one-deepspeed-launcher-per-node script (hostfile from ``scontrol show hostnames``,
  ``--no_ssh --node_rank``) trains, and is pre-empted and resumed the same way;
- a rank SIGKILLed under srun fails the job (not requeued) and leaves no process behind;
- a job with bad input fails once, with one message, and is not requeued.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.assertions import assert_one_error_line
from tests.cluster.helpers import processes_mentioning
from tests.launch import REPO, rank_env

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

SLURM = REPO / "launchers" / "slurm"
# The scripts' defaults are N GPU nodes; on the test cluster: 1 node, 2 CPU tasks (gloo).
CPU_JOB = ("--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=0")
STEPS = 40  # 10 steps per epoch: 4 epochs; long enough to be signalled mid-run


def train_args(model: str, out: Path, *extra: str) -> list[str]:
    return ["--model", model, "--output_dir", str(out), "--max_steps", str(STEPS), "--epochs", "10",
            "--metric", "none", "--analogy", "--no-projector", "--relations_per_rank", "4",
            "--positives_per_relation", "4", "--negatives_per_relation", "4", "--lr", "1e-4", "--warmup_steps", "2",
            "--save_every_steps", "5", *extra]


def job_env() -> dict:
    # The job inherits the submitting environment: the venv's python on the PATH, the checkout.
    return rank_env(RELBERT_DS_ROOT=str(REPO))


def step_losses(run_dir: Path) -> dict[int, float]:
    path = run_dir / "history.jsonl"
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["optimizer_step"]: r["loss"] for r in records if r["kind"] == "step"}


def job_log(folder: Path, name: str, job: int) -> str:
    return (folder / f"{name}-{job}.out").read_text(errors="replace")


def describe(cluster, job: int, folder: Path) -> str:
    logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in folder.glob("*.out"))
    return f"job {job}: {cluster.job(job)}\n{logs}\n{cluster.logs_tail()}"


def wait_until_training(cluster, job: int, out: Path, folder: Path, steps: int) -> None:
    """Wait (10 minutes at most) until the job's run has logged ``steps`` optimizer steps."""
    deadline = time.monotonic() + 600
    while len(step_losses(out)) < steps:
        state = cluster.job(job)["JobState"]
        assert state in ("PENDING", "CONFIGURING", "RUNNING"), describe(cluster, job, folder)
        assert time.monotonic() < deadline, describe(cluster, job, folder)
        time.sleep(0.1)


def pids_where(match) -> list[int]:
    """Live processes whose (argv list, environment bytes) satisfy ``match``."""
    found = []
    for pid in Path("/proc").iterdir():
        try:
            argv = (pid / "cmdline").read_bytes().split(b"\0")
            environ = (pid / "environ").read_bytes()
        except OSError:
            continue
        if match(argv, environ):
            found.append(int(pid.name))
    return found


def start_long_job(cluster, model: str, out: Path, folder: Path, save_every: int, steps: int) -> int:
    """A train.sbatch job that would run for hours, checkpointing every ``save_every`` steps; returns its
    id once ``steps`` optimizer steps are logged."""
    args = train_args(model, out)
    args[args.index("--max_steps") + 1] = "100000"
    args[args.index("--save_every_steps") + 1] = str(save_every)
    job = cluster.sbatch(SLURM / "train.sbatch", *args, options=CPU_JOB, env=job_env(), cwd=folder)
    wait_until_training(cluster, job, out, folder, steps)
    return job


def assert_failed_without_orphans(cluster, job: int, out: Path, folder: Path, info: dict) -> None:
    """The job FAILED and was not requeued, no process of the run is left, `latest` is complete."""
    log = job_log(folder, "relbert-ds-train", job)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", describe(cluster, job, folder)
    assert "training failed" in log and "not requeued" in log, log[-3000:]
    time.sleep(1)
    assert processes_mentioning(str(out)) == []
    latest = (out / "checkpoints" / "latest").read_text()
    assert (out / "checkpoints" / latest / "relbert_ds_checkpoint.json").exists(), latest


def signal_mid_run(cluster, job: int, out: Path, folder: Path, steps: int = 3) -> None:
    """Wait until the ranks are training (``steps`` logged), then send what SLURM sends before the
    time limit (--signal=USR1@...) or before pre-emption: SIGUSR1 to every task."""
    wait_until_training(cluster, job, out, folder, steps)
    cluster.cmd("scancel", "--signal=USR1", str(job))


def assert_preempted_and_resumed(info: dict, log: str, out: Path, job: int, reference: Path) -> int:
    """The job was stopped by the signal, requeued once, resumed from that checkpoint, and ends
    with the reference's per-step losses; returns the step it stopped at."""
    stopped = re.search(r"stopped by a signal after optimizer step (\d+)", log)
    assert stopped, f"the job was not stopped by the signal (finished first?)\n{log[-3000:]}"
    step = int(stopped.group(1))
    assert 3 <= step < STEPS
    # requeued by the script, restarted (SLURM_RESTART_COUNT 1), resumed from the signal's checkpoint
    assert info["Restarts"] == "1"
    assert "pre-empted: checkpoint saved, requeueing" in log
    assert f"job {job} (restart 1)" in log
    assert f"resumed from {out / 'checkpoints' / f'global_step{step}'}" in log
    # nothing but the interrupted step's remainder was redone: the same losses as without the signal
    want, got = step_losses(reference), step_losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert max(abs(got[s] - want[s]) for s in want) <= 1e-6
    assert (out / "model" / "model.safetensors").exists()
    return step


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, tiny_bert, tmp_path_factory):
    """train.sbatch, 2 tasks, run to the end: the reference for the pre-empted job."""
    folder = tmp_path_factory.mktemp("slurm_full")
    out = folder / "run"
    start = time.monotonic()
    job = slurm_cluster.sbatch(SLURM / "train.sbatch", *train_args(tiny_bert, out), options=CPU_JOB, env=job_env(),
                               cwd=folder)
    info = slurm_cluster.wait(job, timeout=600)
    return {"job": job, "info": info, "out": out, "folder": folder, "seconds": time.monotonic() - start}


def test_train_job_completes_and_exports_a_model(slurm_cluster, uninterrupted):
    job, info, out, folder = (uninterrupted[k] for k in ("job", "info", "out", "folder"))
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", describe(slurm_cluster, job, folder)
    assert info["Restarts"] == "0" and info["Requeue"] == "1"
    assert info["StdOut"] == str(folder / f"relbert-ds-train-{job}.out")  # one log per job, in the submit dir
    log = job_log(folder, "relbert-ds-train", job)
    assert f"job {job} (restart 0) on localhost: 2 tasks" in log and "training finished" in log
    assert "2 rank(s) via slurm, backend gloo" in log
    resolved = json.loads((out / "config.json").read_text())["resolved"]
    assert (resolved["world_size"], resolved["launcher"]) == (2, "slurm")
    assert sorted(step_losses(out)) == list(range(1, STEPS + 1))
    from relbert_ds import RelationEncoder

    model = out / "model"
    assert (model / "model.safetensors").exists() and (model / "config.json").exists()
    vectors = RelationEncoder.from_pretrained(str(model)).encode([("cat", "animal"), ("oak", "tree")])
    assert vectors.shape == (2, 32)


def test_preempted_job_checkpoints_requeues_and_resumes_exactly(slurm_cluster, uninterrupted, tiny_bert, tmp_path):
    out = tmp_path / "run"
    job = slurm_cluster.sbatch(SLURM / "train.sbatch", *train_args(tiny_bert, out), options=CPU_JOB, env=job_env(),
                               cwd=tmp_path)
    signal_mid_run(slurm_cluster, job, out, tmp_path)
    info = slurm_cluster.wait(job, timeout=600)
    log = job_log(tmp_path, "relbert-ds-train", job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", describe(slurm_cluster, job, tmp_path)
    step = assert_preempted_and_resumed(info, log, out, job, uninterrupted["out"])
    print(f"\nsrun: stopped after step {step}, requeued, resumed; losses equal to the uninterrupted job's")


def test_evaluate_job_writes_results(slurm_cluster, uninterrupted, tmp_path):
    model = uninterrupted["out"] / "model"
    results = tmp_path / "results.json"
    job = slurm_cluster.sbatch(SLURM / "evaluate.sbatch", "--model", str(model), "--analogy", "sat",
                               "--classification", "none", "--split", "valid", "--output", str(results),
                               options=CPU_JOB, env=job_env(), cwd=tmp_path)
    info = slurm_cluster.wait(job, timeout=600)
    assert info["JobState"] == "COMPLETED", describe(slurm_cluster, job, tmp_path)
    data = json.loads(results.read_text())
    assert data["world_size"] == 2 and data["launcher"] == "slurm"
    analogy = data["models"]["model"]["analogy"]["sat/validation"]
    assert analogy["n_questions"] == 37 and 0 <= analogy["accuracy"] <= 1
    assert "finished with status 0" in job_log(tmp_path, "relbert-ds-eval", job)


def test_hostfile_from_slurm(slurm_cluster):
    result = slurm_cluster.cmd("srun", "-n", "1", str(SLURM / "hostfile_from_slurm.sh"), "2")
    assert result.stdout == "localhost slots=2\n"
    outside = subprocess.run([str(SLURM / "hostfile_from_slurm.sh")], capture_output=True, text=True,
                             env={k: v for k, v in slurm_cluster.env().items() if not k.startswith("SLURM_JOB")})
    assert outside.returncode == 2 and "fix:" in outside.stderr


def test_deepspeed_launcher_per_node_preempted(slurm_cluster, uninterrupted, tiny_bert, tmp_path):
    """One srun task per node running `deepspeed --hostfile <scontrol show hostnames> --no_ssh
    --node_rank`; signalled mid-run it checkpoints, requeues and resumes like train.sbatch."""
    out = tmp_path / "run"
    job = slurm_cluster.sbatch(SLURM / "train_deepspeed_per_node.sbatch", *train_args(tiny_bert, out),
                               options=("--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", "--mem=0"),
                               env={**job_env(), "RELBERT_DS_GPUS_PER_NODE": "2"}, cwd=tmp_path)
    signal_mid_run(slurm_cluster, job, out, tmp_path)
    info = slurm_cluster.wait(job, timeout=600)
    assert info["JobState"] == "COMPLETED", describe(slurm_cluster, job, tmp_path)
    resolved = json.loads((out / "config.json").read_text())["resolved"]
    assert (resolved["world_size"], resolved["launcher"]) == (2, "torch")  # the deepspeed launcher's variables
    log = job_log(tmp_path, "relbert-ds-train-ds", job)
    assert "1 node(s) x 2 ranks" in log
    assert_preempted_and_resumed(info, log, out, job, uninterrupted["out"])


def test_failed_job_gives_one_message_and_is_not_requeued(slurm_cluster, tiny_bert, tmp_path):
    job = slurm_cluster.sbatch(SLURM / "train.sbatch", *train_args(tiny_bert, tmp_path / "run", "--loss", "cosine"),
                               options=CPU_JOB, env=job_env(), cwd=tmp_path)
    info = slurm_cluster.wait(job, timeout=600)
    log = job_log(tmp_path, "relbert-ds-train", job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", describe(slurm_cluster, job, tmp_path)
    assert info["Restarts"] == "0" and "not requeued" in log
    assert_one_error_line(log, "--loss 'cosine'")


def test_sigkilled_rank_fails_the_job_without_orphans(slurm_cluster, tiny_bert, tmp_path):
    """One rank SIGKILLed under srun: --kill-on-bad-exit ends the other, the job fails (not
    requeued), no process of the run is left, the last complete checkpoint stays."""
    out = tmp_path / "run"
    job = start_long_job(slurm_cluster, tiny_bert, out, tmp_path, save_every=3, steps=7)

    def rank1(argv: list[bytes], environ: bytes) -> bool:
        cmdline = b" ".join(argv)
        return (b"SLURM_PROCID=1" in environ.split(b"\0") and b"launchers/train.py" in cmdline and b"python" in cmdline
                and not cmdline.startswith(b"bash"))

    victims = pids_where(rank1)
    assert victims, "rank 1 not found"
    os.kill(victims[0], signal.SIGKILL)
    killed = time.monotonic()
    info = slurm_cluster.wait(job, timeout=120)
    seconds = time.monotonic() - killed
    assert seconds < 120
    print(f"\nsrun: job {info['JobState']} {seconds:.1f} s after rank 1 was killed (exit {info['ExitCode']})")
    assert_failed_without_orphans(slurm_cluster, job, out, tmp_path, info)


def test_a_job_on_fewer_tasks_resumes_the_run_with_resume_auto(slurm_cluster, tiny_bert, tmp_path):
    """A preemptible cluster hands back fewer GPUs: the run checkpointed by a 2-task job continues in a
    1-task job with the same command (--resume auto), its ZeRO-2 states converted for one rank."""
    out = tmp_path / "run"
    args = ["--model", tiny_bert, "--output_dir", str(out), "--metric", "none", "--analogy", "--no-projector",
            "--relations_per_step", "8", "--positives_per_relation", "4", "--negatives_per_relation", "4",
            "--lr", "1e-4", "--warmup_steps", "2", "--save_every_steps", "5", "--resume", "auto"]
    first = slurm_cluster.sbatch(SLURM / "train.sbatch", *args, "--max_steps", "10", options=CPU_JOB, env=job_env(),
                                 cwd=tmp_path)
    info = slurm_cluster.wait(first, timeout=600)
    assert info["JobState"] == "COMPLETED", describe(slurm_cluster, first, tmp_path)
    one_task = tuple(o if not o.startswith("--ntasks-per-node") else "--ntasks-per-node=1" for o in CPU_JOB)
    second = slurm_cluster.sbatch(SLURM / "train.sbatch", *args, "--max_steps", "15", options=one_task,
                                  env=job_env(), cwd=tmp_path)
    info = slurm_cluster.wait(second, timeout=600)
    log = job_log(tmp_path, "relbert-ds-train", second)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", describe(slurm_cluster, second, tmp_path)
    assert f"resumed from {out / 'checkpoints' / 'global_step10'}" in log
    assert "resuming a checkpoint written by 2 ranks with 1: ZeRO-2 states converted" in log
    assert sorted(step_losses(out)) == list(range(1, 16))
    assert json.loads((out / "config.json").read_text())["resolved"]["world_size"] == 1


def test_sigterm_to_srun_ends_the_step_without_orphans_and_keeps_the_last_checkpoint(slurm_cluster, tiny_bert,
                                                                                      tmp_path):
    """`kill <pid of srun>` (a user, or a wrapper that ends the step): srun does not pass SIGTERM on, it
    terminates the step, and the tasks are SIGKILLed at once (seen with Debian's Slurm): no process of the
    run is left, the job fails without a requeue, and `latest` names the last complete checkpoint.
    (A graceful stop is `scancel --signal=USR1` or `--signal=TERM`: the tasks then checkpoint first.)"""
    out = tmp_path / "run"
    job = start_long_job(slurm_cluster, tiny_bert, out, tmp_path, save_every=2, steps=5)
    sruns = pids_where(lambda argv, environ: argv[0].endswith(b"srun")
                       and f"SLURM_JOB_ID={job}".encode() in environ.split(b"\0"))
    assert sruns, "srun of the job not found"
    os.kill(sruns[0], signal.SIGTERM)
    info = slurm_cluster.wait(job, timeout=120)
    assert_failed_without_orphans(slurm_cluster, job, out, tmp_path, info)

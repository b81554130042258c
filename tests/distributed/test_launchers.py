"""Every way users launch training really starts the ranks and trains: the deepspeed launcher,
torchrun, mpirun (mpi4py), srun's environment (two processes with SLURM's variables, as srun
starts them), and plain python (one rank). The real SLURM cluster is exercised in tests/cluster."""
import json
import subprocess
from pathlib import Path

import pytest

from tests.launch import REPO, check, deepspeed_cmd, rank_env, run, slurm_job_id_with_free_port, tool, torchrun_cmd

pytestmark = pytest.mark.slow
TRAIN = "launchers/train.py"


def opts(model: str, out: Path) -> list[str]:
    return ["--model", model, "--output_dir", str(out), "--max_steps", "2", "--epochs", "1", "--metric", "none",
            "--analogy", "--no-projector", "--relations_per_rank", "4", "--deepspeed_config", "ds_configs/zero2.json"]


def assert_trained(out: Path, world: int, launcher: str) -> None:
    config = json.loads((out / "config.json").read_text())["resolved"]
    assert (config["world_size"], config["launcher"]) == (world, launcher)
    steps = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["optimizer_step"] for r in steps if r["kind"] == "step"] == [1, 2]
    assert (out / "model" / "model.safetensors").exists()


def test_deepspeed_launcher(tiny_bert, tmp_path):
    check(run(deepspeed_cmd(TRAIN, *opts(tiny_bert, tmp_path / "r"))))
    assert_trained(tmp_path / "r", 2, "torch")


def test_torchrun(tiny_bert, tmp_path):
    check(run(torchrun_cmd(TRAIN, *opts(tiny_bert, tmp_path / "r"))))
    assert_trained(tmp_path / "r", 2, "torch")


def test_mpirun(tiny_bert, tmp_path):
    mpirun = tool("mpirun")
    if subprocess.run([mpirun, "--version"], capture_output=True).returncode != 0:
        pytest.skip("no mpirun (pip install relbert-ds[mpi])")
    check(run([mpirun, "-np", "2", tool("python"), "-m", "mpi4py", TRAIN, *opts(tiny_bert, tmp_path / "r")]))
    assert_trained(tmp_path / "r", 2, "mpi")


def test_srun_environment(tiny_bert, tmp_path):
    """What srun gives each task: SLURM_PROCID/LOCALID/STEP_NUM_TASKS, the node list, the job id."""
    job = slurm_job_id_with_free_port()
    procs = []
    for rank in range(2):
        env = rank_env(SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_STEP_NUM_TASKS="2",
                       SLURM_NTASKS="2", SLURM_STEP_NUM_NODES="1", SLURM_JOB_NUM_NODES="1",
                       SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID=str(job))
        procs.append(subprocess.Popen([tool("python"), TRAIN, *opts(tiny_bert, tmp_path / "r")], cwd=str(REPO), env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      start_new_session=True))
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-4000:]
    assert_trained(tmp_path / "r", 2, "slurm")


def test_plain_python_single_rank(tiny_bert, tmp_path):
    check(run([tool("python"), TRAIN, *opts(tiny_bert, tmp_path / "r")]))
    assert_trained(tmp_path / "r", 1, "single")

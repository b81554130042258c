"""What the launch scripts hand their ranks on several nodes, checked by running the real scripts
with a stand-in for the program they start (each rank records its environment instead of training):

- launchers/mpi/train_mpi.sh with Debian's Open MPI and a second "node" reached through a stand-in
  for ssh that starts Open MPI's daemon with an empty environment, as on another machine: the
  NCCL_*/CUDA_*/TORCH_*/MASTER_* variables and PYTHONPATH must reach the ranks there;
- train.sbatch and train_deepspeed_per_node.sbatch on the local SLURM cluster (Slurm 22.05): their
  srun steps get the job's --cpus-per-task (srun of 22.05-23.02 ignores it otherwise);
- train_deepspeed_per_node.sbatch runs the real deepspeed launcher and its ranks keep the GPU ids
  SLURM gave the node (CUDA_VISIBLE_DEVICES), with the ranks-per-node variable it really sets.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from relbert_ds.parallel.distributed import discover
from tests.launch import REPO, rank_env, tool

pytestmark = pytest.mark.slow

SLURM = REPO / "launchers" / "slurm"
OPEN_MPI = "/usr/bin/mpirun.openmpi"


def _executable(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip())
    path.chmod(0o755)
    return path


# ---------------------------------------------------------------- mpirun: forwarding to other nodes
def test_train_mpi_forwards_the_ranks_variables_to_another_node(tmp_path):
    if shutil.which(OPEN_MPI) is None or subprocess.run([OPEN_MPI, "--version"], capture_output=True).returncode:
        pytest.skip("no Open MPI mpirun (apt-get install openmpi-bin)")
    # Open MPI starts its daemon on a host that is not this one through the "ssh" agent; this one
    # runs it here with an empty environment, which is what a real remote shell gives.
    agent = _executable(tmp_path / "fake_ssh", """
        #!/bin/bash
        while [[ $1 == -* ]]; do shift; done
        shift  # the host
        exec env -i HOME="$HOME" PATH=/usr/bin:/bin /bin/bash -c "$*"
    """)
    record = _executable(tmp_path / "python", f"""
        #!/bin/bash
        env > {tmp_path}/rank$OMPI_COMM_WORLD_RANK.env
    """)
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=1\n127.0.0.2 slots=1\n")  # 127.0.0.2: not an address of any interface
    env = rank_env(RELBERT_DS_NP="2", RELBERT_DS_PPN="1", RELBERT_DS_HOSTFILE=str(hostfile),
                   RELBERT_DS_MPIRUN=OPEN_MPI, RELBERT_DS_PYTHON=str(record),
                   RELBERT_DS_MPI_ARGS=f"--mca plm_rsh_agent {agent}",
                   NCCL_DEBUG="INFO", NCCL_SOCKET_IFNAME="eth7", TORCH_NCCL_BLOCKING_WAIT="1",
                   CUDA_DEVICE_ORDER="PCI_BUS_ID", MASTER_ADDR="10.9.8.7", MASTER_PORT="29123",
                   PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True", UNRELATED_VARIABLE="x")
    env.pop("SLURM_JOB_ID", None)
    done = subprocess.run([str(REPO / "launchers" / "mpi" / "train_mpi.sh"), "--output_dir", "unused"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = {}
    for r in (0, 1):
        lines = (tmp_path / f"rank{r}.env").read_text().splitlines()
        ranks[r] = dict(line.split("=", 1) for line in lines if "=" in line)
    remote = ranks[1]
    assert "UNRELATED_VARIABLE" not in remote, "rank 1 inherited the environment: it did not run on another node"
    for name in ("NCCL_DEBUG", "NCCL_SOCKET_IFNAME", "TORCH_NCCL_BLOCKING_WAIT", "CUDA_DEVICE_ORDER", "MASTER_ADDR",
                 "MASTER_PORT", "PYTORCH_CUDA_ALLOC_CONF", "PYTHONPATH", "OMP_NUM_THREADS", "HF_HUB_OFFLINE"):
        assert remote.get(name) == env[name], f"{name} did not reach the other node"
    assert remote["RELBERT_DS_NP"] == "2"  # relbert-ds's own variables too


# ---------------------------------------------------------------- SLURM
def _job_env(**extra: str) -> dict:
    return rank_env(RELBERT_DS_ROOT=str(REPO), **extra)


def _job_log(folder: Path, name: str, job: int) -> str:
    return (folder / f"{name}-{job}.out").read_text(errors="replace")


def test_train_sbatch_passes_cpus_per_task_to_srun(slurm_cluster, tmp_path):
    """The step's tasks get --cpus-per-task (scontrol shows it as TresPerTask=cpu:2); before the
    export, srun of Slurm 22.05 ran them with one CPU each."""
    record = _executable(tmp_path / "python", """
        #!/bin/bash
        echo "step: $(scontrol show step "$SLURM_JOB_ID.$SLURM_STEP_ID" | grep -o 'TresPerTask=[^ ]*' || echo none)"
    """)
    job = slurm_cluster.sbatch(SLURM / "train.sbatch", "--output_dir", "unused",
                               options=("--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=2", "--gpus-per-node=0",
                                        "--mem=0"),
                               env=_job_env(RELBERT_DS_PYTHON=str(record)), cwd=tmp_path)
    info = slurm_cluster.wait(job, timeout=120)
    log = _job_log(tmp_path, "relbert-ds-train", job)
    assert info["JobState"] == "COMPLETED", log
    assert "step: TresPerTask=cpu:2" in log, log


def test_deepspeed_per_node_keeps_slurms_gpu_ids_and_cpus(slurm_cluster, tmp_path):
    """SLURM gave the node GPUs 3 and 5 (CUDA_VISIBLE_DEVICES=3,5): the script runs the real deepspeed
    launcher with --include naming them, so its ranks see 3,5 (before: the launcher's 0,1, another
    job's GPUs on a shared node), with LOCAL_SIZE 2, which discovery reads; the launcher's step has
    the job's CPUs."""
    record = tmp_path / "record.py"
    record.write_text(textwrap.dedent(f"""
        import json, os, subprocess
        step_id = os.environ["SLURM_JOB_ID"] + "." + os.environ["SLURM_STEP_ID"]
        step = subprocess.run(["scontrol", "show", "step", step_id], capture_output=True, text=True).stdout
        env = dict(os.environ, STEP=step)
        open("{tmp_path}/rank" + os.environ["RANK"] + ".json", "w").write(json.dumps(env))
    """))
    # RELBERT_DS_PYTHON's folder holds the deepspeed the script runs: the real one, on record.py
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "deepspeed", f"""
        #!/bin/bash
        args=()
        for a in "$@"; do [ "$a" = launchers/train.py ] && a={record}; args+=("$a"); done
        exec {tool("deepspeed")} "${{args[@]}}"
    """)
    job = slurm_cluster.sbatch(SLURM / "train_deepspeed_per_node.sbatch", "--output_dir", "unused",
                               options=("--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", "--mem=0"),
                               env=_job_env(RELBERT_DS_PYTHON=str(bin_dir / "python"), RELBERT_DS_GPUS_PER_NODE="2",
                                            CUDA_VISIBLE_DEVICES="3,5", DS_ACCELERATOR="cpu"),
                               cwd=tmp_path)
    info = slurm_cluster.wait(job, timeout=300)
    log = _job_log(tmp_path, "relbert-ds-train-ds", job)
    assert info["JobState"] == "COMPLETED", log
    envs = {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)}
    for rank, env in envs.items():
        assert env["CUDA_VISIBLE_DEVICES"] == "3,5", f"rank {rank} got GPUs {env['CUDA_VISIBLE_DEVICES']}"
        info_r = discover(env)
        assert (info_r.rank, info_r.local_rank, info_r.world_size, info_r.local_world_size) == (rank, rank, 2, 2)
        assert "TresPerTask=cpu:2" in env["STEP"], env["STEP"]


def test_deepspeed_per_node_refuses_fewer_gpus_than_ranks(slurm_cluster, tmp_path):
    job = slurm_cluster.sbatch(SLURM / "train_deepspeed_per_node.sbatch", "--output_dir", "unused",
                               options=("--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=0"),
                               env=_job_env(RELBERT_DS_GPUS_PER_NODE="2", CUDA_VISIBLE_DEVICES="4"), cwd=tmp_path)
    info = slurm_cluster.wait(job, timeout=120)
    log = _job_log(tmp_path, "relbert-ds-train-ds", job)
    assert info["JobState"] == "FAILED", log
    errors = [line for line in log.splitlines() if "error:" in line and not line.startswith("srun: ")]
    assert errors == ["[train_deepspeed_per_node.sbatch] error: node 0 has 1 GPU(s) (CUDA_VISIBLE_DEVICES=4) for 2 "
                      "ranks; fix: request --gpus-per-node=2 or set RELBERT_DS_GPUS_PER_NODE=1"], log

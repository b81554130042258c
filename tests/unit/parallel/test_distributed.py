"""Rank discovery from each launcher's environment, without launching anything.

The variables are the ones each launcher really sets (torchrun and the deepspeed launcher:
torch.distributed.run / deepspeed.launcher.launch; srun: SLURM's srun(1) OUTPUT ENVIRONMENT VARIABLES;
Open MPI: mpirun(1) "Exported Environment Variables"; MPICH's Hydra: PMI_* and MPI_LOCAL*).
Real launches of each are in tests/distributed/test_launchers.py and tests/cluster/.
"""
from __future__ import annotations

import pytest

from relbert_ds.errors import DistributedError
from relbert_ds.parallel import distributed
from relbert_ds.parallel.distributed import DistInfo, discover, env_rank, expand_nodelist

TORCHRUN = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
            "MASTER_ADDR": "node01", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "none"}
# The deepspeed launcher (deepspeed.launcher.launch) sets LOCAL_SIZE, not LOCAL_WORLD_SIZE
# (test_launcher_env.py runs the real one).
DEEPSPEED = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29600",
             "CROSS_RANK": "1", "CROSS_SIZE": "2", "LOCAL_SIZE": "2"}
SRUN = {"SLURM_PROCID": "6", "SLURM_LOCALID": "2", "SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_NUM_NODES": "2",
        "SLURM_JOB_NUM_NODES": "2", "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_JOB_ID": "123456", "SLURM_NTASKS": "8"}
OPEN_MPI = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_ADDR": "head", "MASTER_PORT": "29700"}
MPICH = {"PMI_RANK": "2", "PMI_SIZE": "3", "MPI_LOCALRANKID": "2", "MPI_LOCALNRANKS": "3",
         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29800"}


def without_port(info: DistInfo) -> tuple:
    return (info.rank, info.local_rank, info.world_size, info.local_world_size, info.master_addr, info.launcher)


def test_torchrun():
    assert discover(TORCHRUN) == DistInfo(5, 1, 8, 4, "node01", 29500, "torch")


def test_deepspeed_launcher_local_size_is_the_ranks_per_node():
    assert discover(DEEPSPEED) == DistInfo(3, 1, 4, 2, "10.0.0.1", 29600, "torch")


def test_torch_variables_without_a_local_size_count_the_whole_world_as_local():
    env = {k: v for k, v in DEEPSPEED.items() if k != "LOCAL_SIZE"}
    assert discover(env) == DistInfo(3, 1, 4, 4, "10.0.0.1", 29600, "torch")


def test_torch_variables_win_over_slurm_ones():
    """torchrun started inside an sbatch script: SLURM_PROCID is the script's task, not the rank."""
    assert discover({**SRUN, "SLURM_STEP_NUM_TASKS": "1", **TORCHRUN}).launcher == "torch"


def test_torch_variables_without_a_master_are_refused_with_the_fix():
    with pytest.raises(DistributedError, match="MASTER_ADDR and MASTER_PORT is not; fix: set MASTER_ADDR"):
        discover({"RANK": "1", "WORLD_SIZE": "2"})
    # One rank needs no master: a private port on loopback.
    info = discover({"RANK": "0", "WORLD_SIZE": "1"})
    assert without_port(info) == (0, 0, 1, 1, "127.0.0.1", "torch") and info.master_port > 0


def test_srun_two_nodes_master_is_the_first_host_and_the_port_comes_from_the_job_id():
    info = discover(SRUN)
    assert info == DistInfo(6, 2, 8, 4, "gpu07", 15000 + 123456 % 20000, "slurm")


def test_srun_one_node_uses_loopback_and_tasks_per_node():
    env = {**SRUN, "SLURM_STEP_NUM_NODES": "1", "SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS_PER_NODE": "8",
           "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    assert discover(env) == DistInfo(0, 0, 8, 8, "127.0.0.1", 15000 + 123456 % 20000, "slurm")


def test_srun_master_variables_win():
    info = discover({**SRUN, "MASTER_ADDR": "login1", "MASTER_PORT": "31000"})
    assert (info.master_addr, info.master_port) == ("login1", 31000)


def test_a_batch_script_outside_srun_is_one_rank():
    """sbatch runs the script as task 0 with SLURM_PROCID but no step: it must not wait for peers."""
    env = {k: v for k, v in SRUN.items() if not k.startswith("SLURM_STEP")}
    assert discover(env).launcher == "single" and discover(env).world_size == 1


def test_open_mpi_with_a_master_given():
    assert discover(OPEN_MPI) == DistInfo(3, 1, 4, 2, "head", 29700, "mpi")


def test_mpich_hydra_with_a_master_given():
    assert discover(MPICH) == DistInfo(2, 2, 3, 3, "127.0.0.1", 29800, "mpi")


def test_mpi_master_is_agreed_over_mpi_when_not_given(monkeypatch):
    asked = []
    monkeypatch.setattr(distributed, "_mpi_master", lambda rank: asked.append(rank) or ("rank0-host", 29999))
    env = {k: v for k, v in OPEN_MPI.items() if not k.startswith("MASTER")}
    assert discover(env) == DistInfo(3, 1, 4, 2, "rank0-host", 29999, "mpi") and asked == [3]
    single = discover({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "1"})  # no handshake for one rank
    assert without_port(single) == (0, 0, 1, 1, "127.0.0.1", "mpi") and asked == [3]


def test_nothing_set_is_a_single_process():
    info = discover({})
    assert without_port(info) == (0, 0, 1, 1, "127.0.0.1", "single") and info.master_port > 0


@pytest.mark.parametrize("env,rank", [(TORCHRUN, 5), (DEEPSPEED, 3), (SRUN, 6), (OPEN_MPI, 3), (MPICH, 2), ({}, 0)])
def test_env_rank_reads_every_launcher(env, rank):
    assert env_rank(env) == rank


@pytest.mark.parametrize("nodelist,hosts", [
    ("gpu07", ["gpu07"]),
    ("gpu[07-09]", ["gpu07", "gpu08", "gpu09"]),
    ("gpu[01-02,10],cpu5", ["gpu01", "gpu02", "gpu10", "cpu5"]),
    ("n[8-10]-ib", ["n8-ib", "n9-ib", "n10-ib"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts

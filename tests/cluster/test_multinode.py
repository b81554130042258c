"""Multi-node without a cluster: two launcher invocations act as node 0 and node 1 of one job
(node rank, master address and port), on this machine:

- torchrun --nnodes 2 --node_rank 0|1, one rank per "node", both on 127.0.0.1;
- the deepspeed launcher with a hostfile of two nodes, --no_ssh --node_rank 0|1 (what
  train_deepspeed_per_node.sbatch runs on each node);
- two network namespaces joined by a veth pair, so that each node has an address of its own and
  the ranks must find each other over that link (root and `ip netns` needed; skipped otherwise);
- launchers/mpi/train_mpi.sh with a hostfile, with MPICH's Hydra from the venv and with Debian's
  Open MPI (openmpi-bin; skipped where it is not installed).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.cluster.helpers import FAST, kill_group, step_losses
from tests.launch import REPO, free_port, rank_env, tool

pytestmark = pytest.mark.slow
TRAIN = "launchers/train.py"


def opts(model: str, out: Path) -> list[str]:
    return ["--model", model, "--output_dir", str(out), "--max_steps", "2", *FAST]


def run_nodes(commands: list[list[str]], envs: list[dict], timeout: float = 300) -> list[tuple[int, str]]:
    procs = [subprocess.Popen(cmd, cwd=str(REPO), env=rank_env(**env), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for cmd, env in zip(commands, envs)]
    results = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            results.append((p.returncode, out))
    except subprocess.TimeoutExpired:
        for p in procs:
            kill_group(p)
        raise AssertionError("the nodes did not finish: " + " | ".join(p.communicate()[0][-2000:] for p in procs))
    return results


def assert_two_node_run(out: Path, results: list[tuple[int, str]], launcher: str = "torch") -> None:
    assert all(rc == 0 for rc, _ in results), "\n".join(f"--- exit {rc}\n{o[-3000:]}" for rc, o in results)
    resolved = json.loads((out / "config.json").read_text())["resolved"]
    assert (resolved["world_size"], resolved["launcher"]) == (2, launcher)
    assert sorted(step_losses(out)) == [1, 2]
    assert {p.name for p in (out / "checkpoints" / "global_step2").glob("rng_state_rank*.pt")} == \
        {"rng_state_rank0.pt", "rng_state_rank1.pt"}
    assert (out / "model" / "model.safetensors").exists()


def torchrun_node(node: int, addr: str, port: int, *args: str) -> list[str]:
    return [tool("torchrun"), "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
            "--master_addr", addr, "--master_port", str(port), TRAIN, *args]


def test_torchrun_two_nodes(tiny_bert, tmp_path):
    out, port = tmp_path / "run", free_port()
    results = run_nodes([torchrun_node(n, "127.0.0.1", port, *opts(tiny_bert, out)) for n in (0, 1)], [{}, {}])
    assert_two_node_run(out, results)


def test_deepspeed_launcher_two_nodes_no_ssh(tiny_bert, tmp_path):
    out, port = tmp_path / "run", free_port()
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")  # names only: --no_ssh never contacts them
    commands = [[tool("deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(n),
                 "--master_addr", "127.0.0.1", "--master_port", str(port), TRAIN, *opts(tiny_bert, out)]
                for n in (0, 1)]
    assert_two_node_run(out, run_nodes(commands, [{}, {}]))


# ---------------------------------------------------------------- two network namespaces


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no `ip` (iproute2)"
    probe = f"rdsprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@pytest.fixture
def two_namespaces():
    """ns0 (10.213.0.1, v0) <-veth-> ns1 (10.213.0.2, v1); deleted afterwards."""
    why = _netns_unavailable()
    if why:
        pytest.skip(why)
    tag = f"rds{os.getpid() % 100000}"
    names = [f"{tag}n0", f"{tag}n1"]
    steps = [["ip", "netns", "add", names[0]], ["ip", "netns", "add", names[1]],
             ["ip", "link", "add", "v0", "netns", names[0], "type", "veth", "peer", "name", "v1", "netns", names[1]],
             ["ip", "-n", names[0], "addr", "add", "10.213.0.1/24", "dev", "v0"],
             ["ip", "-n", names[1], "addr", "add", "10.213.0.2/24", "dev", "v1"]]
    for i, ns in enumerate(names):
        steps += [["ip", "-n", ns, "link", "set", "lo", "up"], ["ip", "-n", ns, "link", "set", f"v{i}", "up"]]
    try:
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True)
            if done.returncode != 0:
                pytest.skip(f"{' '.join(step)}: {done.stderr.strip()}")
        yield names
    finally:
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_two_nodes_in_network_namespaces(two_namespaces, tiny_bert, tmp_path):
    """Each node has its own address; gloo must use the veth (GLOO_SOCKET_IFNAME), as on a real
    cluster where the host name may resolve to an interface the other node cannot reach."""
    out, port = tmp_path / "run", 29000 + os.getpid() % 1000
    commands = [["ip", "netns", "exec", ns, *torchrun_node(n, "10.213.0.1", port, *opts(tiny_bert, out))]
                for n, ns in enumerate(two_namespaces)]
    results = run_nodes(commands, [{"GLOO_SOCKET_IFNAME": "v0"}, {"GLOO_SOCKET_IFNAME": "v1"}])
    assert_two_node_run(out, results)


# ---------------------------------------------------------------- MPI


MPIRUNS = {"mpich": tool("mpirun"),  # pip's MPICH (relbert-ds[mpi]) in the venv
           "openmpi": "/usr/bin/mpirun.openmpi"}  # Debian's openmpi-bin


@pytest.mark.parametrize("flavour", list(MPIRUNS))
def test_train_mpi_script_with_hostfile(flavour, tiny_bert, tmp_path):
    mpirun = MPIRUNS[flavour]
    if shutil.which(mpirun) is None or subprocess.run([mpirun, "--version"], capture_output=True).returncode != 0:
        how = "pip install relbert-ds[mpi]" if flavour == "mpich" else "apt-get install openmpi-bin"
        pytest.skip(f"no {flavour} mpirun ({how})")
    out = tmp_path / "run"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")  # the DeepSpeed/Open MPI format; converted for MPICH
    results = run_nodes([[str(REPO / "launchers" / "mpi" / "train_mpi.sh"), *opts(tiny_bert, out)]],
                        [{"RELBERT_DS_NP": "2", "RELBERT_DS_HOSTFILE": str(hostfile),
                          "RELBERT_DS_MPIRUN": mpirun, "RELBERT_DS_PYTHON": tool("python")}])
    assert {"mpich": "MPICH (Hydra)", "openmpi": "Open MPI"}[flavour] in results[0][1], results[0][1][-3000:]
    assert_two_node_run(out, results, launcher="mpi")

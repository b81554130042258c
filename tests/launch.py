"""Launching real ranks from tests: free ports, process groups killed on timeout, the venv's tools."""
from __future__ import annotations

import subprocess
from typing import Optional, Sequence

# One set of launch helpers for tests and benchmarks (free ports, the venv's tools, rank environments).
from benchmarks import common
from benchmarks.common import BIN, REPO, free_port, kill_group, rank_env, slurm_job_id_with_free_port, tool  # noqa: F401,E501


def run(cmd: Sequence[str], timeout: float = 300, env: Optional[dict] = None,
        cwd: Optional[str] = None) -> subprocess.CompletedProcess:
    """Run a launcher in its own session (``benchmarks.common.run``: on timeout or Ctrl-C every rank
    under it is killed); the exit status is the test's to check."""
    return common.run(cmd, timeout=timeout, env=env, cwd=cwd, check=False)


def deepspeed_cmd(script: str, *args: str, nproc: int = 2) -> list[str]:
    return [tool("deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()), script, *args]


def torchrun_cmd(script: str, *args: str, nproc: int = 2) -> list[str]:
    return [tool("torchrun"), "--nnodes", "1", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), script, *args]


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, \
        f"exit {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-6000:]}"
    return result

"""Launching real ranks from tests: free ports, process groups killed on timeout, the venv's tools."""
from __future__ import annotations

import os
import signal
import subprocess
from typing import Optional, Sequence

# One set of launch helpers for tests and benchmarks (free ports, the venv's tools, rank environments).
from benchmarks.common import BIN, REPO, free_port, rank_env, slurm_job_id_with_free_port, tool  # noqa: F401 (re-exported)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and everything under it. torchrun and MPICH's Hydra put each rank into a
    session of its own, so the launcher's process group alone would leave the ranks running."""
    import psutil

    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for child in descendants:
        try:
            child.kill()
        except psutil.Error:
            pass


def run(cmd: Sequence[str], timeout: float = 300, env: Optional[dict] = None,
        cwd: Optional[str] = None) -> subprocess.CompletedProcess:
    """Run a launcher in its own session; on timeout kill the whole group (no orphans) and fail."""
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env or rank_env(), cwd=cwd or str(REPO), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(cmd)} timed out after {timeout} s\nstdout:\n{out[-3000:]}\n"
                             f"stderr:\n{err[-5000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def deepspeed_cmd(script: str, *args: str, nproc: int = 2) -> list[str]:
    return [tool("deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()), script, *args]


def torchrun_cmd(script: str, *args: str, nproc: int = 2) -> list[str]:
    return [tool("torchrun"), "--nnodes", "1", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), script, *args]


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, \
        f"exit {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-6000:]}"
    return result

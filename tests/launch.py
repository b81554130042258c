"""Launching real ranks from tests: free ports, process groups killed on timeout, the venv's tools."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tool(name: str) -> str:
    """A console script of this interpreter's environment (deepspeed, torchrun, mpirun)."""
    path = BIN / name
    return str(path) if path.exists() else name


def slurm_job_id_with_free_port() -> int:
    """A job id whose derived master port (15000 + id % 20000, as relbert_ds.distributed derives it
    under SLURM) is free right now: for starting ranks with srun's environment by hand."""
    for job in range(1000, 20000, 37):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 15000 + job))
                return job
            except OSError:
                continue
    raise RuntimeError("no free port in 15000-35000")


def rank_env(**extra: str) -> dict[str, str]:
    """Environment for launched ranks: no inherited rank variables, one BLAS thread, offline hub,
    this checkout first on the path."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                "PYTHONPATH": str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""),
                "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"})
    env.update(extra)
    return env


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

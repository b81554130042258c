"""Launching ranks by hand for the fault, bad-input and multi-node tests.

``start_ranks`` starts W processes with the torch variables (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), each in its own session: what a launcher does, minus the launcher, so
that each rank's stdout/stderr and exit status can be checked on their own.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from tests.launch import REPO, free_port, kill_group, rank_env, tool  # noqa: F401 (kill_group re-exported)


@dataclass
class RankResult:
    rank: int
    returncode: int
    stdout: str
    stderr: str


def start_ranks(script: str, args: Sequence[str], world: int, env: Optional[dict] = None,
                port: Optional[int] = None, rank_envs: Optional[dict] = None) -> list[subprocess.Popen]:
    """``env`` for every rank, ``rank_envs[r]`` for rank r only."""
    port = port or free_port()
    procs = []
    for rank in range(world):
        extra = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                 "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)} \
            if world > 1 else {}
        variables = {**extra, **(env or {}), **(rank_envs or {}).get(rank, {})}
        procs.append(subprocess.Popen([tool("python"), script, *args], cwd=str(REPO), env=rank_env(**variables),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      start_new_session=True))
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[RankResult]:
    """Wait for every rank; on timeout kill all of them (a hang is a failure, not a stuck suite)."""
    deadline = time.monotonic() + timeout
    results = []
    for rank, proc in enumerate(procs):
        try:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                kill_group(p)
            outs = [p.communicate() for p in procs]
            raise AssertionError(f"ranks still running after {timeout} s (a hang):\n" +
                                 "\n".join(f"--- rank {r}\n{o[0][-2000:]}\n{o[1][-3000:]}" for r, o in enumerate(outs)))
        results.append(RankResult(rank, proc.returncode, out, err))
    return results


def run_ranks(script: str, args: Sequence[str], world: int, env: Optional[dict] = None,
              timeout: float = 300, rank_envs: Optional[dict] = None) -> list[RankResult]:
    return finish(start_ranks(script, args, world, env, rank_envs=rank_envs), timeout)


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes (zombies excepted) that contain ``text``."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(f"{pid} {cmdline.strip()}")
    return found


def snapshot(*roots: Path) -> dict[str, tuple]:
    """(size, mtime_ns, sha256) of every file under ``roots``: compare before/after a command."""
    files: dict[str, tuple] = {}
    for root in roots:
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in paths:
            st = p.stat()
            files[str(p)] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return files


def history(run_dir: Path, kind: str = "step") -> list[dict]:
    path = run_dir / "history.jsonl"
    if not path.exists():
        return []
    return [r for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip())
            if r["kind"] == kind]


def step_losses(run_dir: Path) -> dict[int, float]:
    return {r["optimizer_step"]: r["loss"] for r in history(run_dir)}


def wait_for(condition, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


# Small, fast training options shared by the cluster tests (tiny backbone, no validation).
FAST = ["--epochs", "10", "--metric", "none", "--analogy", "--no-projector", "--relations_per_step", "8",
        "--positives_per_relation", "4", "--negatives_per_relation", "4", "--lr", "1e-4", "--warmup_steps", "2"]


def opts(model: str, out: Path, *extra: str) -> list[str]:
    """The fast training options of the cluster tests, for ``model`` into ``out``."""
    return ["--model", model, "--output_dir", str(out), *FAST, *extra]

"""Rank discovery from the environment the real deepspeed launcher gives its ranks.

``deepspeed.launcher.launch`` (what ``deepspeed --hostfile ... --no_ssh --node_rank i`` runs on each
node) is started here as node 1 of a two-node job; each rank records its environment and
:func:`discover` reads it. The launcher names the ranks on its node LOCAL_SIZE (not torchrun's
LOCAL_WORLD_SIZE) and sets CUDA_VISIBLE_DEVICES to the node's entry of the world info (the
device ids ``--include`` selected), which is how train_deepspeed_per_node.sbatch keeps SLURM's.
"""
from __future__ import annotations

import base64
import json
import subprocess
import sys
import textwrap
from pathlib import Path

from relbert_ds.parallel.distributed import DistInfo, discover
from tests.launch import REPO, free_port, rank_env

RECORD = textwrap.dedent("""
    import json, os, sys  # argv: --local_rank=L (the launcher adds it) and the folder
    from pathlib import Path
    Path(sys.argv[-1], f"rank{os.environ['RANK']}.json").write_text(json.dumps(dict(os.environ)))
""")


def launch_node(tmp_path: Path, world_info: dict, node_rank: int) -> dict[int, dict]:
    """Run deepspeed.launcher.launch as node ``node_rank``; every rank's environment by rank."""
    script = tmp_path / "record.py"
    script.write_text(RECORD)
    encoded = base64.urlsafe_b64encode(json.dumps(world_info).encode()).decode()
    port = free_port()
    done = subprocess.run([sys.executable, "-m", "deepspeed.launcher.launch", f"--world_info={encoded}",
                           f"--node_rank={node_rank}", "--master_addr=127.0.0.1", f"--master_port={port}",
                           str(script), str(tmp_path)], cwd=str(REPO), env=rank_env(DS_ACCELERATOR="cpu"),
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in tmp_path.glob("rank*.json")}


def test_discovery_from_the_deepspeed_launchers_environment(tmp_path):
    """Two nodes of two ranks, this process node 1: ranks 2 and 3, two of them on this node (before,
    discovery ignored LOCAL_SIZE and counted all 4 ranks as local: every rank's CPU thread share and
    the GPU check were off by the number of nodes). The device ids are this node's entry of the world
    info, as --include sets them (SLURM gave this node GPUs 3 and 5)."""
    envs = launch_node(tmp_path, {"node-a": [0, 1], "node-b": [3, 5]}, node_rank=1)
    assert sorted(envs) == [2, 3]
    for rank, env in envs.items():
        assert "LOCAL_WORLD_SIZE" not in env and env["LOCAL_SIZE"] == "2"
        assert env["CUDA_VISIBLE_DEVICES"] == "3,5"
        port = int(env["MASTER_PORT"])
        assert discover(env) == DistInfo(rank, rank - 2, 4, 2, "127.0.0.1", port, "torch")

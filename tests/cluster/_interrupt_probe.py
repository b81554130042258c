"""Run by tests/cluster/test_interrupt.py in a pytest of its own (not collected by the suite: its
name does not start with test_). It starts the local SLURM cluster, records the daemons' pids, and
launches two torchrun ranks that sleep, as a training test would; the outer test then signals it."""
from __future__ import annotations

import json
import os
import sys

from tests.launch import run, torchrun_cmd


def test_ranks_under_a_slurm_cluster(slurm_cluster):
    state, sleeper = os.environ["RELBERT_DS_PROBE_STATE"], os.environ["RELBERT_DS_PROBE_SLEEPER"]
    with open(state + ".tmp", "w") as handle:
        json.dump({name: proc.pid for name, proc in slurm_cluster.procs.items()}, handle)
    os.replace(state + ".tmp", state)
    run(torchrun_cmd(sleeper, nproc=2), timeout=600)
    sys.exit("the ranks were meant to be interrupted")

"""Ctrl-C or SIGTERM to the test suite stops it, its launched ranks and the local SLURM daemons.

A pytest of its own runs tests/cluster/_interrupt_probe.py (a cluster up, two ranks running) and is
signalled as a user or CI would: two SIGINTs (an impatient Ctrl-C) or one SIGTERM.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cluster.helpers import processes_mentioning, wait_for
from tests.cluster.local_slurm import missing_requirements
from tests.launch import REPO, kill_group, rank_env

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("signals", [(signal.SIGINT, signal.SIGINT), (signal.SIGTERM,)],
                         ids=["ctrl-c-twice", "sigterm"])
def test_a_signal_stops_the_suite_its_ranks_and_the_slurm_daemons(signals, tmp_path):
    why = missing_requirements()
    if why:
        pytest.skip(why)
    sleeper = tmp_path / "relbert_ds_probe_sleeper.py"
    sleeper.write_text("import time\ntime.sleep(600)\n")
    state = tmp_path / "daemons.json"
    env = rank_env(RELBERT_DS_PROBE_STATE=str(state), RELBERT_DS_PROBE_SLEEPER=str(sleeper))
    suite = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              str(REPO / "tests" / "cluster" / "_interrupt_probe.py")],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    daemons: dict[str, int] = {}
    try:
        wait_for(lambda: state.exists() and len(processes_mentioning(str(sleeper))) >= 2, 180,
                 "the probe's cluster and ranks")
        daemons = json.loads(state.read_text())
        assert set(daemons) == {"munged", "slurmctld", "slurmd"} and all(alive(p) for p in daemons.values())
        for sig in signals:
            os.kill(suite.pid, sig)
            time.sleep(1)
        output, _ = suite.communicate(timeout=120)
        assert suite.returncode != 0, output
        assert "KeyboardInterrupt" in output, output[-3000:]
        wait_for(lambda: not any(alive(p) for p in daemons.values()), 30, "the daemons to exit")
        wait_for(lambda: not processes_mentioning(str(sleeper)), 30, "the ranks to exit")
    finally:
        kill_group(suite)
        for pid in daemons.values():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)

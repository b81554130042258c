"""The local SLURM cluster (one session-scoped cluster for all tests that ask for it).

It starts only when a test requests ``slurm_cluster``; where SLURM/munge are not installed or
the tests do not run as root, those tests are skipped with the reason. At the end of the session
every job is cancelled and slurmd, slurmctld and munged are stopped.
"""
from __future__ import annotations

import shutil

import pytest

from tests.cluster.local_slurm import ClusterError, LocalSlurm, missing_requirements


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    why = missing_requirements()
    if why:
        pytest.skip(why)
    # A folder outside pytest's 0700 tree: munged runs as user munge and must reach its socket.
    import tempfile

    root = tempfile.mkdtemp(prefix="relbert-ds-slurm-")
    cluster = LocalSlurm(root)
    try:
        cluster.start()
    except ClusterError as exc:
        cluster.stop()
        pytest.fail(f"the local SLURM cluster did not start: {exc}")
    print(f"\nlocal SLURM cluster up in {cluster.startup_s:.1f} s (SLURM_CONF={cluster.conf})")
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def trained_run(tiny_bert, tmp_path_factory):
    """A finished 2-rank run of the tiny BERT (2 steps): config, history, checkpoints/global_step2, model.

    Tests must not modify it (the bad-input tests assert that nothing in it changes)."""
    from tests.cluster.helpers import FAST, run_ranks

    out = tmp_path_factory.mktemp("trained") / "run"
    results = run_ranks("launchers/train.py", ["--model", tiny_bert, "--output_dir", str(out), "--max_steps", "2",
                                               *FAST], world=2)
    assert all(r.returncode == 0 for r in results), "\n".join(r.stderr[-3000:] for r in results)
    assert (out / "checkpoints" / "latest").read_text() == "global_step2"
    return out

"""A SIGTERM to the launcher reaches every rank, whatever the launcher: the ranks checkpoint at the end of
their step, exit, and no process of the job is left behind within 60 s. The deepspeed command used to exit
at once and leave its inner launcher and both ranks training as orphans. (tiny BERT on CPU)"""
import os
import shutil
import signal
import subprocess
import time

import psutil
import pytest

from tests.cluster.helpers import history, opts, processes_mentioning, wait_for
from tests.launch import REPO, free_port, kill_group, tool

pytestmark = pytest.mark.slow
TRAIN = str(REPO / "launchers" / "train.py")
OPENMPI = "/usr/bin/mpirun.openmpi"


def command(launcher, args):
    if launcher == "deepspeed":
        return [tool("deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), TRAIN, *args]
    if launcher == "torchrun":
        return [tool("torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                str(free_port()), TRAIN, *args]
    if launcher == "openmpi":
        if shutil.which(OPENMPI) is None:
            pytest.skip("no Open MPI mpirun (apt-get install openmpi-bin)")
        root = ["--allow-run-as-root"] if os.getuid() == 0 else []
        # the master named (as launchers/mpi/train_mpi.sh does): the venv's mpi4py is MPICH's, not Open MPI's
        return [OPENMPI, *root, "--oversubscribe", "--bind-to", "none", "-np", "2", "-x", "PATH", "-x",
                "OMP_NUM_THREADS", "-x", "MASTER_ADDR=127.0.0.1", "-x", f"MASTER_PORT={free_port()}", tool("python"),
                TRAIN, *args]
    return [tool("python"), TRAIN, *args]  # plain python: the process is its own launcher


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun", "openmpi", "python"])
def test_sigterm_to_the_launcher_checkpoints_and_leaves_no_process(launcher, tiny_bert, tmp_path):
    out = tmp_path / "run"
    args = opts(tiny_bert, out, "--deepspeed_config", "ds_configs/zero2.json", "--epochs", "500")
    log = open(tmp_path / "job.log", "w")
    proc = subprocess.Popen(command(launcher, args), cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        wait_for(lambda: len(history(out)) >= 3 or proc.poll() is not None, 180, "three optimizer steps")
        assert proc.poll() is None, (tmp_path / "job.log").read_text()[-3000:]
        tree = [proc.pid] + [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        assert len(tree) >= (1 if launcher == "python" else 3)  # the launcher(s) and the ranks
        proc.send_signal(signal.SIGTERM)  # the launcher alone, as `kill <pid>` or a batch system would
        start = time.monotonic()
        wait_for(lambda: not [pid for pid in tree if psutil.pid_exists(pid) and
                              psutil.Process(pid).status() != psutil.STATUS_ZOMBIE],
                 60, "every process of the job to end")
        ended_s = time.monotonic() - start
    finally:
        kill_group(proc)
        proc.wait()
        log.close()
    output = (tmp_path / "job.log").read_text()
    assert not processes_mentioning(str(out)), processes_mentioning(str(out))
    steps = [r["optimizer_step"] for r in history(out)]
    latest = (out / "checkpoints" / "latest").read_text()
    assert latest == f"global_step{steps[-1]}", (latest, steps[-3:])  # checkpointed where it stopped
    assert f"stopped by a signal after optimizer step {steps[-1]}: checkpoint saved" in output, output[-3000:]
    assert ended_s < 60


def test_sigterm_to_the_launcher_during_evaluation_leaves_no_process_and_no_partial_output(tiny_bert, tmp_path):
    """The evaluator under the deepspeed launcher (which exits on SIGTERM without telling its ranks),
    signalled while it encodes: every rank ends (the launcher watch, as in training) within 60 s, and no
    results file or half-written vector table is left behind."""
    out, cache = tmp_path / "results.json", tmp_path / "cache"
    args = ["--model", tiny_bert, "--classification", "BLESS", "KHN", "--split", "valid", "test", "--cache_dir",
            str(cache), "--progress", "--output", str(out)]
    cmd = command("deepspeed", [])[:-1] + [str(REPO / "launchers" / "evaluate.py"), *args]  # its TRAIN swapped
    log_path = tmp_path / "eval.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "RELBERT_DS_PROGRESS_EVERY": "1"})
    try:
        wait_for(lambda: "encode (2 ranks)" in log_path.read_text() or proc.poll() is not None, 180,
                 "the encoding to start")
        assert proc.poll() is None, log_path.read_text()[-3000:]
        tree = [proc.pid] + [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        assert len(tree) >= 3
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: not [pid for pid in tree if psutil.pid_exists(pid) and
                              psutil.Process(pid).status() != psutil.STATUS_ZOMBIE],
                 60, "every process of the evaluation to end")
    finally:
        kill_group(proc)
        proc.wait()
        log.close()
    assert proc.returncode != 0 and not out.exists()
    assert not [p.name for p in cache.glob(".tmp_*")]  # no half-written table (the folder may not exist yet)
    assert not processes_mentioning(str(out))

"""relbert_ds.training.run_lock: one run per directory; a gone holder (dead pid, requeued SLURM job,
no heartbeat) is taken over; a live one refuses in one line."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from relbert_ds.errors import CheckpointError
from relbert_ds.training.run_lock import LOCK_FILE, RunLock, _process_start
from tests.assertions import assert_one_line


def plant(run_dir, **holder):
    base = {"host": socket.gethostname(), "pid": os.getpid(), "started": "2026-12-01T00:00:00+00:00",
            "slurm_job": None, "slurm_restart": None}
    (run_dir / LOCK_FILE).write_text(json.dumps({**base, **holder}))


@pytest.fixture
def other_process():
    """A live process of this host that is not this one."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def test_acquire_release_and_a_second_holder_is_refused(tmp_path, other_process):
    lock = RunLock(tmp_path)
    assert lock.acquire() is None and lock.held
    holder = json.loads((tmp_path / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["proc_start"] == _process_start(os.getpid())
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()
    plant(tmp_path, pid=other_process.pid, proc_start=_process_start(other_process.pid), slurm_job="77")
    with pytest.raises(CheckpointError) as err:
        RunLock(tmp_path).acquire()
    assert_one_line(err, f"{tmp_path} is in use by another run", f"pid {other_process.pid}", "SLURM job 77",
                    "fix: wait for it to end, pass another --output_dir", f"delete {tmp_path / LOCK_FILE}")
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == other_process.pid  # untouched


def test_a_dead_or_reused_pid_on_this_host_is_taken_over(tmp_path, other_process):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    plant(tmp_path, pid=dead.pid)
    lock = RunLock(tmp_path)
    assert "its process is no longer running" in lock.acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert [p.name for p in tmp_path.iterdir()] == [LOCK_FILE]  # the stale copy is gone
    lock.release()
    plant(tmp_path, pid=other_process.pid, proc_start="1")  # the pid lives, but it is another process now
    lock = RunLock(tmp_path)
    assert "its pid now belongs to another process" in lock.acquire()
    lock.release()


def test_other_hosts_are_judged_by_their_heartbeat_and_slurm_requeues_by_restart_count(tmp_path, monkeypatch):
    plant(tmp_path, host="node-elsewhere", pid=12345)
    with pytest.raises(CheckpointError, match="heartbeat is [0-9]+ s old"):
        RunLock(tmp_path, stale_after_s=60).acquire()
    old = time.time() - 600
    os.utime(tmp_path / LOCK_FILE, (old, old))
    lock = RunLock(tmp_path, stale_after_s=60)
    assert "no heartbeat for" in lock.acquire()
    lock.release()
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    plant(tmp_path, host="node-elsewhere", pid=12345, slurm_job="4242", slurm_restart=None)
    lock = RunLock(tmp_path)
    assert "earlier incarnation of this requeued SLURM job" in lock.acquire()
    lock.release()


def test_the_heartbeat_keeps_the_lock_fresh(tmp_path):
    lock = RunLock(tmp_path, heartbeat_s=0.05)
    lock.acquire()
    old = time.time() - 600
    os.utime(tmp_path / LOCK_FILE, (old, old))
    time.sleep(0.3)
    assert time.time() - (tmp_path / LOCK_FILE).stat().st_mtime < 5
    lock.release()

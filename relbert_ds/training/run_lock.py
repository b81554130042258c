"""One run per run directory: a lock file that names its holder and keeps a heartbeat.

``<run>/run.lock`` is created with O_EXCL (atomic on local file systems, NFSv3+ and Lustre) and holds
the holder's host, pid, process start time, start date and SLURM job. While the run lives, rank 0
touches the file every ``heartbeat_s`` seconds. A second run on the same folder refuses in one line,
unless the holder is gone:
- same host: its pid is not running (or is another process now: the start time differs);
- same SLURM job id and another restart count: a requeued job's earlier incarnation;
- any host: the heartbeat is older than ``stale_after_s`` (a killed job, a lost node), measured
  against the file system's own clock (a probe file's mtime), so clock skew between nodes is moot.
A stale lock is renamed away first (only one contender's rename succeeds), then created anew.
"""
from __future__ import annotations

import atexit
import datetime
import json
import os
import socket
import threading
from pathlib import Path
from typing import Any, Optional

from relbert_ds.errors import CheckpointError, ConfigError
from relbert_ds.training.run_directory import _reason

LOCK_FILE = "run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


def _process_start(pid: int) -> Optional[str]:
    """The kernel's start time of ``pid`` (field 22 of /proc/<pid>/stat), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # fields after the command name, which may hold spaces


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def describe_holder(holder: dict[str, Any]) -> str:
    job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}{job}"


class RunLock:
    """The lock of one run directory, held by this process between :meth:`acquire` and :meth:`release`."""

    def __init__(self, run_dir: Path, heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.held = False

    def me(self) -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(), "proc_start": _process_start(os.getpid()),
                "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "slurm_job": os.environ.get("SLURM_JOB_ID"), "slurm_restart": os.environ.get("SLURM_RESTART_COUNT")}

    def acquire(self) -> Optional[str]:
        """Hold the lock; returns a note when a gone holder's lock was taken over. Raises
        :class:`CheckpointError` (one line) while another run holds it."""
        note = None
        if not self._create():
            holder = self._read()
            why_stale = self._why_stale(holder)
            if why_stale is None:
                age = self._age()
                raise CheckpointError(
                    f"{self.path.parent} is in use by another run ({describe_holder(holder)}; its heartbeat is "
                    f"{age:.0f} s old); fix: wait for it to end, pass another --output_dir, or, if that run is gone, "
                    f"delete {self.path} (a lock without a heartbeat for {self.stale_after_s:.0f} s is taken over)")
            aside = self.path.with_name(f"{LOCK_FILE}.stale.{os.getpid()}")
            try:
                os.replace(self.path, aside)  # only one contender moves it; the others find it gone
            except FileNotFoundError:
                pass
            if not self._create():
                raise CheckpointError(f"{self.path.parent} was taken over by another run just now "
                                      f"({describe_holder(self._read())}); fix: pass another --output_dir")
            aside.unlink(missing_ok=True)
            note = f"took over {self.path} from a run that is gone ({describe_holder(holder)}: {why_stale})"
        self.held = True
        self._thread = threading.Thread(target=self._beat, name="relbert-ds-run-lock", daemon=True)
        self._thread.start()
        atexit.register(self.release)
        return note

    def release(self) -> None:
        """Stop the heartbeat and remove the lock (if it is still ours). Idempotent."""
        if not self.held:
            return
        self.held = False
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = self._read()
        if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
        atexit.unregister(self.release)

    # ------------------------------------------------------------------ internals
    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            raise ConfigError(f"{self.path} cannot be created ({_reason(exc)}); fix: pass an --output_dir on a "
                              f"writable file system") from None
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.me(), f)
                f.write("\n")
        except OSError as exc:  # a full disk: the empty file was created, its contents not
            self.path.unlink(missing_ok=True)
            raise ConfigError(f"{self.path} cannot be written ({_reason(exc)}); fix: free space on that file system "
                              f"or pass another --output_dir") from None
        return True

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # gone, or being written this instant
        return data if isinstance(data, dict) else {}

    def _age(self) -> float:
        """Seconds since the holder's last heartbeat, on the file system's clock."""
        probe = self.path.with_name(f".{LOCK_FILE}.probe.{socket.gethostname()}.{os.getpid()}")
        try:
            probe.write_text("")
            now = probe.stat().st_mtime
            return max(0.0, now - self.path.stat().st_mtime)
        except FileNotFoundError:
            return 0.0
        finally:
            probe.unlink(missing_ok=True)

    def _why_stale(self, holder: dict[str, Any]) -> Optional[str]:
        """Why the holder is gone, or None while it may still be running."""
        me = self.me()
        if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int):
            pid = holder["pid"]
            if pid == me["pid"]:
                return None  # this very process (a second Trainer): held
            if not _pid_alive(pid):
                return "its process is no longer running"
            if holder.get("proc_start") and _process_start(pid) != holder["proc_start"]:
                return "its pid now belongs to another process"
            return None
        if holder.get("slurm_job") and holder["slurm_job"] == me["slurm_job"] \
                and holder.get("slurm_restart") != me["slurm_restart"]:
            return "an earlier incarnation of this requeued SLURM job"
        age = self._age()
        if age > self.stale_after_s:
            return f"no heartbeat for {age:.0f} s"
        return None

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)  # None: the file system sets its own time
            except OSError:
                pass  # a missed beat is not fatal; staleness needs many of them

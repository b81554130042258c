"""A rank outlives neither its launcher nor its parent: their end reaches the rank as a SIGTERM.

The ``deepspeed`` command starts ``deepspeed.launcher.launch``, which starts the ranks; a SIGTERM (or
Ctrl-C's SIGINT from a script) to the outer command ends it at once without telling the inner
launcher, whose ranks then train on as orphans. The same happens to the ranks of any launcher that is
SIGKILLed. So each rank watches the launcher processes above it (recognised by their command lines);
when one of them ends, the rank sends itself SIGTERM, and does what SIGTERM does
there: the trainer checkpoints at the end of the step and exits with status 124 (as on SLURM's
pre-emption signal), the evaluator stops.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Optional

# Command-line fragments of launcher processes (the deepspeed runner and its inner launcher, torchrun,
# MPI launchers and daemons).
LAUNCHER_MARKS = ("deepspeed", "torchrun", "torch.distributed.run", "torch/distributed/run.py", "mpirun", "mpiexec",
                  "orted", "prted", "prterun", "hydra_pmi_proxy")
POLL_S = 1.0

_watcher: Optional[threading.Thread] = None


def _is_launcher(cmdline: list[str]) -> bool:
    head = " ".join(cmdline[:4])  # the interpreter, its flags (-u -m), the launcher script or module
    return any(mark in head for mark in LAUNCHER_MARKS)


def launcher_ancestors(pid: Optional[int] = None) -> list[tuple[int, float]]:
    """(pid, create time) of the launcher processes above ``pid`` (default: this process), nearest first,
    stopping at the first ancestor that is not one (a shell, slurmstepd, init)."""
    import psutil

    out = []
    try:
        process = psutil.Process(pid or os.getpid()).parent()
        while process is not None and process.pid > 1 and _is_launcher(process.cmdline()):
            out.append((process.pid, process.create_time()))
            process = process.parent()
    except psutil.Error:
        pass
    return out


def _alive(pid: int, created: float) -> bool:
    import psutil

    try:
        process = psutil.Process(pid)
        # a reused pid is another process; a zombie has ended, only its parent has not reaped it yet
        return process.create_time() == created and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def watch_launcher(poll_s: float = POLL_S) -> list[int]:
    """Start watching (once per process); returns the pids of the launcher processes watched.

    Only launchers: a plain ``python`` run started from a shell (or under nohup) must survive the
    shell, as it always has; its own signals reach it directly.
    """
    global _watcher

    watched = launcher_ancestors()
    if _watcher is not None or not watched:
        return [pid for pid, _ in watched]

    def watch() -> None:
        while True:
            for pid, created in watched:
                if not _alive(pid, created):
                    os.kill(os.getpid(), signal.SIGTERM)
                    return
            time.sleep(poll_s)

    _watcher = threading.Thread(target=watch, name="relbert-ds-launcher-watch", daemon=True)
    _watcher.start()
    return [pid for pid, _ in watched]

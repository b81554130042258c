"""A one-node SLURM cluster on localhost, from Debian's packages, for the tests.

    apt-get install slurmctld slurmd slurm-client munge        # ./run.sh does this as root

What :class:`LocalSlurm` starts (all in the foreground as its own child processes, so that
stopping it stops exactly what it started, and nothing of the machine's own set-up is touched):

- ``munged`` as user ``munge`` on a private socket in the cluster folder (the key is the
  package's ``/etc/munge/munge.key``; created with ``mungekey`` if missing);
- ``slurmctld -D`` and ``slurmd -D -N localhost`` with a ``slurm.conf`` whose state, spool and
  log folders and TCP ports are private to this cluster (free ports, so a real SLURM on the
  machine or a second test session does not collide).

Commands reach it through ``SLURM_CONF`` (see :meth:`LocalSlurm.env`); jobs inherit it, so
``scontrol requeue`` inside a job script works.

By hand (debugging the sbatch scripts)::

    python -m tests.cluster.local_slurm /tmp/mycluster      # starts it, prints SLURM_CONF, Ctrl-C stops
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from tests.launch import free_port

DAEMONS = ("slurmctld", "slurmd", "munged")
CLIENTS = ("sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")
SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")


def _which(name: str) -> Optional[str]:
    path = shutil.which(name)
    if path:
        return path
    for folder in SBIN:
        candidate = Path(folder) / name
        if candidate.exists():
            return str(candidate)
    return None


def missing_requirements() -> Optional[str]:
    """Why a local cluster cannot be started here (None: it can)."""
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (slurmd launches tasks as the job's user)"
    missing = [name for name in DAEMONS + CLIENTS if _which(name) is None]
    if missing:
        return (f"SLURM/munge not installed ({', '.join(missing)} missing); as root: apt-get install slurmctld "
                f"slurmd slurm-client munge (./run.sh does it)")
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no 'munge' user (the munge package creates it)"
    return None


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the process that started it dies (Linux prctl)."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class ClusterError(RuntimeError):
    pass


class LocalSlurm:
    """Start with :meth:`start`, stop with :meth:`stop` (idempotent; also on a failed start)."""

    def __init__(self, root: Optional[str | Path] = None, cpus: int = 2, cred_expire_s: int = 5) -> None:
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="relbert-ds-slurm-"))
        self.cpus = cpus
        self.cred_expire_s = cred_expire_s
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.procs: dict[str, subprocess.Popen] = {}
        self.startup_s: float = 0.0

    # ------------------------------------------------------------------ environment
    def env(self, base: Optional[dict] = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        # Variables of an enclosing real job would confuse sbatch/srun here.
        for key in [k for k in env if k.startswith(("SLURM_JOB", "SLURM_STEP", "SLURM_PROCID", "SBATCH_",
                                                     "SRUN_", "SALLOC_"))]:
            env.pop(key)
        return env

    def cmd(self, *args: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([_which(args[0]) or args[0], *args[1:]], capture_output=True, text=True,
                                env=self.env(), timeout=timeout)
        if check and result.returncode != 0:
            raise ClusterError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    # ------------------------------------------------------------------ start / stop
    def start(self, timeout: float = 60) -> "LocalSlurm":
        why = missing_requirements()
        if why:
            raise ClusterError(why)
        begin = time.perf_counter()
        try:
            self._prepare()
            self._start_munge()
            self._write_conf()
            logs = self.root / "log"
            self.procs["slurmctld"] = self._spawn([_which("slurmctld"), "-D", "-f", str(self.conf)],
                                                  logs / "slurmctld.stderr")
            self._wait(lambda: self.cmd("scontrol", "ping", check=False).returncode == 0, timeout,
                       "slurmctld answering scontrol ping")
            self.procs["slurmd"] = self._spawn([_which("slurmd"), "-D", "-f", str(self.conf), "-N", "localhost"],
                                               logs / "slurmd.stderr")
            self._wait(self._node_idle, timeout, "node localhost idle")
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.perf_counter() - begin
        return self

    def _prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # munged (user munge) must traverse it to its socket folder
        for sub in ("state", "spool", "log", "jobs"):
            (self.root / sub).mkdir(exist_ok=True)
        munge_dir = self.root / "munge"
        munge_dir.mkdir(exist_ok=True)
        munge = pwd.getpwnam("munge")
        os.chown(munge_dir, munge.pw_uid, munge.pw_gid)
        munge_dir.chmod(0o755)

    def _start_munge(self) -> None:
        key = Path("/etc/munge/munge.key")
        munge = pwd.getpwnam("munge")
        if not key.exists():
            subprocess.run([_which("mungekey") or "mungekey", "--create", "--keyfile", str(key)], check=True,
                           capture_output=True)
            os.chown(key, munge.pw_uid, munge.pw_gid)
            key.chmod(0o600)
        d = self.root / "munge"
        self.procs["munged"] = self._spawn(
            [_which("munged"), "--foreground", f"--socket={self.munge_socket}", f"--pid-file={d / 'munged.pid'}",
             f"--seed-file={d / 'munged.seed'}", f"--log-file={d / 'munged.log'}", f"--key-file={key}"],
            self.root / "log" / "munged.stderr", user=munge)
        self._wait(lambda: self.munge_socket.exists(), 15, "munged socket")

    def _write_conf(self) -> None:
        r = self.root
        lines = {
            "ClusterName": "relbertds",
            "SlurmctldHost": "localhost",
            "SlurmctldPort": free_port(),
            "SlurmdPort": free_port(),
            "SlurmUser": "root",
            "SlurmdUser": "root",
            "AuthType": "auth/munge",
            "CredType": "cred/munge",
            # Our munged; cred_expire also sets how long a requeued job waits before it may start
            # again (SLURM's default 120 s would make the requeue test slow).
            "AuthInfo": f"socket={self.munge_socket},cred_expire={self.cred_expire_s}",
            "StateSaveLocation": r / "state",
            "SlurmdSpoolDir": r / "spool",
            "SlurmctldPidFile": r / "slurmctld.pid",
            "SlurmdPidFile": r / "slurmd.pid",
            "SlurmctldLogFile": r / "log" / "slurmctld.log",
            "SlurmdLogFile": r / "log" / "slurmd.log",
            "SlurmctldDebug": "info",
            "SlurmdDebug": "info",
            "ProctrackType": "proctrack/linuxproc",  # no cgroups in a container
            "TaskPlugin": "task/none",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_Core",
            "MpiDefault": "none",
            "ReturnToService": 2,  # a node that went down comes back by itself when slurmd answers
            "JobRequeue": 1,  # batch jobs may be requeued (scontrol requeue, node failure)
            "SchedulerType": "sched/backfill",
            "SchedulerParameters": "sched_interval=1",
            "JobCompType": "jobcomp/none",
            "AccountingStorageType": "accounting_storage/none",
            "JobAcctGatherType": "jobacct_gather/none",
            "SlurmdParameters": "config_overrides",  # trust CPUs= below whatever the hardware says
            "SlurmdTimeout": 30,
            "InactiveLimit": 0,
            "KillWait": 10,  # seconds between SIGTERM and SIGKILL when a step is ended
            "MinJobAge": 3600,  # finished jobs stay visible to scontrol show job
            "MessageTimeout": 10,
        }
        text = "".join(f"{k}={v}\n" for k, v in lines.items() if v is not None)
        text += f"NodeName=localhost NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 CPUs={self.cpus} " \
                f"State=UNKNOWN\n"
        text += "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP\n"
        self.conf.write_text(text)

    def _spawn(self, argv: list, log: Path, user=None) -> subprocess.Popen:
        kwargs = {}
        if user is not None:
            kwargs = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        handle = open(log, "ab")
        # Own session: a Ctrl-C reaches pytest, which stops the daemons in order (jobs first). The
        # parent-death signal covers a pytest killed outright (it runs after the user switch).
        return subprocess.Popen([str(a) for a in argv], stdout=handle, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=self.env(), start_new_session=True,
                                preexec_fn=_die_with_parent, **kwargs)

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise ClusterError(f"{name} exited with {proc.returncode} while waiting for {what}; see "
                                       f"{self.root / 'log'}:\n{self.logs_tail()}")
            try:
                if ready():
                    return
            except (subprocess.SubprocessError, OSError):
                pass
            time.sleep(0.2)
        raise ClusterError(f"timed out after {timeout} s waiting for {what}; see {self.root / 'log'}:\n"
                           f"{self.logs_tail()}")

    def _node_idle(self) -> bool:
        out = self.cmd("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split()
        return bool(out) and out[0].rstrip("*") in ("idle", "mixed", "allocated")

    def logs_tail(self, lines: int = 15) -> str:
        out = []
        for log in sorted((self.root / "log").glob("*")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(out)

    def stop(self, timeout: float = 60) -> None:
        """Cancel every job, wait until none runs, then stop slurmd, slurmctld and munged.

        A second Ctrl-C (or a SIGTERM) while this runs waits until it is done: the daemons must
        not outlive the test session."""
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            self._stop(timeout)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def _stop(self, timeout: float) -> None:
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            try:
                self.cmd("scancel", "--full", "--user", "root", check=False, timeout=15)
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    if not self.cmd("squeue", "-h", "-o", "%i", check=False).stdout.strip():
                        break  # squeue lists pending, running and completing jobs only
                    time.sleep(0.5)
            except (subprocess.SubprocessError, OSError):
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)

    # ------------------------------------------------------------------ jobs
    def sbatch(self, script: str | Path, *args: str, options: tuple = (), env: Optional[dict] = None,
               cwd: Optional[str | Path] = None) -> int:
        """Submit ``script`` (sbatch ``options`` before it, script ``args`` after); the job id."""
        result = subprocess.run([_which("sbatch"), "--parsable", *options, str(script), *args], capture_output=True,
                                text=True, env=self.env(env), cwd=str(cwd) if cwd else None, timeout=30)
        if result.returncode != 0:
            raise ClusterError(f"sbatch {script} failed ({result.returncode}): {result.stderr.strip()}")
        return int(result.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, StdOut, ...)."""
        out = self.cmd("scontrol", "show", "job", "-o", str(job_id)).stdout.strip()
        fields: dict[str, str] = {}
        for item in out.split(" "):
            if "=" in item:
                key, value = item.split("=", 1)
                fields[key] = value
        return fields

    def wait(self, job_id: int, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"),
             timeout: float = 300) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise ClusterError(f"job {job_id} not in {states} after {timeout} s: {info}")


def main(argv: list[str]) -> int:
    cluster = LocalSlurm(argv[0] if argv else None).start()
    print(f"export SLURM_CONF={cluster.conf}   # started in {cluster.startup_s:.1f} s; Ctrl-C stops it", flush=True)
    try:
        while all(p.poll() is None for p in cluster.procs.values()):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

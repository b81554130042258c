"""Rank discovery and the process group: the only module that reads rank environment variables.

Launchers and what they leave in the environment:
- ``torchrun`` and the ``deepspeed`` launcher: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT;
- ``mpirun`` (Open MPI: OMPI_COMM_WORLD_*; MPICH/Hydra: PMI_RANK, PMI_SIZE, MPI_LOCALRANKID);
  the master is rank 0's host, agreed over MPI itself (DeepSpeed's own MPI discovery takes
  ``hostname -I``, which may not be the interface the ranks share);
- ``srun`` (SLURM_PROCID, SLURM_LOCALID, SLURM_STEP_NUM_TASKS; master = first host of
  SLURM_JOB_NODELIST, port derived from the job id so that every rank agrees without talking);
- plain ``python``: one rank, a private port on loopback.

The rendezvous uses an explicit TCP store so that a rank that cannot reach the master fails
after ``connect_timeout_s`` with a message saying so, while collectives get their own (longer)
timeout, which also reaches the process groups DeepSpeed creates later.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Mapping, Optional, TypeVar

from relbert_ds.errors import DistributedError

T = TypeVar("T")

DEFAULT_CONNECT_TIMEOUT_S = 300.0
DEFAULT_COLLECTIVE_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "torch" (torchrun / deepspeed launcher), "mpi", "slurm" or "single"
    backend: str = ""


def _int(env: Mapping[str, str], *names: str) -> Optional[int]:
    for name in names:
        if env.get(name, "") != "":
            return int(env[name])
    return None


def free_port() -> int:
    """A TCP port that was free a moment ago (for single-process runs and tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list (``gpu[01-03,07],cpu5``) as a list of host names."""
    hosts: list[str] = []
    # Split on commas that are not inside brackets.
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        match = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not match:
            hosts.append(part)
            continue
        prefix, ranges, suffix = match.groups()
        for item in ranges.split(","):
            if "-" in item:
                lo, hi = item.split("-", 1)
                hosts.extend(f"{prefix}{i:0{len(lo)}d}{suffix}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(f"{prefix}{item}{suffix}")
    return hosts


def slurm_first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (via ``scontrol`` where it exists)."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=30, check=True).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass
    return expand_nodelist(nodelist)[0]


def _mpi_master(rank: int) -> tuple[str, int]:
    """Agree on rank 0's address and a free port over MPI itself."""
    try:
        from mpi4py import MPI
    except ImportError as exc:  # the package or libmpi is missing
        raise DistributedError(f"launched by mpirun but mpi4py cannot be imported ({exc}); fix: pip install "
                               f"relbert-ds[mpi] (mpi4py + mpich) or set RANK/WORLD_SIZE/MASTER_ADDR yourself")
    comm = MPI.COMM_WORLD
    hosts = comm.allgather(socket.gethostname())
    if rank == 0:
        addr = "127.0.0.1" if len(set(hosts)) == 1 else socket.gethostbyname(socket.gethostname())
        port = free_port()
    else:
        addr, port = "", 0
    return comm.bcast((addr, port), root=0)


def discover(env: Optional[Mapping[str, str]] = None) -> DistInfo:
    """Read this process's place in the job from the launcher's environment (no side effects,
    except the MPI handshake under mpirun)."""
    env = os.environ if env is None else env
    if env.get("RANK") is not None and env.get("WORLD_SIZE") is not None:
        world = int(env["WORLD_SIZE"])
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not env.get(v)] if world > 1 else []
        if missing:
            raise DistributedError(f"RANK/WORLD_SIZE are set but {' and '.join(missing)} is not; fix: set "
                                   f"MASTER_ADDR and MASTER_PORT to rank 0's host and a free port")
        return DistInfo(rank=int(env["RANK"]), local_rank=_int(env, "LOCAL_RANK") or 0, world_size=world,
                        local_world_size=_int(env, "LOCAL_WORLD_SIZE") or world,
                        master_addr=env.get("MASTER_ADDR") or "127.0.0.1",
                        master_port=int(env.get("MASTER_PORT") or free_port()), launcher="torch")
    mpi_rank = _int(env, "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
    mpi_size = _int(env, "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
    if mpi_rank is not None and mpi_size is not None:
        local = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID") or 0
        local_size = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS") or mpi_size
        if env.get("MASTER_ADDR") and env.get("MASTER_PORT"):
            addr, port = env["MASTER_ADDR"], int(env["MASTER_PORT"])
        else:
            addr, port = _mpi_master(mpi_rank) if mpi_size > 1 else ("127.0.0.1", free_port())
        return DistInfo(mpi_rank, local, mpi_size, local_size, addr, port, "mpi")
    # srun sets SLURM_STEP_NUM_TASKS; a batch script alone (one process) must not wait for peers.
    if env.get("SLURM_PROCID") is not None and env.get("SLURM_STEP_NUM_TASKS") is not None:
        world = int(env["SLURM_STEP_NUM_TASKS"])
        nodes = max(1, _int(env, "SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES") or 1)
        addr = env.get("MASTER_ADDR") or (slurm_first_host(env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"])
                                          if nodes > 1 else "127.0.0.1")
        port = int(env.get("MASTER_PORT") or 15000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
        return DistInfo(int(env["SLURM_PROCID"]), _int(env, "SLURM_LOCALID") or 0, world,
                        _int(env, "SLURM_NTASKS_PER_NODE") or max(1, world // nodes), addr, port, "slurm")
    return DistInfo(0, 0, 1, 1, "127.0.0.1", free_port(), "single")


def default_backend() -> str:
    """NCCL where CUDA GPUs are visible, gloo on CPU."""
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(backend: Optional[str] = None, connect_timeout_s: Optional[float] = None,
                     collective_timeout_s: Optional[float] = None) -> DistInfo:
    """Discover the rank, export the torch variables (DeepSpeed reads them) and create the
    default process group. Idempotent: a second call returns the same info.

    Timeouts default to RELBERT_DS_CONNECT_TIMEOUT / RELBERT_DS_COLLECTIVE_TIMEOUT (seconds).
    """
    import torch
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    info = discover()
    backend = backend or default_backend()
    for name, value in (("RANK", info.rank), ("WORLD_SIZE", info.world_size), ("LOCAL_RANK", info.local_rank),
                        ("LOCAL_WORLD_SIZE", info.local_world_size), ("MASTER_ADDR", info.master_addr),
                        ("MASTER_PORT", info.master_port)):
        os.environ[name] = str(value)
    info = DistInfo(**{**info.__dict__, "backend": backend})
    if dist.is_initialized():
        return info
    connect = float(connect_timeout_s or os.environ.get("RELBERT_DS_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT_S))
    collective = timedelta(seconds=float(collective_timeout_s or os.environ.get("RELBERT_DS_COLLECTIVE_TIMEOUT",
                                                                              DEFAULT_COLLECTIVE_TIMEOUT_S)))
    # Groups created later without a timeout (DeepSpeed's ZeRO groups) read these defaults.
    distributed_c10d.default_pg_timeout = collective
    if hasattr(distributed_c10d, "default_pg_nccl_timeout"):
        distributed_c10d.default_pg_nccl_timeout = collective
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    # torchrun hosts the store itself (its agent); everyone else: rank 0 hosts it.
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    try:
        store = dist.TCPStore(info.master_addr, info.master_port, info.world_size,
                              is_master=info.rank == 0 and not agent_store, timeout=timedelta(seconds=connect))
    except (RuntimeError, OSError) as exc:
        who = "rank 0 could not host the rendezvous or not all ranks joined" if info.rank == 0 and not agent_store \
            else f"rank {info.rank} could not reach the master"
        raise DistributedError(
            f"{who} at {info.master_addr}:{info.master_port} within {connect:.0f} s ({str(exc).splitlines()[0]}); "
            f"fix: check that rank 0 is running, MASTER_ADDR/MASTER_PORT (or the node list) name a host and a free "
            f"port every rank can reach, and the world size ({info.world_size}) matches the ranks started") from None
    try:
        dist.init_process_group(backend=backend, store=store, rank=info.rank, world_size=info.world_size,
                                timeout=collective)
        if backend == "gloo" and info.world_size > 1:
            dist.barrier()  # gloo connects its full mesh lazily: fail here, with a message, not mid-training
    except RuntimeError as exc:
        var = "GLOO_SOCKET_IFNAME" if backend == "gloo" else "NCCL_SOCKET_IFNAME"
        raise DistributedError(
            f"rank {info.rank} joined the rendezvous at {info.master_addr}:{info.master_port} but could not connect "
            f"to the other ranks ({str(exc).splitlines()[0][:200]}); fix: set {var} to the network interface the "
            f"nodes share (e.g. {var}=eth0), and check that no firewall blocks the ranks' ports") from None
    return info


def is_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if is_initialized() else 1


def backend() -> Optional[str]:
    """The process group's backend ("gloo", "nccl", ...); None without one."""
    import torch.distributed as dist

    return dist.get_backend() if is_initialized() else None


def is_main() -> bool:
    """True on global rank 0 (and in a single process)."""
    return rank() == 0


def barrier() -> None:
    import torch.distributed as dist

    if is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    """Destroy the default process group (a new one cannot be created in this process after)."""
    import torch.distributed as dist

    if is_initialized():
        dist.destroy_process_group()


def env_rank(env: Optional[Mapping[str, str]] = None) -> int:
    """This process's global rank as the launcher's environment states it (0 when none does),
    without joining the job: for deciding who prints before the process group exists."""
    env = os.environ if env is None else env
    value = _int(env, "RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID")
    return value or 0


def set_threads(threads: Optional[int], local_world_size: int) -> int:
    """Torch CPU threads per rank: ``threads``, else the node's cores shared by its local ranks
    (ranks on one node must not oversubscribe its cores). No-op on GPUs; returns the count."""
    import torch

    count = threads or max(1, (os.cpu_count() or 1) // max(1, local_world_size))
    if not torch.cuda.is_available():
        torch.set_num_threads(count)
    return count


class AgreedError(RuntimeError):
    """A non-user exception raised on some rank inside :func:`agree`, re-raised on every rank.

    ``report`` is the failing rank's traceback (what rank 0 prints, once).
    """

    def __init__(self, message: str, report: str) -> None:
        super().__init__(message)
        self.report = report
        self.agreed = True


def agree(fn: Callable[[], T], *, main_only: bool = False) -> Optional[T]:
    """Run ``fn`` (on every rank, or on rank 0 only) and agree on the outcome across ranks.

    Any exception on any rank makes EVERY rank raise, after one small exchange, so no rank is
    left waiting in a collective for a peer that gave up: the lowest failing rank's
    :class:`UserError` is raised as the same class with the same message everywhere; any other
    exception becomes :class:`AgreedError` carrying that rank's traceback. Either is marked
    ``agreed``, so the CLI shell prints it once, on rank 0. Returns ``fn``'s result (None on
    ranks that did not run it).
    """
    import traceback

    from relbert_ds import errors
    from relbert_ds.parallel import collectives

    result, failure, own = None, None, None
    if not main_only or is_main():
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - every failure must reach the other ranks
            own = exc
            failure = {"rank": rank(), "type": type(exc).__name__, "message": str(exc),
                       "user": isinstance(exc, errors.UserError),
                       "report": "".join(traceback.format_exception(exc))}
    failure = next((f for f in collectives.all_gather_object(failure) if f is not None), None)
    if failure is None:
        return result
    if failure["user"]:
        if own is not None and failure["rank"] == rank():
            exc = own
        else:
            exc = getattr(errors, failure["type"], errors.UserError)(failure["message"])
        exc.agreed = True  # type: ignore[attr-defined]
        raise exc
    where = f"rank {failure['rank']}: " if world_size() > 1 else ""
    raise AgreedError(f"{where}{failure['type']}: {failure['message']}", failure["report"]) from own


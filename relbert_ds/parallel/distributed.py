"""Rank discovery and the process group: the only module that reads rank environment variables.

Launchers and what they leave in the environment:
- ``torchrun`` and the ``deepspeed`` launcher: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT, and the
  ranks on this node as LOCAL_WORLD_SIZE (torchrun) or LOCAL_SIZE (deepspeed.launcher.launch);
- ``mpirun`` (Open MPI: OMPI_COMM_WORLD_*; MPICH/Hydra: PMI_RANK, PMI_SIZE, MPI_LOCALRANKID);
  the master is rank 0's host, agreed over MPI itself (DeepSpeed's own MPI discovery takes
  ``hostname -I``, which may not be the interface the ranks share), never a loopback address
  when the ranks span several hosts (Debian/Ubuntu map the host name to 127.0.1.1);
- ``srun`` (SLURM_PROCID, SLURM_LOCALID, SLURM_STEP_NUM_TASKS; master = first host of
  SLURM_JOB_NODELIST, port derived from the job id so that every rank agrees without talking);
- plain ``python``: one rank, a private port on loopback.

The rendezvous uses an explicit TCP store so that a rank that cannot reach the master fails
after ``connect_timeout_s`` with a message saying so. The ranks then connect to each other at
once (NCCL and gloo would otherwise connect at the first collective, mid-training, and a wrong
network interface would show as a raw backend error or a 30-minute hang), also bounded by
``connect_timeout_s``; only then do collectives get their own (longer) timeout, which also
reaches the process groups DeepSpeed creates later.
"""
from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Iterator, Mapping, Optional, Sequence, TypeVar

from relbert_ds.errors import DistributedError

T = TypeVar("T")

DEFAULT_CONNECT_TIMEOUT_S = 300.0
DEFAULT_COLLECTIVE_TIMEOUT_S = 1800.0
# Extra seconds between the two bounds of the eager connection (see _eager_limits).
CONNECT_GRACE_S = 60.0


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


def _is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def _ipv4_addresses(host: str) -> list[str]:
    """The IPv4 addresses ``host`` resolves to here, in the resolver's order (none if it does not)."""
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        return []
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _source_address_towards(host: str) -> Optional[str]:
    """The local address the kernel would send from to reach ``host`` (a UDP connect sends nothing)."""
    for addr in _ipv4_addresses(host):
        if _is_loopback(addr):
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect((addr, 9))
                return str(probe.getsockname()[0])
        except OSError:  # no route to it
            continue
    return None


def master_address(host: str, peers: Sequence[str]) -> str:
    """An address of ``host`` (rank 0's) that ranks on the ``peers`` hosts can reach: what the host
    name resolves to unless that is loopback only (Debian/Ubuntu's /etc/hosts maps it to 127.0.1.1),
    else the address of the interface this host uses to reach a peer. Raises
    :class:`DistributedError` (fix: set MASTER_ADDR) where neither gives a routable address."""
    own = _ipv4_addresses(host)
    routable = [a for a in own if not _is_loopback(a)]
    if routable:
        return routable[0]
    for peer in peers:
        source = _source_address_towards(peer)
        if source is not None and not _is_loopback(source):
            return source
    shown = ", ".join(list(peers)[:3]) + (", ..." if len(peers) > 3 else "")
    raise DistributedError(
        f"rank 0's host name {host!r} resolves only to {', '.join(own) or 'no address'} (loopback, which the other "
        f"nodes cannot reach) and no route to them ({shown or 'no other host'}) gave another address; fix: set "
        f"MASTER_ADDR to rank 0's address on the network the nodes share and MASTER_PORT to a free port, on every "
        f"rank (launchers/mpi/train_mpi.sh forwards them)")


def _mpi_master(rank: int) -> tuple[str, int]:
    """Agree on rank 0's address and a free port over MPI itself (every rank raises the same
    :class:`DistributedError` where rank 0 has no address the others can reach)."""
    try:
        from mpi4py import MPI
    except ImportError as exc:  # the package or libmpi is missing
        raise DistributedError(f"launched by mpirun but mpi4py cannot be imported ({exc}); fix: pip install "
                               f"relbert-ds[mpi] (mpi4py + mpich) or set RANK/WORLD_SIZE/MASTER_ADDR yourself")
    comm = MPI.COMM_WORLD
    hosts = comm.allgather(socket.gethostname())
    answer: tuple[str, object] = ("", 0)
    if rank == 0:
        try:
            others = list(dict.fromkeys(h for h in hosts if h != hosts[0]))
            answer = ("127.0.0.1" if not others else master_address(hosts[0], others), free_port())
        except DistributedError as exc:
            answer = ("", str(exc))
    addr, port = comm.bcast(answer, root=0)
    if isinstance(port, str):
        raise DistributedError(port)
    return addr, int(port)


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
        # deepspeed.launcher.launch sets LOCAL_SIZE, torchrun LOCAL_WORLD_SIZE
        return DistInfo(rank=int(env["RANK"]), local_rank=_int(env, "LOCAL_RANK") or 0, world_size=world,
                        local_world_size=_int(env, "LOCAL_WORLD_SIZE", "LOCAL_SIZE") or world,
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


def cuda_device_index(local_rank: int, visible: int) -> int:
    """The CUDA device (index among the ``visible`` ones) local rank ``local_rank`` takes.

    All of the node's GPUs visible to every rank (srun with --gpus-per-node, torchrun, the deepspeed
    launcher): ``cuda:<local_rank>``. One GPU visible (srun --gpus-per-task=1, MPI wrappers that set
    CUDA_VISIBLE_DEVICES per rank): ``cuda:0``. Raises :class:`DistributedError` where this rank
    would have to share a GPU with another (more local ranks than visible GPUs) or sees none.
    """
    if visible < 1:
        raise DistributedError(f"local rank {local_rank} uses NCCL but sees no CUDA GPU (torch.cuda.device_count() "
                               f"is 0); fix: request GPUs for every rank (e.g. --gpus-per-node), check "
                               f"CUDA_VISIBLE_DEVICES, or run on CPU with gloo")
    if visible == 1:
        return 0
    if local_rank >= visible:
        raise DistributedError(f"local rank {local_rank} sees {visible} GPUs, so it would share one with a lower "
                               f"local rank (one rank per GPU is needed); fix: start as many ranks per node as it "
                               f"has GPUs (--ntasks-per-node = --gpus-per-node), or give each rank its own GPU "
                               f"(--gpus-per-task=1)")
    return local_rank


def _eager_limits(backend: str, connect_s: float) -> tuple[float, float]:
    """(timeout of the process group while the ranks connect, deadline of the watchdog) in seconds.

    gloo honours the process group's timeout while it connects and raises in this thread: the
    watchdog only backs it up. NCCL's blocking communicator set-up does not return at a timeout,
    and NCCL's own watchdog would end the process with its raw message once the group's timeout
    passes: ours must come first."""
    if backend == "gloo":
        return connect_s, connect_s + CONNECT_GRACE_S
    return connect_s + CONNECT_GRACE_S, connect_s


@contextlib.contextmanager
def _exit_after(seconds: float, error: Callable[[], DistributedError], main: bool) -> Iterator[None]:
    """Run the block; if it is still running after ``seconds`` (stuck in C++ code that no timeout
    reaches), print ``error: <message>`` (``main``: rank 0 only) and end the process with the
    error's exit status."""
    def expire() -> None:
        if main:
            print(f"error: {error()}", file=sys.stderr, flush=True)
        os._exit(DistributedError.exit_code)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _no_connection(info: DistInfo, backend: str, why: str) -> DistributedError:
    if "Duplicate GPU" in why:  # NCCL's words for two ranks on one device
        return DistributedError(
            f"rank {info.rank} shares its GPU with another rank ({why}); fix: start one rank per GPU "
            f"(--ntasks-per-node = --gpus-per-node), or give each rank its own GPU (--gpus-per-task=1)")
    var = "GLOO_SOCKET_IFNAME" if backend == "gloo" else "NCCL_SOCKET_IFNAME"
    return DistributedError(
        f"rank {info.rank} joined the rendezvous at {info.master_addr}:{info.master_port} but could not connect "
        f"to the other ranks ({why}); fix: set {var} to the network interface the nodes share (e.g. {var}=eth0), "
        f"and check that no firewall blocks the ranks' ports")


def init_distributed(backend: Optional[str] = None, connect_timeout_s: Optional[float] = None,
                     collective_timeout_s: Optional[float] = None) -> DistInfo:
    """Discover the rank, export the torch variables (DeepSpeed reads them), create the default
    process group and connect the ranks to each other. Idempotent: a second call returns the same info.

    Timeouts default to RELBERT_DS_CONNECT_TIMEOUT / RELBERT_DS_COLLECTIVE_TIMEOUT (seconds). The
    connect timeout bounds the rendezvous and then the ranks' connection to each other; where NCCL
    is still connecting after it, the process prints the error (rank 0) and exits with status 2.
    """
    import torch
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    info = discover()
    from relbert_ds.parallel.launcher_watch import watch_launcher

    watch_launcher()  # from now on, the launcher's end ends this rank too (a SIGTERM to itself)
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
    device = None
    if backend == "nccl":
        device = torch.device("cuda", cuda_device_index(info.local_rank, torch.cuda.device_count()))
        torch.cuda.set_device(device)
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
    # Connect now, bounded by the connect timeout: device_id makes NCCL form its communicator inside
    # init_process_group (torch otherwise waits for the first collective), the barrier proves that
    # the ranks talk. Only then do collectives get their long timeout.
    eager_s, deadline_s = _eager_limits(backend, connect)
    set_timeout = getattr(distributed_c10d, "_set_pg_timeout", None)

    def stuck() -> DistributedError:
        return _no_connection(info, backend, f"still connecting after {deadline_s:.0f} s")

    try:
        with _exit_after(deadline_s, stuck, main=info.rank == 0):
            dist.init_process_group(backend=backend, store=store, rank=info.rank, world_size=info.world_size,
                                    timeout=timedelta(seconds=eager_s) if set_timeout else collective,
                                    **({"device_id": device} if device is not None else {}))
            if info.world_size > 1:
                dist.barrier()
    except RuntimeError as exc:
        raise _no_connection(info, backend, str(exc).splitlines()[0][:200]) from None
    if set_timeout is not None:
        set_timeout(collective)
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


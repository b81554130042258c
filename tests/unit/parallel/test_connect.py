"""The ranks connect to each other inside init_distributed, bounded by the connect timeout, with the
one-line hint; the device each rank takes; rank 0's address under mpirun. Real processes and real
torch.distributed (gloo) where a path runs on CPU; NCCL's path through its pure parts.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time

import pytest

from relbert_ds.errors import DistributedError
from relbert_ds.parallel import distributed
from relbert_ds.parallel.distributed import CONNECT_GRACE_S, cuda_device_index, master_address
from tests.launch import REPO, free_port, rank_env

# Rank 1 joins the rendezvous (the TCP store) and then never creates its process group: to rank 0
# this is what a peer on an interface it cannot reach looks like (the store answered, the backend
# does not).
SILENT_PEER = textwrap.dedent("""
    import os, sys, time
    from datetime import timedelta
    import torch.distributed as dist
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), 2, is_master=False,
                          timeout=timedelta(seconds=30))
    print("joined", flush=True)
    time.sleep(float(sys.argv[1]))
""")

RANK = textwrap.dedent("""
    import sys, time
    from relbert_ds.cli.common import run_main
    from relbert_ds.parallel import distributed

    def body():
        start = time.monotonic()
        info = distributed.init_distributed(backend="gloo", connect_timeout_s=float(sys.argv[1]),
                                            collective_timeout_s=60)
        print(f"connected after {time.monotonic() - start:.1f} s", flush=True)
        if info.rank == 1:
            time.sleep(float(sys.argv[2]))  # longer than the connect timeout, shorter than the collective one
        distributed.barrier()
        print(f"rank {info.rank}: barrier passed", flush=True)
        return 0

    sys.exit(run_main(body))
""")


def _start(code: str, rank: int, port: int, *args: str) -> subprocess.Popen:
    env = rank_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=str(REPO), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"still running after {timeout} s (the 60 s collective timeout, or a hang)\n{err[-2000:]}")
    return proc.returncode, out, err


def test_a_peer_that_joins_but_never_connects_fails_within_the_connect_timeout_with_the_hint():
    """Before: init_process_group waited the collective timeout (here 60 s; 30 minutes by default)
    and gave no hint; now: the connect timeout (3 s), one error line naming GLOO_SOCKET_IFNAME."""
    port = free_port()
    peer = _start(SILENT_PEER, 1, port, "120")
    try:
        start = time.monotonic()
        rank0 = _start(RANK, 0, port, "3", "0")
        code, out, err = _finish(rank0, timeout=45)
        elapsed = time.monotonic() - start
    finally:
        peer.kill()
        peer.communicate()
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == DistributedError.exit_code and len(lines) == 1, err[-3000:]
    assert lines[0].startswith("error: rank 0 joined the rendezvous at 127.0.0.1:") and \
        "but could not connect to the other ranks (" in lines[0], lines[0]
    assert lines[0].endswith("fix: set GLOO_SOCKET_IFNAME to the network interface the nodes share (e.g. "
                             "GLOO_SOCKET_IFNAME=eth0), and check that no firewall blocks the ranks' ports")
    assert "connected" not in out and elapsed < 30


def test_after_connecting_collectives_wait_the_collective_timeout_not_the_connect_one():
    """The short connect timeout ends with the connection: a peer 6 s late at a barrier (connect
    timeout 2 s, collective 60 s) is waited for."""
    port = free_port()
    ranks = [_start(RANK, r, port, "2", "6") for r in (0, 1)]
    results = [_finish(p, timeout=90) for p in ranks]
    for r, (code, out, err) in enumerate(results):
        assert code == 0, err[-3000:]
        assert f"rank {r}: barrier passed" in out


def test_exit_after_ends_a_stuck_process_with_one_line_from_rank_0():
    """The bound for what no timeout reaches (NCCL's blocking communicator set-up): the real
    watchdog, around a block stuck in sleep."""
    code = textwrap.dedent("""
        import sys, time
        from relbert_ds.errors import DistributedError
        from relbert_ds.parallel.distributed import _exit_after
        with _exit_after(1.0, lambda: DistributedError("stuck; fix: unstick"), main=sys.argv[1] == "0"):
            time.sleep(30)
        print("not reached")
    """)
    for rank, printed in (("0", "error: stuck; fix: unstick\n"), ("1", "")):
        start = time.monotonic()
        done = subprocess.run([sys.executable, "-c", code, rank], capture_output=True, text=True, timeout=60,
                              cwd=str(REPO), env=rank_env())
        assert done.returncode == DistributedError.exit_code and done.stderr == printed and done.stdout == ""
        assert time.monotonic() - start < 20


def test_exit_after_lets_a_block_that_finishes_go_on():
    with distributed._exit_after(0.5, lambda: DistributedError("x"), main=True):
        pass
    time.sleep(1.0)  # the timer was cancelled: this process is still alive


def test_eager_limits_put_our_bound_first_where_the_backend_cannot_time_out():
    assert distributed._eager_limits("gloo", 300) == (300, 300 + CONNECT_GRACE_S)  # gloo raises itself first
    assert distributed._eager_limits("nccl", 300) == (300 + CONNECT_GRACE_S, 300)  # ours before NCCL's watchdog


def test_init_process_group_takes_device_id_the_way_init_distributed_passes_it():
    """The real torch API: a ``device_id`` keyword (NCCL then forms its communicator at once;
    torch.distributed.distributed_c10d documents it as the way to see NCCL errors early), and
    ``_set_pg_timeout``, which init_distributed uses to lengthen the timeout after connecting."""
    import inspect

    from torch.distributed import distributed_c10d

    params = inspect.signature(distributed_c10d.init_process_group).parameters
    assert "device_id" in params and "form" in inspect.getdoc(distributed_c10d.init_process_group)
    assert list(inspect.signature(distributed_c10d._set_pg_timeout).parameters) == ["timeout", "group"]


# ---------------------------------------------------------------- the GPU each local rank takes
@pytest.mark.parametrize("local_rank,visible,index", [
    (0, 8, 0), (5, 8, 5), (3, 4, 3),  # the node's GPUs visible to every rank
    (0, 1, 0), (3, 1, 0), (7, 1, 0),  # one GPU per rank (--gpus-per-task=1, an MPI wrapper)
    (1, 2, 1),
])
def test_cuda_device_index(local_rank, visible, index):
    assert cuda_device_index(local_rank, visible) == index


def test_cuda_device_index_refuses_ranks_that_would_share_a_gpu():
    with pytest.raises(DistributedError) as info:
        cuda_device_index(4, 4)  # 8 ranks on a node whose ranks see 4 GPUs each
    assert str(info.value) == (
        "local rank 4 sees 4 GPUs, so it would share one with a lower local rank (one rank per GPU is needed); "
        "fix: start as many ranks per node as it has GPUs (--ntasks-per-node = --gpus-per-node), or give each "
        "rank its own GPU (--gpus-per-task=1)")
    with pytest.raises(DistributedError, match=r"^local rank 0 uses NCCL but sees no CUDA GPU .*; fix: "):
        cuda_device_index(0, 0)


# ---------------------------------------------------------------- rank 0's address for other nodes
def test_master_address_of_a_host_name_that_resolves_to_a_routable_address_is_that_address():
    assert master_address("10.1.2.3", ["node02"]) == "10.1.2.3"


def test_master_address_never_hands_out_loopback():
    """Debian/Ubuntu's /etc/hosts maps the host name to 127.0.1.1; with no route to another node
    giving a better one, the answer is the one-line fix, not a loopback address."""
    for host, peers in (("127.0.1.1", []), ("localhost", ["localhost"]), ("127.0.1.1", ["127.0.0.5"])):
        with pytest.raises(DistributedError) as info:
            master_address(host, peers)
        message = str(info.value)
        assert message.startswith(f"rank 0's host name {host!r} resolves only to 127.") and "(loopback" in message
        assert "; fix: set MASTER_ADDR to rank 0's address on the network the nodes share" in message


def test_master_address_of_a_loopback_host_name_is_the_interface_that_reaches_the_other_nodes():
    """Real sockets: a peer outside this host (a documentation address) is reached through a
    non-loopback interface of this machine, and that interface's address is the answer."""
    peer = "192.0.2.123"
    route = distributed._source_address_towards(peer)
    if route is None:
        pytest.skip(f"this machine has no route to {peer}")
    addr = master_address("127.0.1.1", [peer])
    assert addr == route and not addr.startswith("127.")
    with socket.socket() as s:
        s.bind((addr, 0))  # an address of this machine: rank 0 can listen on it

"""Ranks from MPI, for jobs started by `mpirun -np N python script.py`.

mpi4py is imported only here, and only when the launcher looks like MPI (`launcher.py`): importing
`mpi4py.MPI` initialises MPI. MPI is used for discovery only — rank, size, local rank (ranks that
share memory, `COMM_TYPE_SHARED`), every rank's host name, and one broadcast of the rendezvous
address; the tensors then travel over torch.distributed (gloo / NCCL).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any, Optional, Sequence

LOOPBACK_ADDR = "127.0.0.1"


@dataclass(frozen=True)
class MpiFacts:
    """This process's place in MPI_COMM_WORLD. hostnames[r] is rank r's host name."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    hostnames: tuple[str, ...]


def _world():
    from mpi4py import MPI

    return MPI, MPI.COMM_WORLD


def discover_mpi() -> MpiFacts:
    """Rank, size, local rank and host names from MPI (a collective: every rank must call it)."""
    MPI, comm = _world()
    node_comm = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        local_rank, local_world = node_comm.Get_rank(), node_comm.Get_size()
    finally:
        node_comm.Free()
    hostnames = tuple(comm.allgather(socket.gethostname()))
    return MpiFacts(comm.Get_rank(), comm.Get_size(), local_rank, local_world, hostnames)


def mpi_world_size() -> int:
    """How many processes MPI_COMM_WORLD holds (not a collective)."""
    _, comm = _world()
    return comm.Get_size()


def broadcast_from_rank0(value: Any) -> Any:
    """Rank 0's `value` on every rank (a collective: every rank must call it)."""
    _, comm = _world()
    return comm.bcast(value, root=0)


def rendezvous_address(hostnames: Sequence[str], master_addr_hint: Optional[str]) -> str:
    """The address at which rank 0 (which calls this) will host the rendezvous store.

    All ranks on one host: the loopback address, so a single-node job never leaves the machine.
    Otherwise the `MASTER_ADDR` the user gave, else the address of the interface that routes from
    rank 0 towards another rank's host.
    """
    if len(set(hostnames)) == 1:
        return LOOPBACK_ADDR
    if master_addr_hint:
        return master_addr_hint
    peer_host = next(h for h in hostnames if h != hostnames[0])
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((socket.gethostbyname(peer_host), 9))  # UDP connect sends no packet
            return probe.getsockname()[0]
    except OSError:
        return socket.gethostbyname(socket.gethostname())

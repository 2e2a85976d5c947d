"""`init_parallel` / `shutdown_parallel`: from whatever launcher started the job to process groups.

Steps (every rank runs the same ones, in the same order):

1. Ask `launcher.py` who started us: an env launcher (DeepSpeed, torchrun: RANK/WORLD_SIZE/...),
   mpirun (ranks from mpi4py; rank 0 opens the rendezvous store on a free port — on 127.0.0.1
   when all ranks share one host — and broadcasts address and port over MPI), or nothing (a single
   process: no process group at all).
2. Rendezvous through a c10d TCPStore; every rank posts its host name and pid (so a lost rank can
   be named later, and TP groups can be checked to stay within one node).
3. `torch.distributed.init_process_group` with that store: gloo on CPU; on GPUs
   "cpu:gloo,cuda:nccl", so tensors on the GPU go through NCCL while the per-step plan and other
   Python objects (CPU tensors) go through gloo without touching the GPU streams. Every group gets
   the collective timeout `timeout_s`, so a dead peer makes a collective fail instead of hang.
4. One TP group per block of `tp_size` consecutive ranks, and a group of the TP leaders.

Why not `deepspeed.init_distributed` everywhere: on the CPU accelerator its TorchBackend compiles
DeepSpeed's shared-memory comm op on first use (45-95 s on a fresh machine, ~3 s a process when
cached) and its MPI discovery picks the non-loopback `hostname -I` address. On CPU this module
therefore uses plain torch.distributed with gloo, which DeepSpeed itself would use underneath. On
GPUs, where that op does not exist, the process groups built here are handed to
`deepspeed.init_distributed` (if DeepSpeed is installed), so that deepspeed.comm — e.g.
DeepSpeed-Inference, the benchmark baseline — runs on the same groups.
"""

from __future__ import annotations

import atexit
import os
import socket
from datetime import timedelta
from typing import Optional

from .errors import PeerDirectory, RankLostError, is_peer_failure, rank_lost_error
from .launcher import LaunchInfo, detect_launcher
from .layout import Layout, local_position, plan_layout
from .state import ParallelState, ProcessGroups, _set, current_groups, current_state

DEVICE_BACKENDS = {"cpu": "gloo", "cuda": "cpu:gloo,cuda:nccl"}

_IDENTITY_KEY = "identity/{rank}"
_atexit_registered = False
_init_generation = 0  # how many times init_parallel built process groups in this process


def _loopback_interface() -> Optional[str]:
    """Name of the loopback network interface (Linux: flag IFF_LOOPBACK in sysfs), or None."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    for name in names:
        try:
            with open(f"/sys/class/net/{name}/flags") as flags:
                if int(flags.read(), 16) & 0x8:
                    return name
        except (OSError, ValueError):
            continue
    return "lo" if "lo" in names else None


def _open_store(host: str, port: int, rank: int, world: int, is_host: bool, timeout_s: float):
    """Connect to (or, on the hosting rank, open) the rendezvous store at host:port.
    port 0 on the hosting rank picks a free port (read it back from `store.port`)."""
    import torch.distributed as dist

    try:
        return dist.TCPStore(host, port, world, is_host, timeout=timedelta(seconds=timeout_s),
                             wait_for_workers=False)
    except Exception as error:
        if is_host:
            raise
        raise RankLostError(f"rank {rank}: could not reach the rendezvous store at {host}:{port}, hosted by "
                            f"rank 0, within {timeout_s:g} s (rank 0 is lost or never started); cause: "
                            f"{' '.join(str(error).split())}", lost_ranks=(0,), group_ranks=tuple(range(world))) \
            from error


def pid_space() -> str:
    """Where this process's pid means something: the kernel's boot id and the pid namespace ("" when
    /proc does not tell). Ranks in containers of one machine may share a host name, not their pids."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as boot_id:
            return f"{boot_id.read().strip()}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


def _exchange_identity(store, rank: int, world: int, timeout_s: float,
                       where: str) -> tuple[list[str], list[int], list[str]]:
    """Every rank's (host name, pid, `pid_space`), through the store. RankLostError names ranks that
    never post."""
    keys = [_IDENTITY_KEY.format(rank=r) for r in range(world)]
    timeout = timedelta(seconds=timeout_s)
    try:
        store.set(keys[rank], f"{socket.gethostname()}\n{os.getpid()}\n{pid_space()}")
        store.wait(keys, timeout)
        identities = [store.get(key).decode().split("\n") for key in keys]
        # Everyone has read them before anyone goes on: a rank that then fails the layout check (all
        # fail it alike) must not take the store (hosted by rank 0) away from ranks still reading.
        if store.add("identity_read", 1) == world:
            store.set("identity_all_read", "1")
        store.wait(["identity_all_read"], timeout)
    except Exception as error:
        try:
            missing = [r for r, key in enumerate(keys) if not store.check([key])]
        except Exception:  # the store itself is gone: its host, rank 0, is lost
            missing = [0]
        what = (f"rank(s) {missing} of {world} did not join the job within {timeout_s:g} s" if missing else
                f"a rank left the rendezvous before it finished (waited up to {timeout_s:g} s)")
        raise RankLostError(f"rank {rank}: {what} (rendezvous at {where}); cause: {' '.join(str(error).split())}",
                            lost_ranks=missing, group_ranks=tuple(range(world))) from error
    return [i[0] for i in identities], [int(i[1]) for i in identities], [i[2] for i in identities]


def _rendezvous(info: LaunchInfo, tp_size: int, timeout_s: float, allow_cross_node_tp: bool):
    """(launch info with rank/world/local rank filled in, store, "host:port") — store None for world 1."""
    if info.launcher == "mpirun":
        from . import mpi

        facts = mpi.discover_mpi()
        plan_layout(facts.world_size, tp_size, facts.hostnames, allow_cross_node_tp)
        info = LaunchInfo("mpirun", facts.rank, facts.world_size, facts.local_rank, facts.local_world_size,
                          info.master_addr, None)
        if facts.world_size == 1:
            return info, None, ""
        store = None
        if facts.rank == 0:
            host = mpi.rendezvous_address(facts.hostnames, info.master_addr)
            store = _open_store(host, 0, 0, facts.world_size, True, timeout_s)
            address = (host, store.port)
        else:
            address = None
        host, port = mpi.broadcast_from_rank0(address)
        if store is None:
            store = _open_store(host, port, facts.rank, facts.world_size, False, timeout_s)
        return info, store, f"{host}:{port}"
    plan_layout(info.world_size, tp_size)  # the numbers alone, before any connection
    if info.world_size == 1:
        return info, None, ""
    # Under torchrun the agent already hosts the store at MASTER_PORT: every rank is a client there.
    is_host = info.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    store = _open_store(info.master_addr, info.master_port, info.rank, info.world_size, is_host, timeout_s)
    return info, store, f"{info.master_addr}:{info.master_port}"


def _build_groups(layout: Layout, rank: int, timeout_s: float) -> tuple:
    """(this rank's TP group, the TP-leaders group if this rank is a leader). Every rank creates
    every group, in the same order, as torch.distributed requires."""
    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    tp_group = leaders_group = None
    if layout.tp_size == layout.world_size:
        tp_group = dist.group.WORLD
    elif layout.tp_size > 1:
        for ranks in layout.all_tp_groups():
            group = dist.new_group(list(ranks), timeout=timeout)
            if rank in ranks:
                tp_group = group
    if layout.dp_size > 1:
        leaders = layout.dp_leaders()
        group = dist.group.WORLD if layout.tp_size == 1 else dist.new_group(list(leaders), timeout=timeout)
        if rank in leaders:
            leaders_group = group
    return tp_group, leaders_group


def _hand_groups_to_deepspeed(timeout_s: float) -> None:
    """On GPUs, let deepspeed.comm wrap the process group built here (see the module docstring)."""
    try:
        import deepspeed
    except ImportError:
        return
    deepspeed.init_distributed(dist_backend="nccl", auto_mpi_discovery=False, verbose=False,
                               timeout=timedelta(seconds=timeout_s))


def cuda_device_of_rank(rank: int, local_rank: int, visible_devices: int, cuda_visible_devices: Optional[str]) -> int:
    """The CUDA device a rank drives: its local rank among the host's GPUs, or device 0 where the
    launcher gave each rank one GPU of its own (CUDA_VISIBLE_DEVICES naming a single device)."""
    one_of_its_own = cuda_visible_devices is not None and len([d for d in cuda_visible_devices.split(",") if d]) == 1
    if visible_devices == 1 and one_of_its_own:
        return 0
    if local_rank >= visible_devices:
        raise ValueError(f"rank {rank} has local rank {local_rank} but this host shows {visible_devices} GPU(s); "
                         "start at most that many ranks per node, or give each rank its own GPU with "
                         "CUDA_VISIBLE_DEVICES")
    return local_rank


def launched_world_size() -> int:
    """How many processes the launcher started (1 for a plain process), known before
    `init_parallel` joins them: from the launcher's environment, or from MPI under mpirun."""
    info = detect_launcher()
    if info.launcher == "mpirun":
        from .mpi import mpi_world_size

        return mpi_world_size()
    return info.world_size


def init_parallel(tensor_parallel_size: int, device_type: str = "cpu", timeout_s: float = 60.0,
                  allow_cross_node_tp: bool = False) -> ParallelState:
    """Join the job's other ranks and build the TP / DP groups; returns this rank's ParallelState.

    Call it once per process before building the model (layers read `tp_rank()` / `tp_size()` when
    they are built). world size = dp_size x tensor_parallel_size, TP groups are consecutive ranks.
    device_type: "cpu" (gloo) or "cuda" (NCCL for tensors, on GPU `local_rank`, which this sets as
    the current device). timeout_s: how long a collective (and the rendezvous) waits for a peer
    before failing — a dead rank surfaces as RankLostError within about this many seconds.
    Raises ValueError (bad sizes or layout; the message names the numbers) on every rank alike.
    Calling it again with the same arguments returns the current state.
    """
    global _atexit_registered, _init_generation
    if device_type not in DEVICE_BACKENDS:
        raise ValueError(f"device_type must be one of {sorted(DEVICE_BACKENDS)}, got {device_type!r}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    if current_groups() is not None or current_state().launcher != "single":
        state = current_state()
        if state.tp_size == tensor_parallel_size and state.device_type == device_type:
            return state
        raise RuntimeError(f"init_parallel was already called (tensor_parallel_size {state.tp_size}, "
                           f"device {state.device_type}); call shutdown_parallel() before initialising again")

    info, store, where = _rendezvous(detect_launcher(), tensor_parallel_size, timeout_s, allow_cross_node_tp)
    if store is None:  # one process: no process group, the collectives return their input
        state = ParallelState(launcher=info.launcher, device_type=device_type)
        _set(state, None)
        return state

    import torch
    import torch.distributed as dist

    rank, world = info.rank, info.world_size
    # Keys of this init only: a long-lived store (torchrun's agent store across restarts, or an earlier
    # init_parallel in this process) may still hold an earlier generation's keys.
    _init_generation += 1
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    raw_store, store = store, dist.PrefixStore(f"kcache_dist/{restart}.{_init_generation}", store)
    hostnames, pids, pid_spaces = _exchange_identity(store, rank, world, timeout_s, where)
    layout = plan_layout(world, tensor_parallel_size, hostnames, allow_cross_node_tp)
    host_local_rank, local_world = local_position(hostnames, rank)
    local_rank = info.local_rank if info.local_rank is not None else host_local_rank
    if len(set(hostnames)) == 1 and "GLOO_SOCKET_IFNAME" not in os.environ:
        loopback = _loopback_interface()  # one host: gloo's sockets stay on the loopback interface
        if loopback:
            os.environ["GLOO_SOCKET_IFNAME"] = loopback
    if device_type == "cuda":
        torch.cuda.set_device(cuda_device_of_rank(rank, local_rank, torch.cuda.device_count(),
                                                  os.environ.get("CUDA_VISIBLE_DEVICES")))
    backend = DEVICE_BACKENDS[device_type]
    try:
        dist.init_process_group(backend, store=dist.PrefixStore("pg", store), rank=rank,
                                world_size=world, timeout=timedelta(seconds=timeout_s))
        tp_group, leaders_group = _build_groups(layout, rank, timeout_s)
    except Exception as error:
        if not is_peer_failure(error):
            raise
        peers = PeerDirectory(rank, tuple(hostnames), tuple(pids), timeout_s, tuple(pid_spaces))
        raise rank_lost_error("building the process groups", range(world), "the world", error, peers) from error
    if device_type == "cuda":
        _hand_groups_to_deepspeed(timeout_s)

    tp_size = layout.tp_size
    state = ParallelState(rank=rank, local_rank=local_rank, world_size=world, local_world_size=local_world,
                          tp_rank=rank % tp_size, tp_size=tp_size, dp_rank=rank // tp_size, dp_size=layout.dp_size,
                          tp_group_ranks=layout.tp_group_ranks(rank // tp_size), backend=backend,
                          launcher=info.launcher, device_type=device_type)
    _set(state, ProcessGroups(tp_group=tp_group, dp_leaders_group=leaders_group, timeout_s=timeout_s,
                              hostnames=tuple(hostnames), pids=tuple(pids), pid_spaces=tuple(pid_spaces),
                              store=raw_store, keys=store))
    if not _atexit_registered:
        atexit.register(shutdown_parallel)
        _atexit_registered = True
    return state


def shutdown_parallel() -> None:
    """Destroy the process groups (idempotent; registered with atexit by init_parallel).

    Without it ~6% of DeepSpeed launches aborted at exit. After a lost rank the groups are only
    dropped, not destroyed: tearing down a group whose peer is gone can block.
    """
    groups = current_groups()
    _set(ParallelState(), None)
    if groups is None:
        return
    import torch.distributed as dist

    if dist.is_initialized() and not groups.lost_rank:
        # All ranks arrive before any tears down: rank 0 hosts the rendezvous store, and without
        # this barrier about one mpirun launch in five aborted at exit ("terminate called without
        # an active exception"). Bounded by the collective timeout.
        dist.barrier()
        dist.destroy_process_group()

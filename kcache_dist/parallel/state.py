"""Where this process sits among the ranks. Until `init_parallel` runs (or when it finds no
launcher) the process is rank 0 of 1, and the collectives return their input."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class ParallelState:
    """This rank's coordinates. world_size = dp_size x tp_size; tp_group_ranks are the global ranks
    of this rank's TP group in TP rank order (rank = dp_rank * tp_size + tp_rank).

    backend: the torch.distributed backend ("gloo", or "cpu:gloo,cuda:nccl" on GPUs), None when no
    process group exists (world size 1). launcher: "deepspeed", "torchrun", "env", "mpirun" or
    "single". local_rank: the launcher's local rank (the GPU this rank uses), else this rank's index
    among the ranks on its host; local_world_size: how many ranks share this host.
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    tp_rank: int = 0
    tp_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    tp_group_ranks: tuple[int, ...] = (0,)
    backend: Optional[str] = None
    launcher: str = "single"
    device_type: str = "cpu"

    @property
    def is_tp_leader(self) -> bool:
        """True on the first rank of each TP group (the one that speaks for its DP replica)."""
        return self.tp_rank == 0


@dataclass
class ProcessGroups:
    """The torch.distributed handles behind a ParallelState (private to this package).

    tp_group / dp_leaders_group: None when this rank is not a member or no group is needed.
    hostnames / pids / pid_spaces: every rank's host name, process id and where that id means
    something (`process_group.pid_space`), exchanged at init, so a failed collective can tell
    which peer process has gone.
    """

    tp_group: Any = None
    dp_leaders_group: Any = None
    timeout_s: float = 60.0
    hostnames: tuple[str, ...] = ()
    pids: tuple[int, ...] = ()
    pid_spaces: tuple[str, ...] = ()
    store: Any = None
    keys: Any = None  # the store under this init's prefix: small keys the ranks share (e.g. replica progress)
    lost_rank: bool = False  # a collective failed: the groups can no longer be torn down cleanly


_state = ParallelState()
_groups: Optional[ProcessGroups] = None


def current_state() -> ParallelState:
    return _state


def current_groups() -> Optional[ProcessGroups]:
    return _groups


def _set(state: ParallelState, groups: Optional[ProcessGroups]) -> None:
    global _state, _groups
    _state, _groups = state, groups


def tp_rank() -> int:
    return _state.tp_rank


def tp_size() -> int:
    return _state.tp_size


def world_size() -> int:
    return _state.world_size

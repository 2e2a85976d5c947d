"""The collectives the engine and the layers use. TP collectives with tp_size 1 (and world
collectives with world size 1) return their input without touching torch.distributed.

A collective that fails because a peer died or timed out raises `RankLostError` (errors.py).
Tensors go over the device backend (gloo on CPU, NCCL for CUDA tensors); Python objects are
pickled into CPU tensors and go over gloo.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from .errors import (RankLostError, current_peers, find_lost_ranks, mark_rank_lost, peer_failures_as_rank_lost,
                     rank_lost_error)
from .state import current_groups, current_state

TP_GROUP = "the tensor-parallel group"


def _dist():
    import torch.distributed as dist

    return dist


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` (any shape) over the TP group, in place when `x` is contiguous; returns the sum.
    On a device with the two-shot all-reduce on (`enable_two_shot_all_reduce`), a tensor of its
    buffers' dtype, at most their size and a whole number of TWO_SHOT_ALIGNMENT_BYTES goes through
    the buffer of the current `all_reduce_slot`; any other through the process group (the choice
    depends on the shape alone, so every rank makes the same)."""
    state = current_state()
    if state.tp_size == 1:
        return x
    out = x if x.is_contiguous() else x.contiguous()
    two_shot = _two_shot_buffers.get(out.device.index) if two_shot_all_reduce_enabled(out.device) else None
    buffer = two_shot.buffers[_slot] if two_shot is not None and _slot < len(two_shot.buffers) else None
    with peer_failures_as_rank_lost("tp_all_reduce", state.tp_group_ranks, TP_GROUP):
        if (buffer is not None and out.dtype == buffer.dtype and out.numel() <= buffer.numel()
                and out.numel() * out.element_size() % TWO_SHOT_ALIGNMENT_BYTES == 0):
            staged = buffer[: out.numel()]
            staged.copy_(out.view(-1))
            torch.ops.symm_mem.two_shot_all_reduce_(staged, "sum", two_shot.group_name)
            out.view(-1).copy_(staged)
        else:
            _dist().all_reduce(out, group=current_groups().tp_group)
    return out


# Which two-shot buffer `tp_all_reduce` uses: micro-batches whose all-reduces run at once on
# different streams (`engine.micro_batches.run_interleaved`) each take their own.
_slot = 0


@contextlib.contextmanager
def all_reduce_slot(slot: int):
    """Inside: `tp_all_reduce` stages two-shot sums in buffer `slot` (past the last buffer: NCCL)."""
    global _slot
    saved, _slot = _slot, slot
    try:
        yield
    finally:
        _slot = saved


@dataclass(frozen=True)
class _SymmetricBuffers:
    buffers: list  # [slots] x [elements] symmetric memory of the TP group
    group_name: str


_two_shot_buffers: dict[Optional[int], _SymmetricBuffers] = {}  # CUDA device index -> its buffers
_two_shot_on: set = set()  # the CUDA device indices whose all-reduces go through their buffers now
TWO_SHOT_DTYPES = (torch.bfloat16, torch.float32)
TWO_SHOT_ALIGNMENT_BYTES = 16  # torch's kernel refuses sizes that are not whole 4-byte words; 16: whole vectors


def enable_two_shot_all_reduce(max_elements: int, dtype: torch.dtype, device: torch.device, slots: int = 1) -> None:
    """From now on `tp_all_reduce` sums CUDA tensors of `dtype` with at most `max_elements`
    elements on `device` with torch's symmetric-memory two-shot all-reduce (`ParallelConfig.
    all_reduce="two_shot"`): each rank copies its tensor into a buffer that every rank of the TP
    group maps (over NVLink), sums its 1/tp slice from all the buffers, and gathers the others'
    sums; no multicast. `slots` buffers, one per `all_reduce_slot` (per micro-batch). A collective
    of the TP group: every rank calls it, in the same order. The buffers (slots x max_elements x
    dtype) stay allocated until `disable_two_shot_all_reduce(device)` (CUDA graphs captured with
    them read them); buffers already there that are as large are used again."""
    state = current_state()
    if state.tp_size == 1:
        return
    if dtype not in TWO_SHOT_DTYPES:
        raise ValueError(f"parallel.all_reduce='two_shot' sums bfloat16 or float32 activations, not "
                         f"{str(dtype).removeprefix('torch.')}: use parallel.all_reduce='nccl'")
    if device.type != "cuda":
        raise ValueError(f"parallel.all_reduce='two_shot' needs CUDA devices (symmetric memory); this rank runs on "
                         f"{device.type}: use parallel.all_reduce='nccl'")
    import torch.distributed._symmetric_memory as symm_mem

    group_name = current_groups().tp_group.group_name
    held = _two_shot_buffers.get(device.index)
    if (held is not None and held.group_name == group_name and len(held.buffers) >= slots
            and held.buffers[0].dtype == dtype and held.buffers[0].numel() >= max_elements):
        _two_shot_on.add(device.index)
        return
    buffers = []
    with peer_failures_as_rank_lost("enable_two_shot_all_reduce", state.tp_group_ranks, TP_GROUP):
        for _ in range(slots):
            buffers.append(symm_mem.empty(max_elements, dtype=dtype, device=device))
            symm_mem.rendezvous(buffers[-1], group_name)
    _two_shot_buffers[device.index] = _SymmetricBuffers(buffers, group_name)
    _two_shot_on.add(device.index)


def disable_two_shot_all_reduce(device: torch.device, keep_buffers: bool = False) -> None:
    """`tp_all_reduce` on `device` goes through the process group again; the buffers are dropped
    unless keep_buffers (for CUDA graphs captured with them, or a later `enable_two_shot_all_reduce`)."""
    _two_shot_on.discard(device.index)
    if not keep_buffers:
        _two_shot_buffers.pop(device.index, None)


def two_shot_all_reduce_enabled(device: torch.device) -> bool:
    return device.type == "cuda" and device.index in _two_shot_on


def wait_for_device(device: torch.device, timeout_s: float, what: str) -> None:
    """Wait until the work queued on `device`'s current stream so far has run, at most `timeout_s`:
    past it, or as soon as a peer of the TP group on this host has exited, raise `RankLostError`.
    For GPU work that waits on peer ranks without a deadline of its own: NCCL's kernels spin on a
    lost peer until torch's watchdog aborts the process at the collective timeout (without naming
    the rank), the two-shot all-reduce's until every peer's signal comes."""
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(device))
    wait_until(done.query, timeout_s, what, poll_s=0.0)  # yields the GIL, spins as a stream sync does


PEER_CHECK_INTERVAL_S = 0.5  # how often `wait_until` looks for exited peers on this host


def wait_until(done: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 2e-5) -> None:
    """Poll `done()` every `poll_s` seconds (sleeping, so other threads run) until it is true. Every
    PEER_CHECK_INTERVAL_S, a peer of the TP group on this host whose process has exited raises
    `RankLostError` naming it; past `timeout_s`, one naming `what` and the TP group's ranks."""
    ranks = current_state().tp_group_ranks
    start = time.monotonic()
    next_peer_check = start + PEER_CHECK_INTERVAL_S
    while not done():
        now = time.monotonic()
        if now > next_peer_check:
            next_peer_check = now + PEER_CHECK_INTERVAL_S
            if find_lost_ranks(ranks, current_peers(), grace_s=0.0):
                raise rank_lost_error(what, ranks, TP_GROUP, RuntimeError(
                    f"the peer's process exited while this rank waited {now - start:.1f} s for the device"))
        if now > start + timeout_s:
            mark_rank_lost()
            raise RankLostError(f"{what} did not finish within the collective timeout of {timeout_s:g} s; a rank of "
                                f"the tensor-parallel group (ranks {list(ranks)}) may be lost", group_ranks=ranks)
        time.sleep(poll_s)


def tp_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """[..., n] on each of the tp_size ranks -> [..., tp_size * n] on every TP rank: the ranks'
    tensors concatenated along the last dimension in TP rank order."""
    state = current_state()
    if state.tp_size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(state.tp_size)]
    with peer_failures_as_rank_lost("tp_gather_last_dim", state.tp_group_ranks, TP_GROUP):
        _dist().all_gather(parts, x, group=current_groups().tp_group)
    return torch.cat(parts, dim=-1)


def tp_broadcast_object(obj: Any) -> Any:
    """The TP group's first rank's `obj` (picklable), returned on every rank of the group; the
    other ranks' `obj` is ignored. Used to send each step's plan from the scheduling rank."""
    state = current_state()
    if state.tp_size == 1:
        return obj
    holder = [obj if state.tp_rank == 0 else None]
    with peer_failures_as_rank_lost("tp_broadcast_object", state.tp_group_ranks, TP_GROUP):
        _dist().broadcast_object_list(holder, src=state.tp_group_ranks[0], group=current_groups().tp_group)
    return holder[0]


def tp_gather_objects(obj: Any) -> list:
    """[obj of TP rank 0, obj of TP rank 1, ...] (picklable) on every rank of the TP group, e.g.
    each rank's own timings."""
    state = current_state()
    if state.tp_size == 1:
        return [obj]
    gathered: list = [None] * state.tp_size
    with peer_failures_as_rank_lost("tp_gather_objects", state.tp_group_ranks, TP_GROUP):
        _dist().all_gather_object(gathered, obj, group=current_groups().tp_group)
    return gathered


def dp_gather_objects(obj: Any) -> Optional[list]:
    """Global rank 0 gets [obj of TP group 0's leader, obj of TP group 1's leader, ...] (DP rank
    order); every other rank gets None. Only the TP leaders (tp_rank 0) communicate; the other
    ranks' `obj` is ignored and they return at once."""
    state = current_state()
    if state.tp_rank != 0:
        return None
    if state.dp_size == 1:
        return [obj]  # the only leader is global rank 0
    leaders = list(range(0, state.world_size, state.tp_size))
    gathered: Optional[list] = [None] * state.dp_size if state.rank == 0 else None
    with peer_failures_as_rank_lost("dp_gather_objects", leaders, "the group of TP leaders"):
        _dist().gather_object(obj, gathered, dst=0, group=current_groups().dp_leaders_group)
    return gathered


class ReplicaProgress:
    """The data-parallel replicas of one call (e.g. `LLM.generate`) each run at their own pace, and
    may finish far more than the collective timeout apart. Their TP leaders mark progress (`beat`,
    between steps) and the end (`done`) in the job's key store, and `wait_for_all` waits until every
    leader is done, with no deadline while the others keep beating; a leader whose beats stop for
    the collective timeout is named in a RankLostError. Created on the TP leaders only, once per call
    on every leader in the same order; with one replica it does nothing."""

    BEAT_INTERVAL_S = 1.0
    _calls = 0  # calls made in this process (the same count on every leader)

    def __init__(self):
        state, groups = current_state(), current_groups()
        self.active = state.dp_size > 1 and state.tp_rank == 0 and groups is not None and groups.keys is not None
        ReplicaProgress._calls += 1
        self._prefix = f"replica_progress/{ReplicaProgress._calls}/"
        self._last_beat_s = 0.0

    def beat(self) -> None:
        if self.active and time.monotonic() - self._last_beat_s >= self.BEAT_INTERVAL_S:
            current_groups().keys.add(f"{self._prefix}beat/{current_state().dp_rank}", 1)
            self._last_beat_s = time.monotonic()

    def done(self) -> None:
        if self.active:
            current_groups().keys.set(f"{self._prefix}done/{current_state().dp_rank}", "1")

    def wait_for_all(self, poll_s: float = 0.05) -> None:
        if not self.active:
            return
        state, groups = current_state(), current_groups()
        seen: dict[int, tuple[int, float]] = {}  # replica -> (its last beat count, when it changed)
        while True:
            pending = [r for r in range(state.dp_size) if not groups.keys.check([f"{self._prefix}done/{r}"])]
            if not pending:
                return
            now = time.monotonic()
            for replica in pending:
                beats = int(groups.keys.add(f"{self._prefix}beat/{replica}", 0))
                if seen.get(replica, (None,))[0] != beats:
                    seen[replica] = (beats, now)
                elif now - seen[replica][1] > groups.timeout_s:
                    mark_rank_lost()
                    leader = replica * state.tp_size
                    raise RankLostError(f"rank {state.rank}: data-parallel replica {replica} (leader rank {leader}) "
                                        f"made no progress for the collective timeout of {groups.timeout_s:g} s; "
                                        "it may be lost", group_ranks=tuple(range(state.world_size)))
            time.sleep(poll_s)


def all_reduce_min(value: int) -> int:
    """The smallest `value` over all ranks of the world, on every rank (e.g. blocks that fit)."""
    state = current_state()
    if state.world_size == 1:
        return int(value)
    tensor = torch.tensor([int(value)], dtype=torch.int64)  # CPU: goes over gloo
    dist = _dist()
    with peer_failures_as_rank_lost("all_reduce_min", range(state.world_size), "the world"):
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def barrier() -> None:
    """Wait until every rank of the world reaches this point."""
    state = current_state()
    if state.world_size == 1:
        return
    with peer_failures_as_rank_lost("barrier", range(state.world_size), "the world"):
        _dist().barrier()

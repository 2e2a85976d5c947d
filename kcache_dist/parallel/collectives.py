"""The collectives the engine and the layers use. TP collectives with tp_size 1 (and world
collectives with world size 1) return their input without touching torch.distributed.

A collective that fails because a peer died or timed out raises `RankLostError` (errors.py).
Tensors go over the device backend (gloo on CPU, NCCL for CUDA tensors); Python objects are
pickled into CPU tensors and go over gloo.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from .errors import peer_failures_as_rank_lost
from .state import current_groups, current_state

TP_GROUP = "the tensor-parallel group"


def _dist():
    import torch.distributed as dist

    return dist


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` (any shape) over the TP group, in place when `x` is contiguous; returns the sum."""
    state = current_state()
    if state.tp_size == 1:
        return x
    out = x if x.is_contiguous() else x.contiguous()
    with peer_failures_as_rank_lost("tp_all_reduce", state.tp_group_ranks, TP_GROUP):
        _dist().all_reduce(out, group=current_groups().tp_group)
    return out


_collective_streams: dict = {}  # CUDA device index -> the stream chunked all-reduces run on


def _collective_stream(device: torch.device) -> torch.cuda.Stream:
    if device.index not in _collective_streams:
        _collective_streams[device.index] = torch.cuda.Stream(device)
    return _collective_streams[device.index]


def tp_all_reduce_chunks(chunks: Sequence[Callable[[], torch.Tensor]]) -> list[torch.Tensor]:
    """The TP-group sums of the tensors that `chunks` compute, in order. Each chunk runs on the
    current stream; on CUDA its all-reduce runs on a collective stream of the device, so that it
    overlaps the next chunk's computation, and the current stream waits for the last all-reduce
    before this returns (the same inside a CUDA-graph capture). Elsewhere (CPU, gloo) each sum
    follows its chunk. With tp_size 1 the chunks' results come back as they are."""
    state = current_state()
    if state.tp_size == 1:
        return [chunk() for chunk in chunks]
    parts: list[torch.Tensor] = []
    main = side = None
    with peer_failures_as_rank_lost("tp_all_reduce_chunks", state.tp_group_ranks, TP_GROUP):
        for chunk in chunks:
            part = chunk().contiguous()
            parts.append(part)
            if part.device.type != "cuda":
                _dist().all_reduce(part, group=current_groups().tp_group)
                continue
            main, side = torch.cuda.current_stream(part.device), _collective_stream(part.device)
            side.wait_stream(main)  # the chunk is computed
            with torch.cuda.stream(side):
                _dist().all_reduce(part, group=current_groups().tp_group)
    if side is not None:
        main.wait_stream(side)  # the parts are freed (and their memory reused) on the main stream only after this
    return parts


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

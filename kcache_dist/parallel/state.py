"""Where this process sits among the ranks. A process started with no launcher is rank 0 of 1."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelState:
    world_size: int = 1
    tp_rank: int = 0
    tp_size: int = 1


_state = ParallelState()


def current_state() -> ParallelState:
    return _state


def tp_rank() -> int:
    return _state.tp_rank


def tp_size() -> int:
    return _state.tp_size


def world_size() -> int:
    return _state.world_size

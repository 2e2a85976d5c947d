"""Collectives over the tensor-parallel group. With one rank they return their input."""

from __future__ import annotations

import torch

from .state import tp_size


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the tensor-parallel ranks."""
    if tp_size() == 1:
        return x
    raise RuntimeError("tensor-parallel collectives need an initialised process group")


def tp_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's `x` along the last dimension (rank order)."""
    if tp_size() == 1:
        return x
    raise RuntimeError("tensor-parallel collectives need an initialised process group")

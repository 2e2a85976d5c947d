"""`--host-memory-gb auto` for the benchmarks: a host V budget that lets the GPU bind the plan.

The engine's `host_memory_gb` (32 GiB a rank by default) is a budget a serving user sets; a
benchmark that runs each mode "at the largest batch its memory plan allows" should not be bound
by it on a machine that has more. On a 4 x H200 machine (141 GB a GPU), 48 GiB a rank bound
KCache's batch at one GPU (128 sequences at 8K, 32 at 32K) while full mode was bound by the GPU.

`auto` = AUTO_FRACTION of the memory this rank's NUMA node has available (the whole host's
MemAvailable where the node is unknown), split evenly among the local ranks whose GPU hangs off
that node, in whole GiB, the MIN over all ranks (every rank must pass the same knob).
"""

from __future__ import annotations

import argparse
from typing import Optional, Union

import torch

from kcache_dist.cache.memory_facts import host_memory_facts
from kcache_dist.parallel import all_reduce_min, current_state

AUTO = "auto"
AUTO_FRACTION = 0.8  # the rest stays to the OS, the page cache and the processes' own memory
GIB = 1 << 30


def host_memory_gb_arg(text: str) -> Union[str, float]:
    """argparse type: "auto" or a number of GiB > 0."""
    if text == AUTO:
        return AUTO
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number of GiB > 0, got {text!r}")
    return value


def auto_host_memory_gb(device_index: Optional[int], local_world_size: int,
                        node_available_bytes: Optional[int] = None) -> int:
    """This rank's share in whole GiB (at least 1): AUTO_FRACTION of its node's available memory
    over the ranks on that node. `node_available_bytes` overrides what the node reports (tests)."""
    facts = host_memory_facts(device_index, local_world_size)  # the host's MemAvailable where the node is unknown
    available = node_available_bytes if node_available_bytes is not None else facts.node_available_bytes
    return max(1, int(AUTO_FRACTION * (available or 0) / facts.ranks_on_node) // GIB)


def resolve_host_memory_gb(value: Union[str, float], device: torch.device) -> float:
    """A number as given; "auto" as above, agreed over the ranks (call after init_parallel)."""
    if value != AUTO:
        return float(value)
    state = current_state()
    index = device.index if device.type == "cuda" else None
    return float(all_reduce_min(auto_host_memory_gb(index, state.local_world_size)))

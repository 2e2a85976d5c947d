"""What the engine holds right now (queues and cache occupancy), as plain data, so that callers
such as the server's /metrics need not reach into the scheduler, block manager or cache."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineSnapshot:
    """One consistent view of the engine, taken between steps on the thread that owns it.

    Device cache blocks are K blocks in KCache mode and K+V blocks in full mode; host V blocks are
    the blocks whose V rows live in host memory (KCache mode with at least one sparse layer; block
    ids are shared by the K and V pools, so both counts move together there), 0 otherwise.
    `v_bytes_fetched_total` counts this rank's far V rows read from host memory (under tensor
    parallelism each rank reads the rows of its own KV heads). `pinned_host_bytes`: this rank's
    page-locked host memory: the V pool when it is pinned, plus what torch's pinned-memory
    allocator holds (0 on a CPU device).
    """

    kcache_mode: str
    num_requests_running: int
    num_requests_waiting: int
    num_preemptions_total: int
    device_cache_blocks_in_use: int
    device_cache_blocks_total: int
    host_v_blocks_in_use: int
    host_v_blocks_total: int
    v_bytes_fetched_total: int
    pinned_host_bytes: int = 0

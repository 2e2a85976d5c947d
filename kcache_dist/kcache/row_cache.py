"""A device-side cache of the far V rows that KCache decode steps picked lately.

Consecutive decode steps pick mostly the same far positions (benchmarks/notes/selection_reuse.md:
at 8K with top_n 1024, a cache of 2 x top_n rows held 89% of a step's picks on the default model).
`FarRowCache` keeps, per sparse layer, per sequence slot (the sequence's hot slot; the spare slot
of CUDA-graph padding rows included) and per KV head, `capacity` V rows keyed by position
(device bytes per sequence slot: `cache.planner.far_row_cache_slot_bytes`). A step's
picks that it holds are read from it; the others (misses) are gathered from host memory into the
slots whose rows were picked least recently (empty slots first), and the picks come back as one
tensor, as a fetch of every pick from host memory would give them.

Every tensor has a fixed shape and the step makes no host synchronisation, so it runs inside a CUDA
graph: a trash slot (index `capacity`) and a trash position (index max_model_len) take the writes
of padding entries. The cache never changes what a step attends to: the rows are the same, only
where they come from changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# gather(idx [B, Hkv, n] int, -1 = none) -> rows [B, Hkv, n, D] from host memory (any value where -1)
GatherRows = Callable[[torch.Tensor], torch.Tensor]


class FarRowCache:
    """Per sparse layer: rows [num_slots, Hkv, capacity + 1, D] (model dtype), positions and
    last_used (the slot's clock when last picked) [num_slots, Hkv, capacity + 1], slot_of
    [num_slots, Hkv, max_model_len + 1] (position -> cache slot, -1 when not held); index
    `capacity` of the rows and `max_model_len` of the map are trash. num_slots counts the spare
    slot of CUDA-graph padding rows.

    First version, in torch indexing: the misses are gathered into a [B, Hkv, n, D] tensor and
    copied into their slots, and the picks are copied out of the cache again; a gather straight
    into the slots and an output kernel that reads the cache by slot would save those copies."""

    def __init__(self, num_sparse_layers: int, num_slots: int, num_kv_heads: int, capacity: int,
                 max_model_len: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        if capacity < 1:
            raise ValueError(f"FarRowCache capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.max_model_len = max_model_len
        shape = (num_slots, num_kv_heads, capacity + 1)  # + the trash slot
        map_dtype = torch.int16 if capacity < 2 ** 15 else torch.int32  # as `planner.far_row_cache_slot_bytes`
        self.rows = [torch.zeros(*shape, head_dim, dtype=dtype, device=device) for _ in range(num_sparse_layers)]
        self.positions = [torch.full(shape, -1, dtype=torch.int32, device=device) for _ in range(num_sparse_layers)]
        self.last_used = [torch.full(shape, -1, dtype=torch.int64, device=device) for _ in range(num_sparse_layers)]
        self.slot_of = [torch.full((num_slots, num_kv_heads, max_model_len + 1), -1, dtype=map_dtype, device=device)
                        for _ in range(num_sparse_layers)]  # position -> cache slot; + the trash position
        # per sequence slot, so that micro-batches (disjoint slots, on different streams) never
        # update the same element: fetches so far (the stamps' clock) and rows gathered from host memory
        self.clock = torch.zeros(num_slots, dtype=torch.int64, device=device)
        self.misses = torch.zeros(num_slots, dtype=torch.int64, device=device)

    def layer(self, sparse: int) -> "FarRowCacheLayer":
        return FarRowCacheLayer(self, sparse)

    def reset(self, sparse: int, slot: int) -> None:
        """Forget what layer `sparse` holds for sequence slot `slot` (a new sequence took it)."""
        self.positions[sparse][slot] = -1
        self.last_used[sparse][slot] = -1
        self.slot_of[sparse][slot] = -1

    def fetch(self, sparse: int, seq_slots: torch.Tensor, idx: torch.Tensor, gather: GatherRows) -> torch.Tensor:
        """The V rows of the far positions idx [B, Hkv, n] (int, -1 = none; distinct per (b, h);
        n <= capacity) of the sequences in slots seq_slots [B] (distinct, except padding rows whose
        idx are all -1), layer `sparse`: rows [B, Hkv, n, D], zero where idx is -1. Rows the cache
        does not hold come from `gather`, which is called once, with the misses only."""
        B, H, n = idx.shape
        if n > self.capacity:
            raise ValueError(f"{n} picks per row exceed the row cache's capacity {self.capacity}")
        C, L = self.capacity, self.max_model_len
        rows, positions, last_used, slot_of = (self.rows[sparse], self.positions[sparse], self.last_used[sparse],
                                               self.slot_of[sparse])
        dev = idx.device
        seq_slots = seq_slots.to(dev).long()
        s = seq_slots[:, None, None].expand(B, H, n)
        h = torch.arange(H, device=dev)[None, :, None].expand(B, H, n)
        idx = idx.long()
        valid = idx >= 0
        pos = torch.where(valid, idx, L)  # the trash position maps to -1, always
        now = self.clock[seq_slots] + 1
        self.clock[seq_slots] = now
        now = now[:, None, None].expand(B, H, n)
        slot = slot_of[s, h, pos].long()
        hit = valid & (slot >= 0)
        miss = valid & ~hit
        # victims: the n least recently picked slots once this step's hits count as picked now; the
        # misses take the first of them, all older than every hit (C - hits >= n - hits = misses)
        stamps = last_used[seq_slots]  # [B, H, C + 1], a copy
        stamps.scatter_(-1, torch.where(hit, slot, C), now)
        victims = torch.topk(stamps[..., :C], n, dim=-1, largest=False).indices  # ascending stamps
        rank = (miss.long().cumsum(-1) - 1).clamp(min=0)
        victim = victims.gather(-1, rank)  # the slot each miss goes to
        # the victims' old positions leave the map
        old = positions[s, h, victim].long()
        slot_of[s, h, torch.where(miss & (old >= 0), old, L)] = -1
        fetched = gather(torch.where(miss, idx, -1))  # [B, H, n, D]
        write = torch.where(miss, victim, C)  # non-misses write the trash slot
        rows[s, h, write] = fetched.to(rows.dtype)
        positions[s, h, write] = torch.where(miss, idx, -1).int()
        slot_of[s, h, torch.where(miss, pos, L)] = torch.where(miss, victim, -1).to(slot_of.dtype)
        final = torch.where(hit, slot, write)
        last_used[s, h, final] = now
        self.misses.index_add_(0, seq_slots, miss.sum((1, 2)))
        return torch.where(valid[..., None], rows[s, h, final], torch.zeros((), dtype=rows.dtype, device=dev))


@dataclass(frozen=True)
class FarRowCacheLayer:
    """One sparse layer's view of a `FarRowCache` (what the decode step gets)."""

    cache: FarRowCache
    sparse: int

    def fetch(self, seq_slots: torch.Tensor, idx: torch.Tensor, gather: GatherRows) -> torch.Tensor:
        return self.cache.fetch(self.sparse, seq_slots, idx, gather)

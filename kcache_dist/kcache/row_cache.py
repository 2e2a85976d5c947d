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

AGE_BUCKETS = 128  # eviction tells ages (steps since a row was last picked) apart up to this many

# gather(idx [B, Hkv, n] int, -1 = none) -> rows [B, Hkv, n, D] from host memory (any value where -1)
GatherRows = Callable[[torch.Tensor], torch.Tensor]


class FarRowCache:
    """Per sparse layer: rows [num_slots, Hkv, capacity + 1, D] (model dtype; D is head_dim, or
    2 x head_dim for the K | V rows of fp8 scoring keys), positions and
    last_used (the slot's clock when last picked) [num_slots, Hkv, capacity + 1], slot_of
    [num_slots, Hkv, max_model_len + 1] (position -> cache slot, -1 when not held); index
    `capacity` of the rows and `max_model_len` of the map are trash. num_slots counts the spare
    slot of CUDA-graph padding rows.

    `assign` is the step's bookkeeping (which slot holds each pick, which picks miss) in torch, the
    reference of `row_cache_triton.assign_rows`; `fetch` is the reference path's whole fetch. On
    CUDA the Triton decode gathers the misses from host memory straight into their slots and its
    output kernel reads the far rows from the cache by slot.
    """

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
        # update the same element: per layer, steps so far (the stamps' clock); rows gathered from host memory
        self.clock = torch.zeros(num_sparse_layers, num_slots, dtype=torch.int64, device=device)
        self.misses = torch.zeros(num_slots, dtype=torch.int64, device=device)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache holds (what its device memory is)."""
        return [*self.rows, *self.positions, *self.last_used, *self.slot_of, self.clock, self.misses]

    def layer(self, sparse: int) -> "FarRowCacheLayer":
        return FarRowCacheLayer(self, sparse)

    def reset(self, slots: list[int]) -> None:
        """Forget what every layer holds for the sequence slots `slots` (new sequences took them):
        three writes per layer, however many slots."""
        index = torch.tensor(slots, dtype=torch.long, device=self.clock.device)
        for positions, last_used, slot_of in zip(self.positions, self.last_used, self.slot_of):
            positions[index] = -1
            last_used[index] = -1
            slot_of[index] = -1

    def forget_random(self, share: float, generator: torch.Generator | None = None) -> None:
        """Forget each held row with probability `share`, in every layer and slot (benchmarks: a
        step that repeats the last step's picks then hits about 1 - share of them, the hit rate of a
        real model's consecutive steps, e.g. benchmarks/notes/selection_reuse.md)."""
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"share must be in [0, 1], got {share}")
        for positions, last_used, slot_of in zip(self.positions, self.last_used, self.slot_of):
            drop = torch.rand(positions.shape, generator=generator, device=positions.device) < share
            drop[..., self.capacity] = False  # the trash slot
            drop &= positions >= 0
            s, h, _ = drop.nonzero(as_tuple=True)
            slot_of[s, h, positions[drop].long()] = -1
            positions[drop] = -1
            last_used[drop] = -1

    def assign(self, sparse: int, seq_slots: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Torch reference of one step's bookkeeping in layer `sparse` (`row_cache_triton.assign_rows`
        does the same on CUDA, element for element): the picks idx [B, Hkv, n] (int, -1 = none;
        distinct per (b, h); n <= capacity) of the sequences in slots seq_slots [B] (distinct, except
        padding rows whose idx are all -1). Returns (slot [B, Hkv, n] int64: the cache slot that holds
        or will hold each pick, `capacity` (trash) where idx is -1; miss [B, Hkv, n] bool: picks the
        cache did not hold, whose rows the caller must write into their slot).

        Eviction, least recently picked first in steps: a slot's age is the number of this layer's
        steps of its sequence slot since it was last picked (hits count as picked now), capped at
        AGE_BUCKETS - 1, empty slots the oldest; the misses take the m oldest slots (ties: lowest slot
        first), in slot order, in the order of the picks."""
        B, H, n = idx.shape
        if n > self.capacity:
            raise ValueError(f"{n} picks per row exceed the row cache's capacity {self.capacity}")
        C, L = self.capacity, self.max_model_len
        positions, last_used, slot_of = self.positions[sparse], self.last_used[sparse], self.slot_of[sparse]
        dev = idx.device
        seq_slots = seq_slots.to(dev).long()
        s = seq_slots[:, None, None].expand(B, H, n)
        h = torch.arange(H, device=dev)[None, :, None].expand(B, H, n)
        idx = idx.long()
        valid = idx >= 0
        pos = torch.where(valid, idx, L)  # the trash position maps to -1, always
        now = self.clock[sparse, seq_slots] + 1
        self.clock[sparse, seq_slots] = now
        now = now[:, None, None]
        slot = slot_of[s, h, pos].long()
        hit = valid & (slot >= 0)
        miss = valid & ~hit
        last_used[s, h, torch.where(hit, slot, C)] = now.expand(B, H, n)
        stamps = last_used[seq_slots][..., :C]  # [B, H, C]
        age = torch.where(stamps < 0, AGE_BUCKETS - 1, (now - stamps).clamp(max=AGE_BUCKETS - 1))
        m = miss.sum(-1, keepdim=True)  # [B, H, 1]
        ages = torch.arange(AGE_BUCKETS, device=dev)
        hist = torch.zeros(B, H, AGE_BUCKETS, dtype=torch.int64, device=dev).scatter_add_(-1, age, torch.ones_like(age))
        at_least = hist.flip(-1).cumsum(-1).flip(-1)  # slots of age >= a
        cut = torch.where(at_least >= m, ages, 0).amax(-1, keepdim=True)  # the youngest age evicted
        older = torch.where(ages > cut, hist, 0).sum(-1, keepdim=True)
        tie = age == cut
        victim = (age > cut) | (tie & (tie.cumsum(-1) - 1 < m - older))
        slot_ids = torch.arange(C, device=dev).expand(B, H, C)
        victims = torch.sort(torch.where(victim, slot_ids, C), dim=-1).values[..., :n]  # ascending, C-padded
        victim_of_pick = victims.gather(-1, (miss.long().cumsum(-1) - 1).clamp(min=0))
        write = torch.where(miss, victim_of_pick, C)  # non-misses write the trash slot
        old = positions[s, h, write].long()
        none = torch.full((), -1, dtype=slot_of.dtype, device=dev)  # a device value: graph capture allows no host copy
        slot_of[s, h, torch.where(miss & (old >= 0), old, L)] = none
        slot_of[s, h, torch.where(miss, pos, L)] = torch.where(miss, write, -1).to(slot_of.dtype)
        positions[s, h, write] = torch.where(miss, idx, -1).int()
        last_used[s, h, write] = now.expand(B, H, n)
        self.misses.index_add_(0, seq_slots, miss.sum((1, 2)))
        return torch.where(hit, slot, write), miss

    def fetch(self, sparse: int, seq_slots: torch.Tensor, idx: torch.Tensor, gather: GatherRows) -> torch.Tensor:
        """The V rows of the far positions idx [B, Hkv, n] (as `assign`): rows [B, Hkv, n, D], zero
        where idx is -1. Rows the cache does not hold come from `gather`, which is called once, with
        the misses only."""
        B, H, n = idx.shape
        rows = self.rows[sparse]
        slot, miss = self.assign(sparse, seq_slots, idx)
        s = seq_slots.to(idx.device).long()[:, None, None].expand(B, H, n)
        h = torch.arange(H, device=idx.device)[None, :, None].expand(B, H, n)
        fetched = gather(torch.where(miss, idx, -1))  # [B, H, n, D]
        rows[s, h, torch.where(miss, slot, self.capacity)] = fetched.to(rows.dtype)
        zero = torch.zeros((), dtype=rows.dtype, device=idx.device)
        return torch.where((idx >= 0)[..., None], rows[s, h, slot], zero)


@dataclass(frozen=True)
class FarRowCacheLayer:
    """One sparse layer's view of a `FarRowCache` (what the decode step gets)."""

    cache: FarRowCache
    sparse: int

    def fetch(self, seq_slots: torch.Tensor, idx: torch.Tensor, gather: GatherRows) -> torch.Tensor:
        return self.cache.fetch(self.sparse, seq_slots, idx, gather)

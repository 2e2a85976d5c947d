"""The far-row cache's step bookkeeping as one Triton kernel (reference: `FarRowCache.assign`).

One program per (sequence, KV head) row: look the picks up in the position map, stamp the hits,
histogram the slots' ages to find the m oldest (m = misses), give the misses those slots in slot
order and update the map, positions and stamps. It returns, per pick, the flat row index of its
slot in the layer's rows (so that the gather writes the misses straight into their slots and the
output kernel reads every far row from the cache) and the misses' positions (-1 elsewhere): no
host synchronisation, fixed shapes, so it runs inside a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_interpreter import patch_if_interpreting
from .row_cache import AGE_BUCKETS, FarRowCache


@triton.jit
def _assign_kernel(IDX, SEQ_SLOTS, NOW, SLOT_OF, POSITIONS, LAST_USED, VICTIMS, FAR_ROW, MISS_IDX, MISSES,
                   n, C, L, HKV: tl.constexpr, NP: tl.constexpr, CP: tl.constexpr, NB: tl.constexpr):
    """grid (B * HKV,). IDX [rows, n] int32 (-1 = none); SEQ_SLOTS, NOW [B] int64; SLOT_OF [slots,
    HKV, L + 1]; POSITIONS, LAST_USED [slots, HKV, C + 1]; VICTIMS [rows, n] int32 scratch; out:
    FAR_ROW [rows, n] int32 (flat row of the pick's slot in the layer's rows, -1 = none), MISS_IDX
    [rows, n] int32 (the position where the pick missed, else -1); MISSES [slots] int64 += misses."""
    row = tl.program_id(0)
    b = row // HKV
    h = row % HKV
    s = tl.load(SEQ_SLOTS + b)
    now = tl.load(NOW + b)
    base = s * HKV + h
    map_row = SLOT_OF + base * (L + 1)
    slot_row = base * (C + 1)
    i = tl.arange(0, NP)
    pm = i < n
    pos = tl.load(IDX + row * n + i, mask=pm, other=-1)
    valid = pos >= 0
    slot = tl.load(map_row + pos, mask=valid, other=-1).to(tl.int32)
    hit = valid & (slot >= 0)
    miss = valid & (slot < 0)
    tl.store(LAST_USED + slot_row + slot, now, mask=hit)
    tl.debug_barrier()
    c = tl.arange(0, CP)
    cm = c < C
    stamp = tl.load(LAST_USED + slot_row + c, mask=cm, other=0)
    age = tl.where(stamp < 0, NB - 1, tl.minimum(now - stamp, NB - 1)).to(tl.int32)
    age = tl.where(cm, age, 0)  # padding counts as just picked: never a victim (C - hits >= misses)
    m = tl.sum(miss.to(tl.int32), 0)
    hist = tl.histogram(age, NB)
    a = tl.arange(0, NB)
    at_least = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist
    cut = tl.max(tl.where(at_least >= m, a, 0), 0)
    older = tl.sum(tl.where(a > cut, hist, 0), 0)
    tie = cm & (age == cut)
    victim = cm & ((age > cut) | (tie & (tl.cumsum(tie.to(tl.int32), 0) - 1 < m - older)))
    vrank = tl.cumsum(victim.to(tl.int32), 0) - 1
    tl.store(VICTIMS + row * n + vrank, c, mask=victim)
    tl.debug_barrier()
    mrank = tl.cumsum(miss.to(tl.int32), 0) - 1
    v = tl.load(VICTIMS + row * n + mrank, mask=miss, other=0)
    old = tl.load(POSITIONS + slot_row + v, mask=miss, other=-1)
    tl.store(map_row + old, tl.full([NP], -1, tl.int32).to(SLOT_OF.dtype.element_ty), mask=miss & (old >= 0))
    tl.store(map_row + pos, v.to(SLOT_OF.dtype.element_ty), mask=miss)
    tl.store(POSITIONS + slot_row + v, pos, mask=miss)
    tl.store(LAST_USED + slot_row + v, now + tl.zeros([NP], tl.int64), mask=miss)
    final = tl.where(hit, slot, v)
    tl.store(FAR_ROW + row * n + i, tl.where(valid, slot_row + final, -1).to(tl.int32), mask=pm)
    tl.store(MISS_IDX + row * n + i, tl.where(miss, pos, -1), mask=pm)
    tl.atomic_add(MISSES + s, m.to(tl.int64))


def assign_rows(cache: FarRowCache, sparse: int, seq_slots: torch.Tensor,
                idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`FarRowCache.assign` of layer `sparse` in one kernel. seq_slots [B] (int, on idx's device);
    idx [B * Hkv, n] int32 far positions (-1 = none). Returns (far_row [B * Hkv, n] int32: the row
    of each pick in cache.rows[sparse].view(-1, D), -1 where idx is -1; miss_idx [B * Hkv, n] int32:
    the positions the cache missed, whose V rows the caller writes to those rows, else -1)."""
    rows, n = idx.shape
    B = seq_slots.shape[0]
    H = cache.positions[sparse].shape[1]
    if rows != B * H:
        raise ValueError(f"idx has {rows} rows, expected {B} sequences x {H} KV heads")
    if n > cache.capacity:
        raise ValueError(f"{n} picks per row exceed the row cache's capacity {cache.capacity}")
    slots = seq_slots.long()
    now = cache.clock[sparse, slots] + 1
    cache.clock[sparse, slots] = now
    idx = idx.int().contiguous()
    victims = torch.empty_like(idx)
    far_row = torch.empty_like(idx)
    miss_idx = torch.empty_like(idx)
    if n == 0:
        return far_row, miss_idx
    CP = triton.next_power_of_2(cache.capacity)
    _assign_kernel[(rows,)](idx, slots, now, cache.slot_of[sparse], cache.positions[sparse], cache.last_used[sparse],
                            victims, far_row, miss_idx, cache.misses, n, cache.capacity, cache.max_model_len,
                            HKV=H, NP=triton.next_power_of_2(n), CP=CP, NB=AGE_BUCKETS,
                            num_warps=max(4, min(16, CP // 256)))
    return far_row, miss_idx


patch_if_interpreting()

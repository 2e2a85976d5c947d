"""Triton helpers shared by the kernels that stream a paged cache (inlined where they are called):
the pool offsets of a tile of positions, the masked scores of a query group against a K tile (in the
pool's dtype, or float8 with a scale per row), and probabilities times a V tile.

A pool is [num_blocks, Hkv, bs, D]; a sequence's block table row maps position p to block
table[p // bs], row p % bs.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tile_row_ids(bt_row, offs, msk, h, HKV: tl.constexpr, BS: tl.constexpr):
    """Row ids [BLOCK_N] (int64) into a pool viewed as [NB * HKV * BS, D] of positions offs
    [BLOCK_N] (msk: which are real) of KV head h, through the block-table row bt_row (int32 pointer)."""
    blk = tl.load(bt_row + offs // BS, mask=msk, other=0)
    return (blk.to(tl.int64) * HKV + h) * BS + offs % BS


@triton.jit
def tile_rows(bt_row, offs, msk, h, di, HKV: tl.constexpr, BS: tl.constexpr, D: tl.constexpr):
    """Element offsets [BLOCK_N, D] into a pool of positions offs [BLOCK_N] (msk: which are real)
    of KV head h, through the block-table row bt_row (int32 pointer)."""
    return tile_row_ids(bt_row, offs, msk, h, HKV, BS)[:, None] * D + di[None, :]


@triton.jit
def tile_scores(q, K, rows_at, msk, qk_scale):
    """Scores [GP, BLOCK_N] of q [GP, D] against the K rows at rows_at (`tile_rows`), times qk_scale,
    -inf where msk is false. K is read once (evict first); fp32 K takes the exact dot product."""
    k = tl.load(K + rows_at, mask=msk[:, None], other=0.0, eviction_policy="evict_first")
    if K.dtype.element_ty == tl.float32:
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
    else:
        s = tl.dot(q, tl.trans(k)) * qk_scale
    return tl.where(msk[None, :], s, float("-inf"))


@triton.jit
def tile_scores_scaled(q, K, KS, row_ids, di, msk, qk_scale, D: tl.constexpr):
    """`tile_scores` of a float8 K pool with a float32 scale per row (KS [NB * HKV * BS]): q . (k *
    scale) * qk_scale. The float8 values are widened to q's dtype exactly; row_ids from `tile_row_ids`."""
    k = tl.load(K + row_ids[:, None] * D + di[None, :], mask=msk[:, None], other=0.0,
                eviction_policy="evict_first").to(q.dtype)
    k_scale = tl.load(KS + row_ids, mask=msk, other=0.0, eviction_policy="evict_first")
    if q.dtype == tl.float32:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    return tl.where(msk[None, :], s * (k_scale * qk_scale)[None, :], float("-inf"))


@triton.jit
def probs_times_values(p, v):
    """p [GP, R] fp32 @ v [R, D] in fp32: on the tensor cores with p in v's dtype for 16-bit V (as
    dense attention kernels do), exact fp32 FMAs for fp32 V."""
    if v.dtype == tl.float32:
        return tl.dot(p, v, input_precision="ieee")
    return tl.dot(p.to(v.dtype), v)

"""Dense decode attention over the paged K/V cache in Triton (split-K "flash decoding").

Same math as `paged_attention.decode_attention` (the torch reference, which copies each batch's
K and V out of the pool before SDPA): here every (split of positions, sequence, KV head) CTA
streams its part of the paged K and V once, with all G query heads of the KV head in one tile,
and keeps an online softmax; a second small kernel combines the splits. HBM traffic is one read
of the context's K and V, so full-KV mode and KCache's dense layers decode near the HBM limit.

CUDA; also runs under TRITON_INTERPRET=1 on CPU tensors (fp32/fp16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_interpreter import patch_if_interpreting
from .paged_tiles import probs_times_values, tile_rows, tile_scores

patch_if_interpreting()
LOG2E = 1.4426950408889634
SPLIT_TOKENS = 1024  # positions per CTA: 8 KV heads x 32K context at batch 1 is 256 CTAs
BLOCK_N = 64         # positions per tile


@triton.jit
def _split_kernel(Q, K, V, BT, SEQ, OP, MP, LP, qk_scale, stride_bt, NSPLIT_MAX,
                  HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                  SPLIT: tl.constexpr, BLOCK_N: tl.constexpr):
    """grid (NSPLIT_MAX, B * HKV). Q [B, HKV*G, D]; K, V [NB, HKV, BS, D]; BT [B, stride_bt] int32;
    SEQ [B] int64. Writes per split the unnormalised output OP [NSPLIT_MAX, rows, G, D] fp32 and the
    softmax partials MP (max, log2 domain) and LP (sum of exp2) [NSPLIT_MAX, rows, G]."""
    split = tl.program_id(0)
    row = tl.program_id(1)
    b = row // HKV
    h = row % HKV
    L = tl.load(SEQ + b).to(tl.int32)
    lo = split * SPLIT
    if lo < L:
        gi = tl.arange(0, GP)
        di = tl.arange(0, D)
        ni = tl.arange(0, BLOCK_N)
        gmask = gi < G
        q = tl.load(Q + (b * (HKV * G) + h * G + gi)[:, None] * D + di[None, :], mask=gmask[:, None], other=0.0)
        hi = tl.minimum(lo + SPLIT, L)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        bt_row = BT + b.to(tl.int64) * stride_bt
        for start in range(lo, hi, BLOCK_N):
            offs = start + ni
            msk = offs < hi
            rows_at = tile_rows(bt_row, offs, msk, h, di, HKV, BS, D)
            s = tile_scores(q, K, rows_at, msk, qk_scale)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + rows_at, mask=msk[:, None], other=0.0, eviction_policy="evict_first")
            acc = acc * alpha[:, None] + probs_times_values(p, v)
            m_i = m_new
        part = (split * (tl.num_programs(1) * G) + row * G + gi).to(tl.int64)
        tl.store(OP + part[:, None] * D + di[None, :], acc, mask=gmask[:, None])
        tl.store(MP + part, m_i, mask=gmask)
        tl.store(LP + part, l_i, mask=gmask)


@triton.jit
def _combine_kernel(SEQ, OP, MP, LP, OUT, NSPLIT_MAX, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                    D: tl.constexpr, SPLIT: tl.constexpr):
    """grid (B * HKV). Combines the splits of one row into OUT [B, HKV*G, D] (OUT's dtype)."""
    row = tl.program_id(0)
    rows = tl.num_programs(0)
    b = row // HKV
    L = tl.load(SEQ + b).to(tl.int32)
    nsplit = tl.cdiv(L, SPLIT)
    gi = tl.arange(0, GP)
    di = tl.arange(0, D)
    gmask = gi < G
    m = tl.full([GP], float("-inf"), tl.float32)
    for s in range(0, nsplit):
        m = tl.maximum(m, tl.load(MP + (s * rows * G + row * G + gi), mask=gmask, other=float("-inf")))
    l_sum = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    for s in range(0, nsplit):
        part = (s * rows * G + row * G + gi).to(tl.int64)
        w = tl.exp2(tl.load(MP + part, mask=gmask, other=float("-inf")) - m)
        w = tl.where(gmask, w, 0.0)
        l_sum += w * tl.load(LP + part, mask=gmask, other=0.0)
        acc += w[:, None] * tl.load(OP + part[:, None] * D + di[None, :], mask=gmask[:, None], other=0.0)
    out = acc / tl.where(gmask, l_sum, 1.0)[:, None]
    tl.store(OUT + (row * G + gi)[:, None] * D + di[None, :], out.to(OUT.dtype.element_ty), mask=gmask[:, None])


def paged_decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                                  split_tokens: int = SPLIT_TOKENS) -> torch.Tensor:
    """One new token per sequence attending to its whole context (every sequence has >= 1 token).

    q [B, Hq, D]; k_cache, v_cache [NB, Hkv, bs, D]; block_tables [B, max_blocks] int32 (entries
    past a sequence's blocks are never read); seq_lens [B] int64. All on one device. Returns
    [B, Hq, D] in q's dtype. No host synchronisation: the grid is sized from max_blocks * bs.
    """
    B, Hq, D = q.shape
    _, Hkv, bs, _ = k_cache.shape
    G = Hq // Hkv
    rows = B * Hkv
    nsplit_max = triton.cdiv(block_tables.shape[1] * bs, split_tokens)
    dev = q.device
    op = torch.empty(nsplit_max, rows, G, D, dtype=torch.float32, device=dev)
    mp = torch.empty(nsplit_max, rows, G, dtype=torch.float32, device=dev)
    lp = torch.empty_like(mp)
    out = torch.empty(B, Hq, D, dtype=q.dtype, device=dev)
    bt = block_tables if block_tables.dtype == torch.int32 else block_tables.int()
    seq = seq_lens if seq_lens.dtype == torch.int64 else seq_lens.long()
    q = q.contiguous()
    gp = max(16, triton.next_power_of_2(G))
    _split_kernel[(nsplit_max, rows)](q, k_cache, v_cache, bt, seq, op, mp, lp, scale * LOG2E, bt.stride(0),
                                      nsplit_max, HKV=Hkv, G=G, GP=gp, D=D, BS=bs, SPLIT=split_tokens,
                                      BLOCK_N=min(BLOCK_N, split_tokens), num_warps=4, num_stages=3)
    _combine_kernel[(rows,)](seq, op, mp, lp, out, nsplit_max, HKV=Hkv, G=G, GP=gp, D=D, SPLIT=split_tokens,
                             num_warps=4)
    return out

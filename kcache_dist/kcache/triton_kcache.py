"""Triton kernels for the KCache decode step (CUDA; also runs under TRITON_INTERPRET=1 on CPU tensors).

Same math as `reference.kcache_decode_reference` (see its docstring). Three stages:

1. `score_and_select`: one launch over (split, row) CTAs, row = b * Hkv + h. Each CTA streams a split of
   the paged K of one row, writes raw log2-domain scores S [rows, G, Cmax] fp32 and per-split softmax
   partials (max, sum of exp2). The last CTA of a row to finish (atomic ticket) then does the row's
   selection while the other rows' K is still streaming, so selection costs no extra pass over HBM
   when S is still in L2:
     lse_g = combine(partials);  key_j = max_g (S[g, j] - lse_g)  (or log2 sum_g exp2(...))
     a 2048-bin histogram of key (bins 1/16 of a log2 unit) finds the bin holding the n-th largest
     key; the positions at or above it (n plus a few) are compacted, in ascending order, into a
     per-row scratch; an exact 4-pass radix select over those few candidates gives the top n
     (ties at the threshold go to the lowest positions). Only if one bin holds more candidates than
     the scratch can take does the radix select run over the whole row instead (slow, still exact).
   Output: idx [rows, top_n] int32 far positions ascending, -1 padded; lse [rows, G] (log2 domain).
2. A fetch of the selected far V rows from the host pool into vfar [rows, top_n, D] on the device:
   `gather_far_rows_zero_copy` (a persistent Triton kernel reading pinned host memory through UVA)
   or `gather_far_rows_copy_engine` (indices to the host, CPU gather into pinned staging, one H2D
   copy on the copy engines).
3. `sparse_output`: o[g] = sum_{hot + far} p[g, j] v_j (/ sum p when renormalizing), p from S and lse,
   hot rows from v_hot, far rows from vfar.

`kcache_decode_triton` runs the three; `kcache_decode` dispatches to it for CUDA tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .selection import SelectionSpec

LOG2E = 1.4426950408889634


def _patch_interpreter_index() -> None:
    """Under TRITON_INTERPRET=1 with numpy 2, `range(tensor, ...)` fails: int() of the interpreter's
    1-element arrays. Give its tensors an __index__ that takes the single element."""
    from triton.runtime import interpreter as _it

    if getattr(_it, "_kcache_index_patched", False):
        return
    orig = _it._patch_lang_tensor

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
    _it._patch_lang_tensor = patched
    _it._kcache_index_patched = True


if os.environ.get("TRITON_INTERPRET", "0") == "1":
    _patch_interpreter_index()
NUM_BINS = 2048          # histogram bins of the selection key
BINS_PER_LOG2 = 16.0     # bin width 1/16 of a log2 unit (a factor 1.044 in probability)


# ---------------------------------------------------------------------------------------------
# Selection helpers (inlined into the kernels)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _row_keys(S, row, offs, valid, lse, Cmax, G: tl.constexpr, GQ: tl.constexpr, GROUP_SUM: tl.constexpr):
    """Group score of positions offs [T] of one row in the log2 domain: max_g (S - lse_g) or
    log2 sum_g exp2(S - lse_g); -inf where not valid. lse [GQ] (0 in padded rows)."""
    gq = tl.arange(0, GQ)
    s = tl.load(S + (row * G + gq).to(tl.int64)[:, None] * Cmax + offs[None, :],
                mask=(gq < G)[:, None] & valid[None, :], other=float("-inf"), cache_modifier=".cg")
    x = s - lse[:, None]
    mx = tl.max(x, 0)
    if GROUP_SUM:
        mxs = tl.where(mx == float("-inf"), 0.0, mx)
        key = mxs + tl.log2(tl.sum(tl.exp2(x - mxs[None, :]), 0))
    else:
        key = mx
    return tl.where(valid, key, float("-inf"))


@triton.jit
def _sortable(key):
    """fp32 -> int32 whose signed order is the float order."""
    bits = key.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _key_bin(key, ktop, NBINS: tl.constexpr, BPL: tl.constexpr):
    """Bin 0 holds the largest keys: floor((ktop - key) * BPL), clamped to [0, NBINS - 1]."""
    x = (ktop - key) * BPL
    x = tl.minimum(tl.maximum(x, 0.0), NBINS - 1.0)
    return x.to(tl.int32)


@triton.jit
def _radix_digit(hist, need):
    """hist [256] of the current digit; (largest digit d with >= need keys at or above it, keys above d)."""
    bins = tl.arange(0, 256)
    suffix = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist
    d = tl.sum((suffix >= need).to(tl.int32), 0) - 1
    above = tl.sum(tl.where(bins > d, hist, 0), 0)
    return d, above


@triton.jit
def _src_tile(from_s, S, SCR_POS, SCR_KEY, row, i, valid, lse, Cmax, scr_base,
              G: tl.constexpr, GQ: tl.constexpr, GROUP_SUM: tl.constexpr):
    """(position, sortable key) of source entries i [T]: far positions of the row read from S when
    from_s, else the compacted candidates in the scratch."""
    if from_s:
        pos = i
        skey = _sortable(_row_keys(S, row, i, valid, lse, Cmax, G, GQ, GROUP_SUM))
    else:
        pos = tl.load(SCR_POS + scr_base + i, mask=valid, other=0)
        skey = tl.load(SCR_KEY + scr_base + i, mask=valid, other=0)
    return pos, skey


@triton.jit
def _radix_select(from_s, r_lo, r_hi, need, S, SCR_POS, SCR_KEY, IDX, row, lse, Cmax, scr_base, top_n,
                  G: tl.constexpr, GQ: tl.constexpr, GROUP_SUM: tl.constexpr, TILE: tl.constexpr):
    """Exact top-`need` of the source entries [r_lo, r_hi) (ascending positions) by key; writes the
    chosen positions ascending to IDX[row, :need]. Ties at the threshold: lowest positions first."""
    ti = tl.arange(0, TILE)
    prefix = 0
    for p in tl.static_range(4):
        SHIFT = 24 - 8 * p
        hist = tl.zeros([256], tl.int32)
        for start in range(r_lo, r_hi, TILE):
            i = start + ti
            valid = i < r_hi
            pos, skey = _src_tile(from_s, S, SCR_POS, SCR_KEY, row, i, valid, lse, Cmax, scr_base, G, GQ, GROUP_SUM)
            if p == 0:
                digit = ((skey >> 24) + 128) & 255
                match = valid
            else:
                digit = (skey >> SHIFT) & 255
                match = valid & ((skey >> (SHIFT + 8)) == prefix)
            hist += tl.histogram(digit, 256, mask=match)
        d, above = _radix_digit(hist, need)
        need = need - above
        if p == 0:
            prefix = d - 128
        else:
            prefix = prefix * 256 + d
    thr = prefix          # sortable key of the need-th largest
    n_eq = need           # keys equal to thr to take
    cnt = 0
    eq_taken = 0
    out = IDX + row.to(tl.int64) * top_n
    for start in range(r_lo, r_hi, TILE):
        i = start + ti
        valid = i < r_hi
        pos, skey = _src_tile(from_s, S, SCR_POS, SCR_KEY, row, i, valid, lse, Cmax, scr_base, G, GQ, GROUP_SUM)
        gt = valid & (skey > thr)
        eq = (valid & (skey == thr)).to(tl.int32)
        eq_rank = eq_taken + tl.cumsum(eq, 0) - eq
        sel = (gt | ((eq > 0) & (eq_rank < n_eq))).to(tl.int32)
        slot = cnt + tl.cumsum(sel, 0) - 1
        tl.store(out + slot, pos, mask=sel > 0)
        cnt += tl.sum(sel, 0)
        eq_taken += tl.sum(eq, 0)


@triton.jit
def _row_select(S, MP, LP, LSE, IDX, SCR_POS, SCR_KEY, row, L, nsplit, NSPLIT_MAX, Cmax,
                sink, window, top_n, scr_cap, ktop,
                G: tl.constexpr, GQ: tl.constexpr, NSP: tl.constexpr, TILE: tl.constexpr,
                NBINS: tl.constexpr, BPL: tl.constexpr, GROUP_SUM: tl.constexpr):
    """Selection of one row (b, h) from its scores and softmax partials; see the module docstring."""
    gq = tl.arange(0, GQ)
    si = tl.arange(0, NSP)
    gmask = gq < G
    pofs = (row * G + gq)[:, None] * NSPLIT_MAX + si[None, :]
    pmask = gmask[:, None] & (si < nsplit)[None, :]
    pm = tl.load(MP + pofs, mask=pmask, other=float("-inf"), cache_modifier=".cg")
    pl = tl.load(LP + pofs, mask=pmask, other=0.0, cache_modifier=".cg")
    m = tl.max(pm, 1)
    m = tl.where(gmask, m, 0.0)
    l = tl.sum(pl * tl.exp2(pm - m[:, None]), 1)
    lse = tl.where(gmask, m + tl.log2(l), 0.0)
    tl.store(LSE + row * G + gq, lse, mask=gmask)
    sink_end = tl.minimum(sink, L)
    window_start = tl.maximum(sink_end, L - window)
    far = window_start - sink_end
    ti = tl.arange(0, TILE)
    out = IDX + row.to(tl.int64) * top_n
    for start in range(0, top_n, TILE):
        t = start + ti
        fill = tl.where(t < far, sink_end + t, -1)
        if far > top_n:
            fill = tl.full([TILE], -1, tl.int32)
        tl.store(out + t, fill, mask=t < top_n)
    if (far > top_n) & (top_n > 0):
        tl.debug_barrier()
        # pass A: histogram of the keys
        hist = tl.zeros([NBINS], tl.int32)
        for start in range(sink_end, window_start, TILE):
            offs = start + ti
            valid = offs < window_start
            key = _row_keys(S, row, offs, valid, lse, Cmax, G, GQ, GROUP_SUM)
            hist += tl.histogram(_key_bin(key, ktop, NBINS, BPL), NBINS, mask=valid)
        csum = tl.cumsum(hist, 0)
        bstar = tl.sum((csum < top_n).to(tl.int32), 0)          # first bin reaching top_n keys
        ncand = tl.sum(tl.where(tl.arange(0, NBINS) == bstar, csum, 0), 0)
        scr_base = row.to(tl.int64) * scr_cap
        if ncand <= scr_cap:
            # pass B: compact the candidates (ascending positions) into the scratch
            cnt = 0
            for start in range(sink_end, window_start, TILE):
                offs = start + ti
                valid = offs < window_start
                key = _row_keys(S, row, offs, valid, lse, Cmax, G, GQ, GROUP_SUM)
                sel = (valid & (_key_bin(key, ktop, NBINS, BPL) <= bstar)).to(tl.int32)
                slot = cnt + tl.cumsum(sel, 0) - 1
                tl.store(SCR_POS + scr_base + slot, offs, mask=sel > 0)
                tl.store(SCR_KEY + scr_base + slot, _sortable(key), mask=sel > 0)
                cnt += tl.sum(sel, 0)
            tl.debug_barrier()
            _radix_select(False, 0, cnt, top_n, S, SCR_POS, SCR_KEY, IDX, row, lse, Cmax, scr_base, top_n,
                          G, GQ, GROUP_SUM, TILE)
        else:
            _radix_select(True, sink_end, window_start, top_n, S, SCR_POS, SCR_KEY, IDX, row, lse, Cmax,
                          scr_base, top_n, G, GQ, GROUP_SUM, TILE)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _kpass_kernel(Q, K, BT, SEQ, S, MP, LP, LSE, IDX, CNT, SCR_POS, SCR_KEY, HIST,
                  qk_scale, sink, window, top_n, stride_bt, Cmax, NSPLIT_MAX, scr_cap, ktop,
                  HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, GQ: tl.constexpr, D: tl.constexpr,
                  BS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, NSP: tl.constexpr,
                  TILE: tl.constexpr, NBINS: tl.constexpr, BPL: tl.constexpr, GROUP_SUM: tl.constexpr,
                  FUSED_SELECT: tl.constexpr, ZERO_HIST: tl.constexpr):
    """grid (NSPLIT_MAX, B * HKV). Q [B, HKV*G, D]; K [NB, HKV, BS, D]; BT [B, stride_bt] int32;
    SEQ [B] int64. S [rows, G, Cmax] fp32 log2-domain scores; MP/LP [rows, G, NSPLIT_MAX] partials.
    With FUSED_SELECT the last CTA of each row runs `_row_select` (CNT [rows] int32 tickets, zero on
    entry and reset to zero on exit)."""
    split = tl.program_id(0)
    row = tl.program_id(1)
    b = row // HKV
    h = row % HKV
    L = tl.load(SEQ + b).to(tl.int32)
    nsplit = tl.cdiv(L, SPLIT)
    if split < nsplit:
        gi = tl.arange(0, GP)
        di = tl.arange(0, D)
        ni = tl.arange(0, BLOCK_N)
        gmask = gi < G
        q = tl.load(Q + (b * (HKV * G) + h * G + gi)[:, None] * D + di[None, :], mask=gmask[:, None], other=0.0)
        lo = split * SPLIT
        hi = tl.minimum(lo + SPLIT, L)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        s_row = S + (row * G + gi).to(tl.int64)[:, None] * Cmax
        bt_row = BT + b.to(tl.int64) * stride_bt
        for start in range(lo, hi, BLOCK_N):
            offs = start + ni
            msk = offs < hi
            blk = tl.load(bt_row + offs // BS, mask=msk, other=0)
            kp = K + ((blk.to(tl.int64) * HKV + h) * BS + offs % BS)[:, None] * D + di[None, :]
            k = tl.load(kp, mask=msk[:, None], other=0.0, eviction_policy="evict_first")
            if K.dtype.element_ty == tl.float32:
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
            else:
                s = tl.dot(q, tl.trans(k)) * qk_scale
            s = tl.where(msk[None, :], s, float("-inf"))
            tl.store(s_row + offs[None, :], s, mask=gmask[:, None] & msk[None, :], eviction_policy="evict_last")
            m_new = tl.maximum(m_i, tl.max(s, 1))
            l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
            m_i = m_new
        tl.store(MP + (row * G + gi) * NSPLIT_MAX + split, m_i, mask=gmask)
        tl.store(LP + (row * G + gi) * NSPLIT_MAX + split, l_i, mask=gmask)
        if ZERO_HIST:
            if split == 0:
                tl.store(HIST + row * NBINS + tl.arange(0, NBINS), tl.zeros([NBINS], tl.int32))
                tl.store(CNT + row, 0)
        if FUSED_SELECT:
            tl.debug_barrier()
            ticket = tl.atomic_add(CNT + row, 1, sem="acq_rel")
            if ticket == nsplit - 1:
                tl.store(CNT + row, 0)
                _row_select(S, MP, LP, LSE, IDX, SCR_POS, SCR_KEY, row, L, nsplit, NSPLIT_MAX, Cmax,
                            sink, window, top_n, scr_cap, ktop, G, GQ, NSP, TILE, NBINS, BPL, GROUP_SUM)


@triton.jit
def _select_kernel(SEQ, S, MP, LP, LSE, IDX, SCR_POS, SCR_KEY, sink, window, top_n, Cmax, NSPLIT_MAX, scr_cap,
                   ktop, HKV: tl.constexpr, G: tl.constexpr, GQ: tl.constexpr, SPLIT: tl.constexpr,
                   NSP: tl.constexpr, TILE: tl.constexpr, NBINS: tl.constexpr, BPL: tl.constexpr,
                   GROUP_SUM: tl.constexpr):
    """Unfused selection: grid (rows,), after `_kpass_kernel` with FUSED_SELECT=False."""
    row = tl.program_id(0)
    L = tl.load(SEQ + row // HKV).to(tl.int32)
    _row_select(S, MP, LP, LSE, IDX, SCR_POS, SCR_KEY, row, L, tl.cdiv(L, SPLIT), NSPLIT_MAX, Cmax,
                sink, window, top_n, scr_cap, ktop, G, GQ, NSP, TILE, NBINS, BPL, GROUP_SUM)


@triton.jit
def _keys_hist_kernel(SEQ, S, MP, LP, LSE, KEYS, HIST, sink, window, top_n, Cmax, NSPLIT_MAX, ktop,
                      HKV: tl.constexpr, G: tl.constexpr, GQ: tl.constexpr, SPLIT: tl.constexpr,
                      NSP: tl.constexpr, CH: tl.constexpr, NBINS: tl.constexpr, BPL: tl.constexpr,
                      GROUP_SUM: tl.constexpr):
    """Parallel selection, step 1, grid (chunks, rows): lse from the partials (chunk 0 stores it),
    keys of positions [c*CH, (c+1)*CH) ∩ far -> KEYS [rows, Cmax] fp32, and the row's key histogram
    HIST [rows, NBINS] (zeroed by the K pass) by atomics. Rows with far <= top_n need no keys."""
    c = tl.program_id(0)
    row = tl.program_id(1)
    L = tl.load(SEQ + row // HKV).to(tl.int32)
    sink_end = tl.minimum(sink, L)
    window_start = tl.maximum(sink_end, L - window)
    lo = c * CH
    busy = (window_start - sink_end > top_n) & (lo < window_start) & (lo + CH > sink_end)
    if busy | (c == 0):
        gq = tl.arange(0, GQ)
        si = tl.arange(0, NSP)
        gmask = gq < G
        nsplit = tl.cdiv(L, SPLIT)
        pofs = (row * G + gq)[:, None] * NSPLIT_MAX + si[None, :]
        pmask = gmask[:, None] & (si < nsplit)[None, :]
        pm = tl.load(MP + pofs, mask=pmask, other=float("-inf"))
        pl = tl.load(LP + pofs, mask=pmask, other=0.0)
        m = tl.where(gmask, tl.max(pm, 1), 0.0)
        lse = tl.where(gmask, m + tl.log2(tl.sum(pl * tl.exp2(pm - m[:, None]), 1)), 0.0)
        if c == 0:
            tl.store(LSE + row * G + gq, lse, mask=gmask)
        if busy:
            offs = lo + tl.arange(0, CH)
            valid = (offs >= sink_end) & (offs < window_start)
            key = _row_keys(S, row, offs, valid, lse, Cmax, G, GQ, GROUP_SUM)
            tl.store(KEYS + row.to(tl.int64) * Cmax + offs, key, mask=valid)
            hist = tl.histogram(_key_bin(key, ktop, NBINS, BPL), NBINS, mask=valid)
            tl.atomic_add(HIST + row * NBINS + tl.arange(0, NBINS), hist, mask=hist > 0, sem="relaxed")


@triton.jit
def _threshold_bin(HIST, row, top_n, NBINS: tl.constexpr):
    """(first bin whose cumulative count reaches top_n, keys in bins up to it)."""
    csum = tl.cumsum(tl.load(HIST + row * NBINS + tl.arange(0, NBINS)), 0)
    bstar = tl.sum((csum < top_n).to(tl.int32), 0)
    ncand = tl.sum(tl.where(tl.arange(0, NBINS) == bstar, csum, 0), 0)
    return bstar, ncand


@triton.jit
def _compact_kernel(SEQ, KEYS, HIST, CNT, SCR_POS, SCR_KEY, sink, window, top_n, Cmax, scr_cap, ktop,
                    HKV: tl.constexpr, CH: tl.constexpr, NBINS: tl.constexpr, BPL: tl.constexpr):
    """Parallel selection, step 2, grid (chunks, rows): the chunk's candidates (bin <= threshold bin)
    appended to the row's scratch (SCR_POS/SCR_KEY [rows, scr_cap]) through the counter CNT[row]."""
    c = tl.program_id(0)
    row = tl.program_id(1)
    L = tl.load(SEQ + row // HKV).to(tl.int32)
    sink_end = tl.minimum(sink, L)
    window_start = tl.maximum(sink_end, L - window)
    lo = c * CH
    busy = (window_start - sink_end > top_n) & (lo < window_start) & (lo + CH > sink_end)
    if busy:
        bstar, ncand = _threshold_bin(HIST, row, top_n, NBINS)
        if ncand <= scr_cap:
            offs = lo + tl.arange(0, CH)
            valid = (offs >= sink_end) & (offs < window_start)
            key = tl.load(KEYS + row.to(tl.int64) * Cmax + offs, mask=valid, other=float("-inf"))
            sel = (valid & (_key_bin(key, ktop, NBINS, BPL) <= bstar)).to(tl.int32)
            k = tl.sum(sel, 0)
            if k > 0:
                base = tl.atomic_add(CNT + row, k, sem="relaxed")
                slot = base + tl.cumsum(sel, 0) - 1
                scr = row.to(tl.int64) * scr_cap
                tl.store(SCR_POS + scr + slot, offs, mask=sel > 0)
                tl.store(SCR_KEY + scr + slot, _sortable(key), mask=sel > 0)


@triton.jit
def _final_select_kernel(SEQ, S, LSE, IDX, HIST, CNT, SCR_POS, SCR_KEY, sink, window, top_n, Cmax, scr_cap,
                         HKV: tl.constexpr, G: tl.constexpr, GQ: tl.constexpr, TILE: tl.constexpr,
                         TOPN_P: tl.constexpr, NBINS: tl.constexpr, GROUP_SUM: tl.constexpr):
    """Parallel selection, step 3, grid (rows,): exact radix select over the row's candidates, then
    the chosen positions sorted ascending into IDX [rows, top_n] (-1 padded)."""
    row = tl.program_id(0)
    L = tl.load(SEQ + row // HKV).to(tl.int32)
    sink_end = tl.minimum(sink, L)
    window_start = tl.maximum(sink_end, L - window)
    far = window_start - sink_end
    ti = tl.arange(0, TOPN_P)
    out = IDX + row.to(tl.int64) * top_n
    if far <= top_n:
        tl.store(out + ti, tl.where(ti < far, sink_end + ti, -1), mask=ti < top_n)
    else:
        gq = tl.arange(0, GQ)
        lse = tl.load(LSE + row * G + gq, mask=gq < G, other=0.0)
        bstar, ncand = _threshold_bin(HIST, row, top_n, NBINS)
        if ncand <= scr_cap:
            _radix_select(False, 0, ncand, top_n, S, SCR_POS, SCR_KEY, IDX, row, lse, Cmax,
                          row.to(tl.int64) * scr_cap, top_n, G, GQ, GROUP_SUM, TILE)
            tl.debug_barrier()
            sel = tl.load(out + ti, mask=ti < top_n, other=2147483647)
            sel = tl.sort(sel, 0)
            tl.debug_barrier()
            tl.store(out + ti, sel, mask=ti < top_n)
        else:   # one bin holds too many candidates (near-uniform scores): whole-row select from S
            _radix_select(True, sink_end, window_start, top_n, S, SCR_POS, SCR_KEY, IDX, row, lse, Cmax,
                          0, top_n, G, GQ, GROUP_SUM, TILE)


@triton.jit
def _gather_kernel(VP, BT, IDX, OUT, n_rows, stride_bt, top_n,
                   HKV: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, R: tl.constexpr):
    """Persistent zero-copy gather. VP [NB, HKV, BS, D] (pinned host, read through UVA);
    IDX [rows * top_n] positions (-1 = none); OUT [rows * top_n, D] device."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    ri = tl.arange(0, R)
    di = tl.arange(0, D)
    for start in range(pid * R, n_rows, nprog * R):
        r = start + ri
        m = r < n_rows
        pos = tl.load(IDX + r, mask=m, other=-1)
        ok = m & (pos >= 0)
        bh = r // top_n
        b = bh // HKV
        h = bh % HKV
        blk = tl.load(BT + b.to(tl.int64) * stride_bt + pos // BS, mask=ok, other=0)
        src = ((blk.to(tl.int64) * HKV + h) * BS + pos % BS) * D
        v = tl.load(VP + src[:, None] + di[None, :], mask=ok[:, None], other=0.0)
        tl.store(OUT + r.to(tl.int64)[:, None] * D + di[None, :], v, mask=ok[:, None])


@triton.jit
def _sparse_out_kernel(S, LSE, IDX, VFAR, VHOT, SEQ, SLOTS, OUT, sink, window, top_n, Cmax, hot_rows,
                       HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                       R: tl.constexpr, RENORM: tl.constexpr):
    """grid (rows,). o[g] = sum_j p[g, j] v_j over the hot rows (VHOT [slots, HKV, hot_rows, D]) and
    the fetched far rows (VFAR [rows, top_n, D]); p = exp2(S - lse). OUT [B, HKV*G, D]."""
    row = tl.program_id(0)
    b = row // HKV
    h = row % HKV
    L = tl.load(SEQ + b).to(tl.int32)
    slot = tl.load(SLOTS + b)
    sink_end = tl.minimum(sink, L)
    window_start = tl.maximum(sink_end, L - window)
    nhot = sink_end + (L - window_start)
    gi = tl.arange(0, GP)
    di = tl.arange(0, D)
    ri = tl.arange(0, R)
    gmask = gi < G
    lse = tl.load(LSE + row * G + gi, mask=gmask, other=0.0)
    s_row = S + (row * G + gi).to(tl.int64)[:, None] * Cmax
    acc = tl.zeros([GP, D], tl.float32)
    z = tl.zeros([GP], tl.float32)
    hot_base = (slot * HKV + h) * hot_rows
    wdiv = tl.maximum(window, 1)
    for t0 in range(0, nhot, R):
        t = t0 + ri
        ok = t < nhot
        pos = tl.where(t < sink_end, t, window_start + t - sink_end)
        hrow = tl.where(pos < sink, pos, sink + (pos - sink) % wdiv)
        v = tl.load(VHOT + (hot_base + hrow).to(tl.int64)[:, None] * D + di[None, :], mask=ok[:, None], other=0.0)
        s = tl.load(s_row + pos[None, :], mask=gmask[:, None] & ok[None, :], other=float("-inf"))
        p = tl.exp2(s - lse[:, None])
        acc += tl.dot(p, v.to(tl.float32), input_precision="ieee")
        z += tl.sum(p, 1)
    far_base = row.to(tl.int64) * top_n
    for t0 in range(0, top_n, R):
        t = t0 + ri
        pos = tl.load(IDX + far_base + t, mask=t < top_n, other=-1)
        ok = pos >= 0
        v = tl.load(VFAR + (far_base + t)[:, None] * D + di[None, :], mask=ok[:, None], other=0.0)
        s = tl.load(s_row + pos[None, :], mask=gmask[:, None] & ok[None, :], other=float("-inf"))
        p = tl.exp2(s - lse[:, None])
        acc += tl.dot(p, v.to(tl.float32), input_precision="ieee")
        z += tl.sum(p, 1)
    if RENORM:
        acc = acc / tl.where(z > 0, z, 1.0)[:, None]
    tl.store(OUT + (b * (HKV * G) + h * G + gi)[:, None] * D + di[None, :], acc.to(OUT.dtype.element_ty),
             mask=gmask[:, None])


# ---------------------------------------------------------------------------------------------
# Host wrappers
# ---------------------------------------------------------------------------------------------
@dataclass
class KPassConfig:
    """Launch shape of the score + select kernel (defaults: best measured on H100, see
    benchmarks/notes/kcache_triton.md)."""

    split: int = 1024        # positions per CTA
    block_n: int = 128       # positions per K tile
    num_warps: int = 4
    num_stages: int = 3
    tile: int = 1024         # positions per step of the selection passes
    scratch_cap: int = 0     # candidate slots per row (0: max(1024, 4 * top_n)); more -> whole-row select
    select_mode: str = "parallel"  # "parallel": 3 small grid-wide kernels; "fused": last CTA of a row
    #                                 inside the K pass; "row": one CTA per row after the K pass
    chunk: int = 2048        # positions per CTA of the parallel selection


@dataclass
class SelectResult:
    """scores [rows, G, Cmax] fp32 log2-domain; lse [rows, G]; idx [rows, top_n] int32 (ascending, -1 pad)."""

    scores: torch.Tensor
    lse: torch.Tensor
    idx: torch.Tensor


def _next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


def score_and_select(q: torch.Tensor, k_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                     max_seq_len: int, spec: SelectionSpec, scale: float, cfg: Optional[KPassConfig] = None,
                     select: bool = True, stop_after: Optional[str] = None) -> SelectResult:
    """Scores over all cached K and the per-KV-head top-n far positions.

    q [B, Hq, D]; k_cache [NB, Hkv, bs, D]; block_tables [B, max_blocks] int32; seq_lens [B] int64
    (all on one device); max_seq_len >= max(seq_lens). With select=False only the scores and partials
    are computed (lse and idx are left unset): the K pass alone, for benchmarks. stop_after ("keys" or
    "compact") ends the parallel selection early, for per-stage timing only (idx is left unset).
    """
    cfg = cfg or KPassConfig()
    B, Hq, D = q.shape
    _, Hkv, bs, _ = k_cache.shape
    G = Hq // Hkv
    rows = B * Hkv
    dev = q.device
    cmax = max(1, int(max_seq_len))
    nsplit_max = triton.cdiv(cmax, cfg.split)
    top_n = max(0, int(spec.top_n))
    scr_cap = cfg.scratch_cap or max(1024, 4 * top_n)
    S = torch.empty(rows, G, cmax, dtype=torch.float32, device=dev)
    MP = torch.empty(rows, G, nsplit_max, dtype=torch.float32, device=dev)
    LP = torch.empty_like(MP)
    lse = torch.empty(rows, G, dtype=torch.float32, device=dev)
    idx = torch.empty(rows, max(top_n, 1), dtype=torch.int32, device=dev)
    scr_pos = torch.empty(rows * scr_cap if select else 1, dtype=torch.int32, device=dev)
    scr_key = torch.empty_like(scr_pos)
    mode = cfg.select_mode if select else "none"
    fused = mode == "fused"
    parallel = mode == "parallel"
    cnt = torch.zeros(rows, dtype=torch.int32, device=dev) if fused else torch.empty(rows, dtype=torch.int32,
                                                                                      device=dev)
    hist = torch.empty(rows * NUM_BINS if parallel else 1, dtype=torch.int32, device=dev)
    bt = block_tables if block_tables.dtype == torch.int32 else block_tables.int()
    seq = seq_lens if seq_lens.dtype == torch.int64 else seq_lens.long()
    common = dict(G=G, GQ=_next_pow2(G), NSP=_next_pow2(nsplit_max), TILE=cfg.tile, NBINS=NUM_BINS,
                  BPL=BINS_PER_LOG2, GROUP_SUM=spec.group_reduce == "sum")
    ktop = math.log2(G) + 1.0
    _kpass_kernel[(nsplit_max, rows)](
        q, k_cache, bt, seq, S, MP, LP, lse, idx, cnt, scr_pos, scr_key, hist,
        scale * LOG2E, spec.sink_tokens, spec.recent_window, top_n, bt.stride(0), cmax, nsplit_max, scr_cap, ktop,
        HKV=Hkv, GP=max(16, _next_pow2(G)), D=D, BS=bs, SPLIT=cfg.split, BLOCK_N=cfg.block_n,
        FUSED_SELECT=fused, ZERO_HIST=parallel, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common)
    if parallel:
        nch = triton.cdiv(cmax, cfg.chunk)
        gc = dict(HKV=Hkv, CH=cfg.chunk, NBINS=NUM_BINS, BPL=BINS_PER_LOG2)
        keys = torch.empty(rows, cmax, dtype=torch.float32, device=dev)
        _keys_hist_kernel[(nch, rows)](seq, S, MP, LP, lse, keys, hist,
                                       spec.sink_tokens, spec.recent_window, top_n, cmax, nsplit_max, ktop,
                                       G=G, GQ=common["GQ"], SPLIT=cfg.split, NSP=common["NSP"],
                                       GROUP_SUM=common["GROUP_SUM"], num_warps=8, **gc)
        if stop_after == "keys":
            return SelectResult(S, lse, idx[:, :top_n])
        _compact_kernel[(nch, rows)](seq, keys, hist, cnt, scr_pos, scr_key, spec.sink_tokens,
                                     spec.recent_window, top_n, cmax, scr_cap, ktop, num_warps=8, **gc)
        if stop_after == "compact":
            return SelectResult(S, lse, idx[:, :top_n])
        _final_select_kernel[(rows,)](seq, S, lse, idx, hist, cnt, scr_pos, scr_key, spec.sink_tokens,
                                      spec.recent_window, top_n, cmax, scr_cap, HKV=Hkv, G=G, GQ=common["GQ"],
                                      TILE=cfg.tile, TOPN_P=_next_pow2(max(top_n, 1)), NBINS=NUM_BINS,
                                      GROUP_SUM=common["GROUP_SUM"], num_warps=cfg.num_warps)
    elif mode == "row":
        _select_kernel[(rows,)](seq, S, MP, LP, lse, idx, scr_pos, scr_key, spec.sink_tokens, spec.recent_window,
                                top_n, cmax, nsplit_max, scr_cap, ktop, HKV=Hkv, SPLIT=cfg.split,
                                num_warps=cfg.num_warps, **common)
    return SelectResult(S, lse, idx[:, :top_n])


def gather_far_rows_zero_copy(v_host: torch.Tensor, block_tables: torch.Tensor, idx: torch.Tensor,
                              out: Optional[torch.Tensor] = None, grid: Optional[int] = None,
                              rows_per_step: int = 32, num_warps: int = 4) -> torch.Tensor:
    """Zero-copy gather of the selected far V rows straight from pinned host memory (UVA).

    v_host [NB, Hkv, bs, D] pinned host (or device) memory; block_tables [B, max_blocks] int32 on the
    device; idx [B * Hkv, top_n] int32 positions (-1 = none). Returns out [B * Hkv, top_n, D] on the
    device (rows of -1 entries are left unwritten).
    """
    rows, top_n = idx.shape
    _, Hkv, bs, D = v_host.shape
    dev = block_tables.device
    if out is None:
        out = torch.empty(rows, top_n, D, dtype=v_host.dtype, device=dev)
    n = rows * top_n
    if n == 0:
        return out
    if grid is None:
        grid = 2 * torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 4
    grid = max(1, min(grid, triton.cdiv(n, rows_per_step)))
    bt = block_tables if block_tables.dtype == torch.int32 else block_tables.int()
    _gather_kernel[(grid,)](v_host, bt, idx.contiguous(), out, n, bt.stride(0), top_n, HKV=Hkv, D=D, BS=bs,
                            R=rows_per_step, num_warps=num_warps)
    return out


def far_row_ids(block_tables_cpu: torch.Tensor, idx_cpu: torch.Tensor, num_kv_heads: int,
                block_size: int) -> torch.Tensor:
    """Host-side flat row ids into v_host.view(-1, D) of idx [B * Hkv, top_n] (-1 entries -> row 0)."""
    rows, top_n = idx_cpu.shape
    pos = idx_cpu.long()
    valid = pos >= 0
    pos = pos.clamp(min=0)
    r = torch.arange(rows).view(rows, 1)
    blk = block_tables_cpu.long()[(r // num_kv_heads).expand(-1, top_n), pos // block_size]
    flat = (blk * num_kv_heads + r % num_kv_heads) * block_size + pos % block_size
    return torch.where(valid, flat, torch.zeros_like(flat)).view(-1)


def gather_far_rows_copy_engine(v_host: torch.Tensor, block_tables_cpu: torch.Tensor, idx: torch.Tensor,
                                out: Optional[torch.Tensor] = None, staging: Optional[torch.Tensor] = None,
                                stream: Optional[torch.cuda.Stream] = None) -> torch.Tensor:
    """Copy-engine fetch: indices to the host (synchronizes), CPU gather into pinned staging, one
    H2D copy (on `stream` if given, else the current stream). v_host [NB, Hkv, bs, D] host memory;
    block_tables_cpu [B, max_blocks] on the host; idx [B * Hkv, top_n] on the device.
    Returns out [B * Hkv, top_n, D] on idx's device (rows of -1 entries hold arbitrary V rows)."""
    rows, top_n = idx.shape
    _, Hkv, bs, D = v_host.shape
    ids = far_row_ids(block_tables_cpu, idx.cpu(), Hkv, bs)
    if staging is None:
        staging = torch.empty(rows * top_n, D, dtype=v_host.dtype, pin_memory=idx.is_cuda)
    staging = staging.view(-1, D)[: rows * top_n]
    torch.index_select(v_host.view(-1, D), 0, ids, out=staging)
    if out is None:
        out = torch.empty(rows, top_n, D, dtype=v_host.dtype, device=idx.device)
    if stream is not None:
        with torch.cuda.stream(stream):
            out.view(-1, D).copy_(staging, non_blocking=True)
    else:
        out.view(-1, D).copy_(staging, non_blocking=idx.is_cuda)
    return out


def sparse_output(sel: SelectResult, vfar: torch.Tensor, v_hot: torch.Tensor, seq_lens: torch.Tensor,
                  hot_slots: torch.Tensor, spec: SelectionSpec, num_q_heads: int,
                  out: Optional[torch.Tensor] = None, dtype: Optional[torch.dtype] = None,
                  rows_per_step: int = 64, num_warps: int = 4) -> torch.Tensor:
    """o [B, Hq, D] from the selection, the fetched far rows vfar [rows, top_n, D] and v_hot
    [slots, Hkv, sink + window, D]."""
    rows, G, cmax = sel.scores.shape
    _, Hkv, hot_rows, D = v_hot.shape
    B = rows // Hkv
    top_n = sel.idx.shape[1]
    if out is None:
        out = torch.empty(B, num_q_heads, D, dtype=dtype or v_hot.dtype, device=sel.scores.device)
    idx = sel.idx.contiguous()
    vfar = vfar if top_n else torch.empty(rows, 1, D, dtype=v_hot.dtype, device=out.device)
    seq = seq_lens if seq_lens.dtype == torch.int64 else seq_lens.long()
    slots = hot_slots if hot_slots.dtype == torch.int64 else hot_slots.long()
    vhot = v_hot if hot_rows else torch.empty(1, Hkv, 1, D, dtype=v_hot.dtype, device=out.device)
    _sparse_out_kernel[(rows,)](sel.scores, sel.lse, idx, vfar, vhot, seq, slots, out, spec.sink_tokens,
                                spec.recent_window, top_n, cmax, max(hot_rows, 1), HKV=Hkv, G=G,
                                GP=max(16, _next_pow2(G)), D=D, R=rows_per_step, RENORM=spec.renormalize,
                                num_warps=num_warps)
    return out


def kcache_decode_triton(q: torch.Tensor, k_cache: torch.Tensor, v_host: torch.Tensor, v_hot: torch.Tensor,
                         block_tables: torch.Tensor, seq_lens: torch.Tensor, hot_slots: torch.Tensor,
                         spec: SelectionSpec, scale: float, max_seq_len: Optional[int] = None,
                         fetch: str = "zero_copy", cfg: Optional[KPassConfig] = None,
                         block_tables_cpu: Optional[torch.Tensor] = None,
                         out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """KCache decode attention, one token per sequence (arguments as `kcache_decode`).

    fetch: "zero_copy" (Triton gather from pinned host memory through UVA; falls back to
    "copy_engine" when v_host is not pinned) or "copy_engine". Returns o [B, Hq, D] in q's dtype.
    """
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max().item())
    seq_dev = seq_lens.to(q.device)
    bt_dev = block_tables.to(q.device)
    sel = score_and_select(q, k_cache, bt_dev, seq_dev, max_seq_len, spec, scale, cfg)
    top_n = sel.idx.shape[1]
    if top_n == 0:
        vfar = None
    elif fetch == "zero_copy" and (v_host.device == q.device or (v_host.is_pinned() and q.is_cuda)
                                   or not q.is_cuda):
        vfar = gather_far_rows_zero_copy(v_host, bt_dev, sel.idx)
    else:
        bt_cpu = block_tables_cpu if block_tables_cpu is not None else block_tables.cpu()
        vfar = gather_far_rows_copy_engine(v_host, bt_cpu, sel.idx)
    return sparse_output(sel, vfar, v_hot, seq_dev, hot_slots.to(q.device), spec, q.shape[1], out=out,
                         dtype=q.dtype)

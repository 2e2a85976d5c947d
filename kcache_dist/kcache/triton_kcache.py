"""Triton kernels for the KCache decode step (CUDA; also runs under TRITON_INTERPRET=1 on CPU tensors).

Same math as `reference.kcache_decode_reference` (see its docstring). Three stages:

1. `score_and_select`. The K pass `_kpass_kernel`, grid (split, row) with row = b * Hkv + h, streams a
   split of the paged K of one row and writes raw log2-domain scores S [rows, G, Cs] fp32 (Cs: the
   longest context rounded up to the key tile) and per-split softmax partials (max, sum of exp2).
   Selection is exact: the far positions whose group key
       key_j = max_g (S[g, j] - lse_g)   (or log2 sum_g exp2(S[g, j] - lse_g)),  lse_g from the partials,
   is among the top_n of the row (ties at the n-th key go to the lowest positions). One CTA selects a
   row (`_row_select`), on int32 keys whose signed order is the float order:
     a. one pass over the row's S writes the keys (KEYS [rows, Cs]) and a 64-bin histogram of them in
        half log2 units below the row's key bound max_g (max_j S[g, j] - lse_g) (+ log2 G for group
        sums; known from the partials; tl.histogram of few bins is cheap, unlike the 2048 bins this replaced);
     b. the bin holding the n-th key is read off the histogram; one pass copies the keys of that bin
        and the bins above it (n plus the rest of the bin) with their positions, ascending, into the
        row's scratch (top_n + scratch_extra slots); the keys above the bin and the bin's [min, max]
        are then counted on the integer keys themselves (the float histogram only picks candidates),
        and if the n-th key is not in the bin by that count, the fallback below runs;
     c. count passes over the scratch narrow an integer interval [lo, hi] that holds the n-th key
        (first the bin's [min, max]): each histograms (hi - key) >> shift over `bins` bins and keeps
        the bin holding the n-th key, until lo == hi: that is the n-th key, exactly;
     d. positions with key > hi, then the lowest positions with key == hi, are written ascending.
   If the n-th key lies 31.5 log2 units or more below the bound, or its bin overfills the scratch
   (near-uniform rows, ties such as q = 0), the same count passes run over the row's keys from their
   [min, max] until the candidates fit the scratch (or the n-th key is found), then b-d. Exact in
   every case; only slower. Where the row selection runs (`KPassConfig.select_mode`):
   - "row": one CTA per row after the K pass;
   - "fused": inside the K pass, the last CTA of each row (atomic ticket) selects the row while
     other rows' K still streams, reading the row's S back from L2. 4% faster than "row" at B=128
     x 8 KV heads @ 32K (H200), 8% slower at B=32 (benchmarks/notes/kcache_triton.md). The last
     `late_rows` rows to finish (an atomic count of finished rows) are left to the split selection
     after the K pass instead, so that their selections, one CTA each, do not run on alone after
     it (by default LATE_ROWS from LATE_ROWS_FROM_CONTEXT positions up);
   - "split": every row after the K pass by several CTAs: each part of the row writes its keys and
     coarse histogram (`_split_keys_kernel`); then each part sums the parts' histograms (integers,
     the same in every part), copies its candidates to its own region, and the row's last part to
     finish joins the regions in position order and finishes as above (`_split_select_kernel`);
   - "auto" (default): "fused" from FUSED_SELECT_ROWS_PER_SM rows per SM up, else "row".
   Output: idx [rows, top_n] int32 far positions ascending, -1 padded; lse [rows, G] (log2 domain).
   Fixed fault: in engine runs about one row in 10^5 - 10^6 came out with the top_n-th position
   missing and one slot unwritten (H200 and H100). The threads of the selecting CTA held lse, a float
   reduction, in register copies that differed in the last bits; the key bound and bin edges computed
   from them then differed by one key between threads, so the candidates' count and their stores
   disagreed when a key sat on the edge. Every thread now reads the stored lse, and the bound is a
   max (plus a constant); the recorded row is a GPU test. The row's slots are still cleared to -1
   before the selection and any entry outside the far range is reset to -1 after it, so no fetch
   can read a wrong address.
2. A fetch of the selected far V rows from the host pool into vfar [rows, top_n, D] on the device:
   `gather_far_rows_zero_copy` (a persistent Triton kernel reading pinned host memory through UVA)
   or `gather_far_rows_copy_engine` (indices to the host, CPU gather into pinned staging, one H2D
   copy on the copy engines). With a far-row cache (`row_cache.py`), `row_cache_triton.assign_rows`
   finds the slot of every pick and the picks it misses; only those are read from host memory,
   straight into their slots, and step 3 reads every far row from the cache by slot.
3. `sparse_output`: o[g] = sum_{hot + far} p[g, j] v_j, p from S and lse (renormalising: a softmax
   over the hot rows and picks themselves, against their own largest score),
   hot rows from v_hot, far rows from vfar; each row's picks split over two CTAs whose fp32 sums a
   second kernel adds.

`kcache_decode_triton` runs the three; `kcache_decode` dispatches to it for CUDA tensors.

With fp8 scoring keys (`KCacheConfig.scoring_keys="fp8"`): step 1 reads float8 K times a float32
scale per row (`paged_tiles.tile_scores_scaled`) and selects on those scores; step 2 fetches K | V
rows (2D wide); step 3 weighs each hot and far row by its exact score q . k * scale (the hot rows'
K from k_hot, a far row's from its first D columns), renormalised over the hot rows and picks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ..layers.paged_tiles import probs_times_values, tile_row_ids, tile_rows, tile_scores, tile_scores_scaled
from ..triton_interpreter import patch_if_interpreting
from .row_cache import FarRowCacheLayer
from .row_cache_triton import assign_rows
from .selection import SelectionSpec

LOG2E = 1.4426950408889634
KEY_NONE = tl.constexpr(-2147483648)  # sortable key of positions outside the far range (below every key)
KEY_MAX = tl.constexpr(2147483647)
patch_if_interpreting()

COARSE_BINS = 64           # keys pass: histogram bins below the row's key bound ...
COARSE_BINS_PER_LOG2 = 2.0  # ... of 1/2 log2 unit; the last bin takes every key 31.5 units down or more
FUSED_SELECT_ROWS_PER_SM = 4  # "auto" selects inside the K pass from this many rows (sequence x KV head) per SM:
#                               ahead of "row" there on an H100, behind below (benchmarks/notes/kcache_triton.md)
SPLIT_CTAS_PER_SM = 4  # the split selection's default parts a row: this many CTAs per SM over its rows
LATE_ROWS = 128  # "fused" selects this many rows, the last of the K pass to finish, split after it ...
LATE_ROWS_FROM_CONTEXT = 16384  # ... where the longest context reaches this: at 32K, 1.2 points more of D2D at
#                                 B=128 (H100); at 8K 0.5 less at B=72 (benchmarks/notes/kcache_triton.md)
SCAN_ROW = tl.constexpr(4)  # keys a thread scans in a row in the passes that copy keys in order (`_ranks_in_tile`):
#                            the candidates' copy 20-30% faster than one flat scan (H100); 8 a little slower, 16 slower


# ---------------------------------------------------------------------------------------------
# Selection helpers (inlined into the kernels)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _sortable(key):
    """fp32 -> int32 whose signed order is the float order (-0.0 sorts just below +0.0)."""
    bits = key.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _unsortable(skey):
    """Inverse of `_sortable`."""
    return (skey ^ ((skey >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _row_lse(MP, LP, row, nsplit, NSPLIT_MAX, G: tl.constexpr, GQ: tl.constexpr, NSP: tl.constexpr,
             CM: tl.constexpr):
    """(lse [GQ], max [GQ]) of one row's scores per query head from the split partials (log2 domain;
    lse 0 and max -inf in padded heads)."""
    gq = tl.arange(0, GQ)
    si = tl.arange(0, NSP)
    gmask = gq < G
    pofs = (row * G + gq)[:, None] * NSPLIT_MAX + si[None, :]
    pmask = gmask[:, None] & (si < nsplit)[None, :]
    pm = tl.load(MP + pofs, mask=pmask, other=float("-inf"), cache_modifier=CM)
    pl = tl.load(LP + pofs, mask=pmask, other=0.0, cache_modifier=CM)
    m = tl.where(gmask, tl.max(pm, 1), 0.0)
    lse = tl.where(gmask, m + tl.log2(tl.sum(pl * tl.exp2(pm - m[:, None]), 1)), 0.0)
    return lse, tl.where(gmask, m, float("-inf"))


@triton.jit
def _tile_keys(srow, offs, Cs, lse_row, G: tl.constexpr, TS: tl.constexpr, GROUP_SUM: tl.constexpr,
               CM: tl.constexpr):
    """Group keys [TS] at positions offs of one row: max_g (S[g] - lse_g) or log2 sum_g exp2(S[g] - lse_g)
    (online over g). srow: the row's g = 0 scores (row stride Cs); lse_row: the row's lse [G]. One 1D
    load per head keeps the layout simple (a [G, TS] tile can land in a layout with the heads across
    warps, which replicates the keys in every warp)."""
    mx = tl.full([TS], float("-inf"), tl.float32)
    acc = tl.zeros([TS], tl.float32)
    for g in tl.static_range(G):
        x = tl.load(srow + g * Cs + offs, cache_modifier=CM) - tl.load(lse_row + g)
        if GROUP_SUM:
            m_new = tl.maximum(mx, x)
            acc = acc * tl.exp2(mx - m_new) + tl.exp2(x - m_new)
            mx = m_new
        else:
            mx = tl.maximum(mx, x)
    if GROUP_SUM:
        return mx + tl.log2(acc)
    else:
        return mx


@triton.jit
def _coarse_bin(key, ktop, NB1: tl.constexpr, BPL: tl.constexpr):
    """Bin 0 holds the largest keys: floor((ktop - key) * BPL) clamped to [0, NB1 - 1]; the last bin
    takes every key (NB1 - 1) / BPL log2 units or more below the bound ktop."""
    x = tl.minimum(tl.maximum((ktop - key) * BPL, 0.0), NB1 - 1.0)
    return x.to(tl.int32)


@triton.jit
def _row_key_bound(m, lse, G: tl.constexpr, GROUP_SUM: tl.constexpr):
    """Upper bound of a row's keys from its per-head max scores m [GQ] (-inf padded) and lse: max_g
    (m_g - lse_g), plus log2(G) for group sums. A max and a constant only: a float sum here could
    come out different in different threads, and every thread must bin the keys alike."""
    mx = tl.max(m - lse, 0)
    if GROUP_SUM:
        return mx + tl.log2(G * 1.0)
    else:
        return mx


@triton.jit
def _bins(k, lo, hi, shift, NB: tl.constexpr):
    """(bin, in range) of sortable keys k for the interval [lo, hi]: bin (hi - k) >> shift, 0 at hi."""
    inr = (k >= lo) & (k <= hi)
    b = ((hi - k).to(tl.uint32, bitcast=True) >> shift.to(tl.uint32)).to(tl.int32)
    return tl.where(inr, tl.minimum(b, NB - 1), 0), inr


@triton.jit
def _shift_for(lo, hi, NB: tl.constexpr):
    """Smallest shift with (hi - lo) >> shift < NB."""
    rng = hi.to(tl.int64) - lo.to(tl.int64)
    ks = tl.arange(0, 32).to(tl.int64)
    return tl.sum(((rng >> ks) >= NB).to(tl.int32), 0)


@triton.jit
def _locate(hist, above, need, lo, hi, shift, NB: tl.constexpr):
    """Narrow [lo, hi] to the bin of `hist` that holds the need-th largest key, given `above` keys
    > hi. Returns (keys > new hi, keys in the new interval, new lo, new hi)."""
    bins = tl.arange(0, NB)
    cum = above + tl.cumsum(hist, 0)
    j = tl.sum((cum < need).to(tl.int32), 0)
    new_above = above + tl.sum(tl.where(bins < j, hist, 0), 0)
    nb = tl.sum(tl.where(bins == j, hist, 0), 0)
    hi64 = hi.to(tl.int64)
    j64 = j.to(tl.int64)
    new_hi = (hi64 - (j64 << shift)).to(tl.int32)
    new_lo = tl.maximum(lo.to(tl.int64), hi64 - ((j64 + 1) << shift) + 1).to(tl.int32)
    return new_above, nb, new_lo, new_hi


@triton.jit
def _hist_row(krow, a0, a1, lo, hi, shift, TK: tl.constexpr, NB: tl.constexpr, NSTG: tl.constexpr):
    """Histogram [NB] of `_bins` over the keys krow[a0:a1] (whole tiles of TK written by the keys pass)."""
    tk = tl.arange(0, TK)
    hist = tl.zeros([NB], tl.int32)
    for start in tl.range(a0, a1, TK, num_stages=NSTG):
        b, inr = _bins(tl.load(krow + start + tk), lo, hi, shift, NB)
        hist += tl.histogram(b, NB, mask=inr)
    return hist


@triton.jit
def _tile_offsets(TK: tl.constexpr, ROW: tl.constexpr = SCAN_ROW):
    """Offsets [TK / ROW, ROW] of a tile of TK keys, in order row by row (see `_ranks_in_tile`)."""
    return tl.arange(0, TK // ROW)[:, None] * ROW + tl.arange(0, ROW)[None, :]


@triton.jit
def _ranks_in_tile(x):
    """Exclusive prefix sums of x [R, ROW] (int32) in row-major order: a scan along each row, then
    one over the R row sums. Cheaper than one scan of the flat tile, whose every element a thread
    holds is a warp scan of its own (benchmarks/notes/kcache_triton.md, "Where a row's selection
    spends its time")."""
    per_row = tl.sum(x, 1)
    return (tl.cumsum(per_row, 0) - per_row)[:, None] + tl.cumsum(x, 1) - x


@triton.jit
def _collect(krow, a0, a1, lo, SP, SK, cap, TK: tl.constexpr, NSTG: tl.constexpr, ROW: tl.constexpr = SCAN_ROW):
    """Copy the keys >= lo of krow[a0:a1] with their positions, in ascending position order, into the
    scratch (SK keys, SP positions; the first `cap` of them). Returns the count of keys >= lo (which
    may exceed cap). ROW: keys a thread scans in a row (`_ranks_in_tile`)."""
    offs = _tile_offsets(TK, ROW)
    cnt = 0
    for start in tl.range(a0, a1, TK, num_stages=NSTG):
        k = tl.load(krow + start + offs)
        c = k >= lo
        ci = c.to(tl.int32)
        slot = cnt + _ranks_in_tile(ci)
        tl.store(SP + slot, start + offs, mask=c & (slot < cap))
        tl.store(SK + slot, k, mask=c & (slot < cap))
        cnt += tl.sum(tl.sum(ci, 1), 0)
    return cnt


@triton.jit
def _coarse_edge(ktop, b, NB1: tl.constexpr, BPL: tl.constexpr):
    """Smallest sortable key whose `_coarse_bin` is <= b (bisection over the non-NaN floats; the bin
    never grows with the key), so that bin <= b <=> sortable key >= edge."""
    lo = tl.full([], -2139095041, tl.int64)   # _sortable(-inf)
    hi = tl.full([], 2139095040, tl.int64)    # _sortable(+inf)
    while lo < hi:
        mid = (lo + hi) >> 1
        if _coarse_bin(_unsortable(mid.to(tl.int32)), ktop, NB1, BPL) <= b:
            hi = mid
        else:
            lo = mid + 1
    return lo.to(tl.int32)


@triton.jit
def _write_selected(SK, SP, n_lo, n_hi, kappa, n_eq, out, FROM_ROW: tl.constexpr, TK: tl.constexpr,
                    NSTG: tl.constexpr):
    """Write, in source order, the positions with key > kappa and the first n_eq with key == kappa
    to out[0:]. Source: the row's keys SK[n_lo:n_hi] (FROM_ROW; positions = indices, whole tiles) or
    scratch entries [n_lo, n_hi) of (SK keys, SP positions)."""
    offs = _tile_offsets(TK)
    cnt = 0
    eq_taken = 0
    for start in tl.range(n_lo, n_hi, TK, num_stages=NSTG):
        i = start + offs
        if FROM_ROW:
            k = tl.load(SK + i)
            pos = i
        else:
            m = i < n_hi
            k = tl.load(SK + i, mask=m, other=KEY_NONE)
            pos = tl.load(SP + i, mask=m, other=0)
        eq = (k == kappa).to(tl.int32)
        sel = ((k > kappa) | ((eq > 0) & (eq_taken + _ranks_in_tile(eq) < n_eq))).to(tl.int32)
        tl.store(out + cnt + _ranks_in_tile(sel), pos, mask=sel > 0)
        cnt += tl.sum(tl.sum(sel, 1), 0)
        eq_taken += tl.sum(tl.sum(eq, 1), 0)


@triton.jit
def _guard_selected(out, top_n, lo, hi, CLEAR: tl.constexpr, TK: tl.constexpr):
    """CLEAR: out[0:top_n] = -1 (before the selection writes). Else: every entry outside the far
    range [lo, hi) becomes -1. Together they keep a slot that the selection left unwritten or
    filled wrongly (seen in rare rows on an H200, see the module docstring) from reaching the fetch
    as a position: the row then attends to one far position fewer."""
    tk = tl.arange(0, TK)
    for start in range(0, top_n, TK):
        t = start + tk
        m = t < top_n
        if CLEAR:
            tl.store(out + t, tl.full([TK], -1, tl.int32), mask=m)
        else:
            v = tl.load(out + t, mask=m, other=-1)
            tl.store(out + t, tl.full([TK], -1, tl.int32), mask=m & (v != -1) & ((v < lo) | (v >= hi)))


@triton.jit
def _finish_from_scratch(SP, SK, cnt, lo, hi, above, out, top_n, TK: tl.constexpr, NB: tl.constexpr,
                         NSTG: tl.constexpr):
    """Count passes over the scratch entries [0, cnt) (keys in [lo, hi] or above it, `above` keys of the
    row > hi) until lo == hi, the n-th key; then the selected positions, ascending, into out."""
    tk = tl.arange(0, TK)
    while lo < hi:
        shift = _shift_for(lo, hi, NB)
        hist = tl.zeros([NB], tl.int32)
        for start in range(0, cnt, TK):
            i = start + tk
            k = tl.load(SK + i, mask=i < cnt, other=KEY_NONE)
            b, inr = _bins(k, lo, hi, shift, NB)
            hist += tl.histogram(b, NB, mask=inr)
        above, nb, lo, hi = _locate(hist, above, top_n, lo, hi, shift, NB)
    _write_selected(SK, SP, 0, cnt, hi, top_n - above, out, False, TK, NSTG)


@triton.jit
def _select_from_keys(krow, SP, SK, out, a0, a1, lo, hi, far, top_n, scr_cap,
                      TK: tl.constexpr, NB: tl.constexpr, NSTG: tl.constexpr):
    """Exact selection over the row's keys krow[a0:a1], [lo, hi] = [min, max] of its far keys, SP/SK
    its scratch of scr_cap (>= top_n) slots: count passes over the row until the keys >= lo fit the
    scratch, then `_collect` and `_finish_from_scratch`. Ties that overfill the scratch (lo == hi) are
    written straight from the row."""
    above = lo * 0
    nb = far
    while (above + nb > scr_cap) & (lo < hi):
        shift = _shift_for(lo, hi, NB)
        hist = _hist_row(krow, a0, a1, lo, hi, shift, TK, NB, NSTG)
        above, nb, lo, hi = _locate(hist, above, top_n, lo, hi, shift, NB)
    if above + nb <= scr_cap:
        cnt = _collect(krow, a0, a1, lo, SP, SK, scr_cap, TK, NSTG)
        tl.debug_barrier()
        _finish_from_scratch(SP, SK, cnt, lo, hi, above, out, top_n, TK, NB, NSTG)
    else:
        _write_selected(krow, krow, a0, a1, hi, top_n - above, out, True, TK, NSTG)


@triton.jit
def _fill_all(out, sink_end, far, top_n, TK: tl.constexpr):
    """Rows with far <= top_n: every far position, then -1."""
    tk = tl.arange(0, TK)
    for start in range(0, top_n, TK):
        t = start + tk
        tl.store(out + t, tl.where(t < far, sink_end + t, -1), mask=t < top_n)


@triton.jit
def _row_bounds(MP, LP, LSE, KTOP, row, nsplit, NSPLIT_MAX, G: tl.constexpr, GQ: tl.constexpr, NSP: tl.constexpr,
                GROUP_SUM: tl.constexpr, CM: tl.constexpr):
    """The row's key bound (returned, and stored to KTOP) and its lse [G] (stored to LSE) from its
    split partials. The bound is made from the stored lse read back: the threads' register copies of
    this float reduction can differ in the last bits (seen: two values 2 ulps apart, half the CTA
    each), and the key bound and the bin edges must be the same numbers in every thread, and in
    every CTA that selects a part of the row (module docstring, "Fixed")."""
    lse, m = _row_lse(MP, LP, row, nsplit, NSPLIT_MAX, G, GQ, NSP, CM)
    gq = tl.arange(0, GQ)
    tl.store(LSE + row * G + gq, lse, mask=gq < G)
    tl.debug_barrier()
    lse = tl.load(LSE + row * G + gq, mask=gq < G, other=0.0)
    ktop = _row_key_bound(m, lse, G, GROUP_SUM)
    tl.store(KTOP + row, ktop)
    return ktop


@triton.jit
def _far_range(L, sink, window, TK: tl.constexpr):
    """(sink_end, window_start, far, a0, a1) of a row of L positions: its far positions [sink_end,
    window_start), far of them, inside the whole key tiles [a0, a1)."""
    sink_end = tl.minimum(sink, L)
    window_start = tl.maximum(sink_end, L - window)
    a0 = (sink_end // TK) * TK
    a1 = a0 + tl.cdiv(window_start - a0, TK) * TK
    return sink_end, window_start, window_start - sink_end, a0, a1


@triton.jit
def _keys_and_coarse(srow, krow, t0, t1, sink_end, window_start, lse_row, ktop, Cs, G: tl.constexpr,
                     TS: tl.constexpr, NB1: tl.constexpr, BPL: tl.constexpr, NSTG: tl.constexpr,
                     GROUP_SUM: tl.constexpr, CM: tl.constexpr):
    """Keys pass over the whole tiles [t0, t1): the group keys as sortable int32 to krow (KEY_NONE
    outside the far range) and their coarse histogram [NB1] below the row's key bound ktop."""
    ts = tl.arange(0, TS)
    coarse = tl.zeros([NB1], tl.int32)
    for start in tl.range(t0, t1, TS, num_stages=NSTG):
        offs = start + ts
        key = _tile_keys(srow, offs, Cs, lse_row, G, TS, GROUP_SUM, CM)
        valid = (offs >= sink_end) & (offs < window_start)
        tl.store(krow + offs, tl.where(valid, _sortable(key), KEY_NONE))
        coarse += tl.histogram(tl.where(valid, _coarse_bin(key, ktop, NB1, BPL), 0), NB1, mask=valid)
    return coarse


@triton.jit
def _coarse_pick(coarse, top_n, NB1: tl.constexpr):
    """(b*, keys in bins 0..b*) of a coarse histogram [NB1]: b* the bin holding the top_n-th key."""
    csum = tl.cumsum(coarse, 0)
    bstar = tl.sum((csum < top_n).to(tl.int32), 0)
    return bstar, tl.sum(tl.where(tl.arange(0, NB1) == bstar, csum, 0), 0)


@triton.jit
def _select_candidates(SP, SK, cnt, ktop, bstar, out, top_n, scr_cap, TK: tl.constexpr, NB: tl.constexpr,
                       NB1: tl.constexpr, BPL: tl.constexpr, NSTG: tl.constexpr):
    """The row's selection from the candidates in the scratch, cnt keys >= the lower edge of coarse
    bin b*, ascending by position: count passes narrow the n-th key down from b*'s [min, max]. The
    float histogram only picked the candidates: the keys above b* and b*'s [min, max] are counted
    again on the integer keys that every later step compares (a key on a bin edge must not count on
    one side and compare on the other). Returns 1 if the selection was written, 0 where that count
    does not hold the n-th key in b* (the caller then falls back)."""
    top = _coarse_edge(ktop, bstar - 1, NB1, BPL)   # keys >= top lie in the bins above b*
    n_scr = tl.minimum(cnt, scr_cap)
    tk = tl.arange(0, TK)
    bmin = tl.full([TK], KEY_MAX, tl.int32)
    bmax = tl.full([TK], KEY_NONE, tl.int32)
    n_in = 0
    for start in range(0, n_scr, TK):
        i = start + tk
        k = tl.load(SK + i, mask=i < n_scr, other=KEY_MAX)
        inb = (i < n_scr) & (k < top)
        bmin = tl.minimum(bmin, tl.where(inb, k, KEY_MAX))
        bmax = tl.maximum(bmax, tl.where(inb, k, KEY_NONE))
        n_in += tl.sum(inb.to(tl.int32), 0)
    above = cnt - n_in
    done = 0
    if (cnt <= scr_cap) & (above < top_n) & (cnt >= top_n):
        _finish_from_scratch(SP, SK, cnt, tl.min(bmin, 0), tl.max(bmax, 0), above, out, top_n, TK, NB, NSTG)
        done = 1
    return done


@triton.jit
def _select_by_narrowing(krow, SP, SK, out, a0, a1, far, top_n, scr_cap, TK: tl.constexpr, NB: tl.constexpr,
                         NSTG: tl.constexpr):
    """The fallback where the n-th key lies 31.5 log2 units or more below the bound, or its coarse bin
    overfills the scratch: exact narrowing over the row's keys from their [min, max]."""
    tk = tl.arange(0, TK)
    vmin = tl.full([TK], KEY_MAX, tl.int32)
    vmax = tl.full([TK], KEY_NONE, tl.int32)
    for start in tl.range(a0, a1, TK, num_stages=NSTG):
        k = tl.load(krow + start + tk)
        vmin = tl.minimum(vmin, tl.where(k == KEY_NONE, KEY_MAX, k))
        vmax = tl.maximum(vmax, k)
    _select_from_keys(krow, SP, SK, out, a0, a1, tl.min(vmin, 0), tl.max(vmax, 0), far, top_n, scr_cap,
                      TK, NB, NSTG)


@triton.jit
def _row_select(S, MP, LP, LSE, KTOP, KEYS, IDX, SCR_POS, SCR_KEY, row, L, nsplit, NSPLIT_MAX, Cs,
                sink, window, top_n, scr_cap,
                G: tl.constexpr, GQ: tl.constexpr, NSP: tl.constexpr, TS: tl.constexpr, TK: tl.constexpr,
                NB: tl.constexpr, NB1: tl.constexpr, BPL: tl.constexpr, NSTG: tl.constexpr,
                GROUP_SUM: tl.constexpr, CM: tl.constexpr):
    """Selection of one row (b, h) by one CTA from its scores and partials; see the module docstring.
    CM: cache modifier of the loads of data other CTAs wrote (".cg" inside the K pass)."""
    ktop = _row_bounds(MP, LP, LSE, KTOP, row, nsplit, NSPLIT_MAX, G, GQ, NSP, GROUP_SUM, CM)
    sink_end, window_start, far, a0, a1 = _far_range(L, sink, window, TK)
    out = IDX + row.to(tl.int64) * top_n
    if top_n > 0:
        if far <= top_n:
            _fill_all(out, sink_end, far, top_n, TK)
        else:
            _guard_selected(out, top_n, sink_end, window_start, True, TK)
            tl.debug_barrier()
            krow = KEYS + row.to(tl.int64) * Cs
            srow = S + (row * G).to(tl.int64) * Cs
            scr = row.to(tl.int64) * scr_cap
            coarse = _keys_and_coarse(srow, krow, a0, a1, sink_end, window_start, LSE + row * G, ktop, Cs, G, TS,
                                      NB1, BPL, NSTG, GROUP_SUM, CM)
            tl.debug_barrier()
            bstar, ncand = _coarse_pick(coarse, top_n, NB1)
            SP = SCR_POS + scr
            SK = SCR_KEY + scr
            done = 0
            if (bstar < NB1 - 1) & (ncand <= scr_cap):
                # the keys of the coarse bins down to b*, the one holding the n-th key
                cnt = _collect(krow, a0, a1, _coarse_edge(ktop, bstar, NB1, BPL), SP, SK, scr_cap, TK, NSTG)
                tl.debug_barrier()
                done = _select_candidates(SP, SK, cnt, ktop, bstar, out, top_n, scr_cap, TK, NB, NB1, BPL, NSTG)
            if done == 0:
                _select_by_narrowing(krow, SP, SK, out, a0, a1, far, top_n, scr_cap, TK, NB, NSTG)
            tl.debug_barrier()
            _guard_selected(out, top_n, sink_end, window_start, False, TK)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _kpass_kernel(Q, K, KS, BT, SEQ, S, MP, LP, LSE, KTOP, KEYS, IDX, CNT, SCR_POS, SCR_KEY, DONE, LATE,
                  qk_scale, sink, window, top_n, stride_bt, Cs, NSPLIT_MAX, scr_cap, n_late,
                  HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, GQ: tl.constexpr, D: tl.constexpr,
                  BS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, NSP: tl.constexpr,
                  TS: tl.constexpr, TK: tl.constexpr, NB: tl.constexpr, NB1: tl.constexpr, BPL: tl.constexpr,
                  NSTG: tl.constexpr, GROUP_SUM: tl.constexpr, FUSED_SELECT: tl.constexpr, DEFER: tl.constexpr,
                  HAS_SCALES: tl.constexpr, F16_DOT: tl.constexpr):
    """grid (NSPLIT_MAX, B * HKV). Q [B, HKV*G, D]; K [NB, HKV, BS, D] (with HAS_SCALES float8, KS
    [NB, HKV, BS] float32 its scales; F16_DOT: q and the float8 tiles in float16); BT [B, stride_bt] int32;
    SEQ [B] int64. S [rows, G, Cs] fp32 log2-domain scores; MP/LP [rows, G, NSPLIT_MAX] partials.
    With FUSED_SELECT or DEFER the last CTA of each row (CNT [rows] int32 tickets, zero on entry and
    reset to zero on exit) finishes it: with DEFER, the last n_late rows to finish (DONE [1] int32, zero
    on entry, counts them) get their lse and key bound (LSE, KTOP [rows] fp32) and are listed in
    LATE [n_late] int32 in finishing order, for the split selection after this kernel; with
    FUSED_SELECT the others run `_row_select` here (KEYS [rows, Cs], SCR_POS/SCR_KEY [rows, scr_cap]
    int32 scratch)."""
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
        if F16_DOT:  # `tile_scores_scaled` widens the float8 tiles to q's dtype
            q = tl.minimum(tl.maximum(q, -65504.0), 65504.0).to(tl.float16)
        lo = split * SPLIT
        hi = tl.minimum(lo + SPLIT, L)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        s_row = S + (row * G + gi).to(tl.int64)[:, None] * Cs
        bt_row = BT + b.to(tl.int64) * stride_bt
        for start in range(lo, hi, BLOCK_N):
            offs = start + ni
            msk = offs < hi
            if HAS_SCALES:
                s = tile_scores_scaled(q, K, KS, tile_row_ids(bt_row, offs, msk, h, HKV, BS), di, msk, qk_scale, D)
            else:
                s = tile_scores(q, K, tile_rows(bt_row, offs, msk, h, di, HKV, BS, D), msk, qk_scale)
            tl.store(s_row + offs[None, :], s, mask=gmask[:, None] & msk[None, :], eviction_policy="evict_last")
            m_new = tl.maximum(m_i, tl.max(s, 1))
            l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
            m_i = m_new
        tl.store(MP + (row * G + gi) * NSPLIT_MAX + split, m_i, mask=gmask)
        tl.store(LP + (row * G + gi) * NSPLIT_MAX + split, l_i, mask=gmask)
        if FUSED_SELECT or DEFER:
            tl.debug_barrier()
            ticket = tl.atomic_add(CNT + row, 1, sem="acq_rel")
            if ticket == nsplit - 1:
                tl.store(CNT + row, 0)
                late = 0
                if DEFER:
                    slot = tl.atomic_add(DONE, 1, sem="acq_rel") - (tl.num_programs(1) - n_late)
                    if slot >= 0:
                        _row_bounds(MP, LP, LSE, KTOP, row, nsplit, NSPLIT_MAX, G, GQ, NSP, GROUP_SUM, ".cg")
                        tl.store(LATE + slot, row)
                        late = 1
                if FUSED_SELECT:
                    if late == 0:
                        _row_select(S, MP, LP, LSE, KTOP, KEYS, IDX, SCR_POS, SCR_KEY, row, L, nsplit, NSPLIT_MAX,
                                    Cs, sink, window, top_n, scr_cap, G, GQ, NSP, TS, TK, NB, NB1, BPL, NSTG,
                                    GROUP_SUM, ".cg")


@triton.jit
def _select_kernel(SEQ, S, MP, LP, LSE, KTOP, KEYS, IDX, SCR_POS, SCR_KEY, sink, window, top_n, Cs, NSPLIT_MAX,
                   scr_cap, HKV: tl.constexpr, G: tl.constexpr, GQ: tl.constexpr, SPLIT: tl.constexpr,
                   NSP: tl.constexpr, TS: tl.constexpr, TK: tl.constexpr, NB: tl.constexpr, NB1: tl.constexpr,
                   BPL: tl.constexpr, NSTG: tl.constexpr, GROUP_SUM: tl.constexpr):
    """"row" selection: grid (rows,), after `_kpass_kernel` with FUSED_SELECT=False."""
    row = tl.program_id(0)
    L = tl.load(SEQ + row // HKV).to(tl.int32)
    _row_select(S, MP, LP, LSE, KTOP, KEYS, IDX, SCR_POS, SCR_KEY, row, L, tl.cdiv(L, SPLIT), NSPLIT_MAX, Cs,
                sink, window, top_n, scr_cap, G, GQ, NSP, TS, TK, NB, NB1, BPL, NSTG, GROUP_SUM, "")


@triton.jit
def _split_part(SEQ, LATE, t, p, parts, sink, window, HKV: tl.constexpr, TK: tl.constexpr):
    """(row, sink_end, window_start, far, a0, a1, c0, c1) of listed row t (row -1: none) and its part p
    of `parts`: the whole key tiles [c0, c1) of the row's [a0, a1)."""
    row = tl.load(LATE + t)
    L = tl.load(SEQ + tl.maximum(row, 0) // HKV).to(tl.int32)
    sink_end, window_start, far, a0, a1 = _far_range(L, sink, window, TK)
    per = tl.cdiv(tl.cdiv(a1 - a0, TK), parts) * TK
    c0 = tl.minimum(a0 + p * per, a1)
    return row, sink_end, window_start, far, a0, a1, c0, tl.minimum(c0 + per, a1)


@triton.jit
def _split_keys_kernel(SEQ, S, LSE, KTOP, KEYS, LATE, PART_HIST, sink, window, top_n, Cs, parts,
                       HKV: tl.constexpr, G: tl.constexpr, TS: tl.constexpr, TK: tl.constexpr, NB1: tl.constexpr,
                       BPL: tl.constexpr, NSTG: tl.constexpr, GROUP_SUM: tl.constexpr):
    """Split selection, first half: grid (parts, n_late). Part p of listed row t (LATE [n_late], -1:
    none) writes its tiles' keys to KEYS [rows, Cs] and their coarse histogram to PART_HIST
    [n_late, parts, NB1] int32, from S and the row's LSE and KTOP, stored by `_kpass_kernel`."""
    p = tl.program_id(0)
    t = tl.program_id(1)
    row, sink_end, window_start, far, a0, a1, c0, c1 = _split_part(SEQ, LATE, t, p, parts, sink, window, HKV, TK)
    if (row >= 0) & (top_n > 0) & (far > top_n):
        coarse = _keys_and_coarse(S + (row * G).to(tl.int64) * Cs, KEYS + row.to(tl.int64) * Cs, c0, c1, sink_end,
                                  window_start, LSE + row * G, tl.load(KTOP + row), Cs, G, TS, NB1, BPL, NSTG,
                                  GROUP_SUM, "")
        tl.store(PART_HIST + (t * parts + p) * NB1 + tl.arange(0, NB1), coarse)


@triton.jit
def _split_select_kernel(SEQ, KTOP, KEYS, IDX, LATE, PART_HIST, PART_CNT, TICKET, PART_POS, PART_KEY,
                         SCR_POS, SCR_KEY, sink, window, top_n, Cs, parts, part_cap, scr_cap,
                         HKV: tl.constexpr, TK: tl.constexpr, NB: tl.constexpr, NB1: tl.constexpr,
                         BPL: tl.constexpr, NSTG: tl.constexpr, PARTS: tl.constexpr):
    """Split selection, second half: grid (parts, n_late), after `_split_keys_kernel`. Every part of a
    row sums the parts' coarse histograms (integers: the same b* in every part) and copies its
    candidates, ascending, to its own region of PART_POS/PART_KEY [n_late, parts, part_cap] (count in
    PART_CNT [n_late, parts]); the last part to finish (TICKET [n_late] int32, zero on entry and reset
    on exit) joins the regions in part order into the row's scratch and selects from it as
    `_row_select` does, or by narrowing over the whole row's keys where that fails."""
    p = tl.program_id(0)
    t = tl.program_id(1)
    row, sink_end, window_start, far, a0, a1, c0, c1 = _split_part(SEQ, LATE, t, p, parts, sink, window, HKV, TK)
    if row >= 0:
        out = IDX + row.to(tl.int64) * top_n
        if top_n > 0:
            if far <= top_n:
                if p == 0:
                    _fill_all(out, sink_end, far, top_n, TK)
            else:
                ktop = tl.load(KTOP + row)
                pi = tl.arange(0, PARTS)
                hist = tl.load(PART_HIST + (t * parts + pi)[:, None] * NB1 + tl.arange(0, NB1)[None, :],
                               mask=(pi < parts)[:, None], other=0)
                bstar, ncand = _coarse_pick(tl.sum(hist, 0), top_n, NB1)
                fast = (bstar < NB1 - 1) & (ncand <= scr_cap)
                krow = KEYS + row.to(tl.int64) * Cs
                region = (t * parts + p).to(tl.int64) * part_cap
                if fast:
                    cnt = _collect(krow, c0, c1, _coarse_edge(ktop, bstar, NB1, BPL), PART_POS + region,
                                   PART_KEY + region, part_cap, TK, NSTG)
                    tl.store(PART_CNT + t * parts + p, cnt)
                tl.debug_barrier()
                if tl.atomic_add(TICKET + t, 1, sem="acq_rel") == parts - 1:
                    tl.store(TICKET + t, 0)
                    _guard_selected(out, top_n, sink_end, window_start, True, TK)
                    SP = SCR_POS + row.to(tl.int64) * scr_cap
                    SK = SCR_KEY + row.to(tl.int64) * scr_cap
                    done = 0
                    if fast:
                        counts = tl.load(PART_CNT + t * parts + pi, mask=pi < parts, other=0, cache_modifier=".cg")
                        cnt = tl.sum(counts, 0)
                        if (tl.max(counts, 0) <= part_cap) & (cnt <= scr_cap):
                            _join_parts(PART_POS, PART_KEY, PART_CNT, t * parts, parts, part_cap, SP, SK, TK)
                            tl.debug_barrier()
                            done = _select_candidates(SP, SK, cnt, ktop, bstar, out, top_n, scr_cap, TK, NB, NB1,
                                                      BPL, NSTG)
                    if done == 0:
                        _select_by_narrowing(krow, SP, SK, out, a0, a1, far, top_n, scr_cap, TK, NB, NSTG)
                    tl.debug_barrier()
                    _guard_selected(out, top_n, sink_end, window_start, False, TK)


@triton.jit
def _join_parts(PART_POS, PART_KEY, PART_CNT, first, parts, part_cap, SP, SK, TK: tl.constexpr):
    """Copy the candidates of regions first .. first + parts - 1 (written by other CTAs), in order, to
    SP/SK."""
    tk = tl.arange(0, TK)
    at = 0
    for part in range(0, parts):
        n = tl.load(PART_CNT + first + part, cache_modifier=".cg")
        src = (first + part).to(tl.int64) * part_cap
        for start in range(0, n, TK):
            i = start + tk
            m = i < n
            tl.store(SP + at + i, tl.load(PART_POS + src + i, mask=m, other=0, cache_modifier=".cg"), mask=m)
            tl.store(SK + at + i, tl.load(PART_KEY + src + i, mask=m, other=0, cache_modifier=".cg"), mask=m)
        at += n


@triton.jit
def _gather_kernel(VP, BT, IDX, OUT, DST, n_rows, stride_bt, top_n,
                   HKV: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, R: tl.constexpr, HAS_DST: tl.constexpr):
    """Persistent zero-copy gather. VP [NB, HKV, BS, D] (pinned host, read through UVA);
    IDX [rows * top_n] positions (-1 = none); OUT [rows * top_n, D] device, or with HAS_DST
    OUT [any, D] and entry r written to row DST[r]."""
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
        dst = tl.load(DST + r, mask=ok, other=0).to(tl.int64) if HAS_DST else r.to(tl.int64)
        tl.store(OUT + dst[:, None] * D + di[None, :], v, mask=ok[:, None])


@triton.jit
def _exact_scores(q, k, ok, qk_scale):
    """s [GP, R] = q . k * qk_scale (log2 domain) of q [GP, D] against exact K rows k [R, D] (ok:
    which are real; -inf elsewhere)."""
    if k.dtype == tl.float32:
        s = tl.dot(q.to(tl.float32), tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q.to(k.dtype), tl.trans(k))
    return tl.where(ok[None, :], s * qk_scale, float("-inf"))


@triton.jit
def _accumulate(acc, z, m, s, v, lse, RENORM: tl.constexpr):
    """Add the rows v [R, D] weighed by their scores s [GP, R] (log2 domain; -inf: no row) to acc
    [GP, D] and z [GP] (the weights' sum); returns (acc, z, m). RENORM: weights exp2(s - m) against
    m [GP], the largest score so far (acc and z rescaled when it grows), so the picks' own softmax
    cannot underflow however far below lse they lie; else exp2(s - lse), shares of the whole
    softmax (m unused)."""
    if RENORM:
        m_new = tl.maximum(m, tl.max(s, 1))
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - ref)
        p = tl.exp2(s - ref[:, None])
        acc = acc * alpha[:, None] + probs_times_values(p, v)
        z = z * alpha + tl.sum(p, 1)
        m = m_new
    else:
        p = tl.exp2(s - lse[:, None])
        acc += probs_times_values(p, v)
        z += tl.sum(p, 1)
    return acc, z, m


@triton.jit
def _sparse_out_kernel(S, LSE, IDX, VFAR, FAR_ROW, V_SCALES, BT, VHOT, Q, KHOT, SEQ, SLOTS, OUT, OUT_PART, Z_PART,
                       M_PART, sink, window, top_n, Cs, hot_rows, picks_per_part, qk_scale, bt_stride,
                       HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, R: tl.constexpr,
                       RENORM: tl.constexpr, HAS_FAR_ROW: tl.constexpr, PARTS: tl.constexpr, STAGES: tl.constexpr,
                       EXACT_K: tl.constexpr, W: tl.constexpr, FAR_SCALED: tl.constexpr, BS: tl.constexpr):
    """grid (rows, PARTS). o[g] = sum_j p[g, j] v_j over the hot rows (VHOT [slots, HKV, hot_rows, D])
    and the fetched far rows (VFAR [rows, top_n, W], or with HAS_FAR_ROW VFAR [any, W] and pick j of
    the row in row FAR_ROW[row, j]; W = D, or 2 D with EXACT_K); p = exp2(S - lse), or with RENORM
    p / sum p from exp2(S - max S) over the row's hot rows and picks (`_accumulate`). With EXACT_K
    (fp8 scoring keys, RENORM) S only picked: the scores are q . k * qk_scale of q (Q [B, HKV*G, D])
    against the exact K, from KHOT [slots, HKV, hot_rows, D] for the hot rows and from the first D
    columns of a far row (its V the last D). With FAR_SCALED (fp8 host values) a far row is float8
    and the pick at position p of sequence b, KV head h is multiplied by its scale before use (in
    VHOT's dtype):
    V_SCALES [NB, HKV, BS] float32 at block BT[b, p // BS] (BT [B, bt_stride] int32). Part k
    takes the picks [k, k + 1) * picks_per_part (part 0 also the hot rows). PARTS == 1: OUT
    [B, HKV*G, D] directly; else each part writes its fp32 sums OUT_PART [PARTS, B*HKV*G, D] and
    Z_PART [PARTS, B*HKV*G] (sum p), with RENORM also M_PART [PARTS, B*HKV*G] (its largest score, to
    which its sums are relative), for `_sparse_out_combine_kernel`."""
    row = tl.program_id(0)
    part = tl.program_id(1)
    b = row // HKV
    h = row % HKV
    gi = tl.arange(0, GP)
    di = tl.arange(0, D)
    ri = tl.arange(0, R)
    gmask = gi < G
    lse = tl.load(LSE + row * G + gi, mask=gmask, other=0.0)
    s_row = S + (row * G + gi).to(tl.int64)[:, None] * Cs
    if EXACT_K:
        q = tl.load(Q + (row * G + gi).to(tl.int64)[:, None] * D + di[None, :], mask=gmask[:, None], other=0.0)
    acc = tl.zeros([GP, D], tl.float32)
    z = tl.zeros([GP], tl.float32)
    m = tl.full([GP], float("-inf"), tl.float32)
    if part == 0:
        L = tl.load(SEQ + b).to(tl.int32)
        slot = tl.load(SLOTS + b)
        sink_end = tl.minimum(sink, L)
        window_start = tl.maximum(sink_end, L - window)
        nhot = sink_end + (L - window_start)
        hot_base = (slot * HKV + h) * hot_rows
        wdiv = tl.maximum(window, 1)
        for t0 in range(0, nhot, R):
            t = t0 + ri
            ok = t < nhot
            pos = tl.where(t < sink_end, t, window_start + t - sink_end)
            hrow = tl.where(pos < sink, pos, sink + (pos - sink) % wdiv)
            hot_at = (hot_base + hrow).to(tl.int64)[:, None] * D + di[None, :]
            v = tl.load(VHOT + hot_at, mask=ok[:, None], other=0.0)
            if EXACT_K:
                s = _exact_scores(q, tl.load(KHOT + hot_at, mask=ok[:, None], other=0.0), ok, qk_scale)
            else:
                s = tl.load(s_row + pos[None, :], mask=gmask[:, None] & ok[None, :], other=float("-inf"))
            acc, z, m = _accumulate(acc, z, m, s, v, lse, RENORM)
    far_base = row.to(tl.int64) * top_n
    first = part * picks_per_part
    end = tl.minimum(first + picks_per_part, top_n)
    for t0 in tl.range(first, end, R, num_stages=STAGES):
        t = t0 + ri
        pos = tl.load(IDX + far_base + t, mask=t < end, other=-1)
        ok = pos >= 0
        if HAS_FAR_ROW:
            vrow = tl.load(FAR_ROW + far_base + t, mask=ok, other=0).to(tl.int64)
        else:
            vrow = far_base + t
        far_at = vrow[:, None] * W + di[None, :]
        if EXACT_K:
            v = tl.load(VFAR + far_at + D, mask=ok[:, None], other=0.0)
            s = _exact_scores(q, tl.load(VFAR + far_at, mask=ok[:, None], other=0.0), ok, qk_scale)
        else:
            v = tl.load(VFAR + far_at, mask=ok[:, None], other=0.0)
            if FAR_SCALED:
                blk = tl.load(BT + b * bt_stride + pos // BS, mask=ok, other=0).to(tl.int64)
                v_scale = tl.load(V_SCALES + (blk * HKV + h) * BS + pos % BS, mask=ok, other=0.0)
                v = (v.to(tl.float32) * v_scale[:, None]).to(VHOT.dtype.element_ty)
            s = tl.load(s_row + pos[None, :], mask=gmask[:, None] & ok[None, :], other=float("-inf"))
        acc, z, m = _accumulate(acc, z, m, s, v, lse, RENORM)
    q_rows = row * G + gi  # = b * (HKV * G) + h * G + gi
    if PARTS == 1:
        if RENORM:
            acc = acc / tl.where(z > 0, z, 1.0)[:, None]
        tl.store(OUT + q_rows[:, None] * D + di[None, :], acc.to(OUT.dtype.element_ty), mask=gmask[:, None])
    else:
        all_q_rows = tl.num_programs(0) * G
        tl.store(OUT_PART + (part * all_q_rows + q_rows).to(tl.int64)[:, None] * D + di[None, :], acc,
                 mask=gmask[:, None])
        tl.store(Z_PART + part * all_q_rows + q_rows, z, mask=gmask)
        if RENORM:
            tl.store(M_PART + part * all_q_rows + q_rows, m, mask=gmask)


@triton.jit
def _sparse_out_combine_kernel(OUT_PART, Z_PART, M_PART, OUT, all_q_rows, QB: tl.constexpr, D: tl.constexpr,
                               PARTS: tl.constexpr, RENORM: tl.constexpr):
    """grid (cdiv(all_q_rows, QB),): OUT [all_q_rows, D] = sum of the parts' OUT_PART (/ the sum of
    their Z_PART when renormalizing, each part's sums first brought to the parts' largest M_PART),
    in OUT's dtype."""
    qi = tl.program_id(0) * QB + tl.arange(0, QB)
    di = tl.arange(0, D)
    live = qi < all_q_rows
    acc = tl.zeros([QB, D], tl.float32)
    z = tl.zeros([QB], tl.float32)
    top = tl.full([QB], float("-inf"), tl.float32)
    if RENORM:
        for k in tl.static_range(PARTS):
            top = tl.maximum(top, tl.load(M_PART + k * all_q_rows + qi, mask=live, other=float("-inf")))
    ref = tl.where(top == float("-inf"), 0.0, top)
    for k in tl.static_range(PARTS):
        w = tl.full([QB], 1.0, tl.float32)
        if RENORM:
            w = tl.exp2(tl.load(M_PART + k * all_q_rows + qi, mask=live, other=float("-inf")) - ref)
        acc += w[:, None] * tl.load(OUT_PART + (k * all_q_rows + qi).to(tl.int64)[:, None] * D + di[None, :],
                                    mask=live[:, None], other=0.0)
        z += w * tl.load(Z_PART + k * all_q_rows + qi, mask=live, other=0.0)
    if RENORM:
        acc = acc / tl.where(z > 0, z, 1.0)[:, None]
    tl.store(OUT + qi.to(tl.int64)[:, None] * D + di[None, :], acc.to(OUT.dtype.element_ty), mask=live[:, None])


# ---------------------------------------------------------------------------------------------
# Host wrappers
# ---------------------------------------------------------------------------------------------
@dataclass
class KPassConfig:
    """Launch shape of the score pass and the selection (defaults: best measured on H100/H200, see
    benchmarks/notes/kcache_triton.md)."""

    split: int = 1024        # positions per K-pass CTA
    block_n: int = 128       # positions per K tile
    num_warps: int = 4
    num_stages: int = 3
    select_mode: str = "auto"  # "row": one CTA per row after the K pass; "fused": the last CTA of a row,
    #                            inside the K pass (see the module docstring); "split": each row by
    #                            split_parts CTAs after the K pass; "auto": fused from
    #                            FUSED_SELECT_ROWS_PER_SM rows per SM of a CUDA device up, else row
    late_rows: int = -1      # "fused": the last rows of the K pass to finish are selected as "split" after it
    #                          (their selections would otherwise run on after the K pass, one CTA each);
    #                          -1: LATE_ROWS where the longest context reaches LATE_ROWS_FROM_CONTEXT, else 0
    split_parts: int = 0     # CTAs per row of the split selection (0: SPLIT_CTAS_PER_SM per SM over the rows)
    sel_tile: int = 0        # positions per step of the keys pass over S (0: 256 per warp of a CTA of 8 warps or
    #                          more, 128 below: the keys pass 8-19% faster in 8 warps at 2048 than at 1024, H100)
    key_tile: int = 0        # keys per step of the passes over keys, a multiple of sel_tile (0: 256 per
    #                          warp; 4 warps with larger tiles need more than 128 registers)
    bins: int = 32           # bins per count pass (the interval narrows 16-32x a pass)
    scratch_extra: int = 2048  # scratch slots per row beyond top_n
    select_stages: int = 3   # software-pipelining depth of the selection passes
    select_warps: int = 8    # warps per CTA of the "row" selection kernel
    maxnreg: int = 128       # register cap of the selecting kernels on CUDA (0: the compiler's choice, ~160:
    #                          3 fused K-pass CTAs per SM instead of the plain K pass's 4; 128 spills ~nothing)
    fp8_dot: str = "float16"  # fp8 scoring keys: the dtype of the K pass's dot, "float16" (bf16 q, clamped
    #                          to float16's range, and the float8 tiles in float16: PTX on sm_89+ widens
    #                          e4m3 pairs to f16 in one instruction; the products stay exact; fp32 q keeps
    #                          the exact path) or "model" (q's dtype, the tiles widened to it): on an H100
    #                          float16 takes K pass + selection 6-12% less time, the same picks
    #                          (benchmarks/notes/kcache_triton.md, "fp8 scoring keys: the kernels").


@dataclass
class SelectResult:
    """scores [rows, G, Cmax] fp32 log2-domain (a view; row stride scores.stride(1)); lse [rows, G];
    idx [rows, top_n] int32 (ascending, -1 pad); split_max, split_sum [rows, G, splits] fp32: the K
    pass's softmax partials (max and sum of exp2 per split of `KPassConfig.split` positions)."""

    scores: torch.Tensor
    lse: torch.Tensor
    idx: torch.Tensor
    split_max: Optional[torch.Tensor] = None
    split_sum: Optional[torch.Tensor] = None


def score_and_select(q: torch.Tensor, k_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                     max_seq_len: int, spec: SelectionSpec, scale: float, cfg: Optional[KPassConfig] = None,
                     select: bool = True, idx_out: Optional[torch.Tensor] = None,
                     k_scales: Optional[torch.Tensor] = None) -> SelectResult:
    """Scores over all cached K and the per-KV-head top-n far positions.

    q [B, Hq, D]; k_cache [NB, Hkv, bs, D] (float8 with k_scales [NB, Hkv, bs] float32: fp8 scoring
    keys, the scores of k_cache * k_scales); block_tables [B, max_blocks] int32; seq_lens [B] int64
    (all on one device); max_seq_len >= max(seq_lens). With select=False only the scores and partials
    are computed (lse and idx are left unset): the K pass alone, for benchmarks. idx_out: a
    caller-owned int32 buffer of at least B * Hkv * max(top_n, 1) elements for idx.
    """
    cfg = cfg or KPassConfig()
    q = q.contiguous()  # the K pass reads q densely (a replicated KV head's gathered group is a strided view)
    B, Hq, D = q.shape
    _, Hkv, bs, _ = k_cache.shape
    G = Hq // Hkv
    rows = B * Hkv
    dev = q.device
    if cfg.select_mode not in ("auto", "fused", "row", "split"):
        raise ValueError(f"select_mode must be 'auto', 'row', 'fused' or 'split', not {cfg.select_mode!r}")
    if cfg.fp8_dot not in ("model", "float16"):
        raise ValueError(f"fp8_dot must be 'model' or 'float16', not {cfg.fp8_dot!r}")
    mode = _resolve_select_mode(cfg.select_mode, rows, dev) if select else "none"
    warps = cfg.select_warps if mode in ("row", "split") else cfg.num_warps
    ts, tk = selection_tiles(cfg, warps)
    cmax = max(1, int(max_seq_len))
    cs = triton.cdiv(cmax, tk) * tk          # row stride of S and of the keys: whole key tiles
    nsplit_max = triton.cdiv(cmax, cfg.split)
    top_n = max(0, int(spec.top_n))
    scr_cap = top_n + cfg.scratch_extra
    i32 = dict(dtype=torch.int32, device=dev)
    S = torch.empty(rows, G, cs, dtype=torch.float32, device=dev)
    MP = torch.empty(rows, G, nsplit_max, dtype=torch.float32, device=dev)
    LP = torch.empty_like(MP)
    lse = torch.empty(rows, G, dtype=torch.float32, device=dev)
    n_idx = rows * max(top_n, 1)
    idx = (torch.empty(n_idx, **i32) if idx_out is None else idx_out.view(-1)[:n_idx]).view(rows, max(top_n, 1))
    n_late = _late_row_count(cfg, mode, rows, cmax)
    in_kernel = mode in ("fused", "split")  # "row": `select_from_partials` has its own buffers
    keys = torch.empty(rows * cs if in_kernel else 1, **i32)
    scr_pos = torch.empty(rows * scr_cap if in_kernel else 1, **i32)
    scr_key = torch.empty_like(scr_pos)
    ktop = torch.empty(rows, dtype=torch.float32, device=dev)
    counters = torch.zeros(rows + 1 + n_late, **i32)  # tickets of the rows, DONE, tickets of the late rows
    late = torch.full((max(n_late, 1),), -1, **i32)
    bt = block_tables if block_tables.dtype == torch.int32 else block_tables.int()
    seq = seq_lens if seq_lens.dtype == torch.int64 else seq_lens.long()
    sel_shape = dict(G=G, GQ=triton.next_power_of_2(G), NSP=triton.next_power_of_2(nsplit_max), TS=ts, TK=tk,
                     NB=cfg.bins, NB1=COARSE_BINS, BPL=COARSE_BINS_PER_LOG2, NSTG=cfg.select_stages,
                     GROUP_SUM=spec.group_reduce == "sum")
    extra = dict(maxnreg=cfg.maxnreg) if (cfg.maxnreg and dev.type == "cuda") else {}
    fused_rows = mode == "fused" and n_late < rows
    _kpass_kernel[(nsplit_max, rows)](
        q, k_cache, k_scales if k_scales is not None else k_cache, bt, seq, S, MP, LP, lse, ktop, keys, idx,
        counters, scr_pos, scr_key, counters[rows:], late,
        scale * LOG2E, spec.sink_tokens, spec.recent_window, top_n, bt.stride(0), cs, nsplit_max, scr_cap, n_late,
        HKV=Hkv, GP=max(16, triton.next_power_of_2(G)), D=D, BS=bs, SPLIT=cfg.split, BLOCK_N=cfg.block_n,
        FUSED_SELECT=fused_rows, DEFER=n_late > 0, HAS_SCALES=k_scales is not None,
        F16_DOT=k_scales is not None and cfg.fp8_dot == "float16" and q.dtype == torch.bfloat16,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **sel_shape,
        **(extra if fused_rows else {}))
    if mode == "row":
        return select_from_partials(S[:, :, :cmax], MP, LP, seq, spec, cfg, Hkv, idx_out=idx)
    if n_late:
        parts = cfg.split_parts or max(1, min(triton.cdiv(SPLIT_CTAS_PER_SM * _sm_count_or(dev, 4), n_late),
                                              cs // tk))
        part_cap = min(scr_cap, triton.cdiv(cs // tk, parts) * tk)
        part_hist = torch.empty(n_late * parts * COARSE_BINS, **i32)
        part_cnt = torch.empty(n_late * parts, **i32)
        part_pos = torch.empty(n_late * parts * part_cap, **i32)
        part_key = torch.empty_like(part_pos)
        _split_keys_kernel[(parts, n_late)](
            seq, S, lse, ktop, keys, late, part_hist, spec.sink_tokens, spec.recent_window, top_n, cs, parts,
            HKV=Hkv, G=G, TS=ts, TK=tk, NB1=COARSE_BINS, BPL=COARSE_BINS_PER_LOG2, NSTG=cfg.select_stages,
            GROUP_SUM=spec.group_reduce == "sum", num_warps=warps, **extra)
        _split_select_kernel[(parts, n_late)](
            seq, ktop, keys, idx, late, part_hist, part_cnt, counters[rows + 1:], part_pos, part_key, scr_pos,
            scr_key, spec.sink_tokens, spec.recent_window, top_n, cs, parts, part_cap, scr_cap,
            HKV=Hkv, TK=tk, NB=cfg.bins, NB1=COARSE_BINS, BPL=COARSE_BINS_PER_LOG2, NSTG=cfg.select_stages,
            PARTS=triton.next_power_of_2(parts), num_warps=warps, **extra)
    return SelectResult(S[:, :, :cmax], lse, idx[:, :top_n], MP, LP)


def selection_tiles(cfg: KPassConfig, warps: int) -> tuple[int, int]:
    """(positions per step of the keys pass, keys per step of the passes over keys) of a selecting CTA
    of `warps` warps: `KPassConfig.sel_tile`, `key_tile` or their defaults."""
    ts = cfg.sel_tile or (256 if warps >= 8 else 128) * warps
    tk = cfg.key_tile or 256 * warps
    if tk % ts:
        raise ValueError(f"key_tile {tk} must be a multiple of sel_tile {ts}")
    return ts, tk


def _late_row_count(cfg: KPassConfig, mode: str, rows: int, max_seq_len: int) -> int:
    """How many rows the split selection takes after the K pass: all with "split"; with "fused" the
    last `cfg.late_rows` to finish (-1: LATE_ROWS from LATE_ROWS_FROM_CONTEXT positions up, else none)."""
    if mode == "split":
        return rows
    if mode != "fused":
        return 0
    late = cfg.late_rows if cfg.late_rows >= 0 else LATE_ROWS if max_seq_len >= LATE_ROWS_FROM_CONTEXT else 0
    return min(rows, late)


def _resolve_select_mode(select_mode: str, rows: int, device: torch.device) -> str:
    """"auto" -> "fused" where the rows fill FUSED_SELECT_ROWS_PER_SM per SM of a CUDA device, else "row"."""
    if select_mode != "auto":
        return select_mode
    if device.type != "cuda":
        return "row"
    return "fused" if rows >= FUSED_SELECT_ROWS_PER_SM * _sm_count(device) else "row"


def _sm_count_or(device: torch.device, default: int) -> int:
    return _sm_count(device) if device.type == "cuda" else default


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


_SM_COUNTS: dict[int, int] = {}


def select_from_partials(scores: torch.Tensor, split_max: torch.Tensor, split_sum: torch.Tensor,
                         seq_lens: torch.Tensor, spec: SelectionSpec, cfg: KPassConfig, num_kv_heads: int,
                         idx_out: Optional[torch.Tensor] = None) -> SelectResult:
    """The "row" selection alone, from a K pass's scores [rows, G, Cmax] (a view of a buffer whose row
    stride is a whole number of key tiles, as `score_and_select` makes it) and partials [rows, G,
    splits] of sequences with lengths seq_lens [B] (rows = B * num_kv_heads). Also replays a
    selection on saved inputs. idx_out: as in `score_and_select`."""
    rows, G, cmax = scores.shape
    cs = scores.stride(1)
    ts, tk = selection_tiles(cfg, cfg.select_warps)
    if cs % tk or scores.stride(2) != 1 or scores.stride(0) != G * cs:
        raise ValueError(f"scores need a row stride that is a multiple of the key tile {tk}, got {scores.stride()}")
    nsplit_max = split_max.shape[2]
    top_n = max(0, int(spec.top_n))
    scr_cap = top_n + cfg.scratch_extra
    dev = scores.device
    i32 = dict(dtype=torch.int32, device=dev)
    lse = torch.empty(rows, G, dtype=torch.float32, device=dev)
    n_idx = rows * max(top_n, 1)
    idx = (torch.empty(n_idx, **i32) if idx_out is None else idx_out.view(-1)[:n_idx]).view(rows, max(top_n, 1))
    keys = torch.empty(rows * cs, **i32)
    scr_pos = torch.empty(rows * scr_cap, **i32)
    scr_key = torch.empty_like(scr_pos)
    ktop = torch.empty(rows, dtype=torch.float32, device=dev)
    seq = seq_lens if seq_lens.dtype == torch.int64 else seq_lens.long()
    extra = dict(maxnreg=cfg.maxnreg) if (cfg.maxnreg and dev.type == "cuda") else {}
    _select_kernel[(rows,)](seq, scores, split_max, split_sum, lse, ktop, keys, idx, scr_pos, scr_key, spec.sink_tokens,
                            spec.recent_window, top_n, cs, nsplit_max, scr_cap, HKV=num_kv_heads, SPLIT=cfg.split,
                            G=G, GQ=triton.next_power_of_2(G), NSP=triton.next_power_of_2(nsplit_max), TS=ts,
                            TK=tk, NB=cfg.bins, NB1=COARSE_BINS, BPL=COARSE_BINS_PER_LOG2, NSTG=cfg.select_stages,
                            GROUP_SUM=spec.group_reduce == "sum", num_warps=cfg.select_warps, **extra)
    return SelectResult(scores, lse, idx[:, :top_n], split_max, split_sum)


def gather_far_rows_zero_copy(v_host: torch.Tensor, block_tables: torch.Tensor, idx: torch.Tensor,
                              out: Optional[torch.Tensor] = None, grid: Optional[int] = None,
                              rows_per_step: int = 32, num_warps: int = 4,
                              dst_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Zero-copy gather of the selected far V rows straight from pinned host memory (UVA).

    v_host [NB, Hkv, bs, D] pinned host (or device) memory; block_tables [B, max_blocks] int32 on the
    device; idx [B * Hkv, top_n] int32 positions (-1 = none). Returns out [B * Hkv, top_n, D] on the
    device (rows of -1 entries are left unwritten); with dst_rows [B * Hkv, top_n] int32, entry
    (r, j) goes to row dst_rows[r, j] of out [any, D] instead (a far-row cache's slots).
    """
    rows, top_n = idx.shape
    _, Hkv, bs, D = v_host.shape
    dev = block_tables.device
    if out is None:
        if dst_rows is not None:
            raise ValueError("dst_rows needs the out tensor it indexes")
        out = torch.empty(rows, top_n, D, dtype=v_host.dtype, device=dev)
    n = rows * top_n
    if n == 0:
        return out
    if grid is None:
        grid = 2 * torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 4
    grid = max(1, min(grid, triton.cdiv(n, rows_per_step)))
    bt = block_tables if block_tables.dtype == torch.int32 else block_tables.int()
    dst = dst_rows.contiguous() if dst_rows is not None else idx
    _gather_kernel[(grid,)](v_host, bt, idx.contiguous(), out, dst, n, bt.stride(0), top_n, HKV=Hkv, D=D, BS=bs,
                            R=rows_per_step, num_warps=num_warps, HAS_DST=dst_rows is not None)
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
                  far_rows: Optional[torch.Tensor] = None, parts: int = 2, rows_per_step: int = 64,
                  num_warps: int = 4, num_stages: int = 3, q: Optional[torch.Tensor] = None,
                  k_hot: Optional[torch.Tensor] = None, scale: float = 0.0,
                  v_scales: Optional[torch.Tensor] = None,
                  block_tables: Optional[torch.Tensor] = None) -> torch.Tensor:
    """o [B, Hq, D] from the selection, the fetched far rows vfar [rows, top_n, D] (or vfar [any, D]
    and far_rows [rows, top_n] int32: the row of each pick, e.g. a far-row cache's) and v_hot
    [slots, Hkv, sink + window, D]. With fp8 scoring keys (k_hot given: the exact K of the hot rows,
    shaped as v_hot; needs renormalize) the weights come from q [B, Hq, D] . exact K * scale, and a
    far row is K | V (vfar [rows, top_n, 2D] or [any, 2D]). With v_scales [NB, Hkv, bs] float32 and
    block_tables [B, max_blocks] int32 on the device (fp8 host values) the far rows are float8 and
    each pick is weighed as its row times its position's scale, read inside the kernel. Each row's
    picks are split over `parts` CTAs whose fp32 sums a second kernel adds (parts=1: one CTA a row,
    no second kernel). The defaults were the fastest launch on an H100 over the engine's 8K and 32K
    batches (benchmarks/notes/kcache_triton.md)."""
    rows, G, _ = sel.scores.shape
    _, Hkv, hot_rows, D = v_hot.shape
    B = rows // Hkv
    top_n = sel.idx.shape[1]
    dev = sel.scores.device
    exact_k = k_hot is not None
    if exact_k and (q is None or not spec.renormalize):
        raise ValueError("sparse_output with k_hot (fp8 scoring keys) needs q and spec.renormalize")
    if exact_k and v_scales is not None:
        raise ValueError("sparse_output takes v_scales (fp8 host values) or k_hot (fp8 scoring keys), not both")
    if (v_scales is None) != (block_tables is None):
        raise ValueError("sparse_output needs v_scales and block_tables together (fp8 host values)")
    if out is None:
        out = torch.empty(B, num_q_heads, D, dtype=dtype or v_hot.dtype, device=dev)
    idx = sel.idx.contiguous()
    vfar = vfar if top_n else torch.empty(rows, 1, 2 * D if exact_k else D, dtype=v_hot.dtype, device=dev)
    scaled = v_scales is not None and top_n > 0
    # sel.lse and idx: placeholders the kernel does not read without scales
    scales, bt = (v_scales.contiguous(), block_tables.int().contiguous()) if scaled else (sel.lse, idx)
    bs = v_scales.shape[2] if scaled else 1
    seq = seq_lens if seq_lens.dtype == torch.int64 else seq_lens.long()
    slots = hot_slots if hot_slots.dtype == torch.int64 else hot_slots.long()
    vhot = v_hot if hot_rows else torch.empty(1, Hkv, 1, D, dtype=v_hot.dtype, device=dev)
    khot = k_hot if exact_k and hot_rows else vhot  # vhot: a placeholder the kernel does not read
    far = far_rows.contiguous() if far_rows is not None else idx
    parts = max(1, min(parts, triton.cdiv(top_n, rows_per_step)))
    picks_per_part = triton.cdiv(triton.cdiv(top_n, parts), rows_per_step) * rows_per_step
    all_q_rows = rows * G
    out_part = torch.empty(parts if parts > 1 else 1, all_q_rows if parts > 1 else 1, D, dtype=torch.float32,
                           device=dev)
    z_part = torch.empty(out_part.shape[:2], dtype=torch.float32, device=dev)
    m_part = torch.empty_like(z_part) if spec.renormalize and parts > 1 else z_part  # z_part: unread placeholder
    _sparse_out_kernel[(rows, parts)](sel.scores, sel.lse, idx, vfar, far, scales, bt, vhot,
                                      q.contiguous() if exact_k else vhot, khot, seq, slots, out, out_part, z_part,
                                      m_part,
                                      spec.sink_tokens, spec.recent_window,
                                      top_n, sel.scores.stride(1), max(hot_rows, 1), picks_per_part, scale * LOG2E,
                                      bt.stride(0), HKV=Hkv, G=G, GP=max(16, triton.next_power_of_2(G)), D=D,
                                      R=rows_per_step, RENORM=spec.renormalize, HAS_FAR_ROW=far_rows is not None,
                                      PARTS=parts, STAGES=num_stages, EXACT_K=exact_k, W=2 * D if exact_k else D,
                                      FAR_SCALED=scaled, BS=bs, num_warps=num_warps)
    if parts > 1:
        q_block = 16
        _sparse_out_combine_kernel[(triton.cdiv(all_q_rows, q_block),)](out_part, z_part, m_part, out, all_q_rows,
                                                                        QB=q_block, D=D, PARTS=parts,
                                                                        RENORM=spec.renormalize, num_warps=4)
    return out


def kcache_decode_triton(q: torch.Tensor, k_cache: torch.Tensor, v_host: torch.Tensor, v_hot: torch.Tensor,
                         block_tables: torch.Tensor, seq_lens: torch.Tensor, hot_slots: torch.Tensor,
                         spec: SelectionSpec, scale: float, max_seq_len: Optional[int] = None,
                         fetch: str = "zero_copy", cfg: Optional[KPassConfig] = None,
                         block_tables_cpu: Optional[torch.Tensor] = None,
                         out: Optional[torch.Tensor] = None, gather_grid: Optional[int] = None,
                         row_cache: Optional[FarRowCacheLayer] = None, k_scales: Optional[torch.Tensor] = None,
                         k_hot: Optional[torch.Tensor] = None, v_scales: Optional[torch.Tensor] = None) -> torch.Tensor:
    """KCache decode attention, one token per sequence (arguments as `kcache_decode`).

    fetch: "zero_copy" (Triton gather from pinned host memory through UVA; falls back to
    "copy_engine" when v_host is not pinned) or "copy_engine"; gather_grid: CTAs of the zero-copy
    gather (None: 2 per SM); row_cache: the far rows through the layer's far-row cache (sequence b
    in cache slot hot_slots[b]), which gathers only the picks it does not hold. With fp8 scoring
    keys: k_cache float8 with k_scales [NB, Hkv, bs] float32, v_host the host rows K | V [NB, Hkv,
    bs, 2D] (a row cache's rows too), k_hot the exact K of the hot rows (shaped as v_hot). With fp8
    host values: v_host (and a row cache's rows) float8, v_scales [NB, Hkv, bs] float32 on the device,
    each pick's scale read by the output kernel. Returns o [B, Hq, D] in q's dtype.
    """
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max().item())
    q = q.contiguous()  # the kernels read q densely
    seq_dev = seq_lens.to(q.device)
    bt_dev = block_tables.to(q.device)
    sel = score_and_select(q, k_cache, bt_dev, seq_dev, max_seq_len, spec, scale, cfg, k_scales=k_scales)
    top_n = sel.idx.shape[1]

    zero_copy = fetch == "zero_copy" and (v_host.device == q.device or (v_host.is_pinned() and q.is_cuda)
                                          or not q.is_cuda)
    slots_dev = hot_slots.to(q.device)
    far_rows = None
    if top_n == 0:
        vfar = None
    elif row_cache is not None:  # misses from host memory into their cache slots; every far row read from the cache
        far_rows, miss_idx = assign_rows(row_cache.cache, row_cache.sparse, slots_dev, sel.idx)
        vfar = row_cache.cache.rows[row_cache.sparse].view(-1, v_host.shape[-1])
        if zero_copy:
            gather_far_rows_zero_copy(v_host, bt_dev, miss_idx, out=vfar, grid=gather_grid, dst_rows=far_rows)
        else:
            missed = miss_idx.view(-1) >= 0
            fetched = gather_far_rows_copy_engine(v_host, block_tables_cpu if block_tables_cpu is not None
                                                  else block_tables.cpu(), miss_idx)
            vfar[far_rows.view(-1)[missed].long()] = fetched.view(-1, vfar.shape[-1])[missed]
    elif zero_copy:
        vfar = gather_far_rows_zero_copy(v_host, bt_dev, sel.idx, grid=gather_grid)
    else:
        vfar = gather_far_rows_copy_engine(v_host, block_tables_cpu if block_tables_cpu is not None
                                           else block_tables.cpu(), sel.idx)
    return sparse_output(sel, vfar, v_hot, seq_dev, slots_dev, spec, q.shape[1], out=out, dtype=q.dtype,
                         far_rows=far_rows, q=q if k_hot is not None else None, k_hot=k_hot, scale=scale,
                         v_scales=v_scales, block_tables=bt_dev if v_scales is not None else None)

#!/usr/bin/env python3
"""Where one CTA's exact top-N selection of a row spends its time, on the GPU: the "row" selection
(`triton_kcache._row_select`) rebuilt from the same helpers with the SM clock read between its
phases, at batch x context points of the Llama-3-8B attention shape (bf16, sink 4, window 128):

    python benchmarks/selection_phases.py OUT.json [--points 21x32768,72x8192] [--top-n 1024,256]

Phases per row (medians over the rows, us at the clock rate measured in the same launch):
bounds (lse and the key bound from the K pass's partials), keys (one pass over the row's scores:
its keys and coarse histogram), collect (the candidates of the coarse bins down to b* into the
scratch), finish (count passes down to the n-th key and the ordered write), fallback (narrowing
over the whole row, where the finish could not). Variants (VARIANTS): the library's launch, other
key tiles (`KPassConfig.sel_tile`, `key_tile`) and warps, and the candidates' copy scanning each
tile as [TK / PT, PT] keys (`_collect`'s ROW; the library's is `triton_kcache.SCAN_ROW`; PT = 1: one
flat scan of the tile, as the library did before). Each variant's positions are checked equal to
the library's "row" selection; its launch is timed too (stream events, median of 20).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from kcache_dist.kcache import triton_kcache as tk  # noqa: E402
from kcache_dist.kcache.triton_kcache import (_coarse_edge, _coarse_pick, _collect, _far_range,  # noqa: E402
                                              _guard_selected, _keys_and_coarse, _row_bounds, _select_by_narrowing,
                                              _select_candidates)
from kcache_dist.kcache.selection import SelectionSpec  # noqa: E402

from kernels import D, DT, HKV, HQ, SINK, WINDOW, bench, tables, warm_up  # noqa: E402

PHASES = ("bounds", "keys", "collect", "finish", "fallback")
ROW = int(tk.SCAN_ROW)
VARIANTS = {  # name -> (KPassConfig fields, keys a thread scans in a row in the candidates' copy: `_collect`'s ROW)
    "library": ({}, ROW), "flat_scan": ({}, 1), "rows_of8": ({}, 8), "sel_tile1024": (dict(sel_tile=1024), ROW),
    "key_tile4096": (dict(key_tile=4096), ROW), "warps4": (dict(select_warps=4), ROW),
    "warps4_flat_scan": (dict(select_warps=4), 1)}


@triton.jit
def _clock(x):
    """The SM's cycle counter (x: any scalar, only to give the asm an operand)."""
    return tl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l,r", [x], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _nanoseconds(x):
    """The GPU's global nanosecond timer."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [x], dtype=tl.int64, is_pure=False,
                                     pack=1)


@triton.jit
def _phased_select_kernel(SEQ, S, MP, LP, LSE, KTOP, KEYS, IDX, SCR_POS, SCR_KEY, T, sink, window, top_n, Cs,
                          NSPLIT_MAX, scr_cap, HKV: tl.constexpr, G: tl.constexpr, GQ: tl.constexpr,
                          SPLIT: tl.constexpr, NSP: tl.constexpr, TS: tl.constexpr, TK: tl.constexpr,
                          NB: tl.constexpr, NB1: tl.constexpr, BPL: tl.constexpr, NSTG: tl.constexpr,
                          PT: tl.constexpr):
    """`_select_kernel` (group max, rows with more far positions than top_n) with T [rows, 8] int64:
    clocks after each phase (0-5), then the global ns timer at the start and end (6, 7)."""
    row = tl.program_id(0)
    t = T + row * 8
    tl.store(t + 6, _nanoseconds(row))
    tl.store(t + 0, _clock(row))
    L = tl.load(SEQ + row // HKV).to(tl.int32)
    nsplit = tl.cdiv(L, SPLIT)
    ktop = _row_bounds(MP, LP, LSE, KTOP, row, nsplit, NSPLIT_MAX, G, GQ, NSP, False, "")
    sink_end, window_start, far, a0, a1 = _far_range(L, sink, window, TK)
    out = IDX + row.to(tl.int64) * top_n
    _guard_selected(out, top_n, sink_end, window_start, True, TK)
    tl.debug_barrier()
    tl.store(t + 1, _clock(row))
    krow = KEYS + row.to(tl.int64) * Cs
    coarse = _keys_and_coarse(S + (row * G).to(tl.int64) * Cs, krow, a0, a1, sink_end, window_start,
                              LSE + row * G, ktop, Cs, G, TS, NB1, BPL, NSTG, False, "")
    tl.debug_barrier()
    tl.store(t + 2, _clock(row))
    bstar, ncand = _coarse_pick(coarse, top_n, NB1)
    SP = SCR_POS + row.to(tl.int64) * scr_cap
    SK = SCR_KEY + row.to(tl.int64) * scr_cap
    fast = (bstar < NB1 - 1) & (ncand <= scr_cap)
    cnt = 0
    if fast:
        cnt = _collect(krow, a0, a1, _coarse_edge(ktop, bstar, NB1, BPL), SP, SK, scr_cap, TK, NSTG, PT)
    tl.debug_barrier()
    tl.store(t + 3, _clock(row))
    done = 0
    if fast:
        done = _select_candidates(SP, SK, cnt, ktop, bstar, out, top_n, scr_cap, TK, NB, NB1, BPL, NSTG)
    tl.debug_barrier()
    tl.store(t + 4, _clock(row))
    if done == 0:
        _select_by_narrowing(krow, SP, SK, out, a0, a1, far, top_n, scr_cap, TK, NB, NSTG)
    tl.debug_barrier()
    _guard_selected(out, top_n, sink_end, window_start, False, TK)
    tl.debug_barrier()
    tl.store(t + 5, _clock(row))
    tl.store(t + 7, _nanoseconds(row))


def phased_select(sel, seq_lens, spec: SelectionSpec, cfg: tk.KPassConfig, rows_of: int):
    """(idx [rows, top_n], T [rows, 8], launch): `_phased_select_kernel`'s outputs over a K pass's
    result `sel`, and the function that launches it."""
    S, MP, LP = sel.scores, sel.split_max, sel.split_sum
    rows, G, _ = S.shape
    cs = S.stride(1)
    ts, tkk = tk.selection_tiles(cfg, cfg.select_warps)
    if cs % tkk:
        raise SystemExit(f"context {S.shape[2]}: its score rows ({cs}) are not whole key tiles of {tkk}; "
                         "take a multiple of 4096")
    scr_cap = spec.top_n + cfg.scratch_extra
    i32 = dict(dtype=torch.int32, device=S.device)
    idx = torch.empty(rows, spec.top_n, **i32)
    T = torch.zeros(rows, 8, dtype=torch.int64, device=S.device)
    args = (seq_lens, S, MP, LP, torch.empty(rows, G, dtype=torch.float32, device=S.device),
            torch.empty(rows, dtype=torch.float32, device=S.device), torch.empty(rows * cs, **i32), idx,
            torch.empty(rows * scr_cap, **i32), torch.empty(rows * scr_cap, **i32), T,
            spec.sink_tokens, spec.recent_window, spec.top_n, cs, MP.shape[2], scr_cap)
    meta = dict(HKV=HKV, G=G, GQ=triton.next_power_of_2(G), SPLIT=cfg.split, NSP=triton.next_power_of_2(MP.shape[2]),
                TS=ts, TK=tkk, NB=cfg.bins, NB1=tk.COARSE_BINS, BPL=tk.COARSE_BINS_PER_LOG2, NSTG=cfg.select_stages,
                PT=rows_of, num_warps=cfg.select_warps, maxnreg=cfg.maxnreg)

    def launch():
        _phased_select_kernel[(rows,)](*args, **meta)
    return idx, T, launch


def phase_point(B: int, C: int, top_ns, variants, dev) -> dict:
    gen = torch.Generator().manual_seed(B * 7 + C)
    bt, sl, _ = tables(B, C, 256, dev, gen)
    kc = torch.randn(B * (C // 256), HKV, 256, D, device=dev, dtype=DT)
    q = torch.randn(B, HQ, D, device=dev, dtype=DT)
    point = {"B": B, "C": C}
    for top_n in top_ns:
        spec = SelectionSpec(top_n, SINK, WINDOW, True, "max")
        sel = tk.score_and_select(q, kc, bt, sl, C, spec, D ** -0.5, select=False)
        want = tk.select_from_partials(sel.scores, sel.split_max, sel.split_sum, sl, spec, tk.KPassConfig(), HKV).idx
        for name in variants:
            fields, rows_of = VARIANTS[name]
            idx, T, launch = phased_select(sel, sl, spec, tk.KPassConfig(**fields), rows_of)
            warm_up(launch)
            ms = bench(launch)
            launch()
            torch.cuda.synchronize()
            t = T.double().cpu()
            ns_per_cycle = float((t[:, 7] - t[:, 6]).sum() / (t[:, 5] - t[:, 0]).sum())
            us = {ph: statistics.median(((t[:, i + 1] - t[:, i]) * ns_per_cycle / 1e3).tolist())
                  for i, ph in enumerate(PHASES)}
            entry = {"kernel_ms": ms, "ns_per_cycle": ns_per_cycle,
                     "median_phase_us": us, "row_us_median": statistics.median(((t[:, 5] - t[:, 0])
                                                                                * ns_per_cycle / 1e3).tolist()),
                     "idx_equal_library": bool(torch.equal(idx, want))}
            point[f"n{top_n}_{name}"] = entry
            print(f"B{B} C{C} n{top_n} {name:16s} kernel {ms * 1e3:6.1f} us, row "
                  f"{entry['row_us_median']:6.1f} us: " + " ".join(f"{k} {v:5.1f}" for k, v in us.items())
                  + f" same={entry['idx_equal_library']}", flush=True)
    return point


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="JSON path")
    ap.add_argument("--points", default="21x32768,72x8192", help="BxC pairs, comma separated")
    ap.add_argument("--top-n", default="1024,256", help="top_n values, comma separated")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma separated, of {', '.join(VARIANTS)}")
    args = ap.parse_args()
    dev = torch.device("cuda")
    top_ns = [int(v) for v in args.top_n.split(",")]
    points = [tuple(int(v) for v in p.split("x")) for p in args.points.split(",")]
    result = {"card": torch.cuda.get_device_name(dev), "hq": HQ, "hkv": HKV, "d": D,
              "points": [phase_point(B, C, top_ns, args.variants.split(","), dev) for B, C in points]}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

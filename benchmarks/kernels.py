#!/usr/bin/env python3
"""KCache decode kernels on one GPU: K score pass + selection, V fetch, whole decode attention of one
layer vs dense, the V fetch beside the K pass on two streams, and the same stages with fp8 scoring keys.

    PYTHONUNBUFFERED=1 python benchmarks/kernels.py --out DIR [--points 32x8192,128x32768] [--quick]

Shape: Llama-3-8B attention (32 q heads, 8 KV heads, head_dim 128, bf16); paged K cache
[num_blocks, 8, bs, 128] in HBM, V pool with the same layout in pinned host memory (the library's
HostPool, advised for transparent huge pages; a second pool of 4 KiB pages for the gather
comparison), block tables a random permutation of the pool, context lengths C - U[0, 48].
Selection modes fused / row at top_n 256 and 1024 (and config variants), each checked against
torch.topk on the same scores. Baselines measured in the same run: D2D copy GB/s (bytes read + written) and bulk
pinned H2D GB/s. Writes DIR/kernels.json and PNG plots; prints a table last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kcache_dist.cache.host_pool import HostPool  # noqa: E402
from kcache_dist.kcache.fp8_keys import FP8_DTYPE, quantize_rows  # noqa: E402
from kcache_dist.kcache.selection import SelectionSpec  # noqa: E402
from kcache_dist.kcache.triton_kcache import (KPassConfig, far_row_ids, gather_far_rows_zero_copy,  # noqa: E402
                                              score_and_select, sparse_output)

HQ, HKV, D = 32, 8, 128
G = HQ // HKV
SINK, WINDOW = 4, 128
DT = torch.bfloat16
R = {"errors": [], "points": {}}


def log(*a):
    print(*a, flush=True)


def bench(fn, reps=20, warmup=3):
    """Median device time (ms) between events around fn."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    st = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    en = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        st[i].record()
        fn()
        en[i].record()
    torch.cuda.synchronize()
    ts = sorted(s.elapsed_time(e) for s, e in zip(st, en))
    return ts[len(ts) // 2]


def warm_up(fn, seconds=0.3):
    """Run fn for `seconds` before timing: on a freshly started GPU the first point's first timing ran
    slow (clocks still rising) while the same kernel timed right in a CUDA graph."""
    torch.cuda.synchronize()
    t0 = time.time()
    while time.time() - t0 < seconds:
        fn()
        torch.cuda.synchronize()


def graph_bench(fn, reps=20):
    """Median device time (ms) of fn captured in a CUDA graph (no Python launch overhead)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return bench(g.replay, reps=reps)


def wall(fn, reps=10, warmup=2):
    """Median wall time (ms) of fn followed by a device synchronize (for paths with host work)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    return ts[len(ts) // 2]


def guard(name, fn):
    try:
        return fn()
    except Exception as ex:  # keep going: one failure must not end the run
        msg = f"{name}: {type(ex).__name__}: {str(ex)[:300]}"
        log("ERROR", msg)
        traceback.print_exc()
        R["errors"].append(msg)
        return None


def two_streams(fa, fb, sa, sb):
    def f():
        cur = torch.cuda.current_stream()
        sa.wait_stream(cur)
        sb.wait_stream(cur)
        with torch.cuda.stream(sa):
            fa()
        with torch.cuda.stream(sb):
            fb()
        cur.wait_stream(sa)
        cur.wait_stream(sb)
    return f


def baselines(dev):
    x = torch.empty(1 << 31, dtype=torch.uint8, device=dev).random_(0, 255)
    y = torch.empty_like(x)
    d2d = 2 * x.numel() / bench(lambda: y.copy_(x)) / 1e6
    del x, y
    h = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
    d = torch.empty(1 << 30, dtype=torch.uint8, device=dev).random_(0, 255)
    h.copy_(d)
    h2d = h.numel() / bench(lambda: d.copy_(h, non_blocking=True), reps=10) / 1e6
    del h, d
    torch.cuda.empty_cache()
    log(f"baseline: D2D copy {d2d:.0f} GB/s (read+write), pinned H2D 1 GiB {h2d:.1f} GB/s")
    return {"d2d_GBps": d2d, "h2d_GBps": h2d}


def thp_state():
    """Transparent huge page settings and the system's AnonHugePages (kB)."""
    st = {}
    for name in ("enabled", "defrag"):
        try:
            with open(f"/sys/kernel/mm/transparent_hugepage/{name}") as f:
                st[name] = f.read().strip()
        except OSError:
            st[name] = None
    try:
        with open("/proc/meminfo") as f:
            st["AnonHugePages_kB"] = next(int(line.split()[1]) for line in f if line.startswith("AnonHugePages:"))
    except (OSError, StopIteration):
        st["AnonHugePages_kB"] = None
    return st


class Pools:
    """One device K buffer and two pinned host V buffers (HostPool with and without transparent huge
    pages) for the largest point; views per point."""

    def __init__(self, max_tokens, dev):
        n = max_tokens * HKV * D
        self.k = torch.empty(n, dtype=DT, device=dev).normal_()
        R["thp"] = {"before": thp_state()}
        self.host = {}
        self.v = {}
        for name, huge in (("thp", True), ("4k", False)):
            t0 = time.time()
            pool = HostPool(n * 2, dev, huge_pages=huge)
            self.host[name] = pool
            self.v[name] = pool.take((n,), DT)
            R["thp"][f"pool_{name}"] = {"advised": pool.huge_pages, "huge_page_bytes": pool.huge_page_bytes(),
                                        "bytes": n * 2, "create_s": time.time() - t0}
        R["thp"]["after"] = thp_state()
        log(f"host V pools: {R['thp']}")
        tmp = torch.empty(1 << 28, dtype=DT, device=dev)
        for o in range(0, n, tmp.numel()):
            m = min(tmp.numel(), n - o)
            tmp[:m].normal_()
            for v in self.v.values():
                v[o:o + m].copy_(tmp[:m])
        del tmp
        torch.cuda.synchronize()

    def views(self, num_blocks, bs, which="thp"):
        n = num_blocks * HKV * bs * D
        return self.k[:n].view(num_blocks, HKV, bs, D), self.v[which][:n].view(num_blocks, HKV, bs, D)


def tables(B, C, bs, dev, gen):
    mb = C // bs
    bt = torch.randperm(B * mb, generator=gen).to(torch.int32).view(B, mb)
    lens = C - torch.randint(0, 49, (B,), generator=gen)
    return bt.to(dev), lens.to(dev), lens.tolist()


def random_idx(lens, top_n, gen):
    """Sorted random far positions [B*HKV, top_n] (a stand-in selection for fetch timing)."""
    rows = []
    for n in lens:
        far = n - SINK - WINDOW
        for _ in range(HKV):
            rows.append(torch.randperm(far, generator=gen)[:top_n].sort().values + SINK)
    return torch.stack(rows).to(torch.int32)


def check_selection(sel, sl, spec):
    """Selected sets vs torch.topk of the group keys computed from the kernel's own S and lse (the same
    fp32 numbers: sets may differ only among equal keys); lse vs torch logsumexp over S."""
    torch.cuda.synchronize()
    S = sel.scores
    pos = torch.arange(S.shape[-1], device=S.device)
    lens = sl.repeat_interleave(HKV)
    valid = pos[None, :] < lens[:, None]
    Sm = S.masked_fill(~valid[:, None, :], float("-inf"))
    lse = torch.logsumexp(Sm * math.log(2), -1) / math.log(2)
    x = Sm - sel.lse[..., None]
    key = x.amax(1) if spec.group_reduce == "max" else torch.log2(torch.exp2(x).sum(1))
    far = (pos[None, :] >= SINK) & (pos[None, :] < lens[:, None] - WINDOW)
    key = key.masked_fill(~far, float("-inf"))
    top = key.topk(spec.top_n, -1)
    got = sel.idx.long()
    same = (got.sort(-1).values == top.indices.sort(-1).values).all(-1)
    # a row whose set differs is still a top-n set if every chosen key >= the n-th key >= every other key
    kth = top.values[:, -1]
    others = key.scatter(1, got, float("-inf")).amax(-1)
    only_ties = (key.gather(1, got).amin(-1) >= kth) & (others <= kth) & (got.diff(dim=-1) > 0).all(-1)
    return {"rows": int(same.numel()), "rows_same_set": int(same.sum().item()),
            "rows_differing_only_in_ties": int((~same & only_ties).sum().item()),
            "lse_max_abs_err": (sel.lse - lse).abs().max().item()}


def run_point(B, C, pools, base, dev, opts, streams):
    key = f"B{B}_C{C}"
    pt = {"B": B, "C": C}
    R["points"][key] = pt
    gen = torch.Generator().manual_seed(B * 100003 + C)
    q = torch.randn(B, HQ, D, device=dev, dtype=DT)
    scale = D ** -0.5
    d2d, h2d = base["d2d_GBps"], base["h2d_GBps"]
    s1, s2 = streams
    lay = {}
    for bs in (256, 16):
        bt, sl, lens = tables(B, C, bs, dev, gen)
        kc, vp = pools.views(B * (C // bs), bs)
        lay[bs] = (bt, sl, lens, kc, vp)
    bt, sl, lens, kc, vp = lay[256]
    kbytes = sum(lens) * HKV * D * 2
    pt["k_bytes"] = kbytes
    log(f"\n=== B={B} C={C}: K {kbytes / 1e9:.3f} GB (floor {kbytes / d2d / 1e6:.3f} ms at D2D)")

    # ---- (ii) K score pass (+ selection)
    kp = {}
    pt["kpass"] = kp

    def kpass_part():
        spec = SelectionSpec(256, SINK, WINDOW, True, "max")
        warm_up(lambda: score_and_select(q, kc, bt, sl, C, spec, scale, select=False))
        t = bench(lambda: score_and_select(q, kc, bt, sl, C, spec, scale, select=False))
        kp["kpass_only_ms"] = t
        kp["kpass_only_pct_d2d"] = 100 * kbytes / t / 1e6 / d2d
        log(f"  K pass alone: {t:.3f} ms ({kbytes / t / 1e6:.0f} GB/s, {kp['kpass_only_pct_d2d']:.1f}% of D2D)")
        for top_n in opts["top_ns"]:
            for reduce in ("max", "sum"):
                spec = SelectionSpec(top_n, SINK, WINDOW, True, reduce)
                for var, cfg in opts["variants"].items():
                    if reduce == "sum" and var not in opts["sum_variants"]:
                        continue
                    t = bench(lambda: score_and_select(q, kc, bt, sl, C, spec, scale, cfg))
                    name = f"n{top_n}_{reduce}_{var}"
                    kp[name] = {"ms": t, "GBps": kbytes / t / 1e6, "pct_d2d": 100 * kbytes / t / 1e6 / d2d,
                                "select_ms": t - kp["kpass_only_ms"]}
                    log(f"  K pass + select {name}: {t:.3f} ms ({kbytes / t / 1e6:.0f} GB/s, "
                        f"{kp[name]['pct_d2d']:.1f}% of D2D; selection +{1e3 * (t - kp['kpass_only_ms']):.1f} us)")
                    if opts["check"] and reduce == "max" and var in opts["check_variants"]:
                        kp[f"check_{name}"] = c = check_selection(score_and_select(q, kc, bt, sl, C, spec, scale, cfg),
                                                                  sl, spec)
                        log(f"    selection check vs torch.topk on the same S and lse: {c}")
        # CUDA-graph timings (launch gaps excluded)
        spec = SelectionSpec(256, SINK, WINDOW, True, "max")
        g_only = guard("graph kpass", lambda: graph_bench(lambda: score_and_select(q, kc, bt, sl, C, spec, scale,
                                                                                  select=False)))
        g_sel = guard("graph kpass+select", lambda: graph_bench(lambda: score_and_select(q, kc, bt, sl, C, spec,
                                                                                        scale)))
        kp["graph_kpass_only_ms"], kp["graph_n256_max_default_ms"] = g_only, g_sel
        log(f"  CUDA graph: K pass {g_only or float('nan'):.3f}, K pass + select (default) "
            f"{g_sel or float('nan'):.3f} ms")
    guard(f"{key} kpass", kpass_part)

    # ---- (i) V fetch alone
    fetch = {}
    pt["fetch"] = fetch
    top_n = 256
    vbytes = B * HKV * top_n * D * 2
    pt["v_sel_bytes"] = vbytes
    vout = torch.empty(B * HKV, top_n, D, dtype=DT, device=dev)

    def fetch_part():
        # zero-copy from the huge-page pool ("zc") and from the 4 KiB-page pool ("zc4k"), same indices
        for pool, bs, n_sel in (("thp", 256, top_n), ("4k", 256, top_n), ("thp", 16, top_n), ("thp", 256, 1024),
                                ("4k", 256, 1024)):
            btb, slb, lensb, kcb, _ = lay[bs]
            vpb = pools.views(B * (C // bs), bs, pool)[1]
            nbytes = B * HKV * n_sel * D * 2
            out = vout if n_sel == top_n else torch.empty(B * HKV, n_sel, D, dtype=DT, device=dev)
            g2 = torch.Generator().manual_seed(B * 7 + C + bs + n_sel)   # the same index sets for both pools
            sets = [random_idx(lensb, n_sel, g2).to(dev) for _ in range(3)]
            rot = [0]
            for grid in opts["grids"] if n_sel == top_n else opts["grids"][-1:]:
                def f(grid=grid):
                    rot[0] = (rot[0] + 1) % len(sets)
                    gather_far_rows_zero_copy(vpb, btb, sets[rot[0]], out=out, grid=grid)
                t = bench(f)
                name = f"{'zc' if pool == 'thp' else 'zc4k'}_bs{bs}{'' if n_sel == top_n else f'_n{n_sel}'}_g{grid}"
                fetch[name] = {"ms": t, "GBps": nbytes / t / 1e6, "pct_h2d": 100 * nbytes / t / 1e6 / h2d}
                log(f"  zero-copy gather {name} ({'huge' if pool == 'thp' else '4 KiB'} pages, top {n_sel}): "
                    f"{t:.3f} ms ({nbytes / t / 1e6:.1f} GB/s, {100 * nbytes / t / 1e6 / h2d:.0f}% of H2D)")
        # copy engine: H2D of already staged rows; and the whole host path (indices D2H, CPU gather, H2D)
        btb, slb, lensb, kcb, vpb = lay[256]
        stage = torch.empty(B * HKV * top_n, D, dtype=DT, pin_memory=True)
        t = bench(lambda: vout.view(-1, D).copy_(stage, non_blocking=True))
        fetch["ce_h2d_staged"] = {"ms": t, "GBps": vbytes / t / 1e6, "pct_h2d": 100 * vbytes / t / 1e6 / h2d}
        idx = random_idx(lensb, top_n, gen).to(dev)
        bt_cpu = btb.cpu()
        vflat = vpb.view(-1, D)

        def host_path():
            ids = far_row_ids(bt_cpu, idx.cpu(), HKV, 256)
            torch.index_select(vflat, 0, ids, out=stage)
            vout.view(-1, D).copy_(stage, non_blocking=True)
        t2 = wall(host_path)
        fetch["ce_cpu_gather_h2d_wall"] = {"ms": t2, "GBps": vbytes / t2 / 1e6, "pct_h2d": 100 * vbytes / t2 / 1e6 / h2d}
        log(f"  copy engine: staged H2D {t:.3f} ms ({vbytes / t / 1e6:.1f} GB/s); indices->host + CPU gather "
            f"({torch.get_num_threads()} threads) + H2D {t2:.3f} ms wall ({vbytes / t2 / 1e6:.1f} GB/s)")
        pt["_stage"] = None
        return stage, host_path
    fp = guard(f"{key} fetch", fetch_part)
    pt.pop("_stage", None)

    # ---- (iii) whole decode attention of one layer: KCache vs dense
    dec = {}
    pt["decode"] = dec
    spec = SelectionSpec(256, SINK, WINDOW, True, "max")
    nslots = B
    vhot = torch.randn(nslots, HKV, SINK + WINDOW, D, dtype=DT, device=dev)
    slots = torch.arange(B, device=dev)

    def decode_part():
        def kcache_zc():
            sel = score_and_select(q, kc, bt, sl, C, spec, scale)
            vf = gather_far_rows_zero_copy(vp, bt, sel.idx, out=vout)
            return sparse_output(sel, vf, vhot, sl, slots, spec, HQ)
        dec["kcache_zero_copy_ms"] = bench(kcache_zc)
        dec["kcache_zero_copy_graph_ms"] = guard("graph decode", lambda: graph_bench(kcache_zc))
        sel = score_and_select(q, kc, bt, sl, C, spec, scale)
        dec["sparse_output_ms"] = bench(lambda: sparse_output(sel, vout, vhot, sl, slots, spec, HQ))
        if fp is not None:
            stage, host_path = fp
            bt_cpu = bt.cpu()
            vflat = vp.view(-1, D)

            def kcache_ce():
                sel = score_and_select(q, kc, bt, sl, C, spec, scale)
                ids = far_row_ids(bt_cpu, sel.idx.cpu(), HKV, 256)
                torch.index_select(vflat, 0, ids, out=stage)
                vout.view(-1, D).copy_(stage, non_blocking=True)
                return sparse_output(sel, vout, vhot, sl, slots, spec, HQ)
            dec["kcache_copy_engine_wall_ms"] = wall(kcache_ce)
        kd = torch.empty(B, HKV, C, D, dtype=DT, device=dev).normal_()
        vd = torch.empty_like(kd).normal_()
        q4 = q.view(B, HQ, 1, D)
        t = bench(lambda: F.scaled_dot_product_attention(q4, kd, vd, enable_gqa=True))
        dec["dense_sdpa_ms"] = t
        dec["dense_sdpa_pct_d2d"] = 100 * 2 * kd.numel() * 2 / t / 1e6 / d2d
        del kd, vd
        torch.cuda.empty_cache()
        dec["speedup_zero_copy"] = dec["dense_sdpa_ms"] / dec["kcache_zero_copy_ms"]
        log(f"  decode attention: KCache zero-copy {dec['kcache_zero_copy_ms']:.3f} ms (of it sparse output "
            f"{dec['sparse_output_ms']:.3f}), KCache copy-engine {dec.get('kcache_copy_engine_wall_ms', float('nan')):.3f}"
            f" ms wall (CUDA graph: KCache zero-copy {dec.get('kcache_zero_copy_graph_ms') or float('nan'):.3f} ms)"
            f"; dense SDPA K+V {t:.3f} ms ({dec['dense_sdpa_pct_d2d']:.0f}% of D2D); "
            f"speedup {dec['speedup_zero_copy']:.2f}x")
    guard(f"{key} decode", decode_part)

    # ---- (v) fp8 scoring keys (KCacheConfig.scoring_keys="fp8") beside the model-dtype K, same point
    if opts["fp8"]:
        fp8 = {}
        pt["fp8"] = fp8
        guard(f"{key} fp8", lambda: fp8_part(fp8, q, kc, vp, vhot, bt, sl, lens, C, slots, scale, d2d, h2d))

    # ---- (iv) V fetch beside the K pass (+ select) of another micro-batch, two streams
    if (B, C) not in opts["overlap_points"] or fp is None:
        return
    ov = []
    pt["overlap"] = ov

    def overlap_part():
        stage, host_path = fp
        kf = lambda: score_and_select(q, kc, bt, sl, C, spec, scale)  # noqa: E731
        sets = [random_idx(lens, top_n, gen).to(dev) for _ in range(3)]
        rot = [0]

        def zc(grid):
            def f():
                rot[0] = (rot[0] + 1) % len(sets)
                gather_far_rows_zero_copy(vp, bt, sets[rot[0]], out=vout, grid=grid)
            return f
        fetches = {f"zero_copy_g{g}": zc(g) for g in opts["overlap_grids"]}
        fetches["copy_engine_staged_h2d"] = lambda: vout.view(-1, D).copy_(stage, non_blocking=True)
        tk = bench(kf)
        for name, ff in fetches.items():
            tf = bench(ff)
            tt = bench(two_streams(kf, ff, s1, s2))
            e = {"fetch": name, "k_ms": tk, "fetch_ms": tf, "together_ms": tt, "serial_ms": tk + tf,
                 "ideal_ms": max(tk, tf), "hidden_frac": (tk + tf - tt) / tf, "clock": "device"}
            ov.append(e)
            log(f"  overlap K+select {tk:.3f} | {name} {tf:.3f}: together {tt:.3f} (serial {tk + tf:.3f}, "
                f"ideal {max(tk, tf):.3f}, hidden {100 * e['hidden_frac']:.0f}%)")
        # the whole copy-engine path (host gather included), wall clock, K pass queued first

        def both():
            with torch.cuda.stream(s1):
                kf()
            with torch.cuda.stream(s2):
                host_path()
        tkw = wall(kf)
        tfw = wall(host_path)
        ttw = wall(both)
        e = {"fetch": "copy_engine_cpu_gather", "k_ms": tkw, "fetch_ms": tfw, "together_ms": ttw,
             "serial_ms": tkw + tfw, "ideal_ms": max(tkw, tfw), "hidden_frac": (tkw + tfw - ttw) / tfw, "clock": "wall"}
        ov.append(e)
        log(f"  overlap (wall) K+select {tkw:.3f} | CPU gather + H2D {tfw:.3f}: together {ttw:.3f} "
            f"(hidden {100 * e['hidden_frac']:.0f}%)")
    guard(f"{key} overlap", overlap_part)


def quantized_in_chunks(k_pool, blocks_per_chunk=1024):
    """`quantize_rows` of k_pool [NB, HKV, bs, D] a chunk of blocks at a time (its float32
    temporaries would not fit beside the largest points' pools): (float8 pool, float32 scales)."""
    k8 = torch.empty(k_pool.shape, dtype=FP8_DTYPE, device=k_pool.device)
    scales = torch.empty(k_pool.shape[:3], dtype=torch.float32, device=k_pool.device)
    for lo in range(0, k_pool.shape[0], blocks_per_chunk):
        k8[lo:lo + blocks_per_chunk], scales[lo:lo + blocks_per_chunk] = quantize_rows(k_pool[lo:lo + blocks_per_chunk])
    return k8, scales


def fp8_part(res, q, kc, vp, vhot, bt, sl, lens, C, slots, scale, d2d, h2d):
    """fp8 scoring keys against the model-dtype path at one point: the K pass over float8 K + scales
    (GB/s over its bytes, % of D2D), the gather of K | V rows (512 B per KV head; from the V pool
    viewed as blocks of 2D-wide rows, the block table folded onto them), the output kernel weighing by
    the exact K, and the whole decode of one layer (K pass + select + K | V gather + output), each at
    top_n 256 and 1024 beside the same stages of the model-dtype path."""
    k8, ks = quantized_in_chunks(kc)
    nb, _, bs, _ = kc.shape
    fp8_bytes = sum(lens) * HKV * (D + 4)
    res["k_bytes"] = fp8_bytes
    spec256 = SelectionSpec(256, SINK, WINDOW, True, "max")
    t = bench(lambda: score_and_select(q, k8, bt, sl, C, spec256, scale, select=False, k_scales=ks))
    res["kpass_only_ms"], res["kpass_only_pct_d2d"] = t, 100 * fp8_bytes / t / 1e6 / d2d
    log(f"  fp8 K pass alone: {t:.3f} ms ({fp8_bytes / t / 1e6:.0f} GB/s, {res['kpass_only_pct_d2d']:.1f}% of D2D)")
    kv_rows = vp.view(nb // 2, HKV, bs, 2 * D)  # the V pool's bytes as K | V rows
    bt_kv = (bt % (nb // 2)).contiguous()
    khot = torch.zeros_like(vhot)  # random hot K would not match lse; the kernel does the same work
    gen = torch.Generator().manual_seed(C)
    for top_n in (256, 1024):
        spec = SelectionSpec(top_n, SINK, WINDOW, True, "max")
        rows = bt.shape[0] * HKV
        vfar = torch.empty(rows, top_n, D, dtype=DT, device=q.device)
        kvfar = torch.empty(rows, top_n, 2 * D, dtype=DT, device=q.device)
        idx = random_idx(lens, top_n, gen).to(q.device)
        e = {}
        e["kpass_select_ms"] = bench(lambda: score_and_select(q, k8, bt, sl, C, spec, scale, k_scales=ks))
        e["model_kpass_select_ms"] = bench(lambda: score_and_select(q, kc, bt, sl, C, spec, scale))
        e["gather_kv_ms"] = bench(lambda: gather_far_rows_zero_copy(kv_rows, bt_kv, idx, out=kvfar))
        e["gather_kv_GBps"] = rows * top_n * 2 * D * 2 / e["gather_kv_ms"] / 1e6
        e["gather_kv_pct_h2d"] = 100 * e["gather_kv_GBps"] / h2d
        e["model_gather_v_ms"] = bench(lambda: gather_far_rows_zero_copy(vp, bt, idx, out=vfar))
        sel8 = score_and_select(q, k8, bt, sl, C, spec, scale, k_scales=ks)
        sel = score_and_select(q, kc, bt, sl, C, spec, scale)
        e["output_exact_k_ms"] = bench(lambda: sparse_output(sel8, kvfar, vhot, sl, slots, spec, HQ, q=q, k_hot=khot,
                                                             scale=scale))
        e["model_output_ms"] = bench(lambda: sparse_output(sel, vfar, vhot, sl, slots, spec, HQ))

        def fp8_decode():
            s8 = score_and_select(q, k8, bt, sl, C, spec, scale, k_scales=ks)
            gather_far_rows_zero_copy(kv_rows, bt_kv, s8.idx, out=kvfar)
            return sparse_output(s8, kvfar, vhot, sl, slots, spec, HQ, q=q, k_hot=khot, scale=scale)

        def model_decode():
            s = score_and_select(q, kc, bt, sl, C, spec, scale)
            gather_far_rows_zero_copy(vp, bt, s.idx, out=vfar)
            return sparse_output(s, vfar, vhot, sl, slots, spec, HQ)
        e["decode_ms"], e["model_decode_ms"] = bench(fp8_decode), bench(model_decode)
        e["decode_graph_ms"] = guard("graph fp8 decode", lambda: graph_bench(fp8_decode))
        e["model_decode_graph_ms"] = guard("graph model decode", lambda: graph_bench(model_decode))
        res[f"n{top_n}"] = e
        log(f"  fp8 n{top_n}: K+select {e['kpass_select_ms']:.3f} (model {e['model_kpass_select_ms']:.3f}) ms; "
            f"K | V gather {e['gather_kv_ms']:.3f} ms {e['gather_kv_GBps']:.1f} GB/s "
            f"({e['gather_kv_pct_h2d']:.0f}% of H2D; V gather {e['model_gather_v_ms']:.3f}); output "
            f"{e['output_exact_k_ms']:.3f} (model {e['model_output_ms']:.3f}); decode {e['decode_ms']:.3f} "
            f"(model {e['model_decode_ms']:.3f}) ms, graphs {e['decode_graph_ms'] or float('nan'):.3f} / "
            f"{e['model_decode_graph_ms'] or float('nan'):.3f}")


def plots(out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pts = R["points"]
    names = list(pts)
    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    ax = axes[0]
    x = range(len(names))
    bars = [("kpass_only", "K pass alone")] + [(f"n{n}_max_{v}", f"+ top-{n} select, {v}")
                                               for n in (256, 1024) for v in ("fused", "row")]
    w = 0.8 / len(bars)
    for j, (key, label) in enumerate(bars):
        vals = [pts[n].get("kpass", {}).get("kpass_only_pct_d2d", 0) if key == "kpass_only" else
                pts[n].get("kpass", {}).get(key, {}).get("pct_d2d", 0) for n in names]
        ax.bar([i + (j - (len(bars) - 1) / 2) * w for i in x], vals, w, label=label)
    ax.axhline(85, color="k", ls="--", lw=1, label="target 85%")
    ax.set_xticks(list(x), names, rotation=20)
    ax.set_ylabel("% of D2D copy GB/s (over K bytes)")
    ax.set_title("(ii) score + selection")
    ax.legend(fontsize=7)
    ax = axes[1]
    fkeys = (("zc_bs256_g", "zero-copy, huge pages"), ("zc4k_bs256_g", "zero-copy, 4 KiB pages"),
             ("zc_bs16_g", "zero-copy bs16, huge pages"), ("ce_h2d_staged", "copy engine, staged"),
             ("ce_cpu_gather_h2d_wall", "CPU gather + H2D"))
    for j, (key, label) in enumerate(fkeys):
        vals = []
        for n in names:
            f = pts[n].get("fetch", {})
            cand = [v["pct_h2d"] for k, v in f.items() if k.startswith(key)]
            vals.append(max(cand) if cand else 0)
        ax.bar([i + (j - 2) * 0.16 for i in x], vals, 0.16, label=label)
    ax.axhline(85, color="k", ls="--", lw=1)
    ax.set_xticks(list(x), names, rotation=20)
    ax.set_ylabel("% of bulk pinned H2D GB/s")
    ax.set_title("(i) V fetch, top-256 rows (best grid)")
    ax.legend(fontsize=7)
    ax = axes[2]
    dz = [pts[n].get("decode", {}).get("kcache_zero_copy_ms", 0) for n in names]
    dd = [pts[n].get("decode", {}).get("dense_sdpa_ms", 0) for n in names]
    ax.bar([i - 0.2 for i in x], dz, 0.4, label="KCache (zero-copy fetch)")
    ax.bar([i + 0.2 for i in x], dd, 0.4, label="dense SDPA over K+V")
    ax.set_xticks(list(x), names, rotation=20)
    ax.set_ylabel("ms per layer")
    ax.set_title("(iii) decode attention, one layer")
    ax.legend()
    fig.suptitle(f"{R.get('card')}: D2D {R['baseline']['d2d_GBps']:.0f} GB/s, H2D {R['baseline']['h2d_GBps']:.1f} GB/s")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "kernels.png"), dpi=90)
    ov = [(n, e) for n in names for e in pts[n].get("overlap", [])]
    if ov:
        fig, ax = plt.subplots(figsize=(12, 5))
        labels = [f"{n}\n{e['fetch']}" for n, e in ov]
        xs = range(len(ov))
        ax.bar([i - 0.3 for i in xs], [e["k_ms"] for _, e in ov], 0.2, label="K+select alone")
        ax.bar([i - 0.1 for i in xs], [e["fetch_ms"] for _, e in ov], 0.2, label="fetch alone")
        ax.bar([i + 0.1 for i in xs], [e["together_ms"] for _, e in ov], 0.2, label="together")
        ax.bar([i + 0.3 for i in xs], [e["serial_ms"] for _, e in ov], 0.2, label="serial sum")
        ax.set_xticks(list(xs), labels, fontsize=7)
        ax.set_ylabel("ms")
        ax.set_title("(iv) V fetch beside the K pass on two streams")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "kernels_overlap.png"), dpi=90)


def table():
    b = R["baseline"]
    d2d, h2d = b["d2d_GBps"], b["h2d_GBps"]
    L = [f"card {R['card']} | D2D copy {d2d:.0f} GB/s | pinned H2D {h2d:.1f} GB/s | torch {R['torch']} "
         f"triton {R['triton']}", f"THP: {R.get('thp')}"]
    for n, p in R["points"].items():
        kp, f, d = p.get("kpass", {}), p.get("fetch", {}), p.get("decode", {})
        L.append(f"{n}: K pass alone {kp.get('kpass_only_ms', float('nan')):.3f} ms "
                 f"{kp.get('kpass_only_pct_d2d', 0):.1f}% of D2D; CUDA graph K pass "
                 f"{kp.get('graph_kpass_only_ms') or float('nan'):.3f}, K+select default "
                 f"{kp.get('graph_n256_max_default_ms') or float('nan'):.3f} ms")
        for name, v in kp.items():
            if isinstance(v, dict) and "ms" in v:
                L.append(f"  K+select {name:22s} {v['ms']:.3f} ms {v['pct_d2d']:5.1f}% of D2D "
                         f"(selection +{1e3 * v['select_ms']:6.1f} us)")
        for name, v in kp.items():
            if name.startswith("check_"):
                L.append(f"  {name}: {v}")
        for name, v in f.items():
            L.append(f"  fetch {name:24s} {v['ms']:.3f} ms {v['GBps']:5.1f} GB/s {v['pct_h2d']:4.0f}% of H2D")
        if d:
            L.append(f"  decode: KCache zero-copy {d.get('kcache_zero_copy_ms', float('nan')):.3f} ms (graph "
                     f"{d.get('kcache_zero_copy_graph_ms') or float('nan'):.3f}), sparse output "
                     f"{d.get('sparse_output_ms', float('nan')):.3f}, copy engine (wall) "
                     f"{d.get('kcache_copy_engine_wall_ms', float('nan')):.3f}, dense SDPA "
                     f"{d.get('dense_sdpa_ms', float('nan')):.3f} ms")
        for name, v in p.get("fp8", {}).items():
            if isinstance(v, dict):
                L.append(f"  fp8 {name}: K+select {v['kpass_select_ms']:.3f} (model {v['model_kpass_select_ms']:.3f}) "
                         f"K|V gather {v['gather_kv_GBps']:.1f} GB/s ({v['gather_kv_pct_h2d']:.0f}% of H2D) output "
                         f"{v['output_exact_k_ms']:.3f} (model {v['model_output_ms']:.3f}) decode {v['decode_ms']:.3f} "
                         f"(model {v['model_decode_ms']:.3f}) ms")
    for n, p in R["points"].items():
        for e in p.get("overlap", []):
            L.append(f"overlap {n:12s} {e['fetch']:24s} K {e['k_ms']:.3f} fetch {e['fetch_ms']:.3f} together "
                     f"{e['together_ms']:.3f} serial {e['serial_ms']:.3f} ideal {e['ideal_ms']:.3f} hidden "
                     f"{100 * e['hidden_frac']:4.0f}% ({e['clock']})")
    if R["errors"]:
        L.append(f"errors: {len(R['errors'])}: " + " | ".join(R["errors"])[:1500])
    return "\n".join(L)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--points", default="32x8192,128x8192,32x32768,128x32768")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--fp8", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the fp8 scoring keys' stages beside the model-dtype ones (part v)")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    dev = torch.device("cuda")
    import triton
    R.update(card=torch.cuda.get_device_name(0), torch=torch.__version__, triton=triton.__version__,
             sm_count=torch.cuda.get_device_properties(0).multi_processor_count)
    log(f"card {R['card']} ({R['sm_count']} SMs), torch {R['torch']}, triton {R['triton']}")
    torch.set_num_threads(min(16, os.cpu_count() or 1))
    R["cpu_threads"] = torch.get_num_threads()
    R["baseline"] = baselines(dev)
    points = [tuple(int(v) for v in p.split("x")) for p in a.points.split(",")]
    variants = {"fused": KPassConfig(select_mode="fused"), "fused_nocap": KPassConfig(select_mode="fused", maxnreg=0),
                "row": KPassConfig(select_mode="row")}
    opts = {"top_ns": [256, 1024], "grids": [32, 132, 264], "overlap_grids": [32, 132],
            "overlap_points": {(32, 32768), (128, 8192)}, "check": True, "variants": variants,
            "sum_variants": ("fused",), "check_variants": ("fused", "row"), "fp8": a.fp8}
    if a.quick:
        opts.update(grids=[132, 264])
    max_tokens = max(B * C for B, C in points)
    t0 = time.time()
    pools = Pools(max_tokens, dev)
    log(f"pools: K {pools.k.numel() * 2 / 1e9:.1f} GB device, V 2 x {pools.v['thp'].numel() * 2 / 1e9:.1f} GB pinned "
        f"host ({time.time() - t0:.1f} s)")
    streams = (torch.cuda.Stream(), torch.cuda.Stream())
    for B, C in points:
        guard(f"point {B}x{C}", lambda: run_point(B, C, pools, R["baseline"], dev, opts, streams))
        log(f"[{time.time() - t0:.0f} s]")
        with open(os.path.join(a.out, "kernels.json"), "w") as f:
            json.dump(R, f, indent=1, default=str)
    guard("plots", lambda: plots(a.out))
    log("\n" + table())


if __name__ == "__main__":
    main()

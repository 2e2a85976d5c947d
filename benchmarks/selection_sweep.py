#!/usr/bin/env python3
"""Launch settings of the K pass and the exact top-N selection (`KPassConfig`: K tile, split,
pipeline stages, warps, count bins, register cap, and where the selection runs: row, fused, split,
fused with its late rows split) timed on the GPU, at batch x context points of the Llama-3-8B
attention shape (bf16, sink 4, window 128):

    python benchmarks/selection_sweep.py OUT.json                       # selection variants, top_n 1024 and 256
    python benchmarks/selection_sweep.py OUT.json --variants kpass --keys fp8 --points 66x8192,27x32768
    python benchmarks/selection_sweep.py OUT.json --names row,split_w4,fused_late128 --kernel-times

--variants selection: the selection's settings; kpass: the K pass's launch shape and, with fp8 K,
its dot's dtype (f16dot, model_dot: `KPassConfig.fp8_dot`), each also timed alone (without selecting), top_n
1024. --keys fp8: K as float8 e4m3 with a float32 scale per position and KV head
(`KCacheConfig.scoring_keys="fp8"`). Per point: the K pass alone, then K pass and selection per
variant as % of the device-to-device copy bandwidth measured at the start (over the K bytes read:
scales included), whether its selected positions equal the default's, and the default checked
against torch.topk on the kernel's own scores (`kernels.check_selection`). Stream-timed (median of
20), so the first, shortest point is noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from kcache_dist.kcache.selection import SelectionSpec  # noqa: E402
from kcache_dist.kcache.triton_kcache import KPassConfig, score_and_select  # noqa: E402

from kernels import (D, DT, HKV, HQ, SINK, WINDOW, baselines, bench, check_selection, quantized_in_chunks,  # noqa: E402
                     tables, warm_up)

POINTS = "32x8192,72x8192,32x32768,21x32768"  # 72 @ 8K and 21 @ 32K: the engine's KCache batches
SELECTION_VARIANTS = {"default": KPassConfig(), "row": KPassConfig(select_mode="row"),
                      "row_w4": KPassConfig(select_mode="row", select_warps=4),
                      "row_w16": KPassConfig(select_mode="row", select_warps=16),
                      "row_bins16": KPassConfig(select_mode="row", bins=16),
                      "row_bins64": KPassConfig(select_mode="row", bins=64),
                      "row_stg2": KPassConfig(select_mode="row", select_stages=2),
                      "row_stg4": KPassConfig(select_mode="row", select_stages=4),
                      "row_nocap": KPassConfig(select_mode="row", maxnreg=0),
                      "row_w16_stg2": KPassConfig(select_mode="row", select_warps=16, select_stages=2),
                      "fused": KPassConfig(select_mode="fused", late_rows=0),
                      "split": KPassConfig(select_mode="split"),
                      "split_w4": KPassConfig(select_mode="split", select_warps=4),
                      "split_w4_p1": KPassConfig(select_mode="split", select_warps=4, split_parts=1),
                      "split_w4_p16": KPassConfig(select_mode="split", select_warps=4, split_parts=16),
                      "fused_late16": KPassConfig(select_mode="fused", late_rows=16),
                      "fused_late32": KPassConfig(select_mode="fused", late_rows=32),
                      "fused_late64": KPassConfig(select_mode="fused", late_rows=64),
                      "fused_late128": KPassConfig(select_mode="fused", late_rows=128),
                      # keys-pass tiles of 256 positions a warp in the fused K pass's 4 warps (default 128)
                      "fused_ts1024": KPassConfig(select_mode="fused", late_rows=0, sel_tile=1024),
                      "fused_late128_ts1024": KPassConfig(select_mode="fused", late_rows=128, sel_tile=1024),
                      "fused_late128_ts1024_nocap": KPassConfig(select_mode="fused", late_rows=128, sel_tile=1024,
                                                                maxnreg=0)}
KPASS_VARIANTS = {"default": KPassConfig(), "bn64": KPassConfig(block_n=64), "bn256": KPassConfig(block_n=256),
                  "bn256_split2048": KPassConfig(block_n=256, split=2048), "split2048": KPassConfig(split=2048),
                  "stg4": KPassConfig(num_stages=4), "bn256_stg2": KPassConfig(block_n=256, num_stages=2),
                  "nocap": KPassConfig(maxnreg=0), "bn256_nocap": KPassConfig(block_n=256, maxnreg=0),
                  "w8": KPassConfig(num_warps=8), "bn256_w8": KPassConfig(block_n=256, num_warps=8),
                  "f16dot": KPassConfig(fp8_dot="float16"), "model_dot": KPassConfig(fp8_dot="model"),
                  "f16dot_bn256": KPassConfig(block_n=256, fp8_dot="float16")}


def kernel_times_us(fn, calls: int = 10) -> dict:
    """Device time (us) per call of each kernel fn launches, from the profiler over `calls` calls."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    times: dict = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            times[event.name] = times.get(event.name, 0.0) + event.device_time / calls
    return times


def sweep_point(B: int, C: int, d2d_GBps: float, dev: torch.device, keys: str, variants: dict,
                kpass: bool, kernel_times: bool = False) -> dict:
    """kpass: the variants are K-pass launch shapes (top_n 1024 only, each also timed without selecting).
    kernel_times: each variant's per-kernel device time too (top_n 1024)."""
    gen = torch.Generator().manual_seed(B * 7 + C)
    bt, sl, lens = tables(B, C, 256, dev, gen)
    kc = torch.randn(B * (C // 256), HKV, 256, D, device=dev, dtype=DT)
    ks = None
    if keys == "fp8":
        kc, ks = quantized_in_chunks(kc)
    q = torch.randn(B, HQ, D, device=dev, dtype=DT)
    scale = D ** -0.5
    k_bytes = sum(lens) * HKV * (D * kc.element_size() + (4 if ks is not None else 0))

    def run(spec, cfg=None, select=True):
        return score_and_select(q, kc, bt, sl, C, spec, scale, cfg, select=select, k_scales=ks)

    def pct(ms):
        return 100 * k_bytes / ms / 1e6 / d2d_GBps

    any_spec = SelectionSpec(1024, SINK, WINDOW, True, "max")
    warm_up(lambda: run(any_spec, select=False))
    kpass_ms = bench(lambda: run(any_spec, select=False))
    point = {"B": B, "C": C, "keys": keys, "k_bytes": k_bytes, "kpass_ms": kpass_ms, "kpass_pct": pct(kpass_ms)}
    print(f"B{B} C{C} ({keys} K): K pass {kpass_ms:.4f} ms {point['kpass_pct']:.1f}%", flush=True)
    for top_n in ((1024,) if kpass else (1024, 256)):
        spec = SelectionSpec(top_n, SINK, WINDOW, True, "max")
        default_idx = run(spec).idx.clone()
        point[f"check_n{top_n}"] = check_selection(run(spec), sl, spec)
        for name, cfg in variants.items():
            same = bool((run(spec, cfg).idx == default_idx).all().item())
            ms = bench(lambda: run(spec, cfg))
            entry = {"ms": ms, "pct_d2d": pct(ms), "select_us": 1e3 * (ms - kpass_ms), "idx_equal_default": same}
            alone = ""
            if kpass:
                entry["kpass_alone_ms"] = bench(lambda: run(spec, cfg, select=False))
                alone = f"  (K pass alone {entry['kpass_alone_ms']:.4f} ms {pct(entry['kpass_alone_ms']):5.1f}%)"
            if kernel_times and top_n == 1024:
                entry["kernel_us"] = kernel_times_us(lambda: run(spec, cfg))
                alone += "  kernels: " + ", ".join(f"{k} {v:.1f} us" for k, v in entry["kernel_us"].items())
            point[f"n{top_n}_{name}"] = entry
            print(f"  n{top_n} {name:15s} {ms:.4f} ms {entry['pct_d2d']:5.1f}%  select +{entry['select_us']:6.1f} us  "
                  f"same={same}{alone}", flush=True)
        print("  check", point[f"check_n{top_n}"], flush=True)
    return point


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="JSON path")
    ap.add_argument("--points", default=POINTS, help="BxC pairs, comma separated")
    ap.add_argument("--keys", choices=("model", "fp8"), default="model")
    ap.add_argument("--variants", choices=("selection", "kpass"), default="selection")
    ap.add_argument("--names", default=None, help="only these variants, comma separated")
    ap.add_argument("--kernel-times", action="store_true", help="each variant's per-kernel device time (profiler)")
    args = ap.parse_args()
    variants = SELECTION_VARIANTS if args.variants == "selection" else KPASS_VARIANTS
    if args.names:
        unknown = set(args.names.split(",")) - set(variants)
        if unknown:
            raise SystemExit(f"unknown variants {sorted(unknown)}; {args.variants} has {sorted(variants)}")
        variants = {n: variants[n] for n in args.names.split(",")}
    dev = torch.device("cuda")
    base = baselines(dev)
    points = [tuple(int(v) for v in p.split("x")) for p in args.points.split(",")]
    result = {"card": torch.cuda.get_device_name(dev), "baseline": base, "keys": args.keys, "variants": args.variants,
              "points": [sweep_point(B, C, base["d2d_GBps"], dev, args.keys, variants, args.variants == "kpass",
                                     args.kernel_times) for B, C in points]}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

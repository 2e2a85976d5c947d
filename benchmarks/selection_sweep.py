#!/usr/bin/env python3
"""Launch settings of the exact top-N selection (`KPassConfig`: warps, count bins, pipeline stages,
register cap, row vs fused) timed with the K pass on the GPU, at batch x context points of the
Llama-3-8B attention shape (bf16, sink 4, window 128), top_n 1024 and 256:

    python benchmarks/selection_sweep.py OUT.json

Per point: the K pass alone, then K pass + selection per variant as % of the device-to-device copy
bandwidth measured at the start (over the K bytes), whether its selected positions equal the
default's, and the default checked against torch.topk on the kernel's own scores
(`kernels.check_selection`). Stream-timed (median of 20), so the first, shortest point is noisy.
"""

from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from kcache_dist.kcache.selection import SelectionSpec  # noqa: E402
from kcache_dist.kcache.triton_kcache import KPassConfig, score_and_select  # noqa: E402

from kernels import D, DT, HKV, HQ, SINK, WINDOW, baselines, bench, check_selection, tables, warm_up  # noqa: E402

POINTS = [(32, 8192), (72, 8192), (32, 32768), (21, 32768)]  # 72 @ 8K and 21 @ 32K: the engine's KCache batches
VARIANTS = {"row": KPassConfig(select_mode="row"), "row_w4": KPassConfig(select_mode="row", select_warps=4),
            "row_w16": KPassConfig(select_mode="row", select_warps=16),
            "row_bins16": KPassConfig(select_mode="row", bins=16), "row_bins64": KPassConfig(select_mode="row", bins=64),
            "row_stg2": KPassConfig(select_mode="row", select_stages=2),
            "row_stg4": KPassConfig(select_mode="row", select_stages=4),
            "row_nocap": KPassConfig(select_mode="row", maxnreg=0),
            "row_w16_stg2": KPassConfig(select_mode="row", select_warps=16, select_stages=2),
            "fused": KPassConfig(select_mode="fused")}


def sweep_point(B: int, C: int, d2d_GBps: float, dev: torch.device) -> dict:
    gen = torch.Generator().manual_seed(B * 7 + C)
    bt, sl, lens = tables(B, C, 256, dev, gen)
    kc = torch.randn(B * (C // 256), HKV, 256, D, device=dev, dtype=DT)
    q = torch.randn(B, HQ, D, device=dev, dtype=DT)
    scale = D ** -0.5
    k_bytes = sum(lens) * HKV * D * 2
    any_spec = SelectionSpec(1024, SINK, WINDOW, True, "max")
    warm_up(lambda: score_and_select(q, kc, bt, sl, C, any_spec, scale, select=False))
    kpass_ms = bench(lambda: score_and_select(q, kc, bt, sl, C, any_spec, scale, select=False))
    point = {"B": B, "C": C, "kpass_ms": kpass_ms, "kpass_pct": 100 * k_bytes / kpass_ms / 1e6 / d2d_GBps}
    print(f"B{B} C{C}: K pass {kpass_ms:.4f} ms {point['kpass_pct']:.1f}%", flush=True)
    for top_n in (1024, 256):
        spec = SelectionSpec(top_n, SINK, WINDOW, True, "max")
        default_idx = score_and_select(q, kc, bt, sl, C, spec, scale).idx.clone()
        point[f"check_n{top_n}"] = check_selection(score_and_select(q, kc, bt, sl, C, spec, scale), sl, spec)
        for name, cfg in VARIANTS.items():
            same = bool((score_and_select(q, kc, bt, sl, C, spec, scale, cfg).idx == default_idx).all().item())
            ms = bench(lambda: score_and_select(q, kc, bt, sl, C, spec, scale, cfg))
            pct = 100 * k_bytes / ms / 1e6 / d2d_GBps
            point[f"n{top_n}_{name}"] = {"ms": ms, "pct_d2d": pct, "select_us": 1e3 * (ms - kpass_ms),
                                         "idx_equal_default": same}
            print(f"  n{top_n} {name:13s} {ms:.4f} ms {pct:5.1f}%  select +{1e3 * (ms - kpass_ms):6.1f} us  "
                  f"same={same}", flush=True)
        print("  check", point[f"check_n{top_n}"], flush=True)
    return point


def main() -> None:
    dev = torch.device("cuda")
    base = baselines(dev)
    result = {"card": torch.cuda.get_device_name(dev), "baseline": base,
              "points": [sweep_point(B, C, base["d2d_GBps"], dev) for B, C in POINTS]}
    with open(sys.argv[1], "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

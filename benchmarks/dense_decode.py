#!/usr/bin/env python3
"""Dense decode attention of one layer over the paged cache on one GPU: the Triton split-K kernel
(`kcache_dist/layers/triton_paged_decode.py`, used by full-KV mode and KCache's dense layers)
against the torch reference (gather + SDPA) and the device-to-device copy bandwidth measured in
the same run.

    python benchmarks/dense_decode.py --out benchmarks/results/dense_decode.json [--points 32x8192,32x32768]

Shape: Llama-3-8B attention (32 q / 8 KV heads, head_dim 128, bf16), block size 16 (full mode's),
block tables a random permutation of the pool. GB/s counts the K and V bytes of the context read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kcache_dist.layers.paged_attention import decode_attention  # noqa: E402
from kcache_dist.layers.triton_paged_decode import paged_decode_attention_triton  # noqa: E402

from device_timing import device_copy_Bps, median_time_s  # noqa: E402

HQ, HKV, D, BLOCK_SIZE = 32, 8, 128, 16


def run_point(batch: int, context: int, dev: torch.device) -> dict:
    blocks_per_seq = context // BLOCK_SIZE
    num_blocks = batch * blocks_per_seq
    k = torch.randn(num_blocks, HKV, BLOCK_SIZE, D, dtype=torch.bfloat16, device=dev)
    v = torch.randn_like(k)
    tables = torch.randperm(num_blocks, device=dev).int().view(batch, blocks_per_seq)
    lens = torch.full((batch,), context, dtype=torch.long, device=dev)
    q = torch.randn(batch, HQ, D, dtype=torch.bfloat16, device=dev)
    scale = D ** -0.5
    kv_bytes = 2 * batch * context * HKV * D * 2
    ref = decode_attention(q, k, v, tables, lens, scale)
    out = paged_decode_attention_triton(q, k, v, tables, lens, scale)
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    triton_ms = 1e3 * median_time_s(lambda: paged_decode_attention_triton(q, k, v, tables, lens, scale), dev,
                                    reps=20, warmup=3)
    reference_ms = 1e3 * median_time_s(lambda: decode_attention(q, k, v, tables, lens, scale), dev, reps=5, warmup=3)
    return {"batch": batch, "context": context, "kv_bytes": kv_bytes, "rel_err_vs_reference": err,
            "triton_ms": triton_ms, "triton_gb_per_s": kv_bytes / triton_ms / 1e6,
            "reference_ms": reference_ms, "reference_gb_per_s": kv_bytes / reference_ms / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/dense_decode.json")
    parser.add_argument("--points", default="1x32768,32x8192,32x32768,64x32768")
    args = parser.parse_args()
    dev = torch.device("cuda")
    result = {"card": torch.cuda.get_device_name(0), "d2d_copy_gb_per_s": device_copy_Bps(dev, 1 << 31, reps=20) / 1e9,
              "points": []}
    print(f"{result['card']}: D2D copy {result['d2d_copy_gb_per_s']:.0f} GB/s (read + write)")
    for point in args.points.split(","):
        batch, context = (int(x) for x in point.split("x"))
        r = run_point(batch, context, dev)
        r["triton_frac_of_d2d"] = r["triton_gb_per_s"] / result["d2d_copy_gb_per_s"]
        result["points"].append(r)
        print(f"B={batch:4d} ctx={context:6d}: Triton {r['triton_ms']:.3f} ms ({r['triton_gb_per_s']:.0f} GB/s, "
              f"{100 * r['triton_frac_of_d2d']:.1f}% of D2D) | reference {r['reference_ms']:.3f} ms "
              f"({r['reference_gb_per_s']:.0f} GB/s) | rel err {r['rel_err_vs_reference']:.1e}")
        torch.cuda.empty_cache()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

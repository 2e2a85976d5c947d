#!/usr/bin/env python3
"""Would an fp8 K cache keep KCache's accuracy? (A study for a capacity lever; nothing in the engine
uses fp8 K.)

    pip install matplotlib && python benchmarks/fp8_keys_accuracy.py [--out-dir DIR] [accuracy.py flags]

KCache keeps the K of every layer on the GPU; its capacity over full mode is bounded by those
bytes (with 8 dense layers of 32, a Llama-3-8B token holds 40 of full mode's 64 K/V rows on the
GPU: 1.6x). K stored as float8 e4m3 would halve the sparse layers' K (28 of 64: 2.3x) and halve
the bytes the K pass reads. This runs `benchmarks/accuracy.py` (teacher-forced decode emulation
on the embedded SmolLM2-135M, CPU) twice on the same data and settings: as it is, and with the K
that every sparse layer's decode attention scores rounded to float8 e4m3 with one scale per (KV
head, position) — amax / 448, as a cache storing a scale beside each row would hold it. Dense
layers, the dense prefill and V are unchanged. Both JSONs land in --out-dir, and a table of each
setting's metrics relative to full attention, bf16/fp32 K against fp8 K, is printed and written to
`fp8_keys_accuracy.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import accuracy  # noqa: E402
from kcache_dist.kcache import teacher_forced  # noqa: E402

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
DEFAULT_ACCURACY_ARGS = ["--contexts", "2048,4096,8192", "--ladder", "256,1024", "--scaled", "",
                         "--only", "top_n=256;top_n=1024", "--qa-questions", "50"]


def fp8_rounded_keys(keys: torch.Tensor) -> torch.Tensor:
    """keys [Hkv, L, D] as an fp8 e4m3 cache with a float32 scale per (head, position) returns them:
    each row divided by amax / 448, rounded to e4m3, multiplied back; same dtype and shape."""
    scale = keys.float().abs().amax(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / FP8_MAX
    return ((keys.float() / scale).to(FP8).float() * scale).to(keys.dtype)


def run_accuracy(argv: list[str], out: str, fp8_keys: bool) -> dict:
    original = teacher_forced.sparse_decode_attention
    if fp8_keys:
        def sparse_with_fp8_keys(q, keys, values, *args, **kwargs):
            return original(q, fp8_rounded_keys(keys), values, *args, **kwargs)
        teacher_forced.sparse_decode_attention = sparse_with_fp8_keys
    try:
        accuracy.main(argv + ["--out", out])
    finally:
        teacher_forced.sparse_decode_attention = original
    with open(out, encoding="utf-8") as f:
        return json.load(f)


def compare(base: dict, fp8: dict) -> list[dict]:
    """Per setting: its metrics relative to full attention with the model's K and with fp8 K."""
    rows = []
    fp8_by_name = {r["setting"]["name"]: r for r in fp8["results"]}
    for r in base["results"]:
        name = r["setting"]["name"]
        rows.append({"setting": name, "relative_to_full": r["relative_to_full"],
                     "relative_to_full_fp8_keys": fp8_by_name[name]["relative_to_full"],
                     "metrics": r["metrics"], "metrics_fp8_keys": fp8_by_name[name]["metrics"]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args, accuracy_argv = p.parse_known_args()
    accuracy_argv = accuracy_argv or DEFAULT_ACCURACY_ARGS
    os.makedirs(args.out_dir, exist_ok=True)
    base = run_accuracy(accuracy_argv, os.path.join(args.out_dir, "fp8_keys_accuracy_model_keys.json"), False)
    fp8 = run_accuracy(accuracy_argv, os.path.join(args.out_dir, "fp8_keys_accuracy_fp8_keys.json"), True)
    rows = compare(base, fp8)
    out = os.path.join(args.out_dir, "fp8_keys_accuracy.json")
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"accuracy_args": accuracy_argv, "rows": rows}, f, indent=1)
    for row in rows:
        print(f"{row['setting']}:\n  model K {json.dumps(row['relative_to_full'])}\n"
              f"  fp8 K   {json.dumps(row['relative_to_full_fp8_keys'])}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

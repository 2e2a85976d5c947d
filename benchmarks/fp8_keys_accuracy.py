#!/usr/bin/env python3
"""Would an fp8 K cache keep KCache's accuracy? (A study for a capacity lever; the `fp8_selection`
variant is what the engine runs with `KCacheConfig(scoring_keys="fp8")`.)

    pip install matplotlib && python benchmarks/fp8_keys_accuracy.py [--out-dir DIR]
        [--variants model_keys,fp8_keys,fp8_selection] [accuracy.py flags]

KCache keeps the K of every layer on the GPU; its capacity over full mode is bounded by those
bytes (with 8 dense layers of 32, a Llama-3-8B token holds 40 of full mode's 64 K/V rows on the
GPU: 1.6x). K stored as float8 e4m3 would halve the sparse layers' K (28 of 64: 2.3x) and halve
the bytes the K pass reads. This runs `benchmarks/accuracy.py` (teacher-forced decode emulation
on the embedded SmolLM2-135M, CPU) on the same data and settings once per variant of the K that
every sparse layer's decode attention uses:

- `model_keys`: as it is;
- `fp8_keys`: K rounded to float8 e4m3 with one scale per (KV head, position) — amax / 448, as a
  cache storing a scale beside each row would hold it — for the scores, the selection and the
  weights (fp8 K as the only copy);
- `fp8_selection`: the fp8 K picks the top-N positions; the weights of the picked, sink and window
  positions come from the model's K (a GPU copy of K in fp8 for the scoring pass, the exact K of
  the picked rows fetched with their V from host memory, sink and window K kept exact on the GPU;
  with `renormalize`, the default, the output is then the exact softmax over what was picked);
- `fp8_qk_selection`: as `fp8_selection` with q rounded to e4m3 too for the selection (a scale
  per query head and position): what a K pass taking an fp8 x fp8 dot would pick;
- `fp8_far_values`: K as it is; the far picks weighed with V rounded to e4m3 (a scale per KV head
  and position), as a host pool holding V in float8 would give them (half the bytes a miss
  fetches and the host memory a token takes); sink and window V exact, as the device keeps them;
- `int4_far_values`, `int4_g32_far_values`: as `fp8_far_values` with V rounded to 4 bits instead
  (16 levels between the minimum and the maximum, q4_1-style: a scale and an offset per KV head and
  position, or per 32 values of it): would a quarter of the model's bytes per far row (64 bytes of
  a 128-wide head, plus 4 or 16 bytes of scales) keep the accuracy? (A study; no engine path.)
- `fp8_values_rounded_prefill`: as `fp8_far_values`, and in the sparse layers (from
  `KCacheConfig().dense_layers` on) every prefill chunk after the first attends to the earlier
  chunks' V rounded, as the engine's later chunks of a long prompt read them back from a float8
  host pool. The emulation prefills in chunks of 1024 tokens (the engine in chunks of
  `max_num_batched_tokens`, 8192 by default, so a prompt of up to 8K is one chunk there): a
  pessimistic stand-in for long prompts. The prefill is shared by every setting of a run, so this
  variant's `full` setting has the rounded prefill too: compare its absolute metrics with
  `model_keys`'.

Dense layers and the dense prefill are unchanged except in `fp8_values_rounded_prefill`, and V
in every variant but those named for their values. Each variant's JSON lands in --out-dir
(`fp8_keys_accuracy_<variant>.json`; a variant not in --variants is read from there when present),
and a table of each setting's metrics relative to full attention per variant is printed and written
to `fp8_keys_accuracy.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import accuracy  # noqa: E402
from kcache_dist.config import KCacheConfig  # noqa: E402
from kcache_dist.kcache import teacher_forced  # noqa: E402
from kcache_dist.kcache.fp8_keys import fp8_rounded  # noqa: E402

DEFAULT_ACCURACY_ARGS = ["--contexts", "2048,4096,8192", "--ladder", "256,1024", "--scaled", "",
                         "--only", "top_n=256;top_n=1024", "--qa-questions", "50"]


VARIANTS = ("model_keys", "fp8_keys", "fp8_selection", "fp8_qk_selection", "fp8_far_values",
            "fp8_values_rounded_prefill", "int4_far_values", "int4_g32_far_values")
INT4_GROUPS = {"int4_far_values": None, "int4_g32_far_values": 32}  # values per scale (None: the whole row)


def int4_rounded(x: torch.Tensor, group: Optional[int] = None) -> torch.Tensor:
    """x [..., D] rounded to 4 bits as a q4_1-style cache would hold it: per row of D values (or per
    `group` consecutive values of a row; rows narrower than `group` whole) 16 levels from its minimum
    to its maximum; returned in float32. Shape [..., D]."""
    d = x.shape[-1]
    size = min(group or d, d)
    if d % size:
        raise ValueError(f"int4 groups of {size} values do not divide rows of {d}")
    g = x.float().reshape(*x.shape[:-1], d // size, size)
    low, high = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    step = ((high - low) / 15).clamp_min(torch.finfo(torch.float32).tiny)
    return (((g - low) / step).round().clamp(0, 15) * step + low).reshape(x.shape)


def sparse_attention_with(variant: str):
    """`teacher_forced.sparse_decode_attention` as the variant computes it (module docstring)."""
    original = teacher_forced.sparse_decode_attention
    if variant == "model_keys":
        return original
    if variant == "fp8_keys":
        return lambda q, keys, values, *args, **kwargs: original(q, fp8_rounded(keys), values, *args, **kwargs)
    if variant == "fp8_selection":  # as KCacheConfig(scoring_keys="fp8") has the emulation do it
        return lambda q, keys, values, *args, **kwargs: original(q, keys, values, *args,
                                                                 **{**kwargs, "selection_keys": fp8_rounded(keys)})
    if variant == "fp8_qk_selection":  # the selection's dot fp8 x fp8: q rounded too (a scale per query head)
        return lambda q, keys, values, *args, **kwargs: original(
            q, keys, values, *args,
            **{**kwargs, "selection_keys": fp8_rounded(keys), "selection_queries": fp8_rounded(q)})
    if variant in ("fp8_far_values", "fp8_values_rounded_prefill"):
        return lambda q, keys, values, *args, **kwargs: original(q, keys, values, *args,
                                                                 **{**kwargs, "far_values": fp8_rounded(values)})
    if variant in INT4_GROUPS:
        group = INT4_GROUPS[variant]
        return lambda q, keys, values, *args, **kwargs: original(
            q, keys, values, *args, **{**kwargs, "far_values": int4_rounded(values, group)})
    raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")


def emulated_attend_with(variant: str):
    """`teacher_forced._EmulatedCache.attend` as the variant runs it (module docstring)."""
    original = teacher_forced._EmulatedCache.attend
    if variant != "fp8_values_rounded_prefill":
        return original
    dense_layers = KCacheConfig().dense_layers

    def attend(self, layer_idx, q, k, v, scale, ctx):
        start = self.length
        if self.kcache is not None or layer_idx < dense_layers or start == 0:  # not a later prefill chunk
            return original(self, layer_idx, q, k, v, scale, ctx)
        earlier = self.values[layer_idx][:, :start].clone()
        self.values[layer_idx][:, :start] = fp8_rounded(earlier)  # as a float8 host pool gives them back
        try:
            return original(self, layer_idx, q, k, v, scale, ctx)
        finally:
            self.values[layer_idx][:, :start] = earlier  # the decode's sink and window rows stay exact
    return attend


def run_accuracy_with(attention, argv: list[str], out: str, attend=None) -> dict:
    """accuracy.py's JSON, run with `attention` as every sparse layer's decode attention
    (`teacher_forced.sparse_decode_attention`) and `attend`, when given, as the emulated cache's
    `attend` (both restored afterwards)."""
    original, original_attend = teacher_forced.sparse_decode_attention, teacher_forced._EmulatedCache.attend
    teacher_forced.sparse_decode_attention = attention
    teacher_forced._EmulatedCache.attend = attend or original_attend
    try:
        accuracy.main(argv + ["--out", os.path.relpath(out)])  # its JSON records --out: no machine's absolute path
    finally:
        teacher_forced.sparse_decode_attention = original
        teacher_forced._EmulatedCache.attend = original_attend
    with open(out, encoding="utf-8") as f:
        return json.load(f)


def run_accuracy(argv: list[str], out: str, variant: str) -> dict:
    return run_accuracy_with(sparse_attention_with(variant), argv, out, emulated_attend_with(variant))


def same_accuracy_args(stored: dict, argv: list[str]) -> bool:
    """Whether a stored run's `args` are what `argv` would give accuracy.py (its --out aside)."""
    wanted = vars(accuracy.parse_args(argv))
    return {k: v for k, v in stored.items() if k != "out"} == {k: v for k, v in wanted.items() if k != "out"}


def compare(runs: dict[str, dict]) -> list[dict]:
    """Per setting of the first run: each variant's metrics and their change relative to full attention."""
    by_variant = {v: {r["setting"]["name"]: r for r in run["results"]} for v, run in runs.items()}
    first = next(iter(runs.values()))
    return [{"setting": r["setting"]["name"],
             "relative_to_full": {v: results[r["setting"]["name"]]["relative_to_full"]
                                  for v, results in by_variant.items()},
             "metrics": {v: results[r["setting"]["name"]]["metrics"] for v, results in by_variant.items()}}
            for r in first["results"]]


def write_comparison(out: str, runs: dict[str, dict], header: dict) -> None:
    """`compare(runs)` written to `out` after the `header` entries, and printed per setting."""
    rows = compare(runs)
    with open(out, "w", encoding="utf-8") as f:
        json.dump({**header, "rows": rows}, f, indent=1)
    width = max(len(v) for v in runs) + 2
    for row in rows:
        print(f"{row['setting']}:")
        for variant, relative in row["relative_to_full"].items():
            print(f"  {variant:{width}s}{json.dumps(relative)}")
    print(f"wrote {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="variants to run; the others are read from --out-dir when their JSON is there")
    args, accuracy_argv = p.parse_known_args()
    accuracy_argv = accuracy_argv or DEFAULT_ACCURACY_ARGS
    to_run = [v for v in args.variants.split(",") if v]  # none: only the table of the JSONs already there
    for variant in to_run:
        sparse_attention_with(variant)  # an unknown name fails before any run
    os.makedirs(args.out_dir, exist_ok=True)
    runs = {}
    for variant in VARIANTS:
        path = os.path.join(args.out_dir, f"fp8_keys_accuracy_{variant}.json")
        if variant in to_run:
            runs[variant] = run_accuracy(accuracy_argv, path, variant)
        elif os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                runs[variant] = json.load(f)
            if not same_accuracy_args(runs[variant]["args"], accuracy_argv):
                raise SystemExit(f"{path} was run with other accuracy.py flags; add {variant} to --variants")
    write_comparison(os.path.join(args.out_dir, "fp8_keys_accuracy.json"), runs,
                     {"accuracy_args": accuracy_argv, "variants": list(runs)})


if __name__ == "__main__":
    main()

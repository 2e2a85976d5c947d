#!/usr/bin/env python3
"""Could a decode step leave out the picks its row cache misses, and read them for the next step?
(A study for taking the V fetch off the step's critical path.)

    pip install matplotlib && python benchmarks/deferred_misses_accuracy.py [--out-dir DIR] [accuracy.py flags]

A KCache step picks its top-N far positions per sparse layer and KV head; the far-row cache
(`row_cache_factor` x top_n rows, the positions picked most recently: `kcache/row_cache.py`) holds
most of them (89% at 8K on the default model, `benchmarks/notes/selection_reuse.md`), and the engine
reads the rest, the misses, from host memory before the step's attention, with SM loads that do
not overlap the HBM-bound kernels (`benchmarks/notes/throughput.md`). If a step attended only to
the picks its cache already held, its misses could arrive by the next step, copied beside that
step's kernels. This runs `benchmarks/accuracy.py` (teacher-forced decode emulation on the embedded
SmolLM2-135M, CPU) twice on the same data and settings:

- `exact`: every pick attended (what the engine computes);
- `deferred_misses`: every sparse layer's step leaves out the picks that its cache (the
  `GPU_ROW_CACHE_FACTOR` x top_n positions picked most recently, replayed per layer and KV head
  as the engine fills it) did not hold before the step; a decode's first step, whose cache is
  cold, attends to all of its picks (it would wait for its fetch).

Dense layers, the sink, the recent window and the dense prefill are unchanged. Each variant's
accuracy.py JSON lands in --out-dir (`deferred_misses_accuracy_<variant>.json`); the metrics
relative to full attention per setting, and the share of picks the deferred run's caches held,
go to `deferred_misses_accuracy.json`.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fp8_keys_accuracy import run_accuracy_with, write_comparison  # noqa: E402
from kcache_dist.config import GPU_ROW_CACHE_FACTOR  # noqa: E402
from kcache_dist.kcache import teacher_forced  # noqa: E402
from selection_reuse import cache_rows, recently_picked  # noqa: E402


DEFAULT_ACCURACY_ARGS = ["--contexts", "2048,4096,8192", "--ladder", "256,1024", "--scaled", "",
                         "--only", "top_n=256;top_n=1024", "--qa-questions", "50"]
VARIANTS = ("exact", "deferred_misses")


class DeferredMisses:
    """`teacher_forced.PickFilter`s that replay the row cache of each sparse layer (told apart by
    its K storage) and KV head through a decode: before a step the cache holds the `capacity`
    positions picked most recently (ties: any of them); the step keeps the picks held then.
    A decode starts (cold) wherever a layer's steps do not continue the last ones it saw."""

    def __init__(self) -> None:
        self.layers: dict[int, dict] = {}  # K storage address -> {"next": position, "last": [Hkv, L], "first": step}
        self.held = self.picked = 0

    def filter(self, layer_key: int, capacity: int) -> teacher_forced.PickFilter:
        def keep(first: int, top, counts: list):
            state = self.layers.get(layer_key)
            hkv, rows, most = top.shape
            end = first + rows
            if state is None or state["next"] != first:  # a new decode: cold cache
                state = {"last": np.full((hkv, end), -1, dtype=np.int64), "first": first}
                self.layers[layer_key] = state
            elif state["last"].shape[1] < end:
                grown = np.full((hkv, end), -1, dtype=np.int64)
                grown[:, :state["last"].shape[1]] = state["last"]
                state["last"] = grown
            last, picks = state["last"], top.cpu().numpy()
            kept = np.ones((hkv, rows, most), dtype=bool)
            for i, count in enumerate(counts):
                step = first + i
                for h in range(hkv):
                    picked = picks[h, i, :count]
                    if step > state["first"]:
                        hit = np.isin(picked, recently_picked(last[h], capacity), assume_unique=True)
                        kept[h, i, :count] = hit
                        self.held += int(hit.sum())
                        self.picked += count
                    last[h, picked] = step
            state["next"] = end
            return torch.from_numpy(kept).to(top.device)
        return keep

    @property
    def held_share(self) -> float:
        return self.held / self.picked if self.picked else float("nan")


def deferring_attention(replay: DeferredMisses, original=teacher_forced.sparse_decode_attention):
    """`original` (teacher_forced.sparse_decode_attention) with `replay`'s filter of each call's
    layer, for a cache of GPU_ROW_CACHE_FACTOR x top_n positions."""
    def deferring(q, keys, values, start, kcache, top_n_at, scale, *args, **kwargs):
        capacity = cache_rows(GPU_ROW_CACHE_FACTOR, top_n_at(start + q.shape[0]))
        return original(q, keys, values, start, kcache, top_n_at, scale, *args,
                        **{**kwargs, "keep_picks": replay.filter(keys.data_ptr(), capacity)})
    return deferring


def run_accuracy(argv: list[str], out: str, variant: str) -> tuple[dict, float]:
    """accuracy.py's JSON for `variant`, and the share of picks held (deferred_misses; else NaN)."""
    replay = DeferredMisses()
    attention = (deferring_attention(replay) if variant == "deferred_misses"
                 else teacher_forced.sparse_decode_attention)
    return run_accuracy_with(attention, argv, out), replay.held_share


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args, accuracy_argv = p.parse_known_args()
    accuracy_argv = accuracy_argv or DEFAULT_ACCURACY_ARGS
    os.makedirs(args.out_dir, exist_ok=True)
    runs, held = {}, {}
    for variant in VARIANTS:
        runs[variant], held[variant] = run_accuracy(
            accuracy_argv, os.path.join(args.out_dir, f"deferred_misses_accuracy_{variant}.json"), variant)
    print(f"share of picks held by the caches (deferred run, all settings): {held['deferred_misses']:.4f}")
    write_comparison(os.path.join(args.out_dir, "deferred_misses_accuracy.json"), runs,
                     {"accuracy_args": accuracy_argv, "row_cache_factor": GPU_ROW_CACHE_FACTOR,
                      "held_share_deferred": held["deferred_misses"]})


if __name__ == "__main__":
    main()

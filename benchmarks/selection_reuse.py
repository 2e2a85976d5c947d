#!/usr/bin/env python3
"""How many of a decode step's top-N far positions recent steps already picked: what a device-side
cache of recently fetched V rows would save of KCache's PCIe traffic.

    python benchmarks/accuracy_data.py          # once: the text (shared with the accuracy benchmark)
    python benchmarks/selection_reuse.py        # default model on CPU, float32
    python benchmarks/selection_reuse.py --model PATH --device cuda --dtype bfloat16

At the defaults KCache's decode step waits on the PCIe fetch of top_n V rows per sparse layer and
KV head (README, Throughput). If consecutive steps pick mostly the same positions, keeping the rows
fetched lately in device memory would leave only the new picks to fetch. This measures that on
natural text, with the engine's decode-time selection (`kcache_dist.kcache.teacher_forced`): per
document, one dense prefill, then for each context C (largest first) `--steps` decode positions
ending at C run teacher-forced under each setting, and every sparse layer's far picks per KV head
are recorded (`SelectionObserver`). Reported per context and setting, over layers, KV heads and
steps (the first step of a block only fills the cache):
- hit rate of a per-(layer, KV head) row cache that holds the c x top_n positions picked most
  recently, for each c of --cache-factors: the share of a step's picks it already holds, so the
  rows fetched per step fall to (1 - hit rate). c = 1 is the overlap with the previous step's set;
  the same for the engine's own cache (`FarRowCache`, c >= 1) replayed on the picks, for an
  eviction by decayed pick count (sum of 0.9^age over the steps that picked a position), and for
  the offline optimum (Belady's farthest next use, knowing the future picks: the most any eviction
  policy could hold, c >= 1);
- the device memory such a cache takes per sequence: c x top_n rows x head_dim x dtype bytes x
  sparse layers x KV heads (against the V bytes per sequence that KCache moves to host memory);
- with --prefetch-ranks k1,k2,..: whether a step's misses could be fetched a step early, off its
  critical path: the share of the misses of the engine's default cache (GPU_ROW_CACHE_FACTOR x
  top_n, recency) that the previous step ranked just below its picks (ranks top_n .. top_n + k - 1
  of the same score; the decode then selects top_n + max k and attends to the first top_n), and how
  many of those k candidates a step would copy in (not already cached).
Writes benchmarks/results/selection_reuse_<model>.json and a PNG of hit rate against c.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections import defaultdict
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kcache_dist.config import GPU_ROW_CACHE_FACTOR, SCORING_KEYS, KCacheConfig  # noqa: E402
from kcache_dist.kcache.teacher_forced import TeacherForcedLM, load_model  # noqa: E402

import accuracy_data  # noqa: E402
from accuracy import clean_text, model_choice  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="local HF checkpoint directory (default: the embedded SmolLM2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--contexts", default="2048,4096,8192")
    p.add_argument("--steps", type=int, default=128, help="decode positions per context")
    p.add_argument("--top-n", default="1024,256", help="top_n of each setting (the other knobs: the defaults)")
    p.add_argument("--cache-factors", default="1,1.5,2,4", help="row cache capacity in multiples of top_n")
    p.add_argument("--docs", default="alice29.txt,bible_kjv.txt")
    p.add_argument("--scoring-keys", default="model", choices=list(SCORING_KEYS),
                   help="KCacheConfig.scoring_keys: fp8 picks with K rounded to float8 (row cache rows are then K | V)")
    p.add_argument("--prefetch-ranks", default="", help="k values of the prefetch measure (empty: not measured)")
    p.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


class PickLog:
    """The far picks of a teacher-forced decode: picks[(layer, kv_head)][position] = int64 array.
    With top_n, a step's first top_n positions (best first) are its picks and the rest, in rank
    order, its candidates[(layer, kv_head)][position]."""

    def __init__(self, top_n: Optional[int] = None) -> None:
        self.top_n = top_n
        self.picks: dict[tuple[int, int], dict[int, np.ndarray]] = defaultdict(dict)
        self.candidates: dict[tuple[int, int], dict[int, np.ndarray]] = defaultdict(dict)

    def __call__(self, layer: int, first: int, top: torch.Tensor, counts: list) -> None:
        top = top.cpu().numpy()
        for i, count in enumerate(counts):
            picked = count if self.top_n is None else min(count, self.top_n)
            for h in range(top.shape[0]):
                self.picks[layer, h][first + i] = np.sort(top[h, i, :picked])
                if self.top_n is not None:
                    self.candidates[layer, h][first + i] = top[h, i, picked:count]


def cache_rows(factor: float, top_n: int) -> int:
    """Positions a cache of `factor` x top_n holds in this study (rounded to nearest; the engine's
    `KCacheConfig.row_cache_rows` rounds up: the same wherever factor x top_n is whole, as in every
    run recorded here)."""
    return int(round(factor * top_n))


def recently_picked(last: np.ndarray, capacity: int) -> np.ndarray:
    """The positions a cache of the `capacity` most recently picked ones holds, given last[p], the
    step that last picked position p (-1: never); ties at the edge: any of them."""
    held = np.flatnonzero(last >= 0)
    if len(held) > capacity:
        held = held[np.argpartition(-last[held], capacity - 1)[:capacity]]
    return held


def cache_hits(steps: list[np.ndarray], capacity: int, context: int) -> tuple[int, int]:
    """(picks already held, picks) over steps[1:] of one (layer, KV head), for a cache holding the
    `capacity` positions picked most recently (steps[0] only fills it)."""
    last = np.full(context, -1, dtype=np.int64)  # step at which each position was last picked
    hits = total = 0
    for t, picked in enumerate(steps):
        if t > 0:
            held = recently_picked(last, capacity)
            hits += np.isin(picked, held, assume_unique=True).sum()
            total += len(picked)
        last[picked] = t
    return int(hits), int(total)


def ranked_eviction_hits(steps: list[np.ndarray], capacity: int, context: int, observe, order) -> tuple[int, int]:
    """`cache_hits` for a cache that after each step keeps that step's picks and, of the other
    positions it holds, the first by `order(t, others)` (indices into others, best first);
    `observe(t, picked)` sees each step's picks before the eviction."""
    held = np.zeros(context, dtype=bool)
    hits = total = 0
    for t, picked in enumerate(steps):
        if t > 0:
            hits += held[picked].sum()
            total += len(picked)
        observe(t, picked)
        held[picked] = True
        cached = np.flatnonzero(held)
        if len(cached) > capacity:
            others = cached[~np.isin(cached, picked, assume_unique=True)]
            keep = others[order(t, others)[:max(0, capacity - len(picked))]]
            held[:] = False
            held[picked] = True
            held[keep] = True
    return int(hits), int(total)


def decayed_frequency_hits(steps: list[np.ndarray], capacity: int, context: int,
                           decay: float = 0.9) -> tuple[int, int]:
    """`cache_hits` for an eviction by decayed pick count: each position scores sum(decay^age) over
    the steps that picked it; the highest kept (ties: picked more recently)."""
    score = np.zeros(context)
    last = np.full(context, -1, dtype=np.int64)

    def observe(t: int, picked: np.ndarray) -> None:
        score[:] *= decay
        score[picked] += 1.0
        last[picked] = t

    return ranked_eviction_hits(steps, capacity, context, observe,
                                lambda t, others: np.lexsort((-last[others], -score[others])))


def farthest_next_use_hits(steps: list[np.ndarray], capacity: int, context: int) -> tuple[int, int]:
    """`cache_hits` for the offline optimum (Belady): the positions picked again soonest kept,
    knowing the future picks. No online policy holds more; the gap to the recency policy bounds
    what a better eviction could save."""
    count = len(steps)
    next_pick = np.full(context, count, dtype=np.int64)
    next_after = [None] * count  # next_after[t][p]: the first step after t that picks p (count: none)
    for t in range(count - 1, -1, -1):
        next_after[t] = next_pick.copy()
        next_pick[steps[t]] = t
    return ranked_eviction_hits(steps, capacity, context, lambda t, picked: None,
                                lambda t, others: np.argsort(next_after[t][others], kind="stable"))


def prefetch_coverage(steps: list[np.ndarray], candidates: list[np.ndarray], capacity: int, k: int,
                      context: int) -> tuple[int, int, int]:
    """(misses, misses among the previous step's first k candidates, candidates not cached) over
    steps[1:] of one (layer, KV head), for the cache of `cache_hits` (the `capacity` positions
    picked most recently); the last count is what prefetching those candidates would copy in."""
    last = np.full(context, -1, dtype=np.int64)
    missed = covered = copied = 0
    for t, picked in enumerate(steps):
        if t > 0:
            held = recently_picked(last, capacity)
            miss = picked[~np.isin(picked, held, assume_unique=True)]
            early = candidates[t - 1][:k]
            missed += len(miss)
            covered += int(np.isin(miss, early).sum())
            copied += int((~np.isin(early, held)).sum())
        last[picked] = t
    return missed, covered, copied


def engine_cache_hits(rows: list[list[np.ndarray]], capacity: int, context: int) -> tuple[int, int]:
    """(picks already held, picks) over steps[1:] of every row (one (layer, KV head) each, all with
    the same number of steps), replayed through the engine's own cache (`FarRowCache.assign`: its
    eviction, ages capped and ties broken by slot), one sequence slot per row."""
    from kcache_dist.kcache.row_cache import FarRowCache

    n = max(len(picked) for steps in rows for picked in steps)
    cache = FarRowCache(1, len(rows), 1, capacity, context, 1, torch.float32, torch.device("cpu"))
    slots = torch.arange(len(rows))
    hits = total = 0
    for t in range(len(rows[0])):
        idx = torch.full((len(rows), 1, n), -1, dtype=torch.int64)
        for r, steps in enumerate(rows):
            idx[r, 0, :len(steps[t])] = torch.from_numpy(steps[t])
        _, miss = cache.assign(0, slots, idx)
        if t > 0:
            picks = int((idx >= 0).sum())
            hits += picks - int(miss.sum())
            total += picks
    return hits, total


def reuse(log: PickLog, top_n: int, factors: list[float], context: int, prefetch_ranks: list[int] = ()) -> dict:
    hits = {f: 0 for f in factors}
    best = {f: 0 for f in factors}
    frequent = {f: 0 for f in factors}
    total = 0
    for rows in log.picks.values():
        steps = [rows[p] for p in sorted(rows)]
        for f in factors:
            h, n = cache_hits(steps, cache_rows(f, top_n), context)
            hits[f] += h
            if f >= 1:
                best[f] += farthest_next_use_hits(steps, cache_rows(f, top_n), context)[0]
                frequent[f] += decayed_frequency_hits(steps, cache_rows(f, top_n), context)[0]
        total += n
    all_rows = [[rows[p] for p in sorted(rows)] for rows in log.picks.values()]
    engine = {f: engine_cache_hits(all_rows, cache_rows(f, top_n), context) for f in factors if f >= 1}
    return {"picks": total, "hit_rate": {str(f): hits[f] / total if total else None for f in factors},
            "engine_cache_hit_rate": {str(f): h / n if n else None for f, (h, n) in engine.items()},
            "optimal_hit_rate": {str(f): best[f] / total if total else None for f in factors if f >= 1},
            "decayed_frequency_hit_rate": {str(f): frequent[f] / total if total else None
                                           for f in factors if f >= 1},
            **prefetch(log, top_n, context, prefetch_ranks)}


def prefetch(log: PickLog, top_n: int, context: int, ranks: list[int]) -> dict:
    """`prefetch_coverage` summed over the log's (layer, KV head) rows, per k of `ranks`."""
    if not ranks or not log.candidates:
        return {}
    capacity = cache_rows(GPU_ROW_CACHE_FACTOR, top_n)
    out = {}
    for k in ranks:
        missed = covered = copied = steps_seen = 0
        for key, rows in log.picks.items():
            positions = sorted(rows)
            m, c, n = prefetch_coverage([rows[p] for p in positions],
                                        [log.candidates[key][p] for p in positions], capacity, k, context)
            missed, covered, copied, steps_seen = missed + m, covered + c, copied + n, steps_seen + len(positions) - 1
        out[str(k)] = {"misses": missed, "share_of_misses_prefetched": covered / missed if missed else None,
                       "rows_copied_per_step": copied / steps_seen if steps_seen else None,
                       "misses_per_step": missed / steps_seen if steps_seen else None}
    return {"prefetch": out, "prefetch_row_cache_factor": GPU_ROW_CACHE_FACTOR}


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in result["rows"]:
        factors = [float(f) for f in row["hit_rate"]]
        ax.plot(factors, list(row["hit_rate"].values()), marker="o",
                label=f"top_n {row['top_n']}, context {row['context']}")
    ax.set_xlabel("row cache capacity (x top_n)")
    ax.set_ylabel("share of a step's picks already cached")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{result['model']}: V rows a device-side cache would not refetch", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    wall0 = time.perf_counter()
    from transformers import AutoTokenizer
    model_dir, model_name, device, dtype = model_choice(args.model, args.device, args.dtype)
    contexts = sorted((int(c) for c in args.contexts.split(",")), reverse=True)
    factors = [float(f) for f in args.cache_factors.split(",")]
    ranks = [int(k) for k in args.prefetch_ranks.split(",") if k]
    extra = max(ranks, default=0)  # selected beyond top_n, not attended: the prefetch candidates
    settings = [KCacheConfig(mode="kcache", top_n=int(n), scoring_keys=args.scoring_keys)
                for n in args.top_n.split(",")]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_model(model_dir, device, dtype, contexts[0])
    lm = TeacherForcedLM(model, capacity=contexts[0])
    attn = model.model.layers[0].self_attn
    num_kv_heads, head_dim = attn.num_kv_heads, attn.attn.head_dim
    data = accuracy_data.ensure_data()
    named = {p.name: p for p in data["books"]} | {"bible_kjv.txt": data["bible"]}
    logs: dict = {}  # (context, top_n) -> picks of every document
    for d, name in enumerate(args.docs.split(",")):
        ids = tokenizer.encode(clean_text(open(named[name], encoding="utf-8").read()))[:contexts[0]]
        if len(ids) < contexts[0]:
            raise ValueError(f"{name} has {len(ids)} tokens, fewer than the longest context {contexts[0]}")
        lm.truncate(0)
        lm.prefill(ids[:contexts[0] - args.steps])
        print(f"[{time.perf_counter() - wall0:6.0f}s] {name}: dense prefill of {lm.length} tokens", flush=True)
        for context in contexts:
            start = context - args.steps
            for kc in settings:
                log = logs.setdefault((context, kc.top_n), PickLog(kc.top_n if extra else None))
                lm.truncate(start)
                lm.cache.on_select = lambda layer, first, top, counts, d=d, log=log: log(
                    (d, layer), first, top, counts)
                if extra:  # attend to the first top_n of the top_n + extra selected: the top_n step
                    lm.cache.keep_picks = lambda layer, first, top, counts, n=kc.top_n: (
                        torch.arange(top.shape[-1], device=top.device) < n).expand(top.shape)
                try:
                    lm.decode(ids[start:context], dataclasses.replace(kc, top_n=kc.top_n + extra))
                finally:
                    lm.cache.on_select = lm.cache.keep_picks = None
            print(f"[{time.perf_counter() - wall0:6.0f}s] {name}: context {context} decoded", flush=True)
    sparse_layers = lm.num_layers - settings[0].dense_layers
    rows = []
    for (context, top_n), log in sorted(logs.items()):
        r = reuse(log, top_n, factors, context, ranks)
        row_bytes = head_dim * torch.finfo(dtype).bits // 8
        cached_row_bytes = row_bytes * settings[0].host_rows_per_position  # V, or K | V
        rows.append({"context": context, "top_n": top_n, **r,
                     "cache_bytes_per_sequence": {str(f): cache_rows(f, top_n) * cached_row_bytes * sparse_layers
                                                  * num_kv_heads for f in factors},
                     "host_v_bytes_per_sequence": context * row_bytes * sparse_layers * num_kv_heads})
        print(f"context {context} top_n {top_n}: hit rate " + ", ".join(
            f"{f}x {v:.3f}" for f, v in r["hit_rate"].items()) + "; decayed pick count " + ", ".join(
            f"{f}x {v:.3f}" for f, v in r["decayed_frequency_hit_rate"].items()) + "; offline optimum " + ", ".join(
            f"{f}x {v:.3f}" for f, v in r["optimal_hit_rate"].items()), flush=True)
        for k, p in r.get("prefetch", {}).items():
            print(f"  prefetch of the next {k} ranks: {p['share_of_misses_prefetched']:.3f} of "
                  f"{p['misses_per_step']:.1f} misses a step, {p['rows_copied_per_step']:.1f} rows copied a step",
                  flush=True)
    result = {"benchmark": "selection_reuse", "model": model_name, "dtype": str(dtype).replace("torch.", ""),
              "device": str(device), "steps": args.steps, "docs": args.docs.split(","),
              "kcache": {k: v for k, v in vars(settings[0]).items() if k != "top_n"},
              "rows": rows, "seconds": round(time.perf_counter() - wall0, 1)}
    suffix = "" if args.scoring_keys == "model" else f"_{args.scoring_keys}_scoring_keys"
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"selection_reuse_{model_name}{suffix}.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    plot(result, out.removesuffix(".json") + ".png")
    print(f"wrote {out}", flush=True)
    return result


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Where the time of one decode step goes: the model runner's forward at a given batch and context,
with the cache filled directly (no prefill), timed and profiled per kernel.

    python benchmarks/profile_decode.py --model llama3-8b --context 8192 --batch full=109,kcache=173
    mpirun -np 2 python benchmarks/profile_decode.py ...     (tensor parallel over the job's ranks)

For each mode an engine is built as a user starts it (max_model_len = context, max_num_seqs = the
batch) with random weights; every sequence gets its own blocks, K (and the device V pools) are
filled with random values, and a decode plan of one new token per sequence at position context - 1
runs through `ModelRunner.execute` (forward + logits; no scheduling, sampling or detokenizing).
Reported per mode, for the eager forward, the eager forward split into --micro-batches
micro-batches on as many CUDA streams, and the CUDA-graph replay of the step whole and split: the
step's device time (CUDA events from the first launch to the end of the step, so an eager step
slowed by its launches counts as slow) and the host time until the call returns.

Under tensor parallelism the ranks meet at a barrier before each timed step, and every path is also
timed with the all-reduces left out (graphs captured without them; the logits' gather too, so each
rank runs on its own). That gives what the all-reduces cost a step, whole and split, and the
fraction of that cost the split hides, for the eager steps and for the graphs; with
--two-shot-all-reduce also for the graphs of the step whole and split whose all-reduces go through
torch's symmetric-memory two-shot kernel (`ParallelConfig.all_reduce="two_shot"`) instead of
NCCL, and the share of the NCCL all-reduces' cost that this cuts; and ("overall") what each split
step pays over the faster of the steps without all-reduces, against what they add to the whole
step. The CUDA-graph steps are also timed with each all-reduce replaced by one of a single
element, which splits what the all-reduces cost into what meeting costs (the ranks' waiting for
each other, and whatever holds an all-reduce kernel back from starting) and the bytes moved;
--trace-graphs tells those apart (the GPU's idle time before each all-reduce kernel). The times
are rank 0's; every rank times every path, and each rank's medians are listed
(`per_rank_device_ms_median`): with the all-reduces every rank waits for the slowest, so a slow
rank would pass for all-reduce cost.

A KCache step whose decode stages its new rows (`cache/decode_rows_stage.py`) also issues the
copies of the chunks it closes, 1/C of the sequences a step, joined into the timed step.
The row cache's hit rate is over the timed steps. For the eager forward also the `torch.profiler`
table of device time per kernel name (an op and the kernels it launches are both listed, so the
shares overlap). Printed and written to --out. The batch is cut to what the plan's blocks hold
(said in the output) when the request is larger.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import logging
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from kcache_dist.config import (HOST_VALUES, SCORING_KEYS, EngineConfig, KCacheConfig, ParallelConfig,  # noqa: E402
                               parse_host_memory_gb)
from kcache_dist.engine.cuda_graphs import DecodeGraphs  # noqa: E402
from kcache_dist.engine.llm_engine import LLMEngine  # noqa: E402
from kcache_dist.engine.step_plan import StepPlan  # noqa: E402
from kcache_dist.layers import embedding, linear  # noqa: E402
from kcache_dist.models.named_shapes import write_shape_dir  # noqa: E402
from kcache_dist.parallel import (barrier, current_state, disable_two_shot_all_reduce,  # noqa: E402
                                  enable_two_shot_all_reduce, init_parallel, launched_world_size,
                                  strip_local_rank_arg, tp_gather_objects)
from kernel_gaps import timeline_summary, trace_kernels  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama3-8b", help="a named shape (random weights)")
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--batch", default="full=32,kcache=32", help="mode=batch pairs, comma separated")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--steps", type=int, default=5, help="timed steps per mode")
    p.add_argument("--top-n", type=int, default=KCacheConfig().top_n)
    p.add_argument("--dense-layers", type=int, default=KCacheConfig().dense_layers)
    p.add_argument("--host-memory-gb", type=parse_host_memory_gb, default="auto",
                   help="per rank, or 'auto' (EngineConfig.host_memory_gb)")
    p.add_argument("--row-cache-factor", type=float, default=KCacheConfig().row_cache_factor,
                   help="KCacheConfig.row_cache_factor (default: the engine's; on CUDA 2, from 16K tokens 4; the "
                        "steps repeat one position: after the first, every pick hits)")
    p.add_argument("--row-cache-hit-rate", type=float, default=1.0,
                   help="with a row cache: before every step forget a random 1 - this share of its rows, so that "
                        "the step's repeated picks hit at about this rate (e.g. 0.89, the default model's rate at "
                        "8K: benchmarks/notes/selection_reuse.md)")
    p.add_argument("--scoring-keys", default=KCacheConfig().scoring_keys, choices=list(SCORING_KEYS),
                   help="KCacheConfig.scoring_keys of the kcache mode")
    p.add_argument("--host-values", default=KCacheConfig().host_values, choices=list(HOST_VALUES),
                   help="KCacheConfig.host_values of the kcache mode")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--two-shot-all-reduce", action=argparse.BooleanOptionalAction, default=False,
                   help="under tensor parallelism, also time the CUDA-graph steps with the two-shot all-reduce "
                        "(ParallelConfig.all_reduce='two_shot')")
    p.add_argument("--micro-batches", type=int, default=2,
                   help="also time the eager step split into this many micro-batches on as many streams (1: not)")
    p.add_argument("--rows", type=int, default=25, help="profiler rows to print")
    p.add_argument("--host-writes-to-device", action="store_true",
                   help="KCache: also time the CUDA-graph step (whole; under tensor parallelism also without "
                        "all-reduces) with the decode's writes of the new rows to the host pool sent to a device "
                        "buffer instead (timing only)")
    p.add_argument("--direct-host-writes", action="store_true",
                   help="KCache: also time the CUDA-graph step (whole; under tensor parallelism also without "
                        "all-reduces) with the decode's new rows stored into host memory by a kernel in each "
                        "layer (KCacheKVCache.decode_stage off: the path before the staged copies)")
    p.add_argument("--trace-graphs", action="store_true",
                   help="also trace one replay of each CUDA-graph path per rank (benchmarks/kernel_gaps.py): the "
                        "GPU's idle time, and before each all-reduce kernel; with --out each rank's kernels go to "
                        "OUT.MODE.rankR.trace.json")
    p.add_argument("--out", default=None, help="JSON path")
    return p.parse_args(argv)


def decode_plan(batch: int, context: int, blocks_per_seq: int) -> StepPlan:
    """One new token per sequence at position context - 1; sequence i owns blocks
    [i * blocks_per_seq, (i + 1) * blocks_per_seq)."""
    tables = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(batch)]
    return StepPlan(list(range(batch)), [1] * batch, [context - 1] * batch, [1] * batch, [0] * batch, tables,
                    list(range(batch)), [True] * batch)


def fill_device_pools(cache) -> None:
    """Random K (and device V) so that scores and selection behave as on real data (an all-zero K
    would tie every key and send the selection down its slow exact path). Float8 K (fp8 scoring
    keys) gets N(0, 1) values rounded to float8 and scales of 1."""
    for name in ("k_caches", "v_caches", "dense_v_caches", "v_hot", "k_hot"):
        for t in getattr(cache, name, None) or []:
            if t.dtype.itemsize == 1:
                for part in t.split(64):  # a float16 draw of 64 blocks at a time
                    part.copy_(torch.randn(part.shape, dtype=torch.float16, device=t.device))
            else:
                t.normal_(0, 1)
    for t in getattr(cache, "k_scales", None) or []:
        t.fill_(1.0)


def _start_step(before_step, dev: torch.device) -> None:
    """What precedes each timed (or traced) step: `before_step()` (if any), the device's earlier
    work done, and the ranks met at a barrier."""
    if before_step is not None:
        before_step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    barrier()


def time_step(run, plan: StepPlan, steps: int, dev: torch.device, before_step=None, misses=None) -> dict:
    """Median device time (CUDA events) and host time until `run(plan)` returns, after two warm-up
    calls; `before_step()` (untimed) runs before each call. Under tensor parallelism the ranks meet
    at a barrier before each timed call, so that no rank's time includes waiting for another rank
    to start (`before_step` takes the ranks different host times). `misses()`, if given, counts the
    row cache's misses so far: the timed calls' misses are returned."""
    before_step = before_step or (lambda: None)
    for _ in range(2):  # compile, capture
        before_step()
        run(plan)
    torch.cuda.synchronize(dev)
    device_ms, host_ms = [], []
    misses_before = misses() if misses else 0
    for _ in range(steps):
        _start_step(before_step, dev)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        run(plan)
        host_ms.append((time.perf_counter() - t0) * 1e3)
        end.record()
        end.synchronize()
        device_ms.append(start.elapsed_time(end))
    out = {"device_ms_median": statistics.median(device_ms), "host_ms_median": statistics.median(host_ms),
           "device_ms": device_ms, "host_ms": host_ms}
    if misses:
        out["misses"] = misses() - misses_before
    return out


MEETING_ONLY = "_meeting_only"  # path-name suffix: the step with one-element all-reduces (`_meeting_only`)


HOST_WRITES_TO_DEVICE = "_host_writes_to_device"  # path-name suffix (`_host_writes_to_device`)


def _host_writes_to_device(run, cache):
    """`run` with the KCache decode storing its new rows by a kernel in each layer (`decode_stage`
    off, as `_with_direct_host_writes`) into a device pool of one block per sparse layer instead of
    the host pool, by the cache's own offload (its stream and events) (the rows overwrite each other:
    wrong host rows, right timing otherwise), so that the step writes nothing to host memory."""
    scratch = [torch.zeros((1, *pool.shape[1:]), dtype=pool.dtype, device=cache.device) for pool in cache.host_rows]

    def offload(sparse, rows, slot_mapping):
        wrapped = torch.where(slot_mapping >= 0, slot_mapping % scratch[sparse].shape[2], slot_mapping)
        host_rows, cache.host_rows = cache.host_rows, scratch
        try:
            type(cache)._offload(cache, sparse, rows, wrapped)
        finally:
            cache.host_rows = host_rows

    def run_with_device_writes(plan):
        cache._offload = offload  # shadows the method for this call (and the capture it makes)
        try:
            return run(plan)
        finally:
            del cache._offload
    return _with_direct_host_writes(run_with_device_writes, cache)


DIRECT_HOST_WRITES = "_direct_host_writes"  # path-name suffix (`_with_direct_host_writes`)


def _with_direct_host_writes(run, cache):
    """`run` with the KCache cache's decode storing its new rows into host memory by a kernel in
    each layer (`decode_stage` off) for this call and the capture it makes."""
    stage = cache.decode_stage

    def run_direct(plan):
        cache.decode_stage = None
        try:
            return run(plan)
        finally:
            cache.decode_stage = stage
    return run_direct


def _with_staged_row_copies(run, runner):
    """`run`, then, where the KCache cache stages the decode's new rows (`DecodeRowsStage`), the
    copies to the host pool of the chunks the step closes, joined into the step so that its time
    counts them (in the engine they run beside the host's work between steps). Every sequence of
    the plan is at one position, so each closes a chunk every C steps in turn: 1/C of the
    sequences a step, as in a batch whose positions differ."""
    turn = itertools.count()

    def run_and_copy(plan):
        out = run(plan)
        cache = runner.kv_cache
        stage = getattr(cache, "decode_stage", None)
        if stage is not None:
            t, c = next(turn), stage.chunk_rows
            copies = []
            for i in range(plan.num_decodes):
                if (i + t) % c == 0:
                    slot, position = plan.hot_slots[i], plan.num_computed_tokens[i]
                    first = position // c * c
                    block = runner.block_table_rows.block(slot, position // stage.block_size)
                    copies += stage.copies(slot, block, first, position + 1 - first)
            cache.issue_staged_copies(copies)
            cache.join_offload()
        return out
    return run_and_copy


def _without_all_reduce(run):
    """`run` with the model's tensor-parallel all-reduces replaced by nothing and the logits'
    gather by copies of the rank's own part (every rank alike), so that no rank waits for another
    and each rank's time is its own work. (With more ranks than KV heads the decode's gather of a
    KV head's queries still joins the ranks.)"""
    def run_without(plan):
        saved = (linear.tp_all_reduce, embedding.tp_all_reduce, embedding.tp_gather_last_dim)
        linear.tp_all_reduce = embedding.tp_all_reduce = lambda x: x
        embedding.tp_gather_last_dim = lambda x: torch.cat([x] * current_state().tp_size, dim=-1)
        try:
            return run(plan)
        finally:
            linear.tp_all_reduce, embedding.tp_all_reduce, embedding.tp_gather_last_dim = saved
    return run_without


def _meeting_only(run):
    """`run` with each of the model's tensor-parallel all-reduces replaced by an all-reduce of one
    element (`MEETING_ONLY` paths): the ranks still meet as often, but move none of the activations
    (wrong sums, right timing). So a step with all-reduces minus this one is what their bytes cost,
    and this one minus the step without any is what meeting costs: the ranks' waiting for each
    other, anything that holds an all-reduce kernel back, and the one-element all-reduces' own
    latency."""
    def run_meeting_only(plan):
        saved = (linear.tp_all_reduce, embedding.tp_all_reduce)

        def meet(x):
            saved[0](x.new_zeros(1))
            return x
        linear.tp_all_reduce = embedding.tp_all_reduce = meet
        try:
            return run(plan)
        finally:
            linear.tp_all_reduce, embedding.tp_all_reduce = saved
    return run_meeting_only


def _with_two_shot(run, runner, slots: int):
    """`run` with the all-reduces through the two-shot kernel (`ParallelConfig.all_reduce=
    "two_shot"`, `slots` buffers, kept until the engine is released); a graph captured by `run`
    keeps it. Every rank runs it alike."""
    def run_two_shot(plan):
        enable_two_shot_all_reduce(runner.config.max_num_seqs * runner.model_config.hidden_size, runner.dtype,
                                   runner.device, slots=slots)
        try:
            return run(plan)
        finally:
            disable_two_shot_all_reduce(runner.device, keep_buffers=True)
    return run_two_shot


def all_reduce_overlap(step_ms: dict, whole: str, split: str) -> dict:
    """What the all-reduces add to a step of path `whole` and of its overlapped form `split`
    (micro-batches, or the two-shot all-reduce; with - without them, from `step_ms`: path name ->
    median device ms), and the fraction of it the split hides (or cuts): 1 - split cost / whole cost.
    Also what the split step pays over the faster of the two steps without all-reduces, and the
    fraction of the whole step's all-reduce cost this hides ("overall"): a split that slows the
    step's own work counts against it, one that speeds it up does not count for it."""
    cost = {name: step_ms[name] - step_ms[name + "_no_all_reduce"]
            for name in (whole, split) if name in step_ms and name + "_no_all_reduce" in step_ms}
    if whole not in cost:
        return {}
    out = {f"all_reduce_ms_{whole}": cost[whole]}
    if split in cost:
        overall = step_ms[split] - min(step_ms[whole + "_no_all_reduce"], step_ms[split + "_no_all_reduce"])
        hidden = (lambda c: 1 - c / cost[whole] if cost[whole] > 0 else None)
        out.update({f"all_reduce_ms_{split}": cost[split], f"all_reduce_hidden_fraction_{split}": hidden(cost[split]),
                    f"all_reduce_ms_{split}_overall": overall,
                    f"all_reduce_hidden_fraction_{split}_overall": hidden(overall)})
    return out


def all_reduce_meeting(step_ms: dict, name: str) -> dict:
    """What the all-reduces of path `name` cost (with - without them, from `step_ms`) split into
    meeting (the step meeting by one-element all-reduces - without) and the bytes (with - meeting
    only); empty when a timing is missing."""
    with_, meeting, without = (step_ms.get(name + suffix) for suffix in ("", MEETING_ONLY, "_no_all_reduce"))
    if None in (with_, meeting, without):
        return {}
    return {f"all_reduce_meeting_ms_{name}": meeting - without, f"all_reduce_bytes_ms_{name}": with_ - meeting}


def all_reduce_overlaps(step_ms: dict, micro_batches: int) -> dict:
    """`all_reduce_overlap` of every pair profile_mode times: micro-batches against the whole step
    (eager and graphs), the two-shot all-reduce against NCCL's, both against the two-shot alone, and
    the steps whose new rows go to a device buffer instead of host memory or to host memory by a
    kernel in each layer against the whole step; and
    `all_reduce_meeting` of the graphs, whole and split."""
    m = micro_batches
    return {**all_reduce_meeting(step_ms, "cuda_graph"),
            **all_reduce_meeting(step_ms, f"cuda_graph_{m}_micro_batches"),
            **all_reduce_overlap(step_ms, "eager", f"eager_{m}_micro_batches"),
            **all_reduce_overlap(step_ms, "cuda_graph", f"cuda_graph_{m}_micro_batches"),
            **all_reduce_overlap(step_ms, "cuda_graph", "cuda_graph_two_shot"),
            **all_reduce_overlap(step_ms, "cuda_graph_two_shot", f"cuda_graph_{m}_micro_batches_two_shot"),
            **all_reduce_overlap(step_ms, "cuda_graph", "cuda_graph" + HOST_WRITES_TO_DEVICE),
            **all_reduce_overlap(step_ms, "cuda_graph", "cuda_graph" + DIRECT_HOST_WRITES)}


def graph_path(runner, micro_batches: int, own_graphs: bool):
    """plan -> logits from CUDA graphs of the step in `micro_batches` micro-batches: the runner's
    graphs, or (own_graphs) graphs of their own, so that a variant captured without all-reduces
    does not replace the runner's."""
    graphs = runner.decode_graphs
    if own_graphs:
        graphs = DecodeGraphs(runner.model, runner.kv_cache, graphs.max_num_seqs, runner.max_model_len,
                              runner.block_size, runner.device, runner.micro_batch_streams)

    def run(plan):
        tables = runner.block_table_rows.gather(plan.hot_slots)
        return runner.model.compute_logits(graphs.run(dataclasses.replace(plan, micro_batches=micro_batches), tables))
    return _with_staged_row_copies(run, runner)


def trace_graph_paths(paths: dict, plan: StepPlan, dev: torch.device, before_step, args: argparse.Namespace,
                      mode: str) -> dict:
    """One traced replay of each CUDA-graph path on every rank (after `before_step` and a barrier,
    as a timed step): rank 0's timeline summaries (`kernel_gaps.timeline_summary`: the GPU's idle
    time, and before each all-reduce kernel) and every rank's idle time before its all-reduce
    kernels; with --out each rank's kernels to OUT.MODE.rankR.trace.json."""
    kernels = {}
    for name, run in paths.items():
        if name.startswith("cuda_graph"):
            _start_step(before_step, dev)
            kernels[name] = trace_kernels(lambda: run(plan), dev)
    summaries = {name: timeline_summary(k) for name, k in kernels.items()}
    if args.out:
        with open(f"{args.out}.{mode}.rank{current_state().rank}.trace.json", "w") as f:
            json.dump({name: [[n, round(s, 1), round(d, 1)] for n, s, d in k] for name, k in kernels.items()}, f)
    per_rank = tp_gather_objects({name: s["idle_before_matched_ms"] for name, s in summaries.items()})
    return {"graph_timelines": summaries, "per_rank_idle_before_all_reduce_ms": per_rank}


def profile_mode(mode: str, batch: int, args: argparse.Namespace, model_dir: str) -> dict:
    kcache = (KCacheConfig(mode="kcache", top_n=args.top_n, dense_layers=args.dense_layers,
                           row_cache_factor=args.row_cache_factor, scoring_keys=args.scoring_keys,
                           host_values=args.host_values)
              if mode == "kcache" else KCacheConfig(mode="full"))
    engine = LLMEngine(EngineConfig(model=model_dir, dtype=args.dtype, max_model_len=args.context,
                                    max_num_seqs=batch, gpu_memory_utilization=args.gpu_memory_utilization,
                                    host_memory_gb=args.host_memory_gb, load_format="random", kcache=kcache,
                                    enforce_eager=False,  # graphs in both modes, so both paths are timed
                                    parallel=ParallelConfig(tensor_parallel_size=current_state().tp_size)))
    runner = engine.runner
    dev = runner.device
    blocks_per_seq = -(-args.context // runner.block_size)
    fits = runner.num_kv_blocks // blocks_per_seq
    rank0 = current_state().rank == 0
    if batch > fits and rank0:
        print(f"{mode}: batch {batch} cut to {fits}, what the plan's {runner.num_kv_blocks} blocks hold", flush=True)
    batch = min(batch, fits)
    fill_device_pools(runner.kv_cache)
    plan = decode_plan(batch, args.context, blocks_per_seq)
    runner.block_table_rows.write(plan)  # every path below reads the plan's block tables from the runner
    m = args.micro_batches
    tp = current_state().tp_size > 1
    eager = _with_staged_row_copies(runner._execute_eager, runner)
    paths = {"eager": eager}
    if m > 1:
        paths[f"eager_{m}_micro_batches"] = lambda p: eager(dataclasses.replace(p, micro_batches=m))
    if tp:  # the same steps with the all-reduces left out (wrong sums, right timing)
        for name in list(paths):
            paths[name + "_no_all_reduce"] = _without_all_reduce(paths[name])
    if runner.decode_graphs is not None:
        counts = [1, m] if m > 1 else [1]
        for count in counts:
            name = "cuda_graph" if count == 1 else f"cuda_graph_{count}_micro_batches"
            paths[name] = graph_path(runner, count, own_graphs=False)
            if tp:  # captured with the all-reduces left out, and with one-element all-reduces instead
                paths[name + "_no_all_reduce"] = _without_all_reduce(graph_path(runner, count, own_graphs=True))
                paths[name + MEETING_ONLY] = _meeting_only(graph_path(runner, count, own_graphs=True))
        if tp and args.two_shot_all_reduce:  # graphs of their own captured with the two-shot all-reduce
            for count in counts:
                name = ("cuda_graph" if count == 1 else f"cuda_graph_{count}_micro_batches") + "_two_shot"
                paths[name] = _with_two_shot(graph_path(runner, count, own_graphs=True), runner, m)
        host_write_variants = [(HOST_WRITES_TO_DEVICE, _host_writes_to_device, args.host_writes_to_device),
                               (DIRECT_HOST_WRITES, _with_direct_host_writes, args.direct_host_writes)]
        for suffix, variant, wanted in host_write_variants:
            if wanted and mode == "kcache":  # graphs of their own, the decode's host writes elsewhere or direct
                paths["cuda_graph" + suffix] = variant(graph_path(runner, 1, own_graphs=True), runner.kv_cache)
                if tp:
                    paths["cuda_graph" + suffix + "_no_all_reduce"] = _without_all_reduce(
                        variant(graph_path(runner, 1, own_graphs=True), runner.kv_cache))
    row_cache = getattr(runner.kv_cache, "row_cache", None)
    before_step = None
    if row_cache is not None and args.row_cache_hit_rate < 1.0:
        generator = torch.Generator(device=dev).manual_seed(0)
        before_step = lambda: row_cache.forget_random(1.0 - args.row_cache_hit_rate, generator)  # noqa: E731
    misses = (lambda: int(row_cache.misses.sum())) if row_cache is not None else None  # noqa: E731
    timings = {name: time_step(run, plan, args.steps, dev, before_step, misses) for name, run in paths.items()}
    hit_rate = None
    if row_cache is not None:  # over the timed steps
        picks = len(paths) * args.steps * batch * len(row_cache.rows) * row_cache.rows[0].shape[1] * min(
            args.top_n, args.context - runner.config.kcache.sink_tokens - runner.config.kcache.recent_window)
        hit_rate = 1.0 - sum(t.pop("misses") for t in timings.values()) / picks
    medians = {name: t["device_ms_median"] for name, t in timings.items()}
    per_rank = tp_gather_objects(medians)  # a rank slower than the others would pass for all-reduce cost
    step_ms = dict(medians)
    for name in [n for n in medians if n.endswith("_two_shot")]:  # the same step without all-reduces
        step_ms[name + "_no_all_reduce"] = medians[name.removesuffix("_two_shot") + "_no_all_reduce"]
    overlap = all_reduce_overlaps(step_ms, m)
    timelines = trace_graph_paths(paths, plan, dev, before_step, args, mode) if args.trace_graphs else {}
    if before_step is not None:
        before_step()  # the profiled step misses as the timed ones do
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        runner._execute_eager(plan)
        torch.cuda.synchronize(dev)
    events = sorted(prof.key_averages(), key=lambda e: e.self_device_time_total, reverse=True)
    total_us = sum(e.self_device_time_total for e in events)
    rows = [{"name": e.key[:90], "calls": e.count, "device_ms": e.self_device_time_total / 1e3,
             "share": e.self_device_time_total / total_us if total_us else 0.0} for e in events[: args.rows]]
    result = {"mode": mode, "batch": batch, "context": args.context, "block_size": runner.block_size,
              "row_cache_factor": engine.config.kcache.row_cache_factor if mode == "kcache" else 0.0,
              "row_cache_hit_rate_requested": args.row_cache_hit_rate if row_cache is not None else None,
              "row_cache_hit_rate_measured": hit_rate,
              **{f"{name}_{k}": v for name, t in timings.items() for k, v in t.items()},
              "per_rank_device_ms_median": {name: [rank[name] for rank in per_rank] for name in medians},
              "profiled_device_ms_total": total_us / 1e3, "eager_profile": rows, **overlap, **timelines}
    if rank0:
        cached = f", row cache hit rate {hit_rate:.3f}" if hit_rate is not None else ""
        print(f"\n== {mode} batch {batch} @ {args.context}, TP={current_state().tp_size}{cached}: " + "; ".join(
            f"{name} device {t['device_ms_median']:.2f} ms, host until return {t['host_ms_median']:.2f} ms"
            for name, t in timings.items()), flush=True)
        if len(per_rank) > 1:
            print("  per rank: " + "; ".join(f"{name} " + " / ".join(f"{rank[name]:.2f}" for rank in per_rank) + " ms"
                                            for name in medians), flush=True)
        if overlap:
            print("  all-reduce: " + ", ".join(f"{k} {'n/a' if v is None else f'{v:.3f}'}" for k, v in overlap.items()),
                  flush=True)
        for name, t in timelines.get("graph_timelines", {}).items():
            idle_before = " / ".join(f"{rank[name]:.2f}" for rank in timelines["per_rank_idle_before_all_reduce_ms"])
            print(f"  timeline {name}: span {t['span_ms']:.2f} ms, GPU idle {t['idle_ms']:.2f} ms; {t['matched']} "
                  f"all-reduce kernels {t['matched_ms']:.2f} ms, GPU idle before them {idle_before} ms (per rank)",
                  flush=True)
        for r in rows:
            print(f"  {r['device_ms']:9.3f} ms {100 * r['share']:5.1f}%  x{r['calls']:<5d} {r['name']}")
    paths.clear()  # the closures hold the runner and graphs of their own
    del runner
    engine.release()
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main(argv=None) -> dict:
    args = parse_args(strip_local_rank_arg(sys.argv[1:] if argv is None else argv))
    init_parallel(launched_world_size(), device_type="cuda")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    batches = {k: int(v) for k, v in (pair.split("=") for pair in args.batch.split(","))}
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = write_shape_dir(args.model, os.path.join(scratch, args.model))
        results = [profile_mode(mode, b, args, model_dir) for mode, b in batches.items()]
    out = {"model": args.model, "device": torch.cuda.get_device_name(), "tp": current_state().tp_size,
           "results": results}
    if args.out and current_state().rank == 0:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()

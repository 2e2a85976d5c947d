#!/usr/bin/env python3
"""Does the row cache's miss gather hide behind the K pass of other sequences? (one GPU)

    python benchmarks/fetch_overlap.py --batch 72 --context 8192 --out OUT.json

KCache decode attention of `--layers` sparse layers, Llama-3-8B shape (8 KV heads, 4 query heads
each, head_dim 128, bf16, block 256), top_n 1024 through a 2 x top_n row cache (`FarRowCache`).
Each layer has its own pinned host pool (`HostPool`), so that, as in the engine, one layer's
translations of host addresses are cold when the next layer reads (see
`benchmarks/notes/kcache_triton.md`, (i b)); before every step a random 1 - `--hit-rate` of the
cached rows is forgotten, so the step's picks hit at that rate. Each variant runs as one CUDA graph
of the layers, median of `--reps` replays:

  base            `kcache_decode_triton` per layer: K pass + selection, row-cache bookkeeping, the
                  zero-copy gather of the misses (2 CTAs per SM), output.
  chunksN_gridG   the batch in N chunks of sequences: each chunk's K pass, selection and bookkeeping
                  on the compute stream, its misses gathered on a second stream by G CTAs while the
                  next chunk's K pass runs; each chunk's output after its gather.

Also `base` with every pick held (the step without misses) and chunks4_grid132 with every pick held
(the chunking's own cost), whose output must equal base's bit for bit (same picks, same rows).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from kcache_dist.cache.host_pool import HostPool  # noqa: E402
from kcache_dist.kcache.row_cache import FarRowCache  # noqa: E402
from kcache_dist.kcache.row_cache_triton import assign_rows  # noqa: E402
from kcache_dist.kcache.selection import SelectionSpec  # noqa: E402
from kcache_dist.kcache.triton_kcache import (gather_far_rows_zero_copy, kcache_decode_triton,  # noqa: E402
                                              score_and_select, sparse_output)

HKV, G, D, BS, TOP_N, HOT_ROWS = 8, 4, 128, 256, 1024, 132


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=72)
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--layers", type=int, default=6, help="sparse layers per step, each with its own host pool")
    p.add_argument("--hit-rate", type=float, default=0.892, help="share of a step's picks the row cache holds")
    p.add_argument("--chunks", default="2,4")
    p.add_argument("--grids", default="32,132,264", help="CTAs of the chunked variants' gather")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--out", default=None)
    return p.parse_args()


class Layers:
    """The device and host state of `layers` sparse layers of `batch` sequences of `context` tokens."""

    def __init__(self, batch: int, context: int, layers: int, dev: torch.device):
        self.batch, self.context, self.layers, self.dev = batch, context, layers, dev
        num_blocks = batch * (context // BS)
        shape = (num_blocks, HKV, BS, D)
        torch.manual_seed(0)
        self.pool = HostPool(HostPool.bytes_for([shape] * layers, torch.bfloat16), dev)
        self.v_host = [self.pool.take(shape, torch.bfloat16) for _ in range(layers)]
        for v in self.v_host:
            v.copy_(torch.randn(shape, dtype=torch.bfloat16, device=dev).cpu())
        self.k = [torch.randn(shape, dtype=torch.bfloat16, device=dev) for _ in range(layers)]
        self.v_hot = [torch.randn(batch + 1, HKV, HOT_ROWS, D, dtype=torch.bfloat16, device=dev)
                      for _ in range(layers)]
        self.q = [torch.randn(batch, HKV * G, D, dtype=torch.bfloat16, device=dev) for _ in range(layers)]
        self.tables = torch.randperm(num_blocks, device=dev).int().view(batch, context // BS)
        self.seq_lens = torch.full((batch,), context, dtype=torch.int64, device=dev)
        self.slots = torch.arange(batch, device=dev)
        self.cache = FarRowCache(layers, batch + 1, HKV, 2 * TOP_N, context, D, torch.bfloat16, dev)
        self.out = torch.empty(batch, HKV * G, D, dtype=torch.bfloat16, device=dev)
        self.spec = SelectionSpec(TOP_N, 4, 128, True, "max")
        self.scale = D ** -0.5
        self.fetch_stream = torch.cuda.Stream(dev)
        self._captured = []  # the chunked steps' tensors, alive for as long as their graphs

    def base(self, layer: int) -> None:
        kcache_decode_triton(self.q[layer], self.k[layer], self.v_host[layer], self.v_hot[layer], self.tables,
                             self.seq_lens, self.slots, self.spec, self.scale, max_seq_len=self.context,
                             out=self.out, row_cache=self.cache.layer(layer))

    def chunked(self, layer: int, chunks: int, grid: int) -> None:
        compute = torch.cuda.current_stream(self.dev)
        rows = self.cache.rows[layer].view(-1, D)
        per_chunk = -(-self.batch // chunks)
        pending = []
        for first in range(0, self.batch, per_chunk):
            seqs = slice(first, min(self.batch, first + per_chunk))
            sel = score_and_select(self.q[layer][seqs], self.k[layer], self.tables[seqs], self.seq_lens[seqs],
                                   self.context, self.spec, self.scale)
            far_rows, miss_idx = assign_rows(self.cache, layer, self.slots[seqs], sel.idx)
            self.fetch_stream.wait_stream(compute)
            with torch.cuda.stream(self.fetch_stream):
                gather_far_rows_zero_copy(self.v_host[layer], self.tables[seqs], miss_idx, out=rows, grid=grid,
                                          dst_rows=far_rows)
                fetched = torch.cuda.Event()
                fetched.record(self.fetch_stream)
            pending.append((seqs, sel, far_rows, miss_idx, fetched))
        for seqs, sel, far_rows, _, fetched in pending:
            compute.wait_event(fetched)
            sparse_output(sel, rows, self.v_hot[layer], self.seq_lens[seqs], self.slots[seqs], self.spec, HKV * G,
                          out=self.out[seqs], far_rows=far_rows)
        self._captured.append(pending)

    def step(self, variant, forks: bool):
        def run():
            if forks:
                self.fetch_stream.wait_stream(torch.cuda.current_stream(self.dev))
            for layer in range(self.layers):
                variant(layer)
            if forks:
                torch.cuda.current_stream(self.dev).wait_stream(self.fetch_stream)
        return run


def time_step(state: Layers, name: str, run, hit_rate: float, reps: int) -> tuple[dict, torch.Tensor]:
    """Median device ms of `reps` graph replays of `run`, a random 1 - hit_rate of the cached rows
    forgotten before each; the share of picks held as counted by the cache."""
    dev = state.dev
    generator = torch.Generator(device=dev).manual_seed(1)
    run()
    torch.cuda.synchronize(dev)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    graph.replay()
    torch.cuda.synchronize(dev)
    times_ms = []
    misses_before = int(state.cache.misses.sum())
    for _ in range(reps):
        if hit_rate < 1:
            state.cache.forget_random(1 - hit_rate, generator)
        torch.cuda.synchronize(dev)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times_ms.append(start.elapsed_time(end))
    picks = reps * state.layers * state.batch * HKV * TOP_N
    median = sorted(times_ms)[len(times_ms) // 2]
    result = {"variant": name, "hit_rate": hit_rate,
              "held": 1 - (int(state.cache.misses.sum()) - misses_before) / picks,
              "ms_median": median, "ms": times_ms, "per_layer_us": median / state.layers * 1e3}
    print(f"{name:>26}: held {result['held']:.3f}, {median:.3f} ms, {result['per_layer_us']:.0f} us a layer",
          flush=True)
    return result, state.out.clone()


def main() -> None:
    args = parse_args()
    dev = torch.device("cuda")
    state = Layers(args.batch, args.context, args.layers, dev)
    results = []
    r, base_all_held = time_step(state, "base_all_held", state.step(state.base, False), 1.0, args.reps)
    results.append(r)
    results.append(time_step(state, "base", state.step(state.base, False), args.hit_rate, args.reps)[0])
    for chunks in map(int, args.chunks.split(",")):
        for grid in map(int, args.grids.split(",")):
            run = state.step(lambda layer, c=chunks, g=grid: state.chunked(layer, c, g), True)
            results.append(time_step(state, f"chunks{chunks}_grid{grid}", run, args.hit_rate, args.reps)[0])
    run = state.step(lambda layer: state.chunked(layer, 4, 132), True)
    r, chunked_all_held = time_step(state, "chunks4_grid132_all_held", run, 1.0, args.reps)
    results.append(r)
    diff = (chunked_all_held.float() - base_all_held.float()).abs().max().item()
    print(f"max |chunked - base| with every pick held: {diff}")
    out = {"benchmark": "fetch_overlap", "device": torch.cuda.get_device_name(dev), "batch": args.batch,
           "context": args.context, "layers": args.layers, "top_n": TOP_N, "row_cache_factor": 2,
           "results": results, "chunked_minus_base_max_abs_all_held": diff}
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

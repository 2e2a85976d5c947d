#!/usr/bin/env python3
"""What one all-reduce of a decode step's activations costs on its own: NCCL against torch's
symmetric-memory one-shot and two-shot kernels (peer loads over NVLink; no multicast), bf16,
hidden 4096 x 16-512 tokens, each timed as a CUDA graph of 64 back-to-back calls (median of 7
replays, microseconds per call):

    torchrun --nproc_per_node 4 benchmarks/all_reduce.py OUT.json

Each kernel's result is also compared with NCCL's (max abs difference: the summation order
differs). `parallel.all_reduce="two_shot"` uses the two-shot kernel (`kcache_dist/parallel/
collectives.py`); what that saves inside a decode step is `profile_decode.py --two-shot-all-reduce`.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

TOKENS = (16, 64, 128, 256, 512)
HIDDEN = 4096
CALLS_PER_GRAPH = 64


def graph_us(fn) -> float:
    """Median microseconds per call of `fn` captured CALLS_PER_GRAPH times into one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS_PER_GRAPH):
            fn()
    times = []
    for _ in range(7):
        dist.barrier()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / CALLS_PER_GRAPH)
    return sorted(times)[len(times) // 2]


def main() -> None:
    import torch.distributed._symmetric_memory as symm_mem

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
    group_name = dist.group.WORLD.group_name
    result = {"world": world, "card": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    for tokens in TOKENS:
        n = tokens * HIDDEN
        x = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        reference = x.clone()
        dist.all_reduce(reference)
        row = {"tokens": tokens, "bytes": 2 * n}
        nccl_buffer = x.clone()
        row["nccl_us"] = graph_us(lambda: dist.all_reduce(nccl_buffer))
        symmetric = symm_mem.empty(n, dtype=torch.bfloat16, device="cuda")
        symm_mem.rendezvous(symmetric, group_name)
        out = torch.empty_like(x)
        symmetric.copy_(x)
        torch.ops.symm_mem.one_shot_all_reduce_out(symmetric, "sum", group_name, out)
        row["one_shot_max_abs_diff"] = (out.float() - reference.float()).abs().max().item()
        row["one_shot_us"] = graph_us(lambda: torch.ops.symm_mem.one_shot_all_reduce_out(symmetric, "sum",
                                                                                          group_name, out))
        symmetric.copy_(x)
        torch.ops.symm_mem.two_shot_all_reduce_(symmetric, "sum", group_name)
        row["two_shot_max_abs_diff"] = (symmetric.float() - reference.float()).abs().max().item()
        row["two_shot_us"] = graph_us(lambda: torch.ops.symm_mem.two_shot_all_reduce_(symmetric, "sum", group_name))
        result["rows"].append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(result, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

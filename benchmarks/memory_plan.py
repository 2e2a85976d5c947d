#!/usr/bin/env python3
"""Does the memory plan hold on a real GPU? For each mode and context length: build the engine on a
named model shape with random weights, run the planned max batch of max-length sequences (and the
smaller batches of `--batches`), and compare the plan's predicted peak GPU memory with
`torch.cuda.max_memory_allocated` after the run.

    python benchmarks/memory_plan.py --model llama3-8b --contexts 8192,32768 --modes full,kcache \
        --out benchmarks/results/memory_plan_llama3-8b.json

Each sequence is a random prompt of `context - decode_tokens` tokens that decodes `decode_tokens`
tokens (ignore_eos), so the cache is full at the end. No OOM is allowed anywhere; the target for
the peak is |measured / predicted - 1| <= 5%.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kcache_dist import KCacheConfig, RequestOutputKind, SamplingParams  # noqa: E402
from kcache_dist.config import EngineConfig, parse_host_memory_gb  # noqa: E402
from kcache_dist.engine.llm_engine import LLMEngine  # noqa: E402
from kcache_dist.models.named_shapes import write_shape_dir  # noqa: E402

GIB = 1 << 30


def run_requests(engine: LLMEngine, batch: int, prompt_len: int, decode_tokens: int, vocab: int, seed: int) -> float:
    """Generate for `batch` random prompts; returns seconds."""
    g = torch.Generator().manual_seed(seed)
    params = SamplingParams(max_tokens=decode_tokens, ignore_eos=True, temperature=0,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    for i in range(batch):
        engine.add_request(torch.randint(1, vocab, (prompt_len,), generator=g).tolist(), params, request_id=f"{seed}-{i}")
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def check_point(model_dir: str, mode: str, context: int, args) -> dict:
    kcache = KCacheConfig(mode=mode) if mode == "full" else KCacheConfig(mode="kcache", top_n=args.top_n,
                                                                          dense_layers=args.dense_layers)
    config = EngineConfig(model=model_dir, load_format="random", dtype=args.dtype, device=args.device,
                          max_model_len=context, max_num_seqs=args.max_num_seqs,
                          gpu_memory_utilization=args.gpu_memory_utilization, host_memory_gb=args.host_memory_gb,
                          kcache=kcache)
    t0 = time.perf_counter()
    engine = LLMEngine(config)
    plan = engine.runner.cache_plan
    point = {"mode": mode, "context": context, "start_s": time.perf_counter() - t0,
             "num_blocks": plan.num_blocks, "block_size": plan.block_size, "binding": plan.binding,
             "planned_max_batch": plan.num_full_length_seqs, "num_cache_tokens": plan.num_cache_tokens,
             "gpu_bytes_per_token": plan.gpu_bytes_per_token, "host_bytes_per_token": plan.host_bytes_per_token,
             "host_pool_bytes": plan.host_pool_bytes, "predicted_peak_gpu_bytes": plan.predicted_peak_gpu_bytes(),
             "runs": []}
    print(plan.table(), flush=True)
    vocab = engine.runner.model_config.vocab_size
    batches = sorted({b for b in args.batches if b < plan.num_full_length_seqs} | {plan.num_full_length_seqs})
    for batch in batches:
        on_gpu = args.device == "cuda"
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        try:
            seconds = run_requests(engine, batch, context - args.decode_tokens, args.decode_tokens, vocab, seed=batch)
            run = {"batch": batch, "seconds": seconds, "oom": False,
                   "max_memory_allocated_bytes": torch.cuda.max_memory_allocated() if on_gpu else None}
        except torch.cuda.OutOfMemoryError as e:
            run = {"batch": batch, "oom": True, "error": str(e)[:300]}
        point["runs"].append(run)
        print(f"{mode} ctx {context} batch {batch}: {run}", flush=True)
        if run["oom"]:
            break
    last = point["runs"][-1]
    if not last["oom"] and last["max_memory_allocated_bytes"] is not None:
        point["measured_over_predicted"] = last["max_memory_allocated_bytes"] / point["predicted_peak_gpu_bytes"]
    engine.release()
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return point


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama3-8b", help="a named shape (random weights)")
    parser.add_argument("--contexts", default="8192,32768")
    parser.add_argument("--modes", default="full,kcache")
    parser.add_argument("--batches", default="1", help="batches run before the planned max batch")
    parser.add_argument("--decode-tokens", type=int, default=4)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only checks that the script runs")
    parser.add_argument("--max-num-seqs", type=int, default=128)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--host-memory-gb", type=parse_host_memory_gb, default="auto", help="per rank, or auto")
    parser.add_argument("--top-n", type=int, default=KCacheConfig.top_n)
    parser.add_argument("--dense-layers", type=int, default=KCacheConfig.dense_layers)
    parser.add_argument("--out", default="benchmarks/results/memory_plan.json")
    args = parser.parse_args()
    args.batches = [int(b) for b in args.batches.split(",") if b]
    model_dir = write_shape_dir(args.model, tempfile.mkdtemp(prefix=f"{args.model}-"))
    result = {"card": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu", "model": args.model, "args": vars(args), "points": []}
    for context in (int(c) for c in args.contexts.split(",")):
        for mode in args.modes.split(","):
            result["points"].append(check_point(model_dir, mode, context, args))
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    print(f"\n{result['card']}, {args.model}, {args.dtype}")
    print("mode    context  planned max batch  binding      predicted peak  measured peak  ratio   OOM")
    for p in result["points"]:
        last = p["runs"][-1]
        measured = "-" if last["oom"] or last["max_memory_allocated_bytes"] is None else \
            f"{last['max_memory_allocated_bytes'] / GIB:8.2f} GiB"
        ratio = f"{p.get('measured_over_predicted', float('nan')):.3f}"
        print(f"{p['mode']:7s} {p['context']:7d}  {p['planned_max_batch']:17d}  {p['binding']:11s}  "
              f"{p['predicted_peak_gpu_bytes'] / GIB:9.2f} GiB  {measured:>13s}  {ratio}  "
              f"{any(r['oom'] for r in p['runs'])}")


if __name__ == "__main__":
    main()

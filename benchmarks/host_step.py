#!/usr/bin/env python3
"""The host side of an engine decode step: scheduling, the forward's inputs, sampling, detokenizing
and outputs (by default only as requests finish: FINAL_ONLY, as `LLM.generate` asks), with the
forward itself stubbed out (CPU, no GPU needed).

    python benchmarks/host_step.py                       # 267 sequences of 8K, full mode
    python benchmarks/host_step.py --batch 64 --profile  # and the cProfile table of the timed steps
    python benchmarks/host_step.py --prompt-tokens 100 --max-model-len 4224 --output-tokens 4000 \
        --output-kind cumulative                         # outputs 4000 tokens long, every step reported

An engine on the `tiny-llama` shape (block size 16, as full mode on a GPU) gets --batch prompts of
--prompt-tokens random tokens; its runner builds each step's inputs (`ModelRunner._prepare`: positions,
cache slots, padded block tables) and returns random logits, so prefill and decode cost no compute. Once every sequence decodes, --steps decode steps are timed. What is left is what a
GPU step pays on top of its forward at that batch (benchmarks/notes/throughput.md: "The engine's host step").
The step plan that tensor-parallel workers would get, its block tables as the blocks each plan adds
(`BlockTableRows`), is also pickled and unpickled and timed, against the same plan with whole tables.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import json
import os
import pickle
import pstats
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from kcache_dist import RequestOutputKind, SamplingParams  # noqa: E402
from kcache_dist.config import EngineConfig, KCacheConfig  # noqa: E402
from kcache_dist.engine.llm_engine import LLMEngine  # noqa: E402
from kcache_dist.models.named_shapes import shape_config, write_shape_dir  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=267)
    p.add_argument("--prompt-tokens", type=int, default=7000)
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--output-tokens", type=int, default=0,
                   help="decode steps run untimed before the timed ones (outputs that long when timed)")
    p.add_argument("--output-kind", choices=[k.name.lower() for k in RequestOutputKind], default="final_only",
                   help="SamplingParams.output_kind of the requests (LLM.generate asks for final_only)")
    p.add_argument("--profile", action="store_true", help="print the cProfile table of the timed steps")
    p.add_argument("--out", default=None, help="JSON file for the result")
    return p.parse_args(argv)


def _ms(seconds: list[float]) -> dict:
    return {"median": 1e3 * statistics.median(seconds), "min": 1e3 * min(seconds)}


def run(args: argparse.Namespace, scratch_dir: str) -> dict:
    model_dir = write_shape_dir("tiny-llama", os.path.join(scratch_dir, "tiny-llama"))
    shape = shape_config("tiny-llama")
    head_dim = shape.get("head_dim") or shape["hidden_size"] // shape["num_attention_heads"]
    kv_bytes_per_token = 2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * head_dim * 4  # float32
    cache_gb = 1.1 * args.batch * args.max_model_len * kv_bytes_per_token / 2 ** 30  # every sequence at full length
    engine = LLMEngine(EngineConfig(model=model_dir, device="cpu", dtype="float32", max_model_len=args.max_model_len,
                                    max_num_seqs=args.batch, max_num_batched_tokens=max(8192, args.prompt_tokens),
                                    load_format="random", kcache=KCacheConfig(mode="full"), cpu_kv_cache_gb=cache_gb))
    vocab = engine.model_config.vocab_size
    runner = engine.runner

    def prepare_only(plan):  # the step's inputs are built as for a forward; the forward itself is skipped
        runner.block_table_rows.write(plan)
        runner._prepare(plan)
        return torch.randn(sum(plan.sample), vocab)
    runner.execute = prepare_only
    generator = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0, max_tokens=args.max_model_len, ignore_eos=True,
                            output_kind=RequestOutputKind[args.output_kind.upper()])
    for _ in range(args.batch):
        engine.add_request(torch.randint(0, vocab, (args.prompt_tokens,), generator=generator).tolist(), params)
    while engine.scheduler.waiting or any(s.num_uncomputed_tokens > 1 for s in engine.scheduler.running):
        engine.step()
    running = len(engine.scheduler.running)
    if running < args.batch:
        raise SystemExit(f"only {running} of {args.batch} sequences decode together; raise --max-model-len")
    for _ in range(args.output_tokens):
        engine.step()
    engine.step()  # warm
    step_s, profiler = [], cProfile.Profile() if args.profile else None
    for _ in range(args.steps):
        if profiler:
            profiler.enable()
        t0 = time.perf_counter()
        engine.step()
        step_s.append(time.perf_counter() - t0)
        if profiler:
            profiler.disable()
    plan = engine.scheduler.schedule()  # one more decode plan, as the scheduling rank sends it (not run)
    tables = {s.seq_id: s.block_table for s in engine.scheduler.running}
    whole = dataclasses.replace(plan, kept_blocks=[0] * plan.num_seqs, new_blocks=[tables[s] for s in plan.seq_ids])
    whole_s, delta_s = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        pickle.loads(pickle.dumps(whole))
        whole_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        pickle.loads(pickle.dumps(plan))
        delta_s.append(time.perf_counter() - t0)
    result = {"benchmark": "host_step", "batch": running, "prompt_tokens": args.prompt_tokens,
              "output_tokens_before_timing": args.output_tokens, "output_kind": args.output_kind,
              "blocks_per_table": max(map(len, tables.values())), "cpu_threads": torch.get_num_threads(),
              "decode_step_ms": _ms(step_s),
              "plan_to_workers_ms": {"whole": _ms(whole_s), "block_table_delta": _ms(delta_s)},
              "plan_bytes": {"whole": len(pickle.dumps(whole)), "block_table_delta": len(pickle.dumps(plan))}}
    if profiler:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(20)
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        result = run(args, scratch)
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()

"""Greedy generation in a launched job: functions for forkserver ranks (tests/test_tp_engine.py) and
a script for the real launchers, which prints rank 0's token ids as one JSON line "TOKENS [...]" per
run (one run by default; --runs gives several, one LLM after another in the same job):

    mpirun -np 2 python tests/dist_scripts/generate.py --model DIR --tp 2
    deepspeed --num_gpus 2 tests/dist_scripts/generate.py --model DIR --tp 2   (appends --local_rank=N)
    mpirun -np 4 python tests/dist_scripts/generate.py --model DIR --tp 4 --device cuda \
        --runs '[{"kcache": {"mode": "kcache", "top_n": 8}, "engine": {"dtype": "float32"}}]'

A run's "engine" holds LLM keyword arguments; its "parallel" entry holds ParallelConfig fields.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

PROMPTS = ["Hello", "The quick brown fox jumps over the lazy dog.", "Once upon a time there was a small model",
           "Long contexts need a lot of memory, so the values may live in host memory while the keys stay"]


def generate(model_dir: Optional[str], tp: int, kcache: Optional[dict], max_tokens: int,
             prompts: list = PROMPTS, die_on_rank: Optional[int] = None,
             engine: Optional[dict] = None, device: str = "cpu",
             slow_rank: Optional[tuple[int, float]] = None) -> list[list[int]]:
    """Every rank builds the LLM (with the EngineConfig fields `engine`, e.g. load_format) on
    `device` and calls generate on `prompts` (texts or token-id lists); rank 0 returns the token ids
    (others []). slow_rank (rank, seconds): that rank's steps each take that much longer."""
    from kcache_dist import LLM, KCacheConfig, SamplingParams

    llm = LLM(device=device, model=model_dir, tensor_parallel_size=tp,
              kcache=KCacheConfig(**kcache) if kcache else None, **(engine or {}))
    if die_on_rank is not None and llm.engine.parallel.rank == die_on_rank:
        execute, calls = llm.engine.runner.execute, []

        def execute_then_die(plan):  # this rank dies after a few steps, mid-generation
            calls.append(1)
            if len(calls) == 3:
                os._exit(9)
            return execute(plan)
        llm.engine.runner.execute = execute_then_die
    if slow_rank is not None and llm.engine.parallel.rank == slow_rank[0]:
        import time

        execute_fast = llm.engine.runner.execute

        def execute_slowly(plan):
            time.sleep(slow_rank[1])
            return execute_fast(plan)
        llm.engine.runner.execute = execute_slowly
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    llm.engine.release()  # a job may build another LLM next (--runs)
    return [o.outputs[0].token_ids for o in outputs]


def engine_arguments(engine: Optional[dict]) -> dict:
    """LLM keyword arguments from a JSON run's "engine" (its "parallel" dict made a ParallelConfig)."""
    from kcache_dist.config import ParallelConfig

    engine = dict(engine or {})
    if "parallel" in engine:
        engine["parallel"] = ParallelConfig(**engine["parallel"])
    return engine


def main() -> None:
    from kcache_dist.parallel import exit_on_lost_rank, shutdown_parallel, strip_local_rank_arg

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runs", type=json.loads, default=[{}],
                        help='JSON list of {"kcache": KCacheConfig fields or null, "engine": LLM arguments}')
    args = parser.parse_args(strip_local_rank_arg(sys.argv[1:]))
    import torch

    torch.set_num_threads(1)
    with exit_on_lost_rank():
        for run in args.runs:
            tokens = generate(args.model, args.tp, run.get("kcache"), args.max_tokens, PROMPTS, None,
                              engine_arguments(run.get("engine")), args.device)
            if tokens:
                print("TOKENS " + json.dumps(tokens), flush=True)
    shutdown_parallel()  # before interpreter exit tears down the process group's threads


if __name__ == "__main__":
    main()

"""Tensor and data parallelism through the engine, on CPU ranks over gloo: TP=2 and TP=4 (also
with more ranks than KV heads) and DP 2 x TP 2 give the same greedy tokens as one process, in full
and KCache modes, from a checkpoint or from random weights of a named shape; the real launchers run
it; a rank that dies mid-generation ends the job. KCache also with every sparse layer picking
(at TP=4 with KV heads replicated over ranks: `parallel/kv_head_replicas.py`), with fp8 scoring keys
and with fp8 host values, also micro-batched."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from dist_scripts.generate import PROMPTS, generate
from dist_scripts.multiprocess import free_port, run_rank_outcomes
from kcache_dist.config import ParallelConfig
from kcache_dist.models.named_shapes import write_shape_dir
from kcache_dist.parallel.launcher import mpirun_flags

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS_DIR)
KCACHE = {"mode": "kcache", "top_n": 64, "dense_layers": 1, "sink_tokens": 4, "recent_window": 16}
# a budget below the prompts' contexts: every sparse layer picks (at TP=4 each KV head of the tiny
# models is on two ranks, each with half its query heads, which must pick as the whole group does)
KCACHE_PICKING = {"mode": "kcache", "top_n": 8, "dense_layers": 1, "sink_tokens": 2, "recent_window": 4}
# fp8 scoring keys: each rank picks with its KV heads' float8 K
KCACHE_FP8 = {**KCACHE_PICKING, "scoring_keys": "fp8"}
# fp8 host values: scales per (position, KV head), so each rank quantizes its KV heads as one process does
KCACHE_FP8_VALUES = {**KCACHE_PICKING, "host_values": "fp8"}


def run_job(world: int, *args, timeout_s: float = 120.0) -> list:
    outcomes = run_rank_outcomes(generate, world_size=world, args=args, timeout_s=timeout_s)
    for o in outcomes:
        assert o.exitcode == 0 and o.error is None, f"rank {o.rank} failed:\n{o.error}\n{o.output[-3000:]}"
    assert all(o.result == [] for o in outcomes[1:])  # results come back on global rank 0 only
    return outcomes[0].result


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir"])
@pytest.mark.parametrize("kcache", [None, KCACHE, KCACHE_PICKING, {**KCACHE_PICKING, "group_reduce": "sum"},
                                    KCACHE_FP8, KCACHE_FP8_VALUES],
                         ids=["full", "kcache", "kcache-picking", "kcache-picking-sum", "kcache-fp8",
                              "kcache-fp8-values"])
def test_tp2_and_tp4_equal_tp1(fixture, kcache, request):
    model_dir = request.getfixturevalue(fixture)  # 4 query heads, 2 KV heads: TP=4 replicates KV heads
    reference = generate(model_dir, 1, kcache, 24)
    assert run_job(2, model_dir, 2, kcache, 24) == reference
    assert run_job(4, model_dir, 4, kcache, 24) == reference


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-qwen2"])
def test_random_weights_tp2_equal_tp1(shape, tmp_path):
    """load_format="random" draws each checkpoint tensor whole and each rank keeps its slice, so
    TP=2 holds the same model as TP=1 with no checkpoint on disk (tiny-qwen2: q/k/v bias, tied)."""
    model_dir = write_shape_dir(shape, str(tmp_path))
    engine = {"load_format": "random", "seed": 3, "max_model_len": 128, "cpu_kv_cache_gb": 0.01}
    prompts = [[1, 2, 3, 4], list(range(100, 140)), [7, 300, 7, 301, 7, 302]]
    reference = generate(model_dir, 1, None, 16, prompts, None, engine)
    assert len({t for tokens in reference for t in tokens}) > 3  # not one repeated token
    assert run_job(2, model_dir, 2, None, 16, prompts, None, engine) == reference


@pytest.mark.parametrize("kcache", [None, KCACHE_PICKING, KCACHE_FP8_VALUES],
                         ids=["full", "kcache", "kcache-fp8-values"])
def test_tp2_with_preemption_and_chunked_prefill_equals_tp1(tiny_llama_dir, kcache):
    """Sequences preempted (their blocks freed, new tables when they come back) and prompts
    prefilled in chunks: the workers keep every plan's block tables from the blocks each plan
    adds (`engine/block_table_rows.py`), and the tokens are one process's (in KCache mode a later
    chunk reads its earlier chunks' V back from each rank's host pool)."""
    from kcache_dist import LLM, KCacheConfig, SamplingParams

    engine = {"block_size": 4, "num_kv_blocks": 16, "max_model_len": 64, "max_num_batched_tokens": 7}
    llm = LLM(device="cpu", model=tiny_llama_dir, kcache=KCacheConfig(**kcache) if kcache else None, **engine)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    assert llm.engine.scheduler.num_preemptions > 0
    reference = [o.outputs[0].token_ids for o in outputs]
    assert run_job(2, tiny_llama_dir, 2, kcache, 24, PROMPTS, None, engine) == reference


@pytest.mark.parametrize("kcache", [None, KCACHE, KCACHE_FP8, KCACHE_FP8_VALUES],
                         ids=["full", "kcache", "kcache-fp8", "kcache-fp8-values"])
def test_tp2_micro_batched_decode_equals_tp1(tiny_llama_dir, kcache):
    """Micro-batches run their blocks, each ending in an all-reduce, in the same order on every rank."""
    reference = generate(tiny_llama_dir, 1, kcache, 24)
    assert run_job(2, tiny_llama_dir, 2, kcache, 24, PROMPTS, None, {"decode_micro_batches": 2}) == reference


def test_tp4_micro_batched_decode_with_replicated_kv_heads_equals_tp1(tiny_llama_dir):
    """Each micro-batch's sparse layers gather their KV heads' query groups (an all-gather per
    layer beside the all-reduces), in the same order on every rank."""
    reference = generate(tiny_llama_dir, 1, KCACHE_PICKING, 24)
    assert run_job(4, tiny_llama_dir, 4, KCACHE_PICKING, 24, PROMPTS, None, {"decode_micro_batches": 2}) == reference


def test_dp2_x_tp2_returns_every_output_in_order(tiny_llama_dir):
    prompts = PROMPTS + ["A fifth prompt", "and a sixth one, longer than the fifth"]
    reference = generate(tiny_llama_dir, 1, KCACHE, 16, prompts)
    assert run_job(4, tiny_llama_dir, 2, KCACHE, 16, prompts) == reference


def test_replicas_that_finish_far_apart_still_gather(tiny_llama_dir):
    """DP 2 x TP 1 with a 3 s collective timeout, the second replica ~6 s slower (0.4 s a step): the
    first waits for it, beyond the timeout, while it keeps making progress; every output comes back."""
    reference = generate(tiny_llama_dir, 1, None, 16)
    engine = {"parallel": ParallelConfig(collective_timeout_s=3.0)}
    outcomes = run_rank_outcomes(generate, world_size=2, args=(tiny_llama_dir, 1, None, 16, PROMPTS, None, engine,
                                                               "cpu", (1, 0.4)), timeout_s=90)
    for o in outcomes:
        assert o.exitcode == 0 and o.error is None, f"rank {o.rank} failed:\n{o.error}\n{o.output[-3000:]}"
    assert outcomes[0].result == reference and outcomes[1].result == []


def test_replica_that_dies_is_named_by_the_waiting_one(tiny_llama_dir):
    """DP 2 x TP 1: the second replica's rank dies mid-generation; the first, done, stops waiting
    for it once it has shown no progress for the collective timeout, naming it."""
    engine = {"parallel": ParallelConfig(collective_timeout_s=3.0)}
    start = time.monotonic()
    outcomes = run_rank_outcomes(generate, world_size=2, args=(tiny_llama_dir, 1, None, 24, PROMPTS, 1, engine),
                                 timeout_s=60, stop_on_first_error=False)
    assert outcomes[1].exitcode == 9
    assert "data-parallel replica 1 (leader rank 1) made no progress for the collective timeout of 3 s" in \
        (outcomes[0].error or ""), outcomes[0].output[-2000:]
    assert time.monotonic() - start < 45


def test_default_model_tp3_equals_tp1(default_model_dir):
    """The embedded default model (9 attention heads, 3 KV heads) over 3 ranks."""
    prompts = ["The capital of France is", "def fibonacci(n):"]
    reference = generate(None, 1, None, 12, prompts)
    engine = {"parallel": ParallelConfig(collective_timeout_s=90.0)}
    assert run_job(3, None, 3, None, 12, prompts, None, engine, timeout_s=240) == reference


def test_tp_size_that_does_not_divide_the_heads(tiny_llama_dir):
    outcomes = run_rank_outcomes(generate, world_size=3, args=(tiny_llama_dir, 3, None, 4), timeout_s=60,
                                 stop_on_first_error=False)
    for o in outcomes:
        assert "the model's 4 attention heads are not divisible by tensor_parallel_size 3" in (o.error or "")


def test_rank_killed_mid_generation_ends_the_job(tiny_llama_dir):
    start = time.monotonic()
    outcomes = run_rank_outcomes(generate, world_size=2, args=(tiny_llama_dir, 2, None, 24, PROMPTS, 1),
                                 timeout_s=90, stop_on_first_error=False)
    assert time.monotonic() - start < 60
    assert outcomes[1].exitcode == 9
    assert outcomes[0].exitcode != 0 or outcomes[0].error
    assert "lost rank(s) [1]" in (outcomes[0].error or "") + outcomes[0].output


def launch_runs(command: list[str], num_runs: int, timeout_s: float = 180) -> list[list[list[int]]]:
    """The token ids of each of the `num_runs` runs that a launched generate.py job prints."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT, TESTS_DIR, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [l for l in done.stdout.splitlines() if l.startswith("TOKENS ")]
    assert len(lines) == num_runs, done.stdout[-3000:]
    return [json.loads(line[len("TOKENS "):]) for line in lines]


def _launch(command: list[str]) -> list[list[int]]:
    return launch_runs(command, 1)[0]


SCRIPT = os.path.join("tests", "dist_scripts", "generate.py")


@pytest.mark.skipif(shutil.which("mpirun", path=os.path.dirname(sys.executable)) is None and
                    shutil.which("mpirun") is None, reason="no mpirun on this machine")
def test_mpirun_two_ranks_equal_one_process(tiny_llama_dir):
    mpirun = shutil.which("mpirun", path=os.path.dirname(sys.executable)) or shutil.which("mpirun")
    reference = generate(tiny_llama_dir, 1, None, 16)
    assert _launch([mpirun, *mpirun_flags(mpirun), "-np", "2", sys.executable, SCRIPT, "--model", tiny_llama_dir,
                    "--tp", "2"]) == reference


@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="no deepspeed launcher on this machine")
def test_deepspeed_launcher_two_ranks_equal_one_process(tiny_llama_dir):
    reference = generate(tiny_llama_dir, 1, None, 16)
    command = ["deepspeed", "--num_gpus", "2", "--master_addr", "127.0.0.1", SCRIPT, "--model", tiny_llama_dir,
               "--tp", "2"]
    assert _launch(command) == reference


def test_tensor_parallel_size_argument_keeps_the_other_parallel_settings(tiny_llama_dir):
    from kcache_dist import LLM

    llm = LLM(model=tiny_llama_dir, device="cpu", tensor_parallel_size=1,
              parallel=ParallelConfig(collective_timeout_s=90.0, all_reduce="two_shot"))
    try:  # with one rank there is nothing to sum: two_shot is accepted off CUDA and allocates nothing
        assert llm.config.parallel == ParallelConfig(tensor_parallel_size=1, collective_timeout_s=90.0,
                                                     all_reduce="two_shot")
    finally:
        llm.engine.release()

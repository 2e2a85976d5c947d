"""Tensor parallelism on several GPUs: `mpirun -np N` ranks, one GPU each, NCCL (and the two-shot
all-reduce), CUDA-graph decode, pinned host V pools, give the greedy tokens of one GPU, in full mode
and in KCache mode with every sparse layer picking (max and sum over the query group, fp8 scoring
keys, fp8 host values, two micro-batches, op by op). With more ranks than KV heads each KV head is
on several ranks, each with part of its query heads (`parallel/kv_head_replicas.py`): the tiny
Llama (2 KV heads) at TP=4, where a KV head's gathered query group is a strided view of the
all-gather, and a one-KV-head model at TP=2, where it is all of it. float32, so that the
row-parallel all-reduce's summation order does not flip a token. Skipped with fewer GPUs than the TP size or
without mpirun; tests/test_tp_engine.py runs the same checks on CPU ranks over gloo."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import torch

from conftest import save_tiny_model
from dist_scripts.generate import PROMPTS, engine_arguments, generate
from kcache_dist.parallel.launcher import mpirun_flags
from test_tp_engine import KCACHE_FP8, KCACHE_FP8_VALUES, KCACHE_PICKING, ROOT, SCRIPT, launch_runs

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from multi_gpu import first_difference  # noqa: E402

MPIRUN = shutil.which("mpirun", path=os.path.dirname(sys.executable)) or shutil.which("mpirun")
FLOAT32 = {"dtype": "float32"}
RUNS = [  # (id, run): each run's tokens at TP=N against its own tokens on one GPU
    ("full", {"kcache": None, "engine": FLOAT32}),
    ("kcache-picking", {"kcache": KCACHE_PICKING, "engine": FLOAT32}),
    ("kcache-picking-sum", {"kcache": {**KCACHE_PICKING, "group_reduce": "sum"}, "engine": FLOAT32}),
    ("kcache-fp8", {"kcache": KCACHE_FP8, "engine": FLOAT32}),
    ("kcache-fp8-values", {"kcache": KCACHE_FP8_VALUES, "engine": FLOAT32}),
    ("kcache-eager", {"kcache": KCACHE_PICKING, "engine": {**FLOAT32, "enforce_eager": True}}),
    ("kcache-micro-batched", {"kcache": KCACHE_PICKING, "engine": {**FLOAT32, "decode_micro_batches": 2}}),
    ("kcache-two-shot", {"kcache": KCACHE_PICKING, "engine": {**FLOAT32, "parallel": {"all_reduce": "two_shot"}}}),
]
MAX_TOKENS = 24


@pytest.fixture(scope="session")
def tiny_mqa_dir(tmp_path_factory, tokenizer_dir) -> str:
    """Llama with one KV head for its 4 query heads: at TP=2 both ranks hold it."""
    return save_tiny_model(str(tmp_path_factory.mktemp("tiny_mqa")), tokenizer_dir, "LlamaForCausalLM",
                           num_key_value_heads=1)


@pytest.mark.skipif(MPIRUN is None, reason="no mpirun on this machine")
@pytest.mark.parametrize("tp, fixture", [(2, "tiny_llama_dir"), (2, "tiny_mqa_dir"), (4, "tiny_llama_dir")])
def test_tp_on_gpus_equals_one_gpu(tp, fixture, request):
    if torch.cuda.device_count() < tp:
        pytest.skip(f"needs {tp} CUDA devices, this machine has {torch.cuda.device_count()}")
    model_dir = request.getfixturevalue(fixture)
    runs = [run for _, run in RUNS]
    reference = [generate(model_dir, 1, run["kcache"], MAX_TOKENS, PROMPTS, None,
                          engine_arguments({k: v for k, v in run["engine"].items() if k != "parallel"}), "cuda")
                 for run in runs]  # one GPU: nothing to sum, so no all-reduce to choose
    command = [MPIRUN, *mpirun_flags(MPIRUN), "-np", str(tp), sys.executable, SCRIPT, "--model", model_dir,
               "--tp", str(tp), "--device", "cuda", "--max-tokens", str(MAX_TOKENS), "--runs", json.dumps(runs)]
    tokens = launch_runs(command, len(runs), timeout_s=600)
    differ = {name: first_difference(a, b) for (name, _), a, b in zip(RUNS, reference, tokens) if a != b}
    assert not differ, f"TP={tp} differs from one GPU (run: first differing token per prompt): {differ}"

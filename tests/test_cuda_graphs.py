"""CUDA-graph decode (engine/cuda_graphs.py): buckets on any machine; on a GPU, graph replays give
the tokens and counts of the eager path in full mode and KCache mode (fp8 scoring keys too, once
the engine allows them on CUDA)."""

from __future__ import annotations

import pytest
import torch

from conftest import PROMPTS
from helpers import token_ids
from kcache_dist import LLM, KCacheConfig, SamplingParams
from kcache_dist.engine.cuda_graphs import batch_buckets, bucket_of, context_buckets, graphs_enabled

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_graphs_by_default_on_cuda():
    assert graphs_enabled(None, "cuda", True) and graphs_enabled(False, "cuda", True)
    assert not graphs_enabled(True, "cuda", True)
    assert not graphs_enabled(False, "cpu", True) and not graphs_enabled(False, "cuda", False)


def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(3) == [1, 2, 3]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(30) == [1, 2, 4, 8, 16, 24, 30]


def test_context_buckets_and_bucket_of():
    assert context_buckets(200) == [200]
    assert context_buckets(1000) == [256, 512, 1000]
    assert context_buckets(1024) == [256, 512, 1024]
    buckets = batch_buckets(30)
    assert [bucket_of(n, buckets) for n in (1, 3, 4, 5, 17, 24, 25, 30)] == [1, 4, 4, 8, 24, 24, 30, 30]


# Requests of different lengths, so the batch shrinks (3 batch buckets) and contexts cross 256.
LENGTHS = [300, 40, 120, 200, 9, 250, 60]
PROMPT_LIST = [PROMPTS[i % len(PROMPTS)] * (1 + i) for i in range(len(LENGTHS))]
MODES = {
    "full": KCacheConfig(mode="full"),
    "kcache": KCacheConfig(mode="kcache", top_n=16, dense_layers=1, sink_tokens=2, recent_window=8),
    "kcache-no-window": KCacheConfig(mode="kcache", top_n=16, dense_layers=1, sink_tokens=2, recent_window=0),
    "kcache-fp8": KCacheConfig(mode="kcache", top_n=16, dense_layers=1, sink_tokens=2, recent_window=8,
                               scoring_keys="fp8"),
}


def _generate(model_dir: str, kcache: KCacheConfig, enforce_eager: bool, micro_batches: int = 1):
    llm = LLM(model=model_dir, dtype="float32", device="cuda", kcache=kcache, enforce_eager=enforce_eager,
              max_model_len=512, max_num_seqs=8, decode_micro_batches=micro_batches)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in LENGTHS]
    outputs = llm.generate(PROMPT_LIST, params)
    return llm, outputs


@cuda
@pytest.mark.parametrize("micro_batches", [1, 3])
@pytest.mark.parametrize("mode", list(MODES))
def test_graph_decode_equals_eager_decode(tiny_llama_dir, mode, micro_batches):
    """Graphs of whole steps, and of steps in 3 micro-batches on 3 streams (batch buckets 8 / 4 / 2 in
    3 / 3 / 2 parts, padding rows in some), against whole eager steps."""
    eager_llm, eager = _generate(tiny_llama_dir, MODES[mode], enforce_eager=True)
    graph_llm, graphs = _generate(tiny_llama_dir, MODES[mode], enforce_eager=False, micro_batches=micro_batches)
    assert eager_llm.engine.runner.decode_graphs is None
    captured = graph_llm.engine.runner.decode_graphs._graphs
    assert len(captured) >= 4  # batch 8 / 4 / 2 / 1 buckets, contexts 256 / 512
    assert {parts for batch, _, parts in captured} == ({1} if micro_batches == 1 else {1, 2, 3})
    assert [len(o.outputs[0].token_ids) for o in graphs] == LENGTHS
    assert token_ids(graphs) == token_ids(eager)
    cache = graph_llm.engine.runner.kv_cache
    assert getattr(cache, "v_rows_fetched", 0) == getattr(eager_llm.engine.runner.kv_cache, "v_rows_fetched", 0)
    if mode != "full":
        assert cache.v_rows_fetched > 0
    blocks = graph_llm.engine.scheduler.block_manager
    assert blocks.num_free_blocks == blocks.num_blocks  # every request done, every block back


@cuda
@pytest.mark.parametrize("mode", ["full", "kcache"])
def test_graph_steps_between_prefill_chunks_equal_eager(tiny_llama_dir, mode):
    """A token budget smaller than the running batch: some running sequences sit out a step, and
    budget leftovers give 1-token prefill chunks, so decode-only (graph) steps come between
    chunked prefills and run with padding rows."""
    kwargs = dict(dtype="float32", device="cuda", kcache=MODES[mode], max_model_len=512, max_num_seqs=8,
                  max_num_batched_tokens=5)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in LENGTHS]
    eager = LLM(model=tiny_llama_dir, enforce_eager=True, **kwargs).generate(PROMPT_LIST, params)
    graph_llm = LLM(model=tiny_llama_dir, enforce_eager=False, **kwargs)
    graphs = graph_llm.generate(PROMPT_LIST, params)
    assert graph_llm.engine.runner.decode_graphs.num_captured > 0
    assert token_ids(graphs) == token_ids(eager)


@cuda
@pytest.mark.parametrize("micro_batches", [1, 3])
@pytest.mark.parametrize("host_values", ["model", "fp8"])
def test_staged_decode_rows_equal_direct_host_writes(tiny_llama_dir, micro_batches, host_values):
    """`DecodeRowsStage` on CUDA (a window of 16: chunks of 8 copied by the copy engine after the
    step that closes them): eager steps and graph replays give the tokens and read the far rows of
    eager steps whose decode stores every new row into the host pool in its layer."""
    kcache = KCacheConfig(mode="kcache", top_n=16, dense_layers=1, sink_tokens=2, recent_window=16,
                          host_values=host_values)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in LENGTHS]
    results = {}
    for name, eager, staged in (("direct", True, False), ("staged_eager", True, True), ("staged_graphs", False, True)):
        llm = LLM(model=tiny_llama_dir, dtype="float32", device="cuda", kcache=kcache, enforce_eager=eager,
                  max_model_len=512, max_num_seqs=8, decode_micro_batches=micro_batches)
        cache = llm.engine.runner.kv_cache
        assert cache.decode_stage.chunk_rows == 8
        if not staged:
            cache.decode_stage = None
        results[name] = (token_ids(llm.generate(PROMPT_LIST, params)), cache.v_rows_fetched)
        if not eager:
            assert llm.engine.runner.decode_graphs.num_captured >= 4
    assert results["staged_eager"] == results["staged_graphs"] == results["direct"]
    assert results["direct"][1] > 0

"""KCache mode through the whole engine: with a budget covering the context (top_n + sink +
window >= context) it reproduces full mode token for token; with a small budget it really reads
fewer V rows; it survives chunked prefill and preemption. The same with fp8 scoring keys (float8 K
picks, the exact K from the host pool weighs), with and without a row cache."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from conftest import PROMPTS
from helpers import token_ids
from kcache_dist import LLM, KCacheConfig, SamplingParams

GREEDY_64 = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
COVERING = KCacheConfig(mode="kcache", top_n=64, dense_layers=1, sink_tokens=4, recent_window=32)


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir", "tiny_mistral_dir"])
def test_covering_budget_equals_full_mode(fixture, request):
    model_dir = request.getfixturevalue(fixture)
    full = token_ids(LLM(device="cpu", model=model_dir).generate(PROMPTS, GREEDY_64))
    for kcache in (COVERING, KCacheConfig(mode="kcache", top_n=100, dense_layers=0, sink_tokens=0,
                                          recent_window=0, group_reduce="sum", renormalize=False),
                   KCacheConfig(mode="kcache", top_n=100, dense_layers=1, sink_tokens=4, recent_window=0),
                   dataclasses.replace(COVERING, scoring_keys="fp8"),
                   dataclasses.replace(COVERING, scoring_keys="fp8", row_cache_factor=2, top_n=100, recent_window=0)):
        llm = LLM(device="cpu", model=model_dir, kcache=kcache)
        assert token_ids(llm.generate(PROMPTS, GREEDY_64)) == full, kcache
        assert llm.engine.runner.kv_cache.v_rows_fetched > 0  # the far rows did come from the host pool


def test_default_model_covering_budget_equals_full_mode(default_model_dir):
    prompts = ["The capital of France is", "List three uses of a hash map:"]
    full = token_ids(LLM(device="cpu").generate(prompts, GREEDY_64))
    llm = LLM(device="cpu", kcache=KCacheConfig(mode="kcache", top_n=96, dense_layers=2, sink_tokens=4, recent_window=32))
    assert token_ids(llm.generate(prompts, GREEDY_64)) == full


def test_small_budget_reads_fewer_rows(tiny_llama_dir):
    small = KCacheConfig(mode="kcache", top_n=4, dense_layers=1, sink_tokens=2, recent_window=4)
    llm = LLM(device="cpu", model=tiny_llama_dir, kcache=small)
    outputs = llm.generate(PROMPTS, GREEDY_64)
    assert all(len(o.outputs[0].token_ids) == 64 for o in outputs)
    # per decode step and sparse layer, at most top_n far rows per KV head
    decode_steps = sum(63 for _ in PROMPTS)
    assert 0 < llm.engine.runner.kv_cache.v_rows_fetched <= decode_steps * 1 * 2 * small.top_n


@pytest.mark.parametrize("scoring_keys", ["model", "fp8"])
def test_chunked_prefill_and_preemption_in_kcache_mode(tiny_llama_dir, scoring_keys):
    reference = token_ids(LLM(device="cpu", model=tiny_llama_dir).generate(PROMPTS, GREEDY_64))
    llm = LLM(device="cpu", model=tiny_llama_dir, kcache=dataclasses.replace(COVERING, scoring_keys=scoring_keys),
              block_size=8, num_kv_blocks=14, max_model_len=112, max_num_batched_tokens=7)
    assert token_ids(llm.generate(PROMPTS, GREEDY_64)) == reference
    assert llm.engine.scheduler.num_preemptions > 0
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_prompt_chunks_of_one_token_are_prefilled_not_decoded(tiny_llama_dir):
    """With a small budget (sparse decodes pick), a prompt whose last chunk is one token gives the
    tokens of a whole prefill: that token is the prompt's, attended densely, not a sparse decode;
    also with decodes of other sequences in the same step."""
    small = KCacheConfig(mode="kcache", top_n=2, dense_layers=1, sink_tokens=1, recent_window=2)
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompt = [(7 * i + 3) % 380 + 10 for i in range(57)]
    whole = token_ids(LLM(device="cpu", model=tiny_llama_dir, kcache=small, block_size=4).generate([prompt], greedy))
    for budget in (56, 28):  # the last chunk is 1 token
        llm = LLM(device="cpu", model=tiny_llama_dir, kcache=small, block_size=4, max_num_batched_tokens=budget)
        assert token_ids(llm.generate([prompt], greedy)) == whole, budget
    prompts = [prompt, prompt[:30], prompt[:41], prompt[:9]]
    alone = [token_ids(LLM(device="cpu", model=tiny_llama_dir, kcache=small, block_size=4).generate([p], greedy))[0]
             for p in prompts]
    for budget in (1, 2, 7):  # one-token chunks beside decodes
        llm = LLM(device="cpu", model=tiny_llama_dir, kcache=small, block_size=4, max_num_batched_tokens=budget)
        assert token_ids(llm.generate(prompts, greedy)) == alone, budget


def test_preempted_sequences_continue_as_without_preemption(tiny_llama_dir):
    """With a small budget (sparse decodes pick), a preempted sequence recomputes its prompt by
    prefill and its produced tokens as decodes, one a step, as they were first computed: every
    greedy continuation equals the uninterrupted run's."""
    small = KCacheConfig(mode="kcache", top_n=2, dense_layers=1, sink_tokens=1, recent_window=2)
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    roomy = LLM(device="cpu", model=tiny_llama_dir, kcache=small, block_size=4, max_model_len=96)
    reference = token_ids(roomy.generate(PROMPTS, greedy))
    llm = LLM(device="cpu", model=tiny_llama_dir, kcache=small, block_size=4, max_model_len=96, num_kv_blocks=24)
    assert token_ids(llm.generate(PROMPTS, greedy)) == reference
    assert llm.engine.scheduler.num_preemptions > 0
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_fp8_host_values_through_chunked_prefill_and_preemption(tiny_llama_dir):
    """host_values="fp8": float8 V rows in the host pool and their scales on the device survive
    chunked prefill (earlier chunks read back and multiplied by their scales) and preemption; the
    tokens follow the rounded V (benchmarks/notes/accuracy.md), so they are checked for being
    produced, and the far rows for coming from the float8 pool."""
    fp8 = dataclasses.replace(COVERING, host_values="fp8")
    llm = LLM(device="cpu", model=tiny_llama_dir, kcache=fp8, block_size=8, num_kv_blocks=14, max_model_len=112,
              max_num_batched_tokens=7)
    cache = llm.engine.runner.kv_cache
    assert cache.host_rows[0].dtype == torch.float8_e4m3fn and cache.v_scales[0].dtype == torch.float32
    outputs = llm.generate(PROMPTS, GREEDY_64)
    assert all(len(o.outputs[0].token_ids) == 64 for o in outputs)
    assert llm.engine.scheduler.num_preemptions > 0 and cache.v_rows_fetched > 0
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_block_size_defaults_by_mode(tiny_llama_dir):
    assert LLM(device="cpu", model=tiny_llama_dir).engine.runner.block_size == 16
    assert LLM(device="cpu", model=tiny_llama_dir, kcache=COVERING).engine.runner.block_size == 256


def test_cpu_host_pool_is_said_once_to_be_unpinned(tiny_llama_dir, caplog):
    import kcache_dist.cache.host_pool as host_pool

    host_pool._said_unpinned = False
    with caplog.at_level(logging.INFO, logger="kcache_dist.cache.host_pool"):
        LLM(device="cpu", model=tiny_llama_dir, kcache=COVERING)
        LLM(device="cpu", model=tiny_llama_dir, kcache=COVERING)
    said = [r.message for r in caplog.records if "host V pool" in r.message]
    assert said == ["no CUDA device: the host V pool is ordinary (unpinned, unbound) memory"]


@pytest.mark.parametrize("engine_args", [{}, {"decode_micro_batches": 2},
                                         {"block_size": 8, "num_kv_blocks": 14, "max_model_len": 112,
                                          "max_num_batched_tokens": 7}], ids=["whole", "micro_batches", "preempted"])
def test_staged_decode_rows_give_the_tokens_of_direct_host_writes(tiny_llama_dir, engine_args):
    """`DecodeRowsStage`: with a recent window of 16 a decode's new rows are staged and copied to
    the host pool in chunks of 8 after the step that closes them; a small budget that picks far
    rows written by decode steps gives the tokens of an engine whose decode stores every new row
    straight into the host pool, through micro-batches, chunked prefill and preemption (without
    the copies the tokens differ)."""
    kcache = KCacheConfig(mode="kcache", top_n=4, dense_layers=1, sink_tokens=2, recent_window=16)
    direct = LLM(device="cpu", model=tiny_llama_dir, kcache=kcache, **engine_args)
    direct.engine.runner.kv_cache.decode_stage = None
    reference = token_ids(direct.generate(PROMPTS, GREEDY_64))
    llm = LLM(device="cpu", model=tiny_llama_dir, kcache=kcache, **engine_args)
    stage = llm.engine.runner.kv_cache.decode_stage
    assert stage.chunk_rows == 8
    copies = []
    issue = stage.issue
    stage.issue = lambda batch, stream: copies.extend(batch) or issue(batch, stream)
    assert token_ids(llm.generate(PROMPTS, GREEDY_64)) == reference
    assert len(copies) >= len(PROMPTS) * 64 // 8 - len(PROMPTS)  # a chunk a sequence every 8 tokens
    assert llm.engine.runner.kv_cache.v_rows_fetched > 0

"""Continuous batching: submitted together, staggered, or one by one, with chunked prefill or
forced preemption, every request gets the same greedy tokens, and every block comes back."""

from __future__ import annotations

import pytest
import torch

from conftest import PROMPTS
from helpers import token_ids
from kcache_dist import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24)


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    return token_ids(LLM(device="cpu", model=tiny_llama_dir).generate(PROMPTS, GREEDY))


def assert_all_blocks_free(llm: LLM) -> None:
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not llm.engine.has_unfinished_requests()


def test_one_by_one_equals_together(tiny_llama_dir, reference):
    llm = LLM(device="cpu", model=tiny_llama_dir)
    assert [llm.generate(p, GREEDY)[0].outputs[0].token_ids for p in PROMPTS] == reference
    assert_all_blocks_free(llm)


def test_staggered_arrivals_equal_together(tiny_llama_dir, reference):
    llm = LLM(device="cpu", model=tiny_llama_dir)
    engine = llm.engine
    results = {}
    pending = list(enumerate(PROMPTS))
    steps = 0
    while pending or engine.has_unfinished_requests():
        if pending and steps % 3 == 0:  # a new request every third step, joining a running batch
            i, prompt = pending.pop(0)
            engine.add_request(prompt, GREEDY, request_id=str(i))
        for out in engine.step():
            if out.finished:
                results[int(out.request_id)] = out.outputs[0].token_ids
        steps += 1
    assert [results[i] for i in range(len(PROMPTS))] == reference
    assert_all_blocks_free(llm)


def test_chunked_prefill_equals_whole_prefill(tiny_llama_dir, reference):
    llm = LLM(device="cpu", model=tiny_llama_dir, max_num_batched_tokens=5)  # prompts span several steps
    assert token_ids(llm.generate(PROMPTS, GREEDY)) == reference
    assert_all_blocks_free(llm)


def test_preemption_recomputes_and_completes_every_request(tiny_llama_dir, reference):
    # 4-token blocks; 16 blocks hold one 64-token sequence but not all four prompts with 24 new tokens.
    llm = LLM(device="cpu", model=tiny_llama_dir, block_size=4, num_kv_blocks=16, max_model_len=64)
    outputs = llm.generate(PROMPTS, GREEDY)
    assert llm.engine.scheduler.num_preemptions > 0
    assert token_ids(outputs) == reference
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outputs)
    assert_all_blocks_free(llm)


def test_max_num_seqs_bounds_the_running_batch(tiny_llama_dir, reference):
    llm = LLM(device="cpu", model=tiny_llama_dir, max_num_seqs=2)
    engine = llm.engine
    for i, p in enumerate(PROMPTS):
        engine.add_request(p, GREEDY, request_id=str(i))
    results = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                results[int(out.request_id)] = out.outputs[0].token_ids
        assert len(engine.scheduler.running) <= 2
    assert [results[i] for i in range(len(PROMPTS))] == reference


def test_garbage_in_unused_cache_slots_does_not_leak(tiny_llama_dir, reference):
    llm = LLM(device="cpu", model=tiny_llama_dir)
    for cache in llm.engine.runner.kv_cache.k_caches + llm.engine.runner.kv_cache.v_caches:
        cache.fill_(float("nan"))
    assert token_ids(llm.generate(PROMPTS, GREEDY)) == reference


def test_token_id_prompts_equal_text_prompts(tiny_llama_dir, reference):
    llm = LLM(device="cpu", model=tiny_llama_dir)
    ids = [llm.get_tokenizer().encode(p) for p in PROMPTS]
    outputs = llm.generate(ids, GREEDY)
    assert token_ids(outputs) == reference
    assert [o.prompt_token_ids for o in outputs] == ids and all(o.prompt is None for o in outputs)
    # vLLM's prompt dicts, and one prompt of token ids as a tuple
    dicts = [{"prompt_token_ids": ids[0]}, {"prompt": PROMPTS[1]}]
    assert token_ids(llm.generate(dicts, GREEDY)) == reference[:2]
    assert token_ids(llm.generate({"prompt": PROMPTS[2]}, GREEDY)) == reference[2:3]
    assert token_ids(llm.generate(tuple(ids[3]), GREEDY)) == reference[3:4]
    with pytest.raises(ValueError, match=r"a prompt dict holds either 'prompt' \(text\) or 'prompt_token_ids', "
                                         r"got keys \['multi_modal_data', 'prompt'\]"):
        llm.generate({"prompt": "Hi", "multi_modal_data": {}}, GREEDY)


def test_block_manager_accounting():
    from kcache_dist.cache.block_manager import BlockManager

    bm = BlockManager(num_blocks=5, block_size=4)
    a, b = [], []
    bm.grow(a, 9)  # 3 blocks
    assert len(a) == 3 and bm.num_free_blocks == 2
    assert bm.can_grow(b, 8) and not bm.can_grow(b, 9)
    bm.grow(b, 8)
    assert sorted(a + b) == list(range(5)) and bm.num_free_blocks == 0
    with pytest.raises(RuntimeError, match="out of cache blocks: need 1, 0 free"):
        bm.grow(a, 13)
    bm.free(a)
    assert a == [] and bm.num_free_blocks == 3
    bm.free(b)
    assert bm.num_free_blocks == bm.num_blocks == 5


def test_runs_in_bfloat16(tiny_llama_dir):
    llm = LLM(device="cpu", model=tiny_llama_dir, dtype="bf16")
    assert llm.engine.dtype == torch.bfloat16
    out = llm.generate(PROMPTS[:2], GREEDY)
    assert all(len(o.outputs[0].token_ids) > 0 for o in out)


def test_step_outputs_grow_and_abort_frees_blocks(tiny_llama_dir, reference):
    llm = LLM(device="cpu", model=tiny_llama_dir)
    engine = llm.engine
    engine.add_request(PROMPTS[0], GREEDY, request_id="a")
    engine.add_request(PROMPTS[1], GREEDY, request_id="b")
    seen = []
    for _ in range(5):
        outs = {o.request_id: o for o in engine.step()}
        seen.append(list(outs["a"].outputs[0].token_ids))
        assert not outs["a"].finished
    assert seen == [reference[0][: i + 1] for i in range(5)]  # one more token each step
    aborted = engine.abort_request("b")
    assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
    assert engine.abort_request("b") is None
    while engine.has_unfinished_requests():
        engine.step()
    assert_all_blocks_free(llm)


def test_generate_interrupted_mid_way_leaves_the_engine_usable(tiny_llama_dir, reference, monkeypatch):
    """An error in a step (e.g. Ctrl-C in a notebook) aborts that call's requests and goes on to the
    caller; the next generate runs as on a fresh engine, with every block free."""
    llm = LLM(device="cpu", model=tiny_llama_dir)
    engine, real_step, calls = llm.engine, llm.engine.step, []

    def failing_step():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step()

    monkeypatch.setattr(engine, "step", failing_step)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(PROMPTS, GREEDY)
    monkeypatch.undo()
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert token_ids(llm.generate(PROMPTS, GREEDY)) == reference

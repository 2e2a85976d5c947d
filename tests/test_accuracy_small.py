"""A small version of benchmarks/accuracy.py on the default model (a few hundred tokens of text).

- The teacher-forced emulation (`kcache_dist.kcache.teacher_forced`), which the benchmark uses to
  run a block of known tokens as decode steps in one forward, gives the log-probs and the greedy
  continuation that the engine's token-by-token KCache decode gives (with fp8 scoring keys too).
- With a budget covering the context, KCache decode equals full attention.
- At the library's default KCacheConfig, perplexity on decode positions whose context exceeds the
  default budget (top_n + sink + window = 1156) stays within 1% of full attention's.
"""

from __future__ import annotations

import dataclasses
import pydoc_data.topics

import pytest
import torch

import kcache_dist.engine.llm_engine as llm_engine
from kcache_dist import LLM, KCacheConfig, SamplingParams
from kcache_dist.kcache.teacher_forced import TeacherForcedLM

SMALL_BUDGET = KCacheConfig(mode="kcache", top_n=16, dense_layers=2, sink_tokens=4, recent_window=16)
PERPLEXITY_BOUND = 0.01  # relative, as in benchmarks/accuracy.py


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Mostly small ops: one thread is as fast on 2 cores and leaves the other core alone."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def engine_llm(default_model_dir) -> LLM:
    return LLM(device="cpu", kcache=SMALL_BUDGET, max_model_len=2048)


@pytest.fixture(scope="module")
def text_ids(engine_llm) -> list[int]:
    """Natural English text that ships with Python (the reference manual's 'assignment' topic)."""
    ids = engine_llm.get_tokenizer().encode(pydoc_data.topics.topics["assignment"])
    assert len(ids) >= 800
    return ids


def engine_logits_with_forced_tokens(llm: LLM, prompt: list[int], forced: list[int], monkeypatch) -> torch.Tensor:
    """The engine's logits [1 + len(forced), vocab] with its sampler forced to `forced`: row 0 the
    prefill's (dense), row i the decode step at len(prompt) + i - 1."""
    queue = iter(forced)
    monkeypatch.setattr(llm_engine, "sample", lambda logits, *args: [next(queue) for _ in range(logits.shape[0])])
    recorded = []
    runner = llm.engine.runner
    real_execute = runner.execute

    def execute_and_record(plan):
        logits = real_execute(plan)
        recorded.append(logits)
        return logits

    monkeypatch.setattr(runner, "execute", execute_and_record)
    out = llm.generate([prompt], SamplingParams(max_tokens=len(forced), ignore_eos=True))
    monkeypatch.undo()
    assert out[0].outputs[0].token_ids == forced
    return torch.cat(recorded)


def check_emulation_equals_engine(llm: LLM, kcache: KCacheConfig, text_ids: list[int], monkeypatch,
                                  other: KCacheConfig) -> None:
    """The engine's decode logits under `kcache` equal the emulation's; `other` (a setting that
    attends otherwise) gives logits that differ, so the check tells the two apart."""
    prompt_len, num_forced = 160, 24
    forced = text_ids[prompt_len:prompt_len + num_forced]
    engine_logits = engine_logits_with_forced_tokens(llm, text_ids[:prompt_len], forced, monkeypatch)
    lm = TeacherForcedLM(llm.engine.runner.model, capacity=1024)
    lm.prefill(text_ids[:prompt_len])
    emulated = lm.decode(forced[:-1], kcache)
    # float32; the emulation's dense layers use a fused kernel, and it renormalises by the picks'
    # share of the softmax where the engine's reference takes a softmax over the picks, so far-tail
    # log-probs (~ -30) differ by a few 1e-3
    torch.testing.assert_close(torch.log_softmax(emulated, -1), torch.log_softmax(engine_logits[1:], -1),
                               atol=5e-3, rtol=0)
    assert torch.equal(emulated.argmax(-1), engine_logits[1:].argmax(-1))
    lm.truncate(prompt_len)
    elsewise = lm.decode(forced[:-1], other)
    assert (torch.log_softmax(elsewise, -1) - torch.log_softmax(engine_logits[1:], -1)).abs().max() > 0.1, \
        f"{other} should change the output, or this test shows nothing"


def test_emulation_equals_engine_decode_with_forced_tokens(engine_llm, text_ids, monkeypatch):
    check_emulation_equals_engine(engine_llm, SMALL_BUDGET, text_ids, monkeypatch, other=KCacheConfig())


def test_fp8_scoring_keys_emulation_equals_engine_decode(default_model_dir, text_ids, monkeypatch):
    """scoring_keys="fp8": the engine picks with its float8 K and weighs with the exact K from host
    memory, as the emulation's `selection_keys` does; picking with the exact K differs."""
    fp8 = dataclasses.replace(SMALL_BUDGET, scoring_keys="fp8")
    llm = LLM(device="cpu", kcache=fp8, max_model_len=2048)
    kv_cache = llm.engine.runner.kv_cache
    assert kv_cache.k_caches[SMALL_BUDGET.dense_layers].dtype == torch.float8_e4m3fn
    check_emulation_equals_engine(llm, fp8, text_ids, monkeypatch, other=SMALL_BUDGET)


def test_fp8_host_values_emulation_equals_engine_decode(default_model_dir, text_ids, monkeypatch):
    """host_values="fp8": the engine keeps the sparse layers' V in host memory as float8 with
    device scales and weighs the far picks with them, as the emulation's `far_values` does; exact V
    differs."""
    fp8 = dataclasses.replace(SMALL_BUDGET, host_values="fp8")
    llm = LLM(device="cpu", kcache=fp8, max_model_len=2048)
    kv_cache = llm.engine.runner.kv_cache
    assert kv_cache.host_rows[0].dtype == torch.float8_e4m3fn and len(kv_cache.v_scales) == len(kv_cache.host_rows)
    check_emulation_equals_engine(llm, fp8, text_ids, monkeypatch, other=SMALL_BUDGET)


def test_emulated_greedy_equals_engine_greedy(engine_llm, text_ids):
    prompt, num_tokens = text_ids[:200], 16
    engine_tokens = engine_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=num_tokens,
                                                                 ignore_eos=True))[0].outputs[0].token_ids
    lm = TeacherForcedLM(engine_llm.engine.runner.model, capacity=1024)
    first = int(lm.logits(lm.prefill(prompt)[-1:])[0].argmax())
    assert lm.greedy(first, num_tokens, SMALL_BUDGET) == engine_tokens
    lm.truncate(len(prompt))
    full_tokens = lm.greedy(first, num_tokens, KCacheConfig())
    assert full_tokens != engine_tokens, "the small budget should change the continuation"
    lm.truncate(len(prompt))  # greedy_like: teacher-force the full continuation, decode on from the first miss
    assert lm.greedy_like(full_tokens, num_tokens, SMALL_BUDGET) == engine_tokens
    lm.truncate(len(prompt))
    assert lm.reproduces(full_tokens, KCacheConfig(mode="kcache", top_n=1024))
    lm.truncate(len(prompt))
    assert not lm.reproduces(full_tokens, SMALL_BUDGET)


@pytest.fixture(scope="module")
def long_text_ids(engine_llm) -> list[int]:
    """A longer text that ships with Python (the reference manual's 'compound statements' topic)."""
    ids = engine_llm.get_tokenizer().encode(pydoc_data.topics.topics["compound"])
    assert len(ids) >= 2048
    return ids


def perplexity(logits: torch.Tensor, targets: list[int]) -> float:
    return torch.nn.functional.cross_entropy(logits, torch.tensor(targets)).exp().item()


def test_covering_budget_equals_full_and_defaults_stay_within_bound(engine_llm, long_text_ids):
    text_ids = long_text_ids
    prefix_len, block_len = 1536, 256
    lm = TeacherForcedLM(engine_llm.engine.runner.model, capacity=2048)
    lm.prefill(text_ids[:prefix_len])
    block = text_ids[prefix_len:prefix_len + block_len]
    targets = text_ids[prefix_len + 1:prefix_len + block_len + 1]

    def decode(kcache: KCacheConfig) -> torch.Tensor:
        lm.truncate(prefix_len)
        return lm.decode(block, kcache)

    full = decode(KCacheConfig())
    covering = decode(KCacheConfig(mode="kcache", top_n=prefix_len + block_len))
    torch.testing.assert_close(covering, full, atol=2e-3, rtol=0)
    defaults = KCacheConfig(mode="kcache")
    assert defaults.top_n + defaults.sink_tokens + defaults.recent_window < prefix_len  # selection really runs
    sparse = decode(defaults)
    assert not torch.allclose(sparse, full, atol=1e-3)
    ratio = perplexity(sparse, targets) / perplexity(full, targets)
    assert ratio - 1 <= PERPLEXITY_BOUND, f"defaults raise perplexity by {100 * (ratio - 1):.2f}%"

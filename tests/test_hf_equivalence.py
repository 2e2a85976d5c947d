"""Greedy tokens equal Hugging Face transformers' greedy `generate` (32 new tokens, a batch of
prompts of different lengths run together through the engine)."""

from __future__ import annotations

import pytest

from conftest import PROMPTS
from helpers import hf_greedy, token_ids
from kcache_dist import LLM, SamplingParams

GREEDY_32 = SamplingParams(temperature=0, max_tokens=32)


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir", "tiny_mistral_dir"])
def test_tiny_models_match_transformers(fixture, request):
    model_dir = request.getfixturevalue(fixture)
    outputs = LLM(device="cpu", model=model_dir).generate(PROMPTS, GREEDY_32)
    assert token_ids(outputs) == hf_greedy(model_dir, PROMPTS, 32)
    assert all(len(o.outputs[0].token_ids) == 32 or o.outputs[0].finish_reason == "stop" for o in outputs)


def test_default_model_matches_transformers(default_model_dir):
    prompts = ["The capital of France is", "def fibonacci(n):",
               "Once upon a time, in a land far away, there lived a dragon who"]
    llm = LLM(device="cpu")  # no model: the embedded default
    assert llm.engine.model_dir == default_model_dir
    outputs = llm.generate(prompts, GREEDY_32)
    assert token_ids(outputs) == hf_greedy(default_model_dir, prompts, 32)
    assert "Paris" in outputs[0].outputs[0].text

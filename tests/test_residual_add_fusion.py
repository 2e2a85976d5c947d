"""The decoder adds each block's output to the residual stream inside the norm that follows it
(`RMSNorm(delta, residual)`, models/llama.py). On CPU (the torch references) its final hidden
states equal, bit for bit, those of the decoder written as before, each block adding its own
output (`unfused_forward`), in bfloat16 and float16 where the rounding of the sum matters; whole
steps and micro-batched decode steps (`LlamaModel.blocks`), every step of a greedy generation."""

from __future__ import annotations

import pytest
import torch

from conftest import PROMPTS
from kcache_dist import LLM, SamplingParams


def unfused_forward(model, input_ids: torch.Tensor, positions: torch.Tensor, ctx) -> torch.Tensor:
    """`LlamaModel.forward` before the fusion: the residual stream summed by each block."""
    hidden = model.embed_tokens(input_ids)
    for layer in model.layers:
        hidden = hidden + layer.self_attn(positions, layer.input_layernorm(hidden), ctx)
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return model.norm(hidden)


@pytest.mark.parametrize("micro_batches", [1, 3])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_fused_residual_adds_give_the_unfused_hidden_states(tiny_llama_dir, dtype, micro_batches):
    llm = LLM(model=tiny_llama_dir, dtype=dtype, device="cpu", enforce_eager=True, max_num_seqs=8,
              decode_micro_batches=micro_batches)
    model = llm.engine.runner.model.model
    fused_blocks, checked_rows = model.blocks, []

    def checked_blocks(input_ids, positions, ctx):  # the attention reruns on the same slots: the same cache
        for hidden in fused_blocks(input_ids, positions, ctx):
            yield hidden
        differ = (hidden != unfused_forward(model, input_ids, positions, ctx)).sum().item()
        assert differ == 0, f"{differ} of {hidden.numel()} hidden values differ from the unfused decoder's"
        checked_rows.append(len(input_ids))

    model.blocks = checked_blocks  # LlamaModel.forward and LlamaForCausalLM.blocks both go through it
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == 12 for o in outputs)
    assert len(checked_rows) >= 12 and max(checked_rows) > len(PROMPTS)  # a prefill and the decode steps
    if micro_batches > 1:
        assert min(checked_rows) < len(PROMPTS)  # decode steps split into micro-batches

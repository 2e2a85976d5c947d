"""Named model shapes with random weights (`load_format="random"`): the directory holds only
config.json and a placeholder tokenizer, both readable by the engine and by transformers; random
weights are seeded per parameter name and follow HF's initialisation."""

from __future__ import annotations

import pytest
import torch

from kcache_dist import LLM, EngineConfig, SamplingParams
from kcache_dist.models.llama import LlamaForCausalLM
from kcache_dist.models.model_config import load_model_config
from kcache_dist.models.named_shapes import NAMED_SHAPES, write_shape_dir
from kcache_dist.models.random_weights import init_random_weights


@pytest.mark.parametrize("name", sorted(NAMED_SHAPES))
def test_shape_dir_reads_in_the_engine_and_in_transformers(name, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    model_dir = write_shape_dir(name, str(tmp_path))
    mc = load_model_config(model_dir)
    hf = AutoConfig.from_pretrained(model_dir)
    assert (mc.hidden_size, mc.num_hidden_layers, mc.total_num_kv_heads) == \
        (hf.hidden_size, hf.num_hidden_layers, hf.num_key_value_heads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.eos_token_id == NAMED_SHAPES[name]["eos_token_id"]
    last = mc.vocab_size - 1
    assert tokenizer.decode([last, 3], skip_special_tokens=True).split() in (
        [f"<t{last}>", "<t3>"], [f"<t{last}><t3>"])


def test_llama3_8b_shape_is_the_published_one(tmp_path):
    mc = load_model_config(write_shape_dir("llama3-8b", str(tmp_path)))
    assert (mc.vocab_size, mc.hidden_size, mc.intermediate_size, mc.num_hidden_layers, mc.total_num_heads,
            mc.total_num_kv_heads, mc.head_dim) == (128256, 4096, 14336, 32, 32, 8, 128)
    assert mc.rope.rope_type == "llama3" and mc.max_position_embeddings >= 32768


def test_random_weights_are_seeded_by_name_and_follow_hf_init(tmp_path):
    mc = load_model_config(write_shape_dir("tiny-qwen2", str(tmp_path)))
    models = [LlamaForCausalLM(mc, 64, torch.float32) for _ in range(3)]
    for model, seed in zip(models, (7, 7, 8)):
        init_random_weights(model, seed)
    same, other = dict(models[0].named_parameters()), dict(models[2].named_parameters())
    for name, p in models[1].named_parameters():
        assert torch.equal(p, same[name])
        if "norm" in name:
            assert torch.all(p == 1)
        elif name.endswith(".bias"):
            assert torch.all(p == 0)
        else:
            assert not torch.equal(p, other[name])
            assert p.std().item() == pytest.approx(0.02, rel=0.2)


def test_engine_generates_with_random_weights(tmp_path):
    model_dir = write_shape_dir("tiny-llama", str(tmp_path))
    llm = LLM(model=model_dir, load_format="random", device="cpu", max_model_len=64, cpu_kv_cache_gb=0.01)
    out = llm.generate([[1, 2, 3, 4]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 5
    with pytest.raises(ValueError, match="load_format"):
        EngineConfig(load_format="dummy")

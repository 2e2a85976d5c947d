"""Checkpoint loading: single file or sharded with an index, tied or separate LM head."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import PROMPTS
from helpers import token_ids
from kcache_dist import LLM, SamplingParams
from kcache_dist.models.loader import safetensors_files


def test_sharded_checkpoint_with_index_loads_the_same(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir).save_pretrained(sharded, max_shard_size="50KB")
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(sharded)
    with open(sharded / "model.safetensors.index.json") as f:
        assert len(set(json.load(f)["weight_map"].values())) > 1
    assert len(safetensors_files(str(sharded))) > 1
    params = SamplingParams(temperature=0, max_tokens=16)
    assert token_ids(LLM(device="cpu", model=str(sharded)).generate(PROMPTS, params)) == \
        token_ids(LLM(device="cpu", model=tiny_llama_dir).generate(PROMPTS, params))


def test_weights_equal_the_checkpoint(tiny_qwen2_dir):
    from safetensors.torch import load_file

    model = LLM(device="cpu", model=tiny_qwen2_dir).engine.runner.model
    ckpt = load_file(os.path.join(tiny_qwen2_dir, "model.safetensors"))
    layer = model.model.layers[1]
    qkv = torch.cat([ckpt[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(layer.self_attn.qkv_proj.weight, qkv)
    assert torch.equal(layer.self_attn.qkv_proj.bias,
                       torch.cat([ckpt[f"model.layers.1.self_attn.{p}_proj.bias"] for p in "qkv"]))
    assert torch.equal(layer.mlp.gate_up_proj.weight, torch.cat([ckpt["model.layers.1.mlp.gate_proj.weight"],
                                                                 ckpt["model.layers.1.mlp.up_proj.weight"]]))
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    assert torch.equal(model.lm_head.weight, ckpt["model.embed_tokens.weight"])


def test_chat_applies_the_template(tiny_llama_dir):
    llm = LLM(device="cpu", model=tiny_llama_dir)
    messages = [{"role": "user", "content": "Hello there"}]
    params = SamplingParams(temperature=0, max_tokens=8)
    chat = llm.chat(messages, params)[0]
    assert chat.prompt == "<user>Hello there\n<assistant>"
    assert chat.outputs[0].token_ids == llm.generate(chat.prompt, params)[0].outputs[0].token_ids
    two = llm.chat([messages, [{"role": "user", "content": "Bye"}]], params)
    assert len(two) == 2 and two[0].outputs[0].token_ids == chat.outputs[0].token_ids


def _config_of(tmp_path, **fields):
    """load_model_config of a config.json with a small Llama's fields and `fields` over them."""
    from kcache_dist.models.model_config import load_model_config

    raw = {"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 512, **fields}
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in raw.items() if v is not ...}))
    return load_model_config(str(tmp_path))


def test_config_fields_read_as_transformers_reads_them(tmp_path):
    """Defaults and precedence of transformers' configs (checked against its logits by hand):
    rope_scaling wins over rope_parameters; Llama-3 rope without original_max_position_embeddings
    takes max_position_embeddings; Mistral without a sliding_window key slides over 4096 (null: no
    window); Qwen2 slides only with use_sliding_window and layers from max_window_layers on."""
    both = _config_of(tmp_path, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                      rope_scaling={"rope_type": "linear", "factor": 4.0})
    assert (both.rope.rope_type, both.rope.factor, both.rope.theta) == ("linear", 4.0, 10000.0)  # transformers 5.24
    llama3 = _config_of(tmp_path, rope_scaling={"rope_type": "llama3", "factor": 8.0}, rope_theta=50000.0)
    assert (llama3.rope.original_max_position_embeddings, llama3.rope.theta) == (512, 50000.0)
    assert _config_of(tmp_path).rope.theta == 10000.0 and _config_of(tmp_path).sliding_window is None
    mistral = {"architectures": ["MistralForCausalLM"]}
    assert _config_of(tmp_path, **mistral).sliding_window == 4096
    assert _config_of(tmp_path, **mistral, sliding_window=None).sliding_window is None
    qwen2 = {"architectures": ["Qwen2ForCausalLM"], "sliding_window": 256}
    assert _config_of(tmp_path, **qwen2).sliding_window is None  # use_sliding_window false
    assert _config_of(tmp_path, **qwen2, use_sliding_window=True, max_window_layers=1).sliding_window == 256
    assert _config_of(tmp_path, **qwen2, use_sliding_window=True, max_window_layers=2).sliding_window is None
    assert _config_of(tmp_path, **dict(qwen2, sliding_window=...), use_sliding_window=True,
                      max_window_layers=0).sliding_window == 4096
    with pytest.raises(ValueError, match=r"^unsupported hidden_act 'gelu_pytorch_tanh' in .*config.json; "
                                         r"supported: silu$"):
        _config_of(tmp_path, hidden_act="gelu_pytorch_tanh")

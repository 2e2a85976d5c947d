"""Checkpoint loading: single file or sharded with an index, tied or separate LM head."""

from __future__ import annotations

import json
import os

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

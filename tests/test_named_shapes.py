"""Named model shapes with random weights (`load_format="random"`): the directory holds only
config.json and a placeholder tokenizer, both readable by the engine and by transformers; random
weights are a random checkpoint, each tensor under its HF name and shape, seeded by that name,
following HF's initialisation and loaded through the weight loaders."""

from __future__ import annotations

import pytest
import torch

from kcache_dist import LLM, EngineConfig, SamplingParams
from kcache_dist.models.llama import LlamaForCausalLM
from kcache_dist.models.loader import load_weights
from kcache_dist.models.model_config import load_model_config
from kcache_dist.models.named_shapes import NAMED_SHAPES, write_shape_dir
from kcache_dist.models.random_weights import checkpoint_shapes, random_checkpoint


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


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_random_checkpoint_has_the_names_and_shapes_of_transformers(name, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = write_shape_dir(name, str(tmp_path))
    hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    expected = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    if hf.config.tie_word_embeddings:
        del expected["lm_head.weight"]  # the same tensor as the embedding; HF does not save it
    mc = load_model_config(model_dir)
    drawn = {k: tuple(v.shape) for k, v in random_checkpoint(mc, 0, torch.float32, "cpu")}
    assert drawn == expected == dict(checkpoint_shapes(mc))


def test_random_checkpoint_is_seeded_by_name_follows_hf_init_and_loads(tmp_path):
    mc = load_model_config(write_shape_dir("tiny-qwen2", str(tmp_path)))
    first, same, other = (dict(random_checkpoint(mc, seed, torch.float32, "cpu")) for seed in (7, 7, 8))
    assert any(name.endswith(".bias") for name in first)
    for name, tensor in same.items():
        assert torch.equal(tensor, first[name])
        if name.endswith("norm.weight"):
            assert torch.all(tensor == 1)
        elif name.endswith(".bias"):
            assert torch.all(tensor == 0)
        else:
            assert not torch.equal(tensor, other[name])
            assert tensor.std().item() == pytest.approx(0.02, rel=0.2)
    model = LlamaForCausalLM(mc, 64, torch.float32)
    load_weights(model, random_checkpoint(mc, 7, torch.float32, "cpu"))
    params = dict(model.named_parameters())
    attn = "model.layers.1.self_attn"
    assert torch.equal(params[f"{attn}.qkv_proj.weight"],
                       torch.cat([first[f"{attn}.{p}_proj.weight"] for p in "qkv"]))
    assert torch.equal(model.lm_head.weight, first["model.embed_tokens.weight"])  # tied


def test_engine_generates_with_random_weights(tmp_path):
    model_dir = write_shape_dir("tiny-llama", str(tmp_path))
    llm = LLM(model=model_dir, load_format="random", device="cpu", max_model_len=64, cpu_kv_cache_gb=0.01)
    out = llm.generate([[1, 2, 3, 4]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 5
    with pytest.raises(ValueError, match="load_format"):
        EngineConfig(load_format="dummy")


def test_serve_flag_load_format(tmp_path):
    from kcache_dist.server.cli_args import build_parser, engine_config_from_args

    shape_dir = write_shape_dir("tiny-llama", str(tmp_path / "tiny"))
    args = build_parser().parse_args(["--model", shape_dir, "--load-format", "random"])
    assert engine_config_from_args(args).load_format == "random"
    with pytest.raises(ValueError, match=r"^invalid value for 'load_format': 'pickle'; allowed: safetensors \| random$"):
        engine_config_from_args(build_parser().parse_args(["--load-format", "pickle"]))

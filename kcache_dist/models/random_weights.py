"""Random weights in place of a checkpoint (`EngineConfig.load_format="random"`), for throughput
and tensor-parallel runs of a model's shape: no safetensors to write or read, the values are drawn
where the parameters live (on the GPU for a CUDA engine).

`random_checkpoint` yields what `loader.iterate_checkpoint` yields for a Hugging Face checkpoint of
the shape: every tensor under its HF name (model.layers.N.self_attn.q_proj.weight, ...) at its full,
unsharded shape. `loader.load_weights` hands each one to its parameter's `weight_loader`, which
keeps this rank's slice, exactly as for safetensors. The values of a tensor depend only on `seed`,
its HF name and the device type, never on the tensor-parallel size or rank: a TP=2 or TP=4 engine
holds the same model as a TP=1 one, sliced, so their greedy tokens can be compared.

Values follow Hugging Face's initialisation of Llama-family models: RMSNorm scales 1, biases 0,
every other tensor N(0, std^2) with std = `initializer_range` (0.02). Each tensor draws from its own
generator, seeded by `seed` and the tensor's name, so the values do not depend on the order of the
tensors. Each full tensor is drawn on `device` just before it is loaded and dropped right after:
the extra memory at any time is one full tensor (the LM head or embedding, 1 GB for Llama-3-8B in
bfloat16).
"""

from __future__ import annotations

import zlib
from typing import Iterator

import torch

from .model_config import ModelConfig

INITIALIZER_RANGE = 0.02  # std of Hugging Face's Llama/Qwen2 initialisation


def parameter_seed(seed: int, name: str) -> int:
    """The generator seed of tensor `name`: stable across processes and Python runs."""
    return (seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (1 << 63)


def checkpoint_shapes(config: ModelConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(HF name, full shape) of every tensor of a Hugging Face checkpoint of `config`, in HF's order;
    no lm_head.weight when the embeddings are tied (HF does not save it)."""
    hidden, d, inter = config.hidden_size, config.head_dim, config.intermediate_size
    q_rows, kv_rows = config.total_num_heads * d, config.total_num_kv_heads * d
    yield "model.embed_tokens.weight", (config.vocab_size, hidden)
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}"
        for proj, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            yield f"{layer}.self_attn.{proj}.weight", (rows, hidden)
            if config.qkv_bias:
                yield f"{layer}.self_attn.{proj}.bias", (rows,)
        yield f"{layer}.self_attn.o_proj.weight", (hidden, q_rows)
        if config.o_proj_bias:
            yield f"{layer}.self_attn.o_proj.bias", (hidden,)
        for proj, out_features, in_features in (("gate_proj", inter, hidden), ("up_proj", inter, hidden),
                                                ("down_proj", hidden, inter)):
            yield f"{layer}.mlp.{proj}.weight", (out_features, in_features)
            if config.mlp_bias:
                yield f"{layer}.mlp.{proj}.bias", (out_features,)
        yield f"{layer}.input_layernorm.weight", (hidden,)
        yield f"{layer}.post_attention_layernorm.weight", (hidden,)
    yield "model.norm.weight", (hidden,)
    if not config.tie_word_embeddings:
        yield "lm_head.weight", (config.vocab_size, hidden)


def random_checkpoint(config: ModelConfig, seed: int, dtype: torch.dtype, device: torch.device | str,
                      std: float = INITIALIZER_RANGE) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor on `device`) for every tensor of `checkpoint_shapes(config)`: the
    contract of `loader.iterate_checkpoint`. Norm scales 1, biases 0, the rest N(0, std^2) from a
    generator seeded by `parameter_seed(seed, name)`."""
    device = torch.device(device)
    for name, shape in checkpoint_shapes(config):
        # yielded without a local name, so the generator holds no tensor between two yields
        yield name, _draw(name, shape, seed, dtype, device, std)


def _draw(name: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype, device: torch.device,
          std: float) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype, device=device)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype, device=device)
    generator = torch.Generator(device=device).manual_seed(parameter_seed(seed, name))
    return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, std, generator=generator)

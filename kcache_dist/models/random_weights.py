"""Random weights in place of a checkpoint (`EngineConfig.load_format="random"`), for throughput
runs of a model's shape: no safetensors to write or read, the values are drawn where the
parameters live (on the GPU for a CUDA engine).

Values follow Hugging Face's initialisation of Llama-family models: RMSNorm scales 1, biases 0,
every other parameter N(0, std^2) with std = `initializer_range` (0.02). Each parameter draws from
its own generator, seeded by `seed` and the parameter's name, so the values do not depend on the
order of the parameters, and a parameter that every tensor-parallel rank holds whole (a norm) is
the same on every rank. A sharded parameter gets the same values on each rank's shard: that
changes no shape, byte or step time, only the numbers.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from ..layers.rmsnorm import RMSNorm

INITIALIZER_RANGE = 0.02  # std of Hugging Face's Llama/Qwen2 initialisation


def parameter_seed(seed: int, name: str) -> int:
    """The generator seed of parameter `name`: stable across processes and Python runs."""
    return (seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (1 << 63)


@torch.no_grad()
def init_random_weights(model: nn.Module, seed: int, std: float = INITIALIZER_RANGE) -> None:
    """Fill every parameter of `model` in place: norm scales 1, biases 0, the rest N(0, std^2)."""
    norm_scales = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    for name, param in model.named_parameters():
        if id(param) in norm_scales:
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            generator = torch.Generator(device=param.device).manual_seed(parameter_seed(seed, name))
            param.normal_(0.0, std, generator=generator)

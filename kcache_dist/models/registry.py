"""Exact map from a checkpoint's `architectures[0]` to the model class that runs it."""

from __future__ import annotations

from torch import nn

from .llama import LlamaForCausalLM
from .model_config import SUPPORTED_ARCHITECTURES

# Llama, Mistral and Qwen2 differ only in what ModelConfig records (biases, head_dim, rope).
MODEL_REGISTRY: dict[str, type[nn.Module]] = {arch: LlamaForCausalLM for arch in SUPPORTED_ARCHITECTURES}


def model_class(architecture: str) -> type[nn.Module]:
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise ValueError(f"unsupported architecture {architecture!r}; supported: "
                         f"{', '.join(MODEL_REGISTRY)}") from None

"""Rotary position embedding (rotate-half layout), with linear and Llama-3 frequency scaling."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..models.model_config import RopeConfig
from ..triton_kernels import kernel_module


def inverse_frequencies(head_dim: int, rope: RopeConfig) -> torch.Tensor:
    """[head_dim / 2] float32 angular frequencies after the checkpoint's scaling rule."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_freq_wavelen = old_len / rope.low_freq_factor
        high_freq_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, rope: RopeConfig):
        super().__init__()
        self.head_dim = head_dim
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inverse_frequencies(head_dim, rope))
        self.register_buffer("cos", angles.cos(), persistent=False)  # [max_positions, head_dim / 2]
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T]; q [T, Hq * D], k [T, Hkv * D] -> rotated q, k of the same shapes: one
        Triton kernel for CUDA tensors (`triton_rotary`, the same numbers), the reference otherwise."""
        takes_kernel = q.is_cuda and q.dtype == k.dtype and q.stride(-1) == 1 and k.stride(-1) == 1
        kernels = kernel_module("layers.triton_rotary") if takes_kernel else None
        if kernels:
            return kernels.rotary_triton(positions, q, k, self.cos, self.sin, self.head_dim)
        return self.rotate_reference(positions, q, k)

    def rotate_reference(self, positions: torch.Tensor, q: torch.Tensor,
                         k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` in torch ops (any device): cos and sin in the activations' dtype, as in HF."""
        cos = self.cos[positions].repeat(1, 2).unsqueeze(1)  # [T, 1, D]
        sin = self.sin[positions].repeat(1, 2).unsqueeze(1)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x.view(x.shape[0], -1, self.head_dim)
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        return (x * cos + rotated * sin).flatten(1)

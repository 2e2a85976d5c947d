"""The attention layer of the model: hands q, k, v to the cache, which stores the new K/V and
runs full-KV or KCache attention for this layer."""

from __future__ import annotations

import torch
from torch import nn

from ..forward_context import ForwardContext


class Attention(nn.Module):
    def __init__(self, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """q [T, Hq * D], k and v [T, Hkv * D] -> [T, Hq * D]."""
        t = q.shape[0]
        out = ctx.kv_cache.attend(self.layer_idx, q.view(t, self.num_heads, self.head_dim),
                                  k.view(t, self.num_kv_heads, self.head_dim),
                                  v.view(t, self.num_kv_heads, self.head_dim), self.scale, ctx)
        return out.reshape(t, self.num_heads * self.head_dim)

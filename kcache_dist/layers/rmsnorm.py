"""RMSNorm as Llama computes it: statistics in float32, scale applied in the input dtype."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .linear import read_all


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        param.data.copy_(read_all(loaded))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]: one Triton kernel for CUDA tensors (`triton_rmsnorm`),
        the torch reference otherwise."""
        if x.is_cuda and x.dtype == self.weight.dtype and x.stride(-1) == 1:
            try:
                from .triton_rmsnorm import rms_norm_triton
            except ImportError:  # no Triton: the reference
                return rms_norm_reference(x, self.weight, self.eps)
            return rms_norm_triton(x, self.weight, self.eps)
        return rms_norm_reference(x, self.weight, self.eps)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., hidden], weight [hidden] -> weight * (x * rsqrt(mean(x^2) + eps)), the statistics in
    float32 and the normalised x rounded to x's dtype before the weight multiplies it (Llama's)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)

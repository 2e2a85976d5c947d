"""RMSNorm as Llama computes it: statistics in float32, scale applied in the input dtype."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..triton_kernels import kernel_module
from .linear import read_all


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        param.data.copy_(read_all(loaded))

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        """x [T, hidden] -> rms_norm(x) [T, hidden]; with `residual` [T, hidden] (the residual stream
        that x, a layer's output, is added to): -> (rms_norm(x + residual), x + residual), the sum
        rounded to the dtype before the norm. One Triton kernel for CUDA tensors (`triton_rmsnorm`),
        the torch reference otherwise."""
        takes_kernel = x.is_cuda and all(t.dtype == self.weight.dtype and t.stride(-1) == 1
                                         for t in (x, residual) if t is not None)
        kernels = kernel_module("layers.triton_rmsnorm") if takes_kernel else None
        if residual is None:
            return (kernels.rms_norm_triton if kernels else rms_norm_reference)(x, self.weight, self.eps)
        return (kernels.add_rms_norm_triton if kernels else add_rms_norm_reference)(x, residual, self.weight,
                                                                                   self.eps)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., hidden], weight [hidden] -> weight * (x * rsqrt(mean(x^2) + eps)), the statistics in
    float32 and the normalised x rounded to x's dtype before the weight multiplies it (Llama's)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [..., hidden], weight [hidden] -> (rms_norm_reference(x + residual), x + residual):
    the sum in x's dtype, as a decoder layer adds its output to the residual stream."""
    summed = x + residual
    return rms_norm_reference(summed, weight, eps), summed

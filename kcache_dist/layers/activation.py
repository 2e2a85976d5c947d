"""SiLU-and-multiply: the gated MLP activation."""

import torch
import torch.nn.functional as F

from ..triton_kernels import kernel_module


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2 * I] (gate then up) -> silu(gate) * up [T, I]: one Triton kernel for CUDA
    tensors (`triton_activation`, the same numbers), the torch reference otherwise."""
    takes_kernel = gate_up.is_cuda and gate_up.dtype in (torch.float32, torch.float16, torch.bfloat16) \
        and gate_up.stride(-1) == 1
    kernels = kernel_module("layers.triton_activation") if takes_kernel else None
    return kernels.silu_and_mul_triton(gate_up) if kernels else silu_and_mul_reference(gate_up)


def silu_and_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """`silu_and_mul` in torch ops (any device): silu(gate) rounded to the dtype, then the product
    rounded to it."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up

"""RMSNorm in one Triton kernel, one program per row (CUDA; also under TRITON_INTERPRET=1 on CPU).

Same math as `rmsnorm.rms_norm_reference` (Llama's: statistics in float32, the scale applied in
the input dtype). Torch runs the reference as about eight elementwise and reduction kernels, each
a launch and a pass over the rows; at decode batch sizes the rows are a few hundred KB, so those
passes cost more than the bytes, and a 32-layer model normalises 65 times a step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_interpreter import patch_if_interpreting

patch_if_interpreting()


@triton.jit
def _rms_norm_kernel(X, W, Y, stride_x, stride_y, H, eps, BLOCK: tl.constexpr):
    """grid (T,). X [T, H] (rows stride_x apart), W [H], Y [T, H] (rows stride_y apart), one dtype:
    Y = W * (X * rsqrt(mean(X^2) + eps)), the statistics in fp32, the normalised row rounded to the
    dtype before the weight multiplies it (as the reference's `weight * x32.to(dtype)`)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < H
    x = tl.load(X + row * stride_x + cols, mask=inside, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
    normed = (x * rstd).to(Y.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (w * normed).to(Y.dtype.element_ty), mask=inside)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., H] with unit stride in H, weight [H] of x's dtype -> [..., H] (a new tensor)."""
    H = x.shape[-1]
    if weight.shape != (H,) or weight.dtype != x.dtype or x.stride(-1) != 1:
        raise ValueError(f"rms_norm_triton needs x [..., {H}] with unit stride in the last dim and a weight "
                         f"[{H}] of x's dtype; got x {tuple(x.shape)} stride {x.stride()} {x.dtype}, weight "
                         f"{tuple(weight.shape)} {weight.dtype}")
    rows = x.reshape(-1, H)
    out = torch.empty_like(rows)
    if rows.shape[0]:
        block = triton.next_power_of_2(H)
        _rms_norm_kernel[(rows.shape[0],)](rows, weight, out, rows.stride(0), out.stride(0), H, eps, BLOCK=block,
                                           num_warps=max(1, min(16, block // 512)))
    return out.view(x.shape)

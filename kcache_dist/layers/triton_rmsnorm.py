"""RMSNorm in one Triton kernel, one program per row (CUDA; also under TRITON_INTERPRET=1 on CPU),
and the residual add before it fused into the same kernel.

Same math as `rmsnorm.rms_norm_reference` and `rmsnorm.add_rms_norm_reference` (Llama's: statistics
in float32, the scale applied in the input dtype; the residual sum rounded to the dtype first, as
torch's add rounds it). Torch runs the reference as about eight elementwise and reduction kernels
(nine with the add), each a launch and a pass over the rows; at decode batch sizes the rows are a
few hundred KB, so those passes cost more than the bytes, and a 32-layer model normalises 65 times
a step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_interpreter import patch_if_interpreting

patch_if_interpreting()


@triton.jit
def _store_rms_norm(x, W, Y_row, cols, inside, H, eps):
    """x [BLOCK] fp32 holding a row of values of Y's dtype (zero past H), W [H], Y_row the row's
    first element in Y: Y_row[:H] = W * (x * rsqrt(mean(x^2) + eps)), the statistics in fp32, the
    normalised row rounded to the dtype before the weight multiplies it (as the reference's
    `weight * x32.to(dtype)`)."""
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
    normed = (x * rstd).to(Y_row.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(Y_row + cols, (w * normed).to(Y_row.dtype.element_ty), mask=inside)


@triton.jit
def _rms_norm_kernel(X, W, Y, stride_x, stride_y, H, eps, BLOCK: tl.constexpr):
    """grid (T,). X [T, H] (rows stride_x apart), W [H], Y [T, H] (rows stride_y apart), one dtype:
    Y = rms_norm(X) (`_store_rms_norm`)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < H
    x = tl.load(X + row * stride_x + cols, mask=inside, other=0.0).to(tl.float32)
    _store_rms_norm(x, W, Y + row * stride_y, cols, inside, H, eps)


@triton.jit
def _add_rms_norm_kernel(X, R, W, Y, S, stride_x, stride_r, stride_y, stride_s, H, eps, BLOCK: tl.constexpr):
    """grid (T,). X, R [T, H] (rows stride_x / stride_r apart), W [H], Y, S [T, H] (rows stride_y /
    stride_s apart), one dtype: S = X + R rounded to the dtype, Y = rms_norm(S) (`_store_rms_norm`)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < H
    x = tl.load(X + row * stride_x + cols, mask=inside, other=0.0).to(tl.float32)
    r = tl.load(R + row * stride_r + cols, mask=inside, other=0.0).to(tl.float32)
    s = (x + r).to(S.dtype.element_ty)
    tl.store(S + row * stride_s + cols, s, mask=inside)
    _store_rms_norm(s.to(tl.float32), W, Y + row * stride_y, cols, inside, H, eps)


def _check_x_and_weight(caller: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    """Refuse, before any launch, an x without unit stride in its last dim or a weight not [H] of x's dtype."""
    H = x.shape[-1]
    if weight.shape != (H,) or weight.dtype != x.dtype or x.stride(-1) != 1:
        raise ValueError(f"{caller} needs x [..., {H}] with unit stride in the last dim and a weight [{H}] of x's "
                         f"dtype; got x {tuple(x.shape)} stride {x.stride()} {x.dtype}, weight "
                         f"{tuple(weight.shape)} {weight.dtype}")


def _launch_config(H: int) -> dict:
    """A row of H in one block of a power of two, 1 to 16 warps."""
    block = triton.next_power_of_2(H)
    return dict(BLOCK=block, num_warps=max(1, min(16, block // 512)))


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., H] with unit stride in H, weight [H] of x's dtype -> [..., H] (a new tensor)."""
    _check_x_and_weight("rms_norm_triton", x, weight)
    H = x.shape[-1]
    rows = x.reshape(-1, H)
    out = torch.empty_like(rows)
    if rows.shape[0]:
        _rms_norm_kernel[(rows.shape[0],)](rows, weight, out, rows.stride(0), out.stride(0), H, eps,
                                           **_launch_config(H))
    return out.view(x.shape)


def add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [..., H] of one shape and dtype with unit stride in H, weight [H] of that dtype ->
    (rms_norm(x + residual), x + residual), both [..., H] (new tensors)."""
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.stride(-1) != 1:
        raise ValueError(f"add_rms_norm_triton needs a residual of x's shape and dtype with unit stride in the "
                         f"last dim; got x {tuple(x.shape)} {x.dtype}, residual {tuple(residual.shape)} stride "
                         f"{residual.stride()} {residual.dtype}")
    _check_x_and_weight("add_rms_norm_triton", x, weight)
    H = x.shape[-1]
    rows, residual_rows = x.reshape(-1, H), residual.reshape(-1, H)
    out, summed = torch.empty_like(rows), torch.empty_like(rows)
    if rows.shape[0]:
        _add_rms_norm_kernel[(rows.shape[0],)](rows, residual_rows, weight, out, summed, rows.stride(0),
                                               residual_rows.stride(0), out.stride(0), summed.stride(0), H, eps,
                                               **_launch_config(H))
    return out.view(x.shape), summed.view(x.shape)

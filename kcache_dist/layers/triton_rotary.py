"""Rotary embedding of q and k in one Triton kernel, one program per token (CUDA; also under
TRITON_INTERPRET=1 on CPU).

Same numbers as `rotary.RotaryEmbedding.rotate_reference`, bit for bit: cos and sin rounded to the
activations' dtype, each product and the sum rounded to it as torch rounds its separate kernels
(no fused multiply-add). Torch runs the reference as about twenty small kernels a layer (gathers,
repeats, casts, a negation, a concatenation, products and sums), which at decode batch sizes cost
far more than the bytes they move.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_interpreter import patch_if_interpreting

patch_if_interpreting()


@triton.jit
def _rotate_heads(X, XO, stride_x, t, c, s, num_heads, HALF: tl.constexpr, HALF_P: tl.constexpr,
                  HEADS_P: tl.constexpr):
    """Token t's heads of X [T, heads * 2 * HALF] (rows stride_x apart) rotated into XO [T, heads *
    2 * HALF] (contiguous); c, s [HALF_P] fp32 holding values of XO's dtype."""
    h = tl.arange(0, HEADS_P)[:, None]
    i = tl.arange(0, HALF_P)[None, :]
    inside = (h < num_heads) & (i < HALF)
    src = X + t * stride_x + h * (2 * HALF) + i
    x1 = tl.load(src, mask=inside, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=inside, other=0.0).to(tl.float32)
    dt = XO.dtype.element_ty
    first = (x1 * c).to(dt).to(tl.float32) - (x2 * s).to(dt).to(tl.float32)
    second = (x2 * c).to(dt).to(tl.float32) + (x1 * s).to(dt).to(tl.float32)
    dst = XO + t * (num_heads * 2 * HALF) + h * (2 * HALF) + i
    tl.store(dst, first.to(dt), mask=inside)
    tl.store(dst + HALF, second.to(dt), mask=inside)


@triton.jit
def _rotary_kernel(POS, COS, SIN, Q, K, QO, KO, stride_q, stride_k, num_q_heads, num_k_heads,
                   HALF: tl.constexpr, HALF_P: tl.constexpr, Q_HEADS_P: tl.constexpr, K_HEADS_P: tl.constexpr):
    """grid (T,). POS [T] int; COS, SIN [positions, HALF] fp32; Q [T, Hq * 2 * HALF], K [T, Hkv * 2 *
    HALF] (rows stride_q / stride_k apart); QO, KO contiguous outputs of the same shapes."""
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(POS + t).to(tl.int64)
    i = tl.arange(0, HALF_P)[None, :]
    dt = QO.dtype.element_ty
    c = tl.load(COS + pos * HALF + i, mask=i < HALF, other=0.0).to(dt).to(tl.float32)
    s = tl.load(SIN + pos * HALF + i, mask=i < HALF, other=0.0).to(dt).to(tl.float32)
    _rotate_heads(Q, QO, stride_q, t, c, s, num_q_heads, HALF, HALF_P, Q_HEADS_P)
    _rotate_heads(K, KO, stride_k, t, c, s, num_k_heads, HALF, HALF_P, K_HEADS_P)


def rotary_triton(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T]; q [T, Hq * head_dim], k [T, Hkv * head_dim] of one dtype, unit stride in the
    last dim; cos, sin [max_positions, head_dim / 2] float32 -> rotated q, k (new contiguous tensors)."""
    if q.dtype != k.dtype or q.stride(-1) != 1 or k.stride(-1) != 1 or head_dim % 2:
        raise ValueError(f"rotary_triton needs q and k of one dtype with unit stride in the last dim and an even "
                         f"head_dim; got q {q.dtype} stride {q.stride()}, k {k.dtype} stride {k.stride()}, "
                         f"head_dim {head_dim}")
    q_out, k_out = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype,
                                                                                       device=k.device)
    T = q.shape[0]
    if T:
        half = head_dim // 2
        hq, hkv = q.shape[1] // head_dim, k.shape[1] // head_dim
        _rotary_kernel[(T,)](positions, cos, sin, q, k, q_out, k_out, q.stride(0), k.stride(0), hq, hkv, HALF=half,
                             HALF_P=triton.next_power_of_2(half), Q_HEADS_P=triton.next_power_of_2(hq),
                             K_HEADS_P=triton.next_power_of_2(hkv), num_warps=4, enable_fp_fusion=False)
    return q_out, k_out

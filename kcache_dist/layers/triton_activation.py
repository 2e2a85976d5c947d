"""SiLU-and-multiply in one Triton kernel (CUDA; also under TRITON_INTERPRET=1 on CPU).

Same numbers as `activation.silu_and_mul_reference`, bit for bit on CUDA: torch's silu kernel
computes gate / (1 + exp(-gate)) in float32 with CUDA's expf (libdevice's `__nv_expf`) and an
IEEE division and rounds it to the dtype; its product kernel multiplies that by up in float32 and
rounds again. The kernel does the same steps (`libdevice.exp`, `tl.div_rn`: Triton's `tl.exp` and
`/` are approximations in float32). Torch runs the reference as two kernels and a [T, I]
intermediate a layer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..triton_interpreter import patch_if_interpreting

patch_if_interpreting()

COLUMNS_PER_PROGRAM = 1024


@triton.jit
def _silu_and_mul_kernel(GATE_UP, OUT, stride_in, intermediate, BLOCK: tl.constexpr):
    """grid (T, cdiv(I, BLOCK)) for I = intermediate. GATE_UP [T, 2 * I] (gate then up, rows stride_in
    apart), OUT [T, I] (contiguous), one dtype: OUT = silu(gate) rounded to the dtype, times up,
    rounded."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < intermediate
    src = GATE_UP + row * stride_in + cols
    gate = tl.load(src, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(src + intermediate, mask=inside, other=0.0).to(tl.float32)
    dt = OUT.dtype.element_ty
    silu = tl.div_rn(gate, 1.0 + libdevice.exp(-gate)).to(dt).to(tl.float32)
    tl.store(OUT + row * intermediate + cols, (silu * up).to(dt), mask=inside)


def silu_and_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2 * I] (gate then up) with unit stride in the last dim -> silu(gate) * up [T, I]
    (a new contiguous tensor)."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(1) != 1:
        raise ValueError(f"silu_and_mul_triton needs gate_up [T, 2 * I] with unit stride in the last dim; got "
                         f"{tuple(gate_up.shape)} stride {gate_up.stride()}")
    tokens, intermediate = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((tokens, intermediate), dtype=gate_up.dtype, device=gate_up.device)
    if tokens and intermediate:
        grid = (tokens, triton.cdiv(intermediate, COLUMNS_PER_PROGRAM))
        _silu_and_mul_kernel[grid](gate_up, out, gate_up.stride(0), intermediate, BLOCK=COLUMNS_PER_PROGRAM,
                                   num_warps=4)
    return out

"""The one-kernel SiLU-and-multiply (kcache_dist/layers/triton_activation.py) against the torch
reference `activation.silu_and_mul_reference`, on fresh random gate_up rows, whole and as views of
wider rows (the seed is printed and in failure messages).

On CUDA, bit for bit: the kernel takes the reference's steps (silu with CUDA's expf and an IEEE
division in float32, rounded to the dtype, then the product rounded). Under TRITON_INTERPRET=1 on
CPU the exp is numpy's and the reference's is torch's CPU exp, which differ in the last bits of
float32 (up to 4 units seen): within 16 ulp in float32; in float16 a silu may round to the
neighbouring value, so the product is within 2 ulp and nearly all equal (about 1 element in 7000
differs, measured over 40 seeds; `check_within_ulps`).
bfloat16 is left to the GPU: the interpreter truncates float32 to bfloat16 instead of rounding.
"""

from __future__ import annotations

import textwrap

import pytest
import torch

from kcache_dist.layers.activation import silu_and_mul, silu_and_mul_reference
from helpers import HAS_TRITON, cuda_and_triton as cuda, fresh_seed, run_under_triton_interpreter


def random_gate_up(tokens: int, intermediate: int, dtype: torch.dtype, g: torch.Generator, device: str,
                   row_width: int = 0) -> torch.Tensor:
    """gate_up [tokens, 2 * intermediate]: gates spread over most of silu's curve (a row of them over
    [-60, 60], exp far from 1), ups about 1; the first 2 * intermediate columns of rows `row_width`
    apart when row_width is given."""
    gate = torch.randn(tokens, intermediate, generator=g) * 4
    gate[0] = torch.linspace(-60, 60, intermediate)
    up = torch.randn(tokens, intermediate, generator=g)
    rows = torch.cat([gate, up, torch.randn(tokens, max(0, row_width - 2 * intermediate), generator=g)], dim=1)
    return rows.to(dtype).to(device)[:, : 2 * intermediate]


def check_equal(gate_up: torch.Tensor, seed: int) -> None:
    from kcache_dist.layers.triton_activation import silu_and_mul_triton

    out, ref = silu_and_mul_triton(gate_up), silu_and_mul_reference(gate_up)
    assert out.shape == ref.shape and out.is_contiguous(), f"seed {seed}: {tuple(out.shape)}"
    differ = (out != ref).sum().item()
    assert differ == 0, f"seed {seed}: {differ} of {ref.numel()} elements differ from the reference ({ref.dtype})"


CASES = [(1, 14336), (72, 14336), (5, 3584), (3, 1000), (600, 128), (2, 7)]  # (tokens, intermediate)


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}-I{c[1]}")
def test_triton_silu_and_mul_equals_reference(case, dtype):
    tokens, intermediate = case
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    check_equal(random_gate_up(tokens, intermediate, dtype, g, "cuda"), seed)
    check_equal(random_gate_up(tokens, intermediate, dtype, g, "cuda", row_width=2 * intermediate + 24), seed)


@cuda
def test_silu_and_mul_uses_the_kernel_on_cuda_and_the_reference_otherwise():
    from kcache_dist.layers.triton_activation import silu_and_mul_triton

    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    gate_up = random_gate_up(9, 256, torch.bfloat16, g, "cuda", row_width=640)
    assert torch.equal(silu_and_mul(gate_up), silu_and_mul_triton(gate_up))
    wide = gate_up.double()  # a dtype the kernel does not take: the reference
    assert torch.equal(silu_and_mul(wide), silu_and_mul_reference(wide))


def test_bad_input_is_refused_before_any_launch():
    from kcache_dist.layers.triton_activation import silu_and_mul_triton

    with pytest.raises(ValueError) as err:
        silu_and_mul_triton(torch.zeros(2, 7))
    assert str(err.value) == ("silu_and_mul_triton needs gate_up [T, 2 * I] with unit stride in the last dim; got "
                              "(2, 7) stride (7, 1)")


INTERPRET_SCRIPT = textwrap.dedent("""
    import torch
    from kcache_dist.layers.activation import silu_and_mul_reference
    from kcache_dist.layers.triton_activation import silu_and_mul_triton
    from helpers import check_within_ulps
    from test_activation_triton import random_gate_up
    g = torch.Generator().manual_seed({seed})
    for tokens, intermediate, dtype, row_width in [(3, 1500, torch.float32, 0), (4, 1100, torch.float16, 0),
                                                   (2, 40, torch.float32, 96), (5, 9, torch.float16, 30)]:
        gate_up = random_gate_up(tokens, intermediate, dtype, g, "cpu", row_width)
        out = silu_and_mul_triton(gate_up)
        assert out.shape == (tokens, intermediate) and out.is_contiguous()
        check_within_ulps(out, silu_and_mul_reference(gate_up), {seed})
    assert silu_and_mul_triton(torch.zeros(0, 8)).shape == (0, 4)
    print("interpreter ok")
""")


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_triton_silu_and_mul_under_interpreter():
    seed = fresh_seed()
    run_under_triton_interpreter(INTERPRET_SCRIPT.format(seed=seed), seed, timeout_s=120)

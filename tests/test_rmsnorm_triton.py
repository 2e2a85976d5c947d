"""The one-kernel RMSNorm and residual-add-and-RMSNorm (kcache_dist/layers/triton_rmsnorm.py)
against the torch references `rmsnorm.rms_norm_reference` and `rmsnorm.add_rms_norm_reference`, on
fresh random rows (the seed is printed and in failure messages).

The kernel's float32 sum runs in another order than torch's mean, so a row's scale may differ in
its last bits: a 16-bit normalised value may round to the neighbouring value of its dtype, which
the weight can carry into a finer binade of the output (within 2 units in the last place of the
reference, nearly all equal); a float32 output keeps the difference (within 16 units: 2e-6 relative,
seen up to 6 on 2048 rows of 4096). The residual sum is rounded once, as torch's add: bit for bit.
GPU tests skip without CUDA; the CPU test runs the kernels under TRITON_INTERPRET=1 in a subprocess.
"""

from __future__ import annotations

import textwrap

import pytest
import torch

from kcache_dist.layers.rmsnorm import RMSNorm, add_rms_norm_reference, rms_norm_reference
from helpers import HAS_TRITON, check_within_ulps, cuda_and_triton as cuda, fresh_seed, run_under_triton_interpreter


SHAPES = [(1, 4096), (64, 4096), (3, 576), (2048, 4096), (5, 96), (7, 5120)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def random_rows(shape, dtype, g: torch.Generator, scale: float = 3.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def random_weight(hidden: int, dtype, g: torch.Generator) -> torch.Tensor:
    return (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)


def check_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, seed: int) -> None:
    """`add_rms_norm_triton` against the reference: the sum bit for bit, the norm within ulps."""
    from kcache_dist.layers.triton_rmsnorm import add_rms_norm_triton

    out, summed = add_rms_norm_triton(x, residual, weight, 1e-5)
    ref_out, ref_summed = add_rms_norm_reference(x, residual, weight, 1e-5)
    assert out.shape == summed.shape == x.shape, f"seed {seed}: {tuple(out.shape)}, {tuple(summed.shape)}"
    differ = (summed != ref_summed).sum().item()
    assert differ == 0, f"seed {seed}: {differ} of {summed.numel()} sums differ from the reference ({x.dtype})"
    check_within_ulps(out, ref_out, seed)


@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_triton_rms_norm_matches_reference(shape, dtype):
    from kcache_dist.layers.triton_rmsnorm import rms_norm_triton

    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    x, weight = random_rows(shape, dtype, g).cuda(), random_weight(shape[1], dtype, g).cuda()
    check_within_ulps(rms_norm_triton(x, weight, 1e-5), rms_norm_reference(x, weight, 1e-5), seed)


@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_triton_add_rms_norm_matches_reference(shape, dtype):
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    residual, weight = random_rows(shape, dtype, g).cuda(), random_weight(shape[1], dtype, g).cuda()
    delta = random_rows(shape, dtype, g, scale=0.5).cuda()  # a layer's output, smaller than the stream
    check_add_rms_norm(delta, residual, weight, seed)


@cuda
def test_module_uses_the_kernels_on_strided_rows_and_the_reference_otherwise():
    from kcache_dist.layers.triton_rmsnorm import add_rms_norm_triton

    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    norm = RMSNorm(256, 1e-6, torch.bfloat16).cuda()
    norm.weight.data.copy_(random_weight(256, torch.bfloat16, g))
    rows, delta = (random_rows((6, 512), torch.bfloat16, g).cuda()[:, :256] for _ in range(2))  # rows 512 apart
    check_within_ulps(norm(rows), rms_norm_reference(rows, norm.weight, 1e-6), seed)
    normed, summed = norm(delta, rows)
    assert all(torch.equal(a, b) for a, b in zip((normed, summed), add_rms_norm_triton(delta, rows, norm.weight, 1e-6)))
    f32 = torch.randn(6, 256, generator=g).cuda()  # another dtype than the weight: the references
    assert torch.equal(norm(f32), rms_norm_reference(f32, norm.weight, 1e-6))
    assert all(torch.equal(a, b) for a, b in zip(norm(f32, f32), add_rms_norm_reference(f32, f32, norm.weight, 1e-6)))


def test_bad_input_is_refused_before_any_launch():
    from kcache_dist.layers.triton_rmsnorm import add_rms_norm_triton, rms_norm_triton

    with pytest.raises(ValueError) as err:
        rms_norm_triton(torch.zeros(2, 8), torch.zeros(8, dtype=torch.float16), 1e-5)
    assert str(err.value) == ("rms_norm_triton needs x [..., 8] with unit stride in the last dim and a weight [8] of "
                              "x's dtype; got x (2, 8) stride (8, 1) torch.float32, weight (8,) torch.float16")
    with pytest.raises(ValueError) as err:
        add_rms_norm_triton(torch.zeros(2, 8), torch.zeros(2, 16)[:, ::2], torch.zeros(8), 1e-5)
    assert str(err.value) == ("add_rms_norm_triton needs a residual of x's shape and dtype with unit stride in the "
                              "last dim; got x (2, 8) torch.float32, residual (2, 8) stride (16, 2) torch.float32")


INTERPRET_SCRIPT = textwrap.dedent("""
    import torch
    from kcache_dist.layers.rmsnorm import rms_norm_reference
    from kcache_dist.layers.triton_rmsnorm import add_rms_norm_triton, rms_norm_triton
    from helpers import check_within_ulps
    from test_rmsnorm_triton import check_add_rms_norm, random_rows, random_weight
    g = torch.Generator().manual_seed({seed})
    for shape, dtype in [((3, 96), torch.float32), ((4, 64), torch.float16), ((2, 3, 40), torch.float32)]:
        x, w = random_rows(shape, dtype, g), random_weight(shape[-1], dtype, g)
        out = rms_norm_triton(x, w, 1e-5)
        assert out.shape == x.shape
        check_within_ulps(out, rms_norm_reference(x, w, 1e-5), {seed})
        check_add_rms_norm(random_rows(shape, dtype, g, scale=0.5), x, w, {seed})
    assert rms_norm_triton(torch.zeros(0, 8), torch.ones(8), 1e-5).shape == (0, 8)
    assert [t.shape for t in add_rms_norm_triton(torch.zeros(0, 8), torch.zeros(0, 8), torch.ones(8), 1e-5)] == \
        [(0, 8), (0, 8)]
    print("interpreter ok")
""")


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_triton_rms_norm_under_interpreter():
    seed = fresh_seed()
    run_under_triton_interpreter(INTERPRET_SCRIPT.format(seed=seed), seed, timeout_s=120)

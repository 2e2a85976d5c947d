"""benchmarks/fp8_keys_accuracy.py: the fp8 rounding it applies to the sparse layers' K, and its
variants' names."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from fp8_keys_accuracy import fp8_rounded_keys, sparse_attention_with  # noqa: E402


def test_rows_scaled_to_448_and_rounded_to_e4m3():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))  # fresh each run
    keys = torch.randn(3, 40, 64, generator=g) * torch.rand(3, 40, 1, generator=g) * 20
    rounded = fp8_rounded_keys(keys)
    assert rounded.shape == keys.shape and rounded.dtype == keys.dtype
    amax = keys.abs().amax(-1, keepdim=True)
    torch.testing.assert_close(rounded.abs().amax(-1, keepdim=True), amax)  # 448 is exact in e4m3
    # e4m3: 3 mantissa bits, so a normal value is off by at most 1/16 of itself; below 2^-6 of the
    # scale (subnormals) by at most 2^-10 of the scale (amax / 448)
    bound = torch.maximum(keys.abs() / 16, amax / 448 * 2.0 ** -10)
    assert bool(((rounded - keys).abs() <= bound * (1 + 1e-6)).all())
    on_grid = torch.tensor([[[448.0, -224.0, 1.0, 0.0]]])  # exactly representable at scale 1
    assert torch.equal(fp8_rounded_keys(on_grid), on_grid)


def test_unknown_variant_is_refused_with_the_known_ones():
    with pytest.raises(ValueError) as err:
        sparse_attention_with("fp8")
    assert str(err.value) == "unknown variant 'fp8'; expected one of model_keys, fp8_keys, fp8_selection"

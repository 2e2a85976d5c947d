"""kcache_dist/kcache/fp8_keys.py (the fp8 copy of K that scoring_keys="fp8" picks with), and the
variants of benchmarks/fp8_keys_accuracy.py (their 4-bit rounding too)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from kcache_dist.config import KCacheConfig
from kcache_dist.kcache.fp8_keys import FP8_DTYPE, dequantize_rows, fp8_rounded, quantize_rows
from kcache_dist.kcache.teacher_forced import _EmulatedCache, dense_causal_attention, sparse_decode_attention
from helpers import fresh_seed

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from fp8_keys_accuracy import INT4_GROUPS, emulated_attend_with, int4_rounded, sparse_attention_with  # noqa: E402


def test_rows_scaled_to_448_and_rounded_to_e4m3():
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(3, 40, 64, generator=g) * torch.rand(3, 40, 1, generator=g) * 20
    fp8, scales = quantize_rows(keys)
    assert fp8.dtype == FP8_DTYPE and fp8.shape == keys.shape
    assert scales.dtype == torch.float32 and scales.shape == keys.shape[:-1]
    rounded = dequantize_rows(fp8, scales)
    assert torch.equal(fp8_rounded(keys), rounded)
    amax = keys.abs().amax(-1, keepdim=True)
    torch.testing.assert_close(rounded.abs().amax(-1, keepdim=True), amax)  # 448 is exact in e4m3
    # e4m3: 3 mantissa bits, so a normal value is off by at most 1/16 of itself; below 2^-6 of the
    # scale (subnormals) by at most 2^-10 of the scale (amax / 448)
    bound = torch.maximum(keys.abs() / 16, amax / 448 * 2.0 ** -10)
    assert bool(((rounded - keys).abs() <= bound * (1 + 1e-6)).all()), f"seed {seed}"
    on_grid = torch.tensor([[[448.0, -224.0, 1.0, 0.0]]])  # exactly representable at scale 1
    assert torch.equal(fp8_rounded(on_grid), on_grid)
    zero = torch.zeros(2, 8, dtype=torch.bfloat16)
    assert torch.equal(fp8_rounded(zero), zero) and fp8_rounded(zero).dtype == torch.bfloat16


def test_unknown_variant_is_refused_with_the_known_ones():
    with pytest.raises(ValueError) as err:
        sparse_attention_with("fp8")
    assert str(err.value) == ("unknown variant 'fp8'; expected one of model_keys, fp8_keys, fp8_selection, "
                              "fp8_qk_selection, fp8_far_values, fp8_values_rounded_prefill, int4_far_values, "
                              "int4_g32_far_values")


def test_the_studys_variants_attend_as_the_emulation_does():
    """fp8_selection equals the emulation under KCacheConfig(scoring_keys="fp8"), which passes
    selection_keys itself; fp8_keys rounds the K it weighs with too."""
    g = torch.Generator().manual_seed(fresh_seed())
    q, keys, values = torch.randn(6, 4, 16, generator=g), torch.randn(2, 40, 16, generator=g), torch.randn(2, 40, 16,
                                                                                                          generator=g)
    kc = KCacheConfig(mode="kcache", top_n=3, dense_layers=0, sink_tokens=1, recent_window=2)
    args = (q, keys, values, 34, kc, lambda n: kc.top_n, 0.25)
    picked_by_fp8 = sparse_decode_attention(*args, selection_keys=fp8_rounded(keys))
    assert torch.equal(sparse_attention_with("fp8_selection")(*args, selection_keys=None), picked_by_fp8)
    assert torch.equal(sparse_attention_with("fp8_keys")(*args, selection_keys=None),
                       sparse_decode_attention(q, fp8_rounded(keys), values, *args[3:]))
    assert sparse_attention_with("model_keys") is sparse_decode_attention
    assert torch.equal(sparse_attention_with("fp8_qk_selection")(*args, selection_keys=None),
                       sparse_decode_attention(*args, selection_keys=fp8_rounded(keys),
                                               selection_queries=fp8_rounded(q)))
    assert torch.equal(sparse_attention_with("fp8_far_values")(*args, selection_keys=None),
                       sparse_decode_attention(*args, far_values=fp8_rounded(values)))
    for variant in ("int4_far_values", "int4_g32_far_values"):  # (rows of 16: one group of 32 is the row)
        assert torch.equal(sparse_attention_with(variant)(*args, selection_keys=None),
                           sparse_decode_attention(*args, far_values=int4_rounded(values, INT4_GROUPS[variant])))


def test_int4_rows_take_16_levels_from_their_minimum_to_their_maximum():
    g = torch.Generator().manual_seed(fresh_seed())
    values = torch.randn(3, 40, 64, generator=g) * torch.rand(3, 40, 1, generator=g) * 20
    for group in (None, 32):
        rounded = int4_rounded(values, group)
        assert rounded.shape == values.shape and rounded.dtype == torch.float32
        pieces = values.reshape(3, 40, -1, group or 64)
        low, high = pieces.amin(-1, keepdim=True), pieces.amax(-1, keepdim=True)
        step = (high - low) / 15
        levels = (rounded.reshape(pieces.shape) - low) / step
        assert torch.allclose(levels, levels.round(), atol=1e-3) and int(levels.round().max()) == 15
        assert bool(((rounded.reshape(pieces.shape) - pieces).abs() <= step / 2 * (1 + 1e-5) + 1e-6).all())
    flat = torch.full((2, 16), 3.0)  # a constant row keeps its value
    assert torch.equal(int4_rounded(flat), flat)


def test_rounded_prefill_variant_rounds_only_earlier_chunks_of_sparse_layers():
    """fp8_values_rounded_prefill: a later prefill chunk of a sparse layer attends to the earlier
    chunks' V rounded, and leaves them stored exact; first chunks, dense layers and decode steps
    (a kcache set) attend as they are."""
    g = torch.Generator().manual_seed(fresh_seed())
    dense = KCacheConfig().dense_layers
    cache = _EmulatedCache(dense + 1, 2, 16, 40, torch.float32, torch.device("cpu"))
    q, k, v = (torch.randn(6, 4, 16, generator=g) for _ in range(3))
    kv = torch.randn(2, 20, 16, generator=g)
    attend = emulated_attend_with("fp8_values_rounded_prefill")
    assert emulated_attend_with("fp8_far_values") is _EmulatedCache.attend
    for layer in (dense - 1, dense):
        cache.keys[layer][:, :20], cache.values[layer][:, :20] = kv, kv * 3
    cache.length = 20
    for layer, rounded in ((dense, True), (dense - 1, False)):
        out = attend(cache, layer, q, k[:, :2], v[:, :2], 0.25, None)
        earlier = fp8_rounded(kv * 3) if rounded else kv * 3
        values = torch.cat([earlier, v[:, :2].transpose(0, 1)], 1)
        keys = torch.cat([kv, k[:, :2].transpose(0, 1)], 1)
        assert torch.equal(out, dense_causal_attention(q, keys, values, 20, 0.25)), layer
        assert torch.equal(cache.values[layer][:, :20], kv * 3), layer  # stored exact
    cache.length = 0  # a first chunk: nothing earlier to round
    assert torch.equal(attend(cache, dense, q, k[:, :2], v[:, :2], 0.25, None),
                       _EmulatedCache.attend(cache, dense, q, k[:, :2], v[:, :2], 0.25, None))

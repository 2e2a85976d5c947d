"""The torch KCache reference against an independent dense statement of the method (with fp8
scoring keys too), and against dense attention when the budget covers the context."""

from __future__ import annotations

import pytest
import torch

from kcache_dist.kcache.fp8_keys import fp8_rounded, quantize_rows
from kcache_dist.kcache.reference import hot_positions, kcache_decode_fp8_scoring_reference, kcache_decode_reference
from kcache_dist.kcache.row_cache import FarRowCache
from kcache_dist.kcache.selection import SelectionSpec
from kcache_dist.layers.paged_attention import decode_attention
from helpers import fresh_seed


def hot_rows_of(dense_rows, hot_slots, num_slots, spec):
    """The device hot buffer [num_slots, Hkv, sink + window, D] (NaN where no sequence writes) of the
    sequences' dense rows [Hkv, L, D] (V, or K with fp8 scoring keys), sequence b in slot hot_slots[b]."""
    num_kv_heads, _, head_dim = dense_rows[0].shape
    hot = torch.full((num_slots, num_kv_heads, spec.hot_rows, head_dim), float("nan"), dtype=dense_rows[0].dtype)
    for slot, rows in zip(hot_slots, dense_rows):
        hot_pos = hot_positions(*spec.split(rows.shape[1]), rows.shape[1], rows.device)
        hot[slot][:, spec.hot_row(hot_pos)] = rows[:, hot_pos]
    return hot


def paged_inputs(batch, num_kv_heads, group, head_dim, seq_lens, block_size, spec, dtype=torch.float32, seed=None):
    """Random dense K/V per sequence, scattered into shuffled paged pools; hot rows filled from V."""
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    max_blocks = max(-(-n // block_size) for n in seq_lens)
    num_blocks = batch * max_blocks + 3
    perm = torch.randperm(num_blocks, generator=g)
    tables = perm[: batch * max_blocks].view(batch, max_blocks).int()
    k_pool = torch.randn(num_blocks, num_kv_heads, block_size, head_dim, generator=g).to(dtype)
    v_pool = torch.randn(num_blocks, num_kv_heads, block_size, head_dim, generator=g).to(dtype)
    q = torch.randn(batch, num_kv_heads * group, head_dim, generator=g).to(dtype) * 2
    hot_slots = torch.randperm(batch + 2, generator=g)[:batch].tolist()
    dense_k, dense_v = [], []
    for b, n in enumerate(seq_lens):
        blocks = tables[b, : -(-n // block_size)].long()
        dense_k.append(k_pool[blocks].transpose(0, 1).flatten(1, 2)[:, :n])
        dense_v.append(v_pool[blocks].transpose(0, 1).flatten(1, 2)[:, :n])
    v_hot = hot_rows_of(dense_v, hot_slots, batch + 2, spec)
    return q, k_pool, v_pool, v_hot, tables, hot_slots, dense_k, dense_v


def fp8_scoring_inputs(q, k_pool, v_pool, v_hot, tables, hot_slots, dense_k, spec):
    """`paged_inputs`'s tensors as fp8 scoring keys hold them: (k_fp8 [NB, Hkv, bs, D] float8, k_scales
    [NB, Hkv, bs], host rows K | V [NB, Hkv, bs, 2D], k_hot: the hot rows' exact K, shaped as v_hot)."""
    k_fp8, k_scales = quantize_rows(k_pool)
    return k_fp8, k_scales, torch.cat([k_pool, v_pool], -1), hot_rows_of(dense_k, hot_slots, v_hot.shape[0], spec)


def independent_kcache(q, k, v, spec, scale, selection_k=None):
    """Straight from the definition with a selection mask; q [Hq, D], k/v [Hkv, L, D] dense."""
    hkv, length, _ = k.shape
    qg = q.view(hkv, -1, q.shape[-1]).double()
    p = torch.softmax(torch.einsum("hgd,hld->hgl", qg, k.double()) * scale, -1)
    # selection_k (fp8 scoring keys): these K pick, `k` weighs (renormalised over the picks)
    p_pick = p if selection_k is None else torch.softmax(torch.einsum("hgd,hld->hgl", qg, selection_k.double()) * scale,
                                                         -1)
    mask = torch.zeros(hkv, length, dtype=torch.bool)
    mask[:, : spec.sink_tokens] = True
    if spec.recent_window:
        mask[:, max(0, length - spec.recent_window):] = True
    for h in range(hkv):
        score = p_pick[h].max(0).values if spec.group_reduce == "max" else p_pick[h].sum(0)
        far = [j for j in range(length) if not mask[h, j]]
        for j in sorted(far, key=lambda j: -score[j].item())[: spec.top_n]:
            mask[h, j] = True
    ps = p * mask[:, None, :]
    out = torch.einsum("hgl,hld->hgd", ps, v.double())
    if spec.renormalize:
        out = out / ps.sum(-1, keepdim=True)
    return out.reshape(q.shape)


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("spec", [
    SelectionSpec(top_n=5, sink_tokens=2, recent_window=6, renormalize=True, group_reduce="max"),
    SelectionSpec(top_n=9, sink_tokens=0, recent_window=3, renormalize=False, group_reduce="sum"),
    SelectionSpec(top_n=3, sink_tokens=4, recent_window=0, renormalize=True, group_reduce="sum"),
    SelectionSpec(top_n=1, sink_tokens=0, recent_window=0, renormalize=False, group_reduce="max"),
])
def test_reference_matches_the_definition(group, spec):
    seq_lens = [1, 7, 19, 40, 33]
    q, k_pool, v_pool, v_hot, tables, slots, dense_k, dense_v = paged_inputs(5, 2, group, 16, seq_lens, 4, spec)
    out = kcache_decode_reference(q, k_pool, v_pool, v_hot, tables, seq_lens, slots, spec, 0.25)
    assert not out.isnan().any()
    for b, n in enumerate(seq_lens):
        expected = independent_kcache(q[b], dense_k[b], dense_v[b], spec, 0.25)
        torch.testing.assert_close(out[b].double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("spec", [
    SelectionSpec(top_n=5, sink_tokens=2, recent_window=6, renormalize=True, group_reduce="max"),
    SelectionSpec(top_n=3, sink_tokens=4, recent_window=0, renormalize=True, group_reduce="sum"),
    SelectionSpec(top_n=1, sink_tokens=0, recent_window=0, renormalize=True, group_reduce="max"),
])
def test_fp8_scoring_reference_matches_the_definition(group, spec):
    """Picks by the float8 K (dequantized), weights by the exact K over the picks; a row cache
    gives the same output."""
    seq_lens = [1, 7, 19, 40, 33]
    seed = fresh_seed()
    inputs = paged_inputs(5, 2, group, 16, seq_lens, 4, spec, seed=seed)
    q, k_pool, v_pool, v_hot, tables, slots, dense_k, dense_v = inputs
    k_fp8, k_scales, host_rows, k_hot = fp8_scoring_inputs(*inputs[:7], spec)
    out = kcache_decode_fp8_scoring_reference(q, k_fp8, k_scales, host_rows, k_hot, v_hot, tables, seq_lens, slots,
                                              spec, 0.25)
    assert not out.isnan().any()
    for b, n in enumerate(seq_lens):
        expected = independent_kcache(q[b], dense_k[b], dense_v[b], spec, 0.25, selection_k=fp8_rounded(dense_k[b]))
        torch.testing.assert_close(out[b].double(), expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"seed {seed}: {m}")
    cache = FarRowCache(1, len(slots) + 2, 2, 2 * spec.top_n, max(seq_lens), 32, torch.float32, torch.device("cpu"))
    for _ in range(2):
        cached = kcache_decode_fp8_scoring_reference(q, k_fp8, k_scales, host_rows, k_hot, v_hot, tables, seq_lens,
                                                     slots, spec, 0.25, row_cache=cache.layer(0))
        assert torch.equal(cached, out)


@pytest.mark.parametrize("spec", [
    SelectionSpec(top_n=5, sink_tokens=2, recent_window=6, renormalize=True, group_reduce="max"),
    SelectionSpec(top_n=9, sink_tokens=0, recent_window=3, renormalize=False, group_reduce="sum"),
])
def test_fp8_host_values_weigh_the_far_picks_with_rounded_v(spec):
    """host_values="fp8": the far rows are the pool's float8 rows times their scales, as an exact
    reference given those rounded rows computes it (sink and window rows exact); with a row cache of
    float8 rows the same; and the rounding does change the output."""
    seq_lens = [1, 7, 19, 40, 33]
    seed = fresh_seed()
    q, k_pool, v_pool, v_hot, tables, slots, dense_k, dense_v = paged_inputs(5, 2, 3, 16, seq_lens, 4, spec, seed=seed)
    v_fp8, v_scales = quantize_rows(v_pool)
    out = kcache_decode_reference(q, k_pool, v_fp8, v_hot, tables, seq_lens, slots, spec, 0.25, v_scales=v_scales)
    rounded = kcache_decode_reference(q, k_pool, fp8_rounded(v_pool), v_hot, tables, seq_lens, slots, spec, 0.25)
    torch.testing.assert_close(out, rounded, rtol=1e-6, atol=1e-6, msg=lambda m: f"seed {seed}: {m}")
    exact = kcache_decode_reference(q, k_pool, v_pool, v_hot, tables, seq_lens, slots, spec, 0.25)
    assert not torch.allclose(out, exact, atol=1e-4), f"seed {seed}: rounding V changed nothing"
    cache = FarRowCache(1, len(slots) + 2, 2, 2 * spec.top_n, max(seq_lens), 16, torch.float8_e4m3fn,
                        torch.device("cpu"))
    for _ in range(2):  # the second call hits every far row
        cached = kcache_decode_reference(q, k_pool, v_fp8, v_hot, tables, seq_lens, slots, spec, 0.25,
                                         row_cache=cache.layer(0), v_scales=v_scales)
        assert torch.equal(cached, out)


def test_fp8_scoring_keys_pick_what_the_float8_copy_ranks_first():
    """Two far keys whose order float8 reverses: position 3 = [17, 448, 0...] scores 17 exactly and
    16 in e4m3 (scale 1: 17 is a tie between 16 and 18, rounded to even); position 6 = [16.6, 460,
    0...] scores 16.6 exactly and 16.43 in e4m3 (scale 460/448). top_n = 1 picks 6 with fp8 scoring
    keys, 3 with the model's K; each output is that position's V (the only one attended)."""
    spec = SelectionSpec(top_n=1, sink_tokens=0, recent_window=0, renormalize=True, group_reduce="max")
    keys = torch.zeros(1, 1, 16, 16)  # one block of 16 positions, one KV head
    keys[0, 0, 3, :2] = torch.tensor([17.0, 448.0])
    keys[0, 0, 6, :2] = torch.tensor([16.6, 460.0])
    values = torch.arange(16.0)[None, None, :, None].expand(1, 1, 16, 16).contiguous()  # V row j = j
    q = torch.zeros(1, 1, 16)
    q[0, 0, 0] = 1.0
    table = torch.zeros(1, 1, dtype=torch.int32)
    hot = torch.zeros(1, 1, 0, 16)
    k_fp8, k_scales = quantize_rows(keys)
    picked = kcache_decode_fp8_scoring_reference(q, k_fp8, k_scales, torch.cat([keys, values], -1), hot, hot, table,
                                                 [10], [0], spec, 1.0)
    assert torch.equal(picked, torch.full((1, 1, 16), 6.0))
    exact = kcache_decode_reference(q, keys, values, hot, table, [10], [0], spec, 1.0)
    assert torch.equal(exact, torch.full((1, 1, 16), 3.0))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_full_budget_equals_dense_attention(dtype, tol):
    seq_lens = [3, 17, 64, 50]
    spec = SelectionSpec(top_n=40, sink_tokens=4, recent_window=20, renormalize=True, group_reduce="max")
    q, k_pool, v_pool, v_hot, tables, slots, _, _ = paged_inputs(4, 2, 4, 32, seq_lens, 8, spec, dtype)
    out = kcache_decode_reference(q, k_pool, v_pool, v_hot, tables, seq_lens, slots, spec, 32 ** -0.5)
    dense = decode_attention(q, k_pool, v_pool, tables, torch.tensor(seq_lens), 32 ** -0.5)
    torch.testing.assert_close(out.float(), dense.float(), rtol=tol, atol=tol)


def test_hot_row_ring():
    spec = SelectionSpec(top_n=1, sink_tokens=3, recent_window=4, renormalize=True, group_reduce="max")
    assert spec.hot_row(torch.arange(12)).tolist() == [0, 1, 2, 3, 4, 5, 6, 3, 4, 5, 6, 3]
    no_window = SelectionSpec(top_n=1, sink_tokens=3, recent_window=0, renormalize=True, group_reduce="max")
    assert no_window.hot_row(torch.arange(6)).tolist() == [0, 1, 2, 2, 2, 2]  # past the sink: in range, unread
    assert spec.split(2) == (2, 2) and spec.split(10) == (3, 6) and spec.split(5) == (3, 3)


def test_equal_scores_pick_the_lowest_far_positions():
    """Ties (e.g. q = 0: every score equal) go to the lowest positions, as the Triton selection
    takes them, so the CPU and CUDA paths pick alike."""
    from kcache_dist.kcache.reference import select_far_positions

    spec = SelectionSpec(top_n=3, sink_tokens=2, recent_window=2, renormalize=True, group_reduce="max")
    probs = torch.full((2, 4, 40), 1 / 40)
    assert select_far_positions(probs, 2, 38, spec).tolist() == [[2, 3, 4], [2, 3, 4]]
    probs[1, 2, 30] = 0.5  # one head of the second group prefers position 30
    assert select_far_positions(probs, 2, 38, spec).tolist() == [[2, 3, 4], [2, 3, 30]]


def test_renormalised_output_of_a_head_whose_picks_hold_almost_no_mass():
    """GQA max-reduce with top_n 1: both heads' favourite positions tie (each holds all of its head's
    mass), the lower one is picked, and the other head's weight on it (e^-700 of its softmax)
    underflows float32. Renormalised, that head's output is still the picked row's V (a softmax over
    the picks), not NaN."""
    spec = SelectionSpec(top_n=1, sink_tokens=0, recent_window=0, renormalize=True, group_reduce="max")
    k_pool = torch.zeros(1, 1, 4, 2)
    k_pool[0, 0, 0] = torch.tensor([1.0, 0.0])
    k_pool[0, 0, 2] = torch.tensor([0.0, 1.0])
    v_pool = torch.arange(8.0).view(1, 1, 4, 2)  # V of position j: (2j, 2j + 1)
    q = torch.tensor([[[1000.0, 0.0], [0.0, 700.0]]])  # head 0 -> position 0, head 1 -> position 2
    out = kcache_decode_reference(q, k_pool, v_pool, torch.zeros(1, 1, 0, 2), torch.zeros(1, 1, dtype=torch.int32),
                                  [3], [0], spec, scale=1.0)
    torch.testing.assert_close(out, torch.tensor([[[0.0, 1.0], [0.0, 1.0]]]))

"""Triton KCache decode (kcache_dist/kcache/triton_kcache.py) against the torch reference.

Fresh random inputs on every run (the seed is printed and put in the failure message); outputs
are NaN-poisoned before each kernel run. Selected sets are checked against torch.topk over keys
computed from the kernel's own scores and lse (ties may differ only among equal keys). GPU tests
skip without CUDA; the CPU test runs the same kernels under TRITON_INTERPRET=1 in a subprocess on
tiny shapes (fp32/fp16: the interpreter mishandles bf16 operands of tl.dot).
"""

from __future__ import annotations

import os
import sys
import textwrap

import pytest
import torch

from kcache_dist.kcache.reference import kcache_decode_fp8_scoring_reference, kcache_decode_reference
from kcache_dist.kcache.selection import SelectionSpec
from helpers import HAS_TRITON, KERNEL_TOLERANCE as TOL, cuda_and_triton as cuda, fresh_seed, relative_error, \
    run_under_triton_interpreter

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from selection_check import faulty_rows  # noqa: E402
from test_kcache_reference import paged_inputs  # noqa: E402


def check_selection(sel, lens, num_kv_heads, spec, note=""):
    """sel.idx [rows, top_n]: the row contract (`selection_check.faulty_rows`: min(top_n, far) far
    positions, ascending, -1 padded), and the top set by key against torch.topk of the group keys
    computed from sel.scores and sel.lse (the kernel's own fp32 numbers); where the sets differ,
    only keys equal to the n-th key (max: exactly; sum: within 1e-5, the kernel's exp2/log2 are
    approximate) may be swapped."""
    S = sel.scores.float().cpu()
    lse = sel.lse.float().cpu()
    idx = sel.idx.cpu().long()
    bad = faulty_rows(idx, torch.tensor(lens), num_kv_heads, spec)
    assert not bad.any(), (note, bad.nonzero().flatten().tolist(), idx[bad][:2])
    x = S - lse[..., None]
    key = x.amax(1) if spec.group_reduce == "max" else torch.log2(torch.exp2(x.double()).sum(1)).float()
    for r in range(idx.shape[0]):
        sink_end, window_start = spec.split(lens[r // num_kv_heads])
        want_n = min(spec.top_n, window_start - sink_end)
        if want_n == 0:
            continue
        got = idx[r, :want_n]
        k = key[r, sink_end:window_start]
        want = torch.topk(k, want_n).indices + sink_end
        if set(got.tolist()) != set(want.tolist()):
            kth = k.topk(want_n).values[-1].item()
            tol = 0.0 if spec.group_reduce == "max" else 1e-5 * max(1.0, abs(kth))
            diff = list(set(got.tolist()) ^ set(want.tolist()))
            assert all(abs(key[r, p].item() - kth) <= tol for p in diff), (note, r, kth, [(p, key[r, p].item())
                                                                                         for p in diff])


def _cuda_inputs(batch, hkv, group, head_dim, lens, block_size, spec, dtype, seed, pin=True):
    q, k_pool, v_pool, v_hot, tables, slots, _, _ = paged_inputs(batch, hkv, group, head_dim, lens, block_size,
                                                                 spec, dtype, seed=seed)
    dev = torch.device("cuda")
    v_host = v_pool.pin_memory() if pin else v_pool
    return (q.to(dev), k_pool.to(dev), v_host, v_hot.to(dev), tables.to(dev), torch.tensor(lens, device=dev),
            torch.tensor(slots, device=dev), (q, k_pool, v_pool, v_hot, tables, slots))


CASES = [  # (batch, hkv, group, head_dim, lens, block_size, spec, dtype)
    (3, 2, 4, 128, [700, 90, 1500], 16, SelectionSpec(32, 4, 64, True, "max"), torch.bfloat16),
    (2, 2, 1, 64, [3000, 257], 256, SelectionSpec(64, 4, 32, False, "sum"), torch.float16),
    (4, 3, 3, 128, [513, 1024, 20, 2049], 16, SelectionSpec(48, 0, 16, True, "sum"), torch.float16),
    (2, 2, 4, 64, [1800, 600], 256, SelectionSpec(100, 8, 0, False, "max"), torch.bfloat16),
    (1, 4, 3, 64, [4100], 16, SelectionSpec(256, 4, 128, True, "max"), torch.bfloat16),
    (2, 1, 1, 128, [5000, 130], 256, SelectionSpec(16, 0, 0, True, "sum"), torch.bfloat16),
    (5, 2, 4, 128, [40, 132, 133, 300, 64], 16, SelectionSpec(128, 4, 128, False, "max"), torch.float16),
    (2, 8, 4, 128, [8192, 7000], 256, SelectionSpec(1024, 4, 128, True, "max"), torch.bfloat16),
]
SELECT_MODES = {  # test id -> KPassConfig fields: where the selection runs
    "fused": dict(select_mode="fused"), "row": dict(select_mode="row"), "split": dict(select_mode="split"),
    "fused-late": dict(select_mode="fused", late_rows=3),  # the last 3 rows split after the K pass
}
MODE_CASES = ([(c, "fused") for c in CASES] + [(CASES[i], m) for i in (0, 2, 7) for m in ("row", "split")]
              + [(CASES[i], "fused-late") for i in (2, 4, 7)])


def _case_id(c):
    return (f"B{c[0]}-G{c[2]}-D{c[3]}-bs{c[5]}-n{c[6].top_n}-{c[6].group_reduce}-"
            f"{'renorm' if c[6].renormalize else 'full'}-{str(c[7])[6:]}")


@cuda
@pytest.mark.parametrize("case, mode", MODE_CASES, ids=[_case_id(c) + "-" + m for c, m in MODE_CASES])
def test_triton_matches_reference(case, mode):
    from kcache_dist.kcache.triton_kcache import KPassConfig, kcache_decode_triton, score_and_select

    batch, hkv, group, head_dim, lens, bs, spec, dtype = case
    seed = fresh_seed()
    q, kc, vh, vhot, bt, sl, slots, cpu = _cuda_inputs(batch, hkv, group, head_dim, lens, bs, spec, dtype, seed)
    scale = head_dim ** -0.5
    ref = kcache_decode_reference(cpu[0], cpu[1], cpu[2], cpu[3], cpu[4], lens, cpu[5], spec, scale)
    cfgs = [KPassConfig(**SELECT_MODES[mode])]
    if CASES.index(case) == 0:  # small splits, tiles and scratch: several CTAs per row, several count passes
        cfgs.append(KPassConfig(split=256, block_n=64, sel_tile=256, key_tile=512, bins=8, scratch_extra=16,
                                **SELECT_MODES[mode]))
    for cfg in cfgs:
        torch.cuda.synchronize()
        out = torch.full_like(q, float("nan"))
        kcache_decode_triton(q, kc, vh, vhot, bt, sl, slots, spec, scale, cfg=cfg, out=out)
        torch.cuda.synchronize()
        assert not out.isnan().any(), f"NaN in output (seed {seed})"
        err = relative_error(out.cpu(), ref)
        assert err < TOL[dtype], f"rel err {err:.2e} (seed {seed}, cfg {cfg})"
        poisoned = torch.full((batch * hkv * max(spec.top_n, 1),), -7, dtype=torch.int32, device="cuda")
        sel = score_and_select(q, kc, bt, sl, max(lens), spec, scale, cfg, idx_out=poisoned)
        check_selection(sel, lens, hkv, spec, f"seed {seed} cfg {cfg}")


@cuda
@pytest.mark.parametrize("mode", list(SELECT_MODES))
def test_selection_exact_on_hard_rows(mode):
    """Near-uniform scores (q tiny: keys distinct but within a few ulps of each other: every key in
    one coarse bin, several count passes), peaked scores (q large: the n-th key far below the row's
    bound, past the coarse bins), a scratch too small for the candidates (count passes over the row),
    and q = 0 (every key equal: the lowest far positions)."""
    from kcache_dist.kcache.triton_kcache import KPassConfig, score_and_select

    lens = [9000, 3000, 700]
    spec = SelectionSpec(top_n=256, sink_tokens=4, recent_window=32, renormalize=True, group_reduce="max")
    seed = fresh_seed()
    q, kc, vh, vhot, bt, sl, slots, cpu = _cuda_inputs(3, 2, 4, 128, lens, 16, spec, torch.bfloat16, seed)
    for q_scale in (1e-4, 40.0, 1.0, 0.0):
        for extra in (8, 2048):
            cfg = KPassConfig(**SELECT_MODES[mode], scratch_extra=extra)
            note = f"seed {seed} q x {q_scale} scratch_extra {extra}"
            sel = score_and_select(q * q_scale, kc, bt, sl, max(lens), spec, 0.1, cfg)
            check_selection(sel, lens, 2, spec, note)
            if q_scale == 0.0:
                for b, n in enumerate(lens):
                    for h in range(2):
                        assert torch.equal(sel.idx[2 * b + h].cpu(), torch.arange(4, 260, dtype=torch.int32)), note


@cuda
@pytest.mark.parametrize("mode", list(SELECT_MODES))
def test_selection_exact_with_keys_on_coarse_bin_edges(mode):
    """Scores on a grid of the coarse bin width (half a log2 unit), many tied: the n-th key and its
    neighbours lie on or within an ulp of a bin edge, where the float histogram and the integer keys
    could disagree. Every row must still hold exactly its top set."""
    from kcache_dist.kcache.triton_kcache import LOG2E, KPassConfig, score_and_select

    lens, hkv, head_dim, bs = [8192, 5000, 3001], 2, 64, 16
    seed = fresh_seed()
    q, kc, _, _, bt, sl, _, _ = _cuda_inputs(len(lens), hkv, 4, head_dim, lens, bs,
                                             SelectionSpec(64, 4, 64, True, "max"), torch.bfloat16, seed)
    q.zero_()
    q[..., 0] = 1.0
    kc.zero_()
    for b, n in enumerate(lens):
        pos = torch.arange(n, device="cuda")
        for h in range(hkv):
            level = ((pos * 7919 + 13 * h + b) % 61).to(torch.float32)  # 61 levels, 0 to 30 log2 units down
            kc[bt[b, pos // bs].long(), h, pos % bs, 0] = (-level / 2).to(torch.bfloat16)
    for top_n in (64, 300, 1024):
        spec = SelectionSpec(top_n, 4, 64, True, "max")
        for ulps in (0, 1, -1):
            scale = (1.0 + ulps * 2.0 ** -23) / LOG2E  # log2-domain scores of -level / 2, give or take ulps
            sel = score_and_select(q, kc, bt, sl, max(lens), spec, scale, KPassConfig(**SELECT_MODES[mode]))
            check_selection(sel, lens, hkv, spec, f"seed {seed} top_n {top_n} ulps {ulps}")


@cuda
def test_selection_of_a_recorded_row_is_exact():
    """A row recorded from an engine run (`throughput.py --check-selection`) that the row selection
    got wrong on an H100, every time, until each thread took the stored lse instead of its own
    register copy: its key bound, one ulp apart between threads, put the n-th key's neighbour (on a
    coarse bin edge) inside the candidates for some threads and outside for others."""
    from kcache_dist.kcache.triton_kcache import KPassConfig, select_from_partials

    saved = torch.load(os.path.join(os.path.dirname(__file__), "data", "selection_row_h100.pt"), weights_only=False)
    spec, length = SelectionSpec(**saved["spec"]), saved["seq_len"]
    for copies in (1, 16):
        scores = saved["scores_buffer"].cuda()[None].repeat(copies, 1, 1)[:, :, :saved["context"]]
        sel = select_from_partials(scores, saved["split_max"].cuda()[None].repeat(copies, 1, 1),
                                   saved["split_sum"].cuda()[None].repeat(copies, 1, 1),
                                   torch.full((copies,), length, device="cuda"), spec, KPassConfig(), 1)
        check_selection(sel, [length] * copies, 1, spec, f"{copies} copies")


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_full_budget_equals_dense(dtype):
    from kcache_dist.kcache.triton_kcache import kcache_decode_triton
    from kcache_dist.layers.paged_attention import decode_attention

    lens = [300, 17, 1000]
    spec = SelectionSpec(top_n=1000, sink_tokens=4, recent_window=16, renormalize=True, group_reduce="max")
    seed = fresh_seed()
    q, kc, vh, vhot, bt, sl, slots, cpu = _cuda_inputs(3, 2, 4, 64, lens, 16, spec, dtype, seed)
    out = kcache_decode_triton(q, kc, vh, vhot, bt, sl, slots, spec, 0.125, out=torch.full_like(q, float("nan")))
    dense = decode_attention(q, kc, vh.cuda(), bt, sl, 0.125)
    assert relative_error(out, dense) < TOL[dtype], seed


@cuda
def test_copy_engine_fetch_equals_zero_copy():
    from kcache_dist.kcache.triton_kcache import (gather_far_rows_copy_engine, gather_far_rows_zero_copy,
                                                  score_and_select)

    lens = [2000, 900, 4000]
    spec = SelectionSpec(top_n=128, sink_tokens=4, recent_window=64, renormalize=True, group_reduce="max")
    for bs in (16, 256):
        seed = fresh_seed()
        q, kc, vh, vhot, bt, sl, slots, cpu = _cuda_inputs(3, 2, 4, 128, lens, bs, spec, torch.bfloat16, seed)
        sel = score_and_select(q, kc, bt, sl, max(lens), spec, 0.09)
        a = gather_far_rows_zero_copy(vh, bt, sel.idx, out=torch.full((6, 128, 128), float("nan"),
                                                                         dtype=torch.bfloat16, device="cuda"))
        b = gather_far_rows_copy_engine(vh, bt.cpu(), sel.idx)
        torch.cuda.synchronize()
        ok = sel.idx >= 0
        assert torch.equal(a[ok], b[ok]), seed
        # against the pool itself
        idx = sel.idx.cpu().long()
        for r in range(6):
            bb, h = divmod(r, 2)
            for i in range(0, 128, 17):
                p = int(idx[r, i])
                assert torch.equal(a[r, i].cpu(), cpu[2][int(cpu[4][bb, p // bs]), h, p % bs]), seed


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable")
def test_select_mode_auto_and_bad_mode():
    """"auto" selects inside the K pass from FUSED_SELECT_ROWS_PER_SM rows per SM of a CUDA device,
    in its own kernel below that and off CUDA; the rows split after the K pass; an unknown mode (or fp8
    dot dtype), and a keys-pass tile that does not divide the key tile, are refused by name."""
    from kcache_dist.kcache.triton_kcache import (FUSED_SELECT_ROWS_PER_SM, LATE_ROWS, LATE_ROWS_FROM_CONTEXT,
                                                  KPassConfig, _late_row_count, _resolve_select_mode,
                                                  score_and_select)

    assert _resolve_select_mode("auto", 10 ** 6, torch.device("cpu")) == "row"
    assert _resolve_select_mode("fused", 1, torch.device("cpu")) == "fused"
    if torch.cuda.is_available():
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        cuda_dev = torch.device("cuda", 0)
        assert _resolve_select_mode("auto", FUSED_SELECT_ROWS_PER_SM * sms, cuda_dev) == "fused"
        assert _resolve_select_mode("auto", FUSED_SELECT_ROWS_PER_SM * sms - 1, cuda_dev) == "row"
    # rows selected split after the K pass: every row with "split"; with "fused" the last LATE_ROWS from
    # LATE_ROWS_FROM_CONTEXT positions up (by default), or as many as asked
    assert _late_row_count(KPassConfig(), "split", 300, 100) == 300
    assert _late_row_count(KPassConfig(), "row", 300, 10 ** 6) == 0
    assert _late_row_count(KPassConfig(), "fused", 300, LATE_ROWS_FROM_CONTEXT - 1) == 0
    assert _late_row_count(KPassConfig(), "fused", 300, LATE_ROWS_FROM_CONTEXT) == min(300, LATE_ROWS)
    assert _late_row_count(KPassConfig(late_rows=7), "fused", 300, 100) == 7
    assert _late_row_count(KPassConfig(late_rows=0), "fused", 300, 10 ** 6) == 0
    spec = SelectionSpec(top_n=4, sink_tokens=0, recent_window=0, renormalize=True, group_reduce="max")
    with pytest.raises(ValueError, match="^select_mode must be 'auto', 'row', 'fused' or 'split', not 'topk'$"):
        score_and_select(torch.zeros(1, 2, 16), torch.zeros(1, 1, 4, 16), torch.zeros(1, 1, dtype=torch.int32),
                         torch.tensor([4]), 4, spec, 1.0, KPassConfig(select_mode="topk"))
    with pytest.raises(ValueError, match="^key_tile 2048 must be a multiple of sel_tile 768$"):  # "row": 8 warps
        score_and_select(torch.zeros(1, 2, 16), torch.zeros(1, 1, 4, 16), torch.zeros(1, 1, dtype=torch.int32),
                         torch.tensor([4]), 4, spec, 1.0, KPassConfig(select_mode="row", sel_tile=768))
    with pytest.raises(ValueError, match="^fp8_dot must be 'model' or 'float16', not 'int8'$"):
        score_and_select(torch.zeros(1, 2, 16), torch.zeros(1, 1, 4, 16), torch.zeros(1, 1, dtype=torch.int32),
                         torch.tensor([4]), 4, spec, 1.0, KPassConfig(fp8_dot="int8"))


@cuda
def test_kcache_decode_dispatches_to_triton():
    from kcache_dist.kcache.decode import kcache_decode

    lens = [1200, 333]
    spec = SelectionSpec(top_n=50, sink_tokens=4, recent_window=40, renormalize=False, group_reduce="sum")
    seed = fresh_seed()
    q, kc, vh, vhot, bt, sl, slots, cpu = _cuda_inputs(2, 2, 3, 64, lens, 16, spec, torch.float16, seed)
    out = kcache_decode(q, kc, vh, vhot, bt, sl, slots, lens, cpu[5], spec, 0.125, max_seq_len=2048)
    ref = kcache_decode_reference(cpu[0], cpu[1], cpu[2], cpu[3], cpu[4], lens, cpu[5], spec, 0.125)
    assert out.is_cuda and relative_error(out.cpu(), ref) < TOL[torch.float16], seed


@cuda
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_fp8_host_values_triton_matches_reference(case):
    """fp8 host values on the GPU: float8 V rows from pinned host memory (directly and through a
    row cache of float8 rows), each pick multiplied by its device scale; against the torch reference."""
    from kcache_dist.kcache.fp8_keys import quantize_rows
    from kcache_dist.kcache.row_cache import FarRowCache
    from kcache_dist.kcache.triton_kcache import kcache_decode_triton

    batch, hkv, group, head_dim, lens, bs, spec, dtype = case
    seed = fresh_seed()
    q, k_pool, v_pool, v_hot, tables, slots, _, _ = paged_inputs(batch, hkv, group, head_dim, lens, bs, spec, dtype,
                                                                  seed=seed)
    v_fp8, v_scales = quantize_rows(v_pool)
    scale = head_dim ** -0.5
    ref = kcache_decode_reference(q, k_pool, v_fp8, v_hot, tables, lens, slots, spec, scale, v_scales=v_scales)
    dev = torch.device("cuda")
    args = (q.to(dev), k_pool.to(dev), v_fp8.pin_memory(), v_hot.to(dev), tables.to(dev),
            torch.tensor(lens, device=dev), torch.tensor(slots, device=dev), spec, scale)
    cache = FarRowCache(1, max(slots) + 1, hkv, 2 * spec.top_n, max(lens), head_dim, torch.float8_e4m3fn, dev)
    for row_cache in (None, cache.layer(0), cache.layer(0)):
        out = torch.full_like(args[0], float("nan"))
        kcache_decode_triton(*args, out=out, row_cache=row_cache, v_scales=v_scales.to(dev))
        torch.cuda.synchronize()
        assert not out.isnan().any(), f"NaN in output (seed {seed})"
        err = relative_error(out.cpu(), ref)
        assert err < TOL[dtype], f"rel err {err:.2e} (seed {seed}, row cache {row_cache is not None})"


FP8_CASES = [c for c in CASES if c[6].renormalize]


@cuda
@pytest.mark.parametrize("case", FP8_CASES, ids=[_case_id(c) for c in FP8_CASES])
def test_fp8_scoring_triton_matches_reference(case):
    """fp8 scoring keys on the GPU: float8 K + scales picks, K | V rows from pinned host memory
    (directly and through a row cache), exact-K weights; against the torch reference on the host."""
    from kcache_dist.kcache.row_cache import FarRowCache
    from kcache_dist.kcache.triton_kcache import KPassConfig, kcache_decode_triton
    from test_kcache_reference import fp8_scoring_inputs

    batch, hkv, group, head_dim, lens, bs, spec, dtype = case
    seed = fresh_seed()
    inputs = paged_inputs(batch, hkv, group, head_dim, lens, bs, spec, dtype, seed=seed)
    q, _, _, v_hot, tables, slots = inputs[:6]
    k_fp8, k_scales, host_rows, k_hot = fp8_scoring_inputs(*inputs[:7], spec)
    scale = head_dim ** -0.5
    ref = kcache_decode_fp8_scoring_reference(q, k_fp8, k_scales, host_rows, k_hot, v_hot, tables, lens, slots, spec,
                                              scale)
    dev = torch.device("cuda")
    args = (q.to(dev), k_fp8.to(dev), host_rows.pin_memory(), v_hot.to(dev), tables.to(dev),
            torch.tensor(lens, device=dev), torch.tensor(slots, device=dev), spec, scale)
    cache = FarRowCache(1, max(slots) + 1, hkv, 2 * spec.top_n, max(lens), 2 * head_dim, dtype, dev)
    for row_cache in (None, cache.layer(0), cache.layer(0)):
        out = torch.full_like(args[0], float("nan"))
        kcache_decode_triton(*args, out=out, row_cache=row_cache, k_scales=k_scales.to(dev), k_hot=k_hot.to(dev))
        torch.cuda.synchronize()
        assert not out.isnan().any(), f"NaN in output (seed {seed})"
        err = relative_error(out.cpu(), ref)
        assert err < TOL[dtype], f"rel err {err:.2e} (seed {seed}, row cache {row_cache is not None})"
    # the K pass's dot in q's dtype instead of float16 (KPassConfig.fp8_dot): the same products, the same picks
    model_dot = kcache_decode_triton(*args, cfg=KPassConfig(fp8_dot="model"), k_scales=k_scales.to(dev),
                                     k_hot=k_hot.to(dev))
    assert relative_error(model_dot.cpu(), out.cpu()) < TOL[dtype], f"fp8_dot model (seed {seed})"


# tiny shapes for the kernels under TRITON_INTERPRET=1: (batch, hkv, group, head_dim, lens, block_size,
# spec, dtype, scratch_extra, bins, q scale)
INTERPRETER_CASES = [
    (2, 2, 2, 16, [70, 9], 4, SelectionSpec(5, 2, 6, True, "max"), torch.float32, 64, 8, 1.0),
    (3, 2, 3, 16, [130, 40, 33], 8, SelectionSpec(9, 0, 3, False, "sum"), torch.float16, 4, 4, 1.0),
    (2, 1, 4, 16, [100, 1], 16, SelectionSpec(3, 4, 0, True, "sum"), torch.float32, 64, 4, 1.0),
    (1, 2, 1, 32, [190], 16, SelectionSpec(20, 0, 0, False, "max"), torch.float32, 4, 8, 1e-4),
    (1, 2, 4, 16, [150], 8, SelectionSpec(6, 1, 2, True, "max"), torch.float32, 64, 8, 60.0),
]
INTERPRET_SCRIPT = textwrap.dedent("""
    import torch
    from test_kcache_reference import paged_inputs
    from test_kcache_triton import INTERPRETER_CASES, check_selection
    from kcache_dist.kcache.reference import kcache_decode_reference
    from kcache_dist.kcache.selection import SelectionSpec
    from kcache_dist.kcache.triton_kcache import KPassConfig, kcache_decode_triton, score_and_select
    from kcache_dist.kcache.row_cache import FarRowCache
    import os, sys, kcache_dist
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(kcache_dist.__file__)), "benchmarks"))
    from selection_check import TAILS, buffer_rows, replay, replay_saved
    import dataclasses
    seed = {seed}
    cases = INTERPRETER_CASES
    for mode in ("fused", "row"):
        for i, (b, hkv, g, d, lens, bs, spec, dt, extra, bins, qs) in enumerate(cases):
            q, kp, vp, vh, bt, slots, _, _ = paged_inputs(b, hkv, g, d, lens, bs, spec, dt, seed=seed + i)
            q = (q.double() * qs).to(dt)
            cfg = KPassConfig(split=32, block_n=16, sel_tile=16, key_tile=32, bins=bins, scratch_extra=extra,
                              select_mode=mode, select_warps=4)
            poisoned = torch.full((b * hkv * spec.top_n,), -7, dtype=torch.int32)
            sel = score_and_select(q, kp, bt, torch.tensor(lens), max(lens), spec, d ** -0.5, cfg, idx_out=poisoned)
            check_selection(sel, lens, hkv, spec, (mode, i))
            if mode == "row":  # the replay of benchmarks/selection_check.py reruns the selection exactly
                assert replay(sel, torch.tensor(lens), hkv, spec, cfg, b * hkv - 1) == dict(
                    whole_launch=False, sequence_alone=False, row_alone=False), (mode, i)
                r = b * hkv - 1  # the last sequence's last KV head, saved and selected alone
                saved = dict(row=r, seq_len=lens[-1], scores_buffer=buffer_rows(sel.scores, slice(r, r + 1))[0],
                             context=sel.scores.shape[2], split_max=sel.split_max[r], split_sum=sel.split_sum[r],
                             spec=dataclasses.asdict(spec), cfg=dataclasses.asdict(cfg))
                assert replay_saved(saved, "cpu") == dict.fromkeys(TAILS, False), (mode, i)
            if qs == 1.0:
                ref = kcache_decode_reference(q, kp, vp, vh, bt, lens, slots, spec, d ** -0.5)
                out = torch.full_like(q, float("nan"))
                kcache_decode_triton(q, kp, vp, vh, bt, torch.tensor(lens), torch.tensor(slots), spec, d ** -0.5,
                                     cfg=cfg, out=out)
                err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
                tol = 1e-5 if dt == torch.float32 else 4e-3
                assert not out.isnan().any() and err < tol, (mode, i, err)
                # through a far-row cache: the same output, the first call fetching every far row, the second none
                cache = FarRowCache(1, max(slots) + 1, hkv, 2 * spec.top_n, max(lens), d, vp.dtype, torch.device("cpu"))
                for rep in range(2):
                    cached = torch.full_like(q, float("nan"))
                    kcache_decode_triton(q, kp, vp, vh, bt, torch.tensor(lens), torch.tensor(slots), spec, d ** -0.5,
                                         cfg=cfg, out=cached, row_cache=cache.layer(0))
                    assert torch.equal(cached, out), (mode, i, rep)
                far = sum(min(spec.top_n, max(0, n - spec.sink_tokens - spec.recent_window)) for n in lens)
                assert int(cache.misses.sum()) == hkv * far, (mode, i, int(cache.misses.sum()))
        # ties (q = 0): the lowest far positions, through the scratch and past it
        spec = SelectionSpec(7, 3, 5, True, "max")
        q, kp, vp, vh, bt, slots, _, _ = paged_inputs(2, 2, 2, 16, [90, 50], 8, spec, seed=seed)
        for extra in (4, 64):
            cfg = KPassConfig(split=32, block_n=16, sel_tile=16, key_tile=32, bins=4, scratch_extra=extra,
                              select_mode=mode, select_warps=4)
            sel = score_and_select(q * 0, kp, bt, torch.tensor([90, 50]), 90, spec, 0.25, cfg)
            assert (sel.idx == torch.arange(3, 10, dtype=torch.int32)).all(), (mode, extra, sel.idx)
    print("interpreter ok")
""")


SPLIT_SELECT_SCRIPT = textwrap.dedent("""
    import torch
    from test_kcache_reference import paged_inputs
    from test_kcache_triton import INTERPRETER_CASES, check_selection
    from kcache_dist.kcache.triton_kcache import KPassConfig, score_and_select
    seed = {seed}
    cases = INTERPRETER_CASES
    tiles = dict(split=32, block_n=16, sel_tile=16, key_tile=32, select_warps=4)
    # (select_mode, late_rows, split_parts): every row split, in the default parts and in 3 (parts of
    # several tiles, some empty); the last 2 rows of the K pass split, the others fused; every row late
    for mode, late, parts in (("split", 0, 0), ("split", 0, 3), ("fused", 2, 2), ("fused", 100, 0)):
        for i, (b, hkv, g, d, lens, bs, spec, dt, extra, bins, qs) in enumerate(cases):
            q, kp, vp, vh, bt, slots, _, _ = paged_inputs(b, hkv, g, d, lens, bs, spec, dt, seed=seed + i)
            q = (q.double() * qs).to(dt)
            cfg = KPassConfig(**tiles, bins=bins, scratch_extra=extra, select_mode=mode, late_rows=late,
                              split_parts=parts)
            poisoned = torch.full((b * hkv * spec.top_n,), -7, dtype=torch.int32)
            sel = score_and_select(q, kp, bt, torch.tensor(lens), max(lens), spec, d ** -0.5, cfg, idx_out=poisoned)
            check_selection(sel, lens, hkv, spec, (mode, late, parts, i))
            row = score_and_select(q, kp, bt, torch.tensor(lens), max(lens), spec, d ** -0.5,
                                   KPassConfig(**tiles, bins=bins, scratch_extra=extra, select_mode="row", late_rows=0))
            assert torch.equal(sel.idx, row.idx), (mode, late, parts, i)
    print("interpreter ok")
""")


SPARSE_OUT_SCRIPT = textwrap.dedent("""
    import torch
    from test_kcache_reference import paged_inputs
    from kcache_dist.kcache.reference import kcache_decode_reference
    from kcache_dist.kcache.selection import SelectionSpec
    from kcache_dist.kcache.triton_kcache import (KPassConfig, gather_far_rows_zero_copy, score_and_select,
                                                  sparse_output)
    seed = {seed}
    for i, spec in enumerate([SelectionSpec(40, 2, 6, True, "max"), SelectionSpec(37, 0, 3, False, "sum")]):
        lens = [300, 90, 45]
        q, kp, vp, vh, bt, slots, _, _ = paged_inputs(3, 2, 2, 16, lens, 8, spec, torch.float32, seed=seed + i)
        ref = kcache_decode_reference(q, kp, vp, vh, bt, lens, slots, spec, 0.25)
        cfg = KPassConfig(split=32, block_n=16, sel_tile=16, key_tile=32, scratch_extra=64, select_warps=4)
        sel = score_and_select(q, kp, bt, torch.tensor(lens), max(lens), spec, 0.25, cfg)
        vfar = gather_far_rows_zero_copy(vp, bt, sel.idx)
        for parts in (1, 2, 3):  # 16 picks a step: parts of 16 or 32 picks, the last one short
            out = torch.full_like(q, float("nan"))
            sparse_output(sel, vfar, vh, torch.tensor(lens), torch.tensor(slots), spec, q.shape[1], out=out,
                          parts=parts, rows_per_step=16)
            err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
            assert not out.isnan().any() and err < 1e-5, (i, parts, err)
    print("interpreter ok")
""")


FP8_SCRIPT = textwrap.dedent("""
    import torch
    from test_kcache_reference import fp8_scoring_inputs, paged_inputs
    from kcache_dist.kcache.fp8_keys import quantize_rows
    from kcache_dist.kcache.reference import kcache_decode_fp8_scoring_reference
    from kcache_dist.kcache.row_cache import FarRowCache
    from kcache_dist.kcache.selection import SelectionSpec
    from kcache_dist.kcache.triton_kcache import KPassConfig, kcache_decode_triton
    seed = {seed}
    cases = [  # (batch, hkv, group, head_dim, lens, block_size, spec, dtype)
        (3, 2, 2, 16, [70, 9, 130], 8, SelectionSpec(5, 2, 6, True, "max"), torch.float32),
        (2, 2, 3, 32, [100, 41], 16, SelectionSpec(9, 0, 3, True, "sum"), torch.float16),
        (2, 1, 4, 16, [60, 1], 4, SelectionSpec(3, 4, 0, True, "max"), torch.float32),
    ]
    for i, (b, hkv, g, d, lens, bs, spec, dt) in enumerate(cases):
        inputs = paged_inputs(b, hkv, g, d, lens, bs, spec, dt, seed=seed + i)
        q, _, _, vh, bt, slots = inputs[:6]
        k8, ks, host_rows, kh = fp8_scoring_inputs(*inputs[:7], spec)
        ref = kcache_decode_fp8_scoring_reference(q, k8, ks, host_rows, kh, vh, bt, lens, slots, spec, d ** -0.5)
        tol = 1e-5 if dt == torch.float32 else 4e-3
        cfg = KPassConfig(split=32, block_n=16, sel_tile=16, key_tile=32, scratch_extra=64, select_warps=4)
        cache = FarRowCache(1, max(slots) + 1, hkv, 2 * spec.top_n, max(lens), 2 * d, dt, torch.device("cpu"))
        for row_cache in (None, cache.layer(0), cache.layer(0)):  # the second cached call hits every far row
            out = torch.full_like(q, float("nan"))
            kcache_decode_triton(q, k8, host_rows, vh, bt, torch.tensor(lens), torch.tensor(slots), spec, d ** -0.5,
                                 cfg=cfg, out=out, row_cache=row_cache, k_scales=ks, k_hot=kh)
            err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
            assert not out.isnan().any() and err < tol, (i, row_cache is not None, err)
    # float8 reverses two far keys (tests/test_kcache_reference.py): the kernels pick the float8 order
    spec = SelectionSpec(1, 0, 0, True, "max")
    keys = torch.zeros(1, 1, 16, 16)
    keys[0, 0, 3, :2] = torch.tensor([17.0, 448.0])
    keys[0, 0, 6, :2] = torch.tensor([16.6, 460.0])
    values = torch.arange(16.0)[None, None, :, None].expand(1, 1, 16, 16).contiguous()
    q = torch.zeros(1, 1, 16)
    q[0, 0, 0] = 1.0
    k8, ks = quantize_rows(keys)
    out = kcache_decode_triton(q, k8, torch.cat([keys, values], -1), torch.zeros(1, 1, 0, 16),
                               torch.zeros(1, 1, dtype=torch.int32), torch.tensor([10]), torch.tensor([0]), spec, 1.0,
                               k_scales=ks, k_hot=torch.zeros(1, 1, 0, 16))
    assert torch.equal(out, torch.full((1, 1, 16), 6.0)), out
    print("interpreter ok")
""")


FP8_VALUES_SCRIPT = textwrap.dedent("""
    import torch
    from test_kcache_reference import paged_inputs
    from kcache_dist.kcache.fp8_keys import quantize_rows
    from kcache_dist.kcache.reference import kcache_decode_reference
    from kcache_dist.kcache.row_cache import FarRowCache
    from kcache_dist.kcache.selection import SelectionSpec
    from kcache_dist.kcache.triton_kcache import KPassConfig, kcache_decode_triton
    seed = {seed}
    cases = [(3, 2, 2, 16, [70, 9, 130], 8, SelectionSpec(5, 2, 6, True, "max")),  # (b, hkv, g, d, lens, bs, spec)
             (2, 1, 4, 16, [60, 1], 4, SelectionSpec(3, 4, 0, False, "sum"))]
    for i, (b, hkv, g, d, lens, bs, spec) in enumerate(cases):
        q, kp, vp, vh, bt, slots, _, _ = paged_inputs(b, hkv, g, d, lens, bs, spec, torch.float32, seed=seed + i)
        v8, vs = quantize_rows(vp)
        ref = kcache_decode_reference(q, kp, v8, vh, bt, lens, slots, spec, d ** -0.5, v_scales=vs)
        cfg = KPassConfig(split=32, block_n=16, sel_tile=16, key_tile=32, scratch_extra=64, select_warps=4)
        cache = FarRowCache(1, max(slots) + 1, hkv, 2 * spec.top_n, max(lens), d, torch.float8_e4m3fn,
                            torch.device("cpu"))
        for row_cache in (None, cache.layer(0), cache.layer(0)):
            out = torch.full_like(q, float("nan"))
            kcache_decode_triton(q, kp, v8, vh, bt, torch.tensor(lens), torch.tensor(slots), spec, d ** -0.5,
                                 cfg=cfg, out=out, row_cache=row_cache, v_scales=vs)
            err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
            assert not out.isnan().any() and err < 1e-5, (i, row_cache is not None, err)
    print("interpreter ok")
""")


STRIDED_QUERY_SCRIPT = textwrap.dedent("""
    import torch
    from test_kcache_reference import paged_inputs
    from kcache_dist.kcache.reference import kcache_decode_reference
    from kcache_dist.kcache.selection import SelectionSpec
    from kcache_dist.kcache.triton_kcache import KPassConfig, kcache_decode_triton
    seed = {seed}
    spec, lens = SelectionSpec(5, 2, 6, True, "max"), [70, 40, 33]
    q, kp, vp, vh, bt, slots, _, _ = paged_inputs(3, 1, 2, 16, lens, 8, spec, torch.float32, seed=seed)
    ref = kcache_decode_reference(q, kp, vp, vh, bt, lens, slots, spec, 0.25)
    # as `KVHeadReplicas.whole_groups` gives it at TP=4 with 2 KV heads: 2 of 4 ranks' heads, rows 4 heads apart
    everyone = torch.randn(3, 4, 1, 16)
    everyone[:, 2:4] = q.view(3, 2, 1, 16)
    strided = everyone[:, 2:4].reshape(3, 2, 16)
    assert not strided.is_contiguous() and torch.equal(strided, q)
    for mode in ("fused", "row"):
        cfg = KPassConfig(split=32, block_n=16, sel_tile=16, key_tile=32, scratch_extra=64, select_warps=4,
                          select_mode=mode)
        out = kcache_decode_triton(strided, kp, vp, vh, bt, torch.tensor(lens), torch.tensor(slots), spec, 0.25,
                                   cfg=cfg)
        err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
        assert err < 1e-5, (mode, err)
    print("interpreter ok")
""")


RENORM_GAP_SCRIPT = textwrap.dedent("""
    import torch
    from test_kcache_reference import fp8_scoring_inputs, paged_inputs
    from kcache_dist.kcache.reference import kcache_decode_fp8_scoring_reference, kcache_decode_reference
    from kcache_dist.kcache.selection import SelectionSpec
    from kcache_dist.kcache.triton_kcache import (KPassConfig, gather_far_rows_zero_copy, kcache_decode_triton,
                                                  score_and_select, sparse_output)
    seed = {seed}
    cfg = KPassConfig(split=32, block_n=16, sel_tile=16, key_tile=32, scratch_extra=64, select_warps=4)
    # GQA max with top_n 1: the heads' favourites (positions 0 and 2) tie, position 0 is picked, and
    # head 1's weight on it is e^-gap of its softmax: past float32's range at 700 nats, past float16's
    # (p is rounded to V's dtype before p @ V) at 20. Renormalised, both heads give V of position 0.
    spec = SelectionSpec(1, 0, 0, True, "max")
    for dtype, gap in ((torch.float32, 700.0), (torch.float16, 20.0)):
        k_pool = torch.zeros(1, 1, 4, 16, dtype=dtype)
        k_pool[0, 0, 0, 0] = 1.0
        k_pool[0, 0, 2, 1] = 1.0
        v_pool = torch.arange(64.0).view(1, 1, 4, 16).to(dtype)
        q = torch.zeros(1, 2, 16, dtype=dtype)
        q[0, 0, 0] = 1.5 * gap
        q[0, 1, 1] = gap
        out = torch.full_like(q, float("nan"))
        kcache_decode_triton(q, k_pool, v_pool, torch.zeros(1, 1, 0, 16, dtype=dtype),
                             torch.zeros(1, 1, dtype=torch.int32), torch.tensor([3]), torch.tensor([0]), spec, 1.0,
                             cfg=cfg, out=out)
        assert torch.equal(out[0].float(), v_pool[0, 0, :1].float().expand(2, 16)), (dtype, out)
    # peaked random heads (q x 60: the group's picks lie hundreds of nats below some heads' lse), the
    # picks over 1, 2 and 3 programs whose partial sums are brought to a common maximum
    spec, lens = SelectionSpec(40, 2, 6, True, "max"), [300, 90, 45]
    q, kp, vp, vh, bt, slots, _, _ = paged_inputs(3, 2, 4, 16, lens, 8, spec, torch.float32, seed=seed)
    q = q * 60
    ref = kcache_decode_reference(q, kp, vp, vh, bt, lens, slots, spec, 0.25)
    sel = score_and_select(q, kp, bt, torch.tensor(lens), max(lens), spec, 0.25, cfg)
    vfar = gather_far_rows_zero_copy(vp, bt, sel.idx)
    for parts in (1, 2, 3):
        out = torch.full_like(q, float("nan"))
        sparse_output(sel, vfar, vh, torch.tensor(lens), torch.tensor(slots), spec, q.shape[1], out=out,
                      parts=parts, rows_per_step=16)
        err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
        assert not out.isnan().any() and err < 1e-5, (parts, err)
    # the same with fp8 scoring keys (weights from the exact K of each row), lens whose parts hold no picks
    lens = [300, 20, 1, 45]
    inputs = paged_inputs(4, 2, 3, 16, lens, 8, spec, torch.float32, seed=seed + 1)
    q = inputs[0] * 40
    k8, ks, host_rows, kh = fp8_scoring_inputs(q, *inputs[1:7], spec)
    ref = kcache_decode_fp8_scoring_reference(q, k8, ks, host_rows, kh, inputs[3], inputs[4], lens, inputs[5], spec,
                                              0.25)
    sel = score_and_select(q, k8, inputs[4], torch.tensor(lens), max(lens), spec, 0.25, cfg, k_scales=ks)
    kvfar = gather_far_rows_zero_copy(host_rows, inputs[4], sel.idx)
    for parts in (1, 2, 3):
        out = torch.full_like(q, float("nan"))
        sparse_output(sel, kvfar, inputs[3], torch.tensor(lens), torch.tensor(inputs[5]), spec, q.shape[1], out=out,
                      parts=parts, rows_per_step=16, q=q, k_hot=kh, scale=0.25)
        err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
        assert not out.isnan().any() and err < 1e-5, ("fp8 scoring keys", parts, err)
    print("interpreter ok")
""")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable")
def test_renormalised_output_where_the_picks_lie_far_below_a_heads_softmax_under_interpreter():
    """Renormalised, the output kernel weighs the hot rows and picks by a softmax over themselves
    (against their own largest score), so a head whose group's picks hold almost none of its mass
    still gets their weighted mean, in float32 and float16, whole and split over programs (some
    holding no picks), also with fp8 scoring keys' exact-K weights."""
    seed = fresh_seed()
    run_under_triton_interpreter(RENORM_GAP_SCRIPT.format(seed=seed), seed, timeout_s=180)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable")
def test_strided_query_under_interpreter():
    """A query that is a strided view (the gathered query group of a KV head replicated over ranks)
    gives the reference's output: the kernels read a contiguous copy."""
    seed = fresh_seed()
    run_under_triton_interpreter(STRIDED_QUERY_SCRIPT.format(seed=seed), seed, timeout_s=120)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable")
def test_fp8_host_values_kernels_under_interpreter():
    """float8 far rows (directly and through a row cache of float8 rows) times their scales give the
    fp8 host values reference's output."""
    seed = fresh_seed()
    run_under_triton_interpreter(FP8_VALUES_SCRIPT.format(seed=seed), seed, timeout_s=180)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable")
def test_fp8_scoring_keys_kernels_under_interpreter():
    """The K pass over float8 K times its scales, the K | V fetch (through a row cache too) and the
    output weighed by the exact K give the fp8 scoring reference's output."""
    seed = fresh_seed()
    run_under_triton_interpreter(FP8_SCRIPT.format(seed=seed), seed, timeout_s=180)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable")
def test_selection_split_over_several_ctas_under_interpreter():
    """The selection of a row split over several CTAs after the K pass (every row, or the last rows
    of the K pass to finish while the others select inside it) picks the positions of the one-CTA
    selection: through the candidates, a scratch too small for them, and peaked and near-uniform rows."""
    seed = fresh_seed()
    run_under_triton_interpreter(SPLIT_SELECT_SCRIPT.format(seed=seed), seed, timeout_s=180)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable")
def test_output_split_over_several_ctas_under_interpreter():
    """`sparse_output` with each row's picks split over 1, 2 or 3 programs (the second kernel adding
    their sums, renormalised or not) gives the reference's output."""
    seed = fresh_seed()
    run_under_triton_interpreter(SPARSE_OUT_SCRIPT.format(seed=seed), seed, timeout_s=120)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable")
def test_triton_kernels_under_interpreter_on_cpu():
    seed = fresh_seed()
    run_under_triton_interpreter(INTERPRET_SCRIPT.format(seed=seed), seed, timeout_s=300)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable")
def test_sparse_output_refuses_mismatched_fp8_arguments():
    """The output kernel's fp8 host values need each pick's scale and the block table to find it;
    fp8 host values and fp8 scoring keys do not combine. Refused before any launch."""
    from kcache_dist.kcache.triton_kcache import SelectResult, sparse_output

    spec = SelectionSpec(4, 2, 4, True, "max")
    sel = SelectResult(torch.zeros(2, 2, 16), torch.zeros(2, 2), torch.zeros(2, 4, dtype=torch.int32))
    args = (sel, torch.zeros(2, 4, 16), torch.zeros(1, 2, 6, 16), torch.tensor([16]), torch.tensor([0]), spec, 4)
    scales, tables = torch.ones(4, 2, 4), torch.zeros(1, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"^sparse_output needs v_scales and block_tables together"):
        sparse_output(*args, v_scales=scales)
    with pytest.raises(ValueError, match=r"^sparse_output takes v_scales \(fp8 host values\) or k_hot"):
        sparse_output(*args, q=torch.zeros(1, 4, 16), k_hot=torch.zeros(1, 2, 6, 16), v_scales=scales,
                      block_tables=tables)

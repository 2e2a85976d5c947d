"""kcache/row_cache.py: the far-row cache returns exactly the rows a fetch of every pick returns,
asks the gather for the misses only, counts the misses of the least-recently-picked simulation of
benchmarks/selection_reuse.py (exactly where no ties are broken, else within 2%), and forgets a
slot on reset."""

from __future__ import annotations

import dataclasses
import os
import sys

import textwrap

import numpy as np
import pytest
import torch

from helpers import HAS_TRITON, fresh_seed, run_under_triton_interpreter

from kcache_dist.kcache.row_cache import FarRowCache

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from selection_reuse import cache_hits  # noqa: E402

L, H, D, N = 300, 2, 4, 16


def host_rows(pool: torch.Tensor, slots: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """pool [slots, H, L, D] standing in for host memory -> rows of idx [B, H, n] (NaN where -1)."""
    safe = idx.clamp(min=0)
    rows = pool[slots[:, None, None], torch.arange(idx.shape[1])[None, :, None], safe]
    return torch.where((idx >= 0)[..., None], rows, float("nan"))


def random_picks(step: int, generator: torch.Generator) -> torch.Tensor:
    """[2, H, N] distinct positions per row from a window that slides, the second row padded."""
    idx = torch.stack([torch.stack([torch.randperm(40 + step, generator=generator)[:N] + 10 * b for _ in range(H)])
                       for b in range(2)])
    idx[1, :, -3:] = -1
    return idx


@pytest.mark.parametrize("capacity", [N, 24, L])
def test_rows_equal_a_full_fetch_and_misses_match_the_simulation(capacity):
    g = torch.Generator().manual_seed(capacity)
    pool = torch.randn(3, H, L, D, generator=g)
    cache = FarRowCache(1, 3, H, capacity, L, D, torch.float32, torch.device("cpu"))
    slots = torch.tensor([2, 0])
    picks = {(b, h): [] for b in range(2) for h in range(H)}
    gathered = 0
    for step in range(30):
        idx = random_picks(step, g)

        def gather(miss_idx):
            nonlocal gathered
            assert ((miss_idx == -1) | (miss_idx == idx)).all()  # misses only, in place
            gathered += int((miss_idx >= 0).sum())
            return host_rows(pool, slots, miss_idx)

        rows = cache.fetch(0, slots, idx, gather)
        assert torch.equal(rows, torch.nan_to_num(host_rows(pool, slots, idx), nan=0.0)), step
        for (b, h), seen in picks.items():
            seen.append(np.sort(idx[b, h][idx[b, h] >= 0].numpy()))
    assert int(cache.misses.sum()) == gathered
    simulated = 0
    for seen in picks.values():
        hits, total = cache_hits(seen, capacity, L)
        simulated += len(seen[0]) + total - hits
    if capacity == L:  # it holds everything: no ties to break differently
        assert gathered == simulated
    else:
        assert abs(gathered - simulated) <= 0.02 * simulated


def test_reset_forgets_a_slot_and_only_that_slot():
    pool = torch.randn(3, H, L, D)
    cache = FarRowCache(2, 3, H, 2 * N, L, D, torch.float32, torch.device("cpu"))
    idx = torch.arange(2 * H * N).view(2, H, N) % 50
    slots = torch.tensor([0, 1])
    cache.fetch(1, slots, idx, lambda i: host_rows(pool, slots, i))
    assert int(cache.misses.sum()) == 2 * H * N
    cache.fetch(1, slots, idx, lambda i: host_rows(pool, slots, i))
    assert int(cache.misses.sum()) == 2 * H * N  # all held
    cache.reset([0])
    cache.fetch(1, slots, idx, lambda i: host_rows(pool, slots, i))
    assert int(cache.misses.sum()) == 3 * H * N  # slot 0 fetched again, slot 1 still held


@pytest.mark.parametrize("share", [0.0, 0.25, 1.0])
def test_forget_random_turns_that_share_of_repeated_picks_into_misses(share):
    g = torch.Generator().manual_seed(7)
    pool = torch.randn(2, H, L, D, generator=g)
    cache = FarRowCache(2, 2, H, 64, L, D, torch.float32, torch.device("cpu"))
    slots = torch.tensor([0, 1])
    idx = torch.stack([torch.stack([torch.randperm(L, generator=g)[:64] for _ in range(H)]) for _ in range(2)])
    for sparse in range(2):
        cache.fetch(sparse, slots, idx, lambda i: host_rows(pool, slots, i))
    before = int(cache.misses.sum())
    cache.forget_random(share, generator=torch.Generator().manual_seed(1))
    for sparse in range(2):
        rows = cache.fetch(sparse, slots, idx, lambda i: host_rows(pool, slots, i))
        assert torch.equal(rows, host_rows(pool, slots, idx))
    missed, picks = int(cache.misses.sum()) - before, 2 * idx.numel()
    assert abs(missed / picks - share) <= 0.05, (missed, picks)
    with pytest.raises(ValueError, match=r"share must be in \[0, 1\], got 1.5"):
        cache.forget_random(1.5)


def test_more_picks_than_capacity_is_an_error():
    cache = FarRowCache(1, 1, H, 8, L, D, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="9 picks per row exceed the row cache's capacity 8"):
        cache.fetch(0, torch.tensor([0]), torch.zeros(1, H, 9, dtype=torch.long), lambda i: None)


def test_allocation_matches_the_planners_bytes():
    from kcache_dist.cache.planner import far_row_cache_slot_bytes

    for dtype, capacity in ((torch.float16, 24), (torch.float32, 2 ** 15)):
        cache = FarRowCache(3, 5, H, capacity, L, D, dtype, torch.device("cpu"))
        allocated = sum(t.nbytes for group in (cache.rows, cache.positions, cache.last_used, cache.slot_of)
                        for t in group) + cache.clock.nbytes + cache.misses.nbytes
        assert allocated == 5 * far_row_cache_slot_bytes(3, H, capacity, L, D, dtype.itemsize)


def test_engine_with_a_row_cache_gives_the_same_tokens_and_fetches_fewer_rows(tiny_llama_dir):
    """Two slots for more requests than that (slots are reused, so a slot's rows must be forgotten),
    one of them a 1-token prompt (its first step is a decode step); the rows come from the cache
    or the host pool, so the tokens are exactly those without a cache."""
    from conftest import PROMPTS
    from helpers import token_ids
    from kcache_dist import LLM, KCacheConfig, SamplingParams

    small = KCacheConfig(mode="kcache", top_n=4, dense_layers=1, sink_tokens=2, recent_window=4)
    prompts = [*PROMPTS, [7]]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    runs = {}
    for factor in (0, 2):
        llm = LLM(device="cpu", model=tiny_llama_dir, max_num_seqs=2,
                  kcache=dataclasses.replace(small, row_cache_factor=factor))
        runs[factor] = (token_ids(llm.generate(prompts, params)), llm.engine.runner.kv_cache.v_rows_fetched)
        assert (llm.engine.runner.kv_cache.row_cache is None) == (factor == 0)
    (plain, plain_rows), (cached, cached_rows) = runs[0], runs[2]
    assert cached == plain
    assert 0 < cached_rows < plain_rows


def test_row_cache_survives_chunked_prefill_and_preemption(tiny_llama_dir):
    from conftest import PROMPTS
    from helpers import token_ids
    from kcache_dist import LLM, KCacheConfig, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    knobs = dict(mode="kcache", top_n=8, dense_layers=1, sink_tokens=2, recent_window=8)
    tight = dict(device="cpu", model=tiny_llama_dir, block_size=8, num_kv_blocks=14, max_model_len=112,
                 max_num_batched_tokens=7)
    runs = []
    for factor in (0, 1.5):
        llm = LLM(kcache=KCacheConfig(**knobs, row_cache_factor=factor), **tight)
        runs.append(token_ids(llm.generate(PROMPTS, params)))
        assert llm.engine.scheduler.num_preemptions > 0
    assert runs[1] == runs[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("enforce_eager", [True, False])
def test_cuda_engine_with_a_row_cache_gives_the_same_tokens(tiny_llama_dir, enforce_eager):
    """The Triton path and, with enforce_eager=False, CUDA-graph steps (the cache's updates are
    captured; a graph's warm-up run fetches too): tokens equal to the run without a cache."""
    from conftest import PROMPTS
    from helpers import token_ids
    from kcache_dist import LLM, KCacheConfig, SamplingParams

    knobs = dict(mode="kcache", top_n=16, dense_layers=1, sink_tokens=2, recent_window=8)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (300, 40, 120, 200, 9)]
    prompts = [PROMPTS[i % len(PROMPTS)] * (1 + i) for i in range(len(params))]
    runs = {}
    for factor in (0, 2):
        llm = LLM(device="cuda", dtype="float32", model=tiny_llama_dir, max_model_len=512, max_num_seqs=4,
                  enforce_eager=enforce_eager, kcache=KCacheConfig(**knobs, row_cache_factor=factor))
        runs[factor] = (token_ids(llm.generate(prompts, params)), llm.engine.runner.kv_cache.v_rows_fetched)
    assert runs[2][0] == runs[0][0]
    assert 0 < runs[2][1] < runs[0][1]


# the Triton bookkeeping (`row_cache_triton.assign_rows`) against the torch reference
# (`FarRowCache.assign`): the same slots, misses and cache state, step after step
ASSIGN_SCRIPT = textwrap.dedent("""
    import torch
    from kcache_dist.kcache.row_cache import FarRowCache
    from kcache_dist.kcache.row_cache_triton import assign_rows

    def check(L, H, n, capacity, slots, steps, spread, device, seed):
        g = torch.Generator().manual_seed(seed)
        ref = FarRowCache(2, max(slots) + 2, H, capacity, L, 4, torch.float32, torch.device("cpu"))
        dut = FarRowCache(2, max(slots) + 2, H, capacity, L, 4, torch.float32, torch.device(device))
        slots = torch.tensor(slots)
        B = len(slots)
        for step in range(steps):
            lo = step * spread  # the picks drift, as a growing context's do
            idx = torch.stack([torch.stack([torch.randperm(3 * n, generator=g)[:n] + lo for _ in range(H)])
                               for _ in range(B)])
            idx[-1, :, n // 2:] = -1  # a short row
            idx[-1, -1] = -1  # and an empty one, as CUDA-graph padding
            for sparse in range(2):
                slot, miss = ref.assign(sparse, slots, idx)
                far_row, miss_idx = assign_rows(dut, sparse, slots.to(device), idx.view(-1, n).int().to(device))
                flat = (slots[:, None, None] * H + torch.arange(H)[None, :, None]) * (capacity + 1) + slot
                assert torch.equal(far_row.cpu().view(B, H, n).long(), torch.where(idx >= 0, flat, -1)), (step, sparse)
                assert torch.equal(miss_idx.cpu().view(B, H, n).long(), torch.where(miss, idx, -1)), (step, sparse)
                for name in ("positions", "last_used"):
                    a, b = getattr(ref, name)[sparse], getattr(dut, name)[sparse].cpu()
                    assert torch.equal(a[..., :capacity], b[..., :capacity]), (name, step, sparse)
                assert torch.equal(ref.slot_of[sparse][..., :L], dut.slot_of[sparse].cpu()[..., :L]), (step, sparse)
        assert torch.equal(ref.misses, dut.misses.cpu()) and torch.equal(ref.clock, dut.clock.cpu())
        assert 0 < int(ref.misses.sum()) < steps * 2 * B * H * n

    for i, (capacity, spread) in enumerate([(16, 1), (24, 3), (40, 0)]):
        check(L=120, H=2, n=16, capacity=capacity, slots=[3, 0, 1], steps=8, spread=spread, device="DEVICE",
              seed=SEED + i)
    print("interpreter ok")
""")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable")
def test_assign_kernel_equals_the_torch_reference_under_interpreter():
    seed = fresh_seed()
    script = ASSIGN_SCRIPT.replace("DEVICE", "cpu").replace("SEED", str(seed))
    run_under_triton_interpreter(script, seed, timeout_s=300)


@pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs a CUDA device and triton")
def test_assign_kernel_equals_the_torch_reference_on_cuda():
    """Real sizes (top_n 1024, 2x capacity, 8 KV heads, 8K positions) besides the tiny ones."""
    seed = fresh_seed()
    namespace = {}
    exec(ASSIGN_SCRIPT.replace("DEVICE", "cuda").replace("SEED", str(seed)).replace(
        'print("interpreter ok")', ""), namespace)
    namespace["check"](L=8192, H=8, n=1024, capacity=2048, slots=[5, 2, 9, 0], steps=6, spread=300, device="cuda",
                       seed=seed)

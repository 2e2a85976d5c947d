"""The engine on a CUDA device: full and KCache modes (fp8 scoring keys too, once the engine allows
them on CUDA), pinned host V pool. Skipped without CUDA."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import PROMPTS
from helpers import hf_greedy, token_ids
from kcache_dist import LLM, KCacheConfig, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GREEDY = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
COVERING = KCacheConfig(mode="kcache", top_n=64, dense_layers=1, sink_tokens=4, recent_window=32)


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_full_mode_on_cuda_matches_transformers(fixture, request):
    model_dir = request.getfixturevalue(fixture)
    llm = LLM(model=model_dir, dtype="float32", device="cuda")
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=32))
    assert token_ids(outputs) == hf_greedy(model_dir, PROMPTS, 32)


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir", "tiny_mistral_dir"])
def test_kcache_on_cuda_equals_full_mode(fixture, request):
    model_dir = request.getfixturevalue(fixture)
    full = token_ids(LLM(model=model_dir, dtype="float32", device="cuda").generate(PROMPTS, GREEDY))
    for kcache in (COVERING, dataclasses.replace(COVERING, row_cache_factor=0)):  # the far-row cache by default
        llm = LLM(model=model_dir, dtype="float32", device="cuda", kcache=kcache)
        cache = llm.engine.runner.kv_cache
        assert cache.host_pool.pinned and cache.host_rows[0].is_pinned() and not cache.host_rows[0].is_cuda
        assert (cache.row_cache is None) == (kcache.row_cache_factor == 0)
        assert token_ids(llm.generate(PROMPTS, GREEDY)) == full
        assert cache.v_rows_fetched > 0


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_fp8_scoring_keys_on_cuda_equal_full_mode(fixture, request):
    """A covering budget with fp8 scoring keys: float8 K in device memory, K | V rows in the pinned
    pool, with and without the far-row cache, chunked prefill reading the exact K back."""
    model_dir = request.getfixturevalue(fixture)
    full = token_ids(LLM(model=model_dir, dtype="float32", device="cuda").generate(PROMPTS, GREEDY))
    fp8 = dataclasses.replace(COVERING, scoring_keys="fp8")
    for kcache, extra in ((fp8, {}), (dataclasses.replace(fp8, row_cache_factor=0), {}),
                          (fp8, dict(block_size=8, num_kv_blocks=14, max_model_len=112, max_num_batched_tokens=7))):
        llm = LLM(model=model_dir, dtype="float32", device="cuda", kcache=kcache, **extra)
        cache = llm.engine.runner.kv_cache
        assert cache.k_caches[-1].dtype == torch.float8_e4m3fn and cache.host_rows[0].shape[-1] == 2 * cache.head_dim
        assert token_ids(llm.generate(PROMPTS, GREEDY)) == full, (kcache, extra)
        assert cache.v_rows_fetched > 0


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_fp8_host_values_on_cuda_equal_the_cpu_engine(fixture, request):
    """host_values="fp8" on CUDA (float8 V rows in the pinned pool, scales on the device, the Triton
    kernels) gives the greedy tokens of the CPU engine (the torch reference) with the same setting,
    float32, with and without the row cache, and through chunked prefill."""
    model_dir = request.getfixturevalue(fixture)
    fp8 = dataclasses.replace(COVERING, host_values="fp8")
    for kcache, extra in ((fp8, {}), (dataclasses.replace(fp8, row_cache_factor=0), {}),
                          (fp8, dict(block_size=8, num_kv_blocks=14, max_model_len=112, max_num_batched_tokens=7))):
        on_cpu = token_ids(LLM(model=model_dir, dtype="float32", device="cpu", kcache=kcache, **extra)
                           .generate(PROMPTS, GREEDY))
        llm = LLM(model=model_dir, dtype="float32", device="cuda", kcache=kcache, **extra)
        assert llm.engine.runner.kv_cache.host_rows[0].dtype == torch.float8_e4m3fn
        assert token_ids(llm.generate(PROMPTS, GREEDY)) == on_cpu, (kcache, extra)


def test_kcache_chunked_prefill_and_preemption_on_cuda(tiny_llama_dir):
    full = token_ids(LLM(model=tiny_llama_dir, dtype="float32", device="cuda").generate(PROMPTS, GREEDY))
    llm = LLM(model=tiny_llama_dir, dtype="float32", device="cuda", kcache=COVERING, block_size=8,
              num_kv_blocks=14, max_model_len=112, max_num_batched_tokens=7)
    assert token_ids(llm.generate(PROMPTS, GREEDY)) == full
    assert llm.engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_in_both_modes(tiny_llama_dir, dtype):
    small = KCacheConfig(mode="kcache", top_n=8, dense_layers=1, sink_tokens=2, recent_window=8)
    for kcache in (KCacheConfig(), small):
        outputs = LLM(model=tiny_llama_dir, dtype=dtype, device="cuda", kcache=kcache).generate(PROMPTS, GREEDY)
        assert all(len(o.outputs[0].token_ids) == 64 for o in outputs)


@pytest.mark.parametrize("pool_on", ["pinned host", "device"])
def test_store_rows_kernel_writes_the_right_slots_and_skips_negative_ones(pool_on):
    from kcache_dist.cache.store_rows import store_rows

    pool = torch.full((6, 3, 4, 16), float("nan"), dtype=torch.bfloat16)
    pool = pool.pin_memory() if pool_on == "pinned host" else pool.cuda()
    rows = torch.randn(6, 3, 16, dtype=torch.bfloat16, device="cuda")
    slots = torch.tensor([0, 5, -1, 23, 9, 14], device="cuda")  # -1: a padding row, written nowhere
    store_rows(pool, rows, slots)
    torch.cuda.synchronize()
    keep = slots.cpu() >= 0
    expected = torch.full((6, 3, 4, 16), float("nan"), dtype=torch.bfloat16)
    expected[slots.cpu()[keep] // 4, :, slots.cpu()[keep] % 4] = rows.cpu()[keep]
    got = pool.cpu()
    assert torch.equal(got.isnan(), expected.isnan()) and torch.equal(got.nan_to_num(), expected.nan_to_num())


def test_pinning_failure_is_a_clear_error_before_generation(tiny_llama_dir, monkeypatch):
    import kcache_dist.cache.host_pool as host_pool

    monkeypatch.setattr(host_pool, "_register", lambda address, num_bytes: 2)  # as cudaErrorMemoryAllocation
    with pytest.raises(RuntimeError, match=r"^pinning 0.\d\d GiB of host memory for the V pool failed "
                                           r"\(cudaHostRegister error 2\); lower host_memory_gb"):
        LLM(model=tiny_llama_dir, device="cuda", kcache=COVERING)


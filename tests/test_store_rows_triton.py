"""The row-store kernel (`cache/store_rows.py`) under TRITON_INTERPRET=1 on CPU: each token's rows
land in their slots and negative slots write nothing. The CUDA test (`test_cuda_engine.py`) runs
it on a GPU into pinned and device pools."""

from __future__ import annotations

import textwrap

import pytest

from helpers import HAS_TRITON, fresh_seed, run_under_triton_interpreter

SCRIPT = textwrap.dedent("""
    import torch
    from kcache_dist.cache.store_rows import _store_rows_kernel
    g = torch.Generator().manual_seed({seed})
    rows = torch.randn(6, 3, 16, generator=g)
    slots = torch.tensor([0, 5, -1, 23, 9, 14])
    keep = slots >= 0
    expected = torch.full((6, 3, 4, 16), float("nan"))
    expected[slots[keep] // 4, :, slots[keep] % 4] = rows[keep]
    pool = torch.full((6, 3, 4, 16), float("nan"))
    _store_rows_kernel[(6, 3)](rows, pool, slots, 3, 4, HEAD_DIM=16, BLOCK_D=16)
    assert torch.equal(pool.isnan(), expected.isnan())
    assert torch.equal(pool.nan_to_num(), expected.nan_to_num())
    print("interpreter ok")
""")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable")
def test_store_rows_kernel_under_interpreter():
    seed = fresh_seed()
    run_under_triton_interpreter(SCRIPT.format(seed=seed), seed, timeout_s=120)

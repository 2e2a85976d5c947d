"""Triton dense paged decode (kcache_dist/layers/triton_paged_decode.py) against the torch
reference `paged_attention.decode_attention`.

Fresh random inputs on every run (the seed is printed and in the failure message); outputs are
NaN-poisoned first (the kernel allocates its output, so a NaN pool slot past a sequence's end
checks that nothing outside the context is read). GPU tests skip without CUDA; the CPU test runs
the kernels under TRITON_INTERPRET=1 in a subprocess on tiny shapes.
"""

from __future__ import annotations

import textwrap

import pytest
import torch

from kcache_dist.layers.paged_attention import decode_attention, paged_decode
from helpers import HAS_TRITON, KERNEL_TOLERANCE as TOL, cuda_and_triton as cuda, fresh_seed, relative_error, \
    run_under_triton_interpreter


def paged_pools(batch, hkv, group, head_dim, lens, block_size, dtype, seed):
    """Shuffled paged K/V pools whose unused slots hold NaN, block tables padded with block 0."""
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-n // block_size) for n in lens)
    num_blocks = batch * max_blocks + 2
    k_pool = torch.randn(num_blocks, hkv, block_size, head_dim, generator=g).to(dtype)
    v_pool = torch.randn(num_blocks, hkv, block_size, head_dim, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.zeros(batch, max_blocks, dtype=torch.int32)
    used = 0
    for b, n in enumerate(lens):
        nb = -(-n // block_size)
        tables[b, :nb] = perm[used:used + nb].int()
        used += nb
        last = int(tables[b, nb - 1])
        k_pool[last, :, n - (nb - 1) * block_size:] = float("nan")  # past the end: never read
        v_pool[last, :, n - (nb - 1) * block_size:] = float("nan")
    q = torch.randn(batch, hkv * group, head_dim, generator=g).to(dtype) * 2
    return q, k_pool, v_pool, tables, torch.tensor(lens)


CASES = [  # (batch, hkv, group, head_dim, lens, block_size, dtype)
    (3, 2, 4, 128, [700, 1, 1500], 16, torch.bfloat16),
    (2, 2, 1, 64, [3000, 257], 256, torch.float16),
    (4, 3, 3, 128, [513, 1024, 20, 2049], 16, torch.float16),
    (2, 8, 4, 128, [8192, 7000], 256, torch.bfloat16),
    (5, 2, 4, 64, [40, 1025, 1023, 300, 64], 16, torch.float32),
]


@cuda
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-G{c[2]}-D{c[3]}-bs{c[5]}-{str(c[6])[6:]}")
def test_triton_paged_decode_matches_reference(case):
    from kcache_dist.layers.triton_paged_decode import paged_decode_attention_triton

    batch, hkv, group, head_dim, lens, bs, dtype = case
    seed = fresh_seed()
    q, kp, vp, bt, sl = paged_pools(batch, hkv, group, head_dim, lens, bs, dtype, seed)
    ref = decode_attention(q.double(), kp.double(), vp.double(), bt, sl, head_dim ** -0.5)
    dev = torch.device("cuda")
    out = paged_decode_attention_triton(q.to(dev), kp.to(dev), vp.to(dev), bt.to(dev), sl.to(dev), head_dim ** -0.5)
    assert out.dtype == dtype and not out.isnan().any(), seed
    assert relative_error(out.cpu(), ref) < TOL[dtype], (seed, relative_error(out.cpu(), ref))


@cuda
def test_paged_decode_dispatches_to_triton_on_cuda(monkeypatch):
    import kcache_dist.layers.triton_paged_decode as kernels

    calls = []
    real = kernels.paged_decode_attention_triton
    monkeypatch.setattr(kernels, "paged_decode_attention_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    seed = fresh_seed()
    q, kp, vp, bt, sl = paged_pools(2, 2, 4, 64, [300, 77], 16, torch.float16, seed)
    ref = decode_attention(q.double(), kp.double(), vp.double(), bt, sl, 0.125)
    dev = torch.device("cuda")
    out = paged_decode(q.to(dev), kp.to(dev), vp.to(dev), bt.to(dev), sl.to(dev), 0.125)
    assert calls == [1] and out.is_cuda and relative_error(out.cpu(), ref) < TOL[torch.float16], seed


INTERPRET_SCRIPT = textwrap.dedent("""
    import torch
    from test_paged_decode_triton import paged_pools
    from kcache_dist.layers.paged_attention import decode_attention, paged_decode
    from kcache_dist.layers.triton_paged_decode import paged_decode_attention_triton
    seed = {seed}
    cases = [(2, 2, 2, 16, [70, 1], 4, torch.float32), (3, 2, 3, 16, [70, 40, 33], 8, torch.float16),
             (1, 1, 4, 32, [100], 16, torch.float32)]
    for i, (b, hkv, g, d, lens, bs, dt) in enumerate(cases):
        q, kp, vp, bt, sl = paged_pools(b, hkv, g, d, lens, bs, dt, seed + i)
        ref = decode_attention(q.double(), kp.double(), vp.double(), bt, sl, d ** -0.5)
        out = paged_decode_attention_triton(q, kp, vp, bt, sl, d ** -0.5, split_tokens=32)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert not out.isnan().any() and err < (1e-5 if dt == torch.float32 else 4e-3), (i, err)
    print("interpreter ok")
""")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable")
def test_triton_paged_decode_under_interpreter_on_cpu():
    seed = fresh_seed()
    run_under_triton_interpreter(INTERPRET_SCRIPT.format(seed=seed), seed, timeout_s=120)

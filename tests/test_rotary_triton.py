"""The one-kernel rotary embedding (kcache_dist/layers/triton_rotary.py) against the torch
reference `RotaryEmbedding.rotate_reference`, bit for bit, on fresh random q and k taken as views
of one qkv row as the attention layer takes them (the seed is printed and in failure messages).
GPU tests skip without CUDA; the CPU test runs the kernel under TRITON_INTERPRET=1 in a subprocess.
"""

from __future__ import annotations

import textwrap

import pytest
import torch

from kcache_dist.layers.rotary import RotaryEmbedding
from kcache_dist.models.model_config import RopeConfig
from helpers import HAS_TRITON, cuda_and_triton as cuda, fresh_seed, run_under_triton_interpreter


def qkv_views(tokens: int, hq: int, hkv: int, head_dim: int, dtype: torch.dtype, seed: int, device: str):
    """q [T, hq * head_dim] and k [T, hkv * head_dim]: views of a [T, (hq + 2 hkv) * head_dim] tensor;
    positions [T] int64, random below 4096."""
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(tokens, (hq + 2 * hkv) * head_dim, generator=g) * 2).to(dtype).to(device)
    q, k, _ = qkv.split([hq * head_dim, hkv * head_dim, hkv * head_dim], dim=-1)
    return torch.randint(0, 4096, (tokens,), generator=g).to(device), q, k


def llama3_rope() -> RopeConfig:
    return RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192)


def check_equal(rotary: RotaryEmbedding, positions, q, k, seed: int) -> None:
    from kcache_dist.layers.triton_rotary import rotary_triton

    q_out, k_out = rotary_triton(positions, q, k, rotary.cos, rotary.sin, rotary.head_dim)
    q_ref, k_ref = rotary.rotate_reference(positions, q, k)
    for name, out, ref in (("q", q_out, q_ref), ("k", k_out, k_ref)):
        assert out.shape == ref.shape and out.is_contiguous(), f"seed {seed}: {name} {tuple(out.shape)}"
        differ = (out != ref).sum().item()
        assert differ == 0, f"seed {seed}: {differ} of {ref.numel()} {name} elements differ from the reference"


CASES = [  # (tokens, q heads, kv heads, head_dim)
    (1, 32, 8, 128), (72, 32, 8, 128), (600, 9, 3, 64), (5, 4, 4, 80), (3, 16, 2, 128)]


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}-H{c[1]}-{c[2]}-D{c[3]}")
def test_triton_rotary_equals_reference(case, dtype):
    tokens, hq, hkv, head_dim = case
    seed = fresh_seed()
    rotary = RotaryEmbedding(head_dim, 4096, llama3_rope()).cuda()
    positions, q, k = qkv_views(tokens, hq, hkv, head_dim, dtype, seed, "cuda")
    check_equal(rotary, positions, q, k, seed)
    assert all(torch.equal(a, b) for a, b in zip(rotary(positions, q, k), rotary.rotate_reference(positions, q, k)))


def test_bad_input_is_refused_before_any_launch():
    from kcache_dist.layers.triton_rotary import rotary_triton

    cos = torch.zeros(8, 2)
    with pytest.raises(ValueError) as err:
        rotary_triton(torch.zeros(2, dtype=torch.long), torch.zeros(2, 8), torch.zeros(2, 4, dtype=torch.float16),
                      cos, cos, 4)
    assert str(err.value) == ("rotary_triton needs q and k of one dtype with unit stride in the last dim and an even "
                              "head_dim; got q torch.float32 stride (8, 1), k torch.float16 stride (4, 1), head_dim 4")


INTERPRET_SCRIPT = textwrap.dedent("""
    import torch
    from kcache_dist.layers.rotary import RotaryEmbedding
    from test_rotary_triton import check_equal, llama3_rope, qkv_views
    for tokens, hq, hkv, head_dim, dtype in [(3, 4, 2, 16, torch.float32), (2, 3, 1, 12, torch.float16)]:
        rotary = RotaryEmbedding(head_dim, 4096, llama3_rope())
        positions, q, k = qkv_views(tokens, hq, hkv, head_dim, dtype, {seed}, "cpu")
        check_equal(rotary, positions, q, k, {seed})
    print("interpreter ok")
""")


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_triton_rotary_under_interpreter():
    seed = fresh_seed()
    run_under_triton_interpreter(INTERPRET_SCRIPT.format(seed=seed), seed, timeout_s=120)

"""Dense attention over a paged K/V cache: the pure-torch reference used by full-KV mode.

Cache layout (one layer): [num_blocks, num_kv_heads, block_size, head_dim], so that the rows of
one (sequence, KV head) within a block are contiguous.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from ..triton_kernels import kernel_module


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """cache [NB, H, bs, D], block_table [>= ceil(length / bs)] -> one sequence's [H, length, D]."""
    block_size = cache.shape[2]
    blocks = cache[block_table[: -(-length // block_size)].long()]  # [nb, H, bs, D]
    return blocks.transpose(0, 1).flatten(1, 2)[:, :length]


def write_to_cache(cache: torch.Tensor, x: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store x [T, H, D] at cache slots slot_mapping [T] (block_id * block_size + offset)."""
    block_size = cache.shape[2]
    cache[slot_mapping // block_size, :, slot_mapping % block_size] = x


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of the last n positions of one sequence over its whole context.

    q [n, Hq, D]; k, v [Hkv, L, D] with L >= n (the queries are positions L - n .. L - 1).
    Returns [n, Hq, D]. The causal mask is aligned to the bottom right (query i sees keys up to
    L - n + i) without being materialised, so SDPA can take its flash / memory-efficient kernels
    (memory O(n + L), not O(n x L)); K and V are expanded to the query heads for the same reason.
    """
    n, length = q.shape[0], k.shape[1]
    group = q.shape[1] // k.shape[0]
    if group > 1:
        k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    q4, k4, v4 = q.transpose(0, 1).unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)  # 4-D: the fused kernels need it
    if n == length:
        out = F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=scale)
    else:
        out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=causal_lower_right(n, length), scale=scale)
    return out[0].transpose(0, 1)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One new token per sequence attending to its whole context.

    q [B, Hq, D]; caches [NB, Hkv, bs, D]; block_tables [B, max_blocks]; seq_lens [B].
    Returns [B, Hq, D].
    """
    blocks = block_tables.long()
    k = k_cache[blocks].transpose(1, 2).flatten(2, 3)  # [B, Hkv, max_blocks * bs, D]
    v = v_cache[blocks].transpose(1, 2).flatten(2, 3)
    valid = (torch.arange(k.shape[2], device=q.device)[None, :] < seq_lens[:, None])[:, None, :, None]
    # Slots past a sequence's end hold whatever the memory held (NaN included): zero them, since a
    # mask alone does not stop NaN * 0 from spreading.
    k, v = k.masked_fill(~valid, 0), v.masked_fill(~valid, 0)
    out = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=valid.transpose(-1, -2), scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return out.squeeze(2)


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """`decode_attention` on any device (same arguments): the Triton split-K kernel for CUDA
    tensors when Triton is importable, the torch reference above otherwise."""
    kernels = kernel_module("layers.triton_paged_decode") if q.is_cuda else None
    if kernels:
        return kernels.paged_decode_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, scale)
    return decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale)

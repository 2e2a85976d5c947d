"""Full-KV mode: K and V of every layer in paged device memory, dense attention."""

from __future__ import annotations

import torch

from ..forward_context import ForwardContext
from ..layers.paged_attention import gather_context, paged_decode, prefill_attention
from .store_rows import store_rows


class FullKVCache:
    """Per layer a K and a V pool of shape [num_blocks, num_kv_heads, block_size, head_dim]."""

    def __init__(self, num_layers: int, num_blocks: int, num_kv_heads: int, block_size: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_blocks, num_kv_heads, block_size, head_dim)
        self.k_caches = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_caches = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    def join_offload(self) -> None:
        """Nothing to join: full-KV mode writes no host memory (KCacheKVCache.join_offload)."""

    def copy_staged_rows(self, plan, block_of) -> None:
        """Nothing staged: full-KV mode writes no host memory (KCacheKVCache.copy_staged_rows)."""

    def count_decode_fetch(self, seq_lens: list[int]) -> None:
        """Nothing to count: full-KV mode reads no V from host memory."""

    def start_sequences(self, hot_slots: list[int]) -> None:
        """Nothing is kept per sequence beyond its blocks."""

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               ctx: ForwardContext) -> torch.Tensor:
        """Store the new k, v [T, Hkv, D]; return attention of q [T, Hq, D] over each context."""
        return dense_attend(self.k_caches[layer_idx], self.v_caches[layer_idx], q, k, v, scale, ctx)


def dense_attend(k_cache: torch.Tensor, v_cache: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 scale: float, ctx: ForwardContext) -> torch.Tensor:
    """Write k, v [T, Hkv, D] into the paged caches, then dense attention of q [T, Hq, D]: the
    one-token sequences batched, the others one by one. Returns [T, Hq, D]."""
    store_rows(k_cache, k, ctx.slot_mapping)
    store_rows(v_cache, v, ctx.slot_mapping)
    out = torch.empty_like(q)
    nd = ctx.num_decodes
    if nd:
        out[:nd] = paged_decode(q[:nd], k_cache, v_cache, ctx.block_tables[:nd], ctx.seq_lens[:nd], scale)
    for i in range(nd, ctx.num_seqs):
        start, end = ctx.query_start_loc[i], ctx.query_start_loc[i + 1]
        length, table = ctx.seq_lens_list[i], ctx.block_tables[i]
        out[start:end] = prefill_attention(q[start:end], gather_context(k_cache, table, length),
                                           gather_context(v_cache, table, length), scale)
    return out

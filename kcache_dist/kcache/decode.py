"""KCache decode attention behind one interface: Triton kernels on CUDA, the torch reference elsewhere."""

from __future__ import annotations

from typing import Optional

import torch

from ..triton_kernels import kernel_module
from .reference import kcache_decode_fp8_scoring_reference, kcache_decode_reference
from .row_cache import FarRowCacheLayer
from .selection import SelectionSpec


def triton_kernels():
    """The `triton_kcache` module, or None where Triton is not importable (the torch paths run then)."""
    return kernel_module("kcache.triton_kcache")


def far_rows_fetched(seq_lens: list[int], num_kv_heads: int, spec: SelectionSpec) -> int:
    """V rows a decode batch reads from host memory: min(top_n, far positions) per (sequence, KV head)."""
    return num_kv_heads * sum(min(spec.top_n, max(0, n - spec.sink_tokens - spec.recent_window)) for n in seq_lens)


def kcache_decode(q: torch.Tensor, k_cache: torch.Tensor, v_host: torch.Tensor, v_hot: torch.Tensor,
                  block_tables: torch.Tensor, seq_lens: torch.Tensor, hot_slots: torch.Tensor,
                  seq_lens_list: list[int], hot_slots_list: list[int], spec: SelectionSpec,
                  scale: float, max_seq_len: int,
                  row_cache: Optional[FarRowCacheLayer] = None, k_scales: Optional[torch.Tensor] = None,
                  k_hot: Optional[torch.Tensor] = None, v_scales: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One decode token per sequence.

    q [B, Hq, D] (device); k_cache [NB, Hkv, bs, D] (device); v_host [NB, Hkv, bs, D] (host memory,
    pinned when the device is CUDA); v_hot [num_slots, Hkv, sink + window, D] (device);
    block_tables [B, max_blocks] int32, seq_lens [B] int64, hot_slots [B] int64 (device) and the
    same lengths and slots as Python lists (read by the CPU reference only); max_seq_len >=
    max(seq_lens) sizes the CUDA path's scratch, so no host synchronisation is needed; row_cache: the
    layer's far-row cache (`row_cache.py`; sequence b in cache slot hot_slots[b]), None to fetch
    every far row.
    With fp8 scoring keys (`KCacheConfig.scoring_keys="fp8"`): k_cache is float8 with k_scales
    [NB, Hkv, bs] float32, v_host holds K | V rows [NB, Hkv, bs, 2D] and k_hot the hot rows' exact K
    (shaped as v_hot). With fp8 host values (`KCacheConfig.host_values="fp8"`): v_host (and a row
    cache's rows) float8 with v_scales [NB, Hkv, bs] float32 (device). Returns out [B, Hq, D]. On
    CUDA the host pool is read by kernels, in stream order.
    """
    kernels = triton_kernels() if q.is_cuda else None
    if kernels is not None:
        return kernels.kcache_decode_triton(q, k_cache, v_host, v_hot, block_tables, seq_lens, hot_slots, spec, scale,
                                            max_seq_len=max_seq_len, row_cache=row_cache,
                                            k_scales=k_scales, k_hot=k_hot, v_scales=v_scales)
    if k_scales is not None:
        return kcache_decode_fp8_scoring_reference(q, k_cache, k_scales, v_host, k_hot, v_hot, block_tables,
                                                   seq_lens_list, hot_slots_list, spec, scale, row_cache=row_cache)
    return kcache_decode_reference(q, k_cache, v_host, v_hot, block_tables, seq_lens_list, hot_slots_list, spec,
                                   scale, row_cache=row_cache, v_scales=v_scales)

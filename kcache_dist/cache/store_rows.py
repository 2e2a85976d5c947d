"""Writing new K/V rows into a paged pool, on the device or in pinned host memory.

On CUDA a Triton kernel stores the rows (into pinned host memory through unified addressing, or
into device memory), so a write is one asynchronous launch on whatever stream issues it, with no
host synchronisation: CUDA-graph decode steps capture it. A negative slot is skipped: the padding
rows of a captured batch write nothing. Elsewhere the write is plain indexing (`write_to_cache`).
"""

from __future__ import annotations

import torch

from ..layers.paged_attention import write_to_cache

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path below serves
    triton = None


if triton is not None:
    @triton.jit
    def _store_rows_kernel(src_ptr, dst_ptr, slot_ptr, num_kv_heads, block_size,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
        """Program (t, h): row h of token t -> pool[slot // bs, h, slot % bs]; nothing when slot < 0."""
        t = tl.program_id(0)
        h = tl.program_id(1)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        block = slot // block_size
        offset = slot % block_size
        cols = tl.arange(0, BLOCK_D)
        mask = (cols < HEAD_DIM) & (slot >= 0)
        row = tl.load(src_ptr + (t * num_kv_heads + h).to(tl.int64) * HEAD_DIM + cols, mask=mask)
        dst = ((block * num_kv_heads + h) * block_size + offset) * HEAD_DIM
        tl.store(dst_ptr + dst + cols, row, mask=mask)


def store_rows(pool: torch.Tensor, rows: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """pool [NB, Hkv, bs, D] (device memory, or host memory pinned when rows are on CUDA);
    rows [T, Hkv, D]; slot_mapping [T] (block_id * bs + offset; < 0: skip the row), on rows' device."""
    if rows.is_cuda and triton is not None:
        rows = rows.contiguous()
        num_tokens, num_kv_heads, head_dim = rows.shape
        if num_tokens:
            _store_rows_kernel[(num_tokens, num_kv_heads)](rows, pool, slot_mapping, num_kv_heads, pool.shape[2],
                                                           HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim))
        return
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        rows, slot_mapping = rows[keep], slot_mapping[keep]
    write_to_cache(pool, rows.to(pool.device), slot_mapping.to(pool.device))

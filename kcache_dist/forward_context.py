"""What one forward pass needs besides the token ids: positions, where new K/V go in the cache,
and each sequence's context. Built by the model runner from a step plan; read by attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch


@dataclass
class ForwardContext:
    """Sequences of the step, decodes first. T = new tokens of all sequences, B = sequences.

    positions [T] int64: position of each new token in its sequence.
    slot_mapping [T] int64: cache slot of each new token (block_id * block_size + offset).
    block_tables [B, max_blocks] int32: each sequence's cache blocks, padded with 0.
    seq_lens [B] int64 (on the model's device) and seq_lens_list: context length after this step.
    max_seq_len: at least max(seq_lens_list); kernels size their scratch and grids from it (a
    captured CUDA graph gets its bucket's bound, so one graph serves every length up to it).
    query_start_loc: B + 1 offsets of each sequence's new tokens in the T rows (Python ints).
    num_decodes: the first `num_decodes` sequences have exactly one new token.
    hot_slots [B] int64 (device) and hot_slots_list: each sequence's row of per-sequence buffers
    (KCache keeps its sink and recent-window V rows there).
    kv_cache: the cache object whose `attend(layer_idx, q, k, v, ctx)` runs attention.
    token_seqs [T] int64 (device): the sequence (0..B-1) of each new token, for work per token that
    must not wait on the host (set by the model runner's steps; None in the decode-only contexts of
    CUDA graphs and the teacher-forced emulation, which do not use it).
    block_tables_host [B, max_blocks] int32 (numpy): block_tables as the host has them (set by the
    model runner's steps), so that host-side work needs no copy back from the device (KCache's
    copies of a prefill chunk's earlier host rows); None: read from block_tables.
    """

    positions: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    seq_lens_list: list[int]
    max_seq_len: int
    query_start_loc: list[int]
    num_decodes: int
    hot_slots: torch.Tensor
    hot_slots_list: list[int]
    kv_cache: Any
    token_seqs: Optional[torch.Tensor] = None
    block_tables_host: Optional[np.ndarray] = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_list)

    @property
    def decode_only(self) -> bool:
        """Every sequence of the step has exactly one new token."""
        return self.num_decodes == self.num_seqs

"""Vocabulary-parallel token embedding and LM head: each rank holds a contiguous slice of the
vocabulary rows."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..parallel import tp_all_reduce, tp_gather_last_dim, tp_rank, tp_size
from .linear import read_slice


class VocabParallelEmbedding(nn.Module):
    """input_ids [T] -> embeddings [T, hidden]; rows of other ranks' vocabulary read as zero and
    the ranks' partial embeddings are summed."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype):
        super().__init__()
        self.vocab_size = vocab_size
        self.rows_per_rank = -(-vocab_size // tp_size())
        self.vocab_start = tp_rank() * self.rows_per_rank
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, hidden_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        checkpoint_rows = loaded.shape[0] if isinstance(loaded, torch.Tensor) else loaded.get_shape()[0]
        if checkpoint_rows != self.vocab_size:
            raise ValueError(f"{type(self).__name__}: checkpoint has {checkpoint_rows} vocabulary rows, the model "
                             f"config says vocab_size={self.vocab_size}")
        rows = max(0, min(self.rows_per_rank, self.vocab_size - self.vocab_start))
        param.data[:rows].copy_(read_slice(loaded, 0, self.vocab_start, rows))
        param.data[rows:].zero_()  # padding rows of the last rank's slice

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if tp_size() == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.rows_per_rank)
        y = F.embedding(local.masked_fill(outside, 0), self.weight)
        return tp_all_reduce(y.masked_fill(outside.unsqueeze(-1), 0))


class ParallelLMHead(VocabParallelEmbedding):
    """hidden [S, hidden] -> logits [S, vocab] (full vocabulary on every rank)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = tp_gather_last_dim(F.linear(hidden, self.weight))
        return logits[:, : self.vocab_size]

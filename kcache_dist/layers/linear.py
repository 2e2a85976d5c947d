"""Linear layers sharded over the tensor-parallel ranks, each parameter with a `weight_loader`.

A weight loader receives the checkpoint tensor as a lazy slice (safetensors `get_slice`) or a
tensor, and reads only this rank's part of it. Column-parallel layers split the output dimension,
row-parallel layers split the input dimension and sum the partial outputs over the ranks.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..parallel import tp_all_reduce, tp_rank, tp_size


def read_slice(loaded: Any, dim: int, start: int, size: int) -> torch.Tensor:
    """Rows (dim 0) or columns (dim 1) [start, start + size) of a lazy slice or a tensor."""
    index = [slice(None)] * (dim + 1)
    index[dim] = slice(start, start + size)
    return loaded[tuple(index)] if dim else loaded[start:start + size]


def read_all(loaded: Any) -> torch.Tensor:
    return loaded if isinstance(loaded, torch.Tensor) else loaded[:]


def _copy_checked(param: nn.Parameter, value: torch.Tensor, what: str) -> None:
    if tuple(value.shape) != tuple(param.shape):
        raise ValueError(f"{what}: checkpoint gives shape {tuple(value.shape)}, the model expects {tuple(param.shape)}")
    param.data.copy_(value)


class _Linear(nn.Module):
    def __init__(self, input_size: int, output_size: int, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(output_size, input_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)



class ColumnParallelLinear(_Linear):
    """y = x W^T with W's rows (outputs) split over the ranks; each rank returns its output slice."""

    def __init__(self, input_size: int, output_size: int, bias: bool, dtype: torch.dtype):
        if output_size % tp_size():
            raise ValueError(f"output size {output_size} is not divisible by tensor_parallel_size {tp_size()}")
        super().__init__(input_size, output_size // tp_size(), bias, dtype)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        rows = param.shape[0]
        _copy_checked(param, read_slice(loaded, 0, tp_rank() * rows, rows), type(self).__name__)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs stored as one matrix (e.g. gate and up); shard_id = position."""

    def __init__(self, input_size: int, output_sizes: Sequence[int], bias: bool, dtype: torch.dtype):
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias, dtype)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        shard_rows = self.output_sizes[shard_id] // tp_size()
        offset = sum(self.output_sizes[:shard_id]) // tp_size()
        _copy_checked(param.data.narrow(0, offset, shard_rows),
                      read_slice(loaded, 0, tp_rank() * shard_rows, shard_rows),
                      f"{type(self).__name__} shard {shard_id}")


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matrix, split by heads. When there are more ranks than KV
    heads, each KV head is replicated on tp_size / num_kv_heads ranks."""

    def __init__(self, hidden_size: int, head_dim: int, total_num_heads: int, total_num_kv_heads: int,
                 bias: bool, dtype: torch.dtype):
        tp = tp_size()
        if total_num_heads % tp:
            raise ValueError(f"the model's {total_num_heads} attention heads are not divisible by "
                             f"tensor_parallel_size {tp}")
        if (total_num_kv_heads % tp) and (tp % total_num_kv_heads):
            raise ValueError(f"the model's {total_num_kv_heads} KV heads and tensor_parallel_size {tp} "
                             "do not divide one another")
        self.head_dim = head_dim
        self.num_heads = total_num_heads // tp
        self.num_kv_heads = max(1, total_num_kv_heads // tp)
        self.kv_head_start = tp_rank() * total_num_kv_heads // tp  # first KV head of this rank
        output_size = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp
        super().__init__(hidden_size, output_size, bias, dtype)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        q_rows, kv_rows = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if shard_id == "q":
            offset, rows, start = 0, q_rows, tp_rank() * q_rows
        elif shard_id in ("k", "v"):
            offset = q_rows if shard_id == "k" else q_rows + kv_rows
            rows, start = kv_rows, self.kv_head_start * self.head_dim
        else:
            raise ValueError(f"QKVParallelLinear shard_id must be 'q', 'k' or 'v', got {shard_id!r}")
        _copy_checked(param.data.narrow(0, offset, rows), read_slice(loaded, 0, start, rows),
                      f"{type(self).__name__} shard {shard_id}")


class RowParallelLinear(_Linear):
    """y = x W^T with W's columns (inputs) split over the ranks; partial outputs summed over ranks.
    The bias is added once, after the sum."""

    def __init__(self, input_size: int, output_size: int, bias: bool, dtype: torch.dtype):
        if input_size % tp_size():
            raise ValueError(f"input size {input_size} is not divisible by tensor_parallel_size {tp_size()}")
        super().__init__(input_size // tp_size(), output_size, bias, dtype)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        if param.dim() == 1:
            _copy_checked(param, read_all(loaded), f"{type(self).__name__} bias")
            return
        cols = param.shape[1]
        _copy_checked(param, read_slice(loaded, 1, tp_rank() * cols, cols), type(self).__name__)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., input_size / tp_size] -> y [..., output_size], summed over the TP ranks."""
        y = tp_all_reduce(F.linear(x, self.weight))
        return y + self.bias if self.bias is not None else y

"""Sharded layers equal unsharded ones: on 2 and 4 ranks, each parallel layer of
`kcache_dist.layers` is loaded through its parameters' `weight_loader` — once from full tensors and
once from safetensors lazy slices (`get_slice`), counting the elements each rank reads — and its
outputs are compared with `F.linear` / `F.embedding` on the full weights, computed in one process."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from dist_scripts.multiprocess import run_ranks

HIDDEN = 32
COLUMN_OUT = 48
MERGED_SIZES = (40, 40)  # gate, up
HEAD_DIM = 8
NUM_HEADS = 8
ROW_IN = 48
VOCAB = 37  # divisible by neither 2 nor 4
NUM_TOKENS = 5


class CountingSlice:
    """A safetensors lazy slice that counts the elements read through it."""

    def __init__(self, inner):
        self.inner = inner
        self.elements_read = 0

    def get_shape(self):
        return self.inner.get_shape()

    def __getitem__(self, index):
        part = self.inner[index]
        self.elements_read += part.numel()
        return part


def _build_layers(num_kv_heads: int) -> dict:
    from kcache_dist.layers.embedding import ParallelLMHead, VocabParallelEmbedding
    from kcache_dist.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear,
                                           RowParallelLinear)

    dtype = torch.float32
    return {"column": ColumnParallelLinear(HIDDEN, COLUMN_OUT, bias=True, dtype=dtype),
            "merged": MergedColumnParallelLinear(HIDDEN, MERGED_SIZES, bias=True, dtype=dtype),
            "qkv": QKVParallelLinear(HIDDEN, HEAD_DIM, NUM_HEADS, num_kv_heads, bias=True, dtype=dtype),
            "row": RowParallelLinear(ROW_IN, HIDDEN, bias=True, dtype=dtype),
            "embedding": VocabParallelEmbedding(VOCAB, HIDDEN, dtype=dtype),
            "lm_head": ParallelLMHead(VOCAB, HIDDEN, dtype=dtype)}


# (layer, parameter, shard_id) <- checkpoint tensor name
LOADS = [("column", "weight", None, "column.weight"), ("column", "bias", None, "column.bias"),
         ("merged", "weight", 0, "gate.weight"), ("merged", "weight", 1, "up.weight"),
         ("merged", "bias", 0, "gate.bias"), ("merged", "bias", 1, "up.bias"),
         ("qkv", "weight", "q", "q.weight"), ("qkv", "weight", "k", "k.weight"), ("qkv", "weight", "v", "v.weight"),
         ("qkv", "bias", "q", "q.bias"), ("qkv", "bias", "k", "k.bias"), ("qkv", "bias", "v", "v.bias"),
         ("row", "weight", None, "row.weight"), ("row", "bias", None, "row.bias"),
         ("embedding", "weight", None, "embedding.weight"), ("lm_head", "weight", None, "lm_head.weight")]


def _load(layers: dict, source) -> dict:
    """Load every parameter from `source(name)`; returns elements read per layer (CountingSlice only)."""
    read: dict = {}
    for layer_name, param_name, shard_id, tensor_name in LOADS:
        param = getattr(layers[layer_name], param_name)
        loaded = source(tensor_name)
        param.weight_loader(param, loaded, shard_id)
        read[layer_name] = read.get(layer_name, 0) + getattr(loaded, "elements_read", 0)
    return read


def _forward(layers: dict, inputs: dict) -> dict:
    with torch.no_grad():
        return {"column": layers["column"](inputs["x"]), "merged": layers["merged"](inputs["x"]),
                "qkv": layers["qkv"](inputs["x"]), "row": layers["row"](inputs["x_row_shards"][_tp_rank()]),
                "embedding": layers["embedding"](inputs["ids"]), "lm_head": layers["lm_head"](inputs["x"])}


def _tp_rank() -> int:
    from kcache_dist.parallel import tp_rank

    return tp_rank()


def _layers_on_rank(weights: dict, inputs: dict, safetensors_path: str, num_kv_heads: int) -> dict:
    from safetensors import safe_open

    from_tensors = _build_layers(num_kv_heads)
    _load(from_tensors, lambda name: weights[name])
    from_slices = _build_layers(num_kv_heads)
    with safe_open(safetensors_path, framework="pt") as checkpoint:
        elements_read = _load(from_slices, lambda name: CountingSlice(checkpoint.get_slice(name)))
    local_elements = {name: sum(p.numel() for p in layer.parameters()) for name, layer in from_slices.items()}
    return {"outputs": _forward(from_tensors, inputs), "outputs_from_slices": _forward(from_slices, inputs),
            "elements_read": elements_read, "local_elements": local_elements}


def _expected_qkv_shard(y_q, y_k, y_v, tp: int, tp_rank: int, num_kv_heads: int) -> torch.Tensor:
    """The q, k, v columns rank `tp_rank` must produce: its query heads and its (maybe shared) KV heads."""
    q_per_rank = NUM_HEADS // tp
    kv_per_rank = max(1, num_kv_heads // tp)
    kv_start = tp_rank * num_kv_heads // tp
    q = y_q[:, tp_rank * q_per_rank * HEAD_DIM:(tp_rank + 1) * q_per_rank * HEAD_DIM]
    kv = slice(kv_start * HEAD_DIM, (kv_start + kv_per_rank) * HEAD_DIM)
    return torch.cat([q, y_k[:, kv], y_v[:, kv]], dim=-1)


@pytest.mark.parametrize("world, tp, num_kv_heads", [(2, 2, 2), (4, 4, 2), (4, 2, 4)],
                         ids=["tp2", "tp4-kv-heads-replicated", "dp2xtp2"])
def test_sharded_layers_equal_unsharded(world, tp, num_kv_heads, tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))  # fresh each run

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    kv_out = num_kv_heads * HEAD_DIM
    weights = {"column.weight": randn(COLUMN_OUT, HIDDEN), "column.bias": randn(COLUMN_OUT),
               "gate.weight": randn(MERGED_SIZES[0], HIDDEN), "up.weight": randn(MERGED_SIZES[1], HIDDEN),
               "gate.bias": randn(MERGED_SIZES[0]), "up.bias": randn(MERGED_SIZES[1]),
               "q.weight": randn(NUM_HEADS * HEAD_DIM, HIDDEN), "k.weight": randn(kv_out, HIDDEN),
               "v.weight": randn(kv_out, HIDDEN), "q.bias": randn(NUM_HEADS * HEAD_DIM), "k.bias": randn(kv_out),
               "v.bias": randn(kv_out), "row.weight": randn(HIDDEN, ROW_IN), "row.bias": randn(HIDDEN),
               "embedding.weight": randn(VOCAB, HIDDEN), "lm_head.weight": randn(VOCAB, HIDDEN)}
    x_row = randn(NUM_TOKENS, ROW_IN)
    ids = torch.cat([torch.tensor([0, VOCAB - 1]), torch.randint(0, VOCAB, (NUM_TOKENS,), generator=g)])
    inputs = {"x": randn(NUM_TOKENS, HIDDEN), "x_row_shards": list(x_row.chunk(tp, dim=-1)), "ids": ids}
    path = os.path.join(tmp_path, "model.safetensors")
    save_file(weights, path)

    results = run_ranks(_layers_on_rank, world, tp, args=(weights, inputs, path, num_kv_heads))

    w, x = weights, inputs["x"]
    full = {"column": F.linear(x, w["column.weight"], w["column.bias"]),
            "gate": F.linear(x, w["gate.weight"], w["gate.bias"]), "up": F.linear(x, w["up.weight"], w["up.bias"]),
            "q": F.linear(x, w["q.weight"], w["q.bias"]), "k": F.linear(x, w["k.weight"], w["k.bias"]),
            "v": F.linear(x, w["v.weight"], w["v.bias"]), "row": F.linear(x_row, w["row.weight"], w["row.bias"]),
            "embedding": F.embedding(ids, w["embedding.weight"]), "lm_head": F.linear(x, w["lm_head.weight"])}
    close = dict(rtol=1e-5, atol=1e-5)
    for dp_rank in range(world // tp):
        group = results[dp_rank * tp:(dp_rank + 1) * tp]
        column_parts = [r["outputs"]["column"] for r in group]
        torch.testing.assert_close(torch.cat(column_parts, dim=-1), full["column"], **close)
        for tp_rank, result in enumerate(group):
            out = result["outputs"]
            gate, up = (full[k].chunk(tp, dim=-1)[tp_rank] for k in ("gate", "up"))
            torch.testing.assert_close(out["merged"], torch.cat([gate, up], dim=-1), **close)
            torch.testing.assert_close(
                out["qkv"], _expected_qkv_shard(full["q"], full["k"], full["v"], tp, tp_rank, num_kv_heads), **close)
            for name in ("row", "embedding", "lm_head"):  # reduced / gathered: the full result on every rank
                torch.testing.assert_close(out[name], full[name], **close, msg=lambda m: f"{name}: {m}")
            for name, value in result["outputs_from_slices"].items():
                torch.testing.assert_close(value, out[name], rtol=0, atol=0, msg=lambda m: f"{name} (slices): {m}")

    for rank, result in enumerate(results):
        read, local = result["elements_read"], result["local_elements"]
        tp_rank = rank % tp
        rows_per_rank = -(-VOCAB // tp)
        real_vocab_rows = min(rows_per_rank, VOCAB - tp_rank * rows_per_rank)
        for name in ("column", "merged", "qkv"):  # exactly the rank's own shard
            assert read[name] == local[name], (rank, name, read[name], local[name])
        assert read["row"] == local["row"], (rank, read["row"], local["row"])  # weight slice + the whole bias
        for name in ("embedding", "lm_head"):  # the rank's vocabulary rows; padding rows are not read
            assert read[name] == real_vocab_rows * HIDDEN, (rank, name, read[name])
        full_elements = {"column": COLUMN_OUT * (HIDDEN + 1), "row": HIDDEN * (ROW_IN + 1),
                         "embedding": VOCAB * HIDDEN, "merged": sum(MERGED_SIZES) * (HIDDEN + 1)}
        for name, total in full_elements.items():
            assert read[name] < total, (rank, name, read[name], total)

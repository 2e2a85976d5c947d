"""Engine configuration: frozen dataclasses, also loadable from a JSON file in ds_configs/.

The JSON file mirrors the dataclasses exactly: the top-level keys are `EngineConfig` fields, and
the nested objects "kcache" and "parallel" hold `KCacheConfig` and `ParallelConfig` fields:

    {"dtype": "bfloat16", "max_model_len": 32768,
     "kcache": {"mode": "kcache", "top_n": 256},
     "parallel": {"tensor_parallel_size": 2}}

Unknown keys and invalid values raise `ValueError` naming the key and what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

import numpy as np

from .cache.planner import HOST_MEMORY_AUTO, host_rows_per_position

DTYPE_NAMES = ("auto", "float32", "float16", "bfloat16")
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
DEVICE_NAMES = ("auto", "cpu", "cuda")
KCACHE_MODES = ("full", "kcache")
LOAD_FORMATS = ("safetensors", "random")
GROUP_REDUCES = ("max", "sum")
SCORING_KEYS = ("model", "fp8")
HOST_VALUES = ("model", "fp8")  # KCacheConfig.host_values
ALL_REDUCES = ("nccl", "two_shot")  # ParallelConfig.all_reduce

# The far-row cache by default on CUDA: 2 x top_n rows held 89% of a step's picks on the default
# model at 8K; on one H100 at 8K it gave 803 against 684 tok/s even with random weights, whose
# picks repeat least (README, Throughput). From LONG_CONTEXT_TOKENS of max_model_len up, 4 x top_n
# (96% held): its rows are a smaller share of a longer sequence's memory, and the fewer misses touch
# fewer of the host pool's 64 KiB pieces, whose address translation sets the fetch's cost. One H200,
# Llama-3-8B shape, fp8 host values, decode steps at the plans' batches and these hit rates, tokens/s
# of 4 against 2: 8K -3%, 16K +2.4%, 32K +8.4% (benchmarks/results/row_cache_factor_by_context_h200;
# model-dtype host values not measured there).
GPU_ROW_CACHE_FACTOR = 2.0
LONG_CONTEXT_ROW_CACHE_FACTOR = 4.0
LONG_CONTEXT_TOKENS = 16384


def default_row_cache_factor(device_type: str, max_model_len: int) -> float:
    """`KCacheConfig.row_cache_factor` where it is None: 0 off CUDA, else by max_model_len."""
    if device_type != "cuda":
        return 0.0
    return LONG_CONTEXT_ROW_CACHE_FACTOR if max_model_len >= LONG_CONTEXT_TOKENS else GPU_ROW_CACHE_FACTOR


def _require(condition: bool, key: str, value: Any, allowed: str) -> None:
    if not condition:
        raise ValueError(f"invalid value for '{key}': {value!r}; allowed: {allowed}")


def parse_host_memory_gb(text: str) -> Union[float, str]:
    """A command line's host_memory_gb (an argparse type): "auto" or a number > 0."""
    try:
        value = text if text == HOST_MEMORY_AUTO else float(text)
    except ValueError:
        value = None
    if value is None or (value != HOST_MEMORY_AUTO and not value > 0):
        raise argparse.ArgumentTypeError(f"invalid value for 'host_memory_gb': {text!r}; allowed: auto | a number > 0")
    return value


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def as_int(value: Any) -> Optional[int]:
    """`value` as a Python int when it is an integer, numpy's included (any `numbers.Integral`),
    else None. A bool (Python's or numpy's) is not an integer here."""
    return int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else None


def kind_of(value: Any) -> str:
    """How an error message names what it got: "a 2-D array" for a numpy array, else the type's name."""
    return f"a {value.ndim}-D array" if isinstance(value, np.ndarray) else type(value).__name__


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class KCacheConfig:
    """How attention keeps its cache.

    mode: "full" keeps K and V of every layer in device memory and runs dense attention;
    "kcache" keeps K in device memory and V of the sparse layers in host memory, and each decode
    step attends to the sink, the recent window and the `top_n` highest-scoring other positions.
    row_cache_factor: a factor f >= 1 keeps, per running sequence, sparse layer and KV head, the
    ceil(f * top_n) far V rows picked most recently in device memory and fetches only the picks it
    does not hold (`kcache/row_cache.py`; benchmarks/notes/selection_reuse.md has the hit rates it
    was sized by); 0 fetches every step's far V rows from host memory; None (default) is, on CUDA,
    GPU_ROW_CACHE_FACTOR below a max_model_len of LONG_CONTEXT_TOKENS and
    LONG_CONTEXT_ROW_CACHE_FACTOR from there up, and 0 on CPU, where host memory is the device's
    (`for_device`).
    scoring_keys: the K that scores and picks the far positions of a sparse layer. "model" (default):
    K in the model's dtype in device memory. "fp8": K in device memory as float8 e4m3 with a float32
    scale per (position, KV head) (`kcache/fp8_keys.py`), used only to pick; the exact K lives beside
    V in host memory (a host row holds K | V, as does the row cache) and comes with the picked rows,
    so the picked, sink and window positions are weighed by their exact K (the sink and window K
    stay on the device). A sparse layer's device bytes per token and KV head fall from
    2 x head_dim to head_dim + 4 (bf16); a miss fetches twice the bytes. Needs renormalize
    (benchmarks/notes/accuracy.md, "Study: K in fp8": no accuracy lost on the default model; on the
    GPU not yet faster than "model": benchmarks/notes/throughput.md).
    host_values: how a sparse layer's V rows are kept in host memory (the far rows a decode step
    fetches). "model" (default): in the model's dtype. "fp8": float8 e4m3 with a float32 scale per
    (position, KV head) kept in device memory; the sink and window rows stay exact on the device, so
    only the far picks are weighed with rounded V (benchmarks/notes/accuracy.md, "The far V in fp8":
    no accuracy lost on the default model). Half the host memory of V and half the bytes of every
    fetched row (and of the row cache's rows). Not with scoring_keys="fp8" yet.
    """

    mode: str = "full"
    top_n: int = 1024  # top_n and dense_layers: the cheapest measured setting within 1% of full
    dense_layers: int = 8  # attention on every metric (benchmarks/notes/accuracy.md)
    sink_tokens: int = 4
    recent_window: int = 128
    renormalize: bool = True
    group_reduce: str = "max"
    row_cache_factor: Optional[float] = None
    scoring_keys: str = "model"
    host_values: str = "model"

    @property
    def fp8_scoring_keys(self) -> bool:
        """Whether the sparse layers pick with float8 K (and keep the exact K in host memory)."""
        return self.mode == "kcache" and self.scoring_keys == "fp8"

    @property
    def fp8_host_values(self) -> bool:
        """Whether the sparse layers keep their V in host memory as float8 (scales on the device)."""
        return self.mode == "kcache" and self.host_values == "fp8"

    @property
    def host_rows_per_position(self) -> int:
        """`host_rows_per_position` of this config's scoring keys."""
        return host_rows_per_position(self.fp8_scoring_keys)

    def for_device(self, device_type: str, max_model_len: int) -> "KCacheConfig":
        """This config with a row_cache_factor of None made the default of `device_type` for
        sequences of up to `max_model_len` tokens."""
        if self.row_cache_factor is not None:
            return self
        return dataclasses.replace(self, row_cache_factor=default_row_cache_factor(device_type, max_model_len))

    @property
    def row_cache_rows(self) -> int:
        """Rows of the device-side far-row cache per (sequence, sparse layer, KV head); 0: none."""
        if self.mode != "kcache":
            return 0
        if self.row_cache_factor is None:
            raise ValueError("kcache.row_cache_factor is None until the device is known (KCacheConfig.for_device)")
        return math.ceil(self.row_cache_factor * self.top_n)

    def __post_init__(self) -> None:
        _require(self.mode in KCACHE_MODES, "kcache.mode", self.mode, " | ".join(KCACHE_MODES))
        _require(is_int(self.top_n) and self.top_n >= 1, "kcache.top_n", self.top_n, "an integer >= 1")
        _require(is_int(self.dense_layers) and self.dense_layers >= 0, "kcache.dense_layers",
                 self.dense_layers, "an integer >= 0")
        _require(is_int(self.sink_tokens) and self.sink_tokens >= 0, "kcache.sink_tokens",
                 self.sink_tokens, "an integer >= 0")
        _require(is_int(self.recent_window) and self.recent_window >= 0, "kcache.recent_window",
                 self.recent_window, "an integer >= 0")
        _require(isinstance(self.renormalize, bool), "kcache.renormalize", self.renormalize, "true | false")
        _require(self.group_reduce in GROUP_REDUCES, "kcache.group_reduce", self.group_reduce,
                 " | ".join(GROUP_REDUCES))
        factor = self.row_cache_factor
        _require(factor is None or (is_number(factor) and (factor == 0 or factor >= 1)), "kcache.row_cache_factor",
                 factor, f"null ({GPU_ROW_CACHE_FACTOR:g} on CUDA, 0 on CPU), 0 (no row cache) or a number >= 1")
        _require(self.scoring_keys in SCORING_KEYS, "kcache.scoring_keys", self.scoring_keys, " | ".join(SCORING_KEYS))
        _require(self.host_values in HOST_VALUES, "kcache.host_values", self.host_values, " | ".join(HOST_VALUES))
        if self.host_values == "fp8" and self.scoring_keys == "fp8":
            raise ValueError("kcache.host_values='fp8' does not combine with kcache.scoring_keys='fp8' yet: "
                             "choose one of them")
        if self.scoring_keys == "fp8" and not self.renormalize:
            raise ValueError("kcache.scoring_keys='fp8' needs kcache.renormalize=true: the picked positions are "
                             "weighed by their exact K, which the positions not picked have only in host memory")


@dataclass(frozen=True)
class ParallelConfig:
    """How the model is spread over processes: heads sharded over `tensor_parallel_size` ranks; a
    job with more ranks runs world / tensor_parallel_size data-parallel replicas. A collective that
    waits longer than `collective_timeout_s` for a peer fails (a dead rank ends the job). A
    tensor-parallel group stays inside one node unless `allow_cross_node_tp`.
    all_reduce: how the ranks of a TP group sum the row-parallel linears' outputs (attention
    output, MLP down projection) and the embedding's: "nccl" through the process group, or
    "two_shot" (CUDA only) through torch's symmetric memory, each rank reading its peers' buffers
    over NVLink: one buffer of max_num_seqs x hidden size elements a rank, for the decode steps;
    larger tensors (prefill chunks) still go through NCCL."""

    tensor_parallel_size: int = 1
    collective_timeout_s: float = 60.0
    allow_cross_node_tp: bool = False
    all_reduce: str = "nccl"

    def __post_init__(self) -> None:
        _require(is_int(self.tensor_parallel_size) and self.tensor_parallel_size >= 1,
                 "parallel.tensor_parallel_size", self.tensor_parallel_size, "an integer >= 1")
        _require(is_number(self.collective_timeout_s) and self.collective_timeout_s > 0,
                 "parallel.collective_timeout_s", self.collective_timeout_s, "a number > 0")
        _require(isinstance(self.allow_cross_node_tp, bool), "parallel.allow_cross_node_tp",
                 self.allow_cross_node_tp, "true | false")
        _require(self.all_reduce in ALL_REDUCES, "parallel.all_reduce", self.all_reduce, " | ".join(ALL_REDUCES))


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs to start. `model=None` means the embedded default model.

    max_model_len: longest sequence (prompt + output) in tokens; None takes the model's own limit.
    max_num_seqs: most sequences running at once; max_num_batched_tokens: token budget per step
    (long prompts are prefilled in chunks of at most this many tokens).
    block_size: tokens per cache block; None means 16 in full mode and 256 in KCache mode, where the
    V rows of one (sequence, KV head) must lie in long runs of host memory for the fetch to run near
    PCIe speed (measured on an H100: 48-50 GB/s with 256-token blocks, 19 GB/s with 16).
    num_kv_blocks: fixed number of cache blocks (None sizes
    the cache from memory: `gpu_memory_utilization` of the GPU, or `cpu_kv_cache_gb` on CPU; in
    KCache mode also at most `host_memory_gb` GiB of host memory a rank for V; "auto" (default):
    80% of what the rank's NUMA node has available, split evenly among the ranks on that node,
    so that on a GPU with much memory the host does not bind KCache below full mode's batch).
    load_format: "safetensors" reads the weights from the model directory's checkpoint; "random"
    draws every checkpoint tensor whole from a generator seeded by `seed` and its name
    (`models/random_weights.py`) and loads it like a checkpoint's, so the model is the same at
    every tensor_parallel_size; for runs of a model's shape: the directory then needs only
    config.json and a tokenizer.
    enforce_eager: on CUDA, decode-only steps replay CUDA graphs captured per (batch, context)
    bucket (`engine/cuda_graphs.py`) unless this is True (every step op by op); None (default) and
    False are the same. KCache decode steps of batch 64 at 8K on an H100 took 5-24% less device
    time as graphs (95.5 against 100.1 ms without a row cache, 33.3 against 43.6 ms with every
    pick held by one; benchmarks/results/row_cache_h100/).
    decode_micro_batches: a decode-only step is split into this many micro-batches, interleaved
    block by block on as many CUDA streams, so that one micro-batch's V fetch from host memory and
    its tensor-parallel all-reduces overlap another's kernels (`engine/micro_batches.py`), op by op
    or captured in the step's CUDA graph; 1 runs the step whole.
    """

    model: Optional[str] = None
    tokenizer: Optional[str] = None
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: Optional[int] = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192
    block_size: Optional[int] = None
    num_kv_blocks: Optional[int] = None
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_gb: float = 4.0
    host_memory_gb: Union[float, str] = HOST_MEMORY_AUTO
    seed: int = 0
    load_format: str = "safetensors"
    enforce_eager: Optional[bool] = None
    decode_micro_batches: int = 1
    kcache: KCacheConfig = field(default_factory=KCacheConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        for key in ("model", "tokenizer"):
            value = getattr(self, key)
            _require(value is None or (isinstance(value, str) and value != ""), key, value,
                     "null or a non-empty path")
        dtype = DTYPE_ALIASES.get(self.dtype, self.dtype) if isinstance(self.dtype, str) else self.dtype
        _require(dtype in DTYPE_NAMES, "dtype", self.dtype,
                 " | ".join(DTYPE_NAMES + tuple(DTYPE_ALIASES)))
        object.__setattr__(self, "dtype", dtype)
        _require(self.device in DEVICE_NAMES, "device", self.device, " | ".join(DEVICE_NAMES))
        _require(self.max_model_len is None or (is_int(self.max_model_len) and self.max_model_len >= 2),
                 "max_model_len", self.max_model_len, "null or an integer >= 2")
        for key in ("max_num_seqs", "max_num_batched_tokens", "decode_micro_batches"):
            value = getattr(self, key)
            _require(is_int(value) and value >= 1, key, value, "an integer >= 1")
        _require(self.block_size is None or (is_int(self.block_size) and self.block_size >= 1), "block_size",
                 self.block_size, "null or an integer >= 1")
        _require(self.num_kv_blocks is None or (is_int(self.num_kv_blocks) and self.num_kv_blocks >= 1),
                 "num_kv_blocks", self.num_kv_blocks, "null or an integer >= 1")
        _require(is_number(self.gpu_memory_utilization) and 0 < self.gpu_memory_utilization <= 1,
                 "gpu_memory_utilization", self.gpu_memory_utilization, "a number in (0, 1]")
        _require(is_number(self.cpu_kv_cache_gb) and self.cpu_kv_cache_gb > 0, "cpu_kv_cache_gb",
                 self.cpu_kv_cache_gb, "a number > 0")
        host_gb = self.host_memory_gb
        _require(host_gb == HOST_MEMORY_AUTO or (is_number(host_gb) and host_gb > 0), "host_memory_gb", host_gb,
                 "auto | a number > 0")
        _require(is_int(self.seed), "seed", self.seed, "an integer")
        _require(self.load_format in LOAD_FORMATS, "load_format", self.load_format, " | ".join(LOAD_FORMATS))
        _require(self.enforce_eager is None or isinstance(self.enforce_eager, bool), "enforce_eager",
                 self.enforce_eager, "null, true or false")
        _require(isinstance(self.kcache, KCacheConfig), "kcache", self.kcache, "a KCacheConfig")
        _require(isinstance(self.parallel, ParallelConfig), "parallel", self.parallel, "a ParallelConfig")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "EngineConfig":
        """Build from plain data (nested dicts for "kcache" and "parallel"), rejecting unknown keys."""
        return _dataclass_from_dict(cls, values, "")

    @classmethod
    def from_json(cls, path: str | os.PathLike, **overrides: Any) -> "EngineConfig":
        """Load a ds_configs JSON file; keyword `overrides` replace top-level fields of the file."""
        with open(path, encoding="utf-8") as f:
            try:
                values = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON: {e}") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path}: the top level must be a JSON object, got {type(values).__name__}")
        config = cls.from_dict(values)
        return dataclasses.replace(config, **overrides) if overrides else config

    @property
    def resolved_block_size(self) -> int:
        if self.block_size is not None:
            return self.block_size
        return 16 if self.kcache.mode == "full" else 256

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_NESTED_TYPES = {"kcache": KCacheConfig, "parallel": ParallelConfig}


def _dataclass_from_dict(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(values, Mapping):
        raise ValueError(f"invalid value for '{prefix.rstrip('.') or cls.__name__}': expected an object, "
                         f"got {values!r}")
    allowed = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in allowed:
            raise ValueError(f"unknown key '{prefix}{key}' in {cls.__name__}; allowed keys: {', '.join(allowed)}")
    kwargs = {}
    for key, value in values.items():
        nested = _NESTED_TYPES.get(key) if cls is EngineConfig else None
        kwargs[key] = _dataclass_from_dict(nested, value, f"{key}.") if nested else value
    return cls(**kwargs)

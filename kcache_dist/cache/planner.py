"""Rank-aware memory planner: how many KV-cache blocks every rank can hold, agreed by MIN.

Pure arithmetic on injected facts (no torch, no CUDA, no collectives of its own), so any topology
can be planned and tested on a CPU. `memory_facts.py` gathers the real facts of a process.

Where the bytes go (one rank, `n` blocks of `block_size` tokens; a "row" is one token of one
layer's K or V on this rank's KV heads: num_kv_heads x head_dim x dtype_bytes):

    full mode     GPU:  n x block_size x 2 x num_layers rows                (K and V, every layer)
                  host: nothing
    kcache mode   GPU:  n x block_size x (num_layers + dense_layers) rows   (K of all layers, V of dense)
                        + hot V rows: sparse layers x (max_num_seqs + 1) x (sink + window) rows
                          (fixed; the extra slot takes the padding rows of CUDA-graph batches)
                        + with kcache.row_cache_factor: (max_num_seqs + 1) x the far-row cache of
                          one sequence slot (`far_row_cache_slot_bytes`)
                        + staged decode rows: sparse layers x (max_num_seqs + 1) x 2 x the stage's
                          chunk rows, as the host pool stores them (`decode_rows_stage.py`)
                  host: n x block_size x (num_layers - dense_layers) rows   (V of sparse layers; each
                        layer's view aligned to 4 KiB, as `HostPool.take` lays it out)
    kcache with   a sparse layer's K on the GPU is float8 plus a float32 scale per KV head
    fp8 scoring   (num_kv_heads x (head_dim + 4) bytes a token instead of a row); its exact K goes to
    keys          the host beside V (2 rows a token), the hot rows keep K and V (2 x the hot V rows)
                  and the far-row cache holds K | V rows

Block ids are shared by the K pool and the V pool, so one rank's block count is the least of what
its GPU holds, what its host memory holds, and max_num_seqs x ceil(max_model_len / block_size).

Budgets:

    GPU   min(floor(gpu_memory_utilization x total) - weights - activation peak,
              free - activation peak)
          `free` is read after the weights are loaded and the profiled forward ran, with the
          allocator's cache emptied: it already excludes the weights, the CUDA context, NCCL
          buffers and other processes, and the activations must fit in it again at run time.
          gpu_memory_utilization is the fraction of the GPU the process may fill with weights,
          activations and cache; below 1 it also absorbs the allocator's rounding.
    host  min(host_memory_gb GiB per rank          (host_memory_per="rank"), or
              host_memory_gb GiB / ranks on node   (host_memory_per="node": a per-NUMA-node figure
                                                   split evenly among the local ranks whose GPU
                                                   hangs off that node), or, for
                                                   host_memory_gb="auto",
              HOST_MEMORY_AUTO_FRACTION x node available bytes / ranks on node
                                                   (HOST_MEMORY_AUTO_FALLBACK_GB per rank when
                                                   the node's memory is unknown),
              node available bytes / ranks on node (when known),
              RLIMIT_MEMLOCK soft limit            (only with memlock_limits_pinning=True, and when
                                                   not unlimited; it is per process))
          "gb" means GiB (2**30 bytes), as elsewhere in the engine.
          The locked-memory limit does not bind the pool as `HostPool` pins it today: on an H100
          machine (2026-11-25), without CAP_IPC_LOCK and under a 64 KiB soft RLIMIT_MEMLOCK,
          mlock of 1 MiB failed (ENOMEM) while cudaHostRegister of 1 GiB succeeded, and the
          driver's pinned pages showed in neither VmLck nor VmPin. Turn memlock_limits_pinning on
          where the pool is pinned by a path the limit does govern (mlock, RDMA registration).

Every rank calls `plan_rank` with its own facts (it never raises for lack of memory, so every
rank reaches the collectives), then `agree`, which takes the MIN over ranks and raises the same
`ValueError` on every rank when even one max_model_len sequence (or a fixed `num_kv_blocks`)
does not fit — before anything large is allocated.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Sequence, Union

from .decode_rows_stage import stage_chunk_rows

GIB = 1 << 30
HOST_POOL_ALIGNMENT_BYTES = 4096  # HostPool.take starts each layer's view on a 4 KiB boundary
MODES = ("full", "kcache")
HOST_MEMORY_PER = ("rank", "node")
HOST_MEMORY_AUTO = "auto"
# host_memory_gb="auto": the share of the node's available memory the V pools of its ranks may pin
# (the rest stays to the OS, the page cache and the processes); a fixed figure where unknown.
HOST_MEMORY_AUTO_FRACTION = 0.8
HOST_MEMORY_AUTO_FALLBACK_GB = 32.0

BINDS_GPU = "gpu"
BINDS_HOST = "host"
BINDS_MEMLOCK = "memlock"
BINDS_SEQS_X_LEN = "max_num_seqs x max_model_len"
BINDS_FIXED = "num_kv_blocks"

_NO_VALUE = -(1 << 62)  # None, as an integer that goes through all_reduce_min
_NOT_MINE = 1 << 62  # what a rank contributes to a MIN that carries another rank's value


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_optional_int(name: str, value: Any, minimum: int) -> None:
    if value is not None:
        _check_int(name, value, minimum)


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / GIB:.2f} GiB"


def _device_name(device_index: int) -> str:
    return "cpu" if device_index < 0 else f"cuda:{device_index}"


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


# --------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class DeviceMemoryFacts:
    """One rank's GPU memory, measured after its weights are loaded and a profiled forward ran.

    total_bytes: the GPU's memory (`torch.cuda.mem_get_info()[1]`).
    free_bytes: free on the device now, read after loading and profiling with the allocator's
        cache emptied (`torch.cuda.empty_cache()`), so weights, CUDA context, NCCL buffers and
        other processes count as used and the profiled activations do not.
    weight_bytes: this rank's weight shard as allocated (`torch.cuda.memory_allocated()` after load).
    activation_peak_bytes: peak allocation above the weights during a forward of the largest step
        (`torch.cuda.max_memory_allocated()` - weight_bytes).
    device_index: the CUDA device of the rank (for messages and the table); -1 for a CPU run.
    """

    total_bytes: int
    free_bytes: int
    weight_bytes: int
    activation_peak_bytes: int
    device_index: int = 0

    def __post_init__(self) -> None:
        for name in ("total_bytes", "free_bytes", "weight_bytes", "activation_peak_bytes"):
            _check_int(f"DeviceMemoryFacts.{name}", getattr(self, name), 0)


@dataclass(frozen=True)
class HostMemoryFacts:
    """Host memory as seen by one rank.

    numa_node: the NUMA node local to the rank's GPU; None when unknown or the machine has one node.
    node_available_bytes: memory that node can still give (None: unknown, no limit from it).
    memlock_limit_bytes: soft RLIMIT_MEMLOCK of the process (None: unlimited).
    ranks_on_node: local ranks whose GPU hangs off this node, this one included; they share
        `node_available_bytes` (and a per-node `host_memory_gb`) evenly.
    """

    numa_node: Optional[int] = None
    node_available_bytes: Optional[int] = None
    memlock_limit_bytes: Optional[int] = None
    ranks_on_node: int = 1

    def __post_init__(self) -> None:
        _check_optional_int("HostMemoryFacts.numa_node", self.numa_node, 0)
        _check_optional_int("HostMemoryFacts.node_available_bytes", self.node_available_bytes, 0)
        _check_optional_int("HostMemoryFacts.memlock_limit_bytes", self.memlock_limit_bytes, 0)
        _check_int("HostMemoryFacts.ranks_on_node", self.ranks_on_node, 1)


def far_row_cache_slot_bytes(num_sparse_layers: int, num_kv_heads: int, capacity: int, max_model_len: int,
                             head_dim: int, dtype_bytes: int) -> int:
    """GPU bytes of one sequence slot of `kcache.row_cache.FarRowCache`: per sparse layer and KV
    head, capacity + 1 slots (V row, int32 position, int64 stamp) and a position map of
    max_model_len + 1 entries (int16, int32 from 2^15 slots) and an int64 clock; an int64 miss count."""
    map_bytes = 2 if capacity < 2 ** 15 else 4
    per_head = (capacity + 1) * (head_dim * dtype_bytes + 4 + 8) + (max_model_len + 1) * map_bytes
    return num_sparse_layers * (num_kv_heads * per_head + 8) + 8


def host_rows_per_position(fp8_scoring_keys: bool) -> int:
    """head_dim-wide rows that one position of one KV head of a sparse layer keeps in host memory,
    and that a far fetch reads and a row-cache slot holds: V (1), or with fp8 scoring keys K | V (2)."""
    return 2 if fp8_scoring_keys else 1


def host_element_bytes(fp8_host_values: bool, dtype_bytes: int) -> int:
    """Bytes of one element of a host row (and of a row-cache row): float8 with fp8 host values,
    else the model's dtype."""
    return 1 if fp8_host_values else dtype_bytes


@dataclass(frozen=True)
class CacheGeometry:
    """The shape of one rank's cache.

    mode: "full" (K and V of every layer on the GPU; `dense_layers` is ignored) or "kcache".
    num_kv_heads: KV heads held by this rank (after TP sharding or replication).
    dtype_bytes: bytes of one cache element (2 for bf16/fp16).
    hot_rows: V rows per (sequence, KV head, sparse layer) kept on the GPU: sink + recent window.
    row_cache_slot_bytes: GPU bytes of the far-row cache of one sequence slot (0: no row cache).
    stage_rows: the decode's new rows staged on the GPU per (sequence slot, sparse layer), each
    as the host pool stores it (`DecodeRowsStage`; 0: none).
    fp8_scoring_keys: kcache.scoring_keys="fp8" (module docstring).
    fp8_host_values: kcache.host_values="fp8": the sparse layers' V in host memory as float8 (one
    byte an element), with a float32 scale per (position, KV head) on the GPU.
    """

    mode: str
    num_layers: int
    dense_layers: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int
    block_size: int
    hot_rows: int = 0
    row_cache_slot_bytes: int = 0
    stage_rows: int = 0
    fp8_scoring_keys: bool = False
    fp8_host_values: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"CacheGeometry.mode must be one of {' | '.join(MODES)}, got {self.mode!r}")
        for name in ("num_layers", "num_kv_heads", "head_dim", "dtype_bytes", "block_size"):
            _check_int(f"CacheGeometry.{name}", getattr(self, name), 1)
        _check_int("CacheGeometry.dense_layers", self.dense_layers, 0)
        _check_int("CacheGeometry.hot_rows", self.hot_rows, 0)
        _check_int("CacheGeometry.row_cache_slot_bytes", self.row_cache_slot_bytes, 0)
        _check_int("CacheGeometry.stage_rows", self.stage_rows, 0)
        if self.mode == "kcache" and self.dense_layers > self.num_layers:
            raise ValueError(f"kcache.dense_layers={self.dense_layers} exceeds the model's {self.num_layers} layers")

    @classmethod
    def from_engine_config(cls, config: Any, num_layers: int, num_kv_heads: int, head_dim: int,
                           dtype_bytes: int, max_model_len: int = 0) -> "CacheGeometry":
        """Geometry of an `EngineConfig` (mode, dense layers, block size, sink + window, row cache)
        for a model of `num_layers` layers whose attention holds `num_kv_heads` KV heads on this
        rank; max_model_len sizes the row cache's position map."""
        kc = config.kcache
        kcache = kc.mode == "kcache"
        row_width = head_dim * kc.host_rows_per_position  # a cached far row: V, or K | V
        row_cache = (far_row_cache_slot_bytes(num_layers - kc.dense_layers, num_kv_heads, kc.row_cache_rows,
                                              max_model_len, row_width,
                                              host_element_bytes(kc.fp8_host_values, dtype_bytes))
                     if kc.row_cache_rows else 0)
        return cls(mode=kc.mode, num_layers=num_layers, dense_layers=kc.dense_layers, num_kv_heads=num_kv_heads,
                   head_dim=head_dim, dtype_bytes=dtype_bytes, block_size=config.resolved_block_size,
                   hot_rows=kc.sink_tokens + kc.recent_window if kcache else 0, row_cache_slot_bytes=row_cache,
                   stage_rows=2 * stage_chunk_rows(kc.recent_window, config.resolved_block_size) if kcache else 0,
                   fp8_scoring_keys=kc.fp8_scoring_keys, fp8_host_values=kc.fp8_host_values)

    @property
    def row_bytes(self) -> int:
        """One token of one layer's K (or V) on this rank."""
        return self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def num_sparse_layers(self) -> int:
        """Layers whose V lives in host memory (0 in full mode)."""
        return self.num_layers - self.dense_layers if self.mode == "kcache" else 0

    @property
    def num_gpu_v_layers(self) -> int:
        """Layers whose V (all of it) lives on the GPU."""
        return self.num_layers - self.num_sparse_layers

    @property
    def sparse_k_bytes_per_token(self) -> int:
        """GPU bytes of one token's K in one sparse layer: a row, or with fp8 scoring keys a float8
        value per element and a float32 scale per KV head."""
        return self.num_kv_heads * (self.head_dim + 4) if self.fp8_scoring_keys else self.row_bytes

    @property
    def host_row_bytes(self) -> int:
        """One token of one sparse layer in host memory (and what a far fetch reads): V (float8 with
        fp8 host values), or K | V."""
        return (self.host_rows_per_token * self.num_kv_heads * self.head_dim
                * host_element_bytes(self.fp8_host_values, self.dtype_bytes))

    @property
    def host_rows_per_token(self) -> int:
        """Rows one token of a sparse layer keeps in host memory (and a far fetch reads): V, or K | V."""
        return host_rows_per_position(self.fp8_scoring_keys)

    @property
    def gpu_bytes_per_token(self) -> int:
        """K of every layer (the sparse layers' as `sparse_k_bytes_per_token`) + V of the layers that keep it on
        the GPU (+ with fp8 host values the scales of the sparse layers' V, a float32 per KV head)."""
        v_scales = self.num_kv_heads * 4 if self.fp8_host_values else 0
        return (2 * self.num_gpu_v_layers * self.row_bytes
                + self.num_sparse_layers * (self.sparse_k_bytes_per_token + v_scales))

    @property
    def host_bytes_per_token(self) -> int:
        """V (with fp8 scoring keys K | V) of the sparse layers."""
        return self.num_sparse_layers * self.host_row_bytes

    @property
    def gpu_bytes_per_block(self) -> int:
        return self.gpu_bytes_per_token * self.block_size

    @property
    def host_bytes_per_layer_block(self) -> int:
        """One block of one sparse layer's host pool."""
        return self.host_row_bytes * self.block_size

    def hot_gpu_bytes(self, max_num_seqs: int) -> int:
        """The GPU buffers kept per sequence slot: sink + window V rows (per sparse layer; with fp8
        scoring keys their K too), the staged decode rows and the far-row cache, one slot per
        running sequence and a spare one (written by the padding rows of CUDA-graph batches)."""
        per_layer = self.hot_rows * self.host_rows_per_token * self.row_bytes + self.stage_rows * self.host_row_bytes
        return (max_num_seqs + 1) * (self.num_sparse_layers * per_layer + self.row_cache_slot_bytes)

    def gpu_cache_bytes(self, num_blocks: int, max_num_seqs: int) -> int:
        """GPU bytes of `num_blocks` blocks plus the hot V rows."""
        return num_blocks * self.gpu_bytes_per_block + self.hot_gpu_bytes(max_num_seqs)

    def host_pool_bytes(self, num_blocks: int) -> int:
        """Host V pool of `num_blocks` blocks, 4 KiB alignment of every layer's view included
        (equals `HostPool.bytes_for` of the sparse layers' block shapes)."""
        return self.num_sparse_layers * _round_up(num_blocks * self.host_bytes_per_layer_block,
                                                  HOST_POOL_ALIGNMENT_BYTES)

    def blocks_per_seq(self, max_model_len: int) -> int:
        return -(-max_model_len // self.block_size)

    def describe_per_token(self) -> str:
        """'GPU 69632 B (K of 32 layers + V of 2 dense layers), host 61440 B (V of 30 sparse layers)'."""
        dense = "V of every layer" if self.mode == "full" else f"V of {self.num_gpu_v_layers} dense layers"
        keys = f"K of {self.num_layers} layers"
        if self.fp8_scoring_keys and self.num_sparse_layers:
            keys = f"K of {self.num_gpu_v_layers} dense layers, fp8 K of {self.num_sparse_layers} sparse layers"
        if self.fp8_host_values and self.num_sparse_layers:
            dense += f" + scales of the fp8 V of {self.num_sparse_layers} sparse layers"
        text = f"GPU {self.gpu_bytes_per_token} B ({keys} + {dense})"
        if self.num_sparse_layers:
            held = "K and V" if self.fp8_scoring_keys else ("fp8 V" if self.fp8_host_values else "V")
            text += f", host {self.host_bytes_per_token} B ({held} of {self.num_sparse_layers} sparse layers)"
        return text


@dataclass(frozen=True)
class PlannerKnobs:
    """What the user chose (the same on every rank).

    gpu_memory_utilization: fraction of the GPU's total memory the process may fill with weights,
        activations and cache.
    host_memory_gb: GiB of host memory the V pool may use: per rank when host_memory_per="rank",
        per NUMA node (split evenly among the ranks on that node) when host_memory_per="node";
        "auto": HOST_MEMORY_AUTO_FRACTION of what the rank's NUMA node has available, split evenly
        among the ranks on that node.
    num_kv_blocks: a fixed block count (None: as many as memory allows); it must still fit.
    memlock_limits_pinning: whether RLIMIT_MEMLOCK caps the host V pool (see the module docstring:
        cudaHostRegister was measured not to be charged to it, so off by default).
    """

    max_num_seqs: int
    max_model_len: int
    gpu_memory_utilization: float = 0.9
    host_memory_gb: Union[float, str] = HOST_MEMORY_AUTO
    host_memory_per: str = "rank"
    num_kv_blocks: Optional[int] = None
    memlock_limits_pinning: bool = False

    def __post_init__(self) -> None:
        _check_int("max_num_seqs", self.max_num_seqs, 1)
        _check_int("max_model_len", self.max_model_len, 1)
        _check_optional_int("num_kv_blocks", self.num_kv_blocks, 1)
        utilization = self.gpu_memory_utilization
        if isinstance(utilization, bool) or not isinstance(utilization, (int, float)) or not 0 < utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be a number in (0, 1], got {utilization!r}")
        if self.host_memory_gb != HOST_MEMORY_AUTO and (
                isinstance(self.host_memory_gb, bool) or not isinstance(self.host_memory_gb, (int, float))
                or not self.host_memory_gb > 0):
            raise ValueError(f"host_memory_gb must be 'auto' or a number > 0, got {self.host_memory_gb!r}")
        if self.host_memory_per not in HOST_MEMORY_PER:
            raise ValueError(f"host_memory_per must be one of {' | '.join(HOST_MEMORY_PER)}, "
                             f"got {self.host_memory_per!r}")
        if not isinstance(self.memlock_limits_pinning, bool):
            raise ValueError(f"memlock_limits_pinning must be true or false, got {self.memlock_limits_pinning!r}")

    @classmethod
    def from_engine_config(cls, config: Any, max_model_len: int, host_memory_per: str = "rank") -> "PlannerKnobs":
        """Knobs of an `EngineConfig`; `max_model_len` is the resolved one (config or model limit).
        `host_memory_per` is read from the config when it has such a field."""
        return cls(max_num_seqs=config.max_num_seqs, max_model_len=max_model_len,
                   gpu_memory_utilization=config.gpu_memory_utilization, host_memory_gb=config.host_memory_gb,
                   host_memory_per=getattr(config, "host_memory_per", host_memory_per),
                   num_kv_blocks=config.num_kv_blocks)

    @property
    def host_memory_auto(self) -> bool:
        return self.host_memory_gb == HOST_MEMORY_AUTO

    def host_memory_knob_bytes(self, host: HostMemoryFacts) -> int:
        """What host_memory_gb allows this rank (before the node's and the memlock limits)."""
        if self.host_memory_auto:
            if host.node_available_bytes is None:
                return int(HOST_MEMORY_AUTO_FALLBACK_GB * GIB)
            return int(HOST_MEMORY_AUTO_FRACTION * host.node_available_bytes) // host.ranks_on_node
        knob = int(self.host_memory_gb * GIB)
        return knob // host.ranks_on_node if self.host_memory_per == "node" else knob

    def describe_host_memory(self) -> str:
        if self.host_memory_auto:
            return f"host_memory_gb auto ({HOST_MEMORY_AUTO_FRACTION:g} of the node's available memory over its ranks)"
        return f"host_memory_gb {self.host_memory_gb:g} per {self.host_memory_per}"


# --------------------------------------------------------------------------------------------- one rank


@dataclass(frozen=True)
class RankBudget:
    """One rank's facts and what they allow, before the ranks agree.

    gpu_cache_budget_bytes may be negative (weights and activations alone exceed the budget).
    host_* fields are None where the host side holds no V (full mode, or no sparse layers) or the
    limit does not apply; num_host_blocks_fit None means the host side sets no limit.
    num_blocks / binding: what this rank alone could use, and what limits it.
    """

    rank: int
    device: DeviceMemoryFacts
    host: HostMemoryFacts
    num_kv_heads: int
    gpu_budget_by_utilization_bytes: int
    gpu_budget_by_free_bytes: int
    gpu_cache_budget_bytes: int
    num_gpu_blocks_fit: int
    host_budget_by_knob_bytes: Optional[int]
    host_budget_by_node_bytes: Optional[int]
    host_budget_by_memlock_bytes: Optional[int]
    host_cache_budget_bytes: Optional[int]
    host_binding: Optional[str]
    num_host_blocks_fit: Optional[int]
    num_blocks: int
    binding: str

    def where(self) -> str:
        """'rank 3 (GPU cuda:3, NUMA node 0)'."""
        node = "unknown" if self.host.numa_node is None else str(self.host.numa_node)
        where = "CPU" if self.device.device_index < 0 else f"GPU cuda:{self.device.device_index}"
        return f"rank {self.rank} ({where}, NUMA node {node})"


def host_facts_beside_cpu_cache(host: HostMemoryFacts, geometry: CacheGeometry, max_num_seqs: int) -> HostMemoryFacts:
    """On a CPU device the "device" cache (`cpu_kv_cache_gb`) and the V pool take the same host
    memory: `host` with the node's available bytes cut to the V pool's share, so that a rank's
    blocks (their cache bytes and their V bytes) and its hot rows fit its share of the node
    together. Unchanged where the node's memory is unknown or the host holds no V."""
    host_per_block = geometry.host_bytes_per_layer_block * geometry.num_sparse_layers
    if host.node_available_bytes is None or not host_per_block:
        return host
    rank_share = host.node_available_bytes // host.ranks_on_node - geometry.hot_gpu_bytes(max_num_seqs)
    pool_share = max(0, rank_share) * host_per_block // (geometry.gpu_bytes_per_block + host_per_block)
    return replace(host, node_available_bytes=pool_share * host.ranks_on_node)


def _rank_budget(rank: int, device: DeviceMemoryFacts, host: HostMemoryFacts, geometry: CacheGeometry,
                 knobs: PlannerKnobs) -> RankBudget:
    by_utilization = int(knobs.gpu_memory_utilization * device.total_bytes) - device.weight_bytes \
        - device.activation_peak_bytes
    by_free = device.free_bytes - device.activation_peak_bytes
    gpu_budget = min(by_utilization, by_free)
    hot = geometry.hot_gpu_bytes(knobs.max_num_seqs)
    gpu_fit = max(0, (gpu_budget - hot) // geometry.gpu_bytes_per_block)

    by_knob = by_node = by_memlock = host_budget = host_binding = host_fit = None
    if geometry.num_sparse_layers:
        by_knob = knobs.host_memory_knob_bytes(host)
        if host.node_available_bytes is not None:
            by_node = host.node_available_bytes // host.ranks_on_node
        by_memlock = host.memlock_limit_bytes if knobs.memlock_limits_pinning else None
        host_budget = min(v for v in (by_knob, by_node, by_memlock) if v is not None)
        host_binding = BINDS_MEMLOCK if by_memlock is not None and by_memlock < min(
            v for v in (by_knob, by_node) if v is not None) else BINDS_HOST
        per_layer = host_budget // geometry.num_sparse_layers // HOST_POOL_ALIGNMENT_BYTES * HOST_POOL_ALIGNMENT_BYTES
        host_fit = per_layer // geometry.host_bytes_per_layer_block

    if knobs.num_kv_blocks is not None:
        wanted = (knobs.num_kv_blocks, BINDS_FIXED)
    else:
        wanted = (knobs.max_num_seqs * geometry.blocks_per_seq(knobs.max_model_len), BINDS_SEQS_X_LEN)
    candidates = [wanted, (gpu_fit, BINDS_GPU)]  # on a tie the earlier one is named
    if host_fit is not None:
        candidates.append((host_fit, host_binding))
    num_blocks, binding = min(candidates, key=lambda c: c[0])
    return RankBudget(rank=rank, device=device, host=host, num_kv_heads=geometry.num_kv_heads,
                      gpu_budget_by_utilization_bytes=by_utilization, gpu_budget_by_free_bytes=by_free,
                      gpu_cache_budget_bytes=gpu_budget, num_gpu_blocks_fit=gpu_fit,
                      host_budget_by_knob_bytes=by_knob, host_budget_by_node_bytes=by_node,
                      host_budget_by_memlock_bytes=by_memlock, host_cache_budget_bytes=host_budget,
                      host_binding=host_binding, num_host_blocks_fit=host_fit, num_blocks=num_blocks,
                      binding=binding)


# --------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class CachePlan:
    """The cache of every rank: `num_blocks` blocks of `block_size` tokens, each block id holding
    K (and dense-layer V) on the GPU and sparse-layer V in host memory.

    From `plan_rank` it describes one rank (`agreed` False: not yet checked that a sequence fits);
    from `agree` it is the MIN over all ranks. `rank_budgets` are the ranks this process knows: every
    rank when `agree` was given all plans, else this rank and the binding rank.
    binding: what limits num_blocks (BINDS_GPU, BINDS_HOST, BINDS_MEMLOCK, BINDS_SEQS_X_LEN or
    BINDS_FIXED), on rank `binding_rank`.
    """

    geometry: CacheGeometry
    knobs: PlannerKnobs
    world_size: int
    rank_budgets: tuple[RankBudget, ...]
    num_blocks: int
    binding: str
    binding_rank: int
    agreed: bool

    @property
    def block_size(self) -> int:
        return self.geometry.block_size

    @property
    def max_num_seqs(self) -> int:
        """Sequences running at once (the hot V buffer has this many slots)."""
        return self.knobs.max_num_seqs

    @property
    def max_model_len(self) -> int:
        """Longest sequence, prompt + output, in tokens."""
        return self.knobs.max_model_len

    @property
    def num_gpu_blocks(self) -> int:
        """Blocks of the GPU K pool (and dense-layer V pools)."""
        return self.num_blocks

    @property
    def num_host_blocks(self) -> int:
        """Blocks of the host V pool (0 when the host holds no V)."""
        return self.num_blocks if self.geometry.num_sparse_layers else 0

    @property
    def blocks_per_seq(self) -> int:
        """Blocks one max_model_len sequence needs."""
        return self.geometry.blocks_per_seq(self.max_model_len)

    @property
    def num_cache_tokens(self) -> int:
        """Tokens the cache holds over all sequences."""
        return self.num_blocks * self.block_size

    @property
    def num_full_length_seqs(self) -> int:
        """max_model_len sequences that fit at once (at most max_num_seqs)."""
        return min(self.max_num_seqs, self.num_blocks // self.blocks_per_seq)

    @property
    def gpu_bytes_per_token(self) -> int:
        return self.geometry.gpu_bytes_per_token

    @property
    def host_bytes_per_token(self) -> int:
        return self.geometry.host_bytes_per_token

    @property
    def hot_gpu_bytes(self) -> int:
        """Fixed GPU bytes of the sink + window V rows (0 in full mode)."""
        return self.geometry.hot_gpu_bytes(self.max_num_seqs)

    @property
    def gpu_cache_bytes(self) -> int:
        """GPU bytes the cache allocates on each rank: blocks + hot V rows."""
        return self.geometry.gpu_cache_bytes(self.num_blocks, self.max_num_seqs)

    @property
    def host_pool_bytes(self) -> int:
        """Host bytes of each rank's V pool (what `HostPool` is created with)."""
        return self.geometry.host_pool_bytes(self.num_host_blocks)

    def rank_budget(self, rank: int) -> RankBudget:
        for budget in self.rank_budgets:
            if budget.rank == rank:
                return budget
        raise KeyError(f"this plan knows ranks {[b.rank for b in self.rank_budgets]}, not rank {rank}")

    def predicted_peak_gpu_bytes(self, rank: Optional[int] = None) -> int:
        """Weights + activation peak + cache of `rank` (None: the largest over the known ranks)."""
        budgets = self.rank_budgets if rank is None else (self.rank_budget(rank),)
        return max(b.device.weight_bytes + b.device.activation_peak_bytes + self.gpu_cache_bytes for b in budgets)

    def table(self) -> str:
        """A text table for the start-up log: the known ranks' facts and budgets, then the plan."""
        g, k = self.geometry, self.knobs
        header = ("rank", "gpu", "node", "ranks/node", "gpu total", "gpu free", "weights", "activations",
                  "cache budget", "host budget", "gpu fit", "host fit", "binds", "peak gpu")
        rows = [header]
        for b in self.rank_budgets:
            d, h = b.device, b.host
            rows.append((
                str(b.rank), _device_name(d.device_index), "-" if h.numa_node is None else str(h.numa_node),
                str(h.ranks_on_node), _gib(d.total_bytes), _gib(d.free_bytes), _gib(d.weight_bytes),
                _gib(d.activation_peak_bytes), _gib(b.gpu_cache_budget_bytes),
                "-" if b.host_cache_budget_bytes is None else _gib(b.host_cache_budget_bytes),
                str(b.num_gpu_blocks_fit), "-" if b.num_host_blocks_fit is None else str(b.num_host_blocks_fit),
                b.binding, _gib(d.weight_bytes + d.activation_peak_bytes + self.gpu_cache_bytes)))
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = [f"KV cache plan: mode {g.mode}, {self.world_size} rank(s)"
                 + (", agreed by MIN" if self.agreed and self.world_size > 1 else "")
                 + ("" if len(self.rank_budgets) == self.world_size else " (this rank and the binding rank shown)")
                 + f"; block {g.block_size} tokens; gpu_memory_utilization {k.gpu_memory_utilization:g}, "
                   + k.describe_host_memory()]
        lines += ["  " + "  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
        lines.append(f"  plan: {self.num_blocks} blocks = {self.num_cache_tokens} tokens on each rank; "
                     f"{self.num_full_length_seqs} sequence(s) of max_model_len={self.max_model_len} at once "
                     f"(max_num_seqs {self.max_num_seqs}); bound by {self.binding} on rank {self.binding_rank}")
        per_seq = "hot V rows and row cache" if g.row_cache_slot_bytes else "hot V rows"
        lines.append(f"  per token: {g.describe_per_token()}; GPU cache {_gib(self.gpu_cache_bytes)} "
                     f"({per_seq} {_gib(self.hot_gpu_bytes)}), host V pool {_gib(self.host_pool_bytes)}")
        return "\n".join(lines)


def plan_rank(rank: int, device: DeviceMemoryFacts, host: HostMemoryFacts, geometry: CacheGeometry,
              knobs: PlannerKnobs, world_size: int = 1) -> CachePlan:
    """What rank `rank` of `world_size` alone can hold. Never raises for lack of memory (every
    rank must reach `agree`, which raises on all of them alike); raises ValueError for a
    configuration error that every rank sees the same way."""
    _check_int("world_size", world_size, 1)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    blocks_per_seq = geometry.blocks_per_seq(knobs.max_model_len)
    if knobs.num_kv_blocks is not None and knobs.num_kv_blocks < blocks_per_seq:
        raise ValueError(
            f"num_kv_blocks={knobs.num_kv_blocks} holds {knobs.num_kv_blocks * geometry.block_size} tokens, fewer than "
            f"one sequence of max_model_len={knobs.max_model_len} needs ({blocks_per_seq} blocks of "
            f"{geometry.block_size} tokens); raise num_kv_blocks to at least {blocks_per_seq} or lower max_model_len "
            f"to at most {knobs.num_kv_blocks * geometry.block_size}")
    budget = _rank_budget(rank, device, host, geometry, knobs)
    return CachePlan(geometry=geometry, knobs=knobs, world_size=world_size, rank_budgets=(budget,),
                     num_blocks=budget.num_blocks, binding=budget.binding, binding_rank=rank, agreed=False)


# --------------------------------------------------------------------------------------------- agreement


def agree(plans: Union[CachePlan, Sequence[CachePlan]],
          all_reduce_min: Optional[Callable[[int], int]] = None) -> CachePlan:
    """The plan every rank uses: MIN of the ranks' block counts.

    Two spellings, same result:
      agree([plan_of_rank_0, ..., plan_of_rank_N-1])   every rank's plan in hand (tests, or a gather)
      agree(local_plan, all_reduce_min)               on every rank, with a MIN over the world, e.g.
                                                      `kcache_dist.parallel.all_reduce_min`
    The collective spelling costs 12 integer all-reduces whatever the world size: one finds the
    binding rank (fewest blocks, lowest rank on a tie), ten carry its facts to everyone, so each
    rank can name it in the table and in the error, and one finds the fewest sequences any rank's
    memory holds at max_model_len, so that the error's advice holds on every rank.

    Raises ValueError — on every rank, with the same message — when the agreed cache cannot hold
    one max_model_len sequence, or a fixed num_kv_blocks does not fit.
    """
    if all_reduce_min is None:
        if isinstance(plans, CachePlan):
            plans = [plans]
        known = _check_complete(plans)
    else:
        if not isinstance(plans, CachePlan):
            raise TypeError("with all_reduce_min, pass this rank's own CachePlan (from plan_rank)")
        known = _exchange(plans, all_reduce_min)
    first = plans if isinstance(plans, CachePlan) else plans[0]
    binding = min(known, key=lambda b: (b.num_blocks, b.rank))
    agreed = CachePlan(geometry=first.geometry, knobs=first.knobs, world_size=first.world_size,
                       rank_budgets=tuple(sorted(known, key=lambda b: b.rank)), num_blocks=binding.num_blocks,
                       binding=binding.binding, binding_rank=binding.rank, agreed=True)
    if all_reduce_min is None:
        seqs_fit = min(_seqs_fit(agreed, b) for b in known)
    else:
        seqs_fit = int(all_reduce_min(_seqs_fit(agreed, plans.rank_budgets[0])))
    _raise_if_it_cannot_fit(agreed, binding, seqs_fit)
    return agreed


def _seqs_fit(plan: CachePlan, b: RankBudget) -> int:
    """How many sequences rank b can run at max_model_len: max_num_seqs if its memory holds one
    sequence now; else, when only its GPU is short, how many sequences' hot rows (and row cache)
    fit beside one sequence's blocks; 0 when its host memory cannot hold one sequence."""
    g, blocks_per_seq = plan.geometry, plan.blocks_per_seq
    if b.num_host_blocks_fit is not None and b.num_host_blocks_fit < blocks_per_seq:
        return 0
    if b.num_gpu_blocks_fit >= blocks_per_seq:
        return plan.max_num_seqs
    hot_per_seq = g.hot_gpu_bytes(1) - g.hot_gpu_bytes(0)  # hot_gpu_bytes(0): the spare slot alone
    if not hot_per_seq:
        return 0
    return max(0, (b.gpu_cache_budget_bytes - blocks_per_seq * g.gpu_bytes_per_block - g.hot_gpu_bytes(0))
               // hot_per_seq)


def _check_complete(plans: Sequence[CachePlan]) -> list[RankBudget]:
    if not plans:
        raise ValueError("agree needs at least one plan")
    world_size, geometry, knobs = plans[0].world_size, plans[0].geometry, plans[0].knobs
    budgets = [b for p in plans for b in p.rank_budgets]
    ranks = sorted(b.rank for b in budgets)
    if ranks != list(range(world_size)) or any(p.world_size != world_size for p in plans):
        raise ValueError(f"agree needs one plan of each rank 0..{world_size - 1}, got ranks {ranks}")
    for p in plans:
        if p.knobs != knobs or replace(p.geometry, num_kv_heads=geometry.num_kv_heads) != geometry:
            raise ValueError(f"rank {p.rank_budgets[0].rank} was planned with other knobs or cache geometry than "
                             f"rank {plans[0].rank_budgets[0].rank}")
    return budgets


def _exchange(local_plan: CachePlan, all_reduce_min: Callable[[int], int]) -> list[RankBudget]:
    """This rank's budget and the binding rank's, rebuilt from its facts carried by MINs."""
    (local,) = local_plan.rank_budgets
    world_size = local_plan.world_size
    key = int(all_reduce_min(local.num_blocks * world_size + local.rank))
    binding_rank = key % world_size

    def from_binding_rank(value: Optional[int]) -> Optional[int]:
        mine = _NO_VALUE if value is None else value
        carried = int(all_reduce_min(mine if local.rank == binding_rank else _NOT_MINE))
        return None if carried == _NO_VALUE else carried

    d, h = local.device, local.host
    device = DeviceMemoryFacts(total_bytes=from_binding_rank(d.total_bytes), free_bytes=from_binding_rank(d.free_bytes),
                               weight_bytes=from_binding_rank(d.weight_bytes),
                               activation_peak_bytes=from_binding_rank(d.activation_peak_bytes),
                               device_index=from_binding_rank(d.device_index))
    host = HostMemoryFacts(numa_node=from_binding_rank(h.numa_node),
                           node_available_bytes=from_binding_rank(h.node_available_bytes),
                           memlock_limit_bytes=from_binding_rank(h.memlock_limit_bytes),
                           ranks_on_node=from_binding_rank(h.ranks_on_node))
    num_kv_heads = from_binding_rank(local.num_kv_heads)
    if binding_rank == local.rank:
        return [local]
    geometry = replace(local_plan.geometry, num_kv_heads=num_kv_heads)
    binding = _rank_budget(binding_rank, device, host, geometry, local_plan.knobs)
    if binding.num_blocks != key // world_size:
        raise RuntimeError(f"rank {binding_rank}'s facts give {binding.num_blocks} blocks here but "
                           f"{key // world_size} there: the ranks were planned with different knobs")
    return [local, binding]


# --------------------------------------------------------------------------------------------- errors


def _raise_if_it_cannot_fit(plan: CachePlan, binding: RankBudget, seqs_fit: int) -> None:
    """seqs_fit: the fewest sequences any rank holds at max_model_len (`_seqs_fit`)."""
    g, k = plan.geometry, plan.knobs
    blocks_per_seq = plan.blocks_per_seq
    gpu_short = binding.num_gpu_blocks_fit < blocks_per_seq
    host_short = binding.num_host_blocks_fit is not None and binding.num_host_blocks_fit < blocks_per_seq
    if gpu_short or host_short:
        parts = [f"the KV cache cannot hold one sequence of max_model_len={k.max_model_len} ({blocks_per_seq} blocks "
                 f"of {g.block_size} tokens) on {binding.where()}"]
        if gpu_short:
            parts.append(_gpu_shortfall(plan, binding))
        if host_short:
            parts.append(_host_shortfall(plan, binding))
        parts.append(_what_fits(plan, binding, gpu_short, host_short, seqs_fit))
        raise ValueError(". ".join(parts) + ".")
    if k.num_kv_blocks is not None and plan.num_blocks < k.num_kv_blocks:
        raise ValueError(f"num_kv_blocks={k.num_kv_blocks} does not fit: {binding.where()} holds at most "
                         f"{plan.num_blocks} blocks (bound by {binding.binding}); lower num_kv_blocks to at most "
                         f"{plan.num_blocks} or leave it unset to size the cache from memory")


def _gpu_shortfall(plan: CachePlan, b: RankBudget) -> str:
    g, k, d = plan.geometry, plan.knobs, b.device
    block_bytes = g.gpu_bytes_per_block
    hot = g.hot_gpu_bytes(k.max_num_seqs)
    need = plan.blocks_per_seq * block_bytes + hot
    short = need - b.gpu_cache_budget_bytes
    if d.device_index < 0:
        text = (f"CPU cache memory is short by {short} bytes ({_gib(short)}): cpu_kv_cache_gb allows "
                f"{b.gpu_cache_budget_bytes} bytes but the cache needs {need} bytes = {plan.blocks_per_seq} blocks x "
                f"{block_bytes} bytes")
    else:
        text = (f"GPU memory is short by {short} bytes ({_gib(short)}): the cache may use {b.gpu_cache_budget_bytes} "
                f"bytes = "
                f"min({k.gpu_memory_utilization:g} x {d.total_bytes} total - {d.weight_bytes} weights - "
                f"{d.activation_peak_bytes} activations, {d.free_bytes} free - {d.activation_peak_bytes} activations) "
                f"but needs {need} bytes = {plan.blocks_per_seq} blocks x {block_bytes} bytes")
    if hot:
        what = "hot V rows and row cache" if g.row_cache_slot_bytes else "hot V rows"
        text += f" + {hot} bytes of {what} for max_num_seqs={k.max_num_seqs} (and a spare slot)"
    return text


def _host_limit_terms(plan: CachePlan, b: RankBudget) -> list[str]:
    k, h = plan.knobs, b.host
    if k.host_memory_auto and h.node_available_bytes is not None:
        terms = [f"host_memory_gb=auto: {HOST_MEMORY_AUTO_FRACTION:g} x node available {h.node_available_bytes} / "
                 f"{h.ranks_on_node} ranks ({b.host_budget_by_knob_bytes})"]
    elif k.host_memory_auto:
        terms = [f"host_memory_gb=auto with the node's memory unknown: {HOST_MEMORY_AUTO_FALLBACK_GB:g} GiB per rank "
                 f"({b.host_budget_by_knob_bytes})"]
    elif k.host_memory_per == "node":
        terms = [f"host_memory_gb={k.host_memory_gb:g} per node / {h.ranks_on_node} ranks "
                 f"({b.host_budget_by_knob_bytes})"]
    else:
        terms = [f"host_memory_gb={k.host_memory_gb:g} per rank ({b.host_budget_by_knob_bytes})"]
    if b.host_budget_by_node_bytes is not None:
        terms.append(f"node available {h.node_available_bytes} / {h.ranks_on_node} ranks "
                     f"({b.host_budget_by_node_bytes})")
    if b.host_budget_by_memlock_bytes is not None:
        terms.append(f"memlock limit {b.host_budget_by_memlock_bytes}")
    return terms


def _host_shortfall(plan: CachePlan, b: RankBudget) -> str:
    g = plan.geometry
    need = g.host_pool_bytes(plan.blocks_per_seq)
    short = need - b.host_cache_budget_bytes
    terms = _host_limit_terms(plan, b)
    limits = terms[0] if len(terms) == 1 else f"min({', '.join(terms)})"
    return (f"Host memory is short by {short} bytes ({_gib(short)}): the V pool may use {b.host_cache_budget_bytes} "
            f"bytes = "
            f"{limits} but needs {need} bytes = {g.num_sparse_layers} sparse layers x "
            f"{need // g.num_sparse_layers} bytes")


def _what_fits(plan: CachePlan, b: RankBudget, gpu_short: bool, host_short: bool, seqs_fit: int) -> str:
    """The advice of the can't-fit error about rank b; `seqs_fit` is over every rank, so that a
    smaller max_num_seqs is offered only where every rank's memory then holds a sequence."""
    g, k = plan.geometry, plan.knobs
    fit_blocks = min(v for v in (b.num_gpu_blocks_fit, b.num_host_blocks_fit) if v is not None)
    options = []
    if fit_blocks:
        options.append(f"max_model_len <= {fit_blocks * g.block_size}")
    if gpu_short and not host_short and seqs_fit >= 1:
        options.append(f"max_num_seqs <= {seqs_fit} at max_model_len={k.max_model_len}")
    not_enough = ""
    if gpu_short and not host_short and seqs_fit < 1 <= _seqs_fit(plan, b):  # this rank alone would hold them
        not_enough = (f" (a smaller max_num_seqs is not enough: another rank's host memory cannot hold one "
                      f"sequence of max_model_len={k.max_model_len})")
    remedies = []
    if gpu_short and b.device.device_index < 0:
        remedies.append("raise cpu_kv_cache_gb")
    elif gpu_short:
        remedies.append("raise gpu_memory_utilization, free GPU memory or use more tensor-parallel ranks")
    if host_short and b.host_binding == BINDS_MEMLOCK:
        remedies.append("raise the locked-memory limit (ulimit -l)")
    elif host_short and b.host_budget_by_node_bytes is not None \
            and b.host_budget_by_node_bytes < b.host_budget_by_knob_bytes:
        node = "unknown" if b.host.numa_node is None else b.host.numa_node
        remedies.append(f"free host memory on NUMA node {node} or start fewer ranks on it")
    elif host_short and k.host_memory_auto:
        remedies.append(f"free host memory or set host_memory_gb (auto takes {HOST_MEMORY_AUTO_FRACTION:g} of what "
                        "the node has available)")
    elif host_short:
        remedies.append("raise host_memory_gb")
    if options:
        return f"What fits: {' or '.join(options)}{not_enough}; otherwise {'; '.join(remedies)}"
    return f"No max_model_len fits{not_enough}: {'; '.join(remedies)}"

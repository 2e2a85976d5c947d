"""Memory planner: injected topologies, MIN agreement, exact capacities and can't-fit messages;
facts gathering on this machine and from fake sysfs / proc trees. CPU only, no allocation.

Expected numbers are worked out here from the byte arithmetic, not read back from the planner.
"""

from __future__ import annotations

import dataclasses
import resource
import threading

import pytest
import torch

from kcache_dist.cache import memory_facts
from kcache_dist.cache.decode_traffic import decode_step_bytes
from kcache_dist.cache.full_kv_cache import FullKVCache
from kcache_dist.cache.kcache_kv_cache import KCacheKVCache
from kcache_dist.cache.planner import (BINDS_FIXED, BINDS_GPU, BINDS_HOST, BINDS_MEMLOCK, BINDS_SEQS_X_LEN, GIB,
                                       CacheGeometry, DeviceMemoryFacts, HostMemoryFacts, PlannerKnobs, agree,
                                       far_row_cache_slot_bytes, plan_rank)
from kcache_dist.config import EngineConfig, KCacheConfig
from kcache_dist.kcache.selection import SelectionSpec

# Llama-3-8B: 32 layers, 8 KV heads of 128, bf16; 8,030,261,248 parameters.
LAYERS, KV_HEADS, HEAD_DIM, BF16_BYTES = 32, 8, 128, 2
LLAMA3_8B_WEIGHT_BYTES = 8_030_261_248 * 2
DENSE, SINK, WINDOW = 2, 4, 128
SPARSE = LAYERS - DENSE
HOT_ROWS = SINK + WINDOW


def kcache_geometry(kv_heads_on_rank: int) -> CacheGeometry:
    return CacheGeometry("kcache", LAYERS, DENSE, kv_heads_on_rank, HEAD_DIM, BF16_BYTES, 256, HOT_ROWS)


def full_geometry(kv_heads_on_rank: int) -> CacheGeometry:
    return CacheGeometry("full", LAYERS, DENSE, kv_heads_on_rank, HEAD_DIM, BF16_BYTES, 16)


def h100(rank: int, free_gib: float = 78, weights: int = 2 * GIB, activations: int = GIB) -> DeviceMemoryFacts:
    return DeviceMemoryFacts(total_bytes=80 * GIB, free_bytes=int(free_gib * GIB), weight_bytes=weights,
                             activation_peak_bytes=activations, device_index=rank % 8)


def two_node_host(rank: int, node_available: dict[int, int]) -> HostMemoryFacts:
    """8 GPUs on one host: GPUs 0-3 hang off NUMA node 0, GPUs 4-7 off node 1."""
    node = rank // 4
    return HostMemoryFacts(numa_node=node, node_available_bytes=node_available[node], memlock_limit_bytes=None,
                           ranks_on_node=4)


def plan_world(devices, hosts, geometry, knobs):
    world = len(devices)
    return [plan_rank(r, devices[r], hosts[r], geometry, knobs, world_size=world) for r in range(world)]


# ------------------------------------------------------------------------------------ topologies


def test_eight_gpus_two_numa_nodes_split_node_memory():
    """TP 8 (one KV head per rank); host_memory_gb is per node, and node 1 has less available:
    its four ranks split it, and they bind the whole world."""
    geometry = kcache_geometry(1)
    knobs = PlannerKnobs(max_num_seqs=64, max_model_len=131072, gpu_memory_utilization=0.9, host_memory_gb=256,
                         host_memory_per="node")
    plans = plan_world([h100(r) for r in range(8)], [two_node_host(r, {0: 400 * GIB, 1: 160 * GIB}) for r in range(8)],
                       geometry, knobs)
    plan = agree(plans)

    row = 1 * 128 * 2                                    # one token, one layer, K or V, on a rank
    gpu_block, host_layer_block = 34 * 256 * row, 256 * row  # K of 32 + V of 2 dense; V of one sparse layer
    hot = 30 * (64 + 1) * 132 * row  # a slot per sequence and the spare one
    blocks_cap = 64 * (131072 // 256)
    node0_gpu_fit = (min(72 * GIB - 3 * GIB, 78 * GIB - GIB) - hot) // gpu_block
    node0_host = min(256 * GIB // 4, 400 * GIB // 4)     # 64 GiB per rank: the knob
    node1_host = min(256 * GIB // 4, 160 * GIB // 4)     # 40 GiB per rank: what node 1 has
    node0_host_fit = node0_host // 30 // 4096 * 4096 // host_layer_block
    node1_host_fit = node1_host // 30 // 4096 * 4096 // host_layer_block
    assert (blocks_cap, node0_gpu_fit, node0_host_fit, node1_host_fit) == (32768, 33220, 34952, 21845)

    assert [p.binding for p in plans] == [BINDS_SEQS_X_LEN] * 4 + [BINDS_HOST] * 4
    assert [p.num_blocks for p in plans] == [32768] * 4 + [21845] * 4
    assert (plan.num_blocks, plan.binding, plan.binding_rank, plan.agreed) == (21845, BINDS_HOST, 4, True)
    assert plan.num_gpu_blocks == plan.num_host_blocks == 21845
    assert plan.num_cache_tokens == 21845 * 256
    assert plan.num_full_length_seqs == 21845 // 512 == 42
    assert (plan.gpu_bytes_per_token, plan.host_bytes_per_token) == (34 * row, 30 * row)
    assert plan.hot_gpu_bytes == hot
    assert plan.gpu_cache_bytes == 21845 * gpu_block + hot
    assert plan.host_pool_bytes == 30 * 21845 * host_layer_block <= node1_host
    assert plan.predicted_peak_gpu_bytes(0) == plan.predicted_peak_gpu_bytes() == 3 * GIB + 21845 * gpu_block + hot
    budget = plan.rank_budget(5)
    assert (budget.host_budget_by_knob_bytes, budget.host_budget_by_node_bytes) == (64 * GIB, 40 * GIB)

    table = plan.table()
    assert table.splitlines()[0].startswith("KV cache plan: mode kcache, 8 rank(s), agreed by MIN; block 256 tokens")
    assert "host_memory_gb 256 per node" in table.splitlines()[0]
    assert len(table.splitlines()) == 1 + 1 + 8 + 2
    assert "plan: 21845 blocks = 5592320 tokens on each rank; 42 sequence(s) of max_model_len=131072 at once " \
           "(max_num_seqs 64); bound by host on rank 4" in table
    assert "per token: GPU 8704 B (K of 32 layers + V of 2 dense layers), host 7680 B (V of 30 sparse layers)" in table


def test_host_memory_per_node_splits_among_the_ranks_on_the_node():
    geometry = kcache_geometry(1)
    hosts = [two_node_host(r, {0: 1024 * GIB, 1: 1024 * GIB}) for r in range(8)]
    per_node = agree(plan_world([h100(r) for r in range(8)], hosts, geometry,
                                PlannerKnobs(64, 131072, host_memory_gb=160, host_memory_per="node")))
    per_rank = agree(plan_world([h100(r) for r in range(8)], hosts, geometry,
                                PlannerKnobs(64, 131072, host_memory_gb=160, host_memory_per="rank")))
    assert (per_node.num_blocks, per_node.binding) == (40 * GIB // 30 // 4096 * 4096 // (256 * 256), BINDS_HOST)
    assert (per_rank.num_blocks, per_rank.binding) == (64 * 512, BINDS_SEQS_X_LEN)


def test_uneven_free_gpu_memory_min_wins():
    """Rank 6's GPU is shared with another process (40 GiB free): it binds every rank."""
    geometry = kcache_geometry(1)
    free_gib = [78, 78, 77, 78, 78, 78, 40, 78]
    hosts = [two_node_host(r, {0: 1024 * GIB, 1: 1024 * GIB}) for r in range(8)]
    plans = plan_world([h100(r, free_gib[r]) for r in range(8)], hosts, geometry, PlannerKnobs(64, 131072,
                                                                                             host_memory_gb=1024))
    plan = agree(plans)
    row = 256
    rank6_budget = min(72 * GIB - 2 * GIB - GIB, 40 * GIB - GIB)  # the free memory binds
    expected = (rank6_budget - 30 * (64 + 1) * 132 * row) // (34 * 256 * row)
    assert expected == 18763
    assert (plan.num_blocks, plan.binding, plan.binding_rank) == (18763, BINDS_GPU, 6)
    assert plan.rank_budget(6).gpu_cache_budget_bytes == 39 * GIB
    assert plan.rank_budget(2).gpu_cache_budget_bytes == 69 * GIB  # 77 free - 1, but 0.9 x 80 - 3 is less
    assert [p.num_blocks for p in plans] == [32768] * 6 + [18763, 32768]
    # The agreed cache fits rank 6's free memory with its activations.
    assert plan.gpu_cache_bytes + GIB <= 40 * GIB


def test_host_memory_gb_per_rank_binds():
    plan = agree([plan_rank(0, h100(0, 79, LLAMA3_8B_WEIGHT_BYTES, 2 * GIB), HostMemoryFacts(0, 500 * GIB, None, 1),
                            kcache_geometry(8), PlannerKnobs(64, 131072, host_memory_gb=16))])
    assert (plan.num_blocks, plan.binding) == (16 * GIB // 30 // 4096 * 4096 // (256 * 2048), BINDS_HOST)
    assert plan.num_blocks == 1092


def test_memlock_limit_binds_when_pinning_is_charged_to_it():
    host = HostMemoryFacts(numa_node=0, node_available_bytes=500 * GIB, memlock_limit_bytes=8 * GIB, ranks_on_node=1)
    device = h100(0, 79, LLAMA3_8B_WEIGHT_BYTES, 2 * GIB)
    charged = agree([plan_rank(0, device, host, kcache_geometry(8),
                               PlannerKnobs(64, 131072, host_memory_gb=64, memlock_limits_pinning=True))])
    assert (charged.num_blocks, charged.binding) == (8 * GIB // 30 // 4096 * 4096 // (256 * 2048), BINDS_MEMLOCK)
    assert charged.num_blocks == 546
    # By default (cudaHostRegister is not charged to RLIMIT_MEMLOCK) the limit is ignored.
    default = agree([plan_rank(0, device, host, kcache_geometry(8), PlannerKnobs(64, 131072, host_memory_gb=64))])
    assert default.binding == BINDS_GPU and default.rank_budget(0).host_budget_by_memlock_bytes is None


def test_kcache_over_full_capacity_is_the_byte_arithmetic():
    """One H100, Llama-3-8B bf16 weights, same facts in both modes. Full: K and V of 32 layers
    per token. KCache: K of 32 + V of 2 dense layers per token on the GPU, minus the fixed hot
    V rows (sink 4 + window 128, 30 sparse layers, 64 slots): about 2 x 32/34 x (1 - hot/budget)."""
    device = h100(0, 79, LLAMA3_8B_WEIGHT_BYTES, 2 * GIB)
    host = HostMemoryFacts(0, 500 * GIB, None, 1)
    knobs = PlannerKnobs(max_num_seqs=64, max_model_len=131072, gpu_memory_utilization=0.9, host_memory_gb=64)
    full = agree([plan_rank(0, device, host, full_geometry(8), knobs)])
    kcache = agree([plan_rank(0, device, host, kcache_geometry(8), knobs)])

    row = 8 * 128 * 2
    budget = 72 * GIB - LLAMA3_8B_WEIGHT_BYTES - 2 * GIB
    hot = 30 * (64 + 1) * 132 * row  # a slot per sequence and the spare one
    full_blocks = budget // (2 * 32 * 16 * row)
    kcache_blocks = (budget - hot) // (34 * 256 * row)
    assert (budget, hot, full_blocks, kcache_blocks) == (59101405184, 527155200, 28181, 3285)

    assert (full.num_blocks, full.binding, full.num_cache_tokens) == (28181, BINDS_GPU, 450896)
    assert (full.num_host_blocks, full.host_pool_bytes, full.host_bytes_per_token, full.hot_gpu_bytes) == (0, 0, 0, 0)
    assert full.gpu_bytes_per_token == 2 * 32 * row == 131072
    assert full.rank_budget(0).host_cache_budget_bytes is None and full.rank_budget(0).num_host_blocks_fit is None
    assert (kcache.num_blocks, kcache.binding, kcache.num_cache_tokens) == (3285, BINDS_GPU, 840960)
    assert kcache.gpu_bytes_per_token == 34 * row == 69632 and kcache.host_bytes_per_token == 30 * row
    assert kcache.host_pool_bytes == 3285 * 30 * 256 * row <= 64 * GIB

    ratio = kcache.num_cache_tokens / full.num_cache_tokens
    ideal = (2 * 32 / 34) * (budget - hot) / budget
    assert ratio == 840960 / 450896 and abs(ratio - ideal) < 1e-3 and 1.86 < ratio < 1.87
    assert "-" in full.table().splitlines()[2].split()  # no host budget in full mode


def test_fp8_scoring_keys_capacity_by_the_planner():
    """The same H100 facts with the default 8 dense layers (no row cache): KCache holds 1.59x full
    mode's cache tokens with the model's K, 2.22x with fp8 scoring keys (58 112 GPU bytes a token
    against 81 920; hot rows doubled; host bytes doubled, within the 128 GiB given)."""
    device = h100(0, 79, LLAMA3_8B_WEIGHT_BYTES, 2 * GIB)
    host = HostMemoryFacts(0, 500 * GIB, None, 1)
    knobs = PlannerKnobs(max_num_seqs=64, max_model_len=131072, gpu_memory_utilization=0.9, host_memory_gb=128)
    model_keys = dataclasses.replace(kcache_geometry(8), dense_layers=8)
    full, model, fp8 = (agree([plan_rank(0, device, host, g, knobs)]) for g in (
        full_geometry(8), model_keys, dataclasses.replace(model_keys, fp8_scoring_keys=True)))
    budget = 72 * GIB - LLAMA3_8B_WEIGHT_BYTES - 2 * GIB
    hot = 24 * 65 * 132 * 2048
    assert (model.num_blocks, model.binding) == ((budget - hot) // (256 * 81920), BINDS_GPU) == (2798, BINDS_GPU)
    assert (fp8.num_blocks, fp8.binding) == ((budget - 2 * hot) // (256 * 58112), BINDS_GPU) == (3916, BINDS_GPU)
    assert (full.num_cache_tokens, model.num_cache_tokens, fp8.num_cache_tokens) == (450896, 716288, 1002496)
    assert fp8.host_bytes_per_token == 2 * model.host_bytes_per_token == 98304
    assert round(model.num_cache_tokens / full.num_cache_tokens, 2) == 1.59
    assert round(fp8.num_cache_tokens / full.num_cache_tokens, 2) == 2.22


def test_fixed_num_kv_blocks():
    device, host = h100(0, 79, LLAMA3_8B_WEIGHT_BYTES, 2 * GIB), HostMemoryFacts(None, None, None, 1)
    plan = agree([plan_rank(0, device, host, kcache_geometry(8), PlannerKnobs(64, 131072, num_kv_blocks=1000))])
    assert (plan.num_blocks, plan.binding) == (1000, BINDS_FIXED)
    with pytest.raises(ValueError) as error:
        agree([plan_rank(0, device, host, kcache_geometry(8), PlannerKnobs(64, 131072, num_kv_blocks=4000))])
    assert str(error.value) == (
        "num_kv_blocks=4000 does not fit: rank 0 (GPU cuda:0, NUMA node unknown) holds at most 2184 blocks (bound by "
        "host); lower num_kv_blocks to at most 2184 or leave it unset to size the cache from memory")
    assert 32 * GIB // 30 // 4096 * 4096 // (256 * 2048) == 2184
    with pytest.raises(ValueError) as error:
        plan_rank(0, device, host, kcache_geometry(8), PlannerKnobs(64, 131072, num_kv_blocks=100))
    assert str(error.value) == (
        "num_kv_blocks=100 holds 25600 tokens, fewer than one sequence of max_model_len=131072 needs (512 blocks of "
        "256 tokens); raise num_kv_blocks to at least 512 or lower max_model_len to at most 25600")


# ------------------------------------------------------------------------------------ can't fit

SMALL_GPU = DeviceMemoryFacts(total_bytes=24 * GIB, free_bytes=23 * GIB, weight_bytes=LLAMA3_8B_WEIGHT_BYTES,
                              activation_peak_bytes=2 * GIB)
GPU_BUDGET = int(0.9 * 24 * GIB) - LLAMA3_8B_WEIGHT_BYTES - 2 * GIB  # the free memory allows 21 GiB


def test_gpu_too_small_for_one_sequence():
    with pytest.raises(ValueError) as error:
        agree([plan_rank(0, SMALL_GPU, HostMemoryFacts(), kcache_geometry(8), PlannerKnobs(64, 131072))])
    need = 512 * 34 * 256 * 2048 + 30 * (64 + 1) * 132 * 2048
    assert (GPU_BUDGET, need, need - GPU_BUDGET) == (4984817254, 9653960704, 4669143450)
    assert (GPU_BUDGET - 30 * (64 + 1) * 132 * 2048) // (34 * 256 * 2048) * 256 == 64000
    assert str(error.value) == (
        "the KV cache cannot hold one sequence of max_model_len=131072 (512 blocks of 256 tokens) on rank 0 (GPU "
        "cuda:0, NUMA node unknown). GPU memory is short by 4669143450 bytes (4.35 GiB): the cache may use 4984817254 "
        "bytes = min(0.9 x 25769803776 total - 16060522496 weights - 2147483648 activations, 24696061952 free - "
        "2147483648 activations) but needs 9653960704 bytes = 512 blocks x 17825792 bytes + 527155200 bytes of hot V "
        "rows for max_num_seqs=64 (and a spare slot). What fits: max_model_len <= 64000; otherwise raise "
        "gpu_memory_utilization, free "
        "GPU memory or use more tensor-parallel ranks.")


def test_gpu_short_only_by_the_hot_rows_suggests_a_smaller_batch():
    with pytest.raises(ValueError) as error:
        agree([plan_rank(0, SMALL_GPU, HostMemoryFacts(), kcache_geometry(8), PlannerKnobs(64, 65536))])
    one_seq = 256 * 34 * 256 * 2048
    assert (GPU_BUDGET - one_seq) // (30 * 132 * 2048) - 1 == 50  # hot rows of 50 sequences + the spare fit beside one
    assert str(error.value) == (
        "the KV cache cannot hold one sequence of max_model_len=65536 (256 blocks of 256 tokens) on rank 0 (GPU "
        "cuda:0, NUMA node unknown). GPU memory is short by 105740698 bytes (0.10 GiB): the cache may use 4984817254 "
        "bytes = min(0.9 x 25769803776 total - 16060522496 weights - 2147483648 activations, 24696061952 free - "
        "2147483648 activations) but needs 5090557952 bytes = 256 blocks x 17825792 bytes + 527155200 bytes of hot V "
        "rows for max_num_seqs=64 (and a spare slot). What fits: max_model_len <= 64000 or max_num_seqs <= 50 at "
        "max_model_len=65536; otherwise raise gpu_memory_utilization, free GPU memory or use more tensor-parallel ranks.")
    assert agree([plan_rank(0, SMALL_GPU, HostMemoryFacts(), kcache_geometry(8), PlannerKnobs(50, 65536))]).num_blocks \
        == 256


def test_advice_to_lower_max_num_seqs_must_hold_on_every_rank():
    """Rank 0's GPU is short only by the hot rows of 64 sequences (50 would fit), but rank 1's host
    memory cannot hold one sequence either (by less, so rank 0 binds): lowering max_num_seqs is not
    offered, on every rank, whichever spelling of agree runs."""
    host_short = HostMemoryFacts(numa_node=0, node_available_bytes=int(4.625 * GIB), memlock_limit_bytes=None,
                                 ranks_on_node=1)
    knobs = PlannerKnobs(64, 65536)
    plans = [plan_rank(0, SMALL_GPU, HostMemoryFacts(), kcache_geometry(8), knobs, world_size=2),
             plan_rank(1, h100(1, 78, LLAMA3_8B_WEIGHT_BYTES, 2 * GIB), host_short, kcache_geometry(8), knobs,
                       world_size=2)]
    assert [p.num_blocks for p in plans] == [250, 252]  # one sequence needs 256
    with pytest.raises(ValueError) as error:
        agree(plans)
    message = str(error.value)
    assert "on rank 0" in message and "max_num_seqs <= " not in message
    assert message.endswith("What fits: max_model_len <= 64000 (a smaller max_num_seqs is not enough: another "
                            "rank's host memory cannot hold one sequence of max_model_len=65536); otherwise raise "
                            "gpu_memory_utilization, free GPU memory or use more tensor-parallel ranks.")
    assert [str(e) for e in ThreadWorld(2).run(plans)] == [message, message]


NODE1_STARVED = {0: 400 * GIB, 1: 3 * GIB}
NODE1_STARVED_MESSAGE = (
    "the KV cache cannot hold one sequence of max_model_len=131072 (512 blocks of 256 tokens) on rank 4 (GPU cuda:4, "
    "NUMA node 1). Host memory is short by 201326592 bytes (0.19 GiB): the V pool may use 805306368 bytes = "
    "min(host_memory_gb=256 per node / 4 ranks (68719476736), node available 3221225472 / 4 ranks (805306368)) but "
    "needs 1006632960 bytes = 30 sparse layers x 33554432 bytes. What fits: max_model_len <= 104704; otherwise free "
    "host memory on NUMA node 1 or start fewer ranks on it.")
NODE1_KNOBS = PlannerKnobs(64, 131072, host_memory_gb=256, host_memory_per="node")


def test_host_node_too_small_names_the_rank_and_node():
    plans = plan_world([h100(r) for r in range(8)], [two_node_host(r, NODE1_STARVED) for r in range(8)],
                       kcache_geometry(1), NODE1_KNOBS)
    with pytest.raises(ValueError) as error:
        agree(plans)
    need = 30 * 512 * 256 * 256
    per_rank = 3 * GIB // 4
    assert (need, per_rank, need - per_rank) == (1006632960, 805306368, 201326592)
    assert per_rank // 30 // 4096 * 4096 // (256 * 256) * 256 == 104704
    assert str(error.value) == NODE1_STARVED_MESSAGE


def test_memlock_too_small():
    host = HostMemoryFacts(numa_node=0, node_available_bytes=None, memlock_limit_bytes=8 << 20, ranks_on_node=1)
    with pytest.raises(ValueError) as error:
        agree([plan_rank(0, h100(0, 79, LLAMA3_8B_WEIGHT_BYTES, 2 * GIB), host, kcache_geometry(8),
                         PlannerKnobs(64, 131072, memlock_limits_pinning=True))])
    assert 30 * 512 * 256 * 2048 - (8 << 20) == 8044675072
    assert str(error.value) == (
        "the KV cache cannot hold one sequence of max_model_len=131072 (512 blocks of 256 tokens) on rank 0 (GPU "
        "cuda:0, NUMA node 0). Host memory is short by 8044675072 bytes (7.49 GiB): the V pool may use 8388608 bytes "
        "= min(host_memory_gb=auto with the node's memory unknown: 32 GiB per rank (34359738368), memlock limit "
        "8388608) but needs 8053063680 bytes = 30 sparse layers x 268435456 bytes. No max_model_len fits: raise the "
        "locked-memory limit (ulimit -l).")


def test_auto_host_memory_is_a_share_of_the_node_split_over_its_ranks():
    """host_memory_gb="auto" (the default): 0.8 of the node's available memory over its ranks."""
    device = h100(0, 79, LLAMA3_8B_WEIGHT_BYTES, 2 * GIB)
    roomy = HostMemoryFacts(numa_node=0, node_available_bytes=100 * GIB, ranks_on_node=4)
    plan = agree([plan_rank(0, device, roomy, kcache_geometry(8), PlannerKnobs(64, 131072))])
    budget = plan.rank_budget(0)
    assert (budget.host_budget_by_knob_bytes, budget.host_budget_by_node_bytes) == (20 * GIB, 25 * GIB)
    assert budget.host_cache_budget_bytes == 20 * GIB
    assert "host_memory_gb auto (0.8 of the node's available memory over its ranks)" in plan.table().splitlines()[0]

    short = HostMemoryFacts(numa_node=0, node_available_bytes=20 * GIB, ranks_on_node=4)
    with pytest.raises(ValueError) as error:
        agree([plan_rank(0, device, short, kcache_geometry(8), PlannerKnobs(64, 131072))])
    assert 30 * 268435456 - 4 * GIB == 3758096384
    assert str(error.value) == (
        "the KV cache cannot hold one sequence of max_model_len=131072 (512 blocks of 256 tokens) on rank 0 (GPU "
        "cuda:0, NUMA node 0). Host memory is short by 3758096384 bytes (3.50 GiB): the V pool may use 4294967296 "
        "bytes = min(host_memory_gb=auto: 0.8 x node available 21474836480 / 4 ranks (4294967296), node available "
        "21474836480 / 4 ranks (5368709120)) but needs 8053063680 bytes = 30 sparse layers x 268435456 bytes. What "
        "fits: max_model_len <= 69888; otherwise free host memory or set host_memory_gb (auto takes 0.8 of what the "
        "node has available).")


# ------------------------------------------------------------------------------------ the collective spelling


class ThreadWorld:
    """`world` ranks as threads; `all_reduce_min_of(rank)` is that rank's MIN over the world."""

    def __init__(self, world: int):
        self.values = [0] * world
        self.calls = [0] * world
        self.barrier = threading.Barrier(world, timeout=20)

    def all_reduce_min_of(self, rank: int):
        def all_reduce_min(value: int) -> int:
            self.calls[rank] += 1
            self.values[rank] = value
            self.barrier.wait()
            result = min(self.values)
            self.barrier.wait()
            return result
        return all_reduce_min

    def run(self, plans):
        results: list = [None] * len(plans)

        def rank_main(rank: int) -> None:
            try:
                results[rank] = agree(plans[rank], self.all_reduce_min_of(rank))
            except ValueError as error:
                results[rank] = error
        threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(len(plans))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results


@pytest.mark.parametrize("free_gib, node_available", [
    ([78] * 8, {0: 400 * GIB, 1: 160 * GIB}),                      # node 1's host memory binds (rank 4)
    ([78, 78, 77, 78, 78, 78, 40, 78], {0: 1024 * GIB, 1: 1024 * GIB}),  # rank 6's GPU binds
    ([78] * 8, {0: 1024 * GIB, 1: 1024 * GIB}),                    # max_num_seqs x max_model_len binds
])
def test_collective_agreement_matches_the_list_of_plans(free_gib, node_available):
    plans = plan_world([h100(r, free_gib[r]) for r in range(8)], [two_node_host(r, node_available) for r in range(8)],
                       kcache_geometry(1), PlannerKnobs(64, 131072, host_memory_gb=256, host_memory_per="node"))
    expected = agree(plans)
    world = ThreadWorld(8)
    results = world.run(plans)
    assert world.calls == [12] * 8
    for rank, plan in enumerate(results):
        assert (plan.num_blocks, plan.binding, plan.binding_rank) == \
               (expected.num_blocks, expected.binding, expected.binding_rank)
        assert plan.rank_budgets == tuple(sorted({rank: expected.rank_budget(rank),
                                                  expected.binding_rank: expected.rank_budget(expected.binding_rank)}
                                                 .values(), key=lambda b: b.rank))
        assert plan.predicted_peak_gpu_bytes(rank) == expected.predicted_peak_gpu_bytes(rank)
    assert expected.binding_rank != 1 and len(results[1].rank_budgets) == 2
    assert "8 rank(s), agreed by MIN (this rank and the binding rank shown)" in results[1].table()


def test_collective_agreement_raises_the_same_error_on_every_rank():
    plans = plan_world([h100(r) for r in range(8)], [two_node_host(r, NODE1_STARVED) for r in range(8)],
                       kcache_geometry(1), NODE1_KNOBS)
    results = ThreadWorld(8).run(plans)
    assert all(isinstance(r, ValueError) and str(r) == NODE1_STARVED_MESSAGE for r in results)


def test_agree_rejects_incomplete_or_mismatched_plans():
    geometry = kcache_geometry(1)
    hosts = [two_node_host(r, {0: 400 * GIB, 1: 400 * GIB}) for r in range(8)]
    plans = plan_world([h100(r) for r in range(8)], hosts, geometry, PlannerKnobs(64, 131072))
    with pytest.raises(ValueError, match=r"agree needs one plan of each rank 0\.\.7, got ranks \[0, 1, 2, 3, 4, 5, 6]"):
        agree(plans[:7])
    plans[3] = plan_rank(3, h100(3), hosts[3], geometry, PlannerKnobs(32, 131072), world_size=8)
    with pytest.raises(ValueError, match="rank 3 was planned with other knobs or cache geometry than rank 0"):
        agree(plans)


# ------------------------------------------------------------------------------------ geometry and inputs


@pytest.mark.parametrize("kv_heads, block_size, num_blocks", [(8, 16, 7), (1, 16, 3), (3, 5, 11)])
@pytest.mark.parametrize("scoring_keys, row_cache_factor, host_values", [
    ("model", 0, "model"), ("model", 1.5, "model"), ("fp8", 0, "model"), ("fp8", 2, "model"), ("model", 0, "fp8"),
    ("model", 2, "fp8")])
@pytest.mark.parametrize("recent_window", [5, 16])  # 16: staged decode rows where a chunk of 8 divides the block
def test_geometry_matches_what_the_caches_allocate(kv_heads, block_size, num_blocks, scoring_keys, row_cache_factor,
                                                   host_values, recent_window):
    """The planner's bytes equal the tensors the caches really allocate (small head_dim and layer
    counts keep the CPU allocation small; the arithmetic is the same)."""
    layers, dense, head_dim, num_seqs, max_len = 6, 2, 16, 3, 40
    config = EngineConfig(block_size=block_size, kcache=KCacheConfig(
        mode="kcache", top_n=8, dense_layers=dense, sink_tokens=2, recent_window=recent_window, scoring_keys=scoring_keys,
        row_cache_factor=row_cache_factor, host_values=host_values))
    geometry = CacheGeometry.from_engine_config(config, layers, kv_heads, head_dim, 4, max_model_len=max_len)
    kc = config.kcache
    spec = SelectionSpec(kc.top_n, kc.sink_tokens, kc.recent_window, kc.renormalize, kc.group_reduce)
    cache = KCacheKVCache(layers, dense, num_blocks, num_seqs, kv_heads, block_size, head_dim, spec, torch.float32,
                          torch.device("cpu"), row_cache_rows=kc.row_cache_rows, max_model_len=max_len,
                          fp8_scoring_keys=kc.fp8_scoring_keys, fp8_host_values=kc.fp8_host_values)
    assert cache.device_bytes() == geometry.gpu_cache_bytes(num_blocks, num_seqs)
    assert (cache.decode_stage is not None) == (recent_window == 16 and block_size == 16)
    assert cache.host_pool.num_bytes == geometry.host_pool_bytes(num_blocks)
    assert sum(t.numel() * t.element_size() for t in cache.host_rows) == \
        num_blocks * block_size * geometry.host_bytes_per_token
    # what a fetched far row moves (the server's v_bytes_fetched, throughput.py's V GB/s)
    assert cache.host_row_bytes == geometry.host_row_bytes // kv_heads == (
        (2 if scoring_keys == "fp8" else 1) * head_dim * (1 if host_values == "fp8" else 4))
    full_config = EngineConfig(block_size=block_size)
    full = CacheGeometry.from_engine_config(full_config, layers, kv_heads, head_dim, 4)
    full_cache = FullKVCache(layers, num_blocks, kv_heads, block_size, head_dim, torch.float32, torch.device("cpu"))
    assert sum(t.numel() * t.element_size() for t in full_cache.k_caches + full_cache.v_caches) == \
        full.gpu_cache_bytes(num_blocks, num_seqs)
    assert (full.host_pool_bytes(num_blocks), full.hot_gpu_bytes(64)) == (0, 0)


def test_fp8_scoring_keys_bytes_by_hand():
    """Llama-3-8B on one rank, bf16, 8 dense layers: a token holds K + V of 8 dense layers (8 x 2 x
    2048 B) and float8 K + a float32 scale per KV head of 24 sparse layers (24 x 8 x 132 B) on the
    GPU, K | V of the 24 sparse layers on the host; the hot rows keep K and V."""
    fp8 = CacheGeometry("kcache", 32, 8, 8, 128, 2, 256, hot_rows=132, fp8_scoring_keys=True)
    model = dataclasses.replace(fp8, fp8_scoring_keys=False)
    assert fp8.gpu_bytes_per_token == 8 * 2 * 2048 + 24 * 8 * 132 == 58112
    assert model.gpu_bytes_per_token == 8 * 2 * 2048 + 24 * 2048 == 81920
    assert fp8.host_bytes_per_token == 2 * model.host_bytes_per_token == 24 * 2 * 2048
    assert fp8.hot_gpu_bytes(3) == 2 * model.hot_gpu_bytes(3) == 4 * 24 * 132 * 2 * 2048
    assert fp8.describe_per_token() == ("GPU 58112 B (K of 8 dense layers, fp8 K of 24 sparse layers + V of 8 "
                                        "dense layers), host 98304 B (K and V of 24 sparse layers)")


def test_fp8_host_values_bytes_by_hand():
    """Llama-3-8B on one rank, bf16, 8 dense layers, host_values="fp8": the host keeps one byte per
    V element of the 24 sparse layers (24 x 8 x 128 B), the GPU their scales (24 x 8 x 4 B) beside
    the K of every layer and the V of the dense layers; the hot rows stay in bf16; a far row fetched
    is 1024 B instead of 2048 (`decode_traffic`)."""
    fp8 = CacheGeometry("kcache", 32, 8, 8, 128, 2, 256, hot_rows=132, fp8_host_values=True)
    model = dataclasses.replace(fp8, fp8_host_values=False)
    assert fp8.gpu_bytes_per_token == model.gpu_bytes_per_token + 24 * 8 * 4 == 81920 + 768
    assert fp8.host_bytes_per_token == model.host_bytes_per_token // 2 == 24 * 8 * 128 == 24576
    assert fp8.hot_gpu_bytes(3) == model.hot_gpu_bytes(3)
    assert fp8.describe_per_token() == ("GPU 82688 B (K of 32 layers + V of 8 dense layers + scales of the fp8 V of "
                                        "24 sparse layers), host 24576 B (fp8 V of 24 sparse layers)")
    spec = SelectionSpec(1024, 4, 128, True, "max")
    fetched, exact = (decode_step_bytes(g, 0, [8192], spec) for g in (fp8, model))
    assert fetched.far_v_bytes == exact.far_v_bytes // 2 == 24 * 1024 * 1024
    assert (fetched.hot_v_bytes, fetched.k_bytes) == (exact.hot_v_bytes, exact.k_bytes)


def test_inputs_from_engine_config_and_their_checks():
    config = EngineConfig(max_num_seqs=32, gpu_memory_utilization=0.8, host_memory_gb=48, num_kv_blocks=None,
                          kcache=KCacheConfig(mode="kcache", dense_layers=3, sink_tokens=8, recent_window=64,
                                              row_cache_factor=0))
    geometry = CacheGeometry.from_engine_config(config, num_layers=32, num_kv_heads=4, head_dim=128, dtype_bytes=2)
    # staged decode rows: two chunks of 32 (window 64), a row of 4 KV heads x 128 x 2 bytes
    assert geometry == CacheGeometry("kcache", 32, 3, 4, 128, 2, 256, 72, stage_rows=64)
    assert geometry.hot_gpu_bytes(0) == 29 * (72 + 64) * 1024  # the spare slot alone
    knobs = PlannerKnobs.from_engine_config(config, max_model_len=8192)
    assert knobs == PlannerKnobs(32, 8192, 0.8, 48, "rank", None, False)
    assert PlannerKnobs.from_engine_config(config, 8192, host_memory_per="node").host_memory_per == "node"
    full = CacheGeometry.from_engine_config(EngineConfig(), 32, 8, 128, 2)
    assert (full.mode, full.block_size, full.hot_rows, full.num_sparse_layers) == ("full", 16, 0, 0)
    # a far-row cache of 1.5 x top_n rows per (sequence slot, sparse layer, KV head), as planned per slot
    cached = CacheGeometry.from_engine_config(
        EngineConfig(kcache=KCacheConfig(mode="kcache", top_n=1024, dense_layers=8, row_cache_factor=1.5)),
        num_layers=32, num_kv_heads=8, head_dim=128, dtype_bytes=2, max_model_len=8192)
    slot_bytes = 24 * (8 * (1537 * (128 * 2 + 4 + 8) + 8193 * 2) + 8) + 8  # + a clock per layer, a miss count
    assert cached.row_cache_slot_bytes == far_row_cache_slot_bytes(24, 8, 1536, 8192, 128, 2) == slot_bytes
    assert cached.hot_gpu_bytes(63) - dataclasses.replace(cached, row_cache_slot_bytes=0).hot_gpu_bytes(63) \
        == 64 * slot_bytes

    with pytest.raises(ValueError, match="kcache.dense_layers=33 exceeds the model's 32 layers"):
        CacheGeometry("kcache", 32, 33, 8, 128, 2, 256)
    with pytest.raises(ValueError, match=r"host_memory_per must be one of rank \| node, got 'host'"):
        PlannerKnobs(64, 8192, host_memory_per="host")
    with pytest.raises(ValueError, match=r"gpu_memory_utilization must be a number in \(0, 1\], got 1.5"):
        PlannerKnobs(64, 8192, gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="DeviceMemoryFacts.free_bytes must be an integer >= 0, got -1"):
        DeviceMemoryFacts(1, -1, 0, 0)
    with pytest.raises(ValueError, match="HostMemoryFacts.ranks_on_node must be an integer >= 1, got 0"):
        HostMemoryFacts(ranks_on_node=0)
    with pytest.raises(ValueError, match="rank 8 is outside a world of 8"):
        plan_rank(8, h100(0), HostMemoryFacts(), geometry, knobs, world_size=8)


def test_cpu_run_plans_from_a_fixed_budget():
    """On the CPU the "device" budget is cpu_kv_cache_gb: plan it with gpu_memory_utilization=1."""
    device = memory_facts.cpu_device_facts(4 * GIB)
    plan = agree([plan_rank(0, device, HostMemoryFacts(), full_geometry(8),
                            PlannerKnobs(64, 8192, gpu_memory_utilization=1.0))])
    assert (plan.num_blocks, plan.binding) == (4 * GIB // (2 * 32 * 16 * 2048), BINDS_GPU)
    assert plan.num_blocks == 2048 and plan.num_full_length_seqs == 2048 // 512 == 4


# ------------------------------------------------------------------------------------ facts gathering


def write_fake_tree(root, node_meminfo: dict[int, dict[str, int]], mem_available_kb, has_memory: str):
    """A fake sysfs + proc: /sys/devices/system/node/{has_memory,nodeN/meminfo}, /proc/meminfo."""
    nodes = root / "sys/devices/system/node"
    nodes.mkdir(parents=True)
    (nodes / "has_memory").write_text(has_memory + "\n")
    for node, fields in node_meminfo.items():
        (nodes / f"node{node}").mkdir()
        lines = [f"Node {node} {name}:{value:>15} kB" for name, value in fields.items()]
        lines.append(f"Node {node} HugePages_Total:     0")
        (nodes / f"node{node}/meminfo").write_text("\n".join(lines) + "\n")
    proc = root / "proc"
    proc.mkdir()
    proc_lines = ["MemTotal:       24684084 kB", "MemFree:        21416516 kB"]
    if mem_available_kb is not None:
        proc_lines.append(f"MemAvailable:   {mem_available_kb} kB")
    (proc / "meminfo").write_text("\n".join(proc_lines) + "\n")
    return str(root / "sys"), str(proc)


NODE_FIELDS = {"MemTotal": 1000000, "MemFree": 300000, "MemUsed": 700000, "Active(file)": 50000,
               "Inactive(file)": 20000, "FilePages": 90000, "Shmem": 20000, "SReclaimable": 7000}


def test_node_available_bytes_from_fake_sysfs(tmp_path):
    sysfs, proc = write_fake_tree(tmp_path, {0: NODE_FIELDS, 1: dict(NODE_FIELDS, MemFree=100)}, 10_000_000, "0-1")
    fields = memory_facts.read_node_meminfo(0, sysfs)
    assert fields["MemFree"] == 300000 * 1024 and "HugePages_Total" not in fields
    assert memory_facts.nodes_with_memory(sysfs) == (0, 1)
    # Two nodes: MemFree + Active(file) + Inactive(file) + SReclaimable of the node (shmem excluded).
    assert memory_facts.node_available_bytes(0, sysfs, proc) == (300000 + 50000 + 20000 + 7000) * 1024
    assert memory_facts.node_available_bytes(1, sysfs, proc) == (100 + 50000 + 20000 + 7000) * 1024
    # Capped by the machine's MemAvailable; the node unknown: MemAvailable; node missing: MemAvailable.
    sysfs2, proc2 = write_fake_tree(tmp_path / "capped", {0: NODE_FIELDS, 1: NODE_FIELDS}, 100000, "0-1")
    assert memory_facts.node_available_bytes(0, sysfs2, proc2) == 100000 * 1024
    assert memory_facts.node_available_bytes(None, sysfs, proc) == 10_000_000 * 1024
    assert memory_facts.node_available_bytes(5, sysfs, proc) == 10_000_000 * 1024


def test_one_node_machines_use_mem_available(tmp_path):
    """Seen in a sandbox: node0 says 8 GB while /proc/meminfo says 24 GB; one node -> MemAvailable."""
    sysfs, proc = write_fake_tree(tmp_path, {0: dict(NODE_FIELDS, MemTotal=8349900)}, 23415212, "0")
    assert memory_facts.node_available_bytes(0, sysfs, proc) == 23415212 * 1024
    sysfs, proc = write_fake_tree(tmp_path / "bare", {}, None, "0")
    assert memory_facts.node_available_bytes(0, sysfs, proc) is None
    assert memory_facts.nodes_with_memory(str(tmp_path / "nowhere")) is None


def test_node_list_format():
    assert memory_facts._parse_node_list("0-2,5,7-8\n") == (0, 1, 2, 5, 7, 8)


def test_ranks_sharing_a_node():
    eight_gpus_two_nodes = {d: d // 4 for d in range(8)}.get
    assert [memory_facts.ranks_sharing_node(n, 8, eight_gpus_two_nodes) for n in (0, 1)] == [4, 4]
    assert memory_facts.ranks_sharing_node(None, 8, eight_gpus_two_nodes) == 8
    # A GPU this process cannot see counts as sharing (fewer bytes per rank, never more).
    one_visible = {0: 1}.get
    assert memory_facts.ranks_sharing_node(1, 4, one_visible) == 4
    assert memory_facts.ranks_sharing_node(1, 2, {0: 1, 1: 0}.get) == 1


def test_host_memory_facts_from_fake_roots(tmp_path, monkeypatch):
    sysfs, proc = write_fake_tree(tmp_path, {0: NODE_FIELDS, 1: dict(NODE_FIELDS, MemFree=100)}, 10_000_000, "0-1")
    monkeypatch.setattr(resource, "getrlimit", lambda which: (65536, resource.RLIM_INFINITY))
    facts = memory_facts.host_memory_facts(5, 8, sysfs, proc, node_of_device=lambda d: d // 4)
    assert facts == HostMemoryFacts(numa_node=1, node_available_bytes=(100 + 50000 + 20000 + 7000) * 1024,
                                    memlock_limit_bytes=65536, ranks_on_node=4)
    monkeypatch.setattr(resource, "getrlimit", lambda which: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert memory_facts.memlock_limit_bytes() is None


def test_facts_on_this_machine():
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    assert memory_facts.memlock_limit_bytes() == (None if soft == resource.RLIM_INFINITY else soft)
    if torch.cuda.is_available():
        reading = memory_facts.read_gpu_memory(0)
        assert 0 < reading.free_bytes <= reading.total_bytes
        return
    assert memory_facts.read_gpu_memory(0) is None
    assert memory_facts.device_memory_facts(0, 0, 0) is None
    assert memory_facts._nvml_memory(0) is None
    device, host = memory_facts.gather_memory_facts(None, 0, 0)
    assert device is None
    assert host.numa_node is None and host.ranks_on_node == 1
    assert host.node_available_bytes is None or 0 < host.node_available_bytes


def test_cpu_device_cache_and_host_v_pool_share_the_node_memory(tiny_llama_dir, monkeypatch):
    """On a CPU device the cache (`cpu_kv_cache_gb`) and the V pool take the same host memory: the
    engine plans the pool in what the cache leaves, so both fit the node's available bytes, where
    planning the pool against all of them (as before) overshoots."""
    from kcache_dist import LLM
    from kcache_dist.engine import model_runner

    kcache = KCacheConfig(mode="kcache", top_n=8, dense_layers=1, sink_tokens=2, recent_window=4)
    args = dict(device="cpu", model=tiny_llama_dir, kcache=kcache, host_memory_gb=1000, max_model_len=256,
                max_num_seqs=64)
    unbounded = LLM(**args).engine.runner.cache_plan
    g = unbounded.geometry
    per_seq = unbounded.blocks_per_seq * (g.gpu_bytes_per_block + g.host_bytes_per_layer_block * g.num_sparse_layers)
    available = unbounded.hot_gpu_bytes + 6 * per_seq  # room for six sequences' cache and V, not 64
    node = HostMemoryFacts(numa_node=None, node_available_bytes=available, memlock_limit_bytes=None, ranks_on_node=1)
    monkeypatch.setattr(model_runner, "host_memory_facts", lambda device_index, local_world_size: node)

    plan = LLM(**args).engine.runner.cache_plan
    assert plan.gpu_cache_bytes + plan.host_pool_bytes <= available
    assert plan.num_full_length_seqs >= 5
    against_all = agree([plan_rank(0, memory_facts.cpu_device_facts(4 * GIB), node, g,
                                   dataclasses.replace(plan.knobs, gpu_memory_utilization=1.0))])
    assert against_all.gpu_cache_bytes + against_all.host_pool_bytes > available

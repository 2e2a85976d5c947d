"""Loads the model and its cache on this process's device and runs one step plan through it."""

from __future__ import annotations

import logging

import torch

from ..cache.full_kv_cache import FullKVCache
from ..cache.kcache_kv_cache import KCacheKVCache
from ..config import EngineConfig
from ..forward_context import ForwardContext
from ..kcache.selection import SelectionSpec
from ..models.loader import load_weights
from ..models.model_config import ModelConfig
from ..models.registry import model_class
from .step_plan import StepPlan

logger = logging.getLogger(__name__)

GIB = 1 << 30


class ModelRunner:
    def __init__(self, config: EngineConfig, model_dir: str, model_config: ModelConfig, max_model_len: int,
                 device: torch.device, dtype: torch.dtype):
        self.config = config
        self.device = device
        self.dtype = dtype
        self.block_size = config.resolved_block_size
        with torch.device(device):
            self.model = model_class(model_config.architecture)(model_config, max_model_len, dtype)
        load_weights(self.model, model_dir)
        self.model.eval()
        num_kv_heads = self.model.model.layers[0].self_attn.num_kv_heads
        self.kv_cache = self._build_cache(model_config, num_kv_heads, max_model_len)

    def _build_cache(self, mc: ModelConfig, num_kv_heads: int, max_model_len: int):
        """The cache of the configured mode, with as many blocks as memory allows (see `_num_kv_blocks`)."""
        cfg, kc = self.config, self.config.kcache
        layers, bs, d = mc.num_hidden_layers, self.block_size, mc.head_dim
        if kc.mode == "full":
            device_block_bytes, host_block_bytes = FullKVCache.bytes_per_block(layers, num_kv_heads, bs, d, self.dtype), 0
            fixed_device_bytes = 0
        else:
            if kc.dense_layers > layers:
                raise ValueError(f"kcache.dense_layers={kc.dense_layers} exceeds the model's {layers} layers")
            spec = SelectionSpec(kc.top_n, kc.sink_tokens, kc.recent_window, kc.renormalize, kc.group_reduce)
            device_block_bytes, host_block_bytes = KCacheKVCache.bytes_per_block(
                layers, kc.dense_layers, num_kv_heads, bs, d, self.dtype)
            fixed_device_bytes = KCacheKVCache.hot_bytes(layers, kc.dense_layers, cfg.max_num_seqs, num_kv_heads, d,
                                                         spec, self.dtype)
        self.num_kv_blocks = self._num_kv_blocks(device_block_bytes, host_block_bytes, fixed_device_bytes,
                                                 max_model_len)
        if kc.mode == "full":
            return FullKVCache(layers, self.num_kv_blocks, num_kv_heads, bs, d, self.dtype, self.device)
        return KCacheKVCache(layers, kc.dense_layers, self.num_kv_blocks, cfg.max_num_seqs, num_kv_heads, bs, d,
                             spec, self.dtype, self.device)

    def _num_kv_blocks(self, device_block_bytes: int, host_block_bytes: int, fixed_device_bytes: int,
                       max_model_len: int) -> int:
        """Cache blocks: `num_kv_blocks` if given, else what the device budget (and, in KCache mode,
        the host budget `host_memory_gb`) holds, capped at what max_num_seqs sequences of
        max_model_len tokens can use."""
        cfg = self.config
        blocks_per_seq = -(-max_model_len // self.block_size)
        if cfg.num_kv_blocks is not None:
            num_blocks, source = cfg.num_kv_blocks, "num_kv_blocks"
        else:
            if self.device.type == "cuda":
                free_bytes, total_bytes = torch.cuda.mem_get_info(self.device)
                device_budget = free_bytes - (1 - cfg.gpu_memory_utilization) * total_bytes
                source = f"gpu_memory_utilization={cfg.gpu_memory_utilization}"
            else:
                device_budget = cfg.cpu_kv_cache_gb * GIB
                source = f"cpu_kv_cache_gb={cfg.cpu_kv_cache_gb}"
            num_blocks = min(int((device_budget - fixed_device_bytes) // device_block_bytes),
                             cfg.max_num_seqs * blocks_per_seq)
            if host_block_bytes and cfg.host_memory_gb * GIB // host_block_bytes < num_blocks:
                num_blocks, source = int(cfg.host_memory_gb * GIB // host_block_bytes), \
                    f"host_memory_gb={cfg.host_memory_gb}"
        if num_blocks < blocks_per_seq:
            raise ValueError(
                f"the KV cache ({source}) holds {max(num_blocks, 0)} blocks of {self.block_size} tokens, fewer than "
                f"the {blocks_per_seq} blocks one sequence of max_model_len={max_model_len} needs; lower "
                f"max_model_len to at most {max(num_blocks, 0) * self.block_size} or give the cache more memory")
        logger.info("KV cache: %d blocks x %d tokens: %.2f GiB on %s, %.2f GiB in host memory", num_blocks,
                    self.block_size, (num_blocks * device_block_bytes + fixed_device_bytes) / GIB, self.device,
                    num_blocks * host_block_bytes / GIB)
        return num_blocks

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> torch.Tensor:
        """Run the plan's new tokens through the model; logits [S, vocab] float32 of the S
        sequences whose `plan.sample` is true, in plan order."""
        bs = self.block_size
        positions: list[int] = []
        slots: list[int] = []
        query_start_loc = [0]
        seq_lens: list[int] = []
        for n, start, table in zip(plan.num_new_tokens, plan.num_computed_tokens, plan.block_tables):
            for pos in range(start, start + n):
                positions.append(pos)
                slots.append(table[pos // bs] * bs + pos % bs)
            query_start_loc.append(query_start_loc[-1] + n)
            seq_lens.append(start + n)
        max_blocks = max(len(t) for t in plan.block_tables)
        tables = [t + [0] * (max_blocks - len(t)) for t in plan.block_tables]
        dev = self.device
        ctx = ForwardContext(
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.long, device=dev),
            seq_lens_list=seq_lens,
            query_start_loc=query_start_loc,
            num_decodes=plan.num_decodes,
            hot_slots=torch.tensor(plan.hot_slots, dtype=torch.long, device=dev),
            hot_slots_list=plan.hot_slots,
            kv_cache=self.kv_cache,
        )
        input_ids = torch.tensor(plan.token_ids, dtype=torch.long, device=dev)
        hidden = self.model(input_ids, ctx.positions, ctx)
        last_rows = [query_start_loc[i + 1] - 1 for i in range(plan.num_seqs) if plan.sample[i]]
        return self.model.compute_logits(hidden[torch.tensor(last_rows, dtype=torch.long, device=dev)])

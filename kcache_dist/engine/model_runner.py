"""Loads the model and its cache on this process's device and runs one step plan through it."""

from __future__ import annotations

import logging

import torch

from ..cache.full_kv_cache import FullKVCache
from ..config import EngineConfig
from ..forward_context import ForwardContext
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
        self.block_size = config.block_size
        with torch.device(device):
            self.model = model_class(model_config.architecture)(model_config, max_model_len, dtype)
        load_weights(self.model, model_dir)
        self.model.eval()
        attn = self.model.model.layers[0].self_attn
        self.num_kv_blocks = self._num_kv_blocks(model_config, attn.num_kv_heads, max_model_len)
        self.kv_cache = FullKVCache(model_config.num_hidden_layers, self.num_kv_blocks, attn.num_kv_heads,
                                    self.block_size, model_config.head_dim, dtype, device)

    def _num_kv_blocks(self, mc: ModelConfig, num_kv_heads: int, max_model_len: int) -> int:
        """Cache blocks: `num_kv_blocks` if given, else what the memory budget holds, capped at what
        max_num_seqs sequences of max_model_len tokens can use."""
        cfg = self.config
        block_bytes = FullKVCache.bytes_per_block(mc.num_hidden_layers, num_kv_heads, self.block_size,
                                                  mc.head_dim, self.dtype)
        blocks_per_seq = -(-max_model_len // self.block_size)
        if cfg.num_kv_blocks is not None:
            num_blocks, source = cfg.num_kv_blocks, "num_kv_blocks"
        else:
            if self.device.type == "cuda":
                free_bytes, total_bytes = torch.cuda.mem_get_info(self.device)
                budget_bytes = free_bytes - (1 - cfg.gpu_memory_utilization) * total_bytes
                source = f"gpu_memory_utilization={cfg.gpu_memory_utilization}"
            else:
                budget_bytes = cfg.cpu_kv_cache_gb * GIB
                source = f"cpu_kv_cache_gb={cfg.cpu_kv_cache_gb}"
            num_blocks = min(int(budget_bytes // block_bytes), cfg.max_num_seqs * blocks_per_seq)
        if num_blocks < blocks_per_seq:
            raise ValueError(
                f"the KV cache ({source}) holds {max(num_blocks, 0)} blocks of {self.block_size} tokens, fewer than "
                f"the {blocks_per_seq} blocks one sequence of max_model_len={max_model_len} needs; lower "
                f"max_model_len to at most {max(num_blocks, 0) * self.block_size} or give the cache more memory")
        logger.info("KV cache: %d blocks x %d tokens, %.2f GiB on %s", num_blocks, self.block_size,
                    num_blocks * block_bytes / GIB, self.device)
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
            kv_cache=self.kv_cache,
        )
        input_ids = torch.tensor(plan.token_ids, dtype=torch.long, device=dev)
        hidden = self.model(input_ids, ctx.positions, ctx)
        last_rows = [query_start_loc[i + 1] - 1 for i in range(plan.num_seqs) if plan.sample[i]]
        return self.model.compute_logits(hidden[torch.tensor(last_rows, dtype=torch.long, device=dev)])

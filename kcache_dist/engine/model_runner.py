"""Loads the model and its cache on this process's device and runs one step plan through it."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging

import numpy as np
import torch

from ..cache.full_kv_cache import FullKVCache
from ..cache.kcache_kv_cache import KCacheKVCache
from ..cache.memory_facts import cpu_device_facts, gather_memory_facts, host_memory_facts
from ..cache.planner import CacheGeometry, CachePlan, PlannerKnobs, agree, host_facts_beside_cpu_cache, plan_rank
from ..config import EngineConfig
from ..forward_context import ForwardContext
from ..kcache.selection import SelectionSpec
from ..models.loader import iterate_checkpoint, load_weights
from ..models.model_config import ModelConfig
from ..models.random_weights import random_checkpoint
from ..models.registry import model_class
from ..parallel import (KVHeadReplicas, all_reduce_min, current_state, disable_two_shot_all_reduce,
                        enable_two_shot_all_reduce, rank_was_lost)
from .block_table_rows import BlockTableRows, cache_slots
from .cuda_graphs import DecodeGraphs, graphs_enabled
from .micro_batches import MicroBatchStreams, run_interleaved
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
        if config.load_format == "random":
            load_weights(self.model, random_checkpoint(model_config, config.seed, dtype, device),
                         f"random checkpoint of '{model_dir}'")
        else:
            load_weights(self.model, iterate_checkpoint(model_dir), f"checkpoint in '{model_dir}'")
        self.model.eval()
        if config.parallel.all_reduce == "two_shot":  # before the plan, which then sees the buffers' memory
            enable_two_shot_all_reduce(config.max_num_seqs * model_config.hidden_size, dtype, device,
                                       slots=config.decode_micro_batches)
        self.num_kv_heads = self.model.model.layers[0].self_attn.num_kv_heads
        self.model_config = model_config
        self.max_model_len = max_model_len
        if config.kcache.mode == "kcache" and config.kcache.dense_layers > model_config.num_hidden_layers:
            raise ValueError(f"kcache.dense_layers={config.kcache.dense_layers} exceeds the model's "
                             f"{model_config.num_hidden_layers} layers")
        self.micro_batch_streams = MicroBatchStreams(device)
        self.block_table_rows = BlockTableRows(config.max_num_seqs, -(-max_model_len // self.block_size))
        self.cache_plan = self._plan_cache()
        self.num_kv_blocks = self.cache_plan.num_blocks
        self.kv_cache = self._make_cache(self.num_kv_blocks)
        self.decode_graphs = (DecodeGraphs(self.model, self.kv_cache, config.max_num_seqs, max_model_len,
                                           self.block_size, device, self.micro_batch_streams)
                             if self.uses_cuda_graphs else None)

    def release(self) -> None:
        """Drop the CUDA graphs (and so their memory pool), the cache and the model now. After a
        lost rank the device is not waited on: a two-shot all-reduce may spin on the lost peer."""
        if self.decode_graphs is not None and not rank_was_lost():
            # cuBLAS caches a workspace per (handle, stream); a capture takes it from the graphs' pool.
            # Drop the cached ones before that pool's memory goes back to the allocator, so that no
            # later GEMM on the capture stream writes into a tensor that reuses it.
            torch.cuda.synchronize(self.device)
            clear_cublas_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
            if clear_cublas_workspaces is not None:
                clear_cublas_workspaces()
        self.decode_graphs = None
        self.kv_cache = None
        self.model = None
        disable_two_shot_all_reduce(self.device)

    @property
    def uses_cuda_graphs(self) -> bool:
        """Whether decode-only steps replay CUDA graphs (`cuda_graphs.graphs_enabled`)."""
        return graphs_enabled(self.config.enforce_eager, self.device.type,
                              has_triton=importlib.util.find_spec("triton") is not None)

    def _make_cache(self, num_blocks: int):
        mc, kc, dtype = self.model_config, self.config.kcache, self.dtype
        if kc.mode == "full":
            return FullKVCache(mc.num_hidden_layers, num_blocks, self.num_kv_heads, self.block_size, mc.head_dim,
                               dtype, self.device)
        spec = SelectionSpec(kc.top_n, kc.sink_tokens, kc.recent_window, kc.renormalize, kc.group_reduce)
        return KCacheKVCache(mc.num_hidden_layers, kc.dense_layers, num_blocks, self.config.max_num_seqs,
                             self.num_kv_heads, self.block_size, mc.head_dim, spec, dtype, self.device,
                             row_cache_rows=kc.row_cache_rows, max_model_len=self.max_model_len,
                             fp8_scoring_keys=kc.fp8_scoring_keys, fp8_host_values=kc.fp8_host_values,
                             kv_head_replicas=KVHeadReplicas.of_this_rank(mc.total_num_kv_heads))

    def _plan_cache(self) -> CachePlan:
        """Measure this rank's memory, plan the cache blocks and agree on them with every rank
        (the planner raises, on every rank alike, when one max_model_len sequence cannot fit)."""
        cfg, mc = self.config, self.model_config
        state = current_state()
        geometry = CacheGeometry.from_engine_config(cfg, mc.num_hidden_layers, self.num_kv_heads, mc.head_dim,
                                                    self.dtype.itemsize, self.max_model_len)
        knobs = PlannerKnobs.from_engine_config(cfg, self.max_model_len)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            weight_bytes = torch.cuda.memory_allocated(self.device)
            # The activation profile builds a stand-in cache with every sequence slot (hot rows, the
            # row cache's maps): plan once without activations first, so that a configuration that
            # cannot fit fails with the planner's message, not with an allocation error in the profile.
            device, host = gather_memory_facts(self.device.index, weight_bytes, 0)
            agree(plan_rank(state.rank, device, host, geometry, knobs, state.world_size), all_reduce_min)
            activation_peak_bytes = self._profile_activation_peak()
            device, host = gather_memory_facts(self.device.index, weight_bytes, activation_peak_bytes)
        else:
            device = cpu_device_facts(int(cfg.cpu_kv_cache_gb * GIB))
            knobs = dataclasses.replace(knobs, gpu_memory_utilization=1.0)
            node = host_memory_facts(None, state.local_world_size)
            host = host_facts_beside_cpu_cache(node, geometry, knobs.max_num_seqs)
            if host.node_available_bytes != node.node_available_bytes:
                logger.info("CPU device: the V pools plan with %d of the node's %d available bytes, the rest "
                            "left for the cpu_kv_cache_gb caches, which take the same memory",
                            host.node_available_bytes, node.node_available_bytes)
        plan = agree(plan_rank(state.rank, device, host, geometry, knobs, state.world_size), all_reduce_min)
        logger.info("cache plan:\n%s", plan.table())
        return plan

    @torch.inference_mode()
    def _profile_activation_peak(self) -> int:
        """Peak bytes above the weights of the largest steps the plan allows — a prefill chunk of
        max_num_batched_tokens at the end of a max_model_len prompt (attending to the longest
        context) and a decode of max_num_seqs sequences of max_model_len — run on a stand-in cache
        of one max_model_len sequence (whose own bytes are not counted). With CUDA graphs the
        decode's bytes are counted a second time: the graphs' memory pool holds them apart from
        the memory eager steps reuse."""
        cfg, dev = self.config, self.device
        blocks = list(range(-(-self.max_model_len // self.block_size)))
        base_bytes = torch.cuda.memory_allocated(dev)
        self.kv_cache = self._make_cache(len(blocks))
        torch.cuda.synchronize(dev)
        stand_in_bytes = torch.cuda.memory_allocated(dev) - base_bytes
        n = min(cfg.max_num_batched_tokens, self.max_model_len - 1)
        num_seqs = cfg.max_num_seqs
        prefill = StepPlan([0], [n], [self.max_model_len - n], [0] * n, [0], [blocks], [0], [True])
        decode = StepPlan(list(range(num_seqs)), [1] * num_seqs, [self.max_model_len - 1] * num_seqs,
                          [0] * num_seqs, [0] * num_seqs, [blocks] * num_seqs, list(range(num_seqs)),
                          [True] * num_seqs, micro_batches=cfg.decode_micro_batches)
        peaks = []
        for plan in (prefill, decode):
            self.block_table_rows.write(plan)
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            self._execute_eager(plan)
            torch.cuda.synchronize(dev)
            peaks.append(max(0, torch.cuda.max_memory_allocated(dev) - base_bytes - stand_in_bytes))
        self.kv_cache = None
        torch.cuda.empty_cache()
        prefill_bytes, decode_bytes = peaks
        graphs = self.uses_cuda_graphs
        logger.info("activation peaks: prefill chunk of %d tokens %.2f GiB, decode of %d sequences %.2f GiB%s",
                    n, prefill_bytes / GIB, num_seqs, decode_bytes / GIB,
                    " (counted twice: CUDA graphs keep it in their own pool)" if graphs else "")
        return max(prefill_bytes, decode_bytes) + (decode_bytes if graphs else 0)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> torch.Tensor:
        """Run the plan's new tokens through the model; logits [S, vocab] float32 of the S
        sequences whose `plan.sample` is true, in plan order. A decode-only step replays a CUDA
        graph when the runner has them."""
        self.block_table_rows.write(plan)
        new_sequences = [slot for slot, start in zip(plan.hot_slots, plan.num_computed_tokens) if start == 0]
        if new_sequences:
            self.kv_cache.start_sequences(new_sequences)
        if self.decode_graphs is not None and self.decode_graphs.applies_to(plan):
            hidden = self.decode_graphs.run(plan, self.block_table_rows.gather(plan.hot_slots))
            if not all(plan.sample):
                sampled_rows = [i for i, s in enumerate(plan.sample) if s]
                hidden = hidden[torch.tensor(sampled_rows, dtype=torch.long, device=self.device)]
            logits = self.model.compute_logits(hidden)
        else:
            logits = self._execute_eager(plan)
        self.kv_cache.copy_staged_rows(plan, self.block_table_rows.block)
        self.kv_cache.count_decode_fetch([plan.num_computed_tokens[i] + 1 for i in range(plan.num_decodes)])
        return logits

    def _execute_eager(self, plan: StepPlan) -> torch.Tensor:
        """`execute` op by op, once the plan's block tables are written (`BlockTableRows.write`); a
        decode-only plan with `micro_batches` > 1 as micro-batches."""
        if plan.micro_batches > 1 and plan.decode_only and plan.num_seqs > 1:
            return self._execute_micro_batches(plan.split(plan.micro_batches))
        input_ids, ctx, last_rows = self._prepare(plan)
        hidden = self.model(input_ids, ctx.positions, ctx)
        return self.model.compute_logits(hidden[last_rows])

    def _execute_micro_batches(self, parts: list[StepPlan]) -> torch.Tensor:
        """Run the plans `parts` (the micro-batches of one decode step) op by op, interleaved block
        by block, part i on stream i (`micro_batches.run_interleaved`). Logits in part order."""
        prepared = [self._prepare(part) for part in parts]
        last = run_interleaved(self.model, [(ids, ctx) for ids, ctx, _ in prepared],
                               self.micro_batch_streams.get(len(parts)))
        hidden = torch.cat([h[rows] for h, (_, _, rows) in zip(last, prepared)])
        return self.model.compute_logits(hidden)

    def _prepare(self, plan: StepPlan) -> tuple[torch.Tensor, ForwardContext, torch.Tensor]:
        """(input ids [T], the forward context, rows [S] of the T new tokens whose logits are sampled)
        of a plan whose block tables are written."""
        positions: list[int] = []
        query_start_loc = [0]
        seq_lens: list[int] = []
        token_seqs: list[int] = []
        for i, (n, start) in enumerate(zip(plan.num_new_tokens, plan.num_computed_tokens)):
            positions.extend(range(start, start + n))
            token_seqs.extend([i] * n)
            query_start_loc.append(query_start_loc[-1] + n)
            seq_lens.append(start + n)
        positions_np, token_seqs_np = np.array(positions, dtype=np.int64), np.array(token_seqs, dtype=np.int64)
        block_tables = self.block_table_rows.gather(plan.hot_slots)
        slots = cache_slots(block_tables, token_seqs_np, positions_np, self.block_size)
        dev = self.device
        ctx = ForwardContext(
            positions=torch.from_numpy(positions_np).to(dev),
            slot_mapping=torch.from_numpy(slots).to(dev),
            block_tables=torch.from_numpy(block_tables).to(dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.long, device=dev),
            seq_lens_list=seq_lens,
            max_seq_len=max(seq_lens),
            query_start_loc=query_start_loc,
            num_decodes=plan.num_decodes,
            hot_slots=torch.tensor(plan.hot_slots, dtype=torch.long, device=dev),
            hot_slots_list=plan.hot_slots,
            kv_cache=self.kv_cache,
            token_seqs=torch.from_numpy(token_seqs_np).to(dev),
            block_tables_host=block_tables,
        )
        input_ids = torch.tensor(plan.token_ids, dtype=torch.long, device=dev)
        last_rows = [query_start_loc[i + 1] - 1 for i in range(plan.num_seqs) if plan.sample[i]]
        return input_ids, ctx, torch.tensor(last_rows, dtype=torch.long, device=dev)

"""CUDA-graph decode: a decode-only step replays a captured graph of the model's forward instead
of launching its few hundred kernels one by one from Python.

A graph is captured for a (batch bucket, context bucket) the first time a step needs it: the batch
rounded up to the next of `batch_buckets(max_num_seqs)`, the longest sequence rounded up to the next
of `context_buckets(max_model_len)`, so one graph serves every step within its buckets (the kernels
size their grids and scratch from the bucket and skip what lies past each sequence's length). The
graphs read their inputs from static buffers shared by all of them, and share one memory pool (only
one runs at a time). A padding row has slot -1 (writes nothing), a context of one position in block
0 and the cache's spare hot slot (`spare_hot_slot`, held by no sequence); its output is dropped. The
graph ends at the final hidden states: logits (and, under tensor parallelism, their gather) run
eagerly after the replay.

A step whose plan asks for micro-batches (`StepPlan.micro_batches`, `EngineConfig.decode_micro_batches`)
replays a graph of its own: the bucket's rows split into that many contiguous groups run block by
block on as many streams (`micro_batches.run_interleaved`), captured with the streams' fork and join.

Before its capture a graph's shapes run once eagerly (Triton compiles, cuBLAS picks its kernels),
which makes the first step of each bucket cost about three forwards. Steps with a prefill run
eagerly; which modes use graphs at all is `graphs_enabled`.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..forward_context import ForwardContext
from .block_table_rows import cache_slots
from .micro_batches import MicroBatchStreams, part_bounds, run_interleaved
from .step_plan import StepPlan

PAD_SLOT = -1  # cache slot of a padding row: the store kernels skip it
MIN_CONTEXT_BUCKET = 256


def graphs_enabled(enforce_eager: Optional[bool], device_type: str, has_triton: bool) -> bool:
    """Whether decode steps replay graphs (EngineConfig.enforce_eager): on CUDA with Triton, in
    full-KV and KCache mode, unless enforce_eager is True."""
    return device_type == "cuda" and has_triton and not enforce_eager


def batch_buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes that get a graph: 1, 2, 4, 8, then every multiple of 8, and max_num_seqs."""
    sizes = [b for b in (1, 2, 4) if b < max_num_seqs] + list(range(8, max_num_seqs, 8))
    return sizes + [max_num_seqs]


def context_buckets(max_model_len: int) -> list[int]:
    """Context bounds that get a graph: powers of two from MIN_CONTEXT_BUCKET, and max_model_len."""
    sizes, c = [], MIN_CONTEXT_BUCKET
    while c < max_model_len:
        sizes.append(c)
        c *= 2
    return sizes + [max_model_len]


def bucket_of(value: int, buckets: list[int]) -> int:
    """The smallest bucket >= value (buckets ascending; value <= the last)."""
    return buckets[bisect.bisect_left(buckets, value)]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    hidden: torch.Tensor  # [batch bucket, hidden] static output


class DecodeGraphs:
    """Captures and replays decode graphs for one model and its cache (see the module docstring).

    model(input_ids [T], positions [T], ctx) -> hidden [T, hidden] is the forward, `model.blocks` the
    same block by block (for micro-batches, on the streams of `streams`); the cache must not change
    after construction (graphs hold its addresses)."""

    def __init__(self, model: torch.nn.Module, kv_cache, max_num_seqs: int, max_model_len: int,
                 block_size: int, device: torch.device, streams: Optional[MicroBatchStreams] = None):
        self.model = model
        self.streams = streams or MicroBatchStreams(device)
        self.kv_cache = kv_cache
        self.max_num_seqs = max_num_seqs
        self.block_size = block_size
        self.device = device
        self.batch_buckets = batch_buckets(max_num_seqs)
        self.context_buckets = context_buckets(max_model_len)
        max_blocks = -(-max_model_len // block_size)
        i64 = dict(dtype=torch.long, device=device)
        # rows: input ids, positions, slots, sequence lengths, hot slots
        self._inputs = torch.zeros(5, max_num_seqs, **i64)
        self._block_tables = torch.zeros(max_num_seqs, max_blocks, dtype=torch.int32, device=device)
        self._graphs: dict[tuple[int, int, int], _Graph] = {}  # (batch, context, micro-batches)
        self._pool = None

    @property
    def num_captured(self) -> int:
        return len(self._graphs)

    def applies_to(self, plan: StepPlan) -> bool:
        return plan.decode_only and plan.num_seqs <= self.max_num_seqs

    @torch.inference_mode()
    def run(self, plan: StepPlan, block_tables: np.ndarray) -> torch.Tensor:
        """The final hidden states [B, hidden] of a decode-only plan (`applies_to`), from its graph;
        block_tables int32 [B, longest table] are its sequences' (`BlockTableRows.gather`)."""
        num_seqs = plan.num_seqs
        seq_lens = [c + 1 for c in plan.num_computed_tokens]
        batch = bucket_of(num_seqs, self.batch_buckets)
        key = (batch, bucket_of(max(seq_lens), self.context_buckets), len(part_bounds(batch, plan.micro_batches)) - 1)
        self._fill_inputs(plan, block_tables, seq_lens, batch)
        self.kv_cache.join_offload()  # host writes of earlier eager steps land before the graph reads
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(*key)
        entry.graph.replay()
        self.kv_cache.join_offload()
        return entry.hidden[:num_seqs]

    def _fill_inputs(self, plan: StepPlan, block_tables: np.ndarray, seq_lens: list[int], batch: int) -> None:
        num_seqs = plan.num_seqs
        pad = batch - num_seqs
        spare = getattr(self.kv_cache, "spare_hot_slot", 0)  # full mode has no hot buffer
        slots = cache_slots(block_tables, np.arange(num_seqs), np.array(plan.num_computed_tokens), self.block_size)
        rows = torch.tensor([plan.token_ids + [0] * pad, plan.num_computed_tokens + [0] * pad,
                             slots.tolist() + [PAD_SLOT] * pad, seq_lens + [1] * pad, plan.hot_slots + [spare] * pad])
        self._inputs[:, :batch].copy_(rows, non_blocking=True)
        self._block_tables[:num_seqs, :block_tables.shape[1]].copy_(torch.from_numpy(block_tables), non_blocking=True)
        self._block_tables[num_seqs:batch].zero_()

    def _context(self, rows: slice, context: int) -> ForwardContext:
        """The captured context of the static rows `rows` (a slice from 0 for the whole step): views
        of the static buffers (the Python lists are only read by the CPU reference paths, never on
        CUDA)."""
        _, positions, slots, seq_lens, hot_slots = self._inputs[:, rows]
        n = len(positions)
        return ForwardContext(
            positions=positions, slot_mapping=slots,
            block_tables=self._block_tables[rows, : -(-context // self.block_size)],
            seq_lens=seq_lens, seq_lens_list=[context] * n, max_seq_len=context,
            query_start_loc=list(range(n + 1)), num_decodes=n,
            hot_slots=hot_slots, hot_slots_list=list(range(n)), kv_cache=self.kv_cache)

    def forward_static(self, batch: int, context: int, micro_batches: int) -> torch.Tensor:
        """What a graph captures: the forward of the static buffers' first `batch` rows, whole or in
        `micro_batches` groups (`micro_batches.run_interleaved`) -> hidden [batch, hidden]."""
        ids = self._inputs[0]
        bounds = part_bounds(batch, micro_batches)
        if len(bounds) == 2:
            ctx = self._context(slice(0, batch), context)
            return self.model(ids[:batch], ctx.positions, ctx)
        inputs = []
        for a, b in zip(bounds, bounds[1:]):
            inputs.append((ids[a:b], self._context(slice(a, b), context)))
        return torch.cat(run_interleaved(self.model, inputs, self.streams.get(len(inputs))))

    def _capture(self, batch: int, context: int, micro_batches: int) -> _Graph:
        self.forward_static(batch, context, micro_batches)  # eager run of the same shapes: compiles, picks kernels
        self.kv_cache.join_offload()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            hidden = self.forward_static(batch, context, micro_batches)
            self.kv_cache.join_offload()  # the offload branch rejoins before the capture ends
        self._pool = self._pool or graph.pool()
        entry = _Graph(graph, hidden)
        self._graphs[(batch, context, micro_batches)] = entry
        return entry
